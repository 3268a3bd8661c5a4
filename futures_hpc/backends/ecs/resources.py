"""What one ECS run created in AWS (:class:`RunResources`), and how to remove it."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

from .aws import AWSRequestError, _AWSClients
from .constants import STOP_REASON

logger = logging.getLogger("futures_hpc")


@dataclass
class RunResources:
    """What one run created in AWS, recorded as soon as each thing exists.

    :meth:`delete` removes all of it and may be called any number of times.
    """

    run_name: str
    cluster_arn: str | None = None
    cluster_created: bool = False
    task_definition_arns: list[str] = field(default_factory=list)
    instance_ids: list[str] = field(default_factory=list)
    log_group: str | None = None
    keep_log_group: bool = False
    task_arns: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def delete(self, aws: _AWSClients, stop_timeout: float) -> list[str]:
        """Stop the run's tasks, then delete instances, cluster, task definition, log group.

        Each step runs even if an earlier one failed; failures are logged.

        Returns
        -------
        list of str
            What was removed, e.g. ``"ECS cluster arn:..."``.

        """
        removed: list[str] = []
        with self._lock:
            steps = (self._stop_tasks, self._terminate_instances, self._delete_cluster,
                     self._delete_task_definitions, self._delete_log_group)
            for step in steps:
                try:
                    removed.extend(step(aws, stop_timeout))
                except AWSRequestError as error:
                    logger.warning("ECS cleanup of run %s: %s", self.run_name, error)
        if removed:
            logger.info("ECS run %s: removed %s", self.run_name, "; ".join(removed))
        return removed

    def _running_task_arns(self, aws: _AWSClients) -> list[str]:
        if self.cluster_arn is None:
            return []
        found = set(self.task_arns)
        for page in aws.pages("ecs", "list_tasks", cluster=self.cluster_arn,
                              startedBy=self.run_name[:128], desiredStatus="RUNNING"):
            found.update(page["taskArns"])
        return sorted(found)

    def _stop_tasks(self, aws: _AWSClients, stop_timeout: float) -> list[str]:
        task_arns = self._running_task_arns(aws)
        for task_arn in task_arns:
            try:  # one task ECS no longer knows must not keep the others running
                aws.call("ecs", "stop_task", cluster=self.cluster_arn, task=task_arn,
                         reason=STOP_REASON)
            except AWSRequestError as error:
                logger.warning("ECS cleanup of run %s: %s", self.run_name, error)
        if task_arns and self.cluster_created:
            _wait_tasks_stopped(aws, self.cluster_arn, task_arns, stop_timeout)
        self.task_arns = []
        return [f"ECS task {arn} (stopped)" for arn in task_arns]

    def _terminate_instances(self, aws: _AWSClients, _: float) -> list[str]:
        if not self.instance_ids:
            return []
        instance_ids = list(self.instance_ids)
        aws.call("ec2", "terminate_instances", InstanceIds=instance_ids)
        self.instance_ids = []
        return [f"EC2 instance {instance_id} (terminated)" for instance_id in instance_ids]

    def _delete_cluster(self, aws: _AWSClients, _: float) -> list[str]:
        if not (self.cluster_created and self.cluster_arn):
            return []
        for page in aws.pages("ecs", "list_container_instances", cluster=self.cluster_arn):
            for instance_arn in page["containerInstanceArns"]:
                try:  # ECS itself deregisters the instances we terminated, in its own time
                    aws.call("ecs", "deregister_container_instance", cluster=self.cluster_arn,
                             containerInstance=instance_arn, force=True)
                except AWSRequestError as error:
                    logger.debug("ECS: deregistering %s: %s", instance_arn, error)
        aws.call("ecs", "delete_cluster", cluster=self.cluster_arn)
        cluster_arn, self.cluster_arn, self.cluster_created = self.cluster_arn, None, False
        return [f"ECS cluster {cluster_arn}"]

    def _delete_task_definitions(self, aws: _AWSClients, _: float) -> list[str]:
        removed = []
        for arn in list(self.task_definition_arns):
            aws.call("ecs", "deregister_task_definition", taskDefinition=arn)
            with contextlib.suppress(AWSRequestError):  # DeleteTaskDefinitions is newer
                aws.call("ecs", "delete_task_definitions", taskDefinitions=[arn])
            self.task_definition_arns.remove(arn)
            removed.append(f"ECS task definition {arn}")
        return removed

    def _delete_log_group(self, aws: _AWSClients, _: float) -> list[str]:
        if self.log_group is None:
            return []
        log_group, self.log_group = self.log_group, None
        if self.keep_log_group:
            logger.warning("ECS run %s: workers failed; their logs are kept in CloudWatch log "
                           "group %s", self.run_name, log_group)
            return []
        aws.call("logs", "delete_log_group", logGroupName=log_group)
        return [f"CloudWatch log group {log_group}"]


def _wait_tasks_stopped(aws: _AWSClients, cluster_arn: str, task_arns: list[str],
                        timeout: float) -> None:
    """Wait until every task is STOPPED (a cluster with stopping tasks cannot be deleted)."""
    deadline = time.monotonic() + timeout
    pending = list(task_arns)
    while pending:
        still_running = []
        for start in range(0, len(pending), 100):
            described = aws.call("ecs", "describe_tasks", cluster=cluster_arn,
                                 tasks=pending[start:start + 100])
            still_running += [task["taskArn"] for task in described["tasks"]
                              if task["lastStatus"] != "STOPPED"]
        pending = still_running
        if pending and time.monotonic() > deadline:
            logger.warning("ECS: %d tasks still not STOPPED after %s s", len(pending), timeout)
            return
        if pending:
            time.sleep(min(2.0, timeout / 10))


def _delete_quietly(aws: _AWSClients, resources: RunResources, stop_timeout: float) -> None:
    """Finalizer: delete a run's resources at garbage collection or interpreter exit."""
    try:
        resources.delete(aws, stop_timeout)
    except Exception:  # noqa: BLE001 - a finalizer must not raise
        logger.exception("ECS cleanup of run %s failed", resources.run_name)
