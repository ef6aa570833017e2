"""Compressed qcow2 clusters written by bitback (issue 18): the qcow2
driver's compressed writes (`bitback io write -c`), bitbackd's
drive-backup `compress: true`, and `bitback backup --compress=zstd` live
(bitbackd and qemu-storage-daemon) and offline.

Everything bitback writes is read back by QEMU's tools (qemu-img check,
compare, convert), what qemu-storage-daemon writes is read back by bitback,
and mixed data (random and repetitive 64 KiB blocks) must be stored in at
most 0.6x its size, random data in at most 1.01x.
"""
import json
import os
import random
import struct
import zlib

import pytest

from bitback_testlib import QSD, Daemon
from bitback_testlib.nbdio import connect
from conftest import BITBACK, bitback, require, run, start_qcow2_rw

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
MIXED_MAX = 0.6
RANDOM_MAX = 1.01


def mixed_data(size, seed=1):
    """size bytes: 64 KiB blocks alternately random and a short random
    string repeated (compresses well)."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(size // BLOCK):
        if i % 2 == 0:
            out += rng.randbytes(BLOCK)
        else:
            out += rng.randbytes(64) * (BLOCK // 64)
    return bytes(out)


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


def stored(path):
    return os.stat(path).st_blocks * 512


def qemu_check(path):
    p = run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)])
    info = json.loads(p.stdout)
    assert info.get("corruptions", 0) == 0 and info.get("leaks", 0) == 0, info
    return info


def assert_same_as_raw(image, raw, tmp_path, fmt="qcow2"):
    """qemu-img compare and a qemu-img convert of image, byte for byte."""
    run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(image)])
    out = tmp_path / "converted.raw"
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out)])
    with open(out, "rb") as a, open(raw, "rb") as b:
        assert a.read() == b.read()
    out.unlink()


def zstd_image(path, size):
    bitback("img", "create", "-f", "qcow2", "-o", "compression_type=zstd",
            path, str(size))
    return path


# -- the driver: bitback io write -c ------------------------------------

@pytest.mark.parametrize("ctype", ["zstd", "zlib"])
def test_io_compressed_write_mixed_and_random(tmp_path, ctype):
    require("qemu-img")
    size = 16 * MiB
    src = write_file(tmp_path / "mixed.raw", mixed_data(size))
    img = tmp_path / "mixed.qcow2"
    bitback("img", "create", "-f", "qcow2", "-o",
            f"compression_type={ctype}", img, str(size))
    bitback("io", "-f", "qcow2", img, "-c", f"write -q -c -s {src} 0 {size}")
    info = qemu_check(img)
    assert info["compressed-clusters"] > 0, info
    bitback("img", "check", "-f", "qcow2", img)
    assert_same_as_raw(img, src, tmp_path)
    assert stored(img) <= MIXED_MAX * size, stored(img)

    # Random data does not shrink: stored plain, nothing lost but metadata.
    rsize = 40 * MiB
    rnd = write_file(tmp_path / "random.raw", random.Random(2).randbytes(rsize))
    rimg = tmp_path / "random.qcow2"
    bitback("img", "create", "-f", "qcow2", "-o",
            f"compression_type={ctype}", rimg, str(rsize))
    bitback("io", "-f", "qcow2", rimg, "-c", f"write -q -c -s {rnd} 0 {rsize}")
    qemu_check(rimg)
    assert_same_as_raw(rimg, rnd, tmp_path)
    assert stored(rimg) <= RANDOM_MAX * rsize, stored(rimg)


def test_io_compressed_write_rules(tmp_path):
    """Whole clusters only (the image's last one may be partial), into
    unallocated or zero clusters only; packed clusters survive rewrites of
    their neighbours."""
    require("qemu-img")
    size = 1 * MiB + 12 * KiB            # a partial last cluster
    img = zstd_image(tmp_path / "r.qcow2", size)

    def io(*cmds):
        args = []
        for c in cmds:
            args += ["-c", c]
        return bitback("io", "-f", "qcow2", img, *args, check=False)

    p = io("write -c -P 1 4k 64k")
    assert p.returncode != 0 and "Invalid argument" in p.stderr, p.stderr
    p = io("write -c -P 1 0 32k")
    assert p.returncode != 0 and "Invalid argument" in p.stderr, p.stderr
    assert io("write -c -P 1 0 128k", "write -c -P 2 1M 12k",
              "write -z 128k 64k", "write -c -P 3 128k 64k").returncode == 0
    # An allocated cluster is never overwritten compressed.
    p = io("write -c -P 4 0 64k")
    assert p.returncode != 0 and "not supported" in p.stderr, p.stderr
    # A plain write over one packed cluster moves it; the others stay.
    assert io("write -P 5 64k 4k").returncode == 0
    qemu_check(img)
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 1 0 64k",
         "-c", "read -P 5 64k 4k", "-c", "read -P 1 68k 60k",
         "-c", "read -P 3 128k 64k", "-c", "read -P 2 1M 12k", str(img)])
    # Its packed neighbours' host clusters are still referenced correctly
    # after a rewrite of everything (refcounts drop to zero cleanly).
    assert io("write -P 6 0 192k", "write -P 7 1M 12k").returncode == 0
    qemu_check(img)


# -- bitbackd / qemu-storage-daemon drive-backup compress: true ---------

def raw_blockdev(node, path):
    return ["--blockdev", f"driver=raw,node-name={node},file.driver=file,"
            f"file.filename={path}"]


def wait_job(q, job_id):
    ev = q.wait_event(lambda e: e["event"] in ("BLOCK_JOB_COMPLETED",
                                              "BLOCK_JOB_CANCELLED")
                      and e["data"].get("device") == job_id, 120)
    assert ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"], ev


def read_through_bitbackd(tmp_path, image, raw):
    """bitback reads `image` (qcow2): bitbackd exports it, qemu-img
    compares the export with raw."""
    with Daemon(tmp_path / "reader") as d:
        d.start("--blockdev", f"driver=qcow2,node-name=r,file.driver=file,"
                f"file.filename={image}",
                "--export", "type=nbd,id=e,node-name=r,name=r", nbd=True)
        run(["qemu-img", "compare", "-f", "raw", str(raw), d.nbd_uri("r")])
        d.quit()
    bitback("img", "check", "-f", "qcow2", image)


@pytest.mark.parametrize("kind", ["bitbackd", "qsd"])
@pytest.mark.parametrize("as_txn", [False, True], ids=["command", "transaction"])
def test_drive_backup_compress(tmp_path, kind, as_txn):
    require("qemu-img")
    if kind == "qsd":
        require(QSD)
    size = 16 * MiB
    src = write_file(tmp_path / "src.raw", mixed_data(size, seed=3))
    target = tmp_path / "target.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         "compression_type=zstd", str(target), str(size)])
    with Daemon(tmp_path / kind, binary=QSD if kind == "qsd" else None) as d:
        d.start(*raw_blockdev("d0", src))
        q = d.qmp
        args = {"job-id": "j", "device": "d0", "target": str(target),
                "format": "qcow2", "mode": "existing", "sync": "full",
                "compress": True}
        if as_txn:
            q.cmd("transaction", actions=[{"type": "drive-backup",
                                           "data": args}])
        else:
            q.cmd("drive-backup", args)
        wait_job(q, "j")
        # A raw target cannot take compressed clusters: QEMU's message.
        err = q.error("drive-backup", {**args, "job-id": "j2", "format": "raw",
                                       "mode": "absolute-paths",
                                       "target": str(tmp_path / "t.raw")})
        assert "Compression is not supported for this drive" in err.desc
        d.quit()
    info = qemu_check(target)
    assert info["compressed-clusters"] > 0, info
    assert_same_as_raw(target, src, tmp_path)
    assert stored(target) <= MIXED_MAX * size, stored(target)
    read_through_bitbackd(tmp_path, target, src)


def test_drive_backup_compress_level_and_bad_level(tmp_path):
    size = 4 * MiB
    src = write_file(tmp_path / "src.raw", mixed_data(size, seed=4))
    target = tmp_path / "t.qcow2"
    with Daemon(tmp_path / "d") as d:
        d.start(*raw_blockdev("d0", src))
        q = d.qmp
        err = q.error("drive-backup", {"job-id": "j", "device": "d0",
                                       "target": str(target), "format": "qcow2",
                                       "sync": "full", "compress": True,
                                       "x-compress-level": 99})
        assert "x-compress-level" in err.desc, err.desc
        assert not target.exists()
        # A created qcow2 target: deflate (zlib), QEMU's default.
        q.cmd("drive-backup", {"job-id": "j", "device": "d0",
                               "target": str(target), "format": "qcow2",
                               "sync": "full", "compress": True,
                               "x-compress-level": 19})
        wait_job(q, "j")
        d.quit()
    qemu_check(target)
    assert_same_as_raw(target, src, tmp_path)
    assert stored(target) <= MIXED_MAX * size + 512 * KiB


# -- bitback backup --compress=zstd --------------------------------------

def nbd_write(uri, data, offset):
    h = connect(uri)
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()


def repo_qcow2s(repo):
    return sorted(p for p in repo.rglob("*.qcow2"))


def restore_and_compare(repo, node, at, reference, tmp_path):
    out = tmp_path / f"restored-{at}.raw"
    bitback("restore", "--repo", repo, "--node", node, "--at", at, "-f", "raw",
            out)
    with open(out, "rb") as f:
        assert f.read() == reference, f"backup {at} differs"
    out.unlink()


@pytest.mark.parametrize("mode", ["bitbackd", "qsd", "offline"])
def test_backup_cli_compress(tmp_path, mode):
    require("qemu-img")
    if mode == "qsd":
        require(QSD)
    size = 16 * MiB
    data = bytearray(mixed_data(size, seed=5))
    src = tmp_path / "disk.qcow2"
    bitback("img", "create", "-f", "qcow2", src, str(size))
    raw = write_file(tmp_path / "disk.raw", bytes(data))
    bitback("io", "-f", "qcow2", src, "-c", f"write -q -s {raw} 0 {size}")
    repo = tmp_path / "repo"
    rng = random.Random(6)
    changes = [(rng.randrange(size // BLOCK) * BLOCK + 4096,
                rng.randbytes(16) * 256) for _ in range(8)]
    refs = []

    def apply_changes_offline():
        for off, buf in changes:
            data[off:off + len(buf)] = buf
            part = write_file(tmp_path / f"chg-{off}", buf)
            bitback("io", "-f", "qcow2", src, "-c",
                    f"write -q -s {part} {off} {len(buf)}")

    if mode == "offline":
        bitback("backup", "--image", src, "--node", "disk", "--repo", repo,
                "--compress=zstd:5")
        refs.append(bytes(data))
        apply_changes_offline()
        bitback("backup", "--image", src, "--node", "disk", "--repo", repo,
                "--compress=zstd")
        refs.append(bytes(data))
    else:
        with Daemon(tmp_path / mode,
                    binary=QSD if mode == "qsd" else None) as d:
            cmd = start_qcow2_rw(d, src) + ["--repo", repo]
            bitback(*cmd, "--compress=zstd:7")
            refs.append(bytes(data))
            for off, buf in changes:
                data[off:off + len(buf)] = buf
                nbd_write(d.nbd_uri("disk"), buf, off)
            bitback(*cmd, "--compress=zstd")
            refs.append(bytes(data))
            d.quit()
    listing = json.loads(bitback("list", "--repo", repo,
                                 "--output=json").stdout)
    assert [b["level"] for b in listing] == ["full", "inc"], listing
    for b, ref in zip(listing, refs):
        restore_and_compare(repo, "disk", b["id"], ref, tmp_path)
    files = repo_qcow2s(repo)
    assert len(files) == 2, files
    for f in files:
        info = qemu_check(f)
        assert info["compressed-clusters"] > 0, (f, info)
    # The full backup holds the mixed data compressed.
    assert stored(files[0]) <= MIXED_MAX * size, stored(files[0])
    assert sum(b["stored-bytes"] for b in listing) <= MIXED_MAX * size


def test_backup_compress_option_parsing(tmp_path):
    for bad in ("zstd:0", "zstd:23", "zstd:x", "lz4", "zstd:"):
        p = bitback("backup", "--image", tmp_path / "x.qcow2", "--repo",
                    tmp_path / "repo", f"--compress={bad}", check=False)
        assert p.returncode != 0 and "--compress" in p.stderr, (bad, p.stderr)
    assert "--compress=off|zstd[:LEVEL]" in bitback("backup", "--help").stdout


# -- hostile compressed entries ------------------------------------------

def compressed_image(tmp_path, ctype):
    """A qcow2 made by qemu-img whose first cluster is compressed; returns
    (path, L2 entry offset, the entry, x)."""
    src = write_file(tmp_path / "c.raw", bytes(range(256)) * 256 * 4)
    img = tmp_path / f"c-{ctype}.qcow2"
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
         f"compression_type={ctype}", str(src), str(img)])
    with open(img, "rb") as f:
        h = f.read(104)
        cluster_bits = struct.unpack(">I", h[20:24])[0]
        l1_offset = struct.unpack(">Q", h[40:48])[0]
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
        f.seek(l2)
        entry = struct.unpack(">Q", f.read(8))[0]
    assert entry & (1 << 62), hex(entry)
    return img, l2, entry, 62 - (cluster_bits - 8)


def put(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


@pytest.mark.parametrize("ctype", ["zstd", "zlib"])
def test_hostile_compressed_entries(tmp_path, ctype):
    require("qemu-img")
    img, l2, entry, x = compressed_image(tmp_path, ctype)
    flen = os.path.getsize(img)

    def read_fails():
        p = bitback("io", "-f", "qcow2", "-r", img, "-c", "read 0 64k",
                    check=False, timeout=60)
        assert p.returncode == 1, (p.returncode, p.stderr)
        assert "Input/output error" in p.stderr, p.stderr

    # Sector count running far past the end of the file, data near the end.
    sectors = (1 << (62 - x)) - 1
    put(img, l2, struct.pack(">Q", (1 << 62) | (sectors << x) | (flen - 100)))
    read_fails()
    # Offset past the end of the file.
    put(img, l2, struct.pack(">Q", (1 << 62) | (flen + 4096)))
    read_fails()
    # Valid compressed data that inflates to less than a cluster.
    off = entry & ((1 << x) - 1)
    if ctype == "zlib":
        c = zlib.compressobj(6, zlib.DEFLATED, -12)
        short = c.compress(b"x" * 1000) + c.flush()
    else:
        short = b"\x28\xb5\x2f\xfd" + b"\x00" * 40      # a broken zstd frame
    put(img, off, short)
    put(img, l2, struct.pack(">Q", entry))
    read_fails()
