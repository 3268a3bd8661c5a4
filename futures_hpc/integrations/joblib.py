"""The joblib parallel backend ``"futures_hpc"``: joblib and scikit-learn work on an executor.

Usage::

    import joblib
    from futures_hpc import HPCExecutor

    with HPCExecutor("slurm", max_workers=20) as ex:
        with joblib.parallel_config(backend="futures_hpc", executor=ex):
            search.fit(X, y)            # scikit-learn's n_jobs=-1 runs on ex's workers

    with joblib.parallel_config(backend="futures_hpc"):   # a default HPCExecutor() for the block
        joblib.Parallel()(joblib.delayed(f)(x) for x in items)

Each joblib batch (a list of calls that joblib groups itself) is one call of the executor's call
queue (:meth:`HPCExecutor.submit_batch`), so it travels to the worker as one pickled payload.
Workers time each batch, and the next batches are sized to compute for about
:attr:`FuturesHPCBackend.TARGET_BATCH_SECONDS`, which hides dask's cost of a few milliseconds per
task. Batches measured as quick are handed over as soon as joblib has cut them and share tasks
(:meth:`FuturesHPCBackend._hand_over_cut_batches`); many small calls are then nearly as cheap as
in a local process pool.

Without ``executor=`` a default ``HPCExecutor(**executor_options)`` is started when the first
``Parallel`` call needs it and shut down when the ``parallel_config`` / ``parallel_backend`` block
ends (or, for ``Parallel(backend="futures_hpc")`` outside such a block, when that call ends).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from joblib import parallel as joblib_parallel

from ..call_clock import call_clock
from ..call_queue import QUICK_CALL_SECONDS
from ..engine import (
    ParallelBackendBase,
    configured_joblib_backend,
    dispatch_ready_joblib_batches,
)
from ..executor import HPCExecutor
from ..pools import PoolExecutor

logger = logging.getLogger("futures_hpc")

#: The name the backend is registered under in joblib.
JOBLIB_BACKEND_NAME = "futures_hpc"


def run_timed_batch(batch: Callable[[], Any]) -> tuple[Any, float]:
    """Run a joblib batch on a worker; return its results and how long its calls took (s)."""
    started = call_clock()
    results = batch()
    return results, call_clock() - started


_callback_thread: ThreadPoolExecutor | None = None
_callback_thread_lock = threading.Lock()


def _run_callback(callback: Callable[[Future], None], then: Callable[[], None],
                  future: Future) -> None:
    """Run joblib's callback of a finished batch, then ``then()``, in a thread of their own.

    joblib dispatches its next batches in that callback: it takes the next slice of the
    caller's generator and builds and pickles the batches (tens of milliseconds for thousands of
    calls). Run where the executor completes futures, it would hold back the completion of the
    other batches, and with it the dispatch of the calls waiting for their worker slots.
    """
    global _callback_thread
    with _callback_thread_lock:
        if _callback_thread is None:
            _callback_thread = ThreadPoolExecutor(1, thread_name_prefix="futures_hpc-joblib")
        runner = _callback_thread
    runner.submit(_callback_then, callback, then, future)


def _callback_then(callback: Callable[[Future], None], then: Callable[[], None],
                   future: Future) -> None:
    callback(future)
    then()


def _shut_down_owned_executor(executor: HPCExecutor) -> None:
    executor.shutdown(wait=True, cancel_futures=True)


class FuturesHPCBackend(ParallelBackendBase):
    """joblib parallel backend that runs joblib's batches of calls on an :class:`HPCExecutor`.

    Parameters
    ----------
    executor : HPCExecutor, optional
        The executor to run on; it stays open after the block. Without it, a default
        ``HPCExecutor(**executor_options)`` is started on first use and shut down at the end of
        the ``parallel_config`` block.
    executor_options : mapping, optional
        Arguments for the default executor, e.g. ``{"backend": "slurm", "max_workers": 10}``
        or ``{"profile": "short"}``. Not allowed together with ``executor``.
    nesting_level, inner_max_num_threads :
        joblib's own backend arguments.

    Notes
    -----
    ``n_jobs=-1`` (the default inside ``parallel_backend``) means every worker slot of the
    executor (:meth:`HPCExecutor.worker_slots`), ``-2`` all but one, and so on; a positive
    ``n_jobs`` is taken as given. As with every joblib backend, ``n_jobs=1`` runs the calls one
    after the other in the calling process.

    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = False
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1

    #: A batch is sized to compute for about this long on a worker (measured there, so dask's
    #: few milliseconds per task do not count), which makes that cost small next to the work.
    TARGET_BATCH_SECONDS = 0.2
    #: The most calls in one batch: joblib takes ``n_jobs`` times this many ``delayed`` calls
    #: from the caller's generator at a time, so this bounds the memory they take.
    MAX_BATCH_CALLS = 10_000
    #: How much of the previous estimate of a call's cost is kept after each batch (the
    #: estimate is per call, weighted by the number of calls each batch ran).
    COST_MEMORY = 0.5
    #: joblib's limit: a batch that takes longer than this from dispatch to result (queueing
    #: and transfer included) makes the next ones smaller, so no worker is left with stragglers.
    MAX_IDEAL_BATCH_DURATION = 2.0
    #: Batches measured to compute for less than this are handed over as soon as joblib has
    #: cut them, not one per finished batch, so that the call queue can pack them into shared
    #: tasks (the call queue's own bound for packing calls).
    QUICK_BATCH_SECONDS = QUICK_CALL_SECONDS

    def __init__(
        self,
        executor: HPCExecutor | PoolExecutor | None = None,
        executor_options: Mapping[str, Any] | None = None,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if executor is not None and executor_options:
            raise TypeError(
                "give either executor= (an HPCExecutor to use) or executor_options= (arguments "
                "for a default HPCExecutor started for the block), not both"
            )
        if executor is not None and not isinstance(executor, (HPCExecutor, PoolExecutor)):
            raise TypeError(
                f"executor={executor!r} is not an HPCExecutor; create one with "
                "futures_hpc.HPCExecutor(...) (or a pool of one: ex.with_resources(...))"
            )
        self._executor: HPCExecutor | PoolExecutor | None = executor
        self.owns_executor: bool = executor is None
        self.executor_options: dict[str, Any] = dict(executor_options or {})
        self._executor_lock = threading.Lock()
        self._in_flight: set[Future] = set()
        self._in_flight_lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self._measured_seconds = 0.0
        self._measured_calls = 0.0
        self._batch_size = 1
        self._batch_duration = 0.0  # smoothed, from dispatch to result, of _batch_size batches
        self._last_batch_calls = 0  # calls in the batch joblib handed over last
        self._cost_key = os.urandom(16)  # the call queue's cost key of this Parallel's batches

    # -- the executor --------------------------------------------------------------------------

    @property
    def executor(self) -> HPCExecutor | None:
        """The executor batches run on (None until a default one is needed)."""
        return self._executor

    def _require_executor(self) -> HPCExecutor:
        with self._executor_lock:
            if self._executor is None:
                options = dict(self.executor_options)
                backend = options.pop("backend", None)
                self._executor = HPCExecutor(backend, **options)
                logger.info("joblib backend started a default executor: %r", self._executor)
                self._finalizer = weakref.finalize(
                    self, _shut_down_owned_executor, self._executor
                )
            return self._executor

    def close_owned_executor(self) -> None:
        """Shut down the default executor this backend started, if any (no-op otherwise)."""
        with self._executor_lock:
            if not self.owns_executor or self._executor is None:
                return
            executor, self._executor = self._executor, None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        logger.info("joblib backend shuts down its default executor %r", executor)
        _shut_down_owned_executor(executor)

    def _is_the_configured_backend(self) -> bool:
        return configured_joblib_backend() is self

    # -- joblib's backend interface ------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """The number of batches joblib keeps running at once.

        ``-1``: every worker slot of the executor; ``-k``: all but ``k - 1``; a positive
        number as given.
        """
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        slots = self._require_executor().worker_slots()
        return max(slots + 1 + n_jobs, 1)

    def configure(
        self, n_jobs: int | None = 1, parallel: Any = None, **backend_arguments: Any
    ) -> int:
        """Prepare a ``Parallel`` call; return the number of concurrent batches."""
        effective = self.effective_n_jobs(n_jobs)
        if effective > 1:
            self._require_executor()
        self.parallel = parallel
        return effective

    def compute_batch_size(self) -> int:
        """The number of calls in joblib's next batch (with ``batch_size="auto"``).

        Each batch is timed on its worker; the next batches are sized to compute for about
        :attr:`TARGET_BATCH_SECONDS` at the measured cost per call, within 1 and
        :attr:`MAX_BATCH_CALLS`. Until a batch has come back, batches have one call. Measuring
        on the worker, rather than from dispatch to result as joblib's own backends do, keeps
        dask's latency out of the estimate: trivial calls reach large batches after the first
        result instead of growing step by step through a dozen round trips.
        """
        current = self._batch_size
        new_size = current
        if self._measured_calls > 0:
            seconds_per_call = max(self._measured_seconds / self._measured_calls, 1e-9)
            ideal = int(self.TARGET_BATCH_SECONDS / seconds_per_call)
            new_size = max(1, min(self.MAX_BATCH_CALLS, ideal))
        duration = self._batch_duration
        if duration > self.MAX_IDEAL_BATCH_DURATION and current >= 2:
            # Slow from dispatch to result (e.g. large results to transfer): joblib's rule.
            shrunk = 2 * int(current * self.TARGET_BATCH_SECONDS / duration)
            new_size = min(new_size, max(1, shrunk))
        if new_size != current:
            self._batch_size = new_size
            self._batch_duration = 0.0  # measure the new size's duration afresh
            logger.debug("joblib batches: %d calls", new_size)
        return new_size

    def reset_batch_stats(self) -> None:
        """Forget batch sizes and call costs (at the end of each ``Parallel`` call)."""
        self._batch_size = 1
        self._batch_duration = 0.0
        self._measured_seconds = 0.0
        self._measured_calls = 0.0
        self._cost_key = os.urandom(16)

    def batch_completed(self, batch_size: int, duration: float) -> None:
        """Record a batch's time from dispatch to result (smoothed, as joblib does)."""
        if batch_size == self._batch_size:
            old = self._batch_duration
            self._batch_duration = duration if old == 0.0 else 0.8 * old + 0.2 * duration

    def _record_batch_cost(self, calls: int, seconds: float) -> None:
        memory = self.COST_MEMORY
        self._measured_seconds = memory * self._measured_seconds + seconds
        self._measured_calls = memory * self._measured_calls + calls

    def submit(self, func: Callable[[], Any], callback: Callable[[Any], None] | None = None):
        """Run one joblib batch as one executor call; ``callback(future)`` when it is done.

        The batches of one ``Parallel`` call share a cost key in the executor's call queue, so
        that once one came back, batches measured as short are sent ahead to busy workers (two
        per worker thread), as loky keeps a call queued per worker: no worker idles for a round
        trip between two batches. Quick batches go further: after each callback, the batches
        joblib has already cut are handed over at once (:meth:`_hand_over_cut_batches`) and
        the call queue packs those waiting together into shared tasks.
        """
        calls = max(1, len(func) if hasattr(func, "__len__") else 1)
        self._last_batch_calls = calls
        future = self._require_executor().submit_batch(run_timed_batch, func, calls,
                                                       self._cost_key)
        with self._in_flight_lock:
            self._in_flight.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(functools.partial(_run_callback, callback,
                                                       self._hand_over_cut_batches))
        return future

    def apply_async(self, func: Callable[[], Any],
                    callback: Callable[[Any], None] | None = None) -> Future:
        """:meth:`submit` under its name before joblib 1.5 (joblib 1.3 and 1.4 call this)."""
        return self.submit(func, callback)

    def _hand_over_cut_batches(self) -> None:
        """Dispatch the batches joblib has already cut, if the last one was quick.

        joblib hands a backend one batch each time a batch ends, and cuts the last slice of
        the calls into ``10 * n_jobs`` small batches (so 20 with ``n_jobs=2``): with dask's
        few milliseconds per task, that tail alone took 20 tasks and five round trips for
        10,000 trivial calls. Batches that joblib has already made take no more of the
        caller's iterator, so handing them all over keeps ``pre_dispatch``'s bound.
        """
        parallel = getattr(self, "parallel", None)
        if parallel is None or self._measured_calls <= 0:
            return
        seconds_per_call = self._measured_seconds / self._measured_calls
        if seconds_per_call * self._last_batch_calls < self.QUICK_BATCH_SECONDS:
            dispatch_ready_joblib_batches(parallel)

    def _forget(self, future: Future) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(future)

    def retrieve_result_callback(self, future: Future) -> Any:
        """Return the batch's results (a list), or raise the call's exception."""
        return self._results_of(future.result())

    def retrieve_result(self, out: Future, timeout: float | None = None) -> Any:
        """Wait for a batch's results (used only when callbacks are off)."""
        return self._results_of(out.result(timeout))

    def _results_of(self, timed: tuple[list[Any], float]) -> list[Any]:
        """The results of a :class:`_TimedBatch`, its time (one result per call) recorded."""
        results, seconds = timed
        self._record_batch_cost(len(results), seconds)
        return results

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches not yet running (a call failed; joblib will not use them)."""
        with self._in_flight_lock:
            pending = list(self._in_flight)
        cancelled = sum(future.cancel() for future in pending)
        logger.debug("joblib backend cancelled %d pending batches", cancelled)

    def terminate(self) -> None:
        """End of a ``Parallel`` call: reset batching statistics.

        A default executor stays up while its ``parallel_config`` block is active and is shut
        down here only for a ``Parallel(backend="futures_hpc")`` call outside such a block.
        """
        self.reset_batch_stats()
        if self.owns_executor and not self._is_the_configured_backend():
            self.close_owned_executor()


def _close_at_block_end(unregister: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap ``parallel_config.unregister`` so a block's default executor ends with the block."""

    def unregister_and_close(config_block: Any) -> None:
        unregister(config_block)
        backend = getattr(config_block, "parallel_config", {}).get("backend")
        previous = (getattr(config_block, "old_parallel_config", None) or {}).get("backend")
        if isinstance(backend, FuturesHPCBackend) and backend is not previous:
            backend.close_owned_executor()

    unregister_and_close.futures_hpc_wrapped = unregister  # type: ignore[attr-defined]
    return unregister_and_close


def register_joblib_backend() -> None:
    """Register the ``"futures_hpc"`` joblib backend (safe to call more than once).

    Besides :func:`joblib.register_parallel_backend`, this wraps
    ``joblib.parallel_config.unregister`` (which runs when a ``parallel_config`` or
    ``parallel_backend`` block ends) so that a default executor started for the block is shut
    down at its end: joblib has no other hook for the end of a block.
    """
    joblib_parallel.register_parallel_backend(JOBLIB_BACKEND_NAME, FuturesHPCBackend)
    config_class = joblib_parallel.parallel_config
    if not hasattr(config_class.unregister, "futures_hpc_wrapped"):
        config_class.unregister = _close_at_block_end(config_class.unregister)


__all__ = ["FuturesHPCBackend", "JOBLIB_BACKEND_NAME", "register_joblib_backend"]
