"""The clock that times calls on the workers leaves out the time a thread waits for a CPU."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import sys
import time

import pytest

from futures_hpc.call_clock import SCHEDSTAT_PATH, call_clock
from futures_hpc.calls import pack_chunk, pack_function, run_chunks

linux_only = pytest.mark.skipif(not os.path.exists(SCHEDSTAT_PATH),
                                reason="the run-queue wait is read from Linux's /proc")

#: Loop rounds of counted work: about 50 ms on this machine.
WORK_ROUNDS = 1_500_000


def count(rounds: int) -> int:
    total = 0
    for number in range(rounds):
        total += number
    return total


def spin_on_cpu_zero(stop) -> None:
    os.sched_setaffinity(0, {0})
    while not stop.is_set():
        count(10_000)


@contextlib.contextmanager
def sharing_cpu_zero_with_three_others():
    """Run the block on CPU 0 alone, with three busy processes pinned there too."""
    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    stop = context.Event()
    spinners = [context.Process(target=spin_on_cpu_zero, args=(stop,)) for _ in range(3)]
    before = os.sched_getaffinity(0)
    for spinner in spinners:
        spinner.start()
    try:
        os.sched_setaffinity(0, {0})
        time.sleep(0.2)  # the spinners are pinned and running
        yield
    finally:
        os.sched_setaffinity(0, before)
        stop.set()
        for spinner in spinners:
            spinner.join(timeout=10)


@linux_only
def test_a_call_sharing_its_cpu_with_three_others_measures_its_own_work():
    """Four busy processes on one CPU: the call's wall time is several times its CPU time;
    the call clock gives about the CPU time, as the call would have taken alone."""
    with sharing_cpu_zero_with_three_others():
        wall, clock, cpu = time.perf_counter(), call_clock(), time.thread_time()
        count(WORK_ROUNDS)
        wall = time.perf_counter() - wall
        clock = call_clock() - clock
        cpu = time.thread_time() - cpu
    assert wall > 2 * cpu, (wall, clock, cpu)  # it did share the CPU
    assert cpu * 0.9 <= clock <= cpu * 1.5 + 0.01, (wall, clock, cpu)


@linux_only
def test_the_chunks_of_a_packed_task_are_charged_their_share_of_the_wait_for_a_cpu():
    """A task of several chunks reads the wait for a CPU once and shares it out: each chunk's
    seconds are still about its own work, not its wall time, on a CPU shared by four."""
    function = pack_function(count)
    chunks = [pack_chunk(function, [[WORK_ROUNDS // 2]]),
              pack_chunk(function, [[WORK_ROUNDS]])]
    with sharing_cpu_zero_with_three_others():
        wall, cpu = time.perf_counter(), time.thread_time()
        kind, packed = pickle.loads(run_chunks(pickle.dumps(chunks)))
        wall = time.perf_counter() - wall
        cpu = time.thread_time() - cpu
    outcomes = [pickle.loads(outcome) for outcome in packed]
    assert kind == "chunks"
    assert [outcome[:3] for outcome in outcomes] == [
        ("chunk", [count(WORK_ROUNDS // 2)], None), ("chunk", [count(WORK_ROUNDS)], None)]
    half, whole = (outcome[3] for outcome in outcomes)
    assert wall > 2 * cpu, (wall, cpu)  # it did share the CPU
    assert cpu * 0.8 <= half + whole <= cpu * 1.5 + 0.01, (half, whole, wall, cpu)
    assert 1.3 < whole / half < 3.0, (half, whole)


def test_a_call_that_sleeps_measures_its_sleep():
    """Waiting (a sleep, I/O, a lock) is part of a call's cost: only waits for a CPU are not."""
    started = call_clock()
    time.sleep(0.2)
    assert call_clock() - started >= 0.19
