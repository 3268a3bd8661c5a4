"""Compressed tiles kept by the worker that made them, until the client says where they go.

A compressed GeoTIFF's tiles are appended in a fixed order, so a tile's offset is known only
once the sizes of the tiles before it are. Sending the tiles to the client, the only writer,
costs what the file weighs twice over the network (about 2 ms of client CPU per MB over TLS
here, mostly in ``SSLSocket.read``). Instead a worker keeps its group's tiles and returns only
their sizes (:class:`HeldTiles`); the client assigns the offsets and a second, small task on
the same worker writes the tiles there with ``pwrite`` (disjoint byte ranges, as the
uncompressed tiles are written). The client then lists them in the header, after the data.

A second task that lands on another worker (the first one left) recomputes the group: its
tiles are the same bytes, the encoding being deterministic.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distributed import get_worker

from futures_hpc.tiles.arrays import pwrite_all


@dataclass(frozen=True)
class HeldTiles:
    """A group's compressed tiles, held by a worker: who holds them, their indices and sizes.

    Attributes
    ----------
    token : str
        The run's job token.
    group : tuple of int
        The group's first block, ``(block_row, block_col)``: the key the tiles are held under.
    worker : str
        The address of the worker holding them.
    indices, sizes : list of int
        Each tile's index in the file's tile arrays and its size in bytes.
    """

    token: str
    group: tuple[int, int]
    worker: str
    indices: list[int]
    sizes: list[int]


_HELD: dict[tuple[str, tuple[int, int]], dict[int, bytes]] = {}
_HELD_LOCK = threading.Lock()


def hold(token: str, group: tuple[int, int], tiles: Any) -> HeldTiles | None:
    """Keep ``tiles`` (an ``EncodedTiles``) in this worker; None if not in a dask worker."""
    try:
        worker = get_worker().address
    except ValueError:
        return None
    with _HELD_LOCK:
        _HELD[(token, group)] = dict(zip(tiles.indices, tiles.payloads, strict=True))
    return HeldTiles(token, group, worker, list(tiles.indices),
                     [len(payload) for payload in tiles.payloads])


def take(token: str, group: tuple[int, int], indices: Sequence[int]) -> list[bytes] | None:
    """Remove and return the held tiles ``indices`` of ``group``; None if any is not here.

    A group's tiles may be placed in several steps (those whose turn has come first).
    """
    with _HELD_LOCK:
        held = _HELD.get((token, group))
        if held is None or any(index not in held for index in indices):
            return None
        payloads = [held.pop(index) for index in indices]
        if not held:
            del _HELD[(token, group)]
        return payloads


def forget(token: str) -> None:
    """Drop every tile held for the run ``token`` (the run is over, or failed)."""
    with _HELD_LOCK:
        for key in [key for key in _HELD if key[0] == token]:
            del _HELD[key]


def held_count() -> int:
    """How many groups' tiles this worker holds (for tests: ``client.run(held_count)``)."""
    with _HELD_LOCK:
        return len(_HELD)


def write_tiles(path: str, payloads: Sequence[bytes], offsets: Sequence[int],
                sync: bool) -> None:
    """``pwrite`` each payload at its offset of ``path``; ``fsync`` when ``sync``.

    Raises FileNotFoundError where the file is not visible.
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        for payload, offset in zip(payloads, offsets, strict=True):
            pwrite_all(fd, payload, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
