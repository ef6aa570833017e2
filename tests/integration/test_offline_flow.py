"""The offline demo (scripts/demo-offline.sh, run by `make demo`) works end
to end and reports the incremental that matches its writes."""
import json
import os
import subprocess

from conftest import BUILD, REPO


def test_demo_offline_script(tmp_path):
    env = dict(os.environ, BITBACK_BUILD=str(BUILD), DEMO_DIR=str(tmp_path))
    p = subprocess.run([str(REPO / "scripts" / "demo-offline.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    # Writes: 1 MiB at 0 (16 clusters), 10 bytes at 10 MiB + 100 (1),
    # 200 KiB at 33 MiB (4), 64 KiB of zeroes at 60 MiB (1): 22 clusters.
    assert "an incremental would copy 1441792 bytes in 4 extents" in p.stdout
    extents = json.load(open(tmp_path / "b0.json"))
    assert sum(e["length"] for e in extents) == 64 << 20
    # The demo clears the bitmap at the end: a fresh generation, nothing dirty.
    assert "No errors were found on the image." in p.stdout
