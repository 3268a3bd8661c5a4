"""Which calls of a memory ladder lost their worker to a memory kill, told to their client.

dask's nanny ends its worker when the worker's process uses more than
``distributed.worker.memory.terminate`` (95 %) of its memory limit, and first logs an event
(:data:`~futures_hpc.engine.NANNY_MEMORY_KILL_TOPIC`) naming the worker and its resident
memory. dask's own ``KilledWorker`` carries no cause; this scheduler plugin does:

- on the nanny's event, it finds the tasks of memory ladders (:mod:`futures_hpc.memory_ladder`)
  that the worker was running (a rung's worker runs one at a time), sends each task's client a
  :data:`~futures_hpc.relay.RELAY_OP` message with ``memory={"rss", "limit", "worker"}``, and
  cancels the task in the scheduler, so that dask does not run it again on the same shape;
- the same for :data:`~futures_hpc.oom_watch.OOM_KILL_TOPIC`: the kernel's out-of-memory
  killer ended the worker (a batch job's memory cgroup, :mod:`futures_hpc.oom_watch`);
- the event usually comes a few milliseconds before the worker is gone; when it comes after,
  the tasks the worker had (from the scheduler's ``remove-worker`` event, kept
  :data:`REMEMBER_SECONDS`) are the ones meant.

The client's bridge (:mod:`futures_hpc.bridge`) turns the cancelled task into a
:class:`~futures_hpc.errors.CallMemoryError` for its call queue.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from .engine import NANNY_MEMORY_KILL_TOPIC, cancel_on_scheduler, send_to_client
from .oom_watch import OOM_KILL_TOPIC
from .relay import RELAY_OP

logger = logging.getLogger("futures_hpc")

#: The dask resource that the workers of every rung of a memory ladder declare and its tasks
#: need (:mod:`futures_hpc.memory_ladder`): a task that needs it is a ladder's call.
LADDER_RESOURCE = "fhpc-memory-ladder"

#: Seconds for which the tasks of a removed worker are kept, for a memory event that comes late.
REMEMBER_SECONDS = 10.0
#: Task states in which a task is over: a memory kill no longer concerns it.
_OVER = frozenset({"memory", "erred", "forgotten"})


class MemoryKillRelay(SchedulerPlugin):
    """Scheduler plugin: a memory kill of a rung's worker becomes news for the call's client."""

    name = "futures_hpc-memory-kills"
    #: One instance per scheduler: registering it again (another executor) keeps the first.
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Any = None
        #: Ladder tasks of recently removed workers: address -> (when, keys).
        self.removed: dict[str, tuple[float, list[str]]] = {}

    async def start(self, scheduler: Any) -> None:  # noqa: D102
        self.scheduler = scheduler

    def log_event(self, topic: str, msg: Any) -> None:
        """Watch the nannies' memory kills and the workers' removals."""
        if not isinstance(msg, dict) or self.scheduler is None:
            return
        try:
            if topic == NANNY_MEMORY_KILL_TOPIC:
                self._memory_kill(str(msg.get("worker")), msg.get("rss"), "nanny")
            elif topic == OOM_KILL_TOPIC:
                self._memory_kill(str(msg.get("worker")), None, "kernel")
            elif topic == "all" and msg.get("action") == "remove-worker":
                self._remember_removed(str(msg.get("worker")), msg.get("processing-tasks") or ())
        except Exception:  # never disturb the scheduler
            logger.exception("futures_hpc: handling a memory kill failed")

    def _ladder_task(self, key: Any) -> Any:
        task = self.scheduler.tasks.get(key)
        if task is None or task.state in _OVER:
            return None
        if LADDER_RESOURCE not in (getattr(task, "resource_restrictions", None) or {}):
            return None
        return task

    def _remember_removed(self, worker: str, keys: Any) -> None:
        now = time.monotonic()
        for address, (when, _) in list(self.removed.items()):
            if now - when > REMEMBER_SECONDS:
                del self.removed[address]
        ladder_keys = [key for key in keys if self._ladder_task(key) is not None]
        if ladder_keys:
            self.removed[worker] = (now, ladder_keys)

    def _memory_kill(self, worker: str, rss: Any, killer: str) -> None:
        worker_state = self.scheduler.workers.get(worker)
        if worker_state is not None:
            keys = [task.key for task in worker_state.processing]
            # A rung's worker runs one task at a time, but may hold a second one while its
            # pool has fewer workers than calls: then the one it reported executing is meant.
            executing = [task.key for task in getattr(worker_state, "executing", None) or ()]
            if len(keys) > 1 and set(executing) & set(keys):
                keys = [key for key in keys if key in executing]
            limit = worker_state.memory_limit or None
        else:  # removed already: the tasks it had
            keys = self.removed.pop(worker, (0.0, []))[1]
            limit = None
        by_client: dict[str, list[str]] = {}
        for key in keys:
            task = self._ladder_task(key)
            if task is None:
                continue
            news = {"rss": rss, "limit": limit, "worker": worker, "killer": killer}
            for client in task.who_wants or ():
                client_key = client.client_key
                send_to_client(self.scheduler, client_key,
                               {"op": RELAY_OP, "key": key, "outcome": None, "memory": news})
                by_client.setdefault(client_key, []).append(key)
        for client_key, client_keys in by_client.items():
            logger.info("futures_hpc: worker %s was killed for memory while running %s; "
                        "cancelled here, to run on the next rung", worker, client_keys)
            cancel_on_scheduler(self.scheduler, client_keys, client_key,
                                "the worker was killed for memory")
