//! Element-wise ops and their derivatives, broadcasting, masking,
//! reductions, softmax, layout and the losses' ops.

use dmkd::backend::{Backend, Binary, ReferenceBackend, Unary};
use dmkd::{InputMask, Tensor};
use proptest::prelude::*;

use super::{conform_all, fill, filled, t64, values};
use crate::common::cases::{Op, OpCase};
use crate::common::proptest_config as config;
fn shape(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=max_dim, 0..=max_rank)
}

fn tensor_pair(lo: f32, hi: f32) -> impl Strategy<Value = (Tensor<f64>, Tensor<f64>)> {
    shape(4, 7).prop_flat_map(move |s| {
        let n = s.iter().product();
        let s2 = s.clone();
        (values(n, lo, hi), values(n, lo, hi)).prop_map(move |(a, b)| (t64(&s2, a), t64(&s2, b)))
    })
}

/// An output shape and two shapes that broadcast to it.
fn broadcast_shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, Vec<usize>)> {
    shape(4, 5).prop_flat_map(|out| {
        let r = out.len();
        (
            Just(out),
            prop::collection::vec(any::<bool>(), r),
            prop::collection::vec(any::<bool>(), r),
            0..=r,
            0..=r,
        )
            .prop_map(|(out, ma, mb, da, db)| {
                let sub = |m: &[bool], drop: usize| -> Vec<usize> {
                    out.iter()
                        .zip(m)
                        .map(|(&d, &one)| if one { 1 } else { d })
                        .skip(drop)
                        .collect()
                };
                let (a, b) = (sub(&ma, da), sub(&mb, db));
                (out, a, b)
            })
    })
}

fn unary_ops() -> impl Strategy<Value = Unary> {
    prop_oneof![
        Just(Unary::Relu),
        Just(Unary::Abs),
        Just(Unary::Neg),
        Just(Unary::Exp),
        Just(Unary::Ln),
        Just(Unary::Sqrt),
        Just(Unary::Recip),
        Just(Unary::Square),
        (-3.0f64..3.0).prop_map(Unary::Scale),
        (-3.0f64..3.0).prop_map(Unary::AddScalar),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn unary_ops_conform(op in unary_ops(), (x, dy) in tensor_pair(-3.0, 3.0)) {
        conform_all(&[
            OpCase::new(Op::Unary(op), vec![x.clone()], None),
            OpCase::new(Op::UnaryBackward(op), vec![x, dy], None),
        ]);
    }

    #[test]
    fn binary_ops_and_broadcasts_conform(
        (out, sa, sb) in broadcast_shapes(),
        op in prop_oneof![Just(Binary::Add), Just(Binary::Sub), Just(Binary::Mul), Just(Binary::Div)],
        seed in any::<u64>(),
    ) {
        let a = t64(&sa, fill(sa.iter().product(), seed));
        let b = t64(&sb, fill(sb.iter().product(), seed ^ 1));
        conform_all(&[
            OpCase::new(Op::Binary(op, out.clone()), vec![a.clone(), b], None),
            OpCase::new(Op::BroadcastTo(out), vec![a], None),
        ]);
    }

    #[test]
    fn mask_mul_conforms(
        (n, c, h, w) in (1usize..=2, 1usize..=9, 1usize..=7, 1usize..=7),
        spatial in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let x = t64(&[n, c, h, w], fill(n * c * h * w, seed));
        let m = if spatial {
            InputMask::Spatial(t64(&[n, h, w], fill(n * h * w, seed ^ 3)))
        } else {
            InputMask::Channel(t64(&[n, c], fill(n * c, seed ^ 3)))
        };
        OpCase::new(Op::MaskMul, vec![x], Some(m)).conform();
    }

    #[test]
    fn sum_axes_conforms(
        (s, axes) in shape(4, 7).prop_flat_map(|s| {
            let r = s.len();
            (Just(s), prop::sample::subsequence((0..r).collect::<Vec<_>>(), 0..=r))
        }),
        seed in any::<u64>(),
    ) {
        let n: usize = s.iter().product();
        OpCase::new(Op::SumAxes(axes), vec![t64(&s, fill(n, seed))], None).conform();
    }

    #[test]
    fn softmax_conforms((s, axis) in shape(4, 6).prop_filter("rank >= 1", |s| !s.is_empty())
        .prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) }),
        seed in any::<u64>(),
    ) {
        let n: usize = s.iter().product();
        let x = t64(&s, fill(n, seed).iter().map(|v| v * 4.0).collect());
        let dy = t64(&s, fill(n, seed ^ 9));
        conform_all(&[
            OpCase::new(Op::Softmax(axis), vec![x.clone()], None),
            OpCase::new(Op::SoftmaxBackward(axis), vec![x, dy], None),
        ]);
    }

    #[test]
    fn narrow_conforms(
        (s, axis, start, len) in shape(4, 6).prop_filter("rank >= 1", |s| !s.is_empty())
            .prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) })
            .prop_flat_map(|(s, a)| { let d = s[a]; (Just(s), Just(a), 0..d) })
            .prop_flat_map(|(s, a, st)| { let d = s[a]; (Just(s), Just(a), Just(st), 1..=d - st) }),
        seed in any::<u64>(),
    ) {
        let n: usize = s.iter().product();
        let x = t64(&s, fill(n, seed));
        let y = ReferenceBackend.narrow(&x, axis, start, len).unwrap();
        conform_all(&[
            OpCase::new(Op::Narrow { axis, start, len }, vec![x], None),
            OpCase::new(Op::NarrowBackward { shape: s, axis, start }, vec![y], None),
        ]);
    }

    #[test]
    fn losses_conform(
        (a, b) in tensor_pair(-2.0, 2.0),
        g in -2.0f32..2.0,
        (wa, wb) in (-1.5f32..1.5, -1.5f32..1.5),
        seed in any::<u64>(),
    ) {
        let (g, wa, wb) = (f64::from(g), f64::from(wa), f64::from(wb));
        let t = t64(a.shape(), fill(a.numel(), seed));
        let abt = vec![a.clone(), b.clone(), t];
        conform_all(&[
            OpCase::new(Op::SqErrSum, vec![a.clone(), b.clone()], None),
            OpCase::new(Op::SqErrBackward(g), vec![a, b], None),
            OpCase::new(Op::WeightedPairResidual { wa, wb }, abt, None),
        ]);
    }
}

/// The CUDA backend's reduction chunk (`backend::cuda::reduce::CHUNK`):
/// lengths past it take the multi-chunk paths.
const DEVICE_CHUNK: usize = 2048;

#[cfg(feature = "cuda")]
const _: () = {
    assert!(DEVICE_CHUNK == dmkd::backend::cuda::reduce::CHUNK);
    assert!(crate::common::rules::DEVICE_SEQ_MAX == dmkd::backend::cuda::reduce::SEQ_MAX);
};

/// Fixed rows: every unary op with its kinks (relu'(0) = 0, sign(0) = 0,
/// -0.0 included), broadcasting pairs, and reductions, softmax rows and
/// losses long enough for the chunked and parallel paths of every backend.
#[test]
fn fixed_elementwise_and_reduction_rows_conform() {
    let shape = [2usize, 3, 4, 5];
    let mut cases = Vec::new();
    for (i, op) in [
        Unary::Relu,
        Unary::Abs,
        Unary::Neg,
        Unary::Exp,
        Unary::Ln,
        Unary::Sqrt,
        Unary::Recip,
        Unary::Square,
        Unary::Scale(0.37),
        Unary::AddScalar(-1.3),
    ]
    .into_iter()
    .enumerate()
    {
        let (lo, hi) = match op {
            Unary::Ln | Unary::Sqrt | Unary::Recip => (0.5, 2.0),
            _ => (-2.0, 2.0),
        };
        let mut x = filled(&shape, i as u64, lo, hi).to_vec();
        if matches!(op, Unary::Relu | Unary::Abs) {
            x[0] = 0.0;
            x[7] = -0.0;
        }
        let x = t64(&shape, x);
        let dy = filled(&shape, 50 + i as u64, -1.0, 1.0);
        cases.push(OpCase::new(Op::Unary(op), vec![x.clone()], None));
        cases.push(OpCase::new(Op::UnaryBackward(op), vec![x, dy], None));
    }
    let pairs: &[(&[usize], &[usize], &[usize])] = &[
        (&[2, 3, 4, 5], &[2, 3, 4, 5], &[2, 3, 4, 5]),
        (&[2, 3, 4, 5], &[1, 3, 1, 1], &[2, 3, 4, 5]),
        (&[4, 5], &[2, 3, 4, 5], &[2, 3, 4, 5]),
        (&[], &[2, 3], &[2, 3]),
        (&[2, 1, 4, 1], &[1, 3, 1, 5], &[2, 3, 4, 5]),
        (&[3, 1], &[1, 4], &[3, 4]),
        (&[], &[], &[]),
    ];
    for (i, &(sa, sb, out)) in pairs.iter().enumerate() {
        for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
            let a = filled(sa, 60 + i as u64, -2.0, 2.0);
            let b = filled(sb, 70 + i as u64, 0.5, 2.0);
            cases.push(OpCase::new(Op::Binary(op, out.to_vec()), vec![a, b], None));
        }
        cases.push(OpCase::new(
            Op::BroadcastTo(out.to_vec()),
            vec![filled(sa, 80 + i as u64, -2.0, 2.0)],
            None,
        ));
    }
    let sums: &[(&[usize], &[usize])] = &[
        (&[2, 3, 4, 5], &[1]),
        (&[2, 3, 4, 5], &[2, 3]),
        (&[2, 3, 4, 5], &[0, 2, 3]),
        (&[2, 3, 4, 5], &[0, 1, 2, 3]),
        (&[2, 3, 4, 5], &[]),
        (&[3, 700], &[1]),                  // past the device's SEQ_MAX
        (&[2, 3 * DEVICE_CHUNK + 5], &[1]), // several chunks per segment
        (&[5000, 3], &[0]),                 // strided long segments
        (&[2, 16, 40, 50], &[0, 2, 3]),     // a bias gradient
        (&[3, 70_001], &[0, 1]),            // the CPU's chunked parallel sums
        (&[3, 70_001], &[1]),
        (&[3, 70_001], &[0]),
    ];
    for (i, &(s, axes)) in sums.iter().enumerate() {
        let x = filled(s, 90 + i as u64, -2.0, 2.0);
        cases.push(OpCase::new(Op::SumAxes(axes.to_vec()), vec![x], None));
    }
    for (i, (s, axis)) in [
        (&[2usize, 3, 4][..], 0usize),
        (&[2, 3, 4], 1),
        (&[2, 3, 4], 2),
        (&[2, 1500], 1),    // a block per row on the device
        (&[3, 1100, 2], 1), // long strided rows
        (&[1], 0),
        (&[2], 0), // the fusion weights
    ]
    .into_iter()
    .enumerate()
    {
        let x = filled(s, 110 + i as u64, -3.0, 3.0);
        let dy = filled(s, 120 + i as u64, -1.0, 1.0);
        cases.push(OpCase::new(Op::Softmax(axis), vec![x.clone()], None));
        cases.push(OpCase::new(Op::SoftmaxBackward(axis), vec![x, dy], None));
    }
    for (i, s) in [
        &[2usize, 3, 4, 5][..],
        &[3 * DEVICE_CHUNK + 7],
        &[1],
        &[3, 70_001],
    ]
    .into_iter()
    .enumerate()
    {
        let abt: Vec<Tensor<f64>> = (0..3)
            .map(|j| filled(s, 130 + 3 * i as u64 + j, -2.0, 2.0))
            .collect();
        let (wa, wb) = (0.3f32 as f64, 0.7f32 as f64);
        cases.push(OpCase::new(Op::SqErrSum, abt[..2].to_vec(), None));
        cases.push(OpCase::new(Op::SqErrBackward(0.7), abt[..2].to_vec(), None));
        cases.push(OpCase::new(Op::WeightedPairResidual { wa, wb }, abt, None));
    }
    for (shape, axis, start, len) in [
        (&[2usize, 5, 3][..], 1usize, 1usize, 3usize),
        (&[2, 5, 3], 0, 1, 1),
        (&[2, 5, 3], 2, 0, 2),
        (&[2], 0, 1, 1),
    ] {
        let x = filled(shape, 140, -2.0, 2.0);
        let y = ReferenceBackend.narrow(&x, axis, start, len).unwrap();
        cases.push(OpCase::new(Op::Narrow { axis, start, len }, vec![x], None));
        cases.push(OpCase::new(
            Op::NarrowBackward {
                shape: shape.to_vec(),
                axis,
                start,
            },
            vec![y],
            None,
        ));
    }
    let x = filled(&shape, 150, -2.0, 2.0);
    for m in [
        InputMask::Spatial(t64(
            &[2, 4, 5],
            fill(40, 151).iter().map(|v| f64::from(*v > 0.3)).collect(),
        )),
        InputMask::Channel(t64(
            &[2, 3],
            fill(6, 152).iter().map(|v| f64::from(*v > 0.3)).collect(),
        )),
    ] {
        cases.push(OpCase::new(Op::MaskMul, vec![x.clone()], Some(m)));
    }
    conform_all(&cases);
}
