"""Retention rules of `bitback prune` (issue 18, docs/specs/retention.md)
on a synthetic calendar.

An image is backed up offline (`bitback backup --image`) 36 times over
about 14 months -- several backups on some days and hours, across the
2025/2026 and 2026/2027 year boundaries and ISO week 2026-W53 -- with
BITBACK_FAKE_NOW giving each backup its time, and a little new data
written (`bitback io`) before each one.  A raw copy of the image is saved
right after every backup, without bitback.  A Python model of Proxmox
Backup Server's rules, written here, says what each option set keeps:

  dry run     `prune --dry-run` (JSON and text) lists exactly the model's
              keep set, with the model's rule for each kept backup, and the
              rest as deleted; the repository is unchanged, file by file
  prune       a real prune leaves exactly the model's backups; every kept
              point restores bit for bit (cmp with its saved copy),
              `verify` is clean; a second, tighter prune on the result
              does the same
  refusals    option sets that keep nothing, and a malformed
              BITBACK_FAKE_NOW, are refused with a clear error

Everything runs with TZ=UTC so that periods are those of the UTC times.
"""
import datetime
import json
import os
import shutil

import pytest

from conftest import bitback, require, run

MiB = 1 << 20
SIZE = 4 * MiB
RULES = ["last", "hourly", "daily", "weekly", "monthly", "yearly"]

# The calendar: (day, [times of day]).  2025-12-29 is Monday of ISO week
# 2026-W01; 2026-12-28 .. 2027-01-03 is 2026-W53.
CALENDAR = [
    ("2025-11-20", ["08:00:00", "09:30:00", "17:00:00"]),
    ("2025-12-01", ["08:00:00"]),
    ("2025-12-15", ["08:00:00", "08:45:00"]),
    ("2025-12-28", ["22:00:00"]),
    ("2025-12-29", ["01:00:00"]),
    ("2026-01-01", ["08:00:00", "12:00:00"]),
    ("2026-01-02", ["08:00:00"]),
    ("2026-02-14", ["08:00:00"]),
    ("2026-03-29", ["00:30:00", "01:30:00"]),
    ("2026-05-10", ["08:00:00"]),
    ("2026-07-01", ["08:00:00", "20:00:00"]),
    ("2026-08-31", ["23:59:59"]),
    ("2026-09-01", ["00:00:00"]),
    ("2026-10-15", ["08:00:00"]),
    ("2026-11-30", ["08:00:00", "08:10:00", "08:20:00"]),
    ("2026-12-27", ["08:00:00"]),
    ("2026-12-28", ["08:00:00"]),
    ("2026-12-31", ["08:00:00", "23:00:00"]),
    ("2027-01-01", ["08:00:00"]),
    ("2027-01-03", ["08:00:00", "09:00:00"]),
    ("2027-01-04", ["08:00:00", "08:30:00", "09:00:00", "09:05:00"]),
]
TIMES = [f"{d}T{t}Z" for d, ts in CALENDAR for t in ts]


def period(rule, seq, when):
    """The model's period of backup seq at ISO time `when` (UTC)."""
    t = datetime.datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ")
    if rule == "last":
        return seq
    if rule == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if rule == "daily":
        return (t.year, t.month, t.day)
    if rule == "weekly":
        iso = t.isocalendar()
        return ("W", iso[0], iso[1])
    if rule == "monthly":
        return (t.year, t.month)
    return t.year


def model(backups, keep):
    """PBS's rules: {seq: "keep-RULE"} for the kept backups of backups
    ({seq: time}), keep a {rule: N} dict."""
    decided = {}                         # seq -> rule name or None (removed)
    newest_first = sorted(backups, reverse=True)
    for rule in RULES:
        n = keep.get(rule, 0)
        if not n:
            continue
        covered = {period(rule, s, backups[s]) for s, r in decided.items()
                   if r is not None}
        taken = set()
        for s in newest_first:
            if s in decided:
                continue
            p = period(rule, s, backups[s])
            if p in covered:
                continue
            if p in taken:
                decided[s] = None
                continue
            if len(taken) >= n:
                break
            taken.add(p)
            decided[s] = f"keep-{rule}"
    return {s: r for s, r in decided.items() if r is not None}


def keep_args(keep):
    args = []
    for rule, n in keep.items():
        args += [f"--keep-{rule}", str(n)]
    return args


def snapshot(repo):
    """Every file of the repository with its size, mtime and content hash."""
    out = {}
    for root, _, files in os.walk(repo):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[p] = (st.st_size, st.st_mtime_ns, hash(fh.read()))
    return out


class Calendar:
    """A qbm image (raw data file) backed up once per entry of TIMES."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.repo = tmp_path / "repo"
        self.data = tmp_path / "disk.raw"
        self.image = tmp_path / "disk.qbm"
        self.refs = {}
        self.env = dict(os.environ, TZ="UTC")
        bitback("img", "create", "-f", "raw", self.data, str(SIZE))
        bitback("img", "create", "-f", "qbm", "-o", f"data-file={self.data}",
                self.image)

    def backup_all(self):
        for i, when in enumerate(TIMES):
            # 4 KiB of new data at a place that moves, some overwritten.
            off = (i * 3 % 60) * 65536 + (i % 7) * 4096
            bitback("io", self.image, "-c",
                    f"write -P {0x10 + i} {off} 4K")
            env = dict(self.env, BITBACK_FAKE_NOW=when)
            p = bitback("backup", "--image", self.image, "--repo", self.repo,
                        "--output=json", env=env)
            entry = json.loads(p.stdout)[0]
            seq = int(entry["id"])
            assert seq == i + 1
            ref = self.dir / f"ref{seq}.raw"
            shutil.copyfile(self.data, ref)
            self.refs[seq] = ref
        m = json.loads((self.repo / "disk" / "000001.json").read_text())
        assert m["time"] == TIMES[0]

    def backups(self):
        """{seq: time} from the manifests on disk."""
        out = {}
        for f in (self.repo / "disk").glob("*.json"):
            m = json.loads(f.read_text())
            out[int(m["id"])] = m["time"]
        return out

    def prune(self, *args, check=True):
        return bitback("prune", "--repo", self.repo, *args, env=self.env,
                       check=check)


OPTION_SETS = [
    {"last": 3, "daily": 4, "weekly": 3, "monthly": 4, "yearly": 2},
    {"hourly": 5, "monthly": 6},
    {"weekly": 4},
    {"daily": 7, "yearly": 5},
    {"last": 1, "hourly": 2, "daily": 2, "weekly": 2, "monthly": 2,
     "yearly": 9},
]


@pytest.fixture(scope="module")
def calendar(tmp_path_factory):
    require("qemu-img")
    c = Calendar(tmp_path_factory.mktemp("retention"))
    c.backup_all()
    return c


def test_dry_run_lists_the_model(calendar):
    c = calendar
    backups = c.backups()
    assert sorted(backups) == list(range(1, len(TIMES) + 1))
    before = snapshot(c.repo)
    for keep in OPTION_SETS + [{"last": 5}]:
        want = model(backups, keep)
        assert max(backups) in want                # the newest always stays
        p = c.prune(*keep_args(keep), "--dry-run", "--output=json")
        rep = json.loads(p.stdout)
        assert len(rep) == 1 and rep[0]["node"] == "disk"
        assert rep[0]["dry-run"] is True
        got = {int(e["id"]): e["rule"] for e in rep[0]["keep"]}
        assert got == want, keep
        gone = sorted(int(e["id"]) for e in rep[0]["delete"])
        assert gone == sorted(set(backups) - set(want))
        for e in rep[0]["keep"] + rep[0]["delete"]:
            assert e["time"] == backups[int(e["id"])]
        # Text: one line per backup, the rule named for the kept ones.
        p = c.prune(*keep_args(keep), "--dry-run")
        for s in backups:
            line = [ln for ln in p.stdout.splitlines() if f" {s:06d} " in ln]
            assert len(line) == 1, p.stdout
            if s in want:
                assert "would keep" in line[0] and want[s] in line[0]
            else:
                assert "would delete" in line[0]
        assert "nothing changed" in p.stdout
    # --keep N is --keep-last N.
    p = c.prune("--keep", "4", "--dry-run", "--output=json")
    got = {int(e["id"]): e["rule"] for e in json.loads(p.stdout)[0]["keep"]}
    assert got == model(backups, {"last": 4})
    assert snapshot(c.repo) == before


def check_kept(c, want):
    assert sorted(c.backups()) == sorted(want)
    lst = json.loads(bitback("list", "--repo", c.repo,
                             "--output=json").stdout)
    assert sorted(int(b["id"]) for b in lst) == sorted(want)
    for s in sorted(want):
        out = c.dir / f"restored{s}.raw"
        if out.exists():
            out.unlink()
        bitback("restore", "--repo", c.repo, "--at", str(s), out, "-f", "raw")
        run(["cmp", out, c.refs[s]])
        out.unlink()
    p = bitback("verify", "--repo", c.repo, check=False)
    assert p.returncode == 0 and "all good" in p.stdout, p.stdout + p.stderr
    names = os.listdir(c.repo / "disk")
    assert not [n for n in names if n.endswith(".tmp")]


def test_prune_keeps_exactly_the_model(calendar):
    c = calendar
    backups = c.backups()
    keep = OPTION_SETS[0]
    want = model(backups, keep)
    assert 5 < len(want) < len(backups)
    p = c.prune(*keep_args(keep))
    assert "is now a synthetic full" in p.stdout     # a parent went
    check_kept(c, want)
    # A tighter set on what is left: the model on the survivors.
    backups = c.backups()
    keep = {"last": 1, "weekly": 2, "yearly": 2}
    want = model(backups, keep)
    p = c.prune(*keep_args(keep), "--output=json")
    rep = json.loads(p.stdout)[0]
    assert rep["kept"] == len(want)
    assert sorted(int(i) for i in rep["deleted"]) == \
        sorted(set(backups) - set(want))
    check_kept(c, want)


@pytest.mark.parametrize("args", [
    ["--keep-last", "0"],
    ["--keep-daily", "0", "--keep-weekly", "0"],
    [],
])
def test_refuses_rules_that_keep_nothing(tmp_path, args):
    p = bitback("prune", "--repo", tmp_path, *args, check=False)
    assert p.returncode == 1
    assert "no rule keeps anything" in p.stderr


@pytest.mark.parametrize("args,msg", [
    (["--keep-daily", "x"], "--keep-daily must be a number"),
    (["--keep-weekly", "-1"], "--keep-weekly must be a number"),
    (["--keep", "2", "--keep-last", "3"], "given twice"),
])
def test_bad_counts(tmp_path, args, msg):
    p = bitback("prune", "--repo", tmp_path, *args, check=False)
    assert p.returncode == 1 and msg in p.stderr, p.stderr


@pytest.mark.parametrize("value", ["2026-01-05 10:00:00", "2026-13-05T10:00:00Z",
                                   "yesterday", "2026-02-30T10:00:00Z"])
def test_fake_now_malformed_refused(tmp_path, value):
    img = tmp_path / "d.qcow2"
    bitback("img", "create", "-f", "qcow2", img, str(SIZE))
    env = dict(os.environ, BITBACK_FAKE_NOW=value)
    p = bitback("backup", "--image", img, "--repo", tmp_path / "repo",
                env=env, check=False)
    assert p.returncode == 1 and "BITBACK_FAKE_NOW" in p.stderr, p.stderr
    assert not (tmp_path / "repo").exists()
