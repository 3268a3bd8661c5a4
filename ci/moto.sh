#!/usr/bin/env bash
# Start moto's mock AWS server for the ECS tests: moto_server -H 127.0.0.1 -p ${MOTO_PORT:-5055}
# in the background, logging to /var/log/futures_hpc-ci/moto.log, with its pid in
# /run/futures_hpc-moto-PORT.pid.
# Idempotent: if something already answers on the port, nothing is started.
# moto[server] comes with the project's test extras; if moto_server is missing it is pip-installed.
# PYTHON selects the interpreter whose pip installs it (default: python3 on PATH).
set -euo pipefail
FHPC_NAME=moto
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MOTO_PORT=${MOTO_PORT:-5055}
MOTO_URL=http://127.0.0.1:$MOTO_PORT
MOTO_LOG=$FHPC_LOG_DIR/moto.log
MOTO_PID=/run/futures_hpc-moto-$MOTO_PORT.pid
register_logs "$MOTO_LOG"

PYTHON=${PYTHON:-python3}
# Any HTTP answer counts (a fresh Debian has no curl; Python is there, moto needs it).
moto_answers() {
    "$PYTHON" - "$MOTO_URL/moto-api/" >/dev/null 2>&1 <<'EOF'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
EOF
}

if moto_answers; then
    say "up: $MOTO_URL (already running)"
    exit 0
fi

if ! command -v moto_server >/dev/null; then
    info "moto_server not found: pip install moto[server]"
    run_logged pip "$PYTHON" -m pip install "moto[server]"
    hash -r
    command -v moto_server >/dev/null || fail "moto_server still not on PATH after pip install"
fi

stop_pidfile "$MOTO_PID" moto_server 5      # a server that hangs without answering
printf '\n=== %s: moto_server -H 127.0.0.1 -p %s\n' "$(date '+%F %T')" "$MOTO_PORT" >>"$MOTO_LOG"
# setsid + nohup: the server outlives this script and the shell that ran it.
setsid nohup moto_server -H 127.0.0.1 -p "$MOTO_PORT" >>"$MOTO_LOG" 2>&1 </dev/null &
echo $! >"$MOTO_PID"
wait_until 60 moto_answers || fail "moto_server does not answer on $MOTO_URL within 60 s"
say "up: $MOTO_URL (pid $(cat "$MOTO_PID"), log $MOTO_LOG)"
