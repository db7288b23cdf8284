"""python/bench.py runs end to end (on the tiny preset; timings are not checked here)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_prints_every_row():
    p = subprocess.run([sys.executable, os.path.join(REPO, "python", "bench.py"), "--preset", "tiny",
                        "--reps", "1", "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    rows = report["rows_ms"]
    assert set(rows) == {"engine forward_backward", "engine forward", "DMKDLoss forward",
                         "DMKDLoss forward_backward", "PyTorch reference forward_backward"}
    assert all(v > 0 for v in rows.values())
    assert report["preset"] == "tiny"
