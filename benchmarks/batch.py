"""futures_hpc on SLURM against plain dask-jobqueue, submitit job arrays and pypoolparty.

Run on the local SLURM of ci/slurm.sh (the tools side by side, in one run)::

    python benchmarks/batch.py [--calls 2000] [--array-calls 2000] [--first-rounds 7]
                               [--map-rounds 2] [--only futures_hpc,dask_jobqueue,...]
                               [--quick]   (a short smoke run whose figures mean nothing)

It measures, for each tool:

- first result: from creating the executor (or cluster) with 2 one-core workers to the result
  of one call, the median of ``--first-rounds`` alternating rounds after one warm-up round
  (imports and the first dashboard are paid once per process, whatever the tool);
- the calls: ``--calls`` calls of a 10 ms function (``time.sleep(0.01)``: time-based on purpose,
  it models a call that WAITS, e.g. on I/O; what is compared is each tool's cost per call and per
  job, not CPU work), from creating the executor, cluster or job arrays to the last result (end
  to end, startup included), and for the two dask-based tools also on workers that already run.

and prints the ratios against futures_hpc. Targets: first result within 1.2x of plain
dask-jobqueue; the calls at least 10x faster than submitit and pypoolparty.

A job array runs one SLURM job per call: on a busy 2-core machine 2,000 of them hold every slot
of the shared SLURM for the better part of an hour. ``--array-calls`` runs the array tools on
fewer calls; their time for ``--calls`` is then estimated as the time of a 1-call array (the
start-up) plus ``--calls - 1`` times the measured time per further call, and marked as such.

No job is left in the queue when an array tool fails: each pypoolparty pool gets a work
directory of its own (pypoolparty names its job and its folder after the second it starts, so two
pools sharing a folder collide with ``FileExistsError``), every job name a tool used is
cancelled with ``scancel --name`` on any exception and again in a ``finally``, and the jobs
still queued under those names are counted with ``squeue --me`` and printed.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dask.config
from _common import median, print_header, quiet_logs, ratio

#: The function every tool runs: 10 ms, importable by name on the nodes (pypoolparty needs that).
#: Time-based on purpose: it models waiting (I/O), not CPU work.
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


# -- no job left behind -------------------------------------------------------------------------

_RUNS = itertools.count()


def cancel_jobs(names: set[str], settle_seconds: float = 15.0) -> int:
    """``scancel`` this user's jobs of these names; return how many are still in the queue.

    Cancelled jobs stay listed while they complete: wait up to ``settle_seconds`` for them.
    """
    for name in sorted(names):
        subprocess.run(["scancel", "--user", str(os.getuid()), "--name", name],
                       capture_output=True, check=False)
    deadline = time.monotonic() + settle_seconds
    while True:
        left = sum(len(subprocess.run(
            ["squeue", "--me", "--noheader", "-o", "%i", "--name", name],
            capture_output=True, text=True, check=False).stdout.split()) for name in names)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def leave_no_job(names: Callable[[], set[str]], tool: str) -> Callable:
    """Decorate a run: on any exception and in a finally, cancel the jobs named ``names()``."""

    def decorate(run: Callable[..., float]) -> Callable[..., float]:
        def guarded(*arguments) -> float:
            try:
                return run(*arguments)
            except BaseException:
                cancel_jobs(names())
                raise
            finally:
                left = cancel_jobs(names())
                if left:
                    print(f"  {tool}: {left} job(s) still in the queue after scancel", flush=True)

        return guarded

    return decorate


# -- the array tools ------------------------------------------------------------------------------

#: The job names submitit was given in this process (one per run).
SUBMITIT_NAMES: set[str] = set()
#: The work directories of the pypoolparty pools of this process (one per pool).
POOL_DIRECTORIES: list[Path] = []


def pypoolparty_names() -> set[str]:
    """pypoolparty names a pool's job like the folder it makes in the pool's work directory."""
    return {entry.name for directory in POOL_DIRECTORIES if directory.is_dir()
            for entry in directory.iterdir() if entry.is_dir()}


@leave_no_job(lambda: set(SUBMITIT_NAMES), "submitit")
def submitit_run(calls: int, work_dir: Path) -> float:
    """Job arrays of submitit (``map_array``), from submission to the last result."""
    import submitit

    logging.getLogger("submitit").setLevel(logging.ERROR)  # "sacct error": accounting is off
    name = f"bench-submitit-{os.getpid()}-{next(_RUNS)}"
    SUBMITIT_NAMES.add(name)
    executor = submitit.AutoExecutor(folder=work_dir / name, cluster="slurm")
    executor.update_parameters(name=name, timeout_min=30, slurm_partition="debug",
                               cpus_per_task=1, slurm_mem="1G", slurm_array_parallelism=256)
    started = time.perf_counter()
    jobs = []
    for size in array_batches(calls):
        jobs.extend(executor.map_array(CALL, [CALL_ARGUMENT] * size))
    results = [job.result() for job in jobs]
    assert len(results) == calls
    return time.perf_counter() - started


@leave_no_job(pypoolparty_names, "pypoolparty")
def pypoolparty_run(calls: int, work_dir: Path) -> float:
    """pypoolparty's ``slurm.array.Pool.map``, one pool per array SLURM accepts, in parallel.

    Each pool gets a work directory of its own. A pool whose map fails leaves the others
    polling for results that will never come once their jobs are cancelled: the threads are
    daemons, and the first failure is raised at once.
    """
    import pypoolparty

    sizes = array_batches(calls)
    results: list[list] = [[] for _ in sizes]
    errors: list[BaseException] = []
    run = next(_RUNS)

    def one_map(index: int, size: int) -> None:
        directory = work_dir / f"pypoolparty-{run}-{index}"
        POOL_DIRECTORIES.append(directory)
        try:
            pool = pypoolparty.slurm.array.Pool(polling_interval=1.0, work_dir=str(directory),
                                                verbose=False)
            results[index] = pool.map(CALL, [CALL_ARGUMENT] * size)
        except BaseException as error:  # handed to the main thread
            errors.append(error)

    started = time.perf_counter()
    threads = [threading.Thread(target=one_map, args=(index, size), daemon=True)
               for index, size in enumerate(sizes)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads) and not errors:
        time.sleep(0.2)
    if errors:
        raise errors[0]
    assert sum(len(part) for part in results) == calls
    return time.perf_counter() - started


# -- the run ------------------------------------------------------------------------------------


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
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 calls, 4 array calls, 1 round of each")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.calls, arguments.array_calls = 20, 4
        arguments.first_rounds, arguments.map_rounds = 1, 1
    tools = arguments.only.split(",")
    if shutil.which("sbatch") is None:
        print("sbatch is not on PATH: start SLURM with ci/slurm.sh first")
        return 2
    logging.basicConfig(level=logging.WARNING)
    quiet_logs()
    for noisy in ("distributed", "tornado", "asyncio"):  # connections torn down at each close
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    print_header(f"{', '.join(tools)} on the local SLURM: first result and calls of "
                 "time.sleep(0.01) (waiting, not CPU work), vs futures_hpc")
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
