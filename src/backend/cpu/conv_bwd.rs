//! Convolution gradients: input (dX), weight (dW) and bias.
//!
//! dX is the forward engine again ([`ImplicitConv`]): the full correlation
//! of the output gradient, zero-dilated by the stride and padded by
//! `k - 1 - pad`, with the weights transposed and flipped
//! (`W'[ci][co][ky][kx] = W[co][ci][kh-1-ky][kw-1-kx]`), then times the
//! mask. For stride 1 (every conv of the loss) that is exactly the forward
//! cost; for larger strides it multiplies the inserted zeros too (a slower
//! but correct generic path).
//!
//! dW is a GEMM with the long reduction over positions,
//! `dW^T[j][co] = sum_{n,oy,ox} Xpad[n][j: ci, oy*sh+ky, ox*sw+kx] * dY[n][co][oy][ox]`.
//! Orientation: rows are the taps `j = (ci, ky, kx)` and the kernel reads
//! them straight from the padded image (a row of the im2col matrix is a
//! shifted window of it: no im2col copy at all), columns are output
//! channels, packed from dY transposed (`[k][NR]`, a 256-wide transpose
//! done once per group of k-blocks and shared by all threads). The other
//! orientation (rows = output channels) would need im2col transposed, a
//! gather of 9 taps per value. C' accumulates in MR x NR tiles stored in
//! visiting order, transposed into OIHW at the end. Measured 86-90% of peak
//! at P3/P4. With few taps (`c_in * kh * kw <= FEW_ROWS`, e.g. a
//! one-channel conv) there are only one or two row panels to share the
//! transpose of dY, which then is the pass; there the other orientation
//! runs, its im2col transposed being the small copy
//! ([`backward_weight_few_rows`], same bits).
//!
//! Under a spatial mask with zeros the k-blocks are pieces of one output row
//! (`SPARSE_DW_COLS`), and each row panel runs only over the columns where
//! one of its taps reads unmasked input (`tap_hulls`): with the loss's
//! masks (65% of the positions, in connected regions) that is about 35-40%
//! of the dense multiply-adds.
//!
//! Determinism: the reduction over positions (33600 at P3) is cut into
//! fixed-size k-blocks (an image's output rows, ~256 positions) that depend
//! only on the shape, and the blocks' partial sums are combined in a fixed
//! order: block b's fused chain starts from the sum of blocks 0..b (the
//! kernel resumes from C). That is one sequential chain per output in
//! (n, oy, ox) order, whatever the thread count; threads split the rows j
//! (outputs), never the reduction.

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::Ctx;
use super::conv_fwd::{
    ASource, Epilogue, ImplicitConv, Skip, TASKS_PER_THREAD, forward_pad, kc_for, kept_channels,
    pack_weights, sparse_channels,
};
use super::kernel::{AWalk, MR, nr, panel_steps, run_walked_step};
use super::pack::{PadSpec, Scratch, image_batches, pack_dy_t, pad_images, pad_planes};
use super::simd::{Ahead, Elem};
use crate::Tensor;
use crate::backend::{ConvArgs, ConvGeometry, InputMask};
use crate::pool;
use std::ops::Range;

/// `dx = mask * conv_transpose(dy, w)`, `[N, Cin, H, W]`.
pub(crate) fn conv2d_backward_input<E: Elem>(
    dy: &[E],
    w: &[E],
    args: &ConvArgs<E>,
    cx: Ctx<'_>,
) -> Vec<E> {
    let g = &args.geom;
    let [ph, pw] = g.padding;
    let spec = PadSpec {
        top: g.kh as isize - 1 - ph as isize,
        left: g.kw as isize - 1 - pw as isize,
        hp: g.h + g.kh - 1,
        wp: g.w + g.kw - 1,
        dil: g.stride,
    };
    let out_shape = g.output_shape();
    let batches = image_batches::<E>(out_shape, spec, false, cx);
    let (kh, kw, cin) = (g.kh, g.kw, g.c_in);
    let k = g.c_out * kh * kw;
    // A[ci][(co, t)] = W[co][ci][taps-1-t] (t = ky*kw + kx, so reversing
    // t flips both ky and kx), built row by row without index division.
    let taps = kh * kw;
    let mut wt = pool::take::<E>(cin * k);
    wt.par_chunks_mut(k).enumerate().for_each(|(ci, row)| {
        for (co, dst) in row.chunks_exact_mut(taps).enumerate() {
            let src = &w[(co * cin + ci) * taps..][..taps];
            dst.iter_mut()
                .zip(src.iter().rev())
                .for_each(|(d, &v)| *d = v);
        }
    });
    let hw = g.h * g.w;
    let mut dx = pool::take::<E>(g.n * cin * hw);
    if let Some(ms) = sparse_channels(args.mask.as_ref()) {
        // Under a channel mask with exact zeros, only the kept channels'
        // rows are computed (the others are `0 * ...`); per image, since
        // the masks differ.
        cx.tally.channel_sparse_call();
        let img_len = g.c_out * spec.hp * spec.wp;
        for imgs in batches {
            let src = pad_images(dy, out_shape, spec, None, imgs.clone());
            for img in imgs.clone() {
                let dximg = &mut dx[img * cin * hw..][..cin * hw];
                let kept = kept_channels(ms, img, cin);
                cx.tally.channels_skipped(cin - kept.len());
                dximg.fill(E::zero());
                if kept.is_empty() {
                    continue;
                }
                let scale: Vec<E> = kept.iter().map(|&ci| ms[img * cin + ci]).collect();
                let a = ASource::packed(kept.len(), k, |r, kk| wt[kept[r] * k + kk], cx);
                let rows = ImplicitConv {
                    src: &src.as_slice()[(img - imgs.start) * img_len..][..img_len],
                    n: 1,
                    c: g.c_out,
                    hp: spec.hp,
                    wp: spec.wp,
                    kh,
                    kw,
                    stride: [1, 1],
                    oh: g.h,
                    ow: g.w,
                    a: &a,
                    m: kept.len(),
                    epilogue: Epilogue::RowScale(&scale),
                    skip: Skip::None,
                    cx,
                }
                .run();
                for (r, &ci) in kept.iter().enumerate() {
                    dximg[ci * hw..(ci + 1) * hw].copy_from_slice(&rows[r * hw..(r + 1) * hw]);
                }
                drop(pool::Buffer::new(rows));
            }
        }
        drop(pool::Buffer::new(wt));
        return dx;
    }
    let a = if pack_weights(g.n * g.h * g.w) {
        ASource::packed(cin, k, |ci, kk| wt[ci * k + kk], cx)
    } else {
        ASource::Rows {
            data: &wt,
            m: cin,
            k,
            kblocks: super::pack::even_blocks(k, kc_for::<E>()),
        }
    };
    if matches!(args.mask, Some(InputMask::Spatial(_))) {
        cx.tally.spatial_skip_call();
    }
    for imgs in batches {
        let src = pad_images(dy, out_shape, spec, None, imgs.clone());
        // The mask of these images: borrowed for the whole batch, a copy
        // of their rows (a small `[k, H, W]` or `[k, C]`) otherwise.
        let part;
        let mask = if imgs.len() == g.n {
            args.mask.as_ref()
        } else {
            part = args.mask.as_ref().map(|m| mask_rows(m, imgs.clone()));
            part.as_ref()
        };
        let epilogue = match mask {
            Some(m) => Epilogue::Mask(m),
            None => Epilogue::Bias {
                bias: None,
                relu: false,
            },
        };
        // Under a spatial mask, the positions it zeroes need no sums.
        let skip = match mask {
            Some(InputMask::Spatial(m)) => Skip::Output(m.as_slice()),
            _ => Skip::None,
        };
        ImplicitConv {
            src: src.as_slice(),
            n: imgs.len(),
            c: g.c_out,
            hp: spec.hp,
            wp: spec.wp,
            kh,
            kw,
            stride: [1, 1],
            oh: g.h,
            ow: g.w,
            a: &a,
            m: cin,
            epilogue,
            skip,
            cx,
        }
        .run_into(&mut dx[imgs.start * cin * hw..imgs.end * cin * hw]);
    }
    drop(a);
    drop(pool::Buffer::new(wt));
    dx
}

/// The multipliers of images `imgs` of a mask, as a mask of those images.
fn mask_rows<E: Elem>(m: &InputMask<E>, imgs: Range<usize>) -> InputMask<E> {
    let t = m.tensor();
    let mut shape = t.shape().to_vec();
    let row = shape[1..].iter().product::<usize>();
    shape[0] = imgs.len();
    let rows = Tensor::from_parts(
        &shape,
        t.as_slice()[imgs.start * row..imgs.end * row].to_vec(),
    );
    match m {
        InputMask::Spatial(_) => InputMask::Spatial(rows),
        InputMask::Channel(_) => InputMask::Channel(rows),
    }
}

/// Positions per weight-gradient k-block (about; whole output rows).
fn kc_dw<E>() -> usize {
    1024 / std::mem::size_of::<E>()
}

/// A k-block of the weight gradient: image, output rows `oy0 .. oy0 +
/// nrows`, columns `ox0 .. ox0 + ncols` of each.
#[derive(Clone, Copy, Debug)]
struct Rect {
    img: usize,
    oy0: usize,
    nrows: usize,
    ox0: usize,
    ncols: usize,
}

/// Output columns per weight-gradient k-block under a spatial mask with
/// zeros (about; a row is cut into even pieces, never joined to the next).
/// Narrow blocks let each row panel skip the columns where it reads only
/// masked zeros (see [`tap_hulls`]), but each kernel call then loads and
/// stores its C tile for fewer FMAs. Widths from 24 to 96 timed alike at
/// P3 and P4 on an AVX-512 Xeon (whole rows were 1.6x slower at P3); on the
/// AVX2 Zen 1, 48 and 96 gained 4-5% at P3 but 96 lost 30% at P4 and both
/// 20% at P5. 32 also splits P5's 42 columns in two. Measured in
/// `docs/engineering.md`, "What the masks make cheap: the direct conv under
/// a spatial mask".
const SPARSE_DW_COLS: usize = 32;

/// The fixed k-blocks of an `n x oh x ow` position space, in (n, oy, ox)
/// order. They depend on the shape only (and on `one_row`: blocks of at
/// most `kc` columns of one row, for the spatially masked pass).
fn dw_blocks(n: usize, oh: usize, ow: usize, kc: usize, one_row: bool) -> Vec<Rect> {
    let mut out = Vec::new();
    for img in 0..n {
        if ow >= kc || one_row {
            for oy in 0..oh {
                for (ox0, ncols) in super::pack::even_blocks(ow, kc) {
                    out.push(Rect {
                        img,
                        oy0: oy,
                        nrows: 1,
                        ox0,
                        ncols,
                    });
                }
            }
        } else {
            for (oy0, nrows) in super::pack::even_blocks(oh, (kc / ow).max(1)) {
                out.push(Rect {
                    img,
                    oy0,
                    nrows,
                    ox0: 0,
                    ncols: ow,
                });
            }
        }
    }
    out
}

/// `dw[co][ci][ky][kx] = sum dy[n][co][oy][ox] * (x * mask)[n][ci][oy*sh+ky-ph][ox*sw+kx-pw]`.
pub(crate) fn conv2d_backward_weight<E: Elem>(
    dy: &[E],
    x: &[E],
    args: &ConvArgs<E>,
    cx: Ctx<'_>,
) -> Vec<E> {
    if takes_few_rows(args) {
        backward_weight_few_rows(dy, x, args, cx)
    } else {
        backward_weight_by_taps(dy, x, args, cx)
    }
}

/// Whether the weight gradient runs [`backward_weight_few_rows`]: at most
/// `FEW_ROWS` taps, and no mask whose zeros the general path would skip.
fn takes_few_rows<E: Elem>(args: &ConvArgs<E>) -> bool {
    let g = &args.geom;
    g.c_in * g.kh * g.kw <= FEW_ROWS
        && !spatial_zeros(args)
        && sparse_channels(args.mask.as_ref()).is_none()
}

/// A spatial mask with exact zeros, whose positions the passes skip.
fn spatial_zeros<E: Elem>(args: &ConvArgs<E>) -> bool {
    matches!(&args.mask, Some(InputMask::Spatial(m)) if m.as_slice().contains(&E::zero()))
}

/// The general weight gradient: `dW^T`, rows the taps `j` (see the module
/// docs).
fn backward_weight_by_taps<E: Elem>(dy: &[E], x: &[E], args: &ConvArgs<E>, cx: Ctx<'_>) -> Vec<E> {
    let g = &args.geom;
    let j_len = g.c_in * g.kh * g.kw;
    let spec = forward_pad(g);
    let batches = image_batches::<E>(g.input_shape(), spec, args.mask.is_some(), cx);
    let arch = cx.arch;
    let nr = super::conv_fwd::nr_for::<E>(arch);
    let m = g.c_out;
    let tiles = m.div_ceil(nr);
    let p_img = g.oh * g.ow;
    let taps = g.kh * g.kw;
    let spatial = match &args.mask {
        Some(InputMask::Spatial(m)) if spatial_zeros(args) => Some(m.as_slice()),
        _ => None,
    };
    let mut blocks = match spatial {
        Some(_) => dw_blocks(g.n, g.oh, g.ow, SPARSE_DW_COLS, true),
        None => dw_blocks(g.n, g.oh, g.ow, kc_dw::<E>(), false),
    };
    let all_blocks = blocks.len();
    // Under a spatial mask with zeros, each block of one row's columns
    // records, per tap, the columns whose input is not masked (`tap_hulls`);
    // a row panel then runs only over the union of its taps' ranges, and a
    // block where every tap's range is empty (every position's receptive
    // field masked) is dropped. The terms left out are exact zeros and the
    // others keep their order, so the result stays one fixed-order chain
    // per output, started from zeroed tiles.
    let mut hulls = Vec::new();
    if let Some(m) = spatial {
        cx.tally.spatial_skip_call();
        let mpad = pad_planes(
            m,
            [g.n, 1, g.h, g.w],
            spec,
            None,
            &(0..g.n).collect::<Vec<_>>(),
        );
        let all = std::mem::take(&mut blocks);
        for r in all {
            let h = tap_hulls(&mpad[r.img * spec.hp * spec.wp..], spec.wp, g, &r);
            if h.iter().any(|t| !t.is_empty()) {
                blocks.push(r);
                hulls.extend(h);
            }
        }
        drop(pool::Buffer::new(mpad));
    }
    let hulls = spatial.map(|_| hulls.as_slice());
    cx.tally.tiles(blocks.len(), all_blocks - blocks.len());
    // C' = dW^T in whole MR x NR tiles, `[row panel][co tile][MR][NR]`, the
    // order the kernels visit them (contiguous C tiles, one sequential
    // sweep per k-block, as in the forward pass).
    let panels = j_len.div_ceil(MR);
    let tile_len = MR * nr;
    let mut cbuf = Scratch::<E>::new(panels * tiles * tile_len);
    let ct = cbuf.as_mut_slice();
    let panels_per = panels_per_task(panels);
    // Under a channel mask with exact zeros, the rows of a channel masked in
    // an image add only zeros over that image's k-blocks and are left out
    // there (`DwTask` runs the kept rows MR at a time); the sums then start
    // from zeroed tiles instead of from the first k-block's products (the
    // same values).
    let skip = sparse_channels(args.mask.as_ref());
    if let Some(ms) = skip {
        cx.tally.channel_sparse_call();
        cx.tally
            .channels_skipped(ms.iter().filter(|&&v| v == E::zero()).count());
    }
    let zero_start = skip.is_some() || hulls.is_some() || blocks.is_empty();
    if zero_start {
        ct.par_chunks_mut(tile_len).for_each(|t| t.fill(E::zero()));
    }
    // dY^T is packed once per group of k-blocks, in parallel, and shared
    // by all row tasks (packing it per task repeated the transpose for each
    // task and cost 2-4% at 2 threads); a group is ~4 MiB of packed data.
    let packed_len = |r: &Rect| r.nrows * r.ncols * tiles * nr;
    let per_group = blocks_per_group::<E>(blocks.first().map_or(1, packed_len));
    let mut first = !zero_start;
    for imgs in batches {
        // The k-blocks of these images (blocks are in image order).
        let lo = blocks.partition_point(|r| r.img < imgs.start);
        let hi = blocks.partition_point(|r| r.img < imgs.end);
        if lo == hi {
            continue;
        }
        let src = pad_images(x, g.input_shape(), spec, args.mask.as_ref(), imgs.clone());
        let job = DwJob {
            src: src.as_slice(),
            img0: imgs.start,
            g: *g,
            hp: spec.hp,
            wp: spec.wp,
            skip,
            cx,
        };
        for (gi, group) in blocks[lo..hi].chunks(per_group).enumerate() {
            let first_block = lo + gi * per_group;
            let buf = pack_group(group, packed_len, |r, out| {
                let dy_img = &dy[r.img * m * p_img..][..m * p_img];
                pack_dy_t(dy_img, m, g.ow, (r.oy0, r.nrows, r.ox0, r.ncols), nr, out);
            });
            let packed = buf.as_slice();
            ct.par_chunks_mut(panels_per * tiles * tile_len)
                .enumerate()
                .for_each(|(t, tiles_out)| {
                    arch.dispatch(DwTask {
                        job: &job,
                        blocks: group,
                        hulls: hulls.map(|h| &h[first_block * taps..][..group.len() * taps]),
                        packed,
                        first,
                        j0: t * panels_per * MR,
                        c: tiles_out,
                    })
                });
            first = false;
        }
    }
    // dW[co][j] = C'[j][co].
    let mut dw = pool::take::<E>(m * j_len);
    dw.par_chunks_mut(j_len.max(1))
        .enumerate()
        .for_each(|(co, row)| {
            let (t, i) = (co / nr, co % nr);
            for (j, v) in row.iter_mut().enumerate() {
                *v = ct[((j / MR) * tiles + t) * tile_len + (j % MR) * nr + i];
            }
        });
    dw
}

/// Row panels per task of a weight gradient: runs of panels, a few tasks
/// per thread for balance (the split never changes a bit).
fn panels_per_task(panels: usize) -> usize {
    let tasks = (TASKS_PER_THREAD * rayon::current_num_threads())
        .min(panels)
        .max(1);
    panels.div_ceil(tasks)
}

/// Where row `j = (ci, ky, kx)` of the weight gradient starts in a padded
/// image (`plane` values a channel, rows `wp` wide): the image shifted by
/// `(ky, kx)`, in channel `ci`. Both orientations read the taps through it.
fn tap_offset(g: &ConvGeometry, wp: usize, plane: usize, j: usize) -> usize {
    let taps = g.kh * g.kw;
    let (ci, t) = (j / taps, j % taps);
    ci * plane + (t / g.kw) * wp + t % g.kw
}

/// K-blocks per group of a weight gradient's packed B: about 4 MiB of
/// packed data, for blocks of `block_len` values.
fn blocks_per_group<E>(block_len: usize) -> usize {
    ((4 << 20) / (block_len * std::mem::size_of::<E>()).max(1)).max(1)
}

/// The k-blocks of `group` packed in parallel into one buffer, block after
/// block, `len(r)` values each, written by `pack(r, out)`. 64-byte aligned,
/// like the forward's B tiles (no split loads).
fn pack_group<E: Elem>(
    group: &[Rect],
    len: impl Fn(&Rect) -> usize,
    pack: impl Fn(&Rect, &mut [E]) + Sync,
) -> Scratch<E> {
    let mut buf = Scratch::<E>::new(group.iter().map(&len).sum());
    let mut parts = Vec::with_capacity(group.len());
    let mut rest = buf.as_mut_slice();
    for r in group {
        let (head, tail) = rest.split_at_mut(len(r));
        parts.push((r, head));
        rest = tail;
    }
    parts.into_par_iter().for_each(|(r, out)| pack(r, out));
    buf
}

/// Most rows `j = (ci, ky, kx)` for which the weight gradient takes
/// [`backward_weight_few_rows`]: up to three input channels at 3 x 3. A
/// constant, not the ISA's NR, so that the path (and the bits) does not
/// depend on the instruction set.
const FEW_ROWS: usize = 32;

/// The weight gradient of a conv with few rows `j` (`c_in * kh * kw <=
/// FEW_ROWS`, e.g. the generator's one-channel conv, `distill::generator`):
/// `dW = dY X^T` as it stands, output channels down the rows (dY's rows
/// read in place as A, MR channels a panel, with the same position walk as
/// [`DwTask`]'s) and `j` across the lanes (each k-block's input windows
/// packed as B, `[column tile][k][NR]`, lanes past `j_len` zero: the
/// im2col transposed, which for so few rows is a small copy). The general
/// path's orientation, rows `j`, packs dY transposed for its B: with one or
/// two row panels that transpose was the pass (81% of the samples of the
/// one-channel pass at two-stage P2, 36 ms; AMD EPYC Zen 4, AVX-512, 2
/// threads).
///
/// Taken where the general path runs every k-block whole (no spatial mask
/// with zeros, no channel mask with zeros; under those it skips what the
/// mask zeroes, which this path would compute).
///
/// Determinism: the k-blocks are the general path's (`dw_blocks`, in
/// order) and every output is one fused chain over them, from the first
/// block's products, whatever the thread count (threads split the row
/// panels). `fma(dy, x, acc)` is `fma(x, dy, acc)`, so the two paths give
/// the same bits.
fn backward_weight_few_rows<E: Elem>(dy: &[E], x: &[E], args: &ConvArgs<E>, cx: Ctx<'_>) -> Vec<E> {
    let g = &args.geom;
    let spec = forward_pad(g);
    let arch = cx.arch;
    let nr = super::conv_fwd::nr_for::<E>(arch);
    let j_len = g.c_in * g.kh * g.kw;
    let m = g.c_out;
    let col_tiles = j_len.div_ceil(nr);
    let panels = m.div_ceil(MR);
    // C, `[row panel][column tile][MR][NR]`.
    let panel_len = col_tiles * MR * nr;
    let blocks = dw_blocks(g.n, g.oh, g.ow, kc_dw::<E>(), false);
    cx.tally.tiles(blocks.len(), 0);
    let mut cbuf = Scratch::<E>::new(panels * panel_len);
    let ct = cbuf.as_mut_slice();
    let panels_per = panels_per_task(panels);
    let packed_len = |r: &Rect| r.nrows * r.ncols * col_tiles * nr;
    let per_group = blocks_per_group::<E>(blocks.first().map_or(1, packed_len));
    let (hp, wp) = (spec.hp, spec.wp);
    let img_len = g.c_in * hp * wp;
    let mut first = true;
    for imgs in image_batches::<E>(g.input_shape(), spec, args.mask.is_some(), cx) {
        let lo = blocks.partition_point(|r| r.img < imgs.start);
        let hi = blocks.partition_point(|r| r.img < imgs.end);
        let src = pad_images(x, g.input_shape(), spec, args.mask.as_ref(), imgs.clone());
        let src = src.as_slice();
        for group in blocks[lo..hi].chunks(per_group) {
            let buf = pack_group(group, packed_len, |r, out| {
                let img = &src[(r.img - imgs.start) * img_len..][..img_len];
                pack_windows_t(img, g, wp, hp * wp, r, nr, out);
            });
            let packed = buf.as_slice();
            ct.par_chunks_mut(panels_per * panel_len)
                .enumerate()
                .for_each(|(t, c)| {
                    arch.dispatch(FewRowsTask {
                        dy,
                        g: *g,
                        blocks: group,
                        packed,
                        first,
                        co0: t * panels_per * MR,
                        c,
                        cx,
                    })
                });
            first = false;
        }
    }
    // dW[co][j] = C[co][j].
    let mut dw = pool::take::<E>(m * j_len);
    for (co, row) in dw.chunks_exact_mut(j_len.max(1)).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = ct[(co / MR) * panel_len + ((j / nr) * MR + co % MR) * nr + j % nr];
        }
    }
    dw
}

/// The input windows of k-block `r` of one padded image (`plane` values a
/// channel, rows `wp` wide), transposed for [`backward_weight_few_rows`]:
/// `out[t][kk][i] = img[window j = t * nr + i of position kk]`, zeros for
/// `j` past `c_in * kh * kw`. Position `kk` walks the block's rows and
/// columns in order; row `j = (ci, ky, kx)` of position `(oy, ox)` is
/// `img[ci][oy * sh + ky][ox * sw + kx]`, as [`DwTask`] reads it.
fn pack_windows_t<E: Elem>(
    img: &[E],
    g: &ConvGeometry,
    wp: usize,
    plane: usize,
    r: &Rect,
    nr: usize,
    out: &mut [E],
) {
    let taps = g.kh * g.kw;
    let j_len = g.c_in * taps;
    let kc = r.nrows * r.ncols;
    let [sh, sw] = g.stride;
    let offs: Vec<usize> = (0..j_len).map(|j| tap_offset(g, wp, plane, j)).collect();
    for (t, tile) in out.chunks_exact_mut(kc * nr).enumerate() {
        let offs = &offs[(t * nr).min(j_len)..((t + 1) * nr).min(j_len)];
        let mut rows = tile.chunks_exact_mut(nr);
        for oy in r.oy0..r.oy0 + r.nrows {
            for ox in r.ox0..r.ox0 + r.ncols {
                let row = rows.next().expect("kc rows");
                let base = oy * sh * wp + ox * sw;
                for (v, &o) in row.iter_mut().zip(offs) {
                    *v = img[base + o];
                }
                row[offs.len()..].fill(E::zero());
            }
        }
    }
}

/// Row panels `co0 / MR ..` of [`backward_weight_few_rows`] over one group
/// of k-blocks.
struct FewRowsTask<'a, 'b, E: Elem> {
    dy: &'a [E],
    g: ConvGeometry,
    blocks: &'a [Rect],
    /// The group's packed windows, k-block after k-block,
    /// `[column tile][k][NR]` each.
    packed: &'a [E],
    /// True for the first group: its first k-block starts the sums.
    first: bool,
    /// First output channel of this task.
    co0: usize,
    /// The task's C tiles, `[panel][column tile][MR][NR]`.
    c: &'b mut [E],
    cx: Ctx<'a>,
}

impl<E: Elem> WithSimd for FewRowsTask<'_, '_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let FewRowsTask {
            dy,
            g,
            blocks,
            packed,
            first,
            co0,
            c,
            cx,
        } = self;
        let nr = nr::<E, S>();
        let m = g.c_out;
        let j_len = g.c_in * g.kh * g.kw;
        let col_tiles = j_len.div_ceil(nr);
        let tile_len = MR * nr;
        let panels = c.len() / (col_tiles * tile_len);
        let co_end = (co0 + panels * MR).min(m);
        let p_img = g.oh * g.ow;
        let mut at = 0;
        for (kb, r) in blocks.iter().enumerate() {
            let kc = r.nrows * r.ncols;
            let bt = &packed[at..at + kc * col_tiles * nr];
            at += kc * col_tiles * nr;
            let dy_img = &dy[r.img * m * p_img..][..m * p_img];
            let walk = AWalk {
                off: r.oy0 * g.ow + r.ox0,
                step: 1,
                seg_len: r.ncols,
                nseg: r.nrows,
                seg_jump: g.ow,
            };
            let resume = kb > 0 || !first;
            for ps in panel_steps::<E, S>(panels, |_| true) {
                // Call row i is output channel co0 + ps.start * MR + i; rows
                // past the last channel repeat it (dropped).
                let a = std::array::from_fn(|i| {
                    let co = (co0 + ps.start * MR + i).min(co_end - 1);
                    &dy_img[co * p_img..]
                });
                for t in 0..col_tiles {
                    let at = [ps.start, ps.start + 1].map(|q| (q * col_tiles + t) * tile_len);
                    let next = at.map(|q| c.as_ptr().wrapping_add(q + tile_len));
                    let b = &bt[t * kc * nr..][..kc * nr];
                    run_walked_step(simd, ps.len(), a, walk, b, c, at, resume, next, Ahead::NONE);
                }
            }
        }
        let rows = co_end.saturating_sub(co0);
        cx.tally
            .macs(blocks.iter().map(|r| r.nrows * r.ncols).sum::<usize>() * rows * j_len);
    }
}

struct DwJob<'a, E> {
    /// Images `img0 ..` of the masked input, padded.
    src: &'a [E],
    img0: usize,
    g: ConvGeometry,
    hp: usize,
    wp: usize,
    /// The channel mask, when masked channels are skipped.
    skip: Option<&'a [E]>,
    cx: Ctx<'a>,
}

/// Per tap `(ky, kx)` of a one-row block `r`, the block's columns
/// (`0 .. r.ncols`) from the first to the last whose input under the
/// padded spatial mask `mp` (one image's plane, `wp` wide) is nonzero;
/// empty where the tap reads only zeros there.
fn tap_hulls<E: Elem>(mp: &[E], wp: usize, g: &ConvGeometry, r: &Rect) -> Vec<Range<usize>> {
    debug_assert_eq!(r.nrows, 1);
    let [sh, sw] = g.stride;
    let mut out = Vec::with_capacity(g.kh * g.kw);
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let row = (r.oy0 * sh + ky) * wp + r.ox0 * sw + kx;
            let kept = |i: &usize| mp[row + i * sw] != E::zero();
            match (0..r.ncols).find(kept) {
                Some(a) => out.push(a..(0..r.ncols).rev().find(kept).unwrap_or(a) + 1),
                None => out.push(0..0),
            }
        }
    }
    out
}

/// Rows `j0 ..` of C' over one group of k-blocks.
struct DwTask<'a, 'b, E: Elem> {
    job: &'a DwJob<'a, E>,
    blocks: &'a [Rect],
    /// Under a spatial mask with zeros, per block and tap the columns that
    /// read unmasked input ([`tap_hulls`]; `kh * kw` ranges per block).
    hulls: Option<&'a [Range<usize>]>,
    /// The group's packed dY^T, k-block after k-block, `[tile][k][NR]` each.
    packed: &'a [E],
    /// True for the first group: its first k-block starts the sums.
    first: bool,
    /// First row (tap) of this task.
    j0: usize,
    /// The task's C' tiles, `[panel][co tile][MR][NR]`.
    c: &'b mut [E],
}

impl<E: Elem> WithSimd for DwTask<'_, '_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let DwTask {
            job,
            blocks,
            hulls,
            packed,
            first,
            j0,
            c,
        } = self;
        let g = &job.g;
        let nr = nr::<E, S>();
        let m = g.c_out;
        let tiles = m.div_ceil(nr);
        let [sh, sw] = g.stride;
        let (hp, wp) = (job.hp, job.wp);
        let plane = hp * wp;
        let img_len = g.c_in * plane;
        let j_len = g.c_in * g.kh * g.kw;
        let taps = g.kh * g.kw;
        let tile_len = MR * nr;
        let panels = c.len() / (tiles * tile_len);
        let j_end = (j0 + panels * MR).min(j_len);
        let mut macs = 0;
        let mut at = 0;
        // Under a channel mask with exact zeros: this task's rows whose
        // channel the current image keeps, and their C rows gathered into
        // whole tiles (`kept_c`, laid out as `c`'s panels, a group of MR
        // kept rows per panel), summed on over all of the image's k-blocks
        // and scattered back when the image changes and at the end. (A
        // short last group's rows past its end are summed on from zeros
        // like rows past the end of a panel, and never copied back.)
        let mut kept: Vec<usize> = Vec::new();
        let mut kept_img = None;
        // Value offset of row `q` (of the task's rows, or of the kept ones)
        // in column tile `t`.
        let slot = |q: usize, t: usize| ((q / MR) * tiles + t) * tile_len + (q % MR) * nr;
        let mut kept_buf = job.skip.map(|_| Scratch::<E>::new(c.len()));
        let kept_c = kept_buf.as_mut().map_or(&mut [][..], Scratch::as_mut_slice);
        // `kept`'s C rows from `c` into `kept_c`, the short last group's
        // rows past its end zeroed (no stale values summed on); and back.
        let gather = |kept: &[usize], c: &[E], kept_c: &mut [E]| {
            for t in 0..tiles {
                for (q, &j) in kept.iter().enumerate() {
                    let (from, to) = (slot(j - j0, t), slot(q, t));
                    kept_c[to..to + nr].copy_from_slice(&c[from..from + nr]);
                }
                for q in kept.len()..kept.len().next_multiple_of(MR) {
                    kept_c[slot(q, t)..][..nr].fill(E::zero());
                }
            }
        };
        let scatter = |kept: &[usize], kept_c: &[E], c: &mut [E]| {
            for t in 0..tiles {
                for (q, &j) in kept.iter().enumerate() {
                    let (from, to) = (slot(q, t), slot(j - j0, t));
                    c[to..to + nr].copy_from_slice(&kept_c[from..from + nr]);
                }
            }
        };
        for (kb, r) in blocks.iter().enumerate() {
            let kc = r.nrows * r.ncols;
            let bt = &packed[at..at + kc * tiles * nr];
            at += kc * tiles * nr;
            let src = &job.src[(r.img - job.img0) * img_len..][..img_len];
            let walk = AWalk {
                off: r.oy0 * sh * wp + r.ox0 * sw,
                step: sw,
                seg_len: r.ncols,
                nseg: r.nrows,
                seg_jump: sh * wp,
            };
            let row = |j: usize| &src[tap_offset(g, wp, plane, j)..];
            if let Some(ms) = job.skip {
                // The kept rows, MR at a time, whatever panels they lie
                // in. The masked rows' terms are exact zeros (the input is
                // masked), which leave a sum started from +0 unchanged bit
                // for bit, so this gives what the whole panels gave, with
                // 35% of the rows at lambda_c = 0.65 where whole panels kept
                // 42%. The rows are gathered once per image and group of
                // k-blocks, not copied in and out around each kernel call
                // (24 short copies per 12 x 16 tile of 168 k steps). AMD
                // EPYC Zen 1, AVX2, 2 threads, `examples/conv_speed`, P3,
                // medians of 5-7, three alternating rounds: with every row
                // sent through this path (masked or not), per call copies
                // 643-644 ms against the whole panels' 563-575, gathered
                // 571-578 against 569-572; under the retinanet loss's
                // channel mask P3 255-265 -> 233-235 ms, P4 65-67 -> 60-63.
                // (The sums start from zeroed tiles here: always resume.)
                debug_assert!(!first);
                if kept_img != Some(r.img) {
                    scatter(&kept, kept_c, c);
                    kept.clear();
                    kept.extend(
                        (j0..j_end).filter(|&j| ms[r.img * g.c_in + j / taps] != E::zero()),
                    );
                    gather(&kept, c, kept_c);
                    kept_img = Some(r.img);
                }
                // Groups of MR kept rows, two groups per call where the
                // ISA has the registers, as the whole panels below (Intel
                // Xeon family 6 model 167, AVX-512, 2 threads, under the
                // retinanet loss's channel mask, three alternating rounds:
                // P3 66.4-67.4 -> 64.7-65.6 ms, P4 17.5-18.0 -> 16.5-16.8).
                for ps in panel_steps::<E, S>(kept.len().div_ceil(MR), |_| true) {
                    let rows_in = &kept[ps.start * MR..(ps.end * MR).min(kept.len())];
                    macs += rows_in.len() * m * kc;
                    // Rows past the groups' end repeat the last (dropped).
                    let a = std::array::from_fn(|i| row(rows_in[i.min(rows_in.len() - 1)]));
                    for t in 0..tiles {
                        let at = [ps.start, ps.start + 1].map(|q| (q * tiles + t) * tile_len);
                        let next = at.map(|q| kept_c.as_ptr().wrapping_add(q + tile_len));
                        let b = &bt[t * kc * nr..][..kc * nr];
                        run_walked_step(
                            simd,
                            ps.len(),
                            a,
                            walk,
                            b,
                            kept_c,
                            at,
                            true,
                            next,
                            Ahead::NONE,
                        );
                    }
                }
                continue;
            }
            // The columns panel `p`'s taps read unmasked input in: the union
            // of their ranges (all columns without a mask).
            let cols_of = |p: usize| match hulls {
                Some(h) => {
                    let h = &h[kb * taps..][..taps];
                    let j_first = j0 + p * MR;
                    let j_last = (j_first + MR - 1).min(j_len - 1);
                    let mut u = r.ncols..0;
                    for j in j_first..=j_last {
                        let t = &h[j % taps];
                        if !t.is_empty() {
                            u = u.start.min(t.start)..u.end.max(t.end);
                        }
                    }
                    u
                }
                None => 0..kc,
            };
            // Two panels per call where the ISA has the registers and both
            // panels run over the same columns.
            for ps in panel_steps::<E, S>(panels, |p| cols_of(p + 1) == cols_of(p)) {
                let (p, cols) = (ps.start, cols_of(ps.start));
                if cols.is_empty() {
                    continue;
                }
                macs += ps
                    .clone()
                    .map(|q| MR.min(j_len - (j0 + q * MR)))
                    .sum::<usize>()
                    * m
                    * cols.len();
                // (A block under a spatial mask is one row: its k is its
                // columns.)
                let walk = match hulls {
                    Some(_) => AWalk::run(walk.off + cols.start * sw, sw, cols.len()),
                    None => walk,
                };
                let b = |t: usize| &bt[(t * kc + cols.start) * nr..][..cols.len() * nr];
                let resume = kb > 0 || !first;
                // Row i of the call is the panels' row i; rows past the end
                // repeat the last valid one (dropped).
                let a = std::array::from_fn(|i| row((j0 + p * MR + i).min(j_len - 1)));
                for t in 0..tiles {
                    let at = [p, p + 1].map(|q| (q * tiles + t) * tile_len);
                    let next = at.map(|q| c.as_ptr().wrapping_add(q + tile_len));
                    run_walked_step(
                        simd,
                        ps.len(),
                        a,
                        walk,
                        b(t),
                        c,
                        at,
                        resume,
                        next,
                        Ahead::NONE,
                    );
                }
            }
        }
        scatter(&kept, kept_c, c);
        job.cx.tally.macs(macs);
    }
}

/// `db[co] = sum over n, oy, ox of dy`, each channel a fixed-order sum.
pub(crate) fn conv2d_backward_bias<E: Elem>(dy: &[E], dims: [usize; 4]) -> Vec<E> {
    let [n, c, h, w] = dims;
    let p = h * w;
    (0..c)
        .into_par_iter()
        .map(|co| {
            let mut acc = E::zero();
            for ni in 0..n {
                acc += super::reduce::fixed_sum(&dy[(ni * c + co) * p..][..p]);
            }
            acc
        })
        .collect()
}

/// The direct convolution's three passes (forward in `conv_fwd.rs`, the
/// gradients here) against the reference loops, through the backend, so
/// that the packing, the k-blocks, the tasks, the mask paths and the
/// epilogues are all exercised in the lib tests (and by cargo-mutants with
/// them).
#[cfg(test)]
mod tests {
    use super::{
        FEW_ROWS, backward_weight_by_taps, backward_weight_few_rows, blocks_per_group,
        takes_few_rows,
    };
    use crate::backend::cpu::conv_fwd::{PACK_WEIGHTS_ABOVE, nr_for};
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::kernel::MR;
    use crate::backend::cpu::simd::Elem;
    use crate::backend::cpu::testing::{
        assert_same_bits, assert_slices_same_bits, first_near_then_same_bits, in_pools, values,
    };
    use crate::backend::cpu::{Pass, PassCounters};
    use crate::backend::{
        Backend, ConvArgs, ConvGeometry, CpuBackend, InputMask, ReferenceBackend,
    };
    use crate::{ConvAlgo, Float, Tensor};

    /// The direct backend on each instruction set this CPU runs, with the
    /// gradients' padded copies batch-wide (the default at the tests'
    /// sizes) and one image at a time (any size: see
    /// `PAD_PER_IMAGE_ABOVE`).
    fn direct_backends() -> impl Iterator<Item = CpuBackend> {
        Isa::available().into_iter().flat_map(|isa| {
            let be = CpuBackend::with_isa(ConvAlgo::Direct, isa).unwrap();
            [be.clone(), be.with_pad_per_image_above(0)]
        })
    }

    fn tensor<T: Float>(shape: &[usize], v: &[f64]) -> Tensor<T> {
        Tensor::from_vec(shape, v.iter().map(|&x| T::from_f64(x)).collect()).unwrap()
    }

    /// One convolution's shapes.
    struct Geom {
        /// `[n, c_in, h, w]`
        x: [usize; 4],
        /// `[c_out, kh, kw]`
        w: [usize; 3],
        stride: [usize; 2],
        padding: [usize; 2],
    }

    /// A 3x3 same conv; stride 2 with odd sides; a 1x1; a 5x3 kernel with
    /// uneven stride and padding; 32 input channels x 9 taps = 288 > one
    /// k-block (256 f32, 128 f64); a 50 x 50 plane (2500 positions, more
    /// than one task of output positions); no padding and 396 output
    /// positions per image (two weight-gradient blocks of rows per image,
    /// and under the spatial mask's second image, kept everywhere, blocks
    /// that read no zero); exactly `PACK_WEIGHTS_ABOVE` = 600 positions
    /// (weights read in place, one more and they are packed); stride 2 with
    /// 360 output positions per image (two or three weight-gradient blocks
    /// of rows per image, which read the input 2 rows and columns apart);
    /// output rows of 140 positions, columns 2 apart (in f64 the weight
    /// gradient cuts each row into two blocks, the second starting at
    /// column 70); 40 output channels (two and three NR-wide column tiles
    /// of the weight gradient in f32 and f64 on AVX-512, where two row
    /// panels share each kernel call).
    const GEOMS: [Geom; 11] = [
        geom([2, 5, 9, 13], [7, 3, 3], [1, 1], [1, 1]),
        geom([2, 3, 11, 10], [8, 3, 3], [2, 2], [1, 1]),
        geom([1, 4, 7, 17], [6, 1, 1], [1, 1], [0, 0]),
        geom([2, 6, 8, 9], [5, 5, 3], [2, 1], [2, 0]),
        geom([2, 32, 6, 7], [13, 3, 3], [1, 1], [1, 1]),
        geom([1, 3, 50, 50], [7, 3, 3], [1, 1], [1, 1]),
        geom([2, 3, 24, 20], [4, 3, 3], [1, 1], [0, 0]),
        geom([1, 2, 20, 30], [3, 3, 3], [1, 1], [1, 1]),
        geom([2, 3, 40, 36], [4, 3, 3], [2, 2], [1, 1]),
        geom([1, 2, 5, 280], [3, 3, 3], [1, 2], [1, 1]),
        geom([2, 3, 9, 11], [40, 3, 3], [1, 1], [1, 1]),
    ];

    const fn geom(x: [usize; 4], w: [usize; 3], stride: [usize; 2], padding: [usize; 2]) -> Geom {
        Geom {
            x,
            w,
            stride,
            padding,
        }
    }

    /// Every geometry under no mask, a spatial mask with zeros (image 0
    /// kept only in a corner, so whole tiles are skipped), a real channel
    /// mask and a channel mask with exact zeros (image 0, where there are
    /// two, keeping no channel) and a spatial mask without zeros, with and
    /// without ReLU: forward (with bias), input gradient, weight gradient
    /// and bias gradient against the reference, the mask paths' counters,
    /// and the same bits on every instruction set and 1, 2 and 3 threads (a
    /// zero's sign counts).
    #[test]
    fn direct_passes_match_the_reference_with_the_same_bits() {
        for (case, geom) in GEOMS.iter().enumerate() {
            // f64: the same products summed in another order (one fused
            // chain against the reference's loop), a few ulps of 1e-16 per
            // term over at most 288 terms.
            every_mask::<f64>(case, geom, 1e-13);
            // f32 against the f64 reference: about 6e-8 per term, grown
            // with sqrt(terms); a wrong window, tile or lane is off by O(1).
            every_mask::<f32>(case, geom, 1e-5);
        }
    }

    /// The weight gradient under a channel mask with exact zeros gathers
    /// each image's kept rows once per group of k-blocks and sums on there,
    /// scattering them back when the image changes and at the end: three
    /// images keeping different channels (image 1 none), with their
    /// k-blocks in several groups each (130 x 130 outputs by 64 output
    /// channels: 130 one-row blocks of about 33 KB packed per image in f32,
    /// 260 half-row ones in f64, about 126 to a 4 MiB group), and rows of
    /// one task that leave a short last group. A sum dropped or resumed
    /// from another image's rows shows against the reference; every
    /// instruction set, thread count and padding split gives the first
    /// run's bits.
    #[test]
    fn sparse_channel_weight_gradient_sums_over_groups_and_images() {
        fn check<T: Elem>(tol: f64)
        where
            CpuBackend: Backend<T>,
        {
            let x_shape = [3, 4, 130, 130];
            let w_shape = [64, 4, 3, 3];
            let g = ConvGeometry::new(&x_shape, &w_shape, [1, 1], [1, 1]).unwrap();
            let y_shape = g.output_shape();
            let len = |s: &[usize]| s.iter().product::<usize>();
            let (xv, dyv) = (values(len(&x_shape), 21), values(len(&y_shape), 22));
            // Image 0 keeps channels 0 and 2, image 1 none, image 2 1 to 3.
            let keep = [0.75, 0.0, 1.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 0.5, 2.0];
            let mask = InputMask::Channel(tensor(&[3, 4], &keep));
            let a64 = ConvArgs {
                geom: g,
                mask: Some(mask.clone()),
                relu: false,
            };
            let want = ReferenceBackend
                .conv2d_backward_weight(&tensor(&y_shape, &dyv), &tensor(&x_shape, &xv), &a64)
                .unwrap()
                .to_vec();
            let at: ConvArgs<T> = ConvArgs {
                geom: g,
                mask: Some(mask.cast()),
                relu: false,
            };
            let (x, dy) = (tensor::<T>(&x_shape, &xv), tensor::<T>(&y_shape, &dyv));
            let mut first = None;
            for be in direct_backends() {
                let isa = be.isa();
                let runs = in_pools(|| {
                    be.reset_counters();
                    let got = be.conv2d_backward_weight(&dy, &x, &at).unwrap();
                    (got, be.counters().weight_grad)
                });
                for (threads, (got, dw)) in (1..).zip(runs) {
                    assert_eq!(dw.channel_sparse_calls, 1, "the sparse path ran");
                    // Per image its kept rows (9 per channel) times 64
                    // outputs times 130 x 130 positions.
                    assert_eq!(dw.macs, (2 + 3) * 9 * 64 * 130 * 130);
                    first_near_then_same_bits(
                        &mut first,
                        got.to_vec(),
                        || want.clone(),
                        tol,
                        &format!("{isa:?}, {threads} threads"),
                    );
                }
            }
        }
        // Each output sums 2 x 16900 products (two images keep its
        // channel at most) in one chain: f64 rounding grows to a few 1e-15
        // norm-wise, f32 to a few 1e-6; an image's sums lost or misplaced
        // are O(1) off.
        check::<f64>(1e-12);
        check::<f32>(1e-4);
    }

    /// The few-rows weight gradient (`c_in * kh * kw <= FEW_ROWS`: one and
    /// three input channels at 3 x 3) over k-blocks in more than one 4 MiB
    /// group (130 x 130 outputs per image, three images: about 390 blocks
    /// of one row, 16.6 KB packed each in f32 with NR = 32, 252 to a group;
    /// more groups on the narrower ISAs), with 13 output channels (a short
    /// last panel), with and without a spatial mask that has no zeros:
    /// against the reference, and the same bits as the general path (by
    /// taps) on every instruction set, thread count and padding split (the
    /// general path starts from the first block's products there too).
    #[test]
    fn few_rows_weight_gradient_has_the_general_paths_bits() {
        fn check<T: Elem>(tol: f64)
        where
            CpuBackend: Backend<T>,
        {
            let len = |s: &[usize]| s.iter().product::<usize>();
            for c_in in [1, 3] {
                let x_shape = [3, c_in, 130, 130];
                let w_shape = [13, c_in, 3, 3];
                let g = ConvGeometry::new(&x_shape, &w_shape, [1, 1], [1, 1]).unwrap();
                assert!(c_in * 9 <= FEW_ROWS);
                let y_shape = g.output_shape();
                let (xv, dyv) = (values(len(&x_shape), 31), values(len(&y_shape), 32));
                let positive: Vec<f64> = values(3 * 130 * 130, 33)
                    .into_iter()
                    .map(|v| 1.5 + v)
                    .collect();
                let spatial = InputMask::Spatial(tensor(&[3, 130, 130], &positive));
                for mask in [None, Some(spatial)] {
                    let a64 = ConvArgs {
                        geom: g,
                        mask: mask.clone(),
                        relu: false,
                    };
                    let want = || {
                        let (dy, x) = (tensor(&y_shape, &dyv), tensor(&x_shape, &xv));
                        ReferenceBackend
                            .conv2d_backward_weight(&dy, &x, &a64)
                            .unwrap()
                            .to_vec()
                    };
                    let at: ConvArgs<T> = ConvArgs {
                        geom: g,
                        mask: mask.as_ref().map(InputMask::cast),
                        relu: false,
                    };
                    let (x, dy) = (tensor::<T>(&x_shape, &xv), tensor::<T>(&y_shape, &dyv));
                    let (x, dy) = (x.as_slice(), dy.as_slice());
                    let mut first = None;
                    for be in direct_backends() {
                        let runs = in_pools(|| {
                            let cx = be.ctx(Pass::Weight);
                            let few = backward_weight_few_rows(dy, x, &at, cx);
                            let by_taps = backward_weight_by_taps(dy, x, &at, cx);
                            assert_slices_same_bits(&few, &by_taps, "few rows against by taps");
                            few
                        });
                        for got in runs {
                            let what =
                                format!("c_in {c_in}, {:?}, mask {}", be.isa(), mask.is_some());
                            first_near_then_same_bits(&mut first, got, want, tol, &what);
                        }
                    }
                }
            }
        }
        // Sums of 3 x 128 x 128 products per output (f64: a few ulps per
        // term; f32: about 6e-8 per term grown with sqrt(terms)).
        check::<f64>(1e-12);
        check::<f32>(1e-4);
    }

    /// A group of weight-gradient k-blocks holds about 4 MiB of packed data
    /// and at least one block (no result depends on it, so only this test
    /// sees a wrong size).
    #[test]
    fn weight_gradient_groups_hold_about_4_mib() {
        assert_eq!(blocks_per_group::<f32>(1024), 1024);
        assert_eq!(blocks_per_group::<f64>(1024), 512);
        assert_eq!(blocks_per_group::<f32>(1000), 1048);
        assert_eq!(blocks_per_group::<f32>(2 << 20), 1);
        assert_eq!(blocks_per_group::<f32>(0), 4 << 20);
    }

    /// The weight gradient's choice of path: few rows up to `FEW_ROWS` taps
    /// (3 x 3 x 3 and 32 x 1 x 1 in, 3 x 3 x 4 and 33 x 1 x 1 out), and
    /// only where no mask has zeros for the general path to skip.
    #[test]
    fn few_rows_up_to_32_taps_where_no_mask_has_zeros() {
        let args = |c_in: usize, k: usize, mask: Option<InputMask<f32>>| ConvArgs {
            geom: ConvGeometry::new(&[2, c_in, 5, 6], &[4, c_in, k, k], [1, 1], [0, 0]).unwrap(),
            mask,
            relu: false,
        };
        let spatial =
            |v: f64| InputMask::Spatial(tensor(&[2, 5, 6], &[[0.5; 59].as_slice(), &[v]].concat()));
        let channel = |c: usize, v: f64| {
            let mut m = vec![0.5; 2 * c];
            m[2 * c - 1] = v;
            InputMask::Channel(tensor(&[2, c], &m))
        };
        for (c_in, k, mask, want) in [
            (3, 3, None, true),
            (4, 3, None, false),
            (32, 1, None, true),
            (33, 1, None, false),
            (3, 3, Some(spatial(0.25)), true),
            (3, 3, Some(spatial(0.0)), false),
            (3, 3, Some(channel(3, 0.25)), true),
            (3, 3, Some(channel(3, 0.0)), false),
        ] {
            let what = format!("{c_in} x {k} x {k}, mask {mask:?}");
            assert_eq!(takes_few_rows(&args(c_in, k, mask)), want, "{what}");
        }
    }

    /// Where the batch's padded copy reaches the threshold, the direct
    /// gradients pad one image at a time: the pool then gets back a copy of
    /// one image's planes, never the batch's; below it, the batch's. (The
    /// bits are the same either way: the test above runs both.) f64 planes
    /// of 129 x 133 with 8 channels are just above the pool's 1 MiB floor
    /// per image, sizes no other test asks for. A 1x1 conv without a mask
    /// copies nothing, so it never splits; with one it does.
    #[test]
    fn passes_pad_one_image_at_a_time_from_the_threshold_on() {
        use crate::pool;
        let [n, c, h, w] = [2, 8, 127, 131];
        let x_shape = [n, c, h, w];
        let len = |s: &[usize]| s.iter().product::<usize>();
        let x = tensor::<f64>(&x_shape, &values(len(&x_shape), 7));
        let spatial = InputMask::Spatial(tensor(&[n, h, w], &values(n * h * w, 8)));
        let channel = InputMask::Channel(tensor(&[n, c], &values(n * c, 9)));
        // With exact zeros, the top half of image 0 and the bottom half
        // of image 1: the passes then skip positions, reading each
        // image's own mask.
        let zeros: Vec<f64> = values(n * h * w, 12)
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let (img, row) = (i / (h * w), (i / w) % h);
                if (row < h / 2) == (img == 0) { 0.0 } else { v }
            })
            .collect();
        let holed = InputMask::Spatial(tensor(&[n, h, w], &zeros));
        for (kernel, pad, mask) in [
            (3, 1, None),
            (3, 1, Some(spatial)),
            (3, 1, Some(holed)),
            (1, 0, None),
            (1, 0, Some(channel)),
        ] {
            let w_shape = [c, c, kernel, kernel];
            let g = ConvGeometry::new(&x_shape, &w_shape, [1, 1], [pad, pad]).unwrap();
            let wt = tensor::<f64>(&w_shape, &values(len(&w_shape), 10));
            let dy = tensor::<f64>(&g.output_shape(), &values(len(&g.output_shape()), 11));
            let args = ConvArgs {
                geom: g,
                mask: mask.clone(),
                relu: false,
            };
            // Every pass's padded planes are (h + 2 pad) x (w + 2 pad).
            let one = c * (h + 2 * pad) * (w + 2 * pad);
            let batch = n * one;
            let copies = pad > 0 || mask.is_some();
            let bytes = batch * std::mem::size_of::<f64>();
            let mut outputs = Vec::new();
            for (threshold, split) in [(bytes, copies), (bytes + 1, false)] {
                let be = CpuBackend::with_isa(ConvAlgo::Direct, Isa::Scalar)
                    .unwrap()
                    .with_pad_per_image_above(threshold);
                let what = format!(
                    "{kernel}x{kernel}, mask {}, threshold {threshold}",
                    mask.is_some()
                );
                outputs.push([
                    be.conv2d(&x, &wt, None, &args).unwrap(),
                    be.conv2d_backward_input(&dy, &wt, &args).unwrap(),
                    be.conv2d_backward_weight(&dy, &x, &args).unwrap(),
                ]);
                // (Without padding the batch's copy has the length of the
                // tensors themselves, which return to the pool too: only
                // one image's copy tells there.)
                let one_held = pool::holds::<f64>(one);
                assert_eq!(one_held, copies && split, "{what}: one image's copy held");
                if pad > 0 {
                    let batch_held = pool::holds::<f64>(batch);
                    assert_eq!(batch_held, !split, "{what}: the batch's copy held");
                }
                for l in [one, batch] {
                    while pool::holds::<f64>(l) {
                        drop(pool::take::<f64>(l));
                    }
                }
            }
            // Per image or per batch, the same bits.
            for (split, whole) in outputs[0].iter().zip(&outputs[1]) {
                assert_same_bits(split, whole, &format!("{kernel}x{kernel}"));
            }
        }
    }

    /// Per image, how many of its `positions` are `dead(img, p)`: what the
    /// direct conv leaves out (it packs the others side by side in tiles).
    fn dead_positions(n: usize, positions: usize, dead: impl Fn(usize, usize) -> bool) -> Vec<u64> {
        (0..n)
            .map(|img| (0..positions).filter(|&p| dead(img, p)).count() as u64)
            .collect()
    }

    fn every_mask<T: Elem>(case: usize, geom: &Geom, tol: f64)
    where
        CpuBackend: Backend<T>,
    {
        let x_shape = geom.x;
        let [n, c, h, w] = x_shape;
        let w_shape = [geom.w[0], c, geom.w[1], geom.w[2]];
        let g = ConvGeometry::new(&x_shape, &w_shape, geom.stride, geom.padding).unwrap();
        let y_shape = g.output_shape();
        let len = |s: &[usize]| s.iter().product::<usize>();
        let (xv, wv, bv, dyv) = (
            values(len(&x_shape), 1),
            values(len(&w_shape), 2),
            values(w_shape[0], 3),
            values(len(&y_shape), 4),
        );
        let mut spatial = vec![0.0; n * h * w];
        for img in 0..n {
            for yy in 0..h {
                for xx in 0..w {
                    // Image 0 kept only in a corner and at its last
                    // position; image 1 masked on its first two rows and
                    // kept elsewhere with fractional factors (so some blocks
                    // of the weight gradient are masked and others not, the
                    // last block of image 0 is kept by its last position's
                    // receptive field alone, and image 1's live positions
                    // start past its first tiles: packed side by side,
                    // their tiles no longer line up with the output's).
                    spatial[(img * h + yy) * w + xx] = if img == 0 {
                        f64::from(u8::from(yy < 2 && xx < 3 || yy == h - 1 && xx == w - 1))
                    } else if yy < 2 {
                        0.0
                    } else {
                        0.5 + ((yy + xx) % 3) as f64 * 0.5
                    };
                }
            }
        }
        let real: Vec<f64> = values(n * c, 5).iter().map(|v| v + 1.5).collect();
        // Exact zeros (every third channel, channels 2 and 3, and all of
        // image 0 where there are two) and distinct kept factors, so a kept
        // channel scaled by another's factor, or an image read at another's
        // offset, shows. (With 32 channels, channel 3's 9 weight-gradient
        // rows end a panel of MR = 6 whose other rows are channel 2's, and
        // the next panel starts with channel 4, kept: the weight gradient
        // skips channel 3 through exactly its own panels.)
        let sparse: Vec<f64> = (0..n * c)
            .map(|i| {
                if (n > 1 && i < c) || i % 3 == 1 || matches!(i % c, 2 | 3) {
                    0.0
                } else {
                    0.5 + (i % 5) as f64 * 0.25
                }
            })
            .collect();
        // Whether output position `p` of image `img` reads a nonzero of
        // spatial mask `spatial` through tap `t` (`ky * kw + kx`; taps in
        // the padding read zeros), and whether it reads only zeros.
        let ow = y_shape[3];
        let reads_kept = |spatial: &[f64], img: usize, p: usize, t: usize| {
            let (oy, ox) = (p / ow, p % ow);
            let (ky, kx) = (t / geom.w[2], t % geom.w[2]);
            let iy = (oy * geom.stride[0] + ky).checked_sub(geom.padding[0]);
            let ix = (ox * geom.stride[1] + kx).checked_sub(geom.padding[1]);
            match (iy, ix) {
                (Some(iy), Some(ix)) if iy < h && ix < w => spatial[(img * h + iy) * w + ix] != 0.0,
                _ => false,
            }
        };
        let reads_only_zeros = |spatial: &[f64], img: usize, p: usize| {
            (0..geom.w[1] * geom.w[2]).all(|t| !reads_kept(spatial, img, p, t))
        };
        let zeros = sparse.iter().filter(|&&v| v == 0.0).count() as u64;
        // Weights packed per pass (forward, input gradient, weight
        // gradient), dense and under the sparse channel mask: the dense
        // passes pack all of them above `PACK_WEIGHTS_ABOVE` output
        // positions (the input gradient's are the input's) and read them in
        // place otherwise; the sparse ones pack each image's kept channels
        // (columns forward, rows of the input gradient), none for an image
        // that keeps none.
        let (m, taps) = (w_shape[0], geom.w[1] * geom.w[2]);
        let above = |positions: usize| u64::from(positions > PACK_WEIGHTS_ABOVE);
        let all = (m * c * taps) as u64;
        let kept: u64 = (0..n * c).filter(|&i| sparse[i] != 0.0).count() as u64;
        let packed = [
            [
                above(n * y_shape[2] * y_shape[3]) * all,
                above(n * h * w) * all,
                0,
            ],
            [kept * (m * taps) as u64, kept * (m * taps) as u64, 0],
        ];
        // A spatial mask with no zero skips nothing.
        let dense: Vec<f64> = values(n * h * w, 6).iter().map(|v| v + 1.5).collect();
        // And one that keeps nothing: every tile and block skipped.
        let nothing = vec![0.0; n * h * w];
        let masks = [
            None,
            Some(InputMask::Spatial(tensor(&[n, h, w], &spatial))),
            Some(InputMask::Channel(tensor(&[n, c], &real))),
            Some(InputMask::Channel(tensor(&[n, c], &sparse))),
            Some(InputMask::Spatial(tensor(&[n, h, w], &dense))),
            Some(InputMask::Spatial(tensor(&[n, h, w], &nothing))),
        ];
        // The spatial masks' values, and which of them have zeros.
        let spatial_values = |mi: usize| match mi {
            1 => Some(&spatial),
            4 => Some(&dense),
            5 => Some(&nothing),
            _ => None,
        };
        let with_zeros = |mi: usize| mi == 1 || mi == 5;
        // The weight gradient's k-blocks: (image, output positions) of each;
        // under a spatial mask with zeros, pieces of one row each.
        let oh = y_shape[2];
        let dw_blocks_of = |one_row: bool| -> Vec<(usize, Vec<usize>)> {
            let kc = if one_row {
                super::SPARSE_DW_COLS
            } else {
                super::kc_dw::<T>()
            };
            super::dw_blocks(n, oh, ow, kc, one_row)
                .iter()
                .map(|r| {
                    let rows = r.oy0..r.oy0 + r.nrows;
                    let pos =
                        rows.flat_map(|oy| (r.ox0..r.ox0 + r.ncols).map(move |ox| oy * ow + ox));
                    (r.img, pos.collect())
                })
                .collect()
        };
        // The weight gradient's rows `(ci, ky, kx)`; under the sparse
        // channel mask, those image `img` keeps.
        let rows = c * taps;
        let kept_rows = |img: usize| {
            (0..rows)
                .filter(|&j| sparse[img * c + j / taps] != 0.0)
                .count()
        };
        let b_shape = [w_shape[0]];
        // The operands in f64 (the reference's) and in T (the kernels').
        let (x64, w64, b64, dy64) = (
            tensor::<f64>(&x_shape, &xv),
            tensor::<f64>(&w_shape, &wv),
            tensor::<f64>(&b_shape, &bv),
            tensor::<f64>(&y_shape, &dyv),
        );
        let (x, wt, b, dy) = (
            tensor::<T>(&x_shape, &xv),
            tensor::<T>(&w_shape, &wv),
            tensor::<T>(&b_shape, &bv),
            tensor::<T>(&y_shape, &dyv),
        );
        for (mi, mask) in masks.iter().enumerate() {
            // Weight-gradient blocks: dropped where every position's
            // receptive field is masked. Multiply-adds: per block run, the
            // rows x output channels x the block's positions, where the
            // rows are the image's kept ones under the sparse channel mask
            // (whatever panels they lie in); under a spatial mask with
            // zeros, per panel, only the positions from the first to the
            // last where one of the panel's rows reads a nonzero (none: the
            // panel is skipped).
            let dw_blocks = dw_blocks_of(with_zeros(mi));
            let is_dropped = |img: usize, pos: &[usize]| {
                with_zeros(mi)
                    && pos
                        .iter()
                        .all(|&p| reads_only_zeros(spatial_values(mi).unwrap(), img, p))
            };
            let dropped = dw_blocks
                .iter()
                .filter(|(img, pos)| is_dropped(*img, pos))
                .count() as u64;
            let panel_positions = |img: usize, pos: &[usize], p: usize| {
                if !with_zeros(mi) {
                    return pos.len();
                }
                let panel_rows = p * MR..((p + 1) * MR).min(rows);
                let live: Vec<usize> = (0..pos.len())
                    .filter(|&i| {
                        panel_rows
                            .clone()
                            .any(|j| reads_kept(spatial_values(mi).unwrap(), img, pos[i], j % taps))
                    })
                    .collect();
                live.last().map_or(0, |&last| last + 1 - live[0])
            };
            let dw_macs: u64 = dw_blocks
                .iter()
                .filter(|(img, pos)| !is_dropped(*img, pos))
                .map(|(img, pos)| match mi {
                    3 => (kept_rows(*img) * m * pos.len()) as u64,
                    _ => (0..rows.div_ceil(MR))
                        .map(|p| (MR.min(rows - p * MR) * m * panel_positions(*img, pos, p)) as u64)
                        .sum::<u64>(),
                })
                .sum();
            let dw_work = [dw_blocks.len() as u64 - dropped, dropped, dw_macs];
            for relu in [false, true] {
                let a64 = ConvArgs {
                    geom: g,
                    mask: mask.clone(),
                    relu,
                };
                let at: ConvArgs<T> = ConvArgs {
                    geom: g,
                    mask: mask.as_ref().map(InputMask::cast),
                    relu,
                };
                let r = ReferenceBackend;
                let want = [
                    r.conv2d(&x64, &w64, Some(&b64), &a64).unwrap(),
                    r.conv2d_backward_input(&dy64, &w64, &a64).unwrap(),
                    r.conv2d_backward_weight(&dy64, &x64, &a64).unwrap(),
                    r.conv2d_backward_bias(&dy64).unwrap(),
                ];
                let mut first: [Option<Vec<T>>; 4] = Default::default();
                for be in direct_backends() {
                    let isa = be.isa();
                    for threads in [1, 2, 3] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        be.reset_counters();
                        let got = pool.install(|| {
                            [
                                be.conv2d(&x, &wt, Some(&b), &at).unwrap(),
                                be.conv2d_backward_input(&dy, &wt, &at).unwrap(),
                                be.conv2d_backward_weight(&dy, &x, &at).unwrap(),
                                be.conv2d_backward_bias(&dy).unwrap(),
                            ]
                        });
                        // Every pass counts each masked (image, channel)
                        // pair it leaves out.
                        let counted = be.counters();
                        for pc in [counted.forward, counted.input_grad, counted.weight_grad] {
                            let sparse_call = u64::from(mi == 3);
                            assert_eq!(pc.channel_sparse_calls, sparse_call, "mask {mi}");
                            assert_eq!(pc.channels_skipped, sparse_call * zeros, "mask {mi}");
                        }
                        let dw = counted.weight_grad;
                        assert_eq!(
                            [dw.tiles, dw.tiles_skipped, dw.macs],
                            dw_work,
                            "mask {mi}: weight-gradient blocks run, dropped, multiply-adds"
                        );
                        // Calls that test tiles against a spatial mask: the
                        // input gradient under any, forward and weight
                        // gradient only under one with zeros.
                        let spatial_calls = [
                            (counted.forward, with_zeros(mi)),
                            (counted.input_grad, spatial_values(mi).is_some()),
                            (counted.weight_grad, with_zeros(mi)),
                        ];
                        for (pass, (pc, tested)) in spatial_calls.iter().enumerate() {
                            let want = u64::from(*tested);
                            assert_eq!(pc.spatial_skip_calls, want, "mask {mi}, pass {pass}");
                        }
                        // (Skipped tiles are counted exactly below; the
                        // mask of nothing makes sure there are some.)
                        let dx_skipped = counted.input_grad.tiles_skipped;
                        if mi == 5 || !with_zeros(mi) {
                            assert_eq!(dx_skipped > 0, with_zeros(mi), "mask {mi}");
                        }
                        // Per image, the live positions (not dead) packed
                        // into whole tiles of `nr`, and the tiles of the
                        // dense pass left out; each live position's sums
                        // over the image's kept channels (all but the
                        // sparse mask's zeros): forward `m` outputs from
                        // `kept * taps` terms, input gradient `kept` rows
                        // from `m * taps`.
                        let nr = nr_for::<T>(isa.arch().unwrap());
                        let none = vec![0; n];
                        let (fwd_dead, dx_dead) = match mask {
                            Some(InputMask::Spatial(_)) => (
                                dead_positions(n, y_shape[2] * y_shape[3], |img, p| {
                                    with_zeros(mi)
                                        && reads_only_zeros(spatial_values(mi).unwrap(), img, p)
                                }),
                                dead_positions(n, h * w, |img, p| {
                                    spatial_values(mi).unwrap()[img * h * w + p] == 0.0
                                }),
                            ),
                            _ => (none.clone(), none),
                        };
                        let kept_in = |img: usize| {
                            let kept = (0..c).filter(|&ci| sparse[img * c + ci] != 0.0).count();
                            (if mi == 3 { kept } else { c }) as u64
                        };
                        // (An image that keeps no channel runs no tiles.)
                        let count = |dead: &[u64], positions: usize| {
                            let mut out = [0; 3];
                            for img in (0..n).filter(|&img| kept_in(img) > 0) {
                                let live = positions as u64 - dead[img];
                                let tiles = live.div_ceil(nr as u64);
                                out[0] += tiles;
                                out[1] += positions.div_ceil(nr) as u64 - tiles;
                                out[2] += kept_in(img) * (m * taps) as u64 * live;
                            }
                            out
                        };
                        let pc = |p: PassCounters| [p.tiles, p.tiles_skipped, p.macs];
                        assert_eq!(
                            [pc(counted.forward), pc(counted.input_grad)],
                            [
                                count(&fwd_dead, y_shape[2] * y_shape[3]),
                                count(&dx_dead, h * w)
                            ],
                            "mask {mi}: tiles computed, skipped, multiply-adds"
                        );
                        assert_eq!(
                            [
                                counted.forward.weights_packed,
                                counted.input_grad.weights_packed,
                                counted.weight_grad.weights_packed
                            ],
                            packed[usize::from(mi == 3)],
                            "mask {mi}: weights packed"
                        );
                        for (pass, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(g.shape(), e.shape());
                            first_near_then_same_bits(
                                &mut first[pass],
                                g.to_vec(),
                                || e.to_vec(),
                                tol,
                                &format!(
                                    "geometry {case}, mask {mi}, relu {relu}, pass {pass} \
                                     ({isa:?}, {threads} threads)"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}
