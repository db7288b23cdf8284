//! The Winograd convolution engine: forward pass and (with flipped,
//! transposed weights over the output gradient) the input gradient.

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use super::Scratch;
use super::transform::{
    POS, WindowSpan, input_tile, output_tile, tile_is_zero, weight_tile, weight_tile_v,
};
use crate::backend::cpu::Ctx;
use crate::backend::cpu::conv_fwd::{TASKS_PER_THREAD, act_of_bias, relu_of};
use crate::backend::cpu::kernel::{ColBlock, MR, nr, run_packed_tile, split_columns};
use crate::backend::cpu::simd::Elem;
use crate::pool;

/// Register groups (NR tiles each) per block. The block's transformed
/// input, `36 x K x G*NR`, and its products, `36 x M x G*NR`, are 1.2 MB
/// each at K = M = 256 in f32 for G = 2, so two threads' blocks and the
/// packed weights (9.4 MB) stay in L3 (32 MB); each GEMM reads its B tile
/// from L1 once per 6-row panel and the position's weights (256 KiB) from
/// L2. Measured at P3 (fwd, 2 threads): G = 1: 95 ms, 2: 81-84, 4: 90,
/// 8: 93 (P4/P5 within noise). In a slow phase of the host, when this
/// guest's share of L3 shrinks to about 10 MB and the weights stream from
/// memory, G = 4 was about 10% faster at P3 but the whole loss did not
/// move beyond its noise (`docs/engineering.md`, "Why the Winograd
/// forward slows down more than the FMA probe in slow phases").
const GROUPS: usize = 2;

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
    /// Where the work is counted.
    pub cx: Ctx<'a>,
}

/// Fewest tiles per task when there are enough tasks for the threads
/// anyway. Every task streams all the packed weights (9.4 MB at 256 x 256)
/// through its GEMMs once per block of tiles, so a small level split four
/// ways per thread spends its time on weights: at P5 (25 x 42, 77 tiles
/// per image, N = 2, 2 threads), `dmkd bench --only conv --conv-algo
/// winograd`, three rounds alternating the builds in one run (AMD EPYC
/// Zen 3, AVX2, f32): forward 19.5 / 21.8 / 17.0 ms in 8 tasks of 11-22
/// tiles, 17.3 / 18.3 / 13.4 ms in one task per image; input gradient
/// 19.2 / 24.6 / 18.1 against 17.1 / 18.9 / 13.5 ms; P6 forward 10.9 /
/// 17.9 / 11.0 against 8.3 / 9.2 / 7.5 ms. (The weight-gradient rows, which
/// do not use this split, moved by +-15% between rounds.) Two blocks of 32
/// tiles: P3 and P4 keep their split.
const MIN_TILES_PER_TASK: usize = 64;

/// Nonzero entries of row `img` of a `[n, c]` channel mask, or all.
fn kept<E: Elem>(mask: Option<&[E]>, img: usize, c: usize) -> Vec<usize> {
    match mask {
        Some(m) => (0..c).filter(|&i| m[img * c + i] != E::zero()).collect(),
        None => (0..c).collect(),
    }
}

/// All transformed weights, `[row][pos][col]` (`m x 36 x k`): `G g G^T`
/// of `g = w[row][col]` (forward) or of the flipped `w[col][row]`
/// (transposed). Lanes run over columns, so each row's 36 outputs are
/// contiguous vector stores (a scalar transform scattering straight into
/// the packed panels cost ~6 ms per call at 256 x 256, most of a P5 conv).
fn transform_weights<E: Elem>(arch: Arch, w: &[E], m: usize, k: usize, transposed: bool) -> Vec<E> {
    let mut out = pool::take::<E>(m * POS * k);
    out.par_chunks_mut((POS * k).max(1))
        .enumerate()
        .for_each(|(row, dst)| transform_row(arch, w, m, k, transposed, row, dst));
    out
}

/// Row `row` of the transformed weights (`[pos][col]`, `36 x k`) into `dst`.
fn transform_row<E: Elem>(
    arch: Arch,
    w: &[E],
    m: usize,
    k: usize,
    transposed: bool,
    row: usize,
    dst: &mut [E],
) {
    arch.dispatch(WeightRow {
        w,
        m,
        k,
        transposed,
        row,
        dst,
    })
}

struct WeightRow<'a, 'b, E> {
    w: &'a [E],
    m: usize,
    k: usize,
    transposed: bool,
    row: usize,
    dst: &'b mut [E],
}

impl<E: Elem> WithSimd for WeightRow<'_, '_, E> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let WeightRow {
            w,
            m,
            k,
            transposed,
            row,
            dst,
        } = self;
        let l = E::lanes::<S>();
        // The 9 taps of filter (row, col), flipped when transposed.
        let tap = |col: usize, t: usize| {
            if transposed {
                w[(col * m + row) * 9 + 8 - t]
            } else {
                w[(row * k + col) * 9 + t]
            }
        };
        let full = k / l * l;
        let mut g = [E::zero(); 9 * 16];
        for c0 in (0..full).step_by(l) {
            for t in 0..9 {
                for j in 0..l {
                    g[t * l + j] = tap(c0 + j, t);
                }
            }
            let gv: [E::V<S>; 9] = std::array::from_fn(|t| E::load(simd, &g[t * l..]));
            let u = weight_tile_v::<E, S>(simd, &gv);
            for (pos, &v) in u.iter().enumerate() {
                E::store(simd, &mut dst[pos * k + c0..], v);
            }
        }
        for col in full..k {
            let u = weight_tile::<E>(&std::array::from_fn(|t| tap(col, t)));
            for (pos, &v) in u.iter().enumerate() {
                dst[pos * k + col] = v;
            }
        }
    }
}

/// The transformed weights `u` (`[row][pos][col]`, `k` columns) for
/// output rows `rows` and input columns `cols`, packed
/// `[panel][pos][col][MR]` (rows past the end are zeros): the GEMM of
/// position `pos` reads panel `p` as one `[k][MR]` stream.
fn pack_weights<E: Elem>(u: &[E], k: usize, rows: &[usize], cols: &[usize]) -> Vec<E> {
    let kk = cols.len();
    let panels = rows.len().div_ceil(MR);
    let mut out = pool::take::<E>(panels * POS * kk * MR);
    out.par_chunks_mut((POS * kk * MR).max(1))
        .enumerate()
        .for_each(|(p, chunk)| {
            let src = std::array::from_fn(|r| rows.get(p * MR + r).copied());
            pack_panel(chunk, u, k, src, cols);
        });
    out
}

/// One panel of [`pack_weights`]' layout, `[pos][col][MR]`: lane `r` is row
/// `src[r]` of `u` (`[row][pos][col]`, `k` columns) at columns `cols`, or
/// zeros where `src[r]` is `None` (rows past the end).
fn pack_panel<E: Elem>(
    panel: &mut [E],
    u: &[E],
    k: usize,
    src: [Option<usize>; MR],
    cols: &[usize],
) {
    let kk = cols.len();
    for (pos, dst) in panel.chunks_exact_mut((kk * MR).max(1)).enumerate() {
        let urows = src.map(|row| row.map(|row| &u[(row * POS + pos) * k..][..k]));
        // Column-major so the writes run contiguously (the strided
        // row-by-row order cost about 1 ms more per 256 x 256 call).
        for (d, &col) in dst.chunks_exact_mut(MR).zip(cols) {
            for (v, urow) in d.iter_mut().zip(&urows) {
                *v = urow.map_or(E::zero(), |urow| urow[col]);
            }
        }
    }
}

/// Every row and column of the transformed weights, packed as
/// [`pack_weights`] packs them, without the full `m x 36 x k` intermediate:
/// each task transforms one panel's `MR` rows into a buffer that stays in
/// L2 (221 KB at k = 256, f32) and packs from there. The same arithmetic
/// per value as `transform_weights` then `pack_weights`, so the same bits;
/// it saves a 9.4 MB round trip through memory per call. Measured at
/// 256 x 256 (AMD EPYC Zen 3, 2 threads, f32): transform 1.1-1.6 ms plus
/// pack 2.0-2.3 ms before, the fixed cost of every Winograd forward and
/// input-gradient call (a 2 x 256 x 4 x 4 forward took 6.8 ms in all).
fn transform_packed<E: Elem>(
    arch: Arch,
    w: &[E],
    m: usize,
    cols: &[usize],
    transposed: bool,
) -> Vec<E> {
    let k = cols.len();
    let panels = m.div_ceil(MR);
    let mut out = pool::take::<E>(panels * POS * k * MR);
    out.par_chunks_mut((POS * k * MR).max(1))
        .enumerate()
        // One panel buffer per rayon job, reused across its panels (a fresh
        // zeroed one per panel cost ~10 MB of memset per call).
        .for_each_init(
            || vec![E::zero(); MR * POS * k],
            |rows, (p, chunk)| {
                let src = std::array::from_fn(|r| (p * MR + r < m).then_some(r));
                for (r, dst) in rows.chunks_exact_mut((POS * k).max(1)).enumerate() {
                    if src[r].is_some() {
                        transform_row(arch, w, m, k, transposed, p * MR + r, dst);
                    }
                }
                pack_panel(chunk, rows, k, src, cols);
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
        if sparse_k.is_none() && sparse_m.is_none() {
            let (rows, cols) = ((0..m).collect::<Vec<_>>(), (0..self.k).collect::<Vec<_>>());
            self.cx.tally.weights_packed(POS * rows.len() * cols.len());
            let u = transform_packed(self.cx.arch, self.weights, m, &cols, self.transposed);
            let imgs: Vec<(usize, &mut [E])> = y.chunks_mut(m * hw).enumerate().collect();
            self.run_images(imgs, &rows, &cols, &u);
            drop(pool::Buffer::new(u));
        } else {
            // Each image packs its own kept rows and columns from one
            // transform of every weight.
            let ut = transform_weights(self.cx.arch, self.weights, m, self.k, self.transposed);
            // Per image: only the kept channels enter the GEMMs.
            self.cx.tally.channel_sparse_call();
            for (img, yimg) in y.chunks_mut(m * hw).enumerate() {
                let rows = kept(sparse_m, img, m);
                let cols = kept(sparse_k, img, self.k);
                self.cx
                    .tally
                    .channels_skipped(m - rows.len() + self.k - cols.len());
                self.cx.tally.weights_packed(POS * rows.len() * cols.len());
                let u = pack_weights(&ut, self.k, &rows, &cols);
                self.run_images(vec![(img, yimg)], &rows, &cols, &u);
                drop(pool::Buffer::new(u));
            }
            drop(pool::Buffer::new(ut));
        }
        y
    }

    fn run_images(&self, imgs: Vec<(usize, &mut [E])>, rows: &[usize], cols: &[usize], u: &[E]) {
        let arch = self.cx.arch;
        let (h, w, m) = (self.h, self.w, self.m);
        let th = h.div_ceil(4);
        // Tasks: runs of tile rows, about TASKS_PER_THREAD per thread, but
        // at least MIN_TILES_PER_TASK tiles each where the threads stay
        // busy without it (the split never changes a bit: each output is
        // computed by one tile whatever task holds it).
        let threads = rayon::current_num_threads();
        let images = imgs.len().max(1);
        let tiles = th * w.div_ceil(4);
        let want = (TASKS_PER_THREAD * threads)
            .div_ceil(images)
            .min(tiles / MIN_TILES_PER_TASK)
            .max(threads.div_ceil(images));
        let per = th.div_ceil(want.clamp(1, th));
        let bounds: Vec<usize> = (0..=th.div_ceil(per))
            .map(|i| (i * per * 4 * w).min(h * w))
            .collect();
        let mut tasks = Vec::new();
        for (img, yimg) in imgs {
            for (i, blk) in split_columns(yimg, m, h * w, &bounds)
                .into_iter()
                .enumerate()
            {
                tasks.push((img, i * per, ((i + 1) * per).min(th), blk));
            }
        }
        tasks.into_par_iter().for_each(|(img, ty0, ty1, block)| {
            arch.dispatch(WinoTask {
                conv: self,
                rows,
                cols,
                u,
                img,
                ty0,
                ty1,
                block,
            })
        });
    }
}

struct WinoTask<'a, 'b, E: Elem> {
    conv: &'a WinoConv<'a, E>,
    rows: &'a [usize],
    cols: &'a [usize],
    u: &'a [E],
    img: usize,
    ty0: usize,
    ty1: usize,
    block: ColBlock<'b, E>,
}

impl<E: Elem> WithSimd for WinoTask<'_, '_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let WinoTask {
            conv,
            rows,
            cols,
            u,
            img,
            ty0,
            ty1,
            mut block,
        } = self;
        let (h, w, m) = (conv.h, conv.w, conv.m);
        let hw = h * w;
        let tw = w.div_ceil(4);
        let p0 = ty0 * 4 * w;
        let nr = nr::<E, S>();
        let l = E::lanes::<S>();
        let kk = cols.len();
        let panels = rows.len().div_ceil(MR);
        let tile_len = MR * nr;
        // The tiles to compute: under a spatial mask with zeros, a tile
        // that reads only zeros (forward) or whose outputs are all masked
        // (input gradient) is left out and filled below.
        let in_mask = match conv.input {
            InMul::Spatial(ms) => Some(&ms[img * hw..][..hw]),
            _ => None,
        };
        let out_mask = match conv.epi {
            Epi::Spatial(ms) => Some(&ms[img * hw..][..hw]),
            _ => None,
        };
        let mut tiles = Vec::with_capacity((ty1 - ty0) * tw);
        for ty in ty0..ty1 {
            for tx in 0..tw {
                let skip = in_mask
                    .is_some_and(|ms| WindowSpan::new(h, w, ty, tx).reads_only_zeros(ms))
                    || out_mask.is_some_and(|ms| tile_is_zero(ms, h, w, ty, tx));
                if !skip {
                    tiles.push((ty, tx));
                }
            }
        }
        let skipped = (ty1 - ty0) * tw - tiles.len();
        if kk == 0 {
            tiles.clear();
        }
        conv.cx.tally.tiles(tiles.len(), skipped);
        conv.cx.tally.macs(POS * rows.len() * kk * tiles.len());
        // Outputs no computed tile writes: what the dense sum of zeros
        // would give (act(b) forward; 0 for a gradient, masked or not).
        if tiles.len() < (ty1 - ty0) * tw || rows.len() < m {
            for co in 0..m {
                let v = match conv.epi {
                    Epi::Bias { bias, relu } => act_of_bias(bias, co, relu),
                    _ => E::zero(),
                };
                block.row_mut(co).fill(v);
            }
        }
        if tiles.is_empty() {
            return;
        }
        let tb = GROUPS * nr;
        let mut vbuf = Scratch::<E>::new(POS * GROUPS * kk * nr);
        let mut mbuf = Scratch::<E>::new(POS * GROUPS * panels * tile_len);
        let v = vbuf.as_mut_slice();
        let mb = mbuf.as_mut_slice();
        let src = &conv.src[img * conv.k * hw..][..conv.k * hw];
        let zero = E::splat(simd, E::zero());
        let mut d = [E::zero(); POS * 32];
        for btiles in tiles.chunks(tb) {
            let groups = btiles.len().div_ceil(nr);
            // Input transform: lanes are tiles, one channel at a time.
            for (g, gt) in btiles.chunks(nr).enumerate() {
                // Each tile's window span, computed once for all channels.
                let mut spans = [WindowSpan::new(h, w, 0, 0); 32];
                for (s, &(ty, tx)) in spans.iter_mut().zip(gt) {
                    *s = WindowSpan::new(h, w, ty, tx);
                }
                let spans = &spans[..gt.len()];
                // Entries no gather writes (outside the plane, lanes past
                // the group's tiles) are zero for every channel: clear
                // them once per group.
                if gt.len() < nr || spans.iter().any(|s| !s.is_full()) {
                    d[..POS * nr].fill(E::zero());
                }
                for (c, &ci) in cols.iter().enumerate() {
                    let plane = &src[ci * hw..][..hw];
                    for (j, span) in spans.iter().enumerate() {
                        span.gather(plane, in_mask, &mut d, nr, j);
                    }
                    // The channel mask's factor, `x * m` as the reference
                    // rounds it (the spatial one is applied in the gather).
                    let scale = match conv.input {
                        InMul::Channel(ms) => Some(E::splat(simd, ms[img * conv.k + ci])),
                        _ => None,
                    };
                    for hv in (0..nr).step_by(l) {
                        let mut dv = [zero; POS];
                        for (i, r) in dv.iter_mut().enumerate() {
                            *r = E::load(simd, &d[i * nr + hv..]);
                            if let Some(sc) = scale {
                                *r = E::vmul(simd, *r, sc);
                            }
                        }
                        let t = input_tile::<E, S>(simd, &dv);
                        for (pos, &tv) in t.iter().enumerate() {
                            let at = ((pos * GROUPS + g) * kk + c) * nr + hv;
                            E::store(simd, &mut v[at..], tv);
                        }
                    }
                }
            }
            // 36 GEMMs: products[pos] = U[pos] (rows x kk) * V[pos] (kk x tiles).
            for pos in 0..POS {
                for g in 0..groups {
                    let b = &v[(pos * GROUPS + g) * kk * nr..][..kk * nr];
                    for p in 0..panels {
                        let a = &u[(p * POS + pos) * kk * MR..][..kk * MR];
                        let at = ((pos * GROUPS + g) * panels + p) * tile_len;
                        let next = mb.as_ptr().wrapping_add(at + tile_len);
                        run_packed_tile(simd, a, kk, b, &mut mb[at..at + tile_len], false, next);
                    }
                }
            }
            // Output transform and epilogue, lanes are tiles again.
            let mut out = [E::zero(); 16 * 32];
            for (g, gt) in btiles.chunks(nr).enumerate() {
                // Output offsets (in the task's block) when every tile of
                // the group is whole: a tight copy.
                let whole = gt
                    .iter()
                    .all(|&(ty, tx)| 4 * ty + 4 <= h && 4 * tx + 4 <= w);
                let mut bases = [0usize; 32];
                for (b, &(ty, tx)) in bases.iter_mut().zip(gt) {
                    *b = 4 * ty * w + 4 * tx - p0;
                }
                for (ri, &co) in rows.iter().enumerate() {
                    let (p, r) = (ri / MR, ri % MR);
                    // Bias and row scale act on whole registers (the same
                    // roundings as per element); ReLU and the spatial mask
                    // per element below.
                    let (add, mulv) = match conv.epi {
                        Epi::Bias { bias, .. } => (bias.map(|b| E::splat(simd, b[co])), None),
                        Epi::Rows(sc) => (None, Some(E::splat(simd, sc[img * m + co]))),
                        Epi::Spatial(_) => (None, None),
                    };
                    for hv in (0..nr).step_by(l) {
                        let mut mv = [zero; POS];
                        for (pos, x) in mv.iter_mut().enumerate() {
                            let at = ((pos * GROUPS + g) * panels + p) * tile_len + r * nr + hv;
                            *x = E::load(simd, &mb[at..]);
                        }
                        let y = output_tile::<E, S>(simd, &mv);
                        for (i, &yv) in y.iter().enumerate() {
                            let yv = match (add, mulv) {
                                (Some(b), _) => E::vadd(simd, yv, b),
                                (_, Some(sc)) => E::vmul(simd, yv, sc),
                                _ => yv,
                            };
                            E::store(simd, &mut out[i * nr + hv..], yv);
                        }
                    }
                    let relu = matches!(conv.epi, Epi::Bias { relu: true, .. });
                    if relu {
                        for o in out[..16 * nr].iter_mut() {
                            *o = relu_of(*o);
                        }
                    }
                    let row = block.row_mut(co);
                    if whole && out_mask.is_none() {
                        for (j, &b0) in bases[..gt.len()].iter().enumerate() {
                            let dst = &mut row[b0..b0 + 3 * w + 4];
                            for i in 0..4 {
                                for jj in 0..4 {
                                    dst[i * w + jj] = out[(i * 4 + jj) * nr + j];
                                }
                            }
                        }
                        continue;
                    }
                    for (j, &(ty, tx)) in gt.iter().enumerate() {
                        for i in 0..4.min(h - 4 * ty) {
                            let yy = 4 * ty + i;
                            for jj in 0..4.min(w - 4 * tx) {
                                let x = 4 * tx + jj;
                                let val = out[(i * 4 + jj) * nr + j];
                                row[yy * w + x - p0] = match out_mask {
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
}
