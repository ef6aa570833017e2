"""qcow2 persistent bitmaps (header extension 0x23852875) against QEMU.

qemu-img, qemu-io and qemu-nbd are the judges: bitmaps that QEMU stored
load in bitbackd with the same dirty set qemu-nbd exports; bitmaps bitbackd
stored show in `qemu-img info` with the right flags and export from
qemu-nbd with exactly our writes; a SIGKILL leaves them in-use (and
bitback then reports them inconsistent); broken directories and tables
fail the open with a clear error; `bitback bitmap` edits them offline.
"""
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time

import pytest

from bitback_testlib import Daemon, QMPError
from conftest import BITBACK, dirty_extents, require, run

MiB = 1024 * 1024
GRAN = 64 * 1024
BITMAPS_EXT = 0x23852875


@pytest.fixture(autouse=True)
def tools():
    for t in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"):
        require(t)


def create(path, size=64 * MiB, *opts):
    run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, path, str(size)])
    return path


def touched_extents(writes, gran=GRAN):
    clusters = sorted({c for off, n in writes
                       for c in range(off // gran, (off + n - 1) // gran + 1)})
    out = []
    for c in clusters:
        if out and out[-1][0] + out[-1][1] == c * gran:
            out[-1] = (out[-1][0], out[-1][1] + gran)
        else:
            out.append((c * gran, gran))
    return out


def qemu_nbd_extents(image, bitmap="b0"):
    """The dirty extents qemu-nbd -B BITMAP exports for a qcow2 image."""
    sockdir = tempfile.mkdtemp(prefix="bbq-")
    sock = os.path.join(sockdir, "q.sock")
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap,
                             "-k", sock, "-t", "-x", "d0", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("qemu-nbd did not start: "
                                     f"{proc.stderr.read().decode()}")
            time.sleep(0.02)
        return dirty_extents(f"nbd+unix:///d0?socket={sock}", bitmap)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        shutil.rmtree(sockdir, ignore_errors=True)


def qemu_bitmaps(image, force_share=False):
    """The "bitmaps" list of qemu-img info (None when there is none)."""
    p = run(["qemu-img", "info", *(["-U"] if force_share else []),
             "--output=json", image])
    data = json.loads(p.stdout)["format-specific"]["data"]
    return data.get("bitmaps")


def qemu_check_clean(image):
    p = run(["qemu-img", "check", "--output=json", image], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0, r


def start_daemon(d, image, writable=True, bitmaps=("b0",), add=False):
    d.start("--blockdev", "driver=qcow2,node-name=d0,file.driver=file,"
            f"file.filename={image}", nbd=True)
    if add:
        for b in bitmaps:
            d.qmp.cmd("block-dirty-bitmap-add", node="d0", name=b,
                      persistent=True)
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
              name="d0", writable=writable, bitmaps=list(bitmaps))
    return d.nbd_uri("d0")


def qemu_io_writes(target, writes, fmt):
    cmds = []
    for i, (off, n) in enumerate(writes):
        cmds += ["-c", f"write -P {0x20 + i} {off} {n}"]
    run(["qemu-io", "-f", fmt, *cmds, target])


WRITES = [(0, 4096), (MiB + 4096, 64 * 1024), (10 * MiB + 7, 1),
          (32 * MiB - 512, 1024), (64 * MiB - 4096, 4096)]


def test_qemu_bitmap_loads_in_bitbackd(tmp_path):
    img = create(tmp_path / "q.qcow2")
    run(["qemu-img", "bitmap", "--add", img, "b0"])
    run(["qemu-img", "bitmap", "--add", "-g", "1M", "--disable", img, "off"])
    qemu_io_writes(img, WRITES, "qcow2")
    want = touched_extents(WRITES)
    assert qemu_nbd_extents(img) == want
    assert qemu_nbd_extents(img, "off") == []

    with Daemon(tmp_path) as d:
        uri = start_daemon(d, "q.qcow2", bitmaps=("b0", "off"))
        assert dirty_extents(uri, "b0") == want
        assert dirty_extents(uri, "off") == []
        b0 = d.qmp.bitmap("d0", "b0")
        assert b0["recording"] is True and b0["persistent"] is True
        assert b0.get("inconsistent", False) is False
        off = d.qmp.bitmap("d0", "off")
        assert off["recording"] is False and off["granularity"] == MiB
        # Open for writing: marked in-use on disk before any write.
        assert [b["flags"] for b in qemu_bitmaps(img, force_share=True)] == \
            [["in-use", "auto"], ["in-use"]]
        assert d.quit() == 0
    # Stored back unchanged, clean.
    assert qemu_bitmaps(img) == [
        {"flags": ["auto"], "name": "b0", "granularity": GRAN},
        {"flags": [], "name": "off", "granularity": MiB}]
    assert qemu_nbd_extents(img) == want
    qemu_check_clean(img)


def test_bitbackd_bitmap_seen_by_qemu(tmp_path):
    img = create(tmp_path / "b.qcow2")
    with Daemon(tmp_path) as d:
        uri = start_daemon(d, "b.qcow2", add=True)
        # Stored at once, in-use while we run.
        assert qemu_bitmaps(img, force_share=True) == [
            {"flags": ["in-use", "auto"], "name": "b0", "granularity": GRAN}]
        qemu_io_writes(uri, WRITES, "raw")
        want = touched_extents(WRITES)
        assert dirty_extents(uri) == want
        assert d.quit() == 0
    assert qemu_bitmaps(img) == [
        {"flags": ["auto"], "name": "b0", "granularity": GRAN}]
    qemu_check_clean(img)
    assert qemu_nbd_extents(img) == want
    # The data went where it should.
    for i, (off, n) in enumerate(WRITES):
        run(["qemu-io", "-r", "-f", "qcow2", "-c",
             f"read -P {0x20 + i} {off} {n}", img])

    # Reopen: the bitmap is consistent and keeps tracking; QEMU then sees
    # both sessions' writes.
    more = [(40 * MiB, 3 * GRAN)]
    with Daemon(tmp_path) as d:
        uri = start_daemon(d, "b.qcow2")
        assert d.qmp.bitmap("d0", "b0").get("inconsistent", False) is False
        qemu_io_writes(uri, more, "raw")
        assert d.quit() == 0
    assert qemu_nbd_extents(img) == touched_extents(WRITES + more)
    qemu_check_clean(img)


def test_sigkill_leaves_bitmap_in_use(tmp_path):
    img = create(tmp_path / "k.qcow2")
    with Daemon(tmp_path) as d:
        uri = start_daemon(d, "k.qcow2", add=True)
        qemu_io_writes(uri, WRITES[:2], "raw")
        d.kill()
    assert qemu_bitmaps(img) == [
        {"flags": ["in-use", "auto"], "name": "b0", "granularity": GRAN}]
    p = run(["qemu-img", "check", "--output=json", img], check=False)
    assert p.returncode in (0, 3), p.stdout + p.stderr   # leaks at worst
    assert json.loads(p.stdout).get("corruptions", 0) == 0

    # bitback recovers it from its write-intent log (QEMU, which does not
    # know the log, sees in-use); without the log it is inconsistent.
    p = run([BITBACK, "img", "info", "--output=json", img])
    bms = json.loads(p.stdout)["format-specific"]["data"]["bitmaps"]
    assert bms[0]["inconsistent"] is False and bms[0]["recovered"] is True
    os.unlink(str(img) + ".wil")
    p = run([BITBACK, "img", "info", "--output=json", img])
    bms = json.loads(p.stdout)["format-specific"]["data"]["bitmaps"]
    assert len(bms) == 1 and bms[0]["name"] == "b0"
    assert bms[0]["inconsistent"] is True
    assert "in-use" in bms[0]["inconsistent-reason"]

    with Daemon(tmp_path) as d:
        d.start("--blockdev", "driver=qcow2,node-name=d0,file.driver=file,"
                "file.filename=k.qcow2")
        b0 = d.qmp.bitmap("d0", "b0")
        assert b0["inconsistent"] is True and b0["recording"] is False
        # Still in-use after a clean shutdown: never silently clean.
        assert d.quit() == 0
    assert qemu_bitmaps(img)[0]["flags"] == ["in-use", "auto"]

    # Removing it is what the user can do; the image is then clean.
    run([BITBACK, "bitmap", "--remove", img, "b0"])
    assert qemu_bitmaps(img) is None
    qemu_check_clean(img)


# ---- bad input ----

def find_bitmaps_ext(path):
    """(offset of the extension's data, nb, dir_size, dir_offset)."""
    with open(path, "rb") as f:
        hdr = f.read(65536)
    header_length = struct.unpack(">I", hdr[100:104])[0]
    pos = header_length
    while pos + 8 <= len(hdr):
        typ, length = struct.unpack(">II", hdr[pos:pos + 8])
        if typ == 0:
            break
        if typ == BITMAPS_EXT:
            nb, _, dsize, doff = struct.unpack(">IIQQ", hdr[pos + 8:pos + 32])
            return pos + 8, nb, dsize, doff
        pos += 8 + (length + 7) // 8 * 8
    raise AssertionError("no bitmaps extension")


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def image_with_bitmap(tmp_path, name):
    img = create(tmp_path / name)
    run(["qemu-img", "bitmap", "--add", img, "b0"])
    qemu_io_writes(img, WRITES[:2], "qcow2")
    return img


def add_extra_data(img, extra, compatible):
    """Rewrite the (single) directory entry of img with extra data."""
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    with open(img, "rb") as f:
        f.seek(doff)
        entry = f.read(dsize)
    toff, tsize, flags, typ, gbits, nsize, esize = \
        struct.unpack(">QIIBBHI", entry[:24])
    name = entry[24 + esize:24 + esize + nsize]
    flags = (flags | 4) if compatible else (flags & ~4)
    new = struct.pack(">QIIBBHI", toff, tsize, flags, typ, gbits, nsize,
                      len(extra)) + extra + name
    new += b"\0" * (-len(new) % 8)
    patch(img, doff, new)
    patch(img, ext + 8, struct.pack(">Q", len(new)))


def bad_open(img, *want):
    p = run([BITBACK, "img", "info", img], check=False)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    for w in want:
        assert w in p.stderr, p.stderr
    return p.stderr


def test_bad_bitmap_directory_and_tables(tmp_path):
    # Directory past the end of the file.
    img = image_with_bitmap(tmp_path, "dir.qcow2")
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    size = os.path.getsize(img)
    patch(img, ext + 16, struct.pack(">Q", (size // 65536 + 16) * 65536))
    bad_open(img, "bitmap directory", "outside the file")

    # Directory size beyond the limit.
    img = image_with_bitmap(tmp_path, "dsize.qcow2")
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    patch(img, ext + 8, struct.pack(">Q", 1 << 40))
    bad_open(img, "bad bitmap directory size")

    # Too many bitmaps.
    img = image_with_bitmap(tmp_path, "nb.qcow2")
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    patch(img, ext, struct.pack(">I", 70000))
    bad_open(img, "bad number of bitmaps")

    # Bitmap table outside the file.
    img = image_with_bitmap(tmp_path, "table.qcow2")
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    patch(img, doff, struct.pack(">Q", 1 << 50))
    bad_open(img, "b0", "bitmap table offset", "outside the file")

    # Bitmap table entry pointing outside the file.
    img = image_with_bitmap(tmp_path, "entry.qcow2")
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    with open(img, "rb") as f:
        f.seek(doff)
        toff = struct.unpack(">Q", f.read(8))[0]
    patch(img, toff, struct.pack(">Q", 1 << 45))
    bad_open(img, "b0", "table entry 0")

    # Bad name sizes: zero, and larger than the directory.
    img = image_with_bitmap(tmp_path, "name0.qcow2")
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    patch(img, doff + 18, struct.pack(">H", 0))
    bad_open(img, "bad name size 0")
    img = image_with_bitmap(tmp_path, "name2.qcow2")
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    patch(img, doff + 18, struct.pack(">H", 1000))
    bad_open(img, "past the end of the directory")

    # Reserved flag bit, unknown type, granularity out of range.
    for name, off, data, want in [
            ("flags", 12, struct.pack(">I", 0x10 | 2), "reserved flags"),
            ("type", 16, b"\x07", "unsupported type 7"),
            ("gran", 17, b"\x05", "granularity bits 5")]:
        img = image_with_bitmap(tmp_path, f"{name}.qcow2")
        ext, nb, dsize, doff = find_bitmaps_ext(img)
        patch(img, doff + off, data)
        bad_open(img, want)

    # Extra data: refused unless marked compatible; kept when it is.
    img = image_with_bitmap(tmp_path, "extra.qcow2")
    add_extra_data(img, b"EXTRA123", compatible=False)
    bad_open(img, "b0", "extra data")
    add_extra_data(img, b"EXTRA123", compatible=True)
    p = run([BITBACK, "img", "info", "--output=json", img])
    bm = json.loads(p.stdout)["format-specific"]["data"]["bitmaps"][0]
    assert bm["name"] == "b0" and bm["count"] == GRAN * 3
    run([BITBACK, "bitmap", "--clear", img, "b0"])     # stores it again
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    assert dsize == 40
    with open(img, "rb") as f:
        f.seek(doff)
        entry = f.read(40)
    assert entry[24:34] == b"EXTRA123b0"
    assert struct.unpack(">I", entry[12:16])[0] & 4

    # The daemon refuses such an image over QMP and keeps running.
    with Daemon(tmp_path) as d:
        d.start()
        with pytest.raises(QMPError) as e:
            d.qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "x"},
                      file={"driver": "file", "filename": "table.qcow2"})
        assert "bitmap table offset" in e.value.desc
        assert d.qmp.cmd("query-named-block-nodes") is not None
        assert d.quit() == 0


def test_bitback_bitmap_command_on_qcow2(tmp_path):
    img = create(tmp_path / "c.qcow2")
    run([BITBACK, "bitmap", "--add", img, "b1"])
    run([BITBACK, "bitmap", "--add", "--disable", img, "b2"])
    assert qemu_bitmaps(img) == [
        {"flags": ["auto"], "name": "b1", "granularity": GRAN},
        {"flags": [], "name": "b2", "granularity": GRAN}]
    qemu_check_clean(img)

    # QEMU records into the auto one; we merge it into the disabled one.
    qemu_io_writes(img, WRITES[:2], "qcow2")
    run([BITBACK, "bitmap", "--merge", "b1", img, "b2"])
    assert qemu_nbd_extents(img, "b2") == touched_extents(WRITES[:2])
    run([BITBACK, "bitmap", "--clear", "--disable", img, "b1"])
    assert qemu_nbd_extents(img, "b1") == []
    assert qemu_bitmaps(img)[0] == {"flags": [], "name": "b1",
                                    "granularity": GRAN}
    run([BITBACK, "bitmap", "--remove", img, "b1"])
    assert [b["name"] for b in qemu_bitmaps(img)] == ["b2"]
    run([BITBACK, "bitmap", "--remove", img, "b2"])
    assert qemu_bitmaps(img) is None
    qemu_check_clean(img)

    # qcow2 v2 cannot hold bitmaps (bitback opens v2 images read-only, so
    # the refusal may come from the open).
    v2 = create(tmp_path / "v2.qcow2", 16 * MiB, "-o", "compat=0.10")
    p = run([BITBACK, "bitmap", "--add", v2, "b0"], check=False)
    assert p.returncode != 0
    assert ("Cannot store dirty bitmaps in qcow2 v2 files" in p.stderr or
            "version 2" in p.stderr), p.stderr
    p = run(["qemu-img", "info", "--output=json", v2])
    assert "bitmaps" not in json.loads(p.stdout)["format-specific"]["data"]


def test_multi_cluster_table_and_all_ones(tmp_path):
    """A 512-byte granularity bitmap over 1 GiB takes four bitmap clusters:
    one all-ones (table entry 1, no data cluster), one all-zero (entry 0)
    and two with data.  QEMU reads each kind the same as we do."""
    img = create(tmp_path / "big.qcow2", 1024 * MiB)
    run([BITBACK, "bitmap", "--add", "-g", "512", img, "b0"])
    run([BITBACK, "io", "-c", "write -z 0 256M", "-c", "write 300M 4k",
         "-c", "write 1023M 1M", img])
    want = [(0, 256 * MiB), (300 * MiB, 4096), (1023 * MiB, MiB)]
    assert qemu_bitmaps(img) == [
        {"flags": ["auto"], "name": "b0", "granularity": 512}]
    qemu_check_clean(img)
    assert qemu_nbd_extents(img) == want
    ext, nb, dsize, doff = find_bitmaps_ext(img)
    with open(img, "rb") as f:
        f.seek(doff)
        toff, tsize = struct.unpack(">QI", f.read(12))
        f.seek(toff)
        table = struct.unpack(f">{tsize}Q", f.read(8 * tsize))
    assert tsize == 4 and table[0] == 1 and table[2] == 0
    assert table[1] and table[3]

    # And we read it back the same; QEMU then adds a write to it.
    run(["qemu-io", "-f", "qcow2", "-c", "write 512M 512", img])
    p = run([BITBACK, "img", "map", "--output=json", "--bitmap", "b0", img])
    dirty = [(e["start"], e["length"]) for e in json.loads(p.stdout)
             if e["dirty"]]
    assert dirty == [(0, 256 * MiB), (300 * MiB, 4096), (512 * MiB, 512),
                     (1023 * MiB, MiB)]


def test_qmp_add_remove_and_blockdev_del(tmp_path):
    """Persistent bitmaps added and removed over QMP reach the image at
    once; blockdev-del stores them (clean) as a shutdown does."""
    img = create(tmp_path / "r.qcow2")
    with Daemon(tmp_path) as d:
        d.start(nbd=True)
        d.qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "d0"},
                  file={"driver": "file", "filename": "r.qcow2"})
        for name, gran in (("b0", 4096), ("b1", GRAN), ("b2", MiB)):
            d.qmp.cmd("block-dirty-bitmap-add", node="d0", name=name,
                      granularity=gran, persistent=True)
        d.qmp.cmd("block-dirty-bitmap-remove", node="d0", name="b1")
        d.qmp.cmd("block-dirty-bitmap-disable", node="d0", name="b2")
        assert qemu_bitmaps(img, force_share=True) == [
            {"flags": ["in-use", "auto"], "name": "b0", "granularity": 4096},
            {"flags": ["in-use", "auto"], "name": "b2", "granularity": MiB}]
        d.qmp.cmd("block-export-add", type="nbd", id="e0",
                  **{"node-name": "d0"}, name="d0", writable=True)
        qemu_io_writes(d.nbd_uri("d0"), WRITES[:3], "raw")
        d.qmp.del_export("e0")
        d.qmp.cmd("blockdev-del", **{"node-name": "d0"})
        assert qemu_bitmaps(img) == [
            {"flags": ["auto"], "name": "b0", "granularity": 4096},
            {"flags": [], "name": "b2", "granularity": MiB}]
        assert d.quit() == 0
    qemu_check_clean(img)
    assert qemu_nbd_extents(img) == touched_extents(WRITES[:3], 4096)
    assert qemu_nbd_extents(img, "b2") == []


def test_autoclear_bit_clear_means_inconsistent(tmp_path):
    """A program without bitmap support wrote the image (autoclear bit 0
    clear): the bitmaps load inconsistent, and a writable open drops the
    extension without freeing anything (its clusters may be reused), as
    QEMU does: leaks at worst, never a corruption."""
    img = image_with_bitmap(tmp_path, "ac.qcow2")
    with open(img, "rb") as f:
        f.seek(88)
        autoclear = struct.unpack(">Q", f.read(8))[0]
    assert autoclear & 1
    patch(img, 88, struct.pack(">Q", autoclear & ~1))
    p = run([BITBACK, "img", "info", "--output=json", img])
    bm = json.loads(p.stdout)["format-specific"]["data"]["bitmaps"][0]
    assert bm["name"] == "b0" and bm["inconsistent"] is True
    assert "autoclear" in bm["inconsistent-reason"]
    run([BITBACK, "bitmap", "--remove", img, "b0"])
    assert qemu_bitmaps(img) is None
    p = run(["qemu-img", "check", "--output=json", img], check=False)
    r = json.loads(p.stdout)
    assert r.get("corruptions", 0) == 0 and r["leaks"] == 3, r
