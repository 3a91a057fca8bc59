#!/usr/bin/env bash
# Makes room for a build in a reused cargo target directory:
#   bash scripts/target-space.sh TARGET_DIR MIN_FREE_GB
# When the disk holding TARGET_DIR has less than MIN_FREE_GB free, removes its
# incremental caches; when that is not enough, the whole directory (cargo rebuilds
# what it needs). Prints what it did, and nothing when there is room.
set -euo pipefail
target="$1"
min_gb="$2"
mkdir -p "$target"

free_gb() {
    df -Pk "$target" | awk 'NR == 2 { printf "%d", $4 / 1024 / 1024 }'
}

free="$(free_gb)"
if (( free >= min_gb )); then
    exit 0
fi
echo "only ${free} GB free for $target (want ${min_gb}): removing its incremental caches"
rm -rf "$target"/debug/incremental "$target"/release/incremental
free="$(free_gb)"
if (( free >= min_gb )); then
    echo "now ${free} GB free"
    exit 0
fi
echo "still only ${free} GB free: removing $target (a cold build follows)"
rm -rf "$target"
mkdir -p "$target"
echo "now $(free_gb) GB free"
