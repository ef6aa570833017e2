"""A backup chain is exactly the one its manifests describe (issue 15,
item 8; docs/specs/repository.md, invariant 4; DESIGN invariant 6).

`restore` and `verify` once followed whatever backing file each backup's
qcow2 header named, and `verify` hashed only each backup's own clusters: a
header rewritten with `qemu-img rebase -u` (another backup, no backing, a
host file, `json:`, `nbd:`, `../`) passed `verify --at all` while `restore`
wrote the foreign file's data.  Here a real chain (full + 2 incrementals,
`bitback backup --image` on a qcow2) is tampered with in one way per case;
then:

  verify --at all   exits 2 and names the tampered backup and its link
  restore           exits 1 naming it, and leaves no output (nor a .tmp)
                    for every point whose chain holds the tampered link;
                    points below it still restore bit for bit
  prune             refuses to merge through the tampered link and changes
                    nothing

The foreign files hold a known pattern; no restored image ever holds it.
An untampered chain verifies and restores bit for bit.
"""
import json
import os
import shutil

import pytest

from conftest import bitback, require, run
from test_restore_verify import SIZE, Disk, restore, verify

PATTERN = b"FOREIGN-DATA-42!"          # 16 bytes, in no backup


def build(tmp_path):
    """full (1), inc (2), inc (3) of a qcow2 image; a foreign raw file of
    the image's size filled with PATTERN, outside the repository."""
    require("qemu-img")
    d = Disk(tmp_path, "qcow2")
    d.write("write -P 0x11 0 3M", "write -P 0x22 7M 200K",
            "write -P 0x33 16M 4K")
    d.backup("full")
    d.write("write -P 0x44 1M 64K", "write -P 0x55 10485860 10")
    d.backup("inc")
    d.write("write -P 0x66 2M 1M", "write -P 0x77 12M 128K")
    d.backup("inc")
    foreign = tmp_path / "foreign.raw"
    foreign.write_bytes(PATTERN * (SIZE // len(PATTERN)) +
                        PATTERN[:SIZE % len(PATTERN)])
    d.foreign = foreign
    return d


def rebase(path, backing, fmt="qcow2"):
    """Rewrite path's backing file name without touching data."""
    args = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing]
    if backing:
        args += ["-F", fmt]
    run(args + [path])


def manifests(d):
    return {p.name: p.read_bytes() for p in (d.repo / d.node).iterdir()}


def assert_refused(d, tmp_path, bad, tag, why="backing"):
    """verify and restore refuse every point whose chain holds backup bad
    (the messages name it and say `why`); the points below it still
    restore bit for bit."""
    out = verify(d, "--at", "all", rc=2)
    assert f"backup {bad:06d}" in out and why in out, out
    assert "all good" not in out
    js = json.loads(bitback("verify", "--repo", d.repo, "--output=json",
                            check=False).stdout)
    assert not js["ok"]
    assert any(p["id"] == f"{bad:06d}" and p["kind"] == "chain"
               for p in js["problems"]), js
    for seq in (1, 2, 3):
        out_file = tmp_path / f"{tag}-{seq}.raw"
        if seq < bad:
            restore(d, seq, out_file)
            run(["cmp", out_file, d.refs[seq]])
            assert PATTERN not in out_file.read_bytes()
            assert "all good" in verify(d, "--at", str(seq))
            continue
        for fmt in ("raw", "qcow2"):
            p = bitback("restore", "--repo", d.repo, "--at", str(seq),
                        out_file, "-f", fmt, check=False)
            assert p.returncode == 1, p.stdout + p.stderr
            assert f"backup {bad:06d}" in p.stderr, p.stderr
            assert not out_file.exists()
            assert not list(tmp_path.glob(f".{tag}-*.tmp"))
        verify(d, "--at", str(seq), rc=2)
    # prune would merge through the link: it refuses and changes nothing.
    before = manifests(d)
    p = bitback("prune", "--repo", d.repo, "--keep", "1", check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"backup {bad:06d}" in p.stderr, p.stderr
    assert manifests(d) == before


def test_untampered_chain_verifies_and_restores(tmp_path):
    d = build(tmp_path)
    assert "all good" in verify(d, "--at", "all")
    for seq in (1, 2, 3):
        out = tmp_path / f"good{seq}.raw"
        restore(d, seq, out)
        run(["cmp", out, d.refs[seq]])
        qc = tmp_path / f"good{seq}.qcow2"
        restore(d, seq, qc, "qcow2")
        run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", qc,
             d.refs[seq]])
    # prune through the checked chain still merges correctly.
    bitback("prune", "--repo", d.repo, "--keep", "1")
    out = tmp_path / "pruned.raw"
    restore(d, 3, out)
    run(["cmp", out, d.refs[3]])
    assert "all good" in verify(d)


def test_swapped_link(tmp_path):
    """(a) backup 3 names backup 1, another backup of the repository."""
    d = build(tmp_path)
    rebase(d.file(3), "000001.qcow2")
    assert_refused(d, tmp_path, 3, "a")
    out = verify(d, rc=2)
    assert "000001.qcow2" in out and "000002" in out


def test_missing_link(tmp_path):
    """(b) backup 2's backing file removed."""
    d = build(tmp_path)
    rebase(d.file(2), "")
    assert_refused(d, tmp_path, 2, "b")
    assert "no backing file" in verify(d, rc=2)


@pytest.mark.parametrize("target", ["000002.qcow2", "foreign"])
def test_extra_link_on_full(tmp_path, target):
    """(c) a backing file added to the full backup: a later backup of the
    repository (a loop), or a raw file outside it."""
    d = build(tmp_path)
    if target == "foreign":
        rebase(d.file(1), str(d.foreign), "raw")
    else:
        rebase(d.file(1), target)
    assert_refused(d, tmp_path, 1, "c")
    assert "full backup" in verify(d, rc=2)


def test_link_to_host_file(tmp_path):
    """(d) backup 3's backing is an absolute host path: restore once wrote
    that file's content."""
    d = build(tmp_path)
    rebase(d.file(3), str(d.foreign), "raw")
    assert_refused(d, tmp_path, 3, "d")
    assert "absolute path" in verify(d, rc=2)


@pytest.mark.parametrize("kind", ["json", "nbd", "nbd-uri", "file"])
def test_link_with_protocol(tmp_path, kind):
    """(e) json: and protocol-prefixed backing names."""
    d = build(tmp_path)
    names = {
        "json": 'json:{"driver": "raw", "file": {"driver": "file", '
                f'"filename": "{d.foreign}"}}}}',
        "nbd": f"nbd:unix:{tmp_path}/nbd.sock",
        "nbd-uri": f"nbd+unix:///?socket={tmp_path}/nbd.sock",
        "file": f"file:{d.foreign}",
    }
    rebase(d.file(2), names[kind], "raw")
    assert_refused(d, tmp_path, 2, "e")


@pytest.mark.parametrize("name", ["../../foreign.raw", "../disk/000002.qcow2",
                                  "./000002.qcow2"])
def test_link_with_dotdot(tmp_path, name):
    """(f) a relative path that leaves the folder, or names the right
    parent by another spelling: only the exact name is accepted."""
    d = build(tmp_path)
    rebase(d.file(3), name, "raw" if name.endswith(".raw") else "qcow2")
    assert_refused(d, tmp_path, 3, "f")


def test_symlink_out_of_repository(tmp_path):
    """A backup file that is a symlink to a qcow2 outside the repository
    (holding foreign data, with the expected backing name) is refused."""
    d = build(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = outside / "000002.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", d.foreign, evil])
    rebase(evil, "000001.qcow2")
    os.unlink(d.file(2))
    os.symlink(evil, d.file(2))
    assert_refused(d, tmp_path, 2, "g", why="outside the repository")


def test_symlink_inside_repository(tmp_path):
    """A symlink that stays inside the repository is followed."""
    d = build(tmp_path)
    keep = d.repo / "keep"
    keep.mkdir()
    shutil.move(d.file(2), keep / "000002.qcow2")
    os.symlink("../keep/000002.qcow2", d.file(2))
    assert "all good" in verify(d)
    out = tmp_path / "in.raw"
    restore(d, 3, out)
    run(["cmp", out, d.refs[3]])
