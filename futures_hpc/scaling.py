"""Fair-share adaptive scaling for clusters whose workers are jobs in a shared queue.

The policy is a pure function, :func:`~futures_hpc.scaling_policy.decide` (in
:mod:`futures_hpc.scaling_policy`, whose names this module also exports), over a small snapshot
of the cluster (:class:`ClusterSnapshot`): it says how many jobs to submit, which whole jobs to
retire and which to drain before their walltime. :class:`FairShareAdaptive`, a
:class:`distributed.deploy.Adaptive` usable by any :class:`~distributed.deploy.SpecCluster` whose
scheduler runs in the same process, takes the snapshot from the scheduler every interval and
carries the decision out:

- scale up from the queued work (the scheduler's ``adaptive_target`` capped by the runnable
  tasks), never beyond ``max_workers`` and never with more than ``max_pending_jobs`` jobs
  waiting in the batch queue (submitted, no worker connected yet);
- release a job only when every worker process of it has run nothing for ``idle_timeout``
  seconds (whole jobs only; the idle time is the hysteresis that keeps workers over a short gap).
  By default (``"auto"``) that is as long as a job of the executor took to start, from its
  submission to its worker connecting (:func:`auto_idle_timeout`);
- drain a job before its walltime: its workers are paused (they take no new task and finish the
  running ones), a replacement is submitted at once, and the job is retired once idle.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from distributed.deploy.adaptive import Adaptive
from distributed.diagnostics.plugin import SchedulerPlugin

from . import engine
from .engine import correct_cluster_state, pause_worker
from .errors import OptionError
from .options import check_boolean, check_number, check_whole_number, parse_timeout
from .scaling_policy import (
    DEFAULT_STARTUP_SECONDS,
    MINIMUM_WALLTIME_MARGIN,
    ClusterSnapshot,
    JobSnapshot,
    ScalingDecision,
    ScalingLimits,
    decide,
    walltime_margin,
    wanted_workers,
)
from .worker_closing import until_disconnected

__all__ = [  # the policy's names too, as before the policy had a module of its own
    "AUTO_IDLE_TIMEOUT",
    "AUTO_IDLE_TIMEOUT_RANGE",
    "AUTO_PENDING_IDLE_TIMEOUT",
    "DEFAULT_MAX_PENDING_JOBS",
    "DEFAULT_MAX_RESUBMISSIONS",
    "DEFAULT_STARTUP_SECONDS",
    "MINIMUM_WALLTIME_MARGIN",
    "ClusterSnapshot",
    "FairShareAdaptive",
    "JobSnapshot",
    "PoolScope",
    "ScalingDecision",
    "ScalingLimits",
    "ScalingOptions",
    "ScalingStatus",
    "auto_idle_timeout",
    "check_idle_timeout",
    "describe_idle_timeout",
    "decide",
    "validate_scaling_options",
    "walltime_margin",
    "wanted_workers",
]

logger = logging.getLogger("futures_hpc")

#: The default ``idle_timeout``: as long as a job of the executor took to start
#: (:func:`auto_idle_timeout`).
AUTO_IDLE_TIMEOUT = "auto"
#: The shortest and longest idle time of ``idle_timeout="auto"``, in seconds.
AUTO_IDLE_TIMEOUT_RANGE = (3.0, 600.0)
#: With ``idle_timeout="auto"``, the least time a job that has not started yet is kept without
#: work: a queued job costs nothing until it starts, and its place in the queue is worth keeping
#: for a while (the first jobs are submitted before any call, so that the first calls do not
#: wait for the queue).
AUTO_PENDING_IDLE_TIMEOUT = 60.0
#: Default most jobs waiting in the batch queue at once.
DEFAULT_MAX_PENDING_JOBS = 4
#: Default replacements of failed jobs before the run fails.
DEFAULT_MAX_RESUBMISSIONS = 3
#: Seconds between two looks of the policy at the cluster.
DEFAULT_INTERVAL = 0.5
#: Seconds of queued work per worker that the scale-up aims for (smaller: more workers sooner).
DEFAULT_TARGET_DURATION = 2.0


# -- options ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingOptions:
    """The validated sizing options of a batch executor.

    Attributes
    ----------
    adaptive : bool
        Size from the queued work (True) or hold ``max_jobs`` jobs (False).
    min_workers : int
        Workers kept even without work (rounded up to whole jobs).
    max_workers : int
        The most workers.
    idle_timeout : float or None
        Seconds every worker of a job must be idle before the job is released; None for
        ``"auto"`` (:func:`auto_idle_timeout`).
    max_pending_jobs : int
        The most jobs waiting in the batch queue at once.
    max_resubmissions : int
        Failed jobs replaced before the run fails with ``JobFailedError``.
    start_timeout : float or None
        Seconds a job may wait for its worker while no worker of the executor has connected
        yet; then the run fails with ``JobSubmissionError``. None: wait as long as it takes.

    """

    adaptive: bool = True
    min_workers: int = 0
    max_workers: int = 1
    idle_timeout: float | None = None
    max_pending_jobs: int = DEFAULT_MAX_PENDING_JOBS
    max_resubmissions: int = DEFAULT_MAX_RESUBMISSIONS
    start_timeout: float | None = None


def auto_idle_timeout(startup: float | None) -> float:
    """The idle time after which ``idle_timeout="auto"`` releases a job.

    As long as a job took to start (``startup``: the longest time seen from submitting a job
    to its worker connecting; :data:`~futures_hpc.scaling_policy.DEFAULT_STARTUP_SECONDS` until
    one has), within :data:`AUTO_IDLE_TIMEOUT_RANGE`. This is the break-even rule of renting
    against buying: a job kept idle costs its slots for as long as a new one would take to
    start when work comes back, so over any gap the run pays at most twice what it would have
    paid had it known the gap's length in advance. On a busy queue, where a job waits minutes
    to start, jobs are kept over gaps of minutes; where jobs start in seconds, they are released
    after seconds.
    """
    shortest, longest = AUTO_IDLE_TIMEOUT_RANGE
    seconds = DEFAULT_STARTUP_SECONDS if not startup else startup
    return min(longest, max(shortest, seconds))


def describe_idle_timeout(idle_timeout: float | None) -> str:
    """``idle_timeout`` as the logs show it."""
    if idle_timeout is None:
        return f"{AUTO_IDLE_TIMEOUT} (as long as a job took to start)"
    return f"{idle_timeout:g} s"


def check_idle_timeout(value: Any) -> float | None:
    """``idle_timeout``: seconds > 0, or ``"auto"`` (returned as None)."""
    if value is None or value == AUTO_IDLE_TIMEOUT:
        return None
    if isinstance(value, str):
        raise OptionError(f"idle_timeout={value!r} is not allowed; idle_timeout must be a "
                          f"number of seconds > 0 or {AUTO_IDLE_TIMEOUT!r}")
    return check_number("idle_timeout", value)


def _whole_number(options: Mapping[str, Any], name: str, default: int, smallest: int) -> int:
    value = options.get(name)
    return default if value is None else check_whole_number(name, value, smallest)


def validate_scaling_options(options: Mapping[str, Any], max_workers: int) -> ScalingOptions:
    """Check the sizing options; raise :class:`OptionError` naming the first bad one.

    Parameters
    ----------
    options : mapping
        The executor options (``adaptive, min_workers, idle_timeout, max_pending_jobs,
        max_resubmissions, start_timeout``; others are ignored).
    max_workers : int
        The executor's ``max_workers``.

    Returns
    -------
    ScalingOptions

    """
    adaptive = options.get("adaptive")
    adaptive = True if adaptive is None else check_boolean("adaptive", adaptive)
    min_workers = _whole_number(options, "min_workers", 0, 0)
    if min_workers > max_workers:
        raise OptionError(f"min_workers={min_workers!r} is not allowed; min_workers must be "
                          f"at most max_workers ({max_workers})")
    return ScalingOptions(
        adaptive=adaptive,
        min_workers=min_workers,
        max_workers=max_workers,
        idle_timeout=check_idle_timeout(options.get("idle_timeout")),
        max_pending_jobs=_whole_number(options, "max_pending_jobs",
                                       DEFAULT_MAX_PENDING_JOBS, 1),
        max_resubmissions=_whole_number(options, "max_resubmissions",
                                        DEFAULT_MAX_RESUBMISSIONS, 0),
        start_timeout=parse_timeout(options.get("start_timeout"), "start_timeout"),
    )


# -- what the executor reports ---------------------------------------------------------------------


@dataclass
class ScalingStatus:
    """What ``ex.status()`` returns.

    Attributes
    ----------
    adaptive : bool
        Whether the executor sizes itself from the queued work.
    workers : int
        Workers connected to the scheduler.
    jobs_pending, jobs_running, jobs_draining : int
        Jobs waiting in the batch queue, running a worker, and paused before their walltime.
    resubmissions : int
        Failed jobs replaced so far.
    lost_calls : int
        Tasks that were on a worker when it was lost (dask re-runs them elsewhere).
    retired_jobs : int
        Jobs released by the policy (idle or at their walltime).
    job_ids : list of str
        Every job id submitted, in submission order.
    pending_reasons : dict of str to str
        Why each job that waits in the batch queue has not started, as the batch system last
        said: job id -> state and reason (``{"3517": "PENDING: Priority"}``). Jobs whose
        reason is not known yet (or that the batch system gives none for) are left out.
    waiting_calls : int
        Calls waiting in the executor's call queue for a free worker slot or for their
        dependencies (not yet handed to the cluster).
    pools : dict of str to dict
        One entry per pool (``ex.with_resources(...)``): its shape, ``max_workers``, jobs
        pending, running and draining, jobs released, calls waiting and calls running. The
        other counts are the executor's own workers' and the whole cluster's.
    idle_timeout : float or None
        Seconds a job's workers must be idle now before it is released (with
        ``idle_timeout="auto"``, as long as a job took to start so far); None without
        adaptive scaling.

    """

    adaptive: bool = False
    workers: int = 0
    jobs_pending: int = 0
    jobs_running: int = 0
    jobs_draining: int = 0
    resubmissions: int = 0
    lost_calls: int = 0
    retired_jobs: int = 0
    job_ids: list[str] = field(default_factory=list)
    pending_reasons: dict[str, str] = field(default_factory=dict)
    waiting_calls: int = 0
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    idle_timeout: float | None = None


# -- carrying it out -----------------------------------------------------------------------------


class PoolScope(Protocol):
    """What a policy sizing one pool of a shared cluster needs (see :mod:`futures_hpc.pools`)."""

    #: The pool's name (``""`` for the executor's own workers).
    name: str
    #: Calls one worker of the pool runs at once (None: its threads).
    calls_per_worker: int | None

    def owns_job(self, job_name: str) -> bool:
        """Whether the job (a ``worker_spec`` entry) is one of this pool's."""

    def owns_task(self, task: Any) -> bool:
        """Whether the scheduler's task (a ``TaskState``) is to run on this pool."""

    def shared(self) -> bool:
        """Whether other pools share the cluster now (else the policy sees the whole cluster)."""

    def new_job(self) -> dict[str, Any]:
        """A new ``worker_spec`` entry of this pool: ``{name: spec}``."""

    def pending_elsewhere(self) -> int:
        """Jobs the other pools have waiting in the batch queue."""



class _TaskEnds(SchedulerPlugin):
    """When each worker connected, and when it last finished a task.

    The policy looks at the scheduler every :data:`DEFAULT_INTERVAL`; a call that starts and
    ends between two looks would go unseen, and a worker running a short call every few
    seconds would count as idle since long before it.
    """

    def __init__(self) -> None:
        self.last_end: dict[str, float] = {}  # worker address -> when its last task ended
        self.connected_at: dict[str, float] = {}  # worker address -> when it connected

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.connected_at[worker] = time.monotonic()

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing":
            worker = kwargs.get("worker")
            if isinstance(worker, str):
                self.last_end[worker] = time.monotonic()

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.last_end.pop(worker, None)
        self.connected_at.pop(worker, None)


class FairShareAdaptive(Adaptive):
    """The fair-share policy as a :class:`distributed.deploy.Adaptive` for a SpecCluster.

    Parameters
    ----------
    cluster : distributed.deploy.SpecCluster
        A cluster whose scheduler runs in this process (``cluster.scheduler`` is a
        :class:`distributed.Scheduler`); each ``worker_spec`` entry is one job.
    minimum, maximum : int
        The fewest and most workers (``min_workers``, ``max_workers``).
    idle_timeout : float or None
        Seconds every worker of a job must be idle before the job is released; None: as long
        as a job of this cluster took to start (:func:`auto_idle_timeout`).
    max_pending_jobs : int
        The most jobs waiting in the batch queue at once.
    walltime : float, optional
        Seconds each job may run; its workers are drained and replaced before it ends.
    interval : float
        Seconds between two decisions.
    target_duration : float
        Seconds of queued work per worker that scale-up aims for.
    client_waiting : callable, optional
        Returns how many calls or chunks wait in the executor's call queue, in the client: work
        the scheduler does not see yet, which counts as tasks to scale for.
    pool : PoolScope, optional
        For a cluster with several kinds of worker (:mod:`futures_hpc.pools`): which jobs and
        tasks this policy sizes, how a new job of its kind is made, and how many jobs the other
        pools have waiting (all pools together keep within ``max_pending_jobs``). Without it
        the policy sizes the whole cluster.
    call_time : float, optional
        Seconds each call needs: a job with less time left before its walltime takes no new
        call (its workers are drained, and a replacement is asked for).
    **kwargs
        Passed to :class:`distributed.deploy.Adaptive`.

    """

    def __init__(self, cluster: Any, minimum: int = 0, maximum: int = 1,
                 idle_timeout: float | None = None,
                 max_pending_jobs: int = DEFAULT_MAX_PENDING_JOBS,
                 walltime: float | None = None, interval: float = DEFAULT_INTERVAL,
                 target_duration: float = DEFAULT_TARGET_DURATION,
                 client_waiting: Callable[[], int] | None = None,
                 pool: PoolScope | None = None, call_time: float | None = None,
                 **kwargs: Any) -> None:
        kwargs.pop("worker_key", None)  # whole jobs are this class's own business
        self._client_waiting = client_waiting
        self.pool = pool
        self.call_time = call_time
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        self.max_pending_jobs = int(max_pending_jobs)
        self.walltime = walltime
        self.lost_calls = 0
        self.retired_jobs = 0
        self.last_decision = ScalingDecision()
        self._submitted_at: dict[str, float] = {}
        self._started_at: dict[str, float] = {}
        self._idle_since: dict[str, float] = {}  # worker address -> when it became idle
        self._draining: set[str] = set()
        self._retiring: set[str] = set()  # worker names we released ourselves
        self._processing: dict[str, tuple[str, int]] = {}  # address -> (name, tasks)
        self._longest_call = 0.0
        self._startup = 0.0
        self._step_running = False  # one adapt step at a time
        for job_name in getattr(cluster, "worker_spec", {}):  # submitted before the policy
            self._submitted_at[job_name] = time.monotonic()
        self._task_ends = _TaskEnds()
        self._task_ends_name = f"futures_hpc-task-ends-{id(self):x}"
        scheduler = getattr(cluster, "scheduler", None)
        if hasattr(scheduler, "add_plugin") and hasattr(scheduler, "adaptive_target"):
            scheduler.add_plugin(self._task_ends, name=self._task_ends_name)
        super().__init__(cluster, interval=interval, minimum=minimum, maximum=maximum,
                         target_duration=target_duration, **kwargs)

    def stop(self, *args: Any, **kwargs: Any) -> None:
        """Stop deciding, and stop watching the scheduler's tasks.

        The arguments go to dask's ``stop`` (``reason=`` since distributed 2024.2; none before).
        """
        scheduler = getattr(self.cluster, "scheduler", None)
        if self._task_ends_name in getattr(scheduler, "plugins", {}):
            scheduler.remove_plugin(name=self._task_ends_name)
        super().stop(*args, **kwargs)

    # -- helpers ---------------------------------------------------------------------------

    @property
    def processes_per_job(self) -> int:
        """Worker processes per job, from the cluster's worker template (a pool's: one)."""
        if self.pool is not None and self.pool.name:
            return 1
        template = getattr(self.cluster, "new_spec", None) or {}
        return max(1, len(template.get("group", ())) or 1)

    def _own_jobs(self) -> list[str]:
        names = list(self.cluster.worker_spec)
        return names if self.pool is None else [name for name in names
                                                if self.pool.owns_job(name)]

    @property
    def current_idle_timeout(self) -> float:
        """Seconds a job's workers must be idle now before it is released."""
        if self.idle_timeout is not None:
            return self.idle_timeout
        return auto_idle_timeout(self._startup)

    def limits(self) -> ScalingLimits:
        """The policy's limits in jobs."""
        per_job = self.processes_per_job
        pending_elsewhere = 0 if self.pool is None else self.pool.pending_elsewhere()
        idle_timeout = self.current_idle_timeout
        return ScalingLimits(
            min_jobs=math.ceil(self.minimum / per_job),
            max_jobs=max(1, int(self.maximum) // per_job),
            max_pending_jobs=max(0, self.max_pending_jobs - pending_elsewhere),
            idle_timeout=idle_timeout,
            pending_idle_timeout=(None if self.idle_timeout is not None
                                  else max(AUTO_PENDING_IDLE_TIMEOUT, idle_timeout)),
            processes_per_job=per_job,
            walltime=self.walltime,
            call_time=self.call_time,
        )

    def _worker_names_of(self, job_name: str) -> list[str]:
        spec = self.cluster.worker_spec.get(job_name, {})
        return [f"{job_name}{suffix}" for suffix in spec.get("group", ())] or [job_name]

    def _observe(self) -> ClusterSnapshot:
        """Read the scheduler (same process, same event loop) into a snapshot."""
        scheduler = self.cluster.scheduler
        now = time.monotonic()
        by_name = {str(ws.name): ws for ws in scheduler.workers.values()}
        # Calls lost with their worker: what a vanished worker (not ours to retire) was running.
        for address, (name, tasks) in list(self._processing.items()):
            if address not in scheduler.workers:
                del self._processing[address]
                self._idle_since.pop(address, None)
                if name not in self._retiring and tasks:
                    self.lost_calls += tasks
                    logger.warning("worker %s was lost with %d task(s); dask re-runs them",
                                   name, tasks)
        last_end = self._task_ends.last_end
        for ws in scheduler.workers.values():
            self._processing[ws.address] = (str(ws.name), len(ws.processing))
            if ws.processing:
                self._idle_since.pop(ws.address, None)
            else:
                since = self._idle_since.setdefault(ws.address, now)
                ended = last_end.get(ws.address)
                if ended is not None and ended > since:  # a call ran since the last look
                    self._idle_since[ws.address] = ended
        for prefix in scheduler.task_prefixes.values():
            longest = max(getattr(prefix, "max_exec_time", -1), prefix.duration_average)
            self._longest_call = max(self._longest_call, longest)
        jobs = []
        own_workers = []
        for job_name in self._own_jobs():
            self._submitted_at.setdefault(job_name, now)
            states = [by_name[name] for name in self._worker_names_of(job_name)
                      if name in by_name]
            if states and job_name not in self._started_at:
                connected = [self._task_ends.connected_at.get(ws.address, now)
                             for ws in states]
                self._started_at[job_name] = started = min(now, *connected)
                self._startup = max(self._startup, started - self._submitted_at[job_name])
            own_workers += states
            busy = sum(bool(ws.processing) for ws in states)
            idle_times = [self._idle_since.get(ws.address, now) for ws in states]
            jobs.append(JobSnapshot(
                name=job_name,
                submitted_at=self._submitted_at[job_name],
                connected_workers=len(states),
                busy_workers=busy,
                idle_since=max(idle_times) if states and not busy else None,
                started_at=self._started_at.get(job_name),
                draining=job_name in self._draining,
            ))
        if self.pool is None or not self.pool.shared():
            runnable = (len(scheduler.queued) + len(scheduler.unrunnable)
                        + sum(len(ws.processing) for ws in scheduler.workers.values()))
            threads = [ws.nthreads for ws in scheduler.workers.values()]
            threads_per_worker = (round(sum(threads) / len(threads)) if threads
                                  else engine.threads_per_worker(self.cluster))
            target = scheduler.adaptive_target(target_duration=self.target_duration)
        else:  # several pools share the scheduler: count this pool's tasks and workers only
            owns_task = self.pool.owns_task
            runnable = (sum(1 for ts in list(scheduler.queued) if owns_task(ts))
                        + sum(1 for ts in list(scheduler.unrunnable) if owns_task(ts))
                        + sum(len(ws.processing) for ws in own_workers))
            threads_per_worker = self.pool.calls_per_worker or (
                engine.threads_per_worker(self.cluster))
            target = math.ceil(runnable / max(1, threads_per_worker))
        waiting = self._client_waiting() if self._client_waiting is not None else 0
        if waiting:  # calls the executor holds back until a worker slot frees
            runnable += waiting
            target = max(target, math.ceil(runnable / max(1, threads_per_worker)))
        return ClusterSnapshot(
            now=now,
            wanted_workers=wanted_workers(target, runnable, threads_per_worker),
            jobs=tuple(jobs),
            longest_call=self._longest_call,
            startup=self._startup or DEFAULT_STARTUP_SECONDS,
        )

    # -- the periodic step -------------------------------------------------------------------

    async def adapt(self) -> None:
        """Observe, decide, act: the periodic step."""
        scheduler = getattr(self.cluster, "scheduler", None)
        if not hasattr(scheduler, "adaptive_target"):  # remote scheduler: dask's own policy
            await super().adapt()
            return
        if self._step_running:
            return
        self._step_running = True
        try:
            snapshot = self._observe()
            decision = decide(self.limits(), snapshot)
            self.last_decision = decision
            if decision.changes_anything:
                self.log.append((time.time(), decision))
                await self._act(decision, snapshot)
        finally:
            self._step_running = False

    async def _act(self, decision: ScalingDecision, snapshot: ClusterSnapshot) -> None:
        scheduler = self.cluster.scheduler
        for job_name in decision.drain:
            self._draining.add(job_name)
            for name in self._worker_names_of(job_name):
                for ws in list(scheduler.workers.values()):
                    if str(ws.name) == name:
                        pause_worker(scheduler, ws, f"futures_hpc-walltime-{time.time()}")
            logger.info("job %s is near its walltime: its workers take no new calls, and it "
                        "is retired once its running calls end", job_name)
        if decision.retire:
            await self._retire(list(decision.retire))
        if decision.submit:
            for _ in range(decision.submit):
                self.cluster.worker_spec.update(
                    self.cluster.new_worker_spec() if self.pool is None else self.pool.new_job())
            wanted = snapshot.wanted_workers
            logger.info("submitting %d job(s) for %d wanted worker(s) (%d job(s) held)",
                        decision.submit, wanted, len(snapshot.jobs))
            await correct_cluster_state(self.cluster)

    async def _retire(self, job_names: list[str]) -> None:
        # A job whose submission has not returned yet has no id to cancel: leave it for later.
        job_names = [job for job in job_names if job in self.cluster.workers]
        if not job_names:
            return
        scheduler = self.cluster.scheduler
        worker_names = [name for job in job_names for name in self._worker_names_of(job)]
        self._retiring.update(worker_names)
        book = getattr(self.cluster, "job_book", None)
        job_ids = [getattr(self.cluster.workers.get(job), "job_id", None) for job in job_names]
        if book is not None:
            book.mark_retired([job_id for job_id in job_ids if job_id])
        logger.info("releasing job(s) %s (%s)", " ".join(job_names),
                    " ".join(str(job_id) for job_id in job_ids))
        addresses = [ws.address for ws in scheduler.workers.values()
                     if str(ws.name) in worker_names]
        if addresses and book is not None:
            # Batch workers close themselves before their job is cancelled. remove=False: the
            # scheduler keeps each one registered until it has closed and disconnected, so
            # that neither its last heartbeat ("unregistered worker") nor a connection it is
            # still opening (a failed TLS handshake) is cut by the cancel, which comes after.
            retired = await scheduler.retire_workers(workers=addresses, remove=False,
                                                     close_workers=True)
            # A worker whose data could move nowhere was not asked to close: not waited for.
            await until_disconnected(scheduler, [address for address in addresses
                                                 if address in (retired or {})])
        elif addresses:
            # Processes with a nanny of this cluster (local) are closed by the nanny, when the
            # spec goes.
            await scheduler.retire_workers(workers=addresses, remove=True, close_workers=False)
        for job in job_names:
            self.cluster.worker_spec.pop(job, None)
            self._draining.discard(job)
            self._submitted_at.pop(job, None)
            self._started_at.pop(job, None)
        self.retired_jobs += len(job_names)
        await correct_cluster_state(self.cluster)

    def forget_job(self, job_name: str) -> None:
        """Forget a job that the batch system ended (its spec is gone; a replacement may come)."""
        self._draining.discard(job_name)
        self._submitted_at.pop(job_name, None)
        self._started_at.pop(job_name, None)

    def report_into(self, status: ScalingStatus) -> None:
        """Fill ``status`` with the policy's job counts, lost calls and retired jobs."""
        for name, value in self.counts().items():
            setattr(status, name, value)
        status.lost_calls = self.lost_calls
        status.retired_jobs = self.retired_jobs
        status.idle_timeout = self.current_idle_timeout

    def counts(self) -> dict[str, int]:
        """Jobs pending, running and draining, from the cluster's specs and the scheduler."""
        for _ in range(5):  # called from another thread: the dicts may change meanwhile
            try:
                return self._counts()
            except RuntimeError:
                time.sleep(0.01)
        return {}

    def _counts(self) -> dict[str, int]:
        scheduler = getattr(self.cluster, "scheduler", None)
        names = {str(ws.name) for ws in list(getattr(scheduler, "workers", {}).values())}
        pending = running = draining = 0
        for job_name in self._own_jobs():
            if job_name in self._draining:
                draining += 1
            elif any(name in names for name in self._worker_names_of(job_name)):
                running += 1
            else:
                pending += 1
        return {"jobs_pending": pending, "jobs_running": running, "jobs_draining": draining}
