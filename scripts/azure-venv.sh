#!/usr/bin/env bash
# Makes (once) the Python venv of the Azure test emulators and of Microsoft's official
# clients that prove them: azure-eventgrid, azure-servicebus, python-qpid-proton.
# Prints the venv's python. Venv: $AZURE_EMULATORS_HOME, else ~/.cache/cloudbus/azure.
set -euo pipefail
home="${AZURE_EMULATORS_HOME:-$HOME/.cache/cloudbus/azure}"
venv="$home/venv"
pins=(azure-core==1.41.0 azure-eventgrid==4.22.1 azure-servicebus==7.15.0 python-qpid-proton==0.40.0)
stamp="$venv/.cloudbus-pins"
if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]]; then
    echo "installing the Azure emulator venv into $venv (once)" >&2
    mkdir -p "$home"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
    echo "${pins[*]}" > "$stamp"
fi
echo "$venv/bin/python"
