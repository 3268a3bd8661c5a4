"""The public functions: :func:`map_blocks` produces an image, :func:`reduce_blocks` a statistic."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from futures_hpc.errors import OptionError
from futures_hpc.tiles.arrays import ArraySink, Georeference, ImageSink, RawFileSink, image_shape_of
from futures_hpc.tiles.formats import create_sink, existing_sink, reopen_sink
from futures_hpc.tiles.geotiff import GeoTiffSink, TileAppender
from futures_hpc.tiles.grid import TileGrid, Window, _Group
from futures_hpc.tiles.held_tiles import HeldTiles
from futures_hpc.tiles.plan import (
    _check_out,
    _groups,
    _Plan,
    _plan,
    _start,
    check_creation_options,
)
from futures_hpc.tiles.resume import BlockResume, open_resume, output_identity
from futures_hpc.tiles.runner import _Runner
from futures_hpc.tiles.shared_memory import (
    _decide_shared_memory,
    _output_bytes,
    _shared_bytes_needed,
    create_shared_output,
    map_shared_output,
    shared_memory_free,
)
from futures_hpc.tiles.worker import _BlockStore, _Outcome, _write_held_tiles

logger = logging.getLogger("futures_hpc")

def map_blocks(executor: Any, func: Callable[..., Any], *inputs: Any,
               block: int | tuple[int, int] = (512, 512), overlap: int | tuple[int, int] = 0,
               boundary: str | float | None = "edge", out: Any = None, dtype: Any = None,
               otherargs: Any = None, progress: bool | Callable[[int, int], None] = False,
               fill_value: float = 0, on_error: str = "raise",
               max_in_flight: int | None = None,
               blocks_per_task: int | tuple[int, int] | None = None,
               shared_memory: bool | None = None, store: Any = None,
               creation_options: dict[str, Any] | None = None) -> Any:
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
    store : str, os.PathLike or bool, optional
        Where finished blocks are recorded, so that a rerun of the same job computes only the
        blocks an interrupted run left (see docs/resume-blocks.md): a store directory or
        ``fsspec`` URL; None (default) uses the executor's ``store=``, if it has one; False
        records nothing. Only an ``out`` that outlives the run (a file, a memmap, a zarr array
        on disk) is resumed; an output path is then reopened for update, not created again.
    creation_options : dict, optional
        For a GeoTIFF ``out`` path: rasterio creation options over the defaults (tiled
        256 x 256, uncompressed), e.g. ``{"compress": "deflate", "nodata": -1}``. Deflate
        without predictor is compressed by the workers; see docs/tiles.md.

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
    sink = existing_sink(out)
    _check_out(out, sink, plan.grid.image_shape, plan.grid.block)
    check_creation_options(creation_options, out)
    output = output_identity(out, sink)
    if output is not None and creation_options:
        output = (*output, repr(sorted(creation_options.items())))
    resume = open_resume(executor, store, "map", func, plan.sources, output, plan.grid,
                         plan.padding.boundary, plan.padding.fill_value, dtype, otherargs)
    try:
        if resume is not None and sink is None:
            sink = _reopen_output(out, plan, dtype, resume, creation_options)
        shared = _decide_shared_memory(
            executor, shared_memory,
            _shared_bytes_needed(plan.sources, _output_bytes(sink, out, plan.grid)))
        runner = _start(executor, plan, func, shared, on_error, max_in_flight, progress,
                        otherargs, dtype, combine=None, resume=resume)
        with runner:
            return _map_all(runner, plan, sink, out, shared, resume, creation_options)
    finally:
        if resume is not None:
            resume.close()


def _reopen_output(out: Any, plan: _Plan, dtype: Any, resume: BlockResume,
                   creation_options: dict[str, Any] | None) -> ImageSink | None:
    """The output an interrupted run of this job left, opened for update; else None.

    None (and every block computed again) when nothing is recorded, or when the file is
    missing, torn or of another image shape or dtype: the output is then created afresh.
    """
    if not resume.recorded:  # nothing to keep: the output is made afresh
        return None
    try:
        sink = reopen_sink(out, creation_options)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is made again
        logger.warning("out=%s cannot be reopened (%s: %s): computing every block again",
                       out, type(exc).__name__, exc)
        resume.claim_output()
        return None
    if image_shape_of(sink.shape) != plan.grid.image_shape or (
            dtype is not None and sink.dtype != np.dtype(dtype)):
        logger.warning("out=%s has shape %s and dtype %s, not this job's: computing every "
                       "block again", out, sink.shape, sink.dtype)
        resume.claim_output()
        return None
    return sink


def _map_all(runner: _Runner, plan: _Plan, sink: ImageSink | None, out: Any,
             shared: bool, resume: BlockResume | None,
             creation_options: dict[str, Any] | None) -> Any:
    user_array = sink.array if isinstance(sink, ArraySink) else None
    if user_array is not None and shared and shared_memory_free() > user_array.nbytes:
        sink = create_shared_output(sink.shape, sink.dtype)
        runner.shared_paths.append(sink.path)
    groups: Iterable[_Group] = _groups(plan.grid, plan.blocks_per_task)
    written = None
    if sink is None:
        sink, groups, written = _create_output(runner, plan, out, shared, creation_options)
    write = _ClientWriter(sink, runner, plan.grid)
    try:
        if written is not None:
            write(*written)
        if resume is not None and resume.recorded:
            write.resume(resume, plan.grid)
            runner.progress.advance(len(resume.recorded))
            groups = resume.remaining(groups)
        runner.run(groups, sink, write)
    except BaseException:
        write.close(complete=False)
        raise
    write.close()
    result = _result_of(sink, out, user_array)
    runner.raise_failures(result)
    return result


#: Compressed tiles the client may hold ahead of their turn, per task in flight.
HELD_TILES_PER_TASK = 64
#: The dask priority of a worker's write of its held tiles: before its next group.
HELD_WRITE_PRIORITY = 10
#: How often a wait for such a write checks that the worker holding the tiles is still there.
HELD_WRITE_CHECK_SECONDS = 2.0


class _HeldWrite:
    """A worker's write of the tiles it holds: a task bound to that worker.

    Bound strictly, because dask lets an idle worker steal a task that only prefers another
    one, and a thief would compute the group again. If the worker leaves before the write
    runs, the task goes to any worker, which computes the group again.

    Parameters
    ----------
    submit : callable
        ``submit(workers)`` submits the write, restricted to ``workers`` (None: any).
    worker : str
        The address of the worker holding the tiles.
    live_workers : callable
        Returns the addresses of the workers connected now.
    """

    def __init__(self, submit: Callable[[list[str] | None], Any], worker: str,
                 live_workers: Callable[[], set[str]]):
        self._submit = submit
        self._worker = worker
        self._live_workers = live_workers
        self.future = submit([worker])

    def done(self) -> bool:
        """Whether the write is over (written, or failed)."""
        return self.future.done()

    def result(self, timeout: float | None = None) -> list[bytes] | None:
        """Wait for the write: None once written, or the tiles' bytes for the client to write.

        Raises TimeoutError after ``timeout`` seconds, or the task's own exception.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = HELD_WRITE_CHECK_SECONDS
            if deadline is not None:
                step = min(step, max(0.0, deadline - time.monotonic()))
            try:
                return self.future.result(timeout=step)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if self._worker not in self._live_workers():
                    logger.info("the worker %s left before writing its tiles: another one "
                                "computes them again", self._worker)
                    self.future.cancel()
                    self.future = self._submit(None)
                    self._worker = ""


class _ClientWriter:
    """Writes on the client what the workers could not, and records blocks once durable.

    For a compressed GeoTIFF it appends the tiles the workers compressed (a
    :class:`~futures_hpc.tiles.geotiff.TileAppender`), holding back the runner while too many
    wait for their turn.
    """

    def __init__(self, sink: ImageSink, runner: _Runner, grid: TileGrid):
        self.sink = sink
        self.runner = runner
        self.store: _BlockStore | None = runner.job.store
        self.appender = None
        self.groups: dict[tuple[int, int], _Group] = {}  # groups whose tiles workers hold
        if isinstance(sink, GeoTiffSink) and sink.encodes_tiles:
            if not sink.aligned_with(grid.block):
                sink.use_client_writes()  # blocks cut tiles: the client writes with rasterio
            else:
                sink.tiles_stay_on_workers = True
                self.appender = TileAppender(sink, grid.block, self._write_held)
                runner.backlog = lambda: self.appender.held > HELD_TILES_PER_TASK * max(
                    1, runner.in_flight_limit())
                runner.on_group_failed = self.skip

    def _write_held(self, held: HeldTiles, placements: list[tuple[int, int, int]]
                    ) -> _HeldWrite:
        """Have the worker holding a group's tiles write them where the appender placed them."""
        group, client = self.groups[held.group], self.runner.executor.client

        def submit(workers: list[str] | None) -> Any:
            return client.submit(
                _write_held_tiles, self.runner.job_future, group, self.sink, placements,
                self.store is not None, workers=workers, pure=False,
                priority=HELD_WRITE_PRIORITY)

        return _HeldWrite(submit, held.worker,
                          lambda: set(client.scheduler_info(n_workers=-1)["workers"]))

    def resume(self, resume: BlockResume, grid: TileGrid) -> None:
        """Keep what the interrupted run wrote (a compressed GeoTIFF: its first blocks)."""
        if self.appender is None:
            return
        recorded = [grid.window(*index) for index in sorted(resume.recorded)]
        kept = {window.index for window in self.appender.resume(recorded)}
        for index in [index for index in resume.recorded if index not in kept]:
            del resume.recorded[index]

    def skip(self, group: _Group) -> None:
        """A task failed: its tiles stay empty."""
        self.appender.add(group.window.rows, group.window.cols, None, [])

    def __call__(self, group: _Group, outcome: _Outcome) -> None:
        failed = {window.index for window, _ in outcome.failures}
        done = [window for window in group.windows if window.index not in failed]
        if self.appender is not None:
            if isinstance(outcome.data, HeldTiles):
                self.groups[group.window.index] = group
            durable = self.appender.add(group.window.rows, group.window.cols, outcome.data,
                                        done, sync=self.store is not None)
            if self.store is not None and durable:
                self.store.record(durable)
            return
        if outcome.data is not None:
            self.sink.write(group.window.rows, group.window.cols, outcome.data)
            if self.store is not None:
                self.sink.sync()
                self.store.record(done)

    def close(self, complete: bool = True) -> None:
        """Write what the appender still holds, close it, record what became durable."""
        if self.appender is not None:
            durable = self.appender.close(complete, sync=self.store is not None)
            if self.store is not None and durable:
                self.store.record(durable)


PROBE_SIZE = 16


def _probe_group(grid: TileGrid) -> _Group:
    """A small window at the image's top-left corner, to learn the output's bands and dtype."""
    size = [min(image, PROBE_SIZE) for image in grid.image_shape]
    window = TileGrid(grid.image_shape, size, grid.overlap).window(0, 0)
    return _Group.of([Window(window.index, window.rows, window.cols, window.read_rows,
                             window.read_cols, window.overlap, grid.shape, grid.image_shape)])


def _create_output(runner: _Runner, plan: _Plan, out: Any, shared: bool,
                   creation_options: dict[str, Any] | None,
                   ) -> tuple[ImageSink, Iterable[_Group], tuple[_Group, _Outcome] | None]:
    """Learn the output's bands and dtype from func, then create the output.

    func first runs on a small window; if that fails (a func may need whole blocks), the first
    group that succeeds is used instead, to be written by the client (returned with its
    outcome).
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
    sink = _new_sink(out, shape, probed.dtype, shared, grid, runner.job.georeference,
                     creation_options)
    if isinstance(sink, RawFileSink) and out is None:
        runner.shared_paths.append(sink.path)
    groups = _groups(grid, plan.blocks_per_task)
    if written is None:
        return sink, groups, None
    done = written.window.index
    return (sink, (group for group in groups if group.window.index > done),
            (written, _Outcome(probed)))


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
              grid: TileGrid, georeference: Georeference | None,
              creation_options: dict[str, Any] | None = None) -> ImageSink:
    if out is not None:
        return create_sink(out, shape, dtype, grid.block, georeference, creation_options)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if shared and shared_memory_free() > nbytes:
        return create_shared_output(shape, dtype)
    return ArraySink(np.zeros(shape, dtype))


def _result_of(sink: ImageSink, out: Any, user_array: np.ndarray | None) -> Any:
    if user_array is not None:
        if isinstance(sink, RawFileSink):
            user_array[...] = map_shared_output(sink)
        return user_array
    if out is not None:
        return out
    if isinstance(sink, RawFileSink):
        return map_shared_output(sink)
    return sink.array


def reduce_blocks(executor: Any, func: Callable[..., Any], *inputs: Any,
                  combine: Callable[[Any, Any], Any], initial: Any = None,
                  block: int | tuple[int, int] = (512, 512), overlap: int | tuple[int, int] = 0,
                  boundary: str | float | None = "edge", otherargs: Any = None,
                  progress: bool | Callable[[int, int], None] = False, fill_value: float = 0,
                  on_error: str = "raise", max_in_flight: int | None = None,
                  blocks_per_task: int | tuple[int, int] | None = None,
                  shared_memory: bool | None = None, store: Any = None) -> Any:
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
    store : str, os.PathLike or bool, optional
        As in :func:`map_blocks`: each block's partial is recorded there, and a rerun
        combines the recorded partials with those of the blocks it computes.

    Returns
    -------
    object
        The combined value.
    """
    if not callable(combine):
        raise OptionError("combine must be callable: combine(accumulated, partial)")
    plan = _plan(func, inputs, block, overlap, boundary, fill_value, otherargs, on_error,
                 max_in_flight, blocks_per_task)
    resume = open_resume(executor, store, "reduce", func, plan.sources, None, plan.grid,
                         plan.padding.boundary, plan.padding.fill_value, None, otherargs)
    try:
        return _reduce_all(executor, plan, func, combine, initial, shared_memory, on_error,
                           max_in_flight, progress, otherargs, resume)
    finally:
        if resume is not None:
            resume.close()


def _reduce_all(executor: Any, plan: _Plan, func: Callable[..., Any],
                combine: Callable[[Any, Any], Any], initial: Any, shared_memory: bool | None,
                on_error: str, max_in_flight: int | None, progress: Any, otherargs: Any,
                resume: BlockResume | None) -> Any:
    shared = _decide_shared_memory(executor, shared_memory,
                                   _shared_bytes_needed(plan.sources, 0))
    runner = _start(executor, plan, func, shared, on_error, max_in_flight, progress, otherargs,
                    None, combine=combine, resume=resume)
    accumulated = [initial, initial is not None]

    def add(partial: Any) -> None:
        if accumulated[1]:
            accumulated[0] = combine(accumulated[0], partial)
        else:
            accumulated[:] = [partial, True]

    def accumulate(group: _Group, outcome: _Outcome) -> None:
        if outcome.has_partial:
            add(outcome.partial)

    groups: Iterable[_Group] = _groups(plan.grid, plan.blocks_per_task)
    if resume is not None and resume.recorded:
        for partial in resume.recorded.values():
            add(partial)
        runner.progress.advance(len(resume.recorded))
        groups = resume.remaining(groups)
    with runner:
        runner.run(groups, None, accumulate)
    runner.raise_failures(accumulated[0])
    return accumulated[0]
