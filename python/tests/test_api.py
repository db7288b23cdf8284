"""The NumPy API: evaluate, golden, verify, assert_close; bad inputs; copies; the GIL."""

import re
import threading
import time
import tracemalloc

import numpy as np
import pytest

import dmkd

INPUT = re.compile(r"^p\d+\.(student|teacher)$")


def tiny(dtype="f64", seed=0):
    g = dmkd.golden("tiny", dtype=dtype, seed=seed)
    return g, {k: v for k, v in g.items() if INPUT.match(k)}


def test_golden_is_reproduced_by_evaluate_bit_for_bit():
    g, inputs = tiny(seed=3)
    assert set(inputs) == {f"p{l}.{r}" for l in range(3) for r in ("student", "teacher")}
    out = dmkd.evaluate(inputs, config="tiny", init_seed=3, backend="reference")
    outputs = {k for k in g if k not in inputs}
    assert outputs == set(out), outputs ^ set(out)
    for k in outputs:
        assert np.array_equal(out[k], g[k]), k
    assert out["loss"].shape == () and out["loss"].dtype == np.float64
    # The cpu backend agrees to rounding (f64, summation order).
    cpu = dmkd.evaluate(inputs, config="tiny", init_seed=3)
    assert dmkd.verify(g, cpu, rtol=1e-10, stol=1e-10, allow_extra=True).ok
    assert float(cpu["loss"]) == pytest.approx(float(g["loss"]), rel=1e-12)


def test_a_cpu_option_with_the_reference_backend_is_refused():
    # conv_algo chooses among the cpu backend's kernels; the reference backend
    # has one algorithm, so asking it for another is an error, not a no-op.
    _, inputs = tiny(seed=3)
    with pytest.raises(ValueError, match="conv algo `direct` applies to the cpu backend only") as e:
        dmkd.evaluate(inputs, config="tiny", init_seed=3, backend="reference", conv_algo="direct")
    assert e.value.kind == "invalid_argument"
    out = dmkd.evaluate(inputs, config="tiny", init_seed=3, backend="cpu", conv_algo="direct")
    assert np.isfinite(out["loss"])


def test_golden_f32_and_config():
    g = dmkd.golden("tiny", config={"levels": [{"method": "mgd"}, {}, {"mask_mode": "random"}]}, dtype="f32")
    assert g["loss"].dtype == np.float32
    assert "p0.gen.0.weight" in g and "p0.gen_s.0.weight" not in g and "p1.fusion" in g


def test_supplied_parameters_are_used_and_returned_as_given():
    g, inputs = tiny()
    params = {k: g[k] for k in g if k.startswith("p") and not INPUT.match(k)
              and not k.endswith(("loss", "attn_s", "attn_c", "mask_s", "mask_c"))}
    params["p0.fusion"] = np.array([0.3, -0.2])
    out = dmkd.evaluate(inputs, params, config="tiny", init_seed=None)
    assert out["p0.fusion"] is params["p0.fusion"]  # the caller's array, no copy back
    assert out["loss"] != g["loss"]
    assert out["p0.gen_s.0.weight"] is params["p0.gen_s.0.weight"]


def test_outputs_are_views_of_the_engine_buffers():
    _, inputs = tiny()
    out = dmkd.evaluate(inputs, config="tiny")
    grad = out["grad.p0.student"]
    assert type(grad.base).__name__ == "EngineBuffer" and grad.flags.c_contiguous
    assert grad.flags.writeable
    grad[...] = 0.0  # the caller owns it now


def test_matching_arrays_are_read_in_place_others_converted():
    """No copy on the Python side for C-contiguous arrays of the compute dtype (NumPy's
    allocations are traced; the engine's own are not): an 8 MB student costs no 8 MB trace, a
    Fortran-ordered or f32 one is converted once."""
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 16, 128, 256))  # 8 MiB
    t = rng.standard_normal((2, 16, 128, 256))
    cfg = {"levels": [{"alpha": 1.0}]}
    size = s.nbytes

    def traced_peak(student, teacher):
        tracemalloc.start()
        out = dmkd.evaluate({"p0.student": student, "p0.teacher": teacher}, config=cfg)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, out

    peak, base = traced_peak(s, t)
    assert peak < size / 4, peak
    fortran = np.asfortranarray(s)
    peak, out = traced_peak(fortran, t)
    assert peak >= size, peak
    assert float(out["loss"]) == float(base["loss"])
    peak, _ = traced_peak(s[:, :, ::2, ::2], t[:, :, ::2, ::2])  # strided views: converted
    assert peak >= size / 4
    # f32 arrays under dtype="f64": converted, same values.
    out32 = dmkd.evaluate({"p0.student": s.astype(np.float32).astype(np.float64), "p0.teacher": t}, config=cfg)
    out_conv = dmkd.evaluate({"p0.student": s.astype(np.float32), "p0.teacher": t}, config=cfg)
    assert float(out32["loss"]) == float(out_conv["loss"])


def test_lists_ints_and_read_only_arrays_are_accepted():
    rng = np.random.default_rng(1)
    s = rng.integers(-3, 4, size=(1, 3, 4, 4))
    t = rng.standard_normal((1, 3, 4, 4))
    t.setflags(write=False)
    a = dmkd.evaluate({"p0.student": s, "p0.teacher": t})
    b = dmkd.evaluate({"p0.student": s.tolist(), "p0.teacher": t.astype(np.float64)})
    assert float(a["loss"]) == float(b["loss"])
    big_endian = t.astype(">f8")
    c = dmkd.evaluate({"p0.student": s, "p0.teacher": big_endian})
    assert float(c["loss"]) == float(a["loss"])


def ok_inputs():
    rng = np.random.default_rng(2)
    return {"p0.student": rng.standard_normal((2, 3, 4, 5)), "p0.teacher": rng.standard_normal((2, 4, 4, 5))}


@pytest.mark.parametrize("change, kind, text", [
    (lambda d: d["p0.student"].__setitem__((1, 2, 3, 4), np.nan), "non_finite", r"p0.student holds a non-finite value \(NaN\) at index \[1, 2, 3, 4\]"),
    (lambda d: d["p0.teacher"].__setitem__((0, 0, 0, 0), np.inf), "non_finite", "p0.teacher"),
    (lambda d: d.__setitem__("p0.teacher", np.zeros((2, 4, 4, 6))), "shape_mismatch", "differ in N, H or W"),
    (lambda d: d.__setitem__("p0.student", np.zeros((2, 3, 4))), "tensor_shape", "p0.student"),
    (lambda d: d.pop("p0.teacher"), "missing_tensor", "missing tensor `p0.teacher`"),
    (lambda d: d.__setitem__("p0.gen_s.0.wieght", np.zeros(3)), "unexpected_tensor", "p0.gen_s.0.wieght"),
    (lambda d: d.__setitem__("p0.fusion", np.zeros(3)), "tensor_shape", "p0.fusion"),
    (lambda d: d.__setitem__("p0.student", np.zeros((2, 3, 0, 5))), "zero_sized", "zero-sized"),
])
def test_bad_inputs_raise_value_errors_with_the_cli_message(change, kind, text):
    d = ok_inputs()
    change(d)
    with pytest.raises(ValueError, match=text) as err:
        dmkd.evaluate(d)
    assert err.value.kind == kind
    assert "\n" not in str(err.value)


def test_missing_parameter_without_init_and_bad_arguments():
    d = ok_inputs()
    with pytest.raises(ValueError, match="missing tensor `p0.align.weight`") as err:
        dmkd.evaluate(d, init_seed=None)
    assert err.value.kind == "missing_tensor"
    with pytest.raises(ValueError, match="unknown field `lamda_s`") as err:
        dmkd.evaluate(d, config={"levels": [{"lamda_s": 0.5}]})
    assert err.value.kind == "config"
    with pytest.raises(ValueError, match="lambda_s = 1.5 is invalid"):
        dmkd.evaluate(d, config='{"levels":[{"lambda_s":1.5}]}')
    with pytest.raises(ValueError, match="unknown preset `huge`"):
        dmkd.evaluate(d, config="huge")
    with pytest.raises(ValueError, match="unknown dtype `f16`"):
        dmkd.evaluate(d, dtype="f16")
    with pytest.raises(ValueError, match="unknown backend"):
        dmkd.evaluate(d, backend="tpu")
    with pytest.raises(ValueError, match="conv"):
        dmkd.evaluate(d, conv_algo="fft")
    with pytest.raises(ValueError, match="missing tensor `p1.student`"):
        dmkd.evaluate(d, config={"levels": [{}, {}]})
    with pytest.raises(ValueError, match=r"sample_offset -1 is not in \[0, 2\^64\)"):
        dmkd.evaluate(d, sample_offset=-1)
    with pytest.raises(ValueError, match="32-bit Philox"):
        dmkd.evaluate(d, sample_offset=2**32 - 2)
    with pytest.raises(ValueError, match="not a real number type"):
        dmkd.evaluate({"p0.student": d["p0.student"].astype(complex), "p0.teacher": d["p0.teacher"]})
    with pytest.raises(ValueError, match="cannot be read as float64"):
        dmkd.evaluate({"p0.student": [[1, 2], [3]], "p0.teacher": d["p0.teacher"]})
    # A masked array's mask would be dropped by the conversion: refused.
    masked = np.ma.masked_less(d["p0.student"], 0.0)
    with pytest.raises(ValueError, match="`p0.student` is a masked array"):
        dmkd.evaluate({"p0.student": masked, "p0.teacher": d["p0.teacher"]})
    with pytest.raises(ValueError, match="not a real number type"):
        dmkd.evaluate({"p0.student": np.array(["a"]), "p0.teacher": d["p0.teacher"]})
    with pytest.raises(TypeError):
        dmkd.evaluate([1, 2])
    with pytest.raises(ValueError, match="rtol must be finite"):
        dmkd.verify({}, {}, rtol=float("nan"))


def test_the_cuda_backend_agrees_with_the_cpu_or_is_refused_in_one_line():
    # test.sh builds the package with the CUDA feature; `pip install ./python` builds it
    # without. Either way, with no usable device `backend="cuda"` is a RuntimeError of kind
    # `backend_unavailable` that says why in one line; with one, it computes the same loss.
    d = ok_inputs()
    try:
        out = dmkd.evaluate(d, backend="cuda")
    except RuntimeError as err:
        assert err.kind == "backend_unavailable"
        assert re.search(r"CUDA|libcuda|nvrtc|cublas|device", str(err), re.IGNORECASE), str(err)
        assert "\n" not in str(err)
    else:
        cpu = dmkd.evaluate(d)
        # f64 on both: cuBLAS and the CPU kernels sum in different orders, so the loss agrees to
        # rounding (about 1e-15 relative per term), far inside 1e-10.
        assert abs(out["loss"] - cpu["loss"]) <= 1e-10 * abs(cpu["loss"])


def test_a_problem_too_large_for_memory_is_refused_not_allocated():
    d = {"p0.student": np.ones((1, 1, 1, 1)), "p0.teacher": np.ones((1, 100000, 1, 1))}
    with pytest.raises(ValueError, match="over the limit") as err:
        dmkd.evaluate(d)
    assert err.value.kind == "too_large"


def test_a_panic_is_a_runtime_error_not_a_crash():
    with pytest.raises(RuntimeError, match="internal error, please report it: deliberate test panic"):
        dmkd._dmkd._panic_for_test()
    assert float(dmkd.evaluate(ok_inputs())["loss"]) > 0  # the interpreter carries on


def test_verify_report():
    g, inputs = tiny()
    out = dmkd.evaluate(inputs, config="tiny")
    report = dmkd.verify(g, out, allow_extra=False)
    assert report.ok and bool(report)
    names = [r[0] for r in report.rows]
    assert "loss" in names and "grad.p2.fusion" in names and "p0.student" not in names
    name, max_abs, max_rel, norm_rel, worst, ulp, passed = report.rows[names.index("loss")]
    assert passed and max_abs < 1e-15 and isinstance(worst, list) and isinstance(ulp, int)
    text = str(report)
    assert text.splitlines()[0].startswith("verify actual against expected (pass: |a - e| <= 0e0 + 1e-5 |e| + 1e-5 max|e|)")
    assert text.rstrip().endswith(f"PASS: {len(report.rows)} tensors compared, 0 failed")
    bad = dict(out)
    bad["grad.p1.gen_c.0.bias"] = bad["grad.p1.gen_c.0.bias"] * 1.01
    del bad["p2.loss"]
    bad["grad.p0.fusion"] = np.zeros(3)
    report = dmkd.verify(g, bad)
    assert not report.ok
    failed = {r[0] for r in report.rows if not r[6]}
    assert failed == {"grad.p1.gen_c.0.bias", "p2.loss", "grad.p0.fusion"}
    details = dict(report.details)
    assert details["p2.loss"] == "missing" and details["grad.p0.fusion"] == "shape"
    assert "MISSING" in str(report) and "SHAPE (" in str(report)
    with pytest.raises(AssertionError, match="grad.p1.gen_c.0.bias"):
        dmkd.assert_close(g, bad)
    # f32 actual: ULPs are counted in f32.
    f32 = {k: v.astype(np.float32) for k, v in out.items()}
    r32 = dmkd.verify(g, f32, rtol=1e-5)
    assert r32.ok and "f32" in str(r32)
    assert dmkd.assert_close(g, out).ok


def test_another_thread_runs_while_evaluate_works():
    """The GIL is released during the engine's work: a Python thread counting in a loop
    makes progress while one evaluate call (reference backend) runs. The feature map grows
    until one call takes at least 0.2 s, so the test means the same on a fast machine."""
    rng = np.random.default_rng(3)
    stop = threading.Event()
    ticks = [0]

    def count():
        while not stop.is_set():
            ticks[0] += 1

    worker = threading.Thread(target=count)
    worker.start()
    runs = []
    try:
        time.sleep(0.05)
        for side in (32, 64, 128, 256):
            shape = (2, 16, side, side)
            d = {"p0.student": rng.standard_normal(shape), "p0.teacher": rng.standard_normal(shape)}
            t0 = time.perf_counter()
            before = ticks[0]
            dmkd.evaluate(d, backend="reference")
            after = ticks[0]
            elapsed = time.perf_counter() - t0
            runs.append((side, elapsed, after - before))
            if elapsed > 0.2:
                break
    finally:
        stop.set()
        worker.join()
    side, elapsed, during = runs[-1]
    assert elapsed > 0.2, f"even the largest call was too short to tell: {runs}"
    # Holding the GIL for the whole call would leave the counter at a handful of ticks (one
    # switch interval, 5 ms, at most); released, it counts for the whole call (millions of
    # ticks a second in CPython).
    assert during > 10000, runs


def test_concurrent_calls_from_threads_agree():
    g, inputs = tiny()
    results = [None] * 4

    def run(i):
        results[i] = dmkd.evaluate(inputs, config="tiny")["loss"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({float(r) for r in results}) == 1


def test_files_load_and_verify_by_path(tmp_path):
    import os

    from safetensors.numpy import load_file

    from conftest import FIXTURES

    path = os.path.join(FIXTURES, "dmkd_f64_basic.safetensors")
    tensors, meta = dmkd.load(path)
    want = load_file(path)
    assert set(tensors) == set(want) and meta["dtype"] == "f64"
    assert all(tensors[k].shape == want[k].shape and np.array_equal(tensors[k], want[k]) for k in want)
    inputs = {k: v for k, v in tensors.items() if INPUT.match(k) or not k.startswith(("grad.", "loss"))
              and not k.endswith((".loss", "attn_s", "attn_c", "mask_s", "mask_c"))}
    out = dmkd.evaluate(inputs, config=meta["config"], init_seed=None)
    assert dmkd.verify(path, out, rtol=1e-9, stol=1e-9, allow_extra=True).ok
    with pytest.raises(OSError, match="i/o error on .*missing.safetensors") as err:
        dmkd.load(tmp_path / "missing.safetensors")
    assert err.value.kind == "io"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="malformed file") as err:
        dmkd.verify(bad, out)
    assert err.value.kind == "format"


def test_sample_offset_shards_draw_the_whole_batch_masks():
    rng = np.random.default_rng(4)
    cfg = {"levels": [{"mask_mode": "sampled", "seed": 3}, {"mask_mode": "random", "seed": 4}]}
    full = {f"p{l}.{r}": rng.standard_normal((4, 3, 5, 6)) for l in range(2) for r in ("student", "teacher")}
    whole = dmkd.evaluate(full, config=cfg)
    for offset in (0, 2):
        part = dmkd.evaluate({k: v[offset:offset + 2] for k, v in full.items()}, config=cfg,
                             sample_offset=offset)
        for k in ("p0.mask_s", "p0.mask_c", "p1.mask_s", "p1.mask_c"):
            assert np.array_equal(part[k], whole[k][offset:offset + 2]), (offset, k)
    unshifted = dmkd.evaluate({k: v[2:] for k, v in full.items()}, config=cfg)
    assert not np.array_equal(unshifted["p0.mask_s"], whole["p0.mask_s"][2:])


def test_golden_of_a_shard_moves_the_random_masks_not_the_inputs():
    cfg = {"levels": [{"mask_mode": "sampled", "seed": 3}, {"mask_mode": "random", "seed": 4}, {}]}
    base = dmkd.golden("tiny", config=cfg, seed=2)
    shard = dmkd.golden("tiny", config=cfg, seed=2, sample_offset=5)
    inputs = {k: v for k, v in shard.items() if INPUT.match(k)}
    for k, v in inputs.items():
        assert np.array_equal(v, base[k]), k
    # The shard's vectors are what `evaluate` gives those inputs at that offset, bit for bit.
    out = dmkd.evaluate(inputs, config=cfg, init_seed=2, sample_offset=5, backend="reference")
    for k in out:
        assert np.array_equal(out[k], shard[k]), k
    # Only the random masks (and what follows from them) moved; level 2 is deterministic.
    assert not np.array_equal(shard["p0.mask_s"], base["p0.mask_s"])
    assert not np.array_equal(shard["p1.mask_c"], base["p1.mask_c"])
    assert np.array_equal(shard["p2.mask_s"], base["p2.mask_s"])
    assert shard["loss"] != base["loss"]
    with pytest.raises(ValueError, match=r"sample_offset -1 is not in \[0, 2\^64\)"):
        dmkd.golden("tiny", sample_offset=-1)
    with pytest.raises(ValueError, match="32-bit Philox"):
        dmkd.golden("tiny", config=cfg, sample_offset=2**32 - 1)
    with pytest.raises(ValueError, match=r"seed -1 is not in \[0, 2\^64\)"):
        dmkd.golden("tiny", seed=-1)
