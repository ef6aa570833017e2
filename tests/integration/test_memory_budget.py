"""bitbackd bounds NBD request memory and worker threads daemon-wide
(issue 17, defect 7; nbd-internal.h invariant 8).

With --nbd-max-request-memory 64M and --nbd-max-workers 8, 20 clients with
many 4 MiB writes and reads in flight each must all complete correctly
(requests wait, none fails) while bitbackd's peak RSS stays under the
budget + 20 x 1 MiB (free passes) + a slack, and its thread count under
connections + cap + the threads it had before.  Clients holding the whole
budget with slowly trickling 32 MiB writes must not stop a good client's
small requests, and `quit` still ends a client waiting for memory.
Only memory and thread counts are asserted, never timings.
"""
import struct
import threading
import time

import nbd

from bitback_testlib import Daemon
from bitback_testlib.memory import measured_env, vm_status
from test_nbd_badclients import CMD_WRITE, Conn

MiB = 1024 * 1024
CLIENTS = 20
PER_CLIENT = 8           # requests in flight per client
REQ = 4 * MiB
BUDGET = 64 * MiB
CAP = 8                  # extra worker threads, daemon-wide
SLACK = 48 * MiB         # allocator, stacks, rbufs, block status, libs


def start(tmp_path, d, size):
    with open(tmp_path / "d.raw", "wb") as f:
        f.truncate(size)
    d.start("--nbd-max-request-memory", "64M", "--nbd-max-workers", str(CAP),
            "--blockdev",
            "driver=raw,node-name=d0,file.driver=file,file.filename=d.raw",
            "--nbd-server", f"addr.type=unix,addr.path={d.nbd_sock}",
            "--export", "type=nbd,id=e0,node-name=d0,name=d0,writable=on",
            env=measured_env())


def client_load(uri, i, errors):
    """PER_CLIENT writes then PER_CLIENT reads of REQ bytes, all in flight
    at once, into client i's own slot; every read must see the data."""
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        data = bytes([i + 1]) * REQ
        for _ in range(PER_CLIENT):
            h.aio_pwrite(data, i * REQ)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        bufs = [nbd.Buffer(REQ) for _ in range(PER_CLIENT)]
        for b in bufs:
            h.aio_pread(b, i * REQ)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for b in bufs:
            if b.to_bytearray() != data:
                errors.append(f"client {i}: wrong data")
        h.shutdown()
    except Exception as e:          # noqa: BLE001 - reported below
        errors.append(f"client {i}: {e}")


def test_budget_bounds_rss_and_threads(tmp_path):
    with Daemon(tmp_path) as d:
        start(tmp_path, d, CLIENTS * REQ)
        pid = d.pid
        rss0 = vm_status(pid, "VmRSS")
        threads0 = vm_status(pid, "Threads")
        errors, peak_threads = [], [threads0]
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak_threads[0] = max(peak_threads[0], vm_status(pid, "Threads"))
                time.sleep(0.05)

        w = threading.Thread(target=watch)
        w.start()
        ts = [threading.Thread(target=client_load,
                               args=(d.nbd_uri("d0"), i, errors))
              for i in range(CLIENTS)]
        try:
            for t in ts:
                t.start()
            for t in ts:
                t.join(600)
        finally:
            done.set()
            w.join()
        assert not any(t.is_alive() for t in ts)
        assert errors == []
        hwm = vm_status(pid, "VmHWM")
        bound = rss0 + BUDGET + CLIENTS * MiB + SLACK
        assert hwm < bound, f"peak RSS {hwm >> 20} MiB over {bound >> 20} MiB"
        assert peak_threads[0] <= threads0 + CLIENTS + CAP, peak_threads[0]
        d.quit()


def hostile_write(d, length, prefix):
    """A client that starts a write of `length` bytes and sends only
    `prefix` bytes of its payload."""
    c = Conn(d.nbd_sock)
    c.greeting()
    c.go("d0")
    c.send(struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 1, 0, length)
           + b"h" * prefix)
    return c


def test_hostile_clients_holding_the_budget(tmp_path):
    with Daemon(tmp_path) as d:
        start(tmp_path, d, 64 * MiB)
        # Two trickling 32 MiB writes take the whole 64 MiB budget...
        hostile = [hostile_write(d, 32 * MiB, 4096) for _ in range(2)]
        # ...and a third waits for memory that never comes.
        waiting = hostile_write(d, 4 * MiB, 0)
        try:
            # A good client still gets its small requests done.
            h = nbd.NBD()
            h.connect_uri(d.nbd_uri("d0"))
            for k in range(16):
                data = bytes([k + 1]) * MiB
                h.pwrite(data, 40 * MiB + (k % 4) * MiB)
                assert h.pread(MiB, 40 * MiB + (k % 4) * MiB) == data
            h.shutdown()
            # quit shuts every connection: the waiter must wake and go.
            d.quit()
        finally:
            for c in hostile + [waiting]:
                c.close()
