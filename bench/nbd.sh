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
# A second table measures the cost of crash-safe bitmaps (the write-intent
# log, docs/specs/write-intent.md): bitbackd on a QBM with no bitmaps, with
# two persistent bitmaps crash-safe (the default) and with crash-safe=off,
# and qemu-storage-daemon on a qcow2 with two persistent bitmaps, on
#
#   seq-write   1 MiB writes, iodepth 8, over a fully written image
#   rand-write  4 KiB writes, iodepth 32, over a fully written image
#   first-seq   1 MiB writes, iodepth 8, one pass over a FRESH image: every
#               region's first write waits for an intent sync (worst case)
#   first-rand  4 KiB random writes, iodepth 32, on a FRESH image (RUNTIME s
#               or one pass, whichever ends first)
#
# Each row runs CS_RUNS times (configurations interleaved) and prints the
# median, and the ratios crash-safe / no-bitmaps (target >= 0.97; also as
# the median of the per-round ratios, "paired") and crash-safe /
# qemu-storage-daemon (target >= 1.00).
#
# A third table (issue 19) measures NBD over TLS: bitbackd (a qbm over the
# raw image, as in the peers table) and qemu-nbd (the raw image), each plain and with the same
# x509 credentials (certtool, QEMU's folder layout, a client certificate
# required), on a UNIX socket, with nbdcopy and nbds+unix://...?tls-
# certificates= (fio's nbd engine refuses a URI naming local files):
#   seq-write  nbdcopy of SIZE bytes of random data from a local file (in
#              the page cache) into the export
#   seq-read   nbdcopy of the export to null:
# TLS_RUNS rounds (default PEER_RUNS), rotated; medians; printed: each
# server's TLS / plain and bitbackd-tls / qemu-nbd-tls (target >= 1.0).
#
# Usage: bench/nbd.sh [BUILD_DIR]        (default: build)
# Environment: RUNTIME (seconds per fio run, default 10), SIZE (image size,
# default 1G), WORKDIR (default: a new folder under /tmp), SECTIONS (peers,
# crash-safe, tls or all, the default), PEER_RUNS (runs of the peers table,
# default 3; cells are medians), CS_RUNS (default 3), CS_REGION_SIZES
# (extra crash-safe configurations with these crash-safe-region-size values
# in bytes, e.g. "4194304 268435456"; default none), CS_FRESH_SIZE (size of
# the fresh images of the first-write rows, default SIZE; they are sparse, so
# e.g. 64G costs no disk: more than 64 regions shows the snapshot thrash
# described in docs/performance.md), BASE_BUILD (a build folder of another
# bitback version: the peers table then also runs its bitbackd on the same
# images, interleaved, and prints this build / that build per row, by
# medians and paired round by round: a before/after check of a change).
# This is a benchmark, not a test: it prints a table and never fails on speed.
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init nbd.sh "${1:-build}" fio qemu-storage-daemon qemu-nbd nbdkit qemu-img python3
BASE_BUILD=${BASE_BUILD:-}
[ -z "$BASE_BUILD" ] || bench_need_bins "$BASE_BUILD/bitbackd"
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}
SECTIONS=${SECTIONS:-all}
CS_RUNS=${CS_RUNS:-3}
PEER_RUNS=${PEER_RUNS:-3}
CS_REGION_SIZES=${CS_REGION_SIZES:-}
CS_FRESH_SIZE=${CS_FRESH_SIZE:-$SIZE}
case $SECTIONS in all|peers|crash-safe|tls) ;; *) echo "nbd.sh: SECTIONS must be all, peers, crash-safe or tls" >&2; exit 1 ;; esac
want() { [ "$SECTIONS" = all ] || [ "$SECTIONS" = "$1" ]; }

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
    python3 -m bitback_testlib.qmpcli "$1" run "${@:2}"
}

# fio_value BS <<<JSON -> MiB/s (BS 1M) or IOPS (other BS) of fio's JSON
fio_value() {
    python3 -c '
import json, sys
text = sys.stdin.read()
j = json.loads(text[text.index("{"):])["jobs"][0]   # fio may print a line first
side = j["write"] if j["write"]["io_bytes"] else j["read"]
kind = sys.argv[1]
print("%.0f" % (side["bw_bytes"] / 1048576 if kind == "1M" else side["iops"]))
' "$1"
}

# serve_bitbackd BLOCKDEV SOCKET: bitbackd serving node d0 (BLOCKDEV) as
# export d0 on SOCKET; serve_qsd_qcow2 IMAGE SOCKET: qemu-storage-daemon
# serving the qcow2 IMAGE the same way.  Both set SERVER_PID.
serve_bitbackd() {
    "${SERVE_BITBACKD:-$BITBACKD}" --blockdev "$1" --nbd-server "addr.type=unix,addr.path=$2" \
        --export type=nbd,id=e0,node-name=d0,name=d0,writable=on \
        --chardev "socket,path=$2.qmp,server=on,wait=off,id=m0" --monitor chardev=m0 \
        >>"$W/server.log" 2>&1 &
    SERVER_PID=$!
    wait_socket "$2"
}
serve_qsd_qcow2() {
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f0,filename=$1" \
        --blockdev driver=qcow2,node-name=d0,file=f0 \
        --nbd-server "addr.type=unix,addr.path=$2" \
        --export type=nbd,id=e0,node-name=d0,name=d0,writable=on \
        >>"$W/server.log" 2>&1 &
    SERVER_PID=$!
    wait_socket "$2"
}

# cell_args ARRAY "ROWS" NAMES...: one line "NAME,ROW=values" per cell of
# the associative ARRAY (ARRAY[NAME,ROW] = values), for the summary script
cell_args() {
    local -n cells=$1
    local rows=$2 name row
    shift 2
    for name in "$@"; do
        for row in $rows; do
            printf '%s\n' "$name,$row=${cells[$name,$row]}"
        done
    done
}

# settle: write back the page cache's dirty data before a run, so that a
# run is not throttled by the writeback of the one before it
settle() { sync -f "$W" 2>/dev/null || sync; }

# run_fio NAME URI -> "seqw seqr randw randr" (MiB/s, MiB/s, IOPS, IOPS)
run_fio() {
    local uri=$1 out=()
    local spec
    for spec in "write 1M 8" "read 1M 8" "randwrite 4k 32" "randread 4k 32"; do
        set -- $spec
        local json
        settle
        json=$(fio --name=bench --ioengine=nbd --uri="$uri" --rw="$1" --bs="$2" \
                   --iodepth="$3" --size="$bytes" --time_based --runtime="$RUNTIME" \
                   --ramp_time=1 --output-format=json 2>"$W/fio.err") || { cat "$W/fio.err" >&2; exit 1; }
        out+=("$(fio_value "$2" <<<"$json")")
    done
    echo "${out[*]}"
}


if want peers; then
# Six servers; each run starts every server in turn (the order rotates from
# run to run, so slow drift on a shared machine does not favour one), runs
# the four rows against it and stops it.  Cells are medians over PEER_RUNS.
PEERS=(bitbackd qsd qemu-nbd nbdkit bitbackd-qcow2 qsd-qcow2)
[ -z "$BASE_BUILD" ] || PEERS+=(base base-qcow2)
declare -A PV          # PV[server,row] = one value per run, space separated

# bitbackd: a qbm over the raw image with two persistent bitmaps.
"$BITBACK" img create -f qbm -o data-file="$IMG",data-format=raw "$W/disk.qbm" >/dev/null
"$BITBACK" bitmap --add "$W/disk.qbm" b0 >/dev/null
"$BITBACK" bitmap --add "$W/disk.qbm" b1 >/dev/null
# qcow2 rows: the same data converted, two persistent bitmaps in the image.
for who in bb qsd; do
    qemu-img convert -O qcow2 -f raw "$IMG" "$W/$who.qcow2"
    qemu-img bitmap --add "$W/$who.qcow2" b0
    qemu-img bitmap --add "$W/$who.qcow2" b1
done

# peer_start NAME: start NAME serving export d0 on $W/peer.sock
peer_start() {
    rm -f "$W/peer.sock" "$W/peer-qmp.sock"
    case $1 in
    bitbackd)
        serve_bitbackd "driver=qbm,node-name=d0,file.driver=file,file.filename=$W/disk.qbm" "$W/peer.sock"
        return ;;
    qsd)
        # Two in-memory bitmaps: on a raw image QEMU cannot store them.
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=f0,filename=$IMG" \
            --blockdev driver=raw,node-name=d0,file=f0 \
            --nbd-server "addr.type=unix,addr.path=$W/peer.sock" \
            --chardev "socket,path=$W/peer-qmp.sock,server=on,wait=off,id=m0" --monitor chardev=m0 \
            >>"$W/server.log" 2>&1 &
        SERVER_PID=$!
        wait_socket "$W/peer-qmp.sock"
        qmp "$W/peer-qmp.sock" \
            '{"execute":"block-dirty-bitmap-add","arguments":{"node":"d0","name":"b0"}}' \
            '{"execute":"block-dirty-bitmap-add","arguments":{"node":"d0","name":"b1"}}' \
            '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"d0","name":"d0","writable":true}}'
        wait_socket "$W/peer.sock"
        return ;;
    qemu-nbd)
        qemu-nbd -f raw -k "$W/peer.sock" -x d0 --shared=16 --persistent "$IMG" \
            >>"$W/server.log" 2>&1 & ;;
    nbdkit)
        nbdkit -f -U "$W/peer.sock" -e d0 file "$IMG" >>"$W/server.log" 2>&1 & ;;
    bitbackd-qcow2)
        serve_bitbackd "driver=qcow2,node-name=d0,file.driver=file,file.filename=$W/bb.qcow2" "$W/peer.sock"
        return ;;
    base)
        SERVE_BITBACKD=$BASE_BUILD/bitbackd serve_bitbackd "driver=qbm,node-name=d0,file.driver=file,file.filename=$W/disk.qbm" "$W/peer.sock"
        return ;;
    base-qcow2)
        SERVE_BITBACKD=$BASE_BUILD/bitbackd serve_bitbackd "driver=qcow2,node-name=d0,file.driver=file,file.filename=$W/bb.qcow2" "$W/peer.sock"
        return ;;
    qsd-qcow2)
        serve_qsd_qcow2 "$W/qsd.qcow2" "$W/peer.sock"
        return ;;
    esac
    SERVER_PID=$!
    wait_socket "$W/peer.sock"
}

echo "# peers: ${PEERS[*]}, $PEER_RUNS run(s) each" >&2
for ((run = 0; run < PEER_RUNS; run++)); do
    n=${#PEERS[@]}
    for ((k = 0; k < n; k++)); do
        peer=${PEERS[$(((k + run) % n))]}
        peer_start "$peer"
        set -- $(run_fio "nbd+unix:///d0?socket=$W/peer.sock")
        for row in seq-write seq-read rand-write rand-read; do
            PV[$peer,$row]+="$1 "
            shift
        done
        stop_server
    done
    echo "#   run $((run + 1)) done" >&2
done

mapfile -t pv_args < <(cell_args PV "seq-write seq-read rand-write rand-read" "${PEERS[@]}")
python3 - "$PEER_RUNS" "${pv_args[@]}" <<'EOF'
import statistics, sys
runs = int(sys.argv[1])
vals = {}
for a in sys.argv[2:]:
    key, v = a.split("=", 1)
    vals[tuple(key.split(","))] = [float(x) for x in v.split()]
med = {k: statistics.median(v) for k, v in vals.items()}
rows = [("seq-write", "seq-write 1M qd8 (MiB/s)"), ("seq-read", "seq-read 1M qd8 (MiB/s)"),
        ("rand-write", "rand-write 4k qd32 (IOPS)"), ("rand-read", "rand-read 4k qd32 (IOPS)")]
def ratio(a, b):
    return a / b if b else float("inf")
names = [("bitbackd", "bitbackd"), ("qsd", "qemu-storage-daemon"),
         ("qemu-nbd", "qemu-nbd"), ("nbdkit", "nbdkit-file")]
print()
print("raw image; median of %d run(s) per cell" % runs)
print("%-27s" % "test" + "".join("%21s" % n for _, n in names) +
      "".join("%10s" % r for r in ["/qsd", "/qemu-nbd", "/nbdkit"]) + "  vs best")
for key, label in rows:
    mine = med["bitbackd", key]
    line = "%-27s" % label + "".join("%21.0f" % med[p, key] for p, _ in names)
    line += "".join("%10.2f" % ratio(mine, med[p, key]) for p, _ in names[1:])
    line += "  %6.2f" % ratio(mine, max(med[p, key] for p, _ in names[1:]))
    print(line)
print("\nratio = bitbackd / peer (>= 1.00: bitbackd at least as fast).")
print("bitbackd tracks writes in 2 persistent bitmaps (qbm over the raw image);")
print("qemu-storage-daemon in 2 non-persistent bitmaps (raw cannot store them);")
print("qemu-nbd and nbdkit track nothing.")
print()
print("qcow2 (two persistent bitmaps in the image on both daemons)")
print("%-27s%21s%21s%10s" % ("test", "bitbackd", "qemu-storage-daemon", "/qsd"))
for key, label in rows:
    a, b = med["bitbackd-qcow2", key], med["qsd-qcow2", key]
    print("%-27s%21.0f%21.0f%10.2f" % (label, a, b, ratio(a, b)))
if ("base", "seq-write") in vals:
    print("\nthis build / BASE_BUILD (bitbackd both; medians, and paired: median of per-round ratios)")
    print("%-27s%12s%12s%12s%12s" % ("test", "qbm", "paired", "qcow2", "paired"))
    for key, label in rows:
        line = "%-27s" % label
        for mine, base in (("bitbackd", "base"), ("bitbackd-qcow2", "base-qcow2")):
            pr = statistics.median(ratio(a, b) for a, b in zip(vals[mine, key], vals[base, key]))
            line += "%12.3f%12.3f" % (ratio(med[mine, key], med[base, key]), pr)
        print(line)
extra = ["base", "base-qcow2"] if ("base", "seq-write") in vals else []
print("\nper-run values (run order rotates):")
for key, _ in rows:
    print("  %-11s" % key + "  ".join("%s %s" % (p, "/".join("%.0f" % x for x in vals[p, key]))
                                      for p in [n for n, _ in names] + ["bitbackd-qcow2", "qsd-qcow2"] + extra))
EOF
fi  # want peers

# --- crash-safe bitmaps (issue 7): the cost of the write-intent log -------
# Configurations: cs-nobm (bitbackd, qbm, no bitmaps), cs-on (two persistent
# bitmaps, crash-safe, the default), cs-off (the same with crash-safe=off),
# cs-qsd (qemu-storage-daemon, qcow2 with two persistent bitmaps; QEMU's are
# not crash-safe), and cs-rN (crash-safe with crash-safe-region-size=N).
# Steady rows use images over fully written data (each its own, created by
# qemu-img with preallocation=full: the qbm's raw data file as the qcow2);
# first-write rows use a new,
# empty image for every run (a sparse raw behind the qbm, a plain qcow2).
if want crash-safe; then
CS_CFGS=(cs-nobm cs-on cs-off cs-qsd)
for rs in $CS_REGION_SIZES; do CS_CFGS+=("cs-r$rs"); done
declare -A CSV          # CSV[cfg,row] = one value per run, space separated

# cs_make CFG PREFIX fresh|steady: create the image of CFG, print its path
cs_make() {
    local cfg=$1 p=$2 kind=$3
    if [ "$cfg" = cs-qsd ]; then
        if [ "$kind" = fresh ]; then
            qemu-img create -q -f qcow2 "$p.qcow2" "$CS_FRESH_SIZE"
        else
            qemu-img create -q -f qcow2 -o preallocation=full "$p.qcow2" "$SIZE"
        fi
        qemu-img bitmap --add "$p.qcow2" b0
        qemu-img bitmap --add "$p.qcow2" b1
        echo "$p.qcow2"
        return
    fi
    if [ "$kind" = fresh ]; then
        "$BITBACK" img create -f qbm "$p.qbm" "$CS_FRESH_SIZE" >/dev/null
    else
        # Its own data file, made the way the qcow2 above is (qemu-img,
        # preallocation=full), so that no configuration inherits the page
        # cache state left by the peers' rows on the shared image.
        qemu-img create -q -f raw -o preallocation=full "$p.raw" "$SIZE"
        "$BITBACK" img create -f qbm -o data-file="$p.raw",data-format=raw "$p.qbm" >/dev/null
    fi
    if [ "$cfg" != cs-nobm ]; then
        "$BITBACK" bitmap --add "$p.qbm" b0 >/dev/null
        "$BITBACK" bitmap --add "$p.qbm" b1 >/dev/null
    fi
    echo "$p.qbm"
}

# cs_start CFG IMAGE: start CFG's server on $W/cs.sock
cs_start() {
    local cfg=$1 img=$2 opts=
    rm -f "$W/cs.sock"
    case $cfg in
    cs-qsd)
        serve_qsd_qcow2 "$img" "$W/cs.sock"
        return ;;
    cs-off) opts=crash-safe=off, ;;
    cs-r*)  opts=crash-safe-region-size=${cfg#cs-r}, ;;
    esac
    serve_bitbackd "driver=qbm,node-name=d0,${opts}file.driver=file,file.filename=$img" "$W/cs.sock"
}

# cs_waits SOCKET: "WAITS WAIT_NS" so far, from the crash-safe counters of
# bitbackd's node d0 (query-named-block-nodes; "0 0" without a log)
cs_waits() {
    python3 -m bitback_testlib.qmpcli "$1.qmp" node d0 crash-safe.writer-waits crash-safe.writer-wait-ns
}

# cs_fio ROW: one fio run of ROW against $W/cs.sock, print its value
# (first-* rows span CS_FRESH_SIZE, the others the steady image).
cs_fio() {
    local args json bs size=$bytes
    settle
    case $1 in
    seq-write)  bs=1M; args=(--rw=write --bs=1M --iodepth=8 --time_based --runtime="$RUNTIME" --ramp_time=1) ;;
    rand-write) bs=4k; args=(--rw=randwrite --bs=4k --iodepth=32 --time_based --runtime="$RUNTIME" --ramp_time=1) ;;
    first-seq)  bs=1M; size=$CS_FRESH_SIZE; args=(--rw=write --bs=1M --iodepth=8 --runtime="$RUNTIME") ;;
    first-rand) bs=4k; size=$CS_FRESH_SIZE; args=(--rw=randwrite --bs=4k --iodepth=32 --runtime="$RUNTIME") ;;
    esac
    json=$(fio --name=bench --ioengine=nbd --uri="nbd+unix:///d0?socket=$W/cs.sock" \
               --size="$size" "${args[@]}" --output-format=json 2>"$W/fio.err") ||
        { cat "$W/fio.err" >&2; exit 1; }
    fio_value "$bs" <<<"$json"
}

# cs_row CFG ROW: run ROW on CFG's server; for bitbackd with crash-safe
# bitmaps also note how many writes waited for an intent sync in it, and
# how long they waited in all (CSW[CFG,ROW] += "WAITS/MS ")
declare -A CSW
cs_row() {
    local before after
    case $1 in cs-on|cs-r*) before=$(cs_waits "$W/cs.sock") ;; esac
    CSV[$1,$2]+="$(cs_fio "$2") "
    if [ -n "${before:-}" ]; then
        after=$(cs_waits "$W/cs.sock")
        set -- "$1" "$2" $before $after
        CSW[$1,$2]+="$(($5 - $3))/$(( ($6 - $4) / 1000000 )) "
    fi
}

echo "# crash-safe rows: ${CS_CFGS[*]}, $CS_RUNS run(s) each, fresh images $CS_FRESH_SIZE" >&2
for p in "${CS_CFGS[@]}"; do cs_make "$p" "$W/steady-$p" steady >/dev/null; done
for ((run = 0; run < CS_RUNS; run++)); do
    n=${#CS_CFGS[@]}
    for ((k = 0; k < n; k++)); do
        cfg=${CS_CFGS[$(((k + run) % n))]}      # rotate the order per run
        img=$W/steady-$cfg.qbm; [ "$cfg" = cs-qsd ] && img=$W/steady-$cfg.qcow2
        cs_start "$cfg" "$img"
        for row in seq-write rand-write; do
            cs_row "$cfg" "$row"
        done
        stop_server
        for row in first-seq first-rand; do
            img=$(cs_make "$cfg" "$W/fresh" fresh)
            cs_start "$cfg" "$img"
            cs_row "$cfg" "$row"
            stop_server
            rm -f "$W"/fresh.*
        done
        echo "#   run $((run + 1)) $cfg done" >&2
    done
done

mapfile -t cs_args < <(cell_args CSV "seq-write rand-write first-seq first-rand" "${CS_CFGS[@]}")
echo
echo "crash-safe: writes that waited for an intent sync / total ms they waited, per run"
for row in seq-write rand-write first-seq first-rand; do
    line=$(printf '  %-12s' "$row")
    for cfg in "${CS_CFGS[@]}"; do
        [ -n "${CSW[$cfg,$row]:-}" ] && line+="  $cfg ${CSW[$cfg,$row]}"
    done
    echo "$line"
done
python3 - "$CS_RUNS" "${CS_CFGS[*]}" "${cs_args[@]}" <<'EOF'
import statistics, sys
runs, cfgs = int(sys.argv[1]), sys.argv[2].split()
vals = {}
for a in sys.argv[3:]:
    key, v = a.split("=", 1)
    vals[tuple(key.split(","))] = [float(x) for x in v.split()]
rows = [("seq-write", "seq-write 1M qd8 (MiB/s)"),
        ("rand-write", "rand-write 4k qd32 (IOPS)"),
        ("first-seq", "first-seq 1M qd8 (MiB/s)"),
        ("first-rand", "first-rand 4k qd32 (IOPS)")]
names = {"cs-nobm": "no-bitmaps", "cs-on": "crash-safe", "cs-off": "cs=off",
         "cs-qsd": "qsd+bitmaps"}
med = {k: statistics.median(v) for k, v in vals.items()}
def ratio(a, b):
    return a / b if b else float("inf")
def paired(key):  # median of the per-run ratios (run i of both ran in round i)
    return statistics.median(ratio(a, b) for a, b in
                             zip(vals["cs-on", key], vals["cs-nobm", key]))
print()
print("crash-safe bitmaps (write-intent log): bitbackd qbm, two persistent bitmaps;")
print("median of %d run(s) per cell" % runs)
print("%-27s" % "test" + "".join("%13s" % names.get(c, c) for c in cfgs) +
      "%16s%10s%16s" % ("cs/no-bitmaps", "paired", "cs/qsd"))
for key, label in rows:
    line = "%-27s" % label + "".join("%13.0f" % med[c, key] for c in cfgs)
    r1 = ratio(med["cs-on", key], med["cs-nobm", key])
    r2 = ratio(med["cs-on", key], med["cs-qsd", key])
    line += "%11.3f %-4s" % (r1, "PASS" if r1 >= 0.97 else "MISS")
    line += "%10.3f" % paired(key)
    line += "%11.2f %-4s" % (r2, "PASS" if r2 >= 1.0 else "MISS")
    print(line)
print("\nper-run values:")
for key, label in rows:
    print("  %-12s" % key + "  ".join("%s %s" % (names.get(c, c),
          "/".join("%.0f" % x for x in vals[c, key])) for c in cfgs))
print("\ntargets: crash-safe / no-bitmaps >= 0.97 (at most 3% below); 'paired' is the")
print("median of the per-round ratios (both configurations ran in the same round),")
print("which cancels load that drifts between rounds;")
print("crash-safe / qemu-storage-daemon with its (not crash-safe) bitmaps >= 1.00.")
print("first-seq / first-rand write a new empty image (CS_FRESH_SIZE): every region's")
print("first write waits for one intent sync (64 MiB regions unless cs-rN says")
print("otherwise); past 64 marked regions snapshots come once a second and clear")
print("only regions idle for a whole snapshot period.")
EOF
fi  # want crash-safe


if want tls; then
# bitbackd and qemu-nbd, plain and TLS, on the same image, rotated rounds.
TLS_RUNS=${TLS_RUNS:-$PEER_RUNS}
command -v certtool >/dev/null || { echo "nbd.sh: certtool (gnutls-bin) is not installed" >&2; exit 1; }
mkdir -p "$W/pki"
"$PYTHON" -c 'import pathlib, sys
from bitback_testlib.pki import make_pki
make_pki(pathlib.Path(sys.argv[1]))' "$W/pki"
[ -f "$W/disk.qbm" ] || "$BITBACK" img create -f qbm -o data-file="$IMG",data-format=raw "$W/disk.qbm" >/dev/null
TLS_OBJ="tls-creds-x509,id=tls0,dir=$W/pki/server,endpoint=server"

# tls_start NAME: start NAME serving export d0 on $W/tls.sock
tls_start() {
    rm -f "$W/tls.sock" "$W/tls.sock.qmp"
    case $1 in
    bitbackd)
        serve_bitbackd "driver=qbm,node-name=d0,file.driver=file,file.filename=$W/disk.qbm" "$W/tls.sock"
        return ;;
    bitbackd-tls)
        "$BITBACKD" --object "$TLS_OBJ" \
            --blockdev "driver=qbm,node-name=d0,file.driver=file,file.filename=$W/disk.qbm" \
            --nbd-server "addr.type=unix,addr.path=$W/tls.sock,tls-creds=tls0" \
            --export type=nbd,id=e0,node-name=d0,name=d0,writable=on \
            >>"$W/server.log" 2>&1 & ;;
    qemu-nbd)
        qemu-nbd -f raw -k "$W/tls.sock" -x d0 --shared=16 --persistent "$IMG" \
            >>"$W/server.log" 2>&1 & ;;
    qemu-nbd-tls)
        qemu-nbd -f raw -k "$W/tls.sock" -x d0 --shared=16 --persistent \
            --object "$TLS_OBJ" --tls-creds tls0 "$IMG" >>"$W/server.log" 2>&1 & ;;
    esac
    SERVER_PID=$!
    wait_socket "$W/tls.sock"
}

# run_nbdcopy URI -> "seqw seqr" (MiB/s): SIZE bytes into and out of URI
head -c "$bytes" /dev/urandom >"$W/random.raw"
run_nbdcopy() {
    local t0 t1 t2
    settle
    t0=$(date +%s.%N)
    nbdcopy "$W/random.raw" "$1" || exit 1
    t1=$(date +%s.%N)
    nbdcopy "$1" null: || exit 1
    t2=$(date +%s.%N)
    "$PYTHON" -c 'import sys; b, t0, t1, t2 = map(float, sys.argv[1:])
print("%.0f %.0f" % (b / 1048576 / (t1 - t0), b / 1048576 / (t2 - t1)))' \
        "$bytes" "$t0" "$t1" "$t2"
}

TLS_SERVERS=(bitbackd bitbackd-tls qemu-nbd qemu-nbd-tls)
declare -A TV          # TV[server,row] = one value per run, space separated
echo "# tls: ${TLS_SERVERS[*]}, $TLS_RUNS run(s) each" >&2
for ((run = 0; run < TLS_RUNS; run++)); do
    n=${#TLS_SERVERS[@]}
    for ((k = 0; k < n; k++)); do
        who=${TLS_SERVERS[$(((k + run) % n))]}
        tls_start "$who"
        case $who in
        *-tls) uri="nbds+unix:///d0?socket=$W/tls.sock&tls-certificates=$W/pki/client" ;;
        *) uri="nbd+unix:///d0?socket=$W/tls.sock" ;;
        esac
        set -- $(run_nbdcopy "$uri")
        for row in seq-write seq-read; do
            TV[$who,$row]+="$1 "
            shift
        done
        stop_server
    done
    echo "#   tls run $((run + 1)) done" >&2
done

mapfile -t tv_args < <(cell_args TV "seq-write seq-read" "${TLS_SERVERS[@]}")
"$PYTHON" - "$TLS_RUNS" "${tv_args[@]}" <<'EOF'
import statistics, sys
runs = int(sys.argv[1])
cell = {}
for a in sys.argv[2:]:
    key, vals = a.split("=", 1)
    cell[tuple(key.split(","))] = [float(v) for v in vals.split()]
rows = ["seq-write", "seq-read"]
unit = {"seq-write": "MiB/s", "seq-read": "MiB/s"}


def med(who, row):
    return statistics.median(cell[who, row])


def paired(a, b, row):
    return statistics.median(x / y for x, y in zip(cell[a, row], cell[b, row]))


print()
print(f"NBD over TLS (x509, client certificate required), UNIX socket, "
      f"nbdcopy, medians of {runs} runs")
print(f"{'row':<11}{'unit':>6}{'bitbackd':>10}{'bb-tls':>9}{'qemu-nbd':>10}"
      f"{'qn-tls':>9}{'bb tls/plain':>14}{'qn tls/plain':>14}"
      f"{'bb-tls/qn-tls':>15}")
worst = None
for row in rows:
    r = paired("bitbackd-tls", "qemu-nbd-tls", row)
    worst = r if worst is None else min(worst, r)
    print(f"{row:<11}{unit[row]:>6}{med('bitbackd', row):10.0f}"
          f"{med('bitbackd-tls', row):9.0f}{med('qemu-nbd', row):10.0f}"
          f"{med('qemu-nbd-tls', row):9.0f}"
          f"{paired('bitbackd-tls', 'bitbackd', row):14.2f}"
          f"{paired('qemu-nbd-tls', 'qemu-nbd', row):14.2f}{r:15.2f}")
print(f"target: bitbackd with TLS >= 1.0x qemu-nbd with TLS (worst row, "
      f"paired): {worst:.2f} -> {'PASS' if worst >= 1.0 else 'MISS'}")
EOF
fi  # want tls
