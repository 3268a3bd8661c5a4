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

A task of packed calls (:func:`futures_hpc.calls.run_calls`) also sends the outcomes of its
calls as they finish, at most one message per :data:`NEWS_INTERVAL`, then less often as the task
goes on (:class:`TaskNews`): each call's future completes at once rather than with the whole
task, and the scheduler remembers which calls of the task finished. If the worker dies, dask
runs the task again on another worker; the scheduler first tells that worker which calls
finished (a :data:`FINISHED_OP` message, sent before the task itself), and the task skips them,
so that no finished call runs twice. Outcomes still waiting for their message when the task ends
come with its result; an outcome larger than :data:`OUTCOME_PUSH_LIMIT` is never sent ahead (its
call counts as unfinished). A chunk of ``map`` sends no such news; told that it ran before, it
takes the results its calls recorded in the executor's store (``store=``) instead of running them
again.

The scheduler relays through a stream handler that :class:`RelayToClients` installs. A scheduler
without it would close the worker's stream on the unknown message, so workers send these
messages only once the plugin is in place; otherwise ``started`` goes through dask's event log
and every outcome is gathered.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Collection
from typing import Any

import cloudpickle
import distributed
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from .engine import (
    add_scheduler_stream_handler,
    add_worker_stream_handler,
    send_from_worker,
    send_to_client,
    send_to_worker,
    stored_result,
)
from .streams import make_worker_prompt

#: The message operation the workers, the scheduler and the client use for relayed news.
RELAY_OP = "futures_hpc-call-news"
#: The scheduler's word to a worker: calls of a task that finished on a worker since lost.
FINISHED_OP = "futures_hpc-finished-calls"
#: Packed outcomes up to this size travel with the news; larger ones are gathered from the worker.
OUTCOME_PUSH_LIMIT = 64 * 1024
#: Seconds between a packed task's first finished call and its first message, and the least
#: between two messages. A message costs the worker, the scheduler and the client together about
#: a millisecond of CPU: one per 0.1 s keeps that near 1 % of a worker's time (one per 25 ms
#: cost 5 points of parallel efficiency on 10 ms calls), and a call's future completes at most
#: 0.1 s after the call early in a task, at most :data:`NEWS_INTERVAL_LONGEST` later on, or
#: with its task.
NEWS_INTERVAL = 0.1
#: The longest wait between two messages of one packed task: the wait doubles after each
#: message from :data:`NEWS_INTERVAL` up to this, so that a task sends a number of messages that
#: grows with the logarithm of its duration. A task that ran long as it shared its core with
#: others (64 local workers on 2 cores: 0.2 s of calls took 6 s) sent one message per 0.1 s,
#: 8 times as many as on 2 workers, each costing the client's process.
NEWS_INTERVAL_LONGEST = 1.0
#: Task states after which the scheduler forgets which of a task's calls finished.
_OVER = frozenset({"memory", "erred", "forgotten"})
#: States a processing task goes to when its worker is lost: dask will run it again.
_INTERRUPTED = frozenset({"released", "waiting", "no-worker"})

# On a worker: the calls of each task that finished before the task's earlier worker died (from
# the scheduler, taken by the task when it starts), and the plugins that send news.
_finished_elsewhere: dict[str, frozenset[int]] = {}
_news_plugins: list[CallNewsPlugin] = []


class RelayToClients(SchedulerPlugin):
    """Scheduler plugin: pass the workers' :data:`RELAY_OP` messages on to the named client."""

    name = "futures_hpc-relay-to-clients"
    #: One instance per scheduler: registering it again (another executor) keeps the first.
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Any = None
        #: The calls of each running packed task that finished, by task key.
        self.finished_calls: dict[str, set[int]] = {}
        #: The executors' tasks that started executing and are not over yet.
        self.started: set[str] = set()
        #: Those of them that were interrupted (their worker lost): dask runs them again.
        self.interrupted: set[str] = set()

    async def start(self, scheduler: Any) -> None:
        """Install the stream handler for :data:`RELAY_OP` messages from workers."""
        self.scheduler = scheduler
        add_scheduler_stream_handler(scheduler, RELAY_OP, self.relay)

    def relay(
        self, client: str, key: str, outcome: bytes | None = None, worker: str | None = None,
        calls: list[int] | None = None, outcomes: list[bytes] | None = None,
    ) -> None:
        """Send one worker's news of ``key`` to ``client``, if it is still connected.

        ``calls`` and ``outcomes``: numbers and packed outcomes of finished calls of a packed
        task, remembered until the task is over.
        """
        message = {"op": RELAY_OP, "key": key, "outcome": outcome}
        if outcome is None and calls is None:
            self.started.add(key)
        if calls is not None:
            self.finished_calls.setdefault(key, set()).update(calls)
            message["calls"] = calls
            message["outcomes"] = outcomes
        send_to_client(self.scheduler, client, message)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Tell the worker a task goes to that it ran before, and which of its calls finished.

        A task that started executing and goes back from processing (its worker was lost) is
        remembered as interrupted; when it is processing again, its new worker gets a
        :data:`FINISHED_OP` message before the task: the calls that finished (packed tasks),
        and that it ran before (a chunk of ``map`` then looks for its calls in the store).
        """
        if not (self.started or self.interrupted):
            return
        if finish == "processing":
            calls = self.finished_calls.get(key)
            if not calls and key not in self.interrupted:
                return
            self.interrupted.discard(key)
            task = self.scheduler.tasks.get(key)
            worker = getattr(getattr(task, "processing_on", None), "address", None)
            if worker is not None:
                send_to_worker(self.scheduler, worker,
                               {"op": FINISHED_OP, "key": key, "calls": sorted(calls or ())})
        elif start == "processing" and finish in _INTERRUPTED:
            if key in self.started:
                self.started.discard(key)
                self.interrupted.add(key)
        elif finish in _OVER:
            self.finished_calls.pop(key, None)
            self.started.discard(key)
            self.interrupted.discard(key)


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
        if add_worker_stream_handler(worker, FINISHED_OP, _on_finished_elsewhere) and (
                self.client_id is not None):
            _news_plugins.append(self)

    def teardown(self, worker: Any) -> None:  # noqa: D102
        if self in _news_plugins:
            _news_plugins.remove(self)

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

    def send_calls(self, key: str, calls: list[int], outcomes: list[bytes]) -> None:
        """Send the packed outcomes of finished calls of task ``key`` (on the event loop)."""
        send_from_worker(self.worker, {"op": RELAY_OP, "client": self.client_id, "key": key,
                                       "outcome": None, "calls": calls, "outcomes": outcomes})


def _on_finished_elsewhere(key: str, calls: list[int], **_: Any) -> None:
    _finished_elsewhere[key] = frozenset(calls)
    while len(_finished_elsewhere) > 10_000:  # tasks that went elsewhere after all
        del _finished_elsewhere[next(iter(_finished_elsewhere))]


class TaskNews:
    """Sends the outcomes of a packed task's calls as they finish, batched in time.

    The task's thread adds each outcome (:meth:`add`); a timer on the worker's event loop sends
    what was added, :data:`NEWS_INTERVAL` after the first outcome not sent yet, then twice as
    long after each message, up to :data:`NEWS_INTERVAL_LONGEST`. :meth:`close`, when the task
    ends, sends nothing more: what is left comes with the task's result.

    Parameters
    ----------
    plugin : CallNewsPlugin
        The executor's plugin on this worker.
    key : str
        The task's key.

    """

    def __init__(self, plugin: CallNewsPlugin, key: str) -> None:
        self._plugin = plugin
        self._key = key
        self._loop = plugin.worker.loop
        self._lock = threading.Lock()
        self._pending: list[tuple[int, Any]] = []
        self._armed = False
        self._closed = False
        self._interval = NEWS_INTERVAL

    def add(self, number: int, outcome: tuple[str, Any]) -> None:
        """Call ``number`` finished with ``outcome`` (from the task's thread)."""
        with self._lock:
            self._pending.append((number, outcome))
            if self._armed:
                return
            self._armed = True
        self._loop.add_callback(self._arm)

    def close(self) -> None:
        """The task ended: send nothing more."""
        with self._lock:
            self._closed = True
            self._pending = []

    def _arm(self) -> None:
        self._loop.call_later(self._interval, self._flush)

    def _flush(self) -> None:
        with self._lock:
            if self._closed:
                return
            pending, self._pending = self._pending, []
            self._interval = min(2 * self._interval, NEWS_INTERVAL_LONGEST)
        calls: list[int] = []
        outcomes: list[bytes] = []
        size = 0
        for index, (number, outcome) in enumerate(pending):
            try:
                packed = cloudpickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # the task's result says what went wrong
                continue
            if len(packed) > OUTCOME_PUSH_LIMIT:
                continue  # stays with the result: treated as unfinished if the worker dies
            if size + len(packed) > OUTCOME_PUSH_LIMIT and calls:
                with self._lock:  # the rest goes with the next message
                    self._pending[:0] = pending[index:]
                break
            size += len(packed)
            calls.append(number)
            outcomes.append(packed)
        with self._lock:
            if self._closed:
                return
            self._armed = bool(self._pending)
            if self._armed:
                self._loop.call_later(self._interval, self._flush)
        if calls:
            self._plugin.send_calls(self._key, calls, outcomes)


def ran_before() -> bool:
    """Whether the running task ran before, on a worker that was lost (the scheduler said so).

    False outside a worker's task, and for a task that asked already (the word is taken).
    """
    if not _finished_elsewhere:
        return False
    try:
        key = distributed.get_worker().get_current_task()
    except Exception:  # not in a worker's task
        return False
    return _finished_elsewhere.pop(key, None) is not None


def packed_task_news(calls: int) -> tuple[TaskNews | None, Collection[int]]:
    """For a task of ``calls`` packed calls running on a worker: where its news goes.

    Returns
    -------
    news : TaskNews or None
        None for a single call, outside a worker, or without the relay.
    finished : collection of int
        The calls the task's earlier worker finished before it died: the task skips them.

    """
    if calls < 2 or not _news_plugins:
        return None, ()
    try:
        worker = distributed.get_worker()
        key = worker.get_current_task()
    except Exception:  # not in a worker's task
        return None, ()
    finished = _finished_elsewhere.pop(key, ()) if _finished_elsewhere else ()
    if isinstance(key, str):
        for plugin in _news_plugins:
            if plugin.worker is worker and plugin.key_marker in key:
                return TaskNews(plugin, key), finished
    return None, finished
