"""The shared base of the batch executors (SLURM, PBS, Grid Engine) over dask-jobqueue.

Each batch system's module (``slurm.py``, ``pbs.py``, ``sge.py``) subclasses
:class:`JobQueueExecutor` with its ``SYSTEM``; together they add what dask-jobqueue leaves to
its users:

- every job script and worker log of a run goes to the run's own log directory, and the jobs are
  named after the run (``fhpc-xxxxxxxx``), so that cleanup touches only this executor's jobs;
- a rejected submission raises :class:`~futures_hpc.errors.JobSubmissionError` with the batch
  system's own message from the executor's constructor (dask-jobqueue only logs it);
- a watcher thread follows the jobs whose workers are not connected and, when the batch system
  says one has ended, logs the tail of its log; when no job is left to run calls, outstanding
  futures fail with :class:`~futures_hpc.errors.JobFailedError` instead of hanging;
- the same watcher reads why a waiting job has not started (SLURM's reason code, Grid Engine's
  scheduling info and verification, PBS's comment): a reason that can never clear, or a first
  worker later than ``start_timeout``, cancels the jobs and fails the calls with
  :class:`~futures_hpc.errors.JobSubmissionError` quoting the batch system; other reasons are
  logged when they change and shown by ``ex.status()``;
- closing cancels all jobs with one ``scancel``/``qdel`` command, also on KeyboardInterrupt, at
  interpreter exit and on SIGTERM (see :mod:`futures_hpc.cleanup`);
- TLS by default: the scheduler and the workers use the run's certificate, whose files are
  deleted when the executor closes;
- the scheduler and the workers listen on the interface the workers use, not on every
  interface (see :mod:`futures_hpc.backends.listen`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any, ClassVar

import dask.config

from ...cleanup import interrupt_handler_kept
from ...dask_settings import worker_environment as dask_worker_environment
from ...errors import BackendUnavailableError, JobFailedError, JobSubmissionError, OptionError
from ...executor import HPCExecutor
from ...import_path import pythonpath_value
from ...options import ResourceOptions, format_walltime, parse_walltime
from ...pool_shape import PoolShape
from ...pools import BASE_RESOURCE, ResourcePool
from ...provider import BackendProvider
from ...scaling import (
    MINIMUM_WALLTIME_MARGIN,
    FairShareAdaptive,
    ScalingStatus,
    describe_idle_timeout,
    validate_scaling_options,
)
from ..listen import plan_batch_listening
from .commands import SUBMISSION_TIMEOUT_SECONDS
from .jobs import JobBook, QueueState
from .system import BatchSystem
from .watcher import JobWatcher, JobWatching

if TYPE_CHECKING:
    from dask_jobqueue.core import JobQueueCluster

logger = logging.getLogger("futures_hpc")

#: Workers of a batch executor created without ``max_workers``.
DEFAULT_MAX_WORKERS = 1

#: The job options a pool's jobs take from the pool (the others are the executor's jobs').
POOL_JOB_OPTIONS = (
    "cores", "memory", "processes", "walltime", "queue", "account", "job_extra_directives",
    "job_script_prologue", "worker_extra_args", "memory_request", "job_directives_skip",
    "resource_spec", "job_mem", "job_cpu",
)


#: First line of every job script's prologue. On ``scancel``/``qdel`` or at the walltime the batch
#: system sends SIGTERM to every process of the job, then SIGKILL to those left after a grace
#: period (SLURM's ``KillWait``). A job shell without a trap dies of the SIGTERM at once, and its
#: worker (the nanny) is re-parented to init: a batch system that finds a job's processes by
#: parentage (SLURM's ``proctrack/linuxproc``, PBS/Torque without cgroups) then no longer sees
#: it, and a nanny whose own shutdown hangs stays for ever (the nanny of distributed before
#: 2024.9 does when the SIGTERM comes while its worker process is starting). With a trap, bash
#: waits for the worker before running it, so the worker stays in the job and the grace period's
#: SIGKILL reaches it.
KEEP_SHELL_UNTIL_WORKER_EXITS = (
    "trap 'echo \"futures_hpc: job terminated by SIGTERM\" >&2' TERM"
)


def _dask_jobqueue_glue() -> Any:
    """The :mod:`~futures_hpc.backends.batch.cluster` module, imported on first use.

    The system modules import without dask-jobqueue (detection and ``futures-hpc jobs`` need
    none); an executor needs it, and says how to install it when it is missing.
    """
    try:
        with interrupt_handler_kept():  # dask-jobqueue's import replaces Ctrl-C's handler
            from . import cluster
    except ImportError as error:
        raise BackendUnavailableError(
            f"the batch backends cannot be imported ({error}). Install it with: "
            "pip install 'futures_hpc[jobqueue]'."
        ) from error
    return cluster


class _FromDaskJobqueue:
    """A class attribute of a batch executor made from dask-jobqueue's classes on first use."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: type) -> Any:
        system = getattr(owner, "system", None)
        if system is None:  # the base class
            return None
        glue = _dask_jobqueue_glue()
        if self._name == "cluster_class":
            return glue.cluster_class_for(system)
        return glue.jobqueue_option_names(system) | system.own_option_names


#: What a batch provider reads from its executor, as its own attributes (the watcher's
#: decisions in :class:`~.watcher.JobWatching` were written against these names).
_FROM_EXECUTOR = frozenset({
    "run_name", "log_dir", "resources", "max_workers", "backend_options", "executor_options",
    "import_path", "security", "dashboard_address", "_cluster", "_client", "_outstanding",
    "_waiting_in_client",
})


class BatchProvider(JobWatching, BackendProvider):
    """What a batch system's executor does: its workers are batch jobs through dask-jobqueue.

    One subclass per batch system (:func:`batch_provider`) names the system (``system``, the
    module's ``SYSTEM``: commands, queue reading, cancelling, the mapping of cores, memory and
    account onto directives). The options it reads are :class:`JobQueueExecutor`'s.
    """

    scales_jobs = True

    #: The batch system: the ``SYSTEM`` of its module.
    system: ClassVar[BatchSystem]
    #: The futures_hpc subclass of the system's dask-jobqueue cluster (made on first use).
    cluster_class: ClassVar[type[JobQueueCluster]] = _FromDaskJobqueue()  # type: ignore[assignment]
    #: dask-jobqueue's parameters of the system's jobs, plus the system's own options.
    option_names = _FromDaskJobqueue()  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        if name in _FROM_EXECUTOR:
            return getattr(self.executor, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- what HPCExecutor asks of a backend ---------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why the batch system cannot be used here (see ``BatchSystem``), or None."""
        try:
            installed = importlib.util.find_spec("dask_jobqueue") is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            return (f"the {cls.name!r} backend needs dask-jobqueue: "
                    "pip install 'futures_hpc[jobqueue]'")
        return cls.system.unavailable_reason()

    def check_options(self) -> None:
        """Check the batch options; the system's own ones through the system."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(reason)
        self.scaling = validate_scaling_options(
            self.executor_options, self.max_workers or DEFAULT_MAX_WORKERS
        )
        if self.resources.processes and self.resources.cores is None and (
            self.resources.processes > 1
        ):
            raise OptionError(
                f"processes={self.resources.processes} needs cores= as well (cores per job, "
                "shared among the processes)"
            )
        self.system.check_own_options(self.backend_options)
        self._processes_per_job: int = self._plan_processes_per_job()
        job_array = self.executor_options.get("job_array") or False
        if job_array and self.system.job_array_refusal is not None:
            raise OptionError(f"job_array={job_array!r} is not allowed on the {self.name!r} "
                              f"backend: {self.system.job_array_refusal}")
        #: Job arrays: off (False), on (True), or on with at most this many elements running.
        self._job_array: bool | int = job_array

    def _plan_processes_per_job(self) -> int:
        """Worker processes in each job, never more than ``max_workers``.

        ``processes`` as given; without it dask-jobqueue's choice (its config key
        ``jobqueue.<backend>.processes``, else about the square root of the job's cores), capped
        by ``max_workers`` (default: one worker).
        """
        given = self.resources.processes
        if given is not None:
            if self.max_workers is not None and given > self.max_workers:
                raise OptionError(
                    f"processes={given} is not allowed with max_workers={self.max_workers}; "
                    "each job runs `processes` worker processes, so processes must be at most "
                    "max_workers"
                )
            return given
        automatic = _dask_jobqueue_glue().automatic_processes(
            self.cluster_class, self.resources.cores or 1
        )
        return max(1, min(automatic, self.max_workers or DEFAULT_MAX_WORKERS))

    def create_cluster(self) -> JobQueueCluster:
        """Create the dask-jobqueue cluster and submit the first jobs at once."""
        self._job_book = JobBook()
        self._job_watcher: JobWatcher | None = None
        #: What the system keeps across queue queries of this run (``query_job_states``).
        self._queue_memory: dict[str, Any] = {}
        self._fatal_error: str | None = None
        self._fatal_error_class: type[Exception] = JobFailedError
        self._first_worker_connected = False
        self._job_failures: list[str] = []
        self._adaptive: FairShareAdaptive | None = None
        self._rejections_seen = 0
        self._job_arrays = None
        if self.__dict__.get("_job_array"):
            throttle = None if self._job_array is True else int(self._job_array)
            self._job_arrays = _dask_jobqueue_glue().JobArraySubmitter(
                self.system, self._job_book, throttle)
        cluster = self.cluster_class(**self._cluster_options())
        # Submit now, so the jobs queue and start while the client connects; _start_workers
        # checks that the batch system accepted them.
        self._initial_job_count = self._fixed_job_count()
        cluster.scale(jobs=self._initial_job_count)
        return cluster

    def start_workers(self) -> None:
        """Check the batch system took the first jobs, start the watcher and the policy."""
        job_count = self._initial_job_count
        if not self._job_book.wait_for_outcomes(job_count, SUBMISSION_TIMEOUT_SECONDS):
            raise JobSubmissionError(
                f"{self.system.submit_command} did not accept or refuse the jobs of "
                f"{self.run_name} within {SUBMISSION_TIMEOUT_SECONDS:.0f} s. "
                f"Job scripts of this run: {self.log_dir}"
            )
        rejections = self._job_book.rejections()
        if rejections:
            distinct = list(dict.fromkeys(rejections))
            raise JobSubmissionError(
                f"{self.system.title} refused {len(rejections)} of the {job_count} jobs of "
                f"{self.run_name}:\n" + "\n".join(distinct) +
                f"\nJob scripts of this run: {self.log_dir}"
            )
        self._job_watcher = JobWatcher(self)
        logger.info("%s submitted %d job(s): %s", self.run_name, job_count,
                    " ".join(job.job_id for job in self._job_book.jobs()))
        self._start_policy()

    def _start_policy(self) -> None:
        """Size the cluster with the fair-share policy (fixed size: minimum = maximum).

        In both modes the policy replaces failed jobs and drains jobs before their walltime.
        """
        per_job = self.processes_per_job
        maximum = self.max_jobs() * per_job
        minimum = (min(maximum, math.ceil(self.scaling.min_workers / per_job) * per_job)
                   if self.scaling.adaptive else maximum)
        self._adaptive = self._cluster.adapt(
            Adaptive=FairShareAdaptive, minimum=minimum, maximum=maximum,
            idle_timeout=self.scaling.idle_timeout,
            max_pending_jobs=self.scaling.max_pending_jobs,
            walltime=self.resources.walltime_seconds,
            client_waiting=self._waiting_in_client,
            pool=self.executor._pools.base,  # pools (with_resources) share the cluster
        )
        logger.info("%s: %s scaling, %d to %d worker(s) (%d to %d job(s) of %d worker "
                    "process(es)), at most %d pending job(s), idle timeout %s, start "
                    "timeout %s", self.run_name,
                    "adaptive" if self.scaling.adaptive else "fixed", minimum, maximum,
                    minimum // per_job, maximum // per_job, per_job,
                    self.scaling.max_pending_jobs,
                    describe_idle_timeout(self.scaling.idle_timeout),
                    "none" if self.scaling.start_timeout is None
                    else f"{self.scaling.start_timeout:g} s")

    def planned_worker_slots(self) -> int:
        """One slot per core of every job the executor may hold."""
        return self.max_jobs() * (self.resources.cores or 1)

    # -- pools (ex.with_resources) ----------------------------------------------------------

    def check_pool(self, shape: PoolShape) -> None:
        """Every shape is a job size; a ``call_time`` must fit in the pool's walltime."""
        self.pool_walltime(shape)

    def pool_walltime(self, shape: PoolShape) -> tuple[str | None, int | None]:
        """The walltime of the pool's jobs: long enough for its ``call_time``.

        The pool's ``walltime``, else the executor's, else dask-jobqueue's configured one
        (``jobqueue.<system>.walltime``). With a ``call_time`` and no walltime given, jobs ask
        for at least twice the call time; a given walltime that leaves no room for one call
        is refused.
        """
        given = shape.walltime_seconds or self.resources.walltime_seconds
        seconds = given
        if seconds is None:
            configured = dask.config.get(
                f"jobqueue.{self.cluster_class.job_cls.config_name}.walltime", None)
            seconds = parse_walltime(configured) if configured else None
        call_time = shape.call_time_seconds
        if call_time:
            needed = call_time + MINIMUM_WALLTIME_MARGIN
            if given is not None and given < needed:
                raise OptionError(
                    f"with_resources(call_time={shape.call_time!r}) does not fit in the "
                    f"walltime of the pool's jobs ({format_walltime(given)}): a job must have "
                    f"the call time plus {MINIMUM_WALLTIME_MARGIN:.0f} s; ask for a longer "
                    "walltime or a shorter call_time")
            if seconds is None or seconds < needed:
                seconds = max(2 * call_time, int(needed))
        return (None if seconds is None else format_walltime(seconds)), seconds

    def pool_default_max_workers(self, shape: PoolShape) -> int:
        """The executor's ``max_workers`` (its jobs hold one worker each in a pool)."""
        return self.max_workers or DEFAULT_MAX_WORKERS

    def pool_job_prefix(self, number: int) -> str:
        """``fhpc-xxxxxxxx-p<number>-``: the pool's jobs are the run's, told apart."""
        return f"{self.run_name}-p{number}-"

    def pool_job(self, pool: ResourcePool, name: str) -> dict[str, Any]:
        """A job of the pool's shape: the executor's job options with the pool's resources."""
        shape = pool.shape
        walltime, walltime_seconds = self.pool_walltime(shape)
        resources = dataclasses.replace(
            self.resources,
            cores=shape.cores,
            memory=shape.memory or self.resources.memory,
            memory_bytes=shape.memory_bytes or self.resources.memory_bytes,
            walltime=walltime,
            walltime_seconds=walltime_seconds,
            queue=shape.queue or self.resources.queue,
            job_extra=[*self.resources.job_extra, *shape.job_extra],
            env={**self.resources.env, **pool.environment()},
        )
        extra = (self.system.gpu_options(shape.gpus, shape.cores, resources.memory_bytes)
                 if shape.gpus else None)
        pool_options = self._cluster_options(resources, 1, pool.worker_resources(), extra)
        template = self._cluster.new_spec
        options = dict(template["options"])
        for key in POOL_JOB_OPTIONS:
            if key in pool_options:
                options[key] = pool_options[key]
            else:
                options.pop(key, None)
        return {"cls": template["cls"], "options": options}

    # -- sizes ------------------------------------------------------------------------------------

    @property
    def processes_per_job(self) -> int:
        """Worker processes in each job."""
        return getattr(self, "_processes_per_job", None) or self.resources.processes or 1

    def max_jobs(self) -> int:
        """The most jobs this executor holds: ``max_workers // processes_per_job``, at least 1."""
        max_workers = self.max_workers or DEFAULT_MAX_WORKERS
        return max(1, max_workers // self.processes_per_job)

    def _fixed_job_count(self) -> int:
        """How many jobs to submit at start (so that a refused submission raises at once).

        Fixed size: every job. Adaptive: ``min_workers`` worth of jobs, but at least up to
        ``max_pending_jobs`` (released after ``idle_timeout`` if no work comes).
        """
        if not self.scaling.adaptive:
            return self.max_jobs()
        minimum = math.ceil(self.scaling.min_workers / self.processes_per_job)
        return max(minimum, min(self.max_jobs(), self.scaling.max_pending_jobs))

    # -- the cluster's options ----------------------------------------------------------------

    def _cluster_options(self, resources: ResourceOptions | None = None,
                         processes: int | None = None,
                         worker_resources: dict[str, float] | None = None,
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """dask-jobqueue's options for the executor's own jobs, or for a pool's.

        A pool passes its ``resources`` (the executor's with the pool's shape), one process per
        job, the dask resources its workers declare and its GPU options (``extra``).
        """
        resources = resources or self.resources
        processes = processes or self.processes_per_job
        cores = resources.cores or 1
        if worker_resources is None:  # the executor's own: one unit per thread (pools.py)
            worker_resources = {BASE_RESOURCE: max(1, cores // processes)}
        config_name = self.cluster_class.job_cls.config_name
        # SLURM's job_mem alone also sizes the job: the workers' limit then follows it.
        memory = resources.memory or self.backend_options.get("job_mem")
        memory_request = memory is not None or (
            dask.config.get(f"jobqueue.{config_name}.memory", None) is not None
        )
        working_directory = shlex.quote(os.getcwd())
        prologue = [
            KEEP_SHELL_UNTIL_WORKER_EXITS,
            # Workers start where the executor was created, as local workers do.
            f"cd {working_directory} || printf 'futures_hpc: cannot enter %s on %s; workers run "
            f"in %s\\n' {working_directory} \"$(hostname)\" \"$PWD\" >&2",
            # The client's import path, for modules of the user's own (futures_hpc.import_path).
            *([f"export PYTHONPATH={shlex.quote(pythonpath_value(self.import_path))}"
               "${PYTHONPATH:+:$PYTHONPATH}"] if self.import_path else []),
            # dask settings of the client's config that cost the workers CPU (dask_settings).
            *(f"export {name}={shlex.quote(value)}"
              for name, value in dask_worker_environment().items()),
            *(f"export {name}={shlex.quote(value)}" for name, value in resources.env.items()),
            *resources.prologue,
        ]
        passed = {
            name: value for name, value in self.backend_options.items()
            if name not in self.system.own_option_names
        }
        user_scheduler_options = passed.pop("scheduler_options", None) or dask.config.get(
            f"jobqueue.{config_name}.scheduler-options", None) or {}
        worker_arguments = list(passed.pop("worker_extra_args", None) or dask.config.get(
            f"jobqueue.{config_name}.worker-extra-args", None) or passed.pop("extra", None) or [])
        worker_arguments += ["--resources", ",".join(
            f"{name}={amount:g}" for name, amount in worker_resources.items())]
        listen = plan_batch_listening(
            user_scheduler_options,
            passed.get("interface") or dask.config.get(f"jobqueue.{config_name}.interface", None),
            worker_arguments,
            resources.python or dask.config.get(f"jobqueue.{config_name}.python", None)
            or sys.executable,
            tls=self.security is not None,
        )
        prologue += listen.prologue  # after the user's lines, which may set up the Python
        scheduler_options = {
            "dashboard_address": self.dashboard_address,
            **listen.scheduler_options,
            **user_scheduler_options,
        }
        options: dict[str, Any] = dict(
            name=self.run_name,
            job_name=self.run_name,
            cores=cores,
            memory=memory or f"{cores}GiB",  # a placeholder when memory_request is off
            processes=processes,
            walltime=resources.walltime,
            queue=resources.queue,
            python=resources.python,
            job_extra_directives=list(resources.job_extra),
            job_script_prologue=prologue,
            log_directory=str(self.log_dir),
            security=self.security,
            scheduler_options=scheduler_options,
            worker_extra_args=worker_arguments + listen.worker_arguments,
            job_book=self._job_book,
            memory_request=memory_request,
            job_arrays=self._job_arrays,
        )
        options.update(self.system.scheduler_options(
            resources, self.backend_options, cores, memory_request))
        for name, value in (extra or {}).items():
            if name == "job_extra_directives":
                options[name] = list(options.get(name) or []) + list(value)
            else:
                options[name] = value
        skip = list(options.pop("job_directives_skip", [])) + list(
            passed.pop("job_directives_skip", None) or []
        )
        if skip:
            options["job_directives_skip"] = skip
        options.update(passed)
        return {name: value for name, value in options.items() if value is not None}

    # -- public -----------------------------------------------------------------------------------

    def job_script(self) -> str:
        """The script each job runs (jobs differ only in the worker name)."""
        return self._cluster.job_script()

    def job_ids(self) -> list[str]:
        """The ids of every job this executor has submitted, in submission order."""
        return [job.job_id for job in self._job_book.jobs()]

    def array_ids(self) -> list[str]:
        """The ids of the job arrays this executor has submitted (``job_array=True``)."""
        arrays = self.__dict__.get("_job_arrays")
        return list(arrays.array_ids) if arrays is not None else []

    # -- queue states ---------------------------------------------------------------------------

    def _query_job_states(self, job_ids: list[str]) -> dict[str, QueueState] | None:
        """Ask the batch system for these jobs' states and reasons; ``"gone"`` for unlisted ones.

        Returns None when the batch system could not be asked (try again later).
        """
        return self.system.query_job_states(job_ids, self._queue_memory)

    def _state_is_active(self, state: str) -> bool:
        """Whether a job in this state may still run a worker."""
        return self.system.state_is_active(state)

    def report_status(self, status: ScalingStatus) -> None:
        """Jobs replaced, job ids, why jobs wait, and the fair-share policy's counts."""
        status.adaptive = self.scaling.adaptive
        status.resubmissions = min(len(self._job_failures), self.scaling.max_resubmissions)
        status.job_ids = self.job_ids()
        status.pending_reasons = self.pending_reasons()
        if self._adaptive is not None:
            self._adaptive.report_into(status)

    def pending_reasons(self) -> dict[str, str]:
        """Why each job whose worker has not connected waits, as the batch system last said.

        Returns
        -------
        dict of str to str
            Job id -> ``"STATE: reason"`` (or the state alone when the batch system gives no
            reason), for jobs neither ended nor cancelled whose state has been read at least
            once.

        """
        worker_names = self._connected_worker_names()
        if worker_names is not None:  # a job whose worker has just connected waits no more
            self._job_book.update_connections(worker_names)
        return {
            job.job_id: f"{job.state}: {job.reason}" if job.reason else job.state
            for job in self._job_book.jobs()
            if not (job.connected or job.ended or job.cancel_sent) and job.state != "submitted"
        }

    def progress_note(self) -> str | None:
        """For a progress bar: how many jobs wait, and why (None when none waits)."""
        counts: dict[str, int] = {}
        for text in self.pending_reasons().values():
            counts[text] = counts.get(text, 0) + 1
        if not counts:
            return None
        return "; ".join(
            f"{count} job{'s' if count > 1 else ''} {text}" for text, count in counts.items()
        )

    def check_usable(self) -> None:
        """Raise the run's error once its jobs have failed for good (no call can run)."""
        if self.__dict__.get("_fatal_error") is not None:
            raise self._fatal_error_class(self._fatal_error)

    # -- closing ----------------------------------------------------------------------------------

    def cancel_jobs_now(self) -> None:
        """Cancel every job of this executor with one command, without the event loop.

        Used by the SIGTERM handler, and after closing as a safety net. Jobs still being
        submitted are cancelled as soon as their submission returns.
        """
        self._job_book.begin_closing()
        self._job_book.cancel(self.system.cancel_command)
        if not self._job_book.wait_for_in_flight(timeout=10):
            logger.warning("submissions of %s still running while cancelling", self.run_name)

    def before_close(self) -> None:
        """No new submission, no more watching: the jobs are about to be cancelled."""
        book = self.__dict__.get("_job_book")
        if book is not None:
            book.begin_closing()
        watcher = self.__dict__.get("_job_watcher")
        if watcher is not None:
            watcher.stop()

    def after_close(self) -> None:
        """Whatever closing the cluster did or failed to do, no job stays behind."""
        if self.__dict__.get("_job_book") is not None:
            self.cancel_jobs_now()


def batch_provider(system: BatchSystem, name: str | None = None) -> type[BatchProvider]:
    """The provider class of the batch system ``system`` (its executor names it).

    Parameters
    ----------
    system : BatchSystem
        The system module's ``SYSTEM``.
    name : str, optional
        The backend's name, if not the system's.

    """
    return type(f"{type(system).__name__}Provider", (BatchProvider,),
                {"system": system, "name": name or system.name,
                 "__module__": type(system).__module__,
                 "__doc__": f"The batch provider of {system.title or system.name}."})


class _FromProvider:
    """A class attribute of a batch executor that is its provider's."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: type) -> Any:
        return getattr(owner.provider, self._name, None)


class JobQueueExecutor(HPCExecutor):
    """Base of the batch executors: workers are batch jobs started through dask-jobqueue.

    A batch system's executor names its provider: ``provider = batch_provider(SYSTEM)``.

    Other Parameters
    ----------------
    start_timeout : float, str or datetime.timedelta, optional
        Seconds (or ``"HH:MM:SS"``) a job may wait for its worker while no worker of the
        executor has connected yet; then the jobs are cancelled and the outstanding calls raise
        :class:`~futures_hpc.errors.JobSubmissionError` with each job's last state and reason.
        Default: no limit. Jobs the batch system says can never start fail so without it.

    """

    provider: ClassVar[type[BackendProvider]] = BatchProvider
    #: The batch system (the provider's).
    system: ClassVar[BatchSystem] = _FromProvider()  # type: ignore[assignment]
    #: The futures_hpc subclass of the system's dask-jobqueue cluster (the provider's).
    cluster_class: ClassVar[type[JobQueueCluster]] = _FromProvider()  # type: ignore[assignment]

    @property
    def processes_per_job(self) -> int:
        """Worker processes in each job."""
        return self._backend.processes_per_job

    def max_jobs(self) -> int:
        """The most jobs this executor holds: ``max_workers // processes_per_job``, at least 1."""
        return self._backend.max_jobs()

    def job_script(self) -> str:
        """The script each job runs (jobs differ only in the worker name)."""
        return self._backend.job_script()

    def job_ids(self) -> list[str]:
        """The ids of every job this executor has submitted, in submission order."""
        return self._backend.job_ids()

    def pending_reasons(self) -> dict[str, str]:
        """Why each job whose worker has not connected waits (see the provider's)."""
        return self._backend.pending_reasons()

    def array_ids(self) -> list[str]:
        """The ids of the job arrays this executor has submitted (``job_array=True``).

        Each array holds the jobs one scaling step asked for; :meth:`job_ids` lists its
        elements (SLURM ``1234_0``, Grid Engine ``1234.1``).
        """
        return self._backend.array_ids()

    @property
    def _job_book(self) -> JobBook:
        return self._backend._job_book

    def _query_job_states(self, job_ids: list[str]) -> dict[str, QueueState] | None:
        return self._backend._query_job_states(job_ids)

