"""The executor test suite, shared by every backend.

A backend's test module does ``from tests.executor_suite import *`` and defines two fixtures:

- ``ex``: a running executor with at least 2 worker slots (module scope is fine: no test here
  shuts it down);
- ``make_executor``: a callable returning a new executor of the same backend and options, for
  the tests that shut one down (they do so themselves).

Functions here are pickled by value so that workers need not import this module.
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
import time
import uuid
import weakref
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    CancelledError,
    Future,
    as_completed,
    wait,
)

import cloudpickle
import numpy as np
import pytest

from futures_hpc.calls import RemoteTraceback

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CustomError(Exception):
    """An exception type the workers do not know."""


def add(x, y=0):
    return x + y


def echo_keywords(**kwargs):
    return kwargs


def sleep_return(seconds, value=None):
    time.sleep(seconds)
    return value


def fail_on(x, bad):
    if x == bad:
        raise CustomError(f"bad item {x}")
    return x * 2


def raise_custom():
    raise CustomError("raised on the worker")


def touch(directory, name, seconds=0.0):
    time.sleep(seconds)
    with open(os.path.join(directory, str(name)), "w") as handle:
        handle.write("ran")
    return name


def array_sum(array):
    return float(array.sum()), array.nbytes


class Payload:
    """An argument whose lifetime the no-stale-references test watches."""

    def method(self):
        return 42


#: Seconds to wait after opening dask's task stream before submitting what it should record:
#: it keeps the records that started after it opened by the scheduler's estimate of each
#: worker's clock, which was off by up to 0.26 s after busy maps (distributed 2024.1).
TASK_STREAM_SETTLE_SECONDS = 1.0


def wait_until_idle(ex, timeout=120):
    """Wait until no call of an earlier test is still running on the workers."""
    deadline = time.monotonic() + timeout
    while any(ex.client.processing().values()):
        assert time.monotonic() < deadline, "workers stayed busy"
        time.sleep(0.05)


def occupy(ex, seconds):
    """Fill every worker slot with a sleeping call; return those futures once all run."""
    wait_until_idle(ex)
    slots = ex.worker_slots()
    blockers = [ex.submit(sleep_return, seconds) for _ in range(slots)]
    deadline = time.monotonic() + 60
    while not all(future.running() or future.done() for future in blockers):
        assert time.monotonic() < deadline, "blocking calls never started"
        time.sleep(0.05)
    return blockers


# -- submit -------------------------------------------------------------------------------------


def test_submit_returns_standard_future(ex):
    future = ex.submit(add, 2, y=3)
    assert type(future) is Future
    assert future.result(timeout=60) == 5


def test_keyword_arguments_named_fn_and_self_reach_the_function(ex):
    assert ex.submit(echo_keywords, fn=1, self=2).result(timeout=60) == {"fn": 1, "self": 2}


def test_calls_are_never_merged_or_cached(ex):
    first, second = ex.submit(uuid.uuid4), ex.submit(uuid.uuid4)
    assert first.result(timeout=60) != second.result(timeout=60)
    assert len(set(ex.map(lambda _: uuid.uuid4(), range(20), chunksize=1))) == 20


def test_remote_exception_keeps_its_type_and_traceback(ex):
    future = ex.submit(raise_custom)
    with pytest.raises(CustomError, match="raised on the worker") as caught:
        future.result(timeout=60)
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "raise_custom" in str(caught.value.__cause__)
    assert isinstance(future.exception(), CustomError)


def test_result_timeout(ex):
    future = ex.submit(sleep_return, 3, "late")
    with pytest.raises(TimeoutError):
        future.result(timeout=0.2)
    assert future.result(timeout=60) == "late"


def test_large_numpy_argument(ex):
    array = np.ones(8 * 1024 * 1024, dtype=np.float64)  # 64 MB
    total, nbytes = ex.submit(array_sum, array).result(timeout=120)
    assert (total, nbytes) == (float(array.size), 64 * 1024 * 1024)


def test_no_stale_references_to_arguments_or_results(ex):
    payload = Payload()
    reference = weakref.ref(payload)
    future = ex.submit(payload.method)
    assert future.result(timeout=60) == 42
    del payload, future
    gc.collect()
    assert reference() is None


def _outgoing_transfers(dask_worker) -> int:
    return dask_worker.transfer_outgoing_count_total


def make_bytes(size):
    return bytes(range(256)) * (size // 256)


def test_small_outcomes_come_with_the_news_and_large_ones_are_gathered(ex):
    """Small outcomes are relayed through the scheduler: the client fetches nothing from the
    workers (their count of outgoing transfers stays put); a large one is fetched as before."""
    before = sum(ex.client.run(_outgoing_transfers).values())
    assert [future.result(timeout=60) for future in [ex.submit(add, i, 1) for i in range(20)]] == [
        i + 1 for i in range(20)
    ]
    assert list(ex.map(add, range(100), chunksize=10)) == list(range(100))
    assert sum(ex.client.run(_outgoing_transfers).values()) == before
    large = ex.submit(make_bytes, 256 * 1024).result(timeout=60)
    assert large == bytes(range(256)) * 1024
    assert sum(ex.client.run(_outgoing_transfers).values()) > before


# -- map ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [None, 1, 7, 1000])
def test_map_keeps_input_order(ex, chunksize):
    items = list(range(-50, 50))
    assert list(ex.map(abs, items, chunksize=chunksize)) == [abs(item) for item in items]


def test_map_learns_that_trivial_calls_want_one_chunk_per_worker(ex):
    """Unknown cost: 4 chunks per worker slot; measured as trivial: one chunk per slot."""
    from distributed import get_task_stream

    calls = 400 * ex.worker_slots()
    salt = uuid.uuid4().hex  # a function this executor has never measured

    def trivial(value, salt=salt):
        return value

    first_size = ex.automatic_chunksize(calls, trivial)
    assert first_size == -(-calls // (4 * ex.worker_slots()))
    # The task stream keeps the tasks that started after it was opened, by the workers'
    # clocks as the scheduler corrects them: open it a little before the map starts. Results
    # are relayed ahead of the workers' own word that a task finished: wait until the scheduler
    # has taken every task out of processing (so its task stream holds them all).
    with get_task_stream(client=ex.client) as stream:
        time.sleep(TASK_STREAM_SETTLE_SECONDS)
        assert list(ex.map(trivial, range(calls))) == list(range(calls))
        wait_until_idle(ex)
    # Chunks of unknown cost go one per task; once the first are measured as quick, the call
    # queue packs the chunks still waiting into shared tasks.
    tasks = [r["key"] for r in stream.data]
    assert ex.worker_slots() <= len(tasks) <= -(-calls // first_size), tasks
    # Measured as trivial: well under a millisecond of work in all, worth one task only
    # (chunking.useful_tasks), not one per worker.
    learned_size = ex.automatic_chunksize(calls, trivial)
    assert learned_size == calls
    with get_task_stream(client=ex.client) as stream:
        time.sleep(TASK_STREAM_SETTLE_SECONDS)
        assert list(ex.map(trivial, range(calls))) == list(range(calls))
        wait_until_idle(ex)
    assert len(stream.data) == -(-calls // learned_size), [r["key"] for r in stream.data]
    # Without the function: unknown cost, 4 chunks per slot of the cluster as it is now (a
    # batch backend may have released or added a job since the first map).
    assert ex.automatic_chunksize(calls) == -(-calls // (4 * ex.worker_slots()))


def test_map_several_iterables_stops_at_the_shortest(ex):
    assert list(ex.map(add, range(10), range(100, 105))) == [100, 102, 104, 106, 108]


def test_map_of_nothing(ex):
    assert list(ex.map(abs, [])) == []


def test_map_raises_at_the_first_failing_call_after_the_results_before_it(ex):
    results = ex.map(fail_on, range(20), [7] * 20, chunksize=3)
    assert [next(results) for _ in range(7)] == [0, 2, 4, 6, 8, 10, 12]
    with pytest.raises(CustomError, match="bad item 7"):
        next(results)


def test_map_timeout(ex):
    results = ex.map(sleep_return, [0.0, 5.0], timeout=1.0, chunksize=1)
    assert next(results) is None
    with pytest.raises(TimeoutError):
        next(results)


def test_map_buffersize_reads_an_endless_generator_lazily(ex):
    produced = itertools.count()
    drawn = []

    def numbers():
        for number in produced:
            drawn.append(number)
            yield number

    results = ex.map(abs, numbers(), buffersize=3, chunksize=4)
    assert [next(results) for _ in range(10)] == list(range(10))
    results.close()
    # What was read: the 3 chunks after the one in hand, at most, beyond what was yielded.
    assert len(drawn) <= 10 + 4 * 4


def test_closing_the_map_iterator_cancels_what_it_has_not_yielded(ex, tmp_path):
    wait_until_idle(ex)
    count = 4 * ex.worker_slots() + 10
    results = ex.map(touch, [str(tmp_path)] * count, range(count), [0.3] * count, chunksize=1)
    assert next(results) == 0
    results.close()
    time.sleep(2.0)
    ran = len(os.listdir(tmp_path))
    assert ran < count, f"all {count} calls ran although the iterator was closed after one"


# -- standard-library helpers and cancellation -----------------------------------------------


def test_as_completed_and_wait(ex):
    wait_until_idle(ex)
    futures = [ex.submit(sleep_return, seconds, seconds) for seconds in (1.5, 0.0)]
    assert next(as_completed(futures, timeout=60)).result() == 0.0
    done, not_done = wait(futures, timeout=60, return_when=FIRST_COMPLETED)
    assert done
    done, not_done = wait(futures, timeout=60, return_when=ALL_COMPLETED)
    assert not not_done and sorted(future.result() for future in done) == [0.0, 1.5]


def test_cancel_pending_but_not_running(ex):
    blockers = occupy(ex, 2.0)
    queued = ex.submit(add, 1, 1)
    time.sleep(0.2)
    assert queued.cancel()
    assert queued.cancelled()
    with pytest.raises(CancelledError):
        queued.result(timeout=1)
    assert not blockers[0].cancel()
    assert blockers[0].result(timeout=60) is None


def test_callbacks_run_once_on_completion(ex):
    seen = []
    future = ex.submit(add, 20, 22)
    future.add_done_callback(lambda done: seen.append(done.result()))
    future.result(timeout=60)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [42]


# -- shutdown ---------------------------------------------------------------------------------


def test_shutdown_cancel_futures_cancels_queued_work(make_executor):
    executor = make_executor()
    blockers = occupy(executor, 1.5)
    queued = [executor.submit(add, number, 1) for number in range(20)]
    time.sleep(0.3)
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(future.done() for future in blockers + queued)
    assert all(future.result() is None for future in blockers)
    assert sum(future.cancelled() for future in queued) >= 15
    for future in queued:
        if not future.cancelled():
            assert future.result() == queued.index(future) + 1


def test_submit_after_shutdown_raises(make_executor):
    executor = make_executor()
    with executor:
        assert executor.submit(add, 1, 2).result(timeout=60) == 3
    with pytest.raises(RuntimeError):
        executor.submit(add, 1, 2)
    with pytest.raises(RuntimeError):
        list(executor.map(abs, [1]))


def test_shutdown_waits_for_accepted_work(make_executor):
    executor = make_executor()
    futures = [executor.submit(sleep_return, 0.5, number) for number in range(4)]
    executor.shutdown(wait=True)
    assert [future.result(timeout=0) for future in futures] == [0, 1, 2, 3]


def test_shutdown_without_wait_still_finishes_accepted_work(make_executor):
    executor = make_executor()
    futures = [executor.submit(sleep_return, 0.5, number) for number in range(3)]
    executor.shutdown(wait=False)
    assert [future.result(timeout=120) for future in futures] == [0, 1, 2]


def test_map_over_an_endless_iterator_beside_a_finite_one(ex):
    assert list(ex.map(add, itertools.count(), [10, 20, 30])) == [10, 21, 32]


def test_map_over_generators_and_arrays(ex):
    assert list(ex.map(add, (n for n in range(5)), np.arange(5))) == [0, 2, 4, 6, 8]


_USER_MODULE_SOURCE = '''
"""A module of the user's own: not installed, importable only from the working directory."""


def triple(value):
    return 3 * value
'''


def test_functions_of_a_user_module_in_the_working_directory_run(make_executor, tmp_path,
                                                                  monkeypatch):
    """As ``python -c``/``-m`` or a notebook in a project folder: sys.path has '' (the cwd)."""
    import importlib

    name = f"user_module_{uuid.uuid4().hex[:12]}"
    library_name = f"user_library_{uuid.uuid4().hex[:12]}"
    project, library = tmp_path / "project", tmp_path / "library"
    project.mkdir()
    library.mkdir()
    (project / f"{name}.py").write_text(_USER_MODULE_SOURCE)
    (library / f"{library_name}.py").write_text(_USER_MODULE_SOURCE)
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend("")
    monkeypatch.syspath_prepend(str(library))  # as PYTHONPATH=library would
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    library_module = importlib.import_module(library_name)
    try:
        executor = make_executor()
        try:
            assert executor.submit(module.triple, 5).result(timeout=120) == 15
            assert executor.submit(library_module.triple, 7).result(timeout=120) == 21
            assert list(executor.map(module.triple, range(6), timeout=120)) == [
                0, 3, 6, 9, 12, 15
            ]
        finally:
            executor.shutdown(wait=True)
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop(library_name, None)


def test_status_counts_the_calls_waiting_in_the_client(ex):
    blockers = occupy(ex, 1.5)
    waiting = [ex.submit(add, number, 1) for number in range(5)]
    assert ex.status().waiting_calls == 5
    assert [future.result(timeout=60) for future in waiting] == [1, 2, 3, 4, 5]
    assert ex.status().waiting_calls == 0
    assert [blocker.result(timeout=60) for blocker in blockers] == [None] * len(blockers)


# -- the call queue: dependencies, head-of-line, cancellation, memory ----------------------------


def test_futures_as_arguments_chain_and_diamond(ex):
    first = ex.submit(add, 1, 2)
    chained = ex.submit(add, ex.submit(add, first, 10), 100)
    assert chained.result(timeout=120) == 113
    top = ex.submit(sleep_return, 0.2, 5)
    left, right = ex.submit(add, top, 1), ex.submit(add, top, 2)
    bottom = ex.submit(echo_keywords, pair=[left, right], named={"top": top}, alone=(top,))
    assert bottom.result(timeout=120) == {"pair": [6, 7], "named": {"top": 5}, "alone": (5,)}


def test_a_failed_dependency_fails_the_call_with_it_as_the_cause(ex):
    from futures_hpc.errors import CallDependencyError

    failing = ex.submit(raise_custom)
    dependent = ex.submit(add, failing, 1)
    with pytest.raises(CallDependencyError) as raised:
        dependent.result(timeout=120)
    assert isinstance(raised.value.__cause__, CustomError)
    assert "raised on the worker" in str(raised.value)


def test_cancelling_a_dependency_cancels_what_waits_on_it(ex):
    blockers = occupy(ex, 1.5)
    waiting = ex.submit(add, 1, 1)  # no free slot: waits in the client
    dependent = ex.submit(add, waiting, 1)
    assert waiting.cancel()
    with pytest.raises(CancelledError):
        dependent.result(timeout=60)
    assert [blocker.result(timeout=60) for blocker in blockers] == [None] * len(blockers)


def test_a_quick_call_does_not_wait_behind_a_long_one(ex):
    """One worker busy with a long call, the other idle: quick calls use the idle one."""
    wait_until_idle(ex)
    slots = ex.worker_slots()
    long_calls = [ex.submit(sleep_return, 4.0, "long") for _ in range(slots - 1)]
    started = time.monotonic()
    quick = [ex.submit(pow, 2, exponent) for exponent in range(3)]
    assert [future.result(timeout=60) for future in quick] == [1, 2, 4]
    assert time.monotonic() - started < 3.0
    assert not any(future.done() for future in long_calls)
    assert [future.result(timeout=60) for future in long_calls] == ["long"] * (slots - 1)


def test_shutdown_cancel_futures_lets_running_calls_finish_and_cancels_the_rest(make_executor):
    executor = make_executor()
    futures = [executor.submit(sleep_return, 0.1, number) for number in range(50)]
    time.sleep(0.05)
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(future.done() for future in futures)
    cancelled = [future for future in futures if future.cancelled()]
    finished = [future for future in futures if not future.cancelled()]
    assert cancelled and finished, (len(cancelled), len(finished))
    assert all(futures.index(future) == future.result() for future in finished)


class Bulky:
    """A result whose lifetime the map test watches."""

    def __init__(self, value):
        self.value = value


def make_bulky(value):
    return Bulky(value)


def test_map_frees_each_result_once_yielded(ex):
    for chunksize in (None, 5):
        for obj in ex.map(make_bulky, range(5), chunksize=chunksize):
            reference = weakref.ref(obj)
            del obj
            gc.collect()
            assert reference() is None


# -- a worker killed in the middle of a task of packed calls (backends whose workers restart) ----


def record_or_kill(directory, value, killer, always):
    """Append ``value`` and this process's id to a side file; the killer's call kills its worker.

    The killer kills every time (``always``) or only the first time (a marker file remembers);
    it writes its process id to the marker file first, and sleeps, so that the calls before it
    in its task have finished and been reported when it dies.
    """
    marker = os.path.join(directory, "killed")
    if value == killer and (always or not os.path.exists(marker)):
        with open(marker, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        os._exit(1)
    with open(os.path.join(directory, "side"), "a") as handle:
        handle.write(f"{value} {os.getpid()}\n")
    return 2 * value


def check_killed_batch(executor, directory, always, killer=5, count=40):
    """Kill a worker in the middle of a packed task; check no call is lost, failed or rerun.

    ``executor`` has 2 worker slots whose workers restart when they die; ``directory`` is seen
    by the workers. Not a test of the shared suite: some backends' workers do not come back.
    """
    from futures_hpc import WorkerLostError

    # One call first: the function is then measured as quick, and its calls get packed.
    assert executor.submit(record_or_kill, str(directory), -1, killer, always).result(120) == -2
    # Both workers busy: the calls wait in the client together, and go out packed.
    blockers = occupy(executor, 1.0)
    futures = [executor.submit(record_or_kill, str(directory), value, killer, always)
               for value in range(count)]
    assert [blocker.result(timeout=60) for blocker in blockers] == [None] * len(blockers)
    for value, future in enumerate(futures):
        if value == killer and always:
            with pytest.raises(WorkerLostError, match="record_or_kill"):
                future.result(timeout=300)
        else:
            assert future.result(timeout=300) == 2 * value
    assert executor.submit(sum, [1, 2]).result(timeout=300) == 3  # the executor goes on
    lines = (directory / "side").read_text().split("\n")
    recorded = [tuple(int(word) for word in line.split()) for line in lines if line]
    expected = [-1, *(value for value in range(count) if not always or value != killer)]
    # Every call once: none lost, none run twice.
    assert sorted(value for value, _ in recorded) == sorted(expected)
    killer_pids = [int(line) for line in (directory / "killed").read_text().split()]
    # Killed once; or max_call_retries times in its packed task, then as often alone.
    assert len(killer_pids) == (2 * executor.max_call_retries if always else 1)
    # The calls before the killer ran in its task, in the process it killed: they had finished.
    assert {pid for value, pid in recorded if 0 <= value < killer} == {killer_pids[0]}
