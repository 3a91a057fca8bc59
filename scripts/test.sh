#!/usr/bin/env bash
# The whole test suite: unit tests, the conformance suite on every provider built
# here, integration tests and doc tests. It installs and starts whatever emulator the
# enabled providers need; today only the embedded memory broker is built, which needs
# none. Under CI=true a provider whose emulator cannot be started is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo test --workspace (unit, conformance on the memory broker, integration, doc tests)"
cargo test --workspace --all-targets
cargo test --workspace --doc

echo "== order saga example"
cargo run --quiet --example order_saga > /tmp/cloudbus-order-saga.log
grep -q "redriven:        1" /tmp/cloudbus-order-saga.log
tail -n 14 /tmp/cloudbus-order-saga.log

echo "== stream replay example"
cargo run --quiet --example stream_replay
