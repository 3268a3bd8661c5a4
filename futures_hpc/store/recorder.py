"""The worker's side of a store: record each call's result as it finishes.

A task of an executor with a store carries a :class:`StoreSpec`: where the store is, the
function's id, and one key per call. The worker appends a record per successful call to a
segment of its own process (:class:`~futures_hpc.store.segments.SegmentWriter`).

A chunk of ``map`` whose spec has no keys (:meth:`~futures_hpc.store.Occurrences.worker_keyed`)
is recorded by :class:`ChunkRecorder` instead: one ``CALLS`` record per write, holding the
arguments of the calls it covers (a slice of a ``range`` stays a ``range``), their results in
one pickle, and the keys of the few calls that repeat earlier ones. Readers derive each call's
key from its arguments (:func:`~futures_hpc.store.identity.column_keys`), so the worker does no
per-call hashing or framing. Either way a call's record is written at most the writer's
:attr:`~futures_hpc.store.segments.SegmentWriter.flush_seconds` after it finished (2 ms on a
fast filesystem, more where writes are slow; on an object store,
:data:`~futures_hpc.store.segments.OBJECT_FLUSH_SECONDS`), and whatever is held is written at
the end of the task. Failed calls are not recorded: they run again. A result that cannot
be pickled for the store is not recorded either (it still goes back to the client).
"""

from __future__ import annotations

import atexit
import pickle
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import frames
from .flusher import FLUSHER
from .identity import column_keys
from .results import MISSING, pack_result, read_index, read_record
from .segments import FLUSH_BYTES, SegmentWriter

_writers: dict[str, SegmentWriter] = {}
_writers_lock = threading.Lock()


@dataclass(frozen=True)
class StoreSpec:
    """What a task needs to record its calls: the store, the function, a key per call.

    ``keys`` is None for a chunk of ``map`` keyed by its worker: ``overrides`` then holds the
    key of each call, by position, that repeats an earlier call of the run.
    """

    location: str
    function_id: bytes
    keys: tuple[bytes, ...] | None
    overrides: dict[int, bytes] | None = None


def recorded_results(spec: StoreSpec, columns: Sequence[Sequence[Any]] = ()) -> list[Any]:
    """The result the store holds for each call of a task, :data:`MISSING` for the others.

    Reads the index of the whole store: meant for a task that dask runs again after its
    worker was lost, whose calls that finished there were recorded. ``columns``: the chunk's
    arguments, when the spec has no keys.
    """
    index = read_index(spec.location, with_runs=False)
    found = []
    for key in spec.keys if spec.keys is not None else column_keys(
            spec.function_id, columns, spec.overrides):
        where = index.calls.get(key)
        found.append(MISSING if where is None else read_record(index, where))
    return found


def writer_for(location: str) -> SegmentWriter:
    """The writer of this process for the store at ``location`` (made on first use)."""
    writer = _writers.get(location)
    if writer is None:
        with _writers_lock:
            writer = _writers.get(location)
            if writer is None:
                writer = _writers[location] = SegmentWriter(location, "w")
    return writer


class TaskRecorder:
    """Records the calls of one task: held in the task, handed to the writer in batches.

    Parameters
    ----------
    spec : StoreSpec
        The store, the function and a key per call of the task.

    """

    def __init__(self, spec: StoreSpec) -> None:
        assert spec.keys is not None, "a spec without keys is recorded by ChunkRecorder"
        self.spec = spec
        self.writer = writer_for(spec.location)
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._last = time.monotonic()

    def add(self, number: int, value: Any) -> None:
        """Record the result of the task's ``number``-th call."""
        payload = _packed_or_none(value)
        if payload is None:  # not picklable for the store: it will run again next time
            return
        record = frames.frame(frames.CALL, self.spec.function_id, self.spec.keys[number],
                              payload)
        self._held.append(record)
        self._held_bytes += len(record)
        now = time.monotonic()
        if self._held_bytes >= FLUSH_BYTES or now - self._last >= self.writer.flush_seconds:
            self._last = now
            self.flush()

    def flush(self) -> None:
        """Write every record held now."""
        if not self._held:
            return
        started = time.thread_time()
        self.writer.write(self._held)
        self._held = []
        self._held_bytes = 0
        self.writer.note_cost(time.thread_time() - started)

    def close(self) -> None:
        """Write every record held now: the task ends."""
        self.flush()


class ChunkRecorder:
    """Records the calls of a chunk keyed by its worker, from the chunk's own results list.

    Parameters
    ----------
    spec : StoreSpec
        The store, the function, and the keys of the calls that repeat earlier ones.
    columns : sequence of sequences
        The chunk's arguments, of :data:`~futures_hpc.store.identity.WORKER_KEYED_TYPES`.
    results : list
        The list the chunk appends each call's result to.

    """

    def __init__(self, spec: StoreSpec, columns: Sequence[Sequence[Any]],
                 results: list[Any]) -> None:
        self.spec = spec
        self.writer = writer_for(spec.location)
        self._columns = columns
        self._results = results
        self._written = 0
        self._lock = threading.Lock()
        FLUSHER.add(self)

    def flush_seconds(self) -> float:
        """How long a finished call may wait to be written (the writer's interval)."""
        return self.writer.flush_seconds

    def add(self, number: int, value: Any) -> None:
        """The ``number``-th call finished: nothing to do, the store's thread writes it."""

    def flush(self) -> None:
        """Write the calls finished since the last write (those in the results), as one record."""
        with self._lock:
            started = time.thread_time()
            start, end = self._written, len(self._results)
            if end <= start:
                return
            self.writer.write([calls_record(self.spec, self._columns, self._results, start,
                                            end)])
            self._written = end
            self.writer.note_cost(time.thread_time() - started)

    def close(self) -> None:
        """Write what is left; the store's thread no longer flushes this chunk."""
        FLUSHER.discard(self)
        self.flush()


def calls_record(spec: StoreSpec, columns: Sequence[Sequence[Any]], results: list[Any],
                 start: int, end: int) -> bytes:
    """The ``CALLS`` record of a chunk's calls ``start`` to ``end`` (not included)."""
    arguments = [column[start:end] for column in columns]
    overrides = {position - start: key for position, key in (spec.overrides or {}).items()
                 if start <= position < end}
    packed_arguments = pickle.dumps((arguments, overrides), pickle.HIGHEST_PROTOCOL)
    values = results[start:end]
    encoding = frames.RESULTS_LIST
    try:
        packed_results = pickle.dumps(values, pickle.HIGHEST_PROTOCOL)
    except Exception:  # one of them needs cloudpickle, or cannot be pickled at all
        packed_results = pickle.dumps([_packed_or_none(value) for value in values],
                                      pickle.HIGHEST_PROTOCOL)
        encoding = frames.RESULTS_EACH
    payload = b"".join((frames.CALLS_HEADER.pack(len(packed_arguments), encoding), packed_arguments,
                        packed_results))
    return frames.frame(frames.CALLS, spec.function_id, frames.count_key(end - start), payload)


def _packed_or_none(value: Any) -> bytes | None:
    """A result's bytes: the standard pickler first (faster), cloudpickle for the rest."""
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        try:
            return pack_result(value)
        except Exception:
            return None


def record_block(location: str, job_key: bytes, block_key: bytes, value: Any) -> None:
    """Record that a block of ``map_blocks`` is written (with its partial result, if any)."""
    writer_for(location).write([frames.frame(frames.BLOCK, job_key, block_key,
                                             pack_result(value))])


@atexit.register
def _close_writers() -> None:
    for writer in list(_writers.values()):
        try:
            writer.close()
        except Exception:
            pass
