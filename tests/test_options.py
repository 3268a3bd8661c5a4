"""Option parsing and validation: every bad option fails before anything starts, named."""

from __future__ import annotations

from datetime import timedelta

import dask.config
import pytest

from futures_hpc import HPCExecutor, LocalExecutor, OptionError
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
