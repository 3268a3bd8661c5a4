"""futures_hpc: one concurrent.futures Executor for laptops, batch clusters, MPI and AWS ECS.

Everything public is importable from ``futures_hpc``, except the tile functions
(:mod:`futures_hpc.tiles`) and the integrations (:mod:`futures_hpc.integrations`). The backends'
executors other than ``LocalExecutor`` are imported on first use, as their dependencies are
optional.
"""

from typing import TYPE_CHECKING

from .backends import available_backends
from .backends.local import LocalExecutor
from .errors import (
    BackendUnavailableError,
    FuturesHPCError,
    JobFailedError,
    JobSubmissionError,
    OptionError,
    WorkerLostError,
)
from .executor import HPCExecutor
from .integrations import register_integrations

if TYPE_CHECKING:  # imported on first use (see __getattr__); named here for type checkers
    from .backends.batch.pbs import PBSExecutor
    from .backends.batch.sge import SGEExecutor
    from .backends.batch.slurm import SLURMExecutor
    from .backends.ecs import ECSExecutor
    from .backends.mpi import MPIExecutor

__version__ = "0.1.0"

# The joblib backend "futures_hpc", if joblib is installed (about 10 ms).
register_integrations()

_LAZY_EXECUTORS = {
    "SLURMExecutor": "slurm",
    "PBSExecutor": "pbs",
    "SGEExecutor": "sge",
    "MPIExecutor": "mpi",
    "ECSExecutor": "ecs",
}


def __getattr__(name: str):
    """Import the other backends' executors on first use (their dependencies are optional)."""
    if name in _LAZY_EXECUTORS:
        from .backends import load_backend

        return load_backend(_LAZY_EXECUTORS[name])
    raise AttributeError(f"module 'futures_hpc' has no attribute {name!r}")


__all__ = [
    "HPCExecutor",
    "LocalExecutor",
    "available_backends",
    "FuturesHPCError",
    "OptionError",
    "BackendUnavailableError",
    "JobSubmissionError",
    "JobFailedError",
    "WorkerLostError",
    # the executors of _LAZY_EXECUTORS, spelled out for tools that read __all__ without running it
    "SLURMExecutor",
    "PBSExecutor",
    "SGEExecutor",
    "MPIExecutor",
    "ECSExecutor",
]
