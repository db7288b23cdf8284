//! `dmkd._dmkd`: the dmkd engine seen from Python. A thin layer: it turns
//! NumPy arrays into engine tensors (in place, no copy), calls the library
//! (`Problem`, `evaluate`, `synthetic::golden`, `verify::compare`,
//! `distill::init_params`, a timing loop like `dmkd bench`'s) with the GIL released, and
//! hands the results back as NumPy arrays over the engine's own buffers.
//! The Python package (`python/dmkd/`) converts arguments (dtypes, layouts,
//! configs) before they reach this module.
//!
//! Errors: every engine error becomes a Python exception carrying the CLI's
//! one-line message and a `kind` attribute (`Error::kind`); a panic (a bug,
//! never the user's input) becomes a `RuntimeError` instead of unwinding
//! into the interpreter.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use dmkd::backend::{BackendFloat, BackendKind, BackendOptions, make_backend};
use dmkd::distill::{Config, EvalOptions, Problem, TensorMap, evaluate, forward, init_params};
use dmkd::io::{AnyTensor, TensorFile, read_tensor_file};
use dmkd::synthetic::{Preset, golden, inputs};
use dmkd::verify::{Status, Tolerance, compare, table};
use dmkd::{ConvAlgo, DType, Error, ExternalData, Float, Tensor};
use numpy::{Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// The Python exception for an engine error: `OSError` for files,
/// `RuntimeError` for the machine (device, backend, tape), `ValueError` for
/// everything a caller's values cause (shapes, configs, NaN/Inf, sizes).
fn py_err(e: Error) -> PyErr {
    let msg = e.one_line();
    let err = match e {
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::Device(_) | Error::BackendUnavailable(_) | Error::Autograd(_) => {
            PyRuntimeError::new_err(msg)
        }
        _ => PyValueError::new_err(msg),
    };
    Python::attach(|py| {
        // Best effort: an exception object always takes attributes.
        let _ = err.value(py).setattr("kind", e.kind());
    });
    err
}

/// Run engine work with the GIL released; errors become exceptions and a
/// panic becomes a `RuntimeError` naming it (as the CLI's panic hook does).
fn engine<R: Send>(py: Python<'_>, f: impl FnOnce() -> dmkd::Result<R> + Send) -> PyResult<R> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(r) => r.map_err(py_err),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(PyRuntimeError::new_err(format!(
                "internal error, please report it: {}",
                dmkd::error::one_line(what)
            )))
        }
    }
}

fn value_err(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// A NumPy array's elements, read in place. The array object is held, so
/// the buffer stays allocated; NumPy refuses to resize an array other
/// objects refer to. Callers must not write the array while a call runs
/// (as with any extension that releases the GIL); inside this module the
/// array is also borrowed read-only through `numpy`'s borrow tracking for
/// the whole call.
struct NumpyData<T> {
    _array: Py<PyAny>,
    ptr: *const T,
    len: usize,
}

// SAFETY: the pointer is only read (`as_slice`), and the memory it points to
// is owned by the array held in `_array` (a `Py`, itself Send + Sync).
unsafe impl<T: Sync> Send for NumpyData<T> {}
unsafe impl<T: Sync> Sync for NumpyData<T> {}

impl<T: Sync> ExternalData<T> for NumpyData<T> {
    fn as_slice(&self) -> &[T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is the data pointer of a C-contiguous, aligned array
        // of `len` elements of `T` (checked in `borrow_array`), kept alive
        // by `_array`; nothing in the engine writes through it.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// An engine tensor over a NumPy array's buffer (no copy). `guards` keeps
/// the array's read-only borrow until the call ends.
fn borrow_array<'py, T: Float + Element>(
    name: &str,
    obj: &Bound<'py, PyAny>,
    guards: &mut Vec<PyReadonlyArrayDyn<'py, T>>,
) -> PyResult<Tensor<T>> {
    let arr = obj.cast::<PyArrayDyn<T>>().map_err(|_| {
        value_err(format!(
            "tensor `{name}`: expected a NumPy array of {}",
            T::DTYPE
        ))
    })?;
    if !(arr.is_c_contiguous() && arr.is_aligned()) {
        return Err(value_err(format!(
            "tensor `{name}`: the array must be C-contiguous and aligned"
        )));
    }
    let guard = arr
        .try_readonly()
        .map_err(|e| value_err(format!("tensor `{name}`: {e}")))?;
    let shape = arr.shape().to_vec();
    let data = NumpyData {
        _array: arr.clone().into_any().unbind(),
        ptr: arr.data() as *const T,
        len: arr.len(),
    };
    guards.push(guard);
    Tensor::from_external(&shape, Arc::new(data)).map_err(py_err)
}

/// Tensors by name from a dict of NumPy arrays of `T`.
fn borrow_dict<'py, T: Float + Element>(
    dict: &Bound<'py, PyDict>,
    guards: &mut Vec<PyReadonlyArrayDyn<'py, T>>,
) -> PyResult<TensorMap<T>> {
    let mut map = TensorMap::new();
    for (k, v) in dict.iter() {
        let name: String = k
            .extract()
            .map_err(|_| value_err("tensor names must be strings"))?;
        let t = borrow_array(&name, &v, guards)?;
        map.insert(name, t);
    }
    Ok(map)
}

/// Owns the engine tensor a returned NumPy array views: the array's base
/// object, so the buffer lives as long as the array and goes back to the
/// engine's buffer pool when NumPy frees it.
#[pyclass(frozen, module = "dmkd._dmkd")]
struct EngineBuffer {
    _tensor: AnyTensor,
}

trait IntoAny: Float + Element {
    fn any(t: Tensor<Self>) -> AnyTensor;
}
impl IntoAny for f32 {
    fn any(t: Tensor<f32>) -> AnyTensor {
        AnyTensor::F32(t)
    }
}
impl IntoAny for f64 {
    fn any(t: Tensor<f64>) -> AnyTensor {
        AnyTensor::F64(t)
    }
}

/// A NumPy array over an engine tensor's buffer (no copy).
fn to_numpy<'py, T: IntoAny>(py: Python<'py>, t: Tensor<T>) -> PyResult<Bound<'py, PyAny>> {
    let owner = Bound::new(
        py,
        EngineBuffer {
            _tensor: T::any(t.clone()),
        },
    )?;
    let view = t.view();
    // SAFETY: `view` points into the storage `owner` keeps alive; the array
    // takes `owner` as its base object, so the storage outlives the array.
    let arr = unsafe { PyArrayDyn::<T>::borrow_from_array(&view, owner.into_any()) };
    Ok(arr.into_any())
}

fn map_to_dict<'py, T: IntoAny>(
    py: Python<'py>,
    map: TensorMap<T>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in map {
        d.set_item(k, to_numpy(py, v)?)?;
    }
    Ok(d)
}

fn parse_dtype(s: &str) -> PyResult<DType> {
    s.parse().map_err(py_err)
}

fn backend_options(backend: &str, conv_algo: &str) -> PyResult<BackendOptions> {
    Ok(BackendOptions {
        kind: backend.parse::<BackendKind>().map_err(py_err)?,
        conv_algo: conv_algo.parse::<ConvAlgo>().map_err(py_err)?,
        isa: dmkd::Isa::Auto,
    })
}

fn parse_config(json: &str) -> PyResult<Config> {
    Config::from_json(json).map_err(py_err)
}

/// The config JSON with every default filled in (validated).
#[pyfunction]
fn canonical_config(json: &str) -> PyResult<String> {
    Ok(parse_config(json)?.to_json())
}

/// The DMKD config of a preset, as JSON.
#[pyfunction]
fn preset_config(name: &str) -> PyResult<String> {
    Ok(Preset::named(name).map_err(py_err)?.config().to_json())
}

struct EvalArgs {
    config: Config,
    backend: BackendOptions,
    opts: EvalOptions,
    sample_offset: usize,
}

type EvalResult<'py> = (Bound<'py, PyDict>, Bound<'py, PyDict>, Vec<String>);

fn evaluate_typed<'py, T: BackendFloat + IntoAny>(
    py: Python<'py>,
    tensors: &Bound<'py, PyDict>,
    args: EvalArgs,
) -> PyResult<EvalResult<'py>> {
    let mut guards = Vec::new();
    let map = borrow_dict::<T>(tensors, &mut guards)?;
    let (eval, names) = engine(py, || {
        let problem =
            Problem::new(&args.config, &map, args.opts)?.with_sample_offset(args.sample_offset)?;
        let be = make_backend::<T>(args.backend)?;
        let mut eval = evaluate(be, &problem)?;
        // Supplied parameters are the caller's own arrays; return only
        // the initialised ones (and every parameter's name).
        eval.params.retain(|k, _| !map.contains_key(k));
        Ok((eval, problem.param_names()))
    })?;
    drop(guards);
    Ok((
        map_to_dict(py, eval.outputs)?,
        map_to_dict(py, eval.params)?,
        names,
    ))
}

/// The total loss and per-level losses without gradients (`distill::forward`).
fn forward_typed<T: BackendFloat + IntoAny>(
    py: Python<'_>,
    tensors: &Bound<'_, PyDict>,
    args: EvalArgs,
) -> PyResult<(f64, Vec<f64>)> {
    let mut guards = Vec::new();
    let map = borrow_dict::<T>(tensors, &mut guards)?;
    engine(py, || {
        let problem =
            Problem::new(&args.config, &map, args.opts)?.with_sample_offset(args.sample_offset)?;
        let (loss, levels) = forward(make_backend::<T>(args.backend)?, &problem)?;
        Ok((loss.as_f64(), levels.iter().map(|v| v.as_f64()).collect()))
    })
}

/// The loss and per-level losses only (no backward pass), for arrays of
/// `dtype` holding every input and parameter.
#[pyfunction]
#[pyo3(signature = (config, tensors, dtype, backend, conv_algo, sample_offset))]
fn forward_arrays(
    py: Python<'_>,
    config: &str,
    tensors: &Bound<'_, PyDict>,
    dtype: &str,
    backend: &str,
    conv_algo: &str,
    sample_offset: usize,
) -> PyResult<(f64, Vec<f64>)> {
    let args = EvalArgs {
        config: parse_config(config)?,
        backend: backend_options(backend, conv_algo)?,
        opts: EvalOptions {
            init_seed: None,
            allow_extra: false,
        },
        sample_offset,
    };
    match parse_dtype(dtype)? {
        DType::F32 => forward_typed::<f32>(py, tensors, args),
        DType::F64 => forward_typed::<f64>(py, tensors, args),
    }
}

/// Loss, per-level losses, every gradient and debug tensor (`outputs`), the
/// parameters initialised from `init_seed` (`params`) and every parameter's
/// name, for NumPy arrays of `dtype` by exchange-format name.
#[pyfunction]
#[pyo3(signature = (config, tensors, dtype, backend, conv_algo, init_seed, allow_extra, sample_offset))]
#[allow(clippy::too_many_arguments)]
fn evaluate_arrays<'py>(
    py: Python<'py>,
    config: &str,
    tensors: &Bound<'py, PyDict>,
    dtype: &str,
    backend: &str,
    conv_algo: &str,
    init_seed: Option<u64>,
    allow_extra: bool,
    sample_offset: usize,
) -> PyResult<EvalResult<'py>> {
    let args = EvalArgs {
        config: parse_config(config)?,
        backend: backend_options(backend, conv_algo)?,
        opts: EvalOptions {
            init_seed,
            allow_extra,
        },
        sample_offset,
    };
    match parse_dtype(dtype)? {
        DType::F32 => evaluate_typed::<f32>(py, tensors, args),
        DType::F64 => evaluate_typed::<f64>(py, tensors, args),
    }
}

/// Golden vectors of a preset: inputs, parameters and outputs (what `dmkd
/// golden` writes), with the random masks drawn as for samples from
/// `sample_offset` on (a data-parallel shard's golden file).
#[pyfunction]
#[pyo3(signature = (preset, config, dtype, seed, backend, sample_offset))]
fn golden_arrays<'py>(
    py: Python<'py>,
    preset: &str,
    config: Option<&str>,
    dtype: &str,
    seed: u64,
    backend: &str,
    sample_offset: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let preset = Preset::named(preset).map_err(py_err)?;
    let config = match config {
        Some(json) => parse_config(json)?,
        None => preset.config(),
    };
    let opts = backend_options(backend, "auto")?;
    match parse_dtype(dtype)? {
        DType::F32 => {
            let (all, _) = engine(py, || {
                golden::<f32>(&preset, &config, seed, sample_offset, make_backend(opts)?)
            })?;
            map_to_dict(py, all)
        }
        DType::F64 => {
            let (all, _) = engine(py, || {
                golden::<f64>(&preset, &config, seed, sample_offset, make_backend(opts)?)
            })?;
            map_to_dict(py, all)
        }
    }
}

/// The tensors (in their own precision) and metadata of a `.safetensors`,
/// `.npy` or `.npz` file or a directory of `.npy` files, as `dmkd eval` and
/// `dmkd verify` read them.
#[pyfunction]
fn read_file<'py>(
    py: Python<'py>,
    path: std::path::PathBuf,
) -> PyResult<(Bound<'py, PyDict>, BTreeMap<String, String>)> {
    let file = engine(py, || read_tensor_file(&path))?;
    let d = PyDict::new(py);
    for (k, v) in file.tensors {
        let arr = match v {
            AnyTensor::F32(t) => to_numpy(py, t)?,
            AnyTensor::F64(t) => to_numpy(py, t)?,
        };
        d.set_item(k, arr)?;
    }
    Ok((d, file.metadata.into_iter().collect()))
}

/// A preset's synthetic students and teachers (what `dmkd bench` and `dmkd
/// golden` compute on), by exchange-format name.
#[pyfunction]
fn preset_inputs<'py>(
    py: Python<'py>,
    preset: &str,
    seed: u64,
    dtype: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let preset = Preset::named(preset).map_err(py_err)?;
    match parse_dtype(dtype)? {
        DType::F32 => map_to_dict(py, engine(py, || inputs::<f32>(&preset, seed))?),
        DType::F64 => map_to_dict(py, engine(py, || inputs::<f64>(&preset, seed))?),
    }
}

/// The parameters of `config` for per-level (student, teacher) channel
/// counts, initialised from `seed` as `evaluate` initialises them, in order.
#[pyfunction]
fn init_param_arrays<'py>(
    py: Python<'py>,
    config: &str,
    channels: Vec<(usize, usize)>,
    seed: u64,
) -> PyResult<Bound<'py, PyList>> {
    let config = parse_config(config)?;
    let params = engine(py, || init_params::<f64>(&config, &channels, seed))?;
    let list = PyList::empty(py);
    for (name, t) in params {
        list.append((name, to_numpy(py, t)?))?;
    }
    Ok(list)
}

/// One tensor of a verify input: f32 stays f32 (ULPs in f32), f64 stays f64.
fn any_tensor<'py>(
    name: &str,
    obj: &Bound<'py, PyAny>,
    g32: &mut Vec<PyReadonlyArrayDyn<'py, f32>>,
    g64: &mut Vec<PyReadonlyArrayDyn<'py, f64>>,
) -> PyResult<AnyTensor> {
    if obj.cast::<PyArrayDyn<f32>>().is_ok() {
        Ok(AnyTensor::F32(borrow_array(name, obj, g32)?))
    } else {
        Ok(AnyTensor::F64(borrow_array(name, obj, g64)?))
    }
}

fn tensor_file<'py>(
    dict: &Bound<'py, PyDict>,
    g32: &mut Vec<PyReadonlyArrayDyn<'py, f32>>,
    g64: &mut Vec<PyReadonlyArrayDyn<'py, f64>>,
) -> PyResult<TensorFile> {
    let mut tensors = BTreeMap::new();
    for (k, v) in dict.iter() {
        let name: String = k
            .extract()
            .map_err(|_| value_err("tensor names must be strings"))?;
        let t = any_tensor(&name, &v, g32, g64)?;
        tensors.insert(name, t);
    }
    Ok(TensorFile {
        tensors,
        metadata: Default::default(),
    })
}

/// The result of `dmkd.verify`: `ok`, `rows`, and `str()` the CLI's table.
#[pyclass(frozen, module = "dmkd._dmkd", name = "Report")]
struct Report {
    report: dmkd::verify::Report,
}

type Row = (String, f64, f64, f64, Vec<usize>, u64, bool);

#[pymethods]
impl Report {
    /// True when every tensor passed (nothing failed, missing or misshapen).
    #[getter]
    fn ok(&self) -> bool {
        self.report.passed
    }

    /// One tuple per tensor: (name, max_abs, max_rel, norm_rel,
    /// worst_index, ulp, passed).
    #[getter]
    fn rows(&self) -> Vec<Row> {
        self.report
            .tensors
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.max_abs_error,
                    r.max_rel_error,
                    r.norm_rel_error,
                    r.worst_index.clone(),
                    r.max_ulp,
                    r.status == Status::Pass,
                )
            })
            .collect()
    }

    /// Per tensor, why it did not pass ("" when it passed).
    #[getter]
    fn details(&self) -> Vec<(String, String)> {
        self.report
            .tensors
            .iter()
            .map(|r| {
                let status = match r.status {
                    Status::Pass => "",
                    Status::Fail => "fail",
                    Status::Missing => "missing",
                    Status::Extra => "extra",
                    Status::ShapeMismatch => "shape",
                };
                (r.name.clone(), status.to_string())
            })
            .collect()
    }

    fn __bool__(&self) -> bool {
        self.report.passed
    }

    fn __str__(&self) -> String {
        table(&self.report, "expected", "actual")
    }

    fn __repr__(&self) -> String {
        let failed = self
            .report
            .tensors
            .iter()
            .filter(|r| r.status != Status::Pass)
            .count();
        format!(
            "<dmkd.Report ok={} tensors={} failed={failed}>",
            if self.report.passed { "True" } else { "False" },
            self.report.tensors.len()
        )
    }
}

/// Compare dicts of arrays (f32 or f64) as `dmkd verify` compares files.
#[pyfunction]
#[pyo3(signature = (expected, actual, rtol, atol, stol, allow_extra))]
fn verify_arrays<'py>(
    py: Python<'py>,
    expected: &Bound<'py, PyDict>,
    actual: &Bound<'py, PyDict>,
    rtol: f64,
    atol: f64,
    stol: f64,
    allow_extra: bool,
) -> PyResult<Report> {
    let tol = Tolerance { rtol, atol, stol };
    if let Some((name, _)) = tol.invalid() {
        return Err(value_err(format!("{name} must be finite and >= 0")));
    }
    let (mut g32, mut g64) = (Vec::new(), Vec::new());
    let e = tensor_file(expected, &mut g32, &mut g64)?;
    let a = tensor_file(actual, &mut g32, &mut g64)?;
    let report = engine(py, || Ok(compare(&e, &a, tol, allow_extra)))?;
    Ok(Report { report })
}

/// The engine's whole loss on a preset's synthetic inputs (f32, parameters
/// from seed 0), timed in this process as `dmkd bench`'s loss rows time it:
/// one warm-up, then the median of `reps` runs of `forward` and of
/// `evaluate`, on a pool of `threads` threads. A list of (row name, ms).
#[pyfunction]
#[pyo3(signature = (preset, threads, reps, conv_algo))]
fn bench_loss(
    py: Python<'_>,
    preset: &str,
    threads: usize,
    reps: usize,
    conv_algo: &str,
) -> PyResult<Vec<(String, f64)>> {
    let preset = Preset::named(preset).map_err(py_err)?;
    let opts = backend_options("cpu", conv_algo)?;
    // As `dmkd bench --reps`: a huge count would size the timing vector.
    if !(1..=10_000).contains(&reps) {
        return Err(PyValueError::new_err(format!(
            "reps {reps} is not in 1..=10000"
        )));
    }
    engine(py, || {
        // The pool first: a thread count it refuses fails before any work.
        let pool = dmkd::threads::pool("bench_loss", threads)?;
        let problem = dmkd::synthetic::problem::<f32>(&preset, 0)?;
        let be = make_backend::<f32>(opts)?;
        pool.install(|| {
            let median = |f: &dyn Fn() -> dmkd::Result<()>| -> dmkd::Result<f64> {
                f()?;
                let mut ms = Vec::with_capacity(reps);
                for _ in 0..reps {
                    let t0 = std::time::Instant::now();
                    f()?;
                    ms.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                ms.sort_by(f64::total_cmp);
                Ok(ms[reps / 2])
            };
            Ok(vec![
                (
                    "dmkd.forward".to_string(),
                    median(&|| forward(be.clone(), &problem).map(drop))?,
                ),
                (
                    "dmkd.forward_backward".to_string(),
                    median(&|| evaluate(be.clone(), &problem).map(drop))?,
                ),
            ])
        })
    })
}

/// A panic inside the engine call, to test that it surfaces as a
/// `RuntimeError` instead of unwinding into the interpreter.
#[pyfunction]
fn _panic_for_test(py: Python<'_>) -> PyResult<()> {
    engine(py, || -> dmkd::Result<()> {
        panic!("deliberate test panic")
    })
}

#[pymodule]
fn _dmkd(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Every call computes on rayon's global pool; a RAYON_NUM_THREADS it
    // could not start would abort the interpreter at the first call, so
    // the import fails instead, with the reason.
    dmkd::threads::check_env().map_err(py_err)?;
    m.add_function(wrap_pyfunction!(canonical_config, m)?)?;
    m.add_function(wrap_pyfunction!(preset_config, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(forward_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(golden_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(init_param_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(preset_inputs, m)?)?;
    m.add_function(wrap_pyfunction!(read_file, m)?)?;
    m.add_function(wrap_pyfunction!(verify_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(bench_loss, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    m.add_class::<Report>()?;
    m.add_class::<EngineBuffer>()?;
    Ok(())
}
