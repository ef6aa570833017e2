#!/bin/bash
# Backup chains with `bitback backup / list / verify / restore / prune`
# (issue 6), the way a user runs them every night:
#
#   bitbackd serves a qbm disk over NBD; a client writes to it; `bitback
#   backup` takes a full backup (auto: the repository is empty), more
#   writes, `bitback backup` again (auto: an incremental); `bitback list`
#   and `bitback verify`; `bitback restore` of each point, compared with a
#   copy of the disk taken at that point; `bitback prune --keep 1` merges
#   the chain into a synthetic full, which still verifies and restores.
#
# Binaries come from build/ (override with BITBACK_BUILD=folder).  The work
# happens in a temporary folder (DEMO_DIR=folder to keep it somewhere).
# Exits non-zero if any check fails.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/scripts/demo-lib.sh"
demo_init bitback-chain-demo qemu-io qemu-img
# show CMD ARGS...: print the command (quoted so it can be pasted), run it.
# backups EXPR: a Python expression on the repository's backup list
# (`bitback list --output=json`, oldest first) as b, printed.
backups() {
    "$BITBACK" list --repo "$R" --output=json |
        "$PYTHON" -c 'import json, sys; b = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}
# expect WHAT GOT WANT: fail the demo when GOT is not WANT.
expect() {
    if [ "$2" != "$3" ]; then
        echo "FAILED: $1 is $2, expected $3" >&2
        exit 1
    fi
}
# snapshot NAME: copy the disk as it is now (read over NBD) to NAME.raw, the
# reference a restore of this point must equal.
snapshot() {
    qemu-img convert -f raw -O raw "$URI" "$1.raw"
}
# same A B: the check of this demo; fails the script when A and B differ.
same() {
    if show qemu-img compare -f raw -F raw "$1" "$2"; then
        echo "ok: $1 is bit for bit the disk as it was ($2)"
    else
        echo "FAILED: $1 differs from $2" >&2
        exit 1
    fi
}

URI="nbd+unix:///disk0?socket=$NBD_SOCK"
R=$DIR/repo

say "Create a 64 MiB qbm disk and serve it with bitbackd over NBD"
show "$BITBACK" img create -f qbm disk.qbm 64M
start_daemon "$BITBACKD" driver=qbm,node-name=disk0,file.driver=file,file.filename=disk.qbm \
    --export type=nbd,id=e0,node-name=disk0,name=disk0,writable=on

say "A client writes 24 MiB through NBD"
show qemu-io -f raw "$URI" -c "write -P 0x11 0 16M" -c "write -P 0x22 32M 8M"

say "First backup: --level auto takes a full backup into the empty repository"
show "$BITBACK" backup --connect "$QMP_SOCK" --node disk0 --repo "$R"
snapshot point1
expect "the first backup's level" "$(backups 'b[-1]["level"]')" full
FIRST=$(backups 'b[-1]["id"]')

say "The client writes more: 2 MiB here and there, and discards 1 MiB"
show qemu-io -f raw "$URI" -c "write -P 0x33 4M 1M" -c "write -P 0x44 40M 1M" \
    -c "write -z 33M 1M"

say "Second backup: auto takes an incremental, only what changed"
show "$BITBACK" backup --connect "$QMP_SOCK" --node disk0 --repo "$R"
snapshot point2
expect "the second backup's level" "$(backups 'b[-1]["level"]')" inc
expect "its parent" "$(backups 'b[-1]["parent"]')" "$FIRST"

say "The repository: backups oldest first; each is a plain qcow2 file"
show "$BITBACK" list --repo "$R"
show qemu-img info --backing-chain "$R/disk0/$(backups 'b[-1]["id"]').qcow2" \
    | grep -E '^(image|backing file|virtual size):'

say "Verify: re-read every stored cluster against the hashes taken at backup time"
show "$BITBACK" verify --repo "$R"

say "Restore each point and compare it with the disk as it was then"
show "$BITBACK" restore --repo "$R" --at "$FIRST" restored1.raw
same restored1.raw point1.raw
show "$BITBACK" restore --repo "$R" --at latest restored2.raw
same restored2.raw point2.raw

say "Retention: keep 1 backup; the incremental becomes a synthetic full"
show "$BITBACK" prune --repo "$R" --keep 1
show "$BITBACK" list --repo "$R"
expect "the number of backups left" "$(backups 'len(b)')" 1
expect "the backup left" "$(backups 'b[0]["parent"]')" None
show "$BITBACK" verify --repo "$R"
show "$BITBACK" restore --repo "$R" --at latest restored3.raw
same restored3.raw point2.raw

say "Shut down"
kill "$PID"
wait_gone "$PID" 200 || true
PID=

echo
echo "Chain demo finished: full + incremental, verified, restored and pruned${KEEP:+ (files kept in $DIR)}."
