"""Tests of the PyTorch reference. Run from the repo root:  reference/.venv/bin/python reference/test_ref.py

Checks the pieces an oracle must get right on its own: Philox known answers, the uniform layout,
mask counts k and tie-breaking, the FGD box masks by hand, the forward pass against a naive numpy
implementation with explicit loops, gradients by torch.autograd.gradcheck (f64), and that the
committed fixtures are reproduced.
"""

import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dmkd_ref as ref  # noqa: E402
import eval_ref  # noqa: E402
import make_fixtures  # noqa: E402

F64 = torch.float64


def rand_tensors(levels, n, seed, boxes=None):
    """Random inputs and parameters for tiny configs; levels: list of ((Cs, C, H, W), cfg)."""
    case = dict(dtype="f64", n=n, seed=seed, levels=levels)
    t = make_fixtures.make_tensors(case)
    if boxes is not None:
        t.update(boxes)
    return t


def gradcheck_config(levels, n, seed):
    config = {"levels": [cfg for _, cfg in levels]}
    tensors = rand_tensors(levels, n, seed)
    f, leaves, names = ref.loss_function(config, tensors, "f64")
    return torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-4)


class Philox(unittest.TestCase):
    def test_known_answers(self):
        vectors = [
            ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
            ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
            ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
             (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
        ]
        for ctr, key, want in vectors:
            got = tuple(int(x) for x in ref.philox4x32_10(ctr, key))
            self.assertEqual(got, want, f"counter {ctr} key {key}")

    def test_vectorized_equals_scalar(self):
        ctr = (np.arange(5, dtype=np.uint64), 3, 1, 1)
        batch = ref.philox4x32_10(ctr, (7, 5))
        for i in range(5):
            one = ref.philox4x32_10((i, 3, 1, 1), (7, 5))
            self.assertEqual([int(w[i]) for w in batch], [int(w) for w in one])

    def test_uniform_layout(self):
        seed = 0x0000000500000007
        self.assertEqual(ref.seed_key(seed), (7, 5))  # (seed mod 2^32, seed div 2^32)
        u = ref.uniforms(seed, level=2, n_samples=3, count=11, branch=1)
        self.assertEqual(u.shape, (3, 11))
        for n in range(3):
            for i in range(11):
                x0 = int(ref.philox4x32_10((i, n, 2, 1), (7, 5))[0])  # counter (i, n, l, b)
                self.assertEqual(u[n, i], (x0 + 0.5) / 2.0**32)
        self.assertTrue(((u > 0) & (u < 1)).all())
        # The extreme words stay strictly inside (0, 1).
        self.assertGreater((0 + 0.5) / 2.0**32, 0.0)
        self.assertLess((0xFFFFFFFF + 0.5) / 2.0**32, 1.0)


class Masks(unittest.TestCase):
    def test_mask_count(self):
        self.assertEqual(ref.mask_count(0.65, 90), 59)  # f64; f32 arithmetic would give 58
        self.assertEqual(int(np.floor(np.float32(0.65) * np.float32(90) + np.float32(0.5))), 58)
        self.assertEqual(ref.mask_count(0.0, 35), 0)
        self.assertEqual(ref.mask_count(0.99, 5), 5)
        self.assertEqual(ref.mask_count(0.99, 1), 1)
        self.assertEqual(ref.mask_count(0.15, 5), 1)
        self.assertEqual(ref.mask_count(0.65, 35), 23)
        self.assertEqual(ref.mask_count(0.5, 3), 2)  # 2.0 exactly: floor keeps it
        self.assertEqual(ref.mask_count(0.65, 1), 1)
        self.assertEqual(ref.mask_count(0.45, 1), 0)
        with self.assertRaises(ValueError):
            ref.mask_count(1.5, 3)

    def test_ties_by_lower_index(self):
        keys = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
        m = ref.zero_top_k(keys, 2)
        np.testing.assert_array_equal(m[0], [1, 0, 0, 1, 1])
        np.testing.assert_array_equal(m[1], [0, 0, 1, 1, 1])
        # -inf keys (ln 0) come last, and among themselves by lower index.
        keys = np.array([[-np.inf, 0.5, -np.inf, -np.inf]])
        np.testing.assert_array_equal(ref.zero_top_k(keys, 3), [[0, 0, 0, 1]])

    def test_ties_through_evaluate(self):
        # |T| constant: both attention maps are flat, so every key ties and the first k flat
        # indices (h*W + w, or c) are masked.
        levels = [((3, 3, 2, 3), dict(lambda_s=0.5, lambda_c=0.65))]
        t = rand_tensors(levels, 2, 1)
        t["p0.teacher"] = torch.where(t["p0.teacher"] > 0, 1.0, -1.0).to(F64)
        out = ref.evaluate({"levels": [cfg for _, cfg in levels]}, t, "f64")
        np.testing.assert_array_equal(out["p0.attn_s"].numpy(), np.ones((2, 2, 3)))
        np.testing.assert_array_equal(out["p0.mask_s"].reshape(2, 6).numpy(), [[0, 0, 0, 1, 1, 1]] * 2)
        np.testing.assert_array_equal(out["p0.mask_c"].numpy(), [[0, 0, 1]] * 2)  # k = floor(2.45) = 2

    def test_counts_topk_and_sampled(self):
        for mode in ("topk", "sampled"):
            for lam_s, lam_c in ((0.65, 0.15), (0.0, 0.99), (0.45, 0.99)):
                levels = [((4, 5, 3, 5), dict(lambda_s=lam_s, lambda_c=lam_c, mask_mode=mode, seed=0x0000000500000007)),
                          ((4, 5, 1, 1), dict(lambda_s=lam_s, lambda_c=lam_c, mask_mode=mode, seed=3))]
                out = ref.evaluate({"levels": [c for _, c in levels]}, rand_tensors(levels, 2, 5), "f64")
                for l, ((_, c, h, w), _) in enumerate(levels):
                    zs = (out[f"p{l}.mask_s"] == 0).reshape(2, -1).sum(1).tolist()
                    zc = (out[f"p{l}.mask_c"] == 0).sum(1).tolist()
                    self.assertEqual(zs, [ref.mask_count(lam_s, h * w)] * 2, (mode, lam_s, l))
                    self.assertEqual(zc, [ref.mask_count(lam_c, c)] * 2, (mode, lam_c, l))

    def test_topk_masks_highest_attention(self):
        levels = [((4, 6, 3, 5), dict(lambda_s=0.4, lambda_c=0.5))]
        out = ref.evaluate({"levels": [levels[0][1]]}, rand_tensors(levels, 2, 8), "f64")
        for n in range(2):
            a, m = out["p0.attn_s"][n].flatten(), out["p0.mask_s"][n].flatten()
            self.assertGreater(a[m == 0].min(), a[m == 1].max())
            a, m = out["p0.attn_c"][n], out["p0.mask_c"][n]
            self.assertGreater(a[m == 0].min(), a[m == 1].max())

    def test_sampled_keys(self):
        # Keys are z + G on the f64 logits: a logit 800 below the rest (A = 0 even in f64) still
        # has a finite key, where ln(A) + G would be -inf.
        z = torch.tensor([[-800.0, 1.0, 2.0]], dtype=F64)
        u = np.array([[0.3, 0.5, 0.9]])
        keys = ref.gumbel_keys(z, u)
        want = [-800.0 - math.log(-math.log(0.3)), 1.0 - math.log(-math.log(0.5)), 2.0 - math.log(-math.log(0.9))]
        np.testing.assert_array_equal(keys, [want])
        # The mode uses the level's uniforms of the right branch, on the teacher's logits.
        levels = [((3, 4, 2, 3), dict(lambda_s=0.5, lambda_c=0.5, mask_mode="sampled", seed=99))]
        tensors = rand_tensors(levels, 2, 4)
        out = ref.evaluate({"levels": [levels[0][1]]}, tensors, "f64")
        zs, zc = ref.attention_logits(tensors["p0.teacher"], 0.5)
        ks = ref.gumbel_keys(zs, ref.uniforms(99, 0, 2, 6, 0))
        np.testing.assert_array_equal(ref.zero_top_k(ks, 3), out["p0.mask_s"].reshape(2, 6).numpy())
        kc = ref.gumbel_keys(zc, ref.uniforms(99, 0, 2, 4, 1))
        np.testing.assert_array_equal(ref.zero_top_k(kc, 2), out["p0.mask_c"].numpy())

    def test_masks_do_not_depend_on_the_dtype_for_heavy_tailed_features(self):
        # Per-channel scales exp(N(0,1)) * 5 spread the channel logits over ~160 within an image:
        # A_c underflows to 0 in f32 for many channels, and ordering by A would pick them by index.
        # The f64 logits of the same (f32-representable) values are identical in both runs.
        g = torch.Generator().manual_seed(16)
        n, c, h, w = 2, 256, 4, 5
        scale = torch.exp(torch.randn(n, c, 1, 1, generator=g, dtype=F64)) * 5.0
        t = (torch.randn(n, c, h, w, generator=g, dtype=F64) * scale).float().double()
        z_s, z_c = ref.attention_logits(t, 0.5)
        self.assertGreater((z_c.max(1).values - z_c.min(1).values).min().item(), 100.0)
        a_s32, a_c32 = ref.attention(t.float(), 0.5)
        self.assertGreater(int((a_c32 == 0).sum()), 0)  # the f32 attention does underflow here
        for mode in ("topk", "sampled", "random"):
            masks = []
            for x in (t, t.float()):
                zs, zc = ref.attention_logits(x, 0.5)
                masks.append((ref.make_mask(mode, zs, 0.65, 7, 0, 0), ref.make_mask(mode, zc, 0.65, 7, 0, 1)))
            np.testing.assert_array_equal(masks[0][0], masks[1][0], mode)
            np.testing.assert_array_equal(masks[0][1], masks[1][1], mode)
        # ... and the f32 A-ordering the spec replaced would not: masked channels sorted by
        # index among underflowed ones differ from the f64 choice.
        by_a = ref.zero_top_k(a_c32.double().numpy(), ref.mask_count(0.65, c))
        self.assertTrue((by_a != ref.make_mask("topk", z_c, 0.65, 0, 0, 1)).any())

    def test_f32_attention_is_the_f64_map_rounded_even_for_a_tiny_tau(self):
        # tau = 1e-39: g / tau overflows f32, the f64 logits do not; the reported maps are the
        # f64 maps rounded once (docs/spec.md, step 2), not NaN.
        levels = [((3, 3, 2, 3), dict(method="dmkd", tau=1e-39))]
        t = rand_tensors(levels, 2, 21)
        cfg = {"levels": [cfg for _, cfg in levels]}
        out32 = ref.evaluate(cfg, {k: v.float() for k, v in t.items()}, "f32")
        out64 = ref.evaluate(cfg, t, "f64")
        for k in ("p0.attn_s", "p0.attn_c", "p0.mask_s", "p0.mask_c"):
            self.assertTrue(bool(torch.isfinite(out32[k]).all()), k)
            torch.testing.assert_close(out32[k], out64[k].float(), rtol=0, atol=0, msg=k)

    def test_shards_with_sample_offsets_draw_the_whole_batch_masks(self):
        levels = [((3, 4, 3, 5), dict(mask_mode="sampled", seed=7)),
                  ((3, 4, 3, 5), dict(mask_mode="random", seed=2**63 + 5)),
                  ((3, 4, 3, 5), dict(method="mgd", seed=3))]
        cfg = {"levels": [c for _, c in levels]}
        t = rand_tensors(levels, 4, 23)
        whole = ref.evaluate(cfg, t, "f64")
        for a, b in ((0, 1), (1, 3), (3, 4)):
            part = ref.evaluate(cfg, {k: v[a:b] if k.endswith(("student", "teacher")) else v
                                      for k, v in t.items()}, "f64", sample_offset=a)
            for k in whole:
                if ".mask_" in k:
                    np.testing.assert_array_equal(part[k].numpy(), whole[k][a:b].numpy(), err_msg=k)
        # Without the offset, a shard draws the first samples' masks: different ones.
        part = ref.evaluate(cfg, {k: v[2:4] if k.endswith(("student", "teacher")) else v
                                  for k, v in t.items()}, "f64")
        self.assertFalse(torch.equal(part["p2.mask_s"], whole["p2.mask_s"][2:4]))
        with self.assertRaises(ValueError):
            ref.evaluate(cfg, t, "f64", sample_offset=2**32 - 4)  # samples end past 2^32 - 1

    def test_random_mode_and_mgd(self):
        seed = 0x9E3779B97F4A7C15
        levels = [((3, 4, 5, 7), dict(lambda_s=0.65, lambda_c=0.3, mask_mode="random", seed=seed)),
                  ((3, 4, 5, 7), dict(method="mgd", lambda_s=0.65, mask_mode="topk", seed=seed))]
        out = ref.evaluate({"levels": [c for _, c in levels]}, rand_tensors(levels, 2, 6), "f64")
        u0 = ref.uniforms(seed, 0, 2, 35, 0)
        np.testing.assert_array_equal(out["p0.mask_s"].reshape(2, 35).numpy(), np.where(u0 > 1 - 0.65, 0.0, 1.0))
        u1 = ref.uniforms(seed, 0, 2, 4, 1)
        np.testing.assert_array_equal(out["p0.mask_c"].numpy(), np.where(u1 > 1 - 0.3, 0.0, 1.0))
        # MGD on level 1: branch-0 uniforms of level 1, random whatever mask_mode says.
        u = ref.uniforms(seed, 1, 2, 35, 0)
        np.testing.assert_array_equal(out["p1.mask_s"].reshape(2, 35).numpy(), np.where(u > 1 - 0.65, 0.0, 1.0))
        self.assertNotEqual(out["p0.mask_s"].tolist(), out["p1.mask_s"].tolist())  # level enters the counter


class Attention(unittest.TestCase):
    def test_by_hand(self):
        t = torch.tensor([[[[1.0, -3.0]], [[-2.0, 0.0]]]], dtype=F64)  # N=1, C=2, H=1, W=2
        a_s, a_c = ref.attention(t, 0.5)
        g = np.array([1.5, 1.5])  # mean_c |T|
        np.testing.assert_allclose(a_s.flatten().numpy(), 2 * np.exp(g / 0.5) / np.exp(g / 0.5).sum())
        q = np.array([2.0, 1.0])  # mean_hw |T|
        np.testing.assert_allclose(a_c.flatten().numpy(), 2 * np.exp(q / 0.5) / np.exp(q / 0.5).sum(), rtol=1e-15)
        self.assertAlmostEqual(float(a_s.sum()), 2.0, places=14)  # H*W * softmax sums to H*W


def naive_conv(x, w, b, pad):
    """Cross-correlation with explicit loops: x [N,Ci,H,W], w [Co,Ci,k,k]."""
    n, ci, h, wd = x.shape
    co, _, k, _ = w.shape
    xp = np.zeros((n, ci, h + 2 * pad, wd + 2 * pad))
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    y = np.zeros((n, co, h, wd))
    for a in range(n):
        for o in range(co):
            for i in range(h):
                for j in range(wd):
                    y[a, o, i, j] = b[o] + np.sum(xp[a, :, i:i + k, j:j + k] * w[o])
    return y


class Forward(unittest.TestCase):
    def test_dmkd_against_naive_numpy(self):
        levels = [((3, 4, 3, 4), dict(lambda_s=0.5, lambda_c=0.5, alpha=0.25, tau=0.7))]
        t = rand_tensors(levels, 2, 12)
        out = ref.evaluate({"levels": [levels[0][1]]}, t, "f64")
        x = {k: v.numpy() for k, v in t.items()}
        s, tt = x["p0.student"], x["p0.teacher"]
        # align, written as a sum over input channels
        sa = np.einsum("oi,nihw->nohw", x["p0.align.weight"][:, :, 0, 0], s) + x["p0.align.bias"][None, :, None, None]
        # attention and top-k masks, by sorting
        n, c, h, w = tt.shape
        g = np.abs(tt).mean(1).reshape(n, -1) / 0.7
        a_s = h * w * np.exp(g) / np.exp(g).sum(1, keepdims=True)
        q = np.abs(tt).mean((2, 3)) / 0.7
        a_c = c * np.exp(q) / np.exp(q).sum(1, keepdims=True)
        m_s = np.ones_like(a_s)
        m_c = np.ones_like(a_c)
        for r in range(n):
            m_s[r, np.argsort(-a_s[r], kind="stable")[:6]] = 0
            m_c[r, np.argsort(-a_c[r], kind="stable")[:2]] = 0
        np.testing.assert_allclose(out["p0.attn_s"].reshape(n, -1).numpy(), a_s, rtol=1e-13)
        np.testing.assert_array_equal(out["p0.mask_s"].reshape(n, -1).numpy(), m_s)
        np.testing.assert_array_equal(out["p0.mask_c"].numpy(), m_c)

        def gen(inp, name):
            y = naive_conv(inp, x[f"p0.{name}.0.weight"], x[f"p0.{name}.0.bias"], 1)
            return naive_conv(np.maximum(y, 0), x[f"p0.{name}.2.weight"], x[f"p0.{name}.2.bias"], 1)

        f_s = gen(sa * m_s.reshape(n, 1, h, w), "gen_s")
        f_c = gen(sa * m_c.reshape(n, c, 1, 1), "gen_c")
        th = x["p0.fusion"]
        ws = np.exp(th) / np.exp(th).sum()
        loss = 0.25 * np.sum((ws[0] * f_s + ws[1] * f_c - tt) ** 2) / n
        self.assertAlmostEqual(float(out["loss"]), loss, delta=1e-12 * abs(loss))
        self.assertEqual(float(out["loss"]), float(out["p0.loss"]))

    def test_mgd_against_naive_numpy(self):
        levels = [((4, 4, 3, 3), dict(method="mgd", lambda_s=0.5, alpha=0.5, seed=77))]
        t = rand_tensors(levels, 2, 13)
        out = ref.evaluate({"levels": [levels[0][1]]}, t, "f64")
        x = {k: v.numpy() for k, v in t.items()}
        m = np.where(ref.uniforms(77, 0, 2, 9, 0) > 0.5, 0.0, 1.0).reshape(2, 1, 3, 3)
        y = naive_conv(x["p0.student"] * m, x["p0.gen.0.weight"], x["p0.gen.0.bias"], 1)
        y = naive_conv(np.maximum(y, 0), x["p0.gen.2.weight"], x["p0.gen.2.bias"], 1)
        loss = 0.5 * np.sum((y - x["p0.teacher"]) ** 2) / 2
        self.assertAlmostEqual(float(out["loss"]), loss, delta=1e-12 * abs(loss))

    def test_levels_sum(self):
        levels = [((3, 4, 3, 4), {}), ((4, 4, 2, 2), dict(method="mgd", seed=5)), ((3, 4, 1, 2), {})]
        out = ref.evaluate({"levels": [c for _, c in levels]}, rand_tensors(levels, 1, 14), "f64")
        self.assertEqual(float(out["loss"]), float(out["p0.loss"] + out["p1.loss"] + out["p2.loss"]))

    def test_teacher_gets_no_gradient(self):
        levels = [((3, 4, 3, 4), {})]
        t = rand_tensors(levels, 2, 15)
        cfg = ref.parse_config({"levels": [{}]})[0]
        s = t["p0.student"].requires_grad_(True)
        tt = t["p0.teacher"].requires_grad_(True)
        p = {k[3:]: v.requires_grad_(True) for k, v in t.items() if k.startswith("p0.") and k not in ("p0.student", "p0.teacher")}
        loss, _ = ref.dmkd_level(s, tt, p, cfg, 0)
        g_t, g_s = torch.autograd.grad(loss, [tt, s], allow_unused=True)
        self.assertIsNone(g_t)
        self.assertIsNotNone(g_s)

    def test_config_defaults_and_errors(self):
        cfg = ref.parse_config('{"levels":[{}, {"method":"mgd"}, {"method":"fgd"}]}')
        self.assertEqual(cfg[0], dict(method="dmkd", tau=0.5, lambda_s=0.65, lambda_c=0.65, alpha=2e-5, mask_mode="topk", seed=0))
        self.assertEqual(cfg[1], dict(method="mgd", lambda_s=0.65, alpha=2e-5, seed=0))
        self.assertEqual(cfg[2], dict(method="fgd", tau=0.5, alpha_fgd=0.001, beta_fgd=0.0005, gamma_fgd=0.0005, lambda_fgd=0.000005))
        self.assertEqual(ref.parse_config('{"levels":[{"seed":18446744073709551615}]}')[0]["seed"], 2**64 - 1)
        for bad in ('{"levels":[{"lamda_s":0.5}]}', '{"levels":[{"method":"kd"}]}', '{"levels":[{"seed":-1}]}',
                    '{"levels":[{"seed":18446744073709551616}]}', '{"levels":[{"seed":1.0}]}',
                    '{"levels":[{"tau":0}]}', '{"levels":[{"lambda_c":1.5}]}', '{"levels":[{"mask_mode":"gumbel"}]}',
                    # Ranges as the Rust engine checks them, for keys the method does not read too.
                    '{"levels":[{"lambda_s":1.0}]}', '{"levels":[{"tau":1e999}]}', '{"levels":[{"alpha":-1}]}',
                    '{"levels":[{"method":"mgd","tau":0}]}', '{"levels":[{"method":"mgd","mask_mode":"best"}]}',
                    '{"levels":[{"method":"fgd","seed":-1}]}', '{"levels":[{"alpha_fgd":"0.1"}]}'):
            with self.assertRaises(ValueError, msg=bad):
                ref.parse_config(bad)


class FgdMasks(unittest.TestCase):
    def test_by_hand(self):
        # Non-square map H=3, W=5; image (h, w) = (30, 50): one feature cell is 10x10 pixels.
        boxes = [torch.tensor([[12.0, 3.0, 27.0, 9.0],      # cols 1..3 (floor 1.2, ceil 2.7), rows 0..1 -> 1/6
                               [22.0, 15.0, 50.0, 30.0]],   # cols 2..5 (clipped at 4), rows 1..3 (clipped) -> 1/12
                              dtype=F64)]
        img = torch.tensor([[30.0, 50.0]], dtype=F64)
        fg, bg = ref.fgd_masks(boxes, img, 1, 3, 5, F64)
        a, b = 1 / 6, 1 / 12
        want = [[0, a, a, a, 0],
                [0, a, a, a, b],   # overlap: max(1/6, 1/12)
                [0, 0, b, b, b]]
        np.testing.assert_array_equal(fg[0].numpy(), np.array(want))
        np.testing.assert_array_equal(bg[0].numpy(), np.where(np.array(want) == 0, 1 / 5, 0.0))  # 5 bg pixels

    def test_boxes_off_the_image_mark_nothing_outside_the_map(self):
        # Image (h, w) = (40, 40), map 4 x 8. A box wholly above-left has inclusive ends at -2
        # and -4: a Python slice would count those from the back and mark the far corner.
        img = torch.tensor([[40.0, 40.0]], dtype=F64)
        fg, bg = ref.fgd_masks([torch.tensor([[-30.0, -30.0, -20.0, -20.0]], dtype=F64)], img, 1, 4, 8, F64)
        self.assertTrue(bool((fg == 0).all()))
        self.assertTrue(bool((bg == 1 / 32).all()))
        # Starting left of the image: columns floor(-10 / 40 * 8) = -2 ..= ceil(10 / 40 * 8) = 2,
        # clipped to 0..=2; rows 0..=1; the value uses the unclipped size 2 x 5.
        fg, _ = ref.fgd_masks([torch.tensor([[-10.0, 0.0, 10.0, 5.0]], dtype=F64)], img, 1, 4, 8, F64)
        want = np.zeros((4, 8))
        want[0:2, 0:3] = 1 / 10
        np.testing.assert_array_equal(fg[0].numpy(), want)

    def test_no_background(self):
        fg, bg = ref.fgd_masks([torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=F64)], torch.tensor([[10.0, 10.0]], dtype=F64), 1, 2, 2, F64)
        self.assertTrue(bool((bg == 0).all()))  # sum 0: left unnormalised (all zero)
        self.assertTrue(bool((fg == 1 / 9).all()))  # ceil(2) = 2 -> inclusive size 3x3


def fgd_levels(weights):
    a, b, g, l = weights
    cfg = dict(method="fgd", tau=0.5, alpha_fgd=a, beta_fgd=b, gamma_fgd=g, lambda_fgd=l)
    return [((3, 6, 3, 4), cfg), ((6, 6, 2, 3), dict(cfg, tau=1.0))]


def fgd_boxes():
    return {"img_shape": torch.tensor([[27.0, 35.0], [30.0, 31.0]], dtype=F64),
            "gt_boxes.0": torch.tensor([[2.5, 3.1, 17.2, 15.9], [10.3, 8.8, 35.0, 27.0]], dtype=F64),
            "gt_boxes.1": torch.tensor([[0.0, 0.0, 9.3, 12.2]], dtype=F64)}


class Gradients(unittest.TestCase):
    """torch.autograd.gradcheck (f64 central differences) w.r.t. students and all parameters."""

    def test_dmkd_topk(self):
        levels = [((3, 5, 3, 2), dict(alpha=1.0, lambda_s=0.5, lambda_c=0.15)),
                  ((4, 4, 1, 1), dict(alpha=0.5, lambda_s=0.65, lambda_c=0.65))]
        self.assertTrue(gradcheck_config(levels, 2, 21))

    def test_dmkd_edge_k_n1(self):
        levels = [((3, 3, 2, 2), dict(alpha=1.0, lambda_s=0.0, lambda_c=0.99)),
                  ((3, 3, 1, 2), dict(alpha=1.0, lambda_s=0.99, lambda_c=0.0))]
        self.assertTrue(gradcheck_config(levels, 1, 22))

    def test_dmkd_sampled_random(self):
        levels = [((4, 3, 2, 3), dict(alpha=1.0, mask_mode="sampled", seed=0x0000000500000007)),
                  ((3, 3, 3, 1), dict(alpha=1.0, mask_mode="random", seed=11))]
        self.assertTrue(gradcheck_config(levels, 2, 23))

    def test_mgd(self):
        levels = [((3, 4, 2, 3), dict(method="mgd", alpha=1.0, seed=5)),
                  ((4, 4, 1, 1), dict(method="mgd", alpha=1.0, lambda_s=0.3, seed=6))]
        self.assertTrue(gradcheck_config(levels, 2, 24))

    def test_fgd_each_term(self):
        for weights in ((1, 1, 1, 1), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)):
            levels = fgd_levels(weights)
            config = {"levels": [c for _, c in levels]}
            tensors = rand_tensors(levels, 2, 25, fgd_boxes())
            f, leaves, names = ref.loss_function(config, tensors, "f64")
            self.assertTrue(torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-4), weights)

    def test_fgd_gradient_paths(self):
        # The attention-transfer term alone must send gradient into the student (through the
        # student attention) and the relation term must train the teacher-side GcBlock.
        for weights, name in (((0, 0, 1, 0), "p0.student"), ((0, 0, 0, 1), "p0.conv_mask_t.weight"),
                              ((0, 0, 0, 1), "p0.channel_add_conv_t.3.weight")):
            levels = fgd_levels(weights)
            out = ref.evaluate({"levels": [c for _, c in levels]}, rand_tensors(levels, 2, 26, fgd_boxes()), "f64")
            self.assertGreater(float(out[f"grad.{name}"].abs().max()), 0.0, (weights, name))

    def test_evaluate_grads_equal_loss_function(self):
        levels = [((3, 5, 3, 2), dict(alpha=1.0)), ((4, 4, 2, 2), dict(method="mgd", alpha=1.0, seed=1))]
        config = {"levels": [c for _, c in levels]}
        tensors = rand_tensors(levels, 2, 27)
        out = ref.evaluate(config, tensors, "f64")
        f, leaves, names = ref.loss_function(config, tensors, "f64")
        grads = torch.autograd.grad(f(*leaves), leaves)
        for name, g in zip(names, grads):
            torch.testing.assert_close(out[f"grad.{name}"], g, rtol=0, atol=0)


class Fixtures(unittest.TestCase):
    def test_fixtures_reproduce(self):
        paths = sorted(glob.glob(os.path.join(HERE, "fixtures", "*.safetensors")))
        self.assertEqual({os.path.basename(p)[:-12] for p in paths}, set(make_fixtures.CASES))
        for path in paths:
            with safe_open(path, "pt") as f:
                meta = f.metadata()
                stored = {k: f.get_tensor(k) for k in f.keys()}
            config = json.loads(meta["config"])
            inputs = {k: v for k, v in stored.items() if not eval_ref.is_output(k)}
            out = ref.evaluate(config, inputs, meta["dtype"], int(meta.get("sample_offset", "0")))
            self.assertEqual(set(out) | set(inputs), set(stored), path)
            tol = dict(rtol=1e-5, atol=1e-6) if meta["dtype"] == "f32" else dict(rtol=1e-12, atol=1e-15)
            for k, v in out.items():
                torch.testing.assert_close(v, stored[k], **tol, msg=f"{path}: {k}")

    def test_eval_cli(self):
        fixture = os.path.join(HERE, "fixtures", "dmkd_f64_align_multilevel.safetensors")
        with tempfile.TemporaryDirectory() as d:
            out_path = os.path.join(d, "out.safetensors")
            subprocess.run([sys.executable, os.path.join(HERE, "eval_ref.py"), "--config", fixture,
                            "--inputs", fixture, "--out", out_path], check=True, capture_output=True)
            with safe_open(out_path, "pt") as f, safe_open(fixture, "pt") as g:
                self.assertEqual(f.metadata()["dtype"], "f64")
                for k in f.keys():
                    torch.testing.assert_close(f.get_tensor(k), g.get_tensor(k), rtol=1e-12, atol=1e-15)


if __name__ == "__main__":
    unittest.main(verbosity=2)
