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
# Port: $SERVICEBUS_PORT, else 5672. With CLOUDBUS_INSTALL_ONLY=1 it only makes its
# venv (scripts/test.sh, before its namespace with no network).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/emulator-lib.sh

port="${SERVICEBUS_PORT:-5672}"
config="${SERVICEBUS_CONFIG:-tests/emulators/servicebus/config.json}"
python="$(bash scripts/azure-venv.sh)"
if [[ "${CLOUDBUS_INSTALL_ONLY:-}" == 1 ]]; then
    exit 0
fi

echo "proving the Service Bus emulator against azure-servicebus" >&2
"$python" -W ignore -m unittest tests/emulators/servicebus/test_emulator.py >&2
if [[ "${1:-}" == "--prove-only" ]]; then
    exit 0
fi

require_free_port "$port" "SERVICEBUS_PORT or SERVICEBUS_CONNECTION_STRING"
out="$(mktemp)"
log="/tmp/cloudbus-servicebus-$port.log"
setsid "$python" tests/emulators/servicebus/emulator.py --port "$port" --config "$config" \
    >"$out" 2>"$log" < /dev/null &
pid=$!
wait_ready "the Service Bus emulator" "$pid" 10 "$log" grep -q "^Ready\." "$out" || exit 1
# Quoted: the connection string holds ';'.
grep -E "^SERVICEBUS_(CONNECTION_STRING|MANAGEMENT_ENDPOINT)=" "$out" | while IFS= read -r line; do
    printf '%s=%q\n' "${line%%=*}" "${line#*=}"
done
echo "SERVICEBUS_EMULATOR_PID=$pid"
rm -f "$out"
