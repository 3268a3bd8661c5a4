#!/usr/bin/env bash
# PBS commands (qsub, qstat, qdel, ...) on top of the local SLURM, from SLURM's own perl wrappers
# (Debian's slurm-wlm-torque). That package conflicts with gridengine-client (both own
# /usr/bin/qsub), so it is not installed: its .deb is unpacked into a directory of its own and
# only the PBS tests put that directory first on PATH:
#     export PATH="$(cat /opt/futures_hpc-pbs/PATHDIR):$PATH"
# The wrappers run "${FindBin::Bin}/sbatch" (and salloc, srun), i.e. from their own folder, so
# those are symlinked there; qstat/qdel use the Slurm perl bindings (libslurm-perl,
# libslurmdb-perl) and qsub needs libswitch-perl.
# Needs slurm.sh to have run. FHPC_VERIFY=1 forces the qsub/qstat/qdel check.
set -euo pipefail
FHPC_NAME=pbs
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PBS_ROOT=/opt/futures_hpc-pbs
PBS_BIN=$PBS_ROOT/usr/bin
register_logs /var/log/slurm/slurmctld.log

command -v sbatch >/dev/null || fail "sbatch not found: run ci/slurm.sh first"
apt_ensure "${FHPC_PBS_PACKAGES[@]}"

# The wrappers must match the installed SLURM exactly (the perl bindings are version-locked).
version=$(dpkg-query -W -f='${Version}' slurm-client)
fresh=0
if [[ ! -x $PBS_BIN/qsub || $(cat "$PBS_ROOT/VERSION" 2>/dev/null) != "$version" ]]; then
    info "unpacking slurm-wlm-torque $version into $PBS_ROOT"
    make_scratch
    chown _apt "$FHPC_SCRATCH" 2>/dev/null || true     # apt-get download runs as _apt
    if ! (cd "$FHPC_SCRATCH" && apt-get download -q "slurm-wlm-torque=$version") \
            >>"$FHPC_LOG_DIR/apt.log" 2>&1; then
        apt_update_once      # the package lists may be older than the installed SLURM
        (cd "$FHPC_SCRATCH" && run_logged apt apt-get download -q "slurm-wlm-torque=$version")
    fi
    rm -rf "$PBS_ROOT.new"
    dpkg -x "$FHPC_SCRATCH"/slurm-wlm-torque_*.deb "$PBS_ROOT.new"
    for command in sbatch salloc srun; do
        ln -sfn "/usr/bin/$command" "$PBS_ROOT.new/usr/bin/$command"
    done
    printf '%s\n' "$version" >"$PBS_ROOT.new/VERSION"
    printf '%s\n' "$PBS_BIN" >"$PBS_ROOT.new/PATHDIR"
    rm -rf "$PBS_ROOT"
    mv "$PBS_ROOT.new" "$PBS_ROOT"
    fresh=1
fi

pbs() { PATH="$PBS_BIN:$PATH" "$@"; }
[[ $(pbs command -v qsub) == "$PBS_BIN/qsub" ]] || fail "qsub on PATH is not $PBS_BIN/qsub"

if (( fresh )) || [[ ${FHPC_VERIFY:-0} == 1 ]]; then
    info "checking qsub/qstat/qdel"
    make_scratch
    check_log=$FHPC_LOG_DIR/pbs-check.log
    : >"$check_log"
    cat >"$FHPC_SCRATCH/job.sh" <<'EOF'
#!/bin/bash
#PBS -N fhpc-ci-pbs
#PBS -l walltime=00:01:00
sleep 60
EOF
    job_id=$(cd "$FHPC_SCRATCH" && pbs qsub job.sh 2>>"$check_log") ||
        fail "qsub failed" "$check_log"
    [[ $job_id =~ ^[0-9]+$ ]] || fail "qsub printed '$job_id', not a bare job number" "$check_log"
    slurm_state() { squeue -h -t all -j "$job_id" -o '%T' 2>/dev/null; }
    job_running() { [[ $(slurm_state) == RUNNING ]]; }
    wait_until 30 job_running || fail "PBS job $job_id is '$(slurm_state)' in SLURM, not RUNNING"
    time_limit=$(scontrol show job "$job_id" | grep -o 'TimeLimit=[^ ]*')
    [[ $time_limit == TimeLimit=00:01:00 ]] ||
        fail "#PBS -l walltime=00:01:00 gave PBS job $job_id $time_limit in SLURM"
    pbs qstat >"$FHPC_SCRATCH/qstat.out" 2>>"$check_log" || fail "qstat failed" "$check_log"
    grep -q "^$job_id" "$FHPC_SCRATCH/qstat.out" ||
        fail "qstat does not list job $job_id" "$FHPC_SCRATCH/qstat.out"
    pbs qdel "$job_id" >>"$check_log" 2>&1 || fail "qdel $job_id failed" "$check_log"
    job_gone() { [[ $(slurm_state) =~ ^(CANCELLED|)$ ]]; }
    wait_until 20 job_gone || fail "PBS job $job_id is '$(slurm_state)' after qdel"
fi

say "up: PBS wrappers for SLURM in $PBS_BIN (put it first on PATH; also in $PBS_ROOT/PATHDIR)"
