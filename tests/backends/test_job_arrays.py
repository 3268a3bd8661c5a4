"""Job arrays (``job_array=True``) on the real SLURM and Grid Engine (ci/setup.sh starts them).

Every test reads the batch system's own view of the jobs (``squeue``/``qstat``) and the run's
log directory; elements are cancelled with ``scancel``/``qdel`` as a user would. The SLURM node
here has 2 CPUs shared with other tests: most elements pend, which is what the tests expect.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from conftest import require
from futures_hpc import HPCExecutor
from futures_hpc.backends.batch.slurm import SYSTEM as SLURM
from futures_hpc.errors import OptionError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(600)]

SMALL = {"cores": 1, "memory": "256MB", "walltime": "00:05:00", "dashboard_address": ":0"}
SGE_ENVIRONMENT = Path("/etc/futures_hpc-sge.env")


def squeue(run_name: str) -> dict[str, str]:
    """Job id -> state of the run's jobs still in the queue, one line per array element."""
    result = subprocess.run(
        ["squeue", "--noheader", "--array", f"--name={run_name}", "--format=%i %T"],
        capture_output=True, text=True, timeout=60)
    return dict(line.split()[:2] for line in result.stdout.splitlines() if line.strip())


def wait_for(condition, timeout: float, interval: float = 0.5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(interval)
    return False


def submitted_scripts(log_dir: Path) -> list[Path]:
    """The job scripts the run submitted (each element's ``<name>.sh`` links to its array's)."""
    return sorted(path for path in log_dir.glob("*.sh") if not path.is_symlink())


def double(value: int) -> int:
    return 2 * value


@pytest.fixture
def slurm():
    require(shutil.which("sbatch") is not None, "sbatch is not on PATH: run ci/setup.sh")


def test_job_array_option_is_checked_and_refused_where_unsupported(slurm):
    with pytest.raises(OptionError, match="job_array='yes' is not allowed"):
        HPCExecutor("slurm", max_workers=2, job_array="yes", **SMALL)
    with pytest.raises(OptionError, match="job_array=0 is not allowed"):
        HPCExecutor("slurm", max_workers=2, job_array=0, **SMALL)
    with pytest.raises(OptionError, match="PBS job arrays"):
        HPCExecutor("pbs", max_workers=2, job_array=True, **SMALL)


def test_queue_reads_each_pending_element(slurm, tmp_path):
    """The pending elements of a held array each have their state (not one ``1234_[0-3]``)."""
    script = tmp_path / "held.sh"
    script.write_text("#!/bin/bash\n#SBATCH -J fhpc-arrays-held\n#SBATCH -t 00:01:00\n"
                      f"#SBATCH -o {tmp_path}/%A_%a.out\nsleep 1\n")
    output = subprocess.run(["sbatch", "--hold", "--array=0-3%1", str(script)],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    array_id = output.split()[-1]
    elements = [f"{array_id}_{index}" for index in range(4)]
    try:
        states = SLURM.query_job_states(elements, {})
    finally:
        subprocess.run(["scancel", array_id], timeout=60)
    assert {job_id: state.state for job_id, state in states.items()} == dict.fromkeys(
        elements, "PENDING"), states
    assert not any(state.never_starts for state in states.values())


def test_eight_workers_come_from_one_sbatch_and_a_cancelled_element_is_replaced(slurm, caplog):
    """Fixed size: the 8 jobs are one array; ``scancel <array>_3`` is replaced by the policy.

    At the end the array is cancelled by its id, in one ``scancel`` with the replacement.
    """
    caplog.set_level(logging.INFO, logger="futures_hpc")
    with HPCExecutor("slurm", max_workers=8, adaptive=False, job_array=True,
                     max_resubmissions=2, **SMALL) as ex:
        run_name, log_dir = ex.run_name, Path(ex.log_dir)
        assert len(ex.array_ids()) == 1
        array_id = ex.array_ids()[0]
        assert ex.job_ids() == [f"{array_id}_{index}" for index in range(8)]
        scripts = submitted_scripts(log_dir)
        assert len(scripts) == 1, scripts  # one sbatch
        script = scripts[0].read_text()
        assert "#SBATCH --array=0-7%8" in script
        assert script.count("--name ") == 8 and "$SLURM_ARRAY_TASK_ID" in script.replace(
            "${SLURM_ARRAY_TASK_ID}", "$SLURM_ARRAY_TASK_ID")
        queued = squeue(run_name)
        assert queued and {job_id.split("_")[0] for job_id in queued} == {array_id}, queued
        # futures-hpc jobs/cancel list elements one by one, as scancel takes them.
        listed = {job.job_id for job in SLURM.list_user_jobs(getpass.getuser())
                  if job.name == run_name}
        assert listed and listed <= set(ex.job_ids()), listed

        assert list(ex.map(double, range(16))) == [2 * value for value in range(16)]

        subprocess.run(["scancel", f"{array_id}_3"], check=True, timeout=60)
        assert wait_for(lambda: len(ex.job_ids()) == 9, timeout=90), ex.job_ids()
        replacement = ex.job_ids()[-1]
        assert "_" not in replacement  # a single job: submitted alone, as before
        assert ex.status().resubmissions == 1
        assert wait_for(lambda: replacement in squeue(run_name)
                        or ex._job_book.jobs()[-1].connected, timeout=30)
        assert len(submitted_scripts(log_dir)) == 2
        assert list(ex.map(double, range(4))) == [0, 2, 4, 6]
    assert wait_for(lambda: not squeue(run_name), timeout=30), squeue(run_name)
    cancels = [record.getMessage() for record in caplog.records
               if record.getMessage().startswith("cancelled jobs")]
    assert cancels == [f"cancelled jobs {array_id} {replacement}"], cancels


def test_idle_elements_are_released_one_by_one(slurm, caplog):
    """Adaptive: the start's jobs are one array; idle elements are cancelled one by one.

    ``min_workers=1`` keeps one element, so the others must be cancelled as elements, not
    with the array.
    """
    caplog.set_level(logging.INFO, logger="futures_hpc")
    with HPCExecutor("slurm", max_workers=3, min_workers=1, max_pending_jobs=3,
                     idle_timeout=3, job_array=2, **SMALL) as ex:
        run_name = ex.run_name
        array_id = ex.array_ids()[0]
        elements = [f"{array_id}_{index}" for index in range(3)]
        assert ex.job_ids() == elements
        assert "#SBATCH --array=0-2%2" in submitted_scripts(Path(ex.log_dir))[0].read_text()
        assert ex.submit(double, 21).result(timeout=180) == 42
        # No more work: two elements are released while the executor stays open.
        assert wait_for(lambda: ex.status().retired_jobs == 2, timeout=120), ex.status()
        assert wait_for(lambda: len(squeue(run_name)) == 1, timeout=30), squeue(run_name)
        kept = set(squeue(run_name))
        assert kept < set(elements), kept
        released = [record.getMessage().removeprefix("cancelled jobs ")
                    for record in caplog.records
                    if record.getMessage().startswith("cancelled jobs")]
        assert sorted(released) == sorted(set(elements) - kept), released
        assert ex.submit(double, 4).result(timeout=180) == 8
        assert squeue(run_name).keys() == kept
    assert wait_for(lambda: not squeue(run_name), timeout=30), squeue(run_name)


def sleepy_cpus(seconds: float) -> str:
    time.sleep(seconds)
    return os.environ.get("SLURM_CPUS_ON_NODE", "")


def test_pool_jobs_go_in_an_array_of_their_own_shape(slurm):
    """A pool's jobs of one step are one array with the pool's directives."""
    with HPCExecutor("slurm", max_workers=1, job_array=True, **SMALL) as ex:
        assert ex.array_ids() == []  # the executor's one job went out alone
        pool = ex.with_resources(cores=2, max_workers=2)
        futures = [pool.submit(sleepy_cpus, 3) for _ in range(4)]
        assert [future.result(timeout=240) for future in futures] == ["2"] * 4
        assert len(ex.array_ids()) == 1, ex.job_ids()
        scripts = [path.read_text() for path in submitted_scripts(Path(ex.log_dir))]
        arrays = [script for script in scripts if "--array=" in script]
        assert len(arrays) == 1 and "#SBATCH --array=0-1%2" in arrays[0]
        assert "--cpus-per-task=2" in arrays[0]
        assert arrays[0].count("--name ") == 2
        run_name = ex.run_name
    assert wait_for(lambda: not squeue(run_name), timeout=30), squeue(run_name)


# -- Grid Engine --------------------------------------------------------------------------------


@pytest.fixture
def sge(monkeypatch):
    require(SGE_ENVIRONMENT.exists(), "Grid Engine is not set up: run ci/setup.sh")
    for line in SGE_ENVIRONMENT.read_text().splitlines():
        line = line.strip().removeprefix("export ").strip()
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            monkeypatch.setenv(name, os.path.expandvars(value.strip().strip('"\'')))
    require(shutil.which("qsub") is not None and shutil.which("qstat") is not None,
            "Grid Engine commands are not on PATH")


def qstat_tasks() -> dict[str, str]:
    """Every task of the user's jobs: ``job.task`` (or the job id) -> state."""
    from futures_hpc.backends.batch.sge import parse_qstat_tasks

    result = subprocess.run(["qstat", "-g", "d"], capture_output=True, text=True, timeout=60)
    return parse_qstat_tasks(result.stdout)


def test_grid_engine_queue_reads_each_task(sge, tmp_path):
    """``qstat -g d``: each task of a held array has its state, under ``<job>.<task>``."""
    from futures_hpc.backends.batch.sge import SYSTEM as SGE

    script = tmp_path / "held.sh"
    script.write_text(f"#!/bin/bash\n#$ -N fhpc-arrays-held\n#$ -o {tmp_path}/\n#$ -j y\n"
                      "sleep 1\n")
    output = subprocess.run(["qsub", "-h", "-t", "1-3", str(script)], capture_output=True,
                            text=True, check=True, timeout=60).stdout
    array_id = output.split()[2].split(".")[0]  # Your job-array 751.1-3:1 ("...") ...
    tasks = [f"{array_id}.{index}" for index in (1, 2, 3)]
    try:
        states = SGE.query_job_states(tasks, {})
    finally:
        subprocess.run(["qdel", array_id], timeout=60, capture_output=True)
    assert {job_id: state.state for job_id, state in states.items()} == dict.fromkeys(
        tasks, "hqw"), states


def test_grid_engine_array_with_a_cancelled_task_replaced(sge):
    with HPCExecutor("sge", max_workers=3, adaptive=False, job_array=True,
                     max_resubmissions=2, **SMALL) as ex:
        array_id = ex.array_ids()[0]
        assert ex.job_ids() == [f"{array_id}.{index}" for index in (1, 2, 3)]
        script = submitted_scripts(Path(ex.log_dir))[0].read_text()
        assert "#$ -t 1-3" in script and "#$ -tc 3" in script
        assert list(ex.map(double, range(6))) == [2 * value for value in range(6)]
        subprocess.run(["qdel", f"{array_id}.2"], check=True, timeout=60,
                       capture_output=True)
        assert wait_for(lambda: len(ex.job_ids()) == 4, timeout=90), ex.job_ids()
        assert "." not in ex.job_ids()[-1]
        assert ex.submit(double, 5).result(timeout=120) == 10
        job_ids = ex.job_ids()
    assert wait_for(lambda: not set(qstat_tasks()) & set(job_ids), timeout=30)
