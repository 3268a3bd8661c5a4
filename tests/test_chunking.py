"""How ``map`` sizes its chunks: the pure rule, the cost memory, and the worker's timing."""

from __future__ import annotations

import os
import pickle
import sys
import time

import cloudpickle
import pytest

from futures_hpc import HPCExecutor, chunking
from futures_hpc.calls import pack_chunk, pack_function, run_chunk
from futures_hpc.chunking import CallCosts, automatic_chunksize, function_key, useful_tasks

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def process_id(_):
    return os.getpid()


def process_id_after_work(_):
    """The worker's process id, after a few microseconds of counted work."""
    total = 0
    for step in range(300):
        total += step
    return os.getpid() + total * 0


def identity(value):
    return value


@pytest.mark.parametrize(("calls", "slots", "cost", "expected"), [
    (10_000, 2, None, 1250),      # unknown cost: 4 chunks per slot
    (10_000, 2, 1e-6, 5000),      # 10 ms of work: two chunks, one per slot
    (10_000, 4, 1e-6, 5000),      # 10 ms of work: two chunks, though there are 4 slots
    (10_000, 4, 1e-7, 10_000),    # 1 ms of work: one chunk
    (10_000, 2, 2e-5, 2500),      # 100 ms per slot: two chunks of 50 ms each
    (2_000, 2, 0.010, 250),       # 10 s per slot: 4 chunks each
    (3, 8, 1.0, 1),               # fewer calls than slots
    (0, 2, None, 1),
    (10, 0, None, 3),             # no worker yet counts as one slot
])
def test_automatic_chunksize(calls, slots, cost, expected):
    assert automatic_chunksize(calls, slots, cost) == expected


def test_a_chunk_is_never_shorter_than_the_minimum_unless_a_slot_has_less_work():
    for cost in (1e-7, 1e-5, 1e-4, 1e-3, 1e-2):
        size = automatic_chunksize(100_000, 4, cost)
        chunks_per_slot = 100_000 / (4 * size)
        assert chunks_per_slot <= chunking.CHUNKS_PER_WORKER_SLOT
        assert size * cost >= chunking.MIN_CHUNK_SECONDS or chunks_per_slot <= 1


@pytest.mark.parametrize("slots", [1, 2, 3, 8, 64])
def test_useful_tasks_is_the_split_that_ends_soonest(slots):
    """k tasks end (k - 1) * TASK_SECONDS + seconds / k after the first is sent: the least."""
    cost = chunking.TASK_SECONDS
    for seconds in (0.0, 1e-4, 0.005, 0.006, 0.0061, 0.01, 0.018, 0.05, 0.3, 2.0, 100.0):
        ends = {k: (k - 1) * cost + seconds / k for k in range(1, slots + 1)}
        best = min(ends.values())
        chosen = useful_tasks(seconds, slots)
        assert 1 <= chosen <= slots
        assert ends[chosen] <= best + 1e-12, (seconds, chosen, ends)


def test_trivial_work_goes_in_one_task_and_long_work_fills_every_slot():
    assert useful_tasks(0.002, 64) == 1
    assert useful_tasks(10.0, 64) == 58  # 58 * 57 * 3 ms <= 10 s < 59 * 58 * 3 ms
    assert useful_tasks(10.0, 8) == 8
    assert useful_tasks(-1.0, 4) == 1


def test_call_costs_average_the_newest_measurements():
    costs = CallCosts()
    key = function_key(b"f")
    assert costs.seconds_per_call(key) is None
    costs.record(key, 100, 1.0)
    assert costs.seconds_per_call(key) == pytest.approx(0.01)
    costs.record(key, 100, 3.0)
    assert costs.seconds_per_call(key) == pytest.approx(0.02)
    costs.record(key, 0, 5.0)          # nothing ran: ignored
    costs.record(key, 10, float("nan"))
    assert costs.seconds_per_call(key) == pytest.approx(0.02)
    assert costs.seconds_per_call(function_key(b"g")) is None


def test_call_costs_forget_the_least_recently_used(monkeypatch):
    monkeypatch.setattr(chunking, "REMEMBERED_FUNCTIONS", 3)
    costs = CallCosts()
    for name in (b"a", b"b", b"c"):
        costs.record(function_key(name), 1, 1.0)
    costs.record(function_key(b"a"), 1, 1.0)  # a is now the newest
    costs.record(function_key(b"d"), 1, 1.0)
    assert costs.seconds_per_call(function_key(b"b")) is None
    assert costs.seconds_per_call(function_key(b"a")) is not None


def test_function_key_follows_the_pickle():
    assert function_key(pack_function(len)) == function_key(pack_function(len))
    assert function_key(pack_function(len)) != function_key(pack_function(abs))


def sleepy(value):
    time.sleep(0.01)
    if value == 3:
        raise ValueError("three")
    return value


def test_run_chunk_reports_the_seconds_its_calls_took():
    kind, results, error, seconds = pickle.loads(
        run_chunk(pack_chunk(pack_function(sleepy), [[0, 1, 2]])))
    assert (kind, results, error) == ("chunk", [0, 1, 2], None)
    assert 0.03 <= seconds < 1.0
    kind, results, error, seconds = pickle.loads(
        run_chunk(pack_chunk(pack_function(sleepy), [[0, 3, 4]])))
    assert results == [0] and isinstance(error, ValueError)
    assert 0.02 <= seconds < 1.0  # up to and including the failing call


def test_the_chunks_of_a_map_spread_over_the_workers():
    """A map's chunks reach the scheduler together, so that it spreads them. Sent one by one,
    a worker that had already finished the first chunk could get the second one as well, and
    the two ran one after the other (seen in 12 maps of 20 once, after maps of many short
    chunks; it depends on timing, so this test guards the spread, it cannot force the race).
    Packing quick chunks must not put the two chunks of a map in one task either, once their
    work pays for two tasks (10,000 calls of a few microseconds: tens of milliseconds).

    Each call returns its worker's process id, rather than reading dask's task stream: the
    stream keeps only records that started after it opened, by the scheduler's estimate of
    each worker's clock, which on distributed 2024.1 dropped up to 11 of the 40 records.
    """
    with HPCExecutor("local", max_workers=2) as ex:
        items = list(range(10_000))
        for _ in range(10):
            list(ex.map(process_id_after_work, items, chunksize=100))  # many short tasks first
        together = []
        for _ in range(20):
            pids = list(ex.map(process_id_after_work, items, chunksize=5_000))
            first, second = set(pids[:5_000]), set(pids[5_000:])
            assert len(first) == 1 and len(second) == 1  # each chunk ran in one task
            if first == second:
                together.append(pids[0])
        assert together == []


def test_the_chunks_of_a_trivial_map_share_one_task():
    """Chunks whose work is a fraction of a task's cost go in one task (chunking.useful_tasks):
    sent to both workers they would cost the client two tasks to save a fraction of a
    millisecond. The first map measures the calls; the next ones send them in one task."""
    with HPCExecutor("local", max_workers=2) as ex:
        items = list(range(10_000))
        list(ex.map(process_id, items, chunksize=1_250))
        for _ in range(5):
            assert len(set(ex.map(process_id, items, chunksize=1_250))) == 1
        assert ex.automatic_chunksize(len(items), process_id) == len(items)

