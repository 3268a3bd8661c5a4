"""The executor suite and the batch suite on the real SLURM started by ci/slurm.sh.

Workers are real SLURM jobs; the tests read SLURM's own view of them (squeue, scontrol).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time

import pytest

from conftest import require
from futures_hpc.backends.jobqueue import SLURMExecutor
from futures_hpc.errors import JobSubmissionError
from tests.backends.batch_helpers import *  # noqa: F403 - the batch suite
from tests.backends.batch_helpers import (
    BatchSystem,
    run,
    scontrol_job,
    slurm_queued_job_ids,
    wait_for,
    wait_for_workers,
    wait_until_no_jobs,
)
from tests.executor_suite import *  # noqa: F403 - the shared executor suite

# isort: split
# Collected last: their waits must not idle the suite's executor (`ex`) between its tests.
from tests.backends.waiting_suite import *  # noqa: F403 - jobs that wait
from tests.backends.waiting_suite import NEVER_STARTS_WITHIN_SECONDS

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def slurm_is_up() -> tuple[bool, str]:
    if shutil.which("sbatch") is None:
        return False, "sbatch is not on PATH: run ci/slurm.sh"
    result = subprocess.run(["sinfo", "--noheader", "--format=%a %T"], capture_output=True,
                            text=True, timeout=30)
    usable = any(line.split()[:1] == ["up"] and not any(
        bad in line for bad in ("down", "drain", "fail")) for line in result.stdout.splitlines())
    return usable, f"no usable SLURM partition (sinfo: {result.stdout.strip()} {result.stderr})"


@pytest.fixture(scope="module")
def batch():
    up, reason = slurm_is_up()
    require(up, reason)
    return BatchSystem(
        backend="slurm",
        queue="debug",
        rejection_text="invalid partition",
        job_id_variable="SLURM_JOB_ID",
        cancel_command="scancel",
        queued_job_ids=slurm_queued_job_ids,
        never_starts_texts={"cores": "reason: PartitionConfig",
                            "memory": "Memory specification can not be satisfied"},
        hold_directive="--hold",
        held_state="PENDING",
        held_reason="JobHeldUser",
        release_command="scontrol release",
    )


def test_slurm_holds_the_requested_resources(batch):
    with SLURMExecutor(
        max_workers=2, processes=2, cores=2, memory="1GB", walltime="00:07:00",
        queue="debug", account="futures-hpc-account",
        job_extra=["--comment=futures-hpc-test"],
    ) as executor:
        script = executor.job_script()
        for line in ("#SBATCH --cpus-per-task=2", "#SBATCH --mem=954M", "#SBATCH -t 00:07:00",
                     "#SBATCH -p debug", "#SBATCH -A futures-hpc-account",
                     "#SBATCH --comment=futures-hpc-test", "--nworkers 2"):
            assert line in script
        # max_workers counts worker processes: 2 processes per job make 1 job.
        [job_id] = executor.job_ids()
        job = scontrol_job(job_id)
    assert job["JobName"] == executor.run_name
    assert job["MinCPUsNode"] == "2"
    assert job["MinMemoryNode"] == "954M"
    assert job["TimeLimit"] == "00:07:00"
    assert job["Partition"] == "debug"
    assert job["Account"] == "futures-hpc-account"
    assert job["Comment"] == "futures-hpc-test"
    assert job["StdErr"].startswith(str(executor.log_dir))


def test_without_memory_no_memory_is_requested(batch):
    with SLURMExecutor(max_workers=1, cores=1) as executor:
        assert "#SBATCH --mem" not in executor.job_script()
        assert "--memory-limit auto" in executor.job_script()
        [job_id] = executor.job_ids()
        job = scontrol_job(job_id)
    # The cluster's default applies (DefMemPerCPU, set by ci/slurm.sh), not a guess of ours:
    # a --mem request would show as MinMemoryNode.
    assert job["JobName"] == executor.run_name
    assert "MinMemoryCPU" in job and "MinMemoryNode" not in job


def test_security_false_gives_a_plain_tcp_cluster(batch):
    with SLURMExecutor(max_workers=1, cores=1, memory="512MB", security=False) as executor:
        assert executor.cluster.scheduler_address.startswith("tcp://")
        assert executor.credentials is None
        assert "--tls-" not in executor.job_script()
        assert executor.submit(sum, [2, 3]).result(timeout=120) == 5


def failed_job(batch) -> str:
    """The id of a SLURM job that has failed (for dependencies that can never be satisfied)."""
    failed = run(["sbatch", "--parsable", "-p", batch.queue, "-t", "00:01:00",
                  "--job-name=fhpc-test-failing-dependency", "--output=/dev/null",
                  "--wrap", "exit 3"])
    assert failed.returncode == 0, failed.stderr
    failed_job_id = failed.stdout.strip().split(";")[0]
    assert wait_for(lambda: scontrol_job(failed_job_id)["JobState"] == "FAILED", 60), (
        scontrol_job(failed_job_id))
    return failed_job_id


def test_a_dependency_that_can_never_be_satisfied_fails_the_run(batch):
    """afterok on a job that failed: SLURM says DependencyNeverSatisfied, which never clears."""
    failed_job_id = failed_job(batch)
    started = time.monotonic()
    with batch.executor(max_workers=1,
                        job_extra=[f"--dependency=afterok:{failed_job_id}"]) as executor:
        with pytest.raises(JobSubmissionError, match="reason: DependencyNeverSatisfied"):
            executor.submit(sum, [1, 2]).result(timeout=60)
    assert time.monotonic() - started < NEVER_STARTS_WITHIN_SECONDS
    assert wait_until_no_jobs(batch, executor.run_name) == []


def test_never_start_verdict_is_doubted_once_the_same_script_has_started(batch, caplog):
    """A job of a run whose other job runs is said never to start: the run keeps working.

    Both jobs are submitted on hold; the first is released and its worker connects; the second
    gets a dependency on a failed job before release (DependencyNeverSatisfied). The request
    evidently can start, so the executor warns and waits instead of failing the run.
    """
    caplog.set_level(logging.INFO, logger="futures_hpc")
    failed_job_id = failed_job(batch)
    with batch.executor(max_workers=2, adaptive=False, job_extra=["--hold"]) as executor:
        first, second = executor.job_ids()
        assert run(["scontrol", "release", first]).returncode == 0
        wait_for_workers(executor, 1)
        updated = run(["scontrol", "update", f"JobId={second}",
                       f"Dependency=afterok:{failed_job_id}"])
        assert updated.returncode == 0, updated.stdout + updated.stderr
        assert run(["scontrol", "release", second]).returncode == 0
        assert wait_for(lambda: executor.status().pending_reasons.get(second)
                        == "PENDING: DependencyNeverSatisfied", 60), executor.status()
        time.sleep(3)  # more looks at the queue: still no failure
        assert executor.submit(sum, [1, 2]).result(timeout=60) == 3
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING and f"job {second} " in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert "DependencyNeverSatisfied" in warnings[0]
    assert "but jobs of this run with the same script did: waiting" in warnings[0]
    assert wait_until_no_jobs(batch, executor.run_name) == []
