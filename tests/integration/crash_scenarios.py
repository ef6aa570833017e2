"""Crash trials for crash-safe bitmaps (issue 7), shared by
tests/integration/test_crash_safe.py (a few dozen trials in `make check`)
and tests/stress/crash_trials.py (hundreds, with the worst case reported).

One trial:
  1. a disk (qbm over raw, or qcow2) served by bitbackd with an NBD export;
     `bitback backup` takes a full backup (it adds the bitmap bitback-UUID8-000001)
  2. writer threads (bitback_testlib.writer) issue random writes, zero
     writes and flushes through NBD and log every write the server
     *acknowledged*
  3. the daemon is killed with SIGKILL at a random moment -- optionally
     under the power-loss shim (tests/plsim), after which every write that
     was not synced is dropped or kept at random
  4. the daemon restarts; the bitmap must load consistent and recovered,
     its dirty extents must cover every acknowledged write, and
     `bitback backup --level inc` must be an incremental whose restore
     equals the image byte for byte.
"""
import json
import os
import pathlib
import random
import subprocess
import sys
import time

from bitback_testlib import Daemon
from bitback_testlib.nbdio import read_all  # noqa: F401 (crash_scenarios.read_all)
from bitback_testlib.writer import Writer
from conftest import BITBACK, dirty_extents, repo_bitmap, run

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
REGION = 1 * MiB            # small regions, so over-approximation is visible

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "plsim"))


def blockdev(fmt, region=REGION, crash_safe=True):
    if fmt == "qbm":
        s = "driver=qbm,node-name=disk0,file.driver=file,file.filename=disk/disk.qbm"
    else:
        s = "driver=qcow2,node-name=disk0,file.driver=file,file.filename=disk/disk.qcow2"
    s += f",crash-safe={'on' if crash_safe else 'off'}"
    if region:
        s += f",crash-safe-region-size={region}"
    return s


def make_disk(workdir, fmt, size=SIZE):
    d = workdir / "disk"
    d.mkdir(exist_ok=True)
    if fmt == "qbm":
        run([BITBACK, "img", "create", "-f", "qbm", d / "disk.qbm", str(size)])
    else:
        run(["qemu-img", "create", "-q", "-f", "qcow2", d / "disk.qcow2", str(size)])


def writers(uri, seed, threads=2, flush_every=25, size=SIZE):
    """The crash trials' writers: `threads` threads through NBD inside
    .span (all of size), a flush every flush_every writes of each, until
    the server dies; .acked logs every acknowledged write (an Ack)."""
    return Writer([uri], [seed * 31 + i for i in range(threads)],
                  [4 * KiB, 64 * KiB, 100 * KiB, 256 * KiB],
                  flush_every=flush_every, until_error=True, span=(0, size))


def covered(extents, off, length):
    """Is [off, off+length) inside the union of extents [(start, len)]?"""
    end = off + length
    pos = off
    for s, l in extents:
        if s + l <= pos:
            continue
        if s > pos:
            return False
        pos = s + l
        if pos >= end:
            return True
    return pos >= end


def union_bytes(ranges):
    total, cur_s, cur_e = 0, None, None
    for s, l in sorted(ranges):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, s + l
        else:
            cur_e = max(cur_e, s + l)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def backup(daemon, repo, level):
    return run([BITBACK, "backup", "--connect", str(daemon.qmp_sock), "--node",
                "disk0", "--repo", repo, "--level", level])


def trial(workdir, fmt, seed, powerloss=False, run_time=None, size=SIZE,
          writer_threads=2, tear=0):
    """Run one trial in workdir; returns a dict of what it measured.
    Raises AssertionError on any violation."""
    rng = random.Random(seed)
    workdir = pathlib.Path(workdir)
    make_disk(workdir, fmt, size)
    repo = workdir / "repo"
    env = None
    if powerloss:
        import plcut
        env = plcut.plsim_env(workdir)
        env["PLSIM_DIR"] = str(workdir / "disk")
    d = Daemon(workdir)
    try:
        d.start("--blockdev", blockdev(fmt), "--export",
                "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
                nbd=True, **({"env": env} if env else {}))
        backup(d, repo, "full")
        w = writers(d.nbd_uri("disk0"), seed, threads=writer_threads, size=size)
        w.start()
        time.sleep(run_time if run_time is not None else rng.uniform(0.05, 0.8))
        if powerloss:
            # Cut power while some acknowledged write is not yet flushed
            # (on a slow machine the sleep may end right after a flush).
            deadline = time.monotonic() + 10
            while w.unflushed == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
        d.kill()
        w.join()
        cut = None
        if powerloss:
            import plcut
            cut = plcut.cut(env["PLSIM_LOG"], seed, "random", tear=tear)

        d.restart("--blockdev", blockdev(fmt), nbd=True)
        q = d.qmp
        b1 = repo_bitmap(repo, "000001")
        bm = q.bitmap("disk0", b1)
        assert bm is not None, q.node("disk0")
        assert bm["inconsistent"] is False, bm
        assert bm["recording"] is True, bm
        acked = list(w.acked)
        if acked:
            assert bm["recovered"] is True, bm
        q.cmd("block-export-add", type="nbd", id="e0", writable=True,
              bitmaps=[b1], **{"node-name": "disk0", "name": "disk0"})
        uri = d.nbd_uri("disk0")
        ext = dirty_extents(uri, b1)
        missing = [(o, l) for o, l, _ in acked if not covered(ext, o, l)]
        assert not missing, f"acknowledged writes missing from the bitmap: {missing[:5]}"
        dirty = sum(l for _, l in ext)
        # What the writes dirtied at the bitmap's granularity (64 KiB): the
        # least any bitmap can show.  dirty - written is what recovery added.
        g = bm["granularity"]
        written = union_bytes([(o // g * g, (o + l + g - 1) // g * g - o // g * g)
                               for o, l, _ in acked])
        q.del_export("e0")

        p = backup(d, repo, "inc")
        assert "taking a full backup" not in p.stderr, p.stderr
        listing = json.loads(run([BITBACK, "list", "--repo", repo,
                                  "--output=json"]).stdout)
        assert [b["level"] for b in listing] == ["full", "inc"], listing
        q.cmd("block-export-add", type="nbd", id="e1", writable=False,
              **{"node-name": "disk0", "name": "disk0"})
        read_all(d.nbd_uri("disk0"), workdir / "now.raw")
        out = workdir / "restored.raw"
        run([BITBACK, "restore", "--repo", repo, "--at", "latest", out])
        run(["cmp", out, workdir / "now.raw"])
        assert d.quit() == 0
        if fmt == "qcow2":
            # The crash may leak clusters, never corrupt; and after the
            # clean quit QEMU sees the recovered bitmap stored cleanly.
            c = run(["qemu-img", "check", "--output=json", workdir / "disk/disk.qcow2"],
                    check=False)
            assert c.returncode in (0, 3), c.stdout + c.stderr
            assert json.loads(c.stdout).get("corruptions", 0) == 0, c.stdout
            info = json.loads(run(["qemu-img", "info", "--output=json",
                                   workdir / "disk/disk.qcow2"]).stdout)
            flags = {b["name"]: b["flags"] for b in
                     info["format-specific"]["data"].get("bitmaps", [])}
            assert "in-use" not in flags.get(b1, []), flags
        return {"acked": len(acked), "written": written, "dirty": dirty,
                "over": max(dirty - written, 0),
                "recovered-bytes": bm.get("recovered-bytes", 0), "cut": cut}
    finally:
        d.cleanup()
