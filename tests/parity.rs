//! Parity of every `Backend` method: the fast CPU backend against the
//! reference loops, over proptest-generated shapes, strides, paddings,
//! masks and values.
//!
//! Tolerances (u = unit roundoff, 2^-53 for f64, 2^-24 for f32):
//! - Ops that do the same arithmetic as the reference, element by element
//!   (element-wise ops, masking, copies, softmax whose sums run in the
//!   reference's order), must match bit for bit.
//! - Sums whose grouping differs (convolutions, `sum_axes`, the bias
//!   gradient, `sq_err_sum`) are checked per element against the classic
//!   worst-case bound for a K-term sum in any order with any fusing:
//!   `|computed - exact| <= gamma_K * sum|terms|`, `gamma_K = K u / (1 - K u)`.
//!   `sum|terms|` is computed by running the reference on absolute values
//!   (`|x * m|`, `|w|`, `|b|`), so the floor is exact where outputs cancel
//!   to near zero (where a relative test would fail for any correct
//!   kernel). ReLU is 1-Lipschitz, so it keeps the bound.
//!   - f64, cpu vs reference: both sides are off by at most gamma_{K+2},
//!     so `|d| <= 2 gamma_{K+2} * abs` and then, with the K of these tests
//!     (<= 3000), below `1e-12 * abs`: we assert the 1e-12 figure.
//!   - f32 cpu vs the f64 reference on the same (f32-representable) inputs:
//!     `|d| <= gamma_{K+2}(f32) * abs` (+ the f64 side's 1e-12, negligible).
//!     That worst case, about `K * 6e-8` relative to `sum|terms|`, still
//!     catches a wrong or missing term: one term is about `abs / K`, above
//!     the bound while `K^2 u < 1`, i.e. for K up to ~4000 in f32.
//!     Typical errors are ~sqrt(K) u (random-walk rounding); we report
//!     nothing about them since a test must not fail by bad luck.
//!
//! Case counts come from `PROPTEST_CASES` (default 24).

mod common;

use common::proptest_config as config;
use dmkd::backend::{Backend, Binary, ConvArgs, ConvGeometry, CpuBackend, ReferenceBackend, Unary};
use dmkd::{ConvAlgo, InputMask, Tensor};
use proptest::prelude::*;

fn cpu() -> CpuBackend {
    CpuBackend::new(ConvAlgo::Direct)
}

fn gamma(k: usize, u: f64) -> f64 {
    let ku = k as f64 * u;
    ku / (1.0 - ku)
}

const U64: f64 = f64::EPSILON / 2.0;
const U32: f64 = f32::EPSILON as f64 / 2.0;

/// f32-representable values in `[lo, hi)`, as f64 (so the f32 and f64
/// runs start from the same numbers).
fn values(n: usize, lo: f32, hi: f32) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(lo..hi, n).prop_map(|v| v.into_iter().map(f64::from).collect())
}

fn t64(shape: &[usize], v: Vec<f64>) -> Tensor<f64> {
    Tensor::from_vec(shape, v).unwrap()
}

fn abs(t: &Tensor<f64>) -> Tensor<f64> {
    t64(t.shape(), t.as_slice().iter().map(|v| v.abs()).collect())
}

fn abs_mask(m: &InputMask<f64>) -> InputMask<f64> {
    match m {
        InputMask::Spatial(t) => InputMask::Spatial(abs(t)),
        InputMask::Channel(t) => InputMask::Channel(abs(t)),
    }
}

fn cast_mask(m: &InputMask<f64>) -> InputMask<f32> {
    match m {
        InputMask::Spatial(t) => InputMask::Spatial(t.cast()),
        InputMask::Channel(t) => InputMask::Channel(t.cast()),
    }
}

/// Per element: `|got - want| <= rtol * floor`, where `floor` is the sum of
/// absolute terms of the same output.
fn check_bound(what: &str, got: &[f64], want: &[f64], floor: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for i in 0..got.len() {
        let d = (got[i] - want[i]).abs();
        assert!(
            d <= rtol * floor[i] || got[i] == want[i],
            "{what}: element {i}: got {} want {} (|d| = {d:e}, bound {:e})",
            got[i],
            want[i],
            rtol * floor[i]
        );
    }
}

fn assert_bits<T: dmkd::Float>(what: &str, got: &Tensor<T>, want: &Tensor<T>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (g, w)) in got.as_slice().iter().zip(want.as_slice()).enumerate() {
        assert!(
            g.as_f64().to_bits() == w.as_f64().to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: element {i}: got {g:e} want {w:e}"
        );
    }
}

// ---- convolutions ----------------------------------------------------------

#[derive(Clone, Debug)]
struct ConvCase {
    x: Tensor<f64>,
    w: Tensor<f64>,
    b: Option<Tensor<f64>>,
    dy: Tensor<f64>,
    mask: Option<InputMask<f64>>,
    relu: bool,
    geom: ConvGeometry,
}

const CHANNELS: [usize; 7] = [1, 3, 7, 8, 16, 17, 33];

fn conv_case() -> impl Strategy<Value = ConvCase> {
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
            ConvCase {
                x: t64(&geom.input_shape(), x),
                w: t64(&geom.weight_shape(), w),
                b: bias.then(|| t64(&[geom.c_out], b)),
                dy: t64(&geom.output_shape(), dy),
                mask,
                relu,
                geom,
            }
        })
}

impl ConvCase {
    fn args(&self) -> ConvArgs<f64> {
        ConvArgs {
            geom: self.geom,
            mask: self.mask.clone(),
            relu: self.relu,
        }
    }
    fn args32(&self) -> ConvArgs<f32> {
        ConvArgs {
            geom: self.geom,
            mask: self.mask.as_ref().map(cast_mask),
            relu: self.relu,
        }
    }
    fn abs_args(&self) -> ConvArgs<f64> {
        ConvArgs {
            geom: self.geom,
            mask: self.mask.as_ref().map(abs_mask),
            relu: false,
        }
    }
}

/// Forward, input, weight and bias gradients: cpu (f64 and f32) against
/// the f64 reference, with the bounds of the module docs.
fn check_conv(c: &ConvCase) {
    let g = &c.geom;
    let r = ReferenceBackend;
    let (a, aa, a32) = (c.args(), c.abs_args(), c.args32());
    let (x32, w32, dy32) = (c.x.cast::<f32>(), c.w.cast::<f32>(), c.dy.cast::<f32>());
    let b32 = c.b.as_ref().map(|b| b.cast::<f32>());
    let up = |t: Tensor<f32>| t.cast::<f64>().to_vec();

    // Forward: K = Cin*kh*kw products plus the bias.
    let k = g.c_in * g.kh * g.kw + 2;
    let want = r.conv2d(&c.x, &c.w, c.b.as_ref(), &a).unwrap();
    let absb = c.b.as_ref().map(abs);
    let floor = r
        .conv2d(&abs(&c.x), &abs(&c.w), absb.as_ref(), &aa)
        .unwrap();
    let got = cpu().conv2d(&c.x, &c.w, c.b.as_ref(), &a).unwrap();
    assert_eq!(got.shape(), want.shape());
    check_bound(
        "conv2d f64",
        got.as_slice(),
        want.as_slice(),
        floor.as_slice(),
        1e-12,
    );
    let got32 = cpu().conv2d(&x32, &w32, b32.as_ref(), &a32).unwrap();
    check_bound(
        "conv2d f32",
        &up(got32),
        want.as_slice(),
        floor.as_slice(),
        gamma(k, U32) + 1e-12,
    );

    // Input gradient: K = Cout*kh*kw products, then the mask.
    let k = g.c_out * g.kh * g.kw + 2;
    let want = r.conv2d_backward_input(&c.dy, &c.w, &a).unwrap();
    let floor = r
        .conv2d_backward_input(&abs(&c.dy), &abs(&c.w), &aa)
        .unwrap();
    let got = cpu().conv2d_backward_input(&c.dy, &c.w, &a).unwrap();
    assert_eq!(got.shape(), want.shape());
    check_bound(
        "dx f64",
        got.as_slice(),
        want.as_slice(),
        floor.as_slice(),
        1e-12,
    );
    let got32 = cpu().conv2d_backward_input(&dy32, &w32, &a32).unwrap();
    check_bound(
        "dx f32",
        &up(got32),
        want.as_slice(),
        floor.as_slice(),
        gamma(k, U32) + 1e-12,
    );

    // Weight gradient: K = N*OH*OW products.
    let k = g.n * g.oh * g.ow + 2;
    let want = r.conv2d_backward_weight(&c.dy, &c.x, &a).unwrap();
    let floor = r
        .conv2d_backward_weight(&abs(&c.dy), &abs(&c.x), &aa)
        .unwrap();
    let got = cpu().conv2d_backward_weight(&c.dy, &c.x, &a).unwrap();
    assert_eq!(got.shape(), want.shape());
    check_bound(
        "dw f64",
        got.as_slice(),
        want.as_slice(),
        floor.as_slice(),
        1e-12,
    );
    let got32 = cpu().conv2d_backward_weight(&dy32, &x32, &a32).unwrap();
    check_bound(
        "dw f32",
        &up(got32),
        want.as_slice(),
        floor.as_slice(),
        gamma(k, U32) + 1e-12,
    );

    // Bias gradient.
    let want = r.conv2d_backward_bias(&c.dy).unwrap();
    let floor = r.conv2d_backward_bias(&abs(&c.dy)).unwrap();
    let got = cpu().conv2d_backward_bias(&c.dy).unwrap();
    check_bound(
        "db f64",
        got.as_slice(),
        want.as_slice(),
        floor.as_slice(),
        1e-12,
    );
    let got32 = cpu().conv2d_backward_bias(&dy32).unwrap();
    check_bound(
        "db f32",
        &up(got32),
        want.as_slice(),
        floor.as_slice(),
        gamma(k, U32) + 1e-12,
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn conv_matches_reference(case in conv_case()) {
        check_conv(&case);
    }
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

fn fixed_case(
    (n, ci, h, w): (usize, usize, usize, usize),
    (co, kh, kw): (usize, usize, usize),
    stride: [usize; 2],
    padding: [usize; 2],
    mask_kind: usize,
) -> ConvCase {
    let geom = ConvGeometry::new(&[n, ci, h, w], &[co, ci, kh, kw], stride, padding).unwrap();
    let mask = match mask_kind {
        1 => Some(InputMask::Spatial(t64(
            &[n, h, w],
            fill(n * h * w, 5)
                .iter()
                .map(|v| f64::from(*v > 0.0))
                .collect(),
        ))),
        2 => Some(InputMask::Channel(t64(&[n, ci], fill(n * ci, 6)))),
        // A masked block of rows (attention masks come in blobs): whole
        // output tiles are skipped.
        4 => Some(InputMask::Spatial(t64(
            &[n, h, w],
            (0..n * h * w)
                .map(|i| f64::from((i % (h * w)) / w >= h * 3 / 5))
                .collect(),
        ))),
        // 0/1 channels: the channel-sparse paths (masked channels skipped).
        3 => Some(InputMask::Channel(t64(
            &[n, ci],
            fill(n * ci, 7)
                .iter()
                .map(|v| f64::from(*v > 0.2))
                .collect(),
        ))),
        _ => None,
    };
    ConvCase {
        x: t64(&geom.input_shape(), fill(n * ci * h * w, 1)),
        w: t64(&geom.weight_shape(), fill(co * ci * kh * kw, 2)),
        b: Some(t64(&[co], fill(co, 3))),
        dy: t64(&geom.output_shape(), fill(n * co * geom.oh * geom.ow, 4)),
        mask,
        relu: true,
        geom,
    }
}

/// Shapes the random cases rarely reach: many channels (several k-blocks
/// and row panels), outputs wider than a weight-gradient k-block, the 1x1
/// align conv, a padding larger than the kernel reach, 0/1 channel masks
/// on packed weights.
#[test]
fn conv_larger_shapes_match_reference() {
    for (x, wt, s, p, m) in [
        ((2, 40, 13, 29), (70, 3, 3), [1, 1], [1, 1], 1),
        ((1, 96, 9, 11), (64, 1, 1), [1, 1], [0, 0], 2),
        ((1, 5, 3, 300), (9, 3, 3), [1, 1], [1, 1], 0),
        ((2, 33, 12, 10), (17, 3, 3), [2, 2], [1, 1], 1),
        ((1, 6, 5, 6), (7, 1, 1), [1, 1], [2, 1], 2),
        ((1, 3, 1, 1), (4, 3, 3), [1, 1], [1, 1], 0),
        ((2, 40, 13, 29), (70, 3, 3), [1, 1], [1, 1], 3),
        ((2, 64, 10, 12), (32, 1, 1), [1, 1], [0, 0], 3),
        ((2, 40, 13, 29), (70, 3, 3), [1, 1], [1, 1], 4),
        ((1, 9, 20, 20), (5, 1, 1), [1, 1], [0, 0], 4),
    ] {
        check_conv(&fixed_case(x, wt, s, p, m));
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

/// Run `f` on both backends in f64 and f32; the results must agree bit for bit.
fn same_bits<F64, F32>(what: &str, f64_op: F64, f32_op: F32)
where
    F64: Fn(&dyn Backend<f64>) -> Tensor<f64>,
    F32: Fn(&dyn Backend<f32>) -> Tensor<f32>,
{
    assert_bits(
        &format!("{what} f64"),
        &f64_op(&cpu()),
        &f64_op(&ReferenceBackend),
    );
    assert_bits(
        &format!("{what} f32"),
        &f32_op(&cpu()),
        &f32_op(&ReferenceBackend),
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn unary_ops_match_bitwise(op in unary_ops(), (x, dy) in tensor_pair(-3.0, 3.0)) {
        let (x32, dy32) = (x.cast::<f32>(), dy.cast::<f32>());
        same_bits("unary", |b| b.unary(op, &x).unwrap(), |b| b.unary(op, &x32).unwrap());
        let y = ReferenceBackend.unary(op, &x).unwrap();
        let y32 = ReferenceBackend.unary(op, &x32).unwrap();
        same_bits(
            "unary_backward",
            |b| b.unary_backward(op, &x, &y, &dy).unwrap(),
            |b| b.unary_backward(op, &x32, &y32, &dy32).unwrap(),
        );
    }

    #[test]
    fn binary_ops_broadcast_bitwise(
        (out, sa, sb) in broadcast_shapes(),
        op in prop_oneof![Just(Binary::Add), Just(Binary::Sub), Just(Binary::Mul), Just(Binary::Div)],
        seed in any::<u64>(),
    ) {
        let a = t64(&sa, fill(sa.iter().product(), seed));
        let b = t64(&sb, fill(sb.iter().product(), seed ^ 1));
        let (a32, b32) = (a.cast::<f32>(), b.cast::<f32>());
        same_bits("binary", |be| be.binary(op, &a, &b, &out).unwrap(), |be| be.binary(op, &a32, &b32, &out).unwrap());
        same_bits(
            "broadcast_to",
            |be| be.broadcast_to(&a, &out).unwrap(),
            |be| be.broadcast_to(&a32, &out).unwrap(),
        );
    }

    #[test]
    fn mask_mul_bitwise(
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
        let (x32, m32) = (x.cast::<f32>(), cast_mask(&m));
        same_bits("mask_mul", |b| b.mask_mul(&x, &m).unwrap(), |b| b.mask_mul(&x32, &m32).unwrap());
    }

    #[test]
    fn sum_axes_within_bound(
        (s, axes) in shape(4, 7).prop_flat_map(|s| {
            let r = s.len();
            (Just(s), prop::sample::subsequence((0..r).collect::<Vec<_>>(), 0..=r))
        }),
        seed in any::<u64>(),
    ) {
        let n: usize = s.iter().product();
        let x = t64(&s, fill(n, seed));
        let r = ReferenceBackend;
        let want = r.sum_axes(&x, &axes).unwrap();
        let floor = r.sum_axes(&abs(&x), &axes).unwrap();
        let got = cpu().sum_axes(&x, &axes).unwrap();
        prop_assert_eq!(got.shape(), want.shape());
        let k = n / want.numel().max(1) + 1;
        check_bound("sum_axes f64", got.as_slice(), want.as_slice(), floor.as_slice(), 2.0 * gamma(k, U64));
        let got32 = cpu().sum_axes(&x.cast::<f32>(), &axes).unwrap();
        check_bound("sum_axes f32", &got32.cast::<f64>().to_vec(), want.as_slice(), floor.as_slice(), gamma(k, U32) + gamma(k, U64));
    }

    #[test]
    fn softmax_bitwise((s, axis) in shape(4, 6).prop_filter("rank >= 1", |s| !s.is_empty())
        .prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) }),
        seed in any::<u64>(),
    ) {
        let n: usize = s.iter().product();
        let x = t64(&s, fill(n, seed).iter().map(|v| v * 4.0).collect());
        let dy = t64(&s, fill(n, seed ^ 9));
        let (x32, dy32) = (x.cast::<f32>(), dy.cast::<f32>());
        same_bits("softmax", |b| b.softmax(&x, axis).unwrap(), |b| b.softmax(&x32, axis).unwrap());
        let y = ReferenceBackend.softmax(&x, axis).unwrap();
        let y32 = ReferenceBackend.softmax(&x32, axis).unwrap();
        same_bits(
            "softmax_backward",
            |b| b.softmax_backward(&y, &dy, axis).unwrap(),
            |b| b.softmax_backward(&y32, &dy32, axis).unwrap(),
        );
    }

    #[test]
    fn narrow_bitwise(
        (s, axis, start, len) in shape(4, 6).prop_filter("rank >= 1", |s| !s.is_empty())
            .prop_flat_map(|s| { let r = s.len(); (Just(s), 0..r) })
            .prop_flat_map(|(s, a)| { let d = s[a]; (Just(s), Just(a), 0..d) })
            .prop_flat_map(|(s, a, st)| { let d = s[a]; (Just(s), Just(a), Just(st), 1..=d - st) }),
        seed in any::<u64>(),
    ) {
        let n: usize = s.iter().product();
        let x = t64(&s, fill(n, seed));
        let x32 = x.cast::<f32>();
        same_bits("narrow", |b| b.narrow(&x, axis, start, len).unwrap(), |b| b.narrow(&x32, axis, start, len).unwrap());
        let y = ReferenceBackend.narrow(&x, axis, start, len).unwrap();
        let y32 = y.cast::<f32>();
        same_bits(
            "narrow_backward",
            |b| b.narrow_backward(&y, &s, axis, start).unwrap(),
            |b| b.narrow_backward(&y32, &s, axis, start).unwrap(),
        );
    }

    #[test]
    fn sq_err_matches((a, b) in tensor_pair(-2.0, 2.0), g in -2.0f64..2.0) {
        let r = ReferenceBackend;
        let (a32, b32) = (a.cast::<f32>(), b.cast::<f32>());
        // All terms are non-negative, so sum|terms| is the sum itself.
        let want = r.sq_err_sum(&a, &b).unwrap().item().unwrap();
        let k = a.numel() + 2;
        let got = cpu().sq_err_sum(&a, &b).unwrap().item().unwrap();
        check_bound("sq_err_sum f64", &[got], &[want], &[want], 2.0 * gamma(k, U64));
        let got32 = cpu().sq_err_sum(&a32, &b32).unwrap().item().unwrap() as f64;
        // f32: the differences and squares round too (2 more roundings per term).
        check_bound("sq_err_sum f32", &[got32], &[want], &[want], gamma(k + 2, U32) + 1e-12);
        let g32 = g as f32;
        same_bits(
            "sq_err_backward",
            |be| be.sq_err_backward(&a, &b, g).unwrap(),
            |be| be.sq_err_backward(&a32, &b32, g32).unwrap(),
        );
    }
}

/// Long reductions take the chunked parallel paths.
#[test]
fn long_reductions_within_bound() {
    let s = [3, 70_001];
    let x = t64(&s, fill(3 * 70_001, 11));
    let r = ReferenceBackend;
    for axes in [vec![0, 1], vec![1], vec![0]] {
        let want = r.sum_axes(&x, &axes).unwrap();
        let floor = r.sum_axes(&abs(&x), &axes).unwrap();
        let got = cpu().sum_axes(&x, &axes).unwrap();
        let k = x.numel() / want.numel() + 1;
        check_bound(
            "long sum_axes",
            got.as_slice(),
            want.as_slice(),
            floor.as_slice(),
            2.0 * gamma(k, U64),
        );
    }
    let y = t64(&s, fill(3 * 70_001, 12));
    let want = r.sq_err_sum(&x, &y).unwrap().item().unwrap();
    let got = cpu().sq_err_sum(&x, &y).unwrap().item().unwrap();
    check_bound(
        "long sq_err_sum",
        &[got],
        &[want],
        &[want],
        2.0 * gamma(x.numel() + 2, U64),
    );
}
