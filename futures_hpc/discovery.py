"""Dask integration: an executor's cluster as dask's scheduler, and cluster discovery.

Default scheduler
    Inside ``with HPCExecutor(...) as ex:`` dask collections (array, dataframe, bag, delayed)
    compute on ``ex``'s cluster: entering the block makes ``ex.client`` distributed's default
    client and sets dask's ``scheduler`` config to ``"dask.distributed"``; leaving it restores
    what was there before. Executors may be nested, and even left in another order than they
    were entered: each exit restores what the remaining active executors imply.

Discovery (dask-ctl)
    While an executor is alive (with or without ``with``), a small record (mode 0600) in
    :func:`discovery_directory` names its scheduler address and TLS files. :func:`discover` is an
    async generator in the form dask-ctl expects from a ``dask_cluster_discovery`` entry point, and
    :meth:`DiscoveredCluster.from_name` reconnects to a listed cluster, so ``dask cluster list``
    shows running executors where dask-ctl is installed and working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dask.config
import distributed
from distributed.core import Status, rpc
from distributed.deploy import Cluster
from distributed.deploy.cluster import SchedulerInfo
from distributed.security import Security

from .cleanup import process_alive
from .engine import ClusterHooks, drop_default_client, make_default_client
from .security import remove_run_credentials


class DiscoverableExecutor(Protocol):
    """What this module needs of an executor (HPCExecutor has it; no import of it here)."""

    run_name: str
    backend_name: str
    security: Security | None

    @property
    def client(self) -> distributed.Client: ...  # noqa: D102

    @property
    def cluster(self) -> Cluster: ...  # noqa: D102

    @property
    def dashboard_link(self) -> str | None: ...  # noqa: D102

    @property
    def credentials(self) -> Any: ...  # noqa: D102


#: Run name -> Security of the executors of this process with a discovery record.
_registered_security: dict[str, Security] = {}

logger = logging.getLogger("futures_hpc")

_NOT_SET = object()


# -- the default scheduler ---------------------------------------------------------------------


@dataclass
class _Activation:
    """One entered executor, its client, and the ``scheduler`` config value it replaced."""

    executor_id: int
    client: distributed.Client
    previous_scheduler: Any


_activations: list[_Activation] = []
_activations_lock = threading.Lock()


def _restore_scheduler_config(value: Any) -> None:
    if value is _NOT_SET:
        with dask.config.config_lock:
            dask.config.config.pop("scheduler", None)
    else:
        dask.config.set(scheduler=value)


def use_as_dask_scheduler(executor: DiscoverableExecutor) -> None:
    """Make ``executor``'s cluster the scheduler of dask collections until restored.

    Called by ``HPCExecutor.__enter__``: ``executor.client`` becomes distributed's default
    client (as a ``Client`` with ``set_as_default=True`` would) and dask's ``scheduler`` config
    ``"dask.distributed"``.
    """
    client = executor.client
    with _activations_lock:
        previous = dask.config.get("scheduler", default=_NOT_SET)
        _activations.append(_Activation(id(executor), client, previous))
        # distributed keeps its default clients in a process-wide registry in which the most
        # recently added one wins; Client(set_as_default=True) adds itself there the same way.
        # Process-wide (unlike Client.as_current, which is per thread) so that collections
        # computed from any thread of the block use the executor. The config cannot hold the
        # Client itself: worker processes started later receive a pickled copy of the config.
        make_default_client(client)
        dask.config.set(scheduler="dask.distributed")
    logger.debug("dask collections compute on %r", executor)


def restore_dask_scheduler(executor: DiscoverableExecutor) -> None:
    """Undo :func:`use_as_dask_scheduler` for ``executor`` (no-op if it is not active).

    Called by ``HPCExecutor.__exit__``. When ``executor`` is the most recently entered one, the
    ``scheduler`` config value from before it is restored; otherwise the executor entered after
    it inherits that value, so that its own exit restores it later. The default client falls
    back to the most recent one still registered (an outer executor's, or the user's own).
    """
    with _activations_lock:
        positions = [
            index
            for index, activation in enumerate(_activations)
            if activation.executor_id == id(executor)
        ]
        if not positions:
            return
        index = positions[-1]
        activation = _activations.pop(index)
        drop_default_client(activation.client)
        if index == len(_activations):
            _restore_scheduler_config(activation.previous_scheduler)
        else:
            _activations[index].previous_scheduler = activation.previous_scheduler
    logger.debug("dask scheduler restored after %r", executor)


def active_executor_count() -> int:
    """How many executors are entered (their ``with`` blocks are running) now."""
    with _activations_lock:
        return len(_activations)


# -- discovery ------------------------------------------------------------------------------


def discovery_directory() -> Path:
    """Where running executors leave their discovery records.

    The dask config key ``futures_hpc.discovery-dir`` if set, else
    ``$XDG_RUNTIME_DIR/futures_hpc/clusters``, else ``~/.cache/futures_hpc/clusters``.
    """
    configured = dask.config.get("futures_hpc.discovery-dir", default=None)
    if configured:
        return Path(configured).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "futures_hpc" / "clusters"
    return Path.home() / ".cache" / "futures_hpc" / "clusters"


def _record_path(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{name!r} is not a futures_hpc cluster name")
    return discovery_directory() / f"{name}.json"


def register_for_discovery(executor: DiscoverableExecutor) -> Path | None:
    """Write ``executor``'s discovery record; return its path (None if it could not be written).

    Never raises: discovery is a convenience, and a read-only home must not stop a run.
    """
    try:
        credentials = executor.credentials
        record = {
            "name": executor.run_name,
            "backend": executor.backend_name,
            "scheduler_address": executor.cluster.scheduler_address,
            "dashboard_link": executor.dashboard_link,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "created": time.time(),
            "tls_certificate": _path_text(credentials and credentials.certificate_path),
            "tls_key": _path_text(credentials and credentials.key_path),
        }
        directory = discovery_directory()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = _record_path(executor.run_name)
        temporary = path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(record, handle)
        os.replace(temporary, path)
        if executor.security is not None:
            _registered_security[executor.run_name] = executor.security
        return path
    except Exception as error:  # noqa: BLE001
        logger.info("no discovery record for %r: %r", executor, error)
        return None


def _path_text(path: Path | None) -> str | None:
    return str(path) if path else None


def unregister_from_discovery(executor: DiscoverableExecutor) -> None:
    """Remove ``executor``'s discovery record (never raises)."""
    _registered_security.pop(executor.run_name, None)
    with contextlib.suppress(Exception):
        _record_path(executor.run_name).unlink(missing_ok=True)


def read_discovery_record(name: str) -> dict[str, Any]:
    """The discovery record of the running executor ``name``.

    Raises
    ------
    LookupError
        If no such executor is registered.

    """
    path = _record_path(name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LookupError(
            f"no running futures_hpc cluster named {name!r} in {path.parent}"
        ) from None


def running_cluster_names() -> list[str]:
    """Names of the executors with a discovery record, oldest first; drops records of dead runs.

    The record of a run whose process has died on this host (killed with SIGKILL, or by the
    out-of-memory killer) is deleted, and so are the run's TLS key and certificate files: every
    executor calls this when it starts, and so does ``futures-hpc cancel``. A record from another
    host is kept (its process cannot be checked from here).
    """
    directory = discovery_directory()
    if not directory.is_dir():
        return []
    records = []
    for path in directory.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("host") == socket.gethostname() and not process_alive(
            int(record.get("pid", 0))
        ):
            remove_run_credentials(record.get("tls_certificate"), record.get("tls_key"))
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        records.append((record.get("created", 0), record["name"]))
    return [name for _, name in sorted(records)]


async def discover() -> AsyncIterator[tuple[str, type]]:
    """Yield ``(name, DiscoveredCluster)`` for every running executor (dask-ctl's protocol).

    Registered as the ``dask_cluster_discovery`` entry point ``futures_hpc``.
    """
    for name in running_cluster_names():
        yield name, DiscoveredCluster
        await asyncio.sleep(0)


def _security_from_record(record: dict[str, Any]) -> Security:
    if not record.get("tls_certificate"):
        if str(record.get("scheduler_address", "")).startswith("tls://"):
            return _in_process_security(record)
        return Security()
    return Security(
        require_encryption=True,
        tls_ca_file=record["tls_certificate"],
        tls_client_cert=record["tls_certificate"],
        tls_client_key=record["tls_key"],
    )


def _in_process_security(record: dict[str, Any]) -> Security:
    """The TLS credentials of a run that keeps them in memory (local backend): its own process's.

    Raises
    ------
    LookupError
        From any other process: no file holds the key, so nothing else can connect.

    """
    security = _registered_security.get(record["name"])
    if security is not None:
        return security
    raise LookupError(
        f"{record['name']} keeps its TLS key in the memory of process {record.get('pid')} on "
        f"{record.get('host')} (no key file is written), so only that process can connect to "
        "it: use Client(ex.cluster) there, or give the executor security=<a "
        "distributed.security.Security with certificate files> to let other processes in"
    )


class DiscoveredCluster(ClusterHooks, Cluster):
    """A handle on a running executor's cluster, made from its discovery record.

    It shows the cluster's workers and dashboard and lets a :class:`distributed.Client` connect
    (``Client(DiscoveredCluster.from_name(name))``). The cluster belongs to its executor:
    :meth:`scale` and :meth:`adapt` raise, and :meth:`close` only disconnects this handle.
    """

    def __init__(
        self, record: dict[str, Any], asynchronous: bool = False, loop: Any = None
    ) -> None:
        super().__init__(asynchronous=asynchronous, loop=loop, name=record["name"])
        self.record = record
        self.security = _security_from_record(record)
        self.scheduler_comm = rpc(
            record["scheduler_address"],
            connection_args=self.security.get_connection_args("client"),
        )

    @property
    def scheduler_address(self) -> str:
        """The scheduler's address."""
        return self.record["scheduler_address"]

    @classmethod
    def from_name(
        cls, name: str, loop: Any = None, asynchronous: bool = False
    ) -> DiscoveredCluster:
        """Connect to the running executor's cluster called ``name`` (its run name)."""
        cluster = cls(read_discovery_record(name), asynchronous=asynchronous, loop=loop)
        if not asynchronous:
            cluster.start_event_loop()
        cluster.status = Status.starting
        if asynchronous:
            return cluster._start_and_return()
        cluster.sync(cluster.start_cluster)
        return cluster

    async def start_cluster(self) -> None:
        """Ask the scheduler who is there (a read-only handle subscribes to nothing)."""
        # Cluster._start would subscribe to worker status (a scheduler plugin of a fixed name,
        # which would replace the owning cluster's) and write this handle's name into the
        # scheduler's metadata: a read-only handle only asks who is there.
        self.scheduler_info = SchedulerInfo(await self.scheduler_comm.identity())
        self.status = Status.running

    async def _start_and_return(self) -> DiscoveredCluster:
        await self.start_cluster()
        return self

    def refresh(self) -> None:
        """Fetch the current workers from the scheduler into :attr:`scheduler_info`."""
        self.sync(self.start_cluster)

    def scale(self, *args: Any, **kwargs: Any) -> None:
        """Not allowed: the executor that owns the cluster decides its size."""
        raise TypeError(
            f"{self.name} belongs to a futures_hpc executor (pid {self.record.get('pid')}); "
            "its size is set there"
        )

    def adapt(self, *args: Any, **kwargs: Any) -> None:
        """Not allowed: the executor that owns the cluster decides its size."""
        self.scale()

    def close(self, timeout: float | None = None) -> Any:
        """Disconnect this handle; the executor's cluster keeps running."""
        result = super().close(timeout=timeout)
        if not self.asynchronous:
            self.stop_event_loop()
        return result


def sweep_stale_runs() -> None:
    """Drop discovery records of dead runs of this host, deleting their TLS files (cheap)."""
    try:
        running_cluster_names()
    except Exception as error:  # a convenience: it must never stop a run from starting
        logger.debug("sweeping the discovery records failed: %r", error)


__all__ = [
    "DiscoveredCluster",
    "active_executor_count",
    "discover",
    "discovery_directory",
    "read_discovery_record",
    "register_for_discovery",
    "restore_dask_scheduler",
    "running_cluster_names",
    "unregister_from_discovery",
    "use_as_dask_scheduler",
]
