"""The executor suite on the local backend, plus what only the local backend promises."""

from __future__ import annotations

import os
import time

import dask.config
import psutil
import pytest

from futures_hpc import HPCExecutor, LocalExecutor, WorkerLostError
from futures_hpc.dask_settings import DASK_SETTINGS, worker_environment
from tests.backends.batch_helpers import worker_dask_settings
from tests.executor_suite import *  # noqa: F403 - the shared executor suite


@pytest.fixture(scope="module")
def ex():
    with HPCExecutor("local", max_workers=2) as executor:
        yield executor


@pytest.fixture
def make_executor():
    def make():
        return LocalExecutor(max_workers=2)

    return make


def _descendants() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_backend_instance_is_the_local_subclass(ex):
    assert type(ex) is LocalExecutor
    assert ex.backend_name == "local"
    assert len(ex.client.scheduler_info()["workers"]) == 2


def test_every_process_is_gone_after_shutdown():
    before = _descendants()
    executor = LocalExecutor(max_workers=2)
    assert executor.submit(os.getpid).result(timeout=60) != os.getpid()
    started = _descendants() - before
    assert len(started) >= 2
    executor.shutdown(wait=True)
    still_alive = [pid for pid in started if psutil.pid_exists(pid)
                   and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert still_alive == []


def test_calls_run_in_worker_processes_with_the_given_environment():
    with LocalExecutor(max_workers=2, env={"FUTURES_HPC_TEST_VALUE": "42"}) as executor:
        values = set(
            executor.map(lambda name: os.environ.get(name), ["FUTURES_HPC_TEST_VALUE"] * 8)
        )
        pids = set(executor.map(lambda _: os.getpid(), range(40), chunksize=1))
    assert values == {"42"}
    assert os.getpid() not in pids


def test_keyboard_interrupt_in_with_block_closes_at_once():
    before = _descendants()
    with pytest.raises(KeyboardInterrupt):
        with LocalExecutor(max_workers=1) as executor:
            executor.submit(__import__("time").sleep, 30)
            raise KeyboardInterrupt
    assert executor._closed
    leftover = [pid for pid in _descendants() - before
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert leftover == []


def test_tls_can_be_turned_on_for_local_workers():
    with LocalExecutor(max_workers=1, security=True) as executor:
        assert executor.cluster.scheduler_address.startswith("tls://")
        assert executor.submit(sum, [1, 2, 3]).result(timeout=60) == 6


def _die():
    os._exit(13)


def test_a_call_that_kills_its_worker_fails_with_worker_lost_error_naming_it():
    from futures_hpc import WorkerLostError

    with LocalExecutor(max_workers=1, max_call_retries=2) as executor:
        future = executor.submit(_die)
        with pytest.raises(WorkerLostError, match=r"_die\(\).*2 times"):
            future.result(timeout=120)
        # The executor goes on: the nanny restarted the worker.
        assert executor.submit(sum, [1, 2]).result(timeout=120) == 3


def test_bad_max_call_retries_is_refused_before_start():
    with pytest.raises(ValueError, match="max_call_retries=0"):
        LocalExecutor(max_workers=1, max_call_retries=0)



# -- a worker killed in the middle of a task of packed calls -----------------------------------


@pytest.mark.parametrize("always", [False, True], ids=["kills-once", "kills-always"])
def test_a_worker_killed_mid_batch_loses_no_call_and_runs_no_finished_call_again(tmp_path,
                                                                                always):
    with LocalExecutor(max_workers=2, max_call_retries=2) as executor:
        check_killed_batch(executor, tmp_path, always)  # noqa: F405 - from the executor suite


def _fail_on(value, bad):
    if value == bad:
        raise ValueError(f"bad value {value}")
    return value * 2


def test_quick_chunks_of_a_map_share_tasks_and_keep_their_own_outcomes(ex):
    """A map with a small chunksize of a function measured as quick: its chunks, queued
    together, go out in fewer dask tasks than chunks (one per free worker slot), each chunk
    keeping its results in order, and a failing call still fails the map at its place."""
    from distributed import get_task_stream

    assert list(ex.map(_fail_on, range(50), [-1] * 50, chunksize=10)) == list(range(0, 100, 2))
    wait_until_idle(ex)  # noqa: F405 - from the executor suite
    with get_task_stream(client=ex.client) as stream:
        time.sleep(TASK_STREAM_SETTLE_SECONDS)  # noqa: F405 - from the executor suite
        assert list(ex.map(_fail_on, range(2000), [-1] * 2000, chunksize=20)) == [
            value * 2 for value in range(2000)]
        wait_until_idle(ex)  # noqa: F405
    tasks = [record["key"] for record in stream.data]
    assert 1 <= len(tasks) <= 10, tasks  # 100 chunks
    results = ex.map(_fail_on, range(2000), [1234] * 2000, chunksize=20)
    assert [next(results) for _ in range(1234)] == [value * 2 for value in range(1234)]
    with pytest.raises(ValueError, match="bad value 1234"):
        next(results)


def _kill_once(value, marker):
    if value == 777 and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(13)
    return value


def test_a_worker_killed_in_a_task_of_packed_chunks_loses_no_chunk(tmp_path):
    with LocalExecutor(max_workers=2, max_call_retries=3) as executor:
        marker = str(tmp_path / "killed")
        assert list(executor.map(_kill_once, range(100), [marker] * 100, chunksize=10)) == list(
            range(100))
        results = list(executor.map(_kill_once, range(2000), [marker + "-2"] * 2000,
                                    chunksize=20))
        assert results == list(range(2000))
        assert os.path.exists(marker + "-2")  # the worker did die once


def _total(array):
    return float(array.sum())


@pytest.mark.parametrize("failures", [1, 5], ids=["fails-once", "fails-always"])
def test_a_large_call_whose_scatter_is_refused_still_runs(monkeypatch, failures):
    """A large call's arguments are scattered; the scheduler refuses a scatter whose worker
    left in between (KeyError of its address, seen in CI when an SGE job was retired). That
    race cannot be caused on purpose, so the client's scatter is replaced by one that fails
    ``failures`` times first (a mock, for that reason only): the call is scattered again, or
    sent in the graph, and runs."""
    import numpy as np

    with LocalExecutor(max_workers=1) as executor:
        scatter, calls = executor.client.scatter, []

        def refusing_scatter(*args, **kwargs):
            calls.append(args)
            if len(calls) <= failures:
                raise KeyError("tls://192.0.2.2:41571")
            return scatter(*args, **kwargs)

        monkeypatch.setattr(executor.client, "scatter", refusing_scatter)
        array = np.ones(1 << 20)  # 8 MB, over the scatter threshold
        assert executor.submit(_total, array).result(timeout=120) == float(1 << 20)
        assert len(calls) == min(failures + 1, 2)  # scattered again once, then in the graph


def _quick_or_slow(value, slow):
    if value == slow:
        time.sleep(2.0)
    return value


def test_calls_of_a_packed_task_complete_as_they_finish(ex):
    assert ex.submit(_quick_or_slow, -1, 1).result(timeout=60) == -1  # measured as quick
    blockers = occupy(ex, 1.0)  # noqa: F405 - from the executor suite
    futures = [ex.submit(_quick_or_slow, value, 1) for value in range(4)]
    assert [blocker.result(timeout=60) for blocker in blockers] == [None] * len(blockers)
    # Call 0 shares its task with the slow call 1, yet completes long before the task ends.
    assert futures[0].result(timeout=1.5) == 0
    assert futures[1].running()
    assert [future.result(timeout=60) for future in futures] == [0, 1, 2, 3]


@pytest.mark.parametrize("users_profile_interval", [None, "50ms"])
def test_futures_hpcs_dask_settings_apply_unless_the_user_set_them(users_profile_interval):
    """The scheduler, the nannies and the workers run with dask_settings' intervals; a value
    the user set is kept, and is what workers started elsewhere are given."""
    profile = users_profile_interval or DASK_SETTINGS["distributed.worker.profile.interval"]
    users = ({"distributed.worker.profile.interval": users_profile_interval}
             if users_profile_interval else {})
    with dask.config.set(users), LocalExecutor(max_workers=1) as executor:
        on_worker = executor.submit(worker_dask_settings).result(timeout=60)
        on_workers = executor.client.run(worker_dask_settings)
        scheduler_tick = executor.cluster.scheduler.periodic_callbacks["tick"].callback_time
        nanny_ticks = {nanny.periodic_callbacks["tick"].callback_time
                       for nanny in executor.cluster.workers.values()}
        # The hosted nannies have no system monitor (futures_hpc.backends.local._LocalNanny).
        monitors = {server.periodic_callbacks["monitor"].callback_time for server in
                    [executor.cluster.scheduler]}
        exported = worker_environment()
    expected = {"distributed.admin.tick.interval": "200ms",
                "distributed.worker.profile.interval": profile,
                "distributed.admin.system-monitor.interval": "2s", "tick period": 200,
                "monitor period": 2000}
    assert on_worker == expected
    assert list(on_workers.values()) == [expected]
    assert scheduler_tick == 200 and nanny_ticks == {200}
    assert monitors == {2000}
    assert exported == {"DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "200ms",
                        "DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL": profile,
                        "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s"}


def _hosted_checks(executor):
    """For each nanny of ``executor``: its memory check's and its OOM watch's intervals."""
    from futures_hpc.engine import (
        NANNY_MEMORY_CALLBACK,
        SERVER_MONITOR_CALLBACK,
        periodic_interval,
    )
    from futures_hpc.oom_watch import OutOfMemoryWatch

    checks = []
    for nanny in executor.cluster.workers.values():
        assert periodic_interval(nanny, SERVER_MONITOR_CALLBACK) is None  # no system monitor
        watches = [plugin for plugin in nanny.plugins.values()
                   if isinstance(plugin, OutOfMemoryWatch)]
        assert len(watches) == 1
        checks.append((periodic_interval(nanny, NANNY_MEMORY_CALLBACK), watches[0].interval))
    return checks


def test_nannies_sharing_the_client_process_check_their_workers_less_often_as_they_grow():
    """The local nannies live in the client's process: up to 8 check at distributed's rate,
    more check proportionally less often (futures_hpc.hosted_nannies), and none runs a system
    monitor of its own (it would sample the client's process, as the scheduler's does). The
    memory check still ends a worker that goes over its limit."""
    from futures_hpc.backends.local import _HOSTED_NANNIES
    from futures_hpc.hosted_nannies import spread_interval

    def expected(count):
        interval = pytest.approx(spread_interval(0.1, len(_HOSTED_NANNIES)))
        return [(interval, interval)] * count

    with LocalExecutor(max_workers=2) as small:
        before = _hosted_checks(small)
        assert before == expected(2)
        with LocalExecutor(max_workers=10, memory="300MB") as wide:
            assert len(_HOSTED_NANNIES) >= 12
            assert _hosted_checks(wide) == expected(10)
            assert _hosted_checks(small) == expected(2)
            assert _hosted_checks(small)[0][0] >= 0.15 > before[0][0]  # 12 or more / 8
            with pytest.raises(WorkerLostError):
                wide.submit(_allocate_and_hold, 600).result(timeout=120)
        assert _hosted_checks(small) == before  # back to the rate before


def _allocate_and_hold(megabytes):
    import numpy as np

    block = np.ones(megabytes * 1_000_000 // 8)
    time.sleep(5)
    return block.nbytes
