"""The DMKD workload in PyTorch eager: the peer figure the Rust engine's `dmkd bench` compares with.

  reference/.venv/bin/python reference/bench_torch.py [--preset retinanet|two-stage] [--threads 2]
      [--reps 5] [--device cpu|cuda] [--dtype f32|f64] [--json]

Rows (f32 by default, N = 2, C = 256, all masks topk, Cs == C):
  conv3x3.P{k}.forward       F.conv2d(x, w, b, padding=1) on that level (256 -> 256)
  conv3x3.P{k}.input_grad    dX of that conv (torch.nn.grad.conv2d_input -> aten convolution_backward)
  conv3x3.P{k}.weight_grad   dW of that conv (torch.nn.grad.conv2d_weight -> aten convolution_backward)
  dmkd.forward               the whole loss over all levels (dmkd_ref.dmkd_level), under no_grad
  dmkd.forward_backward      the same with autograd recording, then loss.backward() into the
                             students and every parameter
Each is timed `--reps` times after one warm-up; the median is reported. GFLOP/s use the
direct-convolution FLOP model: one conv3x3 pass is 2*9*N*H*W*Cin*Cout FLOP; DMKD forward counts 4
passes per level, forward+backward 12 (every other op is ignored). Peak RSS is this process's
ru_maxrss. The DMKD rows run the reference implementation itself (its top-k masks are built on the
CPU with numpy, a few ms at P3), so this is "PyTorch eager as a user would write it".
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dmkd_ref as ref  # noqa: E402

PRESETS = {
    # Images 1333x800 padded to 800x1344, N = 2, C = 256 (mmdetection's setup).
    "retinanet": dict(levels=[("P3", 100, 168), ("P4", 50, 84), ("P5", 25, 42), ("P6", 13, 21), ("P7", 7, 11)],
                      alpha=2e-5, lam=0.65),
    "two-stage": dict(levels=[("P2", 200, 336), ("P3", 100, 168), ("P4", 50, 84), ("P5", 25, 42)],
                      alpha=5e-7, lam=0.45),
}
N, C = 2, 256


def conv_flop(h, w):
    return 2 * 9 * N * h * w * C * C


def timed(fn, reps, sync):
    fn()  # warm-up (oneDNN primitive creation, allocator)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description="DMKD workload in PyTorch eager")
    ap.add_argument("--preset", choices=list(PRESETS), default="retinanet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["f32", "f64"], default="f32")
    ap.add_argument("--no-convs", action="store_true", help="skip the per-level conv rows")
    ap.add_argument("--json", action="store_true", help="print exactly one JSON object")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other processes on the machine skew every figure: report it
    dev = torch.device(args.device)
    dt = ref.DTYPES[args.dtype]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    preset = PRESETS[args.preset]
    g = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=dt) * std).to(dev)

    rows = []

    # ---- single conv3x3 256 -> 256 per level ----
    if not args.no_convs:
        for name, h, w in preset["levels"]:
            x, gy = randn(N, C, h, w), randn(N, C, h, w)
            wt, b = randn(C, C, 3, 3, std=0.02), randn(C, std=0.02)
            flop = conv_flop(h, w)
            with torch.no_grad():
                for op, fn in (
                    ("forward", lambda: F.conv2d(x, wt, b, padding=1)),
                    ("input_grad", lambda: torch.nn.grad.conv2d_input(x.shape, wt, gy, padding=1)),
                    ("weight_grad", lambda: torch.nn.grad.conv2d_weight(x, wt.shape, gy, padding=1)),
                ):
                    ms = timed(fn, args.reps, sync)
                    rows.append({"name": f"conv3x3.{name}.{op}", "ms_median": ms, "gflops": flop / ms / 1e6})
            del x, gy, wt, b

    # ---- the whole DMKD loss over all levels ----
    cfg = ref.parse_config({"levels": [dict(alpha=preset["alpha"], lambda_s=preset["lam"], lambda_c=preset["lam"])]})[0]
    levels = []
    for _, h, w in preset["levels"]:
        s = randn(N, C, h, w).requires_grad_(True)
        t = randn(N, C, h, w) * 2.0
        p = {}
        for gen in ("gen_s", "gen_c"):
            for i in (0, 2):
                p[f"{gen}.{i}.weight"] = randn(C, C, 3, 3, std=0.02).requires_grad_(True)
                p[f"{gen}.{i}.bias"] = randn(C, std=0.02).requires_grad_(True)
        p["fusion"] = torch.zeros(2, dtype=dt, device=dev, requires_grad=True)
        levels.append((s, t, p))
    leaves = [x for s, _, p in levels for x in [s, *p.values()]]

    def loss():
        return sum(ref.dmkd_level(s, t, p, cfg, l)[0] for l, (s, t, p) in enumerate(levels))

    def forward():
        with torch.no_grad():
            loss()

    def forward_backward():
        for x in leaves:
            x.grad = None
        loss().backward()

    flop = sum(conv_flop(h, w) for _, h, w in preset["levels"])
    for name, fn, passes in (("dmkd.forward", forward, 4), ("dmkd.forward_backward", forward_backward, 12)):
        ms = timed(fn, args.reps, sync)
        rows.append({"name": name, "ms_median": ms, "gflops": passes * flop / ms / 1e6})

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    load_note = f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs"
    if args.json:
        print(load_note, file=sys.stderr)
        print(json.dumps({"preset": args.preset, "threads": args.threads, "conv_algo": "torch",
                          "torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(),
                          "fma_peak_gflops": None, "peak_rss_mib": round(peak_rss_mib, 1),
                          "rows": [{"name": r["name"], "ms_median": round(r["ms_median"], 3),
                                    "gflops": round(r["gflops"], 2)} for r in rows]}))
        return
    print(f"PyTorch {torch.__version__} eager, preset {args.preset}, device {args.device}, {args.dtype}, "
          f"{args.threads} threads, N={N} C={C}, median of {args.reps} after 1 warm-up")
    print(f"{'row':34s} {'ms (median)':>12s} {'GFLOP/s':>9s}")
    for r in rows:
        print(f"{r['name']:34s} {r['ms_median']:12.2f} {r['gflops']:9.1f}")
    print(f"peak RSS {peak_rss_mib:.0f} MiB; {load_note}")


if __name__ == "__main__":
    main()
