"""Crash-safe bitmaps (issue 7, docs/specs/write-intent.md).

SIGKILL trials: a writer logs every acknowledged write, bitbackd is killed
at a random moment and restarted; the bitmap must load consistent, cover
every acknowledged write, and give an incremental backup that restores to
the image byte for byte (crash_scenarios.trial).  tests/stress/crash_trials.py
runs the same trial hundreds of times.
"""
import pytest

from conftest import require
import crash_scenarios


@pytest.fixture(autouse=True)
def tools():
    for t in ("qemu-img", "nbdinfo"):
        require(t)


@pytest.mark.parametrize("seed", range(12))
def test_sigkill_trial_qbm(tmp_path, seed):
    r = crash_scenarios.trial(tmp_path, "qbm", seed)
    assert r["acked"] > 0, r
    # Over-approximation is bounded by the marked regions: with 1 MiB
    # regions and at most 64 marked between snapshots, plus those written
    # while a snapshot is taken.
    assert r["over"] <= 80 * crash_scenarios.MiB, r


@pytest.mark.parametrize("seed", range(100, 110))
def test_sigkill_trial_qcow2(tmp_path, seed):
    r = crash_scenarios.trial(tmp_path, "qcow2", seed)
    assert r["acked"] > 0, r
    assert r["over"] <= 80 * crash_scenarios.MiB, r
