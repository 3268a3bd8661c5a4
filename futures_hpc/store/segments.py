"""Where a store lives, and the segment files in it: one writer each, appended, never rewritten.

A store is a directory (a local or shared-filesystem path, or an ``fsspec`` URL such as
``s3://bucket/prefix``) holding a marker file and a ``segments/`` directory. On a filesystem
every writer process appends to a file of its own; on an object store, which cannot append,
each flush writes one object of its own. Either way two programs, or two hundred workers, never
write the same file, so nothing needs a lock that a parallel filesystem may not give across
nodes, and a reader may list and read the segments while they grow.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: The marker file at the top of a store, and its first line.
MARKER = "FUTURES_HPC_STORE"
MARKER_TEXT = "futures_hpc result store, format 1\n"
SEGMENTS = "segments"
SUFFIX = ".fhs"
#: A task's records are written once :data:`MIN_FLUSH_SECONDS` passed since its last write, or
#: :data:`WRITE_COST_SHARE` times what the writer's recent writes took if that is longer (on a
#: slow filesystem), but at most :data:`FLUSH_SECONDS` ...
MIN_FLUSH_SECONDS = 0.002
WRITE_COST_SHARE = 20
FLUSH_SECONDS = 0.05
#: ... or once they are this many bytes (and always at the end of the task).
FLUSH_BYTES = 4 * 1024 * 1024
#: On an object store, where each write is an object of its own (a request, and an object every
#: later run lists and reads), a task's records are written every this many seconds (or at
#: :data:`FLUSH_BYTES`, and at the end of the task): one object per task, not two.
OBJECT_FLUSH_SECONDS = 5.0


def is_url(location: str) -> bool:
    """Whether ``location`` names an ``fsspec`` filesystem other than the local one."""
    return "://" in location and not location.startswith("file://")


def normalized_location(location: str | os.PathLike[str]) -> str:
    """An absolute local path (workers may run elsewhere), or the URL as given."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return text.rstrip("/") if is_url(text) else str(Path(text).expanduser().resolve())


def _filesystem(location: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(location)


def create(location: str) -> None:
    """Make the store at ``location`` if it does not exist: private to the user (mode 700).

    An existing directory keeps its permissions; the ``segments`` directory in it, which holds
    the results, is made with mode 700.
    """
    if is_url(location):
        fs, root = _filesystem(location)
        marker = f"{root}/{MARKER}"
        if not fs.exists(marker):
            fs.pipe_file(marker, MARKER_TEXT.encode())
        return
    root = Path(location)
    made = not root.exists()
    (root / SEGMENTS).mkdir(parents=True, exist_ok=True, mode=0o700)
    if made:  # a directory the user had already keeps its permissions
        root.chmod(0o700)
    marker = root / MARKER
    if not marker.exists():
        marker.write_text(MARKER_TEXT)


def is_store(location: str) -> bool:
    """Whether ``location`` holds a store (its marker file)."""
    if is_url(location):
        fs, root = _filesystem(location)
        return fs.exists(f"{root}/{MARKER}")
    return (Path(location) / MARKER).is_file()


def segment_names(location: str) -> list[str]:
    """The store's segment files (paths or URLs), in a stable order."""
    if is_url(location):
        fs, root = _filesystem(location)
        try:
            names = fs.ls(f"{root}/{SEGMENTS}", detail=False, refresh=True)
        except FileNotFoundError:
            return []
        protocol = location.split("://", 1)[0]
        return sorted(f"{protocol}://{name}" for name in names if name.endswith(SUFFIX))
    directory = Path(location) / SEGMENTS
    try:
        return sorted(str(directory / name) for name in os.listdir(directory)
                      if name.endswith(SUFFIX))
    except FileNotFoundError:
        return []


def read_segment(name: str) -> bytes | memoryview:
    """A segment's bytes as they are now (a read-only memory map for a local file)."""
    if is_url(name):
        fs, path = _filesystem(name)
        return fs.cat_file(path)
    import mmap

    with open(name, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return b""
        return memoryview(mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ))


def replace_segment(name: str, data: bytes) -> None:
    """Write ``data`` as the whole of segment ``name`` (for clearing part of a store)."""
    if is_url(name):
        fs, path = _filesystem(name)
        if data:
            fs.pipe_file(path, data)
        else:
            fs.rm_file(path)
        return
    if not data:
        os.unlink(name)
        return
    temporary = f"{name}.{uuid.uuid4().hex[:8]}.tmp"
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, name)


def remove_store(location: str) -> None:
    """Delete the store at ``location``: its segments and marker, then its empty directory."""
    if is_url(location):
        fs, root = _filesystem(location)
        fs.rm(root, recursive=True)
        return
    root = Path(location)
    for name in segment_names(location):
        os.unlink(name)
    for leftover in (root / SEGMENTS).glob("*.tmp"):
        leftover.unlink()
    (root / SEGMENTS).rmdir()
    (root / MARKER).unlink()
    try:
        root.rmdir()
    except OSError:  # the user keeps other files there
        pass


def writer_name(kind: str) -> str:
    """A segment name no other writer anywhere will use: kind, host, process, random part."""
    host = "".join(character if character.isalnum() else "-"
                   for character in socket.gethostname())[:40]
    return f"{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


class SegmentWriter:
    """Appends records to one segment of its own; thread-safe.

    Each :meth:`write` is one ``write`` call on the segment file; on an object store, which
    cannot append, it is one new object. How long records wait before they are written is
    the caller's choice (:class:`~futures_hpc.store.recorder.TaskRecorder` holds a task's
    records for :attr:`flush_seconds`).

    Parameters
    ----------
    location : str
        The store (from :func:`normalized_location`).
    kind : str
        ``"w"`` for a worker's results, ``"r"`` for a client's run records.

    """

    def __init__(self, location: str, kind: str) -> None:
        self.location = location
        self.name = writer_name(kind)
        self._object_store = is_url(location)
        self._write_seconds = 0.0  # a moving average of what a write takes
        self._lock = threading.Lock()
        self._descriptor: int | None = None
        self._objects = 0

    @property
    def flush_seconds(self) -> float:
        """Seconds a task's records may wait to be written.

        On a filesystem, :data:`MIN_FLUSH_SECONDS`, or :data:`WRITE_COST_SHARE` times what
        packing and writing records takes here (:meth:`note_cost`), up to
        :data:`FLUSH_SECONDS`: writing costs at most about 5 % of the time, and a worker killed
        loses the results of at most that much time. On an object
        store, :data:`OBJECT_FLUSH_SECONDS` (a record written alone, as soon as a task's first
        call ends, would make two objects per task).
        """
        if self._object_store:
            return OBJECT_FLUSH_SECONDS
        return min(FLUSH_SECONDS, max(MIN_FLUSH_SECONDS,
                                      WRITE_COST_SHARE * self._write_seconds))

    def write(self, records: list[bytes]) -> None:
        """Write framed records now, in one piece."""
        if not records:
            return
        data = b"".join(records)
        with self._lock:
            if self._object_store:
                fs, root = _filesystem(self.location)
                self._objects += 1
                fs.pipe_file(f"{root}/{SEGMENTS}/{self.name}-{self._objects:06d}{SUFFIX}", data)
                return
            if self._descriptor is None:
                path = os.path.join(self.location, SEGMENTS, self.name + SUFFIX)
                self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            view = memoryview(data)
            while view:
                written = os.write(self._descriptor, view)
                view = view[written:]

    def note_cost(self, seconds: float) -> None:
        """A writing of records (packing them and :meth:`write`) took ``seconds``.

        The CPU time of the writing thread: its wall time also counted its waits for the GIL
        behind the worker's running call (up to 5 ms at each system call), which raised the
        interval to :data:`FLUSH_SECONDS` on a worker busy with calls, and a cancelled job then
        lost the records of 9 to 21 calls of 10 ms (the SLURM job-cancel store test).
        """
        self._write_seconds = 0.8 * self._write_seconds + 0.2 * seconds

    def close(self) -> None:
        """Close the segment file."""
        with self._lock:
            if self._descriptor is not None:
                os.close(self._descriptor)
                self._descriptor = None


def iter_segments(location: str) -> Iterator[tuple[str, bytes | memoryview]]:
    """Each segment's name and bytes; a segment removed meanwhile is skipped."""
    for name in segment_names(location):
        try:
            yield name, read_segment(name)
        except FileNotFoundError:
            continue
