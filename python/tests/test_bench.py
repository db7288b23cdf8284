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


def test_bench_loss_refuses_absurd_thread_counts():
    import dmkd
    import pytest

    for threads in (0, 100000):
        with pytest.raises(ValueError, match="bench_loss"):
            dmkd._dmkd.bench_loss("tiny", threads, 1, "auto")


def test_import_refuses_a_rayon_num_threads_it_could_not_start():
    # 100000 threads would abort the interpreter at the first call (the
    # thread stacks exhaust the process's memory mappings); an unparsable
    # value would silently use every CPU. Both fail the import instead.
    for value, needle in (("100000", "at most 1024"), ("abc", "not a thread count")):
        env = dict(os.environ, RAYON_NUM_THREADS=value)
        p = subprocess.run([sys.executable, "-c", "import dmkd"], capture_output=True, text=True,
                           timeout=120, env=env)
        assert p.returncode != 0
        assert "RAYON_NUM_THREADS" in p.stderr and needle in p.stderr, p.stderr
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    p = subprocess.run([sys.executable, "-c", "import dmkd"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
