#!/usr/bin/env bash
# Install and start a single-node SLURM 22.05 (munge, slurmctld, slurmd) on this machine, as root,
# without systemd. Idempotent: with everything up it only checks the node state and exits; dead
# daemons are restarted, a DOWN/DRAINED node is resumed, a changed slurm.conf restarts SLURM.
# Accounting is off (no slurmdbd): job states come from `squeue -t all` / `scontrol show job`,
# which keep finished jobs for MinJobAge=300 s.
# FHPC_VERIFY=1 forces the check job even when nothing was (re)started.
set -euo pipefail
FHPC_NAME=slurm
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SLURM_CONF=/etc/slurm/slurm.conf
SLURM_LOG_DIR=/var/log/slurm
CTLD_LOG=$SLURM_LOG_DIR/slurmctld.log
SLURMD_LOG=$SLURM_LOG_DIR/slurmd.log
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_LOG=/var/log/munge/munged.log
MUNGE_PID=/run/munge/munged.pid
register_logs "$MUNGE_LOG" "$CTLD_LOG" "$SLURMD_LOG"

ensure_host_resolves
HOST=$(hostname -s)
changed=0        # something was (re)started or reconfigured: run the check job

apt_ensure "${FHPC_SLURM_PACKAGES[@]}"

# --- munge ----------------------------------------------------------------------------------
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
if ! munge_ok >/dev/null 2>&1; then
    info "starting munged"
    if [[ ! -s /etc/munge/munge.key ]]; then
        run_logged slurm mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    stop_pidfile "$MUNGE_PID" munged 5          # a hung munged that no longer answers
    # --force: run as root and remove a stale socket left by a killed munged.
    run_logged slurm munged --force
    wait_until 15 munge_ok || fail "munged does not answer (munge -n | unmunge)"
    changed=1
fi

# --- slurm.conf -----------------------------------------------------------------------------
# Node line from the hardware as slurmd sees it, RealMemory 10% lower (a node whose RealMemory is
# above what slurmd measures is drained with "Low RealMemory").
node_line=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') || fail "slurmd -C printed no node line"
real_memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
[[ -n $real_memory ]] || fail "no RealMemory in '$node_line'"
node_memory=$(( real_memory * 9 / 10 ))
node_line=$(sed -e "s/RealMemory=[0-9]*/RealMemory=$node_memory/" -e "s/^NodeName=[^ ]*/NodeName=$HOST/" \
    <<<"$node_line")
# Jobs that do not ask for memory get DefMemPerCPU per core; without it a job without --mem is
# given the whole node's memory (CR_Core_Memory) and jobs run one at a time.
def_mem_per_cpu=$(( node_memory / 16 > 1024 ? 1024 : node_memory / 16 ))

mkdir -p /etc/slurm "$SLURM_LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
new_conf=$(mktemp)
cat >"$new_conf" <<EOF
# Single-node SLURM for the futures_hpc test suite, written by ci/slurm.sh: edits are overwritten.
ClusterName=futureshpc
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem_per_cpu
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
# A node that was DOWN comes back by itself as soon as its slurmd registers.
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for 5 minutes (there is no sacct).
MinJobAge=300
# scancel/walltime: SIGTERM, then SIGKILL 5 s later; walltime is exact (no grace minutes).
KillWait=5
OverTimeLimit=0
InactiveLimit=0
Waittime=0
MessageTimeout=10
# Must be at least 5 x MessageTimeout; a step that survives SIGKILL this long drains the node.
UnkillableStepTimeout=60
# Fast scheduling: the main loop and backfill run every second, and submissions are not batched.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,batch_sched_delay=0,sched_min_interval=0
$node_line State=UNKNOWN
# OverSubscribe=FORCE:4: each core can be given to 4 jobs, so 8 one-core jobs run on 2 cores.
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
if install_if_changed "$new_conf" "$SLURM_CONF" 644; then
    info "slurm.conf written; (re)starting SLURM"
    stop_pidfile "$SLURMD_PID" slurmd 15
    stop_pidfile "$CTLD_PID" slurmctld 15
    changed=1
fi

# --- daemons --------------------------------------------------------------------------------
ctld_up() { scontrol ping | grep -q 'is UP'; }
node_state() { sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1; }
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

if ! pid_alive "$CTLD_PID" slurmctld || ! ctld_up >/dev/null 2>&1; then
    info "starting slurmctld"
    stop_pidfile "$CTLD_PID" slurmctld 15
    run_logged slurm slurmctld
    wait_until 30 ctld_up || fail "slurmctld did not answer 'scontrol ping' within 30 s"
    changed=1
fi
if ! pid_alive "$SLURMD_PID" slurmd; then
    info "starting slurmd"
    run_logged slurm slurmd
    changed=1
fi

# Give a freshly started slurmd time to register (states with "*" mean not responding yet), then
# resume a node left DOWN or DRAINED (e.g. by an unkillable job step or an earlier bad config).
node_settled() {
    local state
    state=$(node_state)
    [[ $state =~ ^(idle|mixed|allocated|completing)$ || ($state =~ down|drain|fail && $state != *'*') ]]
}
wait_until 30 node_settled || true
if ! node_usable; then
    state=$(node_state)
    if [[ $state =~ down|drain|fail ]]; then
        info "node $HOST is '$state': resuming it"
        run_logged slurm scontrol update nodename="$HOST" state=resume
        changed=1
        wait_until 30 node_usable ||
            fail "node $HOST is '$(node_state)' after state=resume ($(sinfo -h -N -n "$HOST" -o '%E'))"
    else
        fail "node $HOST is '$state' (expected idle) ($(sinfo -h -N -n "$HOST" -o '%E'))"
    fi
fi

# --- check job ------------------------------------------------------------------------------
if (( changed )) || [[ ${FHPC_VERIFY:-0} == 1 ]]; then
    info "running a check job"
    check_log=$FHPC_LOG_DIR/slurm-check.log
    if ! (cd /tmp && timeout 120 sbatch --wait --quiet -J fhpc-ci-check -t 1 -o /dev/null \
            -e /dev/null --wrap true) >"$check_log" 2>&1; then
        scancel --name fhpc-ci-check >/dev/null 2>&1 || true
        fail "the check job 'sbatch --wait --wrap true' did not complete" "$check_log"
    fi
fi

say "up: node $HOST $(node_state), partition debug (SlurmctldHost=$HOST, $SLURM_CONF)"
