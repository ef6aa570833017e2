"""Per-disk repository locks (docs/specs/repository.md, "Locks"), held by
real bitback processes: a backup that runs (rate-limited through bitbackd)
and `bitback serve`.

- While a backup of a disk runs, a second backup of that disk and a prune
  of it are refused at once, saying why; a restore of an earlier backup of
  it and a backup of another disk into the same repository go ahead.
- While `bitback serve` reads a disk, prune of it is refused (nothing is
  deleted) and a backup of it goes ahead.
- A killed holder leaves no stale lock: the next run goes ahead.
Every point restores byte for byte and the repository verifies at the end.
"""
import json
import random
import signal
import subprocess
import time

from bitback_testlib import Daemon
from conftest import BITBACK, bitback, run, start_qcow2_rw

MiB = 1024 * 1024
SIZE = 32 * MiB
SPEED = 4 * MiB            # a full of SIZE takes about 8 s


def make_disk(path, seed):
    raw = path.with_suffix(".raw")
    raw.write_bytes(random.Random(seed).randbytes(SIZE))
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
         str(path)])
    return raw.read_bytes()


def listing(repo):
    return json.loads(bitback("list", "--repo", repo, "--output=json").stdout)


def restore_bytes(repo, node, bid, tmp_path):
    out = tmp_path / f"r-{node}-{bid}.raw"
    bitback("restore", "--repo", repo, "--node", node, "--at", bid,
            "-f", "raw", out)
    data = out.read_bytes()
    out.unlink()
    return data


def wait_for(pred, what, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def refused(p, why):
    assert p.returncode != 0, p.stdout
    assert "cannot" in p.stderr and why in p.stderr, p.stderr


def start_slow_backup(d, repo):
    """A live full of disk through bitbackd at SPEED, in the background;
    returns once its run holds the disk (its temporary file exists)."""
    p = subprocess.Popen([BITBACK, "backup", "--connect", d.qmp_sock,
                          "--node", "disk", "--repo", str(repo),
                          "--level", "full", "--compress=off",
                          "--speed", str(SPEED)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for(lambda: list((repo / "disk").glob(".*.qcow2.tmp")) or
             p.poll() is not None, "the slow backup to start")
    assert p.poll() is None, p.communicate()
    return p


def others_while_held(tmp_path, repo, src, data, other, p, holder=()):
    """While the backup p holds disk: a second backup of it and a prune
    are refused (the backup's message holding each of holder); a restore
    of its backup 000001 (data) and a backup of the disk other go ahead."""
    second = bitback("backup", "--image", src, "--node", "disk",
                     "--repo", repo, check=False)
    refused(second, "another bitback backup or prune is writing it")
    for words in holder:
        assert words in second.stderr, second.stderr
    pr = bitback("prune", "--repo", repo, "--node", "disk",
                 "--keep-last", "1", check=False)
    refused(pr, "another bitback backup or prune is writing it")
    assert restore_bytes(repo, "disk", "000001", tmp_path) == data
    bitback("backup", "--image", other, "--node", "other",
            "--repo", repo, "--compress=off")
    assert p.poll() is None, "the slow backup ended too soon"


def test_backup_holds_its_disk(tmp_path):
    src = tmp_path / "disk.qcow2"
    data = make_disk(src, 1)
    other = tmp_path / "other.qcow2"
    other_data = make_disk(other, 2)
    repo = tmp_path / "repo"
    with Daemon(tmp_path / "d") as d:
        start_qcow2_rw(d, src)
        bitback("backup", "--connect", d.qmp_sock, "--node", "disk",
                "--repo", repo, "--level", "full", "--compress=off")
        p = start_slow_backup(d, repo)
        try:
            others_while_held(tmp_path, repo, src, data, other, p)
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        # Killed while it holds the disk: no stale lock afterwards.
        p = start_slow_backup(d, repo)
        p.send_signal(signal.SIGKILL)
        p.wait()
        bitback("backup", "--connect", d.qmp_sock, "--node", "disk",
                "--repo", repo, "--level", "inc", "--compress=off")
        d.quit()
    ids = {(b["node"], b["level"]) for b in listing(repo)}
    assert ids == {("disk", "full"), ("disk", "inc"), ("other", "full")}, ids
    for b in listing(repo):
        want = data if b["node"] == "disk" else other_data
        assert restore_bytes(repo, b["node"], b["id"], tmp_path) == want
    bitback("prune", "--repo", repo, "--node", "disk", "--keep-last", "1")
    bitback("verify", "--repo", repo)


def test_serve_holds_its_disk_against_prune(tmp_path):
    src = tmp_path / "disk.qcow2"
    data = make_disk(src, 3)
    serve_holds_disk_against_prune(tmp_path, tmp_path / "repo", src, data)


def serve_holds_disk_against_prune(tmp_path, repo, src, data, holder=""):
    """Two fulls of src into repo; while `bitback serve` reads the first,
    prune is refused (its message holding `holder`) and deletes nothing,
    the served point reads whole, a dry run and a backup go ahead; after
    it, prune keeps the newest, which restores to data."""
    cmd = ["backup", "--image", src, "--node", "disk", "--repo", repo,
           "--compress=off"]
    bitback(*cmd, "--level", "full")
    bitback(*cmd, "--level", "full")
    before = listing(repo)
    sock = tmp_path / "serve.sock"
    serve = subprocess.Popen([BITBACK, "serve", "--repo", str(repo),
                              "--node", "disk", "--at", "000001",
                              "--socket", str(sock)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for(lambda: sock.exists() or serve.poll() is not None,
                 "bitback serve")
        assert serve.poll() is None, serve.communicate()
        pr = bitback("prune", "--repo", repo, "--node", "disk",
                     "--keep-last", "1", check=False)
        refused(pr, "a bitback restore, verify or serve is reading it")
        assert holder in pr.stderr, pr.stderr
        assert listing(repo) == before
        # What serve reads is still whole.
        p = run(["nbdcopy", f"nbd+unix:///disk?socket={sock}",
                 str(tmp_path / "served.raw")])
        assert (tmp_path / "served.raw").read_bytes() == data, p.stderr
        # A dry run only reads: it goes ahead.
        bitback("prune", "--repo", repo, "--node", "disk", "--keep-last",
                "1", "--dry-run")
        # A backup only adds files: it goes ahead too.
        bitback(*cmd, "--level", "full")
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert len(listing(repo)) == 3
    bitback("prune", "--repo", repo, "--node", "disk", "--keep-last", "1")
    after = listing(repo)
    assert [b["id"] for b in after] == ["000003"], after
    assert restore_bytes(repo, "disk", "000003", tmp_path) == data
    bitback("verify", "--repo", repo)
