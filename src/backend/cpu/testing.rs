//! What the CPU kernels' unit tests share: fixed inputs, and the check that
//! a kernel run over every instruction set and thread count is right once
//! and the same bits every time.

use super::simd::Elem;
use crate::Tensor;

/// `len` values in [-1, 1) from a 64-bit LCG seeded by `seed`: the same
/// inputs on every run and machine.
pub(crate) fn values(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// A spatial mask of 3 images, `[3, h, w]`: image 0 nonzero only in its
/// top-left 3 x 5 corner (so most windows read only zeros), image 1 all
/// zeros, image 2 a checkerboard of zeros and values in 0.75..1.5 that
/// repeat only every 7 columns (a mask value read a register or two away
/// from where it should be, an even shift, then differs).
pub(crate) fn three_image_mask(h: usize, w: usize) -> Vec<f64> {
    let mut m = vec![0.0; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            m[y * w + x] = f64::from(u8::from(y < 3 && x < 5));
            m[(2 * h + y) * w + x] = if (x + y) % 2 == 0 {
                0.75 + 0.125 * ((3 * x + 5 * y) % 7) as f64
            } else {
                0.0
            };
        }
    }
    m
}

/// One of several runs of the same computation (other instruction sets,
/// thread counts) that must agree: the first is held to `want()` (in f64)
/// norm-wise, `||got - want|| / ||want|| < tol`, or, where `want` is all
/// zeros (a mask that keeps nothing), must be all zeros itself; every later
/// one must equal the first bit for bit (a zero's sign and a NaN payload
/// count).
pub(crate) fn first_near_then_same_bits<E: Elem>(
    first: &mut Option<Vec<E>>,
    got: Vec<E>,
    want: impl FnOnce() -> Vec<f64>,
    tol: f64,
    what: &str,
) {
    match first {
        None => {
            let want = want();
            assert_eq!(got.len(), want.len(), "{what}: length");
            let num: f64 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a.as_f64() - b).powi(2))
                .sum();
            let den: f64 = want.iter().map(|b| b * b).sum();
            if den == 0.0 {
                assert!(num == 0.0, "{what}: not all zeros, as expected");
                *first = Some(got);
                return;
            }
            let err = (num / den).sqrt();
            assert!(err < tol, "{what}: norm-wise error {err:e}");
            *first = Some(got);
        }
        Some(f) => assert!(
            pulp::bytemuck::cast_slice::<E, u8>(f) == pulp::bytemuck::cast_slice::<E, u8>(&got),
            "{what}: bits differ from the first run"
        ),
    }
}

/// `len` multiples of 1/4 in [-2, 2] from [`values`]: sums of up to 2^22
/// of them are exact in f32 whatever the order, so a reduction that adds
/// in its own order must still equal the reference's f64 sum bit for bit,
/// and an element dropped, repeated or misplaced shows.
pub(crate) fn quarters(len: usize, seed: u64) -> Vec<f64> {
    values(len, seed)
        .into_iter()
        .map(|v| (v * 8.0).round() / 4.0)
        .collect()
}

/// `f()` run in rayon pools of 1, 2 and 3 threads (3: chunks split
/// unevenly over the threads), one result per pool.
pub(crate) fn in_pools<R: Send>(f: impl Fn() -> R + Sync) -> Vec<R> {
    [1, 2, 3]
        .into_iter()
        .map(|threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a test thread pool")
                .install(&f)
        })
        .collect()
}

/// `got` has `want`'s shape and bits (a zero's sign and a NaN payload
/// count).
pub(crate) fn assert_same_bits<E: Elem>(got: &Tensor<E>, want: &Tensor<E>, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert_slices_same_bits(got.as_slice(), want.as_slice(), what);
}

/// [`assert_same_bits`] for plain slices: the same length and bits.
pub(crate) fn assert_slices_same_bits<E: Elem>(g: &[E], w: &[E], what: &str) {
    assert_eq!(g.len(), w.len(), "{what}: length");
    let bits = |x: &E| pulp::bytemuck::bytes_of(x).to_vec();
    if let Some(i) = (0..g.len()).find(|&i| bits(&g[i]) != bits(&w[i])) {
        panic!("{what}: element {i} is {:e}, want {:e}", g[i], w[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_rejects_a_wrong_first_run_and_a_changed_bit() {
        let want = vec![1.0, -2.0, 0.5];
        let mut first = None;
        first_near_then_same_bits(
            &mut first,
            vec![1.0f32, -2.0, 0.5],
            || want.clone(),
            1e-7,
            "a",
        );
        // The same values again pass; a -0 for a +0, or one ulp, do not.
        first_near_then_same_bits(
            &mut first,
            vec![1.0f32, -2.0, 0.5],
            || unreachable!(),
            0.0,
            "b",
        );
        let wrong_sign = std::panic::catch_unwind(|| {
            let mut f = Some(vec![0.0f32]);
            first_near_then_same_bits(&mut f, vec![-0.0f32], Vec::new, 0.0, "c");
        });
        assert!(wrong_sign.is_err());
        let one_ulp = std::panic::catch_unwind(|| {
            let mut f = Some(vec![1.0f32]);
            first_near_then_same_bits(&mut f, vec![1.0f32 + f32::EPSILON], Vec::new, 0.0, "d");
        });
        assert!(one_ulp.is_err());
        let too_far = std::panic::catch_unwind(|| {
            first_near_then_same_bits(&mut None, vec![1.0f64, 0.0], || vec![1.0, 0.1], 1e-3, "e");
        });
        assert!(too_far.is_err());
        // An all-zero expectation takes zeros only, whatever the tolerance.
        let mut zeros = None;
        first_near_then_same_bits(&mut zeros, vec![0.0f64, 0.0], || vec![0.0, 0.0], 1.0, "f");
        assert_eq!(zeros, Some(vec![0.0, 0.0]));
        let not_zero = std::panic::catch_unwind(|| {
            first_near_then_same_bits(&mut None, vec![0.0f64, 1e-30], || vec![0.0; 2], 1.0, "g");
        });
        assert!(not_zero.is_err());
        // Inputs: in [-1, 1), not constant, the same for the same seed.
        let v = values(1000, 7);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        assert!(v.iter().any(|&x| x < -0.5) && v.iter().any(|&x| x > 0.5));
        assert_eq!(v, values(1000, 7));
        assert_ne!(v, values(1000, 8));
    }
}
