"""The shape of a resource pool: the checked options of ``ex.with_resources(...)``.

What each worker of a pool has (cores, memory, GPUs, walltime, queue...); the pools themselves
are in :mod:`futures_hpc.pools`, the rungs of a memory ladder in :mod:`futures_hpc.memory_ladder`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .options import (
    check_whole_number,
    format_walltime,
    parse_resources,
    parse_walltime,
    unknown_option_error,
)

#: The options of ``with_resources``.
SHAPE_OPTIONS = ("cores", "memory", "gpus", "walltime", "queue", "job_extra", "max_workers",
                 "call_time")


@dataclass(frozen=True)
class PoolShape:
    """What each worker of a pool has: checked ``with_resources`` options.

    Attributes
    ----------
    cores : int
        Cores of each worker (a batch job's CPUs; a local worker's threads).
    memory : str or None
        Memory of each worker as given; ``memory_bytes`` holds the amount.
    gpus : int
        GPUs of each worker (0: none).
    walltime : str or None
        ``HH:MM:SS`` of each batch job; ``walltime_seconds`` holds the seconds.
    queue : str or None
        The batch queue (partition) of the pool's jobs.
    job_extra : tuple of str
        More scheduler directives for the pool's jobs.
    max_workers : int or None
        The most workers of the pool (default: the executor's ``max_workers``).
    call_time : str or None
        ``HH:MM:SS`` each call needs; ``call_time_seconds`` holds the seconds. No call starts
        on a job with less time left.
    memory_ladder : bool
        A rung of a memory ladder (``memory=[...]``, :mod:`futures_hpc.memory_ladder`): its
        calls killed for memory move to the next rung. A pool of its own, apart from a pool of
        the same shape without a ladder.

    """

    cores: int = 1
    # The amounts say which pool a shape is (``"1GB"`` and ``10**9`` are one pool), not the text.
    memory: str | None = field(default=None, compare=False)
    memory_bytes: int | None = None
    gpus: int = 0
    walltime: str | None = field(default=None, compare=False)
    walltime_seconds: int | None = None
    queue: str | None = None
    job_extra: tuple[str, ...] = ()
    max_workers: int | None = None
    call_time: str | None = None
    call_time_seconds: int | None = None
    memory_ladder: bool = False

    def describe(self) -> str:
        """``cores=2 memory=8GB ...``: the options that were given."""
        parts = [f"cores={self.cores}"]
        for name in ("memory", "gpus", "walltime", "call_time", "queue", "max_workers"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        if self.job_extra:
            parts.append(f"job_extra={list(self.job_extra)}")
        if self.memory_ladder:
            parts.append("(a memory ladder's rung)")
        return " ".join(parts)


def parse_shape(options: Mapping[str, Any]) -> PoolShape:
    """Check the options of ``with_resources``; raise :class:`OptionError` naming a bad one."""
    for name in options:
        if name not in SHAPE_OPTIONS:
            raise unknown_option_error(name, options[name], SHAPE_OPTIONS, "with_resources")
    given = {name: value for name, value in options.items() if value is not None}
    common = parse_resources({name: given[name] for name in
                              ("cores", "memory", "walltime", "queue", "job_extra")
                              if name in given})
    gpus = check_whole_number("gpus", given.get("gpus", 0), 0)
    max_workers = given.get("max_workers")
    call_time = None
    if "call_time" in given:
        call_time = parse_walltime(given["call_time"], "call_time")
    return PoolShape(
        cores=common.cores or 1,
        memory=common.memory,
        memory_bytes=common.memory_bytes,
        gpus=gpus,
        walltime=common.walltime,
        walltime_seconds=common.walltime_seconds,
        queue=common.queue,
        job_extra=tuple(common.job_extra),
        max_workers=None if max_workers is None else check_whole_number(
            "max_workers", max_workers, 1),
        call_time=None if call_time is None else format_walltime(call_time),
        call_time_seconds=call_time,
    )
