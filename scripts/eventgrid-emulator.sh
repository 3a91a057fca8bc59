#!/usr/bin/env bash
# Proves the project's Event Grid emulator (tests/emulators/eventgrid) against
# Microsoft's azure-eventgrid client, then starts it on 127.0.0.1 with a preset topic,
# and prints `EVENTGRID_ENDPOINT=...`, `EVENTGRID_KEY=...` and
# `EVENTGRID_EMULATOR_PID=...` for the caller to eval. Stop it with
# `kill -- -$EVENTGRID_EMULATOR_PID`.
#
#   eval "$(bash scripts/eventgrid-emulator.sh)"
#
# Port: $EVENTGRID_PORT, else 10080. With CLOUDBUS_INSTALL_ONLY=1 it only makes its
# venv (scripts/test.sh, before its namespace with no network).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/emulator-lib.sh

port="${EVENTGRID_PORT:-10080}"
python="$(bash scripts/azure-venv.sh)"
if [[ "${CLOUDBUS_INSTALL_ONLY:-}" == 1 ]]; then
    exit 0
fi

echo "proving the Event Grid emulator against azure-eventgrid" >&2
"$python" -W ignore -m unittest tests/emulators/eventgrid/test_emulator.py >&2

require_free_port "$port" "EVENTGRID_PORT or EVENTGRID_ENDPOINT"
out="$(mktemp)"
log="/tmp/cloudbus-eventgrid-$port.log"
setsid "$python" tests/emulators/eventgrid/emulator.py --port "$port" >"$out" 2>"$log" < /dev/null &
pid=$!
wait_ready "the Event Grid emulator" "$pid" 10 "$log" grep -q "^Ready\." "$out" || exit 1
grep -v "^Ready\." "$out"
echo "EVENTGRID_EMULATOR_PID=$pid"
rm -f "$out"
