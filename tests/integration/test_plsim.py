"""Self-tests of the power-loss simulator (tests/plsim): the LD_PRELOAD shim
logs real programs' writes and syncs, and plcut.cut() produces exactly the
states a power cut allows: synced data intact, any subset of the unsynced
changes applied in order."""
import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, require, run
from bitback_testlib import Daemon

sys.path.insert(0, str(REPO / "tests" / "plsim"))
import plcut  # noqa: E402

KIB = 1024

# The writer: every tracked syscall kind, then SIGKILL.  It prints nothing;
# the test knows the operations (OPS below) and models them.
WRITER = textwrap.dedent(r"""
    import ctypes, os, sys
    d = sys.argv[1]
    libc = ctypes.CDLL(None, use_errno=True)   # global lookup: the shim
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                               ctypes.c_int64]
    fd = os.open(os.path.join(d, "f"), os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"A" * (64 * 1024), 0)                 # synced base
    os.fsync(fd)
    os.pwrite(fd, b"B" * (32 * 1024), 16 * 1024)         # op 1
    os.lseek(fd, 40 * 1024, os.SEEK_SET)
    os.write(fd, b"C" * (16 * 1024))                     # op 2, overlaps B
    os.lseek(fd, 200 * 1024, os.SEEK_SET)
    os.writev(fd, [b"D" * 8192, b"E" * 8192])            # op 3, past EOF
    if libc.fallocate(fd, 3, 8 * 1024, 8 * 1024) != 0:   # op 4, punch hole
        raise OSError(ctypes.get_errno(), "fallocate")
    os.ftruncate(fd, 210 * 1024)                         # op 5, shrink
    os.posix_fallocate(fd, 0, 256 * 1024)                # op 6, grow

    # g: fdatasync'd writev, then one unsynced write
    g = os.open(os.path.join(d, "g"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwritev(g, [b"x" * 4096, b"y" * 4096], 0)
    os.fdatasync(g)
    os.pwrite(g, b"z" * 4096, 2048)

    # t -> r: synced, renamed (durable), then written through the old fd
    t = os.open(os.path.join(d, "t"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(t, b"T" * 5000)
    os.fsync(t)
    os.rename(os.path.join(d, "t"), os.path.join(d, "r"))
    os.pwrite(t, b"U" * 100, 10)

    # n: created and written, never synced; u: written then unlinked
    n = os.open(os.path.join(d, "n"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(n, b"N" * 3000)
    u = os.open(os.path.join(d, "u"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(u, b"gone")
    os.unlink(os.path.join(d, "u"))
    # a truncating re-open of a synced file
    h = os.open(os.path.join(d, "h"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(h, b"H" * 1000)
    os.fsync(h)
    os.close(h)
    h = os.open(os.path.join(d, "h"), os.O_WRONLY | os.O_TRUNC)
    os.write(h, b"I" * 10)
    os.kill(os.getpid(), 9)
""")

# The model of f: synced base, then the unsynced operations in order.
BASE_F = b"A" * (64 * KIB)


def op_write(off, data):
    def f(b):
        if len(b) < off:
            b.extend(b"\0" * (off - len(b)))
        b[off:off + len(data)] = data
    return f


def op_punch(off, n):
    def f(b):
        end = min(off + n, len(b))
        if end > off:
            b[off:end] = b"\0" * (end - off)
    return f


def op_truncate(n):
    def f(b):
        if n < len(b):
            del b[n:]
        else:
            b.extend(b"\0" * (n - len(b)))
    return f


def op_alloc(off, n):
    def f(b):
        if len(b) < off + n:
            b.extend(b"\0" * (off + n - len(b)))
    return f


OPS_F = [
    op_write(16 * KIB, b"B" * (32 * KIB)),
    op_write(40 * KIB, b"C" * (16 * KIB)),
    op_write(200 * KIB, b"D" * 8192 + b"E" * 8192),
    op_punch(8 * KIB, 8 * KIB),
    op_truncate(210 * KIB),
    op_alloc(0, 256 * KIB),
]


def model(base, ops, keep):
    b = bytearray(base)
    for op, k in zip(ops, keep):
        if k:
            op(b)
    return bytes(b)


def all_states(base, ops):
    return {model(base, ops, keep)
            for keep in itertools.product((False, True), repeat=len(ops))}


BASE_G = b"x" * 4096 + b"y" * 4096
OPS_G = [op_write(2048, b"z" * 4096)]
BASE_R = b"T" * 5000
OPS_R = [op_write(10, b"U" * 100)]
OPS_N = [op_write(0, b"N" * 3000)]
BASE_H = b"H" * 1000
OPS_H = [op_truncate(0), op_write(0, b"I" * 10)]

FILES = {"f": (BASE_F, OPS_F), "g": (BASE_G, OPS_G), "r": (BASE_R, OPS_R),
         "n": (b"", OPS_N), "h": (BASE_H, OPS_H)}


@pytest.fixture
def crashed(tmp_path):
    """Run the writer under the shim until it kills itself; returns
    (data dir, log path)."""
    data = tmp_path / "data"
    data.mkdir()
    env = plcut.plsim_env(data)
    p = subprocess.run(["/usr/bin/python3", "-c", WRITER, str(data)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    return data, env["PLSIM_LOG"]


def read(path):
    return path.read_bytes()


def test_shim_sees_every_call(crashed):
    """Python's os.* calls and ctypes' fallocate go through libc and are
    interposed: each one left its record."""
    data, log = crashed
    recs = plcut.read_log(log)
    f = os.path.realpath(data / "f")
    kinds_f = [r.kind for r in recs if r.path == f]
    assert kinds_f == [plcut.REC_WRITE, plcut.REC_SYNC, plcut.REC_WRITE,
                       plcut.REC_WRITE, plcut.REC_WRITE, plcut.REC_ZERO,
                       plcut.REC_TRUNCATE, plcut.REC_ALLOC]
    w = [r for r in recs if r.path == f and r.kind == plcut.REC_WRITE]
    # os.write and os.writev took the file position; old bytes chained.
    assert (w[2].offset, w[2].length) == (40 * KIB, 16 * KIB)
    assert (w[3].offset, w[3].length, w[3].old_size) == (200 * KIB, 16 * KIB, 64 * KIB)
    assert w[3].new == b"D" * 8192 + b"E" * 8192
    assert w[1].old == b"A" * (32 * KIB)
    assert w[2].old == b"B" * (8 * KIB) + b"A" * (8 * KIB)
    # fdatasync, rename, unlink and the O_TRUNC open were all seen
    assert any(r.kind == plcut.REC_SYNC and r.path.endswith("/g") for r in recs)
    assert any(r.kind == plcut.REC_RENAME and r.path.endswith("/t")
               and r.path2.endswith("/r") for r in recs)
    assert any(r.kind == plcut.REC_UNLINK and r.path.endswith("/u") for r in recs)
    assert any(r.kind == plcut.REC_TRUNCATE and r.path.endswith("/h")
               and r.old == b"H" * 1000 for r in recs)
    # the write through the renamed fd is logged under its new name
    assert any(r.kind == plcut.REC_WRITE and r.path.endswith("/r")
               and r.new == b"U" * 100 for r in recs)
    # the log itself (inside PLSIM_DIR) is never tracked
    assert not any(r.path.endswith(".plsim.log") for r in recs)


def copy_data(data, dst):
    shutil.copytree(data, dst)
    return dst


@pytest.mark.parametrize("mode", ["none", "all"])
def test_cut_none_and_all(crashed, tmp_path, mode):
    data, log = crashed
    for name, (base, ops) in FILES.items():
        assert read(data / name) == model(base, ops, [True] * len(ops)), name
    out = copy_data(data, tmp_path / f"cut-{mode}")
    s = plcut.cut(log, seed=1, mode=mode, src_dir=data, dst_dir=out)
    for name, (base, ops) in FILES.items():
        keep = [mode == "all"] * len(ops)
        assert read(out / name) == model(base, ops, keep), (name, mode)
        assert s[os.path.realpath(data / name)]["unsynced"] == len(ops)
    assert not (out / "u").exists()
    # the originals are untouched
    for name, (base, ops) in FILES.items():
        assert read(data / name) == model(base, ops, [True] * len(ops))


def test_cut_random_states_are_possible(crashed, tmp_path):
    data, log = crashed
    possible = {name: all_states(base, ops) for name, (base, ops) in FILES.items()}
    recs = plcut.read_log(log)
    unsynced_seqs = {}
    for name, (base, ops) in FILES.items():
        names = ("/" + name, "/t") if name == "r" else ("/" + name,)
        seqs = [r.seq for r in recs if r.kind in plcut.CONTENT
                and r.path.endswith(names)]
        unsynced_seqs[name] = seqs[len(seqs) - len(ops):]
    seen = set()
    for seed in range(12):
        out = copy_data(data, tmp_path / f"cut-{seed}")
        s = plcut.cut(log, seed=seed, mode="random", src_dir=data, dst_dir=out)
        state = []
        for name, (base, ops) in FILES.items():
            got = read(out / name)
            assert got in possible[name], (seed, name)
            # the synced part is intact whatever was dropped
            if name == "f":
                assert got[56 * KIB:64 * KIB] == b"A" * (8 * KIB)
            if name == "g":
                assert got[:2048] == b"x" * 2048 and got[6144:8192] == b"y" * 2048
            # the summary names exactly the changes kept, in the model
            v = s[os.path.realpath(data / name)]
            keep = [seq in v["kept_seqs"] for seq in unsynced_seqs[name]]
            assert got == model(base, ops, keep), (seed, name, keep)
            assert v["kept"] + v["dropped"] == len(ops)
            state.append(got)
        seen.add(tuple(state))
        # the same seed gives the same state
        again = copy_data(data, tmp_path / f"again-{seed}")
        plcut.cut(log, seed=seed, mode="random", src_dir=data, dst_dir=again)
        for name in FILES:
            assert read(again / name) == read(out / name)
        shutil.rmtree(again)
    assert len(seen) >= 6, "different seeds should give different states"


def test_cut_in_place_and_cli(crashed, tmp_path):
    """The CLI cuts in place and can consume the log."""
    data, log = crashed
    p = run(["/usr/bin/python3", REPO / "tests" / "plsim" / "plcut.py", log,
             "--mode", "none", "--consume"])
    assert "dropped" in p.stdout
    for name, (base, ops) in FILES.items():
        assert read(data / name) == base, name
    assert os.path.getsize(log) == 0


def killed_after_pwrite(tmp_path, content, pwrite):
    """data/f holding content, then a process under the shim that does
    os.pwrite(fd, <pwrite>) on it and is killed (SIGKILL) before it can
    sync.  Returns (data folder, the shim's environment)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(content)
    env = plcut.plsim_env(data)
    code = ("import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); "
            f"os.pwrite(fd, {pwrite}); os.kill(os.getpid(), 9)")
    p = subprocess.run(["/usr/bin/python3", "-c", code, str(data / "f")],
                       env=env, timeout=60)
    assert p.returncode == -signal.SIGKILL
    return data, env


def test_killed_between_log_and_write_is_harmless(tmp_path):
    """A record whose real write never happened (the log ends with it):
    undoing it writes the current bytes back."""
    data, env = killed_after_pwrite(tmp_path, b"Q" * 8192,
                                    "b'R'*4096, 4096")
    # Simulate "logged, never written": put the old bytes back by hand.
    with open(data / "f", "r+b") as f:
        f.seek(4096)
        f.write(b"Q" * 4096)
    for mode in ("none", "random"):
        out = copy_data(data, tmp_path / f"o-{mode}")
        plcut.cut(env["PLSIM_LOG"], seed=3, mode=mode, src_dir=data, dst_dir=out)
        assert read(out / "f") in (b"Q" * 8192, b"Q" * 4096 + b"R" * 4096)
    out = copy_data(data, tmp_path / "o-none2")
    plcut.cut(env["PLSIM_LOG"], mode="none", src_dir=data, dst_dir=out)
    assert read(out / "f") == b"Q" * 8192


def test_cut_tears_writes(tmp_path):
    """tear=4096: an unsynced write lands page by page, in any mix."""
    data, env = killed_after_pwrite(tmp_path, b"\0" * (64 * KIB),
                                    "b'W'*(64*1024), 0")
    torn = 0
    for seed in range(8):
        out = copy_data(data, tmp_path / f"o-{seed}")
        s = plcut.cut(env["PLSIM_LOG"], seed=seed, tear=4096, src_dir=data,
                      dst_dir=out)
        got = read(out / "f")
        assert len(got) == 64 * KIB
        pages = {got[i:i + 4096] for i in range(0, len(got), 4096)}
        assert pages <= {b"\0" * 4096, b"W" * 4096}
        torn += s[os.path.realpath(data / "f")]["torn"]
        if len(pages) == 2:
            assert s[os.path.realpath(data / "f")]["torn"] == 1
    assert torn > 0


def test_torn_log_tail_is_ignored(crashed, tmp_path):
    data, log = crashed
    n = len(plcut.read_log(log))
    with open(log, "ab") as f:
        f.write(b"LSM1\x01\x00")      # a record cut short by the kill
    assert len(plcut.read_log(log)) == n


def shim_raw_image(tmp_path, size):
    """A raw image data/disk.raw of size (qemu-img's syntax) in a new
    folder data, and the shim's environment for that folder.  Returns
    (data, img, env)."""
    data = tmp_path / "data"
    data.mkdir()
    img = data / "disk.raw"
    run(["qemu-img", "create", "-f", "raw", img, size])
    return data, img, plcut.plsim_env(data)


def test_qemu_io_flush_then_write(tmp_path):
    """A real C program (qemu-io: pwritev from its thread pool, fdatasync on
    flush) under the shim: after a cut that drops everything unsynced, the
    flushed write is there and the later one is gone."""
    require("qemu-io")
    require("qemu-img")
    data, img, env = shim_raw_image(tmp_path, "128K")
    # -t writeback: qemu-io defaults to writethrough (a sync per write);
    # writev with two buffers makes it call pwritev; abort skips the flush
    # at exit, as a crash would.
    p = subprocess.run(["qemu-io", "-t", "writeback", "-f", "raw",
                        "-c", "write -P 1 0 64k", "-c", "flush",
                        "-c", "writev -P 2 64k 32k 32k", "-c", "abort",
                        str(img)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -signal.SIGABRT, p.stderr
    recs = plcut.read_log(env["PLSIM_LOG"])
    assert [r.kind for r in recs] == [plcut.REC_WRITE, plcut.REC_SYNC,
                                      plcut.REC_WRITE]
    # before the cut, both writes are in the file
    run(["qemu-io", "-f", "raw", "-c", "read -P 2 64k 64k", img])
    for mode, second in (("none", 0), ("all", 2)):
        out = copy_data(data, tmp_path / f"cut-{mode}")
        plcut.cut(env["PLSIM_LOG"], mode=mode, src_dir=data, dst_dir=out)
        for pattern_cmd in ("read -P 1 0 64k", f"read -P {second} 64k 64k"):
            r = run(["qemu-io", "-f", "raw", "-r", "-c", pattern_cmd,
                     out / "disk.raw"])
            assert "Pattern verification failed" not in r.stdout, (mode, r.stdout)


def test_bitbackd_under_shim(tmp_path):
    """bitbackd (threads, pwritev2 on the file driver) runs under the shim;
    NBD writes are logged, and a cut after SIGKILL drops the unflushed one."""
    require("qemu-io")
    data, img, env = shim_raw_image(tmp_path, "1M")
    d = Daemon(tmp_path / "d")
    try:
        d.start("--blockdev",
                f"driver=file,node-name=f0,filename={img}",
                "--export", "type=nbd,id=e0,node-name=f0,name=e0,writable=on",
                nbd=True, env=env)
        uri = d.nbd_uri("e0")
        run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "-c", "flush",
             uri])
        # abort: no flush at close, so the daemon never syncs this write
        run(["qemu-io", "-t", "writeback", "-f", "raw",
             "-c", "write -P 9 128k 64k", "-c", "abort", uri], check=False)
        d.kill()
    finally:
        d.cleanup()
    recs = [r for r in plcut.read_log(env["PLSIM_LOG"])
            if r.path == os.path.realpath(img)]
    writes = [r for r in recs if r.kind == plcut.REC_WRITE]
    assert [(r.offset, r.length) for r in writes] == [(0, 65536), (131072, 65536)]
    assert any(r.kind == plcut.REC_SYNC for r in recs)
    out = copy_data(data, tmp_path / "cut")
    s = plcut.cut(env["PLSIM_LOG"], mode="none", src_dir=data, dst_dir=out)
    assert s[os.path.realpath(img)]["dropped"] >= 1
    cut_img = out / "disk.raw"
    r = run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 7 0 64k",
             "-c", "read -P 0 128k 64k", cut_img])
    assert "Pattern verification failed" not in r.stdout, r.stdout
