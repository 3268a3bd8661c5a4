"""What the SLURM, PBS and Grid Engine tests share: queue readers and the batch test suite.

A batch backend's test module defines a module-scoped fixture ``batch`` (a :class:`BatchSystem`
for a scheduler that runs here, with its environment set) and does
``from tests.backends.batch_helpers import *`` to collect the tests below, besides the shared
executor suite. Every test reads the real queue: nothing here is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle
import dask.config
import distributed
import pytest
from distributed.security import Security

from futures_hpc import HPCExecutor
from futures_hpc.errors import BackendUnavailableError, JobFailedError, JobSubmissionError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Seconds within which an executor's jobs must have left the queue after it exits.
QUEUE_EMPTY_WITHIN_SECONDS = 10.0

#: Options of the small executors the tests start: one-core workers with little memory.
SMALL_WORKERS = {"cores": 1, "memory": "512MB", "walltime": "00:10:00"}


@dataclass
class BatchSystem:
    """One batch system as the tests see it.

    Attributes
    ----------
    backend : str
        The futures_hpc backend name.
    queue : str
        A queue (partition) that exists.
    rejection_text : str
        What the batch system says about an unknown queue (checked case-insensitively).
    job_id_variable : str
        The environment variable that holds the job id inside a job.
    cancel_command : str
        The command that cancels jobs.
    queued_job_ids : callable
        ``queued_job_ids(run_name)``: ids of the jobs named ``run_name`` still in the queue.
    environment : dict
        Environment variables the backend needs (set by the module's fixture).
    never_starts_texts : dict
        What the batch system says of a job asking for more than any node has, by the
        request's name in ``tests.backends.waiting_suite.IMPOSSIBLE_REQUESTS``.
    hold_directive : str
        A ``job_extra`` line that submits the job on hold.
    held_state, held_reason : str
        The state and the reason the batch system gives for a held job (reason "" if none).
    release_command : str
        The command that releases held jobs (followed by job ids).

    """

    backend: str
    queue: str
    rejection_text: str
    job_id_variable: str
    cancel_command: str
    queued_job_ids: Callable[[str], list[str]]
    environment: dict[str, str] = field(default_factory=dict)
    never_starts_texts: dict[str, str] = field(default_factory=dict)
    hold_directive: str = ""
    held_state: str = ""
    held_reason: str = ""
    release_command: str = ""

    def executor(self, **options) -> HPCExecutor:
        """A new executor of this backend with small workers (``options`` override)."""
        return HPCExecutor(self.backend, **{**SMALL_WORKERS, "max_workers": 2, **options})


@pytest.fixture(scope="module")
def ex(batch):
    """The suite's running executor: 2 one-worker jobs, both connected.

    ``min_workers=2`` keeps them between tests: the suite counts worker slots, and the default
    ``idle_timeout="auto"`` would release idle jobs after a few seconds on this machine's queue.
    """
    with batch.executor(max_workers=2, min_workers=2,
                        env={"FUTURES_HPC_TEST_VALUE": "42 and spaces"}) as executor:
        wait_for_workers(executor, 2)
        yield executor


@pytest.fixture
def make_executor(batch):
    """New executors for the suite's shutdown tests (they shut them down themselves)."""
    def make():
        # The suite counts worker slots: wait until both jobs' workers are there.
        executor = batch.executor(max_workers=2, min_workers=2)
        wait_for_workers(executor, 2)
        return executor

    return make


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command of the batch system and capture its output."""
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def wait_until_no_jobs(batch: BatchSystem, run_name: str,
                       timeout: float = QUEUE_EMPTY_WITHIN_SECONDS) -> list[str]:
    """Poll the queue until no job named ``run_name`` is left; return what is left at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = batch.queued_job_ids(run_name)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _queue_listing(batch: BatchSystem) -> str:
    """The whole queue as the batch system prints it, for failure messages."""
    command = ["squeue", "--states=all"] if batch.backend == "slurm" else ["qstat"]
    result = run(command)
    return result.stdout + result.stderr


def wait_for(condition: Callable[[], object], timeout: float) -> object:
    """Poll ``condition`` until it returns something true; return that, or None at timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    return None


def wait_for_workers(executor: HPCExecutor, count: int, timeout: float = 120) -> None:
    """Wait until ``count`` workers are connected."""
    executor.client.wait_for_workers(count, timeout=timeout)


# -- queue readers ----------------------------------------------------------------------------


def slurm_queued_job_ids(run_name: str) -> list[str]:
    """Jobs named ``run_name`` that squeue lists (pending, running or completing)."""
    result = run(["squeue", "--noheader", f"--name={run_name}", "--format=%i"])
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def pbs_queued_job_ids(run_name: str) -> list[str]:
    """Jobs named ``run_name`` that PBS's qstat lists in a state other than completed."""
    result = run(["qstat"])
    assert result.returncode == 0, result.stdout + result.stderr
    left = []
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == run_name and fields[-2] not in ("C", "F"):
            left.append(fields[0])
    return left


def sge_queued_job_ids(run_name: str) -> list[str]:
    """Jobs named ``run_name`` that Grid Engine still knows (``qstat -j`` accepts names)."""
    result = run(["qstat", "-j", run_name])
    if result.returncode != 0:
        return []
    return [line.split()[1] for line in result.stdout.splitlines()
            if line.startswith("job_number:")]


def key_values(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of ``scontrol show job`` output."""
    pairs = {}
    for token in text.split():
        key, equals, value = token.partition("=")
        if equals:
            pairs[key] = value
    return pairs


def scontrol_job(job_id: str) -> dict[str, str]:
    """What SLURM itself holds about a job."""
    result = run(["scontrol", "show", "job", job_id])
    assert result.returncode == 0, result.stderr
    return key_values(result.stdout)


def processes_of_run(run_name: str) -> dict[int, str]:
    """Live processes of a run's jobs, whether or not the batch system still tracks them.

    A job's processes inherit its environment, where the batch system puts the job name (SLURM's
    ``SLURM_JOB_NAME``, PBS's ``PBS_JOBNAME``, Grid Engine's ``JOB_NAME``): every process whose
    environment holds the run name as a value, or whose command line names the run, is one.
    Returns ``{pid: "ppid=... state=... command line"}``.
    """
    found = {}
    wanted = run_name.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            environment = (entry / "environ").read_bytes().split(b"\0")
            status = dict(line.split(":", 1) for line in
                          (entry / "status").read_text().splitlines() if ":" in line)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if status.get("State", "").strip().startswith("Z"):
            continue  # exited, waiting for its parent to reap it
        if wanted in command or any(item.partition(b"=")[2] == wanted for item in environment):
            found[int(entry.name)] = (f"ppid={status.get('PPid', '?').strip()} "
                                      f"{command.decode(errors='replace')[:200]}")
    return found


def wait_until_no_processes(run_name: str, timeout: float) -> dict[int, str]:
    """Poll until no process of ``run_name`` is left; return what is left at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_of_run(run_name)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


# -- worker-side functions --------------------------------------------------------------------


def job_id_and_directory(variable: str) -> tuple[str | None, str]:
    time.sleep(0.05)  # long enough for every worker to get some of the calls
    return os.environ.get(variable), os.getcwd()


def environment_value(name: str) -> str | None:
    return os.environ.get(name)


def worker_dask_settings(dask_worker=None) -> dict[str, object]:
    """The worker's values of futures_hpc's dask settings, and its own tick's period in ms."""
    import dask.config
    from distributed import get_worker

    from futures_hpc.dask_settings import DASK_SETTINGS

    worker = dask_worker or get_worker()
    values: dict[str, object] = {name: dask.config.get(name) for name in DASK_SETTINGS}
    values["tick period"] = worker.periodic_callbacks["tick"].callback_time
    values["monitor period"] = worker.periodic_callbacks["monitor"].callback_time
    return values


# -- the batch test suite ----------------------------------------------------------------------


def test_workers_are_this_executors_batch_jobs(ex, batch):
    assert type(ex).__name__ == f"{batch.backend.upper()}Executor"
    job_ids = ex.job_ids()
    assert len(job_ids) == 2, job_ids
    queued = batch.queued_job_ids(ex.run_name)
    assert sorted(queued) == sorted(job_ids), (queued, job_ids, _queue_listing(batch))
    wait_for_workers(ex, 2)
    seen = set(ex.map(job_id_and_directory, [batch.job_id_variable] * 40, chunksize=1))
    assert {job_id for job_id, _ in seen} == set(job_ids), (seen, job_ids)
    # Workers start in the directory the executor was created in, as local workers do.
    assert {directory for _, directory in seen} == {os.getcwd()}
    names = [worker["name"] for worker in ex.client.scheduler_info()["workers"].values()]
    assert all(name.startswith(ex.run_name) for name in names)


def test_env_reaches_the_workers(ex):
    assert ex.submit(environment_value, "FUTURES_HPC_TEST_VALUE").result(60) == "42 and spaces"


def test_workers_run_with_futures_hpcs_dask_settings(ex):
    """The job script passes the client's tick, profile and system monitor intervals on."""
    script = ex.job_script()
    assert "export DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=200ms" in script
    assert "export DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL=100ms" in script
    assert "export DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL=2s" in script
    assert ex.submit(worker_dask_settings).result(120) == {
        "distributed.admin.tick.interval": "200ms",
        "distributed.worker.profile.interval": "100ms",
        "distributed.admin.system-monitor.interval": "2s",
        "tick period": 200,
        "monitor period": 2000,
    }


def test_job_scripts_and_logs_are_in_the_runs_log_dir(ex):
    wait_for_workers(ex, 2)
    files = {path.name for path in ex.log_dir.iterdir()}
    assert {f"{ex.run_name}-0.sh", f"{ex.run_name}-1.sh"} <= files
    for job_id in ex.job_ids():
        assert any(job_id in name and not name.endswith(".sh") for name in files), files
    assert ex.job_script().startswith("#!")


def test_scheduler_requires_tls_with_the_run_certificate(ex):
    address = ex.cluster.scheduler_address
    assert address.startswith("tls://")
    with pytest.raises((OSError, TimeoutError)):
        distributed.Client(address.replace("tls://", "tcp://", 1), timeout=3,
                           set_as_default=False)
    # TLS with another certificate authority is refused too.
    with pytest.raises((OSError, TimeoutError)):
        distributed.Client(address, security=Security.temporary(), timeout=3,
                           set_as_default=False)
    assert ex.submit(sum, [1, 2]).result(60) == 3


def test_certificate_files_are_private_and_given_to_the_workers(ex):
    credentials = ex.credentials
    for path in (credentials.certificate_path, credentials.key_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(credentials.key_path.parent.stat().st_mode) == 0o700
    script = ex.job_script()
    assert f"--tls-key {credentials.key_path}" in script
    assert f"--tls-cert {credentials.certificate_path}" in script


def test_dashboard_listens_on_localhost_only(ex):
    sockets = ex.cluster.scheduler.http_server._sockets.values()
    bound_hosts = {sock.getsockname()[0] for sock in sockets}
    assert bound_hosts and bound_hosts <= {"127.0.0.1", "::1"}


@pytest.mark.parametrize("exit_kind", ["normal", "exception", "keyboard_interrupt"])
def test_no_job_left_in_the_queue_after_the_with_block(batch, exit_kind):
    error_class = {"normal": None, "exception": ValueError,
                   "keyboard_interrupt": KeyboardInterrupt}[exit_kind]
    with pytest.raises(error_class) if error_class else contextlib.nullcontext():
        with batch.executor() as executor:
            run_name = executor.run_name
            assert executor.submit(sum, [1, 1]).result(120) == 2
            assert batch.queued_job_ids(run_name)
            if error_class is KeyboardInterrupt:  # leaves at once, without waiting for calls
                executor.submit(time.sleep, 30)
            if error_class is not None:
                raise error_class("leaving the with block")
    started = time.monotonic()
    left = wait_until_no_jobs(batch, run_name)
    assert left == [], (left, _queue_listing(batch))
    assert time.monotonic() - started < QUEUE_EMPTY_WITHIN_SECONDS


class _TeardownMarker(distributed.WorkerPlugin):
    """A worker plugin whose teardown (run when the worker closes itself) leaves a file."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def teardown(self, worker) -> None:
        Path(self.directory, f"{worker.name}.closed").touch()


def test_closing_lets_idle_workers_close_before_their_jobs_are_cancelled(batch, tmp_path):
    """Closing the executor asks its idle workers to close and waits for them before the
    cancel: their plugins' teardowns run (each leaves a file here). Before, the cancel came
    first and its SIGTERM killed the worker processes: no teardown ran.
    """
    with batch.executor(max_workers=2) as executor:
        wait_for_workers(executor, 2)
        executor.client.register_plugin(_TeardownMarker(str(tmp_path)))
        names = {str(worker["name"]) for worker in
                 executor.client.scheduler_info(n_workers=-1)["workers"].values()}
        assert len(names) == 2
    assert sorted(path.stem for path in tmp_path.glob("*.closed")) == sorted(names)
    assert wait_until_no_jobs(batch, executor.run_name) == []


_CHILD_SCRIPT = textwrap.dedent("""
    import json, signal, sys
    import dask.config
    from futures_hpc import HPCExecutor
    backend, options, config, mode = sys.argv[1], *map(json.loads, sys.argv[2:4]), sys.argv[4]
    dask.config.set(config)
    if mode == "sigterm-python-handler":
        def leave(signum, frame):
            raise SystemExit(7)
        signal.signal(signal.SIGTERM, leave)
    if mode == "check-handler":
        def previous(signum, frame):
            pass
        signal.signal(signal.SIGTERM, previous)
        executor = HPCExecutor(backend, **options)
        from futures_hpc.cleanup import handler_installed
        print("installed" if handler_installed() else "not installed")
        executor.shutdown()
        print("restored" if signal.getsignal(signal.SIGTERM) is previous else "not restored")
        sys.exit(0)
    executor = HPCExecutor(backend, **options)
    assert executor.submit(sum, [1, 2]).result(120) == 3
    print(executor.run_name, *executor.job_ids(), flush=True)
    if mode == "exit-without-shutdown":
        sys.stdin.readline()  # the test has seen the jobs in the queue
        sys.exit(0)
    with executor:
        sys.stdin.readline()  # SIGTERM arrives while the child waits here
""")


def _run_child(batch: BatchSystem, mode: str, stderr_path: Path) -> subprocess.Popen:
    config = {key: dask.config.get(key) for key in
              ("futures_hpc.log-dir", "futures_hpc.dashboard-address")}
    with stderr_path.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD_SCRIPT, batch.backend,
             json.dumps({**SMALL_WORKERS, "max_workers": 2}), json.dumps(config), mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )


@pytest.mark.parametrize(
    "mode", ["sigterm-default-handler", "sigterm-python-handler", "exit-without-shutdown"]
)
def test_no_job_left_when_the_python_process_is_terminated_or_exits(batch, mode, tmp_path):
    """A child Python process runs an executor; SIGTERM it (or let it exit without shutdown)."""
    stderr_path = tmp_path / "child.stderr"
    child = _run_child(batch, mode, stderr_path)
    try:
        line = child.stdout.readline().split()
        assert line, stderr_path.read_text()
        run_name, job_ids = line[0], line[1:]
        queued = batch.queued_job_ids(run_name)
        assert sorted(queued) == sorted(job_ids), (queued, job_ids, _queue_listing(batch))
        if mode.startswith("sigterm"):
            child.send_signal(signal.SIGTERM)
        else:
            child.stdin.write("exit now\n")
            child.stdin.flush()
        returncode = child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()
    # The child died as its previous SIGTERM handler said: of the signal, or by SystemExit(7).
    expected = {"sigterm-default-handler": -signal.SIGTERM, "sigterm-python-handler": 7,
                "exit-without-shutdown": 0}[mode]
    assert returncode == expected, stderr_path.read_text()[-3000:]
    started_waiting = time.monotonic()
    left = wait_until_no_jobs(batch, run_name)
    assert left == [], (left, _queue_listing(batch), stderr_path.read_text()[-3000:])
    assert time.monotonic() - started_waiting < QUEUE_EMPTY_WITHIN_SECONDS


def test_sigterm_handler_is_installed_and_then_restored(batch, tmp_path):
    """In a child process, where no other executor holds the handler."""
    stderr_path = tmp_path / "child.stderr"
    child = _run_child(batch, "check-handler", stderr_path)
    try:
        output = child.stdout.read()
        returncode = child.wait(timeout=120)
    finally:
        child.kill()
        child.wait()
    assert returncode == 0, stderr_path.read_text()[-3000:]
    assert output.split()[-2:] == ["installed", "restored"]


def test_one_cancel_command_for_all_jobs(batch, tmp_path, monkeypatch):
    """A shim first on PATH records each call of the real cancel command, then runs it."""
    real_command = subprocess.run(["sh", "-c", f"command -v {batch.cancel_command}"],
                                  capture_output=True, text=True).stdout.strip()
    calls_log = tmp_path / "calls.log"
    shim = tmp_path / "bin" / batch.cancel_command
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\necho "$@" >> {calls_log}\nexec {real_command} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}:{os.environ['PATH']}")
    with batch.executor(max_workers=2) as executor:
        wait_for_workers(executor, 2)
        job_ids = executor.job_ids()
    # Other executors (the module's, releasing idle jobs) may cancel theirs meanwhile.
    calls = [call for call in calls_log.read_text().splitlines()
             if set(call.split()) & set(job_ids)]
    assert [sorted(call.split()) for call in calls] == [sorted(job_ids)], (calls, job_ids)
    assert wait_until_no_jobs(batch, executor.run_name) == []


def test_unknown_queue_raises_job_submission_error_quoting_the_scheduler(batch):
    with pytest.raises(JobSubmissionError) as caught:
        batch.executor(queue="futures-hpc-no-such-queue")
    message = str(caught.value)
    assert batch.rejection_text.lower() in message.lower()
    assert "futures-hpc-no-such-queue" in message
    log_dir = message.rsplit("Job scripts of this run: ", 1)[1].strip()
    assert Path(log_dir).is_dir()
    assert wait_until_no_jobs(batch, Path(log_dir).name) == []


def test_job_whose_prologue_fails_raises_with_its_log_tail(batch):
    executor = batch.executor(
        max_workers=1,
        prologue=["echo 'futures-hpc-test: loading the environment' >&2",
                  "source /nonexistent/futures-hpc-env/bin/activate || exit 3"],
    )
    try:
        with pytest.raises(JobFailedError) as caught:
            executor.submit(sum, [1, 2]).result(timeout=120)
        message = str(caught.value)
        assert "before its worker connected" in message
        assert "futures-hpc-test: loading the environment" in message
        assert "/nonexistent/futures-hpc-env/bin/activate" in message
        assert str(executor.log_dir) in message
        with pytest.raises(JobFailedError):
            executor.submit(sum, [1, 2])
    finally:
        executor.shutdown()
    assert wait_until_no_jobs(batch, executor.run_name) == []


def test_missing_commands_raise_backend_unavailable(batch, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="not on PATH") as caught:
        batch.executor()
    assert "qsub" in str(caught.value) or "sbatch" in str(caught.value)


_INTERRUPTED_CHILD_SCRIPT = textwrap.dedent("""
    import json, signal, sys, time
    mode = sys.argv[4]
    if mode == "dask-jobqueue-imported-first":
        import dask_jobqueue  # noqa: F401 - installs its SIGINT handler before futures_hpc runs
    if mode == "user-handler":
        def leave(signum, frame):
            print("user handler ran", flush=True)
            raise SystemExit(5)
        signal.signal(signal.SIGINT, leave)
    import dask.config
    from futures_hpc import HPCExecutor
    backend, options, config = sys.argv[1], *map(json.loads, sys.argv[2:4])
    dask.config.set(config)

    def slow(value):
        time.sleep(0.5)
        return value

    try:
        with HPCExecutor(backend, **options) as executor:
            print(executor.run_name, flush=True)
            for result in executor.map(slow, range(200), chunksize=1):
                print("result", result, flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt seen", flush=True)
        if mode == "caught":
            sys.exit(130)
        raise
""")


@pytest.mark.parametrize(
    "mode", ["uncaught", "caught", "dask-jobqueue-imported-first", "user-handler"]
)
def test_ctrl_c_is_a_keyboard_interrupt_and_leaves_no_job(batch, mode, tmp_path):
    """SIGINT to a child Python mapping on the executor, as Ctrl-C in a terminal sends it.

    dask-jobqueue 0.9 turns SIGINT into ``sys.exit()`` (status 0) when it is imported; the script
    must see KeyboardInterrupt (or its own handler must run) and the shell status 130.
    """
    config = {key: dask.config.get(key) for key in
              ("futures_hpc.log-dir", "futures_hpc.dashboard-address")}
    stderr_path = tmp_path / "child.stderr"
    with stderr_path.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _INTERRUPTED_CHILD_SCRIPT, batch.backend,
             json.dumps({**SMALL_WORKERS, "max_workers": 2}), json.dumps(config), mode],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    try:
        run_name = child.stdout.readline().strip()
        assert run_name.startswith("fhpc-"), stderr_path.read_text()[-3000:]
        first = child.stdout.readline()
        assert first.startswith("result"), (first, stderr_path.read_text()[-3000:])
        assert batch.queued_job_ids(run_name)
        child.send_signal(signal.SIGINT)
        returncode = child.wait(timeout=60)
        output = child.stdout.read()
    finally:
        child.kill()
        child.wait()
    errors = stderr_path.read_text()
    if mode == "user-handler":
        assert "user handler ran" in output and returncode == 5, (returncode, errors[-3000:])
    else:
        assert "KeyboardInterrupt seen" in output, (output[-2000:], errors[-3000:])
        # Uncaught, Python ends the process by SIGINT after its clean-up: a shell shows 130.
        assert returncode == (130 if mode == "caught" else -signal.SIGINT), errors[-3000:]
    started_waiting = time.monotonic()
    left = wait_until_no_jobs(batch, run_name)
    assert left == [], (left, _queue_listing(batch), errors[-3000:])
    assert time.monotonic() - started_waiting < QUEUE_EMPTY_WITHIN_SECONDS
