"""Misbehaving NBD clients must not hurt bitbackd or its other clients.

Raw sockets speak broken NBD: garbage instead of a handshake, bad options,
oversized and out-of-range requests, bad request magic, a client that dies
in the middle of a write payload, and seeded random bytes after a good
handshake.  After each, the daemon must still be alive, a libnbd client
must still work, and data written (and acknowledged) earlier must be intact.
"""
import os
import random
import socket
import struct

import pytest

import nbd

from bitback_testlib import Daemon

MiB = 1024 * 1024
SIZE = 16 * MiB

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
EPERM, EINVAL, ENOSPC = 1, 22, 28

# Data every test writes first (acknowledged) and checks at the end.
GUARD_OFF = 3 * MiB
GUARD = random.Random(7).randbytes(256 * 1024)


class Conn:
    """A raw NBD connection."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(str(path))

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            d = self.s.recv(n - len(buf))
            if not d:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += d
        return buf

    def send(self, data):
        self.s.sendall(data)

    def closed_by_server(self):
        """True if the server closes the connection (EOF or reset)."""
        try:
            while True:
                d = self.s.recv(65536)
                if not d:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def greeting(self, cflags=3):
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT
        assert hflags & 1                    # fixed newstyle
        self.send(struct.pack(">I", cflags))

    def option(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REP_MAGIC
        return opt, rtype, self.recv(length)

    def go(self, name, structured=False):
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            assert self.reply()[1] == REP_ACK
        n = name.encode()
        self.option(OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
        while True:
            _, rtype, data = self.reply()
            if rtype == REP_ACK:
                return
            assert rtype == REP_INFO, hex(rtype)

    def request(self, cmd, offset, length, handle=1, flags=0, payload=b""):
        self.send(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, handle,
                              offset, length) + payload)

    def simple_reply(self):
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_MAGIC, hex(magic)
        return err, handle

    def close(self):
        self.s.close()


@pytest.fixture
def daemon(tmp_path):
    with open(tmp_path / "d.raw", "wb") as f:
        f.truncate(SIZE)
    with open(tmp_path / "f.raw", "wb") as f:
        f.truncate(SIZE)
    with Daemon(tmp_path) as d:
        d.start("--blockdev",
                "driver=raw,node-name=d0,file.driver=file,file.filename=d.raw",
                "--blockdev",
                "driver=raw,node-name=f0,file.driver=file,file.filename=f.raw",
                "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable=on",
                "--export", "type=nbd,id=e1,node-name=f0,name=f0,writable=on",
                nbd=True)
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("d0"))
        h.pwrite(GUARD, GUARD_OFF, nbd.CMD_FLAG_FUA)
        h.shutdown()
        yield d
        assert_healthy(d)


def assert_healthy(d):
    """The daemon lives, serves a new client, and the guard data is intact."""
    assert d.running(), d.stderr()
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(d.nbd_uri("d0"))
    assert h.pread(len(GUARD), GUARD_OFF) == GUARD
    h.pwrite(b"\x5a" * 4096, 8 * MiB)
    assert h.pread(4096, 8 * MiB) == b"\x5a" * 4096
    h.shutdown()
    d.qmp.cmd("query-block-exports")       # the monitor answers too


def test_garbage_handshake(daemon):
    rnd = random.Random(1)
    for cflags in (0xFFFFFFFF, 0x100):
        c = Conn(daemon.nbd_sock)
        c.greeting(cflags=cflags)           # unknown client flags
        assert c.closed_by_server()
        c.close()
    for i in range(20):
        c = Conn(daemon.nbd_sock)
        c.recv(18)
        c.send(rnd.randbytes(rnd.randrange(1, 4096)))
        c.close()
    # Silent client that just goes away.
    Conn(daemon.nbd_sock).close()
    assert_healthy(daemon)


def test_bad_options(daemon):
    c = Conn(daemon.nbd_sock)
    c.greeting()
    c.option(999, b"abc")
    assert c.reply()[1] == REP_ERR_UNSUP
    c.option(OPT_LIST, b"x")
    assert c.reply()[1] == REP_ERR_INVALID
    c.option(OPT_GO, b"\x00\x00")               # too short
    assert c.reply()[1] == REP_ERR_INVALID
    c.option(OPT_GO, struct.pack(">I", 1000) + b"d0" + b"\0\0")
    assert c.reply()[1] == REP_ERR_INVALID        # name length past the end
    c.option(OPT_INFO, struct.pack(">I", 4) + b"nope" + b"\0\0")
    assert c.reply()[1] == REP_ERR_UNKNOWN
    # Meta contexts need structured replies first.
    q = b"base:allocation"
    meta = struct.pack(">I", 2) + b"d0" + struct.pack(">II", 1, len(q)) + q
    c.option(OPT_SET_META, meta)
    assert c.reply()[1] == REP_ERR_INVALID
    c.option(OPT_STRUCTURED_REPLY, b"x")
    assert c.reply()[1] == REP_ERR_INVALID
    c.option(OPT_STRUCTURED_REPLY)
    assert c.reply()[1] == REP_ACK
    c.option(OPT_SET_META, meta[:-3])           # truncated query
    assert c.reply()[1] == REP_ERR_INVALID
    c.option(OPT_SET_META, meta)
    _, rtype, data = c.reply()
    assert rtype == REP_META and data[4:] == q
    assert c.reply()[1] == REP_ACK
    # LIST works and names both exports.
    c.option(OPT_LIST)
    names = []
    while True:
        _, rtype, data = c.reply()
        if rtype == REP_ACK:
            break
        assert rtype == REP_SERVER
        n = struct.unpack(">I", data[:4])[0]
        names.append(data[4:4 + n])
    assert sorted(names) == [b"d0", b"f0"]
    # An option payload far over the limit: the server hangs up instead
    # of allocating it.
    c.send(struct.pack(">QII", IHAVEOPT, OPT_LIST, 256 * MiB))
    assert c.closed_by_server()
    c.close()
    # EXPORT_NAME of a missing export: disconnect (no way to report it).
    c = Conn(daemon.nbd_sock)
    c.greeting()
    c.option(OPT_EXPORT_NAME, b"missing")
    assert c.closed_by_server()
    c.close()
    # ABORT gets an ACK.
    c = Conn(daemon.nbd_sock)
    c.greeting()
    c.option(OPT_ABORT)
    assert c.reply()[1] == REP_ACK
    c.close()


def test_oversized_and_out_of_range_requests(daemon):
    c = Conn(daemon.nbd_sock)
    c.greeting()
    c.go("d0")
    c.request(CMD_READ, 0, 64 * MiB, handle=1)         # over 32 MiB
    assert c.simple_reply() == (EINVAL, 1)
    c.request(CMD_READ, SIZE, 512, handle=2)           # past the end
    assert c.simple_reply() == (EINVAL, 2)
    c.request(CMD_READ, 2**64 - 512, 1024, handle=3)   # offset overflow
    assert c.simple_reply() == (EINVAL, 3)
    c.request(CMD_WRITE, SIZE - 512, 1024, handle=4, payload=b"w" * 1024)
    assert c.simple_reply() == (ENOSPC, 4)
    c.request(CMD_TRIM, SIZE, 4096, handle=5)
    assert c.simple_reply() == (ENOSPC, 5)
    c.request(CMD_BLOCK_STATUS, 0, 4096, handle=6)     # no context selected
    assert c.simple_reply() == (EINVAL, 6)
    c.request(99, 0, 0, handle=7)                      # unknown command
    assert c.simple_reply() == (EINVAL, 7)
    c.request(CMD_READ, 0, 512, handle=8, flags=0x8000)  # unknown flag
    assert c.simple_reply() == (EINVAL, 8)
    # Still usable: a good read returns the guard.
    c.request(CMD_READ, GUARD_OFF, 4096, handle=9)
    assert c.simple_reply() == (0, 9)
    assert c.recv(4096) == GUARD[:4096]
    # A write announcing more than 32 MiB of payload: disconnect.
    c.request(CMD_WRITE, 0, 64 * MiB, handle=10)
    try:
        c.send(b"\xee" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass            # the server may close before the payload arrives
    assert c.closed_by_server()
    c.close()

    # Structured replies: errors come as error chunks with a message.
    c = Conn(daemon.nbd_sock)
    c.greeting()
    c.go("d0", structured=True)
    c.request(CMD_READ, SIZE - 512, 1024, handle=11)
    magic, flags, rtype, handle, length = struct.unpack(">IHHQI", c.recv(20))
    assert magic == STRUCT_MAGIC and handle == 11 and flags & 1
    assert rtype == 0x8001
    payload = c.recv(length)
    assert struct.unpack(">I", payload[:4])[0] == EINVAL
    c.request(CMD_DISC, 0, 0)
    assert c.closed_by_server()
    c.close()

    # libnbd without its own bounds checks sees the server's errors.
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(daemon.nbd_uri("d0"))
    with pytest.raises(nbd.Error) as ei:
        h.pread(4096, SIZE)
    assert ei.value.errno == "EINVAL"
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"x" * 4096, SIZE - 1024)
    assert ei.value.errno == "ENOSPC"
    h.shutdown()


def test_bad_magic(daemon):
    c = Conn(daemon.nbd_sock)
    c.greeting()
    c.go("d0")
    c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_WRITE, 1, 0, 4096)
           + b"\xff" * 4096)
    assert c.closed_by_server()
    c.close()
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("d0"))
    assert h.pread(4096, 0) == bytes(4096)      # the bad "write" did nothing
    h.shutdown()


def test_disconnect_mid_write(daemon):
    for i in range(5):
        c = Conn(daemon.nbd_sock)
        c.greeting()
        c.go("d0")
        # An acknowledged write, then a write whose payload is cut short.
        c.request(CMD_WRITE, 10 * MiB, 4096, handle=1,
                  payload=bytes([i + 1]) * 4096)
        assert c.simple_reply() == (0, 1)
        c.request(CMD_WRITE, 12 * MiB, MiB, handle=2)
        c.send(b"\xab" * (MiB // 2))
        c.close()
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("d0"))
    assert h.pread(4096, 10 * MiB) == bytes([5]) * 4096
    # The cut write was never accepted: nothing of it landed.
    assert h.pread(MiB, 12 * MiB) == bytes(MiB)
    h.shutdown()


def test_many_requests_in_flight_then_close(daemon):
    """A client queues many writes and hangs up: every write it saw
    acknowledged is there."""
    c = Conn(daemon.nbd_sock)
    c.greeting()
    c.go("d0")
    n = 64
    for i in range(n):
        c.request(CMD_WRITE, 4 * MiB + i * 8192, 8192, handle=100 + i,
                  payload=bytes([i + 1]) * 8192)
    acked = set()
    for _ in range(n // 2):
        err, handle = c.simple_reply()
        assert err == 0
        acked.add(handle - 100)
    c.close()
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("d0"))
    for i in acked:
        assert h.pread(8192, 4 * MiB + i * 8192) == bytes([i + 1]) * 8192
    h.shutdown()


def fuzz_bytes(rnd):
    """Random bytes, or random requests with a valid magic (valid and
    invalid types, flags, offsets, lengths; payloads sometimes short)."""
    if rnd.random() < 0.3:
        return rnd.randbytes(rnd.randrange(1, 8192))
    out = b""
    for _ in range(rnd.randrange(1, 20)):
        cmd = rnd.choice([0, 1, 3, 4, 5, 6, 7, 8, rnd.randrange(65536)])
        flags = rnd.choice([0, 1, 2, 4, 8, 16, rnd.randrange(65536)])
        off = rnd.choice([0, rnd.randrange(SIZE), SIZE, rnd.randrange(2**64)])
        length = rnd.choice([0, 1, 512, rnd.randrange(MiB),
                             rnd.randrange(2**32)])
        out += struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd,
                           rnd.randrange(2**64), off, length)
        if cmd == CMD_WRITE:
            out += rnd.randbytes(min(length, rnd.randrange(0, 70000)))
    return out


def test_fuzz_after_handshake(daemon):
    rnd = random.Random(int(os.environ.get("NBD_FUZZ_SEED", "20240601")))
    for i in range(60):
        c = Conn(daemon.nbd_sock)
        c.greeting()
        c.go("f0", structured=rnd.random() < 0.5)
        try:
            c.send(fuzz_bytes(rnd))
        except (BrokenPipeError, ConnectionResetError):
            pass
        c.close()
        if i % 20 == 19:
            assert_healthy(daemon)
    # Fuzzing the handshake itself, with a good greeting.
    for i in range(40):
        c = Conn(daemon.nbd_sock)
        c.greeting()
        opt = rnd.choice([1, 3, 6, 7, 8, 9, 10, rnd.randrange(2**32)])
        data = rnd.randbytes(rnd.randrange(0, 300))
        try:
            c.option(opt, data)
            c.send(rnd.randbytes(rnd.randrange(0, 100)))
        except (BrokenPipeError, ConnectionResetError):
            pass
        c.close()
    assert_healthy(daemon)
