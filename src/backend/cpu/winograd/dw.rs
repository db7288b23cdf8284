//! The Winograd weight gradient:
//! `dW[co][ci] = G^T ( sum_tiles (A dY_t A^T)[co] (.) (B^T x_t B)[ci] ) G`,
//! i.e. 36 (F(4x4)) or 64 (F(6x6)) GEMMs `(Cout x tiles) (tiles x Cin)`
//! with the long reduction over tiles, then the adjoint weight transform.

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use super::transform::{
    RUN_WINDOWS, WindowSpan, channel_records, grad_tile, input_tiles, weight_grad_tile_v,
};
use super::transform6::{grad_tile6, weight_grad_tile6_v};
use super::{MAX_POS, Tile, Tiling};
use crate::backend::cpu::Ctx;
use crate::backend::cpu::conv_fwd::nr_for;
use crate::backend::cpu::kernel::{AWalk, MR, nr, panel_steps, run_walked_step};
use crate::backend::cpu::pack::Scratch;
use crate::backend::cpu::simd::{Ahead, Elem, MAX_LANES, lane_order, prefetch_values};
use crate::backend::{ConvArgs, InputMask};
use crate::pool;

/// The most tiles a k-block holds, in either tiling: 1 KiB of each A row
/// at each position (as the direct weight gradient), 256 tiles in f32, a
/// multiple of every NR.
///
/// F(6x6) held 144 before on AVX2, 128 on AVX-512 (as many whole
/// registers as fit F(4x4)'s buffers). Each block adds its products into
/// the sums (64 positions of 256 x 256 in f32, 16.8 MB), so a dense P3 pass (952 tiles) read and wrote them 7 times,
/// now 4 (`tiles_per_block`). Measured (AMD EPYC Zen 3, family 25 model 1,
/// AVX2, 2 threads, `examples/conv_speed` with `DMKD_ALGO=auto`, the two
/// layouts alternated call by call in one process, means of 45 calls
/// each, two rounds), ms: dense P3 88.5 -> 86.5 and 102.7 -> 99.9, P4 23.9
/// -> 23.7 and 28.5 -> 28.1; under the loss's spatial mask P3 46.5 -> 45.8
/// and 53.8 -> 52.7, P4 (F(4x4)) 16.0 -> 15.3 and 20.2 -> 19.8; under its
/// channel mask P3 51.2 -> 49.5 and 53.2 -> 51.4, P4 16.1 -> 16.0 and 16.1
/// -> 15.7. Faster in all twelve pairs. (Those runs capped F(6x6)'s blocks
/// at 288 tiles, which deals every one of those passes' tiles as 256
/// does.) The buffers grew to F(6x6)'s length: peak RSS of `dmkd bench
/// --only loss`, retinanet 496-502 -> 504-511 MiB, two-stage 1200-1201 ->
/// 1198 (docs/engineering.md).
fn max_tiles_per_block<E>() -> usize {
    1024 / std::mem::size_of::<E>()
}

/// The length of the block buffers (a column tile's B, an output
/// channel's A row): F(6x6)'s largest block, so that both tilings' buffers
/// have one length, and the pool, which matches buffers by length, keeps
/// one set of them (as the forward engine's blocks). A shorter block uses
/// the front of them.
fn block_buffer_len<E>() -> usize {
    MAX_POS * max_tiles_per_block::<E>()
}

/// Tiles per k-block for `ntiles` tiles: as few blocks as the largest
/// allows, the tiles dealt evenly over them (rounded up to whole
/// registers, at least one), so that no block is a sliver and a block's
/// rows (`positions x tiles`) are no longer than its tiles need. (Rows
/// laid out for 288 tiles and holding 126, one image's at P4 under the
/// channel mask, spread the GEMM's operands over twice the pages: 5%
/// slower, Zen 3, alternated as above.)
///
/// The sums do not depend on it: each block's products resume from the
/// previous block's accumulators, one chain of adds in tile order.
fn tiles_per_block<E>(nr: usize, ntiles: usize) -> usize {
    let most = max_tiles_per_block::<E>();
    let blocks = ntiles.div_ceil(most).max(1);
    ntiles.div_ceil(blocks).next_multiple_of(nr).max(nr)
}

/// The distance between two output channels' rows of the transformed
/// output gradients (A, `[co][pos][tile]`), in elements: a block rounded up
/// to a multiple of 4 KiB, and one cache line more.
///
/// Why the line: a kernel call reads its 12 rows (two panels) side by
/// side, one value of each per step. Rows a multiple of 4 KiB apart fall
/// in one set of L1 (64 sets of 64-byte lines: an address's bits 6-11),
/// and 12 streams through a set's 8 ways (Zen 4's 32 KiB L1) evict each
/// other's lines before their next 15 values are read. One line more than
/// a multiple of 4 KiB puts them in 12 sets, whatever the block's length.
/// Measured with blocks of 36 KiB (AMD EPYC Zen 4, family 25 model 17,
/// AVX-512, 2 threads, `examples/conv_speed` with `DMKD_ALGO=auto`, dense
/// P3 weight gradient, F(6x6), medians of 5-9, five alternating rounds,
/// faster in all five): 74.2 / 65.6 / 71.9 / 70.2 / 73.8 -> 69.1 / 64.3 /
/// 66.1 / 62.7 / 70.7 ms.
fn a_stride<E>(block: usize) -> usize {
    let size = std::mem::size_of::<E>();
    block.next_multiple_of(4096 / size) + 64 / size
}

/// `dw[co][ci][ky][kx]` of a 3x3 / stride 1 / pad 1 convolution.
///
/// Under a channel mask with exact zeros, each image's masked channels
/// add nothing: the sums then run per image over its kept channels only
/// (a compact B), and the images' partial gradients are added in image
/// order (a fixed order, whatever the thread count).
pub(crate) fn conv2d_backward_weight<E: Elem>(
    dy: &[E],
    x: &[E],
    args: &ConvArgs<E>,
    tiling: Tiling,
    cx: Ctx<'_>,
) -> Vec<E> {
    let g = &args.geom;
    let (n, c, m) = (g.n, g.c_in, g.c_out);
    let mut dw = pool::take::<E>(m * c * 9);
    match &args.mask {
        Some(InputMask::Channel(ms)) if ms.as_slice().contains(&E::zero()) => {
            cx.tally.channel_sparse_call();
            dw.fill(E::zero());
            for img in 0..n {
                let cols: Vec<usize> = (0..c)
                    .filter(|&ci| ms.as_slice()[img * c + ci] != E::zero())
                    .collect();
                cx.tally.channels_skipped(c - cols.len());
                if cols.is_empty() {
                    continue;
                }
                let part = Sums::new(dy, x, args, tiling, img..img + 1, &cols, cx);
                // One buffer per rayon job, reused across its output
                // channels (`weight_grad_row` writes all of it each time).
                dw.par_chunks_mut(c * 9).enumerate().for_each_init(
                    || vec![E::zero(); cols.len() * 9],
                    |d, (co, row)| {
                        part.weight_grad_row(cx.arch, co, d);
                        for (&ci, d) in cols.iter().zip(d.chunks_exact(9)) {
                            for (o, &v) in row[ci * 9..ci * 9 + 9].iter_mut().zip(d) {
                                *o += v;
                            }
                        }
                    },
                );
            }
        }
        _ => {
            let cols: Vec<usize> = (0..c).collect();
            let all = Sums::new(dy, x, args, tiling, 0..n, &cols, cx);
            dw.par_chunks_mut(c * 9)
                .enumerate()
                .for_each(|(co, row)| all.weight_grad_row(cx.arch, co, row));
        }
    }
    dw
}

/// The 36 or 64 transformed-domain sums `sum_tiles (A dY A^T)[co] (.)
/// (B^T x B)[cols[k]]` over the tiles of some images.
struct Sums<E: Elem> {
    tiling: Tiling,
    /// `[pos][panel (pstride)][ctile][MR][NR]`
    c: Scratch<E>,
    pstride: usize,
    ctiles: usize,
    nr: usize,
}

impl<E: Elem> Sums<E> {
    /// `G^T D G` of output channel `co` for every column `k`, into
    /// `out[9 k .. 9 k + 9]` (`out` holds 9 values per column).
    ///
    /// The sums hold a column tile's NR columns side by side at each
    /// position, so each position is read as one run of NR values for NR
    /// columns. (Reading the 36 values of one column at a time touched 36
    /// cache lines of the 9.4 MB sums per column: `perf` put 1.8% of the
    /// retinanet loss under `auto` there. Intel Xeon AVX-512, 2 threads,
    /// `examples/conv_speed`, four alternating rounds: P3 57.6-60.7 ->
    /// 56.6-58.7 ms, P4 16.4-16.9 -> 15.1-16.4, P5 5.9-6.2 -> 5.1-5.9.)
    fn weight_grad_row(&self, arch: Arch, co: usize, out: &mut [E]) {
        arch.dispatch(GradRow {
            sums: self,
            co,
            out,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        dy: &[E],
        x: &[E],
        args: &ConvArgs<E>,
        tiling: Tiling,
        imgs: std::ops::Range<usize>,
        cols: &[usize],
        cx: Ctx<'_>,
    ) -> Self {
        let g = &args.geom;
        let (m, h, w) = (g.c_out, g.h, g.w);
        let hw = h * w;
        let (side, npos) = (tiling.side(), tiling.positions());
        let (th, tw) = (h.div_ceil(side), w.div_ceil(side));
        let nr = nr_for::<E>(cx.arch);
        let ctiles = cols.len().div_ceil(nr);
        let panels = m.div_ceil(MR);
        let tile_len = MR * nr;
        // Every tile of these images in (img, ty, tx) order; under a spatial
        // mask with zeros, a tile whose input window is all masked adds only
        // zeros and is left out (the others keep their order).
        let smask = match &args.mask {
            Some(InputMask::Spatial(ms)) if ms.as_slice().contains(&E::zero()) => {
                Some(ms.as_slice())
            }
            _ => None,
        };
        if smask.is_some() {
            cx.tally.spatial_skip_call();
        }
        let mut tiles = Vec::with_capacity(imgs.len() * th * tw);
        for img in imgs.clone() {
            for ty in 0..th {
                for tx in 0..tw {
                    let span = WindowSpan::new(tiling, h, w, ty, tx);
                    if !smask.is_some_and(|ms| span.reads_only_zeros(&ms[img * hw..][..hw])) {
                        tiles.push((img, ty, tx));
                    }
                }
            }
        }
        cx.tally
            .tiles(tiles.len(), imgs.len() * th * tw - tiles.len());
        cx.tally.macs(npos * m * cols.len() * tiles.len());
        let tb = tiles_per_block::<E>(nr, tiles.len());
        let threads = rayon::current_num_threads();
        // GEMM tasks: (position, run of panels), at least 4 per thread; the
        // split never changes a bit (threads split outputs, not the reduction).
        let splits = (4 * threads).div_ceil(npos).clamp(1, panels.max(1));
        let per = panels.div_ceil(splits).max(1);
        // Panels per position as laid out (a few unused ones at the end).
        let pstride = per * splits;
        // The accumulated products, `[pos][panel][ctile][MR][NR]`; zeros for
        // an empty tile list.
        let mut cbuf = Scratch::<E>::new(npos * pstride * ctiles * tile_len);
        let ct = cbuf.as_mut_slice();
        if tiles.is_empty() {
            ct.fill(E::zero());
        }
        // B: transformed inputs `[ctile][pos][tile][NR]` (lanes are channels);
        // A: transformed output gradients `[co][pos][tile]` (lanes are tiles),
        // its rows `a_stride` apart. The buffers have one length whatever
        // the tiling and the tiles (`block_buffer_len`); a block uses the
        // front of them.
        let block = npos * tb;
        let buf_len = block_buffer_len::<E>();
        debug_assert!(block <= buf_len);
        let mut vbuf = Scratch::<E>::new(ctiles * buf_len * nr);
        let astride = a_stride::<E>(block);
        let mut wbuf = Scratch::<E>::new(m * a_stride::<E>(buf_len));
        let arch = cx.arch;
        for (bi, bt) in tiles.chunks(tb).enumerate() {
            let vt = &mut vbuf.as_mut_slice()[..ctiles * block * nr];
            let wt = &mut wbuf.as_mut_slice()[..m * astride];
            vt.par_chunks_mut(block * nr)
                .enumerate()
                .for_each(|(cti, out)| {
                    arch.dispatch(XTransform {
                        x,
                        args,
                        tiling,
                        tiles: bt,
                        tb,
                        cols: &cols[(cti * nr).min(cols.len())..],
                        out,
                    })
                });
            wt.par_chunks_mut(astride)
                .enumerate()
                .for_each(|(co, out)| {
                    arch.dispatch(DyTransform {
                        dy,
                        args,
                        tiling,
                        tiles: bt,
                        tb,
                        co,
                        out,
                    })
                });
            let (vt, wt) = (&*vt, &*wt);
            ct.par_chunks_mut(per * ctiles * tile_len)
                .enumerate()
                .for_each(|(task, cout)| {
                    let (pos, p0) = (task / splits, (task % splits) * per);
                    arch.dispatch(DwGemm {
                        vt,
                        wt,
                        k: bt.len(),
                        tb,
                        block,
                        astride,
                        m,
                        ctiles,
                        pos,
                        p0,
                        first: bi == 0,
                        c: cout,
                    })
                });
        }
        drop(vbuf);
        drop(wbuf);
        Sums {
            tiling,
            c: cbuf,
            pstride,
            ctiles,
            nr,
        }
    }
}

/// [`Sums::weight_grad_row`]: each run of a register's columns through
/// [`weight_grad_tile_v`] or [`weight_grad_tile6_v`] (lanes are columns,
/// as the sums lay them out), the next column tile's runs prefetched (36 runs 264 KB apart at 256 x 256, f32). One column at a
/// time, this phase took 1.5-1.7 ms of a dense 256 x 256 weight gradient
/// in a slow stretch, now 0.87-0.98 (Intel Xeon family 6 model 167,
/// AVX-512, 2 threads, temporary timers, three alternating rounds; P5
/// call 6.6-7.3 -> 5.9-6.5 ms).
struct GradRow<'a, 'b, E: Elem> {
    sums: &'a Sums<E>,
    co: usize,
    out: &'b mut [E],
}

impl<E: Elem> WithSimd for GradRow<'_, '_, E> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let GradRow { sums, co, out } = self;
        let (nr, ctiles, pstride) = (sums.nr, sums.ctiles, sums.pstride);
        let npos = sums.tiling.positions();
        let l = E::lanes::<S>();
        let c = sums.c.as_slice();
        let cols = out.len() / 9;
        // Where row `co`'s run of column tile `ct` lies at position `pos`.
        let at = |ct: usize, pos: usize| {
            ((pos * pstride + co / MR) * ctiles + ct) * MR * nr + (co % MR) * nr
        };
        let mut regs = [E::zero(); 9 * MAX_LANES];
        for ct in 0..ctiles {
            let lanes = nr.min(cols - ct * nr);
            if ct + 1 < ctiles {
                for pos in 0..npos {
                    prefetch_values(c[at(ct + 1, pos)..].as_ptr(), nr);
                }
            }
            // Every run of a register's columns, the last one too: its
            // lanes past the last column read the sums of zero inputs
            // (`XTransform` leaves them 0), and their results are dropped,
            // so each column gets the same bits whatever the register
            // width.
            for hv in (0..lanes).step_by(l) {
                let load = |pos: usize| E::load(simd, &c[at(ct, pos) + hv..]);
                let dw = match sums.tiling {
                    Tiling::F4 => weight_grad_tile_v::<E, S>(simd, &std::array::from_fn(load)),
                    Tiling::F6 => weight_grad_tile6_v::<E, S>(simd, &std::array::from_fn(load)),
                };
                for (q, &v) in dw.iter().enumerate() {
                    E::store(simd, &mut regs[q * l..], v);
                }
                let cols = l.min(lanes - hv);
                for (j, dst) in out[(ct * nr + hv) * 9..][..9 * cols]
                    .chunks_exact_mut(9)
                    .enumerate()
                {
                    for (q, o) in dst.iter_mut().enumerate() {
                        *o = regs[q * l + j];
                    }
                }
            }
        }
    }
}

/// Transformed inputs of one block for channels `c0 .. c0 + NR`.
struct XTransform<'a, 'b, E: Elem> {
    x: &'a [E],
    args: &'a ConvArgs<E>,
    tiling: Tiling,
    tiles: &'a [Tile],
    tb: usize,
    /// The channels from this task's first lane on (the first NR are its lanes).
    cols: &'a [usize],
    out: &'b mut [E],
}

impl<E: Elem> WithSimd for XTransform<'_, '_, E> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let XTransform {
            x,
            args,
            tiling,
            tiles,
            tb,
            cols,
            out,
        } = self;
        let g = &args.geom;
        let (c, h, w) = (g.c_in, g.h, g.w);
        let hw = h * w;
        let nr = nr::<E, S>();
        let l = E::lanes::<S>();
        let records = channel_records(&lane_order::<E, S>(simd)[..l]);
        let npos = tiling.positions();
        // `[npos][nr]` values per window of a run.
        let mut d = [E::zero(); RUN_WINDOWS * MAX_POS * 32];
        let cmask = match &args.mask {
            Some(InputMask::Channel(m)) => Some(m.as_slice()),
            _ => None,
        };
        // Lanes past the last column stay 0 from `d`'s initialisation:
        // the loops below write only lanes `0..lanes`.
        let lanes = nr.min(cols.len());
        let mut t = 0;
        while t < tiles.len() {
            let (img, ty, tx) = tiles[t];
            let ms = match &args.mask {
                Some(InputMask::Spatial(m)) => Some(&m.as_slice()[img * hw..][..hw]),
                _ => None,
            };
            let span = WindowSpan::new(tiling, h, w, ty, tx);
            // A run of whole windows of one tile row takes the 4-channel
            // vector gather (its loads shared by the run's windows).
            let run = window_run(tiles, t, h, w, tiling);
            let vector = span.channels4_fit(run, l, hw);
            let (run, by4) = if vector { (run, lanes / 4 * 4) } else { (1, 0) };
            if !span.is_full() {
                // Entries outside the plane read as zeros; the previous
                // tile may have written them.
                d[..npos * nr].fill(E::zero());
            }
            // Lane `j`'s plane (its channel) of image `img`.
            let plane = |img: usize, j: usize| &x[(img * c + cols[j]) * hw..][..hw];
            // The next run's window rows, into L1 for all the lanes' planes
            // (each lane reads its own plane, 6 rows a window: 192 streams
            // on AVX-512, which no hardware prefetcher follows). Neither
            // the vector gather nor this prefetch shortened the pass alone;
            // together, Intel Xeon AVX-512, 2 threads, dense P3, medians of
            // 9, five alternating rounds: 56.4-58.1 -> 54.2-56.7 ms.
            if let Some(&(ni, nty, ntx)) = tiles.get(t + run) {
                let next = WindowSpan::new(tiling, h, w, nty, ntx);
                let len = tiling.side() * tiling.run_windows() + 2;
                for j in 0..lanes {
                    next.prefetch_rows(plane(ni, j), len);
                }
            }
            for j in (0..by4).step_by(4) {
                let planes = std::array::from_fn(|f| plane(img, j + f));
                let d = &mut d[..];
                match (tiling, run) {
                    (Tiling::F4, 3) => {
                        span.gather_channels4::<E, S, 6, 3>(simd, &records, planes, ms, d, j)
                    }
                    (Tiling::F4, 2) => {
                        span.gather_channels4::<E, S, 6, 2>(simd, &records, planes, ms, d, j)
                    }
                    (Tiling::F4, _) => {
                        span.gather_channels4::<E, S, 6, 1>(simd, &records, planes, ms, d, j)
                    }
                    (Tiling::F6, 2) => {
                        span.gather_channels4::<E, S, 8, 2>(simd, &records, planes, ms, d, j)
                    }
                    (Tiling::F6, _) => {
                        span.gather_channels4::<E, S, 8, 1>(simd, &records, planes, ms, d, j)
                    }
                }
            }
            // The channel mask's factors, per lane (`x * m` as the
            // reference rounds it).
            let mut scale = [E::one(); 32];
            if let Some(cm) = cmask {
                for (j, s) in scale[..lanes].iter_mut().enumerate() {
                    *s = cm[img * c + cols[j]];
                }
            }
            for (i, d) in d.chunks_exact_mut(npos * nr).take(run).enumerate() {
                let span = WindowSpan::new(tiling, h, w, ty, tx + i);
                // Under a spatial mask, the window's factors are read once
                // for all the lanes (channels) the vector gather left.
                let factors = ms.filter(|_| by4 < lanes).map(|m| span.factors(m));
                for j in by4..lanes {
                    match &factors {
                        Some(f) => span.gather_scaled(plane(img, j), f, d, nr, j),
                        None => span.gather(plane(img, j), d, nr, j),
                    }
                }
                input_tiles::<E, S>(
                    simd,
                    tiling,
                    d,
                    nr,
                    cmask.map(|_| &scale[..]),
                    |pos, hv, v| E::store(simd, &mut out[(pos * tb + t + i) * nr + hv..], v),
                );
            }
            t += run;
        }
    }
}

/// How many windows from `tiles[t]` on [`XTransform`] gathers together:
/// the tiles that follow it in its tile row without a gap (at most
/// [`Tiling::run_windows`] in all) while their windows are whole. (Whether
/// the first window is whole, and the loads fit, is
/// [`WindowSpan::channels4_fit`]'s to say.)
fn window_run(tiles: &[Tile], t: usize, h: usize, w: usize, tiling: Tiling) -> usize {
    tile_run(tiles, t, tiling.run_windows(), |ty, tx| {
        WindowSpan::new(tiling, h, w, ty, tx).is_full()
    })
}

/// The length of the run of tiles from `tiles[t]` on (at most `max`): the
/// tiles that follow it in its tile row without a gap while `fits(ty, tx)`
/// (the first is the caller's to check).
fn tile_run(tiles: &[Tile], t: usize, max: usize, fits: impl Fn(usize, usize) -> bool) -> usize {
    let (img, ty, tx) = tiles[t];
    let mut run = 1;
    while run < max && tiles.get(t + run) == Some(&(img, ty, tx + run)) && fits(ty, tx + run) {
        run += 1;
    }
    run
}

/// Transformed output gradients of one block for output channel `co`.
struct DyTransform<'a, 'b, E: Elem> {
    dy: &'a [E],
    args: &'a ConvArgs<E>,
    tiling: Tiling,
    tiles: &'a [Tile],
    tb: usize,
    co: usize,
    out: &'b mut [E],
}

impl<E: Elem> WithSimd for DyTransform<'_, '_, E> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let DyTransform {
            dy,
            args,
            tiling,
            tiles,
            tb,
            co,
            out,
        } = self;
        let g = &args.geom;
        let (m, h, w) = (g.c_out, g.h, g.w);
        let hw = h * w;
        let nr = nr::<E, S>();
        let l = E::lanes::<S>();
        // `[side * side][nr]`: lane `j` is tile `j` of the group.
        let mut d = [E::zero(); 36 * 32];
        let t = tiling.side();
        let whole = |ty: usize, tx: usize| t * ty + t <= h && t * tx + t <= w;
        for (gi, gt) in tiles.chunks(nr).enumerate() {
            let mut j = 0;
            while j < gt.len() {
                let (img, ty, tx) = gt[j];
                let plane = &dy[(img * m + co) * hw..][..hw];
                if !whole(ty, tx) {
                    for i in 0..t * t {
                        d[i * nr + j] = E::zero();
                    }
                    for i in 0..t.min(h - t * ty) {
                        for jj in 0..t.min(w - t * tx) {
                            d[(i * t + jj) * nr + j] = plane[(t * ty + i) * w + t * tx + jj];
                        }
                    }
                    j += 1;
                    continue;
                }
                // A run of whole tiles side by side in one tile row: each
                // of their rows is one stretch of the plane, dealt out to
                // the columns' rows of `d`, tile q to lane j + q (a copy
                // the compiler vectorizes; the lanes stay in tile order,
                // which is the sums' k order). One value at a time, tile by
                // tile, this gather held 40% of the transform's samples, on
                // its stores. Intel Xeon family 6 model 167, AVX-512, 2
                // threads, `examples/conv_speed`, three alternating rounds:
                // dense P3 weight gradient 58.7-60.7 -> 54.6-57.7 ms, P4
                // 15.5-16.4 -> 15.2-15.9; under the loss's channel mask (two
                // rounds) P3 31.2-31.4 -> 28.8-29.1, spatial 25.9-27.5 ->
                // 25.1-25.6.
                let run = tile_run(gt, j, gt.len(), whole);
                for i in 0..t {
                    let src = &plane[(t * ty + i) * w + t * tx..][..t * run];
                    let rows = &mut d[i * t * nr..][..t * nr];
                    match tiling {
                        Tiling::F4 => deal_row::<E, 4>(src, rows, nr, j, run),
                        Tiling::F6 => deal_row::<E, 6>(src, rows, nr, j, run),
                    }
                }
                j += run;
            }
            // In a block's last, short group the lanes past its tiles keep
            // the previous group's values: the GEMMs run k = the block's
            // tiles and never read them.
            for hv in (0..nr).step_by(l) {
                let load = |i: usize| E::load(simd, &d[i * nr + hv..]);
                let (t4, t6);
                let tv: &[E::V<S>] = match tiling {
                    Tiling::F4 => {
                        t4 = grad_tile::<E, S>(simd, &std::array::from_fn(load));
                        &t4
                    }
                    Tiling::F6 => {
                        t6 = grad_tile6::<E, S>(simd, &std::array::from_fn(load));
                        &t6
                    }
                };
                for (pos, &v) in tv.iter().enumerate() {
                    E::store(simd, &mut out[pos * tb + gi * nr + hv..], v);
                }
            }
        }
    }
}

/// Deals one row of a run of `run` whole tiles of side `T` (`src`, `T *
/// run` values) out to the `T` rows of `d` (`T x nr`: the rows of the
/// tile row's `T` columns), tile `q` to lane `j + q`.
#[inline(always)]
fn deal_row<E: Copy, const T: usize>(src: &[E], d: &mut [E], nr: usize, j: usize, run: usize) {
    let mut rows = d.chunks_exact_mut(nr).map(|r| &mut r[j..j + run]);
    let mut rows: [&mut [E]; T] = std::array::from_fn(|_| rows.next().unwrap_or_default());
    for (q, s) in src.chunks_exact(T).enumerate() {
        for (r, &v) in rows.iter_mut().zip(s) {
            r[q] = v;
        }
    }
}

/// Panels `p0 .. p0 + per` of position `pos`: `C += A (rows x k) B (k x NR)`.
struct DwGemm<'a, 'b, E: Elem> {
    vt: &'a [E],
    wt: &'a [E],
    k: usize,
    tb: usize,
    /// The length of a column tile's B and of an output channel's A row.
    block: usize,
    /// The distance between two output channels' A rows.
    astride: usize,
    m: usize,
    ctiles: usize,
    pos: usize,
    p0: usize,
    first: bool,
    /// `[panel][ctile][MR][NR]`
    c: &'b mut [E],
}

impl<E: Elem> WithSimd for DwGemm<'_, '_, E> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let DwGemm {
            vt,
            wt,
            k,
            tb,
            block,
            astride,
            m,
            ctiles,
            pos,
            p0,
            first,
            c,
        } = self;
        let nr = nr::<E, S>();
        let tile_len = MR * nr;
        let np = c.len() / (ctiles * tile_len);
        // The panels with rows below m (the task's last ones may have none).
        let live = (0..np).take_while(|&pl| (p0 + pl) * MR < m).count();
        let at = |pl: usize, cti: usize| (pl * ctiles + cti) * tile_len;
        for cti in 0..ctiles {
            let b = &vt[(cti * block + pos * tb) * nr..][..k * nr];
            // Two panels per call where the ISA has the registers, as the
            // direct weight gradient: each k step's 12 broadcasts and 2
            // loads of B then serve 24 FMAs instead of 12 (Intel Xeon
            // family 6 model 167, AVX-512, 2 threads, dense, medians of 9,
            // seven alternating rounds, faster in six: P3 56.7-61.8 ->
            // 53.5-57.5 ms, P4 15.6-17.3 -> 14.9-15.8).
            for ps in panel_steps::<E, S>(live, |_| true) {
                // Rows past m repeat the last one (their results are dropped).
                let a: [&[E]; 2 * MR] = std::array::from_fn(|r| {
                    let co = ((p0 + ps.start) * MR + r).min(m - 1);
                    &wt[co * astride + pos * tb..][..k]
                });
                // (A hint: the tiles the next call reads, the next panels
                // of this column tile or the first of the next.)
                let (np0, ncti) = if ps.end < live {
                    (ps.end, cti)
                } else {
                    (0, cti + 1)
                };
                let next = [0, 1].map(|h| c.as_ptr().wrapping_add(at(np0 + h, ncti)));
                let tiles = [at(ps.start, cti), at(ps.start + 1, cti)];
                run_walked_step(
                    simd,
                    ps.len(),
                    a,
                    AWalk::run(0, 1, k),
                    b,
                    c,
                    tiles,
                    !first,
                    next,
                    // (Fetching the next column tile's B during the calls,
                    // as the forward's products do, timed within noise
                    // here: docs/engineering.md.)
                    Ahead::NONE,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;
    use crate::backend::cpu::counters::Tally;
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::testing::{first_near_then_same_bits, three_image_mask, values};
    use crate::backend::cpu::winograd::transform::POS;
    use crate::backend::cpu::winograd::transform6::POS6;
    use crate::backend::{Backend, ConvGeometry, ReferenceBackend};

    /// Images: the three of `three_image_mask`.
    const N: usize = 3;
    /// Input channels: 9, so that the 0/1 channel mask keeps 6 per image
    /// (one 4-channel vector gather and two channels value by value).
    const C: usize = 9;
    /// Output channels: 7 leaves the second row panel one row (rows past
    /// the end repeat the last one, and the panel loop stops at m).
    const M: usize = 7;
    /// Sides that are not multiples of 4 (partial tiles at the bottom and
    /// right). 37 x 45 has 10 x 12 tiles per image, 360 in all: more than
    /// one block of tiles in f32 (256) and in f64 (128), so the sums resume
    /// from the previous block's accumulators. 3 x 9 and 9 x 3 are less
    /// than a tile high or wide (their first tile is already partial).
    /// The input's 4-channel gather takes runs of 3 whole windows and a
    /// last one alone in 37 x 45's rows, runs of 3 and 2 in 13 x 25's.
    const PLANES: [(usize, usize); 6] = [(9, 13), (5, 47), (37, 45), (13, 25), (3, 9), (9, 3)];

    /// Blocks of tiles: at most 1 KiB of each A row (256 tiles in f32, 128
    /// in f64), a multiple of every NR the ISAs have (2 x lanes: scalar 2,
    /// AVX2 16 / 8, AVX-512 32 / 16), the buffers F(6x6)'s largest block.
    /// Any number of tiles is dealt evenly: as few blocks as the largest
    /// allows, whole registers, the last block not empty and no block a
    /// register longer than an even share needs. No result depends on it,
    /// so it is tested by value.
    #[test]
    fn blocks_deal_the_tiles_evenly_within_the_buffers() {
        fn check<E: Elem>(most: usize) {
            assert_eq!(max_tiles_per_block::<E>(), most);
            assert_eq!(block_buffer_len::<E>(), POS6 * most);
            for nr in [2, 4, 8, 16, 32] {
                for ntiles in (0..=3 * most + 2 * nr).chain([952, 1900, 7000]) {
                    let tb = tiles_per_block::<E>(nr, ntiles);
                    let what = format!("nr {nr}, {ntiles} tiles: {tb}");
                    assert!(tb.is_multiple_of(nr) && tb > 0 && tb <= most, "{what}");
                    let blocks = ntiles.div_ceil(tb);
                    assert_eq!(blocks, ntiles.div_ceil(most), "{what}");
                    if ntiles > 0 {
                        assert!((blocks - 1) * tb < ntiles, "{what}");
                        assert!(blocks * (tb - nr) < ntiles, "{what}");
                    } else {
                        assert_eq!(tb, nr, "{what}");
                    }
                }
            }
        }
        check::<f32>(256);
        check::<f64>(128);
        // By hand, f32: P3's 952 tiles in 4 blocks of 238, rounded up to
        // AVX2's and AVX-512's registers; one image's 126 at P4 in one
        // block; 360 in 2 of 180.
        assert_eq!(tiles_per_block::<f32>(16, 952), 240);
        assert_eq!(tiles_per_block::<f32>(32, 952), 256);
        assert_eq!(tiles_per_block::<f32>(16, 126), 128);
        assert_eq!(tiles_per_block::<f32>(16, 360), 192);
        assert_eq!(block_buffer_len::<f32>(), 16384);
    }

    /// The A rows one kernel call reads (two panels, 2 x MR rows from any
    /// row on) lie in as many different L1 sets (64 sets of 64-byte lines)
    /// and each starts on a line, in f32 and f64, for every block length
    /// the weight gradient lays out; a row holds its block with at most 4
    /// KiB and a line to spare, and the buffer's rows hold every block's. No result depends on the stride,
    /// so it is tested by value.
    #[test]
    fn a_rows_of_one_kernel_call_fall_in_different_l1_sets() {
        fn check<E: Elem>() {
            let longest = a_stride::<E>(block_buffer_len::<E>());
            for nr in [2, 8, 16, 32] {
                for positions in [POS, POS6] {
                    for tb in (nr..=max_tiles_per_block::<E>()).step_by(nr) {
                        let block = positions * tb;
                        let stride = a_stride::<E>(block);
                        let bytes = stride * std::mem::size_of::<E>();
                        assert!(stride >= block && stride <= longest, "{block}");
                        // At most 4 KiB and a line of padding.
                        let size = std::mem::size_of::<E>();
                        assert!(stride <= block + (4096 + 64) / size, "{block}");
                        assert_eq!(bytes % 64, 0);
                        for first in [0, 5, 63] {
                            let mut sets: Vec<usize> = (first..first + 2 * MR)
                                .map(|r| r * bytes / 64 % 64)
                                .collect();
                            sets.sort_unstable();
                            sets.dedup();
                            assert_eq!(sets.len(), 2 * MR, "{block}: {sets:?}");
                        }
                    }
                }
            }
        }
        check::<f32>();
        check::<f64>();
    }

    /// `window_run` on every tile of two images' grids with gaps (tiles a
    /// spatial mask left out) against its definition, for both tilings
    /// (tiles of side `t`): the longest run of at most 3 (F(4x4)) or 2
    /// (F(6x6)) tiles `(img, ty, tx + q)` in a row of the list whose
    /// windows after the first lie inside the plane (rows `t ty - 1 ..= t
    /// ty + t`, columns likewise); runs of each length were seen.
    #[test]
    fn window_runs_are_the_whole_windows_that_follow_in_the_row() {
        for (tiling, max) in [(Tiling::F4, 3), (Tiling::F6, 2)] {
            let t = tiling.side();
            let mut seen = [0; RUN_WINDOWS + 1];
            for (h, w) in [(9usize, 13usize), (13, 33), (21, 30), (10, 45), (20, 61)] {
                let (th, tw) = (h.div_ceil(t), w.div_ceil(t));
                let tiles: Vec<Tile> = (0..2)
                    .flat_map(|img| {
                        (0..th).flat_map(move |ty| (0..tw).map(move |tx| (img, ty, tx)))
                    })
                    .filter(|&(img, ty, tx)| (img + 2 * ty + 3 * tx) % 7 != 3)
                    .collect();
                let whole =
                    |ty: usize, tx: usize| ty >= 1 && t * ty + t < h && tx >= 1 && t * tx + t < w;
                for i in 0..tiles.len() {
                    let (img, ty, tx) = tiles[i];
                    let want = (1..max)
                        .take_while(|&q| {
                            tiles.get(i + q) == Some(&(img, ty, tx + q)) && whole(ty, tx + q)
                        })
                        .count()
                        + 1;
                    let got = window_run(&tiles, i, h, w, tiling);
                    assert_eq!(got, want, "{tiling:?} {h}x{w} tile {:?}", tiles[i]);
                    seen[got] += 1;
                }
            }
            assert!(seen[1..=max].iter().all(|&n| n > 0), "{tiling:?} {seen:?}");
            assert_eq!(
                seen[max + 1..].iter().sum::<usize>(),
                0,
                "{tiling:?} {seen:?}"
            );
        }
    }

    /// The reference backend's weight gradient (plain loops, in f64) of the
    /// same values.
    fn reference<E: Elem>(dy: &[E], x: &[E], args: &ConvArgs<E>) -> Vec<f64> {
        let g = &args.geom;
        let t = |shape: [usize; 4], v: &[E]| {
            Tensor::from_vec(&shape, v.to_vec()).unwrap().cast::<f64>()
        };
        let args64 = ConvArgs {
            geom: *g,
            mask: args.mask.as_ref().map(InputMask::cast),
            relu: false,
        };
        ReferenceBackend
            .conv2d_backward_weight(&t(g.output_shape(), dy), &t(g.input_shape(), x), &args64)
            .unwrap()
            .to_vec()
    }

    /// Every input mask (none; spatial, with all-zero windows and
    /// fractional values; channel, real-valued and 0/1 with an image whose
    /// channels are all masked): the reference's values, the work
    /// counters, and the same bits for 1, 2, 3, 10 and 17 threads on every
    /// instruction set this CPU has; f64 and f32; both tilings.
    #[test]
    fn every_mask_matches_the_reference_with_the_same_bits() {
        for tiling in [Tiling::F4, Tiling::F6] {
            for (h, w) in PLANES {
                // f64: the transforms' coefficients lose a few ulps per
                // term (norm-wise about 1e-15).
                every_case::<f64>(h, w, tiling, 1e-12);
                // f32: the same few ulps of 6e-8 each, grown by the
                // transforms' coefficients (F(6x6)'s up to 32 x 21/4 x
                // 32/45) and the long sums over tiles; a wrong tile, lane,
                // block or window is off by O(1).
                every_case::<f32>(h, w, tiling, 1e-5);
            }
        }
    }

    fn every_case<E: Elem>(h: usize, w: usize, tiling: Tiling, tol: f64) {
        let hw = h * w;
        let elems = |v: Vec<f64>| -> Vec<E> { v.into_iter().map(E::from_f64).collect() };
        let x = elems(values(N * C * hw, 1));
        let dy = elems(values(N * M * hw, 2));
        let sp = three_image_mask(h, w);
        let ch_real: Vec<f64> = values(N * C, 5).iter().map(|v| v + 1.5).collect();
        // Image 1 keeps no channel at all.
        let ch01: Vec<f64> = (0..N * C)
            .map(|i| f64::from(u8::from(i / C != 1 && i % 3 != 1)))
            .collect();
        let masks = [
            None,
            Some(InputMask::Spatial(
                Tensor::from_vec(&[N, h, w], elems(sp)).unwrap(),
            )),
            Some(InputMask::Channel(
                Tensor::from_vec(&[N, C], elems(ch_real)).unwrap(),
            )),
            Some(InputMask::Channel(
                Tensor::from_vec(&[N, C], elems(ch01.clone())).unwrap(),
            )),
        ];
        let geom = ConvGeometry::new(&[N, C, h, w], &[M, C, 3, 3], [1, 1], [1, 1]).unwrap();
        let (side, npos) = (tiling.side(), tiling.positions());
        let (th, tw) = (h.div_ceil(side), w.div_ceil(side));
        for (case, mask) in masks.into_iter().enumerate() {
            let args = ConvArgs {
                geom,
                mask,
                relu: false,
            };
            let spatial = matches!(args.mask, Some(InputMask::Spatial(_)));
            let sparse = case == 3;
            // Channels each image keeps (all but under the 0/1 mask).
            let kept: Vec<usize> = (0..N)
                .map(|img| {
                    if sparse {
                        (0..C).filter(|&ci| ch01[img * C + ci] != 0.0).count()
                    } else {
                        C
                    }
                })
                .collect();
            let mut first: Option<Vec<E>> = None;
            for arch in Isa::every_arch() {
                // 10 threads (F(4x4)) and 17 (F(6x6)) split each
                // position's panels over two GEMM tasks (at least 4 tasks
                // per thread over 36 or 64 positions), so each panel runs
                // alone; fewer threads run the two panels in one kernel
                // call where the ISA pairs them.
                for threads in [1, 2, 3, 10, 17] {
                    let tally = Tally::default();
                    let cx = Ctx {
                        arch,
                        tally: &tally,
                        pad_per_image_above: crate::backend::cpu::PAD_PER_IMAGE_ABOVE,
                    };
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let dw = pool.install(|| conv2d_backward_weight(&dy, &x, &args, tiling, cx));
                    let case = format!("{tiling:?} case {case}");
                    assert_eq!(dw.len(), M * C * 9, "{h}x{w} {case}: output size");
                    let t = tally.snapshot();
                    // Images with no kept channel add nothing and are not visited.
                    let visited = kept.iter().filter(|&&k| k > 0).count();
                    assert_eq!(
                        t.tiles + t.tiles_skipped,
                        (visited * th * tw) as u64,
                        "{h}x{w} {case}: tiles"
                    );
                    assert_eq!(
                        t.tiles_skipped > 0,
                        spatial,
                        "{h}x{w} {case}: tiles skipped"
                    );
                    assert_eq!(t.spatial_skip_calls, u64::from(spatial), "{h}x{w} {case}");
                    assert_eq!(t.channel_sparse_calls, u64::from(sparse), "{h}x{w} {case}");
                    let skipped: usize = kept.iter().map(|&k| C - k).sum();
                    assert_eq!(t.channels_skipped, skipped as u64, "{h}x{w} {case}");
                    if !spatial {
                        let macs: usize = kept.iter().map(|&k| npos * M * k * th * tw).sum();
                        assert_eq!(t.macs, macs as u64, "{h}x{w} {case}: multiply-adds");
                    }
                    first_near_then_same_bits(
                        &mut first,
                        dw,
                        || reference(&dy, &x, &args),
                        tol,
                        &format!("{h}x{w} {case} ({arch:?}, {threads} threads)"),
                    );
                }
            }
        }
    }
}
