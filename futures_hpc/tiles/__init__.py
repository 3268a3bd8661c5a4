"""Block-wise processing of images larger than memory, with margins, on any executor.

The image is cut into a grid of blocks (:class:`TileGrid`). Each block is read with ``overlap``
pixels of margin on every side, so that a filter gives the same answer as on the whole image;
at the image edge the margin is filled like :func:`numpy.pad` with mode ``boundary``. The
user's function runs on the workers; its result is trimmed back to the block and written to the
output by the worker itself when the output is a file or a zarr store.

:func:`map_blocks` produces an image, :func:`reduce_blocks` a statistic. Both use only the
public executor API (``submit``, ``worker_slots`` and the client's ``scatter``, ``submit`` and
``run``), so they work on every backend. See ``docs/tiles.md``.

The modules, each importing only those below it:

- :mod:`~futures_hpc.tiles.api`: :func:`map_blocks` and :func:`reduce_blocks`;
- :mod:`~futures_hpc.tiles.plan`: checking the arguments, grouping blocks into tasks;
- :mod:`~futures_hpc.tiles.runner`: handing tasks to the executor, collecting outcomes;
- :mod:`~futures_hpc.tiles.worker`: what a task runs on the worker;
- :mod:`~futures_hpc.tiles.grid`: the block grid, windows and margins;
- :mod:`~futures_hpc.tiles.formats`, :mod:`~futures_hpc.tiles.arrays`,
  :mod:`~futures_hpc.tiles.raster`, :mod:`~futures_hpc.tiles.shared_memory`: reading and
  writing windows of arrays, raw files, zarr stores, GeoTIFFs and ``/dev/shm`` copies.
"""

from futures_hpc.tiles.api import PROBE_SIZE, map_blocks, reduce_blocks
from futures_hpc.tiles.arrays import (
    LOCAL_ZARR_STORES,
    ArraySink,
    ArraySource,
    Georeference,
    ImageSink,
    ImageSource,
    RawFileSink,
    RawFileSource,
    ZarrSink,
    ZarrSource,
    check_zarr_visible,
    image_shape_of,
    is_file_backed,
    read_raw_window,
    write_raw_window,
)
from futures_hpc.tiles.formats import (
    GEOTIFF_SUFFIXES,
    NPY_SUFFIX,
    ZARR_CHUNK_RANGE,
    ZARR_SUFFIX,
    create_sink,
    existing_sink,
    open_source,
    output_format,
)
from futures_hpc.tiles.geotiff import GEOTIFF_TILE, GeoTiffSink
from futures_hpc.tiles.grid import BlockInfo, TileGrid, Window, read_padded
from futures_hpc.tiles.plan import (
    ERROR_POLICIES,
    MAX_GROUP_SIDE,
    PADDING_MODES,
    TASK_BYTES_CAP,
    TASK_BYTES_FLOOR,
    TASK_MEMORY_SHARE,
    TASKS_PER_THREAD,
    UNKNOWN_THREAD_MEMORY,
)
from futures_hpc.tiles.raster import RasterioSource, import_rasterio
from futures_hpc.tiles.runner import IN_FLIGHT_PER_THREAD, IN_FLIGHT_REFRESH_SECONDS, BlockError
from futures_hpc.tiles.shared_memory import (
    SHARED_MEMORY_DIR,
    SharedMemoryStage,
    create_shared_output,
    map_shared_output,
    new_shared_path,
    shared_memory_available,
    shared_memory_free,
)
from futures_hpc.tiles.worker import UNPICKLED_JOBS_KEPT, WINDOW_ATTRIBUTE

# map_blocks and reduce_blocks with what they take and return first; then the readers, writers
# and constants that were public in ``futures_hpc.raster_io`` and the former tiles module.
__all__ = [
    "BlockError", "BlockInfo", "TileGrid", "Window", "map_blocks", "reduce_blocks",
    "read_padded", "ImageSource", "ImageSink", "Georeference", "open_source",
    "ArraySink", "ArraySource", "GeoTiffSink", "RasterioSource", "RawFileSink", "RawFileSource",
    "SharedMemoryStage", "ZarrSink", "ZarrSource",
    "check_zarr_visible", "create_shared_output", "create_sink", "existing_sink",
    "image_shape_of", "import_rasterio", "is_file_backed", "map_shared_output",
    "new_shared_path", "output_format", "read_raw_window", "shared_memory_available",
    "shared_memory_free", "write_raw_window",
    "ERROR_POLICIES", "GEOTIFF_SUFFIXES", "GEOTIFF_TILE", "IN_FLIGHT_PER_THREAD",
    "IN_FLIGHT_REFRESH_SECONDS", "LOCAL_ZARR_STORES", "MAX_GROUP_SIDE", "NPY_SUFFIX",
    "PADDING_MODES", "PROBE_SIZE", "SHARED_MEMORY_DIR", "TASK_BYTES_CAP", "TASK_BYTES_FLOOR",
    "TASK_MEMORY_SHARE", "TASKS_PER_THREAD", "UNKNOWN_THREAD_MEMORY", "UNPICKLED_JOBS_KEPT",
    "WINDOW_ATTRIBUTE", "ZARR_CHUNK_RANGE", "ZARR_SUFFIX",
]
