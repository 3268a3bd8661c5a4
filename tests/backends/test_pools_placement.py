"""Where a pool's calls may run, on real SLURM: walltime-aware placement and refused pools.

The walltimes are short (90 s) so that the test sees a job run out of time for a call; the
placement is the fair-share policy's (``scaling_policy.decide``), carried out on the real
scheduler with real SLURM jobs. A pool whose jobs SLURM refuses fails alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import cloudpickle
import pytest

from conftest import require
from futures_hpc import HPCExecutor
from futures_hpc.errors import JobSubmissionError, OptionError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

SMALL = {"cores": 1, "memory": "512MB", "dashboard_address": ":0"}


@pytest.fixture(autouse=True)
def _slurm():
    require(shutil.which("sbatch") is not None, "sbatch is not on PATH: run ci/setup.sh")


def job_of_call(value: int) -> tuple[int, str | None, float]:
    """The value, the SLURM job that ran the call, and when (the clock of the node)."""
    return value, os.environ.get("SLURM_JOB_ID"), time.time()


def squeue(run_name: str) -> list[str]:
    result = subprocess.run(["squeue", "--noheader", f"--name={run_name}", "--format=%i"],
                            capture_output=True, text=True, timeout=60)
    return result.stdout.split()


def wait_until_no_jobs(run_name: str, timeout: float = 30.0) -> list[str]:
    """The run's jobs still in the queue once they are gone or ``timeout`` has passed."""
    end = time.monotonic() + timeout
    while (left := squeue(run_name)) and time.monotonic() < end:
        time.sleep(0.5)
    return left


def test_a_call_is_not_started_on_a_job_without_time_left_for_it():
    """A job of 90 s takes calls of ``call_time=60`` only in its first 30 s, later a new job.

    The job's walltime line says 90 s; a call made 40 s after the first job started runs in
    another job, while one made 5 s after it runs in the same job.
    """
    with HPCExecutor("slurm", max_workers=1, idle_timeout=120, **SMALL) as ex:
        pool = ex.with_resources(walltime="00:01:30", call_time=60, max_workers=2)
        _, first_job, started = pool.submit(job_of_call, 0).result(timeout=120)
        scripts = list(ex.log_dir.glob(f"{ex.run_name}-p1-*.sh"))
        assert scripts and "-t 00:01:30" in scripts[0].read_text()
        time.sleep(max(0.0, started + 5 - time.time()))
        _, same_job, _ = pool.submit(job_of_call, 1).result(timeout=60)
        assert same_job == first_job
        time.sleep(max(0.0, started + 40 - time.time()))
        _, later_job, ran_at = pool.submit(job_of_call, 2).result(timeout=120)
        assert later_job != first_job, "a call started on a job with 50 s left of 90"
        assert ran_at - started >= 35
        assert ex.status().pools["pool-1"]["jobs_draining"] + ex.status().pools[
            "pool-1"]["retired_jobs"] >= 1
        run_name = ex.run_name
    assert wait_until_no_jobs(run_name) == []


def test_a_pool_without_walltime_asks_for_twice_its_call_time():
    """No walltime anywhere: the pool's jobs ask for two call times (so each fits a call)."""
    with HPCExecutor("slurm", max_workers=1, **SMALL) as ex:
        pool = ex.with_resources(call_time="01:00:00", max_workers=1)
        assert pool.submit(job_of_call, 1).result(timeout=120)[0] == 1
        script = next(ex.log_dir.glob(f"{ex.run_name}-p1-*.sh")).read_text()
        assert "-t 02:00:00" in script


def test_a_walltime_too_short_for_the_call_time_is_refused_before_any_job():
    with HPCExecutor("slurm", max_workers=1, **SMALL) as ex:
        with pytest.raises(OptionError, match=r"call_time='00:05:00'.*00:02:00"):
            ex.with_resources(walltime="00:02:00", call_time="00:05:00")
        with pytest.raises(OptionError, match="call_time"):
            ex.with_resources(call_time="soon")
        assert ex.status().pools == {}
        jobs = ex.job_ids()
    assert len(jobs) <= 1  # the executor's own job only


def test_a_pool_whose_jobs_are_refused_fails_alone():
    """``gpus=1`` on this SLURM (no GPU, no gres configured): sbatch refuses the pool's job.

    The pool's call fails with sbatch's own message and so does a later call of the pool;
    the executor's own calls run on, and nothing is left in the queue.
    """
    with HPCExecutor("slurm", max_workers=1, **SMALL) as ex:
        gpu = ex.with_resources(gpus=1)
        with pytest.raises(JobSubmissionError, match=r"(?s)refused a job of pool-1.*gres"):
            gpu.submit(abs, -3).result(timeout=90)
        script = next(ex.log_dir.glob(f"{ex.run_name}-p1-*.sh")).read_text()
        assert "#SBATCH --gres=gpu:1" in script
        assert ex.submit(abs, -4).result(timeout=90) == 4
        with pytest.raises(JobSubmissionError, match="gres"):
            gpu.submit(abs, 1)
        assert ex.status().pools["pool-1"]["running_calls"] == 0
        run_name = ex.run_name
    assert wait_until_no_jobs(run_name) == []
