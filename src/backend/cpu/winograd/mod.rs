//! Winograd F(4x4, 3x3) and F(6x6, 3x3) convolution ([`Tiling`],
//! [`transform6`]) for the 3x3 / stride 1 / pad 1 convs of the loss:
//! forward, input gradient and weight gradient.
//!
//! F(6x6): 64 products per 36 outputs (1.78 per output, 5.06x fewer than
//! direct) against F(4x4)'s 36 per 16 (2.25). The forward engine runs it
//! with the same phases, masks and epilogues; its windows start every 6
//! columns, which the vector gather and scatter (4 columns per lane)
//! cannot serve, so its registers take the per-tile gather and scatter.
//! Its blocks hold half as many tiles ([`fwd`]'s `groups_per_block`),
//! and its f32 rounding under spikes is larger, which the `Auto` rule
//! accounts for (`CpuBackend::winograd_for`). The weight gradient ([`dw`])
//! runs either tiling with the adjoint transforms; its lanes are channels,
//! so the 4-channel gather serves both window sides. The measurements:
//! `docs/engineering.md`, "Winograd F(6x6, 3x3)" and "F(6x6) for the
//! weight gradient".
//!
//! Transform choice: F(4x4, 3x3) over 6 x 6 input tiles cuts the
//! multiplies per output from 9 to 36/16 = 2.25 (4x); F(2x2, 3x3) only to
//! 4 (2.25x). The experiment of `docs/engineering.md` ("Winograd") measured F(4x4) at
//! 2.7-2.9x the direct conv at P3/P4 against 1.6-1.9x for F(2x2), with a
//! norm-wise f32 error of 3.2e-6 at C = 256 (direct 2.9e-7). Points 0,
//! +-1, +-2, inf keep the data transforms to small integer coefficients
//! ([`transform`]).
//!
//! Forward ([`fwd`]): per block of `GROUPS x NR` tiles (256 in f32 on
//! AVX-512), gather each tile's 6 x 6 window (the mask multiplied in, pad 1
//! read as zeros) into registers whose lanes are tiles (a register of
//! consecutive tiles of one tile row is two vector loads and a deinterleave
//! per window row, [`transform::WindowSpan::gather_row_run`]; lanes in the
//! shuffle's order, [`Lanes`]), transform
//! (`B^T d B`, vector code), then 36 GEMMs `U[pos] (M x K) V[pos] (K x
//! tiles)` with the packed 6 x 16 microkernel, then `A^T m A` and the
//! epilogue (bias + ReLU, or the mask for the input gradient) with lanes
//! over tiles again. The input gradient is the same engine over `dy` with
//! the weights flipped and transposed. Masks: masked channels leave K
//! (forward) or M (input gradient); under a spatial mask, tiles that read
//! only zeros (forward) or whose outputs are all masked (input gradient)
//! are not computed and get what the dense sums of zeros would give.
//!
//! Weight gradient ([`dw`]): `dW = G^T (sum_tiles (A dY A^T) (.) (B^T x
//! B)) G`, 36 GEMMs `(Cout x tiles) (tiles x Cin)` over fixed blocks of
//! 256 tiles (f32; 1 KiB of each A row), accumulated in C in block order.
//! There the input transform's lanes are channels (B is `[tile][NR
//! channels]`, the kernel's packed layout; whole windows are gathered four
//! channels at a time, [`transform::WindowSpan::gather_channels4`]) and
//! the output gradient's are tiles (A rows, read in place). Under a channel
//! mask with zeros the sums run per image over its kept channels only and
//! the images' gradients are added in image order; under a spatial mask,
//! tiles whose input window is all masked are left out of the sums.
//!
//! Memory: nothing is materialised per level beyond the output; the
//! forward holds one block of transformed input and one of products,
//! shared by all threads (2 x 9.4 MB at C = 256, f32, AVX-512; the threads split
//! each block's phases, not the tiles), and the transformed weights twice
//! (36 x M x K, 9.4 MB, as transformed and as packed); the weight gradient
//! holds one block of transformed operands (2 x 9.4 MB) and the
//! 36 x M x K accumulator. All scratch comes from the buffer pool, so the
//! peak RSS of the whole loss is the direct conv's plus a few of these
//! blocks (`docs/engineering.md`, "Peak memory").
//!
//! Determinism: every output of the forward is computed by exactly one
//! tile on one thread, from a fixed-order chain over K (the kernel never
//! mixes lanes), so neither the split of a block's phases over threads nor
//! the block a tile lands in changes a bit. The weight gradient's reduction over tiles runs in a
//! fixed order: block b's chains resume from the sums of blocks 0..b in
//! C, and threads split positions and row panels (outputs), never the
//! reduction. Tile lists and blocks depend on the shape and mask only.
//! The weight transforms are per (row, column) pair, independent of the
//! split.
//!
//! Accuracy (held by tests/conformance/), norm-wise `||a - e|| / ||e||`
//! against the f64 reference: f32 convs 1.3e-6 to 3.6e-6 (forward, input
//! and weight gradients, C <= 43, odd shapes and masks); f64 below 1e-12
//! (asserted). The whole DMKD loss in f32 at 64 channels against f64: loss
//! 3.7e-8 for every algorithm, worst gradient 2.2e-6 by Winograd
//! (`grad.p0.gen_s.0.weight`) against 6.6e-7 direct; the requirement is
//! 1e-4. The `Auto` rule (`CpuBackend::winograd_for`) keeps f64 direct,
//! and a forward pass with a ReLU whose input has spikes (the rounding
//! error of a tile follows the largest value of its window:
//! `docs/engineering.md`, "Winograd and outliers"). Outputs that read only
//! masked inputs are set exactly, as the direct conv gives them.

mod dw;
mod fwd;
mod transform;
mod transform6;

pub(crate) use dw::conv2d_backward_weight;

use crate::backend::cpu::Ctx;
use crate::backend::cpu::simd::Elem;
use crate::backend::{ConvArgs, InputMask};
use fwd::{Epi, InMul, WinoConv};

/// The transform of a forward-engine call (the weight gradient always
/// runs F(4x4)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tiling {
    /// F(4x4, 3x3): 4 x 4 output tiles, 6 x 6 windows, 36 positions.
    F4,
    /// F(6x6, 3x3): 6 x 6 output tiles, 8 x 8 windows, 64 positions
    /// ([`transform6`]).
    F6,
}

impl Tiling {
    /// The output tile's side.
    pub(crate) const fn side(self) -> usize {
        match self {
            Tiling::F4 => 4,
            Tiling::F6 => 6,
        }
    }

    /// The input window's side (the tile's plus the 3x3 filter's 2).
    pub(crate) const fn window(self) -> usize {
        self.side() + 2
    }

    /// Positions of the transformed domain: GEMMs per block.
    pub(crate) const fn positions(self) -> usize {
        self.window() * self.window()
    }
}

/// The most positions of any tiling (F(6x6)'s 64).
pub(crate) const MAX_POS: usize = Tiling::F6.positions();

/// A tile of one call: (image, tile row, tile column); in the forward
/// engine the image is an index into the call's list of images.
pub(super) type Tile = (usize, usize, usize);

/// Which lane of a register group (at most 32 lanes) holds which of its
/// tiles, and which registers take the vector gather and scatter. Within
/// each register the lanes follow
/// [`lane_order`](crate::backend::cpu::simd::lane_order), the order the
/// vector gather's shuffles produce, whichever path gathers the register,
/// so the input transform, the GEMMs (which never mix lanes) and the
/// output transform agree on it; a tile's bits do not depend on its lane.
pub(super) struct Lanes {
    /// The tile (index into the group) in each lane, if any.
    pub tile: [Option<usize>; 32],
    /// The lane of each tile of the group.
    pub lane: [usize; 32],
    /// Per register: its lanes hold consecutive tiles of one tile row
    /// (same image and tile row, tile columns `tx, tx + 1, ...`) whose
    /// input windows lie inside the plane horizontally, as
    /// [`transform::WindowSpan::gather_row_run`] needs.
    pub gather_run: [bool; 32],
    /// Per register: consecutive tiles of one tile row whose 4 x 4 outputs
    /// lie inside the plane horizontally (the vector scatter).
    pub scatter_run: [bool; 32],
}

impl Lanes {
    /// The lanes of `group` (tiles of `tiling` in `w`-wide planes) for
    /// registers of `order.len()` lanes in the order `order`. Only F(4x4)
    /// registers take the vector gather and scatter, which read and write
    /// 4 columns per lane.
    pub fn new(order: &[usize], group: &[Tile], w: usize, tiling: Tiling) -> Self {
        let l = order.len();
        let mut lanes = Lanes {
            tile: [None; 32],
            lane: [0; 32],
            gather_run: [false; 32],
            scatter_run: [false; 32],
        };
        for hv in (0..group.len()).step_by(l) {
            for (q, &o) in order.iter().enumerate() {
                if hv + o < group.len() {
                    lanes.tile[hv + q] = Some(hv + o);
                    lanes.lane[hv + o] = hv + q;
                }
            }
            let reg = &group[hv..];
            let (i, ty, tx) = reg[0];
            if tiling == Tiling::F4 && reg.len() >= l && (1..l).all(|t| reg[t] == (i, ty, tx + t)) {
                // Output columns 4 tx .. 4 (tx + l).
                lanes.gather_run[hv / l] = windows_inside(tx, l, w);
                lanes.scatter_run[hv / l] = 4 * (tx + l) <= w;
            }
        }
        lanes
    }
}

/// True when the input windows of tile columns `tx .. tx + l` lie inside a
/// `w`-wide plane horizontally: window columns `4 tx - 1 ..= 4 (tx + l - 1)
/// + 4`, what a register of one row run needs for the vector gather.
fn windows_inside(tx: usize, l: usize, w: usize) -> bool {
    tx >= 1 && 4 * (tx + l) < w
}

/// `tiles` (in (image, tile row, tile column) order, as a call lists them)
/// reordered so that as many registers of `l` lanes as possible hold
/// [`Lanes::gather_run`]s: `l` consecutive tiles of one tile row whose
/// windows lie inside a `w`-wide plane horizontally ([`windows_inside`]).
/// Row by row, each maximal run of consecutive tiles
/// gives its runs of `l` greedily from the left (from its second tile in
/// the plane's first tile column) at the next register boundary; the
/// other tiles wait and go out `l` at a time between them, and the last
/// few at the end. The order stays close to row-major, so a block's
/// windows still share their rows.
///
/// In row-major order a register starts wherever the previous row's tile
/// count left it (a P3 tile row holds 42 tiles): with 16 lanes (AVX-512
/// f32) and two images, 75 of 132 registers were runs at P3 and 7 of 35 at
/// P4; reordered, 100 and 26. Which block and lane a tile lands in never
/// changes its bits.
pub(super) fn run_order(tiles: &[Tile], l: usize, w: usize) -> Vec<Tile> {
    let mut out = Vec::with_capacity(tiles.len());
    let mut waiting: Vec<Tile> = Vec::new();
    let mut i = 0;
    while i < tiles.len() {
        // The maximal run of consecutive tiles from i.
        let (img, ty, tx) = tiles[i];
        let mut end = i;
        while end < tiles.len() && tiles[end] == (img, ty, tx + (end - i)) {
            end += 1;
        }
        let mut j = i;
        while j < end {
            let (_, _, t) = tiles[j];
            if j + l <= end && windows_inside(t, l, w) {
                out.extend_from_slice(&tiles[j..j + l]);
                j += l;
            } else {
                waiting.push(tiles[j]);
                j += 1;
            }
            if waiting.len() == l {
                out.append(&mut waiting);
            }
        }
        i = end;
    }
    out.append(&mut waiting);
    out
}

/// `y = act(conv3x3(x * mask, w) + b)` for a 3x3 / stride 1 / pad 1 conv,
/// by the transform `tiling`.
pub(crate) fn conv2d<E: Elem>(
    x: &[E],
    w: &[E],
    b: Option<&[E]>,
    args: &ConvArgs<E>,
    tiling: Tiling,
    cx: Ctx<'_>,
) -> Vec<E> {
    let g = &args.geom;
    debug_assert!(g.is_3x3_same());
    WinoConv {
        src: x,
        n: g.n,
        k: g.c_in,
        m: g.c_out,
        h: g.h,
        w: g.w,
        weights: w,
        transposed: false,
        input: match &args.mask {
            None => InMul::None,
            Some(InputMask::Spatial(m)) => InMul::Spatial(m.as_slice()),
            Some(InputMask::Channel(m)) => InMul::Channel(m.as_slice()),
        },
        epi: Epi::Bias {
            bias: b,
            relu: args.relu,
        },
        tiling,
        cx,
    }
    .run()
}

/// `dx = mask * conv_transpose(dy, w)` for a 3x3 / stride 1 / pad 1 conv:
/// the correlation of `dy` (pad 1) with the flipped, transposed weights,
/// by the transform `tiling`.
pub(crate) fn conv2d_backward_input<E: Elem>(
    dy: &[E],
    w: &[E],
    args: &ConvArgs<E>,
    tiling: Tiling,
    cx: Ctx<'_>,
) -> Vec<E> {
    let g = &args.geom;
    debug_assert!(g.is_3x3_same());
    WinoConv {
        src: dy,
        n: g.n,
        k: g.c_out,
        m: g.c_in,
        h: g.h,
        w: g.w,
        weights: w,
        transposed: true,
        input: InMul::None,
        epi: match &args.mask {
            None => Epi::Bias {
                bias: None,
                relu: false,
            },
            Some(InputMask::Spatial(m)) => Epi::Spatial(m.as_slice()),
            Some(InputMask::Channel(m)) => Epi::Rows(m.as_slice()),
        },
        tiling,
        cx,
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::{Lanes, Tile, run_order, windows_inside};

    /// The windows of tile columns `tx .. tx + l` (columns `4 tx - 1` to
    /// `4 (tx + l - 1) + 4`) inside `0 .. w`, by definition.
    #[test]
    fn windows_inside_means_every_window_column_in_the_plane() {
        for w in 1usize..80 {
            for l in 1..=16 {
                for tx in 0..w.div_ceil(4) {
                    let first = 4 * tx as isize - 1;
                    let last = 4 * (tx + l - 1) as isize + 4;
                    let inside = first >= 0 && last < w as isize;
                    assert_eq!(windows_inside(tx, l, w), inside, "tx {tx}, l {l}, w {w}");
                }
            }
        }
    }

    /// The registers of `tiles` whose lanes take the vector gather, for an
    /// identity lane order of `l` lanes and groups of two registers.
    fn gather_runs(tiles: &[Tile], l: usize, w: usize) -> usize {
        let order: Vec<usize> = (0..l).collect();
        tiles
            .chunks(2 * l)
            .map(|g| {
                let lanes = Lanes::new(&order, g, w, super::Tiling::F4);
                (0..g.len().div_ceil(l))
                    .filter(|&r| lanes.gather_run[r])
                    .count()
            })
            .sum()
    }

    /// The most registers of row runs a list allows: per maximal run of
    /// consecutive tiles `t0..t1` in one tile row, runs of `l` from column
    /// `max(t0, 1)` that end at or before `t1` and inside the plane
    /// (`4 (tx + l) < w`, so the last end is `(w - 1) / 4`).
    fn most_runs(tiles: &[Tile], l: usize, w: usize) -> usize {
        let mut total = 0;
        let mut i = 0;
        while i < tiles.len() {
            let (img, ty, t0) = tiles[i];
            let mut t1 = t0 + 1;
            while i + (t1 - t0) < tiles.len() && tiles[i + (t1 - t0)] == (img, ty, t1) {
                t1 += 1;
            }
            let (lo, hi) = (t0.max(1), t1.min((w - 1) / 4));
            total += hi.saturating_sub(lo) / l;
            i += t1 - t0;
        }
        total
    }

    /// Every tile once; as many registers of row runs as the tiles allow,
    /// each aligned to a register; the P3 and P4 counts of the docs.
    #[test]
    fn run_order_fills_registers_with_row_runs() {
        let grid = |n: usize, h: usize, w: usize, keep: &dyn Fn(usize, usize, usize) -> bool| {
            let mut v = Vec::new();
            for img in 0..n {
                for ty in 0..h.div_ceil(4) {
                    for tx in 0..w.div_ceil(4) {
                        if keep(img, ty, tx) {
                            v.push((img, ty, tx));
                        }
                    }
                }
            }
            v
        };
        // Row-major, then reordered: P3 and P4 (two images) at 16 lanes
        // (AVX-512 f32).
        for (h, w, before, after) in [(100, 168, 75, 100), (50, 84, 7, 26)] {
            let tiles = grid(2, h, w, &|_, _, _| true);
            assert_eq!(gather_runs(&tiles, 16, w), before, "{h}x{w}");
            assert_eq!(gather_runs(&run_order(&tiles, 16, w), 16, w), after);
        }
        let dense = |_: usize, _: usize, _: usize| true;
        let holes =
            |img: usize, ty: usize, tx: usize| !(img * 7 + ty * 3 + tx / 5).is_multiple_of(4);
        let sparse = |img: usize, ty: usize, tx: usize| (img + ty * tx).is_multiple_of(3);
        for l in [1, 2, 4, 8, 16] {
            for (h, w) in [(1, 1), (9, 13), (25, 42), (50, 84), (21, 257)] {
                for keep in [
                    &dense as &dyn Fn(usize, usize, usize) -> bool,
                    &holes,
                    &sparse,
                ] {
                    let tiles = grid(2, h, w, keep);
                    let got = run_order(&tiles, l, w);
                    let mut sorted = got.clone();
                    sorted.sort();
                    assert_eq!(sorted, tiles, "l {l}, {h}x{w}: not a permutation");
                    assert_eq!(
                        gather_runs(&got, l, w),
                        most_runs(&tiles, l, w),
                        "l {l}, {h}x{w}"
                    );
                }
            }
        }
    }
}
