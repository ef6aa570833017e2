"""Files an image names are opened without following a symbolic link in
their last component, and only if they are regular files: a FIFO is refused
instead of hanging the command (issue 17, defect 6; docs/specs/qbm.md Q9,
Q10).  The image the user names may be a link, but never a FIFO."""
import os
import subprocess

import pytest

from bitback_testlib import Daemon, QMPError
from conftest import BITBACK

BOUND = 20      # seconds: far more than any of these commands needs


def bb(*args):
    """Run bitback, bounded: a hang fails the test (TimeoutExpired)."""
    return subprocess.run([BITBACK, *map(str, args)], capture_output=True,
                          text=True, timeout=BOUND)


def make(path, *bitmaps):
    p = bb("img", "create", "-f", "qbm", path, "1M")
    assert p.returncode == 0, p.stderr
    for b in bitmaps:
        p = bb("bitmap", "--add", path, b)
        assert p.returncode == 0, p.stderr


def blockdev_add_fails(d, filename, read_only, **kw):
    """blockdev-add of the qbm `filename` over QMP fails; its message."""
    with pytest.raises(QMPError) as ei:
        d.qmp.cmd("blockdev-add", driver="qbm", **{"node-name": "x0"},
                  **{"read-only": read_only},
                  file={"driver": "file", "filename": str(filename)}, **kw)
    return ei.value.desc


@pytest.fixture
def daemon(tmp_path):
    with Daemon(tmp_path / "d") as d:
        d.start()
        yield d


def test_bitmap_symlink_to_other_image_is_refused(tmp_path, daemon):
    other = tmp_path / "other"
    other.mkdir()
    make(other / "b.qbm", "b0")
    make(tmp_path / "a.qbm", "b0")
    victim = other / "b.b0.bm"
    before = victim.read_bytes()
    link = tmp_path / "a.b0.bm"
    link.unlink()
    os.symlink(victim, link)

    p = bb("bitmap", "--add", tmp_path / "a.qbm", "b1")
    assert p.returncode != 0
    assert "symbolic link" in p.stderr and "a.b0.bm" in p.stderr, p.stderr
    msg = blockdev_add_fails(daemon, tmp_path / "a.qbm", False)
    assert "symbolic link" in msg, msg
    # Also with locking off (no lock fd): the bitmap loads inconsistent
    # and is never rewritten.
    daemon.qmp.cmd("blockdev-add", driver="qbm", **{"node-name": "x1"},
                   file={"driver": "file", "locking": "off",
                         "filename": str(tmp_path / "a.qbm")})
    daemon.qmp.cmd("blockdev-del", **{"node-name": "x1"})
    assert victim.read_bytes() == before
    assert daemon.quit() == 0
    assert victim.read_bytes() == before
    assert os.path.islink(link)


def test_data_file_symlink_is_refused(tmp_path, daemon):
    make(tmp_path / "a.qbm")
    (tmp_path / "a.raw").rename(tmp_path / "real.raw")
    os.symlink(tmp_path / "real.raw", tmp_path / "a.raw")
    p = bb("img", "info", tmp_path / "a.qbm")
    assert p.returncode != 0
    assert "symbolic link" in p.stderr, p.stderr
    msg = blockdev_add_fails(daemon, tmp_path / "a.qbm", True)
    assert "symbolic link" in msg, msg


@pytest.mark.parametrize("victim", ["a.b0.bm", "a.raw"])
def test_fifo_named_by_image_is_refused(tmp_path, daemon, victim):
    make(tmp_path / "a.qbm", "b0")
    (tmp_path / victim).unlink()
    os.mkfifo(tmp_path / victim)
    for args in (["img", "info", tmp_path / "a.qbm"],
                 ["bitmap", "--add", tmp_path / "a.qbm", "b1"],
                 ["bitmap", "--clear", tmp_path / "a.qbm", "b0"]):
        p = bb(*args)
        assert p.returncode != 0, args
        assert "FIFO" in p.stderr and victim in p.stderr, p.stderr
    for ro in (True, False):
        msg = blockdev_add_fails(daemon, tmp_path / "a.qbm", ro)
        assert "FIFO" in msg and victim in msg, msg
    assert daemon.quit() == 0


def test_fifo_as_the_image_is_refused(tmp_path, daemon):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    for fmt in ([], ["-f", "raw"], ["-f", "qbm"], ["-f", "qcow2"]):
        p = bb("img", "info", *fmt, fifo)
        assert p.returncode != 0, fmt
        assert "FIFO" in p.stderr, p.stderr
    for drv in ("raw", "qbm", "qcow2"):
        with pytest.raises(QMPError) as ei:
            daemon.qmp.cmd("blockdev-add", driver=drv, **{"node-name": "x0"},
                           file={"driver": "file", "filename": str(fifo)})
        assert "FIFO" in ei.value.desc
    with pytest.raises(QMPError) as ei:
        daemon.qmp.cmd("blockdev-add", driver="file", **{"node-name": "x0"},
                       filename=str(fifo))
    assert "FIFO" in ei.value.desc
    assert daemon.quit() == 0


def test_user_named_image_may_be_a_symlink(tmp_path):
    """The user's own name may be a link (as qemu-img follows it); the
    files the image names are then resolved in the link's folder."""
    make(tmp_path / "a.qbm", "b0")
    os.symlink(tmp_path / "a.qbm", tmp_path / "link2")
    p = bb("img", "info", tmp_path / "link2")
    assert p.returncode == 0, p.stderr


def test_write_intent_log_fifo_or_link_is_refused(tmp_path):
    """IMAGE.wil is named from the image: a FIFO there is not waited on,
    and a link there is not followed (its target is not written)."""
    make(tmp_path / "a.qbm", "b0")
    wil = tmp_path / "a.qbm.wil"
    if wil.exists():
        wil.unlink()
    os.mkfifo(wil)
    p = bb("bitmap", "--add", tmp_path / "a.qbm", "b1")
    assert p.returncode != 0
    assert "FIFO" in p.stderr and "a.qbm.wil" in p.stderr, p.stderr
    p = bb("img", "info", tmp_path / "a.qbm")      # read-only: no log used
    assert p.returncode == 0, p.stderr
    wil.unlink()
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    os.symlink(target, wil)
    p = bb("bitmap", "--add", tmp_path / "a.qbm", "b1")
    assert p.returncode != 0
    assert "symbolic link" in p.stderr and "a.qbm.wil" in p.stderr, p.stderr
    assert target.read_bytes() == b"keep me"
