"""The MPI backend: dask workers on MPI ranks, through mpi4py; the scheduler beside the client.

Two modes, chosen from the environment:

- **Under mpirun** (``mpirun -n N python script.py``, or ``srun --mpi=pmix``): every rank runs the
  script. Rank 0 is the client: ``MPIExecutor()`` returns there and the ``with`` body runs; the
  dask scheduler runs in that process too, on the cluster's event loop thread (as the local
  backend's does). Ranks 1.. run one worker each: on those ranks ``MPIExecutor()`` serves
  (:func:`~futures_hpc.backends.mpi_worker.serve_world`) and ends the process when rank 0's
  process ends, with status 0, or 1 on every rank if rank 0 ended with an uncaught exception.
  Each executor that rank 0 creates gets a scheduler and workers of its own.
- **From an ordinary process**: ``MPIExecutor(max_workers=4)`` runs the scheduler in this process
  and launches 4 worker ranks with ``mpirun`` (or ``srun`` inside a SLURM allocation), which it
  ends on shutdown.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import time
from typing import Any, ClassVar

from ..dask_settings import worker_environment as dask_worker_environment
from ..errors import BackendUnavailableError, OptionError, refuse_pools
from ..executor import HPCExecutor
from ..import_path import pythonpath_value
from ..provider import BackendProvider
from . import mpi_world_size
from .mpi_cluster import MPICluster
from .mpi_worker import CLIENT_RANK, ClusterConfig, inline_security, rank_host
from .mpi_world import MPIWorld, join_world

logger = logging.getLogger("futures_hpc")

#: Seconds to wait for the scheduler and every worker of a new cluster (option startup_timeout).
DEFAULT_STARTUP_TIMEOUT = 60.0

#: Common options that mean nothing for MPI ranks; accepted (a profile may set them) and logged.

#: Variables by which a process launched by mpirun/srun knows its job; a nested launcher must
#: not inherit them.
_LAUNCHER_VARIABLE_PREFIXES = ("OMPI_", "PMIX_", "PMI_")
_KEPT_LAUNCHER_VARIABLES = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")



def _inside_slurm_allocation() -> bool:
    return "SLURM_JOB_ID" in os.environ and shutil.which("srun") is not None


class MPIProvider(BackendProvider):
    """Workers on MPI ranks: those of this ``mpirun``, or ranks this executor launches."""

    name: ClassVar[str] = "mpi"
    option_names: ClassVar[frozenset[str]] = frozenset(
        {"launcher", "launcher_args", "interface", "startup_timeout"}
    )
    networked: ClassVar[bool] = True

    def check_pool(self, shape: Any) -> None:
        """Refuse pools: the workers are the ranks ``mpirun`` started, all of one size."""
        raise refuse_pools(self.name, "its workers are the ranks of one mpirun, all of one "
                           "size; start the calls that need another size in an executor of "
                           "another backend (e.g. HPCExecutor('slurm', cores=...))")

    def __init__(self, executor: Any) -> None:
        super().__init__(executor)
        #: The link to the other ranks under mpirun; None when this executor launches its ranks.
        self.world: MPIWorld | None = None
        self._cluster_id: int | None = None
        self._worker_count = 0
        if mpi_world_size() > 1:
            self.world = join_world()  # on ranks other than 0, serves and exits the process

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

    def check_options(self) -> None:
        """Check the launcher options, and max_workers against the ranks there are."""
        options = self.executor.backend_options
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
        if self.world is not None:
            available = self.world.worker_rank_count
            if self.executor.max_workers is not None and self.executor.max_workers > available:
                raise OptionError(
                    f"max_workers={self.executor.max_workers} but this mpirun has {available} "
                    f"worker ranks ({self.world.size} ranks: the client with the scheduler, and "
                    f"{available} workers)"
                )
            if launcher is not None or launcher_args:
                logger.info("under mpirun the options launcher and launcher_args are ignored")
            self._worker_count = self.executor.max_workers or available
        else:
            self._worker_count = self.executor.max_workers or _default_launched_workers()
            chosen = self._launcher_name()
            if shutil.which(chosen) is None:
                raise BackendUnavailableError(
                    f"the mpi backend launches its workers with {chosen!r}, which is not on PATH"
                )

    def planned_worker_slots(self) -> int:
        """One slot per thread of each worker rank."""
        return max(1, self._worker_count) * (self.executor.resources.cores or 1)

    @property
    def _startup_timeout(self) -> float:
        return float(self.executor.backend_options.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT))

    def create_cluster(self) -> MPICluster:
        """Start the scheduler in this process (the client rank's, under mpirun)."""
        interface = self.executor.backend_options.get("interface")
        if self.world is not None:
            several_nodes = self.world.several_nodes
        else:
            several_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1) > 1 or bool(
                self.executor.backend_options.get("launcher_args")
            )
        listen: dict[str, Any] = (
            {"interface": interface} if interface else {"host": rank_host(several_nodes)}
        )
        return MPICluster(
            security=self.executor.security,
            scheduler_options=dict(
                port=0,
                protocol="tls" if self.executor.security is not None else "tcp",
                dashboard_address=self.executor.dashboard_address,
                **listen,
            ),
            on_close=self._stop_world_workers,
            name=self.executor.run_name,
        )

    def start_workers(self) -> None:
        """Start the workers on the other ranks, or launch worker ranks; wait until all connect."""
        if self.world is not None:
            self._start_world_workers(self.world)
        else:
            self._launch_worker_ranks()
        self._wait_for_workers()

    # -- under mpirun ------------------------------------------------------------------------------

    def _start_world_workers(self, world: MPIWorld) -> None:
        worker_ranks = tuple(range(CLIENT_RANK + 1, CLIENT_RANK + 1 + self._worker_count))
        rank_security = inline_security(self.executor.security)
        scheduler_address = self.executor.cluster.scheduler_address

        def make_config(cluster_id: int) -> ClusterConfig:
            return ClusterConfig(
                cluster_id=cluster_id,
                scheduler_address=scheduler_address,
                name=self.executor.run_name,
                worker_ranks=worker_ranks,
                security=rank_security,
                nthreads=self.executor.resources.cores or 1,
                memory_limit=self.executor.resources.memory_bytes or "auto",
                env=dict(self.executor.resources.env or {}),
                interface=self.executor.backend_options.get("interface"),
                several_nodes=world.several_nodes,
            )

        self._cluster_id = world.start_cluster(make_config)

    def _stop_world_workers(self) -> None:
        """Stop this executor's workers on the ranks (the cluster closed); they stay serving."""
        if self.world is not None and self._cluster_id is not None:
            self.world.stop_cluster(self._cluster_id)

    # -- launched from an ordinary process ---------------------------------------------------------

    def _launcher_name(self) -> str:
        launcher = self.executor.backend_options.get("launcher")
        if launcher:
            return launcher
        return "srun" if _inside_slurm_allocation() else "mpirun"

    def _launch_command(self) -> list[str]:
        launcher = self._launcher_name()
        count = str(self._worker_count)
        if launcher == "srun":
            command = [shutil.which("srun"), "-n", count, "--kill-on-bad-exit=1"]
            if self.executor.resources.cores:
                command.append(f"--cpus-per-task={self.executor.resources.cores}")
        else:
            command = [shutil.which("mpirun"), "-n", count, "--bind-to", "none"]
            if not _inside_slurm_allocation():
                command.append("--oversubscribe")
            for name in self._worker_environment():
                command += ["-x", name]
        command += list(self.executor.backend_options.get("launcher_args", []))
        command += [
            self.executor.resources.python or sys.executable,
            "-m",
            "futures_hpc.backends.mpi_worker",
            "--scheduler-address", self.executor.cluster.scheduler_address,
            "--name", self.executor.run_name,
            "--nthreads", str(self.executor.resources.cores or 1),
            "--memory-limit", str(self.executor.resources.memory_bytes or "auto"),
        ]
        if self.executor.backend_options.get("interface"):
            command += ["--interface", self.executor.backend_options["interface"]]
        return command

    def _worker_environment(self) -> dict[str, str]:
        """Variables the launched ranks need beyond this process's environment."""
        variables = dask_worker_environment()
        if self.executor.credentials is not None:
            variables.update(self.executor.credentials.worker_environment())
        if self.executor.import_path:  # the client's own modules (futures_hpc.import_path)
            inherited = os.environ.get("PYTHONPATH")
            variables["PYTHONPATH"] = pythonpath_value(
                self.executor.import_path + ([inherited] if inherited else [])
            )
        environment = self.executor.resources.env or {}
        variables.update({name: str(value) for name, value in environment.items()})
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
        self.executor.cluster.launch_workers(
            self._launch_command(), environment, self.executor.log_dir / "mpi-workers.log"
        )

    # -- both modes --------------------------------------------------------------------------------

    def _wait_for_workers(self) -> None:
        """Wait until every worker rank is connected, or raise with what went wrong."""
        deadline = time.monotonic() + self._startup_timeout
        while True:
            connected = len(self.executor.cluster.scheduler_info["workers"])
            if connected >= self._worker_count:
                logger.info("%d MPI workers connected", connected)
                return
            if self.world is not None and self._cluster_id is not None:
                self.world.raise_failures(self._cluster_id)
            else:
                self.executor.cluster.check_launcher()
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"only {connected} of {self._worker_count} MPI workers connected within "
                    f"{self._startup_timeout} s (option startup_timeout)"
                )
            time.sleep(0.05)

    def on_exit(self, exc_type: type[BaseException] | None, exc_value: Any) -> None:
        """Under mpirun, a ``sys.exit(code)`` in the block becomes every rank's exit status."""
        if self.world is not None and exc_type is SystemExit:
            code = exc_value.code
            if code not in (None, 0):
                self.world.exit_status = code if isinstance(code, int) else 1


class MPIExecutor(HPCExecutor):
    """Executor whose dask workers run on MPI ranks, its scheduler in this process.

    Under ``mpirun -n N`` (N >= 2): rank 0 runs the script, this executor's client and its
    scheduler, ranks 1..N-1 one worker each; on ranks 1.. this constructor never returns, and
    they exit when rank 0's process ends. From an ordinary process: the scheduler runs here and
    ``max_workers`` worker ranks are launched with ``mpirun`` (``srun`` inside a SLURM
    allocation) and ended on shutdown.

    Other Parameters
    ----------------
    max_workers : int, optional
        Under mpirun: how many of the N-1 worker ranks to use (default: all). Otherwise: how many
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
        Under mpirun when MPI sees fewer than 2 ranks (on every rank); without mpirun, when neither
        ``mpirun`` nor ``srun`` is found.

    """

    provider = MPIProvider

    @property
    def world(self) -> MPIWorld | None:
        """The link to the other ranks under mpirun; None when this executor launched its ranks."""
        return self._backend.world

    @property
    def mode(self) -> str:
        """``"world"`` under mpirun, ``"launched"`` when this executor launched its ranks."""
        return self._backend.mode


def _default_launched_workers() -> int:
    tasks = os.environ.get("SLURM_NTASKS", "")
    if _inside_slurm_allocation() and tasks.isdigit():
        return int(tasks)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
