"""One ECS run (:class:`ECSRun`): creates its AWS resources, starts and stops worker tasks."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from futures_hpc.errors import JobSubmissionError, OptionError
from futures_hpc.pools import BASE_RESOURCE
from futures_hpc.security import RunCredentials

from ...dask_settings import worker_environment as dask_worker_environment
from .aws import AWSRequestError, _AWSClients, _ec2_tags, _ecs_tags
from .constants import (
    CONTAINER_NAME,
    OVERRIDES_LIMIT,
    STOP_REASON,
    TAG_CREATED,
    TAG_CREATOR,
    TAG_HOST,
    TAG_PID,
    TAG_RUN,
    TAG_WORKER,
    TLS_CERTIFICATE_VARIABLE,
    TLS_KEY_VARIABLE,
)
from .options import ECSOptions
from .resources import RunResources

if TYPE_CHECKING:
    from .worker import ECSWorkerTask

logger = logging.getLogger("futures_hpc")

#: Longest scheduler address, for checking the overrides' size before the scheduler exists.
_LONGEST_ADDRESS = "tls://255.255.255.255:65535"


@dataclass(frozen=True)
class TaskFailure:
    """Why one worker task stopped without being asked to (RIOS's ``checkTaskErrors``)."""

    worker_name: str
    task_arn: str
    stop_code: str | None
    stopped_reason: str | None
    exit_code: int | None
    container_reason: str | None
    log_tail: tuple[str, ...] = ()

    def describe(self) -> str:
        """One paragraph for logs and error messages."""
        text = (f"worker {self.worker_name} (task {self.task_arn}): stop code "
                f"{self.stop_code or 'unknown'}, reason {self.stopped_reason or 'unknown'!r}, "
                f"exit code {self.exit_code if self.exit_code is not None else 'unknown'}")
        if self.container_reason:
            text += f" ({self.container_reason})"
        if self.log_tail:
            text += "\n      last log lines:\n" + "\n".join(
                f"        {line}" for line in self.log_tail)
        return text


def _failure_from_task(worker_name: str, task: Mapping[str, Any],
                       log_tail: Sequence[str] = ()) -> TaskFailure:
    container = next((item for item in task.get("containers", [])
                      if item.get("name") == CONTAINER_NAME), {})
    return TaskFailure(
        worker_name=worker_name, task_arn=task.get("taskArn", "?"),
        stop_code=task.get("stopCode"), stopped_reason=task.get("stoppedReason"),
        exit_code=container.get("exitCode"), container_reason=container.get("reason"),
        log_tail=tuple(log_tail),
    )


def _tls_exports(credentials: RunCredentials) -> tuple[list[str], dict[str, str]]:
    """Shell lines and environment that give a worker the run's TLS configuration.

    The certificate and the key are passed once each and copied by the shell into the
    ``DASK_DISTRIBUTED__COMM__TLS__...`` variables of
    :meth:`RunCredentials.worker_environment`, which repeat them: that keeps the overrides of a
    task under the 8192 characters ECS allows.
    """
    certificate = credentials.certificate_path.read_text()
    key = credentials.key_path.read_text()
    exports = []
    environment = {TLS_CERTIFICATE_VARIABLE: certificate, TLS_KEY_VARIABLE: key}
    for name, value in credentials.worker_environment(inline=True).items():
        if value == certificate:
            exports.append(f'{name}="${TLS_CERTIFICATE_VARIABLE}"')
        elif value == key:
            exports.append(f'{name}="${TLS_KEY_VARIABLE}"')
        else:
            environment[name] = value
    lines = [f"export {' '.join(exports)}", f"unset {TLS_CERTIFICATE_VARIABLE} {TLS_KEY_VARIABLE}"]
    return lines, environment


def _shell_prefix(credentials: RunCredentials | None,
                  prologue: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The ``sh -c`` command prefix (prologue, TLS set-up) and the environment it needs.

    The prefix goes in the container command, not the entry point, so the image's own entry
    point (if any) still runs.
    """
    lines, environment = list(prologue), {}
    if credentials is not None:
        tls_lines, environment = _tls_exports(credentials)
        lines += tls_lines
    if not lines:
        return [], environment
    script = "\n".join([*lines, 'exec "$@"'])
    return ["/bin/sh", "-c", script, "dask-worker"], environment


@dataclass
class WorkerShape:
    """The workers of one pool (``ex.with_resources``): their task definition and command.

    Attributes
    ----------
    options : ECSOptions
        The run's options with the pool's ``cpu``, ``memory``, ``nthreads``, worker memory
        limit and environment.
    resources : dict
        The dask resources each worker of the pool declares.
    gpus : int
        GPUs of each task (``resourceRequirements``; EC2 only).
    task_definition_arn : str or None
        The pool's task definition, once registered.

    """

    options: ECSOptions
    resources: dict[str, float]
    gpus: int = 0
    task_definition_arn: str | None = None


class ECSRun:
    """The AWS side of one :class:`ECSCluster`: its resources and its worker tasks."""

    def __init__(self, options: ECSOptions, credentials: RunCredentials | None,
                 aws: _AWSClients):
        self.options = options
        self.aws = aws
        self.credentials = credentials
        self.resources = RunResources(options.run_name)
        self.tags = {**options.tags, TAG_CREATOR: "futures_hpc", TAG_RUN: options.run_name,
                     TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
                     TAG_CREATED: datetime.datetime.now(datetime.timezone.utc)
                     .strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.task_definition_arn: str | None = None
        #: The dask resources the run's own workers declare (futures_hpc.pools): one unit of
        #: the base resource per thread.
        self.base_resources: dict[str, float] = {BASE_RESOURCE: options.nthreads}
        #: The pools' worker shapes, by key (``p1``, ``p2``...).
        self.shapes: dict[str, WorkerShape] = {}
        #: Worker tasks started and not yet seen STOPPED, by task ARN.
        self.watched_workers: dict[str, ECSWorkerTask] = {}
        self._command_prefix, self._environment = _shell_prefix(credentials, options.prologue)
        self._environment.update(dask_worker_environment())
        self._environment.update(options.env)

    # worker task contents ----------------------------------------------------------------
    def worker_command(self, scheduler_address: str, worker_name: str,
                       shape: str | None = None) -> list[str]:
        """The container command of one worker (of the pool ``shape``, if given)."""
        options = self.options if shape is None else self.shapes[shape].options
        resources = self.base_resources if shape is None else self.shapes[shape].resources
        return [*self._command_prefix, *options.worker_command, scheduler_address,
                "--name", worker_name, "--nthreads", str(options.nthreads),
                "--memory-limit", options.worker_memory_limit,
                "--resources", ",".join(f"{name}={amount:g}"
                                        for name, amount in resources.items()),
                "--death-timeout", str(options.worker_death_timeout), "--no-dashboard"]

    def container_overrides(self, scheduler_address: str, worker_name: str,
                            shape: str | None = None) -> dict[str, Any]:
        """The ``overrides`` of one worker task: its command and environment."""
        variables = dict(self._environment)
        if shape is not None:
            variables.update(self.shapes[shape].options.env)
        environment = [{"name": name, "value": value} for name, value in variables.items()]
        return {"containerOverrides": [{
            "name": CONTAINER_NAME,
            "command": self.worker_command(scheduler_address, worker_name, shape),
            "environment": environment,
        }]}

    def add_shape(self, key: str, shape: WorkerShape) -> None:
        """Register the task definition of a pool's workers (once per pool)."""
        if key in self.shapes:
            return
        shape.task_definition_arn = self._register_task_definition(
            shape.options, f"-{key}", shape.gpus)
        self.shapes[key] = shape

    def check_overrides_size(self) -> None:
        """Raise :class:`OptionError` if a task's overrides exceed what ECS accepts."""
        longest_name = f"{self.options.run_name}-999999"
        size = len(json.dumps(self.container_overrides(_LONGEST_ADDRESS, longest_name),
                              separators=(",", ":")))
        if size > OVERRIDES_LIMIT:
            raise OptionError(
                f"ECS option env (variables {', '.join(sorted(self.options.env))}) is not "
                "valid: with the worker command "
                f"and the TLS credentials the task overrides take {size} characters, and ECS "
                f"allows {OVERRIDES_LIMIT}; pass less environment (or put it in the image)"
            )

    # resources ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create (or find) the cluster, instances, log group and task definition."""
        if self.options.cluster is None:
            self._create_cluster()
        else:
            self._find_cluster()
        if self.options.log_group:
            self._ensure_log_group()
        if self.options.private_cluster:
            self._launch_instances()
            self._wait_instances_joined()
        self.task_definition_arn = self._register_task_definition()

    def _create_cluster(self) -> None:
        arguments: dict[str, Any] = {"clusterName": self.options.resource_name,
                                     "tags": _ecs_tags(self.tags)}
        if self.options.fargate:
            arguments["capacityProviders"] = ["FARGATE", "FARGATE_SPOT"]
        cluster = self.aws.call("ecs", "create_cluster", **arguments)["cluster"]
        self.resources.cluster_arn = cluster["clusterArn"]
        self.resources.cluster_created = True
        logger.info("ECS run %s: created cluster %s", self.options.run_name,
                    cluster["clusterArn"])

    def _find_cluster(self) -> None:
        described = self.aws.call("ecs", "describe_clusters", clusters=[self.options.cluster])
        active = [item for item in described["clusters"] if item["status"] == "ACTIVE"]
        if not active:
            raise OptionError(f"ECS option cluster={self.options.cluster!r} is not valid: no "
                              f"ACTIVE cluster of that name or ARN in {self.options.region}")
        self.resources.cluster_arn = active[0]["clusterArn"]

    def _ensure_log_group(self) -> None:
        name = self.options.log_group
        found = self.aws.call("logs", "describe_log_groups", logGroupNamePrefix=name)
        if any(group["logGroupName"] == name for group in found.get("logGroups", [])):
            return
        if not self.options.create_log_group:
            raise OptionError(f"ECS option log_group={name!r} is not valid: no such CloudWatch "
                              f"log group in {self.options.region}; create it, or pass "
                              "log_group=True for a log group of this run")
        self.aws.call("logs", "create_log_group", logGroupName=name, tags=self.tags)
        self.resources.log_group = name
        self.aws.call("logs", "put_retention_policy", logGroupName=name, retentionInDays=14)

    def _launch_instances(self) -> None:
        options = self.options
        user_data = ("#!/bin/bash\n"
                     f"echo ECS_CLUSTER={options.resource_name} >> /etc/ecs/ecs.config\n")
        arguments: dict[str, Any] = {
            "ImageId": options.ami, "InstanceType": options.instance_type,
            "MinCount": options.num_instances, "MaxCount": options.num_instances,
            "SubnetId": options.subnet, "IamInstanceProfile": {"Arn": options.instance_profile_arn},
            "UserData": user_data,
            "TagSpecifications": [{"ResourceType": "instance", "Tags": _ec2_tags(
                {**self.tags, "Name": options.resource_name})}],
        }
        if options.security_groups:
            arguments["SecurityGroupIds"] = list(options.security_groups)
        instances = self.aws.call("ec2", "run_instances", **arguments)["Instances"]
        self.resources.instance_ids.extend(item["InstanceId"] for item in instances)
        logger.info("ECS run %s: launched EC2 instances %s", options.run_name,
                    ", ".join(self.resources.instance_ids))

    def joined_instance_ids(self) -> set[str]:
        """EC2 instance ids registered and ACTIVE in the run's cluster."""
        cluster_arn = self.resources.cluster_arn
        arns = [arn for page in self.aws.pages("ecs", "list_container_instances",
                                               cluster=cluster_arn)
                for arn in page["containerInstanceArns"]]
        joined = set()
        for start in range(0, len(arns), 100):
            described = self.aws.call("ecs", "describe_container_instances",
                                      cluster=cluster_arn,
                                      containerInstances=arns[start:start + 100])
            joined.update(item["ec2InstanceId"] for item in described["containerInstances"]
                          if item["status"] == "ACTIVE" and item.get("agentConnected", True))
        return joined

    def _wait_instances_joined(self) -> None:
        expected = set(self.resources.instance_ids)
        deadline = time.monotonic() + self.options.instance_wait_timeout
        while True:
            missing = expected - self.joined_instance_ids()
            if not missing:
                return
            if time.monotonic() > deadline:
                raise JobSubmissionError(
                    f"ECS run {self.options.run_name}: {len(missing)} of {len(expected)} EC2 "
                    f"instances ({', '.join(sorted(missing))}) did not join cluster "
                    f"{self.options.resource_name} within {self.options.instance_wait_timeout} s; "
                    "check that the AMI is ECS-optimized (runs the ECS agent), that the "
                    "instance profile's role has AmazonEC2ContainerServiceforEC2Role, and that "
                    "the subnet can reach the ECS endpoint"
                )
            time.sleep(min(self.options.poll_interval, 5.0))

    def _container_definition(self, options: ECSOptions, gpus: int = 0) -> dict[str, Any]:
        container: dict[str, Any] = {"name": CONTAINER_NAME, "image": options.container_image,
                                     "essential": True}
        if options.fargate:
            container["memory"] = options.memory
        else:
            container["memoryReservation"] = options.memory_reservation
            if options.memory:
                container["memory"] = options.memory
            if options.cpu:
                container["cpu"] = options.cpu
        if options.log_group:
            container["logConfiguration"] = {"logDriver": "awslogs", "options": {
                "awslogs-group": options.log_group, "awslogs-region": options.region,
                "awslogs-stream-prefix": options.run_name}}
        if gpus:
            container["resourceRequirements"] = [{"type": "GPU", "value": str(gpus)}]
        return container

    def _register_task_definition(self, options: ECSOptions | None = None, suffix: str = "",
                                  gpus: int = 0) -> str:
        """Register a task definition of the run's workers (or a pool's); return its ARN."""
        options = options or self.options
        arguments: dict[str, Any] = {
            "family": f"{options.resource_name}-worker{suffix}",
            "containerDefinitions": [self._container_definition(options, gpus)],
            "networkMode": options.network_mode,
            "requiresCompatibilities": [options.launch_type],
            "tags": _ecs_tags(self.tags),
            "runtimePlatform": {"cpuArchitecture": options.cpu_architecture,
                                "operatingSystemFamily": "LINUX"},
        }
        if options.fargate:
            arguments["cpu"], arguments["memory"] = str(options.cpu), str(options.memory)
        for option, key in (("task_role_arn", "taskRoleArn"),
                            ("execution_role_arn", "executionRoleArn")):
            if getattr(options, option):
                arguments[key] = getattr(options, option)
        definition = self.aws.call("ecs", "register_task_definition", **arguments)
        arn = definition["taskDefinition"]["taskDefinitionArn"]
        self.resources.task_definition_arns.append(arn)
        return arn

    # worker tasks ------------------------------------------------------------------------
    def _placement(self) -> dict[str, Any]:
        options = self.options
        arguments: dict[str, Any] = {}
        if options.fargate_spot:
            arguments["capacityProviderStrategy"] = [{"capacityProvider": "FARGATE_SPOT",
                                                      "weight": 1}]
        else:
            arguments["launchType"] = options.launch_type
        if options.fargate:
            arguments["platformVersion"] = "LATEST"
        if options.network_mode == "awsvpc":
            network = {"subnets": [options.subnet],
                       "securityGroups": list(options.security_groups)}
            if options.fargate:
                network["assignPublicIp"] = "ENABLED" if options.assign_public_ip else "DISABLED"
            arguments["networkConfiguration"] = {"awsvpcConfiguration": network}
        return arguments

    def run_worker(self, scheduler_address: str, worker_name: str,
                   shape: str | None = None) -> dict[str, Any]:
        """Start one worker task (of the pool ``shape``, if given); return its description.

        Raises
        ------
        JobSubmissionError
            If ECS could not place or start the task.

        """
        response = self.aws.call(
            "ecs", "run_task", cluster=self.resources.cluster_arn,
            taskDefinition=(self.task_definition_arn if shape is None
                            else self.shapes[shape].task_definition_arn), count=1,
            startedBy=self.options.run_name[:128],
            overrides=self.container_overrides(scheduler_address, worker_name, shape),
            tags=_ecs_tags({**self.tags, TAG_WORKER: worker_name}), **self._placement(),
        )
        if not response.get("tasks"):
            reasons = "; ".join(f"{failure.get('reason', 'unknown')}"
                                f"{': ' + failure['detail'] if failure.get('detail') else ''}"
                                for failure in response.get("failures", [])) or "no reason given"
            raise JobSubmissionError(f"ECS RunTask placed no task for worker {worker_name} in "
                                     f"cluster {self.resources.cluster_arn}: {reasons}")
        task = response["tasks"][0]
        self.resources.task_arns.append(task["taskArn"])
        logger.debug("ECS run %s: worker %s is task %s", self.options.run_name, worker_name,
                     task["taskArn"])
        return task

    def stop_worker(self, task_arn: str) -> None:
        """Stop one worker task (a no-op for a stopped task)."""
        self.aws.call("ecs", "stop_task", cluster=self.resources.cluster_arn, task=task_arn,
                      reason=STOP_REASON)

    def describe_tasks(self, task_arns: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Descriptions of tasks by ARN; a task ECS no longer knows maps to a STOPPED stub."""
        described: dict[str, dict[str, Any]] = {}
        for start in range(0, len(task_arns), 100):
            response = self.aws.call("ecs", "describe_tasks", cluster=self.resources.cluster_arn,
                                     tasks=list(task_arns[start:start + 100]))
            described.update((task["taskArn"], task) for task in response["tasks"])
            for failure in response.get("failures", []):
                described[failure["arn"]] = {"taskArn": failure["arn"], "lastStatus": "STOPPED",
                                             "stoppedReason": failure.get("reason")}
        return described

    def log_tail(self, task_arn: str, lines: int = 20) -> list[str]:
        """The last lines the task's container wrote to CloudWatch Logs, if logging is on."""
        if not self.options.log_group:
            return []
        stream = f"{self.options.run_name}/{CONTAINER_NAME}/{task_arn.split('/')[-1]}"
        try:
            events = self.aws.call("logs", "get_log_events", logGroupName=self.options.log_group,
                                   logStreamName=stream, limit=lines, startFromHead=False)
        except AWSRequestError as error:
            logger.debug("ECS: no log lines for %s: %s", task_arn, error)
            return []
        return [event["message"] for event in events.get("events", [])]
