//! dmkd: the Dual Masked Knowledge Distillation loss (and its MGD and FGD
//! baselines) on a from-scratch reverse-mode autodiff engine.
//!
//! Layers, each looking only down:
//! - [`tensor`]: shapes and f32/f64 storage, no math;
//! - [`backend`]: the kernels (reference loops, fast CPU, CUDA) behind one trait;
//! - [`autograd`] and [`ops`]: the tape and the differentiable ops;
//! - `distill`: the losses, built only from ops.

pub mod autograd;
pub mod backend;
pub mod bench;
pub mod demo;
pub mod distill;
pub mod error;
pub mod gradcheck;
pub mod io;
pub mod named;
pub mod ops;
pub mod optim;
pub mod plot;
mod pool;
pub mod rng;
pub mod shape;
pub mod synthetic;
pub mod tensor;
pub mod verify;

pub use autograd::{Gradients, Tape, Var};
pub use backend::{Backend, BackendKind, BackendOptions, BackendRef, ConvAlgo, InputMask};
pub use error::{Error, Result};
pub use ops::Conv2dOptions;
pub use tensor::{DType, Float, Tensor};
