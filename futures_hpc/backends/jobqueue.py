"""The batch backends: SLURM, PBS and Grid Engine executors over dask-jobqueue.

Each executor maps the common options onto a dask-jobqueue cluster whose workers run as batch
jobs, and adds what dask-jobqueue leaves to its users:

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

import asyncio
import inspect
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import dask.config
from dask_jobqueue import PBSCluster, SGECluster, SLURMCluster
from dask_jobqueue.core import Job, JobQueueCluster
from dask_jobqueue.pbs import PBSJob
from dask_jobqueue.sge import SGEJob
from dask_jobqueue.slurm import SLURMJob
from distributed.core import Status
from distributed.deploy.spec import ProcessInterface
from distributed.deploy.utils import nprocesses_nthreads

from .. import cleanup
from ..errors import BackendUnavailableError, JobFailedError, JobSubmissionError, OptionError
from ..executor import HPCExecutor
from ..import_path import pythonpath_value
from ..scaling import FairShareAdaptive, ScalingStatus, validate_scaling_options
from .listen import plan_batch_listening

logger = logging.getLogger("futures_hpc")

#: Workers of a batch executor created without ``max_workers``.
DEFAULT_MAX_WORKERS = 1

#: Seconds to wait for the batch system to accept (or refuse) a job.
SUBMISSION_TIMEOUT_SECONDS = 120.0
#: Seconds a cancel or queue-state command may take.
COMMAND_TIMEOUT_SECONDS = 60.0
#: Seconds between the watcher's looks at the connected workers.
WATCH_INTERVAL_SECONDS = 1.0
#: First and longest interval between queue-state queries for jobs whose workers are missing
#: (the first query waits this long after a job is submitted or loses its worker, so that the
#: query does not compete with starting workers for the CPU).
FIRST_QUERY_INTERVAL_SECONDS = 2.0
MAX_QUERY_INTERVAL_SECONDS = 30.0
#: Lines of each job log quoted in an error.
LOG_TAIL_LINES = 20

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

# Options the executor sets from the common vocabulary (or that would break it); the rest of
# dask-jobqueue's parameters pass through.
_OWNED_PARAMETERS = frozenset({
    "self", "n_workers", "job_cls", "loop", "asynchronous", "security", "protocol", "name",
    "job_name", "scheduler", "cores", "memory", "processes", "queue", "account", "walltime",
    "python", "log_directory", "job_extra", "job_extra_directives", "job_script_prologue",
    "env_extra", "extra", "header_skip", "dashboard_address", "host",
})


def _jobqueue_parameters(job_class: type) -> frozenset[str]:
    """The keyword arguments of a dask-jobqueue cluster whose jobs are ``job_class``."""
    names: set[str] = set()
    for function in (JobQueueCluster.__init__, job_class.__init__, Job.__init__):
        names.update(
            parameter.name
            for parameter in inspect.signature(function).parameters.values()
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
        )
    return frozenset(names - _OWNED_PARAMETERS)


def _run_command(command: list[str]) -> subprocess.CompletedProcess[str] | None:
    """Run a batch-system command; None if it cannot be run or does not answer in time."""
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("%s failed: %r", shlex.join(command), error)
        return None


def cancel_job_ids(cancel_command: str, job_ids: list[str]) -> bool:
    """Cancel ``job_ids`` with one ``cancel_command`` call; False if it could not be run.

    Synchronous on purpose: it must work from a signal handler and at interpreter exit, when
    neither the event loop nor a thread pool can be relied on. A non-zero exit status counts as
    done: it is common when some of the jobs have just ended.
    """
    if not job_ids:
        return True
    command = [*shlex.split(cancel_command), *job_ids]
    result = _run_command(command)
    if result is None:
        return False
    if result.returncode != 0:
        logger.debug("%s exited with %s: %s", shlex.join(command), result.returncode,
                     (result.stderr or result.stdout).strip())
    logger.info("cancelled jobs %s", " ".join(job_ids))
    return True


# -- what the executor knows of its jobs --------------------------------------------------------


@dataclass(frozen=True)
class QueueState:
    """A job as the batch system lists it.

    Attributes
    ----------
    state : str
        The batch system's state (``"PENDING"``, ``"qw"``, ``"Q"``...); ``"gone"`` once the
        queue no longer lists the job.
    reason : str or None
        Why a waiting job has not started, in the batch system's words (SLURM's reason code,
        Grid Engine's scheduling info, PBS's comment); None when it gives none.
    never_starts : bool
        The batch system says the job can never start as requested (see
        :func:`slurm_reason_never_clears`, :func:`pbs_comment_never_clears` and
        :meth:`SGEExecutor._verify`).

    """

    state: str
    reason: str | None = None
    never_starts: bool = False


@dataclass
class BatchJob:
    """One batch job the executor submitted.

    Attributes
    ----------
    name : str
        dask-jobqueue's name for the job (``fhpc-xxxxxxxx-N``); its workers' names start with it.
    job_id : str
        The batch system's job id.
    submitted_at : float
        ``time.monotonic()`` of the submission.
    state : str
        The last state the batch system reported (``"submitted"`` before the first query,
        ``"gone"`` once the queue no longer lists it).
    reason : str or None
        The last reason the batch system gave for the job not running yet.
    connected, ever_connected : bool
        Whether a worker of the job is connected now, and whether one ever was.
    ended : bool
        Whether the batch system says the job is over.
    cancel_sent : bool
        Whether a cancel command was sent for it.
    retired : bool
        Whether the executor meant the job to end (scaling down); its end is then no failure.

    """

    name: str
    job_id: str
    submitted_at: float
    state: str = "submitted"
    reason: str | None = None
    connected: bool = False
    ever_connected: bool = False
    ended: bool = False
    cancel_sent: bool = False
    retired: bool = False


class JobBook:
    """Thread-safe record of an executor's submissions, shared by its jobs, cluster and watcher.

    The event loop thread records submissions; the watcher thread records worker connections
    and queue states; any thread (the SIGTERM handler included) may claim jobs to cancel.
    """

    def __init__(self) -> None:
        # Re-entrant: the SIGTERM handler may run while the main thread holds it.
        self._condition = threading.Condition(threading.RLock())
        self._jobs: dict[str, BatchJob] = {}
        self._rejections: list[str] = []
        self._in_flight = 0
        self.closing = False

    # submissions (event loop thread)
    def submission_started(self) -> None:
        """Count a submission command that has not answered yet."""
        with self._condition:
            self._in_flight += 1

    def submission_finished(self, name: str, job_id: str | None, rejection: str | None,
                            cancel_command: str) -> None:
        """Record a submission's outcome; cancel the job at once if the executor is closing.

        The submission counts as in flight until then, so that whoever waits for the
        submissions before the process ends (the SIGTERM handler) also waits for that cancel.
        """
        with self._condition:
            if job_id is not None:
                self._jobs[job_id] = BatchJob(name, job_id, time.monotonic())
            else:
                self._rejections.append(rejection or "no job id")
            cancel_now = job_id is not None and self.closing
        try:
            if cancel_now:
                self.cancel(cancel_command, [job_id])
        finally:
            with self._condition:
                self._in_flight -= 1
                self._condition.notify_all()

    def wait_for_outcomes(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` submissions have an outcome; False on timeout."""
        with self._condition:
            return self._condition.wait_for(
                lambda: len(self._jobs) + len(self._rejections) >= count, timeout
            )

    def wait_for_in_flight(self, timeout: float) -> bool:
        """Wait until no submission command is running; False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: self._in_flight == 0, timeout)

    def rejections(self) -> list[str]:
        """The batch system's messages for the refused submissions."""
        with self._condition:
            return list(self._rejections)

    # cancelling (any thread)
    def begin_closing(self) -> None:
        """From now on every job is cancelled, including those still being submitted."""
        with self._condition:
            self.closing = True

    def cancel(self, cancel_command: str, job_ids: list[str] | None = None) -> None:
        """Cancel the given jobs (default: all) not cancelled yet, with one command."""
        with self._condition:
            jobs = list(self._jobs.values()) if job_ids is None else [
                self._jobs[job_id] for job_id in job_ids if job_id in self._jobs
            ]
            claimed = [job for job in jobs if not job.cancel_sent and not job.ended]
            for job in claimed:
                job.cancel_sent = True
        if not cancel_job_ids(cancel_command, [job.job_id for job in claimed]):
            with self._condition:  # not sent after all: let the next attempt try again
                for job in claimed:
                    job.cancel_sent = False

    def mark_retired(self, job_ids: list[str]) -> None:
        """Record that the executor itself ends these jobs (their end is not a failure)."""
        with self._condition:
            for job_id in job_ids:
                if job_id in self._jobs:
                    self._jobs[job_id].retired = True

    # watching (watcher thread)
    def jobs(self) -> list[BatchJob]:
        """Copies of every job record, in submission order."""
        with self._condition:
            return [replace(job) for job in self._jobs.values()]

    def active_count(self) -> int:
        """Jobs not ended, plus submissions still in flight."""
        with self._condition:
            return self._in_flight + sum(not job.ended for job in self._jobs.values())

    def update_connections(self, worker_names: set[str]) -> list[BatchJob]:
        """Record which jobs have a connected worker; return copies of the jobs without one."""
        job_names = worker_names | {name.rsplit("-", 1)[0] for name in worker_names}
        with self._condition:
            unconnected = []
            for job in self._jobs.values():
                if job.ended:
                    continue
                job.connected = job.name in job_names
                job.ever_connected = job.ever_connected or job.connected
                if not job.connected:
                    unconnected.append(replace(job))
            return unconnected

    def record_states(self, states: dict[str, QueueState], is_active: Callable[[str], bool]
                      ) -> list[BatchJob]:
        """Record queue states; return copies of the jobs that ended unexpectedly just now."""
        with self._condition:
            ended = []
            for job_id, queue_state in states.items():
                job = self._jobs.get(job_id)
                if job is None or job.ended:
                    continue
                job.state, job.reason = queue_state.state, queue_state.reason
                if not is_active(queue_state.state):
                    job.ended = True
                    if not job.retired and not self.closing:
                        ended.append(replace(job))
            return ended


# -- dask-jobqueue classes that keep the book ----------------------------------------------------


class _BookkeepingJob:
    """Mixin for a dask-jobqueue ``Job``: persistent script, clear errors, bookkeeping.

    Takes the ``Job``'s own arguments and these:

    Parameters
    ----------
    job_book : JobBook
        Where submissions and cancellations are recorded.
    memory_request : bool
        False when no memory was asked for: the worker then takes its limit from the job's
        (``--memory-limit auto``) instead of dask-jobqueue's placeholder.

    """

    job_id: str | None
    name: str
    log_directory: str
    submit_command: str
    cancel_command: str

    def __init__(self, *args: Any, job_book: JobBook, memory_request: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._job_book = job_book
        if not memory_request:
            self._command_template = re.sub(
                r"--memory-limit \S+", "--memory-limit auto", self._command_template
            )

    @contextmanager
    def job_file(self) -> Iterator[str]:
        """Write the job script into the run's log directory, where it stays for debugging."""
        path = Path(self.log_directory) / f"{self.name}.sh"
        path.write_text(self.job_script())
        yield str(path)

    async def _submit_job(self, script_filename: str) -> str:
        """Submit from the log directory (so wrappers' default log paths land there)."""
        command = [*shlex.split(self.submit_command), script_filename]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, cwd=self.log_directory,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), SUBMISSION_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            process.kill()
            raise JobSubmissionError(
                f"{shlex.join(command)} did not answer within {SUBMISSION_TIMEOUT_SECONDS:.0f} s"
            ) from None
        if process.returncode != 0:
            message = "\n".join(
                text.strip() for text in (err.decode(), out.decode()) if text.strip()
            )
            # Without the script's path, so that identical refusals read as one.
            raise JobSubmissionError(
                f"{command[0]} failed (exit status {process.returncode}):\n"
                f"{message or '(no output)'}"
            )
        return out.decode()

    async def start(self) -> None:
        """Submit the job; record the job id, or the batch system's refusal."""
        self._job_book.submission_started()
        try:
            await super().start()  # type: ignore[misc]
        except BaseException as error:
            self.status = Status.failed
            self._job_book.submission_finished(self.name, None, str(error), self.cancel_command)
            raise
        self._job_book.submission_finished(self.name, self.job_id, None, self.cancel_command)

    async def close(self) -> None:
        """Cancel the job unless the cluster already did, for all its jobs at once."""
        if self.job_id:
            self._job_book.cancel(self.cancel_command, [self.job_id])
        await ProcessInterface.close(self)  # type: ignore[arg-type]


class _BookkeepingCluster:
    """Mixin for a dask-jobqueue cluster: one cancel command for all jobs; quiet failures."""

    job_cls: type
    workers: dict[str, Any]
    worker_spec: dict[str, Any]
    _job_kwargs: dict[str, Any]

    @property
    def job_book(self) -> JobBook:
        """The book shared with the cluster's jobs."""
        return self._job_kwargs["job_book"]

    async def _correct_state_internal(self) -> None:
        # Jobs whose spec was removed are closed on purpose (scaled down, by any policy): their
        # end is no failure.
        self.job_book.mark_retired([
            job.job_id for name, job in list(self.workers.items())
            if name not in self.worker_spec and getattr(job, "job_id", None)
        ])
        try:
            await super()._correct_state_internal()  # type: ignore[misc]
        except Exception as error:
            # A refused submission: the executor raises it, with the batch system's message.
            logger.debug("submitting jobs failed: %s", error)
        for name, job in list(self.workers.items()):
            if job.status == Status.failed:
                # Forget it, so that closing does not trip over it and nothing resubmits it.
                del self.workers[name]
                self.worker_spec.pop(name, None)

    async def _close(self) -> None:
        self.job_book.begin_closing()
        # Synchronous (a few tens of ms): at interpreter exit no thread pool takes work.
        self.job_book.cancel(self.job_cls.cancel_command)
        await super()._close()  # type: ignore[misc]


class _SLURMJob(_BookkeepingJob, SLURMJob):
    pass


class _PBSJob(_BookkeepingJob, PBSJob):
    pass


class _SGEJob(_BookkeepingJob, SGEJob):
    pass


class _SLURMCluster(_BookkeepingCluster, SLURMCluster):
    job_cls = _SLURMJob


class _PBSCluster(_BookkeepingCluster, PBSCluster):
    job_cls = _PBSJob


class _SGECluster(_BookkeepingCluster, SGECluster):
    job_cls = _SGEJob


# -- the executors -------------------------------------------------------------------------------


class JobQueueExecutor(HPCExecutor):
    """Base of the batch executors: workers are batch jobs started through dask-jobqueue.

    A subclass names its cluster class, the commands it needs and how to read job states and
    the reasons a job waits.

    Other Parameters
    ----------------
    start_timeout : float, str or datetime.timedelta, optional
        Seconds (or ``"HH:MM:SS"``) a job may wait for its worker while no worker of the
        executor has connected yet; then the jobs are cancelled and the outstanding calls raise
        :class:`~futures_hpc.errors.JobSubmissionError` with each job's last state and reason.
        Default: no limit. Jobs the batch system says can never start fail so without it.

    """

    scales_jobs = True

    #: The futures_hpc subclass of the dask-jobqueue cluster.
    cluster_class: ClassVar[type]
    #: The batch system's name, for messages.
    scheduler_title: ClassVar[str] = ""
    #: Commands that must be on PATH: submit, query, cancel.
    required_commands: ClassVar[tuple[str, ...]] = ()
    #: Backend options futures_hpc uses itself instead of passing them to dask-jobqueue.
    own_option_names: ClassVar[frozenset[str]] = frozenset()

    # -- what HPCExecutor asks of a backend ---------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say which batch commands are missing from PATH, or None if all are there."""
        missing = [command for command in cls.required_commands if shutil.which(command) is None]
        if not missing:
            return None
        return (
            f"the {cls.backend_name!r} backend needs the {cls.scheduler_title} commands "
            f"{', '.join(cls.required_commands)}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH "
            f"({os.environ.get('PATH', '')})"
        )

    def _validate_options(self) -> None:
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
        self._processes_per_job: int = self._plan_processes_per_job()

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
        config_name = self.cluster_class.job_cls.config_name
        automatic = dask.config.get(f"jobqueue.{config_name}.processes", None)
        if not isinstance(automatic, int) or automatic < 1:
            automatic, _ = nprocesses_nthreads(self.resources.cores or 1)
        return max(1, min(automatic, self.max_workers or DEFAULT_MAX_WORKERS))

    def _create_cluster(self) -> JobQueueCluster:
        self._job_book = JobBook()
        self._job_watcher: _JobWatcher | None = None
        self._fatal_error: str | None = None
        self._fatal_error_class: type[Exception] = JobFailedError
        self._first_worker_connected = False
        self._job_failures: list[str] = []
        self._adaptive: FairShareAdaptive | None = None
        self._rejections_seen = 0
        cleanup.register(self)
        cluster = self.cluster_class(**self._cluster_options())
        # Submit now, so the jobs queue and start while the client connects; _start_workers
        # checks that the batch system accepted them.
        self._initial_job_count = self._fixed_job_count()
        cluster.scale(jobs=self._initial_job_count)
        return cluster

    def _start_workers(self) -> None:
        job_count = self._initial_job_count
        if not self._job_book.wait_for_outcomes(job_count, SUBMISSION_TIMEOUT_SECONDS):
            raise JobSubmissionError(
                f"{self.required_commands[0]} did not accept or refuse the jobs of "
                f"{self.run_name} within {SUBMISSION_TIMEOUT_SECONDS:.0f} s. "
                f"Job scripts of this run: {self.log_dir}"
            )
        rejections = self._job_book.rejections()
        if rejections:
            distinct = list(dict.fromkeys(rejections))
            raise JobSubmissionError(
                f"{self.scheduler_title} refused {len(rejections)} of the {job_count} jobs of "
                f"{self.run_name}:\n" + "\n".join(distinct) +
                f"\nJob scripts of this run: {self.log_dir}"
            )
        self._job_watcher = _JobWatcher(self)
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
        )
        logger.info("%s: %s scaling, %d to %d worker(s) (%d to %d job(s) of %d worker "
                    "process(es)), at most %d pending job(s), idle timeout %.0f s, start "
                    "timeout %s", self.run_name,
                    "adaptive" if self.scaling.adaptive else "fixed", minimum, maximum,
                    minimum // per_job, maximum // per_job, per_job,
                    self.scaling.max_pending_jobs, self.scaling.idle_timeout,
                    "none" if self.scaling.start_timeout is None
                    else f"{self.scaling.start_timeout:g} s")

    def _planned_worker_slots(self) -> int:
        return self.max_jobs() * (self.resources.cores or 1)

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

    def _cluster_options(self) -> dict[str, Any]:
        resources = self.resources
        cores = resources.cores or 1
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
            *(f"export {name}={shlex.quote(value)}" for name, value in resources.env.items()),
            *resources.prologue,
        ]
        passed = {
            name: value for name, value in self.backend_options.items()
            if name not in self.own_option_names
        }
        user_scheduler_options = passed.pop("scheduler_options", None) or dask.config.get(
            f"jobqueue.{config_name}.scheduler-options", None) or {}
        worker_arguments = list(passed.pop("worker_extra_args", None) or dask.config.get(
            f"jobqueue.{config_name}.worker-extra-args", None) or passed.pop("extra", None) or [])
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
            processes=self.processes_per_job,
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
        )
        options.update(self._scheduler_options(cores, memory_request))
        skip = list(options.pop("job_directives_skip", [])) + list(
            passed.pop("job_directives_skip", None) or []
        )
        if skip:
            options["job_directives_skip"] = skip
        options.update(passed)
        return {name: value for name, value in options.items() if value is not None}

    def _scheduler_options(self, cores: int, memory_request: bool) -> dict[str, Any]:
        """The batch system's own mapping of account, cores and memory."""
        return {"account": self.resources.account}

    # -- public -----------------------------------------------------------------------------------

    def job_script(self) -> str:
        """The script each job runs (jobs differ only in the worker name)."""
        return self._cluster.job_script()

    def job_ids(self) -> list[str]:
        """The ids of every job this executor has submitted, in submission order."""
        return [job.job_id for job in self._job_book.jobs()]

    # -- queue states ---------------------------------------------------------------------------

    def _query_job_states(self, job_ids: list[str]) -> dict[str, QueueState] | None:
        """Ask the batch system for these jobs' states and reasons; ``"gone"`` for unlisted ones.

        Returns None when the batch system could not be asked (try again later).
        """
        raise NotImplementedError

    @staticmethod
    def _state_is_active(state: str) -> bool:
        """Whether a job in this state may still run a worker."""
        raise NotImplementedError

    # -- watching -------------------------------------------------------------------------------

    def _connected_worker_names(self) -> set[str] | None:
        try:
            workers = self._client.scheduler_info(n_workers=-1)["workers"].values()
        except Exception as error:
            logger.debug("cannot list the workers of %s: %r", self.run_name, error)
            return None
        return {str(worker.get("name")) for worker in workers}

    def _watch_jobs(self, query_due: bool) -> bool:
        """One look at the jobs; return whether the queue was queried."""
        if self._fatal_error is not None:
            self._fail_late_calls()
            return False
        if self._job_book.closing:
            return False
        worker_names = self._connected_worker_names()
        if worker_names is None:
            return False
        unconnected = self._job_book.update_connections(worker_names)
        self._check_rejections()
        if self._start_timeout_expired(unconnected):
            self._fail_start_timeout(unconnected)
            return True
        if not unconnected or not query_due:
            return False
        states = self._query_job_states([job.job_id for job in unconnected])
        if states is None:
            return True
        doubted: set[str] = set()
        if self._any_worker_ever_connected():
            states, doubted = self._doubt_never_starting(states)
        self._log_changed_reasons(unconnected, states, doubted)
        ended = self._job_book.record_states(states, self._state_is_active)
        never_starting = [job for job in unconnected
                          if job.job_id in states and states[job.job_id].never_starts]
        if never_starting:
            self._fail_never_starting(never_starting, states)
        elif ended and not self._job_book.closing:
            self._handle_ended_jobs(ended)
        return True

    # -- jobs that wait ---------------------------------------------------------------------------

    def _describe_waiting_job(self, job: BatchJob, queue_state: QueueState | None = None) -> str:
        """``SLURM job 42 (fhpc-x-0): PENDING, reason: Priority`` and the job script's path."""
        state = queue_state.state if queue_state is not None else job.state
        reason = queue_state.reason if queue_state is not None else job.reason
        because = f", reason: {reason}" if reason else ""
        return (f"{self.scheduler_title} job {job.job_id} ({job.name}): {state}{because}; "
                f"job script {self.log_dir / job.name}.sh")

    def _log_changed_reasons(self, jobs: list[BatchJob], states: dict[str, QueueState],
                             doubted: set[str]) -> None:
        """Log, once per change, why each job still waits for its worker.

        At INFO; at WARNING for a job said never to start although jobs of the same script did.
        """
        for job in jobs:
            new = states.get(job.job_id)
            if new is None or not self._state_is_active(new.state) or new.never_starts:
                continue
            if (new.state, new.reason) == (job.state, job.reason):
                continue
            if job.job_id in doubted:
                logger.warning("%s waits: %s. The batch system says this job can never start, "
                               "but jobs of this run with the same script did: waiting.",
                               self.run_name, self._describe_waiting_job(job, new))
            else:
                logger.info("%s waits: %s", self.run_name, self._describe_waiting_job(job, new))

    def _fail_never_starting(self, jobs: list[BatchJob], states: dict[str, QueueState]) -> None:
        """The batch system says these jobs can never start: end the run."""
        described = "\n".join(f"  {self._describe_waiting_job(job, states[job.job_id])}"
                               for job in jobs)
        self._fail_before_start(
            f"{self.scheduler_title} accepted the jobs of {self.run_name} but says they can "
            f"never start as requested:\n{described}\n"
            "Ask for what a node of the queue can give (cores, memory, walltime, queue, "
            f"account); the jobs were cancelled. Job scripts of this run: {self.log_dir}"
        )

    def _any_worker_ever_connected(self) -> bool:
        """Whether a worker of this run has ever connected (so its jobs can start)."""
        if not self._first_worker_connected:
            self._first_worker_connected = any(job.ever_connected
                                               for job in self._job_book.jobs())
        return self._first_worker_connected

    @staticmethod
    def _doubt_never_starting(states: dict[str, QueueState]
                              ) -> tuple[dict[str, QueueState], set[str]]:
        """Keep waiting for jobs said never to start once a job of the same script has started.

        The request evidently can start here, so the reason must be passing (nodes drained, a
        limit lowered since): such jobs wait like others. Returns the states without the
        verdict and the ids of the jobs doubted.
        """
        doubted = {job_id for job_id, queue_state in states.items() if queue_state.never_starts}
        return ({job_id: replace(queue_state, never_starts=False) if job_id in doubted
                 else queue_state for job_id, queue_state in states.items()}, doubted)

    def _start_timeout_expired(self, unconnected: list[BatchJob]) -> bool:
        """Whether a job has waited ``start_timeout`` while no worker has ever connected."""
        timeout = self.scaling.start_timeout
        if timeout is None or not unconnected or self._any_worker_ever_connected():
            return False
        now = time.monotonic()
        return any(now - job.submitted_at >= timeout for job in unconnected)

    def _fail_start_timeout(self, unconnected: list[BatchJob]) -> None:
        """No worker within ``start_timeout``: end the run, quoting the batch system's last word."""
        states = self._query_job_states([job.job_id for job in unconnected]) or {}
        described = "\n".join(
            f"  {self._describe_waiting_job(job, states.get(job.job_id))}" for job in unconnected
        )
        self._fail_before_start(
            f"no worker of {self.run_name} connected within start_timeout="
            f"{self.scaling.start_timeout:g} s of its job's submission; the jobs were "
            f"cancelled. {self.scheduler_title} said:\n{described}\n"
            f"Job scripts and logs of this run: {self.log_dir}"
        )

    def _fail_before_start(self, message: str) -> None:
        """End a run whose jobs cannot start: stop the policy, cancel every job, fail the calls.

        Outstanding calls, and every later ``submit`` and ``map``, raise
        :class:`JobSubmissionError` with ``message``; ``shutdown()`` then has nothing to wait for.
        """
        self._fatal_error = message
        self._fatal_error_class = JobSubmissionError
        self._stop_policy()
        book = self._job_book
        book.mark_retired(self.job_ids())
        book.begin_closing()  # jobs still being submitted are cancelled when they return
        book.cancel(self.cluster_class.job_cls.cancel_command)
        self._fail_outstanding(message, JobSubmissionError)

    def _fail_late_calls(self) -> None:
        """Fail calls submitted while the run was failing (they passed the check just before)."""
        error_class = self._fatal_error_class
        for future in self._outstanding():
            _set_exception(future, error_class(self._fatal_error))

    def _handle_ended_jobs(self, ended: list[BatchJob]) -> None:
        """Report jobs that ended unexpectedly and replace them, up to ``max_resubmissions``.

        Beyond that, the outstanding calls fail with :class:`JobFailedError` (ids, states, log
        tails), and so does the next ``submit``/``map``.
        """
        for job in ended:
            description = self._describe_ended_job(job)
            logger.warning("%s", description)
            self._job_failures.append(description)
        limit = self.scaling.max_resubmissions
        if self._adaptive is not None and len(self._job_failures) > limit:
            self._stop_policy()
            self._fail_outstanding(
                f"{len(self._job_failures)} batch jobs of {self.run_name} ended unexpectedly, "
                f"more than max_resubmissions={limit} allows:\n"
                + "\n".join(self._job_failures)
                + f"\nJob scripts and logs of this run: {self.log_dir}"
            )
            return
        if self._adaptive is not None:
            self._forget_jobs(ended)
            logger.warning("replacing %d job(s) (%d of max_resubmissions=%d used)",
                           len(ended), len(self._job_failures), limit)
            return
        if self._job_book.active_count() == 0:
            self._fail_outstanding(
                f"every batch job of {self.run_name} has ended, so no worker is left to run "
                "calls.\n" + "\n".join(self._job_failures) +
                f"\nJob scripts and logs of this run: {self.log_dir}"
            )

    def _forget_jobs(self, ended: list[BatchJob]) -> None:
        """Drop ended jobs from the cluster, so that the policy submits replacements."""
        cluster, adaptive = self._cluster, self._adaptive

        def forget() -> None:
            for job in ended:
                current = cluster.workers.get(job.name)
                if current is not None and getattr(current, "job_id", None) != job.job_id:
                    continue  # dask already re-created it under the same name
                cluster.workers.pop(job.name, None)
                cluster.worker_spec.pop(job.name, None)
                if adaptive is not None:
                    adaptive.forget_job(job.name)

        cluster.loop.add_callback(forget)

    def _stop_policy(self) -> None:
        adaptive = self._adaptive
        if adaptive is not None:
            self._cluster.loop.add_callback(adaptive.stop, "run failed")

    def _check_rejections(self) -> None:
        """Fail the run when the batch system refuses a submission made after the start."""
        rejections = self._job_book.rejections()
        if len(rejections) > self._rejections_seen and self._fatal_error is None:
            self._rejections_seen = len(rejections)
            self._stop_policy()
            self._fail_outstanding(
                f"{self.scheduler_title} refused a job of {self.run_name}:\n"
                + "\n".join(dict.fromkeys(rejections))
                + f"\nJob scripts of this run: {self.log_dir}"
            )

    def _scaling_status(self) -> ScalingStatus:
        status = super()._scaling_status()
        status.adaptive = self.scaling.adaptive
        status.resubmissions = min(len(self._job_failures), self.scaling.max_resubmissions)
        status.job_ids = self.job_ids()
        status.pending_reasons = self.pending_reasons()
        if self._adaptive is not None:
            self._adaptive.report_into(status)
        return status

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

    def _progress_note(self) -> str | None:
        """For a progress bar: how many jobs wait, and why (None when none waits)."""
        counts: dict[str, int] = {}
        for text in self.pending_reasons().values():
            counts[text] = counts.get(text, 0) + 1
        if not counts:
            return None
        return "; ".join(
            f"{count} job{'s' if count > 1 else ''} {text}" for text, count in counts.items()
        )

    def _describe_ended_job(self, job: BatchJob) -> str:
        when = ("after its workers had connected" if job.ever_connected
                else "before its worker connected to the scheduler")
        state = "left the queue" if job.state == "gone" else f"ended ({job.state})"
        return (
            f"{self.scheduler_title} job {job.job_id} ({job.name}) {state} {when}.\n"
            + self._log_tail(job.job_id)
        )

    def _log_tail(self, job_id: str) -> str:
        """The last lines of every log file of the job in the run's log directory."""
        pattern = re.compile(rf"(?<![0-9]){re.escape(job_id)}(?![0-9])")
        paths = sorted(
            path for path in self.log_dir.iterdir()
            if path.is_file() and path.suffix != ".sh"
            and pattern.search(path.name.replace(self.run_name, ""))
        )
        if not paths:
            return f"No log of job {job_id} in {self.log_dir}."
        parts = []
        for path in paths:
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            body = "\n".join(f"    {line}" for line in lines) if lines else "    (empty)"
            parts.append(f"Last lines of {path}:\n{body}")
        return "\n".join(parts)

    def _fail_outstanding(self, message: str,
                          error_class: type[Exception] = JobFailedError) -> None:
        """Fail every outstanding call, and every later submit, with ``error_class(message)``."""
        self._fatal_error = message
        self._fatal_error_class = error_class
        failed = 0
        for future in self._outstanding():
            failed += _set_exception(future, error_class(message))
        logger.error("%s (%d outstanding calls failed)", message, failed)

    def _check_open(self) -> None:
        super()._check_open()
        if getattr(self, "_fatal_error", None) is not None:
            raise self._fatal_error_class(self._fatal_error)

    # -- closing ----------------------------------------------------------------------------------

    def cancel_jobs_now(self) -> None:
        """Cancel every job of this executor with one command, without the event loop.

        Used by the SIGTERM handler, and after closing as a safety net. Jobs still being
        submitted are cancelled as soon as their submission returns.
        """
        self._job_book.begin_closing()
        self._job_book.cancel(self.cluster_class.job_cls.cancel_command)
        if not self._job_book.wait_for_in_flight(timeout=10):
            logger.warning("submissions of %s still running while cancelling", self.run_name)

    def _close_cluster(self) -> None:
        book = getattr(self, "_job_book", None)
        if book is not None:
            book.begin_closing()
        watcher = getattr(self, "_job_watcher", None)
        if watcher is not None:
            watcher.stop()
        try:
            super()._close_cluster()
        finally:
            if book is not None:
                # Whatever closing the cluster did or failed to do, no job stays behind.
                self.cancel_jobs_now()
            cleanup.unregister(self)


def _set_exception(future: Future, error: BaseException) -> bool:
    if future.done():
        return False
    try:
        future.set_exception(error)
    except Exception:  # completed by another thread in between
        return False
    return True


class _JobWatcher:
    """A daemon thread that follows the executor's jobs (holding only a weak reference)."""

    def __init__(self, executor: JobQueueExecutor) -> None:
        self._executor = weakref.ref(executor)
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"futures_hpc-jobs-{executor.run_name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        query_interval = FIRST_QUERY_INTERVAL_SECONDS
        next_query = time.monotonic() + query_interval
        watched: set[str] = set()
        while not self._stopped.wait(WATCH_INTERVAL_SECONDS):
            executor = self._executor()
            if executor is None:
                return
            try:
                unconnected = {job.job_id for job in executor._job_book.jobs()
                               if not job.connected and not job.ended}
                if unconnected - watched:  # a new job, or a worker just left: look soon
                    query_interval = FIRST_QUERY_INTERVAL_SECONDS
                    next_query = min(next_query, time.monotonic() + query_interval)
                watched = unconnected
                if executor._watch_jobs(query_due=time.monotonic() >= next_query):
                    next_query = time.monotonic() + query_interval
                    query_interval = min(query_interval * 1.5, MAX_QUERY_INTERVAL_SECONDS)
            except Exception:  # the watcher must survive anything, or failures would hang
                logger.exception("watching the jobs of %s failed", executor.run_name)
            del executor

    def stop(self) -> None:
        """Stop the thread (waits briefly unless called from it)."""
        self._stopped.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


# -- SLURM ---------------------------------------------------------------------------------------

#: SLURM states in which a job may still run a worker.
SLURM_ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
    "SUSPENDED", "STOPPED", "SIGNALING", "RESV_DEL_HOLD",
})


#: SLURM reasons of a pending job that waiting cannot clear: the request exceeds what the
#: partition or its nodes can give, names something invalid or not allowed, or depends on a job
#: that failed (squeue(1), "JOB REASON CODES"; https://slurm.schedmd.com/job_reason_codes.html).
SLURM_REASONS_THAT_NEVER_CLEAR = frozenset({
    "PartitionConfig",           # more cores, memory or nodes than the partition's nodes have
    "PartitionNodeLimit",        # more or fewer nodes than the partition allows a job
    "PartitionTimeLimit",        # a walltime above the partition's MaxTime
    "MaxMemPerLimit",            # more memory per CPU or node than the partition allows
    "BadConstraints",            # features no node has
    "InvalidAccount", "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed",
    "DependencyNeverSatisfied",  # a job it depends on ended in a way that fails the condition
    "ReservationInvalid", "ReservationDeleted",
})

#: Limits on the job alone also never clear: per-job and per-node maximums of an association or
#: QOS (``QOSMaxCpuPerJobLimit``, ``AssocMaxWallDurationPerJobLimit``, ``QOSMaxMemoryPerNode``...)
#: and QOS minimums (``QOSMinCpuNotSatisfied``, ``QOSMinMemory``...). Aggregate limits
#: (``*Grp*``, ``*PerUser*``, ``*PerAccount``, job counts such as ``AssocMaxJobsLimit``) clear as
#: other jobs end, and so do ``Priority``, ``Resources``, ``BeginTime``, ``Dependency``, holds
#: and nodes or partitions that are down: those keep waiting (``start_timeout`` bounds them).
_SLURM_PER_JOB_LIMIT = re.compile(r"^(?:Assoc|QOS)Max\w*Per(?:Job|Node)(?:Limit)?$|^QOSMin\w+$")


def slurm_reason_never_clears(reason: str | None) -> bool:
    """Whether a pending SLURM job with this reason can never start as it is.

    Parameters
    ----------
    reason : str or None
        squeue's reason (``%r``), e.g. ``"PartitionConfig"`` or ``"ReqNodeNotAvail,
        UnavailableNodes:n1"``; only its code (up to the first comma or space) counts.

    """
    if not reason:
        return False
    code = re.split(r"[,\s]", reason.strip(), maxsplit=1)[0]
    return code in SLURM_REASONS_THAT_NEVER_CLEAR or bool(_SLURM_PER_JOB_LIMIT.match(code))


class SLURMExecutor(JobQueueExecutor):
    """Executor whose workers are SLURM jobs (``dask_jobqueue.SLURMCluster``).

    ``cores`` -> ``--cpus-per-task``, ``memory`` -> ``--mem``, ``walltime`` -> ``-t``,
    ``queue`` -> ``-p``, ``account`` -> ``-A``, ``job_extra`` -> more ``#SBATCH`` lines. Any other
    ``SLURMCluster`` argument (``job_mem``, ``interface``, ``scheduler_options``, ...) passes
    through.
    """

    backend_name = "slurm"
    backend_option_names = _jobqueue_parameters(SLURMJob) - {"project"}
    cluster_class = _SLURMCluster
    scheduler_title = "SLURM"
    required_commands = ("sbatch", "squeue", "scancel")

    def _scheduler_options(self, cores: int, memory_request: bool) -> dict[str, Any]:
        options = super()._scheduler_options(cores, memory_request)
        if not memory_request:
            options["job_directives_skip"] = ["--mem"]
        return options

    def _query_job_states(self, job_ids: list[str]) -> dict[str, QueueState] | None:
        result = _run_command(
            ["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}",
             "--format=%i %T %r"]
        )
        if result is None:
            return None
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:  # none of them is known any more
                return dict.fromkeys(job_ids, QueueState("gone"))
            logger.debug("squeue failed: %s", result.stderr.strip())
            return None
        listed = {}
        for line in result.stdout.splitlines():
            job_id, state, reason = ([*line.split(maxsplit=2), "", ""])[:3]
            if job_id:
                reason = None if reason.strip() in ("", "None") else reason.strip()
                never_starts = state == "PENDING" and slurm_reason_never_clears(reason)
                listed[job_id] = QueueState(state, reason, never_starts)
        return {job_id: listed.get(job_id, QueueState("gone")) for job_id in job_ids}

    @staticmethod
    def _state_is_active(state: str) -> bool:
        return state.split()[0].rstrip("+") in SLURM_ACTIVE_STATES


# -- PBS -----------------------------------------------------------------------------------------

#: PBS/Torque state letters of jobs that may still run a worker (C, E, F, X: over).
PBS_ACTIVE_STATES = frozenset("QRHWTSBUM")

#: How PBS Pro / OpenPBS's scheduler starts the comment of a job it will never run.
PBS_NEVER_RUN_COMMENT = "Can Never Run"


def pbs_comment_never_clears(comment: str | None) -> bool:
    """Whether a PBS job's comment says it can never run (PBS Pro, OpenPBS).

    Their scheduler comments a queued job ``"Not Running: <why>"`` while it waits and
    ``"Can Never Run: <why>"`` when no configured resource could ever satisfy it. Torque and
    SLURM's PBS wrappers give no such comment.
    """
    return bool(comment) and comment.strip().startswith(PBS_NEVER_RUN_COMMENT)


def parse_qstat_full(text: str) -> dict[str, dict[str, str]]:
    """``qstat -f`` output as job number -> attribute -> value (continuation lines joined)."""
    jobs: dict[str, dict[str, str]] = {}
    attributes: dict[str, str] | None = None
    last_name = None
    for line in text.splitlines():
        header = re.match(r"^Job Id:\s*(\d+)", line)
        attribute = re.match(r"^\s+([\w.]+) = (.*)$", line)
        if header:
            attributes = jobs.setdefault(header.group(1), {})
            last_name = None
        elif attributes is not None and attribute:
            last_name = attribute.group(1)
            attributes[last_name] = attribute.group(2).strip()
        elif attributes is not None and last_name and line[:1].isspace() and line.strip():
            attributes[last_name] += line.strip()  # PBS Pro wraps long values
    return jobs


class PBSExecutor(JobQueueExecutor):
    """Executor whose workers are PBS (PBS Pro, OpenPBS, Torque) jobs (``PBSCluster``).

    ``cores`` and ``memory`` -> ``-l select=1:ncpus=N:mem=M``, ``walltime`` ->
    ``-l walltime=``, ``queue`` -> ``-q``, ``account`` -> ``-A``, ``job_extra`` -> more ``#PBS``
    lines. ``resource_spec`` replaces the ``select`` line; other ``PBSCluster`` arguments pass
    through.
    """

    backend_name = "pbs"
    backend_option_names = _jobqueue_parameters(PBSJob) - {"project"}
    cluster_class = _PBSCluster
    scheduler_title = "PBS"
    required_commands = ("qsub", "qstat", "qdel")

    def _scheduler_options(self, cores: int, memory_request: bool) -> dict[str, Any]:
        options = super()._scheduler_options(cores, memory_request)
        if not memory_request:
            options["resource_spec"] = f"select=1:ncpus={cores}"
        return options

    def _query_job_states(self, job_ids: list[str]) -> dict[str, QueueState] | None:
        result = _run_command(["qstat", "-f", *job_ids])
        if result is None:
            return None
        unknown = (result.returncode == 153 or "Unknown Job" in result.stderr
                   or "has finished" in result.stderr)
        if result.returncode != 0 and not unknown:
            logger.debug("qstat failed: %s", result.stderr.strip())
            return None
        listed = {}
        for job_id, attributes in parse_qstat_full(result.stdout).items():
            state = attributes.get("job_state", "gone")
            comment = attributes.get("comment") or None
            never_starts = state in ("Q", "H") and pbs_comment_never_clears(comment)
            listed[job_id] = QueueState(state, comment, never_starts)
        return {job_id: listed.get(job_id, QueueState("gone")) for job_id in job_ids}

    @staticmethod
    def _state_is_active(state: str) -> bool:
        return state in PBS_ACTIVE_STATES


# -- Grid Engine ---------------------------------------------------------------------------------


class SGEExecutor(JobQueueExecutor):
    """Executor whose workers are Grid Engine jobs (``dask_jobqueue.SGECluster``).

    ``cores`` -> ``-pe <parallel_environment> N`` (when above 1), ``memory`` ->
    ``-l <memory_resource>=<memory per slot>`` (Grid Engine books consumables per slot),
    ``walltime`` -> ``-l h_rt=``, ``queue`` -> ``-q``, ``account`` -> ``-A``, ``job_extra`` ->
    more ``#$`` lines. ``resource_spec`` replaces the memory request; ``project`` gives ``-P``;
    other ``SGECluster`` arguments pass through.

    Other Parameters
    ----------------
    parallel_environment : str
        The parallel environment for multi-core jobs (default ``"smp"``; ``qconf -spl`` lists
        them).
    memory_resource : str
        The consumable that books memory (default ``"mem_free"``). Avoid ``h_vmem``: Grid
        Engine enforces it on virtual memory, which a dask worker uses far more of than RAM.

    """

    backend_name = "sge"
    own_option_names = frozenset({"parallel_environment", "memory_resource"})
    backend_option_names = _jobqueue_parameters(SGEJob) | own_option_names
    cluster_class = _SGECluster
    scheduler_title = "Grid Engine"
    required_commands = ("qsub", "qstat", "qdel")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Missing commands, or SGE_ROOT unset (Grid Engine's commands need it)."""
        reason = super().unavailable_reason()
        if reason is None and not os.environ.get("SGE_ROOT"):
            reason = (
                "the 'sge' backend needs SGE_ROOT (and SGE_CELL) set as Grid Engine's "
                "settings.sh sets them; SGE_ROOT is not set"
            )
        return reason

    def _validate_options(self) -> None:
        super()._validate_options()
        for name in self.own_option_names:
            value = self.backend_options.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise OptionError(f"{name}={value!r} is not allowed; it must be a non-empty name")

    def _scheduler_options(self, cores: int, memory_request: bool) -> dict[str, Any]:
        directives = []
        if cores > 1:
            environment = self.backend_options.get("parallel_environment") or "smp"
            directives.append(f"-pe {environment} {cores}")
        memory_resource = self.backend_options.get("memory_resource") or "mem_free"
        if self.resources.memory_bytes and "resource_spec" not in self.backend_options:
            per_slot_mebibytes = math.ceil(self.resources.memory_bytes / cores / 2**20)
            directives.append(f"-l {memory_resource}={per_slot_mebibytes}M")
        if self.resources.account:
            directives.append(f"-A {self.resources.account}")
        return {"job_extra_directives": directives + list(self.resources.job_extra)}

    def _create_cluster(self) -> JobQueueCluster:
        #: Job id -> Grid Engine's verification text for the waiting jobs it says cannot run
        #: (None: verified, it can run).
        self._verifications: dict[str, str | None] = {}
        return super()._create_cluster()

    def _query_job_states(self, job_ids: list[str]) -> dict[str, QueueState] | None:
        # qstat without arguments lists the user's pending and running jobs; ended ones vanish.
        result = _run_command(["qstat"])
        if result is None or result.returncode != 0:
            return None
        listed = {}
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[0].isdigit():
                listed[fields[0]] = fields[4]
        # qw (waiting), hqw (held), Rqw (rescheduled)...; Eqw is an error, not a wait.
        waiting = [job_id for job_id in job_ids
                   if listed.get(job_id, "").endswith("qw") and "E" not in listed[job_id]]
        reasons = self._scheduling_info(waiting) if waiting else {}
        states = {}
        for job_id in job_ids:
            state = listed.get(job_id, "gone")
            verdict = self._verify(job_id) if job_id in waiting and "h" not in state else None
            states[job_id] = QueueState(state, verdict or reasons.get(job_id), verdict is not None)
        return states

    def _scheduling_info(self, job_ids: list[str]) -> dict[str, str]:
        """The scheduler's "scheduling info" of waiting jobs (``qstat -j``), by job id.

        Grid Engine gives it only when the scheduler's ``schedd_job_info`` is on.
        """
        result = _run_command(["qstat", "-j", ",".join(job_ids)])
        if result is None or result.returncode != 0:
            return {}
        reasons: dict[str, list[str]] = {}
        job_id, in_info = None, False
        for line in result.stdout.splitlines():
            key, colon, value = line.partition(":")
            if line[:1].isspace() and in_info and job_id is not None:
                reasons[job_id].append(line.strip())
                continue
            in_info = False
            if colon and key.strip() == "job_number":
                job_id = value.strip()
            elif colon and key.strip() == "scheduling info" and job_id is not None:
                in_info = True
                reasons[job_id] = [value.strip()]
        return {
            job_id: "; ".join(line for line in lines if line)
            for job_id, lines in reasons.items()
            if lines and not lines[0].startswith("(Collecting of scheduler job information")
        }

    def _verify(self, job_id: str) -> str | None:
        """Grid Engine's word that a waiting job can never run, or None if it can (or is unsure).

        ``qalter -w v`` schedules the job on an empty cluster (every slot and consumable free,
        load ignored) without changing it; "no suitable queues" means no queue, host or
        parallel environment could ever take it as requested. Asked once per job.
        """
        if job_id not in self._verifications and shutil.which("qalter") is None:
            self._verifications[job_id] = None  # cannot ask: waiting stays bounded by start_timeout
        if job_id not in self._verifications:
            result = _run_command(["qalter", "-w", "v", job_id])
            if result is None:
                return None  # ask again next time
            output = "\n".join(text.strip() for text in (result.stdout, result.stderr)
                               if text.strip())
            cannot_run = "no suitable queues" in output
            self._verifications[job_id] = (
                "; ".join(line.strip() for line in output.splitlines() if line.strip())
                if cannot_run else None
            )
        return self._verifications[job_id]

    @staticmethod
    def _state_is_active(state: str) -> bool:
        # E: error (the job can never start), d: being deleted; anything else may still run.
        return state != "gone" and "E" not in state and "d" not in state
