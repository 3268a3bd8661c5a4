"""The option table: each option is checked once, on every backend, and does what its row says."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from futures_hpc import HPCExecutor
from futures_hpc.errors import OptionError
from futures_hpc.option_table import (
    OPTIONS,
    check_options,
    options_markdown,
    split_options,
)

BACKENDS = ("local", "slurm", "pbs", "sge", "mpi", "ecs")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _example(option):
    return ast.literal_eval(option.example)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_value_is_refused_on_every_backend_even_one_that_ignores_it(option, backend):
    with pytest.raises(OptionError) as raised:
        check_options(backend, {option.name: object()})
    assert f"{option.name}=" in str(raised.value) or option.name in str(raised.value)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_good_value_is_read_ignored_or_refused_as_the_table_says(option, backend):
    given = {option.name: _example(option)}
    if backend in option.refused_on:
        with pytest.raises(OptionError, match=f"{option.name}=.*{backend}"):
            check_options(backend, given)
        return
    ignored = check_options(backend, given)
    if backend in option.ignored_on:
        assert ignored == {option.name: option.ignored_on[backend]}
    else:
        assert ignored == {}


def test_every_table_option_is_accepted_by_every_backend_split():
    names = {option.name: _example(option) for option in OPTIONS}
    executor, common, backend = split_options(names, frozenset(), "local")
    assert set(executor) | set(common) == set(names)
    assert backend == {}


def test_an_unknown_option_is_named_with_a_suggestion():
    with pytest.raises(OptionError, match=r"unknown option idle_timout=5 .*'idle_timeout'"):
        split_options({"idle_timout": 5}, frozenset(), "local")


def test_a_negative_idle_timeout_is_refused_on_the_local_backend_before_anything_starts():
    with pytest.raises(OptionError, match=r"idle_timeout=-5 .*seconds > 0"):
        HPCExecutor("local", idle_timeout=-5)


def test_a_refused_option_stops_the_local_backend_before_it_starts():
    with pytest.raises(OptionError, match=r"python='/opt/venv/bin/python' .*local.*interpreter"):
        HPCExecutor("local", python="/opt/venv/bin/python")


def test_the_local_backend_logs_each_option_it_ignores_with_why(caplog):
    ignored = {option.name: _example(option) for option in OPTIONS
               if "local" in option.ignored_on}
    ignored["min_workers"] = 0  # at most max_workers
    with caplog.at_level(logging.INFO, logger="futures_hpc"):
        with HPCExecutor("local", max_workers=1, **ignored) as executor:
            assert executor.submit(abs, -3).result(timeout=60) == 3
    line = next(record.getMessage() for record in caplog.records
                if "local backend ignores" in record.getMessage())
    for name in ignored:
        assert name in line
    assert "its workers are fixed" in line
    assert "it submits no batch jobs" in line


def test_the_docs_show_the_table_as_the_code_has_it():
    assert options_markdown() in DOCS.read_text(), (
        "docs/configuration.md's option table differs from futures_hpc.option_table: paste "
        "options_markdown() between its option-table markers"
    )
