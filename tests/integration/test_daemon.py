"""bitbackd's command line and life cycle (issue 3): qemu-storage-daemon's
options in dotted and JSON form, option errors that name the option,
--pidfile, --daemonize, signals, and the QMP / NBD sockets it opens.
Results are checked over QMP, with qemu-io through NBD and with
`bitback img info` on the image after shutdown."""
import json
import os
import signal
import subprocess
import time

import pytest

from bitback_testlib import BITBACKD, Daemon, QMPClient, qmp_socket_ready
from bitback_testlib.nbdio import free_port
from conftest import bitback, require, run

SIZE = 8 * 1024 * 1024
QBM_DISK = "driver=qbm,node-name=disk0,file.driver=file,file.filename=disk.qbm"


def make_qbm(tmp_path, name="disk.qbm"):
    bitback("img", "create", "-f", "qbm", str(tmp_path / name), str(SIZE))


def bitbackd(*args, cwd, **kw):
    return run([BITBACKD, *args], check=False, cwd=cwd, timeout=60, **kw)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_help_and_version(tmp_path):
    p = bitbackd("--help", cwd=tmp_path)
    assert p.returncode == 0
    for opt in ("--blockdev", "--nbd-server", "--export", "--chardev",
                "--monitor", "--pidfile", "--daemonize"):
        assert opt in p.stdout
    p = bitbackd("--version", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("bitbackd ")


@pytest.mark.parametrize("args,words", [
    (["--blockdev", "driver=nosuch,node-name=x,filename=disk.qbm"],
     ["--blockdev", "nosuch"]),
    (["--blockdev", "driver=raw,node-name=x,file.driver=file,"
      "file.filename=missing.raw"], ["--blockdev", "missing.raw"]),
    (["--blockdev", '{"driver": "raw", '], ["--blockdev", "JSON"]),
    (["--blockdev", "driver=qbm,file.driver=file,file.filename=disk.qbm"],
     ["--blockdev", "node-name"]),
    (["--blockdev", QBM_DISK, "--blockdev", QBM_DISK],
     ["--blockdev", "disk0"]),
    (["--blockdev", "driver=qbm,node-name=d,bad..key=1"],
     ["--blockdev", "bad..key"]),
    (["--nbd-server", "addr.type=bogus,addr.path=x"],
     ["--nbd-server", "bogus"]),
    (["--nbd-server", "addr.type=unix"], ["--nbd-server", "path"]),
    (["--blockdev", QBM_DISK, "--nbd-server", "addr.type=unix,addr.path=n.sock",
      "--export", "type=nbd,id=e0,name=x"], ["--export", "node-name"]),
    (["--blockdev", QBM_DISK, "--nbd-server", "addr.type=unix,addr.path=n.sock",
      "--export", "type=nbd,id=e0,node-name=disk0,writable=maybe"],
     ["--export", "writable"]),
    (["--blockdev", QBM_DISK, "--nbd-server", "addr.type=unix,addr.path=n.sock",
      "--export", "type=nbd,id=e0,node-name=nope"], ["--export", "nope"]),
    (["--blockdev", QBM_DISK, "--export", "type=nbd,id=e0,node-name=disk0"],
     ["--export", "NBD server not running"]),
    (["--monitor", "chardev=nope"], ["--monitor", "nope"]),
    (["--chardev", "socket,id=m0"], ["--chardev", "path"]),
    (["--chardev", "socket,id=m0,path=q.sock,server=on,bogus=1"],
     ["--chardev", "bogus"]),
    (["--chardev", "file,id=m0,path=q.sock"], ["--chardev", "file"]),
    (["--object", "iothread,id=t0,poll-max-ns=x"], ["--object", "poll-max-ns"]),
    (["--object", "memory-backend-ram,id=t0"], ["--object", "memory-backend-ram"]),
    (["--no-such-option"], ["no-such-option"]),
    (["stray"], ["stray"]),
])
def test_option_errors_name_the_option(tmp_path, args, words):
    make_qbm(tmp_path)
    p = bitbackd(*args, cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("bitbackd: ") or "no-such-option" in p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)


def test_dotted_and_json_forms(tmp_path):
    make_qbm(tmp_path)
    run(["qemu-img", "create", "-f", "raw", str(tmp_path / "d1.raw"), "1M"])
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK,
                "--blockdev", json.dumps({"driver": "raw", "node-name": "d1",
                                          "read-only": True,
                                          "file": {"driver": "file",
                                                   "filename": "d1.raw"}}),
                "--blockdev", "driver=raw,node-name=d2,read-only=on,"
                "file.driver=file,file.filename=d1.raw",
                # qemu-storage-daemon's implied key: a bare driver name.
                "--blockdev", "raw,node-name=d3,read-only=on,"
                "file.driver=file,file.filename=d1.raw",
                nbd=True)
        c = d.qmp
        assert c.node("d1")["ro"] is True and c.node("d2")["ro"] is True
        assert c.node("d3")["drv"] == "raw"
        assert c.node("disk0")["ro"] is False
        c.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
        c.cmd("block-dirty-bitmap-add", node="disk0", name="b1")
        assert d.quit() == 0
        # Bitmaps (not persistent) are gone; the export takes a list.
        d.restart("--blockdev", QBM_DISK, "--export",
                  json.dumps({"type": "nbd", "id": "e0", "node-name": "disk0",
                              "name": "x", "writable": True}),
                  "--export", "type=nbd,id=e1,node-name=disk0,name=y,"
                  "description=a,,b", nbd=True)
        ids = sorted(x["id"] for x in d.qmp.cmd("query-block-exports"))
        assert ids == ["e0", "e1"]
        require("qemu-io")
        run(["qemu-io", "-f", "raw", d.nbd_uri("x"), "-c", "write -P 9 0 4k"])
        p = run(["qemu-io", "-f", "raw", "-r", d.nbd_uri("y"),
                 "-c", "read -P 9 0 4k"])
        assert "read 4096/4096" in p.stdout
        assert d.quit() == 0


def test_export_bitmaps_from_command_line(tmp_path):
    make_qbm(tmp_path)
    bitback("bitmap", "--add", str(tmp_path / "disk.qbm"), "b0")
    bitback("bitmap", "--add", str(tmp_path / "disk.qbm"), "b1")
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK, "--export",
                "type=nbd,id=e0,node-name=disk0,writable=on,"
                "bitmaps.0=b0,bitmaps.1=b1", nbd=True)
        require("qemu-io")
        require("nbdinfo")
        run(["qemu-io", "-f", "raw", d.nbd_uri("disk0"),
             "-c", "write -P 1 128k 64k"])
        for b in ("b0", "b1"):
            p = run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{b}",
                     d.nbd_uri("disk0")])
            dirty = [(e["offset"], e["length"]) for e in json.loads(p.stdout)
                     if e["type"] & 1]
            assert dirty == [(128 * 1024, 64 * 1024)]
        assert d.quit() == 0


def test_pidfile_written_and_removed(tmp_path):
    make_qbm(tmp_path)
    pidfile = tmp_path / "bbd.pid"
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK, "--pidfile", str(pidfile))
        deadline = time.time() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.time() < deadline
            time.sleep(0.02)
        assert int(pidfile.read_text()) == d.pid
        assert d.quit() == 0
        assert not pidfile.exists()


def test_daemonize(tmp_path):
    make_qbm(tmp_path)
    sockdir = Daemon(tmp_path / "d").sockdir   # a short folder for sockets
    qmp_sock = sockdir / "qmp.sock"
    pidfile = tmp_path / "bbd.pid"
    pid = None
    try:
        # Returns only once the daemon is ready.
        p = bitbackd("--daemonize", "--pidfile", str(pidfile),
                     "--blockdev", QBM_DISK,
                     "--chardev", f"socket,id=m0,path={qmp_sock},server=on,"
                     "wait=off", "--monitor", "chardev=m0", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        pid = int(pidfile.read_text())
        assert pid_alive(pid)
        assert qmp_socket_ready(qmp_sock)
        with QMPClient(qmp_sock) as c:
            c.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
                  persistent=True)
            c.cmd("quit")
        deadline = time.time() + 60
        while pid_alive(pid):
            assert time.time() < deadline, "daemon did not exit"
            time.sleep(0.05)
        pid = None
        info = bitback("img", "info", "--output=json",
                       str(tmp_path / "disk.qbm")).stdout
        assert "b0" in info
        assert not pidfile.exists()
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_daemonize_failure_reports_and_exits_1(tmp_path):
    p = bitbackd("--daemonize", "--blockdev", "driver=raw,node-name=x,"
                 "file.driver=file,file.filename=missing.raw", cwd=tmp_path)
    assert p.returncode == 1
    assert "--blockdev" in p.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_shut_down_cleanly(tmp_path, sig):
    make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK, nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
                  persistent=True)
        assert d.terminate(sig) == 0
        assert not d.qmp_sock.exists()
        d.restart("--blockdev", QBM_DISK)
        assert d.qmp.bitmap("disk0", "b0")["inconsistent"] is False
        assert d.quit() == 0


def test_restart_after_kill_reuses_socket_paths(tmp_path):
    make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK)
        d.kill()
        assert d.qmp_sock.exists()          # stale socket left behind
        d.restart("--blockdev", QBM_DISK)
        assert d.qmp.cmd("query-version")["package"].startswith("bitback")
        assert d.quit() == 0


def test_nbd_server_on_tcp(tmp_path):
    require("qemu-io")
    make_qbm(tmp_path)
    port = free_port()
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK, "--nbd-server",
                f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                "--export", "type=nbd,id=e0,node-name=disk0,writable=on")
        uri = f"nbd://127.0.0.1:{port}/disk0"
        run(["qemu-io", "-f", "raw", uri, "-c", "write -P 5 4k 4k"])
        p = run(["qemu-io", "-f", "raw", uri, "-c", "read -P 5 4k 4k"])
        assert "read 4096/4096" in p.stdout
        assert d.quit() == 0


def test_no_monitor_runs_until_signal(tmp_path):
    make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK, qmp=False)
        assert d.running()
        assert d.terminate() == 0
