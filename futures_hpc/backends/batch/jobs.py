"""What a batch executor knows of its jobs: queue states, job records, the thread-safe book."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .commands import cancel_job_ids


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
        ``slurm.slurm_reason_never_clears``, ``pbs.pbs_comment_never_clears`` and
        ``sge.SGESystem._verify``).

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
    array_id : str or None
        The job array the job is an element of (``job_array=True``): ``job_id`` is then the
        element's id (SLURM ``1234_3``, Grid Engine ``1234.3``) and ``array_id`` the array's.

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
    array_id: str | None = None


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
        self._rejected_names: list[str] = []  # the job (worker_spec) name of each rejection
        self._in_flight = 0
        self.closing = False

    # submissions (event loop thread)
    def submission_started(self) -> None:
        """Count a submission command that has not answered yet."""
        with self._condition:
            self._in_flight += 1

    def submission_finished(self, name: str, job_id: str | None, rejection: str | None,
                            cancel_command: str, array_id: str | None = None) -> None:
        """Record a submission's outcome; cancel the job at once if the executor is closing.

        The submission counts as in flight until then, so that whoever waits for the
        submissions before the process ends (the SIGTERM handler) also waits for that cancel.
        ``array_id``: the job array whose element ``job_id`` is.
        """
        with self._condition:
            if job_id is not None:
                self._jobs[job_id] = BatchJob(name, job_id, time.monotonic(), array_id=array_id)
            else:
                self._rejections.append(rejection or "no job id")
                self._rejected_names.append(name)
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

    def rejected_jobs(self) -> list[tuple[str, str]]:
        """``(job name, message)`` of each refused submission, in order."""
        with self._condition:
            return list(zip(self._rejected_names, self._rejections, strict=True))

    # cancelling (any thread)
    def begin_closing(self) -> None:
        """From now on every job is cancelled, including those still being submitted."""
        with self._condition:
            self.closing = True

    def cancel(self, cancel_command: str, job_ids: list[str] | None = None) -> None:
        """Cancel the given jobs (default: all) not cancelled yet, with one command.

        A job array whose every element is being cancelled now, or was already, or has ended,
        is named by the array's id (one ``scancel 1234`` rather than each ``1234_N``).
        """
        with self._condition:
            jobs = list(self._jobs.values()) if job_ids is None else [
                self._jobs[job_id] for job_id in job_ids if job_id in self._jobs
            ]
            claimed = [job for job in jobs if not job.cancel_sent and not job.ended]
            for job in claimed:
                job.cancel_sent = True
            whole_arrays = {job.array_id for job in claimed if job.array_id} - {
                job.array_id for job in self._jobs.values()
                if job.array_id and not (job.cancel_sent or job.ended)
            }
        ids = list(dict.fromkeys(
            job.array_id if job.array_id in whole_arrays else job.job_id for job in claimed
        ))
        if not cancel_job_ids(cancel_command, ids):  # type: ignore[arg-type]
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
