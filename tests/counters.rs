//! The CPU backend's work counters: every convolution path gives the same
//! bits by design, so these tests are what notices when mask skipping,
//! weight packing or the algorithm choice quietly changes.
//!
//! Every expected count is computed here from the shapes and masks, with
//! loops of its own, never by calling the backend's code: the MACs of a
//! dense conv, the share a channel mask removes, which tiles a spatial
//! mask zeroes (from the public tile sizes), where `Auto` picks Winograd
//! and where the weights are packed (from the public thresholds).
//!
//! Each test uses its own `CpuBackend`, whose counters no other test sees.

use crate::common;

use common::fill;
use dmkd::backend::cpu::{
    PACK_WEIGHTS_ABOVE, PassCounters, WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_POSITIONS, WINOGRAD_TILE,
    WINOGRAD6_MIN_POSITIONS, WINOGRAD6_TILE, WorkCounters,
};
use dmkd::backend::{Backend, ConvArgs, ConvGeometry, CpuBackend};
use dmkd::{ConvAlgo, Float, InputMask, Tensor};

/// Multiply-adds per output of Winograd F(4x4, 3x3): one 36-position
/// elementwise product per tile and channel pair.
const POS: u64 = 36;
/// Positions of an F(6x6) tile (8 x 8).
const POS6: u64 = 64;

/// One convolution problem: `x [n, c_in, h, w]`, `c_out x c_in x k x k`
/// weights.
#[derive(Clone, Copy, Debug)]
struct Conv {
    n: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Conv {
    fn same3(n: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> Conv {
        Conv {
            n,
            c_in,
            c_out,
            h,
            w,
            k: 3,
            stride: 1,
            pad: 1,
        }
    }
    fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    fn taps(&self) -> usize {
        self.k * self.k
    }
    fn args<T: Float>(&self, mask: Option<InputMask<T>>) -> ConvArgs<T> {
        ConvArgs {
            geom: ConvGeometry::new(
                &[self.n, self.c_in, self.h, self.w],
                &[self.c_out, self.c_in, self.k, self.k],
                [self.stride; 2],
                [self.pad; 2],
            )
            .unwrap(),
            mask,
            relu: true,
        }
    }
    /// Winograd tiles per image.
    fn wino_tiles(&self) -> usize {
        self.h.div_ceil(WINOGRAD_TILE) * self.w.div_ceil(WINOGRAD_TILE)
    }
}

/// Run the forward pass, the input gradient and the weight gradient once
/// on a fresh backend; their counters.
fn run<T: Float>(algo: ConvAlgo, conv: &Conv, mask: Option<InputMask<T>>) -> WorkCounters
where
    CpuBackend: Backend<T>,
{
    let be = CpuBackend::new(algo);
    let args = conv.args(mask);
    let x = fill::<T>(&[conv.n, conv.c_in, conv.h, conv.w], 1);
    let w = fill::<T>(&[conv.c_out, conv.c_in, conv.k, conv.k], 2);
    let b = fill::<T>(&[conv.c_out], 3);
    let dy = fill::<T>(&[conv.n, conv.c_out, conv.oh(), conv.ow()], 4);
    be.conv2d(&x, &w, Some(&b), &args).unwrap();
    be.conv2d_backward_input(&dy, &w, &args).unwrap();
    be.conv2d_backward_weight(&dy, &x, &args).unwrap();
    be.counters()
}

fn channel_mask<T: Float>(conv: &Conv, zeros: &[Vec<usize>]) -> InputMask<T> {
    let c = conv.c_in;
    // Kept channels get values other than 1, so a mask is not mistaken
    // for "no mask" by value.
    InputMask::Channel(
        Tensor::from_fn(&[conv.n, c], |i| {
            let (img, ci) = (i / c, i % c);
            if zeros[img].contains(&ci) {
                T::zero()
            } else {
                T::from_f64(0.5 + 0.25 * (ci % 3) as f64)
            }
        })
        .unwrap(),
    )
}

fn spatial_mask<T: Float>(conv: &Conv, value: &dyn Fn(usize, usize, usize) -> f64) -> InputMask<T> {
    let (h, w) = (conv.h, conv.w);
    InputMask::Spatial(
        Tensor::from_fn(&[conv.n, h, w], |i| {
            T::from_f64(value(i / (h * w), i % (h * w) / w, i % w))
        })
        .unwrap(),
    )
}

#[test]
fn dense_counts_are_the_textbook_work() {
    let conv = Conv::same3(2, 13, 10, 9, 11);
    let (n, ci, co, hw) = (2u64, 13u64, 10u64, 99u64);
    // Direct: every output channel x tap x position, each pass.
    let d = run::<f32>(ConvAlgo::Direct, &conv, None);
    for p in [&d.forward, &d.input_grad, &d.weight_grad] {
        assert_eq!(p.macs, n * co * ci * 9 * hw, "{p:?}");
        assert_eq!((p.direct_calls, p.winograd_calls), (1, 0));
        assert_eq!((p.tiles_skipped, p.channels_skipped), (0, 0));
        assert_eq!((p.channel_sparse_calls, p.spatial_skip_calls), (0, 0));
    }
    let nr = CpuBackend::default()
        .direct_tile_positions::<f32>()
        .unwrap();
    assert_eq!(d.forward.tiles, n * 99u64.div_ceil(nr as u64));
    assert_eq!(d.input_grad.tiles, n * 99u64.div_ceil(nr as u64));
    assert!(d.weight_grad.tiles >= n, "{:?}", d.weight_grad);
    // Winograd: 36 products per tile and channel pair.
    let t = conv.wino_tiles() as u64;
    assert_eq!(t, 9);
    let wg = run::<f32>(ConvAlgo::Winograd, &conv, None);
    for p in [&wg.forward, &wg.input_grad, &wg.weight_grad] {
        assert_eq!(p.macs, POS * co * ci * t * n, "{p:?}");
        assert_eq!((p.direct_calls, p.winograd_calls), (0, 1));
        assert_eq!(p.tiles, n * t);
        assert_eq!((p.tiles_skipped, p.channels_skipped), (0, 0));
        assert_eq!((p.channel_sparse_calls, p.spatial_skip_calls), (0, 0));
    }
    // Winograd packs its transformed weights for the forward pass and
    // the input gradient; its weight gradient packs none.
    assert_eq!(wg.forward.weights_packed, POS * co * ci);
    assert_eq!(wg.input_grad.weights_packed, POS * co * ci);
    assert_eq!(wg.weight_grad.weights_packed, 0);
    assert_eq!(wg.total().winograd6_calls, 0);
    // F(6x6): 64 products per 6x6 tile and channel pair (2 x 2 tiles of a
    // 9 x 11 plane), each pass; the weight gradient packs no weights.
    let t6 = (conv.h.div_ceil(WINOGRAD6_TILE) * conv.w.div_ceil(WINOGRAD6_TILE)) as u64;
    assert_eq!(t6, 4);
    let w6 = run::<f32>(ConvAlgo::Winograd6, &conv, None);
    for p in [&w6.forward, &w6.input_grad, &w6.weight_grad] {
        assert_eq!(p.macs, POS6 * co * ci * t6 * n, "{p:?}");
        assert_eq!(
            (p.direct_calls, p.winograd_calls, p.winograd6_calls),
            (0, 1, 1)
        );
        assert_eq!(p.tiles, n * t6);
    }
    assert_eq!(w6.forward.weights_packed, POS6 * co * ci);
    assert_eq!(w6.input_grad.weights_packed, POS6 * co * ci);
    assert_eq!(w6.weight_grad.weights_packed, 0);
    // f64 has its own kernels and tile width.
    let d64 = run::<f64>(ConvAlgo::Direct, &conv, None);
    assert_eq!(d64.forward.macs, d.forward.macs);
    assert_eq!(d64.weight_grad.macs, d.weight_grad.macs);
    let nr64 = CpuBackend::default()
        .direct_tile_positions::<f64>()
        .unwrap() as u64;
    assert_eq!(d64.input_grad.tiles, n * 99u64.div_ceil(nr64));
}

/// A channel mask with k zeros removes exactly k / C of the forward's and
/// of the input gradient's multiply-adds (per image: the masked input
/// channels leave the reduction, the masked input-gradient rows are not
/// computed), for both algorithms and element types.
#[test]
fn a_channel_mask_removes_exactly_its_share_of_the_work() {
    // 13 input channels: 117 weight-gradient rows, a partial last panel.
    let conv = Conv::same3(2, 13, 10, 9, 11);
    let zeros = vec![vec![0, 1, 5, 12], vec![2, 3, 4, 7, 8, 9]];
    let kept: Vec<usize> = zeros.iter().map(|z| conv.c_in - z.len()).collect();
    let masked_pairs = (zeros[0].len() + zeros[1].len()) as u64;
    let kept_total = (kept[0] + kept[1]) as u64;
    let all = (conv.n * conv.c_in) as u64;
    let p = (conv.h * conv.w) as u64;
    let co = conv.c_out as u64;
    for algo in [ConvAlgo::Direct, ConvAlgo::Winograd] {
        let dense = run::<f32>(algo, &conv, None);
        let sparse = run::<f32>(algo, &conv, Some(channel_mask(&conv, &zeros)));
        let sparse64 = run::<f64>(algo, &conv, Some(channel_mask(&conv, &zeros)));
        for (pass, d, s) in [
            ("forward", &dense.forward, &sparse.forward),
            ("input_grad", &dense.input_grad, &sparse.input_grad),
        ] {
            assert_eq!(s.macs * all, d.macs * kept_total, "{algo:?} {pass}");
            assert!(s.macs < d.macs);
            assert_eq!(s.channels_skipped, masked_pairs, "{algo:?} {pass}");
            assert_eq!(s.channel_sparse_calls, 1, "{algo:?} {pass}");
            assert_eq!(s.tiles_skipped, 0);
        }
        // f64 runs its own kernels (another tile width): the same work.
        for (a, b) in [
            (&sparse.forward, &sparse64.forward),
            (&sparse.input_grad, &sparse64.input_grad),
            (&sparse.weight_grad, &sparse64.weight_grad),
        ] {
            assert_eq!(
                (a.macs, a.channels_skipped, a.weights_packed),
                (b.macs, b.channels_skipped, b.weights_packed),
                "{algo:?} f64"
            );
        }
        // Packed weights: the kept channels' filters of each image.
        let per_filter = match algo {
            ConvAlgo::Winograd => POS,
            _ => 9,
        };
        assert_eq!(sparse.forward.weights_packed, per_filter * co * kept_total);
        assert_eq!(
            sparse.input_grad.weights_packed,
            per_filter * co * kept_total
        );
        // Weight gradient.
        let s = &sparse.weight_grad;
        assert_eq!(s.channel_sparse_calls, 1, "{algo:?}");
        // Per image over its kept channels only: Winograd's sums, and the
        // direct path's weight-gradient rows (ci, ky, kx) of the kept
        // channels, six at a time whatever panels they lie in
        // (channel 5 of image 0 shares a panel with the kept channel 4 and
        // is still left out).
        let per_channel = match algo {
            ConvAlgo::Winograd => POS * conv.wino_tiles() as u64,
            _ => 9 * p,
        };
        assert_eq!(s.macs, per_channel * co * kept_total, "{algo:?}");
        assert!(s.macs < dense.weight_grad.macs);
        assert_eq!(s.channels_skipped, masked_pairs, "{algo:?}");
    }
}

/// A channel mask without exact zeros (or no mask at all) takes the dense
/// path: nothing skipped, weights packed once (not per image).
#[test]
fn a_channel_mask_without_zeros_takes_the_dense_path() {
    // 2 x 7 x 45 = 630 output positions: the dense direct path packs.
    let conv = Conv::same3(2, 13, 10, 7, 45);
    assert!(conv.n * conv.h * conv.w > PACK_WEIGHTS_ABOVE);
    let (ci, co) = (conv.c_in as u64, conv.c_out as u64);
    for algo in [ConvAlgo::Direct, ConvAlgo::Winograd] {
        let dense = run::<f32>(algo, &conv, None);
        let ones = run::<f32>(algo, &conv, Some(channel_mask(&conv, &[vec![], vec![]])));
        for (d, s) in [
            (&dense.forward, &ones.forward),
            (&dense.input_grad, &ones.input_grad),
            (&dense.weight_grad, &ones.weight_grad),
        ] {
            assert_eq!(d, s, "{algo:?}");
            assert_eq!((s.channel_sparse_calls, s.channels_skipped), (0, 0));
        }
        let per_filter = if algo == ConvAlgo::Winograd { POS } else { 9 };
        assert_eq!(ones.forward.weights_packed, per_filter * co * ci);
        assert_eq!(ones.input_grad.weights_packed, per_filter * co * ci);
    }
    // Below the packing threshold the dense direct path packs nothing
    // (the channel-sparse one would, per image).
    let small = Conv::same3(2, 13, 10, 5, 7);
    let ones = run::<f32>(
        ConvAlgo::Direct,
        &small,
        Some(channel_mask(&small, &[vec![], vec![]])),
    );
    assert_eq!(ones.forward.weights_packed, 0);
    assert_eq!(ones.input_grad.weights_packed, 0);
}

/// Every image's channels all masked: no products at all.
#[test]
fn a_fully_masked_channel_mask_computes_nothing() {
    let conv = Conv::same3(2, 16, 16, 8, 8);
    let all: Vec<usize> = (0..16).collect();
    for algo in [ConvAlgo::Direct, ConvAlgo::Winograd] {
        let c = run::<f32>(
            algo,
            &conv,
            Some(channel_mask(&conv, &[all.clone(), all.clone()])),
        );
        for p in [&c.forward, &c.input_grad, &c.weight_grad] {
            assert_eq!(p.macs, 0, "{algo:?} {p:?}");
            assert_eq!(p.channels_skipped, 32, "{algo:?} {p:?}");
            assert_eq!(p.channel_sparse_calls, 1);
            assert_eq!(p.weights_packed, 0);
        }
    }
}

/// The direct conv's tiles of `len` positions over an `n x plane` position
/// space under a spatial mask, where `dead(img, pos)` says which positions
/// it leaves out: per image the live ones are packed side by side, the
/// dense pass's tiles less those are spared. (tiles computed, tiles
/// spared, dead positions).
fn live_tiles(
    n: usize,
    plane: usize,
    len: usize,
    dead: impl Fn(usize, usize) -> bool,
) -> (u64, u64, u64) {
    let (mut tiles, mut spared, mut positions) = (0, 0, 0);
    for img in 0..n {
        let d = (0..plane).filter(|&p| dead(img, p)).count();
        let computed = (plane - d).div_ceil(len);
        tiles += computed as u64;
        spared += (plane.div_ceil(len) - computed) as u64;
        positions += d as u64;
    }
    (tiles, spared, positions)
}

/// Winograd tiles (of side `tsz`) of an image, and which of them have all
/// of a region (outputs `tsz ty .. tsz ty + tsz` grown by `grow` on each
/// side, clipped to the plane) masked: (tiles, skipped tiles).
fn wino_tiles(
    conv: &Conv,
    tsz: usize,
    m: &dyn Fn(usize, usize, usize) -> f64,
    grow: usize,
) -> (u64, u64) {
    let (mut tiles, mut skipped) = (0, 0);
    for img in 0..conv.n {
        for ty in 0..conv.h.div_ceil(tsz) {
            for tx in 0..conv.w.div_ceil(tsz) {
                tiles += 1;
                let ys = (ty * tsz).saturating_sub(grow)..(ty * tsz + tsz + grow).min(conv.h);
                let xs = (tx * tsz).saturating_sub(grow)..(tx * tsz + tsz + grow).min(conv.w);
                if ys.clone().all(|y| xs.clone().all(|x| m(img, y, x) == 0.0)) {
                    skipped += 1;
                }
            }
        }
    }
    (tiles, skipped)
}

/// A mask with fully masked regions: image 0 the bottom rows from `h/2`
/// plus scattered zeros, image 1 the left 4 columns (one Winograd output
/// tile wide, narrower than its input window) and a few zeros; the rest
/// 0.5 .. 1.
fn blob(h: usize) -> impl Fn(usize, usize, usize) -> f64 {
    move |img, y, x| {
        let masked = match img {
            0 => y >= h / 2 || (y * 7 + x * 3) % 5 == 0,
            _ => x < 4 || (y * 3 + x) % 7 == 0,
        };
        if masked {
            0.0
        } else {
            0.5 + ((y + x) % 3) as f64 * 0.25
        }
    }
}

/// A spatial mask leaves out exactly the positions its zeros make zero,
/// and the direct conv packs the others into whole tiles of
/// `direct_tile_positions`: forward, a position whose whole receptive
/// field is masked (the padding counts as masked); input gradient, a
/// position whose own mask value is 0.
#[test]
fn a_spatial_mask_leaves_out_exactly_the_masked_direct_positions() {
    for conv in [
        Conv::same3(2, 5, 7, 11, 23),
        // Strided and unpadded: receptive fields of 3 x 3 at stride 2.
        Conv {
            n: 2,
            c_in: 3,
            c_out: 4,
            h: 20,
            w: 17,
            k: 3,
            stride: 2,
            pad: 0,
        },
    ] {
        let m = blob(conv.h);
        let c = run::<f32>(ConvAlgo::Direct, &conv, Some(spatial_mask(&conv, &m)));
        let nr = CpuBackend::default()
            .direct_tile_positions::<f32>()
            .unwrap();
        let (oh, ow) = (conv.oh(), conv.ow());
        let field_masked = |img: usize, p: usize| {
            let (oy, ox) = (p / ow, p % ow);
            (0..conv.k).all(|ky| {
                (0..conv.k).all(|kx| {
                    let (iy, ix) = (
                        (oy * conv.stride + ky) as isize - conv.pad as isize,
                        (ox * conv.stride + kx) as isize - conv.pad as isize,
                    );
                    let inside =
                        iy >= 0 && ix >= 0 && (iy as usize) < conv.h && (ix as usize) < conv.w;
                    !inside || m(img, iy as usize, ix as usize) == 0.0
                })
            })
        };
        let (tiles, skipped, positions) = live_tiles(conv.n, oh * ow, nr, field_masked);
        let f = &c.forward;
        assert!(skipped > 0 && tiles > 0, "{conv:?}: {skipped} and {tiles}");
        assert_eq!((f.tiles, f.tiles_skipped), (tiles, skipped), "{conv:?}");
        let k = (conv.c_in * conv.taps()) as u64;
        let all = (conv.n * oh * ow) as u64;
        assert_eq!(
            f.macs,
            conv.c_out as u64 * k * (all - positions),
            "{conv:?}"
        );
        assert_eq!(f.spatial_skip_calls, 1);
        // The input gradient: tiles over the input plane.
        let (hh, ww) = (conv.h, conv.w);
        let own_masked = |img: usize, p: usize| m(img, p / ww, p % ww) == 0.0;
        let (tiles, skipped, positions) = live_tiles(conv.n, hh * ww, nr, own_masked);
        let d = &c.input_grad;
        assert!(skipped > 0 && tiles > 0, "{conv:?}");
        assert_eq!((d.tiles, d.tiles_skipped), (tiles, skipped), "{conv:?}");
        if conv.stride == 1 {
            // Stride 1: the output gradient padded, `c_out x taps` per row.
            let k = (conv.c_out * conv.taps()) as u64;
            let all = (conv.n * hh * ww) as u64;
            assert_eq!(d.macs, conv.c_in as u64 * k * (all - positions));
        }
        assert_eq!(d.spatial_skip_calls, 1);
    }
}

/// The direct weight gradient leaves out blocks of its reduction whose
/// positions all have a fully masked receptive field: with image 0 all
/// masked, exactly image 0's share. (Unpadded, so that image 1's taps all
/// read inside it: with padding, a row panel whose taps read only the
/// padding on a border row is left out too, which the lib test counts.)
#[test]
fn a_spatial_mask_drops_the_masked_reduction_blocks_of_the_weight_gradient() {
    let conv = Conv {
        pad: 0,
        ..Conv::same3(2, 5, 7, 30, 40)
    };
    let half = |img: usize, _: usize, x: usize| if img == 0 { 0.0 } else { 0.5 + (x % 2) as f64 };
    let c = run::<f32>(ConvAlgo::Direct, &conv, Some(spatial_mask(&conv, &half)));
    let d = run::<f32>(ConvAlgo::Direct, &conv, None);
    let w = &c.weight_grad;
    assert_eq!(w.macs * 2, d.weight_grad.macs);
    assert_eq!(
        w.macs,
        (conv.c_in * 9 * conv.c_out * conv.oh() * conv.ow()) as u64
    );
    // Under a spatial mask with zeros the blocks are pieces of one row: at
    // least one per row of image 1, more than the dense pass's.
    assert_eq!(w.tiles, w.tiles_skipped);
    assert!(w.tiles >= conv.oh() as u64, "{w:?}");
    assert!(w.tiles > d.weight_grad.tiles, "{w:?}");
    assert_eq!(w.spatial_skip_calls, 1);
    // And a mask without zeros drops nothing (and tests nothing).
    let c = run::<f32>(
        ConvAlgo::Direct,
        &conv,
        Some(spatial_mask(&conv, &|_, _, _| 0.5)),
    );
    assert_eq!(c.weight_grad, d.weight_grad);
    assert_eq!(
        (c.forward.spatial_skip_calls, c.forward.tiles_skipped),
        (0, 0)
    );
    assert_eq!(c.forward.macs, d.forward.macs);
    assert_eq!(
        (c.input_grad.tiles_skipped, c.input_grad.macs),
        (0, d.input_grad.macs)
    );
}

/// Winograd: forward and weight gradient skip the tiles whose input window
/// (6 x 6 for F(4x4), 8 x 8 for F(6x6)) is all masked, the input gradient
/// those whose outputs are.
#[test]
fn a_spatial_mask_skips_exactly_the_fully_masked_winograd_tiles() {
    let conv = Conv::same3(2, 5, 7, 18, 23);
    let m = blob(conv.h);
    let (ci, co) = (conv.c_in as u64, conv.c_out as u64);
    for (algo, tsz, npos) in [
        (ConvAlgo::Winograd, WINOGRAD_TILE, POS),
        (ConvAlgo::Winograd6, WINOGRAD6_TILE, POS6),
    ] {
        let c = run::<f32>(algo, &conv, Some(spatial_mask(&conv, &m)));
        let (tiles, by_window) = wino_tiles(&conv, tsz, &m, 1);
        let (_, by_outputs) = wino_tiles(&conv, tsz, &m, 0);
        assert!(0 < by_window && by_window <= by_outputs && by_outputs < tiles);
        // F(4x4)'s tiles also tell the two rules apart.
        assert!(algo == ConvAlgo::Winograd6 || by_window < by_outputs);
        for (pass, p, skipped) in [
            ("forward", &c.forward, by_window),
            ("input_grad", &c.input_grad, by_outputs),
            ("weight_grad", &c.weight_grad, by_window),
        ] {
            assert_eq!(
                (p.tiles, p.tiles_skipped),
                (tiles - skipped, skipped),
                "{algo:?} {pass}"
            );
            assert_eq!(
                p.macs,
                npos * co * ci * (tiles - skipped),
                "{algo:?} {pass}"
            );
            assert_eq!(p.spatial_skip_calls, 1, "{algo:?} {pass}");
            assert_eq!(p.winograd_calls, 1, "{algo:?} {pass}");
        }
    }
    let (tiles, _) = wino_tiles(&conv, WINOGRAD_TILE, &m, 1);
    // A mask without zeros skips nothing; the weight gradient does not
    // even test its tiles.
    let c = run::<f32>(
        ConvAlgo::Winograd,
        &conv,
        Some(spatial_mask(&conv, &|_, _, _| 0.5)),
    );
    for p in [&c.forward, &c.input_grad, &c.weight_grad] {
        assert_eq!((p.tiles, p.tiles_skipped), (tiles, 0));
    }
    assert_eq!(c.weight_grad.spatial_skip_calls, 0);
}

/// `Auto` runs Winograd exactly where its rule says: f32, a 3x3 stride-1
/// pad-1 conv with at least `WINOGRAD_MIN_CHANNELS` input and output
/// channels, and at least `WINOGRAD_MIN_POSITIONS` output positions for
/// the forward pass and input gradient, half of it for the weight
/// gradient. `Winograd` runs it for every 3x3 stride-1 pad-1 conv,
/// `Direct` never.
#[test]
fn auto_picks_winograd_exactly_where_its_rule_says() {
    let (pmin, cmin) = (WINOGRAD_MIN_POSITIONS, WINOGRAD_MIN_CHANNELS);
    // (conv, f64?, Winograd for [forward, input grad, weight grad]).
    let row = |n, c_in, c_out, w| Conv::same3(n, c_in, c_out, 1, w);
    let cases = [
        (row(1, cmin, cmin, pmin), false, [true; 3]),
        (row(2, cmin, cmin, pmin / 2), false, [true; 3]),
        (row(1, cmin, cmin, pmin - 1), false, [false, false, true]),
        (
            row(1, cmin, cmin + 5, pmin / 2),
            false,
            [false, false, true],
        ),
        (row(1, cmin, cmin, pmin / 2 - 1), false, [false; 3]),
        // Positions count images, rows and columns alike.
        (Conv::same3(2, cmin, cmin, 2, pmin / 4), false, [true; 3]),
        (
            Conv::same3(1, cmin, cmin, 2, pmin / 2 - 1),
            false,
            [false, false, true],
        ),
        (
            Conv::same3(2, cmin, cmin, 4, pmin / 8 - 1),
            false,
            [false, false, true],
        ),
        (row(1, cmin - 1, cmin, pmin), false, [false; 3]),
        (row(1, cmin, cmin - 1, pmin), false, [false; 3]),
        (row(1, cmin, cmin, pmin), true, [false; 3]),
        (
            Conv {
                k: 1,
                pad: 0,
                ..row(1, cmin, cmin, pmin)
            },
            false,
            [false; 3],
        ),
        (
            Conv {
                stride: 2,
                h: 2,
                ..row(1, cmin, cmin, 2 * pmin)
            },
            false,
            [false; 3],
        ),
    ];
    for (conv, f64, want) in cases {
        let is_same3 = conv.k == 3 && conv.stride == 1 && conv.pad == 1;
        for algo in [
            ConvAlgo::Auto,
            ConvAlgo::Winograd,
            ConvAlgo::Winograd6,
            ConvAlgo::Direct,
        ] {
            let c = if f64 {
                run::<f64>(algo, &conv, None)
            } else {
                run::<f32>(algo, &conv, None)
            };
            let want = match algo {
                ConvAlgo::Auto => want,
                ConvAlgo::Winograd | ConvAlgo::Winograd6 => [is_same3; 3],
                ConvAlgo::Direct => [false; 3],
            };
            // Explicit F(6x6) runs all three passes; `Auto` runs none of
            // these by F(6x6): the 3x3 stride-1 ones are all smaller than
            // its threshold (the rule's F(6x6) side: the library's tests).
            assert!(!is_same3 || conv.n * conv.h * conv.w < WINOGRAD6_MIN_POSITIONS);
            let f6 = [algo == ConvAlgo::Winograd6 && is_same3; 3];
            let passes = [&c.forward, &c.input_grad, &c.weight_grad];
            for ((p, wino), f6) in passes.iter().zip(want).zip(f6) {
                let got = (p.winograd_calls, p.direct_calls);
                assert_eq!(
                    got,
                    (wino as u64, !wino as u64),
                    "{algo:?} f64 {f64} {conv:?}"
                );
                assert_eq!(p.winograd6_calls, f6 as u64, "{algo:?} f64 {f64} {conv:?}");
            }
        }
    }
}

/// The direct convolutions pack their weights exactly when the dense path
/// has more than `PACK_WEIGHTS_ABOVE` output positions (N*OH*OW forward,
/// N*H*W input gradient); the weight gradient never packs weights.
#[test]
fn weights_are_packed_exactly_where_the_heuristic_says() {
    let t = PACK_WEIGHTS_ABOVE;
    let conv = |n, h, w, stride| Conv {
        n,
        c_in: 3,
        c_out: 4,
        h,
        w,
        k: 3,
        stride,
        pad: 1,
    };
    let cases = [
        conv(1, 1, t, 1),
        conv(1, 1, t + 1, 1),
        conv(1, 1, t - 1, 1),
        conv(3, 10, 21, 1),
        conv(2, 15, 20, 1),
        conv(5, 11, 11, 1),
        conv(1, 40, 62, 2),
        conv(1, 40, 60, 2),
        conv(2, 2, 300, 2),
    ];
    for c in cases {
        let got = run::<f32>(ConvAlgo::Direct, &c, None);
        let filters = (c.c_out * c.c_in * c.taps()) as u64;
        let fwd = c.n * c.oh() * c.ow() > t;
        let dx = c.n * c.h * c.w > t;
        assert_eq!(got.forward.weights_packed, fwd as u64 * filters, "{c:?}");
        assert_eq!(got.input_grad.weights_packed, dx as u64 * filters, "{c:?}");
        assert_eq!(got.weight_grad.weights_packed, 0);
    }
    // The cases cover both sides for both passes.
    let sides: Vec<(bool, bool)> = cases
        .iter()
        .map(|c| (c.n * c.oh() * c.ow() > t, c.n * c.h * c.w > t))
        .collect();
    assert!(sides.contains(&(false, true)) && sides.contains(&(true, true)));
    assert!(sides.contains(&(false, false)));
}

/// The counts describe the work, not how it was split: the same for any
/// thread count (tasks split positions on tile boundaries).
#[test]
fn counts_do_not_depend_on_the_thread_count() {
    let conv = Conv::same3(2, 13, 10, 18, 23);
    let counts = |threads: usize, algo: ConvAlgo| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mask = spatial_mask::<f32>(&conv, &blob(conv.h));
            (
                run::<f32>(algo, &conv, Some(mask)),
                run::<f32>(
                    algo,
                    &conv,
                    Some(channel_mask(&conv, &[vec![1, 2], vec![0, 6, 12]])),
                ),
            )
        })
    };
    for algo in [ConvAlgo::Direct, ConvAlgo::Winograd] {
        let one = counts(1, algo);
        assert_eq!(one, counts(3, algo), "{algo:?}");
        assert_eq!(one, counts(8, algo), "{algo:?}");
    }
}

/// Counters belong to one backend (and its clones), start at zero, add
/// up over calls and reset.
#[test]
fn counters_are_per_backend_and_reset() {
    let conv = Conv::same3(1, 4, 4, 6, 6);
    let args = conv.args::<f32>(None);
    let x = fill::<f32>(&[1, 4, 6, 6], 1);
    let w = fill::<f32>(&[4, 4, 3, 3], 2);
    let (a, b) = (
        CpuBackend::new(ConvAlgo::Direct),
        CpuBackend::new(ConvAlgo::Direct),
    );
    let shared = a.clone();
    assert_eq!(a.counters(), WorkCounters::default());
    a.conv2d(&x, &w, None, &args).unwrap();
    let once = a.counters();
    assert_eq!(once.forward.macs, 4 * 4 * 9 * 36);
    shared.conv2d(&x, &w, None, &args).unwrap();
    assert_eq!(a.counters().forward.macs, 2 * once.forward.macs);
    assert_eq!(a.counters().forward.direct_calls, 2);
    assert_eq!(b.counters(), WorkCounters::default());
    assert_eq!(a.take_counters().forward.direct_calls, 2);
    assert_eq!(a.counters(), WorkCounters::default());
    a.conv2d(&x, &w, None, &args).unwrap();
    assert_eq!(a.counters(), once);
    a.reset_counters();
    assert_eq!(shared.counters(), WorkCounters::default());
    assert_eq!(once.total().macs, once.forward.macs);
    // Types without kernels have no tile width.
    assert_eq!(
        CpuBackend::default()
            .direct_tile_positions::<f32>()
            .map(|w| w > 0),
        Some(true)
    );
}

/// `dmkd bench --counters` shows the CPU backend's counters; asked of
/// another backend it fails with one readable line, before timing anything.
#[test]
fn bench_counters_need_the_cpu_backend() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_dmkd"))
        .args(["bench", "--counters", "--backend", "reference"])
        .output()
        .expect("the dmkd binary runs");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--counters needs --backend cpu"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `total` adds the three passes field by field.
#[test]
fn totals_add_the_passes_field_by_field() {
    let pass = |base: u64| PassCounters {
        direct_calls: base + 1,
        winograd_calls: base + 2,
        winograd6_calls: base + 10,
        channel_sparse_calls: base + 3,
        spatial_skip_calls: base + 4,
        macs: base + 5,
        tiles: base + 6,
        tiles_skipped: base + 7,
        channels_skipped: base + 8,
        weights_packed: base + 9,
        added_in_place: base + 11,
    };
    let c = WorkCounters {
        forward: pass(10),
        input_grad: pass(200),
        weight_grad: pass(3000),
    };
    assert_eq!(
        c.total(),
        PassCounters {
            direct_calls: 3213,
            winograd_calls: 3216,
            winograd6_calls: 3240,
            channel_sparse_calls: 3219,
            spatial_skip_calls: 3222,
            macs: 3225,
            tiles: 3228,
            tiles_skipped: 3231,
            channels_skipped: 3234,
            weights_packed: 3237,
            added_in_place: 3243,
        }
    );
    assert_eq!(pass(10).plus(&PassCounters::default()), pass(10));
}
