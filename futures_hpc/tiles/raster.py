"""Rasters through rasterio (GDAL): reading any raster (GeoTIFFs are written by ``geotiff``)."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from futures_hpc.tiles.arrays import Georeference, ImageSource


class RasterioSource(ImageSource):
    """Any raster GDAL reads, through rasterio; one dataset handle per thread.

    A task reads it block by block (``reads_each_block``): each block is read just before func
    runs on it, while it fits in the CPU's caches, and GDAL's block cache keeps the internal
    tiles or strips a read decoded, so neighbouring blocks do not decode them again.
    """

    reads_each_block = True

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
