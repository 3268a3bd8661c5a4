#!/usr/bin/env bash
# Install Debian's OpenMPI (openmpi-bin, libopenmpi-dev) and make sure the Python mpi4py runs on it:
#   OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -n 4 python ...
# must give 4 distinct ranks of a world of size 4, on Debian's libmpi. mpi4py >= 4 wheels from
# PyPI carry an Open MPI flavour of the extension that loads the system libmpi.so.40 at run time,
# so the wheel normally works as is; if it does not (an older wheel, or one bound to a pip MPICH),
# mpi4py is rebuilt from source against Debian's mpicc:
#   pip install --no-binary mpi4py --no-deps --force-reinstall --no-cache-dir mpi4py==<version>
# Then checks that an sbatch job running `mpirun -n 2 python ...` works on the local SLURM (if
# slurm.sh has run). PYTHON selects the interpreter (default: python3 on PATH).
# A stamp in /var/lib/futures_hpc-ci makes a rerun with nothing changed skip the checks;
# FHPC_VERIFY=1 forces them.
set -euo pipefail
FHPC_NAME=openmpi
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PYTHON=${PYTHON:-python3}
PYTHON=$(command -v "$PYTHON") || fail "no Python interpreter '$PYTHON'"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
check_log=$FHPC_LOG_DIR/openmpi-check.log
register_logs "$check_log"

apt_ensure "${FHPC_MPI_PACKAGES[@]}"

ompi_version=$(dpkg-query -W -f='${Version}' openmpi-bin)
ompi_upstream=${ompi_version%%-*}               # 4.1.4-3+b1 -> 4.1.4
python_real=$("$PYTHON" -c 'import sys; print(sys.executable)')
mpi4py_version() { "$PYTHON" -c 'import mpi4py; print(mpi4py.__version__)' 2>/dev/null || true; }
stamp_file=$FHPC_STATE_DIR/openmpi.ok
stamp() {
    local slurm=""
    if command -v sbatch >/dev/null; then slurm=$(sinfo -h -o %P 2>/dev/null | head -n1) || true; fi
    printf 'openmpi=%s python=%s mpi4py=%s slurm=%s\n' "$ompi_version" "$python_real" \
        "$(mpi4py_version)" "$slurm"
}
if [[ ${FHPC_VERIFY:-0} != 1 && -f $stamp_file && $(cat "$stamp_file") == "$(stamp)" ]]; then
    say "ok: Open MPI $ompi_upstream, mpi4py $(mpi4py_version) (checked before)"
    exit 0
fi
rm -f "$stamp_file"

# Rank 0 gathers every rank over MPI, so a wrong binding (4 singletons of size 1) fails too.
MPI_PROGRAM='
from mpi4py import MPI
comm = MPI.COMM_WORLD
ranks = comm.gather(comm.Get_rank())
if comm.Get_rank() == 0:
    library = MPI.Get_library_version().splitlines()[0]
    print("ranks", sorted(ranks), "size", comm.Get_size(), "library", library, flush=True)
'
mpi_ok() {   # mpi_ok N OUTPUT: OUTPUT shows ranks 0..N-1 of a world of size N on Debian's Open MPI
    local n=$1 output=$2 expected
    expected="ranks [$(seq -s ', ' 0 $((n - 1)))] size $n library Open MPI v$ompi_upstream"
    grep -qF "$expected" "$output"
}

make_scratch
run_mpi4py() {
    (cd "$FHPC_SCRATCH" && timeout 120 mpirun --oversubscribe -n 4 "$PYTHON" -c "$MPI_PROGRAM") \
        >"$FHPC_SCRATCH/mpirun.out" 2>&1
    cat "$FHPC_SCRATCH/mpirun.out" >>"$check_log"
    mpi_ok 4 "$FHPC_SCRATCH/mpirun.out"
}

: >"$check_log"
rebuilt=""
if ! run_mpi4py; then
    version=$(mpi4py_version)
    info "mpi4py ${version:-(missing)} does not run on Debian's Open MPI: building it from source"
    run_logged pip "$PYTHON" -m pip install --no-binary mpi4py --no-deps --force-reinstall \
        --no-cache-dir "mpi4py${version:+==$version}"
    rebuilt=" (rebuilt from source against Debian's Open MPI)"
    run_mpi4py ||
        fail "mpirun -n 4 of mpi4py does not give 4 ranks of size 4 on Open MPI $ompi_upstream" \
            "$FHPC_SCRATCH/mpirun.out"
fi

# mpirun inside a SLURM job: Open MPI takes its slots from the allocation (-n 2).
slurm_note="no SLURM"
if command -v sbatch >/dev/null && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    info "checking mpirun inside an sbatch job"
    printf '%s\n' "$MPI_PROGRAM" >"$FHPC_SCRATCH/mpi_check.py"
    if ! (cd "$FHPC_SCRATCH" && timeout 120 sbatch --wait --quiet -J fhpc-ci-mpi -n 2 -t 2 \
            -o "$FHPC_SCRATCH/sbatch.out" \
            --wrap "mpirun -n 2 '$PYTHON' '$FHPC_SCRATCH/mpi_check.py'") >>"$check_log" 2>&1 ||
            ! mpi_ok 2 "$FHPC_SCRATCH/sbatch.out"; then
        scancel --name fhpc-ci-mpi >/dev/null 2>&1 || true
        fail "sbatch -n 2 --wrap 'mpirun -n 2 python ...' did not give 2 ranks" \
            "$FHPC_SCRATCH/sbatch.out"
    fi
    slurm_note="mpirun in sbatch ok"
fi

stamp >"$stamp_file"
say "ok: Open MPI $ompi_upstream, mpi4py $(mpi4py_version)$rebuilt, 4 ranks with" \
    "mpirun --oversubscribe; $slurm_note"
