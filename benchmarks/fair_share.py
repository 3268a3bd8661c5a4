"""Fair-share scaling at its defaults on a bursty workload: a fixed cluster, dask's adapt(), ours.

Run on the local SLURM of ci/setup.sh::

    python benchmarks/fair_share.py [--time-scale 0.1] [--only fixed,dask_adapt,fair_share]
    python benchmarks/fair_share.py --quick      (a short smoke run whose figures mean nothing)

The workload, at full scale (``--time-scale 1``), is what an interactive user does: bursts of
40 calls of 5 s on at most 4 one-core workers (50 s of work per burst at full width), separated
by the pauses of someone reading results and submitting again: 2 minutes, 30 s, 5 minutes (one
gap about as long as a job's start-up here, two far longer). The calls are ``time.sleep``: a
time-based call on purpose, standing for a call's DURATION; what is measured is how long each
worker slot is held, not CPU work (4 one-core workers on a 2-core machine would otherwise measure
the oversubscription).

To keep a run short, time is scaled down by ``--time-scale`` (default 0.1): the call length and
the gaps are multiplied by it. Not scaled: the jobs' start-up (2 to 4 s on this SLURM, so at
full scale the run stands for a queue where a job takes 20 to 40 s to start), the policies'
polling intervals and dask's ``adapt()`` timings (its defaults as they are: it releases a
worker after about 3 s idle). ``idle_timeout`` is at its default, ``"auto"``: as long as a job
of the run took to start, measured as it goes (``futures_hpc.scaling.auto_idle_timeout``); it is
not scaled either, as it follows the start-up, which is real. (Runs before the "auto" default
scaled the old default of 60 s to 6 s.)

Each variant is a SLURM executor with ``max_workers=4`` one-core workers:

- ``fixed``: ``adaptive=False``, 4 jobs for the whole run;
- ``dask_adapt``: what a dask user picks instead: a plain dask-jobqueue ``SLURMCluster`` with the
  same job shape, ``cluster.adapt(minimum=0, maximum=4)`` at dask's defaults (interval 1 s,
  wait_count 3, target_duration 5 s) and each burst sent with ``client.map`` (so that the
  scheduler, and with it ``adapt()``, sees every call of the burst). Earlier runs put dask's
  ``Adaptive`` on our executor instead; there our call queue holds the calls in the client, the
  scheduler sees only about two per worker, and ``adapt()`` never asked for more than one or
  two jobs (makespan 1.77x to 1.96x the fixed cluster's): a handicap, not dask's policy;
- ``fair_share``: this package's policy at its defaults (``idle_timeout="auto"``).

Measured from creating the executor to the last result (every variant pays its own start-up),
sampling the executor's job book and the in-process scheduler every 0.2 s:

- idle worker-seconds: a job counts as paid for from its submission until the executor cancels
  it or the batch system reports it ended, whether it is queued, starting or running; each
  sample adds (paid-for worker slots - workers running a task) x the time since the last sample.
  Printed split into connected-and-idle and queued-or-starting;
- jobs submitted in total (thrash), the most jobs pending at once (submitted, no worker
  connected yet), and the makespan; then the ratios against ``fixed`` and against ``dask_adapt``.

Beside them: the floor (a policy that knew every gap in advance), what any policy that does not
know the gaps can at best promise (each gap's part of the floor times e/(e-1), the bound of
randomized ski rental), and what the break-even rule of ``idle_timeout="auto"`` promises (2x).

Targets (issue 14): idle worker-seconds at most 0.25x the fixed cluster's and no more than
``adapt()``'s, no more jobs submitted than ``adapt()``, makespan at most 1.15x the fixed cluster's.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from _common import print_header, quiet_logs

SAMPLE_SECONDS = 0.2
WORKERS = 4
VARIANTS = ("fixed", "dask_adapt", "fair_share")

#: The workload at full scale: calls per burst, seconds per call, seconds of gap between bursts.
FULL_SCALE = {"calls": 40, "call_seconds": 5.0, "gaps": (120.0, 30.0, 300.0)}
#: --quick: two bursts of 20 calls, one 2-minute gap, at a twentieth of real time.
QUICK = {"calls": 20, "call_seconds": 5.0, "gaps": (120.0,), "time_scale": 0.05}


def sleep_call(seconds: float) -> float:
    """The workload's call: time-based on purpose, it stands for a call's duration."""
    time.sleep(seconds)
    return seconds


@dataclass
class Measure:
    """What one variant measured."""

    makespan: float = 0.0
    idle_connected: float = 0.0
    idle_waiting: float = 0.0
    max_pending_jobs: int = 0
    jobs: int = 0
    idle_timeout: float | None = None

    @property
    def idle_worker_seconds(self) -> float:
        """Idle worker-seconds, queued or starting jobs included."""
        return self.idle_connected + self.idle_waiting


class Sampler(threading.Thread):
    """Samples an in-process scheduler and the jobs paid for.

    ``paid_jobs()`` returns the names of the jobs submitted and not yet cancelled or ended.
    """

    def __init__(self, scheduler, paid_jobs) -> None:
        super().__init__(daemon=True)
        self.scheduler = scheduler
        self.paid_jobs = paid_jobs
        self.stop_event = threading.Event()
        self.measure = Measure()

    def run(self) -> None:
        scheduler = self.scheduler
        last = time.monotonic()
        while not self.stop_event.wait(SAMPLE_SECONDS):
            now = time.monotonic()
            try:
                workers = list(scheduler.workers.values())
                connected = {str(worker.name) for worker in workers}
                busy = sum(bool(worker.processing) for worker in workers)
                paid = self.paid_jobs()
                # dask-jobqueue names a job's workers after the job (one worker per job here)
                waiting = sum(not any(name == job or name.startswith(f"{job}-")
                                      for name in connected) for job in paid)
            except RuntimeError:  # a dict changed while we read it
                last = now
                continue
            elapsed = now - last
            running = len(paid) - waiting
            self.measure.idle_connected += max(0, running - busy) * elapsed
            self.measure.idle_waiting += waiting * elapsed
            self.measure.max_pending_jobs = max(self.measure.max_pending_jobs, waiting)
            last = now


def _paid_executor_jobs(ex):
    return lambda: [job.name for job in ex._job_book.jobs()
                    if not job.ended and not job.cancel_sent]


def run_variant(name: str, workload: dict) -> Measure:
    """Run the bursty workload on one variant and return what was measured."""
    if name == "dask_adapt":
        return run_dask_adapt(workload)
    from futures_hpc import HPCExecutor

    options = {"cores": 1, "memory": "512MB", "walltime": "00:30:00", "dashboard_address": ":0"}
    started = time.monotonic()  # end to end: every variant pays its own start-up
    if name == "fixed":
        ex = HPCExecutor("slurm", max_workers=WORKERS, adaptive=False, **options)
    else:  # fair_share: every scaling option at its default (idle_timeout="auto")
        ex = HPCExecutor("slurm", max_workers=WORKERS, **options)
    sampler = Sampler(ex.cluster.scheduler, _paid_executor_jobs(ex))
    try:
        sampler.start()
        for burst, gap in enumerate((0.0, *workload["gaps"])):
            if burst:
                time.sleep(gap)
            results = list(ex.map(sleep_call, [workload["call_seconds"]] * workload["calls"],
                                  chunksize=1))
            assert results == [workload["call_seconds"]] * workload["calls"]
        sampler.measure.makespan = time.monotonic() - started
        sampler.stop_event.set()
        sampler.join()
        sampler.measure.jobs = len(ex.job_ids())
        sampler.measure.idle_timeout = ex.status().idle_timeout if name != "fixed" else None
    finally:
        sampler.stop_event.set()
        ex.shutdown()
    return sampler.measure


def run_dask_adapt(workload: dict) -> Measure:
    """The workload on plain dask-jobqueue with dask's ``adapt()`` at its defaults."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    directory = tempfile.mkdtemp(prefix="bench-fair-share-")
    submitted: set[str] = set()

    def paid_jobs() -> list[str]:
        paid = []
        for job_name, job in list(cluster.workers.items()):
            job_id = getattr(job, "job_id", None)
            if job_id and getattr(job, "status", None) is not None and \
                    job.status.name not in ("closing", "closed"):
                submitted.add(job_id)
                paid.append(str(job_name))
        return paid

    started = time.monotonic()
    cluster = SLURMCluster(cores=1, processes=1, memory="512MB", walltime="00:30:00",
                           log_directory=directory, shared_temp_directory=directory,
                           scheduler_options={"dashboard_address": "localhost:0"})
    try:
        cluster.adapt(minimum=0, maximum=WORKERS)
        with Client(cluster) as client:
            sampler = Sampler(cluster.scheduler, paid_jobs)
            sampler.start()
            for burst, gap in enumerate((0.0, *workload["gaps"])):
                if burst:
                    time.sleep(gap)
                futures = client.map(sleep_call,
                                     [workload["call_seconds"]] * workload["calls"], pure=False)
                results = client.gather(futures)
                del futures
                assert results == [workload["call_seconds"]] * workload["calls"]
            sampler.measure.makespan = time.monotonic() - started
            sampler.stop_event.set()
            sampler.join()
            paid_jobs()
            sampler.measure.jobs = len(submitted)
    finally:
        cluster.close()
        shutil.rmtree(directory, ignore_errors=True)
    return sampler.measure


def main(argv: list[str] | None = None) -> int:
    """Run the variants side by side and print their figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-scale", type=float, default=0.1,
                        help="factor applied to the call length and the gaps")
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 bursts of 20 calls, one gap, time scale 0.05")
    arguments = parser.parse_args(argv)
    if shutil.which("sbatch") is None:
        print("sbatch is not on PATH: start SLURM with ci/setup.sh first")
        return 1
    logging.basicConfig(level=logging.ERROR)
    quiet_logs()
    full = dict(QUICK) if arguments.quick else dict(FULL_SCALE)
    factor = full.pop("time_scale", arguments.time_scale)
    workload = {"calls": full["calls"], "call_seconds": full["call_seconds"] * factor,
                "gaps": tuple(gap * factor for gap in full["gaps"])}
    names = arguments.only.split(",")
    print_header("idle worker-seconds (queued and starting jobs included), jobs submitted, "
                 "max pending jobs and makespan of a bursty workload: a fixed cluster, dask's "
                 "adapt() at its defaults, futures_hpc's fair share at its defaults")
    print(f"time scale {factor:g}: to keep the run short, the call length and the gaps are "
          f"multiplied by {factor:g} (job start-up, polling intervals and idle_timeout=\"auto\", "
          "which follows the measured start-up, are not scaled)")
    print(f"  full scale: {len(full['gaps']) + 1} bursts of {full['calls']} calls of "
          f"{full['call_seconds']:g} s, gaps {', '.join(f'{gap:g}' for gap in full['gaps'])} s")
    print(f"  this run:   {len(workload['gaps']) + 1} bursts of {workload['calls']} calls of "
          f"time.sleep({workload['call_seconds']:g}) (waiting, not CPU work), gaps "
          f"{', '.join(f'{gap:g}' for gap in workload['gaps'])} s; "
          f"max_workers={WORKERS} one-core jobs on the local SLURM (a "
          "shared machine: figures vary with its load)", flush=True)
    measures: dict[str, Measure] = {}
    for name in names:
        measures[name] = measure = run_variant(name, workload)
        print(f"  {name:11s} idle worker-seconds {measure.idle_worker_seconds:7.1f} (connected "
              f"{measure.idle_connected:6.1f} + queued or starting {measure.idle_waiting:6.1f})"
              f"   jobs submitted {measure.jobs:3d}   max pending {measure.max_pending_jobs}"
              f"   makespan {measure.makespan:6.1f} s"
              + (f"   idle_timeout at the end {measure.idle_timeout:.1f} s"
                 if measure.idle_timeout is not None else ""), flush=True)
    for reference in ("fixed", "dask_adapt"):
        if reference not in measures:
            continue
        base = measures[reference]
        for name, measure in measures.items():
            if name in (reference, "fixed"):
                continue
            print(f"  {name:11s} / {reference:10s}: idle worker-seconds "
                  f"{measure.idle_worker_seconds / max(base.idle_worker_seconds, 1e-9):5.2f}x, "
                  f"jobs {measure.jobs / max(base.jobs, 1):5.2f}x, max pending "
                  f"{measure.max_pending_jobs} vs {base.max_pending_jobs}, makespan "
                  f"{measure.makespan / base.makespan:5.2f}x")
    if "fixed" in measures and measures["fixed"].jobs:
        fixed = measures["fixed"]
        startup = fixed.idle_waiting / fixed.jobs  # worker-seconds a job is paid before it runs
        bound = WORKERS * (startup + sum(min(gap, startup) for gap in workload["gaps"]))
        print(f"  floor for any policy that knew every gap in advance and kept {WORKERS} workers "
              f"per burst: {bound:.1f} idle worker-seconds = "
              f"{bound / fixed.idle_worker_seconds:.2f}x fixed (the first start-up, then each gap "
              "held or paid with a new start-up, whichever is less; "
              f"{startup:.1f} s per start-up as the fixed cluster's jobs took; "
              "the ends of the bursts not counted)")
        # Each gap is a ski rental: hold the workers (pay the gap) or release them (pay a new
        # start-up). A policy that does not know a gap's length cannot promise less than
        # e/(e-1) times the best choice for it, not even a randomized one (Karlin, Manasse,
        # McGeoch and Owicki, 1994); releasing after idle = start-up promises 2x.
        gaps = WORKERS * sum(min(gap, startup) for gap in workload["gaps"])
        first = WORKERS * startup
        for label, factor in (("the best any policy not knowing the gaps can promise "
                               "(e/(e-1) x each gap's part)", math.e / (math.e - 1)),
                              ("what the break-even rule (idle_timeout = start-up) promises "
                               "(2 x each gap's part)", 2.0)):
            promised = first + factor * gaps
            print(f"  {label}: {promised:.1f} idle worker-seconds = "
                  f"{promised / fixed.idle_worker_seconds:.2f}x fixed")
    print("  targets for fair_share: idle <= 0.25x fixed and <= 1.00x dask_adapt, jobs <= "
          "dask_adapt's, makespan <= 1.15x fixed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
