"""GeoTIFF outputs written without locks.

GDAL cannot write one file from several processes, and ``fcntl`` locks are not shared between
nodes on many parallel filesystems (Lustre without ``flock``). So no process ever opens the
output with GDAL while blocks are written:

- **Uncompressed** outputs are laid out when created: GDAL writes the header and the tags (the
  georeferencing), then every tile gets a fixed place in the file (a hole, read as zeros) and
  the tile offsets are written into the header. Each worker then writes its blocks' pixels
  straight into their tiles with ``pwrite``: writes of disjoint byte ranges of one
  preallocated file, safe side by side on local disks, NFS and Lustre without any lock, as for
  ``.npy`` outputs. The file's bytes depend only on its pixels.
- **Compressed** outputs, with blocks that are whole tiles: the workers compress their tiles
  (the costly part) and keep them (:mod:`futures_hpc.tiles.held_tiles`); the client places
  them in a fixed order (block by block, row by row, whatever order tasks finish in), the
  workers write them there, and the client writes their offsets into the header. The bytes
  again depend only on the pixels, and a resumed run gives the same file.
- **Anything else** (other compressions, predictors, blocks that cut tiles): the workers return
  pixels and the client writes them with rasterio, one writer again.

See docs/tiles.md ("How a GeoTIFF is written").
"""

from __future__ import annotations

import logging
import os
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from futures_hpc.tiles.arrays import (
    Georeference,
    ImageSink,
    image_shape_of,
    pwrite_all,
    sync_file,
)
from futures_hpc.tiles.held_tiles import HeldTiles
from futures_hpc.tiles.raster import import_rasterio

logger = logging.getLogger("futures_hpc")

GEOTIFF_TILE = 256
#: Tile sides tried for a compressed output, so that the blocks are whole tiles.
COMPRESSED_TILES = (256, 512, 128, 64, 32, 16)
_TYPE_CODES = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
               16: 8, 17: 8, 18: 8}
_TAGS = {"width": 256, "height": 257, "compression": 259, "samples": 277, "planar": 284,
         "predictor": 317, "tile_width": 322, "tile_height": 323, "offsets": 324,
         "bytecounts": 325}
NO_COMPRESSION = 1


@dataclass(frozen=True)
class _TagArray:
    """Where one tag's values are in the file: position, count and struct code."""

    position: int
    count: int
    code: str


@dataclass(frozen=True)
class TiffLayout:
    """The first image of a tiled TIFF: its tiles, their layout and where their offsets are.

    Attributes
    ----------
    byteorder : str
        ``"<"`` or ``">"``.
    width, height, tile_width, tile_height, samples : int
        The image, a tile, and the samples (bands) per pixel.
    separate : bool
        Band-interleaved tiles (``INTERLEAVE=BAND`` with several bands).
    compression, predictor : int
        TIFF codes (1 is none).
    offsets, bytecounts : _TagArray
        The TileOffsets and TileByteCounts arrays.
    header_end : int
        The end of the header, its tags and their values: where tile data may start.
    """

    byteorder: str
    width: int
    height: int
    tile_width: int
    tile_height: int
    samples: int
    separate: bool
    compression: int
    predictor: int
    offsets: _TagArray
    bytecounts: _TagArray
    header_end: int = 0

    @property
    def across(self) -> int:
        """Tiles per row of tiles."""
        return -(-self.width // self.tile_width)

    @property
    def down(self) -> int:
        """Rows of tiles."""
        return -(-self.height // self.tile_height)

    @property
    def planes(self) -> int:
        """Bands stored in tiles of their own (1 when pixel-interleaved)."""
        return self.samples if self.separate else 1

    def tile_shape(self) -> tuple[int, ...]:
        """A tile's array shape as stored: (rows, cols) or (rows, cols, samples)."""
        if self.separate or self.samples == 1:
            return (self.tile_height, self.tile_width)
        return (self.tile_height, self.tile_width, self.samples)

    def tile_index(self, row: int, col: int, plane: int = 0) -> int:
        """The position of tile (row, col) of ``plane`` in the offsets array."""
        return (plane * self.down + row) * self.across + col

    def read_array(self, fd: int, array: _TagArray) -> np.ndarray:
        """Read a tag's values."""
        dtype = np.dtype(self.byteorder + array.code)
        raw = os.pread(fd, dtype.itemsize * array.count, array.position)
        return np.frombuffer(raw, dtype).astype(np.int64)

    def write_array(self, fd: int, array: _TagArray, first: int, values: np.ndarray) -> None:
        """Write ``values`` into a tag's array from entry ``first`` on."""
        dtype = np.dtype(self.byteorder + array.code)
        if len(values) and int(np.max(values)) > np.iinfo(dtype).max:
            raise OverflowError("the file has grown beyond what its tile offsets can hold")
        data = np.asarray(values, dtype=dtype).tobytes()
        pwrite_all(fd, data, array.position + first * dtype.itemsize)


def read_layout(source: str | bytes) -> TiffLayout | None:
    """The layout of a tiled TIFF's first image (a path, or the file's bytes); None if striped."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        content = memoryview(source)

        def read(position: int, size: int) -> bytes:
            return bytes(content[position:position + size])

        return _parse_layout(read)
    fd = os.open(source, os.O_RDONLY)
    try:
        return _parse_layout(lambda position, size: os.pread(fd, size, position))
    finally:
        os.close(fd)


def _parse_layout(read: Callable[[int, int], bytes]) -> TiffLayout | None:
    head = read(0, 16)
    order = {b"II": "<", b"MM": ">"}[head[:2]]
    big = struct.unpack(order + "H", head[2:4])[0] == 43
    ifd = struct.unpack(order + "Q", head[8:16])[0] if big else struct.unpack(
        order + "I", head[4:8])[0]
    count_size, entry_size, inline = (8, 20, 8) if big else (2, 12, 4)
    count = struct.unpack(order + ("Q" if big else "H"), read(ifd, count_size))[0]
    raw = read(ifd + count_size, count * entry_size)
    arrays: dict[int, _TagArray] = {}
    header_end = ifd + count_size + count * entry_size + inline
    for number in range(count):
        entry = raw[number * entry_size:(number + 1) * entry_size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        values = struct.unpack(order + ("Q" if big else "I"), entry[4:4 + inline])[0]
        size = values * _TYPE_SIZES.get(kind, 1)
        position = ifd + count_size + number * entry_size + 4 + inline
        if size > inline:
            position = struct.unpack(order + ("Q" if big else "I"),
                                     entry[4 + inline:4 + 2 * inline])[0]
            header_end = max(header_end, position + size)
        if kind in _TYPE_CODES:
            arrays[tag] = _TagArray(position, values, _TYPE_CODES[kind])
    if _TAGS["tile_width"] not in arrays or _TAGS["offsets"] not in arrays:
        return None

    def scalar(name: str, default: int) -> int:
        array = arrays.get(_TAGS[name])
        if array is None:
            return default
        dtype = np.dtype(order + array.code)
        return int(np.frombuffer(read(array.position, dtype.itemsize), dtype)[0])

    return TiffLayout(order, scalar("width", 0), scalar("height", 0),
                      scalar("tile_width", 0), scalar("tile_height", 0),
                      scalar("samples", 1), scalar("planar", 1) == 2,
                      scalar("compression", 1), scalar("predictor", 1),
                      arrays[_TAGS["offsets"]], arrays[_TAGS["bytecounts"]], header_end)


def _values(read: Callable[[int, int], bytes], layout: TiffLayout,
            array: _TagArray) -> np.ndarray:
    dtype = np.dtype(layout.byteorder + array.code)
    return np.frombuffer(read(array.position, dtype.itemsize * array.count), dtype)


def _data_start(layout: TiffLayout) -> int:
    """Where the first tile goes: after the header, on a 16-byte boundary."""
    return -(-layout.header_end // 16) * 16


# --------------------------------------------------------------------------------------------
# creating
# --------------------------------------------------------------------------------------------


def _tile_side(block: int, image: int, compressed: bool) -> int:
    if not compressed:
        return GEOTIFF_TILE
    for side in COMPRESSED_TILES:
        if block % side == 0 or block >= image:
            return side
    return GEOTIFF_TILE


def create_geotiff(path: str, shape: tuple[int, ...], dtype: np.dtype,
                   georeference: Georeference | None, block: tuple[int, int],
                   creation_options: dict[str, Any] | None = None) -> GeoTiffSink:
    """Create a tiled GeoTIFF and lay it out for writing without locks.

    Parameters
    ----------
    path : str
        The file (overwritten).
    shape : tuple of int
        ``(rows, cols)`` or ``(bands, rows, cols)``.
    dtype : numpy.dtype
        The pixels' type.
    georeference : Georeference, optional
        Its transform and CRS are written (the nodata value comes from ``creation_options``).
    block : (int, int)
        The job's block; a compressed output's tiles are chosen to divide it.
    creation_options : dict, optional
        rasterio/GDAL creation options over the defaults (tiled 256 x 256, uncompressed):
        ``compress``, ``zlevel``, ``predictor``, ``blockxsize``, ``blockysize``,
        ``interleave``, ``nodata``...

    Returns
    -------
    GeoTiffSink
    """
    rasterio = import_rasterio()
    options = {key.lower() if isinstance(key, str) else key: value
               for key, value in (creation_options or {}).items()}
    compressed = str(options.get("compress", "none")).lower() not in ("none", "")
    rows, cols = image_shape_of(shape)
    profile: dict[str, Any] = {
        "driver": "GTiff", "height": rows, "width": cols,
        "count": 1 if len(shape) == 2 else shape[0], "dtype": np.dtype(dtype).name,
        "tiled": True, "blockxsize": _tile_side(block[1], cols, compressed),
        "blockysize": _tile_side(block[0], rows, compressed), "bigtiff": "IF_SAFER",
    }
    if georeference is not None:
        profile.update(transform=georeference.transform, crs=georeference.crs)
    profile.update(options)
    profile["sparse_ok"] = "TRUE"  # no tile written by GDAL: they are laid out below
    with rasterio.open(path, "w", **profile):
        pass
    layout = read_layout(path)
    if layout is not None and layout.compression == NO_COMPRESSION:
        _lay_out(path, layout, np.dtype(dtype))
    return GeoTiffSink(path, shape, dtype, options)


#: Creation options that are not about how a tile is encoded.
_NOT_ENCODING = frozenset({"driver", "width", "height", "count", "dtype", "crs", "transform",
                           "nodata", "tiled", "blockxsize", "blockysize", "bigtiff",
                           "sparse_ok", "interleave", "num_threads"})


def encoding_options(creation_options: dict[str, Any] | None) -> dict[str, Any]:
    """The creation options that decide a tile's bytes (compression, its level, predictor)."""
    return {str(key).lower(): value for key, value in (creation_options or {}).items()
            if str(key).lower() not in _NOT_ENCODING}


def _lay_out(path: str, layout: TiffLayout, dtype: np.dtype) -> None:
    """Give every tile of an uncompressed TIFF its place (a hole, read as zeros)."""
    tile_bytes = int(np.prod(layout.tile_shape())) * dtype.itemsize
    tiles = layout.offsets.count
    start = _data_start(layout)
    fd = os.open(path, os.O_RDWR)
    try:
        layout.write_array(fd, layout.offsets, 0,
                           start + tile_bytes * np.arange(tiles, dtype=np.int64))
        layout.write_array(fd, layout.bytecounts, 0, np.full(tiles, tile_bytes, np.int64))
        os.ftruncate(fd, start + tile_bytes * tiles)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# the sink
# --------------------------------------------------------------------------------------------


@dataclass
class EncodedTiles:
    """A group's tiles, compressed by a worker: their indices and bytes."""

    indices: list[int]
    payloads: list[bytes]


class GeoTiffSink(ImageSink):
    """A GeoTIFF written without locks (see the module's docstring for how).

    Parameters
    ----------
    path : str
        The file, already created.
    shape, dtype
        The image's.
    creation_options : dict, optional
        Those the file was created with: a compressed output's tiles are compressed by GDAL
        with the same ones (:func:`encoding_options`).
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: Any,
                 creation_options: dict[str, Any] | None = None):
        self.path = str(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.encoding = encoding_options(creation_options)
        self.layout = read_layout(self.path)
        self.mode = self._mode()
        self.worker_writable = self.mode != "client"
        #: Uncompressed tiles laid out in advance: each block goes straight into them.
        self.writes_each_block = self.mode == "direct"
        #: Compressed tiles go back to the client, which appends them (set with the grid).
        self.encodes_tiles = self.mode == "encoded"
        #: Compressed tiles stay on the worker that made them, which writes them once the
        #: client has placed them (:mod:`futures_hpc.tiles.held_tiles`); set by the client.
        self.tiles_stay_on_workers = False

    def _mode(self) -> str:
        layout = self.layout
        if layout is None or layout.width != self.shape[-1] or layout.height != self.shape[-2]:
            return "client"
        if layout.compression == NO_COMPRESSION:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                laid_out = bool(np.all(layout.read_array(fd, layout.offsets) > 0))
            finally:
                os.close(fd)
            return "direct" if laid_out else "client"
        return "encoded"

    def aligned_with(self, block: tuple[int, int]) -> bool:
        """Whether every block is made of whole tiles (needed to compress on the workers)."""
        layout = self.layout
        return layout is not None and all(
            step % side == 0 or step >= size for step, side, size in (
                (block[0], layout.tile_height, layout.height),
                (block[1], layout.tile_width, layout.width)))

    def use_client_writes(self) -> None:
        """Have the client write every window with rasterio (blocks that cut tiles)."""
        self.mode = "client"
        self.worker_writable = self.encodes_tiles = self.writes_each_block = False

    def _planes(self, data: np.ndarray) -> np.ndarray:
        """``data`` as (bands, rows, cols) in the file's byte order."""
        data = np.asarray(data, dtype=self.dtype.newbyteorder(self.layout.byteorder))
        return data[np.newaxis] if data.ndim == 2 else data

    def _tiles(self, rows: slice, cols: slice, data: np.ndarray):
        """Yield ``(tile index, tile array, covered rows, covered cols)`` under a window."""
        layout = self.layout
        planes = self._planes(data)
        for tile_row in range(rows.start // layout.tile_height,
                              -(-rows.stop // layout.tile_height)):
            top = tile_row * layout.tile_height
            row_start, row_stop = max(top, rows.start), min(top + layout.tile_height, rows.stop)
            for tile_col in range(cols.start // layout.tile_width,
                                  -(-cols.stop // layout.tile_width)):
                left = tile_col * layout.tile_width
                col_start = max(left, cols.start)
                col_stop = min(left + layout.tile_width, cols.stop)
                part = planes[:, row_start - rows.start:row_stop - rows.start,
                              col_start - cols.start:col_stop - cols.start]
                covered = (slice(row_start - top, row_stop - top),
                           slice(col_start - left, col_stop - left))
                if layout.separate:
                    for plane in range(layout.planes):
                        yield (layout.tile_index(tile_row, tile_col, plane), part[plane],
                               *covered)
                else:
                    pixels = part[0] if layout.samples == 1 else np.moveaxis(part, 0, -1)
                    yield layout.tile_index(tile_row, tile_col), pixels, *covered

    def write(self, rows: slice, cols: slice, data: Any) -> None:
        """Write a window: into its tiles (uncompressed), or with rasterio (client mode)."""
        if isinstance(data, EncodedTiles) or self.mode == "encoded":
            raise RuntimeError("compressed tiles are appended by the client's TileAppender")
        data = self.fit(np.asarray(data), rows, cols)
        if not os.path.exists(self.path):
            raise FileNotFoundError(self.path)
        if self.mode == "client":
            self._write_with_rasterio(rows, cols, data)
            return
        layout = self.layout
        fd = os.open(self.path, os.O_RDWR)
        try:
            offsets = layout.read_array(fd, layout.offsets)
            itemsize = self.dtype.itemsize
            pixel = itemsize * (1 if layout.separate else layout.samples)
            row_bytes = layout.tile_width * pixel
            for index, part, tile_rows, tile_cols in self._tiles(rows, cols, data):
                start = int(offsets[index])
                if tile_cols.start == 0 and (tile_cols.stop == layout.tile_width
                                             or cols.stop == layout.width):
                    # whole tile rows (the padding beyond the image edge stays zero)
                    if part.shape[1] == layout.tile_width:
                        full = np.ascontiguousarray(part)
                    else:
                        full = np.zeros((part.shape[0], layout.tile_width) + part.shape[2:],
                                        part.dtype)
                        full[:, :part.shape[1]] = part
                    pwrite_all(fd, full, start + tile_rows.start * row_bytes)
                    continue
                for offset, line in enumerate(part):
                    pwrite_all(fd, np.ascontiguousarray(line).tobytes(),
                                start + (tile_rows.start + offset) * row_bytes
                                + tile_cols.start * pixel)
        finally:
            os.close(fd)

    def _write_with_rasterio(self, rows: slice, cols: slice, data: np.ndarray) -> None:
        from rasterio.windows import Window as RasterioWindow

        window = RasterioWindow(cols.start, rows.start, cols.stop - cols.start,
                                rows.stop - rows.start)
        with import_rasterio().open(self.path, "r+") as dataset:
            data = np.asarray(data, dtype=self.dtype)
            if data.ndim == 2:
                dataset.write(data, 1, window=window)
            else:
                dataset.write(data, window=window)

    def encode(self, rows: slice, cols: slice, data: np.ndarray) -> EncodedTiles:
        """Compress the tiles of a window with GDAL, in memory (run on a worker).

        The window is written to an in-memory GeoTIFF with this file's tiles and encoding;
        its tiles are this file's tiles under the window, byte for byte.
        """
        from rasterio.io import MemoryFile

        planes = np.asarray(self.fit(np.asarray(data), rows, cols), self.dtype)
        planes = planes[np.newaxis] if planes.ndim == 2 else planes
        layout = self.layout
        profile = {"driver": "GTiff", "width": planes.shape[2], "height": planes.shape[1],
                   "count": planes.shape[0], "dtype": self.dtype.name, "tiled": True,
                   "blockxsize": layout.tile_width, "blockysize": layout.tile_height,
                   "interleave": "band" if layout.separate else "pixel", **self.encoding}
        with warnings.catch_warnings(), MemoryFile() as memory:
            warnings.simplefilter("ignore")  # not georeferenced: only its tiles are used
            with memory.open(**profile) as dataset:
                dataset.write(planes)
            content = memory.read()
        part = read_layout(content)

        def read(position: int, size: int) -> bytes:
            return content[position:position + size]

        offsets = _values(read, part, part.offsets)
        counts = _values(read, part, part.bytecounts)
        first_row, first_col = rows.start // layout.tile_height, cols.start // layout.tile_width
        encoded = EncodedTiles([], [])
        for plane in range(part.planes):
            for row in range(part.down):
                for col in range(part.across):
                    local = part.tile_index(row, col, plane)
                    start = int(offsets[local])
                    encoded.indices.append(
                        layout.tile_index(first_row + row, first_col + col, plane))
                    encoded.payloads.append(content[start:start + int(counts[local])])
        return encoded

    def sync(self) -> None:
        """Ask for the file's written pages on disk."""
        sync_file(self.path)


def write_order(layout: TiffLayout, block: tuple[int, int]) -> np.ndarray:
    """The tile indices in the order they are appended: block by block, row by row.

    A block's tiles are neighbours in this order, so the blocks whose tiles are all written
    are always the first ones: a resumed run cuts the file after them and goes on.
    """
    tile_rows = max(1, block[0] // layout.tile_height)
    tile_cols = max(1, block[1] // layout.tile_width)
    order = []
    for first_row in range(0, layout.down, tile_rows):
        for first_col in range(0, layout.across, tile_cols):
            for row in range(first_row, min(layout.down, first_row + tile_rows)):
                for col in range(first_col, min(layout.across, first_col + tile_cols)):
                    order.extend(layout.tile_index(row, col, plane)
                                 for plane in range(layout.planes))
    return np.asarray(order, np.int64)


class TileAppender:
    """The client's writer of a compressed GeoTIFF: appends tiles in :func:`write_order`.

    Tiles that arrive ahead of their turn wait here (``held`` counts them, so that the runner
    submits no more work while too many wait). A block is *durable* once all its tiles are
    written and their offsets are in the header.

    Tiles a worker holds (:class:`~futures_hpc.tiles.held_tiles.HeldTiles`) are placed like
    the others; ``write_held(held, placements)`` then has that worker write them and returns
    a handle, and they go in the header once it is done. Such tiles count as written (their
    blocks durable) only then.

    Parameters
    ----------
    sink : GeoTiffSink
        A compressed output in ``"encoded"`` mode.
    block : (int, int)
        The job's block.
    write_held : callable, optional
        ``write_held(held, placements)`` with ``placements`` a list of ``(tile index, offset,
        size)``: starts the write and returns a handle with ``done()`` and
        ``result(timeout)``, whose result is None (written) or the tiles' bytes (for this
        process to write).
    """

    def __init__(self, sink: GeoTiffSink, block: tuple[int, int],
                 write_held: Callable[[HeldTiles, list[tuple[int, int, int]]], Any] | None = None):
        self.sink = sink
        self.layout = layout = sink.layout
        self.block = block
        self.order = write_order(layout, block)
        self.rank = np.empty(len(self.order), np.int64)
        self.rank[self.order] = np.arange(len(self.order))
        self.fd = os.open(sink.path, os.O_RDWR)
        self.next = 0
        self.end = _data_start(layout)
        self.pending: dict[int, bytes | _HeldTile | None] = {}
        self.waiting: list[tuple[int, tuple[int, int], Any]] = []
        self.write_held = write_held
        #: Writes of held tiles under way: (future, placements, their ranks).
        self.writing: list[tuple[Any, list[tuple[int, int, int]], list[int]]] = []
        #: Ranks placed whose bytes are not written yet (or whose write failed).
        self.unwritten: set[int] = set()

    @property
    def held(self) -> int:
        """Tiles received and not yet written."""
        return len(self.pending)

    def _ranks(self, rows: slice, cols: slice) -> list[int]:
        layout = self.layout
        return [int(self.rank[layout.tile_index(row, col, plane)])
                for row in range(rows.start // layout.tile_height,
                                 -(-rows.stop // layout.tile_height))
                for col in range(cols.start // layout.tile_width,
                                 -(-cols.stop // layout.tile_width))
                for plane in range(layout.planes)]

    def resume(self, recorded: list[Any]) -> list[Any]:
        """Keep the tiles of the first recorded blocks (in grid order); return those blocks.

        ``recorded`` are the windows a store says are written, in grid order; only the run of
        them from the first block on is kept (the file is cut after their tiles), so the
        finished file is byte for byte that of a run never interrupted.
        """
        kept = []
        for window in recorded:
            ranks = self._ranks(window.rows, window.cols)
            if min(ranks) != self.next:
                break
            self.next = max(ranks) + 1
            kept.append(window)
        offsets = self.layout.read_array(self.fd, self.layout.offsets)
        counts = self.layout.read_array(self.fd, self.layout.bytecounts)
        written = self.order[:self.next]
        if len(written):
            self.end = int(np.max(offsets[written] + counts[written]))
        rest = np.sort(self.order[self.next:])
        for index in rest:
            for array in (self.layout.offsets, self.layout.bytecounts):
                self.layout.write_array(self.fd, array, int(index), np.zeros(1, np.int64))
        os.ftruncate(self.fd, self.end)
        os.fsync(self.fd)
        return kept

    def add(self, rows: slice, cols: slice, tiles: EncodedTiles | np.ndarray | None,
            blocks: list[Any], sync: bool = False) -> list[Any]:
        """Take a group's tiles (compressed, or pixels to compress here; None: skip them).

        ``blocks`` are the group's windows that succeeded; returns the blocks (of any group)
        that became durable, after an ``fsync`` when ``sync``.
        """
        if tiles is None:
            for rank in self._ranks(rows, cols):
                self.pending[rank] = None
        elif isinstance(tiles, HeldTiles):
            for index, size in zip(tiles.indices, tiles.sizes, strict=True):
                self.pending[int(self.rank[index])] = _HeldTile(tiles, size)
        else:
            if not isinstance(tiles, EncodedTiles):
                tiles = self.sink.encode(rows, cols, tiles)
            for index, payload in zip(tiles.indices, tiles.payloads, strict=True):
                self.pending[int(self.rank[index])] = payload
        for window in blocks:
            self.waiting.append((max(self._ranks(window.rows, window.cols)), window.index,
                                 window))
        self._write_ready()
        self._settle()
        return self._durable(sync)

    def _durable(self, sync: bool) -> list[Any]:
        """The waiting blocks whose tiles are all written and listed; fsync first if ``sync``."""
        written = min(self.unwritten, default=self.next)
        durable = [entry for entry in self.waiting if entry[0] < written]
        if not durable:
            return []
        self.waiting = [entry for entry in self.waiting if entry[0] >= written]
        if sync:
            os.fsync(self.fd)
        return [window for _, _, window in sorted(durable)]

    def _write_ready(self) -> None:
        here: list[tuple[int, bytes]] = []  # (offset, payload) written by this process
        placed: list[tuple[int, int, int]] = []  # (tile index, offset, size)
        held: dict[tuple[int, int], tuple[HeldTiles, list[tuple[int, int, int]], list[int]]]
        held = {}
        while self.next in self.pending:
            payload = self.pending.pop(self.next)
            index = int(self.order[self.next])
            if payload is None:
                placed.append((index, 0, 0))
            elif isinstance(payload, _HeldTile):
                _, placements, ranks = held.setdefault(payload.tiles.group,
                                                       (payload.tiles, [], []))
                placements.append((index, self.end, payload.size))
                ranks.append(self.next)
                self.unwritten.add(self.next)
                self.end += payload.size
            else:
                placed.append((index, self.end, len(payload)))
                here.append((self.end, payload))
                self.end += len(payload)
            self.next += 1
        for tiles, placements, ranks in held.values():
            self.writing.append((self.write_held(tiles, placements), placements, ranks))
        _pwrite_runs(self.fd, here)
        self._list(placed)

    def _list(self, placed: list[tuple[int, int, int]]) -> None:
        """Put tiles in the header (after their data: a kill in between leaves one unlisted)."""
        for index, offset, size in placed:
            self.layout.write_array(self.fd, self.layout.offsets, index,
                                    np.array([offset], np.int64))
            self.layout.write_array(self.fd, self.layout.bytecounts, index,
                                    np.array([size], np.int64))

    def _settle(self, wait: bool = False, timeout: float | None = None) -> None:
        """List the held tiles whose writes are done (all of them, with ``wait``).

        A write that failed leaves its tiles unlisted and unwritten (their blocks never
        durable) and raises, unless ``timeout`` is given (closing after an error): then
        writes not done within it are left as they are, and failures are only logged.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        still, failure = [], None
        for entry in self.writing:
            handle, placements, ranks = entry
            if not (wait or handle.done()):
                still.append(entry)
                continue
            try:
                payloads = handle.result(
                    None if deadline is None else max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                still.append(entry)
                continue
            except Exception as exc:  # noqa: BLE001 - raised below, with its tiles named
                failure = failure or RuntimeError(
                    f"writing {len(placements)} compressed tiles on a worker failed: "
                    f"{type(exc).__name__}: {exc}")
                continue
            if payloads is not None:  # the file is not visible there: write them here
                _pwrite_runs(self.fd, [(offset, payload) for (_, offset, _), payload
                                       in zip(placements, payloads, strict=True)])
            self._list(placements)
            self.unwritten.difference_update(ranks)
        self.writing = still
        if failure is not None:
            if timeout is None:
                raise failure
            logger.warning("%s", failure)

    def close(self, complete: bool = True, sync: bool = False) -> list[Any]:
        """Write what is left (``complete``: tiles after a gap stay sparse), close the file.

        Waits for the held tiles' writes (after an error, for 10 s at most) and returns the
        blocks that became durable meanwhile, after an ``fsync`` when ``sync``.
        """
        try:
            while complete and self.pending:
                if self.next not in self.pending:
                    self.pending[self.next] = None
                self._write_ready()
            self._settle(wait=True, timeout=None if complete else CLOSING_WAIT_SECONDS)
            return self._durable(sync)
        finally:
            os.close(self.fd)


#: After an error, how long closing waits for the workers' writes of held tiles.
CLOSING_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class _HeldTile:
    """A tile a worker holds, waiting for its turn: the group's record and its size."""

    tiles: HeldTiles
    size: int


def _pwrite_runs(fd: int, writes: list[tuple[int, bytes]]) -> None:
    """Write ``(offset, payload)`` pairs, joining those that follow each other."""
    run: list[bytes] = []
    start = end = 0
    for offset, payload in writes:
        if run and offset != end:
            pwrite_all(fd, b"".join(run), start)
            run = []
        if not run:
            start = end = offset
        run.append(payload)
        end += len(payload)
    if run:
        pwrite_all(fd, b"".join(run), start)
