//! dmkd: the Dual Masked Knowledge Distillation loss (and its MGD and FGD
//! baselines) on a from-scratch reverse-mode autodiff engine.
//!
//! The loss is defined in `docs/spec.md`; the measurements and rules the
//! code relies on are in `docs/engineering.md`.
//!
//! Layers, each looking only down:
//! - [`tensor`]: shapes and f32/f64 storage (host, or a device backend's
//!   behind [`tensor::DeviceStorage`]), no math; [`named`]: tensors by name;
//! - [`backend`]: the kernels (reference loops, fast CPU, CUDA) behind one
//!   trait;
//! - [`autograd`] and [`ops`]: the tape and the differentiable ops;
//! - [`distill`]: the losses, built only from ops;
//! - [`io`] (files in the exchange format), [`verify`] (comparing another
//!   implementation's outputs), [`gradcheck`] (the finite-difference
//!   oracle), [`synthetic`] (presets and synthetic inputs for golden
//!   vectors), [`optim`] (SGD, AdamW), [`rng`] (Philox).
//!
//! Evaluating a loss and reading its gradients
//! (`examples/evaluate.rs` is the runnable version):
//!
//! ```
//! use std::sync::Arc;
//! use dmkd::distill::{Config, EvalOptions, Problem, evaluate};
//! use dmkd::synthetic::{Preset, inputs};
//! use dmkd::{BackendRef, ConvAlgo, backend::CpuBackend};
//!
//! let preset = Preset::named("tiny")?;
//! let tensors = inputs::<f32>(&preset, 0)?; // p{l}.student, p{l}.teacher
//! let opts = EvalOptions { init_seed: Some(0), allow_extra: false };
//! let problem = Problem::new(&Config::from_json(r#"{"levels":[{},{},{}]}"#)?, &tensors, opts)?;
//! let backend: BackendRef<f32> = Arc::new(CpuBackend::new(ConvAlgo::Auto));
//! let result = evaluate(backend, &problem)?;
//! let grad = &result.outputs["grad.p0.student"];
//! assert_eq!(grad.shape(), tensors["p0.student"].shape());
//! assert!(result.loss > 0.0);
//! # Ok::<(), dmkd::Error>(())
//! ```
#![warn(missing_docs)]

pub mod autograd;
pub mod backend;
pub mod distill;
pub mod error;
pub mod gradcheck;
pub mod io;
pub mod named;
pub mod ops;
pub mod optim;
mod pool;
pub mod rng;
mod shape;
pub mod synthetic;
pub mod tensor;
pub mod threads;
pub mod verify;

pub use autograd::{Gradients, Tape, Var};
pub use backend::{Backend, BackendKind, BackendOptions, BackendRef, ConvAlgo, InputMask, Isa};
pub use error::{Error, Result};
pub use named::TensorMap;
pub use ops::Conv2dOptions;
pub use pool::tune_allocator;
pub use tensor::{DType, ExternalData, Float, Tensor};

// An `.npz` archive's `metadata.json` holds a level config as an escaped
// string: its cap must leave room for the longest config accepted.
const _: () = assert!(io::npy::MAX_METADATA_BYTES >= 4 * distill::config::MAX_CONFIG_BYTES);
