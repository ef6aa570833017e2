"""An oversized manifest is refused before it is read (issue 17, defect 7).

A repository's manifest is a file anyone with access to the backup server
can replace.  A 179 MB manifest (a hash entry per cluster of a 250 GiB
backup) used to make `bitback list` parse all of it with json-c, about 8
times its size in memory (1.4 GB).  Manifests are now limited to 128 MiB
(docs/DESIGN.md, "Parser limits"; the writer refuses to commit a bigger one,
test-repo test_manifest_text_limit): list, verify and restore refuse the
file by its size, with an error naming it, in a few MiB of memory.
"""
import json
import os

from bitback_testlib.memory import peak_rss
from conftest import BITBACK, bitback

MiB = 1024 * 1024
RSS_BOUND = 64 * MiB          # the refusal needs ~10 MiB; parsing needs ~1.4 GB


def big_manifest(real, path, clusters):
    """A version-1 manifest like `real` (a full backup) whose backup stored
    `clusters` clusters: one hash entry each, as version 1 lists them."""
    m = json.loads(real.read_text())
    # A version-1 manifest (hashes inline), the one kind that can be big.
    for k in ("hash-size", "index-records"):
        del m[k]
    m["version"] = 1
    cs = m["cluster-size"] = 65536
    m["image-size"] = m["changed-bytes"] = clusters * cs
    m["extents"] = [[0, clusters * cs]]
    h = "0" * 32
    with open(path, "w") as f:
        head = json.dumps({k: v for k, v in m.items() if k != "hashes"})
        f.write(head[:-1] + ', "hashes": [')
        for start in range(0, clusters, 65536):
            f.write(", ".join(f'[ {i}, "{h}" ]'
                              for i in range(start, min(clusters, start + 65536))))
            if start + 65536 < clusters:
                f.write(", ")
        f.write("] }\n")


def test_oversized_manifest_refused_before_reading(tmp_path):
    img = tmp_path / "d.qbm"
    bitback("img", "create", "-f", "qbm", img, "4M")
    bitback("io", "-c", "write -P 0x5a 0 4M", img)
    repo = tmp_path / "repo"
    bitback("backup", "--image", img, "--repo", repo, "--level", "full")
    manifest = repo / "d" / "000001.json"
    big_manifest(manifest, tmp_path / "big.json", 4 * 1024 * 1024)
    size = (tmp_path / "big.json").stat().st_size
    assert 170 * MiB < size < 200 * MiB, size
    os.replace(tmp_path / "big.json", manifest)

    for args in (("list", "--repo", repo),
                 ("verify", "--repo", repo),
                 ("restore", "--repo", repo, "--node", "d", "--at", "000001",
                  tmp_path / "out.raw")):
        rc, _, err, rss = peak_rss([BITBACK, *args])
        assert rc != 0, (args, err)
        assert "000001.json" in err and "too large" in err, (args, err)
        assert rss < RSS_BOUND, \
            f"bitback {args[0]} peaked at {rss / MiB:.0f} MiB on a " \
            f"{size / MiB:.0f} MiB manifest"
        assert not (tmp_path / "out.raw").exists()
