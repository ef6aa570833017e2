"""`bitback backup --pull` (issue 19): full and incremental backups read
over NBD from the daemon's fleecing export, from bitbackd (qcow2) and
qemu-storage-daemon (qcow2 and raw).

Chains: full, inc, inc with a writer running during each backup (the
references are read through NBD with the writer paused, as in
test_backup_cli); every point restores bit for bit and `qemu-img compare`
agrees; the daemon's working folder never receives a file, and the pull
folder bitback uses on this host ($TMPDIR/bitback-pull-UID) is empty
after each run.

Interruptions: the daemon has no NBD server of its own, so bitback starts
one; `bitback backup --pull --progress` is killed (SIGKILL) or
interrupted (SIGINT) once its first progress draw shows the copy running
(no timing: the fleecing node exists from before the transaction until
the run's cleanup).  SIGINT cleans up by itself; after SIGKILL the next
run does.  Then no bbf- node or export, no job, no NBD server are left,
the repository verifies, and the next run is an incremental holding the
killed run's changes that restores bit for bit.
"""
import os
import pathlib
import select
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from bitback_testlib import Daemon
from bitback_testlib.daemon import QSD
from bitback_testlib.nbdio import read_all
from conftest import bitback, require, run
from test_backup_cli import (backup_cmd, check_point, listing, live_writer,
                             run_backup_live)

MiB = 1024 * 1024
KINDS = [("bitbackd", "qcow2"), ("qsd", "qcow2"), ("qsd", "raw")]


@pytest.fixture
def pulltmp(monkeypatch):
    """A short $TMPDIR for bitback (its pull folder holds a UNIX socket).
    Python's own temporary folder is fixed first, so the test's other
    temporary files do not land there."""
    tempfile.gettempdir()
    d = pathlib.Path(tempfile.mkdtemp(prefix="bbt-"))
    monkeypatch.setenv("TMPDIR", str(d))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def pull_dir_clean(pulltmp):
    """Only the (empty) pull folder is left of what bitback made here."""
    left = [p.relative_to(pulltmp) for p in pulltmp.rglob("*")]
    assert left in ([], [pathlib.Path(f"bitback-pull-{os.getuid()}")]), left


def serve(tmp_path, kind, fmt, size, nbd, data_mib=0):
    """disk0 (fmt, size bytes, the first data_mib MiB written with a
    pattern in every other MiB) served by kind from tmp_path/daemon, with
    an NBD export of its own when nbd."""
    require("qemu-img")
    wd = tmp_path / "daemon"
    wd.mkdir()
    img = wd / f"disk0.{fmt}"
    run(["qemu-img", "create", "-q", "-f", fmt, img, str(size)])
    cmds = []
    for m in range(0, data_mib, 2):
        cmds += ["-c", f"write -P {m % 250 + 1} {m}M 1M"]
    if cmds:
        run(["qemu-io", "-f", fmt, *cmds, img])
    d = Daemon(wd, binary=QSD if kind == "qsd" else None)
    args = ["--blockdev", f"driver=file,node-name=f0,filename={img.name}",
            "--blockdev", f"driver={fmt},node-name=disk0,file=f0"]
    if nbd:
        args += ["--export",
                 "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"]
    try:
        d.start(*args, nbd=nbd)
    except BaseException:
        d.cleanup()
        raise
    return d


def only_daemon_files(d, before):
    """The daemon's folder got no file but the daemon's own for its disk
    (bitbackd's write-intent log disk0.FMT.wil): nothing of the
    repository, no overlay."""
    new = set(os.listdir(d.workdir)) - set(before)
    assert all(n.startswith("disk0.") and n.endswith(".wil") for n in new), \
        new


def assert_no_fleecing(d):
    """No bbf- node or export, no job, no temporary bitmap in the daemon
    (a separate QMP connection: qemu-storage-daemon serves one at a
    time)."""
    q = d.connect_qmp()
    try:
        nodes = q.cmd("query-named-block-nodes")
        assert not [n["node-name"] for n in nodes
                    if n["node-name"].startswith("bbf-")]
        assert not [e["id"] for e in q.cmd("query-block-exports")
                    if e["id"].startswith("bbf-")]
        assert q.cmd("query-jobs") == []
        disk = [n for n in nodes if n["node-name"] == "disk0"][0]
        assert not [b["name"] for b in disk.get("dirty-bitmaps", [])
                    if b["name"].endswith(".src")]
    finally:
        q.close()


def pull_chain(d, repo, tmp_path, extra, after_each):
    """full, inc, inc with `bitback backup ... *extra` while a writer runs
    through d's export disk0 (d: a Daemon, or anything with its nbd_uri
    and qmp_sock); after_each() after every run.  Then every point
    restores bit for bit and `qemu-img compare` agrees with the copies
    read at the transaction times, and the repository verifies."""
    writer = live_writer([d.nbd_uri("disk0")])
    writer.start()
    points = []
    try:
        for tag, level in [("p1", "full"), ("p2", "inc"), ("p3", "inc")]:
            time.sleep(0.3)            # writes between backups
            bid, refs, err = run_backup_live(
                d, repo, ["disk0"], level, writer, tmp_path, tag, *extra,
                speed=None)
            assert "taking a full backup" not in err, err
            points.append((bid, refs["disk0"]))
            after_each()
    finally:
        writer.stop()
    assert writer.writes > 20
    backups = listing(repo)
    assert [b["level"] for b in backups] == ["full", "inc", "inc"]
    ids = [b["id"] for b in backups]
    assert [p[0] for p in points] == ids
    assert [b.get("parent") for b in backups[1:]] == ids[:2]
    for b in backups[1:]:
        assert 0 < b["changed-bytes"] < 32 * MiB, b
    for bid, ref in points:
        check_point(repo, "disk0", bid, ref, tmp_path)
        run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw",
             repo / "disk0" / f"{bid}.qcow2", ref])
    bitback("verify", "--repo", repo)


@pytest.mark.parametrize("kind,fmt", KINDS)
def test_pull_chain_under_load(tmp_path, pulltmp, kind, fmt):
    """full, inc, inc pulled while a writer runs; every point restores bit
    for bit; nothing of the repository reaches the daemon's folder."""
    repo = tmp_path / "repo"
    d = serve(tmp_path, kind, fmt, 32 * MiB, nbd=True, data_mib=32)
    try:
        daemon_files = sorted(os.listdir(d.workdir))
        pull_chain(d, repo, tmp_path, ["--pull", "--nbd-socket", str(d.nbd_sock)],
                   lambda: pull_dir_clean(pulltmp))
        only_daemon_files(d, daemon_files)
        assert_no_fleecing(d)
    finally:
        d.cleanup()


def write_through_export(d, sock, cmds, ref=None):
    """qemu-io cmds on disk0 through an NBD server and export the test
    starts and stops again (its nbd-server-start also proves that no
    server of bitback's is left); then, when ref, the disk read into the
    file ref."""
    q = d.connect_qmp()
    try:
        q.cmd("nbd-server-start",
              addr={"type": "unix", "data": {"path": str(sock)}})
        q.cmd("block-export-add", type="nbd", id="tw", name="disk0",
              writable=True, **{"node-name": "disk0"})
        uri = f"nbd+unix:///disk0?socket={sock}"
        if cmds:
            run(["qemu-io", "-f", "raw", *cmds, uri])
        if ref:
            read_all(uri, ref)
        q.del_export("tw")
        q.cmd("nbd-server-stop")
    finally:
        q.close()


def until_copying(p, timeout=120):
    """Read p's stderr until its first progress draw ("backup [")."""
    seen = b""
    deadline = time.monotonic() + timeout
    fd = p.stderr.fileno()
    while b"backup [" not in seen:
        left = deadline - time.monotonic()
        assert left > 0, seen
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"bitback ended before copying: {seen!r}"
            seen += chunk
    return seen


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT],
                         ids=["sigkill", "sigint"])
@pytest.mark.parametrize("kind,fmt", KINDS)
def test_pull_interrupted(tmp_path, pulltmp, kind, fmt, sig):
    repo = tmp_path / "repo"
    d = serve(tmp_path, kind, fmt, 256 * MiB, nbd=False)
    sock = d.sockdir / "tw.sock"
    try:
        daemon_files = sorted(os.listdir(d.workdir))
        full = run(backup_cmd(d, repo, ["disk0"], "full", "--pull"))
        assert "pushing" not in full.stderr, full.stderr
        pull_dir_clean(pulltmp)
        before = listing(repo)
        ref = tmp_path / "ref.raw"
        write_through_export(d, sock, ["-c", "write -P 7 0 192M"], ref)
        p = subprocess.Popen(backup_cmd(d, repo, ["disk0"], "inc", "--pull",
                                        "--progress"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            until_copying(p)
            p.send_signal(sig)
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert listing(repo) == before
        bitback("verify", "--repo", repo)
        if sig == signal.SIGINT:
            assert p.returncode == 128 + sig, err
            assert b"nothing was committed" in err, err
            assert_no_fleecing(d)
            pull_dir_clean(pulltmp)
        else:
            assert p.returncode == -sig
            q = d.connect_qmp()         # the killed run's leftovers
            try:
                assert [n["node-name"] for n in
                        q.cmd("query-named-block-nodes")
                        if n["node-name"].startswith("bbf-")]
            finally:
                q.close()
        nxt = run(backup_cmd(d, repo, ["disk0"], "inc", "--pull"))
        assert "taking a full backup" not in nxt.stderr, nxt.stderr
        assert_no_fleecing(d)
        pull_dir_clean(pulltmp)
        write_through_export(d, sock, [])    # no server of bitback's left
        last = listing(repo)[-1]
        assert last["level"] == "inc" and last["parent"] == before[-1]["id"]
        assert last["changed-bytes"] >= 192 * MiB
        check_point(repo, "disk0", last["id"], ref, tmp_path)
        run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw",
             repo / "disk0" / f"{last['id']}.qcow2", ref])
        bitback("verify", "--repo", repo)
        assert not list((repo / "disk0").glob(".*.tmp"))
        only_daemon_files(d, daemon_files)
    finally:
        d.cleanup()
