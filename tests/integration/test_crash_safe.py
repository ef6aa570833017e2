"""Crash-safe bitmaps (issue 7, docs/specs/write-intent.md).

SIGKILL trials: a writer logs every acknowledged write, bitbackd is killed
at a random moment and restarted; the bitmap must load consistent, cover
every acknowledged write, and give an incremental backup that restores to
the image byte for byte (crash_scenarios.trial).  tests/stress/crash_trials.py
runs the same trial hundreds of times.
"""
import json
import pathlib
import shutil
import tempfile

import pytest

from conftest import repo_bitmap, require
import crash_scenarios


@pytest.fixture(autouse=True)
def tools():
    for t in ("qemu-img", "nbdinfo"):
        require(t)


@pytest.mark.parametrize("seed", range(12))
def test_sigkill_trial_qbm(tmp_path, seed):
    r = crash_scenarios.trial(tmp_path, "qbm", seed)
    assert r["acked"] > 0, r
    # Over-approximation is bounded by the marked regions: with 1 MiB
    # regions and at most 64 marked between snapshots, plus those written
    # while a snapshot is taken.
    assert r["over"] <= 80 * crash_scenarios.MiB, r


@pytest.mark.parametrize("seed", range(100, 110))
def test_sigkill_trial_qcow2(tmp_path, seed):
    r = crash_scenarios.trial(tmp_path, "qcow2", seed)
    assert r["acked"] > 0, r
    assert r["over"] <= 80 * crash_scenarios.MiB, r


def _bitmap_extents(d, names):
    """Dirty extents of each bitmap in names, through a temporary export
    (writable, as QEMU requires for an enabled bitmap; nothing writes)."""
    q = d.qmp
    q.cmd("block-export-add", type="nbd", id="bx", writable=True,
          bitmaps=list(names), **{"node-name": "disk0", "name": "bx"})
    try:
        return {n: crash_scenarios.dirty_extents(d.nbd_uri("bx"), n)
                for n in names}
    finally:
        q.del_export("bx")


def _union(*extent_lists):
    ranges = sorted(r for l in extent_lists for r in l)
    out = []
    for s, l in ranges:
        if out and s <= out[-1][0] + out[-1][1]:
            e = max(out[-1][0] + out[-1][1], s + l)
            out[-1] = (out[-1][0], e - out[-1][0])
        else:
            out.append((s, l))
    return out


@pytest.mark.parametrize("kill_after", [0.2, 0.6, 1.2])
def test_crash_mid_backup_job(tmp_path, kill_after):
    """The daemon dies while `bitback backup` runs its job: after the
    restart both bitmaps of the chain load consistent and together cover
    every acknowledged write, and the next run is a correct incremental."""
    import subprocess
    import time
    from bitback_testlib import Daemon
    from conftest import BITBACK, run

    crash_scenarios.make_disk(tmp_path, "qbm")
    repo = tmp_path / "repo"
    d = Daemon(tmp_path)
    try:
        d.start("--blockdev", crash_scenarios.blockdev("qbm"), "--export",
                "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on", nbd=True)
        crash_scenarios.backup(d, repo, "full")
        w = crash_scenarios.writers(d.nbd_uri("disk0"), seed=int(kill_after * 10))
        w.start()
        time.sleep(0.5)
        p = subprocess.Popen([BITBACK, "backup", "--connect", str(d.qmp_sock),
                              "--node", "disk0", "--repo", repo, "--level", "inc",
                              "--speed", "64K"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            line = p.stderr.readline()
            assert "started" in line, line + p.stderr.read()
            time.sleep(kill_after)
            d.kill()
            w.join()
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode != 0           # it lost its daemon
        acked = list(w.acked)
        assert acked

        d.restart("--blockdev", crash_scenarios.blockdev("qbm"), nbd=True)
        n1, n2 = repo_bitmap(repo, "000001"), repo_bitmap(repo, "000002")
        b1 = d.qmp.bitmap("disk0", n1)
        b2 = d.qmp.bitmap("disk0", n2)
        assert b1 and b2, d.qmp.node("disk0")["dirty-bitmaps"]
        assert not b1["inconsistent"] and not b2["inconsistent"]
        assert b2["recording"] and not b1["recording"]
        ext = _bitmap_extents(d, [n1, n2])
        both = _union(*ext.values())
        missing = [a for a in acked if not crash_scenarios.covered(both, a.offset, a.length)]
        assert not missing, missing[:5]

        q = d.qmp
        q.cmd("block-export-add", type="nbd", id="e0", writable=True,
              **{"node-name": "disk0", "name": "disk0"})
        run(["qemu-io", "-f", "raw", "-c", "write -P 77 7M 1M", d.nbd_uri("disk0")])
        p2 = crash_scenarios.backup(d, repo, "inc")
        assert "taking a full backup" not in p2.stderr, p2.stderr
        listing = json.loads(run([BITBACK, "list", "--repo", repo,
                                  "--output=json"]).stdout)
        assert [b["level"] for b in listing] == ["full", "inc"], listing
        crash_scenarios.read_all(d.nbd_uri("disk0"), tmp_path / "now.raw")
        run([BITBACK, "restore", "--repo", repo, "--at", "latest",
             tmp_path / "r.raw"])
        run(["cmp", tmp_path / "r.raw", tmp_path / "now.raw"])
        assert d.quit() == 0
    finally:
        d.cleanup()


@pytest.mark.parametrize("delay_ms", [0, 1, 3, 10, 40])
def test_crash_mid_clear_transaction(tmp_path, delay_ms):
    """A QEMU-style backup script clears its bitmap and starts a backup in
    one transaction; the daemon is killed around it.  After the restart
    the bitmap is either the old generation with every acknowledged write,
    or -- whenever the reply had arrived, always -- the new generation with
    every write acknowledged after the reply."""
    import threading
    import time
    from bitback_testlib import Daemon, QMPClient

    crash_scenarios.make_disk(tmp_path, "qbm")
    d = Daemon(tmp_path)
    try:
        d.start("--blockdev", crash_scenarios.blockdev("qbm"), "--export",
                "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on", nbd=True)
        q = d.qmp
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0", persistent=True)
        g_old = q.bitmap("disk0", "b0")["generation"]
        w = crash_scenarios.writers(d.nbd_uri("disk0"), seed=delay_ms)
        w.start()
        time.sleep(0.3)
        reply = {}
        acked_at_reply = []

        c = QMPClient(d.qmp_sock)

        def txn():
            try:
                reply["r"] = c.execute("transaction", actions=[
                    {"type": "block-dirty-bitmap-clear",
                     "data": {"node": "disk0", "name": "b0"}},
                    {"type": "drive-backup",
                     "data": {"device": "disk0", "job-id": "j0", "sync": "full",
                              "target": str(tmp_path / "t.raw"), "format": "raw",
                              "speed": 1 << 20}}])
                with w.lock:
                    acked_at_reply.append(len(w.acked))
            except (ConnectionError, OSError):
                pass
            finally:
                c.close()

        t = threading.Thread(target=txn)
        t.start()
        time.sleep(delay_ms / 1000)
        time.sleep(0.05 if delay_ms >= 40 else 0)
        d.kill()
        t.join(30)
        w.join()
        acked = list(w.acked)

        d.restart("--blockdev", crash_scenarios.blockdev("qbm"), nbd=True)
        b0 = d.qmp.bitmap("disk0", "b0")
        assert b0 and not b0["inconsistent"], b0
        ext = _bitmap_extents(d, ["b0"])["b0"]
        if "r" in reply and "return" in reply["r"]:
            # The clear was acknowledged: it must have been durable.
            assert b0["generation"] != g_old
        if b0["generation"] == g_old:
            need = acked
        else:
            need = acked[acked_at_reply[0]:] if acked_at_reply else []
        missing = [a for a in need if not crash_scenarios.covered(ext, a.offset, a.length)]
        assert not missing, (b0, missing[:5])
        assert d.quit() == 0
    finally:
        d.cleanup()


def test_over_approximation_is_bounded(tmp_path):
    """Random writes over a whole 512-region disk mark every region; then
    the load narrows to 4 regions.  Snapshots (one a second while more
    than 64 regions are marked) clear regions idle for a whole period, so
    a crash a few seconds later adds little beyond those 4 regions."""
    import time
    from bitback_testlib import Daemon
    MiB = crash_scenarios.MiB
    size = 512 * MiB
    crash_scenarios.make_disk(tmp_path, "qbm", size)
    d = Daemon(tmp_path)
    try:
        d.start("--blockdev", crash_scenarios.blockdev("qbm"), "--export",
                "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on", nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
                  persistent=True)
        w = crash_scenarios.writers(d.nbd_uri("disk0"), seed=9, size=size)
        w.start()
        time.sleep(1.5)
        wide = len(w.acked)
        w.span = (100 * MiB, 104 * MiB)
        time.sleep(4.5)
        d.kill()
        w.join()
        assert wide > 100, wide
        d.restart("--blockdev", crash_scenarios.blockdev("qbm"), nbd=True)
        b0 = d.qmp.bitmap("disk0", "b0")
        assert b0["recovered"] is True and not b0["inconsistent"], b0
        ext = _bitmap_extents(d, ["b0"])["b0"]
        missing = [a for a in w.acked if not crash_scenarios.covered(ext, a.offset, a.length)]
        assert not missing, missing[:5]
        # What recovery added beyond the saved bits: the hot 4 regions and
        # at most a few regions of writes in flight around the switch.
        assert b0["recovered-bytes"] <= 16 * MiB, b0
        assert d.quit() == 0
    finally:
        d.cleanup()


def crashed_qbm(tmp_path):
    """A 64 MiB qbm image with persistent bitmap b0, left by `bitback io`
    killed (SIGKILL) right after one acknowledged write: b0 not stored
    cleanly, its write-intent log active."""
    import signal
    import subprocess
    from conftest import BITBACK, run
    img = tmp_path / "d.qbm"
    run([BITBACK, "img", "create", "-f", "qbm", img, "64M"])
    run([BITBACK, "bitmap", "--add", img, "b0"])
    p = subprocess.Popen([BITBACK, "io", img, "-c", "write -P 1 3M 64K",
                          "-c", "sleep 60000"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("wrote")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    return img


def test_recovery_shown_by_img_info(tmp_path):
    """`bitback img info` says a bitmap was recovered and what it added."""
    from conftest import BITBACK, run
    img = crashed_qbm(tmp_path)
    info = json.loads(run([BITBACK, "img", "info", "--output=json", img]).stdout)
    b0 = info["format-specific"]["data"]["bitmaps"][0]
    assert b0["recovered"] is True and b0["inconsistent"] is False, b0
    # The write's region (64 MiB by default: the whole disk) was marked.
    assert b0["recovered-bytes"] + b0["count"] >= 64 * 1024, b0
    human = run([BITBACK, "img", "info", img]).stdout
    assert "recovered: after a crash" in human, human
    # A clean open and close stores it: no longer "recovered".
    run([BITBACK, "io", img, "-c", "read 0 4k"])
    info = json.loads(run([BITBACK, "img", "info", "--output=json", img]).stdout)
    b0 = info["format-specific"]["data"]["bitmaps"][0]
    assert b0["recovered"] is False and b0["inconsistent"] is False
    assert b0["count"] >= 64 * 1024


@pytest.mark.parametrize("fmt,seed,tear", [
    ("qbm", 1, 0), ("qbm", 2, 0), ("qbm", 3, 0), ("qbm", 4, 512),
    ("qcow2", 5, 0), ("qcow2", 6, 0), ("qcow2", 7, 0), ("qcow2", 8, 4096),
])
def test_power_loss_trial(tmp_path, fmt, seed, tear):
    """The daemon runs under the power-loss shim (tests/plsim); at the kill
    every write to the data, bitmap and log files that was not synced is
    dropped or kept at random (with tear, kept ones may land partly).  The
    recovered bitmap still covers every acknowledged write."""
    # Each trial checks the recovered bitmap.  A cut that found nothing
    # unsynced (the kill landed right after a sync: rare, but it happens on
    # a slow sanitizer build) tested nothing beyond SIGKILL, so such a
    # trial is followed by another, with another kill time; one of at most
    # three must have had unsynced writes to drop.
    for attempt in range(3):
        workdir = tmp_path / f"attempt{attempt}"
        workdir.mkdir()
        r = crash_scenarios.trial(workdir, fmt, seed + 1000 * attempt,
                                  powerloss=True, tear=tear)
        assert r["acked"] > 0, r
        unsynced = sum(f["unsynced"] for f in r["cut"].values())
        if unsynced > 0:
            break
    assert unsynced > 0, r["cut"]


def crash_safe_stats(d, node="disk0"):
    """The node's crash-safe counters from query-named-block-nodes."""
    nodes = d.qmp.cmd("query-named-block-nodes")
    return next(n for n in nodes if n["node-name"] == node)["crash-safe"]


def test_sequential_writer_waits_once(tmp_path):
    """query-named-block-nodes reports what crash safety cost (crash-safe:
    intent syncs, writes that waited for one, snapshots).  A sequential
    writer crossing 8 fresh 64 MiB regions waits for the first region only:
    the next region's intent is synced ahead, in the background
    (write-intent invariant 10).  Without the read-ahead every region
    would cost a wait."""
    import nbd
    from bitback_testlib import Daemon
    MiB = crash_scenarios.MiB
    regions, region = 8, 64 * MiB
    crash_scenarios.make_disk(tmp_path, "qbm", regions * region)
    d = Daemon(tmp_path)
    try:
        d.start("--blockdev", crash_scenarios.blockdev("qbm", region=region),
                "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
                nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
                  persistent=True)

        def stats():
            return crash_safe_stats(d)

        before = stats()
        assert before["region-size"] == region
        assert before["marked-regions"] == 0 and before["writer-waits"] == 0
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("disk0"))
        buf = b"\x5a" * MiB
        for off in range(0, regions * region, MiB):
            h.pwrite(buf, off)
        h.shutdown()
        after = stats()
        # The regions just written are marked (a snapshot keeps regions
        # written in its period and the one before) ...
        assert after["marked-regions"] >= 1
        assert after["intent-syncs"] > before["intent-syncs"]
        # ... and the writer waited once, for the first region, with a
        # little slack for a busy machine where a background sync is late.
        assert 1 <= after["writer-waits"] <= 3, after
        assert after["writer-wait-ns"] > 0
        assert d.quit() == 0
    finally:
        d.cleanup()


@pytest.fixture
def shm_path():
    """A folder on tmpfs (/dev/shm) for the slow-sync tests' image: a sync
    there costs nothing, so the only slow syncs are the shim's.  On disk,
    a sync's real latency depends on what earlier tests left to write back
    and on the file system's state (the full sanitizer suite made some take
    far longer than the shim's 20 ms), which these counts are not about."""
    p = pathlib.Path(tempfile.mkdtemp(prefix="bitback-cs-", dir="/dev/shm"))
    try:
        yield p
    finally:
        shutil.rmtree(p, ignore_errors=True)


def _slow_sync_daemon(tmp_path, size, delay_file=None):
    """A daemon serving a fresh qbm of SIZE with 1 MiB regions and b0, whose
    syncs take 20 ms (only while DELAY_FILE exists, when given), as while
    the page cache writes back; and an NBD handle on it."""
    import nbd
    import plcut
    from bitback_testlib import Daemon
    crash_scenarios.make_disk(tmp_path, "qbm", size)
    # The shim only slows syncs here: without PLSIM_DIR it logs nothing.
    env = plcut.plsim_env(tmp_path)
    del env["PLSIM_DIR"], env["PLSIM_LOG"]
    env["PLSIM_SYNC_DELAY_US"] = "20000"
    if delay_file:
        env["PLSIM_SYNC_DELAY_FILE"] = str(delay_file)
    d = Daemon(tmp_path)
    try:
        d.start("--blockdev", crash_scenarios.blockdev("qbm", region=crash_scenarios.MiB),
                "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
                nbd=True, env=env)
        d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b0", persistent=True)
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("disk0"))
    except BaseException:
        d.cleanup()
        raise
    return d, h


def _write_seq(h, start, end, pause=0.0):
    """1 MiB writes from start to end, sleeping PAUSE seconds after each."""
    import time
    buf = b"\x5a" * crash_scenarios.MiB
    for off in range(start, end, len(buf)):
        h.pwrite(buf, off)
        if pause:
            time.sleep(pause)


def test_outrun_read_ahead_grows(shm_path):
    """When intent syncs are slow (20 ms each) a sequential writer outruns
    a read-ahead of half a region and waits at nearly every region, until
    its stream has moved on 64 MiB.  From then on the lead is what the
    stream writes in half a second, asked for in batches, so the rest of
    the pass hardly waits (write-intent invariant 10)."""
    MiB = crash_scenarios.MiB
    size = 192 * MiB
    d, h = _slow_sync_daemon(shm_path, size)
    try:
        def waits():
            return crash_safe_stats(d)["writer-waits"]

        half = size // 2
        _write_seq(h, 0, half)
        head = waits()
        _write_seq(h, half, size)
        tail = waits() - head
        h.shutdown()
        # The first 64 MiB show the syncs are slow enough to be outrun ...
        assert head >= 10, head
        # ... and after the lead grew, the second 96 MiB waited at most for
        # a sync already under way when it grew.
        assert tail <= 3, (head, tail)
        assert d.quit() == 0
    finally:
        d.cleanup()


def test_read_ahead_covers_syncs_turning_slow(tmp_path, shm_path):
    """A sequential writer's lead is sized by time, not by regions: when
    syncs turn slow mid-stream (20 ms, as when the page cache starts to
    write back), the regions it is about to enter are already durable or
    under way, so it does not wait -- also across the snapshots (one a
    second: more than 64 regions are marked), whose resets clear idle
    regions but keep the ones asked for ahead (write-intent invariant
    10).  A lead of half a region would wait at every region.  The writer
    keeps a steady pace (at most 200 MiB/s), so that its lead (half a
    second of writing) stays well short of the image's end and the slow
    part has to sync as it goes."""
    MiB = crash_scenarios.MiB
    size, fast, pause = 640 * MiB, 128 * MiB, 0.005
    slow = tmp_path / "slow-syncs"
    d, h = _slow_sync_daemon(shm_path, size, delay_file=slow)
    try:
        _write_seq(h, 0, fast, pause)
        before = crash_safe_stats(d)
        slow.touch()
        _write_seq(h, fast, size, pause)
        after = crash_safe_stats(d)
        h.shutdown()
        # The slow part took syncs and snapshots ...
        assert after["intent-syncs"] - before["intent-syncs"] >= 3, (before, after)
        assert after["snapshots"] > before["snapshots"], (before, after)
        # ... and no write waited for one.
        assert after["writer-waits"] == before["writer-waits"], (before, after)
        assert d.quit() == 0
    finally:
        d.cleanup()


def test_crafted_snapshot_length_not_read(tmp_path):
    """A .wil whose newest snapshot claims a payload far longer than the
    image's bitmaps can need (1 GiB, in a sparse file) is not read: the open
    stays small, and the bitmap is left inconsistent (never trusted), not
    recovered from the older slot, which would lack what the newer one
    covered (write-intent.md W3, W5)."""
    import struct
    import ctypes
    import ctypes.util
    from bitback_testlib.memory import peak_rss
    from conftest import BITBACK
    img = crashed_qbm(tmp_path)
    wil = tmp_path / "d.qbm.wil"
    x = ctypes.CDLL(ctypes.util.find_library("xxhash"))
    x.XXH64.restype = ctypes.c_uint64
    x.XXH64.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    GiB = 1 << 30
    with open(wil, "r+b") as f:
        h = bytearray(f.read(4096))
        assert h[:8] == b"BBWIL\0v2" and struct.unpack_from("<I", h, 8)[0] == 1
        offs = struct.unpack_from("<QQ", h, 24)
        slots = []
        for off in offs:
            f.seek(off)
            sh = f.read(32)
            if sh[:8] == b"BBWSNAP2":
                slots.append((struct.unpack_from("<Q", sh, 8)[0], off))
        assert slots, "no snapshot in the log"
        _, newest = max(slots)
        # Room for a 1 GiB slot: the header's slot size, then the file.
        struct.pack_into("<Q", h, 40, GiB + 32)
        struct.pack_into("<Q", h, 48, x.XXH64(bytes(h[:48]), 48, 0))
        f.seek(0)
        f.write(h)
        f.seek(newest + 16)
        f.write(struct.pack("<Q", GiB))
        f.truncate(max(offs) + 32 + GiB)
    rc, out, err, rss = peak_rss([BITBACK, "img", "info", "--output=json", img])
    assert rc == 0, err
    b0 = json.loads(out)["format-specific"]["data"]["bitmaps"][0]
    assert b0["inconsistent"] is True and not b0.get("recovered"), b0
    assert rss < 64 * 1024 * 1024, f"img info peaked at {rss >> 20} MiB"


def _wil_bytes(path):
    """(apparent size, allocated bytes) of a write-intent log."""
    st = path.stat()
    return st.st_size, st.st_blocks * 512


def test_64tib_disk_log_follows_dirty_data(tmp_path):
    """Issue 18: a 64 TiB sparse qcow2 served crash-safe with 4 persistent
    bitmaps.  The log's snapshots hold what is dirty, not the bitmaps'
    size (write-intent.md, "A snapshot slot"): after 256 MiB of writes and
    rounds of disable/enable/merge/remove/add (each one a snapshot, W9),
    the .wil stays a few MiB (apparent and allocated) and the daemon within
    256 MiB peak RSS; after SIGKILL every bitmap recovers consistent and
    covers every acknowledged write it recorded."""
    import subprocess
    from bitback_testlib import Daemon
    from bitback_testlib.memory import measured_env, vm_status
    from conftest import run

    require("qemu-io")
    MiB, TiB = 1 << 20, 1 << 40
    wil_limit = 4 * MiB
    crash_scenarios.make_disk(tmp_path, "qcow2", size=64 * TiB)
    wil = tmp_path / "disk" / "disk.qcow2.wil"
    blockdev = crash_scenarios.blockdev("qcow2", region=None)
    export = "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"
    names = ["b0", "b1", "b2", "b3"]
    # 64 writes of 4 MiB, one per TiB at a varying offset inside it.
    writes = [(i * TiB + (i * 37 % 1000) * MiB, 4 * MiB) for i in range(64)]
    late = [(i * TiB + 3 * MiB // 2 * 1024, 1 * MiB) for i in range(0, 64, 8)]

    def qemu_io(uri, ws, pattern):
        cmds = []
        for o, l in ws:
            cmds += ["-c", f"write -P {pattern} {o} {l}"]
        run(["qemu-io", "-f", "raw", *cmds, uri])

    def check_small(what):
        size, alloc = _wil_bytes(wil)
        assert size <= wil_limit and alloc <= wil_limit, \
            f"{what}: the log is {size} bytes ({alloc} allocated)"

    d = Daemon(tmp_path)
    try:
        d.start("--blockdev", blockdev, "--export", export, nbd=True,
                env=measured_env())
        q = d.qmp
        for n in names:
            q.cmd("block-dirty-bitmap-add", node="disk0", name=n,
                  persistent=True)
            check_small(f"after adding {n}")
        uri = d.nbd_uri("disk0")
        qemu_io(uri, writes, 1)
        for rnd in range(3):
            q.cmd("block-dirty-bitmap-disable", node="disk0", name="b1")
            check_small(f"round {rnd}: disable")
            q.cmd("block-dirty-bitmap-merge", node="disk0", target="b2",
                  bitmaps=["b0"])
            check_small(f"round {rnd}: merge")
            q.cmd("block-dirty-bitmap-remove", node="disk0", name="b3")
            check_small(f"round {rnd}: remove")
            q.cmd("block-dirty-bitmap-add", node="disk0", name="b3",
                  persistent=True, disabled=True)
            q.cmd("block-dirty-bitmap-merge", node="disk0", target="b3",
                  bitmaps=["b0", "b1"])
            check_small(f"round {rnd}: add and merge")
            q.cmd("block-dirty-bitmap-enable", node="disk0", name="b1")
            check_small(f"round {rnd}: enable")
        # Writes after the last snapshot: recovered from the intent map.
        qemu_io(uri, late, 2)
        check_small("after the late writes")
        hwm = vm_status(d.pid, "VmHWM")
        assert hwm <= 256 * MiB, f"bitbackd peaked at {hwm / MiB:.0f} MiB"
        d.kill()

        d.restart("--blockdev", blockdev, nbd=True, env=measured_env())
        for n in names:
            bm = d.qmp.bitmap("disk0", n)
            assert bm is not None and bm["inconsistent"] is False, bm
            assert bm["recovered"] is True, bm
        assert d.qmp.bitmap("disk0", "b3")["recording"] is False
        ext = _bitmap_extents(d, names)
        # b0, b1 (re-enabled before the late writes) and b2 recorded all;
        # b3 holds the first writes (merged), disabled since.
        expect = {"b0": writes + late, "b1": writes + late,
                  "b2": writes + late, "b3": writes}
        for n, ws in expect.items():
            missing = [w for w in ws if not crash_scenarios.covered(ext[n], *w)]
            assert not missing, f"{n} lacks acknowledged writes {missing[:4]}"
        hwm = vm_status(d.pid, "VmHWM")
        assert hwm <= 256 * MiB, f"bitbackd peaked at {hwm / MiB:.0f} MiB after recovery"
        check_small("after recovery")
        assert d.quit() == 0
    finally:
        d.cleanup()


def test_v1_log_not_read(tmp_path):
    """A version 1 log (BBWIL\\0v1: full bitmaps in its snapshots) is not
    read: the crashed bitmap loads inconsistent (write-intent.md, "Version
    1"), and the next writable open replaces it with a small version 2
    log."""
    import struct
    import ctypes
    import ctypes.util
    from conftest import BITBACK, run
    img = crashed_qbm(tmp_path)
    wil = tmp_path / "d.qbm.wil"
    x = ctypes.CDLL(ctypes.util.find_library("xxhash"))
    x.XXH64.restype = ctypes.c_uint64
    x.XXH64.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    with open(wil, "r+b") as f:
        h = bytearray(f.read(4096))
        assert h[:8] == b"BBWIL\0v2"
        h[:8] = b"BBWIL\0v1"
        struct.pack_into("<Q", h, 48, x.XXH64(bytes(h[:48]), 48, 0))
        f.seek(0)
        f.write(h)
        f.seek(1 << 30)            # what a v1 log's full bitmaps left
        f.write(b"\1")
    info = json.loads(run([BITBACK, "img", "info", "--output=json", img]).stdout)
    b0 = info["format-specific"]["data"]["bitmaps"][0]
    assert b0["inconsistent"] is True and not b0.get("recovered"), b0
    run([BITBACK, "io", img, "-c", "read 0 4k"])
    assert wil.read_bytes()[:8] == b"BBWIL\0v2"
    assert _wil_bytes(wil)[0] <= 1 << 20, _wil_bytes(wil)
