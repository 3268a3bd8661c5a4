"""The executor suite and the batch suite on the real SLURM started by ci/slurm.sh.

Workers are real SLURM jobs; the tests read SLURM's own view of them (squeue, scontrol).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import dask.config
import pytest

from conftest import require
from futures_hpc import LocalExecutor
from futures_hpc.backends.batch.slurm import SLURMExecutor
from futures_hpc.errors import JobSubmissionError
from tests.backends.batch_helpers import *  # noqa: F403 - the batch suite
from tests.backends.batch_helpers import (
    QUEUE_EMPTY_WITHIN_SECONDS,
    SMALL_WORKERS,
    BatchSystem,
    processes_of_run,
    run,
    scontrol_job,
    slurm_queued_job_ids,
    wait_for,
    wait_for_workers,
    wait_until_no_jobs,
    wait_until_no_processes,
)
from tests.executor_suite import *  # noqa: F403 - the shared executor suite
from tests.security_helpers import (
    listeners_of_a_run,
    open_to_every_interface,
    run_child_until_result,
    wait_until_gone,
)

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


# -- TLS files and listeners (issue 12: keys leave no trace, listeners bind narrowly) ----------


def _scancel_run(run_name: str) -> None:
    subprocess.run(["scancel", f"--name={run_name}"], capture_output=True, timeout=60)


@pytest.mark.parametrize("ending", ["normal", "SIGTERM", "SIGINT"])
def test_no_key_file_is_left_however_the_run_ends(batch, ending, tmp_path):
    run = run_child_until_result(
        "slurm", {**SMALL_WORKERS, "max_workers": 1}, ending, tmp_path / "stderr")
    try:
        # The key existed during the run (checked by the helper), and is gone now.
        assert run.key is not None and run.key.parent == run.log_dir / "tls"
        assert wait_until_gone([run.key, run.certificate]) == [], run.stderr[-3000:]
        assert not (run.log_dir / "tls").exists()
        assert run.tls_files() == []
    finally:
        _scancel_run(run.run)
    assert wait_until_no_jobs(batch, run.run) == []


@pytest.mark.parametrize("sweeper", ["next executor start", "futures-hpc cancel"])
def test_the_key_files_of_a_killed_run_are_deleted_by(batch, sweeper, tmp_path):
    run = run_child_until_result(
        "slurm", {**SMALL_WORKERS, "max_workers": 1}, "SIGKILL", tmp_path / "stderr")
    try:
        assert run.returncode == -signal.SIGKILL
        # SIGKILL leaves them: nothing in the process could run.
        assert run.key.is_file() and run.certificate.is_file()
        if sweeper == "next executor start":
            LocalExecutor(max_workers=1, security=False).shutdown()
        else:
            environment = {**os.environ,
                           "DASK_FUTURES_HPC__DISCOVERY_DIR": dask.config.get(
                               "futures_hpc.discovery-dir")}
            # Named: the jobs of other runs of this user (other tests) are not this test's.
            result = subprocess.run([sys.executable, "-m", "futures_hpc", "cancel", run.run],
                                    capture_output=True, text=True, timeout=120,
                                    env=environment)
            assert result.returncode == 0, result.stdout + result.stderr
            assert run.run in result.stdout or "cancelled" in result.stdout, result.stdout
        assert not run.key.exists() and not run.certificate.exists()
        assert not (run.log_dir / "tls").exists()
    finally:
        _scancel_run(run.run)


def test_no_listener_of_a_slurm_run_is_open_to_every_interface(batch):
    listeners = listeners_of_a_run("slurm", {**SMALL_WORKERS, "max_workers": 2})
    # The scheduler and its dashboard, and per job a nanny, a worker and its HTTP server.
    assert len(listeners) >= 8, listeners
    assert open_to_every_interface(listeners) == [], listeners
    dashboard_hosts = {address.rsplit(":", 1)[0] for address, _, _ in listeners}
    assert "127.0.0.1" in dashboard_hosts, listeners  # the scheduler's dashboard


def test_job_script_binds_the_workers_to_their_route_to_the_scheduler(batch):
    with batch.executor(max_workers=2) as executor:
        script = executor.job_script()
        host = executor.cluster.scheduler_address.split("://", 1)[1].rsplit(":", 1)[0]
        wait_for_workers(executor, 2)
        workers = executor.client.scheduler_info()["workers"]
    assert host not in ("0.0.0.0", "[::]", "")
    assert '--host "$FUTURES_HPC_WORKER_HOST"' in script
    assert '--dashboard-address "$FUTURES_HPC_WORKER_HTTP"' in script
    assert "--no-dashboard" in script
    assert {address.split("://", 1)[1].rsplit(":", 1)[0] for address in workers} == {host}


def test_a_users_scheduler_host_and_worker_host_win(batch):
    with SLURMExecutor(max_workers=1, cores=1, memory="512MB",
                       scheduler_options={"host": "127.0.0.1"},
                       worker_extra_args=["--host", "127.0.0.1"]) as executor:
        assert executor.cluster.scheduler_address.startswith("tls://127.0.0.1:")
        script = executor.job_script()
        assert '--host "$FUTURES_HPC_WORKER_HOST"' not in script
        assert "--host 127.0.0.1" in script
        assert executor.submit(sum, [1, 2]).result(timeout=120) == 3


# A worker preload that makes the worker's start slow, so that the cancel comes while the nanny is
# starting its worker process (the nanny of distributed 2024.1 to 2024.8 then never exits).
_SLOW_WORKER_START = textwrap.dedent("""
    import os, pathlib, time

    def dask_setup(worker):
        pathlib.Path({marker_dir!r}, str(os.getpid())).touch()
        time.sleep(120)
""")


def _kill_wait_seconds() -> float:
    """SLURM's KillWait: how long after the SIGTERM of a cancel its SIGKILL comes."""
    result = run(["scontrol", "show", "config"])
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "KillWait":
            return float(value.split()[0])
    raise AssertionError(f"no KillWait in scontrol show config: {result.stdout[-2000:]}")


@pytest.mark.parametrize("workers_when_closed", ["connected", "starting"])
def test_no_process_of_the_run_outlives_the_executor(batch, tmp_path, workers_when_closed):
    """After shutdown every process of every job is gone, not only the jobs from the queue.

    SLURM here finds a job's processes by parentage (proctrack/linuxproc): a worker whose job
    shell died first is re-parented to init and escapes the cancel's SIGKILL, so a worker that
    does not exit by itself stays for ever (invisible to squeue).
    """
    jobs = 4
    options = {"max_workers": jobs, "min_workers": jobs}  # all 4 stay until the shutdown
    if workers_when_closed == "starting":
        marker_dir = tmp_path / "started"
        marker_dir.mkdir()
        preload = tmp_path / "slow_worker_start.py"
        preload.write_text(_SLOW_WORKER_START.format(marker_dir=str(marker_dir)))
        options["worker_extra_args"] = ["--preload", str(preload)]
    executor = batch.executor(**options)
    run_name = executor.run_name
    try:
        if workers_when_closed == "starting":
            deadline = time.monotonic() + 120
            while len(list(marker_dir.iterdir())) < jobs and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(list(marker_dir.iterdir())) == jobs, processes_of_run(run_name)
        else:
            wait_for_workers(executor, jobs)
            assert executor.submit(sum, [1, 2]).result(60) == 3
        # The helper sees the jobs' processes (shells, nannies, workers), so it can see leftovers.
        running = processes_of_run(run_name)
        assert len(running) >= 3 * jobs, running
    finally:
        executor.shutdown()
    assert wait_until_no_jobs(batch, run_name) == []
    # SLURM's SIGKILL comes KillWait seconds after the SIGTERM; then a few seconds more.
    within = _kill_wait_seconds() + QUEUE_EMPTY_WITHIN_SECONDS
    left = wait_until_no_processes(run_name, timeout=within)
    for pid in left:  # leave nothing behind on this machine, even when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == {}, f"processes of {run_name} alive {within:.0f} s after shutdown: {left}"


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


@pytest.mark.parametrize("always", [False, True], ids=["kills-once", "kills-always"])
def test_a_worker_killed_mid_batch_loses_no_call_and_runs_no_finished_call_again(batch, tmp_path,
                                                                                always):
    """The worker's nanny restarts it inside its SLURM job; tmp_path is on this machine."""
    with batch.executor(max_workers=2, max_call_retries=2, adaptive=False) as executor:
        wait_for_workers(executor, 2)
        check_killed_batch(executor, tmp_path, always)  # noqa: F405 - from the executor suite


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
