"""DMKDLoss (the dmkd engine inside PyTorch) against the PyTorch reference module, in one run.

    python python/bench.py [--preset retinanet|two-stage] [--threads 2] [--reps 5] [--json]

Rows, f32, on the preset's synthetic inputs (those of `dmkd bench`), median of --reps after one
warm-up each:
  engine forward_backward   `dmkd bench`'s dmkd.forward_backward row, timed the same way in this
                            process by the extension (`bench_loss`): the engine alone, no Python
  DMKDLoss forward          under torch.no_grad()
  DMKDLoss forward_backward loss = DMKDLoss(students, teachers); loss.backward() into the students
                            (leaf tensors) and every parameter
  PyTorch reference fwd+bwd reference/dmkd_ref.py's dmkd_level per level, autograd (what
                            reference/bench_torch.py times)
The overhead line is DMKDLoss forward_backward over the engine's, minus 1. Other processes on the
machine skew every figure; the 1-minute load average is printed with the result.
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# `python python/bench.py` puts python/ first on the path: its dmkd/ holds the package's sources
# without the built extension (unless `maturin develop` put it there), which would shadow the
# installed package.
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE and not glob.glob(os.path.join(HERE, "dmkd", "_dmkd*")):
    del sys.path[0]

import torch  # noqa: E402

import dmkd  # noqa: E402
from dmkd.torch import DMKDLoss  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import dmkd_ref as ref  # noqa: E402


def timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description="DMKDLoss vs the PyTorch reference, one run")
    ap.add_argument("--preset", default="retinanet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--conv-algo", default="auto")
    ap.add_argument("--skip-reference", action="store_true", help="no PyTorch reference row")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # The engine's threads are rayon's global pool (RAYON_NUM_THREADS, default: every CPU).
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    rows = {}
    engine = dict(dmkd._dmkd.bench_loss(args.preset, args.threads, args.reps, args.conv_algo))
    rows["engine forward_backward"] = engine["dmkd.forward_backward"]
    rows["engine forward"] = engine["dmkd.forward"]

    inputs = dmkd._dmkd.preset_inputs(args.preset, 0, "f32")
    levels = len([k for k in inputs if k.endswith(".student")])
    students = [torch.from_numpy(inputs[f"p{l}.student"]).requires_grad_(True) for l in range(levels)]
    teachers = [torch.from_numpy(inputs[f"p{l}.teacher"]) for l in range(levels)]
    c, cs = teachers[0].shape[1], students[0].shape[1]
    module = DMKDLoss(args.preset, cs, c, init_seed=0, conv_algo=args.conv_algo, dtype=torch.float32)

    def dmkd_fwd_bwd():
        for s in students:
            s.grad = None
        module.zero_grad(set_to_none=True)
        module(students, teachers).backward()

    def dmkd_fwd():
        with torch.no_grad():
            module(students, teachers)

    rows["DMKDLoss forward"] = timed(dmkd_fwd, args.reps)
    rows["DMKDLoss forward_backward"] = timed(dmkd_fwd_bwd, args.reps)

    if not args.skip_reference:
        cfgs = ref.parse_config(module.config_json)
        params = {}
        for name, p in module.state_dict().items():
            level, rest = name.split(".", 1)
            params.setdefault(int(level[1:]), {})[rest] = p.clone().requires_grad_(True)
        leaves = [x for l in range(levels) for x in [students[l], *params[l].values()]]

        def torch_fwd_bwd():
            for x in leaves:
                x.grad = None
            sum(ref.dmkd_level(students[l], teachers[l], params[l], cfgs[l], l)[0]
                for l in range(levels)).backward()

        rows["PyTorch reference forward_backward"] = timed(torch_fwd_bwd, args.reps)

    overhead = rows["DMKDLoss forward_backward"] / rows["engine forward_backward"] - 1.0
    load = f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs"
    if args.json:
        print(json.dumps({"preset": args.preset, "threads": args.threads, "reps": args.reps,
                          "rows_ms": {k: round(v, 2) for k, v in rows.items()},
                          "overhead": round(overhead, 4), "load": load}))
        return
    print(f"DMKDLoss vs PyTorch {torch.__version__} reference: preset {args.preset}, f32, "
          f"{args.threads} threads, conv algo {args.conv_algo}, median of {args.reps} after 1 warm-up")
    print(f"{'row':40s} {'ms':>10s}")
    for k, v in rows.items():
        print(f"{k:40s} {v:10.1f}")
    print(f"DMKDLoss forward_backward over the engine's: {100 * overhead:+.1f}%")
    if "PyTorch reference forward_backward" in rows:
        speedup = rows["PyTorch reference forward_backward"] / rows["DMKDLoss forward_backward"]
        print(f"DMKDLoss speed-up over the PyTorch reference: {speedup:.2f}x")
    print(load)


if __name__ == "__main__":
    main()
