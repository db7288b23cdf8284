//! Conformance: every backend method, and the whole loss, on every backend
//! under test (`tests/common/backends.rs`: the fast CPU backend under each
//! conv algorithm, CUDA where a device is usable) against the reference
//! loops, in f64 and f32.
//!
//! One table of op cases, written once: proptest-generated shapes, strides,
//! paddings, masks and values, plus fixed rows for the shapes random cases
//! rarely reach (many channels, long reductions, the lengths where the CUDA
//! reductions change path). Each output is held to its backend's rule for
//! its precision and class of op (`tests/common/rules.rs`, where every
//! tolerance is justified).
//!
//! Case counts come from `PROPTEST_CASES` (default 24). Files:
//! - `conv.rs`: convolutions (forward, input, weight and bias gradients);
//! - `ops.rs`: element-wise ops, reductions, softmax, layout, the losses' ops;
//! - `loss.rs`: the whole DMKD / MGD / FGD loss.

mod conv;
mod loss;
mod ops;

use crate::common::backends::backends;
use crate::common::cases::OpCase;
use crate::common::rules::Rule;
use dmkd::Tensor;
use dmkd::backend::BackendFloat;
use proptest::prelude::*;

/// f32-representable values in `[lo, hi)`, as f64 (so the f32 and f64
/// runs start from the same numbers).
pub(crate) fn values(n: usize, lo: f32, hi: f32) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(lo..hi, n).prop_map(|v| v.into_iter().map(f64::from).collect())
}

pub(crate) fn t64(shape: &[usize], v: Vec<f64>) -> Tensor<f64> {
    Tensor::from_vec(shape, v).unwrap()
}

/// Deterministic values in [-1, 1) on the f32 grid.
pub(crate) fn fill(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0) as f64
        })
        .collect()
}

pub(crate) fn filled(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor<f64> {
    let n = shape.iter().product();
    let v = fill(n, seed)
        .into_iter()
        .map(|u| ((lo + (hi - lo) * (u + 1.0) / 2.0) as f32) as f64)
        .collect();
    t64(shape, v)
}

pub(crate) fn conform_all(cases: &[OpCase]) {
    for c in cases {
        c.conform();
    }
}

/// Every backend under test has a rule other than the reference's, and the
/// list is not empty (a vanished list would make this suite pass vacuously).
#[test]
fn the_backend_list_is_complete() {
    fn names<T: BackendFloat>() -> Vec<String> {
        let v = backends::<T>();
        assert!(v.iter().all(|s| s.rule != Rule::Reference));
        v.into_iter().map(|s| s.name).collect()
    }
    let (a, b) = (names::<f64>(), names::<f32>());
    assert_eq!(a, b);
    for want in ["cpu/direct", "cpu/winograd", "cpu/auto"] {
        assert!(a.iter().any(|n| n == want), "{want} missing from {a:?}");
    }
}
