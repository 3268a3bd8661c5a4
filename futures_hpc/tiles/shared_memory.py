"""Shared memory (``/dev/shm``) between the client and the workers on its host.

In-memory inputs are staged there strip by strip, and a returned array is written there by the
workers, so the pixels never go through sockets.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import uuid
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from futures_hpc.errors import OptionError
from futures_hpc.tiles.arrays import (
    ArraySink,
    ArraySource,
    ImageSink,
    ImageSource,
    RawFileSink,
    RawFileSource,
    _leading,
    write_raw_window,
)

if TYPE_CHECKING:
    from futures_hpc.tiles.grid import TileGrid

logger = logging.getLogger("futures_hpc")

SHARED_MEMORY_DIR = "/dev/shm"


# --------------------------------------------------------------------------------------------
# shared memory on the client's host
# --------------------------------------------------------------------------------------------


def shared_memory_available() -> bool:
    """Tell whether this host has a writable ``/dev/shm``."""
    return os.path.isdir(SHARED_MEMORY_DIR) and os.access(SHARED_MEMORY_DIR, os.W_OK)


def new_shared_path(label: str) -> str:
    """Return a fresh file name in ``/dev/shm``."""
    return os.path.join(SHARED_MEMORY_DIR,
                        f"futures_hpc-{os.getpid()}-{uuid.uuid4().hex[:12]}-{label}")


def shared_memory_free() -> int:
    """Bytes free in ``/dev/shm``."""
    return shutil.disk_usage(SHARED_MEMORY_DIR).free


def _create_sparse(path: str, nbytes: int) -> int:
    # Sparse: pages are allocated by the writers themselves, in parallel, as they write.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, nbytes)
    return fd


class SharedMemoryStage:
    """A copy of an in-memory image in ``/dev/shm``, made strip by strip as blocks need it.

    Workers on the client's host read ``source`` (a :class:`RawFileSource`) directly, so the
    image never goes through sockets; copying lazily lets the first blocks start at once.
    """

    STRIP_BYTES = 32 << 20

    def __init__(self, array: Any, name: str):
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.path = new_shared_path("input")
        self.copied_rows = 0
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd = _create_sparse(self.path, nbytes)
        row_bytes = nbytes // max(1, self.shape[-2])
        self.strip_rows = max(1, self.STRIP_BYTES // max(1, row_bytes))
        self.source = RawFileSource(self.path, 0, self.shape, self.dtype, name, mapped=True)

    def ensure_rows(self, stop: int) -> None:
        """Copy image rows up to ``stop`` (rounded up to whole strips) if not done yet."""
        rows = self.shape[-2]
        while self.copied_rows < min(stop, rows):
            window = slice(self.copied_rows, min(rows, self.copied_rows + self.strip_rows))
            strip = np.asarray(self.array[_leading(self.shape) + (window, slice(None))])
            write_raw_window(self._fd, 0, self.shape, self.dtype, window,
                             slice(0, self.shape[-1]), strip)
            self.copied_rows = window.stop
        if self.copied_rows >= rows:
            self.close()

    def close(self) -> None:
        """Close the file (its name stays until :func:`remove_shared`)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def create_shared_output(shape: tuple[int, ...], dtype: Any) -> RawFileSink:
    """Create a zero-filled (sparse) raw image in ``/dev/shm`` for workers to write."""
    path = new_shared_path("output")
    dtype = np.dtype(dtype)
    os.close(_create_sparse(path, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize))
    return RawFileSink(path, 0, shape, dtype, mapped=True)


def map_shared_output(sink: RawFileSink) -> np.ndarray:
    """Map a shared-memory output as a numpy array, then remove its name.

    The memory stays valid as long as the array (which owns the mapping) lives.
    """
    nbytes = int(np.prod(sink.shape, dtype=np.int64)) * sink.dtype.itemsize
    if nbytes == 0:
        return np.zeros(sink.shape, sink.dtype)
    fd = os.open(sink.path, os.O_RDWR)
    try:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(fd, nbytes, flags=flags)
    finally:
        os.close(fd)
    return np.frombuffer(mapping, sink.dtype).reshape(sink.shape)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------
# shared memory between the client and workers on the same host
# --------------------------------------------------------------------------------------------


def _read_token(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


#: Per client, the workers last asked whether they see this host's ``/dev/shm``, and the answer.
_SHARING_CHECKED: weakref.WeakKeyDictionary[Any, tuple[frozenset[str], bool]] = (
    weakref.WeakKeyDictionary())


def _workers_share_memory(executor: Any) -> bool:
    """Tell whether every current worker sees this client's ``/dev/shm`` (and there is one).

    The answer is kept while the same workers are connected: asking the scheduler who they are
    is one round trip to it, while asking the workers is a broadcast through it to each of them.
    A worker that joins later and does not see the file is still handled: its task answers
    that it cannot read the input, and the client sends it the data.
    """
    if not shared_memory_available():
        return False
    client = executor.client
    workers = frozenset(client.nthreads())
    checked = _SHARING_CHECKED.get(client)
    if checked is not None and checked[0] == workers:
        return checked[1]
    shared = _ask_workers_for_token(executor)
    _SHARING_CHECKED[client] = (workers, shared)
    return shared


def _ask_workers_for_token(executor: Any) -> bool:
    """Write a token in ``/dev/shm``; True if every worker reads it back."""
    path = new_shared_path("token")
    token = uuid.uuid4().bytes
    with open(path, "wb") as handle:
        handle.write(token)
    try:
        answers = executor.client.run(_read_token, path)
    finally:
        _remove(path)
    return bool(answers) and all(answer == token for answer in answers.values())


def _decide_shared_memory(executor: Any, shared_memory: bool | None, needed_bytes: int) -> bool:
    """Use ``/dev/shm`` if asked or, by default, if workers share it and it has the room."""
    if shared_memory is False or needed_bytes == 0:
        return False
    if shared_memory is None and shared_memory_available() and (
            shared_memory_free() < needed_bytes):
        logger.info("not enough room in /dev/shm for %d MiB; sending blocks instead",
                    needed_bytes >> 20)
        return False
    shared = _workers_share_memory(executor)
    if shared_memory and not shared:
        raise OptionError("shared_memory=True, but not every worker sees this client's /dev/shm")
    return shared


def _output_bytes(sink: ImageSink | None, out: Any, grid: TileGrid) -> int:
    """Bytes of an output held in memory (a guess of one float64 band when out is None)."""
    if isinstance(sink, ArraySink):
        return sink.array.nbytes
    if out is None:
        return grid.image_shape[0] * grid.image_shape[1] * 8
    return 0


def _shared_bytes_needed(sources: list[ImageSource], output_bytes: int) -> int:
    staged = sum(int(np.prod(source.shape, dtype=np.int64)) * source.dtype.itemsize
                 for source in sources if isinstance(source, ArraySource))
    return staged + output_bytes
