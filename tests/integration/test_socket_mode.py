"""bitbackd's UNIX sockets (QMP monitor, NBD server from the command line
and from QMP nbd-server-start) are created 0600 whatever the umask, or 0660
with --socket-mode 0660 (issue 17, defect 8)."""
import os
import stat
import subprocess

import pytest

from conftest import BITBACKD, bitback
from bitback_testlib import Daemon


def start_umask0(d, *args, **kw):
    """Start the daemon with umask 000 (the test process's umask is
    restored at once: the daemon inherits it at fork)."""
    old = os.umask(0)
    try:
        d.start(*args, **kw)
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("extra,want", [((), 0o600),
                                        (("--socket-mode", "0660"), 0o660)])
def test_socket_modes_ignore_umask(tmp_path, extra, want):
    bitback("img", "create", "-f", "qbm", tmp_path / "d.qbm", "1M")
    with Daemon(tmp_path) as d:
        start_umask0(d, *extra, nbd=True)
        assert stat.S_ISSOCK(os.lstat(d.qmp_sock).st_mode)
        assert mode(d.qmp_sock) == want
        assert mode(d.nbd_sock) == want
        # A server started later over QMP, while the daemon's threads run.
        d.qmp.cmd("nbd-server-stop")
        late = d.sockdir / "late.sock"
        d.qmp.cmd("nbd-server-start",
                  addr={"type": "unix", "data": {"path": str(late)}})
        assert mode(late) == want
        # And it still serves.
        d.qmp.cmd("blockdev-add", driver="qbm", **{"node-name": "d0"},
                  file={"driver": "file", "filename": "d.qbm"})
        d.qmp.cmd("block-export-add", type="nbd", id="e0",
                  **{"node-name": "d0"})
        p = subprocess.run(["nbdinfo", "--size",
                            f"nbd+unix:///d0?socket={late}"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == str(1 << 20)
        # No private folder is left next to the sockets.
        assert sorted(x.name for x in d.sockdir.iterdir()
                      if x.name.startswith(".bitback-sock")) == []
        assert d.quit() == 0


def test_socket_mode_rejects_other_modes(tmp_path):
    p = subprocess.run([BITBACKD, "--socket-mode", "0666"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "--socket-mode" in p.stderr


def test_socket_mode_in_help():
    p = subprocess.run([BITBACKD, "--help"], capture_output=True, text=True,
                       timeout=60)
    assert "--socket-mode" in p.stdout
