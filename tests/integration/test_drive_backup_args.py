"""A rejected drive-backup leaves its target alone (issue 15, item 9).

drive-backup creates (truncates) its target file unless mode=existing.
Every argument is checked before that happens, so a command that fails on
an argument leaves an existing file byte for byte as it was, standalone and
as a transaction action.  (qemu-storage-daemon 7.2 truncates the target
first and checks afterwards: these tests are for bitbackd only.)  A valid
drive-backup still works, with mode=existing and absolute-paths.
"""
import hashlib
import os

import pytest

from bitback_testlib import Daemon
from conftest import run
from test_transaction import BACKUP_ERRORS

MiB = 1024 * 1024
SIZE = 8 * MiB


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_file(path, size, seed):
    rng = __import__("random").Random(seed)
    path.write_bytes(rng.randbytes(size))
    return path


def raw_node(name, filename):
    return f"driver=raw,node-name={name},file.driver=file,file.filename={filename}"


@pytest.fixture
def daemon(tmp_path):
    random_file(tmp_path / "src.raw", SIZE, 1)
    random_file(tmp_path / "other.raw", SIZE, 2)
    with Daemon(tmp_path) as d:
        d.start("--blockdev", raw_node("d0", tmp_path / "src.raw"),
                "--blockdev", raw_node("d1", tmp_path / "other.raw"), nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0")
        yield d


def args(target, **kw):
    a = {"job-id": "j", "device": "d0", "target": str(target), "sync": "full",
         "format": "raw"}
    a.update(kw)
    return {k: v for k, v in a.items() if v is not None}


# (extra arguments, a part of the error message): the bitmap and sync
# checks test_transaction.py runs on blockdev-backup, and more.
INVALID = BACKUP_ERRORS[:8] + [
    (dict(speed=-5), "Parameter 'speed' expects a non-negative value"),
    (dict(device="nope"), "Cannot find device='nope' nor node-name='nope'"),
    (dict(mode="bogus"), "Parameter 'mode' does not accept value 'bogus'"),
    (dict(format="bogus"), "Unknown file format 'bogus'"),
    (dict(format="bogus", mode="existing"), "Unknown file format 'bogus'"),
    (dict(sync="bogus"), "Parameter 'sync' does not accept value 'bogus'"),
    (dict(**{"on-source-error": "x"}),
     "Parameter 'on-source-error' does not accept value 'x'"),
    (dict(**{"job-id": "1bad"}), "Invalid job ID '1bad'"),
    (dict(compress=True), "Compression is not supported"),
    (dict(speed="fast"), "speed', expected: integer"),
    (dict(extra=1), "extra' is unexpected"),
]


@pytest.mark.parametrize("as_txn", [False, True], ids=["command", "transaction"])
def test_rejected_drive_backup_leaves_target_intact(daemon, tmp_path, as_txn):
    q = daemon.qmp
    victim = random_file(tmp_path / "victim.raw", 3 * MiB, 7)
    want = sha(victim)
    for kw, msg in INVALID:
        a = args(victim, **kw)
        if as_txn:
            err = q.error("transaction",
                          actions=[{"type": "drive-backup", "data": a}])
        else:
            err = q.error("drive-backup", a)
        assert msg in err.desc, (kw, err.desc)
        assert sha(victim) == want, f"{kw} changed the target ({err.desc})"
        assert q.cmd("query-jobs") == []
    # Creating over the image of an open node would destroy it.
    src_sha = sha(tmp_path / "src.raw")
    for target in (tmp_path / "src.raw", tmp_path / "other.raw"):
        err = q.error("drive-backup", args(target))
        assert "is the image of node" in err.desc, err.desc
    assert sha(tmp_path / "src.raw") == src_sha
    assert q.cmd("query-jobs") == []


def test_job_id_in_use_and_busy_source_leave_target_intact(daemon, tmp_path):
    q = daemon.qmp
    victim = random_file(tmp_path / "victim.raw", 3 * MiB, 7)
    want = sha(victim)
    # A job that stays running: 1 byte/s.
    q.cmd("drive-backup", args(tmp_path / "slow.raw", speed=1,
                               **{"job-id": "j1"}))
    try:
        err = q.error("drive-backup", args(victim, device="d1",
                                           **{"job-id": "j1"}))
        assert "Job ID 'j1' already in use" in err.desc, err.desc
        assert sha(victim) == want
        err = q.error("drive-backup", args(victim, **{"job-id": "j2"}))
        assert "Node 'd0' is busy" in err.desc, err.desc
        assert sha(victim) == want
    finally:
        q.cmd("job-cancel", id="j1")
        for _ in range(1000):
            if not q.cmd("query-jobs"):
                break
            daemon.qmp.get_event("JOB_STATUS_CHANGE", timeout=10)
    assert q.cmd("query-jobs") == []


def wait_done(q, job_id):
    while True:
        ev = q.get_event("BLOCK_JOB_COMPLETED", timeout=60)
        if ev["data"]["device"] == job_id:
            assert "error" not in ev["data"], ev
            return


def test_valid_drive_backup_still_works(daemon, tmp_path):
    q = daemon.qmp
    # mode=existing into a file of the right size.
    existing = random_file(tmp_path / "existing.raw", SIZE, 9)
    q.cmd("drive-backup", args(existing, mode="existing", **{"job-id": "e"}))
    wait_done(q, "e")
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
         tmp_path / "src.raw", existing])
    # absolute-paths: a new file, and over an existing file no node uses.
    for name in ("new.raw", "victim.raw"):
        target = tmp_path / name
        if name == "victim.raw":
            random_file(target, 3 * MiB, 7)
        q.cmd("drive-backup", args(target, **{"job-id": "n"}))
        wait_done(q, "n")
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
             tmp_path / "src.raw", target])
    # The same through a transaction, with a bitmap (incremental).
    q.cmd("transaction", actions=[
        {"type": "drive-backup",
         "data": args(tmp_path / "inc.raw", sync="incremental", bitmap="b0",
                      **{"job-id": "i"})}])
    wait_done(q, "i")
    assert os.path.getsize(tmp_path / "inc.raw") == SIZE
    assert daemon.quit() == 0
