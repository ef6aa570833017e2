"""`bitback backup --connect`: live backup chains through bitbackd (issue 6).

A writer thread keeps writing random data through NBD between and during
the backups.  Around each backup's start the writer pauses, the test copies
the image as it is then (the reference, read through NBD), starts `bitback
backup`, and lets the writer go on as soon as the tool says the backup
started (its point in time is fixed).  Every point is then restored and
compared with its reference, by `bitback restore` and, independently of
bitback, by `qemu-img convert` of the repository's qcow2 file.
"""
import json
import os
import random
import signal
import subprocess
import time

import pytest

from bitback_testlib import Daemon
from bitback_testlib.nbdio import read_all
from bitback_testlib.writer import Writer, write_lengths
from conftest import BITBACK, bitback, repo_bitmap, require, run

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB


def live_writer(uris, seed=7):
    """Random writes through NBD to every URI in turn until stopped;
    pause() waits until no write is in flight."""
    return Writer(uris, [seed], write_lengths(4, 16, 64, 200), pause_s=0.02)


def make_disk(d, name, seed):
    """A qbm disk with random data in half of its MiB chunks."""
    path = d / f"{name}.qbm"
    bitback("img", "create", "-f", "qbm", path, str(SIZE))
    rng = random.Random(seed)
    cmds = []
    for c in range(0, SIZE // MiB, 2):
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {c}M 1M"]
    bitback("io", "-f", "qbm", path, *cmds)
    return path


@pytest.fixture
def daemon(tmp_path):
    require("qemu-img")
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()


def start(daemon, tmp_path, nodes):
    args = []
    for n in nodes:
        make_disk(tmp_path, n, seed=hash(n) & 0xffff)
        args += ["--blockdev", f"driver=qbm,node-name={n},file.driver=file,"
                 f"file.filename={n}.qbm",
                 "--export", f"type=nbd,id=e-{n},node-name={n},name={n},"
                 "writable=on"]
    daemon.start(*args, nbd=True)
    return daemon


def backup_cmd(daemon, repo, nodes, level, *extra):
    args = [BITBACK, "backup", "--connect", str(daemon.qmp_sock), "--repo", repo,
            "--level", level, *extra]
    for n in nodes:
        args += ["--node", n]
    return args


def run_backup_live(daemon, repo, nodes, level, writer, refs_dir, tag,
                    *extra, speed="24M"):
    """Pause the writer, copy the references, start the backup (rate
    limited to speed unless None), resume the writer once every disk's
    backup started; returns (id, refs, stderr)."""
    writer.pause()
    refs = {n: read_all(daemon.nbd_uri(n), refs_dir / f"{tag}-{n}.raw")
            for n in nodes}
    limit = ("--speed", speed) if speed else ()
    p = subprocess.Popen(backup_cmd(daemon, repo, nodes, level,
                                    *limit, *extra),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    lines = []
    try:
        started = 0
        while started < len(nodes):
            line = p.stderr.readline()
            if not line:
                break
            lines.append(line)
            if " started (" in line:
                started += 1
        writer.resume()
        out, err = p.communicate(timeout=300)
    finally:
        writer.resume()
        if p.poll() is None:
            p.kill()
            p.wait()
    err = "".join(lines) + err
    assert p.returncode == 0, f"backup failed: {err}\n{out}"
    ids = {line.split()[2] for line in lines if " started (" in line}
    assert len(ids) == 1, lines
    return ids.pop(), refs, err


def listing(repo):
    return json.loads(bitback("list", "--repo", repo, "--output=json").stdout)


def check_point(repo, node, bid, ref, tmp_path):
    """Restore backup bid and compare with the reference; also flatten the
    repository file with qemu-img alone."""
    qfile = repo / node / f"{bid}.qcow2"
    run(["qemu-img", "check", "-q", qfile])
    flat = tmp_path / f"flat-{node}-{bid}.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qfile, flat])
    run(["cmp", flat, ref])
    out = tmp_path / f"restored-{node}-{bid}.raw"
    bitback("restore", "--repo", repo, "--node", node, "--at", bid, out)
    run(["cmp", out, ref])
    flat.unlink()
    out.unlink()


def test_live_chain_under_load(daemon, tmp_path):
    """full, inc, inc, diff with a writer running between and during the
    backups; every point restores bit for bit."""
    start(daemon, tmp_path, ["disk0"])
    repo = tmp_path / "repo"
    writer = live_writer([daemon.nbd_uri("disk0")])
    writer.start()
    points = []
    try:
        for tag, level in [("p1", "auto"), ("p2", "inc"), ("p3", "inc"),
                           ("p4", "diff")]:
            time.sleep(0.3)            # writes between backups
            bid, refs, _ = run_backup_live(daemon, repo, ["disk0"], level,
                                           writer, tmp_path, tag)
            points.append((bid, refs["disk0"]))
    finally:
        writer.stop()
    assert writer.writes > 50
    backups = listing(repo)
    assert [b["level"] for b in backups] == ["full", "inc", "inc", "diff"]
    ids = [b["id"] for b in backups]
    assert [p[0] for p in points] == ids
    assert backups[1]["parent"] == ids[0]
    assert backups[2]["parent"] == ids[1]
    assert backups[3]["parent"] == ids[0]           # diff: since the full
    # The incrementals copied what changed, not the disk: at most the
    # bitmap chunks the writer's acknowledged writes touched in the whole
    # run (how many that is depends on the machine's speed, so a fixed
    # fraction of the disk is no bound), and less than the disk.
    gran = daemon.qmp.node("disk0")["dirty-bitmaps"][0]["granularity"]
    touched = set()
    for a in writer.acked:
        touched.update(range(a.offset // gran,
                             (a.offset + a.length - 1) // gran + 1))
    for b in backups[1:]:
        assert 0 < b["changed-bytes"] <= len(touched) * gran, (b, len(touched))
        assert b["changed-bytes"] < SIZE, b
    # The diff holds at least what both incrementals held.
    assert backups[3]["changed-bytes"] >= backups[1]["changed-bytes"]
    for bid, ref in points:
        check_point(repo, "disk0", bid, ref, tmp_path)
    bitback("verify", "--repo", repo)
    # Bitmaps: the newest backup's recording, older ones since the full
    # kept frozen for later diffs.
    bms = {b["name"]: b for b in daemon.qmp.node("disk0")["dirty-bitmaps"]}
    assert bms[repo_bitmap(repo, ids[-1])]["recording"]
    assert not bms[repo_bitmap(repo, ids[0])]["recording"]
    assert not any(n.endswith(".src") for n in bms)
    assert daemon.qmp.cmd("query-jobs") == []


def test_multi_disk_same_instant(daemon, tmp_path):
    """Two disks in one run share one transaction: both restore to the
    same instant, while the writer writes to both."""
    nodes = ["sda", "sdb"]
    start(daemon, tmp_path, nodes)
    repo = tmp_path / "repo"
    writer = live_writer([daemon.nbd_uri(n) for n in nodes], seed=3)
    writer.start()
    points = []
    try:
        for tag, level in [("p1", "full"), ("p2", "inc")]:
            time.sleep(0.3)
            bid, refs, _ = run_backup_live(daemon, repo, nodes, level, writer,
                                           tmp_path, tag)
            points.append((bid, refs))
    finally:
        writer.stop()
    backups = listing(repo)
    assert sorted((b["id"], b["node"]) for b in backups) == sorted(
        (bid, n) for bid, _ in points for n in nodes)
    for bid, refs in points:
        for n in nodes:
            check_point(repo, n, bid, refs[n], tmp_path)


def quiet_backup(daemon, repo, nodes, level="auto", check=True):
    return run(backup_cmd(daemon, repo, nodes, level), check=check)


def test_chain_identity_falls_back_to_full(daemon, tmp_path):
    """A bitmap cleared or removed behind the tool's back makes the next
    auto run a full backup, with one line saying why."""
    start(daemon, tmp_path, ["disk0"])
    repo = tmp_path / "repo"
    uri = daemon.nbd_uri("disk0")
    q = daemon.qmp
    quiet_backup(daemon, repo, ["disk0"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 9 1M 64K", uri])
    p = quiet_backup(daemon, repo, ["disk0"])
    assert "taking a full backup" not in p.stderr
    last = listing(repo)[-1]
    assert last["level"] == "inc"

    # Cleared behind our back: the generation changed.
    q.cmd("block-dirty-bitmap-clear", node="disk0", name=repo_bitmap(repo, last['id']))
    run(["qemu-io", "-f", "raw", "-c", "write -P 10 2M 64K", uri])
    p = quiet_backup(daemon, repo, ["disk0"])
    msgs = [l for l in p.stderr.splitlines() if "taking a full backup" in l]
    assert len(msgs) == 1 and "cleared" in msgs[0], p.stderr
    assert listing(repo)[-1]["level"] == "full"

    # Removed behind our back.
    last = listing(repo)[-1]
    q.cmd("block-dirty-bitmap-remove", node="disk0", name=repo_bitmap(repo, last['id']))
    p = quiet_backup(daemon, repo, ["disk0"], level="inc")
    msgs = [l for l in p.stderr.splitlines() if "taking a full backup" in l]
    assert len(msgs) == 1 and "missing" in msgs[0], p.stderr
    assert listing(repo)[-1]["level"] == "full"

    # And the chain goes on with incrementals.
    run(["qemu-io", "-f", "raw", "-c", "write -P 11 3M 64K", uri])
    p = quiet_backup(daemon, repo, ["disk0"])
    assert "taking a full backup" not in p.stderr
    assert listing(repo)[-1]["level"] == "inc"
    ref = read_all(uri, tmp_path / "ref.raw")
    check_point(repo, "disk0", listing(repo)[-1]["id"], ref, tmp_path)


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.6])
def test_sigkill_mid_run(daemon, tmp_path, delay):
    """SIGKILL `bitback backup` mid-run: the repository stays consistent
    (verify passes) and the next run makes a correct incremental."""
    start(daemon, tmp_path, ["disk0"])
    repo = tmp_path / "repo"
    uri = daemon.nbd_uri("disk0")
    quiet_backup(daemon, repo, ["disk0"])
    before = listing(repo)
    run(["qemu-io", "-f", "raw", "-c", "write -P 21 0 3M", uri])
    p = subprocess.Popen(backup_cmd(daemon, repo, ["disk0"], "inc",
                                    "--speed", "2M"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if delay:
            # Kill once the job runs, `delay` seconds into it.
            line = p.stderr.readline()
            assert b"started" in line, line
            time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    after = listing(repo)
    assert after == before             # nothing half-made became visible
    bitback("verify", "--repo", repo)
    # Writes after the killed run's point in time, then the next run.
    run(["qemu-io", "-f", "raw", "-c", "write -P 22 8M 1M", uri])
    p = quiet_backup(daemon, repo, ["disk0"], level="inc")
    assert "taking a full backup" not in p.stderr, p.stderr
    last = listing(repo)[-1]
    assert last["level"] == "inc" and last["parent"] == before[-1]["id"]
    # It holds both the writes before and after the killed run.
    assert last["changed-bytes"] >= 4 * MiB
    ref = read_all(uri, tmp_path / "ref.raw")
    check_point(repo, "disk0", last["id"], ref, tmp_path)
    bitback("verify", "--repo", repo)
    assert not list((repo / "disk0").glob(".*.tmp"))
    assert daemon.qmp.cmd("query-jobs") == []


def test_attempt_markers(daemon, tmp_path):
    """A run killed before its transaction (marker not started, no bitmap)
    costs nothing; a started run whose bitmap is gone forces a full."""
    start(daemon, tmp_path, ["disk0"])
    repo = tmp_path / "repo"
    uri = daemon.nbd_uri("disk0")
    quiet_backup(daemon, repo, ["disk0"])
    (repo / "disk0" / "000005.attempt").write_text(
        '{"id": "000005", "started": false}\n')
    run(["qemu-io", "-f", "raw", "-c", "write -P 31 5M 64K", uri])
    p = quiet_backup(daemon, repo, ["disk0"], level="inc")
    assert "taking a full backup" not in p.stderr, p.stderr
    last = listing(repo)[-1]
    assert (last["id"], last["level"]) == ("000006", "inc")
    ref = read_all(uri, tmp_path / "ref.raw")
    check_point(repo, "disk0", last["id"], ref, tmp_path)

    (repo / "disk0" / "000009.attempt").write_text(
        '{"id": "000009", "started": true}\n')
    p = quiet_backup(daemon, repo, ["disk0"], level="inc")
    msgs = [l for l in p.stderr.splitlines() if "taking a full backup" in l]
    assert len(msgs) == 1 and repo_bitmap(repo, "000009") in msgs[0] and \
        "missing" in msgs[0], p.stderr
    last = listing(repo)[-1]
    assert (last["id"], last["level"]) == ("000010", "full")
    # The full removed the older bitmaps and markers.
    names = [b["name"] for b in daemon.qmp.node("disk0")["dirty-bitmaps"]]
    assert names == [repo_bitmap(repo, "000010")]
    assert not list((repo / "disk0").glob("*.attempt"))


@pytest.mark.parametrize("args,msg", [
    ([], "--repo is required"),
    (["--repo", "R"], "exactly one of --connect"),
    (["--repo", "R", "--connect", "x", "--image", "y"], "exactly one of"),
    (["--repo", "R", "--connect", "x"], "at least one --node"),
    (["--repo", "R", "--image", "y", "--level", "weekly"], "--level must be"),
    (["--repo", "R", "--image", "y", "--node", "a/b"], "invalid node name"),
    (["--repo", "R", "--image", "missing.img"], "missing.img"),
    (["--repo", "R", "--connect", "/nonexistent/qmp", "--node", "d"],
     "cannot connect"),
])
def test_bad_arguments(tmp_path, args, msg):
    p = run([BITBACK, "backup", *args], check=False, cwd=tmp_path)
    assert p.returncode == 1, p
    assert msg in p.stderr, p.stderr
    assert "Sanitizer" not in p.stderr


def test_unknown_node_and_not_a_repo(daemon, tmp_path):
    start(daemon, tmp_path, ["disk0"])
    p = run(backup_cmd(daemon, tmp_path / "repo", ["nosuch"], "auto"),
            check=False)
    assert p.returncode == 1 and "nosuch" in p.stderr, p.stderr
    assert not list((tmp_path / "repo").glob("nosuch/*.qcow2"))
    other = tmp_path / "notrepo"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    p = run(backup_cmd(daemon, other, ["disk0"], "auto"), check=False)
    assert p.returncode == 1 and "not a bitback repository" in p.stderr
    assert sorted(os.listdir(other)) == ["precious.txt"]


def test_progress_and_json_output(daemon, tmp_path):
    """--progress draws on stderr even without a terminal; --output=json
    gives the backups as `list` shows them, plus timings."""
    start(daemon, tmp_path, ["disk0"])
    repo = tmp_path / "repo"
    p = run(backup_cmd(daemon, repo, ["disk0"], "full", "--progress",
                       "--output=json"))
    out = json.loads(p.stdout)
    assert len(out) == 1
    listed = listing(repo)[0]
    for k in ("id", "node", "level", "time", "parent", "changed-bytes",
              "stored-bytes"):
        assert out[0][k] == listed[k]
    assert out[0]["copy-seconds"] >= 0 and out[0]["hash-seconds"] >= 0
    assert "100%" in p.stderr and "/s" in p.stderr
    # Without --progress and without a terminal: no bar.
    p = run(backup_cmd(daemon, repo, ["disk0"], "inc"))
    assert "%" not in p.stderr
