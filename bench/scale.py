"""bench/chain.sh's scale rows (issue 18): a SCALE_SIZE (default 64 GiB)
sparse qcow2 disk holding SCALE_DATA (default 4 GiB) of data in 4 MiB
chunks at scattered offsets, half random bytes and half repetitive text
(what real disks mix), backed up by

  bitback  bitbackd serves the disk; `bitback backup --level full` into a
           new repository, plain and with --compress=zstd; then, after
           SCALE_DIRTY (default 256 MiB) of scattered 64 KiB writes through
           NBD, `bitback backup --level inc`
  qsd      qemu-storage-daemon serves a copy; qemu-img create + one
           transaction block-dirty-bitmap-add + drive-backup sync=full, as
           a user of QEMU does, plain and with compress=true into a
           compression_type=zstd target; the same writes, then qemu-img
           create -b + drive-backup sync=incremental
  dd       `dd conv=fdatasync` of the same SCALE_DATA bytes into a file on
           the same disk: the physical limit of a full backup's writes

Every side runs SCALE_ROUNDS times (default 3), the order rotated each
round; each row prints the median time and the median of the per-round
ratios (paired).  Targets (issue 18): bitback full >= 0.95x dd's
throughput; bitback inc >= 1.5x qsd; bitback compressed full >= 1.0x qsd
uncompressed.  Also printed: the bytes each repository stores.  A
benchmark, not a test: it prints PASS/MISS and exits 0 whatever the
numbers.
"""
import json
import os
import random
import statistics
import subprocess
import time

from benchlib import EXPORT_DISK0, MiB, parse_size, quit, serve, sh, wait_job
from bitback_testlib.daemon import QSD

W = os.environ["BENCH_DIR"]
BITBACK = os.environ["BENCH_BITBACK"]
BITBACKD = os.environ["BENCH_BITBACKD"]
SIZE = parse_size(os.environ.get("SCALE_SIZE", "64G"))
DATA = parse_size(os.environ.get("SCALE_DATA", "4G"))
DIRTY = parse_size(os.environ.get("SCALE_DIRTY", "256M"))
ROUNDS = int(os.environ.get("SCALE_ROUNDS", "3"))
CHUNK = 4 * MiB


def chunk_bytes(rng, i):
    if i % 2:
        return rng.randbytes(CHUNK)
    line = (f"{i:08d} the quick brown fox jumps over the lazy dog "
            f"{rng.randrange(10**6):06d}\n").encode()
    return (line * (CHUNK // len(line) + 1))[:CHUNK]


def make_source():
    """The disk (qcow2) and the same bytes as one file for dd."""
    rng = random.Random(18)
    n = DATA // CHUNK
    step = SIZE // n // CHUNK * CHUNK
    raw = f"{W}/src.raw"
    with open(raw, "wb") as r, open(f"{W}/data.bin", "wb") as d:
        r.truncate(SIZE)
        for i in range(n):
            b = chunk_bytes(rng, i)
            r.seek(i * step + (rng.randrange(step - CHUNK) // CHUNK) * CHUNK
                   if step > CHUNK else i * CHUNK)
            r.write(b)
            d.write(b)
    sh("qemu-img", "convert", "-O", "qcow2", raw, f"{W}/src.qcow2")
    os.unlink(raw)


def dirty_writes(uri):
    """SCALE_DIRTY in 64 KiB random writes (same offsets every time)."""
    import nbd
    rng = random.Random(7)
    h = nbd.NBD()
    h.connect_uri(uri)
    for _ in range(DIRTY // (64 * 1024)):
        off = rng.randrange(SIZE // (64 * 1024)) * 64 * 1024
        h.pwrite(rng.randbytes(64 * 1024), off)
    h.flush()
    h.shutdown()


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def drop_repo(path):
    subprocess.run(["rm", "-rf", path], check=True)


def run_dd():
    t = time.monotonic()
    sh("dd", f"if={W}/data.bin", f"of={W}/dd.out", "bs=4M", "conv=fdatasync",
       "status=none")
    t = time.monotonic() - t
    os.unlink(f"{W}/dd.out")
    return {"full": t}


def run_bitback(compress):
    disk = f"{W}/bb.qcow2"
    repo = f"{W}/bb-repo"
    sh("cp", "--sparse=always", f"{W}/src.qcow2", disk)
    drop_repo(repo)
    d = serve(f"{W}/bbd", BITBACKD,
              f"driver=qcow2,node-name=disk0,file.driver=file,"
              f"file.filename={disk}", *EXPORT_DISK0)
    res = {}
    try:
        extra = ["--compress=zstd"] if compress else []
        t = time.monotonic()
        sh(BITBACK, "backup", "--connect", d.qmp_sock, "--node", "disk0",
           "--repo", repo, "--level", "full", *extra)
        res["full"] = time.monotonic() - t
        res["stored"] = du(repo)
        if not compress:
            dirty_writes(f"nbd+unix:///disk0?socket={d.nbd_sock}")
            t = time.monotonic()
            sh(BITBACK, "backup", "--connect", d.qmp_sock, "--node", "disk0",
               "--repo", repo, "--level", "inc")
            res["inc"] = time.monotonic() - t
        quit(d, "bitbackd")
    finally:
        d.cleanup()
    drop_repo(repo)
    os.unlink(disk)
    return res


def run_qsd(compress):
    disk = f"{W}/q.qcow2"
    sh("cp", "--sparse=always", f"{W}/src.qcow2", disk)
    for f in ("full.qcow2", "inc.qcow2"):
        if os.path.exists(f"{W}/{f}"):
            os.unlink(f"{W}/{f}")
    d = serve(f"{W}/qsd", QSD,
              f"driver=qcow2,node-name=disk0,file.driver=file,"
              f"file.filename={disk}", *EXPORT_DISK0)
    res = {}
    try:
        q = d.qmp
        opts = ["-o", "compression_type=zstd"] if compress else []
        t = time.monotonic()
        sh("qemu-img", "create", "-q", "-f", "qcow2", *opts,
           f"{W}/full.qcow2", str(SIZE))
        job = {"job-id": "j0", "device": "disk0", "target": f"{W}/full.qcow2",
               "format": "qcow2", "mode": "existing", "sync": "full"}
        if compress:
            job["compress"] = True
        q.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": "b0", "persistent": True}},
            {"type": "drive-backup", "data": job}])
        wait_job(q, "j0")
        res["full"] = time.monotonic() - t
        res["stored"] = os.stat(f"{W}/full.qcow2").st_blocks * 512
        if not compress:
            dirty_writes(f"nbd+unix:///disk0?socket={d.nbd_sock}")
            t = time.monotonic()
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b",
               f"{W}/full.qcow2", "-F", "qcow2", f"{W}/inc.qcow2")
            q.cmd("drive-backup", **{"job-id": "j1", "device": "disk0",
                                     "target": f"{W}/inc.qcow2",
                                     "format": "qcow2", "mode": "existing",
                                     "sync": "incremental", "bitmap": "b0"})
            wait_job(q, "j1")
            res["inc"] = time.monotonic() - t
        quit(d, "qemu-storage-daemon")
    finally:
        d.cleanup()
    os.unlink(disk)
    return res


def main():
    os.makedirs(W, exist_ok=True)
    make_source()
    sides = {
        "dd": run_dd,
        "bitback": lambda: run_bitback(False),
        "bitback-zstd": lambda: run_bitback(True),
        "qsd": lambda: run_qsd(False),
        "qsd-zstd": lambda: run_qsd(True),
    }
    names = list(sides)
    rounds = []
    for r in range(ROUNDS):
        order = names[r % len(names):] + names[:r % len(names)]
        res = {}
        for name in order:
            res[name] = sides[name]()
        rounds.append(res)
        print(f"scale round {r + 1}: " + json.dumps(
            {k: {m: round(v, 2) if m != "stored" else v
                 for m, v in x.items()} for k, x in res.items()}), flush=True)

    def med(side, what):
        return statistics.median(r[side][what] for r in rounds)

    def ratio(num, den):
        """Median of the per-round ratios num/den (of times: den's time
        over num's time is num's speed relative to den)."""
        return statistics.median(r[den[0]][den[1]] / r[num[0]][num[1]]
                                 for r in rounds)

    gib = DATA / (1 << 30)
    print(f"\nscale: a {SIZE >> 30} GiB sparse qcow2 with {gib:g} GiB of "
          f"data, {DIRTY >> 20} MiB dirtied; {ROUNDS} rounds, medians")
    print(f"{'step':34} {'time s':>8} {'MB/s':>8} {'stored MiB':>11}")
    for side, what in (("dd", "full"), ("bitback", "full"),
                       ("bitback-zstd", "full"), ("qsd", "full"),
                       ("qsd-zstd", "full"), ("bitback", "inc"),
                       ("qsd", "inc")):
        t = med(side, what)
        mbs = (DATA if what == "full" else DIRTY) / t / 1e6
        st = (statistics.median(r[side]["stored"] for r in rounds) / MiB
              if "stored" in rounds[0][side] and what == "full" else None)
        print(f"{side + ' ' + what:34} {t:8.2f} {mbs:8.0f} "
              f"{'' if st is None else round(st):>11}")
    rows = [
        ("bitback full / dd conv=fdatasync", ratio(("bitback", "full"),
                                                   ("dd", "full")), 0.95),
        ("bitback inc / qsd inc", ratio(("bitback", "inc"), ("qsd", "inc")),
         1.5),
        ("bitback zstd full / qsd plain full",
         ratio(("bitback-zstd", "full"), ("qsd", "full")), 1.0),
        ("bitback zstd full / bitback plain full",
         ratio(("bitback-zstd", "full"), ("bitback", "full")), None),
    ]
    print(f"\n{'throughput ratio (paired, median)':42} {'ratio':>6} "
          f"{'target':>7}")
    for name, r, target in rows:
        verdict = "" if target is None else \
            ("PASS" if r >= target else "MISS")
        print(f"{name:42} {r:6.2f} "
              f"{'' if target is None else '>= ' + str(target):>7} {verdict}")


main()
