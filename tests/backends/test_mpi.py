"""The MPI backend on real OpenMPI (and SLURM for the sbatch tests).

Two modes:

- under ``mpirun``: scripts in ``mpi_scripts/`` run as ``mpirun -n N python script.py`` in a
  subprocess, and the tests check the exit status and what each rank wrote: the shared executor
  suite on rank 0 of ``mpirun -n 4``, the layout (scheduler in the client's process, a worker on
  every other rank), a normal end, an exception on the client rank, the smallest world, ranks
  that each see a world of 1, and ``mpirun`` inside an ``sbatch`` job;
- launched from this process: the shared executor suite runs here on ``MPIExecutor(max_workers=3)``
  (the ``ex`` fixture), plus tests of the launched ranks' life cycle.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import psutil
import pytest

from conftest import command_available, require
from futures_hpc import HPCExecutor
from futures_hpc.backends.mpi import MPIExecutor
from futures_hpc.errors import BackendUnavailableError, OptionError
from tests.executor_suite import *  # noqa: F403 - the shared executor suite

pytestmark = pytest.mark.mpi
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SCRIPTS = Path(__file__).with_name("mpi_scripts")
REPOSITORY = Path(__file__).resolve().parents[2]
ROOT_VARIABLES = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _mpi4py_importable() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def _need_openmpi():
    require(command_available("mpirun"), "mpirun is not on PATH (run ci/openmpi.sh)")
    require(_mpi4py_importable(), "mpi4py is not installed")


# -- running scripts under mpirun ---------------------------------------------------------------


@dataclass
class MpirunOutcome:
    """What an mpirun (or sbatch) subprocess left: its exit status, output and duration."""

    returncode: int
    output: str
    seconds: float


def _processes_mentioning(marker: str) -> list[psutil.Process]:
    """Live processes whose command line contains ``marker`` (a test's own tmp_path)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(process.info["cmdline"] or ()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=10)


def _subprocess_environment(tmp_path: Path) -> dict[str, str]:
    return dict(
        os.environ,
        **ROOT_VARIABLES,
        DASK_FUTURES_HPC__LOG_DIR=str(tmp_path / "logs"),
        DASK_FUTURES_HPC__DASHBOARD_ADDRESS="localhost:0",
    )


def run_under_mpirun(
    ranks: int, script: str | Path, *arguments: str, tmp_path: Path, timeout: float = 120
) -> MpirunOutcome:
    """Run ``mpirun -n ranks python script tmp_path arguments``; leave no process behind.

    ``script`` is a path, or the name of a script in ``mpi_scripts/``. The output goes to a file
    (a pipe could fill and stall the ranks). On timeout the whole process tree is killed and the
    test fails with the output so far.
    """
    script = SCRIPTS / script if isinstance(script, str) else script
    command = [
        shutil.which("mpirun"), "--oversubscribe", "-n", str(ranks),
        sys.executable, str(script), str(tmp_path), *arguments,
    ]
    log_path = tmp_path / f"mpirun-{script.name}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=_subprocess_environment(tmp_path),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_all([psutil.Process(process.pid), *_processes_mentioning(str(tmp_path))])
            process.wait(10)
            pytest.fail(f"{command} did not end within {timeout} s:\n{log_path.read_text()}")
    seconds = time.monotonic() - started
    leftovers = _processes_mentioning(str(tmp_path))
    _kill_all(leftovers)
    assert leftovers == [], f"processes left behind by mpirun: {leftovers}"
    return MpirunOutcome(returncode, log_path.read_text(errors="replace"), seconds)


def test_executor_suite_under_mpirun_with_4_ranks(tmp_path):
    junit = tmp_path / "suite.xml"
    outcome = run_under_mpirun(
        4, "run_suite.py", "--junitxml", str(junit), "--timeout", "120", "--color", "no",
        "-q", tmp_path=tmp_path, timeout=600,
    )
    assert junit.exists(), f"pytest did not run on rank 0:\n{outcome.output}"
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    counts = {name: int(suite.get(name)) for name in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 30, counts
    assert (counts["failures"], counts["errors"], counts["skipped"]) == (0, 0, 0), outcome.output
    assert outcome.returncode == 0, outcome.output


def test_normal_end_exits_every_rank_with_0(tmp_path):
    outcome = run_under_mpirun(4, "client_script.py", "ok", tmp_path=tmp_path)
    assert outcome.returncode == 0, outcome.output
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["executor"] == "MPIExecutor"  # HPCExecutor() chose MPI by itself
    assert [square for square, _ in written["results"]] == [number**2 for number in range(20)]
    assert {rank for _, rank in written["results"]} <= {"1", "2", "3"}
    assert {path.name: path.read_text() for path in tmp_path.glob("rank-*.exit")} == {
        "rank-1.exit": "0", "rank-2.exit": "0", "rank-3.exit": "0"
    }


def test_three_ranks_give_two_workers_and_the_scheduler_runs_in_the_clients_process(tmp_path):
    outcome = run_under_mpirun(3, "client_script.py", "layout", tmp_path=tmp_path, timeout=60)
    assert outcome.returncode == 0, outcome.output
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert layout["client rank"] == "0"
    assert layout["scheduler pid"] == layout["client pid"]
    assert layout["scheduler in this process"] is True
    assert layout["scheduler address"].startswith("tls://")  # TLS by default
    assert [rank for rank, _ in layout["workers"]] == ["1", "2"]
    assert layout["client pid"] not in {pid for _, pid in layout["workers"]}
    assert layout["status workers"] == 2
    assert layout["worker tick periods"] == [200, 200]  # futures_hpc.dask_settings
    assert {path.name: path.read_text() for path in tmp_path.glob("rank-*.exit")} == {
        "rank-1.exit": "0", "rank-2.exit": "0"
    }


def test_exception_on_the_client_rank_ends_every_rank_nonzero_within_30_s(tmp_path):
    outcome = run_under_mpirun(4, "client_script.py", "raise", tmp_path=tmp_path, timeout=60)
    assert outcome.returncode != 0
    assert "ValueError: the client failed on purpose" in outcome.output
    assert (tmp_path / "results.json").exists(), "the work before the exception must have run"
    assert {path.name: path.read_text() for path in tmp_path.glob("rank-*.exit")} == {
        "rank-1.exit": "1", "rank-2.exit": "1", "rank-3.exit": "1"
    }, outcome.output
    assert outcome.seconds < 30, f"took {outcome.seconds:.1f} s"


def test_explicit_mpi_finalize_on_the_client_rank_ends_every_rank(tmp_path):
    outcome = run_under_mpirun(3, "client_script.py", "finalize", tmp_path=tmp_path, timeout=60)
    assert outcome.returncode == 0, outcome.output
    assert (tmp_path / "results.json").exists()
    assert {path.name: path.read_text() for path in tmp_path.glob("rank-*.exit")} == {
        "rank-1.exit": "0", "rank-2.exit": "0"
    }


def test_two_ranks_are_enough_one_client_and_scheduler_one_worker(tmp_path):
    outcome = run_under_mpirun(2, "client_script.py", "ok", tmp_path=tmp_path, timeout=60)
    assert outcome.returncode == 0, outcome.output
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["results"] == [[number**2, "1"] for number in range(20)]
    assert {path.name: path.read_text() for path in tmp_path.glob("rank-*.exit")} == {
        "rank-1.exit": "0"
    }


def test_ranks_that_each_see_a_world_of_one_give_a_clear_error_on_every_rank(tmp_path):
    """What a bare ``srun`` of an Open MPI program does: 2 tasks, each its own MPI world."""
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "client_script.py"), str(tmp_path), "ok"],
            cwd=tmp_path, env=dict(_subprocess_environment(tmp_path), PMI_SIZE="2",
                                   PMI_RANK=str(rank)),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=60)[0].decode(errors="replace")
               for process in processes]
    assert all(process.returncode != 0 for process in processes), outputs
    errors = {path.name: path.read_text() for path in tmp_path.glob("rank-*.error")}
    assert sorted(errors) == ["rank-0.error", "rank-1.error"], outputs
    for message in errors.values():
        assert "the launcher started 2 ranks but MPI sees a world of 1" in message
    assert not (tmp_path / "results.json").exists()


def test_the_documented_example_runs_under_mpirun(tmp_path):
    page = (REPOSITORY / "docs" / "backends" / "mpi.md").read_text()
    example = tmp_path / "example.py"
    example.write_text(re.search(r"```python\n(.*?)```", page, re.DOTALL).group(1))
    outcome = run_under_mpirun(3, example, tmp_path=tmp_path, timeout=60)
    assert outcome.returncode == 0, outcome.output
    total = sum(len(str(math.factorial(number))) for number in range(1, 501))
    assert outcome.output.count("digits, computed by") == 1, outcome.output  # rank 0 only
    assert f"{total} digits, computed by 2 worker ranks" in outcome.output


# -- inside a SLURM job ---------------------------------------------------------------------------


def _slurm_running() -> bool:
    if not command_available("sbatch"):
        return False
    try:
        answer = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in answer.stdout


def run_sbatch(tmp_path: Path, tasks: int, command: str, timeout: float = 240) -> MpirunOutcome:
    """Submit ``command`` with ``sbatch --wait -n tasks`` and return the job's outcome."""
    job_output = tmp_path / "job.out"
    sbatch = [
        "sbatch", "--wait", "--parsable", "-J", "fhpc-test-mpi", "-n", str(tasks),
        "--overcommit", "-t", "5", "-o", str(job_output), "--chdir", str(tmp_path),
        "--export", "ALL", "--wrap", command,
    ]
    started = time.monotonic()
    process = subprocess.Popen(
        sbatch, env=_subprocess_environment(tmp_path), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, _ = process.communicate()
        job_id = stdout.strip().split(";")[0]
        if job_id:
            subprocess.run(["scancel", job_id], timeout=30)
        pytest.fail(f"the sbatch job did not end within {timeout} s")
    output = job_output.read_text(errors="replace") if job_output.exists() else ""
    return MpirunOutcome(process.returncode, f"{stderr}\n{output}", time.monotonic() - started)


def test_sbatch_job_running_mpirun_runs_a_map_and_exits_0(tmp_path):
    require(_slurm_running(), "SLURM is not running (run ci/slurm.sh)")
    command = (
        f"mpirun -n 3 {sys.executable} {SCRIPTS / 'client_script.py'} {tmp_path} ok"
    )
    outcome = run_sbatch(tmp_path, 3, command)
    assert outcome.returncode == 0, outcome.output
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["executor"] == "MPIExecutor"
    assert [square for square, _ in written["results"]] == [number**2 for number in range(20)]
    assert {rank for _, rank in written["results"]} <= {"1", "2"}
    assert (tmp_path / "rank-1.exit").read_text() == "0"
    assert (tmp_path / "rank-2.exit").read_text() == "0"


def test_sbatch_job_launching_worker_ranks_with_srun(tmp_path):
    require(_slurm_running(), "SLURM is not running (run ci/slurm.sh)")
    script = tmp_path / "launch.py"
    script.write_text(
        "import json, os, sys\n"
        "from futures_hpc.backends.mpi import MPIExecutor\n"
        "def rank(_):\n"
        "    return os.environ['SLURM_PROCID'], os.environ.get('SLURM_STEP_ID')\n"
        "with MPIExecutor(max_workers=2) as ex:\n"
        "    launcher = os.path.basename(ex.cluster.launcher.args[0])\n"
        "    ranks = sorted(set(ex.map(rank, range(40), chunksize=1)))\n"
        "json.dump({'launcher': launcher, 'ranks': ranks}, open(sys.argv[1], 'w'))\n"
    )
    outcome = run_sbatch(
        tmp_path, 2, f"{sys.executable} {script} {tmp_path / 'launched.json'}"
    )
    assert outcome.returncode == 0, outcome.output
    written = json.loads((tmp_path / "launched.json").read_text())
    assert written["launcher"] == "srun"
    assert {procid for procid, _ in written["ranks"]} == {"0", "1"}
    assert all(step is not None for _, step in written["ranks"])  # a job step of srun


# -- launched from this process: the executor suite and the ranks' life cycle -------------------


@pytest.fixture(scope="module")
def ex():
    require(command_available("mpirun"), "mpirun is not on PATH (run ci/openmpi.sh)")
    with MPIExecutor(max_workers=3) as executor:
        yield executor


@pytest.fixture
def make_executor():
    def make():
        return MPIExecutor(max_workers=3)

    return make


def rank_and_pid(_):
    return os.environ.get("OMPI_COMM_WORLD_RANK"), os.getpid()


def _alive(pids: set[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_launched_mode_runs_three_worker_ranks_of_mpirun(ex):
    assert ex.mode == "launched"
    assert os.path.basename(ex.cluster.launcher.args[0]) == "mpirun"
    assert ex.cluster.scheduler_address.startswith("tls://")
    names = {worker["name"] for worker in ex.client.scheduler_info()["workers"].values()}
    assert names == {f"{ex.run_name}-rank-{rank}" for rank in range(3)}
    where = set(ex.map(rank_and_pid, range(60), chunksize=1))
    assert {rank for rank, _ in where} == {"0", "1", "2"}
    launcher = psutil.Process(ex.cluster.launcher.pid)
    assert {pid for _, pid in where} <= {child.pid for child in launcher.children(recursive=True)}
    # The ranks run with futures_hpc's dask settings (futures_hpc.dask_settings).
    ticks = ex.client.run(lambda dask_worker: dask_worker.periodic_callbacks["tick"].callback_time)
    assert sorted(ticks.values()) == [200, 200, 200]


def test_launched_ranks_are_gone_after_shutdown():
    executor = MPIExecutor(max_workers=3)
    launcher = executor.cluster.launcher
    ranks = {child.pid for child in psutil.Process(launcher.pid).children(recursive=True)}
    assert len(ranks) >= 3
    assert executor.submit(sum, [1, 2]).result(timeout=60) == 3
    started = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - started < 20
    assert launcher.returncode == 0  # the ranks ended by themselves when the scheduler closed
    assert _alive(ranks | {launcher.pid}) == []


def test_a_launcher_that_fails_is_reported_and_cleaned_up(tmp_path):
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="exited with code") as caught:
        MPIExecutor(max_workers=2, python=str(tmp_path / "no-such-python"))
    assert time.monotonic() - started < 30
    assert "no-such-python" in str(caught.value)
    after = {child.pid for child in psutil.Process().children(recursive=True)}
    assert _alive(after - before) == []


def test_bad_options_raise_before_anything_starts():
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    with pytest.raises(OptionError, match="launcher='qsub'"):
        MPIExecutor(max_workers=1, launcher="qsub")
    with pytest.raises(OptionError, match="launcher_args"):
        MPIExecutor(max_workers=1, launcher_args="--oversubscribe")
    with pytest.raises(OptionError, match="startup_timeout"):
        MPIExecutor(max_workers=1, startup_timeout=0)
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        MPIExecutor(max_workers=0)
    after = {child.pid for child in psutil.Process().children(recursive=True)}
    assert _alive(after - before) == []


def test_explicit_backend_name_gives_the_mpi_subclass():
    assert MPIExecutor.unavailable_reason() is None
    with HPCExecutor("mpi", max_workers=1, security=False) as executor:
        assert type(executor) is MPIExecutor
        assert executor.cluster.scheduler_address.startswith("tcp://")
        assert executor.submit(pow, 2, 10).result(timeout=60) == 1024


def test_pools_are_refused_with_the_reason(ex):
    """The workers are the ranks of one mpirun: ``with_resources`` says so, and nothing stops."""
    with pytest.raises(OptionError, match=r"with_resources is not available on the 'mpi' "
                                          r"backend: its workers are the ranks of one mpirun"):
        ex.with_resources(cores=2)
    assert ex.submit(abs, -2).result(timeout=60) == 2
