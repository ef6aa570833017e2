#!/usr/bin/python3
"""Long crash trials for crash-safe bitmaps (issue 7).

Runs crash_scenarios.trial (tests/integration/crash_scenarios.py) N times:
SIGKILL (and with --powerloss, a simulated power cut that drops a random
subset of unsynced writes) at a random moment under random writes, then
checks that the recovered bitmap is consistent, covers every acknowledged
write, and yields an incremental backup equal to the image.  Prints the
worst over-approximation (dirty bytes the recovery reported beyond what
was written) and exits 1 on the first violation.

    tests/stress/crash_trials.py [--trials 500] [--format qbm|qcow2|both]
                                 [--powerloss] [--seed S]
Use BITBACK_BUILD to pick the build (default: build/).
"""
import argparse
import pathlib
import shutil
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))
sys.path.insert(0, str(HERE.parent / "lib"))           # bitback_testlib

import crash_scenarios  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--format", choices=["qbm", "qcow2", "both"], default="both")
    ap.add_argument("--powerloss", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    fmts = ["qbm", "qcow2"] if args.format == "both" else [args.format]
    worst = {"over": -1}
    total_over = 0
    start = time.monotonic()
    for i in range(args.trials):
        fmt = fmts[i % len(fmts)]
        seed = args.seed * 100000 + i
        d = pathlib.Path(tempfile.mkdtemp(prefix="bbcrash-"))
        try:
            r = crash_scenarios.trial(d, fmt, seed, powerloss=args.powerloss)
        except AssertionError as e:
            print(f"trial {i} ({fmt}, seed {seed}) FAILED: {e}")
            print(f"kept for inspection: {d}")
            return 1
        shutil.rmtree(d, ignore_errors=True)
        total_over += r["over"]
        if r["over"] > worst["over"]:
            worst = dict(r, trial=i, fmt=fmt, seed=seed)
        if (i + 1) % 25 == 0:
            print(f"{i + 1} trials ok, worst over-approximation so far "
                  f"{worst['over'] / 2**20:.1f} MiB", flush=True)
    el = time.monotonic() - start
    print(f"{args.trials} trials ({', '.join(fmts)}"
          f"{', power loss' if args.powerloss else ', SIGKILL'}) passed in {el:.0f} s")
    print(f"region size {crash_scenarios.REGION // 2**20} MiB; "
          f"worst over-approximation {worst['over'] / 2**20:.2f} MiB "
          f"(trial {worst['trial']}, {worst['fmt']}, seed {worst['seed']}: "
          f"{worst['written'] / 2**20:.1f} MiB written, "
          f"{worst['dirty'] / 2**20:.1f} MiB dirty); "
          f"mean {total_over / args.trials / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
