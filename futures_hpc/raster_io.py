"""Window readers and writers for :mod:`futures_hpc.tiles`.

A *source* reads a rectangular window (all bands) of an image, a *sink* writes one. Both are small
picklable objects: what crosses the network is a path, a zarr store or a file offset, never the
image itself. The exceptions are :class:`ArraySource` and :class:`ArraySink`, which wrap arrays
held in the client's memory and are only used on the client.

Images are 2-D ``(rows, cols)`` or 3-D ``(bands, rows, cols)``; windows always cover every band.

Sources and sinks that live on disk raise :class:`FileNotFoundError` on a worker that cannot see
their file; :mod:`futures_hpc.tiles` then moves that block's data through the client instead.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("futures_hpc")

NPY_SUFFIX = ".npy"
ZARR_SUFFIX = ".zarr"
GEOTIFF_SUFFIXES = (".tif", ".tiff")
SHARED_MEMORY_DIR = "/dev/shm"
GEOTIFF_TILE = 256
ZARR_CHUNK_RANGE = (256, 1024)
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


def _leading(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return (slice(None),) * (len(shape) - 2)


# --------------------------------------------------------------------------------------------
# positional reads and writes of raw (C-ordered) image files
# --------------------------------------------------------------------------------------------


def _transfer_exactly(call, fd: int, buffer: memoryview, position: int) -> None:
    done = 0
    while done < len(buffer):
        moved = call(fd, [buffer[done:]], position + done)
        if moved <= 0:
            raise EOFError(f"file ended at byte {position + done}")
        done += moved


def _raw_window_runs(shape3: tuple[int, int, int], itemsize: int, offset: int,
                     rows: slice, cols: slice):
    """Yield ``(band, row_in_window or None, byte position)`` of each contiguous run."""
    bands, total_rows, total_cols = shape3
    row_bytes = total_cols * itemsize
    band_bytes = total_rows * row_bytes
    full_width = cols.start == 0 and cols.stop == total_cols
    for band in range(bands):
        band_start = offset + band * band_bytes
        if full_width:
            yield band, None, band_start + rows.start * row_bytes
            continue
        for row_in_window, row in enumerate(range(rows.start, rows.stop)):
            yield band, row_in_window, band_start + row * row_bytes + cols.start * itemsize


def read_raw_window(fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype,
                    rows: slice, cols: slice) -> np.ndarray:
    """Read a window of a C-ordered raw image file with positional reads (no mmap faults)."""
    shape3 = (int(np.prod(shape[:-2], dtype=np.int64)),) + image_shape_of(shape)
    window = np.empty((shape3[0], rows.stop - rows.start, cols.stop - cols.start), dtype)
    for band, row_in_window, position in _raw_window_runs(shape3, dtype.itemsize, offset,
                                                          rows, cols):
        target = window[band] if row_in_window is None else window[band, row_in_window]
        _transfer_exactly(os.preadv, fd, memoryview(target).cast("B"), position)
    return window.reshape(tuple(shape[:-2]) + window.shape[-2:])


def write_raw_window(fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype,
                     rows: slice, cols: slice, data: np.ndarray) -> None:
    """Write a window of a C-ordered raw image file with positional writes."""
    shape3 = (int(np.prod(shape[:-2], dtype=np.int64)),) + image_shape_of(shape)
    data = np.asarray(data, dtype=dtype).reshape((shape3[0],) + data.shape[-2:])
    for band, row_in_window, position in _raw_window_runs(shape3, dtype.itemsize, offset,
                                                          rows, cols):
        part = data[band] if row_in_window is None else data[band, row_in_window]
        _transfer_exactly(os.pwritev, fd, memoryview(np.ascontiguousarray(part)).cast("B"),
                          position)


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


class ImageSource:
    """A readable image: ``shape`` (2-D or 3-D), ``dtype``, a ``name`` for messages.

    ``worker_readable`` says whether a worker can read the image itself (from a file or store);
    ``georeference`` is set for rasters that carry one.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    name: str
    worker_readable: bool = True
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
                if not os.path.exists(self.path):
                    raise FileNotFoundError(self.path)
                image = np.memmap(self.path, self.dtype, "r", self.offset, self.shape)
                image.flags.writeable = False
                self._image = image
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


class RasterioSource(ImageSource):
    """Any raster GDAL reads, through rasterio; one dataset handle per thread."""

    def __init__(self, path: str, name: str):
        rasterio = import_rasterio()
        self.path = str(path)
        self.name = name
        with rasterio.open(self.path) as dataset:
            bands = dataset.count
            self.shape = (dataset.height, dataset.width) if bands == 1 else (
                bands, dataset.height, dataset.width)
            self.dtype = np.result_type(*dataset.dtypes)
            self.georeference = Georeference(dataset.transform, dataset.crs, dataset.nodata)
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_local": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _dataset(self) -> Any:
        dataset = getattr(self._local, "dataset", None)
        if dataset is None:
            if not os.path.exists(self.path) and "://" not in self.path:
                raise FileNotFoundError(self.path)
            dataset = import_rasterio().open(self.path)
            self._local.dataset = dataset
        return dataset

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Read the window of every band."""
        from rasterio.windows import Window as RasterioWindow

        window = RasterioWindow(cols.start, rows.start, cols.stop - cols.start,
                                rows.stop - rows.start)
        data = self._dataset().read(window=window)
        return data[0] if len(self.shape) == 2 else data


def import_rasterio() -> Any:
    """Import rasterio or say how to install it."""
    try:
        import rasterio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading or writing rasters other than .npy and zarr needs rasterio: "
                          "pip install 'futures_hpc[geo]'") from exc
    return rasterio


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


def _is_zarr_path(path: Path) -> bool:
    return path.suffix == ZARR_SUFFIX or (path.is_dir() and any(
        (path / marker).exists() for marker in ("zarr.json", ".zarray")))


def _npy_source(path: Path, name: str) -> RawFileSource:
    image = np.load(path, mmap_mode="r")
    if not image.flags.c_contiguous:
        return ArraySource(image, name)
    return RawFileSource(str(path.resolve()), image.offset, image.shape, image.dtype, name)


def open_source(obj: Any, position: int) -> ImageSource:
    """Return the source for one ``map_blocks`` input (array, memmap, zarr array or path).

    An :class:`ImageSource` is used as it is: subclass it to read a format of your own.
    """
    name = f"input {position}"
    if isinstance(obj, ImageSource):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        name = f"input {position} ({path})"
        if "://" not in str(obj) and not path.exists():
            raise FileNotFoundError(f"{name}: no such file or directory")
        if path.suffix == NPY_SUFFIX:
            return _npy_source(path, name)
        if _is_zarr_path(path):
            import zarr

            return ZarrSource(zarr.open_array(str(path), mode="r"), name)
        return RasterioSource(str(obj), name)
    if _is_zarr_array(obj):
        return ZarrSource(obj, name)
    if is_file_backed(obj):
        if obj.mode != "r":
            obj.flush()
        return RawFileSource(str(Path(obj.filename).resolve()), obj.offset, obj.shape,
                             obj.dtype, name)
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__"):
        return ArraySource(obj, name)
    raise TypeError(f"{name}: expected a numpy array, a zarr array or a path, "
                    f"got {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# sinks
# --------------------------------------------------------------------------------------------


class ImageSink:
    """A writable image: ``shape``, ``dtype``; ``write`` takes the core window of one block."""

    shape: tuple[int, ...]
    dtype: np.dtype
    worker_writable: bool = True

    def write(self, rows: slice, cols: slice, data: np.ndarray) -> None:
        """Write ``data`` (already trimmed to the window) at ``[..., rows, cols]``."""
        raise NotImplementedError

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
    """A C-ordered raw image at ``offset`` in a file (``.npy``, memmap or shared memory)."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: Any):
        self.path = str(path)
        self.offset = int(offset)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)

    def write(self, rows: slice, cols: slice, data: np.ndarray) -> None:
        """Write with positional writes, so concurrent writers of other windows are safe."""
        data = self.fit(data, rows, cols)
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


class GeoTiffSink(ImageSink):
    """A GeoTIFF written by workers in turn, under a lock file beside it."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: Any):
        self.path = str(path)
        self.lock_path = self.path + ".lock"
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.worker_writable = _have_file_locks()

    def write(self, rows: slice, cols: slice, data: np.ndarray) -> None:
        """Open, write the window and close, holding the lock (GDAL is not safe otherwise)."""
        from rasterio.windows import Window as RasterioWindow

        data = np.asarray(self.fit(data, rows, cols), dtype=self.dtype)
        if not os.path.exists(self.path):
            raise FileNotFoundError(self.path)
        window = RasterioWindow(cols.start, rows.start, cols.stop - cols.start,
                                rows.stop - rows.start)
        with _file_lock(self.lock_path), import_rasterio().open(self.path, "r+") as dataset:
            if data.ndim == 2:
                dataset.write(data, 1, window=window)
            else:
                dataset.write(data, window=window)

    def remove_lock(self) -> None:
        """Delete the lock file once every block is written."""
        Path(self.lock_path).unlink(missing_ok=True)


def _have_file_locks() -> bool:
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - Windows
        return False
    return True


class _file_lock:  # noqa: N801 - used as a context manager
    def __init__(self, path: str):
        self.path = path
        self.handle = None

    def __enter__(self) -> None:
        import fcntl

        self.handle = open(self.path, "a")  # noqa: SIM115
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        import fcntl

        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def existing_sink(out: Any) -> ImageSink | None:
    """Return the sink for an ``out`` that already exists, or None for a path (created later)."""
    if out is None or isinstance(out, (str, os.PathLike)):
        return None
    if _is_zarr_array(out):
        return ZarrSink(out)
    if is_file_backed(out) and out.mode != "r":
        return RawFileSink(str(Path(out.filename).resolve()), out.offset, out.shape, out.dtype)
    if isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        return ArraySink(out)
    raise TypeError(f"out must be None, a numpy array, a zarr array or a path, "
                    f"got {type(out).__name__}")


def _chunk_length(block_len: int, image_len: int) -> int:
    block_len = min(block_len, image_len)
    low, high = ZARR_CHUNK_RANGE
    if block_len <= high:
        return block_len
    divisors = [d for d in range(high, low - 1, -1) if block_len % d == 0]
    return divisors[0] if divisors else block_len


def output_format(path: str | os.PathLike) -> str:
    """Return ``"npy"``, ``"zarr"`` or ``"geotiff"`` from an output path's suffix, or raise."""
    suffix = Path(path).suffix.lower()
    if suffix == NPY_SUFFIX:
        return "npy"
    if suffix == ZARR_SUFFIX:
        return "zarr"
    if suffix in GEOTIFF_SUFFIXES:
        import_rasterio()
        return "geotiff"
    raise ValueError(f"out={str(path)!r}: the output format comes from the suffix, one of "
                     f"{NPY_SUFFIX}, {ZARR_SUFFIX}, {', '.join(GEOTIFF_SUFFIXES)}")


def create_sink(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any,
                block: tuple[int, int], georeference: Georeference | None) -> ImageSink:
    """Create the output file ``path`` (``.npy``, zarr or GeoTIFF), overwriting it."""
    kind = output_format(path)
    path = Path(path)
    dtype = np.dtype(dtype)
    if kind == "npy":
        image = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        offset = image.offset
        del image
        return RawFileSink(str(path.resolve()), offset, shape, dtype)
    if kind == "zarr":
        return ZarrSink(_create_zarr(str(path), shape, dtype, block))
    _create_geotiff(str(path), shape, dtype, georeference)
    return GeoTiffSink(str(path.resolve()), shape, dtype)


def _create_zarr(path: str, shape: tuple[int, ...], dtype: np.dtype,
                 block: tuple[int, int]) -> Any:
    import zarr

    image = image_shape_of(shape)
    chunks = tuple(shape[:-2]) + tuple(
        _chunk_length(block_len, image_len) for block_len, image_len in zip(block, image,
                                                                            strict=True))
    if hasattr(zarr, "create_array"):
        return zarr.create_array(store=path, shape=shape, chunks=chunks, dtype=dtype,
                                 overwrite=True)
    return zarr.open_array(path, mode="w", shape=shape, chunks=chunks, dtype=dtype)


def _create_geotiff(path: str, shape: tuple[int, ...], dtype: np.dtype,
                    georeference: Georeference | None) -> None:
    rasterio = import_rasterio()
    rows, cols = image_shape_of(shape)
    profile = {
        "driver": "GTiff", "height": rows, "width": cols,
        "count": 1 if len(shape) == 2 else shape[0], "dtype": dtype.name,
        "tiled": True, "blockxsize": GEOTIFF_TILE, "blockysize": GEOTIFF_TILE,
        "BIGTIFF": "IF_SAFER", "SPARSE_OK": "TRUE",
    }
    if georeference is not None:
        profile.update(transform=georeference.transform, crs=georeference.crs)
    with rasterio.open(path, "w", **profile):
        pass


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
    return RawFileSink(path, 0, shape, dtype)


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
