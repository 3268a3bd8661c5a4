"""HPCExecutor: a standard :class:`concurrent.futures.Executor` over a dask distributed client.

``HPCExecutor(backend=None, **options)`` gives an instance of the chosen backend's subclass. The
subclass only creates the cluster (:meth:`HPCExecutor._create_cluster`) and, for batch systems,
starts its workers (:meth:`HPCExecutor._start_workers`); everything the user calls lives here.
"""

from __future__ import annotations

import itertools
import logging
import reprlib
import sys
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import Any, ClassVar

import dask.config
import distributed
from distributed.deploy import Cluster
from distributed.security import Security

from . import cleanup
from . import config as _config  # noqa: F401 - registers the default configuration
from .bridge import FutureBridge
from .call_queue import CallQueue, function_name, pickled
from .calls import (
    pack_chunk,
    pack_function,
    run_chunk,
)
from .chunking import CallCosts, automatic_chunksize, function_key
from .cleanup import undo_foreign_interrupt_handler
from .engine import check_engine, set_allowed_failures
from .errors import ExecutorShutdownError, OptionError
from .import_path import ImportPathPlugin, import_path_option
from .option_table import (
    DEFAULT_MAX_CALL_RETRIES,
    check_options,
    describe_ignored,
    split_options,
)
from .options import (
    ResourceOptions,
    check_dashboard_address,
    check_max_workers,
    merge_with_profile,
    parse_resources,
)
from .progress import track
from .scaling import ScalingStatus, validate_scaling_options
from .security import TLS_DIRECTORY, RunCredentials, create_run_credentials
from .streams import in_process_scheduler_address

logger = logging.getLogger("futures_hpc")

#: Seconds for which ``map`` reuses a count of connected worker threads to size its chunks.
WORKER_SLOTS_REFRESH_SECONDS = 1.0

#: With an input of unknown length, chunks grow from 1 call by doubling up to this size.
MAX_GROWING_CHUNKSIZE = 256





_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _short_repr(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _describe_function(function: Callable[..., Any]) -> str:
    """The function's qualified name and module, for errors."""
    name = getattr(function, "__qualname__", None) or function_name(function)
    module = getattr(function, "__module__", None)
    return f"{module}.{name}" if module else name


def _describe_call(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict) -> str:
    """A short text naming a call, for errors: ``name(arg, key=value)``, cut at 200 characters."""
    parts = [_short_repr(value) for value in args]
    parts += [f"{key}={_short_repr(value)}" for key, value in kwargs.items()]
    text = f"{getattr(function, '__qualname__', function_name(function))}({', '.join(parts)})"
    return text if len(text) <= 200 else text[:197] + "..."


def _decode_chunk(
    outcome: tuple[Any, ...],
) -> tuple[list[Any], BaseException | None, float | None]:
    return outcome[1], outcome[2], outcome[3]


class HPCExecutor(Executor):
    """Run calls on a dask cluster chosen by backend, with standard-library semantics.

    Parameters
    ----------
    backend : str, optional
        ``"local"``, ``"slurm"``, ``"pbs"``, ``"sge"``, ``"mpi"``, ``"ecs"`` or a third-party
        backend. Without it: ``FUTURES_HPC_BACKEND``, then the profile's ``backend``, then the dask
        config key ``futures_hpc.backend``, then auto-detection, else ``"local"``.
    max_workers : int, optional
        The most workers (batch: jobs times processes) this executor uses.
    profile : str, optional
        A named set of options from dask config (``futures_hpc.profiles.<name>``); explicit
        arguments override it.
    security : bool or distributed.security.Security, optional
        TLS between scheduler, workers and client, with a fresh certificate per run. Default:
        on, on every backend (config ``futures_hpc.security``). The local backend keeps the
        key in memory; batch and MPI backends write it into the run's ``tls`` directory and
        delete it when the executor closes. ``False``: plain TCP, which any user who can reach
        the ports (on ``local``: any user of this machine) can use to run code as you. A
        :class:`~distributed.security.Security`: your own certificates, used as they are.
    dashboard_address : str, optional
        Where the dashboard listens (default from config ``futures_hpc.dashboard-address``).
    **options
        The common resource options (``cores, memory, walltime, queue, account, processes,
        job_extra, prologue, env, python, log_dir``) and the backend's own ones.

    Raises
    ------
    ValueError
        For an unknown backend, ``max_workers <= 0`` or any bad option (as
        :class:`~futures_hpc.errors.OptionError`), before anything is started.

    """

    #: The backend's name in the registry.
    backend_name: ClassVar[str] = ""
    #: Options the backend accepts besides the common ones; None accepts anything.
    backend_option_names: ClassVar[frozenset[str] | None] = frozenset()
    #: Whether workers connect over a network (and write logs of their own).
    networked: ClassVar[bool] = True
    #: Whether the backend sizes its workers with the fair-share policy (``adaptive``,
    #: ``idle_timeout``, ...); other backends check those options' values and log them as ignored.
    scales_jobs: ClassVar[bool] = False
    #: Whether the run's TLS key stays in memory (workers get it from this process) instead of
    #: being written to the run's ``tls`` directory for workers started elsewhere.
    credentials_in_memory: ClassVar[bool] = False

    def __new__(cls, backend: str | None = None, **options: Any) -> HPCExecutor:
        """Give an instance of the chosen backend's subclass when called as ``HPCExecutor``.

        ``backend`` may be given by position or by keyword; both at once is a ``TypeError``, as
        for any Python function.
        """
        if cls is HPCExecutor:
            from .backends import resolve_backend

            cls = resolve_backend(backend, options.get("profile")).executor_class
        return super().__new__(cls)

    def __init__(
        self,
        backend: str | None = None,
        *,
        max_workers: int | None = None,
        profile: str | None = None,
        security: bool | Security | None = None,
        dashboard_address: str | None = None,
        **options: Any,
    ) -> None:
        if backend is not None and backend != self.backend_name:
            raise OptionError(
                f"backend={backend!r} does not match {type(self).__name__}, whose backend is "
                f"{self.backend_name!r}"
            )
        undo_foreign_interrupt_handler()  # Ctrl-C must stay a KeyboardInterrupt (cleanup.py)
        merged = merge_with_profile(profile, dict(options, max_workers=max_workers))
        executor_options, common_options, backend_options = split_options(
            merged, self.backend_option_names, self.backend_name
        )
        ignored = check_options(self.backend_name, merged)
        self.max_workers: int | None = check_max_workers(executor_options.pop("max_workers", None))
        self.resources: ResourceOptions = parse_resources(common_options)
        self.backend_options: dict[str, Any] = backend_options
        self.executor_options: dict[str, Any] = executor_options
        self.max_call_retries: int = (executor_options.get("max_call_retries")
                                      or DEFAULT_MAX_CALL_RETRIES)
        #: Directories put at the front of the workers' ``sys.path`` (see
        #: :mod:`futures_hpc.import_path`).
        self.import_path: list[str] = import_path_option(executor_options.get("import_path"))
        self.run_name: str = f"fhpc-{uuid.uuid4().hex[:8]}"
        self.dashboard_address: str = check_dashboard_address(
            dashboard_address or dask.config.get("futures_hpc.dashboard-address", "localhost:0")
        )
        self._log_dir: Path | None = None
        validate_scaling_options(self.executor_options, self.max_workers or sys.maxsize)
        self._validate_options()
        if ignored:
            logger.info("%s", describe_ignored(self.backend_name, ignored))
        if self.resources.log_dir is not None:
            # Made now, after every other check, so that a bad log_dir fails before any start
            # and a run refused for another option leaves no directory behind.
            self.log_dir  # noqa: B018
        _sweep_stale_runs()
        self.credentials: RunCredentials | None = None
        self.security: Security | None = self._make_security(security)

        self._shutdown_lock = threading.Lock()
        self._call_costs = CallCosts()
        self._connected_slots: tuple[float, int] = (float("-inf"), 0)
        self._shutdown = False
        self._closed = False
        self._cluster: Cluster | None = None
        self._client: distributed.Client | None = None
        self._bridge: FutureBridge | None = None
        self._queue: CallQueue | None = None
        try:
            check_engine()
            self._cluster = self._create_cluster()
            self._client = self._connect_client(self._cluster)
            self._bridge = FutureBridge(self._client, self.run_name)
            self._queue = CallQueue(self._client, self._bridge, self._call_costs,
                                    self._dispatch_slots, self.run_name)
            set_allowed_failures(self._client, self.max_call_retries - 1)
            if self.import_path:
                self._client.register_plugin(ImportPathPlugin(self.import_path))
            self._start_workers()
        except BaseException:
            self._close_cluster()
            raise
        cleanup.register(self)  # closed at exit, jobs cancelled on SIGTERM
        # Discoverable while alive, with or without ``with``: ``futures-hpc jobs/cancel`` and
        # dask-ctl read the record; closing removes it.
        from .integrations.dask import register_for_discovery

        register_for_discovery(self)
        logger.info("%s started: %r", type(self).__name__, self)

    def _connect_client(self, cluster: Cluster) -> distributed.Client:
        """The executor's client: in-process link to a scheduler in this process, else its address.

        Results come straight from the workers: the scheduler runs beside this client (or,
        under MPI, in the same allocation), so the workers are as reachable from here as from
        the scheduler, and one hop is saved on every gather.
        """
        in_process = in_process_scheduler_address(cluster)
        if in_process is None:
            return distributed.Client(
                cluster, security=self.security, set_as_default=False, direct_to_workers=True
            )
        client = distributed.Client(
            in_process,
            loop=cluster.loop,
            security=self.security,
            set_as_default=False,
            direct_to_workers=True,
        )
        client.cluster = cluster  # as Client(cluster) does: dashboard link, scheduler identity
        return client

    # -- what a backend provides -------------------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why this backend cannot run here, or return None if it can."""
        return None

    def _validate_options(self) -> None:
        """Check backend-specific options; raise OptionError before anything starts."""

    def _create_cluster(self) -> Cluster:
        """Create and return the backend's dask cluster (workers may start later)."""
        raise NotImplementedError

    def _start_workers(self) -> None:
        """Ask the cluster for its workers (fixed size or adaptive); called once."""

    def _planned_worker_slots(self) -> int:
        """Worker threads expected when none is connected yet (used to choose chunk sizes)."""
        return max(1, (self.max_workers or 1) * (self.resources.cores or 1))

    def _progress_note(self) -> str | None:
        """A short text for the progress bar of ``map(progress=True)`` (e.g. why jobs wait)."""
        return None

    # -- public attributes ---------------------------------------------------------------------

    @property
    def cluster(self) -> Cluster:
        """The :class:`distributed.deploy.Cluster` this executor runs on."""
        return self._cluster

    @property
    def client(self) -> distributed.Client:
        """The :class:`distributed.Client` connected to :attr:`cluster`.

        Where the scheduler runs in this process it connects through dask's ``inproc``
        transport; other processes connect to ``ex.cluster.scheduler_address``.
        """
        return self._client

    @property
    def dashboard_link(self) -> str | None:
        """The URL of the dask dashboard, if it runs.

        When the dashboard listens on localhost only (the default), the link says localhost too,
        whatever address the scheduler gives for itself.
        """
        try:
            link = self._cluster.dashboard_link
        except Exception:
            return None
        host = self.dashboard_address.rpartition(":")[0]
        if link and host in ("localhost", "127.0.0.1"):
            parts = urllib.parse.urlsplit(link)
            netloc = f"{host}:{parts.port}" if parts.port else host
            link = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        return link

    @property
    def log_dir(self) -> Path:
        """The run's own directory for job scripts, worker logs and TLS files (made on use).

        Raises
        ------
        OptionError
            If the directory cannot be made (naming ``log_dir`` and the reason).

        """
        if self._log_dir is None:
            base = self.resources.log_dir or Path(
                dask.config.get("futures_hpc.log-dir", None) or "futures_hpc-logs"
            )
            directory = (base / self.run_name).absolute()
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                given = (
                    "log_dir" if self.resources.log_dir else "the config key futures_hpc.log-dir"
                )
                raise OptionError(
                    f"{given}={str(base)!r} cannot hold this run's directory {directory}: "
                    f"{error.strerror or error}; give a writable directory (on a file system "
                    "the workers share, for batch backends)"
                ) from None
            self._log_dir = directory
        return self._log_dir

    def worker_slots(self) -> int:
        """Worker threads connected now, or the planned number if none is connected yet."""
        try:
            connected = sum(self._client.nthreads().values())
        except Exception:
            connected = 0
        self._connected_slots = (time.monotonic(), connected)
        return connected or self._planned_worker_slots()

    def _recent_worker_slots(self) -> int:
        """:meth:`worker_slots`, reusing a count up to :data:`WORKER_SLOTS_REFRESH_SECONDS` old.

        For sizing chunks: a quick series of ``map`` calls need not ask the scheduler each time.
        """
        counted_at, connected = self._connected_slots
        if time.monotonic() - counted_at > WORKER_SLOTS_REFRESH_SECONDS or not connected:
            return self.worker_slots()
        return connected

    def _dispatch_slots(self) -> int:
        """Worker threads the call queue sends tasks for: connected ones, or the planned ones.

        The planned count (every job of a batch executor, adaptive or not) keeps enough work in
        the scheduler for the scaling policy to ask for the workers it needs.
        """
        return max(self._recent_worker_slots(), self._planned_worker_slots())

    def _waiting_in_client(self) -> int:
        """Calls and chunks the call queue holds back: work the scaling policy counts too."""
        return 0 if self._queue is None else self._queue.waiting_entries()

    def _outstanding(self) -> list[Future]:
        """Every future of this executor that is not done (waiting, or running)."""
        return [] if self._queue is None else self._queue.outstanding()

    def status(self) -> ScalingStatus:
        """What the executor holds now: workers, jobs pending/running, resubmissions, lost calls.

        Returns
        -------
        futures_hpc.scaling.ScalingStatus

        """
        return self._scaling_status()

    def _scaling_status(self) -> ScalingStatus:
        """The backend's status; the base knows only the connected workers."""
        try:
            workers = len(self._client.scheduler_info(n_workers=-1)["workers"])
        except Exception:
            workers = 0
        waiting = 0 if self._queue is None else self._queue.waiting_count()
        return ScalingStatus(workers=workers, waiting_calls=waiting)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return (
            f"<{type(self).__name__} backend={self.backend_name!r} run={self.run_name!r} "
            f"max_workers={self.max_workers} {state}>"
        )

    # -- security ----------------------------------------------------------------------------------

    def _make_security(self, security: bool | Security | None) -> Security | None:
        if security is None:
            security = dask.config.get("futures_hpc.security", True)
        if isinstance(security, Security):
            return security
        if security is True:
            self.credentials = create_run_credentials(
                None if self.credentials_in_memory else self.log_dir / TLS_DIRECTORY
            )
            if not self.credentials.in_memory:
                cleanup.register(self)  # SIGTERM deletes the files too
            return self.credentials.security
        if security is False:
            return None
        raise OptionError(
            f"security={security!r} is not allowed; use True, False or a "
            "distributed.security.Security"
        )

    def remove_credentials(self) -> None:
        """Delete the run's TLS key and certificate files, if any (the executor is ending).

        Called when the cluster closes, and by the SIGTERM handler; any thread, never raises.
        """
        credentials = getattr(self, "credentials", None)
        if credentials is not None:
            credentials.remove_files()

    def cancel_jobs_now(self) -> None:
        """Cancel the executor's batch jobs without the event loop (none here: no jobs)."""

    # -- submitting work ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._shutdown:
            raise ExecutorShutdownError("cannot schedule new futures after shutdown")

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` and return a :class:`concurrent.futures.Future`.

        Every call runs once, as its own task: calls are never merged or cached. A top-level
        argument that is a :class:`distributed.Future` (from ``ex.client.scatter``) reaches the
        function as its value, as in dask.

        Raises
        ------
        RuntimeError
            After :meth:`shutdown`.

        """
        with self._shutdown_lock:
            self._check_open()
            return self._queue.submit(fn, args, kwargs, lambda: _describe_call(fn, args, kwargs))

    def _submit_chunk(
        self, fn: Callable[..., Any], packed_function: bytes, columns: list[Sequence[Any]],
        key: bytes | None = None,
    ) -> Future:
        return self._submit_chunks(fn, packed_function, [columns], key)[0]

    def _submit_chunks(
        self,
        fn: Callable[..., Any],
        packed_function: bytes,
        chunks: Iterable[list[Sequence[Any]]],
        key: bytes | None = None,
    ) -> list[Future]:
        """Queue chunks of calls of ``fn``, one task each (see :mod:`futures_hpc.call_queue`)."""
        chunks = list(chunks)
        if not chunks:
            return []
        payloads = [
            pickled(
                lambda columns=columns: pack_chunk(packed_function, columns),
                lambda columns=columns: f"a chunk of calls of {_describe_function(fn)} starting "
                f"with {_describe_call(fn, tuple(column[0] for column in columns), {})}",
            )
            for columns in chunks
        ]
        name = f"{function_name(fn)}-map"
        with self._shutdown_lock:
            self._check_open()
            futures = []
            for payload, columns in zip(payloads, chunks, strict=True):
                count = min((len(column) for column in columns), default=0)
                first = tuple(column[0] for column in columns) if count else ()
                futures.append(self._queue.submit_task(
                    run_chunk, payload, _decode_chunk, name,
                    lambda first=first, count=count: (
                        f"{_describe_call(fn, first, {})} (first of a chunk of {count} calls)"
                    ),
                    key, count,
                ))
            self._queue.pump()
            return futures

    def automatic_chunksize(self, call_count: int, fn: Callable[..., Any] | None = None) -> int:
        """The chunk size ``map`` uses for ``call_count`` calls of ``fn`` when none is given.

        :data:`~futures_hpc.chunking.CHUNKS_PER_WORKER_SLOT` chunks per worker thread; fewer
        for a function this executor has already mapped and measured as so quick that a
        worker's share is short (see :mod:`futures_hpc.chunking`): each dask task costs about
        2 ms, so large chunks make trivial calls cheap, while several chunks per worker keep
        uneven calls balanced.
        """
        key = None if fn is None else function_key(pack_function(fn))
        return self._automatic_chunksize(call_count, key)

    def _automatic_chunksize(self, call_count: int, key: bytes | None) -> int:
        cost = None if key is None else self._call_costs.seconds_per_call(key)
        return automatic_chunksize(call_count, self._recent_worker_slots(), cost)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
        progress: bool = False,
    ) -> Iterator[Any]:
        """Return an iterator of ``fn`` applied to the items of ``iterables``, in input order.

        Parameters
        ----------
        fn : callable
            Called as ``fn(*items)``, with one item from each iterable.
        *iterables : iterable
            The arguments, one iterable per positional parameter of ``fn``.
        timeout : float, optional
            Seconds from this call after which ``next()`` raises :class:`TimeoutError`.
        chunksize : int, optional
            Calls per dask task. Default: chosen from the input length and the workers
            (:meth:`automatic_chunksize`); for inputs of unknown length (with ``buffersize``),
            chunks grow from 1 call by doubling up to :data:`MAX_GROWING_CHUNKSIZE`.
        buffersize : int, optional
            The most chunks in flight; the iterables are then read lazily, so a map over a
            huge or endless generator runs in bounded memory.
        progress : bool
            Show a progress bar while results are consumed (on a terminal only; nothing is
            written to a log file).

        Returns
        -------
        iterator
            The results; the first failing call raises when its result is reached, after the
            results before it. Closing the iterator early cancels what it has not yielded.

        """
        for name, value in (("chunksize", chunksize), ("buffersize", buffersize)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        end_time = None if timeout is None else timeout + time.monotonic()
        total: int | None = None
        packed_function = pickled(
            lambda: pack_function(fn), lambda: f"the function {_describe_function(fn)}"
        )
        key = function_key(packed_function)  # for the call-cost memory, once per map
        if buffersize is not None:
            sizes = (
                itertools.repeat(chunksize)
                if chunksize is not None
                else (min(2**power, MAX_GROWING_CHUNKSIZE) for power in itertools.count())
            )
            chunks = _chunks_of_calls(zip(*iterables, strict=False), sizes)
        else:
            columns = _as_columns(iterables)
            total = min((len(column) for column in columns), default=0)
            chunks = _sliced_chunks(columns, total, chunksize or self._automatic_chunksize(
                total, key))
        pending: deque[Future] = deque(
            self._submit_chunks(
                fn,
                packed_function,
                chunks if buffersize is None else itertools.islice(chunks, buffersize),
                key,
            )
        )
        refill = None if buffersize is None else chunks
        results = self._results_in_order(fn, packed_function, key, pending, refill, end_time)
        if progress:
            return track(results, total, description=function_name(fn), note=self._progress_note)
        return results

    def _results_in_order(
        self,
        fn: Callable[..., Any],
        packed_function: bytes,
        key: bytes,
        pending: deque[Future],
        refill: Iterator[list[Sequence[Any]]] | None,
        end_time: float | None,
    ) -> Iterator[Any]:
        try:
            while pending:
                remaining = None if end_time is None else end_time - time.monotonic()
                results, error, seconds = pending[0].result(remaining)
                pending.popleft()
                if seconds is not None:
                    self._call_costs.record(key, len(results) + (error is not None), seconds)
                if refill is not None:
                    chunk = next(refill, None)
                    if chunk is not None:
                        pending.append(self._submit_chunk(fn, packed_function, chunk, key))
                # Hand out each result and drop it: the caller alone decides how long it lives.
                results.reverse()
                while results:
                    yield results.pop()
                del results
                if error is not None:
                    raise error
        finally:
            for future in pending:
                future.cancel()

    # -- tiles ---------------------------------------------------------------------------------

    # The keywords are those of futures_hpc.tiles.map_blocks / reduce_blocks, written out again
    # so that help() and editors show them; tests/test_tiles.py checks the two stay the same,
    # and every keyword is forwarded through locals(), so none can be left behind.

    def map_blocks(
        self,
        func: Callable[..., Any],
        /,
        *inputs: Any,
        block: int | tuple[int, int] = (512, 512),
        overlap: int | tuple[int, int] = 0,
        boundary: str | float | None = "edge",
        out: Any = None,
        dtype: Any = None,
        otherargs: Any = None,
        progress: bool | Callable[[int, int], None] = False,
        fill_value: float = 0,
        on_error: str = "raise",
        max_in_flight: int | None = None,
        blocks_per_task: int | tuple[int, int] | None = None,
        shared_memory: bool | None = None,
    ) -> Any:
        """Apply ``func`` block by block, with margins, over images far larger than memory.

        :func:`futures_hpc.tiles.map_blocks` run on this executor; its keywords are documented
        there and in ``docs/tiles.md``.

        Returns
        -------
        numpy.ndarray or the ``out`` given

        """
        keywords = dict(locals())  # the keywords above, before anything else is bound
        del keywords["self"], keywords["func"], keywords["inputs"]
        from . import tiles

        return tiles.map_blocks(self, func, *inputs, **keywords)

    def reduce_blocks(
        self,
        func: Callable[..., Any],
        /,
        *inputs: Any,
        combine: Callable[[Any, Any], Any],
        initial: Any = None,
        block: int | tuple[int, int] = (512, 512),
        overlap: int | tuple[int, int] = 0,
        boundary: str | float | None = "edge",
        otherargs: Any = None,
        progress: bool | Callable[[int, int], None] = False,
        fill_value: float = 0,
        on_error: str = "raise",
        max_in_flight: int | None = None,
        blocks_per_task: int | tuple[int, int] | None = None,
        shared_memory: bool | None = None,
    ) -> Any:
        """Compute a statistic per block in the workers and combine them into one value.

        :func:`futures_hpc.tiles.reduce_blocks` run on this executor; its keywords are
        documented there and in ``docs/tiles.md``.

        Returns
        -------
        object
            The combined value.

        """
        keywords = dict(locals())  # the keywords above, before anything else is bound
        del keywords["self"], keywords["func"], keywords["inputs"]
        from . import tiles

        return tiles.reduce_blocks(self, func, *inputs, **keywords)

    # -- shutting down ------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work and release the cluster once the accepted work is done.

        Parameters
        ----------
        wait : bool
            Return only when every accepted call is done and the cluster, with every process
            and job it started, is gone. With False, return at once and do that in a thread.
        cancel_futures : bool
            Cancel the calls that have not started running.

        """
        with self._shutdown_lock:
            self._shutdown = True
        if self._queue is not None and cancel_futures:
            self._queue.cancel_waiting()
        if wait:
            self._wait_and_close()
        else:
            threading.Thread(
                target=self._wait_and_close, name="futures_hpc-shutdown", daemon=False
            ).start()

    def _wait_and_close(self) -> None:
        if self._queue is not None:
            wait_for_futures(self._queue.outstanding())
        self._close_cluster()

    def _abort(self) -> None:
        """Cancel everything and close the cluster now (Ctrl-C, SIGTERM, interpreter exit)."""
        with self._shutdown_lock:
            self._shutdown = True
        self._close_cluster()

    def _close_cluster(self) -> None:
        with self._shutdown_lock:
            if self._closed:
                return
            self._closed = True
        from .integrations.dask import unregister_from_discovery

        unregister_from_discovery(self)
        try:
            for step, closer in (
                ("call queue", self._queue and self._queue.close),
                ("results bridge", self._bridge and self._bridge.close),
                ("client", self._client and self._client.close),
                ("cluster", self._cluster and self._cluster.close),
            ):
                if closer:
                    try:
                        closer()
                    except Exception as error:
                        logger.warning("closing the %s of %r failed: %r", step, self, error)
        finally:
            # However closing went (KeyboardInterrupt included), the key does not outlive it.
            self.remove_credentials()
            cleanup.unregister(self)
        logger.info("%r closed", self)

    def __enter__(self) -> HPCExecutor:
        """Make this executor's cluster dask's scheduler for the block."""
        from .integrations.dask import use_as_dask_scheduler

        use_as_dask_scheduler(self)
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> bool:
        from .integrations.dask import restore_dask_scheduler

        try:
            restore_dask_scheduler(self)
        finally:
            if exc_type is not None and not issubclass(exc_type, Exception):
                # KeyboardInterrupt, SystemExit: do not wait for running calls; leave nothing
                # behind.
                self._abort()
            else:
                self.shutdown(wait=True)
        return False

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            cleanup.close_now(self)


def _sweep_stale_runs() -> None:
    """Drop discovery records of dead runs of this host, deleting their TLS files (cheap)."""
    from .integrations.dask import running_cluster_names

    try:
        running_cluster_names()
    except Exception as error:  # a convenience: it must never stop a run from starting
        logger.debug("sweeping the discovery records failed: %r", error)


def _is_sliceable(iterable: Iterable[Any]) -> bool:
    return isinstance(iterable, (list, tuple, range, str, bytes)) or (
        type(iterable).__name__ == "ndarray" and getattr(iterable, "ndim", 0) >= 1
    )


def _as_columns(iterables: tuple[Iterable[Any], ...]) -> list[Sequence[Any]]:
    """The iterables as sequences that slice cheaply; lists, tuples, ranges, arrays as they are.

    Otherwise the calls are read with ``zip`` (which stops at the shortest iterable, so an
    endless iterator beside a finite one is fine, as with the standard library's ``map``).
    """
    if all(_is_sliceable(iterable) for iterable in iterables):
        return list(iterables)
    calls = list(zip(*iterables, strict=False))
    if not calls:
        return [[] for _ in iterables]
    return [list(column) for column in zip(*calls, strict=True)]


def _sliced_chunks(
    columns: list[Sequence[Any]], total: int, chunksize: int
) -> Iterator[list[Sequence[Any]]]:
    for start in range(0, total, chunksize):
        stop = min(start + chunksize, total)
        yield [column[start:stop] for column in columns]


def _chunks_of_calls(
    calls: Iterator[tuple[Any, ...]], sizes: Iterator[int]
) -> Iterator[list[Sequence[Any]]]:
    for size in sizes:
        chunk = list(itertools.islice(calls, size))
        if not chunk:
            return
        yield [list(column) for column in zip(*chunk, strict=True)]
