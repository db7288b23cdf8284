//! FMA peak probe: the yardstick every GFLOP/s figure is compared with.
//!
//! Each thread runs 12 independent FMA chains on full registers (AVX2: 12
//! ymm, enough to cover the 4-cycle latency of Zen 3's two FMA pipes with
//! room to spare; AVX-512: 12 of the 32 zmm, against the 8 that two
//! 4-cycle FMA ports need) for a fixed count, with no memory traffic. The clock of
//! this machine varies from day to day (190 to 228 GFLOP/s f32 with 2
//! threads, `docs/engineering.md`), so a figure is only comparable with a probe
//! taken in the same run.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::Instant;

use pulp::{Simd, WithSimd};

use super::Isa;
use crate::error::Result;

/// Independent accumulation chains per thread.
const CHAINS: usize = 12;

struct Probe {
    iters: usize,
}

impl WithSimd for Probe {
    /// Lanes per register, so the caller can count flops.
    type Output = (usize, f32);

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        // x <- x * m + c converges to c / (1 - m): values stay finite.
        let m = simd.splat_f32s(black_box(0.999_999));
        let c = simd.splat_f32s(black_box(1e-6));
        let mut acc = [simd.splat_f32s(black_box(1.0)); CHAINS];
        for _ in 0..self.iters {
            for a in acc.iter_mut() {
                *a = simd.mul_add_f32s(*a, m, c);
            }
        }
        let mut out = [0.0f32; 64];
        let mut sum = 0.0;
        for a in acc {
            simd.partial_store_f32s(&mut out, a);
            sum += out[0];
        }
        (S::F32_LANES, sum)
    }
}

/// f32 FMA throughput of `threads` threads running at once, in GFLOP/s
/// (an FMA counts as 2 flops), on the widest instruction set this CPU has:
/// the best of a few short trials.
pub fn fma_peak_gflops(threads: usize) -> f64 {
    fma_peak_gflops_on(Isa::Auto, threads).expect("the widest instruction set runs")
}

/// [`fma_peak_gflops`] on a named instruction set (a figure measured with
/// `--isa avx2` is compared with the AVX2 peak); an error if this CPU
/// lacks it.
pub fn fma_peak_gflops_on(isa: Isa, threads: usize) -> Result<f64> {
    let threads = threads.max(1);
    let arch = isa.arch()?;
    let iters = 2_000_000;
    let mut best = 0.0f64;
    for _ in 0..10 {
        let barrier = Barrier::new(threads);
        let results: Vec<(f64, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let t = Instant::now();
                        let (lanes, sum) = arch.dispatch(Probe { iters });
                        black_box(sum);
                        (t.elapsed().as_secs_f64(), lanes)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("peak probe thread"))
                .collect()
        });
        // The slowest thread bounds the aggregate rate.
        let secs = results.iter().map(|r| r.0).fold(0.0, f64::max);
        let lanes = results[0].1;
        let flops = (threads * iters * CHAINS * lanes * 2) as f64;
        best = best.max(flops / secs / 1e9);
    }
    Ok(best)
}
