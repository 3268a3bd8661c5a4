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

The package's modules, one job each:

* :mod:`~futures_hpc.backends.ecs.constants`: names, tags and limits they share;
* :mod:`~futures_hpc.backends.ecs.aws`: boto3 clients, :class:`AWSRequestError`;
* :mod:`~futures_hpc.backends.ecs.options`: :class:`ECSOptions`, option validation;
* :mod:`~futures_hpc.backends.ecs.presets`: :func:`fargate_options`, :func:`private_options`;
* :mod:`~futures_hpc.backends.ecs.resources`: :class:`RunResources`, what a run created;
* :mod:`~futures_hpc.backends.ecs.stale`: finding and removing what crashed runs left;
* :mod:`~futures_hpc.backends.ecs.run`: :class:`ECSRun`, worker tasks, :class:`TaskFailure`;
* :mod:`~futures_hpc.backends.ecs.worker`: :class:`ECSWorkerTask`, one worker as one task;
* :mod:`~futures_hpc.backends.ecs.cluster`: :class:`ECSCluster`, the dask cluster;
* :mod:`~futures_hpc.backends.ecs.executor`: :class:`ECSExecutor`.
"""

from __future__ import annotations

from .aws import AWSRequestError
from .cluster import ECSCluster
from .constants import (
    CONTAINER_NAME,
    LOG_GROUP_PREFIX,
    NAME_PREFIX,
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
    USER_AGENT,
)
from .executor import ECSExecutor
from .options import FARGATE_MEMORY_BY_CPU, ECSOptions, check_fargate_size
from .presets import fargate_options, private_options
from .resources import RunResources
from .run import ECSRun, TaskFailure
from .stale import _is_stale as _is_stale
from .worker import ECSWorkerTask

__all__ = [
    "AWSRequestError",
    "CONTAINER_NAME",
    "ECSCluster",
    "ECSExecutor",
    "ECSOptions",
    "ECSRun",
    "ECSWorkerTask",
    "FARGATE_MEMORY_BY_CPU",
    "LOG_GROUP_PREFIX",
    "NAME_PREFIX",
    "OVERRIDES_LIMIT",
    "RunResources",
    "STOP_REASON",
    "TAG_CREATED",
    "TAG_CREATOR",
    "TAG_HOST",
    "TAG_PID",
    "TAG_RUN",
    "TAG_WORKER",
    "TLS_CERTIFICATE_VARIABLE",
    "TLS_KEY_VARIABLE",
    "TaskFailure",
    "USER_AGENT",
    "check_fargate_size",
    "fargate_options",
    "private_options",
]
