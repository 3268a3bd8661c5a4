"""How ``map`` cuts its calls into chunks, queues them and yields their results in order.

A chunk is one task of many calls of the same function (:func:`futures_hpc.calls.run_chunk`);
the executor's call queue (:mod:`futures_hpc.call_queue`) decides when each goes to the cluster.
"""

from __future__ import annotations

import itertools
import pickle
import reprlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from .call_queue import CallQueue
from .calls import pack_chunk, run_chunk
from .queued_call import PLAIN_TYPES, function_name, pack_arguments, pickled
from .store import MISSING, StoreSpec
from .store.identity import WORKER_KEYED_TYPES

#: With an input of unknown length, chunks grow from 1 call by doubling up to this size.
MAX_GROWING_CHUNKSIZE = 256

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _short_repr(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


def describe_function(function: Callable[..., Any]) -> str:
    """The function's qualified name and module, for errors."""
    name = getattr(function, "__qualname__", None) or function_name(function)
    module = getattr(function, "__module__", None)
    return f"{module}.{name}" if module else name


def describe_call(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict) -> str:
    """A short text naming a call, for errors: ``name(arg, key=value)``, cut at 200 characters."""
    parts = [_short_repr(value) for value in args]
    parts += [f"{key}={_short_repr(value)}" for key, value in kwargs.items()]
    text = f"{getattr(function, '__qualname__', function_name(function))}({', '.join(parts)})"
    return text if len(text) <= 200 else text[:197] + "..."


def _decode_chunk(
    outcome: tuple[Any, ...],
) -> tuple[list[Any], BaseException | None, float | None]:
    return outcome[1], outcome[2], outcome[3]



def plan_chunks(
    iterables: tuple[Iterable[Any], ...],
    chunksize: int | None,
    buffersize: int | None,
    automatic: Callable[[int], int],
) -> tuple[Iterator[list[Sequence[Any]]], int | None]:
    """The chunks of a map (each a list of argument columns) and the call count, if known.

    With ``buffersize`` the iterables are read lazily, in chunks of ``chunksize`` or growing
    ones; otherwise they are read (or sliced) at once into chunks of ``chunksize`` or of
    ``automatic(call count)``.
    """
    if buffersize is not None:
        sizes = (
            itertools.repeat(chunksize)
            if chunksize is not None
            else (min(2**power, MAX_GROWING_CHUNKSIZE) for power in itertools.count())
        )
        return _chunks_of_calls(zip(*iterables, strict=False), sizes), None
    columns = _as_columns(iterables)
    total = min((len(column) for column in columns), default=0)
    return _sliced_chunks(columns, total, chunksize or automatic(total)), total


def submit_chunks(
    queue: CallQueue,
    fn: Callable[..., Any],
    packed_function: bytes,
    chunks: Iterable[list[Sequence[Any]]],
    key: bytes | None = None,
    function_id: bytes | None = None,
) -> list[Future]:
    """Queue chunks of calls of ``fn``; their futures give decoded outcomes.

    The chunks are queued together and then sent: those measured as quick share tasks.

    With ``function_id`` (the executor has a store), calls recorded in the store are answered
    from it, and a chunk's task runs only its other calls, recording their results.
    """
    chunks = list(chunks)
    if not chunks:
        return []
    if function_id is not None:
        return _submit_stored_chunks(queue, fn, packed_function, chunks, key, function_id)
    payloads = [
        pickled(
            lambda columns=columns: pack_chunk(packed_function, columns),
            lambda columns=columns: _describe_chunk(fn, columns),
        )
        for columns in chunks
    ]
    futures = [_queue_chunk(queue, fn, payload, columns, key, _decode_chunk, pump=False)
               for payload, columns in zip(payloads, chunks, strict=True)]
    queue.pump()
    return futures


def _describe_chunk(fn: Callable[..., Any], columns: Sequence[Sequence[Any]]) -> str:
    return (f"a chunk of calls of {describe_function(fn)} starting "
            f"with {describe_call(fn, tuple(column[0] for column in columns), {})}")


def _queue_chunk(queue: CallQueue, fn: Callable[..., Any], payload: bytes,
                 columns: Sequence[Sequence[Any]], key: bytes | None,
                 decode: Callable[[Any], Any], pump: bool = True) -> Future:
    count = min((len(column) for column in columns), default=0)
    first = tuple(column[0] for column in columns) if count else ()
    return queue.submit_task(
        run_chunk, payload, decode, f"{function_name(fn)}-map",
        lambda: f"{describe_call(fn, first, {})} (first of a chunk of {count} calls)",
        key, count, pump=pump,
    )


def _submit_stored_chunks(queue: CallQueue, fn: Callable[..., Any], packed_function: bytes,
                          chunks: list[list[Sequence[Any]]], key: bytes | None,
                          function_id: bytes) -> list[Future]:
    """Chunks of calls with a store: answer recorded calls, queue a task for the others.

    Calls of plain values (numbers, strings, bytes) cannot fail to pickle: each chunk is then
    queued as soon as its keys are made, so that the workers start while later chunks are
    keyed. Otherwise every chunk is keyed first, and a call that cannot be pickled fails the
    map before anything is queued.
    """
    kinds = [_argument_types(columns) for columns in chunks]
    if all(types <= PLAIN_TYPES for types in kinds):
        futures = []
        for columns, types in zip(chunks, kinds, strict=True):
            futures.append(_queue_planned(queue, fn, key, *_plan_stored_chunk(
                queue, fn, packed_function, columns, function_id, types)))
            queue.pump()
        return futures
    planned = [_plan_stored_chunk(queue, fn, packed_function, columns, function_id, types)
               for columns, types in zip(chunks, kinds, strict=True)]
    futures = [_queue_planned(queue, fn, key, *plan) for plan in planned]
    queue.pump()
    return futures


def _argument_types(columns: Sequence[Sequence[Any]]) -> set[type]:
    """The types of the values in ``columns`` (a ``range`` holds ints)."""
    types: set[type] = set()
    for column in columns:
        if type(column) is range:
            types.add(int)
        else:
            types.update(map(type, column))
    return types


def _plan_stored_chunk(
    queue: CallQueue, fn: Callable[..., Any], packed_function: bytes,
    columns: Sequence[Sequence[Any]], function_id: bytes, types: set[type],
) -> tuple[bytes | None, list[Sequence[Any]] | None, list[Any] | None, list[int] | None]:
    """A chunk's keys, what the store holds, and the payload of a task for the rest.

    A chunk of a function the store holds nothing of, with arguments a worker can key, is
    sent whole with no keys (``recorded`` and ``missing`` are then None): its worker records
    each call under a key derived from its arguments.
    """
    worker_keyed = types <= WORKER_KEYED_TYPES
    if worker_keyed:
        overrides = queue.worker_keyed(function_id, columns, types)
        if overrides is not None:
            spec = StoreSpec(queue.store.location, function_id, None, overrides)
            payload = pickled(lambda: pack_chunk(packed_function, columns, spec),
                              lambda: _describe_chunk(fn, columns))
            return payload, list(columns), None, None
    calls = list(zip(*columns, strict=False))
    if types <= PLAIN_TYPES:  # as pack_arguments(call, {}) packs them, without its checks
        dumps, protocol, no_keywords = pickle.dumps, pickle.HIGHEST_PROTOCOL, {}
        packed = [dumps((call, no_keywords), protocol) for call in calls]
    else:
        packed = [pickled(lambda call=call: pack_arguments(call, {}),
                          lambda call=call: describe_call(fn, call, {})) for call in calls]
    keys = queue.store_keys(function_id, packed, calls if worker_keyed else None)
    del packed
    recorded = queue.store.results(keys)
    missing = [index for index, value in enumerate(recorded) if value is MISSING]
    if not missing:
        return None, None, recorded, missing
    spec = StoreSpec(queue.store.location, function_id, tuple(keys[i] for i in missing))
    if len(missing) == len(calls):
        sub_columns = list(columns)  # as they are: a slice of a range stays small
    else:
        sub_columns = [[calls[i][position] for i in missing] for position in range(len(columns))]
    payload = pickled(lambda: pack_chunk(packed_function, sub_columns, spec),
                      lambda: _describe_chunk(fn, sub_columns))
    return payload, sub_columns, recorded, missing


def _queue_planned(queue: CallQueue, fn: Callable[..., Any], key: bytes | None,
                   payload: bytes | None, sub_columns: list[Sequence[Any]] | None,
                   recorded: list[Any] | None, missing: list[int] | None) -> Future:
    if payload is None:
        done: Future = Future()
        done.set_result((recorded, None, None))
        return done
    if recorded is None or missing is None:  # nothing looked up: the task runs every call
        return _queue_chunk(queue, fn, payload, sub_columns, key, _decode_chunk)
    return _queue_chunk(queue, fn, payload, sub_columns, key,
                        lambda outcome: _merge_recorded(_decode_chunk(outcome), recorded, missing))


def _merge_recorded(
    computed: tuple[list[Any], BaseException | None, float | None],
    recorded: list[Any], missing: list[int],
) -> tuple[list[Any], BaseException | None, float | None]:
    """A chunk's results in order: recorded ones, and those its task computed, to a failure."""
    results, error, seconds = computed
    merged = recorded
    computed_results = iter(results)
    for index in missing:
        value = next(computed_results, MISSING)
        if value is MISSING:  # the call that failed: the chunk's results stop before it
            del merged[index:]
            break
        merged[index] = value
    if seconds is not None and results:  # seconds as if every call of the chunk had run
        seconds *= (len(merged) + (error is not None)) / (len(results) + (error is not None))
    return merged, error, seconds


def results_in_order(
    pending: deque[Future],
    refill: Iterator[list[Sequence[Any]]] | None,
    submit_one: Callable[[list[Sequence[Any]]], Future],
    record_cost: Callable[[int, float], None],
    end_time: float | None,
) -> Iterator[Any]:
    """Yield the results of the chunks in ``pending``, in order, topping up from ``refill``.

    Each result is handed out and dropped: the caller alone decides how long it lives. The first
    failing call raises when reached; leaving early cancels what was not yielded.
    """
    try:
        while pending:
            remaining = None if end_time is None else end_time - time.monotonic()
            results, error, seconds = pending[0].result(remaining)
            pending.popleft()
            if seconds is not None:
                record_cost(len(results) + (error is not None), seconds)
            if refill is not None:
                chunk = next(refill, None)
                if chunk is not None:
                    pending.append(submit_one(chunk))
            results.reverse()
            while results:
                yield results.pop()
            del results
            if error is not None:
                raise error
    finally:
        for future in pending:
            future.cancel()


def _is_sliceable(iterable: Iterable[Any]) -> bool:
    return isinstance(iterable, (list, tuple, range, str, bytes)) or (
        type(iterable).__name__ == "ndarray" and getattr(iterable, "ndim", 0) >= 1
    )


def _as_columns(iterables: tuple[Iterable[Any], ...]) -> list[Sequence[Any]]:
    """The iterables as sequences that slice cheaply; lists, tuples, ranges, arrays as they are.

    Otherwise the calls are read with ``zip`` (which stops at the shortest iterable, so an
    endless iterator beside a finite one is fine, as with the standard library's ``map``).
    """
    if all(_is_sliceable(iterable) for iterable in iterables):
        return list(iterables)
    calls = list(zip(*iterables, strict=False))
    if not calls:
        return [[] for _ in iterables]
    return [list(column) for column in zip(*calls, strict=True)]


def _sliced_chunks(
    columns: list[Sequence[Any]], total: int, chunksize: int
) -> Iterator[list[Sequence[Any]]]:
    for start in range(0, total, chunksize):
        stop = min(start + chunksize, total)
        yield [column[start:stop] for column in columns]


def _chunks_of_calls(
    calls: Iterator[tuple[Any, ...]], sizes: Iterator[int]
) -> Iterator[list[Sequence[Any]]]:
    for size in sizes:
        chunk = list(itertools.islice(calls, size))
        if not chunk:
            return
        yield [list(column) for column in zip(*chunk, strict=True)]
