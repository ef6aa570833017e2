"""The one random writer of bitback's tests: random writes through NBD
(libnbd handles), each logged once the server acknowledged it.

random_write() is one write; Writer runs them in threads until stopped.
The log entry of a write (Ack) says where it went and what it wrote
(a digest of the data, or None for a zero write), so a test can check
that every acknowledged write is covered by a bitmap (crash trials) or
still readable after a restore, without fio.
"""
import hashlib
import random
import threading
import time
from collections import namedtuple

import nbd

from . import nbdio

KiB = 1024

# offset, length: the range written; digest: blake2b-128 of the data
# written (bytes), or None for a zero write.
Ack = namedtuple("Ack", "offset length digest")


def digest(data):
    """The digest an Ack holds for data (compare with Ack.digest)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def random_write(h, rng, lo, hi, lengths):
    """One random write through libnbd handle h inside [lo, hi), 512-byte
    aligned: a zero write one time in ten, random data otherwise.  Returns
    its Ack once the server acknowledged it."""
    length = rng.choice(lengths)
    off = rng.randrange(lo, hi - length) // 512 * 512
    if rng.random() < 0.1:
        h.zero(length, off)
        return Ack(off, length, None)
    data = rng.randbytes(length)
    h.pwrite(data, off)
    return Ack(off, length, digest(data))


class Writer:
    """Threads of random writes through NBD, one per seed, until stop().

    Every thread opens one handle per URI and writes to each in turn (with
    random.Random(seed) as its generator), inside .span = (lo, hi) (the
    whole export unless set; it may change while they run).  .acked logs
    the Ack of every acknowledged write, .writes counts them, .unflushed
    counts those since the thread's last flush (every flush_every writes
    when set).  pause_s sleeps between rounds.

    A server that dies is expected with until_error=True (crash trials):
    the thread ends quietly.  Otherwise the first error is kept in .error
    and stop() fails the test with it.  pause()/resume() hold the writes
    (pause() returns when no write is in flight).
    """

    def __init__(self, uris, seeds, lengths, flush_every=None, pause_s=0,
                 until_error=False, span=None):
        self.uris = list(uris)
        self.lengths = lengths
        self.flush_every = flush_every
        self.pause_s = pause_s
        self.until_error = until_error
        self.span = span
        self.acked = []
        self.writes = 0
        self.unflushed = 0
        self.error = None
        self.lock = threading.Lock()
        self.stop_flag = False
        self.go = threading.Event()
        self.go.set()
        self.busy = 0                   # threads inside a round of writes
        self.idle = threading.Condition(self.lock)
        self.threads = [threading.Thread(target=self._run, args=(s,),
                                         daemon=True) for s in seeds]

    def _connect(self):
        return [nbdio.connect(uri) for uri in self.uris]

    def _round(self, handles, rng, n):
        for h in handles:
            lo, hi = self.span or (0, h.get_size())
            done = random_write(h, rng, lo, hi, self.lengths)
            with self.lock:
                self.acked.append(done)
                self.writes += 1
                self.unflushed += 1
            n += 1
            if self.flush_every and n % self.flush_every == 0:
                h.flush()
                with self.lock:
                    self.unflushed = 0
        return n

    def _run(self, seed):
        rng = random.Random(seed)
        handles = []
        n = 0
        try:
            handles = self._connect()
            while not self.stop_flag:
                if not self.go.is_set():
                    self.go.wait()
                    continue
                with self.lock:
                    self.busy += 1
                try:
                    n = self._round(handles, rng, n)
                finally:
                    with self.lock:
                        self.busy -= 1
                        self.idle.notify_all()
                if self.pause_s:
                    time.sleep(self.pause_s)
        except nbd.Error as e:
            if not self.until_error:
                self.error = e
        except Exception as e:          # reported by stop()
            self.error = e
        finally:
            for h in handles:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def pause(self):
        self.go.clear()
        with self.lock:
            assert self.idle.wait_for(lambda: self.busy == 0, 30)

    def resume(self):
        self.go.set()

    def join(self):
        """Stop the threads and wait for them (at most 30 s each)."""
        self.stop_flag = True
        self.go.set()
        for t in self.threads:
            t.join(30)

    def stop(self):
        """join(), then fail with the first error a thread met."""
        self.join()
        assert self.error is None, self.error


def write_lengths(*kib):
    """[n * KiB for n in kib]: the lengths argument of random_write."""
    return [k * KiB for k in kib]
