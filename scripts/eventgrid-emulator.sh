#!/usr/bin/env bash
# Proves the project's Event Grid emulator (tests/emulators/eventgrid) against
# Microsoft's azure-eventgrid client, then starts it on 127.0.0.1 with a preset topic,
# and prints `EVENTGRID_ENDPOINT=...`, `EVENTGRID_KEY=...` and
# `EVENTGRID_EMULATOR_PID=...` for the caller to eval. Stop it with
# `kill -- -$EVENTGRID_EMULATOR_PID`.
#
#   eval "$(bash scripts/eventgrid-emulator.sh)"
#
# Port: $EVENTGRID_PORT, else 10080.
set -euo pipefail
cd "$(dirname "$0")/.."

port="${EVENTGRID_PORT:-10080}"
python="$(bash scripts/azure-venv.sh)"

echo "proving the Event Grid emulator against azure-eventgrid" >&2
"$python" -W ignore -m unittest tests/emulators/eventgrid/test_emulator.py >&2

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is taken; set EVENTGRID_PORT or EVENTGRID_ENDPOINT" >&2
    exit 1
fi
out="$(mktemp)"
setsid "$python" tests/emulators/eventgrid/emulator.py --port "$port" >"$out" 2>/tmp/cloudbus-eventgrid-$port.log < /dev/null &
pid=$!
for _ in $(seq 1 100); do
    if grep -q "^Ready\." "$out" 2>/dev/null; then
        grep -v "^Ready\." "$out"
        echo "EVENTGRID_EMULATOR_PID=$pid"
        rm -f "$out"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "the Event Grid emulator exited" >&2
        cat /tmp/cloudbus-eventgrid-$port.log >&2
        exit 1
    fi
    sleep 0.1
done
echo "the Event Grid emulator did not start within 10 s" >&2
kill -- -"$pid" 2>/dev/null || true
exit 1
