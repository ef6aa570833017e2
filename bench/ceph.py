"""bench/ceph.sh's driver (issue 20): bitback on Ceph RBD against its peers,
on a real single-node Ceph cluster started here (bitback_testlib.ceph:
one mon, one memstore OSD on 127.0.0.1, pool size 1).

Table 1, NBD serving an RBD image (CEPH_SIZE, default 1 GiB, fully
written first), fio's nbd engine over a UNIX socket, CEPH_RUNTIME seconds a
row:
  seq-write  1 MiB writes, iodepth 8     seq-read  1 MiB reads, iodepth 8
  rand-write 4 KiB writes, iodepth 32    rand-read 4 KiB reads, iodepth 32
  bitbackd   --blockdev driver=rbd,... with two PERSISTENT bitmaps (stored
             in RADOS next to the image, crash-safe: the write-intent log
             is a RADOS object)
  qsd        qemu-storage-daemon with the same rbd node and two bitmaps
             (QEMU keeps bitmaps on rbd in memory only: it refuses
             persistent ones there)
Target: bitbackd >= 1.0x qsd on every row (paired ratios, medians).

Table 2, an incremental backup of the RBD image after CEPH_CHANGE (default
256 MiB) of 1 MiB random writes at scattered offsets:
  bitback    `bitback backup --level inc --compress=off --cache=none` from
             bitbackd serving the image (persistent bitmap: the change only)
             into a local repository, its data file written and hashed with
             O_DIRECT
  bitback-wb the same with --cache=writeback (the default): through the
             page cache
  export-diff `rbd export-diff --from-snap s1 rbd/IMG@s2 FILE`: Ceph's own
             incremental export of the same change (fast-diff object map)
Target: bitback >= 1.0x export-diff (throughput of the same change); the
writeback row's ratio is printed beside it.  On this VM a fresh page-cache
page is costly (a buffered 256 MiB `dd` to a new file takes 0.07 s or
0.9 s depending on whether freed pages are at hand), which both
export-diff and the writeback row pay; docs/performance.md has the split.

CEPH_ROUNDS rounds (default 3), the order rotated each round; medians of
times and of the per-round ratios.  A benchmark, not a test: it prints
PASS/MISS and exits 0 whatever the numbers.
"""
import json
import os
import random
import statistics
import subprocess
import sys
import time

from benchlib import MiB, parse_size, sh
from bitback_testlib import Daemon
from bitback_testlib.ceph import CephCluster

W = os.environ["BENCH_DIR"]
BITBACK = os.environ["BENCH_BITBACK"]
BITBACKD = os.environ["BENCH_BITBACKD"]
QSD = "qemu-storage-daemon"
SIZE = parse_size(os.environ.get("CEPH_SIZE", "1G"))
CHANGE = parse_size(os.environ.get("CEPH_CHANGE", "256M"))
RUNTIME = int(os.environ.get("CEPH_RUNTIME", "10"))
ROUNDS = int(os.environ.get("CEPH_ROUNDS", "3"))
FIO_ROWS = [("seq-write", "write", "1M", 8), ("seq-read", "read", "1M", 8),
            ("rand-write", "randwrite", "4k", 32),
            ("rand-read", "randread", "4k", 32)]
SERVERS = ["bitbackd", "qsd"]


def rbd_blockdev(conf, image):
    return (f"driver=rbd,node-name=disk0,pool=rbd,image={image},"
            f"conf={conf}")


def serve(server, wd, conf, image):
    """A daemon serving the rbd image as export disk0 (writable), with two
    bitmaps; returns it started."""
    d = Daemon(wd, binary=BITBACKD if server == "bitbackd" else QSD)
    d.start("--blockdev", rbd_blockdev(conf, image), nbd=True)
    try:
        have = {b["name"] for n in d.qmp.cmd("query-named-block-nodes")
                for b in n.get("dirty-bitmaps", [])}
        for b in ("b0", "b1"):
            args = {"node": "disk0", "name": b}
            if server == "bitbackd":
                args["persistent"] = True
            if b not in have:       # ours persist in RADOS from round 2 on
                d.qmp.cmd("block-dirty-bitmap-add", **args)
        d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"},
                  name="disk0", writable=True)
    except BaseException:
        d.cleanup()
        raise
    return d


def stop(d, what):
    rc = d.quit()
    d.cleanup()
    if rc != 0:
        sys.exit(f"ceph bench: {what} exited with {rc}")


def fio(uri, rw, bs, depth):
    p = sh("fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}",
           f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={SIZE}",
           "--time_based", f"--runtime={RUNTIME}", "--ramp_time=1",
           "--output-format=json")
    j = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = j["read"] if rw.endswith("read") else j["write"]
    return side["bw_bytes"] / MiB if bs == "1M" else side["iops"]


def table_fio(c):
    image = "fio"
    c.tool("rbd", "create", "--size", f"{SIZE // MiB}M", f"rbd/{image}")
    vals = {(s, r[0]): [] for s in SERVERS for r in FIO_ROWS}
    for n in range(ROUNDS):
        order = SERVERS[n % 2:] + SERVERS[:n % 2]
        for server in order:
            d = serve(server, f"{W}/{server}-{n}", c.conf, image)
            try:
                uri = d.nbd_uri("disk0")
                if n == 0 and server == order[0]:
                    # Fill the image once, so reads read data.
                    sh("nbdcopy", "--", "[", "nbdkit", "--exit-with-parent", "random",
                       str(SIZE), "]", uri)
                for name, rw, bs, depth in FIO_ROWS:
                    vals[(server, name)].append(fio(uri, rw, bs, depth))
            finally:
                stop(d, server)
    c.tool("rbd", "rm", "--no-progress", f"rbd/{image}")
    print(f"\nceph NBD rows: {SIZE / (1 << 30):.2f} GiB RBD image, fio "
          f"{RUNTIME}s a row, median of {ROUNDS} rounds "
          f"(MiB/s for 1M rows, IOPS for 4k rows)")
    print(f"{'row':12}{'bitbackd':>12}{'qsd':>12}{'ratio':>8}")
    for name, *_ in FIO_ROWS:
        a, b = vals[("bitbackd", name)], vals[("qsd", name)]
        ratio = statistics.median(x / y for x, y in zip(a, b))
        print(f"{name:12}{statistics.median(a):12.0f}"
              f"{statistics.median(b):12.0f}{ratio:8.2f}  "
              f"{'PASS' if ratio >= 1.0 else 'MISS'} (target >= 1.0x qsd)")


def table_backup(c):
    """One image per round: full state s1 (snapshot and full backup), a
    change written through bitbackd, snapshot s2, then both incrementals
    timed, rotated."""
    times = {"bitback": [], "bitback-wb": [], "export-diff": []}
    for n in range(ROUNDS):
        image = f"inc{n}"
        wd = f"{W}/inc-{n}"
        os.makedirs(wd)
        c.tool("rbd", "create", "--size", f"{SIZE // MiB}M", f"rbd/{image}")
        uri_img = f"rbd:rbd/{image}:conf={c.conf}"
        sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
           make_random(wd), uri_img)
        c.tool("rbd", "snap", "create", f"rbd/{image}@s1")
        repo, repo_wb = f"{wd}/repo", f"{wd}/repo-wb"
        d = Daemon(f"{wd}/d1", binary=BITBACKD)
        d.start("--blockdev", rbd_blockdev(c.conf, image), nbd=True)
        try:
            for r in (repo, repo_wb):
                sh(BITBACK, "backup", "--connect", d.qmp_sock, "--node",
                   "disk0", "--repo", r, "--level", "full", "--compress=off")
            d.qmp.cmd("block-export-add", type="nbd", id="e0",
                      **{"node-name": "disk0"}, name="disk0", writable=True)
            write_change(d.nbd_uri("disk0"), n)
        finally:
            stop(d, "bitbackd")
        c.tool("rbd", "snap", "create", f"rbd/{image}@s2")
        d = Daemon(f"{wd}/d2", binary=BITBACKD)
        d.start("--blockdev", rbd_blockdev(c.conf, image), nbd=True)
        try:
            order = ["bitback", "bitback-wb", "export-diff"]
            order = order[n % 3:] + order[:n % 3]
            for who in order:
                t0 = time.monotonic()
                if who.startswith("bitback"):
                    # Each run has its repository (its own bitmaps, from
                    # its own full): both take the same change.
                    sh(BITBACK, "backup", "--connect", d.qmp_sock, "--node",
                       "disk0", "--repo", repo if who == "bitback" else repo_wb,
                       "--level", "inc", "--compress=off",
                       "--cache=" + ("none" if who == "bitback"
                                     else "writeback"))
                else:
                    c.tool("rbd", "export-diff", "--no-progress",
                           "--from-snap", "s1", f"rbd/{image}@s2",
                           f"{wd}/change.diff")
                times[who].append(time.monotonic() - t0)
        finally:
            stop(d, "bitbackd")
        # memstore keeps everything in RAM: drop the round's image.
        c.tool("rbd", "snap", "purge", f"rbd/{image}")
        c.tool("rbd", "rm", "--no-progress", f"rbd/{image}")
    ratio = statistics.median(e / b for b, e in zip(times["bitback"],
                                                    times["export-diff"]))
    ratio_wb = statistics.median(e / b for b, e in zip(times["bitback-wb"],
                                                       times["export-diff"]))
    print(f"\nceph backup rows: incremental of {CHANGE // MiB} MiB changed "
          f"in a {SIZE / (1 << 30):.2f} GiB RBD image, median of {ROUNDS}")
    print(f"{'row':14}{'seconds':>9}{'MiB/s':>9}")
    for who in ("bitback", "bitback-wb", "export-diff"):
        t = statistics.median(times[who])
        print(f"{who:14}{t:9.2f}{CHANGE / MiB / t:9.0f}")
    print(f"target: bitback >= 1.0x rbd export-diff: {ratio:.2f} -> "
          f"{'PASS' if ratio >= 1.0 else 'MISS'} (--cache=none; "
          f"--cache=writeback: {ratio_wb:.2f})")


def make_random(wd):
    """SIZE bytes of random data in a local file (made once)."""
    path = f"{W}/base.raw"
    if not os.path.exists(path):
        rng = random.Random(20)
        with open(path, "wb") as f:
            for _ in range(0, SIZE, 64 * MiB):
                f.write(rng.randbytes(64 * MiB))
            f.truncate(SIZE)
    return path


def write_change(uri, seed):
    """CHANGE bytes of 1 MiB random writes at scattered 1 MiB offsets."""
    import nbd
    rng = random.Random(seed)
    slots = rng.sample(range(SIZE // MiB), CHANGE // MiB)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for s in slots:
            h.pwrite(rng.randbytes(MiB), s * MiB)
        h.flush()
    finally:
        h.shutdown()


def main():
    sections = os.environ.get("CEPH_SECTIONS", "fio backup").split()
    with CephCluster(f"{W}/ceph", memstore_bytes=max(4 << 30, 4 * SIZE)) as c:
        c.create_pool("rbd", rbd=True)
        if "fio" in sections:
            table_fio(c)
        if "backup" in sections:
            table_backup(c)


if __name__ == "__main__":
    main()
