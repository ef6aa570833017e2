"""`bitback backup --granularity` (issue 18): the dirty bitmap a chain
starts with takes the given granularity (from 4 KiB), the manifest records
it, and the backups store their data in clusters as small, so 256
scattered 4 KiB writes store 1 MiB of data, not 256 x 64 KiB.  Offline and
live through bitbackd; every point restores bit for bit."""
import json
import random

import pytest

from bitback_testlib import Daemon
from conftest import bitback, run

MiB = 1024 * 1024
SIZE = 1024 * MiB


def scattered_writes(seed):
    """256 4 KiB writes, each in its own 64 KiB cluster."""
    rng = random.Random(seed)
    clusters = rng.sample(range(SIZE // (64 * 1024)), 256)
    return [c * 64 * 1024 + rng.randrange(16) * 4096 for c in clusters]


def io_cmds(offsets, pattern):
    cmds = []
    for off in offsets:
        cmds += ["-c", f"write -P {pattern} {off} 4K"]
    return cmds


def snapshot(img, out):
    run(["qemu-img", "convert", "-U", "-O", "raw", img, out])


def check(repo, points, tmp_path, node):
    out = json.loads(bitback("list", "--repo", repo, "--output=json").stdout)
    for b in out:
        raw = tmp_path / f"r-{b['id']}.raw"
        bitback("restore", "--repo", repo, "--node", node, "--at", b["id"],
                raw)
        run(["cmp", raw, points[int(b["id"])]])
    assert "all good" in bitback("verify", "--repo", repo).stdout
    return out


def inc_manifest(repo, node, seq):
    return json.loads((repo / node / f"{seq:06d}.json").read_text())


@pytest.mark.parametrize("gran,want_data", [("4K", MiB), (None, 16 * MiB)])
def test_offline_small_writes_store_what_changed(tmp_path, gran, want_data):
    img = tmp_path / "d.qcow2"
    bitback("img", "create", "-f", "qcow2", img, str(SIZE))
    bitback("io", "-c", "write -P 0x11 0 64M", img)
    repo = tmp_path / "repo"
    extra = ["--granularity", gran] if gran else []
    bitback("backup", "--image", img, "--repo", repo, *extra)
    points = {1: tmp_path / "p1.raw"}
    snapshot(img, points[1])
    bitback("io", *io_cmds(scattered_writes(1), 0x22), img)
    bitback("backup", "--image", img, "--repo", repo)
    points[2] = tmp_path / "p2.raw"
    snapshot(img, points[2])
    check(repo, points, tmp_path, "d")
    m = inc_manifest(repo, "d", 2)
    assert m["granularity"] == (4096 if gran else 65536)
    # The data the incremental stores: exactly the changed clusters.
    assert m["changed-bytes"] == want_data
    if gran:
        # Its file: the data plus its own small tables.
        assert m["stored-bytes"] <= 4 * MiB, m["stored-bytes"]


def test_live_bitbackd_small_writes(tmp_path):
    img = tmp_path / "d.qcow2"
    bitback("img", "create", "-f", "qcow2", img, str(SIZE))
    bitback("io", "-c", "write -P 0x11 0 64M", img)
    d = Daemon(tmp_path)
    try:
        d.start("--blockdev", f"driver=qcow2,node-name=disk0,"
                f"file.driver=file,file.filename={img}",
                "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,"
                "writable=on", nbd=True)
        repo = tmp_path / "repo"
        uri = f"nbd+unix:///disk0?socket={d.nbd_sock}"
        points = {}
        for seq in (1, 2, 3):
            if seq > 1:
                run(["qemu-io", "-f", "raw",
                     *io_cmds(scattered_writes(seq), 0x20 + seq), uri])
            extra = ["--granularity", "4K"] if seq == 1 else []
            bitback("backup", "--connect", d.qmp_sock, "--node", "disk0",
                    "--repo", repo, *extra)
            points[seq] = tmp_path / f"p{seq}.raw"
            run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri,
                 points[seq]])
        for seq in (2, 3):
            m = inc_manifest(repo, "disk0", seq)
            assert m["granularity"] == 4096
            assert m["changed-bytes"] == MiB, m
            assert m["stored-bytes"] <= 4 * MiB, m["stored-bytes"]
        assert d.quit() == 0
    finally:
        d.cleanup()
    check(repo, points, tmp_path, "disk0")


@pytest.mark.parametrize("bad", ["3K", "2K", "1M1", "0"])
def test_bad_granularity(tmp_path, bad):
    img = tmp_path / "d.qcow2"
    bitback("img", "create", "-f", "qcow2", img, "16M")
    p = bitback("backup", "--image", img, "--repo", tmp_path / "r",
                "--granularity", bad, check=False)
    assert p.returncode == 1
    assert "granularity" in p.stderr
    assert not (tmp_path / "r").exists()
