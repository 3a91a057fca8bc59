#!/usr/bin/env bash
# Installs (once, into a venv) and starts moto's server on 127.0.0.1: the AWS emulator
# the EventBridge archive/replay test runs on (LocalStack 2026.3 answers StartReplay
# with a 500 once its archive holds an event). Waits until it answers and prints
# `MOTO_ENDPOINT_URL=...` and `MOTO_PID=...` for the caller to eval. Stop it with
# `kill -- -$MOTO_PID`.
#
#   eval "$(bash scripts/moto.sh)"
#
# Port: $MOTO_PORT, else 4567. Venv: $MOTO_HOME, else ~/.cache/cloudbus/moto.
set -euo pipefail
cd "$(dirname "$0")/.."

port="${MOTO_PORT:-4567}"
home="${MOTO_HOME:-$HOME/.cache/cloudbus/moto}"
venv="$home/venv"
mkdir -p "$home"

if [[ ! -x "$venv/bin/moto_server" ]]; then
    echo "installing moto into $venv (once)" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5' >&2
fi

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is taken; set MOTO_PORT or MOTO_ENDPOINT_URL" >&2
    exit 1
fi

log="${MOTO_LOG:-/tmp/cloudbus-moto-$port.log}"
setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 1 120); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "MOTO_ENDPOINT_URL=http://127.0.0.1:$port"
        echo "MOTO_PID=$pid"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "moto exited; see $log" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    sleep 0.25
done
echo "moto did not answer on port $port within 30 s; see $log" >&2
kill -- -"$pid" 2>/dev/null || true
exit 1
