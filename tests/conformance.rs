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
//! Case counts come from `PROPTEST_CASES` (default 24).

mod common;

use common::backends::backends;
use common::cases::{Op, OpCase, conv_cases};
use common::proptest_config as config;
use common::rules::{Rule, norm_rel};
use dmkd::backend::{Backend, BackendFloat, Binary, ConvGeometry, ReferenceBackend, Unary};
use dmkd::distill::{EvalOptions, Evaluation, MaskMode, Method, Problem, TensorMap, evaluate};
use dmkd::gradcheck::{LossLevel, random_problem};
use dmkd::{Float, InputMask, Tensor};
use proptest::prelude::*;
use std::sync::Arc;

/// f32-representable values in `[lo, hi)`, as f64 (so the f32 and f64
/// runs start from the same numbers).
fn values(n: usize, lo: f32, hi: f32) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(lo..hi, n).prop_map(|v| v.into_iter().map(f64::from).collect())
}

fn t64(shape: &[usize], v: Vec<f64>) -> Tensor<f64> {
    Tensor::from_vec(shape, v).unwrap()
}

/// Deterministic values in [-1, 1) on the f32 grid.
fn fill(n: usize, seed: u64) -> Vec<f64> {
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

fn filled(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor<f64> {
    let n = shape.iter().product();
    let v = fill(n, seed)
        .into_iter()
        .map(|u| ((lo + (hi - lo) * (u + 1.0) / 2.0) as f32) as f64)
        .collect();
    t64(shape, v)
}

fn conform_all(cases: &[OpCase]) {
    for c in cases {
        c.conform();
    }
}

// ---- convolutions ----------------------------------------------------------

const CHANNELS: [usize; 7] = [1, 3, 7, 8, 16, 17, 33];

fn conv_case() -> impl Strategy<Value = Vec<OpCase>> {
    let kernels = prop_oneof![
        4 => Just((1usize, 1usize)),
        6 => Just((3, 3)),
        1 => Just((2, 3)),
        1 => Just((5, 5)),
        1 => Just((1, 4)),
    ];
    (
        (
            1usize..=2,
            prop::sample::select(&CHANNELS[..]),
            prop::sample::select(&CHANNELS[..]),
        ),
        (1usize..=9, 1usize..=20),
        kernels,
        (
            prop_oneof![3 => Just(1usize), 1 => Just(2)],
            prop_oneof![3 => Just(1usize), 1 => Just(2), 1 => Just(3)],
        ),
        (0usize..=2, 0usize..=2),
        (0usize..5, any::<bool>(), any::<bool>()),
    )
        .prop_filter(
            "kernel must fit the padded input",
            |&(_, (h, w), (kh, kw), _, (ph, pw), _)| h + 2 * ph >= kh && w + 2 * pw >= kw,
        )
        .prop_flat_map(
            |((n, ci, co), (h, w), (kh, kw), (sh, sw), (ph, pw), (mk, bias, relu))| {
                let geom = ConvGeometry::new(&[n, ci, h, w], &[co, ci, kh, kw], [sh, sw], [ph, pw])
                    .unwrap();
                let mask_len = match mk {
                    1 | 2 => n * h * w,
                    3 | 4 => n * ci,
                    _ => 0,
                };
                // Odd kinds: 0/1 masks (the masked work is skipped); even: real values.
                let mask_vals = if mk % 2 == 1 {
                    prop::collection::vec(prop_oneof![Just(0.0f64), Just(1.0)], mask_len).boxed()
                } else {
                    values(mask_len, -1.5, 1.5).boxed()
                };
                (
                    values(n * ci * h * w, -2.0, 2.0),
                    values(co * ci * kh * kw, -1.0, 1.0),
                    values(co, -1.0, 1.0),
                    values(n * co * geom.oh * geom.ow, -1.0, 1.0),
                    mask_vals,
                    Just((geom, mk, bias, relu)),
                )
            },
        )
        .prop_map(|(x, w, b, dy, m, (geom, mk, bias, relu))| {
            let mask = match mk {
                1 | 2 => Some(InputMask::Spatial(t64(&[geom.n, geom.h, geom.w], m))),
                3 | 4 => Some(InputMask::Channel(t64(&[geom.n, geom.c_in], m))),
                _ => None,
            };
            conv_cases(
                geom,
                t64(&geom.input_shape(), x),
                t64(&geom.weight_shape(), w),
                bias.then(|| t64(&[geom.c_out], b)),
                t64(&geom.output_shape(), dy),
                mask,
                relu,
            )
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn conv_conforms(cases in conv_case()) {
        conform_all(&cases);
    }
}

/// The mask kinds of the fixed rows.
#[derive(Clone, Copy, Debug)]
enum MaskKind {
    None,
    /// 0/1 positions, scattered.
    Spatial01,
    /// Real multipliers per channel.
    ChannelReal,
    /// 0/1 channels: the channel-sparse paths (masked channels skipped).
    Channel01,
    /// A masked block of rows (attention masks come in blobs): whole output
    /// tiles are skipped.
    SpatialBlob,
    SpatialZero,
    SpatialOne,
    SpatialReal,
    ChannelZero,
    ChannelOne,
}

fn mask(kind: MaskKind, n: usize, c: usize, h: usize, w: usize) -> Option<InputMask<f64>> {
    let sp = |f: &dyn Fn(usize) -> f64| {
        Some(InputMask::Spatial(Tensor::from_fn(&[n, h, w], f).unwrap()))
    };
    let ch =
        |f: &dyn Fn(usize) -> f64| Some(InputMask::Channel(Tensor::from_fn(&[n, c], f).unwrap()));
    let f01 = |seed: u64, len: usize, cut: f64| {
        let v = fill(len, seed);
        move |i: usize| f64::from(v[i] > cut)
    };
    match kind {
        MaskKind::None => None,
        MaskKind::Spatial01 => sp(&f01(5, n * h * w, 0.0)),
        MaskKind::ChannelReal => {
            let v = fill(n * c, 6);
            ch(&|i| v[i])
        }
        MaskKind::Channel01 => ch(&f01(7, n * c, 0.2)),
        MaskKind::SpatialBlob => sp(&|i| f64::from((i % (h * w)) / w >= h * 3 / 5)),
        MaskKind::SpatialZero => sp(&|_| 0.0),
        MaskKind::SpatialOne => sp(&|_| 1.0),
        MaskKind::SpatialReal => sp(&|i| ((i * 37) % 11) as f64 / 8.0 - 0.5),
        MaskKind::ChannelZero => ch(&|_| 0.0),
        MaskKind::ChannelOne => ch(&|_| 1.0),
    }
}

/// One conv geometry with deterministic operands, bias and ReLU as given.
#[allow(clippy::too_many_arguments)]
fn fixed_conv(
    (n, ci, h, w): (usize, usize, usize, usize),
    (co, kh, kw): (usize, usize, usize),
    stride: [usize; 2],
    padding: [usize; 2],
    kind: MaskKind,
    bias: bool,
    relu: bool,
    seed: u64,
) -> Vec<OpCase> {
    let geom = ConvGeometry::new(&[n, ci, h, w], &[co, ci, kh, kw], stride, padding).unwrap();
    conv_cases(
        geom,
        filled(&geom.input_shape(), seed, -2.0, 2.0),
        filled(&geom.weight_shape(), seed + 1, -1.0, 1.0),
        bias.then(|| filled(&[co], seed + 2, -1.0, 1.0)),
        filled(&geom.output_shape(), seed + 3, -1.0, 1.0),
        mask(kind, n, ci, h, w),
        relu,
    )
}

/// Shapes the random cases rarely reach: many channels (several k-blocks
/// and row panels), outputs wider than a weight-gradient k-block, the 1x1
/// align conv, a padding larger than the kernel reach, 0/1 channel masks on
/// packed weights, a masked blob of rows.
#[test]
fn conv_larger_shapes_conform() {
    use MaskKind::*;
    for (i, (x, wt, s, p, m)) in [
        ((2, 40, 13, 29), (70, 3, 3), [1, 1], [1, 1], Spatial01),
        ((1, 96, 9, 11), (64, 1, 1), [1, 1], [0, 0], ChannelReal),
        ((1, 5, 3, 300), (9, 3, 3), [1, 1], [1, 1], None),
        ((2, 33, 12, 10), (17, 3, 3), [2, 2], [1, 1], Spatial01),
        ((1, 6, 5, 6), (7, 1, 1), [1, 1], [2, 1], ChannelReal),
        ((1, 3, 1, 1), (4, 3, 3), [1, 1], [1, 1], None),
        ((2, 40, 13, 29), (70, 3, 3), [1, 1], [1, 1], Channel01),
        ((2, 64, 10, 12), (32, 1, 1), [1, 1], [0, 0], Channel01),
        ((2, 40, 13, 29), (70, 3, 3), [1, 1], [1, 1], SpatialBlob),
        ((1, 9, 20, 20), (5, 1, 1), [1, 1], [0, 0], SpatialBlob),
        // Several blocks of Winograd tiles (forward) and of its weight
        // gradient's reduction (more than 256 tiles).
        ((2, 40, 37, 70), (43, 3, 3), [1, 1], [1, 1], None),
        ((2, 24, 45, 50), (27, 3, 3), [1, 1], [1, 1], Spatial01),
        ((1, 36, 30, 41), (39, 3, 3), [1, 1], [1, 1], Channel01),
    ]
    .into_iter()
    .enumerate()
    {
        conform_all(&fixed_conv(x, wt, s, p, m, true, true, i as u64));
    }
}

/// Every 3x3 "same" plane size from 1x1 to 9x9 (partial Winograd tiles on
/// every side), and every mask kind on three shapes, with and without bias
/// and ReLU.
#[test]
fn conv_odd_planes_and_every_mask_kind_conform() {
    use MaskKind::*;
    for h in 1..=9 {
        for w in [1, 2, 3, 4, 5, 7, 8, 9] {
            let (cin, cout) = [(3, 5), (9, 7), (17, 13)][(h + w) % 3];
            let cases = fixed_conv(
                (1 + (h % 2), cin, h, w),
                (cout, 3, 3),
                [1, 1],
                [1, 1],
                None,
                (h + w) % 2 == 0,
                h % 3 == 0,
                (h * 10 + w) as u64,
            );
            conform_all(&cases);
        }
    }
    for kind in [
        Spatial01,
        SpatialZero,
        SpatialOne,
        SpatialReal,
        Channel01,
        ChannelZero,
        ChannelOne,
        ChannelReal,
    ] {
        for (n, cin, cout, h, w) in [(2, 9, 11, 13, 10), (1, 20, 6, 5, 17), (2, 33, 19, 8, 8)] {
            for (bias, relu) in [(true, true), (false, false), (true, false)] {
                let cases = fixed_conv(
                    (n, cin, h, w),
                    (cout, 3, 3),
                    [1, 1],
                    [1, 1],
                    kind,
                    bias,
                    relu,
                    (n + cin + h) as u64,
                );
                conform_all(&cases);
            }
        }
    }
}

/// The conv geometries of the losses and their neighbours, each with no
/// mask, a 0/1 spatial and a 0/1 channel mask, and each bias / ReLU choice.
#[test]
fn conv_loss_geometries_conform() {
    use MaskKind::*;
    for (i, (x, wt, s, p)) in [
        ((2, 5, 7, 6), (4, 3, 3), [1, 1], [1, 1]), // the generators' 3x3 "same" conv
        ((2, 3, 5, 5), (4, 1, 1), [1, 1], [0, 0]), // the align conv
        ((3, 4, 9, 8), (3, 3, 3), [2, 2], [0, 0]), // strided, unpadded
        ((2, 3, 8, 7), (5, 5, 3), [2, 1], [2, 1]), // non-square kernel, mixed stride
        ((2, 6, 4, 4), (3, 1, 1), [2, 2], [0, 0]), // 1x1 with stride
        ((1, 2, 1, 1), (3, 3, 3), [1, 1], [1, 1]), // a single pixel
        ((1, 16, 13, 21), (8, 3, 3), [1, 1], [1, 1]), // a P6-sized plane
    ]
    .into_iter()
    .enumerate()
    {
        for kind in [None, Spatial01, Channel01] {
            for (bias, relu) in [(false, false), (true, false), (true, true)] {
                conform_all(&fixed_conv(x, wt, s, p, kind, bias, relu, 100 + i as u64));
            }
        }
    }
}

// ---- element-wise ops, reductions, layout ---------------------------------

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
            OpCase::new(Op::WeightedPair { wa, wb }, abt.clone(), None),
            OpCase::new(Op::WeightedPairBackward { wa, wb, g }, abt, None),
        ]);
    }
}

/// The CUDA backend's reduction chunk (`backend::cuda::reduce::CHUNK`):
/// lengths past it take the multi-chunk paths.
const DEVICE_CHUNK: usize = 2048;

#[cfg(feature = "cuda")]
const _: () = {
    assert!(DEVICE_CHUNK == dmkd::backend::cuda::reduce::CHUNK);
    assert!(common::rules::DEVICE_SEQ_MAX == dmkd::backend::cuda::reduce::SEQ_MAX);
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
        let (wa, wb, g) = (0.3f32 as f64, 0.7f32 as f64, 0.45f32 as f64);
        cases.push(OpCase::new(Op::SqErrSum, abt[..2].to_vec(), None));
        cases.push(OpCase::new(Op::SqErrBackward(0.7), abt[..2].to_vec(), None));
        cases.push(OpCase::new(Op::WeightedPair { wa, wb }, abt.clone(), None));
        cases.push(OpCase::new(
            Op::WeightedPairBackward { wa, wb, g },
            abt,
            None,
        ));
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

// ---- the whole loss ---------------------------------------------------------

fn level(method: Method, cs: usize, c: usize, hw: (usize, usize), mode: MaskMode) -> LossLevel {
    LossLevel {
        method,
        cs,
        c,
        h: hw.0,
        w: hw.1,
        mode,
        lambda_s: 0.65,
        lambda_c: 0.65,
        tau: 0.5,
        seed: 7,
    }
}

/// The same problem in f32: inputs, parameters and boxes rounded.
fn to_f32(p: &Problem<f64>) -> Problem<f32> {
    let mut t = TensorMap::new();
    for (l, (s, te)) in p.students.iter().zip(&p.teachers).enumerate() {
        t.insert(format!("p{l}.student"), s.cast());
        t.insert(format!("p{l}.teacher"), te.cast());
    }
    for (k, v) in &p.params {
        t.insert(k.clone(), v.cast());
    }
    if let Some(b) = &p.boxes {
        let n = b.img_shape.len();
        let shape: Vec<f32> = b.img_shape.iter().flatten().map(|&v| v as f32).collect();
        t.insert(
            "img_shape".into(),
            Tensor::from_vec(&[n, 2], shape).unwrap(),
        );
        for (i, boxes) in b.per_image.iter().enumerate() {
            let v: Vec<f32> = boxes.iter().flatten().map(|&v| v as f32).collect();
            t.insert(
                format!("gt_boxes.{i}"),
                Tensor::from_vec(&[boxes.len(), 4], v).unwrap(),
            );
        }
    }
    Problem::new(&p.config, &t, EvalOptions::default()).unwrap()
}

/// The largest |gradient| of each output's level, in the reference.
fn level_scale(want: &TensorMap<f64>, name: &str) -> f64 {
    let level = name
        .trim_start_matches("grad.")
        .split('.')
        .next()
        .unwrap_or("");
    want.iter()
        .filter(|(k, _)| k.starts_with(&format!("grad.{level}.")))
        .flat_map(|(_, t)| t.as_slice().iter().map(|v| v.abs()))
        .fold(0.0, f64::max)
}

/// One backend's evaluation against the reference's, output by output:
/// masks identical, everything else norm-wise within `tol(name)`, or, for a
/// gradient, within `tol` times the largest gradient of its level. A
/// gradient whose exact value cancels (zero for FGD's context-conv bias,
/// since softmax ignores a shift; small for the fusion logits and the
/// GcBlock before its LayerNorm, for the same reason) has rounding errors
/// set by the terms it sums, i.e. by its level's gradient scale, not by its
/// own size (as in `tests/golden.rs`).
fn compare_loss<T: Float>(
    what: &str,
    got: &Evaluation<T>,
    want: &Evaluation<T>,
    want64: &TensorMap<f64>,
    tol: impl Fn(&str) -> f64,
) {
    let names: Vec<&String> = want.outputs.keys().collect();
    assert_eq!(
        got.outputs.keys().collect::<Vec<_>>(),
        names,
        "{what}: output names"
    );
    for name in names {
        let (g, w) = (&got.outputs[name], &want.outputs[name]);
        let g64: Vec<f64> = g.as_slice().iter().map(|v| v.as_f64()).collect();
        let w64: Vec<f64> = w.as_slice().iter().map(|v| v.as_f64()).collect();
        if name.contains(".mask_") {
            assert!(g64 == w64, "{what}: {name}: masks differ");
            continue;
        }
        let tol = tol(name);
        let e = norm_rel(&g64, &w64);
        let scale = if name.starts_with("grad.") {
            level_scale(want64, name)
        } else {
            0.0
        };
        let d = g64
            .iter()
            .zip(&w64)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            e <= tol || d <= tol * scale,
            "{what}: {name}: norm-wise error {e:e} > {tol:e}, max |d| {d:e} > {:e}",
            tol * scale
        );
    }
}

/// The whole loss on every backend under test against the reference, in
/// f64 (`1e-12` norm-wise: sums in other orders, ~1e-15) and f32 (`1e-5`, or
/// 3x the reference's own f32 error against f64 where that is larger: the
/// errors compound through two convs, a ReLU and the loss), masks
/// identical, and a second evaluation bit-identical to the first.
fn whole_loss(levels: &[LossLevel], n: usize, seed: u64) {
    let p64 = random_problem(levels, n, seed).unwrap();
    let ref64 = evaluate(Arc::new(ReferenceBackend), &p64).unwrap();
    for s in backends::<f64>() {
        let what = format!("{} f64 {levels:?}", s.name);
        let got = evaluate(s.backend.clone(), &p64).unwrap();
        compare_loss(&what, &got, &ref64, &ref64.outputs, |_| 1e-12);
        let again = evaluate(s.backend.clone(), &p64).unwrap();
        for (name, t) in &got.outputs {
            assert!(
                again.outputs[name].as_slice() == t.as_slice(),
                "{what}: {name} changed on a rerun"
            );
        }
    }
    let p32 = to_f32(&p64);
    let ref32 = evaluate(Arc::new(ReferenceBackend), &p32).unwrap();
    let ref_err = |name: &str| -> f64 {
        let a: Tensor<f64> = ref32.outputs[name].cast();
        norm_rel(a.as_slice(), ref64.outputs[name].as_slice())
    };
    for s in backends::<f32>() {
        let what = format!("{} f32 {levels:?}", s.name);
        let got = evaluate(s.backend.clone(), &p32).unwrap();
        compare_loss(&what, &got, &ref32, &ref64.outputs, |name| {
            1e-5f64.max(3.0 * ref_err(name))
        });
    }
}

#[test]
fn dmkd_loss_conforms_in_every_mask_mode() {
    for (i, mode) in [MaskMode::Topk, MaskMode::Sampled, MaskMode::Random]
        .into_iter()
        .enumerate()
    {
        let levels = [
            level(Method::Dmkd, 5, 6, (5, 7), mode),
            level(Method::Dmkd, 4, 4, (3, 3), mode),
        ];
        whole_loss(&levels, 2, 10 + i as u64);
    }
}

#[test]
fn dmkd_loss_conforms_at_extreme_ratios_and_tiny_planes() {
    let mut a = level(Method::Dmkd, 3, 5, (1, 1), MaskMode::Topk);
    (a.lambda_s, a.lambda_c) = (0.0, 0.99);
    let mut b = level(Method::Dmkd, 6, 6, (2, 7), MaskMode::Sampled);
    (b.lambda_s, b.lambda_c) = (0.99, 0.0);
    whole_loss(&[a, b], 1, 20);
}

#[test]
fn mgd_and_fgd_losses_conform() {
    let levels = [
        level(Method::Mgd, 5, 4, (5, 5), MaskMode::Random),
        level(Method::Fgd, 4, 4, (7, 5), MaskMode::Topk),
    ];
    whole_loss(&levels, 2, 30);
}

#[test]
fn dmkd_loss_conforms_on_a_retinanet_shaped_level() {
    // RetinaNet's P5 plane (25x42 for an 800x1344 input), N = 2, C = 64:
    // long enough sums for the two-pass and block-per-row softmax paths on
    // the device, and for Winograd under `Auto` on the CPU.
    let levels = [level(Method::Dmkd, 64, 64, (25, 42), MaskMode::Topk)];
    whole_loss(&levels, 2, 40);
}

/// The accuracy requirement: on every backend, the f32 loss and every
/// gradient within 1e-4 (norm-wise) of the f64 reference, at 64 channels on
/// the demo preset (measured on the CPU: ~1e-7 direct, ~2e-6 Winograd).
#[test]
fn whole_loss_f32_accuracy_on_every_backend() {
    use dmkd::synthetic::{Preset, inputs};
    let preset = Preset::named("demo").unwrap().with_channels(64, 64);
    let config = preset.config();
    let opts = || EvalOptions {
        init_seed: Some(3),
        allow_extra: false,
    };
    let p64 = Problem::new(&config, &inputs::<f64>(&preset, 7).unwrap(), opts()).unwrap();
    let want = evaluate(Arc::new(ReferenceBackend), &p64).unwrap().outputs;
    let p32 = Problem::new(&config, &inputs::<f32>(&preset, 7).unwrap(), opts()).unwrap();
    for s in backends::<f32>() {
        let got = evaluate(s.backend.clone(), &p32).unwrap().outputs;
        let (mut worst, mut worst_name) = (0.0f64, String::new());
        for (name, e) in &want {
            if name.contains(".mask_") || name.contains(".attn_") {
                continue;
            }
            let a: Tensor<f64> = got[name].cast();
            let r = norm_rel(a.as_slice(), e.as_slice());
            if r > worst {
                (worst, worst_name) = (r, name.clone());
            }
        }
        println!(
            "{}: f32 vs f64 worst norm-wise error {worst_name} {worst:.2e}",
            s.name
        );
        assert!(worst <= 1e-4, "{}: {worst_name} {worst:e}", s.name);
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
