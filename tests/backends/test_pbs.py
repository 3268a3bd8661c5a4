"""The executor suite and the batch suite on PBS: SLURM's own PBS wrappers (qsub, qstat, qdel).

No PBS server is packaged for Debian, so ci/pbs.sh unpacks SLURM's wrappers into a directory of
their own; only these tests put it first on PATH (Grid Engine's qsub is in /usr/bin). The jobs are
SLURM jobs underneath, so the resource test reads SLURM's view of them (``scontrol``): the
wrapper's ``qstat -f`` does not show the memory request.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import require
from futures_hpc.backends.batch.pbs import PBSExecutor
from tests.backends.batch_helpers import *  # noqa: F403 - the batch suite
from tests.backends.batch_helpers import (
    BatchSystem,
    pbs_queued_job_ids,
    scontrol_job,
)
from tests.executor_suite import *  # noqa: F403 - the shared executor suite

# isort: split
# Collected last: their waits must not idle the suite's executor (`ex`) between its tests.
from tests.backends.waiting_suite import *  # noqa: F403 - jobs that wait

pytestmark = [pytest.mark.pbs, pytest.mark.timeout(300)]

#: Written by ci/pbs.sh: the directory of the PBS wrappers.
PBS_PATHDIR_FILE = Path("/opt/futures_hpc-pbs/PATHDIR")


@pytest.fixture(scope="module")
def batch():
    require(PBS_PATHDIR_FILE.is_file(), f"{PBS_PATHDIR_FILE} is missing: run ci/pbs.sh")
    wrapper_dir = PBS_PATHDIR_FILE.read_text().strip()
    require(shutil.which("sbatch") is not None, "sbatch is not on PATH: run ci/slurm.sh")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
        patch.delenv("SGE_ROOT", raising=False)
        require(shutil.which("qsub") == os.path.join(wrapper_dir, "qsub"),
                f"qsub on PATH is {shutil.which('qsub')}, not the wrapper in {wrapper_dir}")
        yield BatchSystem(
            backend="pbs",
            queue="debug",
            rejection_text="invalid partition",
            job_id_variable="SLURM_JOB_ID",  # real PBS: PBS_JOBID
            cancel_command="qdel",
            queued_job_ids=pbs_queued_job_ids,
            # The wrapper's qsub runs sbatch, which refuses these requests at once.
            never_starts_texts={"cores": "CPU count per node can not be satisfied",
                                "memory": "Memory specification can not be satisfied"},
            hold_directive="-h",
            # The wrapper's qstat shows a held job as Q and gives no comment (reason).
            held_state="Q",
            release_command="qrls",
        )


def test_pbs_job_holds_the_requested_resources(batch):
    with PBSExecutor(
        max_workers=2, processes=2, cores=2, memory="1GB", walltime="00:07:00",
        queue="debug", account="futures-hpc-account",
        job_extra=["-M futures-hpc@example.org", "-m ae"],
    ) as executor:
        script = executor.job_script()
        for line in ("#PBS -N " + executor.run_name, "#PBS -l select=1:ncpus=2:mem=954MB",
                     "#PBS -l walltime=00:07:00", "#PBS -q debug", "#PBS -A futures-hpc-account",
                     "#PBS -M futures-hpc@example.org", "--nworkers 2"):
            assert line in script
        [job_id] = executor.job_ids()
        job = scontrol_job(job_id)
    assert job["JobName"] == executor.run_name
    assert job["MinCPUsNode"] == "2"
    assert job["MinMemoryNode"] == "954M"
    assert job["TimeLimit"] == "00:07:00"
    assert job["Partition"] == "debug"
    assert job["Account"] == "futures-hpc-account"
    assert job["MailUser"] == "futures-hpc@example.org"
    # The wrapper's qsub names the logs itself; they land in the run's log directory.
    assert job["StdOut"].startswith(str(executor.log_dir))


def test_without_memory_no_memory_is_requested(batch):
    with PBSExecutor(max_workers=1, cores=2) as executor:
        assert "#PBS -l select=1:ncpus=2\n" in executor.job_script()
        assert "--memory-limit auto" in executor.job_script()
