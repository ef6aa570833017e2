"""Shared pytest fixtures for bitback's integration tests.

Binaries come from the meson build folder named by $BITBACK_BUILD
(default: <repo>/build).  Tests run with Debian's /usr/bin/python3 so that
python3-libnbd is importable.
"""
import ctypes
import ctypes.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# The shared helpers (QMP client, Daemon, random writer): tests/lib.
sys.path.insert(0, str(REPO / "tests" / "lib"))
BUILD = pathlib.Path(os.environ.get("BITBACK_BUILD", REPO / "build"))
if not BUILD.is_absolute():
    BUILD = REPO / BUILD
BITBACK = str(BUILD / "bitback")
BITBACKD = str(BUILD / "bitbackd")


def run(cmd, check=True, **kw):
    """Run a command, capture text output, and fail with its stderr."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    p = subprocess.run([str(c) for c in cmd], **kw)
    if check and p.returncode != 0:
        raise AssertionError(
            f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n"
            f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def bitback(*args, check=True, **kw):
    return run([BITBACK, *args], check=check, **kw)


@pytest.fixture
def bitback_bin():
    return BITBACK


@pytest.fixture
def bitbackd_bin():
    return BITBACKD


def require(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run scripts/install-deps.sh")


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """Test certificates and PSK files in QEMU's layout
    (bitback_testlib.pki.make_pki): folders server, client (allowed DN),
    refused, wrongca (another CA), psk, psk-wrong, and the DNs
    allowed_dn / refused_dn."""
    from bitback_testlib.pki import make_pki
    require("certtool")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    """A real single-node Ceph cluster (bitback_testlib.ceph: one mon, one
    memstore OSD on 127.0.0.1, auth off) shared by the session, with an
    RBD pool "rbd".  Tests use their own image and pool names.  Stopped by
    PID at the end of the session, even when tests fail."""
    from bitback_testlib.ceph import CephCluster, missing_tools
    missing = missing_tools()
    if missing:
        pytest.fail(f"{' '.join(missing)} not installed: run scripts/install-deps.sh")
    c = CephCluster(tmp_path_factory.mktemp("ceph"))
    with c:
        c.create_pool("rbd", rbd=True)
        yield c


def xxh3_64(data):
    """XXH3-64 (seed 0) of data by the system's libxxhash, independently of
    bitback's code: the checksum of a qbm bitmap file."""
    lib = ctypes.util.find_library("xxhash")
    if lib is None:
        pytest.fail("libxxhash is not installed: run scripts/install-deps.sh")
    x = ctypes.CDLL(lib)
    x.XXH3_64bits.restype = ctypes.c_uint64
    x.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return x.XXH3_64bits(data, len(data))


def dirty_extents(uri, bitmap="b0"):
    """[(offset, length)] of the dirty extents that `nbdinfo --map` reports
    for qemu:dirty-bitmap:BITMAP on an NBD URI, adjacent ones merged."""
    require("nbdinfo")
    p = run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri])
    out = []
    for e in json.loads(p.stdout):
        if e["type"] & 1:
            if out and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out


def repo_prefix(repo):
    """The default bitmap prefix of a repository: "bitback-" and the first
    8 hex digits of its UUID (docs/specs/repository.md, Bitmaps)."""
    marker = json.loads((pathlib.Path(repo) / "bitback-repo.json").read_text())
    return f"bitback-{marker['uuid'][:8]}"


def repo_bitmap(repo, bid):
    """The dirty bitmap that backup `bid` ("000001") of `repo` started."""
    return f"{repo_prefix(repo)}-{bid}"


def serve_qcow2_ro(workdir, image):
    """bitbackd (in workdir) serving the qcow2 image read-only as node and
    export d0 over NBD; the caller stops it (quit/cleanup)."""
    from bitback_testlib import Daemon
    d = Daemon(workdir)
    d.start("--blockdev",
            f"driver=qcow2,node-name=d0,read-only=on,file.driver=file,"
            f"file.filename={image}", nbd=True)
    d.qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
              name="d0", writable=False)
    return d


def start_qcow2_rw(d, image, node="disk"):
    """Start daemon d (bitbackd or qemu-storage-daemon) on the qcow2 image
    as node, exported writable over NBD under the same name; returns the
    `bitback backup` arguments that back the node up (add --repo)."""
    d.start("--blockdev", f"driver=qcow2,node-name={node},"
            f"file.driver=file,file.filename={image}",
            "--export", f"type=nbd,id=e,node-name={node},name={node},"
            "writable=on", nbd=True)
    return ["backup", "--connect", d.qmp_sock, "--node", node]


# A passed test's files go as soon as it ends (a failed one's stay for
# the report): the suite's images add up to tens of GB otherwise, all kept
# until the run ends.
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item._bitback_passed = rep.passed


@pytest.fixture(autouse=True)
def _remove_passed_tmp_path(request):
    # Taken before the test's own fixtures, so they are torn down (their
    # daemons stopped) before the folder goes.
    tmp = request.getfixturevalue("tmp_path") \
        if "tmp_path" in request.fixturenames else None
    yield
    if tmp is not None and getattr(request.node, "_bitback_passed", False):
        shutil.rmtree(tmp, ignore_errors=True)
