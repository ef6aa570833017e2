"""End-to-end tests of the offline `bitback` tool (issue 2, section 5).

Every result is checked with a real peer: qemu-img (info, map, compare),
qemu-io (pattern reads of the data file), sha256 of the data file, or an
expected set computed here in Python.
"""
import hashlib
import json
import os
import subprocess

import pytest

from conftest import BITBACK, bitback, require, run

G = 64 * 1024          # bitmap granularity used by the tests
SIZE = 4 * 1024 * 1024


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def info_json(path, fmt=None):
    args = ["img", "info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return json.loads(bitback(*args, str(path)).stdout)


def bitmaps_of(path):
    info = info_json(path)
    return {b["name"]: b for b in info["format-specific"]["data"]["bitmaps"]}


def bitmap_map(path, name):
    out = bitback("img", "map", "--output=json", "--bitmap", name, str(path)).stdout
    return json.loads(out)


def dirty_clusters_from_map(extents, size, gran):
    """Check the extents tile [0, size) and return the set of dirty clusters."""
    pos = 0
    dirty = set()
    for e in extents:
        assert set(e) == {"start", "length", "dirty"}, e
        assert e["start"] == pos, f"gap or overlap at {pos}: {e}"
        assert e["length"] > 0
        if e["dirty"]:
            assert e["start"] % gran == 0, e
            first = e["start"] // gran
            last = (e["start"] + e["length"] - 1) // gran
            dirty.update(range(first, last + 1))
        pos += e["length"]
    assert pos == size, f"extents cover {pos} bytes, image has {size}"
    # Adjacent extents alternate (they are merged).
    for a, b in zip(extents, extents[1:]):
        assert a["dirty"] != b["dirty"], (a, b)
    return dirty


def clusters_of(writes, gran):
    s = set()
    for off, length in writes:
        s.update(range(off // gran, (off + length - 1) // gran + 1))
    return s


def make_qbm_over_raw(tmp_path, size=SIZE, name="disk"):
    raw = tmp_path / f"{name}.raw"
    qbm = tmp_path / f"{name}.qbm"
    run(["qemu-img", "create", "-f", "raw", raw, str(size)])
    bitback("img", "create", "-f", "qbm", "-o", f"data-file={raw}", str(qbm))
    return raw, qbm


def io_cmds(writes, pattern):
    cmds = []
    for off, length in writes:
        cmds += ["-c", f"write -P {pattern} {off} {length}"]
    return cmds


# Known writes, some unaligned and one crossing a cluster boundary.
WRITES = [
    (0, 512),
    (3 * G + 100, 5000),
    (16 * G - 1, 2),            # crosses clusters 15 and 16
    (40 * G + 4096, G),         # crosses 40 and 41
    (SIZE - 4096, 4096),        # last cluster
]


# 1 -------------------------------------------------------------------------
def test_bitmap_records_exactly_the_written_clusters(tmp_path):
    require("qemu-io")
    raw, qbm = make_qbm_over_raw(tmp_path)
    bitback("bitmap", "--add", "-g", "64K", str(qbm), "b0")

    bm = bitmaps_of(qbm)["b0"]
    assert bm["count"] == 0 and bm["granularity"] == G
    assert bm["inconsistent"] is False and bm["persistent"] is True
    assert "auto" in bm["flags"] and "in-use" not in bm["flags"]
    assert dirty_clusters_from_map(bitmap_map(qbm, "b0"), SIZE, G) == set()

    p = bitback("io", "-f", "qbm", str(qbm), *io_cmds(WRITES, "0x5a"))
    for off, length in WRITES:
        assert f"wrote {length}/{length} bytes at offset {off}" in p.stdout

    expected = clusters_of(WRITES, G)
    # Each of these runs is a new process that reopens the image.
    for _ in range(2):
        assert dirty_clusters_from_map(bitmap_map(qbm, "b0"), SIZE, G) == expected
        bm = bitmaps_of(qbm)["b0"]
        assert bm["count"] == len(expected) * G
        assert bm["inconsistent"] is False
        assert "in-use" not in bm["flags"]
        assert "inconsistent-reason" not in bm
    assert bitback("img", "check", str(qbm)).returncode == 0

    # The data really went to the data file, at the same offsets.
    for off, length in WRITES:
        run(["qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x5a {off} {length}", raw])
    run(["qemu-io", "-f", "raw", "-r", "-c", f"read -P 0 {G} {G}", raw])

    # A second session adds to the bitmap; reads do not mark it.
    more = [(20 * G + 7, 3)]
    bitback("io", str(qbm), "-c", f"read 0 {SIZE}", *io_cmds(more, "0x11"))
    expected |= clusters_of(more, G)
    assert dirty_clusters_from_map(bitmap_map(qbm, "b0"), SIZE, G) == expected
    assert bitmaps_of(qbm)["b0"]["count"] == len(expected) * G

    # Human output names the bitmap and its count.
    human = bitback("img", "info", str(qbm)).stdout
    assert "b0" in human and str(len(expected) * G) in human


def test_disabled_bitmap_does_not_record(tmp_path):
    raw, qbm = make_qbm_over_raw(tmp_path)
    bitback("bitmap", "--add", "--disable", str(qbm), "off")
    bitback("bitmap", "--add", str(qbm), "on")
    bitback("io", str(qbm), "-c", "write 0 1")
    bms = bitmaps_of(qbm)
    assert bms["off"]["count"] == 0 and "auto" not in bms["off"]["flags"]
    assert bms["on"]["count"] == G and "auto" in bms["on"]["flags"]


# 2 -------------------------------------------------------------------------
def test_data_identical_with_and_without_wrapper(tmp_path):
    require("qemu-io")
    require("qemu-img")
    raw, qbm = make_qbm_over_raw(tmp_path)
    plain = tmp_path / "plain.raw"
    run(["qemu-img", "create", "-f", "raw", plain, str(SIZE)])
    bitback("bitmap", "--add", str(qbm), "b0")

    cmds = [
        "write -P 0xab 0 1M",
        "write -P 0xcd 12345 67890",
        "write -z 512K 64K",
        "write -P 0x01 3M 1",
        "write -P 0xee 4190208 4096",
    ]
    qargs = []
    for c in cmds:
        qargs += ["-c", c]
    run(["qemu-io", "-f", "raw", *qargs, plain])
    bitback("io", "-f", "qbm", str(qbm), *qargs)

    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", raw, plain], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Images are identical" in p.stdout

    # A different write makes compare notice: the check can fail.
    bitback("io", str(qbm), "-c", "write -P 0x77 2M 1")
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", raw, plain], check=False)
    assert p.returncode == 1
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 2M 1", plain])

    # Bitmap operations never change data.
    before = sha256(raw)
    gen0 = bitmaps_of(qbm)["b0"]["generation"]
    assert bitmaps_of(qbm)["b0"]["count"] > 0

    bitback("bitmap", "--add", "-g", "128K", str(qbm), "b1")
    assert sha256(raw) == before

    bitback("bitmap", "--add", str(qbm), "copy")
    bitback("bitmap", "--merge", "b0", str(qbm), "copy")
    assert bitmap_map(qbm, "copy") == bitmap_map(qbm, "b0")
    assert sha256(raw) == before

    bitback("bitmap", "--clear", str(qbm), "b0")
    b0 = bitmaps_of(qbm)["b0"]
    assert b0["count"] == 0 and b0["generation"] != gen0
    assert sha256(raw) == before

    bitback("bitmap", "--disable", str(qbm), "b0")
    assert "auto" not in bitmaps_of(qbm)["b0"]["flags"]
    bitback("bitmap", "--enable", str(qbm), "b0")
    assert "auto" in bitmaps_of(qbm)["b0"]["flags"]
    assert sha256(raw) == before

    # Merge from another file (read-only source).
    oraw, oqbm = make_qbm_over_raw(tmp_path, name="other")
    bitback("bitmap", "--add", str(oqbm), "s0")
    bitback("io", str(oqbm), "-c", f"write {10 * G} 1")
    osha = sha256(oraw)
    bitback("bitmap", "--merge", "s0", "-b", str(oqbm), "-F", "qbm", str(qbm), "b0")
    assert dirty_clusters_from_map(bitmap_map(qbm, "b0"), SIZE, G) == {10}
    assert sha256(raw) == before and sha256(oraw) == osha

    # Several operations in one call, applied in order.
    bitback("bitmap", "--clear", "--disable", str(qbm), "copy")
    c = bitmaps_of(qbm)["copy"]
    assert c["count"] == 0 and "auto" not in c["flags"]

    bitback("bitmap", "--remove", str(qbm), "b1")
    bitback("bitmap", "--remove", str(qbm), "copy")
    assert set(bitmaps_of(qbm)) == {"b0"}
    assert sha256(raw) == before

    # Failing operations: clear error, non-zero exit, data untouched.
    for args in (["--remove", str(qbm), "nope"],
                 ["--add", str(qbm), "b0"],
                 ["--add", "-g", "1000", str(qbm), "odd"],
                 ["--merge", "nope", str(qbm), "b0"]):
        p = bitback("bitmap", *args, check=False)
        assert p.returncode == 1, args
        assert p.stderr.startswith("bitback: ") and p.stderr.count("\n") == 1, p.stderr
    assert sha256(raw) == before
    assert set(bitmaps_of(qbm)) == {"b0"}


# 3 -------------------------------------------------------------------------
def test_img_create_raw_and_qbm(tmp_path):
    require("qemu-img")
    raw = tmp_path / "a.raw"
    p = bitback("img", "create", "-f", "raw", str(raw), "3M")
    assert f"Formatting '{raw}', fmt=raw size={3 << 20}" in p.stdout
    qi = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", raw]).stdout)
    assert qi["virtual-size"] == 3 << 20
    assert os.stat(raw).st_blocks == 0          # sparse

    info = info_json(raw)
    assert info["format"] == "raw"
    assert info["virtual-size"] == 3 << 20
    assert info["filename"] == str(raw)
    assert info["actual-size"] == os.stat(raw).st_blocks * 512
    assert info["dirty-flag"] is False

    # qbm: the data file defaults to NAME.raw, created sparse.
    qbm = tmp_path / "b.qbm"
    p = bitback("img", "create", "-f", "qbm", str(qbm), "2M")
    assert "fmt=qbm" in p.stdout
    data = tmp_path / "b.raw"
    assert data.exists() and os.path.getsize(data) == 2 << 20
    info = info_json(qbm)
    assert info["format"] == "qbm"
    assert info["virtual-size"] == 2 << 20
    assert isinstance(info["actual-size"], int)
    assert info["dirty-flag"] is False
    fs = info["format-specific"]
    assert fs["type"] == "qbm"
    assert fs["data"]["bitmaps"] == []

    bitback("bitmap", "--add", "-g", "1M", str(qbm), "x")
    b = info_json(qbm)["format-specific"]["data"]["bitmaps"]
    assert len(b) == 1
    for key in ("name", "granularity", "flags", "count", "inconsistent",
                "generation", "persistent"):
        assert key in b[0], key
    assert b[0]["granularity"] == 1 << 20
    # probing recognises the descriptor
    assert info_json(qbm)["format"] == "qbm"


def test_map_agrees_with_qemu_img_on_sparse_raw(tmp_path):
    require("qemu-img")
    require("qemu-io")
    raw = tmp_path / "s.raw"
    bitback("img", "create", "-f", "raw", str(raw), "8M")
    run(["qemu-io", "-f", "raw",
         "-c", "write -P 1 0 64K",
         "-c", "write -P 2 1M 128K",
         "-c", "write -P 3 5M 4K",
         "-c", "write -P 4 8128K 64K", raw])

    ours = json.loads(bitback("img", "map", "--output=json", "-f", "raw", str(raw)).stdout)
    theirs = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", raw]).stdout)
    for e in ours:
        assert {"start", "length", "depth", "present", "zero", "data"} <= set(e)
        assert e["depth"] == 0 and e["present"] is True

    def key(lst):
        return [(e["start"], e["length"], e["data"], e["zero"]) for e in lst]

    assert key(ours) == key(theirs)
    data = [(e["start"], e["length"]) for e in ours if e["data"]]
    assert data == [(0, 64 << 10), (1 << 20, 128 << 10), (5 << 20, 4 << 10),
                    (8128 << 10, 64 << 10)]

    human = bitback("img", "map", str(raw)).stdout
    assert "0x100000" in human


def test_map_depth_on_overlay(tmp_path):
    """An overlay over a backing image: depth 0 where the overlay holds data,
    depth 1 where reads come from the backing image."""
    require("qemu-io")
    base = tmp_path / "base.raw"
    run(["qemu-img", "create", "-f", "raw", base, "1M"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xbb 0 1M", base])
    top = tmp_path / "top.qbm"
    bitback("img", "create", "-f", "qbm", "-o", f"backing={base},backing-format=raw",
            str(top))
    bitback("io", str(top), "-c", f"write -P 0x77 {2 * G} {G}")
    ext = json.loads(bitback("img", "map", "--output=json", str(top)).stdout)
    assert [(e["start"], e["length"], e["depth"], e["data"]) for e in ext] == [
        (0, 2 * G, 1, True), (2 * G, G, 0, True), (3 * G, (1 << 20) - 3 * G, 1, True)]
    info = info_json(top)
    assert info["backing-filename-format"] == "raw"
    assert os.path.samefile(info["full-backing-filename"], base)
    # Reads: the overlay's data where written, the backing data elsewhere.
    bitback("io", "-r", str(top), "-c", f"read -P 0xbb 0 {2 * G}",
            "-c", f"read -P 0x77 {2 * G} {G}",
            "-c", f"read -P 0xbb {3 * G} {(1 << 20) - 3 * G}")


# 4 -------------------------------------------------------------------------
def test_io_pattern_mismatch_and_bad_commands(tmp_path):
    raw = tmp_path / "io.raw"
    bitback("img", "create", "-f", "raw", str(raw), "1M")
    bitback("io", "-f", "raw", str(raw), "-c", "write -P 0xab 1000 3000")
    ok = bitback("io", "-f", "raw", str(raw), "-c", "read -P 0xab 1000 3000")
    assert "read 3000/3000 bytes at offset 1000" in ok.stdout

    p = bitback("io", "-f", "raw", str(raw), "-c", "read -P 0xcd 1000 10", check=False)
    assert p.returncode != 0 and p.returncode > 0
    assert "Pattern verification failed at offset 1000, 10 bytes" in p.stdout + p.stderr

    # The mismatch is found even when it is only in the last byte.
    p = bitback("io", "-f", "raw", str(raw), "-c", "read -P 0xab 1000 3001", check=False)
    assert p.returncode == 1 and "Pattern verification failed" in p.stderr

    bad = [
        ("frobnicate 0 1", "unknown command"),
        ("read 1M 1", "beyond the end"),
        ("write 1048000 1000", "beyond the end"),
        ("read 0", "expected OFFSET and LENGTH"),
        ("write -P 0x1ff 0 1", "Invalid pattern"),
        ("write -Q 0 1", "invalid option"),
        ("read 1X 1", "offset"),
        ("write -z -P 1 0 1", "cannot be used together"),
    ]
    for cmd, msg in bad:
        p = bitback("io", "-f", "raw", str(raw), "-c", cmd, check=False)
        assert p.returncode == 1, cmd
        assert msg in p.stderr, (cmd, p.stderr)
        assert p.stderr.startswith("bitback: ")

    # Write through -r fails and does not change the file.
    before = sha256(raw)
    p = bitback("io", "-r", str(raw), "-c", "write 0 1", check=False)
    assert p.returncode == 1 and "read-only" in p.stderr
    assert sha256(raw) == before

    # Zero writes and discards read back as zeroes; a write larger than one
    # request is split and lands whole.
    bitback("io", str(raw), "-c", "write -z 1000 100", "-c", "discard 2000 500",
            "-c", "flush")
    run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0 1000 100",
         "-c", "read -P 0 2000 500", "-c", "read -P 0xab 1100 900", raw])

    big = tmp_path / "big.raw"
    bitback("img", "create", "-f", "raw", str(big), "80M")
    bitback("io", str(big), "-c", "write -P 0x42 1 70M")
    run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x42 1 70M",
         "-c", "read -P 0 0 1", "-c", f"read -P 0 {70 * 2**20 + 1} 4096", big])


# 5 -------------------------------------------------------------------------
@pytest.mark.parametrize("size,expected", [
    ("512", 512), ("1K", 1024), ("64k", 65536), ("2M", 2 << 20),
    ("1G", 1 << 30), ("1T", 1 << 40), ("1.5M", 3 << 19), ("4096B", 4096),
])
def test_size_suffixes(tmp_path, size, expected):
    f = tmp_path / "s.raw"
    bitback("img", "create", "-f", "raw", str(f), size)
    assert os.path.getsize(f) == expected
    qi = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", f]).stdout)
    assert qi["virtual-size"] == expected


def one_line_error(p):
    assert p.returncode > 0, p            # an error, not a signal
    assert p.stderr.startswith("bitback: "), p.stderr
    assert p.stderr.count("\n") == 1, p.stderr


def test_bad_input_gives_clear_errors(tmp_path):
    f = tmp_path / "x.raw"
    for size in ("12X", "abc", "", "1.2.3", "99E", "-1K"):
        args = ["img", "create", "-f", "raw", str(f), "--", size] if size.startswith("-") \
            else ["img", "create", "-f", "raw", str(f), size]
        p = bitback(*args, check=False)
        one_line_error(p)
        assert not f.exists(), size

    p = bitback("img", "create", "-f", "vmdk9", str(f), "1M", check=False)
    one_line_error(p)
    assert "Unknown file format 'vmdk9'" in p.stderr
    assert not f.exists()

    missing = tmp_path / "missing.qbm"
    for args in (["img", "info", str(missing)],
                 ["img", "map", str(missing)],
                 ["img", "check", str(missing)],
                 ["bitmap", "--add", str(missing), "b0"],
                 ["io", str(missing), "-c", "read 0 1"]):
        p = bitback(*args, check=False)
        one_line_error(p)
        assert "missing.qbm" in p.stderr, args
    assert not missing.exists()

    bitback("img", "create", "-f", "raw", str(f), "1M")
    for args in (["img", "info", "-f", "nosuch", str(f)],
                 ["img", "info", "--output=xml", str(f)],
                 ["img", "frob", str(f)],
                 ["nosuchcommand"],
                 ["bitmap", str(f), "b0"],
                 ["bitmap", "--add", str(f), "b0"],      # raw: no persistent bitmaps
                 ["img", "map", "--bitmap", "nope", str(f)],
                 ["io", str(f)]):
        p = bitback(*args, check=False)
        one_line_error(p)

    p = bitback("--version")
    assert p.stdout.startswith("bitback version ")
    for h in (["--help"], ["help"]):
        assert "img create" in bitback(*h).stdout


def test_img_shared_options(tmp_path):
    """img info, map and check parse -h, -f, -U, --output and the one file
    name the same way (img.c img_parse_opt, img_one_file)."""
    f = tmp_path / "s.raw"
    bitback("img", "create", "-f", "raw", str(f), "1M")
    for cmd in ("info", "map", "check"):
        p = bitback("img", cmd, "-h")
        assert p.returncode == 0 and "img create" in p.stdout, (cmd, p)
        p = bitback("img", cmd, "-f", "raw", "-U", "--output=json", str(f))
        json.loads(p.stdout)
        p = bitback("img", cmd, "--output=xml", str(f), check=False)
        one_line_error(p)
        assert "--output must be either 'human' or 'json', not 'xml'" in \
            p.stderr, (cmd, p.stderr)
        for names in ([], [str(f), str(f)]):
            p = bitback("img", cmd, *names, check=False)
            assert p.returncode == 1, (cmd, p)
            assert p.stderr == ("bitback: img %s: expecting exactly one "
                                "file name\n" % cmd), (cmd, p.stderr)
        p = bitback("img", cmd, "--no-such-option", str(f), check=False)
        assert p.returncode == 1 and "no-such-option" in p.stderr, (cmd, p)
        assert p.stdout == "", (cmd, p.stdout)


def test_failed_create_leaves_nothing(tmp_path):
    qbm = tmp_path / "w.qbm"
    # Wrapping a data file that does not exist.
    p = bitback("img", "create", "-f", "qbm", "-o", f"data-file={tmp_path}/none.raw",
                str(qbm), check=False)
    one_line_error(p)
    assert sorted(os.listdir(tmp_path)) == []

    # A size that does not match the existing data file.
    raw = tmp_path / "d.raw"
    run(["qemu-img", "create", "-f", "raw", raw, "1M"])
    before = sha256(raw)
    p = bitback("img", "create", "-f", "qbm", "-o", f"data-file={raw}", str(qbm), "2M",
                check=False)
    one_line_error(p)
    assert sorted(os.listdir(tmp_path)) == ["d.raw"]
    assert sha256(raw) == before and os.path.getsize(raw) == 1 << 20

    # A granularity that is not a power of two.
    p = bitback("img", "create", "-f", "qbm", "-o", "granularity=1000",
                "-o", f"backing={raw}", str(qbm), check=False)
    one_line_error(p)
    assert sorted(os.listdir(tmp_path)) == ["d.raw"]


def test_check(tmp_path):
    raw = tmp_path / "c.raw"
    bitback("img", "create", "-f", "raw", str(raw), "1M")
    p = bitback("img", "check", str(raw))
    assert "No errors were found on the image." in p.stdout
    _, qbm = make_qbm_over_raw(tmp_path)
    bitback("bitmap", "--add", str(qbm), "b0")
    p = bitback("img", "check", str(qbm))
    assert "No errors were found on the image." in p.stdout


def test_sigkill_leaves_bitmap_inconsistent(tmp_path):
    """A writer killed while the image is open: the bitmap is reported
    inconsistent with a reason, check flags it, and it can be removed."""
    raw, qbm = make_qbm_over_raw(tmp_path)
    bitback("bitmap", "--add", str(qbm), "b0")
    proc = subprocess.Popen([BITBACK, "io", str(qbm), "-c", "write -P 0x33 0 64K",
                             "-c", "sleep 60000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("wrote 65536/65536"), line + proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()

    # Crash-safe (the default): recovered from the write-intent log.
    bm = bitmaps_of(qbm)["b0"]
    assert bm["inconsistent"] is False and bm["recovered"] is True, bm
    assert bm["count"] >= 64 * 1024
    # Without the log (lost, or crash-safe=off) the clean flag decides.
    os.unlink(str(qbm) + ".wil")
    bm = bitmaps_of(qbm)["b0"]
    assert bm["inconsistent"] is True
    assert "in-use" in bm["flags"] and "auto" not in bm["flags"]
    assert bm["inconsistent-reason"]
    assert "inconsistent" in bitback("img", "info", str(qbm)).stdout

    p = bitback("img", "check", str(qbm), check=False)
    assert p.returncode == 3
    assert "b0" in p.stderr and "inconsistent" in p.stderr

    p = bitback("img", "map", "--bitmap", "b0", str(qbm), check=False)
    one_line_error(p)
    p = bitback("bitmap", "--clear", str(qbm), "b0", check=False)
    assert p.returncode == 1

    # The data write itself landed before the kill.
    run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 0 64K", raw])

    bitback("bitmap", "--remove", str(qbm), "b0")
    assert bitmaps_of(qbm) == {}
    assert bitback("img", "check", str(qbm)).returncode == 0


@pytest.mark.parametrize("fmt", ["qbm", "qcow2"])
def test_img_create_rejects_unknown_options(tmp_path, fmt):
    """An unknown -o key is named in the error; nothing is created."""
    out = tmp_path / f"x.{fmt}"
    p = bitback("img", "create", "-f", fmt, "-o", "bogus=1", str(out), "1M",
                check=False)
    assert p.returncode == 1
    assert f"Invalid parameter 'bogus' for format {fmt}" in p.stderr, p.stderr
    assert not out.exists()
