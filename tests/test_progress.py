"""Progress bars: drawn on a terminal, nothing written to a file or pipe."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time

import pytest

from futures_hpc.progress import track

#: A map with progress=True on the local backend; prints the results on standard output.
MAP_SCRIPT = textwrap.dedent(
    """
    import dask.config
    dask.config.set({"futures_hpc.dashboard-address": "localhost:0",
                     "futures_hpc.log-dir": %(log_dir)r})
    from futures_hpc import HPCExecutor

    def square(x):
        return x * x

    if __name__ == "__main__":
        with HPCExecutor("local", max_workers=2) as ex:
            print(sum(ex.map(square, range(40), chunksize=4, progress=True)))
    """
)


def run_with_terminal_stderr(
    command: list[str], rows: int = 24, columns: int = 100, env: dict[str, str] | None = None
) -> tuple[str, str]:
    """Run ``command`` with its standard error on a pseudo-terminal of the given size.

    Returns its standard output and what it drew on the terminal.
    """
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=terminal, text=True, env=env
    )
    os.close(terminal)
    drawn = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        elif process.poll() is not None:
            break
    output = process.communicate(timeout=60)[0]
    os.close(controller)
    assert process.returncode == 0, drawn.decode(errors="replace")
    return output, drawn.decode(errors="replace")


@pytest.mark.parametrize("rows, columns", [(24, 100), (0, 0)], ids=["sized", "size-unknown"])
def test_map_progress_bar_is_drawn_on_a_terminal(tmp_path, rows, columns):
    output, drawn = run_with_terminal_stderr(
        [sys.executable, "-c", MAP_SCRIPT % {"log_dir": str(tmp_path)}], rows, columns
    )
    assert output.strip() == str(sum(x * x for x in range(40)))
    assert "square" in drawn
    assert "40/40" in drawn
    assert "100%" in drawn


def test_map_progress_writes_nothing_to_a_pipe(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", MAP_SCRIPT % {"log_dir": str(tmp_path)}],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert completed.stdout.strip() == str(sum(x * x for x in range(40)))
    assert "40/40" not in completed.stderr
    assert "%|" not in completed.stderr
    assert "\r" not in completed.stderr


def test_track_passes_items_through_when_disabled(tmp_path):
    log_file = tmp_path / "log.txt"
    with log_file.open("w") as stream:
        assert list(track(iter(range(5)), 5, stream=stream)) == [0, 1, 2, 3, 4]
    assert log_file.read_text() == ""


def test_closing_the_bar_closes_the_wrapped_iterator(tmp_path):
    closed = []

    def items():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    with (tmp_path / "bar.txt").open("w") as stream:
        iterator = track(items(), 10, stream=stream, enabled=True)
        assert next(iterator) == 0
        iterator.close()
    assert closed == [True]


def test_the_note_shows_after_the_bar_while_no_item_arrives(tmp_path):
    """A batch executor's note (why its jobs wait) is drawn even before the first result."""
    notes = iter(["queue: Priority"] * 2 + ["queue: RUNNING"] * 100)

    def slow_items():
        time.sleep(3.5)  # no result yet: the note must still be drawn, and redrawn on change
        yield from range(3)

    path = tmp_path / "bar.txt"
    with path.open("w") as stream:
        assert list(track(slow_items(), 3, stream=stream, enabled=True,
                          note=lambda: next(notes))) == [0, 1, 2]
    drawn = path.read_text()
    assert 0 <= drawn.find("queue: Priority") < drawn.find("queue: RUNNING") < drawn.find(
        "3/3"), drawn


def test_a_failing_note_does_not_break_the_bar(tmp_path):
    def broken() -> str:
        raise RuntimeError("no scheduler")

    with (tmp_path / "bar.txt").open("w") as stream:
        assert list(track(iter(range(4)), 4, stream=stream, enabled=True, note=broken)) == [
            0, 1, 2, 3]
