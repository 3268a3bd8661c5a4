"""The call queue: calls wait in the client until a worker slot is free, then go to the cluster.

As :class:`concurrent.futures.ProcessPoolExecutor` keeps its calls in the client and hands a
worker the next one when it is free, the executor keeps every call (``submit``, the chunks of
``map``, joblib's batches, the tiles runner's groups) here, and decides *when* a call is handed
to dask and *with which others*. dask still runs, places, retries and moves the data.

- **Slots.** A task is sent only while the cluster has a worker thread for it: one task per
  thread for a call that is slow or not measured yet (so no call waits behind a long one while
  a worker sits idle), two per thread for short tasks (the second waits on the worker, so that
  a worker never starves for a round trip between two short tasks).
- **Packing.** The executor learns each function's cost per call (:mod:`futures_hpc.chunking`,
  timed on the workers). Calls of a function measured as quick that wait next to each other are
  packed into one task, each with its own future, result or exception. The first call of a
  function, or a slow one, runs alone. A batch never holds a call back: it is formed only when
  a slot is free, from the calls waiting then. The chunks of a ``map`` are packed the same
  way once a chunk of them is measured as quick (:func:`~futures_hpc.calls.run_chunks`): a
  map's chunks are queued together and shared among the idle slots, over no more tasks than
  their measured work pays for (:func:`~futures_hpc.chunking.useful_tasks`: a few milliseconds
  of trivial calls go in one task), so a small ``chunksize`` does not cost a dask task per
  chunk. A packed task of chunks sends no news per chunk: if its
  worker dies, its chunks all go again (a chunk's calls already ran twice in that case).
- **States.** A call is PENDING while it waits here, and is cancelled at once and locally. It
  becomes RUNNING when it is handed to the cluster, as a call of ``ProcessPoolExecutor`` does
  when it moves to the call queue; ``shutdown(cancel_futures=True)`` therefore cancels what
  waits and lets what runs finish.
- **Dependencies.** A :class:`~concurrent.futures.Future` among a call's arguments (at the top
  level or inside lists, tuples, sets and dicts) makes the call wait until it is done; the call
  then gets its value, which passes through the client. A failed dependency fails the call
  (:class:`CallDependencyError`, the dependency's exception as its cause); a cancelled one
  cancels it.
- **Stored results.** With a store (:mod:`futures_hpc.store`), each call gets a key when it is
  queued; a call whose result an earlier run recorded is answered here at once, from the store,
  and never sent. The others carry their keys to the worker, which records their results.
- **Finished calls of a packed task.** The worker sends each call's outcome as it finishes
  (:class:`futures_hpc.relay.TaskNews`): its future completes at once, not with the whole task.
  If the worker dies, dask runs the task again elsewhere without the calls that finished.
- **Lost workers.** A packed task whose worker died too often is split: its calls without an
  outcome are queued again, the first of them (the one that was running) alone, so that only
  the call that kills its worker fails (:class:`~futures_hpc.errors.WorkerLostError`).
- **Memory ladders.** A call of ``with_resources(memory=[...])`` whose worker was killed for
  memory (:class:`~futures_hpc.errors.CallMemoryError`) goes to its ladder, which queues it on
  the next rung's queue (:meth:`CallQueue.take_over`) or fails it
  (:mod:`futures_hpc.memory_ladder`). A rung's queue sends no look-ahead task: a worker holds
  one task at a time, the one a memory kill is about.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import pickle
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any

import cloudpickle
import distributed

from .bridge import FutureBridge
from .calls import SKIPPED, PlaceholderArgument, run_calls, run_chunk, run_chunks, unpack_outcome
from .chunking import CallCosts, function_key, useful_tasks
from .errors import CallDependencyError, CallMemoryError, CallSerializationError, WorkerLostError
from .queued_call import (
    QueuedCall,
    find_futures,
    function_name,
    mark_running,
    notify_if_cancelled,
    pack_arguments,
    pickled,
    qualified_name,
    set_exception,
    set_result,
    substitute_futures,
)
from .store import MISSING, ResultStore, StoreSpec, function_identity
from .store.identity import WORKER_KEYED_TYPES, Occurrences, call_keys
from .streams import SCATTER_WAIT_SECONDS

logger = logging.getLogger("futures_hpc")

#: A call measured at or above this many seconds runs alone; quicker ones may share a task.
QUICK_CALL_SECONDS = 0.05
#: A packed task holds about this many seconds of calls, at most. Each task costs the client,
#: the scheduler and its worker a few milliseconds of CPU, which the calls lose on a machine
#: whose cores the workers fill: on 10 ms calls of counted work with 2 workers on 2 cores,
#: parallel efficiency was 91.6-93.8 % with 0.2 s and 93.7-95.3 % with 0.4 s (the same hour;
#: 0.1 s cost 3 points more than 0.2 s). Finished calls are reported before their task ends
#: (relay.NEWS_INTERVAL), and the queue packs fewer calls per task when fewer wait than the
#: workers could take.
BATCH_SECONDS = 0.4
#: The most calls in one packed task.
MAX_BATCH_CALLS = 10_000
#: A task expected to run shorter than this may wait on a busy worker (two per worker thread).
SHORT_TASK_SECONDS = 0.5
#: Arguments pickled larger than this go to a worker with ``scatter``, not in the task graph.
LARGE_PAYLOAD_BYTES = 1024 * 1024
#: Tries at scattering a large call before it goes in the graph instead (see _scattered).
SCATTER_ATTEMPTS = 2


@dataclass(eq=False)
class _SentTask:
    entries: list[QueuedCall]
    short: bool
    over: bool = False  # the task's own outcome is in: later news of its calls is stale


class CallQueue:
    """The executor's queue of calls, and its dispatcher.

    Parameters
    ----------
    client : distributed.Client
        Where tasks are submitted.
    bridge : FutureBridge
        Completes a standard future per task.
    call_costs : CallCosts
        The executor's memory of each function's cost per call.
    worker_slots : callable
        Returns the worker threads the cluster has, or will have (at least 1).
    run_name : str
        Goes into every task key (the workers report only the executor's own tasks).
    store : ResultStore, optional
        Where recorded results are looked up, and where the workers record new ones.
    resources : dict, optional
        dask worker resources every task of this queue needs (a pool's, see
        :mod:`futures_hpc.pools`): its tasks run only on workers that have them.
    occurrences : Occurrences, optional
        Numbers repeated calls for the store; the executor's queues share one, so that a call
        repeated on another pool is still a repeat.

    """

    def __init__(self, client: distributed.Client, bridge: FutureBridge, call_costs: CallCosts,
                 worker_slots: Callable[[], int], run_name: str,
                 store: ResultStore | None = None,
                 resources: dict[str, float] | None = None,
                 occurrences: Occurrences | None = None) -> None:
        self._client = client
        self._bridge = bridge
        self._costs = call_costs
        self._worker_slots = worker_slots
        self._run_name = run_name
        self._lock = threading.RLock()
        self._waiting: collections.deque[QueuedCall] = collections.deque()
        self._blocked = 0
        self._long_in_flight = 0
        self._short_in_flight = 0
        self._unfinished: set[Future] = set()
        self._packed_functions: weakref.WeakKeyDictionary[
            Any, tuple[bytes, bytes, bytes | None]] = weakref.WeakKeyDictionary()
        self.store = store
        self._occurrences = occurrences if occurrences is not None else Occurrences()
        self._closed = False
        self._task_numbers = itertools.count()
        #: The dask worker resources each task needs (None: any worker).
        self.resources: dict[str, float] | None = resources
        #: Called (without the lock) whenever calls wait here: a pool wakes its scaling policy.
        self.on_waiting: Callable[[], None] | None = None
        #: Whether a short task may wait on a busy worker (off for a memory ladder's rungs).
        self.look_ahead = True

    # -- putting calls in -------------------------------------------------------------------

    def submit(self, function: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], describe: Callable[[], str],
               ladder: Any = None, batch: tuple[bytes, int] | None = None,
               name: str | None = None) -> Future:
        """Queue ``function(*args, **kwargs)`` (on ``ladder``'s first rung); return its future.

        ``batch``: the call runs a batch of calls that its caller made itself (joblib's),
        ``(cost key, calls in it)``. Its cost is then learnt per call of the batch under that
        key, shared by the caller's batches: a batch measured as short may wait on a busy
        worker as a look-ahead task, and quick batches waiting together share tasks, as the
        quick chunks of a map do (only with batches of the same key and function).
        ``name``: what the task's key starts with (by default the function's name).
        """
        future: Future = Future()
        entry = QueuedCall(future, name or function_name(function), describe, ladder=ladder)
        if batch is not None:
            entry.batch_cost_key, entry.calls = batch
        dependencies: list[Future] = []
        for value in args:
            find_futures(value, dependencies)
        for value in kwargs.values():
            find_futures(value, dependencies)
        if dependencies:
            self._track(future)
            self._wait_for_dependencies(entry, function, args, kwargs, dependencies)
        elif not self._prepare(entry, function, args, kwargs):
            with self._lock:
                self._unfinished.add(future)
                self._waiting.append(entry)
            self.pump()
        return future

    def submit_task(self, worker_function: Callable[..., Any], payload: Any,
                    decode: Callable[[Any], Any], name: str, describe: Callable[[], str],
                    cost_key: bytes | None, calls: int, ladder: Any = None,
                    pump: bool = True) -> Future:
        """Queue a prepared task (a chunk of ``map``); its future gets the decoded outcome.

        With ``pump=False`` the task only waits: the caller queues the others of its map and
        then calls :meth:`pump`, so that quick chunks queued together can share tasks.
        """
        future: Future = Future()
        entry = QueuedCall(future, name, describe, cost_key=cost_key,
                           task=(worker_function, payload, decode), calls=calls, ladder=ladder)
        self._track(future)
        self._enqueue([entry], pump=pump)
        return future

    def _track(self, future: Future) -> None:
        """Count ``future`` as unfinished until it is done (however it gets done)."""
        with self._lock:
            self._unfinished.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._unfinished.discard(future)

    def _packed_function(self, function: Callable[..., Any]
                         ) -> tuple[bytes, bytes, bytes | None]:
        """The pickled function, its cost key and store id, remembered while it lives.

        Only plain functions are remembered (by identity, as distributed remembers pickled
        functions): a bound method or a callable object is pickled at each call, so that the
        queue never keeps its object alive.
        """
        remembered = type(function) in (types.FunctionType, types.BuiltinFunctionType)
        if remembered:
            known = self._packed_functions.get(function)
            if known is not None:
                return known
        packed = cloudpickle.dumps(function, protocol=pickle.HIGHEST_PROTOCOL)
        known = (packed, function_key(packed), self.function_id(function, packed))
        if remembered:
            self._packed_functions[function] = known
        return known

    def function_id(self, function: Callable[..., Any], packed: bytes) -> bytes | None:
        """The function's identity in the store (None without a store); names it there."""
        if self.store is None:
            return None
        identity = function_identity(function, packed)
        self.store.name_function(identity, qualified_name(function))
        return identity

    def store_keys(self, function_id: bytes, packed_arguments: Iterable[bytes],
                   calls: Sequence[tuple[Any, ...]] | None = None) -> list[bytes]:
        """The store keys of calls of one function, in the order they are made.

        ``calls``: the calls themselves if their arguments are all of
        :data:`~futures_hpc.store.identity.WORKER_KEYED_TYPES` (without keywords).
        """
        if calls is not None and self.store is not None and self.store.has_calls_of(
                function_id):
            calls = None  # no chunk of it is keyed by a worker in this run
        return self._occurrences.keys(call_keys(function_id, packed_arguments), function_id,
                                      calls)

    def worker_keyed(self, function_id: bytes, columns: Sequence[Sequence[Any]],
                     types: set[type]) -> dict[int, bytes] | None:
        """Whether a worker may key this chunk's calls, and the keys of those that repeat.

        None when the client must key the chunk itself: the store holds calls of the function
        (they are looked up), or a call repeats another of the chunk. Otherwise the keys, by
        position, of the calls that repeat earlier ones (see
        :meth:`~futures_hpc.store.Occurrences.worker_keyed`; ``types``: the arguments' types).
        """
        if self.store is None or self.store.has_calls_of(function_id):
            return None
        return self._occurrences.worker_keyed(function_id, columns, types)

    def _prepare(self, entry: QueuedCall, function: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Pickle the call (raises :class:`CallSerializationError` naming it).

        Returns True if the call was answered from the store (its future is done).
        """
        dask_dependencies: list[distributed.Future] = []

        def placeholder(value: Any) -> Any:
            if isinstance(value, distributed.Future):
                dask_dependencies.append(value)
                return PlaceholderArgument(len(dask_dependencies) - 1)
            return value

        if any(isinstance(value, distributed.Future) for value in (*args, *kwargs.values())):
            args = tuple(placeholder(value) for value in args)
            kwargs = {key: placeholder(value) for key, value in kwargs.items()}
        entry.packed_function, entry.cost_key, entry.function_id = pickled(
            lambda: self._packed_function(function), entry.describe)
        entry.packed_arguments = pickled(lambda: pack_arguments(args, kwargs), entry.describe)
        entry.dask_dependencies = dask_dependencies
        entry.alone = bool(dask_dependencies) or (
            len(entry.packed_arguments) + len(entry.packed_function) > LARGE_PAYLOAD_BYTES
        )
        if entry.batch_cost_key is not None:  # packed only with batches of the same caller
            entry.cost_key = entry.batch_cost_key
        if entry.function_id is not None and not dask_dependencies:
            keyed_by_hash = not kwargs and all(type(value) in WORKER_KEYED_TYPES
                                               for value in args)
            entry.store_key, = self.store_keys(entry.function_id, [entry.packed_arguments],
                                               [args] if keyed_by_hash else None)
            recorded = self.store.result(entry.store_key)
            if recorded is not MISSING:
                set_result(entry.future, recorded)
                return True
        return False

    def _wait_for_dependencies(self, entry: QueuedCall, function: Callable[..., Any],
                               args: tuple[Any, ...], kwargs: dict[str, Any],
                               dependencies: list[Future]) -> None:
        remaining = [len(dependencies)]
        lock = threading.Lock()
        with self._lock:
            self._blocked += 1

        def on_dependency_done(dependency: Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            with self._lock:
                self._blocked -= 1
            self._release(entry, function, args, kwargs, dependencies)

        for dependency in dependencies:
            dependency.add_done_callback(on_dependency_done)

    def _release(self, entry: QueuedCall, function: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], dependencies: list[Future]) -> None:
        """All dependencies are done: queue the call with their values, or fail or cancel it."""
        future = entry.future
        if future.done():
            return
        for dependency in dependencies:
            if dependency.cancelled():
                future.cancel()
                notify_if_cancelled(future)
                return
            error = dependency.exception()
            if error is not None:
                failure = CallDependencyError(
                    f"{entry.describe()} did not run: one of its arguments is a future that "
                    f"failed with {type(error).__name__}: {error}"
                )
                failure.__cause__ = error
                set_exception(future, failure)
                return
        try:
            if self._prepare(entry, function, substitute_futures(args),
                             {key: substitute_futures(value) for key, value in kwargs.items()}):
                return
        except CallSerializationError as error:
            set_exception(future, error)
            return
        self._enqueue([entry])

    def _enqueue(self, entries: Iterable[QueuedCall], front: bool = False,
                 pump: bool = True) -> None:
        with self._lock:
            if front:
                self._waiting.extendleft(reversed(list(entries)))
            else:
                self._waiting.extend(entries)
        if pump:
            self.pump()

    # -- sending tasks --------------------------------------------------------------------------

    def _seconds_per_call(self, entry: QueuedCall) -> float | None:
        return None if entry.cost_key is None else self._costs.seconds_per_call(entry.cost_key)

    def pump(self) -> None:
        """Send as many tasks as there are free worker slots for, in one message."""
        if self.on_waiting is not None and self._waiting:
            self.on_waiting()
        while True:
            with self._lock:
                if self._closed:
                    return
                taken = []
                while (task := self._take_task()) is not None:
                    taken.append(task)
            if not taken:
                return
            self._send(taken)

    def _take_task(self) -> tuple[list[QueuedCall], bool] | None:
        """The next task's entries and whether it is short, if a slot is free (lock held).

        A short task may go to a slot that is idle, or wait on a busy one as its look-ahead;
        a look-ahead task goes only once a full batch waits, else the calls wait for the next
        slot that frees (a task's end pumps the queue again).
        """
        waiting = self._waiting
        while waiting and waiting[0].future.done():  # cancelled while waiting
            notify_if_cancelled(waiting[0].future)
            self._unfinished.discard(waiting.popleft().future)
        if not waiting:
            return None
        slots = max(1, self._worker_slots())
        free = slots - self._long_in_flight  # slots not held by long tasks
        head = waiting[0]
        cost = self._seconds_per_call(head)
        packable = not head.alone and (head.task is None or _packable_chunk(head))
        full_batch = 1  # entries in a task
        if cost is not None and packable and cost * head.calls < QUICK_CALL_SECONDS:
            full_batch = min(MAX_BATCH_CALLS,
                             max(1, int(BATCH_SECONDS / max(cost * head.calls, 1e-9))))
        short = self.look_ahead and not head.isolated and cost is not None and (
            cost * head.calls * full_batch <= max(SHORT_TASK_SECONDS, BATCH_SECONDS))
        if short:
            if self._short_in_flight >= 2 * free:
                return None
            idle = self._short_in_flight < free
            if not idle and len(waiting) < full_batch:
                return None
            # Calls keep half the queue for look-ahead tasks; the chunks of a map (and a
            # library's batches), queued together, are shared among the idle slots at once,
            # over no more tasks than their work pays for (a few milliseconds of trivial calls
            # go in one task).
            if head.task is not None or head.batch_cost_key is not None:
                work = cost * head.calls * min(len(waiting), full_batch)
                share = useful_tasks(work, free - self._short_in_flight)
            else:
                share = 2 * free
            limit = full_batch if not idle else min(
                full_batch, max(1, math.ceil(len(waiting) / max(1, share))))
        elif self._long_in_flight + math.ceil(self._short_in_flight / 2) >= slots:
            return None
        else:
            limit = 1
        entries = [waiting.popleft()]
        while len(entries) < limit and waiting:
            entry = waiting[0]
            if (entry.cost_key != head.cost_key or entry.alone
                    or entry.function_id != head.function_id
                    or (entry.task is None) != (head.task is None)
                    or (entry.task is not None and not _packable_chunk(entry))):
                break
            entries.append(waiting.popleft())
        started = [entry for entry in entries if mark_running(entry)]
        if not started:
            return self._take_task()
        if short:
            self._short_in_flight += 1
        else:
            self._long_in_flight += 1
        return started, short

    def _task_of(self, entries: list[QueuedCall]) -> tuple[Callable[..., Any], Any,
                                                           Callable[[Any], Any], str]:
        """The worker function, payload, decoder and description of a task."""
        head = entries[0]
        if head.task is not None and len(entries) == 1:
            worker_function, payload, decode = head.task
            return worker_function, payload, decode, head.describe()
        if head.task is not None:  # quick chunks of map, packed
            payload = pickle.dumps([entry.task[1] for entry in entries],
                                   protocol=pickle.HIGHEST_PROTOCOL)
            return (run_chunks, payload, _decode_chunks,
                    f"{head.describe()} (first of {len(entries)} chunks packed in one task)")
        store = None
        if self.store is not None and head.store_key is not None:
            store = StoreSpec(self.store.location, head.function_id,
                              tuple(entry.store_key for entry in entries))
        payload = pickle.dumps(
            (head.packed_function, [entry.packed_arguments for entry in entries], store),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        if head.alone and len(payload) > LARGE_PAYLOAD_BYTES:
            payload = self._scattered(payload)
        description = head.describe() if len(entries) == 1 else (
            f"{head.describe()} (first of {len(entries)} calls packed in one task)"
        )
        return run_calls, payload, _decode_calls, description

    def _scattered(self, payload: bytes) -> Any:
        """``payload`` scattered to a worker (not through the graph), else ``payload`` itself.

        dask's scatter picks its worker in the client, then tells the scheduler; a worker that
        leaves in between (scaling down, a job at its walltime) makes the scheduler refuse it
        (``KeyError`` of the worker's address). The scatter is tried once more with the
        workers then known, and then the payload goes in the graph, which always works. With
        no worker running (an adaptive executor between bursts) the scatter does not wait for
        one (``SCATTER_WAIT_SECONDS``): the graph's task is what makes the executor ask.
        """
        for attempt in range(SCATTER_ATTEMPTS):
            try:
                return self._client.scatter(payload, hash=False, timeout=SCATTER_WAIT_SECONDS)
            except Exception as error:  # noqa: BLE001 - the graph is the fallback
                if self._client.status in ("closing", "closed"):
                    raise
                logger.debug("scattering a %d-byte call (attempt %d) failed: %r",
                             len(payload), attempt + 1, error)
        return payload

    def _send(self, taken: list[tuple[list[QueuedCall], bool]]) -> None:
        """Submit the tasks; those without dask dependencies in one ``client.map`` each kind."""
        sent = [_SentTask(entries, short) for entries, short in taken]
        try:
            tasks = [self._task_of(task.entries) for task in sent]
            keys = [f"{task.entries[0].name}-{self._run_name}-{next(self._task_numbers)}-"
                    f"{uuid.uuid4().hex[:12]}" for task in sent]
            dask_futures: list[distributed.Future | None] = [None] * len(sent)
            together: dict[Callable[..., Any], list[int]] = {}
            for index, task in enumerate(sent):
                dependencies = task.entries[0].dask_dependencies
                if dependencies:
                    dask_futures[index] = self._client.submit(
                        tasks[index][0], tasks[index][1], *dependencies, key=keys[index],
                        pure=False, resources=self.resources,
                    )
                else:
                    together.setdefault(tasks[index][0], []).append(index)
            for worker_function, indexes in together.items():
                mapped = self._client.map(
                    worker_function, [tasks[index][1] for index in indexes],
                    key=[keys[index] for index in indexes], pure=False,
                    resources=self.resources,
                )
                for index, dask_future in zip(indexes, mapped, strict=True):
                    dask_futures[index] = dask_future
        except BaseException as error:  # the client is closing: fail these calls, free slots
            for task in sent:
                self._task_done(task, error=error)
            return
        for task, (_, _, decode, description), dask_future in zip(
                sent, tasks, dask_futures, strict=True):
            on_calls = None
            if len(task.entries) > 1 and task.entries[0].task is None:
                on_calls = functools.partial(self._calls_done, task)
            task_future = self._bridge.track(dask_future, decode=decode,
                                             description=description, on_calls=on_calls)
            task_future.add_done_callback(lambda done, task=task: self._task_done(task, done))

    # -- outcomes -------------------------------------------------------------------------------

    def _calls_done(self, sent: _SentTask, numbers: list[int], outcomes: list[bytes]) -> None:
        """Complete the futures of calls of a running packed task (news from its worker)."""
        if sent.over:
            return
        entries = sent.entries
        for number, packed in zip(numbers, outcomes, strict=False):
            future = entries[number].future if 0 <= number < len(entries) else None
            if future is None or future.done():
                continue
            try:
                kind, value = pickle.loads(packed)
            except Exception:  # left to the task's outcome
                continue
            with self._lock:
                self._unfinished.discard(future)
            if kind == "ok":
                set_result(future, value)
            else:
                set_exception(future, value)

    def _task_done(self, sent: _SentTask, task_future: Future | None = None,
                   error: BaseException | None = None) -> None:
        sent.over = True
        with self._lock:
            if sent.short:
                self._short_in_flight -= 1
            else:
                self._long_in_flight -= 1
        if error is None and task_future is not None and not task_future.cancelled() and (
                task_future.exception() is None):
            # The slot is free: fill it before the results' callbacks run (joblib dispatches
            # its next batches in them, which takes tens of milliseconds).
            self.pump()
        try:
            self._deliver(sent, task_future, error)
        finally:
            self.pump()

    def _deliver(self, sent: _SentTask, task_future: Future | None,
                 error: BaseException | None) -> None:
        entries = sent.entries
        with self._lock:
            for entry in entries:
                self._unfinished.discard(entry.future)
        if error is None and task_future is not None:
            if task_future.cancelled():
                error = CancelledError("the task was cancelled in the dask cluster")
            else:
                error = task_future.exception()
        head = entries[0]
        if error is not None:
            if isinstance(error, CallMemoryError) and not self._closed:
                self._memory_killed(entries, error)
                return
            if (isinstance(error, WorkerLostError) and len(entries) > 1
                    and not self._closed):
                # Split: the calls without an outcome go again (each stays RUNNING: to the
                # caller it is one long run); the first, which was running when the worker
                # died, alone, so that only the call that kills fails.
                self._queue_again([entry for entry in entries if not entry.future.done()])
                return
            for entry in entries:
                set_exception(entry.future, error)
            return
        outcome = task_future.result()
        if head.task is not None and len(entries) == 1:
            set_result(head.future, outcome)
            return
        if head.task is not None:  # packed chunks: each decoded as its own task would be
            for entry, packed in zip(entries, outcome, strict=True):
                try:
                    value = entry.task[2](unpack_outcome(packed))
                except BaseException as raised:  # noqa: BLE001 - that chunk's failure
                    set_exception(entry.future, raised)
                else:
                    set_result(entry.future, value)
            return
        outcomes, seconds = outcome
        skipped = []
        for entry, (kind, value) in zip(entries, outcomes, strict=True):
            if entry.future.done():  # completed by the news of its call
                continue
            if kind == "ok":
                set_result(entry.future, value)
            elif kind == "error":
                set_exception(entry.future, value)
            else:  # finished on a lost worker, but its news never came: run it again
                skipped.append(entry)
        if seconds is not None and head.cost_key is not None:
            ran = sum(entry.calls for entry, (kind, _) in zip(entries, outcomes, strict=True)
                      if kind != SKIPPED[0])
            self._costs.record(head.cost_key, ran, seconds)
        self._queue_again(skipped)

    def _memory_killed(self, entries: list[QueuedCall], error: CallMemoryError) -> None:
        """A task's worker was killed for memory: its unfinished calls go up their ladders."""
        for entry in entries:
            if entry.future.done():  # finished before the kill (news of a packed task)
                continue
            if entry.ladder is None:
                set_exception(entry.future, error)
            else:
                entry.ladder.move_up(entry, error)

    def take_over(self, entries: list[QueuedCall]) -> None:
        """Queue, at the front, calls that come from another queue (a lower rung)."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._unfinished.update(entry.future for entry in entries)
                self._waiting.extendleft(reversed(entries))
        if closed:
            for entry in entries:
                set_exception(entry.future, CancelledError("the executor's cluster was closed"))
            return
        for entry in entries:
            entry.future.add_done_callback(self._forget)
        self.pump()

    def _queue_again(self, entries: list[QueuedCall]) -> None:
        """Queue calls of a lost task again, at the front; the first alone and isolated."""
        if not entries:
            return
        entries[0].alone = entries[0].isolated = True
        with self._lock:
            self._unfinished.update(entry.future for entry in entries)
        self._enqueue(entries, front=True)

    # -- the executor's view ----------------------------------------------------------------

    def outstanding(self) -> list[Future]:
        """Every future of the queue not done yet: waiting, waiting on others, or running."""
        with self._lock:
            return list(self._unfinished)

    def waiting_count(self) -> int:
        """Calls waiting in the client (for a free slot, or for their dependencies)."""
        with self._lock:
            return sum(entry.calls for entry in self._waiting) + self._blocked

    def waiting_entries(self) -> int:
        """Entries waiting in the client, without the lock (for the scaling policy's loop)."""
        return len(self._waiting) + self._blocked

    def cancel_waiting(self) -> int:
        """Cancel every call that waits in the client; return how many were cancelled."""
        with self._lock:
            self._waiting.clear()
            pending = [future for future in self._unfinished if not future.running()]
            self._unfinished.difference_update(pending)
        return _cancel_all(pending)

    def cancel_calls(self, futures: Iterable[Future]) -> int:
        """Cancel those of ``futures`` that wait in the client; return how many were cancelled.

        What :meth:`cancel_waiting` does for the whole queue, for some of its calls (a pool
        view's shutdown, :mod:`futures_hpc.pools`).
        """
        wanted = set(futures)
        with self._lock:
            kept = [entry for entry in self._waiting if entry.future not in wanted]
            self._waiting.clear()
            self._waiting.extend(kept)
            pending = [future for future in wanted
                       if future in self._unfinished and not future.running()]
            self._unfinished.difference_update(pending)
        return _cancel_all(pending)

    def close(self) -> None:
        """Stop sending; cancel what waits and fail what nobody will complete."""
        with self._lock:
            self._closed = True
            self._waiting.clear()
            unfinished = list(self._unfinished)
            self._unfinished.clear()
        for future in unfinished:
            if not future.cancel():
                set_exception(future, CancelledError("the executor's cluster was closed"))
            notify_if_cancelled(future)


def _cancel_all(futures: list[Future]) -> int:
    """Cancel ``futures`` (taken out of the queue); return how many were cancelled."""
    cancelled = 0
    for future in futures:
        if future.cancel():
            cancelled += 1
        notify_if_cancelled(future)
    return cancelled


def _decode_calls(outcome: tuple[Any, ...]) -> tuple[list[tuple[str, Any]], float | None]:
    return outcome[1], outcome[2]


def _packable_chunk(entry: QueuedCall) -> bool:
    """Whether a prepared task is a chunk of ``map`` that may share a task with others."""
    return (entry.task is not None and entry.task[0] is run_chunk
            and isinstance(entry.task[1], bytes) and len(entry.task[1]) <= LARGE_PAYLOAD_BYTES)


def _decode_chunks(outcome: tuple[Any, ...]) -> list[bytes]:
    """The packed outcome of each chunk of a :func:`~futures_hpc.calls.run_chunks` task."""
    return outcome[1]
