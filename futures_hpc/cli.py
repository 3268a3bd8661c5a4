"""The ``futures-hpc`` command: inspect the set-up, try it, and clean up after crashed runs.

Sub-commands::

    futures-hpc info                 backends, the one HPCExecutor() picks and why, config files
    futures-hpc demo [--backend B]   a real parallel job with a progress bar and a timing summary
    futures-hpc check BACKEND        one tiny job: job script, time to start, time to first result
    futures-hpc jobs                 this user's futures_hpc jobs still in the batch queue
    futures-hpc cancel [TARGET ...]  cancel them (one scancel/qdel call per batch system)
    futures-hpc config               the merged configuration and profiles, as YAML

``python -m futures_hpc`` runs the same command. This is the only module that prints.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import math
import os
import platform
import random
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.config
import yaml

from . import __version__
from .backends import available_backends, choose_backend
from .backends.batch import (
    BUILTIN_SYSTEMS,
    JOB_NAME_PREFIX,
    QueuedJob,
    batch_system,
    detect_batch_systems,
    queued_jobs,
)
from .backends.batch.commands import COMMAND_ERRORS, read_command
from .config import config_files_read
from .errors import (
    BackendUnavailableError,
    FuturesHPCError,
    JobSubmissionError,
    OptionError,
    UnknownBackendError,
)
from .options import profile_options

logger = logging.getLogger("futures_hpc")

#: Resources the demo and the check ask for on a batch backend when the profile sets none.
SMALL_JOB_RESOURCES = {"cores": 1, "memory": "1GB", "walltime": "00:10:00"}

#: Backends whose workers run as batch jobs (they need cores, memory and a walltime).
BATCH_BACKENDS = tuple(BUILTIN_SYSTEMS)

#: Lines of each log file shown when a check fails.
LOG_TAIL_LINES = 20


# -- shared helpers -------------------------------------------------------------------------------


def _print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [
        max(len(str(value)) for value in column) for column in zip(header, *rows, strict=False)
    ]
    for row in (header, *rows):
        cells = (str(value).ljust(width) for value, width in zip(row, widths, strict=False))
        print("  " + "  ".join(cells).rstrip())


def _executor_options(
    backend: str, profile: str | None, max_workers: int | None, small_jobs: bool
) -> dict[str, Any]:
    """Options for the demo and the check: the profile's, plus small jobs where it is silent."""
    options: dict[str, Any] = {"profile": profile}
    if max_workers is not None:
        options["max_workers"] = max_workers
    if small_jobs and backend in BATCH_BACKENDS:
        from_profile = profile_options(profile)
        for name, value in SMALL_JOB_RESOURCES.items():
            if name not in from_profile:
                options[name] = value
        if max_workers is None and "max_workers" not in from_profile:
            options["max_workers"] = 2
    return options


def _hint_for(error: BaseException) -> str:
    """What to try next after ``error``."""
    if isinstance(error, BackendUnavailableError):
        return (
            "this backend cannot run here: `futures-hpc info` says why; install its extra "
            "(pip install 'futures_hpc[jobqueue]' for slurm/pbs/sge) or pick another backend"
        )
    if isinstance(error, UnknownBackendError):
        return "`futures-hpc info` lists the backends known here"
    if isinstance(error, OptionError):
        return "fix the option named above; `futures-hpc config` shows your profiles"
    if isinstance(error, JobSubmissionError):
        return (
            "the batch system refused the job: check queue (partition), account, walltime and "
            "memory in your profile against the limits (sinfo / qstat -Q / qconf -sql)"
        )
    if isinstance(error, TimeoutError):
        return (
            "no worker connected in time. If `futures-hpc jobs` shows the job PENDING, the "
            "queue is busy or the request exceeds a limit (try a shorter walltime or another "
            "queue). If it ran, the worker log above usually says why it could not reach the "
            "scheduler: see docs/troubleshooting.md (workers cannot reach the scheduler)"
        )
    if isinstance(error, (ImportError, ModuleNotFoundError)):
        return (
            "the workers' Python lacks a package: set the `python` option to an interpreter "
            "with futures_hpc installed, or activate its environment in `prologue`"
        )
    return "run with --verbose for the executor's log, and see docs/troubleshooting.md"


def _log_tail(directory: Path | None, lines: int = LOG_TAIL_LINES) -> list[tuple[Path, list[str]]]:
    """The last ``lines`` lines of the newest log files of a run directory (TLS files skipped)."""
    if directory is None or not directory.is_dir():
        return []
    candidates = [
        path
        for path in directory.rglob("*")
        if path.is_file() and "tls" not in path.parts and path.suffix not in (".pem", ".json")
    ]
    candidates.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    tails = []
    for path in candidates[:3]:
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        tails.append((path, text[-lines:]))
    return tails


def _newest_run_directory() -> Path | None:
    base = Path(dask.config.get("futures_hpc.log-dir", None) or "futures_hpc-logs")
    if not base.is_dir():
        return None
    runs = [path for path in base.glob(f"{JOB_NAME_PREFIX}*") if path.is_dir()]
    return max(runs, key=lambda path: path.stat().st_mtime, default=None)


# -- info -----------------------------------------------------------------------------------------


def command_info(arguments: argparse.Namespace) -> int:
    """Print the backends, the default choice and why, config files, and running executors."""
    from .discovery import read_discovery_record, running_cluster_names

    print(f"futures_hpc {__version__} on Python {platform.python_version()} "
          f"({sys.executable}), host {socket.gethostname()}")
    print()
    print("Backends:")
    backends = available_backends()
    rows = [
        (info.name, "yes" if info.available else "no", info.reason) for info in backends
    ]
    _print_table(rows, ("name", "available", "why / what was found"))
    print()
    try:
        name, why = choose_backend(None, arguments.profile)
    except FuturesHPCError as error:
        print(f"HPCExecutor() cannot choose a backend: {error}")
        return 1
    availability = {info.name: info for info in backends}
    chosen = availability.get(name)
    state = ""
    if chosen is not None and not chosen.available:
        state = f" (but it is not available: {chosen.reason})"
    print(f"HPCExecutor() would use: {name} ({why}){state}")
    profile = arguments.profile or dask.config.get("futures_hpc.profile", None)
    print(f"Default profile: {profile or 'none'}")
    print()
    files = config_files_read()
    print("Config files read (dask config, in order):")
    for path in files or ["none"]:
        print(f"  {path}")
    print()
    address = dask.config.get("futures_hpc.dashboard-address", "localhost:8787")
    print(f"Dashboard: each executor serves one at {address} (ex.dashboard_link); from another "
          "machine use `ssh -L 8787:localhost:8787 <this host>`")
    names = running_cluster_names()
    if names:
        print("Running executors on this machine:")
        for run_name in names:
            try:
                record = read_discovery_record(run_name)
            except LookupError:
                continue
            print(f"  {run_name}  backend={record.get('backend')}  pid={record.get('pid')}  "
                  f"dashboard={record.get('dashboard_link')}")
    return 0


# -- demo -----------------------------------------------------------------------------------------


def estimate_pi_part(seed: int, points: int) -> tuple[int, float, str]:
    """Throw ``points`` random points at the unit square; count those inside the quarter circle.

    Returns
    -------
    tuple
        The count inside, the seconds the call took, and ``host:pid`` of the worker.

    """
    generator = random.Random(seed)
    draw = generator.random
    started = time.perf_counter()
    inside = 0
    for _ in range(points):
        x, y = draw(), draw()
        if x * x + y * y <= 1.0:
            inside += 1
    return inside, time.perf_counter() - started, f"{socket.gethostname()}:{os.getpid()}"


def command_demo(arguments: argparse.Namespace) -> int:
    """Estimate pi by Monte Carlo on the chosen backend and print a timing summary."""
    from . import HPCExecutor

    name, why = choose_backend(arguments.backend, arguments.profile)
    calls, points = arguments.calls, arguments.points
    print(f"futures-hpc demo: Monte Carlo estimate of pi, {calls} calls x {points:,} points, "
          f"on the {name!r} backend ({why})")
    options = _executor_options(name, arguments.profile, arguments.max_workers, small_jobs=True)
    started = time.perf_counter()
    try:
        executor = HPCExecutor(name, **options)
    except FuturesHPCError as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"hint: {_hint_for(error)}; or try `futures-hpc demo --backend local`",
              file=sys.stderr)
        return 1
    with executor:
        startup = time.perf_counter() - started
        print(f"started {executor!r} in {startup:.1f} s")
        if executor.dashboard_link:
            print(f"dashboard: {executor.dashboard_link}")
        try:  # batch jobs may wait in the queue: time that apart from the work itself
            executor.client.wait_for_workers(1, timeout=arguments.timeout)
        except Exception as error:  # distributed raises its own TimeoutError
            print(f"error: no worker connected within {arguments.timeout:g} s ({error!r})",
                  file=sys.stderr)
            print(f"hint: {_hint_for(TimeoutError())}", file=sys.stderr)
            return 1
        first_worker = time.perf_counter() - started
        map_started = time.perf_counter()
        first_result_after = None
        inside_total, busy_seconds, workers = 0, 0.0, set()
        results = executor.map(
            estimate_pi_part, range(calls), [points] * calls, chunksize=1, progress=True
        )
        for inside, seconds, worker in results:
            if first_result_after is None:
                first_result_after = time.perf_counter() - map_started
            inside_total += inside
            busy_seconds += seconds
            workers.add(worker)
        wall = time.perf_counter() - map_started
        closing = time.perf_counter()
    shutdown = time.perf_counter() - closing
    total_points = calls * points
    estimate = 4.0 * inside_total / total_points
    hosts = sorted({worker.split(":")[0] for worker in workers})
    print()
    print(f"pi is about {estimate:.6f} (error {abs(estimate - math.pi):.2e}, "
          f"{total_points:,} points)")
    print(f"map:        {calls} calls in {wall:.2f} s: {calls / wall:,.1f} calls/s, "
          f"{total_points / wall / 1e6:,.2f} million points/s")
    print(f"parallel:   {busy_seconds:.2f} s of work in {wall:.2f} s = speed-up "
          f"{busy_seconds / wall:.2f} on {len(workers)} worker processes "
          f"(hosts: {', '.join(hosts)})")
    print(f"timings:    start-up {startup:.1f} s, first worker after {first_worker:.1f} s, "
          f"first result {first_result_after:.2f} s into the map, shut-down {shutdown:.1f} s")
    return 0


# -- check ----------------------------------------------------------------------------------------


def describe_worker() -> dict[str, str]:
    """What a check's tiny job reports about the worker it ran on."""
    import futures_hpc

    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "python": f"{platform.python_version()} ({sys.executable})",
        "futures_hpc": futures_hpc.__version__,
        "cwd": os.getcwd(),
    }


def _job_script(executor: Any) -> str | None:
    for owner in (executor, getattr(executor, "cluster", None)):
        job_script = getattr(owner, "job_script", None)
        if callable(job_script):
            try:
                return job_script()
            except Exception as error:  # noqa: BLE001 - informative only
                return f"(job_script() failed: {error!r})"
    return None


def _print_failure(error: BaseException, run_directory: Path | None) -> None:
    print(f"FAILED: {type(error).__name__}: {error}")
    for path, lines in _log_tail(run_directory):
        print(f"--- last {len(lines)} lines of {path}")
        for line in lines:
            print(f"    {line}")
    print(f"hint: {_hint_for(error)}")


def command_check(arguments: argparse.Namespace) -> int:
    """Start the backend with the user's profile, run one tiny job and report what happened."""
    from . import HPCExecutor

    name = arguments.backend
    options = _executor_options(name, arguments.profile, arguments.max_workers, small_jobs=True)
    if name not in BATCH_BACKENDS and "max_workers" not in options:
        options["max_workers"] = 1
    shown = {key: value for key, value in options.items() if value is not None}
    print(f"futures-hpc check {name}: {shown}")
    started = time.perf_counter()
    try:
        executor = HPCExecutor(name, **options)
    except Exception as error:  # noqa: BLE001 - report anything
        _print_failure(error, _newest_run_directory())
        return 1
    created = time.perf_counter() - started
    try:
        print(f"executor:   {executor!r} created in {created:.2f} s")
        if executor.networked:  # local workers write no logs of their own
            print(f"log dir:    {executor.log_dir}")
        if executor.dashboard_link:
            print(f"dashboard:  {executor.dashboard_link}")
        script = _job_script(executor)
        if script:
            print("job script:")
            for line in script.splitlines():
                print(f"    {line}")
        submitted = time.perf_counter()
        future = executor.submit(describe_worker)
        try:
            executor.client.wait_for_workers(1, timeout=arguments.timeout)
        except Exception as error:  # distributed raises its own TimeoutError
            raise TimeoutError(
                f"no worker connected within {arguments.timeout:g} s"
            ) from error
        worker_started = time.perf_counter() - submitted
        print(f"start:      first worker connected {worker_started:.2f} s after submitting")
        report = future.result(timeout=arguments.timeout)
        first_result = time.perf_counter() - submitted
        print(f"result:     first result {first_result:.2f} s after submitting")
        for key, value in report.items():
            print(f"    {key}: {value}")
        print("OK")
        return 0
    except BaseException as error:  # noqa: BLE001 - report anything, including Ctrl-C
        if isinstance(error, KeyboardInterrupt):
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        _print_failure(error, executor.log_dir)
        return 1
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# -- jobs and cancel ------------------------------------------------------------------------------


def batch_systems_here() -> list[str]:
    """The batch systems found here, detected as the registry does (``BatchSystem.detect``)."""
    return [system.name for system, _ in detect_batch_systems()]


def _live_run_names() -> set[str]:
    from .discovery import running_cluster_names

    return set(running_cluster_names())


def _run_of(job: QueuedJob, live_runs: set[str]) -> str | None:
    return next((run for run in live_runs if job.name.startswith(run)), None)


def _schedulers_from(arguments: argparse.Namespace) -> list[str]:
    if arguments.scheduler:
        return [arguments.scheduler]
    return batch_systems_here()


def _queued_jobs_reporting_errors(
    arguments: argparse.Namespace,
) -> tuple[list[str], list[QueuedJob], list[str]] | None:
    """The schedulers asked, their futures_hpc jobs and the query errors (printed here).

    None, after saying so, when no batch system is found.
    """
    schedulers = _schedulers_from(arguments)
    if not schedulers:
        print("no batch system found here (no sbatch or qsub on PATH)")
        return None
    jobs, errors = queued_jobs(schedulers)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    return schedulers, jobs, errors


def command_jobs(arguments: argparse.Namespace) -> int:
    """List this user's futures_hpc jobs left in the batch queues."""
    found = _queued_jobs_reporting_errors(arguments)
    if found is None:
        return 0
    schedulers, jobs, errors = found
    if not jobs:
        print(f"no futures_hpc jobs of {getpass.getuser()} in {', '.join(schedulers)}")
        return 1 if errors else 0
    live_runs = _live_run_names()
    rows = [
        (job.scheduler, job.job_id, job.name, job.state,
         "running here" if _run_of(job, live_runs) else "none found here")
        for job in jobs
    ]
    _print_table(rows, ("scheduler", "job id", "name", "state", "client"))
    return 1 if errors else 0


def command_cancel(arguments: argparse.Namespace) -> int:
    """Cancel this user's futures_hpc jobs: all of them, or those named by the targets."""
    # Reading the discovery records first also deletes the TLS files of runs killed here.
    _live_run_names()
    found = _queued_jobs_reporting_errors(arguments)
    if found is None:
        return 0
    schedulers, jobs, errors = found
    if arguments.targets:
        jobs = [
            job
            for job in jobs
            if any(job.job_id == target or job.name.startswith(target)
                   for target in arguments.targets)
        ]
    live_runs = _live_run_names()
    if not arguments.include_live:
        skipped = [job for job in jobs if _run_of(job, live_runs)]
        for job in skipped:
            print(f"skipped {job.scheduler} job {job.job_id} ({job.name}): its executor is "
                  "alive (--all cancels it too)")
        jobs = [job for job in jobs if not _run_of(job, live_runs)]
    if not jobs:
        print("nothing to cancel")
        return 1 if errors else 0
    status = 1 if errors else 0
    for scheduler in schedulers:
        ids = [job.job_id for job in jobs if job.scheduler == scheduler]
        if not ids:
            continue
        command = batch_system(scheduler).cancel_command_line(ids)
        if arguments.dry_run:
            print(f"would run: {' '.join(command)}")
            continue
        try:
            read_command(command)
        except COMMAND_ERRORS as error:
            print(f"error: {error}", file=sys.stderr)
            status = 1
            continue
        print(f"cancelled {len(ids)} {scheduler} job(s): {' '.join(ids)}")
    return status


# -- config ---------------------------------------------------------------------------------------


def command_config(arguments: argparse.Namespace) -> int:
    """Print the merged futures_hpc configuration (or one profile) as YAML."""
    if arguments.profile:
        try:
            options = profile_options(arguments.profile)
        except OptionError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"# profile {arguments.profile!r} (futures_hpc.profiles.{arguments.profile})")
        print(yaml.safe_dump(options, sort_keys=False, default_flow_style=False), end="")
        return 0
    print("# futures_hpc configuration, merged by dask's config system from:")
    print("#   the defaults shipped in futures_hpc/futures_hpc.yaml")
    for path in config_files_read():
        print(f"#   {path}")
    variables = sorted(name for name in os.environ
                       if name.startswith("DASK_FUTURES_HPC") or name == "FUTURES_HPC_BACKEND")
    for name in variables:
        print(f"#   environment {name}={os.environ[name]}")
    merged = dask.config.get("futures_hpc", default={})
    print(yaml.safe_dump({"futures_hpc": merged}, sort_keys=False, default_flow_style=False),
          end="")
    return 0


def command_store(arguments: argparse.Namespace) -> int:
    """``futures-hpc store PATH``: what a result store holds; clear it, or one function."""
    from .store import admin

    try:
        if arguments.clear:
            admin.clear(arguments.path)
            print(f"removed the store {arguments.path}")
            return 0
        if arguments.clear_function:
            removed = admin.clear_function(arguments.path, arguments.clear_function)
            print(f"removed {removed:,} recorded calls of {arguments.clear_function}")
            return 0 if removed else 1
        print("\n".join(admin.report(admin.summarize(arguments.path))))
    except FileNotFoundError as error:
        print(f"futures-hpc store: {error}", file=sys.stderr)
        return 1
    return 0


# -- the parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``futures-hpc``."""
    parser = argparse.ArgumentParser(
        prog="futures-hpc",
        description="futures_hpc: one concurrent.futures Executor for laptops, SLURM/PBS/SGE, "
        "MPI and AWS ECS.",
    )
    parser.add_argument("--version", action="version", version=f"futures_hpc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the futures_hpc log on standard error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = commands.add_parser("info", help="backends, the default choice and why, config files")
    info.add_argument("--profile", help="profile to consider (default: futures_hpc.profile)")
    info.set_defaults(handler=command_info)

    demo = commands.add_parser("demo", help="run a Monte Carlo pi job with a progress bar")
    demo.add_argument("--backend", help="backend to run on (default: as HPCExecutor() chooses)")
    demo.add_argument("--profile", help="named options from futures_hpc.profiles")
    demo.add_argument("--max-workers", type=int, help="workers to use")
    demo.add_argument("--calls", type=int, default=100, help="number of calls (default 100)")
    demo.add_argument("--points", type=int, default=500_000,
                      help="random points per call (default 500,000)")
    demo.add_argument("--timeout", type=float, default=300.0,
                      help="seconds to wait for the first worker (default 300)")
    demo.set_defaults(handler=command_demo)

    check = commands.add_parser("check", help="run one tiny job on BACKEND and report")
    check.add_argument("backend", metavar="BACKEND", help="local, slurm, pbs, sge, mpi, ecs, ...")
    check.add_argument("--profile", help="named options from futures_hpc.profiles")
    check.add_argument("--max-workers", type=int, help="workers to ask for")
    check.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to wait for a worker and for the result (default 120)")
    check.set_defaults(handler=command_check)

    for command_name, help_text, handler in (
        ("jobs", "list your futures_hpc jobs left in the batch queue", command_jobs),
        ("cancel", "cancel your futures_hpc jobs left in the batch queue", command_cancel),
    ):
        command = commands.add_parser(command_name, help=help_text)
        command.add_argument("--scheduler", choices=sorted(BUILTIN_SYSTEMS),
                             help="batch system to query (default: every one found on PATH)")
        if command_name == "cancel":
            command.add_argument("targets", nargs="*", metavar="TARGET",
                                 help="job ids or run names (fhpc-...) to cancel; default: all")
            command.add_argument("--dry-run", action="store_true",
                                 help="print the cancel command instead of running it")
            command.add_argument("--all", "--include-live", dest="include_live",
                                 action="store_true",
                                 help="also cancel jobs of executors still alive (by default "
                                      "only jobs whose executor is gone are cancelled)")
        command.set_defaults(handler=handler)

    store = commands.add_parser("store", help="what a result store holds (store=PATH); clear it")
    store.add_argument("path", metavar="PATH", help="the store's directory or fsspec URL")
    clearing = store.add_mutually_exclusive_group()
    clearing.add_argument("--clear", action="store_true", help="delete the whole store")
    clearing.add_argument("--clear-function", metavar="NAME",
                          help="forget the recorded calls of one function (module.name)")
    store.set_defaults(handler=command_store)

    config = commands.add_parser("config", help="show the merged configuration as YAML")
    config.add_argument("--profile", help="show only this profile's options")
    config.set_defaults(handler=command_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``futures-hpc`` with ``argv`` (default: the command line); return the exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.verbose:
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logger.setLevel(logging.INFO)
    if not getattr(arguments, "handler", None):
        parser.print_help()
        return 2
    try:
        return arguments.handler(arguments)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
