#!/usr/bin/env bash
# Installs (once, into a venv) and starts moto's server on 127.0.0.1: the AWS emulator
# the EventBridge archive/replay test runs on (LocalStack 2026.3 answers StartReplay
# with a 500 once its archive holds an event). Waits until it answers and prints
# `MOTO_ENDPOINT_URL=...` and `MOTO_PID=...` for the caller to eval. Stop it with
# `kill -- -$MOTO_PID`.
#
#   eval "$(bash scripts/moto.sh)"
#
# Port: $MOTO_PORT, else 4567. Venv: $MOTO_HOME, else ~/.cache/cloudbus/moto. With
# CLOUDBUS_INSTALL_ONLY=1 it only installs (scripts/test.sh, before its namespace with no
# network).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/emulator-lib.sh

port="${MOTO_PORT:-4567}"
home="${MOTO_HOME:-$HOME/.cache/cloudbus/moto}"
venv="$home/venv"
mkdir -p "$home"

if [[ ! -x "$venv/bin/moto_server" ]]; then
    echo "installing moto into $venv (once)" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5' >&2
fi
if [[ "${CLOUDBUS_INSTALL_ONLY:-}" == 1 ]]; then
    exit 0
fi

require_free_port "$port" "MOTO_PORT or MOTO_ENDPOINT_URL"
log="${MOTO_LOG:-/tmp/cloudbus-moto-$port.log}"
setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 < /dev/null &
pid=$!
wait_ready "moto" "$pid" 30 "$log" port_open "$port" || exit 1
echo "MOTO_ENDPOINT_URL=http://127.0.0.1:$port"
echo "MOTO_PID=$pid"
