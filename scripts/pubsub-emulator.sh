#!/usr/bin/env bash
# Starts Google's official Pub/Sub emulator (Debian package
# google-cloud-cli-pubsub-emulator, preinstalled on the project machines) on
# 127.0.0.1, waits until it serves, and prints `PUBSUB_EMULATOR_HOST=host:port` and
# `PUBSUB_EMULATOR_PID=pid` for the caller to eval. Stop it with
# `kill -- -$PUBSUB_EMULATOR_PID` (its process group: a launcher script and a JVM).
#
#   eval "$(bash scripts/pubsub-emulator.sh)"
#
# Port: $PUBSUB_EMULATOR_PORT, else 8085, else the next free one up to 8099.
set -euo pipefail
source "$(dirname "$0")/emulator-lib.sh"

find_binary() {
    local bin
    bin="$(command -v cloud-pubsub-emulator 2>/dev/null || true)"
    if [[ -z "$bin" ]] && command -v dpkg >/dev/null 2>&1; then
        bin="$(dpkg -L google-cloud-cli-pubsub-emulator 2>/dev/null | grep 'bin/cloud-pubsub-emulator$' | head -n 1 || true)"
    fi
    if [[ -z "$bin" ]]; then
        for candidate in /usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator \
            "$HOME/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"; do
            [[ -x "$candidate" ]] && bin="$candidate" && break
        done
    fi
    [[ -n "$bin" ]] || { echo "no Pub/Sub emulator found (install google-cloud-cli-pubsub-emulator)" >&2; return 1; }
    echo "$bin"
}

bin="$(find_binary)"
port="${PUBSUB_EMULATOR_PORT:-}"
if [[ -z "$port" ]]; then
    for p in $(seq 8085 8099); do
        if ! port_open "$p"; then port="$p"; break; fi
    done
fi
[[ -n "$port" ]] || { echo "no free port in 8085-8099 for the Pub/Sub emulator" >&2; exit 1; }

log="${PUBSUB_EMULATOR_LOG:-/tmp/cloudbus-pubsub-emulator-$port.log}"
JAVA_OPTS="${JAVA_OPTS:--Xmx256m}" setsid "$bin" --host=127.0.0.1 --port="$port" >"$log" 2>&1 < /dev/null &
pid=$!
wait_ready "the Pub/Sub emulator" "$pid" 60 "$log" \
    grep -q "Server started, listening on $port" "$log" || exit 1
echo "PUBSUB_EMULATOR_HOST=127.0.0.1:$port"
echo "PUBSUB_EMULATOR_PID=$pid"
