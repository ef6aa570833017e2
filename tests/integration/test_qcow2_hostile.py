"""qcow2 images whose metadata lies (issue 17, defect 5; docs/specs/qcow2.md
O1-O3, B1-B3, K1).  Every image is made by qemu-img/qemu-io and then
patched with struct: a write must never land on the image's own metadata
or far past its end, and `img check` stays linear in the image size."""
import json
import os
import struct

import pytest

from conftest import bitback, run

BOUND = 60          # seconds: generous bound for any command here
COPIED = 1 << 63


class Image:
    """A qcow2 image made by qemu-img, with its header fields."""

    def __init__(self, path, size="1M", cluster_size=65536, writes=()):
        self.path = str(path)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
             f"cluster_size={cluster_size}", self.path, size])
        for w in writes:
            run(["qemu-io", "-f", "qcow2", "-c", w, self.path])
        with open(self.path, "rb") as f:
            h = f.read(104)
        self.cluster_bits = struct.unpack(">I", h[20:24])[0]
        self.cs = 1 << self.cluster_bits
        self.l1_size, self.l1_offset = struct.unpack(">IQ", h[36:48])
        self.rt_offset, self.rt_clusters = struct.unpack(">QI", h[48:60])

    def u64(self, off):
        with open(self.path, "rb") as f:
            f.seek(off)
            return struct.unpack(">Q", f.read(8))[0]

    def put(self, off, data):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def read(self, off, n):
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def l2_offset(self, l1_index=0):
        return self.u64(self.l1_offset + 8 * l1_index) & 0x00fffffffffffe00

    def refblock_offset(self, index=0):
        return self.u64(self.rt_offset + 8 * index) & ~0x1ff

    def set_l2_entry(self, index, value):
        self.put(self.l2_offset() + 8 * index, struct.pack(">Q", value))

    def set_refcount(self, cluster, value):
        """16-bit refcounts (qemu-img's default), first refcount block."""
        self.put(self.refblock_offset() + 2 * cluster, struct.pack(">H", value))

    def size(self):
        return os.path.getsize(self.path)


def io(img, *cmds):
    args = ["io", "-f", "qcow2", img.path]
    for c in cmds:
        args += ["-c", c]
    return bitback(*args, check=False, timeout=BOUND)


def corrupt_bit(img):
    info = json.loads(run(["qemu-img", "info", "--output=json", "-U",
                           img.path]).stdout)
    return info["format-specific"]["data"].get("corrupt", False)


def assert_refused(img, p):
    assert p.returncode != 0, p.stdout
    assert "corrupt" in p.stderr, p.stderr
    assert corrupt_bit(img), "the image is not marked corrupt"
    # The corrupt bit refuses every later writable open (O2).
    p = io(img, "write 2M 512")
    assert p.returncode != 0 and "corrupt" in p.stderr, p.stderr


@pytest.mark.parametrize("host", [1 << 40, 1 << 55])
def test_data_entry_far_past_eof_does_not_grow_file(tmp_path, host):
    """A tiny image whose L2 entry names a host offset terabytes (1 TiB) or
    petabytes (2^55, the issue's 41 PB) past the end: one 8 KiB write must
    fail, not grow a sparse file to that size (B2)."""
    img = Image(tmp_path / "far.qcow2", "4M", 512, ["write -q 0 8k"])
    assert img.size() < 64 * 1024
    img.set_l2_entry(0, host | COPIED)
    p = io(img, "write -P 0x5a 0 8k")
    assert img.size() < 1024 * 1024, f"file grew to {img.size()} bytes"
    assert_refused(img, p)


@pytest.mark.parametrize("target", ["l1", "l2", "reftable", "refblock"])
def test_data_entry_on_metadata_is_refused(tmp_path, target):
    """An L2 entry naming one of the image's own tables: a guest write to it
    is refused, the table keeps its bytes, the image is marked corrupt
    (O1, O2), as QEMU's overlap check does."""
    img = Image(tmp_path / "ol.qcow2", "4M", 65536, ["write -q 0 64k"])
    where = {"l1": img.l1_offset, "l2": img.l2_offset(),
             "reftable": img.rt_offset, "refblock": img.refblock_offset()}
    off = where[target]
    img.set_l2_entry(1, off | COPIED)
    before = img.read(off, img.cs)
    p = io(img, "write -P 0x5a 64k 4k")
    assert img.read(off, img.cs) == before, f"the {target} was overwritten"
    assert_refused(img, p)


@pytest.mark.parametrize("target", ["l1", "reftable"])
def test_allocation_over_metadata_is_refused(tmp_path, target):
    """Refcounts that call a table free (refcount 0) must not make the
    allocator hand its cluster out for new data (O1)."""
    img = Image(tmp_path / "alloc.qcow2", "4M", 65536, ["write -q 0 64k"])
    off = img.l1_offset if target == "l1" else img.rt_offset
    img.set_refcount(off // img.cs, 0)
    before = img.read(off, img.cs)
    p = io(img, "write -P 0x5a 1M 64k", "flush")
    assert img.read(off, img.cs) == before, f"the {target} was overwritten"
    assert_refused(img, p)


def test_refcounts_past_eof_do_not_grow_file(tmp_path):
    """A refcount block that counts every cluster of its region (2 GiB with
    64 KiB clusters) in use, most of them past the end of the file: the
    allocator must not place new clusters gigabytes past the end (B3)."""
    img = Image(tmp_path / "full.qcow2", "4M", 65536, ["write -q 0 64k"])
    nb = img.cs // 2
    img.put(img.refblock_offset(), struct.pack(">H", 1) * nb)
    p = io(img, "write -P 0x5a 1M 64k", "flush")
    assert img.size() < 16 * 1024 * 1024, f"file grew to {img.size()} bytes"
    assert_refused(img, p)


def leak_past_eof(img, n):
    """Count n clusters past the end of the file, as a crash between a
    refcount update and the cluster's write leaves them."""
    eof = -(-img.size() // img.cs)   # a partial last cluster is in the file
    for c in range(eof, eof + n):
        img.set_refcount(c, 1)
    return eof


def test_crash_leak_past_eof_is_a_leak_not_a_corruption(tmp_path):
    """A crash leaves clusters counted past the end of the file (a CI run's
    SIGKILL trial hit it: the reopen then failed, the image marked
    corrupt).  They are leaks (B3, K1): img check exits 3 and calls them
    harmless, the image opens read-write, marks its bitmap in use, takes
    new writes past them, and stays clean for qemu-img."""
    img = Image(tmp_path / "leak.qcow2", "4M", 65536, ["write -q -P 7 0 64k"])
    run(["qemu-img", "bitmap", "--add", img.path, "b0"])
    eof = leak_past_eof(img, 4)
    p = bitback("img", "check", "-f", "qcow2", img.path, check=False,
                timeout=BOUND)
    assert p.returncode == 3, (p.returncode, p.stdout, p.stderr)
    assert f"Leaked clusters {eof}-{eof + 3} (past the end of the file)" \
        in p.stderr, p.stderr
    assert "4 leaked clusters were found" in p.stderr
    assert "no harm to data" in p.stderr and "errors" not in p.stderr
    p = io(img, "write -P 0x5a 1M 64k", "flush", "read -P 7 0 64k")
    assert p.returncode == 0, p.stderr
    assert not corrupt_bit(img)
    q = run(["qemu-img", "check", "--output=json", img.path], check=False)
    assert q.returncode in (0, 3), q.stdout + q.stderr
    assert json.loads(q.stdout).get("corruptions", 0) == 0, q.stdout
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k",
         "-c", "read -P 7 0 64k", img.path])


def test_claims_past_the_leak_window_are_a_corruption(tmp_path):
    """Refcounts that count clusters more than a crash can leave past the
    end (1 GiB, B3): img check calls the image corrupt (exit 2) and names
    the refcount block once."""
    img = Image(tmp_path / "far.qcow2", "4M", 65536, ["write -q 0 64k"])
    img.put(img.refblock_offset() + 2 * (img.size() // img.cs),
            struct.pack(">H", 1) * (img.cs // 2 - img.size() // img.cs))
    p = bitback("img", "check", "-f", "qcow2", img.path, check=False,
                timeout=BOUND)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "counts clusters more than 1024 MiB past the end" in p.stderr


def test_clean_image_never_trips_the_checks(tmp_path):
    """Allocating, overwriting, discarding and zeroing across several L2
    tables of a clean image: no overlap, qemu-img check is clean (O3)."""
    img = Image(tmp_path / "clean.qcow2", "64M", 4096)
    p = io(img, "write -P 1 0 3M", "write -P 2 1M 64k", "discard 2M 256k",
           "write -z 32M 1M", "write -P 3 40M 8k", "flush",
           "read -P 3 40M 8k")
    assert p.returncode == 0, p.stderr
    assert not corrupt_bit(img)
    run(["qemu-img", "check", img.path])


def test_check_is_linear_with_shared_refcount_blocks(tmp_path):
    """A 10 MiB image whose refcount table (20 clusters, 163840 entries)
    names one refcount block in every entry: img check finishes within a
    generous bound, calls the image corrupt (exit 2, as qemu-img check) and
    lists a bounded number of problems (K1)."""
    img = Image(tmp_path / "rt.qcow2", "10M", 65536, ["write -q 0 10M"])
    block = img.refblock_offset()
    clusters = 20
    rt = img.size()
    img.put(rt, struct.pack(">Q", block) * (clusters * img.cs // 8))
    img.put(48, struct.pack(">QI", rt, clusters))
    q = run(["qemu-img", "check", img.path], check=False, timeout=BOUND)
    assert q.returncode == 2
    p = bitback("img", "check", "-f", "qcow2", img.path, check=False,
                timeout=BOUND)
    assert p.returncode == 2, p.stderr
    out = p.stdout + p.stderr
    assert len(out.splitlines()) < 1100
    assert "errors were found on the image" in out
