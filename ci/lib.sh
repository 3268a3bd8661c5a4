# Shared helpers for the ci/ scripts. Source it, do not run it:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Every script is `set -euo pipefail`; this file adds an ERR trap that names the failing command
# and prints the tail of the logs the script registered, so failures are loud and quiet
# success stays quiet. Set FHPC_VERBOSE=1 to see progress messages.

# shellcheck disable=SC2034   # the variables below are used by the scripts that source this
set -o errtrace

# The daemons and slurmd -C live in /usr/sbin, which a non-login root shell may lack.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin ;; esac

FHPC_CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FHPC_NAME=${FHPC_NAME:-$(basename "$0" .sh)}
FHPC_STATE_DIR=/var/lib/futures_hpc-ci        # stamps (what has been checked already)
FHPC_LOG_DIR=/var/log/futures_hpc-ci          # output of apt-get, pip, check jobs, ...
mkdir -p "$FHPC_STATE_DIR" "$FHPC_LOG_DIR"

# Packages, shared by the scripts and by setup.sh (which installs them all in one apt-get call).
# --no-install-recommends is used throughout; these lists are complete without recommends.
FHPC_SLURM_PACKAGES=(munge slurm-wlm slurmctld slurmd slurm-client)
# Runtime dependencies of the unpacked slurm-wlm-torque wrappers (not the package itself,
# which conflicts with gridengine-client).
FHPC_PBS_PACKAGES=(libslurm-perl libslurmdb-perl libswitch-perl)
FHPC_SGE_PACKAGES=(gridengine-master gridengine-exec gridengine-client)
FHPC_MPI_PACKAGES=(openmpi-bin libopenmpi-dev)

FHPC_LOGS=()                 # logs whose tail is shown when the script fails

# --- messages -------------------------------------------------------------------------------
info() { if [[ ${FHPC_VERBOSE:-0} == 1 ]]; then printf '%s: %s\n' "$FHPC_NAME" "$*" >&2; fi; }
say() { printf '%s: %s\n' "$FHPC_NAME" "$*"; }

register_logs() { FHPC_LOGS+=("$@"); }

show_log_tail() {   # show_log_tail FILE [LINES]
    local file=$1 lines=${2:-30}
    if [[ -s $file ]]; then
        printf -- '----- last %s lines of %s -----\n' "$lines" "$file" >&2
        tail -n "$lines" "$file" >&2
        printf -- '-----\n' >&2
    else
        printf -- '----- (%s is missing or empty) -----\n' "$file" >&2
    fi
}

show_registered_logs() {
    local file
    for file in "${FHPC_LOGS[@]}"; do show_log_tail "$file"; done
}

fail() {   # fail MESSAGE [EXTRA_LOG...]  (registered logs are shown too)
    local message=$1; shift
    trap - ERR
    printf '\n%s: ERROR: %s\n' "$FHPC_NAME" "$message" >&2
    local file
    for file in "$@"; do show_log_tail "$file"; done
    show_registered_logs
    exit 1
}

_on_err() {
    local rc=$1 line=$2 command=$3
    trap - ERR
    printf '\n%s: ERROR: command failed (exit %s) at %s line %s:\n    %s\n' \
        "$FHPC_NAME" "$rc" "$(basename "$0")" "$line" "$command" >&2
    show_registered_logs
    exit "$rc"
}
trap '_on_err $? $LINENO "$BASH_COMMAND"' ERR

# --- waiting --------------------------------------------------------------------------------
# wait_until SECONDS COMMAND...: run COMMAND (output discarded) until it succeeds; return 1 if it
# has not succeeded within SECONDS. Use as `wait_until 30 cond || fail "..."`.
wait_until() {
    local timeout=$1; shift
    local deadline=$(( $(date +%s%N) / 1000000 + timeout * 1000 ))
    while ! "$@" >/dev/null 2>&1; do
        if (( $(date +%s%N) / 1000000 >= deadline )); then return 1; fi
        sleep 0.2
    done
}

# run_logged LOGNAME COMMAND...: run COMMAND with its output appended to $FHPC_LOG_DIR/LOGNAME.log;
# on failure show the tail of that log and fail.
run_logged() {
    local log=$FHPC_LOG_DIR/$1.log; shift
    printf '\n=== %s: %s\n' "$(date '+%F %T')" "$*" >>"$log"
    local rc=0
    "$@" >>"$log" 2>&1 </dev/null || rc=$?
    if (( rc != 0 )); then fail "'$*' failed (exit $rc)" "$log"; fi
}

# --- processes ------------------------------------------------------------------------------
# pid_alive PIDFILE [COMM]: the process named in PIDFILE runs (and its name is COMM, if given).
pid_alive() {
    local pidfile=$1 comm=${2:-} pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    if [[ -n $comm ]]; then [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1; fi
}

# stop_pidfile PIDFILE COMM [SECONDS]: TERM the process named in PIDFILE (only if its name is COMM),
# wait for it to exit, KILL it after SECONDS (default 15).
stop_pidfile() {
    local pidfile=$1 comm=$2 timeout=${3:-15} pid
    pid_alive "$pidfile" "$comm" || { rm -f "$pidfile"; return 0; }
    pid=$(tr -dc '0-9' <"$pidfile")
    stop_pid "$pid" "$timeout"
    rm -f "$pidfile"
}
# stop_pid PID [SECONDS]: TERM, wait, KILL after SECONDS.
stop_pid() {
    local pid=$1 timeout=${2:-15}
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until "$timeout" _pid_gone "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 5 _pid_gone "$pid" || true
    fi
}
_pid_gone() { ! kill -0 "$1" 2>/dev/null; }
# pid_of PIDFILE COMM: the pid in PIDFILE if that process runs and is named COMM.
pid_of() { pid_alive "$1" "$2" && tr -dc '0-9' <"$1"; }

# --- apt ------------------------------------------------------------------------------------
# apt-get update runs at most once per setup: setup.sh exports FHPC_APT_UPDATED=1 after it.
apt_update_once() {
    if [[ ${FHPC_APT_UPDATED:-0} != 1 ]]; then
        info "apt-get update"
        run_logged apt apt-get -q -o DPkg::Lock::Timeout=300 update
        export FHPC_APT_UPDATED=1
    fi
}

missing_packages() {   # prints the packages among "$@" that are not installed
    local package
    for package in "$@"; do
        if [[ $(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null) != installed ]]; then
            printf '%s\n' "$package"
        fi
    done
}

# Package maintainer scripts must not start daemons (we start them ourselves, without systemd;
# Grid Engine's init script would otherwise start a qmaster before host_aliases exists).
# A policy-rc.d that answers 101 makes invoke-rc.d skip every start; any existing one is kept
# aside and put back.
_policy=/usr/sbin/policy-rc.d
_deny_service_starts() {
    if [[ -e $_policy && ! -e $_policy.fhpc-saved ]]; then mv "$_policy" "$_policy.fhpc-saved"; fi
    printf '#!/bin/sh\n# written by futures_hpc ci/lib.sh during apt-get install\nexit 101\n' >"$_policy"
    chmod 755 "$_policy"
}
_restore_service_starts() {
    rm -f "$_policy"
    if [[ -e $_policy.fhpc-saved ]]; then mv "$_policy.fhpc-saved" "$_policy"; fi
}

# apt_ensure PACKAGE...: install the missing ones in one non-interactive apt-get call.
apt_ensure() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    (( ${#missing[@]} == 0 )) && return 0
    apt_update_once
    info "apt-get install ${missing[*]}"
    local log=$FHPC_LOG_DIR/apt.log rc=0
    printf '\n=== %s: apt-get install %s\n' "$(date '+%F %T')" "${missing[*]}" >>"$log"
    _deny_service_starts
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "${missing[@]}" >>"$log" 2>&1 </dev/null || rc=$?
    _restore_service_starts
    (( rc == 0 )) || fail "apt-get install ${missing[*]} failed (exit $rc)" "$log"
}

# Debconf answers for a non-interactive Grid Engine install (must precede apt_ensure).
sge_preseed() {
    local host package
    host=$(hostname -s)
    for package in gridengine-common gridengine-client gridengine-master gridengine-exec; do
        printf '%s shared/gridengineconfig boolean true\n' "$package"
        printf '%s shared/gridenginecell string default\n' "$package"
        printf '%s shared/gridenginemaster string %s\n' "$package" "$host"
    done | debconf-set-selections
}

# SLURM and Grid Engine need the short host name to resolve; a container without an /etc/hosts
# entry for it gets one (127.0.0.1, as on the machines these scripts were checked on).
ensure_host_resolves() {
    local host
    host=$(hostname -s)
    if ! getent hosts "$host" >/dev/null; then
        printf '127.0.0.1\t%s\n' "$host" >>/etc/hosts
        say "added '127.0.0.1 $host' to /etc/hosts (the host name did not resolve)"
    fi
}

# --- misc -----------------------------------------------------------------------------------
# install_if_changed SRC DEST [MODE]: replace DEST by SRC when they differ; return 0 if it changed.
install_if_changed() {
    local src=$1 dest=$2 mode=${3:-644}
    if [[ -f $dest ]] && cmp -s "$src" "$dest"; then rm -f "$src"; return 1; fi
    install -m "$mode" "$src" "$dest"
    rm -f "$src"
    return 0
}

# A scratch directory removed when the script exits.
make_scratch() {
    [[ -n ${FHPC_SCRATCH:-} ]] && return 0
    FHPC_SCRATCH=$(mktemp -d "/tmp/futures_hpc-ci-$FHPC_NAME.XXXXXX")
    chmod 755 "$FHPC_SCRATCH"
    trap 'rm -rf "$FHPC_SCRATCH"' EXIT
}
