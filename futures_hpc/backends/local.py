"""The local backend: an embedded :class:`distributed.LocalCluster` of worker processes.

Closed to other users of the machine by default: the scheduler, the nannies and the workers
listen on 127.0.0.1 only and require TLS with a certificate made for the run, which the worker
processes receive from their nannies in this process, so the key is never written to a file.
The workers' HTTP servers (which distributed always starts) listen on 127.0.0.1 and, with TLS,
serve nothing; the scheduler's dashboard listens where ``dashboard_address`` says (localhost by
default).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed import LocalCluster, Nanny

from ..engine import (
    NANNY_MEMORY_CALLBACK,
    SERVER_MONITOR_CALLBACK,
    set_periodic_interval,
    stop_periodic_callback,
)
from ..executor import HPCExecutor
from ..hosted_nannies import HostedSet, spread_interval
from ..pool_shape import PoolShape
from ..pools import BASE_RESOURCE, ResourcePool
from ..provider import BackendProvider

logger = logging.getLogger("futures_hpc")

#: Common options that mean nothing on one machine; accepted (a profile may set them) and logged.


#: Where each local worker's HTTP server listens.
LOCAL_WORKER_HTTP_ADDRESS = "127.0.0.1:0"

#: Worker configuration (given to each nanny, for the worker processes it starts).
_NO_WORKER_HTTP_ROUTES = {"distributed.worker.http.routes": []}


def _memory_check_seconds() -> float:
    """The interval of a nanny's memory check in distributed's config (the user's, if set)."""
    return parse_timedelta(dask.config.get("distributed.worker.memory.monitor-interval"))


def _rescale_memory_check(nanny: Nanny, hosted: int) -> None:
    set_periodic_interval(nanny, NANNY_MEMORY_CALLBACK,
                          spread_interval(_memory_check_seconds(), hosted))


#: The local nannies of this process (:mod:`futures_hpc.hosted_nannies`).
_HOSTED_NANNIES = HostedSet(_rescale_memory_check)


class _LocalNanny(Nanny):
    """A nanny hosted in the client's process, as light on that process as it can be.

    - Its worker has no dashboard, whatever its ``dashboard_address``:
      :class:`~distributed.LocalCluster` turns the workers' dashboards on whenever it is given
      a ``worker_dashboard_address``, which is the only way to say where their HTTP servers
      listen.
    - It has no system monitor: every dask server samples its own process for the dashboard's
      system charts, and a hosted nanny's process is the client's, which the scheduler's
      monitor samples already (64 nannies sampled it 32 times a second, to no use).
    - Its memory check slows down as the process hosts more nannies
      (:mod:`futures_hpc.hosted_nannies`).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["dashboard"] = False
        super().__init__(*args, **kwargs)
        stop_periodic_callback(self, SERVER_MONITOR_CALLBACK)
        _HOSTED_NANNIES.add(self)

    async def close(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        _HOSTED_NANNIES.discard(self)
        return await super().close(*args, **kwargs)


def local_core_count() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LocalProvider(BackendProvider):
    """Worker processes of this machine: a :class:`distributed.LocalCluster`."""

    name = "local"
    # Any LocalCluster argument passes through, but for those the common options set.
    option_names = frozenset(
        inspect.signature(LocalCluster.__init__).parameters
    ) - {"self", "n_workers", "threads_per_worker", "processes", "memory_limit", "kwargs"}
    networked = False
    credentials_in_memory = True

    def planned_worker_slots(self) -> int:
        """One slot per thread of each worker process."""
        executor = self.executor
        return (executor.max_workers or local_core_count()) * (executor.resources.cores or 1)

    def create_cluster(self) -> LocalCluster:
        """Start the scheduler and the worker processes, on 127.0.0.1 only."""
        executor = self.executor
        resources = executor.resources
        options = dict(
            n_workers=executor.max_workers or local_core_count(),
            threads_per_worker=resources.cores or 1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=executor.dashboard_address,
            memory_limit=resources.memory_bytes or "auto",
            silence_logs=logging.WARNING,
        )
        if resources.env:
            options["env"] = dict(resources.env)
        if "worker_dashboard_address" not in executor.backend_options:
            # Each worker's HTTP server cannot be turned off: on 127.0.0.1 (distributed 2024.1
            # would bind every interface), without the worker's dashboard.
            options.update(worker_dashboard_address=LOCAL_WORKER_HTTP_ADDRESS,
                           worker_class=_LocalNanny)
            if executor.security is not None:
                # It has no TLS: it serves nothing then (its routes: health, metrics, statics).
                options["config"] = _NO_WORKER_HTTP_ROUTES
        if executor.security is not None:
            options.update(security=executor.security, protocol="tls")
        options.update(executor.backend_options)
        # Each thread of the executor's own workers is a unit of the base resource: once pools
        # exist, the executor's own calls need it (futures_hpc.pools).
        options["resources"] = {**(options.get("resources") or {}),
                                BASE_RESOURCE: options["threads_per_worker"]}
        return LocalCluster(**options)

    def check_pool(self, shape: PoolShape) -> None:
        """Every shape runs here; walltimes, call times, queues and directives mean nothing.

        They are accepted, so that a program written for a cluster runs unchanged on a
        laptop, and logged.
        """
        ignored = [f"{name}={getattr(shape, name)!r}"
                   for name in ("walltime", "call_time", "queue", "job_extra")
                   if getattr(shape, name)]
        if ignored:
            logger.info("with_resources on the 'local' backend ignores %s: its workers are "
                        "processes of this machine, without a batch queue", ", ".join(ignored))

    def pool_walltime(self, shape: PoolShape) -> tuple[str | None, int | None]:
        """Local workers have no walltime."""
        return None, None

    def pool_default_max_workers(self, shape: PoolShape) -> int:
        """As many workers as fit the machine's cores, at least one."""
        return max(1, local_core_count() // shape.cores)

    def pool_job(self, pool: ResourcePool, name: str) -> dict[str, object]:
        """A worker process of the pool's shape (its threads, memory limit and resources)."""
        spec = self.executor.cluster.new_spec
        options = dict(spec["options"])
        options.update(
            nthreads=pool.shape.cores,
            resources=pool.worker_resources(),
            env={**(options.get("env") or {}), **pool.environment()},
        )
        if pool.shape.memory_bytes:
            options["memory_limit"] = pool.shape.memory_bytes
        return {"cls": spec["cls"], "options": options}


class LocalExecutor(HPCExecutor):
    """Executor on worker processes of this machine (a :class:`distributed.LocalCluster`).

    ``max_workers`` worker processes (default: one per core), each with ``cores`` threads
    (default 1) and ``memory`` as its memory limit; ``env`` is set in the workers. Any other
    keyword argument of :class:`distributed.LocalCluster` passes through.
    """

    provider = LocalProvider
