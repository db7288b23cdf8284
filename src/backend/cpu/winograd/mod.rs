//! Winograd F(4x4, 3x3) and F(6x6, 3x3) convolution ([`Tiling`],
//! [`transform6`]) for the 3x3 / stride 1 / pad 1 convs of the loss:
//! forward, input gradient and weight gradient.
//!
//! F(6x6): 64 products per 36 outputs (1.78 per output, 5.06x fewer than
//! direct) against F(4x4)'s 36 per 16 (2.25). The forward engine runs it
//! with the same phases, masks and epilogues; its windows start every 6
//! columns, which the vector gather and scatter (4 columns per lane)
//! cannot serve, so its registers take the per-tile gather, and its own
//! vector scatter ([`runs6`]) where the ISA has one.
//! Its blocks hold 128 tiles on every ISA ([`fwd`]'s `groups_per_block`),
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
//! over tiles again (registers of row runs stored by vector: F(4x4)'s by
//! the same shuffles, F(6x6)'s in f32 by [`runs6`]'s permutes on AVX-512
//! and transposes on AVX2, where its windows, 6 columns apart, are still
//! gathered tile by tile). The input gradient is the same engine over `dy`
//! with the weights flipped and transposed. Masks: masked channels leave K
//! (forward) or M (input gradient); under a spatial mask, tiles that read
//! only zeros (forward) or whose outputs are all masked (input gradient)
//! are not computed and get what the dense sums of zeros would give.
//!
//! Weight gradient ([`dw`]): `dW = G^T (sum_tiles (A dY A^T) (.) (B^T x
//! B)) G`, 36 (F(6x6): 64) GEMMs `(Cout x tiles) (tiles x Cin)` over
//! blocks of at most 256 tiles (f32; 1 KiB of each A row), the tiles dealt
//! evenly over the fewest blocks, accumulated in C in block order.
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
//! holds one block of transformed operands (buffers of F(6x6)'s largest
//! block, 2 x 16.8 MB at C = 256 in f32, of which a block uses what its
//! tiles need) and the 36 (or 64) x M x K accumulator. All scratch comes from the buffer pool, so the
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
mod runs6;
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

/// How the registers of a tiling are made of row runs, where they are:
/// `len` consecutive tiles of one tile row per run, `lanes / len` runs per
/// register. F(4x4): one run per register, moved by
/// [`Elem::deinterleave4`](crate::backend::cpu::simd::Elem::deinterleave4)
/// shuffles on any ISA; F(6x6): runs of [`runs6::RUN6`], two per register
/// of 16 lanes and one per register of 8, on the ISAs that have
/// [`runs6`]'s moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunShape {
    pub tiling: Tiling,
    /// Tiles per run.
    pub len: usize,
}

impl RunShape {
    /// The runs of `tiling` in registers of `lanes` lanes (`runs6`: the ISA
    /// and dtype have [`runs6`]'s moves), if any.
    pub fn new(tiling: Tiling, lanes: usize, runs6: bool) -> Option<RunShape> {
        match tiling {
            Tiling::F4 => Some(RunShape { tiling, len: lanes }),
            Tiling::F6 if runs6 && [runs6::RUN6, 2 * runs6::RUN6].contains(&lanes) => {
                Some(RunShape {
                    tiling,
                    len: runs6::RUN6,
                })
            }
            Tiling::F6 => None,
        }
    }

    /// True when a run from tile column `tx` of a `w`-wide plane is
    /// gathered by vector: F(4x4) where its windows lie inside the plane
    /// horizontally ([`windows_inside`]); F(6x6) never (see [`runs6`]).
    pub fn gathers(&self, tx: usize, w: usize) -> bool {
        match self.tiling {
            Tiling::F4 => windows_inside(tx, self.len, w),
            Tiling::F6 => false,
        }
    }

    /// True when the outputs of a run from tile column `tx` lie inside a
    /// `w`-wide plane horizontally (the vector scatter).
    pub fn scatters(&self, tx: usize, w: usize) -> bool {
        self.tiling.side() * (tx + self.len) <= w
    }

    /// True when [`run_order`] forms a run from tile column `tx`: where the
    /// vector moves take it (F(4x4): the gather, whose runs the scatter
    /// takes too; F(6x6): the scatter).
    pub fn forms(&self, tx: usize, w: usize) -> bool {
        match self.tiling {
            Tiling::F4 => self.gathers(tx, w),
            Tiling::F6 => self.scatters(tx, w),
        }
    }
}

/// Which lane of a register group (at most 32 lanes) holds which of its
/// tiles, and which registers take the vector gather and scatter. Within
/// each register the lanes follow the order given to [`Lanes::new`]: for
/// F(4x4) [`lane_order`](crate::backend::cpu::simd::lane_order), the
/// order the vector gather's shuffles produce, whichever path gathers the
/// register, so the input transform, the GEMMs (which never mix lanes) and
/// the output transform agree on it; for F(6x6) the identity, which
/// [`runs6`]'s permutes produce. A tile's bits do not depend on its lane.
pub(super) struct Lanes {
    /// The tile (index into the group) in each lane, if any.
    pub tile: [Option<usize>; 32],
    /// The lane of each tile of the group.
    pub lane: [usize; 32],
    /// Per register: its lanes hold row runs (consecutive tiles of one tile
    /// row: same image and tile row, tile columns `tx, tx + 1, ...`) whose
    /// input windows the vector gather may read ([`RunShape::gathers`]).
    pub gather_run: [bool; 32],
    /// Per register: its lanes hold row runs whose outputs lie inside the
    /// plane horizontally (the vector scatter).
    pub scatter_run: [bool; 32],
    /// Tiles per run of those registers.
    pub run: usize,
}

impl Lanes {
    /// The lanes of `group` (tiles in `w`-wide planes) for registers of
    /// `order.len()` lanes in the order `order`, with registers of row runs
    /// of `shape` (none: every register moves lane by lane).
    pub fn new(order: &[usize], group: &[Tile], w: usize, shape: Option<RunShape>) -> Self {
        let l = order.len();
        let mut lanes = Lanes {
            tile: [None; 32],
            lane: [0; 32],
            gather_run: [false; 32],
            scatter_run: [false; 32],
            run: shape.map_or(l, |s| s.len),
        };
        for hv in (0..group.len()).step_by(l) {
            for (q, &o) in order.iter().enumerate() {
                if hv + o < group.len() {
                    lanes.tile[hv + q] = Some(hv + o);
                    lanes.lane[hv + o] = hv + q;
                }
            }
            let Some(shape) = shape else { continue };
            let reg = &group[hv..];
            if reg.len() < l {
                continue;
            }
            // The first tile column of each run, if the register is runs.
            let starts: Option<Vec<usize>> = reg[..l]
                .chunks(shape.len)
                .map(|run| {
                    let (i, ty, tx) = run[0];
                    (1..run.len())
                        .all(|t| run[t] == (i, ty, tx + t))
                        .then_some(tx)
                })
                .collect();
            if let Some(starts) = starts {
                lanes.gather_run[hv / l] = starts.iter().all(|&tx| shape.gathers(tx, w));
                lanes.scatter_run[hv / l] = starts.iter().all(|&tx| shape.scatters(tx, w));
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
/// reordered so that as many registers of `l` lanes as possible hold row
/// runs of `shape` that the vector moves take ([`RunShape::forms`]).
/// Row by row, each maximal run of consecutive tiles gives its runs of
/// `shape.len` greedily from the left (from its first tile where a run
/// forms: for F(4x4) not the plane's first tile column, whose window reads
/// the padding); they go out a register's worth at a time, at the
/// next register boundary; the other tiles wait and go out `l` at a time
/// between them, and the last few (a register's runs left short among
/// them) at the end. The order stays close to row-major, so a block's
/// windows still share their rows.
///
/// In row-major order a register starts wherever the previous row's tile
/// count left it (a P3 tile row holds 42 F(4x4) tiles): with 16 lanes
/// (AVX-512 f32) and two images, 75 of 132 registers were runs at P3 and 7
/// of 35 at P4; reordered, 100 and 26. Which block and lane a tile lands in
/// never changes its bits.
pub(super) fn run_order(tiles: &[Tile], l: usize, shape: RunShape, w: usize) -> Vec<Tile> {
    let mut out = Vec::with_capacity(tiles.len());
    let mut runs: Vec<Tile> = Vec::with_capacity(l);
    let mut waiting: Vec<Tile> = Vec::new();
    let len = shape.len;
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
            if j + len <= end && shape.forms(t, w) {
                runs.extend_from_slice(&tiles[j..j + len]);
                j += len;
                if runs.len() == l {
                    out.append(&mut runs);
                }
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
    out.append(&mut runs);
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
    use super::{Lanes, RunShape, Tile, Tiling, run_order, windows_inside};

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

    /// The registers of `tiles` whose lanes take the vector gather (F(4x4))
    /// or scatter (F(6x6)), for an identity lane order of `l` lanes, groups
    /// of two registers and runs of `shape`.
    fn gather_runs(tiles: &[Tile], l: usize, w: usize, shape: RunShape) -> usize {
        let order: Vec<usize> = (0..l).collect();
        tiles
            .chunks(2 * l)
            .map(|g| {
                let lanes = Lanes::new(&order, g, w, Some(shape));
                let runs = match shape.tiling {
                    Tiling::F4 => lanes.gather_run,
                    Tiling::F6 => {
                        assert_eq!(lanes.gather_run, [false; 32]);
                        lanes.scatter_run
                    }
                };
                (0..g.len().div_ceil(l)).filter(|&r| runs[r]).count()
            })
            .sum()
    }

    /// The most registers of row runs a list allows: per maximal run of
    /// consecutive tiles `t0..t1` in one tile row, runs of `shape.len` that
    /// end at or before `t1` and inside the plane, `l / shape.len` of them
    /// per register. F(4x4) runs start from column `max(t0, 1)` and end
    /// before the plane's last column (the gather's windows: `4 (tx + l) <
    /// w`), F(6x6) runs from `t0` with their outputs inside (`6 (tx + 8) <=
    /// w`).
    fn most_runs(tiles: &[Tile], l: usize, w: usize, shape: RunShape) -> usize {
        let (first, fits): (usize, &dyn Fn(usize) -> bool) = match shape.tiling {
            Tiling::F4 => (1, &|tx| 4 * (tx + l) < w),
            Tiling::F6 => (0, &|tx| 6 * (tx + 8) <= w),
        };
        let mut total = 0;
        let mut i = 0;
        while i < tiles.len() {
            let (img, ty, t0) = tiles[i];
            let mut t1 = t0 + 1;
            while i + (t1 - t0) < tiles.len() && tiles[i + (t1 - t0)] == (img, ty, t1) {
                t1 += 1;
            }
            let mut tx = t0.max(first);
            while tx + shape.len <= t1 && fits(tx) {
                total += 1;
                tx += shape.len;
            }
            i += t1 - t0;
        }
        total / (l / shape.len)
    }

    /// Every tile once; as many registers of row runs as the tiles allow,
    /// each aligned to a register; the P3 and P4 counts of the docs.
    #[test]
    fn run_order_fills_registers_with_row_runs() {
        // The tiles of `n` images of `th x tw` tiles that `keep` keeps.
        let grid = |n: usize, th: usize, tw: usize, keep: &dyn Fn(usize, usize, usize) -> bool| {
            let mut v = Vec::new();
            for img in 0..n {
                for ty in 0..th {
                    for tx in 0..tw {
                        if keep(img, ty, tx) {
                            v.push((img, ty, tx));
                        }
                    }
                }
            }
            v
        };
        // Row-major, then reordered: P3 and P4 (two images) at 16 lanes
        // (AVX-512 f32). F(6x6): 28 tiles per P3 row give runs of 8 from
        // columns 0, 8 and 16, 14 per P4 row one from column 0: 102 and 18
        // runs, two per register.
        let f4 = RunShape::new(Tiling::F4, 16, false).unwrap();
        let f6 = RunShape::new(Tiling::F6, 16, true).unwrap();
        for (shape, h, w, before, after) in [
            (f4, 100usize, 168usize, 75, 100),
            (f4, 50, 84, 7, 26),
            (f6, 100, 168, 42, 51),
            (f6, 50, 84, 2, 9),
        ] {
            let side = shape.tiling.side();
            let tiles = grid(2, h.div_ceil(side), w.div_ceil(side), &|_, _, _| true);
            assert_eq!(gather_runs(&tiles, 16, w, shape), before, "{h}x{w}");
            let ordered = run_order(&tiles, 16, shape, w);
            assert_eq!(gather_runs(&ordered, 16, w, shape), after, "{h}x{w}");
        }
        let dense = |_: usize, _: usize, _: usize| true;
        let holes =
            |img: usize, ty: usize, tx: usize| !(img * 7 + ty * 3 + tx / 5).is_multiple_of(4);
        let sparse = |img: usize, ty: usize, tx: usize| (img + ty * tx).is_multiple_of(3);
        let shapes = [1, 2, 4, 8, 16]
            .map(|l| (l, RunShape::new(Tiling::F4, l, false).unwrap()))
            .into_iter()
            .chain([(16, f6), (8, RunShape::new(Tiling::F6, 8, true).unwrap())]);
        for (l, shape) in shapes {
            let side = shape.tiling.side();
            for (h, w) in [
                (1usize, 1usize),
                (9, 13),
                (25, 42),
                (50, 84),
                (21, 257),
                (13, 110),
            ] {
                for keep in [
                    &dense as &dyn Fn(usize, usize, usize) -> bool,
                    &holes,
                    &sparse,
                ] {
                    let tiles = grid(2, h.div_ceil(side), w.div_ceil(side), keep);
                    let got = run_order(&tiles, l, shape, w);
                    let mut sorted = got.clone();
                    sorted.sort();
                    assert_eq!(sorted, tiles, "{shape:?} l {l}, {h}x{w}: not a permutation");
                    assert_eq!(
                        gather_runs(&got, l, w, shape),
                        most_runs(&tiles, l, w, shape),
                        "{shape:?} l {l}, {h}x{w}"
                    );
                }
            }
        }
    }
}
