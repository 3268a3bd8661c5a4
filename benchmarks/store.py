"""What a result store costs, and what a rerun saves, side by side in one run.

The resume issue's targets, on 2 local workers at the defaults:

- 100,000 trivial calls through ``ex.map`` with ``store=`` (a fresh store each round): at most
  1.5x the same map without a store. Both executors are warmed the same way (one untimed map
  of 1,000 other calls: a call made twice in one run is a repeat, which the store must number
  apart, a cost of its own, printed beside as "1% repeats") and the rounds alternate, so that
  drift on a noisy machine hits both sides.
- A full rerun that finds every call recorded: at least 10x faster than computing. The calls do
  a fixed amount of CPU work (counted arithmetic, about 2 ms each; ``--work-ms``), and both
  sides are timed in an open executor, from ``map`` to the last result.
- Files the store created: at most the number of chunks of the map.

Also printed: the client's CPU seconds of each side (what the user's own process pays).

Run: ``python benchmarks/store.py`` (``--calls``, ``--work-calls``, ``--rounds``; ``--quick``
for a short smoke run whose figures mean nothing).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import calibrate_iterations, median, print_header, quiet_logs, ratio
from _common import counted_work as work

from futures_hpc import HPCExecutor
from futures_hpc.store import segments

WORKERS = 2


def trivial(value):
    return value


def timed_map(ex, function, arguments) -> tuple[float, float, list]:
    """Wall and client CPU seconds of ``list(ex.map(function, arguments))``, and the list."""
    started, cpu = time.perf_counter(), time.process_time()
    results = list(ex.map(function, arguments))
    return time.perf_counter() - started, time.process_time() - cpu, results


def overhead(calls: int, rounds: int, directory: Path) -> None:
    """100,000 trivial calls with and without a store, alternating."""
    plain_times, stored_times, plain_cpu, stored_cpu, files, chunks = [], [], [], [], [], []
    repeat_times: list[float] = []
    expected = list(range(calls))
    for round_number in range(rounds):
        for with_store in ((False, True) if round_number % 2 == 0 else (True, False)):
            store = directory / f"overhead-{round_number}" if with_store else None
            options = {"store": store} if with_store else {}
            with HPCExecutor("local", max_workers=WORKERS, **options) as ex:
                list(ex.map(trivial, range(calls, calls + 1000)))  # warm-up, untimed
                seconds, cpu, results = timed_map(ex, trivial, expected)
                chunk_count = -(-calls // ex.automatic_chunksize(calls, trivial))
            assert results == expected
            if with_store:
                with HPCExecutor("local", max_workers=WORKERS,
                                 store=directory / f"repeats-{round_number}") as ex:
                    list(ex.map(trivial, range(1000, 2000)))  # 1% of the timed calls
                    repeat_times.append(timed_map(ex, trivial, expected)[0])
                stored_times.append(seconds)
                stored_cpu.append(cpu)
                files.append(len(segments.segment_names(str(store))))
                chunks.append(chunk_count)
            else:
                plain_times.append(seconds)
                plain_cpu.append(cpu)
    plain, stored = median(plain_times), median(stored_times)
    print(f"{calls:,} trivial calls, ex.map, {WORKERS} local workers, {rounds} rounds each")
    print(f"  without a store:  {plain:.3f} s (client CPU {median(plain_cpu):.2f} s)")
    print(f"  with a store:     {stored:.3f} s (client CPU {median(stored_cpu):.2f} s)")
    print(f"  ratio with/without: {ratio(stored, plain)}   (target <= 1.5x)")
    print(f"  with a store, 1% repeats: {median(repeat_times):.3f} s "
          f"({ratio(median(repeat_times), plain)} the map without a store): 1,000 of the calls "
          "repeat the warm-up's, each keyed by the client")
    print(f"  files in the store: {max(files)} (including the runs' own); chunks of the map: "
          f"{min(chunks)}   (target files <= chunks)")


def rerun(calls: int, iterations: int, rounds: int, directory: Path) -> None:
    """Computing ``calls`` calls of fixed work against a rerun that finds them all recorded."""
    store = directory / "rerun"
    arguments = [iterations + number % 7 for number in range(calls)]
    with HPCExecutor("local", max_workers=WORKERS, store=store) as ex:
        list(ex.map(work, [iterations] * 10))  # warm-up, untimed
        computing, computing_cpu, expected = timed_map(ex, work, arguments)
    rerun_times, rerun_cpu = [], []
    for _ in range(rounds):
        with HPCExecutor("local", max_workers=WORKERS, store=store) as ex:
            list(ex.map(work, [iterations] * 10))  # the same warm-up: recorded, so not run
            seconds, cpu, results = timed_map(ex, work, arguments)
            assert results == expected
            assert ex.store.hits == calls + 10, ex.store.hits
        rerun_times.append(seconds)
        rerun_cpu.append(cpu)
    print(f"{calls:,} calls of fixed CPU work ({iterations:,} steps each), {WORKERS} workers")
    print(f"  computing:                 {computing:.3f} s (client CPU {computing_cpu:.2f} s)")
    print(f"  rerun, everything stored:  {median(rerun_times):.3f} s "
          f"(client CPU {median(rerun_cpu):.2f} s, median of {rounds})")
    print(f"  computing / rerun: {ratio(computing, median(rerun_times))}   (target >= 10x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--work-calls", type=int, default=5_000)
    parser.add_argument("--work-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.calls, arguments.work_calls, arguments.rounds = 5_000, 200, 1
    quiet_logs()
    print_header("store=: the cost of recording results, and the rerun that reuses them")
    directory = Path(tempfile.mkdtemp(prefix="fhpc-store-bench-"))
    try:
        overhead(arguments.calls, arguments.rounds * 2 - 1, directory)
        rerun(arguments.work_calls, calibrate_iterations(arguments.work_ms), arguments.rounds,
              directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
