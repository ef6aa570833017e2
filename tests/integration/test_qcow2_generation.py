"""Bitmap generations survive reopen for qcow2 images.

A bitmap's generation (a UUID that changes on every clear by bitback) is
what backup chains compare to decide whether an incremental is safe.  qcow2
keeps it in bitback's private header extension 0x62626b67 together with the
bitmap's table offset, trusted only while bitback's autoclear bit (63) is
set (docs/specs/qcow2.md).  A generation bitback cannot vouch for is
*unknown*: absent in QMP, null in `bitback img info --output=json`, and the
backup tool does not compare it.  These tests check, with qemu-img as the
judge of the image, that:
  - the generation is the same on every reopen, changes on clear only;
  - whatever QEMU did to a bitmap, our next open never shows the old
    generation: it is unknown (QEMU rewrites every bitmap table when it
    stores bitmaps, and clears the autoclear bit, so even a table that
    lands back at its old offset does not match), and it stays unknown
    across our reopen until bitback clears the bitmap;
  - bitbackd reports it in query-named-block-nodes / query-block, keeps it
    across a clean restart, changes it on block-dirty-bitmap-clear, and a
    SIGKILL leaves the bitmap inconsistent with an unknown generation;
  - a damaged extension never crashes and never yields the old generation;
  - end to end: a QEMU session on the image does not force a full backup
    (`bitback backup --image` stays incremental and restores bit for bit),
    while a clear by bitback does.
"""
import json
import os
import struct

import pytest

from bitback_testlib import Daemon
from conftest import BITBACK, repo_bitmap, require, run

MiB = 1024 * 1024
BITMAPS_EXT = 0x23852875
GEN_EXT = 0x62626b67
GEN_AUTOCLEAR = 1 << 63
UUID_A = "11111111-2222-4333-8444-555555555555"


@pytest.fixture(autouse=True)
def tools():
    for t in ("qemu-img", "qemu-io"):
        require(t)


# ---- helpers -------------------------------------------------------------

def create(path, *bitmaps, size=64 * MiB):
    run([BITBACK, "img", "create", "-f", "qcow2", path, str(size)])
    for b in bitmaps:
        run([BITBACK, "bitmap", "--add", path, b])
    return str(path)


def info_bitmaps(img):
    """{name: bitmap info} as `bitback img info --output=json` shows them."""
    p = run([BITBACK, "img", "info", "--output=json", img])
    data = json.loads(p.stdout)["format-specific"]["data"]
    return {b["name"]: b for b in data.get("bitmaps", [])}


def gens(img):
    """{name: generation}, None when unknown."""
    return {n: b["generation"] for n, b in info_bitmaps(img).items()}


def priors(img):
    """{name: prior generation} of the bitmaps that show one (rule 6)."""
    return {n: b["prior-generation"] for n, b in info_bitmaps(img).items()
            if "prior-generation" in b}


def qemu_write(img, cmd):
    """A QEMU session on the image: it clears our autoclear bit."""
    run(["qemu-io", "-f", "qcow2", "-c", cmd, img])


def qemu_check_clean(img):
    p = run(["qemu-img", "check", "--output=json", img], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0, r


def qemu_bitmap_names(img):
    p = run(["qemu-img", "info", "--output=json", img])
    data = json.loads(p.stdout)["format-specific"]["data"]
    return sorted(b["name"] for b in data.get("bitmaps", []))


def header(img):
    """(autoclear, {ext type: (offset of its data in the file, data)},
    {bitmap name: table offset}) read straight from the file."""
    with open(img, "rb") as f:
        h = f.read(1 << 21)
    cluster_size = 1 << struct.unpack(">I", h[20:24])[0]
    h = h[:cluster_size]
    autoclear = struct.unpack(">Q", h[88:96])[0]
    pos = struct.unpack(">I", h[100:104])[0]
    exts = {}
    while pos + 8 <= len(h):
        t, n = struct.unpack(">II", h[pos:pos + 8])
        if t == 0:
            break
        exts[t] = (pos + 8, h[pos + 8:pos + 8 + n])
        pos += 8 + (n + 7) // 8 * 8
    tables = {}
    if BITMAPS_EXT in exts:
        nb, _, dsize, doff = struct.unpack(">IIQQ", exts[BITMAPS_EXT][1][:24])
        with open(img, "rb") as f:
            f.seek(doff)
            d = f.read(dsize)
        p = 0
        for _ in range(nb):
            toff, _, _, _, _, ns, es = struct.unpack(">QIIBBHI", d[p:p + 24])
            tables[d[p + 24 + es:p + 24 + es + ns].decode()] = toff
            p += (24 + es + ns + 7) // 8 * 8
    return autoclear, exts, tables


def gen_records(payload):
    """Decode our extension's payload: {name: (table offset, uuid, flags)}."""
    version, nb = struct.unpack(">II", payload[:8])
    assert version == 1
    out, p = {}, 8
    for _ in range(nb):
        toff = struct.unpack(">Q", payload[p:p + 8])[0]
        uuid = payload[p + 8:p + 44].decode()
        ns, flags = struct.unpack(">HH", payload[p + 44:p + 48])
        out[payload[p + 48:p + 48 + ns].decode()] = (toff, uuid, flags)
        p += (48 + ns + 7) // 8 * 8
    assert p == len(payload)
    return out


def gen_record(name, toff, uuid, reserved=0):
    n = name.encode()
    rec = struct.pack(">Q", toff) + uuid.encode() + struct.pack(">HH", len(n),
                                                               reserved) + n
    return rec + b"\0" * (-len(rec) % 8)


def poke(img, offset, data):
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_autoclear(img, value):
    poke(img, 88, struct.pack(">Q", value))


def replace_gen_payload(img, payload, length=None):
    """Overwrite our extension in place with `payload` (padded with zeroes
    to the room the current one has); `length` sets the length field."""
    _, exts, _ = header(img)
    off, old = exts[GEN_EXT]
    room = (len(old) + 7) // 8 * 8
    assert len(payload) <= room, "test payload larger than the extension"
    if length is not None:
        payload = payload[:length]      # what follows reads as the end
    poke(img, off - 4, struct.pack(">I", len(payload)))
    poke(img, off, payload + b"\0" * (room - len(payload)))


def assert_our_extension_matches(img):
    """The extension describes every bitmap whose generation is known, with
    its current table offset and the generation bitback shows, and every
    bitmap that shows a prior generation, flagged prior (rule 6), and no
    other; with neither, there is no extension and no autoclear bit."""
    autoclear, exts, tables = header(img)
    g = gens(img)
    known = {n: u for n, u in g.items() if u is not None}
    prior = priors(img)
    assert sorted(tables) == sorted(g)
    assert not set(known) & set(prior)
    if not known and not prior:
        assert GEN_EXT not in exts and not autoclear & GEN_AUTOCLEAR
        return
    assert autoclear & GEN_AUTOCLEAR
    assert autoclear & 1                      # bitmaps autoclear bit too
    recs = gen_records(exts[GEN_EXT][1])
    assert sorted(recs) == sorted(set(known) | set(prior))
    for name, (toff, uuid, flags) in recs.items():
        if name in known:
            assert (toff, uuid, flags) == (tables[name], known[name], 0)
        else:
            assert (uuid, flags) == (prior[name], 1)


# ---- offline ------------------------------------------------------------

def test_generation_stable_across_reopen(tmp_path):
    img = create(tmp_path / "a.qcow2", "b0", "b1")
    g1 = gens(img)
    assert set(g1) == {"b0", "b1"} and g1["b0"] != g1["b1"]
    assert None not in g1.values()               # ours: known
    assert gens(img) == g1                       # reopen: the same
    assert_our_extension_matches(img)

    # Writes mark the bitmap but keep its generation (tables move).
    _, _, tables = header(img)
    run([BITBACK, "io", "-c", "write -P 0x5a 1M 128k", img])
    bms = info_bitmaps(img)
    assert bms["b0"]["count"] == 128 * 1024
    assert header(img)[2] != tables
    assert gens(img) == g1
    assert_our_extension_matches(img)

    # Clear: a new generation for b0 only, stable afterwards.
    run([BITBACK, "bitmap", "--clear", img, "b0"])
    g2 = gens(img)
    assert g2["b0"] != g1["b0"] and g2["b1"] == g1["b1"]
    assert info_bitmaps(img)["b0"]["count"] == 0
    assert gens(img) == g2
    assert_our_extension_matches(img)

    # Disable / enable do not clear: same generation.
    run([BITBACK, "bitmap", "--disable", img, "b1"])
    run([BITBACK, "bitmap", "--enable", img, "b1"])
    assert gens(img) == g2

    # Remove + add of the same name: a new bitmap, a new generation.
    run([BITBACK, "bitmap", "--remove", img, "b1"])
    run([BITBACK, "bitmap", "--add", img, "b1"])
    g3 = gens(img)
    assert g3["b1"] != g2["b1"] and g3["b0"] == g2["b0"]
    assert gens(img) == g3

    # QEMU is happy with the image and sees the bitmaps.
    qemu_check_clean(img)
    assert qemu_bitmap_names(img) == ["b0", "b1"]
    run(["qemu-img", "compare", "-f", "qcow2", img, img])

    # Removing every bitmap drops the extension and its autoclear bit.
    run([BITBACK, "bitmap", "--remove", img, "b0"])
    run([BITBACK, "bitmap", "--remove", img, "b1"])
    autoclear, exts, _ = header(img)
    assert GEN_EXT not in exts and not autoclear & GEN_AUTOCLEAR
    qemu_check_clean(img)


@pytest.mark.parametrize("op", [
    ["--clear"],
    ["--remove"],            # then --add below: same name, new bitmap
    ["--disable"],           # QEMU does not clear here, but rewrites
])
def test_qemu_rewrite_makes_generation_unknown(tmp_path, op):
    img = create(tmp_path / "q.qcow2", "b0", "other")
    run([BITBACK, "io", "-c", "write 0 64k", img])
    g1 = gens(img)
    _, _, tables1 = header(img)

    run(["qemu-img", "bitmap", *op, img, "b0"])
    if op == ["--remove"]:
        run(["qemu-img", "bitmap", "--add", img, "b0"])
    qemu_check_clean(img)
    autoclear, exts, tables2 = header(img)
    # What QEMU 7.2 does: it keeps our extension (unknown extensions are
    # preserved), clears our autoclear bit (unknown autoclear bits are
    # cleared on a writable open) and rewrites every bitmap's table, the
    # untouched "other" included.
    assert GEN_EXT in exts
    assert not autoclear & GEN_AUTOCLEAR
    assert tables2["b0"] != tables1["b0"]
    assert tables2["other"] != tables1["other"]

    # No bitmap keeps its old generation, nor gets a made-up one: bitback
    # cannot vouch for them, so they are unknown (and still consistent).
    # What bitback knew before is shown as their prior generation (rule 6).
    assert None not in g1.values()
    assert gens(img) == {"b0": None, "other": None}
    assert priors(img) == g1
    b0 = info_bitmaps(img)["b0"]
    assert b0["inconsistent"] is False
    p = run([BITBACK, "img", "info", img])
    assert "generation: unknown (was %s" % g1["b0"] in p.stdout

    # Our writable open does not make them known: only prior records, and
    # unknown after every reopen; the prior generations stay.
    run([BITBACK, "bitmap", "--enable", img, "b0"])
    assert gens(img) == {"b0": None, "other": None}
    assert priors(img) == g1
    assert_our_extension_matches(img)
    autoclear, exts, _ = header(img)
    assert {f for _, _, f in gen_records(exts[GEN_EXT][1]).values()} == {1}
    run([BITBACK, "io", "-c", "write 1M 64k", img])
    assert gens(img) == {"b0": None, "other": None}
    assert priors(img) == g1

    # A clear by bitback starts a known generation, stable afterwards;
    # "other" stays unknown.
    run([BITBACK, "bitmap", "--clear", img, "b0"])
    g3 = gens(img)
    assert g3["other"] is None and g3["b0"] is not None
    assert g3["b0"] not in g1.values()
    assert gens(img) == g3
    assert priors(img) == {"other": g1["other"]}
    assert_our_extension_matches(img)
    qemu_check_clean(img)


def test_qemu_add_other_bitmap_and_data_writes(tmp_path):
    """qemu-img bitmap --add of another bitmap and qemu-io writes: QEMU
    stores every bitmap again; ours become unknown, QEMU's bitmaps and the
    dirty bits QEMU recorded stay intact."""
    img = create(tmp_path / "q.qcow2", "b0")
    g1 = gens(img)
    assert g1["b0"] is not None
    run(["qemu-img", "bitmap", "--add", img, "qemu"])
    assert gens(img) == {"b0": None, "qemu": None}
    run(["qemu-io", "-f", "qcow2", "-c", "write 2M 64k", img])
    bms = info_bitmaps(img)
    assert bms["b0"]["count"] == 64 * 1024 and bms["qemu"]["count"] == 64 * 1024
    assert not bms["b0"]["inconsistent"]
    assert bms["b0"]["generation"] is None and bms["qemu"]["generation"] is None
    qemu_check_clean(img)
    assert qemu_bitmap_names(img) == ["b0", "qemu"]


def test_forged_offset_without_autoclear_bit_is_not_trusted(tmp_path):
    """After two QEMU sessions a bitmap table can land at its old offset
    again.  Simulate exactly that: records whose offsets match the tables
    QEMU wrote.  Without our autoclear bit they must not be used (the
    generation is unknown); with it they are (which shows the bit is what
    protects us)."""
    img = create(tmp_path / "f.qcow2", "b0")
    run(["qemu-img", "bitmap", "--clear", img, "b0"])
    autoclear, exts, tables = header(img)
    assert not autoclear & GEN_AUTOCLEAR
    payload = struct.pack(">II", 1, 1) + gen_record("b0", tables["b0"], UUID_A)
    replace_gen_payload(img, payload)
    assert gens(img)["b0"] is None
    set_autoclear(img, autoclear | GEN_AUTOCLEAR)
    assert gens(img)["b0"] == UUID_A
    # A record with a different offset is not trusted, bit or not; it is
    # what bitback knew before (rule 6).
    payload = struct.pack(">II", 1, 1) + gen_record("b0", tables["b0"] + 65536,
                                                    UUID_A)
    replace_gen_payload(img, payload)
    assert gens(img)["b0"] is None
    assert priors(img) == {"b0": UUID_A}


# ---- damaged extension ---------------------------------------------------

def _corruptions(toff):
    ok = gen_record("b0", toff, UUID_A)
    hdr1 = struct.pack(">II", 1, 1)
    bad_uuid = UUID_A[:10] + "g" + UUID_A[11:]
    return {
        "control-valid": (hdr1 + ok, None),
        "control-prior": (hdr1 + gen_record("b0", toff, UUID_A, reserved=1), None),
        "version": (struct.pack(">II", 2, 1) + ok, None),
        "too-many-records": (struct.pack(">II", 1, 0xffffffff) + ok, None),
        "record-past-end": (struct.pack(">II", 1, 2) + ok, None),
        "truncated-length": (hdr1 + ok, 8 + 20),
        "short-payload": (hdr1[:4], None),
        "name-size-zero": (hdr1 + ok[:44] + struct.pack(">HH", 0, 0) + ok[48:],
                           None),
        "name-too-long": (hdr1 + ok[:44] + struct.pack(">HH", 2000, 0) +
                          ok[48:], None),
        "name-past-end": (hdr1 + ok[:44] + struct.pack(">HH", 200, 0) +
                          ok[48:], None),
        "bad-uuid": (hdr1 + gen_record("b0", toff, bad_uuid), None),
        "uuid-with-nul": (hdr1 + gen_record("b0", toff, UUID_A[:35] + "\0"),
                          None),
        "reserved": (hdr1 + gen_record("b0", toff, UUID_A, reserved=7), None),
        "nul-in-name": (hdr1 + ok[:48] + b"\0" + ok[49:], None),
        "duplicate": (struct.pack(">II", 1, 2) + ok + ok, None),
        "trailing-garbage": (hdr1 + ok + b"\xff" * 8, None),
        "garbage": (bytes((i * 37 + 11) & 0xff for i in range(64)), None),
        "zero-length": (b"", 0),
    }


@pytest.mark.parametrize("case", sorted(_corruptions(0)))
def test_damaged_extension(tmp_path, case):
    # Room for two records plus garbage: several bitmaps with long names.
    img = create(tmp_path / "d.qcow2", "b0", "x" * 40, "y" * 40)
    autoclear, exts, tables = header(img)
    payload, length = _corruptions(tables["b0"])[case]
    replace_gen_payload(img, payload, length)

    p = run([BITBACK, "img", "info", "--output=json", img], check=False)
    assert p.returncode == 0, p.stderr          # opens, no crash
    b0 = {b["name"]: b for b in json.loads(p.stdout)["format-specific"]
          ["data"]["bitmaps"]}["b0"]
    assert b0["inconsistent"] is False
    if case == "control-valid":
        assert b0["generation"] == UUID_A        # the test can tell
    else:
        assert b0["generation"] is None          # ignored: unknown
    # A prior record never gives a current generation (rule 6).
    assert b0.get("prior-generation") == (UUID_A if case == "control-prior"
                                          else None)

    # A writable open repairs it: records written again (for the known
    # generations only), stable after.
    run([BITBACK, "bitmap", "--enable", img, "b0"])
    g = gens(img)
    assert gens(img) == g
    assert g["b0"] == (UUID_A if case == "control-valid" else None)
    assert_our_extension_matches(img)
    qemu_check_clean(img)


def test_extension_overrunning_the_header_is_a_clear_error(tmp_path):
    img = create(tmp_path / "o.qcow2", "b0")
    _, exts, _ = header(img)
    off, _ = exts[GEN_EXT]
    poke(img, off - 4, struct.pack(">I", 0x7ffffff0))
    p = run([BITBACK, "img", "info", img], check=False)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "0x62626b67" in p.stderr and "overruns" in p.stderr
    # QEMU refuses it as well; both refuse, neither crashes.
    p = run(["qemu-img", "info", img], check=False)
    assert p.returncode != 0 and p.returncode > 0


# ---- bitbackd --------------------------------------------------------------

def _start(d, image):
    d.start("--blockdev", "driver=qcow2,node-name=d0,file.driver=file,"
            f"file.filename={image}", nbd=True)


def _query_block_bitmap(d, name):
    for dev in d.qmp.cmd("query-block"):
        ins = dev.get("inserted") or {}
        if ins.get("node-name") == "d0":
            for b in ins.get("dirty-bitmaps", []):
                if b["name"] == name:
                    return b
    return None


def test_bitbackd_generation(tmp_path):
    img = create(tmp_path / "g.qcow2")
    with Daemon(tmp_path) as d:
        _start(d, "g.qcow2")
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0",
                  persistent=True)
        b0 = d.qmp.bitmap("d0", "b0")
        g1 = b0["generation"]
        assert len(g1) == 36 and g1.count("-") == 4
        qb = _query_block_bitmap(d, "b0")
        assert qb is not None and qb["generation"] == g1
        d.qmp.cmd("block-export-add", type="nbd", id="e0",
                  **{"node-name": "d0"}, name="d0", writable=True)
        run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k",
             d.nbd_uri("d0")])
        assert d.qmp.bitmap("d0", "b0")["generation"] == g1
        assert d.quit() == 0

    assert gens(img) == {"b0": g1}
    assert_our_extension_matches(img)
    qemu_check_clean(img)

    with Daemon(tmp_path) as d:
        _start(d, "g.qcow2")
        b0 = d.qmp.bitmap("d0", "b0")
        assert b0["generation"] == g1 and b0["count"] == 64 * 1024
        assert b0["inconsistent"] is False
        d.qmp.cmd("block-dirty-bitmap-clear", node="d0", name="b0")
        g2 = d.qmp.bitmap("d0", "b0")["generation"]
        assert g2 != g1
        assert d.quit() == 0

    assert gens(img) == {"b0": g2}
    with Daemon(tmp_path) as d:
        _start(d, "g.qcow2")
        assert d.qmp.bitmap("d0", "b0")["generation"] == g2
        # A crash: the bitmap is in-use on disk, so the next open shows it
        # inconsistent, and never with the generation of a consistent one.
        d.kill()

    # Without its write-intent log (tested in test_crash_safe.py), the
    # in-use flag decides.
    os.unlink(str(img) + ".wil")
    bms = info_bitmaps(img)
    assert bms["b0"]["inconsistent"] is True
    assert bms["b0"]["generation"] is None
    with Daemon(tmp_path) as d:
        _start(d, "g.qcow2")
        b0 = d.qmp.bitmap("d0", "b0")
        assert b0["inconsistent"] is True and "generation" not in b0
        qb = _query_block_bitmap(d, "b0")
        assert qb is not None and "generation" not in qb
        assert d.quit() == 0
    # Still in-use (never silently clean), and QEMU agrees.
    p = run(["qemu-img", "info", "--output=json", img])
    flags = json.loads(p.stdout)["format-specific"]["data"]["bitmaps"][0]["flags"]
    assert "in-use" in flags
    assert info_bitmaps(img)["b0"]["generation"] is None


def test_bitbackd_unknown_generation(tmp_path):
    """After a QEMU session, bitbackd omits `generation` (unknown) in both
    queries and shows the prior one; block-dirty-bitmap-clear makes it
    known, and it is kept."""
    img = create(tmp_path / "u.qcow2", "b0")
    g0 = gens(img)["b0"]
    qemu_write(img, "write -P 3 1M 64k")
    with Daemon(tmp_path) as d:
        _start(d, "u.qcow2")
        b0 = d.qmp.bitmap("d0", "b0")
        assert b0 is not None and "generation" not in b0, b0
        assert b0["prior-generation"] == g0, b0
        assert b0["count"] == 64 * 1024 and b0["inconsistent"] is False
        qb = _query_block_bitmap(d, "b0")
        assert qb is not None and "generation" not in qb, qb
        d.qmp.cmd("block-dirty-bitmap-clear", node="d0", name="b0")
        b0 = d.qmp.bitmap("d0", "b0")
        g = b0["generation"]
        assert len(g) == 36 and _query_block_bitmap(d, "b0")["generation"] == g
        assert "prior-generation" not in b0
        assert d.quit() == 0
    assert gens(img) == {"b0": g}
    assert priors(img) == {}
    assert_our_extension_matches(img)
    qemu_check_clean(img)


# ---- end to end: the backup tool -------------------------------------------

def _backup(img, repo):
    return run([BITBACK, "backup", "--image", img, "--repo", repo])


def _listing(repo):
    p = run([BITBACK, "list", "--repo", repo, "--output=json"])
    return json.loads(p.stdout)


def _check_restore(img, repo, tmp_path, tag):
    """`bitback restore --at latest` equals the image as QEMU reads it."""
    ref = tmp_path / f"ref-{tag}.raw"
    out = tmp_path / f"out-{tag}.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, ref])
    run([BITBACK, "restore", "--repo", repo, "--at", "latest", out])
    run(["cmp", out, ref])


def test_backup_after_qemu_session_stays_incremental(tmp_path):
    """A QEMU session on the image (a VM running on it) makes the bitmap's
    generation unknown; the next offline backup trusts the bitmap, as QEMU
    and libvirt do, and takes an incremental that restores bit for bit.  A
    clear by bitback itself is still caught: a full backup saying why."""
    img = str(tmp_path / "vm.qcow2")
    repo = tmp_path / "repo"
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"])
    qemu_write(img, "write -P 1 0 2M")
    qemu_write(img, "write -P 2 9M 128K")

    p = _backup(img, repo)
    lst = _listing(repo)
    assert [b["level"] for b in lst] == ["full"], p.stderr
    _check_restore(img, repo, tmp_path, "1")
    bm = repo_bitmap(repo, lst[-1]['id'])
    assert gens(img)[bm] is not None             # made by us: known

    # A QEMU session: its write must be in the next incremental.
    qemu_write(img, "write -P 7 1M 64K")
    b = info_bitmaps(img)[bm]
    assert b["generation"] is None and b["count"] == 64 * 1024
    assert not b["inconsistent"]
    p = _backup(img, repo)
    assert "taking a full backup" not in p.stderr, p.stderr
    lst = _listing(repo)
    assert [b["level"] for b in lst] == ["full", "inc"]
    assert lst[-1]["changed-bytes"] == 64 * 1024
    _check_restore(img, repo, tmp_path, "2")
    run(["qemu-img", "check", "-q", img])

    # A clear by bitback: a known new generation, so the manifest's no
    # longer matches and the next backup is a full one, saying why.
    bm = repo_bitmap(repo, lst[-1]['id'])
    assert gens(img)[bm] is not None
    run([BITBACK, "bitmap", "--clear", img, bm])
    assert info_bitmaps(img)[bm]["count"] == 0
    p = _backup(img, repo)
    msgs = [l for l in p.stderr.splitlines() if "taking a full backup" in l]
    assert len(msgs) == 1 and "cleared" in msgs[0], p.stderr
    lst = _listing(repo)
    assert [b["level"] for b in lst] == ["full", "inc", "full"]
    _check_restore(img, repo, tmp_path, "3")

    # And the chain goes on with incrementals.
    qemu_write(img, "write -P 9 5M 64K")
    p = _backup(img, repo)
    assert "taking a full backup" not in p.stderr, p.stderr
    lst = _listing(repo)
    assert [b["level"] for b in lst] == ["full", "inc", "full", "inc"]
    assert lst[-1]["parent"] == lst[-2]["id"]
    _check_restore(img, repo, tmp_path, "4")
    run([BITBACK, "verify", "--repo", repo])
    qemu_check_clean(img)


def test_clear_by_bitback_then_qemu_session_forces_full(tmp_path):
    """bitback clears a chain's bitmap, then a VM session writes the image:
    the generation is unknown now, but the prior one (what bitback recorded
    before the session) already differs from the manifest's, so the next
    backup is a full one saying why.  An incremental would miss the write
    made before the clear (the restore check below would catch it)."""
    img = str(tmp_path / "vm.qcow2")
    repo = tmp_path / "repo"
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"])
    qemu_write(img, "write -P 1 0 2M")
    _backup(img, repo)
    lst = _listing(repo)
    bm = repo_bitmap(repo, lst[-1]['id'])
    manifest, = repo.glob(f"*/{lst[-1]['id']}.json")
    recorded = json.loads(manifest.read_text())["generation"]
    assert recorded and gens(img)[bm] == recorded

    # A write bitback tracks, then a clear that drops its bit ...
    run([BITBACK, "io", "-c", "write -P 5 4M 64k", img])
    run([BITBACK, "bitmap", "--clear", img, bm])
    cleared = gens(img)[bm]
    assert cleared != recorded
    # ... then a QEMU session.
    qemu_write(img, "write -P 7 8M 64k")
    assert gens(img)[bm] is None and priors(img)[bm] == cleared

    p = _backup(img, repo)
    msgs = [l for l in p.stderr.splitlines() if "taking a full backup" in l]
    assert len(msgs) == 1 and "cleared" in msgs[0] and bm in msgs[0], p.stderr
    assert [b["level"] for b in _listing(repo)] == ["full", "full"]
    _check_restore(img, repo, tmp_path, "after")

    # Without the clear, a QEMU session alone keeps the chain incremental.
    qemu_write(img, "write -P 9 10M 64k")
    p = _backup(img, repo)
    assert "taking a full backup" not in p.stderr, p.stderr
    assert [b["level"] for b in _listing(repo)] == ["full", "full", "inc"]
    _check_restore(img, repo, tmp_path, "inc")
