"""Run the executor suite on rank 0 of an mpirun world; tests/backends/test_mpi.py launches it.

    mpirun -n 4 python tests/backends/mpi_scripts/run_suite.py [pytest arguments]

Every rank joins the world first: ranks 1.. then serve the executors that the tests on rank 0
create, and exit when rank 0's process ends. Rank 0's exit status is pytest's, and so is every
other rank's.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPOSITORY))

from futures_hpc.backends.mpi_world import join_world  # noqa: E402

world = join_world()  # on ranks 1.., serves here and ends the process

import pytest  # noqa: E402

status = int(pytest.main([
    str(Path(__file__).with_name("mpi_suite.py")),
    "--rootdir", str(REPOSITORY),
    "-p", "no:cacheprovider",
    *sys.argv[1:],
]))
world.exit_status = status
sys.exit(status)
