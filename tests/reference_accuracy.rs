//! The reference backend's f32 sums accumulate in f64 (the bound is derived
//! in `src/backend/reference.rs`): their error does not grow with the count.
//!
//! Tolerance: 1e-6 relative against the f64 answer. The bound for a sum of
//! n f32 terms accumulated in f64 and rounded once is
//! `u32 |s| + (n - 1) u64 sum|x_i|`, i.e. 6.0e-8 + 2.2e-10 at n = 2e6 for
//! terms of one sign; an f32 accumulator gives errors around 1e-3 and
//! beyond at that count, so 1e-6 separates the two by three orders while
//! leaving 16x margin over the bound (the loss adds the f32 rounding of its
//! inputs, convolutions included: measured ~1e-8 to 1e-7).

use dmkd::backend::{
    Backend, BackendKind, BackendOptions, ConvArgs, ConvGeometry, ReferenceBackend, make_backend,
};
use dmkd::distill::{EvalOptions, Problem, forward};
use dmkd::rng::PhiloxStream;
use dmkd::synthetic::{Preset, inputs};
use dmkd::{ConvAlgo, Isa, Tensor};

const COUNT: usize = 2_000_000;

/// Uniform values in [0.5, 1.5), f32-representable, so the f64 run sees the
/// same numbers; one sign, so the sum is well conditioned and every bit of
/// error is the accumulator's.
fn values(n: usize, seed: u64) -> Tensor<f64> {
    let mut rng = PhiloxStream::new(seed, 0);
    Tensor::from_fn(&[n], |_| rng.uniform(0.5, 1.5) as f32 as f64).unwrap()
}

fn rel(a: f32, e: f64) -> f64 {
    (a as f64 - e).abs() / e.abs()
}

/// The exact-enough sum: f64 with compensation (Neumaier), independent of
/// the code under test.
fn careful_sum(xs: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut c) = (0.0f64, 0.0f64);
    for x in xs {
        let t = s + x;
        c += if s.abs() >= x.abs() {
            (s - t) + x
        } else {
            (x - t) + s
        };
        s = t;
    }
    s + c
}

#[test]
fn two_million_term_f32_reductions_are_within_1e_6() {
    let r = ReferenceBackend;
    let x64 = values(COUNT, 1);
    let y64 = values(COUNT, 2);
    let (x, y) = (x64.cast::<f32>(), y64.cast::<f32>());
    let xs = x64.as_slice();

    // sum over every axis
    let want = careful_sum(xs.iter().copied());
    let got = r.sum_axes(&x, &[0]).unwrap().item().unwrap();
    assert!(rel(got, want) < 1e-6, "sum: {:.2e}", rel(got, want));

    // squared error
    let want = careful_sum(
        xs.iter()
            .zip(y64.as_slice())
            .map(|(a, b)| (a - b) * (a - b)),
    );
    let got = r.sq_err_sum(&x, &y).unwrap().item().unwrap();
    assert!(rel(got, want) < 1e-6, "sq_err_sum: {:.2e}", rel(got, want));

    // a softmax over 2e6 entries: its denominator is such a sum
    let z = Tensor::from_fn(&[1, COUNT], |i| (xs[i] - 1.0) as f32).unwrap();
    let den = careful_sum(xs.iter().map(|v| (v - 1.0 - 0.5).exp()));
    let sm = r.softmax(&z, 1).unwrap();
    // z's max is just under 0.5: the kernel subtracts it, so compare shapes
    // through the ratio of two entries and the total, both exact in f64.
    let total = careful_sum(sm.as_slice().iter().map(|&v| v as f64));
    assert!((total - 1.0).abs() < 1e-6, "softmax total {total}");
    let max = z.as_slice().iter().cloned().fold(f32::MIN, f32::max) as f64;
    let den_at_max = den * (0.5 - max).exp();
    let want0 = ((xs[0] - 1.0) - max).exp() / den_at_max;
    assert!(rel(sm.as_slice()[0], want0) < 1e-6, "softmax entry");

    // the bias gradient and a 1x1 weight gradient: sums over N*H*W
    let dy = x.reshape(&[1, 1, 1000, 2000]).unwrap();
    let got = r.conv2d_backward_bias(&dy).unwrap().as_slice()[0];
    let want = careful_sum(xs.iter().copied());
    assert!(rel(got, want) < 1e-6, "bias grad: {:.2e}", rel(got, want));
    let geom = ConvGeometry::new(&[1, 1, 1000, 2000], &[1, 1, 1, 1], [1, 1], [0, 0]).unwrap();
    let args = ConvArgs::<f32> {
        geom,
        mask: None,
        relu: false,
    };
    let xin = y.reshape(&[1, 1, 1000, 2000]).unwrap();
    let got = r
        .conv2d_backward_weight(&dy, &xin, &args)
        .unwrap()
        .as_slice()[0];
    let want = careful_sum(xs.iter().zip(y64.as_slice()).map(|(a, b)| a * b));
    assert!(rel(got, want) < 1e-6, "weight grad: {:.2e}", rel(got, want));
}

#[test]
fn full_size_f32_loss_on_the_reference_backend_is_within_1e_6_of_f64() {
    // N = 2, C = 256, levels P4, P5, P6 of the retinanet preset, default DMKD.
    let mut preset = Preset::named("retinanet").unwrap();
    preset.levels = preset.levels[1..4].to_vec();
    preset.level_names = preset.level_names[1..4].to_vec();
    let config = preset.config();
    let opts = EvalOptions {
        init_seed: Some(3),
        allow_extra: false,
    };
    let t64 = inputs::<f64>(&preset, 7).unwrap();
    let p64 = Problem::new(&config, &t64, opts).unwrap();
    // The f32 problem holds the same values rounded once; the f64 run
    // evaluates the rounded values too, so only the arithmetic differs.
    let mut t32 = dmkd::distill::TensorMap::new();
    let mut t64r = dmkd::distill::TensorMap::new();
    for (k, v) in t64.iter().chain(p64.params.iter()) {
        t32.insert(k.clone(), v.cast::<f32>());
        t64r.insert(k.clone(), v.cast::<f32>().cast::<f64>());
    }
    let exact = EvalOptions::default();
    let p32 = Problem::new(&config, &t32, exact).unwrap();
    let p64 = Problem::new(&config, &t64r, exact).unwrap();
    let cpu = BackendOptions {
        kind: BackendKind::Cpu,
        conv_algo: ConvAlgo::Direct,
        isa: Isa::Auto,
    };
    let reference = BackendOptions {
        kind: BackendKind::Reference,
        conv_algo: ConvAlgo::Auto,
        isa: Isa::Auto,
    };
    let (l64, lv64) = forward(make_backend::<f64>(cpu).unwrap(), &p64).unwrap();
    let (l32, lv32) = forward(make_backend::<f32>(reference).unwrap(), &p32).unwrap();
    let err = rel(l32, l64);
    println!("reference f32 loss vs f64: {err:.2e}");
    assert!(err < 1e-6, "loss {err:.2e}");
    for (l, (a, e)) in lv32.iter().zip(&lv64).enumerate() {
        assert!(rel(*a, *e) < 1e-6, "level {l}: {:.2e}", rel(*a, *e));
    }
}
