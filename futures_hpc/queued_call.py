"""One call in the call queue: what it carries, how it is pickled, its future's states.

The call queue (:mod:`futures_hpc.call_queue`) pickles each call once, when it is queued:
plain arguments with the standard C pickler, others with cloudpickle, and a failure becomes a
:class:`~futures_hpc.errors.CallSerializationError` naming the call. Standard futures among
the arguments make the call wait for them (:func:`find_futures`), and are replaced by their
values when it is released (:func:`substitute_futures`). The helpers at the end move a
call's standard future through its states, tolerating a future cancelled or completed in
between.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import distributed

from .errors import CallSerializationError


@dataclass(eq=False)
class QueuedCall:
    """One entry of the queue: a call of ``submit``, or a prepared task (a chunk of ``map``).

    Attributes
    ----------
    future : concurrent.futures.Future
        What the caller holds.
    name : str
        The function's name, for the task key.
    describe : callable
        Names the call in errors (built only when needed).
    cost_key : bytes or None
        The function's key in the executor's :class:`~futures_hpc.chunking.CallCosts`.
    packed_function, packed_arguments : bytes or None
        For a call: the pickled function and ``(args, kwargs)``.
    task : tuple or None
        For a prepared task: ``(worker function, payload, decode)``; the future gets the decoded
        outcome of the whole task.
    calls : int
        Calls in the entry (a chunk has many).
    dask_dependencies : list of distributed.Future
        Top-level ``distributed.Future`` arguments, passed to the task by dask.
    alone : bool
        Never packed with others (dask dependencies, a large payload, or split from a lost task).
    isolated : bool
        Split from a task whose worker died: sent only to a free worker thread, never as a
        look-ahead behind another task, so that a call that kills its worker takes no other
        call with it.
    ladder : MemoryLadder or None
        For a call of ``with_resources(memory=[...])``: its memory ladder
        (:mod:`futures_hpc.memory_ladder`); ``rung`` is where it runs now.
    batch_cost_key : bytes or None
        For a call that runs a batch of ``calls`` calls made by its caller (joblib's): the cost
        key its batches share (see :meth:`~futures_hpc.call_queue.CallQueue.submit`).

    """

    future: Future
    name: str
    describe: Callable[[], str]
    cost_key: bytes | None = None
    packed_function: bytes | None = None
    packed_arguments: bytes | None = None
    task: tuple[Callable[..., Any], Any, Callable[[Any], Any]] | None = None
    calls: int = 1
    dask_dependencies: list[distributed.Future] = field(default_factory=list)
    alone: bool = False
    isolated: bool = False
    function_id: bytes | None = None
    store_key: bytes | None = None
    ladder: Any = None
    rung: int = 0
    batch_cost_key: bytes | None = None


def function_name(function: Callable[..., Any]) -> str:
    """A name for task keys: letters, digits and ``_`` only, at most 40 characters."""
    name = getattr(function, "__name__", None) or type(function).__name__
    return "".join(character if character.isalnum() else "_" for character in name)[:40]


def pickled(pack: Callable[[], Any], describe: Callable[[], str]) -> Any:
    """Run ``pack``; a pickling failure becomes a CallSerializationError naming the call."""
    try:
        return pack()
    except Exception as error:
        raise CallSerializationError(
            f"cannot send {describe()} to the workers: it cannot be pickled "
            f"({type(error).__name__}: {error}). Functions and arguments must be picklable by "
            "cloudpickle: define them at module level or pass plain data instead of open "
            "files, locks, connections or generators."
        ) from error


#: Argument types that the standard pickle module pickles exactly as cloudpickle would.
PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})


def pack_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle ``(args, kwargs)``: with the C pickler for plain values, else with cloudpickle."""
    if all(type(value) in PLAIN_TYPES for value in args) and all(
        type(value) in PLAIN_TYPES for value in kwargs.values()
    ):
        return pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    return cloudpickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)


def find_futures(value: Any, found: list[Future]) -> None:
    """Collect the standard futures in ``value``: itself, or inside lists, tuples, sets, dicts."""
    kind = type(value)
    if kind is Future or isinstance(value, Future):
        found.append(value)
    elif kind in (list, tuple, set, frozenset):
        for item in value:
            find_futures(item, found)
    elif kind is dict:
        for item in value.values():
            find_futures(item, found)


def substitute_futures(value: Any) -> Any:
    """``value`` with every standard future replaced by its result (the futures are done)."""
    kind = type(value)
    if kind is Future or isinstance(value, Future):
        return value.result()
    if kind in (list, tuple, set, frozenset):
        return kind(substitute_futures(item) for item in value)
    if kind is dict:
        return {key: substitute_futures(item) for key, item in value.items()}
    return value


def qualified_name(function: Callable[..., Any]) -> str:
    """``module.qualname`` of a function (of the function inside a partial or a method)."""
    inner = getattr(function, "func", None) or getattr(function, "__func__", None) or function
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    module = getattr(inner, "__module__", None) or type(inner).__module__
    return f"{module}.{name}"


def notify_if_cancelled(future: Future) -> None:
    """Move a cancelled future on to CANCELLED_AND_NOTIFIED, which ``wait()`` counts as done.

    The standard library's executors do this when their queue reaches a cancelled call. The
    queue calls it once per future: where it does, it also forgets the future.
    """
    if future.cancelled():
        try:
            future.set_running_or_notify_cancel()
        except RuntimeError:  # notified already
            pass


def mark_running(entry: QueuedCall) -> bool:
    """Make a call's future RUNNING as it goes to the cluster; False if it is done already."""
    if entry.future.running():  # queued again after its task was lost
        return True
    try:
        return entry.future.set_running_or_notify_cancel()
    except RuntimeError:  # already finished (failed by the executor while waiting)
        return False


def set_result(future: Future, value: Any) -> None:
    """Complete ``future`` with ``value``, unless it is cancelled or done already."""
    try:
        future.set_result(value)
    except Exception:  # cancelled or completed in between
        pass


def set_exception(future: Future, error: BaseException) -> None:
    """Fail ``future`` with ``error``, unless it is cancelled or done already."""
    try:
        future.set_exception(error)
    except Exception:  # cancelled or completed in between
        pass
