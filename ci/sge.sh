#!/usr/bin/env bash
# Install and start a single-node Grid Engine 8.1.9 (Debian gridengine-*) as root, without systemd.
# SGE_ROOT=/var/lib/gridengine, SGE_CELL=default; the environment a user needs is written to
# /etc/futures_hpc-sge.env (`. /etc/futures_hpc-sge.env`). qsub/qstat/qdel are in /usr/bin.
#
# What is configured (all idempotent, re-applied on every run when it differs):
# - host_aliases "<host> localhost": the host name resolves to 127.0.0.1, whose reverse name is
#   localhost, and SGE refuses clients whose address resolves to another name than the host's.
# - global config: min_uid/min_gid 0 (root may run jobs), login_shells none (job shells do not
#   source root's profile).
# - scheduler: schedule_interval 0:0:1, flush_submit_sec 1, flush_finish_sec 1 (jobs start ~1 s).
# - the host is admin, submit and exec host; PE `smp` (slots 999, allocation_rule $pe_slots);
#   queue all.q: slots 4, pe_list smp, load_thresholds NONE, shell /bin/bash,
#   shell_start_mode unix_behavior (a job script runs under its own #! line, as when run by
#   hand; Grid Engine's default posix_compliant runs every script with /bin/sh).
# - memory: see MEMORY below.
# The daemons are started directly (the init scripts can start a second qmaster) under `setsid`
# (sge_execd stays in its caller's session otherwise) and `env -i` with a minimal PATH: jobs
# submitted without -V (dask-jobqueue's SGE jobs have no -V) get execd's environment, not the
# submitter's, so they must name their interpreter by absolute path (dask-jobqueue uses
# sys.executable).
#
# MEMORY. Debian's default complexes make h_vmem, h_rss, s_vmem, mem_free, virtual_free
# requestable but none consumable.
# - Request `-l mem_free=2G` (per slot, like every SGE consumable). This script makes mem_free
#   consumable with the host's capacity set to 90% of its RAM, so the scheduler books memory and
#   never overcommits the node; it is NOT enforced (nothing limits or kills a job that uses more).
# - Do NOT request h_vmem (nor s_vmem, h_data) for dask workers: Grid Engine enforces h_vmem as a
#   hard per-process limit on virtual address space (the job shell shows `ulimit -v` = the
#   request), and a dask worker maps much more than it uses (thread stacks, malloc arenas,
#   numpy/BLAS). Checked here: with -l h_vmem=300M a LocalCluster Nanny fails ("can't start new
#   thread"); at 512M and 1G a small 4-thread worker started (peak virtual size 500-710 MB, it
#   grows with threads and libraries). Three processes of 600 MB each under h_vmem=1G were not
#   killed in 50 s: the limit is per process, not summed over the job.
# - A request no host can meet (mem_free=100G) is not rejected at qsub: the job waits in qw.
#
# FHPC_VERIFY=1 forces the check jobs even when nothing was (re)started.
set -euo pipefail
FHPC_NAME=sge
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
SGE_COMMON=$SGE_ROOT/$SGE_CELL/common
SGE_ENV_FILE=/etc/futures_hpc-sge.env
ensure_host_resolves
HOST=$(hostname -s)
QMASTER_SPOOL=/var/spool/gridengine/qmaster
QMASTER_PID=$QMASTER_SPOOL/qmaster.pid
# The daemons name themselves after the reverse lookup of the host's address: with "vm" at
# 127.0.0.1 the execd spool is .../execd/localhost (set below, once names are known).
EXECD_SPOOL_ROOT=/var/spool/gridengine/execd
DAEMON_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
daemon_env=(env -i "PATH=$DAEMON_PATH" "SGE_ROOT=$SGE_ROOT" "SGE_CELL=$SGE_CELL" LANG=C.UTF-8)
changed=0

# Startup errors before the spool exists go to /tmp/{qmaster,execd}_messages.<pid>.
show_tmp_messages() {
    local file
    # shellcheck disable=SC2012
    for file in $(ls -t /tmp/qmaster_messages.* /tmp/execd_messages.* 2>/dev/null | head -n 2); do
        show_log_tail "$file" 15
    done
}

if [[ -n $(missing_packages "${FHPC_SGE_PACKAGES[@]}") ]]; then
    sge_preseed
    apt_ensure "${FHPC_SGE_PACKAGES[@]}"
fi
[[ -e /var/spool/gridengine/spooldb/sge ]] ||
    fail "no Grid Engine spool: gridengine-master's postinst did not run init_cluster" \
        "$FHPC_LOG_DIR/apt.log"

# --- host names -----------------------------------------------------------------------------
make_scratch
address=$(getent ahostsv4 "$HOST" | awk 'NR == 1 { print $1 }')
reverse=$(getent hosts "$address" | awk '{ print $2 }')
{
    printf '%s\n' "$HOST"
} >"$FHPC_SCRATCH/act_qmaster"
if [[ -n $reverse && $reverse != "$HOST" ]]; then
    printf '%s %s\n' "$HOST" "$reverse"
else
    printf '%s\n' "$HOST"
fi >"$FHPC_SCRATCH/host_aliases"
EXECD_SPOOL=$EXECD_SPOOL_ROOT/${reverse:-$HOST}
EXECD_PID=$EXECD_SPOOL/execd.pid
register_logs "$QMASTER_SPOOL/messages" "$EXECD_SPOOL/messages"
names_changed=0
install_if_changed "$FHPC_SCRATCH/act_qmaster" "$SGE_COMMON/act_qmaster" && names_changed=1
install_if_changed "$FHPC_SCRATCH/host_aliases" "$SGE_COMMON/host_aliases" && names_changed=1
chown sgeadmin:sgeadmin "$SGE_COMMON/act_qmaster" "$SGE_COMMON/host_aliases"

# --- qmaster --------------------------------------------------------------------------------
qmaster_up() { qconf -sh >/dev/null 2>&1; }
# The pid is read first: a daemon shutting down may remove its pid file before it has exited.
execd_stop() {
    local pid
    pid=$(pid_of "$EXECD_PID" sge_execd) || return 0
    qconf -ke "$HOST" >/dev/null 2>&1 || true
    wait_until 20 _pid_gone "$pid" || stop_pid "$pid" 10
    rm -f "$EXECD_PID"
}
qmaster_stop() {
    local pid
    pid=$(pid_of "$QMASTER_PID" sge_qmaster) || return 0
    qconf -km >/dev/null 2>&1 || true
    wait_until 20 _pid_gone "$pid" || stop_pid "$pid" 10
    rm -f "$QMASTER_PID"
}
if (( names_changed )) && pid_alive "$QMASTER_PID" sge_qmaster; then
    info "host names changed: restarting Grid Engine"
    execd_stop
    qmaster_stop
fi
if ! pid_alive "$QMASTER_PID" sge_qmaster || ! qmaster_up; then
    info "starting sge_qmaster"
    qmaster_stop
    run_logged sge setsid "${daemon_env[@]}" /usr/sbin/sge_qmaster
    if ! wait_until 30 qmaster_up; then
        show_tmp_messages
        fail "sge_qmaster does not answer 'qconf -sh' within 30 s"
    fi
    changed=1
fi

# --- configuration --------------------------------------------------------------------------
# qconf -m*/-a* open $EDITOR on the object; this editor sets the "key value" lines given in
# FHPC_SGE_SET (one per line), replacing continuation lines of a replaced value.
cat >"$FHPC_SCRATCH/set-editor" <<'EOF'
#!/bin/sh
set -e
file=$1
printf '%s\n' "$FHPC_SGE_SET" | while IFS= read -r line; do
    [ -n "$line" ] || continue
    awk -v line="$line" '
        BEGIN { split(line, parts, " "); key = parts[1] }
        skip { skip = ($0 ~ /\\$/); next }
        $1 == key && !done { print line; done = 1; skip = ($0 ~ /\\$/); next }
        { print }
        END { if (!done) print line }' "$file" >"$file.fhpc"
    cat "$file.fhpc" >"$file"
    rm -f "$file.fhpc"
done
EOF
chmod 755 "$FHPC_SCRATCH/set-editor"
normalize() { grep -v '^#' "$1" | awk '{ $1 = $1; print }'; }

# sge_set SETTINGS SHOW_COMMAND MODIFY_COMMAND [ADD_COMMAND]: make the object shown by
# SHOW_COMMAND have SETTINGS ("key value" lines); create it with ADD_COMMAND if it is missing.
# shellcheck disable=SC2086   # the commands are split into words on purpose
sge_set() {
    local settings=$1 show=$2 modify=$3 add=${4:-} current=$FHPC_SCRATCH/current log
    log=$FHPC_LOG_DIR/sge-qconf.log
    if ! $show >"$current" 2>/dev/null; then
        [[ -n $add ]] || fail "'$show' failed"
        info "$add"
        FHPC_SGE_SET=$settings EDITOR=$FHPC_SCRATCH/set-editor run_logged sge-qconf $add
        changed=1
        return
    fi
    cp "$current" "$current.wanted"
    FHPC_SGE_SET=$settings "$FHPC_SCRATCH/set-editor" "$current.wanted"
    if [[ $(normalize "$current") != "$(normalize "$current.wanted")" ]]; then
        info "$modify"
        FHPC_SGE_SET=$settings EDITOR=$FHPC_SCRATCH/set-editor run_logged sge-qconf $modify
        changed=1
    fi
}

sge_set "min_uid 0
min_gid 0
login_shells none" "qconf -sconf global" "qconf -mconf global"

sge_set "schedule_interval 0:0:1
flush_submit_sec 1
flush_finish_sec 1" "qconf -ssconf" "qconf -msconf"

qconf -sh 2>/dev/null | grep -qx "$HOST" || { run_logged sge-qconf qconf -ah "$HOST"; changed=1; }
qconf -ss 2>/dev/null | grep -qx "$HOST" || { run_logged sge-qconf qconf -as "$HOST"; changed=1; }

# mem_free: consumable (per slot), default 0 (a job that does not ask books nothing).
qconf -sc >"$FHPC_SCRATCH/complexes"
awk '$1 == "mem_free" { $6 = "YES"; $7 = "0" } { print }' "$FHPC_SCRATCH/complexes" \
    >"$FHPC_SCRATCH/complexes.wanted"
if [[ $(normalize "$FHPC_SCRATCH/complexes") != \
        "$(normalize "$FHPC_SCRATCH/complexes.wanted")" ]]; then
    info "making mem_free consumable"
    run_logged sge-qconf qconf -Mc "$FHPC_SCRATCH/complexes.wanted"
    changed=1
fi
memory_mb=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)

sge_set "hostname $HOST
complex_values mem_free=${memory_mb}M" "qconf -se $HOST" "qconf -me $HOST" "qconf -ae"

sge_set "slots 999
allocation_rule \$pe_slots
start_proc_args NONE
stop_proc_args NONE" "qconf -sp smp" "qconf -mp smp" "qconf -ap smp"

sge_set "hostlist $HOST
slots 4
pe_list smp
load_thresholds NONE
shell /bin/bash
shell_start_mode unix_behavior" "qconf -sq all.q" "qconf -mq all.q" "qconf -aq all.q"

# --- execd ----------------------------------------------------------------------------------
# "all.q@host" with no state letters is ok; a = alarm, u = unknown (execd down), E = error,
# d = disabled, s/S = suspended.
queue_states() {
    qstat -f -q "all.q@$HOST" 2>/dev/null |
        awk -v q="all.q@$HOST" '$1 == q { print ($6 == "" ? "ok" : $6) }'
}
queue_ok() { [[ $(queue_states) == ok ]]; }

# A live pid is not enough: an execd shuts down for several seconds after SIGTERM.
execd_port=$(getent services sge_execd | awk '{ split($2, p, "/"); print p[1] }')
execd_answers() { qping -info "$HOST" "${execd_port:-6445}" execd 1 >/dev/null 2>&1; }
if pid_alive "$EXECD_PID" sge_execd; then
    # shellcheck disable=SC2016
    wait_until 15 eval 'execd_answers || ! pid_alive "$EXECD_PID" sge_execd' || true
fi
if ! execd_answers; then
    info "starting sge_execd"
    execd_stop
    run_logged sge setsid "${daemon_env[@]}" /usr/sbin/sge_execd
    changed=1
fi
# Wait while the state is u (execd not heard of yet), then repair a disabled or errored queue.
queue_settled() { local states; states=$(queue_states); [[ -n $states && $states != *u* ]]; }
wait_until 30 queue_settled || true
if ! queue_ok; then
    states=$(queue_states)
    if [[ $states == *E* ]]; then
        info "clearing error state of all.q@$HOST"
        run_logged sge-qconf qmod -cq "all.q@$HOST"
    fi
    if [[ $states == *d* ]]; then
        info "enabling all.q@$HOST"
        run_logged sge-qconf qmod -e "all.q@$HOST"
    fi
    if [[ $states == *[sS]* ]]; then
        info "unsuspending all.q@$HOST"
        run_logged sge-qconf qmod -usq "all.q@$HOST"
    fi
    if ! wait_until 30 queue_ok; then
        show_tmp_messages
        fail "queue all.q@$HOST is '$(queue_states)' (expected no state flags)"
    fi
    changed=1
fi

# --- environment file -----------------------------------------------------------------------
cat >"$FHPC_SCRATCH/env" <<EOF
# Grid Engine environment, written by futures_hpc ci/sge.sh. Source it (. $SGE_ENV_FILE);
# python-dotenv reads it too. qsub/qstat/qdel/qconf are in /usr/bin, which is appended to PATH,
# never prepended (that would put /usr/bin/python3 ahead of a venv's or pyenv's python3).
export SGE_ROOT=$SGE_ROOT
export SGE_CELL=$SGE_CELL
export PATH="\${PATH}:/usr/bin"
EOF
install_if_changed "$FHPC_SCRATCH/env" "$SGE_ENV_FILE" 644 || true

# --- check jobs -----------------------------------------------------------------------------
if (( changed )) || [[ ${FHPC_VERIFY:-0} == 1 ]]; then
    info "running check jobs"
    check_log=$FHPC_LOG_DIR/sge-check.log
    : >"$check_log"
    check_job() {   # check_job QSUB_ARGS...: a `true` job must run and exit 0 within 120 s
        if ! (cd /tmp && timeout 120 qsub -sync y -b y -N fhpc-ci-check -o /dev/null -j y "$@" true) \
                >>"$check_log" 2>&1; then
            qdel fhpc-ci-check >/dev/null 2>&1 || true
            fail "the check job 'qsub -sync y -b y $* true' did not complete" "$check_log"
        fi
    }
    check_job
    check_job -pe smp 2 -l mem_free=100M
fi

slots=$(qstat -f -q "all.q@$HOST" | awk -v q="all.q@$HOST" '$1 == q { print $3 }')
say "up: queue all.q@$HOST (slots used/reserved/total $slots); environment in $SGE_ENV_FILE"
