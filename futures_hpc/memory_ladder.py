"""More memory on retry: ``ex.with_resources(memory=["1GB", "2GB", "4GB"])``.

A list of memories is a *ladder*: one pool per rung (:mod:`futures_hpc.pools`), each made on
first use. A call runs on the first rung; when its worker is killed for memory, it goes at once
to the next rung's queue (the same :class:`~futures_hpc.queued_call.QueuedCall`, the same
future, still RUNNING to its caller), not first again on the same shape. On the last rung, a
memory kill fails it with :class:`~futures_hpc.errors.CallMemoryError` naming the call and the
memory it had. A call that kills its worker another way follows ``max_call_retries``.

How a memory kill is known (:mod:`futures_hpc.memory_kills`): dask's nanny measures its
worker's memory and, above ``distributed.worker.memory.terminate`` (95 %) of the limit, logs a
``worker-restart-memory`` event and ends the worker. A scheduler plugin sees the event, finds
the ladder task the worker was running, tells the executor's client and cancels the task in the
scheduler, so that dask does not retry it on the same shape; the client's bridge then fails the
task with a :class:`~futures_hpc.errors.CallMemoryError` that its call queue hands to
:meth:`MemoryLadder.move_up`.

The rungs' workers declare :data:`~futures_hpc.memory_kills.LADDER_RESOURCE` and their tasks
need it: only ladder calls are ever moved on a memory kill, and a rung's worker holds one task
at a time, so that the scheduler knows which task was running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from .errors import CallMemoryError, OptionError
from .options import format_bytes, parse_memory
from .pool_shape import PoolShape

if TYPE_CHECKING:
    from .call_queue import CallQueue
    from .queued_call import QueuedCall


class RungPool(Protocol):
    """What a ladder needs of a rung's pool (a :class:`~futures_hpc.pools.ResourcePool`)."""

    #: Why the pool cannot run calls (its jobs were refused), once it cannot.
    failure: BaseException | None
    #: The pool's calls; None if it has none.
    queue: CallQueue | None


def is_ladder(memory: Any) -> bool:
    """Whether a ``memory`` option is a ladder (a list or tuple of memories)."""
    return isinstance(memory, (list, tuple))


def parse_ladder(memory: Sequence[Any]) -> tuple[tuple[str, int], ...]:
    """Check a memory ladder: ``(memory as given, bytes)`` per rung.

    Raises
    ------
    OptionError
        Naming ``memory`` and its value: an empty ladder, a bad amount, or a rung not larger
        than the one before.

    """
    if not memory:
        raise OptionError(f"memory={list(memory)!r} is an empty memory ladder; give one or "
                          "more growing amounts, e.g. memory=['4GB', '16GB']")
    rungs: list[tuple[str, int]] = []
    for position, value in enumerate(memory):
        amount = parse_memory(value, option=f"memory[{position}]")
        text = value.strip() if isinstance(value, str) else f"{int(value)}B"
        if rungs and amount <= rungs[-1][1]:
            raise OptionError(
                f"memory={list(memory)!r} does not grow: rung {position} ({value!r}) must be "
                f"larger than rung {position - 1} ({memory[position - 1]!r}); a memory ladder "
                "gives more memory on each retry")
        rungs.append((text, amount))
    return tuple(rungs)


class MemoryLadder:
    """The rungs of one ``with_resources(memory=[...])``: shapes, pools made on first use.

    Parameters
    ----------
    pool_of : callable
        ``pool_of(shape)`` is the executor's pool of that shape, made on first use
        (:meth:`futures_hpc.pools.Pools.get`).
    first : PoolShape
        The shape of the first rung (the other options of ``with_resources``).
    rungs : tuple of (str, int)
        From :func:`parse_ladder`.

    """

    def __init__(self, pool_of: Callable[[PoolShape], RungPool], first: PoolShape,
                 rungs: tuple[tuple[str, int], ...]) -> None:
        self._pool_of = pool_of
        self.shapes: tuple[PoolShape, ...] = tuple(
            replace(first, memory=text, memory_bytes=amount, memory_ladder=True)
            for text, amount in rungs)
        self._pools: list[RungPool | None] = [None] * len(self.shapes)
        self._lock = threading.Lock()

    def describe(self) -> str:
        """``memory=['1GB', '2GB']``."""
        return f"memory={[shape.memory for shape in self.shapes]!r}"

    def pool(self, rung: int) -> RungPool:
        """The pool of ``rung``, made (and its scaling started) on first use."""
        with self._lock:
            pool = self._pools[rung]
        if pool is None:
            pool = self._pool_of(self.shapes[rung])
            with self._lock:
                self._pools[rung] = pool
        return pool

    def move_up(self, entry: QueuedCall, killed: CallMemoryError) -> None:
        """A call of rung ``entry.rung`` was killed for memory: queue it on the next rung.

        On the last rung (or once the executor closes), fail it with a
        :class:`~futures_hpc.errors.CallMemoryError` naming the call and its memory.
        """
        from .queued_call import set_exception

        next_rung = entry.rung + 1
        if next_rung < len(self.shapes):
            try:
                pool = self.pool(next_rung)
            except Exception as error:  # the executor is closing: say why the call failed
                set_exception(entry.future, error)
                return
            if pool.failure is not None or pool.queue is None:  # its jobs cannot run
                set_exception(entry.future, pool.failure or RuntimeError(
                    f"the pool of rung {next_rung} of {self.describe()} has no call queue"))
                return
            queue = pool.queue
            entry.rung = next_rung
            queue.take_over([entry])
            return
        shape = self.shapes[entry.rung]
        limit = killed.memory_limit or shape.memory_bytes
        if killed.rss is None:  # the kernel's out-of-memory killer: no measure of its own
            how = (f"the kernel's out-of-memory killer ended its worker (memory cgroup full; "
                   f"worker limit {format_bytes(limit)})")
        else:
            how = (f"its worker's process used {format_bytes(killed.rss)} of its "
                   f"{format_bytes(limit)} limit")
        set_exception(entry.future, CallMemoryError(
            f"{entry.describe()} was killed for using too much memory on every rung of its "
            f"memory ladder ({self.describe()}): on the last, memory={shape.memory}, {how}. "
            "Give the ladder a larger last rung, or make the call use less memory.",
            memory=shape.memory, rss=killed.rss, memory_limit=limit,
        ))


class LadderEntrance:
    """The first rung's call queue as the executor's ``submit``/``map`` see it.

    Every call or chunk queued through it belongs to the ladder (starts on rung 0); everything
    else is the queue's own.
    """

    def __init__(self, queue: CallQueue, ladder: MemoryLadder) -> None:
        self._queue = queue
        self._ladder = ladder

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`CallQueue.submit`, the call on the ladder."""
        return self._queue.submit(*args, ladder=self._ladder, **kwargs)

    def submit_task(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`CallQueue.submit_task`, the chunk on the ladder."""
        return self._queue.submit_task(*args, ladder=self._ladder, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    def __bool__(self) -> bool:
        return True
