"""The client rank's side of an ``mpirun`` world: it starts and stops workers on the others.

Under ``mpirun -n N python script.py`` every rank calls :func:`join_world` (``MPIExecutor()``
does). Rank 0 gets the :class:`MPIWorld` and runs the script, and each executor's client and
scheduler in its own process; the other ranks run workers for those schedulers
(:func:`~futures_hpc.backends.mpi_worker.serve_world`) and end with rank 0's exit status.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import cleanup
from ..errors import BackendUnavailableError
from . import mpi_world_size
from .mpi_worker import (
    ACK_TAG,
    CLIENT_RANK,
    COMMAND_TAG,
    MIN_WORLD_SIZE,
    REPORT_TAG,
    ClusterConfig,
    barrier,
    receive_ready,
    send,
    serve_world,
)

if TYPE_CHECKING:
    from mpi4py import MPI

logger = logging.getLogger("futures_hpc")

#: Seconds the ranks have to close a stopped cluster, or launched workers to exit, before this
#: process stops waiting (and, for launched workers, kills them).
STOP_TIMEOUT = 15.0


# -- the client rank's side of the world ------------------------------------------------------


class MPIWorld:
    """The client rank's link to the other ranks of an ``mpirun``: starts and stops workers.

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
        self._finished = False
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
        """Ranks available for workers: all but the client rank, which runs the scheduler."""
        return self.size - 1

    def start_cluster(self, make_config: Callable[[int], ClusterConfig]) -> int:
        """Start the workers of a new cluster on their ranks; return the cluster id.

        The scheduler already runs in this process; the workers connect to it by themselves.
        :meth:`raise_failures` reports ranks whose worker failed to start.

        Parameters
        ----------
        make_config : callable
            Called with the new cluster id; returns the :class:`ClusterConfig` to send.

        Raises
        ------
        BackendUnavailableError
            If the ranks have already been told to exit.

        """
        with self._lock:
            self._check_open()
            cluster_id = next(self._cluster_ids)
            send(self.comm, ("start", make_config(cluster_id)), self.other_ranks, COMMAND_TAG)
        logger.info("MPI cluster %d: workers starting on ranks %s", cluster_id,
                    list(self.other_ranks))
        return cluster_id

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
        """Close the cluster's workers on the ranks; wait until they are closed."""
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
        if waiting:
            logger.warning(
                "MPI ranks %s did not confirm within %s s that cluster %d is closed",
                sorted(waiting), timeout, cluster_id,
            )

    def finish(self) -> None:
        """Tell every rank to exit with this process's status (run at exit; once)."""
        if self._finished:
            return
        cleanup.close_all_now()  # the executors first: their ranks are still serving
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

    On every other rank, serve workers and exit the process (never return). Collective: every
    rank must call it (``MPIExecutor()`` does).

    Raises
    ------
    BackendUnavailableError
        On every rank, if the world has fewer than 2 ranks, or if mpi4py sees fewer ranks than
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
            f"MPIExecutor needs at least {MIN_WORLD_SIZE} MPI ranks (rank 0 runs your script "
            f"and the dask scheduler, ranks 1.. the workers), but this world has {size}. "
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
