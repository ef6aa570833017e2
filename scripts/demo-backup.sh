#!/bin/bash
# Live backups with bitbackd (issue 4): a writer keeps writing to a disk
# over NBD while bitbackd takes a full backup and then an incremental
# backup into an overlay, with QEMU's QMP commands (transaction,
# blockdev-backup, dirty bitmaps).  Then the writer stops, a last
# incremental catches up, and the backup chain is compared byte for byte
# with the live disk.
#
# Binaries come from build/ (override with BITBACK_BUILD=folder).  The work
# happens in a temporary folder (DEMO_DIR=folder to keep it somewhere).
# DEMO_DAEMON=qsd runs the same QMP against qemu-storage-daemon (with qcow2
# overlays, as it has no qbm).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/scripts/demo-lib.sh"
SIZE_MB=128

if [ "${DEMO_DAEMON:-bitbackd}" = qsd ]; then
    demo_init bitback-backup-demo qemu-io qemu-img nbdinfo qemu-storage-daemon
    DAEMON=qemu-storage-daemon OVL=qcow2
else
    demo_init bitback-backup-demo qemu-io qemu-img nbdinfo
    DAEMON=$BITBACKD OVL=qbm
fi
WRITER=
# demo_cleanup: stop the writer (demo_init's exit trap runs it).
demo_cleanup() {
    if [ -n "$WRITER" ] && kill -0 "$WRITER" 2>/dev/null; then
        kill "$WRITER" 2>/dev/null || true
        wait "$WRITER" 2>/dev/null || true
    fi
}
# show CMD ARGS...: print the command (quoted so it can be pasted), run it.
# qmp COMMAND [JSON-ARGUMENTS [JOB-ID]]: one QMP exchange on the monitor
# socket, printed as a person would type it and as the daemon answers.
# With JOB-ID, also wait on the same connection for that job's
# BLOCK_JOB_COMPLETED (or _CANCELLED) event, print it, and fail if the job
# failed.
qmp() {
    "$PYTHON" -m bitback_testlib.qmpcli "$QMP_SOCK" show "$1" "${2:-}" --job "${3:-}"
}
# bitmap_count NODE NAME: the dirty byte count of a bitmap.
bitmap_count() {
    "$PYTHON" -m bitback_testlib.qmpcli "$QMP_SOCK" bitmap "$1" "$2" count
}
writes_so_far() { cat writer.log 2>/dev/null | wc -l; }
# overlay NAME BACKING-FILE BACKING-FORMAT BACKING-NODE: create NAME.$OVL
# (qbm with bitback, qcow2 with qemu-img) over BACKING-FILE and add it as
# node NAME backed by BACKING-NODE.
overlay() {
    if [ "$OVL" = qbm ]; then
        show "$BITBACK" img create -f qbm -b "$2" -F "$3" "$1.qbm"
    else
        show qemu-img create -q -f qcow2 -b "$2" -F "$3" "$1.qcow2"
    fi
    qmp blockdev-add "{\"driver\": \"$OVL\", \"node-name\": \"$1\",
                   \"file\": {\"driver\": \"file\", \"filename\": \"$DIR/$1.$OVL\"},
                   \"backing\": \"$4\"}"
}

URI="nbd+unix:///disk0?socket=$NBD_SOCK"

say "Create a ${SIZE_MB} MiB raw disk full of data"
show qemu-img create -q -f raw disk.raw ${SIZE_MB}M
show qemu-io -f raw disk.raw -c "write -P 0x11 0 ${SIZE_MB}M" >/dev/null

say "Start ${DAEMON##*/} and export the disk over NBD, writable"
start_daemon "$DAEMON" driver=raw,node-name=disk0,file.driver=file,file.filename=disk.raw
qmp block-export-add '{"type": "nbd", "id": "e0", "node-name": "disk0",
                       "name": "disk0", "writable": true}'

say "Start a writer: qemu-io writes 64 KiB blocks at random places, over and over"
echo "(each write uses a new pattern byte; writer.log lists them)"
rm -f stop-writer
(
    i=0
    while [ ! -e stop-writer ]; do
        off=$(( (RANDOM * 32768 + RANDOM) % (SIZE_MB * 16) * 65536 ))
        pat=$(( i % 254 + 1 ))
        qemu-io -f raw "$URI" -c "write -P $pat $off 64k" >/dev/null
        echo "$off $pat" >> writer.log
        i=$((i + 1))
    done
) &
WRITER=$!
sleep 1
echo "writer is running (process $WRITER), $(writes_so_far) writes so far"

say "Full backup, live: one transaction adds bitmap b0 and starts the job"
echo "(speed 32 MiB/s so that the writer runs during the job; the backup holds"
echo " the disk as it was when the job started: copy-before-write)"
show qemu-img create -q -f raw full.raw ${SIZE_MB}M
qmp blockdev-add '{"driver": "raw", "node-name": "full",
                   "file": {"driver": "file", "filename": "'"$DIR"'/full.raw"}}'
before=$(writes_so_far)
qmp transaction '{"actions": [
    {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b0"}},
    {"type": "blockdev-backup", "data": {"job-id": "full0", "device": "disk0",
                                         "target": "full", "sync": "full",
                                         "speed": 33554432}}]}' full0
echo "the writer made $(( $(writes_so_far) - before )) writes during the full backup"
echo "b0 now tracks $(bitmap_count disk0 b0) dirty bytes written since the job started"

say "Incremental backup, live: only b0's dirty clusters, into an overlay on the full backup"
overlay inc1 full.raw raw full
before=$(writes_so_far)
qmp blockdev-backup '{"job-id": "inc1", "device": "disk0", "target": "inc1",
                      "sync": "incremental", "bitmap": "b0"}' inc1
echo "the writer made $(( $(writes_so_far) - before )) writes during the incremental"

say "Stop the writer"
touch stop-writer
wait "$WRITER"
WRITER=
echo "the writer made $(writes_so_far) writes in all"
echo "b0 holds $(bitmap_count disk0 b0) dirty bytes written since the incremental started"

say "A last incremental, with no writer: inc2 on top of inc1 on top of full"
overlay inc2 inc1.$OVL $OVL inc1
qmp blockdev-backup '{"job-id": "inc2", "device": "disk0", "target": "inc2",
                      "sync": "incremental", "bitmap": "b0"}' inc2

say "Verify: the chain full <- inc1 <- inc2 equals the live disk, byte for byte"
qmp block-export-add '{"type": "nbd", "id": "e1", "node-name": "inc2",
                       "name": "chain", "writable": false}'
show qemu-img compare -f raw -F raw "nbd+unix:///chain?socket=$NBD_SOCK" "$URI"
echo "The chain is identical to the disk: the full backup and both incrementals"
echo "fit together although the first two were taken while the writer ran."

say "What each backup stores"
echo "full.raw: apparent size $(du -h --apparent-size full.raw | cut -f1)"
for f in full.raw inc1.$OVL inc2.$OVL; do
    printf '%-10s uses %s on disk\n' "$f:" "$(du -sh --total "${f%.*}"* | tail -1 | cut -f1)"
done

say "Shut down"
qmp quit
wait_gone "$PID" 600 || true
PID=
# (through a file: head closing the pipe early would fail the script)
if [ "$OVL" = qbm ]; then
    show "$BITBACK" img map inc1.qbm > inc1.map
else
    show qemu-img map inc1.qcow2 > inc1.map
fi
head -20 inc1.map
[ "$(wc -l < inc1.map)" -le 20 ] || echo "... ($(wc -l < inc1.map) lines in all)"
echo "(depth 0, or inc1 in the File column: the clusters inc1 stores itself, only"
echo " those that were dirty when its job started; the rest comes from full.raw)"

echo
echo "Demo finished${KEEP:+ (files kept in $DIR)}."
