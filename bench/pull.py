"""bench/chain.sh's pull rows (issue 19): one bitbackd disk, a PULL_SIZE
(default 4 GiB) qcow2 holding PULL_DATA (default 2 GiB) of random bytes
in 1 MiB chunks at scattered offsets, backed up in full into a new
repository (--compress=off: the rows compare transports, not zstd) by

  push       `bitback backup --connect QMP.sock`: bitbackd's backup job
             writes the repository's target itself (a shared filesystem)
  pull-unix  the same with --pull: bitback starts an NBD server on a UNIX
             socket, exports the point in time, reads it with libnbd
  pull-tcp   QMP and NBD on 127.0.0.1 without TLS: `--connect HOST:PORT
             --nbd-server HOST:PORT --fleece-dir DIR` (a remote daemon)
  pull-tls   the same with TLS x509 on both (certtool certificates in
             QEMU's layout; `--object tls-creds-x509,... --tls-creds t0`)

Two more rows give this machine's ceiling, with no NBD, disk or
repository at all: build/tls-floor (bench/tls-floor.c) moves PULL_DATA
through one TCP loopback connection from a forked sender to a receiver
that discards it, plain (floor-tcp) and with TLS x509 on the same
certificates (floor-tls); whatever a pull adds can only be slower.  From
them the last lines print how many cores the TLS targets would keep busy
at the least CPU a pull over TLS can cost (pull-tcp's CPU per GiB plus
what TLS adds to the bare connection).

Each row starts its own daemon (not timed), then times the bitback
command from start to exit; CPU is the command's (wait4 rusage) plus the
daemon's (/proc/PID/stat) during it, in CPU-seconds per GiB of data.  The
rows run PULL_ROUNDS times (default 3), the order rotated each round;
each row prints the median throughput and the median of its per-round
ratios to push (paired).  Targets (issue 19): pull >= 0.9x push; TLS costs
<= 15% of pull throughput (pull-tls / pull-tcp >= 0.85).  A benchmark, not
a test: it prints PASS/MISS and exits 0 whatever the numbers.
"""
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import time

from benchlib import MiB, parse_size, sh, warm
from bitback_testlib import Daemon
from bitback_testlib.nbdio import free_port
from bitback_testlib.pki import make_pki

W = os.environ["BENCH_DIR"]
BITBACK = os.environ["BENCH_BITBACK"]
BITBACKD = os.environ["BENCH_BITBACKD"]
SIZE = parse_size(os.environ.get("PULL_SIZE", "4G"))
DATA = parse_size(os.environ.get("PULL_DATA", "2G"))
ROUNDS = int(os.environ.get("PULL_ROUNDS", "3"))
TICK = os.sysconf("SC_CLK_TCK")
ROWS = ["push", "pull-unix", "pull-tcp", "pull-tls"]
FLOORS = ["floor-tcp", "floor-tls"]
TLS_FLOOR = os.path.join(os.path.dirname(BITBACK), "tls-floor")
# PULL_CACHE: bitback backup --cache for every row (default: the tool's).
CACHE = [f"--cache={os.environ['PULL_CACHE']}"] if os.environ.get(
    "PULL_CACHE") else []


def make_source():
    """The disk: random 1 MiB chunks at scattered offsets of a raw file,
    converted to qcow2 (holes stay holes)."""
    rng = random.Random(19)
    raw, img = f"{W}/src.raw", f"{W}/disk0.qcow2"
    n = DATA // MiB
    step = SIZE // n // MiB * MiB
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for i in range(n):
            f.seek(i * step)
            f.write(rng.randbytes(MiB))
    sh("qemu-img", "convert", "-O", "qcow2", raw, img)
    os.unlink(raw)
    return img


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK   # utime + stime


def start_daemon(row, img, pki, wd):
    """bitbackd serving disk0 as the row needs; returns (daemon, the
    bitback arguments that reach it)."""
    d = Daemon(wd, binary=BITBACKD)
    blockdev = ["--blockdev", f"driver=file,node-name=f0,filename={img}",
                "--blockdev", "driver=qcow2,node-name=disk0,file=f0"]
    if row in ("push", "pull-unix"):
        d.start(*blockdev)
        args = ["--connect", str(d.qmp_sock)]
        return d, args + (["--pull"] if row == "pull-unix" else [])
    qmp_port, nbd_port = free_port(), free_port()
    tls = row == "pull-tls"
    objs = (["--object", f"tls-creds-x509,id=tls0,dir={pki['server']},"
                         "endpoint=server"] if tls else [])
    opt = ",tls-creds=tls0" if tls else ""
    fleece = f"{wd}/fleece"
    os.makedirs(fleece, exist_ok=True)
    d.start(*objs,
            "--chardev", f"socket,id=m0,host=127.0.0.1,port={qmp_port},"
                         f"server=on,wait=off{opt}",
            "--monitor", "chardev=m0", *blockdev,
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,"
                            f"addr.port={nbd_port}{opt}",
            qmp=False)
    args = ["--connect", f"127.0.0.1:{qmp_port}",
            "--nbd-server", f"127.0.0.1:{nbd_port}", "--fleece-dir", fleece]
    if tls:
        args += ["--object", f"tls-creds-x509,id=t0,dir={pki['client']},"
                             "endpoint=client", "--tls-creds", "t0"]
    return d, args


def run_row(row, img, pki, n):
    """One full backup of row's kind: (seconds, CPU-seconds of bitback and
    of the daemon during it, the row's folder)."""
    wd = f"{W}/{row}-{n}"
    repo = f"{wd}/repo"
    d, args = start_daemon(row, img, pki, wd)
    try:
        warm(img)
        before = cpu_seconds(d.pid)
        with open(f"{wd}/backup.stderr", "wb") as err:
            t0 = time.monotonic()
            p = subprocess.Popen([BITBACK, "backup", *args, "--node", "disk0",
                                  "--repo", repo, "--level", "full",
                                  "--compress=off", *CACHE],
                                 stdout=subprocess.DEVNULL, stderr=err)
            _, status, ru = os.wait4(p.pid, 0)
            secs = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            with open(f"{wd}/backup.stderr") as f:
                raise SystemExit(f"pull bench: {row}: bitback backup failed "
                                 f"({p.returncode}): {f.read()}")
        cpu = cpu_seconds(d.pid) - before + ru.ru_utime + ru.ru_stime
    finally:
        d.cleanup()
    return secs, cpu, wd


def run_floor(row, pki):
    """tls-floor's seconds and CPU-seconds (sender and receiver) for
    PULL_DATA in 1 MiB writes."""
    args = (["x509", str(DATA // MiB), "1024", "NORMAL", str(pki["server"]),
             str(pki["client"])] if row == "floor-tls"
            else ["plain", str(DATA // MiB), "1024"])
    out = subprocess.run([TLS_FLOOR, *args], check=True, text=True,
                         stdout=subprocess.PIPE).stdout.split()
    secs = float(out[out.index("s") - 1])
    cpu_per_gib = float(out[out.index("both") + 1])
    return secs, cpu_per_gib * DATA / (1 << 30)


def main():
    img = make_source()
    (pathlib.Path(W) / "pki").mkdir()
    pki = make_pki(pathlib.Path(W) / "pki")
    every = ROWS + FLOORS
    times = {r: [] for r in every}
    cpus = {r: [] for r in every}
    for n in range(ROUNDS):
        order = every[n % len(every):] + every[:n % len(every)]
        for row in order:
            if row in FLOORS:
                secs, cpu = run_floor(row, pki)
            else:
                secs, cpu, wd = run_row(row, img, pki, n)
                shutil.rmtree(wd, ignore_errors=True)
            times[row].append(secs)
            cpus[row].append(cpu)
    gib = DATA / (1 << 30)
    print()
    print(f"pull rows: {SIZE / (1 << 30):.2f} GiB qcow2 disk with "
          f"{gib:.2f} GiB of data, full backups, median of {ROUNDS} rounds")
    print(f"{'row':<10} {'seconds':>8} {'MiB/s':>8} {'CPU s/GiB':>10} "
          f"{'vs push':>8}")
    ratio = {}
    for row in every:
        t = statistics.median(times[row])
        ratio[row] = statistics.median(
            p / x for p, x in zip(times["push"], times[row]))
        print(f"{row:<10} {t:8.2f} {DATA / MiB / t:8.0f} "
              f"{statistics.median(cpus[row]) / gib:10.2f} "
              f"{ratio[row]:8.2f}")
    tls = statistics.median(
        p / x for p, x in zip(times["pull-tcp"], times["pull-tls"]))
    print()
    for row in ("pull-unix", "pull-tcp", "pull-tls"):
        print(f"target: {row} >= 0.9x push throughput: {ratio[row]:.2f} -> "
              f"{'PASS' if ratio[row] >= 0.9 else 'MISS'}")
    print(f"target: TLS costs <= 15% of pull throughput: pull-tls/pull-tcp "
          f"{tls:.2f} -> {'PASS' if tls >= 0.85 else 'MISS'}")
    floor = statistics.median(
        p / x for p, x in zip(times["floor-tcp"], times["floor-tls"]))
    print(f"ceiling: one bare TLS connection moves data at "
          f"{ratio['floor-tls']:.2f}x push and {floor:.2f}x the same "
          f"connection without TLS; pull-tls reaches "
          f"{ratio['pull-tls'] / ratio['floor-tls']:.2f} of that ceiling")
    # The least CPU a pull over TLS can cost: a plain pull's, plus what TLS
    # adds to a bare connection (both ends, as both run here).
    cpu = {r: statistics.median(cpus[r]) / gib for r in every}
    least = cpu["pull-tcp"] + cpu["floor-tls"] - cpu["floor-tcp"]
    for what, base in (("0.9x push", 0.9 * DATA / statistics.median(
                            times["push"])),
                       ("0.85x pull-tcp", 0.85 * DATA / statistics.median(
                            times["pull-tcp"]))):
        print(f"cores: pull-tls at {what} ({base / MiB:.0f} MiB/s) at the "
              f"least CPU a pull over TLS costs ({least:.2f} CPU-s/GiB: "
              f"pull-tcp's + a bare connection's TLS) keeps "
              f"{base / (1 << 30) * least:.2f} cores busy; "
              f"this machine has {os.cpu_count()}")


if __name__ == "__main__":
    main()
