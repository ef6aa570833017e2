"""The rbd block driver (src/block/drivers/rbd.c) against a real single-node
Ceph cluster (the session fixture `ceph`).  Data written by QEMU's rbd driver
is read by bitbackd, data written through bitbackd over NBD lands in the RBD
image (read back with `rbd export` and compared with a local model), block
status follows the image's allocation, discard and write-zeroes read back as
zeroes, two writers are kept apart by RBD's exclusive lock, snapshots open
read-only, and bad names fail with a clear error.
"""
import json
import os
import subprocess
import uuid

import nbd
import pytest

from bitback_testlib import Daemon
from conftest import bitback, require, run

MiB = 1024 * 1024
OBJ = 4 * MiB           # rbd's default object size
SIZE = 64 * MiB


def name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def rbd_uri(ceph, image):
    return f"rbd:rbd/{image}:conf={ceph.conf}"


def qemu_io(ceph, image, *cmds, check=True):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    p = run(argv + [rbd_uri(ceph, image)], check=check)
    assert check is False or "Pattern verification failed" not in p.stdout, p.stdout
    return p


def rbd_blockdev(ceph, image, node="r0", **extra):
    d = {"driver": "rbd", "node-name": node, "pool": "rbd", "image": image,
         "conf": ceph.conf}
    d.update(extra)
    return json.dumps(d)


def start_serving(d, ceph, image, writable=True):
    """bitbackd with an rbd node r0, a raw node d0 on it and an export d0."""
    extra = {} if writable else {"read-only": True}
    d.start("--blockdev", rbd_blockdev(ceph, image, **extra),
            "--blockdev", json.dumps({"driver": "raw", "node-name": "d0",
                                      "file": "r0", **extra}),
            "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable="
            + ("on" if writable else "off"), nbd=True)
    return d.nbd_uri("d0")


def exported(ceph, image, tmp_path):
    """The image's bytes as `rbd export` reads them."""
    out = tmp_path / f"{image}.export"
    if out.exists():
        out.unlink()
    ceph.tool("rbd", "export", f"rbd/{image}", str(out))
    return out.read_bytes()


def nbd_handle(uri, writable=True):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def read_all(h, size):
    return b"".join(h.pread(min(OBJ, size - off), off)
                    for off in range(0, size, OBJ))


def allocation_map(uri):
    require("nbdinfo")
    p = run(["nbdinfo", "--json", "--map", uri])
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(p.stdout)]


def test_qemu_written_image_served_over_nbd(ceph, tmp_path):
    image = name("serve")
    run(["qemu-img", "create", "-f", "raw", rbd_uri(ceph, image), str(SIZE)])
    qemu_io(ceph, image, "write -P 0xab 1M 64k", "write -P 0xcd 20M 4k")
    model = bytearray(SIZE)
    model[1 * MiB:1 * MiB + 65536] = b"\xab" * 65536
    model[20 * MiB:20 * MiB + 4096] = b"\xcd" * 4096

    with Daemon(tmp_path / "d") as d:
        uri = start_serving(d, ceph, image)
        assert d.qmp.node("r0")["drv"] == "rbd"
        h = nbd_handle(uri)
        try:
            assert h.get_size() == SIZE
            # Reads equal what qemu-io wrote (the whole image).
            assert read_all(h, SIZE) == bytes(model)
            # base:allocation: written objects are data, untouched objects
            # stay holes that read as zeroes.
            amap = allocation_map(uri)
            def status_at(off):
                for o, n, t in amap:
                    if o <= off < o + n:
                        return t
                raise AssertionError(f"{off} not in map {amap}")
            for off in (1 * MiB, 1 * MiB + 65535, 20 * MiB):
                assert status_at(off) & 1 == 0, (off, amap)      # data
            for off in (8 * MiB, 40 * MiB, SIZE - 1):
                assert status_at(off) == 3, (off, amap)          # hole, zero
            # Writes over NBD land in RBD.
            h.pwrite(b"\x5a" * 131072, 30 * MiB)
            h.pwrite(b"\x77" * 512, 1 * MiB + 1000)
            model[30 * MiB:30 * MiB + 131072] = b"\x5a" * 131072
            model[1 * MiB + 1000:1 * MiB + 1512] = b"\x77" * 512
            h.flush()
            amap = allocation_map(uri)
            assert status_at(30 * MiB) & 1 == 0, amap
            assert status_at(40 * MiB) == 3, amap
            assert read_all(h, SIZE) == bytes(model)
        finally:
            h.shutdown()
        assert d.quit() == 0
    assert exported(ceph, image, tmp_path) == bytes(model)
    (tmp_path / "model.raw").write_bytes(model)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
         str(tmp_path / "model.raw"), rbd_uri(ceph, image)])


def test_concurrent_writers(ceph, tmp_path):
    """nbdcopy with 4 connections and many requests in flight, then 4
    libnbd clients at once on disjoint ranges: every byte lands."""
    require("nbdcopy")
    image = name("conc")
    ceph.tool("rbd", "create", "--size", "32M", f"rbd/{image}")
    size = 32 * MiB
    src = bytearray(os.urandom(size))
    src[8 * MiB:12 * MiB] = bytes(4 * MiB)       # a hole nbdcopy skips
    (tmp_path / "src.raw").write_bytes(src)
    with Daemon(tmp_path / "d") as d:
        uri = start_serving(d, ceph, image)
        run(["nbdcopy", "--connections=4", "--requests=16", "--flush",
             str(tmp_path / "src.raw"), uri])
        assert exported(ceph, image, tmp_path) == bytes(src)

        import threading
        errors = []
        def writer(i):
            try:
                h = nbd_handle(uri)
                chunk = bytes([i + 1]) * 65536
                for k in range(16):
                    h.pwrite(chunk, i * 8 * MiB + k * 2 * 65536)
                h.flush()
                h.shutdown()
            except Exception as e:     # reported below
                errors.append(e)
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        for i in range(4):
            for k in range(16):
                off = i * 8 * MiB + k * 2 * 65536
                src[off:off + 65536] = bytes([i + 1]) * 65536
        assert d.quit() == 0
    assert exported(ceph, image, tmp_path) == bytes(src)


def test_discard_and_write_zeroes(ceph, tmp_path):
    image = name("zero")
    ceph.tool("rbd", "create", "--size", "16M", f"rbd/{image}")
    qemu_io(ceph, image, "write -P 0x11 0 16M")
    model = bytearray(b"\x11" * (16 * MiB))
    with Daemon(tmp_path / "d") as d:
        uri = start_serving(d, ceph, image)
        h = nbd_handle(uri)
        try:
            h.trim(OBJ, OBJ)                                  # a whole object
            h.trim(64 * 1024, 9 * MiB)                        # inside one
            h.zero(3 * MiB + 3 * 4096, 12 * MiB + 4096)       # may punch
            h.zero(65536 + 512, 13 * MiB, nbd.CMD_FLAG_NO_HOLE)
            h.flush()
        finally:
            h.shutdown()
        for off, n in ((OBJ, OBJ), (9 * MiB, 64 * 1024),
                       (12 * MiB + 4096, 3 * MiB + 3 * 4096),
                       (13 * MiB, 65536 + 512)):
            model[off:off + n] = bytes(n)
        assert d.quit() == 0
    assert exported(ceph, image, tmp_path) == bytes(model)


def test_two_writers_are_refused(ceph, tmp_path):
    image = name("lock")
    ceph.tool("rbd", "create", "--size", "16M", f"rbd/{image}")
    model = bytearray(16 * MiB)
    with Daemon(tmp_path / "a") as a, Daemon(tmp_path / "b") as b:
        uri = start_serving(a, ceph, image)
        with pytest.raises(AssertionError) as exc:
            start_serving(b, ceph, image)
        msg = b.stderr()
        assert "locked for writing by another client" in msg, msg
        assert image in msg, msg
        # The same through QMP: blockdev-add fails, the daemon lives on.
        b.proc = None
        b.start()
        err = b.qmp.error("blockdev-add", json.loads(rbd_blockdev(ceph, image)))
        assert "locked for writing" in err.desc, err.desc
        # A read-only open takes no lock.
        b.qmp.cmd("blockdev-add", json.loads(
            rbd_blockdev(ceph, image, node="ro", **{"read-only": True})))
        # QEMU's rbd driver (librbd's automatic lock) cannot take the
        # lock from us either: its write fails.
        p = qemu_io(ceph, image, "write -P 0xee 0 64k", check=False)
        assert "wrote 65536/65536" not in p.stdout, p.stdout
        # The first daemon still holds the lock and writes.
        h = nbd_handle(uri)
        h.pwrite(b"\x42" * 65536, 0)
        h.flush()
        h.shutdown()
        model[0:65536] = b"\x42" * 65536
        assert a.quit() == 0
        assert b.quit() == 0
    assert exported(ceph, image, tmp_path) == bytes(model)


def test_refused_while_qemu_writes(ceph, tmp_path):
    """qemu-io holding the lock (it took it on its first write) keeps
    bitbackd from opening the image for writing."""
    image = name("qlock")
    ceph.tool("rbd", "create", "--size", "16M", f"rbd/{image}")
    q = subprocess.Popen(["qemu-io", "-f", "raw", rbd_uri(ceph, image)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        q.stdin.write("write -P 0x33 0 64k\n")
        q.stdin.flush()
        line = ""
        while "wrote" not in line:
            line = q.stdout.readline()
            assert line, "qemu-io exited"
        with Daemon(tmp_path / "d") as d:
            d.start()
            err = d.qmp.error("blockdev-add", json.loads(rbd_blockdev(ceph, image)))
            assert "locked for writing by another client" in err.desc, err.desc
            assert d.quit() == 0
    finally:
        q.stdin.close()
        q.wait(timeout=60)


def test_bad_input(ceph, tmp_path):
    image = name("bad")
    ceph.tool("rbd", "create", "--size", "4M", f"rbd/{image}")
    nolock = name("nolock")
    ceph.tool("rbd", "create", "--size", "4M", "--image-feature", "layering",
              f"rbd/{nolock}")
    base = {"driver": "rbd", "node-name": "x", "conf": ceph.conf}
    cases = [
        ({"image": image}, "pool name is missing"),
        ({"pool": "rbd"}, "image name is missing"),
        ({"pool": "rbd", "image": ""}, "image name is empty"),
        ({"pool": "rbd", "image": "a/b"}, "contains '/' or '@'"),
        ({"pool": "rb@d", "image": image}, "contains '/' or '@'"),
        ({"pool": "rbd", "image": "nonexistent"}, "no such image"),
        ({"pool": "nopool", "image": image}, "cannot open pool 'nopool'"),
        ({"pool": "rbd", "image": image, "conf": str(tmp_path / "no.conf")},
         "cannot read the Ceph configuration file"),
        ({"pool": "rbd", "image": image, "snapshot": "nosnap",
          "read-only": True}, "no such image or snapshot"),
        ({"pool": "rbd", "image": image, "snapshot": "s"},
         "open it with read-only=on"),
        ({"pool": "rbd", "image": nolock}, "no exclusive-lock feature"),
        ({"pool": "rbd", "image": image, "locking": "maybe"},
         "'locking' expects"),
        ({"filename": "rbd:rbd"}, "names no image"),
        ({"filename": "rbd:/x"}, "pool name is empty"),
        ({"filename": "rbd:rbd/x@"}, "snapshot name is empty"),
        ({"filename": f"rbd:rbd/{image}:conf"}, "has no value"),
        ({"filename": f"rbd:rbd/{image}:no_such_option=1"},
         "invalid Ceph option"),
        ({"filename": "file:/x"}, "not an rbd filename"),
        ({"filename": f"rbd:rbd/{image}", "pool": "rbd"},
         "either 'filename' or 'pool'"),
    ]
    with Daemon(tmp_path / "d") as d:
        d.start()
        for opts, want in cases:
            err = d.qmp.error("blockdev-add", {**base, **opts})
            assert want in err.desc, (opts, err.desc)
            assert d.qmp.node("x") is None
        # locking=off opens an image without exclusive-lock read-write.
        d.qmp.cmd("blockdev-add", {**base, "pool": "rbd", "image": nolock,
                                   "locking": "off"})
        d.qmp.cmd("blockdev-del", **{"node-name": "x"})
        # The filename forms, with a namespace and a raw node on top.
        ceph.tool("rbd", "namespace", "create", "rbd/ns1")
        ceph.tool("rbd", "create", "--size", "4M", f"rbd/ns1/{image}")
        d.qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "x",
                                   "filename": f"rbd:rbd/ns1/{image}:conf={ceph.conf}"})
        assert d.qmp.node("x")["image"]["virtual-size"] == 4 * MiB \
            if "image" in d.qmp.node("x") else True
        d.qmp.cmd("blockdev-del", **{"node-name": "x"})
        assert d.quit() == 0

    # The CLI: clear errors, no crash.
    for fn, want in ((f"rbd:rbd/nonexistent:conf={ceph.conf}", "no such image"),
                     ("rbd:rbd", "names no image"),
                     (f"rbd:rbd/a/b/c:conf={ceph.conf}", "contains '/' or '@'"),
                     ("rbd:rbd/x:conf=/nonexistent.conf", "configuration file")):
        p = bitback("img", "info", fn, check=False)
        assert p.returncode == 1, (fn, p.returncode, p.stderr)
        assert want in p.stderr, (fn, p.stderr)
    # qcow2 on an rbd name (as qemu-img create does): an empty image that
    # grows as qcow2 writes (R3); qemu-img reads it and its data.
    q = f"rbd:rbd/{name('q')}:conf={ceph.conf}"
    bitback("img", "create", "-f", "qcow2", q, "8M")
    bitback("io", "-f", "qcow2", q, "-c", "write -q -P 0x3c 5M 64K")
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", q]).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 * MiB, info
    qemu_out = run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -q -P 0x3c 5M 64K",
                    q]).stdout
    assert "Pattern verification failed" not in qemu_out, qemu_out
    p = bitback("img", "create", "-f", "raw", f"rbd:rbd/{image}:conf={ceph.conf}",
                "1M", check=False)
    assert p.returncode == 1 and "exists" in p.stderr, p.stderr


def test_img_create_and_info(ceph, tmp_path):
    image = name("create")
    fn = f"rbd:rbd/{image}:conf={ceph.conf}"
    bitback("img", "create", "-f", "raw", fn, "8M")
    info = json.loads(ceph.tool("rbd", "info", "--format", "json",
                                f"rbd/{image}").stdout)
    assert info["size"] == 8 * MiB
    assert "exclusive-lock" in info["features"]
    p = bitback("img", "info", "--output=json", fn)
    j = json.loads(p.stdout)
    assert j["virtual-size"] == 8 * MiB and j["format"] == "raw", j
    # qemu-io reads what bitback io writes.
    bitback("io", "-c", "write -P 0x61 1M 64k", fn)
    qemu_io(ceph, image, "read -P 0x61 1M 64k", "read -P 0 0 1M")


def test_snapshot_opens_read_only(ceph, tmp_path):
    image = name("snap")
    ceph.tool("rbd", "create", "--size", "8M", f"rbd/{image}")
    qemu_io(ceph, image, "write -P 0xa1 0 1M")
    ceph.tool("rbd", "snap", "create", f"rbd/{image}@s1")
    qemu_io(ceph, image, "write -P 0xb2 0 1M", "write -P 0xb3 4M 64k")
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", rbd_blockdev(ceph, image, snapshot="s1",
                                           **{"read-only": True}),
                "--export", "type=nbd,id=e0,node-name=r0,name=r0", nbd=True)
        h = nbd_handle(d.nbd_uri("r0"))
        try:
            assert h.pread(1 * MiB, 0) == b"\xa1" * MiB
            assert h.pread(65536, 4 * MiB) == bytes(65536)
            assert h.is_read_only()
        finally:
            h.shutdown()
        assert d.quit() == 0
    # The filename form, through the CLI.
    p = bitback("io", "-r", "-c", "read -P 0xa1 0 1M", "-c", "read -P 0 4M 64k",
                f"rbd:rbd/{image}@s1:conf={ceph.conf}")
    assert "Pattern verification failed" not in p.stdout, p.stdout
