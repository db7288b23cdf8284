"""python/examples/ddp_distill.py --check: one f64 step of DMKDLoss under DistributedDataParallel
(gloo, 2 processes, each on half the batch, each with its sample_offset) gives the gradients of
one process on the whole batch, to relative 1e-12 per tensor (DDP's averaging and the batch
split only reorder f64 sums: ~1e-15 expected). Without the offsets the random masks differ and
the check fails, so the comparison can fail."""

import os
import re
import subprocess
import sys

from conftest import EXAMPLES

SCRIPT = os.path.join(EXAMPLES, "ddp_distill.py")
FIGURE = re.compile(r"max relative gradient difference ([0-9.e+-]+) over (\d+) tensors; "
                    r"mean rank loss vs whole-batch loss ([0-9.e+-]+)")


def run(*args):
    p = subprocess.run([sys.executable, SCRIPT, "--check", *args], capture_output=True, text=True,
                       timeout=600)
    m = FIGURE.search(p.stdout)
    assert m, p.stdout + p.stderr
    return p.returncode, float(m.group(1)), int(m.group(2)), float(m.group(3)), p.stdout


def test_ddp_gradients_equal_one_process_on_the_whole_batch():
    code, grad_rel, tensors, loss_rel, out = run()
    print(out)
    assert code == 0, out
    assert grad_rel <= 1e-12 and loss_rel <= 1e-12, out
    assert tensors >= 20  # the student's convs and every DMKDLoss parameter


def test_without_sample_offsets_the_check_fails():
    code, grad_rel, _, _, out = run("--no-offset")
    assert code != 0 and grad_rel > 1e-6, out
