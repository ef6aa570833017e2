"""The nbd block driver (src/block/drivers/nbd.c): bitbackd opens a node on a remote
NBD export (qemu-nbd or nbdkit) with blockdev-add driver=nbd and re-exports
it.  Data written through bitbackd must land on the remote server (checked
from the server's side with qemu-io and qemu-img compare), the node's dirty
bitmap must track those writes, remote errors must come back to the client
as I/O errors without hurting the daemon, and bad connections must fail
blockdev-add with a clear error.
"""
import json
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from bitback_testlib import Daemon
from bitback_testlib.nbdio import free_port
from conftest import require, run

MiB = 1024 * 1024
GRAN = 64 * 1024


def wait_socket(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"NBD server exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise AssertionError(f"NBD server socket {path} not ready")


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="bbnbd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def servers():
    """Start NBD servers; every one is killed at the end."""
    procs = []

    def start(argv, sock):
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        procs.append(p)
        wait_socket(sock, p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def qemu_nbd(servers, image, sock, *extra):
    require("qemu-nbd")
    return servers(["qemu-nbd", "--format=raw", "--persistent", "--shared=8",
                    f"--socket={sock}", *extra, image], sock)


def nbd_blockdev(sock, node="n0", export="", **extra):
    opts = {"driver": "nbd", "node-name": node,
            "server": {"type": "unix", "path": str(sock)}, "export": export}
    opts.update(extra)
    return opts


def qemu_io(uri, *cmds, check=True, read_only=False):
    argv = ["qemu-io", "-f", "raw"]
    if read_only:
        argv.append("-r")
    for c in cmds:
        argv += ["-c", c]
    return run(argv + [uri], check=check)


def extents(uri, context):
    """[(offset, length, type)] from nbdinfo --map, adjacent equal types
    merged (servers may split extents differently)."""
    p = run(["nbdinfo", "--json", f"--map={context}", uri])
    out = []
    for e in json.loads(p.stdout):
        if out and out[-1][2] == e["type"] and \
                out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
        else:
            out.append((e["offset"], e["length"], e["type"]))
    return out


WRITES = [("write -P 0xab 1M 64k", 1 * MiB, 64 * 1024),
          ("write -P 0xcd 10M 192k", 10 * MiB, 192 * 1024),
          ("write -P 0x5a 2000k 100k", 2000 * 1024, 100 * 1024),
          ("write -z 20M 1M", 20 * MiB, 1 * MiB)]


def test_writes_land_on_remote_and_bitmap_tracks_them(tmp_path, sockdir,
                                                      servers):
    for tool in ("qemu-io", "qemu-img", "nbdinfo"):
        require(tool)
    image = tmp_path / "remote.raw"
    ref = tmp_path / "ref.raw"
    run(["qemu-img", "create", "-f", "raw", image, "64M"])
    qemu_io(str(image), "write -P 0x11 0 4M", "write -P 0x22 30M 1M")
    shutil.copy(image, ref)
    sock = f"{sockdir}/remote.sock"
    qemu_nbd(servers, image, sock)
    remote_uri = f"nbd+unix:///?socket={sock}"

    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", json.dumps(nbd_blockdev(sock)),
                "--export", "type=nbd,id=e0,node-name=n0,name=n0,writable=on",
                nbd=True)
        node = d.qmp.node("n0")
        assert node is not None and node["drv"] == "nbd"
        d.qmp.cmd("block-dirty-bitmap-add", node="n0", name="b0")
        d.qmp.cmd("block-export-add", type="nbd", id="e1",
                  **{"node-name": "n0"}, name="n0b", writable=True,
                  bitmaps=["b0"])
        uri = d.nbd_uri("n0")

        # The node has the remote size.
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
        assert info["exports"][0]["export-size"] == 64 * MiB

        # Reads through bitbackd return the remote content.
        p = qemu_io(uri, "read -P 0x11 0 4M", "read -P 0x22 30M 1M",
                    "read -P 0 40M 1M")
        assert "Pattern verification failed" not in p.stdout

        # Write through bitbackd, and the same writes to a local reference.
        cmds = [w[0] for w in WRITES]
        p = qemu_io(uri, *cmds)
        assert "error" not in p.stdout.lower(), p.stdout
        qemu_io(str(ref), *cmds)

        # The remote server (read directly, not through bitbackd) holds them.
        p = qemu_io(remote_uri, "read -P 0xab 1M 64k", "read -P 0xcd 10M 192k",
                    "read -P 0x5a 2000k 100k", "read -P 0 20M 1M",
                    read_only=True)
        assert "Pattern verification failed" not in p.stdout, p.stdout
        assert p.stdout.count("read ") == 4
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", ref, remote_uri])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", ref, uri])

        # The bitmap on n0 holds exactly the written clusters.
        clusters = set()
        for _, off, ln in WRITES:
            clusters.update(range(off // GRAN, (off + ln - 1) // GRAN + 1))
        expect = []
        for c in sorted(clusters):
            if expect and expect[-1][0] + expect[-1][1] == c * GRAN:
                expect[-1] = (expect[-1][0], expect[-1][1] + GRAN)
            else:
                expect.append((c * GRAN, GRAN))
        dirty = [(o, ln) for o, ln, t in
                 extents(d.nbd_uri("n0b"), "qemu:dirty-bitmap:b0") if t & 1]
        assert dirty == expect

        # Block status passes through: bitbackd's base:allocation map says
        # the same as the remote server's, as to what reads as zero.
        def zero_map(u):
            return [(o, ln, t & 2) for o, ln, t in
                    extents(u, "base:allocation")]

        def merged(m):
            out = []
            for o, ln, t in m:
                if out and out[-1][2] == t and out[-1][0] + out[-1][1] == o:
                    out[-1] = (out[-1][0], out[-1][1] + ln, t)
                else:
                    out.append((o, ln, t))
            return out
        assert merged(zero_map(uri)) == merged(zero_map(remote_uri))

        assert d.quit() == 0


def test_remote_write_errors_reach_the_client(tmp_path, sockdir, servers):
    for tool in ("nbdkit", "qemu-io"):
        require(tool)
    sock = f"{sockdir}/err.sock"
    servers(["nbdkit", "-f", "-U", sock, "--filter=error", "memory", "64M",
             "error-pwrite-rate=1", "error-pwrite=EIO"], sock)

    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", json.dumps(nbd_blockdev(sock)),
                "--export", "type=nbd,id=e0,node-name=n0,name=n0,writable=on",
                nbd=True)
        uri = d.nbd_uri("n0")
        p = qemu_io(uri, "write -P 0xab 0 64k", check=False)
        out = p.stdout + p.stderr
        assert "Input/output error" in out, out
        assert "wrote 65536/65536" not in out
        # Reads still work, and the data did not change.
        p = qemu_io(uri, "read -P 0 0 64k", read_only=True)
        assert "Pattern verification failed" not in p.stdout
        # The daemon is alive and answers.
        assert d.running()
        assert d.qmp.node("n0") is not None
        assert d.quit() == 0


def test_bad_connections_fail_blockdev_add(tmp_path, sockdir, servers):
    image = tmp_path / "ro.raw"
    run(["qemu-img", "create", "-f", "raw", image, "4M"])
    ro_sock = f"{sockdir}/ro.sock"
    qemu_nbd(servers, image, ro_sock, "--read-only")

    with Daemon(tmp_path / "d") as d:
        d.start()
        missing = f"{sockdir}/missing.sock"
        err = d.qmp.error("blockdev-add", nbd_blockdev(missing))
        assert "Failed to connect" in err.desc and missing in err.desc, err.desc
        assert d.qmp.node("n0") is None

        err = d.qmp.error("blockdev-add",
                          {"driver": "nbd", "node-name": "n0",
                           "server": {"type": "vsock"}})
        assert "server type" in err.desc, err.desc
        err = d.qmp.error("blockdev-add",
                          {"driver": "nbd", "node-name": "n0"})
        assert "'server'" in err.desc, err.desc

        # A read-only export refuses a read-write node, with a clear reason,
        # and opens read-only.
        err = d.qmp.error("blockdev-add", nbd_blockdev(ro_sock))
        assert "read-only" in err.desc, err.desc
        d.qmp.cmd("blockdev-add", nbd_blockdev(ro_sock, **{"read-only": True}))
        node = d.qmp.node("n0")
        assert node is not None and node["ro"] is True
        assert d.quit() == 0


def test_inet_server(tmp_path, servers):
    """server.type=inet reaches a qemu-nbd listening on TCP."""
    require("qemu-nbd")
    image = tmp_path / "tcp.raw"
    run(["qemu-img", "create", "-f", "raw", image, "8M"])
    qemu_io(str(image), "write -P 0x77 1M 1M")
    port = free_port()
    p = subprocess.Popen(["qemu-nbd", "--format=raw", "--persistent",
                          "--shared=8", "--bind=127.0.0.1", f"--port={port}",
                          "--export-name=tcpx", str(image)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert p.poll() is None, "qemu-nbd exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "qemu-nbd not listening"
                time.sleep(0.02)
        with Daemon(tmp_path / "d") as d:
            d.start(nbd=True)
            d.qmp.cmd("blockdev-add", {
                "driver": "nbd", "node-name": "n0", "export": "tcpx",
                "server": {"type": "inet", "host": "127.0.0.1",
                           "port": str(port)}})
            d.qmp.cmd("block-export-add", type="nbd", id="e0",
                      **{"node-name": "n0"}, name="n0", writable=True)
            uri = d.nbd_uri("n0")
            out = qemu_io(uri, "read -P 0x77 1M 1M", "write -P 0x99 0 4k").stdout
            assert "Pattern verification failed" not in out
            out = qemu_io(f"nbd://127.0.0.1:{port}/tcpx", "read -P 0x99 0 4k",
                          read_only=True).stdout
            assert "Pattern verification failed" not in out
            # A wrong export name fails clearly.
            err = d.qmp.error("blockdev-add", {
                "driver": "nbd", "node-name": "n1", "export": "nope",
                "server": {"type": "inet", "host": "127.0.0.1",
                           "port": str(port)}})
            assert "Failed to connect" in err.desc, err.desc
            assert d.quit() == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
