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
//! on L1-resident operands there, so the tile is not what limits the convs. On an Intel
//! Xeon (family 6 model 167) it does: 6 x 32 reached 70-74% of that peak and 12 x 32 86-87%
//! (`kernel_speed`), so with 512-bit vectors the callers run two row panels per call
//! ([`run_packed_pair`], [`run_tile_pair`]: a 12 x NR tile over the same MR-row panels, so
//! no packing changes). [`kernel_rows`] is the one kernel, over 6 or 12 rows.
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

use super::simd::{self, Ahead, Elem, Level};

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

/// k steps per A prefetch (one per panel): a packed f32 panel advances 24
/// bytes a step, so a hint every second step still touches each 64-byte
/// line. Half the hints, and the loop's counters updated once per two
/// steps (Intel Xeon family 6 model 167, AVX-512, 2 threads,
/// `examples/conv_speed`, medians of 7, three alternating rounds, faster
/// in each): direct P3 forward 131.8-133.0 -> 130.6-131.2 ms, input
/// gradient 132.5-133.1 -> 130.6-131.5, P4 forward 33.3-33.4 -> 32.8-33.0;
/// the weight gradient (A walked along image rows, 4 bytes a step) and the
/// Winograd forward within noise. No hints at all timed within noise of
/// one a step, if anything slower. A packed f64 panel advances 48 bytes a
/// step, so it keeps one hint a step.
#[inline(always)]
const fn pf_a_every<E>() -> usize {
    if std::mem::size_of::<E>() <= 4 { 2 } else { 1 }
}

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
    ahead: Ahead,
) {
    // SAFETY: row r of C is `c + r * ldc`, as `kernel_rows` asks; the rest
    // is the caller's contract, passed on.
    unsafe {
        kernel_rows::<E, S, STEP, MR>(
            simd,
            a,
            w,
            b,
            std::array::from_fn(|r| c.add(r * ldc)),
            accumulate,
            std::array::from_fn(|r| prefetch.wrapping_add(r * ldc)),
            ahead,
        )
    }
}

/// The kernel on `R` rows (`MR`, or `2 * MR`: two panels at once, see
/// [`pairs_panels`]): `c[r][j] (+)= sum_k a[r][k] * b[k][j]`.
///
/// # Safety
/// - `a[r] + w.off + s * w.seg_jump + i * w.step` readable for every row
///   `r < R`, segment `s` and `i < w.seg_len`;
/// - `b .. b + w.k() * NR` readable;
/// - `c[r] .. c[r] + NR` readable and writable for `r < R`, not aliased.
///
/// `prefetch` (the rows of the C tile read next) and `ahead` (lines into
/// L2, one per A hint, the rest after the k loop) are only hints and may
/// point anywhere.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_rows<E: Elem, S: Simd, const STEP: usize, const R: usize>(
    simd: S,
    a: [*const E; R],
    w: AWalk,
    b: *const E,
    c: [*mut E; R],
    accumulate: bool,
    prefetch: [*const E; R],
    mut ahead: Ahead,
) {
    let l = E::lanes::<S>();
    // A compile-time step (STEP > 0) lets the six A rows share one index
    // register (or one pointer, for a packed panel whose rows are
    // consecutive); a run-time step became six pointer increments per k
    // step, 3% of peak.
    let step = if STEP > 0 { STEP } else { w.step };
    let zero = E::splat(simd, E::zero());
    let mut acc = [[zero; 2]; R];
    // SAFETY: all pointer arithmetic below stays in the ranges the caller
    // guarantees (see the function's contract).
    unsafe {
        // The next C tile is read right after this call; start fetching it
        // now so its latency hides behind this call's FMAs (76 -> 92
        // GFLOP/s on one core in the experiment of `docs/engineering.md`). A row
        // of the tile may straddle two cache lines: fetch both ends.
        let last = 2 * l - 1;
        for p in prefetch {
            simd::prefetch(p, Level::L1);
            simd::prefetch(p.wrapping_add(last), Level::L1);
        }
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = E::load_ptr::<S>(c[r]);
                row[1] = E::load_ptr::<S>(c[r].add(l));
            }
        }
        // One k step: row r's value at index i times the B row at bp.
        let k_step = |acc: &mut [[E::V<S>; 2]; R], i: usize, bp: *const E| {
            let b0 = E::load_ptr::<S>(bp);
            let b1 = E::load_ptr::<S>(bp.add(l));
            for r in 0..R {
                let ar = E::splat(simd, *a[r].add(i));
                acc[r][0] = E::fma(simd, ar, b0, acc[r][0]);
                acc[r][1] = E::fma(simd, ar, b1, acc[r][1]);
            }
        };
        let every = pf_a_every::<E>();
        let mut bp = b;
        let mut base = w.off;
        for _ in 0..w.nseg {
            let mut i = base;
            let mut left = w.seg_len;
            while left >= every {
                for h in (0..R).step_by(MR) {
                    simd::prefetch(a[h].wrapping_add(i + PF_A * step), Level::L1);
                }
                if let Some(line) = ahead.next_line() {
                    simd::prefetch(line, Level::L2);
                }
                for u in 0..every {
                    k_step(&mut acc, i + u * step, bp.add(u * 2 * l));
                }
                bp = bp.add(every * 2 * l);
                i += every * step;
                left -= every;
            }
            for _ in 0..left {
                k_step(&mut acc, i, bp);
                bp = bp.add(2 * l);
                i += step;
            }
            base += w.seg_jump;
        }
        // What the k loop had no turn left for (a short k).
        while let Some(line) = ahead.next_line() {
            simd::prefetch(line, Level::L2);
        }
        for (r, row) in acc.iter().enumerate() {
            E::store_ptr::<S>(c[r], row[0]);
            E::store_ptr::<S>(c[r].add(l), row[1]);
        }
    }
}

/// Whether `S` runs two row panels per kernel call ([`run_packed_pair`]):
/// with 512-bit vectors there are 32 registers, so a 12 x NR tile's 24
/// accumulators, 2 registers of B and 1 broadcast of A fit (with 16
/// registers only the 6-row tile does).
///
/// Why (Intel Xeon family 6 model 167, AVX-512, one thread, L1-resident
/// operands, a stand-alone copy of the kernel, 2026-12-05): 6 x 32 ran at
/// 168-172 GFLOP/s against a 197-210 probe (81%), 12 x 32 at 183-190
/// (88-90%): each k step's 6 broadcasts and 2 loads of B then serve 24
/// FMAs instead of 12.
#[inline(always)]
pub(crate) fn pairs_panels<E: Elem, S: Simd>() -> bool {
    E::lanes::<S>() * std::mem::size_of::<E>() == 64
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
    ahead: Ahead,
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
            let (bp, cp, ld) = (b.as_ptr(), c.ptr.add(r0 * c.ld + c0), c.ld);
            if w.step == 1 {
                kernel_raw::<E, S, 1>(simd, ap, w, bp, cp, ld, accumulate, prefetch, ahead);
            } else {
                kernel_raw::<E, S, 0>(simd, ap, w, bp, cp, ld, accumulate, prefetch, ahead);
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
                ahead,
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
    ahead: Ahead,
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
            ahead,
        );
    }
}

/// The row panels `0 .. panels` as the kernel calls take them, in order:
/// two at a time (`p .. p + 2`) where the ISA [`pairs_panels`] and
/// `pairable(p)` says panels `p` and `p + 1` may share a call, else one.
pub(crate) fn panel_steps<E: Elem, S: Simd>(
    panels: usize,
    pairable: impl Fn(usize) -> bool,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let pairs = pairs_panels::<E, S>();
    let mut p = 0;
    std::iter::from_fn(move || {
        (p < panels).then(|| {
            let n = if pairs && p + 1 < panels && pairable(p) {
                2
            } else {
                1
            };
            p += n;
            p - n..p
        })
    })
}

/// The two C tiles of `len` values at `at[0]` and `at[1]` (`at[0] + len
/// <= at[1]`) of `c`, borrowed together for a pair call.
pub(crate) fn tile_pair<E>(c: &mut [E], at: [usize; 2], len: usize) -> [&mut [E]; 2] {
    assert!(at[0] + len <= at[1], "the tiles overlap");
    let (lo, hi) = c.split_at_mut(at[1]);
    [&mut lo[at[0]..at[0] + len], &mut hi[..len]]
}

/// [`run_packed_tile`] on two A panels at once (a 12 x NR tile, where
/// [`pairs_panels`]): `c[h] (+)= panels[h] * b` for `h` = 0, 1, each
/// output the same fused chain as one panel's call gives it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_packed_pair<E: Elem, S: Simd>(
    simd: S,
    panels: [&[E]; 2],
    k: usize,
    b: &[E],
    c: [&mut [E]; 2],
    accumulate: bool,
    prefetch: [*const E; 2],
    ahead: Ahead,
) {
    for p in panels {
        assert!(p.len() >= k * MR, "A panel too short");
    }
    let (rows, pf) = pair_rows::<E, S>(c, prefetch, b, k);
    let ap: [*const E; 2 * MR] =
        std::array::from_fn(|r| panels[r / MR].as_ptr().wrapping_add(r % MR));
    let w = AWalk::run(0, MR, k);
    // SAFETY: row r reads panels[r / MR][r % MR + i * MR] for i < k, inside
    // its panel (checked); B and both C tiles checked above, and the two
    // `&mut` tiles cannot alias.
    unsafe {
        kernel_rows::<E, S, MR, { 2 * MR }>(simd, ap, w, b.as_ptr(), rows, accumulate, pf, ahead)
    }
}

/// The checks both pair wrappers make (the ISA pairs, `b` holds `k` rows
/// of NR, each C tile MR x NR), then the 12 C rows of the pair and the
/// rows of the pair read next (a hint), as [`kernel_rows`] takes them.
#[inline(always)]
fn pair_rows<E: Elem, S: Simd>(
    c: [&mut [E]; 2],
    prefetch: [*const E; 2],
    b: &[E],
    k: usize,
) -> ([*mut E; 2 * MR], [*const E; 2 * MR]) {
    let nr = nr::<E, S>();
    assert!(
        pairs_panels::<E, S>(),
        "two panels need 32 vector registers"
    );
    assert!(b.len() >= k * nr, "B panel too short");
    for t in &c {
        assert!(t.len() >= MR * nr, "C tile too short");
    }
    let [c0, c1] = c;
    let cp = [c0.as_mut_ptr(), c1.as_mut_ptr()];
    (
        std::array::from_fn(|r| cp[r / MR].wrapping_add((r % MR) * nr)),
        std::array::from_fn(|r| prefetch[r / MR].wrapping_add((r % MR) * nr)),
    )
}

/// [`run_tile`] on two full MR x NR tiles at once (a 12 x NR tile, where
/// [`pairs_panels`]): `c[h] (+)= a[h * MR .. (h + 1) * MR] * b` for `h` =
/// 0, 1 along the walk `w`; each output the same fused chain as a
/// one-tile call gives it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_tile_pair<E: Elem, S: Simd>(
    simd: S,
    a: [&[E]; 2 * MR],
    w: AWalk,
    b: &[E],
    c: [&mut [E]; 2],
    accumulate: bool,
    prefetch: [*const E; 2],
    ahead: Ahead,
) {
    if let Some(last) = w.last() {
        for row in &a {
            assert!(last < row.len(), "A row too short for the walk");
        }
    }
    let (rows, pf) = pair_rows::<E, S>(c, prefetch, b, w.k());
    let (ap, bp) = (a.map(|s| s.as_ptr()), b.as_ptr());
    // SAFETY: every A row is long enough for the walk and B for its k
    // (checked above); the two `&mut` C tiles hold MR x nr each and cannot
    // alias.
    unsafe {
        if w.step == 1 {
            kernel_rows::<E, S, 1, { 2 * MR }>(simd, ap, w, bp, rows, accumulate, pf, ahead);
        } else {
            kernel_rows::<E, S, 0, { 2 * MR }>(simd, ap, w, bp, rows, accumulate, pf, ahead);
        }
    }
}

/// One kernel call of a [`panel_steps`] step of `n` (1 or 2) packed A
/// panels: group `h` reads `panels[h]` (the second only for two), its C
/// tile is the `MR x NR` tile at `at[h]` of `c` (`at[1]` is read only for
/// two), `prefetch[h]` is its hint and `ahead` the lines to fetch during the
/// call. [`run_packed_tile`] for one panel, [`run_packed_pair`] for two.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_packed_step<E: Elem, S: Simd>(
    simd: S,
    n: usize,
    panels: [&[E]; 2],
    k: usize,
    b: &[E],
    c: &mut [E],
    at: [usize; 2],
    accumulate: bool,
    prefetch: [*const E; 2],
    ahead: Ahead,
) {
    let tile_len = MR * nr::<E, S>();
    if n == 2 {
        let tiles = tile_pair(c, at, tile_len);
        run_packed_pair(simd, panels, k, b, tiles, accumulate, prefetch, ahead);
    } else {
        let tile = &mut c[at[0]..at[0] + tile_len];
        run_packed_tile(simd, panels[0], k, b, tile, accumulate, prefetch[0], ahead);
    }
}

/// One kernel call of a [`panel_steps`] step of `n` (1 or 2) MR-row groups
/// along `w`: call row `i` reads `a[i]` (the first `n * MR` are used),
/// group `h`'s C tile is the `MR x NR` tile at `at[h]` of `c` (`at[1]` is
/// read only for two), `prefetch[h]` is its hint and `ahead` the lines to
/// fetch during the call. [`run_tile`] for one group, [`run_tile_pair`]
/// for two.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_walked_step<E: Elem, S: Simd>(
    simd: S,
    n: usize,
    a: [&[E]; 2 * MR],
    w: AWalk,
    b: &[E],
    c: &mut [E],
    at: [usize; 2],
    accumulate: bool,
    prefetch: [*const E; 2],
    ahead: Ahead,
) {
    let (nr, tile_len) = (nr::<E, S>(), MR * nr::<E, S>());
    if n == 2 {
        let tiles = tile_pair(c, at, tile_len);
        run_tile_pair(simd, a, w, b, tiles, accumulate, prefetch, ahead);
    } else {
        let mut tile = ColBlock::whole(&mut c[at[0]..at[0] + tile_len], MR, nr);
        let a = std::array::from_fn(|i| a[i]);
        run_tile(
            simd,
            a,
            w,
            b,
            &mut tile,
            0,
            0,
            accumulate,
            prefetch[0],
            ahead,
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
                    Ahead::shares(&b, 0..1, 1),
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
                Ahead::shares(&b, 0..1, 1),
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

    /// Values that make every product and sum inexact (so a changed order
    /// or a dropped term changes bits): `i`-th of a sequence.
    fn val<E: Elem>(i: usize, salt: usize) -> E {
        E::from_f64(((i * 7 + salt * 13) % 23) as f64 / 7.0 - 1.4)
    }

    fn bits<E: Elem>(tiles: &[Vec<E>; 2]) -> Vec<Vec<u64>> {
        tiles
            .iter()
            .map(|t| t.iter().map(|v| v.as_f64().to_bits()).collect())
            .collect()
    }

    /// Two panels in one call give what two one-panel calls give, bit for
    /// bit, and write nothing past either C tile; on every instruction set
    /// this CPU has, f32 and f64, packed panels and walked rows.
    struct Pairs<E>(PhantomData<E>);

    impl<E: Elem> WithSimd for Pairs<E> {
        type Output = bool;
        fn with_simd<S: Simd>(self, simd: S) -> bool {
            if !pairs_panels::<E, S>() {
                return false;
            }
            let nr = nr::<E, S>();
            let tile = MR * nr;
            let guard = E::from_f64(99.0);
            let init = |h: usize| -> Vec<E> {
                (0..tile + 3)
                    .map(|i| if i < tile { val(i, h + 5) } else { guard })
                    .collect()
            };
            for (k, accumulate) in [(1, false), (9, true), (256, false), (37, true)] {
                let panels: Vec<Vec<E>> = (0..2)
                    .map(|h| (0..k * MR).map(|i| val(i, h)).collect())
                    .collect();
                let b: Vec<E> = (0..k * nr).map(|i| val(i, 3)).collect();
                let (mut got, mut want) = ([init(0), init(1)], [init(0), init(1)]);
                let [g0, g1] = &mut got;
                run_packed_pair::<E, S>(
                    simd,
                    [&panels[0], &panels[1]],
                    k,
                    &b,
                    [&mut g0[..], &mut g1[..]],
                    accumulate,
                    [std::ptr::null(); 2],
                    Ahead::shares(&b, 0..1, 1),
                );
                for (h, w) in want.iter_mut().enumerate() {
                    run_packed_tile::<E, S>(
                        simd,
                        &panels[h],
                        k,
                        &b,
                        w,
                        accumulate,
                        std::ptr::null(),
                        Ahead::shares(&b, 0..1, 1),
                    );
                }
                assert_eq!(bits(&got), bits(&want), "packed pair, k {k}");
                assert!(got.iter().all(|t| t[tile..].iter().all(|&v| v == guard)));
            }
            // Walked rows: 12 rows of an "image", a step of 1 or 2, several
            // segments.
            let image: Vec<E> = (0..600).map(|i| val(i, 4)).collect();
            for (step, seg_len, nseg) in [(1, 5, 3), (2, 4, 2), (1, 40, 1)] {
                let walk = AWalk {
                    off: 3,
                    step,
                    seg_len,
                    nseg,
                    seg_jump: 41,
                };
                let a: [&[E]; 2 * MR] = std::array::from_fn(|r| &image[r * 17 + (r % 3)..]);
                let b: Vec<E> = (0..walk.k() * nr).map(|i| val(i, 6)).collect();
                for accumulate in [false, true] {
                    let (mut got, mut want) = ([init(0), init(1)], [init(0), init(1)]);
                    let [g0, g1] = &mut got;
                    run_tile_pair::<E, S>(
                        simd,
                        a,
                        walk,
                        &b,
                        [&mut g0[..], &mut g1[..]],
                        accumulate,
                        [std::ptr::null(); 2],
                        Ahead::shares(&b, 0..1, 1),
                    );
                    for (h, w) in want.iter_mut().enumerate() {
                        let rows: [&[E]; MR] = std::array::from_fn(|r| a[h * MR + r]);
                        let mut blk = ColBlock::whole(&mut w[..tile], MR, nr);
                        run_tile(
                            simd,
                            rows,
                            walk,
                            &b,
                            &mut blk,
                            0,
                            0,
                            accumulate,
                            std::ptr::null(),
                            Ahead::shares(&b, 0..1, 1),
                        );
                    }
                    let at = format!("row pair, step {step}, {nseg} x {seg_len}");
                    assert_eq!(bits(&got), bits(&want), "{at}");
                    assert!(got.iter().all(|t| t[tile..].iter().all(|&v| v == guard)));
                }
            }
            true
        }
    }

    #[test]
    fn two_panels_per_call_give_the_bits_of_one_at_a_time() {
        for isa in crate::backend::cpu::Isa::available() {
            let arch = isa.arch().unwrap();
            let paired = arch.dispatch(Pairs::<f32>(PhantomData));
            assert_eq!(arch.dispatch(Pairs::<f64>(PhantomData)), paired);
            // Exactly the 512-bit instruction set pairs (32 registers).
            assert_eq!(paired, isa == crate::backend::cpu::Isa::Avx512, "{isa:?}");
        }
    }

    /// `panel_steps` covers every panel once, in order, and takes two
    /// exactly where the ISA pairs and `pairable` allows (greedily from the
    /// left).
    struct Steps;
    impl WithSimd for Steps {
        type Output = ();
        fn with_simd<S: Simd>(self, _: S) {
            let pairs = pairs_panels::<f32, S>();
            for panels in 0..9 {
                for allowed in 0u32..256 {
                    let pairable = |p: usize| allowed >> p & 1 == 1;
                    let steps: Vec<_> = panel_steps::<f32, S>(panels, pairable).collect();
                    let flat: Vec<usize> = steps.iter().cloned().flatten().collect();
                    assert_eq!(flat, (0..panels).collect::<Vec<_>>());
                    for st in &steps {
                        let can = pairs && st.start + 1 < panels && pairable(st.start);
                        assert_eq!(st.len(), 1 + can as usize, "{panels} panels, {allowed:b}");
                    }
                }
            }
        }
    }

    #[test]
    fn panel_steps_pair_where_allowed_and_cover_every_panel() {
        for arch in crate::backend::cpu::Isa::every_arch() {
            arch.dispatch(Steps);
        }
    }

    /// `tile_pair` lends exactly the two tiles asked for, adjacent or apart,
    /// and refuses overlapping ones.
    #[test]
    fn tile_pair_lends_the_two_tiles() {
        for (at, len) in [([0, 3], 3), ([2, 9], 4), ([5, 5], 0)] {
            let mut c = vec![0u32; 14];
            let [t0, t1] = tile_pair(&mut c, at, len);
            t0.fill(1);
            t1.fill(2);
            let want: Vec<u32> = (0..14)
                .map(|i| match i {
                    i if (at[0]..at[0] + len).contains(&i) => 1,
                    i if (at[1]..at[1] + len).contains(&i) => 2,
                    _ => 0,
                })
                .collect();
            assert_eq!(c, want, "{at:?} x {len}");
        }
        let overlap = std::panic::catch_unwind(|| tile_pair(&mut [0u8; 8], [0, 2], 3).len());
        assert!(overlap.is_err());
    }

    /// Where the ISA has 16 registers or fewer, the pair wrappers refuse.
    #[test]
    #[should_panic(expected = "two panels need 32 vector registers")]
    fn a_pair_without_the_registers_is_refused() {
        struct Scalar;
        impl WithSimd for Scalar {
            type Output = ();
            fn with_simd<S: Simd>(self, simd: S) {
                let nr = nr::<f32, S>();
                let (p, b) = (vec![0.5f32; MR], vec![1.0f32; nr]);
                let (mut c0, mut c1) = (vec![0.0f32; MR * nr], vec![0.0f32; MR * nr]);
                run_packed_pair::<f32, S>(
                    simd,
                    [&p, &p],
                    1,
                    &b,
                    [&mut c0, &mut c1],
                    false,
                    [std::ptr::null(); 2],
                    Ahead::NONE,
                );
            }
        }
        crate::backend::cpu::Isa::Scalar
            .arch()
            .unwrap()
            .dispatch(Scalar);
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
                let none = Ahead::NONE;
                run_tile::<f32, S>(
                    simd,
                    rows,
                    w,
                    &b,
                    &mut blk,
                    0,
                    0,
                    false,
                    std::ptr::null(),
                    none,
                );
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
        /// Two packed panels per call ([`run_packed_pair`]) instead of one
        /// panel's rows.
        pair: bool,
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
            if self.pair {
                let (panels, mut c2) = ([&a[..], &a[..]], vec![0.0f32; 2 * MR * nr * 4]);
                for i in 0..self.reps {
                    let (c0, c1) = c2[(i % 4) * 2 * MR * nr..].split_at_mut(MR * nr);
                    let (p, b) = (std::ptr::null(), &b);
                    run_packed_pair(simd, panels, self.k, b, [c0, c1], true, [p; 2], Ahead::NONE);
                }
                let s = cpu() - t;
                std::hint::black_box(&c2);
                return (4 * MR * nr * self.k * self.reps) as f64 / s / 1e9;
            }
            for i in 0..self.reps {
                let c = &mut c[(i % 4) * MR * nr..][..MR * nr];
                run_packed_tile(simd, &a, self.k, &b, c, true, std::ptr::null(), Ahead::NONE);
            }
            let s = cpu() - t;
            std::hint::black_box(&c);
            (2 * MR * nr * self.k * self.reps) as f64 / s / 1e9
        }
    }

    /// Whether the widest ISA runs two panels per call.
    struct Pairs;
    impl WithSimd for Pairs {
        type Output = bool;
        fn with_simd<S: Simd>(self, _: S) -> bool {
            pairs_panels::<f32, S>()
        }
    }

    /// `cargo test --release --lib kernel_speed -- --ignored --nocapture`:
    /// the microkernel on L1-resident operands against the FMA peak.
    #[test]
    #[ignore]
    fn kernel_speed() {
        let peak = crate::backend::cpu::fma_peak_gflops(1);
        let arch = Arch::new();
        let pairs = arch.dispatch(Pairs);
        for k in [64, 128, 256, 512] {
            for pair in [false, pairs].into_iter().take(1 + pairs as usize) {
                let reps = 2_000_000 / k * 16 / (1 + pair as usize);
                let g = arch.dispatch(Bench { k, reps, pair });
                let what = if pair { "two panels" } else { "one panel" };
                println!(
                    "k {k}, {what}: {g:.1} GFLOP/s, {:.1}% of {peak:.1}",
                    100.0 * g / peak
                );
            }
        }
    }
}
