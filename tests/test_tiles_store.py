"""Resuming block jobs: ``map_blocks``/``reduce_blocks`` with a store compute only what is missing.

Each block function appends its block's index to a side file, so the tests count the blocks a
run really computed. On the local backend and on the real SLURM started by ci/slurm.sh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from conftest import require
from futures_hpc import HPCExecutor
from futures_hpc.store.results import read_index
from futures_hpc.tiles import BlockError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]
BACKEND_OPTIONS = {
    "local": {"max_workers": 2},
    "slurm": {"max_workers": 2, "cores": 1, "memory": "2GB", "walltime": "00:15:00",
              "queue": "debug"},
}
IMAGE_SHAPE = (96, 128)
BLOCK = 16
TOTAL_BLOCKS = (96 // BLOCK) * (128 // BLOCK)
#: Calls of func by a map_blocks that creates its output: every block, and the small probe
#: that learns the output's bands and type.
FRESH_CALLS = TOTAL_BLOCKS + 1

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", params=["local", "slurm"])
def executor(request):
    if request.param == "slurm":
        require(shutil.which("sbatch") is not None, "the SLURM tests need ci/slurm.sh")
    with HPCExecutor(request.param, **BACKEND_OPTIONS[request.param]) as ex:
        ex.client.wait_for_workers(2, timeout=180)
        yield ex


def image(seed=0):
    return np.random.default_rng(seed).random(IMAGE_SHAPE).astype(np.float32)


def write_input(directory: Path, kind: str, data: np.ndarray) -> Path:
    if kind == "tif":
        import rasterio
        from rasterio.transform import from_origin

        path = directory / "input.tif"
        with rasterio.open(path, "w", driver="GTiff", height=data.shape[0],
                           width=data.shape[1], count=1, dtype=data.dtype.name,
                           transform=from_origin(500000, 7000000, 30, 30),
                           crs="EPSG:32755") as dataset:
            dataset.write(data, 1)
        return path
    path = directory / "input.npy"
    np.save(path, data)
    return path


def digest(path: Path) -> str:
    """The bytes of a file, or of every file in a directory (a zarr store) with its name."""
    hasher = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        hasher.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


def side_blocks(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [tuple(int(n) for n in line.split()) for line in path.read_text().splitlines()]


def recorded_count(store: Path) -> int:
    """Blocks recorded in the store (every job of these tests has its own store)."""
    if not (store / "segments").is_dir():
        return 0
    return len(read_index(str(store)).blocks)


# ----------------------------------------------------------------------------------------------
# (1) a run killed mid-raster, then rerun
# ----------------------------------------------------------------------------------------------

PROGRAM = '''
import json
import sys
import time

import numpy as np

from futures_hpc import HPCExecutor

SIDE = {side!r}


def doubled(block, info):
    with open(SIDE, "a") as side:
        side.write("%d %d\\n" % info.index)
    time.sleep({delay!r})
    return block * 2 + 1


if __name__ == "__main__":
    backend, source, out, store, facts, per_task = sys.argv[1:7]
    with HPCExecutor(backend, store=store, **json.loads(sys.argv[7])) as ex:
        with open(facts, "w") as file:
            file.write(ex.run_name)
        ex.map_blocks(doubled, source, block={block!r}, overlap=1, out=out,
                      blocks_per_task=json.loads(per_task),
                      creation_options=json.loads(sys.argv[8]) or None)
    print("DONE", flush=True)
'''


def start_program(tmp_path: Path, backend: str, source: Path, out: Path, store: Path,
                  per_task: tuple[int, int], creation_options: dict | None = None,
                  ) -> subprocess.Popen:
    program = tmp_path / "program.py"
    if not program.exists():
        program.write_text(PROGRAM.format(side=str(tmp_path / "side.txt"), delay=0.15,
                                          block=BLOCK))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("FUTURES_HPC_BACKEND", None)
    return subprocess.Popen(
        [sys.executable, str(program), backend, str(source), str(out), str(store),
         str(tmp_path / "run_name.txt"), json.dumps(list(per_task)),
         json.dumps(BACKEND_OPTIONS[backend]), json.dumps(creation_options or {})],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)


def kill_when_recorded(process: subprocess.Popen, store: Path, at_least: int,
                       timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while recorded_count(store) < at_least:
        assert process.poll() is None, (
            f"the program ended before it was killed:\n{process.communicate()}")
        assert time.monotonic() < deadline, "too few blocks recorded in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


def wait_until_gone(process_group: int, run_name: str, backend: str) -> None:
    """No process of the killed program is left (and, on SLURM, none of its jobs)."""
    if backend == "slurm":
        subprocess.run(["scancel", f"--name={run_name}"], check=False, timeout=60)
    deadline = time.monotonic() + 120
    while True:
        try:
            os.killpg(process_group, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        jobs = []
        if backend == "slurm":
            jobs = subprocess.run(["squeue", "--noheader", f"--name={run_name}", "--format=%i"],
                                  capture_output=True, text=True, timeout=60).stdout.split()
        if not alive and not jobs:
            return
        assert time.monotonic() < deadline, f"the killed run lives on: {jobs}"
        time.sleep(0.2)


KILL_CASES = [("local", "tif"), ("local", "tif-deflate"), ("local", "npy"), ("local", "zarr"),
              ("slurm", "tif"), ("slurm", "tif-deflate")]
#: How each kind of output is created: suffix and GeoTIFF creation options.
KINDS = {"tif": ("tif", None), "tif-deflate": ("tif", {"compress": "deflate"}),
         "npy": ("npy", None), "zarr": ("zarr", None)}


@pytest.mark.parametrize(("backend", "kind"), KILL_CASES,
                         ids=[f"{backend}-{kind}" for backend, kind in KILL_CASES])
def test_run_killed_mid_raster_resumes_with_the_missing_blocks_only(backend, kind, tmp_path):
    if backend == "slurm":
        require(shutil.which("sbatch") is not None, "the SLURM tests need ci/slurm.sh")
    data = image()
    suffix, options = KINDS[kind]
    source = write_input(tmp_path, "tif" if suffix == "tif" else "npy", data)
    out, store = tmp_path / f"out.{suffix}", tmp_path / "store"

    killed = start_program(tmp_path, backend, source, out, store, (1, 2), options)
    kill_when_recorded(killed, store, at_least=TOTAL_BLOCKS // 4, timeout=300)
    wait_until_gone(killed.pid, (tmp_path / "run_name.txt").read_text(), backend)
    recorded = recorded_count(store)
    assert 0 < recorded < TOTAL_BLOCKS
    (tmp_path / "side.txt").rename(tmp_path / "side-killed.txt")

    rerun = start_program(tmp_path, backend, source, out, store, (2, 3), options)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and "DONE" in stdout, stderr[-4000:]
    computed = side_blocks(tmp_path / "side.txt")
    assert len(computed) == TOTAL_BLOCKS - recorded  # each missing block once, nothing else
    assert len(set(computed)) == len(computed)
    assert recorded_count(store) == TOTAL_BLOCKS

    clean = tmp_path / "clean"
    clean.mkdir()
    clean_out = clean / f"out.{suffix}"
    whole = start_program(clean, backend, source, clean_out, clean / "store", (1, 1), options)
    stdout, stderr = whole.communicate(timeout=300)
    assert whole.returncode == 0 and "DONE" in stdout, stderr[-4000:]
    assert len(side_blocks(clean / "side.txt")) == FRESH_CALLS
    assert digest(out) == digest(clean_out)
    if suffix == "tif":
        import rasterio

        with rasterio.open(out) as result:
            np.testing.assert_array_equal(result.read(1), data * 2 + 1)
            assert result.profile.get("compress") == (options or {}).get("compress")
        assert not list(tmp_path.glob("*.lock"))
    if kind == "npy":
        np.testing.assert_array_equal(np.load(out), data * 2 + 1)

    (tmp_path / "side.txt").rename(tmp_path / "side-rerun.txt")
    again = start_program(tmp_path, backend, source, out, store, (2, 2), options)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0 and "DONE" in stdout, stderr[-4000:]
    assert side_blocks(tmp_path / "side.txt") == []  # everything was stored
    assert digest(out) == digest(clean_out)


# ----------------------------------------------------------------------------------------------
# (2) reduce_blocks: recorded partials join the reduction
# ----------------------------------------------------------------------------------------------


def block_sum(block, info, otherargs):
    side, failing = otherargs
    with open(side, "a") as file:
        file.write("{} {}\n".format(*info.index))
    if os.path.exists(failing) and sum(info.index) % 3 == 0:
        raise RuntimeError("failing on purpose")
    return int(block.astype(np.int64).sum())


def add(total, partial):
    return total + partial


def test_reduce_rerun_uses_recorded_partials_and_computes_nothing_when_all_stored(
        executor, tmp_path):
    data = np.random.default_rng(1).integers(0, 1000, IMAGE_SHAPE).astype(np.int32)
    source = write_input(tmp_path, "npy", data)
    side, failing, store = tmp_path / "side.txt", tmp_path / "failing", tmp_path / "store"
    failing.touch()
    arguments = dict(combine=add, block=BLOCK, otherargs=(str(side), str(failing)),
                     store=store, blocks_per_task=(2, 2))
    failed = {(row, col) for row in range(IMAGE_SHAPE[0] // BLOCK)
              for col in range(IMAGE_SHAPE[1] // BLOCK) if (row + col) % 3 == 0}

    with pytest.raises(BlockError) as raised:
        executor.reduce_blocks(block_sum, source, on_error="continue", **arguments)
    assert {window.index for window, _ in raised.value.failures} == failed
    assert recorded_count(store) == TOTAL_BLOCKS - len(failed)

    failing.unlink()
    side.unlink()
    assert executor.reduce_blocks(block_sum, source, **arguments) == int(data.sum())
    assert sorted(side_blocks(side)) == sorted(failed)

    side.unlink()
    assert executor.reduce_blocks(block_sum, source, **arguments) == int(data.sum())
    assert side_blocks(side) == []


# ----------------------------------------------------------------------------------------------
# (3) another job does not reuse blocks
# ----------------------------------------------------------------------------------------------


def plus_one(block, otherargs):
    with open(otherargs, "a") as file:
        file.write("0 0\n")
    return block + 1


def times_three(block, otherargs):
    with open(otherargs, "a") as file:
        file.write("0 0\n")
    return block * 3


def computed_by(run, side: Path) -> int:
    side.unlink(missing_ok=True)
    run()
    return len(side_blocks(side))


def test_changed_function_or_input_or_option_does_not_reuse_blocks(executor, tmp_path):
    data = image(2)
    source = write_input(tmp_path, "npy", data)
    out, store, side = tmp_path / "out.npy", tmp_path / "store", tmp_path / "side.txt"

    def run(func, **options):
        return lambda: executor.map_blocks(func, source, block=BLOCK, out=out, store=store,
                                           otherargs=str(side), **options)

    assert computed_by(run(plus_one), side) == FRESH_CALLS
    assert computed_by(run(plus_one), side) == 0  # the same job: all stored
    np.testing.assert_array_equal(np.load(out), data + 1)

    assert computed_by(run(times_three), side) == FRESH_CALLS  # another function
    np.testing.assert_array_equal(np.load(out), data * 3)
    # back to the first function: its blocks were overwritten by the second's, so all again
    assert computed_by(run(plus_one), side) == FRESH_CALLS
    np.testing.assert_array_equal(np.load(out), data + 1)

    assert computed_by(run(plus_one, overlap=2), side) == FRESH_CALLS  # another option
    np.testing.assert_array_equal(np.load(out), data + 1)

    changed = image(3)
    time.sleep(0.01)  # a new modification time even on coarse clocks
    np.save(source, changed)  # another input, at the same path
    assert computed_by(run(plus_one, overlap=2), side) == FRESH_CALLS
    np.testing.assert_array_equal(np.load(out), changed + 1)

    memory_store = tmp_path / "memory-store"
    in_memory = image(4)

    def run_in_memory(values):
        return lambda: executor.reduce_blocks(
            block_sum, values, combine=add, block=BLOCK, store=memory_store,
            otherargs=(str(side), str(tmp_path / "never")))

    assert computed_by(run_in_memory(in_memory), side) == TOTAL_BLOCKS
    assert computed_by(run_in_memory(in_memory.copy()), side) == 0  # the same pixels
    in_memory[5, 7] += 1
    assert computed_by(run_in_memory(in_memory), side) == TOTAL_BLOCKS  # one pixel changed


def test_in_memory_output_records_nothing(executor, tmp_path):
    store, side = tmp_path / "store", tmp_path / "side.txt"
    result = executor.map_blocks(plus_one, image(5), block=BLOCK, store=store,
                                 otherargs=str(side))
    np.testing.assert_array_equal(result, image(5) + 1)
    assert recorded_count(store) == 0
