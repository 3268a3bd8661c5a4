"""Former home of the batch backends, kept so that old imports work.

The batch backends now live in :mod:`futures_hpc.backends.batch`, one module per batch system
(``slurm``, ``pbs``, ``sge``) beside the shared ones; this module only re-exports their names.
"""

from __future__ import annotations

from .batch.executor import DEFAULT_MAX_WORKERS, KEEP_SHELL_UNTIL_WORKER_EXITS, JobQueueExecutor
from .batch.jobs import BatchJob, JobBook, QueueState
from .batch.pbs import (
    PBS_ACTIVE_STATES,
    PBS_NEVER_RUN_COMMENT,
    PBSExecutor,
    parse_qstat_full,
    pbs_comment_never_clears,
)
from .batch.sge import SGEExecutor
from .batch.slurm import (
    SLURM_ACTIVE_STATES,
    SLURM_REASONS_THAT_NEVER_CLEAR,
    SLURMExecutor,
    slurm_reason_never_clears,
)

__all__ = [
    "DEFAULT_MAX_WORKERS",
    "KEEP_SHELL_UNTIL_WORKER_EXITS",
    "PBS_ACTIVE_STATES",
    "PBS_NEVER_RUN_COMMENT",
    "SLURM_ACTIVE_STATES",
    "SLURM_REASONS_THAT_NEVER_CLEAR",
    "BatchJob",
    "JobBook",
    "JobQueueExecutor",
    "PBSExecutor",
    "QueueState",
    "SGEExecutor",
    "SLURMExecutor",
    "parse_qstat_full",
    "pbs_comment_never_clears",
    "slurm_reason_never_clears",
]
