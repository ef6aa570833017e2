"""Test certificates with certtool (gnutls-bin) in QEMU's TLS folder
layout, as QEMU's iotest 233 makes them: make_pki(base) returns the
folders (server, client, refused, wrongca, psk, psk-wrong) and the DNs of
the allowed and the refused client certificate.  conftest.py's session
fixture `pki` calls it once."""
import os
import pathlib
import subprocess

TIMEOUT = 60
ALLOWED_ORG = "Bitback allowed client"
REFUSED_ORG = "Bitback refused client"


def certtool(*args):
    p = subprocess.run(["certtool", *map(str, args)], capture_output=True,
                       text=True, timeout=TIMEOUT)
    if p.returncode != 0:
        raise AssertionError(f"certtool {' '.join(map(str, args))} failed "
                             f"({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def make_ca(d, name):
    key = d / f"{name}-key.pem"
    cert = d / f"{name}-cert.pem"
    info = d / f"{name}.info"
    info.write_text(f"cn = Bitback test CA {name}\nca\ncert_signing_key\n"
                    "expiration_days = 30\n")
    certtool("--generate-privkey", "--outfile", key)
    certtool("--generate-self-signed", "--load-privkey", key,
             "--template", info, "--outfile", cert)
    return key, cert


def make_cert(d, ca, name, template):
    key = d / f"{name}-key.pem"
    cert = d / f"{name}-cert.pem"
    info = d / f"{name}.info"
    info.write_text(template + "expiration_days = 30\n")
    certtool("--generate-privkey", "--outfile", key)
    certtool("--generate-certificate", "--load-ca-certificate", ca[1],
             "--load-ca-privkey", ca[0], "--load-privkey", key,
             "--template", info, "--outfile", cert)
    return key, cert


def subject_dn(cert):
    """The certificate's DN as gnutls_x509_crt_get_dn prints it, which is
    what QEMU's and bitbackd's authz match: the certificate's own order of
    RDNs, the reverse of the RFC 4514 string `certtool -i` prints (the
    test's names hold no ',')."""
    out = certtool("-i", "--infile", cert).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Subject:"):
            return ",".join(reversed(line[len("Subject:"):].strip().split(",")))
    raise AssertionError(out)


def tls_dir(base, name, ca_cert, files):
    """A folder in QEMU's layout: ca-cert.pem plus files {name: path}."""
    d = base / name
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(pathlib.Path(ca_cert).read_bytes())
    for dst, src in files.items():
        (d / dst).write_bytes(pathlib.Path(src).read_bytes())
        os.chmod(d / dst, 0o600)
    return d


def make_pki(base):
    """CA 1 with a server cert and two client certs, CA 2 with a client
    cert, and PSK files, in QEMU's folder layout."""
    work = base / "work"
    work.mkdir()
    ca1 = make_ca(work, "ca1")
    ca2 = make_ca(work, "ca2")
    srv = make_cert(work, ca1, "server",
                    "organization = Bitback server\ncn = localhost\n"
                    "dns_name = localhost\nip_address = 127.0.0.1\n"
                    "tls_www_server\nencryption_key\nsigning_key\n")
    client = "cn = localhost\ntls_www_client\nencryption_key\nsigning_key\n"
    ok = make_cert(work, ca1, "client-ok",
                   f"organization = {ALLOWED_ORG}\n" + client)
    bad = make_cert(work, ca1, "client-refused",
                    f"organization = {REFUSED_ORG}\n" + client)
    other = make_cert(work, ca2, "client-ca2",
                      f"organization = {ALLOWED_ORG}\n" + client)
    dirs = {
        "server": tls_dir(base, "server", ca1[1], {
            "server-cert.pem": srv[1], "server-key.pem": srv[0]}),
        "client": tls_dir(base, "client", ca1[1], {
            "client-cert.pem": ok[1], "client-key.pem": ok[0]}),
        "refused": tls_dir(base, "refused", ca1[1], {
            "client-cert.pem": bad[1], "client-key.pem": bad[0]}),
        "wrongca": tls_dir(base, "wrongca", ca2[1], {
            "client-cert.pem": other[1], "client-key.pem": other[0]}),
    }
    key = os.urandom(32).hex()
    for name, content in (("psk", f"qemu:{key}\n"),
                          ("psk-wrong", f"qemu:{os.urandom(32).hex()}\n")):
        d = base / name
        d.mkdir()
        (d / "keys.psk").write_text(content)
        os.chmod(d / "keys.psk", 0o600)
        dirs[name] = d
    dirs["allowed_dn"] = subject_dn(ok[1])
    dirs["refused_dn"] = subject_dn(bad[1])
    assert ALLOWED_ORG in dirs["allowed_dn"]
    return dirs
