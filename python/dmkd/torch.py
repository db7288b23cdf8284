"""``DMKDLoss``: the dmkd engine as a ``torch.nn.Module``.

The module holds the loss's parameters (generation blocks, fusion logits, align convs; MGD's
and FGD's for those levels) under the exchange-format names, so ``state_dict()`` keys are
``p0.gen_s.0.weight``, ``p0.fusion``, ``p0.align.weight``, ... and a state dict written for the
exchange format loads directly. ``forward(students, teachers)`` returns the scalar loss; its
backward is a ``torch.autograd.Function`` that ran the engine's forward and backward once and
hands PyTorch the gradients of the students and of every parameter.

CPU tensors of float32 or float64 only; features, teachers and the module's parameters share
one dtype (``module.double()`` for f64). CUDA tensors are refused with an error saying so.
"""

import functools
import json
import operator

import numpy as np
import torch

from . import _as_array, _dmkd, _u64, config_json

__all__ = ["DMKDLoss"]

_TORCH_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def _numpy_view(name, t, dtype):
    """The tensor's elements as a NumPy array: a view of the same memory when the tensor is
    contiguous (the engine then reads it in place), a contiguous copy otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(
            f"{name} is a {t.device.type} tensor: dmkd.torch.DMKDLoss computes on the CPU; "
            f"move the features and the module there (.cpu())"
        )
    if t.dtype != dtype:
        raise ValueError(
            f"{name} has dtype {t.dtype}, expected {dtype} (the students' dtype); "
            f"features, teachers and the module's parameters share one dtype"
        )
    a = t.detach().numpy()
    return a if a.flags.c_contiguous and a.flags.aligned else np.ascontiguousarray(a)


class _Group(torch.nn.Module):
    """A container giving the parameters their dotted exchange-format names."""


class _EngineLoss(torch.autograd.Function):
    """Total loss of ``plan`` for (students..., parameters...): one engine forward and backward
    in ``forward``; ``backward`` hands out the stored gradients, scaled by the incoming one.

    The gradients are saved with ``save_for_backward``: autograd then frees them after a
    backward pass without ``retain_graph`` (before the gradients reach the leaves, which may then
    take the engine's buffers as their ``.grad`` without a copy), and keeps them for repeated
    backward passes with it (``gradcheck``).

    First order only: the engine computes no second derivatives. Under ``create_graph=True`` the
    gradients handed out pass through ``_FirstOrderOnly``, tied to the loss's inputs, so that
    differentiating them again raises instead of treating them as constants (which would make
    every second derivative zero: a gradient penalty through this loss would silently vanish)."""

    @staticmethod
    def forward(ctx, plan, *tensors):
        arrays = dict(plan["fixed"])
        for name, t in zip(plan["names"], tensors):
            arrays[name] = _numpy_view(name, t, plan["torch_dtype"])
        outputs, _, _ = _dmkd.evaluate_arrays(
            plan["config"], arrays, plan["dtype"], plan["backend"], plan["conv_algo"],
            None, False, plan["sample_offset"],
        )
        ctx.save_for_backward(*[torch.from_numpy(outputs["grad." + n]) for n in plan["names"]])
        # Kept for create_graph only, and not through save_for_backward: the gradients are
        # computed already, so an in-place change of an input after the forward (which
        # save_for_backward would turn into an error at backward) changes nothing here.
        ctx.inputs = tensors
        plan["level_losses"] = [float(outputs[f"p{l}.loss"]) for l in range(plan["levels"])]
        return torch.from_numpy(outputs["loss"])

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients may be differentiated
            grads = _FirstOrderOnly.apply(len(grads), *grads, *ctx.inputs)
        if not bool(grad_loss == 1):  # loss.backward() passes exactly 1: no extra pass
            grads = [g * grad_loss for g in grads]
        return (None, *grads)


class _FirstOrderOnly(torch.autograd.Function):
    """The engine's gradients, unchanged, as outputs of the loss's inputs: autograd then knows
    they depend on them, and differentiating them raises (the engine has no second
    derivatives)."""

    @staticmethod
    def forward(ctx, n, *grads_and_inputs):
        return tuple(g.view_as(g) for g in grads_and_inputs[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "dmkd.torch.DMKDLoss computes first derivatives only: its gradients cannot be "
            "differentiated again (create_graph=True, e.g. a gradient penalty)"
        )


def _per_level(value, levels, what):
    if not isinstance(value, (list, tuple)):  # one count for every level (int, np.int64, ...)
        value = [value] * levels
    value = [operator.index(v) for v in value]
    if len(value) != levels:
        raise ValueError(f"{what}: {len(value)} values for {levels} levels")
    for v in value:
        if v <= 0:
            raise ValueError(f"{what}: {v} is not a positive channel count")
    return value


class DMKDLoss(torch.nn.Module):
    """The DMKD loss (or MGD / FGD per level, as the config says) over FPN levels.

    Args:
        config: a dict like the JSON config (``{"levels": [{...}, ...]}``), a JSON string, a
            preset name (``"retinanet"``), or None: default DMKD levels, one per channel count.
        student_channels, teacher_channels: per level (a list), or one int for every level.
        init_seed: parameters start as ``dmkd eval --init-seed`` initialises them.
        sample_offset: global index of this process's first sample (data parallel: rank r of
            a batch split in equal shards of n uses ``r * n``); the random masks' Philox
            counter. ``forward`` can override it per call.
        backend, conv_algo: the engine's (``"cpu"``/``"reference"``, ``"auto"``/...).
        dtype: of the parameters (default ``torch.get_default_dtype()``).
    """

    def __init__(self, config=None, student_channels=256, teacher_channels=256, init_seed=0, *,
                 sample_offset=0, backend="cpu", conv_algo="auto", dtype=None):
        super().__init__()
        if config is None:
            levels = next((len(c) for c in (student_channels, teacher_channels)
                           if isinstance(c, (list, tuple))), 1)
        else:
            levels = None
        self.config_json = config_json(config, levels=levels)
        self.levels = json.loads(self.config_json)["levels"]
        n = len(self.levels)
        self.student_channels = _per_level(student_channels, n, "student_channels")
        self.teacher_channels = _per_level(teacher_channels, n, "teacher_channels")
        self.sample_offset = int(sample_offset)
        self.backend = backend
        self.conv_algo = conv_algo
        self.last_level_losses = None
        dtype = dtype or torch.get_default_dtype()
        channels = list(zip(self.student_channels, self.teacher_channels))
        self._param_names = []
        for name, value in _dmkd.init_param_arrays(self.config_json, channels, int(init_seed)):
            *path, leaf = name.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part) or not isinstance(getattr(owner, part), torch.nn.Module):
                    owner.add_module(part, _Group())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(value).to(dtype)))
            self._param_names.append(name)

    def extra_repr(self):
        methods = ",".join(l["method"] for l in self.levels)
        return (f"levels={len(self.levels)} ({methods}), student_channels={self.student_channels}, "
                f"teacher_channels={self.teacher_channels}, backend={self.backend}")

    @property
    def uses_boxes(self):
        return any(l["method"] == "fgd" for l in self.levels)

    def forward(self, students, teachers, gt_boxes=None, img_shape=None, *, sample_offset=None):
        """The total loss over every level (a 0-d tensor).

        students, teachers: one NCHW tensor per level (a list; a bare tensor for one level).
        gt_boxes (FGD): per image a ``[K, 4]`` tensor of (x1, y1, x2, y2); img_shape (FGD):
        ``[N, 2]`` (h, w) of each image. After the call ``last_level_losses`` holds the
        per-level losses (floats).
        """
        if isinstance(students, torch.Tensor):
            students = [students]
        if isinstance(teachers, torch.Tensor):
            teachers = [teachers]
        students, teachers = list(students), list(teachers)
        self.last_level_losses = None  # not the previous call's if this one raises
        n = len(self.levels)
        if len(students) != n or len(teachers) != n:
            raise ValueError(
                f"{len(students)} students and {len(teachers)} teachers for {n} configured levels"
            )
        for l, s in enumerate(students):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"p{l}.student: expected a torch.Tensor, got {type(s).__name__}")
            if s.device.type != "cpu":
                raise ValueError(
                    f"p{l}.student is a {s.device.type} tensor: dmkd.torch.DMKDLoss computes on "
                    f"the CPU; move the features and the module there (.cpu())"
                )
        tdtype = students[0].dtype
        if tdtype not in _TORCH_DTYPES:
            raise ValueError(f"p0.student has dtype {tdtype}; DMKDLoss computes in float32 or float64")
        fixed = {}
        for l, t in enumerate(teachers):
            if torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(
                    f"p{l}.teacher requires grad, but the loss hands out no teacher gradient "
                    f"(the teacher is the target); pass teacher.detach()"
                )
            fixed[f"p{l}.teacher"] = _numpy_view(f"p{l}.teacher", t, tdtype)
        if self.uses_boxes:
            if gt_boxes is None or img_shape is None:
                raise ValueError("an fgd level needs gt_boxes (one [K, 4] per image) and img_shape [N, 2]")
            np_dtype = np.float32 if tdtype == torch.float32 else np.float64
            gt_boxes = list(gt_boxes)
            if len(gt_boxes) != students[0].shape[0]:
                raise ValueError(f"{len(gt_boxes)} gt_boxes for {students[0].shape[0]} images "
                                 f"(one [K, 4] per image of this call's batch)")
            # Boxes are small: a tensor on another device is brought over. Then the checks of
            # `dmkd.evaluate` (real dtypes only, no masked arrays, readable as np_dtype).
            to_host = lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v
            for i, b in enumerate(gt_boxes):
                fixed[f"gt_boxes.{i}"] = _as_array(f"gt_boxes.{i}", to_host(b), np_dtype)
            fixed["img_shape"] = _as_array("img_shape", to_host(img_shape), np_dtype)
        elif gt_boxes is not None or img_shape is not None:
            raise ValueError("gt_boxes / img_shape given but no level is fgd")
        offset = self.sample_offset if sample_offset is None else sample_offset
        offset = _u64("sample_offset", offset)
        # Attribute lookup rather than get_parameter: torch.func.functional_call swaps the
        # parameters for plain tensors.
        params = [functools.reduce(getattr, name.split("."), self) for name in self._param_names]
        names = [f"p{l}.student" for l in range(n)] + self._param_names
        plan = {
            "config": self.config_json, "fixed": fixed, "names": names, "levels": n,
            "dtype": _TORCH_DTYPES[tdtype], "torch_dtype": tdtype, "backend": self.backend,
            "conv_algo": self.conv_algo, "sample_offset": offset,
        }
        tensors = students + params
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            loss = _EngineLoss.apply(plan, *tensors)
            self.last_level_losses = plan["level_losses"]
            return loss
        # No gradient wanted: the forward pass alone.
        arrays = dict(fixed)
        for name, t in zip(names, tensors):
            arrays[name] = _numpy_view(name, t, tdtype)
        loss, levels = _dmkd.forward_arrays(
            self.config_json, arrays, plan["dtype"], self.backend, self.conv_algo, offset
        )
        self.last_level_losses = list(levels)
        return torch.tensor(loss, dtype=tdtype)
