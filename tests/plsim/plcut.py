#!/usr/bin/python3
"""plcut: turn a plsim log into a simulated power cut.

A program runs with the plsim shim preloaded (see plsim_env()); the shim logs
every change to the files under $PLSIM_DIR and every sync.  After the program
was killed with SIGKILL, cut() puts the files into a state that a power cut
at that instant could have left: every change that no sync covered may be
lost, in any combination.

    revert every unsynced change of a file, newest first (old bytes back,
    old size back), then re-apply the changes of a random subset, oldest
    first.  Synced changes are always re-applied.

Modes: "random" (each unsynced change kept with probability p, seeded),
"none" (all unsynced changes lost), "all" (all kept: the state the killed
process left).  Creating, renaming and unlinking files count as durable at
once.  The record format is in README.md next to this file.

Used as a module (tests/integration adds tests/plsim to sys.path) and as a
command:  plcut.py LOG [--mode random|none|all] [--seed N] [--src DIR --dst DIR]
          plcut.py LOG --dump
"""
import argparse
import ctypes
import ctypes.util
import os
import pathlib
import random
import struct
import sys

MAGIC = 0x314d534c
HEADER = struct.Struct("<IHHIIII" + "Q" * 8)
assert HEADER.size == 88

REC_WRITE, REC_ZERO, REC_ALLOC, REC_TRUNCATE = 1, 2, 3, 4
REC_SYNC, REC_SYNCALL, REC_RENAME, REC_EXCHANGE = 5, 6, 7, 8
REC_UNLINK, REC_CANCEL, REC_UNSUPPORTED = 9, 10, 11
RECF_KEEP_SIZE, RECF_RANGE = 1, 2
CONTENT = (REC_WRITE, REC_ZERO, REC_ALLOC, REC_TRUNCATE, REC_UNSUPPORTED)
KIND_NAMES = {1: "write", 2: "zero", 3: "alloc", 4: "truncate", 5: "sync",
              6: "syncall", 7: "rename", 8: "exchange", 9: "unlink",
              10: "cancel", 11: "unsupported"}

REPO = pathlib.Path(__file__).resolve().parents[2]


class PlcutError(Exception):
    pass


class Record:
    """One log record.  pos is its byte offset in the log (the order)."""
    __slots__ = ("pos", "kind", "flags", "pid", "seq", "path", "path2",
                 "offset", "length", "old_size", "new_size", "covers",
                 "old", "new", "void", "durable")

    def __repr__(self):
        return (f"<{KIND_NAMES.get(self.kind, self.kind)} pos={self.pos} "
                f"pid={self.pid} {self.path} off={self.offset} "
                f"len={self.length} size {self.old_size}->{self.new_size}"
                f"{' covers=%d' % self.covers if self.kind in (REC_SYNC, REC_SYNCALL) else ''}"
                f"{' -> ' + self.path2 if self.path2 else ''}"
                f"{' void' if self.void else ''}>")


def read_log(log_path):
    """All complete records of the log, in order.  A torn last record
    (the writer was killed while appending it) is ignored: its change was
    not started."""
    data = pathlib.Path(log_path).read_bytes()
    out = []
    pos = 0
    while pos + HEADER.size <= len(data):
        (magic, kind, flags, pid, plen, p2len, _res, seq, offset, length,
         old_size, new_size, covers, old_len, new_len) = HEADER.unpack_from(data, pos)
        if magic != MAGIC:
            raise PlcutError(f"{log_path}: bad record magic at {pos}")
        end = pos + HEADER.size + plen + p2len + old_len + new_len
        if end > len(data):
            break
        r = Record()
        r.pos, r.kind, r.flags, r.pid, r.seq = pos, kind, flags, pid, seq
        p = pos + HEADER.size
        r.path = data[p:p + plen].decode("utf-8", "surrogateescape")
        p += plen
        r.path2 = data[p:p + p2len].decode("utf-8", "surrogateescape") or None
        p += p2len
        r.old = data[p:p + old_len]
        p += old_len
        r.new = data[p:p + new_len]
        r.offset, r.length, r.old_size, r.new_size = offset, length, old_size, new_size
        r.covers = covers
        r.void = False
        r.durable = False
        out.append(r)
        pos = end
    return out


def _apply_cancels(records):
    """Fold CANCEL records into the content record they follow."""
    last = {}
    out = []
    for r in records:
        if r.kind == REC_CANCEL:
            c = last.pop(r.pid, None)
            if c is None:
                continue
            applied = r.length
            if applied == 0 or c.kind != REC_WRITE:
                c.void = True
            else:
                c.length = applied
                c.new = c.new[:applied]
                c.old = c.old[:applied]
                c.new_size = max(c.old_size, c.offset + applied)
            continue
        if r.kind in CONTENT:
            last[r.pid] = r
        out.append(r)
    return [r for r in out if not r.void]


class _File:
    def __init__(self, path):
        self.path = path
        self.records = []
        self.covers = 0         # whole-file syncs: records before this are durable
        self.ranges = []        # (covers, offset, length) range syncs


def _under(path, prefix):
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _files(records):
    """Group content records by file identity, following renames; returns
    (live files, global syncall covers)."""
    at = {}             # current path -> _File
    files = []
    syncall = 0
    for r in records:
        if r.kind in CONTENT:
            f = at.get(r.path)
            if f is None:
                f = at[r.path] = _File(r.path)
                files.append(f)
            f.records.append(r)
        elif r.kind == REC_SYNC:
            f = at.get(r.path)
            if f is None:
                continue
            if r.flags & RECF_RANGE:
                f.ranges.append((r.covers, r.offset, r.length))
            else:
                f.covers = max(f.covers, r.covers)
        elif r.kind == REC_SYNCALL:
            syncall = max(syncall, r.covers)
        elif r.kind in (REC_RENAME, REC_EXCHANGE):
            a, b = r.path, r.path2
            moved_a = {p: f for p, f in at.items() if _under(p, a)}
            moved_b = {p: f for p, f in at.items() if _under(p, b)}
            for p in list(moved_a) + list(moved_b):
                at.pop(p, None)
            if r.kind == REC_EXCHANGE:
                for p, f in moved_b.items():
                    np = a + p[len(b):]
                    f.path = np
                    at[np] = f
            else:
                for f in moved_b.values():
                    f.path = None        # replaced: gone
            for p, f in moved_a.items():
                np = b + p[len(a):]
                f.path = np
                at[np] = f
        elif r.kind == REC_UNLINK:
            f = at.pop(r.path, None)
            if f is not None:
                f.path = None
    return [f for f in files if f.path is not None], syncall


def _mark_durable(f, syncall):
    for r in f.records:
        cov = max(f.covers, syncall)
        r.durable = r.pos < cov
        if not r.durable and r.kind in (REC_WRITE, REC_ZERO) and r.length:
            for c, o, n in f.ranges:
                if r.pos < c and o <= r.offset and r.offset + r.length <= o + n:
                    r.durable = True
                    break


_libc = None


def _punch(fd, offset, length):
    """Zero [offset, offset+length) inside the file (no size change)."""
    global _libc
    if length <= 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int64, ctypes.c_int64]
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, 0x02 | 0x01, offset, length) == 0:
        return
    chunk = b"\0" * min(length, 1 << 20)
    done = 0
    while done < length:
        n = min(len(chunk), length - done)
        os.pwrite(fd, chunk[:n], offset + done)
        done += n


def _size(fd):
    return os.fstat(fd).st_size


def _zero(fd, offset, length, keep_size):
    cur = _size(fd)
    if offset < cur:
        _punch(fd, offset, min(offset + length, cur) - offset)
    if not keep_size and offset + length > cur:
        os.ftruncate(fd, offset + length)


def _undo(fd, r):
    os.ftruncate(fd, r.old_size)
    if r.old:
        os.pwrite(fd, r.old, r.offset)


def _redo(fd, r):
    if r.kind == REC_WRITE:
        os.pwrite(fd, r.new, r.offset)
    elif r.kind == REC_ZERO:
        _zero(fd, r.offset, r.length, r.flags & RECF_KEEP_SIZE)
    elif r.kind == REC_ALLOC:
        if _size(fd) < r.offset + r.length:
            os.ftruncate(fd, r.offset + r.length)
    elif r.kind == REC_TRUNCATE:
        os.ftruncate(fd, r.new_size)
    else:
        raise PlcutError(f"cannot replay {r!r}")


def _local(path, src_dir, dst_dir):
    if src_dir is None:
        return path
    src = os.path.realpath(src_dir)
    if not _under(path, src):
        raise PlcutError(f"{path} is not under {src}")
    return os.path.join(os.fspath(dst_dir), os.path.relpath(path, src))


def _redo_torn(fd, r, rng, p, tear):
    """Re-apply the tear-aligned pieces of write r that survive, each with
    probability p; returns how many of its pieces were kept."""
    kept = 0
    pos = r.offset
    end = r.offset + r.length
    while pos < end:
        nxt = min(end, (pos // tear + 1) * tear)
        if rng.random() < p:
            os.pwrite(fd, r.new[pos - r.offset:nxt - r.offset], pos)
            kept += 1
        pos = nxt
    return kept


def cut(log_path, seed=0, mode="random", src_dir=None, dst_dir=None, p=0.5,
        consume=False, tear=0):
    """Apply a simulated power cut to the files that log_path describes.

    The process that wrote the log must be dead (SIGKILL).  With src_dir and
    dst_dir, the files are taken to be copies: a logged path under src_dir
    (normally $PLSIM_DIR) is changed at the same relative path under
    dst_dir.  mode: "random" keeps each unsynced change with probability p
    (seeded by seed), "none" keeps none, "all" keeps all.  consume=True
    empties the log afterwards, so that the next run under the shim starts
    a fresh one.  tear=N (mode "random" only) models torn writes: an
    unsynced write that is kept lands only in part, each N-byte-aligned
    piece kept with probability p (N = 512 or 4096 for sectors/pages).

    Returns {path: {"records": n, "synced": s, "unsynced": u, "kept": k,
    "dropped": d, "torn": t, "kept_seqs": [...]}} for every file that had
    records (path as logged, i.e. after renames); kept_seqs are the seq
    numbers of the unsynced records kept whole."""
    if mode not in ("random", "none", "all"):
        raise PlcutError(f"unknown mode {mode!r}")
    rng = random.Random(f"plcut:{seed}")
    records = _apply_cancels(read_log(log_path))
    files, syncall = _files(records)
    summary = {}
    for f in sorted(files, key=lambda x: x.path):
        _mark_durable(f, syncall)
        first = next((i for i, r in enumerate(f.records) if not r.durable), None)
        s = {"records": len(f.records), "synced": 0, "unsynced": 0,
             "kept": 0, "dropped": 0, "torn": 0, "kept_seqs": []}
        summary[f.path] = s
        s["synced"] = sum(1 for r in f.records if r.durable)
        s["unsynced"] = len(f.records) - s["synced"]
        if first is None:
            continue
        tail = f.records[first:]
        for r in tail:
            if r.kind == REC_UNSUPPORTED and not r.durable:
                raise PlcutError(f"{f.path}: unsynced change that plcut cannot "
                                 f"model: {r!r}")
        keep = []
        for r in tail:
            if r.durable:
                keep.append(True)
            elif mode == "all":
                keep.append(True)
            elif mode == "none":
                keep.append(False)
            else:
                keep.append(rng.random() < p)
        local = _local(f.path, src_dir, dst_dir)
        try:
            fd = os.open(local, os.O_RDWR)
        except FileNotFoundError:
            s["missing"] = True
            continue
        try:
            for r in reversed(tail):
                _undo(fd, r)
            for r, k in zip(tail, keep):
                if k and tear and mode == "random" and not r.durable and \
                        r.kind == REC_WRITE:
                    n = _redo_torn(fd, r, rng, p, tear)
                    pieces = -(-(r.offset + r.length) // tear) - r.offset // tear
                    if n == pieces:
                        s["kept"] += 1
                        s["kept_seqs"].append(r.seq)
                    elif n == 0:
                        s["dropped"] += 1
                    else:
                        s["torn"] += 1
                elif k:
                    _redo(fd, r)
                    if not r.durable:
                        s["kept"] += 1
                        s["kept_seqs"].append(r.seq)
                elif not r.durable:
                    s["dropped"] += 1
            os.fsync(fd)
        finally:
            os.close(fd)
    if consume:
        os.truncate(log_path, 0)
    return summary


def plsim_lib(build=None):
    """Path of the built shim: $BITBACK_BUILD/tests/plsim/libplsim.so."""
    if build is None:
        build = pathlib.Path(os.environ.get("BITBACK_BUILD", REPO / "build"))
        if not build.is_absolute():
            build = REPO / build
    lib = pathlib.Path(build) / "tests" / "plsim" / "libplsim.so"
    if not lib.exists():
        raise PlcutError(f"{lib} is missing: build it with ninja -C {build}")
    return str(lib)


def plsim_env(data_dir, log_path=None, env=None, build=None):
    """The environment for a process whose writes under data_dir are logged.

    The log defaults to data_dir/.plsim.log (never tracked itself).  The shim
    goes first in LD_PRELOAD; ASAN_OPTIONS gains verify_asan_link_order=0 so
    that a sanitizer build accepts a library ahead of its runtime."""
    env = dict(os.environ if env is None else env)
    data_dir = os.path.realpath(data_dir)
    if log_path is None:
        log_path = os.path.join(data_dir, ".plsim.log")
    lib = plsim_lib(build)
    pre = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = lib + (":" + pre if pre else "")
    env["PLSIM_DIR"] = data_dir
    env["PLSIM_LOG"] = os.path.abspath(log_path)
    asan = env.get("ASAN_OPTIONS", "")
    if "verify_asan_link_order" not in asan:
        env["ASAN_OPTIONS"] = (asan + ":" if asan else "") + "verify_asan_link_order=0"
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log")
    ap.add_argument("--mode", default="random", choices=("random", "none", "all"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-p", type=float, default=0.5, help="keep probability")
    ap.add_argument("--src", help="the PLSIM_DIR the log was written for")
    ap.add_argument("--dst", help="apply to copies under this folder")
    ap.add_argument("--consume", action="store_true", help="empty the log after")
    ap.add_argument("--tear", type=int, default=0,
                    help="tear kept unsynced writes into pieces of this size")
    ap.add_argument("--dump", action="store_true", help="list the records only")
    a = ap.parse_args(argv)
    if a.dump:
        for r in read_log(a.log):
            print(r)
        return 0
    if (a.src is None) != (a.dst is None):
        ap.error("--src and --dst go together")
    try:
        s = cut(a.log, a.seed, a.mode, a.src, a.dst, a.p, a.consume, a.tear)
    except PlcutError as e:
        print(f"plcut: {e}", file=sys.stderr)
        return 1
    for path, v in s.items():
        print(f"{path}: {v['records']} records, {v['synced']} synced, "
              f"{v['kept']} unsynced kept, {v['torn']} torn, "
              f"{v['dropped']} dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
