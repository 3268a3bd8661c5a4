"""The backend protocol: what a backend does for its executor, and nothing else.

An executor of a backend is a thin subclass of :class:`~futures_hpc.executor.HPCExecutor` that
names its provider::

    class LocalExecutor(HPCExecutor):
        provider = LocalProvider

The executor owns the life cycle (checking the options, the client, the call queue, shutdown,
``with`` blocks, the exit and signal paths); it creates one provider when it starts and calls it
at fixed points. A provider never overrides the executor: it answers.

    ========================  ======================================================================
    when                      the executor calls
    ========================  ======================================================================
    choosing a backend        :meth:`BackendProvider.unavailable_reason` (a classmethod)
    construction, first       ``BackendProvider(executor)`` (MPI joins its world here)
    after the common checks   :meth:`~BackendProvider.check_options`: the backend's own options
    start                     :meth:`~BackendProvider.create_cluster`, then, once the client is
                              connected, :meth:`~BackendProvider.start_workers`
    sizing chunks             :meth:`~BackendProvider.planned_worker_slots`
    ``ex.with_resources``     :meth:`~BackendProvider.check_pool`, then, for each worker the
                              pool's policy asks for, :meth:`~BackendProvider.pool_job`
    ``ex.status()``           :meth:`~BackendProvider.report_status`
    progress bars             :meth:`~BackendProvider.progress_note`
    each submission           :meth:`~BackendProvider.check_usable` (raise once nothing can run)
    SIGTERM                   :meth:`~BackendProvider.cancel_jobs_now` (any thread, no event loop)
    closing                   :meth:`~BackendProvider.before_close`, then the cluster closes, then
                              :meth:`~BackendProvider.after_close`
    leaving ``with``          :meth:`~BackendProvider.on_exit`
    ========================  ======================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from distributed.deploy import Cluster

from .errors import refuse_pools


class BackendProvider:
    """Base of every backend's provider; each method's default does nothing that costs.

    Parameters
    ----------
    executor : HPCExecutor
        The executor this provider works for. Its checked options are there: ``resources``
        (:class:`~futures_hpc.options.ResourceOptions`), ``backend_options``,
        ``executor_options``, ``max_workers``, ``run_name``, ``security``, ``credentials``,
        ``dashboard_address``, ``import_path``, ``log_dir``; and, once started, ``cluster``
        and ``client``.

    """

    #: The backend's name in the registry (``HPCExecutor("name")``).
    name: ClassVar[str] = ""
    #: Options the backend accepts besides the common ones; None accepts anything.
    option_names: ClassVar[frozenset[str] | None] = frozenset()
    #: Whether workers connect over a network (and write logs of their own).
    networked: ClassVar[bool] = True
    #: Whether the backend sizes its workers with the fair-share policy (``adaptive``,
    #: ``idle_timeout``, ...).
    scales_jobs: ClassVar[bool] = False
    #: Whether the run's TLS key stays in memory (workers get it from this process) instead of
    #: being written to the run's ``tls`` directory for workers started elsewhere.
    credentials_in_memory: ClassVar[bool] = False

    def __init__(self, executor: Any) -> None:
        self.executor = executor

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Say why this backend cannot run here, or return None if it can."""
        return None

    def check_options(self) -> None:
        """Check the backend's own options; raise ``OptionError`` before anything starts."""

    def create_cluster(self) -> Cluster:
        """Create and return the backend's dask cluster (workers may start later)."""
        raise NotImplementedError

    def start_workers(self) -> None:
        """Ask the cluster for its workers (fixed size or adaptive); called once."""

    def planned_worker_slots(self) -> int:
        """Worker threads expected when none is connected yet (used to size chunks)."""
        executor = self.executor
        return max(1, (executor.max_workers or 1) * (executor.resources.cores or 1))

    # -- pools (``ex.with_resources``, :mod:`futures_hpc.pools`) ------------------------------

    def check_pool(self, shape: Any) -> None:
        """Refuse a pool shape (:class:`~futures_hpc.pool_shape.PoolShape`) this backend cannot run.

        The default refuses every pool: a backend runs pools only if it makes their workers.
        """
        raise refuse_pools(self.name, "its workers are all of one kind")

    def pool_walltime(self, shape: Any) -> tuple[str | None, int | None]:
        """The walltime of a pool's jobs (``HH:MM:SS`` and seconds; None: no limit)."""
        resources = self.executor.resources
        if shape.walltime:
            return shape.walltime, shape.walltime_seconds
        return resources.walltime, resources.walltime_seconds

    def pool_default_max_workers(self, shape: Any) -> int:
        """The most workers of a pool created without ``max_workers``."""
        return self.executor.max_workers or 1

    def pool_job_prefix(self, number: int) -> str:
        """The names of pool ``number``'s workers (``worker_spec`` entries) begin with this."""
        return f"p{number}-"

    def pool_job(self, pool: Any, name: str) -> dict[str, Any]:
        """The ``worker_spec`` entry of a new worker (batch: job) of ``pool``, named ``name``."""
        raise NotImplementedError

    def report_status(self, status: Any) -> None:
        """Fill the backend's part of ``status`` (a :class:`~futures_hpc.scaling.ScalingStatus`)."""

    def progress_note(self) -> str | None:
        """A short text for the progress bar of ``map(progress=True)`` (e.g. why jobs wait)."""
        return None

    def check_usable(self) -> None:
        """Raise the backend's error when no call can run any more (e.g. its jobs never start)."""

    def before_close(self) -> None:
        """Prepare to close (e.g. stop submitting and watching jobs); the cluster closes next."""

    def cancel_jobs_now(self) -> None:
        """Cancel the backend's jobs with one command, from any thread, without the event loop."""

    def after_close(self) -> None:
        """Release what the backend holds beyond the cluster (called once it is closed)."""

    def on_exit(self, exc_type: type[BaseException] | None, exc_value: Any) -> None:
        """See how a ``with`` block ended, before the executor shuts down."""


#: Picks the executor class for ``HPCExecutor(backend, profile=...)``. The backend registry
#: (:mod:`futures_hpc.backends`, imported by ``futures_hpc/__init__.py``) installs it with
#: :func:`set_backend_chooser`: the executor never imports the registry, which imports the
#: backends, which import the executor.
_backend_chooser: Callable[[str | None, str | None], type] | None = None


def chosen_executor_class(backend: str | None, profile: str | None) -> type:
    """The executor class ``HPCExecutor(backend, profile=...)`` gives (through the registry)."""
    if _backend_chooser is None:
        raise RuntimeError("no backend registry: import futures_hpc, not its modules")
    return _backend_chooser(backend, profile)


def set_backend_chooser(
    chooser: Callable[[str | None, str | None], type]
) -> None:
    """Install the function that picks the executor class of ``HPCExecutor(...)``."""
    global _backend_chooser
    _backend_chooser = chooser


class ProviderTrait:
    """A class attribute of an executor that is its provider's (read at each use)."""

    def __init__(self, trait: str) -> None:
        self.trait = trait

    def __get__(self, instance: Any, owner: type) -> Any:
        return getattr(owner.provider, self.trait)
