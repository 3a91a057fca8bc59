#!/usr/bin/env bash
# python-venv.sh HOME PIN...: makes (once) a Python venv in HOME/venv with exactly
# these pinned packages and prints its python. A venv made for other pins is made
# again. Used by azure-venv.sh and gcp-venv.sh.
set -euo pipefail
home="$1"
shift
pins=("$@")
venv="$home/venv"
stamp="$venv/.cloudbus-pins"
if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]]; then
    echo "installing ${pins[*]} into $venv (once)" >&2
    mkdir -p "$home"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
    echo "${pins[*]}" > "$stamp"
fi
echo "$venv/bin/python"
