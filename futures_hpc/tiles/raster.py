"""Rasters through rasterio (GDAL): reading any raster, writing GeoTIFFs block by block."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from futures_hpc.tiles.arrays import (
    Georeference,
    ImageSink,
    ImageSource,
    image_shape_of,
    sync_file,
)

GEOTIFF_TILE = 256


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

    def sync(self) -> None:
        """Ask for the file's written pages on disk."""
        sync_file(self.path)

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

def _create_geotiff(path: str, shape: tuple[int, ...], dtype: np.dtype,
                    georeference: Georeference | None, preallocate: bool = False) -> None:
    """Create an empty tiled GeoTIFF.

    By default its tiles are sparse: each is appended to the file when first written, so the
    file's layout follows the order in which blocks finish. With ``preallocate`` every tile
    is written (as zeros) now, in order, and later writes land in place: the file's bytes then
    depend only on its pixels, which resuming a job (``store=``) needs.
    """
    rasterio = import_rasterio()
    rows, cols = image_shape_of(shape)
    profile = {
        "driver": "GTiff", "height": rows, "width": cols,
        "count": 1 if len(shape) == 2 else shape[0], "dtype": dtype.name,
        "tiled": True, "blockxsize": GEOTIFF_TILE, "blockysize": GEOTIFF_TILE,
        "BIGTIFF": "IF_SAFER", "SPARSE_OK": "FALSE" if preallocate else "TRUE",
    }
    if georeference is not None:
        profile.update(transform=georeference.transform, crs=georeference.crs)
    with rasterio.open(path, "w", **profile):
        pass

