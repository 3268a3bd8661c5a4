"""The MPI backend's dask cluster: a scheduler in this process, a fixed set of workers on MPI ranks.

The workers are either the other ranks of this process's ``mpirun`` world (this process is rank
0), or worker ranks launched with ``mpirun``/``srun``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import distributed
from distributed.core import Status, rpc
from distributed.deploy import Cluster
from distributed.security import Security
from distributed.utils import silence_logging_cmgr

from ..engine import ClusterHooks
from ..errors import BackendUnavailableError
from ..streams import PromptStreams
from .mpi_world import STOP_TIMEOUT

logger = logging.getLogger("futures_hpc")

# -- the cluster -------------------------------------------------------------------------------


class MPICluster(ClusterHooks, Cluster):
    """A dask scheduler in this process and a fixed set of dask workers on MPI ranks.

    The workers run on the other ranks of this ``mpirun`` (started by the provider through
    :class:`~futures_hpc.backends.mpi_world.MPIWorld`), or on ranks launched by
    :meth:`launch_workers`. :meth:`close` closes the scheduler and ends the workers: it stops
    them on their ranks (``on_close``), or ends the launcher.

    Parameters
    ----------
    scheduler_options : dict
        Keyword arguments of the :class:`distributed.Scheduler` run in this process.
    security : distributed.security.Security, optional
        TLS settings of the scheduler and the client side.
    on_close : callable, optional
        Called once the cluster closes (stops the cluster's workers on the ranks under mpirun).
    name : str, optional
        The cluster's name (the executor's run name).

    """

    _supports_scaling = False

    def __init__(
        self,
        *,
        scheduler_options: dict[str, Any],
        security: Security | None = None,
        on_close: Callable[[], None] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(asynchronous=False, name=name)
        self.security = security or Security()
        self.scheduler: distributed.Scheduler | None = None
        self._scheduler_options = scheduler_options
        self._on_close = on_close
        self._launcher: subprocess.Popen | None = None
        self._launcher_log: Path | None = None
        self._finish_lock = threading.Lock()
        self._finished = False
        self._quiet_logs = contextlib.ExitStack()
        # the scheduler's INFO lines would flood this process
        self._quiet_logs.enter_context(silence_logging_cmgr(logging.WARNING))
        self.start_event_loop()
        try:
            self.sync(self.start_cluster)
        except BaseException:
            self.close()
            raise

    async def start_cluster(self) -> None:
        """Start the in-process scheduler and connect to it."""
        self.scheduler = distributed.Scheduler(
            security=self.security, plugins=[PromptStreams()], **self._scheduler_options
        )
        await self.scheduler
        self.scheduler_comm = rpc(
            self.scheduler.address, connection_args=self.security.get_connection_args("client")
        )
        await super().start_cluster()

    async def close_cluster(self) -> None:
        """Close the cluster, then its in-process scheduler."""
        if self.status == Status.closed:
            return
        await super().close_cluster()
        if self.scheduler is not None:
            await self.scheduler.close(reason="futures_hpc: the executor was shut down")

    def close(self, timeout: float | None = None) -> None:
        """Close the scheduler and end every worker rank of this cluster."""
        try:
            super().close(timeout)
        finally:
            self.stop_event_loop()
            self._finish()
            self._quiet_logs.close()

    def scale(self, n: int) -> None:
        """Not possible: an MPI cluster has the ranks it was started with."""
        raise NotImplementedError(
            "an MPI cluster has a fixed number of workers: the ranks mpirun gave, or "
            "MPIExecutor(max_workers=...)"
        )

    @property
    def launcher(self) -> subprocess.Popen | None:
        """The ``mpirun``/``srun`` process of the launched worker ranks, if any."""
        return self._launcher

    def launch_workers(
        self, command: list[str], environment: dict[str, str], log_path: Path
    ) -> None:
        """Start the worker ranks with ``command`` (an mpirun or srun command line)."""
        self._launcher_log = log_path
        logger.info("launching MPI workers: %s", " ".join(command))
        with open(log_path, "ab") as log:
            self._launcher = subprocess.Popen(
                command,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_launcher(self) -> None:
        """Raise if the launcher of the worker ranks has ended (with the end of its log)."""
        if self._launcher is None or self._launcher.poll() is None:
            return
        tail = ""
        if self._launcher_log is not None and self._launcher_log.exists():
            tail = "\n".join(self._launcher_log.read_text(errors="replace").splitlines()[-30:])
        raise BackendUnavailableError(
            f"the worker launcher `{' '.join(self._launcher.args)}` exited with code "
            f"{self._launcher.returncode}. End of {self._launcher_log}:\n{tail}"
        )

    def _finish(self) -> None:
        with self._finish_lock:
            if self._finished:
                return
            self._finished = True
        if self._on_close is not None:
            self._on_close()
        if self._launcher is not None:
            _end_process_group(self._launcher, STOP_TIMEOUT)


def _end_process_group(process: subprocess.Popen, timeout: float) -> None:
    """Wait for ``process`` to exit; TERM then KILL its process group if it does not."""
    try:
        process.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    for signal_number, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        logger.warning("worker launcher %d still runs: sending %s", process.pid,
                       signal.Signals(signal_number).name)
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


# -- the executor ------------------------------------------------------------------------------
