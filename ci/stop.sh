#!/usr/bin/env bash
# Stop every daemon the ci/ scripts started (for development): moto, Grid Engine, SLURM, munge.
# Processes are found through their pid files only. `bash ci/setup.sh` starts them again.
# Grid Engine takes 5-10 s to shut down, so the daemons are stopped in parallel; munged last.
set -euo pipefail
FHPC_NAME=stop
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
stopped=()
stoppers=()

# Pids are read before anything is asked to stop: a shutting-down daemon may remove its pid
# file before it has exited (and released its port).
sge_pids=()
for execd_pidfile in /var/spool/gridengine/execd/*/execd.pid; do
    if pid=$(pid_of "$execd_pidfile" sge_execd); then sge_pids+=("$pid"); stopped+=(sge_execd); fi
done
if (( ${#sge_pids[@]} )); then qconf -ke "$(hostname -s)" >/dev/null 2>&1 || true; fi
if pid=$(pid_of /var/spool/gridengine/qmaster/qmaster.pid sge_qmaster); then
    sge_pids+=("$pid"); stopped+=(sge_qmaster)
    qconf -km >/dev/null 2>&1 || true
fi
# qconf -ke/-km is the clean way; a daemon still running after 20 s gets SIGTERM, then SIGKILL.
for pid in "${sge_pids[@]}"; do
    { wait_until 20 _pid_gone "$pid" || stop_pid "$pid" 10; } &
    stoppers+=($!)
done

daemons=(/run/slurmd.pid:slurmd /run/slurmctld.pid:slurmctld)
for moto_pidfile in /run/futures_hpc-moto-*.pid; do
    [[ -e $moto_pidfile ]] && daemons+=("$moto_pidfile:moto_server")
done
for daemon in "${daemons[@]}"; do
    if pid_alive "${daemon%%:*}" "${daemon#*:}"; then
        stopped+=("${daemon#*:}")
        stop_pidfile "${daemon%%:*}" "${daemon#*:}" 15 &
        stoppers+=($!)
    fi
done
for pid in "${stoppers[@]}"; do wait "$pid" || true; done

if pid_alive /run/munge/munged.pid munged; then
    stop_pidfile /run/munge/munged.pid munged 10
    stopped+=(munged)
fi

# The next setup.sh must rerun the check jobs.
rm -f "$FHPC_STATE_DIR/openmpi.ok"

say "stopped: ${stopped[*]:-nothing was running}"
