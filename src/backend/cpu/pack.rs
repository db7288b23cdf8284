//! Packing: rearranging operands into the layouts the microkernel streams.
//!
//! Three stages, each a plain copy (no arithmetic but the mask multiply):
//! - [`pad_input`]: an image into a zero-padded (and optionally dilated)
//!   buffer, multiplied by the input mask on the way: there is never a
//!   separate `x * mask` tensor. With padding in place, every input value a
//!   convolution tap reads is at `tap_base + position_offset`, with no
//!   bounds test in any later loop.
//! - [`PackedA`]: a row-major `M x K` operand (the weights) cut into
//!   k-blocks and MR-row panels, `[k][MR]` inside a panel.
//! - [`pack_b_tile`] / [`pack_dy_t`]: NR columns of B for one k-block,
//!   `[k][NR]`, right before the kernels that use them (the tile stays in L1
//!   while all M panels stream past it).

use pulp::Simd;
use rayon::prelude::*;

use std::ops::Range;

use super::Ctx;
use super::kernel::MR;
use super::simd::{Elem, Level, prefetch};
use crate::backend::InputMask;
use crate::pool;
use crate::tensor::Float;

/// Where an input image lands in its padded buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PadSpec {
    /// Padded row and column of input element (0, 0); negative crops.
    pub top: isize,
    pub left: isize,
    /// Padded plane size.
    pub hp: usize,
    pub wp: usize,
    /// Spacing of consecutive input rows / columns in the padded plane
    /// (1, or the stride when the input gradient of a strided conv is
    /// computed as a stride-1 conv of the zero-dilated output gradient).
    pub dil: [usize; 2],
}

impl PadSpec {
    /// True when the padded plane is the input itself.
    pub(crate) fn is_identity(&self, h: usize, w: usize) -> bool {
        self.top == 0 && self.left == 0 && self.hp == h && self.wp == w && self.dil == [1, 1]
    }
}

/// The padded copy of `x` (`[N, C, H, W]`), or `x` itself when the spec is
/// the identity and there is no mask.
pub(crate) enum Padded<'a, E: Float> {
    Borrowed(&'a [E]),
    Owned(Vec<E>),
}

impl<E: Float> Padded<'_, E> {
    pub fn as_slice(&self) -> &[E] {
        match self {
            Padded::Borrowed(s) => s,
            Padded::Owned(v) => v,
        }
    }
}

impl<E: Float> Drop for Padded<'_, E> {
    fn drop(&mut self) {
        if let Padded::Owned(v) = self {
            // Back to the pool: the next conv of this shape reuses it.
            drop(pool::Buffer::new(std::mem::take(v)));
        }
    }
}

/// Copy `x * mask` into zero-padded planes (see [`PadSpec`]); parallel over planes.
pub(crate) fn pad_input<'a, E: Float>(
    x: &'a [E],
    dims: [usize; 4],
    spec: PadSpec,
    mask: Option<&InputMask<E>>,
) -> Padded<'a, E> {
    let [n, c, h, w] = dims;
    if mask.is_none() && spec.is_identity(h, w) {
        return Padded::Borrowed(x);
    }
    let all: Vec<usize> = (0..n * c).collect();
    Padded::Owned(pad_planes(x, dims, spec, mask, &all))
}

/// The image ranges a direct conv pass pads and runs at a time: the whole
/// batch, or one image at a time where the padded copy of the batch
/// (`dims` padded by `spec`) would take at least `cx.pad_per_image_above`
/// bytes (see [`PAD_PER_IMAGE_ABOVE`]). No split where nothing is copied:
/// an unmasked identity placement borrows the operand itself.
///
/// [`PAD_PER_IMAGE_ABOVE`]: super::PAD_PER_IMAGE_ABOVE
pub(crate) fn image_batches<E>(
    dims: [usize; 4],
    spec: PadSpec,
    masked: bool,
    cx: Ctx<'_>,
) -> Vec<Range<usize>> {
    let [n, c, h, w] = dims;
    let copied = masked || !spec.is_identity(h, w);
    let bytes = n * c * spec.hp * spec.wp * std::mem::size_of::<E>();
    if copied && bytes >= cx.pad_per_image_above {
        (0..n).map(|i| i..i + 1).collect()
    } else {
        std::iter::once(0..n).collect()
    }
}

/// Images `imgs` of `x` (`dims`) times `mask`, padded by `spec`: the
/// planes of those images only, or [`pad_input`] for the whole batch.
pub(crate) fn pad_images<'a, E: Float>(
    x: &'a [E],
    dims: [usize; 4],
    spec: PadSpec,
    mask: Option<&InputMask<E>>,
    imgs: Range<usize>,
) -> Padded<'a, E> {
    let [n, c, _, _] = dims;
    if imgs == (0..n) {
        pad_input(x, dims, spec, mask)
    } else {
        let planes: Vec<usize> = (imgs.start * c..imgs.end * c).collect();
        Padded::Owned(pad_planes(x, dims, spec, mask, &planes))
    }
}

/// [`pad_input`] for a selection of planes: destination plane `i` is
/// source plane `planes[i]` (`n * C + c`), padded and masked.
pub(crate) fn pad_planes<E: Float>(
    x: &[E],
    dims: [usize; 4],
    spec: PadSpec,
    mask: Option<&InputMask<E>>,
    planes: &[usize],
) -> Vec<E> {
    let [_, c, h, w] = dims;
    let plane = spec.hp * spec.wp;
    let mut out = pool::take::<E>(planes.len() * plane);
    // The input lands as one solid block (no dilation, no cropping): only
    // the border around it needs zeros.
    let dense = spec.dil == [1, 1]
        && spec.top >= 0
        && spec.left >= 0
        && spec.top as usize + h <= spec.hp
        && spec.left as usize + w <= spec.wp;
    // Destination columns of input columns: the valid input column range
    // and, for dil = 1, one contiguous destination run.
    let col_of = |ix: usize| spec.left + (ix * spec.dil[1]) as isize;
    let ix_lo = (0..w).find(|&ix| col_of(ix) >= 0).unwrap_or(w);
    let ix_hi = (0..w)
        .rev()
        .find(|&ix| col_of(ix) < spec.wp as isize)
        .map_or(ix_lo, |i| (i + 1).max(ix_lo));
    out.par_chunks_mut(plane.max(1))
        .enumerate()
        .for_each(|(i, dst)| {
            let pi = planes[i];
            let (ni, ci) = (pi / c, pi % c);
            if dense {
                // Zero only the border; the copy below writes the rest
                // (halves the writes of this bandwidth-bound pass).
                let (top, left) = (spec.top as usize, spec.left as usize);
                dst[..top * spec.wp].fill(E::zero());
                dst[(top + h) * spec.wp..].fill(E::zero());
                for row in dst[top * spec.wp..(top + h) * spec.wp].chunks_exact_mut(spec.wp) {
                    row[..left].fill(E::zero());
                    row[left + w..].fill(E::zero());
                }
            } else {
                dst.fill(E::zero());
            }
            let src = &x[pi * h * w..][..h * w];
            let chan_scale = match mask {
                Some(InputMask::Channel(m)) => Some(m.as_slice()[ni * c + ci]),
                _ => None,
            };
            let spatial = match mask {
                Some(InputMask::Spatial(m)) => Some(&m.as_slice()[ni * h * w..][..h * w]),
                _ => None,
            };
            for iy in 0..h {
                let y = spec.top + (iy * spec.dil[0]) as isize;
                if y < 0 || y >= spec.hp as isize || ix_lo >= ix_hi {
                    continue;
                }
                let srow = &src[iy * w + ix_lo..iy * w + ix_hi];
                let drow = &mut dst[y as usize * spec.wp..][..spec.wp];
                let d0 = col_of(ix_lo) as usize;
                if spec.dil[1] == 1 {
                    let d = &mut drow[d0..d0 + srow.len()];
                    match (chan_scale, spatial) {
                        (Some(s), _) => d.iter_mut().zip(srow).for_each(|(o, &v)| *o = v * s),
                        (None, Some(m)) => {
                            let mrow = &m[iy * w + ix_lo..iy * w + ix_hi];
                            d.iter_mut()
                                .zip(srow.iter().zip(mrow))
                                .for_each(|(o, (&v, &mv))| *o = v * mv);
                        }
                        (None, None) => d.copy_from_slice(srow),
                    }
                } else {
                    for (j, &v) in srow.iter().enumerate() {
                        let ix = ix_lo + j;
                        let s = chan_scale
                            .or_else(|| spatial.map(|m| m[iy * w + ix]))
                            .unwrap_or(E::one());
                        let v = if mask.is_some() { v * s } else { v };
                        drow[d0 + j * spec.dil[1]] = v;
                    }
                }
            }
        });
    out
}

/// A row-major `M x K` operand in kernel order: for each k-block, for each
/// MR-row panel, `[k][MR]` (rows past M are zeros).
pub(crate) struct PackedA<E: Float> {
    data: Vec<E>,
    panels: usize,
    /// `(start, len)` of each k-block, in k order.
    kblocks: Vec<(usize, usize)>,
}

impl<E: Float> PackedA<E> {
    /// Pack `at(m, k)` for `m < rows`, `k < k_len`, cut into k-blocks of
    /// about `kc` (equal sizes, so no block is a sliver).
    pub fn new(
        rows: usize,
        k_len: usize,
        kc: usize,
        at: impl Fn(usize, usize) -> E + Sync,
    ) -> Self {
        let panels = rows.div_ceil(MR);
        let kblocks = even_blocks(k_len, kc);
        let mpad = panels * MR;
        let mut data = pool::take::<E>(mpad * k_len);
        // One chunk per (k-block, panel), in storage order.
        let mut chunks: Vec<(usize, usize, &mut [E])> = Vec::with_capacity(kblocks.len() * panels);
        let mut rest = data.as_mut_slice();
        for &(start, len) in &kblocks {
            for p in 0..panels {
                let (head, tail) = rest.split_at_mut(len * MR);
                chunks.push((start, p, head));
                rest = tail;
            }
        }
        chunks.into_par_iter().for_each(|(start, p, dst)| {
            for (kk, d) in dst.chunks_exact_mut(MR).enumerate() {
                for (r, v) in d.iter_mut().enumerate() {
                    let m = p * MR + r;
                    *v = if m < rows {
                        at(m, start + kk)
                    } else {
                        E::zero()
                    };
                }
            }
        });
        PackedA {
            data,
            panels,
            kblocks,
        }
    }

    pub fn panels(&self) -> usize {
        self.panels
    }

    pub fn kblocks(&self) -> &[(usize, usize)] {
        &self.kblocks
    }

    /// The `[k][MR]` panel `p` of k-block `kb`.
    pub fn panel(&self, kb: usize, p: usize) -> &[E] {
        let (start, len) = self.kblocks[kb];
        &self.data[start * self.panels * MR + p * len * MR..][..len * MR]
    }
}

impl<E: Float> Drop for PackedA<E> {
    fn drop(&mut self) {
        drop(pool::Buffer::new(std::mem::take(&mut self.data)));
    }
}

/// Cut `0..len` into `ceil(len / target)` blocks of equal size (+-1).
pub(crate) fn even_blocks(len: usize, target: usize) -> Vec<(usize, usize)> {
    let n = len.div_ceil(target.max(1)).max(1);
    let (q, r) = (len / n, len % n);
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for i in 0..n {
        let l = q + usize::from(i < r);
        out.push((start, l));
        start += l;
    }
    out
}

/// L1 prefetch distance of [`pack_b_tile`], in tile rows (8, 16, 32 and
/// none measured; 16 was best, +1% of peak on the forward pass).
const PF_ROWS: usize = 16;

/// One B tile of the implicit im2col matrix: `out[kk * NR + i] =
/// src[kbase[kk] + offs[i]]` for `i < offs.len()`, zeros for the rest of the
/// NR columns. `kbase` is a tap's offset (channel, ky, kx) and `offs` a
/// position's offset (oy, ox) in the padded image. `out` must hold one row
/// more than the tile (`(kbase.len() + 1) * NR`): the two-run copy below
/// overshoots into the next row, which is written after it.
///
/// `next`: the first offset of the tile packed after this one, whose
/// source lines are prefetched into L2 meanwhile (the source is the padded
/// image, too big for L2; without the hint the copy stalled on its loads
/// and cost 6% of the forward pass).
#[inline(always)]
pub(crate) fn pack_b_tile<E: Elem, S: Simd>(
    simd: S,
    src: &[E],
    kbase: &[usize],
    offs: &[usize],
    next: Option<usize>,
    nr: usize,
    out: &mut [E],
) -> TileCopy {
    let l = E::lanes::<S>();
    let rows = kbase.len();
    assert!(out.len() >= (rows + 1) * nr);
    let copy = |d: &mut [E], s: &[E]| {
        for v in 0..nr / l {
            E::store(simd, &mut d[v * l..], E::load(simd, &s[v * l..]));
        }
    };
    let hint = |kb: usize| {
        if let Some(nx) = next {
            let p = src.as_ptr().wrapping_add(kb + nx);
            prefetch(p, Level::L2);
            prefetch(p.wrapping_add(nr - 1), Level::L2);
        }
    };
    // The source rows were prefetched into L2 while the previous tile ran;
    // bring them into L1 a few rows ahead of the copy, which otherwise
    // waits on each L2 hit in turn.
    let near = |kk: usize, o: usize| {
        if let Some(&kb) = kbase.get(kk + PF_ROWS) {
            let p = src.as_ptr().wrapping_add(kb + o);
            prefetch(p, Level::L1);
            prefetch(p.wrapping_add(nr - 1), Level::L1);
        }
    };
    let Some((starts, runs)) = (offs.len() == nr).then(|| run_starts(offs)).flatten() else {
        gather(src, kbase, offs, nr, out);
        return TileCopy::Gather;
    };
    // Copy NR values from each run's start `s` over positions s.., in
    // order: each copy overshoots past its run into the next run's
    // positions or the next row, both rewritten after it. The reads run
    // past a run's end into the padded image; the largest tap must still
    // end inside it (a single run reads exactly its own values).
    let starts = &starts[..runs];
    let omax = starts.iter().map(|r| r.1).max().unwrap_or(0);
    let kmax = kbase.iter().copied().max().unwrap_or(0);
    if kmax + omax + nr > src.len() {
        gather(src, kbase, offs, nr, out);
        return TileCopy::Gather;
    }
    for (kk, &kb) in kbase.iter().enumerate() {
        hint(kb);
        for &(s, o) in starts {
            near(kk, o);
            copy(&mut out[kk * nr + s..], &src[kb + o..kb + o + nr]);
        }
    }
    TileCopy::Runs(runs)
}

/// The runs of consecutive offsets in `offs` (not empty) as (position,
/// offset) of each run's start, and how many there are: one when the
/// positions lie in one padded row (stride 1), more when they wrap to the
/// next output rows (a P7 row of 11 positions puts up to 4 runs in a
/// 32-wide tile); None past [`MAX_RUNS`].
fn run_starts(offs: &[usize]) -> Option<([(usize, usize); MAX_RUNS], usize)> {
    let mut starts = [(0, offs[0]); MAX_RUNS];
    let mut runs = 1;
    for i in 1..offs.len() {
        if offs[i] != offs[i - 1] + 1 {
            if runs == MAX_RUNS {
                return None;
            }
            starts[runs] = (i, offs[i]);
            runs += 1;
        }
    }
    Some((starts, runs))
}

/// How [`pack_b_tile`] copied a tile (the values are the same either way;
/// the tests check that the fast paths are taken where they apply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TileCopy {
    /// Whole registers from each of this many runs of consecutive offsets.
    Runs(usize),
    /// One value at a time.
    Gather,
}

/// Most runs of consecutive offsets [`pack_b_tile`] copies with whole
/// registers (each run costs NR / lanes vector copies; a strided conv,
/// whose every position is a run, goes to the value-by-value gather).
const MAX_RUNS: usize = 4;

/// The general tile copy, one value at a time (strides > 1, more than
/// [`MAX_RUNS`] runs, the last partial tile).
fn gather<E: Float>(src: &[E], kbase: &[usize], offs: &[usize], nr: usize, out: &mut [E]) {
    for (d, &kb) in out.chunks_exact_mut(nr).zip(kbase) {
        for (i, v) in d.iter_mut().enumerate() {
            *v = match offs.get(i) {
                Some(&o) => src[kb + o],
                None => E::zero(),
            };
        }
    }
}

/// Transposed output-gradient tiles for the weight gradient:
/// `out[t][kk][i] = dy[co = t * NR + i][pos(kk)]` for every NR-column tile
/// `t` of the `m` channels (zeros past `m`), where `pos` walks `nrows` rows
/// of `ncols` positions from `(oy0, ox0)` of an `oh x ow` plane. `dy` is one
/// image, `[m][oh * ow]`.
pub(crate) fn pack_dy_t<E: Float>(
    dy: &[E],
    m: usize,
    ow: usize,
    (oy0, nrows, ox0, ncols): (usize, usize, usize, usize),
    nr: usize,
    out: &mut [E],
) {
    let kc = nrows * ncols;
    let plane = dy.len() / m.max(1);
    for (t, tile) in out.chunks_exact_mut(kc * nr).enumerate() {
        // The tile's channels below m; the lanes past them are zeros.
        let channels = m.saturating_sub(t * nr).min(nr);
        if channels < nr {
            for row in tile.chunks_exact_mut(nr) {
                row[channels..].fill(E::zero());
            }
        }
        // Blocks of POS_BLOCK positions, all channels of each: the block's
        // destination rows stay in L1 while its columns are written. (One
        // channel at a time wrote a column down the whole `kc x NR` tile per
        // channel. P3 weight gradient, Intel Xeon AVX-512, 2 threads: this
        // function's share of `perf` samples 4.4% -> 2.7%; the pass's time
        // moved within the host's noise, 136.8-145.8 against 140.2-146.5 ms
        // in four alternating rounds.)
        let mut kk = 0;
        for oy in oy0..oy0 + nrows {
            let mut ox = ox0;
            while ox < ox0 + ncols {
                let w = POS_BLOCK.min(ox0 + ncols - ox);
                let dst = &mut tile[kk * nr..][..w * nr];
                for i in 0..channels {
                    let src = &dy[(t * nr + i) * plane + oy * ow + ox..][..w];
                    for (j, &v) in src.iter().enumerate() {
                        dst[j * nr + i] = v;
                    }
                }
                kk += w;
                ox += w;
            }
        }
    }
}

/// Positions per block of [`pack_dy_t`].
const POS_BLOCK: usize = 8;

/// A zeroed scratch buffer whose slice starts on a 64-byte boundary, so
/// that a packed B row of 16 f32 is one cache line and no vector load of
/// it straddles two.
pub(crate) struct Aligned<E> {
    buf: Vec<E>,
    off: usize,
    len: usize,
}

/// Elements to skip from the start of `v` to reach a 64-byte boundary.
pub(crate) fn align_offset<E>(v: &[E]) -> usize {
    let addr = v.as_ptr() as usize;
    (addr.next_multiple_of(64) - addr) / std::mem::size_of::<E>()
}

impl<E: Float> Aligned<E> {
    pub fn zeroed(len: usize) -> Self {
        let pad = 64 / std::mem::size_of::<E>();
        let buf = vec![E::zero(); len + pad];
        let off = align_offset(&buf);
        Aligned { buf, off, len }
    }

    pub fn as_mut_slice(&mut self) -> &mut [E] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// A scratch buffer from the pool whose slice starts on a 64-byte
/// boundary (packed B rows and C tile rows are whole cache lines), given
/// back to the pool when dropped. Its contents are unspecified: callers
/// write before they read. Why not `Aligned`: that
/// one allocates zeroed memory, and a fresh multi-MB block per task was
/// page-faulted and zeroed on every call (5% of the forward time).
pub(crate) struct Scratch<E: Float> {
    buf: Vec<E>,
    off: usize,
    len: usize,
}

impl<E: Float> Scratch<E> {
    pub fn new(len: usize) -> Self {
        let buf = pool::take::<E>(len + 64 / std::mem::size_of::<E>());
        let off = align_offset(&buf);
        Scratch { buf, off, len }
    }

    pub fn as_mut_slice(&mut self) -> &mut [E] {
        &mut self.buf[self.off..self.off + self.len]
    }

    pub fn as_slice(&self) -> &[E] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl<E: Float> Drop for Scratch<E> {
    fn drop(&mut self) {
        drop(pool::Buffer::new(std::mem::take(&mut self.buf)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;
    use crate::backend::cpu::testing::{assert_slices_same_bits, values};
    use pulp::WithSimd;

    /// `pad_planes` by its definition, one value at a time: padded plane
    /// `i` holds source plane `planes[i]` times its mask at row `top + iy *
    /// dil[0]`, column `left + ix * dil[1]` where that lies in the plane,
    /// and zero everywhere else.
    fn pad_by_definition<E: Float>(
        x: &[E],
        dims: [usize; 4],
        spec: PadSpec,
        mask: Option<&InputMask<E>>,
        planes: &[usize],
    ) -> Vec<E> {
        let [_, c, h, w] = dims;
        let plane = spec.hp * spec.wp;
        let mut out = vec![E::zero(); planes.len() * plane];
        for (i, &pi) in planes.iter().enumerate() {
            let (ni, ci) = (pi / c, pi % c);
            for iy in 0..h {
                for ix in 0..w {
                    let y = spec.top + (iy * spec.dil[0]) as isize;
                    let xx = spec.left + (ix * spec.dil[1]) as isize;
                    if y < 0 || xx < 0 || y >= spec.hp as isize || xx >= spec.wp as isize {
                        continue;
                    }
                    let v = x[(pi * h + iy) * w + ix];
                    let v = match mask {
                        None => v,
                        Some(InputMask::Channel(m)) => v * m.as_slice()[ni * c + ci],
                        Some(InputMask::Spatial(m)) => v * m.as_slice()[(ni * h + iy) * w + ix],
                    };
                    out[i * plane + y as usize * spec.wp + xx as usize] = v;
                }
            }
        }
        out
    }

    fn spec(top: isize, left: isize, hp: usize, wp: usize, dil: [usize; 2]) -> PadSpec {
        PadSpec {
            top,
            left,
            hp,
            wp,
            dil,
        }
    }

    /// Every kind of placement the convolutions ask for (a border, as the
    /// forward pads; crops on each side and dilation, as the input gradient
    /// of a strided or over-padded conv places the output gradient), with
    /// no mask, a channel mask and a spatial mask (both with zeros), for
    /// all planes and for a selection out of order: the definition's
    /// values bit for bit (a copy and at most one product per value).
    fn pads<E: Elem>() {
        let [h, w] = [5, 7];
        let specs = [
            spec(1, 2, h + 3, w + 3, [1, 1]),   // a border, wider on the left
            spec(0, 0, h, w, [1, 1]),           // the identity (copied when masked)
            spec(-1, -2, h, w - 1, [1, 1]),     // cropped at the top and left
            spec(0, 1, h - 1, w - 1, [1, 1]),   // cropped at the bottom and right
            spec(-2, 1, h - 2, w + 2, [1, 1]),  // cropped at the top only
            spec(1, -2, h + 2, w, [1, 1]),      // cropped at the left only
            spec(12, 1, h + 13, w + 3, [1, 1]), // a top border taller than a row is long
            spec(2, 2, 2 * h + 3, 2 * w + 3, [2, 2]), // dilated, in a border
            spec(-1, -3, 9, 10, [2, 3]),        // dilated and cropped
            spec(1, 0, h + 2, 2 * w, [1, 2]),   // columns 2 apart, rows 1
            spec(-7, 9, 3, 4, [1, 1]),          // nothing lands in the plane
        ];
        pads_of::<E>([2, 3, h, w], &specs);
        // One input row with a border below: the bottom border starts at
        // padded row `top + h` = 1 (its offset `(top + h) * wp` against
        // `+`), in a plane one column wider than the input.
        pads_of::<E>([2, 3, 1, 3], &[spec(0, 1, 3, 5, [1, 1])]);
    }

    fn pads_of<E: Elem>(dims: [usize; 4], specs: &[PadSpec]) {
        let [n, c, h, w] = dims;
        let to_e = |v: Vec<f64>| v.into_iter().map(E::from_f64).collect::<Vec<E>>();
        let x = to_e(values(n * c * h * w, 11));
        let zeros_every = |v: Vec<f64>, k: usize| {
            to_e(
                v.into_iter()
                    .enumerate()
                    .map(|(i, v)| if i % k == 1 { 0.0 } else { v })
                    .collect(),
            )
        };
        let channel = Tensor::from_vec(&[n, c], zeros_every(values(n * c, 12), 4)).unwrap();
        let spatial = Tensor::from_vec(&[n, h, w], zeros_every(values(n * h * w, 13), 5)).unwrap();
        let masks = [
            None,
            Some(InputMask::Channel(channel)),
            Some(InputMask::Spatial(spatial)),
        ];
        let all: Vec<usize> = (0..n * c).collect();
        for (si, &sp) in specs.iter().enumerate() {
            for mask in &masks {
                for planes in [&all[..], &[5, 0, 3]] {
                    let got = pad_planes(&x, dims, sp, mask.as_ref(), planes);
                    let want = pad_by_definition(&x, dims, sp, mask.as_ref(), planes);
                    let what = format!(
                        "dims {dims:?}, spec {si} {sp:?}, mask {}, planes {planes:?}",
                        mask.is_some()
                    );
                    assert_slices_same_bits(&got, &want, &what);
                }
                let got = pad_input(&x, dims, sp, mask.as_ref());
                let want = pad_by_definition(&x, dims, sp, mask.as_ref(), &all);
                let what = format!("pad_input, dims {dims:?}, spec {si}");
                assert_slices_same_bits(got.as_slice(), &want, &what);
            }
        }
    }

    #[test]
    fn padding_cropping_dilation_and_masks_match_the_definition() {
        pads::<f32>();
        pads::<f64>();
    }

    /// `pad_input` hands back the input itself only when nothing would
    /// change: the identity placement and no mask. Any one difference copies.
    #[test]
    fn only_an_unmasked_identity_borrows_the_input() {
        let dims = [1, 2, 3, 4];
        let x: Vec<f64> = values(24, 14);
        let id = spec(0, 0, 3, 4, [1, 1]);
        let p = pad_input(&x, dims, id, None);
        assert!(matches!(p, Padded::Borrowed(s) if s.as_ptr() == x.as_ptr()));
        let mask = InputMask::Channel(Tensor::from_vec(&[1, 2], vec![1.0, 1.0]).unwrap());
        assert!(matches!(
            pad_input(&x, dims, id, Some(&mask)),
            Padded::Owned(_)
        ));
        for other in [
            spec(1, 0, 3, 4, [1, 1]),
            spec(0, 1, 3, 4, [1, 1]),
            spec(0, 0, 4, 4, [1, 1]),
            spec(0, 0, 3, 5, [1, 1]),
            spec(0, 0, 3, 4, [2, 1]),
            spec(0, 0, 3, 4, [1, 2]),
        ] {
            assert!(
                matches!(pad_input(&x, dims, other, None), Padded::Owned(_)),
                "{other:?}"
            );
        }
    }

    /// `pack_dy_t` against its definition, `out[t][kk][i] = dy[t * NR +
    /// i][pos(kk)]` (zeros past `m`), for blocks of whole rows and blocks
    /// that start inside a row (the weight gradient cuts rows of at least
    /// `kc_dw` positions, wider than any conv test's plane).
    #[test]
    fn transposed_dy_tiles_match_the_definition() {
        let (m, oh, ow, nr) = (11, 5, 9, 8);
        let plane = oh * ow;
        let dy: Vec<f32> = values(m * plane, 15)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        for (oy0, nrows, ox0, ncols) in [(0, 5, 0, 9), (1, 2, 0, 9), (3, 1, 4, 5), (2, 1, 1, 3)] {
            let kc = nrows * ncols;
            let mut out = vec![f32::NAN; m.div_ceil(nr) * kc * nr];
            pack_dy_t(&dy, m, ow, (oy0, nrows, ox0, ncols), nr, &mut out);
            for (j, &got) in out.iter().enumerate() {
                let (t, kk, i) = (j / (kc * nr), j / nr % kc, j % nr);
                let co = t * nr + i;
                let pos = (oy0 + kk / ncols) * ow + ox0 + kk % ncols;
                let want = if co < m { dy[co * plane + pos] } else { 0.0 };
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "block ({oy0}, {nrows}, {ox0}, {ncols}): tile {t}, k {kk}, lane {i}"
                );
            }
        }
    }

    /// Packed weights go back to the pool when dropped (a length no other
    /// test asks for, above the pool's 1 MiB floor: 6 x 21855 f64).
    #[test]
    fn dropped_packed_weights_return_to_the_pool() {
        let len = MR * 21855;
        let packed = PackedA::<f64>::new(MR, 21855, 256, |r, k| (r * 7 + k) as f64);
        assert_eq!(packed.data.len(), len);
        assert!(!pool::holds::<f64>(len));
        drop(packed);
        assert!(pool::holds::<f64>(len), "the buffer did not return");
        drop(pool::take::<f64>(len));
    }

    /// A padded copy goes back to the pool when dropped, so the next conv
    /// of the shape reuses it. (A length no other test asks for, above
    /// the pool's 1 MiB floor: 364 x 364 f64.)
    #[test]
    fn a_dropped_padded_copy_returns_to_the_pool() {
        let x = vec![0.5f64; 362 * 362];
        let padded = pad_input(&x, [1, 1, 362, 362], spec(1, 1, 364, 364, [1, 1]), None);
        assert!(matches!(padded, Padded::Owned(_)));
        assert!(!pool::holds::<f64>(364 * 364));
        drop(padded);
        assert!(pool::holds::<f64>(364 * 364), "the copy did not return");
        drop(pool::take::<f64>(364 * 364));
    }

    /// One `pack_b_tile` call on the first NR offsets against the
    /// value-by-value gather, bit for bit (the spare row past the tile is
    /// scratch and not compared), and the copy it chose.
    struct PackCase<'a> {
        src: &'a [f32],
        kbase: &'a [usize],
        offs: &'a [usize],
        /// How much of the source there is: all of it (None), exactly what
        /// whole-register reads of the last run need (`Some(true)`: NR
        /// values from its start), or one value less (`Some(false)`).
        tight: Option<bool>,
        /// The copy expected for a register of NR.
        expect: &'a dyn Fn(usize) -> TileCopy,
    }

    impl WithSimd for PackCase<'_> {
        type Output = ();
        fn with_simd<S: Simd>(self, simd: S) {
            let nr = crate::backend::cpu::kernel::nr::<f32, S>();
            let offs = &self.offs[..self.offs.len().min(nr)];
            let kmax = self.kbase.iter().max().unwrap();
            let last_run = offs
                .windows(2)
                .rposition(|w| w[1] != w[0] + 1)
                .map_or(0, |i| i + 1);
            let end = kmax + offs[last_run] + nr;
            if self.tight == Some(false) && last_run == 0 {
                // One run: the tile itself reads up to `end`; no source can
                // be one value shorter.
                return;
            }
            let src = match self.tight {
                Some(true) => &self.src[..end],
                Some(false) => &self.src[..end - 1],
                None => self.src,
            };
            let rows = self.kbase.len();
            let mut got = vec![f32::NAN; (rows + 1) * nr];
            let how = pack_b_tile(simd, src, self.kbase, offs, None, nr, &mut got);
            assert_eq!(how, (self.expect)(nr), "{:?}", &offs[..4.min(offs.len())]);
            let mut want = vec![f32::NAN; (rows + 1) * nr];
            gather(src, self.kbase, offs, nr, &mut want);
            for (i, (g, w)) in got[..rows * nr].iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "row {} col {}", i / nr, i % nr);
            }
        }
    }

    /// Output positions `p0..p0 + n` of a stride-`stride` 3x3 conv over a
    /// padded plane `wp` wide with `ow` outputs per row, as offsets.
    fn offsets(p0: usize, n: usize, ow: usize, wp: usize, stride: usize) -> Vec<usize> {
        (p0..p0 + n)
            .map(|p| (p / ow) * stride * wp + (p % ow) * stride)
            .collect()
    }

    #[test]
    fn tile_packing_matches_the_value_by_value_gather() {
        // Two channels of a padded plane, the 9 taps of each.
        let (wp, hp) = (24, 40);
        let plane = wp * hp;
        let src: Vec<f32> = (0..2 * plane).map(|i| i as f32 * 0.5 - 7.0).collect();
        let kbase: Vec<usize> = (0..2)
            .flat_map(|c| (0..3).flat_map(move |ky| (0..3).map(move |kx| c * plane + ky * wp + kx)))
            .collect();
        // Runs in the first `nr` of `n` positions from `p0`, `ow` per row
        // (stride 1); more than MAX_RUNS or a partial tile: the gather.
        let by_rows = |p0: usize, n: usize, ow: usize| {
            move |nr: usize| {
                let runs = (p0 + nr - 1) / ow - p0 / ow + 1;
                if n < nr || runs > MAX_RUNS {
                    TileCopy::Gather
                } else {
                    TileCopy::Runs(runs)
                }
            }
        };
        let gathered = |_: usize| TileCopy::Gather;
        // Stride 2: every position is a run of its own.
        let strided = |nr: usize| {
            if nr > MAX_RUNS {
                TileCopy::Gather
            } else {
                TileCopy::Runs(nr)
            }
        };
        for arch in crate::backend::cpu::Isa::every_arch() {
            // Output rows of 22, 11, 7 and 3 positions (1 to more than
            // MAX_RUNS runs per tile), starting mid-row; stride 2 (every
            // position a run); a partial tile (fewer positions than NR).
            for (ow, stride, p0, n) in [
                (22, 1, 0, 64),
                (22, 1, 5, 64),
                (11, 1, 3, 64),
                (7, 1, 2, 64),
                (3, 1, 1, 64),
                (22, 1, 7, 5),
            ] {
                let offs = offsets(p0, n, ow, wp, stride);
                arch.dispatch(PackCase {
                    src: &src,
                    kbase: &kbase,
                    offs: &offs,
                    tight: None,
                    expect: &by_rows(p0, n, ow),
                });
            }
            let offs = offsets(1, 64, 10, wp, 2);
            arch.dispatch(PackCase {
                src: &src,
                kbase: &kbase,
                offs: &offs,
                tight: None,
                expect: &strided,
            });
            // A source that ends where whole-register reads of the last run
            // need it to (the run copy), or one value earlier (the gather).
            for (ow, p0) in [(11, 3), (7, 2)] {
                let offs = offsets(p0, 64, ow, wp, 1);
                let runs = by_rows(p0, 64, ow);
                for enough in [true, false] {
                    let expect: &dyn Fn(usize) -> TileCopy = if enough { &runs } else { &gathered };
                    arch.dispatch(PackCase {
                        src: &src,
                        kbase: &kbase,
                        offs: &offs,
                        tight: Some(enough),
                        expect,
                    });
                }
            }
        }
    }
}
