"""Dask on an executor: collections compute on its cluster, the scheduler is restored, discovery."""

from __future__ import annotations

import json
import os
import stat
import sys

import cloudpickle
import dask
import dask.array as da
import dask.bag as db
import dask.config
import dask.dataframe as dd
import distributed
import pandas as pd
import pytest
from distributed import Client

from futures_hpc import HPCExecutor
from futures_hpc.integrations import dask as dask_integration
from futures_hpc.integrations.dask import (
    DiscoveredCluster,
    discover,
    read_discovery_record,
    running_cluster_names,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _task_prefix_counts(client) -> dict[str, int]:
    """Finished tasks per key prefix, from the scheduler's task log."""

    def counts(dask_scheduler) -> dict[str, int]:
        return {
            name: prefix.state_counts.get("memory", 0)
            for name, prefix in dask_scheduler.task_prefixes.items()
        }

    return client.run_on_scheduler(counts)


def _default_client_or_none():
    try:
        return distributed.default_client()
    except ValueError:
        return None


@pytest.fixture
def discovery_dir(tmp_path):
    with dask.config.set({"futures_hpc.discovery-dir": str(tmp_path / "clusters")}):
        yield tmp_path / "clusters"


def test_dask_array_reduction_computes_on_the_executors_cluster():
    with HPCExecutor("local", max_workers=2) as ex:
        before = _task_prefix_counts(ex.client)
        array = da.arange(200_000, chunks=10_000)
        assert int(array.sum().compute()) == sum(range(200_000))
        after = _task_prefix_counts(ex.client)
        new_tasks = {name: after[name] - before.get(name, 0) for name in after}
        # 20 chunks: at least 20 tasks of the reduction ran on this scheduler.
        assert sum(count for name, count in new_tasks.items() if name.startswith("arange")) >= 20
        assert any(name.startswith("sum") and count > 0 for name, count in new_tasks.items())


def test_bag_dataframe_and_delayed_compute_on_the_cluster():
    with HPCExecutor("local", max_workers=2) as ex:
        worker_pids = set(ex.client.run(os.getpid).values())
        bag_pids = set(db.from_sequence(range(8), npartitions=4).map(lambda _: os.getpid())
                       .compute())
        assert bag_pids <= worker_pids
        frame = pd.DataFrame({"group": [index % 3 for index in range(60)], "value": range(60)})
        sums = dd.from_pandas(frame, npartitions=4).groupby("group").value.sum().compute()
        assert sums.to_dict() == frame.groupby("group").value.sum().to_dict()
        assert dask.delayed(os.getpid)().compute() in worker_pids


def test_the_previous_scheduler_is_restored_on_exit():
    default_before = _default_client_or_none()
    with dask.config.set(scheduler="threads"):
        with HPCExecutor("local", max_workers=1) as ex:
            assert dask.config.get("scheduler") == "dask.distributed"
            assert distributed.default_client() is ex.client
        assert dask.config.get("scheduler") == "threads"
    assert _default_client_or_none() is default_before
    # With nothing set before, nothing is left set after.
    assert dask.config.get("scheduler", None) is None
    with HPCExecutor("local", max_workers=1):
        pass
    assert dask.config.get("scheduler", None) is None
    assert dask.delayed(os.getpid)().compute() == os.getpid()  # back to the local scheduler


def test_nested_executors_restore_the_outer_one():
    with HPCExecutor("local", max_workers=1) as outer:
        outer_pids = set(outer.client.run(os.getpid).values())
        with HPCExecutor("local", max_workers=1) as inner:
            inner_pids = set(inner.client.run(os.getpid).values())
            assert dask.delayed(os.getpid)().compute() in inner_pids
        assert distributed.default_client() is outer.client
        assert dask.delayed(os.getpid)().compute() in outer_pids
    assert dask.config.get("scheduler", None) is None


def test_executors_left_out_of_order_restore_correctly():
    default_before = _default_client_or_none()
    first = HPCExecutor("local", max_workers=1)
    second = HPCExecutor("local", max_workers=1)
    first.__enter__()
    second.__enter__()
    try:
        first.__exit__(None, None, None)  # the outer one leaves first
        assert distributed.default_client() is second.client
        assert dask.config.get("scheduler") == "dask.distributed"
    finally:
        second.__exit__(None, None, None)
    assert dask.config.get("scheduler", None) is None
    assert _default_client_or_none() is default_before
    assert dask_integration.active_executor_count() == 0


def test_client_on_the_executors_cluster_runs_a_task():
    with HPCExecutor("local", max_workers=1) as ex:
        with Client(ex.cluster, set_as_default=False) as client:
            assert client.submit(lambda x: x * 2, 21).result(timeout=60) == 42
            assert client.scheduler_info()["id"] == ex.client.scheduler_info()["id"]
            assert client.scheduler.address == ex.cluster.scheduler_address
        # The executor still works after the second client closed.
        assert ex.submit(sum, [1, 2, 3]).result(timeout=60) == 6


def test_the_executors_client_talks_to_a_scheduler_in_this_process_in_process():
    """The executor's own client uses dask's inproc transport, not a socket to itself; the
    workers keep the network address."""
    with HPCExecutor("local", max_workers=1) as ex:
        assert ex.client.scheduler.address.startswith("inproc://")
        assert ex.cluster.scheduler_address.startswith(("tcp://", "tls://"))
        assert ex.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        assert ex.client.dashboard_link == ex.cluster.dashboard_link


def test_client_on_a_tls_executors_cluster_runs_a_task():
    with HPCExecutor("local", max_workers=1, security=True) as ex:
        assert ex.cluster.scheduler_address.startswith("tls://")
        with Client(ex.cluster, set_as_default=False) as client:
            assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2


def test_a_running_executor_is_discoverable_and_reconnectable(discovery_dir):
    with HPCExecutor("local", max_workers=2, security=True) as ex:
        assert running_cluster_names() == [ex.run_name]
        record_path = discovery_dir / f"{ex.run_name}.json"
        assert stat.S_IMODE(record_path.stat().st_mode) == 0o600
        record = read_discovery_record(ex.run_name)
        assert record["scheduler_address"] == ex.cluster.scheduler_address
        assert record["pid"] == os.getpid()

        async def names():
            return [item async for item in discover()]

        assert ex.client.sync(names) == [(ex.run_name, DiscoveredCluster)]
        handle = DiscoveredCluster.from_name(ex.run_name)
        try:
            assert handle.name == ex.run_name
            assert len(handle.scheduler_info["workers"]) == 2
            with pytest.raises(TypeError, match="belongs to a futures_hpc executor"):
                handle.scale(5)
            with Client(handle, set_as_default=False) as client:
                assert client.submit(lambda: 7).result(timeout=60) == 7
        finally:
            handle.close()
        # Closing the handle leaves the executor's cluster running.
        assert ex.submit(sum, [2, 3]).result(timeout=60) == 5
    assert running_cluster_names() == []
    assert not record_path.exists()


def test_records_of_dead_processes_are_dropped(discovery_dir):
    discovery_dir.mkdir(parents=True)
    stale = discovery_dir / "fhpc-deadbeef.json"
    stale.write_text(json.dumps({
        "name": "fhpc-deadbeef", "scheduler_address": "tcp://127.0.0.1:1", "pid": 2**22 + 1,
        "host": os.uname().nodename, "created": 0,
    }))
    assert running_cluster_names() == []
    assert not stale.exists()
    with pytest.raises(LookupError, match="fhpc-deadbeef"):
        read_discovery_record("fhpc-deadbeef")
