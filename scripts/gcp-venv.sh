#!/usr/bin/env bash
# Makes (once) the Python venv of Google's official Pub/Sub client and the official
# CloudEvents Python SDK, which the interoperability test runs on the other side of
# cloudbus (tests/interop/pubsub_clients.py). Prints the venv's python.
# Venv: $GCP_CLIENTS_HOME, else ~/.cache/cloudbus/gcp.
set -euo pipefail
exec bash "$(dirname "$0")/python-venv.sh" "${GCP_CLIENTS_HOME:-$HOME/.cache/cloudbus/gcp}" \
    google-cloud-pubsub==2.44.0 cloudevents==2.2.0
