"""Version-1 repositories keep working (issue 18).

tests/fixtures/repo-v1.tar.xz is a repository written by bitback at
01893cd, the last version-1 writer (hashes inline in the JSON manifests,
tests/fixtures/README.md).  Today's bitback lists, restores and verifies
every point of it, bit for bit against the images recorded when they were
taken; `verify --against` compares with the inline hashes; a new backup
into it marks the repository version 2 (so an older bitback refuses it as
a whole) and chains onto the version-1 backups, and prune merges across
the two versions.
"""
import hashlib
import json
import tarfile
from pathlib import Path

from conftest import bitback, run

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "repo-v1.tar.xz"
# expected.sha256's file names -> (node, ID)
POINTS = {"p2.raw": ("disk0", 2), "p3.raw": ("disk0", 3),
          "p4.raw": ("disk0", 4), "d1-p1.raw": ("disk1", 5),
          "d1-p2.raw": ("disk1", 6), "d1-p3.raw": ("disk1", 7)}


def unpack(tmp_path):
    with tarfile.open(FIXTURE) as t:
        t.extractall(tmp_path)
    want = {}
    for line in (tmp_path / "expected.sha256").read_text().splitlines():
        digest, name = line.split()
        want[POINTS[name]] = digest
    return tmp_path / "repo", want


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_v1_list_restore_verify(tmp_path):
    repo, want = unpack(tmp_path)
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    out = json.loads(bitback("list", "--repo", repo, "--output=json").stdout)
    assert [(b["node"], int(b["id"])) for b in out] == sorted(
        want, key=lambda k: k[1])
    assert {b["id"]: b["level"] for b in out}["000004"] == "inc"
    for (node, seq), digest in want.items():
        raw = tmp_path / f"{node}-{seq}.raw"
        bitback("restore", "--repo", repo, "--node", node, "--at", str(seq),
                raw)
        assert sha256(raw) == digest, (node, seq)
        out = bitback("verify", "--repo", repo, "--node", node, "--at",
                      str(seq), "--against", raw).stdout
        assert "all good" in out, out
    out = bitback("verify", "--repo", repo).stdout
    assert "6 backups checked, all good" in out, out
    # Readers never write.
    after = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert before == after


def test_v1_damage_still_found(tmp_path):
    repo, _ = unpack(tmp_path)
    m = repo / "disk1" / "000006.json"
    j = json.loads(m.read_text())
    assert j["version"] == 1
    j["hashes"][0][1] = "0" * 32
    m.write_text(json.dumps(j))
    p = bitback("verify", "--repo", repo, "--node", "disk1", check=False)
    assert p.returncode == 2, p.stdout
    assert "000006" in p.stdout and "merkle" in p.stdout.lower()


def test_v2_backup_onto_v1_chain(tmp_path):
    repo, want = unpack(tmp_path)
    img = tmp_path / "disk1.qcow2"
    bitback("restore", "--repo", repo, "--node", "disk1", "--at", "7", img,
            "-f", "qcow2")
    bitback("io", "-c", "write -P 0x99 1M 64K", img)
    # An offline backup of an image without the repository's bitmaps is a
    # full; it goes into the same disk's folder as version 2.
    bitback("backup", "--image", img, "--node", "disk1", "--repo", repo)
    marker = json.loads((repo / "bitback-repo.json").read_text())
    assert marker["version"] == 2
    new = json.loads((repo / "disk1" / "000008.json").read_text())
    assert new["version"] == 2 and "hashes" not in new
    assert list((repo / "disk1").glob("000008-*.idx"))
    raw = tmp_path / "p8.raw"
    bitback("restore", "--repo", repo, "--node", "disk1", "--at", "8", raw)
    run(["qemu-img", "convert", "-O", "raw", img, tmp_path / "img.raw"])
    assert sha256(raw) == sha256(tmp_path / "img.raw")
    assert "7 backups checked, all good" in bitback(
        "verify", "--repo", repo).stdout
    # Prune merges the version-1 chain of disk0 into a version-2 full.
    bitback("prune", "--repo", repo, "--node", "disk0", "--keep", "1")
    m4 = json.loads((repo / "disk0" / "000004.json").read_text())
    assert m4["version"] == 2 and m4["synthetic"] and m4["parent"] is None
    raw4 = tmp_path / "p4.raw"
    bitback("restore", "--repo", repo, "--node", "disk0", "--at", "4", raw4)
    assert sha256(raw4) == want[("disk0", 4)]
    assert "all good" in bitback("verify", "--repo", repo).stdout
