"""News of an executor's calls, relayed from the workers to its client as it happens.

For each call of an executor, a worker sends two short messages on the stream it already has
open to the scheduler, and the scheduler passes them on to the executor's client at once:

- ``started``: the call started executing (its standard future becomes RUNNING);
- its packed outcome, once the call is done, if that is at most :data:`OUTCOME_PUSH_LIMIT`
  bytes.

Without the second message the client learns from the scheduler that a task finished and then
asks the worker for the result: one more round trip, the largest part of the latency of a small
call (measured: 5.8 ms to 3.4 ms for one call on a local cluster). Larger outcomes stay on their
worker and are gathered as usual, so that bulky data never passes through the scheduler.

The scheduler relays through a stream handler that :class:`RelayToClients` installs. A scheduler
without it would close the worker's stream on the unknown message, so workers send these
messages only once the plugin is in place; otherwise ``started`` goes through dask's event log
and every outcome is gathered.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from .engine import add_scheduler_stream_handler, send_from_worker, send_to_client, stored_result
from .streams import make_worker_prompt

#: The message operation the workers, the scheduler and the client use for relayed news.
RELAY_OP = "futures_hpc-call-news"
#: Packed outcomes up to this size travel with the news; larger ones are gathered from the worker.
OUTCOME_PUSH_LIMIT = 64 * 1024


class RelayToClients(SchedulerPlugin):
    """Scheduler plugin: pass the workers' :data:`RELAY_OP` messages on to the named client."""

    name = "futures_hpc-relay-to-clients"
    #: One instance per scheduler: registering it again (another executor) keeps the first.
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        """Install the stream handler for :data:`RELAY_OP` messages from workers."""
        self.scheduler = scheduler
        add_scheduler_stream_handler(scheduler, RELAY_OP, self.relay)

    def relay(
        self, client: str, key: str, outcome: bytes | None = None, worker: str | None = None
    ) -> None:
        """Send one worker's news of ``key`` to ``client``, if it is still connected."""
        send_to_client(self.scheduler, client, {"op": RELAY_OP, "key": key, "outcome": outcome})


class CallNewsPlugin(WorkerPlugin):
    """Worker plugin that sends news of one executor's calls to its client.

    Parameters
    ----------
    key_marker : str
        Only tasks whose key contains this marker (the executor's run name) are reported.
    topic : str
        The plugin's name, and the event topic ``started`` goes to when ``client_id`` is None.
    client_id : str or None
        The executor's client, when the scheduler relays (:class:`RelayToClients` installed):
        then ``started`` and small outcomes are sent as :data:`RELAY_OP` messages.

    """

    def __init__(self, key_marker: str, topic: str, client_id: str | None = None) -> None:
        self.key_marker = key_marker
        self.topic = topic
        self.name = topic
        self.client_id = client_id
        self.worker: Any = None

    def setup(self, worker: Any) -> None:  # noqa: D102
        self.worker = worker
        make_worker_prompt(worker)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        """Send news when one of the executor's tasks starts executing, or has its outcome.

        dask calls this inside the worker's state machine, before the worker sends the
        scheduler its own message that the task finished: the outcome therefore reaches the
        client before the scheduler's word that the task is done.
        """
        if not (isinstance(key, str) and self.key_marker in key):
            return
        if finish == "executing":
            if self.client_id is None:
                self.worker.log_event(self.topic, key)
            else:
                self._send(key, None)
        elif finish == "memory" and start == "executing" and self.client_id is not None:
            try:
                outcome = stored_result(self.worker, key)
            except Exception:  # spilled or gone: the client gathers it
                return
            if isinstance(outcome, bytes) and len(outcome) <= OUTCOME_PUSH_LIMIT:
                self._send(key, outcome)

    def _send(self, key: str, outcome: bytes | None) -> None:
        send_from_worker(
            self.worker, {"op": RELAY_OP, "client": self.client_id, "key": key, "outcome": outcome}
        )
