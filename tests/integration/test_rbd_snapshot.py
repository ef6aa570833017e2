"""Internal snapshots of RBD images over QMP, and a bitmap of what changed
since one (issue 20's fast-diff fallback, its daemon side), against the
real single-node Ceph (the session fixture `ceph`).

blockdev-snapshot-internal-sync (QEMU's command and transaction action)
makes an RBD snapshot of the image under a node (rbd, or raw over rbd);
blockdev-snapshot-delete-internal-sync removes it and returns QEMU's
SnapshotInfo.  block-dirty-bitmap-add with bitback's
x-changed-since-snapshot fills the new bitmap from RBD's own diff since
that snapshot (fast-diff: whole 4 MiB objects), at the same point in time
as the rest of a transaction.
"""
import json
import random

from backup_scenarios import nbd_write as write
from bitback_testlib import Daemon, QMPError
from conftest import dirty_extents
from test_rbd import MiB, OBJ, name, start_serving

SIZE = 64 * MiB


def snaps(ceph, image):
    out = ceph.tool("rbd", "snap", "ls", "--format", "json", f"rbd/{image}",
                    text=True).stdout
    return sorted(s["name"] for s in json.loads(out))


def scattered(rng, objects, length=64 * 1024):
    """One write of `length` random bytes somewhere inside each of the
    given 4 MiB objects."""
    return [(o * OBJ + rng.randrange(0, OBJ - length) // 4096 * 4096,
             rng.randbytes(length)) for o in objects]


def bitmap_objects(d, node, bitmap):
    """The 4 MiB objects the bitmap's dirty extents touch (seen through a
    temporary export of node with the bitmap)."""
    d.qmp.cmd("block-export-add", type="nbd", id="view", **{"node-name": node},
              name="view", writable=True, bitmaps=[bitmap])
    try:
        ext = dirty_extents(d.nbd_uri("view"), bitmap)
    finally:
        d.qmp.del_export("view")
    objs = set()
    for off, length in ext:
        objs.update(range(off // OBJ, (off + length - 1) // OBJ + 1))
    return objs, sum(length for _, length in ext)


def test_snapshot_commands_and_changed_since(ceph, tmp_path):
    image = name("snap")
    ceph.tool("rbd", "create", "--size", f"{SIZE // MiB}M", f"rbd/{image}")
    d = Daemon(tmp_path)
    try:
        uri = start_serving(d, ceph, image)
        q = d.qmp
        rng = random.Random(20)
        write(uri, scattered(rng, range(SIZE // OBJ)))     # every object
        # Through the raw node d0 (passed to its rbd file child).
        q.cmd("blockdev-snapshot-internal-sync", device="d0", name="s1")
        assert snaps(ceph, image) == ["s1"]
        changed = [1, 5, 6, 13]
        write(uri, scattered(rng, changed))
        q.cmd("block-dirty-bitmap-add", node="d0", name="since",
              **{"x-changed-since-snapshot": "s1"})
        objs, nbytes = bitmap_objects(d, "d0", "since")
        # fast-diff knows objects: exactly the objects written since s1.
        assert objs == set(changed), objs
        assert nbytes == len(changed) * OBJ

        # In a transaction: a new snapshot and a bitmap since the old one
        # meet at one point; an aborted transaction leaves no snapshot.
        write(uri, scattered(rng, [2]))
        q.cmd("transaction", actions=[
            {"type": "blockdev-snapshot-internal-sync",
             "data": {"device": "r0", "name": "s2"}},
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "d0", "name": "since2",
                      "x-changed-since-snapshot": "s1"}}])
        assert snaps(ceph, image) == ["s1", "s2"]
        # query-named-block-nodes lists them as QEMU's ImageInfo does, on
        # the rbd node and on the raw node over it.
        for n in q.cmd("query-named-block-nodes"):
            listed = [x["name"] for x in n["image"].get("snapshots", [])]
            assert listed == ["s1", "s2"], (n["node-name"], listed)
        assert bitmap_objects(d, "d0", "since2")[0] == set(changed) | {2}
        try:
            q.cmd("transaction", actions=[
                {"type": "blockdev-snapshot-internal-sync",
                 "data": {"device": "r0", "name": "s3"}},
                {"type": "abort", "data": {}}])
            raise AssertionError("the abort action did not fail")
        except QMPError:
            pass
        assert snaps(ceph, image) == ["s1", "s2"]

        # Errors: a taken name, a missing snapshot, a node without
        # snapshots; none leaves a bitmap or a snapshot behind.
        for args, words in [
                ({"device": "r0", "name": "s1"}, "already exists"),
                ({"device": "r0", "name": ""}, "empty"),
                ({"device": "nope", "name": "x"}, "nope")]:
            try:
                q.cmd("blockdev-snapshot-internal-sync", **args)
                raise AssertionError(f"accepted {args}")
            except QMPError as e:
                assert words in str(e), e
        try:
            q.cmd("block-dirty-bitmap-add", node="d0", name="bad",
                  **{"x-changed-since-snapshot": "no-such"})
            raise AssertionError("accepted a missing snapshot")
        except QMPError as e:
            assert "not found" in str(e), e
        assert all(b["name"] != "bad" for n in q.cmd("query-named-block-nodes")
                   for b in n.get("dirty-bitmaps", []))

        info = q.cmd("blockdev-snapshot-delete-internal-sync", device="r0",
                     name="s1")
        assert info["name"] == "s1" and int(info["id"]) > 0
        assert info["date-sec"] > 0 and info["vm-state-size"] == 0
        assert snaps(ceph, image) == ["s2"]
        try:
            q.cmd("blockdev-snapshot-delete-internal-sync", device="r0",
                  name="s1")
            raise AssertionError("deleted a missing snapshot")
        except QMPError as e:
            assert "not found" in str(e), e
        assert d.quit() == 0
    finally:
        d.cleanup()


def test_snapshot_refused_where_unsupported(tmp_path):
    img = tmp_path / "disk.raw"
    img.write_bytes(b"\0" * MiB)
    d = Daemon(tmp_path)
    try:
        d.start("--blockdev", f"driver=file,node-name=f0,filename={img}")
        try:
            d.qmp.cmd("blockdev-snapshot-internal-sync", device="f0", name="s")
            raise AssertionError("a file node took a snapshot")
        except QMPError as e:
            assert "does not support internal snapshots" in str(e), e
        assert d.quit() == 0
    finally:
        d.cleanup()
