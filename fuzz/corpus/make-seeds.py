#!/usr/bin/python3
"""Regenerate the seed corpora of the fuzz targets that replay real
traffic or real files (docs/fuzzing.md): fuzz-nbd, fuzz-qmp-monitor and
fuzz-write-intent.

    BITBACK_BUILD=build /usr/bin/python3 fuzz/corpus/make-seeds.py [nbd|qmp|wil]...

A real bitbackd serves a 1 MiB raw image with dirty bitmap "b", exported
writable as "disk0" with qemu:dirty-bitmap:b (what the fuzz-nbd harness
serves).  Real clients -- libnbd (python3-libnbd, nbdinfo, nbdcopy) and
QEMU's NBD client (qemu-io, qemu-img) for NBD; bitback_testlib's QMPClient
for QMP -- talk to it through a recording proxy on a UNIX socket, which
keeps what each client sent (client to server only): one seed per
connection, fuzz/corpus/TARGET/CLIENT-N.  Seeds over 64 KiB are cut.

fuzz-write-intent: real logs left by a bitbackd killed with SIGKILL while
serving a 64 MiB qbm image with persistent bitmap "b" (granularity 64 KiB,
what the harness's image has: 16 words of bits, so snapshots hold several
runs), crash-safe-region-size 64 KiB, written
through qemu-io over NBD: one killed before any snapshot of the writes,
one after a flush (which takes a snapshot).  A log does not depend on its
image's format: the harness's image is a qcow2 in a memfd with the same
size and bitmap, and recovers from these logs.
"""
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests" / "lib"))
from bitback_testlib import Daemon  # noqa: E402

MAX_SEED = 64 * 1024 - 1
TIMEOUT = 60


class RecordingProxy:
    """Listen on path; relay each connection to target, recording the
    bytes the client sent.  records: one bytes object per connection."""

    def __init__(self, path, target):
        self.path, self.target = str(path), str(target)
        self.records = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stop = False
        self.threads = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            t = threading.Thread(target=self._relay, args=(c,), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _pump(src, dst, rec):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                if rec is not None:
                    rec.append(b)
                dst.sendall(b)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _relay(self, c):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        c.settimeout(TIMEOUT)
        s.connect(self.target)
        rec = []
        back = threading.Thread(target=self._pump, args=(s, c, None))
        back.start()
        self._pump(c, s, rec)
        back.join(TIMEOUT)
        c.close()
        s.close()
        with self.lock:
            self.records.append(b"".join(rec))

    def take(self):
        """Wait for the relays so far, return and forget their records."""
        for t in self.threads:
            t.join(TIMEOUT)
        self.threads = []
        with self.lock:
            r, self.records = self.records, []
        return r

    def close(self):
        self.stop = True
        self.thread.join(TIMEOUT)
        self.sock.close()


def save(target, name, records):
    out = HERE / target
    out.mkdir(exist_ok=True)
    for i, r in enumerate(records):
        if r:
            (out / f"{name}-{i}").write_bytes(r[:MAX_SEED])


def run(*argv):
    subprocess.run([str(a) for a in argv], check=True, timeout=TIMEOUT,
                   stdout=subprocess.DEVNULL)


def nbd_seeds(work):
    import nbd
    img = work / "disk.raw"
    with open(img, "wb") as f:
        f.write(b"\xa5" * (512 * 1024))
        f.truncate(1 << 20)
    with Daemon(work) as d:
        d.start("--blockdev", "driver=raw,node-name=disk0,"
                f"file.driver=file,file.filename={img}", nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b")
        d.qmp.cmd("block-export-add", type="nbd", id="e0",
                  **{"node-name": "disk0"}, name="disk0", writable=True,
                  bitmaps=["b"])
        sock = work / "proxy.sock"
        p = RecordingProxy(sock, d.nbd_sock)
        uri = f"nbd+unix:///disk0?socket={sock}"
        try:
            # libnbd: every request type, structured replies, both contexts.
            h = nbd.NBD()
            h.add_meta_context("base:allocation")
            h.add_meta_context("qemu:dirty-bitmap:b")
            h.connect_uri(uri)
            h.pwrite(b"\x11" * 4096, 65536)
            h.pread(8192, 0)
            h.zero(4096, 131072)
            h.trim(4096, 196608)
            h.set_strict_mode(0)     # send CACHE although not advertised
            try:
                h.cache(4096, 0)
            except nbd.Error:
                pass
            h.flush()
            h.block_status(1 << 20, 0, lambda *a: 0)
            h.pread(512, (1 << 20) - 512)
            h.shutdown()
            save("fuzz-nbd", "libnbd-ops", p.take())
            # libnbd with simple replies, no contexts, old-style names.
            h = nbd.NBD()
            h.set_request_structured_replies(False)
            h.connect_uri(uri)
            h.pwrite(b"\x22" * 512, 0, nbd.CMD_FLAG_FUA)
            h.pread(512, 0)
            h.shutdown()
            save("fuzz-nbd", "libnbd-simple", p.take())
            # Handshake only: LIST, INFO, GO with meta contexts, ABORT.
            run("nbdinfo", "--list", uri)
            run("nbdinfo", "--map=qemu:dirty-bitmap:b", uri)
            run("nbdinfo", "--size", uri)
            save("fuzz-nbd", "nbdinfo", p.take())
            run("nbdcopy", uri, "null:")
            save("fuzz-nbd", "nbdcopy", p.take())
            # QEMU's client.
            run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 16k",
                "-c", "read 0 16k", "-c", "write -z 128k 64k",
                "-c", "discard 256k 64k", "-c", "flush", uri)
            run("qemu-img", "map", "--output=json", "--image-opts",
                f"driver=nbd,export=disk0,server.type=unix,"
                f"server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:b")
            run("qemu-img", "info", uri)
            save("fuzz-nbd", "qemu", p.take())
        finally:
            p.close()
        d.quit()


def qmp_seeds(work):
    from bitback_testlib import QMPClient
    with Daemon(work) as d:
        d.start("--blockdev", "driver=raw,node-name=n0,"
                f"file.driver=file,file.filename={work / 'q.raw'}")
        sock = work / "qmp-proxy.sock"
        p = RecordingProxy(sock, d.qmp_sock)
        try:
            q = QMPClient(sock)
            q.cmd("query-version")
            q.cmd("query-commands")
            q.cmd("query-named-block-nodes")
            q.cmd("block-dirty-bitmap-add", node="n0", name="b0")
            q.cmd("query-block-exports")
            q.error("no-such-command")
            q.send_raw(b'{"execute":"query-status","id":7}\n'
                       b'{"execute":"query-jobs"}')
            q.recv_reply()
            q.recv_reply()
            q.send_raw(b'{"exec-oob":"query-version","id":"o1"}')
            q.recv_reply()
            # One request split across writes; a parse error mid-line.
            q.send_raw(b'{"execute": "query-ver')
            q.send_raw(b'sion", "id": 8}\r\n')
            q.recv_reply()
            q.send_raw(b'{"execute": ] junk\n{"execute":"query-version"}\n')
            q.recv_reply()
            q.recv_reply()
            q.close()
            q = QMPClient(sock, negotiate=False)
            q.send_raw(b'{"execute":"qmp_capabilities",'
                       b'"arguments":{"enable":["oob"]}}')
            q.recv_reply()
            q.send_raw(b'{"exec-oob":"query-version","id":"o2"}')
            q.recv_reply()
            q.cmd("qmp_capabilities")
            q.cmd("quit")
            q.close()
            save("fuzz-qmp-monitor", "qmpclient", p.take())
        finally:
            p.close()
        assert d.wait() == 0


def wil_seeds(work):
    import time
    bitback = pathlib.Path(os.environ.get("BITBACK_BUILD", "build")).resolve() / "bitback"
    for name, cmds in (("killed-after-writes",
                        ["write -P 0x11 0 64k", "write -P 0x22 1M 128k",
                         "write -P 0x44 40M 4M"]),
                       ("killed-after-flush",
                        ["write -P 0x11 64k 64k", "write -P 0x22 8M 8M",
                         "write -P 0x44 60M 64k", "flush",
                         "write -P 0x33 3M 64k"])):
        img = work / "disk.qbm"
        for f in work.glob("disk.*"):
            f.unlink()
        run(bitback, "img", "create", "-f", "qbm", img, "64M")
        with Daemon(work / "d") as d:
            d.start("--blockdev", "driver=qbm,node-name=disk0,"
                    f"file.driver=file,file.filename={img},"
                    "crash-safe-region-size=65536",
                    "--export", "type=nbd,id=e0,node-name=disk0,writable=on",
                    nbd=True)
            d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b",
                      granularity=65536, persistent=True)
            args = ["qemu-io", "-f", "raw"]
            for c in cmds:
                args += ["-c", c]
            run(*args, d.nbd_uri("disk0"))
            if "flush" in cmds:
                time.sleep(1.5)    # the snapshot a flush asks for
            d.kill()
        wil = work / "disk.qbm.wil"
        save("fuzz-write-intent", name, [wil.read_bytes()])


def main():
    which = sys.argv[1:] or ["nbd", "qmp", "wil"]
    with tempfile.TemporaryDirectory(prefix="seeds-") as t:
        work = pathlib.Path(t)
        (work / "q.raw").write_bytes(b"\0" * 65536)
        if "nbd" in which:
            nbd_seeds(work)
        if "qmp" in which:
            qmp_seeds(work)
        if "wil" in which:
            wil_seeds(work)


if __name__ == "__main__":
    main()
