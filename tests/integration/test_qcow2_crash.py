"""qcow2 metadata write-back: crash consistency and flush durability.

The qcow2 driver keeps L2 tables, refcount blocks and L1 changes in a
write-back cache and writes them at a flush, in an order that keeps the
file consistent at every moment (src/block/drivers/qcow2/qcow2.h).  These
tests kill bitbackd with SIGKILL while NBD clients write, then judge the
image with qemu's tools:

  * `qemu-img check` finds no corruption (exit 0, or 3 for leaked
    clusters, which a crash may leave, as with QEMU);
  * every sector reads back (qemu-img convert) as one of the contents the
    block-device contract allows: the content it had at the writer's last
    completed flush (or FUA write), or that of a write issued after it --
    never another sector's data, never garbage;
  * a new bitbackd serving the image read-only returns what qemu reads.

Each write fills every 512-byte sector with (write id, sector number), so
a sector names the write it came from.  Two writer threads (two NBD
connections) write disjoint halves of the image, with random sizes, zero
writes, trims, FUA writes and flushes at random points.

A count check (with strace, when installed) shows that an allocating
workload costs a handful of fdatasync calls, not one per cluster.
"""
import json
import os
import random
import shutil
import struct
import subprocess
import threading

import nbd
import pytest

from bitback_testlib import Daemon
from conftest import BITBACK, bitback, require, run, serve_qcow2_ro

MiB = 1024 * 1024
SIZE = 64 * MiB
SECTOR = 512
ZERO_SECTOR = bytes(SECTOR)


@pytest.fixture(autouse=True)
def tools():
    for tool in ("qemu-img", "qemu-io"):
        require(tool)


def sector_data(write_id, sector):
    return struct.pack(">QQ", write_id, sector) * (SECTOR // 16)


class Writer:
    """One NBD connection writing sectors [lo, hi) and keeping, per sector,
    the set of contents a crash may leave (write ids; 0 = zeroes)."""

    def __init__(self, uri, lo, hi, seed, id_base):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.lo, self.hi = lo, hi
        self.rnd = random.Random(seed)
        self.next_id = id_base
        self.cur = {}        # sector -> contents if flushed now
        self.durable = {}    # sector -> contents at the last flush
        self.pending = {}    # sector -> contents of ops issued since
        self.flushes = 0
        self.ops = 0
        self.error = None

    def allowed(self, sector):
        d = self.durable.get(sector, {0})
        return d | self.pending.get(sector, set())

    def _issue(self, sectors, values):
        for s in sectors:
            self.pending.setdefault(s, set()).update(values)

    def one_op(self):
        self.ops += 1
        rnd = self.rnd
        n = rnd.choice([1, 3, 8, 16, 100, 128, 256, 512])
        n = min(n, self.hi - self.lo)
        first = rnd.randrange(self.lo, self.hi - n + 1)
        sectors = range(first, first + n)
        kind = rnd.random()
        if kind < 0.08:
            self.h.flush()
            self.flushes += 1
            # Flush completed: everything completed before it is durable.
            self.durable = {s: set(v) for s, v in self.cur.items()}
            self.pending = {}
        elif kind < 0.16:
            self._issue(sectors, {0})
            self.h.zero(n * SECTOR, first * SECTOR)
            for s in sectors:
                self.cur[s] = {0}
        elif kind < 0.22:
            # Trim: the sectors read as before or as zeroes.
            self._issue(sectors, {0})
            self.h.trim(n * SECTOR, first * SECTOR)
            for s in sectors:
                self.cur[s] = self.cur.get(s, {0}) | {0}
        else:
            wid = self.next_id
            self.next_id += 1
            fua = kind > 0.92
            self._issue(sectors, {wid})
            buf = b"".join(sector_data(wid, s) for s in sectors)
            self.h.pwrite(buf, first * SECTOR,
                          nbd.CMD_FLAG_FUA if fua else 0)
            for s in sectors:
                self.cur[s] = {wid}
                if fua:
                    # Durable on completion; this thread alone writes here,
                    # so nothing issued earlier can land over it.
                    self.durable[s] = {wid}
                    self.pending.pop(s, None)

    def run(self):
        try:
            while True:
                self.one_op()
        except nbd.Error as e:      # the daemon was killed
            self.error = e
        finally:
            self.h = None           # disconnects (libnbd has no close)


def check_image(img):
    """qemu-img check: no corruption; returns the parsed result."""
    p = run(["qemu-img", "check", "--output=json", img], check=False)
    assert p.returncode in (0, 3), \
        f"qemu-img check exit {p.returncode}: {p.stdout}{p.stderr}"
    r = json.loads(p.stdout)
    assert r.get("corruptions", 0) == 0, r
    assert r.get("check-errors", 0) == 0, r
    return r


def verify_contents(tmp_path, img, writers):
    raw = tmp_path / "read.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw])
    data = raw.read_bytes()
    assert len(data) == SIZE
    bad = []
    for w in writers:
        for s in range(w.lo, w.hi):
            got = data[s * SECTOR:(s + 1) * SECTOR]
            allowed = w.allowed(s)
            if got == ZERO_SECTOR:
                ok = 0 in allowed
                what = "zeroes"
            else:
                wid, sec = struct.unpack(">QQ", got[:16])
                ok = sec == s and got == sector_data(wid, s) and wid in allowed
                what = f"write {wid} (for sector {sec})"
            if not ok:
                bad.append(f"sector {s}: {what}, allowed {sorted(allowed)}")
    assert not bad, f"{len(bad)} bad sectors, e.g. {bad[:5]}"
    raw.unlink()


def crash_trial(tmp_path, trial, cluster):
    rnd = random.Random(1000 + trial)
    img = tmp_path / f"t{trial}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size={cluster}", img, str(SIZE)])
    d = Daemon(tmp_path / f"d{trial}")
    writers = []
    try:
        d.start("--blockdev",
                f"driver=qcow2,node-name=d0,file.driver=file,"
                f"file.filename={img}", nbd=True)
        d.qmp.cmd("block-export-add", type="nbd", id="e0",
                  **{"node-name": "d0"}, name="d0", writable=True)
        half = SIZE // SECTOR // 2
        writers = [Writer(d.nbd_uri("d0"), i * half, (i + 1) * half,
                          trial * 10 + i, (i + 1) << 40) for i in range(2)]
        threads = [threading.Thread(target=w.run) for w in writers]
        for t in threads:
            t.start()
        killer = threading.Event()
        killer.wait(rnd.uniform(0.1, 0.8))
        d.kill()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a writer hung after the kill"
    finally:
        d.cleanup()
    for w in writers:
        assert w.error is not None   # stopped by the kill, nothing else
    check_image(img)
    verify_contents(tmp_path, img, writers)
    # Our driver reads the crashed image as qemu does.
    srv = serve_qcow2_ro(tmp_path / f"r{trial}", img)
    try:
        p = run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                 srv.nbd_uri("d0"), img], check=False)
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        srv.cleanup()
    # The trial tested something: operations completed before the kill.
    assert sum(w.ops for w in writers) > 2, [w.ops for w in writers]
    print(f"trial {trial} ({cluster}): {[w.ops for w in writers]} ops, "
          f"{[w.flushes for w in writers]} flushes, "
          f"{check_image(img).get('leaks', 0)} leaked clusters")


# 64k is the common case; 4k and 512-byte clusters overflow the L2 and
# refcount block caches (dirty evictions) and grow the refcount table.
@pytest.mark.parametrize("trial", range(12))
def test_sigkill_during_writes(tmp_path, trial):
    cluster = ["64k", "4k", "512"][trial % 3]
    crash_trial(tmp_path, trial, cluster)


def test_reopen_after_crash_and_write_more(tmp_path):
    """A crashed image (maybe with leaks) opens read-write again; more
    writes and a clean close leave no corruption, and `qemu-img check -r
    leaks` then finds it clean."""
    crash_trial(tmp_path, 99, "64k")
    img = tmp_path / "t99.qcow2"
    raw = tmp_path / "after.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw])
    cmds = ["write -P 0x5a 0 1M", "write -P 0x6b 40M 300k",
            "discard 8M 2M", "write -P 0x7c 9M 64k"]
    args = ["io", str(img)]
    for c in cmds:
        args += ["-c", c]
    bitback(*args)
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c.replace("discard", "write -z")]
    run(args + [str(raw)])
    check_image(img)
    run(["qemu-img", "check", "-q", "-r", "leaks", img], check=False)
    p = run(["qemu-img", "check", img], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw],
            check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_flushed_writes_survive_without_close(tmp_path):
    """Deterministic: writes into new clusters, one flush, more writes,
    SIGKILL.  Everything before the flush reads back; the image is
    consistent."""
    img = tmp_path / "f.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE)])
    d = Daemon(tmp_path / "d")
    try:
        d.start("--blockdev",
                f"driver=qcow2,node-name=d0,file.driver=file,"
                f"file.filename={img}", nbd=True)
        d.qmp.cmd("block-export-add", type="nbd", id="e0",
                  **{"node-name": "d0"}, name="d0", writable=True)
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("d0"))
        rnd = random.Random(7)
        offs = rnd.sample(range(SIZE // 65536), 200)
        for i, c in enumerate(offs[:100]):
            h.pwrite(bytes([i % 250 + 1]) * 65536, c * 65536)
        h.flush()
        for c in offs[100:]:
            h.pwrite(b"\xee" * 65536, c * 65536)
        d.kill()
        del h
    finally:
        d.cleanup()
    check_image(img)
    for i, c in enumerate(offs[:100]):
        run(["qemu-io", "-f", "qcow2", "-r", "-c",
             f"read -P {i % 250 + 1} {c * 65536} 64k", img])


def test_allocating_writes_sync_rarely(tmp_path):
    """256 random 64 KiB writes into a fresh image (each allocates a
    cluster), then close: a few fdatasync calls, not one per cluster."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    img = tmp_path / "n.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1G"])
    rnd = random.Random(3)
    clusters = rnd.sample(range(16384), 256)
    args = ["strace", "-f", "-qq", "-c", "-o", str(tmp_path / "strace.txt"),
            "-e", "trace=fdatasync,fsync", BITBACK, "io", str(img)]
    for i, c in enumerate(clusters):
        args += ["-c", f"write -P {i % 250 + 1} {c * 65536} 64k"]
    args += ["-c", "flush"]
    # LeakSanitizer (sanitizer builds) cannot run under ptrace.
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = ":".join(
        filter(None, [env.get("ASAN_OPTIONS"), "detect_leaks=0"]))
    p = subprocess.run(args, capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr
    syncs = 0
    for line in (tmp_path / "strace.txt").read_text().splitlines():
        f = line.split()
        if f and f[-1] in ("fdatasync", "fsync"):
            syncs += int(f[3])
    assert 0 < syncs <= 16, f"{syncs} syncs for 256 allocating writes"
    check_image(img)
    p = run(["qemu-img", "check", img], check=False)
    assert p.returncode == 0, p.stdout
    for i, c in enumerate(clusters[:32]):
        run(["qemu-io", "-f", "qcow2", "-r", "-c",
             f"read -P {i % 250 + 1} {c * 65536} 64k", img])
