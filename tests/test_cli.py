"""The real ``futures-hpc`` command, run in subprocesses."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import require
from futures_hpc.backends import registered_backends
from tests.test_progress import run_with_terminal_stderr

COMMAND = shutil.which("futures-hpc")


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    """Environment for the command: its own config dir, log dir and discovery dir."""
    config_dir = tmp_path / "dask-config"
    config_dir.mkdir()
    (config_dir / "futures_hpc.yaml").write_text(yaml.safe_dump({
        "futures_hpc": {
            "profiles": {
                "tiny": {"max_workers": 1, "memory": "512MB"},
                "broken": {"cores": 0},
            }
        }
    }))
    env = {
        name: value for name, value in os.environ.items()
        if name != "FUTURES_HPC_BACKEND" and not name.startswith("DASK_FUTURES_HPC")
    }
    env.update(
        DASK_CONFIG=str(config_dir),
        DASK_FUTURES_HPC__DASHBOARD_ADDRESS="localhost:0",
        DASK_FUTURES_HPC__LOG_DIR=str(tmp_path / "logs"),
        DASK_FUTURES_HPC__DISCOVERY_DIR=str(tmp_path / "clusters"),
    )
    return env


def run_cli(*arguments: str, env: dict[str, str], timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert COMMAND, "the futures-hpc entry point is not installed (pip install -e .)"
    return subprocess.run(
        [COMMAND, *arguments], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=cwd, check=False,
    )


def test_python_dash_m_runs_the_same_command(cli_env):
    completed = subprocess.run(
        [sys.executable, "-m", "futures_hpc", "--version"], capture_output=True, text=True,
        timeout=60, env=cli_env, check=False,
    )
    assert completed.returncode == 0
    assert completed.stdout.strip().startswith("futures_hpc ")


def test_no_command_prints_help_and_fails(cli_env):
    completed = run_cli(env=cli_env)
    assert completed.returncode == 2
    assert "info" in completed.stdout and "demo" in completed.stdout


def test_info_lists_backends_the_choice_and_config_files(cli_env):
    completed = run_cli("info", env=cli_env)
    assert completed.returncode == 0, completed.stderr
    output = completed.stdout
    for name in registered_backends():
        assert re.search(rf"^\s+{name}\s+(yes|no)\s", output, re.MULTILINE), name
    assert re.search(r"^\s+local\s+yes\s", output, re.MULTILINE)
    assert "HPCExecutor() would use:" in output
    assert os.path.join(cli_env["DASK_CONFIG"], "futures_hpc.yaml") in output
    assert "Dashboard:" in output


def test_info_reports_the_backend_from_the_environment(cli_env):
    completed = run_cli("info", env=dict(cli_env, FUTURES_HPC_BACKEND="local"))
    assert completed.returncode == 0
    assert "HPCExecutor() would use: local (from FUTURES_HPC_BACKEND)" in completed.stdout


def test_demo_on_local_estimates_pi_and_reports_throughput(cli_env):
    completed = run_cli("demo", "--backend", "local", "--max-workers", "2", "--calls", "12",
                        "--points", "20000", env=cli_env)
    assert completed.returncode == 0, completed.stderr
    output = completed.stdout
    estimate = float(re.search(r"pi is about (\d+\.\d+)", output).group(1))
    assert abs(estimate - math.pi) < 0.05
    assert re.search(r"12 calls in [\d.]+ s: [\d.,]+ calls/s, [\d.,]+ million points/s", output)
    assert re.search(r"speed-up [\d.]+ on 2 worker processes", output)
    assert re.search(r"first worker after [\d.]+ s, first result [\d.]+ s into the map", output)
    # Not a terminal: no progress bar in the captured output.
    assert "%|" not in completed.stderr


def test_demo_default_size_finishes_in_under_a_minute_with_a_progress_bar(cli_env):
    started = time.monotonic()
    output, drawn = run_with_terminal_stderr([COMMAND, "demo", "--backend", "local"],
                                             env=cli_env)
    assert time.monotonic() - started < 60
    assert "pi is about 3.14" in output
    assert "estimate_pi_part" in drawn and "100/100" in drawn


def test_demo_with_an_unavailable_backend_fails_with_a_hint(cli_env):
    completed = run_cli("demo", "--backend", "nosuchbackend", env=cli_env)
    assert completed.returncode != 0
    assert "nosuchbackend" in completed.stdout + completed.stderr


def test_check_local_runs_one_job_and_reports_timings(cli_env, tmp_path):
    completed = run_cli("check", "local", env=cli_env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    output = completed.stdout
    assert re.search(r"first worker connected [\d.]+ s after submitting", output)
    assert re.search(r"first result [\d.]+ s after submitting", output)
    assert re.search(r"^\s+host: \S+", output, re.MULTILINE)
    assert output.rstrip().endswith("OK")


def test_check_with_a_broken_profile_fails_with_the_option_and_a_hint(cli_env):
    completed = run_cli("check", "local", "--profile", "broken", env=cli_env)
    assert completed.returncode == 1
    assert "FAILED" in completed.stdout
    assert "cores=0" in completed.stdout
    assert "hint:" in completed.stdout


def test_check_unknown_backend_points_to_info(cli_env):
    completed = run_cli("check", "nosuchbackend", env=cli_env)
    assert completed.returncode == 1
    assert "unknown backend 'nosuchbackend'" in completed.stdout
    assert "futures-hpc info" in completed.stdout


def test_config_shows_merged_configuration_and_profiles(cli_env):
    completed = run_cli("config", env=cli_env)
    assert completed.returncode == 0
    shown = yaml.safe_load(completed.stdout)
    assert shown["futures_hpc"]["profiles"]["tiny"] == {"max_workers": 1, "memory": "512MB"}
    # dask treats "-" and "_" in keys alike; the environment variable brings "_".
    settings = {key.replace("_", "-"): value for key, value in shown["futures_hpc"].items()}
    assert settings["dashboard-address"] == "localhost:0"
    assert os.path.join(cli_env["DASK_CONFIG"], "futures_hpc.yaml") in completed.stdout

    one = run_cli("config", "--profile", "tiny", env=cli_env)
    assert yaml.safe_load(one.stdout) == {"max_workers": 1, "memory": "512MB"}
    missing = run_cli("config", "--profile", "tiyn", env=cli_env)
    assert missing.returncode == 1
    assert "Did you mean 'tiny'" in missing.stderr


# -- jobs and cancel against the real batch systems ---------------------------------------------


def _squeue_state(job_id: str) -> str:
    completed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                               text=True, timeout=30, check=False)
    return completed.stdout.strip()


@pytest.fixture
def slurm_jobs():
    require(shutil.which("sbatch") is not None, "no sbatch: the real SLURM is not running here")
    submitted: list[str] = []

    def submit(name: str) -> str:
        job_id = subprocess.run(
            ["sbatch", "--parsable", f"--job-name={name}", "--output=/dev/null",
             "--time=00:05:00", "--wrap", "sleep 240"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip().split(";")[0]
        submitted.append(job_id)
        return job_id

    yield submit
    if submitted:
        subprocess.run(["scancel", *submitted], timeout=30, check=False)


@pytest.mark.slurm
def test_jobs_and_cancel_on_slurm(cli_env, slurm_jobs):
    tag = uuid.uuid4().hex[:8]
    ours = slurm_jobs(f"fhpc-clitest-{tag}")
    not_ours = slurm_jobs(f"other-clitest-{tag}")

    listed = run_cli("jobs", "--scheduler", "slurm", env=cli_env)
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"slurm\s+{ours}\s+fhpc-clitest-{tag}\s", listed.stdout)
    assert f"other-clitest-{tag}" not in listed.stdout

    dry = run_cli("cancel", "--scheduler", "slurm", "--dry-run", f"fhpc-clitest-{tag}",
                  env=cli_env)
    assert dry.returncode == 0
    assert dry.stdout.strip() == f"would run: scancel {ours}"
    assert _squeue_state(ours) in ("PENDING", "RUNNING")

    cancelled = run_cli("cancel", "--scheduler", "slurm", f"fhpc-clitest-{tag}", env=cli_env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"cancelled 1 slurm job(s): {ours}" in cancelled.stdout
    deadline = time.monotonic() + 30
    while _squeue_state(ours) not in ("", "CANCELLED") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _squeue_state(ours) in ("", "CANCELLED")
    assert _squeue_state(not_ours) in ("PENDING", "RUNNING")


@pytest.mark.slurm
def test_cancel_skips_jobs_of_runs_alive_on_this_machine(cli_env, slurm_jobs):
    run_name = f"fhpc-{uuid.uuid4().hex[:8]}"
    job_id = slurm_jobs(run_name)
    clusters = Path(cli_env["DASK_FUTURES_HPC__DISCOVERY_DIR"])
    clusters.mkdir(parents=True)
    (clusters / f"{run_name}.json").write_text(json.dumps({
        "name": run_name, "scheduler_address": "tcp://127.0.0.1:1", "pid": os.getpid(),
        "host": os.uname().nodename, "created": time.time(),
    }))
    listed = run_cli("jobs", "--scheduler", "slurm", env=cli_env)
    assert re.search(rf"{job_id}\s+{run_name}\s+\S+\s+running here", listed.stdout)

    skipped = run_cli("cancel", "--scheduler", "slurm", run_name, env=cli_env)
    assert f"skipped slurm job {job_id}" in skipped.stdout
    assert _squeue_state(job_id) in ("PENDING", "RUNNING")

    forced = run_cli("cancel", "--scheduler", "slurm", "--include-live", run_name, env=cli_env)
    assert f"cancelled 1 slurm job(s): {job_id}" in forced.stdout


@pytest.mark.sge
def test_jobs_and_cancel_on_grid_engine(cli_env):
    require(bool(os.environ.get("SGE_ROOT")) and shutil.which("qsub") is not None,
            "Grid Engine is not set up here (SGE_ROOT, qsub)")
    name = f"fhpc-clitest-{uuid.uuid4().hex[:8]}"
    submitted = subprocess.run(
        ["qsub", "-terse", "-N", name, "-o", "/dev/null", "-e", "/dev/null", "-b", "y",
         "sleep", "240"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    job_id = submitted.stdout.strip().split(".")[0]
    try:
        listed = run_cli("jobs", "--scheduler", "sge", env=cli_env)
        assert listed.returncode == 0, listed.stderr
        assert re.search(rf"sge\s+{job_id}\s+{name}\s", listed.stdout)
        cancelled = run_cli("cancel", "--scheduler", "sge", name, env=cli_env)
        assert f"cancelled 1 sge job(s): {job_id}" in cancelled.stdout
        # Grid Engine shows a deleted job as "dr"/"dt" until its shell has gone.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            remaining = run_cli("jobs", "--scheduler", "sge", env=cli_env).stdout
            state = re.search(rf"{name}\s+(\S+)", remaining)
            if state is None:
                break
            assert "d" in state.group(1), remaining  # being deleted, never running again
            time.sleep(1)
        assert name not in remaining
    finally:
        subprocess.run(["qdel", job_id], capture_output=True, timeout=30, check=False)


def test_info_lists_running_executors_with_their_dashboards(cli_env):
    import dask.config

    from futures_hpc import HPCExecutor

    with dask.config.set({"futures_hpc.discovery-dir":
                          cli_env["DASK_FUTURES_HPC__DISCOVERY_DIR"]}):
        with HPCExecutor("local", max_workers=1) as ex:
            completed = run_cli("info", env=cli_env)
            assert completed.returncode == 0, completed.stderr
            line = next(line for line in completed.stdout.splitlines() if ex.run_name in line)
            assert "backend=local" in line
            assert f"pid={os.getpid()}" in line
            assert f"dashboard={ex.dashboard_link}" in line
        assert ex.run_name not in run_cli("info", env=cli_env).stdout


@pytest.mark.slurm
def test_check_slurm_shows_the_job_script_and_start_time(cli_env, tmp_path):
    require(shutil.which("sbatch") is not None, "no sbatch: the real SLURM is not running here")
    completed = run_cli("check", "slurm", "--timeout", "120", env=cli_env, cwd=tmp_path,
                        timeout=300)
    output = completed.stdout
    assert completed.returncode == 0, output + completed.stderr
    assert "#SBATCH" in output
    assert "--mem=" in output or "--mem " in output
    assert re.search(r"first worker connected [\d.]+ s after submitting", output)
    assert re.search(r"^log dir:\s+\S+/fhpc-[0-9a-f]{8}$", output, re.MULTILINE)
    assert output.rstrip().endswith("OK")
    run_name = re.search(r"run='(fhpc-[0-9a-f]{8})'", output).group(1)
    # Its jobs were cancelled when the check ended; a cancelled job stays listed (COMPLETING)
    # until its worker has exited, at most SLURM's KillWait (5 s here) later.
    deadline = time.monotonic() + 10
    while True:
        remaining = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True,
                                   text=True, timeout=30, check=False).stdout
        if run_name not in remaining.split():
            break
        assert time.monotonic() < deadline, f"{run_name} still queued 10 s after the check"
        time.sleep(0.5)


_LIVE_EXECUTOR_SCRIPT = """
import sys, time
from futures_hpc import HPCExecutor

options = dict(max_workers=1, cores=1, memory="512MB", walltime="00:10:00", adaptive=False)
if sys.argv[1] == "with":
    with HPCExecutor("slurm", **options) as ex:
        print(ex.run_name, flush=True)
        assert ex.submit(int, "7").result(timeout=120) == 7
        print("ready", flush=True)
        time.sleep(600)
else:
    ex = HPCExecutor("slurm", **options)  # no with: must be discoverable all the same
    print(ex.run_name, flush=True)
    assert ex.submit(int, "7").result(timeout=120) == 7
    print("ready", flush=True)
    time.sleep(600)
"""


def _slurm_job_ids_named(run_name: str) -> list[str]:
    completed = subprocess.run(["squeue", "-h", "-n", run_name, "-o", "%i %T"],
                               capture_output=True, text=True, timeout=30, check=False)
    return [line.split()[0] for line in completed.stdout.splitlines()
            if line.split()[1:] in (["PENDING"], ["RUNNING"], ["CONFIGURING"])]


@pytest.mark.slurm
def test_cancel_never_touches_live_executors_with_or_without_with(cli_env, tmp_path):
    require(shutil.which("sbatch") is not None, "no sbatch: the real SLURM is not running here")
    script = tmp_path / "live_executor.py"
    script.write_text(_LIVE_EXECUTOR_SCRIPT)
    children = {
        mode: subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=cli_env, cwd=tmp_path)
        for mode in ("with", "without")
    }
    run_names: dict[str, str] = {}
    try:
        run_names = {mode: child.stdout.readline().strip() for mode, child in children.items()}
        for mode, child in children.items():
            assert run_names[mode].startswith("fhpc-"), run_names
            assert child.stdout.readline().strip() == "ready", f"the {mode} child failed"
        job_ids = {mode: _slurm_job_ids_named(name) for mode, name in run_names.items()}
        assert all(job_ids.values()), job_ids

        spared = run_cli("cancel", "--scheduler", "slurm", *run_names.values(), env=cli_env)
        assert spared.returncode == 0, spared.stderr
        for mode, ids in job_ids.items():
            for job_id in ids:
                assert f"skipped slurm job {job_id}" in spared.stdout, (mode, spared.stdout)
        assert "nothing to cancel" in spared.stdout
        assert {mode: _slurm_job_ids_named(name) for mode, name in run_names.items()} == job_ids

        for child in children.values():
            child.kill()  # SIGKILL: no clean-up of its own can run
            child.wait(timeout=30)
        cancelled = run_cli("cancel", "--scheduler", "slurm", *run_names.values(), env=cli_env)
        assert cancelled.returncode == 0, cancelled.stderr
        every_id = sorted(job_id for ids in job_ids.values() for job_id in ids)
        assert re.search(r"cancelled \d+ slurm job\(s\): ", cancelled.stdout), cancelled.stdout
        assert sorted(cancelled.stdout.split(": ", 1)[1].split()) == every_id
        deadline = time.monotonic() + 30
        while any(_slurm_job_ids_named(name) for name in run_names.values()):
            assert time.monotonic() < deadline, "the dead executors' jobs are still queued"
            time.sleep(0.5)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
        for name in run_names.values():
            subprocess.run(["scancel", "-n", name], timeout=30, check=False)
