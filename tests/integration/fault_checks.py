"""Checks shared by the fault tests (test_fault_injection, test_enospc):
after an I/O error, every acknowledged write is marked in a persistent
bitmap unless the bitmap is marked inconsistent, and a backup restores
the image bit for bit."""
import json

from conftest import bitback, run

GRAN = 64 * 1024     # the bitmaps' granularity (bitback's default)


def data_file(img):
    """What qemu-img compares a restore with: the raw data or the qcow2."""
    return (img.with_suffix(".raw"), "raw") if img.suffix == ".qbm" \
        else (img, "qcow2")


def bitmap_info(img, name="b0"):
    """The bitmap's entry in `bitback img info`, read offline."""
    info = json.loads(bitback("img", "info", "--output=json", "-U", img).stdout)
    for b in info["format-specific"]["data"].get("bitmaps", []):
        if b["name"] == name:
            return b
    raise AssertionError(f"bitmap {name} is gone from {img}: {info}")


def assert_covers_or_untrusted(img, acked):
    """Every acknowledged write lies in b0's dirty extents, unless b0 is
    marked inconsistent (then nothing trusts it)."""
    if bitmap_info(img)["inconsistent"]:
        return
    p = bitback("img", "map", "--output=json", "--bitmap", "b0", "-U", img)
    dirty = [(e["start"], e["start"] + e["length"])
             for e in json.loads(p.stdout) if e["dirty"]]
    for a in acked:
        first = a.offset // GRAN * GRAN
        for c in range(first, a.offset + a.length, GRAN):
            assert any(lo <= c < hi for lo, hi in dirty), \
                f"acknowledged write {a} not marked in b0 (dirty: {dirty})"


def backup_restores(img, repo, tmp_path, expect="inc"):
    """`bitback backup --image` then restore: the restore equals img bit
    for bit.  expect: the level the run must take ("inc"), or None."""
    p = bitback("backup", "--image", img, "--repo", repo)
    if expect:
        assert f"({expect}" in p.stdout + p.stderr, p.stdout + p.stderr
    out = tmp_path / "restored.raw"
    if out.exists():
        out.unlink()
    bitback("restore", "--repo", repo, "--at", "latest", out)
    ref, fmt = data_file(img)
    run(["qemu-img", "compare", "-U", "-f", "raw", "-F", fmt, out, ref])
    bitback("verify", "--repo", repo)
