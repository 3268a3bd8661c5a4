"""Closing batch workers before their jobs are cancelled.

A worker that its job's cancel (``scancel``, ``qdel``) stops half-way through closing leaves
traces: the scheduler logs its last heartbeat as one from an "unregistered worker" and a
connection it was opening as a failed TLS handshake, and its scratch directory's lock stays on
the node. So futures_hpc asks the workers of a job it ends to close, waits (briefly) until they
have disconnected, and only then cancels the job, which it always does.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger("futures_hpc")

__all__ = ["CLOSE_GRACE_SECONDS", "close_workers", "job_worker_addresses", "until_disconnected"]

#: Seconds workers are given to close and disconnect before their jobs are cancelled anyway
#: (a worker closes in about 0.1 s; a hung one is not waited for longer).
CLOSE_GRACE_SECONDS = 5.0
#: Seconds between two looks at whether the workers have disconnected.
_POLL_SECONDS = 0.05


def job_worker_addresses(scheduler: Any, job_names: Iterable[str]) -> list[str]:
    """Addresses of the workers of these jobs (dask-jobqueue names them ``job`` or ``job-N``)."""
    names = tuple(job_names)
    return [ws.address for ws in list(scheduler.workers.values())
            if any(str(ws.name) == job or str(ws.name).startswith(f"{job}-") for job in names)]


async def until_disconnected(scheduler: Any, addresses: list[str],
                             timeout: float = CLOSE_GRACE_SECONDS) -> bool:
    """Wait until none of ``addresses`` is connected to ``scheduler``; False on timeout."""
    deadline = time.monotonic() + timeout
    while any(address in scheduler.workers for address in addresses):
        if time.monotonic() >= deadline:
            logger.debug("%d worker(s) still connected after %g s; their jobs are cancelled "
                         "anyway", len(addresses), timeout)
            return False
        await asyncio.sleep(_POLL_SECONDS)
    return True


async def close_workers(scheduler: Any, addresses: list[str],
                        timeout: float = CLOSE_GRACE_SECONDS) -> bool:
    """Ask each worker to close (``Scheduler.close_worker``) and wait until they have left."""
    for address in addresses:
        closing = scheduler.close_worker(address)
        if inspect.isawaitable(closing):  # a coroutine in some distributed releases
            await closing
    return await until_disconnected(scheduler, addresses, timeout)
