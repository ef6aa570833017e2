#!/bin/bash
# NBD server benchmark: bitbackd against qemu-storage-daemon, qemu-nbd and
# nbdkit's file plugin, all serving the same raw image, measured with fio's
# libnbd engine (ioengine=nbd, uri=...):
#
#   seq-write   1 MiB writes, iodepth 8       seq-read   1 MiB reads, iodepth 8
#   rand-write  4 KiB writes, iodepth 32      rand-read  4 KiB reads, iodepth 32
#
# bitbackd serves a QBM overlay over the raw image (data-file=the raw image)
# with two enabled persistent bitmaps, so every write is tracked twice.
# qemu-storage-daemon gets two enabled bitmaps over QMP; on a raw image QEMU
# can only keep them in memory (non-persistent).  qemu-nbd and nbdkit track
# nothing.  All servers use the host page cache (no O_DIRECT).
#
# Usage: bench/nbd.sh [BUILD_DIR]        (default: build)
# Environment: RUNTIME (seconds per fio run, default 10), SIZE (image size,
# default 1G), WORKDIR (default: a new folder under /tmp).
# This is a benchmark, not a test: it prints a table and never fails on speed.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
case $build in /*) ;; *) build=$here/$build ;; esac
BITBACK=$build/bitback
BITBACKD=$build/bitbackd
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}

for tool in fio qemu-storage-daemon qemu-nbd nbdkit qemu-img python3; do
    command -v "$tool" >/dev/null || { echo "nbd.sh: $tool is not installed" >&2; exit 1; }
done
for bin in "$BITBACK" "$BITBACKD"; do
    [ -x "$bin" ] || { echo "nbd.sh: $bin not built (run ninja -C $build)" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "nbd.sh: fio lacks the nbd engine" >&2; exit 1; }

W=${WORKDIR:-$(mktemp -d /tmp/bitback-nbd-bench.XXXXXX)}
mkdir -p "$W"
IMG=$W/disk.raw
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    [ -n "${WORKDIR:-}" ] || rm -rf "$W"
}
trap cleanup EXIT

echo "# image: $IMG ($SIZE, fully written), fio runtime ${RUNTIME}s per row"
qemu-img create -q -f raw "$IMG" "$SIZE"
bytes=$(stat -c %s "$IMG")
dd if=/dev/zero of="$IMG" bs=1M count=$((bytes / 1048576)) conv=notrunc,fsync status=none

wait_socket() {
    for _ in $(seq 300); do
        [ -S "$1" ] && return 0
        sleep 0.05
    done
    echo "nbd.sh: server socket $1 did not appear" >&2
    return 1
}

stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}

qmp() {  # qmp SOCKET JSON-COMMAND...: run QMP commands, fail on an error reply
    python3 - "$@" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def send(cmd):
    f.write(json.dumps(cmd) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" in r: continue
        if "error" in r: sys.exit("QMP error: %s" % r["error"])
        return r
json.loads(f.readline())
send({"execute": "qmp_capabilities"})
for c in sys.argv[2:]: send(json.loads(c))
EOF
}

# run_fio NAME URI -> "seqw seqr randw randr" (MiB/s, MiB/s, IOPS, IOPS)
run_fio() {
    local uri=$1 out=()
    local spec
    for spec in "write 1M 8" "read 1M 8" "randwrite 4k 32" "randread 4k 32"; do
        set -- $spec
        local json
        json=$(fio --name=bench --ioengine=nbd --uri="$uri" --rw="$1" --bs="$2" \
                   --iodepth="$3" --size="$bytes" --time_based --runtime="$RUNTIME" \
                   --ramp_time=1 --output-format=json 2>"$W/fio.err") || { cat "$W/fio.err" >&2; exit 1; }
        out+=("$(python3 -c '
import json, sys
text = sys.stdin.read()
j = json.loads(text[text.index("{"):])["jobs"][0]   # fio may print a line first
side = j["write"] if j["write"]["io_bytes"] else j["read"]
kind = sys.argv[1]
print("%.0f" % (side["bw_bytes"] / 1048576 if kind == "1M" else side["iops"]))
' "$2" <<<"$json")")
    done
    echo "${out[*]}"
}

declare -A R

# --- bitbackd: qbm over the raw image, two persistent bitmaps ------------
"$BITBACK" img create -f qbm -o data-file="$IMG",data-format=raw "$W/disk.qbm" >/dev/null
"$BITBACK" bitmap --add "$W/disk.qbm" b0 >/dev/null
"$BITBACK" bitmap --add "$W/disk.qbm" b1 >/dev/null
"$BITBACKD" --blockdev "driver=qbm,node-name=d0,file.driver=file,file.filename=$W/disk.qbm" \
    --nbd-server "addr.type=unix,addr.path=$W/bb.sock" \
    --export type=nbd,id=e0,node-name=d0,name=d0,writable=on \
    --chardev "socket,path=$W/bb-qmp.sock,server=on,wait=off,id=m0" --monitor chardev=m0 \
    >"$W/bitbackd.log" 2>&1 &
SERVER_PID=$!
wait_socket "$W/bb.sock"
R[bitbackd]=$(run_fio "nbd+unix:///d0?socket=$W/bb.sock")
qmp "$W/bb-qmp.sock" '{"execute":"query-named-block-nodes"}' >/dev/null
stop_server

# --- qemu-storage-daemon: two in-memory bitmaps (raw cannot store them) --
qemu-storage-daemon \
    --blockdev "driver=file,node-name=f0,filename=$IMG" \
    --blockdev driver=raw,node-name=d0,file=f0 \
    --nbd-server "addr.type=unix,addr.path=$W/qsd.sock" \
    --chardev "socket,path=$W/qsd-qmp.sock,server=on,wait=off,id=m0" --monitor chardev=m0 \
    >"$W/qsd.log" 2>&1 &
SERVER_PID=$!
wait_socket "$W/qsd-qmp.sock"
qmp "$W/qsd-qmp.sock" \
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"d0","name":"b0"}}' \
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"d0","name":"b1"}}' \
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"d0","name":"d0","writable":true}}'
wait_socket "$W/qsd.sock"
R[qsd]=$(run_fio "nbd+unix:///d0?socket=$W/qsd.sock")
stop_server

# --- qemu-nbd ------------------------------------------------------------
qemu-nbd -f raw -k "$W/qnbd.sock" -x d0 --shared=16 --persistent "$IMG" \
    >"$W/qemu-nbd.log" 2>&1 &
SERVER_PID=$!
wait_socket "$W/qnbd.sock"
R[qemu-nbd]=$(run_fio "nbd+unix:///d0?socket=$W/qnbd.sock")
stop_server

# --- nbdkit file plugin --------------------------------------------------
nbdkit -f -U "$W/kit.sock" -e d0 file "$IMG" >"$W/nbdkit.log" 2>&1 &
SERVER_PID=$!
wait_socket "$W/kit.sock"
R[nbdkit]=$(run_fio "nbd+unix:///d0?socket=$W/kit.sock")
stop_server

# --- qcow2 rows: bitbackd and qemu-storage-daemon on the same qcow2 image,
# each with two persistent bitmaps stored in the image -------------------
for who in bb qsd; do
    qemu-img convert -O qcow2 -f raw "$IMG" "$W/$who.qcow2"
    qemu-img bitmap --add "$W/$who.qcow2" b0
    qemu-img bitmap --add "$W/$who.qcow2" b1
done
"$BITBACKD" --blockdev "driver=qcow2,node-name=d0,file.driver=file,file.filename=$W/bb.qcow2" \
    --nbd-server "addr.type=unix,addr.path=$W/bbq.sock" \
    --export type=nbd,id=e0,node-name=d0,name=d0,writable=on \
    >"$W/bitbackd-qcow2.log" 2>&1 &
SERVER_PID=$!
wait_socket "$W/bbq.sock"
R[bitbackd-qcow2]=$(run_fio "nbd+unix:///d0?socket=$W/bbq.sock")
stop_server
qemu-storage-daemon \
    --blockdev "driver=file,node-name=f0,filename=$W/qsd.qcow2" \
    --blockdev driver=qcow2,node-name=d0,file=f0 \
    --nbd-server "addr.type=unix,addr.path=$W/qsdq.sock" \
    --export type=nbd,id=e0,node-name=d0,name=d0,writable=on \
    >"$W/qsd-qcow2.log" 2>&1 &
SERVER_PID=$!
wait_socket "$W/qsdq.sock"
R[qsd-qcow2]=$(run_fio "nbd+unix:///d0?socket=$W/qsdq.sock")
stop_server

python3 - "${R[bitbackd]}" "${R[qsd]}" "${R[qemu-nbd]}" "${R[nbdkit]}" <<'EOF'
import sys
names = ["bitbackd", "qemu-storage-daemon", "qemu-nbd", "nbdkit-file"]
vals = [list(map(float, a.split())) for a in sys.argv[1:]]
rows = ["seq-write 1M qd8 (MiB/s)", "seq-read 1M qd8 (MiB/s)",
        "rand-write 4k qd32 (IOPS)", "rand-read 4k qd32 (IOPS)"]
print()
print("%-27s" % "test" + "".join("%21s" % n for n in names) +
      "".join("%10s" % r for r in ["/qsd", "/qemu-nbd", "/nbdkit"]) + "  vs best")
for i, row in enumerate(rows):
    mine = vals[0][i]
    line = "%-27s" % row + "".join("%21.0f" % v[i] for v in vals)
    line += "".join("%10.2f" % (mine / v[i] if v[i] else float("inf")) for v in vals[1:])
    best = max(v[i] for v in vals[1:])
    line += "  %6.2f" % (mine / best if best else float("inf"))
    print(line)
print("\nratio = bitbackd / peer (>= 1.00: bitbackd at least as fast).")
print("bitbackd tracks writes in 2 persistent bitmaps (qbm over the raw image);")
print("qemu-storage-daemon in 2 non-persistent bitmaps (raw cannot store them);")
print("qemu-nbd and nbdkit track nothing.")
EOF

python3 - "${R[bitbackd-qcow2]}" "${R[qsd-qcow2]}" <<'EOF'
import sys
rows = ["seq-write 1M qd8 (MiB/s)", "seq-read 1M qd8 (MiB/s)",
        "rand-write 4k qd32 (IOPS)", "rand-read 4k qd32 (IOPS)"]
mine, qsd = (list(map(float, a.split())) for a in sys.argv[1:])
print()
print("qcow2 (two persistent bitmaps in the image on both daemons)")
print("%-27s%21s%21s%10s" % ("test", "bitbackd", "qemu-storage-daemon", "/qsd"))
for i, row in enumerate(rows):
    print("%-27s%21.0f%21.0f%10.2f" % (row, mine[i], qsd[i],
                                        mine[i] / qsd[i] if qsd[i] else float("inf")))
EOF
