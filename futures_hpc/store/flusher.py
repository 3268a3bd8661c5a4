"""The thread that writes the finished calls of running map chunks.

A chunk of ``map`` keyed by its worker (:class:`~futures_hpc.store.recorder.ChunkRecorder`)
appends each result to its results list and does nothing else per call. While such chunks
run, one thread per worker process wakes every
:attr:`~futures_hpc.store.segments.SegmentWriter.flush_seconds` and has each of them write what
finished since its last write. Reading the list from this thread is safe: appending to and
slicing a list are atomic in CPython. When no chunk runs, the thread waits and costs nothing.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Flushable(Protocol):
    """What the thread flushes."""

    def flush(self) -> None:
        """Write what finished since the last write."""

    def flush_seconds(self) -> float:
        """How long what finished may wait to be written."""


class Flusher:
    """Flushes every registered recorder at its interval, from one daemon thread."""

    def __init__(self) -> None:
        self._recorders: set[Flushable] = set()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, recorder: Flushable) -> None:
        """Flush ``recorder`` from now on, until :meth:`discard`."""
        with self._changed:
            self._recorders.add(recorder)
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(target=self._run, name="futures_hpc-store",
                                                daemon=True)
                self._thread.start()
            self._changed.notify()

    def discard(self, recorder: Flushable) -> None:
        """Stop flushing ``recorder`` (its owner writes the rest)."""
        with self._changed:
            self._recorders.discard(recorder)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._recorders:
                    self._changed.wait()
                recorders = list(self._recorders)
            time.sleep(min(recorder.flush_seconds() for recorder in recorders))
            for recorder in recorders:
                try:
                    recorder.flush()
                except Exception:  # a write that failed: the task's own last write reports it
                    pass


#: This process's flusher.
FLUSHER = Flusher()
