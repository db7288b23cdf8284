//! What each backend's results are held to: one rule per backend kind,
//! precision and class of op, with the reasoning (`docs/engineering.md`,
//! "Tolerance reasoning"). Every check compares with the reference backend
//! run on the same numbers (inputs are f32-representable, so the f32 and
//! f64 runs start from the same values).
//!
//! `u` is the unit roundoff (2^-53 for f64, 2^-24 for f32) and
//! `gamma_K = K u / (1 - K u)`.
//!
//! The fast CPU backend (`Rule::Cpu`):
//! - Element-wise ops, masking, copies and softmax (whose sums run in the
//!   reference's order) do the reference's arithmetic element by element:
//!   the same bits.
//! - Sums whose grouping differs (direct convolutions, `sum_axes`, the bias
//!   gradient, the squared errors) are checked per element against the
//!   classic worst-case bound for a K-term sum in any order with any fusing:
//!   `|computed - exact| <= gamma_K * sum|terms|`, where `sum|terms|` (the
//!   floor) is the reference run on absolute values, exact where outputs
//!   cancel to near zero (where a relative test would fail for any correct
//!   kernel). ReLU is 1-Lipschitz, so it keeps the bound. In f64 both sides
//!   are off by at most `gamma_K`: `2 gamma_K`. In f32 against the f64
//!   reference: `gamma_K(f32)` for the f32 side plus `gamma_K(f64)` for the
//!   reference's own rounding. That worst case, about `K * 6e-8` relative to
//!   the floor, still catches a wrong or missing term: one term is about
//!   `floor / K`, above the bound while `K^2 u < 1`, i.e. for K up to ~4000
//!   in f32. Typical errors are ~sqrt(K) u (random-walk rounding); nothing
//!   is asserted about them, since a test must not fail by bad luck.
//! - Winograd passes (3x3, stride 1, pad 1, under `ConvAlgo::Winograd`
//!   (F(4x4, 3x3)) and `ConvAlgo::Winograd6` (F(6x6, 3x3) for the forward
//!   pass and the input gradient), and under `Auto` in f32, which may pick
//!   either) are
//!   compared norm-wise (`||a - e|| / ||e||`) with the f64 reference, the
//!   measure under which Winograd's error is meaningful: f64 within 1e-12
//!   (the transforms add a few roundings per value with coefficients up to
//!   8, and 1/6, 1/24 inexact in binary; measured ~1e-15, so three orders of
//!   margin while any wrong index or coefficient is O(1) off; F(6x6)'s
//!   2/9, 1/90, ... round too, at the same scale); f32 within 1e-4, the
//!   accuracy requirement of the loss (measured ~1e-6 for F(4x4), about
//!   twice that for F(6x6)). `Auto` is
//!   always direct in f64 (its documented rule), so f64 `Auto` keeps the
//!   per-element bound.
//!
//! A device backend (`Rule::Device`, CUDA), norm-wise against the reference
//! of the same precision:
//! - f64 within `1e-12`. Element-wise ops are exact IEEE operations on both
//!   sides (the kernels are compiled without FMA contraction) except exp and
//!   ln (1 ulp); sums and GEMMs differ only in summation order, an error of
//!   order `sqrt(K) * 1.1e-16` for K terms, far below 1e-12 at these sizes.
//! - f32 within `1e-5`: the same argument with eps = 6e-8, a K-term sum in
//!   two orders differs by about `sqrt(K) * 6e-8` (random signs), 2e-6 for
//!   the longest sums here (K of a few thousand); CUDA's expf/logf are
//!   within 2 ulp. 1e-5 leaves a 5x margin and is still 100x tighter than
//!   any indexing or masking bug would produce. Results built from long
//!   sums (softmax, the losses, long `sum_axes`) may instead use 3x the
//!   reference's own f32 error against f64 where that is larger: a sum of a
//!   few thousand terms that happens to cancel has a large relative error in
//!   any f32 order.
//! - Exact claims: element-wise ops other than exp and ln, their
//!   derivatives, masking, slicing and the elementwise gradients of the
//!   losses equal the reference bit for bit; sums short enough for one
//!   thread per output (`SEQ_MAX`) run in the reference's order and equal it
//!   bit for bit; `broadcast_to` equals it up to the sign of zero (the
//!   reference adds +0.0).

use dmkd::{DType, Float, Tensor};

/// Which rules a backend's results follow (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The reference itself: compared with the oracles outside the engine
    /// (finite differences, PyTorch), never with itself.
    Reference,
    /// The fast CPU backend under a conv algorithm.
    Cpu(dmkd::ConvAlgo),
    /// A device backend (CUDA): other summation orders, the device's libm.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device,
}

/// What kind of computation an output is, for choosing its check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// One IEEE operation (or a fixed sequence) per element: element-wise
    /// ops other than exp and ln, their derivatives, masking, slicing, the
    /// elementwise loss gradients.
    Exact,
    /// exp and ln (the libm of the backend's platform).
    Transcendental,
    /// A broadcast copy (the reference adds +0.0 to every value).
    Copy,
    /// Softmax and its derivative (a row sum and exp).
    Softmax,
    /// `sum_axes` reducing `len` elements per output, K terms.
    SumAxes { k: usize, len: usize },
    /// A loss sum or its parameter gradient (`sq_err_sum`,
    /// `weighted_pair_residual`'s `sum(r^2)`, `<r, a>`, `<r, b>`), K terms.
    Loss { k: usize },
    /// A convolution pass (forward, input, weight or bias gradient), K
    /// terms per output; `winograd_shape` for 3x3 / stride 1 / pad 1.
    Conv { k: usize, winograd_shape: bool },
}

/// How one output is compared.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Check {
    /// The bits of the reference in the same precision.
    Bits,
    /// The values of the reference in the same precision (+0 equals -0).
    Values,
    /// Per element `|got - want64| <= bound * floor`.
    Bound(f64),
    /// `||got - want64|| / ||want64|| <= tol`.
    Norm64(f64),
    /// `||got - want|| / ||want|| <= tol`, `want` the same-precision reference.
    Norm(f64),
    /// As `Norm(tol)`, or within 3x the reference's own error against f64
    /// where that is larger.
    NormOrRef(f64),
}

const U64: f64 = f64::EPSILON / 2.0;
const U32: f64 = f32::EPSILON as f64 / 2.0;

/// `gamma_K = K u / (1 - K u)`.
pub fn gamma(k: usize, u: f64) -> f64 {
    let ku = k as f64 * u;
    ku / (1.0 - ku)
}

/// The worst-case bound on a K-term sum, relative to `sum|terms|`, between
/// a result in `dtype` and the f64 reference (module docs).
pub fn sum_bound(dtype: DType, k: usize) -> f64 {
    match dtype {
        DType::F64 => 2.0 * gamma(k, U64),
        DType::F32 => gamma(k, U32) + gamma(k, U64),
    }
}

/// The device's norm-wise tolerance per precision (module docs).
pub fn device_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
    }
}

/// Winograd's norm-wise tolerance against the f64 reference (module docs).
pub fn winograd_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-4,
    }
}

/// The CUDA backend's longest sum run by one thread per output, in the
/// reference's order (`backend::cuda::reduce::SEQ_MAX`).
pub const DEVICE_SEQ_MAX: usize = 512;

impl Rule {
    /// The check of an output of class `class` in precision `dtype`.
    pub fn check(self, class: Class, dtype: DType) -> Check {
        match self {
            Rule::Reference => Check::Bits,
            Rule::Cpu(algo) => match class {
                Class::Exact | Class::Transcendental | Class::Copy | Class::Softmax => Check::Bits,
                Class::Conv {
                    winograd_shape: true,
                    ..
                } if algo == dmkd::ConvAlgo::Winograd
                    || algo == dmkd::ConvAlgo::Winograd6
                    || (algo == dmkd::ConvAlgo::Auto && dtype == DType::F32) =>
                {
                    Check::Norm64(winograd_tol(dtype))
                }
                Class::SumAxes { k, .. } | Class::Loss { k } | Class::Conv { k, .. } => {
                    Check::Bound(sum_bound(dtype, k))
                }
            },
            Rule::Device => {
                let tol = device_tol(dtype);
                match class {
                    Class::Exact => Check::Bits,
                    Class::Copy => Check::Values,
                    Class::Transcendental | Class::Conv { .. } => Check::Norm(tol),
                    Class::SumAxes { len, .. } if len <= DEVICE_SEQ_MAX => Check::Bits,
                    Class::Softmax | Class::SumAxes { .. } | Class::Loss { .. } => {
                        Check::NormOrRef(tol)
                    }
                }
            }
        }
    }
}

/// `||a - e|| / ||e||` (`||a - e||` when `e` is all zeros).
pub fn norm_rel(a: &[f64], e: &[f64]) -> f64 {
    assert_eq!(a.len(), e.len(), "lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(e) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

fn f64s<T: Float>(t: &Tensor<T>) -> Vec<f64> {
    t.as_slice().iter().map(|v| v.as_f64()).collect()
}

/// What one output is compared with.
pub struct Expected<'a, T: Float> {
    /// The reference in the same precision.
    pub want: &'a Tensor<T>,
    /// The reference in f64 on the same numbers.
    pub want64: &'a Tensor<f64>,
    /// The reference on absolute values (the floor of `Check::Bound`).
    pub floor: Option<&'a Tensor<f64>>,
}

impl Check {
    /// Panic with `what` unless `got` passes.
    #[track_caller]
    pub fn assert<T: Float>(self, what: &str, got: &Tensor<T>, e: &Expected<'_, T>) {
        assert_eq!(got.shape(), e.want.shape(), "{what}: shape");
        let (g, w) = (got.as_slice(), e.want.as_slice());
        match self {
            Check::Bits => {
                for (i, (a, b)) in g.iter().zip(w).enumerate() {
                    assert!(
                        a.as_f64().to_bits() == b.as_f64().to_bits() || (a.is_nan() && b.is_nan()),
                        "{what}: element {i}: got {a:e} want {b:e} (bits differ)"
                    );
                }
            }
            Check::Values => {
                for (i, (a, b)) in g.iter().zip(w).enumerate() {
                    assert!(a == b, "{what}: element {i}: got {a:e} want {b:e}");
                }
            }
            Check::Bound(bound) => {
                let floor = e.floor.expect("a bound needs the floor");
                let (got, want, floor) = (f64s(got), e.want64.as_slice(), floor.as_slice());
                for i in 0..got.len() {
                    let d = (got[i] - want[i]).abs();
                    assert!(
                        d <= bound * floor[i] || got[i] == want[i],
                        "{what}: element {i}: got {} want {} (|d| = {d:e}, bound {:e})",
                        got[i],
                        want[i],
                        bound * floor[i]
                    );
                }
            }
            Check::Norm64(tol) => {
                let err = norm_rel(&f64s(got), e.want64.as_slice());
                assert!(err <= tol, "{what}: norm-wise error {err:e} > {tol:e}");
            }
            Check::Norm(tol) | Check::NormOrRef(tol) => {
                assert!(
                    got.first_non_finite().is_none(),
                    "{what}: non-finite output"
                );
                let tol = if matches!(self, Check::NormOrRef(_)) {
                    tol.max(3.0 * norm_rel(&f64s(e.want), e.want64.as_slice()))
                } else {
                    tol
                };
                let err = norm_rel(&f64s(got), &f64s(e.want));
                assert!(err <= tol, "{what}: norm-wise error {err:e} > {tol:e}");
            }
        }
    }
}
