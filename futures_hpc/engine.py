"""The engine boundary: the one module that uses anything dask does not promise to keep.

dask, distributed, dask-jobqueue and joblib release often, and only their documented API is
stable. Everything else in futures_hpc uses that API. The few things it needs that have no
public form live here, each with what it relies on and what happens if a release removes it:

    =================================  ===============================================  ===========
    use                                relies on                                        if gone
    =================================  ===============================================  ===========
    :func:`set_stream_interval`        ``BatchedSend.interval`` of the streams          no-op
                                       (``Worker.batched_stream``,
                                       ``Client.scheduler_comm``,
                                       ``Scheduler.stream_comms``/``client_comms``)
    :func:`send_from_worker`           ``Worker.batched_stream.send``                   error (1)
    :func:`send_to_client`             ``Scheduler.client_comms``                       False
    :func:`send_to_worker`             ``Scheduler.stream_comms``                       False
    :func:`add_scheduler_stream_       ``Scheduler.stream_handlers``                    error (1)
    handler`
    :func:`add_worker_stream_handler`  ``Worker.stream_handlers``                       False (7)
    :func:`add_client_stream_handler`  ``Client._stream_handlers``                      False (2)
    :func:`stored_result`              ``Worker.data``                                  KeyError (3)
    :func:`future_state_waiter`        ``distributed.Future._state.wait()``             None (4)
    :func:`set_allowed_failures`,      ``Scheduler.allowed_failures``                   error (5)
    :func:`allowed_failures`
    :func:`pause_worker`               ``Scheduler.handle_worker_status_change``        error (5)
    :func:`threads_per_worker`         ``SpecCluster._threads_per_worker()``            1
    :func:`correct_cluster_state`      ``SpecCluster._correct_state()``                 error (5)
    :func:`adapt_afresh`               ``Cluster._adaptive_options``                    no-op
    :class:`ClusterHooks`              ``Cluster._start``/``_close``,                   error (5)
                                       ``SpecCluster._correct_state_internal``,
                                       ``._new_worker_name``, ``._threads_per_worker``,
                                       ``Cluster._loop_runner``, ``SpecCluster._lock``
                                       and ``._adaptive``
    :class:`JobHooks`                  dask-jobqueue ``Job._submit_job``,               error (5)
                                       ``Job._command_template``
    :func:`job_keyword_arguments`      ``JobQueueCluster._job_kwargs``                  KeyError
    :func:`make_default_client`,       ``distributed.client._set_global_client``/       error (5)
    :func:`drop_default_client`        ``_del_global_client``, ``Client._set_as_default``
    :func:`configured_joblib_backend`  ``joblib.parallel._backend`` (thread-local)      None (6)
    :func:`dispatch_ready_joblib_      ``Parallel._lock``, ``._ready_batches``,          0 (9)
    batches`                           ``._original_iterator``, ``._aborting``
    :func:`stop_periodic_callback`,    ``Server.periodic_callbacks`` and its entries    no-op (8)
    :func:`set_periodic_interval`,     ``"monitor"`` (every server's
    :func:`periodic_interval`          ``SystemMonitor``) and ``"memory_monitor"``
                                       (``NannyMemoryManager``)
    =================================  ===============================================  ===========

(1) only reached once the relay is installed, which needs the same distributed; (2) futures
then learn outcomes by gathering, one more round trip each; (3) the client gathers the outcome
instead; (4) the bridge waits through ``Future.add_done_callback``; (5)
:func:`check_engine` raises at executor start, naming the installed versions; (6) joblib's
backend is then never taken for the configured one, so an executor the backend made is shut
down at interpreter exit instead of at the end of its ``parallel_config`` block; (7) the
scheduler then never tells a worker which calls of a packed task finished before its first
worker died, and the retried task runs them again (their futures keep the first outcome);
(8) the local backend's nannies then check as often as distributed's defaults say, however many
share the client's process (:mod:`futures_hpc.hosted_nannies`); (9) joblib then hands the
backend the batches it has already cut one at a time, as each earlier batch ends, as it does for
every backend: quick batches at the end of a ``Parallel`` call then cost one round trip each
instead of sharing tasks.

``tests/test_engine_boundary.py`` fails if a private name of these libraries is used anywhere
else in the package, and CI runs the suite on the oldest and newest versions
``pyproject.toml`` accepts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import distributed
from distributed.deploy import Cluster, SpecCluster
from joblib import parallel as joblib_parallel
from joblib.parallel import ParallelBackendBase

from .errors import BackendUnavailableError

__all__ = [
    "ClusterHooks",
    "JobHooks",
    "job_keyword_arguments",
    "ParallelBackendBase",
    "adapt_afresh",
    "add_client_stream_handler",
    "add_scheduler_stream_handler",
    "add_worker_stream_handler",
    "allowed_failures",
    "check_engine",
    "configured_joblib_backend",
    "dispatch_ready_joblib_batches",
    "correct_cluster_state",
    "drop_default_client",
    "future_state_waiter",
    "make_default_client",
    "pause_worker",
    "periodic_interval",
    "send_from_worker",
    "send_to_client",
    "send_to_worker",
    "set_allowed_failures",
    "set_periodic_interval",
    "set_scheduler_stream_intervals",
    "set_stream_interval",
    "stop_periodic_callback",
    "stored_result",
    "threads_per_worker",
]

#: (owner, attribute) pairs without which an executor cannot run; checked by check_engine.
_REQUIRED = (
    (Cluster, "_start"),
    (Cluster, "_close"),
    (SpecCluster, "_correct_state"),
    (SpecCluster, "_correct_state_internal"),
    (SpecCluster, "_new_worker_name"),
    (SpecCluster, "_threads_per_worker"),
    (distributed.Scheduler, "handle_worker_status_change"),
)
_engine_checked = False


def check_engine() -> None:
    """Raise if the installed distributed lacks an internal futures_hpc cannot do without.

    Raises
    ------
    BackendUnavailableError
        Naming what is missing and the installed versions of dask and distributed.

    """
    global _engine_checked
    if _engine_checked:
        return
    import distributed.client as client_module

    missing = [f"{owner.__name__}.{name}" for owner, name in _REQUIRED
               if not hasattr(owner, name)]
    try:
        from dask_jobqueue.core import Job
    except ImportError:  # the batch backends say so when used
        pass
    else:
        if not hasattr(Job, "_submit_job"):
            missing.append("dask_jobqueue.Job._submit_job")
    missing += [f"distributed.client.{name}" for name in ("_set_global_client",
                                                          "_del_global_client")
                if not hasattr(client_module, name)]
    if missing:
        import dask

        raise BackendUnavailableError(
            f"futures_hpc cannot run on distributed {distributed.__version__} (dask "
            f"{dask.__version__}): it lacks {', '.join(missing)}. Install the versions "
            "futures_hpc's pyproject.toml accepts."
        )
    _engine_checked = True


# -- message streams -------------------------------------------------------------------------


def set_stream_interval(owner: Any, seconds: float) -> None:
    """Set the batching delay of the stream a worker or a client has to its scheduler."""
    for name in ("batched_stream", "scheduler_comm"):
        stream = getattr(owner, name, None)
        if hasattr(stream, "interval"):
            stream.interval = seconds
            return


def set_scheduler_stream_intervals(
    scheduler: Any, seconds: float, worker: str | None = None, client: str | None = None
) -> None:
    """Set the batching delay of a scheduler's streams: to ``worker``, to ``client``, or all."""
    streams: list[Any] = []
    if worker is not None:
        streams.append(getattr(scheduler, "stream_comms", {}).get(worker))
    if client is not None:
        streams.append(getattr(scheduler, "client_comms", {}).get(client))
    if worker is None and client is None:
        streams += list(getattr(scheduler, "stream_comms", {}).values())
        streams += list(getattr(scheduler, "client_comms", {}).values())
    for stream in streams:
        if hasattr(stream, "interval"):
            stream.interval = seconds


def send_from_worker(worker: Any, message: dict[str, Any]) -> None:
    """Send ``message`` on a worker's stream to its scheduler (with its own messages, in order)."""
    worker.batched_stream.send(message)


def send_to_client(scheduler: Any, client: str, message: dict[str, Any]) -> bool:
    """Send ``message`` on the scheduler's stream to ``client``; False if it is not connected."""
    stream = getattr(scheduler, "client_comms", {}).get(client)
    if stream is None:
        return False
    stream.send(message)
    return True


def send_to_worker(scheduler: Any, worker: str, message: dict[str, Any]) -> bool:
    """Send ``message`` on the scheduler's stream to ``worker``; False if it is not connected.

    Messages sent inside a scheduler plugin's ``transition`` hook go before the messages the
    transition itself sends (dask sends those once its transitions are done).
    """
    stream = getattr(scheduler, "stream_comms", {}).get(worker)
    if stream is None:
        return False
    stream.send(message)
    return True


def add_worker_stream_handler(worker: Any, op: str, handler: Callable[..., Any]) -> bool:
    """Make a worker call ``handler(**message)`` for scheduler messages ``op``; False if not."""
    handlers = getattr(worker, "stream_handlers", None)
    if not isinstance(handlers, dict):
        return False
    handlers[op] = handler
    return True


def add_scheduler_stream_handler(scheduler: Any, op: str, handler: Callable[..., Any]) -> None:
    """Make the scheduler call ``handler(**message)`` for stream messages ``{"op": op, ...}``."""
    scheduler.stream_handlers[op] = handler


def add_client_stream_handler(
    client: distributed.Client, op: str, handler: Callable[..., Any]
) -> bool:
    """Make ``client`` call ``handler(**message)`` for messages ``op``; False if it cannot."""
    handlers = getattr(client, "_stream_handlers", None)
    if not isinstance(handlers, dict):
        return False
    handlers[op] = handler
    return True


def stored_result(worker: Any, key: str) -> Any:
    """The value a worker holds for ``key`` (KeyError if it holds none, e.g. spilled)."""
    return worker.data[key]


def future_state_waiter(dask_future: distributed.Future) -> Callable[[], Awaitable[Any]] | None:
    """A coroutine function that returns when ``dask_future``'s state changes, if available.

    Waiting on it inside the client's event loop costs no callback through another thread;
    None where the internals differ (then use ``add_done_callback``).
    """
    state = getattr(dask_future, "_state", None)
    wait = getattr(state, "wait", None)
    return wait if callable(wait) else None


# -- the scheduler ---------------------------------------------------------------------------


def _scheduler_set_allowed_failures(allowed: int, dask_scheduler: Any = None) -> None:
    dask_scheduler.allowed_failures = allowed


def _scheduler_allowed_failures(dask_scheduler: Any = None) -> int:
    return dask_scheduler.allowed_failures


def set_allowed_failures(client: distributed.Client, allowed: int) -> None:
    """How many times a task may be on a worker that dies before it fails (``KilledWorker``)."""
    client.run_on_scheduler(_scheduler_set_allowed_failures, allowed)


def allowed_failures(client: distributed.Client) -> int:
    """The scheduler's current number of allowed failures (see :func:`set_allowed_failures`)."""
    return client.run_on_scheduler(_scheduler_allowed_failures)



#: The event topic under which a nanny reports that it ended its worker for memory, with
#: ``{"worker": address, "pid": ..., "rss": bytes}`` (distributed's
#: ``NannyMemoryManager.memory_monitor``). If a release renames it, memory kills are no longer
#: seen: calls of a memory ladder then follow ``max_call_retries`` as any other lost call.
NANNY_MEMORY_KILL_TOPIC = "worker-restart-memory"

#: The periodic callback of every dask server that samples its process for the dashboard's
#: system charts (``distributed.core.Server``).
SERVER_MONITOR_CALLBACK = "monitor"
#: The periodic callback of a nanny that checks its worker's memory against the terminate
#: threshold (``distributed.worker_memory.NannyMemoryManager``).
NANNY_MEMORY_CALLBACK = "memory_monitor"


def stop_periodic_callback(server: Any, name: str) -> bool:
    """Stop and drop a dask server's periodic callback ``name``; False if it has none."""
    callbacks = getattr(server, "periodic_callbacks", None)
    if not isinstance(callbacks, dict) or name not in callbacks:
        return False
    callbacks.pop(name).stop()
    return True


def set_periodic_interval(server: Any, name: str, seconds: float) -> bool:
    """Run a dask server's periodic callback ``name`` every ``seconds``; False if it has none.

    A running callback takes the new interval from its next run on.
    """
    callbacks = getattr(server, "periodic_callbacks", None)
    callback = callbacks.get(name) if isinstance(callbacks, dict) else None
    if callback is None or not hasattr(callback, "callback_time"):
        return False
    callback.callback_time = seconds * 1000
    return True


def periodic_interval(server: Any, name: str) -> float | None:
    """Seconds between two runs of a dask server's periodic callback ``name`` (None: none)."""
    callbacks = getattr(server, "periodic_callbacks", None)
    callback = callbacks.get(name) if isinstance(callbacks, dict) else None
    milliseconds = getattr(callback, "callback_time", None)
    return None if milliseconds is None else float(milliseconds) / 1000



def nanny_worker_pid(nanny: Any) -> int | None:
    """The process id of a nanny's worker while it runs, else None (dead, or restarting)."""
    process = getattr(getattr(nanny, "process", None), "process", None)
    if process is None:
        return None
    try:
        return process.pid if process.is_alive() else None
    except Exception:  # being replaced
        return None


def cancel_on_scheduler(scheduler: Any, keys: list[str], client: str, reason: str) -> bool:
    """Cancel tasks from inside the scheduler, as ``client.cancel(force=True)`` would.

    Done in the scheduler, at once, so that a task whose worker is about to die is not
    rescheduled on a worker of the same kind. False where the scheduler has no
    ``stimulus_cancel`` of this signature (the client then cancels them itself).
    """
    cancel = getattr(scheduler, "stimulus_cancel", None)
    if cancel is None:
        return False
    try:
        cancel(keys, client, force=True, reason=reason, msg=reason)
    except TypeError:
        return False
    return True


def pause_worker(scheduler: Any, worker_state: Any, stimulus_id: str) -> None:
    """Make the scheduler send no new task to a worker; its running tasks go on."""
    from distributed.core import Status

    scheduler.handle_worker_status_change(Status.paused, worker_state, stimulus_id=stimulus_id)


# -- clusters --------------------------------------------------------------------------------


def threads_per_worker(cluster: Any) -> int:
    """Threads of each worker a cluster starts (1 where the cluster cannot say)."""
    method = getattr(cluster, "threads_of_each_worker", None) or getattr(
        cluster, "_threads_per_worker", None
    )
    try:
        return max(1, int(method())) if method else 1
    except Exception:
        return 1


def adapt_afresh(cluster: Cluster, adaptive: type, **options: Any) -> Any:
    """Replace a cluster's adaptive policy by ``adaptive(cluster, **options)``, and return it.

    ``Cluster.adapt`` keeps the options of every earlier call (``Cluster._adaptive_options``)
    and passes them to the next policy too; this forgets them first, so that, e.g., dask's own
    ``Adaptive`` can replace the fair-share policy (``benchmarks/fair_share.py``).
    """
    cluster._adaptive_options = {}
    return cluster.adapt(Adaptive=adaptive, **options)


def correct_cluster_state(cluster: SpecCluster) -> Awaitable[Any]:
    """Bring a SpecCluster's workers in line with its ``worker_spec`` (start or stop jobs)."""
    return cluster._correct_state()


class ClusterHooks:
    """Mixin for a :class:`~distributed.deploy.Cluster` subclass: public names for its life cycle.

    Put it first in the bases (``class MyCluster(ClusterHooks, SpecCluster)``) and override the
    public coroutines, calling ``super()`` for dask's own step:

    - :meth:`start_cluster`: the cluster's start (dask's ``_start``);
    - :meth:`close_cluster`: its close (``_close``);
    - :meth:`correct_state`: for a SpecCluster, starting and stopping workers to match
      ``worker_spec`` (``_correct_state_internal``);
    - :meth:`threads_of_each_worker`: threads per worker, for sizing (``_threads_per_worker``);
    - :meth:`worker_name`: the name of a new worker spec (``_new_worker_name``).

    :meth:`start_event_loop`, :meth:`stop_event_loop` and :meth:`event_loop_started` run the
    loop of a synchronous cluster built without ``SpecCluster.__init__``'s own start.
    """

    async def _start(self) -> None:
        await self.start_cluster()

    async def _close(self) -> None:
        await self.close_cluster()

    async def _correct_state_internal(self) -> None:
        await self.correct_state()

    def _threads_per_worker(self) -> int:
        return self.threads_of_each_worker()

    def _new_worker_name(self, worker_number: int) -> str:
        return self.worker_name(worker_number)

    def worker_name(self, worker_number: int) -> str:
        """The name of the ``worker_number``-th worker spec (SpecCluster's, unless overridden)."""
        return super()._new_worker_name(worker_number)  # type: ignore[misc]

    async def start_cluster(self) -> None:
        """Start the cluster: dask's own start, unless overridden."""
        await super()._start()  # type: ignore[misc]

    async def close_cluster(self) -> None:
        """Close the cluster: dask's own close, unless overridden."""
        await super()._close()  # type: ignore[misc]

    async def correct_state(self) -> None:
        """Start and stop workers to match ``worker_spec`` (SpecCluster only)."""
        await super()._correct_state_internal()  # type: ignore[misc]

    def threads_of_each_worker(self) -> int:
        """Threads of each worker the cluster starts."""
        method = getattr(super(), "_threads_per_worker", None)
        return int(method()) if method else 1

    def request_correct_state(self) -> Awaitable[Any]:
        """Schedule :meth:`correct_state` (coalesced with one already asked for)."""
        return self._correct_state()  # type: ignore[attr-defined]

    def start_event_loop(self) -> None:
        """Start the event loop thread of a synchronous cluster."""
        self._loop_runner.start()  # type: ignore[attr-defined]

    def stop_event_loop(self) -> None:
        """Stop the event loop thread of a synchronous cluster, if it runs."""
        runner = self._loop_runner  # type: ignore[attr-defined]
        if runner.is_started():
            runner.stop()

    def event_loop_started(self) -> bool:
        """Whether the cluster's event loop thread runs."""
        return bool(self._loop_runner.is_started())  # type: ignore[attr-defined]

    @property
    def spec_lock(self) -> Any:
        """The SpecCluster's asyncio lock around changes of its workers."""
        return self._lock  # type: ignore[attr-defined]

    def adaptive_policy(self) -> Any:
        """The cluster's :class:`~distributed.deploy.Adaptive` (from ``adapt()``), or None."""
        return getattr(self, "_adaptive", None)


class JobHooks:
    """Mixin for a dask-jobqueue ``Job`` subclass: public names for what it keeps private.

    Put it first in the bases (``class MyJob(JobHooks, SLURMJob)``) and override
    :meth:`submit_job_script` to submit the job script yourself (dask-jobqueue's ``_submit_job``,
    whose output it parses for the job id); :attr:`worker_command` is the worker's command line
    in the job script (``_command_template``).
    """

    async def _submit_job(self, script_filename: str) -> str:
        return await self.submit_job_script(script_filename)

    async def submit_job_script(self, script_filename: str) -> str:
        """Submit the job script; return the submit command's output (dask-jobqueue's default)."""
        return await super()._submit_job(script_filename)  # type: ignore[misc]

    @property
    def worker_command(self) -> str:
        """The worker's command line in the job script."""
        return self._command_template  # type: ignore[attr-defined]

    @worker_command.setter
    def worker_command(self, command: str) -> None:
        self._command_template = command


def job_keyword_arguments(cluster: Any) -> dict[str, Any]:
    """The keyword arguments a dask-jobqueue cluster gives each of its jobs."""
    return cluster._job_kwargs


# -- default client --------------------------------------------------------------------------


def make_default_client(client: distributed.Client) -> None:
    """Make ``client`` distributed's process-wide default client, as ``set_as_default`` would.

    The client's own flag is kept as it was, so closing it later does not reset dask's config.
    """
    from distributed.client import _set_global_client

    was_default = getattr(client, "_set_as_default", False)
    _set_global_client(client)
    client._set_as_default = was_default


def drop_default_client(client: distributed.Client) -> None:
    """Remove ``client`` from distributed's default clients."""
    from distributed.client import _del_global_client

    _del_global_client(client)


# -- joblib ----------------------------------------------------------------------------------


def configured_joblib_backend() -> Any:
    """The backend object of the innermost ``parallel_config`` block of this thread, or None."""
    config = getattr(getattr(joblib_parallel, "_backend", None), "config", None) or {}
    return config.get("backend")


def dispatch_ready_joblib_batches(parallel: Any) -> int:
    """Dispatch now every batch ``parallel`` (a ``joblib.Parallel``) has already cut.

    joblib cuts each slice of the caller's calls into batches (the last slice into
    ``10 * n_jobs`` small ones) and keeps them in ``Parallel._ready_batches``, handing the
    backend one more each time a batch ends. This hands them all over at once, under
    ``Parallel._lock`` (a reentrant lock, as ``Parallel.dispatch_next`` takes it too), through
    the public ``Parallel.dispatch_next``; it never takes calls from the caller's iterator,
    so ``pre_dispatch`` still bounds the calls made ahead. Nothing is dispatched once the call
    is aborting or its iterator is used up (``Parallel._aborting``,
    ``Parallel._original_iterator``, as joblib's own completion callback checks).

    Returns
    -------
    int
        The batches dispatched (0 where joblib no longer has these attributes).
    """
    lock = getattr(parallel, "_lock", None)
    ready = getattr(parallel, "_ready_batches", None)
    if lock is None or ready is None or not hasattr(parallel, "_original_iterator"):
        return 0
    dispatched = 0
    with lock:
        while (not getattr(parallel, "_aborting", True)
               and parallel._original_iterator is not None and not ready.empty()):
            parallel.dispatch_next()
            dispatched += 1
    return dispatched
