"""Backing up a daemon on another host (issue 19): bitbackd reached only
over TCP, QMP with TLS (--chardev socket,host=,port=,tls-creds=,
tls-authz=) and its NBD server with TLS, nothing on a UNIX socket.

`bitback backup --connect 127.0.0.1:PORT --nbd-server 127.0.0.1:PORT
--object tls-creds-x509,...,endpoint=client --tls-creds t0 --fleece-dir
DIR` pulls (implied over TCP) a chain full, inc, inc while a writer runs
through the TLS export; every point restores bit for bit and `qemu-img
compare` agrees with copies read at the transaction times.  The overlays
are made by the daemon (blockdev-create) in the daemon's folder, which
never gets a repository file and holds no overlay afterwards.  QMP over
TCP with the wrong CA, a refused DN or no TLS fails cleanly: bounded, a
nonzero exit, a clear message (and the daemon's refusal line).  Also
blockdev-create's errors, checked from a Python TLS client (OpenSSL, a
second TLS implementation).  The chain runs against qemu-storage-daemon
too, started with QEMU's own --chardev socket,host=,port=,tls-creds=.
"""
import os
import socket
import ssl
import subprocess
import time

import pytest

from bitback_testlib import QSD, Daemon, QMPClient, QMPError
from bitback_testlib.nbdio import free_port
from conftest import BITBACK, require, run
from test_pull import assert_no_fleecing, only_daemon_files, pull_chain

MiB = 1024 * 1024
SIZE = 32 * MiB
TIMEOUT = 120


def kv(s):
    """A keyval value: ',' doubled."""
    return str(s).replace(",", ",,")


class RemoteDaemon:
    """bitbackd serving disk0 (qcow2) from tmp_path/daemon with QMP and NBD
    on 127.0.0.1 over TLS only.  qmp_sock and nbd_uri() make it usable
    where test_backup_cli's and test_pull's helpers expect a Daemon."""

    def __init__(self, tmp_path, pki, kind="bitbackd"):
        require("qemu-img")
        self.kind = kind
        self.pki = pki
        self.workdir = tmp_path / "daemon"
        self.workdir.mkdir()
        self.fleece = self.workdir / "fleece"
        self.fleece.mkdir()
        img = self.workdir / "disk0.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE)])
        cmds = []
        for m in range(0, SIZE // MiB, 2):
            cmds += ["-c", f"write -P {m % 250 + 1} {m}M 1M"]
        run(["qemu-io", "-f", "qcow2", *cmds, img])
        self.qmp_port = free_port()
        self.nbd_port = free_port()
        self.qmp_sock = f"127.0.0.1:{self.qmp_port}"    # for backup_cmd
        self.d = Daemon(self.workdir, binary=QSD if kind == "qsd" else None)
        self.d.start(
            "--object",
            f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server",
            "--object", f"authz-simple,id=a0,identity={kv(pki['allowed_dn'])}",
            "--chardev", f"socket,id=m0,host=127.0.0.1,port={self.qmp_port},"
                         "server=on,wait=off,tls-creds=tls0,tls-authz=a0",
            "--monitor", "chardev=m0",
            "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--blockdev", "driver=qcow2,node-name=disk0,file=f0",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,"
                            f"addr.port={self.nbd_port},tls-creds=tls0",
            "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,"
                        "writable=on",
            qmp=False)

    def nbd_uri(self, export):
        return (f"nbds://127.0.0.1:{self.nbd_port}/{export}"
                f"?tls-certificates={self.pki['client']}")

    def client_args(self, creds="client"):
        return ["--object", f"tls-creds-x509,id=t0,dir={self.pki[creds]},"
                            "endpoint=client",
                "--tls-creds", "t0", "--nbd-server",
                f"127.0.0.1:{self.nbd_port}", "--fleece-dir", str(self.fleece)]

    def connect_qmp(self):
        """A QMP client over TLS with the allowed certificate (OpenSSL)."""
        ctx = ssl.create_default_context(
            cafile=str(self.pki["client"] / "ca-cert.pem"))
        ctx.load_cert_chain(str(self.pki["client"] / "client-cert.pem"),
                            str(self.pki["client"] / "client-key.pem"))
        return QMPClient(("127.0.0.1", self.qmp_port), tls=ctx)

    def cleanup(self):
        self.d.cleanup()


@pytest.fixture(params=["bitbackd"])
def remote(request, tmp_path, pki):
    r = RemoteDaemon(tmp_path, pki, request.param)
    try:
        yield r
    finally:
        r.cleanup()


def overlays_left(remote):
    """bitbackd removes its overlays; qemu-storage-daemon keeps the one
    file per disk the next run overwrites (docs/qmp.md)."""
    left = sorted(p.name for p in remote.fleece.iterdir())
    if remote.kind == "bitbackd":
        assert left == []
    else:
        assert len(left) == 1 and left[0].startswith("bbf-"), left


@pytest.mark.parametrize("remote", ["bitbackd", "qsd"], indirect=True)
def test_remote_pull_chain_under_load(remote, tmp_path):
    """full, inc, inc over TCP + TLS with a writer running; every point
    restores bit for bit; the daemon's folder gets no repository file and
    (bitbackd) keeps no overlay."""
    repo = tmp_path / "repo"
    before = sorted(os.listdir(remote.workdir))
    pull_chain(remote, repo, tmp_path, remote.client_args(),
               lambda: overlays_left(remote))
    only_daemon_files(remote, before)
    overlays_left(remote)
    assert_no_fleecing(remote)


def backup_fails(remote, tmp_path, *client_args):
    p = subprocess.run(
        [BITBACK, "backup", "--connect", remote.qmp_sock, "--node", "disk0",
         "--repo", tmp_path / "repo-bad", *client_args],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode != 0, p.stdout
    return p.stderr


def test_remote_qmp_refusals(remote, tmp_path, pki):
    """Wrong CA, a refused DN, no TLS: each run fails, bounded, saying
    why; the daemon keeps serving and says why it refused."""
    err = backup_fails(remote, tmp_path, *remote.client_args("wrongca"))
    assert "QMP over TLS" in err and "not trusted" in err, err
    err = backup_fails(remote, tmp_path, *remote.client_args("refused"))
    assert "QMP" in err, err
    assert "authz check" in remote.d.stderr(), remote.d.stderr()
    assert pki["refused_dn"] in remote.d.stderr()
    args = remote.client_args()
    err = backup_fails(remote, tmp_path, *args[4:])      # no --tls-creds
    assert "QMP" in err, err
    # TLS on QMP with a local UNIX socket address is refused, and an
    # explicit --nbd-socket with a TCP daemon too
    err = backup_fails(remote, tmp_path, *args, "--nbd-socket", "/nonexistent")
    assert "--nbd-server" in err, err
    assert remote.d.running
    assert_no_fleecing(remote)
    assert list(remote.fleece.iterdir()) == []


def test_blockdev_create(remote):
    """blockdev-create file and qcow2 as QEMU does them (a job, then
    job-dismiss), and its errors."""
    q = remote.connect_qmp()
    try:
        path = remote.fleece / "x.qcow2"

        def create(job, options):
            q.cmd("blockdev-create", **{"job-id": job, "options": options})
            for _ in range(1000):
                jobs = {j["id"]: j for j in q.cmd("query-jobs")}
                if jobs[job]["status"] == "concluded":
                    q.cmd("job-dismiss", id=job)
                    return jobs[job].get("error")
                q.cmd("query-version")
            raise AssertionError("job did not conclude")

        assert create("c0", {"driver": "file", "filename": str(path),
                             "size": 0}) is None
        q.cmd("blockdev-add", driver="file", **{"node-name": "xf"},
              filename=str(path))
        assert create("c1", {"driver": "qcow2", "file": "xf", "size": 4 * MiB,
                             "cluster-size": 1 << 20}) is None
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": "xq"}, file="xf")
        q.cmd("blockdev-del", **{"node-name": "xq"})
        q.cmd("blockdev-del", **{"node-name": "xf"})
        info = run(["qemu-img", "info", "--output=json", path]).stdout
        assert '"cluster-size": 1048576' in info and '"qcow2"' in info, info
        assert '"virtual-size": 4194304' in info, info
        with pytest.raises(QMPError, match="Cannot find device='nope'"):
            q.cmd("blockdev-create", **{"job-id": "c2", "options": {
                "driver": "qcow2", "file": "nope", "size": MiB}})
        with pytest.raises(QMPError, match="does not support blockdev-create"):
            q.cmd("blockdev-create", **{"job-id": "c2", "options": {
                "driver": "vmdk", "file": "f0", "size": MiB}})
        with pytest.raises(QMPError, match="'size' is missing"):
            q.cmd("blockdev-create", **{"job-id": "c2", "options": {
                "driver": "file", "filename": str(path)}})
        err = create("c3", {"driver": "file", "size": 0,
                            "filename": str(remote.fleece / "no" / "x")})
        assert err, "creating in a missing folder must fail"
        path.unlink()
    finally:
        q.close()


def test_remote_pull_silent_nbd_server_is_bounded(remote, tmp_path):
    """An NBD address that accepts but never greets (a wrong --nbd-server)
    fails the run within the handshake bound, saying so, and the daemon is
    left as before: it keeps serving and no fleecing remains."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)            # connections wait in the backlog, unanswered
    try:
        args = remote.client_args()
        args[args.index("--nbd-server") + 1] = \
            f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        err = backup_fails(remote, tmp_path, *args)
        assert time.monotonic() - t0 < 60
    finally:
        silent.close()
    assert "no complete NBD handshake within 10 seconds" in err, err
    assert remote.d.running
    assert_no_fleecing(remote)
    assert list(remote.fleece.iterdir()) == []
