"""The worker's side of a store: record each call's result as it finishes.

A task of an executor with a store carries a :class:`StoreSpec`: where the store is, the
function's id, and one key per call. The worker appends a record per successful call to a
segment of its own process (:class:`~futures_hpc.store.segments.SegmentWriter`), at most
:data:`~futures_hpc.store.segments.FLUSH_SECONDS` after it finished, and writes whatever is
held at the end of the task. Failed calls are not recorded: they run again. A result that cannot
be pickled for the store is not recorded either (it still goes back to the client).
"""

from __future__ import annotations

import atexit
import threading
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


def record(spec: StoreSpec, index: int, value: Any) -> None:
    """Record the result of the ``index``-th call of the task."""
    try:
        payload = pack_result(value)
    except Exception:  # not picklable for the store: it will run again next time
        return
    writer_for(spec.location).append(
        frames.frame(frames.CALL, spec.function_id, spec.keys[index], payload))


def record_block(location: str, job_key: bytes, block_key: bytes, value: Any) -> None:
    """Record that a block of ``map_blocks`` is written (with its partial result, if any)."""
    writer = writer_for(location)
    writer.append(frames.frame(frames.BLOCK, job_key, block_key, pack_result(value)))
    writer.flush()


def end_task(spec: StoreSpec | None) -> None:
    """Write what the task's calls left held."""
    if spec is not None:
        writer_for(spec.location).flush()


@atexit.register
def _close_writers() -> None:
    for writer in list(_writers.values()):
        try:
            writer.close()
        except Exception:
            pass
