"""PBS (PBS Pro, OpenPBS, Torque): directives, its queue and job comments, detection, cancelling.

``cores`` and ``memory`` -> ``-l select=1:ncpus=N:mem=M``, ``walltime`` -> ``-l walltime=``,
``queue`` -> ``-q``, ``account`` -> ``-A`` (dask-jobqueue's ``PBSCluster`` writes them).
Detected by a ``qsub`` on PATH without ``SGE_ROOT`` (Grid Engine's ``qsub`` has it); the queue
is read with ``qstat -f``, jobs cancelled with ``qdel``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

from .commands import read_command, run_command
from .executor import JobQueueExecutor, batch_provider
from .jobs import QueueState
from .system import JOB_NAME_PREFIX, BatchSystem, QueuedJob

logger = logging.getLogger("futures_hpc")

#: PBS/Torque state letters of jobs that may still run a worker (C, E, F, X: over).
PBS_ACTIVE_STATES = frozenset("QRHWTSBUM")

#: How PBS Pro / OpenPBS's scheduler starts the comment of a job it will never run.
PBS_NEVER_RUN_COMMENT = "Can Never Run"


def pbs_comment_never_clears(comment: str | None) -> bool:
    """Whether a PBS job's comment says it can never run (PBS Pro, OpenPBS).

    Their scheduler comments a queued job ``"Not Running: <why>"`` while it waits and
    ``"Can Never Run: <why>"`` when no configured resource could ever satisfy it. Torque and
    SLURM's PBS wrappers give no such comment.
    """
    return bool(comment) and comment.strip().startswith(PBS_NEVER_RUN_COMMENT)


def parse_qstat_full(text: str) -> dict[str, dict[str, str]]:
    """``qstat -f`` output as job number -> attribute -> value (continuation lines joined)."""
    jobs: dict[str, dict[str, str]] = {}
    attributes: dict[str, str] | None = None
    last_name = None
    for line in text.splitlines():
        header = re.match(r"^Job Id:\s*(\d+)", line)
        attribute = re.match(r"^\s+([\w.]+) = (.*)$", line)
        if header:
            attributes = jobs.setdefault(header.group(1), {})
            last_name = None
        elif attributes is not None and attribute:
            last_name = attribute.group(1)
            attributes[last_name] = attribute.group(2).strip()
        elif attributes is not None and last_name and line[:1].isspace() and line.strip():
            attributes[last_name] += line.strip()  # PBS Pro wraps long values
    return jobs



class PBSSystem(BatchSystem):
    """PBS: ``qsub``, ``qstat``, ``qdel``."""

    name = "pbs"
    title = "PBS"
    jobqueue_cluster = "PBSCluster"
    submit_command = "qsub"
    query_command = "qstat"
    cancel_command = "qdel"
    unused_jobqueue_parameters = frozenset({"project"})

    def detect(self) -> str | None:
        """A ``qsub`` on PATH while ``SGE_ROOT`` is unset."""
        found = super().detect()
        if found is None or os.environ.get("SGE_ROOT"):
            return None
        return f"{found} without SGE_ROOT"

    def query_job_states(self, job_ids: list[str], memory: dict[str, Any]
                         ) -> dict[str, QueueState] | None:
        """``qstat -f``: state and comment of each job."""
        result = run_command(["qstat", "-f", *job_ids])
        if result is None:
            return None
        unknown = (result.returncode == 153 or "Unknown Job" in result.stderr
                   or "has finished" in result.stderr)
        if result.returncode != 0 and not unknown:
            logger.debug("qstat failed: %s", result.stderr.strip())
            return None
        listed = {}
        for job_id, attributes in parse_qstat_full(result.stdout).items():
            state = attributes.get("job_state", "gone")
            comment = attributes.get("comment") or None
            never_starts = state in ("Q", "H") and pbs_comment_never_clears(comment)
            listed[job_id] = QueueState(state, comment, never_starts)
        return {job_id: listed.get(job_id, QueueState("gone")) for job_id in job_ids}

    def state_is_active(self, state: str) -> bool:
        """Whether a job in this state letter may still run (C, E, F, X: over)."""
        return state in PBS_ACTIVE_STATES

    def list_user_jobs(self, user: str) -> list[QueuedJob]:
        """``qstat -f``: the user's jobs (``Job_Owner``) named ``fhpc-...``."""
        jobs = []
        for job_id, fields in parse_qstat_full(read_command(["qstat", "-f"])).items():
            owner = fields.get("Job_Owner", "").split("@")[0]
            name = fields.get("Job_Name", "")
            if owner == user and name.startswith(JOB_NAME_PREFIX):
                jobs.append(QueuedJob(self.name, job_id, name, fields.get("job_state", "")))
        return jobs

    def scheduler_options(self, resources: Any, backend_options: dict[str, Any], cores: int,
                          memory_request: bool) -> dict[str, Any]:
        """The account; a ``select`` without ``mem`` when no memory is asked for."""
        options = super().scheduler_options(resources, backend_options, cores, memory_request)
        if not memory_request:
            options["resource_spec"] = f"select=1:ncpus={cores}"
        return options


    #: The option table refuses ``job_array`` on PBS (``PBS_JOB_ARRAY_REFUSAL``), with why.
    job_array_refusal = "futures_hpc does not submit PBS job arrays yet"

    def gpu_options(self, gpus: int, cores: int, memory_bytes: int | None) -> dict[str, Any]:
        """``-l select=1:ncpus=N:ngpus=G[:mem=M]``: GPUs are a chunk resource of the select."""
        spec = f"select=1:ncpus={cores}:ngpus={gpus}"
        if memory_bytes:
            spec += f":mem={math.ceil(memory_bytes / 2**20)}mb"
        return {"resource_spec": spec, "job_extra_directives": []}


#: The PBS batch system (this module's contract object, see :mod:`.system`).
SYSTEM = PBSSystem()


class PBSExecutor(JobQueueExecutor):
    """Executor whose workers are PBS (PBS Pro, OpenPBS, Torque) jobs (``PBSCluster``).

    ``cores`` and ``memory`` -> ``-l select=1:ncpus=N:mem=M``, ``walltime`` ->
    ``-l walltime=``, ``queue`` -> ``-q``, ``account`` -> ``-A``, ``job_extra`` -> more ``#PBS``
    lines. ``resource_spec`` replaces the ``select`` line; other ``PBSCluster`` arguments pass
    through.
    """

    provider = batch_provider(SYSTEM)
