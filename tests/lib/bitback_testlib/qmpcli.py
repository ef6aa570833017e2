"""The QMP client (bitback_testlib.qmp) on the command line, for shell
scripts (the demos and benchmarks):

    PYTHONPATH=<repo>/tests/lib python3 -m bitback_testlib.qmpcli SOCKET ...

See main() for the subcommands.
"""
import json
import sys

from .qmp import QMPClient


def _show(q, command, args, job, node):
    """One exchange printed as a person types it and as the daemon
    answers; with job, wait for its BLOCK_JOB_COMPLETED/_CANCELLED event;
    with node (a query-named-block-nodes), only its dirty-bitmaps."""
    req = {"execute": command}
    if args:
        req["arguments"] = json.loads(args)
    print("qmp> " + json.dumps(req))
    reply = q.execute(command, req.get("arguments"))
    reply.pop("id", None)
    if node and "return" in reply:
        bitmaps = [n.get("dirty-bitmaps") for n in reply["return"]
                   if n.get("node-name") == node]
        print(f'... node "{node}", "dirty-bitmaps": '
              + json.dumps(bitmaps[0], indent=2))
    else:
        print(json.dumps(reply, indent=2) if command.startswith("query")
              else json.dumps(reply))
    if "error" in reply:
        return 1
    if not job:
        return 0
    while True:
        ev = q.events.pop(0) if q.events else q.recv()
        if "event" not in ev:
            continue
        if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") \
                and ev["data"].get("device") == job:
            print("event: " + json.dumps(ev["data"]))
            ok = ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"]
            return 0 if ok else 1
        if ev["event"] == "JOB_STATUS_CHANGE" and \
                ev["data"] == {"id": job, "status": "concluded"}:
            sys.exit(f"job {job} concluded without a BLOCK_JOB_COMPLETED "
                     f"event for device {job!r}")


def _field(obj, path):
    for key in path.split("."):
        obj = (obj or {}).get(key)
    return obj


def main(argv=None):
    """python3 -m bitback_testlib.qmpcli SOCKET SUBCOMMAND ...

    show COMMAND [JSON-ARGS] [--job ID] [--node NODE]
        one exchange, printed (the demos); exit 1 on an error reply or a
        failed job
    run JSON-COMMAND...
        run whole {"execute": ...} objects in order, silently; exit with
        "QMP error: ..." on the first error reply
    node NODE FIELD...
        print FIELD (dotted, e.g. crash-safe.writer-waits) of NODE's
        query-named-block-nodes entry, space separated; 0 where missing
    bitmap NODE NAME FIELD
        print FIELD (e.g. count) of NODE's dirty bitmap NAME; nothing if
        there is no such bitmap
    """
    import argparse
    ap = argparse.ArgumentParser(prog="python3 -m bitback_testlib.qmpcli",
                                 description=main.__doc__.splitlines()[0])
    ap.add_argument("socket")
    sub = ap.add_subparsers(dest="sub", required=True)
    p = sub.add_parser("show")
    p.add_argument("command")
    p.add_argument("args", nargs="?", default="")
    p.add_argument("--job", default="")
    p.add_argument("--node", default="")
    p = sub.add_parser("run")
    p.add_argument("commands", nargs="+")
    p = sub.add_parser("node")
    p.add_argument("node")
    p.add_argument("fields", nargs="+")
    p = sub.add_parser("bitmap")
    p.add_argument("node")
    p.add_argument("name")
    p.add_argument("field")
    a = ap.parse_args(argv)
    with QMPClient(a.socket, timeout=600) as q:
        if a.sub == "show":
            return _show(q, a.command, a.args, a.job, a.node)
        if a.sub == "run":
            for c in a.commands:
                c = json.loads(c)
                reply = q.execute(c["execute"], c.get("arguments"))
                if "error" in reply:
                    sys.exit("QMP error: %s" % reply["error"])
            return 0
        if a.sub == "node":
            n = q.node(a.node)
            print(" ".join(str(_field(n, f) or 0) for f in a.fields))
            return 0
        b = q.bitmap(a.node, a.name)
        if b is not None:
            print(b[a.field])
        return 0


if __name__ == "__main__":
    sys.exit(main())
