#!/usr/bin/env python3
"""One comparison run: `dmkd bench` per conv algorithm and `bench_torch.py`, back to back
on the same machine, printed as the README's Markdown table.

    reference/.venv/bin/python reference/perf_table.py [--presets retinanet two-stage]
        [--algos direct winograd auto] [--reps 5] [--threads 2] [--dmkd target/release/dmkd]

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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dmkd", default=os.path.join(HERE, "..", "target", "release", "dmkd"))
    ap.add_argument("--json-out", help="also write every raw report to this file")
    args = ap.parse_args()

    raw = []
    lines = [
        "| preset | path | forward ms | fwd+bwd ms | eff. GFLOP/s | speed-up vs PyTorch | peak RSS MiB | FMA peak probe |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for preset in args.presets:
        torch = run_json([sys.executable, os.path.join(HERE, "bench_torch.py"), "--preset", preset,
                          "--threads", str(args.threads), "--reps", str(args.reps), "--no-convs", "--json"])
        raw.append(torch)
        t_both = row(torch, "dmkd.forward_backward")["ms_median"]
        ours = []
        for algo in args.algos:
            rep = run_json([args.dmkd, "bench", "--preset", preset, "--threads", str(args.threads),
                            "--reps", str(args.reps), "--conv-algo", algo, "--only", "loss", "--json"])
            raw.append(rep)
            ours.append((f"dmkd cpu, {algo}", rep))
        for label, rep in [("PyTorch eager", torch)] + ours:
            fwd = row(rep, "dmkd.forward")
            both = row(rep, "dmkd.forward_backward")
            peak = rep.get("fma_peak_gflops")
            lines.append(
                f"| {preset} | {label} | {fwd['ms_median']:.0f} | {both['ms_median']:.0f} | "
                f"{both['gflops']:.0f} | {t_both / both['ms_median']:.2f}x | {rep['peak_rss_mib']:.0f} | "
                f"{'-' if peak is None else f'{peak:.0f} GFLOP/s'} |")
    # Which machine and instruction sets the table is from (dmkd names the CPU
    # with its family and model, since virtual machines often hide the name).
    ours = [r for r in raw if r.get("conv_algo") != "torch"]
    theirs = [r for r in raw if r.get("conv_algo") == "torch"]
    if ours:
        print(f"CPU: {ours[0]['cpu']}; dmkd instruction set: {ours[0]['isa']}"
              + (f"; PyTorch {theirs[0]['torch']}, CPU capability {theirs[0]['isa']}" if theirs else ""))
    print("\n".join(lines))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
