#!/usr/bin/env bash
# Starts a throwaway Redis for the store tests: installs `redis-server` from Debian's
# packages when it is missing, starts it on a free port of 127.0.0.1 with no
# persistence (no RDB snapshots, no AOF), waits until it answers and prints
# `REDIS_URL=...` and `REDIS_PID=...` for the caller to eval. Stop it with
# `kill -- -$REDIS_PID`. Does nothing (prints the URL it was given) when REDIS_URL is
# already set.
#
#   eval "$(bash scripts/redis.sh)"
#
# Port: $REDIS_PORT, else a free one. With CLOUDBUS_INSTALL_ONLY=1 it only installs
# (scripts/test.sh, before its namespace with no network).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/emulator-lib.sh

if [[ -n "${REDIS_URL:-}" ]]; then
    echo "REDIS_URL=$REDIS_URL"
    echo "REDIS_PID="
    exit 0
fi
if ! command -v redis-server > /dev/null; then
    echo "installing redis-server from Debian's packages (once)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q redis-server >&2 ||
        { apt-get update -q >&2 && apt-get install -y -q redis-server >&2; }
fi
if [[ "${CLOUDBUS_INSTALL_ONLY:-}" == 1 ]]; then
    exit 0
fi
port="${REDIS_PORT:-$(free_port)}"
require_free_port "$port" "REDIS_PORT or REDIS_URL"
dir="$(mktemp -d /tmp/cloudbus-redis.XXXXXX)"
log="$dir/server.log"
setsid redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --daemonize no --dir "$dir" > "$log" 2>&1 < /dev/null &
pid=$!
wait_ready "Redis" "$pid" 30 "$log" port_open "$port" || exit 1
echo "REDIS_URL=redis://127.0.0.1:$port/"
echo "REDIS_PID=$pid"
