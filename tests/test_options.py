"""Option parsing and validation: every bad option fails before anything starts, named."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import dask.config
import pytest

from futures_hpc import HPCExecutor, LocalExecutor, OptionError
from futures_hpc.errors import CallSerializationError
from futures_hpc.options import (
    format_walltime,
    merge_with_profile,
    parse_memory,
    parse_resources,
    parse_timeout,
    parse_walltime,
)
from futures_hpc.scaling import validate_scaling_options


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"memory": "12 parsecs"}, "memory='12 parsecs'"),
        ({"walltime": "25 hours"}, "walltime='25 hours'"),
        ({"walltime": "01:75:00"}, "walltime='01:75:00'"),
        ({"walltime": "90"}, "walltime='90'"),
        ({"cores": 0}, "cores=0"),
        ({"cores": 2.5}, "cores=2.5"),
        ({"processes": 4, "cores": 2}, "processes=4"),
        ({"job_extra": "--exclusive"}, "job_extra='--exclusive'"),
        ({"env": {"1BAD": "x"}}, "'1BAD'"),
        ({"memory": -5}, "memory=-5"),
        ({"queue": ""}, "queue=''"),
    ],
)
def test_bad_common_options_name_the_option_and_value(options, named):
    with pytest.raises(ValueError) as caught:
        parse_resources(options)
    assert isinstance(caught.value, OptionError)
    assert named in str(caught.value)


def test_memory_error_says_what_is_allowed():
    with pytest.raises(OptionError, match="'8GB'"):
        parse_memory("12 parsecs")


def test_walltime_error_says_what_is_allowed():
    with pytest.raises(OptionError, match="HH:MM:SS"):
        parse_walltime("25 hours")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("01:00:00", 3600),
        ("25:00:00", 90000),
        ("1-01:00:00", 90000),
        ("30:00", 1800),
        ("2-00", 172800),
        (timedelta(minutes=90), 5400),
        (120, 120),
    ],
)
def test_walltime_forms(value, seconds):
    assert parse_walltime(value) == seconds


def test_walltime_is_normalized():
    resources = parse_resources({"walltime": "1-00:00:30", "memory": "8GB"})
    assert resources.walltime == "24:00:30" == format_walltime(resources.walltime_seconds)
    assert resources.memory == "8GB" and resources.memory_bytes == 8_000_000_000


def test_max_workers_must_be_positive():
    for value in (0, -1):
        with pytest.raises(ValueError, match="^max_workers must be greater than 0$"):
            LocalExecutor(max_workers=value)


def test_unknown_option_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"walltim.*Did you mean 'walltime'"):
        HPCExecutor("local", walltim="01:00:00")


def test_bad_option_fails_before_any_process_starts():
    import psutil

    before = set(child.pid for child in psutil.Process().children(recursive=True))
    with pytest.raises(ValueError, match="memory"):
        HPCExecutor("local", max_workers=2, memory="12 parsecs")
    after = set(child.pid for child in psutil.Process().children(recursive=True))
    assert after == before


def test_profiles_from_dask_config_with_explicit_override():
    profiles = {"short": {"queue": "short", "cores": 4, "memory": "8GB", "backend": "slurm"}}
    with dask.config.set({"futures_hpc.profiles": profiles}):
        merged = merge_with_profile("short", {"cores": 2, "memory": None})
    assert merged == {"queue": "short", "cores": 2, "memory": "8GB"}


def test_unknown_profile_lists_the_defined_ones():
    with dask.config.set({"futures_hpc.profiles": {"short": {"cores": 1}}}):
        with pytest.raises(OptionError, match="Did you mean 'short'.*Defined profiles: short"):
            merge_with_profile("shrt", {})


def test_default_profile_from_config_key():
    with dask.config.set(
        {"futures_hpc.profiles": {"tiny": {"cores": 1}}, "futures_hpc.profile": "tiny"}
    ):
        assert merge_with_profile(None, {}) == {"cores": 1}


def test_profile_options_reach_a_real_executor():
    with dask.config.set({"futures_hpc.profiles": {"two": {"max_workers": 2, "cores": 1}}}):
        with HPCExecutor("local", profile="two") as executor:
            assert executor.max_workers == 2
            assert len(executor.client.scheduler_info()["workers"]) == 2


# -- issue 12, item 7 and 8: the keyword backend, and clear errors before anything starts --------


def _child_processes() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_backend_is_accepted_as_a_keyword(monkeypatch, tmp_path):
    # A batch system on PATH must not matter when the backend is named, by keyword or position.
    fake_sbatch = tmp_path / "sbatch"
    fake_sbatch.write_text("#!/bin/sh\nexit 1\n")
    fake_sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with HPCExecutor(backend="local", max_workers=1) as executor:
        assert type(executor) is LocalExecutor
        assert executor.submit(pow, 2, 5).result(timeout=60) == 32
    with LocalExecutor(backend="local", max_workers=1) as executor:
        assert executor.backend_name == "local"


def test_backend_given_twice_is_a_type_error():
    before = _child_processes()
    with pytest.raises(TypeError, match="backend"):
        HPCExecutor("local", backend="local")
    assert _child_processes() == before


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"idle_timeout": -5}, "idle_timeout=-5"),
        ({"max_pending_jobs": 0}, "max_pending_jobs=0"),
        ({"min_workers": -1}, "min_workers=-1"),
        ({"adaptive": "yes"}, "adaptive='yes'"),
        ({"max_workers": "2"}, "max_workers='2'"),
        ({"max_workers": 2.5}, "max_workers=2.5"),
        ({"dashboard_address": "localhost:http"}, "dashboard_address='localhost:http'"),
        ({"dashboard_address": "no-such-host.invalid:0"}, "dashboard_address="),
        ({"import_path": "/tmp"}, "import_path='/tmp'"),
    ],
)
def test_bad_values_name_the_option_on_the_local_backend(options, named):
    before = _child_processes()
    with pytest.raises(OptionError) as raised:
        HPCExecutor("local", **options)
    assert named in str(raised.value)
    assert _child_processes() == before


def test_scaling_options_are_logged_as_ignored_on_the_local_backend(caplog):
    with caplog.at_level(logging.INFO, logger="futures_hpc"):
        with HPCExecutor("local", max_workers=1, idle_timeout=30) as executor:
            assert executor.submit(abs, -3).result(timeout=60) == 3
    assert "ignores the scaling options idle_timeout" in caplog.text


def test_a_log_dir_that_cannot_be_made_is_an_option_error(tmp_path):
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    before = _child_processes()
    with pytest.raises(OptionError, match=r"^log_dir=.*a-file.*cannot hold"):
        HPCExecutor("local", max_workers=1, log_dir=not_a_directory)
    assert _child_processes() == before


def test_a_function_that_cannot_be_pickled_is_named():
    import threading

    lock = threading.Lock()

    def holds_a_lock(value):
        with lock:
            return value

    with HPCExecutor("local", max_workers=1) as executor:
        with pytest.raises(CallSerializationError, match=r"holds_a_lock\(1\).*cannot be pickled"):
            executor.submit(holds_a_lock, 1)
        with pytest.raises(TypeError, match=r"function .*holds_a_lock.*cannot be pickled"):
            list(executor.map(holds_a_lock, [1, 2]))
        with pytest.raises(CallSerializationError, match=r"chunk of calls of .*abs.* starting"):
            list(executor.map(abs, [lock]))
        assert executor.submit(abs, -1).result(timeout=60) == 1  # still usable


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (30, 30.0), (2.5, 2.5), ("10:00", 600.0), ("00:00:45", 45.0),
     ("1-00:00:00", 86400.0), (timedelta(minutes=2), 120.0)],
)
def test_start_timeout_forms(value, seconds):
    assert parse_timeout(value, "start_timeout") == seconds
    assert validate_scaling_options({"start_timeout": value}, 1).start_timeout == seconds


@pytest.mark.parametrize(
    "value", [0, -5, "soon", "30", "", True, float("nan"), float("inf"), [10], timedelta(0)]
)
def test_bad_start_timeout_names_the_option_value_and_what_is_allowed(value):
    with pytest.raises(OptionError) as caught:
        validate_scaling_options({"start_timeout": value}, 1)
    message = str(caught.value)
    assert f"start_timeout={value!r} is not allowed" in message
    assert "a number of seconds > 0, 'HH:MM:SS'" in message
    assert "None for no limit" in message
