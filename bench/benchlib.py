"""Shared by the benchmarks' Python drivers (bench/*.sh put bench/ on
PYTHONPATH through bench/lib.sh): sizes, commands that must succeed,
daemons serving one node, and waiting for a backup job."""
import os
import subprocess
import sys

from bitback_testlib import Daemon

MiB = 1 << 20
# The benchmark's name, the prefix of its error messages.
NAME = os.environ.get("BENCH_NAME", "bench")


def parse_size(s):
    """A size as the scripts take it (4G, 512M, 1 GiB, 65536) in bytes."""
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    s = s.strip().upper().rstrip("B").rstrip("I")
    if s and s[-1] in units:
        return int(float(s[:-1]) * (1 << units[s[-1]]))
    return int(s)


def sh(*argv, ok=(0,)):
    """Run argv (captured); exit the benchmark unless its status is in
    ok.  Returns the CompletedProcess."""
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if p.returncode not in ok:
        sys.exit(f"{NAME}: {' '.join(map(str, argv))} failed "
                 f"({p.returncode}): {p.stdout}{p.stderr}")
    return p


def warm(path):
    """Read path once, so that it is in the page cache."""
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def wait_job(q, job):
    """Wait for job's BLOCK_JOB_COMPLETED on QMP client q; exit the
    benchmark if the job failed.  Returns the event."""
    while True:
        ev = q.get_event("BLOCK_JOB_COMPLETED", timeout=3600)
        if ev["data"]["device"] == job:
            if "error" in ev["data"]:
                sys.exit(f"{NAME}: job {job} failed: {ev['data']['error']}")
            return ev


def serve(wd, binary, blockdev, *args):
    """A Daemon (binary: bitbackd or QSD) in folder wd serving node disk0
    (--blockdev blockdev) with an NBD server and the extra args, started.
    The caller stops it: quit() then d.cleanup() in a finally."""
    d = Daemon(wd, binary=binary)
    try:
        d.start("--blockdev", blockdev, *args, nbd=True)
    except BaseException:
        d.cleanup()
        raise
    return d


def quit(d, what):
    """Shut Daemon d down with QMP quit; exit the benchmark unless it
    exits with 0 (what names it in the message)."""
    rc = d.quit()
    if rc != 0:
        sys.exit(f"{NAME}: {what} exited with {rc}: {d.stderr()}")


# The NBD export of node disk0, writable (--export of serve()).
EXPORT_DISK0 = ("--export",
                "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on")
