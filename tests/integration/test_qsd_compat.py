"""Command lines and QMP calls written for qemu-storage-daemon behave the
same on bitbackd (issue 15, items 11-13).

Each case runs the same options against bitbackd and qemu-storage-daemon
and asserts the same outcome, so a difference from QSD fails here."""
import json
import subprocess

import pytest

from bitback_testlib import BITBACKD, QSD, Daemon, QMPError
from conftest import BITBACK, require, run

MiB = 1024 * 1024
DAEMONS = {"bitbackd": BITBACKD, "qsd": QSD}


def disk(tmp_path):
    img = tmp_path / "d.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
    return img


def blockdev(img):
    return f"driver=qcow2,node-name=d0,file.driver=file,file.filename={img}"


def start_fails(binary, tmp_path, *args):
    """Run the daemon with args; it must exit non-zero at start-up.
    Returns its stderr."""
    d = Daemon(tmp_path / "d", binary=binary)
    try:
        with pytest.raises(AssertionError, match="exited with"):
            d.start(*args, nbd=True)
        return d.stderr()
    finally:
        d.cleanup()


@pytest.mark.parametrize("name", DAEMONS)
def test_export_implied_type(name, tmp_path):
    """`--export nbd,id=...` (the implied `type` key, as libnbd's interop
    test writes it) serves the node."""
    require("nbdinfo")
    img = disk(tmp_path)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", img])
    with Daemon(tmp_path / "d", binary=DAEMONS[name]) as d:
        d.start("--blockdev", blockdev(img),
                "--export", "nbd,id=e0,node-name=d0,name=d0,writable=on",
                nbd=True)
        info = json.loads(run(["nbdinfo", "--json", d.nbd_uri("d0")]).stdout)
        assert info["exports"][0]["export-size"] == 64 * MiB
        run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 64k",
             d.nbd_uri("d0")])
        assert d.quit() == 0


@pytest.mark.parametrize("name", DAEMONS)
def test_readonly_export_of_enabled_bitmap_refused(name, tmp_path):
    """An enabled bitmap on a writable node cannot be exported read-only
    (it would change under the client); writable, or disabled, it can."""
    img = disk(tmp_path)
    with Daemon(tmp_path / "d", binary=DAEMONS[name]) as d:
        d.start("--blockdev", blockdev(img), nbd=True)
        c = d.qmp
        c.cmd("block-dirty-bitmap-add", node="d0", name="b0")
        with pytest.raises(QMPError, match="Enabled bitmap 'b0' incompatible "
                           "with readonly export"):
            c.cmd("block-export-add", type="nbd", id="e0",
                  **{"node-name": "d0"}, bitmaps=["b0"])
        assert c.cmd("query-block-exports") == []
        # Disabled: a frozen view may be exported read-only.
        c.cmd("block-dirty-bitmap-disable", node="d0", name="b0")
        c.cmd("block-export-add", type="nbd", id="e0",
              **{"node-name": "d0"}, bitmaps=["b0"])
        c.cmd("block-export-del", id="e0")
        # Enabled again and exported writable: allowed.
        c.cmd("block-dirty-bitmap-enable", node="d0", name="b0")
        c.cmd("block-export-add", type="nbd", id="e1", writable=True,
              **{"node-name": "d0"}, bitmaps=["b0"])
        assert d.quit() == 0
    # The same rule on the command line.
    run(["qemu-img", "bitmap", "--add", img, "b1"])
    err = start_fails(DAEMONS[name], tmp_path, "--blockdev", blockdev(img),
                      "--export", "type=nbd,id=e0,node-name=d0,bitmaps.0=b1")
    assert "Enabled bitmap 'b1' incompatible with readonly export" in err


def test_unsupported_export_type_named(tmp_path):
    """A fuse export is refused for its type, not for the members that only
    a fuse export has."""
    img = disk(tmp_path)
    err = start_fails(BITBACKD, tmp_path, "--blockdev", blockdev(img),
                      "--export", "fuse,id=e0,node-name=d0,mountpoint=/x")
    assert "Export type 'fuse' is not supported" in err
    assert "mountpoint" not in err
    with Daemon(tmp_path / "d2") as d:
        d.start("--blockdev", blockdev(img), nbd=True)
        with pytest.raises(QMPError, match="Export type 'vhost-user-blk' is "
                           "not supported"):
            d.qmp.cmd("block-export-add", type="vhost-user-blk", id="e0",
                      **{"node-name": "d0"}, addr={"type": "unix",
                                                   "path": "/x"})
        with pytest.raises(QMPError, match="Parameter 'type' does not "
                           "accept value 'bogus'"):
            d.qmp.cmd("block-export-add", type="bogus", id="e0",
                      **{"node-name": "d0"})
        # A real member error on an nbd export is still named.
        with pytest.raises(QMPError, match="Parameter 'mountpoint' is "
                           "unexpected"):
            d.qmp.cmd("block-export-add", type="nbd", id="e0",
                      **{"node-name": "d0"}, mountpoint="/x")
        assert d.quit() == 0


def test_help_lists_qcow2_create(tmp_path):
    """The top-level help names every format `img create` makes."""
    out = subprocess.run([BITBACK, "--help"], capture_output=True,
                         text=True).stdout
    line = next(i for i, l in enumerate(out.splitlines())
                if l.strip().startswith("img create"))
    assert "qcow2" in out.splitlines()[line + 1]
    img = tmp_path / "new.qcow2"
    run([BITBACK, "img", "create", "-f", "qcow2", img, "1M"])
    info = json.loads(run(["qemu-img", "info", "--output=json", img]).stdout)
    assert info["format"] == "qcow2"
