"""Instant restore (issue 18): `bitback serve` exports a backup point over
NBD at once, and `bitback restore` writes in place into an existing file
or block device.

A qcow2 disk of 256 MiB with 64 MiB of data is backed up offline (full,
inc, inc); a raw reference of each point is taken with qemu-img.  Each
point is served and compared with its reference by qemu-img and nbdinfo;
qemu-io and nbdcopy read the latest point while `bitback restore` of it
runs; --writable takes writes into a throw-away overlay that leaves the
repository byte-identical.
"""
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import time

import pytest

from conftest import BITBACK, bitback, require, run

KiB = 1024
MiB = 1024 * KiB
SIZE = 256 * MiB
PIECE = 64 * KiB           # restore --sparse compares 64 KiB pieces

# What each backup adds: (level, qemu-io commands).
POINTS = [
    ("full", ["write -P 0x11 0 32M", "write -P 0x22 100M 32M"]),
    ("inc", ["write -P 0x33 1M 64K", "write -z 100M 1M",
             "write -P 0x44 200M 1M"]),
    ("inc", ["write -P 0x55 10M 3M", "write -P 0x66 255M 64K"]),
]


class Chain:
    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.repo = tmp_path / "repo"
        self.image = tmp_path / "disk.qcow2"
        self.refs = {}                       # seq -> raw reference
        bitback("img", "create", "-f", "qcow2", self.image, str(SIZE))
        for level, cmds in POINTS:
            args = []
            for c in cmds:
                args += ["-c", c]
            bitback("io", self.image, *args)
            p = bitback("backup", "--image", self.image, "--repo", self.repo,
                        "--level", level, "--output=json")
            out = json.loads(p.stdout)
            seq = int((out[0] if isinstance(out, list) else out)["id"])
            ref = tmp_path / f"ref{seq}.raw"
            run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                 self.image, ref])
            self.refs[seq] = ref


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    for tool in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy"):
        require(tool)
    return Chain(tmp_path_factory.mktemp("chain"))


def repo_hashes(repo):
    """sha256 of every file of the repository, by relative path."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repo.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def serve(chain, *args, env=None):
    """Run `bitback serve --repo REPO ARGS`, wait for its ready line and
    yield (URI, process); stop it with SIGINT and check it exits 0."""
    p = subprocess.Popen([BITBACK, "serve", "--repo", str(chain.repo),
                          *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while not line and time.monotonic() < deadline:
            r, _, _ = select.select([p.stdout], [], [], 1)
            if r:
                line = p.stdout.readline()
                if not line:
                    break                    # exited before it was ready
        assert line.startswith("serving "), \
            f"no ready line: {line!r} {p.stderr.read() if p.poll() is not None else ''}"
        uri = line.split(" on ")[1].split()[0]
        yield uri, p
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def nbd_map(uri):
    """[(offset, length, type)] of base:allocation on uri (nbdinfo)."""
    p = run(["nbdinfo", "--json", "--map", uri])
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(p.stdout)]


def is_hole(extents, off, length):
    """True when [off, off+length) is reported as a hole (type bit 0)."""
    for o, n, t in extents:
        if o < off + length and off < o + n and not (t & 1):
            return False
    return True


def test_serve_every_point(chain, tmp_path):
    sock = tmp_path / "s.sock"
    for seq, ref in chain.refs.items():
        with serve(chain, "--at", seq, "--socket", sock) as (uri, _):
            assert uri == f"nbd+unix:///disk?socket={sock}"
            run(["qemu-img", "compare", "-f", "raw", "-F", "raw", ref, uri])
            ext = nbd_map(uri)
            # Never written: holes.  Written: data.
            assert is_hole(ext, 160 * MiB, 40 * MiB)
            assert is_hole(ext, 32 * MiB, 68 * MiB)
            assert not is_hole(ext, 0, 32 * MiB)
        assert not sock.exists()      # removed on exit
    # TCP on 127.0.0.1, port 0: the ready line gives the real port, and
    # --export-name renames the export.
    with serve(chain, "--bind", "127.0.0.1:0", "--export-name", "vm") as (uri, _):
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/vm")
        assert not uri.startswith("nbd://127.0.0.1:0/")
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
             chain.refs[3], uri])


def test_serve_while_restore_runs(chain, tmp_path):
    sock = tmp_path / "s.sock"
    out = tmp_path / "restored.raw"
    copy = tmp_path / "nbdcopy.raw"
    with serve(chain, "--socket", sock) as (uri, _):
        restore = subprocess.Popen([BITBACK, "restore", "--repo", chain.repo,
                                    "--at", "latest", out],
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            # Two clients at once, next to the restore.
            qio = subprocess.Popen(
                ["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x55 10M 3M",
                 "-c", "read -P 0x11 0 1M", "-c", "read -P 0x66 255M 64K",
                 "-c", "read -P 0 160M 1M", uri],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            cp = subprocess.Popen(["nbdcopy", uri, copy],
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
            o, e = qio.communicate(timeout=120)
            assert qio.returncode == 0 and "Pattern verification failed" \
                not in o, o + e
            o, e = cp.communicate(timeout=120)
            assert cp.returncode == 0, e
            o, e = restore.communicate(timeout=300)
            assert restore.returncode == 0, e
        finally:
            for p in (restore,):
                if p.poll() is None:
                    p.kill()
                    p.wait()
    run(["cmp", copy, chain.refs[3]])
    run(["cmp", out, chain.refs[3]])


def test_serve_writable_overlay(chain, tmp_path):
    sock = tmp_path / "s.sock"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    before = repo_hashes(chain.repo)
    env = dict(os.environ, TMPDIR=str(tmpdir))
    with serve(chain, "--at", "2", "--socket", sock, "--writable",
               env=env) as (uri, _):
        run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 5M 128K",
             "-c", "write -z 0 64K", "-c", "write -P 0xcd 255M 4K", uri])
        p = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xab 5M 128K",
                 "-c", "read -P 0 0 64K", "-c", "read -P 0x11 64K 64K",
                 "-c", "read -P 0xcd 255M 4K", uri])
        assert "Pattern verification failed" not in p.stdout
    assert repo_hashes(chain.repo) == before
    assert list(tmpdir.iterdir()) == []            # the overlay is gone
    assert "all good" in bitback("verify", "--repo", chain.repo).stdout
    # A new server shows the point as it was, without the writes.
    with serve(chain, "--at", "2", "--socket", sock) as (uri, _):
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
             chain.refs[2], uri])


def test_serve_read_only_refuses_writes(chain, tmp_path):
    sock = tmp_path / "s.sock"
    before = repo_hashes(chain.repo)
    with serve(chain, "--socket", sock) as (uri, _):
        p = run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 4K", uri],
                check=False)
        assert p.returncode != 0, p.stdout
        # libnbd sees the read-only flag.
        p = run(["nbdinfo", "--json", uri])
        assert json.loads(p.stdout)["exports"][0]["is_read_only"]
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
             chain.refs[3], uri])
    assert repo_hashes(chain.repo) == before


def changed_pieces(a, b):
    """Bytes in the 64 KiB pieces where files a and b differ."""
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(PIECE), fb.read(PIECE)
            if not x:
                return n
            if x != y:
                n += len(x)


def restore_json(chain, seq, out, *extra, check=True):
    p = bitback("restore", "--repo", chain.repo, "--at", str(seq), out,
                "--output=json", *extra, check=check)
    return p if not check else json.loads(p.stdout)


def test_restore_into_existing_file(chain, tmp_path):
    out = tmp_path / "target.raw"
    shutil.copyfile(chain.refs[1], out)
    tail = b"\xab" * MiB
    with open(out, "ab") as f:
        f.write(tail)                       # a larger target keeps its tail
    ino = os.stat(out).st_ino
    expect = changed_pieces(chain.refs[1], chain.refs[3])
    r = restore_json(chain, 3, out, "--existing", "--sparse")
    assert r["in-place"] is True
    assert r["data-bytes"] == expect and 0 < expect < 16 * MiB
    assert os.stat(out).st_ino == ino       # no rename
    assert os.path.getsize(out) == SIZE + MiB
    with open(out, "rb") as f:
        f.seek(SIZE)
        assert f.read() == tail
    run(["cmp", "-n", str(SIZE), out, chain.refs[3]])
    # Again: nothing differs, nothing is written.
    assert restore_json(chain, 3, out, "--existing", "--sparse")[
        "data-bytes"] == 0
    # Without --sparse every byte is written (back to point 1).
    r = restore_json(chain, 1, out, "--existing")
    assert r["data-bytes"] == SIZE
    run(["cmp", "-n", str(SIZE), out, chain.refs[1]])
    # A plain existing file is still refused without a flag.
    p = restore_json(chain, 2, out, check=False)
    assert p.returncode == 1 and "already exists" in p.stderr


def test_restore_into_smaller_file_refused(chain, tmp_path):
    out = tmp_path / "small.raw"
    data = os.urandom(64 * KiB) * 16
    with open(out, "wb") as f:
        f.truncate(SIZE - MiB)
        f.seek(0)
        f.write(data)
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    for extra in (["--existing"], ["--existing", "--sparse"]):
        p = restore_json(chain, 3, out, *extra, check=False)
        assert p.returncode == 1
        assert "smaller" in p.stderr, p.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == before
        assert os.path.getsize(out) == SIZE - MiB


def test_restore_into_block_device(chain, tmp_path):
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE + MiB)
    p = run(["losetup", "-f", "--show", backing], check=False)
    if p.returncode != 0:
        pytest.skip(f"no loop device here: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        # A block device is written in place without --existing.
        r = restore_json(chain, 2, dev)
        assert r["in-place"] is True
        run(["cmp", "-n", str(SIZE), dev, chain.refs[2]])
        expect = changed_pieces(chain.refs[2], chain.refs[3])
        r = restore_json(chain, 3, dev, "--sparse")
        assert r["data-bytes"] == expect
        run(["cmp", "-n", str(SIZE), dev, chain.refs[3]])
    finally:
        run(["losetup", "-d", dev], check=False)


def test_bad_input(chain, tmp_path):
    sock = tmp_path / "s.sock"
    out = tmp_path / "exists.raw"
    out.write_bytes(b"x" * 4096)
    cases = [
        (["serve", "--repo", chain.repo, "--at", "9", "--socket", sock],
         "no backup 000009 of disk"),
        (["serve", "--repo", chain.repo, "--socket", sock, "--bind",
          "127.0.0.1:0"], "exactly one of --socket"),
        (["serve", "--repo", chain.repo], "exactly one of --socket"),
        (["serve", "--repo", chain.repo, "--bind", "127.0.0.1"], "--bind"),
        (["serve", "--repo", chain.repo, "--bind", "127.0.0.1:99999"],
         "bad port"),
        (["serve", "--socket", sock], "--repo"),
        (["restore", "--repo", chain.repo, "--sparse", tmp_path / "new.raw"],
         "--sparse"),
        (["restore", "--repo", chain.repo, "--existing", "--force", out],
         "--existing"),
        (["restore", "--repo", chain.repo, "--existing",
          tmp_path / "missing.raw"], "not an existing"),
        (["restore", "--repo", chain.repo, "--existing", "-f", "qcow2", out],
         "raw"),
    ]
    for args, needle in cases:
        p = bitback(*args, check=False)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert needle in p.stderr, (args, p.stderr)
        assert not sock.exists()
    assert out.read_bytes() == b"x" * 4096
    assert not (tmp_path / "new.raw").exists()
    assert "--socket" in bitback("serve", "--help").stdout
    assert "serve" in bitback("--help").stdout
