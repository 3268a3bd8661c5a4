"""Watching a batch executor's jobs: the watcher thread and what it decides.

A daemon thread (:class:`JobWatcher`) looks every second at which jobs have a connected worker
and, for those without one, asks the batch system (through the system module's
``query_job_states``) how they are. :class:`JobWatching`, a base of the batch executor, holds
the decisions: log why a job waits, fail the run when a job can never start or no worker comes
within ``start_timeout``, report and replace jobs that ended, fail the calls when none is left.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import JobFailedError, JobSubmissionError
from .jobs import BatchJob, JobBook, QueueState

if TYPE_CHECKING:
    from ...scaling import FairShareAdaptive, ScalingOptions
    from .system import BatchSystem

logger = logging.getLogger("futures_hpc")

#: Seconds between the watcher's looks at the connected workers.
WATCH_INTERVAL_SECONDS = 1.0
#: First and longest interval between queue-state queries for jobs whose workers are missing
#: (the first query waits this long after a job is submitted or loses its worker, so that the
#: query does not compete with starting workers for the CPU).
FIRST_QUERY_INTERVAL_SECONDS = 2.0
MAX_QUERY_INTERVAL_SECONDS = 30.0
#: Lines of each job log quoted in an error.
LOG_TAIL_LINES = 20


class JobWatching:
    """The batch executor's decisions on its jobs, taken in the watcher thread.

    A base of :class:`~futures_hpc.backends.batch.executor.JobQueueExecutor`; the attributes
    below are the executor's.
    """

    executor: Any  # the HPCExecutor (its pools, for a pool's refused job)
    system: BatchSystem
    run_name: str
    log_dir: Path
    scaling: ScalingOptions
    _job_book: JobBook
    _fatal_error: str | None
    _fatal_error_class: type[Exception]
    _first_worker_connected: bool
    _job_failures: list[str]
    _adaptive: FairShareAdaptive | None
    _rejections_seen: int
    _cluster: Any
    _client: Any

    if TYPE_CHECKING:  # provided by the executor (HPCExecutor for _outstanding)
        def _outstanding(self) -> list[Future]: ...
        def _query_job_states(self, job_ids: list[str]) -> dict[str, QueueState] | None: ...
        def _state_is_active(self, state: str) -> bool: ...
        def job_ids(self) -> list[str]: ...  # noqa: D102

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
            states, doubted = self._doubt_never_starting(states, self._started_kinds(unconnected))
        self._log_changed_reasons(unconnected, states, doubted)
        ended = self._job_book.record_states(states, self._state_is_active)
        never_starting = [job for job in unconnected
                          if job.job_id in states and states[job.job_id].never_starts]
        never_starting = self._fail_pools_never_starting(never_starting, states)
        if never_starting:
            self._fail_never_starting(never_starting, states)
        elif ended and not self._job_book.closing:
            self._handle_ended_jobs(ended)
        return True

    # -- pools (ex.with_resources): jobs of other shapes -------------------------------------------

    def _pool_of(self, job_name: str) -> Any:
        """The pool (:class:`~futures_hpc.pools.ResourcePool`) of a job; None: the executor's."""
        pools = self.executor._pools
        return None if pools is None else pools.owner_of(job_name)

    def _started_kinds(self, jobs: list[BatchJob]) -> dict[str, bool]:
        """For each of ``jobs``' ids: whether a job of its script (its pool's) ever connected."""
        connected = {id(self._pool_of(job.name)) for job in self._job_book.jobs()
                     if job.ever_connected}
        return {job.job_id: id(self._pool_of(job.name)) in connected for job in jobs}

    def _fail_pools_never_starting(self, jobs: list[BatchJob],
                                   states: dict[str, QueueState]) -> list[BatchJob]:
        """Fail the pools whose jobs can never start (cancel them); return the executor's own.

        A pool asking for more than a node has fails alone: the executor and the other pools go
        on.
        """
        own = []
        for job in jobs:
            pool = self._pool_of(job.name)
            if pool is None:
                own.append(job)
                continue
            self._job_book.mark_retired([job.job_id])
            self._job_book.cancel(self.system.cancel_command, [job.job_id])
            if pool.failure is None:
                pool.fail(JobSubmissionError(
                    f"{self.system.title} accepted the job of {pool.name} "
                    f"({pool.shape.describe()}) of {self.run_name} but says it can never start "
                    f"as requested:\n  {self._describe_waiting_job(job, states[job.job_id])}\n"
                    "Ask for what a node of the queue can give; the job was cancelled."))
        return own

    # -- jobs that wait ---------------------------------------------------------------------------

    def _describe_waiting_job(self, job: BatchJob, queue_state: QueueState | None = None) -> str:
        """``SLURM job 42 (fhpc-x-0): PENDING, reason: Priority`` and the job script's path."""
        state = queue_state.state if queue_state is not None else job.state
        reason = queue_state.reason if queue_state is not None else job.reason
        because = f", reason: {reason}" if reason else ""
        return (f"{self.system.title} job {job.job_id} ({job.name}): {state}{because}; "
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
            f"{self.system.title} accepted the jobs of {self.run_name} but says they can "
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
    def _doubt_never_starting(states: dict[str, QueueState],
                              started: dict[str, bool] | None = None,
                              ) -> tuple[dict[str, QueueState], set[str]]:
        """Keep waiting for jobs said never to start once a job of the same script has started.

        The request evidently can start here, so the reason must be passing (nodes drained, a
        limit lowered since): such jobs wait like others. ``started`` says, by job id, whether
        a job of the same script has (pools' jobs have scripts of their own); without it, all
        have. Returns the states without the verdict and the ids of the jobs doubted.
        """
        doubted = {job_id for job_id, queue_state in states.items() if queue_state.never_starts
                   and (started is None or started.get(job_id, True))}
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
            f"cancelled. {self.system.title} said:\n{described}\n"
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
        book.cancel(self.system.cancel_command)
        self._fail_outstanding(message, JobSubmissionError)

    def _fail_late_calls(self) -> None:
        """Fail calls submitted while the run was failing (they passed the check just before)."""
        error_class = self._fatal_error_class
        for future in self._outstanding():
            _set_exception(future, error_class(self._fatal_error))

    def _handle_ended_jobs(self, ended: list[BatchJob]) -> None:
        """Report jobs that ended unexpectedly and replace them, up to ``max_resubmissions``.

        Beyond that, the outstanding calls fail with :class:`JobFailedError` (ids, states, log
        tails), and so does the next ``submit``/``map``. The jobs of a pool
        (``ex.with_resources``) count for that pool alone: a pool whose jobs keep dying fails
        its own calls, and the executor and its other pools go on.
        """
        own: list[BatchJob] = []
        by_pool: dict[int, tuple[Any, dict[str, BatchJob]]] = {}
        for job in ended:
            description = self._describe_ended_job(job)
            logger.warning("%s", description)
            pool = self._pool_of(job.name)
            if pool is None:
                self._job_failures.append(description)
                own.append(job)
            else:
                by_pool.setdefault(id(pool), (pool, {}))[1][description] = job
        for pool, jobs in by_pool.values():
            self._handle_ended_pool_jobs(pool, jobs)
        if own:
            self._handle_ended_own_jobs(own)

    def _handle_ended_pool_jobs(self, pool: Any, ended: dict[str, BatchJob]) -> None:
        """Count a pool's ended jobs (by description) for it alone; replace them or fail it."""
        self._forget_jobs(list(ended.values()), pool.adaptive)
        limit = self.scaling.max_resubmissions
        goes_on = [pool.count_job_failure(description, limit, "batch jobs",
                                          f"\nJob scripts and logs of this run: {self.log_dir}")
                   for description in ended]
        if all(goes_on):
            logger.warning("replacing %d job(s) of %s (%d of max_resubmissions=%d used)",
                           len(ended), pool.name, len(pool.job_failures), limit)

    def _handle_ended_own_jobs(self, ended: list[BatchJob]) -> None:
        """:meth:`_handle_ended_jobs` for the executor's own jobs."""
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
            self._forget_jobs(ended, self._adaptive)
            logger.warning("replacing %d job(s) (%d of max_resubmissions=%d used)",
                           len(ended), len(self._job_failures), limit)
            return
        if self._job_book.active_count() == 0:
            self._fail_outstanding(
                f"every batch job of {self.run_name} has ended, so no worker is left to run "
                "calls.\n" + "\n".join(self._job_failures) +
                f"\nJob scripts and logs of this run: {self.log_dir}"
            )

    def _forget_jobs(self, ended: list[BatchJob], adaptive: FairShareAdaptive | None) -> None:
        """Drop ended jobs from the cluster, so that their policy submits replacements."""
        cluster = self._cluster

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
            # No reason argument: distributed before 2024.6 has ``stop()`` without one.
            self._cluster.loop.add_callback(adaptive.stop)

    def _check_rejections(self) -> None:
        """Fail the run when the batch system refuses a submission made after the start.

        A refused job of a pool (``ex.with_resources``) fails that pool only: its calls, and
        its later ones, raise :class:`JobSubmissionError`; the executor and other pools go on.
        """
        rejected = self._job_book.rejected_jobs()
        if len(rejected) <= self._rejections_seen or self._fatal_error is not None:
            return
        new, self._rejections_seen = rejected[self._rejections_seen:], len(rejected)
        own = []
        for name, message in new:
            pool = self._pool_of(name)
            if pool is None:
                own.append(message)
            elif pool.failure is None:
                pool.fail(JobSubmissionError(
                    f"{self.system.title} refused a job of {pool.name} "
                    f"({pool.shape.describe()}) of {self.run_name}:\n{message}\n"
                    f"Job script: {self.log_dir / name}.sh"))
        if own:
            self._stop_policy()
            self._fail_outstanding(
                f"{self.system.title} refused a job of {self.run_name}:\n"
                + "\n".join(dict.fromkeys(own))
                + f"\nJob scripts of this run: {self.log_dir}"
            )

    def _describe_ended_job(self, job: BatchJob) -> str:
        when = ("after its workers had connected" if job.ever_connected
                else "before its worker connected to the scheduler")
        state = "left the queue" if job.state == "gone" else f"ended ({job.state})"
        return (
            f"{self.system.title} job {job.job_id} ({job.name}) {state} {when}.\n"
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


def _set_exception(future: Future, error: BaseException) -> bool:
    if future.done():
        return False
    try:
        future.set_exception(error)
    except Exception:  # completed by another thread in between
        return False
    return True



class JobWatcher:
    """A daemon thread that follows the executor's jobs (holding only a weak reference)."""

    def __init__(self, executor: JobWatching) -> None:
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
