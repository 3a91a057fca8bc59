#!/usr/bin/env bash
# Proves the project's Service Bus emulator (tests/emulators/servicebus, on
# python-qpid-proton) against Microsoft's azure-servicebus client, then starts it on
# 127.0.0.1 with tests/emulators/servicebus/config.json (or $SERVICEBUS_CONFIG, in the
# official emulator's Config.json format) and prints
# `SERVICEBUS_CONNECTION_STRING=...`, `SERVICEBUS_MANAGEMENT_ENDPOINT=...` (HTTPS, a
# self-signed certificate, port + 1) and `SERVICEBUS_EMULATOR_PID=...` for the caller
# to eval. Stop it with `kill -- -$SERVICEBUS_EMULATOR_PID`.
#
#   eval "$(bash scripts/servicebus-emulator.sh)"          # prove, then start
#   bash scripts/servicebus-emulator.sh --prove-only       # only the proof
#
# Port: $SERVICEBUS_PORT, else 5672.
set -euo pipefail
cd "$(dirname "$0")/.."

port="${SERVICEBUS_PORT:-5672}"
config="${SERVICEBUS_CONFIG:-tests/emulators/servicebus/config.json}"
python="$(bash scripts/azure-venv.sh)"

echo "proving the Service Bus emulator against azure-servicebus" >&2
"$python" -W ignore -m unittest tests/emulators/servicebus/test_emulator.py >&2
if [[ "${1:-}" == "--prove-only" ]]; then
    exit 0
fi

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is taken; set SERVICEBUS_PORT or SERVICEBUS_CONNECTION_STRING" >&2
    exit 1
fi
out="$(mktemp)"
setsid "$python" tests/emulators/servicebus/emulator.py --port "$port" --config "$config" \
    >"$out" 2>"/tmp/cloudbus-servicebus-$port.log" < /dev/null &
pid=$!
for _ in $(seq 1 100); do
    if grep -q "^Ready\." "$out" 2>/dev/null; then
        grep -E "^SERVICEBUS_(CONNECTION_STRING|MANAGEMENT_ENDPOINT)=" "$out"
        echo "SERVICEBUS_EMULATOR_PID=$pid"
        rm -f "$out"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "the Service Bus emulator exited" >&2
        cat "/tmp/cloudbus-servicebus-$port.log" >&2
        exit 1
    fi
    sleep 0.1
done
echo "the Service Bus emulator did not start within 10 s" >&2
kill -- -"$pid" 2>/dev/null || true
exit 1
