"""The backend registry: built-in backends, entry points, and auto-detection.

A backend is an :class:`~futures_hpc.executor.HPCExecutor` subclass. The built-in ones are
imported only when used; third-party ones register in the entry-point group
``futures_hpc.backends`` (name = backend name, value = ``"module:ExecutorClass"``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

import dask.config

from ..cleanup import interrupt_handler_kept
from ..errors import BackendUnavailableError, UnknownBackendError
from ..options import closest_name, profile_options
from .batch import BUILTIN_TARGETS, detect_batch_systems

logger = logging.getLogger("futures_hpc")

#: Built-in backends: name -> "module:class".
BUILTIN_BACKENDS: dict[str, str] = {
    "local": "futures_hpc.backends.local:LocalExecutor",
    **BUILTIN_TARGETS,  # slurm, sge, pbs: one module each in futures_hpc/backends/batch/
    "mpi": "futures_hpc.backends.mpi:MPIExecutor",
    "ecs": "futures_hpc.backends.ecs:ECSExecutor",
}

ENTRY_POINT_GROUP = "futures_hpc.backends"

#: The pip extra that brings each built-in backend's dependencies.
BACKEND_EXTRAS = {**dict.fromkeys(BUILTIN_TARGETS, "jobqueue"), "mpi": "mpi", "ecs": "ecs"}


@dataclass(frozen=True)
class BackendInfo:
    """A known backend and whether it can run here.

    Attributes
    ----------
    name : str
        The backend's name, as passed to ``HPCExecutor``.
    target : str
        ``"module:class"`` of its executor.
    available : bool
        Whether it can run on this machine now.
    reason : str
        Why not, when it cannot; else what it found.

    """

    name: str
    target: str
    available: bool
    reason: str


@dataclass(frozen=True)
class BackendChoice:
    """The backend ``HPCExecutor`` picked, and why."""

    name: str
    why: str
    executor_class: type


def registered_backends() -> dict[str, str]:
    """Every known backend: built-in ones and those registered through entry points."""
    backends = dict(BUILTIN_BACKENDS)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        backends.setdefault(entry_point.name, entry_point.value)
    return backends


def load_backend(name: str) -> type:
    """Import and return the executor class of backend ``name``.

    Raises
    ------
    UnknownBackendError
        If no backend has that name; the message lists the known ones.

    """
    backends = registered_backends()
    if name not in backends:
        suggestion = closest_name(str(name), backends)
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        raise UnknownBackendError(
            f"unknown backend {name!r}.{hint} Known backends: {', '.join(sorted(backends))}."
        )
    module_name, _, class_name = backends[name].partition(":")
    try:
        with interrupt_handler_kept():  # dask-jobqueue's import replaces Ctrl-C's handler
            module = importlib.import_module(module_name)
    except ImportError as error:
        extra = BACKEND_EXTRAS.get(name)
        hint = f" Install it with: pip install 'futures_hpc[{extra}]'." if extra else ""
        raise BackendUnavailableError(
            f"the {name!r} backend cannot be imported ({error}).{hint}"
        ) from error
    executor_class = getattr(module, class_name, None)
    if executor_class is None:
        raise BackendUnavailableError(f"the {name!r} backend's module has no {class_name}")
    return executor_class


def _availability(name: str, target: str) -> BackendInfo:
    try:
        executor_class = load_backend(name)
    except BackendUnavailableError as error:
        return BackendInfo(name, target, False, str(error))
    reason = executor_class.unavailable_reason()
    if reason is None:
        return BackendInfo(name, target, True, "ready")
    return BackendInfo(name, target, False, reason)


def available_backends() -> list[BackendInfo]:
    """List every known backend and whether it can run here (and why not)."""
    return [_availability(name, target) for name, target in registered_backends().items()]


def mpi_world_size() -> int:
    """The number of ranks this process was launched with by mpirun/srun (1 when not)."""
    for variable in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        value = os.environ.get(variable)
        if value and value.isdigit():
            return int(value)
    if "SLURM_STEP_ID" in os.environ and os.environ.get("SLURM_NTASKS", "1").isdigit():
        return int(os.environ["SLURM_NTASKS"])
    return 1


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def detect_backend() -> tuple[str, str]:
    """Guess the backend from the environment; return its name and the reason.

    A batch system or MPI launcher is picked only when the backend's Python packages are
    installed: otherwise the reason says what is missing and the search goes on (so that a plain
    ``pip install futures_hpc`` on a login node still runs locally).
    """
    skipped = []
    ranks = mpi_world_size()
    if ranks > 1:
        if _installed("mpi4py"):
            return "mpi", f"running as one of {ranks} MPI ranks"
        skipped.append(f"running as one of {ranks} MPI ranks, but mpi4py is not installed")
    # Each batch system's module says how it is detected (BatchSystem.detect); the first found
    # in the order of futures_hpc.backends.batch.BUILTIN_SYSTEMS wins.
    systems = detect_batch_systems()
    found = (systems[0][0].name, systems[0][1]) if systems else None
    if found is not None:
        if _installed("dask_jobqueue"):
            return found
        skipped.append(
            f"{found[1]}, but dask-jobqueue is not installed (pip install 'futures_hpc[jobqueue]')"
        )
    reason = "no batch system or MPI launcher found"
    if skipped:
        reason = "; ".join(skipped) + ": using the local backend"
    return "local", reason


def choose_backend(backend: str | None = None, profile: str | None = None) -> tuple[str, str]:
    """Return the backend ``HPCExecutor(backend, profile=profile)`` uses, and why.

    In order: the argument, ``FUTURES_HPC_BACKEND``, the profile's ``backend``, the dask config
    key ``futures_hpc.backend``, auto-detection, else ``"local"``.
    """
    if backend is not None:
        return backend, "given as an argument"
    if os.environ.get("FUTURES_HPC_BACKEND"):
        return os.environ["FUTURES_HPC_BACKEND"], "from FUTURES_HPC_BACKEND"
    from_profile = profile_options(profile).get("backend")
    if from_profile:
        name = profile or dask.config.get("futures_hpc.profile")
        return from_profile, f"from profile {name!r}"
    configured = dask.config.get("futures_hpc.backend", default=None)
    if configured:
        return configured, "from dask config futures_hpc.backend"
    return detect_backend()


def resolve_backend(backend: str | None = None, profile: str | None = None) -> BackendChoice:
    """Choose the backend and import its executor class."""
    name, why = choose_backend(backend, profile)
    return BackendChoice(name, why, load_backend(name))


def _executor_class_for(backend: str | None, profile: str | None) -> type:
    return resolve_backend(backend, profile).executor_class


def _install_backend_chooser() -> None:
    from ..provider import set_backend_chooser

    set_backend_chooser(_executor_class_for)


_install_backend_chooser()
