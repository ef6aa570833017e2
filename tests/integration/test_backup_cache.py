"""`bitback backup --cache=none|writeback` (-t, as qemu-img convert's): how
a backup into a folder writes its data file and hashes it after.

none writes the file with O_DIRECT (bitbackd's target node gets
cache.direct=on; offline and pulled backups open it so in-process) and
hashes it the same way, so a backup leaves the host's page cache to the
VMs: right after each backup, `fincore` must find almost none of the new
file in the page cache, where writeback (the default) leaves most of it
there.  Every point still restores byte for byte.  A filesystem that
refuses O_DIRECT (ramfs, mounted by the test as root; tmpfs takes
O_DIRECT on this kernel) is a clear error with --cache=none that leaves
nothing behind, and the next run with writeback is whole.
"""
import errno
import json
import os
import random

import pytest

from bitback_testlib import QSD, Daemon
from bitback_testlib.nbdio import connect
from conftest import bitback, require, run, start_qcow2_rw

MiB = 1024 * 1024
SIZE = 32 * MiB
CHANGE = 8 * MiB


def resident(path):
    """Bytes of path in the page cache (util-linux fincore)."""
    p = run(["fincore", "--bytes", "--noheadings", "--output", "RES",
             str(path)])
    return int(p.stdout.split()[0])


def newest_qcow2(repo):
    files = sorted(repo.rglob("*.qcow2"))
    assert files, list(repo.rglob("*"))
    return files[-1]


def restore_and_compare(repo, bid, ref, tmp_path):
    out = tmp_path / f"restored-{bid}.raw"
    bitback("restore", "--repo", repo, "--node", "disk", "--at", bid,
            "-f", "raw", out)
    with open(out, "rb") as f:
        assert f.read() == ref, f"backup {bid} differs"
    out.unlink()


def make_source(tmp_path, rng):
    """A qcow2 disk of SIZE random bytes from rng: (its path, the bytes,
    as a bytearray the test changes along with the disk)."""
    data = bytearray(rng.randbytes(SIZE))
    src = tmp_path / "disk.qcow2"
    raw = tmp_path / "disk.raw"
    raw.write_bytes(data)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
         str(src)])
    raw.unlink()
    return src, data


def check_residency(path, cache, stored):
    res = resident(path)
    if cache == "none":
        # Only what the daemon read of the parent's metadata may be cached
        # elsewhere; the new file itself was written and read with O_DIRECT.
        assert res <= stored // 10, (path, res, stored)
    else:
        assert res >= stored // 2, (path, res, stored)


@pytest.mark.parametrize("mode", ["bitbackd", "qsd", "offline"])
@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_backup_cache_chain(tmp_path, mode, cache):
    require("fincore")
    if mode == "qsd":
        require(QSD)
    rng = random.Random(hash((mode, cache)) & 0xffff)
    src, data = make_source(tmp_path, rng)
    repo = tmp_path / "repo"
    slots = rng.sample(range(SIZE // MiB), CHANGE // MiB)
    opts = ["--compress=off", f"--cache={cache}"]
    refs = []

    def change(write):
        for s in slots:
            buf = rng.randbytes(MiB)
            data[s * MiB:(s + 1) * MiB] = buf
            write(buf, s * MiB)

    def offline_write(buf, off):
        part = tmp_path / "part"
        part.write_bytes(buf)
        bitback("io", "-f", "qcow2", src, "-c",
                f"write -q -s {part} {off} {len(buf)}")

    if mode == "offline":
        cmd = ["backup", "--image", src, "--node", "disk", "--repo", repo]
        bitback(*cmd, *opts)
        check_residency(newest_qcow2(repo), cache, SIZE)
        refs.append(bytes(data))
        change(offline_write)
        bitback(*cmd, *opts)
        check_residency(newest_qcow2(repo), cache, CHANGE)
        refs.append(bytes(data))
    else:
        with Daemon(tmp_path / mode,
                    binary=QSD if mode == "qsd" else None) as d:
            cmd = start_qcow2_rw(d, src) + ["--repo", repo]
            bitback(*cmd, *opts)
            check_residency(newest_qcow2(repo), cache, SIZE)
            refs.append(bytes(data))
            h = connect(d.nbd_uri("disk"))
            change(h.pwrite)
            h.flush()
            h.shutdown()
            bitback(*cmd, *opts)
            check_residency(newest_qcow2(repo), cache, CHANGE)
            refs.append(bytes(data))
            # Nothing of the run is left in the daemon: its target node
            # was removed.
            nodes = [n["node-name"] for n in
                     d.qmp.cmd("query-named-block-nodes")]
            assert not [n for n in nodes if n.startswith("bbt-")], nodes
            d.quit()
    listing = json.loads(bitback("list", "--repo", repo,
                                 "--output=json").stdout)
    assert [b["level"] for b in listing] == ["full", "inc"], listing
    assert listing[1]["changed-bytes"] == CHANGE, listing[1]
    for b, ref in zip(listing, refs):
        restore_and_compare(repo, b["id"], ref, tmp_path)
    bitback("verify", "--repo", repo)
    for f in sorted(repo.rglob("*.qcow2")):
        p = run(["qemu-img", "check", "--output=json", "-f", "qcow2",
                 str(f)])
        info = json.loads(p.stdout)
        assert not info.get("corruptions") and not info.get("leaks"), info


def test_backup_cache_option_parsing(tmp_path):
    for bad in ("directsync", "", "None", "unsafe"):
        p = bitback("backup", "--image", tmp_path / "x.qcow2", "--repo",
                    tmp_path / "repo", f"--cache={bad}", check=False)
        assert p.returncode != 0 and "--cache must be none or writeback" in \
            p.stderr, (bad, p.stderr)
    assert "--cache none|writeback" in bitback("backup", "--help").stdout


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs mount, which refuses O_DIRECT opens (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting ramfs needs root")
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    if run(["mount", "-t", "ramfs", "ramfs", str(mnt)],
           check=False).returncode != 0:
        pytest.skip("cannot mount ramfs here")
    try:
        try:
            os.close(os.open(mnt / "probe", os.O_CREAT | os.O_RDWR |
                             os.O_DIRECT))
            pytest.skip("this kernel's ramfs takes O_DIRECT")
        except OSError as e:
            assert e.errno == errno.EINVAL, e
        (mnt / "probe").unlink()
        yield mnt
    finally:
        run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("mode", ["bitbackd", "offline"])
def test_backup_cache_none_refused_without_o_direct(tmp_path, ramfs, mode):
    src, data = make_source(tmp_path, random.Random(7))
    repo = ramfs / "repo"

    def refused(cmd):
        p = bitback(*cmd, "--compress=off", "--cache=none", check=False)
        assert p.returncode == 1, (p.returncode, p.stderr)
        assert "--cache=none: cannot open" in p.stderr and \
            "with O_DIRECT: Invalid argument" in p.stderr, p.stderr
        # Nothing of the run is left but its attempt marker, which never
        # reached its transaction (spec, "Bitmaps" (2)): no data file, no
        # temporary file, no backup listed.
        left = sorted(f.name for f in (repo / "disk").iterdir())
        assert left == [".lock", "000001.attempt"], left
        marker = json.loads((repo / "disk" / "000001.attempt").read_text())
        assert marker["started"] is False, marker
        assert json.loads(bitback("list", "--repo", repo,
                                  "--output=json").stdout) == []

    def whole(cmd):
        bitback(*cmd, "--compress=off", "--cache=writeback")
        listing = json.loads(bitback("list", "--repo", repo,
                                     "--output=json").stdout)
        assert [b["level"] for b in listing] == ["full"], listing
        restore_and_compare(repo, listing[0]["id"], bytes(data), tmp_path)
        bitback("verify", "--repo", repo)

    if mode == "offline":
        cmd = ["backup", "--image", src, "--node", "disk", "--repo", repo]
        refused(cmd)
        whole(cmd)
    else:
        with Daemon(tmp_path / mode) as d:
            cmd = start_qcow2_rw(d, src) + ["--repo", repo]
            refused(cmd)
            nodes = [n["node-name"] for n in
                     d.qmp.cmd("query-named-block-nodes")]
            assert not [n for n in nodes if n.startswith("bbt-")], nodes
            assert d.running()
            whole(cmd)
            d.quit()
