"""QBM format tests: on-disk layout, bad input, crash safety, overlays.

Each bad-input case corrupts a real image with Python, then checks that
`bitback` gives a clear error (a failed open with a message, or a bitmap
reported inconsistent with a reason that names the problem) and does not
crash (no signal, no sanitizer report).  The layout tests read the files
byte by byte against docs/specs/qbm.md; checksums are recomputed with the
system's libxxhash, independently of our code.
"""
import json
import os
import select
import signal
import struct
import subprocess
import time

import pytest

from conftest import BITBACK, bitback, require, run, xxh3_64

K = 1024
M = 1024 * 1024
HEADER = 4096
MAGIC = b"QBMBITS\n"
CLEAN = 1


# ------------------------------------------------------------------ helpers

def no_crash(p):
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {p.stderr}"
    assert "AddressSanitizer" not in p.stderr, p.stderr
    assert "runtime error" not in p.stderr, p.stderr
    assert "LeakSanitizer" not in p.stderr, p.stderr


def bb(*args):
    p = bitback(*args, check=False)
    no_crash(p)
    return p


def info(path):
    p = bb("img", "info", "--output=json", path)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def bitmaps(path):
    return {b["name"]: b for b in
            info(path)["format-specific"]["data"].get("bitmaps", [])}


def descriptor(path):
    with open(path) as f:
        return json.load(f)


def write_descriptor(path, d):
    with open(path, "w") as f:
        json.dump(d, f)


def bitmap_file(img, name):
    d = descriptor(img)
    for b in d["QBM"]["bitmaps"]:
        if b["name"] == name:
            return os.path.join(os.path.dirname(img), b["file"])
    raise KeyError(name)


def read_header(path):
    with open(path, "rb") as f:
        h = f.read(HEADER)
    magic = h[0:8]
    version, hsize, flags, shift = struct.unpack_from("<IIII", h, 8)
    image_size, data_size, checksum = struct.unpack_from("<QQQ", h, 24)
    gen = h[48:84].decode()
    return dict(magic=magic, version=version, header_size=hsize, flags=flags,
                shift=shift, image_size=image_size, data_size=data_size,
                checksum=checksum, generation=gen)


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def dirty_clusters(bits, nb):
    return [i for i in range(nb) if bits[i // 8] >> (i % 8) & 1]


def make_image(tmp_path, size="1M", name="disk.qbm", gran="64K", add=("b0",)):
    img = str(tmp_path / name)
    bb_ok("img", "create", "-f", "qbm", img, size)
    for b in add:
        bb_ok("bitmap", "--add", "-g", gran, img, b)
    return img


def bb_ok(*args):
    p = bb(*args)
    assert p.returncode == 0, f"bitback {' '.join(args)}: {p.stderr}"
    return p


def read_checks(img, expected, extra=()):
    """Verify every byte of the image against `expected` with read -P runs."""
    cmds = []
    i = 0
    while i < len(expected):
        j = i
        while j < len(expected) and expected[j] == expected[i]:
            j += 1
        cmds += ["-c", f"read -q -P 0x{expected[i]:02x} {i} {j - i}"]
        i = j
    p = bb("io", *extra, img, *cmds)
    assert p.returncode == 0, p.stdout + p.stderr


# ------------------------------------------------------------------ layout

def test_create_layout(tmp_path):
    img = make_image(tmp_path, add=())
    raw = tmp_path / "disk.raw"
    assert raw.stat().st_size == M
    d = descriptor(img)
    assert list(d) == ["QBM"]
    assert d["QBM"]["version"] == 1
    assert d["QBM"]["size"] == M
    assert d["QBM"]["data"] == {"file": "disk.raw", "format": "raw"}
    i = info(img)
    assert i["format"] == "qbm"
    assert i["virtual-size"] == M
    assert i["format-specific"]["data"]["data-file"] == "disk.raw"
    # The descriptor starts with the marker so probing needs no parse.
    assert open(img).read().lstrip().startswith('{')


def test_bitmap_file_layout_and_persistence(tmp_path):
    img = make_image(tmp_path, size="4M")
    bb_ok("io", img, "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 1M 100k")
    path = bitmap_file(img, "b0")
    h = read_header(path)
    assert h["magic"] == MAGIC
    assert h["version"] == 1 and h["header_size"] == HEADER
    assert h["flags"] == CLEAN
    assert h["shift"] == 16
    assert h["image_size"] == 4 * M
    nb = 4 * M // (64 * K)
    assert h["data_size"] == nb // 8
    assert os.path.getsize(path) == HEADER + nb // 8
    with open(path, "rb") as f:
        f.seek(HEADER)
        bits = f.read()
    assert h["checksum"] == xxh3_64(bits)
    # 0..64K -> cluster 0; 1M..1M+100K -> clusters 16 and 17.
    assert dirty_clusters(bits, nb) == [0, 16, 17]
    b = bitmaps(img)["b0"]
    assert b["inconsistent"] is False
    assert b["count"] == 3 * 64 * K
    # Reopen again: still consistent, same generation.
    gen = h["generation"]
    bb_ok("io", img, "-c", "read 0 4k")
    assert read_header(path)["generation"] == gen
    assert bitmaps(img)["b0"]["count"] == 3 * 64 * K


def test_large_image_bitmap_is_small(tmp_path):
    img = make_image(tmp_path, size="1T")
    path = bitmap_file(img, "b0")
    # 1 TiB at 64 KiB: 2 MiB of bits plus the 4 KiB header.
    assert os.path.getsize(path) == HEADER + 2 * M
    assert (tmp_path / "disk.raw").stat().st_blocks < 1024   # sparse


def test_clear_changes_generation(tmp_path):
    img = make_image(tmp_path)
    path = bitmap_file(img, "b0")
    g1 = read_header(path)["generation"]
    bb_ok("io", img, "-c", "write 0 4k")
    bb_ok("bitmap", "--clear", img, "b0")
    h = read_header(path)
    assert h["generation"] != g1
    assert h["flags"] == CLEAN
    assert bitmaps(img)["b0"]["count"] == 0


def test_disable_is_stored_in_descriptor(tmp_path):
    img = make_image(tmp_path)
    bb_ok("bitmap", "--disable", img, "b0")
    assert descriptor(img)["QBM"]["bitmaps"][0]["recording"] is False
    bb_ok("io", img, "-c", "write 0 4k")
    assert bitmaps(img)["b0"]["count"] == 0
    bb_ok("bitmap", "--enable", img, "b0")
    assert descriptor(img)["QBM"]["bitmaps"][0]["recording"] is True


def test_remove_deletes_file_and_entry(tmp_path):
    img = make_image(tmp_path, add=("b0", "b1"))
    path = bitmap_file(img, "b0")
    bb_ok("bitmap", "--remove", img, "b0")
    assert not os.path.exists(path)
    assert [b["name"] for b in descriptor(img)["QBM"]["bitmaps"]] == ["b1"]
    assert not os.path.exists(img + ".tmp")


def test_data_identical_to_plain_raw(tmp_path):
    require("qemu-img")
    require("qemu-io")
    img = make_image(tmp_path, size="4M", add=("b0", "b1"))
    plain = tmp_path / "plain.raw"
    run(["qemu-img", "create", "-f", "raw", plain, "4M"])
    writes = ["write -P 0xab 0 64k", "write -P 0x11 100k 3k",
              "write -P 0x5a 3M 1M", "write -z 3584k 4k"]
    args = sum((["-c", w] for w in writes), [])
    bb_ok("io", img, *args)
    bb_ok("bitmap", "--clear", img, "b1")
    run(["qemu-io", "-f", "raw", *args, plain])
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
             tmp_path / "disk.raw", plain], check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_wrap_existing_raw(tmp_path):
    require("qemu-io")
    raw = tmp_path / "existing.raw"
    raw.write_bytes(b"\x77" * (192 * K))
    img = str(tmp_path / "wrap.qbm")
    bb_ok("img", "create", "-f", "qbm", "-o", f"data-file={raw}", img)
    assert info(img)["virtual-size"] == 192 * K
    assert raw.read_bytes() == b"\x77" * (192 * K)    # not copied, not changed
    read_checks(img, b"\x77" * (192 * K))
    p = bb("img", "create", "-f", "qbm", "-o", f"data-file={raw}",
           str(tmp_path / "w2.qbm"), "1M")
    assert p.returncode != 0
    assert "does not match" in p.stderr


# ------------------------------------------------------------------ bad input

def assert_inconsistent(img, name, *words):
    b = bitmaps(img)[name]
    assert b["inconsistent"] is True
    reason = b.get("inconsistent-reason", "")
    for w in words:
        assert w in reason, reason
    # It can only be removed, and removal works.
    path = bitmap_file(img, name)
    p = bb("bitmap", "--clear", img, name)
    assert p.returncode != 0
    bb_ok("bitmap", "--remove", img, name)
    assert name not in bitmaps(img)
    assert not os.path.exists(path)
    assert name not in [b["name"] for b in descriptor(img)["QBM"]["bitmaps"]]


def dirty_image(tmp_path):
    img = make_image(tmp_path)
    bb_ok("io", img, "-c", "write -P 0xab 0 64k")
    return img


def test_truncated_bitmap(tmp_path):
    img = dirty_image(tmp_path)
    path = bitmap_file(img, "b0")
    os.truncate(path, HEADER + 1)
    assert_inconsistent(img, "b0", "truncated", "4097")


def test_truncated_header(tmp_path):
    img = dirty_image(tmp_path)
    os.truncate(bitmap_file(img, "b0"), 100)
    assert_inconsistent(img, "b0", "truncated")


def test_wrong_magic(tmp_path):
    img = dirty_image(tmp_path)
    patch(bitmap_file(img, "b0"), 0, b"NOTQBM!!")
    assert_inconsistent(img, "b0", "wrong magic")


def test_checksum_mismatch(tmp_path):
    img = dirty_image(tmp_path)
    patch(bitmap_file(img, "b0"), HEADER + 1, b"\x80")
    p = bb("img", "check", img)
    assert p.returncode != 0
    assert "checksum mismatch" in p.stdout + p.stderr
    assert_inconsistent(img, "b0", "checksum mismatch")


def test_size_mismatch_header(tmp_path):
    img = dirty_image(tmp_path)
    patch(bitmap_file(img, "b0"), 24, struct.pack("<Q", 2 * M))
    assert_inconsistent(img, "b0", "size mismatch")


def test_size_mismatch_file_length(tmp_path):
    img = dirty_image(tmp_path)
    with open(bitmap_file(img, "b0"), "ab") as f:
        f.write(b"\0" * 10)
    assert_inconsistent(img, "b0", "size mismatch")


def test_not_clean(tmp_path):
    img = dirty_image(tmp_path)
    patch(bitmap_file(img, "b0"), 16, struct.pack("<I", 0))
    assert_inconsistent(img, "b0", "not closed cleanly")


def test_missing_bitmap_file(tmp_path):
    img = dirty_image(tmp_path)
    os.unlink(bitmap_file(img, "b0"))
    b = bitmaps(img)["b0"]
    assert b["inconsistent"] and "missing" in b["inconsistent-reason"]
    bb_ok("bitmap", "--remove", img, "b0")
    assert descriptor(img)["QBM"]["bitmaps"] == []


def test_inconsistent_bitmap_stays_inconsistent(tmp_path):
    img = dirty_image(tmp_path)
    patch(bitmap_file(img, "b0"), 16, struct.pack("<I", 0))
    # Opening for writing and closing again must not make it clean.
    bb_ok("io", img, "-c", "write 0 4k")
    assert bitmaps(img)["b0"]["inconsistent"] is True
    assert read_header(bitmap_file(img, "b0"))["flags"] == 0


def dirty_image_with_bitmap(tmp_path, key, value):
    """dirty_image() with b0's descriptor entry KEY set to VALUE."""
    img = dirty_image(tmp_path)
    d = descriptor(img)
    d["QBM"]["bitmaps"][0][key] = value
    write_descriptor(img, d)
    return img


def info_fails(img):
    """`bitback img info IMG` fails; returns its stderr."""
    p = bb("img", "info", img)
    assert p.returncode != 0
    return p.stderr


@pytest.mark.parametrize("name", ["../evil.bm", "/tmp/evil.bm", "..", "a/b.bm"])
def test_traversal_path(tmp_path, name):
    img = dirty_image_with_bitmap(tmp_path, "file", name)
    assert "not a plain name" in info_fails(img)
    p = bb("bitmap", "--remove", img, "b0")
    assert p.returncode != 0
    assert not os.path.exists(tmp_path.parent / "evil.bm")


def test_traversal_allocation_path(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * M)
    img = str(tmp_path / "ov.qbm")
    bb_ok("img", "create", "-f", "qbm", "-o", "backing=base.raw,backing-format=raw", img)
    d = descriptor(img)
    d["QBM"]["allocation"]["file"] = "../x.bm"
    write_descriptor(img, d)
    p = bb("io", img, "-c", "write 0 4k")
    assert p.returncode != 0
    assert "not a plain name" in p.stderr


@pytest.mark.parametrize("cut", [1, 10, 30, -1, -5])
def test_malformed_json(tmp_path, cut):
    img = dirty_image(tmp_path)
    text = open(img).read()
    with open(img, "w") as f:
        f.write(text[:cut] if cut > 0 else text[:cut] + "}}]")
    p = bb("img", "info", "-f", "qbm", img)
    assert p.returncode != 0
    assert "malformed JSON" in p.stderr or "not a QBM descriptor" in p.stderr, p.stderr


def test_descriptor_garbage(tmp_path):
    img = dirty_image(tmp_path)
    with open(img, "wb") as f:
        f.write(b'{"QBM": ' + os.urandom(3000))
    p = bb("img", "info", "-f", "qbm", img)
    assert p.returncode != 0
    assert "malformed JSON" in p.stderr or "invalid QBM descriptor" in p.stderr


def test_descriptor_too_large(tmp_path):
    img = dirty_image(tmp_path)
    d = descriptor(img)
    d["QBM"]["pad"] = "x" * (2 * M)
    write_descriptor(img, d)
    p = bb("img", "info", "-f", "qbm", img)
    assert p.returncode != 0
    assert "too large" in p.stderr


@pytest.mark.parametrize("gran", [65535, 0, -4096, 256, 1 << 32, 3 * 65536])
def test_granularity_not_power_of_two(tmp_path, gran):
    img = dirty_image_with_bitmap(tmp_path, "granularity", gran)
    err = info_fails(img)
    assert "granularity" in err and "power of two" in err, err


def test_granularity_mismatch_with_file(tmp_path):
    img = dirty_image_with_bitmap(tmp_path, "granularity", 128 * K)
    assert_inconsistent(img, "b0", "granularity")


def test_bad_header_fields(tmp_path):
    img = make_image(tmp_path, add=("v", "h", "s", "f", "g"))
    patch(bitmap_file(img, "v"), 8, struct.pack("<I", 7))
    patch(bitmap_file(img, "h"), 12, struct.pack("<I", 512))
    patch(bitmap_file(img, "s"), 20, struct.pack("<I", 40))
    patch(bitmap_file(img, "f"), 16, struct.pack("<I", 0x81))
    patch(bitmap_file(img, "g"), 48, b"not-a-uuid")
    bms = bitmaps(img)
    assert "version 7" in bms["v"]["inconsistent-reason"]
    assert "header size" in bms["h"]["inconsistent-reason"]
    assert "granularity" in bms["s"]["inconsistent-reason"]
    assert "unknown flags" in bms["f"]["inconsistent-reason"]
    assert "generation" in bms["g"]["inconsistent-reason"]
    for n in "vhsfg":
        bb_ok("bitmap", "--remove", img, n)
    assert descriptor(img)["QBM"]["bitmaps"] == []


def test_descriptor_field_errors(tmp_path):
    img = dirty_image(tmp_path)
    orig = descriptor(img)
    cases = [
        (lambda q: q.update(version=2), "unsupported QBM version"),
        (lambda q: q.update(size=-1), "out of range"),
        (lambda q: q.update(size=1 << 63), "out of range"),
        (lambda q: q.pop("data"), "'data' is missing"),
        (lambda q: q["bitmaps"].append(dict(q["bitmaps"][0])), "duplicate"),
        (lambda q: q["bitmaps"][0].update(name=""), "non-empty"),
        (lambda q: q["bitmaps"][0].update(name="x" * 2000), "longer than"),
        (lambda q: q.update(bitmaps="b0"), "must be an array"),
        (lambda q: q.update(backing={"file": "disk.raw"}), "allocation"),
        (lambda q: q["data"].update(format="qbm"), "nested"),
        (lambda q: q["data"].update(file="disk.qbm"), "descriptor itself"),
    ]
    for mutate, words in cases:
        d = json.loads(json.dumps(orig))
        mutate(d["QBM"])
        write_descriptor(img, d)
        p = bb("img", "info", img)
        assert p.returncode != 0, words
        assert words in p.stderr, (words, p.stderr)


def test_data_file_shorter_than_size(tmp_path):
    img = dirty_image(tmp_path)
    os.truncate(tmp_path / "disk.raw", 512 * K)
    p = bb("img", "info", img)
    assert p.returncode != 0
    assert "shorter than the image size" in p.stderr


# ------------------------------------------------------------------ crash

def test_sigkill_leaves_bitmap_inconsistent(tmp_path):
    img = dirty_image(tmp_path)
    assert bitmaps(img)["b0"]["inconsistent"] is False
    proc = subprocess.Popen(
        [BITBACK, "io", img, "-c", "write -P 0x11 128k 4k", "-c", "sleep 600000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the write happened (io flushes stdout per command).
        line = ""
        deadline = time.monotonic() + 120
        while "wrote" not in line and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 1)
            if r:
                line = proc.stdout.readline()
                if not line:
                    break
        assert "wrote" in line, proc.stderr.read() if proc.poll() is not None else line
        # While the image is open for writing, CLEAN is already cleared.
        assert read_header(bitmap_file(img, "b0"))["flags"] & CLEAN == 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Crash-safe by default: the write-intent log rebuilds the bitmap.
    b = bitmaps(img)["b0"]
    assert b["inconsistent"] is False and b["recovered"] is True, b
    # Without the log, the clean flag alone decides: inconsistent.
    os.unlink(str(img) + ".wil")
    b = bitmaps(img)["b0"]
    assert b["inconsistent"] is True
    assert "not closed cleanly" in b["inconsistent-reason"]
    p = bb("img", "check", img)
    assert p.returncode == 3, p.stdout + p.stderr
    # The data itself is intact.
    read_checks(img, b"\xab" * (64 * K) + b"\0" * (64 * K) + b"\x11" * (4 * K))


# ------------------------------------------------------------------ overlays

def base_pattern(size, block=64 * K):
    return bytearray(b"".join(bytes([0x10 + i % 200]) * block
                              for i in range(size // block)))


def make_overlay(tmp_path, size=M, gran="64K"):
    base = tmp_path / "base.raw"
    content = base_pattern(size)
    base.write_bytes(bytes(content))
    img = str(tmp_path / "ov.qbm")
    bb_ok("img", "create", "-f", "qbm", "-o",
          f"backing=base.raw,backing-format=raw,granularity={gran}", img)
    return img, base, content


def test_overlay_reads_backing_and_own_data(tmp_path):
    img, base, expected = make_overlay(tmp_path)
    assert info(img)["virtual-size"] == M
    alloc = tmp_path / "ov.alloc.bm"
    assert os.path.getsize(alloc) == HEADER + 2
    read_checks(img, expected)          # all from backing

    writes = [(100 * K, 10 * K, 0xab),   # inside cluster 1: copy-on-write
              (512 * K, 64 * K, 0xcd),   # exactly cluster 8
              (960 * K - 1, 2, 0xef)]    # straddles clusters 14/15
    cmds = sum((["-c", f"write -P 0x{p:02x} {o} {n}"] for o, n, p in writes), [])
    bb_ok("io", img, *cmds)
    for o, n, p in writes:
        expected[o:o + n] = bytes([p]) * n
    read_checks(img, expected)
    read_checks(img, expected, extra=("-r",))
    # The backing image is never written.
    assert base.read_bytes() == bytes(base_pattern(M))

    # Allocation bits: clusters 1, 8, 14, 15; CLEAN with a valid checksum.
    h = read_header(alloc)
    assert h["flags"] == CLEAN and h["shift"] == 16
    bits = alloc.read_bytes()[HEADER:]
    assert dirty_clusters(bits, 16) == [1, 8, 14, 15]
    assert h["checksum"] == xxh3_64(bits)
    # Allocated clusters of the data file hold the full cluster (COW'd).
    data = (tmp_path / "ov.raw").read_bytes()
    for c in (1, 8, 14, 15):
        assert data[c * 64 * K:(c + 1) * 64 * K] == expected[c * 64 * K:(c + 1) * 64 * K]
    # Unallocated clusters were never written in the data file.
    assert data[0:64 * K] == b"\0" * (64 * K)

    # Overwriting the backing image shows through unallocated clusters only.
    with open(base, "r+b") as f:
        f.write(b"\x99" * (128 * K))
    expected[0:64 * K] = b"\x99" * (64 * K)
    read_checks(img, expected)


def test_overlay_records_probed_backing_format(tmp_path):
    (tmp_path / "b.raw").write_bytes(b"\1" * (64 * K))
    img = str(tmp_path / "o.qbm")
    bb_ok("img", "create", "-f", "qbm", "-o", "backing=b.raw", img)
    q = descriptor(img)["QBM"]
    assert q["backing"] == {"file": "b.raw", "format": "raw"}
    assert q["size"] == 64 * K
    assert q["allocation"] == {"file": "o.alloc.bm", "granularity": 64 * K}


def test_overlay_zero_write_and_discard(tmp_path):
    img, base, expected = make_overlay(tmp_path)
    bb_ok("io", img, "-c", "write -z 200k 8k", "-c", "discard 0 64k")
    expected[200 * K:208 * K] = b"\0" * (8 * K)
    read_checks(img, expected)


def test_overlay_without_backing_reads_zeroes(tmp_path):
    img, base, expected = make_overlay(tmp_path)
    bb_ok("io", img, "-c", "write -P 0x42 70k 1k")
    d = descriptor(img)
    del d["QBM"]["backing"]
    write_descriptor(img, d)
    want = bytearray(M)
    want[64 * K:128 * K] = expected[64 * K:128 * K]
    want[70 * K:71 * K] = b"\x42" * K
    read_checks(img, want)


def test_overlay_corrupt_allocation_fails_open(tmp_path):
    img, base, expected = make_overlay(tmp_path)
    alloc = tmp_path / "ov.alloc.bm"
    patch(alloc, 0, b"XXXXXXXX")
    p = bb("io", img, "-c", "read 0 4k")
    assert p.returncode != 0
    assert "allocation bitmap" in p.stderr and "wrong magic" in p.stderr
    patch(alloc, 0, MAGIC)
    os.truncate(alloc, HEADER + 1)
    p = bb("img", "info", img)
    assert p.returncode != 0 and "truncated" in p.stderr


def test_overlay_unclean_allocation_is_trusted(tmp_path):
    img, base, expected = make_overlay(tmp_path)
    bb_ok("io", img, "-c", "write -P 0x33 0 4k")
    expected[0:4 * K] = b"\x33" * (4 * K)
    alloc = tmp_path / "ov.alloc.bm"
    patch(alloc, 16, struct.pack("<I", 0))   # as after a crash
    read_checks(img, expected)


def test_overlay_map_and_bitmap(tmp_path):
    img, base, expected = make_overlay(tmp_path)
    bb_ok("bitmap", "--add", img, "b0")
    bb_ok("io", img, "-c", "write -P 0x01 300k 1k")
    p = bb_ok("img", "map", "--output=json", "--bitmap", "b0", img)
    ext = json.loads(p.stdout)
    dirty = [(e["start"], e["length"]) for e in ext if e["dirty"]]
    assert dirty == [(256 * K, 64 * K)]
