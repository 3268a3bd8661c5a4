"""The joblib backend "futures_hpc": joblib and scikit-learn work on an HPCExecutor."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import threading
import time

import cloudpickle
import dask.config
import joblib
import numpy as np
import psutil
import pytest
from distributed import get_task_stream
from joblib import Parallel, delayed
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

from conftest import require
from futures_hpc import HPCExecutor
from futures_hpc.integrations.joblib import FuturesHPCBackend

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PARAMETER_GRID = {"C": [0.1, 1.0, 10.0], "gamma": [0.01, 0.1, 1.0]}


class CustomError(Exception):
    """An exception type only this module defines."""


def increment(value: int) -> int:
    return value + 1


def process_id(_: object = None) -> int:
    return os.getpid()


def fail_on(value: int, bad: int) -> int:
    if value == bad:
        raise CustomError(f"bad value {value}")
    return value


@pytest.fixture(scope="module")
def ex():
    with HPCExecutor("local", max_workers=2) as executor:
        yield executor


def _grid_search(n_jobs: int) -> GridSearchCV:
    features, labels = load_iris(return_X_y=True)
    return GridSearchCV(SVC(), PARAMETER_GRID, cv=3, n_jobs=n_jobs).fit(features, labels)


def _assert_same_cv_results(sequential: GridSearchCV, parallel: GridSearchCV) -> None:
    assert list(parallel.cv_results_["params"]) == list(sequential.cv_results_["params"])
    for key in ("mean_test_score", "std_test_score", "rank_test_score",
                "split0_test_score", "split1_test_score", "split2_test_score"):
        np.testing.assert_array_equal(parallel.cv_results_[key], sequential.cv_results_[key])
    assert parallel.best_params_ == sequential.best_params_


def _batch_task_count(client) -> int:
    """joblib batches the scheduler has run so far, from its task log (per key prefix)."""

    def count(dask_scheduler) -> int:
        return sum(
            prefix.state_counts.get("memory", 0)
            for name, prefix in dask_scheduler.task_prefixes.items()
            if name.startswith("BatchedCalls")
        )

    return client.run_on_scheduler(count)


def test_backend_is_registered_by_importing_futures_hpc():
    from joblib.parallel import BACKENDS

    assert BACKENDS["futures_hpc"] is FuturesHPCBackend


def test_grid_search_on_the_local_backend_matches_n_jobs_1(ex):
    sequential = _grid_search(n_jobs=1)
    tasks_before = _batch_task_count(ex.client)
    with joblib.parallel_config(backend="futures_hpc", executor=ex):
        parallel = _grid_search(n_jobs=-1)
    _assert_same_cv_results(sequential, parallel)
    # The fits ran as tasks on the executor's cluster, not in this process.
    assert _batch_task_count(ex.client) > tasks_before


@pytest.mark.slurm
def test_grid_search_on_slurm_matches_n_jobs_1():
    require(shutil.which("sbatch") is not None, "no sbatch: the real SLURM is not running here")
    sequential = _grid_search(n_jobs=1)
    with HPCExecutor(
        "slurm", max_workers=2, cores=1, memory="1GB", walltime="00:10:00"
    ) as executor:
        with joblib.parallel_backend("futures_hpc", executor=executor):
            parallel = _grid_search(n_jobs=-1)
        assert executor.backend_name == "slurm"
    _assert_same_cv_results(sequential, parallel)


def test_calls_run_in_the_executors_workers(ex):
    worker_pids = set(ex.client.run(os.getpid).values())
    with joblib.parallel_backend("futures_hpc", executor=ex):
        pids = set(Parallel()(delayed(process_id)(index) for index in range(20)))
    assert pids <= worker_pids
    assert os.getpid() not in pids


def worker_name(_: object = None) -> str:
    import distributed

    return str(distributed.get_worker().name)


def test_a_pool_of_the_executor_is_a_joblib_backend_too():
    """``executor=ex.with_resources(...)``: joblib's calls run on the pool's workers only."""
    with HPCExecutor("local", max_workers=1) as executor:
        pool = executor.with_resources(cores=1, max_workers=2)
        with joblib.parallel_backend("futures_hpc", executor=pool) as (backend, n_jobs):
            assert backend.effective_n_jobs(n_jobs) == pool.worker_slots() == 2
            names = Parallel()(delayed(worker_name)(index) for index in range(20))
        assert names and all(name.startswith("p1-") for name in names)
        assert executor.submit(worker_name).result() == "0"  # the executor's own worker


def test_n_jobs_is_the_executors_worker_slots(ex):
    with joblib.parallel_config(backend="futures_hpc", executor=ex):
        assert joblib.effective_n_jobs(-1) == ex.worker_slots() == 2
        assert joblib.effective_n_jobs(-2) == 1
        assert joblib.effective_n_jobs(5) == 5
        with pytest.raises(ValueError, match="n_jobs == 0"):
            joblib.effective_n_jobs(0)
    with joblib.parallel_backend("futures_hpc", executor=ex) as (backend, n_jobs):
        assert isinstance(backend, FuturesHPCBackend)
        assert backend.executor is ex
        assert backend.effective_n_jobs(n_jobs) == 2


def test_many_small_calls_are_batched(ex):
    call_count = 5000
    tasks_before = _batch_task_count(ex.client)
    started = time.perf_counter()
    with joblib.parallel_config(backend="futures_hpc", executor=ex):
        results = Parallel(n_jobs=2)(delayed(increment)(value) for value in range(call_count))
    elapsed = time.perf_counter() - started
    assert results == list(range(1, call_count + 1))
    tasks = _batch_task_count(ex.client) - tasks_before
    # Auto-batching: far fewer dask tasks than calls (each task costs milliseconds).
    assert 0 < tasks < call_count / 20
    assert elapsed < 30


def test_batches_show_in_the_task_stream(ex):
    with get_task_stream(client=ex.client) as stream:
        with joblib.parallel_config(backend="futures_hpc", executor=ex):
            assert Parallel(n_jobs=2)(delayed(increment)(value) for value in range(50)) == list(
                range(1, 51)
            )
    assert any(str(record["key"]).startswith("BatchedCalls") for record in stream.data)


def test_the_remote_exception_is_raised_with_its_type(ex):
    with joblib.parallel_config(backend="futures_hpc", executor=ex):
        with pytest.raises(CustomError, match="bad value 7"):
            Parallel(n_jobs=2)(delayed(fail_on)(value, 7) for value in range(20))
        # The backend stays usable after an aborted call.
        assert Parallel(n_jobs=2)(delayed(increment)(value) for value in range(5)) == [
            1, 2, 3, 4, 5
        ]


def test_timeout_is_supported(ex):
    with joblib.parallel_config(backend="futures_hpc", executor=ex):
        # joblib raises multiprocessing's TimeoutError whatever the backend.
        with pytest.raises(multiprocessing.TimeoutError):
            Parallel(n_jobs=2, timeout=0.5)(delayed(time.sleep)(3) for _ in range(2))


def test_the_executor_passed_in_stays_open(ex):
    with joblib.parallel_config(backend="futures_hpc", executor=ex):
        Parallel(n_jobs=2)(delayed(increment)(value) for value in range(4))
    assert ex.submit(increment, 1).result(timeout=60) == 2


def _children() -> set[int]:
    return {
        child.pid
        for child in psutil.Process().children(recursive=True)
        if child.status() != psutil.STATUS_ZOMBIE
    }


def test_without_executor_a_default_one_lives_for_the_block():
    before = _children()
    with dask.config.set({"futures_hpc.backend": "local"}):
        with joblib.parallel_backend(
            "futures_hpc", executor_options={"max_workers": 2}
        ) as (backend, _):
            assert backend.executor is None  # started only when needed
            first = Parallel()(delayed(process_id)(index) for index in range(8))
            executor = backend.executor
            assert executor is not None and executor.backend_name == "local"
            second = Parallel()(delayed(process_id)(index) for index in range(8))
            # One executor for the whole block, not one per Parallel call.
            assert backend.executor is executor
            assert set(first) | set(second) <= set(executor.client.run(os.getpid).values())
    assert backend.executor is None
    assert executor._shutdown and executor._closed
    deadline = time.monotonic() + 30
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _children() - before == set()


def test_parallel_with_the_backend_name_closes_its_default_executor_after_the_call():
    with dask.config.set({"futures_hpc.backend": "local"}):
        parallel = Parallel(backend="futures_hpc", n_jobs=2)
        pids = parallel(delayed(process_id)(index) for index in range(6))
    assert os.getpid() not in pids
    assert parallel._backend.executor is None


def test_executor_and_executor_options_together_are_refused(ex):
    with pytest.raises(TypeError, match="not both"):
        FuturesHPCBackend(executor=ex, executor_options={"max_workers": 1})
    with pytest.raises(TypeError, match="not an HPCExecutor"):
        FuturesHPCBackend(executor="local")


def test_n_jobs_1_runs_in_this_process_as_with_every_joblib_backend(ex):
    with joblib.parallel_config(backend="futures_hpc", executor=ex):
        assert Parallel(n_jobs=1)(delayed(process_id)() for _ in range(3)) == [os.getpid()] * 3


def test_trivial_calls_reach_large_batches_after_the_first_result(ex):
    with joblib.parallel_config(backend="futures_hpc", executor=ex):
        Parallel(n_jobs=2)(delayed(increment)(value) for value in range(100))  # warm workers
        tasks_before = _batch_task_count(ex.client)
        results = Parallel(n_jobs=2)(delayed(increment)(value) for value in range(10_000))
    assert results == list(range(1, 10_001))
    # joblib makes about 25 batches here: its first 4 have one call each, and it splits the
    # last slice of calls into 10 x n_jobs batches, which it hands over one per finished batch
    # (one task per batch: 25 tasks; growing batches from their time from dispatch to result,
    # as joblib's AutoBatchingMixin does: 33). The batches joblib has cut are handed over at
    # once and, quick, share tasks: 11 to 13 tasks measured on this first call after a
    # warm-up (the one-call batches make the first estimate of a call's cost too high), 4 to
    # 11 on the next ones (benchmarks/joblib_backend.py).
    assert _batch_task_count(ex.client) - tasks_before <= 15


def test_calls_slower_than_the_target_stay_one_per_batch(ex):
    with joblib.parallel_config(backend="futures_hpc", executor=ex):
        tasks_before = _batch_task_count(ex.client)
        Parallel(n_jobs=2)(delayed(time.sleep)(0.25) for _ in range(6))
    assert _batch_task_count(ex.client) - tasks_before == 6


def _most_batches_on_one_worker(client) -> int:
    """The most joblib batches the scheduler has given one worker at this moment."""
    return max((sum(str(key).startswith("BatchedCalls") for key in keys)
                for keys in client.processing().values()), default=0)


def test_short_batches_wait_on_a_busy_worker_as_loky_keeps_a_call_queued():
    """Once a batch came back, the next batches, measured as short, are sent ahead: a worker
    with one thread holds the running batch and the next one, so it never waits for a round
    trip between two (before, one batch per worker thread: 1 here)."""
    with HPCExecutor("local", max_workers=1) as one:
        most = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                most[0] = max(most[0], _most_batches_on_one_worker(one.client))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with joblib.parallel_config(backend="futures_hpc", executor=one):
                results = Parallel(n_jobs=2)(delayed(_spin)(value) for value in range(30))
        finally:
            stop.set()
            sampler.join()
    assert results == list(range(30))
    assert most[0] == 2


def _spin(value: int) -> int:
    """About 0.1 s of arithmetic: batches of 2 calls (0.2 s), too long to share a task."""
    total = 0
    for step in range(2_500_000):
        total += step % 7
    return value + 0 * total


def test_batch_size_follows_the_cost_per_call_measured_on_workers():
    backend = FuturesHPCBackend.__new__(FuturesHPCBackend)
    FuturesHPCBackend.__init__(backend, executor_options={"max_workers": 1})
    assert backend.compute_batch_size() == 1  # nothing measured yet
    backend._record_batch_cost(1, 50e-6)  # one call of 50 us
    assert backend.compute_batch_size() == int(backend.TARGET_BATCH_SECONDS / 50e-6) == 4000
    backend._record_batch_cost(4000, 4000 * 1e-6)  # then 1 us a call: capped
    assert backend.compute_batch_size() == backend.MAX_BATCH_CALLS
    # joblib's rule: a batch slow from dispatch to result (e.g. large results) shrinks them.
    backend.batch_completed(backend.MAX_BATCH_CALLS, 20.0)  # joblib's report of the batch
    assert backend.compute_batch_size() == 2 * int(backend.MAX_BATCH_CALLS * 0.2 / 20.0)
    backend.reset_batch_stats()
    assert backend.compute_batch_size() == 1
    backend._record_batch_cost(2, 1.0)  # half a second a call
    assert backend.compute_batch_size() == 1
