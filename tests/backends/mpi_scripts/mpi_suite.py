"""The executor suite on MPIExecutor under mpirun, plus what only the mpirun mode promises.

Run on rank 0 of ``mpirun -n 4`` by ``run_suite.py`` (rank 0: client and scheduler, ranks 1 to 3:
workers);
``tests/backends/test_mpi.py`` starts that and checks the outcome.
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import distributed
import pytest
from distributed.deploy import Cluster

from futures_hpc import HPCExecutor
from futures_hpc.backends.mpi import MPIExecutor
from futures_hpc.errors import OptionError
from tests.executor_suite import *  # noqa: F403 - the shared executor suite

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORKER_RANKS = {"1", "2", "3"}


@pytest.fixture(scope="module")
def ex():
    with MPIExecutor() as executor:
        yield executor


@pytest.fixture
def make_executor():
    def make():
        return MPIExecutor()

    return make


def rank_of_call(seconds):
    time.sleep(seconds)
    return os.environ["OMPI_COMM_WORLD_RANK"]


def environment_and_threads(name):
    return os.environ.get(name), distributed.get_worker().state.nthreads


def test_runs_on_the_ranks_of_this_mpirun(ex):
    assert os.environ["OMPI_COMM_WORLD_RANK"] == "0"
    assert ex.mode == "world"
    assert isinstance(ex.cluster, Cluster)
    assert ex.cluster.scheduler_address.startswith("tls://")
    names = {worker["name"] for worker in ex.client.scheduler_info()["workers"].values()}
    assert names == {f"{ex.run_name}-rank-{rank}" for rank in WORKER_RANKS}
    assert ex.status().workers == len(WORKER_RANKS)


def test_the_scheduler_runs_in_the_clients_process(ex):
    assert isinstance(ex.cluster.scheduler, distributed.Scheduler)
    assert ex.cluster.scheduler.address == ex.cluster.scheduler_address
    assert ex.client.run_on_scheduler(os.getpid) == os.getpid()
    worker_pids = ex.client.run(os.getpid)
    assert len(worker_pids) == len(WORKER_RANKS)
    assert os.getpid() not in worker_pids.values()


def test_calls_run_on_every_worker_rank(ex):
    ranks = set(ex.map(rank_of_call, [0.05] * 40, chunksize=1))
    assert ranks == WORKER_RANKS


def test_hpc_executor_detects_mpirun_and_runs_beside_another_executor(ex):
    with HPCExecutor(max_workers=1) as second:
        assert type(second) is MPIExecutor
        assert second.cluster.scheduler_address != ex.cluster.scheduler_address
        assert set(second.map(rank_of_call, [0.0] * 10)) == {"1"}
        assert ex.submit(rank_of_call, 0.0).result(timeout=60) in WORKER_RANKS


def test_cores_env_and_plain_tcp_reach_the_worker_ranks():
    with MPIExecutor(cores=2, env={"FUTURES_HPC_MPI_TEST": "yes"}, security=False) as executor:
        assert executor.cluster.scheduler_address.startswith("tcp://")
        outcomes = set(executor.map(environment_and_threads, ["FUTURES_HPC_MPI_TEST"] * 8))
    assert outcomes == {("yes", 2)}


def test_more_workers_than_worker_ranks_is_an_option_error():
    with pytest.raises(OptionError, match="max_workers=4 but this mpirun has 3 worker ranks"):
        MPIExecutor(max_workers=4)


def test_dask_collections_and_joblib_run_on_the_worker_ranks():
    import dask
    import joblib

    with MPIExecutor() as executor:
        ranks = dask.compute(*[dask.delayed(rank_of_call)(0.0) for _ in range(8)])
        with joblib.parallel_backend("futures_hpc", executor=executor):
            joblib_ranks = joblib.Parallel(n_jobs=2)(
                joblib.delayed(rank_of_call)(0.0) for _ in range(8)
            )
    assert set(ranks) <= WORKER_RANKS and len(ranks) == 8
    assert set(joblib_ranks) <= WORKER_RANKS and len(joblib_ranks) == 8


def test_cluster_cannot_scale(ex):
    with pytest.raises(NotImplementedError, match="fixed number of workers"):
        ex.cluster.scale(5)
