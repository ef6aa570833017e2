"""NBD block status on a fragmented dirty bitmap (issue 17, defect 3).

A 4 GiB qbm image over a sparse raw file carries bitmap b0 with a 512-byte
granularity in which every fourth cluster is dirty: four million extents
over the export.  One NBD_CMD_BLOCK_STATUS over (almost) the whole export
with the qemu:dirty-bitmap:b0 context must

  - answer at most the per-reply limit of extents (16384; one with
    NBD_CMD_FLAG_REQ_ONE), consecutive from the request's offset and equal
    to the model's first extents;
  - cost the server memory in proportion to that limit, not to the range:
    bitbackd's peak RSS (VmHWM) grows by less than MEM_BOUND over its value
    before the request.  The old code gathered every extent of the range
    first (4M extents, ~96 MiB here) and fails this.

The bitmap is written directly into its file (docs/specs/qbm.md, section
2), with the checksum from the system's libxxhash: millions of small writes
through the daemon would take minutes.  Memory is asserted, timings not.
"""
import json
import struct

import pytest

import nbd

from bitback_testlib import Daemon
from bitback_testlib.nbdio import connect
from conftest import bitback, xxh3_64

MiB = 1024 * 1024
GiB = 1024 * MiB
SIZE = 4 * GiB
GRAN = 512
HEADER = 4096
CLEAN = 1
PATTERN = 0x11           # clusters 0 and 4 of every byte: 1 dirty, 3 clean
MAX_EXTENTS = 16384      # NBD_MAX_EXTENTS in src/nbd/extents.c
MEM_BOUND = 48 * MiB     # the new code needs < 1 MiB, the old one ~96 MiB


def fragment_bitmap(img, name):
    """Fill bitmap NAME of the qbm image img with PATTERN, as a clean file
    with a valid checksum."""
    with open(img) as f:
        d = json.load(f)
    entry = next(b for b in d["QBM"]["bitmaps"] if b["name"] == name)
    path = str(img.parent / entry["file"])
    with open(path, "r+b") as f:
        h = bytearray(f.read(HEADER))
        flags, shift = struct.unpack_from("<II", h, 16)
        data_size = struct.unpack_from("<Q", h, 32)[0]
        assert flags & CLEAN and 1 << shift == GRAN
        assert data_size == SIZE // GRAN // 8
        bits = bytes([PATTERN]) * data_size
        struct.pack_into("<Q", h, 40, xxh3_64(bits))
        f.seek(0)
        f.write(bytes(h))
        f.write(bits)


def model(offset, length):
    """The model's extents of [offset, offset+length) as (length, flags),
    for offsets aligned to 4 clusters: dirty 512, clean 1536, ..."""
    assert offset % (4 * GRAN) == 0
    out, pos, end = [], offset, offset + length
    while pos < end:
        out.append((min(GRAN, end - pos), 1))
        pos += GRAN
        if pos < end:
            out.append((min(3 * GRAN, end - pos), 0))
            pos += 3 * GRAN
    return out


def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def served(tmp_path):
    img = tmp_path / "disk.qbm"
    bitback("img", "create", "-f", "qbm", str(img), str(SIZE))
    bitback("bitmap", "--add", "-g", str(GRAN), str(img), "b0")
    fragment_bitmap(img, "b0")
    with Daemon(tmp_path) as d:
        d.start("--blockdev", "driver=qbm,node-name=d0,file.driver=file,"
                f"file.filename={img}", nbd=True)
        bm = d.qmp.bitmap("d0", "b0")
        assert not bm.get("inconsistent"), bm
        assert bm["count"] == SIZE // 4, bm
        d.qmp.cmd("block-export-add", type="nbd", id="e0",
                  **{"node-name": "d0"}, name="d0", writable=True,
                  bitmaps=["b0"])
        yield d


def test_dirty_bitmap_status_bounded(served):
    d = served
    h = connect(d.nbd_uri("d0"), ["qemu:dirty-bitmap:b0"])
    try:
        assert h.get_size() == SIZE
        seen = []

        def extents(ctx, offset, entries, err):
            seen.append((ctx, offset, list(entries)))
            return 0

        # A small request first, so that the baseline includes a worker
        # thread and a reply of this context.
        h.block_status(64 * 1024, 0, extents)
        assert [tuple(p) for p in zip(seen[-1][2][::2], seen[-1][2][1::2])] \
            == model(0, 64 * 1024)
        base = vm_hwm(d.pid)

        length = SIZE - GRAN               # the most one request can ask
        for offset in (0, 8 * GRAN):
            h.block_status(length - offset, offset, extents)
            ctx, off, ent = seen[-1]
            assert ctx == "qemu:dirty-bitmap:b0" and off == offset
            pairs = list(zip(ent[::2], ent[1::2]))
            assert 0 < len(pairs) <= MAX_EXTENTS
            assert all(n > 0 for n, _ in pairs)
            assert pairs == model(offset, length - offset)[:len(pairs)]

        # REQ_ONE: exactly one extent, the first.
        h.block_status(length - 4 * GRAN, 4 * GRAN, extents, nbd.CMD_FLAG_REQ_ONE)
        assert seen[-1][2] == [GRAN, 1]
        h.block_status(length - 5 * GRAN, 5 * GRAN, extents,
                       nbd.CMD_FLAG_REQ_ONE)
        assert seen[-1][2] == [3 * GRAN, 0]

        grown = vm_hwm(d.pid) - base
        assert grown < MEM_BOUND, \
            f"bitbackd's peak RSS grew by {grown / MiB:.1f} MiB for one " \
            f"block status request (bound {MEM_BOUND // MiB} MiB)"
    finally:
        h.shutdown()
