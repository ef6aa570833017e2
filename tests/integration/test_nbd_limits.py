"""Idle and slow clients must not lock bitbackd up (issue 17, defect 2).

As QEMU does since CVE-2024-7409: an NBD connection that has not finished
the handshake within handshake-max-seconds (default 10) is closed, whether
it sends nothing or trickles bytes, and frees its max-connections slot
(default 100; a connection over the limit is closed at once).  The QMP
monitor closes a client that has not sent qmp_capabilities within 10 s, so
idle sockets cannot hold its 64 slots.  `quit` returns in bounded time even
while a client reads a 32 MiB reply very slowly, and writes acknowledged
before are in the image.

Bounds are generous (they only separate "closed" from "never closed");
no timing is asserted.
"""
import random
import select
import socket
import threading
import time

import nbd

from bitback_testlib import Daemon
from test_nbd_badclients import CMD_READ, Conn

MiB = 1024 * 1024
SIZE = 40 * MiB
BOUND = 30               # seconds: far above every limit under test


def start(tmp_path, d, server_opts=""):
    """bitbackd exporting a raw image as "d0", with --nbd-server options."""
    with open(tmp_path / "d.raw", "wb") as f:
        f.truncate(SIZE)
    d.start("--blockdev",
            "driver=raw,node-name=d0,file.driver=file,file.filename=d.raw",
            "--nbd-server",
            f"addr.type=unix,addr.path={d.nbd_sock}{server_opts}",
            "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable=on")


def idle(d):
    """A connection that got the greeting (so the server counts it) and
    then says nothing."""
    c = Conn(d.nbd_sock)
    c.recv(18)
    return c


def closed_within(c, seconds, trickle=False):
    """True if the server closes c within `seconds`.  With trickle, send
    one byte of a never-ending option every second meanwhile."""
    deadline = time.monotonic() + seconds
    if trickle:
        c.send(b"\0\0\0\3")                       # client flags
        c.send(b"IHAVEOPT" + bytes([0, 0, 0, 3, 0, 0, 0x10, 0]))  # LIST, 4 KiB
    while time.monotonic() < deadline:
        try:
            if trickle:
                c.s.send(b"x")
            r, _, _ = select.select([c.s], [], [], 1.0)
            if r and not c.s.recv(65536):
                return True
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def nbd_client_works(d):
    """A real client connects, writes and reads back."""
    h = nbd.NBD()
    h.connect_uri(d.nbd_uri("d0"))
    h.pwrite(b"ok" * 2048, 0)
    ok = h.pread(4096, 0) == b"ok" * 2048
    h.shutdown()
    return ok


def test_handshake_timeout_idle_and_trickling(tmp_path):
    with Daemon(tmp_path) as d:
        start(tmp_path, d, ",handshake-max-seconds=2")
        for trickle in (False, True):
            c = idle(d)
            try:
                assert closed_within(c, BOUND, trickle=trickle)
            finally:
                c.close()
        assert nbd_client_works(d)
        assert d.quit() == 0


def test_idle_sockets_free_their_slots(tmp_path):
    """max-connections=4 filled by idle sockets: a real client gets in once
    they time out; one over the limit is closed at once, not queued."""
    with Daemon(tmp_path) as d:
        start(tmp_path, d, ",max-connections=4,handshake-max-seconds=3")
        conns = [idle(d) for _ in range(4)]
        try:
            over = Conn(d.nbd_sock)
            assert over.s.recv(18) == b""      # closed before the greeting
            over.close()
            deadline = time.monotonic() + BOUND
            ok = False
            while not ok and time.monotonic() < deadline:
                try:
                    ok = nbd_client_works(d)
                except nbd.Error:
                    time.sleep(0.5)
            assert ok, "a real client was locked out by idle sockets"
        finally:
            for c in conns:
                c.close()
        assert d.quit() == 0


def test_default_limits(tmp_path):
    """QEMU's defaults: 100 connections, 10 s handshake."""
    with Daemon(tmp_path) as d:
        start(tmp_path, d)
        conns = [idle(d) for _ in range(100)]
        try:
            over = Conn(d.nbd_sock)
            assert over.s.recv(18) == b"", "no default max-connections"
            over.close()
            assert closed_within(conns[0], BOUND), "no default handshake limit"
        finally:
            for c in conns:
                c.close()
        # The server notices the 100 closes asynchronously: until each
        # client thread has ended, its slot is still taken.  Retry within a
        # bound rather than race it.
        deadline = time.monotonic() + BOUND
        while True:
            try:
                assert nbd_client_works(d)
                break
            except nbd.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert d.quit() == 0


def test_qmp_idle_clients_do_not_lock_out(tmp_path):
    with Daemon(tmp_path) as d:
        d.start()
        idle_socks = []
        try:
            for _ in range(64):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(d.qmp_sock))
                idle_socks.append(s)
            deadline = time.monotonic() + BOUND
            q = None
            while q is None and time.monotonic() < deadline:
                try:
                    q = d.connect_qmp()
                except (ConnectionError, OSError, ValueError):
                    time.sleep(0.5)
            assert q is not None, "QMP locked out by idle sockets"
            q.cmd("query-version")
            q.close()
        finally:
            for s in idle_socks:
                s.close()
        assert d.quit() == 0


def test_quit_with_slow_reader(tmp_path):
    """quit while a client drains a 32 MiB read 4 KiB at a time."""
    guard = random.Random(17).randbytes(1 * MiB)
    with Daemon(tmp_path) as d:
        start(tmp_path, d)
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("d0"))
        h.pwrite(guard, 8 * MiB, nbd.CMD_FLAG_FUA)    # acknowledged
        h.shutdown()

        c = Conn(d.nbd_sock)
        c.greeting()
        c.go("d0")
        c.request(CMD_READ, 0, 32 * MiB)
        assert c.simple_reply() == (0, 1)
        stop = threading.Event()

        def drain():
            try:
                while not stop.is_set():
                    if not c.s.recv(4096):
                        return
                    stop.wait(0.5)
            except OSError:
                return

        t = threading.Thread(target=drain)
        t.start()
        try:
            d.qmp.cmd("quit")
            assert d.wait(BOUND) == 0
        finally:
            stop.set()
            c.s.shutdown(socket.SHUT_RDWR)
            t.join(10)
            c.close()
        with open(tmp_path / "d.raw", "rb") as f:
            f.seek(8 * MiB)
            assert f.read(len(guard)) == guard

