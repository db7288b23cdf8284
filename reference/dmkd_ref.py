"""Independent PyTorch reference of the DMKD, MGD and FGD distillation losses.

Written from the specification docs/spec.md (and, for FGD, from the FGD paper's official
`FeatureLoss`), without looking at the Rust engine. It is an oracle: every step is spelled out
plainly, and PyTorch's autograd supplies every gradient. Speed is not a goal.

Entry point: `evaluate(config, tensors, dtype)` -> dict of every output of the exchange format.

Conventions (shared with the Rust engine through docs/spec.md and its exchange format):
  * features are NCHW; level `l` is the 0-based position in the config's `levels` list;
  * the teacher is detached: no gradient ever reaches it or anything computed from it;
  * masks (and, for DMKD/MGD, the teacher attention) are constants in the backward pass.
"""

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC 2011; Random123's philox4x32 with 10 rounds)
# --------------------------------------------------------------------------------------------
# numpy uint64 arithmetic: a product of two 32-bit words fits exactly in 64 bits, so the high and
# low halves of the 32x32 -> 64 multiply are exact. Every value is kept below 2^32.

_M32 = np.uint64(0xFFFFFFFF)
_PHILOX_M0 = np.uint64(0xD2511F53)  # multiplier applied to counter word 0
_PHILOX_M1 = np.uint64(0xCD9E8D57)  # multiplier applied to counter word 2
_PHILOX_W0 = np.uint64(0x9E3779B9)  # key bump (golden ratio)
_PHILOX_W1 = np.uint64(0xBB67AE85)  # key bump (sqrt(3) - 1)


def philox4x32_10(counter, key):
    """Philox4x32-10 on a (broadcastable) batch of counters.

    counter: 4 array-likes of 32-bit words (c0, c1, c2, c3), broadcast against each other.
    key:     2 ints (k0, k1).
    Returns the 4 output words as numpy uint64 arrays holding 32-bit values.
    """
    c = np.broadcast_arrays(*[np.asarray(x, dtype=np.uint64) for x in counter])
    c0, c1, c2, c3 = [x & _M32 for x in c]
    k0 = np.uint64(int(key[0]) & 0xFFFFFFFF)
    k1 = np.uint64(int(key[1]) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = _PHILOX_M0 * c0  # < 2^64: exact
        p1 = _PHILOX_M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _M32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _M32
        # Random123's round: (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        # The key is bumped between rounds; bumping after the last one is harmless (unused).
        k0 = (k0 + _PHILOX_W0) & _M32
        k1 = (k1 + _PHILOX_W1) & _M32
    return c0, c1, c2, c3


def seed_key(seed):
    """The Philox key of a level's u64 seed: (seed mod 2^32, seed div 2^32)."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} is not a u64")
    return seed & 0xFFFFFFFF, seed >> 32


def uniforms(seed, level, n_samples, count, branch, sample_offset=0):
    """Mask uniforms u[n, i] in float64 for one level and branch (0 spatial, 1 channel).

    Counter (i, n, l, b), key from the seed; u = (x0 + 0.5) / 2^32 lies strictly in (0, 1) and is
    exact in f64 (x0 + 0.5 needs 33 significant bits). The samples are n = sample_offset ..
    sample_offset + n_samples - 1 (their indices in the whole batch, docs/spec.md "Data
    parallel"); every word must hold its values and one past the last.
    """
    if not (0 <= sample_offset and sample_offset + n_samples <= 0xFFFFFFFF
            and count <= 0xFFFFFFFF and level <= 0xFFFFFFFF):
        raise ValueError(f"samples {sample_offset} + {n_samples}, count {count}, level {level}: "
                         "past the 32-bit Philox counter words")
    i = np.arange(count, dtype=np.uint64)[None, :]
    n = np.arange(sample_offset, sample_offset + n_samples, dtype=np.uint64)[:, None]
    x0, _, _, _ = philox4x32_10((i, n, level, branch), seed_key(seed))
    return (x0.astype(np.float64) + 0.5) / 2.0**32


# --------------------------------------------------------------------------------------------
# Attention (FGD form)
# --------------------------------------------------------------------------------------------

def attention(x, tau):
    """Spatial and channel attention of a feature x [N, C, H, W], in x's dtype.

    A_s[n,h,w] = H*W * softmax_{(h,w)}(mean_c |x| / tau),  A_c[n,c] = C * softmax_c(mean_hw |x| / tau).
    torch.softmax subtracts the max, as docs/spec.md asks. Differentiable (FGD's student attention
    needs the gradient); for the teacher, call it on a detached tensor.
    """
    n, c, h, w = x.shape
    value = x.abs()
    g = value.mean(dim=1)  # [N, H, W]
    a_s = (h * w) * torch.softmax((g / tau).reshape(n, h * w), dim=1).reshape(n, h, w)
    q = value.mean(dim=(2, 3))  # [N, C]
    a_c = c * torch.softmax(q / tau, dim=1)
    return a_s, a_c


def attention_logits(x, tau):
    """The mask keys' logits of a feature x [N, C, H, W], in float64 whatever x's dtype.

    z_s[n, h*W + w] = mean_c |x| / tau  ([N, H*W]),  z_c[n, c] = mean_hw |x| / tau  ([N, C]).
    The means are accumulated in float64. A = K * softmax(z) orders entries exactly as z does,
    but in f32 A underflows to exactly 0 once a logit lies ~100 below the largest (f64: ~745),
    and ordering by A would then fall back to index order; z cannot underflow.
    """
    n, c, h, w = x.shape
    value = x.detach().to(torch.float64).abs()
    z_s = (value.mean(dim=1) / tau).reshape(n, h * w)
    z_c = value.mean(dim=(2, 3)) / tau
    return z_s, z_c


# --------------------------------------------------------------------------------------------
# Masks (1 keeps, 0 masks). Built in numpy/f64 off the autograd graph: they are constants.
# --------------------------------------------------------------------------------------------

def mask_count(lam, count):
    """k = floor(lambda * count + 0.5), in float64 from the config's value.

    (In f32, 0.65 * 90 + 0.5 falls just under 59; in f64 it is 59.)
    """
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mask ratio {lam} outside [0, 1]")
    return int(math.floor(lam * count + 0.5))


def zero_top_k(keys, k):
    """Mask [rows, K] (float64) with 0 at the k largest keys of each row, 1 elsewhere.

    Ties break by the lower index: a stable lexicographic sort on (-key, index). (torch.topk's
    order among equal values is unspecified, so it is not used.) -inf keys sort last.
    """
    keys = np.asarray(keys, dtype=np.float64)
    rows, width = keys.shape
    mask = np.ones((rows, width), dtype=np.float64)
    index = np.arange(width)
    for r in range(rows):
        # np.lexsort sorts by the LAST key first: primary -key (descending key), then index.
        order = np.lexsort((index, -keys[r]))
        mask[r, order[:k]] = 0.0
    return mask


def gumbel_keys(logits, u):
    """Gumbel-top-k keys z + G, G = -ln(-ln u), in float64.

    They order exactly as ln(A) + G (ln A = z + ln K - logsumexp(z), a per-sample constant
    apart) but cannot underflow to -inf."""
    z = np.asarray(logits, dtype=np.float64)
    return z + (-np.log(-np.log(u)))


def make_mask(mode, logits, lam, seed, level, branch, sample_offset=0):
    """One branch's mask [N, K] in float64 from its attention logits [N, K] (float64).

    topk:    zero the k = floor(lam*K + 0.5) largest logits, i.e. the highest attention entries
             (ties: lower index)
    sampled: zero the k largest Gumbel keys z + G (sampling without replacement ~ A)
    random:  zero where u > 1 - lam (MGD; the count varies)
    """
    z = logits.detach().to(torch.float64).cpu().numpy()
    n, width = z.shape
    if mode == "topk":
        return zero_top_k(z, mask_count(lam, width))
    u = uniforms(seed, level, n, width, branch, sample_offset)
    if mode == "sampled":
        return zero_top_k(gumbel_keys(z, u), mask_count(lam, width))
    if mode == "random":
        return random_mask(u, lam)
    raise ValueError(f"unknown mask_mode {mode!r}")


def random_mask(u, lam):
    """MGD's mask: 0 where u > 1 - lambda (1 - lambda in f64), 1 elsewhere."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mask ratio {lam} outside [0, 1]")
    return np.where(u > 1.0 - lam, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def align(s, p, c_teacher):
    """1x1 conv Cs -> C with bias when the channel counts differ; identity otherwise."""
    if s.shape[1] == c_teacher:
        if "align.weight" in p:
            raise ValueError("align parameters given but Cs == C")
        return s
    return F.conv2d(s, p["align.weight"], p["align.bias"])


def generation_block(x, p, name):
    """conv3x3(C->C, pad 1, bias) -> ReLU -> conv3x3(C->C, pad 1, bias), state_dict names
    `<name>.0.*` and `<name>.2.*` (index 1 is the ReLU, as in nn.Sequential)."""
    y = F.conv2d(x, p[f"{name}.0.weight"], p[f"{name}.0.bias"], padding=1)
    y = F.relu(y)
    return F.conv2d(y, p[f"{name}.2.weight"], p[f"{name}.2.bias"], padding=1)


# --------------------------------------------------------------------------------------------
# Per-level losses. Each takes the student S, the teacher T, the level's parameters `p` (names
# without the `p{l}.` prefix), its config `cfg` and index `level`; returns (loss, debug dict).
# --------------------------------------------------------------------------------------------

def dmkd_level(s, t, p, cfg, level, sample_offset=0):
    t = t.detach()
    n, c, h, w = t.shape
    with torch.no_grad():  # teacher attention and masks are constants
        z_s, z_c = attention_logits(t, cfg["tau"])
        # Debug outputs, computed in f64 from the f64 logits and rounded once (docs/spec.md,
        # step 2): an f32 run reports the f64 maps even where g / tau overflows f32.
        a_s = ((h * w) * torch.softmax(z_s, dim=1)).reshape(n, h, w).to(t.dtype)
        a_c = (c * torch.softmax(z_c, dim=1)).to(t.dtype)
        m_s = make_mask(cfg["mask_mode"], z_s, cfg["lambda_s"], cfg["seed"], level, 0, sample_offset)
        m_c = make_mask(cfg["mask_mode"], z_c, cfg["lambda_c"], cfg["seed"], level, 1, sample_offset)
    # Masks are built on the CPU in f64; move them to the feature's device and dtype (exact: 0/1).
    m_s = torch.from_numpy(m_s).to(device=t.device, dtype=t.dtype).reshape(n, h, w)
    m_c = torch.from_numpy(m_c).to(device=t.device, dtype=t.dtype)

    s_al = align(s, p, c)
    f_s = generation_block(s_al * m_s[:, None, :, :], p, "gen_s")  # mask broadcast over channels
    f_c = generation_block(s_al * m_c[:, :, None, None], p, "gen_c")  # mask broadcast over space
    wts = torch.softmax(p["fusion"], dim=0)  # self-adjustable fusion, w = softmax(theta)
    f = wts[0] * f_s + wts[1] * f_c
    loss = cfg["alpha"] * ((f - t) ** 2).sum() / n
    return loss, {"attn_s": a_s, "attn_c": a_c, "mask_s": m_s, "mask_c": m_c}


def mgd_level(s, t, p, cfg, level, sample_offset=0):
    t = t.detach()
    n, c, h, w = t.shape
    # MGD: random spatial mask with lambda_s and the branch-0 uniforms, whatever mask_mode says.
    m = random_mask(uniforms(cfg["seed"], level, n, h * w, 0, sample_offset), cfg["lambda_s"])
    m = torch.from_numpy(m).to(device=t.device, dtype=t.dtype).reshape(n, h, w)
    s_al = align(s, p, c)
    g = generation_block(s_al * m[:, None, :, :], p, "gen")
    loss = cfg["alpha"] * ((g - t) ** 2).sum() / n
    return loss, {"mask_s": m}


def fgd_masks(boxes, img_shape, n, h, w, dtype, device="cpu"):
    """FGD's foreground / background masks [N, H, W] (constants).

    Boxes (x1, y1, x2, y2) in image pixels are scaled by the image shape (h_img, w_img), not the
    padded shape, to the feature size: wmin = floor(x1 / w_img * W), wmax = ceil(x2 / w_img * W),
    hmin = floor(y1 / h_img * H), hmax = ceil(y2 / h_img * H), computed in the working dtype in
    that order of operations (divide first, then multiply), as the official code does.
    Each box covers rows hmin..hmax and columns wmin..wmax inclusive (clipped to the map; a
    negative start is clipped to 0) with value 1 / ((hmax + 1 - hmin) * (wmax + 1 - wmin)), the
    inclusive UNclipped size; overlaps take the max. The official code indexes [w, h] (a bug for
    non-square maps); here rows are h and columns w.
    Background = (fg == 0), divided by its pixel count when that is nonzero.
    """
    fg = torch.zeros(n, h, w, dtype=dtype, device=device)
    for i in range(n):
        b = boxes[i].detach().to(device=device, dtype=dtype)
        img_h = img_shape[i, 0].to(device=device, dtype=dtype)
        img_w = img_shape[i, 1].to(device=device, dtype=dtype)
        wmin = torch.floor(b[:, 0] / img_w * w).long()
        wmax = torch.ceil(b[:, 2] / img_w * w).long()
        hmin = torch.floor(b[:, 1] / img_h * h).long()
        hmax = torch.ceil(b[:, 3] / img_h * h).long()
        for j in range(b.shape[0]):
            size = int(hmax[j] + 1 - hmin[j]) * int(wmax[j] + 1 - wmin[j])  # exact integer
            area = torch.tensor(1.0, dtype=dtype, device=device) / size
            # Rows hmin..=hmax and columns wmin..=wmax clipped to the map. Both ends are
            # clamped: a negative end would count from the back in a Python slice, and a box
            # left of or above the image would mark the far side of the map.
            r0, r1 = max(int(hmin[j]), 0), min(max(int(hmax[j]) + 1, 0), h)
            c0, c1 = max(int(wmin[j]), 0), min(max(int(wmax[j]) + 1, 0), w)
            if r0 < r1 and c0 < c1:
                fg[i, r0:r1, c0:c1] = torch.maximum(fg[i, r0:r1, c0:c1], area)
    bg = (fg == 0).to(dtype)
    for i in range(n):
        total = bg[i].sum()
        if total != 0:
            bg[i] = bg[i] / total
    return fg, bg


def gc_context(x, weight, bias):
    """GcBlock spatial pooling: 1x1 conv C->1, softmax over H*W, context = sum_p x * softmax."""
    n, c, h, w = x.shape
    logits = F.conv2d(x, weight, bias).reshape(n, 1, h * w)
    sm = torch.softmax(logits, dim=2)  # [N, 1, HW]
    return (x.reshape(n, c, h * w) * sm).sum(dim=2).reshape(n, c, 1, 1)


def gc_channel_add(ctx, p, name):
    """Conv1x1(C->C/2) -> LayerNorm([C/2,1,1], eps 1e-5, affine) -> ReLU -> Conv1x1(C/2->C)."""
    y = F.conv2d(ctx, p[f"{name}.0.weight"], p[f"{name}.0.bias"])
    y = F.layer_norm(y, y.shape[1:], p[f"{name}.1.weight"], p[f"{name}.1.bias"], eps=1e-5)
    y = F.relu(y)
    return F.conv2d(y, p[f"{name}.3.weight"], p[f"{name}.3.bias"])


def fgd_level(s, t, p, cfg, level, boxes, img_shape):
    t = t.detach()
    n, c, h, w = t.shape
    tau = cfg["tau"]
    s_al = align(s, p, c)

    with torch.no_grad():
        a_s_t, a_c_t = attention(t, tau)  # teacher attention: constant
        fg, bg = fgd_masks(boxes, img_shape, n, h, w, t.dtype, t.device)
    a_s_s, a_c_s = attention(s_al, tau)  # student attention: gradient flows through it

    # Attention-weighted feature loss; both sides are weighted by the TEACHER's attention.
    sq_s = torch.sqrt(a_s_t)[:, None, :, :]
    sq_c = torch.sqrt(a_c_t)[:, :, None, None]
    fea_t = t * sq_s * sq_c
    fea_s = s_al * sq_s * sq_c
    sq_fg = torch.sqrt(fg)[:, None, :, :]
    sq_bg = torch.sqrt(bg)[:, None, :, :]
    fg_loss = ((fea_s * sq_fg - fea_t * sq_fg) ** 2).sum() / n
    bg_loss = ((fea_s * sq_bg - fea_t * sq_bg) ** 2).sum() / n

    # Attention transfer: L1 between student and teacher attention maps.
    mask_loss = (a_c_s - a_c_t).abs().sum() / n + (a_s_s - a_s_t).abs().sum() / n

    # Global relation loss through GcBlocks; the teacher side's parameters are trained as well.
    out_s = s_al + gc_channel_add(gc_context(s_al, p["conv_mask_s.weight"], p["conv_mask_s.bias"]), p, "channel_add_conv_s")
    out_t = t + gc_channel_add(gc_context(t, p["conv_mask_t.weight"], p["conv_mask_t.bias"]), p, "channel_add_conv_t")
    rela_loss = ((out_s - out_t) ** 2).sum() / n

    loss = (cfg["alpha_fgd"] * fg_loss + cfg["beta_fgd"] * bg_loss
            + cfg["gamma_fgd"] * mask_loss + cfg["lambda_fgd"] * rela_loss)
    return loss, {"attn_s": a_s_t, "attn_c": a_c_t, "mask_fg": fg, "mask_bg": bg}


# --------------------------------------------------------------------------------------------
# Configuration and parameter names
# --------------------------------------------------------------------------------------------

DEFAULTS = {
    "dmkd": {"tau": 0.5, "lambda_s": 0.65, "lambda_c": 0.65, "alpha": 2e-5, "mask_mode": "topk", "seed": 0},
    "mgd": {"lambda_s": 0.65, "alpha": 2e-5, "seed": 0},
    "fgd": {"tau": 0.5, "alpha_fgd": 0.001, "beta_fgd": 0.0005, "gamma_fgd": 0.0005, "lambda_fgd": 0.000005},
}
# Any level may carry any of these keys (a writer may emit a full config); others are errors.
KNOWN_KEYS = {"method"} | set().union(*[set(d) for d in DEFAULTS.values()])


def parse_config(config):
    """config: JSON text or dict {"levels": [...]} -> list of complete per-level dicts."""
    if isinstance(config, (str, bytes)):
        config = json.loads(config)
    levels = []
    for i, raw in enumerate(config["levels"]):
        unknown = set(raw) - KNOWN_KEYS
        if unknown:
            raise ValueError(f"level {i}: unknown config keys {sorted(unknown)}")
        method = raw.get("method", "dmkd")
        if method not in DEFAULTS:
            raise ValueError(f"level {i}: unknown method {method!r}")
        # Every key given is checked, whether or not the level's method reads it (as
        # docs/spec.md's ranges say and the Rust engine does): a bad value is an error, not
        # silently ignored.
        for key, v in raw.items():
            if key in ("method", "mask_mode", "seed"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"level {i}: {key} must be a number, got {v!r}")
            v = float(v)
            if key == "tau" and not (math.isfinite(v) and v > 0):
                raise ValueError(f"level {i}: tau must be finite and > 0, got {v!r}")
            if key in ("lambda_s", "lambda_c") and not 0.0 <= v < 1.0:
                raise ValueError(f"level {i}: {key} must lie in [0, 1), got {v!r}")
            if key in ("alpha", "alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd") and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"level {i}: {key} must be finite and >= 0, got {v!r}")
        if raw.get("mask_mode", "topk") not in ("topk", "sampled", "random"):
            raise ValueError(f"level {i}: unknown mask_mode {raw['mask_mode']!r}")
        if "seed" in raw:
            seed = raw["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"level {i}: seed must be an integer, got {seed!r}")
            seed_key(seed)  # range check
        cfg = dict(DEFAULTS[method])
        cfg.update({k: v for k, v in raw.items() if k != "method" and k in DEFAULTS[method]})
        cfg["method"] = method
        levels.append(cfg)
    return levels


def param_names(method, cs, c):
    """Parameter names of one level (without the `p{l}.` prefix), with their shapes."""
    names = {}
    if cs != c:
        names["align.weight"] = (c, cs, 1, 1)
        names["align.bias"] = (c,)
    if method in ("dmkd", "mgd"):
        for g in (("gen_s", "gen_c") if method == "dmkd" else ("gen",)):
            names[f"{g}.0.weight"] = (c, c, 3, 3)
            names[f"{g}.0.bias"] = (c,)
            names[f"{g}.2.weight"] = (c, c, 3, 3)
            names[f"{g}.2.bias"] = (c,)
        if method == "dmkd":
            names["fusion"] = (2,)
    elif method == "fgd":
        half = c // 2  # the official code's teacher_channels // 2
        for side in ("s", "t"):
            names[f"conv_mask_{side}.weight"] = (1, c, 1, 1)
            names[f"conv_mask_{side}.bias"] = (1,)
            names[f"channel_add_conv_{side}.0.weight"] = (half, c, 1, 1)
            names[f"channel_add_conv_{side}.0.bias"] = (half,)
            names[f"channel_add_conv_{side}.1.weight"] = (half, 1, 1)
            names[f"channel_add_conv_{side}.1.bias"] = (half, 1, 1)
            names[f"channel_add_conv_{side}.3.weight"] = (c, half, 1, 1)
            names[f"channel_add_conv_{side}.3.bias"] = (c,)
    return names


DTYPES = {"f32": torch.float32, "f64": torch.float64}


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def evaluate(config, tensors, dtype="f64", sample_offset=0):
    """Loss, per-level losses, gradients and debug tensors, named as in the exchange format.

    config:  JSON text or dict {"levels": [...]}
    tensors: name -> tensor: inputs (`p{l}.student`, `p{l}.teacher`, FGD's `gt_boxes.{n}` and
             `img_shape`) and parameters (`p{l}.<param>`). Extra or missing names are errors.
    dtype:   "f32" / "f64" (or a torch dtype): the working dtype; every tensor is cast to it.
    sample_offset: the batch's first sample in a larger batch (a data-parallel shard): the
             sampled and random masks draw the uniforms of samples offset .. offset + N - 1.
    """
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    levels = parse_config(config)
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"sample_offset must be an integer >= 0, got {sample_offset!r}")
    x = {k: v.detach().to(dt).clone() for k, v in tensors.items()}
    used = set()

    # Leaves that receive gradients: every student and every parameter.
    grad_leaves = []
    level_inputs = []
    for l, cfg in enumerate(levels):
        s, t = x[f"p{l}.student"], x[f"p{l}.teacher"]
        used |= {f"p{l}.student", f"p{l}.teacher"}
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(f"level {l}: student {tuple(s.shape)} and teacher {tuple(t.shape)} do not match")
        s.requires_grad_(True)
        grad_leaves.append(f"p{l}.student")
        p = {}
        for name, shape in param_names(cfg["method"], s.shape[1], t.shape[1]).items():
            full = f"p{l}.{name}"
            if full not in x:
                raise ValueError(f"missing parameter {full}")
            if tuple(x[full].shape) != shape:
                raise ValueError(f"{full} has shape {tuple(x[full].shape)}, expected {shape}")
            p[name] = x[full].requires_grad_(True)
            grad_leaves.append(full)
            used.add(full)
        level_inputs.append((s, t, p))

    boxes = img_shape = None
    if any(cfg["method"] == "fgd" for cfg in levels):
        n = level_inputs[0][0].shape[0]
        img_shape = x["img_shape"]
        boxes = [x[f"gt_boxes.{i}"] for i in range(n)]
        used |= {"img_shape"} | {f"gt_boxes.{i}" for i in range(n)}
        if tuple(img_shape.shape) != (n, 2):
            raise ValueError(f"img_shape has shape {tuple(img_shape.shape)}, expected ({n}, 2)")
    extra = set(x) - used
    if extra:
        raise ValueError(f"unexpected tensors {sorted(extra)}")

    out = {}
    total = None
    for l, (cfg, (s, t, p)) in enumerate(zip(levels, level_inputs)):
        if cfg["method"] == "dmkd":
            loss, debug = dmkd_level(s, t, p, cfg, l, sample_offset)
        elif cfg["method"] == "mgd":
            loss, debug = mgd_level(s, t, p, cfg, l, sample_offset)
        else:
            loss, debug = fgd_level(s, t, p, cfg, l, boxes, img_shape)
        out[f"p{l}.loss"] = loss.detach().clone()
        for k, v in debug.items():
            out[f"p{l}.{k}"] = v.detach().clone()
        total = loss if total is None else total + loss  # sum over levels, in level order
    total.backward()
    out["loss"] = total.detach().clone()
    for name in grad_leaves:
        g = x[name].grad
        out[f"grad.{name}"] = torch.zeros_like(x[name]) if g is None else g.detach().clone()
    return {k: v.contiguous() for k, v in out.items()}


def loss_function(config, tensors, dtype="f64"):
    """Pure functional form for gradcheck: returns (f, leaves) where f(*leaves) is the total loss
    as a differentiable function of every student and parameter (in evaluate()'s leaf order)."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    levels = parse_config(config)
    x = {k: v.detach().to(dt).clone() for k, v in tensors.items()}
    names = []
    for l, cfg in enumerate(levels):
        s, t = x[f"p{l}.student"], x[f"p{l}.teacher"]
        names.append(f"p{l}.student")
        names += [f"p{l}.{k}" for k in param_names(cfg["method"], s.shape[1], t.shape[1])]

    def f(*leaves):
        y = dict(x)
        y.update(zip(names, leaves))
        total = 0
        for l, cfg in enumerate(levels):
            s, t = y[f"p{l}.student"], y[f"p{l}.teacher"]
            p = {k: y[f"p{l}.{k}"] for k in param_names(cfg["method"], s.shape[1], t.shape[1])}
            if cfg["method"] == "dmkd":
                loss, _ = dmkd_level(s, t, p, cfg, l)
            elif cfg["method"] == "mgd":
                loss, _ = mgd_level(s, t, p, cfg, l)
            else:
                boxes = [y[f"gt_boxes.{i}"] for i in range(s.shape[0])]
                loss, _ = fgd_level(s, t, p, cfg, l, boxes, y["img_shape"])
            total = total + loss
        return total

    return f, [x[k].requires_grad_(True) for k in names], names
