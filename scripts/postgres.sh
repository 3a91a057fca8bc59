#!/usr/bin/env bash
# Starts a throwaway PostgreSQL 15 cluster for the store tests: `initdb` into a new
# temp dir, the server on a free port of 127.0.0.1 (trust auth, no fsync: nothing in
# it outlives the run). Waits until it accepts connections and prints
# `DATABASE_URL=...` and `POSTGRES_PID=...` for the caller to eval. Stop it with
# `kill -- -$POSTGRES_PID`. Does nothing (prints the URL it was given) when
# DATABASE_URL is already set.
#
#   eval "$(bash scripts/postgres.sh)"
#
# Server binaries: $POSTGRES_BIN, else /usr/lib/postgresql/15/bin. Port: $POSTGRES_PORT,
# else a free one. PostgreSQL refuses to run as root: as root, the cluster belongs to
# the `postgres` user (made by Debian's packages), else to `nobody`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/emulator-lib.sh

if [[ -n "${DATABASE_URL:-}" ]]; then
    echo "DATABASE_URL=$DATABASE_URL"
    echo "POSTGRES_PID="
    exit 0
fi
bin="${POSTGRES_BIN:-/usr/lib/postgresql/15/bin}"
if [[ ! -x "$bin/initdb" || ! -x "$bin/postgres" ]]; then
    echo "no PostgreSQL server binaries in $bin (set POSTGRES_BIN)" >&2
    exit 1
fi
port="${POSTGRES_PORT:-$(free_port)}"
require_free_port "$port" "POSTGRES_PORT or DATABASE_URL"

# Clusters of earlier runs whose server is gone.
for old in /tmp/cloudbus-pg.*; do
    if [[ -d "$old" ]] && ! kill -0 "$(cat "$old/pid" 2>/dev/null || echo 0)" 2>/dev/null; then
        rm -rf "$old"
    fi
done
dir="$(mktemp -d /tmp/cloudbus-pg.XXXXXX)"
as_owner=()
if [[ "$(id -u)" == 0 ]]; then
    owner=postgres
    id "$owner" > /dev/null 2>&1 || owner=nobody
    chown "$owner" "$dir"
    as_owner=(setpriv --reuid="$owner" --regid="$(id -g "$owner")" --clear-groups)
fi
"${as_owner[@]}" "$bin/initdb" -D "$dir/data" -U cloudbus --auth=trust -E UTF8 \
    --no-sync > "$dir/initdb.log" 2>&1 || {
    echo "initdb failed:" >&2
    tail -n 20 "$dir/initdb.log" >&2
    exit 1
}
log="$dir/server.log"
setsid "${as_owner[@]}" "$bin/postgres" -D "$dir/data" -h 127.0.0.1 -p "$port" -k "$dir" \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c max_connections=200 > "$log" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$dir/pid"
wait_ready "PostgreSQL" "$pid" 30 "$log" "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" || exit 1
echo "DATABASE_URL=postgres://cloudbus@127.0.0.1:$port/postgres"
echo "POSTGRES_PID=$pid"
