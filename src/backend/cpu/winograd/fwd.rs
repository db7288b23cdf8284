//! The Winograd convolution engine: forward pass and (with flipped,
//! transposed weights over the output gradient) the input gradient.

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use super::runs6::{RUN6, has_runs6_for, scatter6};
use super::transform::{POS, WindowSpan, input_tiles, output_tile, tile_is_zero, weight_tile_v};
use super::transform6::{POS6, output_tile6, weight_tile6_v};
use super::{Lanes, MAX_POS, RunShape, Tile, Tiling, run_order};
use crate::backend::cpu::Ctx;
use crate::backend::cpu::conv_fwd::{act_of_bias, nr_for, relu_of};
use crate::backend::cpu::kernel::{MR, NR_MAX, nr, panel_steps, run_packed_step};
use crate::backend::cpu::pack::Scratch;
use crate::backend::cpu::simd::{
    Ahead, Elem, Level, MAX_LANES, lane_order_for, prefetch, prefetch_values,
};
use crate::pool;

/// Register groups (NR tiles each) per block. Each GEMM reads its B tile
/// (one group's `K x NR` at one position) from L1 once per 6-row panel,
/// and each panel's weights at one position once per group: the packed
/// weights (9.4 MB at K = M = 256 in f32) are streamed from beyond L2 once
/// per block, so the groups per block are how often each weight byte is
/// used per stream. The block's transformed input, `36 x K x G*NR`, and
/// its products, `36 x M x G*NR`, are 9.4 MB each at G = 8 (f32,
/// AVX-512), shared by all threads (see [`WinoConv::run_images`]).
///
/// Measured (Intel Xeon family 6 model 207, AVX-512 and AVX2, 2 threads,
/// `examples/conv_speed`, medians of 7, alternating runs in one session):
/// dense P3 forward, AVX-512, G = 2: 63.1-63.7 ms, 4: 60.5-61.7, 6:
/// 58.1-58.8, 8: 57.8-59.4, 12: 57.8-58.1, 16: 58.0-60.6 (P4 16.9-17.2
/// against 15.8-16.8 at 8); AVX2, G = 2: 101.6-101.7, 4: 95.4-97.7, 8:
/// 90.3-93.0, 16: 90.5-93.0. Under the retinanet loss's masks (AVX-512, G
/// = 2 against 8): P3 forward, channel mask 33.0-34.4 -> 27.2-28.9 ms,
/// spatial 34.6-38.7 -> 32.0-33.6; input gradient, channel 39.5-40.6 ->
/// 33.2-36.7, spatial 33.9-36.8 -> 30.7-35.1. Earlier machines did not
/// show it: on an AMD EPYC Zen 3 (AVX2), G = 4 and 8 tied with 2 on the
/// whole loss (six rounds, medians 1622 and 1543 against 1484 ms, each
/// spread 1394-1893); on a Zen 5 (AVX-512), 3 and 4 tied with 2. On an AMD
/// EPYC Zen 1 (AVX2, 8 MiB L3; 2026-12-06), G = 4, 8 and 16 (blocks of 64,
/// 128 and 256 tiles) tied too: three alternating rounds, medians of 7,
/// dense P3 forward 185-198 / 184-192 / 181-186 ms, input gradient 183-192
/// / 183-191 / 176-184, P4 49-55 ms for all; the weight gradient, whose
/// blocks this does not set, 182-190 ms throughout.
const GROUPS: usize = 8;

/// Tiles per F(6x6) block, whatever the register width: [`GROUPS`] / 2
/// register groups of AVX-512's NR (32 f32 columns), 8 of AVX2's (16).
///
/// Why in tiles: each position's packed weights are read from beyond L2
/// once per block (the first group's GEMM calls; `docs/engineering.md`,
/// "Where the F(6x6) GEMMs lose to the kernel"), so the tiles per block are
/// how many tiles share that read. F(6x6) blocks first held `GROUPS / 2`
/// groups on every ISA: 128 tiles on AVX-512 but 64 on AVX2. At 128 on
/// AVX2 (AMD EPYC Zen 3, family 25 model 1, 2 threads, phase timers, 64
/// and 128 tiles alternated call by call in one process, means of 45 calls
/// each, two rounds), the phases' sum: dense P3 forward 92.2 -> 90.0 and
/// 113.4 -> 111.0 ms, input gradient 113.7 -> 109.5 and 115.4 -> 113.2;
/// P4 forward 32.5 -> 31.3 and 32.7 -> 31.7, input gradient 41.4 -> 40.0
/// and 30.3 -> 29.0: faster in all eight pairs, the input phase by
/// 0.4-1.7 ms a call, the GEMMs by 0.3-2.1, the output phase by 0-0.4.
///
/// 256 tiles on AVX-512 (8 groups; AMD EPYC Zen 4, family 25 model 17,
/// 2 threads, 2026-12-07, `examples/conv_speed` medians of 7, three
/// alternating rounds): P4 forward 19.4-19.7 -> 16.7-18.2 ms, input
/// gradient 19.6-19.8 -> 16.8-17.1 ms (one block instead of two), P3
/// within the noise; but the whole retinanet loss (`dmkd bench --only
/// loss --reps 5`, three alternating rounds) 766 / 760 / 766 -> 771 / 760
/// / 804 ms, and peak RSS 494 -> 503-507 MiB. Not kept.
const F6_BLOCK_TILES: usize = GROUPS / 2 * NR_MAX;

/// Register groups (of `nr` tiles) per block of `tiling`: [`GROUPS`] for
/// F(4x4), [`F6_BLOCK_TILES`] / `nr` for F(6x6).
fn groups_per_block(tiling: Tiling, nr: usize) -> usize {
    match tiling {
        Tiling::F4 => GROUPS,
        Tiling::F6 => F6_BLOCK_TILES / nr,
    }
}

/// The (tile, position) pairs a block's scratch is sized for at `nr`
/// columns a group, whatever the tiling: the larger of the two tilings'
/// blocks (F(4x4)'s on AVX-512, F(6x6)'s on AVX2). Why one size: the pool
/// matched freed buffers by exact length then (it now also serves a
/// request from a held buffer up to an eighth longer), and with scratch of
/// F(6x6)'s own length it had to keep two sets; in the two-stage loss,
/// where P2 activations evict what it holds, page faults over three steps
/// went from 1.71M to 2.06M and the P2 forward in the loss kept none of
/// F(6x6)'s gain (304 -> 301 ms, against 282-304 -> 243-247 ms alone; AMD
/// EPYC Zen 4, AVX-512, 2 threads, 2026-12-07). With one size: 1.85M.
fn block_tile_positions(nr: usize) -> usize {
    (GROUPS * nr * POS).max(F6_BLOCK_TILES * POS6)
}

/// A multiplier applied to the source while it is gathered.
#[derive(Clone, Copy)]
pub(crate) enum InMul<'a, E> {
    None,
    /// `[n, h, w]`
    Spatial(&'a [E]),
    /// `[n, k]`
    Channel(&'a [E]),
}

/// What each output gets once its sum is complete.
#[derive(Clone, Copy)]
pub(crate) enum Epi<'a, E> {
    /// `act(y + b[m])` (the forward pass).
    Bias { bias: Option<&'a [E]>, relu: bool },
    /// `y * mask[n, y, x]` (input gradient under a spatial mask).
    Spatial(&'a [E]),
    /// `y * s[n, m]` (input gradient under a channel mask).
    Rows(&'a [E]),
}

/// A 3x3 / stride 1 / pad 1 convolution of `src` (`[n, k, h, w]`) into
/// `[n, m, h, w]`.
pub(crate) struct WinoConv<'a, E: Elem> {
    pub src: &'a [E],
    pub n: usize,
    pub k: usize,
    pub m: usize,
    pub h: usize,
    pub w: usize,
    /// OIHW 3x3 weights. Forward: `[m, k, 3, 3]`. Transposed (input
    /// gradient): `[k, m, 3, 3]`, used as `w'[r][c] = flip(w[c][r])`.
    pub weights: &'a [E],
    pub transposed: bool,
    pub input: InMul<'a, E>,
    pub epi: Epi<'a, E>,
    /// F(4x4) or F(6x6).
    pub tiling: Tiling,
    /// Where the work is counted.
    pub cx: Ctx<'a>,
}

/// Nonzero entries of row `img` of a `[n, c]` channel mask, or all.
fn kept<E: Elem>(mask: Option<&[E]>, img: usize, c: usize) -> Vec<usize> {
    match mask {
        Some(m) => (0..c).filter(|&i| m[img * c + i] != E::zero()).collect(),
        None => (0..c).collect(),
    }
}

/// Row `row` of the transformed weights at columns `cols` (`[pos][c]`,
/// `36 x cols.len()`) into `dst`: `G g G^T` of `g = w[row][cols[c]]`
/// (forward, `w` is `[m, k, 3, 3]`) or of the flipped `w[cols[c]][row]`
/// (transposed, `[k, m, 3, 3]`). Lanes run over columns, so the row's 36
/// outputs are contiguous vector stores (a scalar transform scattering
/// straight into the packed panels cost ~6 ms per call at 256 x 256, most
/// of a P5 conv).
#[allow(clippy::too_many_arguments)]
fn transform_row<E: Elem>(
    arch: Arch,
    tiling: Tiling,
    w: &[E],
    (m, k): (usize, usize),
    transposed: bool,
    row: usize,
    cols: &[usize],
    dst: &mut [E],
) {
    let filters = Filters {
        w,
        m,
        k,
        transposed,
        row,
        cols,
    };
    arch.dispatch(WeightRow {
        tiling,
        filters,
        dst,
    })
}

struct WeightRow<'a, 'b, E> {
    tiling: Tiling,
    filters: Filters<'a, E>,
    dst: &'b mut [E],
}

impl<E: Elem> WithSimd for WeightRow<'_, '_, E> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let WeightRow {
            tiling,
            filters,
            dst,
        } = self;
        transform_columns(simd, tiling, &filters, dst)
    }
}

/// The filters of one output row `row` of a weight transform: column `c`'s
/// 9 taps, flipped when `transposed` (the input gradient's filters), its
/// input channel `cols[c]`.
struct Filters<'a, E> {
    w: &'a [E],
    m: usize,
    k: usize,
    transposed: bool,
    row: usize,
    cols: &'a [usize],
}

impl<E: Copy> Filters<'_, E> {
    /// Column `c`'s 9 taps into `g[t * stride]` (tap `t`). Plain indexing,
    /// not a closure per tap: passed as one (`tap(c, t)`) into the
    /// transform's loop, `perf` found it called out of line in the loss's
    /// channel-masked calls. (The column list is read once per filter, so
    /// the dense calls need no path of their own without it, as the
    /// closure's did.)
    #[inline(always)]
    fn taps(&self, c: usize, g: &mut [E], stride: usize) {
        let col = self.cols[c];
        if self.transposed {
            let f = &self.w[(col * self.m + self.row) * 9..][..9];
            for t in 0..9 {
                g[t * stride] = f[8 - t];
            }
        } else {
            let f = &self.w[(self.row * self.k + col) * 9..][..9];
            for t in 0..9 {
                g[t * stride] = f[t];
            }
        }
    }
}

/// `dst[pos * kk + c]` = position `pos` of `tiling`'s weight transform of
/// column `c`'s filter of `filters`, for each of its `kk` columns. The
/// columns past the last whole register go through the vector transform
/// in one more register, whose unused lanes are dropped: each lane's bits
/// are its own filter's, so a filter's bits do not depend on the register
/// width. (F(4x4) once
/// took those columns through the scalar `weight_tile`, the same
/// operations in the same order: the same bits, which its tests check.)
/// The transforms are called directly, not passed in: passed as a closure
/// parameter they were not inlined, and the loss ran 3-17% slower
/// (`docs/engineering.md`, "Winograd F(6x6, 3x3)").
#[inline(always)]
fn transform_columns<E: Elem, S: Simd>(
    simd: S,
    tiling: Tiling,
    filters: &Filters<'_, E>,
    dst: &mut [E],
) {
    let l = E::lanes::<S>();
    let kk = filters.cols.len();
    // In the last register, lanes past the last column keep an earlier
    // register's taps: their results are dropped, and no lane's arithmetic
    // reads another's.
    let mut g = [E::zero(); 9 * MAX_LANES];
    let mut tail = [E::zero(); MAX_LANES];
    for c0 in (0..kk).step_by(l) {
        let lanes = l.min(kk - c0);
        for j in 0..lanes {
            filters.taps(c0 + j, &mut g[j..], l);
        }
        let gv: [E::V<S>; 9] = std::array::from_fn(|t| E::load(simd, &g[t * l..]));
        let (u4, u6);
        let u: &[E::V<S>] = match tiling {
            Tiling::F4 => {
                u4 = weight_tile_v::<E, S>(simd, &gv);
                &u4
            }
            Tiling::F6 => {
                u6 = weight_tile6_v::<E, S>(simd, &gv);
                &u6
            }
        };
        for (pos, &v) in u.iter().enumerate() {
            if lanes == l {
                E::store(simd, &mut dst[pos * kk + c0..], v);
            } else {
                E::store(simd, &mut tail[..l], v);
                dst[pos * kk + c0..][..lanes].copy_from_slice(&tail[..lanes]);
            }
        }
    }
}

/// One panel of [`transform_packed`]'s layout, `dst[pos]` its `[c][MR]`
/// run at each position, from its first `rows` rows in `u` (`[row][pos][c]`,
/// `npos` positions, `kk` columns); lanes past them (rows past the end) are
/// zeros.
fn pack_panel<E: Elem>(dst: &mut [&mut [E]], u: &[E], (npos, kk): (usize, usize), rows: usize) {
    for (pos, dst) in dst.iter_mut().enumerate() {
        let urows: [Option<&[E]>; MR] =
            std::array::from_fn(|r| (r < rows).then(|| &u[(r * npos + pos) * kk..][..kk]));
        // Column-major so the writes run contiguously (the strided
        // row-by-row order cost about 1 ms more per 256 x 256 call).
        match urows {
            // A whole panel: zipped rows, no index to check. (The pattern
            // is also what keeps MR at 6.)
            [Some(a), Some(b), Some(c), Some(d), Some(e), Some(f)] => {
                let rows = a.iter().zip(b).zip(c).zip(d).zip(e).zip(f);
                for (o, (((((&x0, &x1), &x2), &x3), &x4), &x5)) in
                    dst.chunks_exact_mut(MR).zip(rows)
                {
                    o.copy_from_slice(&[x0, x1, x2, x3, x4, x5]);
                }
            }
            _ => {
                for (c, d) in dst.chunks_exact_mut(MR).enumerate() {
                    for (v, urow) in d.iter_mut().zip(&urows) {
                        *v = urow.map_or(E::zero(), |urow| urow[c]);
                    }
                }
            }
        }
    }
}

/// The transformed weights of output rows `rows` and input columns `cols`
/// (of a `[m, k, 3, 3]` forward or `[k, m, 3, 3]` transposed `w`), packed
/// `[pos][panel][c][MR]` (rows past the end are zeros): the GEMM of
/// position `pos` reads panel `p` as one `[cols.len()][MR]` stream, and a
/// thread's run of panels at one position as one stream. Each task
/// transforms its panel's rows at the kept columns into a buffer that
/// stays in L2 (at k = 256 in f32, 221 KB for F(4x4), 393 KB for F(6x6))
/// and packs them from there.
///
/// Why position-major: [`Products`] runs the panels of one position one
/// after another, the first group's calls reading each panel from beyond
/// L2. Laid out `[panel][pos]`, each panel was a fresh 6 KB stream 64
/// positions (384 KB) from the last, which the hardware prefetchers take
/// up only after its first misses; laid out `[pos][panel]`, one stream
/// runs on through a thread's panels.
/// Measured (AMD EPYC Zen 3, family 25 model 1, AVX2, 2 threads, F(6x6),
/// phase timers, the two layouts alternated call by call in one process,
/// means of 45 calls each, two rounds), the GEMM phase: dense P3 forward
/// 71.4 -> 69.5 and 57.9 -> 55.5 ms, input gradient 73.4 -> 69.4 and 59.8
/// -> 57.5; P4 forward 19.2 -> 18.6 and 19.0 -> 18.4, input gradient 15.5
/// -> 15.0 and 19.1 -> 18.4: faster in all eight pairs. The packing pays
/// part of it back: each task now writes 64 runs of 6 KB instead of one
/// of 384 KB, and this function took 3.3-4.2 ms a call against 2.9-3.7
/// (same runs; 0.3-0.5 ms more in each). The transform phases moved by
/// under 1.5%. Net, about 2 ms off a dense P3 pass and 0.2 off a P4 one.
///
/// Measured at 256 x 256 (AMD EPYC Zen 3, 2 threads, f32): a transform of
/// every weight into one `m x 36 x k` buffer (1.1-1.6 ms), then the
/// packing (2.0-2.3 ms), was the fixed cost of every Winograd forward and
/// input-gradient call (a 2 x 256 x 4 x 4 forward took 6.8 ms in all).
/// Under a channel mask the calls kept that two-step form until stop 49:
/// one transform of every weight, then one packing per image. Per image,
/// this function transforms and packs only the kept rows and columns
/// (Intel Xeon family 6 model 167, AVX-512, 2 threads, the retinanet
/// loss's channel mask: see `docs/engineering.md`).
fn transform_packed<E: Elem>(
    arch: Arch,
    tiling: Tiling,
    w: &[E],
    mk: (usize, usize),
    rows: &[usize],
    cols: &[usize],
    transposed: bool,
) -> Vec<E> {
    let kk = cols.len();
    let npos = tiling.positions();
    let panels = rows.len().div_ceil(MR);
    let mut out = pool::take::<E>(panels * npos * kk * MR);
    // Each panel's runs, one per position: run `pos * panels + p` is panel
    // `p`'s at `pos`.
    let mut runs: Vec<Vec<&mut [E]>> = (0..panels).map(|_| Vec::with_capacity(npos)).collect();
    for (i, run) in out.chunks_mut((kk * MR).max(1)).enumerate() {
        runs[i % panels].push(run);
    }
    runs.into_par_iter()
        .enumerate()
        // One panel buffer per rayon job, reused across its panels (a fresh
        // zeroed one per panel cost ~10 MB of memset per call).
        .for_each_init(
            || vec![E::zero(); MR * npos * kk],
            |buf, (p, mut chunk)| {
                let panel_rows = &rows[p * MR..rows.len().min(p * MR + MR)];
                for (&row, dst) in panel_rows
                    .iter()
                    .zip(buf.chunks_exact_mut((npos * kk).max(1)))
                {
                    transform_row(arch, tiling, w, mk, transposed, row, cols, dst);
                }
                pack_panel(&mut chunk, buf, (npos, kk), panel_rows.len());
            },
        );
    out
}

impl<E: Elem> WinoConv<'_, E> {
    /// `[n, m, h, w]`, row-major.
    pub fn run(&self) -> Vec<E> {
        let (n, h, w, m) = (self.n, self.h, self.w, self.m);
        let hw = h * w;
        let mut y = pool::take::<E>(n * m * hw);
        let sparse_k = match self.input {
            InMul::Channel(c) if c.contains(&E::zero()) => Some(c),
            _ => None,
        };
        let sparse_m = match self.epi {
            Epi::Rows(c) if c.contains(&E::zero()) => Some(c),
            _ => None,
        };
        if matches!(self.input, InMul::Spatial(_)) || matches!(self.epi, Epi::Spatial(_)) {
            self.cx.tally.spatial_skip_call();
        }
        // Dense: one run over every image. Under a channel mask with
        // zeros, one run per image over its kept rows and columns: only
        // those enter the GEMMs, and only their weights are transformed.
        let sparse = sparse_k.is_some() || sparse_m.is_some();
        if sparse {
            self.cx.tally.channel_sparse_call();
        }
        let per_run = if sparse { 1 } else { n };
        for imgs in (0..n).step_by(per_run.max(1)).map(|i| i..i + per_run) {
            let rows = kept(sparse_m, imgs.start, m);
            let cols = kept(sparse_k, imgs.start, self.k);
            self.cx
                .tally
                .channels_skipped(m - rows.len() + self.k - cols.len());
            self.cx
                .tally
                .weights_packed(self.tiling.positions() * rows.len() * cols.len());
            let u = transform_packed(
                self.cx.arch,
                self.tiling,
                self.weights,
                (m, self.k),
                &rows,
                &cols,
                self.transposed,
            );
            let yimgs = &mut y[imgs.start * m * hw..imgs.end * m * hw];
            self.run_images(&imgs.collect::<Vec<_>>(), yimgs, &rows, &cols, &u);
            drop(pool::Buffer::new(u));
        }
        y
    }

    /// The spatial input mask's plane of image `img`, if any.
    fn in_mask(&self, img: usize) -> Option<&[E]> {
        let hw = self.h * self.w;
        match self.input {
            InMul::Spatial(ms) => Some(&ms[img * hw..][..hw]),
            _ => None,
        }
    }

    /// The spatial output mask's plane of image `img`, if any.
    fn out_mask(&self, img: usize) -> Option<&[E]> {
        let hw = self.h * self.w;
        match self.epi {
            Epi::Spatial(ms) => Some(&ms[img * hw..][..hw]),
            _ => None,
        }
    }

    /// Output rows `rows` of images `imgs` (`y`: their outputs, `[imgs.len(),
    /// m, h, w]`) from input channels `cols`, with `u` the transformed
    /// weights of those rows and columns as [`transform_packed`] packs them.
    ///
    /// The threads work on one block of `GROUPS x NR` tiles at a time, in
    /// three parallel phases: input transform (split by register group),
    /// the 36 GEMMs (split by row panel: each thread streams only its
    /// panels' weights, so the block's weight stream is shared, not
    /// repeated per thread), output transform (split by output row). The
    /// split never changes a bit: each output is one tile's fixed-order
    /// chain over the columns, whichever thread runs it. Blocks may span
    /// images, so a small level's few tiles are one block.
    ///
    /// Why: when each thread ran its own blocks, every thread streamed all
    /// 9.4 MB of packed weights per block, and in the host's slow phases
    /// (about 10 MB of L3 for this guest) that came from memory. Measured
    /// against that design (AMD EPYC Zen 3, AVX2, 2 threads, slow phase,
    /// alternating rounds in one run): P4 under a 0.65 channel mask forward
    /// 27.2-27.7 -> 22.1-24.2 ms, input gradient 31.2-33.6 -> 21.8-25.2; under
    /// a spatial mask 27.2-30.3 -> 23.5-25.5 and 26.6-29.3 -> 20.9-25.1; dense
    /// P3 within noise (forward 163-195 against 155-194 ms); the whole loss
    /// (`dmkd bench --only loss`, seven rounds) median 2582 -> 2184 ms,
    /// faster in five rounds, 1% slower in two.
    fn run_images(&self, imgs: &[usize], y: &mut [E], rows: &[usize], cols: &[usize], u: &[E]) {
        let (h, w, m) = (self.h, self.w, self.m);
        let hw = h * w;
        let tiling = self.tiling;
        let (t, npos) = (tiling.side(), tiling.positions());
        let (th, tw) = (h.div_ceil(t), w.div_ceil(t));
        let kk = cols.len();
        // The tiles to compute: under a spatial mask with zeros, a tile
        // that reads only zeros (forward) or whose outputs are all masked
        // (input gradient) is left out, and its outputs are filled below.
        // With no kept input channel or output row there is no product to
        // compute: no tile is run or skipped (as in the direct conv), and
        // every output is filled below.
        let nothing = kk == 0 || rows.is_empty();
        let mut tiles: Vec<Tile> = Vec::new();
        let mut fill = vec![rows.len() < m || nothing; imgs.len()];
        // Per image, the outputs of computed tiles that read only masked
        // inputs (`masked_outputs`): set exactly below, as skipped tiles are.
        let mut dead: Vec<Vec<usize>> = vec![Vec::new(); imgs.len()];
        let scanned = if nothing { &imgs[..0] } else { imgs };
        for (i, &img) in scanned.iter().enumerate() {
            let (in_mask, out_mask) = (self.in_mask(img), self.out_mask(img));
            let before = tiles.len();
            for ty in 0..th {
                for tx in 0..tw {
                    let skip = in_mask.is_some_and(|ms| {
                        WindowSpan::new(tiling, h, w, ty, tx).reads_only_zeros(ms)
                    }) || out_mask
                        .is_some_and(|ms| tile_is_zero(ms, (h, w), t, (ty, tx)));
                    if !skip {
                        tiles.push((i, ty, tx));
                    }
                }
            }
            if let Some(ms) = in_mask {
                dead[i] = masked_outputs(ms, (h, w), t, &tiles[before..]);
            }
            let computed = tiles.len() - before;
            let skipped = th * tw - computed;
            fill[i] |= computed < th * tw;
            self.cx.tally.tiles(computed, skipped);
            self.cx.tally.macs(npos * rows.len() * kk * computed);
        }
        // Outputs no computed tile writes: what the dense sum of zeros
        // would give (act(b) forward; 0 for a gradient, masked or not).
        if fill.contains(&true) {
            y.par_chunks_mut(hw.max(1))
                .enumerate()
                .filter(|(ix, _)| fill[ix / m])
                .for_each(|(ix, row)| {
                    row.fill(match self.epi {
                        Epi::Bias { bias, relu } => act_of_bias(bias, ix % m, relu),
                        _ => E::zero(),
                    })
                });
        }
        if tiles.is_empty() {
            return;
        }
        let arch = self.cx.arch;
        let nr = nr_for::<E>(arch);
        // Registers of row runs (the vector gather and scatter), as many as
        // can be; measured (Intel Xeon family 6 model 207, AVX-512, 2
        // threads, phase timers, medians of 7 calls, three alternating
        // rounds), F(4x4) dense P4 forward: input transform 3.2-3.4 -> 2.7
        // ms, output transform 2.7-2.8 -> 1.9 ms, call 15.8-16.5 -> 14.7-15.5
        // ms; P3 about 1 ms off each of the two phases (of 64 ms). F(6x6):
        // see `runs6`. F(4x4) lanes follow the 4-way shuffles' order, F(6x6)
        // lanes are in tile order.
        let shuffled = lane_order_for::<E>(arch);
        let l = shuffled.len();
        let shape = RunShape::new(tiling, l, has_runs6_for::<E>(arch));
        let order = match tiling {
            Tiling::F4 => shuffled,
            Tiling::F6 => (0..l).collect(),
        };
        let tiles = match shape {
            Some(shape) => run_order(&tiles, l, shape, w),
            None => tiles,
        };
        let panels = rows.len().div_ceil(MR);
        let tile_len = MR * nr;
        // V: `[group][pos][col][NR]`; products: `[panel][pos][group][MR x NR]`,
        // so each phase's share is one contiguous run.
        // Register groups per block: the layout stride of the products.
        let gpb = groups_per_block(tiling, nr);
        let scratch = block_tile_positions(nr);
        let mut vbuf = Scratch::<E>::new(scratch * kk);
        let mut mbuf = Scratch::<E>::new(panels * scratch * MR);
        // The output rows by kept row: `dst[ri][i]` is row `rows[ri]` of image `i`.
        let mut kept_row = vec![None; m];
        for (ri, &co) in rows.iter().enumerate() {
            kept_row[co] = Some(ri);
        }
        let mut dst: Vec<Vec<&mut [E]>> = (0..rows.len())
            .map(|_| Vec::with_capacity(imgs.len()))
            .collect();
        for (ix, row) in y.chunks_mut(hw.max(1)).enumerate() {
            if let Some(ri) = kept_row[ix % m] {
                dst[ri].push(row);
            }
        }
        // Row panels per GEMM job: one contiguous run per thread.
        let jobs = rayon::current_num_threads().clamp(1, panels);
        let bounds: Vec<usize> = (0..=jobs).map(|j| j * panels / jobs).collect();
        for block in tiles.chunks(gpb * nr) {
            let lanes: Vec<Lanes> = block
                .chunks(nr)
                .map(|g| Lanes::new(&order, g, w, shape))
                .collect();
            vbuf.as_mut_slice()
                .par_chunks_mut(npos * kk * nr)
                .zip(block.par_chunks(nr))
                .zip(&lanes)
                .for_each(|((v, group), lanes)| {
                    arch.dispatch(InputGroup {
                        conv: self,
                        imgs,
                        group,
                        lanes,
                        cols,
                        v,
                    })
                });
            let groups = block.len().div_ceil(nr);
            let v = vbuf.as_slice();
            let mut runs = Vec::with_capacity(jobs);
            let mut rest = mbuf.as_mut_slice();
            for p in bounds.windows(2) {
                let (run, tail) = rest.split_at_mut((p[1] - p[0]) * npos * gpb * tile_len);
                runs.push((p[0]..p[1], run));
                rest = tail;
            }
            runs.into_par_iter().for_each(|(run, out)| {
                arch.dispatch(Products {
                    npos,
                    gpb,
                    u,
                    npanels: panels,
                    v,
                    kk,
                    groups,
                    panels: run,
                    out,
                })
            });
            let products = mbuf.as_slice();
            dst.par_iter_mut().enumerate().for_each(|(ri, dst)| {
                arch.dispatch(OutputRow {
                    conv: self,
                    imgs,
                    block,
                    lanes: &lanes,
                    products,
                    gpb,
                    ri,
                    co: rows[ri],
                    dst,
                })
            });
        }
        // An output whose every tap reads a masked input is a sum of exact
        // zeros: the direct conv and the skipped tiles give it exactly
        // act(b) (or 0). A computed tile computes its 16 outputs together,
        // so its transforms leave such an output the rounding noise of its
        // window's other values: about 1e-7 of the largest of them, times
        // the transforms' growth. Under an outlier channel that noise is
        // large, and where it meets the ReLU that follows (an output that
        // should sit exactly at b sits above or below 0 by the noise) it
        // changed the f32 loss's gradients: the spatial generator's first
        // bias gradient was 6e-4 off f64 (norm-wise) with one student
        // channel scaled by 1e4, 3e-3 at 1e5, against 1e-7 for the direct
        // conv. Set exactly, these outputs match the direct conv's bits.
        if dead.iter().any(|d| !d.is_empty()) {
            dst.par_iter_mut().enumerate().for_each(|(ri, dst)| {
                let v = match self.epi {
                    Epi::Bias { bias, relu } => act_of_bias(bias, rows[ri], relu),
                    _ => E::zero(),
                };
                for (row, dead) in dst.iter_mut().zip(&dead) {
                    for &at in dead {
                        row[at] = v;
                    }
                }
            });
        }
    }
}

/// The outputs (`y * w + x`) of `tiles` (one image's, `(i, ty, tx)`, of
/// side `t`) whose 3x3 receptive field (pad 1) reads only exact zeros of
/// the `h x w` mask plane `ms`, in tile order.
fn masked_outputs<E: Elem>(
    ms: &[E],
    (h, w): (usize, usize),
    t: usize,
    tiles: &[Tile],
) -> Vec<usize> {
    let reads_kept = |y: usize, x: usize| {
        (y.saturating_sub(1)..(y + 2).min(h))
            .any(|yy| (x.saturating_sub(1)..(x + 2).min(w)).any(|xx| ms[yy * w + xx] != E::zero()))
    };
    let mut out = Vec::new();
    for &(_, ty, tx) in tiles {
        for y in t * ty..(t * ty + t).min(h) {
            for x in t * tx..(t * tx + t).min(w) {
                if !reads_kept(y, x) {
                    out.push(y * w + x);
                }
            }
        }
    }
    out
}

/// How many channels ahead the input transform prefetches its windows: a
/// row-run register's rows, and every other tile's own window. The planes
/// are 67 KB apart at P3, so the hardware prefetchers never see the next
/// channel coming; in a slow phase (AMD EPYC Zen 3, AVX2, 2 threads, phase
/// timers) the P3 input phase took 23-25 ms without and 16-19 ms with it
/// (2 and 4 channels alike, 8 worse); in quiet phases it is within the
/// noise. The other tiles' windows came later: under the retinanet loss's
/// spatial mask only 5 of the 54 registers of a P3 call are row runs, and
/// prefetching the rest took its input phase from 8.0-8.1 to 7.4-7.5 ms
/// (Intel Xeon family 6 model 167, AVX-512, 2 threads, phase timers,
/// medians of 7, two alternating rounds; with [`prefetch_outputs`], the
/// whole passes in `docs/engineering.md`).
const PREFETCH: usize = 4;

/// Input transform of one register group (`NR` tiles, lanes are tiles in
/// the order of `lanes`) into `v` (`[pos][col][NR]`).
struct InputGroup<'a, 'b, E: Elem> {
    conv: &'a WinoConv<'a, E>,
    imgs: &'a [usize],
    group: &'a [Tile],
    lanes: &'a Lanes,
    cols: &'a [usize],
    v: &'b mut [E],
}

impl<E: Elem> WithSimd for InputGroup<'_, '_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let InputGroup {
            conv,
            imgs,
            group,
            lanes,
            cols,
            v,
        } = self;
        let (h, w, k) = (conv.h, conv.w, conv.k);
        let hw = h * w;
        let nr = nr::<E, S>();
        let kk = cols.len();
        let tiling = conv.tiling;
        // Each tile's window span and mask plane, found once for all channels.
        let mut spans = [WindowSpan::new(tiling, h, w, 0, 0); 32];
        let mut masks = [None; 32];
        // Under a spatial mask, each window's factors, the same for every
        // channel: read once here, not once per channel (registers of row
        // runs read the mask's rows with vector loads instead). Measured
        // (Intel Xeon family 6 model 207, AVX-512, 2 threads, the retinanet
        // loss's spatial mask, medians of 7, three alternating rounds): P3
        // forward input transform 9.9-11.0 -> 7.1-8.4 ms, call 31.5-35.8 ->
        // 28.2-33.3 ms.
        let mut factors = [[E::zero(); MAX_POS]; 32];
        for (j, &(i, ty, tx)) in group.iter().enumerate() {
            spans[j] = WindowSpan::new(tiling, h, w, ty, tx);
            masks[j] = conv.in_mask(imgs[i]);
            if let Some(m) = masks[j] {
                factors[j] = spans[j].factors(m);
            }
        }
        let spans = &spans[..group.len()];
        // Entries no gather writes (outside the plane, lanes past the
        // group's tiles) are zero for every channel: clear them once.
        let mut d = [E::zero(); MAX_POS * 32];
        let mut scale = [E::zero(); 32];
        let channel_mask = matches!(conv.input, InMul::Channel(_));
        let l = E::lanes::<S>();
        let runs = &lanes.gather_run[..nr / l];
        // Channel `ci`'s plane of the image of the group's tile `j`.
        let plane = |j: usize, ci: usize| &conv.src[(imgs[group[j].0] * k + ci) * hw..][..hw];
        for (c, &ci) in cols.iter().enumerate() {
            if let Some(&cn) = cols.get(c + PREFETCH) {
                for (reg, &run) in runs.iter().enumerate() {
                    let hv = reg * l;
                    if run {
                        spans[hv].prefetch_rows(plane(hv, cn), 4 * l + 2);
                        continue;
                    }
                    for &j in lanes.tile[hv..hv + l].iter().flatten() {
                        spans[j].prefetch_window(plane(j, cn));
                    }
                }
            }
            for (reg, &run) in runs.iter().enumerate() {
                let hv = reg * l;
                if run {
                    spans[hv].gather_row_run::<E, S>(
                        simd,
                        plane(hv, ci),
                        masks[hv],
                        &mut d,
                        nr,
                        hv,
                    );
                    continue;
                }
                for lane in hv..hv + l {
                    if let Some(j) = lanes.tile[lane] {
                        match masks[j] {
                            Some(_) => {
                                spans[j].gather_scaled(plane(j, ci), &factors[j], &mut d, nr, lane)
                            }
                            None => spans[j].gather(plane(j, ci), &mut d, nr, lane),
                        }
                    }
                }
            }
            // The channel mask's factor per lane, `x * m` as the reference
            // rounds it (the spatial one is applied in the gather).
            if let InMul::Channel(ms) = conv.input {
                for (j, &(i, _, _)) in group.iter().enumerate() {
                    scale[lanes.lane[j]] = ms[imgs[i] * k + ci];
                }
            }
            input_tiles::<E, S>(
                simd,
                tiling,
                &d,
                nr,
                channel_mask.then_some(&scale[..]),
                |pos, hv, t| E::store(simd, &mut v[(pos * kk + c) * nr + hv..], t),
            );
        }
    }
}

/// The GEMMs of row panels `panels` for one block: for each position,
/// `products[pos] = U[pos] (rows x kk) * V[pos] (kk x tiles)`, into `out`
/// (`[panel][pos][group][MR x NR]`, the run of these panels). Each B tile
/// (one group's `kk x NR` at one position) stays in L1 across the panels;
/// the panels' weights at one position stay in L2 across the groups.
struct Products<'a, 'b, E: Elem> {
    /// Positions (GEMMs) per block: the tiling's.
    npos: usize,
    /// Register groups per block ([`groups_per_block`]): the stride of
    /// `out`'s layout.
    gpb: usize,
    /// The transformed weights, `[pos][panel][kk][MR]` ([`transform_packed`]).
    u: &'a [E],
    /// The row panels of `u` at each position.
    npanels: usize,
    v: &'a [E],
    kk: usize,
    groups: usize,
    /// The panels this call computes.
    panels: std::ops::Range<usize>,
    out: &'b mut [E],
}

impl<E: Elem> WithSimd for Products<'_, '_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Products {
            npos,
            gpb,
            u,
            npanels,
            v,
            kk,
            groups,
            panels,
            out,
        } = self;
        let nr = nr::<E, S>();
        let tile_len = MR * nr;
        let b_tile = |g: usize, pos: usize| &v[(g * npos + pos) * kk * nr..][..kk * nr];
        for pos in 0..npos {
            for g in 0..groups {
                let b = b_tile(g, pos);
                // The B tile read after this one, fetched into L2 a share per
                // panel call, one line per A hint of the call's k loop
                // ([`Ahead`]). Each B tile is a new stream (32 KB, 8 pages,
                // at K = 256 in f32 on AVX-512) from beyond L2 (the block's
                // V is 9.4 MB), which the hardware prefetchers take up only
                // after its first misses. Intel Xeon family 6 model 207,
                // AVX-512, 2 threads, P3, alternating runs, each call's
                // share in one burst at its start: the GEMM phase (temporary
                // timers, medians of 7, four rounds) forward 36.4-36.8 ->
                // 34.8-35.1 ms, input gradient 36.4-36.7 -> 34.5-35.1; the
                // whole pass (`examples/conv_speed`, medians of 9, five
                // rounds) forward 58.0-59.3 -> 56.0-61.1 ms (faster in
                // four), input gradient 56.7-59.1 -> 56.1-57.9 (in all
                // five). Spread over the k loop instead of the burst, which
                // left the kernel's loads waiting on the fetches (Intel Xeon
                // family 6 model 167, AVX-512, 2 threads, three alternating
                // rounds): GEMM phase 36.2-36.4 -> 32.3-32.6 ms (medians of
                // 9), whole pass P3 forward 61.8-62.1 -> 57.1-58.1 ms, input
                // gradient 62.2-64.5 -> 56.4-58.5, P4 forward 16.5-17.6 ->
                // 15.3-15.7. Also fetching the next position's weights (a
                // panel's 6 KB) was slower: in one burst, GEMM phase
                // 35.9-37.4 -> 37.0-38.9 ms; spread over the groups, P3
                // forward 57.1-57.5 -> 57.8-58.2 (three rounds, model 207).
                let next = next_b_tile(g, pos, groups, npos).map(|(g, pos)| b_tile(g, pos));
                let a = |pi: usize| &u[(pos * npanels + panels.start + pi) * kk * MR..][..kk * MR];
                // One panel's products: the same tile of the next panel.
                let stride = npos * gpb * tile_len;
                let np = panels.len();
                // Two panels per call where the ISA has the registers.
                for ps in panel_steps::<E, S>(np, |_| true) {
                    let (pi, n) = (ps.start, ps.len());
                    let ahead = next.map_or(Ahead::NONE, |next| Ahead::shares(next, ps, np));
                    let at = ((pi * npos + pos) * gpb + g) * tile_len;
                    // The next C tiles this loop writes.
                    let next = out.as_ptr().wrapping_add(at + n * stride);
                    let next = [next, next.wrapping_add(stride)];
                    let (a, at) = ([a(pi), a(pi + n - 1)], [at, at + stride]);
                    run_packed_step(simd, n, a, kk, b, out, at, false, next, ahead);
                }
            }
        }
    }
}

/// The B tile, `(group, position)`, that [`Products`] reads after `(g,
/// pos)` of `npos` positions: the next group at the same position, else
/// the first group at the next position; none after the last.
fn next_b_tile(g: usize, pos: usize, groups: usize, npos: usize) -> Option<(usize, usize)> {
    if g + 1 < groups {
        Some((g + 1, pos))
    } else {
        (pos + 1 < npos).then_some((0, pos + 1))
    }
}

/// Output transform and epilogue of kept row `ri` (output channel `co`)
/// for every tile of a block, lanes over tiles, into `dst` (row `co` of
/// each of the call's images).
struct OutputRow<'a, 'b, 'c, E: Elem> {
    conv: &'a WinoConv<'a, E>,
    imgs: &'a [usize],
    block: &'a [Tile],
    /// The lanes of each group of the block.
    lanes: &'a [Lanes],
    /// The block's products, laid out as [`Products`] writes them.
    products: &'a [E],
    /// Register groups per block: the stride of `products`' layout, the
    /// one [`Products`] wrote with.
    gpb: usize,
    ri: usize,
    co: usize,
    dst: &'b mut [&'c mut [E]],
}

impl<E: Elem> WithSimd for OutputRow<'_, '_, '_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let OutputRow {
            conv,
            imgs,
            block,
            lanes,
            products,
            gpb,
            ri,
            co,
            dst,
        } = self;
        let (h, w, m) = (conv.h, conv.w, conv.m);
        let nr = nr::<E, S>();
        let l = E::lanes::<S>();
        let tile_len = MR * nr;
        let (t, npos) = (conv.tiling.side(), conv.tiling.positions());
        let (p, r) = (ri / MR, ri % MR);
        // Bias and row scale act on whole registers (the same roundings as
        // per element); ReLU and the spatial mask per element below.
        let add = match conv.epi {
            Epi::Bias { bias, .. } => bias.map(|b| E::splat(simd, b[co])),
            _ => None,
        };
        let relu = matches!(conv.epi, Epi::Bias { relu: true, .. });
        let mut scale = [E::zero(); 32];
        // A tile's outputs, `[t * t][nr]` (at most F(6x6)'s 36).
        let mut out = [E::zero(); 36 * 32];
        let groups = block.len().div_ceil(nr);
        // Row `r` of group `g`'s products at position `pos`.
        let row_at = |g: usize, pos: usize| ((p * npos + pos) * gpb + g) * tile_len + r * nr;
        let all_lanes = lanes;
        for ((g, group), lanes) in block.chunks(nr).enumerate().zip(lanes) {
            // The next group's products of this row, while this group's are
            // transformed: 36 runs of NR values, 6 KB apart (f32, AVX-512)
            // in a buffer the GEMM phase has just written from both cores,
            // which no hardware prefetcher follows; `perf annotate` put 43%
            // of this phase's samples on the wait for these loads. Intel
            // Xeon family 6 model 167, AVX-512, 2 threads,
            // `examples/conv_speed`, medians of 9, four alternating rounds
            // (same bits, a hint): dense P3 forward 61.1-62.7 -> 58.3-60.9
            // ms, input gradient 59.8-61.7 -> 57.8-60.1, faster in each.
            if g + 1 < groups {
                for pos in 0..npos {
                    let at = products.as_ptr().wrapping_add(row_at(g + 1, pos));
                    prefetch(at, Level::L1);
                    prefetch(at.wrapping_add(nr - 1), Level::L1);
                }
                // And the outputs the next group stores. Under the loss's
                // spatial mask most registers scatter tile by tile, and this
                // phase took 85% of the dense one's time for 40% of its
                // tiles; with the hint, P3 forward 35.9-38.8 -> 31.4-34.3
                // ms (see `prefetch_outputs`).
                if let Some(next) = block.chunks(nr).nth(g + 1) {
                    prefetch_outputs(dst, next, &all_lanes[g + 1], l, (h, w), t);
                }
            }
            if let Epi::Rows(sc) = conv.epi {
                for (j, &(i, _, _)) in group.iter().enumerate() {
                    scale[lanes.lane[j]] = sc[imgs[i] * m + co];
                }
            }
            for hv in (0..nr).step_by(l) {
                let mul = matches!(conv.epi, Epi::Rows(_)).then(|| E::load(simd, &scale[hv..]));
                let mut put = |i: usize, yv: E::V<S>| {
                    let yv = match (add, mul) {
                        (Some(b), _) => E::vadd(simd, yv, b),
                        (_, Some(sc)) => E::vmul(simd, yv, sc),
                        _ => yv,
                    };
                    E::store(simd, &mut out[i * nr + hv..], yv);
                };
                let load = |pos: usize| E::load(simd, &products[row_at(g, pos) + hv..]);
                match conv.tiling {
                    Tiling::F4 => {
                        let mv: [E::V<S>; POS] = std::array::from_fn(load);
                        for (i, &yv) in output_tile::<E, S>(simd, &mv).iter().enumerate() {
                            put(i, yv);
                        }
                    }
                    Tiling::F6 => {
                        let mv: [E::V<S>; POS6] = std::array::from_fn(load);
                        for (i, &yv) in output_tile6::<E, S>(simd, &mv).iter().enumerate() {
                            put(i, yv);
                        }
                    }
                }
            }
            if relu {
                for o in out[..t * t * nr].iter_mut() {
                    *o = relu_of(*o);
                }
            }
            for (reg, hv) in (0..group.len()).step_by(l).enumerate() {
                if lanes.scatter_run[reg] {
                    match conv.tiling {
                        // A register of whole tiles of one tile row:
                        // interleave its lanes back into output rows, `4
                        // lanes` values per store run.
                        Tiling::F4 => {
                            let (i, ty, tx) = group[hv];
                            let row = &mut *dst[i];
                            let out_mask = conv.out_mask(imgs[i]);
                            for yy in 0..4.min(h - 4 * ty) {
                                let at = (4 * ty + yy) * w + 4 * tx;
                                let fields = std::array::from_fn(|xx| {
                                    E::load(simd, &out[(yy * 4 + xx) * nr + hv..])
                                });
                                let rows = E::interleave4(simd, fields);
                                store_run(
                                    simd,
                                    &rows,
                                    &mut row[at..],
                                    out_mask.map(|ms| &ms[at..]),
                                );
                            }
                            continue;
                        }
                        // Runs of `RUN6` tiles (lanes `hv ..`, and `hv +
                        // RUN6 ..` with 16 lanes), each output row's `6
                        // RUN6` values in `6 RUN6 / l` stores per run. (The
                        // moves exist wherever runs were formed; the
                        // lane-by-lane path below stands in otherwise,
                        // before any store.)
                        Tiling::F6 => {
                            let moved = (0..t).all(|yy| {
                                let fields = std::array::from_fn(|xx| {
                                    E::load(simd, &out[(yy * 6 + xx) * nr + hv..])
                                });
                                let Some(runs) = scatter6::<E, S>(simd, fields) else {
                                    return false;
                                };
                                for (q, regs) in runs.chunks(6 * RUN6 / l).enumerate() {
                                    let (i, ty, tx) = group[hv + RUN6 * q];
                                    if 6 * ty + yy >= h {
                                        continue;
                                    }
                                    let at = (6 * ty + yy) * w + 6 * tx;
                                    let out_mask = conv.out_mask(imgs[i]);
                                    let row = &mut dst[i][at..];
                                    store_run(simd, regs, row, out_mask.map(|ms| &ms[at..]));
                                }
                                true
                            });
                            if moved {
                                continue;
                            }
                        }
                    }
                }
                for (j, &(i, ty, tx)) in group.iter().enumerate().skip(hv).take(l) {
                    let lane = lanes.lane[j];
                    let row = &mut *dst[i];
                    let (y0, x0) = (t * ty, t * tx);
                    let out_mask = conv.out_mask(imgs[i]);
                    for yy in y0..(y0 + t).min(h) {
                        for x in x0..(x0 + t).min(w) {
                            let val = out[((yy - y0) * t + x - x0) * nr + lane];
                            row[yy * w + x] = match out_mask {
                                Some(ms) => val * ms[yy * w + x],
                                None => val,
                            };
                        }
                    }
                }
            }
        }
    }
}

/// Stores `regs` as consecutive registers at the start of `row`, each
/// times the output mask's values at the same place (`mask`, from the same
/// output on), as the scalar path multiplies each output: the vector
/// scatters' stores, F(4x4)'s and F(6x6)'s.
#[inline(always)]
fn store_run<E: Elem, S: Simd>(simd: S, regs: &[E::V<S>], row: &mut [E], mask: Option<&[E]>) {
    let l = E::lanes::<S>();
    for (q, &yv) in regs.iter().enumerate() {
        let yv = match mask {
            Some(ms) => E::vmul(simd, yv, E::load(simd, &ms[q * l..])),
            None => yv,
        };
        E::store(simd, &mut row[q * l..], yv);
    }
}

/// Prefetches into L1 the outputs that the tiles of `group` (lanes
/// `lanes`, registers of `l` lanes) write in this output row's planes
/// `dst`. The planes of one row are 67 KB apart at P3, and under a spatial
/// mask a group's tiles are scattered over them, so no hardware
/// prefetcher sees these stores coming.
fn prefetch_outputs<E>(
    dst: &[&mut [E]],
    group: &[Tile],
    lanes: &Lanes,
    l: usize,
    hw: (usize, usize),
    t: usize,
) {
    output_runs(group, lanes, l, hw, t, |i, at, len| {
        prefetch_values(dst[i][at..].as_ptr(), len)
    });
}

/// `f(image, offset, len)` for each run of outputs that the tiles of
/// `group` (of side `t`) write in an `h x w` plane: each run of a scatter
/// register, its `t` rows of `t` values per tile of the run, any other
/// tile's `t x t` (less at the border).
fn output_runs(
    group: &[Tile],
    lanes: &Lanes,
    l: usize,
    (h, w): (usize, usize),
    t: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    for (reg, tiles) in group.chunks(l).enumerate() {
        // A scatter register's runs from their first tiles, or every tile.
        let step = match lanes.scatter_run[reg] {
            true => lanes.run,
            false => 1,
        };
        let len = t * step;
        for &(i, ty, tx) in tiles.iter().step_by(step) {
            for y in t * ty..(t * ty + t).min(h) {
                f(i, y * w + t * tx, len.min(w - t * tx));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::counters::Tally;
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::testing::{first_near_then_same_bits, three_image_mask, values};

    /// Images: the three of `three_image_mask`.
    const N: usize = 3;
    const K: usize = 5;
    const M: usize = 8;
    /// The planes the tests run: sides not multiples of 4 (partial tiles).
    /// 9 x 13 has 3 x 4 tiles per image, so one block spans the three
    /// images (several blocks on scalar, 16 tiles each); 17 x 70 has 5 x 18
    /// tiles per image, 270 in all, so every register width has more than
    /// one block, the last one short (a block is 256 f32 tiles on AVX-512,
    /// 128 on AVX2 or for f64 on AVX-512, 64 for f64 on AVX2); 6 x 49
    /// has rows of 13 tiles, so registers of consecutive tiles in one tile
    /// row (the vector gather and scatter), with and without a left or
    /// right border tile, and registers across tile rows occur at 1, 4 and
    /// 8 lanes. Widths 48 and 47 put a register's last window or last
    /// outputs exactly at the right border: at 48 the outputs of tiles up
    /// to the last fit (vector scatter) but their windows reach the padding
    /// (scalar gather); at 47 the last tile's outputs are cut (scalar).
    /// 3 x 9 and 9 x 3 are less than a tile high or wide. 5 x 69 has rows
    /// of 18 tiles, so row runs of 16 lanes (f32 on AVX-512) too.
    const PLANES: [(usize, usize); 8] = [
        (9, 13),
        (17, 70),
        (6, 49),
        (5, 48),
        (5, 47),
        (3, 9),
        (9, 3),
        (5, 69),
    ];

    /// The convolution by definition: the forward sums `w[o][i] (x[i] *
    /// in)`, the transposed one correlates with the flipped `w[i][o]`;
    /// then the epilogue.
    fn by_definition<E: Elem>(c: &WinoConv<'_, E>) -> Vec<f64> {
        let (h, w) = (c.h, c.w);
        let hw = h * w;
        let mut y = vec![0.0; N * c.m * hw];
        for n in 0..N {
            for o in 0..c.m {
                for py in 0..h {
                    for px in 0..w {
                        let mut s = 0.0;
                        for i in 0..c.k {
                            for t in 0..9 {
                                let (yy, xx) =
                                    ((py + t / 3) as isize - 1, (px + t % 3) as isize - 1);
                                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                                    continue;
                                }
                                let at = yy as usize * w + xx as usize;
                                let mut v = c.src[(n * c.k + i) * hw + at].as_f64();
                                match c.input {
                                    InMul::Spatial(ms) => v *= ms[n * hw + at].as_f64(),
                                    InMul::Channel(ms) => v *= ms[n * c.k + i].as_f64(),
                                    InMul::None => {}
                                }
                                let wt = if c.transposed {
                                    c.weights[(i * c.m + o) * 9 + 8 - t]
                                } else {
                                    c.weights[(o * c.k + i) * 9 + t]
                                };
                                s += wt.as_f64() * v;
                            }
                        }
                        let at = py * w + px;
                        y[(n * c.m + o) * hw + at] = match c.epi {
                            Epi::Bias { bias, relu } => {
                                let s = s + bias.map_or(0.0, |b| b[o].as_f64());
                                if relu { s.max(0.0) } else { s }
                            }
                            Epi::Rows(sc) => s * sc[n * c.m + o].as_f64(),
                            Epi::Spatial(ms) => s * ms[n * hw + at].as_f64(),
                        };
                    }
                }
            }
        }
        y
    }

    /// The runs [`prefetch_outputs`] hints are exactly the outputs the
    /// group's tiles write: rows of 23 tiles (the last one partial) with
    /// every eleventh left out (as a spatial mask leaves them), so groups
    /// mix scatter runs, other registers and border tiles: F(4x4) at 4 and
    /// 8 lanes; F(6x6) at 16 lanes with two runs per register, and at 8
    /// with none.
    #[test]
    fn output_runs_are_the_outputs_of_the_tiles() {
        for (tiling, l) in [
            (Tiling::F4, 4),
            (Tiling::F4, 8),
            (Tiling::F6, 16),
            (Tiling::F6, 8),
        ] {
            output_runs_case(tiling, l);
        }
    }

    fn output_runs_case(tiling: Tiling, l: usize) {
        let t = tiling.side();
        let (h, w) = (3 * t - 2, 23 * t - 2);
        let tiles: Vec<Tile> = (0..2)
            .flat_map(|i| (0..3).flat_map(move |ty| (0..23).map(move |tx| (i, ty, tx))))
            .filter(|&(i, ty, tx)| (i + ty * 23 + tx) % 11 != 5)
            .collect();
        let order: Vec<usize> = (0..l).collect();
        let shape = RunShape::new(tiling, l, true);
        let tiles = match shape {
            Some(shape) => run_order(&tiles, l, shape, w),
            None => tiles,
        };
        let mut runs_seen = 0;
        for group in tiles.chunks(2 * l) {
            let lanes = Lanes::new(&order, group, w, shape);
            runs_seen += lanes.scatter_run.iter().filter(|&&r| r).count();
            let mut hinted = std::collections::BTreeSet::new();
            output_runs(group, &lanes, l, (h, w), t, |i, at, len| {
                assert!(at + len <= h * w && at % w + len <= w);
                hinted.extend((at..at + len).map(|o| (i, o)));
            });
            let written: std::collections::BTreeSet<(usize, usize)> = group
                .iter()
                .flat_map(|&(i, ty, tx)| {
                    (t * ty..(t * ty + t).min(h)).flat_map(move |y| {
                        (t * tx..(t * tx + t).min(w)).map(move |x| (i, y * w + x))
                    })
                })
                .collect();
            assert_eq!(hinted, written, "{tiling:?}, {l} lanes, group {group:?}");
        }
        assert_eq!(
            runs_seen > 0,
            shape.is_some(),
            "{tiling:?}, {l} lanes: {runs_seen} scatter runs"
        );
    }

    /// `masked_outputs` lists exactly the outputs of the given tiles whose
    /// 3x3 receptive field (pad 1) holds only zeros of the mask, in tile
    /// order: planes with partial tiles, masks with zeros in blocks, on
    /// borders and scattered, a tile list with tiles left out.
    #[test]
    fn masked_outputs_are_the_outputs_reading_only_zeros() {
        for t in [4, 6] {
            for (h, w) in [(9usize, 13usize), (6, 49), (3, 9), (9, 3), (13, 14)] {
                let masks: [Vec<f64>; 3] = [
                    (0..h * w)
                        .map(|i| f64::from(u8::from(i / w < 3 && i % w < 5)))
                        .collect(),
                    (0..h * w)
                        .map(|i| f64::from(u8::from(i % 7 == 0)))
                        .collect(),
                    (0..h * w)
                        .map(|i| if i % w == w - 1 { 0.5 } else { 0.0 })
                        .collect(),
                ];
                let (th, tw) = (h.div_ceil(t), w.div_ceil(t));
                let tiles: Vec<Tile> = (0..th)
                    .flat_map(|ty| (0..tw).map(move |tx| (0, ty, tx)))
                    .filter(|&(_, ty, tx)| (ty + 2 * tx) % 5 != 3)
                    .collect();
                for ms in &masks {
                    let mut want = Vec::new();
                    for &(_, ty, tx) in &tiles {
                        for y in t * ty..(t * ty + t).min(h) {
                            for x in t * tx..(t * tx + t).min(w) {
                                let mut kept = false;
                                for t in 0..9 {
                                    let (yy, xx) = (y as isize + t / 3 - 1, x as isize + t % 3 - 1);
                                    if yy >= 0 && xx >= 0 && yy < h as isize && xx < w as isize {
                                        kept |= ms[yy as usize * w + xx as usize] != 0.0;
                                    }
                                }
                                if !kept {
                                    want.push(y * w + x);
                                }
                            }
                        }
                    }
                    assert_eq!(
                        masked_outputs(ms, (h, w), t, &tiles),
                        want,
                        "{h}x{w} tile {t}"
                    );
                }
            }
        }
    }

    /// Under a spatial input mask, an output whose every tap reads a masked
    /// input is `act(b)` bit for bit (a sum of exact zeros, as the direct
    /// conv gives it), even in a computed tile whose window holds values of
    /// 1e6 next to it: the transforms' rounding noise of those values would
    /// otherwise land there (about 1e-1 in f32, far above `b`'s ulp). The
    /// mask keeps only the plane's left columns, so tiles straddle its edge
    /// in both images.
    #[test]
    fn outputs_reading_only_masked_inputs_are_exactly_act_of_bias() {
        fn case<E: Elem>() {
            let (n, k, m, h, w) = (2, 3, 4, 8, 13);
            let elems = |v: Vec<f64>| -> Vec<E> { v.into_iter().map(E::from_f64).collect() };
            let x = elems(values(n * k * h * w, 1).iter().map(|v| v * 1e6).collect());
            let weights = elems(values(m * k * 9, 2));
            // Biases of both signs and a zero: ReLU keeps some, not others.
            let bias = elems(vec![0.25, -0.5, 0.0, 1e-3]);
            // Image 0 keeps columns 0-1, image 1 columns 0-4: each has
            // fully masked outputs in a computed tile (columns 3 and 6-7).
            let mask = elems(
                (0..n * h * w)
                    .map(|i| f64::from(u8::from(i % w < 2 + 3 * (i / (h * w)))))
                    .collect(),
            );
            for (arch, tiling) in Isa::every_arch()
                .into_iter()
                .flat_map(|a| [(a, Tiling::F4), (a, Tiling::F6)])
            {
                for relu in [false, true] {
                    let tally = Tally::default();
                    let conv = WinoConv {
                        src: &x,
                        n,
                        k,
                        m,
                        h,
                        w,
                        weights: &weights,
                        transposed: false,
                        input: InMul::Spatial(&mask),
                        epi: Epi::Bias {
                            bias: Some(&bias[..]),
                            relu,
                        },
                        tiling,
                        cx: Ctx {
                            arch,
                            tally: &tally,
                            pad_per_image_above: crate::backend::cpu::PAD_PER_IMAGE_ABOVE,
                        },
                    };
                    let y = conv.run();
                    let mut dead = 0;
                    for img in 0..n {
                        let ms = &mask[img * h * w..][..h * w];
                        for at in 0..h * w {
                            let (py, px) = (at / w, at % w);
                            let reads_kept = (py.saturating_sub(1)..(py + 2).min(h)).any(|yy| {
                                (px.saturating_sub(1)..(px + 2).min(w))
                                    .any(|xx| ms[yy * w + xx] != E::zero())
                            });
                            if reads_kept {
                                continue;
                            }
                            dead += 1;
                            for co in 0..m {
                                let got = y[(img * m + co) * h * w + at];
                                let want = act_of_bias(Some(&bias[..]), co, relu);
                                assert!(
                                    got.as_f64().to_bits() == want.as_f64().to_bits(),
                                    "{tiling:?} image {img} output {co} at ({py}, {px}): {}, want {}",
                                    got.as_f64(),
                                    want.as_f64()
                                );
                            }
                        }
                    }
                    // Dead outputs in computed tiles (the straddling ones)
                    // as well as in skipped ones.
                    assert!(dead > 2 * 8 * 4, "{dead} dead outputs");
                    assert!(tally.snapshot().tiles > 0);
                }
            }
        }
        case::<f32>();
        case::<f64>();
    }

    /// The block sizes at every group width an ISA has (`nr` = 2 lanes x
    /// 1 to 16): F(4x4)'s [`GROUPS`] groups, F(6x6)'s 128 tiles, each
    /// block's (tile, position) pairs within the scratch, and the scratch no
    /// larger than the larger block. No result depends on them (any block
    /// size gives the same bits), so only this test sees a wrong one; one
    /// past the scratch would leave groups untransformed.
    #[test]
    fn blocks_fit_the_scratch_and_f6_blocks_hold_128_tiles() {
        assert_eq!(F6_BLOCK_TILES, 128);
        for nr in [2, 4, 8, 16, 32] {
            assert_eq!(groups_per_block(Tiling::F4, nr), GROUPS);
            assert_eq!(groups_per_block(Tiling::F6, nr) * nr, 128, "nr {nr}");
            let pairs =
                [Tiling::F4, Tiling::F6].map(|t| groups_per_block(t, nr) * nr * t.positions());
            let scratch = block_tile_positions(nr);
            assert!(
                pairs.iter().all(|&p| p <= scratch),
                "nr {nr}: {pairs:?} > {scratch}"
            );
            assert_eq!(scratch, pairs[0].max(pairs[1]), "nr {nr}");
        }
        // Worked by hand: AVX2 f32 (nr 16), 8 groups of F(6x6) (128 x 64 =
        // 8192 pairs) over 8 of F(4x4) (128 x 36); AVX-512 f32 (nr 32), 4 of
        // F(6x6) (8192) under 8 of F(4x4) (256 x 36 = 9216).
        assert_eq!(
            (groups_per_block(Tiling::F6, 16), block_tile_positions(16)),
            (8, 8192)
        );
        assert_eq!(
            (groups_per_block(Tiling::F6, 32), block_tile_positions(32)),
            (4, 9216)
        );
    }

    /// Following `next_b_tile` from the first tile visits every B tile of
    /// a block once, in the order `Products` reads them, then stops.
    #[test]
    fn next_b_tile_follows_the_products_loop() {
        for (groups, npos) in (1..=GROUPS).flat_map(|g| [(g, POS), (g, POS6)]) {
            let mut order = Vec::new();
            for pos in 0..npos {
                for g in 0..groups {
                    order.push((g, pos));
                }
            }
            let mut walk = vec![(0, 0)];
            while let Some(&(g, pos)) = walk.last() {
                match next_b_tile(g, pos, groups, npos) {
                    Some(next) => walk.push(next),
                    None => break,
                }
                assert!(
                    walk.len() <= order.len(),
                    "{groups} groups: past the last tile"
                );
            }
            assert_eq!(walk, order, "{groups} groups, {npos} positions");
        }
    }

    /// Every input multiplier and epilogue, forward and transposed, with
    /// blocks that span images and tiles left out by spatial masks: the
    /// definition's values, and the same bits for 1, 2 and 3 threads on
    /// every instruction set this CPU has; f64 and f32 (their lane orders
    /// differ: identity for f64 on AVX2, shuffled for f32).
    #[test]
    fn every_mask_and_epilogue_matches_the_definition_with_the_same_bits() {
        for tiling in [Tiling::F4, Tiling::F6] {
            // 13 x 200: 3 x 34 F(6x6) tiles per image, so they too span
            // several blocks (306 tiles against 128 per f32 F(6x6) block on
            // AVX-512), the last one short.
            for (h, w) in PLANES.into_iter().chain([(13, 200)]) {
                // f64 Winograd against plain sums: the transforms'
                // coefficients lose a few ulps per term (norm-wise about
                // 1e-15; F(6x6)'s constants, 2/9, 1/90, ..., round too).
                every_case::<f64>(tiling, h, w, 1e-12);
                // f32: the same few ulps of 6e-8 each, grown by the
                // transforms' coefficients (F(4x4): up to 8 x 5 per side,
                // measured up to 9.6e-7 here; F(6x6) about twice that at
                // the loss's channel counts); a wrong tile, lane or window
                // is off by O(1).
                every_case::<f32>(tiling, h, w, 1e-5);
            }
        }
    }

    fn every_case<E: Elem>(tiling: Tiling, h: usize, w: usize, tol: f64) {
        let (t, npos) = (tiling.side(), tiling.positions());
        let elems = |v: Vec<f64>| -> Vec<E> { v.into_iter().map(E::from_f64).collect() };
        let x = elems(values(N * K * h * w, 1));
        let dy = elems(values(N * M * h * w, 2));
        // Output channel 3 and input channel 2 have only zero filters (a
        // dead channel): their sums are exact zeros, whose sign must not
        // depend on the ISA (which decides the weight transform's split
        // between registers and the scalar tail).
        let weights = elems(
            values(M * K * 9, 3)
                .into_iter()
                .enumerate()
                .map(|(j, v)| {
                    if j / 9 / K == 3 || j / 9 % K == 2 {
                        0.0
                    } else {
                        v
                    }
                })
                .collect(),
        );
        let bias = elems(values(M, 4));
        let sp = elems(three_image_mask(h, w));
        let ch_real = elems(values(N * K, 5).iter().map(|v| v + 1.5).collect());
        // 0/1 channel masks (`[N, K]`) with every channel of image 1 zero:
        // that image has nothing to multiply, only outputs to fill.
        let ch01 = elems(
            (0..N * K)
                .map(|i| f64::from(u8::from(i % 3 != 1 && i / K != 1)))
                .collect(),
        );
        let rows_real = elems(values(N * K, 6).iter().map(|v| v - 1.5).collect());
        let rows01 = elems(
            (0..N * K)
                .map(|i| f64::from(u8::from(i % 4 != 2 && i / K != 1)))
                .collect(),
        );
        // Zeros over the last tile's window only (so that tile is left out
        // and most are computed; the outputs of a left-out tile must be
        // filled), elsewhere values in [0.25, 2.25] that differ from
        // position to position (with a constant mask value, a mask read
        // from the wrong register of a row run passed).
        let (th, tw) = (h.div_ceil(t), w.div_ceil(t));
        let corner = elems(
            values(N * h * w, 7)
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let (y, x) = ((i % (h * w)) / w, i % w);
                    let kept = y + 1 < t * (th - 1) || x + 1 < t * (tw - 1);
                    if kept { 1.25 + v } else { 0.0 }
                })
                .collect(),
        );
        let forward = |input, relu| {
            (
                false,
                input,
                Epi::Bias {
                    bias: Some(&bias[..]),
                    relu,
                },
            )
        };
        let cases: Vec<(bool, InMul<'_, E>, Epi<'_, E>)> = vec![
            forward(InMul::None, true),
            forward(InMul::Spatial(&sp), false),
            forward(InMul::Channel(&ch_real), true),
            forward(InMul::Channel(&ch01), false),
            forward(InMul::Spatial(&corner), true),
            (
                true,
                InMul::None,
                Epi::Bias {
                    bias: None,
                    relu: false,
                },
            ),
            (true, InMul::None, Epi::Rows(&rows_real)),
            (true, InMul::None, Epi::Rows(&rows01)),
            (true, InMul::None, Epi::Spatial(&sp)),
            (true, InMul::None, Epi::Spatial(&corner)),
        ];
        for (case, &(transposed, input, epi)) in cases.iter().enumerate() {
            let (k, m) = if transposed { (M, K) } else { (K, M) };
            // What the work counters must say for one call: kept channels
            // per image (a 0/1 channel mask's zeros leave the GEMMs), and
            // under a spatial mask some tiles left out.
            let zeros = |c: &[E], img: usize, len: usize| {
                c[img * len..][..len]
                    .iter()
                    .filter(|&&v| v == E::zero())
                    .count()
            };
            let (sparse_k, sparse_m) = match (input, epi) {
                (InMul::Channel(c), _) if c.contains(&E::zero()) => (Some(c), None),
                (_, Epi::Rows(c)) if c.contains(&E::zero()) => (None, Some(c)),
                _ => (None, None),
            };
            let spatial = matches!(input, InMul::Spatial(_)) || matches!(epi, Epi::Spatial(_));
            let kept: Vec<(usize, usize)> = (0..N)
                .map(|img| {
                    let rows = m - sparse_m.map_or(0, |c| zeros(c, img, m));
                    (rows, k - sparse_k.map_or(0, |c| zeros(c, img, k)))
                })
                .collect();
            // Tiles run or left out: those of the images with any product
            // to compute (as in the direct conv).
            let tiles = th * tw * kept.iter().filter(|&&(r, c)| r * c > 0).count();
            let mut first: Option<Vec<E>> = None;
            for arch in Isa::every_arch() {
                for threads in [1, 2, 3] {
                    let tally = Tally::default();
                    let conv = WinoConv {
                        src: if transposed { &dy } else { &x },
                        n: N,
                        k,
                        m,
                        h,
                        w,
                        weights: &weights,
                        transposed,
                        input,
                        epi,
                        tiling,
                        cx: Ctx {
                            arch,
                            tally: &tally,
                            pad_per_image_above: crate::backend::cpu::PAD_PER_IMAGE_ABOVE,
                        },
                    };
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let y = pool.install(|| conv.run());
                    assert_eq!(y.len(), N * m * h * w, "{h}x{w} case {case}: output size");
                    let t = tally.snapshot();
                    assert_eq!(
                        t.tiles + t.tiles_skipped,
                        tiles as u64,
                        "{h}x{w} case {case}"
                    );
                    assert_eq!(
                        t.tiles_skipped > 0,
                        spatial,
                        "{h}x{w} case {case}: tiles skipped"
                    );
                    assert_eq!(
                        t.spatial_skip_calls,
                        u64::from(spatial),
                        "{h}x{w} case {case}"
                    );
                    let sparse = sparse_k.is_some() || sparse_m.is_some();
                    assert_eq!(
                        t.channel_sparse_calls,
                        u64::from(sparse),
                        "{h}x{w} case {case}"
                    );
                    // Packed once for the call, or per image from its kept channels.
                    let packed: usize = if sparse {
                        kept.iter().map(|&(r, c)| npos * r * c).sum()
                    } else {
                        npos * m * k
                    };
                    assert_eq!(
                        t.weights_packed, packed as u64,
                        "{h}x{w} case {case}: weights packed"
                    );
                    let skipped: usize = kept.iter().map(|&(r, c)| m - r + k - c).sum();
                    assert_eq!(t.channels_skipped, skipped as u64, "{h}x{w} case {case}");
                    if !spatial {
                        let per_tile: usize = kept.iter().map(|&(r, c)| r * c).sum();
                        let macs = npos * per_tile * th * tw;
                        assert_eq!(t.macs, macs as u64, "{h}x{w} case {case}: multiply-adds");
                    }
                    first_near_then_same_bits(
                        &mut first,
                        y,
                        || by_definition(&conv),
                        tol,
                        &format!("{h}x{w} {tiling:?} case {case} ({arch:?}, {threads} threads)"),
                    );
                }
            }
        }
    }
}
