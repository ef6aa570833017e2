"""`bitback restore`, `bitback verify` and `bitback prune` (issue 6) on
offline backup chains.

Chains are made with `bitback backup --image` on a qbm image and on a qcow2
image: full, write, inc, write, inc, write, diff.  After each backup a
reference copy of the source is taken independently of bitback (a copy of
the qbm's raw data file, `qemu-img convert` of the qcow2).  Checks use
cmp, qemu-img compare / check / info / map and qemu-nbd:

  restore     every point, raw and qcow2, equals its reference;
              `qemu-img check` is clean on every repository and restored qcow2
  verify      passes on a good repository; one flipped byte inside a data
              cluster of a stored file fails it (exit 2) naming backup, disk
              and the cluster's guest offset; `--against` a restored raw
              image passes, and fails naming the offset after a byte flip;
              `--against` an NBD export (qemu-nbd) of a good image passes
  prune       --keep 2 on a chain of 5: the kept points restore
              bit-identically, list shows them, verify passes, the synthetic
              full has no backing file
  errors      bad arguments, a missing repository, an unknown ID (exit 1)
"""
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import bitback, require, run

MiB = 1 << 20
CLUSTER = 65536
# Not a multiple of the cluster size: the last cluster is partial.
SIZE = 16 * MiB + 4096


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xff]))


class Disk:
    """A source image bitback backs up offline, and its reference copies."""

    def __init__(self, tmp_path, fmt):
        self.dir = tmp_path
        self.fmt = fmt
        self.repo = tmp_path / "repo"
        self.refs = {}                       # backup id (int) -> raw copy
        if fmt == "qbm":
            self.data = tmp_path / "disk.raw"
            self.image = tmp_path / "disk.qbm"
            bitback("img", "create", "-f", "raw", self.data, str(SIZE))
            bitback("img", "create", "-f", "qbm",
                    "-o", f"data-file={self.data}", self.image)
        else:
            self.image = tmp_path / "disk.qcow2"
            bitback("img", "create", "-f", "qcow2", self.image, str(SIZE))
        self.node = "disk"

    def write(self, *cmds):
        args = []
        for c in cmds:
            args += ["-c", c]
        bitback("io", self.image, *args)

    def backup(self, level):
        # Plain clusters: the corruption tests flip bytes of stored data
        # at host offsets qemu-img map gives (compressed clusters have none).
        p = bitback("backup", "--image", self.image, "--repo", self.repo,
                    "--level", level, "--output=json", "--compress=off")
        out = json.loads(p.stdout)
        entry = out[0] if isinstance(out, list) else out
        seq = int(entry["id"])
        assert entry["level"] == level, p.stdout + p.stderr
        ref = self.dir / f"ref{seq}.raw"
        # The reference is taken without bitback.
        if self.fmt == "qbm":
            shutil.copyfile(self.data, ref)
        else:
            run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                 self.image, ref])
        self.refs[seq] = ref
        return seq

    def file(self, seq):
        return self.repo / self.node / f"{seq:06d}.qcow2"


def build_chain(tmp_path, fmt):
    """full, write, inc, write, inc, write, diff."""
    d = Disk(tmp_path, fmt)
    d.write("write -P 0x11 0 3M", "write -P 0x22 7M 200K",
            "write -P 0x33 16M 4K")             # the partial last cluster
    d.backup("full")
    d.write("write -P 0x44 1M 64K", "write -P 0x55 10485860 10",
            "write -z 7M 64K")
    d.backup("inc")
    d.write("write -P 0x66 2M 1M", "write -P 0x77 12M 128K",
            "write -P 0x88 16M 100")
    d.backup("inc")
    d.write("write -P 0x99 5M 64K", "write -z 0 64K")
    d.backup("diff")
    return d


def list_backups(d):
    """The repository's backups as `bitback list --output=json` gives them,
    checked against the manifests on disk (which are what defines them)."""
    on_disk = [json.loads(f.read_text())
               for f in sorted((d.repo / d.node).glob("*.json"))]
    p = bitback("list", "--repo", d.repo, "--output=json", check=False)
    if "not implemented yet" in p.stderr:     # repo-cmd.c still a placeholder
        return on_disk
    assert p.returncode == 0, p.stderr
    lst = json.loads(p.stdout)
    assert [(b["id"], b["level"], b["parent"]) for b in lst] == \
        [(m["id"], m["level"], m["parent"]) for m in on_disk]
    return lst


def restore(d, seq, out, fmt="raw", *extra):
    return bitback("restore", "--repo", d.repo, "--at", str(seq), out,
                   "-f", fmt, *extra)


def qemu_img_check(path):
    p = run(["qemu-img", "check", "-f", "qcow2", path], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "No errors were found" in p.stdout


def verify(d, *args, rc=0):
    p = bitback("verify", "--repo", d.repo, *args, check=False)
    assert p.returncode == rc, p.stdout + p.stderr
    return p.stdout + p.stderr


def data_cluster_host_offset(path):
    """(guest offset, host offset) of a data cluster in path's own layer."""
    p = run(["qemu-img", "map", "--output=json", "-f", "qcow2", path])
    for e in json.loads(p.stdout):
        if e["data"] and e["depth"] == 0 and "offset" in e:
            return e["start"], e["offset"]
    raise AssertionError(f"no data cluster in {path}: {p.stdout}")


@pytest.fixture(params=["qbm", "qcow2"])
def chain(request, tmp_path):
    require("qemu-img")
    return build_chain(tmp_path, request.param)


def test_restore_every_point(chain, tmp_path):
    d = chain
    assert sorted(d.refs) == [1, 2, 3, 4]
    for seq, ref in d.refs.items():
        qemu_img_check(d.file(seq))
        raw = tmp_path / f"out{seq}.raw"
        restore(d, seq, raw)
        assert os.path.getsize(raw) == SIZE
        run(["cmp", raw, ref])
        qc = tmp_path / f"out{seq}.qcow2"
        restore(d, f"{seq:06d}", qc, "qcow2")
        qemu_img_check(qc)
        run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", qc, ref])
        info = json.loads(run(["qemu-img", "info", "--output=json", qc]).stdout)
        assert "backing-filename" not in info
        # A restored image matches the manifests.
        out = verify(d, "--at", str(seq), "--against", raw)
        assert "all good" in out
    # The raw restore is sparse: the 16 MiB image holds ~5 MiB of data.
    assert os.stat(tmp_path / "out4.raw").st_blocks * 512 < 8 * MiB
    # latest is the default point.
    restore(d, "latest", tmp_path / "latest.raw")
    run(["cmp", tmp_path / "latest.raw", d.refs[4]])
    # The repository's chain is what qemu-img sees.
    info = json.loads(run(["qemu-img", "info", "--backing-chain",
                           "--output=json", d.file(3)]).stdout)
    assert len(info) == 3
    assert "all good" in verify(d)


def test_restore_refuses_existing_output(chain, tmp_path):
    d = chain
    out = tmp_path / "exists.raw"
    out.write_bytes(b"precious")
    p = bitback("restore", "--repo", d.repo, out, check=False)
    assert p.returncode == 1
    assert "already exists" in p.stderr
    assert out.read_bytes() == b"precious"
    restore(d, 2, out, "raw", "--force")
    run(["cmp", out, d.refs[2]])
    assert not list(tmp_path.glob(".*.bitback-restore.tmp"))


def test_verify_detects_stored_corruption(chain):
    d = chain
    assert "all good" in verify(d)
    guest, host = data_cluster_host_offset(d.file(2))
    _flip(d.file(2), host + 100)
    out = verify(d, rc=2)
    cluster = guest // CLUSTER * CLUSTER
    line = [ln for ln in out.splitlines() if "data mismatch" in ln]
    assert line, out
    assert "backup 000002" in line[0] and "disk disk" in line[0]
    assert f"offset {cluster} " in line[0]
    # Only backup 2 is wrong; the others still verify.
    assert "all good" in verify(d, "--at", "1")
    assert "all good" in verify(d, "--at", "3")
    verify(d, "--at", "2", rc=2)
    # JSON output names the same problem.
    p = bitback("verify", "--repo", d.repo, "--output=json", check=False)
    assert p.returncode == 2
    res = json.loads(p.stdout)
    assert not res["ok"]
    assert any(x["id"] == "000002" and x["node"] == "disk" and
               x.get("offset") == cluster and x["kind"] == "data"
               for x in res["problems"])


def test_verify_detects_edited_manifest(chain):
    d = chain
    path = d.repo / d.node / "000003.json"
    m = json.loads(path.read_text())
    [idx] = (d.repo / d.node).glob("000003-*.idx")
    # Drop one record of the index (and count it out of the manifest): the
    # file now stores a block the index lacks, and the root no longer
    # matches the list.
    raw = idx.read_bytes()
    first = int.from_bytes(raw[64:72], "little")
    idx.write_bytes(raw[:64] + raw[64 + 24:])
    m["index-records"] -= 1
    path.write_text(json.dumps(m))
    out = verify(d, "--at", "3", rc=2)
    assert f"offset {first * m['hash-size']}" in out
    assert "merkle-root" in out or "Merkle root" in out
    # A truncated index is a problem of kind "index", named.
    idx.write_bytes(raw[:100])
    m["index-records"] += 1
    path.write_text(json.dumps(m))
    out = verify(d, "--at", "3", rc=2)
    assert "000003-" in out and "index" in out


def test_verify_against_flipped_restore(chain, tmp_path):
    d = chain
    raw = tmp_path / "r.raw"
    restore(d, 3, raw)
    assert "all good" in verify(d, "--at", "3", "--against", raw)
    # One byte in data, one in a hole of the image.
    _flip(raw, 2 * MiB + 12345)
    _flip(raw, 14 * MiB + 7)
    out = verify(d, "--at", "3", "--against", raw, rc=2)
    assert "backup 000003 disk disk" in out
    assert f"offset {2 * MiB} " in out
    assert f"offset {14 * MiB} " in out
    # The image at another point differs too.
    restore(d, 1, tmp_path / "r1.raw")
    out = verify(d, "--at", "4", "--against", tmp_path / "r1.raw", rc=2)
    assert f"offset {MiB} " in out


def test_verify_against_nbd(chain, tmp_path):
    require("qemu-nbd")
    d = chain
    raw = tmp_path / "good.raw"
    restore(d, 4, raw)
    sockdir = tmp_path / "s"
    sockdir.mkdir()
    sock = sockdir / "nbd.sock"
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-r", "--persistent",
                          "--shared=4", f"--socket={sock}", str(raw)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert p.poll() is None, "qemu-nbd exited"
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        assert "all good" in verify(d, "--against", uri)
        out = verify(d, "--at", "1", "--against", uri, rc=2)
        assert "backup 000001 disk disk" in out
    finally:
        p.kill()
        p.wait()


def test_prune_keep_2_of_5(tmp_path):
    require("qemu-img")
    d = build_chain(tmp_path, "qbm")              # 1 full 2 inc 3 inc 4 diff
    d.write("write -P 0xaa 3M 256K", "write -P 0xbb 15M 64K")
    d.backup("inc")                                # 5, parent 4
    p = bitback("prune", "--repo", d.repo, "--keep", "2")
    assert "000004" in p.stdout
    lst = list_backups(d)
    assert [b["id"] for b in lst] == ["000004", "000005"]
    by_id = {b["id"]: b for b in lst}
    assert by_id["000004"]["level"] == "full"
    assert by_id["000004"]["parent"] is None
    assert by_id["000004"]["synthetic"] is True
    assert by_id["000005"]["parent"] == "000004"
    names = sorted(os.listdir(d.repo / d.node))
    assert not [n for n in names if n.startswith(("000001", "000002", "000003"))]
    assert not [n for n in names if n.endswith(".tmp")]
    for seq in (4, 5):
        qemu_img_check(d.file(seq))
        out = tmp_path / f"p{seq}.raw"
        restore(d, seq, out)
        run(["cmp", out, d.refs[seq]])
    info = json.loads(run(["qemu-img", "info", "--backing-chain",
                           "--output=json", d.file(4)]).stdout)
    assert len(info) == 1 and "backing-filename" not in info[0]
    info = json.loads(run(["qemu-img", "info", "--backing-chain",
                           "--output=json", d.file(5)]).stdout)
    assert len(info) == 2
    run(["qemu-img", "compare", "-F", "raw", d.file(5), d.refs[5]])
    assert "all good" in verify(d)
    # The manifest lists every cluster the synthetic full stores.
    m = json.loads((d.repo / d.node / "000004.json").read_text())
    assert m["synthetic"] is True and m["level"] == "full"
    # Pruning again changes nothing; an incremental still follows.
    bitback("prune", "--repo", d.repo, "--keep", "2")
    assert [b["id"] for b in list_backups(d)] == ["000004", "000005"]
    d.write("write -P 0xcc 8M 64K")
    assert d.backup("inc") == 6
    out = tmp_path / "p6.raw"
    restore(d, 6, out)
    run(["cmp", out, d.refs[6]])
    assert "all good" in verify(d)


def test_prune_interrupted_between_renames(tmp_path):
    """The window of prune's step 2: the synthetic full is in place but its
    manifest is still pending.  Restore and verify stay good, and the next
    prune finishes the job."""
    require("qemu-img")
    d = build_chain(tmp_path, "qbm")
    node_dir = d.repo / d.node
    # Make the state: a real prune in a copy of the repository turns
    # backup 2 into a synthetic full; its file goes in place here and its
    # manifest is left pending in .000002.json.tmp, as prune leaves it
    # between its two renames.
    shutil.copytree(d.repo, tmp_path / "copy")
    bitback("prune", "--repo", tmp_path / "copy", "--keep", "3")
    shutil.copyfile(tmp_path / "copy" / d.node / "000002.json",
                    node_dir / ".000002.json.tmp")
    # Its index went in place before the pending manifest was written.
    for idx in (tmp_path / "copy" / d.node).glob("000002-*.idx"):
        shutil.copyfile(idx, node_dir / idx.name)
    shutil.copyfile(tmp_path / "copy" / d.node / "000002.qcow2",
                    node_dir / "000002.qcow2")
    assert json.loads((node_dir / "000002.json").read_text())["parent"] == \
        "000001"
    for seq in (1, 2, 3, 4):
        out = tmp_path / f"w{seq}.raw"
        restore(d, seq, out)
        run(["cmp", out, d.refs[seq]])
    out = verify(d)
    assert "interrupted prune" in out and "all good" in out
    # Without the pending manifest, verify reports backup 2's file.
    pending = (node_dir / ".000002.json.tmp").read_bytes()
    os.unlink(node_dir / ".000002.json.tmp")
    out = verify(d, rc=2)
    assert "backup 000002" in out
    (node_dir / ".000002.json.tmp").write_bytes(pending)
    # The next prune (keeping everything) rolls it forward.
    bitback("prune", "--repo", d.repo, "--keep", "10")
    m = json.loads((node_dir / "000002.json").read_text())
    assert m["level"] == "full" and m["synthetic"] is True
    assert m["parent"] is None
    assert "all good" in verify(d)
    for seq in (1, 2, 3, 4):
        out = tmp_path / f"x{seq}.raw"
        restore(d, seq, out)
        run(["cmp", out, d.refs[seq]])


def test_errors(chain, tmp_path):
    d = chain
    cases = [
        (["restore", "--repo", d.repo, "--at", "9", tmp_path / "x"],
         "no backup 000009 of disk"),
        (["restore", "--repo", tmp_path / "nope", tmp_path / "x"], "nope"),
        (["restore", "--repo", d.repo], "OUTPUT"),
        (["restore", "--repo", d.repo, "--at", "x1", tmp_path / "x"], "x1"),
        (["restore", "--repo", d.repo, "-f", "vmdk", tmp_path / "x"], "vmdk"),
        (["restore", "--repo", d.repo, "--node", "other", tmp_path / "x"],
         "other"),
        (["verify", "--repo", d.repo, "--at", "9"], "no backup 000009 of disk"),
        (["verify", "--repo", tmp_path / "nope"], "nope"),
        (["verify", "--repo", d.repo, "--at", "all", "--against",
          tmp_path / "x"], "--against"),
        (["verify", "--repo", d.repo, "--against", tmp_path / "missing.raw"],
         "missing.raw"),
        (["prune", "--repo", d.repo, "--keep", "0"], "--keep"),
        (["prune", "--repo", d.repo], "--keep"),
        (["prune", "--repo", tmp_path / "nope", "--keep", "1"], "nope"),
    ]
    for args, needle in cases:
        p = bitback(*args, check=False)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert needle in p.stderr, (args, p.stderr)
        assert not (tmp_path / "x").exists()
    for cmd in ("restore", "verify", "prune"):
        p = bitback(cmd, "--help")
        assert "--repo" in p.stdout
    # Nothing was changed by the failures.
    assert "all good" in verify(d)
