"""What TLS by default costs the local backend: security=False against the default, side by side.

Both executors run in this process, with 2 worker processes each, warmed up the same way; every
timing alternates between them (the order flips each repeat, so a drift in the machine's load
weighs on both), and the best and the median of the repeats are printed. Issue 12 sets the
target: the default (TLS) within 1.15x of ``security=False`` (today's behaviour before it).

- (a) 100,000 trivial calls through ``ex.map`` (default chunksize);
- (b) 10,000 trivial ``submit`` calls, drained with ``as_completed``;
- (c) 2,000 calls of a fixed amount of CPU work (about 10 ms of counted arithmetic, the same
  count on both), as parallel efficiency: the calls' CPU time run one after the other in this
  process, divided by the number of workers, over the elapsed time.

Run: ``python benchmarks/security.py`` (``--repeats``, ``--calls``, ``--submits``,
``--work-calls`` to change the sizes, ``--only map|submit|work`` for some parts; ``--quick`` for a
short smoke run whose figures mean nothing). The machine's
load average is printed before and after: figures taken under load are not comparable.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from concurrent.futures import as_completed

from _common import calibrate_iterations, counted_work, cpu_seconds_of, print_header, quiet_logs
from _common import timed as _timed

WORKERS = 2

#: Milliseconds of work of each call in (c), calibrated once into an iteration count.
WORK_MILLISECONDS = 10


def trivial(value):
    return value


def map_trivial(executor, calls: int) -> None:
    results = list(executor.map(trivial, range(calls)))
    assert results[-1] == calls - 1


def submit_and_drain(executor, calls: int) -> None:
    futures = [executor.submit(trivial, index) for index in range(calls)]
    assert sum(future.result() for future in as_completed(futures)) == calls * (calls - 1) // 2


def map_work(executor, iterations: int, calls: int, chunksize: int | None = None) -> None:
    results = list(executor.map(counted_work, [iterations] * calls, chunksize=chunksize))
    assert len(results) == calls


def side_by_side(executors: dict[str, object], repeats: int,
                 run: Callable[[object], None]) -> dict[str, list[float]]:
    """Time ``run(executor)`` ``repeats`` times per executor, alternating and flipping order."""
    timings: dict[str, list[float]] = {name: [] for name in executors}
    names = list(executors)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            timings[name].append(_timed(lambda name=name: run(executors[name])))
    return timings


def report(title: str, timings: dict[str, list[float]], baseline: str, candidate: str,
           ideal: float | None = None) -> float:
    """Print best and median per executor and the ratio candidate / baseline; return it."""
    print(f"\n{title}")
    for name, values in timings.items():
        line = (f"  {name:<28} best {min(values):8.3f} s   median "
                f"{statistics.median(values):8.3f} s")
        if ideal is not None:
            line += f"   efficiency best {100 * ideal / min(values):5.1f} %"
        print(line)
    best_ratio = min(timings[candidate]) / min(timings[baseline])
    median_ratio = statistics.median(timings[candidate]) / statistics.median(timings[baseline])
    print(f"  RATIO {candidate} / {baseline}: best {best_ratio:.3f}, median {median_ratio:.3f}"
          "  (target <= 1.15)")
    return best_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--submits", type=int, default=10_000)
    parser.add_argument("--work-calls", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("map", "submit", "work"), action="append",
                        help="run only these parts (repeatable); default: all three")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10,000 map calls, 1,000 submits, 100 work calls, 1 repeat")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.calls, arguments.submits, arguments.work_calls = 10_000, 1_000, 100
        arguments.repeats = 1
    quiet_logs()
    print_header("the local backend's default (TLS) against security=False: ex.map, submit + "
                 "as_completed, fixed CPU work")

    from futures_hpc import LocalExecutor

    print(f"load average before: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    iterations = calibrate_iterations(WORK_MILLISECONDS)
    work_seconds = cpu_seconds_of(iterations)  # one call's CPU time here, measured once
    baseline, candidate = "security=False", "default (TLS)"
    executors = {
        baseline: LocalExecutor(max_workers=WORKERS, security=False),
        candidate: LocalExecutor(max_workers=WORKERS),
    }
    try:
        assert executors[baseline].cluster.scheduler_address.startswith("tcp://")
        assert executors[candidate].cluster.scheduler_address.startswith("tls://")
        for executor in executors.values():  # the same warm-up for both
            map_trivial(executor, 10_000)
            submit_and_drain(executor, 1_000)
            map_work(executor, iterations, 20)

        parts = set(arguments.only or ("map", "submit", "work"))
        ratios = {}
        if "map" in parts:
            ratios["map"] = report(
                f"(a) ex.map of {arguments.calls:,} trivial calls",
                side_by_side(executors, arguments.repeats,
                             lambda executor: map_trivial(executor, arguments.calls)),
                baseline, candidate)
        if "submit" in parts:
            ratios["submit"] = report(
                f"(b) {arguments.submits:,} submit + as_completed",
                side_by_side(executors, arguments.repeats,
                             lambda executor: submit_and_drain(executor, arguments.submits)),
                baseline, candidate)
        if "work" in parts:
            serial = arguments.work_calls * work_seconds
            # The same chunks on both (each executor sizes them from the call times it has
            # measured, which the machine's load makes differ).
            chunksize = executors[baseline].automatic_chunksize(arguments.work_calls, counted_work)
            ratios["work"] = report(
                f"(c) {arguments.work_calls:,} calls of {iterations:,} steps (about "
                f"{1000 * work_seconds:.1f} ms each; ideal {serial / WORKERS:.2f} s on "
                f"{WORKERS} workers, chunksize {chunksize})",
                side_by_side(executors, arguments.repeats, lambda executor: map_work(
                    executor, iterations, arguments.work_calls, chunksize)),
                baseline, candidate, ideal=serial / WORKERS)
    finally:
        for executor in executors.values():
            executor.shutdown()
    print(f"\nload average after: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    print("RATIOS (best, default / security=False): "
          + ", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()))


if __name__ == "__main__":
    main()
