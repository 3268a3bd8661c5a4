"""A mixed workload on one executor with two pools, against two executors used by hand.

Run on the local SLURM of ci/setup.sh::

    python benchmarks/pools.py [--rounds 2] [--ones 60] [--twos 4] [--idle-timeout SECONDS]
    python benchmarks/pools.py --quick      (a short smoke run whose figures mean nothing)

The workload is what a pipeline mixes: ``--ones`` calls that each need one core (a fixed amount
of integer arithmetic, about 0.1 s) and ``--twos`` calls that each need two cores (a fixed
amount of SHA-256 hashing on two threads, which release the GIL: about 1 s), submitted at once,
the two-core calls spread among the others, then every result is gathered.

- ``pools``: ONE SLURM executor of one-core jobs (``max_workers=1``) and, for the two-core
  calls, ``ex.with_resources(cores=2, max_workers=1)``: a pool of two-core jobs on the same
  scheduler, each running one call at a time.
- ``by_hand``: what a user does without pools: TWO SLURM executors, one of one-core jobs
  (``max_workers=1``) and one whose jobs have two CPUs and a worker of one thread
  (``cores=1, job_cpu=2``: dask-jobqueue's idiom for one task with two cores, so that two
  two-core calls never share a job), each given its calls.

Both run at the executor defaults (``idle_timeout`` 60 s) unless ``--idle-timeout`` is given,
and the variants alternate after one unreported warm-up run of each, each round starting from
nothing (every variant pays its own job start-ups). The SLURM here is one node of 2 CPUs that
does not book CPUs per job (its jobs share them): both variants run their jobs side by side
alike. Measured from creating the executor(s) to the last result:
the makespan, jobs submitted, the most jobs pending at once, and the client's CPU seconds and
peak resident memory growth; then the median ratios ``pools / by_hand``, and the median of
each round's own ratio (its two runs follow each other, so a machine whose speed drifts over
the run, as this one's does by 20 % and more, skews it less than the ratio of the medians).

Target (issue 16): makespan no worse, jobs submitted no more.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field

from _common import counted_work, median, print_header, quiet_logs, ratio

ONE_CORE_ITERATIONS = 1_500_000
TWO_CORE_MEGABYTES = 400
SAMPLE_SECONDS = 0.2


def one_core_call(value: int) -> tuple[int, str | None]:
    """A call of one core: fixed integer arithmetic. Returns the value and the job's CPUs."""
    counted_work(ONE_CORE_ITERATIONS)
    return value, os.environ.get("SLURM_CPUS_ON_NODE")


def two_core_call(value: int) -> tuple[int, str | None]:
    """A call of two cores: two threads hashing a fixed amount of data (GIL released)."""
    block = bytes(4 * 2**20)

    def hash_share() -> None:
        digest = hashlib.sha256()
        for _ in range(TWO_CORE_MEGABYTES // 8):
            digest.update(block)

    threads = [threading.Thread(target=hash_share) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return value, os.environ.get("SLURM_CPUS_ON_NODE")


@dataclass
class Run:
    """What one variant's run cost."""

    variant: str
    makespan: float = 0.0
    jobs: int = 0
    most_pending: int = 0
    client_cpu: float = 0.0
    client_memory_mb: float = 0.0
    cpus_seen: dict[str, set[str | None]] = field(default_factory=dict)


def watch_pending(executors: list, stop: threading.Event, run: Run) -> None:
    """Sample the jobs pending (submitted, no worker yet) over all ``executors``."""
    while not stop.wait(SAMPLE_SECONDS):
        pending = 0
        for executor in executors:
            try:
                status = executor.status()
            except Exception:
                continue
            pending += status.jobs_pending + sum(
                line["jobs_pending"] for line in status.pools.values())
        run.most_pending = max(run.most_pending, pending)


def run_variant(variant: str, ones: int, twos: int, options: dict) -> Run:
    """Run the workload once with ``variant``; return what it cost."""
    from futures_hpc import HPCExecutor

    run = Run(variant)
    order = spread(ones, twos)
    cpu_before = time.process_time()
    memory_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    stop = threading.Event()
    if variant == "pools":
        executors = [HPCExecutor("slurm", max_workers=1, cores=1, **options)]
        two_cores = executors[0].with_resources(cores=2, max_workers=1)
        one_core = executors[0]
    else:
        executors = [HPCExecutor("slurm", max_workers=1, cores=1, **options),
                     HPCExecutor("slurm", max_workers=1, cores=1, job_cpu=2, **options)]
        one_core, two_cores = executors
    watcher = threading.Thread(target=watch_pending, args=(executors, stop, run), daemon=True)
    watcher.start()
    try:
        futures = [(kind, (one_core.submit(one_core_call, number) if kind == "one"
                           else two_cores.submit(two_core_call, number)))
                   for number, kind in enumerate(order)]
        for kind, future in futures:
            _, cpus = future.result()
            run.cpus_seen.setdefault(kind, set()).add(cpus)
        run.makespan = time.perf_counter() - started
        run.jobs = sum(len(executor.job_ids()) for executor in executors)
    finally:
        stop.set()
        for executor in executors:
            executor.shutdown(wait=True)
    run.client_cpu = time.process_time() - cpu_before
    run.client_memory_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                            - memory_before) / 1024
    return run


def spread(ones: int, twos: int) -> list[str]:
    """``ones`` "one" and ``twos`` "two", the twos spread evenly among the ones."""
    order = ["one"] * ones
    for index in range(twos):
        order.insert(round((index + 0.5) * len(order) / twos), "two")
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ones", type=int, default=60)
    parser.add_argument("--twos", type=int, default=4)
    parser.add_argument("--idle-timeout", type=float, default=None,
                        help="idle_timeout of every executor (default: the executor's)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if shutil.which("sbatch") is None:
        sys.exit("sbatch is not on PATH: run ci/setup.sh first")
    quiet_logs()
    if args.quick:
        args.rounds, args.ones, args.twos = 1, 6, 1
    options = {"dashboard_address": ":0", "memory": "1GB"}
    setting = "defaults"
    if args.idle_timeout is not None:
        options["idle_timeout"] = args.idle_timeout
        setting = f"idle_timeout={args.idle_timeout:g}"
    print_header(f"{args.ones} one-core + {args.twos} two-core calls on SLURM: one executor "
                 f"with a two-core pool vs two executors by hand ({setting})")
    for variant in ("pools", "by_hand"):  # warm-up, not reported: imports, first connections
        run_variant(variant, 2, 1, options)
    runs: dict[str, list[Run]] = {"pools": [], "by_hand": []}
    for round_number in range(args.rounds):
        for variant in ("pools", "by_hand") if round_number % 2 == 0 else ("by_hand", "pools"):
            run = run_variant(variant, args.ones, args.twos, options)
            runs[variant].append(run)
            print(f"round {round_number + 1} {variant:8s} makespan {run.makespan:6.1f} s  "
                  f"jobs {run.jobs:2d}  most pending {run.most_pending}  client CPU "
                  f"{run.client_cpu:5.2f} s  client memory +{run.client_memory_mb:.0f} MB  "
                  f"CPUs seen {dict((k, sorted(map(str, v))) for k, v in run.cpus_seen.items())}",
                  flush=True)
    pools, by_hand = runs["pools"], runs["by_hand"]
    print(f"median makespan: pools {median([r.makespan for r in pools]):.1f} s, by hand "
          f"{median([r.makespan for r in by_hand]):.1f} s -> "
          f"{ratio(median([r.makespan for r in pools]), median([r.makespan for r in by_hand]))}"
          " (target <= 1.00x)")
    paired = [p.makespan / b.makespan for p, b in zip(pools, by_hand, strict=True)]
    print("makespan ratio of each round (its two runs side by side, so a machine that drifts "
          f"during the run weighs less): {' '.join(f'{value:.2f}' for value in paired)}, "
          f"median {median(paired):.2f}x")
    print(f"jobs submitted (median): pools {median([r.jobs for r in pools]):g}, by hand "
          f"{median([r.jobs for r in by_hand]):g} (target: no more)")
    print(f"client CPU (median): pools {median([r.client_cpu for r in pools]):.2f} s, by hand "
          f"{median([r.client_cpu for r in by_hand]):.2f} s")


if __name__ == "__main__":
    main()
