"""MPIExecutor under ``mpirun -n 4`` against mpi4py.futures and dask_mpi, in one run.

The driver (``python benchmarks/mpi.py``) starts three ``mpirun --oversubscribe -n 4`` jobs, one
per contestant, collects the timings each writes as JSON, and prints them with their ratios:

- ``futures_hpc``: ``MPIExecutor()`` under mpirun (rank 0: client and scheduler in one process,
  ranks 1-3: 3 workers), TLS on (its default), ``ex.map``;
- ``mpi4py.futures``: ``MPIPoolExecutor`` under ``python -m mpi4py.futures`` (rank 0 master,
  ranks 1-3: 3 workers), ``map`` with the same chunk sizes (where ``ex.map`` chose its own, the
  size it chose, reported by ``ex.automatic_chunksize(calls, fn)``);
- ``dask_mpi``: ``dask_mpi.initialize()`` (rank 0 scheduler, rank 1 client, ranks 2-3: 2
  workers), plain TCP, ``client.map`` (one task per call) and ``client.gather``.

Workloads: 10,000 trivial calls (best of ``--repeats``, pools warmed up first) with the chunk
sizes of ``--chunksizes`` (default: 100; 1250; 5000; and ``ex.map``'s own choice, which after
the warm-up map has measured the calls as trivial and puts about one chunk on each worker), the
same for both executors (mpi4py.futures at its own default, chunksize 1, is printed beside it);
and 2,000 calls of about 10 ms, once as ``time.sleep(0.01)`` (time-based: it models
WAITING, such as I/O, and shows the executor's own overhead) and once as a FIXED amount of CPU
work (a counted arithmetic loop whose iteration count the driver calibrates once, in its own
process, to take about 10 ms here, and passes to every contestant; the ranks share the machine's
cores, so a call takes longer when they compete, as real work does). Parallel efficiency =
calls x single-call time / (workers x elapsed), the single-call time being 10 ms for the sleep
and, for the work, the CPU time of one call measured once by the driver; the same figure per rank
(all of mpirun's ranks, client and scheduler included) is printed beside it.

Targets (issue 14): trivial calls at most 1.5x mpi4py.futures at every chunk size (the same on
both sides), with all ranks but one running calls on both sides; at least 10x faster than
dask_mpi's client.map; at least 90 % parallel efficiency on the 10 ms calls. The load average of
the machine is printed before and after: other processes on the same cores slow every side.

Where the time goes (measured with this layout under ``mpirun -n 4`` on 2 shared cores): every
task of ``ex.map`` is a dask task, client -> scheduler (in rank 0's process, reached in-process)
-> worker over TLS -> scheduler -> client, about 4 ms of CPU in rank 0 (client, scheduler, TLS)
and 3.4 ms on the worker per task, whatever its size, and a round trip of 7 to 10 ms for one call
when the machine is busy, against 0.1 ms for mpi4py.futures, which sends one pickled MPI message
per chunk. Chunks measured as quick share tasks (the call queue packs the chunks waiting
together, over no more tasks than their work pays for: 10,000 trivial calls are about 0.5 ms of
work, so they go in one task whatever the chunk size, and ``ex.map`` chooses one chunk), so
every chunk size here is bound by one round trip.

Run: ``python benchmarks/mpi.py`` (``--ranks``, ``--repeats``, ``--chunksizes``; ``--quick`` for a
short smoke run whose figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import calibrate_iterations, counted_work, cpu_seconds_of, print_header, quiet_logs

TRIVIAL_CALLS = 10_000
TIMED_CALLS = 2_000
CALL_SECONDS = 0.010
CONTESTANTS = ("futures_hpc", "mpi4py.futures", "dask_mpi")


def trivial(value):
    return value


def sleep_call(value):
    """Time-based on purpose: models waiting (I/O), not CPU work."""
    time.sleep(CALL_SECONDS)
    return value


def work_call(iterations):
    """A fixed amount of CPU work: ``iterations`` steps, the count calibrated by the driver."""
    return counted_work(iterations)


def timings_of(repeats, function):
    """Wall times of ``repeats`` runs of ``function`` (which checks its own result)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return timings


def check(results, count):
    assert list(results) == list(range(count)), "wrong results"


def check_work(results, count, iterations):
    assert list(results) == [counted_work(iterations)] * count, "wrong results"


# -- one contestant, run under mpirun ---------------------------------------------------------


def measure_map(map_function, workers, arguments):
    """Time the workloads through ``map_function(fn, items, chunksize)``; return a report."""
    map_function(trivial, range(100), None)  # warm up (imports, connections)
    map_function(work_call, [arguments.iterations] * 4, None)  # the same warm-up for everyone
    trivial_calls, timed_calls = arguments.trivial_calls, arguments.timed_calls
    report = {"workers": workers, "trivial": {}, "sleep": {}, "work": {}}
    for chunksize in arguments.chunksizes:
        size = None if chunksize == 0 else chunksize
        report["trivial"][str(chunksize)] = timings_of(
            arguments.repeats,
            lambda size=size: check(map_function(trivial, range(trivial_calls), size),
                                    trivial_calls),
        )
    for chunksize in arguments.timed_chunksizes:
        size = None if chunksize == 0 else chunksize
        report["sleep"][str(chunksize)] = timings_of(
            1, lambda size=size: check(map_function(sleep_call, range(timed_calls), size),
                                       timed_calls)
        )
    size = None if arguments.timed_chunksizes[0] == 0 else arguments.timed_chunksizes[0]
    report["work"][str(arguments.timed_chunksizes[0])] = timings_of(
        1, lambda: check_work(map_function(work_call, [arguments.iterations] * timed_calls, size),
                              timed_calls, arguments.iterations)
    )
    return report


def cold_chunksize(calls, workers):
    """The chunk size ``ex.map`` picks for a function it has not measured yet: 4 per worker."""
    return max(1, math.ceil(calls / (workers * 4)))


def run_futures_hpc(arguments):
    from futures_hpc.backends.mpi import MPIExecutor

    chosen = {}  # function name -> the chunk sizes ex.map chose itself, in order

    with MPIExecutor() as executor:  # ranks 1.. serve here and exit with rank 0
        workers = len(executor.client.scheduler_info()["workers"])

        def executor_map(fn, items, size):
            items = list(items)
            if size is None:  # chunk size 0 in the arguments: ex.map's own choice
                chosen.setdefault(fn.__name__, []).append(
                    executor.automatic_chunksize(len(items), fn))
            return list(executor.map(fn, items, chunksize=size))

        report = measure_map(executor_map, workers, arguments)
    report["chosen chunksizes"] = chosen
    return report


def run_mpi4py_futures(arguments):
    from mpi4py.futures import MPIPoolExecutor

    with MPIPoolExecutor() as pool:
        workers = pool.num_workers

        def pool_map(fn, items, size):
            items = list(items)
            # "same chunk size": the size ex.map chose for the same map (it ran first)
            chunk = size or arguments.our_chunksizes.get(
                fn.__name__, cold_chunksize(len(items), arguments.our_workers))
            return list(pool.map(fn, items, chunksize=chunk))

        report = measure_map(pool_map, workers, arguments)
        calls = arguments.trivial_calls
        report["trivial default"] = timings_of(  # its own default chunk size, 1: for reference
            1, lambda: check(pool.map(trivial, range(calls)), calls))
        return report


def run_dask_mpi(arguments):
    import dask_mpi
    from distributed import Client

    dask_mpi.initialize(dashboard=False, nthreads=1)  # ranks 0, 2, 3 serve and exit here
    with Client() as client:
        client.wait_for_workers(arguments.ranks - 2, timeout=60)
        workers = len(client.scheduler_info()["workers"])

        def client_map(fn, items, size):
            return client.gather(client.map(fn, list(items), pure=False))

        client_map(trivial, range(100), None)
        client_map(work_call, [arguments.iterations] * 4, None)
        trivial_calls, timed_calls = arguments.trivial_calls, arguments.timed_calls
        report = {"workers": workers, "trivial": {}, "sleep": {}, "work": {}}
        report["trivial"]["per call"] = timings_of(
            1, lambda: check(client_map(trivial, range(trivial_calls), None), trivial_calls)
        )
        report["sleep"]["per call"] = timings_of(
            1, lambda: check(client_map(sleep_call, range(timed_calls), None), timed_calls)
        )
        report["work"]["per call"] = timings_of(
            1, lambda: check_work(client_map(work_call, [arguments.iterations] * timed_calls,
                                             None), timed_calls, arguments.iterations)
        )
        return report


def run_contestant(arguments):
    runners = {"futures_hpc": run_futures_hpc, "mpi4py.futures": run_mpi4py_futures,
               "dask_mpi": run_dask_mpi}
    report = runners[arguments.contestant](arguments)
    Path(arguments.output).write_text(json.dumps(report))


# -- the driver -----------------------------------------------------------------------------


def launch(contestant, arguments, directory):
    output = directory / f"{contestant}.json"
    command = [shutil.which("mpirun"), "--oversubscribe", "-n", str(arguments.ranks),
               sys.executable]
    if contestant == "mpi4py.futures":
        command += ["-m", "mpi4py.futures"]
    command += [
        str(Path(__file__).resolve()), "--contestant", contestant, "--output", str(output),
        "--ranks", str(arguments.ranks), "--repeats", str(arguments.repeats),
        "--chunksizes", *map(str, arguments.chunksizes),
        "--timed-chunksizes", *map(str, arguments.timed_chunksizes),
        "--our-workers", str(arguments.ranks - 1),
        "--iterations", str(arguments.iterations),
        "--trivial-calls", str(arguments.trivial_calls),
        "--timed-calls", str(arguments.timed_calls),
        "--our-chunksizes", json.dumps(arguments.our_chunksizes),
    ]
    environment = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                       DASK_FUTURES_HPC__LOG_DIR=str(directory / "logs"),
                       DASK_FUTURES_HPC__DASHBOARD_ADDRESS="localhost:0")
    started = time.perf_counter()
    finished = subprocess.run(command, env=environment, cwd=directory, capture_output=True,
                              text=True, timeout=arguments.timeout)
    if finished.returncode != 0 or not output.exists():
        raise SystemExit(f"{contestant} failed ({finished.returncode}):\n"
                         f"{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    report = json.loads(output.read_text())
    report["total seconds"] = time.perf_counter() - started
    return report


def describe(timings):
    return f"{min(timings):8.4f} s" + (
        f" (median {statistics.median(timings):.4f})" if len(timings) > 1 else ""
    )


def print_report(reports, arguments):
    ours, theirs, dask_mpi = (reports[name] for name in CONTESTANTS)
    print(f"\nmpirun -n {arguments.ranks} on {os.cpu_count()} cores; workers / ranks: "
          f"futures_hpc {ours['workers']} / {arguments.ranks} (rank 0: client + scheduler), "
          f"mpi4py.futures {theirs['workers']} / {arguments.ranks} (rank 0: master), "
          f"dask_mpi {dask_mpi['workers']} / {arguments.ranks} (rank 0: scheduler, 1: client)")
    chosen = ours["chosen chunksizes"]
    cold = cold_chunksize(arguments.trivial_calls, ours["workers"])
    print(f"ex.map's own chunk sizes, warm-up map first: {chosen}; for a function never mapped "
          f"before it picks {cold}, after one map it has measured the calls")
    our_auto = arguments.our_chunksizes.get("trivial")

    print(f"\n{arguments.trivial_calls:,} trivial calls, best of {arguments.repeats}")
    dask_seconds = min(dask_mpi["trivial"]["per call"])
    print(f"  dask_mpi client.map, one task per call  {describe(dask_mpi['trivial']['per call'])}")
    print(f"  mpi4py.futures map at its default chunksize 1  "
          f"{describe(theirs['trivial default'])}")
    summary = []
    for chunksize in arguments.chunksizes:
        label = f"auto = {our_auto}" if chunksize == 0 else str(chunksize)
        mine = min(ours["trivial"][str(chunksize)])
        other = min(theirs["trivial"][str(chunksize)])
        print(f"  chunksize {label}")
        print(f"    futures_hpc MPIExecutor.map   {describe(ours['trivial'][str(chunksize)])}")
        print(f"    mpi4py.futures map            {describe(theirs['trivial'][str(chunksize)])}")
        print(f"    ratio futures_hpc / mpi4py.futures: {mine / other:5.2f}x  (target <= 1.5x)")
        print(f"    ratio dask_mpi / futures_hpc:       {dask_seconds / mine:5.0f}x  "
              "(target >= 10x)")
        summary.append((label, mine, other))
    print("\n  summary, trivial calls (best times):")
    print(f"    {'chunksize':>14s}  {'futures_hpc':>11s}  {'mpi4py.futures':>14s}  ratio")
    for label, mine, other in summary:
        verdict = "ok" if mine / other <= 1.5 else "over target"
        print(f"    {label:>14s}  {mine:9.4f} s  {other:12.4f} s  {mine / other:5.2f}x  {verdict}")

    calls = arguments.timed_calls
    for kind, what, single in (
        ("sleep", "time.sleep(0.01): time-based, models WAITING (I/O), not CPU work",
         CALL_SECONDS),
        ("work", f"FIXED CPU work ({arguments.iterations:,} loop steps, calibrated once by the "
         f"driver; one call's CPU time {1000 * arguments.single_call:.2f} ms)",
         arguments.single_call),
    ):
        ideal_serial = calls * single
        print(f"\n{calls:,} calls of {what}; efficiency = {calls:,} x {1000 * single:.2f} ms "
              "/ (workers x elapsed)")
        for name, report in (("futures_hpc MPIExecutor.map", ours),
                             ("mpi4py.futures map", theirs),
                             ("dask_mpi client.map", dask_mpi)):
            for chunksize, timings in report[kind].items():
                label = chunksize
                if chunksize == "0":
                    label = f"auto = {arguments.our_chunksizes[f'{kind}_call']}"
                elapsed = min(timings)
                efficiency = ideal_serial / (report["workers"] * elapsed)
                per_rank = ideal_serial / (arguments.ranks * elapsed)
                print(f"  {name:30s} chunksize {label:>10s}  {elapsed:7.2f} s  "
                      f"{report['workers']} workers  efficiency {efficiency:6.1%}  "
                      f"per rank {per_rank:6.1%}")
    print(f"\n(targets for the 10 ms calls: efficiency >= 90 %; with {arguments.ranks} ranks, "
          f"futures_hpc has {ours['workers']} workers and mpi4py.futures {theirs['workers']}; "
          "the per-rank figures count every rank mpirun started)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contestant", choices=CONTESTANTS, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--our-workers", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--our-chunksizes", type=json.loads, default={},
                        help=argparse.SUPPRESS)
    parser.add_argument("--chunksizes", type=int, nargs="+", default=[100, 1250, 5000, 0],
                        help="chunk sizes for the trivial calls; 0 = ex.map's own choice")
    parser.add_argument("--timed-chunksizes", type=int, nargs="+", default=[0, 1],
                        help="chunk sizes for the 10 ms calls; 0 = ex.map's own choice")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--iterations", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--trivial-calls", type=int, default=TRIVIAL_CALLS)
    parser.add_argument("--timed-calls", type=int, default=TIMED_CALLS,
                        help="calls of the 10 ms sleep and of the ~10 ms fixed work")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2,000 trivial calls, 200 timed calls, 1 repeat, chunk "
                             "sizes auto and 100 only")
    arguments = parser.parse_args()
    quiet_logs()
    if arguments.contestant:
        run_contestant(arguments)
        return
    if arguments.quick:
        arguments.trivial_calls, arguments.timed_calls, arguments.repeats = 2_000, 200, 1
        arguments.chunksizes, arguments.timed_chunksizes = [0, 100], [0]
    print_header(f"MPIExecutor under mpirun -n {arguments.ranks} against mpi4py.futures and "
                 "dask_mpi: trivial calls, 10 ms sleeps (waiting) and ~10 ms fixed CPU work")
    # Calibrated ONCE, here, and passed to every contestant: the same work on every side.
    arguments.iterations = calibrate_iterations(CALL_SECONDS * 1000)
    arguments.single_call = cpu_seconds_of(arguments.iterations)
    reports = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="futures_hpc-bench-mpi-") as directory:
        for contestant in CONTESTANTS:
            print(f"running {contestant} under mpirun -n {arguments.ranks} ...", flush=True)
            reports[contestant] = launch(contestant, arguments, Path(directory))
            if contestant == "futures_hpc":  # mpi4py.futures then maps with the same sizes
                arguments.our_chunksizes = {
                    name: sizes[-1] for name, sizes in reports[contestant]["chosen chunksizes"]
                    .items()}
    print_report(reports, arguments)
    print(f"(load average of the machine: {load_before:.1f} before, {os.getloadavg()[0]:.1f} "
          "after: other processes on the same cores slow every contestant down)")


if __name__ == "__main__":
    main()
