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
FIGURE = re.compile(r"sample_offset (on|off): max relative gradient difference ([0-9.e+-]+) over (\d+) tensors; "
                    r"mean rank loss vs whole-batch loss ([0-9.e+-]+)")


def test_ddp_gradients_equal_one_process_on_the_whole_batch():
    p = subprocess.run([sys.executable, SCRIPT, "--check", "--control"], capture_output=True,
                       text=True, timeout=600)
    print(p.stdout)
    found = {m.group(1): (float(m.group(2)), int(m.group(3)), float(m.group(4)))
             for m in FIGURE.finditer(p.stdout)}
    assert set(found) == {"on", "off"}, p.stdout + p.stderr
    assert p.returncode == 0, p.stdout + p.stderr
    grad_rel, tensors, loss_rel = found["on"]
    assert grad_rel <= 1e-12 and loss_rel <= 1e-12, p.stdout
    assert tensors >= 20  # the student's convs and every DMKDLoss parameter
    # The control: every rank with sample_offset 0 redraws the first half's masks; the
    # comparison sees it.
    assert found["off"][0] > 1e-6, p.stdout
