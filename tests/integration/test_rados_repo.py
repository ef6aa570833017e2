"""A repository in the Ceph cluster (src/repo/storage-rados.c,
docs/specs/repository.md "Storage backends"): `--repo rbd:POOL[/NS]` keeps
metadata as RADOS objects and each backup's qcow2 in an RBD image.  A chain
is written into a pool of its own, restored from a second process with no
local files (a fresh folder, only the cluster's conf) and compared bit for
bit; verify finds a corrupted image; qemu-img reads a point straight from
the cluster; a killed backup is cleaned up by the next run; bad names fail
with a clear error.
"""
import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from conftest import BITBACK, BUILD, bitback, run

MiB = 1024 * 1024
SIZE = 32 * MiB


def pool_for(ceph):
    name = f"repo-{uuid.uuid4().hex[:8]}"
    ceph.create_pool(name, rbd=True)
    return name


def names(ceph, *args):
    out = ceph.tool(*args).stdout
    return (out.decode() if isinstance(out, bytes) else out).split()


def repo_name(ceph, pool, ns=None):
    return f"rbd:{pool}{'/' + ns if ns else ''}:conf={ceph.conf}"


def write(img, off, length, pattern):
    bitback("io", "-f", "qcow2", img, "-c",
            f"write -q -P {pattern} {off} {length}")


def snapshot(img, dest):
    run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(img),
         str(dest)])
    return dest


def elsewhere(tmp_path, ceph, *args, check=True):
    """bitback in a fresh empty folder with only the conf (no local files
    of the first process)."""
    d = tmp_path / f"host2-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    return bitback(*args, check=check, cwd=d)


def make_chain(tmp_path, ceph, repo, n=3):
    """A qcow2 source with n backups taken offline; the raw copies at each
    backup's time."""
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), str(SIZE)])
    refs = []
    for i in range(n):
        write(src, i * 3 * MiB + 4096, MiB + 512 * 1024, hex(0x11 * (i + 1)))
        bitback("backup", "--image", src, "--node", "disk", "--repo", repo)
        refs.append(snapshot(src, tmp_path / f"ref{i + 1}.raw"))
    return src, refs


def test_rados_repo_chain_restore_verify(tmp_path, ceph):
    pool = pool_for(ceph)
    repo = repo_name(ceph, pool)
    _, refs = make_chain(tmp_path, ceph, repo)

    listing = json.loads(elsewhere(tmp_path, ceph, "list", "--repo", repo,
                                  "--output=json").stdout)
    ids = [b["id"] for b in listing] if isinstance(listing, list) else None
    assert ids is not None and len(ids) == 3, listing
    # Metadata are RADOS objects, data RBD images (the documented names).
    objs = names(ceph, "rados", "-p", pool, "ls")
    assert "bitback-repo.json" in objs and "disk/000001.json" in objs, objs
    imgs = names(ceph, "rbd", "ls", pool)
    assert sorted(i for i in imgs if i.endswith(".qcow2")) == [
        "disk%2F000001.qcow2", "disk%2F000002.qcow2", "disk%2F000003.qcow2"], imgs

    for i, ref in enumerate(refs, 1):
        out = tmp_path / f"restored{i}.raw"
        elsewhere(tmp_path, ceph, "restore", "--repo", repo, "--node", "disk",
                  "--at", str(i), str(out))
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref),
             str(out)])
    elsewhere(tmp_path, ceph, "verify", "--repo", repo)

    # qemu-img reads a full straight from the cluster.
    env = dict(os.environ, CEPH_CONF=str(ceph.conf))
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json",
                           f"rbd:{pool}/disk%2F000001.qcow2:conf={ceph.conf}"],
                          env=env).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == SIZE, info
    run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(refs[0]),
         f"rbd:{pool}/disk%2F000001.qcow2:conf={ceph.conf}"], env=env)

    # Garbage in the full's data image: verify names it.
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(MiB))
    img = f"{pool}/disk%2F000001.qcow2"
    raw = tmp_path / "img1"
    ceph.tool("rbd", "export", img, str(raw))
    data = bytearray(raw.read_bytes())
    # Every non-zero byte past the header cluster: metadata and data.
    for off in range(65536, len(data)):
        if data[off]:
            data[off] ^= 0xff
    raw.write_bytes(bytes(data))
    ceph.tool("rbd", "rm", img)
    ceph.tool("rbd", "import", str(raw), img)
    p = elsewhere(tmp_path, ceph, "verify", "--repo", repo, check=False)
    assert p.returncode != 0, p.stdout
    assert "000001" in p.stdout + p.stderr, p.stdout + p.stderr


def test_rados_repo_namespace(tmp_path, ceph):
    pool = pool_for(ceph)
    ceph.tool("rbd", "namespace", "create", f"{pool}/ns1")
    repo = repo_name(ceph, pool, "ns1")
    _, refs = make_chain(tmp_path, ceph, repo, n=2)
    out = tmp_path / "r.raw"
    elsewhere(tmp_path, ceph, "restore", "--repo", repo, "--at", "latest",
              str(out))
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(refs[1]),
         str(out)])
    assert "disk/000002.json" in names(
        ceph, "rados", "-p", pool, "-N", "ns1", "ls")


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_rados_repo_killed_backup_cleaned(tmp_path, ceph, mode, monkeypatch):
    """SIGKILL `bitback backup` while the daemon copies (push: rate
    limited, killed once the job started; pull: killed at its first
    progress draw): nothing half-published is listed, the repository
    verifies, and the next run removes the killed run's nodes and
    temporary image, succeeds as an incremental and restores bit for
    bit from a second process.  The killed run's disk lock (3 s here)
    must expire first (test_rados_lock.py)."""
    from test_backup_cli import backup_cmd, listing
    from test_pull import serve, until_copying, write_through_export
    import shutil
    import tempfile
    tempfile.gettempdir()
    short = tempfile.mkdtemp(prefix="bbr-")      # the pull folder's socket
    monkeypatch.setenv("TMPDIR", short)
    monkeypatch.setenv("BITBACK_RADOS_LOCK_SECONDS", "3")
    pool = pool_for(ceph)
    repo = repo_name(ceph, pool)
    d = serve(tmp_path, "bitbackd", "qcow2", 128 * MiB, nbd=False)
    sock = d.sockdir / "tw.sock"
    extra = ["--pull", "--progress"] if mode == "pull" else ["--speed", "1M"]
    try:
        run(backup_cmd(d, repo, ["disk0"], "full"))
        before = listing(repo)
        ref = tmp_path / "ref.raw"
        write_through_export(d, sock, ["-c", "write -P 7 0 96M"], ref)
        p = subprocess.Popen(backup_cmd(d, repo, ["disk0"], "inc", *extra),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if mode == "pull":
                until_copying(p)
            else:
                line = b""
                for _ in range(100):             # bounded: a line each
                    line = p.stderr.readline()
                    if not line or b" started (" in line:
                        break
                assert b" started (" in line, line
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert listing(repo) == before
        elsewhere(tmp_path, ceph, "verify", "--repo", repo)
        if mode == "push":
            assert [n for n in names(ceph, "rbd", "ls", pool)
                    if n.endswith(".qcow2.tmp")], "the killed run's image"
        time.sleep(4)                            # the lock expires
        nxt = run(backup_cmd(d, repo, ["disk0"], "inc"))
        assert "taking a full backup" not in nxt.stderr, nxt.stderr
        last = listing(repo)[-1]
        assert last["level"] == "inc" and last["parent"] == before[-1]["id"]
        out = tmp_path / "after-kill.raw"
        elsewhere(tmp_path, ceph, "restore", "--repo", repo, "--at",
                  last["id"], str(out))
        run(["cmp", str(out), str(ref)])
        elsewhere(tmp_path, ceph, "verify", "--repo", repo)
        leftovers = [n for n in names(ceph, "rbd", "ls", pool)
                     if n.endswith(".tmp")]
        leftovers += [n for n in names(ceph, "rados", "-p", pool, "ls")
                      if n.endswith(".tmp")]
        assert not leftovers, leftovers
        q = d.connect_qmp()
        try:
            left = [n["node-name"] for n in q.cmd("query-named-block-nodes")
                    if n["node-name"].startswith(("bbt-", "bbf-"))]
        finally:
            q.close()
        assert not left, left
    finally:
        d.cleanup()
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.parametrize("bad,words", [
    ("rbd:", "pool"),
    ("rbd:/ns", "pool"),
    ("rbd:pool/ns/extra", "expected"),
    ("rbd:pool@snap", "expected"),
    ("rbd:pool:novalue", "no value"),
])
def test_rados_repo_bad_names(tmp_path, ceph, bad, words):
    p = bitback("list", "--repo", bad, check=False)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert words in p.stderr, p.stderr


def test_rados_repo_help():
    for cmd in ("backup", "list", "restore", "verify", "prune", "serve"):
        assert "rbd:POOL[/NS]" in bitback(cmd, "--help").stdout, cmd


def test_rados_repo_missing_pool(tmp_path, ceph):
    p = bitback("list", "--repo", f"rbd:nosuchpool-{uuid.uuid4().hex[:6]}"
                f":conf={ceph.conf}", check=False)
    assert p.returncode == 1 and "cannot open pool 'nosuchpool" in p.stderr, \
        p.stderr


def test_rados_repo_hostile_manifest(tmp_path, ceph):
    """A manifest naming a parent outside the chain, or an image of another
    pool in its backing link, is refused; nothing outside is opened."""
    pool = pool_for(ceph)
    repo = repo_name(ceph, pool)
    make_chain(tmp_path, ceph, repo, n=2)
    # An image outside the repository's names, with a manifest pointing at
    # it by node name "../x" is invalid; a backing link naming another pool
    # is not followed: write it into the qcow2 header of backup 2.
    img = f"{pool}/disk%2F000002.qcow2"
    raw = tmp_path / "img2.qcow2"
    ceph.tool("rbd", "export", img, str(raw))
    run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b",
         f"rbd:other/evil:conf={ceph.conf}", str(raw)])
    ceph.tool("rbd", "rm", img)
    ceph.tool("rbd", "import", str(raw), img)
    p = elsewhere(tmp_path, ceph, "restore", "--repo", repo, "--at", "2",
                  str(tmp_path / "x.raw"), check=False)
    assert p.returncode == 1 and "backing" in p.stderr, p.stderr
    obj = "disk/000001.json"
    got = tmp_path / "m.json"
    ceph.tool("rados", "-p", pool, "get", obj, str(got))
    m = json.loads(got.read_text())
    m["node"] = "../../other"
    got.write_text(json.dumps(m))
    ceph.tool("rados", "-p", pool, "put", obj, str(got))
    p = elsewhere(tmp_path, ceph, "verify", "--repo", repo, check=False)
    assert p.returncode != 0 and p.returncode < 128, p


def test_rados_repo_prune(tmp_path, ceph):
    """prune --keep-last 1 turns the newest into a synthetic full in the
    cluster and deletes the rest (their objects and images); it restores."""
    pool = pool_for(ceph)
    repo = repo_name(ceph, pool)
    _, refs = make_chain(tmp_path, ceph, repo, n=3)
    elsewhere(tmp_path, ceph, "prune", "--repo", repo, "--keep-last", "1")
    listing = json.loads(bitback("list", "--repo", repo,
                                 "--output=json").stdout)
    assert [b["id"] for b in listing] == ["000003"], listing
    imgs = [n for n in names(ceph, "rbd", "ls", pool) if n.endswith("qcow2")]
    assert imgs == ["disk%2F000003.qcow2"], imgs
    # The replaced image went through the RBD trash and is gone.
    assert names(ceph, "rbd", "trash", "ls", pool) == []
    objs = names(ceph, "rados", "-p", pool, "ls")
    assert not [o for o in objs if o.startswith("disk/00000")
                and not o.startswith("disk/000003")], objs
    out = tmp_path / "p.raw"
    elsewhere(tmp_path, ceph, "restore", "--repo", repo, "--at", "latest",
              str(out))
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(refs[2]),
         str(out)])
    elsewhere(tmp_path, ceph, "verify", "--repo", repo)
    # The synthetic full has no backing file: qemu-img reads it alone.
    env = dict(os.environ, CEPH_CONF=str(ceph.conf))
    run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(refs[2]),
         f"rbd:{pool}/disk%2F000003.qcow2:conf={ceph.conf}"], env=env)


@pytest.mark.parametrize("kind,extra", [("bitbackd", []),
                                        ("bitbackd", ["--pull"]),
                                        ("qsd", [])],
                         ids=["push", "pull", "qsd-push"])
def test_rados_repo_live_chain_under_load(tmp_path, ceph, kind, extra,
                                          monkeypatch):
    """full, inc, inc from bitbackd or qemu-storage-daemon (a local qcow2
    with persistent bitmaps) while a writer runs, pushed by the daemon into
    RBD images (its own target node, QEMU's rbd options) or pulled by
    bitback; each point restored from a second process with no local files
    is the copy taken at its transaction time."""
    from test_backup_cli import listing, live_writer, run_backup_live
    from test_pull import serve
    import tempfile
    tempfile.gettempdir()
    short = tempfile.mkdtemp(prefix="bbr-")      # the pull folder's socket
    monkeypatch.setenv("TMPDIR", short)
    pool = pool_for(ceph)
    repo = repo_name(ceph, pool)
    d = serve(tmp_path, kind, "qcow2", 32 * MiB, nbd=True, data_mib=32)
    try:
        if extra:
            extra = ["--pull", "--nbd-socket", str(d.nbd_sock)]
        writer = live_writer([d.nbd_uri("disk0")])
        writer.start()
        points = []
        try:
            for tag, level in [("p1", "full"), ("p2", "inc"), ("p3", "inc")]:
                time.sleep(0.3)
                bid, refs, err = run_backup_live(d, repo, ["disk0"], level,
                                                 writer, tmp_path, tag,
                                                 *extra, speed=None)
                assert "taking a full backup" not in err, err
                points.append((bid, refs["disk0"]))
        finally:
            writer.stop()
        assert writer.writes > 20
        backups = listing(repo)
        assert [b["level"] for b in backups] == ["full", "inc", "inc"]
        assert [b["id"] for b in backups] == [p[0] for p in points]
        for bid, ref in points:
            out = tmp_path / f"live-{bid}.raw"
            elsewhere(tmp_path, ceph, "restore", "--repo", repo, "--at", bid,
                      str(out))
            run(["cmp", str(out), str(ref)])
        elsewhere(tmp_path, ceph, "verify", "--repo", repo)
        # No target node of a run is left in the daemon.
        q = d.connect_qmp()
        try:
            left = [n["node-name"] for n in q.cmd("query-named-block-nodes")
                    if n["node-name"].startswith("bbt-")]
        finally:
            q.close()
        assert not left, left
        # The daemon's folder got nothing of the repository.
        assert not [n for n in os.listdir(d.workdir) if "qcow2.tmp" in n
                    or n.endswith(".json")]
    finally:
        d.cleanup()
        import shutil
        shutil.rmtree(short, ignore_errors=True)


def test_rados_repo_serve(tmp_path, ceph):
    """`bitback serve` exports a point of the cluster's repository over NBD
    from a process with no local files; nbdcopy reads the reference."""
    from test_serve import serve

    class Chain:
        pass
    pool = pool_for(ceph)
    chain = Chain()
    chain.repo = repo_name(ceph, pool)
    _, refs = make_chain(tmp_path, ceph, chain.repo, n=2)
    sock = tmp_path / "s.sock"
    for at, ref in (("1", refs[0]), ("latest", refs[1])):
        out = tmp_path / f"served-{at}.raw"
        with serve(chain, "--at", at, "--socket", sock) as (uri, _):
            run(["nbdcopy", uri, str(out)])
        run(["cmp", str(out), str(ref)])


def test_rados_storage_unit(ceph, tmp_path):
    """tests/unit/test-storage-rados (the backend's C checks against a
    model: small files, listing, a rename larger than one atomic write,
    names outside the root) in a pool of its own; it fails without a
    cluster, so it runs only here, and its test count is checked."""
    pool = pool_for(ceph)
    env = dict(ceph.env(), BITBACK_TEST_CEPH_CONF=str(ceph.conf),
               BITBACK_TEST_CEPH_POOL=pool, TMPDIR=str(tmp_path))
    p = subprocess.run([str(BUILD / "tests" / "unit" / "test-storage-rados")],
                       env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "[  PASSED  ] 4 test(s)." in out, out
    # Nothing left but RBD's own objects.
    assert [n for n in names(ceph, "rados", "-p", pool, "ls")
            if not n.startswith("rbd_")] == []
