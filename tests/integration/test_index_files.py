"""Index files on disk (docs/specs/repository.md "Index", I6): prune
removes the indexes no manifest names -- those of deleted backups and the
old index of a backup it rewrote as a synthetic full -- but never one of a
run that has not finished its commit (its attempt marker is there: it may
be committing right now, in another process)."""
import json

from conftest import bitback


def indexes(node_dir):
    return sorted(p.name for p in node_dir.glob("*.idx"))


def test_prune_removes_stale_keeps_uncommitted(tmp_path):
    img = tmp_path / "d.qcow2"
    bitback("img", "create", "-f", "qcow2", img, "16M")
    repo = tmp_path / "repo"
    for i in range(3):
        bitback("io", "-c", f"write -P {i + 1} {i}M 1M", img)
        bitback("backup", "--image", img, "--repo", repo)
    node = repo / "d"
    assert len(indexes(node)) == 3
    # A run that wrote its index and has not committed yet.
    fake = node / "000009-0123456789abcdef.idx"
    fake.write_bytes(b"BBKINDEX" + bytes(56))
    (node / "000009.attempt").write_text('{"id": "000009", "started": true}')
    bitback("prune", "--repo", repo, "--keep-last", "2")
    # 1 deleted (its index gone), 2 rewritten as a synthetic full (its old
    # index gone, the new one named by its manifest), 3 as it was.
    names = indexes(node)
    assert fake.name in names
    want = set()
    for seq in (2, 3):
        m = json.loads((node / f"{seq:06d}.json").read_text())
        want.add(f"{seq:06d}-{m['merkle-root'][:16]}.idx")
    assert set(names) == want | {fake.name}, names
    assert "all good" in bitback("verify", "--repo", repo).stdout
    # Once the run is gone (no marker), its index goes too.
    (node / "000009.attempt").unlink()
    bitback("prune", "--repo", repo, "--keep-last", "2")
    assert set(indexes(node)) == want
