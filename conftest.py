"""Shared pytest set-up: configuration for tests, and what real services this machine runs.

The scheduler tests need the real daemons that ``ci/setup.sh`` installs and starts. In CI
(``CI=true``) a missing service fails its tests instead of skipping them: a skip would hide a gap.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import dask.config
import pytest

_LOG_DIR = tempfile.mkdtemp(prefix="futures_hpc-test-logs-")

# Dashboards on free ports (8787 may be taken) and run directories out of the work tree.
dask.config.set(
    {
        "futures_hpc.dashboard-address": "localhost:0",
        "futures_hpc.log-dir": _LOG_DIR,
        "futures_hpc.discovery-dir": os.path.join(_LOG_DIR, "discovery"),
        "distributed.admin.system-monitor.gil.enabled": False,
    }
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip the test when ``condition`` is false, except in CI, where it fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this, but: {reason}")
    pytest.skip(reason)


def command_available(name: str) -> bool:
    """Whether ``name`` is on PATH."""
    return shutil.which(name) is not None


@pytest.fixture(autouse=True)
def _no_backend_from_environment(monkeypatch):
    """Tests choose their backend explicitly; the developer's FUTURES_HPC_BACKEND is ignored."""
    monkeypatch.delenv("FUTURES_HPC_BACKEND", raising=False)
