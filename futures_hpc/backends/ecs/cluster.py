"""The dask cluster of the ECS backend: :class:`ECSCluster`, a ``SpecCluster`` of ECS tasks."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import logging
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from distributed.scheduler import Scheduler
from distributed.security import Security
from tornado.ioloop import PeriodicCallback

from futures_hpc.engine import ClusterHooks
from futures_hpc.errors import JobFailedError, JobSubmissionError, OptionError
from futures_hpc.scaling import FairShareAdaptive
from futures_hpc.security import RunCredentials, create_run_credentials

from .aws import AWSRequestError, _AWSClients, _require_boto3
from .constants import STOP_REASON
from .options import ECSOptions, _option_error, _resolve_region, _sanitize_name
from .presets import fargate_options, private_options
from .resources import RunResources, _delete_quietly
from .run import ECSRun, TaskFailure, WorkerShape, _failure_from_task
from .stale import _cleanup_stale
from .worker import ECSWorkerTask

logger = logging.getLogger("futures_hpc")


class ECSCluster(ClusterHooks, SpecCluster):
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
    pool_failure_callbacks : list of callable
        Called with the worker's name and its :class:`TaskFailure` (in a thread of their own)
        when a pool's worker task (``ex.with_resources``) stops without being asked to: its
        pool counts it and asks for another; it is not one of :attr:`failures`.

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
        self.pool_failure_callbacks: list[Callable[[str, TaskFailure], Any]] = []
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
        workers = {self.worker_name(number): worker_spec for number in range(n_workers)}
        try:
            super().__init__(workers=workers, scheduler=scheduler_spec, worker=worker_spec,
                             security=credentials.security if credentials else Security(),
                             asynchronous=asynchronous, loop=loop, name=name)
        except BaseException:
            self.delete_resources()
            with contextlib.suppress(Exception):
                self.stop_event_loop()
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

    def threads_of_each_worker(self) -> int:
        """Threads of each worker (for the fair-share policy's sizing)."""
        return self.options.nthreads

    def add_pool_shape(self, key: str, shape: WorkerShape) -> None:
        """Register the task definition of a pool's workers (an AWS call, once per pool)."""
        self._run.add_shape(key, shape)

    def pool_shapes(self) -> dict[str, WorkerShape]:
        """The pools' worker shapes registered so far, by key."""
        return self._run.shapes

    def pool_worker_spec(self, key: str) -> dict[str, Any]:
        """The ``worker_spec`` entry of one worker of the pool ``key``."""
        return {"cls": ECSWorkerTask, "options": {"run": self._run, "shape": key}}

    def worker_name(self, worker_number: int) -> str:
        """Worker tasks are named after the run: ``<run name>-<number>``."""
        return f"{self.run_name}-{worker_number}"

    async def start_cluster(self) -> None:
        """Prepare the AWS resources once, start the scheduler and the first worker tasks."""
        if self.status == Status.created and self._run.task_definition_arn is None:
            try:
                await asyncio.to_thread(self._prepare_aws)
            except BaseException:
                await asyncio.to_thread(self.delete_resources)
                raise
        await super().start_cluster()
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

    async def close_cluster(self) -> None:
        """Stop the worker tasks and the scheduler, then delete the run's AWS resources."""
        if self._watcher is not None:
            self._watcher.stop()
        try:
            await super().close_cluster()
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
        await self.correct_state()

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

    async def correct_state(self) -> None:
        """Start and stop worker tasks to match ``worker_spec``; forget tasks that never started."""
        try:
            await super().correct_state()
        except JobSubmissionError as error:
            await self._forget_failed_starts(error)
            raise

    async def _forget_failed_starts(self, error: JobSubmissionError) -> None:
        """Drop workers whose task never started, and stop asking for them."""
        async with self.spec_lock:
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
        self._run.resources.keep_log_group = True
        worker.stop_requested = True
        worker.status = Status.closed
        logger.warning("ECS run %s: %s", self.run_name, failure.describe())
        if worker.shape is not None:  # a pool's worker: the pool counts it, asks for another
            async with self.spec_lock:
                if self.workers.get(worker.name) is worker:
                    del self.workers[worker.name]
                self.worker_spec.pop(worker.name, None)
            for callback in list(self.pool_failure_callbacks):
                try:
                    await asyncio.to_thread(callback, worker.name, failure)
                except Exception:
                    logger.exception("ECS: a pool failure callback raised")
            self.request_correct_state()
            return
        self.failures.append(failure)
        async with self.spec_lock:
            if self.workers.get(worker.name) is worker:
                del self.workers[worker.name]
            wanted = self.worker_spec.pop(worker.name, None) is not None
            adaptive = self.adaptive_policy()
            if isinstance(adaptive, FairShareAdaptive):
                adaptive.forget_job(worker.name)
            if self.job_failure is None and wanted:
                if len(self.failures) <= self.options.max_resubmissions:
                    self.worker_spec.update(self.new_worker_spec())
                else:
                    self.job_failure = self._job_failed_error()
                    logger.error("%s", self.job_failure)
        self._report_if_hopeless()
        self.request_correct_state()

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
