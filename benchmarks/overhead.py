"""Per-call overhead of ``ex.map`` against the usual pools, side by side in one run.

Every pool is started and warmed up before it is timed; start-up to the first result is
measured and printed separately. Prints the ratios the executor-core issue sets as targets:

- 100,000 trivial calls: ``ex.map`` (default chunksize) at most 1.5x the best
  ``ProcessPoolExecutor(2).map`` figure (best over several chunk sizes), and at least 20x faster
  than plain ``client.map`` on the same cluster;
- 2,000 calls of a 10 ms CPU-bound function: parallel efficiency (ideal time / elapsed) of at
  least 90 %.

Run: ``python benchmarks/overhead.py`` (``--client-map-calls 100000`` times plain
``client.map`` on all calls instead of a sample; at about 2 ms per task that takes minutes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

WORKERS = 2


def trivial(value):
    return value


def spin(milliseconds):
    """Busy-wait ``milliseconds`` of wall time: a CPU-bound call."""
    end = time.perf_counter() + milliseconds / 1000
    count = 0
    while time.perf_counter() < end:
        count += 1
    return count


def best_of(repeats, function):
    """Best (smallest) wall time of ``repeats`` runs of ``function``, and its last result."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        timings.append(time.perf_counter() - start)
    return min(timings), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--client-map-calls", type=int, default=10_000)
    parser.add_argument("--spin-calls", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()

    import joblib
    import loky

    from futures_hpc import HPCExecutor

    items = list(range(arguments.calls))
    expected = items
    print(f"{arguments.calls:,} trivial calls, {WORKERS} worker processes, best of "
          f"{arguments.repeats}")

    start = time.perf_counter()
    executor = HPCExecutor("local", max_workers=WORKERS)
    executor.submit(trivial, 0).result()
    startup = {"futures_hpc HPCExecutor('local')": time.perf_counter() - start}

    start = time.perf_counter()
    process_pool = concurrent.futures.ProcessPoolExecutor(WORKERS)
    list(process_pool.map(trivial, range(WORKERS * 4)))
    startup["ProcessPoolExecutor(2)"] = time.perf_counter() - start

    start = time.perf_counter()
    loky_pool = loky.get_reusable_executor(max_workers=WORKERS)
    loky_pool.submit(trivial, 0).result()
    startup["loky reusable executor(2)"] = time.perf_counter() - start

    # Warm every pool on the real function before timing.
    list(executor.map(trivial, items[:1000]))
    joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(trivial)(item) for item in items[:1000])

    timings: dict[str, float] = {}
    elapsed, result = best_of(arguments.repeats, lambda: list(executor.map(trivial, items)))
    assert result == expected
    timings["futures_hpc ex.map (default chunksize)"] = elapsed
    chunk_choice = executor.automatic_chunksize(len(items), trivial)

    process_pool_by_chunk = {}
    for chunksize in (1_000, 5_000, 12_500, 50_000):
        elapsed, result = best_of(
            arguments.repeats,
            lambda size=chunksize: list(process_pool.map(trivial, items, chunksize=size)),
        )
        assert result == expected
        process_pool_by_chunk[chunksize] = elapsed
    best_chunk = min(process_pool_by_chunk, key=process_pool_by_chunk.get)
    timings[f"ProcessPoolExecutor(2).map (best chunksize {best_chunk})"] = process_pool_by_chunk[
        best_chunk
    ]

    elapsed, result = best_of(
        arguments.repeats, lambda: list(loky_pool.map(trivial, items, chunksize=best_chunk))
    )
    assert result == expected
    timings[f"loky.map (chunksize {best_chunk})"] = elapsed

    elapsed, result = best_of(
        arguments.repeats,
        lambda: joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(trivial)(item) for item in items),
    )
    assert result == expected
    timings["joblib.Parallel(n_jobs=2), loky, batch_size auto"] = elapsed

    sample = items[: arguments.client_map_calls]
    client = executor.client

    def plain_client_map():
        futures = client.map(trivial, sample, pure=False)
        results = client.gather(futures)
        del futures
        return results

    elapsed, result = best_of(1, plain_client_map)
    assert result == sample
    scale = len(items) / len(sample)
    client_map_label = "plain client.map on the same cluster"
    if scale != 1:
        client_map_label += f" (timed on {len(sample):,} calls, scaled x{scale:g})"
    timings[client_map_label] = elapsed * scale

    ours = timings["futures_hpc ex.map (default chunksize)"]
    print("\nStart-up to first result (separate from the timings below):")
    for name, seconds in startup.items():
        print(f"  {name:<55} {seconds:8.3f} s")
    print(f"\n{arguments.calls:,} trivial calls (ex.map chose chunksize {chunk_choice}):")
    for name, seconds in timings.items():
        print(f"  {name:<70} {seconds:8.3f} s   ex.map / this = {ours / seconds:6.3f}")
    best_process_pool = process_pool_by_chunk[best_chunk]
    ratio_pool = ours / best_process_pool
    ratio_client = timings[client_map_label] / ours
    print(f"\n  RATIO ex.map / best ProcessPoolExecutor = {ratio_pool:.2f}  (target <= 1.5)")
    print(f"  RATIO plain client.map / ex.map        = {ratio_client:.1f}  (target >= 20)")

    spin_calls = [10] * arguments.spin_calls
    ideal = len(spin_calls) * 0.010 / WORKERS
    print(f"\n{len(spin_calls):,} calls of 10 ms CPU-bound work on {WORKERS} workers "
          f"(ideal {ideal:.2f} s):")
    efficiencies = {}
    for name, run in (
        ("futures_hpc ex.map (default chunksize)", lambda: list(executor.map(spin, spin_calls))),
        ("ProcessPoolExecutor(2).map (chunksize 50)",
         lambda: list(process_pool.map(spin, spin_calls, chunksize=50))),
    ):
        elapsed, _ = best_of(1, run)
        efficiencies[name] = ideal / elapsed
        print(f"  {name:<70} {elapsed:8.3f} s   efficiency {100 * ideal / elapsed:5.1f} %")
    ours_efficiency = efficiencies["futures_hpc ex.map (default chunksize)"]
    print(f"\n  RATIO parallel efficiency ex.map = {100 * ours_efficiency:.1f} %  (target >= 90 %)")

    executor.shutdown()
    process_pool.shutdown()
    loky_pool.shutdown()


if __name__ == "__main__":
    main()
