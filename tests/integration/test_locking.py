"""Image locking with QEMU's protocol (DESIGN.md invariant 8).

bitback takes QEMU's OFD lock bytes (block/file-posix.c) on every file of
an image it opens, so QEMU's tools and bitback refuse each other's images
exactly as two QEMU processes do:
  - qemu-io / qemu-img cannot write (or, without -U, even read) an image
    bitbackd serves writable; qemu-img info -U can.
  - bitbackd, `bitback io`, `bitback bitmap` and `bitback backup --image`
    refuse an image qemu-io, qemu-storage-daemon or another bitbackd holds;
    `bitback img info -U` still works.
  - every file of a qbm image is locked: descriptor, data file, bitmap
    files and the .wil write-intent log.
  - force-share=on needs a read-only node; a second daemon with the same
    --pidfile is refused, as qemu-storage-daemon refuses it.
  - `bitback img create` over an image in use is refused before anything
    is truncated, as qemu-img create is.
"""
import os
import subprocess
import time

import pytest

from bitback_testlib import QSD, Daemon, QMPError
from conftest import BITBACK, BITBACKD, require, run

LOCK_MSG = "is another process using the image"


def qemu_img_create(path, fmt="qcow2", size="16M"):
    run(["qemu-img", "create", "-f", fmt, path, size])


def make_qbm(tmp_path, name="d"):
    """d.raw wrapped by d.qbm with a persistent bitmap b0."""
    raw = tmp_path / f"{name}.raw"
    qbm = tmp_path / f"{name}.qbm"
    run([BITBACK, "img", "create", "-f", "raw", raw, "16M"])
    run([BITBACK, "img", "create", "-f", "qbm", "-o", f"data-file={raw.name}",
         qbm])
    run([BITBACK, "bitmap", "--add", qbm, "b0"])
    return qbm, raw


def serve(d, image, driver):
    d.start("--blockdev", f"driver={driver},node-name=disk0,"
            f"file.driver=file,file.filename={image}",
            "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
            nbd=True)


def assert_refused(p, msg=LOCK_MSG):
    assert p.returncode != 0, f"not refused:\n{p.stdout}\n{p.stderr}"
    assert msg.lower() in p.stderr.lower(), p.stderr


def ofd_lock_on(path, byte):
    """True when /proc/locks lists an OFD lock of path's inode covering
    byte (lines: "N: OFDLCK ADVISORY READ -1 MAJ:MIN:INODE START END")."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "OFDLCK" not in fields or len(fields) < 8:
                continue
            if int(fields[-3].rsplit(":", 1)[1]) != ino:
                continue
            end = fields[-1]
            if int(fields[-2]) <= byte and (end == "EOF" or byte <= int(end)):
                return True
    return False


def qemu_io_write(path, fmt):
    return run(["qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 512", path],
               check=False)


class Holder:
    """`qemu-io -c 'sleep N'` holding an image open in the background
    (killed by pid on exit)."""

    def __init__(self, path, fmt="qcow2", extra=()):
        require("qemu-io")
        self.path = path
        self.proc = subprocess.Popen(
            ["qemu-io", "-f", fmt, *extra, "-c", "sleep 60000", str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        # Held once the kernel lists its lock on byte 201 ("does not share
        # write", QEMU's last byte for a writer).  Watched in /proc/locks
        # rather than probed with another opener: a probing reader that
        # takes its own lock could make qemu-io itself fail to start.
        for _ in range(1500):
            if ofd_lock_on(path, 200 + 1):
                return
            assert self.proc.poll() is None, self.proc.stderr.read()
            time.sleep(0.02)
        raise AssertionError("qemu-io did not take its lock")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()


def test_qemu_io_refused_while_bitbackd_serves_qcow2(tmp_path):
    require("qemu-io")
    img = tmp_path / "d.qcow2"
    qemu_img_create(img)
    with Daemon(tmp_path) as d:
        serve(d, img.name, "qcow2")
        p = qemu_io_write(img, "qcow2")
        assert_refused(p, 'Failed to get "write" lock')
        # A reader without -U shares no write: refused too, as in QEMU.
        assert_refused(run(["qemu-img", "info", img], check=False))
        run(["qemu-img", "info", "-U", img])
        run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read 0 512", img])
        assert d.quit() == 0
    # Nothing of the refused write landed; the image is ours again.
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 512", img])
    run(["qemu-img", "check", img])


def test_each_file_of_a_served_qbm_is_locked(tmp_path):
    require("qemu-io")
    qbm, raw = make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        serve(d, qbm.name, "qbm")
        # A second bitmap: a new bitmap file and a rewritten descriptor.
        d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b1",
                  persistent=True)
        bms = sorted(tmp_path.glob("*.bm"))
        wils = sorted(tmp_path.glob("*.wil"))
        assert len(bms) == 2 and len(wils) == 1, os.listdir(tmp_path)
        for f in [raw, qbm, *bms, *wils]:
            assert_refused(qemu_io_write(f, "raw"), 'Failed to get "write" lock')
        # After the bitmap is removed its file is gone and the rest stays
        # locked.
        d.qmp.cmd("block-dirty-bitmap-remove", node="disk0", name="b1")
        assert_refused(qemu_io_write(qbm, "raw"))
        assert d.quit() == 0
    run([BITBACK, "img", "check", qbm])
    # Unlocked once the daemon is gone: the raw data file is writable.
    p = qemu_io_write(raw, "raw")
    assert p.returncode == 0, p.stderr


def test_bitback_refused_while_qemu_io_holds_the_image(tmp_path):
    img = tmp_path / "d.qcow2"
    qemu_img_create(img)
    with Holder(img):
        p = run([BITBACKD, "--blockdev", "driver=qcow2,node-name=d0,"
                 f"file.driver=file,file.filename={img}"], check=False,
                timeout=60)
        assert_refused(p, 'Failed to get "write" lock')
        assert str(img) in p.stderr
        assert_refused(run([BITBACK, "io", "-c", "write 0 512", img],
                           check=False))
        assert_refused(run([BITBACK, "bitmap", "--add", img, "b0"],
                           check=False))
        # Readers: refused without -U (qemu-io does not share write) ...
        assert_refused(run([BITBACK, "img", "info", img], check=False))
        assert_refused(run([BITBACK, "io", "-r", "-c", "read 0 512", img],
                           check=False))
        # ... and fine with it.
        out = run([BITBACK, "img", "info", "-U", img]).stdout
        assert "qcow2" in out
        run([BITBACK, "img", "map", "-U", img])
        run([BITBACK, "io", "-r", "-U", "-c", "read 0 512", img])
    # Released: everything works again, and no bitmap was added behind
    # qemu-io's back.
    run([BITBACK, "bitmap", "--add", img, "b0"])
    run([BITBACK, "io", "-c", "write 0 512", img])


def test_bitbackd_refused_while_qsd_serves_the_image(tmp_path):
    require(QSD)
    img = tmp_path / "d.qcow2"
    qemu_img_create(img)
    with Daemon(tmp_path / "qsd", binary=QSD) as q:
        q.start("--blockdev", "driver=file,node-name=f0,"
                f"filename={img}",
                "--blockdev", "driver=qcow2,node-name=d0,file=f0",
                "--export", "type=nbd,id=e0,node-name=d0,writable=on",
                nbd=True)
        with Daemon(tmp_path / "bb") as d:
            with pytest.raises(AssertionError, match="is another process"):
                serve(d, img, "qcow2")
        run([BITBACK, "img", "info", "-U", img])
        assert q.quit() == 0


def test_second_bitbackd_and_offline_backup_refused(tmp_path):
    qbm, raw = make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        serve(d, qbm.name, "qbm")
        with Daemon(tmp_path) as d2:
            with pytest.raises(AssertionError, match="is another process"):
                serve(d2, qbm.name, "qbm")
        # Even the data file alone, through another node type.
        with Daemon(tmp_path) as d2:
            with pytest.raises(AssertionError, match="is another process"):
                serve(d2, raw.name, "raw")
        # The offline backup must not read an image being written.
        repo = tmp_path / "repo"
        p = run([BITBACK, "backup", "--image", qbm, "--repo", repo],
                check=False)
        assert_refused(p)
        assert str(qbm) in p.stderr
        assert d.running()
        assert d.quit() == 0
    # Once the daemon is gone the offline backup works.
    run([BITBACK, "backup", "--image", qbm, "--repo", tmp_path / "repo"])


def test_force_share_needs_read_only(tmp_path):
    img = tmp_path / "d.qcow2"
    qemu_img_create(img)
    other = tmp_path / "o.qcow2"
    qemu_img_create(other)
    msg = "force-share=on can only be used with read-only images"
    p = run([BITBACK, "io", "-U", "-c", "read 0 512", img], check=False)
    assert_refused(p, msg)
    with Daemon(tmp_path) as d:
        serve(d, img.name, "qcow2")
        e = d.qmp.error("blockdev-add", {
            "driver": "qcow2", "node-name": "o0", "force-share": True,
            "file": {"driver": "file", "filename": str(other)}})
        assert msg in e.desc
        # Inside one daemon as across processes: a reader of a file a
        # writable node holds needs force-share, as in QEMU.
        e = d.qmp.error("blockdev-add", {
            "driver": "qcow2", "node-name": "r0", "read-only": True,
            "file": {"driver": "file", "filename": str(img)}})
        assert LOCK_MSG in e.desc.lower()
        d.qmp.cmd("blockdev-add", {
            "driver": "qcow2", "node-name": "r0", "read-only": True,
            "force-share": True,
            "file": {"driver": "file", "filename": str(img)}})
        d.qmp.cmd("blockdev-del", {"node-name": "r0"})
        # locking=off on the file node: no lock bytes taken or checked.
        d.qmp.cmd("blockdev-add", {
            "driver": "qcow2", "node-name": "o1", "read-only": True,
            "file": {"driver": "file", "filename": str(img),
                     "locking": "off"}})
        d.qmp.cmd("blockdev-del", {"node-name": "o1"})
        e = d.qmp.error("blockdev-add", {
            "driver": "qcow2", "node-name": "o2",
            "file": {"driver": "file", "filename": str(other),
                     "locking": "maybe"}})
        assert "locking" in e.desc
        assert d.quit() == 0
    p = run([BITBACKD, "--blockdev", "driver=qcow2,node-name=d0,"
             f"file.driver=file,file.filename={img},force-share=on"],
            check=False, timeout=60)
    assert_refused(p, msg)


def test_second_daemon_with_same_pidfile_refused(tmp_path):
    a = tmp_path / "a.qcow2"
    b = tmp_path / "b.qcow2"
    qemu_img_create(a)
    qemu_img_create(b)
    with Daemon(tmp_path / "one") as d:
        pidfile = d.sockdir / "shared.pid"
        d.start("--blockdev", "driver=qcow2,node-name=d0,"
                f"file.driver=file,file.filename={a}",
                "--pidfile", pidfile)
        for _ in range(500):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.02)
        assert pidfile.read_text().strip() == str(d.pid)
        p = run([BITBACKD, "--blockdev", "driver=qcow2,node-name=d0,"
                 f"file.driver=file,file.filename={b}",
                 "--pidfile", pidfile], check=False, timeout=60)
        assert p.returncode != 0
        assert "pid file" in p.stderr and str(pidfile) in p.stderr, p.stderr
        # The loser left the winner's pidfile alone.
        assert pidfile.read_text().strip() == str(d.pid)
        # qemu-storage-daemon honours the same lock.
        require(QSD)
        p = run([QSD, "--blockdev", f"driver=file,node-name=f0,filename={b}",
                 "--pidfile", pidfile], check=False, timeout=60)
        assert p.returncode != 0 and "pid file" in p.stderr.lower(), p.stderr
        assert pidfile.read_text().strip() == str(d.pid)
        assert d.quit() == 0
    assert not pidfile.exists()


def test_img_create_over_an_image_in_use_is_refused(tmp_path):
    img = tmp_path / "d.qcow2"
    qemu_img_create(img, size="1M")
    qbm, raw = make_qbm(tmp_path)
    with Holder(img):
        for fmt in ("qcow2", "raw"):
            assert_refused(run([BITBACK, "img", "create", "-f", fmt, img, "2M"],
                               check=False))
        # The same refusal from qemu-img, the same protocol.
        assert_refused(run(["qemu-img", "create", "-f", "qcow2", img, "2M"],
                           check=False))
    info = run(["qemu-img", "info", "--output=json", img]).stdout
    assert '"virtual-size": 1048576' in info and '"qcow2"' in info, info
    with Daemon(tmp_path) as d:
        serve(d, qbm.name, "qbm")
        before = qbm.read_text()
        assert_refused(run([BITBACK, "img", "create", "-f", "qbm", qbm,
                            "16M"], check=False))
        assert_refused(run([BITBACK, "img", "create", "-f", "raw", raw, "1M"],
                           check=False))
        assert qbm.read_text() == before
        assert raw.stat().st_size == 16 * 1024 * 1024
        assert d.quit() == 0
    run([BITBACK, "img", "check", qbm])
