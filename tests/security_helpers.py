"""Helpers of the security tests: child Pythons running an executor, and what they leave.

Shared by tests/test_security.py (local backend) and the batch backends' test modules.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import dask.config
import psutil

#: dask config keys a child Python must share with the tests.
SHARED_CONFIG_KEYS = ("futures_hpc.log-dir", "futures_hpc.dashboard-address",
                      "futures_hpc.discovery-dir")


def shared_config() -> dict:
    """The tests' configuration, for a child Python."""
    return {key: dask.config.get(key) for key in SHARED_CONFIG_KEYS}


_LISTENING_CHILD = textwrap.dedent("""
    import json, sys
    import dask.config
    from futures_hpc import HPCExecutor
    if __name__ == "__main__":
        backend, options, config = sys.argv[1], *map(json.loads, sys.argv[2:4])
        dask.config.set(config)
        with HPCExecutor(backend, **options) as executor:
            assert executor.submit(sum, [1, 2]).result(120) == 3
            executor.client.wait_for_workers(options.get("max_workers", 1), timeout=120)
            print(executor.cluster.scheduler_address, flush=True)
            sys.stdin.readline()
""")


def listeners_of_a_run(backend: str, options: dict) -> list[tuple[str, int, str]]:
    """``(local address, pid, process name)`` of every TCP listener of a child's run.

    The run's processes: the child, its descendants, and the processes whose command line
    names the run's scheduler (batch workers and nannies), with their descendants.
    """
    config = shared_config()
    child = subprocess.Popen(
        [sys.executable, "-c", _LISTENING_CHILD, backend, json.dumps(options),
         json.dumps(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        scheduler_address = child.stdout.readline().strip()
        assert scheduler_address, child.stderr.read()[-3000:]
        roots = [psutil.Process(child.pid)] + [
            process for process in psutil.process_iter(["cmdline"])
            if scheduler_address in " ".join(process.info["cmdline"] or [])
        ]
        pids = set()
        for root in roots:
            pids |= {root.pid} | {process.pid for process in root.children(recursive=True)}
        listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True,
                                 check=True).stdout
        child.stdin.write("done\n")
        child.stdin.flush()
        child.wait(timeout=120)
    finally:
        child.kill()
        child.wait()
    listeners = []
    for line in listing.splitlines():
        fields = line.split()
        for pid in pids:
            if f"pid={pid}," in line:
                listeners.append((fields[3], pid, fields[-1]))
    return listeners


def open_to_every_interface(listeners: list[tuple[str, int, str]]) -> list:
    """The listeners bound to ``0.0.0.0``, ``[::]`` or ``*``."""
    return [listener for listener in listeners
            if listener[0].rsplit(":", 1)[0] in ("0.0.0.0", "[::]", "*")]



#: A child that runs an executor inside ``with``, prints what it wrote, then waits for a line.
_KEY_CHILD = textwrap.dedent("""
    import json, select, sys
    import dask.config
    from futures_hpc import HPCExecutor
    if __name__ == "__main__":
        backend, options, config = sys.argv[1], *map(json.loads, sys.argv[2:4])
        dask.config.set(config)
        with HPCExecutor(backend, **options) as executor:
            assert executor.submit(sum, [1, 2]).result(120) == 3
            credentials = executor.credentials
            print(json.dumps({
                "run": executor.run_name, "log_dir": str(executor.log_dir),
                "key": str(credentials.key_path) if credentials.key_path else None,
                "certificate": (str(credentials.certificate_path)
                                if credentials.certificate_path else None),
            }), flush=True)
            # Wait for the word to end, waking every 0.2 s: a SIGINT that the kernel hands to
            # another thread of the process does not interrupt a blocking read in this one
            # (seen: 1 run in 9 under load hung past the 120 s the test waits).
            while not select.select([sys.stdin], [], [], 0.2)[0]:
                pass
            sys.stdin.readline()
""")


@dataclass
class ChildRun:
    """A child Python's run, as it reported it, and how the child ended."""

    run: str
    log_dir: Path
    key: Path | None
    certificate: Path | None
    returncode: int | None = None
    stderr: str = ""

    def tls_files(self) -> list[Path]:
        """Files left in the run's TLS directory."""
        directory = self.log_dir / "tls"
        return sorted(directory.iterdir()) if directory.is_dir() else []


def run_child_until_result(backend: str, options: dict, ending: str,
                           stderr_path: Path) -> ChildRun:
    """Start a child executor; once its first result is there, end it by ``ending``.

    ``ending``: ``"normal"`` (the ``with`` block ends), ``"SIGTERM"``, ``"SIGINT"`` or
    ``"SIGKILL"``. Checks that the key file exists (if any) before the child ends.
    """
    with stderr_path.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _KEY_CHILD, backend, json.dumps(options),
             json.dumps(shared_config())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    try:
        line = child.stdout.readline()
        assert line, stderr_path.read_text()[-3000:]
        reported = json.loads(line)
        run = ChildRun(reported["run"], Path(reported["log_dir"]),
                       reported["key"] and Path(reported["key"]),
                       reported["certificate"] and Path(reported["certificate"]))
        if run.key is not None:
            assert run.key.is_file() and run.certificate.is_file()
        if ending == "normal":
            child.stdin.write("done\n")
            child.stdin.flush()
        else:
            child.send_signal(getattr(signal, ending))
        run.returncode = child.wait(timeout=120)
    finally:
        child.kill()
        child.wait()
    run.stderr = stderr_path.read_text()
    return run


def wait_until_gone(paths: list[Path], timeout: float = 10) -> list[Path]:
    """Poll until none of ``paths`` exists; return those still there at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = [path for path in paths if path.exists()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
