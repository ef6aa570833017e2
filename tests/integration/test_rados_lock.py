"""Per-disk locks of a repository in a Ceph pool (docs/specs/repository.md,
"Locks", L5): RADOS object locks on NODE/.lock that expire unless renewed,
held by real bitback processes against the test's own single-node Ceph.

- A rate-limited live backup through bitbackd holds its disk for longer
  than the lock's duration (BITBACK_RADOS_LOCK_SECONDS=3): its renewals
  keep it, so a second backup and a prune of the disk are refused (the
  message names the holder and when a dead run's lock expires), while a
  restore of an earlier backup and a backup of another disk go ahead; the
  held backup then commits.
- `bitback serve` holds a disk against prune (nothing deleted); a backup
  goes ahead.
- A killed backup's lock is refused until it expires, then the next run
  is a correct incremental.
- A lock broken behind a running backup's back (`rados lock break`, as an
  operator or a lock timeout would) makes that backup fail before it
  commits: nothing is published, and the next run goes ahead.
"""
import json
import signal
import subprocess
import time

from bitback_testlib import Daemon
from conftest import BITBACK, bitback, start_qcow2_rw
from test_rados_repo import pool_for, repo_name
from test_repo_lock import (SPEED, listing, make_disk, others_while_held,
                            refused, restore_bytes,
                            serve_holds_disk_against_prune)

LOCK_SECONDS = 3


def start_slow_backup(d, repo, level="full"):
    """A rate-limited live backup of disk in the background; returns once
    it holds the disk (it printed that its backup started)."""
    p = subprocess.Popen([BITBACK, "backup", "--connect", d.qmp_sock,
                          "--node", "disk", "--repo", repo, "--level", level,
                          "--compress=off", "--speed", str(SPEED)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    line = ""
    for _ in range(100):                # bounded: a line each
        line = p.stderr.readline()
        if not line or " started (" in line:
            break
    assert " started (" in line, (line, p.poll())
    return p


def finish(p, timeout=120):
    try:
        _, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


def lockers(ceph, pool):
    out = ceph.tool("rados", "-p", pool, "lock", "info", "disk/.lock",
                    "write", "--format=json").stdout
    return json.loads(out if isinstance(out, str) else out.decode())["lockers"]


def rados_disk(tmp_path, ceph, monkeypatch, seed):
    """A pool's repository and a qcow2 disk of seeded random data: (pool,
    repo, the disk's path, its data)."""
    monkeypatch.setenv("BITBACK_RADOS_LOCK_SECONDS", str(LOCK_SECONDS))
    pool = pool_for(ceph)
    src = tmp_path / "disk.qcow2"
    return pool, repo_name(ceph, pool), src, make_disk(src, seed)


def first_full(d, src, repo):
    start_qcow2_rw(d, src)
    bitback("backup", "--connect", d.qmp_sock, "--node", "disk",
            "--repo", repo, "--level", "full", "--compress=off")


def test_rados_backup_holds_its_disk(tmp_path, ceph, monkeypatch):
    pool, repo, src, data = rados_disk(tmp_path, ceph, monkeypatch, 1)
    other = tmp_path / "other.qcow2"
    other_data = make_disk(other, 2)
    with Daemon(tmp_path / "d") as d:
        first_full(d, src, repo)
        p = start_slow_backup(d, repo)
        try:
            # Longer than the lock's duration: only renewals keep it.
            time.sleep(LOCK_SECONDS + 1.5)
            assert p.poll() is None, "the slow backup ended too soon"
            others_while_held(tmp_path, repo, src, data, other, p, (
                "held by client.", "(cookie bitback backup, pid ",
                f"expires {LOCK_SECONDS} s after"))
            rc, err = finish(p)
            assert rc == 0, err
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert lockers(ceph, pool) == [], "the lock was not released"

        # Killed while it holds the disk: refused until the lock expires,
        # then the next run is an incremental on the last backup.
        before = listing(repo)
        p = start_slow_backup(d, repo, "inc")
        p.send_signal(signal.SIGKILL)
        p.wait()
        nxt = bitback("backup", "--connect", d.qmp_sock, "--node", "disk",
                      "--repo", repo, "--level", "inc", "--compress=off",
                      check=False)
        refused(nxt, "another bitback backup or prune is writing it")
        time.sleep(LOCK_SECONDS + 1)
        nxt = bitback("backup", "--connect", d.qmp_sock, "--node", "disk",
                      "--repo", repo, "--level", "inc", "--compress=off")
        assert "taking a full backup" not in nxt.stderr, nxt.stderr
        after = listing(repo)
        assert len(after) == len(before) + 1
        assert after[-1]["level"] == "inc" and after[-1]["node"] == "disk"
        d.quit()
    for b in listing(repo):
        want = data if b["node"] == "disk" else other_data
        assert restore_bytes(repo, b["node"], b["id"], tmp_path) == want
    bitback("prune", "--repo", repo, "--node", "disk", "--keep-last", "1")
    bitback("verify", "--repo", repo)


def test_rados_lost_lock_fails_the_backup(tmp_path, ceph, monkeypatch):
    pool, repo, src, data = rados_disk(tmp_path, ceph, monkeypatch, 3)
    with Daemon(tmp_path / "d") as d:
        first_full(d, src, repo)
        before = listing(repo)
        p = start_slow_backup(d, repo)
        try:
            held = lockers(ceph, pool)
            assert len(held) == 1, held
            ceph.tool("rados", "-p", pool, "lock", "break", "disk/.lock",
                      "write", held[0]["name"], "--lock-cookie",
                      held[0]["cookie"])
            rc, err = finish(p)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert rc != 0, err
        assert "the lock 'write' on disk/.lock was lost" in err, err
        assert listing(repo) == before
        bitback("backup", "--connect", d.qmp_sock, "--node", "disk",
                "--repo", repo, "--level", "inc", "--compress=off")
        d.quit()
    last = listing(repo)[-1]
    assert last["level"] == "inc", last
    assert restore_bytes(repo, "disk", last["id"], tmp_path) == data
    bitback("verify", "--repo", repo)


def test_rados_serve_holds_its_disk_against_prune(tmp_path, ceph,
                                                  monkeypatch):
    _, repo, src, data = rados_disk(tmp_path, ceph, monkeypatch, 4)
    serve_holds_disk_against_prune(tmp_path, repo, src, data,
                                   holder="(cookie bitback read, pid ")
