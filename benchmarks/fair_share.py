"""Fair-share scaling on a bursty workload: a fixed cluster, dask's adapt() and this policy.

Run on the local SLURM of ci/setup.sh::

    python benchmarks/fair_share.py [--bursts 3] [--calls 40] [--seconds 0.5] [--gap 20]
                                    [--idle-timeout 3] [--only fixed,dask_adapt,fair_share]

Each variant is a SLURM executor with ``max_workers=4`` one-core workers that runs the same
workload: ``--bursts`` bursts of ``--calls`` calls of ``time.sleep(--seconds)``, each burst
starting ``--gap`` seconds after the previous one finished. The variants:

- ``fixed``: ``adaptive=False``, 4 jobs for the whole run;
- ``dask_adapt``: dask-jobqueue's default ``cluster.adapt(minimum=0, maximum=4)``;
- ``fair_share``: this package's policy (``adaptive=True``, ``idle_timeout=--idle-timeout``).

For each it prints the makespan (from creating the executor to the last result: every variant
pays its own start-up), the idle worker-seconds in that window (a worker connected with no task
to run, sampled from the scheduler every 0.2 s), the peak of pending jobs (in the queue, worker
not yet connected) and the ratios against ``fixed``.
Targets: idle worker-seconds at most 25 % of the fixed cluster's, makespan at most 1.25x.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass

from futures_hpc import HPCExecutor

SAMPLE_SECONDS = 0.2
WORKERS = 4


def sleep_call(seconds: float) -> float:
    """The workload's call."""
    time.sleep(seconds)
    return seconds


@dataclass
class Measure:
    """What one variant measured."""

    makespan: float = 0.0
    idle_worker_seconds: float = 0.0
    peak_pending_jobs: int = 0
    jobs: int = 0


class Sampler(threading.Thread):
    """Samples the in-process scheduler and the job book of an executor."""

    def __init__(self, ex: HPCExecutor) -> None:
        super().__init__(daemon=True)
        self.ex = ex
        self.stop_event = threading.Event()
        self.measuring = threading.Event()
        self.measure = Measure()

    def run(self) -> None:
        scheduler = self.ex.cluster.scheduler
        last = time.monotonic()
        while not self.stop_event.wait(SAMPLE_SECONDS):
            now = time.monotonic()
            try:
                workers = list(scheduler.workers.values())
                idle = sum(not worker.processing for worker in workers)
                names = {str(worker.name) for worker in workers}
                waiting = sum(
                    1 for job in self.ex._job_book.jobs()
                    if not job.ended and not job.retired and not job.cancel_sent
                    and not job.ever_connected and job.name not in names
                )
            except RuntimeError:  # a dict changed while we read it
                last = now
                continue
            if self.measuring.is_set():
                self.measure.idle_worker_seconds += idle * (now - last)
                self.measure.peak_pending_jobs = max(self.measure.peak_pending_jobs, waiting)
            last = now


def run_variant(name: str, arguments: argparse.Namespace) -> Measure:
    """Run the bursty workload on one variant and return what was measured."""
    options = {"cores": 1, "memory": "512MB", "walltime": "00:30:00", "dashboard_address": ":0"}
    started = time.monotonic()  # end to end: every variant pays its own start-up
    if name == "fixed":
        ex = HPCExecutor("slurm", max_workers=WORKERS, adaptive=False, **options)
    elif name == "fair_share":
        ex = HPCExecutor("slurm", max_workers=WORKERS, idle_timeout=arguments.idle_timeout,
                         **options)
    else:
        ex = HPCExecutor("slurm", max_workers=WORKERS, **options)
        # dask-jobqueue's own default policy in place of ours (same jobs, same executor).
        ex.cluster._adaptive_options = {}
        ex.cluster.adapt(minimum=0, maximum=WORKERS)
    sampler = Sampler(ex)
    try:
        sampler.measuring.set()
        sampler.start()
        for burst in range(arguments.bursts):
            if burst:
                time.sleep(arguments.gap)
            results = list(ex.map(sleep_call, [arguments.seconds] * arguments.calls,
                                  chunksize=1))
            assert len(results) == arguments.calls
        sampler.measure.makespan = time.monotonic() - started
        sampler.measuring.clear()
        sampler.measure.jobs = len(ex.job_ids())
    finally:
        sampler.stop_event.set()
        ex.shutdown()
    return sampler.measure


def main(argv: list[str] | None = None) -> int:
    """Run the variants side by side and print their figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--gap", type=float, default=20.0)
    parser.add_argument("--idle-timeout", type=float, default=3.0)
    parser.add_argument("--only", default="fixed,dask_adapt,fair_share")
    arguments = parser.parse_args(argv)
    if shutil.which("sbatch") is None:
        print("sbatch is not on PATH: start SLURM with ci/setup.sh first")
        return 1
    logging.basicConfig(level=logging.ERROR)
    names = arguments.only.split(",")
    print(f"{arguments.bursts} bursts of {arguments.calls} calls of {arguments.seconds} s, "
          f"{arguments.gap} s apart, max_workers={WORKERS}, on the local SLURM "
          f"(a shared machine: figures vary with its load)", flush=True)
    measures = {}
    for name in names:
        measures[name] = measure = run_variant(name, arguments)
        print(f"  {name:11s} makespan {measure.makespan:6.1f} s   idle worker-seconds "
              f"{measure.idle_worker_seconds:6.1f}   peak pending jobs "
              f"{measure.peak_pending_jobs}   jobs {measure.jobs}", flush=True)
    fixed = measures.get("fixed")
    if fixed is not None:
        for name, measure in measures.items():
            if name == "fixed":
                continue
            idle_ratio = measure.idle_worker_seconds / max(fixed.idle_worker_seconds, 1e-9)
            makespan_ratio = measure.makespan / fixed.makespan
            print(f"  {name:11s} vs fixed: idle worker-seconds {idle_ratio:5.2f}x "
                  f"(target <= 0.25), makespan {makespan_ratio:5.2f}x (target <= 1.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
