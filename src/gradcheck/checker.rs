//! The checker: reverse-mode gradients against central finite differences,
//! in f64.
//!
//! For a function `f` of inputs `x_1..x_k` (any output shape), draw a random
//! cotangent `c` (output-shaped) and, for each input `i` in turn, a random
//! tangent `t` (input-shaped). Reverse mode gives `a = <t, J_i^T c>` from
//! one backward pass of `sum(f * c)`; the central difference gives
//! `d = (phi(h) - phi(-h)) / 2h` with `phi(e) = <f(x_i + e t), c>`
//! (JAX's `check_vjp`). Two forward passes per input, whatever its size.
//!
//! Step and tolerance. The tangent is scaled to unit RMS per element. The
//! central difference has truncation error `h^2 |phi'''| / 6` and rounding
//! error about `eps |phi| / h`; `h = eps^(1/3) ~ 6e-6` balances them at about
//! `eps^(2/3) ~ 4e-11` relative, so requiring a relative error below `1e-6`
//! leaves four orders of magnitude for the function's constants, while a
//! wrong derivative (a missing term, a wrong factor) is off by O(1).
//! A difference below the rounding noise of the finite difference itself
//! (`ABS_NOISE_FACTOR * eps * max|phi| / h`) cannot be resolved and counts
//! as agreement; this matters only when the true derivative is ~0 (an input
//! that is fully masked, say).

use crate::autograd::{Tape, Var};
use crate::backend::BackendRef;
use crate::error::Result;
use crate::rng::PhiloxStream;
use crate::tensor::Tensor;

/// Relative tolerance of the check (see the module docs).
pub const RTOL: f64 = 1e-6;
/// Finite-difference step: the cube root of f64's epsilon.
pub const STEP: f64 = 6.055_454_452_393_343e-6;
/// Multiplier on the finite difference's own rounding noise below which a
/// difference is not resolvable (forward passes sum many terms, so their
/// rounding exceeds one epsilon of the result).
pub const ABS_NOISE_FACTOR: f64 = 1e4;

/// The result of checking one input of a function.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InputCheck {
    /// Which input (position in the `inputs` slice).
    pub input: usize,
    /// `<t, J^T c>` from reverse mode.
    pub analytic: f64,
    /// The central difference along `t`, projected on `c`.
    pub numeric: f64,
    /// `|analytic - numeric|` relative to the larger of the two (and the noise floor).
    pub rel_error: f64,
    /// `|analytic - numeric|`.
    pub abs_error: f64,
    /// The finite difference's own rounding noise.
    pub noise_floor: f64,
    /// `rel_error < RTOL`, or `abs_error` within the noise floor.
    pub passed: bool,
}

/// The result of checking every input of a function.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// One check per input.
    pub inputs: Vec<InputCheck>,
}

impl Report {
    /// Every input passed.
    pub fn passed(&self) -> bool {
        self.inputs.iter().all(|c| c.passed)
    }
    /// The worst relative error over the inputs.
    pub fn max_rel_error(&self) -> f64 {
        self.inputs.iter().map(|c| c.rel_error).fold(0.0, f64::max)
    }
}

fn random_like(shape: &[usize], rng: &mut PhiloxStream) -> Result<Tensor<f64>> {
    Tensor::from_fn(shape, |_| rng.normal())
}

fn dot(a: &Tensor<f64>, b: &Tensor<f64>) -> f64 {
    a.as_slice()
        .iter()
        .zip(b.as_slice())
        .map(|(x, y)| x * y)
        .sum()
}

/// Check the reverse-mode gradient of `f` at `inputs` against central
/// differences, one input at a time. `f` builds the function on a tape from
/// leaf variables (one per input) and returns its output.
pub fn check<F>(backend: BackendRef<f64>, inputs: &[Tensor<f64>], seed: u64, f: F) -> Result<Report>
where
    F: Fn(&Tape<f64>, &[Var<f64>]) -> Result<Var<f64>>,
{
    let mut rng = PhiloxStream::new(seed, 0x6772_6164); // "grad"
    // Reverse mode: one backward pass of <f(x), c>.
    let tape = Tape::new(backend.clone());
    let leaves: Vec<Var<f64>> = inputs.iter().map(|x| tape.leaf(x.clone())).collect();
    let out = f(&tape, &leaves)?;
    let c = random_like(out.shape(), &mut rng)?;
    let c_var = tape.constant(c.clone());
    let scalar = out.mul(&c_var)?.sum_all()?;
    let grads = scalar.backward()?;

    // phi(e) = <f(x with input i moved by e t), c>, on constant tapes.
    let phi = |i: usize, t: &Tensor<f64>, e: f64| -> Result<f64> {
        let tape = Tape::new(backend.clone());
        let vars: Vec<Var<f64>> = inputs
            .iter()
            .enumerate()
            .map(|(j, x)| {
                if j == i {
                    let moved: Vec<f64> = x
                        .as_slice()
                        .iter()
                        .zip(t.as_slice())
                        .map(|(a, b)| a + e * b)
                        .collect();
                    tape.constant(Tensor::from_parts(x.shape(), moved))
                } else {
                    tape.constant(x.clone())
                }
            })
            .collect();
        Ok(dot(f(&tape, &vars)?.value(), &c))
    };

    let mut checks = Vec::with_capacity(inputs.len());
    for (i, (x, leaf)) in inputs.iter().zip(&leaves).enumerate() {
        let t = random_like(x.shape(), &mut rng)?;
        let g = grads.get_or_zeros(leaf)?;
        let analytic = dot(&t, &g);
        let (plus, minus) = (phi(i, &t, STEP)?, phi(i, &t, -STEP)?);
        let numeric = (plus - minus) / (2.0 * STEP);
        let abs_error = (analytic - numeric).abs();
        let noise_floor = ABS_NOISE_FACTOR * f64::EPSILON * plus.abs().max(minus.abs()) / STEP;
        // Relative to the larger of the two estimates, but never to less
        // than the noise floor: a derivative that is exactly zero (a bias
        // that softmax is invariant to, a fully masked input) reads as a
        // small error rather than 100%.
        let scale = analytic.abs().max(numeric.abs()).max(noise_floor);
        let rel_error = if scale > 0.0 { abs_error / scale } else { 0.0 };
        let passed = abs_error.is_finite() && (rel_error < RTOL || abs_error <= noise_floor);
        checks.push(InputCheck {
            input: i,
            analytic,
            numeric,
            rel_error,
            abs_error,
            noise_floor,
            passed,
        });
    }
    Ok(Report { inputs: checks })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ReferenceBackend;
    use std::sync::Arc;

    fn be() -> BackendRef<f64> {
        Arc::new(ReferenceBackend)
    }

    /// `y = x^2` with the wrong derivative `3x`: the checker must reject it.
    fn wrong_square(x: &Var<f64>) -> Result<Var<f64>> {
        square_with_derivative(x, 3.0)
    }

    /// `y = x^2` whose backward multiplies by `factor * x` (2 is right).
    fn square_with_derivative(x: &Var<f64>, factor: f64) -> Result<Var<f64>> {
        let y = x
            .backend()
            .unary(crate::backend::Unary::Square, x.value())?;
        let xv = x.value().clone();
        x.tape().record(&[x], y, move |be, g, _| {
            let d = be.unary(crate::backend::Unary::Scale(factor), &xv)?;
            let gx = be.binary(crate::backend::Binary::Mul, &g, &d, g.shape())?;
            Ok(vec![Some(gx)])
        })
    }

    fn small_x() -> Tensor<f64> {
        Tensor::from_vec(
            &[2, 3],
            vec![1.3e-4, -2.1e-4, 0.7e-4, 2e-4, -0.4e-4, 1.1e-4],
        )
        .unwrap()
    }

    /// The relative test decides on its own where the error is above the
    /// noise floor: near x = 0, `phi` (~x^2) is small against the derivative
    /// (~x), so an error of 1e-8 of the derivative is far above the floor,
    /// and is accepted only because it is below `RTOL`; 1e-5 is rejected.
    #[test]
    fn the_relative_tolerance_decides_above_the_noise_floor() {
        for (off, pass) in [(1e-8, true), (-1e-8, true), (1e-5, false), (-1e-5, false)] {
            let factor = 2.0 * (1.0 + off);
            let r = check(be(), &[small_x()], 5, |_, v| {
                square_with_derivative(&v[0], factor)
            })
            .unwrap();
            let c = &r.inputs[0];
            assert!(c.abs_error > 10.0 * c.noise_floor, "{off}: {c:?}");
            // The central difference of a quadratic is exact up to rounding.
            assert!((c.rel_error / off.abs() - 1.0).abs() < 1e-3, "{off}: {c:?}");
            assert_eq!(c.passed, pass, "{off}: {c:?}");
        }
    }

    /// The noise floor is proportional to the function's value: scaling the
    /// function by 2^20 (exact in binary) scales the floor by exactly 2^20.
    #[test]
    fn the_noise_floor_scales_with_the_function_value() {
        let run = |s: f64| {
            check(be(), &[small_x()], 2, |_, v| v[0].square()?.scale(s))
                .unwrap()
                .inputs[0]
                .clone()
        };
        let (one, big) = (run(1.0), run(1048576.0));
        assert!(one.noise_floor > 0.0, "{one:?}");
        assert_eq!(
            big.noise_floor,
            one.noise_floor * 1048576.0,
            "{one:?} {big:?}"
        );
        assert!(one.passed && big.passed, "{one:?} {big:?}");
    }

    /// A function that is zero everywhere: every estimate and the floor are
    /// 0, and the relative error is 0 (not 0 / 0).
    #[test]
    fn an_identically_zero_function_passes_with_zero_error() {
        let r = check(be(), &[small_x()], 3, |_, v| v[0].scale(0.0)).unwrap();
        let c = &r.inputs[0];
        assert_eq!(
            (c.analytic, c.numeric, c.noise_floor),
            (0.0, 0.0, 0.0),
            "{c:?}"
        );
        assert_eq!(c.rel_error, 0.0, "{c:?}");
        assert_eq!(c.abs_error, 0.0, "{c:?}");
        assert!(c.passed && r.passed(), "{c:?}");
    }

    #[test]
    fn a_wrong_backward_is_rejected() {
        let x = Tensor::from_vec(&[2, 3], vec![0.3, -1.2, 0.7, 2.0, -0.4, 1.1]).unwrap();
        let report = check(be(), &[x], 1, |_, v| wrong_square(&v[0])).unwrap();
        assert!(
            !report.passed(),
            "a 3x instead of 2x derivative must fail: {report:?}"
        );
        // The relative error of 3x vs 2x along any direction is 1/3.
        assert!((report.max_rel_error() - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn a_right_backward_is_accepted() {
        let x = Tensor::from_vec(&[2, 3], vec![0.3, -1.2, 0.7, 2.0, -0.4, 1.1]).unwrap();
        let report = check(be(), &[x], 1, |_, v| v[0].square()).unwrap();
        assert!(report.passed(), "{report:?}");
        assert!(report.max_rel_error() < 1e-8);
    }

    #[test]
    fn a_missing_gradient_is_rejected() {
        // Dropping the gradient of the second operand of a product.
        let a = Tensor::from_vec(&[3], vec![0.5, 1.5, -2.0]).unwrap();
        let b = Tensor::from_vec(&[3], vec![1.0, -0.5, 0.25]).unwrap();
        let report = check(be(), &[a, b], 3, |_, v| {
            let y = v[0].backend().binary(
                crate::backend::Binary::Mul,
                v[0].value(),
                v[1].value(),
                &[3],
            )?;
            let bv = v[1].value().clone();
            v[0].tape().record(&[&v[0], &v[1]], y, move |be, g, _| {
                Ok(vec![
                    Some(be.binary(crate::backend::Binary::Mul, &g, &bv, &[3])?),
                    None,
                ])
            })
        })
        .unwrap();
        assert!(report.inputs[0].passed);
        assert!(!report.inputs[1].passed);
    }
}
