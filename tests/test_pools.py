"""Resource pools (``ex.with_resources``) on the local backend: a real LocalCluster.

Every test reads what the workers themselves report (``distributed.get_worker()``: their name,
threads, memory limit, dask resources, environment) or what the scheduler lists; nothing is
mocked. This machine has no GPU: ``gpus=1`` is tested as what futures_hpc makes of it, a ``GPU``
dask resource on a CPU worker process that only the GPU pool's calls may use.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

import distributed
import pytest

from futures_hpc import HPCExecutor
from futures_hpc.backends.mpi import MPIProvider
from futures_hpc.errors import CallDependencyError, OptionError
from futures_hpc.pool_shape import PoolShape
from futures_hpc.pools import BASE_RESOURCE, GPU_RESOURCE, THREAD_VARIABLES

pytestmark = pytest.mark.timeout(120)


# -- worker-side functions ----------------------------------------------------------------------


def worker_facts(_: object = None) -> dict[str, Any]:
    """What the worker running this call has."""
    worker = distributed.get_worker()
    time.sleep(0.02)  # long enough for every worker to get some of the calls
    return {
        "name": str(worker.name),
        "nthreads": worker.state.nthreads,
        "memory_limit": worker.memory_manager.memory_limit,
        "resources": dict(worker.state.total_resources),
        "thread_variables": {name: os.environ.get(name) for name in THREAD_VARIABLES},
    }


def running_interval(seconds: float) -> tuple[str, float, float]:
    """The worker's name and when this call started and ended (the machine's monotonic clock)."""
    start = time.monotonic()
    time.sleep(seconds)
    return str(distributed.get_worker().name), start, time.monotonic()


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise KeyError(message)


def slow_identity(value: int, seconds: float) -> int:
    time.sleep(seconds)
    return value


# -- helpers ------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], timeout: float) -> Any:
    """Poll ``condition`` until it returns something true; return that, or None at timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return None


def workers_with(ex: HPCExecutor, resource: str) -> set[str]:
    """Names of the scheduler's workers that declare ``resource``."""
    workers = ex.client.scheduler_info(n_workers=-1)["workers"].values()
    return {str(info["name"]) for info in workers if resource in (info.get("resources") or {})}


@pytest.fixture(scope="module")
def ex():
    """One worker process of one thread of the executor's own; pools come and go beside it."""
    with HPCExecutor("local", max_workers=1) as executor:
        yield executor


# -- shapes ---------------------------------------------------------------------------------------


def test_a_pools_calls_run_on_workers_of_its_shape(ex):
    pool = ex.with_resources(cores=2, memory="400MB")
    facts = list(pool.map(worker_facts, range(6), chunksize=1))
    for fact in facts:
        assert fact["nthreads"] == 2, fact
        assert fact["memory_limit"] == 400_000_000, fact
        # Numeric libraries use the worker's cores: the call has the whole worker.
        assert fact["thread_variables"] == dict.fromkeys(THREAD_VARIABLES, "2"), fact
        assert fact["resources"] == {pool._pool.resource: 1}, fact
    own = ex.submit(worker_facts).result(timeout=60)
    assert own["nthreads"] == 1 and own["resources"] == {BASE_RESOURCE: 1}, own


def test_a_pool_worker_runs_one_call_at_a_time(ex):
    pool = ex.with_resources(cores=2, memory="400MB")  # one worker of 2 threads here
    intervals = [future.result(timeout=60)
                 for future in [pool.submit(running_interval, 0.3) for _ in range(4)]]
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for name, start, end in intervals:
        by_worker.setdefault(name, []).append((start, end))
    for name, spans in by_worker.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, (name, spans)  # no two calls at once, though 2 threads


def test_the_executors_calls_and_a_pools_never_share_a_worker(ex):
    pool = ex.with_resources(cores=1)
    own = ex.map(worker_facts, range(40), chunksize=1)
    pooled = pool.map(worker_facts, range(40), chunksize=1)
    own_facts, pool_facts = list(own), list(pooled)
    assert {tuple(fact["resources"]) for fact in own_facts} == {(BASE_RESOURCE,)}, own_facts
    assert {tuple(fact["resources"]) for fact in pool_facts} == {(pool._pool.resource,)}
    assert not {fact["name"] for fact in own_facts} & {fact["name"] for fact in pool_facts}
    # Chunks of the executor's own map are sized for its own worker's thread only.
    assert ex.worker_slots() == 1


def test_a_gpu_pool_declares_a_gpu_and_only_its_calls_go_there(ex):
    """No GPU here: the pool's worker is a CPU process that declares the ``GPU`` resource."""
    gpu_pool = ex.with_resources(gpus=1, max_workers=1)
    cpu_pool = ex.with_resources(cores=1)
    gpu_futures = [gpu_pool.submit(worker_facts) for _ in range(8)]
    cpu_facts = list(cpu_pool.map(worker_facts, range(20), chunksize=1))
    own_facts = list(ex.map(worker_facts, range(20), chunksize=1))
    gpu_facts = [future.result(timeout=60) for future in gpu_futures]
    for fact in gpu_facts:
        assert fact["resources"] == {gpu_pool._pool.resource: 1, GPU_RESOURCE: 1}, fact
    gpu_workers = {fact["name"] for fact in gpu_facts}
    assert gpu_workers == workers_with(ex, GPU_RESOURCE)
    assert not gpu_workers & {fact["name"] for fact in cpu_facts + own_facts}
    assert all(GPU_RESOURCE not in fact["resources"] for fact in cpu_facts + own_facts)


def test_the_same_shape_is_the_same_pool(ex):
    first = ex.with_resources(cores=1, memory="300MB")
    assert ex.with_resources(cores=1, memory="300MB").pool_name == first.pool_name
    # The amount decides, not how it is written.
    assert ex.with_resources(memory=300_000_000).pool_name == first.pool_name
    assert ex.with_resources().pool_name == ex.with_resources(cores=1).pool_name
    assert ex.with_resources(cores=1, memory="301MB").pool_name != first.pool_name
    assert ex.with_resources(cores=2, memory="300MB").pool_name != first.pool_name
    # A pool's view makes another pool with one option changed.
    changed = first.with_resources(cores=2)
    assert changed.shape.cores == 2 and changed.shape.memory_bytes == 300_000_000
    assert changed.pool_name == ex.with_resources(cores=2, memory="300MB").pool_name


def test_status_shows_each_pool_with_its_counts(ex):
    pool = ex.with_resources(cores=2, memory="400MB")
    assert pool.submit(add, 1, 1).result(timeout=60) == 2
    futures = [pool.submit(slow_identity, index, 0.5) for index in range(3)]
    busy = wait_for(lambda: ex.status().pools[pool.pool_name]["running_calls"], 30)
    line = ex.status().pools[pool.pool_name]
    assert busy and 1 <= line["running_calls"] + line["waiting_calls"] <= 3, line
    assert [future.result(timeout=60) for future in futures] == [0, 1, 2]
    pools = ex.status().pools
    line = pools[pool.pool_name]
    assert line["shape"] == "cores=2 memory=400MB"
    assert line["max_workers"] == 1  # as many 2-core workers as the machine's 2 cores hold
    assert line["jobs_running"] == 1 and line["jobs_pending"] == 0, line
    assert line["waiting_calls"] == 0 and line["running_calls"] == 0, line
    assert pool.status()["shape"] == line["shape"]
    # Every pool made so far has its line; the executor's own counts stay outside them.
    assert ex.with_resources(cores=1).pool_name in pools
    assert all(name.startswith("pool-") for name in pools)


# -- scaling --------------------------------------------------------------------------------


def test_an_idle_pool_is_released_whole_and_comes_back_when_calls_come():
    with HPCExecutor("local", max_workers=1, idle_timeout=1) as ex:
        pool = ex.with_resources(cores=1, max_workers=2)
        resource = pool._pool.resource
        first = {fact["name"] for fact in pool.map(worker_facts, range(20), chunksize=1)}
        assert first and first <= workers_with(ex, resource) | first
        assert wait_for(lambda: not workers_with(ex, resource), 30), workers_with(ex, resource)
        line = ex.status().pools[pool.pool_name]
        assert line["jobs_running"] == line["jobs_pending"] == 0, line
        assert line["retired_jobs"] >= len(first), line
        assert workers_with(ex, BASE_RESOURCE), "the executor's own worker went too"
        again = pool.submit(worker_facts).result(timeout=60)
        assert again["name"] not in first  # a new worker of the pool
        assert again["resources"] == {resource: 1}


# -- futures across pools, map ----------------------------------------------------------------


def test_futures_are_arguments_across_pools(ex):
    pool = ex.with_resources(cores=1)
    gpu_pool = ex.with_resources(gpus=1, max_workers=1)
    own = ex.submit(add, 1, 2)
    pooled = pool.submit(add, own, 10)
    on_gpu = gpu_pool.submit(add, pooled, 100)
    back = ex.submit(add, on_gpu, 1000)
    assert back.result(timeout=60) == 1113
    failed = pool.submit(add, ex.submit(fail, "no such key"), 1)
    with pytest.raises(CallDependencyError) as raised:
        failed.result(timeout=60)
    assert isinstance(raised.value.__cause__, KeyError)


def test_a_pools_map_yields_in_order(ex):
    pool = ex.with_resources(cores=2, memory="400MB")
    assert list(pool.map(add, range(50), range(50))) == [2 * x for x in range(50)]
    assert list(pool.map(slow_identity, range(6), [0.05] * 6, chunksize=2)) == list(range(6))
    assert list(pool.map(add, [], [])) == []


# -- shutting down --------------------------------------------------------------------------


def test_a_pools_shutdown_stops_only_its_own_calls(ex):
    view = ex.with_resources(cores=1, memory="350MB", max_workers=1)
    other_view = ex.with_resources(cores=1, memory="350MB", max_workers=1)
    assert view.pool_name == other_view.pool_name
    assert view.submit(add, 0, 0).result(timeout=60) == 0  # the pool's worker is up
    mine = [view.submit(slow_identity, index, 0.5) for index in range(4)]
    theirs = [other_view.submit(slow_identity, index, 0.1) for index in range(2)]
    view.shutdown(wait=False, cancel_futures=True)
    assert mine[0].result(timeout=60) == 0  # handed to the cluster already: it runs
    assert mine[-1].cancelled()
    with pytest.raises(CancelledError):
        mine[-1].result(timeout=0)
    assert [future.result(timeout=60) for future in theirs] == [0, 1]  # not the view's
    with pytest.raises(RuntimeError, match="shutdown"):
        view.submit(add, 1, 1)
    with pytest.raises(RuntimeError, match="shutdown"):
        view.map(add, [1], [1])
    # The executor and its pool go on: a new view of the same shape takes calls.
    assert ex.submit(add, 2, 2).result(timeout=60) == 4
    assert ex.with_resources(cores=1, memory="350MB", max_workers=1).submit(
        add, 3, 3).result(timeout=60) == 6


def test_a_lazy_map_of_a_pool_stops_submitting_once_its_view_is_shut_down(ex):
    view = ex.with_resources(cores=1, memory="350MB", max_workers=1)
    results = view.map(slow_identity, range(6), [0.05] * 6, chunksize=1, buffersize=1)
    assert next(results) == 0
    view.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="shutdown"):
        list(results)


def test_a_pools_shutdown_with_wait_returns_once_its_calls_are_done(ex):
    view = ex.with_resources(cores=1, memory="350MB", max_workers=1)
    futures = [view.submit(slow_identity, index, 0.2) for index in range(3)]
    view.shutdown(wait=True)
    assert all(future.done() and not future.cancelled() for future in futures)
    assert [future.result() for future in futures] == [0, 1, 2]


def test_executor_shutdown_cancels_waiting_pool_calls_with_cancel_futures():
    ex = HPCExecutor("local", max_workers=1)
    try:
        pool = ex.with_resources(cores=1, max_workers=1)
        assert pool.submit(add, 0, 0).result(timeout=60) == 0  # the pool's worker is up
        futures = [pool.submit(slow_identity, index, 0.5) for index in range(5)]
        assert wait_for(futures[0].running, 10)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    assert all(future.done() for future in futures)
    assert futures[0].result() == 0
    assert futures[-1].cancelled()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(add, 1, 1)
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.with_resources(cores=2)


def test_executor_shutdown_waits_for_pool_calls():
    with HPCExecutor("local", max_workers=1) as ex:
        pool = ex.with_resources(cores=1, max_workers=1)
        futures = [pool.submit(slow_identity, index, 0.2) for index in range(3)]
    assert [future.result(timeout=0) for future in futures] == [0, 1, 2]


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "named"), [
    ({"cpus": 2}, "cpus=2"),
    ({"cores": 0}, "cores=0"),
    ({"cores": 1.5}, "cores=1.5"),
    ({"memory": "lots"}, "memory='lots'"),
    ({"gpus": -1}, "gpus=-1"),
    ({"max_workers": 0}, "max_workers=0"),
    ({"walltime": "soon"}, "walltime='soon'"),
    ({"call_time": -5}, "call_time=-5"),
], ids=lambda value: str(value))
def test_bad_options_raise_a_value_error_naming_them_before_anything_starts(ex, options, named):
    pools_before = set(ex.status().pools)
    workers_before = set(ex.client.scheduler_info(n_workers=-1)["workers"])
    with pytest.raises(OptionError) as raised:
        ex.with_resources(**options)
    assert isinstance(raised.value, ValueError)
    assert named in str(raised.value)
    assert set(ex.status().pools) == pools_before
    assert set(ex.client.scheduler_info(n_workers=-1)["workers"]) <= workers_before


def test_an_unknown_option_suggests_the_right_one(ex):
    with pytest.raises(OptionError, match="Did you mean 'cores'"):
        ex.with_resources(core=2)


def test_batch_only_options_are_accepted_and_logged_on_local(ex, caplog):
    """A program written for a cluster runs unchanged here: walltime, call_time, queue and
    job_extra mean nothing to local worker processes; they are logged, not refused."""
    with caplog.at_level(logging.INFO, logger="futures_hpc"):
        pool = ex.with_resources(walltime="01:00:00", call_time="00:10:00", queue="short",
                                 job_extra=["--exclusive"], max_workers=1)
    assert "ignores walltime='01:00:00', call_time='00:10:00', queue='short'" in caplog.text
    assert pool.submit(abs, -6).result(timeout=60) == 6


def test_mpi_refuses_pools_before_anything_starts():
    """The MPI provider's own check, called without starting an MPI world.

    ``with_resources`` calls it before it makes the pool; ``tests/backends/test_mpi.py`` checks
    the same refusal on a running MPI executor.
    """
    with pytest.raises(OptionError, match="not available on the 'mpi' backend"):
        MPIProvider(None).check_pool(PoolShape(cores=2))
