"""The bridge from distributed futures to standard :class:`concurrent.futures.Future` objects.

Each call the executor sends becomes one dask task with a key of its own and one standard future.
The standard future goes through the same states as one from the standard library's executors:

- PENDING while the task waits in the scheduler's queue (``cancel()`` succeeds and the task is
  released, so it never runs);
- RUNNING once a worker starts executing the task: a small worker plugin sends word of that
  transition, relayed by the scheduler (:mod:`futures_hpc.relay`), and ``cancel()`` then
  returns False;
- FINISHED when the outcome is back: small outcomes arrive with the relayed news, just before
  the scheduler reports the task done; the others are fetched in batches, one ``gather`` for
  every task that finished since the last one. One collector thread completes the futures, and
  the dask task is released at once so that neither the worker nor the bridge holds a stale
  reference to the result.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any

import distributed
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import KilledWorker

from .calls import unpack_outcome
from .engine import add_client_stream_handler, allowed_failures, future_state_waiter
from .errors import CallMemoryError, WorkerLostError
from .memory_kills import MemoryKillRelay
from .oom_watch import OutOfMemoryWatch
from .options import format_bytes
from .relay import RELAY_OP, CallNewsPlugin, RelayToClients
from .streams import PromptStreams, make_client_prompt

logger = logging.getLogger("futures_hpc")

#: The most finished tasks fetched by one gather.
GATHER_BATCH_SIZE = 1000


@dataclass
class _Delivery:
    """Futures that finished together, and the packed outcomes gathered for the finished ones."""

    batch: list[distributed.Future]
    finished: list[distributed.Future]
    packed: list[bytes] | None


@dataclass
class _Record:
    future: Future
    dask_future: distributed.Future
    decode: Callable[[tuple[Any, ...]], Any]
    description: str
    on_calls: Callable[[list[int], list[bytes]], None] | None = None


@dataclass
class _MemoryKill:
    """A task whose worker was killed for memory (:mod:`futures_hpc.memory_kills`)."""

    record: _Record


@dataclass
class _CallsNews:
    """Finished calls of a packed task, relayed while it runs."""

    record: _Record
    calls: list[int]
    outcomes: list[bytes]


def decode_call_outcome(outcome: tuple[Any, ...]) -> Any:
    """Turn the outcome of one call into its result, or raise its exception."""
    if outcome[0] == "ok":
        return outcome[1]
    raise outcome[1]


class FutureBridge:
    """Tracks dask futures and completes the standard futures that stand for them.

    Parameters
    ----------
    client : distributed.Client
        The executor's client.
    key_marker : str
        A string in the key of every task the executor submits (its run name).

    """

    def __init__(self, client: distributed.Client, key_marker: str) -> None:
        self._client = client
        self._key_marker = key_marker
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()
        # Finished dask futures wait here, on the client's event loop, to be gathered together.
        self._ready: list[distributed.Future] = []
        self._gathering = False
        # Gathered batches go to the collector thread, which completes the standard futures
        # (so that their callbacks never run on, or block, the event loop).
        self._deliveries: queue.SimpleQueue[_Delivery | _CallsNews | _MemoryKill | None] = (
            queue.SimpleQueue())
        self._topic = f"futures_hpc-running-{client.id}"
        # Outcomes relayed from the workers, by key, until their task is reported done.
        self._relayed: dict[str, bytes] = {}
        # Tasks whose worker was killed for memory: ``{"rss", "limit", "worker"}`` by key.
        self._memory_kills: dict[str, dict[str, Any]] = {}
        make_client_prompt(client)
        self._register_scheduler_plugin(PromptStreams())
        self.relays = self._install_relay()
        self.tracks_running = self._subscribe_running()
        self._collector = threading.Thread(
            target=self._collect, name="futures_hpc-results", daemon=True
        )
        self._collector.start()

    def _register_scheduler_plugin(self, plugin: SchedulerPlugin) -> bool:
        try:
            self._client.register_plugin(plugin)
        except Exception as error:  # a scheduler without futures_hpc installed
            logger.info("scheduler plugin %s not installed: %r", plugin.name, error)
            return False
        return True

    def _install_relay(self) -> bool:
        if not add_client_stream_handler(self._client, RELAY_OP, self._on_news):
            return False  # another distributed: no relay
        if not self._register_scheduler_plugin(RelayToClients()):
            return False
        if self._register_scheduler_plugin(MemoryKillRelay()):
            try:  # the kernel's out-of-memory kills, seen by the nannies (if any)
                self._client.register_plugin(OutOfMemoryWatch())
            except Exception as error:
                logger.info("nanny plugin %s not installed: %r", OutOfMemoryWatch.name, error)
        return True

    def _subscribe_running(self) -> bool:
        client_id = self._client.id if self.relays else None
        try:
            if not self.relays:
                self._client.subscribe_topic(self._topic, self._on_running_event)
            self._client.register_plugin(CallNewsPlugin(self._key_marker, self._topic, client_id))
        except Exception as error:  # a scheduler without futures_hpc installed
            logger.warning(
                "futures will show RUNNING only when done: the worker plugin failed (%r)", error
            )
            return False
        return True

    def track(
        self,
        dask_future: distributed.Future,
        decode: Callable[[tuple[Any, ...]], Any] = decode_call_outcome,
        description: str = "",
        on_calls: Callable[[list[int], list[bytes]], None] | None = None,
    ) -> Future:
        """Return a standard future completed from ``dask_future``'s packed outcome.

        ``description`` names the call in errors that are not the call's own (a lost worker).
        ``on_calls(numbers, packed_outcomes)`` gets, on the collector thread, the finished calls
        of a packed task relayed while it runs (:class:`futures_hpc.relay.TaskNews`), before
        the task's own outcome; it is never called once the returned future is done.
        """
        future: Future = Future()
        with self._lock:
            self._records[dask_future.key] = _Record(
                future, dask_future, decode, description or dask_future.key, on_calls
            )
        future.add_done_callback(self._on_future_done)
        future._futures_hpc_key = dask_future.key  # type: ignore[attr-defined]
        self._client.loop.add_callback(self._await_done, dask_future)
        return future

    def outstanding(self) -> list[Future]:
        """The standard futures not yet done."""
        with self._lock:
            return [record.future for record in self._records.values()]

    def close(self) -> None:
        """Stop the collector thread and release every tracked task."""
        self._deliveries.put(None)
        self._collector.join(timeout=10)
        with self._lock:
            records = list(self._records.values())
            self._records.clear()
        for record in records:
            record.dask_future.release()
            if not record.future.cancel():
                _set_exception_once(
                    record.future, CancelledError("the executor's cluster was closed")
                )
        self._relayed.clear()
        if self.tracks_running and not self.relays:
            try:
                self._client.unsubscribe_topic(self._topic)
            except Exception:  # the client may already be closing
                pass

    # -- state transitions -------------------------------------------------------------------

    def _mark_running(self, future: Future) -> bool:
        with self._lock:
            if future.running():
                return True
            if future.done():
                return False
            return future.set_running_or_notify_cancel()

    def _on_running_event(self, event: tuple[float, Any]) -> None:
        """An event from dask's log (without the relay): ``(timestamp, key)``."""
        self._on_running(event[1])

    def _on_running(self, key: str) -> None:
        with self._lock:
            record = self._records.get(key)
        if record is not None:
            self._mark_running(record.future)

    def _on_news(self, key: str, outcome: bytes | None = None, calls: list[int] | None = None,
                 outcomes: list[bytes] | None = None,
                 memory: dict[str, Any] | None = None) -> None:
        """A worker's relayed news of ``key`` (on the event loop).

        Started, its outcome, (``calls``) the outcomes of calls of a packed task, or
        (``memory``) the scheduler's word that its worker was killed for memory.
        """
        if memory is not None:
            record = self._records.get(key)
            if record is not None:
                self._memory_kills[key] = memory
                self._deliveries.put(_MemoryKill(record))
        elif calls is not None:
            record = self._records.get(key)
            if record is not None and record.on_calls is not None:
                self._deliveries.put(_CallsNews(record, calls, outcomes or []))
        elif outcome is None:
            self._on_running(key)
        elif key in self._records:
            self._relayed[key] = outcome

    def _on_future_done(self, future: Future) -> None:
        if not future.cancelled():
            return
        key = future._futures_hpc_key  # type: ignore[attr-defined]
        self._relayed.pop(key, None)
        with self._lock:
            record = self._records.pop(key, None)
        if record is not None:
            record.dask_future.release()

    # -- results ---------------------------------------------------------------------------------

    async def _await_done(self, dask_future: distributed.Future) -> None:
        """Wait on the event loop until ``dask_future`` is done, then queue it for gathering."""
        wait = future_state_waiter(dask_future)
        if wait is None:  # another distributed: public callback
            dask_future.add_done_callback(
                lambda done: self._client.loop.add_callback(self._queue_for_gathering, done)
            )
            return
        while dask_future.status == "pending":
            await wait()
        self._queue_for_gathering(dask_future)

    def _queue_for_gathering(self, dask_future: distributed.Future) -> None:
        self._ready.append(dask_future)
        if not self._gathering:
            self._gathering = True
            self._client.loop.add_callback(self._gather_ready)

    async def _gather_ready(self) -> None:
        """Hand finished futures to the collector, gathering the outcomes not relayed.

        One ``gather`` request per batch of futures that finished together.
        """
        try:
            while self._ready:
                batch = self._ready[:GATHER_BATCH_SIZE]
                del self._ready[:GATHER_BATCH_SIZE]
                finished = [future for future in batch if future.status == "finished"]
                packed = [self._relayed.pop(future.key, None) for future in finished]
                missing = [
                    future for future, got in zip(finished, packed, strict=True) if got is None
                ]
                if missing:
                    try:
                        gathered = iter(await self._client.gather(missing, asynchronous=True))
                        packed = [got if got is not None else next(gathered) for got in packed]
                    except Exception:  # one result was lost: the collector fetches one by one
                        packed = None
                self._deliveries.put(_Delivery(batch, finished, packed))
        finally:
            self._gathering = False

    def _collect(self) -> None:
        while True:
            delivery = self._deliveries.get()
            if delivery is None:
                return
            try:
                if isinstance(delivery, _CallsNews):
                    if not delivery.record.future.done():
                        delivery.record.on_calls(delivery.calls, delivery.outcomes)
                    continue
                if isinstance(delivery, _MemoryKill):
                    # The scheduler cancelled the task; cancelling it here too does so where
                    # the scheduler could not (another distributed), and costs nothing else.
                    delivery.record.dask_future.cancel()
                    continue
                self._resolve(delivery)
            except Exception:  # never let the collector die: that would hang callers
                logger.exception("futures_hpc: failed to deliver results")

    def _resolve(self, delivery: _Delivery) -> None:
        with self._lock:
            records = {future.key: self._records.get(future.key) for future in delivery.batch}
        delivered = set()
        if delivery.packed is not None:
            for dask_future, outcome in zip(delivery.finished, delivery.packed, strict=True):
                record = records.get(dask_future.key)
                if record is not None:
                    delivered.add(dask_future.key)
                    self._complete(record, outcome=outcome)
        for key, record in records.items():
            if record is not None and key not in delivered:
                self._complete_one_by_one(record)

    def _complete_one_by_one(self, record: _Record) -> None:
        dask_future = record.dask_future
        memory = self._memory_kills.pop(dask_future.key, None)
        if memory is not None and dask_future.status in ("cancelled", "error"):
            self._complete(record, error=self._memory_error(record, memory))
            return
        try:
            if dask_future.status == "cancelled":
                raise CancelledError(f"task {dask_future.key} was cancelled in the dask cluster")
            outcome = dask_future.result()
        except KilledWorker as killed:
            lost = WorkerLostError(
                f"the call {record.description} was running on a worker that died each of the "
                f"{allowed_failures(self._client) + 1} times it was tried "
                "(max_call_retries); it was not retried again. A call that kills its worker "
                "usually runs out of memory or crashes the interpreter: check the worker logs."
            )
            lost.__cause__ = killed
            self._complete(record, error=lost)
        except BaseException as error:  # noqa: BLE001
            self._complete(record, error=error)
        else:
            self._complete(record, outcome=outcome)

    def _memory_error(self, record: _Record, memory: dict[str, Any]) -> CallMemoryError:
        rss, limit = memory.get("rss"), memory.get("limit")
        if memory.get("killer") == "kernel":
            how = "the kernel's out-of-memory killer ended (its memory cgroup was full)"
        else:
            how = (f"its nanny ended for using too much memory ({format_bytes(rss)} of its "
                   f"{format_bytes(limit)} limit)")
        return CallMemoryError(
            f"the call {record.description} was running on worker {memory.get('worker')}, "
            f"which {how}", rss=rss, memory_limit=limit)

    def _complete(
        self, record: _Record, outcome: bytes | None = None, error: BaseException | None = None
    ) -> None:
        with self._lock:
            self._records.pop(record.dask_future.key, None)
        self._relayed.pop(record.dask_future.key, None)
        self._memory_kills.pop(record.dask_future.key, None)
        record.dask_future.release()
        if not self._mark_running(record.future):
            return
        if error is not None:
            _set_exception_once(record.future, error)
            return
        try:
            value = record.decode(unpack_outcome(outcome))
        except BaseException as raised:  # noqa: BLE001 - the call's own exception
            _set_exception_once(record.future, raised)
        else:
            if not record.future.done():
                record.future.set_result(value)


def _set_exception_once(future: Future, error: BaseException) -> None:
    if not future.done():
        try:
            future.set_exception(error)
        except Exception:  # completed by another thread in between
            pass
