//! Claims only the CUDA backend makes, beyond the conformance suite
//! (`tests/conformance/`, where CUDA is one entry of the backend list):
//! its two-pass sums equal their host emulation bit for bit, repeated
//! convolutions are bit-identical, and a missing device is an error, not a
//! panic.
//!
//! Without a usable CUDA device (no driver, no NVRTC or cuBLAS, no GPU)
//! every device test prints one line saying why and passes, so this file
//! runs in CI; on a GPU machine it is part of the backend's acceptance test.
#![cfg(feature = "cuda")]

use dmkd::backend::cuda::reduce::CHUNK;
use dmkd::backend::cuda::{CudaBackend, CudaFloat, emulate_two_pass_sum};
use dmkd::backend::{Backend, BackendKind, BackendOptions, InputMask, make_backend};
use dmkd::ops::conv::conv_args;
use dmkd::rng::PhiloxStream;
use dmkd::{Conv2dOptions, Float, Tensor};

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

fn scalar<T: Float>(v: T) -> Tensor<T> {
    Tensor::scalar(v)
}

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
        let p = cu.weighted_pair_residual(&a, &b, wa, wb, &t).unwrap();
        let rv: Vec<T> = (0..n).map(r).collect();
        bits(
            &format!("weighted_pair_residual r {what}"),
            &p.residual,
            &Tensor::from_vec(&[n], rv).unwrap(),
        );
        bits(
            &format!("weighted_pair_residual sum(r^2) {what}"),
            &scalar(p.sq_sum),
            &scalar(want),
        );
        bits(
            &format!("<r, a> {what}"),
            &scalar(p.dot_a),
            &scalar(emulate_two_pass_sum(n, |i| r(i) * av[i])),
        );
        bits(
            &format!("<r, b> {what}"),
            &scalar(p.dot_b),
            &scalar(emulate_two_pass_sum(n, |i| r(i) * bv[i])),
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
