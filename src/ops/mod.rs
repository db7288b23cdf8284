//! Differentiable ops, one module per family, forward and backward side by side.
//!
//! Each op validates its operands (typed errors, never a panic), asks the
//! tape's backend for the forward value, and records a backward closure that
//! states the derivative in terms of backend calls. The ops are inherent
//! methods of [`Var`](crate::Var), so graph code reads as `x.conv2d(..)?.relu()?`.

pub mod conv;
pub mod elementwise;
pub mod layout;
pub mod loss;
pub mod reduce;
pub mod softmax;

pub use conv::Conv2dOptions;
pub use elementwise::sum_to_shape;
