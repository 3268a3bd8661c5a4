"""The ``ecs`` backend: dask workers as AWS ECS tasks, on Fargate or on a private EC2 cluster.

:class:`ECSCluster` is a :class:`distributed.deploy.SpecCluster`. Its scheduler runs inside the
client's process and listens on an address the workers can reach (``scheduler_host``); each
worker is one ECS task started with ``RunTask`` and stopped with ``StopTask``, so ``scale`` and
``adapt`` work as on the batch backends. Three ways to get capacity:

* **Fargate** (``launch_type="FARGATE"``): tasks of ``cpu``/``memory`` in a ``subnet``;
  ``fargate_spot=True`` runs them on Fargate Spot.
* **a private cluster** (``launch_type="EC2"``, no ``cluster``): an ECS cluster is created for
  the run with ``num_instances`` EC2 instances, which must join it before tasks are placed.
* **an existing cluster** (``cluster="name or ARN"``), Fargate or EC2.

Everything created (ECS cluster, task definition, EC2 instances, log group, tasks) carries the
run's tags and is deleted at shutdown, also after an exception or Ctrl-C (and at interpreter
exit); :meth:`ECSCluster.cleanup_stale` removes what a crashed run left, found by its tags.
Worker tasks that stop on their own are reported with their stop code, reason and exit code and
replaced, up to ``max_resubmissions``. The TLS credentials of the run travel to the workers in
the container overrides of each task, never in the task definition.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import glob
import inspect
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface, SpecCluster
from distributed.scheduler import Scheduler
from distributed.security import Security
from tornado.ioloop import PeriodicCallback

from futures_hpc import cleanup
from futures_hpc.errors import (
    BackendUnavailableError,
    JobFailedError,
    JobSubmissionError,
    OptionError,
)
from futures_hpc.executor import HPCExecutor
from futures_hpc.security import RunCredentials, create_run_credentials

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError:  # pragma: no cover - boto3 is the optional extra "ecs"
    boto3 = None

logger = logging.getLogger("futures_hpc")

#: CPU units of a Fargate task and the memory sizes (MiB) each allows (AWS Fargate table).
FARGATE_MEMORY_BY_CPU: dict[int, tuple[int, ...]] = {
    256: (512, 1024, 2048),
    512: tuple(range(1024, 4096 + 1, 1024)),
    1024: tuple(range(2048, 8192 + 1, 1024)),
    2048: tuple(range(4096, 16384 + 1, 1024)),
    4096: tuple(range(8192, 30720 + 1, 1024)),
    8192: tuple(range(16384, 61440 + 1, 4096)),
    16384: tuple(range(32768, 122880 + 1, 8192)),
}
#: ECS limit on the JSON text of a task's ``overrides``.
OVERRIDES_LIMIT = 8192
CONTAINER_NAME = "dask-worker"
NAME_PREFIX = "futures-hpc"
LOG_GROUP_PREFIX = "/futures-hpc/"
STOP_REASON = "futures_hpc: worker no longer needed"
TAG_CREATOR = "futures_hpc:created-by"
TAG_RUN = "futures_hpc:run"
TAG_HOST = "futures_hpc:host"
TAG_PID = "futures_hpc:pid"
TAG_CREATED = "futures_hpc:created"
TAG_WORKER = "futures_hpc:worker"
USER_AGENT = "futures_hpc-ecs"
TLS_CERTIFICATE_VARIABLE = "FUTURES_HPC_TLS_CERTIFICATE"
TLS_KEY_VARIABLE = "FUTURES_HPC_TLS_KEY"
#: Longest scheduler address, for checking the overrides' size before the scheduler exists.
_LONGEST_ADDRESS = "tls://255.255.255.255:65535"
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
_PROFILE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:instance-profile/[\w+=,.@/-]+$")
_CLUSTER_ARN = re.compile(r"^arn:aws[a-z-]*:ecs:[a-z0-9-]+:\d{12}:cluster/[\w-]{1,255}$")
_THROTTLING_CODES = {"Throttling", "ThrottlingException", "ThrottledException",
                     "RequestLimitExceeded", "TooManyRequestsException",
                     "RequestThrottled", "RequestThrottledException", "SlowDown"}


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
class AWSRequestError(JobSubmissionError):
    """An AWS API call failed; the message names the operation, the AWS code and message.

    Attributes
    ----------
    service, operation : str
        E.g. ``"ecs"`` and ``"RunTask"``.
    code : str
        The AWS error code (``AccessDeniedException``, ``ThrottlingException``, ...).
    aws_message : str
        The message AWS gave.
    region : str

    """

    def __init__(self, service: str, operation: str, code: str, aws_message: str,
                 region: str, attempts: int | None = None):
        self.service = service
        self.operation = operation
        self.code = code
        self.aws_message = aws_message
        self.region = region
        self.attempts = attempts
        super().__init__(self._describe())

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.operation, self.code, self.aws_message,
                             self.region, self.attempts))

    def _describe(self) -> str:
        text = (f"AWS {self.service.upper()} {self.operation} failed in {self.region}: "
                f"{self.code}: {self.aws_message}")
        if self.is_access_denied:
            text += (f" (the AWS identity in use needs permission "
                     f"{self.service}:{self.operation})")
        elif self.is_throttling:
            text += (f" (still throttled after {self.attempts or 'all'} attempts of botocore's "
                     "standard retry mode; raise aws_max_attempts, scale more slowly, or ask "
                     "AWS for a higher rate limit)")
        return text

    @property
    def is_access_denied(self) -> bool:
        """Whether AWS refused the call for lack of permission."""
        return ("AccessDenied" in self.code or "Unauthorized" in self.code
                or "NotAuthorized" in self.code)

    @property
    def is_throttling(self) -> bool:
        """Whether AWS refused the call for its rate limit."""
        return self.code in _THROTTLING_CODES


# ---------------------------------------------------------------------------------------------
# option validation (no AWS call)
# ---------------------------------------------------------------------------------------------
def _require_boto3() -> None:
    if boto3 is None:
        raise BackendUnavailableError("the ecs backend needs boto3: "
                                      "pip install 'futures_hpc[ecs]'")


def _option_error(option: str, value: Any, allowed: str) -> OptionError:
    return OptionError(f"ECS option {option}={value!r} is not valid: {allowed}")


def _parse_fargate_cpu(cpu: int | str) -> int:
    """CPU units from ``1024``, ``"1024"`` or ``"1 vCPU"``."""
    allowed = (f"Fargate CPU units, one of {sorted(FARGATE_MEMORY_BY_CPU)}, "
               "or a string such as '0.5 vCPU'")
    text = str(cpu).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*vcpu", text, flags=re.IGNORECASE)
    try:
        units = float(match.group(1)) * 1024 if match else float(text)
    except ValueError:
        raise _option_error("cpu", cpu, allowed) from None
    if units not in FARGATE_MEMORY_BY_CPU:
        raise _option_error("cpu", cpu, allowed)
    return int(units)


def _parse_memory_mib(option: str, memory: int | str) -> int:
    """Whole MiB from ``2048``, ``"2048"``, ``"2GB"``, ``"2 GiB"`` or ``"512MiB"``.

    As in ECS task definitions, ``GB`` means 1024 MiB.
    """
    allowed = "an amount of memory such as 2048 (MiB), '2GB' or '512MiB'"
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(mb|mib|gb|gib)?\s*", str(memory),
                         flags=re.IGNORECASE)
    if isinstance(memory, bool) or match is None:
        raise _option_error(option, memory, allowed)
    amount = float(match.group(1))
    if (match.group(2) or "mib").lower() in ("gb", "gib"):
        amount *= 1024
    if amount <= 0 or amount != int(amount):
        raise _option_error(option, memory, allowed + " (a positive whole number of MiB)")
    return int(amount)


def check_fargate_size(cpu: int, memory: int) -> None:
    """Raise :class:`OptionError` unless Fargate offers ``memory`` MiB with ``cpu`` units.

    Parameters
    ----------
    cpu : int
        CPU units (1024 per vCPU).
    memory : int
        MiB.

    """
    allowed_memory = FARGATE_MEMORY_BY_CPU[cpu]
    if memory not in allowed_memory:
        shown = ", ".join(str(size) for size in allowed_memory)
        raise OptionError(
            f"ECS option memory={memory} (MiB) is not valid with cpu={cpu}: Fargate offers "
            f"{cpu} CPU units with memory of {shown} MiB only"
        )


def _check_arn(option: str, value: str | None, pattern: re.Pattern[str], example: str) -> None:
    if value is not None and not pattern.match(value):
        raise _option_error(option, value, f"an ARN such as {example!r}")


def _check_prefixed_id(option: str, value: str | None, prefix: str) -> None:
    if value is not None and (not isinstance(value, str) or not value.startswith(prefix)):
        raise _option_error(option, value, f"an id starting with {prefix!r}")


def _resolve_region(region: str | None, session: Any = None) -> str:
    """The region given, else the one boto3 finds in the environment or config files."""
    if region:
        return region
    if session is not None and session.region_name:
        return session.region_name
    found = boto3.session.Session().region_name if boto3 is not None else None
    if not found:
        raise OptionError(
            "ECS option region=None is not valid: no AWS region was given and none is "
            "configured; pass region='eu-west-1' (for example) or set AWS_DEFAULT_REGION"
        )
    return found


def _sanitize_name(name: str) -> str:
    """A name usable for ECS clusters, task families and tags (letters, digits, - and _)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "run"
    if not cleaned.startswith(NAME_PREFIX):
        cleaned = f"{NAME_PREFIX}-{cleaned}"
    return cleaned[:100]


def _string_mapping(option: str, values: Mapping[str, Any] | None) -> dict[str, str]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise _option_error(option, values, "a mapping of names to strings")
    return {str(key): str(value) for key, value in values.items()}


def _check_tags(tags: dict[str, str]) -> None:
    for key in tags:
        if key.lower().startswith("aws:") or key.startswith("futures_hpc:"):
            raise _option_error("tags", tags, f"tag key {key!r} is reserved (aws:, futures_hpc:)")
        if len(key) > 128 or len(tags[key]) > 256:
            raise _option_error("tags", tags, "keys of at most 128 and values of at most 256 "
                                "characters")


@dataclass(frozen=True)
class ECSOptions:
    """The validated options of one ECS run; built by :meth:`from_arguments`.

    See :class:`ECSCluster` for the meaning of each field.
    """

    region: str
    container_image: str
    launch_type: str
    cluster: str | None
    cpu: int | None
    memory: int | None
    cpu_architecture: str
    subnet: str | None
    security_groups: tuple[str, ...]
    task_role_arn: str | None
    execution_role_arn: str | None
    fargate_spot: bool
    assign_public_ip: bool
    num_instances: int | None
    ami: str | None
    instance_type: str | None
    instance_profile_arn: str | None
    memory_reservation: int
    network_mode: str
    worker_command: tuple[str, ...]
    prologue: tuple[str, ...]
    nthreads: int
    worker_memory_limit: str
    env: dict[str, str]
    log_group: str | None
    create_log_group: bool
    tags: dict[str, str]
    max_resubmissions: int
    worker_death_timeout: float
    poll_interval: float
    instance_wait_timeout: float
    task_stop_timeout: float
    endpoint_url: str | None
    aws_max_attempts: int
    run_name: str

    @property
    def fargate(self) -> bool:
        """Whether worker tasks run on Fargate."""
        return self.launch_type == "FARGATE"

    @property
    def private_cluster(self) -> bool:
        """Whether the run creates its own cluster of EC2 instances."""
        return self.launch_type == "EC2" and self.cluster is None

    @property
    def resource_name(self) -> str:
        """Name of the cluster this run creates, and stem of its other names."""
        return self.run_name

    @classmethod
    def from_arguments(cls, **arguments: Any) -> ECSOptions:
        """Validate the keyword arguments of :class:`ECSCluster`; no AWS call is made.

        Raises
        ------
        OptionError
            Naming the option, the value given and what is allowed.

        """
        _require_boto3()
        arguments["region"] = _resolve_region(arguments.get("region"),
                                              arguments.pop("boto3_session", None))
        launch_type = str(arguments.get("launch_type") or "FARGATE").upper()
        if launch_type not in ("FARGATE", "EC2"):
            raise _option_error("launch_type", arguments.get("launch_type"),
                                "'FARGATE' or 'EC2'")
        arguments["launch_type"] = launch_type
        _check_common(arguments)
        if launch_type == "FARGATE":
            _check_fargate(arguments)
        else:
            _check_ec2(arguments)
        _check_logging_and_roles(arguments)
        _fill_worker_defaults(arguments)
        return cls(**arguments)


def _check_common(arguments: dict[str, Any]) -> None:
    image = arguments.get("container_image")
    if not image or not isinstance(image, str):
        raise _option_error("container_image", image, "the URI of a container image with "
                            "python and distributed installed (e.g. "
                            "'123456789012.dkr.ecr.eu-west-1.amazonaws.com/work:1')")
    cluster = arguments.get("cluster")
    if cluster is not None and not (isinstance(cluster, str)
                                    and (re.fullmatch(r"[\w-]{1,255}", cluster)
                                         or _CLUSTER_ARN.match(cluster))):
        raise _option_error("cluster", cluster, "the name or ARN of an existing ECS cluster, "
                            "or None to create one")
    _check_prefixed_id("subnet", arguments.get("subnet"), "subnet-")
    groups = arguments.get("security_groups") or ()
    if isinstance(groups, str):
        groups = (groups,)
    for group in groups:
        _check_prefixed_id("security_groups", group, "sg-")
    arguments["security_groups"] = tuple(groups)
    _check_arn("task_role_arn", arguments.get("task_role_arn"), _ROLE_ARN,
               "arn:aws:iam::123456789012:role/worker-task")
    _check_arn("execution_role_arn", arguments.get("execution_role_arn"), _ROLE_ARN,
               "arn:aws:iam::123456789012:role/ecsTaskExecutionRole")
    arguments["env"] = _string_mapping("env", arguments.get("env"))
    arguments["tags"] = _string_mapping("tags", arguments.get("tags"))
    _check_tags(arguments["tags"])
    resubmissions = arguments.get("max_resubmissions", 3)
    if not isinstance(resubmissions, int) or isinstance(resubmissions, bool) or resubmissions < 0:
        raise _option_error("max_resubmissions", resubmissions, "a whole number >= 0")
    for option in ("worker_death_timeout", "poll_interval", "instance_wait_timeout",
                   "task_stop_timeout"):
        value = arguments.get(option)
        if not isinstance(value, (int, float)) or value <= 0:
            raise _option_error(option, value, "a positive number of seconds")
    attempts = arguments.get("aws_max_attempts")
    if not isinstance(attempts, int) or attempts < 1:
        raise _option_error("aws_max_attempts", attempts, "a whole number >= 1")
    arguments["run_name"] = _sanitize_name(arguments.get("run_name")
                                           or uuid.uuid4().hex[:10])


def _check_fargate(arguments: dict[str, Any]) -> None:
    for option in ("num_instances", "ami", "instance_type", "instance_profile_arn"):
        if arguments.get(option) is not None:
            raise _option_error(option, arguments[option],
                                "only with launch_type='EC2' (a private cluster)")
    if arguments.get("network_mode") not in (None, "awsvpc"):
        raise _option_error("network_mode", arguments["network_mode"],
                            "Fargate tasks use 'awsvpc' only")
    arguments["network_mode"] = "awsvpc"
    if not arguments.get("subnet"):
        raise _option_error("subnet", arguments.get("subnet"),
                            "Fargate tasks need the id of a subnet ('subnet-...') in the VPC "
                            "where workers run, reachable from the scheduler")
    cpu = _parse_fargate_cpu(arguments.get("cpu") or 1024)
    memory = _parse_memory_mib("memory", arguments.get("memory") or 4096)
    check_fargate_size(cpu, memory)
    arguments["cpu"], arguments["memory"] = cpu, memory
    architecture = str(arguments.get("cpu_architecture") or "X86_64").upper()
    if architecture not in ("X86_64", "ARM64"):
        raise _option_error("cpu_architecture", arguments.get("cpu_architecture"),
                            "'X86_64' or 'ARM64'")
    arguments["cpu_architecture"] = architecture


def _check_ec2(arguments: dict[str, Any]) -> None:
    for option in ("fargate_spot", "assign_public_ip"):
        if arguments.get(option):
            raise _option_error(option, arguments[option], "only with launch_type='FARGATE'")
    network_mode = arguments.get("network_mode") or "host"
    if network_mode not in ("host", "awsvpc"):
        raise _option_error("network_mode", network_mode, "'host' or 'awsvpc' (a dask worker "
                            "must be reachable at the address it advertises)")
    arguments["network_mode"] = network_mode
    if network_mode == "awsvpc" and not arguments.get("subnet"):
        raise _option_error("subnet", None, "network_mode='awsvpc' needs a subnet id")
    if arguments.get("cpu") is not None:
        cpu = arguments["cpu"]
        if not isinstance(cpu, int) or cpu <= 0:
            raise _option_error("cpu", cpu, "CPU units reserved per worker container "
                                "(1024 per vCPU)")
    if arguments.get("memory") is not None:
        arguments["memory"] = _parse_memory_mib("memory", arguments["memory"])
    arguments["memory_reservation"] = _parse_memory_mib(
        "memory_reservation", arguments.get("memory_reservation") or 1024)
    arguments["cpu_architecture"] = str(arguments.get("cpu_architecture") or "X86_64").upper()
    if arguments.get("cluster") is None:
        _check_private_cluster(arguments)
    else:
        for option in ("num_instances", "ami", "instance_type", "instance_profile_arn"):
            if arguments.get(option) is not None:
                raise _option_error(option, arguments[option], "only for a private cluster "
                                    "(cluster=None); an existing cluster has its instances")


def _check_private_cluster(arguments: dict[str, Any]) -> None:
    count = arguments.get("num_instances")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise _option_error("num_instances", count, "a private cluster (launch_type='EC2', "
                            "cluster=None) needs a number of EC2 instances >= 1")
    _check_prefixed_id("ami", arguments.get("ami"), "ami-")
    required = {
        "ami": "an ECS-optimized AMI id ('ami-...'), with the ECS agent installed",
        "instance_type": "an EC2 instance type such as 'm6i.large'",
        "instance_profile_arn": "the ARN of an instance profile whose role has the "
                                "AmazonEC2ContainerServiceforEC2Role policy",
        "subnet": "the id of the subnet ('subnet-...') where the instances run",
    }
    for option, allowed in required.items():
        if not arguments.get(option):
            raise _option_error(option, arguments.get(option), allowed)
    _check_arn("instance_profile_arn", arguments["instance_profile_arn"], _PROFILE_ARN,
               "arn:aws:iam::123456789012:instance-profile/ecsInstanceRole")


def _check_logging_and_roles(arguments: dict[str, Any]) -> None:
    log_group = arguments.get("log_group")
    arguments["create_log_group"] = log_group is True
    if log_group is True:
        arguments["log_group"] = LOG_GROUP_PREFIX + arguments["run_name"]
    elif log_group is not None and (not isinstance(log_group, str) or not log_group):
        raise _option_error("log_group", log_group, "None, True (a log group for this run) or "
                            "the name of an existing CloudWatch log group")
    needs_execution_role = []
    if ".dkr.ecr." in arguments["container_image"]:
        needs_execution_role.append("the image is in ECR")
    if arguments.get("log_group"):
        needs_execution_role.append("logs go to CloudWatch")
    if needs_execution_role and not arguments.get("execution_role_arn"):
        raise _option_error(
            "execution_role_arn", None,
            f"required because {' and '.join(needs_execution_role)}: the ARN of a role with "
            "the AmazonECSTaskExecutionRolePolicy policy, which ECS uses to pull the image "
            "and write logs",
        )


def _fill_worker_defaults(arguments: dict[str, Any]) -> None:
    nthreads = arguments.get("nthreads")
    if nthreads is None:
        nthreads = max(1, (arguments.get("cpu") or 1024) // 1024)
    if not isinstance(nthreads, int) or nthreads < 1:
        raise _option_error("nthreads", nthreads, "a whole number >= 1")
    arguments["nthreads"] = nthreads
    memory = arguments.get("memory")
    arguments["worker_memory_limit"] = f"{memory}MiB" if memory else "auto"
    command = arguments.pop("worker_command", None)
    python = arguments.pop("python", None)
    if command is None:
        command = [python, "-m", "distributed.cli.dask_worker"] if python else ["dask", "worker"]
    if isinstance(command, str) or not all(isinstance(part, str) for part in command):
        raise _option_error("worker_command", command, "a list of strings, such as "
                            "['dask', 'worker']")
    arguments["worker_command"] = tuple(command)
    prologue = arguments.get("prologue") or ()
    if isinstance(prologue, str) or not all(isinstance(line, str) for line in prologue):
        raise _option_error("prologue", prologue, "a list of shell lines run before the worker")
    arguments["prologue"] = tuple(prologue)


# ---------------------------------------------------------------------------------------------
# AWS access
# ---------------------------------------------------------------------------------------------
def _ecs_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in tags.items()]


def _ec2_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def _tags_as_dict(tags: Sequence[Mapping[str, str]] | None) -> dict[str, str]:
    return {tag.get("key", tag.get("Key")): tag.get("value", tag.get("Value", ""))
            for tag in tags or []}


class _AWSClients:
    """boto3 clients of one region; every call's errors become :class:`AWSRequestError`."""

    def __init__(self, region: str, endpoint_url: str | None, max_attempts: int,
                 session: Any = None):
        self.region = region
        self.max_attempts = max_attempts
        session = session or boto3.session.Session()
        config = Config(region_name=region, user_agent_extra=USER_AGENT,
                        retries={"mode": "standard", "total_max_attempts": max_attempts})
        self._clients = {name: session.client(name, region_name=region, config=config,
                                              endpoint_url=endpoint_url)
                         for name in ("ecs", "ec2", "logs")}

    def _error(self, service: str, method: str, error: Exception) -> AWSRequestError:
        operation = self._clients[service].meta.method_to_api_mapping.get(method, method)
        if isinstance(error, ClientError):
            details = error.response.get("Error", {})
            attempts = error.response.get("ResponseMetadata", {}).get("RetryAttempts")
            return AWSRequestError(service, operation, details.get("Code", "Unknown"),
                                   details.get("Message", str(error)), self.region,
                                   None if attempts is None else attempts + 1)
        return AWSRequestError(service, operation, type(error).__name__, str(error),
                               self.region)

    def call(self, service: str, method: str, **arguments: Any) -> dict[str, Any]:
        """Call ``client.method(**arguments)`` of ``service`` ("ecs", "ec2" or "logs")."""
        try:
            return getattr(self._clients[service], method)(**arguments)
        except (ClientError, BotoCoreError) as error:
            raise self._error(service, method, error) from error

    def pages(self, service: str, method: str, **arguments: Any) -> Iterator[dict[str, Any]]:
        """The pages of a paginated call."""
        paginator = self._clients[service].get_paginator(method)
        try:
            yield from paginator.paginate(**arguments)
        except (ClientError, BotoCoreError) as error:
            raise self._error(service, method, error) from error


# ---------------------------------------------------------------------------------------------
# what a run created, and how to remove it
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# one run: creates the AWS resources, starts and stops worker tasks
# ---------------------------------------------------------------------------------------------
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
        #: Worker tasks started and not yet seen STOPPED, by task ARN.
        self.watched_workers: dict[str, ECSWorkerTask] = {}
        self._command_prefix, self._environment = _shell_prefix(credentials, options.prologue)
        self._environment.update(options.env)

    # worker task contents ----------------------------------------------------------------
    def worker_command(self, scheduler_address: str, worker_name: str) -> list[str]:
        """The container command of one worker."""
        options = self.options
        return [*self._command_prefix, *options.worker_command, scheduler_address,
                "--name", worker_name, "--nthreads", str(options.nthreads),
                "--memory-limit", options.worker_memory_limit,
                "--death-timeout", str(options.worker_death_timeout), "--no-dashboard"]

    def container_overrides(self, scheduler_address: str, worker_name: str) -> dict[str, Any]:
        """The ``overrides`` of one worker task: its command and environment."""
        environment = [{"name": name, "value": value}
                       for name, value in self._environment.items()]
        return {"containerOverrides": [{
            "name": CONTAINER_NAME,
            "command": self.worker_command(scheduler_address, worker_name),
            "environment": environment,
        }]}

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
        self._register_task_definition()

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

    def _container_definition(self) -> dict[str, Any]:
        options = self.options
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
        return container

    def _register_task_definition(self) -> None:
        options = self.options
        arguments: dict[str, Any] = {
            "family": f"{options.resource_name}-worker",
            "containerDefinitions": [self._container_definition()],
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
        self.task_definition_arn = definition["taskDefinition"]["taskDefinitionArn"]
        self.resources.task_definition_arns.append(self.task_definition_arn)

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

    def run_worker(self, scheduler_address: str, worker_name: str) -> dict[str, Any]:
        """Start one worker task; return its description.

        Raises
        ------
        JobSubmissionError
            If ECS could not place or start the task.

        """
        response = self.aws.call(
            "ecs", "run_task", cluster=self.resources.cluster_arn,
            taskDefinition=self.task_definition_arn, count=1,
            startedBy=self.options.run_name[:128],
            overrides=self.container_overrides(scheduler_address, worker_name),
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


# ---------------------------------------------------------------------------------------------
# the dask cluster
# ---------------------------------------------------------------------------------------------
class ECSWorkerTask(ProcessInterface):
    """One dask worker running as one ECS task (an entry of the cluster's worker spec).

    Parameters
    ----------
    scheduler : str
        Address of the scheduler.
    name : str
        Name of the dask worker.
    run : ECSRun
        The run that owns the task.

    """

    def __init__(self, scheduler: str, name: str, run: ECSRun):
        super().__init__(scheduler=scheduler, name=name)
        self.scheduler_address = scheduler
        self.name = name
        self.run = run
        self.task_arn: str | None = None
        self.stop_requested = False

    async def start(self) -> None:
        """Run the task; return as soon as ECS accepted it."""
        try:
            task = await asyncio.to_thread(self.run.run_worker, self.scheduler_address,
                                           self.name)
        except BaseException:
            self.status = Status.failed
            raise
        self.task_arn = task["taskArn"]
        self.run.watched_workers[self.task_arn] = self
        await super().start()

    async def close(self) -> None:
        """Stop the task."""
        if self.task_arn is not None and not self.stop_requested:
            self.stop_requested = True
            try:
                await asyncio.to_thread(self.run.stop_worker, self.task_arn)
            except AWSRequestError as error:
                logger.warning("ECS: could not stop worker %s: %s", self.name, error)
        await super().close()

    def __repr__(self) -> str:
        return f"<ECSWorkerTask {self.name}: {self.task_arn}, status={self.status.name}>"


class ECSCluster(SpecCluster):
    """A dask cluster whose workers are AWS ECS tasks (Fargate, private EC2, or existing).

    Parameters
    ----------
    container_image : str
        Image of the worker containers; it needs ``python`` with ``distributed`` (and the
        packages your functions use) and ``/bin/sh``.
    region : str, optional
        AWS region; default: the one boto3 finds (``AWS_DEFAULT_REGION``, config files).
    launch_type : {"FARGATE", "EC2"}
        Where tasks run. ``"EC2"`` without ``cluster`` creates a private cluster.
    cluster : str, optional
        Name or ARN of an existing ECS cluster. None: create one for the run.
    cpu : int or str
        Fargate: task CPU units (256 ... 16384) or ``"1 vCPU"``; default 1024.
        EC2: CPU units reserved per worker container (optional).
    memory : int or str
        Fargate: task memory (MiB, or ``"4GB"``), allowed with ``cpu`` by Fargate's table;
        default 4096. EC2: hard memory limit per container (optional).
    cpu_architecture : {"X86_64", "ARM64"}
    subnet : str
        Subnet id of the tasks (Fargate, ``awsvpc``) or of the instances (private cluster).
    security_groups : sequence of str
        Security group ids; they must let workers reach the scheduler's port and each other.
    task_role_arn : str, optional
        Role the worker code runs as (e.g. to read S3).
    execution_role_arn : str, optional
        Role ECS uses to pull the image and write logs; required for ECR images and logging.
    fargate_spot : bool
        Run Fargate tasks on Fargate Spot (the cluster needs the FARGATE_SPOT provider; a
        cluster created here has it).
    assign_public_ip : bool
        Give Fargate tasks a public IP (needed in a public subnet without NAT to pull images).
    num_instances, ami, instance_type, instance_profile_arn : optional
        The EC2 instances of a private cluster; ``ami`` must be ECS-optimized and the instance
        profile's role must have ``AmazonEC2ContainerServiceforEC2Role``.
    memory_reservation : int or str
        EC2: memory (MiB) reserved per worker container, for placement; default 1024.
    network_mode : {"host", "awsvpc"}, optional
        EC2 tasks' network mode (default ``"host"``); Fargate always uses ``"awsvpc"``.
    worker_command : sequence of str, optional
        Command that starts a dask worker in the image; default ``["dask", "worker"]``, or
        ``[python, "-m", "distributed.cli.dask_worker"]`` when ``python`` is given.
    python : str, optional
        Python interpreter inside the image.
    nthreads : int, optional
        Threads per worker; default: one per vCPU.
    env : mapping, optional
        Environment of the workers (passed in the task overrides).
    prologue : sequence of str
        Shell lines run (by ``/bin/sh``) before the worker starts.
    log_group : None, True or str
        None: no logs. True: a CloudWatch log group for this run, deleted at shutdown unless a
        worker failed. A name: an existing log group. One log stream per worker task.
    tags : mapping, optional
        Tags added to everything created (besides the run's ``futures_hpc:*`` tags).
    max_resubmissions : int
        How many worker tasks may fail (and be replaced) before :class:`JobFailedError`.
    n_workers : int
        Workers to start at once.
    scheduler_host : str, optional
        Address the scheduler listens on, which workers must reach; default: this machine's
        outgoing IP address.
    scheduler_port : int
        Default 0 (any free port).
    dashboard_address : str, optional
        Default ``"localhost:8787"`` (another port if taken); None for no dashboard.
    security : bool or RunCredentials
        True (default): TLS with fresh credentials; a :class:`RunCredentials`: TLS with those;
        False: plain TCP, anyone who reaches the port can use the cluster.
    worker_death_timeout : float
        Seconds a worker waits for a lost scheduler before exiting (so a crashed client does
        not leave tasks running).
    poll_interval : float
        Seconds between two checks of the worker tasks' states.
    instance_wait_timeout, task_stop_timeout : float
        Seconds to wait for instances to join, and for tasks to stop before deleting a cluster.
    endpoint_url : str, optional
        Endpoint of the AWS APIs (an emulator, or VPC endpoints).
    aws_max_attempts : int
        Attempts per AWS call in botocore's standard retry mode (throttling, transient errors).
    run_name : str, optional
        Stem of every name created; unique by default.
    clean_stale_on_start : bool
        Remove what crashed runs of this machine left behind (see :meth:`cleanup_stale`).
    boto3_session : boto3.Session, optional
        Session supplying credentials (and the default region).
    asynchronous, loop, name
        As for :class:`distributed.deploy.SpecCluster`.

    Attributes
    ----------
    failures : list of TaskFailure
        Every worker task that stopped without being asked to.
    job_failure : JobFailedError or None
        Set when failures exceeded ``max_resubmissions``; :meth:`scale` then raises it.
    failure_callbacks : list of callable
        Called with :attr:`job_failure` (in the event loop's thread) once no worker is left.

    """

    #: Option names ``ECSCluster`` accepts (besides the dask ones), for the executor.
    option_names: ClassVar[frozenset[str]] = frozenset({
        "container_image", "region", "launch_type", "cluster", "cpu", "memory",
        "cpu_architecture", "subnet", "security_groups", "task_role_arn", "execution_role_arn",
        "fargate_spot", "assign_public_ip", "num_instances", "ami", "instance_type",
        "instance_profile_arn", "memory_reservation", "network_mode", "worker_command",
        "python", "nthreads", "env", "prologue", "log_group", "tags", "max_resubmissions",
        "scheduler_host", "scheduler_port", "dashboard_address", "worker_death_timeout",
        "poll_interval", "instance_wait_timeout", "task_stop_timeout", "endpoint_url",
        "aws_max_attempts", "run_name", "clean_stale_on_start", "boto3_session",
    })

    def __init__(
        self,
        container_image: str | None = None,
        *,
        region: str | None = None,
        launch_type: str = "FARGATE",
        cluster: str | None = None,
        cpu: int | str | None = None,
        memory: int | str | None = None,
        cpu_architecture: str = "X86_64",
        subnet: str | None = None,
        security_groups: Sequence[str] = (),
        task_role_arn: str | None = None,
        execution_role_arn: str | None = None,
        fargate_spot: bool = False,
        assign_public_ip: bool = False,
        num_instances: int | None = None,
        ami: str | None = None,
        instance_type: str | None = None,
        instance_profile_arn: str | None = None,
        memory_reservation: int | str = 1024,
        network_mode: str | None = None,
        worker_command: Sequence[str] | None = None,
        python: str | None = None,
        nthreads: int | None = None,
        env: Mapping[str, str] | None = None,
        prologue: Sequence[str] = (),
        log_group: bool | str | None = None,
        tags: Mapping[str, str] | None = None,
        max_resubmissions: int = 3,
        n_workers: int = 0,
        scheduler_host: str | None = None,
        scheduler_port: int = 0,
        dashboard_address: str | None = "localhost:8787",
        security: bool | RunCredentials = True,
        worker_death_timeout: float = 60,
        poll_interval: float = 5.0,
        instance_wait_timeout: float = 300,
        task_stop_timeout: float = 120,
        endpoint_url: str | None = None,
        aws_max_attempts: int = 10,
        run_name: str | None = None,
        clean_stale_on_start: bool = True,
        boto3_session: Any = None,
        asynchronous: bool = False,
        loop: Any = None,
        name: str | None = None,
    ):
        arguments = {key: value for key, value in locals().items() if key in _OPTION_ARGUMENTS}
        self.options = ECSOptions.from_arguments(**arguments)
        self.run_name = self.options.run_name
        self._clean_stale_on_start = clean_stale_on_start
        self._tls_directory: str | None = None
        credentials = self._resolve_credentials(security)
        self._aws = _AWSClients(self.options.region, self.options.endpoint_url,
                                self.options.aws_max_attempts, boto3_session)
        self._run = ECSRun(self.options, credentials, self._aws)
        try:
            self._run.check_overrides_size()
        except OptionError:
            self._remove_tls_directory()
            raise
        self._finalizer = weakref.finalize(self, _delete_quietly, self._aws,
                                           self._run.resources, self.options.task_stop_timeout)
        self.failures: list[TaskFailure] = []
        self.job_failure: JobFailedError | None = None
        self.failure_callbacks: list[Callable[[JobFailedError], Any]] = []
        self._failure_reported = False
        self._watcher: PeriodicCallback | None = None
        self._checking_tasks = False
        host = scheduler_host or _outgoing_ip_address()
        scheduler_spec = {"cls": Scheduler, "options": {
            "host": host, "port": scheduler_port, "dashboard_address": dashboard_address,
            "dashboard": dashboard_address is not None,
            "protocol": "tls" if credentials else "tcp",
            "security": credentials.security if credentials else None}}
        worker_spec = {"cls": ECSWorkerTask, "options": {"run": self._run}}
        workers = {self._new_worker_name(number): worker_spec for number in range(n_workers)}
        try:
            super().__init__(workers=workers, scheduler=scheduler_spec, worker=worker_spec,
                             security=credentials.security if credentials else Security(),
                             asynchronous=asynchronous, loop=loop, name=name)
        except BaseException:
            self.delete_resources()
            with contextlib.suppress(Exception):
                self._loop_runner.stop()
            raise

    @classmethod
    def check_options(cls, **options: Any) -> ECSOptions:
        """Validate :class:`ECSCluster` keyword arguments without creating anything.

        Raises
        ------
        OptionError
            Naming the option, the value given and what is allowed.

        """
        bound = inspect.signature(cls.__init__).bind_partial(None, **options)
        bound.apply_defaults()
        return ECSOptions.from_arguments(**{key: value for key, value in bound.arguments.items()
                                            if key in _OPTION_ARGUMENTS})

    # helpers from the bare essentials (RIOS's makeExtraParams_*) ---------------------------
    @classmethod
    def fargate(cls, container_image: str, subnet: str, **options: Any) -> ECSCluster:
        """An ECSCluster on Fargate; see :func:`fargate_options` for the arguments."""
        return cls(**fargate_options(container_image, subnet, **options))

    @classmethod
    def private(cls, container_image: str, *, num_instances: int, ami: str, instance_type: str,
                instance_profile_arn: str, subnet: str, **options: Any) -> ECSCluster:
        """An ECSCluster on a private cluster of EC2 instances; see :func:`private_options`."""
        return cls(**private_options(container_image, num_instances=num_instances, ami=ami,
                                     instance_type=instance_type,
                                     instance_profile_arn=instance_profile_arn, subnet=subnet,
                                     **options))

    # life cycle ----------------------------------------------------------------------------
    def _resolve_credentials(self, security: bool | RunCredentials) -> RunCredentials | None:
        if isinstance(security, RunCredentials):
            return security
        if security is False:
            logger.warning("ECSCluster %s without TLS: whoever reaches the scheduler's port "
                           "can run code on it", self.run_name)
            return None
        if security is not True:
            raise _option_error("security", security, "True, False or a RunCredentials")
        self._tls_directory = tempfile.mkdtemp(prefix=f"{self.run_name}-tls-")
        return create_run_credentials(self._tls_directory)

    def _new_worker_name(self, worker_number: int) -> str:
        return f"{self.run_name}-{worker_number}"

    async def _start(self) -> None:
        if self.status == Status.created and self._run.task_definition_arn is None:
            try:
                await asyncio.to_thread(self._prepare_aws)
            except BaseException:
                await asyncio.to_thread(self.delete_resources)
                raise
        await super()._start()
        if self._watcher is None and self.status == Status.running:
            self._watcher = PeriodicCallback(self._check_tasks,
                                             self.options.poll_interval * 1000)
            self._watcher.start()

    def _prepare_aws(self) -> None:
        if self._clean_stale_on_start:
            try:
                _cleanup_stale(self._aws, None, None, self.options.task_stop_timeout)
            except AWSRequestError as error:
                logger.warning("ECS: could not look for stale resources: %s", error)
        self._run.prepare()

    async def _close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        try:
            await super()._close()
        finally:
            await asyncio.to_thread(self.delete_resources)
            self._finalizer.detach()

    def delete_resources(self) -> None:
        """Stop the worker tasks and delete everything the run created, now.

        :meth:`close` does this too; this works without the event loop (from a signal handler,
        say) and may be called any number of times. Until :meth:`close` has run, it runs once
        more at interpreter exit, for what an interrupted start may have created meanwhile.
        """
        self._run.resources.delete(self._aws, self.options.task_stop_timeout)
        self._remove_tls_directory()

    def _remove_tls_directory(self) -> None:
        if self._tls_directory is not None:
            shutil.rmtree(self._tls_directory, ignore_errors=True)
            self._tls_directory = None

    @property
    def created_resources(self) -> RunResources:
        """What the run created in AWS and has not deleted yet."""
        return self._run.resources

    def request_workers(self, n: int) -> None:
        """Scale to ``n`` workers and wait until ECS accepted their tasks.

        Unlike :meth:`scale`, which returns at once and only logs what goes wrong later, this
        raises if ECS refuses to start a task.

        Raises
        ------
        AWSRequestError
            If a ``RunTask`` call failed (access denied, throttling, ...).
        JobSubmissionError
            If ECS placed no task.

        """
        self.sync(self._request_workers, n)

    async def _request_workers(self, n: int) -> None:
        if self.job_failure is not None:
            raise self.job_failure
        while len(self.worker_spec) < n:
            self.worker_spec.update(self.new_worker_spec())
        await self._correct_state_internal()

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Ask for ``n`` workers (see :meth:`SpecCluster.scale`).

        Raises
        ------
        JobFailedError
            If worker tasks failed more than ``max_resubmissions`` times.

        """
        if self.job_failure is not None and n > 0:
            raise self.job_failure
        return super().scale(n, memory=memory, cores=cores)

    async def _correct_state_internal(self) -> None:
        try:
            await super()._correct_state_internal()
        except JobSubmissionError as error:
            await self._forget_failed_starts(error)
            raise

    async def _forget_failed_starts(self, error: JobSubmissionError) -> None:
        """Drop workers whose task never started, and stop asking for them."""
        async with self._lock:
            for worker_name, worker in list(self.workers.items()):
                if worker.status == Status.failed:
                    del self.workers[worker_name]
                    self.worker_spec.pop(worker_name, None)
        if isinstance(error, AWSRequestError) and error.is_throttling:
            logger.warning("ECS run %s: %s; fewer workers for now", self.run_name, error)
            return
        if self.job_failure is None:
            self.job_failure = JobFailedError(f"ECS run {self.run_name}: {error}")
        self._report_if_hopeless()

    def _report_if_hopeless(self) -> None:
        """Tell the failure callbacks once the run has failed and no worker is left."""
        if self.job_failure is None or self.worker_spec or self._failure_reported:
            return
        self._failure_reported = True
        for callback in list(self.failure_callbacks):
            try:
                callback(self.job_failure)
            except Exception:
                logger.exception("ECS: a failure callback raised")

    # failed tasks -------------------------------------------------------------------------
    async def _check_tasks(self) -> None:
        if self._checking_tasks or self.status != Status.running:
            return
        self._checking_tasks = True
        try:
            await self._check_tasks_once()
        except AWSRequestError as error:
            logger.warning("ECS: could not check worker tasks: %s", error)
        finally:
            self._checking_tasks = False

    async def _check_tasks_once(self) -> None:
        watched = dict(self._run.watched_workers)
        if not watched:
            return
        described = await asyncio.to_thread(self._run.describe_tasks, list(watched))
        for task_arn, worker in watched.items():
            task = described.get(task_arn)
            if task is None or task["lastStatus"] != "STOPPED":
                continue
            self._run.watched_workers.pop(task_arn, None)
            with contextlib.suppress(ValueError):
                self._run.resources.task_arns.remove(task_arn)
            if self._stop_was_expected(worker, task):
                continue
            log_tail = await asyncio.to_thread(self._run.log_tail, task_arn)
            await self._replace_failed(worker, _failure_from_task(worker.name, task, log_tail))

    def _stop_was_expected(self, worker: ECSWorkerTask, task: Mapping[str, Any]) -> bool:
        if task.get("stoppedReason") == STOP_REASON or self.status != Status.running:
            return True
        exit_code = _failure_from_task(worker.name, task).exit_code
        return worker.name not in self.worker_spec and exit_code == 0  # retired by dask

    async def _replace_failed(self, worker: ECSWorkerTask, failure: TaskFailure) -> None:
        """Record a failed task and start another worker in its place, within the limit."""
        self.failures.append(failure)
        self._run.resources.keep_log_group = True
        worker.stop_requested = True
        worker.status = Status.closed
        logger.warning("ECS run %s: %s", self.run_name, failure.describe())
        async with self._lock:
            if self.workers.get(worker.name) is worker:
                del self.workers[worker.name]
            wanted = self.worker_spec.pop(worker.name, None) is not None
            if self.job_failure is None and wanted:
                if len(self.failures) <= self.options.max_resubmissions:
                    self.worker_spec.update(self.new_worker_spec())
                else:
                    self.job_failure = self._job_failed_error()
                    logger.error("%s", self.job_failure)
        self._report_if_hopeless()
        self._correct_state()

    def _job_failed_error(self) -> JobFailedError:
        details = "\n".join(f"  - {failure.describe()}" for failure in self.failures)
        error = JobFailedError(
            f"ECS run {self.run_name}: {len(self.failures)} worker tasks stopped with errors, "
            f"more than max_resubmissions={self.options.max_resubmissions} allows:\n{details}"
        )
        error.failures = list(self.failures)
        return error

    # stale resources ----------------------------------------------------------------------
    @classmethod
    def cleanup_stale(
        cls,
        region: str | None = None,
        *,
        run_name: str | None = None,
        older_than: float | datetime.timedelta | None = None,
        endpoint_url: str | None = None,
        boto3_session: Any = None,
        task_stop_timeout: float = 120,
    ) -> list[str]:
        """Remove what crashed runs left in AWS, found by their ``futures_hpc:*`` tags.

        A run is stale if it is ``run_name``; else if it was started on this machine by a
        process that no longer exists; else if it started more than ``older_than`` ago (only
        when ``older_than`` is given: runs of other machines cannot be checked otherwise).

        Parameters
        ----------
        region : str, optional
            Default: boto3's.
        run_name : str, optional
            Remove this run only, whatever its state.
        older_than : float or datetime.timedelta, optional
            Age (seconds) beyond which any run is stale.
        endpoint_url, boto3_session, task_stop_timeout
            As for :class:`ECSCluster`.

        Returns
        -------
        list of str
            What was removed.

        """
        _require_boto3()
        aws = _AWSClients(_resolve_region(region, boto3_session), endpoint_url, 10,
                          boto3_session)
        if isinstance(older_than, (int, float)):
            older_than = datetime.timedelta(seconds=older_than)
        return _cleanup_stale(aws, run_name and _sanitize_name(run_name), older_than,
                              task_stop_timeout)


_OPTION_ARGUMENTS = ECSCluster.option_names - {
    "scheduler_host", "scheduler_port", "dashboard_address", "clean_stale_on_start"}


def _outgoing_ip_address() -> str:
    """Return this machine's address on the network that leads out (to the ECS tasks)."""
    from distributed.utils import get_ip

    return get_ip()


# ---------------------------------------------------------------------------------------------
# option sets from the bare essentials
# ---------------------------------------------------------------------------------------------
def fargate_options(container_image: str, subnet: str, *, security_groups: Sequence[str] = (),
                    execution_role_arn: str | None = None, task_role_arn: str | None = None,
                    cpu: int | str = 1024, memory: int | str = 4096,
                    cpu_architecture: str = "X86_64", spot: bool = False,
                    assign_public_ip: bool = False, log_group: bool | str | None = None,
                    **extra: Any) -> dict[str, Any]:
    """Options of an ECSCluster (or ``HPCExecutor("ecs", ...)``) running workers on Fargate.

    Parameters
    ----------
    container_image : str
        Image of the workers.
    subnet : str
        Subnet id of the tasks.
    security_groups : sequence of str
        Security group ids of the tasks.
    execution_role_arn : str, optional
        Role ECS uses to pull the image and write logs.
    task_role_arn : str, optional
        Role the worker code runs as.
    cpu : int or str
        Task CPU units or ``"N vCPU"``.
    memory : int or str
        Task memory (an int is MiB), allowed with ``cpu`` by Fargate.
    cpu_architecture : {"X86_64", "ARM64"}
        CPU architecture.
    assign_public_ip : bool
        Give tasks a public IP.
    log_group : None, True or str
        CloudWatch logging (see :class:`ECSCluster`).
    spot : bool
        Fargate Spot.
    **extra
        Any other :class:`ECSCluster` option.

    Returns
    -------
    dict

    """
    if isinstance(memory, int):  # with a unit, so that HPCExecutor does not read bytes
        memory = f"{memory}MiB"
    return {"container_image": container_image, "launch_type": "FARGATE", "subnet": subnet,
            "security_groups": tuple(security_groups), "execution_role_arn": execution_role_arn,
            "task_role_arn": task_role_arn, "cpu": cpu, "memory": memory,
            "cpu_architecture": cpu_architecture, "fargate_spot": spot,
            "assign_public_ip": assign_public_ip, "log_group": log_group, **extra}


def private_options(container_image: str, *, num_instances: int, ami: str, instance_type: str,
                    instance_profile_arn: str, subnet: str, security_groups: Sequence[str] = (),
                    memory_reservation: int | str = 1024, execution_role_arn: str | None = None,
                    task_role_arn: str | None = None, log_group: bool | str | None = None,
                    **extra: Any) -> dict[str, Any]:
    """Options of an ECSCluster (or ``HPCExecutor("ecs", ...)``) on a private EC2 cluster.

    The run creates an ECS cluster, launches ``num_instances`` instances of ``ami`` into it
    and places the worker tasks on them; all of it is deleted at shutdown.

    Parameters
    ----------
    container_image : str
        Image of the workers.
    num_instances : int
        EC2 instances of the cluster.
    ami : str
        An ECS-optimized AMI id.
    instance_type : str
        EC2 instance type.
    instance_profile_arn : str
        Instance profile whose role has ``AmazonEC2ContainerServiceforEC2Role``.
    subnet : str
        Subnet id of the instances.
    security_groups : sequence of str
        Security group ids of the instances.
    memory_reservation : int or str
        Memory reserved per worker container.
    execution_role_arn : str, optional
        Role ECS uses to pull the image and write logs.
    task_role_arn : str, optional
        Role the worker code runs as.
    log_group : None, True or str
        CloudWatch logging (see :class:`ECSCluster`).
    **extra
        Any other :class:`ECSCluster` option.

    Returns
    -------
    dict

    """
    return {"container_image": container_image, "launch_type": "EC2", "cluster": None,
            "num_instances": num_instances, "ami": ami, "instance_type": instance_type,
            "instance_profile_arn": instance_profile_arn, "subnet": subnet,
            "security_groups": tuple(security_groups), "memory_reservation": memory_reservation,
            "execution_role_arn": execution_role_arn, "task_role_arn": task_role_arn,
            "log_group": log_group, **extra}


# ---------------------------------------------------------------------------------------------
# the executor
# ---------------------------------------------------------------------------------------------
#: Common options that mean nothing to an ECS task; accepted (a profile may set them) and logged.
_IGNORED_COMMON_OPTIONS = ("walltime", "queue", "account", "processes", "job_extra")


def _memory_option(resources: Any) -> int:
    """MiB for the common ``memory`` option (``"8GB"`` means 8192 MiB, as in ECS)."""
    try:
        return _parse_memory_mib("memory", resources.memory)
    except OptionError:
        return -(-resources.memory_bytes // 2**20)


class ECSExecutor(HPCExecutor):
    """Executor whose workers are AWS ECS tasks: on Fargate, a private EC2 cluster, or yours.

    Every option of :class:`ECSCluster` is accepted. The common options map onto it:
    ``cores`` sets the threads per worker and its CPU (1024 units per core), ``memory`` the
    task memory (Fargate; ``"8GB"`` is 8192 MiB) or the container's memory limit (EC2),
    ``env`` the workers' environment, ``python`` the interpreter in the image, ``prologue``
    shell lines run before the worker. ``walltime``, ``queue``, ``account``, ``processes`` and
    ``job_extra`` mean nothing on ECS and are ignored. ``max_workers`` (default 1) is the
    number of worker tasks, or the adaptive maximum with ``adaptive=True``. A worker task
    that stops on its own is replaced up to ``max_resubmissions`` times (default 3); beyond
    that, once no worker is left, the outstanding futures fail with
    :class:`~futures_hpc.errors.JobFailedError`.

    Examples
    --------
    >>> from futures_hpc.backends.ecs import ECSExecutor, fargate_options
    >>> with ECSExecutor(max_workers=4, cores=1, memory="4GB", **fargate_options(
    ...         "123456789012.dkr.ecr.eu-west-1.amazonaws.com/work:1", "subnet-0abc",
    ...         security_groups=["sg-0abc"],
    ...         execution_role_arn="arn:aws:iam::123456789012:role/ecsTaskExecutionRole",
    ...         region="eu-west-1")) as ex:   # doctest: +SKIP
    ...     results = list(ex.map(process, items))

    """

    backend_name = "ecs"
    backend_option_names = ECSCluster.option_names - {
        "env", "python", "prologue", "memory", "nthreads", "max_resubmissions", "run_name",
        "dashboard_address"}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why ECS cannot be used here (boto3 missing), or return None."""
        if boto3 is None:
            return "boto3 is not installed: pip install 'futures_hpc[ecs]'"
        return None

    def _cluster_arguments(self) -> dict[str, Any]:
        resources = self.resources
        arguments = dict(self.backend_options)
        fargate = str(arguments.get("launch_type", "FARGATE")).upper() == "FARGATE"
        if resources.cores:
            arguments["nthreads"] = resources.cores
            if arguments.get("cpu") is None:
                cpu = resources.cores * 1024
                if fargate and cpu not in FARGATE_MEMORY_BY_CPU:
                    raise _option_error("cores", resources.cores, "Fargate tasks have 1, 2, 4, 8 "
                                        "or 16 vCPUs (or give cpu= in CPU units: 256, 512)")
                arguments["cpu"] = cpu
        if resources.memory:
            arguments["memory"] = _memory_option(resources)
        for name in ("env", "python", "prologue"):
            if getattr(resources, name):
                arguments[name] = getattr(resources, name)
        arguments["max_resubmissions"] = self.executor_options.get("max_resubmissions", 3)
        arguments["run_name"] = self.run_name
        return arguments

    def _validate_options(self) -> None:
        ECSCluster.check_options(**self._cluster_arguments())

    def _create_cluster(self) -> ECSCluster:
        if self.security is not None and self.credentials is None:
            raise OptionError("the ecs backend needs security=True (credentials it creates and "
                              "sends to the tasks) or security=False, not a Security object")
        ignored = sorted(set(self.resources.given()) & set(_IGNORED_COMMON_OPTIONS))
        if ignored:
            logger.info("the ecs backend ignores the options %s", ", ".join(ignored))
        cleanup.register(self)
        cluster = ECSCluster(**self._cluster_arguments(),
                             security=self.credentials if self.credentials else False,
                             dashboard_address=self.dashboard_address)
        cluster.failure_callbacks.append(self._fail_outstanding)
        return cluster

    def cancel_jobs_now(self) -> None:
        """Stop every worker task and delete what the run created, without the event loop.

        Used by the SIGTERM handler of :mod:`futures_hpc.cleanup`, and after closing as a
        safety net.
        """
        if isinstance(self._cluster, ECSCluster):
            self._cluster.delete_resources()

    def _close_cluster(self) -> None:
        try:
            super()._close_cluster()
        finally:
            self.cancel_jobs_now()
            cleanup.unregister(self)

    def _start_workers(self) -> None:
        if self.executor_options.get("adaptive"):
            self.cluster.adapt(minimum=self.executor_options.get("min_workers") or 0,
                               maximum=self.max_workers or 1)
        else:
            self.cluster.request_workers(self.max_workers or 1)

    def _fail_outstanding(self, error: JobFailedError) -> None:
        """Fail every outstanding future with the run's error: no worker is left to run it."""
        bridge = self._bridge
        if bridge is None:
            return
        for future in bridge.outstanding():
            if not future.done():
                with contextlib.suppress(Exception):  # completed by another thread meanwhile
                    future.set_exception(error)


# ---------------------------------------------------------------------------------------------
# finding stale runs
# ---------------------------------------------------------------------------------------------
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
