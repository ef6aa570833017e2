"""Backups of an RBD disk keep an RBD snapshot of the newest backup's point
in time, and a run whose bitmaps are lost takes an incremental from RBD's
fast-diff since that snapshot instead of a full (issue 20's fallback),
against the real single-node Ceph (the session fixture `ceph`).

bitbackd serves an rbd node with a persistent bitmap; `bitback backup`
full, then inc (each run snapshots the image as PREFIX-ID, keeping only
the newest); then the bitmap is removed (as a lost or inconsistent one
would be), writes land in two 4 MiB objects, and the next run says in one
line that it uses fast-diff, stores only those objects, and every point
restores bit for bit.
"""
import json
import random
import subprocess

from backup_scenarios import nbd_write
from bitback_testlib import Daemon
from conftest import BITBACK, bitback, repo_prefix, run
from test_rbd import MiB, OBJ, name
from test_rbd_snapshot import scattered, snaps

SIZE = 64 * MiB


def backup(d, repo, level="auto"):
    p = subprocess.run([BITBACK, "backup", "--connect", str(d.qmp_sock),
                        "--node", "disk0", "--repo", str(repo), "--level",
                        level, "--compress=off"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stderr


def serve_rbd(d, ceph, image):
    """Start d with the RBD image as rbd node disk0, exported writable;
    returns its NBD URI."""
    d.start("--blockdev", json.dumps({
                "driver": "rbd", "node-name": "disk0", "pool": "rbd",
                "image": image, "conf": ceph.conf}),
            "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,"
                        "writable=on", nbd=True)
    return d.nbd_uri("disk0")


def listed(repo):
    return json.loads(bitback("list", "--repo", repo, "--output=json").stdout)


def allocated(path):
    out = run(["qemu-img", "map", "--output=json", "-f", "qcow2",
               str(path)]).stdout
    return sum(e["length"] for e in json.loads(out)
               if e["depth"] == 0 and e["data"])


def test_lost_bitmap_uses_fast_diff(ceph, tmp_path):
    image = name("fb")
    ceph.tool("rbd", "create", "--size", f"{SIZE // MiB}M", f"rbd/{image}")
    repo = tmp_path / "repo"
    refs = {}
    d = Daemon(tmp_path / "d")
    try:
        uri = serve_rbd(d, ceph, image)
        rng = random.Random(21)
        nbd_write(uri, scattered(rng, range(SIZE // OBJ)))

        def point(tag):
            out = tmp_path / f"ref-{tag}.raw"
            ceph.tool("rbd", "export", f"rbd/{image}", str(out))
            refs[tag] = out.read_bytes()

        point(1)
        backup(d, repo, "full")
        prefix = repo_prefix(repo)
        assert snaps(ceph, image) == [f"{prefix}-000001"]

        nbd_write(uri, scattered(rng, [3, 9]))
        point(2)
        err = backup(d, repo)
        assert "fast-diff" not in err, err
        assert snaps(ceph, image) == [f"{prefix}-000002"]     # only the newest

        # The bitmap is lost; the change since backup 2 touches objects 4
        # and 10 only.
        d.qmp.cmd("block-dirty-bitmap-remove", node="disk0",
                  name=f"{prefix}-000002")
        # A killed run's snapshot (its backup never committed) goes too.
        d.qmp.cmd("blockdev-snapshot-internal-sync", device="disk0",
                  name=f"{prefix}-000007")
        changed = [4, 10]
        nbd_write(uri, scattered(rng, changed))
        point(3)
        err = backup(d, repo)
        assert f"RBD fast-diff since snapshot '{prefix}-000002'" in err, err
        assert "taking a full backup" not in err, err
        assert snaps(ceph, image) == [f"{prefix}-000003"]
        assert d.quit() == 0
    finally:
        d.cleanup()

    backups = {b["id"]: b for b in listed(repo) if b["node"] == "disk0"}
    third = backups["000003"]
    assert third["level"] == "inc" and third.get("parent") == "000002", third
    # Stored: the two changed objects (fast-diff's unit), no more.
    stored = allocated(repo / "disk0" / "000003.qcow2")
    assert 2 * 64 * 1024 <= stored <= len(changed) * OBJ, stored
    for tag in (1, 2, 3):
        out = tmp_path / f"restored-{tag}.raw"
        bitback("restore", "--repo", repo, "--node", "disk0", "--at",
                f"{tag:06d}", "-f", "raw", out)
        assert out.read_bytes() == refs[tag], f"backup {tag} differs"
    bitback("verify", "--repo", repo)


def test_rbd_disk_chain_into_the_cluster_repository(ceph, tmp_path):
    """The whole of issue 20 in one flow: an RBD disk with its persistent
    bitmap in RADOS, backed up full, inc, inc into `--repo rbd:POOL` with
    a writer in between; every point restored by another process in an
    empty folder (only the cluster's conf) equals `rbd export` at that
    point; verify passes; prune --keep-last 1 keeps the newest restorable."""
    from test_rados_repo import elsewhere, pool_for, repo_name
    image = name("chain")
    ceph.tool("rbd", "create", "--size", f"{SIZE // MiB}M", f"rbd/{image}")
    repo = repo_name(ceph, pool_for(ceph))
    refs = {}
    d = Daemon(tmp_path / "d")
    try:
        uri = serve_rbd(d, ceph, image)
        rng = random.Random(22)
        nbd_write(uri, scattered(rng, range(0, SIZE // OBJ, 2)))
        for n, objs in enumerate([[1], [5, 12], [3]], start=1):
            out = tmp_path / f"ref-{n}.raw"
            ceph.tool("rbd", "export", f"rbd/{image}", str(out))
            refs[n] = out.read_bytes()
            err = backup(d, repo, "full" if n == 1 else "inc")
            assert "taking a full backup" not in err, err
            nbd_write(uri, scattered(rng, objs))
        assert d.quit() == 0
    finally:
        d.cleanup()

    def restore(tag):
        out = tmp_path / f"restored-{tag}-{random.random()}.raw"
        elsewhere(tmp_path, ceph, "restore", "--repo", repo, "--node", "disk0",
                  "--at", f"{tag:06d}", "-f", "raw", str(out))
        return out.read_bytes()

    levels = {b["id"]: b["level"] for b in json.loads(elsewhere(
        tmp_path, ceph, "list", "--repo", repo, "--output=json").stdout)}
    assert levels == {"000001": "full", "000002": "inc", "000003": "inc"}
    for tag in (1, 2, 3):
        assert restore(tag) == refs[tag], f"backup {tag} differs"
    elsewhere(tmp_path, ceph, "verify", "--repo", repo)
    elsewhere(tmp_path, ceph, "prune", "--repo", repo, "--keep-last", "1")
    assert restore(3) == refs[3]
    elsewhere(tmp_path, ceph, "verify", "--repo", repo)


def test_raw_over_rbd_keeps_persistent_bitmaps(ceph, tmp_path):
    """A disk given as raw over an rbd child it opens (QEMU's usual
    layering, libvirt's `file.driver=rbd`) gets persistent bitmaps from
    `bitback backup` as a bare rbd node does: a daemon started afresh
    elsewhere finds the bitmap in RADOS and the next run is an incremental
    of the change only, without the fast-diff fallback."""
    image = name("rawrbd")
    ceph.tool("rbd", "create", "--size", f"{SIZE // MiB}M", f"rbd/{image}")
    repo = tmp_path / "repo"
    rng = random.Random(23)

    def start(d):
        d.start("--blockdev", json.dumps({
                    "driver": "raw", "node-name": "disk0", "file": {
                        "driver": "rbd", "pool": "rbd", "image": image,
                        "conf": ceph.conf}}),
                "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,"
                            "writable=on", nbd=True)
        return d.nbd_uri("disk0")

    d = Daemon(tmp_path / "d1")
    try:
        nbd_write(start(d), scattered(rng, range(0, SIZE // OBJ, 3)))
        err = backup(d, repo, "full")
        assert "cannot store persistent bitmaps" not in err, err
        prefix = repo_prefix(repo)
        bms = {b["name"]: b for n in d.qmp.cmd("query-named-block-nodes")
               for b in n.get("dirty-bitmaps", [])}
        assert bms[f"{prefix}-000001"]["persistent"] is True, bms
        assert d.quit() == 0
    finally:
        d.cleanup()

    d = Daemon(tmp_path / "d2")         # another "host": no local state
    try:
        nbd_write(start(d), scattered(rng, [7]))
        out = tmp_path / "ref.raw"
        ceph.tool("rbd", "export", f"rbd/{image}", str(out))
        err = backup(d, repo)
        assert "fast-diff" not in err and "full" not in err, err
        assert d.quit() == 0
    finally:
        d.cleanup()
    second = {b["id"]: b for b in listed(repo)}["000002"]
    assert second["level"] == "inc", second
    assert allocated(repo / "disk0" / "000002.qcow2") <= OBJ
    restored = tmp_path / "restored.raw"
    bitback("restore", "--repo", repo, "--node", "disk0", "-f", "raw", restored)
    assert restored.read_bytes() == out.read_bytes()


def test_raw_over_a_shared_rbd_node_gets_volatile_bitmaps(ceph, tmp_path):
    """raw over an rbd node the user opened on its own: the rbd node owns
    the image's bitmaps (rbd.c R5), the raw node cannot store any, so the
    run adds an in-memory bitmap and says so, instead of failing."""
    image = name("rawsh")
    ceph.tool("rbd", "create", "--size", f"{SIZE // MiB}M", f"rbd/{image}")
    d = Daemon(tmp_path / "d")
    try:
        d.start("--blockdev", json.dumps({
                    "driver": "rbd", "node-name": "r0", "pool": "rbd",
                    "image": image, "conf": ceph.conf}),
                "--blockdev", "driver=raw,node-name=disk0,file=r0")
        nodes = {n["node-name"]: n for n in d.qmp.cmd("query-named-block-nodes")}
        assert nodes["r0"]["persistent-bitmaps"] is True
        assert nodes["disk0"]["persistent-bitmaps"] is False
        err = backup(d, tmp_path / "repo", "full")
        assert "a raw node cannot store persistent bitmaps" in err, err
        assert d.quit() == 0
    finally:
        d.cleanup()
