"""qemu-storage-daemon features scripts expect (docs/qmp.md): iothread and
secret objects, block_resize with the node's dirty bitmaps, and
query-qmp-schema made from the command registry."""
import json
import os
import time

import pytest

from bitback_testlib import QSD, Daemon, QMPError
from conftest import BITBACK, require, run

MiB = 1024 * 1024


def raw_disk(tmp_path, size="16M", name="d.raw"):
    img = tmp_path / name
    run(["qemu-img", "create", "-q", "-f", "raw", img, size])
    return img


def raw_node(img, node="d0"):
    return f"driver=raw,node-name={node},file.driver=file,file.filename={img}"


def test_iothread_objects(tmp_path):
    """query-iothreads lists each iothread with QEMU's members; its
    thread-id is a real thread of the daemon; an export may name it, and
    object-del refuses it while the export exists."""
    img = raw_disk(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start("--object", "iothread,id=io0,poll-max-ns=1000,aio-max-batch=4",
                "--blockdev", raw_node(img), "--export",
                "nbd,id=e0,node-name=d0,iothread=io0", nbd=True)
        c = d.qmp
        c.cmd("object-add", **{"qom-type": "iothread", "id": "io1"})
        threads = c.cmd("query-iothreads")
        assert [t["id"] for t in threads] == ["io0", "io1"]
        assert set(threads[0]) == {"id", "thread-id", "poll-max-ns",
                                   "poll-grow", "poll-shrink", "aio-max-batch"}
        assert threads[0]["poll-max-ns"] == 1000
        assert threads[0]["aio-max-batch"] == 4
        assert threads[1]["poll-max-ns"] == 32768      # QEMU's default
        tids = [t["thread-id"] for t in threads]
        for tid in tids:
            assert os.path.exists(f"/proc/{d.pid}/task/{tid}")
        with pytest.raises(QMPError, match="iothread 'io0' is in use by "
                           "export 'e0'"):
            c.cmd("object-del", id="io0")
        with pytest.raises(QMPError, match="Invalid parameter type for "
                           "'iothread', expected: string"):
            c.cmd("block-export-add", type="nbd", id="e1",
                  **{"node-name": "d0"}, iothread=5)
        with pytest.raises(QMPError, match="poll-max-ns value must be in "
                           "range"):
            c.cmd("object-add", **{"qom-type": "iothread", "id": "io2",
                                   "poll-max-ns": -1})
        with pytest.raises(QMPError, match="Property 'iothread.bogus' not "
                           "found"):
            c.cmd("object-add", **{"qom-type": "iothread", "id": "io2",
                                   "bogus": 1})
        c.del_export("e0")
        c.get_event("BLOCK_EXPORT_DELETED")
        c.cmd("object-del", id="io0")
        assert [t["id"] for t in c.cmd("query-iothreads")] == ["io1"]
        # The thread is joined; the kernel may list its task a moment
        # longer (the join wakes at mm release, before the task is reaped).
        deadline = time.monotonic() + 5
        while (os.path.exists(f"/proc/{d.pid}/task/{tids[0]}") and
               time.monotonic() < deadline):
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/{d.pid}/task/{tids[0]}")
        # The id is free again, and another export may use io1.
        c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
              iothread="io1")
        assert d.quit() == 0


def test_secret_objects(tmp_path):
    """secret objects from data or a file, raw or base64; bad ones are
    refused with QEMU's messages, and no error shows the secret's data."""
    sec = tmp_path / "pw"
    sec.write_text("c2VjcmV0LWZpbGU=")           # "secret-file"
    with Daemon(tmp_path / "d") as d:
        d.start("--object", "secret,id=s0,data=hunter2",
                "--object", f"secret,id=s1,file={sec},format=base64")
        c = d.qmp
        c.cmd("object-add", **{"qom-type": "secret", "id": "s2",
                               "data": "aGk=", "format": "base64"})
        for args, msg in [
                ({"data": "TOPSECRET1", "keyid": "s0"},
                 "encrypted secrets .* are not supported"),
                ({"data": "TOPSECRET2", "iv": "AAAA"},
                 "encrypted secrets .* are not supported"),
                ({"data": "TOPSECRET3", "format": "hex"},
                 "Parameter 'format' does not accept value 'hex'"),
                ({"data": "TOPSECRET4!", "format": "base64"},
                 "Base64 data contains invalid characters"),
                ({"data": "TOPSECRET5", "file": str(sec)},
                 "'file' and 'data' are mutually exclusive"),
                ({}, "Either 'file' or 'data' must be provided"),
                ({"file": str(tmp_path / "nope")}, "Unable to read"),
                ({"file": str(tmp_path)}, "Unable to read"),
                ({"data": "TOPSECRET6", "bogus": 1},
                 "Property 'secret.bogus' not found")]:
            err = c.error("object-add", **{"qom-type": "secret", "id": "s9"},
                          **args)
            assert err.desc and __import__("re").search(msg, err.desc), \
                (args, err.desc)
            assert "TOPSECRET" not in err.desc
        with pytest.raises(QMPError, match="attempt to add duplicate"):
            c.cmd("object-add", **{"qom-type": "secret", "id": "s0",
                                   "data": "x"})
        c.cmd("object-del", id="s0")
        assert d.quit() == 0
    assert "hunter2" not in d.stderr()
    # A file too large for a secret is refused.
    big = tmp_path / "big"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    with Daemon(tmp_path / "d2") as d:
        d.start()
        with pytest.raises(QMPError, match="at most 65536 bytes"):
            d.qmp.cmd("object-add", **{"qom-type": "secret", "id": "s0",
                                       "file": str(big)})
        assert d.quit() == 0


def bitmap_extents(uri, bitmap):
    """[(offset, length)] of the dirty areas NBD reports for bitmap."""
    out = run(["nbdinfo", "--map=qemu:dirty-bitmap:" + bitmap, "--json",
               uri]).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out)
            if e["type"] & 1]


@pytest.mark.parametrize("new_size", [48 * MiB, 8 * MiB])
def test_block_resize_raw(tmp_path, new_size):
    """block_resize grows or shrinks a raw image; every bitmap of the node
    follows (bits kept below the old end, the new area clean, granularity
    unchanged), and writes in a new area are marked."""
    require("nbdinfo")
    img = raw_disk(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", raw_node(img), nbd=True)
        c = d.qmp
        c.cmd("block-dirty-bitmap-add", node="d0", name="b0",
              granularity=65536)
        c.cmd("block-dirty-bitmap-add", node="d0", name="b1",
              granularity=1 * MiB, disabled=True)
        c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
              writable=True)
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 64k",
             "-c", "write -P 0x22 12M 64k", d.nbd_uri("d0")])
        # An exported node is not resized (QEMU's NBD exports do not
        # share the resize permission).
        with pytest.raises(QMPError, match="Permission conflict on node "
                           "'d0'"):
            c.cmd("block_resize", **{"node-name": "d0"}, size=new_size)
        c.del_export("e0")
        c.get_event("BLOCK_EXPORT_DELETED")
        c.cmd("block_resize", **{"node-name": "d0"}, size=new_size)
        assert os.path.getsize(img) == new_size
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json",
                               "-f", "raw", img]).stdout)
        assert info["virtual-size"] == new_size
        assert c.node("d0")["image"]["virtual-size"] == new_size
        b0 = c.bitmap("d0", "b0")
        # query-block (the root node's entry) says the same.
        [blk] = [b for b in c.cmd("query-block")
                 if b["inserted"]["node-name"] == "d0"]
        assert {b["name"]: b["count"] for b in
                blk["inserted"]["dirty-bitmaps"]} == {"b0": b0["count"],
                                                      "b1": 0}
        assert b0["granularity"] == 65536
        assert b0["count"] == (128 * 1024 if new_size > 12 * MiB
                               else 64 * 1024)
        assert c.bitmap("d0", "b1")["granularity"] == MiB
        assert c.bitmap("d0", "b1")["count"] == 0
        c.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "d0"},
              writable=True, bitmaps=["b0"])
        out = json.loads(run(["nbdinfo", "--json", d.nbd_uri("d0")]).stdout)
        assert out["exports"][0]["export-size"] == new_size
        last = new_size - 64 * 1024
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0x33 {last} 64k",
             "-c", f"read -P 0x33 {last} 64k", d.nbd_uri("d0")])
        marked = bitmap_extents(d.nbd_uri("d0"), "b0")
        assert (last, 64 * 1024) in marked
        assert (MiB, 64 * 1024) in marked
        if new_size > 16 * MiB:
            # The grown area reads as zeroes and was clean until written.
            run(["qemu-io", "-f", "raw", "-c",
                 f"read -P 0 {16 * MiB} 64k", d.nbd_uri("d0")])
            assert not [e for e in marked
                        if 16 * MiB <= e[0] < last]
        else:
            assert all(o + n <= new_size for o, n in marked)
        assert d.quit() == 0


def test_block_resize_qcow2(tmp_path):
    """A qcow2 image grows, past what its L1 table covered (a new table is
    written and the old one freed: qemu-img check finds no leak or
    error); data below and in the new area is right; a bitmap follows.
    Shrinking, stored bitmaps and internal snapshots are refused."""
    img = tmp_path / "d.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k",
         img, "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 60M 1M", img])
    bd = f"driver=qcow2,node-name=d0,file.driver=file,file.filename={img}"
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", bd, nbd=True)
        c = d.qmp
        c.cmd("block-dirty-bitmap-add", node="d0", name="b0")
        # 64 KiB clusters: one L1 entry covers 512 MiB; 2 GiB needs four.
        c.cmd("block_resize", **{"node-name": "d0"}, size=2048 * MiB)
        assert c.node("d0")["image"]["virtual-size"] == 2048 * MiB
        with pytest.raises(QMPError, match="shrinking an image is not "
                           "supported"):
            c.cmd("block_resize", **{"node-name": "d0"}, size=32 * MiB)
        c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
              writable=True, bitmaps=["b0"])
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 1536M 64k",
             "-c", "read -P 0x55 1536M 64k", "-c", "read -P 0x44 60M 1M",
             "-c", "read -P 0 64M 64k", d.nbd_uri("d0")])
        assert bitmap_extents(d.nbd_uri("d0"), "b0") == [(1536 * MiB,
                                                          64 * 1024)]
        assert c.bitmap("d0", "b0")["count"] == 64 * 1024
        assert d.quit() == 0
    info = json.loads(run(["qemu-img", "info", "--output=json", img]).stdout)
    assert info["virtual-size"] == 2048 * MiB
    run(["qemu-img", "check", img])
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x55 1536M 64k",
         "-c", "read -P 0x44 60M 1M", img])
    # A stored bitmap (qemu-img's) is resized with the image and stored at
    # the new size: QEMU itself then reads it (qsd exports it over NBD).
    run(["qemu-img", "bitmap", "--add", img, "p0"])
    with Daemon(tmp_path / "d2") as d:
        d.start("--blockdev", bd, nbd=True)
        c = d.qmp
        write_then_unexport(d, "write -P 0x66 1M 64k")
        c.cmd("block_resize", **{"node-name": "d0"}, size=4096 * MiB)
        assert c.bitmap("d0", "p0")["count"] == 64 * 1024
        c.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "d0"},
              writable=True)
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x67 3G 64k",
             d.nbd_uri("d0")])
        assert d.quit() == 0
    info = json.loads(run(["qemu-img", "info", "--output=json", img]).stdout)
    assert info["virtual-size"] == 4096 * MiB
    [p0] = info["format-specific"]["data"]["bitmaps"]
    assert p0["name"] == "p0" and "in-use" not in p0["flags"], p0
    run(["qemu-img", "check", img])
    assert qsd_bitmap_extents(tmp_path / "qsd", img, "p0") == [
        (MiB, 64 * 1024), (3 * 1024 * MiB, 64 * 1024)]


def write_then_unexport(d, *cmds):
    """Run qemu-io's cmds on node d0 through a writable export that is
    removed afterwards (an exported node is not resized)."""
    c = d.qmp
    c.cmd("block-export-add", type="nbd", id="w0", **{"node-name": "d0"},
          writable=True)
    args = []
    for cmd in cmds:
        args += ["-c", cmd]
    run(["qemu-io", "-f", "raw", *args, d.nbd_uri("d0")])
    c.del_export("w0")
    c.get_event("BLOCK_EXPORT_DELETED")


def qsd_bitmap_extents(work, img, bitmap):
    """The dirty extents of bitmap as real qemu-storage-daemon reads it
    from the qcow2 image img."""
    require("nbdinfo")
    with Daemon(work, binary=QSD) as q:
        q.start("--blockdev", f"driver=qcow2,node-name=d0,file.driver=file,"
                f"file.filename={img}",
                "--export", f"nbd,id=e0,node-name=d0,writable=on,"
                f"bitmaps.0={bitmap}",
                nbd=True)
        extents = bitmap_extents(q.nbd_uri("d0"), bitmap)
        q.quit()
    return extents


@pytest.mark.parametrize("fmt", ["qcow2", "qbm"])
def test_block_resize_persistent_bitmaps(tmp_path, fmt):
    """A crash-safe node with a persistent bitmap grows (and a qbm one
    shrinks): the bitmap follows, its write-intent log is rewritten for the
    new size, so a SIGKILL after the resize recovers exactly the writes
    (not the whole grown area), and a clean stop stores the bitmap at the
    new size, which the next open loads consistent.  40 GiB: past the
    32 GiB one qcow2 bitmap table cluster covers, so the in-use entry left
    by the SIGKILL is sized for the old length (QEMU and bitback accept
    that of an in-use entry)."""
    BIG, AT = 40 * 1024 * MiB, 36 * 1024 * MiB
    require("nbdinfo")
    (tmp_path / "d").mkdir()
    img = tmp_path / "d" / f"d.{fmt}"
    if fmt == "qcow2":
        run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
    else:
        run([BITBACK, "img", "create", "-q", "-f", "qbm", img, "64M"])
    bd = (f"driver={fmt},node-name=d0,file.driver=file,"
          f"file.filename={img}")
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", bd, nbd=True)
        c = d.qmp
        c.cmd("block-dirty-bitmap-add", node="d0", name="b0",
              persistent=True)
        write_then_unexport(d, "write -P 0x11 1M 64k")
        c.cmd("block_resize", **{"node-name": "d0"}, size=BIG)
        assert c.node("d0")["image"]["virtual-size"] == BIG
        c.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "d0"},
              writable=True)
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0x22 {AT} 64k",
             "-c", "read -P 0 100M 64k", d.nbd_uri("d0")])
        assert d.kill() != 0
        d.restart("--blockdev", bd, nbd=True)
        b0 = d.qmp.bitmap("d0", "b0")
        assert b0["recovered"] is True and not b0["inconsistent"], b0
        c = d.qmp
        c.cmd("block-export-add", type="nbd", id="e2", **{"node-name": "d0"},
              writable=True, bitmaps=["b0"])
        marked = bitmap_extents(d.nbd_uri("d0"), "b0")
        # Both writes, and of the grown area only what the write-intent
        # log's region (64 MiB) around the second write adds.
        assert (MiB, 64 * 1024) in marked or any(
            o <= MiB and MiB + 64 * 1024 <= o + n for o, n in marked)
        assert any(o <= AT and AT + 64 * 1024 <= o + n
                   for o, n in marked), marked
        assert sum(n for o, n in marked) <= 2 * 64 * MiB, marked
        run(["qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x22 {AT} 64k",
             d.nbd_uri("d0")])
        assert d.quit() == 0
    # The recovered bitmap was stored at the new size: consistent, not
    # recovered, on the next open.
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", bd)
        b0 = d.qmp.bitmap("d0", "b0")
        assert not b0["inconsistent"] and not b0.get("recovered"), b0
        if fmt == "qbm":
            d.qmp.cmd("block_resize", **{"node-name": "d0"}, size=512 * MiB)
            assert d.qmp.node("d0")["image"]["virtual-size"] == 512 * MiB
        assert d.quit() == 0
    if fmt == "qcow2":
        run(["qemu-img", "check", img])
        info = json.loads(run(["qemu-img", "info", "--output=json",
                               img]).stdout)
        assert info["virtual-size"] == BIG
        marked = qsd_bitmap_extents(tmp_path / "qsd", img, "b0")
        assert any(o <= AT and AT + 64 * 1024 <= o + n
                   for o, n in marked), marked
    else:
        info = json.loads(run([BITBACK, "img", "info", "--output=json",
                               img]).stdout)
        assert info["virtual-size"] == 512 * MiB
        assert os.path.getsize(tmp_path / "d" / "d.raw") == 512 * MiB
        run([BITBACK, "img", "check", img])
        [bm] = info["format-specific"]["data"]["bitmaps"]
        assert bm["name"] == "b0" and not bm.get("inconsistent"), bm


def test_block_resize_refuses_inconsistent_bitmap(tmp_path):
    """As QEMU: a node with an inconsistent persistent bitmap is not
    resized (its entry could not follow); removing the bitmap lets it."""
    img = tmp_path / "d.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
    bd = (f"driver=qcow2,node-name=d0,crash-safe=off,file.driver=file,"
          f"file.filename={img}")
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", bd)
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0",
                  persistent=True)
        assert d.kill() != 0
        d.restart("--blockdev", bd)
        c = d.qmp
        assert c.bitmap("d0", "b0")["inconsistent"] is True
        with pytest.raises(QMPError, match="Cannot resize node 'd0': Bitmap "
                           "'b0' is inconsistent"):
            c.cmd("block_resize", **{"node-name": "d0"}, size=128 * MiB)
        c.cmd("block-dirty-bitmap-remove", node="d0", name="b0")
        c.cmd("block_resize", **{"node-name": "d0"}, size=128 * MiB)
        assert d.quit() == 0
    run(["qemu-img", "check", img])


def create_job(c, job_id, **options):
    """blockdev-create; returns the concluded job's query-jobs entry."""
    c.cmd("blockdev-create", **{"job-id": job_id}, options=options)
    ev = c.wait_event(lambda e: e["event"] == "JOB_STATUS_CHANGE" and
                      e["data"] == {"id": job_id, "status": "concluded"},
                      what=f"{job_id} concluded")
    assert ev
    job = [j for j in c.cmd("query-jobs") if j["id"] == job_id][0]
    c.cmd("job-dismiss", id=job_id)
    return job


def test_blockdev_create_qbm(tmp_path):
    """blockdev-create makes a qbm image (descriptor and data image) that
    blockdev-add opens, with persistent bitmaps that writes mark; a
    wrapped existing data image keeps its data; bad options fail."""
    require("nbdinfo")
    (tmp_path / "d").mkdir()
    raw = raw_disk(tmp_path / "d", "4M", "old.raw")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 64k", raw])
    with Daemon(tmp_path / "d") as d:
        d.start(nbd=True)
        c = d.qmp
        job = create_job(c, "c0", driver="qbm", filename="new.qbm",
                         size=8 * MiB, granularity=4096)
        assert "error" not in job
        job = create_job(c, "c1", driver="qbm", filename="wrap.qbm",
                         size=4 * MiB, **{"data-file": "old.raw"})
        assert "error" not in job
        info = json.loads(run([BITBACK, "img", "info", "--output=json",
                               tmp_path / "d" / "new.qbm"]).stdout)
        assert info["virtual-size"] == 8 * MiB
        assert info["format-specific"]["data"]["data-file"] == "new.raw"
        assert os.path.getsize(tmp_path / "d" / "new.raw") == 8 * MiB
        for node, f in (("q0", "new.qbm"), ("q1", "wrap.qbm")):
            c.cmd("blockdev-add", driver="qbm", **{"node-name": node},
                  file={"driver": "file", "filename": f})
        c.cmd("block-dirty-bitmap-add", node="q1", name="b0",
              persistent=True)
        c.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "q1"},
              writable=True, bitmaps=["b0"])
        run(["qemu-io", "-f", "raw", "-c", "read -P 0x66 0 64k",
             "-c", "write -P 0x77 1M 64k", d.nbd_uri("q1")])
        assert bitmap_extents(d.nbd_uri("q1"), "b0") == [(MiB, 64 * 1024)]
        # Errors: the arguments at once, the work in the job.
        with pytest.raises(QMPError, match="Parameter 'filename' is "
                           "missing"):
            c.cmd("blockdev-create", **{"job-id": "c2"},
                  options={"driver": "qbm", "size": MiB})
        with pytest.raises(QMPError, match="Parameter 'bogus' is "
                           "unexpected"):
            c.cmd("blockdev-create", **{"job-id": "c2"},
                  options={"driver": "qbm", "filename": "x.qbm", "size": MiB,
                           "bogus": 1})
        job = create_job(c, "c3", driver="qbm", filename="g.qbm", size=MiB,
                         granularity=1000)
        assert "not a power of two" in job["error"]
        job = create_job(c, "c4", driver="qbm", filename="h.qbm", size=MiB,
                         **{"data-format": "qbm"})
        assert "not usable" in job["error"]
        assert d.quit() == 0
    out = json.loads(run([BITBACK, "img", "info", "--output=json",
                          tmp_path / "d" / "wrap.qbm"]).stdout)
    assert [b["name"] for b in out["format-specific"]["data"]["bitmaps"]] \
        == ["b0"]


def test_block_resize_refusals(tmp_path):
    img = raw_disk(tmp_path)
    ro = raw_disk(tmp_path, name="ro.raw")
    qcow2 = tmp_path / "d.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, "16M"])
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", raw_node(img),
                "--blockdev", raw_node(ro, "r1") + ",read-only=on",
                "--blockdev", "driver=file,node-name=f2,filename=" + str(img)
                + ",locking=off",
                "--blockdev", "driver=raw,node-name=d2,file=f2")
        c = d.qmp
        for args, msg in [
                ({"node-name": "zz", "size": MiB},
                 "Cannot find device='' nor node-name='zz'"),
                ({"size": MiB}, "Cannot find device='' nor node-name=''"),
                ({"node-name": "d0", "size": -1},
                 "Parameter 'size' expects a >0 size"),
                ({"node-name": "d0"}, "Parameter 'size' is missing"),
                ({"node-name": "d0", "size": "1M"},
                 "Invalid parameter type for 'size'"),
                ({"node-name": "r1", "size": MiB}, "Image is read-only"),
                ({"node-name": "f2", "size": MiB},
                 "Node 'f2' is a child of node 'd2': resize that one"),
                ({"node-name": "d0", "size": (1 << 62) + 1},
                 "Image size too large")]:
            with pytest.raises(QMPError, match=msg):
                c.cmd("block_resize", **args)
        assert os.path.getsize(img) == 16 * MiB
        # device= names a node too.
        c.cmd("block_resize", device="d0", size=20 * MiB)
        assert os.path.getsize(img) == 20 * MiB
        assert d.quit() == 0


SCHEMA_JSON_TYPE = {"str": "string", "bool": "boolean", "int": "integer",
                    "uint64": "integer", "[any]": "array"}
WRONG = {"str": 1, "bool": "x", "int": "x", "uint64": "x", "[any]": 1}
RIGHT = {"str": "x", "bool": False, "int": 0, "uint64": 0, "[any]": [],
         "any": {}}


def test_query_qmp_schema(tmp_path):
    """Every command of query-commands is in the schema, in QEMU's
    SchemaInfo shape, and each member the schema gives a command is one the
    command checks with that type: the same call with that member
    mistyped is refused naming it (the handler never runs)."""
    with Daemon(tmp_path / "d") as d:
        d.start()
        c = d.qmp
        schema = c.cmd("query-qmp-schema")
        by_name = {e["name"]: e for e in schema}
        assert len(by_name) == len(schema)
        commands = {e["name"] for e in c.cmd("query-commands")}
        in_schema = {e["name"] for e in schema if e["meta-type"] == "command"}
        assert commands == in_schema
        for e in schema:
            assert e["meta-type"] in {"command", "event", "object",
                                      "builtin", "array", "enum"}
            if e["meta-type"] in ("command", "event"):
                assert by_name[e["arg-type"]]["meta-type"] == "object"
            if e["meta-type"] == "command":
                assert e["ret-type"] in by_name
            if e["meta-type"] == "object":
                for m in e["members"]:
                    assert m["type"] in by_name
                    assert set(m) <= {"name", "type", "default"}
                    assert m.get("default", None) is None
                # A union (test_qmp_schema.py has the details).
                assert set(e) - {"name", "meta-type", "members"} in (
                    set(), {"tag", "variants"})
                for v in e.get("variants", []):
                    assert by_name[v["type"]]["meta-type"] == "object"
            if e["meta-type"] == "enum":
                assert e["values"] and all(isinstance(x, str)
                                           for x in e["values"])
                assert [m["name"] for m in e["members"]] == e["values"]
        assert {"JOB_STATUS_CHANGE", "BLOCK_EXPORT_DELETED"} <= \
            {e["name"] for e in schema if e["meta-type"] == "event"}
        resize = by_name[by_name["block_resize"]["arg-type"]]["members"]
        assert resize == [{"name": "device", "type": "str", "default": None},
                          {"name": "node-name", "type": "str",
                           "default": None},
                          {"name": "size", "type": "int"}]
        def right(t):
            """A value of schema type t."""
            if by_name[t]["meta-type"] == "enum":
                return by_name[t]["values"][0]
            return RIGHT.get(t, {})

        def json_type(t):
            """The type name of t in QEMU's mistyped-member message."""
            if by_name[t]["meta-type"] == "enum":
                return "string"
            return SCHEMA_JSON_TYPE.get(t)

        probed = 0
        for cmd in sorted(in_schema - {"blockdev-add", "object-add",
                                       "qmp_capabilities"}):
            arg = by_name[by_name[cmd]["arg-type"]]
            members = list(arg["members"])
            base = {m["name"]: right(m["type"]) for m in members
                    if "default" not in m}
            if "tag" in arg:        # block-export-add's union: its nbd case
                base[arg["tag"]] = "nbd"
                members += by_name[[v["type"] for v in arg["variants"]
                                    if v["case"] == "nbd"][0]]["members"]
            for m in members:
                if not json_type(m["type"]):
                    continue
                args = dict(base, **{m["name"]: 1 if json_type(m["type"]) ==
                                     "string" else WRONG[m["type"]]})
                err = c.error(cmd, **args)
                assert err.desc == (
                    f"Invalid parameter type for '{m['name']}', expected: "
                    f"{json_type(m['type'])}"), (cmd, m, err.desc)
                probed += 1
            # And the command takes no member the schema does not list.
            err = c.error(cmd, **dict(base, **{"x-not-a-member": 1}))
            assert "x-not-a-member" in err.desc, (cmd, err.desc)
        assert probed > 100
        assert d.quit() == 0
