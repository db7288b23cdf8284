#!/usr/bin/env python3
"""One comparison run: `dmkd bench` per conv algorithm and `bench_torch.py`, back to back
on the same machine, printed as the README's Markdown table.

    reference/.venv/bin/python reference/perf_table.py [--presets retinanet two-stage]
        [--algos direct winograd auto] [--reps 5] [--rounds 1] [--threads 2]
        [--dmkd target/release/dmkd]

`--rounds N` repeats the whole comparison N times back to back: on a shared host the
ratio of one round can move by a third between rounds, so the table then gives medians
over rounds and the range of the per-round speed-ups (each round's PyTorch time over the
same round's dmkd time).

Each `dmkd bench` runs its own FMA peak probe; the table shows every probe, so a slow phase
of the host (clock drift, other load) shows up beside the numbers it affected. Ratios are
taken only between rows of this one run. Needs only the standard library besides what
`bench_torch.py` needs (torch).
"""

import argparse
import json
import os
import subprocess
import sys
from statistics import median

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def row(report, name):
    for r in report["rows"]:
        if r["name"] == name:
            return r
    raise KeyError(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["retinanet", "two-stage"])
    ap.add_argument("--algos", nargs="+", default=["direct", "winograd", "auto"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole comparison this many times, back to back; the table then "
                         "shows medians over rounds and the range of the per-round speed-ups")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dmkd", default=os.path.join(HERE, "..", "target", "release", "dmkd"))
    ap.add_argument("--json-out", help="also write every raw report to this file")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    raw = []
    # reports[(preset, label)] = one report per round, in round order.
    reports = {}
    labels = ["PyTorch eager"] + [f"dmkd cpu, {algo}" for algo in args.algos]
    for _ in range(args.rounds):
        for preset in args.presets:
            torch = run_json([sys.executable, os.path.join(HERE, "bench_torch.py"), "--preset", preset,
                              "--threads", str(args.threads), "--reps", str(args.reps), "--no-convs", "--json"])
            raw.append(torch)
            reports.setdefault((preset, labels[0]), []).append(torch)
            for algo, label in zip(args.algos, labels[1:]):
                rep = run_json([args.dmkd, "bench", "--preset", preset, "--threads", str(args.threads),
                                "--reps", str(args.reps), "--conv-algo", algo, "--only", "loss", "--json"])
                raw.append(rep)
                reports.setdefault((preset, label), []).append(rep)

    lines = [
        "| preset | path | forward ms | fwd+bwd ms | eff. GFLOP/s | speed-up vs PyTorch | peak RSS MiB | FMA peak probe |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for preset in args.presets:
        torch_ms = [row(r, "dmkd.forward_backward")["ms_median"] for r in reports[(preset, labels[0])]]
        for label in labels:
            reps = reports[(preset, label)]
            fwd = median([row(r, "dmkd.forward")["ms_median"] for r in reps])
            both = [row(r, "dmkd.forward_backward")["ms_median"] for r in reps]
            gflops = median([row(r, "dmkd.forward_backward")["gflops"] for r in reps])
            # Speed-ups pair each round's PyTorch time with the same round's own.
            ups = [t / b for t, b in zip(torch_ms, both)]
            up = f"{median(ups):.2f}x" + (f" ({min(ups):.2f}-{max(ups):.2f})" if len(ups) > 1 else "")
            rss = max(r["peak_rss_mib"] for r in reps)
            # Each run probes before its rows and (since the probe after was added) after them.
            peaks = [r[k] for r in reps for k in ("fma_peak_gflops", "fma_peak_gflops_after")
                     if r.get(k) is not None]
            peak = "-" if not peaks else (f"{peaks[0]:.0f} GFLOP/s" if len(peaks) == 1
                                          else f"{min(peaks):.0f}-{max(peaks):.0f} GFLOP/s")
            lines.append(
                f"| {preset} | {label} | {fwd:.0f} | {median(both):.0f} | {gflops:.0f} | {up} | {rss:.0f} | {peak} |")
    # Which machine and instruction sets the table is from (dmkd names the CPU
    # with its family and model, since virtual machines often hide the name).
    ours = [r for r in raw if r.get("conv_algo") != "torch"]
    theirs = [r for r in raw if r.get("conv_algo") == "torch"]
    if ours:
        print(f"CPU: {ours[0]['cpu']}; dmkd instruction set: {ours[0]['isa']}"
              + (f"; PyTorch {theirs[0]['torch']}, CPU capability {theirs[0]['isa']}" if theirs else ""))
    if args.rounds > 1:
        print(f"{args.rounds} rounds: medians over rounds; speed-ups as median (min-max) of each round's "
              f"PyTorch time over its own; peak RSS the largest; probes their range")
    print("\n".join(lines))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
