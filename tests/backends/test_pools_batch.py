"""Resource pools (``ex.with_resources``) on the real SLURM, PBS and Grid Engine of this machine.

One executor runs 1-core calls on its own jobs and 2-core calls on a pool's jobs; each call
reports what its own job got, read where the batch system puts it (SLURM and the PBS wrappers,
which submit SLURM jobs: ``SLURM_CPUS_ON_NODE``; Grid Engine: ``NSLOTS``) and checked against
the batch system's own view of the job (``scontrol show job``, ``qstat -j``). Nothing is mocked.

There is no GPU here. A GPU pool's job script is read as written for the batch system (without
waiting for the job to run); then SLURM (no ``gpu`` gres) and Grid Engine (no ``gpu`` complex)
refuse the job, and the test checks that the refusal fails that pool's calls only. The PBS
wrappers pass the job on to SLURM without the ``ngpus`` request, so there the job runs, on a CPU,
and its call lands on the worker that declares the ``GPU`` resource.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import distributed
import pytest

from conftest import require
from futures_hpc import HPCExecutor
from futures_hpc.errors import JobFailedError, JobSubmissionError
from futures_hpc.pools import GPU_RESOURCE
from tests.backends.batch_helpers import (
    pbs_queued_job_ids,
    run,
    scontrol_job,
    sge_queued_job_ids,
    slurm_queued_job_ids,
    wait_for,
    wait_until_no_jobs,
)
from tests.backends.test_pbs import PBS_PATHDIR_FILE
from tests.backends.test_sge import SGE_ENV_FILE, qstat_job, sge_environment
from tests.backends.test_slurm import slurm_is_up

pytestmark = pytest.mark.timeout(300)

#: Seconds within which idle jobs must have been released (idle_timeout is 3 s).
RELEASED_WITHIN_SECONDS = 90


@dataclass
class PoolSystem:
    """One batch system as these tests see it.

    Attributes
    ----------
    backend : str
        The futures_hpc backend name.
    job_id_variable, cpus_variable : str
        Where a job finds its id and the CPUs it got.
    gpu_directive : str
        The line of a ``gpus=1`` pool's job script that asks for the GPU.
    gpu_refusal : str or None
        What the batch system says when it refuses that job (None: it accepts it).

    """

    backend: str
    job_id_variable: str
    cpus_variable: str
    gpu_directive: str
    gpu_refusal: str | None

    def queued_job_ids(self, run_name: str) -> list[str]:
        """Jobs of ``run_name`` still in the batch queue."""
        reader = {"slurm": slurm_queued_job_ids, "pbs": pbs_queued_job_ids,
                  "sge": sge_queued_job_ids}[self.backend]
        return reader(run_name)

    def job_cpus(self, job_id: str) -> int:
        """The CPUs the batch system itself says the job holds."""
        if self.backend == "sge":  # slots: one without a parallel environment
            environment = qstat_job(job_id).get("parallel environment", "")
            return int(environment.rpartition("range:")[2] or 1)
        return int(scontrol_job(job_id)["MinCPUsNode"])  # the PBS wrappers' jobs too


@pytest.fixture(scope="module", params=[
    pytest.param("slurm", marks=pytest.mark.slurm),
    pytest.param("pbs", marks=pytest.mark.pbs),
    pytest.param("sge", marks=pytest.mark.sge),
])
def batch(request):
    """The batch system, its commands on PATH and its environment set, for the module."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "slurm":
            up, reason = slurm_is_up()
            require(up, reason)
            yield PoolSystem("slurm", "SLURM_JOB_ID", "SLURM_CPUS_ON_NODE",
                             "#SBATCH --gres=gpu:1", "Invalid generic resource")
        elif request.param == "pbs":
            require(PBS_PATHDIR_FILE.is_file(), f"{PBS_PATHDIR_FILE} is missing: run ci/pbs.sh")
            wrapper_dir = PBS_PATHDIR_FILE.read_text().strip()
            patch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
            patch.delenv("SGE_ROOT", raising=False)
            require(shutil.which("qsub") == os.path.join(wrapper_dir, "qsub"),
                    f"qsub on PATH is {shutil.which('qsub')}, not the wrapper in {wrapper_dir}")
            yield PoolSystem("pbs", "SLURM_JOB_ID", "SLURM_CPUS_ON_NODE",
                             "#PBS -l select=1:ncpus=1:ngpus=1", None)
        else:
            require(SGE_ENV_FILE.is_file(), f"{SGE_ENV_FILE} is missing: run ci/sge.sh")
            for name, value in sge_environment().items():
                patch.setenv(name, value)
            require(shutil.which("qsub") is not None and run(["qstat", "-g", "c"]).returncode == 0,
                    "Grid Engine does not answer qstat: run ci/sge.sh")
            yield PoolSystem("sge", "JOB_ID", "NSLOTS", "#$ -l gpu=1", 'unknown resource "gpu"')


def executor(batch: PoolSystem, **options: Any) -> HPCExecutor:
    """An executor of one 1-core job at most, released after 3 idle seconds."""
    return HPCExecutor(batch.backend, **{
        "max_workers": 1, "cores": 1, "memory": "512MB", "walltime": "00:10:00",
        "idle_timeout": 3, **options})


# -- worker-side functions ----------------------------------------------------------------------


def what_my_job_has(variables: tuple[str, str]) -> dict[str, Any]:
    """The job id and CPUs of the job running this call, and its thread settings."""
    time.sleep(0.2)  # long enough for both pools to be busy at once
    job_id_variable, cpus_variable = variables
    return {
        "job_id": os.environ.get(job_id_variable),
        "cpus": os.environ.get(cpus_variable),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "threads": distributed.get_worker().state.nthreads,
    }


def worker_resources(_: object = None) -> dict[str, float]:
    return dict(distributed.get_worker().state.total_resources)


# -- the tests --------------------------------------------------------------------------------


def test_one_and_two_core_calls_run_side_by_side_each_on_a_job_of_its_shape(batch):
    variables = (batch.job_id_variable, batch.cpus_variable)
    with executor(batch) as ex:
        two_cores = ex.with_resources(cores=2, max_workers=1)
        own = [ex.submit(what_my_job_has, variables) for _ in range(4)]
        pooled = [two_cores.submit(what_my_job_has, variables) for _ in range(4)]
        own_facts = [future.result(timeout=240) for future in own]
        pool_facts = [future.result(timeout=240) for future in pooled]
        for facts, cores in ((own_facts, 1), (pool_facts, 2)):
            for fact in facts:
                assert fact["cpus"] == str(cores), (batch.backend, fact)
                assert fact["omp_threads"] == str(cores), fact
                assert fact["threads"] == cores, fact
        own_jobs = {fact["job_id"] for fact in own_facts}
        pool_jobs = {fact["job_id"] for fact in pool_facts}
        assert len(own_jobs) == len(pool_jobs) == 1 and not own_jobs & pool_jobs
        # The batch system's own view of the jobs, while they still hold their workers.
        [own_job], [pool_job] = own_jobs, pool_jobs
        assert batch.job_cpus(own_job) == 1
        assert batch.job_cpus(pool_job) == 2
        queued = set(batch.queued_job_ids(ex.run_name))
        assert {own_job, pool_job} <= queued, queued

        def both_released() -> bool:
            status = ex.status()
            line = status.pools[two_cores.pool_name]
            return (status.jobs_running == status.jobs_pending == 0
                    and line["jobs_running"] == line["jobs_pending"] == 0)

        assert wait_for(both_released, RELEASED_WITHIN_SECONDS), ex.status()
        assert ex.status().pools[two_cores.pool_name]["retired_jobs"] >= 1
        assert wait_until_no_jobs(batch, ex.run_name) == []
        run_name = ex.run_name
    assert wait_until_no_jobs(batch, run_name) == []


def test_a_gpu_pool_asks_the_batch_system_for_a_gpu(batch):
    """No GPU here: the directive is read from the job script; see the module's docstring."""
    with executor(batch) as ex:
        gpus = ex.with_resources(gpus=1, max_workers=1)
        future = gpus.submit(worker_resources)
        script = ex.log_dir / f"{gpus._pool.job_prefix}0.sh"
        assert wait_for(script.is_file, 60), sorted(os.listdir(ex.log_dir))
        text = script.read_text()
        assert batch.gpu_directive in text, text
        assert f"--resources {gpus._pool.resource}=1,{GPU_RESOURCE}=1" in text, text
        if batch.gpu_refusal is None:
            assert future.result(timeout=240) == {gpus._pool.resource: 1, GPU_RESOURCE: 1}
        else:
            error = future.exception(timeout=120)
            assert isinstance(error, JobSubmissionError), error
            assert batch.gpu_refusal in str(error) and gpus.pool_name in str(error), error
            with pytest.raises(JobSubmissionError, match=gpus.pool_name):
                gpus.submit(worker_resources)
        # The executor's own calls go on, whatever became of the GPU pool.
        assert ex.submit(sum, [1, 2]).result(timeout=240) == 3
        run_name = ex.run_name
    assert wait_until_no_jobs(batch, run_name) == []


def test_a_pool_that_no_node_can_hold_fails_alone(batch):
    """64 cores, more than any node here: the pool's calls fail, the executor's go on.

    SLURM and Grid Engine accept the job and say it can never start (the job is cancelled);
    the PBS wrappers refuse it at submission. Either way the error quotes the batch system and
    names the pool.
    """
    with executor(batch) as ex:
        own = ex.submit(sum, [3, 4])
        assert own.result(timeout=240) == 7  # a worker of the executor's own has connected
        huge = ex.with_resources(cores=64, max_workers=1)
        error = huge.submit(sum, [1, 2]).exception(timeout=120)
        assert isinstance(error, JobSubmissionError), error
        assert huge.pool_name in str(error) and "cores=64" in str(error), error
        with pytest.raises(JobSubmissionError, match=huge.pool_name):
            huge.submit(sum, [1, 2])
        assert ex.submit(sum, [5, 6]).result(timeout=240) == 11
        assert ex.status().pools[huge.pool_name]["running_calls"] == 0
        run_name = ex.run_name
    assert wait_until_no_jobs(batch, run_name) == []


CANCEL_COMMANDS = {"slurm": "scancel", "pbs": "qdel", "sge": "qdel"}


def test_a_pool_whose_jobs_keep_dying_fails_alone(batch):
    """The pool's jobs are cancelled from outside (``scancel``/``qdel``, as an administrator or
    a preemption would end them): they count against ``max_resubmissions`` for the pool alone.

    The first is replaced; the second is one too many, so the pool's calls fail with
    :class:`JobFailedError` naming the pool and both jobs, and the executor's own calls go on
    with none of their resubmissions used.
    """
    variables = (batch.job_id_variable, batch.cpus_variable)
    cancel = CANCEL_COMMANDS[batch.backend]
    with executor(batch, max_resubmissions=1) as ex:
        assert ex.submit(sum, [1, 2]).result(timeout=240) == 3
        two_cores = ex.with_resources(cores=2, max_workers=1)
        first_job = two_cores.submit(what_my_job_has, variables).result(timeout=240)["job_id"]
        assert run([cancel, first_job]).returncode == 0

        def replaced() -> str | None:
            job = two_cores.submit(what_my_job_has, variables).result(timeout=240)["job_id"]
            return job if job != first_job else None

        second_job = wait_for(replaced, 200)
        assert second_job, "the pool's cancelled job was not replaced"
        assert ex.status().pools[two_cores.pool_name]["resubmissions"] == 1
        running = two_cores.submit(time.sleep, 600)
        assert wait_for(lambda: ex.status().pools[two_cores.pool_name]["running_calls"], 30)
        assert run([cancel, second_job]).returncode == 0
        error = running.exception(timeout=150)
        assert isinstance(error, JobFailedError), error
        message = str(error)
        assert two_cores.pool_name in message and "max_resubmissions=1" in message, message
        assert f"job {first_job}" in message and f"job {second_job}" in message, message
        with pytest.raises(JobFailedError, match=two_cores.pool_name):
            two_cores.submit(sum, [1, 2])
        assert ex.submit(sum, [5, 6]).result(timeout=240) == 11
        assert ex.status().resubmissions == 0
        run_name = ex.run_name
    assert wait_until_no_jobs(batch, run_name) == []
