"""A batch backend written outside futures_hpc, registered through a real entry point.

The backend is one module, as ``docs/backends/writing-a-backend.md`` describes: a
``BatchSystem`` written from the contract alone (its own queue reading, listing and detection)
over dask-jobqueue's ``SLURMCluster``, and its executor. It is installed the way pip installs a
package, as a module plus a ``*.dist-info`` directory with ``entry_points.txt`` in a directory
on ``sys.path``, so the registry finds it through ``importlib.metadata`` like any third-party
backend. Its workers are real jobs of the SLURM that ci/slurm.sh starts.

The shared executor suite runs on it, minus the tests that measure scheduling behaviour or
start several executors (they are the same code as on ``slurm``, and slow there):
see ``OUTSIDE_SUITE``.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import textwrap

import pytest

from conftest import require
from futures_hpc import HPCExecutor, available_backends
from futures_hpc.backends import detect_backend, load_backend, registered_backends
from tests.backends.batch_helpers import SMALL_WORKERS, wait_for_workers
from tests.executor_suite import (  # noqa: F401 - the shared executor suite, a subset
    test_a_failed_dependency_fails_the_call_with_it_as_the_cause,
    test_as_completed_and_wait,
    test_callbacks_run_once_on_completion,
    test_calls_are_never_merged_or_cached,
    test_cancel_pending_but_not_running,
    test_futures_as_arguments_chain_and_diamond,
    test_keyword_arguments_named_fn_and_self_reach_the_function,
    test_large_numpy_argument,
    test_map_keeps_input_order,
    test_map_of_nothing,
    test_map_raises_at_the_first_failing_call_after_the_results_before_it,
    test_map_several_iterables_stops_at_the_shortest,
    test_remote_exception_keeps_its_type_and_traceback,
    test_result_timeout,
    test_shutdown_waits_for_accepted_work,
    test_submit_after_shutdown_raises,
    test_submit_returns_standard_future,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

#: The names of the suite's tests run here (the others are covered on ``slurm``).
OUTSIDE_SUITE = sorted(name for name in dir() if name.startswith("test_") and "outside" not in name)

BACKEND_NAME = "outside-slurm"

#: The whole backend: one module, written against futures_hpc.backends.batch.system's contract.
OUTSIDE_MODULE = '''
"""SLURM as a futures_hpc batch backend defined outside futures_hpc."""

from __future__ import annotations

import shutil
from typing import Any

from futures_hpc.backends.batch.commands import read_command, run_command
from futures_hpc.backends.batch.executor import JobQueueExecutor
from futures_hpc.backends.batch.jobs import QueueState
from futures_hpc.backends.batch.system import JOB_NAME_PREFIX, BatchSystem, QueuedJob

OVER = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "PREEMPTED", "BOOT_FAIL", "DEADLINE", "gone")


class OutsideSystem(BatchSystem):
    name = "outside-slurm"
    title = "SLURM (outside)"
    jobqueue_cluster = "SLURMCluster"
    submit_command = "sbatch"
    query_command = "squeue"
    cancel_command = "scancel"
    unused_jobqueue_parameters = frozenset({"project"})

    def detect(self):
        return "found squeue" if shutil.which("squeue") else None

    def query_job_states(self, job_ids, memory: dict[str, Any]):
        result = run_command(["squeue", "-h", "--states=all", f"--jobs={','.join(job_ids)}",
                              "--format=%i %T %r"])
        if result is None or result.returncode != 0:
            return None
        listed = {}
        for line in result.stdout.splitlines():
            job_id, state, reason = ([*line.split(maxsplit=2), "", ""])[:3]
            listed[job_id] = QueueState(state, reason.strip() or None)
        return {job_id: listed.get(job_id, QueueState("gone")) for job_id in job_ids}

    def state_is_active(self, state):
        return state.split()[0].rstrip("+") not in OVER

    def list_user_jobs(self, user):
        output = read_command(["squeue", "-h", "-u", user, "-o", "%i|%j|%T"])
        rows = (line.split("|") for line in output.splitlines())
        return [QueuedJob(self.name, job_id, name, state) for job_id, name, state in rows
                if name.startswith(JOB_NAME_PREFIX)]


SYSTEM = OutsideSystem()


class OutsideExecutor(JobQueueExecutor):
    backend_name = "outside-slurm"
    system = SYSTEM
'''


@pytest.fixture(scope="module")
def outside_backend(tmp_path_factory):
    """The backend installed into a fresh directory put on sys.path, as pip would."""
    require(shutil.which("sbatch") is not None, "no sbatch: the real SLURM is not running here")
    site = tmp_path_factory.mktemp("site-packages")
    (site / "outside_backend.py").write_text(textwrap.dedent(OUTSIDE_MODULE))
    dist_info = site / "outside_backend-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: outside-backend\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[futures_hpc.backends]\n{BACKEND_NAME} = outside_backend:OutsideExecutor\n"
    )
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()  # importlib.metadata and the finders see the new directory
    try:
        yield load_backend(BACKEND_NAME)
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("outside_backend", None)
        importlib.invalidate_caches()


@pytest.fixture(scope="module")
def ex(outside_backend):
    with HPCExecutor(BACKEND_NAME, max_workers=2, **SMALL_WORKERS) as executor:
        wait_for_workers(executor, 2)
        yield executor


@pytest.fixture
def make_executor(outside_backend):
    def make():
        executor = HPCExecutor(BACKEND_NAME, max_workers=2, **SMALL_WORKERS)
        wait_for_workers(executor, 2)
        return executor

    return make


def test_outside_backend_is_registered_through_its_entry_point(outside_backend, ex):
    assert registered_backends()[BACKEND_NAME] == "outside_backend:OutsideExecutor"
    assert outside_backend.__module__ == "outside_backend"
    assert type(ex) is outside_backend
    info = {backend.name: backend for backend in available_backends()}[BACKEND_NAME]
    assert info.available, info.reason
    # Its jobs are real SLURM jobs, named after the run, read through its own system module.
    states = ex._query_job_states(ex.job_ids())
    assert states and all(state.state == "RUNNING" for state in states.values())
    listed = outside_backend.system.list_user_jobs(__import__("getpass").getuser())
    assert set(ex.job_ids()) <= {job.job_id for job in listed}
    # Auto-detection covers the built-in systems only: an outside backend is chosen by name.
    assert detect_backend()[0] != BACKEND_NAME


def test_outside_suite_is_a_real_subset():
    assert len(OUTSIDE_SUITE) == 17
