"""How executors end with the process: one path at exit, SIGTERM, Ctrl-C.

Every executor registers here when it starts and unregisters when it closes. What ends them is
here too, and only here:

- :func:`close_now`: an executor that is garbage-collected while open, or is left open when the
  interpreter exits (:func:`close_all_now`, an ``atexit`` hook; the MPI world calls it too,
  before MPI finalizes), is closed by its own ``_abort()``: calls cancelled, cluster closed,
  jobs cancelled, key deleted.
- SIGTERM (below) cannot wait for a graceful close: it cancels the jobs and deletes the keys.
- Ctrl-C stays a ``KeyboardInterrupt`` (:func:`undo_foreign_interrupt_handler`), which
  ``__exit__`` turns into ``_abort()``.

SIGTERM:

Batch schedulers send SIGTERM before they kill a job (walltime, ``scancel`` of the job that runs
the client), and so do ``kill`` and most process supervisors. By default Python then dies at
once: no ``finally`` block, ``__exit__`` or ``atexit`` hook runs, and every job the executors had
submitted would stay in the queue until its worker gave up on the lost scheduler, and the run's
TLS key would stay on disk. The handler installed here first cancels the jobs (one command per
executor) and deletes the key and certificate files, then does what the previous handler would
have done: calls it, or, if it was the default, dies of SIGTERM as before.

The handler is installed when the first batch executor (or any executor with TLS files)
starts (only from the main thread, where Python allows it, and not when SIGTERM is ignored), and
the previous handler is put back when the last one closes, unless somebody else replaced ours in
between.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from types import FrameType
from typing import Any, Protocol

logger = logging.getLogger("futures_hpc")


class JobCanceller(Protocol):
    """What this module needs of an executor."""

    def _abort(self) -> None:
        """Cancel everything and close the cluster now."""

    def cancel_jobs_now(self) -> None:
        """Cancel all the executor's batch jobs with one command, from any thread."""

    def remove_credentials(self) -> None:
        """Delete the executor's TLS files, from any thread."""


_lock = threading.RLock()  # re-entrant: the handler runs in the main thread, which may hold it
_registered: dict[int, weakref.ref[Any]] = {}
_previous_handler: Any = None
_installed = False


def register(executor: JobCanceller) -> None:
    """Watch ``executor`` from now on: close it at exit, cancel its jobs on SIGTERM."""
    with _lock:
        _registered[id(executor)] = weakref.ref(executor)
        _install()


def unregister(executor: JobCanceller) -> None:
    """Stop watching ``executor``; restore the previous handler when none is left."""
    with _lock:
        _registered.pop(id(executor), None)
        if not _live():
            _restore()


def live_executors() -> list[Any]:
    """The executors of this process that are registered (started and not closed)."""
    with _lock:
        return _live()


def close_now(executor: JobCanceller) -> None:
    """Close ``executor`` at once (calls cancelled, jobs cancelled, key deleted); never raises."""
    try:
        executor._abort()
    except Exception as error:  # one failing executor must not keep the others open
        logger.warning("closing %r failed: %r", executor, error)


@atexit.register
def close_all_now() -> None:
    """Close every executor still open (at interpreter exit, and before MPI finalizes)."""
    for executor in live_executors():
        close_now(executor)


def handler_installed() -> bool:
    """Whether the SIGTERM handler of futures_hpc is in place now."""
    return signal.getsignal(signal.SIGTERM) is _on_sigterm


def _live() -> list[JobCanceller]:
    live = []
    for key, reference in list(_registered.items()):
        executor = reference()
        if executor is None:
            _registered.pop(key, None)
        else:
            live.append(executor)
    return live


def _install() -> None:
    global _previous_handler, _installed
    if _installed:
        return
    if threading.current_thread() is not threading.main_thread():
        logger.debug("no SIGTERM handler: executors created outside the main thread cannot set one")
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
        # Ignored SIGTERM keeps the process alive, so its jobs stay useful; a handler set from C
        # (None) could not be chained or restored.
        logger.debug("no SIGTERM handler: SIGTERM is %s", "ignored" if previous else "set from C")
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _previous_handler = previous
    _installed = True
    logger.debug("SIGTERM handler installed (previous: %r)", previous)


def _restore() -> None:
    global _previous_handler, _installed
    if not _installed or threading.current_thread() is not threading.main_thread():
        return  # outside the main thread ours stays; with no executor left it only chains
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, _previous_handler)
    _previous_handler = None
    _installed = False
    logger.debug("SIGTERM handler removed")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    with _lock:
        executors = _live()
        previous = _previous_handler
    for executor in executors:
        try:
            executor.cancel_jobs_now()
        except Exception:  # one failing executor must not keep the others' jobs alive
            logger.exception("cancelling the jobs of %r on SIGTERM failed", executor)
        remove_credentials = getattr(executor, "remove_credentials", None)
        if remove_credentials is not None:
            remove_credentials()  # never raises
    if callable(previous):
        previous(signum, frame)
        return
    # The previous handler was the default: die of SIGTERM, as the process would have.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


# -- Ctrl-C ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def interrupt_handler_kept() -> Iterator[None]:
    """Keep the SIGINT handler as it is across an import that would replace it.

    dask-jobqueue 0.9 runs ``signal.signal(SIGINT, lambda *_: sys.exit())`` when its ``runner``
    module is imported (by ``dask_jobqueue.slurm``). Ctrl-C then raises ``SystemExit`` instead of
    ``KeyboardInterrupt`` and the process exits with status 0, so ``except KeyboardInterrupt``
    never runs and a job chain sees success. Whatever handler was in place before the import (the
    user's own, or Python's default) is put back after it.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        yield
    finally:
        if main_thread and before is not None and signal.getsignal(signal.SIGINT) is not before:
            signal.signal(signal.SIGINT, before)


def undo_foreign_interrupt_handler() -> None:
    """Put Python's own SIGINT handler back if dask-jobqueue's is in place (see above).

    For a dask-jobqueue imported before futures_hpc could keep the handler (by the user, or
    through another package); a handler of anybody else is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGINT)
    if getattr(handler, "__module__", None) == "dask_jobqueue.runner":
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logger.debug("dask-jobqueue's SIGINT handler replaced by Python's KeyboardInterrupt")


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (used to tell crashed runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True
