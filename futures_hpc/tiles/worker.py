"""What runs on a worker: a task reads a group of neighbouring blocks and runs func on each.

The job (func, inputs, otherargs...) is broadcast once per run and unpickled at most once per
worker process; :func:`forget_job` drops it when the run is over.
"""

from __future__ import annotations

import logging
import pickle
import struct
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np

from futures_hpc.calls import with_remote_traceback
from futures_hpc.store.recorder import record_block
from futures_hpc.tiles import held_tiles
from futures_hpc.tiles.arrays import Georeference, ImageSink, ImageSource
from futures_hpc.tiles.grid import (
    BlockInfo,
    Window,
    _core_in_block,
    _Group,
    _received_shape,
    read_padded,
)

logger = logging.getLogger("futures_hpc")


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
    # each exception arrives on the client with its remote traceback as its __cause__
    failures: list[tuple[Window, BaseException]] = field(default_factory=list)


WINDOW_ATTRIBUTE = "futures_hpc_window"


def block_key(index: tuple[int, int]) -> bytes:
    """The 16-byte key of block ``(block_row, block_col)`` of a job's grid."""
    return struct.pack("<QQ", *index)


@dataclass(frozen=True)
class _BlockStore:
    """Where a resumable job records its finished blocks: a store and the job's key."""

    location: str
    job_key: bytes

    def record(self, windows: Sequence[Window], value: Any = None) -> None:
        """Record ``windows`` as done (their outputs are written and flushed), with ``value``.

        A value that cannot be pickled, or a store that cannot be written, leaves the blocks
        unrecorded: they are computed again by the next run, which is always correct.
        """
        for window in windows:
            try:
                record_block(self.location, self.job_key, block_key(window.index), value)
            except Exception as exc:  # noqa: BLE001 - recording is an optimisation
                logger.warning("%s not recorded in the store %s: %s: %s", window,
                               self.location, type(exc).__name__, exc)


@dataclass
class _BlockJob:
    """Everything constant across blocks; sent once to every worker that runs a group."""

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
    store: _BlockStore | None = None  # where finished blocks are recorded (resumable jobs)

    def regions(self, window: Window, data: Sequence[np.ndarray | None] | None) -> list:
        """Each input's pixels under a group's window and margin, clipped to the image.

        None for an input read block by block as the blocks run (``reads_each_block``).
        """
        given = data if data is not None else [None] * len(self.sources)
        return [region if region is not None
                else None if source.reads_each_block
                else source.read(window.read_rows, window.read_cols)
                for source, region in zip(self.sources, given, strict=True)]

    def blocks_of(self, regions: list, group: Window, window: Window) -> list[np.ndarray]:
        """``window``'s block of every input, padded at the image edge; read-only.

        Cut from the group's region, or read from the input itself if it has none.
        """
        blocks = []
        for source, region in zip(self.sources, regions, strict=True):
            block = read_padded(source if region is None else _RegionSource(region, group),
                                window, self.boundary, self.fill_value).view()
            block.flags.writeable = False
            blocks.append(block)
        return blocks

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
        try:  # the first block is read here: a file this worker cannot see is not a failure
            regions = self.regions(group.window, data)
            blocks = self.blocks_of(regions, group.window, group.windows[0])
        except FileNotFoundError as exc:
            return _NotVisible(f"cannot read an input here: {exc}")
        outcome = _Outcome()
        # positional writes, safe side by side (raw files, laid-out uncompressed GeoTIFFs):
        # write each block as it is done
        block_sink = sink if getattr(sink, "writes_each_block", False) else None
        placed: list[Window] = []  # blocks in outcome.data, written with the group
        for number, window in enumerate(group.windows):
            try:
                if number:
                    blocks = self.blocks_of(regions, group.window, window)
                result = self.call(blocks, window)
                if self.combine is None:
                    core = self.trim(result, window)
                    if block_sink is not None and _written(block_sink, window, core):
                        self._record([window], sink)
                        continue
                    block_sink = None
                    outcome.data = _place(outcome.data, core, group, window)
                    placed.append(window)
                else:
                    if self.store is not None:
                        self.store.record([window], result)
                    if outcome.has_partial:
                        outcome.partial = self.combine(outcome.partial, result)
                    else:
                        outcome.partial, outcome.has_partial = result, True
            except Exception as exc:
                if self.stops_at_first_error:
                    _label(exc, window)
                    raise
                outcome.failures.append((window, with_remote_traceback(exc)))
        if outcome.data is not None and getattr(sink, "encodes_tiles", False):
            # a compressed GeoTIFF: compress here, the client appends the tiles
            outcome.data = sink.encode(group.window.rows, group.window.cols, outcome.data)
        elif outcome.data is not None and sink is not None:
            try:
                sink.write(group.window.rows, group.window.cols, outcome.data)
                outcome.data = None
            except FileNotFoundError:
                pass  # the client writes it (and records its blocks)
            else:
                self._record(placed, sink)
        return outcome

    def _record(self, windows: list[Window], sink: ImageSink) -> None:
        """Record blocks whose output ``sink`` holds, once it is flushed (resumable jobs)."""
        if self.store is not None and windows:
            sink.sync()
            self.store.record(windows)


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
# Runs already over: a task of theirs still running (cancelled by a failure) must not put the
# job back in the cache once it has been dropped.
_FORGOTTEN_JOBS: deque[str] = deque(maxlen=64)


@dataclass(frozen=True)
class _SharedJob:
    """A pickled :class:`_BlockJob` with a token; unpickled at most once per process."""

    token: str
    payload: bytes

    @classmethod
    def of(cls, job: _BlockJob) -> _SharedJob:
        return cls(uuid.uuid4().hex, cloudpickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))

    def resolve(self) -> _BlockJob:
        _steady_allocator()
        with _UNPICKLED_JOBS_LOCK:
            job = _UNPICKLED_JOBS.get(self.token)
            if job is not None:
                _UNPICKLED_JOBS.move_to_end(self.token)
                return job
            job = pickle.loads(self.payload)
            if self.token not in _FORGOTTEN_JOBS:
                _UNPICKLED_JOBS[self.token] = job
                while len(_UNPICKLED_JOBS) > UNPICKLED_JOBS_KEPT:
                    _UNPICKLED_JOBS.popitem(last=False)
            return job


#: glibc ``mallopt`` parameters and the values a plain process settles on for large arrays.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STEADY_MMAP_THRESHOLD = 32 << 20
STEADY_TRIM_THRESHOLD = 64 << 20
_ALLOCATOR_SET: list[bool] = []


def _steady_allocator() -> None:
    """Let this worker reuse freed memory for block-sized arrays.

    distributed starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also turns off
    glibc's adaptive mmap threshold: every array over 128 KiB is then a fresh ``mmap`` whose
    pages fault in zeroed, and a windowed raster loop runs about 3 times slower (0.93 s against
    3.06 s for the NDVI benchmark's serial loop). Once per process, on glibc only, this sets the
    mmap threshold to 32 MiB (the ceiling of glibc's adaptive one) and the trim threshold to
    64 MiB. A plain process does not get there by itself on such a loop: its adaptive
    thresholds stop at about the largest array it has freed (a few MiB), its heap is trimmed
    after each window and faulted in again for the next, and the NDVI loop takes 0.28 s to
    0.40 s where it takes 0.23 s to 0.24 s with these thresholds (benchmarks/rios.py shows
    both).
    """
    if _ALLOCATOR_SET:
        return
    _ALLOCATOR_SET.append(True)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its allocator is left alone
        logger.debug("mallopt not available", exc_info=True)


async def forget_job(token: str) -> None:
    """Drop a finished run's job from this worker process.

    Run through ``client.run(forget_job, token, wait=False)``, which takes coroutine functions
    only: each worker runs it in the background, so the client waits for no worker.

    Parameters
    ----------
    token : str
        The token of the run's broadcast job.
    """
    with _UNPICKLED_JOBS_LOCK:
        _FORGOTTEN_JOBS.append(token)
        _UNPICKLED_JOBS.pop(token, None)
    held_tiles.forget(token)


def job_held_by_workers(shared: _SharedJob) -> _SharedJob:
    """The task whose result is a run's job: the workers fetch it from one another.

    Parameters
    ----------
    shared : _SharedJob
        The run's job, pickled once by the client.

    Returns
    -------
    _SharedJob
        The same job, now held by a worker.
    """
    return shared


def held_jobs() -> list[str]:
    """Return the tokens of the runs whose job this worker process holds, oldest first.

    For tests and debugging: ``ex.client.run(held_jobs)`` asks every worker.
    """
    with _UNPICKLED_JOBS_LOCK:
        return list(_UNPICKLED_JOBS)


def _run_group(shared: _SharedJob, group: _Group, sink: ImageSink | None,
               data: Sequence[np.ndarray | None] | None) -> _Outcome | _NotVisible:
    """The task: run one group of blocks on a worker (see :meth:`_BlockJob.run`).

    A compressed GeoTIFF's tiles stay here when the sink says so (``tiles_stay_on_workers``):
    the outcome then carries their sizes (:class:`~futures_hpc.tiles.held_tiles.HeldTiles`)
    and :func:`_write_held_tiles` writes them once the client has placed them.
    """
    outcome = shared.resolve().run(group, sink, data)
    if (isinstance(outcome, _Outcome) and outcome.data is not None
            and hasattr(outcome.data, "payloads")
            and getattr(sink, "tiles_stay_on_workers", False)):
        held = held_tiles.hold(shared.token, group.window.index, outcome.data)
        if held is not None:
            outcome.data = held
    return outcome


def _write_held_tiles(shared: _SharedJob, group: _Group, sink: ImageSink,
                      placements: Sequence[tuple[int, int, int]], sync: bool
                      ) -> list[bytes] | None:
    """The second task of a compressed group: write its placed tiles into the file.

    ``placements`` are ``(tile index, offset, size)``. The tiles are those this worker holds;
    where it holds none (the worker that made them left), the group is computed again. Returns
    None once written, or the tiles' bytes where the file is not visible here (the client
    writes them).
    """
    indices = [index for index, _, _ in placements]
    payloads = held_tiles.take(shared.token, group.window.index, indices)
    if payloads is None:
        outcome = shared.resolve().run(group, sink, None)
        tiles = getattr(outcome, "data", None)
        if not hasattr(tiles, "payloads"):
            reason = getattr(outcome, "reason", "its blocks failed")
            raise RuntimeError(f"{group}: its tiles could not be made again ({reason})")
        by_index = dict(zip(tiles.indices, tiles.payloads, strict=True))
        payloads = [by_index[index] for index in indices]
    for (index, _, size), payload in zip(placements, payloads, strict=True):
        if len(payload) != size:
            raise RuntimeError(f"{group}: tile {index} was {size} bytes when placed and is "
                               f"{len(payload)} bytes now: the encoding is not deterministic")
    try:
        held_tiles.write_tiles(sink.path, payloads, [offset for _, offset, _ in placements],
                               sync)
    except FileNotFoundError:
        return payloads
    return None


