"""Checking a run's arguments before any work, and grouping blocks into tasks."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from futures_hpc.errors import OptionError
from futures_hpc.tiles.arrays import ImageSink, ImageSource, ZarrSink, ZarrSource, image_shape_of
from futures_hpc.tiles.formats import open_source, output_format
from futures_hpc.tiles.grid import TileGrid, _Group, _pair
from futures_hpc.tiles.runner import _Progress, _Runner, _stage_inputs
from futures_hpc.tiles.worker import _BlockJob

logger = logging.getLogger("futures_hpc")

PADDING_MODES = ("edge", "reflect", "symmetric", "constant")
ERROR_POLICIES = ("raise", "continue")


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
    sources = [open_source(obj, position) for position, obj in enumerate(inputs)]
    for source in sources:
        if len(source.shape) not in (2, 3):
            raise OptionError(f"{source.name} has shape {source.shape}; images are 2-D "
                              f"(rows, cols) or 3-D (bands, rows, cols)")
    image_shapes = {image_shape_of(source.shape) for source in sources}
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
            output_format(out)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
    if sink is None:
        return
    if len(sink.shape) not in (2, 3) or image_shape_of(sink.shape) != image_shape:
        raise OptionError(f"out has shape {sink.shape}; its image (last two axes) must be the "
                          f"inputs' {image_shape}")
    if isinstance(sink, ZarrSink) and sink.worker_writable:
        misaligned = sink.misaligned_axes(block)
        if misaligned:
            raise OptionError(
                f"block {block} is not a multiple of out's zarr chunks {tuple(sink.array.chunks)} "
                f"along {' and '.join(misaligned)}: workers writing the same chunk would lose "
                f"each other's pixels; pass a block that is a multiple of the chunks")


def check_creation_options(options: Any, out: Any) -> None:
    """``creation_options``: None, or a dict of rasterio creation options for a GeoTIFF ``out``.

    GDAL only warns about an option it does not know, and writes without it: a misspelt
    ``compress`` would silently give an uncompressed file, so its value is checked here.
    """
    if options is None:
        return
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise OptionError(f"creation_options={options!r} is not allowed; it must be a dict of "
                          "rasterio creation options, such as {'compress': 'deflate'}")
    if options and not (isinstance(out, (str, os.PathLike))
                        and output_format(out) == "geotiff"):
        raise OptionError(f"creation_options={options!r} is not allowed with out={out!r}; "
                          "they are for a GeoTIFF path given as out (.tif, .tiff)")
    compress = next((value for key, value in options.items() if key.lower() == "compress"),
                    None)
    if compress is not None:
        from rasterio.enums import Compression

        known = sorted(member.value.lower() for member in Compression)
        if str(compress).lower() not in known:
            raise OptionError(f"creation_options compress={compress!r} is not allowed; "
                              f"GDAL's GeoTIFF compressions are {', '.join(known)}")


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
    chunks = [image_shape_of(tuple(source.array.chunks)) for source in sources
              if isinstance(source, ZarrSource)]
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

    A group's inputs fit a share of a worker thread's memory and there are still four tasks
    per thread (so the hand-out can balance). Among such shapes, the one that cuts the grid
    into the fewest groups wins, which is the most even cut: on a 12 x 12 grid with at most
    18 blocks per task, 3 x 6 gives 8 groups of 18 blocks where 2 x 9 gives 6 of 18 and 6 of
    6, and the workers then wait for the large ones at the end. Ties go to the shape that
    decodes the fewest neighbouring chunks for its margin, then to the smaller group, then to
    the wider one.
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
            groups = -(-grid.shape[0] // rows) * -(-grid.shape[1] // cols)
            key = (-groups, -_read_amplification(grid, (rows, cols), chunk), -count, cols)
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
           combine: Callable[[Any, Any], Any] | None, resume: Any = None) -> _Runner:
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
        stops_at_first_error=on_error == "raise",
        store=None if resume is None else resume.spec)
    if plan.blocks_per_task is None:
        plan.blocks_per_task = _choose_blocks_per_task(plan.grid, plan.sources, executor)
    logger.info("%s: %d blocks of %s in tasks of %s blocks, overlap %s, boundary %r%s",
                runner.func_name, len(plan.grid), plan.grid.block, plan.blocks_per_task,
                plan.grid.overlap, plan.padding.boundary,
                ", through shared memory" if shared else "")
    return runner


