"""Start bitbackd (or qemu-storage-daemon) for a test and talk QMP to it.

Shared by the integration tests.  Typical use:

    from bitbackd import Daemon, QMPError

    with Daemon(tmp_path) as d:
        d.start("--blockdev", "driver=qbm,node-name=disk0,"
                "file.driver=file,file.filename=disk.qbm",
                "--export", "type=nbd,id=e0,node-name=disk0,writable=on",
                nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        uri = d.nbd_uri("disk0")          # nbd+unix:///disk0?socket=...
        ...
        assert d.quit() == 0              # clean shutdown, exit status

The daemon runs with its working folder set to `workdir`, so relative image
names in its options refer to files there.  Its QMP monitor and NBD socket
live in a short temporary folder (UNIX socket paths are limited to 107
bytes), and it is killed (SIGKILL) on leaving the `with` block if it is
still running, whatever happened in the test.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("BITBACK_BUILD", REPO / "build"))
if not BUILD.is_absolute():
    BUILD = REPO / BUILD
BITBACKD = str(BUILD / "bitbackd")
QSD = "qemu-storage-daemon"

START_TIMEOUT = 30      # seconds to wait for the daemon to be ready
STOP_TIMEOUT = 60       # seconds to wait for a clean exit


class QMPError(Exception):
    """A QMP {"error": {...}} reply; .cls is the class, .desc the text."""

    def __init__(self, cls, desc, reply=None):
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc
        self.reply = reply


class QMPClient:
    """A QMP connection over a UNIX socket.

    cmd(name, **args) returns the "return" value or raises QMPError.
    Arguments whose names are not Python identifiers go in a dict:
    cmd("blockdev-del", {"node-name": "d0"}) or cmd(name, **{"node-name": x}).
    Events that arrive while waiting for replies are kept in .events.
    """

    def __init__(self, path, negotiate=True, timeout=60):
        self.path = str(path)
        self.events = []
        self._buf = b""
        self._next_id = 0
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
        self.send_raw(json.dumps(obj).encode() + b"\n")

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
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} event within {timeout}s")
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


class Daemon:
    """bitbackd (or qemu-storage-daemon with binary=QSD) in a test folder."""

    def __init__(self, workdir, binary=None):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary or BITBACKD
        # Short folder for sockets: pytest's tmp_path can be too long.
        self.sockdir = pathlib.Path(tempfile.mkdtemp(prefix="bbd-"))
        self.qmp_sock = self.sockdir / "qmp.sock"
        self.nbd_sock = self.sockdir / "nbd.sock"
        self.pidfile = self.sockdir / "daemon.pid"
        self.stdout_path = self.workdir / "daemon.stdout"
        self.stderr_path = self.workdir / "daemon.stderr"
        self.proc = None
        self._qmp = None
        self.args = []

    # -- start / stop --------------------------------------------------
    def start(self, *args, qmp=True, nbd=False, wait=True, env=None):
        """Start the daemon with args (options in command-line order).

        qmp=True adds a --chardev/--monitor pair on self.qmp_sock first;
        nbd=True adds --nbd-server on self.nbd_sock before args (so that
        --export in args finds it).  Returns when the daemon is ready (its
        pidfile exists: every option was processed), or raises with its
        stderr if it exits first.  env: the daemon's environment (default:
        this process's)."""
        if self.proc is not None:
            raise AssertionError("daemon already started")
        argv = [self.binary]
        if qmp:
            argv += ["--chardev",
                     f"socket,path={self.qmp_sock},server=on,wait=off,id=m0",
                     "--monitor", "chardev=m0"]
        if nbd:
            argv += ["--nbd-server",
                     f"addr.type=unix,addr.path={self.nbd_sock}"]
        argv += [str(a) for a in args]
        own_pidfile = "--pidfile" not in argv and not any(
            str(a).startswith("--pidfile=") for a in argv)
        if own_pidfile:
            argv += ["--pidfile", str(self.pidfile)]
        self.args = argv
        with open(self.stdout_path, "wb") as out, \
                open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=self.workdir,
                                         stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=env)
        if not wait:
            return self
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(
                    f"daemon exited with {rc} at start-up: {' '.join(argv)}\n"
                    f"stderr: {self.stderr()}")
            ready = True
            if own_pidfile:
                ready = self.pidfile.exists() and \
                    self.pidfile.read_text().strip() != ""
            if qmp:
                ready = ready and self.qmp_sock.exists()
            if ready:
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"daemon not ready within {START_TIMEOUT}s\n"
                    f"stderr: {self.stderr()}")
            time.sleep(0.02)

    @property
    def qmp(self):
        """A negotiated QMP connection (opened on first use)."""
        if self._qmp is None:
            self._qmp = QMPClient(self.qmp_sock)
        return self._qmp

    def connect_qmp(self, negotiate=True):
        """A new, separate QMP connection (caller closes it)."""
        return QMPClient(self.qmp_sock, negotiate=negotiate)

    def nbd_uri(self, export):
        return f"nbd+unix:///{export}?socket={self.nbd_sock}"

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout=STOP_TIMEOUT):
        """Wait for exit; return the exit status (kill -9 on timeout)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit within {timeout}s\n"
                                 f"stderr: {self.stderr()}")
        self._close_qmp()
        return rc

    def quit(self, timeout=STOP_TIMEOUT):
        """Shut down with the QMP 'quit' command; return the exit status."""
        self.qmp.cmd("quit")
        return self.wait(timeout)

    def terminate(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Send sig (SIGTERM by default); return the exit status."""
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def kill(self):
        """SIGKILL, as a crash would; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait()
        self._close_qmp()
        return rc

    def _close_qmp(self):
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def cleanup(self):
        """Kill the daemon if it still runs and remove the socket folder."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.sockdir, ignore_errors=True)

    def restart(self, *args, **kw):
        """Start again in the same folders (after quit/kill)."""
        if self.running():
            raise AssertionError("daemon still running")
        self._close_qmp()
        self.proc = None
        for p in (self.pidfile,):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        return self.start(*args, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


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
