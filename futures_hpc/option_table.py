"""The table of the executor's options: what each means, how it is checked, who ignores it.

Every option that the executor and all its backends share is one :class:`Option` row of
:data:`OPTIONS`. The executor checks each given option once, with the row's ``check``, before
anything starts; a backend then either reads it, or the row's ``ignored_on`` says why the option
means nothing there (it is still checked, and the executor logs that it is ignored), or
``refused_on`` says why the backend cannot do what it asks (an :class:`OptionError` before
anything starts). The option tables of ``docs/configuration.md`` are made from this table
(:func:`options_markdown`), and a test keeps them equal.

Options of one backend only (e.g. SLURM's ``job_directives_skip``, ECS's ``cluster_arn``) are
the backend's own and listed by its ``backend_option_names``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError
from .options import (
    check_boolean,
    check_dashboard_address,
    check_environment,
    check_log_dir,
    check_max_workers,
    check_store,
    check_text,
    check_text_list,
    check_whole_number,
    parse_memory,
    parse_timeout,
    parse_walltime,
    unknown_option_error,
)
from .scaling import (
    AUTO_IDLE_TIMEOUT,
    AUTO_IDLE_TIMEOUT_RANGE,
    DEFAULT_MAX_PENDING_JOBS,
    DEFAULT_MAX_RESUBMISSIONS,
    check_idle_timeout,
)
from .security import check_security

#: How many times a call may be running on a worker that dies before it fails with
#: :class:`~futures_hpc.errors.WorkerLostError` (dask's ``allowed-failures`` is one less).
DEFAULT_MAX_CALL_RETRIES = 3

#: Backends whose workers are fixed when the executor starts: scaling options mean nothing.
_FIXED = "its workers are fixed when the executor starts"
_NO_BATCH_QUEUE = "it submits no batch jobs"


def _check_import_path(value: Any) -> Any:
    from .import_path import import_path_option

    import_path_option(value)
    return value


def check_job_array(value: Any) -> bool | int:
    """``job_array``: True or False, or a whole number >= 1 (arrays, with that throttle)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value >= 1:
        return value
    raise OptionError(
        f"job_array={value!r} is not allowed; job_array must be True, False or a whole number "
        ">= 1 (job arrays whose elements run at most that many at once)"
    )


#: Why PBS refuses ``job_array`` (see ``backends/batch/pbs.py``).
PBS_JOB_ARRAY_REFUSAL = (
    "futures_hpc does not submit PBS job arrays yet: PBS Pro (-J, elements 1234[3]) and Torque "
    "(-t, 1234-3) differ, and neither could be tested (SLURM's PBS wrappers, the PBS of the "
    "tests, submit arrays but cannot name one element: their qdel 1234[3] cancels all)"
)


def _check_profile(value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise OptionError(f"profile={value!r} is not allowed; profile must be a profile's name")
    return value


@dataclass(frozen=True)
class Option:
    """One row of the option table.

    Attributes
    ----------
    name : str
        The keyword of ``HPCExecutor(...)`` and of config profiles.
    group : str
        ``"executor"`` (the executor itself), ``"scaling"`` (the fair-share policy) or
        ``"resource"`` (what each job or worker gets).
    check : callable
        ``check(value)`` raises :class:`OptionError` naming the option, the value and what is
        allowed; it returns the value as given or normalized.
    default : str
        The default, as the docs show it.
    meaning : str
        What the option does (one line, for the docs' table).
    example : str
        A value, as Python source.
    ignored_on : mapping of str to str
        Backends on which the option means nothing by design, with why: there it is checked,
        then logged as ignored.
    refused_on : mapping of str to str
        Backends that cannot do what the option asks, with why: there it is an error.

    """

    name: str
    group: str
    check: Callable[[Any], Any]
    default: str
    meaning: str
    example: str
    ignored_on: Mapping[str, str] = field(default_factory=dict)
    refused_on: Mapping[str, str] = field(default_factory=dict)


def _scaling(name: str, check: Callable[[Any], Any], default: str, meaning: str,
             example: str) -> Option:
    return Option(name, "scaling", check, default, meaning, example,
                  ignored_on={"local": _FIXED, "mpi": _FIXED})


OPTIONS: tuple[Option, ...] = (
    Option("max_workers", "executor", check_max_workers, "local: the cores; batch: 1",
           "the most workers (batch: jobs times `processes`; a job never runs more)", "20"),
    Option("profile", "executor", _check_profile, "`futures_hpc.profile`",
           "a named set of options from dask config `futures_hpc.profiles`", '"short"'),
    Option("security", "executor", check_security, "`True`",
           "TLS with a key made for the run (see [security](security.md))", "True"),
    Option("dashboard_address", "executor", check_dashboard_address,
           '`futures_hpc.dashboard-address` (`"localhost:8787"`)',
           "where the dashboard listens (`host:port`, `:port`, a port)", '"localhost:8787"'),
    Option("max_call_retries", "executor", lambda value: check_whole_number(
               "max_call_retries", value, 1), f"`{DEFAULT_MAX_CALL_RETRIES}`",
           "how often a call that kills its worker is run before `WorkerLostError`", "5"),
    Option("import_path", "executor", _check_import_path, "`True`",
           "the client's import path, carried to the workers", '["/home/me/lib"]'),
    Option("store", "executor", check_store, "none",
           "record each call's result there; a rerun reuses them (see [resuming](resume.md))",
           '"/scratch/me/results"'),
    _scaling("adaptive", lambda value: check_boolean("adaptive", value), "`True`",
             "size from the queued work (or hold `max_workers`)", "False"),
    _scaling("min_workers", lambda value: check_whole_number("min_workers", value, 0), "`0`",
             "workers kept without work", "2"),
    _scaling("idle_timeout", check_idle_timeout, f'`"{AUTO_IDLE_TIMEOUT}"`',
             "seconds a job's workers are idle before it is released; `\"auto\"`: as long as "
             f"a job of the run took to start ({AUTO_IDLE_TIMEOUT_RANGE[0]:g} s to "
             f"{AUTO_IDLE_TIMEOUT_RANGE[1] / 60:g} min, see [scaling](scaling.md))", "120"),
    _scaling("max_pending_jobs", lambda value: check_whole_number(
                 "max_pending_jobs", value, 1), f"`{DEFAULT_MAX_PENDING_JOBS}`",
             "the most jobs waiting in the batch queue at once", "10"),
    _scaling("max_resubmissions", lambda value: check_whole_number(
                 "max_resubmissions", value, 0), f"`{DEFAULT_MAX_RESUBMISSIONS}`",
             "failed jobs replaced before the run fails with `JobFailedError`", "5"),
    _scaling("start_timeout", lambda value: parse_timeout(value, "start_timeout"), "none",
             "how long a job may wait while no worker of the run has connected", '"00:30:00"'),
    Option("job_array", "scaling", check_job_array, "`False`",
           "the jobs one scaling step asks for go out as one job array (SLURM `--array`, "
           "Grid Engine `-t`); a number caps the elements running at once (`%N`, `-tc`)",
           "True", ignored_on={"local": _NO_BATCH_QUEUE, "mpi": _NO_BATCH_QUEUE,
                               "ecs": _NO_BATCH_QUEUE},
           refused_on={"pbs": PBS_JOB_ARRAY_REFUSAL}),
    Option("cores", "resource", lambda value: check_whole_number("cores", value, 1), "1",
           "cores per job (local: threads per worker process)", "4"),
    Option("memory", "resource", parse_memory, "the backend's",
           "memory per job (local: per worker process)", '"8GB"'),
    Option("walltime", "resource", parse_walltime, "the queue's",
           "time limit of each job", '"01:30:00"',
           ignored_on={"local": _NO_BATCH_QUEUE, "mpi": "its ranks run in the allocation "
                       "mpirun was given", "ecs": "ECS tasks have no time limit"}),
    Option("queue", "resource", lambda value: check_text("queue", value), "the default queue",
           "batch queue / SLURM partition", '"short"',
           ignored_on={"local": _NO_BATCH_QUEUE, "mpi": _NO_BATCH_QUEUE, "ecs": _NO_BATCH_QUEUE}),
    Option("account", "resource", lambda value: check_text("account", value), "none",
           "account or project to charge", '"proj1"',
           ignored_on={"local": _NO_BATCH_QUEUE, "mpi": _NO_BATCH_QUEUE, "ecs": _NO_BATCH_QUEUE}),
    Option("processes", "resource", lambda value: check_whole_number("processes", value, 1),
           "1", "worker processes per job, sharing its `cores`", "2",
           ignored_on={"mpi": "each rank is one worker", "ecs": "each task is one worker"}),
    Option("job_extra", "resource", lambda value: check_text_list("job_extra", value), "none",
           "extra scheduler directives, one per item", '["--qos=high"]',
           ignored_on={"local": _NO_BATCH_QUEUE, "mpi": _NO_BATCH_QUEUE, "ecs": _NO_BATCH_QUEUE}),
    Option("prologue", "resource", lambda value: check_text_list("prologue", value), "none",
           "shell lines run before the worker starts", '["module load python"]',
           ignored_on={"local": "its workers start from this process, not a shell",
                       "mpi": "its ranks are started by mpirun"}),
    Option("env", "resource", lambda value: check_environment("env", value), "none",
           "environment variables of the workers", '{"OMP_NUM_THREADS": "1"}'),
    Option("python", "resource", lambda value: check_text("python", value), "this Python",
           "the interpreter on the compute side", '"/opt/venv/bin/python"',
           refused_on={"local": "its workers are processes of this interpreter; run the "
                       "script with the interpreter you want"}),
    Option("log_dir", "resource", check_log_dir, "`futures_hpc.log-dir`",
           "where each run's directory of scripts and logs goes", '"~/fhpc-logs"'),
)

OPTION_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
#: Options of the executor itself and of its scaling policy.
EXECUTOR_OPTION_NAMES: tuple[str, ...] = tuple(
    option.name for option in OPTIONS if option.group in ("executor", "scaling"))
#: The options of the fair-share policy.
SCALING_OPTION_NAMES: tuple[str, ...] = tuple(
    option.name for option in OPTIONS if option.group == "scaling")
#: The common resource vocabulary (batch backends map all of them onto their jobs).
COMMON_OPTION_NAMES: tuple[str, ...] = tuple(
    option.name for option in OPTIONS if option.group == "resource")


def check_options(backend: str, options: Mapping[str, Any]) -> dict[str, str]:
    """Check each table option in ``options`` once; return those ``backend`` ignores, with why.

    Options that are None count as not given; names not in the table are left to the caller.

    Raises
    ------
    OptionError
        For a bad value, naming the option, the value and what is allowed; or for an option
        the backend refuses, saying why.

    """
    ignored = {}
    for name, value in options.items():
        option = OPTION_BY_NAME.get(name)
        if option is None or value is None:
            continue
        option.check(value)
        if backend in option.refused_on:
            raise OptionError(
                f"{name}={value!r} is not allowed on the {backend!r} backend: "
                f"{option.refused_on[backend]}"
            )
        if backend in option.ignored_on:
            ignored[name] = option.ignored_on[backend]
    return ignored


def describe_ignored(backend: str, ignored: Mapping[str, str]) -> str:
    """One log line for the options ``backend`` ignores, with why."""
    reasons: dict[tuple[str, str], list[str]] = {}
    for name, reason in ignored.items():
        kind = "scaling options" if OPTION_BY_NAME[name].group == "scaling" else "options"
        reasons.setdefault((kind, reason), []).append(name)
    parts = [f"the {kind} {', '.join(names)} ({reason})"
             for (kind, reason), names in reasons.items()]
    return f"the {backend} backend ignores " + "; ".join(parts)


def options_markdown(groups: Iterable[str] = ("executor", "scaling", "resource")) -> str:
    """The docs' table of the options of ``groups``: meaning, default, example, exceptions."""
    lines = ["| option | meaning | default | example | not read by |",
             "| --- | --- | --- | --- | --- |"]
    for option in OPTIONS:
        if option.group not in groups:
            continue
        exceptions = [f"{backend} (ignored)" for backend in option.ignored_on]
        exceptions += [f"{backend} (refused)" for backend in option.refused_on]
        lines.append(f"| `{option.name}` | {option.meaning} | {option.default} | "
                     f"`{option.example}` | {', '.join(exceptions) or 'none'} |")
    return "\n".join(lines) + "\n"


def split_options(
    options: Mapping[str, Any], backend_option_names: Iterable[str] | None, backend: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split merged options into executor, common-resource and backend-specific ones.

    Parameters
    ----------
    options : mapping
        All options after merging the profile.
    backend_option_names : iterable of str or None
        The backend's own option names; ``None`` means the backend takes anything else.
    backend : str
        For the error message.

    Raises
    ------
    OptionError
        For a name that neither the executor, the common vocabulary nor the backend knows.

    """
    executor_options, common_options, backend_options = {}, {}, {}
    backend_names = None if backend_option_names is None else set(backend_option_names)
    for name, value in options.items():
        if name in EXECUTOR_OPTION_NAMES:
            executor_options[name] = value
        elif name in COMMON_OPTION_NAMES:
            common_options[name] = value
        elif backend_names is None or name in backend_names:
            backend_options[name] = value
        else:
            allowed = set(EXECUTOR_OPTION_NAMES) | set(COMMON_OPTION_NAMES) | backend_names
            raise unknown_option_error(name, value, allowed, f"the {backend!r} backend")
    return executor_options, common_options, backend_options
