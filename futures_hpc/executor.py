"""HPCExecutor: a standard :class:`concurrent.futures.Executor` over a dask distributed client.

``HPCExecutor(backend=None, **options)`` gives an instance of the chosen backend's subclass. The
subclass only names its provider (:class:`~futures_hpc.provider.BackendProvider`), which creates
the cluster and starts its workers; everything else, the whole life cycle included, lives here.
"""

from __future__ import annotations

import functools
import itertools
import logging
import sys
import threading
import time
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
from .blocks import BlockMethods
from .bridge import FutureBridge
from .call_queue import CallQueue
from .calls import pack_function
from .chunking import CallCosts, automatic_chunksize, function_key
from .cleanup import undo_foreign_interrupt_handler
from .dask_settings import apply_dask_settings
from .discovery import (
    register_for_discovery,
    restore_dask_scheduler,
    sweep_stale_runs,
    unregister_from_discovery,
    use_as_dask_scheduler,
)
from .engine import check_engine, set_allowed_failures
from .errors import ExecutorShutdownError, OptionError
from .import_path import ImportPathPlugin, import_path_option
from .mapping import describe_call, describe_function, plan_chunks, results_in_order, submit_chunks
from .memory_ladder import MemoryLadder, is_ladder, parse_ladder
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
    make_run_directory,
    merge_with_profile,
    parse_resources,
)
from .pool_shape import parse_shape
from .pools import BASE_RESOURCE, PoolExecutor, Pools
from .progress import track
from .provider import BackendProvider, ProviderTrait, chosen_executor_class
from .queued_call import function_name, pickled
from .scaling import ScalingStatus, validate_scaling_options
from .security import TLS_DIRECTORY, RunCredentials, dashboard_link_for, run_credentials
from .store import Occurrences, ResultStore
from .streams import connect_client

logger = logging.getLogger("futures_hpc")

#: Seconds for which ``map`` reuses a count of connected worker threads to size its chunks.
WORKER_SLOTS_REFRESH_SECONDS = 1.0





class HPCExecutor(BlockMethods, Executor):
    """Run calls on a dask cluster chosen by backend, with standard-library semantics.

    Called as ``HPCExecutor(...)`` it returns an instance of the backend's subclass
    (``LocalExecutor``, ``SLURMExecutor``, ``PBSExecutor``, ``SGEExecutor``, ``MPIExecutor``,
    ``ECSExecutor``). ``backend`` may be given by position or by keyword; both at once is a
    ``TypeError``. Used as ``with HPCExecutor(...) as ex:`` it shuts down at the end of the block
    (at once, cancelling everything, on Ctrl-C), and inside the block dask collections compute
    on ``ex`` (:mod:`futures_hpc.integrations.dask`).

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
    BackendUnavailableError
        The backend cannot run here (a command or a package it needs is missing).
    JobSubmissionError
        The batch system (or cloud API) refused the jobs.

    Attributes
    ----------
    run_name : str
        ``fhpc-xxxxxxxx``, unique per executor; batch jobs carry it as their name.
    backend_name : str
        The backend's name in the registry.
    max_workers : int or None
        The ``max_workers`` given (or from the profile).
    resources : ResourceOptions
        The parsed common options.
    credentials : RunCredentials or None
        The run's TLS files, when they are written to the run's ``tls`` directory.

    """

    #: What the backend does (a :class:`~futures_hpc.provider.BackendProvider` subclass).
    provider: ClassVar[type[BackendProvider]] = BackendProvider
    # The backend's traits are its provider's (read when used: a batch provider computes its
    # option names from dask-jobqueue, imported only then).
    #: The backend's name in the registry.
    backend_name: ClassVar[str] = ProviderTrait("name")  # type: ignore[assignment]
    #: Options the backend accepts besides the common ones; None accepts anything.
    backend_option_names: ClassVar[frozenset[str] | None] = ProviderTrait(  # type: ignore[assignment]
        "option_names")
    #: Whether workers connect over a network (and write logs of their own).
    networked: ClassVar[bool] = ProviderTrait("networked")  # type: ignore[assignment]
    #: Whether the backend sizes its workers with the fair-share policy.
    scales_jobs: ClassVar[bool] = ProviderTrait("scales_jobs")  # type: ignore[assignment]
    #: Whether the run's TLS key stays in memory instead of in the run's ``tls`` directory.
    credentials_in_memory: ClassVar[bool] = ProviderTrait(  # type: ignore[assignment]
        "credentials_in_memory")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why this backend cannot run here, or return None if it can."""
        return cls.provider.unavailable_reason()

    def __new__(cls, backend: str | None = None, **options: Any) -> HPCExecutor:
        """Give an instance of the chosen backend's subclass when called as ``HPCExecutor``.

        ``backend`` may be given by position or by keyword; both at once is a ``TypeError``, as
        for any Python function.
        """
        if cls is HPCExecutor:
            cls = chosen_executor_class(backend, options.get("profile"))
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
        self._backend: BackendProvider = self.provider(self)
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
        self._backend.check_options()
        if ignored:
            logger.info("%s", describe_ignored(self.backend_name, ignored))
        if self.resources.log_dir is not None:
            # Made now, after every other check, so that a bad log_dir fails before any start
            # and a run refused for another option leaves no directory behind.
            self.log_dir  # noqa: B018
        sweep_stale_runs()
        store = executor_options.get("store")
        #: Where results are recorded and looked up (``store=``), or None.
        self.store: ResultStore | None = (
            None if store is None else ResultStore(store, self.run_name))
        self._occurrences = Occurrences()
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
        self._pools: Pools | None = None
        try:
            check_engine()
            undo_foreign_interrupt_handler()  # check_engine may have imported dask-jobqueue
            apply_dask_settings()
            cleanup.register(self)  # from now on: closed at exit, jobs cancelled on SIGTERM
            self._cluster = self._backend.create_cluster()
            self._client = connect_client(self._cluster, self.security)
            self._bridge = FutureBridge(self._client, self.run_name)
            self._queue = self._make_queue(self._dispatch_slots)
            self._pools = Pools(self)
            set_allowed_failures(self._client, self.max_call_retries - 1)
            if self.import_path:
                self._client.register_plugin(ImportPathPlugin(self.import_path))
            self._backend.start_workers()
        except BaseException:
            self._close_cluster()
            raise
        # Discoverable while alive, with or without ``with``: ``futures-hpc jobs/cancel`` and
        # dask-ctl read the record; closing removes it.
        register_for_discovery(self)
        logger.info("%s started: %r", type(self).__name__, self)

    # -- what a backend provides -------------------------------------------------------------

    def _progress_note(self) -> str | None:
        """A short text for the progress bar of ``map(progress=True)`` (e.g. why jobs wait)."""
        return self._backend.progress_note()

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
        return dashboard_link_for(link, self.dashboard_address)

    @property
    def log_dir(self) -> Path:
        """The run's own directory for job scripts, worker logs and TLS files (made on use).

        Raises
        ------
        OptionError
            If the directory cannot be made (naming ``log_dir`` and the reason).

        """
        if self._log_dir is None:
            self._log_dir = make_run_directory(self.resources.log_dir, self.run_name)
        return self._log_dir

    def worker_slots(self) -> int:
        """Worker threads connected now, or the planned number if none is connected yet.

        Once pools exist (:meth:`with_resources`), only the threads of the executor's own
        workers count.
        """
        try:
            if self._pools is not None and self._pools.all():
                workers = self._client.scheduler_info(n_workers=-1)["workers"].values()
                connected = sum(int(info.get("nthreads", 0)) for info in workers
                                if BASE_RESOURCE in (info.get("resources") or {}))
            else:
                connected = sum(self._client.nthreads().values())
        except Exception:
            connected = 0
        self._connected_slots = (time.monotonic(), connected)
        return connected or self._backend.planned_worker_slots()

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
        return max(self._recent_worker_slots(), self._backend.planned_worker_slots())

    def _waiting_in_client(self) -> int:
        """Calls and chunks the call queue holds back: work the scaling policy counts too."""
        return 0 if self._queue is None else self._queue.waiting_entries()

    def _outstanding(self) -> list[Future]:
        """Every future of this executor and its pools that is not done (waiting, or running)."""
        own = [] if self._queue is None else self._queue.outstanding()
        return own + ([] if self._pools is None else self._pools.outstanding())

    def status(self) -> ScalingStatus:
        """What the executor holds now: workers, jobs pending/running, resubmissions, lost calls.

        Returns
        -------
        futures_hpc.scaling.ScalingStatus

        """
        try:
            workers = len(self._client.scheduler_info(n_workers=-1)["workers"])
        except Exception:
            workers = 0
        waiting = 0 if self._queue is None else self._queue.waiting_count()
        status = ScalingStatus(workers=workers, waiting_calls=waiting)
        self._backend.report_status(status)
        if self._pools is not None:
            self._pools.report_into(status)
        return status

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return (
            f"<{type(self).__name__} backend={self.backend_name!r} run={self.run_name!r} "
            f"max_workers={self.max_workers} {state}>"
        )

    # -- security ----------------------------------------------------------------------------------

    def _make_security(self, security: bool | Security | None) -> Security | None:
        self.credentials = run_credentials(
            security, lambda: None if self.credentials_in_memory else self.log_dir / TLS_DIRECTORY)
        if self.credentials is None:
            return security if isinstance(security, Security) else None
        if not self.credentials.in_memory:
            cleanup.register(self)  # SIGTERM deletes the files too
        return self.credentials.security

    def remove_credentials(self) -> None:
        """Delete the run's TLS key and certificate files, if any (the executor is ending).

        Called when the cluster closes, and by the SIGTERM handler; any thread, never raises.
        """
        credentials = getattr(self, "credentials", None)
        if credentials is not None:
            credentials.remove_files()

    def cancel_jobs_now(self) -> None:
        """Cancel the executor's batch jobs with one command, without the event loop (SIGTERM)."""
        self._backend.cancel_jobs_now()

    # -- submitting work ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._shutdown:
            raise ExecutorShutdownError("cannot schedule new futures after shutdown")
        self._backend.check_usable()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` and return a :class:`concurrent.futures.Future`.

        Every call runs once: calls are never merged or cached. The call waits in the
        executor's call queue (:mod:`futures_hpc.call_queue`) until a worker slot is free. A
        :class:`concurrent.futures.Future` among the arguments (also inside lists, tuples, sets
        and dicts) makes the call wait for it and receive its value. A top-level argument that
        is a :class:`distributed.Future` (from ``ex.client.scatter``) reaches the function as
        its value, as in dask.

        Raises
        ------
        RuntimeError
            After :meth:`shutdown`.

        """
        return self._submit_to(self._queue, fn, args, kwargs)

    def _submit_to(self, queue: CallQueue, fn: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any], batch: tuple[bytes, int] | None = None) -> Future:
        with self._shutdown_lock:
            self._check_open()
            if batch is None:
                describe = functools.partial(describe_call, fn, args, kwargs)
                return queue.submit(fn, args, kwargs, describe)
            describe = functools.partial(describe_call, args[0], (), {})  # "BatchedCalls()"
            return queue.submit(fn, args, kwargs, describe, batch=batch,
                                name=function_name(args[0]))

    def submit_batch(self, fn: Callable[[Any], Any], batch: Any, calls: int,
                     cost_key: bytes) -> Future:
        """Schedule ``fn(batch)``, a batch of calls that a library grouped itself (joblib's).

        Parameters
        ----------
        fn : callable
            Runs a batch, given it as its one argument: the same function for every batch of
            ``cost_key``, defined at module level (it is pickled by reference).
        batch : object
            The batch; its type's name starts the task's key (``BatchedCalls-...``).
        calls : int
            How many calls the batch holds.
        cost_key : bytes
            Shared by the batches of one job (one ``joblib.Parallel`` call): the call queue
            learns their cost per call under it; once one came back, a batch measured as short
            may wait on a busy worker as its next task, and quick batches waiting together
            share tasks (see :meth:`futures_hpc.call_queue.CallQueue.submit`). A batch is
            never packed with calls of another job.

        Returns
        -------
        concurrent.futures.Future
            Gets ``fn(batch)``'s result or exception.

        Raises
        ------
        RuntimeError
            After :meth:`shutdown`.

        """
        return self._submit_to(self._queue, fn, (batch,), {}, (cost_key, calls))

    def _make_queue(self, slots: Callable[[], int],
                    resources: dict[str, float] | None = None) -> CallQueue:
        """A call queue on this executor's client, sending while ``slots()`` has room."""
        return CallQueue(self._client, self._bridge, self._call_costs, slots, self.run_name,
                         self.store, resources, self._occurrences)

    def with_resources(
        self,
        *,
        cores: int | None = None,
        memory: str | int | Sequence[str | int] | None = None,
        gpus: int | None = None,
        walltime: str | int | None = None,
        queue: str | None = None,
        job_extra: Sequence[str] | None = None,
        max_workers: int | None = None,
        call_time: str | int | None = None,
        **other_options: Any,
    ) -> PoolExecutor:
        """An executor whose calls run only on workers of this shape (a pool of this executor).

        Each distinct shape is a pool of its own workers on this executor's scheduler and
        cluster (:mod:`futures_hpc.pools`): batch jobs of that size on SLURM, PBS and Grid
        Engine, worker processes on the local backend. A pool's worker runs one call at a
        time, so each call has the worker's cores, memory and GPUs; the pool asks for workers
        only while it has calls, releases them after ``idle_timeout``, and all pools together
        keep within ``max_pending_jobs``. The same shape gives the same pool.

        Parameters
        ----------
        cores : int, optional
            Cores of each worker (default 1); ``OMP_NUM_THREADS`` and its kin are set to it.
        memory : str or int or list, optional
            Memory of each worker (``"8GB"``). A list of growing amounts
            (``["4GB", "16GB", "64GB"]``) is a memory ladder, one pool per amount: a call runs
            on the first, and whenever its worker is killed for memory it runs again on the
            next; after the last, it fails with :class:`~futures_hpc.errors.CallMemoryError`
            (:mod:`futures_hpc.memory_ladder`).
        gpus : int, optional
            GPUs of each worker: the batch system's GPU request (``--gres=gpu:N``,
            ``ngpus=N``, ``-l gpu=N``) and a ``GPU`` worker resource that the pool's calls need.
        walltime : str or int, optional
            Walltime of each batch job (default: the executor's).
        queue : str, optional
            Batch queue (partition) of the pool's jobs (default: the executor's).
        job_extra : list of str, optional
            More scheduler directives for the pool's jobs.
        max_workers : int, optional
            The most workers of the pool (default: the executor's ``max_workers``).
        call_time : str or int, optional
            How long each call needs (``"00:30:00"`` or seconds): no call starts on a job
            with less time left before its walltime (its workers are drained and a new job is
            asked for), and without a ``walltime`` the pool's jobs ask for at least twice it.
            A walltime too short for one call is refused. The local backend ignores it.
        **other_options
            None is allowed: a misspelt option raises the ``ValueError`` below, naming it.

        Returns
        -------
        futures_hpc.pools.PoolExecutor

        Raises
        ------
        ValueError
            (:class:`~futures_hpc.errors.OptionError`) for a bad option, or on a backend with one
            kind of worker (MPI, ECS), before anything is started.
        RuntimeError
            After :meth:`shutdown`.

        """
        with self._shutdown_lock:
            self._check_open()
        rungs = None
        if is_ladder(memory):
            rungs = parse_ladder(memory)
            memory = rungs[0][0]
        shape = parse_shape({
            **{name: value for name, value in (
                ("cores", cores), ("memory", memory), ("gpus", gpus), ("walltime", walltime),
                ("queue", queue), ("job_extra", job_extra), ("max_workers", max_workers),
                ("call_time", call_time))
               if value is not None},
            **other_options,  # parse_shape names an unknown option (not a bare TypeError)
        })
        if rungs is None:
            return PoolExecutor(self, self._pools.get(shape))
        ladder = MemoryLadder(self._pools.get, shape, rungs)
        return PoolExecutor(self, ladder.pool(0), ladder)

    def automatic_chunksize(self, call_count: int, fn: Callable[..., Any] | None = None) -> int:
        """The chunk size ``map`` uses for ``call_count`` calls of ``fn`` when none is given.

        :data:`~futures_hpc.chunking.CHUNKS_PER_WORKER_SLOT` chunks per worker thread; fewer
        for a function this executor has already mapped and measured as so quick that a
        worker's share is short (see :mod:`futures_hpc.chunking`): each dask task costs the
        client milliseconds, so large chunks make trivial calls cheap (a few milliseconds of
        work make one chunk), while several chunks per worker keep uneven calls balanced.
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
            chunks grow from 1 call by doubling up to
            :data:`~futures_hpc.mapping.MAX_GROWING_CHUNKSIZE`.
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
        return self._map_on(self._queue, self._recent_worker_slots, fn, iterables,
                            timeout=timeout, chunksize=chunksize, buffersize=buffersize,
                            progress=progress)

    def _map_on(self, queue: CallQueue, slots: Callable[[], int], fn: Callable[..., Any],
                iterables: Sequence[Iterable[Any]], *, timeout: float | None,
                chunksize: int | None, buffersize: int | None, progress: bool,
                view_open: Callable[[], None] | None = None,
                on_submitted: Callable[[list[Future]], None] | None = None
                ) -> Iterator[Any]:
        """:meth:`map` through ``queue``, sizing chunks for ``slots()`` worker slots.

        A pool's view (:class:`~futures_hpc.pools.PoolExecutor`) passes ``view_open``, which
        raises once the view is shut down, and ``on_submitted``, which is given each batch of
        futures.
        """
        for name, value in (("chunksize", chunksize), ("buffersize", buffersize)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        end_time = None if timeout is None else timeout + time.monotonic()
        packed_function = pickled(
            lambda: pack_function(fn), lambda: f"the function {describe_function(fn)}"
        )
        key = function_key(packed_function)  # for the call-cost memory, once per map
        function_id = queue.function_id(fn, packed_function) if queue else None

        def chunk_size(count: int) -> int:
            return automatic_chunksize(count, slots(), self._call_costs.seconds_per_call(key))

        chunks, total = plan_chunks(iterables, chunksize, buffersize, chunk_size)

        def submit(batch: Iterable[list[Sequence[Any]]]) -> list[Future]:
            with self._shutdown_lock:
                self._check_open()
                if view_open is not None:
                    view_open()
                futures = submit_chunks(queue, fn, packed_function, batch, key, function_id)
            if on_submitted is not None:
                on_submitted(futures)
            return futures

        pending = deque(submit(chunks if buffersize is None
                               else itertools.islice(chunks, buffersize)))
        results = results_in_order(
            pending, None if buffersize is None else chunks,
            lambda chunk: submit([chunk])[0],
            lambda count, seconds: self._call_costs.record(key, count, seconds),
            end_time,
        )
        if progress:
            return track(results, total, description=function_name(fn), note=self._progress_note)
        return results

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
            for queue in self._pools.queues() if self._pools is not None else ():
                queue.cancel_waiting()
        if wait:
            self._wait_and_close()
        else:
            threading.Thread(
                target=self._wait_and_close, name="futures_hpc-shutdown", daemon=False
            ).start()

    def _wait_and_close(self) -> None:
        wait_for_futures(self._outstanding())
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
        try:
            self._backend.before_close()
        except Exception as error:
            logger.warning("preparing the %s backend of %r to close failed: %r",
                           self.backend_name, self, error)
        unregister_from_discovery(self)
        pools = self._pools
        try:
            for step, closer in (
                ("pools' scaling", pools and pools.stop),
                *(("pool's call queue", queue.close) for queue in (pools and pools.queues()
                                                                  or ())),
                ("call queue", self._queue and self._queue.close),
                ("results bridge", self._bridge and self._bridge.close),
                ("client", self._client and self._client.close),
                ("cluster", self._cluster and self._cluster.close),
                ("result store", self.store and self.store.close),
            ):
                if closer:
                    try:
                        closer()
                    except Exception as error:
                        logger.warning("closing the %s of %r failed: %r", step, self, error)
        finally:
            try:
                self._backend.after_close()
            except Exception as error:
                logger.warning("releasing the %s backend's resources of %r failed: %r",
                               self.backend_name, self, error)
            # However closing went (KeyboardInterrupt included), the key does not outlive it.
            self.remove_credentials()
            cleanup.unregister(self)
        logger.info("%r closed", self)

    def __enter__(self) -> HPCExecutor:
        """Make this executor's cluster dask's scheduler for the block."""
        use_as_dask_scheduler(self)
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> bool:
        self._backend.on_exit(exc_type, exc_value)
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
