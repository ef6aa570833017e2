"""The write-intent log in a RADOS object (src/block/wil-store-rados.c,
docs/specs/write-intent.md "Where the log lives"), against the real
single-node Ceph of the `ceph` fixture.

tests/unit/test-wil-rados is test-write-intent's C checks (coverage under
concurrent writers and snapshots, reset, recovery after a "crash" equal to
snapshot | marked regions, recovery from a memfd, clean close, W9, the
read-ahead) with the log in an object per image, plus its own: the
rados-obj helpers' bound on read_full and short reads, the object lock
refusing a second writer, and a corrupt object not used (with a reason).
It fails without a cluster, so it runs only here.  So that a binary that
did nothing cannot pass, the test checks the count of tests it reports and
reads the objects the run left in the pool with the `rados` tool."""
import struct
import subprocess

from conftest import BUILD

EXPECTED_TESTS = 11   # 7 shared checks + 3 of the RADOS store
MAGIC = b"BBWIL\0v2"


def test_wil_in_rados(ceph, tmp_path):
    pool = "wil-test"
    ceph.create_pool(pool)
    env = dict(ceph.env(), BITBACK_TEST_CEPH_CONF=ceph.conf,
               BITBACK_TEST_CEPH_POOL=pool, TMPDIR=str(tmp_path))
    p = subprocess.run([str(BUILD / "tests" / "unit" / "test-wil-rados")],
                       env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert f"[  PASSED  ] {EXPECTED_TESTS} test(s)." in out, out
    assert (f"write-intent checks: {EXPECTED_TESTS} tests, store rados, "
            "all passed") in out, out

    # The logs the run left: one object per image opened writable (the
    # ones a test removed, and the rados-obj scratch object, are gone).
    names = ceph.tool("rados", "-p", pool, "ls", text=True).stdout.split()
    logs = sorted(n for n in names if n.startswith("wil:"))
    assert len(logs) >= 8, names
    assert "bitback-test-rados-obj" not in names
    for oid in logs:
        stat = ceph.tool("rados", "-p", pool, "stat", oid, text=True).stdout
        size = int(stat.split("size ")[1].split()[0])
        data = ceph.tool("rados", "-p", pool, "get", oid, "-").stdout
        assert len(data) == size, (oid, stat)
        # Header (docs/specs/write-intent.md): magic, state, shift, image
        # size, slot offsets, slot size; the map is padded to 4 KiB.
        assert data[:8] == MAGIC, (oid, data[:16])
        state, shift, image_size, slot0, slot1, slot_size = \
            struct.unpack_from("<IIQQQQ", data, 8)
        assert state in (0, 1) and shift == 16, (oid, state, shift)
        # 16 MiB images; test_resize grows its image to 32 MiB (its crash
        # copies keep such logs), then shrinks it to 8 MiB.
        assert image_size in (16 << 20, 32 << 20, 8 << 20), (oid, image_size)
        assert slot0 >= 8192 and slot1 == slot0 + slot_size, (oid, slot0, slot1)
        assert slot0 + 32 < size <= slot1 + slot_size, (oid, size)
        # Slot 0 is written first (the map is at 4096, one page here).
        assert data[slot0:slot0 + 8] == b"BBWSNAP2", oid


def test_wil_rados_needs_a_cluster():
    """Without the environment it fails loudly instead of passing empty."""
    p = subprocess.run([str(BUILD / "tests" / "unit" / "test-wil-rados")],
                       env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0
    assert "BITBACK_TEST_CEPH_CONF" in p.stderr
