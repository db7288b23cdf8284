"""dmkd: the Dual Masked Knowledge Distillation loss (and MGD, FGD) from the dmkd Rust engine.

NumPy side (this module):

* ``evaluate(inputs, params=None, config=None, *, dtype="f64", ...)``: what ``dmkd eval``
  computes: ``loss``, ``p{l}.loss``, every ``grad.*``, the debug tensors and the parameters,
  under the exchange-format names.
* ``golden(preset="tiny", config=None, dtype="f64", seed=0)``: what ``dmkd golden`` writes.
* ``verify(expected, actual, rtol=1e-5, atol=0.0, stol=1e-5)`` -> ``Report`` (``.ok``,
  ``.rows``, ``str(report)`` is the CLI's table) and ``assert_close(...)`` for pytest.

PyTorch side: ``dmkd.torch.DMKDLoss`` (imported on first use; needs torch).

Arrays are read in place when they are C-contiguous, aligned and already of the compute dtype;
anything else NumPy converts is converted first. Every call releases the GIL while the engine
works. Engine errors are ``ValueError`` (shapes, configs, NaN/Inf, sizes), ``OSError`` (files)
or ``RuntimeError`` (backend, device), with the CLI's one-line message and a ``kind`` attribute.
"""

import importlib
import json
import os
import re

import numpy as np

from . import _dmkd
from ._dmkd import Report

__all__ = ["evaluate", "golden", "verify", "assert_close", "load", "Report", "config_json"]
__version__ = "0.1.0"

_DTYPES = {"f32": np.float32, "f64": np.float64}


def _np_dtype(dtype):
    if dtype not in _DTYPES:
        raise ValueError(f"invalid argument to dtype: unknown dtype `{dtype}` (f32 or f64)")
    return _DTYPES[dtype]


def _json_default(x):
    # NumPy scalars (np.int64 seeds, np.float32 ratios) in a config dict.
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    raise TypeError(f"config value {x!r} of type {type(x).__name__} is not JSON")


_LEVEL_RE = re.compile(r"^p(\d+)\.student$")


def config_json(config, levels=None):
    """The config as validated JSON with every default filled in.

    ``config``: a dict like the JSON config (``{"levels": [...]}``), a JSON string, a preset
    name (``"retinanet"``, ``"tiny"``, ...), or None: the default level config, once per level
    (``levels`` of them).
    """
    if config is None:
        if not levels:
            raise ValueError("invalid config: no levels (no config given and no p0.student)")
        text = json.dumps({"levels": [{}] * levels})
    elif isinstance(config, dict):
        text = json.dumps(config, default=_json_default)
    elif isinstance(config, (str, bytes)):
        text = config.decode() if isinstance(config, bytes) else config
        if not text.lstrip().startswith("{"):
            text = _dmkd.preset_config(text.strip())
    else:
        raise TypeError(
            f"config must be a dict, a JSON string, a preset name or None, not {type(config).__name__}"
        )
    return _dmkd.canonical_config(text)


def _as_array(name, value, np_dtype):
    """``value`` as a C-contiguous, aligned ndarray of ``np_dtype``: the same object when it
    already is one (read in place), else a converted copy."""
    if hasattr(value, "detach") and hasattr(value, "device"):  # a torch tensor
        if value.device.type != "cpu":
            raise ValueError(f"tensor `{name}` is on {value.device}; dmkd computes on the CPU (.cpu())")
        try:
            value = value.detach().numpy()
        except (TypeError, RuntimeError) as e:  # bfloat16, conjugate views, ...
            raise ValueError(f"tensor `{name}` cannot be read as an array: {e}") from None
    if isinstance(value, np.ma.MaskedArray):  # np.require would drop the mask silently
        raise ValueError(f"tensor `{name}` is a masked array; pass plain values "
                         f"(np.ma.filled(x, fill_value))")
    if isinstance(value, np.ndarray) and value.dtype.kind not in "fiub":
        raise ValueError(f"tensor `{name}` has dtype {value.dtype}, not a real number type")
    try:
        return np.require(value, dtype=np_dtype, requirements=["C", "A", "E"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"tensor `{name}` cannot be read as {np.dtype(np_dtype).name}: {e}") from None


def _arrays(tensors, np_dtype, what):
    if tensors is None:
        return {}
    if not hasattr(tensors, "items"):
        raise TypeError(f"{what} must be a dict of names to arrays, not {type(tensors).__name__}")
    out = {}
    for name, v in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"{what}: tensor names must be strings, got {name!r}")
        out[name] = _as_array(name, v, np_dtype)
    return out


def _level_count(names):
    levels = {int(m.group(1)) for m in map(_LEVEL_RE.match, names) if m}
    n = 0
    while n in levels:
        n += 1
    return n


def _u64(name, value):
    """``value`` as an int in [0, 2^64) (a seed or a sample index), or a ValueError naming it."""
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} {value} is not in [0, 2^64)")
    return value


def evaluate(inputs, params=None, config=None, *, dtype="f64", backend="cpu", conv_algo="auto",
             init_seed=0, sample_offset=0, allow_extra=False):
    """The loss, per-level losses, every gradient, debug tensors and parameters, as ``dmkd eval``.

    ``inputs`` / ``params``: dicts of exchange-format names (``p{l}.student``,
    ``p{l}.teacher``, FGD's ``gt_boxes.{n}`` and ``img_shape``; ``p{l}.gen_s.0.weight``, ...)
    to arrays. Missing parameters are initialised from ``init_seed`` as ``dmkd eval`` does
    (``init_seed=None``: a missing parameter is an error). ``config``: see ``config_json``
    (None: the default config on every level present). ``sample_offset``: the global index of
    the first sample (data-parallel shards; it moves the random masks' Philox counter).

    Returns a dict of NumPy arrays: ``loss``, ``p{l}.loss``, ``grad.<name>`` for every student
    and parameter, debug tensors, and every parameter used (supplied ones are the arrays read).
    """
    np_dtype = _np_dtype(dtype)
    tensors = _arrays(inputs, np_dtype, "inputs")
    for name, v in _arrays(params, np_dtype, "params").items():
        if name in tensors:
            raise ValueError(f"tensor `{name}` is given both as an input and as a parameter")
        tensors[name] = v
    cfg = config_json(config, levels=_level_count(tensors))
    if init_seed is not None:
        init_seed = _u64("init_seed", init_seed)
    sample_offset = _u64("sample_offset", sample_offset)
    outputs, initialised, param_names = _dmkd.evaluate_arrays(
        cfg, tensors, dtype, backend, conv_algo, init_seed, bool(allow_extra), sample_offset
    )
    result = dict(outputs)
    for name in param_names:
        # Supplied parameters are the arrays that were read (no copy back).
        result[name] = initialised[name] if name in initialised else tensors[name]
    return result


def golden(preset="tiny", config=None, dtype="f64", seed=0, *, backend="reference",
           sample_offset=0):
    """Golden vectors, as ``dmkd golden``: the preset's synthetic inputs (from ``seed``), every
    parameter initialised from ``seed``, and the loss, per-level losses, every gradient and the
    debug tensors (reference backend unless told), as a dict of NumPy arrays.
    ``sample_offset``: the global index of the first sample, as in ``evaluate`` and ``dmkd
    golden --sample-offset`` (a data-parallel shard's vectors: the random masks move with it,
    the inputs do not)."""
    _np_dtype(dtype)
    cfg = None if config is None else config_json(config)
    seed, sample_offset = _u64("seed", seed), _u64("sample_offset", sample_offset)
    return dict(_dmkd.golden_arrays(preset, cfg, dtype, seed, backend, sample_offset))


def load(path):
    """The tensors of a ``.safetensors``, ``.npy`` or ``.npz`` file or a directory of ``.npy``
    files (what ``dmkd eval`` / ``dmkd verify`` read), as a dict of NumPy arrays, and the file's
    metadata (e.g. ``config``, ``dtype``) as a dict of strings. A missing or unreadable file is
    an ``OSError``, a malformed one a ``ValueError``."""
    tensors, metadata = _dmkd.read_file(os.fspath(path))
    return dict(tensors), dict(metadata)


def _is_path(x):
    return isinstance(x, (str, bytes, os.PathLike))


def _verify_arrays(tensors, what):
    if _is_path(tensors):
        tensors = load(tensors)[0]
    if not hasattr(tensors, "items"):
        raise TypeError(f"{what} must be a dict of names to arrays, not {type(tensors).__name__}")
    out = {}
    for name, v in tensors.items():
        if hasattr(v, "detach") and hasattr(v, "device"):
            v = v.detach().cpu().numpy()
        a = np.asarray(v)
        # f32 stays f32 (ULP distances in f32); everything else is compared in f64.
        out[name] = _as_array(name, a, np.float32 if a.dtype == np.float32 else np.float64)
    return out


def verify(expected, actual, rtol=1e-5, atol=0.0, stol=1e-5, *, allow_extra=False):
    """Compare an implementation's outputs with expected ones, tensor by tensor, as
    ``dmkd verify``: element ``|a - e| <= atol + rtol*|e| + stol*max|e|``. ``expected`` and
    ``actual`` are dicts of arrays or paths of tensor files (see ``load``). Outputs (``loss``,
    ``p{l}.loss``, ``grad.*``) must be in ``actual``; other names are compared when both have
    them. Returns a ``Report``: ``.ok``, ``.rows`` (name, max_abs, max_rel, norm_rel,
    worst_index, ulp, passed), ``str(report)`` the CLI's table."""
    e = _verify_arrays(expected, "expected")
    a = _verify_arrays(actual, "actual")
    return _dmkd.verify_arrays(e, a, float(rtol), float(atol), float(stol), bool(allow_extra))


def assert_close(expected, actual, rtol=1e-5, atol=0.0, stol=1e-5, *, allow_extra=False):
    """``verify``, raising ``AssertionError`` with the report's table when anything is off
    (for pytest). Returns the report when everything passed."""
    report = verify(expected, actual, rtol, atol, stol, allow_extra=allow_extra)
    if not report.ok:
        raise AssertionError("dmkd.assert_close: outputs differ\n" + str(report))
    return report


def __getattr__(name):
    # `dmkd.torch` on first use, so that `import dmkd` does not need torch.
    if name == "torch":
        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'dmkd' has no attribute {name!r}")
