//! The CUDA backend against the reference backend: every op, the
//! determinism and exact-order claims, and the whole DMKD / MGD / FGD loss.
//!
//! Without a usable CUDA device (no driver, no NVRTC or cuBLAS, no GPU)
//! every test prints one line saying why and passes, so this file runs in
//! CI; on a GPU machine it is the backend's acceptance test.
//!
//! Tolerances are norm-wise relative, `||cuda - ref|| / ||ref||`:
//! - f64: `1e-12`. Element-wise ops are exact IEEE operations on both sides
//!   (the kernels are compiled without FMA contraction) except exp/ln
//!   (1 ulp); sums and GEMMs differ only in summation order, an error of
//!   order `sqrt(K) * 1.1e-16` for K terms, far below 1e-12 at these sizes.
//! - f32: `1e-5`. The same argument with eps = 6e-8: a K-term sum in two
//!   different orders differs by about `sqrt(K) * 6e-8` relative (random
//!   signs), 2e-6 for the longest sums here (K of a few thousand); CUDA's
//!   expf/logf are within 2 ulp. 1e-5 leaves a 5x margin over that and is
//!   still 100x tighter than any indexing or masking bug would produce.
//!   For the whole loss at a realistic size, where errors compound through
//!   two convs, a ReLU and the loss, the bound is instead tied to the
//!   reference's own f32 error against f64, measured in the same test: the
//!   CUDA f32 result must be about as accurate as the CPU's f32 result.
//!
//! Beyond tolerances, the tests hold the device to exact claims: the
//! two-pass sums equal `emulate_two_pass_sum` bit for bit, short sums and
//! exact element-wise ops equal the reference bit for bit, repeated runs
//! are bit-identical, and the masks of every mode are identical.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use dmkd::backend::cuda::reduce::{CHUNK, SEQ_MAX};
use dmkd::backend::cuda::{CudaBackend, CudaFloat, emulate_two_pass_sum};
use dmkd::backend::{
    Backend, BackendKind, BackendOptions, Binary, InputMask, ReferenceBackend, Unary, make_backend,
};
use dmkd::distill::{EvalOptions, Evaluation, MaskMode, Method, Problem, TensorMap, evaluate};
use dmkd::gradcheck::{LossLevel, random_problem};
use dmkd::ops::conv::conv_args;
use dmkd::rng::PhiloxStream;
use dmkd::{BackendRef, Conv2dOptions, Float, Tensor};

const F64_TOL: f64 = 1e-12;
const F32_TOL: f64 = 1e-5;

/// The backend, or None after printing why this test is skipped.
fn cuda(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new() {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("skipping {test}: {e}");
            None
        }
    }
}

fn rand<T: Float>(rng: &mut PhiloxStream, shape: &[usize], lo: f64, hi: f64) -> Tensor<T> {
    Tensor::from_fn(shape, |_| T::from_f64(rng.uniform(lo, hi))).unwrap()
}

/// A 0/1 mask with about 35% ones (MGD's keep ratio).
fn rand_mask<T: Float>(rng: &mut PhiloxStream, shape: &[usize]) -> Tensor<T> {
    Tensor::from_fn(shape, |_| {
        if rng.next_f64() < 0.65 {
            T::zero()
        } else {
            T::one()
        }
    })
    .unwrap()
}

fn rel<T: Float>(got: &Tensor<T>, want: &Tensor<T>) -> f64 {
    let (g, w) = (got.as_slice(), want.as_slice());
    let num: f64 = g
        .iter()
        .zip(w)
        .map(|(a, b)| (a.as_f64() - b.as_f64()).powi(2))
        .sum();
    let den: f64 = w.iter().map(|b| b.as_f64().powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[track_caller]
fn close<T: Float>(what: &str, got: &Tensor<T>, want: &Tensor<T>, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert!(
        got.first_non_finite().is_none(),
        "{what}: non-finite output"
    );
    let e = rel(got, want);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

#[track_caller]
fn bits<T: Float>(what: &str, got: &Tensor<T>, want: &Tensor<T>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (a, b)) in got.as_slice().iter().zip(want.as_slice()).enumerate() {
        assert_eq!(
            a.as_f64().to_bits(),
            b.as_f64().to_bits(),
            "{what}: element {i} differs: {a:e} vs {b:e}"
        );
    }
}

/// The bound for a result built from long sums: `tol`, or 3x the
/// reference's own error against f64 when that is larger (a sum of a few
/// thousand terms that happens to cancel has a large relative error in any
/// f32 order; see the module docs). For f64 inputs the second term is 0.
fn sum_tol<T: Float>(tol: f64, want: &Tensor<T>, want64: &Tensor<f64>) -> f64 {
    tol.max(3.0 * rel(&want.cast::<f64>(), want64))
}

fn scalar<T: Float>(v: T) -> Tensor<T> {
    Tensor::scalar(v)
}

// ---- every op ----------------------------------------------------------------

/// One conv geometry: n, cin, h, w, cout, kh, kw, stride, padding.
type ConvCase = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    [usize; 2],
    [usize; 2],
);

const CONV_CASES: &[ConvCase] = &[
    (2, 5, 7, 6, 4, 3, 3, [1, 1], [1, 1]), // the generators' 3x3 "same" conv
    (2, 3, 5, 5, 4, 1, 1, [1, 1], [0, 0]), // the align conv (GEMM on x itself)
    (3, 4, 9, 8, 3, 3, 3, [2, 2], [0, 0]), // strided, unpadded
    (2, 3, 8, 7, 5, 5, 3, [2, 1], [2, 1]), // non-square kernel, mixed stride
    (2, 6, 4, 4, 3, 1, 1, [2, 2], [0, 0]), // 1x1 with stride: the im2col path
    (1, 2, 1, 1, 3, 3, 3, [1, 1], [1, 1]), // a single pixel
    (1, 16, 13, 21, 8, 3, 3, [1, 1], [1, 1]), // a P6-sized plane
];

fn conv_ops<T: CudaFloat>(cu: &CudaBackend, tol: f64, rng: &mut PhiloxStream) {
    for &(n, ci, h, w, co, kh, kw, stride, padding) in CONV_CASES {
        for mask_kind in 0..3 {
            for (bias, relu) in [(false, false), (true, false), (true, true)] {
                let what = format!(
                    "conv n{n} c{ci}->{co} {h}x{w} k{kh}x{kw} s{stride:?} p{padding:?} \
                     mask{mask_kind} bias{bias} relu{relu} ({})",
                    T::DTYPE
                );
                let x: Tensor<T> = rand(rng, &[n, ci, h, w], -2.0, 2.0);
                let wt: Tensor<T> = rand(rng, &[co, ci, kh, kw], -0.5, 0.5);
                let b: Tensor<T> = rand(rng, &[co], -0.5, 0.5);
                let mask = match mask_kind {
                    1 => Some(InputMask::Spatial(rand_mask(rng, &[n, h, w]))),
                    2 => Some(InputMask::Channel(rand_mask(rng, &[n, ci]))),
                    _ => None,
                };
                let opts = Conv2dOptions {
                    stride,
                    padding,
                    mask,
                    relu,
                };
                let bias = bias.then_some(&b);
                let args = conv_args(&x, &wt, bias, &opts).unwrap();
                let want = ReferenceBackend.conv2d(&x, &wt, bias, &args).unwrap();
                let got = cu.conv2d(&x, &wt, bias, &args).unwrap();
                close(&format!("{what} forward"), &got, &want, tol);

                let dy: Tensor<T> = rand(rng, want.shape(), -1.0, 1.0);
                let want = ReferenceBackend
                    .conv2d_backward_input(&dy, &wt, &args)
                    .unwrap();
                let got = cu.conv2d_backward_input(&dy, &wt, &args).unwrap();
                close(&format!("{what} dx"), &got, &want, tol);
                if let Some(m) = &args.mask {
                    // Masked input positions get exact zeros.
                    let masked = ReferenceBackend.mask_mul(&got, m).unwrap();
                    bits(&format!("{what} dx is masked"), &got, &masked);
                }

                let want = ReferenceBackend
                    .conv2d_backward_weight(&dy, &x, &args)
                    .unwrap();
                let got = cu.conv2d_backward_weight(&dy, &x, &args).unwrap();
                close(&format!("{what} dw"), &got, &want, tol);

                let want = ReferenceBackend.conv2d_backward_bias(&dy).unwrap();
                let got = cu.conv2d_backward_bias(&dy).unwrap();
                close(&format!("{what} db"), &got, &want, tol);
            }
        }
    }
}

const UNARY: &[Unary] = &[
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
];

fn elementwise_ops<T: CudaFloat>(cu: &CudaBackend, tol: f64, rng: &mut PhiloxStream) {
    let shape = [2, 3, 4, 5];
    for &op in UNARY {
        let (lo, hi) = match op {
            Unary::Ln | Unary::Sqrt | Unary::Recip => (0.5, 2.0),
            _ => (-2.0, 2.0),
        };
        let mut x: Tensor<T> = rand(rng, &shape, lo, hi);
        if matches!(op, Unary::Relu | Unary::Abs) {
            // Include the kink: relu'(0) = 0 and sign(0) = 0 on both sides.
            let mut v = x.to_vec();
            v[0] = T::zero();
            v[7] = -T::zero();
            x = Tensor::from_vec(&shape, v).unwrap();
        }
        let want = ReferenceBackend.unary(op, &x).unwrap();
        let got = cu.unary(op, &x).unwrap();
        let what = format!("unary {op:?} ({})", T::DTYPE);
        if matches!(op, Unary::Exp | Unary::Ln) {
            close(&what, &got, &want, tol);
        } else {
            bits(&what, &got, &want);
        }
        let dy: Tensor<T> = rand(rng, &shape, -1.0, 1.0);
        let want_dx = ReferenceBackend.unary_backward(op, &x, &want, &dy).unwrap();
        let got_dx = cu.unary_backward(op, &x, &want, &dy).unwrap();
        bits(&format!("{what} backward"), &got_dx, &want_dx);
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
    for &(sa, sb, out) in pairs {
        for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
            let a: Tensor<T> = rand(rng, sa, -2.0, 2.0);
            let b: Tensor<T> = rand(rng, sb, 0.5, 2.0);
            let want = ReferenceBackend.binary(op, &a, &b, out).unwrap();
            let got = cu.binary(op, &a, &b, out).unwrap();
            bits(
                &format!("binary {op:?} {sa:?} {sb:?} ({})", T::DTYPE),
                &got,
                &want,
            );
        }
    }

    let x: Tensor<T> = rand(rng, &shape, -2.0, 2.0);
    for mask in [
        InputMask::Spatial(rand_mask(rng, &[2, 4, 5])),
        InputMask::Channel(rand_mask(rng, &[2, 3])),
    ] {
        let want = ReferenceBackend.mask_mul(&x, &mask).unwrap();
        let got = cu.mask_mul(&x, &mask).unwrap();
        bits(&format!("mask_mul ({})", T::DTYPE), &got, &want);
    }

    for (from, to) in [
        (&[3usize, 1][..], &[2usize, 3, 4][..]),
        (&[], &[2, 2]),
        (&[1, 4, 1, 1], &[2, 4, 3, 3]),
        (&[2, 3], &[2, 3]),
    ] {
        let x: Tensor<T> = rand(rng, from, -2.0, 2.0);
        let want = ReferenceBackend.broadcast_to(&x, to).unwrap();
        let got = cu.broadcast_to(&x, to).unwrap();
        // The reference adds +0.0 (so -0.0 becomes +0.0); values must match.
        close(
            &format!("broadcast_to {from:?} -> {to:?}"),
            &got,
            &want,
            0.0,
        );
    }

    for (shape, axis, start, len) in [
        (&[2usize, 5, 3][..], 1usize, 1usize, 3usize),
        (&[2, 5, 3], 0, 1, 1),
        (&[2, 5, 3], 2, 0, 2),
        (&[2], 0, 1, 1),
    ] {
        let x: Tensor<T> = rand(rng, shape, -2.0, 2.0);
        let want = ReferenceBackend.narrow(&x, axis, start, len).unwrap();
        let got = cu.narrow(&x, axis, start, len).unwrap();
        bits(&format!("narrow {shape:?} axis {axis}"), &got, &want);
        let want_b = ReferenceBackend
            .narrow_backward(&want, shape, axis, start)
            .unwrap();
        let got_b = cu.narrow_backward(&want, shape, axis, start).unwrap();
        bits(
            &format!("narrow_backward {shape:?} axis {axis}"),
            &got_b,
            &want_b,
        );
    }
}

fn reduction_ops<T: CudaFloat>(cu: &CudaBackend, tol: f64, rng: &mut PhiloxStream) {
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 3, 4, 5], &[1]),
        (&[2, 3, 4, 5], &[2, 3]),
        (&[2, 3, 4, 5], &[0, 2, 3]),
        (&[2, 3, 4, 5], &[0, 1, 2, 3]),
        (&[2, 3, 4, 5], &[]),
        (&[3, 700], &[1]),              // past SEQ_MAX: two-pass path
        (&[2, 3 * CHUNK + 5], &[1]),    // several chunks per segment
        (&[5000, 3], &[0]),             // strided two-pass segments
        (&[2, 16, 40, 50], &[0, 2, 3]), // a bias gradient
    ];
    for &(shape, axes) in cases {
        let x: Tensor<T> = rand(rng, shape, -2.0, 2.0);
        let want = ReferenceBackend.sum_axes(&x, axes).unwrap();
        let got = cu.sum_axes(&x, axes).unwrap();
        let what = format!("sum_axes {shape:?} over {axes:?} ({})", T::DTYPE);
        let len: usize = axes.iter().map(|&a| shape[a]).product();
        if len <= SEQ_MAX {
            // One thread per output, the reference's order: bit-identical.
            bits(&what, &got, &want);
        } else {
            let want64 = ReferenceBackend.sum_axes(&x.cast::<f64>(), axes).unwrap();
            close(&what, &got, &want, sum_tol(tol, &want, &want64));
        }
    }

    for (shape, axis) in [
        (&[2usize, 3, 4][..], 0usize),
        (&[2, 3, 4], 1),
        (&[2, 3, 4], 2),
        (&[2, 1500], 1),    // block-per-row path
        (&[3, 1100, 2], 1), // long strided rows
        (&[1], 0),
        (&[2], 0), // the fusion weights
    ] {
        let x: Tensor<T> = rand(rng, shape, -3.0, 3.0);
        let want = ReferenceBackend.softmax(&x, axis).unwrap();
        let got = cu.softmax(&x, axis).unwrap();
        let what = format!("softmax {shape:?} axis {axis} ({})", T::DTYPE);
        let want64 = ReferenceBackend.softmax(&x.cast::<f64>(), axis).unwrap();
        close(&what, &got, &want, sum_tol(tol, &want, &want64));
        let dy: Tensor<T> = rand(rng, shape, -1.0, 1.0);
        let want_dx = ReferenceBackend.softmax_backward(&want, &dy, axis).unwrap();
        let got_dx = cu.softmax_backward(&want, &dy, axis).unwrap();
        let want_dx64 = ReferenceBackend
            .softmax_backward(&want.cast::<f64>(), &dy.cast::<f64>(), axis)
            .unwrap();
        let bound = sum_tol(tol, &want_dx, &want_dx64);
        close(&format!("{what} backward"), &got_dx, &want_dx, bound);
    }

    for shape in [&[2usize, 3, 4, 5][..], &[3 * CHUNK + 7], &[1]] {
        let a: Tensor<T> = rand(rng, shape, -2.0, 2.0);
        let b: Tensor<T> = rand(rng, shape, -2.0, 2.0);
        let t: Tensor<T> = rand(rng, shape, -2.0, 2.0);
        let what = format!("losses {shape:?} ({})", T::DTYPE);
        let (a64, b64, t64) = (a.cast::<f64>(), b.cast::<f64>(), t.cast::<f64>());
        let want = ReferenceBackend.sq_err_sum(&a, &b).unwrap();
        let want64 = ReferenceBackend.sq_err_sum(&a64, &b64).unwrap();
        close(
            &format!("{what} sq_err_sum"),
            &cu.sq_err_sum(&a, &b).unwrap(),
            &want,
            sum_tol(tol, &want, &want64),
        );
        let g = T::from_f64(0.7);
        bits(
            &format!("{what} sq_err_backward"),
            &cu.sq_err_backward(&a, &b, g).unwrap(),
            &ReferenceBackend.sq_err_backward(&a, &b, g).unwrap(),
        );
        let (wa, wb) = (T::from_f64(0.3), T::from_f64(0.7));
        let want = ReferenceBackend
            .weighted_pair_sq_err(&a, &b, wa, wb, &t)
            .unwrap();
        let want64 = ReferenceBackend
            .weighted_pair_sq_err(&a64, &b64, wa.as_f64(), wb.as_f64(), &t64)
            .unwrap();
        close(
            &format!("{what} weighted_pair_sq_err"),
            &cu.weighted_pair_sq_err(&a, &b, wa, wb, &t).unwrap(),
            &want,
            sum_tol(tol, &want, &want64),
        );
        let g = T::from_f64(0.45);
        let (da, db, dwa, dwb) = cu
            .weighted_pair_sq_err_backward(&a, &b, wa, wb, &t, g)
            .unwrap();
        let (ra, rb, rwa, rwb) = ReferenceBackend
            .weighted_pair_sq_err_backward(&a, &b, wa, wb, &t, g)
            .unwrap();
        bits(&format!("{what} weighted_pair da"), &da, &ra);
        bits(&format!("{what} weighted_pair db"), &db, &rb);
        let (_, _, rwa64, rwb64) = ReferenceBackend
            .weighted_pair_sq_err_backward(&a64, &b64, wa.as_f64(), wb.as_f64(), &t64, g.as_f64())
            .unwrap();
        for (name, got, want, want64) in [("dwa", dwa, rwa, rwa64), ("dwb", dwb, rwb, rwb64)] {
            let bound = sum_tol(tol, &scalar(want), &scalar(want64));
            close(
                &format!("{what} {name}"),
                &scalar(got),
                &scalar(want),
                bound,
            );
        }
    }
}

fn all_ops<T: CudaFloat>(cu: &CudaBackend, tol: f64, seed: u64) {
    let mut rng = PhiloxStream::new(seed, 0);
    conv_ops::<T>(cu, tol, &mut rng);
    elementwise_ops::<T>(cu, tol, &mut rng);
    reduction_ops::<T>(cu, tol, &mut rng);
    cu.synchronize().unwrap();
}

#[test]
fn every_op_matches_the_reference_f64() {
    let Some(cu) = cuda("every_op_matches_the_reference_f64") else {
        return;
    };
    all_ops::<f64>(&cu, F64_TOL, 1);
}

#[test]
fn every_op_matches_the_reference_f32() {
    let Some(cu) = cuda("every_op_matches_the_reference_f32") else {
        return;
    };
    all_ops::<f32>(&cu, F32_TOL, 2);
}

// ---- exact claims -------------------------------------------------------------

fn two_pass_sums_are_exactly_emulated<T: CudaFloat>(cu: &CudaBackend) {
    let mut rng = PhiloxStream::new(3, 0);
    for n in [1usize, 1000, CHUNK, 3 * CHUNK + 7, 100_003] {
        let a: Tensor<T> = rand(&mut rng, &[n], -2.0, 2.0);
        let b: Tensor<T> = rand(&mut rng, &[n], -2.0, 2.0);
        let t: Tensor<T> = rand(&mut rng, &[n], -2.0, 2.0);
        let (av, bv, tv) = (a.to_vec(), b.to_vec(), t.to_vec());
        let what = format!("n = {n} ({})", T::DTYPE);

        let want = emulate_two_pass_sum(n, |i| {
            let d = av[i] - bv[i];
            d * d
        });
        bits(
            &format!("sq_err_sum {what}"),
            &cu.sq_err_sum(&a, &b).unwrap(),
            &scalar(want),
        );

        let (wa, wb) = (T::from_f64(0.3), T::from_f64(0.7));
        let r = |i: usize| wa * av[i] + wb * bv[i] - tv[i];
        let want = emulate_two_pass_sum(n, |i| r(i) * r(i));
        bits(
            &format!("weighted_pair_sq_err {what}"),
            &cu.weighted_pair_sq_err(&a, &b, wa, wb, &t).unwrap(),
            &scalar(want),
        );
        let g = T::from_f64(0.45);
        let (_, _, dwa, dwb) = cu
            .weighted_pair_sq_err_backward(&a, &b, wa, wb, &t, g)
            .unwrap();
        let two_g = g + g;
        bits(
            &format!("dwa {what}"),
            &scalar(dwa),
            &scalar(two_g * emulate_two_pass_sum(n, |i| r(i) * av[i])),
        );
        bits(
            &format!("dwb {what}"),
            &scalar(dwb),
            &scalar(two_g * emulate_two_pass_sum(n, |i| r(i) * bv[i])),
        );
    }

    // sum_axes on its two-pass path: each segment is one emulated sum.
    let (segs, len) = (3, 3 * CHUNK + 5);
    let x: Tensor<T> = rand(&mut rng, &[segs, len], -2.0, 2.0);
    let xv = x.to_vec();
    let want: Vec<T> = (0..segs)
        .map(|s| emulate_two_pass_sum(len, |r| xv[s * len + r]))
        .collect();
    bits(
        &format!("sum_axes two-pass ({})", T::DTYPE),
        &cu.sum_axes(&x, &[1]).unwrap(),
        &Tensor::from_vec(&[segs, 1], want).unwrap(),
    );
}

#[test]
fn two_pass_sums_equal_their_host_emulation_bit_for_bit() {
    let Some(cu) = cuda("two_pass_sums_equal_their_host_emulation_bit_for_bit") else {
        return;
    };
    two_pass_sums_are_exactly_emulated::<f32>(&cu);
    two_pass_sums_are_exactly_emulated::<f64>(&cu);
}

#[test]
fn convolutions_are_bit_stable_across_runs() {
    let Some(cu) = cuda("convolutions_are_bit_stable_across_runs") else {
        return;
    };
    let mut rng = PhiloxStream::new(4, 0);
    let x: Tensor<f32> = rand(&mut rng, &[2, 32, 25, 42], -2.0, 2.0);
    let w: Tensor<f32> = rand(&mut rng, &[32, 32, 3, 3], -0.1, 0.1);
    let b: Tensor<f32> = rand(&mut rng, &[32], -0.1, 0.1);
    let opts = Conv2dOptions::same(1)
        .with_relu(true)
        .with_mask(InputMask::Spatial(rand_mask(&mut rng, &[2, 25, 42])));
    let args = conv_args(&x, &w, Some(&b), &opts).unwrap();
    let run = || {
        let y = cu.conv2d(&x, &w, Some(&b), &args).unwrap();
        let dx = cu.conv2d_backward_input(&y, &w, &args).unwrap();
        let dw = cu.conv2d_backward_weight(&y, &x, &args).unwrap();
        let db = cu.conv2d_backward_bias(&y).unwrap();
        (y.to_vec(), dx.to_vec(), dw.to_vec(), db.to_vec())
    };
    let first = run();
    for _ in 0..3 {
        let again = run();
        assert!(first == again, "a repeated conv changed bits");
    }
}

// ---- the whole loss ---------------------------------------------------------------

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

fn is_mask(name: &str) -> bool {
    name.contains(".mask_")
}

/// Compare two evaluations output by output; masks must be identical.
fn compare<T: Float>(
    what: &str,
    got: &Evaluation<T>,
    want: &Evaluation<T>,
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
        if is_mask(name) {
            bits(&format!("{what} {name}"), g, w);
        } else {
            close(&format!("{what} {name}"), g, w, tol(name));
        }
    }
}

fn whole_loss(test: &str, levels: &[LossLevel], n: usize, seed: u64) {
    let Some(cu) = cuda(test) else {
        return;
    };
    let cu: Arc<CudaBackend> = Arc::new(cu);
    let p64 = random_problem(levels, n, seed).unwrap();
    let reference: BackendRef<f64> = Arc::new(ReferenceBackend);
    let ref64 = evaluate(reference, &p64).unwrap();
    let cuda64: BackendRef<f64> = cu.clone();
    let got64 = evaluate(cuda64.clone(), &p64).unwrap();
    compare(&format!("{test} f64"), &got64, &ref64, |_| F64_TOL);
    // The device is deterministic: a second evaluation is bit-identical.
    let again = evaluate(cuda64, &p64).unwrap();
    for (name, t) in &got64.outputs {
        bits(&format!("{test} f64 rerun {name}"), &again.outputs[name], t);
    }

    let p32 = to_f32(&p64);
    let reference: BackendRef<f32> = Arc::new(ReferenceBackend);
    let ref32 = evaluate(reference, &p32).unwrap();
    let cuda32: BackendRef<f32> = cu.clone();
    let got32 = evaluate(cuda32, &p32).unwrap();
    // The f32 bound: F32_TOL, or 3x the reference's own f32 error against
    // f64 on this output where that is larger (see the module docs).
    let ref_err = |name: &str| -> f64 {
        let a: Tensor<f64> = ref32.outputs[name].cast();
        rel(&a, &ref64.outputs[name])
    };
    compare(&format!("{test} f32"), &got32, &ref32, |name| {
        F32_TOL.max(3.0 * ref_err(name))
    });
}

#[test]
fn dmkd_loss_matches_for_every_mask_mode() {
    if cuda("dmkd_loss_matches_for_every_mask_mode").is_none() {
        return;
    }
    for (i, mode) in [MaskMode::Topk, MaskMode::Sampled, MaskMode::Random]
        .into_iter()
        .enumerate()
    {
        let levels = [
            level(Method::Dmkd, 5, 6, (5, 7), mode),
            level(Method::Dmkd, 4, 4, (3, 3), mode),
        ];
        whole_loss(
            "dmkd_loss_matches_for_every_mask_mode",
            &levels,
            2,
            10 + i as u64,
        );
    }
}

#[test]
fn dmkd_loss_matches_at_extreme_ratios_and_tiny_planes() {
    let mut a = level(Method::Dmkd, 3, 5, (1, 1), MaskMode::Topk);
    (a.lambda_s, a.lambda_c) = (0.0, 0.99);
    let mut b = level(Method::Dmkd, 6, 6, (2, 7), MaskMode::Sampled);
    (b.lambda_s, b.lambda_c) = (0.99, 0.0);
    whole_loss(
        "dmkd_loss_matches_at_extreme_ratios_and_tiny_planes",
        &[a, b],
        1,
        20,
    );
}

#[test]
fn mgd_and_fgd_losses_match() {
    let levels = [
        level(Method::Mgd, 5, 4, (5, 5), MaskMode::Random),
        level(Method::Fgd, 4, 4, (7, 5), MaskMode::Topk),
    ];
    whole_loss("mgd_and_fgd_losses_match", &levels, 2, 30);
}

#[test]
fn dmkd_loss_matches_on_a_retinanet_shaped_level() {
    // RetinaNet's P5 plane (25x42 for an 800x1344 input), N = 2, C = 64:
    // long enough sums for the two-pass and block-per-row softmax paths.
    let levels = [level(Method::Dmkd, 64, 64, (25, 42), MaskMode::Topk)];
    whole_loss(
        "dmkd_loss_matches_on_a_retinanet_shaped_level",
        &levels,
        2,
        40,
    );
}

// ---- availability ----------------------------------------------------------------

#[test]
fn a_missing_device_is_an_error_not_a_panic() {
    let opts = BackendOptions {
        kind: BackendKind::Cuda,
        ..BackendOptions::default()
    };
    match (CudaBackend::new(), make_backend::<f32>(opts)) {
        (Ok(cu), Ok(be)) => {
            assert_eq!(Backend::<f32>::name(&cu), "cuda");
            assert_eq!(be.name(), "cuda");
            eprintln!("CUDA device: {}", cu.device_name());
        }
        (Err(e), Err(e2)) => {
            assert_eq!(e.kind(), "backend_unavailable", "{e}");
            assert_eq!(e2.kind(), "backend_unavailable", "{e2}");
            eprintln!("no CUDA device here (as expected on CPU machines): {e}");
        }
        (a, b) => panic!(
            "CudaBackend::new and make_backend disagree: {:?} vs {:?}",
            a.err(),
            b.err().map(|e| e.to_string())
        ),
    }
}
