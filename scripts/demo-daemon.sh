#!/bin/bash
# A guided tour of bitbackd (issue 3): the daemon serves a QBM image over
# NBD, a dirty bitmap added over QMP tracks the writes a client makes, the
# NBD metadata context qemu:dirty-bitmap:b0 shows them, and after `quit` the
# bitmap is stored in the image.
#
# Binaries come from build/ (override with BITBACK_BUILD=folder).  The work
# happens in a temporary folder (DEMO_DIR=folder to keep it somewhere).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/scripts/demo-lib.sh"
demo_init bitbackd-demo qemu-io nbdinfo
# show CMD ARGS...: print the command (quoted so it can be pasted), run it.
# qmp COMMAND [JSON-ARGUMENTS [NODE]]: one QMP exchange on the monitor
# socket, printed as a person would type it and as the daemon answers.  With
# NODE (for query-named-block-nodes), only that node's dirty-bitmaps.
qmp() {
    "$PYTHON" -m bitback_testlib.qmpcli "$QMP_SOCK" show "$1" "${2:-}" --node "${3:-}"
}

say "Create a 64 MiB QBM image (a raw data file plus bitmap metadata)"
show "$BITBACK" img create -f qbm disk.qbm 64M

say "Start bitbackd with qemu-storage-daemon's options"
start_daemon "$BITBACKD" driver=qbm,node-name=disk0,file.driver=file,file.filename=disk.qbm
echo "bitbackd is running as process $PID"

say "Add a persistent dirty bitmap b0 and export disk0 with it"
qmp block-dirty-bitmap-add '{"node": "disk0", "name": "b0", "persistent": true}'
qmp block-export-add '{"type": "nbd", "id": "e0", "node-name": "disk0",
                       "writable": true, "bitmaps": ["b0"]}'

URI="nbd+unix:///disk0?socket=$NBD_SOCK"
say "Write through NBD with qemu-io: 64 KiB at 0, 1 byte at 10 MiB, 200 KiB at 33 MiB"
show qemu-io -f raw "$URI" -c 'write -P 0xaa 0 64k' -c 'write -P 0xbb 10M 1' \
    -c 'write -P 0xcc 33M 200k'

say "The bitmap as an NBD client sees it (qemu:dirty-bitmap:b0)"
show nbdinfo --map=qemu:dirty-bitmap:b0 "$URI"

say "And as QMP reports it: 1 + 1 + 4 clusters of 64 KiB are dirty"
qmp query-named-block-nodes '' disk0

say "Shut down with quit: persistent bitmaps are stored and marked clean"
qmp quit
if ! wait_gone "$PID" 600; then
    echo "demo: bitbackd did not exit" >&2
    exit 1
fi
PID=

say "The bitmap is in the image, with the same dirty clusters"
show "$BITBACK" img info disk.qbm
show "$BITBACK" img map --bitmap b0 disk.qbm

echo
echo "Demo finished${KEEP:+ (files kept in $DIR)}."
