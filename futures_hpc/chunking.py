"""How many calls ``ex.map`` puts in one dask task.

Each dask task costs milliseconds of scheduling and messaging (:data:`TASK_SECONDS`), so
trivial calls want few, large chunks; calls of uneven length want several chunks per worker so
that no worker is left with the last long chunk while the others idle. An executor cannot know a
call's cost before it has run, so it remembers what it measured: workers time each chunk (see
:func:`futures_hpc.calls.run_chunk`, on :func:`futures_hpc.call_clock.call_clock`, which leaves
out the time a worker waited for a CPU it shares with others), and the next ``map`` of the same
function uses that figure, as joblib's automatic batching learns from the batches it has run.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

#: Chunks per worker thread when the function's cost is unknown or the work per worker is
#: long enough for balance to matter.
CHUNKS_PER_WORKER_SLOT = 4

#: The shortest chunk worth its own task: about 25 times the cost of a dask task, so that the
#: tasks add at most a few percent to the calls' own time.
MIN_CHUNK_SECONDS = 0.05

#: What one more task costs the client and the scheduler, in seconds, one task after the other:
#: about 3 ms of CPU per task in the client's process (measured with 2 local workers on 2 cores,
#: plain ``client.submit`` as much as ours; each worker spends another 2.3 ms, in parallel).
#: Work is split over more tasks only while that pays for it (:func:`useful_tasks`).
TASK_SECONDS = 0.003

#: How many functions' costs an executor remembers (least recently used forgotten first).
REMEMBERED_FUNCTIONS = 256

#: Weight of the newest measurement in the running per-call cost.
NEWEST_WEIGHT = 0.5


def function_key(packed_function: bytes) -> bytes:
    """A short key for a pickled function: equal pickles give equal keys."""
    return hashlib.blake2b(packed_function, digest_size=16).digest()


class CallCosts:
    """Seconds per call of each function an executor has run through ``map``; thread-safe."""

    def __init__(self) -> None:
        self._seconds: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, key: bytes, calls: int, seconds: float) -> None:
        """Add a chunk of ``calls`` calls that ran for ``seconds`` on a worker."""
        if calls < 1 or not seconds >= 0:
            return
        measured = seconds / calls
        with self._lock:
            known = self._seconds.pop(key, None)
            self._seconds[key] = measured if known is None else (
                NEWEST_WEIGHT * measured + (1 - NEWEST_WEIGHT) * known)
            while len(self._seconds) > REMEMBERED_FUNCTIONS:
                self._seconds.popitem(last=False)

    def seconds_per_call(self, key: bytes) -> float | None:
        """The running per-call cost, or None for a function not measured yet."""
        with self._lock:
            return self._seconds.get(key)


def useful_tasks(seconds: float, worker_slots: int) -> int:
    """How many tasks ``seconds`` of work is best split into, with ``worker_slots`` to run them.

    ``k`` tasks run ``seconds / k`` each, side by side, but the client sends them one after the
    other, :data:`TASK_SECONDS` each: the last ends about ``(k - 1) * TASK_SECONDS +
    seconds / k`` after the first is sent. One more task shortens that while
    ``seconds / (k - 1) - seconds / k >= TASK_SECONDS``, that is while
    ``k * (k - 1) * TASK_SECONDS <= seconds``; so a few milliseconds of trivial calls go in one
    task, not one per worker.

    Examples
    --------
    >>> useful_tasks(0.001, 4)     # 1 ms of work: one task
    1
    >>> useful_tasks(0.010, 4)     # 10 ms: two tasks of 5 ms beat three of 3.3 ms
    2
    >>> useful_tasks(1.0, 4)       # plenty of work: every slot
    4
    """
    slots = max(1, worker_slots)
    units = max(0.0, seconds) / TASK_SECONDS
    tasks = int((1 + math.sqrt(1 + 4 * units)) / 2)  # the largest k with k (k - 1) <= units
    return max(1, min(slots, tasks))


def automatic_chunksize(call_count: int, worker_slots: int,
                        seconds_per_call: float | None = None) -> int:
    """The chunk size for ``call_count`` calls over ``worker_slots`` worker threads.

    :data:`CHUNKS_PER_WORKER_SLOT` chunks per slot, fewer when the measured cost says a slot's
    share of the work is short: each chunk should run for at least :data:`MIN_CHUNK_SECONDS`.
    Where even one chunk per slot is shorter than that, the work goes in as many chunks as it
    pays to send (:func:`useful_tasks`): a few milliseconds of trivial calls make one chunk.

    Examples
    --------
    >>> automatic_chunksize(10_000, 2)            # cost unknown: 4 chunks per slot
    1250
    >>> automatic_chunksize(10_000, 2, 1e-6)      # 10 ms of work: two chunks
    5000
    >>> automatic_chunksize(10_000, 4, 1e-7)      # 1 ms of work: one chunk
    10000
    >>> automatic_chunksize(2_000, 2, 0.010)      # 10 s per slot: 4 chunks each
    250
    """
    slots = max(1, worker_slots)
    chunks_per_slot = CHUNKS_PER_WORKER_SLOT
    if seconds_per_call is not None:
        seconds_per_slot = call_count * seconds_per_call / slots
        chunks_per_slot = max(1, min(CHUNKS_PER_WORKER_SLOT,
                                     int(seconds_per_slot // MIN_CHUNK_SECONDS)))
        if chunks_per_slot == 1:
            chunks = useful_tasks(call_count * seconds_per_call, slots)
            return max(1, math.ceil(call_count / chunks))
    return max(1, math.ceil(call_count / (slots * chunks_per_slot)))
