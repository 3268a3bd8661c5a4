"""Grid Engine (SGE): directives, its queue and scheduling info, detection, cancelling.

``cores`` -> ``-pe <parallel_environment> N``, ``memory`` -> ``-l <memory_resource>=`` per slot,
``walltime`` -> ``-l h_rt=``, ``queue`` -> ``-q``, ``account`` -> ``-A``. Detected by a ``qsub``
on PATH with ``SGE_ROOT`` set (Grid Engine's commands need it); the queue is read with
``qstat`` (``-j`` for scheduling info, ``qalter -w v`` to verify a waiting job can ever run),
jobs cancelled with ``qdel``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import xml.etree.ElementTree as ElementTree
from typing import Any

from .commands import read_command, run_command
from .executor import JobQueueExecutor, batch_provider
from .jobs import QueueState
from .system import JOB_NAME_PREFIX, BatchSystem, QueuedJob

logger = logging.getLogger("futures_hpc")


def parse_qstat_tasks(text: str) -> dict[str, str]:
    """``qstat -g d`` output as job id -> state; an array task's id is ``<job>.<task>``."""
    lines = text.splitlines()
    column = next((line.find("ja-task-ID") for line in lines if "ja-task-ID" in line), -1)
    listed = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and fields[0].isdigit():
            task = line[column:].strip() if column > 0 else ""
            job_id = f"{fields[0]}.{task}" if task.isdigit() else fields[0]
            listed[job_id] = fields[4]
    return listed


class SGESystem(BatchSystem):
    """Grid Engine: ``qsub``, ``qstat``, ``qdel`` (and ``qalter -w v`` when there)."""

    name = "sge"
    title = "Grid Engine"
    jobqueue_cluster = "SGECluster"
    submit_command = "qsub"
    query_command = "qstat"
    cancel_command = "qdel"

    def detect(self) -> str | None:
        """A ``qsub`` on PATH with ``SGE_ROOT`` set."""
        found = super().detect()
        if found is None or not os.environ.get("SGE_ROOT"):
            return None
        return f"{found} with SGE_ROOT={os.environ['SGE_ROOT']}"

    def unavailable_reason(self) -> str | None:
        """Missing commands, or SGE_ROOT unset (Grid Engine's commands need it)."""
        reason = super().unavailable_reason()
        if reason is None and not os.environ.get("SGE_ROOT"):
            reason = (
                "the 'sge' backend needs SGE_ROOT (and SGE_CELL) set as Grid Engine's "
                "settings.sh sets them; SGE_ROOT is not set"
            )
        return reason

    def query_job_states(self, job_ids: list[str], memory: dict[str, Any]
                         ) -> dict[str, QueueState] | None:
        """``qstat``: each job's state; for waiting ones, scheduling info and verification."""
        # qstat without arguments lists the user's pending and running jobs; ended ones vanish.
        # -g d: one line per array task (``1234.3``), its index in the ja-task-ID column.
        result = run_command(["qstat", "-g", "d"])
        if result is None or result.returncode != 0:
            return None
        listed = parse_qstat_tasks(result.stdout)
        # qw (waiting), hqw (held), Rqw (rescheduled)...; Eqw is an error, not a wait.
        waiting = [job_id for job_id in job_ids
                   if listed.get(job_id, "").endswith("qw") and "E" not in listed[job_id]]
        # Scheduling info and verification are the whole job's (an array's tasks share them).
        reasons = self._scheduling_info(list(dict.fromkeys(
            job_id.split(".")[0] for job_id in waiting))) if waiting else {}
        states = {}
        for job_id in job_ids:
            state = listed.get(job_id, "gone")
            base = job_id.split(".")[0]
            verdict = (self._verify(base, memory) if job_id in waiting and "h" not in state
                       else None)
            states[job_id] = QueueState(state, verdict or reasons.get(base), verdict is not None)
        return states

    job_array_refusal = None
    array_task_variable = "SGE_TASK_ID"
    array_first_index = 1
    directive_prefix = "#$"

    def array_directives(self, first: int, last: int, throttle: int) -> list[str]:
        """``-t first-last`` and ``-tc throttle``."""
        return [f"-t {first}-{last}", f"-tc {throttle}"]

    def array_element_id(self, array_id: str, index: int) -> str:
        """``1234.3``: what ``qdel`` takes for one task (and ``qstat -g d`` lists)."""
        return f"{array_id}.{index}"

    def _scheduling_info(self, job_ids: list[str]) -> dict[str, str]:
        """The scheduler's "scheduling info" of waiting jobs (``qstat -j``), by job id.

        Grid Engine gives it only when the scheduler's ``schedd_job_info`` is on.
        """
        result = run_command(["qstat", "-j", ",".join(job_ids)])
        if result is None or result.returncode != 0:
            return {}
        reasons: dict[str, list[str]] = {}
        job_id, in_info = None, False
        for line in result.stdout.splitlines():
            key, colon, value = line.partition(":")
            if line[:1].isspace() and in_info and job_id is not None:
                reasons[job_id].append(line.strip())
                continue
            in_info = False
            if colon and key.strip() == "job_number":
                job_id = value.strip()
            elif colon and key.strip() == "scheduling info" and job_id is not None:
                in_info = True
                reasons[job_id] = [value.strip()]
        return {
            job_id: "; ".join(line for line in lines if line)
            for job_id, lines in reasons.items()
            if lines and not lines[0].startswith("(Collecting of scheduler job information")
        }

    def _verify(self, job_id: str, verifications: dict[str, Any]) -> str | None:
        """Grid Engine's word that a waiting job can never run, or None if it can (or is unsure).

        ``qalter -w v`` schedules the job on an empty cluster (every slot and consumable free,
        load ignored) without changing it; "no suitable queues" means no queue, host or
        parallel environment could ever take it as requested. Asked once per job: the answers
        are kept in ``verifications`` (job id -> the text, or None when it can run).
        """
        if job_id not in verifications and shutil.which("qalter") is None:
            verifications[job_id] = None  # cannot ask: waiting stays bounded by start_timeout
        if job_id not in verifications:
            result = run_command(["qalter", "-w", "v", job_id])
            if result is None:
                return None  # ask again next time
            output = "\n".join(text.strip() for text in (result.stdout, result.stderr)
                               if text.strip())
            cannot_run = "no suitable queues" in output
            verifications[job_id] = (
                "; ".join(line.strip() for line in output.splitlines() if line.strip())
                if cannot_run else None
            )
        return verifications[job_id]

    def state_is_active(self, state: str) -> bool:
        """Whether a job in this state may still run a worker."""
        # E: error (the job can never start), d: being deleted; anything else may still run.
        return state != "gone" and "E" not in state and "d" not in state

    def list_user_jobs(self, user: str) -> list[QueuedJob]:
        """``qstat -u user -xml``: the user's jobs named ``fhpc-...``."""
        output = read_command(["qstat", "-u", user, "-xml"])
        try:
            listing = ElementTree.fromstring(output)
        except ElementTree.ParseError as error:
            raise RuntimeError(f"qstat -u {user} -xml gave no XML ({error})") from error
        jobs = []
        for element in listing.iter("job_list"):
            name = element.findtext("JB_name", "")
            if name.startswith(JOB_NAME_PREFIX):
                jobs.append(QueuedJob(
                    self.name,
                    element.findtext("JB_job_number", "").strip(),
                    name,
                    element.findtext("state", element.get("state", "")).strip(),
                ))
        return jobs

    own_option_names = frozenset({"parallel_environment", "memory_resource"})

    def scheduler_options(self, resources: Any, backend_options: dict[str, Any], cores: int,
                          memory_request: bool) -> dict[str, Any]:
        """``-pe`` for several cores, memory per slot, ``-A``: all as job directives."""
        directives = []
        if cores > 1:
            environment = backend_options.get("parallel_environment") or "smp"
            directives.append(f"-pe {environment} {cores}")
        memory_resource = backend_options.get("memory_resource") or "mem_free"
        if resources.memory_bytes and "resource_spec" not in backend_options:
            per_slot_mebibytes = math.ceil(resources.memory_bytes / cores / 2**20)
            directives.append(f"-l {memory_resource}={per_slot_mebibytes}M")
        if resources.account:
            directives.append(f"-A {resources.account}")
        return {"job_extra_directives": directives + list(resources.job_extra)}


#: The Grid Engine batch system (this module's contract object, see :mod:`.system`).
SYSTEM = SGESystem()


class SGEExecutor(JobQueueExecutor):
    """Executor whose workers are Grid Engine jobs (``dask_jobqueue.SGECluster``).

    ``cores`` -> ``-pe <parallel_environment> N`` (when above 1), ``memory`` ->
    ``-l <memory_resource>=<memory per slot>`` (Grid Engine books consumables per slot),
    ``walltime`` -> ``-l h_rt=``, ``queue`` -> ``-q``, ``account`` -> ``-A``, ``job_extra`` ->
    more ``#$`` lines. ``resource_spec`` replaces the memory request; ``project`` gives ``-P``;
    other ``SGECluster`` arguments pass through.

    Other Parameters
    ----------------
    parallel_environment : str
        The parallel environment for multi-core jobs (default ``"smp"``; ``qconf -spl`` lists
        them).
    memory_resource : str
        The consumable that books memory (default ``"mem_free"``). Avoid ``h_vmem``: Grid
        Engine enforces it on virtual memory, which a dask worker uses far more of than RAM.

    """

    provider = batch_provider(SYSTEM)
