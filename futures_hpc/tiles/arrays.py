"""Window readers and writers of arrays: in memory, raw files (``.npy``, memmaps) and zarr.

A *source* reads a rectangular window (all bands) of an image, a *sink* writes one. Both are small
picklable objects: what crosses the network is a path, a zarr store or a file offset, never the
image itself. The exceptions are :class:`ArraySource` and :class:`ArraySink`, which wrap arrays
held in the client's memory and are only used on the client.

Images are 2-D ``(rows, cols)`` or 3-D ``(bands, rows, cols)``; windows always cover every band.

Sources and sinks that live on disk raise :class:`FileNotFoundError` on a worker that cannot see
their file; :mod:`futures_hpc.tiles` then moves that block's data through the client instead.
GeoTIFF and other rasters are in :mod:`futures_hpc.tiles.raster`.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

_HAVE_POSITIONAL_IO = hasattr(os, "preadv") and hasattr(os, "pwritev")


@dataclass(frozen=True)
class Georeference:
    """Where an image lies on Earth: an affine transform, a CRS and the nodata value."""

    transform: Any
    crs: Any
    nodata: float | None = None


def image_shape_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """Return the ``(rows, cols)`` of a 2-D or 3-D shape."""
    return (int(shape[-2]), int(shape[-1]))


def sync_file(path: str) -> None:
    """``fsync`` the file at ``path`` (what every process wrote to it reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _leading(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return (slice(None),) * (len(shape) - 2)

# --------------------------------------------------------------------------------------------
# positional reads and writes of raw (C-ordered) image files
# --------------------------------------------------------------------------------------------


def _transfer_exactly(call, fd: int, buffer: memoryview, position: int) -> None:
    """``os.preadv`` or ``os.pwritev`` the whole buffer (a call may move fewer bytes)."""
    done = 0
    while done < len(buffer):
        moved = call(fd, [buffer[done:]], position + done)
        if moved <= 0:
            raise EOFError(f"file ended at byte {position + done}")
        done += moved


def pwrite_all(fd: int, data: bytes | memoryview | np.ndarray, position: int) -> None:
    """Write every byte of ``data`` (bytes, a buffer or a C-contiguous array) at ``position``."""
    _transfer_exactly(os.pwritev, fd, memoryview(data).cast("B"), position)


def _transfer_window(call, fd: int, offset: int, shape: tuple[int, ...], itemsize: int,
                     rows: slice, cols: slice, window: np.ndarray) -> None:
    """Move a window between the C-ordered ``window`` array and the file, run by run.

    One buffer is made of ``window`` and sliced per run: a window narrower than the image is a
    positional read or write per row, and those rows are what the loop spends its time on.
    """
    bands, total_rows, total_cols = (int(np.prod(shape[:-2], dtype=np.int64)),
                                     *image_shape_of(shape))
    row_bytes = total_cols * itemsize
    band_bytes = total_rows * row_bytes
    window_rows, width = rows.stop - rows.start, (cols.stop - cols.start) * itemsize
    buffer = memoryview(window).cast("B")
    if cols.start == 0 and cols.stop == total_cols:  # whole rows: one run per band
        run = window_rows * width
        for band in range(bands):
            _transfer_exactly(call, fd, buffer[band * run:(band + 1) * run],
                              offset + band * band_bytes + rows.start * row_bytes)
        return
    first = offset + rows.start * row_bytes + cols.start * itemsize
    for band in range(bands):
        position = first + band * band_bytes
        at = band * window_rows * width
        for _ in range(window_rows):
            _transfer_exactly(call, fd, buffer[at:at + width], position)
            position += row_bytes
            at += width


def read_raw_window(fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype,
                    rows: slice, cols: slice) -> np.ndarray:
    """Read a window of a C-ordered raw image file with positional reads (no mmap faults)."""
    bands = int(np.prod(shape[:-2], dtype=np.int64))
    window = np.empty((bands, rows.stop - rows.start, cols.stop - cols.start), dtype)
    _transfer_window(os.preadv, fd, offset, shape, dtype.itemsize, rows, cols, window)
    return window.reshape(tuple(shape[:-2]) + window.shape[-2:])


def write_raw_window(fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype,
                     rows: slice, cols: slice, data: np.ndarray) -> None:
    """Write a window of a C-ordered raw image file with positional writes."""
    data = np.ascontiguousarray(np.asarray(data, dtype=dtype))
    _transfer_window(os.pwritev, fd, offset, shape, dtype.itemsize, rows, cols, data)


def _map_file(path: str, dtype: np.dtype, mode: str, offset: int,
              shape: tuple[int, ...]) -> np.ndarray:
    """A shared mapping of a raw image file, read-only with ``mode="r"``.

    Raises FileNotFoundError where this process does not see the file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    image = np.memmap(path, dtype, mode, offset, shape)
    if mode == "r":
        image.flags.writeable = False
    return image


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


class ImageSource:
    """A readable image: ``shape`` (2-D or 3-D), ``dtype``, a ``name`` for messages.

    ``worker_readable`` says whether a worker can read the image itself (from a file or store);
    ``reads_each_block`` whether a task reads each block as it runs it (its pixels are then in
    the CPU's caches for func) rather than the whole group's region at once (one read per task:
    for inputs whose every read decodes its chunks again); ``georeference`` is set for rasters
    that carry one.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    name: str
    worker_readable: bool = True
    reads_each_block: bool = False
    georeference: Georeference | None = None

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Return the window ``[..., rows, cols]``; both slices lie inside the image."""
        raise NotImplementedError


class ArraySource(ImageSource):
    """An array in the client's memory; pickling it drops the data (workers get blocks)."""

    worker_readable = False

    def __init__(self, array: Any, name: str):
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.name = name

    def __getstate__(self) -> dict:
        return {**self.__dict__, "array": None}

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Return a view of the window."""
        if self.array is None:
            raise RuntimeError(f"{self.name} lives in the client's memory; a worker cannot read it")
        return np.asarray(self.array[_leading(self.shape) + (rows, cols)])


class RawFileSource(ImageSource):
    """A C-ordered raw image at ``offset`` in a file: a ``.npy`` file, a memmap, a staged copy.

    Windows are read with positional reads (safe on network file systems), or, with
    ``mapped=True`` (for copies in ``/dev/shm``), returned as read-only views of one shared
    mapping of the file, which copies nothing.
    """

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: Any, name: str,
                 mapped: bool = False):
        self.path = str(path)
        self.offset = int(offset)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.name = name
        self.mapped = mapped
        self._fd: int | None = None
        self._image: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_image": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def _mapped_image(self) -> np.ndarray:
        with self._lock:
            if self._image is None:
                self._image = _map_file(self.path, self.dtype, "r", self.offset, self.shape)
            return self._image

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Read the window with positional reads, or as a view of the file's mapping."""
        if self.mapped or not _HAVE_POSITIONAL_IO:
            window = self._mapped_image()[_leading(self.shape) + (rows, cols)]
            return np.asarray(window) if self.mapped else np.array(window)
        return read_raw_window(self._descriptor(), self.offset, self.shape, self.dtype, rows, cols)


class ZarrSource(ImageSource):
    """A zarr array; workers read it from its store unless the store is in memory."""

    def __init__(self, array: Any, name: str):
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.name = name
        self.worker_readable = not _is_memory_store(array.store)
        self._checked = False

    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_checked": False}
        if not self.worker_readable:
            state["array"] = None
        return state

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Read the window (all bands)."""
        if not self._checked:
            check_zarr_visible(self.array, self.name)
            self._checked = True
        return np.asarray(self.array[_leading(self.shape) + (rows, cols)])


def _is_memory_store(store: Any) -> bool:
    if isinstance(store, dict):
        return True
    return type(store).__name__ in {"MemoryStore", "GpuMemoryStore", "KVStore"}


LOCAL_ZARR_STORES = frozenset({"LocalStore", "DirectoryStore", "NestedDirectoryStore"})


def _zarr_root(array: Any) -> str | None:
    """The directory of a zarr store on a local (or shared) file system, else None."""
    store = array.store
    if type(store).__name__ not in LOCAL_ZARR_STORES:
        return None
    root = getattr(store, "root", None) or getattr(store, "path", None)
    return None if root is None else str(root).removeprefix("file://")


def check_zarr_visible(array: Any, name: str) -> None:
    """Raise FileNotFoundError when a local zarr store's directory is missing here.

    zarr reads a missing chunk as its fill value, so without this check a worker that does not
    see the client's file system would silently read zeros.
    """
    root = _zarr_root(array)
    if root is not None and not os.path.isdir(os.path.join(root, getattr(array, "path", ""))):
        raise FileNotFoundError(f"{name}: zarr store {root} is not visible here")


def is_file_backed(array: Any) -> bool:
    """Tell whether ``array`` is a whole, C-ordered ``numpy.memmap`` of a file workers can open."""
    return (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)
            and array.filename is not None and array.flags.c_contiguous
            and array.mode in ("r", "r+", "w+"))


def _is_zarr_array(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("zarr") and hasattr(obj, "chunks") and hasattr(obj, "store")

# --------------------------------------------------------------------------------------------
# sinks
# --------------------------------------------------------------------------------------------


class ImageSink:
    """A writable image: ``shape``, ``dtype``; ``write`` takes the core window of one block."""

    shape: tuple[int, ...]
    dtype: np.dtype
    worker_writable: bool = True
    #: A worker writes each block as soon as it is done (positional writes of disjoint byte
    #: ranges, safe side by side), not the group's output once all its blocks are.
    writes_each_block: bool = False

    def write(self, rows: slice, cols: slice, data: np.ndarray) -> None:
        """Write ``data`` (already trimmed to the window) at ``[..., rows, cols]``."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make what this process wrote durable before a block is recorded as done.

        By default nothing: what a finished ``write`` handed to the operating system survives
        the process being killed. Sinks backed by one file also ask for it on disk.
        """

    def fit(self, data: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
        """Check ``data`` against the window and this sink's bands; add or drop a 1-band axis."""
        window_shape = (rows.stop - rows.start, cols.stop - cols.start)
        expected = tuple(self.shape[:-2]) + window_shape
        if data.shape == expected:
            return data
        if data.ndim == 3 and data.shape[0] == 1 and len(expected) == 2:
            data = data[0]
        elif data.ndim == 2 and expected[:-2] == (1,):
            data = data[np.newaxis]
        if data.shape != expected:
            raise ValueError(f"the block's result has shape {data.shape} after trimming, but the "
                             f"output window needs {expected} (output shape {self.shape})")
        return data


class ArraySink(ImageSink):
    """An array in the client's memory; only the client writes it."""

    worker_writable = False

    def __init__(self, array: Any):
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)

    def __getstate__(self) -> dict:
        raise TypeError("an ArraySink lives in the client's memory and is never sent to workers")

    def write(self, rows: slice, cols: slice, data: np.ndarray) -> None:
        """Assign the window."""
        self.array[_leading(self.shape) + (rows, cols)] = self.fit(data, rows, cols)


class RawFileSink(ImageSink):
    """A C-ordered raw image at ``offset`` in a file (``.npy``, memmap or shared memory).

    Windows are written with positional writes (safe side by side, also on network file
    systems), or, with ``mapped=True`` (for outputs in ``/dev/shm``, which only processes of one
    host share), assigned into one shared writable mapping of the file per process: one strided
    copy per window, not a system call per row.
    """

    writes_each_block = True

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: Any,
                 mapped: bool = False):
        self.path = str(path)
        self.offset = int(offset)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.mapped = mapped
        self._image: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_image": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _mapped_image(self) -> np.ndarray:
        with self._lock:
            if self._image is None:
                self._image = _map_file(self.path, self.dtype, "r+", self.offset, self.shape)
            return self._image

    def write(self, rows: slice, cols: slice, data: np.ndarray) -> None:
        """Write with positional writes, so concurrent writers of other windows are safe."""
        data = self.fit(data, rows, cols)
        if self.mapped:
            self._mapped_image()[_leading(self.shape) + (rows, cols)] = data
            return
        if not _HAVE_POSITIONAL_IO:
            image = np.memmap(self.path, self.dtype, "r+", self.offset, self.shape)
            image[_leading(self.shape) + (rows, cols)] = data
            image.flush()
            return
        fd = os.open(self.path, os.O_WRONLY)
        try:
            write_raw_window(fd, self.offset, self.shape, self.dtype, rows, cols, data)
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Ask for the file's written pages on disk."""
        sync_file(self.path)


class ZarrSink(ImageSink):
    """A zarr array; workers write whole chunks, so blocks must align with its chunks."""

    def __init__(self, array: Any):
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.worker_writable = not _is_memory_store(array.store)

    def __getstate__(self) -> dict:
        if not self.worker_writable:
            raise TypeError("a zarr array in memory is written by the client only")
        return self.__dict__

    def write(self, rows: slice, cols: slice, data: np.ndarray) -> None:
        """Assign the window (after checking the store is visible here)."""
        data = self.fit(data, rows, cols)
        check_zarr_visible(self.array, "output")
        self.array[_leading(self.shape) + (rows, cols)] = data

    def misaligned_axes(self, block: tuple[int, int]) -> list[str]:
        """Name the image axes whose block length is not a multiple of the chunk length."""
        chunks = image_shape_of(tuple(self.array.chunks))
        image = image_shape_of(self.shape)
        return [axis for axis, block_len, chunk_len, image_len
                in zip(("rows", "cols"), block, chunks, image, strict=True)
                if block_len < image_len and block_len % chunk_len]


