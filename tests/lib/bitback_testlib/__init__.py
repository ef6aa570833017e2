"""Shared helpers of bitback's tests, demos and benchmarks (issue 16).

- qmp: QMPClient and QMPError, the one QMP client; qmpcli: the same on
  the command line, for shell scripts (python3 -m bitback_testlib.qmpcli)
- daemon: Daemon, bitbackd or qemu-storage-daemon in a test folder
- writer: random_write and Writer, random NBD writes with a log of the
  acknowledged ones
- smallfs: small_fs and fill, a small tmpfs for ENOSPC tests
- memory: measured_env, vm_status and peak_rss, for tests that bound memory
- pki: make_pki, test certificates and PSK files (certtool), QEMU's layout

tests/integration/conftest.py puts tests/lib on sys.path; shell scripts
set PYTHONPATH=<repo>/tests/lib.
"""
from .daemon import BITBACKD, BUILD, QSD, REPO, Daemon
from .qmp import QMPClient, QMPError, qmp_socket_ready

__all__ = ["BITBACKD", "BUILD", "QSD", "REPO", "Daemon", "QMPClient",
           "QMPError", "qmp_socket_ready"]
