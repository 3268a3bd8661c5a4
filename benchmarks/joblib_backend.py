"""joblib's ``Parallel(n_jobs=2)`` on the "futures_hpc" backend against loky and joblib's dask.

10,000 small ``delayed`` calls, side by side in one run:

- ``loky``: joblib's default backend (2 worker processes of this machine);
- ``futures_hpc``: ``parallel_config(backend="futures_hpc", executor=ex)`` on a local executor
  of 2 worker processes;
- ``dask``: joblib's own dask backend (``parallel_config(backend="dask", client=ex.client)``)
  on the same cluster as ``futures_hpc``.

Every pool is started and warmed up before it is timed; the runs are interleaved and each
figure is the median of ``--repeats`` runs (the best is printed too). Also printed: the CPU time
of this process per ``Parallel`` call (for ``futures_hpc`` and ``dask`` it includes the local
dask scheduler, which runs in this process; loky's workers are other processes, as are dask's)
and, from one more untimed run under ``distributed.get_task_stream``, the dask tasks one
``Parallel`` call makes. Targets (issue 13): futures_hpc at most 1.5x loky, and at least as fast
as joblib's dask backend.

Run: ``python benchmarks/joblib_backend.py`` (``--quick`` for a short smoke run whose figures
mean nothing).
"""

from __future__ import annotations

import argparse
import time

from _common import median as median_of
from _common import print_header, quiet_logs

WORKERS = 2


def small_call(value):
    return value * 2 + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 calls, 1 repeat")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.calls, arguments.repeats = 1_000, 1
    quiet_logs()
    print_header("joblib Parallel(n_jobs=2) on the futures_hpc backend against loky and joblib's "
                 "dask backend")

    import joblib
    from distributed import get_task_stream
    from joblib import Parallel, delayed

    from futures_hpc import HPCExecutor

    expected = [small_call(value) for value in range(arguments.calls)]

    cpu_seconds: dict[str, list[float]] = {}

    def run(name: str = "", **config) -> float:
        with joblib.parallel_config(**config):
            started, cpu_started = time.perf_counter(), time.process_time()
            results = Parallel(n_jobs=WORKERS)(
                delayed(small_call)(value) for value in range(arguments.calls)
            )
            elapsed = time.perf_counter() - started
            cpu_seconds.setdefault(name, []).append(time.process_time() - cpu_started)
        assert results == expected
        return elapsed

    started = time.perf_counter()
    with HPCExecutor("local", max_workers=WORKERS) as ex:
        startup = time.perf_counter() - started
        configurations = {
            "loky": {"backend": "loky"},
            "futures_hpc": {"backend": "futures_hpc", "executor": ex},
            "dask": {"backend": "dask", "client": ex.client},
        }
        for config in configurations.values():  # start and warm up every pool
            run(**config)
        cpu_seconds.clear()
        timings = {name: [] for name in configurations}
        for _ in range(arguments.repeats):
            for name, config in configurations.items():
                timings[name].append(run(name, **config))
        tasks = {}
        for name in ("futures_hpc", "dask"):  # untimed: the task stream costs time
            with get_task_stream(client=ex.client) as stream:
                run(**configurations[name])
            tasks[name] = len(stream.data)

    median = {name: median_of(values) for name, values in timings.items()}
    best = {name: min(values) for name, values in timings.items()}
    print(f"{arguments.calls:,} small delayed calls through Parallel(n_jobs={WORKERS}), "
          f"median (best) of {arguments.repeats} runs; executor start-up {startup:.2f} s")
    for name in configurations:
        task_text = f"  {tasks[name]:>5} dask tasks" if name in tasks else ""
        print(f"  {name:<12} {median[name]:7.3f} s  ({best[name]:.3f} s)  "
              f"{arguments.calls / median[name]:>10,.0f} calls/s  "
              f"this process's CPU {1000 * median_of(cpu_seconds[name]):6.1f} ms{task_text}")
    versus_loky = median["futures_hpc"] / median["loky"]
    versus_dask = median["futures_hpc"] / median["dask"]
    print(f"futures_hpc / loky = {versus_loky:.2f}x (target <= 1.5): "
          f"{'met' if versus_loky <= 1.5 else 'NOT met'}")
    print(f"futures_hpc / dask = {versus_dask:.2f}x (target <= 1.0): "
          f"{'met' if versus_dask <= 1.0 else 'NOT met'} "
          f"(joblib's dask backend is {1 / versus_dask:.1f}x slower)")


if __name__ == "__main__":
    main()
