"""bitbackd's NBD server against real clients.

Every test starts bitbackd on images in tmp_path and checks what the
clients see with nbdinfo, qemu-io, qemu-img, nbdcopy and python3-libnbd:
the negotiated features, data written and read back byte for byte, holes
in structured reads, block status (base:allocation and
qemu:dirty-bitmap:NAME), read-only exports, TCP, and parallel clients with
the dirty bitmap holding exactly the union of their writes.
"""
import json
import os
import random
import threading

import pytest

import nbd

from bitback_testlib import Daemon
from bitback_testlib.nbdio import connect, free_port
from conftest import BITBACK, dirty_extents, require, run

MiB = 1024 * 1024
GRAN = 64 * 1024


def raw_image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def start(d, *extra, image="d.raw", writable=True, bitmaps=(), nbd_args=None,
          ro_export=False, fmt="raw"):
    """Start bitbackd serving node d0 (export d0) from image; bitmaps are
    added over QMP and exported.  ro_export adds export 'ro' of the same
    node, read-only."""
    args = ["--blockdev",
            f"driver={fmt},node-name=d0,file.driver=file,file.filename={image}"]
    if nbd_args:
        args += ["--nbd-server", nbd_args]
    d.start(*args, *extra, nbd=nbd_args is None)
    for b in bitmaps:
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name=b)
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
              name="d0", writable=writable, bitmaps=list(bitmaps),
              description="test disk")
    if ro_export:
        d.qmp.cmd("block-export-add", type="nbd", id="e1",
                  **{"node-name": "d0"}, name="ro", writable=False)
    return d



def clusters_to_extents(clusters, gran=GRAN):
    out = []
    for c in sorted(set(clusters)):
        if out and out[-1][0] + out[-1][1] == c * gran:
            out[-1] = (out[-1][0], out[-1][1] + gran)
        else:
            out.append((c * gran, gran))
    return out


def touched(offset, length, gran=GRAN):
    return range(offset // gran, (offset + length - 1) // gran + 1)


@pytest.fixture
def daemon(tmp_path):
    for tool in ("nbdinfo", "qemu-io", "qemu-img", "nbdcopy"):
        require(tool)
    with Daemon(tmp_path) as d:
        yield d


def test_nbdinfo_features_and_list(daemon, tmp_path):
    raw_image(tmp_path / "d.raw", 64 * MiB)
    start(daemon, bitmaps=["b0", "b1"], ro_export=True)
    uri = daemon.nbd_uri("d0")
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    exp = info["exports"][0]
    assert exp["export-name"] == "d0"
    assert exp["export-size"] == 64 * MiB
    assert exp["description"] == "test disk"
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero",
                 "can_fast_zero", "can_df", "can_multi_conn"):
        assert exp[flag] is True, flag
    assert exp["is_read_only"] is False
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 * MiB
    assert sorted(exp["contexts"]) == ["base:allocation",
                                       "qemu:dirty-bitmap:b0",
                                       "qemu:dirty-bitmap:b1"]

    ro = json.loads(run(["nbdinfo", "--json", daemon.nbd_uri("ro")]).stdout)
    assert ro["exports"][0]["is_read_only"] is True
    assert ro["exports"][0]["can_trim"] is False

    listing = json.loads(run(["nbdinfo", "--json", "--list",
                              daemon.nbd_uri("")]).stdout)
    names = sorted(e["export-name"] for e in listing["exports"])
    assert names == ["d0", "ro"]

    # Export removal: refused while in use only in safe mode; gone after.
    daemon.qmp.del_export("e1")
    p = run(["nbdinfo", "--json", daemon.nbd_uri("ro")], check=False)
    assert p.returncode != 0
    exports = daemon.qmp.cmd("query-block-exports")
    assert [e["id"] for e in exports] == ["e0"]


def test_meta_context_queries(daemon, tmp_path):
    raw_image(tmp_path / "d.raw", 16 * MiB)
    start(daemon, bitmaps=["b0", "b1"])
    uri = daemon.nbd_uri("d0")

    def listed(queries):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(uri)
        for q in queries:
            h.add_meta_context(q)
        got = []
        h.opt_list_meta_context(lambda name: got.append(name))
        h.opt_abort()
        return sorted(got)

    assert listed([]) == ["base:allocation", "qemu:dirty-bitmap:b0",
                          "qemu:dirty-bitmap:b1"]
    assert listed(["qemu:"]) == ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    assert listed(["qemu:dirty-bitmap:"]) == ["qemu:dirty-bitmap:b0",
                                              "qemu:dirty-bitmap:b1"]
    assert listed(["base:"]) == ["base:allocation"]
    assert listed(["qemu:dirty-bitmap:b1"]) == ["qemu:dirty-bitmap:b1"]
    assert listed(["qemu:dirty-bitmap:nope", "x-foo:bar"]) == []

    # SET picks exactly the asked contexts.
    h = connect(uri, ["qemu:dirty-bitmap:b1", "nosuch:thing"])
    assert h.can_meta_context("qemu:dirty-bitmap:b1")
    assert not h.can_meta_context("base:allocation")
    assert not h.can_meta_context("qemu:dirty-bitmap:b0")
    h.shutdown()


def test_qemu_io_writes_show_in_dirty_map(daemon, tmp_path):
    raw_image(tmp_path / "d.raw", 64 * MiB)
    start(daemon, bitmaps=["b0"])
    uri = daemon.nbd_uri("d0")
    writes = [(0, 4096), (MiB + 4096, 64 * 1024), (10 * MiB + 7, 1),
              (32 * MiB - 512, 1024), (64 * MiB - 4096, 4096)]
    cmds = []
    for i, (off, length) in enumerate(writes):
        cmds += ["-c", f"write -P {0x10 + i} {off} {length}"]
    run(["qemu-io", "-f", "raw", *cmds, uri])
    for i, (off, length) in enumerate(writes):
        run(["qemu-io", "-f", "raw", "-c",
             f"read -P {0x10 + i} {off} {length}", uri])

    want = clusters_to_extents(c for off, n in writes for c in touched(off, n))
    assert dirty_extents(uri) == want
    count = daemon.qmp.bitmap("d0", "b0")["count"]
    assert count == sum(n for _, n in want)
    assert daemon.qmp.bitmap("d0", "b0")["busy"] is True

    # base:allocation now shows the written data.
    p = run(["nbdinfo", "--json", "--map", uri])
    data = [e for e in json.loads(p.stdout) if not e["type"] & 1]
    assert any(e["offset"] <= MiB + 4096 < e["offset"] + e["length"]
               for e in data)

    # The image file holds what qemu-io wrote (the server wrote it through).
    with open(tmp_path / "d.raw", "rb") as f:
        f.seek(MiB + 4096)
        assert f.read(64 * 1024) == bytes([0x11]) * 64 * 1024


def test_nbdcopy_256m_roundtrip(daemon, tmp_path):
    size = 256 * MiB
    raw_image(tmp_path / "d.raw", size)
    start(daemon)
    uri = daemon.nbd_uri("d0")
    src = tmp_path / "src.bin"
    rnd = random.Random(1234)
    with open(src, "wb") as f:
        for i in range(size // MiB):
            if i % 16 == 5:
                f.write(bytes(MiB))         # some zero areas too
            else:
                f.write(rnd.randbytes(MiB))
    run(["nbdcopy", str(src), uri])
    out = tmp_path / "out.bin"
    run(["nbdcopy", uri, str(out)])
    with open(src, "rb") as a, open(out, "rb") as b:
        while True:
            x, y = a.read(4 * MiB), b.read(4 * MiB)
            assert x == y
            if not x:
                break
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri])
    conv = tmp_path / "conv.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(conv)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(conv)])
    # Corrupting one byte must make compare fail (the check can fail).
    with open(tmp_path / "d.raw", "r+b") as f:
        f.seek(100 * MiB + 3)
        old = f.read(1)
        f.seek(100 * MiB + 3)
        f.write(bytes([old[0] ^ 0xff]))
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri],
            check=False)
    assert p.returncode == 1


def test_libnbd_structured_reads_and_commands(daemon, tmp_path):
    raw_image(tmp_path / "d.raw", 16 * MiB)
    start(daemon)
    uri = daemon.nbd_uri("d0")
    h = connect(uri, ["base:allocation"])
    assert h.get_structured_replies_negotiated()
    data = bytes(random.Random(5).randbytes(128 * 1024))
    h.pwrite(data, 4 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()

    # A read spanning hole, data, hole: OFFSET_HOLE chunks for the holes.
    chunks = []

    def chunk(buf, offset, status, err):
        chunks.append((offset, len(buf), status, bytes(buf)))
        return 0

    start_off, length = 4 * MiB - 256 * 1024, 1 * MiB
    buf = h.pread_structured(length, start_off, chunk)
    assert buf[256 * 1024:256 * 1024 + len(data)] == data
    assert buf[:256 * 1024] == bytes(256 * 1024)
    holes = [c for c in chunks if c[2] == nbd.READ_HOLE]
    datas = [c for c in chunks if c[2] == nbd.READ_DATA]
    assert holes and datas
    assert sum(c[1] for c in chunks) == length
    assert all(c[3] == bytes(c[1]) for c in holes)
    assert any(c[0] <= 4 * MiB < c[0] + c[1] for c in datas)

    # DF: exactly one data chunk.
    chunks.clear()
    buf = h.pread_structured(length, start_off, chunk, nbd.CMD_FLAG_DF)
    assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA
    assert buf[256 * 1024:256 * 1024 + len(data)] == data

    # Block status: full map and REQ_ONE.
    seen = []

    def extents(ctx, offset, entries, err):
        seen.append((ctx, offset, list(entries)))
        return 0

    h.block_status(8 * MiB, 0, extents)
    ctx, off, ent = seen[-1]
    assert ctx == "base:allocation"
    pairs = list(zip(ent[::2], ent[1::2]))
    pos = 0
    for n, flags in pairs:
        if pos <= 4 * MiB < pos + n:
            assert flags & 1 == 0          # data: not a hole
        if pos + n <= 4 * MiB - 64 * 1024:
            assert flags == 3              # hole, zero
        pos += n
    assert pos <= 8 * MiB
    h.block_status(8 * MiB, 0, extents, nbd.CMD_FLAG_REQ_ONE)
    assert len(seen[-1][2]) == 2
    assert seen[-1][2][1] == 3
    h.block_status(MiB, 4 * MiB, extents, nbd.CMD_FLAG_REQ_ONE)
    assert len(seen[-1][2]) == 2 and seen[-1][2][1] & 1 == 0
    assert seen[-1][2][0] >= len(data)

    # Zero with FAST_ZERO: either done fast, or refused with ENOTSUP.
    try:
        h.zero(64 * 1024, 4 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(64 * 1024, 4 * MiB) == bytes(64 * 1024)
    except nbd.Error as e:
        assert e.errno == "ENOTSUP", e
    # Zero with NO_HOLE always works.
    h.zero(4096, 4 * MiB + 64 * 1024, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 4 * MiB + 64 * 1024) == bytes(4096)
    assert h.pread(4096, 4 * MiB + 68 * 1024) == data[68 * 1024:72 * 1024]
    # Trim: the range reads back as zeroes on a raw file (punched hole).
    h.trim(64 * 1024, 4 * MiB + 64 * 1024, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(4096, 4 * MiB + 128 * 1024 - 4096) == bytes(4096)
    h.shutdown()

    # Without structured replies: simple replies carry the data.
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(uri)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    h.pwrite(data, 6 * MiB)
    assert h.pread(len(data) + 8192, 6 * MiB - 4096) == \
        bytes(4096) + data + bytes(4096)
    with pytest.raises(nbd.Error) as ei:
        h.block_status(4096, 0, extents)    # no context: refused
    h.shutdown()


def test_read_only_export_refuses_writes(daemon, tmp_path):
    raw_image(tmp_path / "d.raw", 8 * MiB)
    start(daemon, ro_export=True)
    h = nbd.NBD()
    h.set_strict_mode(0)            # let the server, not libnbd, refuse
    h.connect_uri(daemon.nbd_uri("ro"))
    assert h.is_read_only()
    for op in (lambda: h.pwrite(b"x" * 512, 0),
               lambda: h.zero(512, 0),
               lambda: h.trim(512, 0)):
        with pytest.raises(nbd.Error) as ei:
            op()
        assert ei.value.errno == "EPERM"
    assert h.pread(512, 0) == bytes(512)
    # Out of range read: EINVAL from the server; the connection goes on.
    with pytest.raises(nbd.Error) as ei:
        h.pread(4096, 8 * MiB - 512)
    assert ei.value.errno == "EINVAL"
    h.flush()
    h.shutdown()
    with open(tmp_path / "d.raw", "rb") as f:
        assert f.read(512) == bytes(512)


def test_tcp(daemon, tmp_path):
    raw_image(tmp_path / "d.raw", 8 * MiB)
    port = free_port()
    start(daemon, nbd_args=f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}")
    uri = f"nbd://127.0.0.1:{port}/d0"
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 12k 100k", uri])
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x42 12k 100k", uri])
    p = run(["qemu-io", "-f", "raw", "-c", "read -P 0x43 12k 100k", uri],
            check=False)
    assert "Pattern verification failed" in p.stdout + p.stderr
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["exports"][0]["export-size"] == 8 * MiB


def test_parallel_clients_and_bitmap_union(daemon, tmp_path):
    """4 clients, each with many writes in flight, on disjoint regions of a
    qbm image whose persistent bitmap b0 was added offline."""
    size = 64 * MiB
    raw_image(tmp_path / "d.raw", size)
    run([BITBACK, "img", "create", "-f", "qbm", "-o", "data-file=d.raw",
         str(tmp_path / "d.qbm")])
    run([BITBACK, "bitmap", "--add", str(tmp_path / "d.qbm"), "b0"])
    daemon.start("--blockdev",
                 "driver=qbm,node-name=d0,file.driver=file,file.filename=d.qbm",
                 "--export", "type=nbd,id=e0,node-name=d0,name=d0,"
                 "writable=on,bitmaps.0=b0", nbd=True)
    uri = daemon.nbd_uri("d0")
    assert daemon.qmp.bitmap("d0", "b0")["count"] == 0

    nclients = 4
    region = size // nclients
    rnd = random.Random(99)
    plans = []           # per client: [(offset, data)], not overlapping
    nops = 24
    slot = region // nops
    for i in range(nclients):
        ops = []
        for j in range(nops):
            length = rnd.choice([512, 4096, 65536, 200192, 512 * 1024])
            off = i * region + j * slot + rnd.randrange(0, slot - length)
            off -= off % 512
            ops.append((off, rnd.randbytes(length)))
        plans.append(ops)
    errors = []

    def client(ops):
        try:
            h = connect(uri)
            cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off)
                       for off, d in ops]
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for c in cookies:
                assert h.aio_command_completed(c)
            h.shutdown()
        except Exception as e:          # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    h = connect(uri)
    for ops in plans:
        for off, d in ops:
            assert h.pread(len(d), off) == d
    h.shutdown()

    want = clusters_to_extents(c for ops in plans for off, d in ops
                               for c in touched(off, len(d)))
    assert dirty_extents(uri) == want
    assert daemon.qmp.bitmap("d0", "b0")["count"] == sum(n for _, n in want)
    assert daemon.quit() == 0
    # The persistent bitmap was stored on quit with the same dirty map.
    p = run([BITBACK, "img", "map", "--output=json", "--bitmap", "b0",
             str(tmp_path / "d.qbm")])
    stored = [(e["start"], e["length"])
              for e in json.loads(p.stdout) if e["dirty"]]
    assert clusters_to_extents(
        c for off, n in stored for c in touched(off, n)) == want


def evict(path):
    """Drop the file's pages from the page cache (after writing them back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["raw", "qbm-backing"])
def test_reads_cold_and_cached(daemon, tmp_path, fmt):
    """Small reads are answered by the receiving thread when their data is
    in the page cache, and handed to a worker when it is not (or when the
    node cannot promise a read that does not wait, such as a qbm overlay
    reading its backing file).  Many reads in flight, cold then warm, of
    sizes on both sides of the inline limit, must return the image's bytes."""
    size = 32 * MiB
    rnd = random.Random(7)
    model = bytearray(rnd.randbytes(size))
    (tmp_path / "base.raw").write_bytes(model)
    if fmt == "raw":
        image, drv = "base.raw", "raw"
    else:
        raw_image(tmp_path / "top.raw", size)
        run([BITBACK, "img", "create", "-f", "qbm", "-o", "data-file=top.raw",
             "-b", "base.raw", "-F", "raw", str(tmp_path / "top.qbm")])
        image, drv = "top.qbm", "qbm"
    start(daemon, image=image, fmt=drv)
    h = connect(daemon.nbd_uri("d0"))
    if fmt != "raw":
        # Half of the overlay's clusters get data of their own.
        for c in range(0, size // GRAN, 2):
            data = rnd.randbytes(GRAN)
            h.pwrite(data, c * GRAN)
            model[c * GRAN:(c + 1) * GRAN] = data
        h.flush()
    for rnd_pass in ("cold", "warm"):
        if rnd_pass == "cold":
            for f in ("base.raw", "top.raw"):
                if (tmp_path / f).exists():
                    evict(tmp_path / f)
        reads = []
        for _ in range(600):
            n = rnd.choice([512, 4096, 16384, 32768, 32769, 65536, 200000])
            off = rnd.randrange(0, size - n)
            buf = nbd.Buffer(n)
            reads.append((off, n, buf, h.aio_pread(buf, off)))
            while h.aio_in_flight() >= 64:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for off, n, buf, cookie in reads:
            assert h.aio_command_completed(cookie)
            assert buf.to_bytearray() == model[off:off + n], (rnd_pass, off, n)
    h.shutdown()
