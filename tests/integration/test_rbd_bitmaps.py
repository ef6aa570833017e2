"""Persistent, crash-safe bitmaps of RBD images stored in RADOS next to the
image (src/block/drivers/rbd-bitmaps.c, docs/specs/rbd-bitmaps.md) against a
real single-node Ceph cluster (the session fixture `ceph`): two bitmaps
added over QMP are exact over NBD, follow the image to a daemon with another
working directory and no local state, survive SIGKILL under write load
(recovered through the RADOS write-intent log, whose stale lock the new
owner breaks), show in `bitback img info` / `bitback bitmap`, and hostile
objects give clear errors, never a crash.
"""
import json
import random
import subprocess
import time
import uuid

import nbd

from bitback_testlib import Daemon
from bitback_testlib.writer import Writer, write_lengths
from conftest import bitback, run

MiB = 1024 * 1024
G = 64 * 1024           # bitmap granularity
SIZE = 32 * MiB


def name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def rbd_uri(ceph, image):
    return f"rbd:rbd/{image}:conf={ceph.conf}"


def image_id(ceph, image):
    info = json.loads(ceph.tool("rbd", "info", "--format", "json",
                                f"rbd/{image}", text=True).stdout)
    return info["id"]


def serve(d, ceph, image):
    """bitbackd with a raw node d0 over the RBD image (as an rbd: name opens
    it), exported writable with every bitmap it has."""
    d.start("--blockdev", json.dumps({
        "driver": "raw", "node-name": "d0",
        "file": {"driver": "rbd", "pool": "rbd", "image": image,
                 "conf": ceph.conf}}), nbd=True)
    return d


def export(d, bitmaps):
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
              name="d0", writable=True, bitmaps=bitmaps)
    return d.nbd_uri("d0")


def bitmaps_of(d):
    for n in d.qmp.cmd("query-named-block-nodes"):
        if n["node-name"] == "d0":
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
    raise AssertionError("no node d0")


def dirty_clusters(uri, bitmap, size=SIZE):
    """The clusters nbdinfo --map reports dirty in qemu:dirty-bitmap:NAME."""
    p = run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri])
    out = set()
    for e in json.loads(p.stdout):
        if e["type"] & 1:
            out.update(range(e["offset"] // G,
                             (e["offset"] + e["length"] + G - 1) // G))
    return out


def clusters(off, length):
    return set(range(off // G, (off + length + G - 1) // G))


def write(uri, model, rng, n):
    """n random writes through NBD, applied to model: the clusters hit."""
    h = nbd.NBD()
    h.connect_uri(uri)
    hit = set()
    for _ in range(n):
        ln = rng.choice([4096, G, 3 * G])
        off = rng.randrange(0, SIZE - ln) // 512 * 512
        data = rng.randbytes(ln)
        h.pwrite(data, off)
        model[off:off + ln] = data
        hit |= clusters(off, ln)
    h.flush()
    h.shutdown()
    return hit


def exported(ceph, image, path):
    if path.exists():
        path.unlink()
    ceph.tool("rbd", "export", f"rbd/{image}", str(path))
    return path.read_bytes()


def new_image(ceph, tmp_path):
    image = name("bm")
    run(["qemu-img", "create", "-f", "raw", rbd_uri(ceph, image), str(SIZE)])
    return image


def incremental(uri, base, bitmap):
    """base with the clusters bitmap marks copied from the export: what
    restoring the full + this incremental gives."""
    out = bytearray(base)
    h = nbd.NBD()
    h.connect_uri(uri)
    for c in sorted(dirty_clusters(uri, bitmap)):
        ln = min(G, SIZE - c * G)
        out[c * G:c * G + ln] = h.pread(ln, c * G)
    h.shutdown()
    return bytes(out)


def test_two_bitmaps_exact_and_follow_the_vm(ceph, tmp_path):
    image = new_image(ceph, tmp_path)
    model = bytearray(SIZE)
    # qemu-img writes the image first: data before any bitmap.
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", rbd_uri(ceph, image)])
    model[MiB:3 * MiB] = b"\x5a" * (2 * MiB)
    rng = random.Random(20)
    host1 = Daemon(tmp_path / "host1")
    try:
        serve(host1, ceph, image)
        host1.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0",
                      granularity=G, persistent=True)
        uri = export(host1, ["b0"])
        hit0 = write(uri, model, rng, 40)
        host1.qmp.cmd("block-export-del", id="e0")
        # The "full backup" b1 starts from.
        base = exported(ceph, image, tmp_path / "base")
        assert base == bytes(model)
        host1.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b1",
                      granularity=G, persistent=True)
        uri = export(host1, ["b0", "b1"])
        hit1 = write(uri, model, rng, 40)
        assert dirty_clusters(uri, "b0") == hit0 | hit1
        assert dirty_clusters(uri, "b1") == hit1
        assert exported(ceph, image, tmp_path / "e1") == bytes(model)
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
             str(tmp_path / "e1"), rbd_uri(ceph, image)])
        host1.quit()
    finally:
        host1.cleanup()
    oid = image_id(ceph, image)
    objs = ceph.tool("rados", "-p", "rbd", "ls", text=True).stdout.split()
    assert f"bitback_qbm.{oid}" in objs
    assert sum(o.startswith(f"bitback_bitmap.{oid}.") for o in objs) == 2

    # Another "host": its own working directory, no local state.
    host2 = Daemon(tmp_path / "host2")
    try:
        serve(host2, ceph, image)
        bms = bitmaps_of(host2)
        assert set(bms) == {"b0", "b1"}
        assert not any(b.get("inconsistent") for b in bms.values()), bms
        uri = export(host2, ["b0", "b1"])
        assert dirty_clusters(uri, "b0") == hit0 | hit1
        assert dirty_clusters(uri, "b1") == hit1
        hit2 = write(uri, model, rng, 30)
        assert dirty_clusters(uri, "b1") == hit1 | hit2
        now = exported(ceph, image, tmp_path / "e2")
        assert now == bytes(model)
        # The next incremental (b1's clusters over the full) is exact.
        assert incremental(uri, base, "b1") == now
        host2.quit()
    finally:
        host2.cleanup()


def fence(ceph, image):
    """What an orchestrator does when a host dies: blocklist the dead
    client (its watch on the image would otherwise look alive for
    osd_client_watch_timeout, 30 s), so the next owner may break its lock."""
    st = json.loads(ceph.tool("rbd", "status", "--format", "json",
                              f"rbd/{image}", text=True).stdout)
    for w in st.get("watchers", []):
        ceph.tool("ceph", "osd", "blocklist", "add", w["address"])


def test_sigkill_under_write_load(ceph, tmp_path):
    """Crash trials: SIGKILL at a random moment while writers run; a new
    daemon in another working dir opens the image read-write (the dead
    one's locks are stale) and the bitmap is consistent, recovered through
    the RADOS write-intent log, and covers every acknowledged write."""
    image = new_image(ceph, tmp_path)
    rng = random.Random(7)
    d = Daemon(tmp_path / "setup")
    try:
        serve(d, ceph, image)
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0",
                  granularity=G, persistent=True)
        d.quit()
    finally:
        d.cleanup()
    covered = set()
    deadline = time.monotonic() + 75
    trials = 0
    while trials < 20:
        assert time.monotonic() < deadline, f"only {trials} trials in time"
        d = Daemon(tmp_path / f"t{trials}")
        try:
            serve(d, ceph, image)
            bms = bitmaps_of(d)
            assert not bms["b0"].get("inconsistent"), bms
            uri = export(d, ["b0"])
            # Every write acknowledged before is still marked.
            dirty = dirty_clusters(uri, "b0")
            assert covered <= dirty, sorted(covered - dirty)[:5]
            w = Writer([uri], [trials * 2, trials * 2 + 1],
                       write_lengths(4, 64, 192), until_error=True)
            w.start()
            time.sleep(rng.uniform(0.05, 0.4))
            d.kill()
            w.join()
            fence(ceph, image)
            for a in w.acked:
                covered |= clusters(a.offset, a.length)
        finally:
            d.cleanup()
        trials += 1
    d = Daemon(tmp_path / "final")
    try:
        serve(d, ceph, image)
        bms = bitmaps_of(d)
        assert not bms["b0"].get("inconsistent"), bms
        assert covered <= dirty_clusters(export(d, ["b0"]), "b0")
        d.quit()
    finally:
        d.cleanup()


def test_second_writer_refused_objects_untouched(ceph, tmp_path):
    image = new_image(ceph, tmp_path)
    a = Daemon(tmp_path / "a")
    b = Daemon(tmp_path / "b")
    try:
        serve(a, ceph, image)
        a.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0",
                  granularity=G, persistent=True)
        oid = image_id(ceph, image)
        obj = f"bitback_bitmap.{oid}.0"
        before = ceph.tool("rados", "-p", "rbd", "stat", obj, text=True).stdout.split()[-3:]
        hdr = tmp_path / "hdr0"
        ceph.tool("rados", "-p", "rbd", "get", obj, str(hdr))
        with __import__("pytest").raises(AssertionError, match="locked"):
            serve(b, ceph, image)
        hdr2 = tmp_path / "hdr1"
        ceph.tool("rados", "-p", "rbd", "get", obj, str(hdr2))
        assert hdr.read_bytes() == hdr2.read_bytes()
        assert before == ceph.tool("rados", "-p", "rbd", "stat",
                                   obj, text=True).stdout.split()[-3:]
        a.quit()
    finally:
        b.cleanup()
        a.cleanup()


def test_cli_info_and_bitmap(ceph, tmp_path):
    image = new_image(ceph, tmp_path)
    fn = rbd_uri(ceph, image)
    bitback("bitmap", "--add", "-g", "64K", fn, "c0")
    bitback("bitmap", "--add", "-g", "128K", fn, "c1")
    bitback("io", "-c", "write -P 1 0 64K", fn)
    j = json.loads(bitback("img", "info", "--output=json", fn).stdout)
    bms = {b["name"]: b for b in j["format-specific"]["data"]["bitmaps"]}
    assert set(bms) == {"c0", "c1"}, j
    assert bms["c1"]["granularity"] == 128 * 1024
    bitback("bitmap", "--remove", fn, "c0")
    j = json.loads(bitback("img", "info", "--output=json", fn).stdout)
    assert [b["name"] for b in j["format-specific"]["data"]["bitmaps"]] == ["c1"]
    # Too large for one RADOS object: refused with the remedy.
    big = name("big")
    run(["qemu-img", "create", "-f", "raw", rbd_uri(ceph, big), "64T"])
    p = bitback("bitmap", "--add", "-g", "512", rbd_uri(ceph, big), "x",
                check=False)
    assert p.returncode != 0 and "larger granularity" in p.stderr, p.stderr


def test_hostile_objects(ceph, tmp_path):
    image = new_image(ceph, tmp_path)
    fn = rbd_uri(ceph, image)
    bitback("bitmap", "--add", fn, "h0")
    bitback("bitmap", "--add", fn, "h1")
    oid = image_id(ceph, image)
    junk = tmp_path / "junk"
    # A short bitmap object and a huge one: inconsistent with a reason.
    junk.write_bytes(b"\xff" * 100)
    ceph.tool("rados", "-p", "rbd", "put", f"bitback_bitmap.{oid}.0", str(junk))
    ceph.tool("rados", "-p", "rbd", "truncate", f"bitback_bitmap.{oid}.1",
              str(100 * MiB))
    j = json.loads(bitback("img", "info", "--output=json", fn).stdout)
    bms = {b["name"]: b for b in j["format-specific"]["data"]["bitmaps"]}
    assert "truncated" in bms["h0"]["inconsistent-reason"], bms
    assert "size mismatch" in bms["h1"]["inconsistent-reason"], bms
    # A garbage descriptor: the open fails with a clear error.
    junk.write_bytes(b"{\"QBM\": [1, 2")
    ceph.tool("rados", "-p", "rbd", "put", f"bitback_qbm.{oid}", str(junk))
    p = bitback("img", "info", fn, check=False)
    assert p.returncode != 0 and f"bitback_qbm.{oid}" in p.stderr, p.stderr
    assert "malformed JSON" in p.stderr and "rados" in p.stderr, p.stderr
    assert "Sanitizer" not in p.stderr


def test_bitmaps_of_an_rbd_node_opened_directly(ceph, tmp_path):
    """The rbd node itself (driver=rbd at the top, as a daemon's disk)
    owns its bitmaps: after a restart they cover the whole image and keep
    their bits (they were loaded before the node's size was known)."""
    image = name("direct")
    ceph.tool("rbd", "create", "--size", f"{SIZE // MiB}M", f"rbd/{image}")
    node = json.dumps({"driver": "rbd", "node-name": "disk0", "pool": "rbd",
                       "image": image, "conf": ceph.conf})
    counts = []
    for run_no in range(2):
        d = Daemon(tmp_path / f"d{run_no}")
        try:
            d.start("--blockdev", node, "--export",
                    "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
                    nbd=True)
            if run_no == 0:
                d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
                          persistent=True)
                h = nbd.NBD()
                h.connect_uri(d.nbd_uri("disk0"))
                h.pwrite(b"\x5a" * 65536, SIZE - 65536)   # the last cluster
                h.pwrite(b"\x5a" * 65536, 0)
                h.shutdown()
            bms = {b["name"]: b for n in d.qmp.cmd("query-named-block-nodes")
                   if n["node-name"] == "disk0"
                   for b in n.get("dirty-bitmaps", [])}
            assert not bms["b0"].get("inconsistent"), bms
            counts.append(bms["b0"]["count"])
            assert d.quit() == 0
        finally:
            d.cleanup()
    assert counts == [2 * 65536, 2 * 65536], counts
