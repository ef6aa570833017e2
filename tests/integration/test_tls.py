"""TLS on bitbackd's NBD server (issue 19), QEMU-compatible, modelled on
QEMU's iotest 233: certificates made with certtool in the session fixture
pki of conftest.py (bitback_testlib.pki: a CA, a server certificate for 127.0.0.1 and localhost, an allowed and a
refused client certificate, a second CA, PSK files); qemu-img, qemu-io,
nbdinfo and nbdcopy succeed with the right credentials and fail cleanly
(nonzero exit, bounded in time) with none, with the wrong CA, with a
refused DN and as plaintext clients; a plaintext client gets only the
greeting and NBD_REP_ERR_TLS_REQD; the bytes on the wire are not
plaintext (a relay records the TCP stream).  Also --object / object-add /
object-del errors, and the nbd block driver's tls-creds."""
import json
import os
import pathlib
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import require
from bitback_testlib import Daemon
from bitback_testlib.nbdio import free_port
from bitback_testlib.pki import REFUSED_ORG

TIMEOUT = 60                 # every client call is bounded
SIZE = 4 * 1024 * 1024
SECRET = b"bitback-tls-secret-pattern-"     # must never cross the wire in clear

NBD_MAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454f5054
REP_MAGIC = 0x0003e889045565a9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_GO = 1, 2, 3, 5, 7
REP_ACK = 1
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_POLICY = 0x80000002


def sh(cmd, check=True, timeout=TIMEOUT, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed "
                             f"({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def kv(s):
    """A keyval value: ',' doubled."""
    return str(s).replace(",", ",,")


@pytest.fixture
def image(tmp_path):
    img = tmp_path / "disk.raw"
    data = (SECRET * (SIZE // len(SECRET) + 1))[:SIZE]
    img.write_bytes(data)
    return img


def blockdev(img):
    return ("--blockdev",
            f"driver=raw,node-name=disk0,file.driver=file,file.filename={img}")


def export():
    return ("--export", "type=nbd,id=e0,node-name=disk0,name=disk0")


class TLSServer:
    """bitbackd with TLS on TCP 127.0.0.1:port or on a UNIX socket."""

    def __init__(self, tmp_path, image, pki, transport, kind="x509",
                 authz=True, tls=True, priority=None):
        self.d = Daemon(tmp_path / "daemon")
        self.transport = transport
        self.port = free_port()
        self.sock = self.d.sockdir / "tls.sock"
        objs = []
        server = ""
        if tls and kind == "x509":
            objs += ["--object", f"tls-creds-x509,id=tls0,dir={pki['server']},"
                     "endpoint=server,verify-peer=on"]
            server = ",tls-creds=tls0"
        elif tls:
            objs += ["--object",
                     f"tls-creds-psk,id=tls0,dir={pki['psk']},endpoint=server"]
            server = ",tls-creds=tls0"
        if tls and priority:
            objs[-1] += f",priority={priority}"
        if tls and authz:
            ident = pki["allowed_dn"] if kind == "x509" else "qemu"
            objs += ["--object", f"authz-simple,id=a0,identity={kv(ident)}"]
            server += ",tls-authz=a0"
        if transport == "tcp":
            addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}"
        else:
            addr = f"addr.type=unix,addr.path={self.sock}"
        self.d.start(*objs, *blockdev(image), "--nbd-server", addr + server,
                     *export())

    def image_opts(self, tls_creds=True):
        """qemu's --image-opts for the export."""
        if self.transport == "tcp":
            s = f"driver=nbd,host=127.0.0.1,port={self.port},export=disk0"
        else:
            s = (f"driver=nbd,server.type=unix,server.path={self.sock},"
                 "export=disk0,tls-hostname=localhost")
        return s + (",tls-creds=tls0" if tls_creds else "")

    def uri(self, tls=True, user=None, **query):
        """An NBD URI of the export; user: the PSK username."""
        scheme = "nbds" if tls else "nbd"
        at = f"{user}@" if user else ""
        if self.transport == "tcp":
            u = f"{scheme}://{at}127.0.0.1:{self.port}/disk0"
            q = dict(query)
        else:
            u = f"{scheme}+unix://{at}/disk0"
            q = {"socket": str(self.sock), **query}
            if tls:
                q.setdefault("tls-hostname", "localhost")
        if q:
            u += "?" + "&".join(f"{k}={v}" for k, v in q.items())
        return u

    def close(self):
        self.d.cleanup()


@pytest.fixture(params=["tcp", "unix"])
def x509_server(request, tmp_path, image, pki):
    s = TLSServer(tmp_path, image, pki, request.param)
    try:
        yield s
    finally:
        s.close()


def qemu_img_info(server, creds_dir):
    obj = (f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client"
           if creds_dir else None)
    cmd = ["qemu-img", "info", "--output=json"]
    if obj:
        cmd += ["--object", obj]
    return sh(cmd + ["--image-opts", server.image_opts(bool(obj))],
              check=False)


def assert_clean_failure(p):
    assert p.returncode != 0, p.stdout
    assert "Segmentation" not in p.stderr


# ---- success with the right credentials -----------------------------

def test_x509_right_credentials(x509_server, pki, tmp_path):
    require("qemu-img")
    require("nbdinfo")
    require("nbdcopy")
    p = qemu_img_info(x509_server, pki["client"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["virtual-size"] == SIZE
    p = sh(["qemu-io", "--object",
            f"tls-creds-x509,id=tls0,dir={pki['client']},endpoint=client",
            "--image-opts", x509_server.image_opts(), "-r", "-c",
            "read -v 0 27"])
    assert "62 69 74 62 61 63 6b 2d 74 6c 73 2d" in p.stdout   # "bitback-tls-"
    uri = x509_server.uri(**{"tls-certificates": pki["client"]})
    p = sh(["nbdinfo", "--json", uri])
    assert json.loads(p.stdout)["exports"][0]["export-size"] == SIZE
    out = tmp_path / "copy.raw"
    sh(["nbdcopy", uri, out])
    assert out.read_bytes() == (tmp_path / "disk.raw").read_bytes()
    assert x509_server.d.running()


# ---- clean failures -------------------------------------------------

def test_x509_failures(x509_server, pki):
    require("qemu-img")
    require("nbdinfo")
    d = x509_server.d
    # No credentials: a plaintext client of a TLS server.
    assert_clean_failure(qemu_img_info(x509_server, None))
    assert_clean_failure(sh(["nbdinfo", x509_server.uri(tls=False)],
                            check=False))
    # The wrong CA: the client does not trust the server (nor the server
    # the client's certificate).
    p = qemu_img_info(x509_server, pki["wrongca"])
    assert_clean_failure(p)
    assert "certificate" in p.stderr.lower() or "tls" in p.stderr.lower()
    assert_clean_failure(sh(["nbdinfo", x509_server.uri(
        **{"tls-certificates": pki["wrongca"]})], check=False))
    # A DN the authz object does not allow: refused after the handshake.
    p = qemu_img_info(x509_server, pki["refused"])
    assert_clean_failure(p)
    assert_clean_failure(sh(["nbdinfo", x509_server.uri(
        **{"tls-certificates": pki["refused"]})], check=False))
    assert "NBD client refused" in d.stderr()
    assert REFUSED_ORG in d.stderr()
    # No client certificate at all (verify-peer=on requires one).
    assert_clean_failure(sh(["nbdinfo", x509_server.uri(
        **{"tls-certificates": pki["psk"]})], check=False))
    # The server is still fine.
    assert qemu_img_info(x509_server, pki["client"]).returncode == 0
    assert d.running()


def test_psk(tmp_path, image, pki):
    require("nbdinfo")
    require("qemu-img")
    s = TLSServer(tmp_path, image, pki, "tcp", kind="psk")
    try:
        p = sh(["nbdinfo", "--size", s.uri(
            user="qemu", **{"tls-psk-file": pki["psk"] / "keys.psk"})])
        assert int(p.stdout) == SIZE
        p = sh(["qemu-img", "info", "--object",
                f"tls-creds-psk,id=tls0,dir={pki['psk']},endpoint=client,"
                "username=qemu", "--image-opts", s.image_opts()])
        assert "4 MiB" in p.stdout
        assert_clean_failure(sh(["nbdinfo", "--size", s.uri(
            user="qemu", **{"tls-psk-file": pki["psk-wrong"] / "keys.psk"})],
            check=False))
        assert_clean_failure(sh(["nbdinfo", "--size", s.uri(tls=False)],
                                check=False))
        assert s.d.running()
    finally:
        s.close()


def cpu_has_aes():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f
                      if line.startswith("flags")), [])
    return "aes" in flags and "pclmulqdq" in flags


def tls_ciphers(server):
    """The ciphers of the daemon's logged TLS sessions, in order."""
    return re.findall(r"TLS session .*\(([A-Z0-9-]+)\)$",
                      server.d.stderr(), re.M)


@pytest.mark.parametrize("kind,priority,cipher", [
    ("psk", None, "AES-128-GCM"),
    ("x509", None, "AES-256-GCM"),
    ("psk", "NORMAL", "CHACHA20-POLY1305"),
])
def test_default_priority_prefers_aes_gcm(tmp_path, image, pki, kind,
                                          priority, cipher):
    """GnuTLS's NORMAL ranks ChaCha20 above AES-128-GCM, and a TLS 1.3
    PSK session cannot use AES-256-GCM, so NORMAL gives PSK clients
    ChaCha20 (3.5x the CPU per byte here).  Where the CPU has AES
    instructions the default ranks ChaCha20 last and the server chooses:
    libnbd's and QEMU's clients, which offer NORMAL's order, get AES-GCM.
    A priority the user sets (priority=NORMAL) is used as given."""
    require("nbdinfo")
    require("qemu-img")
    if not cpu_has_aes():
        pytest.skip("the default keeps NORMAL's order without AES-NI")
    s = TLSServer(tmp_path, image, pki, "tcp", kind=kind, authz=False,
                  priority=priority)
    try:
        if kind == "psk":
            uri = s.uri(user="qemu",
                        **{"tls-psk-file": pki["psk"] / "keys.psk"})
            obj = (f"tls-creds-psk,id=tls0,dir={pki['psk']},"
                   "endpoint=client,username=qemu")
        else:
            uri = s.uri(**{"tls-certificates": pki["client"]})
            obj = f"tls-creds-x509,id=tls0,dir={pki['client']},endpoint=client"
        assert int(sh(["nbdinfo", "--size", uri]).stdout) == SIZE
        sh(["qemu-img", "info", "--object", obj, "--image-opts",
            s.image_opts()])
        deadline = time.monotonic() + 10
        while len(tls_ciphers(s)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tls_ciphers(s) == [cipher, cipher], s.d.stderr()
    finally:
        s.close()


def test_psk_authz_refuses_username(tmp_path, image, pki):
    """authz-list on a PSK username: the default policy denies 'qemu'."""
    require("nbdinfo")
    d = Daemon(tmp_path / "daemon")
    try:
        port = free_port()
        d.start("--object", f"tls-creds-psk,id=tls0,dir={pki['psk']},"
                "endpoint=server",
                "--object", "authz-list,id=a0,policy=deny,"
                "rules.0.match=admin*,rules.0.policy=allow,rules.0.format=glob",
                *blockdev(image), "--nbd-server",
                f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},"
                "tls-creds=tls0,tls-authz=a0", *export())
        p = sh(["nbdinfo", "--size",
                f"nbds://qemu@127.0.0.1:{port}/disk0?tls-psk-file="
                f"{pki['psk'] / 'keys.psk'}"], check=False)
        assert_clean_failure(p)
        assert "TLS PSK authz check for qemu is denied" in d.stderr()
    finally:
        d.cleanup()


# ---- the wire --------------------------------------------------------

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def send_opt(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def recv_reply(s):
    magic, opt, typ, ln = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REP_MAGIC
    return opt, typ, recv_exact(s, ln)


def raw_client(server):
    if server.transport == "tcp":
        s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(TIMEOUT)
        s.connect(str(server.sock))
    magic, ihave, _ = struct.unpack(">QQH", recv_exact(s, 18))
    assert (magic, ihave) == (NBD_MAGIC, IHAVEOPT)
    s.sendall(struct.pack(">I", 3))
    return s


def test_plaintext_client_gets_only_tls_reqd(x509_server):
    """Every option before STARTTLS is refused (no downgrade), ABORT is
    answered, EXPORT_NAME closes the connection."""
    with raw_client(x509_server) as s:
        for opt, data in ((OPT_LIST, b""),
                          (OPT_GO, struct.pack(">I", 5) + b"disk0" +
                           struct.pack(">H", 0)),
                          (8, b""), (10, b"\0" * 8)):
            send_opt(s, opt, data)
            ropt, typ, _ = recv_reply(s)
            assert (ropt, typ) == (opt, REP_ERR_TLS_REQD)
        send_opt(s, OPT_ABORT)
        assert recv_reply(s)[:2] == (OPT_ABORT, REP_ACK)
    with raw_client(x509_server) as s:
        send_opt(s, OPT_EXPORT_NAME, b"disk0")
        assert s.recv(1) == b""
    with raw_client(x509_server) as s:
        # STARTTLS is acknowledged; garbage instead of a TLS hello ends it.
        send_opt(s, OPT_STARTTLS)
        assert recv_reply(s)[:2] == (OPT_STARTTLS, REP_ACK)
        s.sendall(b"\0" * 64)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass    # closed with our garbage unread
    assert x509_server.d.running()


def test_starttls_refused_without_tls(tmp_path, image):
    d = Daemon(tmp_path / "daemon")
    try:
        port = free_port()
        d.start(*blockdev(image), "--nbd-server",
                f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                *export())

        class S:
            transport = "tcp"
        srv = S()
        srv.port = port
        with raw_client(srv) as s:
            send_opt(s, OPT_STARTTLS)
            assert recv_reply(s)[:2] == (OPT_STARTTLS, REP_ERR_POLICY)
    finally:
        d.cleanup()


class Relay:
    """A TCP relay on 127.0.0.1 that records both directions."""

    def __init__(self, port):
        self.target = port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.lsock.settimeout(TIMEOUT)
        self.port = self.lsock.getsockname()[1]
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.threads = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _pump(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.captured += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self):
        try:
            c = self.lsock.accept()[0]
        except OSError:
            return
        u = socket.create_connection(("127.0.0.1", self.target),
                                     timeout=TIMEOUT)
        for a, b in ((c, u), (u, c)):
            t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
            t.start()
            self.threads.append(t)

    def close(self):
        self.lsock.close()
        for t in self.threads:
            t.join(TIMEOUT)


def read_through_relay(port, creds_dir):
    relay = Relay(port)
    try:
        cmd = ["qemu-io"]
        opts = f"driver=nbd,host=127.0.0.1,port={relay.port},export=disk0"
        if creds_dir:
            cmd += ["--object",
                    f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client"]
            opts += ",tls-creds=tls0"
        p = sh(cmd + ["-r", "--image-opts", opts, "-c",
                      f"read -P 0x62 0 1", "-c", "read 0 1M"])
        assert "read 1048576/1048576" in p.stdout
    finally:
        relay.close()
    return bytes(relay.captured)


def test_wire_is_not_plaintext(tmp_path, image, pki):
    require("qemu-io")
    s = TLSServer(tmp_path / "tls", image, pki, "tcp")
    try:
        cap = read_through_relay(s.port, pki["client"])
        assert len(cap) > 1024 * 1024
        assert SECRET not in cap
        assert b"disk0" not in cap     # even the export name is hidden
    finally:
        s.close()
    # Control: the same read from a plaintext server shows the pattern.
    p = TLSServer(tmp_path / "plain", image, pki, "tcp", tls=False)
    try:
        cap = read_through_relay(p.port, None)
        assert SECRET in cap
    finally:
        p.close()


# ---- objects over QMP and on the command line -------------------------

def test_qmp_object_add_and_server(tmp_path, image, pki):
    require("nbdinfo")
    d = Daemon(tmp_path / "daemon")
    try:
        d.start(*blockdev(image))
        q = d.qmp
        err = q.error("object-add", **{"qom-type": "tls-creds-x509",
                                       "id": "bad", "dir": str(tmp_path / "no"),
                                       "endpoint": "server"})
        assert "Unable to access credentials" in err.desc
        err = q.error("object-add", **{"qom-type": "tls-creds-x509",
                                       "id": "bad", "dir": str(pki["server"]),
                                       "endpoint": "sideways"})
        assert "endpoint" in err.desc
        err = q.error("object-add", **{"qom-type": "tls-creds-x509",
                                       "id": "bad", "dir": str(pki["client"]),
                                       "endpoint": "server"})
        assert "server-cert.pem" in err.desc
        q.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                               "dir": str(pki["server"]),
                               "endpoint": "server", "verify-peer": True})
        q.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "cli0",
                               "dir": str(pki["client"]),
                               "endpoint": "client"})
        q.cmd("object-add", **{"qom-type": "authz-simple", "id": "a0",
                               "identity": pki["allowed_dn"]})
        err = q.error("object-add", **{"qom-type": "authz-simple", "id": "a0",
                                       "identity": "x"})
        assert "duplicate" in err.desc
        port = free_port()
        addr = {"type": "inet", "data": {"host": "127.0.0.1",
                                         "port": str(port)}}
        err = q.error("nbd-server-start", addr=addr, **{"tls-creds": "cli0"})
        assert "server endpoint" in err.desc
        err = q.error("nbd-server-start", addr=addr, **{"tls-creds": "a0"})
        assert "not TLS credentials" in err.desc
        err = q.error("nbd-server-start", addr=addr, **{"tls-creds": "nope"})
        assert "No TLS credentials with id 'nope'" in err.desc
        q.cmd("nbd-server-start", addr=addr,
              **{"tls-creds": "tls0", "tls-authz": "a0"})
        q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"})
        for obj in ("tls0", "a0"):
            err = q.error("object-del", id=obj)
            assert "in use" in err.desc
        p = sh(["nbdinfo", "--size", f"nbds://127.0.0.1:{port}/disk0?"
                f"tls-certificates={pki['client']}"])
        assert int(p.stdout) == SIZE
        assert_clean_failure(sh(["nbdinfo", "--size",
                                 f"nbd://127.0.0.1:{port}/disk0"], check=False))
        q.cmd("nbd-server-stop")
        for obj in ("tls0", "a0", "cli0"):
            q.cmd("object-del", id=obj)
        assert "not found" in q.error("object-del", id="tls0").desc
        assert d.quit() == 0
    finally:
        d.cleanup()


def test_object_option_errors(tmp_path, pki, bitbackd_bin):
    for obj, msg in (
            ("tls-creds-x509,id=t,endpoint=server", "Missing 'dir'"),
            (f"tls-creds-x509,id=t,dir={tmp_path},endpoint=server",
             "Unable to access credentials"),
            (f"tls-creds-x509,id=t,dir={pki['server']},endpoint=x", "endpoint"),
            (f"tls-creds-x509,id=t,dir={pki['server']},endpoint=server,x=1",
             "Property 'tls-creds-x509.x' not found"),
            (f"tls-creds-psk,id=t,dir={pki['server']},endpoint=server",
             "keys.psk"),
            ("authz-simple,id=a", "identity"),
            ("secret,id=s", "Either 'file' or 'data' must be provided"),
            ("memory-backend-ram,id=m,size=1M", "qom-type")):
        p = sh([bitbackd_bin, "--object", obj], check=False)
        assert p.returncode == 1, obj
        assert msg in p.stderr, (obj, p.stderr)
    # A bad certificate file is refused at creation.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("ca-cert.pem", "server-key.pem"):
        (bad / f).write_bytes((pki["server"] / f).read_bytes())
    (bad / "server-cert.pem").write_text("not a certificate\n")
    p = sh([bitbackd_bin, "--object",
            f"tls-creds-x509,id=t,dir={bad},endpoint=server"], check=False)
    assert p.returncode == 1 and "Cannot load certificate" in p.stderr


# ---- the nbd block driver as a TLS client -----------------------------

@pytest.fixture(params=["tcp", "unix"])
def qemu_nbd_tls(request, tmp_path, image, pki):
    """qemu-nbd serving the image read-only with TLS (verify-peer=on):
    (server address for blockdev-add, tls-hostname or None)."""
    require("qemu-nbd")
    sock = tmp_path / "qn.sock"
    pidfile = tmp_path / "qn.pid"
    cmd = ["qemu-nbd", "--object",
           f"tls-creds-x509,id=tls0,endpoint=server,dir={pki['server']}",
           "--tls-creds", "tls0", "-f", "raw", "-r", "-x", "disk0",
           "--persistent", "--shared=8", "--pid-file", str(pidfile)]
    if request.param == "tcp":
        port = free_port()
        cmd += ["-b", "127.0.0.1", "-p", str(port)]
        server = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
    else:
        cmd += ["-k", str(sock)]
        server = {"type": "unix", "path": str(sock)}
    p = subprocess.Popen(cmd + [str(image)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not pidfile.exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "qemu-nbd not ready"
            time.sleep(0.02)
        yield server
    finally:
        p.kill()
        p.wait()


def test_nbd_driver_tls_client(tmp_path, image, pki, qemu_nbd_tls):
    """bitbackd's nbd node reads a qemu-nbd TLS export with tls-creds, and
    fails cleanly without credentials or with the wrong CA."""
    require("nbdcopy")
    d = Daemon(tmp_path / "daemon")
    try:
        d.start("--object",
                f"tls-creds-x509,id=cli0,dir={pki['client']},endpoint=client",
                "--object",
                f"tls-creds-x509,id=wrong,dir={pki['wrongca']},endpoint=client",
                "--object", f"tls-creds-x509,id=srv0,dir={pki['server']},"
                "endpoint=server", nbd=True)
        q = d.qmp
        node = {"driver": "nbd", "server": qemu_nbd_tls, "export": "disk0",
                "read-only": True}
        err = q.error("blockdev-add", **node, **{"node-name": "n1"})
        assert "Failed to connect" in err.desc
        err = q.error("blockdev-add", **node,
                      **{"node-name": "n1", "tls-creds": "wrong"})
        assert "Failed to connect" in err.desc
        err = q.error("blockdev-add", **node,
                      **{"node-name": "n1", "tls-creds": "srv0"})
        assert "client endpoint" in err.desc
        q.cmd("blockdev-add", **node, **{"node-name": "n0", "tls-creds": "cli0"})
        assert "in use" in q.error("object-del", id="cli0").desc
        q.cmd("block-export-add", type="nbd", id="e0",
              **{"node-name": "n0", "name": "n0"})
        out = tmp_path / "copy.raw"
        sh(["nbdcopy", d.nbd_uri("n0"), out])
        assert out.read_bytes() == image.read_bytes()
        q.cmd("block-export-del", id="e0")
        d.qmp.get_event("BLOCK_EXPORT_DELETED")
        q.cmd("blockdev-del", **{"node-name": "n0"})
        q.cmd("object-del", id="cli0")
        assert d.quit() == 0
    finally:
        d.cleanup()
