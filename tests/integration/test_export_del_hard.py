"""block-export-del mode=hard against hostile clients: it cuts off every
client of the export at any stage (negotiating, stalled in GO, stuck in an
INFO reply it never reads, with a request inside the block layer) at once,
and neither it nor the rest of the monitor ever waits on a client's socket.

Raw sockets make the hostile clients (helpers from test_nbd_badclients);
a second monitor connection checks that the monitor still answers.  Every
wait is bounded; BOUND is generous and only says "did not hang".
"""
import fcntl
import os
import socket
import struct
import subprocess
import tempfile
import termios
import time

import nbd
import pytest

from bitback_testlib import Daemon, QMPClient
from conftest import require
from test_nbd_badclients import (Conn, IHAVEOPT, OPT_GO, OPT_INFO,
                                 REP_ACK, REP_MAGIC, REQ_MAGIC, CMD_WRITE)

MiB = 1024 * 1024
SIZE = 16 * MiB
BOUND = 5                    # seconds: a command that takes longer hangs
INFO_DESCRIPTION = 2
DESC = "d" * 4096            # every INFO reply carries 4 KiB
WRITE_OFF = 1 * MiB


@pytest.fixture
def daemon(tmp_path):
    with open(tmp_path / "d.raw", "wb") as f:
        f.truncate(SIZE)
    with Daemon(tmp_path) as d:
        # No handshake deadline: the stalled clients must stay stalled.
        d.start("--nbd-server",
                f"addr.type=unix,addr.path={d.nbd_sock},"
                "handshake-max-seconds=0",
                "--blockdev",
                "driver=raw,node-name=d0,file.driver=file,file.filename=d.raw",
                "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable=on,"
                f"description={DESC}")
        yield d
        assert d.running(), d.stderr()
        d.qmp.cmd("query-version")


def info_option(name):
    n = name.encode()
    return (struct.pack(">QII", IHAVEOPT, OPT_INFO, len(n) + 8) +
            struct.pack(">I", len(n)) + n + struct.pack(">HH", 1,
                                                        INFO_DESCRIPTION))


def stalled_client(d, extra=b"", count=4000):
    """A client that asks for `count` INFO replies (4 KiB each) and never
    reads them, then sends `extra`: the server blocks sending to it with
    the export pinned.  Returns once the server has stopped sending."""
    c = Conn(d.nbd_sock)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.greeting()
    c.send(info_option("d0") * count + extra)
    last, same = -1, 0
    for _ in range(1000):                    # at most ~25 s
        queued = struct.unpack("i", fcntl.ioctl(
            c.s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        same = same + 1 if queued == last and queued > 0 else 0
        if same >= 20:
            break
        last = queued
        time.sleep(0.025)
    else:
        raise AssertionError("the server never stopped sending")
    assert queued < count * len(DESC)        # it is blocked, not done
    return c


def hard_del_unblocked(d, export_id):
    """Send a hard block-export-del; while it runs, a second monitor
    connection must get its greeting and an answer to query-version, and
    the delete must answer, each within BOUND."""
    q = d.qmp
    q.send({"execute": "block-export-del",
            "arguments": {"id": export_id, "mode": "hard"}})
    with QMPClient(d.qmp_sock, timeout=BOUND) as q2:
        assert "qemu" in q2.cmd("query-version")
    old = q.sock.gettimeout()
    q.sock.settimeout(BOUND)
    try:
        reply = q.recv_reply()
    finally:
        q.sock.settimeout(old)
    assert reply.get("return") == {}, reply


def replies_until_eof(c):
    """Every option reply (opt, type) the server sent before closing."""
    data = b""
    try:
        while True:
            d = c.s.recv(1 << 20)
            if not d:
                break
            data += d
    except ConnectionResetError:
        pass
    out = []
    pos = 0
    while pos + 20 <= len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REP_MAGIC, data[pos:pos + 32]
        out.append((opt, rtype))
        pos += 20 + length
    return out


def wait_export_gone(d, export_id):
    ev = d.qmp.get_event("BLOCK_EXPORT_DELETED", timeout=30)
    assert ev["data"] == {"id": export_id}
    assert all(e["id"] != export_id for e in d.qmp.cmd("query-block-exports"))


def test_stalled_in_go_is_cut_off(daemon):
    """(a), (c): a client whose GO (and a write after it) waits behind INFO
    replies it does not read.  The delete returns at once, the GO never
    completes and the write never lands."""
    d = daemon
    go = (struct.pack(">QII", IHAVEOPT, OPT_GO, 8) +
          struct.pack(">I", 2) + b"d0" + struct.pack(">H", 0))
    write = struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE, 1, WRITE_OFF,
                        4096) + b"\xab" * 4096
    c = stalled_client(d, extra=go + write)
    try:
        hard_del_unblocked(d, "e0")
        c.s.settimeout(30)
        replies = replies_until_eof(c)
        assert (OPT_GO, REP_ACK) not in replies
    finally:
        c.close()
    wait_export_gone(d, "e0")
    r = subprocess.run(["qemu-io", "-r", "-U", "-f", "raw",
                        "-c", f"read -P 0 {WRITE_OFF} 4k",
                        str(d.workdir / "d.raw")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "verification failed" not in r.stdout, \
        r.stdout + r.stderr


def test_unread_info_replies_do_not_block_monitor(daemon):
    """(b), (c): a client that never reads its INFO replies and keeps its
    socket open blocks neither the delete nor another monitor."""
    d = daemon
    c = stalled_client(d)
    try:
        hard_del_unblocked(d, "e0")
        c.s.settimeout(30)
        assert c.closed_by_server()
        wait_export_gone(d, "e0")
    finally:
        c.close()


def test_safe_del_refuses_negotiating_client(daemon):
    """(e): mode safe still refuses while a client is negotiating."""
    d = daemon
    c = stalled_client(d)
    try:
        err = d.qmp.error("block-export-del", id="e0", mode="safe")
        assert "still in use" in err.desc
        assert any(e["id"] == "e0" and not e["shutting-down"]
                   for e in d.qmp.cmd("query-block-exports"))
        hard_del_unblocked(d, "e0")
    finally:
        c.close()
    wait_export_gone(d, "e0")


def nbdkit_paused_target(sockdir):
    """nbdkit memory disk behind the log and pause filters.  Returns
    (process, data socket, control socket, log path)."""
    require("nbdkit")
    sock = os.path.join(sockdir, "k.sock")
    ctl = os.path.join(sockdir, "k.ctl")
    log = os.path.join(sockdir, "k.log")
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock,
                             "--filter=log", "--filter=pause", "memory",
                             str(SIZE), f"pause-control={ctl}",
                             f"logfile={log}"],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(1000):
        if os.path.exists(sock) and os.path.exists(ctl):
            return proc, sock, ctl, log
        assert proc.poll() is None, "nbdkit exited"
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("nbdkit did not start")


def pause_ctl(ctl, cmd):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(ctl)
        s.sendall(cmd)
        assert s.recv(1) == cmd.upper()


def log_reads(log):
    with open(log) as f:
        return sum(1 for line in f if " Read " in line)


def test_shutting_down_until_request_in_node_ends(daemon):
    """(d): a client with a read stuck in the node (a paused nbdkit behind
    the nbd driver).  The delete returns; the export shows shutting-down,
    holds its node and its id; once the read ends the client goes, the
    export is freed and BLOCK_EXPORT_DELETED arrives."""
    d = daemon
    sockdir = tempfile.mkdtemp(prefix="bbx-")
    proc, sock, ctl, log = nbdkit_paused_target(sockdir)
    h = None
    try:
        q = d.qmp
        q.cmd("blockdev-add", {"driver": "nbd", "node-name": "n0",
                               "server": {"type": "unix", "path": sock},
                               "export": ""})
        q.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "n0"},
              name="n0", writable=True)
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("n0"))
        before = log_reads(log)
        pause_ctl(ctl, b"p")
        buf = nbd.Buffer(4096)
        h.aio_pread(buf, 0)
        for _ in range(3000):                # the read reached nbdkit
            if log_reads(log) > before:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the read never reached nbdkit")

        hard_del_unblocked(d, "e1")
        exp = [e for e in q.cmd("query-block-exports") if e["id"] == "e1"]
        assert exp and exp[0]["shutting-down"] is True
        assert "in use" in q.error("blockdev-del", **{"node-name": "n0"}).desc
        assert "already in use" in q.error(
            "block-export-add", type="nbd", id="e1",
            **{"node-name": "n0"}, name="n1").desc
        assert "already shutting down" in q.error(
            "block-export-del", id="e1", mode="hard").desc
        assert not [e for e in q.events
                    if e["event"] == "BLOCK_EXPORT_DELETED"]

        pause_ctl(ctl, b"r")
        wait_export_gone(d, "e1")
        q.cmd("blockdev-del", **{"node-name": "n0"})
    finally:
        del h                                # closes the connection
        proc.kill()
        proc.wait()
