"""Resuming block jobs: which blocks an earlier run finished, so that a rerun computes the rest.

With a store (``map_blocks(..., store=PATH)``, or the executor's own ``store=``), the worker that
finishes a block records it there, after the block's output window is written and flushed
(:meth:`~futures_hpc.tiles.worker._BlockJob.run`); for ``reduce_blocks`` the record holds the
block's partial result. A record is keyed by

- the *job key*: a digest of everything that decides the output, so that another job never
  reuses a block: the function (:func:`~futures_hpc.store.identity.function_identity`: its
  pickled code and captured values), each input (its path with the file's size and
  modification time, or its pixels when it lives in memory), the output (its path or file),
  the image, block and margin sizes, the boundary and fill value, the output's dtype, and
  ``otherargs``;
- the *block key*: the block's ``(row, col)`` in the job's grid
  (:func:`~futures_hpc.tiles.worker.block_key`).

A rerun reads which blocks of its job are recorded, opens the outputs of the earlier run for
update instead of creating them (:func:`~futures_hpc.tiles.formats.reopen_sink`), and submits
only the other blocks; ``reduce_blocks`` combines the recorded partials with the new ones.
Outputs held in the client's memory (``out=None`` or a numpy array) do not outlive the run, so
``map_blocks`` into them neither records nor skips anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np

from futures_hpc.store import MISSING, ResultStore, function_identity
from futures_hpc.tiles.arrays import (
    ArraySource,
    ImageSink,
    ImageSource,
    RawFileSink,
    RawFileSource,
    ZarrSink,
    ZarrSource,
    _is_memory_store,
    _zarr_root,
)
from futures_hpc.tiles.geotiff import GeoTiffSink
from futures_hpc.tiles.grid import TileGrid, _Group
from futures_hpc.tiles.raster import RasterioSource
from futures_hpc.tiles.worker import _BlockStore, block_key

logger = logging.getLogger("futures_hpc")

#: Changes whenever what a job key covers changes, so that old records are not misread.
JOB_KEY_VERSION = b"futures_hpc.tiles job 1"

#: Bytes hashed at a time when an input's pixels are part of its identity.
HASH_CHUNK_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------
# what identifies a job
# --------------------------------------------------------------------------------------------


def _file_facts(path: str) -> tuple[Any, ...]:
    """A file's path, size and modification time (or, for a directory, of every file in it)."""
    if "://" in path:
        return ("url", path)
    facts = os.stat(path)
    if not os.path.isdir(path):
        return ("file", os.path.realpath(path), facts.st_size, facts.st_mtime_ns)
    entries = []
    for directory, subdirectories, names in os.walk(path):
        subdirectories.sort()
        for name in sorted(names):
            full = os.path.join(directory, name)
            stat = os.stat(full)
            entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
    return ("directory", os.path.realpath(path), tuple(entries))


def _pixels_digest(array: Any) -> str:
    """A digest of an in-memory image's pixels, shape and dtype."""
    image = np.asarray(array)
    digest = hashlib.blake2b(repr((image.shape, image.dtype.str)).encode(), digest_size=16)
    flat = np.ascontiguousarray(image).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, HASH_CHUNK_BYTES):
        digest.update(flat[start:start + HASH_CHUNK_BYTES].data)
    return digest.hexdigest()


def source_identity(source: ImageSource) -> tuple[Any, ...]:
    """What identifies an input: where it is and its file's size and time, or its pixels."""
    shape = (tuple(source.shape), np.dtype(source.dtype).str)
    if isinstance(source, RawFileSource):
        return ("raw", source.offset, shape, _file_facts(source.path))
    if isinstance(source, RasterioSource):
        return ("raster", shape, _file_facts(source.path))
    if isinstance(source, ZarrSource):
        root = _zarr_root(source.array)
        if root is not None:
            return ("zarr", getattr(source.array, "path", ""), shape, _file_facts(root))
        if _is_memory_store(source.array.store):
            return ("pixels", _pixels_digest(source.array[...]))
        return ("zarr-store", shape, repr(source.array.store), getattr(source.array, "path", ""))
    if isinstance(source, ArraySource):
        return ("pixels", _pixels_digest(source.array))
    # a source of the user's own: its pickle names it
    return ("pickled", hashlib.blake2b(cloudpickle.dumps(source), digest_size=16).hexdigest())


def output_identity(out: Any, sink: ImageSink | None) -> tuple[Any, ...] | None:
    """What identifies an output that outlives the run, or None for one in memory."""
    if isinstance(out, (str, os.PathLike)):
        return ("path", os.path.realpath(os.fspath(out)))
    if isinstance(sink, RawFileSink):
        return ("raw", os.path.realpath(sink.path), sink.offset, sink.shape, sink.dtype.str)
    if isinstance(sink, GeoTiffSink):
        return ("geotiff", os.path.realpath(sink.path), sink.shape, sink.dtype.str)
    if isinstance(sink, ZarrSink) and sink.worker_writable:
        root = _zarr_root(sink.array)
        where = root if root is None else os.path.realpath(root)
        return ("zarr", where, repr(sink.array.store) if root is None else "",
                getattr(sink.array, "path", ""), sink.shape, sink.dtype.str,
                tuple(sink.array.chunks))
    return None


def job_key(kind: str, func: Callable[..., Any], sources: Sequence[ImageSource],
            output: tuple[Any, ...] | None, grid: TileGrid, boundary: str | None,
            fill_value: float, dtype: Any, otherargs: Any) -> bytes:
    """The 16-byte key of a block job: everything that decides its blocks' outputs.

    Parameters
    ----------
    kind : {"map", "reduce"}
        Which function runs the job.
    func : callable
        The user's function.
    sources : sequence of ImageSource
        The inputs, as opened.
    output : tuple, optional
        :func:`output_identity` of the output (None for ``reduce_blocks``).
    grid : TileGrid
        The image, block and margin sizes.
    boundary, fill_value, dtype, otherargs
        As given to ``map_blocks``.

    Returns
    -------
    bytes

    """
    packed_function = cloudpickle.dumps(func)
    digest = hashlib.blake2b(JOB_KEY_VERSION, digest_size=16)
    digest.update(function_identity(func, packed_function))
    facts = (kind, grid.image_shape, grid.block, grid.overlap, boundary, repr(fill_value),
             None if dtype is None else np.dtype(dtype).str, output,
             tuple(source_identity(source) for source in sources))
    digest.update(repr(facts).encode())
    digest.update(cloudpickle.dumps(otherargs))
    return digest.digest()


# --------------------------------------------------------------------------------------------
# a job's records in a store
# --------------------------------------------------------------------------------------------


def _record_key(job: bytes, claim_key: bytes | None) -> bytes:
    """The key a job's blocks are recorded under: the job's, for one claim of its output."""
    if claim_key is None:
        return job
    return hashlib.blake2b(job, digest_size=16, key=claim_key).digest()


@dataclass
class BlockResume:
    """A resumable job's link to its store: the blocks recorded before, and where to record.

    Attributes
    ----------
    store : ResultStore
        The store (its index was read when it was opened).
    job_key : bytes
        The job's key (:func:`job_key`).
    owned : bool
        Whether this job opened the store (and closes it), rather than the executor.
    output_key : bytes, optional
        A digest of the output's identity (None for ``reduce_blocks``).
    record_key : bytes
        The key the job's blocks are recorded under: the job key itself for
        ``reduce_blocks``; for ``map_blocks``, the job key combined with the job's latest
        claim of its output, so that blocks written before another job (or a fresh run of
        this one) recreated the output are not taken as its content.
    recorded : dict
        ``(block_row, block_col)`` of each block recorded by an earlier run, to its
        recorded value (the ``reduce_blocks`` partial, or None).

    """

    store: ResultStore
    job_key: bytes
    owned: bool
    output_key: bytes | None = None
    record_key: bytes = b""
    recorded: dict[tuple[int, int], Any] = field(default_factory=dict)

    def read(self, grid: TileGrid) -> None:
        """Find the blocks recorded under :attr:`record_key` (those whose record is whole)."""
        self.recorded.clear()
        for row in range(grid.shape[0]):
            for col in range(grid.shape[1]):
                value = self.store.block(self.record_key, block_key((row, col)))
                if value is not MISSING:
                    self.recorded[(row, col)] = value

    @property
    def spec(self) -> _BlockStore:
        """What the workers need to record blocks of this job."""
        return _BlockStore(self.store.location, self.record_key)

    def claim_output(self) -> None:
        """Record that this job (re)creates its output: no block recorded before counts."""
        self.recorded.clear()
        self.record_key = _record_key(self.job_key,
                                      self.store.claim(self.output_key, self.job_key))

    def remaining(self, groups: Iterable[_Group]) -> Iterator[_Group]:
        """The groups with their recorded blocks left out.

        A group of which some blocks are recorded is cut into runs of neighbouring blocks
        along each block row, so that every task still reads one rectangle.
        """
        for group in groups:
            missing = [window for window in group.windows if window.index not in self.recorded]
            if len(missing) == len(group.windows):
                yield group
                continue
            run: list = []
            for window in missing:
                if run and (window.index[0] != run[-1].index[0]
                            or window.index[1] != run[-1].index[1] + 1):
                    yield _Group.of(run)
                    run = []
                run.append(window)
            if run:
                yield _Group.of(run)

    def close(self) -> None:
        """Close the store if this job opened it."""
        if self.owned:
            self.store.close()


def open_resume(executor: Any, store: Any, kind: str, func: Callable[..., Any],
                sources: Sequence[ImageSource], output: tuple[Any, ...] | None,
                grid: TileGrid, boundary: str | None, fill_value: float, dtype: Any,
                otherargs: Any) -> BlockResume | None:
    """The job's :class:`BlockResume`, or None when it records nothing.

    For ``map_blocks`` the blocks recorded count only if the latest claim of the output
    (:meth:`~futures_hpc.store.results.ResultStore.claim`) is this job's; otherwise the job
    claims the output now, and every block is computed.

    Parameters
    ----------
    executor : HPCExecutor
        Its ``store`` is used when ``store`` is None.
    store : None, False, str, os.PathLike or ResultStore
        ``map_blocks``'s ``store=``: None for the executor's, False for none, or a path/URL.
    kind, func, sources, output, grid, boundary, fill_value, dtype, otherargs
        As :func:`job_key` takes them.

    """
    if store is False or (kind == "map" and output is None):
        return None
    owned = False
    if store is None:
        store = getattr(executor, "store", None)
        if store is None:
            return None
    elif not isinstance(store, ResultStore):
        run_name = getattr(executor, "run_name", None) or "tiles"
        store, owned = ResultStore(store, run_name), True
    try:
        job = job_key(kind, func, sources, output, grid, boundary, fill_value, dtype, otherargs)
        resume = BlockResume(store, job, owned, record_key=job)
        if output is not None:
            resume.output_key = hashlib.blake2b(repr(output).encode(), digest_size=16).digest()
            claims = store.claims(resume.output_key)
            if not claims or claims[-1][2] != job:
                resume.claim_output()
                return resume
            resume.record_key = _record_key(job, claims[-1][1])
        resume.read(grid)
    except BaseException:
        if owned:
            store.close()
        raise
    if resume.recorded:
        logger.info("%d of %d blocks are recorded in the store %s: not computed again",
                    len(resume.recorded), len(grid), store.location)
    return resume
