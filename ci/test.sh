#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: installs the Debian packages and
# starts SLURM, SLURM's PBS wrappers, Grid Engine, OpenMPI and moto server (ci/setup.sh), installs
# futures_hpc with every extra and the test tools, checks style, runs every test on the newest
# versions, then the local and SLURM subset on the oldest versions pyproject.toml accepts.
# Idempotent: on a machine where all of that is up it goes straight to the checks.
# Extra arguments go to pytest (e.g. bash ci/test.sh -k slurm).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Scheduler tests fail instead of skipping when a service is missing (see conftest.require).
export CI="${CI:-true}"

started=$(date +%s)
echo "== ci/test.sh: schedulers and services"
bash ci/setup.sh

echo "== ci/test.sh: python packages"
python3 -m pip install --disable-pip-version-check --progress-bar off -q -e '.[test]' 2>&1 |
    grep -v -E "Running pip as the 'root' user|^WARNING: Running pip" || true
python3 -c "import futures_hpc, dask_jobqueue, mpi4py, boto3, moto, zarr, joblib, sklearn" || {
    echo "ci/test.sh: the Python packages did not install" >&2
    exit 1
}

echo "== ci/test.sh: style (ruff)"
ruff check .

echo "== ci/test.sh: tests (set-up took $(( $(date +%s) - started )) s)"
# The SGE tests read SGE_ROOT/SGE_CELL from here; the PBS tests put the wrapper dir first on PATH.
set -a
# shellcheck disable=SC1091
. /etc/futures_hpc-sge.env
set +a
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
status=0
python3 -m pytest -p no:cacheprovider "$@" || status=$?
echo "== ci/test.sh: the oldest versions pyproject.toml accepts (ci/oldest.sh)"
bash ci/oldest.sh || status=$?
echo "== ci/test.sh: done in $(( $(date +%s) - started )) s (pytest exit $status)"
exit "$status"
