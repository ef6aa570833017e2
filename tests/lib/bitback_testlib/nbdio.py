"""NBD client helpers of the tests (libnbd): connect, read a whole
export, a raw socket in transmission phase, and a free TCP port for a
server."""
import socket
import struct

import nbd

MiB = 1024 * 1024


def connect(uri, contexts=()):
    """A libnbd handle connected to uri, with the meta contexts asked
    (tls-certificates= / tls-psk-file= in the URI are honoured)."""
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    # nbds:// URIs name certificate folders and PSK files (tests only)
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    return h


def read_all(uri, path):
    """Copy the whole export at uri into the file path; returns path."""
    h = connect(uri)
    size = h.get_size()
    with open(path, "wb") as f:
        for off in range(0, size, 4 * MiB):
            f.write(h.pread(min(4 * MiB, size - off), off))
    h.shutdown()
    return path


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def nbd_handshake(path, name):
    """A raw NBD connection to export `name` over the UNIX socket `path`,
    in transmission phase (NBD_OPT_EXPORT_NAME, no zeroes)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    hello = b""
    while len(hello) < 18:
        hello += s.recv(18 - len(hello))
    assert hello[:8] == b"NBDMAGIC", hello
    s.sendall(struct.pack(">I", 3))        # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name.encode())
    reply = b""
    while len(reply) < 10:
        chunk = s.recv(10 - len(reply))
        assert chunk, "server closed during the handshake"
        reply += chunk
    return s
