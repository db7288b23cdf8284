"""dmkd.torch.DMKDLoss: against the independent PyTorch reference, under PyTorch's gradcheck,
in a short training loop, and its module conventions (state_dict names, initialisation, dtypes,
devices)."""

import json

import numpy as np
import pytest
import torch

import dmkd
from dmkd.torch import DMKDLoss, _EngineLoss

D = torch.float64


def features(levels, n, seed, dtype=D):
    """Random students (requiring grad) and teachers; `levels`: (cs, c, h, w) per level."""
    g = torch.Generator().manual_seed(seed)
    students = [(2 * torch.rand(n, cs, h, w, generator=g, dtype=dtype) - 1).requires_grad_(True)
                for cs, c, h, w in levels]
    teachers = [2 * torch.rand(n, c, h, w, generator=g, dtype=dtype) - 1 for cs, c, h, w in levels]
    return students, teachers


def randomise(module, seed, scale=0.5):
    """Parameters away from their init (the init zeroes the fusion logits), so that every
    gradient is generic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * (2 * torch.rand(p.shape, generator=g, dtype=p.dtype) - 1))


BOXES = ([[1.0, 2.0, 14.0, 11.0], [6.0, 0.0, 20.0, 9.5]], [[0.0, 0.0, 7.0, 7.0]])
IMG_SHAPE = [[24.0, 28.0], [24.0, 26.0]]

CASES = {
    "dmkd_topk_align": ({"levels": [{"alpha": 0.3}, {"alpha": 0.7, "lambda_c": 0.15}]},
                        [(3, 4, 5, 7), (4, 4, 3, 3)]),
    "dmkd_sampled": ({"levels": [{"mask_mode": "sampled", "seed": 0x9E3779B97F4A7C15, "alpha": 0.5}]},
                     [(4, 6, 4, 5)]),
    "dmkd_random": ({"levels": [{"mask_mode": "random", "seed": 7, "lambda_s": 0.3, "alpha": 0.5}]},
                    [(5, 3, 3, 6)]),
    "mgd_and_dmkd": ({"levels": [{"method": "mgd", "seed": 3, "alpha": 0.4}, {"alpha": 0.2}]},
                     [(3, 5, 4, 4), (5, 5, 2, 3)]),
    "fgd": ({"levels": [{"method": "fgd", "alpha_fgd": 0.02, "beta_fgd": 0.01, "gamma_fgd": 0.01,
                         "lambda_fgd": 0.001}]}, [(6, 6, 6, 7)]),
}


def ref_tensors(module, students, teachers, boxes=None):
    t = {f"p{l}.student": s.detach() for l, s in enumerate(students)}
    t.update({f"p{l}.teacher": x for l, x in enumerate(teachers)})
    t.update({k: v.detach() for k, v in module.state_dict().items()})
    if boxes is not None:
        t["img_shape"] = torch.tensor(IMG_SHAPE, dtype=D)
        t.update({f"gt_boxes.{i}": torch.tensor(b, dtype=D) for i, b in enumerate(boxes)})
    return t


def rel(a, e):
    a, e = a.detach().double(), e.detach().double()
    return float((a - e).norm() / e.norm()) if e.norm() > 0 else float((a - e).norm())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_the_pytorch_reference(ref, case, dtype):
    config, levels = CASES[case]
    module = DMKDLoss(config, [l[0] for l in levels], [l[1] for l in levels], dtype=dtype)
    randomise(module, 1)
    students, teachers = features(levels, 2, 5, dtype)
    fgd = case == "fgd"
    kw = dict(gt_boxes=[torch.tensor(b) for b in BOXES], img_shape=torch.tensor(IMG_SHAPE)) if fgd else {}
    loss = module(students, teachers, **kw)
    loss.backward()
    expected = ref.evaluate(json.dumps(config), ref_tensors(module, students, teachers, BOXES if fgd else None),
                            dtype="f64" if dtype == torch.float64 else "f32")
    # golden.rs's tolerances: f64 summation order only (1e-10 leaves four orders of margin);
    # f32: two f32 implementations ~1e-6 apart norm-wise through ~4 chained convs.
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert loss.dtype == dtype and loss.shape == ()
    assert rel(loss, expected["loss"]) < tol
    for l, s in enumerate(students):
        assert abs(module.last_level_losses[l] - float(expected[f"p{l}.loss"])) <= tol * abs(float(expected[f"p{l}.loss"]))
        assert rel(s.grad, expected[f"grad.p{l}.student"]) < tol, l
    names = [n for n, _ in module.named_parameters()]
    assert len(names) == len([k for k in expected if k.startswith("grad.p") and not k.endswith(".student")])
    for name, p in module.named_parameters():
        e = expected[f"grad.{name}"]
        floor = tol * max(float(v.abs().max()) for k, v in expected.items()
                          if k.startswith(f"grad.{name.split('.')[0]}."))
        if float(e.abs().max()) < floor:  # exactly zero in exact arithmetic (FGD's context bias)
            assert float((p.grad.double() - e.double()).abs().max()) <= floor, name
        else:
            assert rel(p.grad, e) < tol, name


def relu_margin(module, students, teachers):
    """The smallest |pre-ReLU activation| of the generation blocks: gradcheck's differences
    must not cross a kink. Masks come from the engine's debug outputs."""
    tensors = {f"p{l}.student": s.detach().numpy() for l, s in enumerate(students)}
    tensors.update({f"p{l}.teacher": t.numpy() for l, t in enumerate(teachers)})
    params = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    out = dmkd.evaluate(tensors, params, module.config_json, init_seed=None)
    margin = np.inf
    for l, cfg in enumerate(module.levels):
        s = students[l].detach()
        p = {k[len(f"p{l}."):]: v for k, v in module.state_dict().items() if k.startswith(f"p{l}.")}
        if "align.weight" in p:
            s = torch.nn.functional.conv2d(s, p["align.weight"], p["align.bias"])
        blocks = {"gen_s": out[f"p{l}.mask_s"][:, None], "gen_c": out[f"p{l}.mask_c"][:, :, None, None]} \
            if cfg["method"] == "dmkd" else {"gen": out[f"p{l}.mask_s"][:, None]}
        for block, mask in blocks.items():
            y = torch.nn.functional.conv2d(s * torch.from_numpy(mask), p[f"{block}.0.weight"],
                                           p[f"{block}.0.bias"], padding=1)
            margin = min(margin, float(y.abs().min()))
    return margin


GRADCHECK = {
    "topk": {"levels": [{"alpha": 1.0, "lambda_s": 0.5, "lambda_c": 0.5}, {"alpha": 1.0}]},
    "sampled": {"levels": [{"mask_mode": "sampled", "seed": 11, "alpha": 1.0, "lambda_s": 0.5, "lambda_c": 0.5}]},
    "random": {"levels": [{"mask_mode": "random", "seed": 5, "alpha": 1.0, "lambda_s": 0.4, "lambda_c": 0.5}]},
    "mgd": {"levels": [{"method": "mgd", "seed": 2, "alpha": 1.0, "lambda_s": 0.5}]},
}


def gradcheck_case(mode):
    config = GRADCHECK[mode]
    shapes = [(3, 4, 3, 4), (2, 2, 2, 2)][: len(config["levels"])]
    for seed in range(20):  # the first data seed whose activations keep away from ReLU kinks
        module = DMKDLoss(config, [s[0] for s in shapes], [s[1] for s in shapes], dtype=D)
        randomise(module, 100 + seed)
        students, teachers = features(shapes, 2, seed)
        # gradcheck moves each input by 1e-6, an activation by ~1e-5 at most.
        if relu_margin(module, students, teachers) > 1e-3:
            return module, students, teachers
    raise AssertionError("no case away from the kinks")


def loss_of(module, teachers):
    names = [n for n, _ in module.named_parameters()]
    levels = len(teachers)

    def f(*xs):
        params = dict(zip(names, xs[levels:]))
        return torch.func.functional_call(module, params, (list(xs[:levels]), teachers))

    return f


@pytest.mark.parametrize("mode", sorted(GRADCHECK))
def test_gradcheck(mode):
    """PyTorch's own oracle on the engine's gradients: f64 central differences, step 1e-6.
    Their error is ~1e-10 (rounding 1e-16 / 1e-6, truncation ~1e-12) on gradients of
    order 1e-2..1 (alpha = 1), so atol 1e-7 and rtol 1e-5 leave a wide margin, while a 0.1%
    error in any derivative exceeds them (next test)."""
    module, students, teachers = gradcheck_case(mode)
    inputs = [s.detach().requires_grad_(True) for s in students]
    inputs += [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    assert torch.autograd.gradcheck(loss_of(module, teachers), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_rejects_a_slightly_wrong_gradient(monkeypatch):
    module, students, teachers = gradcheck_case("topk")
    backward = _EngineLoss.backward

    def off_by_a_thousandth(ctx, g):
        none, first, *rest = backward(ctx, g)
        return (none, first * 1.001, *rest)

    monkeypatch.setattr(_EngineLoss, "backward", staticmethod(off_by_a_thousandth))
    inputs = [s.detach().requires_grad_(True) for s in students]
    inputs += [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    assert not torch.autograd.gradcheck(loss_of(module, teachers), inputs, eps=1e-6, atol=1e-7,
                                        rtol=1e-5, raise_exception=False)


def test_state_dict_names_and_init_are_those_of_dmkd_eval():
    config = {"levels": [{}, {"method": "mgd"}, {"method": "fgd"}]}
    module = DMKDLoss(config, [3, 4, 6], [5, 4, 6], init_seed=7, dtype=D)
    keys = list(module.state_dict())
    for k in ["p0.gen_s.0.weight", "p0.gen_c.2.bias", "p0.fusion", "p0.align.weight", "p0.align.bias",
              "p1.gen.0.weight", "p2.conv_mask_s.weight", "p2.channel_add_conv_t.1.weight"]:
        assert k in keys, k
    assert not any(k.startswith("p1.align") or k.startswith("p1.gen_s") for k in keys)
    students, teachers = features([(3, 5, 3, 4), (4, 4, 2, 2), (6, 6, 4, 4)], 1, 0)
    inputs = {f"p{l}.student": s.detach().numpy() for l, s in enumerate(students)}
    inputs.update({f"p{l}.teacher": t.numpy() for l, t in enumerate(teachers)})
    inputs.update({"img_shape": np.array([[8.0, 8.0]]), "gt_boxes.0": np.array([[0.0, 0.0, 3.0, 3.0]])})
    out = dmkd.evaluate(inputs, config=config, init_seed=7)
    for k, v in module.state_dict().items():
        assert np.array_equal(v.numpy(), out[k]), k
    other = DMKDLoss(config, [3, 4, 6], [5, 4, 6], init_seed=8, dtype=D)
    assert not torch.equal(other.state_dict()["p0.gen_s.0.weight"],
                           module.state_dict()["p0.gen_s.0.weight"])
    # f32 parameters are the f64 initialisation rounded, as `dmkd eval --dtype f32` makes them.
    f32 = DMKDLoss(config, [3, 4, 6], [5, 4, 6], init_seed=7, dtype=torch.float32)
    assert torch.equal(f32.state_dict()["p0.gen_s.0.weight"], module.state_dict()["p0.gen_s.0.weight"].float())
    # A state dict in the exchange format loads back.
    module.load_state_dict({k: torch.zeros_like(v) for k, v in module.state_dict().items()})
    assert float(module.state_dict()["p0.gen_s.0.weight"].abs().sum()) == 0.0


def test_no_grad_runs_the_forward_pass_only():
    config, levels = CASES["dmkd_topk_align"]
    module = DMKDLoss(config, [l[0] for l in levels], [l[1] for l in levels], dtype=D)
    students, teachers = features(levels, 2, 3)
    with_grad = module(students, teachers)
    with torch.no_grad():
        without = module(students, teachers)
    assert without.grad_fn is None and with_grad.grad_fn is not None
    assert abs(without.item() - with_grad.item()) <= 1e-14 * abs(with_grad.item())


def test_backward_scales_by_the_incoming_gradient():
    config, levels = CASES["dmkd_sampled"]
    module = DMKDLoss(config, [l[0] for l in levels], [l[1] for l in levels], dtype=D)
    students, teachers = features(levels, 2, 4)
    module(students, teachers).backward()
    g1 = students[0].grad.clone()
    students[0].grad = None
    (3.0 * module(students, teachers)).backward()
    assert torch.allclose(students[0].grad, 3.0 * g1, rtol=1e-14, atol=0)


def test_a_second_derivative_is_refused_not_silently_zero():
    """The engine's gradients are first order; a gradient penalty (differentiating a gradient of
    this loss again) must raise, not give the stored gradients' derivative, zero."""
    config, levels = CASES["dmkd_sampled"]
    module = DMKDLoss(config, [l[0] for l in levels], [l[1] for l in levels], dtype=D)
    students, teachers = features(levels, 2, 4)
    (g,) = torch.autograd.grad(module(students, teachers), students[0], create_graph=True)
    first = torch.autograd.grad(module(students, teachers), students[0])[0]
    assert torch.equal(g.detach(), first), "create_graph leaves the first derivative as it was"
    # Before: g was a constant to autograd, and this backward ran, leaving out the penalty's part.
    with pytest.raises(RuntimeError, match="first derivatives only"):
        (module(students, teachers) + (g * g).sum()).backward()


def test_training_lowers_the_loss():
    """A tiny student conv net and the loss's own parameters, trained with Adam against a
    frozen teacher net on fixed images: the loss falls."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 8, 3, padding=1)).double().requires_grad_(False)
    student = torch.nn.Conv2d(3, 6, 3, padding=1).double()
    loss_fn = DMKDLoss({"levels": [{"alpha": 1.0}, {"alpha": 1.0, "mask_mode": "sampled", "seed": 1}]},
                       [6, 6], [8, 8], dtype=D)
    images = torch.randn(4, 3, 12, 12, dtype=D)
    opt = torch.optim.Adam(list(student.parameters()) + list(loss_fn.parameters()), lr=1e-2)
    pool = torch.nn.AvgPool2d(2)
    with torch.no_grad():
        t = teacher(images)
        targets = [t, pool(t)]
    losses = []
    for _ in range(40):
        f = student(images)
        loss = loss_fn([f, pool(f)], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(np.isfinite(losses))


def test_cpu_tensors_of_one_float_dtype_only():
    module = DMKDLoss(None, 3, 4, dtype=D)
    s, t = features([(3, 4, 3, 3)], 1, 0)
    with pytest.raises(ValueError, match="computes on the CPU"):
        module([torch.empty(1, 3, 3, 3, device="meta", dtype=D)], t)
    with pytest.raises(ValueError, match="computes on the CPU"):
        module(s, [torch.empty(1, 4, 3, 3, device="meta", dtype=D)])
    with pytest.raises(ValueError, match="dtype"):
        module(s, [x.float() for x in t])
    with pytest.raises(ValueError, match="float32 or float64"):
        module([s[0].detach().half()], t)
    f32 = DMKDLoss(None, 3, 4)  # float32 parameters with float64 features
    with pytest.raises(ValueError, match="share one dtype"):
        f32(s, t)
    with pytest.raises(ValueError, match="1 configured levels"):
        module(s + s, t + t)
    with pytest.raises(ValueError, match="non-finite"):
        module([s[0].detach().clone().fill_(float("nan")).requires_grad_(True)], t)
    fgd = DMKDLoss({"levels": [{"method": "fgd"}]}, 4, 4, dtype=D)
    with pytest.raises(ValueError, match="gt_boxes"):
        fgd([torch.zeros(1, 4, 3, 3, dtype=D)], [torch.ones(1, 4, 3, 3, dtype=D)])
    box, shape = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=D), torch.tensor([[3.0, 3.0]], dtype=D)
    fgd([torch.zeros(1, 4, 3, 3, dtype=D)], [torch.ones(1, 4, 3, 3, dtype=D)], [box], shape)
    with pytest.raises(ValueError, match="`gt_boxes.0` cannot be read"):
        fgd([torch.zeros(1, 4, 3, 3, dtype=D)], [torch.ones(1, 4, 3, 3, dtype=D)],
            [box.bfloat16()], shape)
    with pytest.raises(ValueError, match="`img_shape` has dtype complex128"):
        fgd([torch.zeros(1, 4, 3, 3, dtype=D)], [torch.ones(1, 4, 3, 3, dtype=D)],
            [box], shape.to(torch.complex128))
    with pytest.raises(ValueError, match="2 gt_boxes for 1 images"):
        fgd([torch.zeros(1, 4, 3, 3, dtype=D)], [torch.ones(1, 4, 3, 3, dtype=D)], [box, box], shape)
    # The engine itself refuses the boxes of an image past the batch, not ignores them.
    arrays = {"p0.student": np.zeros((1, 4, 3, 3)), "p0.teacher": np.ones((1, 4, 3, 3)),
              "img_shape": shape.numpy(), "gt_boxes.0": box.numpy(), "gt_boxes.1": box.numpy()}
    with pytest.raises(ValueError, match="unexpected tensor `gt_boxes.1`"):
        dmkd.evaluate(arrays, config={"levels": [{"method": "fgd"}]})
    # A teacher that requires grad would silently get none: refused (and fine under no_grad).
    with pytest.raises(ValueError, match="p0.teacher requires grad"):
        module(s, [t[0].clone().requires_grad_(True)])
    with torch.no_grad():
        module(s, [t[0].clone().requires_grad_(True)])
    # A failed call leaves no stale per-level losses behind.
    module(s, t)
    assert module.last_level_losses is not None
    with pytest.raises(ValueError, match="non-finite"):
        module([s[0].detach().clone().fill_(float("nan"))], t)
    assert module.last_level_losses is None
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"sample_offset .* is not in \[0, 2\^64\)"):
            module(s, t, sample_offset=bad)
        with pytest.raises(ValueError, match=r"sample_offset .* is not in \[0, 2\^64\)"):
            dmkd.evaluate({"p0.student": np.ones((1, 3, 2, 2)), "p0.teacher": np.ones((1, 3, 2, 2))},
                          sample_offset=bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"student_channels: {bad} is not a positive"):
            DMKDLoss(None, bad, 4)


def test_channel_counts_may_be_numpy_integers():
    a = DMKDLoss(None, np.int64(3), np.int32(4), dtype=D)
    b = DMKDLoss(None, [np.int64(3)], (4,), dtype=D)
    assert a.student_channels == b.student_channels == [3]
    assert a.teacher_channels == b.teacher_channels == [4]
    with pytest.raises(TypeError):
        DMKDLoss(None, 3.0, 4)


def test_inputs_changed_in_place_after_the_forward_do_not_break_backward():
    """The gradients are computed in the forward; PyTorch's own modules allow an in-place
    change of a parameter or of the features between forward and backward when the backward
    does not read them, and so does this one (saving the inputs for backward made it raise)."""
    config, levels = CASES["dmkd_sampled"]
    module = DMKDLoss(config, [l[0] for l in levels], [l[1] for l in levels], dtype=D)
    students, teachers = features(levels, 2, 4)
    module(students, teachers).backward()
    want = students[0].grad.clone()
    students[0].grad = None
    conv = torch.nn.Conv2d(levels[0][0], levels[0][0], 1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.eye(levels[0][0], dtype=D)[:, :, None, None])
        conv.bias.zero_()
    f = conv(students[0])
    loss = module([f], teachers)
    f.mul_(2.0)  # after the forward: the loss was computed from the values before
    with torch.no_grad():
        module.get_parameter("p0.fusion").add_(0.1)
    loss.backward()
    assert torch.equal(students[0].grad, want)


def test_non_contiguous_features_give_the_same_result():
    config, levels = CASES["dmkd_topk_align"]
    module = DMKDLoss(config, [l[0] for l in levels], [l[1] for l in levels], dtype=D)
    students, teachers = features(levels, 2, 8)
    a = module(students, teachers)
    # The same values in a channels-last layout (a non-contiguous NCHW view).
    cl = [s.detach().to(memory_format=torch.channels_last).requires_grad_(True) for s in students]
    assert not cl[0].is_contiguous()
    b = module(cl, [t.to(memory_format=torch.channels_last) for t in teachers])
    assert a.item() == b.item()
    a.backward()
    b.backward()
    assert torch.equal(students[0].grad, cl[0].grad.contiguous())


def test_gradients_reach_the_leaves_without_a_copy(monkeypatch):
    """The engine's gradient buffers become the leaves' .grad (NumPy -> torch.from_numpy ->
    AccumulateGrad takes the tensor), unless the graph is retained."""
    config, levels = CASES["dmkd_topk_align"]
    module = DMKDLoss(config, [l[0] for l in levels], [l[1] for l in levels], dtype=D)
    students, teachers = features(levels, 2, 9)
    seen = {}
    native = dmkd._dmkd.evaluate_arrays

    def recording(*args):
        outputs, params, names = native(*args)
        seen.update({k: v.ctypes.data for k, v in outputs.items()})
        return outputs, params, names

    monkeypatch.setattr(dmkd._dmkd, "evaluate_arrays", recording)
    module(students, teachers).backward()
    assert students[0].grad.data_ptr() == seen["grad.p0.student"]
    assert module.get_parameter("p1.gen_c.0.weight").grad.data_ptr() == seen["grad.p1.gen_c.0.weight"]
    # With retain_graph the saved gradients stay intact for the next pass: .grad is a copy.
    students[1].grad = None
    loss = module(students, teachers)
    loss.backward(retain_graph=True)
    first = students[1].grad.clone()
    assert students[1].grad.data_ptr() != seen["grad.p1.student"]
    loss.backward()
    assert torch.equal(students[1].grad, 2 * first)
