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

/// What the ops' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use crate::autograd::{Tape, Var};
    use crate::backend::ReferenceBackend;
    use crate::tensor::Tensor;

    /// A tensor of `shape` holding the CPU kernel tests' fixed values in
    /// [-1, 1) for `seed`.
    pub fn values(shape: &[usize], seed: u64) -> Tensor<f64> {
        let n = shape.iter().product::<usize>();
        Tensor::from_vec(shape, crate::backend::cpu::testing::values(n, seed)).unwrap()
    }

    /// Runs `f` for every subset of its operands being leaves (the others
    /// constants) and compares each leaf's gradient with the all-leaves run,
    /// bit for bit: a leaf's gradient must not depend on which other operands
    /// want one, and a constant gets none. (The all-leaves gradients are
    /// checked against finite differences in `tests/gradcheck.rs`.)
    pub fn each_subset_of_leaves(
        inputs: &[Tensor<f64>],
        f: impl Fn(&[Var<f64>]) -> crate::Result<Var<f64>>,
    ) {
        let run = |leaves: usize| {
            let tape = Tape::new(Arc::new(ReferenceBackend));
            let vars: Vec<Var<f64>> = inputs
                .iter()
                .enumerate()
                .map(|(i, x)| match leaves >> i & 1 {
                    1 => tape.leaf(x.clone()),
                    _ => tape.constant(x.clone()),
                })
                .collect();
            let grads = f(&vars).unwrap().backward().unwrap();
            vars.iter()
                .map(|v| grads.get(v).map(|g| g.as_slice().to_vec()))
                .collect::<Vec<_>>()
        };
        let all = (1usize << inputs.len()) - 1;
        let want = run(all);
        assert!(
            want.iter().all(Option::is_some),
            "every leaf gets a gradient"
        );
        for leaves in 1..all {
            for (i, (got, want)) in run(leaves).iter().zip(&want).enumerate() {
                match leaves >> i & 1 {
                    1 => assert_eq!(got, want, "operand {i}, leaves {leaves:#b}"),
                    _ => assert!(got.is_none(), "operand {i} is a constant"),
                }
            }
        }
    }
}
