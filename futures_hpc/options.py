"""The common resource vocabulary: parsing, validation and named profiles.

Every option is checked here, before anything is started or submitted, and a bad one raises
:class:`~futures_hpc.errors.OptionError` (a :class:`ValueError`) that names the option, the value
and what is allowed, with the closest valid name for a typo.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import dask.config
from dask.utils import parse_bytes

from .errors import OptionError

_CLOCK_PATTERN = re.compile(r"^(?:(?P<days>\d+)-)?(?P<fields>\d+(?::\d{1,2}){0,2})$")


def _parse_walltime_text(text: str) -> int | None:
    """Seconds in a batch-system duration, or None if it is not one.

    As SLURM and PBS read them: ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``. A
    bare number is refused: SLURM reads it as minutes and PBS as seconds.
    """
    match = _CLOCK_PATTERN.match(text)
    if not match:
        return None
    numbers = [int(part) for part in match["fields"].split(":")]
    days = int(match["days"] or 0)
    if match["days"] is not None:
        numbers += [0] * (3 - len(numbers))  # D-HH[:MM[:SS]]
    elif len(numbers) == 1:
        return None
    elif len(numbers) == 2:
        numbers = [0, *numbers]  # MM:SS
    hours, minutes, seconds = numbers
    if minutes > 59 or seconds > 59:
        return None
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


def closest_name(name: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate closest to ``name`` (for "did you mean" hints), or None."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_option_error(name: str, value: Any, allowed: Iterable[str], where: str) -> OptionError:
    """Build the error for an option nobody understands, with a suggestion for a typo."""
    allowed = sorted(set(allowed))
    suggestion = closest_name(name, allowed)
    hint = f" Did you mean {suggestion!r}?" if suggestion else ""
    return OptionError(
        f"unknown option {name}={value!r} for {where}.{hint} "
        f"Allowed options: {', '.join(allowed)}."
    )


def format_bytes(amount: int | None) -> str:
    """``1.2 GB``, ``300 MB``: an amount of memory for messages."""
    if amount is None:
        return "an unknown amount"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if amount >= size:
            return f"{amount / size:.3g} {unit}"
    return f"{amount} B"


def parse_memory(value: Any, option: str = "memory") -> int:
    """Parse a memory amount (``"8GB"``, ``"512 MiB"``, or a number of bytes) into bytes.

    Raises
    ------
    OptionError
        If ``value`` is not a positive amount of memory.

    """
    allowed = "a positive amount such as '8GB', '512MiB', '1.5 TB' or a number of bytes"
    if isinstance(value, bool):
        raise OptionError(f"{option}={value!r} is not an amount of memory; use {allowed}")
    if isinstance(value, (int, float)):
        amount = int(value)
    elif isinstance(value, str):
        try:
            amount = parse_bytes(value.strip())
        except (ValueError, TypeError, KeyError):
            raise OptionError(
                f"{option}={value!r} is not an amount of memory; use {allowed}"
            ) from None
    else:
        raise OptionError(f"{option}={value!r} is not an amount of memory; use {allowed}")
    if amount <= 0:
        raise OptionError(f"{option}={value!r} must be greater than 0; use {allowed}")
    return amount


def parse_walltime(value: Any, option: str = "walltime") -> int:
    """Parse a walltime into seconds.

    Accepts ``"HH:MM:SS"``, ``"MM:SS"``, ``"D-HH[:MM[:SS]]"`` (as SLURM and PBS read them; hours
    may exceed 23), a :class:`datetime.timedelta`, or a number of seconds.

    Raises
    ------
    OptionError
        If ``value`` is not one of these forms or not positive.

    """
    allowed = (
        "'HH:MM:SS', 'MM:SS' or 'D-HH:MM:SS' (e.g. '25:00:00' or '1-01:00:00'), "
        "a number of seconds, or a datetime.timedelta"
    )
    if isinstance(value, bool):
        raise OptionError(f"{option}={value!r} is not a duration; use {allowed}")
    if isinstance(value, timedelta):
        seconds = int(value.total_seconds())
    elif isinstance(value, (int, float)):
        seconds = int(value)
    elif isinstance(value, str):
        seconds = _parse_walltime_text(value.strip())
        if seconds is None:
            raise OptionError(f"{option}={value!r} is not a duration; use {allowed}")
    else:
        raise OptionError(f"{option}={value!r} is not a duration; use {allowed}")
    if seconds <= 0:
        raise OptionError(f"{option}={value!r} must be longer than 0 seconds; use {allowed}")
    return seconds


def parse_timeout(value: Any, option: str) -> float | None:
    """Parse an optional time limit into seconds; ``None`` means no limit.

    Accepts a number of seconds (``90``, ``2.5``), the batch-system durations that
    :func:`parse_walltime` reads (``"00:10:00"``, ``"10:00"``, ``"1-00:00:00"``) or a
    :class:`datetime.timedelta`.

    Raises
    ------
    OptionError
        Naming ``option`` and the value, if it is none of these or not longer than 0 seconds.

    """
    if value is None:
        return None
    allowed = (
        "a number of seconds > 0, 'HH:MM:SS', 'MM:SS' or 'D-HH:MM:SS' (e.g. '00:10:00'), "
        "a datetime.timedelta, or None for no limit"
    )
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_walltime_text(value.strip())
    else:
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise OptionError(f"{option}={value!r} is not allowed; {option} must be {allowed}")
    return float(seconds)


def format_walltime(seconds: int) -> str:
    """Format seconds as ``HH:MM:SS`` (hours may exceed 23)."""
    hours, remainder = divmod(int(seconds), 3600)
    minutes, seconds = divmod(remainder, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def _refused(name: str, value: Any, allowed: str) -> OptionError:
    return OptionError(f"{name}={value!r} is not allowed; {name} must be {allowed}")


def check_whole_number(name: str, value: Any, smallest: int) -> int:
    """``value`` if it is an integer of at least ``smallest``, else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
        raise _refused(name, value, f"an integer >= {smallest}")
    return value


def check_boolean(name: str, value: Any) -> bool:
    """``value`` if it is True or False."""
    if not isinstance(value, bool):
        raise _refused(name, value, "True or False")
    return value


def check_number(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number of seconds > 0."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise _refused(name, value, "a number of seconds > 0")
    return float(value)


def check_text(name: str, value: Any) -> str:
    """``value`` stripped, if it is a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise _refused(name, value, "a non-empty string")
    return value.strip()


def check_text_list(name: str, value: Any) -> list[str]:
    """``value`` as a list, if it is a list or tuple of strings (one line each)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise OptionError(
            f"{name}={value!r} is not allowed; {name} must be a list of strings, one per line "
            f"(e.g. {name}=[{value!r}])"
        )
    for item in value:
        if not isinstance(item, str):
            raise OptionError(
                f"{name}={value!r} is not allowed; item {item!r} is not a string"
            )
    return list(value)


def check_environment(name: str, value: Any) -> dict[str, str]:
    """``value`` as environment variables: names to strings (numbers become strings)."""
    if not isinstance(value, Mapping):
        raise _refused(name, value, "a dict of str to str")
    environment = {}
    for key, item in value.items():
        if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise OptionError(
                f"{name}={value!r} is not allowed; {key!r} is not an environment variable name"
            )
        if not isinstance(item, (str, int, float)) or isinstance(item, bool):
            raise OptionError(
                f"{name}={value!r} is not allowed; the value of {key} must be a string or number"
            )
        environment[key] = str(item)
    return environment


def check_log_dir(value: Any) -> Path:
    """``log_dir`` as a path (the directory is made later, after every other check)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise _refused("log_dir", value, "a path")
    return Path(value).expanduser()


def check_store(value: Any) -> str | None:
    """``store`` checked: None, a directory path, or an ``fsspec`` URL whose scheme is known."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise _refused("store", value, "a directory path or an fsspec URL such as "
                       "'s3://bucket/prefix'")
    text = os.fspath(value)
    if "://" in text and not text.startswith("file://"):
        import fsspec

        protocol = text.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as error:
            raise OptionError(
                f"store={text!r} is not allowed; its scheme {protocol!r} has no fsspec "
                f"filesystem here ({error})"
            ) from None
    elif Path(text).expanduser().exists() and not Path(text).expanduser().is_dir():
        raise OptionError(f"store={text!r} is not allowed; it is a file, and a store is a "
                          "directory")
    return text


def check_max_workers(value: Any) -> int | None:
    """``max_workers`` as given, checked: None or a positive integer.

    The message for a number <= 0 is the standard library's own.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(
            f"max_workers={value!r} is not allowed; max_workers must be an integer greater than 0"
            f" (got a {type(value).__name__})"
        )
    if value <= 0:
        raise OptionError("max_workers must be greater than 0")
    return value


def check_dashboard_address(value: Any) -> str:
    """A dashboard address ``host:port``, ``:port`` or a port number, checked before any start."""
    allowed = "'host:port', ':port' or a port number (0 picks a free port), e.g. 'localhost:8787'"
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"dashboard_address={value!r} is not allowed; use {allowed}")
    host, separator, port = value.strip().rpartition(":")
    if not separator or not port.isdigit() or int(port) > 65535:
        raise OptionError(f"dashboard_address={value!r} is not allowed; use {allowed}")
    bare_host = host.strip("[]")
    if bare_host:
        try:
            socket.getaddrinfo(bare_host, None)
        except (socket.gaierror, UnicodeError) as error:
            raise OptionError(
                f"dashboard_address={value!r} is not allowed: the host {bare_host!r} is not "
                f"known here ({error}); use {allowed}"
            ) from None
    return value.strip()


@dataclass(frozen=True)
class ResourceOptions:
    """The common resource options, validated and normalized.

    Attributes
    ----------
    cores : int or None
        Cores per job (batch) or threads per worker process (local).
    memory : str or None
        Memory per job as given (``"8GB"``); ``memory_bytes`` holds the parsed amount.
    walltime : str or None
        ``HH:MM:SS``; ``walltime_seconds`` holds the parsed duration.
    queue, account : str or None
        Batch queue (partition) and account to charge.
    processes : int or None
        Worker processes per job.
    job_extra : list of str
        Extra scheduler directives, one per item.
    prologue : list of str
        Shell lines run before the worker starts.
    env : dict of str to str
        Environment variables for the workers.
    python : str or None
        Interpreter on the compute side.
    log_dir : pathlib.Path or None
        Where each run's directory of job scripts and logs goes.

    """

    cores: int | None = None
    memory: str | None = None
    memory_bytes: int | None = None
    walltime: str | None = None
    walltime_seconds: int | None = None
    queue: str | None = None
    account: str | None = None
    processes: int | None = None
    job_extra: list[str] = field(default_factory=list)
    prologue: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None
    log_dir: Path | None = None

    def given(self) -> dict[str, Any]:
        """Return the options that were set (without the derived bytes and seconds)."""
        derived = {"memory_bytes", "walltime_seconds"}
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name not in derived and value not in (None, [], {}):
                values[item.name] = value
        return values


def parse_resources(options: Mapping[str, Any]) -> ResourceOptions:
    """Validate the common options in ``options`` (other keys are ignored here).

    Raises
    ------
    OptionError
        Naming the first bad option, its value and what is allowed.

    """
    values: dict[str, Any] = {}
    if options.get("cores") is not None:
        values["cores"] = check_whole_number("cores", options["cores"], 1)
    if options.get("processes") is not None:
        values["processes"] = check_whole_number("processes", options["processes"], 1)
        if values.get("cores") and values["processes"] > values["cores"]:
            raise OptionError(
                f"processes={values['processes']} is not allowed with cores={values['cores']}; "
                "processes must be at most cores (each process gets cores // processes threads)"
            )
    if options.get("memory") is not None:
        values["memory_bytes"] = parse_memory(options["memory"])
        memory = options["memory"]
        values["memory"] = memory.strip() if isinstance(memory, str) else f"{int(memory)}B"
    if options.get("walltime") is not None:
        values["walltime_seconds"] = parse_walltime(options["walltime"])
        values["walltime"] = format_walltime(values["walltime_seconds"])
    for name in ("queue", "account", "python"):
        if options.get(name) is not None:
            values[name] = check_text(name, options[name])
    for name in ("job_extra", "prologue"):
        if options.get(name) is not None:
            values[name] = check_text_list(name, options[name])
    if options.get("env") is not None:
        values["env"] = check_environment("env", options["env"])
    if options.get("log_dir") is not None:
        values["log_dir"] = check_log_dir(options["log_dir"])
    return ResourceOptions(**values)


def profile_options(profile: str | None) -> dict[str, Any]:
    """Return the options of a named profile from dask config (``futures_hpc.profiles.<name>``).

    Without an explicit ``profile`` the config key ``futures_hpc.profile`` names the default one.

    Raises
    ------
    OptionError
        If the profile does not exist; the message lists the defined profiles.

    """
    if profile is None:
        profile = dask.config.get("futures_hpc.profile", default=None)
        if profile is None:
            return {}
    profiles = dask.config.get("futures_hpc.profiles", default={}) or {}
    if profile not in profiles:
        defined = ", ".join(sorted(profiles)) or "none are defined"
        suggestion = closest_name(str(profile), profiles)
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        raise OptionError(
            f"profile={profile!r} is not defined in dask config 'futures_hpc.profiles'.{hint} "
            f"Defined profiles: {defined}."
        )
    options = dict(profiles[profile] or {})
    # dask config normalizes '_' and '-' in keys; options use Python names.
    return {key.replace("-", "_"): value for key, value in options.items()}


def merge_with_profile(profile: str | None, explicit: Mapping[str, Any]) -> dict[str, Any]:
    """Options of the profile, overridden by the explicit ones (``None`` counts as not given)."""
    merged = profile_options(profile)
    merged.pop("backend", None)
    merged.update({key: value for key, value in explicit.items() if value is not None})
    return merged


def make_run_directory(given: Path | None, run_name: str) -> Path:
    """Make and return the run's directory ``<log_dir>/<run_name>`` (absolute).

    ``given`` is the ``log_dir`` option; without it, the config key ``futures_hpc.log-dir``
    (default ``futures_hpc-logs``).

    Raises
    ------
    OptionError
        If the directory cannot be made (naming ``log_dir`` and the reason).

    """
    base = given or Path(dask.config.get("futures_hpc.log-dir", None) or "futures_hpc-logs")
    directory = (base / run_name).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        option = "log_dir" if given else "the config key futures_hpc.log-dir"
        raise OptionError(
            f"{option}={str(base)!r} cannot hold this run's directory {directory}: "
            f"{error.strerror or error}; give a writable directory (on a file system "
            "the workers share, for batch backends)"
        ) from None
    return directory
