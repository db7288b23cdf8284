"""PyTorch counterpart of `dmkd eval`: evaluate the loss and its gradients on files.

  python reference/eval_ref.py --config cfg.json --inputs in.safetensors --params p.safetensors \
      --out out.safetensors [--dtype f32|f64]

Reads the level config (JSON), the inputs (`p{l}.student`, `p{l}.teacher`, and for FGD
`gt_boxes.{n}`, `img_shape`) and the parameters, and writes `loss`, `p{l}.loss`, `grad.<name>`
for every student and parameter, and the debug tensors (attention, masks) in the exchange format,
with the config and dtype in the safetensors metadata. `dmkd verify` can then compare the file with
the Rust engine's output.

--config may also name a .safetensors file whose metadata holds "config" (a golden fixture); with
a fixture, --inputs alone is enough: only inputs and parameters are read from it (names that look
like outputs are skipped).
"""

import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dmkd_ref as ref  # noqa: E402

OUTPUT_SUFFIXES = (".loss", ".attn_s", ".attn_c", ".mask_s", ".mask_c", ".mask_fg", ".mask_bg")


def is_output(name):
    return name == "loss" or name.startswith("grad.") or name.endswith(OUTPUT_SUFFIXES)


def load(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def main(argv=None):
    ap = argparse.ArgumentParser(description="DMKD / MGD / FGD loss and gradients by the PyTorch reference")
    ap.add_argument("--config", required=True, help="config JSON file (or a fixture .safetensors)")
    ap.add_argument("--inputs", required=True, help="inputs .safetensors")
    ap.add_argument("--params", help="parameters .safetensors (may be omitted if --inputs holds them)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--dtype", choices=["f32", "f64"], help="working dtype (default: the teacher's dtype)")
    args = ap.parse_args(argv)

    if args.config.endswith(".safetensors"):
        config = json.loads(load(args.config)[1]["config"])
    else:
        with open(args.config) as f:
            config = json.load(f)

    tensors, _ = load(args.inputs)
    tensors = {k: v for k, v in tensors.items() if not is_output(k)}
    if args.params:
        params, _ = load(args.params)
        params = {k: v for k, v in params.items() if not is_output(k)}
        clash = set(tensors) & set(params)
        if clash:
            sys.exit(f"names in both --inputs and --params: {sorted(clash)}")
        tensors.update(params)

    if args.dtype:
        dtype = args.dtype
    else:
        teacher_dtype = tensors["p0.teacher"].dtype
        dtype = {torch.float32: "f32", torch.float64: "f64"}.get(teacher_dtype)
        if dtype is None:
            sys.exit(f"p0.teacher has dtype {teacher_dtype}; pass --dtype")

    out = ref.evaluate(config, tensors, dtype)
    save_file(out, args.out, metadata={"config": json.dumps(config, separators=(",", ":")), "dtype": dtype})
    print(f"loss = {float(out['loss']):.17g} ({dtype}); wrote {len(out)} tensors to {args.out}")


if __name__ == "__main__":
    main()
