"""SLURM: its directives, how to read its queue and why a job waits, detection, cancelling.

``cores`` -> ``--cpus-per-task``, ``memory`` -> ``--mem``, ``walltime`` -> ``-t``, ``queue`` ->
``-p``, ``account`` -> ``-A`` (dask-jobqueue's ``SLURMCluster`` writes them). Detected by
``sbatch`` on PATH; the queue is read with ``squeue``, jobs cancelled with ``scancel``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from .commands import read_command, run_command
from .executor import JobQueueExecutor, batch_provider
from .jobs import QueueState
from .system import JOB_NAME_PREFIX, BatchSystem, QueuedJob

logger = logging.getLogger("futures_hpc")

#: SLURM states in which a job may still run a worker.
SLURM_ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
    "SUSPENDED", "STOPPED", "SIGNALING", "RESV_DEL_HOLD",
})


#: SLURM reasons of a pending job that waiting cannot clear: the request exceeds what the
#: partition or its nodes can give, names something invalid or not allowed, or depends on a job
#: that failed (squeue(1), "JOB REASON CODES"; https://slurm.schedmd.com/job_reason_codes.html).
SLURM_REASONS_THAT_NEVER_CLEAR = frozenset({
    "PartitionConfig",           # more cores, memory or nodes than the partition's nodes have
    "PartitionNodeLimit",        # more or fewer nodes than the partition allows a job
    "PartitionTimeLimit",        # a walltime above the partition's MaxTime
    "MaxMemPerLimit",            # more memory per CPU or node than the partition allows
    "BadConstraints",            # features no node has
    "InvalidAccount", "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed",
    "DependencyNeverSatisfied",  # a job it depends on ended in a way that fails the condition
    "ReservationInvalid", "ReservationDeleted",
})

#: Limits on the job alone also never clear: per-job and per-node maximums of an association or
#: QOS (``QOSMaxCpuPerJobLimit``, ``AssocMaxWallDurationPerJobLimit``, ``QOSMaxMemoryPerNode``...)
#: and QOS minimums (``QOSMinCpuNotSatisfied``, ``QOSMinMemory``...). Aggregate limits
#: (``*Grp*``, ``*PerUser*``, ``*PerAccount``, job counts such as ``AssocMaxJobsLimit``) clear as
#: other jobs end, and so do ``Priority``, ``Resources``, ``BeginTime``, ``Dependency``, holds
#: and nodes or partitions that are down: those keep waiting (``start_timeout`` bounds them).
_SLURM_PER_JOB_LIMIT = re.compile(r"^(?:Assoc|QOS)Max\w*Per(?:Job|Node)(?:Limit)?$|^QOSMin\w+$")


def slurm_reason_never_clears(reason: str | None) -> bool:
    """Whether a pending SLURM job with this reason can never start as it is.

    Parameters
    ----------
    reason : str or None
        squeue's reason (``%r``), e.g. ``"PartitionConfig"`` or ``"ReqNodeNotAvail,
        UnavailableNodes:n1"``; only its code (up to the first comma or space) counts.

    """
    if not reason:
        return False
    code = re.split(r"[,\s]", reason.strip(), maxsplit=1)[0]
    return code in SLURM_REASONS_THAT_NEVER_CLEAR or bool(_SLURM_PER_JOB_LIMIT.match(code))



class SLURMSystem(BatchSystem):
    """SLURM: ``sbatch``, ``squeue``, ``scancel``."""

    name = "slurm"
    title = "SLURM"
    jobqueue_cluster = "SLURMCluster"
    submit_command = "sbatch"
    query_command = "squeue"
    cancel_command = "scancel"
    unused_jobqueue_parameters = frozenset({"project"})

    def query_job_states(self, job_ids: list[str], memory: dict[str, Any]
                         ) -> dict[str, QueueState] | None:
        """``squeue --states=all``: state and reason (``%T %r``) of each job.

        ``--array``: one line per array element (``1234_3``); without it the pending elements
        of an array are one line (``1234_[3-7]``), and would read as gone.
        """
        result = run_command(
            ["squeue", "--noheader", "--array", "--states=all", f"--jobs={','.join(job_ids)}",
             "--format=%i %T %r"]
        )
        if result is None:
            return None
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:  # none of them is known any more
                return dict.fromkeys(job_ids, QueueState("gone"))
            logger.debug("squeue failed: %s", result.stderr.strip())
            return None
        listed = {}
        for line in result.stdout.splitlines():
            job_id, state, reason = ([*line.split(maxsplit=2), "", ""])[:3]
            if job_id:
                reason = None if reason.strip() in ("", "None") else reason.strip()
                never_starts = state == "PENDING" and slurm_reason_never_clears(reason)
                listed[job_id] = QueueState(state, reason, never_starts)
        return {job_id: listed.get(job_id, QueueState("gone")) for job_id in job_ids}

    def state_is_active(self, state: str) -> bool:
        """Whether squeue's state (``PENDING``, ``RUNNING``, ``COMPLETING+``...) may still run."""
        return state.split()[0].rstrip("+") in SLURM_ACTIVE_STATES

    def list_user_jobs(self, user: str) -> list[QueuedJob]:
        """``squeue -u user``: the user's jobs named ``fhpc-...``, one line per array element.

        (Without ``--array`` the pending elements of an array are one line, ``1234_[1-3%4]``,
        which ``scancel`` refuses.)
        """
        output = read_command(["squeue", "-h", "--array", "-u", user, "-o", "%i|%j|%T"])
        jobs = []
        for line in output.splitlines():
            job_id, _, rest = line.partition("|")
            name, _, state = rest.rpartition("|")
            if name.startswith(JOB_NAME_PREFIX):
                jobs.append(QueuedJob(self.name, job_id.strip(), name, state.strip()))
        return jobs

    def scheduler_options(self, resources: Any, backend_options: dict[str, Any], cores: int,
                          memory_request: bool) -> dict[str, Any]:
        """The account; no ``--mem`` line when no memory is asked for."""
        options = super().scheduler_options(resources, backend_options, cores, memory_request)
        if not memory_request:
            options["job_directives_skip"] = ["--mem"]
        return options


    def gpu_options(self, gpus: int, cores: int, memory_bytes: int | None) -> dict[str, Any]:
        """``--gres=gpu:N``."""
        return {"job_extra_directives": [f"--gres=gpu:{gpus}"]}

    job_array_refusal = None
    array_task_variable = "SLURM_ARRAY_TASK_ID"
    array_first_index = 0
    directive_prefix = "#SBATCH"

    def array_directives(self, first: int, last: int, throttle: int) -> list[str]:
        """``--array=first-last%throttle``."""
        return [f"--array={first}-{last}%{throttle}"]

    def array_element_id(self, array_id: str, index: int) -> str:
        """``1234_3``: what ``squeue --jobs`` and ``scancel`` take for one element."""
        return f"{array_id}_{index}"

    def array_script(self, script: str) -> str:
        """Log files named ``<name>-<array id>_<index>.out`` (``%A_%a``), one per element.

        dask-jobqueue names them with ``%J``, which for an element is a job number of its own
        that the executor never sees.
        """
        return re.sub(r"^(#SBATCH -[eo] .*)%J(\.\w+)$", r"\1%A_%a\2", script, flags=re.MULTILINE)


#: The SLURM batch system (this module's contract object, see :mod:`.system`).
SYSTEM = SLURMSystem()


class SLURMExecutor(JobQueueExecutor):
    """Executor whose workers are SLURM jobs (``dask_jobqueue.SLURMCluster``).

    ``cores`` -> ``--cpus-per-task``, ``memory`` -> ``--mem``, ``walltime`` -> ``-t``,
    ``queue`` -> ``-p``, ``account`` -> ``-A``, ``job_extra`` -> more ``#SBATCH`` lines. Any other
    ``SLURMCluster`` argument (``job_mem``, ``interface``, ``scheduler_options``, ...) passes
    through.
    """

    provider = batch_provider(SYSTEM)
