"""Block-wise processing of images larger than memory, with margins, on any executor.

The image is cut into a grid of blocks (:class:`TileGrid`). Each block is read with ``overlap``
pixels of margin on every side, so that a filter gives the same answer as on the whole image;
at the image edge the margin is filled like :func:`numpy.pad` with mode ``boundary``. The
user's function runs on the workers; its result is trimmed back to the block and written to the
output by the worker itself when the output is a file or a zarr store.

:func:`map_blocks` produces an image, :func:`reduce_blocks` a statistic. Both use only the
public executor API (``submit`` and ``client.scatter``/``client.run``), so they work on every
backend. See ``docs/tiles.md``.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import cloudpickle
import numpy as np

from futures_hpc import raster_io
from futures_hpc.errors import FuturesHPCError, OptionError
from futures_hpc.raster_io import Georeference, ImageSink, ImageSource

__all__ = ["BlockError", "BlockInfo", "TileGrid", "Window", "map_blocks", "reduce_blocks"]

logger = logging.getLogger("futures_hpc")

PADDING_MODES = ("edge", "reflect", "symmetric", "constant")
ERROR_POLICIES = ("raise", "continue")
IN_FLIGHT_PER_THREAD = 2
IN_FLIGHT_REFRESH_SECONDS = 1.0


class BlockError(FuturesHPCError, RuntimeError):
    """One or more blocks failed; the message names their windows.

    Attributes
    ----------
    failures : list of (Window, BaseException)
        Every failed block with its exception, in the order they failed.
    output : object
        With ``on_error="continue"``, what ``map_blocks`` would have returned (the other blocks
        are written) or the partial result of ``reduce_blocks``; otherwise None.
    """

    def __init__(self, message: str, failures: list[tuple[Window, BaseException]],
                 output: Any = None):
        super().__init__(message)
        self.failures = failures
        self.output = output


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int]:
    try:
        pair = (value, value) if np.ndim(value) == 0 else tuple(value)
        valid = len(pair) == 2 and all(int(v) == v and v >= minimum for v in pair)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise OptionError(f"{name} must be an integer >= {minimum} or a pair of them "
                          f"(rows, cols), got {value!r}")
    return (int(pair[0]), int(pair[1]))


@dataclass(frozen=True)
class Window:
    """One block of a :class:`TileGrid`.

    Attributes
    ----------
    index : (int, int)
        ``(block_row, block_col)`` in the grid.
    rows, cols : slice
        The block's core in image coordinates (what the output receives).
    read_rows, read_cols : slice
        The core plus its margin, clipped to the image: the pixels read from the inputs.
    overlap : (int, int)
        The margin in rows and columns.
    grid_shape, image_shape : (int, int)
        Blocks and pixels along rows and columns.
    """

    index: tuple[int, int]
    rows: slice
    cols: slice
    read_rows: slice
    read_cols: slice
    overlap: tuple[int, int]
    grid_shape: tuple[int, int]
    image_shape: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """Rows and columns of the core."""
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)

    @property
    def padded_rows(self) -> range:
        """Image rows of the block with its full margin (may reach outside the image)."""
        return range(self.rows.start - self.overlap[0], self.rows.stop + self.overlap[0])

    @property
    def padded_cols(self) -> range:
        """Image columns of the block with its full margin (may reach outside the image)."""
        return range(self.cols.start - self.overlap[1], self.cols.stop + self.overlap[1])

    @property
    def edge_padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Margin pixels beyond the image edge: ``((top, bottom), (left, right))``."""
        return ((self.read_rows.start - self.padded_rows.start,
                 self.padded_rows.stop - self.read_rows.stop),
                (self.read_cols.start - self.padded_cols.start,
                 self.padded_cols.stop - self.read_cols.stop))

    def __str__(self) -> str:
        return (f"block {self.index} of {self.grid_shape} (rows {self.rows.start}:"
                f"{self.rows.stop}, cols {self.cols.start}:{self.cols.stop})")


class TileGrid:
    """The blocks of an image, row by row.

    Parameters
    ----------
    shape : tuple of int
        The image shape, 2-D ``(rows, cols)`` or 3-D ``(bands, rows, cols)``.
    block : int or (int, int)
        Rows and columns of a block; the last row and column of blocks may be smaller.
    overlap : int or (int, int)
        Margin of neighbouring pixels read around each block.

    Examples
    --------
    >>> grid = TileGrid((1000, 700), block=512, overlap=1)
    >>> len(grid), grid.shape
    (4, (2, 2))
    >>> grid.block_of(600, 10)
    (1, 0)
    >>> str(grid.window(1, 1))
    'block (1, 1) of (2, 2) (rows 512:1000, cols 512:700)'
    """

    def __init__(self, shape: Sequence[int], block: int | Sequence[int] = (512, 512),
                 overlap: int | Sequence[int] = 0):
        if len(shape) not in (2, 3):
            raise OptionError(f"an image is 2-D (rows, cols) or 3-D (bands, rows, cols); "
                              f"got shape {tuple(shape)}")
        self.image_shape = raster_io.image_shape_of(tuple(shape))
        if min(self.image_shape) < 1:
            raise OptionError(f"the image is empty: shape {tuple(shape)}")
        self.block = _pair(block, "block", 1)
        self.overlap = _pair(overlap, "overlap", 0)
        self.shape = tuple(-(-size // step) for size, step in
                           zip(self.image_shape, self.block, strict=True))

    def __len__(self) -> int:
        return self.shape[0] * self.shape[1]

    def __iter__(self) -> Iterator[Window]:
        for block_row in range(self.shape[0]):
            for block_col in range(self.shape[1]):
                yield self.window(block_row, block_col)

    def __repr__(self) -> str:
        return (f"TileGrid(shape={self.image_shape}, block={self.block}, "
                f"overlap={self.overlap})")

    def window(self, block_row: int, block_col: int) -> Window:
        """Return the window of block ``(block_row, block_col)``."""
        if not (0 <= block_row < self.shape[0] and 0 <= block_col < self.shape[1]):
            raise IndexError(f"block ({block_row}, {block_col}) is outside the grid {self.shape}")
        core = [slice(index * step, min((index + 1) * step, size)) for index, step, size in
                zip((block_row, block_col), self.block, self.image_shape, strict=True)]
        read = [slice(max(0, part.start - margin), min(size, part.stop + margin))
                for part, margin, size in zip(core, self.overlap, self.image_shape, strict=True)]
        return Window((block_row, block_col), core[0], core[1], read[0], read[1],
                      self.overlap, self.shape, self.image_shape)

    def block_of(self, row: int, col: int) -> tuple[int, int]:
        """Return ``(block_row, block_col)`` of the block whose core holds pixel (row, col)."""
        if not (0 <= row < self.image_shape[0] and 0 <= col < self.image_shape[1]):
            raise IndexError(f"pixel ({row}, {col}) is outside the image {self.image_shape}")
        return (row // self.block[0], col // self.block[1])

    def window_of(self, row: int, col: int) -> Window:
        """Return the window whose core holds pixel (row, col)."""
        return self.window(*self.block_of(row, col))


# --------------------------------------------------------------------------------------------
# what the user's function receives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockInfo:
    """What a function with an ``info`` keyword learns about its block.

    Attributes
    ----------
    window : Window
        The block in the grid.
    core : (slice, slice)
        Where the core lies in the block the function received (its margin is outside).
    boundary : str or None
        How margins beyond the image edge were filled.
    transform, crs, nodata
        The first input's georeferencing when it has one (a rasterio ``Affine``, a rasterio
        ``CRS``), else None.
    """

    window: Window
    core: tuple[slice, slice]
    boundary: str | None
    transform: Any = None
    crs: Any = None
    nodata: float | None = None

    @property
    def index(self) -> tuple[int, int]:
        """``(block_row, block_col)``."""
        return self.window.index

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Blocks along rows and columns."""
        return self.window.grid_shape

    @property
    def origin(self) -> tuple[int, int]:
        """Image row and column of the first pixel of the block the function received."""
        return (self.window.rows.start - self.core[0].start,
                self.window.cols.start - self.core[1].start)

    @property
    def block_transform(self) -> Any:
        """The affine transform of the received block's top-left pixel, or None."""
        if self.transform is None:
            return None
        row, col = self.origin
        a, b, c, d, e, f = tuple(self.transform)[:6]
        return type(self.transform)(a, b, c + a * col + b * row, d, e, f + d * col + e * row)

    def pixel_coordinates(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(x, y)`` of the pixel centres of a received block of ``shape``.

        Like RIOS's ``getBlockCoordArrays``; needs a georeferenced first input.
        """
        if self.transform is None:
            raise ValueError("the first input has no georeferencing")
        row, col = self.origin
        rows, cols = np.mgrid[row:row + shape[0], col:col + shape[1]] + 0.5
        a, b, c, d, e, f = tuple(self.transform)[:6]
        return (a * cols + b * rows + c, d * cols + e * rows + f)


# --------------------------------------------------------------------------------------------
# reading a block with its margin
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _padded_index(size: int, margin: int, mode: str) -> np.ndarray:
    """Source index of each position of ``numpy.pad(arange(size), margin, mode)``."""
    index = np.pad(np.arange(size, dtype=np.intp), margin, mode=mode)
    index.setflags(write=False)
    return index


def _axis_index(padded: range, size: int, margin: int, mode: str) -> np.ndarray | None:
    """Image indices for the padded positions, or None where no padding is needed."""
    if padded.start >= 0 and padded.stop <= size:
        return None
    return _padded_index(size, margin, mode)[padded.start + margin:padded.stop + margin]


def read_padded(source: ImageSource, window: Window, boundary: str | None,
                fill_value: float = 0) -> np.ndarray:
    """Read ``window`` of ``source`` with its margin, filled beyond the edge like ``numpy.pad``.

    With ``boundary=None`` the margin stops at the image edge (the block is smaller there).
    """
    padding = window.edge_padding
    if boundary is None or padding == ((0, 0), (0, 0)):
        return source.read(window.read_rows, window.read_cols)
    if boundary == "constant":
        inner = source.read(window.read_rows, window.read_cols)
        leading = ((0, 0),) * (inner.ndim - 2)
        return np.pad(inner, leading + padding, mode="constant", constant_values=fill_value)
    # The margin's pixels come from inside the read window (a block has at least one pixel),
    # so copy the window once into the padded block, then fill the margin from the block itself.
    inner = source.read(window.read_rows, window.read_cols)
    (top, bottom), (left, right) = padding
    block = np.empty(inner.shape[:-2] + (len(window.padded_rows), len(window.padded_cols)),
                     inner.dtype)
    block[..., top:block.shape[-2] - bottom, left:block.shape[-1] - right] = inner
    for axis, (padded, size, margin, (before, after)) in enumerate(zip(
            (window.padded_rows, window.padded_cols), window.image_shape, window.overlap,
            padding, strict=True)):
        if before or after:
            # where, inside the block, each margin position finds its pixel
            source_positions = _axis_index(padded, size, margin, boundary) - padded.start
            margin_positions = np.r_[0:before, len(padded) - after:len(padded)]
            taken = np.take(block, source_positions[margin_positions], axis=block.ndim - 2 + axis)
            if axis == 0:  # rows first; the columns' pass then fills the corners too
                block[..., margin_positions, :] = taken
            else:
                block[..., margin_positions] = taken
    return block


def _core_in_block(window: Window, boundary: str | None) -> tuple[slice, slice]:
    if boundary is None:
        starts = (window.rows.start - window.read_rows.start,
                  window.cols.start - window.read_cols.start)
    else:
        starts = window.overlap
    return tuple(slice(start, start + length) for start, length in
                 zip(starts, window.shape, strict=True))


# --------------------------------------------------------------------------------------------
# the work done on a worker: a task runs a group of neighbouring blocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """Neighbouring blocks run by one task: their inputs are read as one region."""

    windows: tuple[Window, ...]
    window: Window  # the union of the blocks, with its margin

    @classmethod
    def of(cls, windows: Sequence[Window]) -> _Group:
        first, last = windows[0], windows[-1]
        rows = slice(first.rows.start, last.rows.stop)
        cols = slice(first.cols.start, last.cols.stop)
        read_rows = slice(first.read_rows.start, last.read_rows.stop)
        read_cols = slice(first.read_cols.start, last.read_cols.stop)
        union = Window(first.index, rows, cols, read_rows, read_cols, first.overlap,
                       first.grid_shape, first.image_shape)
        return cls(tuple(windows), union)

    def __str__(self) -> str:
        if len(self.windows) == 1:
            return str(self.windows[0])
        union = self.window
        return (f"blocks {self.windows[0].index} to {self.windows[-1].index} of "
                f"{union.grid_shape} (rows {union.rows.start}:{union.rows.stop}, "
                f"cols {union.cols.start}:{union.cols.stop})")


class _RegionSource(ImageSource):
    """The pixels of a group's window (clipped to the image), read as if from the image."""

    def __init__(self, region: np.ndarray, window: Window):
        self.region = region
        self.origin = (window.read_rows.start, window.read_cols.start)
        self.shape = region.shape[:-2] + window.image_shape
        self.dtype = region.dtype
        self.name = "region"

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Return a view (image coordinates in, region coordinates out)."""
        top, left = self.origin
        return self.region[..., rows.start - top:rows.stop - top,
                           cols.start - left:cols.stop - left]


def _received_shape(window: Window, boundary: str | None) -> tuple[int, int]:
    if boundary is None:
        return (window.read_rows.stop - window.read_rows.start,
                window.read_cols.stop - window.read_cols.start)
    return (len(window.padded_rows), len(window.padded_cols))


class _NotVisible:
    """Returned by a worker that cannot see a file or store the task needs."""

    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class _Outcome:
    """What a task returns: its output (unless written), its partial, its failed blocks."""

    data: np.ndarray | None = None
    partial: Any = None
    has_partial: bool = False
    failures: list[tuple[Window, BaseException, str]] = field(default_factory=list)


class _RemoteTraceback(Exception):  # noqa: N818 - named as the standard library names it
    """The traceback of a block's exception on the worker, attached as its ``__cause__``."""


WINDOW_ATTRIBUTE = "futures_hpc_window"


@dataclass
class _BlockJob:
    """Everything constant across blocks; scattered once to every worker."""

    func: Callable[..., Any]
    sources: list[ImageSource]
    boundary: str | None
    fill_value: float
    passes_info: bool
    passes_otherargs: bool
    otherargs: Any
    georeference: Georeference | None
    dtype: np.dtype | None
    combine: Callable[[Any, Any], Any] | None  # None: map (trim and assemble), else reduce
    stops_at_first_error: bool

    def regions(self, window: Window, data: Sequence[np.ndarray | None] | None) -> list:
        """Each input's pixels under a group's window and margin, clipped to the image."""
        given = data if data is not None else [None] * len(self.sources)
        return [source.read(window.read_rows, window.read_cols) if region is None else region
                for source, region in zip(self.sources, given, strict=True)]

    def block_of(self, region: np.ndarray, group: Window, window: Window) -> np.ndarray:
        """``window``'s block cut from a group's region, padded at the image edge; read-only."""
        block = read_padded(_RegionSource(region, group), window, self.boundary,
                            self.fill_value)
        block = block.view()
        block.flags.writeable = False
        return block

    def info(self, window: Window) -> BlockInfo:
        georeference = self.georeference or Georeference(None, None, None)
        return BlockInfo(window, _core_in_block(window, self.boundary), self.boundary,
                         georeference.transform, georeference.crs, georeference.nodata)

    def call(self, blocks: list, window: Window) -> Any:
        keywords = {}
        if self.passes_info:
            keywords["info"] = self.info(window)
        if self.passes_otherargs:
            keywords["otherargs"] = self.otherargs
        return self.func(*blocks, **keywords)

    def trim(self, result: Any, window: Window) -> np.ndarray:
        result = np.asarray(result)
        received = _received_shape(window, self.boundary)
        if result.ndim not in (2, 3) or result.shape[-2:] != received:
            raise ValueError(f"func returned shape {result.shape} for {window}; it must return "
                             f"(rows, cols) or (bands, rows, cols) with (rows, cols) = "
                             f"{received}, the image shape of the block it received")
        core_rows, core_cols = _core_in_block(window, self.boundary)
        core = result[..., core_rows, core_cols]
        return core if self.dtype is None else core.astype(self.dtype, copy=False)

    def run(self, group: _Group, sink: ImageSink | None,
            data: Sequence[np.ndarray | None] | None) -> _Outcome | _NotVisible:
        """Read the group's region, run every block, write (or return) the group's output."""
        try:
            regions = self.regions(group.window, data)
        except FileNotFoundError as exc:
            return _NotVisible(f"cannot read an input here: {exc}")
        outcome = _Outcome()
        # raw files take positional writes, safe side by side: write each block as it is done
        block_sink = sink if isinstance(sink, raster_io.RawFileSink) else None
        for window in group.windows:
            try:
                blocks = [self.block_of(region, group.window, window) for region in regions]
                result = self.call(blocks, window)
                if self.combine is None:
                    core = self.trim(result, window)
                    if block_sink is not None and _written(block_sink, window, core):
                        continue
                    block_sink = None
                    outcome.data = _place(outcome.data, core, group, window)
                elif outcome.has_partial:
                    outcome.partial = self.combine(outcome.partial, result)
                else:
                    outcome.partial, outcome.has_partial = result, True
            except Exception as exc:
                if self.stops_at_first_error:
                    _label(exc, window)
                    raise
                outcome.failures.append((window, exc, traceback.format_exc()))
        if outcome.data is not None and sink is not None:
            try:
                sink.write(group.window.rows, group.window.cols, outcome.data)
                outcome.data = None
            except FileNotFoundError:
                pass  # the client writes it
        return outcome


def _written(sink: ImageSink, window: Window, core: np.ndarray) -> bool:
    """Write one block's core; False if the sink's file is not visible here."""
    try:
        sink.write(window.rows, window.cols, core)
    except FileNotFoundError:
        return False
    return True


def _label(exc: BaseException, window: Window) -> None:
    try:
        setattr(exc, WINDOW_ATTRIBUTE, window)
    except AttributeError:  # an exception without __dict__
        pass


def _place(output: np.ndarray | None, core: np.ndarray, group: _Group,
           window: Window) -> np.ndarray:
    """Put a block's trimmed result into its group's output (created on the first block)."""
    if output is None:
        output = np.zeros(core.shape[:-2] + group.window.shape, core.dtype)
    if core.shape[:-2] != output.shape[:-2]:
        raise ValueError(f"func returned {core.shape[:-2] or 'no'} bands for {window}, but "
                         f"{output.shape[:-2] or 'no'} bands for another block")
    row = window.rows.start - group.window.rows.start
    col = window.cols.start - group.window.cols.start
    output[..., row:row + window.shape[0], col:col + window.shape[1]] = core
    return output


# Jobs already unpickled in this process, newest last. dask's active memory manager may drop a
# worker's replica of the broadcast job between tasks and fetch it again later; this cache makes
# sure the user's func and otherargs are still unpickled only once per worker process.
_UNPICKLED_JOBS: OrderedDict[str, _BlockJob] = OrderedDict()
_UNPICKLED_JOBS_LOCK = threading.Lock()
UNPICKLED_JOBS_KEPT = 4


@dataclass(frozen=True)
class _SharedJob:
    """A pickled :class:`_BlockJob` with a token; unpickled at most once per process."""

    token: str
    payload: bytes

    @classmethod
    def of(cls, job: _BlockJob) -> _SharedJob:
        return cls(uuid.uuid4().hex, cloudpickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))

    def resolve(self) -> _BlockJob:
        with _UNPICKLED_JOBS_LOCK:
            job = _UNPICKLED_JOBS.get(self.token)
            if job is None:
                job = pickle.loads(self.payload)
                _UNPICKLED_JOBS[self.token] = job
                while len(_UNPICKLED_JOBS) > UNPICKLED_JOBS_KEPT:
                    _UNPICKLED_JOBS.popitem(last=False)
            else:
                _UNPICKLED_JOBS.move_to_end(self.token)
            return job


def _forget_job(token: str) -> None:
    """Drop a finished run's job from this worker process (run through ``client.run``)."""
    with _UNPICKLED_JOBS_LOCK:
        _UNPICKLED_JOBS.pop(token, None)


def _run_group(shared: _SharedJob, group: _Group, sink: ImageSink | None,
               data: Sequence[np.ndarray | None] | None) -> _Outcome | _NotVisible:
    """The task: run one group of blocks on a worker (see :meth:`_BlockJob.run`)."""
    return shared.resolve().run(group, sink, data)


def _accepts_keyword(func: Callable[..., Any], name: str, *, through_var_keyword: bool) -> bool:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        (parameter.name == name and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD,
                                                       parameter.KEYWORD_ONLY))
        or (through_var_keyword and parameter.kind is parameter.VAR_KEYWORD)
        for parameter in parameters)


# --------------------------------------------------------------------------------------------
# checking the arguments (everything here runs before any work starts)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Padding:
    boundary: str | None
    fill_value: float

    @classmethod
    def from_arguments(cls, boundary: Any, fill_value: float) -> _Padding:
        if boundary is None or boundary in PADDING_MODES:
            return cls(boundary, fill_value)
        if isinstance(boundary, (int, float, np.number)) and not isinstance(boundary, bool):
            return cls("constant", boundary)
        raise OptionError(f"boundary must be one of {PADDING_MODES}, None (no margin beyond the "
                          f"edge) or a number (constant fill), got {boundary!r}")


def _open_inputs(inputs: Sequence[Any]) -> list[ImageSource]:
    if not inputs:
        raise OptionError("map_blocks and reduce_blocks need at least one input image")
    sources = [raster_io.open_source(obj, position) for position, obj in enumerate(inputs)]
    for source in sources:
        if len(source.shape) not in (2, 3):
            raise OptionError(f"{source.name} has shape {source.shape}; images are 2-D "
                              f"(rows, cols) or 3-D (bands, rows, cols)")
    image_shapes = {raster_io.image_shape_of(source.shape) for source in sources}
    if len(image_shapes) > 1:
        shapes = ", ".join(f"{source.name}: {source.shape}" for source in sources)
        raise OptionError(f"the inputs' images (last two axes) differ in shape: {shapes}")
    return sources


def _check_keywords(func: Callable[..., Any], otherargs: Any) -> None:
    if not callable(func):
        raise OptionError(f"func must be callable, got {type(func).__name__}")
    if otherargs is not None and not _accepts_keyword(func, "otherargs",
                                                      through_var_keyword=True):
        raise OptionError(f"otherargs is given but {_name_of(func)} has no 'otherargs' keyword")


def _check_policy(on_error: str, max_in_flight: int | None) -> None:
    if on_error not in ERROR_POLICIES:
        raise OptionError(f"on_error must be one of {ERROR_POLICIES}, got {on_error!r}")
    if max_in_flight is not None and (int(max_in_flight) != max_in_flight or max_in_flight < 1):
        raise OptionError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")


def _check_out(out: Any, sink: ImageSink | None, image_shape: tuple[int, int],
               block: tuple[int, int]) -> None:
    if isinstance(out, (str, os.PathLike)):
        try:
            raster_io.output_format(out)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
    if sink is None:
        return
    if len(sink.shape) not in (2, 3) or raster_io.image_shape_of(sink.shape) != image_shape:
        raise OptionError(f"out has shape {sink.shape}; its image (last two axes) must be the "
                          f"inputs' {image_shape}")
    if isinstance(sink, raster_io.ZarrSink) and sink.worker_writable:
        misaligned = sink.misaligned_axes(block)
        if misaligned:
            raise OptionError(
                f"block {block} is not a multiple of out's zarr chunks {tuple(sink.array.chunks)} "
                f"along {' and '.join(misaligned)}: workers writing the same chunk would lose "
                f"each other's pixels; pass a block that is a multiple of the chunks")


def _name_of(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


# --------------------------------------------------------------------------------------------
# grouping blocks into tasks
# --------------------------------------------------------------------------------------------

TASK_BYTES_CAP = 256 << 20
TASK_BYTES_FLOOR = 16 << 20
TASK_MEMORY_SHARE = 8  # a task's input may use 1/8 of a worker thread's memory
TASKS_PER_THREAD = 4
MAX_GROUP_SIDE = 64


def _input_bytes_per_pixel(sources: Sequence[ImageSource]) -> int:
    return sum(int(np.prod(source.shape[:-2], dtype=np.int64)) * source.dtype.itemsize
               for source in sources)


def _chunk_shape(sources: Sequence[ImageSource]) -> tuple[int, int]:
    """The largest storage chunk of the inputs (1 x 1 where reads are exact)."""
    chunks = [raster_io.image_shape_of(tuple(source.array.chunks)) for source in sources
              if isinstance(source, raster_io.ZarrSource)]
    return tuple(max(sizes) for sizes in zip(*chunks, strict=True)) if chunks else (1, 1)


def _read_amplification(grid: TileGrid, group: tuple[int, int],
                        chunk: tuple[int, int]) -> float:
    """Pixels decoded per pixel used when a group's margin reaches into neighbouring chunks."""
    factor = 1.0
    for blocks, step, size, chunk_len, margin in zip(group, grid.block, grid.image_shape,
                                                     chunk, grid.overlap, strict=True):
        length = min(blocks * step, size)
        extra = 2 * chunk_len if margin else 0
        factor *= min(length + extra, size) / length
    return factor


UNKNOWN_THREAD_MEMORY = 512 << 20  # assumed while no worker has connected yet


def _worker_resources(executor: Any) -> tuple[int, int | None]:
    """Threads of the connected workers and the least memory one thread may use.

    While no worker is connected (a batch job still queued), the executor's planned worker
    slots (if it says) and a modest memory are assumed.
    """
    workers = executor.client.scheduler_info(n_workers=-1).get("workers", {}).values()
    threads = sum(worker.get("nthreads", 1) for worker in workers)
    if not threads:
        planned = getattr(executor, "worker_slots", None)
        return (planned() if callable(planned) else 1), UNKNOWN_THREAD_MEMORY
    limits = [worker["memory_limit"] // max(1, worker.get("nthreads", 1)) for worker in workers
              if worker.get("memory_limit")]
    return threads, min(limits) if limits else None


def _choose_blocks_per_task(grid: TileGrid, sources: Sequence[ImageSource],
                            executor: Any) -> tuple[int, int]:
    """Group blocks so a task reads a large region but each func call stays block-sized.

    The group is the largest whose inputs fit a share of a worker thread's memory while there
    are still four tasks per thread (so the hand-out can balance); among groups of that size,
    the one that decodes the fewest neighbouring chunks for its margin wins.
    """
    threads, thread_memory = _worker_resources(executor)
    budget = TASK_BYTES_CAP if thread_memory is None else min(
        TASK_BYTES_CAP, max(TASK_BYTES_FLOOR, thread_memory // TASK_MEMORY_SHARE))
    block_bytes = grid.block[0] * grid.block[1] * _input_bytes_per_pixel(sources)
    most_blocks = max(1, budget // max(1, block_bytes))
    fewest_tasks = max(2, TASKS_PER_THREAD * threads)
    chunk = _chunk_shape(sources)
    best, best_key = (1, 1), None
    for rows in range(1, min(grid.shape[0], MAX_GROUP_SIDE) + 1):
        for cols in range(1, min(grid.shape[1], MAX_GROUP_SIDE) + 1):
            count = rows * cols
            if count > most_blocks or (count > 1 and count * fewest_tasks > len(grid)):
                break
            key = (count, -_read_amplification(grid, (rows, cols), chunk), cols)
            if best_key is None or key > best_key:
                best, best_key = (rows, cols), key
    return best


def _groups(grid: TileGrid, blocks_per_task: tuple[int, int]) -> Iterator[_Group]:
    group_rows, group_cols = blocks_per_task
    grid_rows, grid_cols = grid.shape
    for first_row in range(0, grid_rows, group_rows):
        rows = range(first_row, min(grid_rows, first_row + group_rows))
        for first_col in range(0, grid_cols, group_cols):
            cols = range(first_col, min(grid_cols, first_col + group_cols))
            yield _Group.of([grid.window(row, col) for row in rows for col in cols])


# --------------------------------------------------------------------------------------------
# handing tasks out to the executor
# --------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, progress: bool | Callable[[int, int], None], total: int):
        self.total = total
        self.done = 0
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="block")

    def advance(self, blocks: int) -> None:
        self.done += blocks
        if self.bar is not None:
            self.bar.update(blocks)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Runner:
    """Submits groups with a bounded number in flight and collects what comes back."""

    executor: Any
    job: _BlockJob
    func_name: str
    on_error: str
    max_in_flight: int | None
    progress: _Progress
    shared_paths: list[str] = field(default_factory=list)
    stages: list[raster_io.SharedMemoryStage] = field(default_factory=list)
    failures: list[tuple[Window, BaseException]] = field(default_factory=list)
    job_future: Any = None
    shared_job: _SharedJob | None = None
    _limit: int = 2
    _limit_checked: float = float("-inf")

    def __enter__(self) -> _Runner:
        self.shared_job = _SharedJob.of(self.job)
        self.job_future = self.executor.client.scatter(self.shared_job, broadcast=True,
                                                       hash=False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.close()
        for stage in self.stages:
            stage.close()
        if self.job_future is not None:
            self.job_future.release()
            try:
                self.executor.client.run(_forget_job, self.shared_job.token, wait=False)
            except Exception:  # noqa: BLE001 - a closing cluster forgets everything anyway
                logger.debug("could not drop job %s from the workers", self.shared_job.token,
                             exc_info=True)
        for path in self.shared_paths:
            _remove(path)

    def in_flight_limit(self) -> int:
        if self.max_in_flight is not None:
            return int(self.max_in_flight)
        now = time.monotonic()
        if now - self._limit_checked > IN_FLIGHT_REFRESH_SECONDS:
            threads = sum(self.executor.client.nthreads().values())
            self._limit = max(2, IN_FLIGHT_PER_THREAD * threads)
            self._limit_checked = now
        return self._limit

    def submit(self, group: _Group, sink: ImageSink | None, send_all: bool = False) -> Future:
        last_row = min(group.window.image_shape[0], group.window.padded_rows.stop)
        for stage in self.stages:
            stage.ensure_rows(last_row)
        data = None
        if send_all or not all(source.worker_readable for source in self.job.sources):
            window = group.window
            data = [source.read(window.read_rows, window.read_cols)
                    if send_all or not source.worker_readable else None
                    for source in self.job.sources]
        return self.executor.submit(_run_group, self.job_future, group, sink, data)

    def run(self, groups: Iterable[_Group], sink: ImageSink | None,
            on_outcome: Callable[[_Group, _Outcome], None], counted: bool = True) -> None:
        """Run every group, calling ``on_outcome`` on the client for each.

        ``counted`` says whether finished blocks advance the progress report.
        """
        worker_sink = sink if sink is not None and sink.worker_writable else None
        pending: dict[Future, tuple[_Group, bool]] = {}
        remaining = iter(groups)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.in_flight_limit():
                    group = next(remaining, None)
                    if group is None:
                        exhausted = True
                    else:
                        pending[self.submit(group, worker_sink)] = (group, False)
                if not pending:
                    return
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in finished:
                    group, resent = pending.pop(future)
                    if self._collect(future, group, resent, on_outcome, pending) and counted:
                        self.progress.advance(len(group.windows))
        finally:
            for future in pending:
                future.cancel()

    def _collect(self, future: Future, group: _Group, resent: bool,
                 on_outcome: Callable[[_Group, _Outcome], None],
                 pending: dict[Future, tuple[_Group, bool]]) -> bool:
        """Handle a finished task; tell whether its blocks are done (not resent)."""
        try:
            outcome = future.result()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is reported with its window
            window = getattr(exc, WINDOW_ATTRIBUTE, None)
            self._fail([window] if window is not None else list(group.windows), exc)
            return True
        if isinstance(outcome, _NotVisible):
            if resent:
                self._fail(list(group.windows), RuntimeError(outcome.reason))
                return True
            logger.info("%s: %s; sending its data through the client", group, outcome.reason)
            pending[self.submit(group, None, send_all=True)] = (group, True)
            return False
        for window, exc, remote_traceback in outcome.failures:
            exc.__cause__ = _RemoteTraceback(remote_traceback)
            self._fail([window], exc)
        try:
            on_outcome(group, outcome)
        except Exception as exc:  # noqa: BLE001 - e.g. the client's write of the group
            self._fail(list(group.windows), exc)
        return True

    def _fail(self, windows: list[Window], exc: BaseException) -> None:
        self.failures.extend((window, exc) for window in windows)
        if self.on_error == "raise":
            raise BlockError(_failure_message(self.func_name, self.failures),
                             list(self.failures)) from exc
        if self.on_error == "continue":
            logger.warning("%s failed on %s: %s: %s", self.func_name, windows[0],
                           type(exc).__name__, exc)

    def raise_failures(self, output: Any) -> None:
        if self.failures:
            raise BlockError(_failure_message(self.func_name, self.failures),
                             list(self.failures), output) from self.failures[0][1]


def _failure_message(func_name: str, failures: list[tuple[Window, BaseException]]) -> str:
    window, exc = failures[0]
    message = f"{func_name} failed on {window}: {type(exc).__name__}: {exc}"
    if len(failures) > 1:
        others = "; ".join(str(window) for window, _ in failures[1:6])
        more = f" and {len(failures) - 6} more" if len(failures) > 6 else ""
        message += f" (also failed: {others}{more})"
    return message


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


def _workers_share_memory(executor: Any) -> bool:
    """Tell whether every current worker sees this client's ``/dev/shm`` (and there is one)."""
    if not raster_io.shared_memory_available():
        return False
    path = raster_io.new_shared_path("token")
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
    if shared_memory is None and raster_io.shared_memory_available() and (
            raster_io.shared_memory_free() < needed_bytes):
        logger.info("not enough room in /dev/shm for %d MiB; sending blocks instead",
                    needed_bytes >> 20)
        return False
    shared = _workers_share_memory(executor)
    if shared_memory and not shared:
        raise OptionError("shared_memory=True, but not every worker sees this client's /dev/shm")
    return shared


def _stage_inputs(sources: list[ImageSource], runner: _Runner) -> list[ImageSource]:
    """Replace in-memory inputs by copies in shared memory, made as blocks need them."""
    staged = []
    for source in sources:
        if isinstance(source, raster_io.ArraySource):
            stage = raster_io.SharedMemoryStage(source.array, source.name)
            runner.stages.append(stage)
            runner.shared_paths.append(stage.path)
            source = stage.source
        staged.append(source)
    return staged


def _output_bytes(sink: ImageSink | None, out: Any, grid: TileGrid) -> int:
    """Bytes of an output held in memory (a guess of one float64 band when out is None)."""
    if isinstance(sink, raster_io.ArraySink):
        return sink.array.nbytes
    if out is None:
        return grid.image_shape[0] * grid.image_shape[1] * 8
    return 0


def _shared_bytes_needed(sources: list[ImageSource], output_bytes: int) -> int:
    staged = sum(int(np.prod(source.shape, dtype=np.int64)) * source.dtype.itemsize
                 for source in sources if isinstance(source, raster_io.ArraySource))
    return staged + output_bytes


# --------------------------------------------------------------------------------------------
# the public functions
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """The checked arguments of a run."""

    sources: list[ImageSource]
    grid: TileGrid
    padding: _Padding
    blocks_per_task: tuple[int, int] | None


def _plan(func: Callable[..., Any], inputs: Sequence[Any], block: Any, overlap: Any,
          boundary: Any, fill_value: float, otherargs: Any, on_error: str,
          max_in_flight: int | None, blocks_per_task: Any) -> _Plan:
    _check_keywords(func, otherargs)
    _check_policy(on_error, max_in_flight)
    padding = _Padding.from_arguments(boundary, fill_value)
    per_task = None if blocks_per_task is None else _pair(blocks_per_task, "blocks_per_task", 1)
    sources = _open_inputs(inputs)
    return _Plan(sources, TileGrid(sources[0].shape, block, overlap), padding, per_task)


def _start(executor: Any, plan: _Plan, func: Callable[..., Any], shared: bool, on_error: str,
           max_in_flight: int | None, progress: Any, otherargs: Any, dtype: Any,
           combine: Callable[[Any, Any], Any] | None) -> _Runner:
    runner = _Runner(executor, None, _name_of(func), on_error, max_in_flight,
                     _Progress(progress, len(plan.grid)))
    sources = _stage_inputs(plan.sources, runner) if shared else plan.sources
    runner.job = _BlockJob(
        func=func, sources=sources, boundary=plan.padding.boundary,
        fill_value=plan.padding.fill_value,
        passes_info=_accepts_keyword(func, "info", through_var_keyword=False),
        passes_otherargs=otherargs is not None, otherargs=otherargs,
        georeference=plan.sources[0].georeference,
        dtype=None if dtype is None else np.dtype(dtype), combine=combine,
        stops_at_first_error=on_error == "raise")
    if plan.blocks_per_task is None:
        plan.blocks_per_task = _choose_blocks_per_task(plan.grid, plan.sources, executor)
    logger.info("%s: %d blocks of %s in tasks of %s blocks, overlap %s, boundary %r%s",
                runner.func_name, len(plan.grid), plan.grid.block, plan.blocks_per_task,
                plan.grid.overlap, plan.padding.boundary,
                ", through shared memory" if shared else "")
    return runner


def map_blocks(executor: Any, func: Callable[..., Any], *inputs: Any,
               block: int | tuple[int, int] = (512, 512), overlap: int | tuple[int, int] = 0,
               boundary: str | float | None = "edge", out: Any = None, dtype: Any = None,
               otherargs: Any = None, progress: bool | Callable[[int, int], None] = False,
               fill_value: float = 0, on_error: str = "raise",
               max_in_flight: int | None = None,
               blocks_per_task: int | tuple[int, int] | None = None,
               shared_memory: bool | None = None) -> Any:
    """Apply ``func`` to every block of the inputs (with margins) and assemble the result.

    Parameters
    ----------
    executor : HPCExecutor
        Any futures_hpc executor (only ``submit`` and ``client`` are used).
    func : callable
        ``func(*blocks, [info=BlockInfo], [otherargs=...])`` gets one block per input, each with
        ``overlap`` pixels of margin on every side, and returns an array ``(rows, cols)`` or
        ``(bands, rows, cols)`` of the received block's image shape; the margin is trimmed.
        The blocks are read-only views: copy one before changing it in place.
    *inputs : array, numpy.memmap, zarr array, or path
        2-D ``(rows, cols)`` or 3-D ``(bands, rows, cols)`` images sharing ``(rows, cols)``.
        Paths: ``.npy``, a zarr store, or anything rasterio reads (GeoTIFF...). Files, memmaps
        and zarr stores are read by the workers themselves.
    block : int or (int, int)
        Rows and columns of a block.
    overlap : int or (int, int)
        Margin in pixels.
    boundary : {"edge", "reflect", "symmetric", "constant"}, number or None
        How a margin beyond the image edge is filled, as ``numpy.pad(mode=boundary)``;
        "constant" uses ``fill_value`` (a number means "constant" with that value). None leaves
        the margin out at the edge, so edge blocks are smaller.
    out : None, array, numpy.memmap, zarr array or path
        Where the result goes. None: a new numpy array is returned. A memmap, a zarr array on
        disk or a path (``.npy``, ``.zarr``, ``.tif``; created, overwriting) is written by the
        workers themselves. A GeoTIFF gets the first input's georeferencing. Unless ``out``
        exists, func is first called once on a small window to learn the output's bands and
        type.
    dtype : numpy dtype, optional
        The output's type; by default the type func returns.
    otherargs : object, optional
        Passed to func as ``otherargs=``; sent once to each worker, not once per block.
    progress : bool or callable
        True shows a tqdm bar; a callable gets ``(blocks_done, blocks_total)``.
    fill_value : float
        The margin's value beyond the edge with ``boundary="constant"``.
    on_error : {"raise", "continue"}
        "raise" stops at the first failed block; "continue" runs every block, then raises one
        :class:`BlockError` naming every failed window, with the output in ``.output``.
    max_in_flight : int, optional
        Tasks submitted but not finished; default twice the workers' threads (at least 2).
    blocks_per_task : int or (int, int), optional
        Blocks (rows, cols of them) one task runs, reading their inputs as one region; by
        default chosen from the workers' memory and the inputs' chunks (see docs/tiles.md).
    shared_memory : bool, optional
        Pass in-memory inputs and a returned array through ``/dev/shm`` when every worker runs
        on the client's host. None (default) decides by asking the workers.

    Returns
    -------
    numpy.ndarray or the ``out`` given

    Raises
    ------
    futures_hpc.errors.OptionError
        Bad arguments, or inputs whose images differ in shape (a ValueError), before any work.
    BlockError
        A block failed; its message names the window.
    """
    plan = _plan(func, inputs, block, overlap, boundary, fill_value, otherargs, on_error,
                 max_in_flight, blocks_per_task)
    sink = raster_io.existing_sink(out)
    _check_out(out, sink, plan.grid.image_shape, plan.grid.block)
    shared = _decide_shared_memory(
        executor, shared_memory,
        _shared_bytes_needed(plan.sources, _output_bytes(sink, out, plan.grid)))
    runner = _start(executor, plan, func, shared, on_error, max_in_flight, progress, otherargs,
                    dtype, combine=None)
    with runner:
        return _map_all(runner, plan, sink, out, shared)


def _map_all(runner: _Runner, plan: _Plan, sink: ImageSink | None, out: Any,
             shared: bool) -> Any:
    user_array = sink.array if isinstance(sink, raster_io.ArraySink) else None
    if user_array is not None and shared and raster_io.shared_memory_free() > user_array.nbytes:
        sink = raster_io.create_shared_output(sink.shape, sink.dtype)
        runner.shared_paths.append(sink.path)
    groups: Iterable[_Group] = _groups(plan.grid, plan.blocks_per_task)
    if sink is None:
        sink, groups = _create_output(runner, plan, out, shared)
    runner.run(groups, sink, _write_on_client(sink))
    if isinstance(sink, raster_io.GeoTiffSink):
        sink.remove_lock()
    result = _result_of(sink, out, user_array)
    runner.raise_failures(result)
    return result


def _write_on_client(sink: ImageSink) -> Callable[[_Group, _Outcome], None]:
    def write(group: _Group, outcome: _Outcome) -> None:
        if outcome.data is not None:
            sink.write(group.window.rows, group.window.cols, outcome.data)

    return write


PROBE_SIZE = 16


def _probe_group(grid: TileGrid) -> _Group:
    """A small window at the image's top-left corner, to learn the output's bands and dtype."""
    size = [min(image, PROBE_SIZE) for image in grid.image_shape]
    window = TileGrid(grid.image_shape, size, grid.overlap).window(0, 0)
    return _Group.of([Window(window.index, window.rows, window.cols, window.read_rows,
                             window.read_cols, window.overlap, grid.shape, grid.image_shape)])


def _create_output(runner: _Runner, plan: _Plan, out: Any,
                   shared: bool) -> tuple[ImageSink, Iterable[_Group]]:
    """Learn the output's bands and dtype from func, then create the output.

    func first runs on a small window; if that fails (a func may need whole blocks), the first
    group that succeeds is used instead and written by the client.
    """
    grid = plan.grid
    probed = _run_alone(runner, _probe_group(grid), probing=True)
    written = None
    if probed is None:
        for group in _groups(grid, plan.blocks_per_task):
            probed = _run_alone(runner, group, probing=False)
            if probed is not None:
                written = group
                break
        else:
            runner.raise_failures(None)
    shape = tuple(probed.shape[:-2]) + grid.image_shape
    sink = _new_sink(out, shape, probed.dtype, shared, grid, runner.job.georeference)
    if isinstance(sink, raster_io.RawFileSink) and out is None:
        runner.shared_paths.append(sink.path)
    groups = _groups(grid, plan.blocks_per_task)
    if written is None:
        return sink, groups
    sink.write(written.window.rows, written.window.cols, probed)
    done = written.window.index
    return sink, (group for group in groups if group.window.index > done)


def _run_alone(runner: _Runner, group: _Group, probing: bool) -> np.ndarray | None:
    """Run one group, returning its output (None if a block failed).

    A probe neither counts as progress nor as a failure.
    """
    outcomes: list[_Outcome] = []
    failures_before = list(runner.failures)
    policy = runner.on_error
    runner.on_error = "probe" if probing else policy  # probe: record failures, say nothing
    try:
        runner.run([group], None, lambda done, outcome: outcomes.append(outcome),
                   counted=not probing)
    finally:
        runner.on_error = policy
    failed = len(runner.failures) > len(failures_before)
    if probing:
        if failed:
            logger.debug("func failed on a probe window: %s", runner.failures[-1][1])
        runner.failures[:] = failures_before
    if failed or not outcomes:
        return None
    return outcomes[0].data


def _new_sink(out: Any, shape: tuple[int, ...], dtype: np.dtype, shared: bool,
              grid: TileGrid, georeference: Georeference | None) -> ImageSink:
    if out is not None:
        return raster_io.create_sink(out, shape, dtype, grid.block, georeference)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if shared and raster_io.shared_memory_free() > nbytes:
        return raster_io.create_shared_output(shape, dtype)
    return raster_io.ArraySink(np.zeros(shape, dtype))


def _result_of(sink: ImageSink, out: Any, user_array: np.ndarray | None) -> Any:
    if user_array is not None:
        if isinstance(sink, raster_io.RawFileSink):
            user_array[...] = raster_io.map_shared_output(sink)
        return user_array
    if out is not None:
        return out
    if isinstance(sink, raster_io.RawFileSink):
        return raster_io.map_shared_output(sink)
    return sink.array


def reduce_blocks(executor: Any, func: Callable[..., Any], *inputs: Any,
                  combine: Callable[[Any, Any], Any], initial: Any = None,
                  block: int | tuple[int, int] = (512, 512), overlap: int | tuple[int, int] = 0,
                  boundary: str | float | None = "edge", otherargs: Any = None,
                  progress: bool | Callable[[int, int], None] = False, fill_value: float = 0,
                  on_error: str = "raise", max_in_flight: int | None = None,
                  blocks_per_task: int | tuple[int, int] | None = None,
                  shared_memory: bool | None = None) -> Any:
    """Compute a statistic per block in the workers and combine the partials.

    Parameters
    ----------
    executor : HPCExecutor
        Any futures_hpc executor.
    func : callable
        ``func(*blocks, [info=BlockInfo], [otherargs=...])`` returns a picklable partial
        result for its block. With ``overlap`` > 0 the blocks carry their margin: index them
        with ``info.core`` to leave it out.
    *inputs : array, numpy.memmap, zarr array, or path
        As in :func:`map_blocks`.
    combine : callable
        ``combine(accumulated, partial)`` returns the new accumulated value. It runs in the
        workers (over a task's blocks) and on the client (over tasks), in the order blocks
        finish, so it must not depend on order (sums, histograms, min/max).
    initial : object, optional
        The starting value; by default the first partial.
    block, overlap, boundary, fill_value : optional
        As in :func:`map_blocks`.
    otherargs, progress, on_error, max_in_flight, blocks_per_task, shared_memory : optional
        As in :func:`map_blocks`.

    Returns
    -------
    object
        The combined value.
    """
    if not callable(combine):
        raise OptionError("combine must be callable: combine(accumulated, partial)")
    plan = _plan(func, inputs, block, overlap, boundary, fill_value, otherargs, on_error,
                 max_in_flight, blocks_per_task)
    shared = _decide_shared_memory(executor, shared_memory,
                                   _shared_bytes_needed(plan.sources, 0))
    runner = _start(executor, plan, func, shared, on_error, max_in_flight, progress, otherargs,
                    None, combine=combine)
    accumulated = [initial, initial is not None]

    def accumulate(group: _Group, outcome: _Outcome) -> None:
        if not outcome.has_partial:
            return
        if accumulated[1]:
            accumulated[0] = combine(accumulated[0], outcome.partial)
        else:
            accumulated[:] = [outcome.partial, True]

    with runner:
        runner.run(_groups(plan.grid, plan.blocks_per_task), None, accumulate)
    runner.raise_failures(accumulated[0])
    return accumulated[0]
