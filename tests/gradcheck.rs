//! The oracle, op by op: reverse-mode gradients against central finite
//! differences in f64, over proptest-generated shapes, strides, paddings
//! and values, on every backend (`tests/common/backends.rs`).
//!
//! Tolerance: `dmkd::gradcheck::RTOL` = 1e-6 relative, with the central
//! difference step `h = eps^(1/3)`; the reasoning is in `src/gradcheck/checker.rs`.
//! Inputs are kept away from kinks (ReLU and |x| at 0) so that a finite
//! difference never straddles one: a difference across a kink measures the
//! kink, not the derivative.
//!
//! Case counts come from `PROPTEST_CASES` (default 24 per property here),
//! sized so the suite runs in seconds in release mode on 2 cores.

use crate::common;

use std::sync::Arc;

use common::backends::all_backends;
use common::proptest_config as config;
use dmkd::backend::{Binary, ReferenceBackend, Unary};
use dmkd::gradcheck::check;
use dmkd::{Conv2dOptions, InputMask, Result, Tape, Tensor, Var};
use proptest::prelude::*;

/// Run the check on every backend (`tests/common/backends.rs`, the
/// reference included) and fail the property on any miss.
fn assert_grads<F>(
    inputs: &[Tensor<f64>],
    seed: u64,
    f: F,
) -> std::result::Result<(), TestCaseError>
where
    F: Fn(&Tape<f64>, &[Var<f64>]) -> Result<Var<f64>>,
{
    for s in all_backends::<f64>() {
        let report =
            check(s.backend, inputs, seed, &f).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(report.passed(), "{}: {report:#?}", s.name);
    }
    Ok(())
}

fn tensor(shape: Vec<usize>, lo: f64, hi: f64) -> impl Strategy<Value = Tensor<f64>> {
    let n: usize = shape.iter().product();
    prop::collection::vec(lo..hi, n).prop_map(move |v| Tensor::from_vec(&shape, v).unwrap())
}

/// Values with |x| in [0.1, 2]: away from the kinks of ReLU and |x|.
fn tensor_off_zero(shape: Vec<usize>) -> impl Strategy<Value = Tensor<f64>> {
    let n: usize = shape.iter().product();
    prop::collection::vec((0.1f64..2.0, any::<bool>()), n).prop_map(move |v| {
        let data = v.into_iter().map(|(m, s)| if s { m } else { -m }).collect();
        Tensor::from_vec(&shape, data).unwrap()
    })
}

fn shape(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=max_dim, 1..=max_rank)
}

/// A 0/1 mask, or a real-valued one (the masking multiply takes any multiplier).
fn mask_values(n: usize) -> impl Strategy<Value = Vec<f64>> {
    prop_oneof![
        prop::collection::vec(prop_oneof![Just(0.0), Just(1.0)], n),
        prop::collection::vec(-1.5f64..1.5, n),
    ]
}

#[derive(Clone, Debug)]
struct ConvCase {
    x: Tensor<f64>,
    w: Tensor<f64>,
    b: Option<Tensor<f64>>,
    stride: [usize; 2],
    padding: [usize; 2],
    mask: Option<InputMask<f64>>,
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        (1usize..=2, 1usize..=4, 1usize..=4, 1usize..=6, 1usize..=6),
        (1usize..=3, 1usize..=3, 1usize..=2, 1usize..=2),
        (0usize..=2, 0usize..=2, 0usize..3, any::<bool>()),
    )
        .prop_filter(
            "kernel must fit the padded input",
            |&((_, _, _, h, w), (kh, kw, _, _), (ph, pw, _, _))| {
                h + 2 * ph >= kh && w + 2 * pw >= kw
            },
        )
        .prop_flat_map(
            |((n, ci, co, h, w), (kh, kw, sh, sw), (ph, pw, mask_kind, bias))| {
                let mask_len = match mask_kind {
                    1 => n * h * w,
                    2 => n * ci,
                    _ => 0,
                };
                (
                    tensor(vec![n, ci, h, w], -2.0, 2.0),
                    tensor(vec![co, ci, kh, kw], -1.0, 1.0),
                    tensor(vec![co], -1.0, 1.0),
                    mask_values(mask_len),
                    Just((n, ci, h, w, [sh, sw], [ph, pw], mask_kind, bias)),
                )
            },
        )
        .prop_map(
            |(x, w, b, m, (n, ci, h, ww, stride, padding, kind, bias))| {
                let mask = match kind {
                    1 => Some(InputMask::Spatial(
                        Tensor::from_vec(&[n, h, ww], m).unwrap(),
                    )),
                    2 => Some(InputMask::Channel(Tensor::from_vec(&[n, ci], m).unwrap())),
                    _ => None,
                };
                ConvCase {
                    x,
                    w,
                    b: bias.then_some(b),
                    stride,
                    padding,
                    mask,
                }
            },
        )
}

impl ConvCase {
    fn opts(&self, relu: bool) -> Conv2dOptions<f64> {
        Conv2dOptions {
            stride: self.stride,
            padding: self.padding,
            mask: self.mask.clone(),
            relu,
        }
    }
    fn inputs(&self) -> Vec<Tensor<f64>> {
        let mut v = vec![self.x.clone(), self.w.clone()];
        v.extend(self.b.clone());
        v
    }
    /// The pre-activation, computed on the reference backend.
    fn pre_activation(&self) -> Tensor<f64> {
        let tape = Tape::new(Arc::new(ReferenceBackend));
        let x = tape.constant(self.x.clone());
        let w = tape.constant(self.w.clone());
        let b = self.b.clone().map(|b| tape.constant(b));
        x.conv2d(&w, b.as_ref(), &self.opts(false))
            .unwrap()
            .value()
            .clone()
    }
}

fn apply_conv(v: &[Var<f64>], opts: &Conv2dOptions<f64>) -> Result<Var<f64>> {
    v[0].conv2d(&v[1], v.get(2), opts)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn conv2d(case in conv_case()) {
        let opts = case.opts(false);
        assert_grads(&case.inputs(), 11, |_, v| apply_conv(v, &opts))?;
    }

    #[test]
    fn conv2d_with_fused_relu(case in conv_case()) {
        // Skip cases with a pre-activation within 1e-3 of the ReLU kink: the
        // finite-difference step moves it by ~1e-5 at most.
        prop_assume!(case.pre_activation().as_slice().iter().all(|z| z.abs() > 1e-3));
        let opts = case.opts(true);
        assert_grads(&case.inputs(), 12, |_, v| apply_conv(v, &opts))?;
    }

    #[test]
    fn unary_smooth(
        x in shape(4, 4).prop_flat_map(|s| tensor(s, 0.2, 3.0)),
        c in -3.0f64..3.0,
    ) {
        // Positive inputs keep ln, sqrt and recip in their domains. Every op
        // in every case (they are cheap): one op drawn per case left a given
        // op unchecked in a run with probability (7/8)^cases.
        for op in [
            Unary::Exp, Unary::Ln, Unary::Sqrt, Unary::Recip, Unary::Square,
            Unary::Neg, Unary::Scale(c), Unary::AddScalar(c),
        ] {
            assert_grads(std::slice::from_ref(&x), 13, |_, v| v[0].unary(op))?;
        }
    }

    #[test]
    fn relu_and_abs(x in shape(4, 4).prop_flat_map(tensor_off_zero)) {
        for op in [Unary::Relu, Unary::Abs] {
            assert_grads(std::slice::from_ref(&x), 14, |_, v| v[0].unary(op))?;
        }
    }

    #[test]
    fn binary_broadcasting(
        (a, b) in (shape(4, 3), 0u32..16, 0usize..3).prop_flat_map(|(s, ones, drop)| {
            // b: a's shape with some dims set to 1 and some leading dims dropped.
            let mut sb: Vec<usize> = s
                .iter()
                .enumerate()
                .map(|(k, &d)| if ones >> k & 1 == 1 { 1 } else { d })
                .collect();
            let d = drop.min(sb.len() - 1);
            sb.drain(..d);
            (tensor(s, -2.0, 2.0), tensor(sb, 0.3, 2.0))
        }),
        swap in any::<bool>(),
    ) {
        // b is positive so it can be a divisor. Every op in every case, as
        // for the unary ops.
        for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
            let inputs = if swap && op != Binary::Div {
                vec![b.clone(), a.clone()]
            } else {
                vec![a.clone(), b.clone()]
            };
            assert_grads(&inputs, 15, |_, v| v[0].binary(op, &v[1]))?;
        }
    }

    #[test]
    fn mask_mul(
        (x, m, spatial) in (1usize..=2, 1usize..=4, 1usize..=4, 1usize..=4, any::<bool>())
            .prop_flat_map(|(n, c, h, w, spatial)| {
                let len = if spatial { n * h * w } else { n * c };
                (tensor(vec![n, c, h, w], -2.0, 2.0), mask_values(len), Just(spatial))
            })
    ) {
        let [n, c, h, w] = x.dims4("t").unwrap();
        let mask = if spatial {
            InputMask::Spatial(Tensor::from_vec(&[n, h, w], m).unwrap())
        } else {
            InputMask::Channel(Tensor::from_vec(&[n, c], m).unwrap())
        };
        assert_grads(&[x], 16, |_, v| v[0].mask_mul(&mask))?;
    }

    #[test]
    fn sum_and_mean(
        (x, axes) in shape(4, 4).prop_flat_map(|s| {
            let r = s.len();
            (tensor(s, -2.0, 2.0), prop::sample::subsequence((0..r).collect::<Vec<_>>(), 0..=r))
        }),
        keepdim in any::<bool>(),
        mean in any::<bool>(),
    ) {
        assert_grads(&[x], 17, |_, v| {
            if mean { v[0].mean(&axes, keepdim) } else { v[0].sum(&axes, keepdim) }
        })?;
    }

    #[test]
    fn softmax(
        (x, axis) in shape(4, 5).prop_flat_map(|s| {
            let r = s.len();
            (tensor(s, -3.0, 3.0), 0..r)
        })
    ) {
        assert_grads(&[x], 18, |_, v| v[0].softmax(axis))?;
    }

    #[test]
    fn reshape_narrow_index(
        (x, axis, start, len) in shape(3, 5).prop_flat_map(|s| {
            let r = s.len();
            (Just(s), 0..r)
        }).prop_flat_map(|(s, axis)| {
            let d = s[axis];
            (0..d).prop_flat_map(move |start| {
                let s = s.clone();
                (tensor(s, -2.0, 2.0), Just(axis), Just(start), 1..=d - start)
            })
        })
    ) {
        assert_grads(std::slice::from_ref(&x), 19, |_, v| {
            let n = v[0].value().numel();
            v[0].narrow(axis, start, len)?.reshape(&[len * n / x.shape()[axis]])
        })?;
        assert_grads(&[x.reshape(&[x.numel()]).unwrap()], 20, |_, v| v[0].index1(start))?;
    }

    #[test]
    fn sq_err_sum(
        (a, b) in shape(4, 4).prop_flat_map(|s| (tensor(s.clone(), -2.0, 2.0), tensor(s, -2.0, 2.0)))
    ) {
        assert_grads(&[a, b], 21, |_, v| v[0].sq_err_sum(&v[1]))?;
    }

    #[test]
    fn weighted_pair_sq_err(
        (a, b, t) in shape(4, 4).prop_flat_map(|s| (
            tensor(s.clone(), -2.0, 2.0), tensor(s.clone(), -2.0, 2.0), tensor(s, -2.0, 2.0),
        )),
        wa in -1.5f64..1.5,
        wb in -1.5f64..1.5,
    ) {
        let (wa, wb) = (Tensor::scalar(wa), Tensor::scalar(wb));
        assert_grads(&[a, b, wa, wb, t], 23, |_, v| {
            v[0].weighted_pair_sq_err(&v[1], &v[2], &v[3], &v[4])
        })?;
    }

    /// The shape of a generation block: conv -> relu -> conv -> squared error.
    #[test]
    fn composite_conv_relu_conv_mse(
        (x, w1, b1, w2, b2, t) in (1usize..=2, 1usize..=4, 1usize..=5, 1usize..=5)
            .prop_flat_map(|(n, c, h, w)| (
                tensor(vec![n, c, h, w], -2.0, 2.0),
                tensor(vec![c, c, 3, 3], -1.0, 1.0),
                tensor(vec![c], -0.5, 0.5),
                tensor(vec![c, c, 3, 3], -1.0, 1.0),
                tensor(vec![c], -0.5, 0.5),
                tensor(vec![n, c, h, w], -2.0, 2.0),
            ))
    ) {
        let pre = {
            let tape = Tape::new(Arc::new(ReferenceBackend));
            let (xv, wv, bv) = (tape.constant(x.clone()), tape.constant(w1.clone()), tape.constant(b1.clone()));
            xv.conv2d(&wv, Some(&bv), &Conv2dOptions::same(1)).unwrap().value().clone()
        };
        prop_assume!(pre.as_slice().iter().all(|z| z.abs() > 1e-3));
        assert_grads(&[x, w1, b1, w2, b2], 22, |tape, v| {
            let h = v[0].conv2d(&v[1], Some(&v[2]), &Conv2dOptions::same(1).with_relu(true))?;
            let y = h.conv2d(&v[3], Some(&v[4]), &Conv2dOptions::same(1))?;
            y.sq_err_sum(&tape.constant(t.clone()))
        })?;
    }
}
