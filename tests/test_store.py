"""Durable results (``store=``): a rerun answers recorded calls and runs only the others.

Programs run in child processes and are killed for real (SIGKILL of the whole process group,
SIGINT, ``scancel`` of a SLURM worker job); the tests then read the store's own index and a side
file each call appends its argument to, which shows which calls ran, and how often.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import require
from futures_hpc import HPCExecutor
from futures_hpc.errors import CallSerializationError, OptionError
from futures_hpc.store import admin, frames, segments
from futures_hpc.store.results import MISSING, ResultStore, read_index, read_record

pytestmark = pytest.mark.timeout(300)

CALLS = 2000

PROGRAM = textwrap.dedent('''
    import json, os, sys
    from futures_hpc import HPCExecutor

    def work(x):
        total = 0
        for i in range(60_000):  # about 10 ms of arithmetic
            total += (i * x) % 7
        descriptor = os.open(os.environ["SIDE_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(descriptor, f"{x}\\n".encode())
        os.close(descriptor)
        return (x, total)

    if __name__ == "__main__":
        store, backend, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        with HPCExecutor(backend, store=store, **options) as ex:
            print("run", ex.run_name, flush=True)
            print("chunksize", ex.automatic_chunksize(CALLS, work), flush=True)
            results = []
            for done, result in enumerate(ex.map(work, range(CALLS)), 1):
                results.append(result)
                if done % 50 == 0:
                    print(done, flush=True)
        with open(os.environ["RESULT_FILE"], "w") as file:
            json.dump(results, file)
        print("done", flush=True)
''').replace("CALLS", str(CALLS))


def expected_results() -> list[list[int]]:
    return [[x, sum((i * x) % 7 for i in range(60_000))] for x in range(CALLS)]


class Program:
    """The program above, its store, side file and result file in ``directory``."""

    def __init__(self, directory: Path, backend: str, options: dict) -> None:
        self.directory = directory
        self.script = directory / "program.py"
        self.script.write_text(PROGRAM)
        self.store = directory / "store"
        self.side = directory / "side"
        self.result = directory / "result.json"
        self.backend = backend
        self.options = options
        self.run_names: list[str] = []

    def start(self, **popen) -> subprocess.Popen:
        env = dict(os.environ, SIDE_FILE=str(self.side), RESULT_FILE=str(self.result))
        return subprocess.Popen(
            [sys.executable, str(self.script), str(self.store), self.backend,
             json.dumps(self.options)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            cwd=self.directory, **popen)

    def run_until(self, process: subprocess.Popen, done_calls: int) -> None:
        """Read the program's progress until ``done_calls`` results have reached it."""
        for line in process.stdout:
            words = line.split()
            if words[:1] == ["run"]:
                self.run_names.append(words[1])
            elif words[:1] == ["chunksize"]:
                self.chunksize = int(words[1])
            elif words and words[0].isdigit() and int(words[0]) >= done_calls:
                return
        raise AssertionError(f"the program ended early: {process.wait()} "
                             f"{process.stderr.read()[-3000:]}")

    def side_calls(self) -> list[int]:
        return [int(word) for word in self.side.read_text().split()] if self.side.exists() else []

    def rerun(self) -> None:
        process = self.start()
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        assert json.loads(self.result.read_text()) == expected_results()


def recorded_arguments(store: Path) -> set[int]:
    """The argument of every call the store holds a whole result for."""
    index = read_index(str(store))
    values = (read_record(index, where) for where in index.calls.values())
    return {value[0] for value in values if value is not MISSING}


def check_rerun_runs_only_the_missing_calls(program: Program, first_run: list[int]) -> None:
    recorded = recorded_arguments(program.store)
    assert 0 < len(recorded) < CALLS, len(recorded)
    assert recorded <= set(first_run)  # a call is recorded only by the worker that ran it
    program.rerun()
    second_run = program.side_calls()[len(first_run):]
    assert sorted(second_run) == sorted(set(range(CALLS)) - recorded)
    ran_twice = set(first_run) & set(second_run)
    # Only calls in flight (or finished within the last flush interval) when the run died.
    assert len(ran_twice) <= 30, len(ran_twice)
    # A third run finds everything and runs nothing.
    program.rerun()
    assert len(program.side_calls()) == len(first_run) + len(second_run)


# -- killed for real --------------------------------------------------------------------------


def test_rerun_after_sigkill_runs_only_what_is_not_recorded(tmp_path):
    program = Program(tmp_path, "local", {"max_workers": 2})
    process = program.start(start_new_session=True)
    program.run_until(process, CALLS // 2)
    os.killpg(process.pid, signal.SIGKILL)  # the client, its scheduler and its workers
    process.wait()
    check_rerun_runs_only_the_missing_calls(program, program.side_calls())


def test_rerun_after_ctrl_c_runs_only_what_is_not_recorded(tmp_path):
    program = Program(tmp_path, "local", {"max_workers": 2})
    process = program.start()
    program.run_until(process, CALLS // 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    check_rerun_runs_only_the_missing_calls(program, program.side_calls())


def _slurm_up() -> None:
    result = subprocess.run(["sinfo", "--noheader", "--format=%a"], capture_output=True,
                            text=True) if _has("sinfo") else None
    require(result is not None and "up" in result.stdout, "SLURM is not running: ci/slurm.sh")


def _has(command: str) -> bool:
    import shutil

    return shutil.which(command) is not None


SLURM_OPTIONS = {"max_workers": 2, "cores": 1, "memory": "512MB", "walltime": "00:10:00"}


@pytest.mark.slurm
def test_rerun_on_slurm_after_the_client_is_killed(tmp_path):
    _slurm_up()
    program = Program(tmp_path, "slurm", SLURM_OPTIONS)
    process = program.start(start_new_session=True)
    try:
        program.run_until(process, CALLS // 2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for run_name in program.run_names:  # what a walltime end would do to the workers
            subprocess.run(["scancel", f"--name={run_name}"], check=False)
    time.sleep(2)  # the cancelled workers are gone
    check_rerun_runs_only_the_missing_calls(program, program.side_calls())
    left = subprocess.run(["squeue", "--noheader", "--format=%j"], capture_output=True,
                          text=True).stdout.split()
    assert not set(left) & set(program.run_names)


@pytest.mark.slurm
def test_a_worker_job_cancelled_mid_run_loses_nothing_recorded(tmp_path):
    """``scancel`` of one of the executor's worker jobs: the run still finishes, and the rerun
    finds every call recorded.

    dask runs the lost job's tasks again on the other worker; the scheduler tells that worker
    the chunk ran before, and the chunk takes its calls that the store recorded from there:
    only the calls not yet written run twice.
    """
    _slurm_up()
    program = Program(tmp_path, "slurm", SLURM_OPTIONS)
    process = program.start()
    program.run_until(process, CALLS // 3)
    time.sleep(1.0)  # each worker is well into a chunk
    jobs = subprocess.run(["squeue", "--noheader", f"--name={program.run_names[0]}",
                           "--format=%i"], capture_output=True, text=True).stdout.split()
    assert jobs
    subprocess.run(["scancel", jobs[0]], check=True)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    first_run = program.side_calls()
    assert sorted(set(first_run)) == list(range(CALLS))
    # Only the call running and those whose records were not written yet (records wait at most
    # MIN_FLUSH_SECONDS, 2 ms, here: one 5-10 ms call, two if the write was late): before the
    # chunk consulted the store, its finished calls ran again too (80 of them in a run of this
    # test), and with 50 ms of waiting, up to 11.
    twice = sorted(call for call, runs in collections.Counter(first_run).items() if runs > 1)
    assert len(first_run) - CALLS <= 5, (len(first_run) - CALLS, twice, program.chunksize)
    assert recorded_arguments(program.store) == set(range(CALLS))
    program.rerun()
    assert len(program.side_calls()) == len(first_run)


# -- identity ---------------------------------------------------------------------------------


def _square(x):
    return x * x


def _draw():
    return os.urandom(8).hex()


def _fails_first_time(path):
    marker = Path(path)
    if not marker.exists():
        marker.write_text("failed once")
        raise ValueError("first time")
    return "second time"


def record_then_kill_once(directory: str, value: int, killer: int) -> int:
    """Append ``value`` to a side file; the call ``killer`` kills its worker, the first time.

    The killer runs for longer than the store's longest flush interval before it kills, so
    that the calls before it in its chunk are in the store when their worker dies (a call's
    record is written at most that long after it finished).
    """
    marker = os.path.join(directory, "killed")
    if value == killer and not os.path.exists(marker):
        with open(marker, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(4 * segments.FLUSH_SECONDS)
        os._exit(1)
    with open(os.path.join(directory, "side"), "a") as handle:
        handle.write(f"{value}\n")
    return 2 * value


def test_a_map_chunk_run_again_after_its_worker_died_takes_its_recorded_calls(tmp_path):
    """dask runs a chunk of ``map`` again when its worker dies; the calls of the chunk that
    finished and were recorded before are taken from the store, not run again."""
    count, killer = 40, 5
    with HPCExecutor("local", max_workers=2, store=tmp_path / "store") as ex:
        results = list(ex.map(record_then_kill_once, [str(tmp_path)] * count, range(count),
                              [killer] * count, chunksize=10))
    assert results == [2 * value for value in range(count)]
    assert (tmp_path / "killed").exists()  # the killer did kill its worker
    ran = sorted(int(word) for word in (tmp_path / "side").read_text().split())
    assert ran == list(range(count))  # every call once: calls 0 to 4 were not run again
    index = read_index(str(tmp_path / "store"))
    recorded = [read_record(index, where) for where in index.calls.values()]
    assert sorted(recorded) == [2 * value for value in range(count)]


def _draw_for(value):
    return value, os.urandom(8).hex()


def _drawn_pair(text, number):
    return text * number, os.urandom(8).hex()


def _maybe_a_function(value):
    if value == 1:
        return lambda: 42  # the standard pickler cannot pack it; cloudpickle can
    return value


def test_chunks_keyed_by_their_workers_keep_repeats_apart(tmp_path):
    """Chunks of int and str arguments are keyed by their workers (one ``CALLS`` record per
    write); a call repeated in a later map, within one chunk, or through ``submit`` still gets a
    record of its own, and the rerun finds every call under the same key."""
    store = tmp_path / "store"

    def run(ex: HPCExecutor) -> tuple:
        return (list(ex.map(_draw_for, range(300))),
                list(ex.map(_draw_for, list(range(200, 400)))),  # 100 repeats of the first
                ex.submit(_draw_for, 5).result(),  # a repeat of a worker-keyed call
                list(ex.map(_draw_for, ["p", "q", "p"])),  # a repeat within one chunk
                list(ex.map(_drawn_pair, ["x", "y"], [1, 2])))

    with HPCExecutor("local", max_workers=2, store=store) as ex:
        first = run(ex)
        assert ex.store.hits == 0
    assert first[1][50][0] == 250 and first[1][50][1] != first[0][250][1]
    assert first[2][1] != first[0][5][1]
    assert first[3][0][1] != first[3][2][1]
    kinds = {kind for name in segments.segment_names(str(store))
             for _, kind, *_ in frames.scan(segments.read_segment(name))}
    assert frames.CALLS in kinds
    with HPCExecutor("local", max_workers=2, store=store) as ex:
        assert run(ex) == first
        assert ex.store.hits == 300 + 200 + 1 + 3 + 2


def test_a_worker_keyed_result_that_needs_cloudpickle_is_recorded(tmp_path):
    store = tmp_path / "store"
    for run in range(2):
        with HPCExecutor("local", max_workers=1, store=store) as ex:
            results = list(ex.map(_maybe_a_function, range(4)))
            assert results[1]() == 42 and results[:1] + results[2:] == [0, 2, 3]
            assert ex.store.hits == (4 if run else 0)


def test_submit_and_map_share_records_and_repeats_stay_apart(tmp_path):
    store = tmp_path / "store"
    with HPCExecutor("local", max_workers=2, store=store) as ex:
        first = [ex.submit(_draw).result(), ex.submit(_draw).result()]
        assert list(ex.map(_square, range(20))) == [x * x for x in range(20)]
        assert first[0] != first[1]
    with HPCExecutor("local", max_workers=2, store=store) as ex:
        again = [ex.submit(_draw).result(), ex.submit(_draw).result()]
        assert again == first  # the same two calls, in the same turns
        third = ex.submit(_draw).result()  # a third turn was never recorded
        assert third not in first
        assert [ex.submit(_square, x).result() for x in range(20)] == [x * x for x in range(20)]
        assert ex.store.hits == 22


def test_lazy_maps_and_chained_futures_are_recorded(tmp_path):
    store = tmp_path / "store"
    side = tmp_path / "side"
    for run in range(2):
        with HPCExecutor("local", max_workers=2, store=store) as ex:
            lazy = list(ex.map(_square_noted, (x for x in range(30)), [str(side)] * 30,
                               buffersize=3, chunksize=4))
            first = ex.submit(_square_noted, 3, str(side))
            chained = ex.submit(_square_noted, first, str(side))
            assert lazy == [x * x for x in range(30)] and chained.result() == 81
            hits = ex.store.hits
        ran = [int(word) for word in side.read_text().split()]
        assert sorted(ran) == sorted([*range(30), 3, 9])  # the second run ran nothing
        assert hits == (0 if run == 0 else 32)


def test_an_edited_function_does_not_reuse_results(tmp_path):
    store = tmp_path / "store"
    script = tmp_path / "edited.py"
    outputs = []
    for body in ("return x + 1", "return x + 2", "return x + 2"):
        script.write_text(textwrap.dedent(f'''
            import sys
            from futures_hpc import HPCExecutor
            def f(x):
                {body}
            if __name__ == "__main__":
                with HPCExecutor("local", max_workers=1, store=sys.argv[1]) as ex:
                    print(list(ex.map(f, range(5))), ex.store.hits)
        '''))
        done = subprocess.run([sys.executable, str(script), str(store)], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.split("\n")[0])
    assert outputs == ["[1, 2, 3, 4, 5] 0", "[2, 3, 4, 5, 6] 0", "[2, 3, 4, 5, 6] 5"]


def test_failed_calls_are_not_recorded(tmp_path):
    store = tmp_path / "store"
    marker = tmp_path / "marker"
    with HPCExecutor("local", max_workers=1, store=store) as ex:
        with pytest.raises(ValueError, match="first time"):
            ex.submit(_fails_first_time, str(marker)).result()
    with HPCExecutor("local", max_workers=1, store=store) as ex:
        assert ex.submit(_fails_first_time, str(marker)).result() == "second time"
        assert ex.store.hits == 0


def test_two_programs_write_one_store_at_once(tmp_path):
    script = tmp_path / "both.py"
    script.write_text(textwrap.dedent('''
        import sys
        from futures_hpc import HPCExecutor
        def f(x):
            total = 0
            for i in range(20_000):
                total += i % (x + 1)
            return total
        if __name__ == "__main__":
            with HPCExecutor("local", max_workers=1, store=sys.argv[1]) as ex:
                results = list(ex.map(f, range(int(sys.argv[2]), int(sys.argv[2]) + 600)))
            assert results == [f(x) for x in range(int(sys.argv[2]), int(sys.argv[2]) + 600)]
            print("hits", ex.store.hits)
    '''))
    store = tmp_path / "store"
    started = [subprocess.Popen([sys.executable, str(script), str(store), str(offset)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path) for offset in (0, 300)]
    for process in started:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0 and "hits 0" in out, err[-2000:]
    assert len(read_index(str(store)).calls) == 900  # 300 calls were made by both
    summary = admin.summarize(str(store))
    assert len(summary.runs) == 2
    done = subprocess.run([sys.executable, str(script), str(store), "0"], capture_output=True,
                          text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0 and "hits 600" in done.stdout, done.stderr[-2000:]


def _square_noted(x, path):
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(descriptor, f"{x}\n".encode())
    os.close(descriptor)
    return x * x


def test_joblib_batches_are_recorded(tmp_path):
    import joblib

    store = tmp_path / "store"
    side = tmp_path / "side"
    for run in range(2):
        with HPCExecutor("local", max_workers=2, store=store) as ex:
            with joblib.parallel_backend("futures_hpc", executor=ex):
                values = joblib.Parallel(n_jobs=2, batch_size=4)(
                    joblib.delayed(_square_noted)(x, str(side)) for x in range(40))
            assert values == [x * x for x in range(40)]
            hits = ex.store.hits
        ran = side.read_text().split()
        assert sorted(map(int, ran)) == list(range(40))  # the second run ran nothing
        assert (hits > 0) == (run == 1)


# -- the format -------------------------------------------------------------------------------


def _run_squares(ex: HPCExecutor, how: str) -> list[int]:
    if how == "submit":  # a record per call
        return [future.result() for future in [ex.submit(_square, x) for x in range(10)]]
    return list(ex.map(_square, range(10), chunksize=2))  # a record per chunk of 2 calls


@pytest.mark.parametrize("how, calls_per_record", [("submit", 1), ("map", 2)])
def test_a_torn_tail_is_ignored_and_a_torn_record_runs_again(tmp_path, how, calls_per_record):
    store = tmp_path / "store"
    with HPCExecutor("local", max_workers=1, store=store) as ex:
        assert _run_squares(ex, how) == [x * x for x in range(10)]
    worker_segments = [name for name in segments.segment_names(str(store))
                       if Path(name).name.startswith("w-")]
    assert len(worker_segments) == 1
    segment = Path(worker_segments[0])
    data = segment.read_bytes()
    records = list(frames.scan(data))
    assert len(records) == 10 // calls_per_record
    assert {kind for _, kind, *_ in records} == {
        frames.CALL if calls_per_record == 1 else frames.CALLS}
    # Flip a byte in the payload of the third record, cut the last one in half.
    third_offset, *_ , third_length = records[2]
    flipped = bytearray(data)
    flipped[third_offset + frames.HEADER_SIZE + third_length - 1] ^= 0xFF
    last_offset = records[-1][0]
    segment.write_bytes(bytes(flipped[:last_offset + 20]))
    index = read_index(str(store))
    if calls_per_record == 1:
        assert len(index.calls) == 9  # the cut record is not whole; the flipped one is indexed
    else:
        assert len(index.calls) == 6  # a chunk record is read to key its calls: both are out
    with HPCExecutor("local", max_workers=1, store=store) as ex:
        assert _run_squares(ex, how) == [x * x for x in range(10)]
        assert ex.store.hits == 10 - 2 * calls_per_record  # the flipped and the cut ran again


def test_object_store_writes_one_object_per_flush():
    """fsspec's in-memory filesystem stands in for an object store (no append): it is a real
    fsspec filesystem, but only this process sees it, so no executor runs here."""
    from futures_hpc.store.recorder import StoreSpec, TaskRecorder

    location = f"memory://store-{os.getpid()}-{random.random()}"
    store = ResultStore(location, "fhpc-test")
    spec = StoreSpec(store.location, b"f" * 16, tuple(bytes([n]) * 16 for n in range(5)))
    recorder = TaskRecorder(spec)
    for number in range(5):
        recorder.add(number, number * 10)
    recorder.flush()
    index = read_index(store.location)
    assert sorted(ResultStore(location, "again").result(key) for key in spec.keys) == [
        0, 10, 20, 30, 40]
    assert len(index.names) <= 1 + 5  # the run's record, and at most one object per flush
    assert segments.is_store(store.location)


# -- what users get wrong ---------------------------------------------------------------------


@pytest.mark.parametrize("value, text", [
    (5, "store=5 is not allowed"),
    ("", "store='' is not allowed"),
    ("nosuchscheme://bucket/x", "scheme 'nosuchscheme'"),
])
def test_bad_store_values_are_refused_before_anything_starts(value, text, tmp_path):
    with pytest.raises(OptionError, match=text):
        HPCExecutor("local", max_workers=1, store=value)


def test_a_file_is_not_a_store(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(OptionError, match="it is a file"):
        HPCExecutor("local", max_workers=1, store=path)


def test_an_unpicklable_argument_is_named_before_submission(tmp_path):
    import threading

    with HPCExecutor("local", max_workers=1, store=tmp_path / "store") as ex:
        with pytest.raises(CallSerializationError, match="_square"):
            list(ex.map(_square, [1, threading.Lock()]))
        assert ex.status().waiting_calls == 0 and not ex._queue.outstanding()


def test_the_store_command_shows_and_clears(tmp_path):
    from futures_hpc.cli import main

    store = tmp_path / "store"
    with HPCExecutor("local", max_workers=1, store=store) as ex:
        list(ex.map(_square, range(7)))
        ex.submit(random.random).result()
    lines = admin.report(admin.summarize(str(store)))
    text = "\n".join(lines)
    assert "8 calls recorded" in text and "test_store._square" in text, text
    assert main(["store", str(store), "--clear-function", "_square"]) == 0
    summary = admin.summarize(str(store))
    assert sum(summary.calls.values()) == 1
    assert main(["store", str(store), "--clear"]) == 0
    assert not store.exists()
    assert main(["store", str(store)]) == 1


def test_the_store_is_private_to_the_user(tmp_path):
    store = tmp_path / "store"
    with HPCExecutor("local", max_workers=1, store=store) as ex:
        ex.submit(_square, 3).result()
    assert store.stat().st_mode & 0o077 == 0
    for name in segments.segment_names(str(store)):
        assert os.stat(name).st_mode & 0o077 == 0, name
