//! The register-blocked GEMM microkernel: `C[MR x NR] (+)= A[MR x k] * B[k x NR]`.
//!
//! Design (`docs/engineering.md`, "GEMM throughput", measured on Zen 3): an MR = 6 by NR = two
//! registers tile (6 x 16 for f32 on AVX2, 6 x 8 for f64), i.e. 12
//! accumulators + 2 registers of B + 1 broadcast of A = 15 of the 16 ymm
//! registers, so nothing spills (a 4 x 24 tile needs all 16 and spilled,
//! 41% of peak). Each k step is 6 broadcasts of A, 2 loads of B and 12
//! FMAs: 6 cycles at 2 FMAs per cycle, well inside Zen 3's 3 loads per cycle.
//!
//! AVX-512 (measured on a Zen 5, `docs/engineering.md`, "GEMM throughput"): the same
//! shape, 6 x 32 (12 of the 32 zmm registers). 6 x 48, 6 x 64, 8 x 32 and 12 x 32 (up to
//! 24 accumulators) and k-blocks of 128 or 512 all timed within the noise of 6 x 32 on the
//! P3/P4 convs, alternated call by call; this kernel reaches 90-100% of the one-thread peak
//! on L1-resident operands there, so the tile is not what limits the convs.
//!
//! B is always packed (`[k][NR]`, contiguous). A is read through MR row
//! pointers and one shared index, `a[r][off + seg * seg_jump + i * step]`
//! for `k = seg * seg_len + i`: that covers a packed A panel (`step = MR`),
//! plain row-major rows (`step = 1`) and the shifted windows of an image
//! that the weight gradient reads without any im2col copy (`step =
//! stride`, one segment per output row).
//!
//! Determinism: every output is one fused multiply-add chain in k order,
//! started from the value already in C when `accumulate` is set. Splitting
//! k into blocks and resuming from C gives the same bits as one long
//! chain, so neither the block sizes nor the thread count can change a
//! result, and lanes never mix (no reduction across a register).

use std::marker::PhantomData;

use pulp::Simd;

use super::simd::{self, Elem, Level};

/// Rows of the register tile.
pub(crate) const MR: usize = 6;

/// Largest NR of any instruction set (AVX-512 f32 would be 32).
pub(crate) const NR_MAX: usize = 32;

/// Columns of the register tile under `S`: two registers.
#[inline(always)]
pub(crate) fn nr<E: Elem, S: Simd>() -> usize {
    2 * E::lanes::<S>()
}

/// How the kernel walks the A rows along k (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AWalk {
    pub off: usize,
    pub step: usize,
    pub seg_len: usize,
    pub nseg: usize,
    pub seg_jump: usize,
}

impl AWalk {
    /// A single contiguous run of `k` elements from `off` with stride `step`.
    pub fn run(off: usize, step: usize, k: usize) -> Self {
        AWalk {
            off,
            step,
            seg_len: k,
            nseg: 1,
            seg_jump: 0,
        }
    }

    /// Length of the k loop.
    pub fn k(&self) -> usize {
        self.seg_len * self.nseg
    }

    /// Largest index read from an A row, if any.
    fn last(&self) -> Option<usize> {
        (self.k() > 0)
            .then(|| self.off + (self.nseg - 1) * self.seg_jump + (self.seg_len - 1) * self.step)
    }
}

/// Prefetch distance along A, in k steps: A streams from L2 (a packed
/// panel, or image rows for the weight gradient); fetching row 0 about 16
/// steps ahead gained ~0.7% of peak on the forward pass (A/B runs, P3/P4).
const PF_A: usize = 16;

/// The raw kernel.
///
/// # Safety
/// - `a[r] + w.off + s * w.seg_jump + i * w.step` readable for every row
///   `r < MR`, segment `s` and `i < w.seg_len`;
/// - `b .. b + w.k() * NR` readable;
/// - `c + r * ldc .. + NR` readable and writable for `r < MR`, not aliased.
///
/// `prefetch` is only a hint and may point anywhere.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_raw<E: Elem, S: Simd, const STEP: usize>(
    simd: S,
    a: [*const E; MR],
    w: AWalk,
    b: *const E,
    c: *mut E,
    ldc: usize,
    accumulate: bool,
    prefetch: *const E,
) {
    let l = E::lanes::<S>();
    // A compile-time step (STEP > 0) lets the six A rows share one index
    // register (or one pointer, for a packed panel whose rows are
    // consecutive); a run-time step became six pointer increments per k
    // step, 3% of peak.
    let step = if STEP > 0 { STEP } else { w.step };
    let zero = E::splat(simd, E::zero());
    let mut acc = [[zero; 2]; MR];
    // SAFETY: all pointer arithmetic below stays in the ranges the caller
    // guarantees (see the function's contract).
    unsafe {
        // The next C tile is read right after this call; start fetching it
        // now so its latency hides behind this call's FMAs (76 -> 92
        // GFLOP/s on one core in the experiment of `docs/engineering.md`). A row
        // of the tile may straddle two cache lines: fetch both ends.
        let last = 2 * l - 1;
        for r in 0..MR {
            let p = prefetch.wrapping_add(r * ldc);
            simd::prefetch(p, Level::L1);
            simd::prefetch(p.wrapping_add(last), Level::L1);
        }
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = E::load_ptr::<S>(c.add(r * ldc));
                row[1] = E::load_ptr::<S>(c.add(r * ldc + l));
            }
        }
        let mut bp = b;
        let mut base = w.off;
        for _ in 0..w.nseg {
            let mut i = base;
            for _ in 0..w.seg_len {
                if PF_A > 0 {
                    simd::prefetch(a[0].wrapping_add(i + PF_A * step), Level::L1);
                }
                let b0 = E::load_ptr::<S>(bp);
                let b1 = E::load_ptr::<S>(bp.add(l));
                for r in 0..MR {
                    let ar = E::splat(simd, *a[r].add(i));
                    acc[r][0] = E::fma(simd, ar, b0, acc[r][0]);
                    acc[r][1] = E::fma(simd, ar, b1, acc[r][1]);
                }
                bp = bp.add(2 * l);
                i += step;
            }
            base += w.seg_jump;
        }
        for (r, row) in acc.iter().enumerate() {
            E::store_ptr::<S>(c.add(r * ldc), row[0]);
            E::store_ptr::<S>(c.add(r * ldc + l), row[1]);
        }
    }
}

/// A mutable block of columns `[col0, col0 + cols)` of a row-major matrix
/// with `rows` rows and leading dimension `ld`.
///
/// Blocks made by one [`split_columns`] call are disjoint, so different
/// threads may write them at once (the output of one image is split
/// between threads by position, which interleaves in memory).
pub(crate) struct ColBlock<'a, E> {
    ptr: *mut E,
    ld: usize,
    rows: usize,
    cols: usize,
    _borrow: PhantomData<&'a mut [E]>,
}

// SAFETY: a ColBlock is an exclusive borrow of its (disjoint) elements,
// like a `&mut [E]`, which is Send when E is.
unsafe impl<E: Send> Send for ColBlock<'_, E> {}

impl<'a, E> ColBlock<'a, E> {
    /// The whole of a contiguous row-major matrix.
    pub fn whole(data: &'a mut [E], rows: usize, cols: usize) -> Self {
        assert!(rows * cols <= data.len());
        ColBlock {
            ptr: data.as_mut_ptr(),
            ld: cols,
            rows,
            cols,
            _borrow: PhantomData,
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` of the block.
    pub fn row_mut(&mut self, r: usize) -> &mut [E] {
        assert!(r < self.rows);
        // SAFETY: the block owns columns [0, cols) of each of its rows
        // (checked at construction), and `&mut self` makes this borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.ld), self.cols) }
    }
}

/// Split `data` (a row-major `rows x ld` matrix) into column blocks at the
/// increasing boundaries `bounds` (first 0, last at most `ld`).
pub(crate) fn split_columns<'a, E>(
    data: &'a mut [E],
    rows: usize,
    ld: usize,
    bounds: &[usize],
) -> Vec<ColBlock<'a, E>> {
    assert!(rows * ld <= data.len(), "matrix larger than its storage");
    assert!(bounds.windows(2).all(|w| w[0] <= w[1]));
    assert!(bounds.last().is_none_or(|&b| b <= ld));
    let ptr = data.as_mut_ptr();
    bounds
        .windows(2)
        .map(|w| ColBlock {
            // SAFETY: w[0] <= ld <= data.len() (or rows == 0 and the block is empty).
            ptr: ptr.wrapping_add(w[0]),
            ld,
            rows,
            cols: w[1] - w[0],
            _borrow: PhantomData,
        })
        .collect()
}

/// Run the kernel on the tile at `(r0, c0)` of `c`: rows past the block's
/// end are computed but dropped (their A rows must still be readable, e.g.
/// repeat a valid row), columns past the end come from zero-padded B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_tile<E: Elem, S: Simd>(
    simd: S,
    a: [&[E]; MR],
    w: AWalk,
    b: &[E],
    c: &mut ColBlock<'_, E>,
    r0: usize,
    c0: usize,
    accumulate: bool,
    prefetch: *const E,
) {
    let nr = nr::<E, S>();
    assert!(nr <= NR_MAX && r0 < c.rows && c0 < c.cols);
    if let Some(last) = w.last() {
        for row in &a {
            assert!(last < row.len(), "A row too short for the walk");
        }
    }
    assert!(b.len() >= w.k() * nr, "B panel too short");
    let rows = MR.min(c.rows - r0);
    let cols = nr.min(c.cols - c0);
    let ap = a.map(|s| s.as_ptr());
    if rows == MR && cols == nr {
        // SAFETY: A and B ranges checked above; the MR x NR tile lies inside
        // the block (rows and cols checked), which this `&mut` owns.
        unsafe {
            let cp = c.ptr.add(r0 * c.ld + c0);
            if w.step == 1 {
                kernel_raw::<E, S, 1>(simd, ap, w, b.as_ptr(), cp, c.ld, accumulate, prefetch);
            } else {
                kernel_raw::<E, S, 0>(simd, ap, w, b.as_ptr(), cp, c.ld, accumulate, prefetch);
            }
        }
    } else {
        // Edge tile: run on a local full tile, copy the valid part.
        let mut local = [E::zero(); MR * NR_MAX];
        if accumulate {
            for r in 0..rows {
                local[r * nr..r * nr + cols].copy_from_slice(&c.row_mut(r0 + r)[c0..c0 + cols]);
            }
        }
        // SAFETY: A and B checked above; `local` holds MR x nr elements.
        unsafe {
            kernel_raw::<E, S, 0>(
                simd,
                ap,
                w,
                b.as_ptr(),
                local.as_mut_ptr(),
                nr,
                accumulate,
                prefetch,
            );
        }
        for r in 0..rows {
            c.row_mut(r0 + r)[c0..c0 + cols].copy_from_slice(&local[r * nr..r * nr + cols]);
        }
    }
}

/// [`run_tile`] for a full MR x NR tile `c` (row-major, `MR * NR`) and a
/// packed A panel (`[k][MR]`, rows consecutive): the step is then known at
/// compile time and the six rows are one pointer.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_packed_tile<E: Elem, S: Simd>(
    simd: S,
    panel: &[E],
    k: usize,
    b: &[E],
    c: &mut [E],
    accumulate: bool,
    prefetch: *const E,
) {
    let nr = nr::<E, S>();
    assert!(panel.len() >= k * MR, "A panel too short");
    assert!(b.len() >= k * nr, "B panel too short");
    assert!(c.len() >= MR * nr, "C tile too short");
    let base = panel.as_ptr();
    let ap: [*const E; MR] = std::array::from_fn(|r| base.wrapping_add(r));
    // SAFETY: row r reads panel[r + i * MR] for i < k, inside the panel
    // (checked); B and C checked above; `c` is borrowed mutably.
    unsafe {
        kernel_raw::<E, S, MR>(
            simd,
            ap,
            AWalk::run(0, MR, k),
            b.as_ptr(),
            c.as_mut_ptr(),
            nr,
            accumulate,
            prefetch,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulp::WithSimd;

    /// Plain fused loops with the same k order as the kernel.
    fn oracle(a: &[Vec<f32>], w: AWalk, b: &[f32], nr: usize, c: &mut [f32], ldc: usize) {
        for (r, row) in a.iter().enumerate() {
            for j in 0..nr {
                let mut acc = c[r * ldc + j];
                let mut k = 0;
                for s in 0..w.nseg {
                    for i in 0..w.seg_len {
                        let av = row[w.off + s * w.seg_jump + i * w.step];
                        acc = av.mul_add(b[k * nr + j], acc);
                        k += 1;
                    }
                }
                c[r * ldc + j] = acc;
            }
        }
    }

    struct Case {
        walk: AWalk,
        /// The block: its rows, its first column in the matrix, its width.
        rows: usize,
        start: usize,
        cols: usize,
        /// Where in the block the tile goes (row, column).
        at: (usize, usize),
        accumulate: bool,
    }

    /// One past the largest A index the walk reads (0 for an empty walk),
    /// from the oracle's own index formula.
    fn walk_len(w: AWalk) -> usize {
        (0..w.nseg)
            .flat_map(|s| (0..w.seg_len).map(move |i| w.off + s * w.seg_jump + i * w.step))
            .max()
            .map_or(0, |last| last + 1)
    }

    impl WithSimd for Case {
        type Output = ();
        fn with_simd<S: Simd>(self, simd: S) {
            let nr = nr::<f32, S>();
            let w = self.walk;
            // A rows exactly as long as the walk needs.
            let len = walk_len(w);
            assert_eq!(w.last(), len.checked_sub(1), "{w:?}: last index");
            let a: Vec<Vec<f32>> = (0..MR)
                .map(|r| {
                    (0..len)
                        .map(|i| ((r * 31 + i * 7) % 13) as f32 * 0.25 - 1.0)
                        .collect()
                })
                .collect();
            let b: Vec<f32> = (0..w.k() * nr)
                .map(|i| ((i * 11) % 17) as f32 * 0.125 - 1.0)
                .collect();
            let (start, end) = (self.start, self.start + self.cols);
            let (r0, c0) = self.at;
            let ld = end + 3;
            // The matrix, then MR guard rows that nothing may write.
            let init: Vec<f32> = (0..(self.rows + MR) * ld).map(|i| i as f32 * 0.5).collect();
            let mut got = init.clone();
            {
                // The block between two others.
                let mut blk =
                    split_columns(&mut got, self.rows, ld, &[0, start, end, ld]).remove(1);
                assert_eq!(blk.cols(), self.cols);
                let rows: [&[f32]; MR] = std::array::from_fn(|r| a[r].as_slice());
                run_tile::<f32, S>(
                    simd,
                    rows,
                    w,
                    &b,
                    &mut blk,
                    r0,
                    c0,
                    self.accumulate,
                    std::ptr::null(),
                );
            }
            // The tile's part of the block: rows r0.., matrix columns start + c0..
            let (tr, tc) = (MR.min(self.rows - r0), nr.min(self.cols - c0));
            let col0 = start + c0;
            let mut want_full = vec![0.0f32; MR * nr];
            if self.accumulate {
                for r in 0..tr {
                    for j in 0..tc {
                        want_full[r * nr + j] = init[(r0 + r) * ld + col0 + j];
                    }
                }
            }
            oracle(&a, w, &b, nr, &mut want_full, nr);
            for r in 0..self.rows + MR {
                for j in 0..ld {
                    let g = got[r * ld + j];
                    let inside = (r0..r0 + tr).contains(&r) && (col0..col0 + tc).contains(&j);
                    let want = if inside {
                        want_full[(r - r0) * nr + j - col0]
                    } else {
                        init[r * ld + j]
                    };
                    assert_eq!(g.to_bits(), want.to_bits(), "r {r} j {j}");
                }
            }
        }
    }

    struct Packed {
        k: usize,
        accumulate: bool,
    }

    impl WithSimd for Packed {
        type Output = ();
        fn with_simd<S: Simd>(self, simd: S) {
            let nr = nr::<f32, S>();
            let panel: Vec<f32> = (0..self.k * MR)
                .map(|i| ((i * 5) % 11) as f32 * 0.5 - 2.0)
                .collect();
            let b: Vec<f32> = (0..self.k * nr)
                .map(|i| ((i * 3) % 7) as f32 * 0.25 - 0.5)
                .collect();
            let init: Vec<f32> = (0..MR * nr).map(|i| i as f32 * 0.125).collect();
            let mut got = init.clone();
            run_packed_tile::<f32, S>(
                simd,
                &panel,
                self.k,
                &b,
                &mut got,
                self.accumulate,
                std::ptr::null(),
            );
            // Row r of a packed panel is panel[r + i * MR].
            let rows: Vec<Vec<f32>> = (0..MR).map(|r| panel[r..].to_vec()).collect();
            let mut want = if self.accumulate {
                init
            } else {
                vec![0.0; MR * nr]
            };
            oracle(&rows, AWalk::run(0, MR, self.k), &b, nr, &mut want, nr);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "element {i}");
            }
        }
    }

    #[test]
    fn packed_kernel_matches_fused_loops_bit_for_bit() {
        for arch in crate::backend::cpu::Isa::every_arch() {
            for (k, accumulate) in [(1, false), (7, true), (256, false), (33, true)] {
                arch.dispatch(Packed { k, accumulate });
            }
        }
    }

    #[test]
    fn kernel_matches_fused_loops_bit_for_bit() {
        for arch in crate::backend::cpu::Isa::every_arch() {
            for (walk, rows, start, cols, at, accumulate) in [
                (AWalk::run(0, 1, 37), 6, 0, 16, (0, 0), false),
                (AWalk::run(3, 6, 20), 6, 5, 16, (0, 0), true),
                (AWalk::run(0, 1, 5), 4, 2, 11, (0, 0), true),
                (AWalk::run(0, 1, 1), 1, 0, 1, (0, 0), false),
                // An empty walk: C is kept (accumulate) or zeroed.
                (AWalk::run(0, 1, 0), 6, 3, 16, (0, 0), true),
                (AWalk::run(0, 1, 0), 6, 0, 16, (0, 0), false),
                (
                    AWalk {
                        off: 2,
                        step: 2,
                        seg_len: 5,
                        nseg: 3,
                        seg_jump: 17,
                    },
                    6,
                    7,
                    8,
                    (0, 0),
                    true,
                ),
                // Tiles inside a block: a full one, one cut by the block's
                // last rows (all NR columns), one cut by its last columns.
                (AWalk::run(2, 3, 6), 12, 1, 50, (5, 7), true),
                (AWalk::run(0, 1, 9), 7, 4, 40, (3, 3), true),
                (AWalk::run(0, 1, 9), 9, 4, 40, (2, 30), false),
            ] {
                arch.dispatch(Case {
                    walk,
                    rows,
                    start,
                    cols,
                    at,
                    accumulate,
                });
            }
        }
    }

    /// The safe wrapper refuses an A row one element shorter than the walk
    /// reads (the raw kernel would read past it).
    #[test]
    #[should_panic(expected = "A row too short")]
    fn a_row_shorter_than_the_walk_is_refused() {
        struct Short;
        impl WithSimd for Short {
            type Output = ();
            fn with_simd<S: Simd>(self, simd: S) {
                let nr = nr::<f32, S>();
                let w = AWalk {
                    off: 1,
                    step: 2,
                    seg_len: 4,
                    nseg: 2,
                    seg_jump: 9,
                };
                let a = vec![0.5f32; walk_len(w) - 1];
                let b = vec![1.0f32; w.k() * nr];
                let mut c = vec![0.0f32; MR * nr];
                let mut blk = ColBlock::whole(&mut c, MR, nr);
                let rows: [&[f32]; MR] = [&a; MR];
                run_tile::<f32, S>(simd, rows, w, &b, &mut blk, 0, 0, false, std::ptr::null());
            }
        }
        pulp::Arch::new().dispatch(Short);
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use pulp::{Arch, WithSimd};

    struct Bench {
        k: usize,
        reps: usize,
    }
    impl WithSimd for Bench {
        type Output = f64;
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) -> f64 {
            let nr = nr::<f32, S>();
            let a = vec![0.5f32; self.k * MR];
            let b = vec![0.25f32; self.k * nr];
            let mut c = vec![0.0f32; MR * nr * 4];
            // CPU time of this thread (the machine may be shared).
            let cpu = || -> f64 {
                std::fs::read_to_string("/proc/thread-self/schedstat")
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    * 1e-9
            };
            let t = cpu();
            for i in 0..self.reps {
                let mut blk = ColBlock::whole(&mut c[(i % 4) * MR * nr..], MR, nr);
                let rows: [&[f32]; MR] = std::array::from_fn(|r| &a[r..]);
                run_tile(
                    simd,
                    rows,
                    AWalk::run(0, MR, self.k),
                    &b,
                    &mut blk,
                    0,
                    0,
                    true,
                    std::ptr::null(),
                );
            }
            let s = cpu() - t;
            std::hint::black_box(&c);
            (2 * MR * nr * self.k * self.reps) as f64 / s / 1e9
        }
    }

    /// `cargo test --release --lib kernel_speed -- --ignored --nocapture`:
    /// the microkernel on L1-resident operands against the FMA peak.
    #[test]
    #[ignore]
    fn kernel_speed() {
        let peak = crate::backend::cpu::fma_peak_gflops(1);
        for k in [64, 128, 256, 512] {
            let g = Arch::new().dispatch(Bench {
                k,
                reps: 2_000_000 / k * 16,
            });
            println!(
                "k {k}: {g:.1} GFLOP/s, {:.1}% of {peak:.1}",
                100.0 * g / peak
            );
        }
    }
}
