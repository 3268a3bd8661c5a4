"""The ``submit`` loop against ``ProcessPoolExecutor``, side by side in one run.

What a ``concurrent.futures`` user writes: submit calls in a loop, drain them with
``as_completed``. Each figure runs both systems in this process, warmed up the same way (a first
round that is not timed), and prints the ratio; results are checked. The call queue issue's
targets:

- 10,000 trivial ``submit`` + ``as_completed`` on 2 local workers: at most 2x
  ``ProcessPoolExecutor(2)``;
- the same on SLURM with 2 one-core jobs already running (``--slurm``): at most 3x the local
  ``ProcessPoolExecutor(2)``;
- 1,000 calls of a fixed amount of CPU work (about 10 ms of counted arithmetic, not a wait on
  the clock): parallel efficiency within 5 points of ``ProcessPoolExecutor(2)``'s;
- client memory per pending call, 1,000,000 trivial submits while the workers are busy (each
  system in a child process of its own, resident memory before and after);
- 64 one-thread local worker processes, 100,000 submits of a 1 ms call (``--wide``): all
  results right, and the client process's CPU time per call within 2x of the 2-worker figure.
  The local backend's scheduler and nannies run in the client's process, so beside it the
  process's CPU while the cluster is idle is printed, and the per-call figure beyond it.

Run: ``python benchmarks/submit.py`` (add ``--slurm`` on a machine with SLURM, ``--wide`` for the
64-worker figure; ``--memory-calls`` sets the pending-call count; ``--quick`` for a short smoke
run whose figures mean nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import time

from _common import calibrate_iterations, print_header, quiet_logs
from _common import counted_work as work

WORKERS = 2
#: Seconds the --wide figure watches the idle cluster's cost in the client's process.
IDLE_SECONDS = 10


def trivial(value):
    return value


def timed_work(iterations):
    """:func:`work`, and the CPU seconds its thread spent on it (the work's own cost)."""
    started = time.thread_time()
    total = work(iterations)
    return total, time.thread_time() - started


def iterations_for(seconds: float) -> int:
    """Loop iterations that take about ``seconds`` here, calibrated once in this process."""
    return calibrate_iterations(seconds * 1000)


def submit_loop(executor, function, arguments) -> tuple[float, list]:
    """Submit one call per argument, drain with as_completed; return seconds and results."""
    started = time.perf_counter()
    futures = [executor.submit(function, argument) for argument in arguments]
    results = [future.result() for future in concurrent.futures.as_completed(futures)]
    return time.perf_counter() - started, results


def best_submit_loop(executor, function, arguments, repeats) -> float:
    submit_loop(executor, function, arguments[: max(1, len(arguments) // 10)])  # warm-up
    timings = []
    for _ in range(repeats):
        seconds, results = submit_loop(executor, function, arguments)
        assert sorted(results) == sorted(function(argument) for argument in arguments)
        timings.append(seconds)
    return min(timings)


def efficiency(executor, iterations, calls) -> float:
    """Ideal time over the elapsed time of a submit loop of fixed CPU work.

    The ideal time is the CPU time the calls themselves took on the workers, divided by the
    workers: the same measure for both systems, unmoved by other load on the machine.
    """
    seconds, results = submit_loop(executor, timed_work, [iterations] * calls)
    assert [total for total, _ in results] == [work(iterations)] * calls
    return sum(cpu for _, cpu in results) / WORKERS / seconds


def pending_memory(system: str, calls: int) -> float:
    """Bytes of client memory per pending call, measured in a child process."""
    child = subprocess.run(
        [sys.executable, __file__, "--measure-memory", system, "--memory-calls", str(calls)],
        capture_output=True, text=True, timeout=1800, check=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])["bytes_per_call"]


def measure_memory(system: str, calls: int) -> None:
    """In a child: occupy the workers, submit ``calls`` trivial calls, report memory per call."""
    import psutil

    process = psutil.Process()
    if system == "futures_hpc":
        from futures_hpc import HPCExecutor

        executor = HPCExecutor("local", max_workers=WORKERS)
    else:
        executor = concurrent.futures.ProcessPoolExecutor(WORKERS)
    # Time-based on purpose: the sleeps only hold the workers busy (waiting, not measured work).
    blockers = [executor.submit(time.sleep, 5) for _ in range(WORKERS)]
    time.sleep(1.0)
    before = process.memory_info().rss
    futures = [executor.submit(trivial, number) for number in range(calls)]
    after = process.memory_info().rss
    print(json.dumps({"bytes_per_call": (after - before) / calls}), flush=True)
    del futures, blockers
    executor.shutdown(wait=True, cancel_futures=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--work-calls", type=int, default=1_000)
    parser.add_argument("--memory-calls", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slurm", action="store_true", help="also on SLURM (2 one-core jobs)")
    parser.add_argument("--wide", action="store_true", help="also 64 one-thread local workers")
    parser.add_argument("--measure-memory", choices=["futures_hpc", "pool"])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1,000 submits, 100 work calls, 10,000 pending, 1 repeat")
    arguments = parser.parse_args()
    quiet_logs()
    if arguments.measure_memory:
        measure_memory(arguments.measure_memory, arguments.memory_calls)
        return
    if arguments.quick:
        arguments.calls, arguments.work_calls, arguments.memory_calls = 1_000, 100, 10_000
        arguments.repeats = 1
    print_header("futures_hpc submit + as_completed against ProcessPoolExecutor(2): trivial calls, "
                 "fixed CPU work, client memory per pending call")

    from futures_hpc import HPCExecutor

    items = list(range(arguments.calls))
    iterations = iterations_for(0.010)

    with concurrent.futures.ProcessPoolExecutor(WORKERS) as pool:
        pool_seconds = best_submit_loop(pool, trivial, items, arguments.repeats)
        submit_loop(pool, work, [iterations] * 20)
        pool_efficiency = efficiency(pool, iterations, arguments.work_calls)
    with HPCExecutor("local", max_workers=WORKERS) as executor:
        ours_seconds = best_submit_loop(executor, trivial, items, arguments.repeats)
        submit_loop(executor, work, [iterations] * 20)
        ours_efficiency = efficiency(executor, iterations, arguments.work_calls)
    print(f"{arguments.calls:,} trivial submit + as_completed, 2 local workers:")
    print(f"  ProcessPoolExecutor(2) {pool_seconds:.3f} s, futures_hpc {ours_seconds:.3f} s: "
          f"ratio {ours_seconds / pool_seconds:.2f}x (target <= 2x)")
    print(f"{arguments.work_calls:,} calls of ~10 ms fixed CPU work ({iterations:,} iterations), "
          f"2 workers: efficiency ProcessPoolExecutor(2) {pool_efficiency:.1%}, futures_hpc "
          f"{ours_efficiency:.1%}: {100 * (pool_efficiency - ours_efficiency):+.1f} points "
          "behind (target <= 5)")

    if arguments.slurm:
        with HPCExecutor("slurm", max_workers=2, cores=1, memory="1GB", walltime="00:20:00",
                         adaptive=False) as executor:
            executor.client.wait_for_workers(2, timeout=300)
            slurm_seconds = best_submit_loop(executor, trivial, items, arguments.repeats)
        print(f"  SLURM, 2 one-core jobs running: {slurm_seconds:.3f} s: "
              f"{slurm_seconds / pool_seconds:.2f}x the local ProcessPoolExecutor(2) "
              "(target <= 3x)")

    ours_memory = pending_memory("futures_hpc", arguments.memory_calls)
    pool_memory = pending_memory("pool", arguments.memory_calls)
    print(f"client memory per pending call ({arguments.memory_calls:,} pending trivial submits): "
          f"ProcessPoolExecutor {pool_memory:.0f} bytes, futures_hpc {ours_memory:.0f} bytes "
          f"({ours_memory / pool_memory:.2f}x)")

    if arguments.wide:
        one_ms = iterations_for(0.001)
        wide_calls = list(range(100_000))
        figures = {}
        for workers in (2, 64):
            with HPCExecutor("local", max_workers=workers) as executor:
                executor.client.wait_for_workers(workers, timeout=600)
                submit_loop(executor, work, [one_ms] * 1000)
                # The local backend's scheduler and nannies live in the client's process: what
                # they take while no call runs, per second, is measured first.
                idle_started, idle_cpu_started = time.perf_counter(), time.process_time()
                time.sleep(IDLE_SECONDS)
                idle_rate = ((time.process_time() - idle_cpu_started)
                             / (time.perf_counter() - idle_started))
                cpu_started = time.process_time()
                seconds, results = submit_loop(executor, work, [one_ms] * len(wide_calls))
                cpu = time.process_time() - cpu_started
                assert results == [work(one_ms)] * len(wide_calls)
                figures[workers] = (cpu / len(wide_calls), seconds, idle_rate,
                                    (cpu - idle_rate * seconds) / len(wide_calls))
        (two, two_wall, two_idle, two_net), (wide, wide_wall, wide_idle, wide_net) = (
            figures[2], figures[64])
        print(f"100,000 submits of a 1 ms call: client CPU per call {two * 1e6:.1f} us with 2 "
              f"workers, {wide * 1e6:.1f} us with 64: {wide / two:.2f}x (target <= 2x); wall "
              f"{two_wall:.1f} s and {wide_wall:.1f} s")
        print(f"  the client's process idle (its scheduler and nannies, no call running): "
              f"{100 * two_idle:.1f} % of a core with 2 workers, {100 * wide_idle:.1f} % with 64; "
              f"per call beyond that: {two_net * 1e6:.1f} us and {wide_net * 1e6:.1f} us "
              f"({wide_net / two_net:.2f}x)")


if __name__ == "__main__":
    main()
