"""A full filesystem and bad names (issue 15, item 10).

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
import contextlib
import os
import subprocess

import nbd
import pytest

from bitback_testlib import Daemon
from conftest import BITBACK, bitback, run

K = 1024


@contextlib.contextmanager
def small_fs(tmp_path, size="2m"):
    """A tmpfs of `size` mounted at tmp_path/mnt; unmounted on exit."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt])
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder):
    """Write a file in folder until the filesystem is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(100000):     # bounded: 400 MB at most
            os.write(fd, b"\xaa" * 4096)
        raise AssertionError("the filesystem did not fill up")
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)


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
