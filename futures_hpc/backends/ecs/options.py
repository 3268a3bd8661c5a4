"""Validation of the ECS backend's options, without any AWS call: :class:`ECSOptions`."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from futures_hpc.errors import OptionError

from .aws import _require_boto3, boto3
from .constants import LOG_GROUP_PREFIX, NAME_PREFIX

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
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
_PROFILE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:instance-profile/[\w+=,.@/-]+$")
_CLUSTER_ARN = re.compile(r"^arn:aws[a-z-]*:ecs:[a-z0-9-]+:\d{12}:cluster/[\w-]{1,255}$")


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
