//! The correctness oracle: reverse-mode gradients against central finite
//! differences, in f64.
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
use crate::error::{Error, Result};
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
    pub input: usize,
    pub analytic: f64,
    pub numeric: f64,
    pub rel_error: f64,
    pub abs_error: f64,
    pub noise_floor: f64,
    pub passed: bool,
}

/// The result of checking every input of a function.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub inputs: Vec<InputCheck>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.inputs.iter().all(|c| c.passed)
    }
    pub fn max_rel_error(&self) -> f64 {
        self.inputs.iter().map(|c| c.rel_error).fold(0.0, f64::max)
    }
    /// Error unless every input passed; the message names the worst input.
    pub fn ensure(&self, what: &str) -> Result<()> {
        match self.inputs.iter().find(|c| !c.passed) {
            None => Ok(()),
            Some(c) => Err(Error::Autograd(format!(
                "gradient check of {what} failed for input {}: analytic {:e}, numeric {:e}, rel error {:e}",
                c.input, c.analytic, c.numeric, c.rel_error
            ))),
        }
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
        let y = x
            .backend()
            .unary(crate::backend::Unary::Square, x.value())?;
        let xv = x.value().clone();
        x.tape().record(&[x], y, move |be, g, _| {
            let d = be.unary(crate::backend::Unary::Scale(3.0), &xv)?;
            let gx = be.binary(crate::backend::Binary::Mul, g, &d, g.shape())?;
            Ok(vec![Some(gx)])
        })
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
        assert!(report.ensure("wrong_square").is_err());
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
                    Some(be.binary(crate::backend::Binary::Mul, g, &bv, &[3])?),
                    None,
                ])
            })
        })
        .unwrap();
        assert!(report.inputs[0].passed);
        assert!(!report.inputs[1].passed);
    }
}

/// One row of the CLI's gradient-check table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SuiteRow {
    pub op: String,
    pub cases: usize,
    pub max_rel_error: f64,
    pub passed: bool,
}

/// Differentiated inputs and constants (masks, targets) of one case.
pub type CaseData = (Vec<Tensor<f64>>, Vec<Tensor<f64>>);

/// A named function to check: builds inputs and constants from a random
/// stream, then the graph from leaf variables and the constants.
pub struct SuiteCase {
    pub name: &'static str,
    pub inputs: Box<dyn Fn(&mut PhiloxStream) -> CaseData>,
    #[allow(clippy::type_complexity)]
    pub graph: Box<dyn Fn(&Tape<f64>, &[Var<f64>], &[Tensor<f64>]) -> Result<Var<f64>>>,
}

fn dim(rng: &mut PhiloxStream, lo: usize, hi: usize) -> usize {
    lo + (rng.next_u32() as usize) % (hi - lo + 1)
}

fn rand_tensor(rng: &mut PhiloxStream, shape: &[usize], lo: f64, hi: f64) -> Tensor<f64> {
    Tensor::from_fn(shape, |_| rng.uniform(lo, hi)).expect("small shape")
}

/// Values with |x| in [0.1, 2], away from the kinks of ReLU and |x|.
fn rand_off_zero(rng: &mut PhiloxStream, shape: &[usize]) -> Tensor<f64> {
    Tensor::from_fn(shape, |_| {
        let m = rng.uniform(0.1, 2.0);
        if rng.next_u32() & 1 == 0 { m } else { -m }
    })
    .expect("small shape")
}

fn rand_shape(rng: &mut PhiloxStream, max_rank: usize, max_dim: usize) -> Vec<usize> {
    let r = dim(rng, 1, max_rank);
    (0..r).map(|_| dim(rng, 1, max_dim)).collect()
}

fn rand_any(
    rng: &mut PhiloxStream,
    max_rank: usize,
    max_dim: usize,
    lo: f64,
    hi: f64,
) -> Tensor<f64> {
    let s = rand_shape(rng, max_rank, max_dim);
    rand_tensor(rng, &s, lo, hi)
}

/// The engine's ops, each on random small shapes.
pub fn op_cases() -> Vec<Box<dyn Checkable>> {
    use crate::backend::{InputMask, Unary};
    use crate::ops::Conv2dOptions;
    let conv = |mask: u32| {
        move |rng: &mut PhiloxStream| {
            let (n, ci, co) = (dim(rng, 1, 2), dim(rng, 1, 4), dim(rng, 1, 4));
            let (h, w) = (dim(rng, 3, 6), dim(rng, 3, 6));
            let v = vec![
                rand_tensor(rng, &[n, ci, h, w], -2.0, 2.0),
                rand_tensor(rng, &[co, ci, 3, 3], -1.0, 1.0),
                rand_tensor(rng, &[co], -1.0, 1.0),
            ];
            let m = match mask {
                1 => Tensor::from_fn(&[n, h, w], |_| (rng.next_u32() & 1) as f64),
                2 => Tensor::from_fn(&[n, ci], |_| (rng.next_u32() & 1) as f64),
                _ => Tensor::zeros(&[1]),
            };
            (v, vec![m.expect("small shape")])
        }
    };
    let conv_graph = |relu: bool, mask: u32| {
        move |_: &Tape<f64>, v: &[Var<f64>], c: &[Tensor<f64>]| {
            let m = c[0].clone();
            let mask = match mask {
                1 => Some(InputMask::Spatial(m)),
                2 => Some(InputMask::Channel(m)),
                _ => None,
            };
            let opts = Conv2dOptions {
                padding: [1, 1],
                mask,
                relu,
                ..Default::default()
            };
            v[0].conv2d(&v[1], Some(&v[2]), &opts)
        }
    };
    let unary = |op: Unary, lo: f64, hi: f64| SuiteCase {
        name: match op {
            Unary::Exp => "exp",
            Unary::Ln => "ln",
            Unary::Sqrt => "sqrt",
            Unary::Recip => "recip",
            Unary::Square => "square",
            Unary::Neg => "neg",
            Unary::Scale(_) => "scale",
            Unary::AddScalar(_) => "add_scalar",
            Unary::Relu => "relu",
            Unary::Abs => "abs",
        },
        inputs: Box::new(move |rng| {
            let s = rand_shape(rng, 4, 4);
            let x = if matches!(op, Unary::Relu | Unary::Abs) {
                rand_off_zero(rng, &s)
            } else {
                rand_tensor(rng, &s, lo, hi)
            };
            (vec![x], vec![])
        }),
        graph: Box::new(move |_, v, _| v[0].unary(op)),
    };
    let binary = |name: &'static str, f: fn(&Var<f64>, &Var<f64>) -> Result<Var<f64>>| SuiteCase {
        name,
        inputs: Box::new(|rng| {
            let s = rand_shape(rng, 4, 3);
            let sb: Vec<usize> = s
                .iter()
                .map(|&d| if rng.next_u32() & 1 == 0 { 1 } else { d })
                .collect();
            (
                vec![
                    rand_tensor(rng, &s, -2.0, 2.0),
                    rand_tensor(rng, &sb, 0.3, 2.0),
                ],
                vec![],
            )
        }),
        graph: Box::new(move |_, v, _| f(&v[0], &v[1])),
    };
    let cases: Vec<SuiteCase> = vec![
        SuiteCase {
            name: "conv2d",
            inputs: Box::new(conv(0)),
            graph: Box::new(conv_graph(false, 0)),
        },
        SuiteCase {
            name: "conv2d+spatial_mask",
            inputs: Box::new(conv(1)),
            graph: Box::new(conv_graph(false, 1)),
        },
        SuiteCase {
            name: "conv2d+channel_mask",
            inputs: Box::new(conv(2)),
            graph: Box::new(conv_graph(false, 2)),
        },
        SuiteCase {
            name: "conv2d_1x1_stride2",
            inputs: Box::new(|rng| {
                let (n, ci, co) = (dim(rng, 1, 2), dim(rng, 1, 5), dim(rng, 1, 5));
                let (h, w) = (dim(rng, 1, 7), dim(rng, 1, 7));
                let v = vec![
                    rand_tensor(rng, &[n, ci, h, w], -2.0, 2.0),
                    rand_tensor(rng, &[co, ci, 1, 1], -1.0, 1.0),
                    rand_tensor(rng, &[co], -1.0, 1.0),
                ];
                (v, vec![])
            }),
            graph: Box::new(|_, v, _| {
                v[0].conv2d(
                    &v[1],
                    Some(&v[2]),
                    &Conv2dOptions::default().with_stride([2, 2]),
                )
            }),
        },
        unary(Unary::Relu, 0.0, 0.0),
        unary(Unary::Abs, 0.0, 0.0),
        unary(Unary::Exp, -2.0, 2.0),
        unary(Unary::Ln, 0.2, 3.0),
        unary(Unary::Sqrt, 0.2, 3.0),
        unary(Unary::Recip, 0.2, 3.0),
        unary(Unary::Square, -2.0, 2.0),
        unary(Unary::Scale(-0.7), -2.0, 2.0),
        binary("add", |a, b| a.add(b)),
        binary("sub", |a, b| a.sub(b)),
        binary("mul", |a, b| a.mul(b)),
        binary("div", |a, b| a.div(b)),
        SuiteCase {
            name: "mask_mul",
            inputs: Box::new(|rng| {
                let (n, c, h, w) = (
                    dim(rng, 1, 2),
                    dim(rng, 1, 4),
                    dim(rng, 1, 4),
                    dim(rng, 1, 4),
                );
                (
                    vec![rand_tensor(rng, &[n, c, h, w], -2.0, 2.0)],
                    vec![rand_tensor(rng, &[n, h, w], -1.0, 1.0)],
                )
            }),
            graph: Box::new(|_, v, c| v[0].mask_mul(&InputMask::Spatial(c[0].clone()))),
        },
        SuiteCase {
            name: "sum",
            inputs: Box::new(|rng| (vec![rand_any(rng, 4, 4, -2.0, 2.0)], vec![])),
            graph: Box::new(|_, v, _| {
                let r = v[0].value().rank();
                v[0].sum(&[r - 1], true)
            }),
        },
        SuiteCase {
            name: "mean",
            inputs: Box::new(|rng| (vec![rand_any(rng, 4, 4, -2.0, 2.0)], vec![])),
            graph: Box::new(|_, v, _| v[0].mean(&[0], false)),
        },
        SuiteCase {
            name: "softmax",
            inputs: Box::new(|rng| (vec![rand_any(rng, 4, 5, -3.0, 3.0)], vec![])),
            graph: Box::new(|_, v, _| v[0].softmax(v[0].value().rank() - 1)),
        },
        SuiteCase {
            name: "narrow",
            inputs: Box::new(|rng| {
                let mut s = rand_shape(rng, 3, 4);
                s[0] += 1;
                (vec![rand_tensor(rng, &s, -2.0, 2.0)], vec![])
            }),
            graph: Box::new(|_, v, _| v[0].narrow(0, 1, 1)),
        },
        SuiteCase {
            name: "sq_err_sum",
            inputs: Box::new(|rng| {
                let s = rand_shape(rng, 4, 4);
                (
                    vec![rand_tensor(rng, &s, -2.0, 2.0)],
                    vec![rand_tensor(rng, &s, -2.0, 2.0)],
                )
            }),
            graph: Box::new(|t, v, c| v[0].sq_err_sum(&t.constant(c[0].clone()))),
        },
        SuiteCase {
            name: "weighted_pair_sq_err",
            inputs: Box::new(|rng| {
                let s = rand_shape(rng, 4, 4);
                let v = vec![
                    rand_tensor(rng, &s, -2.0, 2.0),
                    rand_tensor(rng, &s, -2.0, 2.0),
                    Tensor::scalar(rng.uniform(-1.5, 1.5)),
                    Tensor::scalar(rng.uniform(-1.5, 1.5)),
                    rand_tensor(rng, &s, -2.0, 2.0),
                ];
                (v, vec![])
            }),
            graph: Box::new(|_, v, _| v[0].weighted_pair_sq_err(&v[1], &v[2], &v[3], &v[4])),
        },
    ];
    cases
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Checkable>)
        .collect()
}

/// Something the suite can check on random data: an op or a whole loss.
pub trait Checkable {
    fn name(&self) -> &str;
    /// One random check; `None` when the drawn case had to be skipped
    /// (a kink within reach of the finite-difference step).
    fn check_once(
        &self,
        backend: BackendRef<f64>,
        rng: &mut PhiloxStream,
    ) -> Result<Option<Report>>;
}

impl Checkable for SuiteCase {
    fn name(&self) -> &str {
        self.name
    }
    fn check_once(
        &self,
        backend: BackendRef<f64>,
        rng: &mut PhiloxStream,
    ) -> Result<Option<Report>> {
        let (inputs, consts) = (self.inputs)(rng);
        let seed = rng.next_u32() as u64;
        check(backend, &inputs, seed, |t, v| (self.graph)(t, v, &consts)).map(Some)
    }
}

/// Run each case `cases` times on random inputs and summarise per op.
pub fn run_suite(
    backend: BackendRef<f64>,
    suite: &[Box<dyn Checkable>],
    cases: usize,
    seed: u64,
) -> Result<Vec<SuiteRow>> {
    let mut rows = Vec::with_capacity(suite.len());
    for (k, case) in suite.iter().enumerate() {
        let mut rng = PhiloxStream::new(seed, k as u32);
        let (mut worst, mut passed, mut done) = (0.0f64, true, 0);
        // Skipped draws are redrawn, up to a bound.
        for _ in 0..cases * 4 {
            if done == cases {
                break;
            }
            if let Some(report) = case.check_once(backend.clone(), &mut rng)? {
                worst = worst.max(report.max_rel_error());
                passed &= report.passed();
                done += 1;
            }
        }
        rows.push(SuiteRow {
            op: case.name().to_string(),
            cases: done,
            max_rel_error: worst,
            passed: passed && done > 0,
        });
    }
    Ok(rows)
}

// ---- whole-loss checks ------------------------------------------------------

use crate::distill::{Config, EvalOptions, LevelConfig, MaskMode, Method, Problem, TensorMap};

/// The structure of one level of a random loss problem.
#[derive(Clone, Debug, PartialEq)]
pub struct LossLevel {
    pub method: Method,
    pub cs: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub mode: MaskMode,
    pub lambda_s: f64,
    pub lambda_c: f64,
    pub tau: f64,
    pub seed: u64,
}

/// A problem with the given level structure and random data: features in
/// [-2, 2], parameters in [-0.6, 0.6] (LayerNorm scales in [0.5, 1.5]), so
/// every gradient is nonzero (the default init zeroes FGD's last convs and
/// the fusion logits), and for FGD 1 to 3 boxes per image.
pub fn random_problem(levels: &[LossLevel], n: usize, data_seed: u64) -> Result<Problem<f64>> {
    let mut rng = PhiloxStream::new(data_seed, 0);
    let config = Config {
        levels: levels
            .iter()
            .map(|lc| LevelConfig {
                method: lc.method,
                tau: lc.tau,
                lambda_s: lc.lambda_s,
                lambda_c: lc.lambda_c,
                alpha: 0.3,
                mask_mode: lc.mode,
                seed: lc.seed,
                ..LevelConfig::default()
            })
            .collect(),
    };
    let mut tensors = TensorMap::new();
    for (l, lc) in levels.iter().enumerate() {
        tensors.insert(
            format!("p{l}.student"),
            rand_tensor(&mut rng, &[n, lc.cs, lc.h, lc.w], -2.0, 2.0),
        );
        tensors.insert(
            format!("p{l}.teacher"),
            rand_tensor(&mut rng, &[n, lc.c, lc.h, lc.w], -2.0, 2.0),
        );
    }
    if levels.iter().any(|l| l.method == Method::Fgd) {
        tensors.insert(
            "img_shape".into(),
            Tensor::from_vec(&[n, 2], [30.0, 40.0].repeat(n))?,
        );
        for i in 0..n {
            let k = 1 + (rng.next_u32() % 3) as usize;
            let mut b = Vec::with_capacity(4 * k);
            for _ in 0..k {
                let (x1, y1) = (rng.uniform(0.0, 30.0), rng.uniform(0.0, 20.0));
                b.extend([
                    x1,
                    y1,
                    x1 + rng.uniform(1.0, 10.0),
                    y1 + rng.uniform(1.0, 10.0),
                ]);
            }
            tensors.insert(format!("gt_boxes.{i}"), Tensor::from_vec(&[k, 4], b)?);
        }
    }
    let init = EvalOptions {
        init_seed: Some(0),
        allow_extra: false,
    };
    let specs = Problem::new(&config, &tensors, init)?.specs;
    for spec in specs.iter().flatten() {
        let (lo, hi) = if spec.name.ends_with(".1.weight") {
            (0.5, 1.5)
        } else {
            (-0.6, 0.6)
        };
        tensors.insert(
            spec.name.clone(),
            rand_tensor(&mut rng, &spec.shape, lo, hi),
        );
    }
    Problem::new(&config, &tensors, EvalOptions::default())
}

/// The smallest distance of any kinked quantity of the loss to its kink:
/// the ReLU inputs of the generators and GcBlocks, and the arguments of
/// |x| in FGD's student attention and attention-transfer loss.
pub fn kink_distance(p: &Problem<f64>) -> Result<f64> {
    use crate::backend::{InputMask, ReferenceBackend};
    use crate::distill::attention::{channel_attention, spatial_attention};
    use crate::distill::fgd::{channel_add_hidden, spatial_pool};
    use crate::distill::generator::align;
    use crate::distill::params::LevelVars;
    use crate::ops::Conv2dOptions;

    let be: BackendRef<f64> = std::sync::Arc::new(ReferenceBackend);
    let eval = crate::distill::evaluate(be.clone(), p)?;
    let tape = Tape::new(be);
    let mut min = f64::INFINITY;
    let mut see = |v: &Var<f64>| {
        for x in v.value().as_slice() {
            min = min.min(x.abs());
        }
    };
    for (l, lc) in p.config.levels.iter().enumerate() {
        let own = p.specs[l]
            .iter()
            .map(|s| (s.name.clone(), tape.constant(p.params[&s.name].clone())))
            .collect();
        let vars = LevelVars::from_vars(l, own);
        let s = align(&tape.constant(p.students[l].clone()), &vars)?;
        let first = |block: &str, mask: InputMask<f64>| {
            s.conv2d(
                vars.get(&format!("{block}.0.weight"))?,
                Some(vars.get(&format!("{block}.0.bias"))?),
                &Conv2dOptions::same(1).with_mask(mask),
            )
        };
        let out = |name: &str| eval.outputs[&format!("p{l}.{name}")].clone();
        match lc.method {
            Method::Dmkd => {
                see(&first("gen_s", InputMask::Spatial(out("mask_s")))?);
                see(&first("gen_c", InputMask::Channel(out("mask_c")))?);
            }
            Method::Mgd => see(&first("gen", InputMask::Spatial(out("mask_s")))?),
            Method::Fgd => {
                let t = tape.constant(p.teachers[l].clone());
                see(&s);
                see(&spatial_attention(&s, lc.tau)?.sub(&spatial_attention(&t, lc.tau)?)?);
                see(&channel_attention(&s, lc.tau)?.sub(&channel_attention(&t, lc.tau)?)?);
                see(&channel_add_hidden(
                    &spatial_pool(&s, &vars, "s")?,
                    &vars,
                    "s",
                )?);
                see(&channel_add_hidden(
                    &spatial_pool(&t, &vars, "t")?,
                    &vars,
                    "t",
                )?);
            }
        }
    }
    Ok(min)
}

/// Distance from every kink a case must keep; the finite-difference step
/// moves kinked quantities by about `STEP * |J t|`, i.e. ~1e-5.
pub const KINK_MARGIN: f64 = 1e-4;

/// Check every gradient (students and all parameters) of a whole problem.
pub fn check_problem(
    backend: BackendRef<f64>,
    problem: &Problem<f64>,
    seed: u64,
) -> Result<Report> {
    let mut inputs = problem.students.clone();
    inputs.extend(
        problem
            .param_names()
            .iter()
            .map(|n| problem.params[n].clone()),
    );
    let levels = problem.students.len();
    check(backend, &inputs, seed, |tape, v| {
        problem
            .loss_graph(tape, &v[..levels], &v[levels..])
            .map(|(total, _)| total)
    })
}

/// A whole-loss check of one method on random small problems.
pub struct LossCase {
    pub name: &'static str,
    pub method: Method,
}

impl LossCase {
    fn draw(&self, rng: &mut PhiloxStream) -> (Vec<LossLevel>, usize, u64) {
        let dims = [1usize, 2, 3, 5, 7];
        let ratios = [0.0, 0.15, 0.45, 0.65, 0.99];
        let modes = [MaskMode::Topk, MaskMode::Sampled, MaskMode::Random];
        let pick = |rng: &mut PhiloxStream, k: usize| (rng.next_u32() as usize) % k;
        let levels = (0..1 + pick(rng, 2))
            .map(|_| {
                let c = 3 + pick(rng, 6);
                LossLevel {
                    method: self.method,
                    cs: if rng.next_u32() & 1 == 0 {
                        c
                    } else {
                        3 + pick(rng, 6)
                    },
                    c,
                    h: dims[pick(rng, 5)],
                    w: dims[pick(rng, 5)],
                    mode: modes[pick(rng, 3)],
                    lambda_s: ratios[pick(rng, 5)],
                    lambda_c: ratios[pick(rng, 5)],
                    tau: 0.5,
                    seed: (rng.next_u32() as u64) << 32 | rng.next_u32() as u64,
                }
            })
            .collect();
        (levels, 1 + pick(rng, 2), rng.next_u32() as u64)
    }
}

impl Checkable for LossCase {
    fn name(&self) -> &str {
        self.name
    }
    fn check_once(
        &self,
        backend: BackendRef<f64>,
        rng: &mut PhiloxStream,
    ) -> Result<Option<Report>> {
        let (levels, n, data_seed) = self.draw(rng);
        let problem = random_problem(&levels, n, data_seed)?;
        if kink_distance(&problem)? <= KINK_MARGIN {
            return Ok(None);
        }
        check_problem(backend, &problem, data_seed).map(Some)
    }
}

/// Whole-loss checks: DMKD, MGD and FGD.
pub fn loss_cases() -> Vec<Box<dyn Checkable>> {
    vec![
        Box::new(LossCase {
            name: "loss:dmkd",
            method: Method::Dmkd,
        }),
        Box::new(LossCase {
            name: "loss:mgd",
            method: Method::Mgd,
        }),
        Box::new(LossCase {
            name: "loss:fgd",
            method: Method::Fgd,
        }),
    ]
}
