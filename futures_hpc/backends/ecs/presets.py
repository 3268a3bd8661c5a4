"""Option sets of :class:`ECSCluster` built from the bare essentials (Fargate, private EC2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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
