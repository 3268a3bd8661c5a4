"""The executor suite and the batch suite on the real Grid Engine started by ci/sge.sh.

Workers are real Grid Engine jobs; the tests read Grid Engine's own view of them (qstat -j).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import require
from futures_hpc.backends.batch.sge import SGEExecutor
from tests.backends.batch_helpers import *  # noqa: F403 - the batch suite
from tests.backends.batch_helpers import BatchSystem, run, sge_queued_job_ids
from tests.executor_suite import *  # noqa: F403 - the shared executor suite

# isort: split
# Collected last: their waits must not idle the suite's executor (`ex`) between its tests.
from tests.backends.waiting_suite import *  # noqa: F403 - jobs that wait

pytestmark = [pytest.mark.sge, pytest.mark.timeout(300)]

#: Written by ci/sge.sh: the environment Grid Engine's commands need.
SGE_ENV_FILE = Path("/etc/futures_hpc-sge.env")


def sge_environment() -> dict[str, str]:
    """SGE_ROOT and SGE_CELL from the file ci/sge.sh writes."""
    environment = {}
    for line in SGE_ENV_FILE.read_text().splitlines():
        name, equals, value = line.removeprefix("export ").partition("=")
        if equals and name in ("SGE_ROOT", "SGE_CELL"):
            environment[name] = value.strip().strip('"')
    return environment


@pytest.fixture(scope="module")
def batch():
    require(SGE_ENV_FILE.is_file(), f"{SGE_ENV_FILE} is missing: run ci/sge.sh")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in sge_environment().items():
            patch.setenv(name, value)
        qsub = shutil.which("qsub")
        require(qsub is not None and run(["qstat", "-g", "c"]).returncode == 0,
                "Grid Engine does not answer qstat: run ci/sge.sh")
        yield BatchSystem(
            backend="sge",
            queue="all.q",
            rejection_text="unknown queue",
            job_id_variable="JOB_ID",
            cancel_command="qdel",
            queued_job_ids=sge_queued_job_ids,
            never_starts_texts=dict.fromkeys(("cores", "memory"),
                                             "verification: no suitable queues"),
            hold_directive="-h",
            held_state="hqw",
            held_reason="Job is in hold state",
            release_command="qrls",
        )


def qstat_job(job_id: str) -> dict[str, str]:
    """What Grid Engine holds about a job (``qstat -j``), as ``key: value`` pairs."""
    result = run(["qstat", "-j", job_id])
    assert result.returncode == 0, result.stdout + result.stderr
    pairs = {}
    for line in result.stdout.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            pairs[key.strip()] = value.strip()
    return pairs


def test_grid_engine_job_holds_the_requested_cores_memory_and_more(batch):
    with SGEExecutor(
        max_workers=2, processes=2, cores=2, memory="1GB", walltime="00:07:00",
        queue="all.q", account="futures-hpc-account", job_extra=["-ac futures_hpc_test=1"],
    ) as executor:
        script = executor.job_script()
        for line in ("#$ -N " + executor.run_name, "#$ -pe smp 2", "#$ -l mem_free=477M",
                     "#$ -l h_rt=00:07:00", "#$ -q all.q", "#$ -A futures-hpc-account",
                     "#$ -ac futures_hpc_test=1", "--nworkers 2"):
            assert line in script
        [job_id] = executor.job_ids()
        job = qstat_job(job_id)
    assert job["job_name"] == executor.run_name
    # Grid Engine books consumables per slot: 2 slots of 477 MiB make the 1 GB asked for.
    assert job["parallel environment"] == "smp range: 2"
    assert set(job["hard resource_list"].split(",")) == {"mem_free=477M", "h_rt=420"}
    assert job["hard_queue_list"] == "all.q"
    assert job["account"] == "futures-hpc-account"
    assert job["context"] == "futures_hpc_test=1"


def test_one_core_jobs_need_no_parallel_environment(batch):
    with SGEExecutor(max_workers=1, cores=1, memory="256MB",
                     parallel_environment="no-such-pe") as executor:
        assert "-pe " not in executor.job_script()
        assert "#$ -l mem_free=245M" in executor.job_script()
