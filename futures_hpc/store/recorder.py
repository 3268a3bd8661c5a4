"""The worker's side of a store: record each call's result as it finishes.

A task of an executor with a store carries a :class:`StoreSpec`: where the store is, the
function's id, and one key per call. The worker appends a record per successful call to a
segment of its own process (:class:`~futures_hpc.store.segments.SegmentWriter`), at most
:data:`~futures_hpc.store.segments.FLUSH_SECONDS` after it finished (on an object store,
:data:`~futures_hpc.store.segments.OBJECT_FLUSH_SECONDS`), and writes whatever is
held at the end of the task. Failed calls are not recorded: they run again. A result that cannot
be pickled for the store is not recorded either (it still goes back to the client).
"""

from __future__ import annotations

import atexit
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import frames
from .results import MISSING, pack_result, read_index, read_record
from .segments import FLUSH_BYTES, SegmentWriter

_writers: dict[str, SegmentWriter] = {}
_writers_lock = threading.Lock()


@dataclass(frozen=True)
class StoreSpec:
    """What a task needs to record its calls: the store, the function, a key per call."""

    location: str
    function_id: bytes
    keys: tuple[bytes, ...]


def recorded_results(spec: StoreSpec) -> list[Any]:
    """The result the store holds for each call of a task, :data:`MISSING` for the others.

    Reads the index of the whole store: meant for a task that dask runs again after its
    worker was lost, whose calls that finished there were recorded.
    """
    index = read_index(spec.location, with_runs=False)
    found = []
    for key in spec.keys:
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
        self.writer.write(self._held)
        self._held = []
        self._held_bytes = 0


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
