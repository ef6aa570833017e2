"""A real single-node Ceph cluster (one mon, one OSD) for tests and benchmarks.

Started from Debian's packages in a temporary folder, as root, without
systemd, bound to 127.0.0.1 on a free port, with authentication off and
pool size 1.  The OSD uses memstore (RAM, starts in about a second) unless
``objectstore="bluestore"`` is asked for (a sparse file: survives an OSD
restart).  Daemons run in the foreground as our children and are stopped by
PID, the OSD before the mon (else the OSD waits for the mon to ack).

Use as a context manager::

    with CephCluster(tmpdir) as c:
        c.create_pool("rbd", rbd=True)
        subprocess.run(["rbd", "-c", c.conf, "create", ...])

or from the shell (bench/ceph.sh)::

    /usr/bin/python3 -m bitback_testlib.ceph start DIR   # prints the conf path
    /usr/bin/python3 -m bitback_testlib.ceph stop DIR
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid

TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "rados", "monmaptool")


def missing_tools():
    from shutil import which
    return [t for t in TOOLS if which(t) is None]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephError(RuntimeError):
    pass


class CephCluster:
    def __init__(self, folder, objectstore="memstore",
                 memstore_bytes=4 << 30, bluestore_bytes=8 << 30):
        self.dir = pathlib.Path(folder).resolve()
        self.objectstore = objectstore
        self.memstore_bytes = memstore_bytes
        self.bluestore_bytes = bluestore_bytes
        self.conf = str(self.dir / "ceph.conf")
        self.port = None
        self.mon = None
        self.osd = None
        self.osd_uuid = None

    # -- helpers -----------------------------------------------------------
    def env(self):
        e = dict(os.environ)
        e["CEPH_CONF"] = self.conf
        return e

    def ceph(self, *args, timeout=30, check=True):
        p = subprocess.run(["ceph", "-c", self.conf, "--connect-timeout", "10",
                            *map(str, args)],
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise CephError(f"ceph {' '.join(map(str, args))}: {p.stderr}")
        return p.stdout

    def tool(self, name, *args, timeout=120, check=True, **kw):
        """Run rbd/rados/... against this cluster."""
        kw.setdefault("capture_output", True)
        p = subprocess.run([name, "-c", self.conf, *map(str, args)],
                           timeout=timeout, **kw)
        if check and p.returncode != 0:
            err = p.stderr.decode() if isinstance(p.stderr, bytes) else p.stderr
            raise CephError(f"{name} {' '.join(map(str, args))}: {err}")
        return p

    def _write_conf(self, fsid):
        d = self.dir
        lines = [
            "[global]",
            f"fsid = {fsid}",
            f"mon host = v2:127.0.0.1:{self.port}",
            "public addr = 127.0.0.1",
            "ms bind msgr1 = false",
            "auth cluster required = none",
            "auth service required = none",
            "auth client required = none",
            "osd pool default size = 1",
            "osd pool default min size = 1",
            "mon allow pool size one = true",
            "mon allow pool delete = true",
            "mon warn on pool no redundancy = false",
            "osd crush chooseleaf type = 0",
            f"osd objectstore = {self.objectstore}",
            f"memstore device bytes = {self.memstore_bytes}",
            f"bluestore block size = {self.bluestore_bytes}",
            "bluestore block create = true",
            f"run dir = {d}/run",
            f"admin socket = {d}/run/$name.asok",
            f"log file = {d}/log/$name.log",
            f"mon data = {d}/mon/$id",
            f"osd data = {d}/osd/$id",
            # Fast pool creation and daemon stop (measured, see issue 20).
            "paxos propose interval = 0.05",
            "paxos min wait = 0.01",
            "osd mon shutdown timeout = 2",
            # A test machine's disk may be fuller than a mon likes.
            "mon data avail crit = 0",
            "mon data avail warn = 0",
            "",
            "[client]",
            # rbd images made by tests get exclusive-lock, object-map and
            # fast-diff: the defaults of `rbd create` already.
            "rbd default features = 61",
            "",
        ]
        pathlib.Path(self.conf).write_text("\n".join(lines))

    def _wait(self, what, pred, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in (("mon", self.mon), ("osd", self.osd)):
                if p is not None and p.poll() is not None:
                    raise CephError(f"ceph-{name} exited ({p.returncode}) while "
                                    f"waiting for {what}: see {self.dir}/log")
            try:
                if pred():
                    return
            except (CephError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.1)
        raise CephError(f"timed out waiting for {what}")

    # -- start / stop ------------------------------------------------------
    def start(self):
        if os.geteuid() != 0:
            raise CephError("a test Ceph cluster needs root")
        for sub in ("mon/a", "osd/0", "run", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self.port = _free_port()
        self._write_conf(fsid)
        monmap = self.dir / "monmap"
        subprocess.run(["monmaptool", "--create", "--add", "a",
                        f"v2:127.0.0.1:{self.port}", "--fsid", fsid,
                        str(monmap)], check=True, capture_output=True)
        subprocess.run(["ceph-mon", "-c", self.conf, "--mkfs", "-i", "a",
                        "--monmap", str(monmap)], check=True, capture_output=True)
        self.mon = self._spawn("mon", ["ceph-mon", "-c", self.conf, "-i", "a", "-f"])
        self._wait("the mon", lambda: "quorum" in self.ceph("mon", "stat", timeout=5))
        self.osd_uuid = str(uuid.uuid4())
        self.ceph("osd", "new", self.osd_uuid)
        self.start_osd(mkfs=True)
        return self

    def _spawn(self, name, argv):
        log = open(self.dir / "log" / f"{name}.out", "ab")
        try:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        finally:
            log.close()
        (self.dir / f"{name}.pid").write_text(str(p.pid))
        return p

    def start_osd(self, mkfs=False):
        if mkfs:
            subprocess.run(["ceph-osd", "-c", self.conf, "-i", "0", "--mkfs",
                            "--osd-uuid", self.osd_uuid],
                           check=True, capture_output=True, timeout=120)
        self.osd = self._spawn("osd", ["ceph-osd", "-c", self.conf, "-i", "0", "-f"])
        self._wait("the OSD up", self._osd_up, timeout=60)

    def _osd_up(self):
        st = json.loads(self.ceph("osd", "stat", "-f", "json", timeout=5))
        return st.get("num_up_osds", 0) >= 1

    def stop_osd(self):
        _stop(self.osd)
        self.osd = None

    def create_pool(self, name, rbd=False, pg_num=8):
        self.ceph("osd", "pool", "create", name, pg_num)
        if rbd:
            self.tool("rbd", "pool", "init", name)
        else:
            self.ceph("osd", "pool", "application", "enable", name, "rados")
        # No mgr, so no PG statistics: an object operation blocks until
        # the pool's PGs are active, so one bounded probe waits for that.
        p = subprocess.run(["rados", "-c", self.conf, "-p", name, "stat",
                            "bitback-probe"], capture_output=True, text=True,
                           timeout=60)
        if "No such file" not in p.stderr and p.returncode != 0:
            raise CephError(f"pool {name} not usable: {p.stderr}")

    def stop(self):
        # The OSD first: it tells the mon it goes (bounded by
        # osd_mon_shutdown_timeout), then the mon.
        _stop(self.osd)
        _stop(self.mon)
        self.osd = self.mon = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


def _stop(p, timeout=10):
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


def _stop_pidfile(path):
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv):
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print("usage: python3 -m bitback_testlib.ceph start|stop DIR", file=sys.stderr)
        return 2
    folder = pathlib.Path(argv[2])
    if argv[1] == "start":
        c = CephCluster(folder)
        try:
            c.start()
            c.create_pool("rbd", rbd=True)
        except BaseException:
            c.stop()
            raise
        # Leave the daemons running; `stop DIR` ends them by their pid files.
        c.mon = c.osd = None
        print(c.conf)
        return 0
    _stop_pidfile(folder / "osd.pid")
    _stop_pidfile(folder / "mon.pid")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
