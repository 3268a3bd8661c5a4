"""The block grid: windows with their margins, and reading a block padded at the image edge."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from futures_hpc.errors import OptionError
from futures_hpc.tiles.arrays import ImageSource, image_shape_of

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
        self.image_shape = image_shape_of(tuple(shape))
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

def _received_shape(window: Window, boundary: str | None) -> tuple[int, int]:
    if boundary is None:
        return (window.read_rows.stop - window.read_rows.start,
                window.read_cols.stop - window.read_cols.start)
    return (len(window.padded_rows), len(window.padded_cols))
