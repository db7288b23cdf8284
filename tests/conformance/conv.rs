//! Convolutions: forward, input, weight and bias gradients, with and
//! without masks (0/1 and real), bias and the fused ReLU.

use dmkd::backend::ConvGeometry;
use dmkd::{InputMask, Tensor};
use proptest::prelude::*;

use super::{conform_all, fill, filled, t64, values};
use crate::common::cases::{OpCase, conv_cases};
use crate::common::proptest_config as config;
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

/// One conv geometry with deterministic operands; the mask kind, bias and
/// ReLU as given.
fn fixed_conv(
    (n, ci, h, w): (usize, usize, usize, usize),
    (co, kh, kw): (usize, usize, usize),
    stride: [usize; 2],
    padding: [usize; 2],
    (kind, bias, relu): (MaskKind, bool, bool),
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
        conform_all(&fixed_conv(x, wt, s, p, (m, true, true), i as u64));
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
                (None, (h + w) % 2 == 0, h % 3 == 0),
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
                    (kind, bias, relu),
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
                conform_all(&fixed_conv(x, wt, s, p, (kind, bias, relu), 100 + i as u64));
            }
        }
    }
}
