"""Nannies that share one process check their workers less often as the process hosts more.

The local backend's nannies all live in the client's process (distributed's
:class:`~distributed.LocalCluster`), one per worker. Each nanny checks its worker's memory every
100 ms (``distributed.worker.memory.monitor-interval``), and futures_hpc's out-of-memory watch
(:mod:`futures_hpc.oom_watch`) looks at the worker's process every 100 ms too: with 64 local
workers, 1,280 checks a second in the client's process. Up to :data:`FULL_RATE_NANNIES` nannies
in one process check at the full rate; beyond, each checks proportionally less often, so that
the process spends on them what :data:`FULL_RATE_NANNIES` cost (measured with 64 idle local
workers: the client's process 16.8 % of a core before, 6.2 % after, together with dropping the
hosted nannies' duplicate system monitors; 2 workers are unchanged).

A memory check further apart lets a worker's memory overshoot its limit for longer before its
nanny ends it (0.8 s rather than 0.1 s with 64 workers); each worker still checks its own memory
every 100 ms to spill and to pause, and a batch job's nanny, alone in its process, keeps the
full rate.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

#: Nannies of one process that check at the full rate; beyond, each checks less often.
FULL_RATE_NANNIES = 8


def spread_interval(seconds: float, hosted: int) -> float:
    """The interval of a check that runs every ``seconds`` for each of ``hosted`` nannies.

    Parameters
    ----------
    seconds : float
        The interval at the full rate.
    hosted : int
        Nannies (or watches) of this kind in this process.

    Returns
    -------
    float
        ``seconds`` for up to :data:`FULL_RATE_NANNIES`, proportionally more beyond.

    """
    return seconds * max(1.0, hosted / FULL_RATE_NANNIES)


class HostedSet:
    """The live members of one kind in this process, told their number as it changes.

    Parameters
    ----------
    rescale : callable
        ``rescale(member, hosted)``: called for every member each time one joins or leaves,
        with the number of members then.

    """

    def __init__(self, rescale: Callable[[Any, int], None]) -> None:
        self._members: weakref.WeakSet[Any] = weakref.WeakSet()
        self._rescale = rescale
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: Any) -> None:
        """``member`` joins; every member is rescaled."""
        with self._lock:
            self._members.add(member)
            members = list(self._members)
        self._tell(members)

    def discard(self, member: Any) -> None:
        """``member`` leaves (if it was there); the others are rescaled."""
        with self._lock:
            self._members.discard(member)
            members = list(self._members)
        self._tell(members)

    def _tell(self, members: list[Any]) -> None:
        for member in members:
            self._rescale(member, len(members))
