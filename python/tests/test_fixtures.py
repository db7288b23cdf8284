"""`dmkd.evaluate` reproduces every committed fixture of the PyTorch reference
(reference/fixtures/) at the Rust tests' tolerances (tests/golden.rs):

- f64: ||a - e|| / ||e|| < 1e-10 and max |a - e| <= 1e-10 max |e|: both sides compute in f64 and
  differ only in summation order (~1e-14 relative), four orders of margin, while a wrong constant,
  index or branch is O(1) off.
- f32: ||a - e|| / ||e|| < 2e-5 and max |a - e| <= 1e-4 max |e| (two f32 implementations summing
  in different orders, ~1e-6 norm-wise through ~4 chained convs).
- masks exactly equal (the fixtures keep every decision away from ties); gradients that are
  exactly zero in exact arithmetic (rounding noise on both sides) are compared against
  max_tol times the largest gradient of their level.
"""

import glob
import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import dmkd

from conftest import FIXTURES

PATHS = sorted(glob.glob(os.path.join(FIXTURES, "*.safetensors")))
TOL = {"f64": (1e-10, 1e-10), "f32": (2e-5, 1e-4)}


def load(path):
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    return load_file(path), meta


def is_output(key):
    return (key == "loss" or key.startswith("grad.") or key.endswith(".loss")
            or ".attn_" in key or ".mask_" in key)


def mismatches(file, meta, ours):
    """The golden.rs comparison; returns the failing keys with their errors."""
    norm_tol, max_tol = TOL[meta["dtype"]]
    failures = []
    compared = 0
    for key, e in file.items():
        if not is_output(key):
            continue
        compared += 1
        if key not in ours:
            failures.append(f"{key} not computed")
            continue
        a, e = np.asarray(ours[key], dtype=np.float64), e.astype(np.float64)
        if a.shape != e.shape:
            failures.append(f"{key}: shape {a.shape} vs {e.shape}")
            continue
        if ".mask_" in key and "mask_fg" not in key and "mask_bg" not in key:
            if not np.array_equal(a, e):
                failures.append(f"{key}: masks differ")
            continue
        d = a - e
        den = np.sqrt((e * e).sum())
        rel = np.sqrt((d * d).sum()) / den if den > 0 else np.sqrt((d * d).sum())
        maxd, maxe = np.abs(d).max(), np.abs(e).max()
        floor = 0.0
        if key.startswith("grad."):
            level = key[len("grad."):].split(".")[0]
            floor = max_tol * max(np.abs(v).max() for k, v in file.items()
                                  if k.startswith(f"grad.{level}."))
        ok = maxd <= floor if maxe < floor else (rel < norm_tol and maxd <= max_tol * maxe)
        if not ok:
            failures.append(f"{key}: norm rel {rel:.3e}, max abs {maxd:.3e} (max |e| {maxe:.3e})")
    assert compared > 10, "too few outputs to compare"
    return failures


def evaluate_fixture(file, meta, **kw):
    inputs = {k: v for k, v in file.items() if not is_output(k)}
    # A data-parallel shard's fixture names its first sample in the whole batch.
    return dmkd.evaluate(inputs, config=meta["config"], dtype=meta["dtype"], init_seed=None,
                         allow_extra=True, sample_offset=int(meta.get("sample_offset", "0")), **kw)


def test_every_fixture_is_there():
    assert len(PATHS) >= 13, PATHS


@pytest.mark.parametrize("path", PATHS, ids=[os.path.basename(p) for p in PATHS])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fixture_is_reproduced(path, backend):
    file, meta = load(path)
    ours = evaluate_fixture(file, meta, backend=backend)
    assert ours["loss"].dtype == (np.float64 if meta["dtype"] == "f64" else np.float32)
    assert mismatches(file, meta, ours) == []


def test_a_perturbed_fixture_is_rejected():
    file, meta = load(os.path.join(FIXTURES, "dmkd_f64_basic.safetensors"))
    ours = evaluate_fixture(file, meta)
    key = "grad.p0.gen_s.0.weight"
    file[key] = file[key] * (1 + 1e-8)
    failures = mismatches(file, meta, ours)
    assert len(failures) == 1 and failures[0].startswith(key), failures


def test_assert_close_accepts_a_fixture_and_names_a_wrong_gradient():
    file, meta = load(os.path.join(FIXTURES, "mixed_f64.safetensors"))
    ours = evaluate_fixture(file, meta)
    expected = {k: v for k, v in file.items() if is_output(k)}
    report = dmkd.assert_close(expected, ours, rtol=1e-9, stol=1e-9, allow_extra=True)
    assert report.ok and {r[0] for r in report.rows} >= set(expected)
    ours["grad.p1.gen.2.bias"] = ours["grad.p1.gen.2.bias"] * 1.001
    with pytest.raises(AssertionError) as err:
        dmkd.assert_close(expected, ours, rtol=1e-9, stol=1e-9, allow_extra=True)
    text = str(err.value)
    assert "FAIL: " in text and "1 failed" in text
    row = [l for l in text.splitlines() if l.startswith("grad.p1.gen.2.bias")][0]
    assert "  FAIL (" in row, row
    assert [r for r in dmkd.verify(expected, ours, 1e-9, 0, 1e-9, allow_extra=True).rows
            if not r[6]] == [r for r in dmkd.verify(expected, ours, 1e-9, 0, 1e-9, allow_extra=True).rows
                             if r[0] == "grad.p1.gen.2.bias"]
    assert json.loads(meta["config"])["levels"][1]["method"] == "mgd"
