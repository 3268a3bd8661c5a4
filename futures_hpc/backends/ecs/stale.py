"""Finding and removing what crashed ECS runs left in AWS, by their ``futures_hpc:*`` tags."""

from __future__ import annotations

import datetime
import glob
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from typing import Any

from futures_hpc import cleanup

from .aws import _AWSClients, _tags_as_dict
from .constants import LOG_GROUP_PREFIX, NAME_PREFIX, TAG_CREATED, TAG_HOST, TAG_PID, TAG_RUN
from .resources import RunResources

logger = logging.getLogger("futures_hpc")


def _is_stale(tags: Mapping[str, str], run_name: str | None,
              older_than: datetime.timedelta | None) -> bool:
    run = tags.get(TAG_RUN)
    if run is None:
        return False
    if run_name is not None:
        return run == run_name
    pid_text = tags.get(TAG_PID, "")
    if tags.get(TAG_HOST) == socket.gethostname() and pid_text.isdigit():
        if int(pid_text) != os.getpid() and not cleanup.process_alive(int(pid_text)):
            return True
    if older_than is None:
        return False
    try:
        created = datetime.datetime.strptime(tags.get(TAG_CREATED, ""), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return False
    age = datetime.datetime.now(datetime.timezone.utc) - created.replace(
        tzinfo=datetime.timezone.utc)
    return age > older_than


def _find_stale_clusters(aws: _AWSClients, is_stale: Any,
                         runs: dict[str, RunResources]) -> list[str]:
    """Record stale runs' clusters and tasks in ``runs``; return all ACTIVE cluster ARNs."""
    active = []
    for page in aws.pages("ecs", "list_clusters"):
        for start in range(0, len(page["clusterArns"]), 100):
            described = aws.call("ecs", "describe_clusters", include=["TAGS"],
                                 clusters=page["clusterArns"][start:start + 100])
            for cluster in described["clusters"]:
                if cluster["status"] != "ACTIVE":
                    continue
                active.append(cluster["clusterArn"])
                tags = _tags_as_dict(cluster.get("tags"))
                if is_stale(tags):
                    resources = runs.setdefault(tags[TAG_RUN], RunResources(tags[TAG_RUN]))
                    resources.cluster_arn = cluster["clusterArn"]
                    resources.cluster_created = True
    for cluster_arn in active:
        _find_stale_tasks(aws, cluster_arn, is_stale, runs)
    return active


def _find_stale_tasks(aws: _AWSClients, cluster_arn: str, is_stale: Any,
                      runs: dict[str, RunResources]) -> None:
    task_arns = [arn for page in aws.pages("ecs", "list_tasks", cluster=cluster_arn,
                                           desiredStatus="RUNNING")
                 for arn in page["taskArns"]]
    for start in range(0, len(task_arns), 100):
        described = aws.call("ecs", "describe_tasks", cluster=cluster_arn, include=["TAGS"],
                             tasks=task_arns[start:start + 100])
        for task in described["tasks"]:
            tags = _tags_as_dict(task.get("tags"))
            if is_stale(tags):
                resources = runs.setdefault(tags[TAG_RUN], RunResources(tags[TAG_RUN]))
                resources.cluster_arn = resources.cluster_arn or cluster_arn
                resources.task_arns.append(task["taskArn"])


def _find_stale_task_definitions(aws: _AWSClients, is_stale: Any,
                                 runs: dict[str, RunResources]) -> None:
    families = [family for page in aws.pages("ecs", "list_task_definition_families",
                                             familyPrefix=NAME_PREFIX, status="ACTIVE")
                for family in page["families"]]
    for family in families:
        for page in aws.pages("ecs", "list_task_definitions", familyPrefix=family,
                              status="ACTIVE"):
            for arn in page["taskDefinitionArns"]:
                described = aws.call("ecs", "describe_task_definition", taskDefinition=arn,
                                     include=["TAGS"])
                tags = _tags_as_dict(described.get("tags"))
                if is_stale(tags):
                    runs.setdefault(tags[TAG_RUN], RunResources(tags[TAG_RUN])) \
                        .task_definition_arns.append(arn)


def _find_stale_instances(aws: _AWSClients, is_stale: Any,
                          runs: dict[str, RunResources]) -> None:
    filters = [{"Name": "tag-key", "Values": [TAG_RUN]},
               {"Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped"]}]
    for page in aws.pages("ec2", "describe_instances", Filters=filters):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                tags = _tags_as_dict(instance.get("Tags"))
                if is_stale(tags):
                    runs.setdefault(tags[TAG_RUN], RunResources(tags[TAG_RUN])) \
                        .instance_ids.append(instance["InstanceId"])


def _find_stale_log_groups(aws: _AWSClients, is_stale: Any,
                           runs: dict[str, RunResources]) -> None:
    for page in aws.pages("logs", "describe_log_groups", logGroupNamePrefix=LOG_GROUP_PREFIX):
        for group in page["logGroups"]:
            tags = aws.call("logs", "list_tags_log_group",
                            logGroupName=group["logGroupName"]).get("tags", {})
            if is_stale(tags):
                runs.setdefault(tags[TAG_RUN], RunResources(tags[TAG_RUN])).log_group = \
                    group["logGroupName"]


def _cleanup_stale(aws: _AWSClients, run_name: str | None,
                   older_than: datetime.timedelta | None, task_stop_timeout: float) -> list[str]:
    def is_stale(tags: Mapping[str, str]) -> bool:
        return _is_stale(tags, run_name, older_than)

    runs: dict[str, RunResources] = {}
    _find_stale_clusters(aws, is_stale, runs)
    _find_stale_task_definitions(aws, is_stale, runs)
    _find_stale_instances(aws, is_stale, runs)
    _find_stale_log_groups(aws, is_stale, runs)
    removed = []
    for resources in runs.values():
        logger.info("ECS: removing what stale run %s left", resources.run_name)
        removed.extend(resources.delete(aws, task_stop_timeout))
        for directory in glob.glob(os.path.join(tempfile.gettempdir(),
                                                f"{glob.escape(resources.run_name)}-tls-*")):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(f"TLS directory {directory}")
    return removed
