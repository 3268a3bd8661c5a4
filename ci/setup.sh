#!/usr/bin/env bash
# Install and start everything the test suite needs on a fresh Debian 12 machine, as root:
# SLURM, SLURM's PBS wrappers, Grid Engine, OpenMPI (+ mpi4py check), moto server.
# Every package comes from one apt-get update and one apt-get install; each step is a ci/*.sh
# script that can also be run alone. Idempotent: a second run only checks and exits.
# Order: packages (gridengine-client and slurm-wlm-torque conflict, so the PBS wrappers are
# unpacked, not installed) -> slurm -> pbs (needs SLURM) -> sge -> openmpi (its sbatch check needs
# SLURM) -> moto.
set -euo pipefail
FHPC_NAME=setup
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

started=$(date +%s)
step=""
on_exit() {
    local rc=$?
    if (( rc != 0 )); then
        printf '\nsetup: FAILED in step "%s" (exit %s); see the messages above and %s\n' \
            "$step" "$rc" "$FHPC_LOG_DIR" >&2
    fi
}
trap on_exit EXIT

run_step() {   # run_step NAME COMMAND...
    step=$1; shift
    "$@"
}

all_packages=("${FHPC_SLURM_PACKAGES[@]}" "${FHPC_PBS_PACKAGES[@]}" "${FHPC_SGE_PACKAGES[@]}"
    "${FHPC_MPI_PACKAGES[@]}")
step=packages
if [[ -n $(missing_packages "${all_packages[@]}") ]]; then
    sge_preseed
    # apt-get update + install; exports FHPC_APT_UPDATED=1 so no step script updates again.
    run_step packages apt_ensure "${all_packages[@]}"
    say "packages installed in $(( $(date +%s) - started )) s"
fi

run_step slurm bash "$FHPC_CI_DIR/slurm.sh"
run_step pbs bash "$FHPC_CI_DIR/pbs.sh"
run_step sge bash "$FHPC_CI_DIR/sge.sh"
run_step openmpi bash "$FHPC_CI_DIR/openmpi.sh"
run_step moto bash "$FHPC_CI_DIR/moto.sh"

# SLURM and Grid Engine side by side: /usr/bin/qsub is Grid Engine's, and the PBS directory first
# on PATH makes qsub SLURM's wrapper.
step=coexistence
pbs_dir=$(cat /opt/futures_hpc-pbs/PATHDIR)
[[ $(command -v sbatch) == /usr/bin/sbatch ]] || fail "sbatch is not /usr/bin/sbatch"
sge_banner=$(SGE_ROOT=/var/lib/gridengine /usr/bin/qsub -help 2>&1 | sed -n 1p) || true
[[ $(command -v qsub) == /usr/bin/qsub && $sge_banner == SGE* ]] ||
    fail "qsub on PATH is not Grid Engine's /usr/bin/qsub ($(command -v qsub): $sge_banner)"
[[ $(PATH="$pbs_dir:$PATH" command -v qsub) == "$pbs_dir/qsub" ]] ||
    fail "with $pbs_dir first on PATH, qsub is not SLURM's PBS wrapper"
step=""

say "all up in $(( $(date +%s) - started )) s:"
cat <<EOF
  slurm  : sbatch/squeue in /usr/bin; partition debug (node $(hostname -s), 8 one-core jobs fit)
  pbs    : export PATH="$pbs_dir:\$PATH"    (also in /opt/futures_hpc-pbs/PATHDIR)
  sge    : . /etc/futures_hpc-sge.env        (SGE_ROOT=/var/lib/gridengine, queue all.q, PE smp)
  openmpi: OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe ...
  moto   : http://127.0.0.1:${MOTO_PORT:-5055}
  stop   : bash ci/stop.sh
EOF
