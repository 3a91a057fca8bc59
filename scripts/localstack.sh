#!/usr/bin/env bash
# Installs (once, into a venv) and starts LocalStack in host mode, without Docker, on
# 127.0.0.1, with SQS, SNS, EventBridge and Kinesis; waits until it is ready and prints `AWS_ENDPOINT_URL=...` and
# `LOCALSTACK_PID=...` for the caller to eval. Stop it with `kill -- -$LOCALSTACK_PID`.
#
#   eval "$(bash scripts/localstack.sh)"
#
# The recipe (pins, settings) is the one measured in ../shared/EMULATORS.md.
# Port: $LOCALSTACK_PORT, else 4566. Venv and state: $LOCALSTACK_HOME, else
# ~/.cache/cloudbus/localstack. With CLOUDBUS_INSTALL_ONLY=1 it installs (LocalStack,
# kinesis-mock: what needs the network) and exits; scripts/test.sh does that before it
# starts LocalStack in a namespace with no network.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/emulator-lib.sh

port="${LOCALSTACK_PORT:-4566}"
home="${LOCALSTACK_HOME:-$HOME/.cache/cloudbus/localstack}"
venv="$home/venv"
mkdir -p "$home"

find_python() {
    local py
    for v in 3.13; do
        for py in "$(ls -d "$HOME"/.pyenv/versions/"$v"*/bin/python 2>/dev/null | head -n 1)" \
            "$(command -v "python$v" 2>/dev/null)"; do
            if [[ -n "$py" ]] && "$py" -c 'import sys; assert sys.version_info >= (3, 13)' 2>/dev/null; then
                echo "$py"
                return 0
            fi
        done
    done
    echo "LocalStack 2026.3 needs Python 3.13 (pyenv install 3.13)" >&2
    return 1
}

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import localstack' 2>/dev/null; then
    py="$(find_python)"
    echo "installing LocalStack into $venv (once)" >&2
    "$py" -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'localstack-core[runtime]==2026.3.0' 'cbor2>=5.5,<6' 'pyopenssl>=25,<26' \
        'cryptography>=45.0.7,<47' service-identity >&2
fi
# Kinesis (the npm package kinesis-local) into the static libs of host mode under
# $home/fs, which every run below links into its own filesystem root. Without
# OVERRIDE_IN_DOCKER=0, lpm in a container installs into the container's
# /usr/lib/localstack, where host mode never looks: the runtime then fetched it from
# npm at every start, which fails in a namespace with no network.
static_libs="$home/fs/usr/lib/localstack"
if [[ ! -e "$home/kinesis-mock-in-static-libs" ]]; then
    if (cd "$home" && OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$home/fs" CONFIG_DIR="$home/config" \
        HOME="$home" "$venv/bin/python" -m localstack.cli.lpm install --target static_libs \
        kinesis-mock >&2) && [[ -d "$static_libs" ]]; then
        touch "$home/kinesis-mock-in-static-libs"
    elif [[ "${CLOUDBUS_INSTALL_ONLY:-}" == 1 ]]; then
        echo "could not preinstall kinesis-mock (LocalStack's Kinesis)" >&2
        exit 1
    else
        echo "could not preinstall kinesis-mock; LocalStack fetches it at first use, which fails without the network" >&2
    fi
fi
if [[ "${CLOUDBUS_INSTALL_ONLY:-}" == 1 ]]; then
    exit 0
fi

require_free_port "$port" "LOCALSTACK_PORT or AWS_ENDPOINT_URL"

# Node (the Kinesis engine) has no bind option: force its servers onto 127.0.0.1.
preload="$home/listen-localhost.js"
cat > "$preload" <<'JS'
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number') { args.splice(1, typeof args[1] === 'string' ? 1 : 0, '127.0.0.1'); }
  else if (args[0] && typeof args[0] === 'object' && !args[0].path) { args[0].host = '127.0.0.1'; }
  return listen.apply(this, args);
};
JS

state="$home/run-$port"
rm -rf "$state"
mkdir -p "$state/fs/usr/lib" "$state/config" "$state/home"
if [[ -d "$static_libs" ]]; then
    ln -s "$static_libs" "$state/fs/usr/lib/localstack"
fi
log="${LOCALSTACK_LOG:-/tmp/cloudbus-localstack-$port.log}"
GATEWAY_LISTEN="127.0.0.1:$port" GATEWAY_SERVER=hypercorn LOCALSTACK_HOST="127.0.0.1:$port" \
    OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$state/fs" CONFIG_DIR="$state/config" HOME="$state/home" \
    SERVICES=sqs,sns,events,kinesis DNS_ADDRESS=0 SKIP_SSL_CERT_DOWNLOAD=1 DISABLE_EVENTS=1 \
    SQS_ENDPOINT_STRATEGY=path NODE_OPTIONS="--require $preload" \
    setsid "$venv/bin/python" -m localstack.runtime.main >"$log" 2>&1 < /dev/null &
pid=$!
wait_ready "LocalStack" "$pid" 60 "$log" grep -q "^Ready\." "$log" || exit 1
echo "AWS_ENDPOINT_URL=http://127.0.0.1:$port"
echo "LOCALSTACK_PID=$pid"
