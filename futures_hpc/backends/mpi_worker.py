"""The rank side of the MPI backend: dask workers on MPI ranks, and the protocol that drives them.

Two ways in:

- **Under** ``mpirun -n N python script.py``: every rank runs the user's script. The client rank
  (0) returns from ``MPIExecutor()`` and runs, in its own process, each executor's client and
  dask scheduler; every other rank calls :func:`serve_world` from there and never returns. It
  waits for commands from the client rank and runs, for each executor the client creates, a dask
  worker connected to that executor's scheduler, until the client stops that executor. When the
  client process ends, it sends every rank its exit status and each rank exits with it (0, or 1
  if the client raised).
- **Launched** by an ``MPIExecutor`` in an ordinary process: ``mpirun -n N python -m
  futures_hpc.backends.mpi_worker --scheduler-address ...`` (or ``srun``) runs :func:`main` on
  each rank, a dask worker that ends when the scheduler closes it.

Messages travel on a duplicate of ``MPI.COMM_WORLD`` (so they never mix with the user's own), as
pickled tuples. Every wait is a non-blocking probe followed by a short sleep: a blocking MPI call
spins a core at 100 %, which idle ranks must not do on shared nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import distributed
from distributed.security import Security
from distributed.utils import get_ip

from ..dask_settings import apply_dask_settings
from ..streams import make_worker_prompt

if TYPE_CHECKING:
    from mpi4py import MPI

logger = logging.getLogger("futures_hpc")

#: The rank that runs the user's script, the executor's client and its dask scheduler.
CLIENT_RANK = 0
#: The client rank (with the scheduler) + at least one worker rank.
MIN_WORLD_SIZE = 2

#: Commands from the client rank: ("start", config), ("stop", cluster_id, sequence),
#: ("exit", status).
COMMAND_TAG = 7301
#: To the client rank: ("stopped", cluster_id, sequence, rank) once a rank's servers are closed.
ACK_TAG = 7303
#: To the client rank: ("failed", cluster_id, rank, text) when a rank's server failed to start.
REPORT_TAG = 7304

#: Seconds between two probes for a message.
POLL_INTERVAL = 0.01
#: The longest wait between two probes for the client rank's next command: the wait grows from
#: :data:`POLL_INTERVAL` to this while no command comes, so that a worker rank busy running calls
#: (its worker shares the event loop) or idle between executors wakes up less often.
LONGEST_COMMAND_POLL_INTERVAL = 0.05
#: Seconds a rank has to close its servers and finish MPI once told to exit; then SIGALRM ends it.
EXIT_GRACE_SECONDS = 20
#: Seconds a worker keeps trying to reach a scheduler that went away before it closes itself.
DEATH_TIMEOUT = 60


# -- messages -------------------------------------------------------------------------------------


def receive_ready(comm: MPI.Comm, source: int, tag: int) -> Any | None:
    """Return a message from ``source`` (any rank: ``MPI.ANY_SOURCE``) with ``tag``, or None."""
    message = comm.improbe(source=source, tag=tag)
    return None if message is None else message.recv()


async def receive_async(
    comm: MPI.Comm, source: int, tag: int, longest_interval: float = POLL_INTERVAL
) -> Any:
    """Wait for the next message from ``source`` with ``tag`` without spinning; return it.

    Probes without blocking and yields to the event loop between probes: every
    :data:`POLL_INTERVAL` seconds at first, then less and less often, up to every
    ``longest_interval`` seconds.
    """
    interval = POLL_INTERVAL
    while True:
        message = comm.improbe(source=source, tag=tag)
        if message is not None:
            return message.recv()
        await asyncio.sleep(interval)
        interval = min(longest_interval, interval * 1.5)


def barrier(comm: MPI.Comm) -> None:
    """Wait until every rank of ``comm`` is here, sleeping between checks instead of spinning."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(POLL_INTERVAL)


def send(comm: MPI.Comm, message: Any, destinations: Iterable[int], tag: int,
         timeout: float = 60.0) -> None:
    """Send ``message`` to every rank in ``destinations`` and wait until the sends complete.

    Raises
    ------
    TimeoutError
        If a destination did not take the message within ``timeout`` seconds.

    """
    from mpi4py import MPI

    requests = [comm.isend(message, dest=destination, tag=tag) for destination in destinations]
    deadline = time.monotonic() + timeout
    while not MPI.Request.testall(requests)[0]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks did not take a message with tag {tag} in {timeout} s")
        time.sleep(0.001)


async def send_async(
    comm: MPI.Comm, message: Any, destinations: Iterable[int], tag: int
) -> None:
    """Like :func:`send`, but yield to the event loop while the sends complete."""
    from mpi4py import MPI

    requests = [comm.isend(message, dest=destination, tag=tag) for destination in destinations]
    while not MPI.Request.testall(requests)[0]:
        await asyncio.sleep(0.001)


# -- what a rank needs to run its part of a cluster ----------------------------------------------


@dataclass(frozen=True)
class ClusterConfig:
    """Everything the ranks need to run one executor's cluster; sent by the client rank.

    Attributes
    ----------
    cluster_id : int
        Numbers the clusters of one ``mpirun``; messages of a stopped cluster are ignored.
    scheduler_address : str
        The address of the cluster's scheduler, which runs in the client rank's process.
    name : str
        The executor's run name; workers are named ``<name>-rank-<rank>``.
    worker_ranks : tuple of int
        The ranks that run a worker (the others stay idle).
    security : distributed.security.Security or None
        TLS for scheduler and workers, with the PEM contents inline (no shared file needed).
    nthreads : int
        Threads per worker.
    memory_limit : int or str
        Memory limit per worker, in bytes, or ``"auto"``.
    env : dict of str to str
        Environment variables set in the worker ranks while the cluster runs.
    interface : str or None
        Network interface (``"ib0"``) the workers listen on; default: the address of the rank's
        host name (any non-loopback address when the ranks span several nodes).
    several_nodes : bool
        Whether the ranks run on more than one node.

    """

    cluster_id: int
    scheduler_address: str
    name: str
    worker_ranks: tuple[int, ...]
    security: Security | None
    nthreads: int = 1
    memory_limit: int | str = "auto"
    env: Mapping[str, str] = field(default_factory=dict)
    interface: str | None = None
    several_nodes: bool = False


def rank_host(several_nodes: bool) -> str:
    """The address a server on this rank listens on: the rank's host, reachable by the others.

    The address of the host name, unless that is a loopback address while other ranks run on
    other nodes; then the address of the interface that routes outwards.
    """
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return get_ip()
    if several_nodes and ipaddress.ip_address(address).is_loopback:
        return get_ip()
    return address


def inline_security(security: Security | None) -> Security | None:
    """A copy of ``security`` with the PEM contents instead of file paths, for other nodes."""
    if security is None:
        return None
    fields = {}
    for name in Security.__slots__:
        value = getattr(security, name)
        if (
            name.startswith("tls_") and (name.endswith(("_cert", "_key")) or name == "tls_ca_file")
            and isinstance(value, str) and "\n" not in value and os.path.isfile(value)
        ):
            with open(value) as handle:
                value = handle.read()
        fields[name] = value
    return Security(**fields)


@contextlib.contextmanager
def environment_set(variables: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the old values."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update({name: str(value) for name, value in variables.items()})
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_prompt(worker: distributed.Worker) -> distributed.Worker:
    """Make a new worker's stream to the scheduler send without waiting; return the worker."""
    make_worker_prompt(worker)
    return worker


def _protocol(security: Security | None) -> str:
    return "tls" if security is not None else "tcp"


def _listen_options(config: ClusterConfig) -> dict[str, Any]:
    if config.interface:
        return {"interface": config.interface}
    return {"host": rank_host(config.several_nodes)}


# -- the non-client ranks under mpirun -----------------------------------------------------------


class _RankServer:
    """One worker rank: runs a worker of every cluster the client rank starts that names it."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.stop_events: dict[int, asyncio.Event] = {}
        self.servers: dict[int, asyncio.Task] = {}
        self.background: set[asyncio.Task] = set()

    async def run(self) -> int:
        """Serve commands until the client rank says exit; return the exit status it sent."""
        try:
            while True:
                command = await receive_async(
                    self.comm, CLIENT_RANK, COMMAND_TAG, LONGEST_COMMAND_POLL_INTERVAL
                )
                kind = command[0]
                if kind == "start":
                    self._start(command[1])
                elif kind == "stop":
                    self._spawn(self._stop(command[1], command[2]))
                elif kind == "exit":
                    return int(command[1])
                else:
                    logger.error("rank %d: unknown command %r", self.rank, command)
        finally:
            for event in self.stop_events.values():
                event.set()
            if self.servers:
                await asyncio.wait(list(self.servers.values()), timeout=EXIT_GRACE_SECONDS / 2)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _start(self, config: ClusterConfig) -> None:
        if self.rank not in config.worker_ranks:
            return  # an idle rank for this cluster (max_workers below the ranks given)
        self.stop_events[config.cluster_id] = asyncio.Event()
        self.servers[config.cluster_id] = asyncio.ensure_future(self._serve(config))

    async def _stop(self, cluster_id: int, sequence: int) -> None:
        event = self.stop_events.get(cluster_id)
        if event is not None:
            event.set()
        server = self.servers.get(cluster_id)
        if server is not None:
            await asyncio.wait([server])
        self.servers.pop(cluster_id, None)
        self.stop_events.pop(cluster_id, None)
        await send_async(
            self.comm, ("stopped", cluster_id, sequence, self.rank), [CLIENT_RANK], ACK_TAG
        )

    async def _serve(self, config: ClusterConfig) -> None:
        try:
            await self._serve_worker(config)
        except Exception as error:
            text = "".join(traceback.format_exception(error))
            logger.error("rank %d failed in cluster %s:\n%s", self.rank, config.name, text)
            await send_async(
                self.comm, ("failed", config.cluster_id, self.rank, text), [CLIENT_RANK],
                REPORT_TAG,
            )

    async def _until_stopped(self, config: ClusterConfig, server: Any) -> None:
        stop = asyncio.ensure_future(self.stop_events[config.cluster_id].wait())
        finished = asyncio.ensure_future(server.finished())
        await asyncio.wait([stop, finished], return_when=asyncio.FIRST_COMPLETED)
        finished.cancel()
        await self.stop_events[config.cluster_id].wait()  # stay until the client says stop

    async def _serve_worker(self, config: ClusterConfig) -> None:
        apply_dask_settings()  # as the client's rank does (futures_hpc.dask_settings)
        with environment_set(config.env):
            worker = make_prompt(distributed.Worker(
                config.scheduler_address,
                name=f"{config.name}-rank-{self.rank}",
                nthreads=config.nthreads,
                memory_limit=config.memory_limit,
                security=config.security,
                protocol=_protocol(config.security),
                death_timeout=DEATH_TIMEOUT,
                dashboard=False,
                **_listen_options(config),
            ))
            await worker
            try:
                await self._until_stopped(config, worker)
            finally:
                await worker.close(
                    timeout=10, executor_wait=False,
                    reason="futures_hpc: the executor was shut down",
                )


def serve_world(comm: MPI.Comm) -> NoReturn:
    """Serve the client rank's clusters' workers on this rank, then exit the process.

    Called by ``MPIExecutor()`` on every rank but the client rank. Returns never: when the client
    process ends, this rank exits with the status the client sent (0 after a normal end, 1 after
    an uncaught exception) by raising :class:`SystemExit` from here. If closing the servers or
    finishing MPI then takes longer than :data:`EXIT_GRACE_SECONDS`, SIGALRM ends the process.
    """
    logging.getLogger("distributed").setLevel(
        max(logging.WARNING, logging.getLogger("distributed").getEffectiveLevel())
    )
    status = 1
    try:
        status = asyncio.run(_RankServer(comm).run())
    finally:
        signal.alarm(EXIT_GRACE_SECONDS)
        logger.debug("rank %d exits with status %d", comm.Get_rank(), status)
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(status)


# -- workers launched by an MPIExecutor in an ordinary process ----------------------------------


def launcher_rank() -> int:
    """Return the rank mpirun or srun gave this process (0 when they set none)."""
    for variable in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        value = os.environ.get(variable)
        if value and value.isdigit():
            return int(value)
    return 0


def _parse_memory_limit(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def build_argument_parser() -> argparse.ArgumentParser:
    """The command line of a launched worker rank."""
    parser = argparse.ArgumentParser(
        prog="python -m futures_hpc.backends.mpi_worker",
        description="A dask worker on one rank started by mpirun or srun for an MPIExecutor. "
        "TLS settings come from DASK_DISTRIBUTED__COMM__* environment variables.",
    )
    parser.add_argument("--scheduler-address", required=True)
    parser.add_argument("--name", required=True, help="prefix of the worker names")
    parser.add_argument("--nthreads", type=int, default=1)
    parser.add_argument("--memory-limit", type=_parse_memory_limit, default="auto")
    parser.add_argument("--interface", default=None)
    parser.add_argument("--death-timeout", type=float, default=DEATH_TIMEOUT)
    return parser


async def _run_launched_worker(arguments: argparse.Namespace) -> None:
    rank = launcher_rank()
    if arguments.interface:
        listen: dict[str, Any] = {"interface": arguments.interface}
    else:
        scheduler_host = arguments.scheduler_address.split("://")[-1].rsplit(":", 1)[0]
        try:
            single_node = ipaddress.ip_address(scheduler_host.strip("[]")).is_loopback
        except ValueError:
            single_node = False
        listen = {"host": rank_host(several_nodes=not single_node)}
    apply_dask_settings()
    worker = make_prompt(distributed.Worker(
        arguments.scheduler_address,
        name=f"{arguments.name}-rank-{rank}",
        nthreads=arguments.nthreads,
        memory_limit=arguments.memory_limit,
        death_timeout=arguments.death_timeout,
        dashboard=False,
        **listen,
    ))
    async with worker:
        await worker.finished()


def main(argv: list[str] | None = None) -> int:
    """Run one launched worker rank until the scheduler closes it; return the exit status."""
    arguments = build_argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_run_launched_worker(arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
