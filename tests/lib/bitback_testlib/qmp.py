"""The one QMP client of bitback's tests, demos and benchmarks.

    from bitback_testlib import QMPClient, QMPError

    with QMPClient(path) as q:
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")

Shell scripts use it through `python3 -m bitback_testlib.qmpcli` (with
PYTHONPATH=<repo>/tests/lib).
"""
import json
import socket
import time

START_TIMEOUT = 30      # seconds to wait for a daemon's socket


class QMPError(Exception):
    """A QMP {"error": {...}} reply; .cls is the class, .desc the text."""

    def __init__(self, cls, desc, reply=None):
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc
        self.reply = reply


class QMPClient:
    """A QMP connection over a UNIX socket or TCP (optionally TLS).

    cmd(name, **args) returns the "return" value or raises QMPError.
    Arguments whose names are not Python identifiers go in a dict:
    cmd("blockdev-del", {"node-name": "d0"}) or cmd(name, **{"node-name": x}).
    Events that arrive while waiting for replies are kept in .events.
    """

    def __init__(self, path, negotiate=True, timeout=60, tls=None):
        """path: a UNIX socket, or (host, port) for TCP; tls: an
        ssl.SSLContext to do TLS with first (TCP)."""
        self.path = path if isinstance(path, tuple) else str(path)
        self.tls = tls is not None
        self.events = []
        self._buf = b""
        self._next_id = 0
        if isinstance(path, tuple):
            self.sock = socket.create_connection(path, timeout=timeout)
            if tls is not None:
                self.sock = tls.wrap_socket(self.sock, server_hostname=path[0])
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(self.path)
        self.greeting = self.recv()
        if "QMP" not in self.greeting:
            raise AssertionError(f"bad QMP greeting: {self.greeting}")
        if negotiate:
            self.cmd("qmp_capabilities")

    # -- raw I/O -------------------------------------------------------
    def send_raw(self, data):
        """Send bytes as they are (for malformed-input tests)."""
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def send(self, obj):
        data = json.dumps(obj).encode()
        if self.tls:
            # The object and its newline as two TLS records, as bitback's
            # client sends them: qemu-storage-daemon 7.2's TLS chardev
            # handles a record only when the next one arrives, so a
            # request in one record would never be answered.
            self.send_raw(data)
            self.send_raw(b"\n")
        else:
            self.send_raw(data + b"\n")

    def recv(self):
        """Next JSON object from the stream (reply or event), in order."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1:]
                if line.strip():
                    return json.loads(line)
                continue
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("QMP connection closed")
            self._buf += data

    def recv_reply(self):
        """Next object that is not an event (events go to .events)."""
        while True:
            msg = self.recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    # -- commands ------------------------------------------------------
    def execute(self, command, args=None, /, **kwargs):
        """Run a command and return the whole reply dict.  (command and
        args are positional-only, so "name" or "args" can be arguments.)"""
        merged = dict(args or {})
        merged.update(kwargs)
        self._next_id += 1
        req = {"execute": command, "id": self._next_id}
        if merged:
            req["arguments"] = merged
        self.send(req)
        while True:
            reply = self.recv_reply()
            if reply.get("id") == self._next_id:
                return reply
            # A reply without our id (e.g. to raw input sent earlier) is
            # not ours: skip it.

    def cmd(self, command, args=None, /, **kwargs):
        reply = self.execute(command, args, **kwargs)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(err.get("class"), err.get("desc"), reply)
        return reply["return"]

    def error(self, command, args=None, /, **kwargs):
        """Run a command that must fail; return its QMPError."""
        reply = self.execute(command, args, **kwargs)
        if "error" not in reply:
            raise AssertionError(f"{command} succeeded but should fail: {reply}")
        err = reply["error"]
        return QMPError(err.get("class"), err.get("desc"), reply)

    # -- events --------------------------------------------------------
    def get_event(self, name, timeout=60):
        """Wait for (and remove from .events) the first event `name`."""
        return self.wait_event(lambda ev: ev["event"] == name, timeout, name)

    def wait_event(self, pred, timeout=60, what="matching"):
        """Wait for (and remove from .events) the first event with
        pred(ev); TimeoutError names it `what`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if pred(ev):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} event within {timeout}s; "
                                   f"events: {self.events}")
            old = self.sock.gettimeout()
            self.sock.settimeout(left)
            try:
                msg = self.recv()
            finally:
                self.sock.settimeout(old)
            if "event" in msg:
                self.events.append(msg)

    # -- helpers -------------------------------------------------------
    def del_export(self, export_id, timeout=10):
        """block-export-del, retrying while a client that just went away
        still counts as connected (the server notices a closed socket
        asynchronously, in QEMU too)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.execute("block-export-del", id=export_id)
            if "error" not in reply:
                return reply["return"]
            err = reply["error"]
            if "in use" not in err.get("desc", "") or time.monotonic() > deadline:
                raise QMPError(err.get("class"), err.get("desc"), reply)
            time.sleep(0.01)

    def node(self, node_name):
        """The query-named-block-nodes entry of node_name (or None)."""
        for n in self.cmd("query-named-block-nodes"):
            if n["node-name"] == node_name:
                return n
        return None

    def bitmap(self, node_name, name):
        """The dirty-bitmaps entry `name` of node_name (or None)."""
        n = self.node(node_name)
        for b in (n or {}).get("dirty-bitmaps", []):
            if b.get("name") == name:
                return b
        return None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def qmp_socket_ready(path, timeout=START_TIMEOUT):
    """Wait until a UNIX socket accepts connections (for daemons started
    without the Daemon class, e.g. with --daemonize)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return True
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    return False

