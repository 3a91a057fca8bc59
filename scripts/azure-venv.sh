#!/usr/bin/env bash
# Makes (once) the Python venv of the Azure test emulators and of Microsoft's official
# clients that prove them: azure-eventgrid, azure-servicebus, python-qpid-proton; and
# the official CloudEvents SDK (its AMQP binding, for the Service Bus interop test).
# Prints the venv's python. Venv: $AZURE_EMULATORS_HOME, else ~/.cache/cloudbus/azure.
set -euo pipefail
exec bash "$(dirname "$0")/python-venv.sh" "${AZURE_EMULATORS_HOME:-$HOME/.cache/cloudbus/azure}" \
    azure-core==1.41.0 azure-eventgrid==4.22.1 azure-servicebus==7.15.0 python-qpid-proton==0.40.0 \
    cloudevents==2.2.0
