"""Fair-share scaling and fault tolerance on the real SLURM (ci/setup.sh starts it).

Every test reads SLURM's own view of the jobs (squeue) and checks the results of real calls;
jobs are cancelled with scancel and worker processes killed with SIGKILL, as a user or the
batch system would.
"""

from __future__ import annotations

import logging
import operator
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from conftest import require
from futures_hpc import HPCExecutor
from futures_hpc.errors import JobFailedError, OptionError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

SMALL = {"cores": 1, "memory": "512MB", "walltime": "00:10:00", "dashboard_address": ":0"}


@pytest.fixture(autouse=True)
def _slurm():
    require(shutil.which("sbatch") is not None, "sbatch is not on PATH: run ci/setup.sh")


def squeue(run_name: str) -> dict[str, str]:
    """Job id -> state of the run's jobs still in the queue."""
    result = subprocess.run(["squeue", "--noheader", f"--name={run_name}", "--format=%i %T"],
                            capture_output=True, text=True, timeout=60)
    return dict(line.split()[:2] for line in result.stdout.splitlines() if line.strip())


def wait_until_no_jobs(run_name: str, timeout: float = 30.0) -> dict[str, str]:
    end = time.monotonic() + timeout
    while (left := squeue(run_name)) and time.monotonic() < end:
        time.sleep(0.5)
    return left


def slow_double(value: int, seconds: float = 0.2) -> int:
    time.sleep(seconds)
    return 2 * value


def connected_job_ids(ex: HPCExecutor) -> list[str]:
    names = {str(worker["name"]) for worker in
             ex.client.scheduler_info(n_workers=-1)["workers"].values()}
    return [job.job_id for job in ex._job_book.jobs() if job.name in names and not job.ended]


def wait_for(condition, timeout: float, interval: float = 0.5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(interval)
    return False


def test_bad_scaling_option_is_refused_before_any_job(tmp_path):
    with pytest.raises(OptionError, match="idle_timeout=-1 is not allowed"):
        HPCExecutor("slurm", max_workers=2, idle_timeout=-1, **SMALL)
    with pytest.raises(OptionError, match="min_workers=3 is not allowed"):
        HPCExecutor("slurm", max_workers=2, min_workers=3, **SMALL)


def _map_while(ex: HPCExecutor, action, calls: int = 200) -> list[int]:
    """Run a 200-call map; call ``action()`` once a third of the results are in."""
    results = []
    for index, value in enumerate(ex.map(slow_double, range(calls), chunksize=1)):
        results.append(value)
        if index == calls // 3:
            action()
    return results


def test_scancel_of_a_running_worker_job_loses_no_call():
    with HPCExecutor("slurm", max_workers=3, idle_timeout=30, **SMALL) as ex:
        cancelled = []

        def cancel_one_job():
            assert wait_for(lambda: connected_job_ids(ex), 120)
            cancelled.append(connected_job_ids(ex)[0])
            subprocess.run(["scancel", cancelled[0]], check=True, timeout=60)

        results = _map_while(ex, cancel_one_job)
        # Every result is there once, in order, and right.
        assert results == [2 * value for value in range(200)]
        # The cancelled job was noticed and replaced.
        assert wait_for(lambda: ex.status().resubmissions == 1, 60), ex.status()
        status = ex.status()
        assert cancelled[0] in status.job_ids and len(status.job_ids) > 3
        assert ex.submit(slow_double, 21).result(timeout=180) == 42
        run_name = ex.run_name
    assert wait_until_no_jobs(run_name) == {}


def test_kill_9_of_a_worker_process_loses_no_call():
    with HPCExecutor("slurm", max_workers=2, idle_timeout=30, **SMALL) as ex:
        killed = []

        def kill_one_worker():
            workers = ex.client.scheduler_info(n_workers=-1)["workers"]
            address = next(iter(workers))
            pid = ex.client.run(os.getpid, workers=[address])[address]
            os.kill(pid, signal.SIGKILL)
            killed.append(address)

        results = _map_while(ex, kill_one_worker)
        assert results == [2 * value for value in range(200)]
        assert killed
        assert wait_for(lambda: ex.status().lost_calls >= 1, 10), ex.status()
        run_name = ex.run_name
    assert wait_until_no_jobs(run_name) == {}


def test_job_whose_prologue_fails_is_resubmitted_then_raises_with_log_tails():
    ex = HPCExecutor(
        "slurm", max_workers=1, max_resubmissions=2,
        prologue=["echo 'futures-hpc-scaling-test: prologue fails' >&2", "exit 3"], **SMALL,
    )
    try:
        with pytest.raises(JobFailedError) as caught:
            ex.submit(slow_double, 1).result(timeout=240)
        message = str(caught.value)
        job_ids = ex.job_ids()
        # One job and max_resubmissions=2 replacements, each reported with its log tail.
        assert len(job_ids) == 3, job_ids
        for job_id in job_ids:
            assert f"job {job_id}" in message
        assert message.count("futures-hpc-scaling-test: prologue fails") == 3
        assert "max_resubmissions=2" in message
        with pytest.raises(JobFailedError):
            ex.submit(slow_double, 2)
    finally:
        ex.shutdown()
    assert wait_until_no_jobs(ex.run_name) == {}


def test_burst_keeps_pending_jobs_capped_and_releases_every_job_after_idle_timeout():
    ex = HPCExecutor("slurm", max_workers=6, max_pending_jobs=2, idle_timeout=5, **SMALL)
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            queue = squeue(ex.run_name)
            book = {job.job_id: job for job in ex._job_book.jobs()}
            connected = set(connected_job_ids(ex))
            waiting = [job_id for job_id in queue if job_id not in connected
                       and not (job_id in book and (book[job_id].retired
                                                    or book[job_id].ever_connected))]
            samples.append((sum(state == "PENDING" for state in queue.values()), len(waiting)))
            time.sleep(0.3)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        sampler.start()
        results = list(ex.map(slow_double, range(120), [1.0] * 120, chunksize=1))
        finished = time.monotonic()
        assert results == [2 * value for value in range(120)]
        assert len(ex.job_ids()) > 2  # it did scale up beyond the first two
        # No job left within idle_timeout + 5 s of the burst's end.
        assert wait_until_no_jobs(ex.run_name, timeout=10.0) == {}
        assert time.monotonic() - finished <= 10.0
        status = ex.status()
        assert status.jobs_running == status.jobs_pending == 0, status
        assert status.resubmissions == 0, status
    finally:
        stop.set()
        sampler.join()
        ex.shutdown()
    assert samples
    assert max(pending for pending, _ in samples) <= 2, samples
    assert max(waiting for _, waiting in samples) <= 2, samples
    assert wait_until_no_jobs(ex.run_name) == {}


def test_by_default_an_idle_job_is_kept_as_long_as_a_job_took_to_start():
    """idle_timeout="auto": a job serves two calls a short gap apart, then, left idle, is
    released once it has been idle as long as the longest start-up seen (status().idle_timeout).
    """
    created = time.monotonic()
    with HPCExecutor("slurm", max_workers=1, **SMALL) as ex:
        assert ex.submit(slow_double, 1, 0.0).result(timeout=120) == 2
        first_result = time.monotonic() - created
        first_jobs = ex.job_ids()
        time.sleep(1.0)  # a gap shorter than the start-up: the job stays
        timeout = ex.status().idle_timeout
        # At least the floor; at most the time to the first result (the start-up is part of it)
        # plus one look of the policy (0.5 s).
        assert 3.0 <= timeout <= max(3.0, first_result + 0.5), (timeout, first_result)
        assert ex.submit(slow_double, 2, 0.0).result(timeout=60) == 4
        idle_from = time.monotonic()
        assert ex.job_ids() == first_jobs
        assert wait_for(lambda: not connected_job_ids(ex), timeout=timeout + 15, interval=0.2)
        idle_for = time.monotonic() - idle_from
        assert timeout - 0.5 <= idle_for <= timeout + 15, (idle_for, timeout)
        assert ex.status().retired_jobs == 1
        assert wait_until_no_jobs(ex.run_name) == {}


def _array_sum(array) -> float:
    return float(array.sum())


def _doubled(block, otherargs):
    return block * otherargs


def test_large_calls_and_map_blocks_run_on_an_executor_released_down_to_no_worker():
    """Between bursts an adaptive executor has no worker. dask's scatter then waits its connect
    timeout (30 s) for one and fails: a large call's arguments (scattered) waited that long
    twice before going in the graph, and ``map_blocks`` and ``reduce_blocks`` (whose job was
    scattered) failed with ``TimeoutError: No valid workers found``. All now ask for a worker
    at once.
    """
    import dask
    import numpy as np

    from futures_hpc.tiles import map_blocks, reduce_blocks

    connect_timeout = dask.utils.parse_timedelta(
        dask.config.get("distributed.comm.timeouts.connect"))
    large = np.arange(1 << 18, dtype=np.float64)  # 2 MB pickled: over the scatter threshold
    image = np.arange(512 * 768, dtype=np.float32).reshape(512, 768)
    with HPCExecutor("slurm", max_workers=1, idle_timeout=1, **SMALL) as ex:
        assert ex.submit(slow_double, 1, 0.0).result(timeout=120) == 2
        assert wait_for(lambda: not connected_job_ids(ex), timeout=60, interval=0.2)
        assert not ex.client.scheduler_info(n_workers=-1)["workers"]

        started = time.monotonic()
        assert ex.submit(_array_sum, large).result(timeout=120) == float(large.sum())
        assert time.monotonic() - started < connect_timeout  # it did not wait out a scatter

        assert wait_for(lambda: not connected_job_ids(ex), timeout=60, interval=0.2)
        assert not ex.client.scheduler_info(n_workers=-1)["workers"]
        doubled = map_blocks(ex, _doubled, image, block=256, otherargs=2.0)
        np.testing.assert_array_equal(doubled, image * 2)

        assert wait_for(lambda: not connected_job_ids(ex), timeout=60, interval=0.2)
        total = reduce_blocks(ex, _array_sum, image, block=256, combine=operator.add)
        assert total == float(image.astype(np.float64).sum())
        assert ex.status().retired_jobs >= 3  # each ran on a job started for it
    assert wait_until_no_jobs(ex.run_name) == {}


class _Records(logging.Handler):
    """Keeps the log records it is given."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_released_jobs_close_their_workers_before_the_cancel_without_warnings():
    """Releasing idle jobs asks their workers to close and waits for them to disconnect before
    scancel, so the scheduler logs nothing. (Before, scancel came as the workers were closing and
    cut a last heartbeat or a connection being opened: "Received heartbeat from unregistered
    worker", "TLS handshake failed", in most releases of 4 jobs.)
    """
    records = _Records(logging.WARNING)
    distributed_logger = logging.getLogger("distributed")
    distributed_logger.addHandler(records)
    try:
        with HPCExecutor("slurm", max_workers=4, idle_timeout=1, **SMALL) as ex:
            for _ in range(2):  # two releases of up to 4 jobs
                results = list(ex.map(slow_double, range(16), [0.3] * 16, chunksize=1))
                assert results == [2 * value for value in range(16)]
                assert wait_for(lambda: not connected_job_ids(ex), timeout=30, interval=0.2)
                assert wait_until_no_jobs(ex.run_name) == {}
            time.sleep(1.0)  # for a late warning
            assert ex.status().retired_jobs == len(ex.job_ids()) >= 2
            warnings = [f"{record.name}: {record.getMessage()}" for record in records.records]
    finally:
        distributed_logger.removeHandler(records)
    assert warnings == []


def test_jobs_of_two_worker_processes_are_released_whole():
    """With 2 worker processes per job, both leave together once idle: never half a job."""
    options = {**SMALL, "cores": 2, "memory": "1GB"}
    ex = HPCExecutor("slurm", max_workers=4, processes=2, idle_timeout=3, **options)
    last_seen: dict[str, float] = {}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            now = time.monotonic()
            for worker in ex.client.scheduler_info(n_workers=-1)["workers"].values():
                last_seen[str(worker["name"])] = now
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        sampler.start()
        results = list(ex.map(slow_double, range(24), [0.5] * 24, chunksize=1))
        assert results == [2 * value for value in range(24)]
        assert wait_until_no_jobs(ex.run_name, timeout=30.0) == {}
        assert ex.status().retired_jobs >= 1
    finally:
        stop.set()
        sampler.join()
        ex.shutdown()
    jobs = [job.name for job in ex._job_book.jobs()]
    assert jobs
    for job in jobs:
        seen = {name: when for name, when in last_seen.items() if name.startswith(f"{job}-")}
        if not seen:
            continue  # released before its workers connected
        assert len(seen) == 2, (job, seen)  # both processes of the job served
        assert max(seen.values()) - min(seen.values()) < 2.0, (job, seen)  # and left together


def record_call(value: int, directory: str, seconds: float) -> int:
    marker = Path(directory) / f"{value}-{os.getpid()}-{time.time_ns()}"
    marker.with_suffix(".started").touch()
    time.sleep(seconds)
    marker.with_suffix(".finished").touch()
    return value * 3


def test_map_longer_than_the_walltime_completes_without_calls_killed(tmp_path):
    calls, seconds = 60, 5.0  # 300 call-seconds on 2 one-minute workers: about 3 minutes
    options = {**SMALL, "walltime": "00:01:00"}
    with HPCExecutor("slurm", max_workers=2, idle_timeout=30, **options) as ex:
        started = time.monotonic()
        results = list(ex.map(record_call, range(calls), [str(tmp_path)] * calls,
                              [seconds] * calls, chunksize=1))
        elapsed = time.monotonic() - started
        status = ex.status()
        run_name = ex.run_name
    assert results == [3 * value for value in range(calls)]
    assert elapsed > 60, elapsed  # longer than one walltime
    starts = {path.stem for path in tmp_path.glob("*.started")}
    ends = {path.stem for path in tmp_path.glob("*.finished")}
    # No call was killed mid-run: every call that started also finished, and ran once.
    assert starts == ends, sorted(starts - ends)
    assert len(starts) == calls
    # Jobs were retired before their walltime and replaced, not killed by SLURM.
    assert len(status.job_ids) > 2, status
    assert status.resubmissions == 0 and status.lost_calls == 0, status
    assert status.retired_jobs >= 1, status
    assert wait_until_no_jobs(run_name) == {}
