"""A user's script, as tests/backends/test_mpi.py runs it under mpirun (and inside sbatch).

    python client_script.py OUT_DIR MODE

MODE ``ok``: ``HPCExecutor()`` (which must pick MPI by itself), a map, the results written to
OUT_DIR/results.json. MODE ``raise``: the same, then an exception on the client rank. MODE
``finalize``: the same as ``ok``, then an explicit ``MPI.Finalize()`` on rank 0. MODE
``layout``: the same as ``ok``, and where the client, the scheduler and the workers run written
to OUT_DIR/layout.json. Every rank other than 0 records in OUT_DIR/rank-<rank>.exit the status
``HPCExecutor()`` ended it with; a rank on which ``HPCExecutor()`` raised records the message in
OUT_DIR/rank-<rank>.error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from futures_hpc import HPCExecutor
from futures_hpc.errors import BackendUnavailableError


def square_and_rank(number):
    return number * number, os.environ.get("OMPI_COMM_WORLD_RANK")


def rank_and_pid():
    return os.environ.get("OMPI_COMM_WORLD_RANK"), os.getpid()


def tick_period(dask_worker) -> int:
    """The worker's event-loop tick period, in ms (futures_hpc.dask_settings: 200)."""
    return dask_worker.periodic_callbacks["tick"].callback_time


def layout(executor) -> dict:
    """Where the client, the scheduler and the workers of ``executor`` run."""
    client = executor.client
    return {
        "client rank": os.environ.get("OMPI_COMM_WORLD_RANK"),
        "client pid": os.getpid(),
        "scheduler pid": client.run_on_scheduler(os.getpid),
        "scheduler in this process": executor.cluster.scheduler is not None
        and executor.cluster.scheduler.address == executor.cluster.scheduler_address,
        "scheduler address": executor.cluster.scheduler_address,
        "workers": sorted(client.run(rank_and_pid).values()),
        "status workers": executor.status().workers,
        "worker tick periods": sorted(client.run(tick_period).values()),
    }


def main() -> None:
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK", "none")
    try:
        executor = HPCExecutor()
    except SystemExit as ending:
        (out_dir / f"rank-{rank}.exit").write_text(str(ending.code))
        raise
    except BackendUnavailableError as error:
        (out_dir / f"rank-{rank}.error").write_text(str(error))
        raise
    with executor:
        results = list(executor.map(square_and_rank, range(20)))
        (out_dir / "results.json").write_text(
            json.dumps({"executor": type(executor).__name__, "results": results})
        )
        if mode == "layout":
            (out_dir / "layout.json").write_text(json.dumps(layout(executor)))
        if mode == "raise":
            raise ValueError("the client failed on purpose")
    if mode == "finalize":
        from mpi4py import MPI

        MPI.Finalize()


if __name__ == "__main__":
    main()
