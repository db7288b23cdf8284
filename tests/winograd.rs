//! Winograd F(4x4, 3x3) convolution (`ConvAlgo::Winograd`) against the
//! reference loops, and the f32 accuracy of every algorithm on the whole
//! DMKD loss.
//!
//! Tolerances (norm-wise, `||a - e||_2 / ||e||_2`, the measure under which
//! Winograd's error is meaningful: per-element relative errors fail even
//! for the direct conv where outputs cancel to near zero):
//! - f64 Winograd vs the f64 reference: 1e-12. The transforms add a few
//!   roundings per value with coefficients up to 8 (and 1/6, 1/24 inexact
//!   in binary); measured ~1e-15, so 1e-12 leaves three orders of margin
//!   and still catches any wrong index or coefficient (O(1) off).
//! - f32 Winograd vs the f64 reference: 1e-4, the accuracy requirement of
//!   the loss. Measured ~1e-6 (see the printed figures).

use std::sync::Arc;

use dmkd::backend::{Backend, ConvArgs, ConvGeometry, CpuBackend, ReferenceBackend};
use dmkd::{ConvAlgo, Float, InputMask, Tensor};

fn fill<T: Float>(shape: &[usize], seed: u64) -> Tensor<T> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Tensor::from_fn(shape, |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        // f32-representable, so f32 and f64 runs start from the same values.
        T::from_f64(((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 as f64)
    })
    .unwrap()
}

fn rel(a: &Tensor<f64>, e: &Tensor<f64>) -> f64 {
    assert_eq!(a.shape(), e.shape());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.as_slice().iter().zip(e.as_slice()) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

#[derive(Clone, Copy, Debug)]
enum MaskKind {
    None,
    Spatial01,
    SpatialZero,
    SpatialOne,
    SpatialReal,
    Channel01,
    ChannelZero,
    ChannelOne,
    ChannelReal,
}

fn mask(kind: MaskKind, n: usize, c: usize, h: usize, w: usize) -> Option<InputMask<f64>> {
    let sp = |f: &dyn Fn(usize) -> f64| {
        Some(InputMask::Spatial(Tensor::from_fn(&[n, h, w], f).unwrap()))
    };
    let ch =
        |f: &dyn Fn(usize) -> f64| Some(InputMask::Channel(Tensor::from_fn(&[n, c], f).unwrap()));
    match kind {
        MaskKind::None => None,
        // A blob of masked rows plus scattered zeros.
        MaskKind::Spatial01 => sp(&|i| {
            let p = i % (h * w);
            (p / w >= h / 2 && (i * 7) % 5 != 0) as u8 as f64
        }),
        MaskKind::SpatialZero => sp(&|_| 0.0),
        MaskKind::SpatialOne => sp(&|_| 1.0),
        MaskKind::SpatialReal => sp(&|i| ((i * 37) % 11) as f64 / 8.0 - 0.5),
        MaskKind::Channel01 => ch(&|i| ((i * 5) % 3 == 0) as u8 as f64),
        MaskKind::ChannelZero => ch(&|_| 0.0),
        MaskKind::ChannelOne => ch(&|_| 1.0),
        MaskKind::ChannelReal => ch(&|i| ((i * 13) % 7) as f64 / 4.0 - 0.75),
    }
}

fn cast_mask(m: &InputMask<f64>) -> InputMask<f32> {
    match m {
        InputMask::Spatial(t) => InputMask::Spatial(t.cast()),
        InputMask::Channel(t) => InputMask::Channel(t.cast()),
    }
}

/// Forward, input and weight gradients of one case: Winograd f64 and f32
/// against the f64 reference. Returns the worst f32 error.
#[allow(clippy::too_many_arguments)]
fn check_case(
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    kind: MaskKind,
    bias: bool,
    relu: bool,
) -> f64 {
    let seed = (n * 1000 + cin * 100 + cout * 10 + h * 7 + w) as u64;
    let x = fill::<f64>(&[n, cin, h, w], seed);
    let wt = fill::<f64>(&[cout, cin, 3, 3], seed + 1);
    let b = bias.then(|| fill::<f64>(&[cout], seed + 2));
    let dy = fill::<f64>(&[n, cout, h, w], seed + 3);
    let geom = ConvGeometry::new(x.shape(), wt.shape(), [1, 1], [1, 1]).unwrap();
    let m = mask(kind, n, cin, h, w);
    let a64 = ConvArgs {
        geom,
        mask: m.clone(),
        relu,
    };
    let a32 = ConvArgs {
        geom,
        mask: m.as_ref().map(cast_mask),
        relu,
    };
    let (x32, w32, dy32) = (x.cast::<f32>(), wt.cast::<f32>(), dy.cast::<f32>());
    let b32 = b.as_ref().map(|b| b.cast::<f32>());
    let r = ReferenceBackend;
    let wino = CpuBackend::new(ConvAlgo::Winograd);
    let what = format!("n {n} cin {cin} cout {cout} {h}x{w} {kind:?} bias {bias} relu {relu}");
    let mut worst32 = 0.0f64;
    let mut check = |pass: &str, got: Tensor<f64>, got32: Tensor<f32>, want: Tensor<f64>| {
        let e64 = rel(&got, &want);
        assert!(e64 <= 1e-12, "{pass} f64 {what}: {e64:e}");
        let e32 = rel(&got32.cast::<f64>(), &want);
        assert!(e32 <= 1e-4, "{pass} f32 {what}: {e32:e}");
        worst32 = worst32.max(e32);
    };
    check(
        "forward",
        wino.conv2d(&x, &wt, b.as_ref(), &a64).unwrap(),
        wino.conv2d(&x32, &w32, b32.as_ref(), &a32).unwrap(),
        r.conv2d(&x, &wt, b.as_ref(), &a64).unwrap(),
    );
    check(
        "dx",
        wino.conv2d_backward_input(&dy, &wt, &a64).unwrap(),
        wino.conv2d_backward_input(&dy32, &w32, &a32).unwrap(),
        r.conv2d_backward_input(&dy, &wt, &a64).unwrap(),
    );
    check(
        "dw",
        wino.conv2d_backward_weight(&dy, &x, &a64).unwrap(),
        wino.conv2d_backward_weight(&dy32, &x32, &a32).unwrap(),
        r.conv2d_backward_weight(&dy, &x, &a64).unwrap(),
    );
    worst32
}

#[test]
fn odd_shapes_match_reference() {
    let mut worst = 0.0f64;
    for h in 1..=9 {
        for w in [1, 2, 3, 4, 5, 7, 8, 9] {
            let (cin, cout) = [(3, 5), (9, 7), (17, 13)][(h + w) % 3];
            worst = worst.max(check_case(
                1 + (h % 2),
                cin,
                cout,
                h,
                w,
                MaskKind::None,
                (h + w) % 2 == 0,
                h % 3 == 0,
            ));
        }
    }
    println!("odd shapes: worst f32 norm-rel error {worst:.2e}");
}

#[test]
fn masks_match_reference() {
    use MaskKind::*;
    let mut worst = 0.0f64;
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
                worst = worst.max(check_case(n, cin, cout, h, w, kind, bias, relu));
            }
        }
    }
    println!("masks: worst f32 norm-rel error {worst:.2e}");
}

#[test]
fn larger_shapes_match_reference() {
    let mut worst = 0.0f64;
    // Several blocks of tiles (forward) and of the weight gradient's
    // reduction (more than 256 tiles), channels beyond one register.
    for (n, c, h, w, kind) in [
        (2, 40, 37, 70, MaskKind::None),
        (2, 24, 45, 50, MaskKind::Spatial01),
        (1, 36, 30, 41, MaskKind::Channel01),
    ] {
        worst = worst.max(check_case(n, c, c + 3, h, w, kind, true, true));
    }
    println!("larger shapes: worst f32 norm-rel error {worst:.2e}");
}

/// The accuracy requirement: for each algorithm, the f32 loss and every
/// gradient within 1e-4 (norm-wise) of the f64 evaluation, at 64 channels.
#[test]
fn whole_loss_f32_accuracy_per_algorithm() {
    use dmkd::distill::{EvalOptions, Problem, evaluate};
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
    for algo in [ConvAlgo::Direct, ConvAlgo::Winograd, ConvAlgo::Auto] {
        let got = evaluate(Arc::new(CpuBackend::new(algo)), &p32)
            .unwrap()
            .outputs;
        let (mut worst, mut worst_name) = (0.0f64, String::new());
        let mut loss_err = 0.0;
        for (name, e) in want.iter() {
            if name.starts_with("p") && (name.contains("mask") || name.contains("attn")) {
                continue;
            }
            let a = got
                .get(name)
                .unwrap_or_else(|| panic!("{algo:?}: {name} missing"));
            let a = a.cast::<f64>();
            let r = rel(&a, e);
            if name == "loss" {
                loss_err = r;
            }
            if r > worst {
                worst = r;
                worst_name = name.clone();
            }
        }
        println!(
            "{algo:?}: f32 vs f64 norm-rel: loss {loss_err:.2e}, worst tensor {worst_name} {worst:.2e}"
        );
        assert!(worst <= 1e-4, "{algo:?}: {worst_name} {worst:e}");
    }
}
