"""The fair-share policy as a pure function: :func:`decide` over a snapshot of the cluster.

:class:`ClusterSnapshot` holds what the scheduler shows (jobs, their workers, the queued work),
:class:`ScalingLimits` what the executor allows; :func:`decide` returns the
:class:`ScalingDecision`: jobs to submit, whole jobs to retire, jobs to drain before their
walltime. Nothing here reads a clock or a cluster, so every rule is tested on plain values
(``tests/test_scaling.py``); :class:`~futures_hpc.scaling.FairShareAdaptive` takes the snapshots
and carries the decisions out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Smallest margin, in seconds, between draining a job and the end of its walltime.
MINIMUM_WALLTIME_MARGIN = 10.0
#: Estimated seconds between a job starting and its worker connecting, until one is observed.
DEFAULT_STARTUP_SECONDS = 5.0


@dataclass(frozen=True)
class ScalingLimits:
    """What the policy may do, in jobs.

    Attributes
    ----------
    min_jobs, max_jobs : int
        The fewest and most jobs (draining jobs do not count).
    max_pending_jobs : int
        The most jobs without a connected worker at once.
    idle_timeout : float
        Seconds a job's workers must all be idle before it is released.
    processes_per_job : int
        Worker processes per job.
    walltime : float or None
        Seconds a job may run; None for no limit.
    call_time : float or None
        Seconds each call needs (a pool's ``call_time``): a job with less time left takes
        no new call (it is drained that long before its walltime).
    pending_idle_timeout : float or None
        Seconds a job that has not started yet may wait without work before it is released;
        None: ``idle_timeout``.

    """

    min_jobs: int
    max_jobs: int
    max_pending_jobs: int
    idle_timeout: float
    processes_per_job: int = 1
    walltime: float | None = None
    call_time: float | None = None
    pending_idle_timeout: float | None = None


@dataclass(frozen=True)
class JobSnapshot:
    """One job as the policy sees it.

    Attributes
    ----------
    name : str
        The job's name in the cluster's ``worker_spec``.
    submitted_at : float
        When it was asked for (seconds, same clock as the snapshot).
    connected_workers : int
        Its worker processes connected now (0: pending in the batch queue).
    busy_workers : int
        Its connected workers that have a task to run.
    idle_since : float or None
        When its last busy worker became idle (or connected); None while one is busy.
    started_at : float or None
        When its first worker connected.
    draining : bool
        Its workers were paused before the walltime.

    """

    name: str
    submitted_at: float
    connected_workers: int = 0
    busy_workers: int = 0
    idle_since: float | None = None
    started_at: float | None = None
    draining: bool = False

    @property
    def pending(self) -> bool:
        """No worker of the job has connected."""
        return self.started_at is None


@dataclass(frozen=True)
class ClusterSnapshot:
    """The cluster at one moment.

    Attributes
    ----------
    now : float
        The time of the snapshot.
    wanted_workers : int
        Workers the queued work asks for.
    jobs : tuple of JobSnapshot
        Every job the cluster holds.
    longest_call : float
        The longest task duration seen so far (seconds).
    startup : float
        The longest time seen between submitting a job and its worker connecting.

    """

    now: float
    wanted_workers: int
    jobs: tuple[JobSnapshot, ...] = ()
    longest_call: float = 0.0
    startup: float = DEFAULT_STARTUP_SECONDS


@dataclass(frozen=True)
class ScalingDecision:
    """What the policy asks for.

    Attributes
    ----------
    submit : int
        New jobs to submit.
    retire : tuple of str
        Jobs to release (all their workers are idle, or they never started).
    drain : tuple of str
        Jobs whose workers are to be paused because their walltime is near.

    """

    submit: int = 0
    retire: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()

    @property
    def changes_anything(self) -> bool:
        """Whether the decision asks for anything."""
        return bool(self.submit or self.retire or self.drain)


def wanted_workers(adaptive_target: int, runnable_tasks: int, threads_per_worker: int) -> int:
    """Workers the queued work asks for: dask's target, capped by the runnable tasks.

    Parameters
    ----------
    adaptive_target : int
        ``Scheduler.adaptive_target()``.
    runnable_tasks : int
        Tasks queued, unrunnable (no worker) or processing.
    threads_per_worker : int
        Threads of one worker process.

    """
    if runnable_tasks <= 0:
        return 0
    by_tasks = math.ceil(runnable_tasks / max(1, threads_per_worker))
    return max(1, min(adaptive_target, by_tasks))


def walltime_margin(longest_call: float, startup: float) -> float:
    """Seconds before the walltime at which a job is drained.

    Time for the calls a paused worker still holds to end (the running one and the one dask
    queued behind it: three times the longest call seen, for slack) and for a replacement to
    start.
    """
    return max(MINIMUM_WALLTIME_MARGIN, 3 * longest_call + startup)


def decide(limits: ScalingLimits, snapshot: ClusterSnapshot) -> ScalingDecision:
    """The fair-share policy: which jobs to submit, drain and retire now.

    Parameters
    ----------
    limits : ScalingLimits
        What the policy may do.
    snapshot : ClusterSnapshot
        The cluster now.

    Returns
    -------
    ScalingDecision

    """
    now = snapshot.now
    jobs = snapshot.jobs
    drain: list[str] = []
    if limits.walltime is not None:
        margin = min(walltime_margin(snapshot.longest_call, snapshot.startup),
                     limits.walltime / 2)
        if limits.call_time:  # no call starts on a job that ends before the call would
            margin = max(margin, limits.call_time)
        for job in jobs:
            if (not job.draining and job.started_at is not None
                    and now - job.started_at >= limits.walltime - margin):
                drain.append(job.name)
    draining = {job.name for job in jobs if job.draining} | set(drain)
    # Drained jobs retire as soon as none of their workers runs a task.
    retire = [job.name for job in jobs if job.name in draining and job.busy_workers == 0]

    active = [job for job in jobs if job.name not in draining]
    pending = sum(job.pending for job in active)
    wanted_jobs = math.ceil(snapshot.wanted_workers / max(1, limits.processes_per_job))
    wanted_jobs = min(limits.max_jobs, max(limits.min_jobs, wanted_jobs))

    submit = 0
    if wanted_jobs > len(active):
        room_in_queue = max(0, limits.max_pending_jobs - pending)
        submit = min(wanted_jobs - len(active), room_in_queue)
    elif len(active) > wanted_jobs:
        excess = len(active) - wanted_jobs

        def idle_for(job: JobSnapshot) -> float:
            if job.pending:
                return now - job.submitted_at
            return -1.0 if job.idle_since is None else now - job.idle_since

        pending_timeout = (limits.idle_timeout if limits.pending_idle_timeout is None
                           else limits.pending_idle_timeout)
        candidates = [job for job in active if job.busy_workers == 0 and idle_for(job) >= (
            pending_timeout if job.pending else limits.idle_timeout)]
        # Jobs still in the queue first (nothing runs there), then the longest idle.
        candidates.sort(key=lambda job: (not job.pending, -idle_for(job)))
        retire += [job.name for job in candidates[:excess]]
    return ScalingDecision(submit=submit, retire=tuple(retire), drain=tuple(drain))
