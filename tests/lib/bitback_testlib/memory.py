"""Peak-memory measurement shared by the tests that bound it (issue 17).

Memory bounds are asserted (they are not noisy), but two things would make
them measure the wrong thing:

  - AddressSanitizer keeps freed memory in a quarantine (256 MiB by default)
    before reusing it, so a sanitizer build's RSS grows by up to that much
    whatever the program does.  measured_env() shrinks the quarantine; use
    it as the environment of a process whose memory is bounded.  Leak and
    use-after-free checks still run (a smaller quarantine only catches a use
    after free later in time less often).
  - A child's ru_maxrss counts the pages it shared with its parent between
    fork and exec; a test process that holds much memory would pollute it.
    peak_rss() runs the command from a small interpreter instead.
"""
import os
import subprocess
import sys

QUARANTINE_MB = 8


def measured_env(env=None):
    env = dict(os.environ if env is None else env)
    opts = env.get("ASAN_OPTIONS", "")
    env["ASAN_OPTIONS"] = (opts + ":" if opts else "") + \
        f"quarantine_size_mb={QUARANTINE_MB}"
    return env


def vm_status(pid, key):
    """A /proc/PID/status value in bytes (VmHWM, VmRSS) or as a count
    (Threads)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                v = line.split()
                return int(v[1]) * (1024 if len(v) > 2 and v[2] == "kB" else 1)
    raise AssertionError(f"no {key} in /proc/{pid}/status")


_WRAP = """
import os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, ru = os.wait4(pid, 0)
sys.stderr.write("\\n@peak-rss %d %d\\n" % (ru.ru_maxrss * 1024,
                                           os.waitstatus_to_exitcode(status)))
"""


def peak_rss(argv, timeout=300):
    """Run argv (argv[0] a path); (returncode, stdout, stderr, peak RSS in
    bytes) of that process alone, under measured_env()."""
    p = subprocess.run([sys.executable, "-c", _WRAP, *map(str, argv)],
                       capture_output=True, text=True, timeout=timeout,
                       env=measured_env())
    err, _, tail = p.stderr.rpartition("\n@peak-rss ")
    rss, rc = map(int, tail.split())
    return rc, p.stdout, err, rss
