"""QMP protocol and commands of bitbackd (issue 3, QMP and persistence).

Replies are checked against what QEMU's qapi schema defines; dirty maps and
data against real peers: qemu-io writes over NBD, nbdinfo reads the
qemu:dirty-bitmap:NAME context, `bitback img info` reads the image, and a
light compatibility test runs the same script against qemu-storage-daemon.
"""
import json
import shutil
import subprocess
import time

import pytest

from bitback_testlib import QSD, Daemon, QMPClient, QMPError
from conftest import bitback, dirty_extents, require, run

G = 64 * 1024
SIZE = 16 * 1024 * 1024
QBM_DISK = "driver=qbm,node-name=disk0,file.driver=file,file.filename=disk.qbm"


def make_qbm(tmp_path, name="disk.qbm", size=SIZE):
    bitback("img", "create", "-f", "qbm", str(tmp_path / name), str(size))
    return tmp_path / name


@pytest.fixture
def daemon(tmp_path):
    """bitbackd with disk0 (qbm) and an NBD server, no export yet."""
    make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK, nbd=True)
        yield d


def qemu_io(uri, *cmds, readonly=False):
    require("qemu-io")
    args = ["qemu-io", "-f", "raw"] + (["-r"] if readonly else []) + [uri]
    for c in cmds:
        args += ["-c", c]
    p = run(args)
    assert "error" not in p.stdout.lower(), p.stdout
    return p.stdout


def wait_no_exports(c, timeout=30):
    """block-export-del finishes asynchronously in QEMU: wait for it."""
    deadline = time.time() + timeout
    while c.cmd("query-block-exports"):
        assert time.time() < deadline, "export not removed"
        time.sleep(0.02)


# ---------------------------------------------------------------- protocol

def test_greeting_and_negotiation(daemon):
    c = daemon.connect_qmp(negotiate=False)
    with c:
        v = c.greeting["QMP"]["version"]
        assert set(v["qemu"]) == {"major", "minor", "micro"}
        assert v["package"].startswith("bitback")
        assert isinstance(c.greeting["QMP"]["capabilities"], list)
        e = c.error("query-version")
        assert e.cls == "CommandNotFound"
        assert "qmp_capabilities" in e.desc
        assert c.cmd("qmp_capabilities") == {}
        ver = c.cmd("query-version")
        assert ver["qemu"] == v["qemu"]
        e = c.error("qmp_capabilities")
        assert e.cls == "CommandNotFound"


def test_malformed_json_keeps_connection(daemon):
    c = daemon.qmp
    c.send_raw(b'{"execute": garbage}\n')
    r = c.recv_reply()
    assert r["error"]["class"] == "GenericError"
    assert "JSON parse error" in r["error"]["desc"]
    assert "query-version" in [x["name"] for x in c.cmd("query-commands")]
    # Not an object.
    c.send_raw(b'[1, 2]\n')
    r = c.recv_reply()
    assert r["error"]["desc"] == "QMP input must be a JSON object"
    # One object split over two writes, then two objects in one write.
    c.send_raw(b'{"execute": "query-')
    time.sleep(0.05)
    c.send_raw(b'version", "id": "split"}')
    r = c.recv_reply()
    assert r["id"] == "split" and "qemu" in r["return"]
    c.send_raw(b'{"execute":"query-version","id":1}{"execute":"query-block",'
               b'"id":{"k":[2]}}\n')
    r1, r2 = c.recv_reply(), c.recv_reply()
    assert r1["id"] == 1 and "qemu" in r1["return"]
    assert r2["id"] == {"k": [2]} and isinstance(r2["return"], list)
    # Request members.
    c.send({"execute": 1})
    assert "'execute' must be a string" in c.recv_reply()["error"]["desc"]
    c.send({"execute": "query-version", "arguments": []})
    assert "'arguments' must be an object" in c.recv_reply()["error"]["desc"]
    c.send({"foo": 1})
    assert c.recv_reply()["error"]["class"] == "GenericError"
    assert c.cmd("query-version")["package"].startswith("bitback")


def test_unknown_command_and_bad_arguments(daemon):
    c = daemon.qmp
    e = c.error("no-such-command")
    assert (e.cls, e.desc) == ("CommandNotFound",
                               "The command no-such-command has not been found")
    e = c.error("block-dirty-bitmap-clear", node="disk0")
    assert (e.cls, e.desc) == ("GenericError", "Parameter 'name' is missing")
    e = c.error("block-dirty-bitmap-clear", node="disk0", name="b0", bogus=1)
    assert (e.cls, e.desc) == ("GenericError", "Parameter 'bogus' is unexpected")
    e = c.error("block-dirty-bitmap-add", node="disk0", name="b1",
                granularity="big")
    assert e.cls == "GenericError" and "'granularity'" in e.desc
    e = c.error("block-dirty-bitmap-add", node="disk0", name="b1",
                persistent="yes")
    assert e.cls == "GenericError" and "'persistent'" in e.desc
    # The id is echoed on errors too.
    r = c.execute("no-such-command")
    assert r["id"] == c._next_id and "error" in r


def test_query_commands_lists_issue_commands(daemon):
    names = {x["name"] for x in daemon.qmp.cmd("query-commands")}
    for n in ["qmp_capabilities", "query-version", "query-commands", "quit",
              "blockdev-add", "blockdev-del", "query-named-block-nodes",
              "query-block", "block-dirty-bitmap-add",
              "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
              "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
              "block-dirty-bitmap-merge", "x-debug-block-dirty-bitmap-sha256",
              "nbd-server-start", "nbd-server-stop", "block-export-add",
              "block-export-del", "query-block-exports", "nbd-server-add",
              "nbd-server-remove"]:
        assert n in names


def test_several_monitors_and_clients(tmp_path):
    make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        second = d.sockdir / "qmp2.sock"
        d.start("--chardev", f"socket,id=m1,path={second},server=on,wait=off",
                "--monitor", "m1", "--blockdev", QBM_DISK)
        with QMPClient(second) as c2, d.connect_qmp() as c3:
            c2.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
            assert c3.bitmap("disk0", "b0") is not None
            assert d.qmp.bitmap("disk0", "b0") is not None
        assert d.quit() == 0


# ---------------------------------------------------------------- bitmaps

def test_bitmap_commands(daemon):
    c = daemon.qmp
    assert c.cmd("block-dirty-bitmap-add", node="disk0", name="b0") == {}
    b0 = c.bitmap("disk0", "b0")
    # generation (a bitback extension) is a UUID; the rest is QEMU's.
    assert len(b0.pop("generation")) == 36
    assert b0.pop("recovered") is False
    assert b0 == {
        "name": "b0", "recording": True, "persistent": False, "busy": False,
        "granularity": G, "count": 0, "inconsistent": False}
    c.cmd("block-dirty-bitmap-add", node="disk0", name="b1",
          granularity=128 * 1024, persistent=True, disabled=True)
    b1 = c.bitmap("disk0", "b1")
    assert (b1["granularity"], b1["persistent"], b1["recording"]) == \
        (128 * 1024, True, False)

    e = c.error("block-dirty-bitmap-add", node="disk0", name="b0")
    assert e.cls == "GenericError" and "b0" in e.desc
    e = c.error("block-dirty-bitmap-add", node="nope", name="b9")
    assert e.cls == "GenericError"
    assert e.desc == "Cannot find device='nope' nor node-name='nope'"
    e = c.error("block-dirty-bitmap-add", node="disk0", name="b9",
                granularity=1000)
    assert "Granularity" in e.desc
    e = c.error("block-dirty-bitmap-clear", node="disk0", name="nope")
    assert (e.cls, e.desc) == ("GenericError", "Dirty bitmap 'nope' not found")

    c.cmd("block-dirty-bitmap-disable", node="disk0", name="b0")
    assert c.bitmap("disk0", "b0")["recording"] is False
    c.cmd("block-dirty-bitmap-enable", node="disk0", name="b0")
    assert c.bitmap("disk0", "b0")["recording"] is True
    c.cmd("block-dirty-bitmap-enable", node="disk0", name="b1")
    assert c.bitmap("disk0", "b1")["recording"] is True

    sha_empty = c.cmd("x-debug-block-dirty-bitmap-sha256", node="disk0",
                      name="b0")["sha256"]
    assert len(sha_empty) == 64 and int(sha_empty, 16) >= 0

    # Merge: list of names, and of {"node","name"}; granularities must match.
    c.cmd("block-dirty-bitmap-add", node="disk0", name="t0")
    c.cmd("block-dirty-bitmap-merge", node="disk0", target="t0",
          bitmaps=["b0", {"node": "disk0", "name": "b0"}])
    e = c.error("block-dirty-bitmap-merge", node="disk0", target="t0",
                bitmaps=["missing"])
    assert e.desc == "Dirty bitmap 'missing' not found"
    c.cmd("block-dirty-bitmap-clear", node="disk0", name="t0")
    c.cmd("block-dirty-bitmap-remove", node="disk0", name="t0")
    assert c.bitmap("disk0", "t0") is None
    c.cmd("block-dirty-bitmap-remove", node="disk0", name="b1")
    assert c.bitmap("disk0", "b1") is None
    e = c.error("block-dirty-bitmap-remove", node="disk0", name="b1")
    assert e.desc == "Dirty bitmap 'b1' not found"


def test_dirty_count_and_map_match_nbd_writes(daemon):
    c = daemon.qmp
    c.cmd("block-dirty-bitmap-add", node="disk0", name="b0", persistent=True)
    c.cmd("block-dirty-bitmap-add", node="disk0", name="off", disabled=True)
    c.cmd("block-export-add", type="nbd", id="e0", name="disk0", writable=True,
          bitmaps=["b0", "off"], **{"node-name": "disk0"})
    exports = c.cmd("query-block-exports")
    assert [(x["id"], x["node-name"], x["type"]) for x in exports] == \
        [("e0", "disk0", "nbd")]
    uri = daemon.nbd_uri("disk0")
    # 64k at 0 (cluster 0), 1 byte at 1M+5 (cluster 16), 100k at 5M-4k
    # (clusters 79..81).
    qemu_io(uri, "write -P 1 0 64k", "write -P 2 1048581 1",
            "write -P 3 5238784 100k")
    want = [(0, G), (16 * G, G), (79 * G, 3 * G)]
    assert dirty_extents(uri, "b0") == want
    assert dirty_extents(uri, "off") == []
    b0 = c.bitmap("disk0", "b0")
    assert b0["count"] == 5 * G
    assert b0["recording"] and b0["persistent"] and not b0["inconsistent"]
    # Merge into an empty bitmap gives the same bits (and the same sha256).
    c.cmd("block-dirty-bitmap-add", node="disk0", name="copy")
    c.cmd("block-dirty-bitmap-disable", node="disk0", name="copy")
    c.cmd("block-dirty-bitmap-merge", node="disk0", target="copy",
          bitmaps=["b0"])
    sha = lambda n: c.cmd("x-debug-block-dirty-bitmap-sha256", node="disk0",
                          name=n)["sha256"]
    assert sha("copy") == sha("b0")
    assert c.bitmap("disk0", "copy")["count"] == 5 * G
    # Data went through: read it back with qemu-io's pattern check.
    qemu_io(uri, "read -P 1 0 64k", "read -P 3 5238784 100k")
    # An exported bitmap is busy (as in QEMU): it cannot be cleared.
    assert c.bitmap("disk0", "b0")["busy"] is True
    e = c.error("block-dirty-bitmap-clear", node="disk0", name="b0")
    assert e.cls == "GenericError" and "b0" in e.desc
    # After the export is gone it can; export again: the map is empty.
    c.del_export("e0")
    wait_no_exports(c)
    assert c.bitmap("disk0", "b0")["busy"] is False
    c.cmd("block-dirty-bitmap-clear", node="disk0", name="b0")
    assert c.bitmap("disk0", "b0")["count"] == 0
    c.cmd("block-export-add", type="nbd", id="e0", name="disk0",
          writable=True, bitmaps=["b0"], **{"node-name": "disk0"})
    assert dirty_extents(uri, "b0") == []


# ---------------------------------------------------------------- graph

def test_blockdev_add_del_round_trip(daemon, tmp_path):
    c = daemon.qmp
    run(["qemu-img", "create", "-f", "raw", str(tmp_path / "extra.raw"), "1M"])
    c.cmd("blockdev-add", {"driver": "raw", "node-name": "x0",
                           "file": {"driver": "file",
                                    "filename": str(tmp_path / "extra.raw")}})
    n = c.node("x0")
    assert n["drv"] == "raw" and n["ro"] is False
    assert n["image"]["virtual-size"] == 1 << 20
    assert "x0" in [b["inserted"]["node-name"] for b in c.cmd("query-block")]
    e = c.error("blockdev-add", {"driver": "raw", "node-name": "x0",
                                 "file": {"driver": "file",
                                          "filename": "extra.raw"}})
    assert "x0" in e.desc
    e = c.error("blockdev-add", {"driver": "raw",
                                 "file": {"driver": "file",
                                          "filename": "extra.raw"}})
    assert "node-name" in e.desc
    assert c.cmd("blockdev-del", {"node-name": "x0"}) == {}
    assert c.node("x0") is None
    e = c.error("blockdev-del", {"node-name": "x0"})
    assert e.cls == "GenericError" and "x0" in e.desc
    # read-only is honoured.
    c.cmd("blockdev-add", {"driver": "raw", "node-name": "r0", "read-only": True,
                           "file": {"driver": "file",
                                    "filename": str(tmp_path / "extra.raw")}})
    assert c.node("r0")["ro"] is True
    c.cmd("blockdev-del", {"node-name": "r0"})
    # An exported node is in use.
    c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"})
    e = c.error("blockdev-del", {"node-name": "disk0"})
    assert "in use" in e.desc
    c.cmd("block-export-del", id="e0")
    wait_no_exports(c)
    assert c.cmd("blockdev-del", {"node-name": "disk0"}) == {}


def test_nbd_server_commands(tmp_path):
    make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK)
        c = d.qmp
        sock = str(d.nbd_sock)
        e = c.error("block-export-add", type="nbd", id="e0",
                    **{"node-name": "disk0"})
        assert e.desc == "NBD server not running"
        c.cmd("nbd-server-start",
              addr={"type": "unix", "data": {"path": sock}})
        e = c.error("nbd-server-start", addr={"type": "unix", "path": sock})
        assert "already running" in e.desc
        c.cmd("nbd-server-add", device="disk0", writable=True)
        assert [x["id"] for x in c.cmd("query-block-exports")] == ["disk0"]
        qemu_io(d.nbd_uri("disk0"), "write -P 7 0 4k")
        c.cmd("nbd-server-remove", name="disk0", mode="hard")
        ev = c.get_event("BLOCK_EXPORT_DELETED")
        assert ev["data"] == {"id": "disk0"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        e = c.error("nbd-server-remove", name="disk0")
        assert e.desc == "Export 'disk0' is not found"
        # nbd-server-remove takes the NBD name, even when the id differs.
        c.cmd("block-export-add", type="nbd", id="e7", name="seven",
              **{"node-name": "disk0"})
        c.cmd("nbd-server-remove", name="seven")
        assert c.get_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e7"}
        assert c.cmd("query-block-exports") == []
        c.cmd("nbd-server-stop")
        e = c.error("nbd-server-stop")
        assert e.desc == "NBD server not running"
        # Flat SocketAddress form works for QMP too.
        c.cmd("nbd-server-start", addr={"type": "unix", "path": sock})
        c.cmd("block-export-add", type="nbd", id="e1", name="d",
              **{"node-name": "disk0"})
        out = qemu_io(d.nbd_uri("d"), "read -P 7 0 4k", readonly=True)
        assert "read 4096/4096" in out
        e = c.error("block-export-del", id="nope")
        assert e.desc == "Export 'nope' is not found"
        # nbd-server-stop removes every export, each with its event.
        c.cmd("nbd-server-stop")
        assert c.get_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e1"}
        assert c.cmd("query-block-exports") == []
        assert d.quit() == 0


# ---------------------------------------------------------------- persistence

def test_quit_and_restart_keeps_bitmap(tmp_path):
    make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK, nbd=True)
        c = d.qmp
        c.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
              persistent=True)
        c.cmd("block-export-add", type="nbd", id="e0", writable=True,
              bitmaps=["b0"], **{"node-name": "disk0"})
        uri = d.nbd_uri("disk0")
        qemu_io(uri, "write -P 1 0 64k", "write -P 2 3M 192k")
        map_before = dirty_extents(uri, "b0")
        assert map_before == [(0, G), (3 << 20, 3 * G)]
        sha_before = c.cmd("x-debug-block-dirty-bitmap-sha256", node="disk0",
                           name="b0")["sha256"]
        assert d.quit() == 0

        # The image says the bitmap is stored.
        info = json.loads(bitback("img", "info", "--output=json",
                                  str(tmp_path / "disk.qbm")).stdout)
        assert "b0" in json.dumps(info)

        d.restart("--blockdev", QBM_DISK, "--export",
                  "type=nbd,id=e0,node-name=disk0,writable=on,bitmaps.0=b0",
                  nbd=True)
        b0 = d.qmp.bitmap("disk0", "b0")
        assert b0["inconsistent"] is False and b0["persistent"] is True
        assert b0["recording"] is True and b0["count"] == 4 * G
        assert d.qmp.cmd("x-debug-block-dirty-bitmap-sha256", node="disk0",
                         name="b0")["sha256"] == sha_before
        assert dirty_extents(uri, "b0") == map_before
        assert d.quit() == 0


def test_sigterm_stores_bitmap_like_quit(tmp_path):
    make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK, nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
                  persistent=True)
        d.qmp.cmd("block-export-add", type="nbd", id="e0", writable=True,
                  **{"node-name": "disk0"})
        qemu_io(d.nbd_uri("disk0"), "write -P 1 1M 128k")
        assert d.terminate() == 0
        assert not d.qmp_sock.exists()
        d.restart("--blockdev", QBM_DISK)
        b0 = d.qmp.bitmap("disk0", "b0")
        assert (b0["inconsistent"], b0["count"]) == (False, 2 * G)
        assert d.quit() == 0


def test_sigkill_during_writes_makes_bitmap_inconsistent(tmp_path):
    """With crash-safe=off (QEMU's behaviour) a crash leaves the bitmap
    inconsistent; crash-safe bitmaps are tested in test_crash_safe.py."""
    require("qemu-io")
    make_qbm(tmp_path)
    with Daemon(tmp_path) as d:
        d.start("--blockdev", QBM_DISK + ",crash-safe=off", nbd=True)
        c = d.qmp
        c.cmd("block-dirty-bitmap-add", node="disk0", name="b0",
              persistent=True)
        c.cmd("block-export-add", type="nbd", id="e0", writable=True,
              **{"node-name": "disk0"})
        cmds = []
        for i in range(400):
            cmds += ["-c", f"write -P {i % 250} {(i % 16) << 20} 1M"]
        load = subprocess.Popen(["qemu-io", "-f", "raw", d.nbd_uri("disk0"),
                                 *cmds], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while c.bitmap("disk0", "b0")["count"] == 0:
                assert time.time() < deadline, "no write reached the bitmap"
                time.sleep(0.01)
            d.kill()
        finally:
            load.kill()
            load.wait()
        d.restart("--blockdev", QBM_DISK + ",crash-safe=off")
        b0 = d.qmp.bitmap("disk0", "b0")
        assert b0 is not None and b0["inconsistent"] is True
        assert b0["recording"] is False
        # An inconsistent bitmap can only be removed.
        e = d.qmp.error("block-dirty-bitmap-clear", node="disk0", name="b0")
        assert e.cls == "GenericError"
        d.qmp.cmd("block-dirty-bitmap-remove", node="disk0", name="b0")
        assert d.quit() == 0


# ---------------------------------------------------------------- compat

COMPAT_SCRIPT = [
    ("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "disk0", "name": "b1",
                                "granularity": 131072, "disabled": True}),
    ("block-dirty-bitmap-disable", {"node": "disk0", "name": "b0"}),
    ("block-dirty-bitmap-enable", {"node": "disk0", "name": "b0"}),
    ("block-dirty-bitmap-clear", {"node": "disk0", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "disk0", "name": "m"}),
    ("block-dirty-bitmap-merge", {"node": "disk0", "target": "m",
                                  "bitmaps": ["b0",
                                              {"node": "disk0", "name": "b0"}]}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "disk0", "name": "b0"}),
    ("block-dirty-bitmap-remove", {"node": "disk0", "name": "m"}),
    ("block-dirty-bitmap-clear", {"node": "disk0", "name": "nope"}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": "x"}),
    ("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"}),
    ("block-dirty-bitmap-clear", {"node": "disk0"}),
    ("block-dirty-bitmap-clear", {"node": "disk0", "name": "b0", "x": 1}),
    ("blockdev-del", {"node-name": "nope"}),
    ("block-export-del", {"id": "nope"}),
    ("no-such-command", {}),
    ("query-block-exports", {}),
]


def run_compat_script(d):
    out = []
    for name, args in COMPAT_SCRIPT:
        r = d.qmp.execute(name, args)
        if "error" in r:
            out.append(("error", r["error"]["class"], r["error"]["desc"]))
        else:
            ret = r["return"]
            out.append(("return", sorted(ret) if isinstance(ret, dict)
                        else type(ret).__name__))
    nodes = {n["node-name"]: n for n in d.qmp.cmd("query-named-block-nodes")}
    return out, nodes["disk0"]


def test_same_script_against_qemu_storage_daemon(tmp_path):
    if shutil.which(QSD) is None:
        pytest.fail("qemu-storage-daemon is not installed")
    results = {}
    for which, binary in (("qsd", QSD), ("bitbackd", None)):
        folder = tmp_path / which
        folder.mkdir()
        run(["qemu-img", "create", "-f", "raw", str(folder / "d.raw"), "4M"])
        with Daemon(folder, binary=binary) as d:
            d.start("--blockdev", "driver=file,node-name=f0,filename=d.raw",
                    "--blockdev", "driver=raw,node-name=disk0,file=f0")
            results[which] = run_compat_script(d)
            assert d.quit() == 0
    (qsd_out, qsd_node), (our_out, our_node) = results["qsd"], results["bitbackd"]
    assert len(qsd_out) == len(our_out)
    for (name, _), theirs, ours in zip(COMPAT_SCRIPT, qsd_out, our_out):
        assert ours[:2] == theirs[:2], (name, theirs, ours)
    # Messages we copy from QEMU on purpose.
    for i in range(9, 17):
        assert our_out[i][2] == qsd_out[i][2], COMPAT_SCRIPT[i]
    # Every BlockDeviceInfo field QEMU shows is there, with the same type.
    for key, val in qsd_node.items():
        assert key in our_node, key
        assert type(our_node[key]) is type(val), key
    for key in ("filename", "format", "virtual-size"):
        assert our_node["image"][key] == qsd_node["image"][key] or \
            key == "filename"
    qb = {b["name"]: b for b in qsd_node["dirty-bitmaps"]}
    ob = {b["name"]: b for b in our_node["dirty-bitmaps"]}
    assert set(qb) == set(ob) == {"b0", "b1"}
    for name in qb:
        for key, val in qb[name].items():
            assert ob[name][key] == val, (name, key)


def test_garbage_input_does_not_hurt_the_daemon(daemon):
    import random
    rng = random.Random(1234)
    for i in range(8):
        c = daemon.connect_qmp(negotiate=bool(i % 2))
        with c:
            c.send_raw(bytes(rng.getrandbits(8) for _ in range(20000)))
            c.send_raw(b"[" * 5000 + b"\n")
            c.send_raw(b'{"execute": "\xff\xfe"}\n')
    # Clients that vanish mid-object, or never read their replies.
    for _ in range(4):
        c = daemon.connect_qmp()
        c.send_raw(b'{"execute": "query-named-block-nodes"}' * 50 + b'{"exec')
        c.close()
    with daemon.connect_qmp() as c:
        assert c.cmd("query-version")["package"].startswith("bitback")
    assert daemon.running()
    assert daemon.quit() == 0
