#!/usr/bin/env bash
# Prints the path of a promtool for the tests of deploy/prometheus: $PROMTOOL when set,
# else `promtool` on PATH, else the one of Debian's `prometheus` package, downloaded
# once (`apt-get download`: no install, so no service and no dependencies) and
# unpacked under $CLOUDBUS_TOOLS_DIR (default /tmp/cloudbus-tools).
#
#   PROMTOOL="$(bash scripts/promtool.sh)"
set -euo pipefail

if [[ -n "${PROMTOOL:-}" ]]; then
    echo "$PROMTOOL"
    exit 0
fi
if command -v promtool > /dev/null; then
    command -v promtool
    exit 0
fi
dir="${CLOUDBUS_TOOLS_DIR:-/tmp/cloudbus-tools}/prometheus"
bin="$dir/usr/bin/promtool"
if [[ ! -x "$bin" ]]; then
    echo "downloading promtool from Debian's prometheus package (once)" >&2
    tmp="$(mktemp -d /tmp/cloudbus-promtool.XXXXXX)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && { apt-get download -q prometheus >&2 ||
        { apt-get update -q >&2 && apt-get download -q prometheus >&2; }; })
    mkdir -p "$dir"
    dpkg-deb -x "$tmp"/prometheus_*.deb "$dir"
fi
"$bin" --version > /dev/null
echo "$bin"
