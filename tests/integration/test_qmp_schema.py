"""query-qmp-schema as libvirt reads it, on bitbackd and on real
qemu-storage-daemon 7.2, and blockdev-add refusing members its driver does
not take (docs/qmp.md, "query-qmp-schema" and "blockdev-add").

libvirt probes QEMU's features with query paths through the schema
(its qemu_qapi.c); resolve() below follows the same documented rules,
written from them:
  - the path starts with a command or event name, then "arg-type" or
    "ret-type" (a command's member naming a type);
  - on an object, NAME selects the member NAME (only "members": a
    variant's members are reached through +CASE), *NAME the same member
    only if it is optional (it has "default"), +CASE the variant whose
    "case" is CASE;
  - ^VALUE (last) asks whether the enum reached holds VALUE, !TYPE (last)
    whether the builtin reached has that json-type, $FEATURE (last)
    whether the type reached lists that feature;
  - an array is entered through its element type, an alternate by trying
    each of its members' types in turn; enums and builtins take only the
    last-step queries.
A type name that no entry defines is a broken schema (an error, not a
miss).
"""
import os

import pytest

from bitback_testlib import BITBACKD, QSD, Daemon, QMPError
from conftest import require, run

MiB = 1024 * 1024


class SchemaError(Exception):
    pass


def resolve(schema, path):
    """True when libvirt's query path resolves in schema (a list of
    SchemaInfo).  Raises SchemaError for a dangling type name."""
    types = {e["name"]: e for e in schema}
    steps = path.split("/")
    if steps[0] not in types:
        return False
    return _walk(types, steps[0], steps[1:], 0)


def _walk(types, name, steps, depth):
    if depth > 1000:
        raise SchemaError("loop in the schema")
    if name not in types:
        raise SchemaError(f"type '{name}' is not defined")
    cur = types[name]
    if not steps:
        return True
    q, rest = steps[0], steps[1:]
    mod = q[0] if not q[0].isalpha() else ""
    key = q[len(mod):]
    meta = cur["meta-type"]
    if mod in "^!$" and mod and rest:
        raise SchemaError(f"'{q}' must be the last step")
    if mod == "$":
        return key in cur.get("features", [])
    if meta in ("command", "event"):
        if mod or key not in cur:
            return False
        return _walk(types, cur[key], rest, depth + 1)
    if meta == "object":
        if mod in ("^", "!"):
            return False
        if mod == "+":
            hit = [v for v in cur.get("variants", []) if v["case"] == key]
        else:
            hit = [m for m in cur.get("members", []) if m["name"] == key]
            if mod == "*":
                hit = [m for m in hit if "default" in m]
        return bool(hit) and _walk(types, hit[0]["type"], rest, depth + 1)
    if meta == "array":
        return _walk(types, cur["element-type"], steps, depth + 1)
    if meta == "alternate":
        return any(_walk(types, m["type"], steps, depth + 1)
                   for m in cur["members"])
    if meta == "enum":
        return mod == "^" and key in cur["values"]
    if meta == "builtin":
        return mod == "!" and cur["json-type"] == key
    return False


def referenced_types(entry):
    """Every type name entry refers to."""
    refs = []
    for k in ("arg-type", "ret-type", "element-type"):
        if k in entry:
            refs.append(entry[k])
    for m in entry.get("members", []):
        if isinstance(m, dict) and "type" in m:
            refs.append(m["type"])
    for v in entry.get("variants", []):
        refs.append(v["type"])
    return refs


# Paths libvirt-style probes take for what bitbackd implements: they must
# resolve on both daemons.
BOTH = [
    "blockdev-add/arg-type/driver/^file",
    "blockdev-add/arg-type/driver/^qcow2",
    "blockdev-add/arg-type/*node-name",
    "blockdev-add/arg-type/read-only/!boolean",
    "blockdev-add/arg-type/force-share",
    "blockdev-add/arg-type/cache/direct",
    "blockdev-add/arg-type/discard/^unmap",
    "blockdev-add/arg-type/auto-read-only",
    "blockdev-add/arg-type/detect-zeroes/^off",
    "blockdev-add/arg-type/cache/no-flush",
    "blockdev-add/arg-type/+file/aio/^io_uring",
    "blockdev-add/arg-type/+file/filename",
    "blockdev-add/arg-type/+file/locking/^auto",
    "blockdev-add/arg-type/+raw/file",
    "blockdev-add/arg-type/+qcow2/file",
    "blockdev-add/arg-type/+qcow2/backing",
    "blockdev-add/arg-type/+blkdebug/image",
    "blockdev-add/arg-type/+blkdebug/inject-error",
    "blockdev-add/arg-type/+nbd/server",
    "blockdev-add/arg-type/+nbd/export",
    "blockdev-add/arg-type/+nbd/tls-creds",
    "blockdev-add/arg-type/+nbd/tls-hostname",
    "blockdev-add/arg-type/+nbd/reconnect-delay",
    "blockdev-add/arg-type/+nbd/open-timeout",
    "blockdev-add/arg-type/+rbd/pool",
    "blockdev-add/arg-type/+rbd/namespace",
    "blockdev-add/arg-type/+rbd/image",
    "blockdev-add/arg-type/+rbd/conf",
    "blockdev-add/arg-type/+rbd/snapshot",
    "blockdev-add/arg-type/+rbd/user",
    "blockdev-create/arg-type/options/+file/size",
    "blockdev-create/arg-type/options/+file/preallocation",
    "blockdev-create/arg-type/options/+qcow2/version",
    "blockdev-create/arg-type/options/+qcow2/cluster-size",
    "blockdev-create/arg-type/options/+qcow2/backing-file",
    "blockdev-create/arg-type/options/+qcow2/compression-type",
    "block-export-add/arg-type/type/^nbd",
    "block-export-add/arg-type/*iothread",
    "block-export-add/arg-type/writable",
    "block-export-add/arg-type/+nbd/bitmaps",
    "block-export-add/arg-type/+nbd/allocation-depth",
    "block-export-add/arg-type/+nbd/name",
    "nbd-server-start/arg-type/tls-creds",
    "nbd-server-start/arg-type/tls-authz",
    "nbd-server-start/arg-type/max-connections",
    "object-add/arg-type/qom-type/^secret",
    "object-add/arg-type/qom-type/^iothread",
    "object-add/arg-type/+secret/data",
    "object-add/arg-type/+secret/format/^base64",
    "object-add/arg-type/+tls-creds-x509/dir",
    "object-add/arg-type/+tls-creds-x509/endpoint/^client",
    "object-add/arg-type/+tls-creds-x509/verify-peer",
    "object-add/arg-type/+tls-creds-psk/username",
    "object-add/arg-type/+authz-list/policy/^deny",
    "object-add/arg-type/+authz-simple/identity",
    "object-add/arg-type/+iothread/poll-max-ns",
    "object-add/arg-type/+iothread/aio-max-batch",
    "block-dirty-bitmap-add/arg-type/persistent",
    "query-qmp-schema",
    "BLOCK_JOB_COMPLETED/arg-type/device",
    "JOB_STATUS_CHANGE/arg-type/status",
]

# Paths for what bitbackd does not implement: they resolve on QSD (so the
# resolver does find such things) and must not on bitbackd.
QSD_ONLY = [
    "blockdev-add/arg-type/+file/drop-cache",
    "blockdev-add/arg-type/+qcow2/data-file",
    "blockdev-add/arg-type/+qcow2/encrypt",
    "blockdev-add/arg-type/+rbd/key-secret",
    "blockdev-add/arg-type/+rbd/encrypt",
    "blockdev-add/arg-type/+nbd/x-dirty-bitmap",
    "blockdev-add/arg-type/driver/^luks",
    "blockdev-add/arg-type/+luks",
    "blockdev-add/arg-type/+throttle",
    "blockdev-create/arg-type/options/+luks",
    "blockdev-create/arg-type/options/+rbd",
    "blockdev-create/arg-type/options/+qcow2/data-file",
    "block-export-add/arg-type/+fuse",
    "block-export-add/arg-type/type/^vhost-user-blk",
    "object-add/arg-type/+throttle-group",
    "object-add/arg-type/qom-type/^memory-backend-file",
    "object-add/arg-type/+tls-creds-x509/passwordid/!string",
]


@pytest.fixture(scope="module")
def schemas(tmp_path_factory):
    """{"qsd": schema, "bitbackd": schema}."""
    out = {}
    for name, binary in (("qsd", QSD), ("bitbackd", BITBACKD)):
        with Daemon(tmp_path_factory.mktemp(name), binary=binary) as d:
            d.start()
            out[name] = d.qmp.cmd("query-qmp-schema")
            assert d.quit() == 0
    return out


def test_resolver_rules():
    """The resolver itself, on a small schema in QEMU's shapes."""
    s = [
        {"name": "c", "meta-type": "command", "arg-type": "0",
         "ret-type": "any"},
        {"name": "0", "meta-type": "object",
         "members": [{"name": "t", "type": "1"},
                     {"name": "o", "type": "str", "default": None},
                     {"name": "l", "type": "[2]"}],
         "tag": "t", "variants": [{"case": "a", "type": "2"}]},
        {"name": "1", "meta-type": "enum", "values": ["a"]},
        {"name": "2", "meta-type": "object",
         "members": [{"name": "x", "type": "int"}]},
        {"name": "[2]", "meta-type": "array", "element-type": "2"},
        {"name": "int", "meta-type": "builtin", "json-type": "int"},
        {"name": "str", "meta-type": "builtin", "json-type": "string"},
        {"name": "any", "meta-type": "builtin", "json-type": "value"},
    ]
    assert resolve(s, "c/arg-type/+a/x")
    assert not resolve(s, "c/arg-type/x")      # variant members need +a
    assert resolve(s, "c/arg-type/*o") and not resolve(s, "c/arg-type/*t")
    assert resolve(s, "c/arg-type/t/^a") and not resolve(s, "c/arg-type/t/^b")
    assert resolve(s, "c/arg-type/l/x")        # arrays are flattened
    assert resolve(s, "c/arg-type/o/!string")
    assert not resolve(s, "c/arg-type/+b") and not resolve(s, "d/arg-type")
    with pytest.raises(SchemaError):
        resolve(s + [{"name": "e", "meta-type": "command",
                      "arg-type": "nope", "ret-type": "any"}], "e/arg-type")


@pytest.mark.parametrize("path", BOTH)
def test_path_resolves_on_both(schemas, path):
    assert resolve(schemas["qsd"], path), f"qsd: {path}"
    assert resolve(schemas["bitbackd"], path), f"bitbackd: {path}"


@pytest.mark.parametrize("path", QSD_ONLY)
def test_path_only_on_qsd(schemas, path):
    assert resolve(schemas["qsd"], path), f"qsd: {path}"
    assert not resolve(schemas["bitbackd"], path), f"bitbackd: {path}"


@pytest.mark.parametrize("daemon", ["qsd", "bitbackd"])
def test_no_dangling_types(schemas, daemon):
    schema = schemas[daemon]
    names = [e["name"] for e in schema]
    assert len(names) == len(set(names)), "duplicate names"
    for e in schema:
        for t in referenced_types(e):
            assert t in names, f"{e['name']} refers to undefined type {t}"


def test_union_shapes(schemas):
    """blockdev-add's arguments: the common members, the tag an enum of
    every driver, one variant per driver (only its own members)."""
    types = {e["name"]: e for e in schemas["bitbackd"]}
    arg = types[types["blockdev-add"]["arg-type"]]
    assert arg["meta-type"] == "object" and arg["tag"] == "driver"
    common = {m["name"]: m for m in arg["members"]}
    assert {"driver", "node-name", "read-only", "force-share", "cache",
            "crash-safe", "crash-safe-region-size", "discard",
            "detect-zeroes", "auto-read-only"} == set(common)
    drivers = types[common["driver"]["type"]]
    assert drivers["meta-type"] == "enum"
    assert sorted(drivers["values"]) == sorted(
        ["file", "raw", "qbm", "qcow2", "nbd", "rbd", "blkdebug"])
    assert [m["name"] for m in drivers["members"]] == drivers["values"]
    cases = {v["case"]: types[v["type"]] for v in arg["variants"]}
    assert set(cases) == set(drivers["values"])
    file_members = {m["name"] for m in cases["file"]["members"]}
    assert file_members == {"filename", "locking", "x-no-follow",
                            "x-remove-on-close", "aio"}
    assert not file_members & set(common)
    assert "default" not in [m for m in cases["file"]["members"]
                             if m["name"] == "filename"][0]
    # blockdev-create's options: the drivers that create.
    create = types[types["blockdev-create"]["arg-type"]]
    options = [m for m in create["members"] if m["name"] == "options"][0]
    opt = types[options["type"]]
    assert opt["tag"] == "driver"
    assert {v["case"] for v in opt["variants"]} == {"file", "qbm", "qcow2"}


def blockdev_errors(d, img):
    """The errors of a few blockdev-add calls with unknown or mistyped
    members, as (class, desc)."""
    c = d.qmp
    calls = [
        dict(driver="file", filename=img, bogus=1),
        dict(driver="raw", file={"driver": "file", "filename": img,
                                 "bogus2": 1}),
        dict(driver="qcow2", file={"driver": "file", "filename": img},
             backing={"driver": "file", "filename": img, "x": True}),
        dict(driver="file", filename=img, cache={"direct": False,
                                                "nope": 1}),
        dict(driver="nbd", server={"type": "unix", "path": "/nonexistent",
                                   "bog": 1}),
        dict(driver="file", filename=img, locking=5),
        dict(driver="file", filename=5),
        dict(driver="file", filename=img, **{"read-only": "yes"}),
        dict(driver="raw", file={"driver": "file", "filename": []}),
        dict(driver="file", filename=img, discard="bogus"),
        dict(driver="file", filename=img, aio="native"),
    ]
    out = []
    for i, a in enumerate(calls):
        e = c.error("blockdev-add", **{"node-name": f"n{i}"}, **a)
        out.append((e.cls, e.desc))
    return out


def test_unknown_members_refused_as_qsd(tmp_path):
    errs = {}
    for name, binary in (("qsd", QSD), ("bitbackd", BITBACKD)):
        img = tmp_path / f"{name}.raw"
        run(["qemu-img", "create", "-q", "-f", "raw", img, "1M"])
        with Daemon(tmp_path / name, binary=binary) as d:
            d.start()
            errs[name] = blockdev_errors(d, str(img))
            # Nothing was opened by the refused calls.
            assert d.qmp.cmd("query-named-block-nodes") == []
            assert d.quit() == 0
    assert errs["bitbackd"][0] == ("GenericError",
                                   "Parameter 'bogus' is unexpected")
    assert errs["bitbackd"][1][1] == "Parameter 'file.bogus2' is unexpected"
    assert errs["qsd"] == errs["bitbackd"]


def test_libvirt_members(tmp_path):
    """The members libvirt sends with blockdev-add open a node on bitbackd
    as on qsd; discard=ignore drops discards (the file keeps its blocks),
    discard=unmap passes them on (the blocks are freed); what bitbackd does
    not do (detect-zeroes on, cache.no-flush on) is refused clearly."""
    require("nbdinfo")
    imgs = {}
    with Daemon(tmp_path / "d", binary=BITBACKD) as d:
        d.start(nbd=True)
        c = d.qmp
        for mode in ("ignore", "unmap"):
            img = imgs[mode] = tmp_path / f"{mode}.raw"
            run(["qemu-img", "create", "-q", "-f", "raw", img, "4M"])
            c.cmd("blockdev-add", driver="file", filename=str(img),
                  **{"node-name": f"f-{mode}", "auto-read-only": True,
                     "discard": mode, "detect-zeroes": "off"}, aio="threads",
                  cache={"direct": False, "no-flush": False})
            c.cmd("blockdev-add", driver="raw", file=f"f-{mode}",
                  **{"node-name": f"r-{mode}", "discard": mode})
            c.cmd("block-export-add", type="nbd", id=f"e-{mode}",
                  **{"node-name": f"r-{mode}"}, writable=True)
            uri = d.nbd_uri(f"r-{mode}")
            run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 2M", uri])
            blocks = os.stat(img).st_blocks
            run(["qemu-io", "-f", "raw", "-c", "discard 0 2M", uri])
            after = os.stat(img).st_blocks
            if mode == "ignore":
                assert after == blocks
                run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 2M", uri])
            else:
                assert after < blocks
        with pytest.raises(QMPError, match="detect-zeroes 'on' is not "
                           "supported"):
            c.cmd("blockdev-add", driver="file", filename=str(imgs["ignore"]),
                  **{"node-name": "z", "detect-zeroes": "on"})
        with pytest.raises(QMPError, match="cache.no-flush=on is not "
                           "supported"):
            c.cmd("blockdev-add", driver="file", filename=str(imgs["ignore"]),
                  **{"node-name": "z"}, cache={"no-flush": True})
        assert d.quit() == 0


def test_every_documented_option_opens(tmp_path):
    """A node with every member its driver's variant lists opens (so the
    tables do not list what open refuses, nor refuse what they list)."""
    base = tmp_path / "base.qcow2"
    img = tmp_path / "d.qcow2"
    raw = tmp_path / "r.raw"
    run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1M"])
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"])
    run(["qemu-img", "create", "-q", "-f", "raw", raw, "1M"])
    common = {"read-only": True, "force-share": True,
              "cache": {"direct": False}, "crash-safe": False,
              "crash-safe-region-size": 64 * MiB, "discard": "unmap",
              "detect-zeroes": "off", "auto-read-only": False}
    file_opts = {"driver": "file", "filename": str(img), "locking": "off",
                 "x-no-follow": True, "x-remove-on-close": False,
                 "aio": "threads"}
    nodes = {
        "file": dict(file_opts),
        "qcow2": {"driver": "qcow2", "file": dict(file_opts),
                  "backing": {"driver": "qcow2",
                              "filename": str(base)}},
        "raw": {"driver": "raw", "file": {"driver": "file",
                                          "filename": str(raw)}},
        "blkdebug": {"driver": "blkdebug", "image": {
            "driver": "file", "filename": str(raw)}, "inject-error": []},
    }
    with Daemon(tmp_path / "bbd", binary=BITBACKD) as d:
        d.start("--blockdev", f"driver=raw,node-name=r0,crash-safe=off,"
                f"file.driver=file,file.filename={raw},file.locking=off",
                "--export", "type=nbd,id=e0,node-name=r0,name=r0", nbd=True)
        c = d.qmp
        types = {e["name"]: e for e in c.cmd("query-qmp-schema")}
        arg = types[types["blockdev-add"]["arg-type"]]
        cases = {v["case"]: types[v["type"]] for v in arg["variants"]}
        listed_common = {m["name"] for m in arg["members"]}
        assert listed_common == set(common) | {"driver", "node-name"}
        for drv, opts in nodes.items():
            listed = {m["name"] for m in cases[drv]["members"]}
            # filename is the shorthand for a format node's file child.
            skip = {"filename"} if drv != "file" else set()
            assert set(opts) - {"driver"} == listed - skip, drv
            c.cmd("blockdev-add", **{"node-name": f"n-{drv}"}, **common,
                  **opts)
        # nbd: every member but the TLS ones (test_tls.py) and filename
        # (the URI form, exclusive with server).
        nbd = {"driver": "nbd", "export": "r0", "open-timeout": 5,
               "reconnect-delay": 0,
               "server": {"type": "unix", "path": str(d.nbd_sock)}}
        listed = {m["name"] for m in cases["nbd"]["members"]}
        assert listed - set(nbd) == {"tls-creds", "tls-hostname",
                                     "filename"}
        c.cmd("blockdev-add", **{"node-name": "n-nbd"}, **common, **nbd)
        c.cmd("blockdev-add", **{"node-name": "n-nbd-uri"}, driver="nbd",
              filename=f"nbd+unix:///r0?socket={d.nbd_sock}",
              **{"read-only": True})
        opened = {n["node-name"] for n in c.cmd("query-named-block-nodes")}
        assert {f"n-{x}" for x in list(nodes) + ["nbd"]} <= opened
        for n in ["n-nbd-uri", "n-nbd"] + [f"n-{x}" for x in nodes]:
            c.cmd("blockdev-del", **{"node-name": n})
        assert d.quit() == 0


def test_export_add_checks_union(tmp_path):
    """block-export-add checks the nbd case's members (and the common
    ones) and still takes them all (allocation-depth only false: the
    schema lists what is accepted, docs/qmp.md)."""
    raw = tmp_path / "r.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", raw, "1M"])
    with Daemon(tmp_path / "bbd", binary=BITBACKD) as d:
        d.start(nbd=True)
        c = d.qmp
        c.cmd("blockdev-add", driver="raw", **{"node-name": "r0"},
              file={"driver": "file", "filename": str(raw)})
        e = c.error("block-export-add", type="nbd", id="e0",
                    **{"node-name": "r0"}, bogus=1)
        assert e.desc == "Parameter 'bogus' is unexpected"
        e = c.error("block-export-add", type="nbd", id="e0",
                    **{"node-name": "r0"}, bitmaps="x")
        assert e.desc == "Invalid parameter type for 'bitmaps', expected: array"
        e = c.error("block-export-add", type="nbd", id="e0")
        assert e.desc == "Parameter 'node-name' is missing"
        c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "r0"},
              name="r0", description="d", writable=False, writethrough=False,
              bitmaps=[], **{"allocation-depth": False})
        assert [x["id"] for x in c.cmd("query-block-exports")] == ["e0"]
        assert d.quit() == 0


def test_command_line_blockdev_checked(tmp_path):
    """--blockdev goes through the same check: an unknown key stops the
    daemon with QEMU's text; keyval strings for bool/int members pass."""
    raw = tmp_path / "r.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", raw, "1M"])
    d = Daemon(tmp_path / "bad", binary=BITBACKD)
    try:
        with pytest.raises(AssertionError, match="Parameter 'bogus' is "
                           "unexpected"):
            d.start("--blockdev",
                    f"driver=file,node-name=f,filename={raw},bogus=1")
    finally:
        d.cleanup()
    with Daemon(tmp_path / "good", binary=BITBACKD) as d:
        d.start("--blockdev", f"driver=file,node-name=f,filename={raw},"
                "crash-safe=off,crash-safe-region-size=65536,locking=off")
        assert [n["node-name"] for n in d.qmp.cmd("query-named-block-nodes")
                ] == ["f"]
        assert d.quit() == 0
