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
from .results import pack_result
from .segments import SegmentWriter

_writers: dict[str, SegmentWriter] = {}
_writers_lock = threading.Lock()


@dataclass(frozen=True)
class StoreSpec:
    """What a task needs to record its calls: the store, the function, a key per call."""

    location: str
    function_id: bytes
    keys: tuple[bytes, ...]


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
        self._last = time.monotonic()

    def add(self, number: int, value: Any) -> None:
        """Record the result of the task's ``number``-th call."""
        try:
            payload = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception:
            try:
                payload = pack_result(value)
            except Exception:  # not picklable for the store: it will run again next time
                return
        self._held.append(frames.frame(frames.CALL, self.spec.function_id,
                                       self.spec.keys[number], payload))
        now = time.monotonic()
        if now - self._last >= self.writer.flush_seconds:
            self._last = now
            self.flush()

    def flush(self) -> None:
        """Write every record held now."""
        if self._held:
            self.writer.append_all(self._held)
            self._held = []
        self.writer.flush()


def record_block(location: str, job_key: bytes, block_key: bytes, value: Any) -> None:
    """Record that a block of ``map_blocks`` is written (with its partial result, if any)."""
    writer = writer_for(location)
    writer.append(frames.frame(frames.BLOCK, job_key, block_key, pack_result(value)))
    writer.flush()


@atexit.register
def _close_writers() -> None:
    for writer in list(_writers.values()):
        try:
            writer.close()
        except Exception:
            pass
