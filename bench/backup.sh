#!/bin/bash
# Live backup benchmark: the same QMP script against bitbackd and
# qemu-storage-daemon, on the same raw source image.
#
#   source   SIZE (default 4 GiB) raw image, half allocated: random 1 MiB
#            chunks covering 50% hold data, the rest are holes
#   full     transaction [block-dirty-bitmap-add b0, blockdev-backup
#            sync=full] into a sparse raw target; timed until
#            BLOCK_JOB_COMPLETED
#   writes   1% of the image as random 64 KiB writes through the daemon's
#            NBD export (libnbd), tracked in b0
#   incr     blockdev-backup sync=incremental bitmap=b0 into an overlay
#            backed by the full backup (qbm for bitbackd, qcow2 for
#            qemu-storage-daemon: it has no qbm); timed the same way
#
# Each job is checked (no error in BLOCK_JOB_COMPLETED); once per daemon,
# outside the timing, the full backup is compared with the source as it was
# and the overlay chain with the live image (qemu-img compare).  Both daemons use the host page cache; the source is read once
# before each daemon's run so both start warm.
#
# Usage: bench/backup.sh [BUILD_DIR]        (default: build)
# Environment: SIZE (default 4G), REPEAT (runs per daemon, best time kept,
# default 3), DAEMONS (default "bitbackd qsd"), TMPDIR (where the work folder is made, default /var/tmp),
# KEEP=1 keeps the work folder.
# This is a benchmark, not a test (not part of make check).  It prints times
# and the ratios against the targets of issue 4: full backup qsd/bitbackd
# >= 1.5, incremental bitbackd no slower than qemu-storage-daemon.
set -euo pipefail

. "$(dirname "$0")/lib.sh"
bench_init backup.sh "${1:-build}" qemu-storage-daemon qemu-img /usr/bin/python3
bench_need_libnbd
SIZE=${SIZE:-4G}
REPEAT=${REPEAT:-3}

W=$(mktemp -d "${TMPDIR:-/var/tmp}/bitback-backup-bench.XXXXXX")
cleanup() {
    # The Python driver kills its daemon itself; this removes the files.
    [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT

export BENCH_DIR=$W BENCH_SIZE=$SIZE BENCH_REPEAT=$REPEAT
export BENCH_BITBACK=$BITBACK BENCH_BITBACKD=$BITBACKD
export BENCH_DAEMONS=${DAEMONS:-bitbackd bitbackd-qcow2 qsd}

"$PYTHON" - <<'EOF'
import os
import random
import sys
import time

import nbd
from benchlib import parse_size, quit, serve, sh, wait_job, warm
from bitback_testlib import QSD

W = os.environ["BENCH_DIR"]
REPEAT = int(os.environ["BENCH_REPEAT"])
BITBACK = os.environ["BENCH_BITBACK"]
BITBACKD = os.environ["BENCH_BITBACKD"]
MiB = 1 << 20
DAEMONS = os.environ["BENCH_DAEMONS"].split()


SIZE = parse_size(os.environ["BENCH_SIZE"]) // MiB * MiB
SRC = os.path.join(W, "disk.raw")
PRISTINE = os.path.join(W, "pristine.raw")


def make_source():
    rng = random.Random(2024)
    chunks = sorted(rng.sample(range(SIZE // MiB), SIZE // MiB // 2))
    base = bytearray(os.urandom(MiB))
    with open(SRC, "wb") as f:
        f.truncate(SIZE)
        for c in chunks:
            base[0:8] = c.to_bytes(8, "little")    # every chunk differs
            f.seek(c * MiB)
            f.write(base)
    return len(chunks) * MiB


def one_run(kind, run_no, verify):
    """Full + writes + incremental on one daemon; returns (full_s, incr_s,
    written_bytes)."""
    wd = os.path.join(W, f"{kind}-{run_no}")
    os.makedirs(wd)
    full = os.path.join(wd, "full.raw")
    # "bitbackd-qcow2": bitbackd writing the incremental as qcow2.
    fmt = "qbm" if kind == "bitbackd" else "qcow2"
    inc = os.path.join(wd, f"inc.{fmt}")
    d = serve(wd, QSD if kind == "qsd" else BITBACKD,
              f"driver=raw,node-name=disk0,file.driver=file,"
              f"file.filename={SRC}")
    try:
        q = d.qmp
        q.cmd("block-export-add", type="nbd", id="e0",
              **{"node-name": "disk0"}, name="disk0", writable=True)
        with open(full, "wb") as f:
            f.truncate(SIZE)
        q.cmd("blockdev-add", driver="raw", **{"node-name": "full"},
              file={"driver": "file", "filename": full})

        t0 = time.monotonic()
        q.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": "b0"}},
            {"type": "blockdev-backup",
             "data": {"job-id": "full0", "device": "disk0",
                      "target": "full", "sync": "full"}}])
        wait_job(q, "full0")
        t_full = time.monotonic() - t0

        # 1% of the image in random 64 KiB writes, through NBD.
        rng = random.Random(7 + run_no)
        n = SIZE // 100 // (64 * 1024)
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("disk0"))
        buf = bytearray(os.urandom(64 * 1024))
        for i in range(n):
            buf[0:8] = i.to_bytes(8, "little")
            h.pwrite(bytes(buf), rng.randrange(SIZE // (64 * 1024)) * 64 * 1024)
        h.flush()
        h.shutdown()
        dirty = q.bitmap("disk0", "b0")["count"]

        if kind == "qsd":
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", full,
               "-F", "raw", inc)
        else:
            sh(BITBACK, "img", "create", "-f", fmt, "-b", full, "-F", "raw",
               inc)
        q.cmd("blockdev-add", driver=fmt, **{"node-name": "inc"},
              file={"driver": "file", "filename": inc}, backing="full")
        t0 = time.monotonic()
        q.cmd("blockdev-backup", **{"job-id": "inc0", "device": "disk0",
                                    "target": "inc", "sync": "incremental",
                                    "bitmap": "b0"})
        wait_job(q, "inc0")
        t_inc = time.monotonic() - t0
        if verify:
            # The overlay chain equals the live image (no writer now).
            q.cmd("block-export-add", type="nbd", id="e1",
                  **{"node-name": "inc"}, name="inc", writable=False)
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw",
               d.nbd_uri("inc"), d.nbd_uri("disk0"))
        quit(d, kind)
    finally:
        d.cleanup()
    if verify:
        # The full backup is the source as it was before the writes.
        sh("qemu-img", "compare", "-f", "raw", "-F", "raw", full, PRISTINE)
    used = os.stat(full).st_blocks * 512
    for p in (full, inc):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    sh("rm", "-rf", wd)
    return t_full, t_inc, dirty, used


print(f"# source: {SIZE // MiB} MiB raw, ", end="", flush=True)
allocated = make_source()
print(f"{allocated // MiB} MiB allocated in random 1 MiB chunks; "
      f"{REPEAT} run(s) per daemon, best kept")
pristine = PRISTINE
best = {}
for kind in DAEMONS:
    for r in range(REPEAT):
        # Every run starts from the same source content.
        if os.path.exists(pristine):
            sh("cp", "--sparse=always", pristine, SRC)
        else:
            sh("cp", "--sparse=always", SRC, pristine)
        warm(SRC)
        t_full, t_inc, dirty, used = one_run(kind, r, verify=(r == 0))
        print(f"{kind:>14} run {r + 1}: full {t_full:7.3f} s "
              f"({allocated / MiB / t_full:7.1f} MiB/s of data, target uses "
              f"{used // MiB} MiB), incremental {t_inc:6.3f} s "
              f"({dirty / MiB:.1f} MiB dirty)", flush=True)
        b = best.setdefault(kind, [t_full, t_inc])
        b[0] = min(b[0], t_full)
        b[1] = min(b[1], t_inc)

if "bitbackd" not in best or "qsd" not in best:
    sys.exit(0)                 # no ratio without both (DAEMONS chose fewer)
bf, bi = best["bitbackd"]
qf, qi = best["qsd"]
print()
print(f"{'':>20} {'bitbackd':>10} {'qsd':>10} {'qsd/bitbackd':>13}")
print(f"{'full backup (s)':>20} {bf:10.3f} {qf:10.3f} {qf / bf:13.2f}"
      f"   target >= 1.50: {'met' if qf / bf >= 1.5 else 'NOT met'}")
print(f"{'incremental (s)':>20} {bi:10.3f} {qi:10.3f} {qi / bi:13.2f}"
      f"   target >= 1.00: {'met' if qi / bi >= 1.0 else 'NOT met'}")
if "bitbackd-qcow2" in best:
    cf, ci = best["bitbackd-qcow2"]
    print(f"{'incremental, qcow2':>20} {ci:10.3f} {qi:10.3f} {qi / ci:13.2f}"
          f"   (both write a qcow2 overlay)")
EOF
