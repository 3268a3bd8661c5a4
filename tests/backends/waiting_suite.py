"""The batch suite of jobs that wait: requests no node can meet, start_timeout, reasons shown.

A batch backend's test module collects these with ``from tests.backends.waiting_suite import *``
after the executor suite, so that their minutes of waiting do not leave the suite's long-lived
executor (``ex``) idle long enough to release its jobs in between. They use the module's
``batch`` fixture (see :mod:`tests.backends.batch_helpers`) and read the real queue.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import time
from pathlib import Path

import pytest

from futures_hpc.errors import JobSubmissionError, OptionError
from tests.backends.batch_helpers import (
    _queue_listing,
    run,
    wait_for,
    wait_for_workers,
    wait_until_no_jobs,
)

#: Seconds within which a request that no node can meet must fail, ``with`` block included.
NEVER_STARTS_WITHIN_SECONDS = 30.0

#: Requests no node here can meet (the SLURM node has 2 CPUs and a few GB, Grid Engine's all.q
#: 4 slots and the host's memory).
IMPOSSIBLE_REQUESTS = {
    "cores": {"cores": 64, "memory": "1GB"},
    "memory": {"cores": 1, "memory": "500GB"},
}


def _run_directory(message: str) -> Path:
    return Path(message.rsplit("Job scripts of this run: ", 1)[1].split()[0])


@pytest.mark.parametrize("request_name", sorted(IMPOSSIBLE_REQUESTS))
def test_request_no_node_can_meet_fails_with_the_batch_systems_reason(batch, request_name):
    """More than any node has: JobSubmissionError quoting the batch system, within 30 s.

    SLURM accepts 64 cores and leaves the job PENDING (PartitionConfig), Grid Engine leaves
    either request in qw (``qalter -w v``: no suitable queues); they must fail, not hang. SLURM
    (for memory) and its PBS wrapper (for both) refuse the request at submission.
    """
    started = time.monotonic()
    try:
        executor = batch.executor(**IMPOSSIBLE_REQUESTS[request_name], max_workers=1)
    except JobSubmissionError as refused:  # refused at submission: the constructor raises
        message = str(refused)
        run_name = _run_directory(message).name
    else:
        with executor:
            run_name = executor.run_name
            future = executor.submit(sum, [1, 2])
            with pytest.raises(JobSubmissionError) as caught:
                future.result(timeout=NEVER_STARTS_WITHIN_SECONDS)
            message = str(caught.value)
            [job_id] = executor.job_ids()
            assert f"job {job_id} ({run_name}-0)" in message, message
            assert str(executor.log_dir / f"{run_name}-0.sh") in message, message
            # The run is over: later calls fail at once with the same error.
            with pytest.raises(JobSubmissionError):
                executor.submit(sum, [3, 4])
            with pytest.raises(JobSubmissionError):
                list(executor.map(abs, [1, -2]))
    elapsed = time.monotonic() - started
    assert elapsed < NEVER_STARTS_WITHIN_SECONDS, (elapsed, message)
    assert batch.never_starts_texts[request_name] in message, message
    left = wait_until_no_jobs(batch, run_name)
    assert left == [], (left, _queue_listing(batch))


def test_start_timeout_fails_a_run_whose_first_worker_is_late(batch):
    """A job on hold never starts by itself: start_timeout ends the run with its state."""
    timeout = 6
    started = time.monotonic()
    with batch.executor(max_workers=1, start_timeout=timeout,
                        job_extra=[batch.hold_directive]) as executor:
        future = executor.submit(sum, [1, 2])
        with pytest.raises(JobSubmissionError) as caught:
            future.result(timeout=60)
        [job_id] = executor.job_ids()
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert f"within start_timeout={timeout} s" in message, message
    because = f", reason: {batch.held_reason}" if batch.held_reason else ""
    assert f"job {job_id} ({executor.run_name}-0): {batch.held_state}{because}; job script " in (
        message), message
    assert timeout <= elapsed < timeout + 20, (elapsed, message)
    left = wait_until_no_jobs(batch, executor.run_name)
    assert left == [], (left, _queue_listing(batch))


def test_a_held_job_waits_shows_why_and_runs_once_released(batch, caplog):
    """A reason that clears (a hold) keeps the run waiting, shown in status() and the log."""
    caplog.set_level(logging.INFO, logger="futures_hpc")
    with batch.executor(max_workers=1, job_extra=[batch.hold_directive]) as executor:
        future = executor.submit(sum, [1, 2])
        [job_id] = executor.job_ids()
        expected = (f"{batch.held_state}: {batch.held_reason}" if batch.held_reason
                    else batch.held_state)
        reason = wait_for(lambda: executor.status().pending_reasons.get(job_id) == expected, 30)
        assert reason, (expected, executor.status())
        time.sleep(6)  # several looks at the queue: waiting is no failure
        assert not future.done(), future
        assert executor.status().pending_reasons.get(job_id) == expected
        # What map(..., progress=True) shows after its bar.
        assert executor._progress_note() == f"1 job {expected}"
        released = run([*shlex.split(batch.release_command), job_id])
        assert released.returncode == 0, released.stdout + released.stderr
        assert future.result(timeout=120) == 3
        # The worker's connection is seen from the scheduler's worker list, which may lag the
        # result by a moment under load (1 CI run in 3).
        assert wait_for(lambda: job_id not in executor.status().pending_reasons, 10), (
            executor.status())
    waits = [record.getMessage() for record in caplog.records
             if "waits:" in record.getMessage() and f"job {job_id} " in record.getMessage()]
    because = f", reason: {batch.held_reason}" if batch.held_reason else ""
    assert any(f"): {batch.held_state}{because}; " in text for text in waits), waits
    # Logged once per change: never the same news twice in a row.
    assert all(first != second for first, second in itertools.pairwise(waits)), waits
    assert wait_until_no_jobs(batch, executor.run_name) == []


@pytest.mark.parametrize("value", [0, -5, "soon", "30", True, float("nan"), [10]])
def test_bad_start_timeout_is_refused_before_any_job_is_submitted(batch, value, tmp_path):
    log_dir = tmp_path / "logs"
    with pytest.raises(OptionError) as caught:
        batch.executor(start_timeout=value, log_dir=str(log_dir))
    message = str(caught.value)
    assert f"start_timeout={value!r} is not allowed" in message, message
    assert "number of seconds" in message and "HH:MM:SS" in message, message
    # Every job script is written into the run's directory before it is submitted: no
    # directory, no job.
    assert not log_dir.exists(), list(log_dir.rglob("*"))


def test_a_job_never_runs_more_worker_processes_than_max_workers(batch, caplog):
    """cores=2 without processes= would be 2 one-thread workers; max_workers=1 makes it one."""
    caplog.set_level(logging.INFO, logger="futures_hpc")
    with batch.executor(cores=2, max_workers=1) as executor:
        assert executor.processes_per_job == 1
        wait_for_workers(executor, 1)
        workers = executor.client.scheduler_info(n_workers=-1)["workers"].values()
        assert [worker["nthreads"] for worker in workers] == [2], workers
    assert any("0 to 1 worker(s)" in record.getMessage() for record in caplog.records)
    with pytest.raises(OptionError, match="processes=2 is not allowed with max_workers=1"):
        batch.executor(cores=2, processes=2, max_workers=1)
