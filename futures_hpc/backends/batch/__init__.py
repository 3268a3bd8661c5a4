"""The batch backends: one module per batch system, and the modules they share.

- ``slurm.py``, ``pbs.py``, ``sge.py``: everything about one batch system (directives, reading
  its queue, why a job waits, cancelling, detection) as its ``SYSTEM`` object, and its executor
  (``SLURMExecutor``, ``PBSExecutor``, ``SGEExecutor``);
- ``system.py``: the contract a system module fulfils (:class:`~.system.BatchSystem`) and the
  job-name prefix;
- ``executor.py``: the shared executor base; ``watcher.py``: the job watcher;
  ``jobs.py``: the job book; ``commands.py``: running the systems' commands;
  ``cluster.py``: the dask-jobqueue glue, the only module here that imports dask-jobqueue.

Adding a system is one new module here plus its line in :data:`BUILTIN_SYSTEMS` (or, outside
futures_hpc, one module registered through the ``futures_hpc.backends`` entry point): see
``docs/backends/writing-a-backend.md``.
"""

from __future__ import annotations

import getpass
import importlib
from collections.abc import Sequence

from .commands import COMMAND_ERRORS
from .system import JOB_NAME_PREFIX, BatchSystem, QueuedJob

#: The built-in batch systems, in the order auto-detection tries them: backend name (= module
#: name) -> the name of the module's executor class.
BUILTIN_SYSTEMS: dict[str, str] = {
    "slurm": "SLURMExecutor",
    "sge": "SGEExecutor",
    "pbs": "PBSExecutor",
}

#: Where each built-in batch backend's executor is, for the registry: name -> "module:class".
BUILTIN_TARGETS: dict[str, str] = {
    name: f"{__name__}.{name}:{class_name}" for name, class_name in BUILTIN_SYSTEMS.items()
}


def batch_system(name: str) -> BatchSystem:
    """The ``SYSTEM`` of the built-in batch system ``name`` (imports its module).

    Raises
    ------
    KeyError
        If no built-in batch system has that name.

    """
    if name not in BUILTIN_SYSTEMS:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}").SYSTEM


def batch_systems() -> list[BatchSystem]:
    """Every built-in batch system, in detection order."""
    return [batch_system(name) for name in BUILTIN_SYSTEMS]


def detect_batch_systems() -> list[tuple[BatchSystem, str]]:
    """The batch systems found here, in detection order, each with what was found."""
    found = []
    for system in batch_systems():
        reason = system.detect()
        if reason is not None:
            found.append((system, reason))
    return found


def queued_jobs(
    schedulers: Sequence[str], user: str | None = None
) -> tuple[list[QueuedJob], list[str]]:
    """Jobs of ``user`` (default: you) named ``fhpc-...`` in the given batch systems.

    Returns
    -------
    tuple
        The jobs, and one message per batch system whose queue could not be read.

    """
    user = user or getpass.getuser()
    jobs: list[QueuedJob] = []
    errors: list[str] = []
    for scheduler in schedulers:
        try:
            jobs.extend(batch_system(scheduler).list_user_jobs(user))
        except COMMAND_ERRORS as error:
            errors.append(f"{scheduler}: {error}")
    return jobs, errors


__all__ = [
    "BUILTIN_SYSTEMS",
    "BUILTIN_TARGETS",
    "JOB_NAME_PREFIX",
    "BatchSystem",
    "QueuedJob",
    "batch_system",
    "batch_systems",
    "detect_batch_systems",
    "queued_jobs",
]
