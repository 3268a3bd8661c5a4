"""Fast message streams between the client, the scheduler and the workers.

- Prompt streams: distributed holds outgoing messages for 2 to 10 ms to batch them. Every call
  waits for that several times on its way out and back (client -> scheduler -> worker ->
  scheduler -> client), which is most of the latency of a small map. futures_hpc batches calls
  into chunks itself, so it asks for streams that send at once; messages that pile up while one
  is being sent still go together.
- In-process link: where the scheduler runs in the executor's own process (the local, batch and
  ECS backends), the client talks to it through dask's ``inproc`` transport instead of a socket
  to itself. Each message between them is otherwise encoded, written, read and decoded (and,
  with TLS, encrypted and decrypted) by the same thread; the workers still reach the scheduler
  over the network, with TLS where configured.
"""

from __future__ import annotations

from typing import Any

import distributed
from distributed.deploy import Cluster
from distributed.diagnostics.plugin import SchedulerPlugin

from .engine import set_scheduler_stream_intervals, set_stream_interval

#: The batching delay, in seconds, of every stream of an executor's cluster.
STREAM_INTERVAL = 0.0


def make_worker_prompt(worker: distributed.Worker) -> None:
    """Make a worker's stream to the scheduler send without waiting."""
    set_stream_interval(worker, STREAM_INTERVAL)


def make_client_prompt(client: distributed.Client) -> None:
    """Make a client's stream to the scheduler send without waiting."""
    set_stream_interval(client, STREAM_INTERVAL)


class PromptStreams(SchedulerPlugin):
    """Scheduler plugin: the scheduler's streams to workers and clients send without waiting."""

    name = "futures_hpc-prompt-streams"
    #: One instance per scheduler: registering it again (another executor) keeps the first.
    idempotent = True

    async def start(self, scheduler: Any) -> None:
        """Make the streams that exist already prompt."""
        set_scheduler_stream_intervals(scheduler, STREAM_INTERVAL)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """Make the stream to a new worker prompt (it exists when this is called)."""
        set_scheduler_stream_intervals(scheduler, STREAM_INTERVAL, worker=worker)

    def add_client(self, scheduler: Any, client: str) -> None:
        """Make the stream to a new client prompt, once the scheduler has opened it."""
        scheduler.loop.add_callback(_tune_client_stream, scheduler, client)


def _tune_client_stream(scheduler: Any, client: str) -> None:
    set_scheduler_stream_intervals(scheduler, STREAM_INTERVAL, client=client)


def in_process_scheduler_address(cluster: Cluster) -> str | None:
    """An ``inproc://`` address of ``cluster``'s scheduler, if it runs in this process.

    Opens a second listener on the scheduler (its first, the one workers use, is unchanged) and
    returns its address; None when the scheduler runs elsewhere (MPI ranks, a remote cluster).
    """
    scheduler = getattr(cluster, "scheduler", None)
    if not isinstance(scheduler, distributed.Scheduler):
        return None

    async def listen() -> str:
        await scheduler.listen("inproc://")
        return scheduler.listeners[-1].contact_address

    return cluster.sync(listen)


#: How long a scatter of the executor's client waits for a running worker: long enough to ask
#: the scheduler once (the client scatters directly to workers, and asks before its first check
#: of the time). dask's own default is its connect timeout (30 s): an adaptive executor released
#: down to no worker stalled each large call that long, twice, and ``map_blocks`` failed.
SCATTER_WAIT_SECONDS = 0.1


def connect_client(cluster: Cluster, security: Any) -> distributed.Client:
    """An executor's client: an in-process link to a scheduler in this process, else its address.

    Results come straight from the workers: the scheduler runs beside this client (or, under
    MPI, in the same allocation), so the workers are as reachable from here as from the
    scheduler, and one hop is saved on every gather.
    """
    in_process = in_process_scheduler_address(cluster)
    if in_process is None:
        return distributed.Client(
            cluster, security=security, set_as_default=False, direct_to_workers=True
        )
    client = distributed.Client(
        in_process,
        loop=cluster.loop,
        security=security,
        set_as_default=False,
        direct_to_workers=True,
    )
    client.cluster = cluster  # as Client(cluster) does: dashboard link, scheduler identity
    return client
