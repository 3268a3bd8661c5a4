"""Security of the local backend and of TLS files, tested as an attacker and a user would.

- Another OS user (``nobody``), or this user with a self-made certificate, tries to run code
  through each listener of a local executor: its scheduler, a worker and a nanny, with plain
  TCP and with TLS. The code would write a marker file: it must not appear. The same attack on
  an executor made with ``security=False`` succeeds, which shows the attack itself works.
- A local run writes no key file; its listeners are on 127.0.0.1 only (``ss -ltnp``).
- Key files are deleted by the executor's close, and those of killed runs by the next start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import dask.config
import distributed
import psutil
import pytest

from futures_hpc import LocalExecutor
from futures_hpc.integrations.dask import running_cluster_names
from futures_hpc.security import (
    CERTIFICATE_FILE,
    KEY_FILE,
    create_run_credentials,
    remove_run_credentials,
)
from tests.security_helpers import (
    listeners_of_a_run,
    open_to_every_interface,
    run_child_until_result,
)

#: What an attacker runs: every way in, against every listener address it is given.
_ATTACK_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, sys
    from distributed import Client
    from distributed.core import rpc
    from distributed.protocol.pickle import dumps
    from distributed.security import Security

    marker, targets = sys.argv[1], json.loads(sys.argv[2])

    def write_marker():
        with open(marker, "a") as handle:
            handle.write(f"ran in {os.getpid()}\\n")
        return "ran"

    results = {}

    def attempt(label, function):
        try:
            results[label] = f"RAN: {function()!r}"
        except BaseException as error:
            results[label] = f"refused: {type(error).__name__}: {error}"[:300]

    self_made = Security.temporary()
    for kind, address in targets:
        host_port = address.split("://", 1)[1]
        for scheme, security in (("tcp", None), ("tls", self_made)):
            target = f"{scheme}://{host_port}"
            if kind == "scheduler":
                def through_client(target=target, security=security):
                    with Client(target, security=security, timeout=3,
                                set_as_default=False) as client:
                        return client.submit(write_marker, pure=False).result(timeout=10)
                attempt(f"{kind} {scheme} Client", through_client)
            handler = "run_function" if kind == "scheduler" else "run"

            async def through_rpc(target=target, security=security, handler=handler):
                arguments = security.get_connection_args("client") if security else {}
                remote = rpc(target, connection_args=arguments, timeout=3)
                try:
                    return await asyncio.wait_for(
                        getattr(remote, handler)(function=dumps(write_marker)), 10)
                finally:
                    await remote.close_rpc()

            attempt(f"{kind} {scheme} rpc {handler}", lambda f=through_rpc: asyncio.run(f()))
    print(json.dumps(results))
""")


def _listener_addresses(executor: LocalExecutor) -> list[tuple[str, str]]:
    """The scheduler's, the workers' and the nannies' addresses of a local executor."""
    targets = [("scheduler", executor.cluster.scheduler_address)]
    targets += [("worker", address) for address in executor.client.scheduler_info()["workers"]]
    targets += [("nanny", nanny.address) for nanny in executor.cluster.workers.values()]
    return targets


_ATTACKER_IMPORTS = (
    "import distributed, distributed.cli.dask_worker, distributed.protocol.pickle; "
    "from distributed.security import Security; Security.temporary(); import sys; "
    "print('\\n'.join(sorted({name.split('.')[0] for name in sys.modules})))"
)


@pytest.fixture(scope="module")
def attacker_python() -> tuple[str, dict[str, str]]:
    """A Python that ``nobody`` can run, with distributed: the system's, and a copy of ours.

    This interpreter's packages live under a directory other users cannot enter, so the
    packages the attack imports are copied to a directory anyone can read.
    """
    interpreter = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(interpreter, os.X_OK):
        pytest.fail(f"{interpreter} is needed to run code as another user")
    names = subprocess.run([sys.executable, "-c", _ATTACKER_IMPORTS], capture_output=True,
                           text=True, check=True).stdout.split()
    site_packages = Path(distributed.__file__).parent.parent
    copy = Path(tempfile.mkdtemp(prefix="futures_hpc-attacker-site-packages-"))
    for name in names:
        for source in [site_packages / name, *site_packages.glob(f"{name}.*.so"),
                       site_packages / f"{name}.py"]:
            if source.is_dir():
                shutil.copytree(source, copy / name, dirs_exist_ok=True)
            elif source.is_file():
                shutil.copy2(source, copy / source.name)
    subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
    environment = {"PATH": os.environ["PATH"], "HOME": "/tmp", "PYTHONPATH": str(copy)}
    yield interpreter, environment
    shutil.rmtree(copy, ignore_errors=True)


def _attack(targets: list[tuple[str, str]], marker: Path, as_nobody: bool,
            attacker_python: tuple[str, dict[str, str]]) -> dict[str, str]:
    arguments = ["-c", _ATTACK_SCRIPT, str(marker), json.dumps(targets)]
    if as_nobody:
        interpreter, environment = attacker_python
        command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                   interpreter, *arguments]
    else:
        command, environment = [sys.executable, *arguments], dict(os.environ)
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd="/",
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def marker():
    """Where the attacker's code would write; writable by anyone."""
    directory = Path(tempfile.mkdtemp(prefix="futures_hpc-marker-"))
    directory.chmod(0o777)
    yield directory / "marker"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("as_nobody", [True, False], ids=["user nobody", "this user"])
def test_nobody_else_can_run_code_through_any_listener_of_a_local_executor(
    marker, as_nobody, attacker_python
):
    if as_nobody and shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run as another user")
    with LocalExecutor(max_workers=1) as executor:
        targets = _listener_addresses(executor)
        assert [kind for kind, _ in targets] == ["scheduler", "worker", "nanny"], targets
        assert all(address.startswith("tls://127.0.0.1:") for _, address in targets), targets
        results = _attack(targets, marker, as_nobody, attacker_python)
        assert executor.submit(sum, [1, 2]).result(timeout=60) == 3  # unharmed
    assert len(results) == 8, results
    ran = {label: outcome for label, outcome in results.items() if not outcome.startswith(
        "refused")}
    assert ran == {}, results
    assert not marker.exists(), marker.read_text()


@pytest.mark.timeout(300)
def test_the_same_attack_succeeds_without_security(marker, attacker_python):
    """The control: with ``security=False`` the attack runs code, so the test above can fail."""
    with LocalExecutor(max_workers=1, security=False) as executor:
        targets = _listener_addresses(executor)
        results = _attack(targets, marker, True, attacker_python)
    assert results["scheduler tcp Client"] == "RAN: 'ran'", results
    assert results["worker tcp rpc run"].startswith("RAN"), results
    assert results["nanny tcp rpc run"].startswith("RAN"), results
    assert marker.exists()


def test_local_tls_is_on_by_default_and_writes_no_key_file(tmp_path):
    with dask.config.set({"futures_hpc.log-dir": str(tmp_path)}):
        with LocalExecutor(max_workers=1) as executor:
            assert executor.cluster.scheduler_address.startswith("tls://127.0.0.1:")
            assert executor.credentials.in_memory
            assert executor.credentials.key_path is None
            assert "PRIVATE KEY" in executor.credentials.key_pem
            assert executor.submit(sum, [1, 2]).result(timeout=60) == 3
            files_during_the_run = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert files_during_the_run == []
    assert not any("PRIVATE KEY" in path.read_text(errors="replace")
                   for path in tmp_path.rglob("*") if path.is_file())


@pytest.mark.timeout(300)
def test_a_local_run_listens_on_127_0_0_1_only():
    listeners = listeners_of_a_run("local", {"max_workers": 2})
    # Scheduler, its dashboard, 2 nannies, and 2 workers with their HTTP servers.
    assert len(listeners) == 8, listeners
    assert open_to_every_interface(listeners) == []
    assert {address.rsplit(":", 1)[0] for address, _, _ in listeners} == {"127.0.0.1"}


def test_remove_run_credentials_deletes_the_files_and_the_directory_only(tmp_path):
    credentials = create_run_credentials(tmp_path / "run" / "tls")
    assert credentials.key_path.read_text() == credentials.key_pem
    other = tmp_path / "run" / "tls" / "notes.txt"
    assert remove_run_credentials(credentials.certificate_path, credentials.key_path)
    assert not credentials.key_path.exists() and not credentials.certificate_path.exists()
    assert not (tmp_path / "run" / "tls").exists()
    # A name that is not one of ours is never deleted, whatever a record says.
    other.parent.mkdir()
    other.write_text("keep")
    assert not remove_run_credentials(other, other)
    assert other.read_text() == "keep"
    assert (KEY_FILE, CERTIFICATE_FILE) == ("run-key.pem", "run-certificate.pem")


def test_an_executor_start_deletes_the_tls_files_of_a_dead_run(tmp_path):
    discovery = tmp_path / "discovery"
    discovery.mkdir()
    credentials = create_run_credentials(tmp_path / "fhpc-deadbeef" / "tls")
    dead = psutil.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (discovery / "fhpc-deadbeef.json").write_text(json.dumps({
        "name": "fhpc-deadbeef", "scheduler_address": "tls://127.0.0.1:1", "pid": dead.pid,
        "host": os.uname().nodename, "created": 0,
        "tls_certificate": str(credentials.certificate_path),
        "tls_key": str(credentials.key_path),
    }))
    with dask.config.set({"futures_hpc.discovery-dir": str(discovery)}):
        assert credentials.key_path.exists()
        executor = LocalExecutor(max_workers=1)
        try:
            assert not credentials.key_path.exists()
            assert not credentials.certificate_path.exists()
            # The dead run's record is gone; the live executor's own record is there.
            assert running_cluster_names() == [executor.run_name]
        finally:
            executor.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ending", ["normal", "SIGTERM", "SIGINT"])
def test_a_local_run_never_has_a_key_file_however_it_ends(ending, tmp_path):
    run = run_child_until_result("local", {"max_workers": 1}, ending, tmp_path / "stderr")
    assert run.key is None and run.certificate is None
    assert run.tls_files() == []
    assert not (run.log_dir / "tls").exists()
    if ending == "normal":
        assert run.returncode == 0, run.stderr[-3000:]
