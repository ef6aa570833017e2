"""NBD client helpers of the tests (libnbd): connect, read a whole
export, and a free TCP port for a server."""
import socket

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
