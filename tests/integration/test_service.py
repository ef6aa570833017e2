"""bitbackd as a service: --version, the man pages, `meson install` (units,
completions), systemd-analyze verify on the installed units, sd_notify
(READY=1 / STOPPING=1), socket activation (LISTEN_FDS with names, fd
addresses for the NBD server and the QMP monitor, over QMP too), the same
socket-activation command line as libnbd's qemu-storage-daemon interop
test against bitbackd and qemu-storage-daemon, --config files, and the
pidfile lock under --daemonize."""
import fcntl
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from bitback_testlib import BITBACKD, BUILD, QSD, REPO, Daemon, QMPClient
from conftest import BITBACK, bitback, require, run

SIZE = 1024 * 1024
DISK = "driver=file,node-name=disk0,filename=disk.raw"


def project_version():
    m = re.search(r"version\s*:\s*'([^']+)'",
                  (REPO / "meson.build").read_text())
    return m.group(1)


def make_raw(tmp_path, pattern=0x5a):
    img = tmp_path / "disk.raw"
    run(["qemu-img", "create", "-f", "raw", img, str(SIZE)])
    run(["qemu-io", "-f", "raw", img, "-c", f"write -P {pattern} 0 64k"])
    return img


def long_options(text):
    return set(re.findall(r"--[a-z][a-z0-9-]*", text))


# -- --version, man pages, install ---------------------------------------

def test_version_is_the_project_version():
    v = project_version()
    p = run([BITBACK, "--version"])
    assert p.stdout.strip() == f"bitback version {v}"
    p = run([BITBACKD, "--version"])
    assert p.stdout.strip() == f"bitbackd version {v}"


def render_man(page):
    """The page as man(1) prints it, wide enough that nothing wraps or is
    hyphenated, with groff's Unicode hyphens made ASCII."""
    p = run(["man", "-l", str(page)],
            env=dict(os.environ, MANWIDTH="400", MAN_KEEP_FORMATTING=""))
    assert p.stderr.strip() == "", p.stderr
    return p.stdout.replace("\u2010", "-").replace("\u2212", "-")


def test_man_page_bitback_documents_every_command_and_option():
    text = render_man(BUILD / "docs" / "man" / "bitback.1")
    assert "bitback - incremental backups" in text
    commands = ["img create", "img info", "img map", "img check", "bitmap",
                "io", "backup", "restore", "serve", "verify", "list", "prune"]
    for cmd in commands:
        assert re.search(rf"^ +{cmd}$", text, re.M), f"no section for {cmd}"
    # Every long option each command's --help lists is in the page.
    for cmd in (["img"], ["bitmap"], ["io"], ["backup"], ["restore"],
                ["serve"], ["verify"], ["list"], ["prune"], []):
        p = bitback(*cmd, "--help", check=False)
        opts = long_options(p.stdout + p.stderr) - {"--help"}
        missing = sorted(o for o in opts if o not in text)
        assert not missing, f"bitback {' '.join(cmd)}: {missing}"


def test_man_page_bitbackd_documents_every_option():
    text = render_man(BUILD / "docs" / "man" / "bitbackd.8")
    p = run([BITBACKD, "--help"])
    opts = long_options(p.stdout)
    assert {"--config", "--daemonize", "--pidfile", "--nbd-server"} <= opts
    missing = sorted(o for o in opts if o not in text)
    assert not missing, missing
    for section in ("SOCKET ACTIVATION", "SIGNALS", "EXIT STATUS", "FILES",
                    "QEMU-COMPATIBLE OPTIONS"):
        assert re.search(rf"^{section}$", text, re.M), section
    for word in ("LISTEN_FDNAMES", "NOTIFY_SOCKET", "READY=1", "STOPPING=1",
                 "SIGTERM", "addr.type=fd", "fd=N", "/etc/bitback/"):
        assert word in text, word


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`meson install --destdir` of this build: the destdir."""
    dest = tmp_path_factory.mktemp("destdir")
    run(["meson", "install", "-C", BUILD, "--destdir", dest, "--quiet"],
        timeout=600)
    return dest


def find_one(root, name, parent=None):
    hits = [p for p in root.rglob(name)
            if p.is_file() and (parent is None or p.parent.name == parent)]
    assert len(hits) == 1, (name, hits)
    return hits[0]


def test_meson_install_installs_programs_pages_units_completions(installed):
    for prog in ("bitback", "bitbackd"):
        assert os.access(find_one(installed, prog, "bin"), os.X_OK)
        find_one(installed, prog, "completions")
    assert find_one(installed, "bitback.1").parent.name == "man1"
    assert find_one(installed, "bitbackd.8").parent.name == "man8"
    unit = find_one(installed, "bitbackd@.service")
    bindir = find_one(installed, "bitbackd", "bin").parent
    text = unit.read_text()
    # ExecStart names the installed program, in the prefix's bindir.
    exec_path = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
    assert installed / exec_path.lstrip("/") == bindir / "bitbackd"
    for key in ("Type=notify", "ProtectSystem=strict", "PrivateTmp=yes",
                "NoNewPrivileges=yes", "ProtectHome=yes",
                "RuntimeDirectory=bitback", "ReadWritePaths=",
                "KillSignal=SIGTERM", "Restart=on-failure",
                "--config /etc/bitback/%i.conf"):
        assert key in text, key
    for sock, name in (("bitbackd@.socket", "nbd"),
                       ("bitbackd-qmp@.socket", "qmp")):
        assert f"FileDescriptorName={name}" in find_one(installed, sock) \
            .read_text()


def test_installed_units_pass_systemd_analyze_verify(installed, tmp_path):
    require("systemd-analyze")
    unitdir = find_one(installed, "bitbackd@.service").parent
    bitbackd = find_one(installed, "bitbackd", "bin")
    mandir = find_one(installed, "bitbackd.8").parent.parent
    # The installed units, with ExecStart pointing at the installed binary
    # inside the destdir (systemd-analyze checks that it exists).
    for f in unitdir.iterdir():
        text = f.read_text()
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={bitbackd}", text,
                      flags=re.M)
        (tmp_path / f.name).write_text(text)
    units = [str(tmp_path / u) for u in ("bitbackd@vm1.service",
                                         "bitbackd@vm1.socket",
                                         "bitbackd-qmp@vm1.socket")]
    env = dict(os.environ, MANPATH=str(mandir))   # Documentation=man:...
    p = run(["systemd-analyze", "verify", *units], check=False, env=env,
            timeout=120)
    assert p.returncode == 0 and p.stderr.strip() == "" and \
        p.stdout.strip() == "", p.stdout + p.stderr
    # The check is real: a unit whose program is missing fails.
    (tmp_path / "bitbackd@.service").write_text(
        (tmp_path / "bitbackd@.service").read_text()
        .replace(str(bitbackd), str(tmp_path / "nonexistent")))
    p = run(["systemd-analyze", "verify", units[0]], check=False, env=env,
            timeout=120)
    assert p.returncode != 0 and "nonexistent" in p.stderr, p.stderr


def complete(words, cword_text=None):
    """bash completion of the command line `words` (the last one is being
    completed) with the repository's completion files; the candidates."""
    require("bash")
    comp = pathlib.Path("/usr/share/bash-completion/bash_completion")
    if not comp.exists():
        pytest.fail("bash-completion is not installed: run "
                    "scripts/install-deps.sh")
    script = (f"source {comp}\n"
              f"source {REPO}/data/completion/bitback\n"
              f"source {REPO}/data/completion/bitbackd\n"
              f"COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE='{' '.join(words)}'; COMP_POINT=${{#COMP_LINE}}\n"
              f"_{words[0]}\n"
              "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = dict(os.environ, PATH=f"{BUILD}:{os.environ['PATH']}")
    p = run(["bash", "-c", script], env=env, timeout=60)
    return set(p.stdout.split())


def test_bash_completion():
    assert "backup" in complete(["bitback", "ba"])
    assert {"--repo", "--at"} <= complete(["bitback", "restore", "--"])
    assert "--keep-daily" in complete(["bitback", "prune", "--keep-d"])
    assert "--config" in complete(["bitbackd", "--con"])
    assert complete(["bitbackd", "--socket-mode", "06"]) == {"0600", "0660"}


# -- sd_notify --------------------------------------------------------------

class NotifySocket:
    """A UNIX datagram socket as systemd's NOTIFY_SOCKET."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def recv(self, timeout=30):
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("stop", ["sigterm", "quit"])
def test_sd_notify_ready_and_stopping(tmp_path, stop):
    make_raw(tmp_path)
    with Daemon(tmp_path) as d:
        ns = NotifySocket(d.sockdir / "notify")
        try:
            env = dict(os.environ, NOTIFY_SOCKET=ns.path)
            d.start("--blockdev", DISK, nbd=True, wait=False, env=env)
            msg = ns.recv()
            assert msg["READY"] == "1" and msg["MAINPID"] == str(d.pid), msg
            # Ready means every option was processed: the pidfile and the
            # QMP socket exist and the node is there.
            assert d.pidfile.read_text().strip() == str(d.pid)
            assert d.qmp.node("disk0") is not None
            if stop == "sigterm":
                d.proc.send_signal(signal.SIGTERM)
            else:
                d.qmp.cmd("quit")
            msg = ns.recv()
            assert msg["STOPPING"] == "1", msg
            assert d.wait() == 0
        finally:
            ns.close()


def test_no_notify_socket_is_fine(tmp_path):
    make_raw(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with Daemon(tmp_path) as d:
        d.start("--blockdev", DISK, env=env)
        assert d.quit() == 0


# -- socket activation ------------------------------------------------------

def listening_unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    return s


def spawn_activated(argv, fds, names=None, cwd=None, listen_pid="self"):
    """Start argv with the sockets `fds` at 3, 4, ... and LISTEN_FDS set as
    systemd sets it (LISTEN_PID is the exec'd process's pid: a shell sets
    it and execs).  listen_pid="other": another pid (not for us)."""
    high = [fcntl.fcntl(f.fileno(), fcntl.F_DUPFD_CLOEXEC, 20) for f in fds]

    def place():
        for i, h in enumerate(high):
            os.dup2(h, 3 + i)            # inheritable

    env = dict(os.environ, LISTEN_FDS=str(len(fds)))
    env.pop("LISTEN_FDNAMES", None)
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    pid_expr = "$$" if listen_pid == "self" else "1"
    try:
        return subprocess.Popen(
            ["sh", "-c", f'LISTEN_PID={pid_expr} exec "$@"', "sh", *argv],
            preexec_fn=place, close_fds=False, env=env, cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    finally:
        for h in high:
            os.close(h)


def stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"did not exit: {err}")
    return proc.returncode, err


def wait_connectable(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            pass
        finally:
            s.close()
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def read_export(sock_path, name, length=64 * 1024):
    import nbd
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{name}?socket={sock_path}")
    try:
        return h.get_size(), h.pread(length, 0)
    finally:
        h.shutdown()


def test_socket_activation_named_fds(tmp_path):
    make_raw(tmp_path, 0x5a)
    with Daemon(tmp_path) as d:     # for its short socket folder
        nbd_path, qmp_path = d.sockdir / "a-nbd", d.sockdir / "a-qmp"
        fds = [listening_unix(nbd_path), listening_unix(qmp_path)]
        proc = spawn_activated(
            [BITBACKD, "--blockdev", DISK,
             "--nbd-server", "addr.type=fd,addr.str=nbd",
             "--export", "nbd,id=e0,node-name=disk0,name=disk0",
             "--chardev", "socket,id=m0,fd=qmp,server=on,wait=off",
             "--monitor", "m0"],
            fds, names=["nbd", "qmp"], cwd=tmp_path)
        for f in fds:
            f.close()
        try:
            # The QMP monitor answers on the passed socket ...
            wait_connectable(qmp_path, proc)
            with QMPClient(qmp_path) as c:
                assert c.cmd("query-version")["package"].startswith("bitback")
                # ... and a real NBD client reads the export on the other.
                size, data = read_export(nbd_path, "disk0")
                assert size == SIZE and data == b"\x5a" * len(data)
                # nbd-server-start over QMP takes addr type fd too, by name:
                # the server stops and starts again on the same socket.
                c.cmd("nbd-server-stop")
                e = c.error("nbd-server-start",
                            addr={"type": "fd", "str": "nope"})
                assert "nope" in e.desc
                c.cmd("nbd-server-start", addr={"type": "fd", "str": "nbd"})
                c.cmd("block-export-add", type="nbd", id="e1",
                      **{"node-name": "disk0"}, name="again")
                assert read_export(nbd_path, "again")[0] == SIZE
                c.cmd("quit")
            rc, err = stop(proc)
            assert rc == 0, err
            assert "not used by any option" not in err, err
            # The socket files are the activator's: left in place.
            assert nbd_path.exists() and qmp_path.exists()
        finally:
            stop(proc, signal.SIGKILL)


def test_socket_activation_by_number_and_unused_warning(tmp_path):
    make_raw(tmp_path)
    with Daemon(tmp_path) as d:
        nbd_path, extra = d.sockdir / "n", d.sockdir / "x"
        fds = [listening_unix(nbd_path), listening_unix(extra)]
        proc = spawn_activated(
            [BITBACKD, "--blockdev", DISK,
             "--nbd-server", "addr.type=fd,addr.str=3",
             "--export", "nbd,id=e0,node-name=disk0"], fds, cwd=tmp_path)
        for f in fds:
            f.close()
        try:
            wait_connectable(nbd_path, proc)
            assert read_export(nbd_path, "disk0")[0] == SIZE
            rc, err = stop(proc)
            assert rc == 0
            assert "passed socket 4 is not used" in err, err
        finally:
            stop(proc, signal.SIGKILL)


@pytest.mark.parametrize("case", ["not-listening", "not-a-socket",
                                  "datagram", "not-open", "unknown-name",
                                  "other-pid"])
def test_bad_passed_socket_is_a_clear_error(tmp_path, case):
    with Daemon(tmp_path) as d:
        path = d.sockdir / "s"
        names, listen_pid, fdarg = ["nbd"], "self", "nbd"
        if case == "not-listening":
            f = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            f.bind(str(path))             # bound, never listen()ed
            want = "is not a listening socket"
        elif case == "not-a-socket":
            f = open(tmp_path / "file", "w")
            want = "is not a socket"
        elif case == "datagram":
            f = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            f.bind(str(path))
            want = "is not a stream socket"
        elif case == "not-open":
            f = listening_unix(path)
            fdarg = "9"
            want = "file descriptor 9 is not open"
        elif case == "unknown-name":
            f = listening_unix(path)
            fdarg = "qmp"
            want = "no socket named 'qmp'"
        else:                             # LISTEN_PID names another process
            f = listening_unix(path)
            listen_pid = "other"
            want = "no socket named 'nbd'"
        for opt in (["--nbd-server", f"addr.type=fd,addr.str={fdarg}"],
                    ["--chardev", f"socket,id=m0,fd={fdarg},server=on",
                     "--monitor", "m0"]):
            proc = spawn_activated([BITBACKD, *opt], [f], names=names,
                                   listen_pid=listen_pid)
            try:
                _, err = proc.communicate(timeout=30)   # never a hang
            finally:
                stop(proc, signal.SIGKILL)
            assert proc.returncode == 1, err
            # the option that opens the socket: --nbd-server, --monitor
            assert want in err and opt[-2] in err, err
        f.close()


@pytest.mark.parametrize("binary", ["bitbackd", "qemu-storage-daemon"])
def test_libnbd_socket_activation_interop(tmp_path, binary):
    """libnbd starts the server itself with systemd socket activation, with
    the command line of libnbd's qemu-storage-daemon interop test
    (--nbd-server addr.type=fd,addr.str=N): the same line serves bitbackd
    and qemu-storage-daemon."""
    import nbd
    require("qemu-img")
    require(QSD)
    img = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", img, "10M"])
    prog = BITBACKD if binary == "bitbackd" else shutil.which(QSD)
    argv = [prog,
            "--blockdev", f"qcow2,file.driver=file,file.filename={img},"
                          "node-name=disk0",
            "--nbd-server", "addr.type=fd,addr.str=3",
            "--export", "nbd,node-name=disk0,id=nbd0,name=,writable=on"]
    h = nbd.NBD()
    try:
        h.connect_systemd_socket_activation(argv)
        assert h.get_size() == 10 * 1024 * 1024
        buf = b"1" * 512
        h.pwrite(buf, 512)
        assert h.pread(1024, 0) == bytearray(512) + buf
        h.flush()
        h.shutdown()
    finally:
        h.kill_subprocess(signal.SIGTERM)   # neither exits on disconnect
        del h                               # closing waits for it
    p = run(["qemu-io", "-f", "qcow2", img, "-c", "read -P 0x31 512 512"])
    assert "read 512/512" in p.stdout


# -- --config -----------------------------------------------------------------

def test_config_file_processed_in_order(tmp_path):
    make_raw(tmp_path, 0x77)
    with Daemon(tmp_path) as d:
        conf = tmp_path / "vm1.conf"
        conf.write_text(
            "# bitbackd@vm1: one option a line\n"
            "\n"
            f"  --nbd-server addr.type=unix,addr.path={d.nbd_sock}  \n"
            "export=nbd,id=e0,node-name=disk0,name=vm1\n"
            "\t# an indented comment\n"
            "socket-mode 0600\n")
        # The node comes from the command line before --config, the
        # export in the file uses it: the order is the command line's.
        d.start("--blockdev", DISK, "--config", conf)
        size, data = read_export(d.nbd_sock, "vm1")
        assert size == SIZE and data == b"\x77" * len(data)
        assert d.quit() == 0


@pytest.mark.parametrize("lines,line,words", [
    (["blockdev " + DISK, "bogus-option 1"], 2, ["unknown option 'bogus-option'"]),
    (["blockdev"], 1, ["'blockdev' needs a value"]),
    (["# c", "daemonize yes"], 2, ["'daemonize' takes no value"]),
    (["config other.conf"], 1, ["--config cannot be used"]),
    (["Blockdev x"], 1, ["expected an option name"]),
    (["blockdev " + DISK, "", "export nbd,id=e0,node-name=disk0"], 3,
     ["--export", "NBD server not running"]),
    (["blockdev driver=file,node-name=d,filename=missing.raw"], 1,
     ["--blockdev", "missing.raw"]),
])
def test_config_file_bad_line_names_file_and_line(tmp_path, lines, line, words):
    conf = tmp_path / "bad.conf"
    conf.write_text("\n".join(lines) + "\n")
    make_raw(tmp_path)
    p = run([BITBACKD, "--config", conf], check=False, cwd=tmp_path,
            timeout=60)
    assert p.returncode == 1
    assert f"{conf}:{line}:" in p.stderr, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


@pytest.mark.parametrize("what", ["missing", "fifo", "binary"])
def test_config_file_not_a_text_file(tmp_path, what):
    conf = tmp_path / "c.conf"
    if what == "fifo":
        os.mkfifo(conf)                   # refused without blocking
    elif what == "binary":
        conf.write_bytes(b"blockdev \0x\n")
    p = run([BITBACKD, "--config", conf], check=False, timeout=30)
    assert p.returncode == 1 and "--config" in p.stderr and \
        str(conf) in p.stderr, p.stderr


# -- pidfile under --daemonize ---------------------------------------------

def test_daemonize_refused_when_pidfile_is_locked(tmp_path):
    """As qemu-storage-daemon: the pidfile is locked while the daemon runs;
    a second --daemonize with the same pidfile fails with a clear error and
    leaves the file alone."""
    make_raw(tmp_path)
    pidfile = tmp_path / "d.pid"
    pid = None
    try:
        p = run([BITBACKD, "--daemonize", "--pidfile", pidfile,
                 "--blockdev", DISK], check=False, cwd=tmp_path, timeout=60)
        assert p.returncode == 0, p.stderr
        pid = int(pidfile.read_text())
        for prog in (BITBACKD, shutil.which(QSD) or QSD):
            p = run([prog, "--daemonize", "--pidfile", pidfile],
                    check=False, cwd=tmp_path, timeout=60)
            assert p.returncode != 0
            assert "pid file" in p.stderr.lower(), p.stderr
            assert int(pidfile.read_text()) == pid
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
    assert not pidfile.exists()
