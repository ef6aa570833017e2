"""A full filesystem and bad names (issue 15, item 10; issue 17).

The images live on a small tmpfs mounted by the test (we run as root) and
unmounted in its finally, so "No space left on device" is real:

  * block-dirty-bitmap-add persistent=true on a qbm in a full folder fails
    with ENOSPC in its message and leaves the folder as it found it (no
    orphan bitmap files, the descriptor unchanged);
  * a daemon whose write-intent log cannot record a bitmap change (ENOSPC)
    by the time it shuts down exits non-zero;
  * bitmap and node names holding a NUL ("b\\u0000x" over QMP JSON) or a
    control character are refused with a clear error, over QMP and by
    `bitback bitmap --add`.
"""
import os

import nbd
import pytest

from bitback_testlib import Daemon
from bitback_testlib.smallfs import fill, small_fs
from bitback_testlib.writer import Ack
from conftest import BITBACK, bitback, run
from fault_checks import assert_covers_or_untrusted, backup_restores

K = 1024


def listing(folder):
    return {p.name: p.read_bytes() if p.name.endswith(".qbm") else p.stat().st_size
            for p in folder.iterdir()}


def make_qbm(folder, size=256 * K):
    img = folder / "d.qbm"
    bitback("img", "create", "-f", "qbm", img, str(size))
    with open(folder / "d.raw", "r+b") as f:   # data blocks allocated now
        f.write(os.urandom(size))
    return img


def blockdev(img):
    return ["--blockdev", f"driver=qbm,node-name=d0,file.driver=file,"
            f"file.filename={img}",
            "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable=on"]


def nbd_write(d, off, length):
    h = nbd.NBD()
    h.connect_uri(d.nbd_uri("d0"))
    try:
        h.pwrite(os.urandom(length), off)
        h.flush()
    finally:
        h.shutdown()


def test_persistent_bitmap_add_on_full_fs(tmp_path):
    with small_fs(tmp_path) as mnt, Daemon(tmp_path / "d") as d:
        img = make_qbm(mnt)
        d.start(*blockdev(img), nbd=True)
        fill(mnt)
        before = listing(mnt)
        err = d.qmp.error("block-dirty-bitmap-add", node="d0", name="b0",
                          persistent=True)
        assert "No space left on device" in err.desc, err.desc
        assert "free file name" not in err.desc, err.desc
        assert listing(mnt) == before, "the failed add left files behind"
        assert d.qmp.bitmap("d0", "b0") is None
        # The node works on: the same add succeeds once there is room.
        (mnt / "filler").unlink()
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0",
                  persistent=True)
        assert d.quit() == 0, d.stderr()
        assert sorted(p.name for p in mnt.iterdir()) == \
            ["d.b0.bm", "d.qbm", "d.qbm.wil", "d.raw"]


def test_daemon_exit_status_when_intent_log_hits_enospc(tmp_path):
    with small_fs(tmp_path) as mnt, Daemon(tmp_path / "d") as d:
        img = make_qbm(mnt)
        d.start(*blockdev(img), nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0",
                  persistent=True)
        nbd_write(d, 128 * K, 64 * K)
        assert d.quit() == 0, d.stderr()    # the bitmap file's bits exist now
        d.restart(*blockdev(img), nbd=True)
        fill(mnt)
        nbd_write(d, 0, 64 * K)
        # The clear must reach the write-intent log, which cannot grow.
        d.qmp.cmd("block-dirty-bitmap-clear", node="d0", name="b0")
        rc = d.quit()
        err = d.stderr()
        assert "cannot write the write-intent log" in err, err
        assert "No space left on device" in err, err
        assert rc != 0, f"exit status 0 after failing to persist:\n{err}"


@pytest.mark.parametrize("name", ["b\u0000x", "\u0000", "b\u0001x", "b\nx",
                                  "b\u007fx"])
def test_bitmap_name_with_nul_or_control_char_refused(tmp_path, name):
    img = make_qbm(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start(*blockdev(img), nbd=True)
        err = d.qmp.error("block-dirty-bitmap-add", node="d0", name=name,
                          persistent=True)
        assert ("NUL character" in err.desc or "control characters" in err.desc), \
            err.desc
        err = d.qmp.error("block-dirty-bitmap-add", node="d0", name=name)
        assert ("NUL character" in err.desc or "control characters" in err.desc), \
            err.desc
        assert d.qmp.node("d0").get("dirty-bitmaps", []) == []
        # A transaction is checked the same way.
        err = d.qmp.error("transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "d0", "name": name}}])
        assert ("NUL character" in err.desc or "control characters" in err.desc), \
            err.desc
        assert d.quit() == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("d.")) \
        == ["d.qbm", "d.raw"]


def test_node_name_with_nul_refused(tmp_path):
    img = make_qbm(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start(*blockdev(img), nbd=True)
        # "d0\u0000x" would otherwise reach node d0.
        err = d.qmp.error("block-dirty-bitmap-add", node="d0\u0000x", name="b0")
        assert "Parameter 'node' must not contain a NUL character" in err.desc
        err = d.qmp.error("blockdev-add", driver="raw",
                          **{"node-name": "n1"},
                          file={"driver": "file",
                                "filename": f"{tmp_path}/d.raw\u0000.x"})
        assert "'file.filename' must not contain a NUL" in err.desc, err.desc
        err = d.qmp.error("quit\u0000x")
        assert d.running()
        assert d.quit() == 0


def test_cli_bitmap_add_refuses_control_chars(tmp_path):
    img = make_qbm(tmp_path)
    p = run([BITBACK, "bitmap", "--add", img, "b\x01x"], check=False)
    assert p.returncode != 0
    assert "control characters" in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.qbm", "d.raw"]


# -- ENOSPC during a bitmap store, the intent log, a repository commit ---
# (issue 17: these held on the code before it; they are its coverage.)

def test_repository_commit_on_full_fs(tmp_path):
    """The repository's filesystem fills up during an incremental: the run
    fails saying so, the repository verifies, and once there is room the
    next incremental restores bit for bit."""
    img = make_qbm(tmp_path, size=1024 * K)
    with small_fs(tmp_path, size="4m", name="repofs") as mnt:
        repo = mnt / "repo"
        bitback("backup", "--image", img, "--repo", repo)     # the full
        bitback("io", "-c", f"write -P 0x11 {128 * K} {512 * K}", img)
        fill(mnt)
        p = bitback("backup", "--image", img, "--repo", repo, check=False)
        assert p.returncode != 0, p.stdout
        assert "No space left on device" in p.stderr, p.stderr
        bitback("verify", "--repo", repo)
        (mnt / "filler").unlink()
        backup_restores(img, repo, tmp_path)


def test_bitmap_store_and_intent_log_on_full_fs(tmp_path):
    """Image, bitmap files and write-intent log on a full filesystem: the
    data writes that find no room fail, every acknowledged one is marked
    in b0 (or b0 is untrusted) after a quit that cannot store the bitmaps
    and after kill -9, and the next incremental restores bit for bit."""
    for stop in ("quit", "kill"):
        with small_fs(tmp_path, size="3m", name=f"fs-{stop}") as mnt:
            img = mnt / "d.qbm"
            bitback("img", "create", "-f", "qbm", img, str(1024 * K))
            repo = tmp_path / f"repo-{stop}"
            bitback("bitmap", "--add", img, "b0")
            bitback("backup", "--image", img, "--repo", repo)   # the full
            args = ["--blockdev", f"driver=qbm,node-name=d0,file.driver=file,"
                    f"file.filename={img},crash-safe-region-size=65536",
                    "--export", "type=nbd,id=e0,node-name=d0,name=d0,"
                    "writable=on"]
            with Daemon(tmp_path / f"d-{stop}") as d:
                d.start(*args, nbd=True)
                fill(mnt)
                # Bitmaps change (the data image is sparse: its writes
                # need room too) and the log must record new regions.
                d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b1",
                          persistent=False)
                acked, failed = [], 0
                h = nbd.NBD()
                h.connect_uri(d.nbd_uri("d0"))
                try:
                    for i in range(16):
                        off = i * 64 * K
                        try:
                            h.pwrite(os.urandom(4 * K), off)
                            h.flush()
                            acked.append(Ack(off, 4 * K, None))
                        except nbd.Error:
                            failed += 1
                finally:
                    h.shutdown()
                assert failed > 0, "the full filesystem failed no write"
                if stop == "quit":
                    d.quit()
                else:
                    d.kill()
            (mnt / "filler").unlink()
            if stop == "kill":
                with Daemon(tmp_path / f"r-{stop}") as d:
                    d.start(*args, nbd=True)
                    assert d.quit() == 0, d.stderr()
            assert_covers_or_untrusted(img, acked)
            backup_restores(img, repo, tmp_path, expect=None)
