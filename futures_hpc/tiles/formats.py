"""Choosing the source or sink for an input or ``out`` given as an array, a store or a path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from futures_hpc.tiles.arrays import (
    ArraySink,
    ArraySource,
    Georeference,
    ImageSink,
    ImageSource,
    RawFileSink,
    RawFileSource,
    ZarrSink,
    ZarrSource,
    _is_zarr_array,
    image_shape_of,
    is_file_backed,
)
from futures_hpc.tiles.geotiff import GeoTiffSink, create_geotiff
from futures_hpc.tiles.raster import RasterioSource, import_rasterio

NPY_SUFFIX = ".npy"
ZARR_SUFFIX = ".zarr"
GEOTIFF_SUFFIXES = (".tif", ".tiff")
ZARR_CHUNK_RANGE = (256, 1024)


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
                block: tuple[int, int], georeference: Georeference | None,
                creation_options: dict[str, Any] | None = None) -> ImageSink:
    """Create the output file ``path`` (``.npy``, zarr or GeoTIFF), overwriting it.

    ``creation_options`` are a GeoTIFF's rasterio creation options (``compress``, ...); see
    :func:`~futures_hpc.tiles.geotiff.create_geotiff` for how it is laid out.
    """
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
    return create_geotiff(str(path.resolve()), shape, dtype, georeference, block,
                          creation_options)


def reopen_sink(path: str | os.PathLike,
                creation_options: dict[str, Any] | None = None) -> ImageSink:
    """Open the existing output file ``path`` for update, keeping every pixel it holds.

    ``creation_options`` are those a GeoTIFF was created with (its tiles' compression).

    Raises
    ------
    OSError or ValueError
        ``path`` is missing or is not a whole ``.npy``, zarr array or GeoTIFF.
    """
    kind = output_format(path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if kind == "npy":
        image = np.load(path, mmap_mode="r+")
        if not image.flags.c_contiguous:
            raise ValueError(f"{path} is stored in Fortran order")
        sink = RawFileSink(str(path.resolve()), image.offset, image.shape, image.dtype)
        del image
        return sink
    if kind == "zarr":
        import zarr

        return ZarrSink(zarr.open_array(str(path), mode="r+"))
    with import_rasterio().open(str(path)) as dataset:
        bands = dataset.count
        shape = (dataset.height, dataset.width) if bands == 1 else (
            bands, dataset.height, dataset.width)
        dtype = np.result_type(*dataset.dtypes)
    return GeoTiffSink(str(path.resolve()), shape, dtype, creation_options)


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

