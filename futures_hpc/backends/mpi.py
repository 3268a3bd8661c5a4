"""The MPI backend: dask scheduler and workers on MPI ranks, through mpi4py.

Two modes, chosen from the environment:

- **Under mpirun** (``mpirun -n N python script.py``, or ``srun --mpi=pmix``): every rank runs the
  script. Rank 0 is the client: ``MPIExecutor()`` returns there and the ``with`` body runs. Rank 1
  runs the dask scheduler and ranks 2.. the workers: on those ranks ``MPIExecutor()`` serves
  (:func:`~futures_hpc.backends.mpi_worker.serve_world`) and ends the process when rank 0's
  process ends, with status 0, or 1 on every rank if rank 0 ended with an uncaught exception.
  Each executor that rank 0 creates gets a cluster of its own on those ranks.
- **From an ordinary process**: ``MPIExecutor(max_workers=4)`` runs the scheduler in this process
  and launches 4 worker ranks with ``mpirun`` (or ``srun`` inside a SLURM allocation), which it
  ends on shutdown.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import distributed
from distributed.core import Status, rpc
from distributed.deploy import Cluster
from distributed.security import Security
from distributed.utils import silence_logging_cmgr

from ..errors import BackendUnavailableError, OptionError
from ..executor import HPCExecutor
from ..streams import PromptStreams
from . import mpi_world_size
from .mpi_worker import (
    ACK_TAG,
    ADDRESS_TAG,
    CLIENT_RANK,
    COMMAND_TAG,
    MIN_WORLD_SIZE,
    REPORT_TAG,
    SCHEDULER_RANK,
    ClusterConfig,
    barrier,
    inline_security,
    rank_host,
    receive_ready,
    send,
    serve_world,
)

if TYPE_CHECKING:
    from mpi4py import MPI

logger = logging.getLogger("futures_hpc")

#: Seconds to wait for the scheduler and every worker of a new cluster (option startup_timeout).
DEFAULT_STARTUP_TIMEOUT = 60.0
#: Seconds the ranks have to close a stopped cluster, or launched workers to exit, before this
#: process stops waiting (and, for launched workers, kills them).
STOP_TIMEOUT = 15.0

#: Common options that mean nothing for MPI ranks; accepted (a profile may set them) and logged.
_IGNORED_OPTIONS = ("walltime", "queue", "account", "processes", "job_extra", "prologue")

#: Variables by which a process launched by mpirun/srun knows its job; a nested launcher must
#: not inherit them.
_LAUNCHER_VARIABLE_PREFIXES = ("OMPI_", "PMIX_", "PMI_")
_KEPT_LAUNCHER_VARIABLES = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")


# -- the client rank's side of the world ------------------------------------------------------


class MPIWorld:
    """The client rank's link to the other ranks of an ``mpirun``: starts and stops clusters.

    One per process, made by :func:`join_world` on rank 0. At exit it tells every rank to exit
    with this process's status: 1 after an uncaught exception (or a ``SystemExit`` with a non-zero
    code leaving an executor's ``with`` block), else 0.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm
        A duplicate of ``MPI.COMM_WORLD`` reserved for the protocol.
    node_names : list of str
        The processor name of every rank.

    """

    def __init__(self, comm: MPI.Intracomm, node_names: list[str]) -> None:
        self.comm = comm
        self.size: int = comm.Get_size()
        self.node_names = node_names
        self.several_nodes: bool = len(set(node_names)) > 1
        self.exit_status: int = 0
        self._cluster_ids = itertools.count(1)
        self._sequences = itertools.count(1)
        self._lock = threading.Lock()
        self._failures: dict[int, list[str]] = {}
        self._answers: dict[int, tuple[str, int, str]] = {}  # scheduler answers, by cluster id
        self._finished = False
        self.executors: weakref.WeakSet[MPIExecutor] = weakref.WeakSet()
        atexit.register(self.finish)
        self._finish_before_mpi_finalize()

    def _finish_before_mpi_finalize(self) -> None:
        """Also run :meth:`finish` first thing in ``MPI_Finalize``, should the script call it.

        MPI calls the delete callbacks of ``COMM_SELF``'s attributes before it finalizes; without
        this, an explicit ``MPI.Finalize()`` on rank 0 would wait forever for the serving ranks.
        """
        from mpi4py import MPI

        keyval = MPI.COMM_SELF.Create_keyval(delete_fn=lambda *_: self.finish())
        MPI.COMM_SELF.Set_attr(keyval, "futures_hpc")

    @property
    def other_ranks(self) -> range:
        """Every rank but the client rank."""
        return range(1, self.size)

    @property
    def worker_rank_count(self) -> int:
        """Ranks available for workers: all but the client and the scheduler."""
        return self.size - 2

    def start_cluster(
        self, make_config: Callable[[int], ClusterConfig], timeout: float
    ) -> tuple[int, str]:
        """Start a scheduler and workers on the ranks; return the cluster id and scheduler address.

        Parameters
        ----------
        make_config : callable
            Called with the new cluster id; returns the :class:`ClusterConfig` to send.
        timeout : float
            Seconds to wait for the scheduler's address.

        Raises
        ------
        BackendUnavailableError
            If the scheduler failed to start, or did not answer in time (a rank that never
            reached ``MPIExecutor()``: every rank must run the same script).

        """
        with self._lock:
            self._check_open()
            cluster_id = next(self._cluster_ids)
            send(self.comm, ("start", make_config(cluster_id)), self.other_ranks, COMMAND_TAG)
        try:
            address = self._receive_address(cluster_id, timeout)
        except BaseException:
            self.stop_cluster(cluster_id, timeout=5.0)
            raise
        logger.info("MPI cluster %d: scheduler at %s", cluster_id, address)
        return cluster_id, address

    def _receive_address(self, cluster_id: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                # Another thread's executor may be starting too: keep the answers for it.
                while (answer := receive_ready(self.comm, SCHEDULER_RANK, ADDRESS_TAG)):
                    self._answers[answer[1]] = answer
                answer = self._answers.pop(cluster_id, None)
            if answer is not None:
                break
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"the scheduler rank {SCHEDULER_RANK} did not answer within {timeout} s. "
                    "Every rank must run the same script and reach MPIExecutor(); a rank "
                    "busy elsewhere (or waiting on an MPI call rank 0 never makes) cannot serve."
                )
            time.sleep(0.005)
        kind, _, value = answer
        if kind != "address":
            raise BackendUnavailableError(
                f"the dask scheduler on rank {SCHEDULER_RANK} failed to start:\n{value}"
            )
        return value

    def raise_failures(self, cluster_id: int) -> None:
        """Raise the failures ranks reported for ``cluster_id`` (a worker that did not start)."""
        from mpi4py import MPI

        with self._lock:
            while (report := receive_ready(self.comm, MPI.ANY_SOURCE, REPORT_TAG)) is not None:
                _, reported_id, rank, text = report
                self._failures.setdefault(reported_id, []).append(f"rank {rank}:\n{text}")
            failures = self._failures.pop(cluster_id, [])
        if failures:
            raise BackendUnavailableError(
                "dask servers failed to start on MPI ranks:\n" + "\n".join(failures)
            )

    def stop_cluster(self, cluster_id: int, timeout: float = STOP_TIMEOUT) -> None:
        """Close the cluster's scheduler and workers on the ranks; wait until they are closed."""
        from mpi4py import MPI

        with self._lock:
            if self._finished:
                return
            sequence = next(self._sequences)
            send(self.comm, ("stop", cluster_id, sequence), self.other_ranks, COMMAND_TAG)
            waiting = set(self.other_ranks)
            deadline = time.monotonic() + timeout
            while waiting and time.monotonic() < deadline:
                answer = receive_ready(self.comm, MPI.ANY_SOURCE, ACK_TAG)
                if answer is None:
                    time.sleep(0.005)
                elif answer[1:3] == (cluster_id, sequence):
                    waiting.discard(answer[3])
            self._failures.pop(cluster_id, None)
            self._answers.pop(cluster_id, None)
        if waiting:
            logger.warning(
                "MPI ranks %s did not confirm within %s s that cluster %d is closed",
                sorted(waiting), timeout, cluster_id,
            )

    def finish(self) -> None:
        """Tell every rank to exit with this process's status (run at exit; once)."""
        if self._finished:
            return
        for executor in list(self.executors):
            try:
                executor._abort()
            except Exception as error:
                logger.warning("closing %r at exit failed: %r", executor, error)
        status = 1 if getattr(sys, "last_value", None) is not None else self.exit_status
        with self._lock:
            self._finished = True
            try:
                send(self.comm, ("exit", status), self.other_ranks, COMMAND_TAG, timeout=10)
            except TimeoutError:
                logger.error("MPI ranks did not take the exit message; aborting the MPI job")
                self.comm.Abort(status or 1)
        logger.debug("told MPI ranks %s to exit with status %d", list(self.other_ranks), status)

    def _check_open(self) -> None:
        if self._finished:
            raise BackendUnavailableError("the MPI ranks have already been told to exit")


_world: MPIWorld | None = None


def join_world() -> MPIWorld:
    """Join this process's MPI world; on rank 0 return its :class:`MPIWorld`.

    On every other rank, serve clusters and exit the process (never return). Collective: every
    rank must call it (``MPIExecutor()`` does).

    Raises
    ------
    BackendUnavailableError
        On every rank, if the world has fewer than 3 ranks, or if mpi4py sees fewer ranks than
        the launcher started (``srun`` without ``--mpi=pmix``, an mpi4py built for another MPI).

    """
    global _world
    if _world is not None:
        return _world
    from mpi4py import MPI

    launched = mpi_world_size()
    size = MPI.COMM_WORLD.Get_size()
    if size < MIN_WORLD_SIZE:
        if launched > size:
            raise BackendUnavailableError(
                f"the launcher started {launched} ranks but MPI sees a world of {size}: each "
                "rank runs alone. Under SLURM use `srun --mpi=pmix` (Open MPI has no PMI2), or "
                "check that mpi4py is built for the MPI library of your mpirun."
            )
        raise BackendUnavailableError(
            f"MPIExecutor needs at least {MIN_WORLD_SIZE} MPI ranks (rank 0 runs your script, "
            f"rank 1 the dask scheduler, ranks 2.. the workers), but this world has {size}. "
            f"Run with `mpirun -n {MIN_WORLD_SIZE}` or more, or without mpirun to let "
            "MPIExecutor(max_workers=...) launch its workers itself."
        )
    barrier(MPI.COMM_WORLD)  # ranks that get here early wait without spinning a core
    comm = MPI.COMM_WORLD.Dup()
    node_names = comm.allgather(MPI.Get_processor_name())
    if comm.Get_rank() != CLIENT_RANK:
        serve_world(comm)
    _world = MPIWorld(comm, node_names)
    return _world


# -- the cluster -------------------------------------------------------------------------------


class MPICluster(Cluster):
    """A fixed set of dask workers on MPI ranks.

    Either connected to a scheduler on another rank (under mpirun), or with the scheduler in this
    process and worker ranks launched by :meth:`launch_workers`. :meth:`close` closes the
    scheduler and ends the workers: it stops them on their ranks, or ends the launcher.

    Parameters
    ----------
    security : distributed.security.Security, optional
        TLS settings of the client side.
    scheduler_address : str, optional
        The address of a scheduler already running (under mpirun).
    scheduler_options : dict, optional
        Keyword arguments of a :class:`distributed.Scheduler` to run in this process instead.
    on_close : callable, optional
        Called once the cluster closes (stops the cluster's ranks under mpirun).
    name : str, optional
        The cluster's name (the executor's run name).

    """

    _supports_scaling = False

    def __init__(
        self,
        *,
        security: Security | None = None,
        scheduler_address: str | None = None,
        scheduler_options: dict[str, Any] | None = None,
        on_close: Callable[[], None] | None = None,
        name: str | None = None,
    ) -> None:
        if (scheduler_address is None) == (scheduler_options is None):
            raise ValueError("give either scheduler_address or scheduler_options")
        super().__init__(asynchronous=False, name=name)
        self.security = security or Security()
        self.scheduler: distributed.Scheduler | None = None
        self._given_scheduler_address = scheduler_address
        self._scheduler_options = scheduler_options
        self._on_close = on_close
        self._launcher: subprocess.Popen | None = None
        self._launcher_log: Path | None = None
        self._finish_lock = threading.Lock()
        self._finished = False
        self._quiet_logs = contextlib.ExitStack()
        if scheduler_options is not None:  # the scheduler's INFO lines would flood this process
            self._quiet_logs.enter_context(silence_logging_cmgr(logging.WARNING))
        self._loop_runner.start()
        try:
            self.sync(self._start)
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        if self._scheduler_options is not None:
            self.scheduler = distributed.Scheduler(
                security=self.security, plugins=[PromptStreams()], **self._scheduler_options
            )
            await self.scheduler
            address = self.scheduler.address
        else:
            address = self._given_scheduler_address
        self.scheduler_comm = rpc(
            address, connection_args=self.security.get_connection_args("client")
        )
        await super()._start()

    async def _close(self) -> None:
        if self.status == Status.closed:
            return
        await super()._close()
        if self.scheduler is not None:
            await self.scheduler.close(reason="futures_hpc: the executor was shut down")

    def close(self, timeout: float | None = None) -> None:
        """Close the scheduler and end every worker rank of this cluster."""
        try:
            super().close(timeout)
        finally:
            self._loop_runner.stop()
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


def _inside_slurm_allocation() -> bool:
    return "SLURM_JOB_ID" in os.environ and shutil.which("srun") is not None


class MPIExecutor(HPCExecutor):
    """Executor whose dask scheduler and workers run on MPI ranks.

    Under ``mpirun -n N`` (N >= 3): rank 0 runs the script and this executor's client, rank 1
    the scheduler, ranks 2..N-1 one worker each; on ranks 1.. this constructor never returns,
    and they exit when rank 0's process ends. From an ordinary process: the scheduler runs here
    and ``max_workers`` worker ranks are launched with ``mpirun`` (``srun`` inside a SLURM
    allocation) and ended on shutdown.

    Parameters
    ----------
    max_workers : int, optional
        Under mpirun: how many of the N-2 worker ranks to use (default: all). Otherwise: how many
        worker ranks to launch (default: ``SLURM_NTASKS`` inside an allocation, else the cores
        of this machine).
    cores : int, optional
        Threads per worker (default 1).
    memory : str or int, optional
        Memory limit per worker (default: dask's ``"auto"``).
    env : dict, optional
        Environment variables of the worker ranks.
    python : str, optional
        Interpreter of launched worker ranks (default: this one).
    launcher : {"mpirun", "srun"}, optional
        How to launch worker ranks (default: ``srun`` inside a SLURM allocation, else
        ``mpirun``). Launched ranks do not initialise MPI, so a bare ``srun`` works.
    launcher_args : list of str, optional
        Extra arguments for the launcher (a hostfile, ``--mpi=pmix``, ...).
    interface : str, optional
        Network interface the scheduler and workers listen on (``"ib0"``); default: the
        address of each rank's host name.
    startup_timeout : float, optional
        Seconds to wait for the scheduler and all workers (default 60).
    security : bool or Security, optional
        TLS with a certificate made for the run (default), False for plain TCP.

    Raises
    ------
    BackendUnavailableError
        Under mpirun with fewer than 3 ranks (on every rank); without mpirun, when neither
        ``mpirun`` nor ``srun`` is found.

    """

    backend_name: ClassVar[str] = "mpi"
    backend_option_names: ClassVar[frozenset[str]] = frozenset(
        {"launcher", "launcher_args", "interface", "startup_timeout"}
    )
    networked: ClassVar[bool] = True

    def __init__(self, backend: str | None = None, /, **options: Any) -> None:
        #: The link to the other ranks under mpirun; None when this executor launches its ranks.
        self.world: MPIWorld | None = None
        self._cluster_id: int | None = None
        self._worker_count = 0
        if mpi_world_size() > 1:
            self.world = join_world()  # on ranks other than 0, serves and exits the process
        super().__init__(backend, **options)
        if self.world is not None:
            self.world.executors.add(self)

    # -- what a backend provides -----------------------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why MPI cannot run here, or None."""
        if importlib.util.find_spec("mpi4py") is None:
            return "mpi4py is not installed (pip install 'futures_hpc[mpi]')"
        if mpi_world_size() > 1:
            return None
        if shutil.which("mpirun") is None and not _inside_slurm_allocation():
            return "neither mpirun on PATH nor a SLURM allocation with srun"
        return None

    @property
    def mode(self) -> str:
        """``"world"`` under mpirun, ``"launched"`` when this executor launched its ranks."""
        return "world" if self.world is not None else "launched"

    def _validate_options(self) -> None:
        options = self.backend_options
        launcher = options.get("launcher")
        if launcher not in (None, "mpirun", "srun"):
            raise OptionError(f"launcher={launcher!r} is not allowed; use 'mpirun' or 'srun'")
        launcher_args = options.get("launcher_args", [])
        if isinstance(launcher_args, str) or not all(
            isinstance(argument, str) for argument in launcher_args
        ):
            raise OptionError(
                f"launcher_args={launcher_args!r} is not allowed; give a list of strings"
            )
        interface = options.get("interface")
        if interface is not None and (not isinstance(interface, str) or not interface):
            raise OptionError(f"interface={interface!r} is not allowed; give a name like 'ib0'")
        timeout = options.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise OptionError(
                f"startup_timeout={timeout!r} is not allowed; give a number of seconds > 0"
            )
        ignored = sorted(set(self.resources.given()) & set(_IGNORED_OPTIONS))
        if ignored:
            logger.info("the mpi backend ignores the options %s", ", ".join(ignored))
        if self.world is not None:
            available = self.world.worker_rank_count
            if self.max_workers is not None and self.max_workers > available:
                raise OptionError(
                    f"max_workers={self.max_workers} but this mpirun has {available} worker "
                    f"ranks ({self.world.size} ranks: the client, the scheduler and "
                    f"{available} workers)"
                )
            if launcher is not None or launcher_args:
                logger.info("under mpirun the options launcher and launcher_args are ignored")
            self._worker_count = self.max_workers or available
        else:
            self._worker_count = self.max_workers or _default_launched_workers()
            chosen = self._launcher_name()
            if shutil.which(chosen) is None:
                raise BackendUnavailableError(
                    f"the mpi backend launches its workers with {chosen!r}, which is not on PATH"
                )

    def _planned_worker_slots(self) -> int:
        return max(1, self._worker_count) * (self.resources.cores or 1)

    @property
    def _startup_timeout(self) -> float:
        return float(self.backend_options.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT))

    def _create_cluster(self) -> MPICluster:
        if self.world is not None:
            return self._create_world_cluster(self.world)
        return self._create_launched_cluster()

    def _start_workers(self) -> None:
        if self.world is None:
            self._launch_worker_ranks()
        self._wait_for_workers()

    # -- under mpirun ------------------------------------------------------------------------------

    def _create_world_cluster(self, world: MPIWorld) -> MPICluster:
        worker_ranks = tuple(range(SCHEDULER_RANK + 1, SCHEDULER_RANK + 1 + self._worker_count))
        rank_security = inline_security(self.security)

        def make_config(cluster_id: int) -> ClusterConfig:
            return ClusterConfig(
                cluster_id=cluster_id,
                name=self.run_name,
                worker_ranks=worker_ranks,
                security=rank_security,
                nthreads=self.resources.cores or 1,
                memory_limit=self.resources.memory_bytes or "auto",
                env=dict(self.resources.env or {}),
                interface=self.backend_options.get("interface"),
                several_nodes=world.several_nodes,
                dashboard_address=self.dashboard_address,
            )

        cluster_id, address = world.start_cluster(make_config, self._startup_timeout)
        self._cluster_id = cluster_id
        return MPICluster(
            security=self.security,
            scheduler_address=address,
            on_close=lambda: world.stop_cluster(cluster_id),
            name=self.run_name,
        )

    # -- launched from an ordinary process ---------------------------------------------------------

    def _launcher_name(self) -> str:
        launcher = self.backend_options.get("launcher")
        if launcher:
            return launcher
        return "srun" if _inside_slurm_allocation() else "mpirun"

    def _create_launched_cluster(self) -> MPICluster:
        interface = self.backend_options.get("interface")
        several_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1) > 1 or bool(
            self.backend_options.get("launcher_args")
        )
        listen: dict[str, Any] = (
            {"interface": interface} if interface else {"host": rank_host(several_nodes)}
        )
        return MPICluster(
            security=self.security,
            scheduler_options=dict(
                port=0,
                protocol="tls" if self.security is not None else "tcp",
                dashboard_address=self.dashboard_address,
                **listen,
            ),
            name=self.run_name,
        )

    def _launch_command(self) -> list[str]:
        launcher = self._launcher_name()
        count = str(self._worker_count)
        if launcher == "srun":
            command = [shutil.which("srun"), "-n", count, "--kill-on-bad-exit=1"]
            if self.resources.cores:
                command.append(f"--cpus-per-task={self.resources.cores}")
        else:
            command = [shutil.which("mpirun"), "-n", count, "--bind-to", "none"]
            if not _inside_slurm_allocation():
                command.append("--oversubscribe")
            for name in self._worker_environment():
                command += ["-x", name]
        command += list(self.backend_options.get("launcher_args", []))
        command += [
            self.resources.python or sys.executable,
            "-m",
            "futures_hpc.backends.mpi_worker",
            "--scheduler-address", self._cluster.scheduler_address,
            "--name", self.run_name,
            "--nthreads", str(self.resources.cores or 1),
            "--memory-limit", str(self.resources.memory_bytes or "auto"),
        ]
        if self.backend_options.get("interface"):
            command += ["--interface", self.backend_options["interface"]]
        return command

    def _worker_environment(self) -> dict[str, str]:
        """Variables the launched ranks need beyond this process's environment."""
        variables: dict[str, str] = {}
        if self.credentials is not None:
            variables.update(self.credentials.worker_environment())
        variables.update({name: str(value) for name, value in (self.resources.env or {}).items()})
        return variables

    def _launch_worker_ranks(self) -> None:
        environment = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(_LAUNCHER_VARIABLE_PREFIXES)
            or name in _KEPT_LAUNCHER_VARIABLES
        }
        environment.update(self._worker_environment())
        if os.geteuid() == 0:
            environment.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        self._cluster.launch_workers(
            self._launch_command(), environment, self.log_dir / "mpi-workers.log"
        )

    # -- both modes --------------------------------------------------------------------------------

    def _wait_for_workers(self) -> None:
        """Wait until every worker rank is connected, or raise with what went wrong."""
        deadline = time.monotonic() + self._startup_timeout
        while True:
            connected = len(self._cluster.scheduler_info["workers"])
            if connected >= self._worker_count:
                logger.info("%d MPI workers connected", connected)
                return
            if self.world is not None:
                self.world.raise_failures(self._cluster_id)
            else:
                self._cluster.check_launcher()
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"only {connected} of {self._worker_count} MPI workers connected within "
                    f"{self._startup_timeout} s (option startup_timeout)"
                )
            time.sleep(0.05)

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> bool:
        if self.world is not None and exc_type is SystemExit:
            code = exc_value.code
            if code not in (None, 0):
                self.world.exit_status = code if isinstance(code, int) else 1
        return super().__exit__(exc_type, exc_value, traceback)


def _default_launched_workers() -> int:
    tasks = os.environ.get("SLURM_NTASKS", "")
    if _inside_slurm_allocation() and tasks.isdigit():
        return int(tasks)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
