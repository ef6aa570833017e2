"""Asynchronous writes to RBD (invariant 9 in src/nbd/nbd-internal.h,
bdrv_client_aio_pwritev in block.h) against the real single-node Ceph of
the session fixture `ceph`.

A plain NBD write to an rbd node (directly, or through a raw node as
libvirt and `rbd:` names open it) is submitted by the worker that read it,
and librbd's completion thread replies.  So a client with many writes in
flight needs no thread per write: the daemon's thread count stays where it
was, where the thread-per-request path starts a worker per request in
flight.  That completion thread serves every request of the image, so it
must never wait for a client: a client that sends writes and stops reading
the replies must not hold up another client's writes, and once it reads
again it gets every reply, whole and once.
"""
import json
import os
import select
import struct
import time
import uuid

import nbd

from bitback_testlib import Daemon
from bitback_testlib.nbdio import nbd_handshake
from conftest import dirty_extents

MiB = 1024 * 1024
K4 = 4096
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_WRITE = 1


def new_image(ceph, size_mib=64):
    image = f"async-{uuid.uuid4().hex[:10]}"
    ceph.tool("rbd", "create", "--size", f"{size_mib}M", f"rbd/{image}")
    return image


def serve(d, ceph, image):
    """bitbackd with a raw node d0 over the RBD image (the raw node opens
    its rbd child, so it owns the image's bitmaps), not yet exported."""
    d.start("--blockdev", json.dumps({
        "driver": "raw", "node-name": "d0",
        "file": {"driver": "rbd", "pool": "rbd", "image": image,
                 "conf": ceph.conf}}), nbd=True)
    return d


def export(d, **extra):
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
              name="d0", writable=True, **extra)
    return d.nbd_uri("d0")


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def test_writes_in_flight_need_no_thread_each(ceph, tmp_path):
    """32 writes in flight at once, 8 rounds, with a persistent bitmap
    (the write intent in RADOS): no NBD worker thread is started for them,
    every byte lands, and the bitmap marks exactly what was written."""
    image = new_image(ceph)
    with Daemon(tmp_path / "d") as d:
        serve(d, ceph, image)
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0",
                  granularity=65536, persistent=True)
        uri = export(d, bitmaps=["b0"])
        h = nbd.NBD()
        h.connect_uri(uri)
        # One write per 64 MiB write-intent region first (a region not yet
        # durable goes the waiting way), then the count to compare with.
        h.pwrite(b"\1" * K4, 0)
        before = threads(d.pid)
        model = {0: b"\1" * K4}
        most = before
        deadline = time.monotonic() + 60
        for rnd in range(8):
            writes = [((rnd * 32 + i) * 65536, os.urandom(K4))
                      for i in range(32)]
            pending = {h.aio_pwrite(data, off) for off, data in writes}
            while pending:
                assert time.monotonic() < deadline, "writes not answered"
                most = max(most, threads(d.pid))
                h.poll(10)
                # A completed cookie is retired on the first True.
                pending = {c for c in pending
                           if not h.aio_command_completed(c)}
            model.update(writes)
        # The thread-per-request path starts up to 7 more workers here.
        assert most <= before + 1, (before, most)
        for off, data in model.items():
            assert h.pread(len(data), off) == data, off
        h.shutdown()
        assert dirty_extents(uri) == [(0, 8 * 32 * 65536)]
        assert d.quit() == 0


def test_client_not_reading_replies_stalls_only_itself(ceph, tmp_path):
    """A raw client sends 24000 small writes and reads no reply: its replies
    fill the socket (8 MiB of send buffer holds about 10000 of them) and are
    deferred.  Meanwhile a libnbd client's writes to the
    same image are all answered promptly (librbd's completion thread did
    not wait on the full socket).  Then the first client reads: 24000
    replies, each whole, each handle once, all successful; and the data of
    both is in the image."""
    image = new_image(ceph)
    n = 24000
    ln = 512
    with Daemon(tmp_path / "d") as d:
        serve(d, ceph, image)
        uri = export(d)
        s = nbd_handshake(d.nbd_sock, "d0")
        s.settimeout(30)
        payload = {}
        for i in range(n):
            off = i * ln
            data = struct.pack(">I", i) * (ln // 4)
            payload[off] = data
            s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0,
                                  NBD_CMD_WRITE, i, off, ln) + data)
        time.sleep(0.5)           # the replies pile up in the socket

        h = nbd.NBD()
        h.connect_uri(uri)
        t0 = time.monotonic()
        other = {}
        for i in range(100):
            off = 32 * MiB + i * K4
            other[off] = os.urandom(K4)
            h.pwrite(other[off], off)
        # Without the deferral this waits for the send timeout (60 s).
        assert time.monotonic() - t0 < 20, time.monotonic() - t0

        buf = b""
        seen = set()
        deadline = time.monotonic() + 60
        while len(seen) < n:
            assert time.monotonic() < deadline, f"{len(seen)} replies of {n}"
            r, _, _ = select.select([s], [], [], 1)
            if r:
                chunk = s.recv(1 << 20)
                assert chunk, "server closed the connection"
                buf += chunk
            while len(buf) >= 16:
                magic, err, handle = struct.unpack(">IIQ", buf[:16])
                assert magic == NBD_SIMPLE_REPLY_MAGIC, (len(seen), buf[:16])
                assert err == 0, (handle, err)
                assert handle not in seen and handle < n, handle
                seen.add(handle)
                buf = buf[16:]
        assert buf == b""
        s.close()
        for off, data in list(payload.items())[::97] + list(other.items()):
            assert h.pread(len(data), off) == data, off
        h.shutdown()
        assert d.quit() == 0
