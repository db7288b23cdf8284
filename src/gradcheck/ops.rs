//! The op catalogue of `dmkd gradcheck`: every differentiable op of the
//! engine on random small shapes, kept away from kinks, and the suite runner
//! shared with the whole-loss cases (`problems.rs`).

use super::checker::{Report, check};
use crate::autograd::{Tape, Var};
use crate::backend::BackendRef;
use crate::error::Result;
use crate::rng::PhiloxStream;
use crate::tensor::Tensor;

/// One row of the CLI's gradient-check table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SuiteRow {
    /// The op's or loss's name.
    pub op: String,
    /// Random cases checked (skipped draws excluded).
    pub cases: usize,
    /// The worst relative error over the cases.
    pub max_rel_error: f64,
    /// Every case passed, and at least one ran.
    pub passed: bool,
}

/// Differentiated inputs and constants (masks, targets) of one case.
pub type CaseData = (Vec<Tensor<f64>>, Vec<Tensor<f64>>);

/// A named function to check: builds inputs and constants from a random
/// stream, then the graph from leaf variables and the constants.
pub struct SuiteCase {
    /// The op's name in the table.
    pub name: &'static str,
    /// Draws the differentiated inputs and the constants.
    pub inputs: Box<dyn Fn(&mut PhiloxStream) -> CaseData>,
    /// Builds the function from leaf variables and the constants.
    pub graph: Box<GraphFn>,
}

/// The graph of a [`SuiteCase`]: leaf variables and constants to an output.
pub type GraphFn = dyn Fn(&Tape<f64>, &[Var<f64>], &[Tensor<f64>]) -> Result<Var<f64>>;

fn dim(rng: &mut PhiloxStream, lo: usize, hi: usize) -> usize {
    lo + (rng.next_u32() as usize) % (hi - lo + 1)
}

pub(crate) fn rand_tensor(
    rng: &mut PhiloxStream,
    shape: &[usize],
    lo: f64,
    hi: f64,
) -> Tensor<f64> {
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
    op_suite()
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Checkable>)
        .collect()
}

/// The cases of [`op_cases`], with their input draws open to the tests.
fn op_suite() -> Vec<SuiteCase> {
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
    // No ReLU on the conv cases: a random conv output can sit within the
    // step of ReLU's kink. The fused conv + ReLU is checked inside the
    // whole losses (`problems.rs`), whose draws keep clear of every kink.
    let conv_graph = |mask: u32| {
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
    vec![
        SuiteCase {
            name: "conv2d",
            inputs: Box::new(conv(0)),
            graph: Box::new(conv_graph(0)),
        },
        SuiteCase {
            name: "conv2d+spatial_mask",
            inputs: Box::new(conv(1)),
            graph: Box::new(conv_graph(1)),
        },
        SuiteCase {
            name: "conv2d+channel_mask",
            inputs: Box::new(conv(2)),
            graph: Box::new(conv_graph(2)),
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
        SuiteCase {
            name: "add_conv2d+spatial_mask",
            inputs: Box::new(move |rng| {
                let (mut v, c) = conv(1)(rng);
                let (xs, co) = (v[0].shape().to_vec(), v[1].shape()[0]);
                v.push(rand_tensor(rng, &[xs[0], co, xs[2], xs[3]], -2.0, 2.0));
                (v, c)
            }),
            graph: Box::new(|_, v, c| {
                let opts = Conv2dOptions::same(1).with_mask(InputMask::Spatial(c[0].clone()));
                v[3].clone().add_conv2d(&v[0], &v[1], Some(&v[2]), &opts)
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
    ]
}

/// Something the suite can check on random data: an op or a whole loss.
pub trait Checkable {
    /// The name in the table.
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
        for _ in 0..cases.saturating_mul(4) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ReferenceBackend;
    use std::cell::Cell;
    use std::collections::BTreeSet;
    use std::rc::Rc;
    use std::sync::Arc;

    /// Every op of the catalogue runs, passes and is named in the table; a
    /// case dropped from it (or one whose draw no longer fits its graph)
    /// fails here.
    #[test]
    fn every_op_case_runs_and_passes() {
        let rows = run_suite(Arc::new(ReferenceBackend), &op_cases(), 2, 11).unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.op.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv2d",
                "conv2d+spatial_mask",
                "conv2d+channel_mask",
                "conv2d_1x1_stride2",
                "add_conv2d+spatial_mask",
                "relu",
                "abs",
                "exp",
                "ln",
                "sqrt",
                "recip",
                "square",
                "scale",
                "add",
                "sub",
                "mul",
                "div",
                "mask_mul",
                "sum",
                "mean",
                "softmax",
                "narrow",
                "sq_err_sum",
                "weighted_pair_sq_err",
            ]
        );
        for r in &rows {
            assert!(r.passed && r.cases == 2, "{r:?}");
            assert!(r.max_rel_error < crate::gradcheck::RTOL, "{r:?}");
        }
    }

    /// A scripted case: each call takes the next entry, `None` a skipped
    /// draw, `Some((rel_error, passed))` a report; it counts its calls.
    struct Scripted {
        script: Vec<Option<(f64, bool)>>,
        calls: Rc<Cell<usize>>,
    }

    impl Checkable for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn check_once(&self, _: BackendRef<f64>, _: &mut PhiloxStream) -> Result<Option<Report>> {
            let i = self.calls.get();
            self.calls.set(i + 1);
            Ok(
                self.script[i % self.script.len()].map(|(rel_error, passed)| Report {
                    inputs: vec![crate::gradcheck::InputCheck {
                        input: 0,
                        analytic: 1.0,
                        numeric: 1.0,
                        rel_error,
                        abs_error: rel_error,
                        noise_floor: 0.0,
                        passed,
                    }],
                }),
            )
        }
    }

    /// The row of a scripted case run for `cases` cases, and its calls.
    fn run_scripted(script: Vec<Option<(f64, bool)>>, cases: usize) -> (SuiteRow, usize) {
        let calls = Rc::new(Cell::new(0));
        let suite: Vec<Box<dyn Checkable>> = vec![Box::new(Scripted {
            script,
            calls: calls.clone(),
        })];
        let mut rows = run_suite(Arc::new(ReferenceBackend), &suite, cases, 0).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].op, "scripted");
        (rows.remove(0), calls.get())
    }

    /// A row is the worst error over its cases, fails if any case failed or
    /// none ran, counts only the draws that were not skipped, stops once
    /// enough ran, and redraws skipped ones up to four draws per case.
    #[test]
    fn run_suite_summarises_worst_error_failures_and_skips() {
        let ok = |e: f64| Some((e, true));
        let (row, calls) = run_scripted(vec![ok(1e-9), ok(3e-7), ok(2e-8)], 3);
        assert_eq!(
            (row.cases, row.passed, row.max_rel_error, calls),
            (3, true, 3e-7, 3)
        );
        let (row, _) = run_scripted(vec![ok(1e-9), Some((0.5, false)), ok(1e-8)], 3);
        assert_eq!((row.cases, row.passed, row.max_rel_error), (3, false, 0.5));
        // Skipped draws are redrawn and not counted.
        let (row, calls) = run_scripted(vec![None, ok(1e-9), None, None, ok(2e-9)], 2);
        assert_eq!(
            (row.cases, row.passed, row.max_rel_error, calls),
            (2, true, 2e-9, 5)
        );
        // Every draw skipped: four draws per case, none counted, a failure.
        let (row, calls) = run_scripted(vec![None], 3);
        assert_eq!(
            (row.cases, row.passed, row.max_rel_error, calls),
            (0, false, 0.0, 12)
        );
        // Enough passing draws stop the loop.
        let (row, calls) = run_scripted(vec![ok(0.0)], 5);
        assert_eq!((row.cases, row.passed, calls), (5, true, 5));
    }

    /// `dim` draws every value of `lo..=hi` and nothing else.
    #[test]
    fn dims_cover_their_whole_range() {
        let mut rng = PhiloxStream::new(1, 9);
        for (lo, hi) in [(1, 1), (1, 4), (3, 6), (0, 2)] {
            let seen: BTreeSet<usize> = (0..400).map(|_| dim(&mut rng, lo, hi)).collect();
            assert_eq!(seen, (lo..=hi).collect(), "{lo}..={hi}");
        }
        let shapes: Vec<Vec<usize>> = (0..400).map(|_| rand_shape(&mut rng, 3, 4)).collect();
        let ranks: BTreeSet<usize> = shapes.iter().map(Vec::len).collect();
        let dims: BTreeSet<usize> = shapes.iter().flatten().copied().collect();
        assert_eq!(ranks, (1..=3).collect());
        assert_eq!(dims, (1..=4).collect());
    }

    /// Values for ReLU and |x| keep |x| in [0.1, 2] and take both signs.
    #[test]
    fn off_zero_values_take_both_signs_away_from_the_kink() {
        let mut rng = PhiloxStream::new(2, 9);
        let x = rand_off_zero(&mut rng, &[400]);
        assert!(x.as_slice().iter().all(|v| (0.1..=2.0).contains(&v.abs())));
        let neg = x.as_slice().iter().filter(|v| **v < 0.0).count();
        assert!((120..280).contains(&neg), "{neg} of 400 negative");
        let b = rand_any(&mut rng, 2, 3, 5.0, 6.0);
        assert!(b.as_slice().iter().all(|v| (5.0..6.0).contains(v)));
    }

    /// The 3x3 convs keep the image size (padding 1), and the masked ones
    /// apply their mask: the same draw with every mask value set to 1 gives
    /// another output.
    #[test]
    fn conv_cases_pad_and_apply_their_masks() {
        let suite = op_suite();
        let be: BackendRef<f64> = Arc::new(ReferenceBackend);
        for (k, case) in suite.iter().enumerate().take(3) {
            let mut rng = PhiloxStream::new(4, k as u32);
            let (v, c) = (case.inputs)(&mut rng);
            let run = |c: &[Tensor<f64>]| {
                let tape = Tape::new(be.clone());
                let vars: Vec<Var<f64>> = v.iter().map(|x| tape.leaf(x.clone())).collect();
                (case.graph)(&tape, &vars, c).unwrap().value().clone()
            };
            let y = run(&c);
            let (x, w) = (v[0].shape(), v[1].shape());
            assert_eq!(y.shape(), &[x[0], w[0], x[2], x[3]], "{}", case.name);
            if k > 0 {
                let ones = Tensor::from_fn(c[0].shape(), |_| 1.0).unwrap();
                assert!(
                    c[0].as_slice().contains(&0.0),
                    "{}: no zero drawn",
                    case.name
                );
                assert_ne!(run(&[ones]).as_slice(), y.as_slice(), "{}", case.name);
            }
        }
    }

    /// Binary ops draw their second operand sometimes broadcast (a dim of 1
    /// against a longer one) and sometimes of the full shape.
    #[test]
    fn binary_cases_draw_broadcast_and_full_operands() {
        let suite = op_suite();
        let add = suite.iter().find(|c| c.name == "add").unwrap();
        let mut rng = PhiloxStream::new(5, 0);
        let (mut broadcast, mut full) = (0, 0);
        for _ in 0..60 {
            let (v, _) = (add.inputs)(&mut rng);
            let (a, b) = (v[0].shape(), v[1].shape());
            assert_eq!(a.len(), b.len());
            assert!(a.iter().zip(b).all(|(x, y)| y == x || *y == 1));
            if a.iter().zip(b).any(|(x, y)| x != y) {
                broadcast += 1;
            } else if a.iter().any(|&x| x > 1) {
                full += 1;
            }
        }
        assert!(
            broadcast > 5 && full > 5,
            "{broadcast} broadcast, {full} full"
        );
    }

    /// The masked convs draw masks of zeros and ones with both present, in
    /// the mask's own shape (spatial `[n, h, w]`, channel `[n, c_in]`); the
    /// plain conv's placeholder is one element.
    #[test]
    fn conv_cases_draw_binary_masks_of_their_kind() {
        let suite = op_suite();
        for (k, want_rank) in [(1usize, 3usize), (2, 2)] {
            let mut rng = PhiloxStream::new(3, k as u32);
            let (mut zeros, mut ones) = (0, 0);
            for _ in 0..20 {
                let (v, c) = (suite[k].inputs)(&mut rng);
                let x = v[0].shape();
                let m = &c[0];
                assert_eq!(m.rank(), want_rank, "{}", suite[k].name);
                let want: Vec<usize> = if want_rank == 3 {
                    vec![x[0], x[2], x[3]]
                } else {
                    vec![x[0], x[1]]
                };
                assert_eq!(m.shape(), &want[..], "{}", suite[k].name);
                zeros += m.as_slice().iter().filter(|v| **v == 0.0).count();
                ones += m.as_slice().iter().filter(|v| **v == 1.0).count();
                assert!(m.as_slice().iter().all(|v| *v == 0.0 || *v == 1.0));
            }
            assert!(
                zeros > 0 && ones > 0,
                "{}: {zeros} zeros, {ones} ones",
                suite[k].name
            );
        }
        let mut rng = PhiloxStream::new(3, 0);
        assert_eq!((suite[0].inputs)(&mut rng).1[0].numel(), 1);
    }
}
