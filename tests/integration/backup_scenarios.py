"""Shared helpers for the live-backup scenario tests (issue 4).

Every scenario is written once, as QMP that a qemu-storage-daemon backup
script would send, and runs against both daemons: the `flavour` fixture
parametrizes a test over "bitbackd" and "qsd".  The only thing that differs
is the overlay format: bitbackd uses our qbm overlays (driver "qbm", made
with `bitback img create -f qbm -b BACKING`), qemu-storage-daemon uses qcow2
(made with `qemu-img create -f qcow2 -b BACKING`).  Raw images and NBD
targets work on both.

Results are checked with real tools: qemu-img compare / convert against
NBD exports of the nodes, nbdinfo --map for dirty bitmaps, libnbd for the
writes, qemu-img map / bitback img map for what an overlay allocates.
"""
import contextlib
import json
import os
import pathlib
import random
import subprocess
import tempfile
import time

import pytest

from bitback_testlib import QSD, Daemon
from bitback_testlib.nbdio import connect
from conftest import BITBACK, dirty_extents, require, run

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB          # bitmap granularity and overlay cluster size

DAEMONS = ["bitbackd", "qsd"]


class Flavour:
    """One daemon kind with its overlay format, in a test folder."""

    def __init__(self, kind, tmp_path):
        self.kind = kind
        self.dir = pathlib.Path(tmp_path)
        # "bitbackd-qcow2": bitbackd with qcow2 overlays (our qcow2 driver).
        self.overlay_driver = "qbm" if kind == "bitbackd" else "qcow2"
        self.daemon = Daemon(self.dir, binary=QSD if kind == "qsd" else None)

    def path(self, name):
        return self.dir / name

    def overlay_name(self, stem):
        return self.path(f"{stem}.{self.overlay_driver}")

    def create_overlay(self, path, backing, backing_fmt="raw"):
        """An overlay image at path whose backing file is `backing`."""
        if self.kind == "qsd":
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing,
                 "-F", backing_fmt, path])
        else:
            run([BITBACK, "img", "create", "-f", self.overlay_driver, "-b",
                 backing, "-F", backing_fmt, path])
        return path

    def top_allocated(self, path):
        """Bytes an overlay allocates itself (depth 0 in `img map`).  Run
        it with no daemon holding the image."""
        if self.overlay_driver == "qcow2":
            out = run(["qemu-img", "map", "--output=json", "-f", "qcow2",
                       path]).stdout
        else:
            out = run([BITBACK, "img", "map", "--output=json", "-f", "qbm",
                       path]).stdout
        return sum(e["length"] for e in json.loads(out)
                   if e["depth"] == 0 and (e["data"] or e["zero"]))

    def start(self, disks, *extra):
        """Start the daemon with nodes {node: image path} (raw) or {node:
        (image path, driver)} and an NBD server; returns the daemon."""
        args = []
        for node, image in disks.items():
            image, driver = image if isinstance(image, tuple) \
                else (image, "raw")
            args += ["--blockdev", f"driver={driver},node-name={node},"
                     f"file.driver=file,file.filename={image}"]
        self.daemon.start(*args, *extra, nbd=True)
        return self.daemon


def _flavour(kind, tmp_path):
    """A Flavour of `kind`; the daemon is killed at the end."""
    for tool in ("qemu-img", "nbdinfo"):
        require(tool)
    if kind == "qsd":
        require(QSD)
    f = Flavour(kind, tmp_path)
    try:
        yield f
    finally:
        f.daemon.cleanup()


@pytest.fixture(params=DAEMONS)
def flavour(request, tmp_path):
    """A Flavour per daemon kind."""
    yield from _flavour(request.param, tmp_path)


@pytest.fixture(params=DAEMONS + ["bitbackd-qcow2"])
def chain_flavour(request, tmp_path):
    """As flavour, plus bitbackd writing its backup chain as qcow2."""
    yield from _flavour(request.param, tmp_path)


# -- images -------------------------------------------------------------

def random_image(path, size, seed=1, allocated=1.0):
    """A raw image of `size` bytes; with allocated < 1 only that share of
    its 1 MiB chunks holds random data, the rest are holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        chunks = list(range(size // MiB))
        if allocated < 1.0:
            chunks = sorted(rng.sample(chunks, int(len(chunks) * allocated)))
        for c in chunks:
            f.seek(c * MiB)
            f.write(rng.randbytes(MiB))
    return path


def empty_image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# -- QMP helpers --------------------------------------------------------

def add_raw_target(q, node, path, size):
    """blockdev-add a raw file node; creates an empty (sparse) file."""
    empty_image(path, size)
    q.cmd("blockdev-add", driver="raw", **{"node-name": node},
          file={"driver": "file", "filename": str(path)})


def add_overlay(fl, node, path, backing):
    """blockdev-add an overlay node whose backing is the node `backing`
    (a node reference, overriding the backing named in the image)."""
    fl.daemon.qmp.cmd("blockdev-add", driver=fl.overlay_driver,
                      **{"node-name": node},
                      file={"driver": "file", "filename": str(path)},
                      backing=backing)


def export(q, node, name=None, writable=False, bitmaps=()):
    name = name or node
    q.cmd("block-export-add", type="nbd", id=f"exp-{name}",
          **{"node-name": node}, name=name, writable=writable,
          bitmaps=list(bitmaps))
    return name


def unexport(q, name):
    q.del_export(f"exp-{name}")
    # Wait until the export is really gone (QEMU removes it asynchronously).
    for _ in range(500):
        if all(e["id"] != f"exp-{name}" for e in q.cmd("query-block-exports")):
            return
        time.sleep(0.01)
    raise AssertionError(f"export {name} not removed")


def bitmap_sha256(q, node, name):
    return q.cmd("x-debug-block-dirty-bitmap-sha256", node=node,
                 name=name)["sha256"]


def bitmap_count(q, node, name):
    b = q.bitmap(node, name)
    assert b is not None, f"no bitmap {name} on {node}"
    return b["count"]


def wait_event(q, pred, timeout=120):
    """Wait for (and remove from q.events) the first event with pred(ev)."""
    return q.wait_event(pred, timeout)


def wait_job_end(q, job_id, timeout=120):
    """The BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED event of job_id (its
    "device" is the job id, as in QEMU).  Fails at once, rather than at the
    timeout, if the job concludes without such an event."""
    def is_end(ev):
        return ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") \
            and ev["data"].get("device") == job_id

    def is_end_or_concluded(ev):
        return is_end(ev) or (ev["event"] == "JOB_STATUS_CHANGE"
                              and ev["data"].get("id") == job_id
                              and ev["data"].get("status") == "concluded")

    ev = wait_event(q, is_end_or_concluded, timeout)
    if is_end(ev):
        return ev
    # BLOCK_JOB_COMPLETED/CANCELLED come before "concluded": a matching one
    # may still be queued behind it; otherwise the job's events are wrong.
    for i, other in enumerate(q.events):
        if is_end(other):
            return q.events.pop(i)
    raise AssertionError(
        f"job {job_id} concluded without a BLOCK_JOB_COMPLETED/CANCELLED "
        f"event whose device is {job_id!r}; end events seen: "
        f"{[e for e in q.events if e['event'].startswith('BLOCK_JOB_')]}")


def job_ok(q, job_id, timeout=120):
    """Wait for job_id to complete and fail the test unless it succeeded."""
    ev = wait_job_end(q, job_id, timeout)
    assert ev["event"] == "BLOCK_JOB_COMPLETED", ev
    assert "error" not in ev["data"], ev
    return ev


def backup(q, job_id, device, target, sync, **kw):
    args = {"job-id": job_id, "device": device, "target": target,
            "sync": sync}
    args.update({k.replace("_", "-"): v for k, v in kw.items()})
    q.cmd("blockdev-backup", args)


def job_progress(q, job_id):
    for j in q.cmd("query-jobs"):
        if j["id"] == job_id:
            return j
    return None


# -- NBD helpers ----------------------------------------------------------

def nbd_write(uri, writes):
    """Write [(offset, bytes)] through NBD, then flush."""
    h = connect(uri)
    try:
        for off, data in writes:
            h.pwrite(data, off)
        h.flush()
    finally:
        h.shutdown()


def nbd_read(uri, offset, length):
    h = connect(uri)
    try:
        return h.pread(length, offset)
    finally:
        h.shutdown()


def random_writes(rng, size, count, length=4 * KiB, lo=0, hi=None):
    """count writes of random data at random 4 KiB-aligned offsets."""
    hi = size if hi is None else hi
    out = []
    for _ in range(count):
        off = rng.randrange(lo, hi - length + 1) // (4 * KiB) * (4 * KiB)
        out.append((off, rng.randbytes(length)))
    return out


def clusters_of(writes, gran=CLUSTER):
    s = set()
    for off, data in writes:
        s.update(range(off // gran, (off + len(data) - 1) // gran + 1))
    return s


def extents_to_clusters(extents, gran=CLUSTER):
    s = set()
    for off, length in extents:
        s.update(range(off // gran, (off + length - 1) // gran + 1))
    return s


def bitmap_extents(fl, node, bitmap):
    """Dirty extents of node's bitmap as an NBD client sees them (nbdinfo
    --map=qemu:dirty-bitmap:NAME).  QEMU makes an exported bitmap busy, so
    the bitmap is exported only for this look, by a temporary export."""
    q = fl.daemon.qmp
    name = export(q, node, name=f"view-{node}", writable=True,
                  bitmaps=[bitmap])
    try:
        return dirty_extents(fl.daemon.nbd_uri(name), bitmap)
    finally:
        unexport(q, name)


def reference_copy(uri, out):
    """A raw copy of what an NBD export holds now."""
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out])
    return out


def assert_same(uri, reference):
    """qemu-img compare of an NBD export against a raw file."""
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, reference],
            check=False)
    assert p.returncode == 0, \
        f"{uri} differs from {reference}: {p.stdout} {p.stderr}"


def assert_files_same(image, reference, fmt="raw"):
    """qemu-img compare of an image file (which a daemon may hold open:
    -U) against a raw file."""
    p = run(["qemu-img", "compare", "-U", "-f", fmt, "-F", "raw", image,
             reference], check=False)
    assert p.returncode == 0, \
        f"{image} differs from {reference}: {p.stdout} {p.stderr}"


def overlay_matches(fl, node, reference):
    """Export node read-only, compare with reference, remove the export."""
    q = fl.daemon.qmp
    name = export(q, node)
    try:
        assert_same(fl.daemon.nbd_uri(name), reference)
    finally:
        unexport(q, name)


# -- nbdkit targets ---------------------------------------------------------

@contextlib.contextmanager
def nbdkit_target(size, fail_writes=True):
    """An nbdkit memory disk on a UNIX socket; with fail_writes, the error
    filter fails every write with EIO.  Yields the socket path."""
    require("nbdkit")
    sockdir = tempfile.mkdtemp(prefix="bbk-")
    sock = os.path.join(sockdir, "nbdkit.sock")
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", sock]
    if fail_writes:
        argv += ["--filter=error"]
    argv += ["memory", str(size)]
    if fail_writes:
        argv += ["error-pwrite=EIO", "error-pwrite-rate=100%",
                 "error-zero=EIO", "error-zero-rate=100%",
                 "error-trim=EIO", "error-trim-rate=100%"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        for _ in range(1000):
            if os.path.exists(sock):
                break
            if proc.poll() is not None:
                raise AssertionError(f"nbdkit exited: {proc.stderr.read()}")
            time.sleep(0.01)
        else:
            raise AssertionError("nbdkit socket did not appear")
        yield sock
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
        os.rmdir(sockdir)


def add_nbd_target(q, node, sock):
    q.cmd("blockdev-add", driver="nbd", **{"node-name": node},
          server={"type": "unix", "path": sock})

