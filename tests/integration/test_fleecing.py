"""Image fleecing (issue 4), the seed's recipe, on bitbackd and
qemu-storage-daemon.

A backup application wants the dirty clusters of a frozen moment while the
guest keeps writing.  The recipe:

  1. blockdev-add an overlay (qbm on bitbackd, qcow2 on qemu-storage-daemon)
     whose backing is the live node ("backing": "disk0");
  2. one transaction: block-dirty-bitmap-add b1 (the new active bitmap),
     block-dirty-bitmap-disable b0 (frozen), blockdev-backup sync=none from
     disk0 into the overlay (copy-before-write keeps the old data there);
  3. block-export-add the overlay with bitmaps ["b0"] (b0 lives on the
     backing node).

While a writer thread keeps writing to disk0 through NBD, nbdinfo
--map=qemu:dirty-bitmap:b0 on the fleecing export must list exactly the
dirty set frozen at the transaction, and qemu-img convert of the export
must give the image as it was then.
"""
import random
import shutil
import threading

from backup_scenarios import (MiB, Flavour, add_overlay, assert_same, chain_flavour,
                              bitmap_count, clusters_of,
                              connect, dirty_extents, export,
                              extents_to_clusters, flavour, random_image,
                              random_writes, reference_copy, run, unexport,
                              wait_job_end, nbd_write)
from conftest import BITBACK

assert flavour and chain_flavour  # fixtures, used by name

SIZE = 64 * MiB


class Writer(threading.Thread):
    """Keeps writing random 4-64 KiB blocks through NBD until stopped;
    remembers what it wrote."""

    def __init__(self, uri, seed):
        super().__init__(daemon=True)
        self.uri = uri
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.writes = []
        self.error = None

    def run(self):
        try:
            h = connect(self.uri)
            try:
                while not self.stop.is_set():
                    length = self.rng.choice([4096, 16384, 65536])
                    off = self.rng.randrange(0, SIZE - length) // 4096 * 4096
                    data = self.rng.randbytes(length)
                    h.pwrite(data, off)
                    self.writes.append((off, data))
                h.flush()
            finally:
                h.shutdown()
        except Exception as e:      # reported by the test
            self.error = e

    def let_run(self, count=50):
        """Wait until the writer has made `count` writes (or died)."""
        while len(self.writes) < count and self.is_alive():
            self.stop.wait(0.01)

    def finish(self):
        self.stop.set()
        self.join(60)
        assert not self.is_alive(), "writer did not stop"
        assert self.error is None, f"writer failed: {self.error}"


def assert_raw_same(a, b, what):
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
            check=False)
    assert p.returncode == 0, f"{what}: {p.stdout}"


def test_fleecing_frozen_view_while_writing(flavour):
    fl = flavour
    img = random_image(fl.path("disk0.raw"), SIZE, seed=3)
    fleece = fl.create_overlay(fl.overlay_name("fleece"), img)
    d = fl.start({"disk0": img})
    q = d.qmp
    uri = d.nbd_uri("disk0")
    export(q, "disk0", writable=True)
    q.cmd("block-dirty-bitmap-add", node="disk0", name="b0")
    rng = random.Random(5)
    before = random_writes(rng, SIZE, 60, length=8192)
    nbd_write(uri, before)
    frozen = clusters_of(before)
    assert bitmap_count(q, "disk0", "b0") == len(frozen) * 64 * 1024
    # No writer runs now: this is the image at the transaction.
    ref = reference_copy(uri, fl.path("ref.raw"))

    add_overlay(fl, "fleece", fleece, "disk0")
    q.cmd("transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "b1"}},
        {"type": "block-dirty-bitmap-disable",
         "data": {"node": "disk0", "name": "b0"}},
        {"type": "blockdev-backup",
         "data": {"job-id": "fleecing", "device": "disk0",
                  "target": "fleece", "sync": "none"}}])
    writer = Writer(uri, seed=9)
    writer.start()
    try:
        export(q, "fleece", bitmaps=["b0"])
        furi = d.nbd_uri("fleece")
        # Let the writer make some progress first (it must not stop the
        # fleecing view from being frozen).
        writer.let_run()
        extents = dirty_extents(furi, "b0")
        assert extents_to_clusters(extents) == frozen
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", furi,
             fl.path("pulled.raw")])
        written_during = len(writer.writes)
    finally:
        writer.finish()
    assert written_during >= 50
    assert_raw_same(fl.path("pulled.raw"), ref, "fleecing view is not frozen")

    # The writer's writes went to disk0 and into the new active bitmap b1;
    # b0 stayed frozen.
    assert bitmap_count(q, "disk0", "b0") == len(frozen) * 64 * 1024
    assert bitmap_count(q, "disk0", "b1") == \
        len(clusters_of(writer.writes)) * 64 * 1024
    # disk0 = the frozen image + the writer's writes, in order.
    expected = fl.path("expected.raw")
    shutil.copyfile(ref, expected)
    with open(expected, "r+b") as f:
        for off, data in writer.writes:
            f.seek(off)
            f.write(data)
    assert_same(uri, expected)

    # Tear down as a backup application would.
    unexport(q, "fleece")
    q.cmd("block-job-cancel", device="fleecing")
    ev = wait_job_end(q, "fleecing")
    assert ev["event"] in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), ev
    q.cmd("blockdev-del", **{"node-name": "fleece"})
    assert all(n["node-name"] != "fleece"
               for n in q.cmd("query-named-block-nodes"))
    assert d.quit() == 0


# -- a qbm target created empty, its backing given at blockdev-add ----------
#
# QEMU's fleecing recipe creates the target without a backing file
# (`qemu-img create -f qcow2 fleece.qcow2 SIZE`) and names the live node as
# its backing at blockdev-add.  A qbm created that way has no allocation
# bitmap; it must still read what it has not written from the backing node
# (docs/specs/qbm.md section 4.1), and one whose data image already holds
# data must be refused, never read as zeros.

def empty_qbm(path, size):
    run([BITBACK, "img", "create", "-f", "qbm", path, str(size)])
    return path


def test_fleecing_into_an_empty_qbm_with_backing_at_blockdev_add(tmp_path):
    fl = Flavour("bitbackd", tmp_path)
    try:
        img = random_image(fl.path("disk0.raw"), SIZE, seed=11)
        fleece = empty_qbm(fl.path("fleece.qbm"), SIZE)
        d = fl.start({"disk0": img})
        q = d.qmp
        uri = d.nbd_uri("disk0")
        export(q, "disk0", writable=True)
        nbd_write(uri, random_writes(random.Random(12), SIZE, 40, length=8192))
        ref = reference_copy(uri, fl.path("ref.raw"))   # the fleecing point

        add_overlay(fl, "fleece", fleece, "disk0")
        q.cmd("blockdev-backup", **{"job-id": "fleecing", "device": "disk0",
                                    "target": "fleece", "sync": "none"})
        writer = Writer(uri, seed=13)
        writer.start()
        try:
            export(q, "fleece")
            furi = d.nbd_uri("fleece")
            writer.let_run()
            run(["nbdcopy", furi, fl.path("pulled.raw")])
            written_during = len(writer.writes)
        finally:
            writer.finish()
        assert written_during >= 50
        assert_raw_same(fl.path("pulled.raw"), ref, "fleecing export of an "
                        "empty qbm is not the image at the fleecing point")
        # And qemu-img convert of the export agrees.
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
             d.nbd_uri("fleece"), fl.path("pulled2.raw")])
        assert_raw_same(fl.path("pulled2.raw"), ref, "qemu-img convert")

        unexport(q, "fleece")
        q.cmd("block-job-cancel", device="fleecing")
        wait_job_end(q, "fleecing")
        q.cmd("blockdev-del", **{"node-name": "fleece"})
        assert d.quit() == 0, d.stderr()
    finally:
        fl.daemon.cleanup()


def test_qbm_holding_data_refuses_a_backing_node(tmp_path):
    fl = Flavour("bitbackd", tmp_path)
    try:
        img = random_image(fl.path("disk0.raw"), SIZE, seed=21)
        full = empty_qbm(fl.path("full.qbm"), SIZE)
        run([BITBACK, "io", "-c", "write -P 0x5a 1M 64K", full])
        empty = empty_qbm(fl.path("empty.qbm"), SIZE)
        d = fl.start({"disk0": img})
        q = d.qmp
        err = q.error("blockdev-add", driver="qbm", **{"node-name": "ov"},
                      file={"driver": "file", "filename": str(full)},
                      backing="disk0")
        assert "has no allocation bitmap" in err.desc, err.desc
        assert "holds data" in err.desc, err.desc
        assert q.node("ov") is None
        # Without a backing node it opens as it always did.
        q.cmd("blockdev-add", driver="qbm", **{"node-name": "ov"},
              file={"driver": "file", "filename": str(full)})
        q.cmd("blockdev-del", **{"node-name": "ov"})
        # An empty one reads the backing node where it has not written.
        add_overlay(fl, "ov2", empty, "disk0")
        export(q, "ov2", writable=True)
        ouri = d.nbd_uri("ov2")
        nbd_write(ouri, [(4 * MiB, b"\xee" * 65536)])
        expected = fl.path("expected.raw")
        shutil.copyfile(img, expected)
        with open(expected, "r+b") as f:
            f.seek(4 * MiB)
            f.write(b"\xee" * 65536)
        assert_same(ouri, expected)
        unexport(q, "ov2")
        q.cmd("blockdev-del", **{"node-name": "ov2"})
        # It now holds data: it refuses a backing node from now on.
        err = q.error("blockdev-add", driver="qbm", **{"node-name": "ov3"},
                      file={"driver": "file", "filename": str(empty)},
                      backing="disk0")
        assert "holds data" in err.desc, err.desc
        assert d.quit() == 0, d.stderr()
    finally:
        fl.daemon.cleanup()


def test_drive_backup_sync_none_into_a_qbm_holding_data_refused(tmp_path):
    """drive-backup sync=none links the live source under an existing
    target after opening it: the same rule as a backing at blockdev-add."""
    fl = Flavour("bitbackd", tmp_path)
    try:
        img = random_image(fl.path("disk0.raw"), SIZE, seed=31)
        full = empty_qbm(fl.path("full.qbm"), SIZE)
        run([BITBACK, "io", "-c", "write -P 0x5a 1M 64K", full])
        before = open(fl.path("full.raw"), "rb").read()
        d = fl.start({"disk0": img})
        q = d.qmp
        args = {"job-id": "j0", "device": "disk0", "sync": "none",
                "mode": "existing", "format": "qbm"}
        err = q.error("drive-backup", target=str(full), **args)
        assert "holds data" in err.desc, err.desc
        assert q.cmd("query-jobs") == []
        assert open(fl.path("full.raw"), "rb").read() == before
        # An empty qbm takes the source as its backing.
        empty = empty_qbm(fl.path("empty.qbm"), SIZE)
        q.cmd("drive-backup", target=str(empty), **args)
        q.cmd("block-job-cancel", device="j0")
        wait_job_end(q, "j0")
        assert d.quit() == 0, d.stderr()
    finally:
        fl.daemon.cleanup()


# -- a pull reads everything once and copies only what the guest overwrites --
#
# A fleecing read must not copy the clusters it reads into the overlay
# (that wrote the whole disk twice for a pull backup: into the overlay and
# into the repository).  After reading the whole export, the overlay holds
# exactly the clusters the guest overwrote meanwhile (their old data), on
# bitbackd as on qemu-storage-daemon, and what was read is the frozen image.

def test_fleecing_read_copies_only_overwritten_clusters(chain_flavour):
    fl = chain_flavour
    img = random_image(fl.path("disk0.raw"), SIZE, seed=11)
    ref = fl.path("ref.raw")
    shutil.copyfile(img, ref)
    fleece = fl.create_overlay(fl.overlay_name("fleece"), img)
    d = fl.start({"disk0": img})
    q = d.qmp
    uri = d.nbd_uri("disk0")
    export(q, "disk0", writable=True)
    add_overlay(fl, "fleece", fleece, "disk0")
    q.cmd("blockdev-backup", **{"job-id": "fleecing", "device": "disk0",
                               "target": "fleece", "sync": "none"})
    export(q, "fleece")
    furi = d.nbd_uri("fleece")
    # The whole export, read with no guest write: nothing is copied.
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", furi,
         fl.path("pulled1.raw")])
    # Then the guest overwrites 5 clusters; a second full read still sees
    # the frozen image.
    rng = random.Random(13)
    writes = random_writes(rng, SIZE, 5, length=4096)
    nbd_write(uri, writes)
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", furi,
         fl.path("pulled2.raw")])
    unexport(q, "fleece")
    q.cmd("block-job-cancel", device="fleecing")
    wait_job_end(q, "fleecing")
    q.cmd("blockdev-del", **{"node-name": "fleece"})
    assert d.quit() == 0

    assert_raw_same(fl.path("pulled1.raw"), ref, "first read not frozen")
    assert_raw_same(fl.path("pulled2.raw"), ref, "second read not frozen")
    assert fl.top_allocated(fleece) == len(clusters_of(writes)) * 64 * 1024
