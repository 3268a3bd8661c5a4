"""The kernel's out-of-memory kills of a nanny's worker, reported as memory kills.

A batch system that enforces a job's memory with a cgroup (SLURM's ``task/cgroup``, PBS, Grid
Engine) leaves an over-limit worker to the kernel, whose out-of-memory killer ends it with
SIGKILL before dask's nanny measures anything; a cgroup set up by hand does the same on one
machine. dask then sees a lost worker and nothing more. :class:`OutOfMemoryWatch`, a nanny
plugin, looks every :data:`WATCH_INTERVAL` seconds at its worker's process: when the process
is gone and the ``oom_kill`` count of its memory cgroup (cgroup v2 ``memory.events``, v1
``memory.oom_control``) grew meanwhile, it logs :data:`OOM_KILL_TOPIC`, which
:mod:`futures_hpc.memory_kills` treats as a memory kill of that worker. Without a readable
memory cgroup it does nothing: such a call follows ``max_call_retries``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import NannyPlugin
from tornado.ioloop import PeriodicCallback

from .engine import nanny_worker_pid
from .hosted_nannies import HostedSet, spread_interval

logger = logging.getLogger("futures_hpc")

#: Seconds between two looks at the worker's process (longer when one process hosts many
#: nannies: :mod:`futures_hpc.hosted_nannies`).
WATCH_INTERVAL = 0.1
#: Seconds between two readings of the process's memory cgroup (a file read and a stat): a
#: process moves between cgroups rarely (a batch job's step, once). Read at every look, it cost
#: the client of 64 idle local workers a third of a core.
COUNTER_RECHECK_SECONDS = 1.0
#: The event topic of a worker that the kernel killed for memory.
OOM_KILL_TOPIC = "futures_hpc-worker-oom-kill"
#: Where the memory cgroups are.
CGROUP_ROOT = Path("/sys/fs/cgroup")


def oom_counter(pid: int) -> Path | None:
    """The file whose ``oom_kill`` line counts the kernel's kills in ``pid``'s memory cgroup."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1
            candidate = CGROUP_ROOT / "memory" / path.lstrip("/") / "memory.oom_control"
        elif controllers == "":  # cgroup v2
            candidate = CGROUP_ROOT / path.lstrip("/") / "memory.events"
        else:
            continue
        if candidate.is_file():
            return candidate
    return None


def oom_kills(counter: Path) -> int:
    """The ``oom_kill`` count in ``counter`` (0 if unreadable)."""
    try:
        for line in counter.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class _Watched:
    pid: int
    address: str
    #: Each counter the process was seen under (it may move; an exiting process shows the
    #: root cgroup), with its count when first seen.
    kills: dict[Path, int]
    #: When the counter of the process's cgroup was last looked up (``time.monotonic``).
    counted_at: float = float("-inf")

    def killed(self) -> bool:
        """Whether a counter grew since it was first seen."""
        return any(oom_kills(counter) > count for counter, count in self.kills.items())


class OutOfMemoryWatch(NannyPlugin):
    """Nanny plugin: log :data:`OOM_KILL_TOPIC` when the kernel killed the worker for memory."""

    name = "futures_hpc-oom-watch"
    #: One per nanny: registering it again (another executor) keeps the first.
    idempotent = True

    def __init__(self) -> None:
        self.nanny: Any = None
        self._watched: _Watched | None = None
        self._callback: PeriodicCallback | None = None

    def setup(self, nanny: Any) -> None:  # noqa: D102
        self.nanny = nanny
        self._callback = PeriodicCallback(self._look, WATCH_INTERVAL * 1000)
        self._callback.start()
        _WATCHES.add(self)

    def teardown(self, nanny: Any) -> None:  # noqa: D102
        _WATCHES.discard(self)
        if self._callback is not None:
            self._callback.stop()

    @property
    def interval(self) -> float:
        """Seconds between two looks at the worker's process."""
        return self._callback.callback_time / 1000 if self._callback else WATCH_INTERVAL

    def look_every(self, seconds: float) -> None:
        """Look at the worker's process every ``seconds`` from the next look on."""
        if self._callback is not None:
            self._callback.callback_time = seconds * 1000

    def _look(self) -> None:
        try:
            pid = nanny_worker_pid(self.nanny)
            watched = self._watched
            if watched is not None and pid != watched.pid:
                self._watched = None
                if watched.killed():
                    logger.warning("futures_hpc: the kernel killed worker %s (pid %d) for "
                                   "memory", watched.address, watched.pid)
                    self.nanny.log_event(OOM_KILL_TOPIC, {"worker": watched.address,
                                                          "pid": watched.pid})
            address = getattr(self.nanny, "worker_address", None)
            if pid is None or not address:
                return
            if self._watched is None:
                self._watched = _Watched(pid, str(address), {})
            now = time.monotonic()
            if now - self._watched.counted_at < COUNTER_RECHECK_SECONDS:
                return
            self._watched.counted_at = now
            counter = oom_counter(pid)  # again now and then: the process may have moved
            if counter is not None and counter not in self._watched.kills:
                self._watched.kills[counter] = oom_kills(counter)
        except Exception:  # never disturb the nanny
            logger.debug("futures_hpc: watching for out-of-memory kills failed", exc_info=True)


def _rescale_watch(watch: OutOfMemoryWatch, hosted: int) -> None:
    watch.look_every(spread_interval(WATCH_INTERVAL, hosted))


#: The watches of this process: one per nanny it hosts.
_WATCHES = HostedSet(_rescale_watch)
