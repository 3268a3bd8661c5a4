"""Error classes of futures_hpc.

Every error is a subclass of :class:`FuturesHPCError` and of the builtin exception that matches
its meaning, so ``except ValueError`` catches a bad option as it would anywhere else.
"""

from __future__ import annotations


class FuturesHPCError(Exception):
    """Base class of every error raised by futures_hpc itself."""


class OptionError(FuturesHPCError, ValueError):
    """An option has a bad name or value; raised before anything is submitted."""


class UnknownBackendError(FuturesHPCError, ValueError):
    """A backend name that no registered backend answers to."""


class BackendUnavailableError(FuturesHPCError, RuntimeError):
    """The backend cannot run here (a command or a package it needs is missing)."""


class JobSubmissionError(FuturesHPCError, RuntimeError):
    """The batch system (or cloud API) refused to start a job; carries its own message."""


class JobFailedError(FuturesHPCError, RuntimeError):
    """Jobs died more often than ``max_resubmissions`` allows; carries ids, states, log tails."""


class WorkerLostError(FuturesHPCError, RuntimeError):
    """A call killed its worker ``max_call_retries`` times."""


class CallSerializationError(FuturesHPCError, TypeError):
    """A call (its function or an argument) cannot be pickled to be sent to the workers."""


class CallDependencyError(FuturesHPCError, RuntimeError):
    """A call did not run because a future among its arguments failed (its ``__cause__``)."""


class ExecutorShutdownError(FuturesHPCError, RuntimeError):
    """Work was submitted to an executor that has been shut down."""


class CallMemoryError(WorkerLostError):
    """A call's worker was killed for using more memory than it had, on every memory it got.

    Raised for a call of ``with_resources(memory=[...])`` (a memory ladder) killed for memory
    on its last rung (dask's nanny kills a worker above its memory limit).

    Attributes
    ----------
    memory : str or None
        The memory of the call's last worker, as given in the ladder (``"4GB"``).
    rss : int or None
        The worker process's resident memory, in bytes, when it was killed.
    memory_limit : int or None
        The worker's memory limit, in bytes.

    """

    def __init__(self, message: str, memory: str | None = None, rss: int | None = None,
                 memory_limit: int | None = None) -> None:
        super().__init__(message)
        self.memory = memory
        self.rss = rss
        self.memory_limit = memory_limit

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.memory, self.rss, self.memory_limit)


def refuse_pools(backend: str, reason: str) -> OptionError:
    """The error of a backend that has one kind of worker only (no ``with_resources``)."""
    return OptionError(f"with_resources is not available on the {backend!r} backend: {reason}")
