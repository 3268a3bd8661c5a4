"""futures_hpc on SLURM against plain dask-jobqueue, submitit job arrays and pypoolparty.

Run on the local SLURM of ci/slurm.sh (the tools side by side, in one run)::

    python benchmarks/batch.py [--calls 2000] [--array-calls 2000] [--first-rounds 7]
                               [--map-rounds 2] [--only futures_hpc,dask_jobqueue,...]

It measures, for each tool:

- first result: from creating the executor (or cluster) with 2 one-core workers to the result
  of one call, the median of ``--first-rounds`` alternating rounds after one warm-up round
  (imports and the first dashboard are paid once per process, whatever the tool);
- the calls: ``--calls`` calls of a 10 ms function (``time.sleep(0.01)``), from creating the
  executor, cluster or job arrays to the last result (end to end, startup included), and for
  the two dask-based tools also on workers that already run.

and prints the ratios against futures_hpc. Targets: first result within 1.2x of plain
dask-jobqueue; the calls at least 10x faster than submitit and pypoolparty.

A job array runs one SLURM job per call: on a busy 2-core machine 2,000 of them hold every slot
of the shared SLURM for the better part of an hour. ``--array-calls`` runs the array tools on
fewer calls; their time for ``--calls`` is then estimated as the time of a 1-call array (the
start-up) plus ``--calls - 1`` times the measured time per further call, and marked as such.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dask.config

#: The function every tool runs: 10 ms, importable by name on the nodes (pypoolparty needs that).
CALL = time.sleep
CALL_ARGUMENT = 0.01

WORKER_OPTIONS = {"cores": 1, "memory": "1GB", "walltime": "00:30:00"}


def slurm_max_array_size() -> int:
    """SLURM's MaxArraySize (job array indices must be below it)."""
    output = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                            check=True).stdout
    for line in output.splitlines():
        if line.startswith("MaxArraySize"):
            return int(line.split("=")[1])
    return 1001


def array_batches(count: int) -> list[int]:
    """Split ``count`` tasks into arrays SLURM accepts."""
    largest = slurm_max_array_size() - 1
    return [min(largest, count - start) for start in range(0, count, largest)]


# -- the tools ------------------------------------------------------------------------------------


def futures_hpc_first_result(security: bool = True) -> float:
    """Seconds from creating the executor to the first result."""
    from futures_hpc import HPCExecutor

    started = time.perf_counter()
    with HPCExecutor("slurm", max_workers=2, security=security, **WORKER_OPTIONS) as executor:
        executor.submit(CALL, CALL_ARGUMENT).result()
        return time.perf_counter() - started


def futures_hpc_calls(calls: int) -> tuple[float, float]:
    """Seconds for the calls end to end (startup included) and on running workers."""
    from futures_hpc import HPCExecutor

    started = time.perf_counter()
    with HPCExecutor("slurm", max_workers=2, **WORKER_OPTIONS) as executor:
        results = list(executor.map(CALL, [CALL_ARGUMENT] * calls))
        end_to_end = time.perf_counter() - started
        warm_started = time.perf_counter()
        results = list(executor.map(CALL, [CALL_ARGUMENT] * calls))
        warm = time.perf_counter() - warm_started
    assert len(results) == calls
    return end_to_end, warm


def _dask_jobqueue_cluster(security: bool = False):
    from dask_jobqueue import SLURMCluster

    directory = tempfile.mkdtemp(prefix="bench-djq-")
    return SLURMCluster(processes=1, scheduler_options={"dashboard_address": "localhost:0"},
                        log_directory=directory, security=security or None,
                        shared_temp_directory=directory, **WORKER_OPTIONS)


def dask_jobqueue_first_result(security: bool = False) -> float:
    """The same with plain dask-jobqueue (default: no TLS)."""
    from distributed import Client

    started = time.perf_counter()
    with _dask_jobqueue_cluster(security) as cluster:
        cluster.scale(2)
        with Client(cluster, security=cluster.security) as client:
            client.submit(CALL, CALL_ARGUMENT, pure=False).result()
            return time.perf_counter() - started


def dask_jobqueue_calls(calls: int) -> tuple[float, float]:
    """The calls with ``client.map`` (one task per call), end to end and on running workers."""
    from distributed import Client

    started = time.perf_counter()
    with _dask_jobqueue_cluster() as cluster:
        cluster.scale(2)
        with Client(cluster) as client:
            results = client.gather(client.map(CALL, [CALL_ARGUMENT] * calls, pure=False))
            end_to_end = time.perf_counter() - started
            warm_started = time.perf_counter()
            results = client.gather(client.map(CALL, [CALL_ARGUMENT] * calls, pure=False))
            warm = time.perf_counter() - warm_started
    assert len(results) == calls
    return end_to_end, warm


def submitit_run(calls: int, work_dir: Path) -> float:
    """Job arrays of submitit (``map_array``), from submission to the last result."""
    import submitit

    logging.getLogger("submitit").setLevel(logging.ERROR)  # "sacct error": accounting is off
    executor = submitit.AutoExecutor(folder=work_dir / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=30, slurm_partition="debug", cpus_per_task=1,
                               slurm_mem="1G", slurm_array_parallelism=256)
    started = time.perf_counter()
    jobs = []
    for size in array_batches(calls):
        jobs.extend(executor.map_array(CALL, [CALL_ARGUMENT] * size))
    results = [job.result() for job in jobs]
    assert len(results) == calls
    return time.perf_counter() - started


def pypoolparty_run(calls: int, work_dir: Path) -> float:
    """pypoolparty's ``slurm.array.Pool.map``, one pool per array SLURM accepts, in parallel."""
    import pypoolparty

    sizes = array_batches(calls)
    results: list[list] = [[] for _ in sizes]

    def one_map(index: int, size: int) -> None:
        pool = pypoolparty.slurm.array.Pool(polling_interval=1.0, work_dir=str(work_dir / "ppp"))
        results[index] = pool.map(CALL, [CALL_ARGUMENT] * size)

    started = time.perf_counter()
    threads = [threading.Thread(target=one_map, args=(index, size))
               for index, size in enumerate(sizes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(len(part) for part in results) == calls
    return time.perf_counter() - started


# -- the run ------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x"


def alternate(names: list[str], rounds: int, run: Callable[[str], object]) -> None:
    """Run ``run(name)`` for each name, ``rounds`` times, reversing the order every round."""
    for round_number in range(rounds):
        for name in names if round_number % 2 == 0 else names[::-1]:
            run(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--array-calls", type=int, default=None,
                        help="calls run by the array tools (default: --calls)")
    parser.add_argument("--first-rounds", type=int, default=7)
    parser.add_argument("--map-rounds", type=int, default=2)
    parser.add_argument("--only", default="futures_hpc,dask_jobqueue,submitit,pypoolparty")
    arguments = parser.parse_args(argv)
    tools = arguments.only.split(",")
    if shutil.which("sbatch") is None:
        print("sbatch is not on PATH: start SLURM with ci/slurm.sh first")
        return 2
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("distributed", "tornado", "asyncio"):  # connections torn down at each close
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    dask.config.set({"futures_hpc.dashboard-address": "localhost:0",
                     "futures_hpc.log-dir": tempfile.mkdtemp(prefix="bench-fhpc-")})
    work_dir = Path(tempfile.mkdtemp(prefix="bench-arrays-"))
    calls = arguments.calls
    array_calls = arguments.array_calls or calls
    print(f"{calls} calls of time.sleep({CALL_ARGUMENT}) on the local SLURM, 2 one-core workers")

    dask_tools = [name for name in ("futures_hpc", "dask_jobqueue") if name in tools]
    # Besides the defaults: where TLS's share of the start-up shows.
    first_runs = {"futures_hpc": futures_hpc_first_result,
                  "dask_jobqueue": dask_jobqueue_first_result,
                  "futures_hpc security=False": lambda: futures_hpc_first_result(False),
                  "dask_jobqueue security=True": lambda: dask_jobqueue_first_result(True)}
    first_tools = dask_tools + [f"{name} {variant}" for name, variant in (
        ("futures_hpc", "security=False"), ("dask_jobqueue", "security=True")
    ) if len(dask_tools) == 2]
    call_runs = {"futures_hpc": futures_hpc_calls, "dask_jobqueue": dask_jobqueue_calls}
    first: dict[str, list[float]] = {name: [] for name in first_tools}
    end_to_end: dict[str, list[float]] = {name: [] for name in dask_tools}
    warm: dict[str, list[float]] = {name: [] for name in dask_tools}

    def first_round(name: str) -> None:
        first[name].append(first_runs[name]())
        print(f"  {name:28s} first result {first[name][-1]:6.2f} s", flush=True)

    def calls_round(name: str) -> None:
        total, on_running = call_runs[name](calls)
        end_to_end[name].append(total)
        warm[name].append(on_running)
        print(f"  {name:14s} {calls} calls {total:6.2f} s end to end, {on_running:6.2f} s on "
              "running workers", flush=True)

    for name in first_tools:  # warm-up, not counted: imports, first dashboard, first TLS setup
        first_runs[name]()
    alternate(first_tools, arguments.first_rounds, first_round)
    alternate(dask_tools, arguments.map_rounds, calls_round)

    array_seconds: dict[str, float | str] = {}
    sizes = array_batches(array_calls)
    note = (f" ({len(sizes)} arrays of {'/'.join(map(str, sizes))}: SLURM's MaxArraySize is "
            f"{slurm_max_array_size()})" if len(sizes) > 1 else "")
    for name, run in (("submitit", submitit_run), ("pypoolparty", pypoolparty_run)):
        if name not in tools:
            continue
        try:
            seconds = run(array_calls, work_dir)
            print(f"  {name:14s} {array_calls} calls {seconds:6.2f} s{note}", flush=True)
            if array_calls < calls:
                # start-up (one call) + the measured time per further call, for `calls` calls
                startup = run(1, work_dir)
                per_call = (seconds - startup) / (array_calls - 1)
                print(f"  {name:14s} 1 call {startup:6.2f} s: {per_call:.3f} s per further call",
                      flush=True)
                seconds = startup + per_call * (calls - 1)
        except Exception as error:  # say exactly why a tool cannot run here
            array_seconds[name] = f"could not run: {error!r}"
            print(f"  {name:14s} {array_seconds[name]}", flush=True)
            continue
        array_seconds[name] = seconds

    print("\nResults (medians)")
    if len(dask_tools) == 2:
        ours, theirs = median(first["futures_hpc"]), median(first["dask_jobqueue"])
        print(f"  first result: futures_hpc {ours:.2f} s, dask-jobqueue {theirs:.2f} s -> "
              f"futures_hpc / dask-jobqueue = {ratio(ours, theirs)} (target <= 1.20x)")
        ours_plain = median(first["futures_hpc security=False"])
        theirs_tls = median(first["dask_jobqueue security=True"])
        print(f"    of which TLS: futures_hpc security=False {ours_plain:.2f} s "
              f"({ratio(ours_plain, theirs)} of dask-jobqueue); dask-jobqueue with TLS "
              f"{theirs_tls:.2f} s (futures_hpc / that = {ratio(ours, theirs_tls)})")
        ours, theirs = median(end_to_end["futures_hpc"]), median(end_to_end["dask_jobqueue"])
        print(f"  {calls} calls end to end: futures_hpc {ours:.2f} s, dask-jobqueue client.map "
              f"{theirs:.2f} s -> dask-jobqueue / futures_hpc = {ratio(theirs, ours)}")
        ours, theirs = median(warm["futures_hpc"]), median(warm["dask_jobqueue"])
        print(f"  {calls} calls on running workers: futures_hpc {ours:.2f} s, dask-jobqueue "
              f"client.map {theirs:.2f} s -> dask-jobqueue / futures_hpc = {ratio(theirs, ours)}")
    ours_calls = median(end_to_end.get("futures_hpc", []))
    for name, seconds in array_seconds.items():
        if isinstance(seconds, str):
            print(f"  {name}: {seconds}")
            continue
        how = "" if array_calls == calls else (
            f" (estimated: 1-call start-up + {array_calls}-call throughput)"
        )
        print(f"  {calls} calls end to end: {name} {seconds:.2f} s{how} -> {name} / futures_hpc "
              f"= {ratio(seconds, ours_calls)} (target >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
