"""`bitback backup --connect` against live daemons: the safety of the
nightly backup (issue 15, items 3-7).  Every test runs on bitbackd and on
qemu-storage-daemon 7.2 (the `flavour` fixture of backup_scenarios).

- a relative --repo works whatever the daemon's working folder;
- two repositories back up one disk independently (bitmaps named after
  each repository's UUID), every run after the first full incremental;
- a bitmap cleared behind bitback's back is caught by its count falling;
- a raw node (no persistent bitmaps) is backed up with a non-persistent
  bitmap, incrementals work while the daemon runs, a restart means a full;
- SIGINT / SIGTERM cancel the job and leave nothing behind, and the next
  run is a correct incremental.

Points are checked with `bitback restore` + `qemu-img compare` against a
raw reference read through NBD before the backup started.  qsd's monitor
serves one client at a time, so the test's QMP connection is closed
before every `bitback backup` run.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from backup_scenarios import (MiB, flavour, random_image,  # noqa: F401
                              reference_copy)
from bitback_testlib import QSD, QMPClient, qmp_socket_ready
from conftest import BITBACK, bitback, repo_bitmap, repo_prefix, require, run

SIZE = 32 * MiB


# -- helpers ------------------------------------------------------------

def start_disk(fl, kind="persistent"):
    """Start fl's daemon with node disk0 exported writable over NBD.
    kind "persistent": a qbm (bitbackd) or qcow2 (qsd) image, which stores
    persistent bitmaps; "raw": a raw file, which cannot."""
    raw = random_image(fl.path("disk.raw"), SIZE, seed=5, allocated=0.5)
    if kind == "raw":
        image, driver = raw, "raw"
    elif fl.kind == "qsd":
        image, driver = fl.path("disk.qcow2"), "qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image])
    else:
        image, driver = fl.path("disk.qbm"), "qbm"
        run([BITBACK, "img", "create", "-f", "qbm", "-o",
             f"data-file={raw}", image])
    fl.disk = (image, driver)
    return start_again(fl)


def start_again(fl):
    """(Re)start the daemon on fl.disk; after a quit, in the same folders."""
    if fl.daemon.proc is not None:
        assert not fl.daemon.running()
        fl.daemon.proc = None
        fl.daemon.pidfile.unlink(missing_ok=True)
    d = fl.start({"disk0": fl.disk}, "--export",
                 "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on")
    fl.uri = d.nbd_uri("disk0")
    return d


def release_qmp(fl):
    """Close the test's QMP connection: qsd's monitor takes one client."""
    fl.daemon._close_qmp()


def backup_args(fl, repo, level="auto", *extra):
    return [BITBACK, "backup", "--connect", str(fl.daemon.qmp_sock),
            "--node", "disk0", "--repo", str(repo), "--level", level, *extra]


def backup(fl, repo, level="auto", *extra, cwd=None, check=True):
    release_qmp(fl)
    return run(backup_args(fl, repo, level, *extra), cwd=cwd, check=check)


def backup_midway(fl, repo, level, speed, action):
    """Run a throttled backup; once it says its job started, call
    action(process).  Returns (returncode, stderr)."""
    release_qmp(fl)
    p = subprocess.Popen(backup_args(fl, repo, level, "--speed", speed),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = ""
        for _ in range(5):             # a note may come first
            line = p.stderr.readline()
            if "started" in line or not line:
                break
        assert "started" in line, line + p.stderr.read()
        action(p)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


def write(fl, cmd):
    run(["qemu-io", "-f", "raw", "-c", cmd, fl.uri])


def listing(repo, cwd=None):
    return json.loads(bitback("list", "--repo", str(repo), "--output=json",
                              cwd=cwd).stdout)


def full_reasons(p):
    return [l for l in p.stderr.splitlines() if "taking a full backup" in l]


def check_restore(repo, bid, ref, tmp_path, cwd=None):
    """Restore backup bid and qemu-img compare it with the reference."""
    out = tmp_path / f"restored-{bid}.raw"
    bitback("restore", "--repo", str(repo), "--node", "disk0", "--at", bid,
            str(out), cwd=cwd)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", out, ref])
    out.unlink()


def point(fl, tmp_path, tag):
    """The disk as it is now (no writer runs between backups)."""
    return reference_copy(fl.uri, tmp_path / f"ref-{tag}.raw")


def started_bitmap(repo, bid):
    """The bitmap backup bid started, as its manifest names it."""
    return json.loads((repo / "disk0" / f"{bid}.json").read_text())["bitmap"]


def leftovers(repo):
    return sorted(p.name for p in (repo / "disk0").iterdir()
                  if p.name.endswith((".tmp", ".attempt")))


# -- item 3: relative --repo --------------------------------------------

def test_relative_repo_from_another_folder(flavour, tmp_path):
    """The daemon runs in tmp_path; bitback runs in tmp_path/client with
    --repo rel/repo.  The targets must reach the daemon as absolute paths
    (qemu-storage-daemon --daemonize runs in /)."""
    fl = flavour
    start_disk(fl)
    client = tmp_path / "client"
    (client / "rel").mkdir(parents=True)
    rel = "rel/repo"
    refs = [point(fl, tmp_path, "1")]
    backup(fl, rel, cwd=client)
    write(fl, "write -P 7 3M 1M")
    refs.append(point(fl, tmp_path, "2"))
    p = backup(fl, rel, cwd=client)
    assert not full_reasons(p), p.stderr
    repo = client / rel
    assert not (tmp_path / rel).exists()
    lst = listing(repo)
    assert [b["level"] for b in lst] == ["full", "inc"]
    assert lst[1]["changed-bytes"] == MiB
    for b, ref in zip(lst, refs):
        check_restore(repo, b["id"], ref, tmp_path)
    assert leftovers(repo) == []


def test_relative_repo_qsd_daemonized(tmp_path):
    """The issue's case itself: qemu-storage-daemon --daemonize (it runs in
    /) and `bitback backup --repo repo` run from the image's folder."""
    require(QSD)
    image = tmp_path / "disk.qcow2"
    raw = random_image(tmp_path / "disk.raw", SIZE, seed=9, allocated=0.25)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image])
    sockdir = pathlib.Path(tempfile.mkdtemp(prefix="bbq-"))  # short path
    sock = sockdir / "q.sock"
    pidfile = tmp_path / "qsd.pid"
    pid = None
    try:
        run([QSD, "--daemonize", "--pidfile", pidfile,
             "--blockdev", f"driver=file,node-name=f0,filename={image}",
             "--blockdev", "driver=qcow2,node-name=disk0,file=f0",
             "--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
             "--monitor", "chardev=m0"])
        pid = int(pidfile.read_text())
        assert qmp_socket_ready(sock)
        args = [BITBACK, "backup", "--connect", str(sock), "--node", "disk0",
                "--repo", "repo"]
        run(args, cwd=tmp_path)
        run(args, cwd=tmp_path)
        lst = listing(tmp_path / "repo")
        assert [b["level"] for b in lst] == ["full", "inc"]
        with QMPClient(sock) as c:
            c.cmd("quit")
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = None
        check_restore(tmp_path / "repo", lst[-1]["id"], raw, tmp_path)
        assert leftovers(tmp_path / "repo") == []
    finally:
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(sockdir, ignore_errors=True)


# -- item 4: two repositories, one disk ---------------------------------

def test_two_repositories_back_up_one_disk(flavour, tmp_path):
    """Repositories A and B back up disk0 in turn: after one full each,
    every run is incremental and every point restores bit for bit."""
    fl = flavour
    start_disk(fl)
    repos = {"A": tmp_path / "repoA", "B": tmp_path / "repoB"}
    refs = {"A": [], "B": []}
    for r in ("A", "B"):
        refs[r].append(point(fl, tmp_path, f"{r}0"))
        backup(fl, repos[r])
    for i in range(1, 4):
        for j, r in enumerate(("A", "B")):
            write(fl, f"write -P {10 * i + j} {4 * i + 2 * j}M 256K")
            refs[r].append(point(fl, tmp_path, f"{r}{i}"))
            p = backup(fl, repos[r])
            assert not full_reasons(p), p.stderr
    assert repo_prefix(repos["A"]) != repo_prefix(repos["B"])
    q = fl.daemon.qmp
    names = {b["name"] for b in q.node("disk0")["dirty-bitmaps"]}
    for r, repo in repos.items():
        lst = listing(repo)
        assert [b["level"] for b in lst] == ["full", "inc", "inc", "inc"], r
        # Each incremental holds the writes since its parent: both
        # repositories' (only A's own before A's first incremental).
        for k, b in enumerate(lst[1:]):
            want = 256 * 1024 if (r, k) == ("A", 0) else 512 * 1024
            assert b["changed-bytes"] == want, (r, b)
        for b, ref in zip(lst, refs[r]):
            check_restore(repo, b["id"], ref, tmp_path)
        assert repo_bitmap(repo, lst[-1]["id"]) in names
        bitback("verify", "--repo", str(repo))
    # Only the repositories' own bitmaps, none left over from the runs.
    assert all(n.startswith((repo_prefix(repos["A"]) + "-",
                             repo_prefix(repos["B"]) + "-")) for n in names)
    assert not any(n.endswith(".src") for n in names), names


def test_chain_of_old_naming_takes_one_full(flavour, tmp_path):
    """A repository made before UUIDs (bitmaps bitback-NNNNNN, no uuid in
    bitback-repo.json) gets a UUID once; its next run takes one full with
    a reason, the old bitmaps go, and incrementals follow."""
    fl = flavour
    start_disk(fl)
    repo = tmp_path / "repo"
    backup(fl, repo, "auto", "--bitmap", "bitback")     # the old names
    marker = repo / "bitback-repo.json"
    marker.write_text('{"format": "bitback-repository", "version": 1}\n')
    write(fl, "write -P 3 1M 64K")
    p = backup(fl, repo)
    reasons = full_reasons(p)
    assert len(reasons) == 1 and "bitback-000001" in reasons[0], p.stderr
    uuid = json.loads(marker.read_text())["uuid"]
    assert len(uuid) == 36
    write(fl, "write -P 4 2M 64K")
    ref = point(fl, tmp_path, "3")
    p = backup(fl, repo)
    assert not full_reasons(p), p.stderr
    lst = listing(repo)
    assert [b["level"] for b in lst] == ["full", "full", "inc"]
    assert json.loads(marker.read_text())["uuid"] == uuid     # written once
    check_restore(repo, lst[-1]["id"], ref, tmp_path)
    names = [b["name"] for b in fl.daemon.qmp.node("disk0")["dirty-bitmaps"]]
    assert "bitback-000001" not in names, names


# -- item 5: a bitmap cleared behind bitback's back ---------------------

def test_cleared_bitmap_is_caught_by_its_count(flavour, tmp_path):
    """Writes land while backup 1 runs, so its manifest records a count
    above zero for its bitmap; a clear drops the count below it and the
    next run takes a full backup saying why (qsd reports no generation,
    only the count).  A clear of a frozen bitmap is caught by a diff."""
    fl = flavour
    start_disk(fl)
    repo = tmp_path / "repo"
    ref1 = point(fl, tmp_path, "1")
    # The write lands after the point in time, before the commit.
    rc, err = backup_midway(fl, repo, "auto", "2M",
                            lambda p: write(fl, "write -P 21 8M 1M"))
    assert rc == 0, err
    bid = listing(repo)[0]["id"]
    manifest = json.loads((repo / "disk0" / f"{bid}.json").read_text())
    bm = started_bitmap(repo, bid)
    counts = manifest.get("bitmap-counts", {})
    check_restore(repo, bid, ref1, tmp_path)

    fl.daemon.qmp.cmd("block-dirty-bitmap-clear", node="disk0", name=bm)
    write(fl, "write -P 22 1M 64K")        # fewer bytes than were cleared
    ref2 = point(fl, tmp_path, "2")
    p = backup(fl, repo)
    reasons = full_reasons(p)
    assert len(reasons) == 1 and "cleared" in reasons[0], (p.stderr, counts)
    assert counts[bm] >= MiB, counts       # the write landed mid-job
    lst = listing(repo)
    assert lst[-1]["level"] == "full"
    check_restore(repo, lst[-1]["id"], ref2, tmp_path)

    # A frozen bitmap: inc records its final count, a diff relies on it.
    write(fl, "write -P 23 5M 1M")
    backup(fl, repo, "inc")
    fl.daemon.qmp.cmd("block-dirty-bitmap-clear", node="disk0",
                      name=started_bitmap(repo, lst[-1]["id"]))
    write(fl, "write -P 24 6M 64K")
    ref3 = point(fl, tmp_path, "3")
    p = backup(fl, repo, "diff")
    reasons = full_reasons(p)
    assert len(reasons) == 1 and "cleared" in reasons[0], p.stderr
    lst = listing(repo)
    assert lst[-1]["level"] == "full"
    check_restore(repo, lst[-1]["id"], ref3, tmp_path)
    bitback("verify", "--repo", str(repo))


def test_help_says_what_a_count_cannot_show():
    """A clear followed by as many new writes is not detectable: the help
    says so and what to do."""
    out = " ".join(bitback("backup", "--help").stdout.split())
    assert "cannot be detected" in out and "run with --level full" in out


# -- item 6: raw nodes (no persistent bitmaps) --------------------------

def test_raw_node_non_persistent_bitmap(flavour, tmp_path):
    """A raw node: the backup uses a non-persistent bitmap and says so;
    incrementals store only the change while the daemon runs; after a
    restart the bitmap is gone and the next run is full, saying why."""
    fl = flavour
    start_disk(fl, "raw")
    repo = tmp_path / "repo"
    ref1 = point(fl, tmp_path, "1")
    p = backup(fl, repo)
    assert "persistent" in p.stderr and "restart" in p.stderr, p.stderr
    write(fl, "write -P 31 2M 128K")
    ref2 = point(fl, tmp_path, "2")
    p = backup(fl, repo)
    assert not full_reasons(p), p.stderr
    lst = listing(repo)
    assert [b["level"] for b in lst] == ["full", "inc"]
    assert lst[1]["changed-bytes"] == 128 * 1024
    bm = fl.daemon.qmp.bitmap("disk0", repo_bitmap(repo, lst[1]["id"]))
    assert bm and not bm["persistent"] and bm["recording"], bm
    check_restore(repo, lst[0]["id"], ref1, tmp_path)
    check_restore(repo, lst[1]["id"], ref2, tmp_path)

    assert fl.daemon.quit() == 0
    start_again(fl)
    write(fl, "write -P 32 4M 64K")
    ref3 = point(fl, tmp_path, "3")
    p = backup(fl, repo)
    reasons = full_reasons(p)
    assert len(reasons) == 1 and "missing" in reasons[0] and \
        "restart" in reasons[0], p.stderr
    lst = listing(repo)
    assert lst[-1]["level"] == "full"
    check_restore(repo, lst[-1]["id"], ref3, tmp_path)
    bitback("verify", "--repo", str(repo))


# -- item 7: SIGINT / SIGTERM -------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_cancels_the_job_and_cleans_up(flavour, tmp_path, sig):
    """A signal mid-copy: exit 128+sig, no job left in the daemon, no
    temporary file or attempt marker, the bitmaps as before the run; the
    next run is an incremental holding the writes before and after."""
    fl = flavour
    start_disk(fl)
    repo = tmp_path / "repo"
    backup(fl, repo)
    before = listing(repo)
    q = fl.daemon.qmp
    bitmaps_before = sorted((b["name"], b["recording"])
                            for b in q.node("disk0")["dirty-bitmaps"])
    write(fl, "write -P 41 0 4M")

    def interrupt(p):
        time.sleep(0.5)                    # mid-copy: 4 MiB at 512 KiB/s
        p.send_signal(sig)

    rc, err = backup_midway(fl, repo, "inc", "512K", interrupt)
    assert rc == 128 + sig, (rc, err)
    assert "interrupted" in err, err
    q = fl.daemon.qmp
    assert q.cmd("query-jobs") == []
    assert leftovers(repo) == []
    assert listing(repo) == before
    assert sorted((b["name"], b["recording"])
                  for b in q.node("disk0")["dirty-bitmaps"]) == bitmaps_before

    write(fl, "write -P 42 10M 1M")
    ref = point(fl, tmp_path, "after")
    p = backup(fl, repo, "inc")
    assert not full_reasons(p), p.stderr
    last = listing(repo)[-1]
    assert last["level"] == "inc" and last["parent"] == before[-1]["id"]
    assert last["changed-bytes"] == 5 * MiB
    check_restore(repo, last["id"], ref, tmp_path)
    bitback("verify", "--repo", str(repo))
    assert leftovers(repo) == []
