"""Local I/O errors injected with the blkdebug filter driver (issue 17).

The disk is a qbm (its data image under a blkdebug node, through qbm's
"data-file" option) or a qcow2 (its file under blkdebug, so metadata and
bitmap stores fail too), exported by bitbackd.  A fault is armed with
x-blkdebug-inject at a chosen moment, and then:

  * the Nth write or flush after arming fails (N over a bounded range):
    the client sees an error for that request, never an ack; every
    acknowledged write is marked in the persistent bitmap after a clean
    quit and after kill -9 + reopen, unless the bitmap says it is
    inconsistent (never silently trusted with a bit missing); and the
    next `bitback backup` restores bit for bit;
  * every write of a qcow2 fails while its bitmaps are stored at quit:
    the daemon says so, and the bitmap is not trusted with missing bits;
  * a blockdev-backup job into a target over blkdebug fails cleanly: the
    sync bitmap is neither cleared nor changed, and the next `bitback
    backup` is an incremental that restores bit for bit;
  * the driver's own contract: rules at open, the counters, once, sector,
    clear, and the errors of a bad rule.
"""
import json
import random

import nbd
import pytest

from bitback_testlib import Daemon
from bitback_testlib.writer import random_write, write_lengths
from conftest import bitback
from fault_checks import (assert_covers_or_untrusted, backup_restores,
                          bitmap_info)

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB
WRITES = 12          # client writes per trial, each followed by a flush


# -- helpers ------------------------------------------------------------

def make_disk(tmp_path, fmt):
    """A disk of SIZE bytes with random data in its first half; returns
    its path."""
    if fmt == "qbm":
        img = tmp_path / "d.qbm"
        bitback("img", "create", "-f", "qbm", img, str(SIZE))
        with open(tmp_path / "d.raw", "r+b") as f:
            f.write(random.Random(1).randbytes(SIZE // 2))
    else:
        img = tmp_path / "d.qcow2"
        bitback("img", "create", "-f", "qcow2", img, str(SIZE))
        bitback("io", "-c", f"write -P 0x5a 0 {SIZE // 2}", img)
    return img


def blkdebug(filename, rules=()):
    return {"driver": "blkdebug", "node-name": "dbg",
            "image": {"driver": "file", "filename": str(filename)},
            "inject-error": list(rules)}


def blockdev(img, rules=()):
    """bitbackd's arguments: node d0 over blkdebug node dbg, exported."""
    if img.suffix == ".qbm":
        node = {"driver": "qbm", "node-name": "d0",
                "file": {"driver": "file", "filename": str(img)},
                "data-file": blkdebug(img.with_suffix(".raw"), rules)}
    else:
        node = {"driver": "qcow2", "node-name": "d0",
                "file": blkdebug(img, rules)}
    return ["--blockdev", json.dumps(node),
            "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable=on"]


def write_through(d, seed, count=WRITES):
    """count random writes to d0, each followed by a flush and on its
    own so that one failing does not stop the others.  Returns (acked,
    failed): the Acks of the acknowledged writes and the number of
    requests (writes or flushes) that failed."""
    rng = random.Random(seed)
    acked, failed = [], 0
    h = nbd.NBD()
    h.connect_uri(d.nbd_uri("d0"))
    try:
        for _ in range(count):
            try:
                acked.append(random_write(h, rng, 0, SIZE,
                                          write_lengths(4, 64, 100)))
            except nbd.Error:
                failed += 1
            try:
                h.flush()
            except nbd.Error:
                failed += 1
    finally:
        h.shutdown()
    return acked, failed


# -- the Nth write or flush fails ---------------------------------------

@pytest.mark.parametrize("fmt", ["qbm", "qcow2"])
@pytest.mark.parametrize("event", ["write", "flush"])
@pytest.mark.parametrize("stop", ["quit", "kill"])
def test_nth_request_fails(tmp_path, fmt, event, stop):
    img = make_disk(tmp_path, fmt)
    repo = tmp_path / "repo"
    bitback("bitmap", "--add", img, "b0")
    bitback("backup", "--image", img, "--repo", repo)        # the full
    # The data node sees more writes than the client makes (qcow2
    # metadata), so every N below lands inside the trial.
    for n in range(8):
        with Daemon(tmp_path / f"d{n}") as d:
            d.start(*blockdev(img), nbd=True)
            d.qmp.cmd("x-blkdebug-inject", **{"node-name": "dbg"},
                      event=event, errno=5, after=n, once=True)
            acked, failed = write_through(d, seed=n)
            assert failed == 1, f"N={n}: {failed} requests failed, not 1"
            assert len(acked) >= WRITES - 1
            if stop == "quit":
                assert d.quit() == 0, d.stderr()
            else:
                d.kill()
        assert_covers_or_untrusted(img, acked)
        if stop == "kill":
            # Reopened by a daemon: the write-intent log recovers b0.
            with Daemon(tmp_path / f"r{n}") as d:
                d.start(*blockdev(img), nbd=True)
                assert d.quit() == 0, d.stderr()
            assert_covers_or_untrusted(img, acked)
            assert not bitmap_info(img)["inconsistent"], \
                "crash-safe b0 was not recovered after kill -9"
        backup_restores(img, repo, tmp_path)


def test_qcow2_bitmap_store_fails(tmp_path):
    """Every write to the qcow2 file fails from the quit on: the bitmaps
    cannot be stored, the daemon says so and exits non-zero, and b0 is
    not trusted with a missing bit."""
    img = make_disk(tmp_path, "qcow2")
    bitback("bitmap", "--add", img, "b0")
    with Daemon(tmp_path / "d") as d:
        d.start(*blockdev(img), nbd=True)
        acked, failed = write_through(d, seed=3)
        assert failed == 0
        d.qmp.cmd("x-blkdebug-inject", **{"node-name": "dbg"},
                  event="write", errno=28)
        rc = d.quit()
        assert rc != 0, f"exit status 0 after failing to store:\n{d.stderr()}"
        assert "No space left on device" in d.stderr(), d.stderr()
    assert_covers_or_untrusted(img, acked)


# -- a fault during a backup job ----------------------------------------

def test_backup_job_target_fault(tmp_path):
    img = make_disk(tmp_path, "qbm")
    repo = tmp_path / "repo"
    bitback("backup", "--image", img, "--repo", repo)        # the full
    bm = next(b["name"] for b in json.loads(
        bitback("img", "info", "--output=json", img).stdout)
        ["format-specific"]["data"]["bitmaps"])
    tgt = tmp_path / "t.raw"
    bitback("img", "create", "-f", "raw", tgt, str(SIZE))
    with Daemon(tmp_path / "d") as d:
        d.start(*blockdev(img), nbd=True)
        write_through(d, seed=9)
        q = d.qmp
        before = q.cmd("x-debug-block-dirty-bitmap-sha256", node="d0",
                       name=bm)["sha256"]
        q.cmd("blockdev-add", driver="raw", **{"node-name": "t0"},
              file={"driver": "blkdebug", "node-name": "tdbg",
                    "image": {"driver": "file", "filename": str(tgt)},
                    "inject-error": [{"event": "write", "errno": 5,
                                      "after": 1}]})
        q.cmd("blockdev-backup", **{"job-id": "j0"}, device="d0",
              target="t0", sync="incremental", bitmap=bm,
              **{"bitmap-mode": "on-success"})
        ev = q.wait_event(lambda e: e["event"] in ("BLOCK_JOB_COMPLETED",
                                                   "BLOCK_JOB_CANCELLED")
                          and e["data"]["device"] == "j0", timeout=120)
        assert ev["event"] == "BLOCK_JOB_COMPLETED", ev
        assert "error" in ev["data"], f"the failed job reported success: {ev}"
        after = q.cmd("x-debug-block-dirty-bitmap-sha256", node="d0",
                      name=bm)["sha256"]
        assert after == before, "a failed job changed the sync bitmap"
        info = q.bitmap("d0", bm)
        assert info["recording"] and not info["busy"], info
        assert d.quit() == 0, d.stderr()
    backup_restores(img, repo, tmp_path)


# -- the driver's contract ----------------------------------------------

def test_blkdebug_rules(tmp_path):
    raw = tmp_path / "r.raw"
    bitback("img", "create", "-f", "raw", raw, str(SIZE))
    rules = [{"event": "read", "errno": "28", "after": "1", "once": "on"}]
    node = blkdebug(raw, rules)
    node["node-name"] = "d0"
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", json.dumps(node),
                "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable=on",
                nbd=True)
        q = d.qmp
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("d0"))
        try:
            # Rule from the options: the 2nd read fails once, with ENOSPC.
            h.pread(512, 0)
            with pytest.raises(nbd.Error) as e:
                h.pread(512, 0)
            assert e.value.errno == "ENOSPC"
            h.pread(512, 0)
            # sector: only requests covering sector 8 count.
            q.cmd("x-blkdebug-inject", **{"node-name": "d0"}, event="write",
                  sector=8)
            h.pwrite(b"a" * 4096, 0)
            h.pwrite(b"a" * 512, 3 * 4096)
            for _ in range(2):                  # not once: every time
                with pytest.raises(nbd.Error) as e:
                    h.pwrite(b"b" * 512, 8 * 512)
                assert e.value.errno == "EIO"
            q.cmd("x-blkdebug-clear", **{"node-name": "d0"})
            h.pwrite(b"c" * 512, 8 * 512)
            # after=2, once: the third flush fails, the others pass.
            q.cmd("x-blkdebug-inject", **{"node-name": "d0"}, event="flush",
                  after=2, once=True, errno=28)
            results = []
            for _ in range(5):
                try:
                    h.flush()
                    results.append(True)
                except nbd.Error:
                    results.append(False)
            assert results == [True, True, False, True, True]
            q.cmd("x-blkdebug-inject", **{"node-name": "d0"},
                  event="write-zeroes", once=True)
            with pytest.raises(nbd.Error):
                h.zero(4096, 0)
            h.zero(4096, 0)
            assert h.pread(512, 8 * 512) == b"c" * 512
        finally:
            h.shutdown()
        # Bad rules and nodes.
        err = q.error("x-blkdebug-inject", **{"node-name": "d0"}, event="x")
        assert "unknown event 'x'" in err.desc
        err = q.error("x-blkdebug-inject", **{"node-name": "d0"},
                      event="read", errno=0)
        assert "must not be 0" in err.desc
        err = q.error("x-blkdebug-clear", **{"node-name": "nope"})
        assert "nope" in err.desc
        other = tmp_path / "o.raw"
        bitback("img", "create", "-f", "raw", other, str(SIZE))
        err = q.error("blockdev-add", driver="blkdebug",
                      **{"node-name": "x1"},
                      image={"driver": "file", "filename": str(other)},
                      **{"inject-error": [{"event": "read", "bogus": 1}]})
        assert "unknown inject-error parameter 'bogus'" in err.desc
        assert d.quit() == 0, d.stderr()


def test_qbm_data_file_must_be_the_data_image(tmp_path):
    img = make_disk(tmp_path, "qbm")
    other = tmp_path / "o.raw"
    bitback("img", "create", "-f", "raw", other, str(SIZE))
    with Daemon(tmp_path / "d") as d:
        d.start(nbd=True)
        err = d.qmp.error("blockdev-add", driver="qbm", **{"node-name": "d0"},
                          file={"driver": "file", "filename": str(img)},
                          **{"data-file": blkdebug(other)})
        assert "'data-file' must be the data image" in err.desc, err.desc
        assert d.quit() == 0
