"""A batch backend written outside futures_hpc, registered through a real entry point.

The backend is one module, as ``docs/backends/writing-a-backend.md`` describes: a
``BatchSystem`` written from the contract alone (its own queue reading, listing and detection)
over dask-jobqueue's ``SLURMCluster``, and its executor. It is installed the way pip installs a
package, as a module plus a ``*.dist-info`` directory with ``entry_points.txt`` in a directory
on ``sys.path``, so the registry finds it through ``importlib.metadata`` like any third-party
backend. Its workers are real jobs of the SLURM that ci/slurm.sh starts.

The whole shared executor suite (``tests/executor_suite.py``) runs on it, about a minute here.
"""

from __future__ import annotations

import getpass
import importlib
import shutil
import sys
import textwrap

import pytest

from conftest import require
from futures_hpc import HPCExecutor, available_backends
from futures_hpc.backends import detect_backend, load_backend, registered_backends
from tests.backends.batch_helpers import SMALL_WORKERS, wait_for_workers
from tests.executor_suite import *  # noqa: F403 - the shared executor suite, all of it

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

BACKEND_NAME = "outside-slurm"

#: The whole backend: one module, written against futures_hpc.backends.batch.system's contract.
OUTSIDE_MODULE = '''
"""SLURM as a futures_hpc batch backend defined outside futures_hpc."""

from __future__ import annotations

import shutil
from typing import Any

from futures_hpc.backends.batch.commands import read_command, run_command
from futures_hpc.backends.batch.executor import JobQueueExecutor, batch_provider
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
    provider = batch_provider(SYSTEM, "outside-slurm")
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
    """The suite's executor: 2 jobs kept between tests (min_workers), as the suite counts them."""
    with HPCExecutor(BACKEND_NAME, max_workers=2, min_workers=2, **SMALL_WORKERS) as executor:
        wait_for_workers(executor, 2)
        yield executor


@pytest.fixture
def make_executor(outside_backend):
    def make():
        executor = HPCExecutor(BACKEND_NAME, max_workers=2, min_workers=2, **SMALL_WORKERS)
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
    listed = outside_backend.system.list_user_jobs(getpass.getuser())
    assert set(ex.job_ids()) <= {job.job_id for job in listed}
    # Auto-detection covers the built-in systems only: an outside backend is chosen by name.
    assert detect_backend()[0] != BACKEND_NAME


def test_former_module_still_exports_the_batch_executors():
    from futures_hpc.backends import jobqueue
    from futures_hpc.backends.batch import pbs, sge, slurm

    assert (jobqueue.SLURMExecutor, jobqueue.PBSExecutor, jobqueue.SGEExecutor) == (
        slurm.SLURMExecutor, pbs.PBSExecutor, sge.SGEExecutor)
