"""QMP command layer of live backups (issue 4): blockdev-backup,
drive-backup, transaction, blockdev-del of busy nodes, blockdev-add's
`backing` option and exports of bitmaps that live on a backing node.

Most tests run the same QMP script against bitbackd and against
qemu-storage-daemon 7.2 (parametrized "bitbackd" / "qsd") and check the same
replies, error classes and messages.  QSD has no qbm driver, so images are
raw there and overlays qcow2; bitbackd uses raw and qbm.  Results are checked
with real tools: qemu-img compare/info, qemu-io over NBD, nbdinfo.

The big scenarios (point in time, incremental chains, fleecing, grouped
failure) live in test_backup.py and friends; these tests stay at the
command layer.
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from bitback_testlib import QSD, Daemon
from conftest import BITBACK, dirty_extents, require, run

MiB = 1024 * 1024
SIZE = 64 * MiB
KINDS = ["bitbackd", "qsd"]


def binary(kind):
    if kind == "qsd":
        require(QSD)
        return QSD
    return None


def raw_image(path, size=SIZE):
    run(["qemu-img", "create", "-q", "-f", "raw", str(path), str(size)])
    return path


def qemu_io(target, *cmds, fmt="raw", readonly=False):
    require("qemu-io")
    args = ["qemu-io", "-f", fmt] + (["-r"] if readonly else []) + [str(target)]
    for c in cmds:
        args += ["-c", c]
    p = run(args)
    assert "error" not in p.stdout.lower() and \
        "fail" not in p.stdout.lower(), p.stdout
    return p.stdout


def raw_node(name, filename, **extra):
    opts = f"driver=raw,node-name={name},file.driver=file,file.filename={filename}"
    for k, v in extra.items():
        opts += f",{k}={v}"
    return opts


def wait_job_end(c, job_id, timeout=120):
    """Wait until job_id concludes; return its BLOCK_JOB_COMPLETED or
    BLOCK_JOB_CANCELLED event, the one sent just before its "concluded"
    (events of other jobs stay in c.events)."""
    deadline = time.monotonic() + timeout
    while True:
        for k, ev in enumerate(c.events):
            if ev["event"] == "JOB_STATUS_CHANGE" and \
                    ev["data"] == {"id": job_id, "status": "concluded"}:
                for m in range(k - 1, -1, -1):
                    if c.events[m]["event"] in ("BLOCK_JOB_COMPLETED",
                                                "BLOCK_JOB_CANCELLED"):
                        done = c.events[m]
                        del c.events[k]
                        del c.events[m]
                        return done
                raise AssertionError(f"no completion event for {job_id}")
        left = deadline - time.monotonic()
        assert left > 0, f"job {job_id} did not end: {c.cmd('query-jobs')}"
        old = c.sock.gettimeout()
        c.sock.settimeout(left)
        try:
            msg = c.recv()
        except socket.timeout:
            continue
        finally:
            c.sock.settimeout(old)
        if "event" in msg:
            c.events.append(msg)


def wait_no_job(c, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while any(j["id"] == job_id for j in c.cmd("query-jobs")):
        assert time.monotonic() < deadline, c.cmd("query-jobs")
        time.sleep(0.02)


def bitmaps_of(c, node):
    """{name: (count, recording, busy, granularity, sha256)} of node."""
    out = {}
    for b in c.node(node).get("dirty-bitmaps", []):
        if "name" not in b:
            continue        # QSD lists a job's anonymous successor bitmaps
        sha = c.cmd("x-debug-block-dirty-bitmap-sha256", node=node,
                    name=b["name"])["sha256"]
        out[b["name"]] = (b["count"], b["recording"], b["busy"],
                          b["granularity"], sha)
    return out


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def daemon(kind, tmp_path):
    """A daemon with d0 (64 MiB, some data), t0, t1, t2 (64 MiB), small
    (32 MiB), bitmap b0 on d0, and an NBD server."""
    src = raw_image(tmp_path / "src.raw")
    qemu_io(src, "write -P 0x11 0 1M", "write -P 0x22 20M 3M",
            "write -P 0x33 63M 1M")
    raw_image(tmp_path / "t0.raw")
    raw_image(tmp_path / "t1.raw")
    raw_image(tmp_path / "t2.raw")
    raw_image(tmp_path / "small.raw", 32 * MiB)
    with Daemon(tmp_path, binary=binary(kind)) as d:
        d.kind = kind
        d.start("--blockdev", raw_node("d0", "src.raw"),
                "--blockdev", raw_node("t0", "t0.raw"),
                "--blockdev", raw_node("t1", "t1.raw"),
                "--blockdev", raw_node("t2", "t2.raw"),
                "--blockdev", raw_node("small", "small.raw"), nbd=True)
        d.qmp.cmd("block-dirty-bitmap-add", node="d0", name="b0")
        yield d


def backup_args(**kw):
    args = {"job-id": "j", "device": "d0", "target": "t0", "sync": "full"}
    args.update(kw)
    return {k: v for k, v in args.items() if v is not None}


# Argument checks of do_backup_common and backup_job_create, QEMU's texts.
BACKUP_ERRORS = [
    (dict(bitmap="nope"), "Bitmap 'nope' could not be found"),
    (dict(sync="incremental", bitmap="b0", **{"bitmap-mode": "never"}),
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    (dict(sync="bitmap", bitmap="b0"),
     "Bitmap sync mode must be given when providing a bitmap"),
    (dict(**{"bitmap-mode": "always"}),
     "Cannot specify bitmap sync mode without a bitmap"),
    (dict(sync="none", bitmap="b0", **{"bitmap-mode": "always"}),
     "sync mode 'none' does not produce meaningful bitmap outputs"),
    (dict(bitmap="b0", **{"bitmap-mode": "never"}),
     "Bitmap sync mode 'never' has no meaningful effect when combined with "
     "sync mode 'full'"),
    (dict(sync="incremental"),
     "must provide a valid bitmap name for 'incremental' sync mode"),
    (dict(sync="bitmap"),
     "must provide a valid bitmap name for 'bitmap' sync mode"),
    (dict(device="nope"), "Cannot find device='nope' nor node-name='nope'"),
    (dict(target="nope"), "Cannot find device='nope' nor node-name='nope'"),
    (dict(target="small"), "Source and target image have different sizes"),
    (dict(target="d0"), "Source and target cannot be the same"),
    (dict(sync="bogus"), "Parameter 'sync' does not accept value 'bogus'"),
    (dict(sync=None), "Parameter 'sync' is missing"),
    (dict(speed=-1), "Parameter 'speed' expects a non-negative value"),
    (dict(**{"on-target-error": "x"}),
     "Parameter 'on-target-error' does not accept value 'x'"),
    (dict(**{"job-id": "1bad"}), "Invalid job ID '1bad'"),
]


def test_backup_argument_errors_match_qemu(daemon):
    c = daemon.qmp
    for kw, msg in BACKUP_ERRORS:
        e = c.error("blockdev-backup", backup_args(**kw))
        assert (e.cls, e.desc) == ("GenericError", msg), kw
    # The same checks inside a transaction give the same messages (names of
    # malformed members carry their path there).
    for kw, msg in BACKUP_ERRORS[:8]:
        e = c.error("transaction", actions=[
            {"type": "blockdev-backup", "data": backup_args(**kw)}])
        assert (e.cls, e.desc) == ("GenericError", msg), kw
    e = c.error("transaction", actions=[
        {"type": "blockdev-backup", "data": backup_args(sync="bogus")}])
    assert e.desc == "Parameter 'sync' does not accept value 'bogus'"
    e = c.error("transaction", actions=[], properties={"completion-mode": "x"})
    assert e.desc == "Parameter 'completion-mode' does not accept value 'x'"
    e = c.error("transaction", actions=[], properties={"x": 1})
    assert e.desc == "Parameter 'properties.x' is unexpected"
    e = c.error("transaction", actions=[1])
    assert e.desc == "Invalid parameter type for 'actions[0]', expected: object"
    # drive-backup shares them.
    e = c.error("drive-backup", backup_args(target="x.raw",
                                            sync="incremental"))
    assert e.desc == "must provide a valid bitmap name for 'incremental' " \
                     "sync mode"
    e = c.error("drive-backup", backup_args(target="x.raw", format="bogus"))
    assert e.desc == "Unknown file format 'bogus'"
    e = c.error("drive-backup", backup_args(target="missing.raw",
                                            mode="existing"))
    assert e.desc == "Could not open 'missing.raw': No such file or directory"
    assert c.cmd("query-jobs") == []
    # Nothing was left busy: a valid backup still runs and completes.
    c.cmd("blockdev-backup", backup_args())
    assert wait_job_end(c, "j")["event"] == "BLOCK_JOB_COMPLETED"


TXN_ERRORS = [
    ([{"type": "abort", "data": {}}], None,
     "Transaction aborted using Abort action"),
    ([{"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "n"}},
      {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "x"}}],
     None, "Dirty bitmap 'x' not found"),
    ([{"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "n"}}],
     {"completion-mode": "grouped"},
     "Action 'block-dirty-bitmap-add' does not support Transaction property "
     "completion-mode = grouped"),
    ([{"type": "bogus", "data": {}}], None,
     "Parameter 'type' does not accept value 'bogus'"),
    ([{"type": "block-dirty-bitmap-add", "data": {"node": "d0"}}], None,
     "Parameter 'actions[0].data.name' is missing"),
    ([{"type": "abort", "data": {}},
      {"type": "block-dirty-bitmap-add",
       "data": {"node": "d0", "name": "n", "x": 1}}], None,
     "Parameter 'actions[1].data.x' is unexpected"),
    ([{"type": "abort"}], None, "Parameter 'actions[0].data' is missing"),
    ([{"data": {}}], None, "Parameter 'actions[0].type' is missing"),
    ([{"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "n"}},
      {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "n"}}],
     None, "Bitmap already exists: n"),
    ([{"type": "block-dirty-bitmap-remove", "data": {"node": "d0", "name": "b0"}},
      {"type": "block-dirty-bitmap-remove", "data": {"node": "d0", "name": "b0"}}],
     None, "Bitmap 'b0' is currently in use by another operation and cannot "
     "be used"),
    ([{"type": "blockdev-backup",
       "data": {"job-id": "g1", "device": "d0", "target": "t0", "sync": "full"}},
      {"type": "abort", "data": {}}],
     {"completion-mode": "grouped"}, "Transaction aborted using Abort action"),
]


def test_transaction_errors_match_qemu(daemon):
    c = daemon.qmp
    before = bitmaps_of(c, "d0")
    for actions, props, msg in TXN_ERRORS:
        args = {"actions": actions}
        if props:
            args["properties"] = props
        e = c.error("transaction", args)
        assert (e.cls, e.desc) == ("GenericError", msg), actions
        # All or nothing: no bitmap, no job is left behind.
        assert bitmaps_of(c, "d0") == before, actions
        assert c.cmd("query-jobs") == [], actions
    assert c.cmd("transaction", actions=[]) == {}
    # The aborted backup left t0 free: it can be deleted.
    c.cmd("blockdev-del", {"node-name": "t0"})


def test_array_arguments_are_bounded(tmp_path):
    """bitbackd bounds the arrays a client can send (DESIGN.md D7; QEMU
    has no such limits): at most 1024 actions in a transaction and 1024
    sources in a bitmap merge, alone or as a transaction action
    (qmp_array_alloc)."""
    raw_image(tmp_path / "src.raw", MiB)
    abort = {"type": "abort", "data": {}}
    with Daemon(tmp_path) as d:
        d.start("--blockdev", raw_node("d0", "src.raw"))
        c = d.qmp
        c.cmd("block-dirty-bitmap-add", node="d0", name="b0")
        c.cmd("block-dirty-bitmap-add", node="d0", name="b1")
        e = c.error("transaction", actions=[abort] * 1025)
        assert (e.cls, e.desc) == (
            "GenericError", "Too many actions in one transaction (at most 1024)")
        e = c.error("transaction", actions=[abort] * 1024)
        assert e.desc == "Transaction aborted using Abort action"
        merge = {"node": "d0", "target": "b0"}
        e = c.error("block-dirty-bitmap-merge", bitmaps=["b1"] * 1025, **merge)
        assert (e.cls, e.desc) == (
            "GenericError", "Too many bitmaps to merge (at most 1024)")
        e = c.error("transaction", actions=[{
            "type": "block-dirty-bitmap-merge",
            "data": dict(merge, bitmaps=["b1"] * 1025)}])
        assert e.desc == "Too many bitmaps to merge (at most 1024)"
        assert c.cmd("block-dirty-bitmap-merge", bitmaps=["b1"] * 1024,
                     **merge) == {}
        c.cmd("transaction", actions=[{
            "type": "block-dirty-bitmap-merge",
            "data": dict(merge, bitmaps=["b1"] * 1024)}])


def test_transaction_rolls_back_bitmap_actions(daemon):
    c = daemon.qmp
    c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
          writable=True)
    uri = daemon.nbd_uri("d0")
    qemu_io(uri, "write -P 0x44 1M 64k", "write -P 0x45 30M 192k")
    c.cmd("block-dirty-bitmap-add", node="d0", name="b1", disabled=True)
    c.cmd("block-dirty-bitmap-add", node="d0", name="b3")
    qemu_io(uri, "write -P 0x46 40M 64k")     # b0 and b3, not b1
    before = bitmaps_of(c, "d0")
    assert before["b0"][0] == (64 + 192 + 64) * 1024
    assert before["b1"][0] == 0 and not before["b1"][1]
    names_before = [n["node-name"] for n in c.cmd("query-named-block-nodes")]

    actions = [
        {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b2"}},
        {"type": "block-dirty-bitmap-merge",
         "data": {"node": "d0", "target": "b1", "bitmaps": ["b0"]}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "b0"}},
        {"type": "block-dirty-bitmap-enable", "data": {"node": "d0", "name": "b1"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "d0", "name": "b3"}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "d0", "name": "b3"}},
    ]
    e = c.error("transaction", actions=actions + [{"type": "abort", "data": {}}])
    assert e.desc == "Transaction aborted using Abort action"
    assert bitmaps_of(c, "d0") == before
    assert [n["node-name"] for n in c.cmd("query-named-block-nodes")] == \
        names_before
    # Recording states were restored too: a new write reaches b0 and b3
    # only.
    qemu_io(uri, "write -P 0x47 50M 64k")
    after = bitmaps_of(c, "d0")
    assert after["b0"][0] == before["b0"][0] + 64 * 1024
    assert after["b3"][0] == before["b3"][0] + 64 * 1024
    assert after["b1"] == before["b1"]

    # Without the abort, every action takes effect.
    c.cmd("transaction", actions=actions)
    done = bitmaps_of(c, "d0")
    assert set(done) == {"b0", "b1", "b2"}
    assert done["b0"][0] == 0
    assert done["b1"][0] == after["b0"][0] and done["b1"][1]
    assert done["b2"][0] == 0 and done["b2"][1]


def test_blockdev_backup_full_is_exact(daemon, tmp_path):
    c = daemon.qmp
    c.cmd("blockdev-backup", backup_args(speed=0))
    ev = wait_job_end(c, "j")
    assert ev["event"] == "BLOCK_JOB_COMPLETED"
    assert "error" not in ev["data"]
    assert ev["data"]["offset"] == ev["data"]["len"] == SIZE
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
         tmp_path / "src.raw", tmp_path / "t0.raw"])
    # A different image differs (the comparison can fail).
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
             tmp_path / "src.raw", tmp_path / "t1.raw"], check=False)
    assert p.returncode == 1


def test_transaction_commits_bitmap_clear_with_backup_and_grouped_jobs(
        daemon, tmp_path):
    c = daemon.qmp
    c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
          writable=True)
    qemu_io(daemon.nbd_uri("d0"), "write -P 0x61 5M 64k")
    assert c.bitmap("d0", "b0")["count"] == 64 * 1024
    c.cmd("transaction", actions=[
        {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "b0"}},
        {"type": "blockdev-backup", "data": backup_args()}])
    assert c.bitmap("d0", "b0")["count"] == 0
    assert wait_job_end(c, "j")["event"] == "BLOCK_JOB_COMPLETED"
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
         tmp_path / "src.raw", tmp_path / "t0.raw"])
    # Two jobs completing together.  t1.raw is open in the daemon for
    # writing (image locking): write it through an export.
    c.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "t1"},
          writable=True)
    qemu_io(daemon.nbd_uri("t1"), "write -P 0x62 7M 1M")
    c.del_export("e1")
    c.cmd("transaction", actions=[
        {"type": "blockdev-backup", "data": backup_args(**{"job-id": "ga"},
                                                        target="t0")},
        {"type": "blockdev-backup", "data": backup_args(
            **{"job-id": "gb"}, device="t1", target="t2")}],
        properties={"completion-mode": "grouped"})
    ends = {wait_job_end(c, j)["event"] for j in ("ga", "gb")}
    assert ends == {"BLOCK_JOB_COMPLETED"}
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
         tmp_path / "t1.raw", tmp_path / "t2.raw"])


def test_blockdev_backup_default_job_id_is_device(tmp_path):
    """bitbackd names a job after its device when job-id is absent (QEMU
    needs an explicit id for nodes without a device name)."""
    raw_image(tmp_path / "src.raw")
    raw_image(tmp_path / "t0.raw")
    with Daemon(tmp_path) as d:
        d.start("--blockdev", raw_node("d0", "src.raw"),
                "--blockdev", raw_node("t0", "t0.raw"))
        d.qmp.cmd("blockdev-backup", device="d0", target="t0", sync="full",
                  speed=1)
        assert [j["id"] for j in d.qmp.cmd("query-jobs")] == ["d0"]
        d.qmp.cmd("job-cancel", id="d0")
        wait_no_job(d.qmp, "d0")


def test_blockdev_del_refuses_nodes_of_a_running_job(daemon):
    c = daemon.qmp
    c.cmd("blockdev-backup", backup_args(speed=1))
    e = c.error("blockdev-del", {"node-name": "t0"})
    assert e.desc == "Node 't0' is busy: block device is in use by block " \
                     "job: backup"
    e = c.error("blockdev-del", {"node-name": "d0"})
    assert e.desc == "Block device d0 is in use"
    e = c.error("blockdev-backup", backup_args(device="t1", **{"job-id": "k"}))
    assert e.desc == "Node 't0' is busy: block device is in use by block " \
                     "job: backup"
    c.cmd("job-cancel", id="j")
    wait_no_job(c, "j")
    c.cmd("blockdev-del", {"node-name": "t0"})
    assert c.node("t0") is None


def create_overlay(kind, path, backing, backing_fmt="raw"):
    if kind == "qsd":
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing),
             "-F", backing_fmt, str(path)])
    else:
        run([BITBACK, "img", "create", "-f", "qbm", "-b", str(backing),
             "-F", backing_fmt, str(path)])


def image_info(path):
    return json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout) \
        if not str(path).endswith(".qbm") else \
        json.loads(run([BITBACK, "img", "info", "-U", "--output=json",
                        str(path)]).stdout)


def test_drive_backup_creates_its_target(daemon, tmp_path):
    c = daemon.qmp
    c.cmd("drive-backup", backup_args(target="new.raw"))
    assert wait_job_end(c, "j")["event"] == "BLOCK_JOB_COMPLETED"
    info = image_info(tmp_path / "new.raw")
    assert info["format"] == "raw" and info["virtual-size"] == SIZE
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
         tmp_path / "src.raw", tmp_path / "new.raw"])
    # The job's target node was auto-named and went away with the job.
    names = [n["node-name"] for n in c.cmd("query-named-block-nodes")]
    assert sorted(n for n in names if not n.startswith("#")) == \
        ["d0", "small", "t0", "t1", "t2"]
    assert len(names) == 10      # 5 format nodes + their file nodes
    # An existing target, mode=existing (one no node holds: a file a
    # writable node has open is locked, in the daemon too).
    raw_image(tmp_path / "t3.raw")
    c.cmd("drive-backup", backup_args(target="t3.raw", mode="existing",
                                      format="raw", **{"job-id": "j2"}))
    assert wait_job_end(c, "j2")["event"] == "BLOCK_JOB_COMPLETED"
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
         tmp_path / "src.raw", tmp_path / "t3.raw"])


def test_drive_backup_sync_none_gets_the_source_as_backing(kind, tmp_path):
    """sync=none into a new overlay: the image names the source as its
    backing file, and the node reads the live source where nothing was
    copied (the fleecing view)."""
    fmt = "qcow2" if kind == "qsd" else "qbm"
    src = raw_image(tmp_path / "src.raw")
    qemu_io(src, "write -P 0x5a 0 4M")
    with Daemon(tmp_path, binary=binary(kind)) as d:
        d.start("--blockdev", raw_node("d0", "src.raw"), nbd=True)
        c = d.qmp
        c.cmd("drive-backup", {"job-id": "f", "device": "d0", "sync": "none",
                               "target": f"fl.{fmt}", "format": fmt})
        info = image_info(tmp_path / f"fl.{fmt}")
        assert os.path.realpath(info["full-backing-filename"]) == \
            os.path.realpath(src)
        assert info["virtual-size"] == SIZE
        jobs = c.cmd("query-jobs")
        assert [(j["id"], j["status"]) for j in jobs] == [("f", "running")]
        c.cmd("job-cancel", id="f")
        wait_no_job(c, "f")
    # Through its backing file, the overlay reads the source's data.
    if kind == "qsd":
        qemu_io(tmp_path / f"fl.{fmt}", "read -P 0x5a 0 4M", fmt=fmt,
                readonly=True)
    else:
        p = run([BITBACK, "io", "-r", "-f", fmt, tmp_path / f"fl.{fmt}",
                 "-c", "read -P 0x5a 0 4M", "-c", "read -P 0 4M 4M"])
        assert "fail" not in p.stdout.lower(), p.stdout


def start_qemu_nbd(tmp_path, image):
    require("qemu-nbd")
    sockdir = tempfile.mkdtemp(prefix="bbn-")
    sock = os.path.join(sockdir, "n.sock")
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", sock, "-t",
                             "-x", "tgt", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"qemu-nbd did not start: "
                                 f"{proc.stderr.read()}")
        time.sleep(0.02)
    return proc, sockdir, f"nbd+unix:///tgt?socket={sock}"


def test_drive_backup_to_an_nbd_uri(daemon, tmp_path):
    remote = raw_image(tmp_path / "remote.raw")
    proc, sockdir, uri = start_qemu_nbd(tmp_path, remote)
    try:
        c = daemon.qmp
        # mode=existing and format=raw: what QEMU needs; bitbackd also
        # accepts the defaults (an NBD URI is never created).
        c.cmd("drive-backup", backup_args(target=uri, mode="existing",
                                          format="raw"))
        assert wait_job_end(c, "j")["event"] == "BLOCK_JOB_COMPLETED"
        if daemon.kind == "bitbackd":
            qemu_io(uri, "write -P 0x99 0 1M")
            c.cmd("drive-backup", backup_args(target=uri, **{"job-id": "j2"}))
            assert wait_job_end(c, "j2")["event"] == "BLOCK_JOB_COMPLETED"
            # Size must match.
            e = c.error("drive-backup", backup_args(device="small", target=uri,
                                                    **{"job-id": "j3"}))
            assert e.desc == "Source and target image have different sizes"
        wait_no_job(c, "j")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(sockdir, ignore_errors=True)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
         tmp_path / "src.raw", remote])


def test_backing_option_and_bitmap_on_backing_node(kind, tmp_path):
    fmt = "qcow2" if kind == "qsd" else "qbm"
    base = raw_image(tmp_path / "base.raw")
    decoy = raw_image(tmp_path / "decoy.raw")
    qemu_io(decoy, "write -P 0xdd 0 64M")
    qemu_io(base, "write -P 0xbb 0 8M")
    create_overlay(kind, tmp_path / f"ov.{fmt}", decoy)
    create_overlay(kind, tmp_path / f"ov2.{fmt}", decoy)
    with Daemon(tmp_path, binary=binary(kind)) as d:
        d.start("--blockdev", raw_node("base", "base.raw"), nbd=True)
        c = d.qmp
        c.cmd("block-dirty-bitmap-add", node="base", name="b0")
        c.cmd("block-export-add", type="nbd", id="eb",
              **{"node-name": "base"}, writable=True)
        qemu_io(d.nbd_uri("base"), "write -P 0x01 1M 64k",
                "write -P 0x02 10M 128k")
        c.del_export("eb")
        deadline = time.monotonic() + 30
        while c.cmd("query-block-exports"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # A disabled bitmap can be exported (QEMU refuses an enabled one
        # on a writable node for a read-only export).
        c.cmd("block-dirty-bitmap-disable", node="base", name="b0")

        # backing: "base" overrides the decoy named in the image.
        c.cmd("blockdev-add", {"driver": fmt, "node-name": "ov",
                               "file": {"driver": "file",
                                        "filename": f"ov.{fmt}"},
                               "backing": "base"})
        # backing: null means none.
        c.cmd("blockdev-add", {"driver": fmt, "node-name": "ov2",
                               "file": {"driver": "file",
                                        "filename": f"ov2.{fmt}"},
                               "backing": None})
        assert c.node("ov")["backing_file_depth"] == 1
        assert c.node("ov2")["backing_file_depth"] == 0

        e = c.error("block-export-add", type="nbd", id="e1",
                    **{"node-name": "ov"}, bitmaps=["nope"])
        assert e.desc == "Bitmap 'nope' is not found"
        c.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "ov"},
              bitmaps=["b0"])
        c.cmd("block-export-add", type="nbd", id="e2", **{"node-name": "ov2"})
        uri = d.nbd_uri("ov")
        assert dirty_extents(uri, "b0") == [(1 * MiB, 64 * 1024),
                                            (10 * MiB, 128 * 1024)]
        # The exported bitmap is busy while exported.
        assert c.bitmap("base", "b0")["busy"] is True
        qemu_io(uri, "read -P 0x01 1M 64k", "read -P 0xbb 2M 1M",
                "read -P 0 8M 1M", readonly=True)
        qemu_io(d.nbd_uri("ov2"), "read -P 0 0 16M", readonly=True)
