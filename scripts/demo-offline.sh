#!/bin/bash
# A guided tour of bitback's offline flow (issue 2):
#   create a raw disk, wrap it in a QBM overlay, add a persistent dirty
#   bitmap, write to the disk, read the bitmap back, and show what an
#   incremental backup would copy.
#
# Binaries come from build/ (override with BITBACK_BUILD=folder).  The work
# happens in a temporary folder (DEMO_DIR=folder to keep it somewhere).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BITBACK_BUILD:-$REPO/build}
case $BUILD in /*) ;; *) BUILD=$REPO/$BUILD ;; esac
BITBACK=$BUILD/bitback

if [ ! -x "$BITBACK" ]; then
    echo "demo: $BITBACK not found; build first (make, or meson setup build && ninja -C build)" >&2
    exit 1
fi

if [ -n "${DEMO_DIR:-}" ]; then
    mkdir -p "$DEMO_DIR"
    DIR=$(cd "$DEMO_DIR" && pwd)
else
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/bitback-demo.XXXXXX")
    trap 'rm -rf "$DIR"' EXIT
fi
cd "$DIR"

. "$REPO/scripts/demo-lib.sh"
bitback() { show_as bitback "$BITBACK" "$@"; }

echo "bitback offline demo in $DIR"
"$BITBACK" --version

say "Create a 64 MiB raw disk (sparse), as any VM disk would be"
bitback img create -f raw disk.raw 64M

say "Wrap it in a QBM overlay: a small JSON descriptor; the raw file is not copied or changed"
bitback img create -f qbm -o data-file=disk.raw disk.qbm
show cat disk.qbm

say "Add a persistent dirty bitmap b0 with 64 KiB granularity"
bitback bitmap --add -g 64K disk.qbm b0

say "The 'guest' writes: 1 MiB at 0, a few unaligned bytes at 10 MiB + 100, 200 KiB at 33 MiB, zeroes at 60 MiB"
bitback io disk.qbm \
    -c 'write -P 0xab 0 1M' \
    -c 'write -P 0x01 10485860 10' \
    -c 'write -P 0xcd 33M 200K' \
    -c 'write -z 60M 64K'

say "The process has exited; reopen and read the bitmap's extents"
bitback img map --bitmap b0 disk.qbm

say "Image information (the bitmap is consistent: it was closed cleanly)"
bitback img info disk.qbm

say "The same as JSON, for scripts"
echo "\$ bitback img map --output=json --bitmap b0 disk.qbm > b0.json"
"$BITBACK" img map --output=json --bitmap b0 disk.qbm > b0.json
cat b0.json

say "Plan the incremental backup from the bitmap"
python3 - b0.json <<'EOF'
import json, sys
extents = [e for e in json.load(open(sys.argv[1])) if e["dirty"]]
total = sum(e["length"] for e in extents)
for e in extents:
    print(f"  copy {e['length']:>9} bytes at offset {e['start']}")
print(f"an incremental would copy {total} bytes in {len(extents)} extents")
EOF

say "The data file holds exactly what was written (qemu-io reads it as plain raw)"
if command -v qemu-io >/dev/null; then
    show qemu-io -f raw -r -c 'read -P 0xab 0 1M' -c 'read -P 0xcd 33M 200K' disk.raw
else
    echo "(qemu-io not installed: skipped)"
fi

say "After the backup, clear the bitmap: a new generation begins"
bitback bitmap --clear disk.qbm b0
bitback img info disk.qbm

say "Check the image"
bitback img check disk.qbm

echo
echo "demo finished."
