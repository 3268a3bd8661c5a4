"""Resource pools: one executor, several kinds of worker (``ex.with_resources(...)``).

``ex.with_resources(cores=2, memory="8GB")`` returns a :class:`PoolExecutor`: an
:class:`~concurrent.futures.Executor` (``submit``, ``map``, the same futures) whose calls run
only on workers of that shape. Each distinct shape is a pool of its own workers (batch jobs,
local worker processes) on the executor's own scheduler and cluster:

- **Placement** uses dask worker resources. Every worker of the executor's own kind declares
  :data:`BASE_RESOURCE` (one unit per thread); every worker of pool *k* declares
  ``fhpc-pool-k=1`` (and ``GPU=n`` for ``gpus=n``). Once a pool exists, the executor's own
  tasks need :data:`BASE_RESOURCE` and a pool's tasks need its resource, so no call lands on a
  worker of another shape.
- **A pool's call has the whole worker**: one call at a time per worker, so a call of
  ``cores=16`` has the 16 cores of its job (``OMP_NUM_THREADS`` and its kin are set to the
  cores), its memory and its GPUs, as in HyperQueue or executorlib, without a job per call.
- **Queue and scaling per pool**: each pool has a call queue of its own
  (:class:`~futures_hpc.call_queue.CallQueue`) and its own fair-share policy
  (:class:`~futures_hpc.scaling.FairShareAdaptive` with a :class:`ResourcePool` as its scope):
  workers are asked for only while the pool has work, released whole after ``idle_timeout``,
  and all pools together keep within the executor's ``max_pending_jobs``.

The backend makes the pool's workers (:meth:`~futures_hpc.provider.BackendProvider.pool_job`):
a job of the pool's shape on SLURM, PBS and Grid Engine, a worker process on the local backend.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from typing import Any, Protocol

from .call_queue import CallQueue
from .errors import ExecutorShutdownError, JobFailedError
from .memory_kills import LADDER_RESOURCE
from .memory_ladder import LadderEntrance, MemoryLadder
from .pool_shape import SHAPE_OPTIONS, PoolShape
from .scaling import FairShareAdaptive, ScalingStatus, validate_scaling_options

logger = logging.getLogger("futures_hpc")


class PoolsHost(Protocol):
    """What the pools use of their executor (an :class:`~futures_hpc.executor.HPCExecutor`).

    Named here, below the executor, so that this module does not import it: the executor makes
    its pools and hands itself to them.
    """

    #: The dask cluster the pools' workers join (its ``loop``, ``new_worker_spec``).
    cluster: Any
    #: ``fhpc-<8 hex>``: names the run in job names and messages.
    run_name: str
    #: The executor's checked options (the pools' scaling options come from there).
    executor_options: dict[str, Any]
    #: The backend's provider: makes the pools' jobs (``pool_job``...).
    _backend: Any
    #: The executor's own call queue.
    _queue: CallQueue

    def _make_queue(self, slots: Callable[[], int],
                    resources: dict[str, float] | None = None) -> CallQueue:
        """A call queue of the executor's client, for a pool's workers."""

    def _submit_to(self, queue: Any, fn: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any], batch: tuple[bytes, int] | None = None
                   ) -> Future:
        """Queue a call on ``queue`` (a pool's, or its memory ladder's entrance)."""

    def _map_on(self, queue: Any, slots: Callable[[], int], fn: Callable[..., Any],
                iterables: Any, **options: Any) -> Iterator[Any]:
        """``map`` over ``queue``, ``slots()`` workers at most."""

    def with_resources(self, **options: Any) -> PoolExecutor:
        """Another pool of the same executor (:meth:`HPCExecutor.with_resources`)."""

#: The resource every worker of the executor's own kind declares, one unit per thread.
BASE_RESOURCE = "fhpc-pool-0"
#: The resource a worker of a pool with GPUs declares (its GPU count).
GPU_RESOURCE = "GPU"
#: The most often calls waking a pool's scaling policy make it look (seconds).
WAKE_SECONDS = 0.2
#: How long after calls come the woken policy looks (the rest of a burst comes meanwhile).
WAKE_DELAY_SECONDS = 0.05
#: Environment variables set to a pool's cores in its workers (threads of numeric libraries).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(eq=False)
class ResourcePool:
    """One pool: its shape, its call queue, its scaling policy (the policy's scope).

    Attributes
    ----------
    number : int
        1, 2, ...: the pool's resource is ``fhpc-pool-<number>``.
    shape : PoolShape
    max_workers : int
        The most workers (batch: jobs) of the pool.
    job_prefix : str
        The names of the pool's workers (``worker_spec`` entries) begin with it.
    queue : CallQueue
        The pool's calls.

    """

    number: int
    shape: PoolShape
    max_workers: int
    job_prefix: str
    pools: Pools
    queue: CallQueue | None = None
    adaptive: FairShareAdaptive | None = None
    #: Calls one worker of a pool runs at once.
    calls_per_worker: int | None = 1
    #: Why the pool cannot run calls (the batch system refused its job), once it cannot.
    failure: BaseException | None = None
    #: How each of the pool's jobs that ended unexpectedly ended (job id, state, log tail):
    #: counted against the executor's ``max_resubmissions`` for this pool alone.
    job_failures: list[str] = field(default_factory=list)
    _numbers: Iterator[int] = field(default_factory=itertools.count)
    _woken_at: float = float("-inf")

    @property
    def name(self) -> str:
        """``pool-<number>``."""
        return f"pool-{self.number}"

    @property
    def resource(self) -> str:
        """The dask resource the pool's workers declare and its tasks need."""
        return f"fhpc-pool-{self.number}"

    def task_resources(self) -> dict[str, float]:
        """The resources each task of the pool needs (the pool's, its GPUs)."""
        needs: dict[str, float] = {self.resource: 1}
        if self.shape.gpus:
            needs[GPU_RESOURCE] = self.shape.gpus
        if self.shape.memory_ladder:
            needs[LADDER_RESOURCE] = 1
        return needs

    def worker_resources(self) -> dict[str, float]:
        """The resources each worker of the pool declares."""
        return self.task_resources()

    def environment(self) -> dict[str, str]:
        """Variables set in the pool's workers: numeric libraries use the worker's cores."""
        return {name: str(self.shape.cores) for name in THREAD_VARIABLES}

    # -- the scaling policy's scope ------------------------------------------------------------

    def owns_job(self, job_name: str) -> bool:
        """Whether a ``worker_spec`` entry is one of this pool's."""
        return str(job_name).startswith(self.job_prefix)

    def owns_task(self, task: Any) -> bool:
        """Whether a scheduler task needs this pool's resource."""
        return self.resource in (getattr(task, "resource_restrictions", None) or {})

    def shared(self) -> bool:
        """A pool always shares its cluster with the executor's own workers."""
        return True

    def new_job(self) -> dict[str, Any]:
        """A new ``worker_spec`` entry of the pool, from the backend."""
        name = f"{self.job_prefix}{next(self._numbers)}"
        return {name: self.pools.executor._backend.pool_job(self, name)}

    def pending_elsewhere(self) -> int:
        """Jobs the executor's other pools have waiting."""
        return self.pools.pending_jobs(excluding=self)

    def wake_policy(self) -> None:
        """Let the pool's policy look now, not at its next interval: calls wait for it.

        A pool with no worker would otherwise leave its first calls waiting up to an
        interval (0.5 s) before its first job is asked for. The policy looks
        :data:`WAKE_DELAY_SECONDS` later, at most every :data:`WAKE_SECONDS`.
        """
        now = time.monotonic()
        if self.adaptive is None or now - self._woken_at < WAKE_SECONDS:
            return
        self._woken_at = now
        loop, adapt = self.pools.executor.cluster.loop, self.adaptive.adapt
        # A moment later, so that a burst of calls is seen as one step (whose jobs go out
        # together: one job array with job_array=True).
        loop.add_callback(lambda: loop.call_later(WAKE_DELAY_SECONDS, adapt))

    def fail(self, error: BaseException) -> None:
        """The pool cannot run calls: stop its scaling, fail its calls and later ones.

        The executor and its other pools go on (a refused GPU job leaves the CPU calls be).
        """
        self.failure = error
        if self.adaptive is not None:
            # stop() without a reason: distributed before 2024.6 takes none.
            self.pools.executor.cluster.loop.add_callback(self.adaptive.stop)
        if self.queue is not None:
            for future in self.queue.outstanding():
                if not future.done():
                    try:
                        future.set_exception(error)
                    except Exception:  # completed by another thread meanwhile
                        pass
            self.queue.close()  # sends nothing more; forgets the failed calls
        logger.error("%s", error)

    def count_job_failure(self, description: str, limit: int, jobs: str,
                          suffix: str = "") -> bool:
        """Count one of the pool's jobs that ended unexpectedly; beyond ``limit``, fail the pool.

        ``description`` says how the job ended (id, state, log tail); ``jobs`` names the kind
        (``"batch jobs"``, ``"worker tasks"``) and ``suffix`` ends the error. Return whether the
        pool goes on (its policy then asks for another job).
        """
        self.job_failures.append(description)
        if self.failure is not None:
            return False
        if len(self.job_failures) <= limit:
            return True
        self.fail(JobFailedError(
            f"{len(self.job_failures)} {jobs} of {self.name} ({self.shape.describe()}) of "
            f"{self.pools.executor.run_name} ended unexpectedly, more than "
            f"max_resubmissions={limit} allows; the executor and its other pools go on:\n"
            + "\n".join(self.job_failures) + suffix))
        return False

    def report(self) -> dict[str, Any]:
        """The pool's line of ``ex.status()``."""
        counts = {} if self.adaptive is None else self.adaptive.counts()
        queue = self.queue
        # Not done: a call the pool failed (fail) may stay in its queue's books.
        unfinished = 0 if queue is None else sum(not future.done()
                                                 for future in queue.outstanding())
        return {
            "shape": self.shape.describe(),
            "max_workers": self.max_workers,
            "jobs_pending": counts.get("jobs_pending", 0),
            "jobs_running": counts.get("jobs_running", 0),
            "jobs_draining": counts.get("jobs_draining", 0),
            "retired_jobs": 0 if self.adaptive is None else self.adaptive.retired_jobs,
            "resubmissions": len(self.job_failures),
            "waiting_calls": 0 if queue is None else queue.waiting_count(),
            "running_calls": 0 if queue is None else max(0, unfinished - queue.waiting_count()),
        }


class BaseScope:
    """The scaling scope of the executor's own workers once pools share its cluster."""

    name = ""
    calls_per_worker: int | None = None

    def __init__(self, pools: Pools) -> None:
        self.pools = pools

    def owns_job(self, job_name: str) -> bool:
        """Every ``worker_spec`` entry that is no pool's."""
        return not any(pool.owns_job(job_name) for pool in self.pools.all())

    def owns_task(self, task: Any) -> bool:
        """Tasks that need no pool's resource."""
        restrictions = getattr(task, "resource_restrictions", None) or {}
        return not any(pool.resource in restrictions for pool in self.pools.all())

    def shared(self) -> bool:
        """Whether a pool exists (before, the policy sees the whole cluster as always)."""
        return bool(self.pools.all())

    def new_job(self) -> dict[str, Any]:
        """A new job of the executor's own shape (dask-jobqueue's template)."""
        return self.pools.executor.cluster.new_worker_spec()

    def pending_elsewhere(self) -> int:
        """Jobs the pools have waiting."""
        return self.pools.pending_jobs(excluding=None)


class Pools:
    """The pools of one executor, made on first use of each shape."""

    def __init__(self, executor: PoolsHost) -> None:
        self.executor = executor
        self.base = BaseScope(self)
        self._lock = threading.Lock()
        self._by_shape: dict[PoolShape, ResourcePool] = {}
        self._numbers = itertools.count(1)

    def all(self) -> list[ResourcePool]:
        """Every pool made so far."""
        return list(self._by_shape.values())

    def owner_of(self, job_name: str) -> ResourcePool | None:
        """The pool whose job (or task) ``job_name`` is; None: the executor's own."""
        return next((pool for pool in self.all() if pool.owns_job(job_name)), None)

    def get(self, shape: PoolShape) -> ResourcePool:
        """The pool of ``shape``, made (and its scaling started) on first use."""
        with self._lock:
            pool = self._by_shape.get(shape)
            if pool is not None:
                return pool
            executor = self.executor
            backend = executor._backend
            backend.check_pool(shape)
            number = next(self._numbers)
            max_workers = shape.max_workers or backend.pool_default_max_workers(shape)
            pool = ResourcePool(number=number, shape=shape, max_workers=max_workers,
                                job_prefix=backend.pool_job_prefix(number), pools=self)
            pool.queue = executor._make_queue(lambda: pool.max_workers, pool.task_resources())
            pool.queue.on_waiting = pool.wake_policy
            pool.queue.look_ahead = not shape.memory_ladder
            if not self._by_shape:  # the executor's own calls now stay on its own workers
                executor._queue.resources = {BASE_RESOURCE: 1}
            scaling = validate_scaling_options(executor.executor_options, max_workers)
            pool.adaptive = FairShareAdaptive(
                executor.cluster, minimum=0, maximum=max_workers,
                idle_timeout=scaling.idle_timeout, max_pending_jobs=scaling.max_pending_jobs,
                walltime=backend.pool_walltime(shape)[1],
                client_waiting=pool.queue.waiting_entries, pool=pool,
                call_time=shape.call_time_seconds,
            )
            self._by_shape[shape] = pool
            return pool

    def pending_jobs(self, excluding: ResourcePool | None) -> int:
        """Jobs waiting in the batch queue, of every pool but ``excluding`` (and of the base)."""
        total = 0
        for pool in self.all():
            if pool is not excluding and pool.adaptive is not None:
                total += pool.adaptive.counts().get("jobs_pending", 0)
        if excluding is not None:
            base = getattr(self.executor._backend, "_adaptive", None)
            if base is not None:
                total += base.counts().get("jobs_pending", 0)
        return total

    def queues(self) -> list[CallQueue]:
        """The call queue of every pool."""
        return [pool.queue for pool in self.all() if pool.queue is not None]

    def outstanding(self) -> list[Future]:
        """Every unfinished future of every pool."""
        return [future for queue in self.queues() for future in queue.outstanding()]

    def report_into(self, status: ScalingStatus) -> None:
        """Fill ``status.pools``: one line per pool."""
        status.pools = {pool.name: pool.report() for pool in self.all()}

    def stop(self) -> None:
        """Stop every pool's scaling policy (the executor is closing), in the cluster's loop.

        ``stop()`` without a reason: distributed before 2024.6 takes none.
        """
        loop = self.executor.cluster.loop
        for pool in self.all():
            if pool.adaptive is not None:
                loop.add_callback(pool.adaptive.stop)


class PoolExecutor(Executor):
    """The calls of one pool: an :class:`~concurrent.futures.Executor` over its workers.

    Made by :meth:`~futures_hpc.executor.HPCExecutor.with_resources`; it shares the executor's
    scheduler, cluster and life: the executor's shutdown ends it. Its own :meth:`shutdown`
    only stops it taking calls (and waits for, or cancels, its own).
    """

    def __init__(self, executor: PoolsHost, pool: ResourcePool,
                 ladder: MemoryLadder | None = None) -> None:
        self._executor = executor
        self._pool = pool
        self._ladder = ladder
        self._shutdown = False
        # This view's unfinished futures: its shutdown waits for (or cancels) these only, not
        # those of another view of the same pool.
        self._lock = threading.Lock()
        self._futures: set[Future] = set()

    def _track(self, futures: list[Future]) -> None:
        with self._lock:
            self._futures.update(futures)
        for future in futures:
            future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)

    @property
    def ladder(self) -> MemoryLadder | None:
        """The memory ladder (``memory=[...]``) whose first rung this pool is, or None."""
        return self._ladder

    def _entrance(self) -> CallQueue | LadderEntrance:
        """Where this executor's calls are queued: the pool's queue, or its ladder's."""
        if self._ladder is None:
            return self._pool.queue
        return LadderEntrance(self._pool.queue, self._ladder)

    @property
    def shape(self) -> PoolShape:
        """What each worker of this pool has."""
        return self._pool.shape

    @property
    def executor(self) -> PoolsHost:
        """The :class:`~futures_hpc.executor.HPCExecutor` whose cluster runs this pool."""
        return self._executor

    @property
    def pool_name(self) -> str:
        """``pool-<n>``, its key in ``ex.status().pools``."""
        return self._pool.name

    def _check_open(self) -> None:
        if self._shutdown:
            raise ExecutorShutdownError("cannot schedule new futures after shutdown")
        failure = self._pool.failure
        if failure is not None:
            raise type(failure)(*failure.args)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` on a worker of this pool (see ``HPCExecutor``)."""
        with self._lock:  # not shut down meanwhile
            self._check_open()
            future = self._executor._submit_to(self._entrance(), fn, args, kwargs)
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def submit_batch(self, fn: Callable[[Any], Any], batch: Any, calls: int,
                     cost_key: bytes) -> Future:
        """Schedule a library's batch of calls on this pool (see ``HPCExecutor.submit_batch``)."""
        with self._lock:
            self._check_open()
            future = self._executor._submit_to(self._entrance(), fn, (batch,), {},
                                               (cost_key, calls))
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int | None = None,
            buffersize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """``fn`` over the items of ``iterables`` on this pool, in order (see ``HPCExecutor``)."""
        self._check_open()
        pool = self._pool
        return self._executor._map_on(self._entrance(), lambda: pool.max_workers, fn, iterables,
                                      timeout=timeout, chunksize=chunksize,
                                      buffersize=buffersize, progress=progress,
                                      view_open=self._check_open,
                                      on_submitted=self._track)

    def with_resources(self, **shape: Any) -> PoolExecutor:
        """Another pool of the same executor: this shape with ``shape``'s options changed."""
        current = self._pool.shape
        given = {name: getattr(current, name) for name in SHAPE_OPTIONS}
        given["job_extra"] = list(current.job_extra)
        if self._ladder is not None:
            given["memory"] = [rung.memory for rung in self._ladder.shapes]
        given.update(shape)
        return self._executor.with_resources(**given)

    def worker_slots(self) -> int:
        """Calls the pool runs at once with all its workers (one per worker).

        For the joblib backend (``parallel_backend("futures_hpc", executor=pool)``), which
        sizes its batches from it.
        """
        return self._pool.max_workers

    def status(self) -> dict[str, Any]:
        """The line of ``ex.status().pools`` that is this pool's."""
        return self._pool.report()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls; cancel the waiting ones with ``cancel_futures``; wait for the rest.

        Only this view's calls: another view of the same shape (``ex.with_resources`` called
        again) keeps its own, and takes calls still. The pool's workers stay the executor's
        (released when idle, or when it shuts down).
        """
        with self._lock:
            self._shutdown = True
            own = list(self._futures)
        if cancel_futures and self._pool.queue is not None:
            self._pool.queue.cancel_calls(own)  # those still waiting in the client
        if wait:
            wait_for_futures(own)

    def __repr__(self) -> str:
        return f"<PoolExecutor {self._pool.name} ({self._pool.shape.describe()}) of " \
               f"{self._executor!r}>"
