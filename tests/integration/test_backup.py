"""Live backup jobs (issue 4) against bitbackd and qemu-storage-daemon.

Each scenario is the same QMP script for both daemons (see
backup_scenarios.py; only the overlay format differs: qbm for bitbackd,
qcow2 for qemu-storage-daemon).  A writer uses NBD (libnbd) while jobs run;
results are checked with qemu-img compare against copies taken at the right
moment, nbdinfo's view of the dirty bitmaps, and the overlays' allocation.

  point in time    a full backup holds the image as it was at job start,
                   although not-yet-copied areas are overwritten meanwhile
  incremental      full + bitmap clear in one transaction, two incrementals
                   into a chain of overlays; each equals its moment and
                   holds only the dirty clusters
  differential     bitmap-mode=never keeps the bitmap
  cancel           a cancelled incremental keeps every dirty bit
  target error     an NBD target that fails writes (nbdkit's error filter)
                   fails the job; the bitmap still gives a right incremental
  grouped          completion-mode=grouped over two disks: one target fails,
                   no bitmap advances
  lifecycle        JOB_STATUS_CHANGE sequence, finalize/dismiss, pause/resume
  sync=top         only what the top layer allocates
  drive-backup     to an NBD URL (nbdkit) and to a new file
  sparse           a full backup of a mostly empty image stays small
                   (bitbackd only)
"""
import os
import random
import time

import pytest

from backup_scenarios import (CLUSTER, MiB, add_nbd_target, add_overlay,
                              add_raw_target, assert_files_same, assert_same,
                              backup, bitmap_count, bitmap_extents,
                              bitmap_sha256, chain_flavour, clusters_of,
                              export,
                              extents_to_clusters, flavour, job_ok,
                              job_progress, nbd_read, nbd_write,
                              nbdkit_target, overlay_matches, random_image,
                              random_writes, reference_copy, wait_event,
                              wait_job_end)

from conftest import run

assert flavour and chain_flavour  # fixtures, used by name

SIZE = 64 * MiB


def start_disk(fl, bitmaps=("b0",), size=SIZE, node="disk0", seed=1):
    """bitbackd / qsd with a random raw image `node` exported writable
    as NBD export `node`, with `bitmaps` added; returns its URI.  (The
    bitmaps are not exported: an exported bitmap is busy in QEMU.)"""
    img = random_image(fl.path(f"{node}.raw"), size, seed=seed)
    d = fl.start({node: img})
    for b in bitmaps:
        d.qmp.cmd("block-dirty-bitmap-add", node=node, name=b)
    export(d.qmp, node, writable=True)
    return d.nbd_uri(node)


# -- point in time --------------------------------------------------------

def start_slow_full(fl):
    """disk0 served with no bitmap, a reference copy of it, and job0 (a full
    backup into full.raw at 1 MiB/s) started.  Returns (uri, q, ref)."""
    uri = start_disk(fl, bitmaps=())
    q = fl.daemon.qmp
    ref = reference_copy(uri, fl.path("ref.raw"))
    add_raw_target(q, "full", fl.path("full.raw"), SIZE)
    backup(q, "job0", "disk0", "full", "full", speed=1 * MiB)
    return uri, q, ref


def test_point_in_time_full_backup(flavour):
    fl = flavour
    uri, q, ref = start_slow_full(fl)
    progress = job_progress(q, "job0")
    assert progress is not None and progress["total-progress"] == SIZE
    # Overwrite areas the job has not reached yet (the end of the disk is
    # copied last) and one in the middle.
    rng = random.Random(7)
    writes = [(SIZE - 64 * 1024, rng.randbytes(64 * 1024)),
              (SIZE - 3 * MiB - 512, rng.randbytes(MiB + 1024)),
              (SIZE // 2 + 4096, rng.randbytes(8192)),
              (SIZE - 10 * MiB, rng.randbytes(4096))]
    lowest = min(off for off, _ in writes)
    assert job_progress(q, "job0")["current-progress"] < lowest
    nbd_write(uri, writes)
    q.cmd("block-job-set-speed", device="job0", speed=0)
    job_ok(q, "job0")

    assert_files_same(fl.path("full.raw"), ref)
    # The live image holds the new writes.
    for off, data in writes:
        assert nbd_read(uri, off, len(data)) == data
    # and the backup holds the old data there (not the new writes).
    with open(fl.path("full.raw"), "rb") as f:
        for off, data in writes:
            f.seek(off)
            assert f.read(len(data)) != data
    assert fl.daemon.quit() == 0



# -- incremental chain ------------------------------------------------------

def dirty_state(fl, node="disk0", bitmap="b0"):
    """(count, extents) of bitmap as QMP and an NBD client see it; checks
    that both agree."""
    q = fl.daemon.qmp
    count = bitmap_count(q, node, bitmap)
    extents = bitmap_extents(fl, node, bitmap)
    assert sum(length for _, length in extents) == count
    return count, extents


def test_incremental_chain(chain_flavour):
    fl = chain_flavour
    uri = start_disk(fl)
    q = fl.daemon.qmp
    rng = random.Random(11)

    # Writes before the full backup dirty b0; the transaction clears it.
    nbd_write(uri, random_writes(rng, SIZE, 20))
    assert bitmap_count(q, "disk0", "b0") > 0
    ref0 = reference_copy(uri, fl.path("ref0.raw"))
    full_backup_with_clear(fl, q, uri)
    assert bitmap_count(q, "disk0", "b0") == 0
    assert_files_same(fl.path("full.raw"), ref0)

    prev_node, prev_path, prev_fmt = "full", fl.path("full.raw"), "raw"
    dirty = {}
    for n in (1, 2):
        writes = random_writes(rng, SIZE, 40, length=rng.choice(
            [4096, 16384, 100000]))
        nbd_write(uri, writes)
        count, extents = dirty_state(fl)
        assert extents_to_clusters(extents) == clusters_of(writes)
        ref = reference_copy(uri, fl.path(f"ref{n}.raw"))

        path = fl.create_overlay(fl.overlay_name(f"inc{n}"), prev_path,
                                 prev_fmt)
        add_overlay(fl, f"inc{n}", path, prev_node)
        backup(q, f"inc{n}", "disk0", f"inc{n}", "incremental", bitmap="b0")
        job_ok(q, f"inc{n}")
        assert bitmap_count(q, "disk0", "b0") == 0
        overlay_matches(fl, f"inc{n}", ref)
        dirty[n] = (count, len(extents))
        prev_node, prev_path, prev_fmt = f"inc{n}", path, fl.overlay_driver

    assert fl.daemon.quit() == 0
    # Each incremental holds only the dirty clusters.
    for n, (count, nextents) in dirty.items():
        alloc = fl.top_allocated(fl.overlay_name(f"inc{n}"))
        assert abs(alloc - count) <= nextents * CLUSTER, \
            f"inc{n}: allocates {alloc} bytes for {count} dirty bytes " \
            f"in {nextents} extents"
        if fl.overlay_driver == "qcow2":
            # qemu-img judges our qcow2 (and QEMU's): no errors, no leaks.
            run(["qemu-img", "check", "-f", "qcow2",
                 str(fl.overlay_name(f"inc{n}"))])
            # The chain's top, flattened by qemu-img, is the image at that time.
            flat = fl.path(f"flat{n}.raw")
            run(["qemu-img", "convert", "-O", "raw",
                 str(fl.overlay_name(f"inc{n}")), str(flat)])
            assert_files_same(flat, fl.path(f"ref{n}.raw"))


def full_backup_with_clear(fl, q, uri):
    """Transaction [clear b0, full backup of disk0 into raw node "full"];
    returns the raw path of the full backup."""
    add_raw_target(q, "full", fl.path("full.raw"), SIZE)
    q.cmd("transaction", actions=[
        {"type": "block-dirty-bitmap-clear",
         "data": {"node": "disk0", "name": "b0"}},
        {"type": "blockdev-backup",
         "data": {"job-id": "full0", "device": "disk0", "target": "full",
                  "sync": "full"}}])
    job_ok(q, "full0")
    return fl.path("full.raw")


def dirty_after_full(fl, seed):
    """The set-up of the keep-the-bitmap tests: disk0 served, a full
    backup "full" that clears b0, then 30 random writes.  Returns (uri, q,
    rng, full path, writes)."""
    uri = start_disk(fl)
    q = fl.daemon.qmp
    rng = random.Random(seed)
    full = full_backup_with_clear(fl, q, uri)
    writes = random_writes(rng, SIZE, 30)
    nbd_write(uri, writes)
    return uri, q, rng, full, writes


def backup_into_overlay(fl, q, name, full, ref, sync="incremental", **kw):
    """Back disk0 up with b0 (sync, kw) into a new overlay NAME over the
    full backup (node "full"), wait for the job and check the overlay chain
    equals ref.  Returns the overlay's path."""
    path = fl.create_overlay(fl.overlay_name(name), full)
    add_overlay(fl, name, path, "full")
    backup(q, name, "disk0", name, sync, bitmap="b0", **kw)
    job_ok(q, name)
    overlay_matches(fl, name, ref)
    return path


# -- differential, cancel, target error ---------------------------------------

def test_differential_keeps_bitmap(flavour):
    fl = flavour
    uri, q, rng, full, writes = dirty_after_full(fl, 21)
    sha = bitmap_sha256(q, "disk0", "b0")
    count, extents = dirty_state(fl)
    ref1 = reference_copy(uri, fl.path("ref1.raw"))

    backup_into_overlay(fl, q, "diff1", full, ref1, "bitmap",
                        **{"bitmap-mode": "never"})
    # The bitmap did not move.
    assert bitmap_sha256(q, "disk0", "b0") == sha
    assert dirty_state(fl) == (count, extents)

    # A second differential after more writes holds both rounds.
    more = random_writes(rng, SIZE, 30)
    nbd_write(uri, more)
    count2, extents2 = dirty_state(fl)
    assert extents_to_clusters(extents2) == clusters_of(writes + more)
    ref2 = reference_copy(uri, fl.path("ref2.raw"))
    backup_into_overlay(fl, q, "diff2", full, ref2, "bitmap",
                        **{"bitmap-mode": "never"})
    assert dirty_state(fl) == (count2, extents2)
    assert fl.daemon.quit() == 0


def test_cancelled_incremental_keeps_dirty_bits(flavour):
    fl = flavour
    uri = start_disk(fl)
    q = fl.daemon.qmp
    rng = random.Random(31)
    full = full_backup_with_clear(fl, q, uri)
    # Many dirty clusters, so that the slow job is still running below.
    old = random_writes(rng, SIZE, 200, length=64 * 1024)
    nbd_write(uri, old)
    _, old_extents = dirty_state(fl)
    old_clusters = extents_to_clusters(old_extents)
    assert old_clusters == clusters_of(old)

    inc = fl.create_overlay(fl.overlay_name("inc1"), full)
    add_overlay(fl, "inc1", inc, "full")
    backup(q, "inc1", "disk0", "inc1", "incremental", bitmap="b0",
           speed=1 * MiB)
    assert q.bitmap("disk0", "b0")["busy"] is True
    # Writes during the job: some to already dirty clusters, some new.
    new = random_writes(rng, SIZE, 20) + old[:5]
    nbd_write(uri, new)
    q.cmd("block-job-cancel", device="inc1")
    ev = wait_job_end(q, "inc1")
    assert ev["event"] == "BLOCK_JOB_CANCELLED", ev

    assert q.bitmap("disk0", "b0")["busy"] is False
    _, extents = dirty_state(fl)
    assert extents_to_clusters(extents) == old_clusters | clusters_of(new)

    # The kept bitmap gives a correct incremental.
    ref = reference_copy(uri, fl.path("ref.raw"))
    backup_into_overlay(fl, q, "inc2", full, ref)
    assert bitmap_count(q, "disk0", "b0") == 0
    assert fl.daemon.quit() == 0


def test_target_error_keeps_bitmap(flavour):
    fl = flavour
    uri, q, rng, full, writes = dirty_after_full(fl, 41)
    sha = bitmap_sha256(q, "disk0", "b0")
    count, extents = dirty_state(fl)

    with nbdkit_target(SIZE) as sock:
        add_nbd_target(q, "bad", sock)
        backup(q, "inc-bad", "disk0", "bad", "incremental", bitmap="b0",
               **{"on-target-error": "report"})
        ev = wait_job_end(q, "inc-bad")
        assert ev["event"] == "BLOCK_JOB_COMPLETED", ev
        assert "error" in ev["data"], ev
        assert "Input/output error" in ev["data"]["error"], ev
        q.cmd("blockdev-del", **{"node-name": "bad"})
    assert bitmap_sha256(q, "disk0", "b0") == sha
    assert dirty_state(fl) == (count, extents)

    # Retry into a good target: the bitmap still yields a right incremental.
    more = random_writes(rng, SIZE, 10)
    nbd_write(uri, more)
    ref = reference_copy(uri, fl.path("ref.raw"))
    inc = backup_into_overlay(fl, q, "inc1", full, ref)
    assert fl.daemon.quit() == 0
    dirty = clusters_of(writes + more)
    alloc = fl.top_allocated(inc)
    assert abs(alloc - len(dirty) * CLUSTER) <= runs(dirty) * CLUSTER


def runs(clusters):
    """Number of runs of consecutive cluster numbers."""
    return sum(1 for c in clusters if c - 1 not in clusters)


# -- grouped transaction ----------------------------------------------------

def test_grouped_transaction_one_target_fails(flavour):
    fl = flavour
    rng = random.Random(51)
    disks = {n: random_image(fl.path(f"{n}.raw"), SIZE, seed=i)
             for i, n in enumerate(("disk0", "disk1"))}
    d = fl.start(disks)
    q = d.qmp
    before = {}
    for n in disks:
        q.cmd("block-dirty-bitmap-add", node=n, name="b0")
        export(q, n, writable=True)
        nbd_write(d.nbd_uri(n), random_writes(rng, SIZE, 25))
        before[n] = (bitmap_sha256(q, n, "b0"), bitmap_count(q, n, "b0"),
                     bitmap_extents(fl, n, "b0"))
    raws = {n: add_raw_target(q, f"full-{n}", fl.path(f"full-{n}.raw"),
                              SIZE) for n in disks}
    assert raws

    with nbdkit_target(SIZE) as sock:
        add_nbd_target(q, "bad", sock)
        targets = {"disk0": "full-disk0", "disk1": "bad"}
        q.cmd("transaction", actions=[
            {"type": "blockdev-backup",
             "data": {"job-id": f"job-{n}", "device": n, "target": t,
                      "sync": "incremental", "bitmap": "b0",
                      "on-target-error": "report"}}
            for n, t in targets.items()],
            properties={"completion-mode": "grouped"})
        ends = {n: wait_job_end(q, f"job-{n}") for n in disks}
        q.cmd("blockdev-del", **{"node-name": "bad"})

    # The failing job reports its error; the other one was cancelled.
    assert ends["disk1"]["event"] == "BLOCK_JOB_COMPLETED", ends
    assert ends["disk1"]["data"].get("error"), ends
    assert ends["disk0"]["event"] == "BLOCK_JOB_CANCELLED", ends
    # No bitmap advanced, on either disk.
    for n in disks:
        assert q.bitmap(n, "b0")["busy"] is False
        assert bitmap_sha256(q, n, "b0") == before[n][0], n
        assert bitmap_count(q, n, "b0") == before[n][1], n
        assert bitmap_extents(fl, n, "b0") == before[n][2], n
    assert q.cmd("query-jobs") == []
    assert d.quit() == 0


# -- job lifecycle ----------------------------------------------------------

def status_changes(q, job_id, until, timeout=120, drains=True):
    """JOB_STATUS_CHANGE statuses of job_id up to and including `until`.
    With drains, a "paused" directly followed by "running" is left out:
    QEMU pauses a running job for a moment when a drained section begins
    (an internal pause, not a user's)."""
    seen = []
    while not seen or seen[-1] != until:
        ev = wait_event(q, lambda e: e["event"] == "JOB_STATUS_CHANGE"
                        and e["data"]["id"] == job_id, timeout)
        seen.append(ev["data"]["status"])
        if drains and seen[-2:] == ["paused", "running"] and \
                until != "paused":
            del seen[-2:]
    return seen


def wait_status(q, job_id, status, timeout=60):
    """Poll query-jobs until job_id has `status` (True) or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = job_progress(q, job_id)
        if job is not None and job["status"] == status:
            return True
        time.sleep(0.02)
    return False


def drain_events(q, job_id):
    """Remove and return the JOB_STATUS_CHANGE events of job_id received
    so far."""
    mine = [e for e in q.events if e["event"] == "JOB_STATUS_CHANGE"
            and e["data"]["id"] == job_id]
    q.events[:] = [e for e in q.events if e not in mine]
    return mine


def test_job_lifecycle_manual_finalize_dismiss(flavour):
    fl = flavour
    uri = start_disk(fl, bitmaps=())
    q = fl.daemon.qmp
    ref = reference_copy(uri, fl.path("ref.raw"))
    add_raw_target(q, "full", fl.path("full.raw"), SIZE)
    backup(q, "job0", "disk0", "full", "full",
           **{"auto-finalize": False, "auto-dismiss": False})
    assert status_changes(q, "job0", "pending") == \
        ["created", "running", "waiting", "pending"]
    jobs = q.cmd("query-jobs")
    assert len(jobs) == 1 and jobs[0]["id"] == "job0"
    assert jobs[0]["type"] == "backup" and jobs[0]["status"] == "pending"
    assert jobs[0]["current-progress"] == jobs[0]["total-progress"] == SIZE
    # A pending job cannot be dismissed yet.
    err = q.error("job-dismiss", id="job0")
    assert "pending" in err.desc
    q.cmd("job-finalize", id="job0")
    job_ok(q, "job0")       # BLOCK_JOB_COMPLETED comes before "concluded"
    assert status_changes(q, "job0", "concluded") == ["concluded"]
    jobs = q.cmd("query-jobs")
    assert [j["status"] for j in jobs] == ["concluded"]
    assert jobs[0]["current-progress"] == jobs[0]["total-progress"] == SIZE
    assert "error" not in jobs[0]
    q.cmd("job-dismiss", id="job0")
    assert status_changes(q, "job0", "null") == ["null"]
    assert q.cmd("query-jobs") == []
    assert_files_same(fl.path("full.raw"), ref)
    assert fl.daemon.quit() == 0


def test_job_pause_resume(flavour):
    fl = flavour
    uri, q, ref = start_slow_full(fl)
    assert status_changes(q, "job0", "running") == ["created", "running"]
    q.cmd("job-pause", id="job0")
    # The pause takes effect at the job's next pause point.
    assert wait_status(q, "job0", "paused")
    changes = [e["data"]["status"] for e in drain_events(q, "job0")]
    assert changes and changes[-1] == "paused", changes
    block_jobs = q.cmd("query-block-jobs")
    assert [(j["device"], j["paused"]) for j in block_jobs] == [("job0", True)]
    # While paused, writes still land and the backup stays point in time.
    rng = random.Random(61)
    nbd_write(uri, random_writes(rng, SIZE, 20, lo=SIZE // 2))
    assert job_progress(q, "job0")["status"] == "paused"
    q.cmd("job-resume", id="job0")
    assert status_changes(q, "job0", "running") == ["running"]
    assert q.cmd("query-block-jobs")[0]["paused"] is False
    q.cmd("block-job-set-speed", device="job0", speed=0)
    job_ok(q, "job0")
    assert_files_same(fl.path("full.raw"), ref)
    assert fl.daemon.quit() == 0


# -- other sync modes and targets ---------------------------------------------

def test_sync_top_copies_only_the_top_layer(flavour):
    fl = flavour
    base = random_image(fl.path("base.raw"), SIZE, seed=71)
    top = fl.create_overlay(fl.overlay_name("top"), base)
    d = fl.start({"disk0": (top, fl.overlay_driver)})
    q = d.qmp
    uri = d.nbd_uri(export(q, "disk0", writable=True))
    rng = random.Random(73)
    writes = random_writes(rng, SIZE, 30, length=64 * 1024)
    # Cluster-aligned writes, so the top layer allocates exactly these.
    writes = [(off // CLUSTER * CLUSTER, data) for off, data in writes]
    nbd_write(uri, writes)
    ref = reference_copy(uri, fl.path("ref.raw"))

    add_raw_target(q, "tgt", fl.path("top-backup.raw"), SIZE)
    backup(q, "top0", "disk0", "tgt", "top")
    job_ok(q, "top0")
    assert d.quit() == 0

    # The target holds the top layer's clusters, with the image's data, and
    # nothing else (zeros elsewhere).
    top_clusters = clusters_of(writes)
    with open(fl.path("top-backup.raw"), "rb") as t, open(ref, "rb") as r:
        for c in range(SIZE // CLUSTER):
            t.seek(c * CLUSTER)
            got = t.read(CLUSTER)
            if c in top_clusters:
                r.seek(c * CLUSTER)
                assert got == r.read(CLUSTER), f"cluster {c}"
            else:
                assert got == bytes(CLUSTER), f"cluster {c} copied"


def test_drive_backup_to_nbd_url_and_new_file(flavour):
    fl = flavour
    uri = start_disk(fl, bitmaps=())
    q = fl.daemon.qmp
    ref = reference_copy(uri, fl.path("ref.raw"))
    with nbdkit_target(SIZE, fail_writes=False) as sock:
        target = f"nbd+unix:///?socket={sock}"
        q.cmd("drive-backup", **{"job-id": "remote", "device": "disk0",
                                 "target": target, "format": "raw",
                                 "mode": "existing", "sync": "full"})
        job_ok(q, "remote")
        # The remote server received the backup.
        assert_same(target, ref)
    # A target that does not exist yet is created.
    new = fl.path("new.raw")
    assert not new.exists()
    q.cmd("drive-backup", **{"job-id": "local", "device": "disk0",
                             "target": str(new), "format": "raw",
                             "sync": "full"})
    job_ok(q, "local")
    assert_files_same(new, ref)
    # mode=existing on a missing file is an error, and starts no job.
    err = q.error("drive-backup", **{"job-id": "bad", "device": "disk0",
                                     "target": str(fl.path("nope.raw")),
                                     "format": "raw", "mode": "existing",
                                     "sync": "full"})
    assert "nope.raw" in err.desc
    assert q.cmd("query-jobs") == []
    assert fl.daemon.quit() == 0


def test_full_backup_of_sparse_image_stays_sparse(flavour):
    fl = flavour
    if fl.kind == "qsd":
        pytest.skip("qemu-storage-daemon 7.2 writes the holes of a raw "
                    "target (not a requirement on it)")
    img = random_image(fl.path("disk0.raw"), 4 * SIZE, seed=81,
                       allocated=0.05)
    data = disk_usage(img)
    d = fl.start({"disk0": img})
    q = d.qmp
    add_raw_target(q, "full", fl.path("full.raw"), 4 * SIZE)
    backup(q, "full0", "disk0", "full", "full")
    job_ok(q, "full0")
    assert d.quit() == 0
    assert_files_same(fl.path("full.raw"), img)
    used = disk_usage(fl.path("full.raw"))
    assert used <= data + 4 * MiB, \
        f"target uses {used} bytes for {data} bytes of data"


def disk_usage(path):
    """Bytes a file really uses (its allocated blocks)."""
    return os.stat(path).st_blocks * 512


# -- transaction: all or nothing ---------------------------------------------

def test_transaction_rolls_back_on_failure(flavour):
    fl = flavour
    uri = start_disk(fl)
    q = fl.daemon.qmp
    nbd_write(uri, random_writes(random.Random(91), SIZE, 10))
    sha = bitmap_sha256(q, "disk0", "b0")
    add_raw_target(q, "full", fl.path("full.raw"), SIZE)
    good_actions = [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "b1"}},
        {"type": "block-dirty-bitmap-clear",
         "data": {"node": "disk0", "name": "b0"}},
        {"type": "block-dirty-bitmap-disable",
         "data": {"node": "disk0", "name": "b0"}},
        {"type": "blockdev-backup",
         "data": {"job-id": "j0", "device": "disk0", "target": "full",
                  "sync": "full"}}]
    failing = [
        [{"type": "blockdev-backup",
          "data": {"job-id": "j1", "device": "disk0", "target": "nosuch",
                   "sync": "full"}}],
        [{"type": "abort", "data": {}}],
        [{"type": "block-dirty-bitmap-add",
          "data": {"node": "disk0", "name": "b0"}}],     # exists already
    ]
    for extra in failing:
        q.error("transaction", actions=good_actions + extra)
        # Nothing happened: no new bitmap, b0 unchanged and enabled, no job.
        names = [b["name"] for b in q.node("disk0")["dirty-bitmaps"]]
        assert names == ["b0"], extra
        assert bitmap_sha256(q, "disk0", "b0") == sha
        assert q.bitmap("disk0", "b0")["recording"] is True
        assert q.cmd("query-jobs") == []
        # QEMU reports the rolled-back job's short life (created,
        # concluded, null): forget those events.
        q.events.clear()
    q.cmd("transaction", actions=good_actions)
    job_ok(q, "j0")
    assert sorted(b["name"] for b in q.node("disk0")["dirty-bitmaps"]) == \
        ["b0", "b1"]
    assert bitmap_count(q, "disk0", "b0") == 0
    assert q.bitmap("disk0", "b0")["recording"] is False
    assert fl.daemon.quit() == 0
