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
