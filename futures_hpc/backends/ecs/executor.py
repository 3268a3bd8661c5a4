"""The executor of the ECS backend: :class:`ECSExecutor`, ``HPCExecutor("ecs", ...)``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

from futures_hpc.errors import JobFailedError, OptionError
from futures_hpc.executor import HPCExecutor
from futures_hpc.pool_shape import PoolShape
from futures_hpc.pools import ResourcePool
from futures_hpc.provider import BackendProvider
from futures_hpc.scaling import (
    FairShareAdaptive,
    ScalingOptions,
    ScalingStatus,
    describe_idle_timeout,
    validate_scaling_options,
)
from futures_hpc.store.segments import is_url, normalized_location

from .aws import boto3
from .cluster import ECSCluster
from .options import (
    FARGATE_MEMORY_BY_CPU,
    ECSOptions,
    _option_error,
    _parse_memory_mib,
    check_fargate_size,
)
from .run import TaskFailure, WorkerShape

logger = logging.getLogger("futures_hpc")


def _memory_option(resources: Any) -> int:
    """MiB for the common ``memory`` option (``"8GB"`` means 8192 MiB, as in ECS)."""
    try:
        return _parse_memory_mib("memory", resources.memory)
    except OptionError:
        return -(-resources.memory_bytes // 2**20)


class ECSProvider(BackendProvider):
    """Worker tasks on AWS ECS (see :class:`ECSExecutor`)."""

    name = "ecs"
    scales_jobs = True
    option_names = ECSCluster.option_names - {
        "env", "python", "prologue", "memory", "nthreads", "max_resubmissions", "run_name",
        "dashboard_address"}

    def __init__(self, executor: Any) -> None:
        super().__init__(executor)
        self._adaptive: FairShareAdaptive | None = None
        self.scaling: ScalingOptions = ScalingOptions()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why ECS cannot be used here (boto3 missing), or return None."""
        if boto3 is None:
            return "boto3 is not installed: pip install 'futures_hpc[ecs]'"
        return None

    def _cluster_arguments(self) -> dict[str, Any]:
        resources = self.executor.resources
        arguments = dict(self.executor.backend_options)
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
        arguments["max_resubmissions"] = self.executor.executor_options.get("max_resubmissions", 3)
        if arguments["max_resubmissions"] is None:
            arguments["max_resubmissions"] = 3
        arguments["run_name"] = self.executor.run_name
        return arguments

    def check_options(self) -> None:
        """Check the ECS options; ECS runs a fixed number of tasks unless ``adaptive=True``.

        A ``store`` must be an ``fsspec`` URL (``s3://bucket/prefix``): the workers run in
        containers elsewhere and would record their results in their own filesystems.
        """
        store = self.executor.executor_options.get("store")
        if store is not None and not is_url(normalized_location(store)):
            raise OptionError(
                f"store={store!r} is not allowed on the 'ecs' backend: its workers run in "
                "containers that cannot write this machine's directories; give an fsspec URL "
                "both reach, such as 's3://bucket/prefix' (pip install 'futures_hpc[s3]')")
        options = dict(self.executor.executor_options)
        if options.get("adaptive") is None:
            options["adaptive"] = False  # ECS: a fixed number of tasks unless asked
        self.scaling = validate_scaling_options(options, self.executor.max_workers or 1)
        ECSCluster.check_options(**self._cluster_arguments())

    def create_cluster(self) -> ECSCluster:
        """Create the run's AWS resources and start the scheduler here."""
        if self.executor.security is not None and self.executor.credentials is None:
            raise OptionError("the ecs backend needs security=True (credentials it creates and "
                              "sends to the tasks) or security=False, not a Security object")
        credentials = self.executor.credentials
        cluster = ECSCluster(**self._cluster_arguments(),
                             security=credentials if credentials else False,
                             dashboard_address=self.executor.dashboard_address)
        cluster.failure_callbacks.append(self._fail_outstanding)
        cluster.pool_failure_callbacks.append(self._pool_worker_failed)
        return cluster

    def _pool_worker_failed(self, worker_name: str, failure: TaskFailure) -> None:
        """Count a pool's failed task for that pool alone; beyond ``max_resubmissions`` fail it.

        The executor and its other pools go on; below the limit the pool's policy asks for
        another task.
        """
        pools = self.executor._pools
        pool = None if pools is None else pools.owner_of(worker_name)
        if pool is None:
            return
        if pool.adaptive is not None:
            self.executor.cluster.loop.add_callback(pool.adaptive.forget_job, worker_name)
        pool.count_job_failure(failure.describe(), self.scaling.max_resubmissions,
                               "worker tasks")

    def cancel_jobs_now(self) -> None:
        """Stop every worker task and delete what the run created, without the event loop.

        Used by the SIGTERM handler of :mod:`futures_hpc.cleanup`, and after closing as a
        safety net.
        """
        if isinstance(self.executor.cluster, ECSCluster):
            self.executor.cluster.delete_resources()

    def after_close(self) -> None:
        """Stop any task left and delete what the run created (a safety net)."""
        self.cancel_jobs_now()

    def start_workers(self) -> None:
        """Ask for the worker tasks: all at once, or through the fair-share policy."""
        if self.scaling.adaptive:
            self._adaptive = self.executor.cluster.adapt(
                Adaptive=FairShareAdaptive, minimum=self.scaling.min_workers,
                maximum=self.executor.max_workers or 1, idle_timeout=self.scaling.idle_timeout,
                max_pending_jobs=self.scaling.max_pending_jobs,
                client_waiting=self.executor._waiting_in_client)
            logger.info("%s: fair-share scaling, %d to %d worker task(s), at most %d pending, "
                        "idle timeout %s", self.executor.run_name, self.scaling.min_workers,
                        self.executor.max_workers or 1, self.scaling.max_pending_jobs,
                        describe_idle_timeout(self.scaling.idle_timeout))
        else:
            self.executor.cluster.request_workers(self.executor.max_workers or 1)

    # -- pools (ex.with_resources) ------------------------------------------------------------

    def _pool_options(self, shape: PoolShape) -> tuple[ECSOptions, int]:
        """The run's options with a pool's CPU, memory and threads; and its GPUs.

        Raises
        ------
        OptionError
            For a size Fargate does not offer, or GPUs on Fargate.

        """
        options: ECSOptions = self.executor.cluster.options
        fargate = options.fargate
        cpu = shape.cores * 1024
        if fargate and cpu not in FARGATE_MEMORY_BY_CPU:
            raise _option_error("cores", shape.cores, "Fargate tasks have 1, 2, 4, 8 or 16 "
                                "vCPUs (with_resources)")
        if shape.gpus and fargate:
            raise _option_error("gpus", shape.gpus, "Fargate tasks have no GPUs: use "
                                "launch_type='EC2' with GPU instances (with_resources)")
        if shape.memory:
            memory = _memory_option(shape)  # "4GB" is 4096 MiB, as in ECS
        elif fargate:
            allowed = FARGATE_MEMORY_BY_CPU[cpu]
            memory = options.memory if options.memory in allowed else allowed[0]
        else:
            memory = options.memory
        if fargate:
            check_fargate_size(cpu, memory)
        return dataclasses.replace(
            options, cpu=cpu, memory=memory, nthreads=shape.cores,
            worker_memory_limit=f"{memory}MiB" if memory else "auto",
        ), shape.gpus

    def check_pool(self, shape: PoolShape) -> None:
        """ECS pools are task sizes; walltimes, call times, queues and directives are ignored."""
        self._pool_options(shape)
        ignored = [f"{name}={getattr(shape, name)!r}"
                   for name in ("walltime", "call_time", "queue", "job_extra")
                   if getattr(shape, name)]
        if ignored:
            logger.info("with_resources on the 'ecs' backend ignores %s", ", ".join(ignored))

    def pool_job_prefix(self, number: int) -> str:
        """``<run name>-p<number>-``: the pool's tasks are the run's, told apart."""
        return f"{self.executor.cluster.run_name}-p{number}-"

    def pool_walltime(self, shape: PoolShape) -> tuple[str | None, int | None]:
        """ECS tasks have no walltime."""
        return None, None

    def pool_job(self, pool: ResourcePool, name: str) -> dict[str, Any]:
        """A worker task of the pool's size (its task definition registered on first use)."""
        key = f"p{pool.number}"
        cluster: ECSCluster = self.executor.cluster
        if key not in cluster.pool_shapes():
            options, gpus = self._pool_options(pool.shape)
            options = dataclasses.replace(options, env={**options.env, **pool.environment()})
            cluster.add_pool_shape(key, WorkerShape(options, pool.worker_resources(), gpus))
        return cluster.pool_worker_spec(key)

    def report_status(self, status: ScalingStatus) -> None:
        """Tasks replaced, task ARNs, and the fair-share policy's counts."""
        status.adaptive = self.scaling.adaptive
        cluster = self.executor.cluster if isinstance(self.executor.cluster, ECSCluster) else None
        if cluster is not None:
            status.resubmissions = min(len(cluster.failures), self.scaling.max_resubmissions)
            status.job_ids = list(cluster.created_resources.task_arns)
        if self._adaptive is not None:
            self._adaptive.report_into(status)

    def _fail_outstanding(self, error: JobFailedError) -> None:
        """Fail every outstanding future with the run's error: no worker is left to run it."""
        for future in self.executor._outstanding():
            if not future.done():
                with contextlib.suppress(Exception):  # completed by another thread meanwhile
                    future.set_exception(error)


class ECSExecutor(HPCExecutor):
    """Executor whose workers are AWS ECS tasks: on Fargate, a private EC2 cluster, or yours.

    Every option of :class:`ECSCluster` is accepted. The common options map onto it:
    ``cores`` sets the threads per worker and its CPU (1024 units per core), ``memory`` the
    task memory (Fargate; ``"8GB"`` is 8192 MiB) or the container's memory limit (EC2),
    ``env`` the workers' environment, ``python`` the interpreter in the image, ``prologue``
    shell lines run before the worker. ``walltime``, ``queue``, ``account``, ``processes`` and
    ``job_extra`` mean nothing on ECS and are ignored. ``max_workers`` (default 1) is the
    number of worker tasks, or the adaptive maximum with ``adaptive=True``, which sizes the
    cluster with the fair-share policy of :mod:`futures_hpc.scaling` as on the batch backends
    (``min_workers``, ``idle_timeout``, ``max_pending_jobs``: tasks not yet RUNNING). A worker task
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

    provider = ECSProvider
