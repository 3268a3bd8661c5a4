"""futures_hpc: one concurrent.futures Executor for laptops, batch clusters, MPI and AWS ECS."""

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
    *_LAZY_EXECUTORS,
]
