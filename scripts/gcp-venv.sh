#!/usr/bin/env bash
# Makes (once) the Python venv of Google's official Pub/Sub client and the official
# CloudEvents Python SDK, which the interoperability test runs on the other side of
# cloudbus (tests/interop/pubsub_clients.py). Prints the venv's python.
# Venv: $GCP_CLIENTS_HOME, else ~/.cache/cloudbus/gcp.
set -euo pipefail
home="${GCP_CLIENTS_HOME:-$HOME/.cache/cloudbus/gcp}"
venv="$home/venv"
pins=(google-cloud-pubsub==2.44.0 cloudevents==2.2.0)
stamp="$venv/.cloudbus-pins"
if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]]; then
    echo "installing Google's Pub/Sub client and the CloudEvents SDK into $venv (once)" >&2
    mkdir -p "$home"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
    echo "${pins[*]}" > "$stamp"
fi
echo "$venv/bin/python"
