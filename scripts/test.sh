#!/usr/bin/env bash
# The whole test suite: unit tests, the conformance suite on every provider built
# here, the provider integration tests against their emulators, doc tests and the
# examples. It starts the emulators it needs and stops them on exit:
#   - Google Pub/Sub: the official emulator (preinstalled package), unless
#     PUBSUB_EMULATOR_HOST already points at one; and a venv with Google's Python
#     client and the CloudEvents Python SDK (scripts/gcp-venv.sh), unless
#     CLOUDBUS_GCP_PYTHON is set.
#   - AWS: LocalStack in host mode (installed into a venv on first use), unless
#     AWS_ENDPOINT_URL already points at an AWS emulator; and moto (a venv too) for
#     the EventBridge replay test, unless MOTO_ENDPOINT_URL is set.
#   - Azure Event Grid: the project's emulator (tests/emulators/eventgrid), first
#     proven against Microsoft's azure-eventgrid client, unless EVENTGRID_ENDPOINT is
#     set; and the project's Service Bus emulator (tests/emulators/servicebus), first
#     proven against azure-servicebus, unless SERVICEBUS_CONNECTION_STRING is set.
#   - promtool for the Prometheus alerts under deploy/ (scripts/promtool.sh: Debian's
#     prometheus package, downloaded and unpacked, not installed), unless PROMTOOL is
#     set.
#   - The durable stores: a throwaway PostgreSQL cluster (scripts/postgres.sh) unless
#     DATABASE_URL is set, and Redis (scripts/redis.sh, installed from Debian's
#     packages when missing) unless REDIS_URL is set. SQLite needs no server.
#   - Kafka: tansu, a Kafka-compatible broker (one static binary, fetched in a venv by
#     scripts/kafka.sh), unless KAFKA_BOOTSTRAP_SERVERS already points at brokers; and
#     a venv with Confluent's Python client and the CloudEvents Python SDK
#     (scripts/kafka-venv.sh), unless CLOUDBUS_KAFKA_PYTHON is set.
# Under CI=true an emulator that cannot be started is a failure, never a skip.
#
# Nothing leaves the machine, by construction (issue 28): first an install phase, with
# the network, fetches everything the run needs (the crates of the workspace and of
# tests/app, the venvs, LocalStack's kinesis-mock, promtool, redis-server, tansu); then,
# as root, the script runs again inside a network namespace that has only loopback
# (`unshare --net`), where everything else happens: the servers and emulators it starts,
# every cargo command (offline). An attempt to reach any other address (a cloud metadata
# server, a registry, a real cloud) fails at once there instead of leaving the machine.
# Under CI=true that namespace is required; elsewhere, without it (not root, no
# `unshare`, or an endpoint variable above that points outside), the script says so
# loudly and runs with the network. CLOUDBUS_ALLOW_NETWORK=1 accepts that under CI=true
# too.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Google's client libraries look for the cloud metadata server to find credentials or
# a project, even with PUBSUB_EMULATOR_HOST set (the Node client did): tell each there
# is none (METADATA_SERVER_DETECTION: Node; NO_GCE_CHECK: Python) and point the probes
# that still run at a closed port of loopback (GCE_METADATA_HOST: Rust, Python and
# Node; GCE_METADATA_IP: Python's ping).
export METADATA_SERVER_DETECTION=none NO_GCE_CHECK=true
export GCE_METADATA_HOST=127.0.0.1:1 GCE_METADATA_IP=127.0.0.1:1
started_pids=()
cleanup() {
    for pid in "${started_pids[@]}"; do
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# start_emulator NAME SCRIPT PID_VAR VAR...: runs SCRIPT, which prints VAR=value lines
# (and PID_VAR=pid), exports the VARs and stops the process group on exit. Under
# CI=true an emulator that cannot be started ends the run; otherwise its tests skip
# loudly.
start_emulator() {
    local name="$1" script="$2" pid_var="$3"
    shift 3
    local started
    if started="$(bash "$script")"; then
        eval "$started"
        export "$@"
        started_pids+=("${!pid_var}")
        echo "started $name (pid ${!pid_var})"
    elif [[ "${CI:-}" == "true" ]]; then
        echo "CI=true and $name could not be started" >&2
        exit 1
    else
        echo "SKIPPED: $name could not be started; its tests will say so" >&2
    fi
}

# use_python_venv VAR SCRIPT: exports VAR as the python of the venv SCRIPT makes,
# unless VAR is set. Under CI=true a venv that cannot be made ends the run; otherwise
# the tests that need it skip loudly.
use_python_venv() {
    local var="$1" script="$2" python
    if [[ -n "${!var:-}" ]]; then
        return
    fi
    if python="$(bash "$script")"; then
        export "$var=$python"
    elif [[ "${CI:-}" == "true" ]]; then
        echo "CI=true and the Python venv of $script could not be made" >&2
        exit 1
    else
        echo "SKIPPED: the Python venv of $script could not be made; its tests will say so" >&2
    fi
}

# run_saga URL FEATURES: the order saga example with CLOUDBUS_URL=URL (none: the memory
# broker), built with FEATURES (and sqlite); it must end with two orders redriven from
# dead letters (the poison one, which then finishes, and the one that breaks its
# schema, which is dead-lettered again with the validation message), and the order the
# old checkout sent as version 1 confirmed (upcast on the way into Payment).
saga_finished() {
    local log="$1"
    grep -q "redriven:        2" "$log"
    grep -q "purged:          1" "$log"
    grep -q "order-9 -> OrderConfirmed" "$log"
    grep -q "does not match the schema of com.example.saga.OrderCreated v2: /amount_cents" "$log"
    tail -n 20 "$log"
}

run_saga() {
    local url="$1" features="$2"
    local log="/tmp/cloudbus-order-saga${url:+-${url%%:*}}.log"
    echo "== order saga example on ${url:-the memory broker}"
    # The Order service's outbox and Payment's dedup store are in SQLite (feature
    # sqlite), or in PostgreSQL when FEATURES has postgres and DATABASE_URL is set.
    if [[ -n "$url" ]]; then
        CLOUDBUS_URL="$url" cargo run --quiet --features "sqlite,$features" --example order_saga > "$log"
    else
        cargo run --quiet --features "sqlite${features:+,$features}" --example order_saga > "$log"
    fi
    saga_finished "$log"
}

# install_step WHAT COMMAND...: runs COMMAND, which installs WHAT (with the network).
# Under CI=true a failure ends the run; otherwise the tests that need WHAT skip loudly.
install_step() {
    local what="$1"
    shift
    if ! "$@" > /dev/null; then
        if [[ "${CI:-}" == "true" ]]; then
            echo "CI=true and $what could not be installed" >&2
            exit 1
        fi
        echo "SKIPPED: $what could not be installed; the tests that need it will say so" >&2
    fi
}

# netns_blocker: why this run cannot go into a namespace with only loopback (empty when
# it can). An endpoint given from outside would be out of reach there: the namespace
# has its own loopback.
netns_blocker() {
    local var
    for var in PUBSUB_EMULATOR_HOST AWS_ENDPOINT_URL MOTO_ENDPOINT_URL EVENTGRID_ENDPOINT \
        SERVICEBUS_CONNECTION_STRING DATABASE_URL REDIS_URL KAFKA_BOOTSTRAP_SERVERS; do
        if [[ -n "${!var:-}" ]]; then
            echo "$var is set, and what it names is out of reach from a namespace with only loopback"
            return
        fi
    done
    if [[ "$(id -u)" != 0 ]]; then
        echo "not root"
    elif ! command -v unshare > /dev/null || ! command -v ip > /dev/null; then
        echo "no unshare or no ip (util-linux, iproute2)"
    elif ! unshare --net true 2> /dev/null; then
        echo "unshare --net fails here"
    fi
}

if [[ "${CLOUDBUS_TEST_NETNS:-}" != inside ]]; then
    echo "== installs (with the network): crates, venvs, emulators, tools"
    # The crates of the workspace and of tests/app (its own workspace and Cargo.lock),
    # with the cargo (toolchain) that builds them below: the builds run offline.
    cargo fetch
    cargo fetch --manifest-path tests/app/Cargo.toml
    # libcurl's headers, before anything builds librdkafka: its configure compiles in
    # OIDC token retrieval (Microsoft Entra ID on Event Hubs) only when it finds them.
    if ! pkg-config --exists libcurl; then
        install_step "libcurl's headers (Debian's libcurl4-openssl-dev)" bash -c \
            'export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q libcurl4-openssl-dev >&2 ||
             { apt-get update -q >&2 && apt-get install -y -q libcurl4-openssl-dev >&2; }'
        # A librdkafka built before the headers were here (a reused target
        # directory) was configured without OIDC, and cargo does not run its build
        # again for a system header: build it again (only if the headers came).
        if pkg-config --exists libcurl; then
            cargo clean -q -p rdkafka-sys
            cargo clean -q -p rdkafka-sys --release
        fi
    fi
    # promtool for the tests of deploy/prometheus (tests/deploy.rs).
    if [[ -z "${PROMTOOL:-}" ]]; then
        if PROMTOOL="$(bash scripts/promtool.sh)"; then
            export PROMTOOL
        elif [[ "${CI:-}" == "true" ]]; then
            echo "CI=true and promtool could not be fetched (scripts/promtool.sh)" >&2
            exit 1
        else
            echo "SKIPPED: no promtool; tests/deploy.rs will say so" >&2
        fi
    fi
    # Google's Python client and the CloudEvents Python SDK, Microsoft's Python
    # clients, and Confluent's Kafka client, for the interoperability tests.
    use_python_venv CLOUDBUS_GCP_PYTHON scripts/gcp-venv.sh
    use_python_venv CLOUDBUS_AZURE_PYTHON scripts/azure-venv.sh
    use_python_venv CLOUDBUS_KAFKA_PYTHON scripts/kafka-venv.sh
    # What the emulator scripts would otherwise install when they start (each script
    # installs and exits under CLOUDBUS_INSTALL_ONLY=1). PostgreSQL and the Pub/Sub
    # emulator are preinstalled packages.
    if [[ -z "${REDIS_URL:-}" ]]; then
        install_step "Redis (scripts/redis.sh)" env CLOUDBUS_INSTALL_ONLY=1 bash scripts/redis.sh
    fi
    if [[ -z "${AWS_ENDPOINT_URL:-}" ]]; then
        install_step "LocalStack (scripts/localstack.sh)" env CLOUDBUS_INSTALL_ONLY=1 bash scripts/localstack.sh
    fi
    if [[ -z "${MOTO_ENDPOINT_URL:-}" ]]; then
        install_step "moto (scripts/moto.sh)" env CLOUDBUS_INSTALL_ONLY=1 bash scripts/moto.sh
    fi
    if [[ -z "${EVENTGRID_ENDPOINT:-}" ]]; then
        install_step "the Event Grid emulator's venv (scripts/eventgrid-emulator.sh)" \
            env CLOUDBUS_INSTALL_ONLY=1 bash scripts/eventgrid-emulator.sh
    fi
    if [[ -z "${SERVICEBUS_CONNECTION_STRING:-}" ]]; then
        install_step "the Service Bus emulator's venv (scripts/servicebus-emulator.sh)" \
            env CLOUDBUS_INSTALL_ONLY=1 bash scripts/servicebus-emulator.sh
    fi
    if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
        install_step "tansu (scripts/kafka.sh)" env CLOUDBUS_INSTALL_ONLY=1 bash scripts/kafka.sh
    fi

    blocker="$(netns_blocker)"
    if [[ -z "$blocker" ]]; then
        echo "== the tests, in a network namespace with only loopback: nothing leaves the machine"
        # exec: the same process, so its output and exit status are the run's. The
        # variables exported above (PROMTOOL, the venvs' pythons) go in with it.
        exec unshare --net -- env CLOUDBUS_TEST_NETNS=inside bash scripts/test.sh "$@"
    elif [[ "${CI:-}" == "true" && "${CLOUDBUS_ALLOW_NETWORK:-}" != 1 ]]; then
        echo "CI=true and the tests cannot run in a network namespace with only loopback: $blocker" >&2
        echo "(CLOUDBUS_ALLOW_NETWORK=1 runs them with the network)" >&2
        exit 1
    else
        echo "WARNING: the tests run WITH THE NETWORK: $blocker. Run scripts/test.sh as root (with unshare and ip) and no endpoint variables for a run in which nothing can leave the machine." >&2
    fi
else
    # The namespace's loopback starts down; nothing else is in it.
    ip link set lo up
    # The proof: another address (the metadata server's) is unreachable at once, not
    # after a timeout.
    reached=0
    timeout 5 bash -c 'exec 3<>/dev/tcp/169.254.169.254/80' 2> /dev/null || reached=$?
    if [[ "$reached" == 0 || "$reached" == 124 ]]; then
        echo "the network namespace does not refuse 169.254.169.254 at once" >&2
        exit 1
    fi
    echo "in a network namespace with only loopback ($(ip -brief address | xargs))"
fi
# The crates were fetched above.
export CARGO_NET_OFFLINE=true

echo "== cargo test --workspace (unit, conformance on the memory broker, integration, doc tests)"
# The provider crates run (unit, doc and emulator tests) in their sections below, with
# their emulators, and the store crate in its own with its servers; left out here, the
# facade is built with its default features only, as an application that enables none
# gets it.
providers=(--exclude cloudbus-aws --exclude cloudbus-azure --exclude cloudbus-gcp --exclude cloudbus-kafka --exclude cloudbus-store --exclude cloudbus-cli)
cargo test --workspace "${providers[@]}" --all-targets
cargo test --workspace "${providers[@]}" --doc
# The router's tests include the HTTP schema registry (feature schema-http).
cargo test --features schema-http --test router
# (OpenTelemetry: a saga's spans are one trace on the memory broker: cloudbus-memory's
# tests/otel.rs, in the workspace run above.)

run_saga "" ""

echo "== metrics_server example: /metrics for Prometheus and the health endpoints"
cargo build --quiet -p cloudbus-telemetry-examples --example metrics_server
metrics_log=/tmp/cloudbus-metrics-server.log
METRICS_ADDR=127.0.0.1:0 cargo run --quiet -p cloudbus-telemetry-examples --example metrics_server -- --serve-for 10 > "$metrics_log" 2>&1 &
metrics_pid=$!
metrics_url=""
for _ in $(seq 1 100); do
    metrics_url="$(sed -n 's/^listening on //p' "$metrics_log")"
    [[ -n "$metrics_url" ]] && break
    sleep 0.2
done
[[ -n "$metrics_url" ]] || { cat "$metrics_log"; echo "metrics_server did not start" >&2; exit 1; }
sleep 3 # 30 orders at 10 a second, 3 of them malformed
curl -fsS "$metrics_url/metrics" > /tmp/cloudbus-metrics.txt
for want in 'events_published_total{source="/shop",event_type="com.example.order.created"}' \
    'event_processing_errors_total{consumer="billing",event_type="com.example.order.created",error="reject"}' \
    'dlq_messages_total{consumer="billing",reason="rejected"}' \
    'event_lag_seconds_bucket{consumer="billing",le="0.001"}' \
    'event_processing_duration_seconds_count{consumer="billing",event_type="com.example.order.created"}' \
    'event_queue_depth{consumer="billing"}'; do
    grep -qF "$want" /tmp/cloudbus-metrics.txt || { echo "/metrics lacks $want" >&2; cat /tmp/cloudbus-metrics.txt >&2; exit 1; }
done
curl -fsS "$metrics_url/health/live" | grep -q '"running":true'
curl -fsS "$metrics_url/health/ready" | tee /tmp/cloudbus-ready.json | grep -q '"ready":true'
echo "metrics_server: $(grep -c '^event' /tmp/cloudbus-metrics.txt) series lines; ready: $(cat /tmp/cloudbus-ready.json)"
# It stops by itself after 10 s: the worker shut down cleanly, the counts printed.
wait "$metrics_pid"
grep "^handled: " "$metrics_log"

echo "== otel_export example: the saga's spans over OTLP/HTTP to a local sink"
cargo build --quiet -p cloudbus-telemetry-examples --example otel_export
otlp_file=/tmp/cloudbus-otlp-$$.bin
rm -f "$otlp_file"
python3 scripts/otlp-sink.py serve "$otlp_file" > /tmp/cloudbus-otlp-sink.log 2>&1 &
otlp_pid=$!
started_pids+=("$otlp_pid")
otlp_url=""
for _ in $(seq 1 100); do
    otlp_url="$(sed -n 's/^listening on //p' /tmp/cloudbus-otlp-sink.log)"
    [[ -n "$otlp_url" ]] && break
    sleep 0.1
done
[[ -n "$otlp_url" ]] || { cat /tmp/cloudbus-otlp-sink.log; echo "the OTLP sink did not start" >&2; exit 1; }
OTEL_EXPORTER_OTLP_ENDPOINT="$otlp_url" cargo run --quiet -p cloudbus-telemetry-examples --example otel_export \
    | tee /tmp/cloudbus-otel-export.log
kill "$otlp_pid"
otel_trace="$(sed -n 's/^exported the spans of trace \([0-9a-f]*\) to .*/\1/p' /tmp/cloudbus-otel-export.log)"
python3 scripts/otlp-sink.py check "$otlp_file" "$otel_trace" "process billing" "process shipping" \
    "send orders" "receive billing" "ack billing" "cloudbus_memory" "messaging.operation.type" \
    "messaging.destination.name" "cloudbus-otel-example"
# Without an endpoint it prints the trace as a tree.
cargo run --quiet -p cloudbus-telemetry-examples --example otel_export > /tmp/cloudbus-otel-tree.log
grep -q "process shipping \[Consumer\]" /tmp/cloudbus-otel-tree.log

echo "== durable stores (cloudbus-store) on PostgreSQL, SQLite and Redis"
if [[ -z "${DATABASE_URL:-}" ]]; then
    start_emulator "PostgreSQL" scripts/postgres.sh POSTGRES_PID DATABASE_URL
else
    echo "using the PostgreSQL database at DATABASE_URL"
fi
if [[ -z "${REDIS_URL:-}" ]]; then
    start_emulator "Redis" scripts/redis.sh REDIS_PID REDIS_URL
else
    echo "using the Redis at REDIS_URL"
fi
cargo test -p cloudbus-store --all-features
if [[ -n "${DATABASE_URL:-}" ]]; then
    echo "== order saga with its outbox and dedup store in PostgreSQL"
    run_saga "" postgres
    grep -q "order database: PostgreSQL" /tmp/cloudbus-order-saga.log
fi

echo "== stream replay example"
cargo run --quiet --example stream_replay

echo "== Google Cloud Pub/Sub (official emulator)"
if [[ -z "${PUBSUB_EMULATOR_HOST:-}" ]]; then
    start_emulator "the Pub/Sub emulator" scripts/pubsub-emulator.sh PUBSUB_EMULATOR_PID PUBSUB_EMULATOR_HOST
else
    echo "using the Pub/Sub emulator at $PUBSUB_EMULATOR_HOST"
fi
cargo test -p cloudbus-gcp --features emulators
if [[ -n "${PUBSUB_EMULATOR_HOST:-}" ]]; then
    run_saga "pubsub://saga-$$-$RANDOM" gcp
fi

echo "== Kafka (tansu, a Kafka-compatible broker)"
if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
    start_emulator "tansu (Kafka)" scripts/kafka.sh KAFKA_PID KAFKA_BOOTSTRAP_SERVERS
else
    echo "using the Kafka brokers at $KAFKA_BOOTSTRAP_SERVERS"
fi
cargo test -p cloudbus-kafka --features emulators
if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
    # tansu holds a new consumer group's first join for half of session.timeout.ms
    # (23 s with librdkafka's 45 s default): 6 s keeps the saga's waits enough.
    run_saga "kafka://$KAFKA_BOOTSTRAP_SERVERS?session_timeout_ms=6000" kafka
fi

echo "== AWS (LocalStack in host mode)"
if [[ -z "${AWS_ENDPOINT_URL:-}" ]]; then
    start_emulator "LocalStack" scripts/localstack.sh LOCALSTACK_PID AWS_ENDPOINT_URL
else
    echo "using the AWS endpoint $AWS_ENDPOINT_URL"
fi
# moto, for EventBridge archives and StartReplay (LocalStack's StartReplay fails).
if [[ -z "${MOTO_ENDPOINT_URL:-}" ]]; then
    start_emulator "moto" scripts/moto.sh MOTO_PID MOTO_ENDPOINT_URL
else
    echo "using moto at $MOTO_ENDPOINT_URL"
fi
# Dummy credentials and a region for anything that reads the standard chain.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
cargo test -p cloudbus-aws --features emulators
if [[ -n "${AWS_ENDPOINT_URL:-}" ]]; then
    for url in sqs:// sns:// eventbridge://; do
        run_saga "$url" aws
    done
fi

echo "== the cloudbus command-line tool (assert_cmd, on the Pub/Sub emulator, LocalStack and tansu)"
cargo test -p cloudbus-cli
# Every provider's decoder against the fuzz corpus (the facade with the providers the
# CLI has just built).
cargo test -p cloudbus --features aws,azure,gcp --test fuzz_corpus

echo "== Azure (the project's emulators, proven against azure-eventgrid and azure-servicebus first)"
if [[ -z "${EVENTGRID_ENDPOINT:-}" ]]; then
    start_emulator "the Event Grid emulator" scripts/eventgrid-emulator.sh EVENTGRID_EMULATOR_PID EVENTGRID_ENDPOINT EVENTGRID_KEY
else
    echo "using the Event Grid endpoint $EVENTGRID_ENDPOINT"
fi
if [[ -z "${SERVICEBUS_CONNECTION_STRING:-}" ]]; then
    start_emulator "the Service Bus emulator" scripts/servicebus-emulator.sh SERVICEBUS_EMULATOR_PID SERVICEBUS_CONNECTION_STRING SERVICEBUS_MANAGEMENT_ENDPOINT SERVICEBUS_EMULATOR_PID
else
    echo "using the Service Bus namespace of SERVICEBUS_CONNECTION_STRING"
fi
# One test at a time: many cases time leases of 5 s, and one single-threaded Python
# emulator serves them all.
cargo test -p cloudbus-azure --features emulators -- --test-threads=1
if [[ -n "${SERVICEBUS_CONNECTION_STRING:-}" ]]; then
    run_saga servicebus:// azure
    # An application's view: a crate outside this workspace with cloudbus and
    # features = ["azure"] in its Cargo.toml and nothing else (no [patch], no copied
    # crates) runs the saga on Service Bus.
    echo "== tests/app (outside the workspace) runs the order saga on servicebus://"
    CLOUDBUS_URL=servicebus:// cargo run --quiet --manifest-path tests/app/Cargo.toml \
        > /tmp/cloudbus-app-saga.log
    saga_finished /tmp/cloudbus-app-saga.log
fi
