"""Start bitbackd (or qemu-storage-daemon) for a test and talk QMP to it.

Shared by the integration and stress tests and the benchmarks.  Typical use:

    from bitback_testlib import Daemon, QMPError

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
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

# START_TIMEOUT: seconds to wait for the daemon to be ready
from .qmp import START_TIMEOUT, QMPClient

REPO = pathlib.Path(__file__).resolve().parents[3]
BUILD = pathlib.Path(os.environ.get("BITBACK_BUILD", REPO / "build"))
if not BUILD.is_absolute():
    BUILD = REPO / BUILD
BITBACKD = str(BUILD / "bitbackd")
QSD = "qemu-storage-daemon"

STOP_TIMEOUT = 60       # seconds to wait for a clean exit


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
