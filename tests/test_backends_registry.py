"""The backend registry: choice order, auto-detection, entry points, availability."""

from __future__ import annotations

import os
import shutil
import sys

import dask.config
import pytest

import futures_hpc
from futures_hpc import HPCExecutor, LocalExecutor, available_backends
from futures_hpc.backends import (
    BUILTIN_BACKENDS,
    choose_backend,
    detect_backend,
    load_backend,
    registered_backends,
)
from futures_hpc.errors import BackendUnavailableError, UnknownBackendError


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError) as caught:
        HPCExecutor("slrum")
    assert isinstance(caught.value, UnknownBackendError)
    message = str(caught.value)
    assert "Did you mean 'slurm'" in message
    for name in BUILTIN_BACKENDS:
        assert name in message


def test_argument_wins(monkeypatch):
    monkeypatch.setenv("FUTURES_HPC_BACKEND", "sge")
    assert choose_backend("local") == ("local", "given as an argument")


def test_environment_variable_beats_config(monkeypatch):
    monkeypatch.setenv("FUTURES_HPC_BACKEND", "local")
    with dask.config.set({"futures_hpc.backend": "slurm"}):
        assert choose_backend() == ("local", "from FUTURES_HPC_BACKEND")


def test_profile_backend_then_config_key():
    profiles = {"cloud": {"backend": "ecs"}}
    with dask.config.set({"futures_hpc.profiles": profiles, "futures_hpc.backend": "sge"}):
        assert choose_backend(profile="cloud")[0] == "ecs"
        assert choose_backend() == ("sge", "from dask config futures_hpc.backend")


def test_config_backend_gives_that_subclass():
    with dask.config.set({"futures_hpc.backend": "local"}):
        with HPCExecutor(max_workers=1) as executor:
            assert type(executor) is LocalExecutor


def _path_with(monkeypatch, *commands):
    """A PATH holding only the real commands named (symlinked), plus python."""
    directory = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fhpc-path-{os.getpid()}")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    for command in commands:
        target = command if os.path.isabs(command) else shutil.which(command)
        os.symlink(target, os.path.join(directory, os.path.basename(target)))
    monkeypatch.setenv("PATH", directory)
    for variable in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(variable, raising=False)
    return directory


def test_detection_without_batch_commands_is_local(monkeypatch):
    _path_with(monkeypatch)
    monkeypatch.delenv("SGE_ROOT", raising=False)
    assert detect_backend()[0] == "local"
    assert choose_backend()[0] == "local"


def test_detection_of_slurm_from_the_real_sbatch(monkeypatch):
    if not shutil.which("sbatch"):
        pytest.skip("sbatch is not installed (ci/slurm.sh installs it)")
    _path_with(monkeypatch, "sbatch")
    name, why = detect_backend()
    assert name == "slurm" and "sbatch" in why


def test_detection_of_sge_and_pbs_from_qsub(monkeypatch):
    qsub = shutil.which("qsub", path=os.environ.get("PATH", "") + ":/usr/bin")
    if not qsub:
        pytest.skip("no qsub installed (ci/sge.sh installs Grid Engine)")
    _path_with(monkeypatch, qsub)
    monkeypatch.setenv("SGE_ROOT", "/var/lib/gridengine")
    assert detect_backend()[0] == "sge"
    monkeypatch.delenv("SGE_ROOT")
    assert detect_backend()[0] == "pbs"


def test_detection_of_mpi_ranks(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    name, why = detect_backend()
    assert name == "mpi" and "4" in why


def test_available_backends_lists_every_known_backend_with_reasons():
    infos = {info.name: info for info in available_backends()}
    assert set(BUILTIN_BACKENDS) <= set(infos)
    assert infos["local"].available
    for info in infos.values():
        assert info.reason, info


def test_third_party_backend_through_entry_points(tmp_path, monkeypatch):
    package = tmp_path / "thirdparty_backend.py"
    package.write_text(
        "from futures_hpc.backends.local import LocalExecutor\n"
        "class ThirdPartyExecutor(LocalExecutor):\n"
        "    backend_name = 'thirdparty'\n"
    )
    dist_info = tmp_path / "thirdparty_backend-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-backend\n"
                                        "Version: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[futures_hpc.backends]\nthirdparty = thirdparty_backend:ThirdPartyExecutor\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registered_backends()["thirdparty"] == "thirdparty_backend:ThirdPartyExecutor"
    executor_class = load_backend("thirdparty")
    with HPCExecutor("thirdparty", max_workers=1) as executor:
        assert type(executor) is executor_class
        assert executor.submit(sum, [1, 2]).result(timeout=60) == 3
    sys.modules.pop("thirdparty_backend", None)


def test_missing_optional_dependency_is_backend_unavailable(tmp_path, monkeypatch):
    (tmp_path / "broken_backend.py").write_text("import module_that_does_not_exist\n")
    dist_info = tmp_path / "broken_backend-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-backend\n"
                                        "Version: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[futures_hpc.backends]\nbroken = broken_backend:BrokenExecutor\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="module_that_does_not_exist"):
        load_backend("broken")
    assert not {info.name: info for info in available_backends()}["broken"].available


def test_public_names():
    for name in futures_hpc.__all__:
        if name not in ("SLURMExecutor", "PBSExecutor", "SGEExecutor", "MPIExecutor",
                        "ECSExecutor"):
            assert getattr(futures_hpc, name)


def test_detection_skips_a_batch_system_whose_packages_are_missing(monkeypatch):
    """dask-jobqueue is hidden with ``sys.modules[...] = None`` (Python's own way of making an
    import fail): it is installed here, and a fresh ``pip install futures_hpc`` without the
    extra cannot be had inside this process."""
    if not shutil.which("sbatch"):
        pytest.skip("sbatch is not installed (ci/slurm.sh installs it)")
    _path_with(monkeypatch, "sbatch")
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    name, why = detect_backend()
    assert name == "local"
    assert "dask-jobqueue is not installed" in why and "futures_hpc[jobqueue]" in why
