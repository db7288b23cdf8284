"""Regenerate the golden fixtures in reference/fixtures/<case>.safetensors.

Run from the repo root:  reference/.venv/bin/python reference/make_fixtures.py [--check]

Each file holds the case's inputs, parameters and every output of dmkd_ref.evaluate() under the
exchange-format names; its safetensors metadata holds the level config JSON under "config" and
the working dtype under "dtype" ("f32" / "f64").

Inputs are drawn from a seeded torch.Generator in float64 (f32 cases round them once), so the
files are reproducible. The script refuses to write a case whose data sits near a discontinuity
another implementation could resolve differently after rounding: top-k / Gumbel keys with a tiny
gap at the k-th place, ReLU pre-activations or |.| arguments near 0, FGD box edges near an
integer after scaling. It also checks that every gradient is nonzero (except those that are zero
by construction, listed per case, and FGD's context-conv biases, zero in exact arithmetic and
rounding noise in practice).
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dmkd_ref as ref  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# --------------------------------------------------------------------------------------------
# Cases. Each level: (N, Cs, C, H, W) and its config entry. N is shared by all levels of a case.
# --------------------------------------------------------------------------------------------
S1 = 0x0000000500000007  # non-zero 64-bit seeds with both halves nonzero
S2 = 0x9E3779B97F4A7C15
S3 = 0xDEADBEEF00C0FFEE

CASES = {
    # All defaults: exercises "missing keys take the defaults" (dmkd, tau 0.5, lambdas 0.65,
    # alpha 2e-5, topk, seed 0).
    "dmkd_f64_basic": dict(dtype="f64", n=2, seed=101, levels=[
        ((4, 4, 5, 7), {}),
    ]),
    "dmkd_f64_align_multilevel": dict(dtype="f64", n=2, seed=102, levels=[
        ((3, 5, 7, 5), dict(method="dmkd", tau=0.5, lambda_s=0.65, lambda_c=0.15, alpha=2e-5, mask_mode="topk", seed=0)),
        ((6, 4, 3, 3), dict(method="dmkd", tau=1.0, lambda_s=0.5, lambda_c=0.4, alpha=1e-3, mask_mode="topk", seed=0)),
        ((2, 6, 1, 1), dict(method="dmkd", tau=0.5, lambda_s=0.45, lambda_c=0.65, alpha=0.5, mask_mode="topk", seed=0)),
    ]),
    "dmkd_f64_sampled": dict(dtype="f64", n=2, seed=103, levels=[
        ((4, 4, 5, 7), dict(method="dmkd", tau=0.5, lambda_s=0.65, lambda_c=0.65, alpha=2e-5, mask_mode="sampled", seed=S1)),
        ((3, 6, 3, 2), dict(method="dmkd", tau=0.5, lambda_s=0.5, lambda_c=0.15, alpha=1e-3, mask_mode="sampled", seed=S3)),
    ]),
    "dmkd_f64_random": dict(dtype="f64", n=2, seed=104, levels=[
        ((4, 4, 5, 7), dict(method="dmkd", tau=0.5, lambda_s=0.65, lambda_c=0.65, alpha=2e-5, mask_mode="random", seed=S1)),
        ((3, 6, 3, 2), dict(method="dmkd", tau=0.5, lambda_s=0.3, lambda_c=0.5, alpha=1e-3, mask_mode="random", seed=S2)),
    ]),
    # k = 0 on one branch and k = all on the other; H*W = 1 on level 1.
    "dmkd_f64_edge_k": dict(dtype="f64", n=1, seed=115, levels=[
        ((5, 5, 2, 3), dict(method="dmkd", tau=0.5, lambda_s=0.0, lambda_c=0.99, alpha=1e-2, mask_mode="topk", seed=0)),
        ((4, 4, 1, 1), dict(method="dmkd", tau=0.5, lambda_s=0.99, lambda_c=0.0, alpha=1e-2, mask_mode="topk", seed=0)),
    ], zero_grads={"p0.gen_c.0.weight", "p1.gen_s.0.weight"}),
    # mask_mode "topk" on level 0 is deliberately present: MGD ignores it and uses random masks.
    "mgd_f64": dict(dtype="f64", n=2, seed=106, levels=[
        ((4, 4, 5, 7), dict(method="mgd", lambda_s=0.65, alpha=2e-5, mask_mode="topk", seed=S1)),
        ((6, 4, 3, 3), dict(method="mgd", lambda_s=0.5, alpha=1e-3, seed=S2)),
    ]),
    "mixed_f64": dict(dtype="f64", n=2, seed=107, levels=[
        ((4, 4, 5, 5), dict(method="dmkd", tau=0.5, lambda_s=0.65, lambda_c=0.65, alpha=2e-5, mask_mode="topk", seed=0)),
        ((5, 3, 3, 2), dict(method="mgd", lambda_s=0.65, alpha=1e-3, seed=S3)),
    ]),
    "dmkd_f32_align": dict(dtype="f32", n=2, seed=108, levels=[
        ((3, 6, 7, 5), dict(method="dmkd", tau=0.5, lambda_s=0.65, lambda_c=0.65, alpha=2e-5, mask_mode="topk", seed=0)),
        ((8, 4, 2, 3), dict(method="dmkd", tau=0.5, lambda_s=0.5, lambda_c=0.15, alpha=1e-3, mask_mode="topk", seed=0)),
    ]),
    "mgd_f32": dict(dtype="f32", n=2, seed=109, levels=[
        ((4, 4, 5, 7), dict(method="mgd", lambda_s=0.65, alpha=2e-5, seed=S1)),
        ((6, 4, 3, 3), dict(method="mgd", lambda_s=0.5, alpha=1e-3, seed=S2)),
    ]),
    # Non-square maps (5x7 and 3x4) so that indexing the fg mask [w, h] instead of [h, w] shows.
    "fgd_f64": dict(dtype="f64", n=2, seed=110, levels=[
        ((5, 6, 5, 7), dict(method="fgd", tau=0.5, alpha_fgd=0.001, beta_fgd=0.0005, gamma_fgd=0.0005, lambda_fgd=0.000005)),
        ((8, 8, 3, 4), dict(method="fgd", tau=1.0, alpha_fgd=0.002, beta_fgd=0.001, gamma_fgd=0.01, lambda_fgd=0.0001)),
    ]),
    # A data-parallel shard at the end of the 32-bit sample counter: samples 2^32 - 3 and
    # 2^32 - 2 of a larger batch (sample_offset in the metadata; the counter's end, 2^32 - 1,
    # is the largest allowed). Sampled and random masks and MGD draw those samples' uniforms.
    "dmkd_f64_offset": dict(dtype="f64", n=2, seed=113, sample_offset=2**32 - 3, levels=[
        ((4, 4, 5, 7), dict(method="dmkd", lambda_s=0.65, lambda_c=0.5, mask_mode="sampled", seed=S1)),
        ((3, 5, 3, 4), dict(method="mgd", lambda_s=0.5, alpha=1e-3, seed=S2)),
        ((4, 4, 2, 3), dict(method="dmkd", lambda_s=0.5, lambda_c=0.5, alpha=1e-2, mask_mode="random", seed=S3)),
    ]),
    # f32 FGD (box arithmetic in f32) with boxes off the image: wholly left of and above it
    # (a negative inclusive end), starting left of it, past its bottom-right corner, one of zero
    # width (x1 == x2), and an image whose only box misses the map (no foreground: the
    # background is the whole map), and an image with no boxes at all (gt_boxes [0, 4]). Odd C
    # on level 1 (the GcBlock's C / 2 rounds down to 3; at C = 5 its LayerNorm over 2 values
    # outputs about +-1 whatever its input, the gradients before it are rounding-dominated
    # cancellations, and f32 and f64 disagreed at 5e-5 there).
    "fgd_f32_boxes": dict(dtype="f32", n=3, seed=111, levels=[
        ((4, 6, 5, 7), dict(method="fgd")),
        ((5, 7, 3, 4), dict(method="fgd", tau=1.0, alpha_fgd=0.002, beta_fgd=0.001, gamma_fgd=0.01, lambda_fgd=0.0001)),
    ], img_shape=[[37.0, 50.0], [40.0, 45.0], [32.0, 48.0]], boxes=[
        [[-30.3, -25.2, -20.1, -12.4],  # wholly above-left: no cell
         [-10.3, 5.2, 14.6, 20.9],      # starts left of the image
         [22.3, 10.1, 22.3, 30.3],      # zero width
         [40.3, 30.2, 70.1, 55.3]],     # past the bottom-right corner
        [[60.2, 45.3, 80.1, 61.2]],     # wholly below-right: image 1 has no foreground
        [],                             # image 2: no boxes
    ]),
    # Extreme but legal f32 input: level 0 with tau = 1e-39 (g / tau overflows f32; the masks
    # and the reported attention come from the f64 logits, so the maps are one-hot), level 1
    # with one teacher channel 1e4 times the others (an outlier channel). Sampled masks on level 1.
    "dmkd_f32_extreme": dict(dtype="f32", n=2, seed=112, levels=[
        ((4, 4, 5, 7), dict(method="dmkd", tau=1e-39, lambda_s=0.65, lambda_c=0.5, alpha=2e-5, mask_mode="topk", seed=0)),
        ((5, 6, 3, 4), dict(method="dmkd", tau=0.5, lambda_s=0.5, lambda_c=0.5, alpha=1e-3, mask_mode="sampled", seed=S2)),
    ], outlier=(1, 2, 1e4)),
    # Patchy spatial masks, as real attention gives them: the teacher is 8x brighter over one
    # rectangle per image (an "object") holding k_s positions or one more, so top-k masks it
    # and the masked patch has an inside that no kept input reaches (40-43% of the positions):
    # there the first conv reads only zeros, and an implementation may split the second conv
    # around it (dmkd's does, from a quarter of the positions).
    "dmkd_f64_patches": dict(dtype="f64", n=2, seed=116, levels=[
        ((4, 4, 12, 14), {}),
        ((3, 5, 9, 10), dict(method="dmkd", tau=0.5, lambda_s=0.6, lambda_c=0.4, alpha=1e-3, mask_mode="topk", seed=0)),
    ], patch={0: (0, 11, 1, 11), 1: (0, 6, 1, 10)}),
    "dmkd_f32_patches": dict(dtype="f32", n=2, seed=118, levels=[
        ((4, 4, 12, 14), {}),
    ], patch={0: (0, 11, 1, 11)}),
}

# FGD boxes (x1, y1, x2, y2) in pixels of the image (h, w) = img_shape[n]; the padded image
# behind the 5x7 map would be 40x56 at stride 8, larger than either image.
FGD_IMG_SHAPE = [[37.0, 50.0], [40.0, 45.0]]
FGD_BOXES = [
    [[3.2, 4.1, 20.7, 18.3],     # overlaps the next box
     [15.5, 10.2, 40.1, 30.9],
     [30.3, 25.6, 50.0, 37.0]],  # touches the bottom-right border (x2 = w, y2 = h)
    [[0.0, 0.0, 12.4, 9.7],      # touches the top-left border
     [20.2, 14.8, 33.3, 29.1]],
]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def make_tensors(case):
    g = torch.Generator().manual_seed(case["seed"])
    f64 = torch.float64

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=f64) * std

    def uniform(*shape):
        return torch.rand(*shape, generator=g, dtype=f64)

    n = case["n"]
    t = {}
    for l, ((cs, c, h, w), cfg) in enumerate(case["levels"]):
        method = cfg.get("method", "dmkd")
        t[f"p{l}.student"] = normal(n, cs, h, w)
        # Teacher: N(0,1) with a random per-position and per-channel scale, so that both the
        # spatial and the channel attention are clearly non-flat.
        t[f"p{l}.teacher"] = normal(n, c, h, w) * (0.5 + 1.5 * uniform(n, 1, h, w)) * (0.5 + uniform(n, c, 1, 1))
        if l in case.get("patch", {}):
            r0, r1, c0, c1 = case["patch"][l]
            t[f"p{l}.teacher"][:, :, r0:r1, c0:c1] *= 8.0
        if case.get("outlier", (None,))[0] == l:
            _, ch, factor = case["outlier"]
            t[f"p{l}.teacher"][:, ch] *= factor
        for name, shape in ref.param_names(method, cs, c).items():
            if name == "fusion":
                t[f"p{l}.{name}"] = torch.tensor([0.3, -0.2], dtype=f64)
            elif name.endswith(".1.weight"):  # LayerNorm gain: around 1
                t[f"p{l}.{name}"] = 1.0 + normal(*shape, std=0.3)
            elif name.endswith("weight"):
                t[f"p{l}.{name}"] = normal(*shape, std=0.3)
            else:  # biases
                t[f"p{l}.{name}"] = normal(*shape, std=0.2)
    if any(cfg.get("method") == "fgd" for _, cfg in case["levels"]):
        t["img_shape"] = torch.tensor(case.get("img_shape", FGD_IMG_SHAPE), dtype=f64)
        boxes = case.get("boxes", FGD_BOXES)
        for i in range(n):
            t[f"gt_boxes.{i}"] = torch.tensor(boxes[i], dtype=f64).reshape(-1, 4)
    dt = ref.DTYPES[case["dtype"]]
    return {k: v.to(dt).contiguous() for k, v in t.items()}


# --------------------------------------------------------------------------------------------
# Robustness checks: keep the data away from points where rounding could change a decision
# --------------------------------------------------------------------------------------------

def check_k_gap(keys, k, what, min_gap):
    """The k-th and (k+1)-th largest keys of each row differ by more than min_gap."""
    keys = np.asarray(keys, dtype=np.float64)
    if k == 0 or k == keys.shape[1]:
        return
    for r, row in enumerate(keys):
        srt = np.sort(row)[::-1]
        gap = srt[k - 1] - srt[k]
        scale = max(1.0, abs(srt[k - 1]))
        assert gap > min_gap * scale, f"{what} row {r}: gap {gap:.3g} at k={k} too small"


def check_case(name, case, tensors, out):
    dt = ref.DTYPES[case["dtype"]]
    tol = 1e-4 if case["dtype"] == "f32" else 1e-8
    levels = ref.parse_config({"levels": [cfg for _, cfg in case["levels"]]})
    n = case["n"]
    for l, cfg in enumerate(levels):
        s, t = tensors[f"p{l}.student"], tensors[f"p{l}.teacher"]
        _, c, h, w = t.shape
        p = {k[len(f"p{l}."):]: v for k, v in tensors.items() if k.startswith(f"p{l}.")}
        if cfg["method"] == "dmkd":
            z_s, z_c = ref.attention_logits(t, cfg["tau"])
            if cfg["mask_mode"] == "topk":
                check_k_gap(z_s, ref.mask_count(cfg["lambda_s"], h * w), f"{name} p{l} z_s", tol)
                check_k_gap(z_c, ref.mask_count(cfg["lambda_c"], c), f"{name} p{l} z_c", tol)
            elif cfg["mask_mode"] == "sampled":
                off = case.get("sample_offset", 0)
                ks = ref.gumbel_keys(z_s, ref.uniforms(cfg["seed"], l, n, h * w, 0, off))
                kc = ref.gumbel_keys(z_c, ref.uniforms(cfg["seed"], l, n, c, 1, off))
                check_k_gap(ks, ref.mask_count(cfg["lambda_s"], h * w), f"{name} p{l} Gumbel s", tol)
                check_k_gap(kc, ref.mask_count(cfg["lambda_c"], c), f"{name} p{l} Gumbel c", tol)
        if cfg["method"] in ("dmkd", "mgd"):
            # ReLU inputs of every generation block away from 0.
            s_al = ref.align(s, p, c)
            blocks = [("gen_s", out[f"p{l}.mask_s"][:, None]), ("gen_c", out[f"p{l}.mask_c"][:, :, None, None])] \
                if cfg["method"] == "dmkd" else [("gen", out[f"p{l}.mask_s"][:, None])]
            for g, m in blocks:
                pre = torch.nn.functional.conv2d(s_al * m, p[f"{g}.0.weight"], p[f"{g}.0.bias"], padding=1)
                assert pre.abs().min() > tol, f"{name} p{l} {g}: ReLU input {pre.abs().min():.3g} near 0"
        if cfg["method"] == "fgd":
            s_al = ref.align(s, p, c)
            assert s_al.abs().min() > tol, f"{name} p{l}: |S| near 0"
            a_s_s, a_c_s = ref.attention(s_al, cfg["tau"])
            assert (a_s_s - out[f"p{l}.attn_s"]).abs().min() > tol, f"{name} p{l}: |S_s - S_t| near 0"
            assert (a_c_s - out[f"p{l}.attn_c"]).abs().min() > tol, f"{name} p{l}: |C_s - C_t| near 0"
            for i in range(n):
                img_h, img_w = tensors["img_shape"][i]
                b = tensors[f"gt_boxes.{i}"]
                for col, size, dim in ((0, img_w, w), (2, img_w, w), (1, img_h, h), (3, img_h, h)):
                    v = (b[:, col] / size * dim).double()
                    frac = (v - v.round()).abs()
                    assert bool(((frac == 0) | (frac > 1e-6)).all()), f"{name} p{l}: box edge near an integer"
            # GcBlock ReLU inputs (after the LayerNorm) away from 0.
            for side, x in (("s", s_al), ("t", t)):
                ctx = ref.gc_context(x, p[f"conv_mask_{side}.weight"], p[f"conv_mask_{side}.bias"])
                y = torch.nn.functional.conv2d(ctx, p[f"channel_add_conv_{side}.0.weight"], p[f"channel_add_conv_{side}.0.bias"])
                y = torch.nn.functional.layer_norm(y, y.shape[1:], p[f"channel_add_conv_{side}.1.weight"],
                                                   p[f"channel_add_conv_{side}.1.bias"], eps=1e-5)
                assert y.abs().min() > tol, f"{name} p{l}: GcBlock ReLU input near 0"
    for k, v in out.items():
        assert v.dtype == dt, f"{name} {k}: dtype {v.dtype}"
        assert torch.isfinite(v).all(), f"{name} {k}: not finite"
        if k.startswith("grad."):
            param = k[len("grad."):]
            if any(cfg.get("method") == "fgd" and param in (f"p{l}.conv_mask_s.bias", f"p{l}.conv_mask_t.bias")
                   for l, (_, cfg) in enumerate(case["levels"])):
                # Zero in exact arithmetic (softmax ignores a shift): rounding decides whether
                # it comes out as 0 or as noise, which depends on the host's kernels.
                scale = max(float(u.abs().max()) for j, u in out.items() if j.startswith(f"grad.{param.split('.')[0]}."))
                assert float(v.abs().max()) <= 1e-4 * scale, f"{name} {k}: {float(v.abs().max()):.3g} not noise"
                continue
            zero = param in case.get("zero_grads", set())
            assert bool((v == 0).all()) == zero, f"{name} {k}: zero={bool((v == 0).all())}, expected {zero}"


# --------------------------------------------------------------------------------------------

ST_DTYPES = {torch.float32: "F32", torch.float64: "F64"}


def write_safetensors(path, tensors, metadata):
    """Write a .safetensors file byte-for-byte reproducibly.

    safetensors.torch.save_file serializes the metadata map in a random (hash) order, so the same
    content gives different bytes from run to run and every regeneration would show as a git
    change. Here: header keys sorted, tensors stored in name order, the header padded with spaces
    to a multiple of 8 (as the format allows). The result is read back with the official library.
    """
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        v = tensors[name].detach().contiguous()
        data = v.numpy().astype(v.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)
    with safe_open(path, "pt") as f:  # round trip through the official reader
        assert f.metadata() == metadata
        for name in tensors:
            assert torch.equal(f.get_tensor(name), tensors[name]), name


def build(name, case):
    config = {"levels": [cfg for _, cfg in case["levels"]]}
    tensors = make_tensors(case)
    out = ref.evaluate(config, tensors, case["dtype"], case.get("sample_offset", 0))
    with torch.no_grad():
        check_case(name, case, tensors, out)
    everything = dict(tensors)
    clash = set(tensors) & set(out)
    assert not clash, clash
    everything.update(out)
    meta = {
        "config": json.dumps(config, separators=(",", ":")),
        "dtype": case["dtype"],
        "generator": "reference/make_fixtures.py (PyTorch reference dmkd_ref.py)",
    }
    if "sample_offset" in case:
        meta["sample_offset"] = str(case["sample_offset"])
    return {k: v.contiguous() for k, v in everything.items()}, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    args = ap.parse_args()
    # One thread: the outputs are then bit-reproducible from run to run on this machine.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    total = 0
    for name, case in CASES.items():
        if args.only and name not in args.only:
            continue
        tensors, meta = build(name, case)
        path = os.path.join(args.out, f"{name}.safetensors")
        write_safetensors(path, tensors, meta)
        size = os.path.getsize(path)
        total += size
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
        print(f"{name:28s} {size:8d} bytes  loss={float(tensors['loss']):.10g}  sha256={digest}")
    print(f"{'total':28s} {total:8d} bytes")


if __name__ == "__main__":
    main()
