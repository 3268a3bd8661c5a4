"""More memory on retry: ``with_resources(memory=[...])`` on real local workers and real SLURM.

A call that allocates more than its first rung's memory limit is ended by dask's nanny (the
real memory kill, nothing simulated) and runs again on the next rung; on the last rung it fails
with :class:`~futures_hpc.errors.CallMemoryError`. A call that kills its worker another way
follows ``max_call_retries`` and stays on its rung.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import require
from futures_hpc import HPCExecutor
from futures_hpc.errors import CallMemoryError, OptionError, WorkerLostError

pytestmark = pytest.mark.timeout(300)

#: What a call allocates: more than a small rung's limit, well within a large one's.
HOG_MB = 600
SMALL = "300MB"
LARGE = "1200MB"


#: How long a hog holds its memory. The nanny samples its worker's memory every 100 ms on its
#: event loop, which it shares with the client's here; a hog that let go at once could end
#: between two samples on a loaded machine (it did, once in CI) and never be seen.
HOLD_SECONDS = 3.0


def hog(megabytes: int) -> tuple[int, int]:
    """Allocate, touch and hold ``megabytes`` MB; return the worker's pid and memory limit."""
    import distributed
    import numpy as np

    block = np.ones(megabytes * 1_000_000 // 8)
    assert block.sum() == block.size
    time.sleep(HOLD_SECONDS)  # a test's stand-in for a call that keeps what it allocated
    assert block[-1] == 1.0
    return os.getpid(), distributed.get_worker().memory_manager.memory_limit


def small(value: int) -> tuple[int, int]:
    """A call that needs little memory: the worker's pid and memory limit."""
    import distributed

    return os.getpid() + 0 * value, distributed.get_worker().memory_manager.memory_limit


def crash(code: int) -> None:
    """End the worker process at once, not for memory."""
    os._exit(code)


@pytest.fixture(scope="module")
def ex():
    with HPCExecutor("local", max_workers=1, max_call_retries=2, idle_timeout=60) as executor:
        yield executor


# -- checks before anything starts -------------------------------------------------------------


@pytest.mark.parametrize(("memory", "said"), [
    ([], "empty memory ladder"),
    (["1GB", "1GB"], "does not grow"),
    (["2GB", "1GB"], "does not grow"),
    (["1GB", "lots"], "memory[1]='lots'"),
    ([0], "memory[0]=0"),
])
def test_a_bad_ladder_is_refused_before_any_pool_starts(ex, memory, said):
    before = set(ex.status().pools or {})
    with pytest.raises(OptionError, match="memory") as raised:
        ex.with_resources(memory=memory)
    assert said in str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert set(ex.status().pools or {}) == before


# -- local --------------------------------------------------------------------------------------


def test_a_call_killed_for_memory_completes_on_the_next_rung(ex):
    ladder = ex.with_resources(memory=[SMALL, LARGE], max_workers=1)
    first_pid, first_limit = ladder.submit(small, 0).result(timeout=120)
    assert first_limit == 300_000_000  # the first rung

    started = time.monotonic()
    future = ladder.submit(hog, HOG_MB)
    pid, limit = future.result(timeout=180)
    assert limit == 1_200_000_000  # ran on the second rung
    assert pid != first_pid
    assert time.monotonic() - started < 150
    shapes = sorted(line["shape"] for line in ex.status().pools.values())
    assert any("memory=300MB" in shape for shape in shapes)
    assert any("memory=1200MB" in shape for shape in shapes)


def test_on_the_last_rung_the_call_fails_clearly_and_the_executor_goes_on(ex):
    ladder = ex.with_resources(memory=[SMALL], max_workers=1)
    started = time.monotonic()
    with pytest.raises(CallMemoryError) as raised:
        ladder.submit(hog, HOG_MB).result(timeout=180)
    error = raised.value
    assert isinstance(error, WorkerLostError)
    assert f"hog({HOG_MB})" in str(error)
    assert "memory=300MB" in str(error)
    assert error.memory == SMALL
    assert error.memory_limit and error.rss and error.rss > 0.9 * error.memory_limit
    # Not retried on the same shape max_call_retries times: one kill, then the error.
    assert time.monotonic() - started < 150
    # The same pool, and the executor itself, still run calls.
    assert ladder.submit(small, 1).result(timeout=120)[1] == 300_000_000
    assert ex.submit(sum, [1, 2]).result(timeout=120) == 3


def test_map_moves_the_chunks_killed_for_memory_up(ex):
    ladder = ex.with_resources(memory=[SMALL, LARGE], max_workers=1)
    results = list(ladder.map(hog, [HOG_MB, 10, HOG_MB], chunksize=1, timeout=240))
    assert [limit for _, limit in results] == [1_200_000_000, 300_000_000, 1_200_000_000]


def test_a_call_that_dies_another_way_follows_max_call_retries(ex):
    ladder = ex.with_resources(memory=["310MB", "1100MB"], max_workers=1)
    with pytest.raises(WorkerLostError) as raised:
        ladder.submit(crash, 3).result(timeout=180)
    assert not isinstance(raised.value, CallMemoryError)
    assert "max_call_retries" in str(raised.value)
    # Never escalated: the second rung's pool was never made.
    shapes = [line["shape"] for line in ex.status().pools.values()]
    assert not any("memory=1100MB" in shape for shape in shapes)
    assert ladder.submit(small, 2).result(timeout=120)[1] == 310_000_000


def test_a_ladder_with_other_options_keeps_them_on_every_rung(ex):
    ladder = ex.with_resources(memory=["320MB", "1300MB"], cores=1, max_workers=1)
    assert ladder.ladder is not None
    assert [shape.memory for shape in ladder.ladder.shapes] == ["320MB", "1300MB"]
    assert all(shape.max_workers == 1 and shape.memory_ladder for shape in ladder.ladder.shapes)
    # A pool of the same memory without a ladder is a pool of its own.
    plain = ex.with_resources(memory="320MB", max_workers=1)
    assert plain.pool_name != ladder.pool_name


def _limited_memory_cgroup(limit: int) -> Path:
    """A new cgroup v1 memory cgroup of ``limit`` bytes (skips where none can be made)."""
    root = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        pytest.skip("needs root and a cgroup v1 memory hierarchy to make a memory cgroup")
    cgroup = root / f"futures-hpc-test-{uuid.uuid4().hex[:8]}"
    try:
        cgroup.mkdir()
        (cgroup / "memory.limit_in_bytes").write_text(str(limit))
    except OSError as error:
        pytest.skip(f"cannot make a memory cgroup: {error}")
    return cgroup


def test_a_kernel_out_of_memory_kill_moves_the_call_up_too(ex):
    # The worker is put in a memory cgroup smaller than the call, as a batch system's job
    # cgroup would be: the kernel's out-of-memory killer ends it (SIGKILL), not the nanny.
    cgroup = _limited_memory_cgroup(250_000_000)
    try:
        ladder = ex.with_resources(memory=["900MB", "1800MB"], max_workers=1)
        pid, limit = ladder.submit(small, 0).result(timeout=120)
        assert limit == 900_000_000
        (cgroup / "cgroup.procs").write_text(str(pid))
        # A batch job's worker starts inside its cgroup; this one moved: let the nanny's watch
        # (which reads its worker's cgroup once a second) see where it is now.
        time.sleep(1.5)
        started = time.monotonic()
        new_pid, limit = ladder.submit(hog, HOG_MB).result(timeout=180)
        assert limit == 1_800_000_000  # not retried on the 900MB rung first
        assert new_pid != pid
        assert time.monotonic() - started < 150
        assert "oom_kill 1" in (cgroup / "memory.oom_control").read_text()
    finally:
        deadline = time.monotonic() + 30
        while (cgroup / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        cgroup.rmdir()


# -- SLURM ---------------------------------------------------------------------------------------


def _slurm_is_up() -> tuple[bool, str]:
    if shutil.which("sbatch") is None:
        return False, "sbatch is not on PATH: run ci/slurm.sh"
    result = subprocess.run(["sinfo", "--noheader", "--format=%a %T"], capture_output=True,
                            text=True, timeout=30)
    usable = any(line.split()[:1] == ["up"] and not any(
        bad in line for bad in ("down", "drain", "fail")) for line in result.stdout.splitlines())
    return usable, f"no usable SLURM partition (sinfo: {result.stdout.strip()} {result.stderr})"


@pytest.mark.slurm
def test_slurm_a_call_killed_for_memory_completes_on_the_next_rung():
    up, reason = _slurm_is_up()
    require(up, reason)
    from tests.backends.batch_helpers import scontrol_job, slurm_queued_job_ids

    with HPCExecutor("slurm", max_workers=1, cores=1, memory="300MB", idle_timeout=5,
                     max_call_retries=2) as executor:
        ladder = executor.with_resources(memory=["400MB", "1500MB"], max_workers=1)
        pid, limit = ladder.submit(hog, 700).result(timeout=280)
        # dask-jobqueue rounds memories to its own units: about 1.5 GB on the second rung.
        assert 1_400_000_000 < limit < 1_600_000_000
        memories = [scontrol_job(job_id).get("MinMemoryNode", "")
                    for job_id in executor.job_ids()]
        units = {"M": 2**20, "G": 2**30}
        asked = sorted(int(memory[:-1]) * units[memory[-1]] for memory in memories)
        # The base job (300MB), the first rung's (400MB), the second's (1500MB, which
        # dask-jobqueue's --mem rounds up to whole GiB).
        assert len(asked) == 3
        assert asked[1] < 450_000_000 < 1_500_000_000 <= asked[2]

        last = executor.with_resources(memory=["400MB"], max_workers=1)
        with pytest.raises(CallMemoryError, match=r"hog\(700\)"):
            last.submit(hog, 700).result(timeout=280)
        assert 350_000_000 < last.submit(small, 1).result(timeout=280)[1] < 450_000_000
    deadline = time.monotonic() + 60
    while slurm_queued_job_ids(executor.run_name) and time.monotonic() < deadline:
        time.sleep(1)
    assert slurm_queued_job_ids(executor.run_name) == []


@pytest.mark.slurm
def test_slurm_a_rung_whose_jobs_are_refused_fails_the_call_with_slurms_message():
    up, reason = _slurm_is_up()
    require(up, reason)

    with HPCExecutor("slurm", max_workers=1, cores=1, memory="300MB", idle_timeout=5,
                     max_call_retries=2) as executor:
        ladder = executor.with_resources(memory=["400MB", "100GB"], max_workers=1)
        with pytest.raises(Exception, match="[Mm]emory") as raised:
            ladder.submit(hog, 700).result(timeout=280)
        assert not isinstance(raised.value, CallMemoryError)
        assert "100GB" in str(raised.value) or "Memory specification" in str(raised.value)
        print(type(raised.value).__name__, raised.value)
        # The executor's own calls go on.
        assert executor.submit(sum, [1, 2]).result(timeout=280) == 3
