"""One QMP transcript, run against qemu-storage-daemon and bitbackd: the
replies must have the same shapes (the same keys and JSON types,
recursively, for every member QEMU's reply has).  bitbackd may add members
only where docs/qmp.md says so (EXTRA_OK below).  Also: a command line with
an iothread object and an export on it starts on both."""
import json
import time

import pytest

from bitback_testlib import BITBACKD, QSD, Daemon, QMPError
from conftest import require, run

MiB = 1024 * 1024

# Members bitbackd adds to QEMU's replies, each documented in docs/qmp.md
# (query-named-block-nodes): a bitmap's generation and recovery, its
# `inconsistent` always present (QEMU: only when true), a node's
# crash-safe state, whether it stores persistent bitmaps, and
# `dirty-bitmaps` even when empty (QEMU: only when there is one).
EXTRA_OK = {"generation", "prior-generation", "inconsistent", "recovered",
            "recovered-bytes", "crash-safe", "persistent-bitmaps",
            "dirty-bitmaps"}


def shape(v):
    """The JSON type of v, with the shapes of its members / elements."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [shape(v[0])] if v else []
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    return type(v).__name__


def assert_same_shape(qsd, ours, where):
    """Every member of QEMU's reply is in ours with the same shape; ours
    has no other member unless EXTRA_OK lists it."""
    if isinstance(qsd, dict):
        assert isinstance(ours, dict), (where, qsd, ours)
        for k, v in qsd.items():
            assert k in ours, f"{where}: member '{k}' missing: {ours}"
            assert_same_shape(v, ours[k], f"{where}.{k}")
        extra = set(ours) - set(qsd) - EXTRA_OK
        assert not extra, f"{where}: members QEMU lacks: {extra}"
    elif isinstance(qsd, list):
        assert isinstance(ours, list), (where, qsd, ours)
        if qsd and ours:
            assert_same_shape(qsd[0], ours[0], f"{where}[0]")
    else:
        assert qsd == ours, f"{where}: {qsd} != {ours}"


def wait_job(c, job_id, timeout=30):
    """Wait until job_id concluded; returns its query-jobs entry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for j in c.cmd("query-jobs"):
            if j["id"] == job_id and j["status"] == "concluded":
                return j
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not conclude")


def transcript(binary, tmp_path):
    """Run the transcript; returns {step: shape of the reply}."""
    out = {}
    work = tmp_path / ("qsd" if binary == QSD else "bbd")
    with Daemon(work, binary=binary) as d:
        d.start(nbd=True)
        c = d.qmp

        def step(label, cmd, /, **args):
            r = c.execute(cmd, **args)
            out[label] = shape(r.get("return", r.get("error")))
            return r

        step("query-version", "query-version")
        step("object-add iothread", "object-add", **{"qom-type": "iothread",
                                                     "id": "io0"})
        qcow2 = work / "d.qcow2"
        raw = work / "d.raw"
        for f, job in ((qcow2, "c0"), (raw, "c1")):
            step(f"blockdev-create file {job}", "blockdev-create",
                 **{"job-id": job},
                 options={"driver": "file", "filename": str(f),
                          "size": 0 if f == qcow2 else 16 * MiB})
            out[f"query-jobs {job}"] = shape(wait_job(c, job))
            step(f"job-dismiss {job}", "job-dismiss", id=job)
        step("blockdev-add f0", "blockdev-add", driver="file",
             **{"node-name": "f0"}, filename=str(qcow2))
        step("blockdev-create qcow2", "blockdev-create", **{"job-id": "c2"},
             options={"driver": "qcow2", "file": "f0", "size": 64 * MiB})
        out["query-jobs c2"] = shape(wait_job(c, "c2"))
        step("job-dismiss c2", "job-dismiss", id="c2")
        step("blockdev-add d0", "blockdev-add", driver="qcow2",
             **{"node-name": "d0"}, file="f0")
        step("blockdev-add r0", "blockdev-add", driver="raw",
             **{"node-name": "r0"},
             file={"driver": "file", "filename": str(raw)})
        step("block-dirty-bitmap-add", "block-dirty-bitmap-add", node="r0",
             name="b0")
        step("block_resize", "block_resize", **{"node-name": "r0"},
             size=32 * MiB)
        step("block_resize qcow2", "block_resize", **{"node-name": "d0"},
             size=1024 * MiB)
        step("block_resize missing", "block_resize", **{"node-name": "zz"},
             size=MiB)
        step("block-export-add iothread", "block-export-add", type="nbd",
             id="e0", **{"node-name": "r0"}, writable=True, iothread="io0")
        step("block-export-add bad iothread", "block-export-add", type="nbd",
             id="e1", **{"node-name": "d0"}, iothread="nope")
        # QEMU's NBD exports do not share the resize permission.
        step("block_resize exported", "block_resize", **{"node-name": "r0"},
             size=48 * MiB)
        nodes = c.cmd("query-named-block-nodes")
        assert [n["image"]["virtual-size"] for n in nodes
                if n["node-name"] == "d0"] == [1024 * MiB]
        out["query-named-block-nodes"] = shape(
            {n["node-name"]: n for n in nodes
             if n["node-name"] in ("r0", "d0")})
        assert [n["image"]["virtual-size"] for n in nodes
                if n["node-name"] == "r0"] == [32 * MiB]
        if binary == BITBACKD:
            # (A client of QSD 7.2's iothread export aborts QSD when it
            # disconnects: see test_cmdline_iothread_export.)
            info = json.loads(run(["nbdinfo", "--json",
                                   d.nbd_uri("r0")]).stdout)
            assert info["exports"][0]["export-size"] == 32 * MiB
        step("query-block", "query-block")
        step("query-block-exports", "query-block-exports")
        schema = c.cmd("query-qmp-schema")
        out["query-qmp-schema"] = shape(
            [x for x in schema if x["name"] == "block_resize"])
        names = {x["name"] for x in c.cmd("query-commands")}
        step("query-commands", "query-commands")
        step("block-export-del", "block-export-del", id="e0")
        c.get_event("BLOCK_EXPORT_DELETED")
        step("object-del iothread", "object-del", id="io0")
        step("object-del missing", "object-del", id="io0")
        assert d.quit() == 0
    return out, names


def test_transcript_shapes(tmp_path):
    require("nbdinfo")
    qsd, qsd_names = transcript(QSD, tmp_path)
    ours, our_names = transcript(BITBACKD, tmp_path)
    assert qsd.keys() == ours.keys()
    for step in qsd:
        if step == "query-block":
            # QSD has no BlockBackends: its list is empty, ours lists the
            # root nodes (docs/qmp.md, query-block).
            assert qsd[step] == []
            continue
        assert_same_shape(qsd[step], ours[step], step)
    # Every command both have; query-iothreads is bitbackd's (QSD 7.2 has
    # no query-iothreads).
    for cmd in ("block_resize", "blockdev-create", "query-qmp-schema",
                "object-add", "object-del", "query-version"):
        assert cmd in qsd_names and cmd in our_names
    assert "query-iothreads" in our_names


def test_error_texts_match(tmp_path):
    """The errors the transcript provokes read the same on both."""
    msgs = {}
    for name, binary in (("qsd", QSD), ("bbd", BITBACKD)):
        with Daemon(tmp_path / name, binary=binary) as d:
            d.start(nbd=True)
            c = d.qmp
            run(["qemu-img", "create", "-q", "-f", "raw",
                 tmp_path / name / "r.raw", "1M"])
            c.cmd("blockdev-add", driver="raw", **{"node-name": "r0"},
                  file={"driver": "file",
                        "filename": str(tmp_path / name / "r.raw")})
            msgs[name] = [
                c.error("block-export-add", type="nbd", id="e1",
                        **{"node-name": "r0"}, iothread="nope").desc,
                c.error("block_resize", **{"node-name": "zz"}, size=1).desc,
                c.error("block_resize", device="zz", size=1).desc,
                c.error("block_resize", size=1).desc,
                c.error("block_resize", **{"node-name": "r0"},
                        size=-1).desc,
                c.error("object-del", id="nope").desc,
                c.error("object-add", **{"qom-type": "secret"},
                        id="s0").desc,
                c.error("object-add", **{"qom-type": "secret"}, id="s0",
                        data="x", file="/nonexistent").desc,
                c.error("object-add", **{"qom-type": "secret"}, id="s0",
                        data="!!", format="base64").desc,
            ]
            assert d.quit() == 0
    assert msgs["qsd"] == msgs["bbd"]


@pytest.mark.parametrize("binary", [QSD, BITBACKD], ids=["qsd", "bitbackd"])
def test_cmdline_iothread_export(binary, tmp_path):
    """`--object iothread,id=io0 --export nbd,...,iothread=io0` starts and
    serves; an unknown iothread stops the start-up with QEMU's error."""
    require("nbdinfo")
    img = tmp_path / "d.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", img, "8M"])
    bd = f"driver=raw,node-name=d0,file.driver=file,file.filename={img}"
    with Daemon(tmp_path / "a", binary=binary) as d:
        d.start("--object", "iothread,id=io0", "--blockdev", bd,
                "--export", "nbd,id=e0,node-name=d0,writable=on,"
                "iothread=io0,fixed-iothread=on", nbd=True)
        assert [e["id"] for e in d.qmp.cmd("query-block-exports")] == ["e0"]
        if binary == BITBACKD:
            # qemu-storage-daemon 7.2 aborts when a client of an export
            # with an iothread disconnects (nbd_blockdev_client_closed's
            # assertion), so only bitbackd is given clients here.
            run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k",
                 d.nbd_uri("d0")])
            run(["qemu-io", "-f", "raw", "-c", "read -P 0x33 0 64k",
                 d.nbd_uri("d0")])
        assert d.quit() == 0
    d = Daemon(tmp_path / "b", binary=binary)
    try:
        with pytest.raises(AssertionError, match="exited with"):
            d.start("--blockdev", bd, "--export",
                    "nbd,id=e0,node-name=d0,iothread=io9", nbd=True)
        assert 'iothread "io9" not found' in d.stderr()
    finally:
        d.cleanup()
