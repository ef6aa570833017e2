"""bitbackd's log lines, query-blockstats and the Prometheus endpoint.

Logs: every class of event writes its line to stderr (start and stop,
NBD server and exports, NBD clients with their address and export, clean
and abnormal disconnects, job state changes, QMP command failures, I/O
errors of a node, recovery of a crash-safe bitmap); the journal's "<N>"
prefix when JOURNAL_STREAM names stderr; --log-level filters.

query-blockstats: the reply has qemu-storage-daemon's shape for the same
graph (the same keys at every level), and its counters move exactly with
known I/O made by qemu-io over NBD.

Metrics: GET /metrics (curl) parses with prometheus_client's own parser;
the counters move with I/O, the export's client gauge counts a libnbd
connection, and the dirty-bitmap gauge equals query-block's count and
what nbdinfo --map reports.
"""
import json
import os
import re
import socket
import struct
import subprocess
import time

import pytest

from bitback_testlib import BITBACKD, QSD, Daemon
from bitback_testlib.nbdio import free_port, nbd_handshake
from conftest import dirty_extents, require, run

K = 1024
MiB = 1024 * K
SIZE = 16 * MiB
EXPORT = "type=nbd,id=e0,node-name=d0,name=d0,writable=on"


def qcow2(tmp_path, name="d.qcow2"):
    img = tmp_path / name
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE)])
    return img


def blockdev(img):
    return ("driver=qcow2,node-name=d0,file.driver=file,"
            f"file.filename={img},file.node-name=f0")


def over_blkdebug(driver, img):
    """--blockdev JSON: node d0 of `driver` on blkdebug node dbg over img."""
    return json.dumps({"driver": driver, "node-name": "d0",
                       "file": {"driver": "blkdebug", "node-name": "dbg",
                                "image": {"driver": "file",
                                          "filename": str(img)}}})


def qemu_io(uri, *cmds, check=True):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    return run(argv + [uri], check=check)


def wait_for(pred, what, timeout=10):
    """Poll pred() until true (bounded in time)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_log(d, pattern, timeout=10):
    """The first stderr line of d matching the regex (waits for it)."""
    rx = re.compile(pattern)
    found = []

    def seen():
        found[:] = [l for l in d.stderr().splitlines() if rx.search(l)]
        return bool(found)
    try:
        wait_for(seen, pattern, timeout)
    except AssertionError:
        raise AssertionError(f"no log line /{pattern}/ in:\n{d.stderr()}")
    return found[0]


# ---- logs -------------------------------------------------------------

def test_lifecycle_and_client_logs(tmp_path):
    """Start, NBD server, export, a client's connect and disconnect with
    the socket address and export name, a failed QMP command, the stop."""
    require("qemu-io")
    img = qcow2(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", blockdev(img), "--export", EXPORT, nbd=True)
        started = wait_log(d, r"^bitbackd: notice: bitbackd \S+ started")
        assert f"(pid {d.pid})" in started, started
        wait_log(d, r"NBD server listening on unix:" + re.escape(str(d.nbd_sock)))
        wait_log(d, r"export 'e0' added: NBD name 'd0', node 'd0', writable")

        qemu_io(d.nbd_uri("d0"), "write 0 64k")
        peer = re.escape(f"unix:{d.nbd_sock}")
        wait_log(d, rf"^bitbackd: info: NBD client {peer} connected$")
        wait_log(d, rf"NBD client {peer} opened export 'd0' \(writable\)")
        wait_log(d, rf"^bitbackd: info: NBD client {peer} \(export 'd0'\) "
                    r"disconnected$")

        err = d.qmp.error("block-dirty-bitmap-add", node="nosuch", name="b")
        line = wait_log(d, r"QMP command 'block-dirty-bitmap-add' failed")
        assert line.startswith("bitbackd: warning: ") and err.desc in line, line

        d.qmp.cmd("block-export-del", id="e0")
        wait_log(d, r"export 'e0' removed \(NBD name 'd0'\)")
        assert d.terminate() == 0
    log = d.stderr()
    assert "bitbackd: notice: shutting down on Terminated" in log, log
    assert "bitbackd: info: NBD server stopped" in log, log
    assert log.rstrip().endswith("bitbackd: notice: bitbackd stopped cleanly"), log


def test_tcp_client_address(tmp_path):
    """A TCP client is logged as IP:PORT, the server with its address."""
    require("qemu-io")
    img = qcow2(tmp_path)
    port = free_port()
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", blockdev(img), "--nbd-server",
                f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                "--export", EXPORT)
        wait_log(d, rf"NBD server listening on 127\.0\.0\.1:{port}$")
        qemu_io(f"nbd://127.0.0.1:{port}/d0", "read 0 4k")
        wait_log(d, r"NBD client 127\.0\.0\.1:\d+ connected$")
        wait_log(d, r"NBD client 127\.0\.0\.1:\d+ \(export 'd0'\) disconnected$")
        assert d.quit() == 0


def test_stop_with_errors(tmp_path):
    """A bitmap that cannot be stored at the stop: the node's close error
    at err, then "stopped with errors", and exit status 1."""
    require("qemu-io")
    img = qcow2(tmp_path)
    run(["qemu-img", "bitmap", "--add", img, "b0"])
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", over_blkdebug("qcow2", img), "--export", EXPORT, nbd=True)
        qemu_io(d.nbd_uri("d0"), "write 0 64k")
        d.qmp.cmd("x-blkdebug-inject", **{"node-name": "dbg"}, event="write",
                  errno=28)
        assert d.quit() == 1
    lines = d.stderr().splitlines()
    assert any(l.startswith("bitbackd: err: closing node 'd0': ") and
               "No space left on device" in l for l in lines), lines
    assert lines[-1] == "bitbackd: err: bitbackd stopped with errors " \
        "(exit status 1)", lines


def test_abnormal_disconnects(tmp_path):
    """A protocol error and a client that vanishes without NBD_CMD_DISC
    are logged with their reason; the daemon keeps serving."""
    img = qcow2(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", blockdev(img), "--export", EXPORT, nbd=True)
        s = nbd_handshake(d.nbd_sock, "d0")
        s.sendall(b"\xde\xad\xbe\xef" + bytes(24))      # bad request magic
        line = wait_log(d, r"disconnected: protocol error")
        assert line.startswith("bitbackd: warning: NBD client unix:"), line
        assert "(export 'd0')" in line and "bad request magic 0xdeadbeef" in line
        s.close()

        s = nbd_handshake(d.nbd_sock, "d0")
        s.close()
        line = wait_log(d, r"closed the connection without NBD_CMD_DISC")
        assert line.startswith("bitbackd: notice: "), line
        assert d.running()
        assert d.quit() == 0


def test_refused_and_stalled_clients(tmp_path):
    """Over max-connections: refused at warning; a client that never
    finishes the handshake: cut off at its deadline, at warning."""
    img = qcow2(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", blockdev(img), "--nbd-server",
                f"addr.type=unix,addr.path={d.nbd_sock},max-connections=1,"
                "handshake-max-seconds=1", "--export", EXPORT)
        idle = socket.socket(socket.AF_UNIX)
        extra = socket.socket(socket.AF_UNIX)
        try:
            idle.connect(str(d.nbd_sock))
            wait_log(d, r"NBD client unix:\S+ connected$")
            extra.connect(str(d.nbd_sock))
            line = wait_log(d, r"refused: already 1 connections")
            assert line.startswith("bitbackd: warning: NBD client unix:"), line
            line = wait_log(d, r"disconnected during the handshake: handshake "
                               r"not finished within handshake-max-seconds")
            assert line.startswith("bitbackd: warning: "), line
        finally:
            idle.close()
            extra.close()
        assert d.quit() == 0


def test_job_state_logs(tmp_path):
    """Job state changes (id, type, old -> new) and a failed job's error."""
    img = qcow2(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", blockdev(img), "--export", EXPORT, nbd=True)
        q = d.qmp
        qemu_io(d.nbd_uri("d0"), "write -P 1 0 1M")
        for name in ("t1", "t2"):
            run(["qemu-img", "create", "-q", "-f", "raw",
                 tmp_path / f"{name}.raw", str(SIZE)])
        q.cmd("blockdev-add", driver="raw", **{"node-name": "t1"},
              file={"driver": "file", "filename": str(tmp_path / "t1.raw")})
        q.cmd("blockdev-backup", **{"job-id": "j1"}, device="d0", target="t1",
              sync="full")
        wait_log(d, r"^bitbackd: info: job 'j1' \(backup\): created -> running$")
        wait_log(d, r"job 'j1' \(backup\): \w+ -> concluded$")

        # A target whose writes fail (blkdebug, EIO).
        q.cmd("blockdev-add", driver="raw", **{"node-name": "t2"},
              file={"driver": "blkdebug", "node-name": "dbg",
                    "image": {"driver": "file",
                              "filename": str(tmp_path / "t2.raw")},
                    "inject-error": [{"event": "write", "errno": 5}]})
        q.cmd("blockdev-backup", **{"job-id": "j2"}, device="d0", target="t2",
              sync="full")
        line = wait_log(d, r"job 'j2' \(backup\): running -> \w+: ")
        assert line.startswith("bitbackd: warning: "), line
        assert "Input/output error" in line, line
        # The target's I/O error, with node, offset, length and errno.
        wait_log(d, r"^bitbackd: warning: I/O error on node '(dbg|t2)': write "
                    r"offset \d+ length \d+: Input/output error \(errno 5\)$")
        assert d.quit() == 0


def test_io_error_logged_and_counted(tmp_path):
    """A read that fails on the node is logged (node, offset, length,
    errno) and counted in failed_rd_operations."""
    require("qemu-io")
    raw = tmp_path / "d.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", raw, str(SIZE)])
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", over_blkdebug("raw", raw), "--export", EXPORT, nbd=True)
        d.qmp.cmd("x-blkdebug-inject", **{"node-name": "dbg"}, event="read",
                  errno=5, once=True)
        p = qemu_io(d.nbd_uri("d0"), "read 65536 4096", check=False)
        assert "Input/output error" in p.stdout + p.stderr, p.stdout + p.stderr
        wait_log(d, r"^bitbackd: warning: I/O error on node 'dbg': read "
                    r"offset 65536 length 4096: Input/output error \(errno 5\)$")
        stats = {e["node-name"]: e["stats"] for e in
                 d.qmp.cmd("query-blockstats", **{"query-nodes": True})}
        assert stats["dbg"]["failed_rd_operations"] == 1, stats
        assert stats["d0"]["failed_rd_operations"] == 1, stats
        assert d.quit() == 0


def test_recovery_logged(tmp_path):
    """After a kill -9, the crash-safe bitmap's recovery from the
    write-intent log is logged with its bitmap and node."""
    require("qemu-io")
    img = qcow2(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", blockdev(img), "--export", EXPORT, nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0",
                  persistent=True)
        qemu_io(d.nbd_uri("d0"), "write 1M 64k")
        d.kill()
        d.restart("--blockdev", blockdev(img), nbd=True)
        line = wait_log(d, r"bitmap 'b0' on node 'd0' recovered after an "
                           r"unclean stop")
        assert line.startswith("bitbackd: notice: "), line
        assert d.qmp.bitmap("d0", "b0")["recovered"] is True
        assert d.quit() == 0


def test_journal_stream_prefix(tmp_path):
    """With JOURNAL_STREAM naming stderr, lines carry "<N>" levels instead
    of the readable prefix; a JOURNAL_STREAM for another file is ignored."""
    img = qcow2(tmp_path)
    for matching in (True, False):
        d = Daemon(tmp_path / f"d{int(matching)}")
        d.stderr_path.write_bytes(b"")     # Daemon reopens it in place
        st = os.stat(d.stderr_path)
        ino = st.st_ino if matching else st.st_ino + 1
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{ino}")
        with d:
            d.start("--blockdev", blockdev(img), "--export", EXPORT,
                    nbd=True, env=env)
            d.qmp.error("nosuch-command")
            assert d.quit() == 0
        lines = d.stderr().splitlines()
        assert os.stat(d.stderr_path).st_ino == st.st_ino
        if matching:
            assert "<5>bitbackd " in lines[-1] or any(
                l.startswith("<5>bitbackd ") for l in lines), lines
            assert "<6>export 'e0' added: NBD name 'd0', node 'd0', writable" \
                in lines, lines
            assert any(l.startswith("<4>QMP command 'nosuch-command' failed")
                       for l in lines), lines
            assert not any(l.startswith("bitbackd:") for l in lines), lines
        else:
            assert "bitbackd: info: export 'e0' added: NBD name 'd0', " \
                "node 'd0', writable" in lines, lines
            assert not any(l.startswith("<") for l in lines), lines


def test_log_level(tmp_path):
    """--log-level warning drops info and notice lines but keeps warnings,
    even for events of options given before it; err drops warnings too."""
    img = qcow2(tmp_path)
    for level, warn in (("warning", True), ("err", False)):
        with Daemon(tmp_path / level) as d:
            d.start("--blockdev", blockdev(img), "--export", EXPORT,
                    "--log-level", level, nbd=True)
            d.qmp.error("nosuch-command")
            assert d.quit() == 0
        log = d.stderr()
        assert "export 'e0' added" not in log, log
        assert "started" not in log and "stopped cleanly" not in log, log
        assert ("QMP command 'nosuch-command' failed" in log) == warn, log
    with Daemon(tmp_path / "debug") as d:
        d.start("--blockdev", blockdev(img), "--log-level=debug", nbd=True)
        assert d.quit() == 0
        assert "stopped cleanly" in d.stderr()


@pytest.mark.parametrize("arg", ["loud", "", "INFO", "6"])
def test_bad_log_level(tmp_path, arg):
    p = subprocess.run([BITBACKD, "--log-level", arg],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p
    assert p.stderr == (f"bitbackd: --log-level: unknown log level '{arg}' "
                        "(expected err, warning, notice, info or debug)\n"), \
        p.stderr


# ---- query-blockstats ---------------------------------------------------

def keys_tree(v):
    """The keys of a JSON value at every level (values dropped)."""
    if isinstance(v, dict):
        return {k: keys_tree(x) for k, x in v.items() if k != "idle_time_ns"}
    if isinstance(v, list):
        return [keys_tree(x) for x in v]
    return None


def test_blockstats_shape_matches_qsd(tmp_path):
    """The same graph on bitbackd and qemu-storage-daemon: without
    query-nodes both return [], with it the same entries with the same
    keys at every level (idle_time_ns aside: QEMU gives it only for
    accounted I/O, which its nodes never see)."""
    require(QSD)
    replies = {}
    for name, binary in (("bitbackd", None), (QSD, QSD)):
        img = qcow2(tmp_path, f"{name}.qcow2")
        with Daemon(tmp_path / name, binary=binary) as d:
            d.start("--blockdev", blockdev(img), nbd=True)
            replies[name] = (d.qmp.cmd("query-blockstats"),
                             d.qmp.cmd("query-blockstats",
                                       **{"query-nodes": True}))
            d.qmp.error("query-blockstats", **{"query-nodes": "yes"})
            assert d.quit() == 0
    ours, theirs = replies["bitbackd"], replies[QSD]
    assert ours[0] == theirs[0] == []
    by_node = lambda r: {e["node-name"]: keys_tree(e) for e in r}
    assert by_node(ours[1]) == by_node(theirs[1])
    assert set(by_node(ours[1])) == {"d0", "f0"}


def test_blockstats_counters_move_with_io(tmp_path):
    """Known I/O over NBD moves d0's counters by exactly that much."""
    require("qemu-io")
    img = qcow2(tmp_path)
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", blockdev(img), "--export", EXPORT, nbd=True)

        def stats():
            return {e["node-name"]: e["stats"] for e in
                    d.qmp.cmd("query-blockstats", **{"query-nodes": True})}
        s0 = stats()["d0"]
        qemu_io(d.nbd_uri("d0"), "write -P 7 2M 1M", "read -P 7 2M 512k",
                "flush")
        s1 = stats()["d0"]
        assert s1["wr_bytes"] - s0["wr_bytes"] == MiB
        assert s1["wr_operations"] - s0["wr_operations"] == 1
        assert s1["rd_bytes"] - s0["rd_bytes"] == 512 * K
        assert s1["rd_operations"] - s0["rd_operations"] == 1
        assert s1["flush_operations"] > s0["flush_operations"]
        assert s1["wr_highest_offset"] == 3 * MiB
        assert s1["wr_total_time_ns"] > s0["wr_total_time_ns"]
        assert s1["failed_wr_operations"] == s1["invalid_wr_operations"] == 0
        # The file node below saw the data too (and qcow2's metadata).
        f = stats()["f0"]
        assert f["wr_bytes"] >= MiB
        qemu_io(d.nbd_uri("d0"), "discard 4M 1M")
        s2 = stats()["d0"]
        assert s2["unmap_operations"] - s1["unmap_operations"] == 1
        assert s2["unmap_bytes"] - s1["unmap_bytes"] == MiB
        assert d.quit() == 0


# ---- metrics ------------------------------------------------------------

def scrape(port, path="/metrics"):
    """(status, content type, body) of a GET with curl."""
    require("curl")
    p = run(["curl", "-sS", "--max-time", "30", "-o", "-", "-w",
             "\n%{http_code} %{content_type}", f"http://127.0.0.1:{port}{path}"])
    body, _, tail = p.stdout.rpartition("\n")
    code, _, ctype = tail.partition(" ")
    return int(code), ctype, body + "\n"


def samples(text):
    """{(sample name, frozenset(labels)): value} with the real parser."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        assert fam.documentation, fam.name       # every family has HELP
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_metrics_endpoint(tmp_path):
    """Scraped with curl, parsed by prometheus_client: node counters move
    with I/O, the export's client gauge counts an open connection, the
    dirty-bitmap gauge equals query-block's count and nbdinfo --map, and
    the job gauges show a finished backup."""
    require("qemu-io")
    import nbd
    img = qcow2(tmp_path)
    port = free_port()
    with Daemon(tmp_path / "d") as d:
        d.start("--blockdev", blockdev(img), "--metrics",
                f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                nbd=True)
        wait_log(d, rf"metrics served on http://127\.0\.0\.1:{port}/metrics$")
        q = d.qmp
        q.cmd("block-dirty-bitmap-add", node="d0", name="b0", persistent=True)
        q.cmd("block-export-add", type="nbd", id="e0", name="d0",
              writable=True, bitmaps=["b0"], **{"node-name": "d0"})
        code, ctype, text = scrape(port)
        assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
        m0 = samples(text)
        node = frozenset({("node", "d0")})
        wr = ("bitback_node_written_bytes_total", node)
        rd = ("bitback_node_read_bytes_total", node)

        qemu_io(d.nbd_uri("d0"), "write 0 1M", "write 5M 64k", "read 0 256k")
        m1 = samples(scrape(port)[2])
        assert m1[wr] - m0[wr] == MiB + 64 * K
        assert m1[rd] - m0[rd] == 256 * K
        assert m1[("bitback_node_write_operations_total", node)] - \
            m0[("bitback_node_write_operations_total", node)] == 2

        bm = frozenset({("node", "d0"), ("bitmap", "b0")})
        dirty = m1[("bitback_dirty_bitmap_dirty_bytes", bm)]
        assert dirty == q.bitmap("d0", "b0")["count"] == MiB + 64 * K
        assert dirty == sum(l for _, l in dirty_extents(d.nbd_uri("d0"), "b0"))
        assert m1[("bitback_dirty_bitmap_granularity_bytes", bm)] == \
            q.bitmap("d0", "b0")["granularity"]
        assert m1[("bitback_dirty_bitmap_persistent", bm)] == 1
        syncs = ("bitback_write_intent_syncs_total", node)
        assert m1[syncs] >= 1 and m1[syncs] >= m0.get(syncs, 0)

        exp = frozenset({("export", "e0"), ("name", "d0"), ("node", "d0"),
                         ("writable", "true")})
        assert m1[("bitback_export_clients", exp)] == 0
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("d0"))
        try:
            assert samples(scrape(port)[2])[("bitback_export_clients", exp)] == 1
        finally:
            h.shutdown()
        wait_for(lambda: samples(scrape(port)[2])[
            ("bitback_export_clients", exp)] == 0, "client gauge back to 0")

        run(["qemu-img", "create", "-q", "-f", "raw", tmp_path / "t.raw",
             str(SIZE)])
        q.cmd("blockdev-add", driver="raw", **{"node-name": "t"},
              file={"driver": "file", "filename": str(tmp_path / "t.raw")})
        q.cmd("blockdev-backup", **{"job-id": "j1"}, device="d0", target="t",
              sync="full", **{"auto-dismiss": False})
        wait_log(d, r"job 'j1' \(backup\): \w+ -> concluded$")
        m2 = samples(scrape(port)[2])
        job = frozenset({("id", "j1"), ("type", "backup")})
        assert m2[("bitback_job_progress_total", job)] == SIZE
        assert m2[("bitback_job_progress_current", job)] == SIZE
        assert m2[("bitback_job_status", job | {("status", "concluded")})] == 1
        assert m2[("bitback_node_read_bytes_total", node)] >= \
            m1[("bitback_node_read_bytes_total", node)]

        code, _, _ = scrape(port, "/other")
        assert code == 404
        p = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                 "-X", "POST", "--data", "x", f"http://127.0.0.1:{port}/metrics"])
        assert p.stdout == "405"
        p = run(["curl", "-sS", "-I", f"http://127.0.0.1:{port}/metrics"])
        assert p.stdout.startswith("HTTP/1.1 200"), p.stdout
        assert d.quit() == 0


@pytest.mark.parametrize("arg,msg", [
    ("addr=127.0.0.1", "expected HOST:PORT"),
    ("addr.type=tcp,addr.host=h,addr.port=1",
     "addr.type must be 'inet' or 'unix'"),
    ("addr.type=unix,addr.host=h", "Parameter 'addr.host' is unexpected"),
    ("addr.type=unix", "Parameter 'addr.path' is missing"),
    ("addr.type=inet,addr.host=127.0.0.1", "Parameter 'addr.port' is missing"),
    ("addr=127.0.0.1:1,color=red", "Parameter 'color' is unexpected"),
    ("port=1", "Parameter 'port' is unexpected"),
])
def test_metrics_bad_option(tmp_path, arg, msg):
    p = subprocess.run([BITBACKD, "--metrics", arg],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p
    assert p.stderr.startswith("bitbackd: --metrics: ") and msg in p.stderr, \
        p.stderr


def test_metrics_unix_socket(tmp_path):
    """--metrics addr.type=unix: served on a 0600 socket (curl
    --unix-socket), removed at the stop."""
    require("curl")
    img = qcow2(tmp_path)
    with Daemon(tmp_path / "d") as d:
        sock = d.sockdir / "metrics.sock"
        d.start("--blockdev", blockdev(img), "--metrics",
                f"addr.type=unix,addr.path={sock}", nbd=True)
        wait_log(d, rf"metrics served on unix:{re.escape(str(sock))}, ")
        assert os.stat(sock).st_mode & 0o777 == 0o600
        p = run(["curl", "-sS", "--max-time", "30", "--unix-socket", str(sock),
                 "http://localhost/metrics"])
        m = samples(p.stdout)
        assert ("bitback_node_read_bytes_total",
                frozenset({("node", "d0")})) in m
        assert d.quit() == 0
        assert not sock.exists()


def test_metrics_port_in_use(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        port = s.getsockname()[1]
        p = subprocess.run([BITBACKD, "--metrics",
                            f"addr=127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=30)
    finally:
        s.close()
    assert p.returncode == 1 and "--metrics: " in p.stderr, p.stderr
