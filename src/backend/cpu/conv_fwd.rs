//! Convolution as an implicit GEMM over a padded input: the forward pass,
//! and (with flipped, transposed weights over the padded output gradient)
//! the input gradient.
//!
//! `Y[n][m][p] = sum_k A[m][k] * B_n[k][p]` with `k = (c, ky, kx)`,
//! `p = (oy, ox)` and `B_n[k][p] = Xpad[n][c][oy*sh + ky][ox*sw + kx]`.
//! Why implicit GEMM rather than im2col + GEMM or a direct loop: B is never
//! materialised (at P3 im2col would be 2304 x 33600, 310 MB), each B tile is
//! packed from the padded image right before use with one or two vector
//! copies per k row (stride 1), and then serves all M/6 row panels of A
//! from L1, so packing costs about 2% of the FMA time. The 6 x 16 kernel
//! runs the shape the GEMM experiment of `docs/engineering.md` measured at 80-90%
//! of peak; this conv measured 86-90% at P3/P4 (see examples/conv_speed.rs).
//!
//! Under a spatial mask with zeros only the positions the mask leaves live
//! are computed ([`Skip`]): a task's B tiles gather them side by side, so a
//! tile is never half empty because of the mask, and the tasks split each
//! image's live positions evenly.
//!
//! Loop nest of one task (an image and a range of output positions):
//! for each k-block (~256 k, the A block then fits L2): for each NR-position
//! tile: pack the B tile (L1), for each MR-row panel: kernel. C accumulates
//! in task-local MR x NR tiles stored in visiting order (each kernel's C is
//! contiguous and prefetched one kernel ahead); the epilogue moves finished
//! tiles into the output.
//!
//! Parallelism and determinism: tasks split the output positions only.
//! Each output is one fused chain over k in a fixed order whatever the
//! task, block or thread it lands in, so results are bit-identical for any
//! thread count.

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use super::Ctx;
use super::kernel::{
    AWalk, ColBlock, MR, nr, panel_steps, run_packed_step, run_tile, split_columns,
};
use super::pack::{
    Aligned, PackedA, PadSpec, even_blocks, image_batches, pack_b_tile, pad_images, pad_planes,
};
use super::simd::{Ahead, Elem};
use crate::backend::{ConvArgs, ConvGeometry, InputMask};
use crate::pool;

/// k elements per block: 1 KiB of each A row, so the A block (M = 256
/// rows) is 256 KiB and stays in the 512 KiB L2 while B tiles stream past.
/// (128 and 512 f32 measured 1-2% worse and even at P3/P4.)
pub(crate) fn kc_for<E>() -> usize {
    1024 / std::mem::size_of::<E>()
}

/// The padding of a forward pass (and of the weight gradient's input).
pub(crate) fn forward_pad(g: &ConvGeometry) -> PadSpec {
    let [ph, pw] = g.padding;
    PadSpec {
        top: ph as isize,
        left: pw as isize,
        hp: g.h + 2 * ph,
        wp: g.w + 2 * pw,
        dil: [1, 1],
    }
}

/// The channels of image `img` whose channel-mask value is not exactly 0.
pub(crate) fn kept_channels<E: Elem>(mask: &[E], img: usize, c: usize) -> Vec<usize> {
    (0..c)
        .filter(|&ci| mask[img * c + ci] != E::zero())
        .collect()
}

/// The channel mask's values when at least one is an exact zero (the
/// masked channels can then be left out of the work).
pub(crate) fn sparse_channels<E: Elem>(mask: Option<&InputMask<E>>) -> Option<&[E]> {
    match mask {
        Some(InputMask::Channel(m)) if m.as_slice().contains(&E::zero()) => Some(m.as_slice()),
        _ => None,
    }
}

/// `y = act(conv(x * mask, w) + b)`, `[N, Cout, OH, OW]`.
pub(crate) fn conv2d<E: Elem>(
    x: &[E],
    w: &[E],
    b: Option<&[E]>,
    args: &ConvArgs<E>,
    cx: Ctx<'_>,
) -> Vec<E> {
    let g = &args.geom;
    if let Some(ms) = sparse_channels(args.mask.as_ref()) {
        cx.tally.channel_sparse_call();
        return conv2d_channel_sparse(x, w, b, args, ms, cx);
    }
    let mut y = pool::take::<E>(g.n * g.c_out * g.oh * g.ow);
    let epilogue = Epilogue::Bias {
        bias: b,
        relu: args.relu,
    };
    conv2d_into(x, w, args, epilogue, &mut y, cx);
    y
}

/// `base + conv2d(x, w, b)` written over `base` (of the output's shape),
/// each output `base + y` as the element-wise add rounds it; the dense
/// path only (the caller checks that no channel mask has zeros).
pub(crate) fn conv2d_add<E: Elem>(
    base: &mut [E],
    x: &[E],
    w: &[E],
    b: Option<&[E]>,
    args: &ConvArgs<E>,
    cx: Ctx<'_>,
) {
    debug_assert!(sparse_channels(args.mask.as_ref()).is_none());
    let epilogue = Epilogue::AddTo {
        bias: b,
        relu: args.relu,
    };
    conv2d_into(x, w, args, epilogue, base, cx);
}

/// The dense forward pass (a spatial mask's zeros skipped), each output
/// through `epilogue` into `y`.
fn conv2d_into<E: Elem>(
    x: &[E],
    w: &[E],
    args: &ConvArgs<E>,
    epilogue: Epilogue<'_, E>,
    y: &mut [E],
    cx: Ctx<'_>,
) {
    let g = &args.geom;
    let spec = forward_pad(g);
    // One image at a time where the padded batch is big (as the
    // gradients do): the copy is then one image's, which the pool can
    // hand from the first image to the next.
    let batches = image_batches::<E>(g.input_shape(), spec, args.mask.is_some(), cx);
    // A spatial mask with zeros, padded like the input (one channel).
    let mpad = match &args.mask {
        Some(InputMask::Spatial(m)) if m.as_slice().contains(&E::zero()) => Some(pad_planes(
            m.as_slice(),
            [g.n, 1, g.h, g.w],
            spec,
            None,
            &(0..g.n).collect::<Vec<_>>(),
        )),
        _ => None,
    };
    if mpad.is_some() {
        cx.tally.spatial_skip_call();
    }
    let k = g.c_in * g.kh * g.kw;
    let a = if pack_weights(g.n * g.oh * g.ow) {
        ASource::packed(g.c_out, k, |m, kk| w[m * k + kk], cx)
    } else {
        ASource::Rows {
            data: w,
            m: g.c_out,
            k,
            kblocks: even_blocks(k, kc_for::<E>()),
        }
    };
    let (plane, y_img) = (spec.hp * spec.wp, g.c_out * g.oh * g.ow);
    for imgs in batches {
        let src = pad_images(x, g.input_shape(), spec, args.mask.as_ref(), imgs.clone());
        ImplicitConv {
            src: src.as_slice(),
            n: imgs.len(),
            c: g.c_in,
            hp: spec.hp,
            wp: spec.wp,
            kh: g.kh,
            kw: g.kw,
            stride: g.stride,
            oh: g.oh,
            ow: g.ow,
            a: &a,
            m: g.c_out,
            epilogue,
            skip: mpad.as_deref().map_or(Skip::None, |m| {
                Skip::Receptive(&m[imgs.start * plane..imgs.end * plane])
            }),
            cx,
        }
        .run_into(&mut y[imgs.start * y_img..imgs.end * y_img]);
    }
    if let Some(m) = mpad {
        drop(pool::Buffer::new(m));
    }
}

/// The forward pass under a channel mask with exact zeros: per image, the
/// masked input channels are left out of K (docs/spec.md: at lambda_c = 0.65 the
/// channel branch's first conv needs 35% of the dense work). The result is
/// the dense path's up to the sign of an exact zero: the dense chain adds
/// `w * 0` terms, which leave a fused sum unchanged.
fn conv2d_channel_sparse<E: Elem>(
    x: &[E],
    w: &[E],
    b: Option<&[E]>,
    args: &ConvArgs<E>,
    ms: &[E],
    cx: Ctx<'_>,
) -> Vec<E> {
    let g = &args.geom;
    let spec = forward_pad(g);
    let taps = g.kh * g.kw;
    let k_full = g.c_in * taps;
    let p = g.oh * g.ow;
    let mut y = pool::take::<E>(g.n * g.c_out * p);
    for (img, yimg) in y.chunks_mut(g.c_out * p).enumerate() {
        let kept = kept_channels(ms, img, g.c_in);
        cx.tally.channels_skipped(g.c_in - kept.len());
        if kept.is_empty() {
            // Every product is zero: act(0 + b), as the reference computes it.
            for (co, row) in yimg.chunks_mut(p).enumerate() {
                row.fill(act_of_bias(b, co, args.relu));
            }
            continue;
        }
        let planes: Vec<usize> = kept.iter().map(|&ci| img * g.c_in + ci).collect();
        let src = pad_planes(x, g.input_shape(), spec, args.mask.as_ref(), &planes);
        let cols: Vec<usize> = kept
            .iter()
            .flat_map(|&ci| (0..taps).map(move |t| ci * taps + t))
            .collect();
        let a = ASource::packed(g.c_out, cols.len(), |m, j| w[m * k_full + cols[j]], cx);
        ImplicitConv {
            src: &src,
            n: 1,
            c: kept.len(),
            hp: spec.hp,
            wp: spec.wp,
            kh: g.kh,
            kw: g.kw,
            stride: g.stride,
            oh: g.oh,
            ow: g.ow,
            a: &a,
            m: g.c_out,
            epilogue: Epilogue::Bias {
                bias: b,
                relu: args.relu,
            },
            skip: Skip::None,
            cx,
        }
        .run_into(yimg);
        drop(pool::Buffer::new(src));
    }
    y
}

/// Pack the weights into panels, or read them in place? Packed panels are
/// one sequential stream per kernel call instead of six strided rows: at
/// P3/P4 that is 86% of peak against 78-80%. Packing costs a pass over the
/// weights, which the small levels cannot amortise (P7, 154 positions: 57%
/// packed, 69% in place); the two were even at P6 (546 positions).
pub(crate) fn pack_weights(positions: usize) -> bool {
    positions > PACK_WEIGHTS_ABOVE
}

/// The direct convolutions pack their weights (dense path) when they have
/// more output positions (N*OH*OW; the input gradient's: N*H*W) than this.
pub const PACK_WEIGHTS_ABOVE: usize = 600;

/// Parallel tasks per rayon thread (see `ImplicitConv::run`).
pub(crate) const TASKS_PER_THREAD: usize = 4;

/// Output positions per task at most.
const NC_MAX: usize = 2048;

/// What to do to each output once its sum is complete.
#[derive(Clone, Copy)]
pub(crate) enum Epilogue<'a, E: Elem> {
    /// `act(y + b[m])`, the forward pass.
    Bias { bias: Option<&'a [E]>, relu: bool },
    /// `out + act(y + b[m])` over the output's own values, the forward
    /// pass added to a base ([`conv2d_add`]).
    AddTo { bias: Option<&'a [E]>, relu: bool },
    /// `y * mask`, the input gradient (outputs are input positions).
    Mask(&'a InputMask<E>),
    /// `y * s[m]`, the input gradient of a channel-sparse conv (rows are
    /// the kept channels).
    RowScale(&'a [E]),
}

/// The weights of an [`ImplicitConv`]: `m x k`, row-major.
pub(crate) enum ASource<'a, E: Elem> {
    /// Packed into `[k][MR]` panels.
    Packed(PackedA<E>),
    /// Read in place, through one row pointer per output channel.
    Rows {
        data: &'a [E],
        m: usize,
        k: usize,
        kblocks: Vec<(usize, usize)>,
    },
}

impl<'a, E: Elem> ASource<'a, E> {
    /// `at(m, k)` (`m < rows`, `k < k_len`) packed into panels, k-blocks
    /// of [`kc_for`]; counted as `rows x k_len` packed weights.
    pub fn packed(
        rows: usize,
        k_len: usize,
        at: impl Fn(usize, usize) -> E + Sync,
        cx: Ctx<'_>,
    ) -> Self {
        cx.tally.weights_packed(rows * k_len);
        ASource::Packed(PackedA::new(rows, k_len, kc_for::<E>(), at))
    }

    fn kblocks(&self) -> &[(usize, usize)] {
        match self {
            ASource::Packed(a) => a.kblocks(),
            ASource::Rows { kblocks, .. } => kblocks,
        }
    }
    fn panels(&self) -> usize {
        match self {
            ASource::Packed(a) => a.panels(),
            ASource::Rows { m, .. } => m.div_ceil(MR),
        }
    }
    /// Row slices and walk of panel `p` in k-block `kb` of in-place
    /// weights (packed panels go through `run_packed_step`).
    #[inline(always)]
    fn rows(&self, kb: usize, p: usize) -> ([&[E]; MR], AWalk) {
        match self {
            ASource::Packed(_) => unreachable!("packed panels have their own kernel entry"),
            ASource::Rows {
                data,
                m,
                k,
                kblocks,
            } => {
                let (k0, klen) = kblocks[kb];
                (
                    // Rows past m repeat the last one (their results are dropped).
                    std::array::from_fn(|r| &data[(p * MR + r).min(m - 1) * k..][..*k]),
                    AWalk::run(k0, 1, klen),
                )
            }
        }
    }
}

/// An implicit-GEMM convolution over a padded input.
pub(crate) struct ImplicitConv<'a, E: Elem> {
    /// `n` padded images of `c x hp x wp`.
    pub src: &'a [E],
    pub n: usize,
    pub c: usize,
    pub hp: usize,
    pub wp: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub oh: usize,
    pub ow: usize,
    /// `m x (c * kh * kw)` weights.
    pub a: &'a ASource<'a, E>,
    /// Output channels.
    pub m: usize,
    pub epilogue: Epilogue<'a, E>,
    /// Output tiles known to be all zeros before the epilogue.
    pub skip: Skip<'a, E>,
    /// Where the work is counted.
    pub cx: Ctx<'a>,
}

/// Which output positions a spatial mask's exact zeros make zero before the
/// epilogue. Only the others (the live ones) are computed, packed side by
/// side into whole tiles, so the work follows the mask position by
/// position rather than tile by tile; the dead ones get +0. (The dense
/// path would add only exact zeros there, which leave a fused sum
/// unchanged but for a zero's sign, and a live position's chain does not
/// depend on the tile or lane it lands in.)
#[derive(Clone, Copy)]
pub(crate) enum Skip<'a, E> {
    None,
    /// Forward: a position whose whole receptive field is masked. The mask
    /// padded like the input, `n x hp x wp`, zeros in the padding.
    Receptive(&'a [E]),
    /// Input gradient: a position whose own mask value is 0 (`n x oh x ow`).
    Output(&'a [E]),
}

impl<E: Elem> ImplicitConv<'_, E> {
    /// `[n, m, oh, ow]`, row-major.
    pub fn run(&self) -> Vec<E> {
        let mut y = pool::take::<E>(self.n * self.m * self.oh * self.ow);
        self.run_into(&mut y);
        y
    }

    /// [`run`](Self::run) into `y` (`n * m * oh * ow` values, every one
    /// written).
    pub fn run_into(&self, y: &mut [E]) {
        let arch = self.cx.arch;
        let p = self.oh * self.ow;
        debug_assert_eq!(y.len(), self.n * self.m * p);
        let nr = nr_for::<E>(arch);
        // Tap offsets in the padded image, k = (c, ky, kx).
        let plane = self.hp * self.wp;
        let mut kbase = Vec::with_capacity(self.c * self.kh * self.kw);
        for ci in 0..self.c {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    kbase.push(ci * plane + ky * self.wp + kx);
                }
            }
        }
        // Position chunks ([`chunks_for`]); the split never changes a bit.
        let threads = rayon::current_num_threads();
        let bounds = |work: usize| -> Vec<usize> {
            let chunks = chunks_for(work, nr, self.n, threads);
            let chunk = work.div_ceil(chunks).div_ceil(nr) * nr;
            (0..=work.div_ceil(chunk))
                .map(|i| (i * chunk).min(work))
                .collect()
        };
        // Under a spatial mask with zeros, only the live positions are
        // computed, packed side by side into whole tiles; the chunks then
        // split each image's live positions evenly (a chunk of the image's
        // positions runs from its first live position to the next chunk's).
        let live = self.live_positions();
        let dense = bounds(p);
        let mut tasks = Vec::new();
        for (img, yimg) in y.chunks_mut(self.m * p).enumerate() {
            let Some(live) = &live else {
                for (ci, block) in split_columns(yimg, self.m, p, &dense)
                    .into_iter()
                    .enumerate()
                {
                    tasks.push((img, dense[ci], block, None));
                }
                continue;
            };
            let lv = live[img].as_slice();
            let computed = lv.len().div_ceil(nr);
            self.cx.tally.tiles(computed, p.div_ceil(nr) - computed);
            self.cx.tally.macs(self.m * kbase.len() * lv.len());
            // Chunks of the live list, and where each starts in the image.
            let idx = if lv.is_empty() {
                vec![0, 0]
            } else {
                bounds(lv.len())
            };
            let last = idx.len() - 1;
            let cuts: Vec<usize> = idx
                .iter()
                .enumerate()
                .map(|(i, &l)| match i {
                    0 => 0,
                    i if i == last => p,
                    _ => lv[l],
                })
                .collect();
            for (ci, block) in split_columns(yimg, self.m, p, &cuts)
                .into_iter()
                .enumerate()
            {
                tasks.push((img, cuts[ci], block, Some(&lv[idx[ci]..idx[ci + 1]])));
            }
        }
        tasks.into_par_iter().for_each(|(img, p0, block, live)| {
            arch.dispatch(FwdTask {
                conv: self,
                kbase: &kbase,
                img,
                p0,
                live,
                block,
            })
        });
    }

    /// Per image, the output positions that can be nonzero before the
    /// epilogue under `skip` (`None` without a mask): the others read only
    /// masked zeros (forward) or are masked themselves (input gradient).
    fn live_positions(&self) -> Option<Vec<Vec<usize>>> {
        let p = self.oh * self.ow;
        let [sh, sw] = self.stride;
        let plane = self.hp * self.wp;
        let live: Box<dyn Fn(usize, usize) -> bool + '_> = match self.skip {
            Skip::None => return None,
            Skip::Receptive(m) => Box::new(move |img, q| {
                let o = img * plane + (q / self.ow) * sh * self.wp + (q % self.ow) * sw;
                (0..self.kh).any(|ky| (0..self.kw).any(|kx| m[o + ky * self.wp + kx] != E::zero()))
            }),
            Skip::Output(m) => Box::new(move |img, q| m[img * p + q] != E::zero()),
        };
        Some(
            (0..self.n)
                .map(|img| (0..p).filter(|&q| live(img, q)).collect())
                .collect(),
        )
    }
}

/// How many chunks a task list cuts `work` positions of each of `n` images
/// into, for `threads` threads: at most [`NC_MAX`] positions each (rounded
/// up to whole NR tiles by the caller), about [`TASKS_PER_THREAD`] per
/// thread, so that a thread slowed by the rest of the machine leaves a
/// short tail (a task costs no extra packing: B tiles are per tile, the A
/// block is streamed per tile anyway), and, where there are enough tiles,
/// `n * chunks` a multiple of `threads`: equal tasks then end together.
/// (The channel-sparse passes run one image at a time: at P3, 16800
/// positions made 9 chunks, and 2 threads ran the ninth alone, 10% of the
/// pass. Rounding up to 10, AVX-512, 2 threads, three alternating rounds
/// under the loss's channel mask: forward 57-59 -> 51-55 ms, input
/// gradient 66-68 -> 57-61 ms.)
fn chunks_for(work: usize, nr: usize, n: usize, threads: usize) -> usize {
    let most = work.div_ceil(nr).max(1);
    let want = (TASKS_PER_THREAD * threads).div_ceil(n);
    let mut chunks = work.div_ceil(NC_MAX).max(want).min(most);
    while !(chunks * n).is_multiple_of(threads) && chunks < most {
        chunks += 1;
    }
    chunks
}

/// NR of an instruction set: output positions per micro-kernel tile.
pub(crate) fn nr_for<E: Elem>(arch: Arch) -> usize {
    arch.dispatch(NrProbe::<E>(std::marker::PhantomData))
}

struct NrProbe<E>(std::marker::PhantomData<E>);
impl<E: Elem> WithSimd for NrProbe<E> {
    type Output = usize;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> usize {
        nr::<E, S>()
    }
}

struct FwdTask<'a, 'b, E: Elem> {
    conv: &'a ImplicitConv<'a, E>,
    kbase: &'a [usize],
    img: usize,
    /// The task's first output position; `block` holds its columns.
    p0: usize,
    /// Under a spatial mask with zeros, the live positions of the task's
    /// columns (ascending; [`ImplicitConv::live_positions`]): only they are
    /// computed, the others get zeros before the epilogue.
    live: Option<&'a [usize]>,
    block: ColBlock<'b, E>,
}

impl<E: Elem> WithSimd for FwdTask<'_, '_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let FwdTask {
            conv,
            kbase,
            img,
            p0,
            live,
            mut block,
        } = self;
        let nr = nr::<E, S>();
        let cols = block.cols();
        let [sh, sw] = conv.stride;
        let offset = |p: usize| (p / conv.ow) * sh * conv.wp + (p % conv.ow) * sw;
        // The computed positions' offsets in the padded image, side by side.
        let offs: Vec<usize> = match live {
            Some(lv) => lv.iter().map(|&p| offset(p)).collect(),
            None => (p0..p0 + cols).map(offset).collect(),
        };
        let tiles = offs.len().div_ceil(nr);
        let img_len = conv.c * conv.hp * conv.wp;
        let src = &conv.src[conv.img_offset(img)..][..img_len];
        let kmax = conv.a.kblocks().iter().map(|b| b.1).max().unwrap_or(0);
        // One spare row: pack_b_tile may write past the tile's last row.
        let mut bt = Aligned::<E>::zeroed((kmax + 1) * nr);
        let panels = conv.a.panels();
        // C accumulates in a task-local buffer of whole MR x NR tiles,
        // `[tile][panel][MR][NR]`, in the order the kernels visit them: each
        // kernel's C tile is 6 contiguous lines (in the output itself the
        // 6 rows lie 67 KB apart at P3, 6 pages and TLB entries per call) and
        // the whole sweep is one sequential stream. The epilogue then writes
        // the finished tiles into the output, which it had to read and
        // write anyway for the bias and ReLU.
        let tile_len = MR * nr;
        let len = tiles * panels * tile_len;
        let mut cbuf = super::pack::Scratch::<E>::new(len);
        let cp = cbuf.as_mut_slice();
        let plane = conv.oh * conv.ow;
        if live.is_none() {
            let k_len: usize = kbase.len();
            conv.cx.tally.tiles(tiles, 0);
            conv.cx.tally.macs(conv.m * k_len * cols);
        }
        for (kb, &(k0, klen)) in conv.a.kblocks().iter().enumerate() {
            let bt = &mut bt.as_mut_slice()[..(klen + 1) * nr];
            for t in 0..tiles {
                let j0 = t * nr;
                let j1 = (j0 + nr).min(offs.len());
                let next = offs.get(j0 + nr).copied();
                pack_b_tile(
                    simd,
                    src,
                    &kbase[k0..k0 + klen],
                    &offs[j0..j1],
                    next,
                    nr,
                    bt,
                );
                // Two packed panels per call where the ISA has the registers.
                let packed = matches!(conv.a, ASource::Packed(_));
                for ps in panel_steps::<E, S>(panels, |_| packed) {
                    let (p, at) = (ps.start, (t * panels + ps.start) * tile_len);
                    let next = cp.as_ptr().wrapping_add(at + ps.len() * tile_len);
                    let c = &mut cp[at..at + ps.len() * tile_len];
                    match conv.a {
                        ASource::Packed(pa) => {
                            let a = [pa.panel(kb, p), pa.panel(kb, ps.end - 1)];
                            let next = [next, next.wrapping_add(tile_len)];
                            let (n, at) = (ps.len(), [0, tile_len]);
                            run_packed_step(simd, n, a, klen, bt, c, at, kb > 0, next, Ahead::NONE);
                        }
                        ASource::Rows { .. } => {
                            let (rows, walk) = conv.a.rows(kb, p);
                            let mut tile = ColBlock::whole(c, MR, nr);
                            run_tile(
                                simd,
                                rows,
                                walk,
                                bt,
                                &mut tile,
                                0,
                                0,
                                kb > 0,
                                next,
                                Ahead::NONE,
                            );
                        }
                    }
                }
            }
        }
        // Column `i` of C holds position `p0 + i` (dense), or live position
        // `i` (masked). The epilogue runs over segments of the task's
        // columns that are all computed and side by side in one C tile, or
        // all dead (zeros), cut at every NR columns of the output; output
        // row by output row, so each row's writes are one sequential run
        // of the task's columns (C is read at a fixed stride instead).
        // Tile by tile, each tile wrote a piece of every one of the M rows,
        // M pages apart in the output (67 KB at P3): the epilogue then took
        // 7-15% of the P3 forward (timed by leaving it out).
        let segs = match live {
            None => (0..cols)
                .step_by(nr)
                .map(|j| (j, nr.min(cols - j), Some(j)))
                .collect(),
            Some(lv) => live_segments(p0, cols, lv, nr),
        };
        let zeros = vec![E::zero(); nr];
        for m in 0..conv.m {
            let (p, r) = (m / MR, m % MR);
            let row = block.row_mut(m);
            for &(j, w, c) in &segs {
                let from = match c {
                    Some(c) => &cp[((c / nr) * panels + p) * tile_len + r * nr + c % nr..][..w],
                    None => &zeros[..w],
                };
                epilogue(
                    &conv.epilogue,
                    &mut row[j..j + w],
                    from,
                    conv.m,
                    m,
                    img,
                    p0 + j,
                    plane,
                );
            }
        }
    }
}

/// The epilogue's segments of a masked task's columns `0 .. cols`
/// (positions `p0 ..`) given its live positions `lv` (ascending, inside
/// the range, computed side by side in C): `(column, length, C column of
/// the first, or None for dead columns)`. A segment never crosses a
/// multiple of `nr` in the output's columns or in C's.
fn live_segments(
    p0: usize,
    cols: usize,
    lv: &[usize],
    nr: usize,
) -> Vec<(usize, usize, Option<usize>)> {
    let mut segs = Vec::new();
    let (mut j, mut li) = (0, 0);
    while j < cols {
        let end_max = cols.min((j / nr + 1) * nr);
        let is_live = |li: usize, j: usize| li < lv.len() && lv[li] == p0 + j;
        let mut end = j + 1;
        if is_live(li, j) {
            let (c0, c_max) = (li, (li / nr + 1) * nr);
            li += 1;
            while end < end_max && li < c_max && is_live(li, end) {
                end += 1;
                li += 1;
            }
            segs.push((j, end - j, Some(c0)));
        } else {
            while end < end_max && !is_live(li, end) {
                end += 1;
            }
            segs.push((j, end - j, None));
        }
        j = end;
    }
    segs
}

impl<E: Elem> ImplicitConv<'_, E> {
    fn img_offset(&self, img: usize) -> usize {
        img * self.c * self.hp * self.wp
    }
}

/// `to = f(from)` for the outputs of channel `m` at positions `pos..` of
/// image `img`: bias and ReLU, or the mask.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn epilogue<E: Elem>(
    epi: &Epilogue<'_, E>,
    to: &mut [E],
    from: &[E],
    channels: usize,
    m: usize,
    img: usize,
    pos: usize,
    plane: usize,
) {
    let n = to.len();
    let pairs = to.iter_mut().zip(from);
    match epi {
        Epilogue::Bias { bias, relu } => match (bias.map(|b| b[m]), relu) {
            (Some(b), true) => pairs.for_each(|(o, &v)| *o = relu_of(v + b)),
            (Some(b), false) => pairs.for_each(|(o, &v)| *o = v + b),
            (None, true) => pairs.for_each(|(o, &v)| *o = relu_of(v)),
            (None, false) => pairs.for_each(|(o, &v)| *o = v),
        },
        Epilogue::AddTo { bias, relu } => {
            let b = bias.map(|b| b[m]);
            // `act(v + b)` exactly as `Bias` rounds it, then the one add.
            pairs.for_each(|(o, &v)| {
                let z = b.map_or(v, |b| v + b);
                *o += if *relu { relu_of(z) } else { z };
            });
        }
        Epilogue::Mask(InputMask::Channel(mk)) => {
            let s = mk.as_slice()[img * channels + m];
            pairs.for_each(|(o, &v)| *o = v * s);
        }
        Epilogue::Mask(InputMask::Spatial(mk)) => {
            // A masked position is +0, not `v * 0` (-0 for a negative
            // sum): a tile whose positions are all masked is skipped and
            // zero-filled, and the tile width depends on the instruction
            // set, so `v * 0` would give the same position a different
            // zero's sign on AVX-512, AVX2 and scalar.
            let ms = &mk.as_slice()[img * plane + pos..][..n];
            pairs
                .zip(ms)
                .for_each(|((o, &v), &s)| *o = if s == E::zero() { E::zero() } else { v * s });
        }
        Epilogue::RowScale(s) => {
            let s = s[m];
            pairs.for_each(|(o, &v)| *o = v * s);
        }
    }
}

/// The reference's ReLU: `x > 0 ? x : 0` (NaN maps to 0).
#[inline(always)]
pub(crate) fn relu_of<E: Elem>(x: E) -> E {
    if x > E::zero() { x } else { E::zero() }
}

/// Output channel `co` of a forward conv where every product is zero (all
/// inputs masked or skipped): `act(0 + b)`, rounded as the reference does.
pub(crate) fn act_of_bias<E: Elem>(bias: Option<&[E]>, co: usize, relu: bool) -> E {
    let v = E::zero() + bias.map_or(E::zero(), |b| b[co]);
    if relu { relu_of(v) } else { v }
}

#[cfg(test)]
mod tests {
    use super::{NC_MAX, TASKS_PER_THREAD, act_of_bias, chunks_for, live_segments, relu_of};
    use crate::backend::cpu::testing::values;

    /// Task counts: the one-image P3 pass that left a thread idle now makes
    /// 10 chunks; in general at least the wanted tasks per thread (or one
    /// per tile, when there are fewer tiles), at most `NC_MAX` positions
    /// each, and a total over the images that the threads share evenly
    /// unless the tiles run out first.
    #[test]
    fn task_counts_fill_every_thread() {
        assert_eq!(chunks_for(16800, 32, 1, 2), 10);
        assert_eq!(chunks_for(16800, 32, 2, 2), 9);
        for threads in 1..=8 {
            for n in 1..=4 {
                for work in [0, 1, 31, 100, 1000, 4200, 16800, 67200] {
                    for nr in [1, 8, 32] {
                        let c = chunks_for(work, nr, n, threads);
                        let most = work.div_ceil(nr).max(1);
                        let want = (TASKS_PER_THREAD * threads).div_ceil(n);
                        let case = format!("work {work}, nr {nr}, n {n}, threads {threads}");
                        assert!(c >= want.min(most) && c <= most, "{case}: {c}");
                        assert!(work.div_ceil(c) <= NC_MAX, "{case}: {c}");
                        assert!((c * n).is_multiple_of(threads) || c == most, "{case}: {c}");
                        // The fewest chunks that do all that.
                        let fewer = c - 1;
                        assert!(
                            fewer < want.min(most)
                                || work.div_ceil(fewer.max(1)) > NC_MAX
                                || !(fewer * n).is_multiple_of(threads),
                            "{case}: {c}"
                        );
                    }
                }
            }
        }
    }

    /// The epilogue's segments against their definition: in order, they
    /// cover the task's columns once; a new segment starts exactly where a
    /// column is a multiple of `nr`, where live turns dead or back, or where
    /// a live column's C column is a multiple of `nr` (a new C tile); and a
    /// live segment names the C column of its first. Live sets from every
    /// other column to runs that start past the first tile, so C's tiles
    /// and the output's fall out of step (as after dead positions).
    #[test]
    fn live_segments_are_the_maximal_runs_within_both_tilings() {
        for (case, nr) in [1usize, 2, 4, 8, 16, 32].into_iter().enumerate() {
            for (pi, density) in [0.1, 0.5, 0.9, 1.0].into_iter().enumerate() {
                let (p0, cols) = (7 * pi + case, 3 * nr + 5);
                // Dead for the first `pi + 1` columns, then live with the
                // given density; the task's live list from that.
                let v = values(cols, (case * 10 + pi) as u64);
                let live: Vec<bool> = (0..cols)
                    .map(|j| j > pi && (v[j] + 1.0) / 2.0 < density)
                    .collect();
                let lv: Vec<usize> = (0..cols).filter(|&j| live[j]).map(|j| p0 + j).collect();
                let mut c_of = vec![None; cols];
                for (c, &p) in lv.iter().enumerate() {
                    c_of[p - p0] = Some(c);
                }
                let mut want: Vec<(usize, usize, Option<usize>)> = Vec::new();
                for j in 0..cols {
                    let starts = j == 0
                        || j % nr == 0
                        || live[j] != live[j - 1]
                        || c_of[j].is_some_and(|c| c % nr == 0);
                    match want.last_mut() {
                        Some(last) if !starts => last.1 += 1,
                        _ => want.push((j, 1, c_of[j])),
                    }
                }
                assert_eq!(
                    live_segments(p0, cols, &lv, nr),
                    want,
                    "nr {nr}, density {density}"
                );
            }
        }
    }
    use crate::backend::Unary;
    use crate::backend::reference::unary_fn;

    /// The kernels' ReLU and all-masked output give the reference's bits,
    /// the sign of a zero included: `relu(-0) = +0` (the reference's
    /// `x > 0 ? x : 0`), NaN maps to 0, and `act(0 + b)` adds the bias to
    /// +0 as the reference's sum does.
    #[test]
    fn relu_and_bias_only_outputs_match_the_reference_bit_for_bit() {
        let xs = [
            -0.0,
            0.0,
            -1.5,
            2.5,
            f64::NAN,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
        ];
        for x in xs {
            let want = unary_fn(Unary::Relu, x);
            assert_eq!(relu_of(x).to_bits(), want.to_bits(), "f64 relu({x})");
            let x = x as f32;
            let want = unary_fn(Unary::Relu, x);
            assert_eq!(relu_of(x).to_bits(), want.to_bits(), "f32 relu({x})");
        }
        assert_eq!(relu_of(-0.0f64).to_bits(), 0, "relu(-0) is +0");
        let bias = [-0.0f32, -2.0, 3.0];
        for relu in [false, true] {
            for co in 0..bias.len() {
                let sum = 0.0f32 + bias[co];
                let want = if relu {
                    unary_fn(Unary::Relu, sum)
                } else {
                    sum
                };
                let got = act_of_bias(Some(&bias), co, relu);
                assert_eq!(got.to_bits(), want.to_bits(), "co {co}, relu {relu}");
            }
            assert_eq!(act_of_bias::<f64>(None, 0, relu).to_bits(), 0);
        }
    }
}
