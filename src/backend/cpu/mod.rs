//! The fast CPU backend: SIMD (pulp, runtime dispatch), multi-threaded
//! (rayon), bit-deterministic for any thread count.
//!
//! Files, one concern each:
//! - `simd`: the f32/f64 lane abstraction the kernels are generic over;
//! - `kernel`: the 6 x 2-register GEMM microkernel;
//! - `pack`: padding/masking the input, packing A panels and B tiles;
//! - `conv_fwd`: implicit-GEMM convolution (forward, and the input gradient);
//! - `conv_bwd`: input, weight and bias gradients;
//! - `winograd`: Winograd F(4x4, 3x3) for the 3x3 / stride 1 / pad 1
//!   convs (forward, input and weight gradients), picked per conv and pass
//!   by [`ConvAlgo`] (see `CpuBackend::winograd_for`);
//! - `elementwise`, `reduce`: the bandwidth-bound rest;
//! - [`peak`]: the FMA peak probe;
//! - [`counters`]: per-backend work counters (multiply-adds, skipped
//!   tiles and channels, packed weights, algorithm per pass).
//!
//! [`CpuBackend`] implements `Backend<f32>` and `Backend<f64>` (the only
//! `Float` types), so that the kernels are compiled once, in this crate (see
//! `Kernels`). Behind them one generic impl looks up which one `T` is (a
//! `TypeId` comparison, free at run time) and downcasts its operands.
//!
//! Input masks with exact zeros skip work (the `InputMask` contract allows
//! it): masked channels leave the forward's reduction, the input
//! gradient's rows and the weight gradient's row panels; spatially masked
//! regions skip output tiles (forward, input gradient) and k-blocks (weight
//! gradient). Winograd does the same per 4x4 tile and per image's kept
//! channels (see its module doc). Skipped work would only have added exact
//! zeros, so results equal the dense path's but for the sign of a zero (or a NaN that a
//! skipped `0 * inf` would have made).

use std::any::{Any, TypeId};
use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::reference::ReferenceBackend;
use crate::backend::{
    Backend, Binary, ConvArgs, InputMask, PairResidual, Unary, conv2d_add_separately,
};
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use winograd::Tiling;

mod conv_bwd;
mod conv_fwd;
pub mod counters;
mod elementwise;
mod isa;
mod kernel;
mod pack;
pub mod peak;
mod reduce;
mod simd;
#[cfg(test)]
pub(crate) mod testing;
mod winograd;

pub use conv_fwd::PACK_WEIGHTS_ABOVE;
pub use counters::{PassCounters, WorkCounters};
pub use isa::Isa;
pub use peak::{fma_peak_gflops, fma_peak_gflops_on};

/// Rows per kernel panel of the direct convolutions: output channels of
/// the forward pass, input channels of the input gradient, taps
/// `(ci, ky, kx)` of the weight gradient (under a channel mask with zeros,
/// its kept taps, whatever panels they lie in).
pub const PANEL_ROWS: usize = kernel::MR;

/// Output tile side of Winograd F(4x4, 3x3): tile `(ty, tx)` holds outputs
/// `4ty .. 4ty + 4` x `4tx .. 4tx + 4` (clipped at the plane's edge) and
/// reads inputs `4ty - 1 .. 4ty + 5` x `4tx - 1 .. 4tx + 5`.
pub const WINOGRAD_TILE: usize = 4;

/// Output tile side of Winograd F(6x6, 3x3) (`ConvAlgo::Winograd6`, and
/// `Auto` on large levels): tile `(ty, tx)` holds outputs `6ty .. 6ty + 6`
/// x `6tx .. 6tx + 6` and reads inputs `6ty - 1 .. 6ty + 7` x `6tx - 1 ..
/// 6tx + 7`.
pub const WINOGRAD6_TILE: usize = 6;
const _: () = assert!(
    Tiling::F4.side() == WINOGRAD_TILE && Tiling::F6.side() == WINOGRAD6_TILE,
    "the public tile sides are the engine's"
);

/// `Auto` runs Winograd for the forward pass and the input gradient from
/// this many output positions (N*H*W) on, for the weight gradient from
/// half of it (the rule and its measurements: `CpuBackend::winograd_for`).
pub const WINOGRAD_MIN_POSITIONS: usize = 2048;

/// `Auto` keeps convolutions with fewer input or output channels than this
/// direct.
pub const WINOGRAD_MIN_CHANNELS: usize = 16;

/// `Auto` runs a forward pass with a ReLU direct when its input's largest
/// per-position magnitude is more than this many times the typical one
/// (`winograd_spread_ok`, in `src/backend/cpu/mod.rs`). Winograd's f32
/// rounding error at an output follows the largest value of its tile's 6 x
/// 6 input window, not of its own 3 x 3 receptive field: a few values far
/// above the rest (spikes) leave the other outputs of their tiles the
/// spikes' rounding noise. In a linear pass that noise stays small against
/// the output's norm; where a ReLU follows, it moves outputs near zero
/// across the kink, and the gradients after it move with them. Measured on
/// the demo preset's loss with 0.1% of the student's values scaled by
/// 1e4 (spread about 14000 at its first level): the worst f32 gradient
/// was 5.2e-3 off f64 (norm-wise) with Winograd, 2.2e-6 direct; at 1e3
/// (spread about 1400) Winograd still gave 2.2e-6. 256 keeps a factor of
/// 5 below the largest spread measured harmless and 50 below the first
/// failure (`docs/engineering.md`, "Winograd and outliers"). The loss's
/// own features spread about 2.
pub const WINOGRAD_MAX_SPREAD: f32 = 256.0;

/// `Auto` runs a convolution (all three passes) by Winograd F(6x6, 3x3)
/// instead of F(4x4) from this many output positions (N*H*W) on. (The rule
/// and its measurements: `CpuBackend::winograd_for`.)
pub const WINOGRAD6_MIN_POSITIONS: usize = 8192;

/// [`WINOGRAD6_MIN_POSITIONS`] under a spatial mask: F(6x6) skips a tile
/// only where its whole 8 x 8 window is masked, and on smaller planes the
/// loss's masked blobs cover fewer whole windows (`CpuBackend::winograd_for`).
pub const WINOGRAD6_MIN_POSITIONS_SPATIAL: usize = 16384;

/// [`WINOGRAD_MAX_SPREAD`] for F(6x6): `Auto` runs a forward pass with a
/// ReLU by F(6x6) only while its input spreads at most this far (else by
/// F(4x4) up to [`WINOGRAD_MAX_SPREAD`], else direct). Under spikes F(6x6)'s
/// rounding noise at the outputs that do not read one is 1.5-2x F(4x4)'s
/// at 256 channels and 5-7x at 64 (`reference/winograd_accuracy.py`;
/// `docs/engineering.md`, "Winograd F(6x6, 3x3)"), so this keeps F(4x4)'s
/// margin with a factor of 8 to spare. The loss's own ReLU operands spread
/// 1.6-4.4.
pub const WINOGRAD6_MAX_SPREAD: f32 = 32.0;

/// Run `$body` with the type alias `$e` set to `$t` when `$t` is f32 or
/// f64; `None` for any other `Float`.
macro_rules! per_elem {
    ($t:ty, $e:ident => $body:expr) => {{
        if TypeId::of::<$t>() == TypeId::of::<f32>() {
            #[allow(dead_code)]
            type $e = f32;
            Some($body)
        } else if TypeId::of::<$t>() == TypeId::of::<f64>() {
            #[allow(dead_code)]
            type $e = f64;
            Some($body)
        } else {
            None
        }
    }};
}

/// Convolution algorithm of the CPU backend (`--conv-algo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgo {
    /// Direct (implicit-GEMM) convolution everywhere.
    Direct,
    /// Winograd F(4x4, 3x3) for every 3x3 stride-1 pad-1 convolution
    /// (forward, input and weight gradients), direct for the rest.
    Winograd,
    /// Winograd F(6x6, 3x3) for the forward pass and the input gradient
    /// of every 3x3 stride-1 pad-1 convolution, F(4x4, 3x3) for its
    /// weight gradient, direct for the rest.
    Winograd6,
    /// Pick per convolution and pass by a measured rule: the shape, and
    /// for a forward pass with a ReLU the spread of its input
    /// ([`WINOGRAD6_MAX_SPREAD`], [`WINOGRAD_MAX_SPREAD`]; see
    /// `CpuBackend::winograd_for`).
    #[default]
    Auto,
}

/// Which pass of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Input,
    Weight,
}

impl std::fmt::Display for ConvAlgo {
    /// The lower-case name `--conv-algo` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConvAlgo::Direct => "direct",
            ConvAlgo::Winograd => "winograd",
            ConvAlgo::Winograd6 => "winograd6",
            ConvAlgo::Auto => "auto",
        })
    }
}

impl std::str::FromStr for ConvAlgo {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "direct" => Ok(ConvAlgo::Direct),
            "winograd" => Ok(ConvAlgo::Winograd),
            "winograd6" => Ok(ConvAlgo::Winograd6),
            "auto" => Ok(ConvAlgo::Auto),
            other => Err(Error::arg(
                "conv-algo",
                format!("unknown conv algorithm `{other}` (direct, winograd, winograd6 or auto)"),
            )),
        }
    }
}

/// SIMD, multi-threaded, bit-deterministic CPU backend.
///
/// Each instance counts the work of its convolutions ([`Self::counters`]);
/// clones share the counts. Its kernels run on one instruction set
/// ([`Isa`]), fixed at construction; every choice gives the same bits.
#[derive(Clone, Debug)]
pub struct CpuBackend {
    /// How convolutions are computed.
    pub algo: ConvAlgo,
    /// The instruction set the kernels run on (never `Isa::Auto`: what
    /// `Auto` resolved to).
    isa: Isa,
    arch: pulp::Arch,
    counters: Arc<counters::Counters>,
    /// See [`PAD_PER_IMAGE_ABOVE`] (lowered by tests to reach that path).
    pad_per_image_above: usize,
}

/// The direct convolution's gradients read a zero-padded copy of their
/// operand (the output gradient for dX, the masked input for dW). Where
/// that copy of the whole batch would take at least this many bytes, they
/// pad and run one image at a time instead: the copy is then one image's,
/// alive while the gradient it feeds is being written. Such operands are
/// the high-resolution levels' (a two-stage P2 batch, 131 MiB), whose
/// backward makes the peak of a step: the batch-wide copy added 133 MiB to
/// it (two-stage peak RSS 1309 MiB against 1196 for Winograd, which pads
/// nothing; 1252 per image; `docs/engineering.md`, "Peak memory of the
/// direct path"). Smaller operands keep one batch-wide copy (fewer, larger
/// parallel tasks). Each output is the same fixed-order chain either way:
/// the bits do not depend on it.
pub const PAD_PER_IMAGE_ABOVE: usize = crate::pool::HUGE_BYTES;

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new(ConvAlgo::default())
    }
}

/// What a kernel needs from its backend: the instruction set to dispatch
/// on and where to count its work.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub arch: pulp::Arch,
    pub tally: &'a counters::Tally,
    /// See [`PAD_PER_IMAGE_ABOVE`].
    pub pad_per_image_above: usize,
}

impl CpuBackend {
    /// The CPU backend with a conv algorithm, on the widest instruction
    /// set this CPU has.
    pub fn new(algo: ConvAlgo) -> Self {
        CpuBackend::with_isa(algo, Isa::Auto).expect("the widest available ISA runs")
    }

    /// The CPU backend on a named instruction set; an error (one line,
    /// naming what is missing) if this CPU lacks it.
    pub fn with_isa(algo: ConvAlgo, isa: Isa) -> Result<Self> {
        // `Auto` is resolved first, so the dispatcher is always the one of
        // the instruction set reported by `isa()`.
        let isa = isa.resolve()?;
        Ok(CpuBackend {
            algo,
            isa,
            arch: isa.arch()?,
            counters: Arc::default(),
            pad_per_image_above: PAD_PER_IMAGE_ABOVE,
        })
    }

    /// This backend with the direct gradients padding one image at a time
    /// above `bytes` instead of [`PAD_PER_IMAGE_ABOVE`].
    #[cfg(test)]
    pub(crate) fn with_pad_per_image_above(mut self, bytes: usize) -> Self {
        self.pad_per_image_above = bytes;
        self
    }

    /// The instruction set the kernels run on (what `Auto` resolved to).
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The work done since construction or the last reset.
    pub fn counters(&self) -> WorkCounters {
        self.counters.snapshot()
    }

    /// Zero the counters.
    pub fn reset_counters(&self) {
        self.counters.reset()
    }

    /// The counters, zeroed after they are read (counts added by calls
    /// running meanwhile on other threads may land on either side).
    pub fn take_counters(&self) -> WorkCounters {
        let c = self.counters.snapshot();
        self.counters.reset();
        c
    }

    /// Output positions per tile of the direct forward pass and input
    /// gradient for element type `T` on this machine (the kernel width,
    /// which depends on the instruction set), or None for a `Float` the
    /// kernels do not cover. Without a spatial mask, tile `t` of an image
    /// holds positions `t * w .. (t + 1) * w` (row-major over the output
    /// plane, the last tile partial); under one with zeros, the image's
    /// live positions are packed `w` to a tile instead.
    pub fn direct_tile_positions<T: Float>(&self) -> Option<usize> {
        per_elem!(T, E => conv_fwd::nr_for::<E>(self.arch))
    }

    fn ctx(&self, pass: Pass) -> Ctx<'_> {
        let tally = match pass {
            Pass::Forward => &self.counters.forward,
            Pass::Input => &self.counters.input_grad,
            Pass::Weight => &self.counters.weight_grad,
        };
        Ctx {
            arch: self.arch,
            tally,
            pad_per_image_above: self.pad_per_image_above,
        }
    }
}

impl CpuBackend {
    /// Run this pass of this convolution by Winograd?
    ///
    /// The `Auto` rule (measured with `examples/conv_speed.rs`, conv3x3
    /// 256->256, N = 2, 2 threads, Zen 3, ms direct / Winograd):
    ///
    /// | level (N*H*W) | fwd | dX | dW |
    /// |---|---|---|---|
    /// | P3 (33600) | 225 / 88 | 225 / 86 | 223 / 96 |
    /// | P4 (8400) | 58 / 29 | 58 / 28 | 56 / 28 |
    /// | P5 (2100) | 14.8 / 12.1 | 15.1 / 11.9 | 14.4 / 10.3 |
    /// | P6 (546) | 4.9 / 7.8 | 5.2 / 7.5 | 4.9 / 5.9 |
    /// | P7 (154) | 1.4 / 5.2 | 1.5 / 5.4 | 2.0 / 4.5 |
    /// | P3, channel mask 0.65 | 96 / 40 | 108 / 46 | 92 / 40 |
    /// | P5, channel mask 0.65 | 7.1 / 5.8 | 7.7 / 5.9 | 6.5 / 5.1 |
    /// | P6, channel mask 0.65 | 2.5 / 3.5 | 2.6 / 3.5 | 2.6 / 3.4 |
    /// | P4, spatial blob 0.65 | 23.5 / 14.6 | 23.3 / 13.2 | 24.7 / 12.9 |
    /// | P5, spatial blob 0.65 | 6.3 / 6.9 | 6.7 / 6.3 | 7.0 / 6.9 |
    ///
    /// Winograd has a fixed cost per call (transforming and packing the
    /// 36 x 256 x 256 weights, ~2-3 ms, and too few tiles to spread over
    /// threads), so small levels stay direct: Winograd from
    /// [`WINOGRAD_MIN_POSITIONS`] output positions for the forward pass and the input
    /// gradient, from half of it for the weight gradient. Masks do not
    /// change the rule: both algorithms skip masked channels, and under a
    /// spatial mask the blob above (the direct conv's best case, whole
    /// rows masked) is about even at P5, while on the loss's own attention
    /// masks at P5 the direct conv skipped little (11.8 ms against 10.4 ms
    /// by Winograd). Channels below 16 ([`WINOGRAD_MIN_CHANNELS`]) stay
    /// direct (little work, thin GEMMs). f64 is the accuracy path (golden
    /// tests at 1e-10 against PyTorch): always direct.
    ///
    /// And, from the data: a forward pass with a ReLU whose input `x`
    /// (times the mask) spreads too far ([`WINOGRAD_MAX_SPREAD`]) stays
    /// direct. `x` is the forward pass's input; the other passes, linear in
    /// their data, give `None`.
    ///
    /// F(6x6) (`winograd::Tiling::F6`) takes all three passes from
    /// [`WINOGRAD6_MIN_POSITIONS`] on (from
    /// [`WINOGRAD6_MIN_POSITIONS_SPATIAL`] under a spatial mask), and a
    /// forward pass with a ReLU only while its input spreads at most
    /// [`WINOGRAD6_MAX_SPREAD`]. Measured with `examples/conv_speed.rs` as
    /// above, but on Zen 4 (AVX-512), ms F(4x4) / F(6x6), two alternating
    /// rounds (the loss's own masks; the dense forward and input-gradient
    /// rows are from the rounds that introduced F(6x6), the others from the
    /// rounds that brought it to the weight gradient, both 2026-12-07):
    ///
    /// | level | fwd | dX | dW |
    /// |---|---|---|---|
    /// | P3 | 83.6, 87.4 / 65.1, 69.6 | 83.1, 76.3 / 67.2, 72.4 | 71.0, 77.1 / 66.8, 68.0 |
    /// | P4 | 21.2, 24.3 / 20.4, 19.8 | 21.0, 23.4 / 20.7, 20.0 | 20.0, 21.5 / 17.5, 17.5 |
    /// | P5 | 7.2, 7.7 / 8.6, 8.9 | 7.6, 8.1 / 8.8, 8.7 | 6.4, 7.4 / 5.9, 6.3 |
    /// | P3, spatial mask | 34.6, 35.1 / 32.3, 33.6 | 33.0, 34.1 / 30.2, 30.5 | 34.0, 35.6 / 32.5, 33.3 |
    /// | P4, spatial mask | 11.3, 11.5 / 12.8, 13.0 | 10.4, 10.6 / 10.9, 10.7 | 11.6, 11.9 / 13.0, 13.0 |
    /// | P4, channel mask | 9.7, 9.9 / 9.7, 11.0 | 10.0, 10.8 / 10.0, 9.7 | 11.1, 12.9 / 9.8, 9.5 |
    ///
    /// P5 stays F(4x4) in all passes: the forward engine loses there, and
    /// the weight gradient is even at best (two more rounds, medians of 9:
    /// dense 8.8, 7.5 / 7.3, 8.3 ms; under the loss's spatial mask 5.0, 4.9
    /// / 5.6, 5.9; channel mask 5.6, 6.1 / 4.3, 6.2). Under the spatial
    /// mask at P4 the loss's masked blobs leave fewer whole 8 x 8 windows
    /// to skip than 6 x 6 ones.
    ///
    /// The transform to run, or `None` for the direct conv.
    fn winograd_for<E: simd::Elem>(
        &self,
        args: &ConvArgs<E>,
        pass: Pass,
        x: Option<&[E]>,
    ) -> Option<Tiling> {
        let g = &args.geom;
        if !g.is_3x3_same() {
            return None;
        }
        match (self.algo, pass) {
            (ConvAlgo::Direct, _) => None,
            (ConvAlgo::Winograd, _) => Some(Tiling::F4),
            (ConvAlgo::Winograd6, _) => Some(Tiling::F6),
            (ConvAlgo::Auto, _) => {
                if TypeId::of::<E>() != TypeId::of::<f32>()
                    || g.c_in.min(g.c_out) < WINOGRAD_MIN_CHANNELS
                {
                    return None;
                }
                let positions = g.n * g.h * g.w;
                let big_enough = match pass {
                    Pass::Forward | Pass::Input => positions >= WINOGRAD_MIN_POSITIONS,
                    Pass::Weight => positions >= WINOGRAD_MIN_POSITIONS / 2,
                };
                if !big_enough {
                    return None;
                }
                let f6 = positions
                    >= match args.mask {
                        Some(InputMask::Spatial(_)) => WINOGRAD6_MIN_POSITIONS_SPATIAL,
                        _ => WINOGRAD6_MIN_POSITIONS,
                    };
                let tiling = if f6 { Tiling::F6 } else { Tiling::F4 };
                match x {
                    Some(x) if args.relu => {
                        // E is f32 here (checked above).
                        let mask = args.mask.as_ref().map(same::<InputMask<E>, InputMask<f32>>);
                        let x = pulp::bytemuck::cast_slice::<E, f32>(x);
                        let spread = Spread::of(x, [g.n, g.c_in, g.h * g.w], mask);
                        if tiling == Tiling::F6 && spread.within(WINOGRAD6_MAX_SPREAD) {
                            Some(Tiling::F6)
                        } else {
                            spread.within(WINOGRAD_MAX_SPREAD).then_some(Tiling::F4)
                        }
                    }
                    _ => Some(tiling),
                }
            }
        }
    }
}

/// How far the per-position magnitudes of a forward pass's input spread:
/// with `a(p) = max_c |x[n][c][p] * mask|` the magnitude at each position,
/// the largest `a` and the median `a` over the positions where `a` is not 0
/// (a position of exact zeros sends no rounding noise, and an output
/// reading only such positions is set exactly: `winograd::fwd`). Both are
/// exact (maxima and an order statistic), read from the data only, never
/// from the thread count or the instruction set, so the choice they make
/// keeps the bits reproducible.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    /// `(max a, median a)`; `None` for an all-zero operand.
    top_median: Option<(f32, f32)>,
}

impl Spread {
    /// True when `max a <= limit * median a` (always for an all-zero
    /// operand): narrow enough for a Winograd tile before a ReLU.
    fn within(self, limit: f32) -> bool {
        self.top_median
            .is_none_or(|(top, median)| top <= limit * median)
    }

    /// The spread of `x` (`[N, C, HW]`, times `mask` where given).
    fn of(x: &[f32], [n, c, hw]: [usize; 3], mask: Option<&InputMask<f32>>) -> Spread {
        // Chunks of positions of one image; each sweeps the channels.
        const CHUNK: usize = 4096;
        let mut a = vec![0.0f32; n * hw];
        let mut chunks: Vec<(usize, usize, &mut [f32])> = Vec::new();
        for (img, plane) in a.chunks_mut(hw.max(1)).enumerate() {
            for (j, part) in plane.chunks_mut(CHUNK).enumerate() {
                chunks.push((img, j * CHUNK, part));
            }
        }
        chunks.into_par_iter().for_each(|(img, p0, part)| {
            for ci in 0..c {
                let plane = &x[(img * c + ci) * hw + p0..][..part.len()];
                let f = match mask {
                    Some(InputMask::Channel(m)) => m.as_slice()[img * c + ci].abs(),
                    _ => 1.0,
                };
                for (acc, &v) in part.iter_mut().zip(plane) {
                    *acc = acc.max((v * f).abs());
                }
            }
            if let Some(InputMask::Spatial(m)) = mask {
                for (acc, &mv) in part.iter_mut().zip(&m.as_slice()[img * hw + p0..]) {
                    *acc *= mv.abs();
                }
            }
        });
        let mut live: Vec<f32> = a.into_iter().filter(|&v| v != 0.0).collect();
        if live.is_empty() {
            return Spread { top_median: None };
        }
        let top = live.iter().copied().fold(0.0f32, f32::max);
        let mid = live.len() / 2;
        let (_, &mut median, _) = live.select_nth_unstable_by(mid, f32::total_cmp);
        Spread {
            top_median: Some((top, median)),
        }
    }
}

/// `a` as its concrete type `B` (the caller checked `TypeId`s).
fn same<A: Any, B: Any>(a: &A) -> &B {
    (a as &dyn Any)
        .downcast_ref::<B>()
        .expect("element type checked by the caller")
}

/// Mutable version of [`same`].
fn same_mut<A: Any, B: Any>(a: &mut A) -> &mut B {
    (a as &mut dyn Any)
        .downcast_mut::<B>()
        .expect("element type checked by the caller")
}

/// Owned version of [`same`].
fn same_owned<A: Any, B: Any>(a: A) -> B {
    match (Box::new(a) as Box<dyn Any>).downcast::<B>() {
        Ok(b) => *b,
        Err(_) => unreachable!("element type checked by the caller"),
    }
}

/// `t` with `update` applied to its own elements, when `t` is the only
/// handle on them ([`Tensor::try_into_vec`]); otherwise `t` back, untouched,
/// for the caller to compute into a new buffer.
fn in_place<T: Float>(
    t: Tensor<T>,
    update: impl FnOnce(&mut [T]),
) -> std::result::Result<Tensor<T>, Tensor<T>> {
    let shape = t.shape().to_vec();
    let mut v = t.try_into_vec()?;
    update(&mut v);
    Ok(Tensor::from_parts(&shape, v))
}

/// The fused pair residual's operands: `b` and `t` of `a`'s shape.
fn check_pair_shapes<T: Float>(a: &Tensor<T>, b: &Tensor<T>, t: &Tensor<T>) -> Result<()> {
    for (what, x) in [("b", b), ("t", t)] {
        if x.shape() != a.shape() {
            return Err(Error::shape(
                "weighted_pair_residual",
                format!("{what} of shape {:?} for a of {:?}", x.shape(), a.shape()),
            ));
        }
    }
    Ok(())
}

/// The CPU backend's methods for any `Float`, on a borrowed [`CpuBackend`]
/// (whose fields it reaches through `Deref`). [`CpuBackend`] itself
/// implements `Backend<f32>` and `Backend<f64>` only, each method a
/// non-generic call into this impl (`forward_to_kernels!` below). That is
/// for the build, not the run: a generic impl is compiled again, kernels,
/// rayon jobs and SIMD variants included, in every crate that names it (the
/// binary, and the tests, benches and examples that build one), since rustc
/// shares generic instances between crates only in unoptimized builds; a
/// non-generic one is compiled once, here, and linked.
struct Kernels<'a>(&'a CpuBackend);

impl std::ops::Deref for Kernels<'_> {
    type Target = CpuBackend;
    fn deref(&self) -> &CpuBackend {
        self.0
    }
}

/// `impl Backend<$t> for CpuBackend`, every method of the trait (the
/// provided ones included, which the generic impl overrides) forwarded to
/// [`Kernels`].
macro_rules! forward_to_kernels {
    ($t:ty) => {
        impl Backend<$t> for CpuBackend {
            fn name(&self) -> String {
                Backend::<$t>::name(&Kernels(self))
            }
            fn conv2d(
                &self,
                x: &Tensor<$t>,
                w: &Tensor<$t>,
                b: Option<&Tensor<$t>>,
                args: &ConvArgs<$t>,
            ) -> Result<Tensor<$t>> {
                Kernels(self).conv2d(x, w, b, args)
            }
            fn conv2d_backward_input(
                &self,
                dy: &Tensor<$t>,
                w: &Tensor<$t>,
                args: &ConvArgs<$t>,
            ) -> Result<Tensor<$t>> {
                Kernels(self).conv2d_backward_input(dy, w, args)
            }
            fn conv2d_backward_weight(
                &self,
                dy: &Tensor<$t>,
                x: &Tensor<$t>,
                args: &ConvArgs<$t>,
            ) -> Result<Tensor<$t>> {
                Kernels(self).conv2d_backward_weight(dy, x, args)
            }
            fn conv2d_backward_bias(&self, dy: &Tensor<$t>) -> Result<Tensor<$t>> {
                Kernels(self).conv2d_backward_bias(dy)
            }
            fn conv2d_add(
                &self,
                base: Tensor<$t>,
                x: &Tensor<$t>,
                w: &Tensor<$t>,
                b: Option<&Tensor<$t>>,
                args: &ConvArgs<$t>,
            ) -> Result<Tensor<$t>> {
                Kernels(self).conv2d_add(base, x, w, b, args)
            }
            fn unary(&self, op: Unary, x: &Tensor<$t>) -> Result<Tensor<$t>> {
                Kernels(self).unary(op, x)
            }
            fn unary_backward(
                &self,
                op: Unary,
                x: &Tensor<$t>,
                y: &Tensor<$t>,
                dy: &Tensor<$t>,
            ) -> Result<Tensor<$t>> {
                Kernels(self).unary_backward(op, x, y, dy)
            }
            fn binary(
                &self,
                op: Binary,
                a: &Tensor<$t>,
                b: &Tensor<$t>,
                out_shape: &[usize],
            ) -> Result<Tensor<$t>> {
                Kernels(self).binary(op, a, b, out_shape)
            }
            fn unary_owned(&self, op: Unary, x: Tensor<$t>) -> Result<Tensor<$t>> {
                Kernels(self).unary_owned(op, x)
            }
            fn unary_backward_owned(
                &self,
                op: Unary,
                x: &Tensor<$t>,
                y: &Tensor<$t>,
                dy: Tensor<$t>,
            ) -> Result<Tensor<$t>> {
                Kernels(self).unary_backward_owned(op, x, y, dy)
            }
            fn binary_owned(
                &self,
                op: Binary,
                a: Tensor<$t>,
                b: &Tensor<$t>,
                out_shape: &[usize],
            ) -> Result<Tensor<$t>> {
                Kernels(self).binary_owned(op, a, b, out_shape)
            }
            fn mask_mul(&self, x: &Tensor<$t>, mask: &InputMask<$t>) -> Result<Tensor<$t>> {
                Kernels(self).mask_mul(x, mask)
            }
            fn sum_axes(&self, x: &Tensor<$t>, axes: &[usize]) -> Result<Tensor<$t>> {
                Kernels(self).sum_axes(x, axes)
            }
            fn broadcast_to(&self, x: &Tensor<$t>, shape: &[usize]) -> Result<Tensor<$t>> {
                Kernels(self).broadcast_to(x, shape)
            }
            fn softmax(&self, x: &Tensor<$t>, axis: usize) -> Result<Tensor<$t>> {
                Kernels(self).softmax(x, axis)
            }
            fn softmax_backward(
                &self,
                y: &Tensor<$t>,
                dy: &Tensor<$t>,
                axis: usize,
            ) -> Result<Tensor<$t>> {
                Kernels(self).softmax_backward(y, dy, axis)
            }
            fn narrow(
                &self,
                x: &Tensor<$t>,
                axis: usize,
                start: usize,
                len: usize,
            ) -> Result<Tensor<$t>> {
                Kernels(self).narrow(x, axis, start, len)
            }
            fn narrow_backward(
                &self,
                dy: &Tensor<$t>,
                shape: &[usize],
                axis: usize,
                start: usize,
            ) -> Result<Tensor<$t>> {
                Kernels(self).narrow_backward(dy, shape, axis, start)
            }
            fn sq_err_sum(&self, a: &Tensor<$t>, b: &Tensor<$t>) -> Result<Tensor<$t>> {
                Kernels(self).sq_err_sum(a, b)
            }
            fn sq_err_backward(&self, a: &Tensor<$t>, b: &Tensor<$t>, g: $t) -> Result<Tensor<$t>> {
                Kernels(self).sq_err_backward(a, b, g)
            }
            fn weighted_pair_residual(
                &self,
                a: &Tensor<$t>,
                b: &Tensor<$t>,
                wa: $t,
                wb: $t,
                t: &Tensor<$t>,
            ) -> Result<PairResidual<$t>> {
                Kernels(self).weighted_pair_residual(a, b, wa, wb, t)
            }
            fn weighted_pair_residual_owned(
                &self,
                a: Tensor<$t>,
                b: &Tensor<$t>,
                wa: $t,
                wb: $t,
                t: &Tensor<$t>,
            ) -> Result<PairResidual<$t>> {
                Kernels(self).weighted_pair_residual_owned(a, b, wa, wb, t)
            }
        }
    };
}
forward_to_kernels!(f32);
forward_to_kernels!(f64);

impl<T: Float> Backend<T> for Kernels<'_> {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn conv2d(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: Option<&Tensor<T>>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let y = per_elem!(T, E => {
            let a: &ConvArgs<E> = same(args);
            let x: &Tensor<E> = same(x);
            let w: &Tensor<E> = same(w);
            let b: Option<&Tensor<E>> = b.map(same);
            let (x, w, b) = (x.as_slice(), w.as_slice(), b.map(Tensor::as_slice));
            let cx = self.ctx(Pass::Forward);
            let y = if let Some(tiling) = self.winograd_for(a, Pass::Forward, Some(x)) {
                cx.tally.winograd_call(tiling);
                winograd::conv2d(x, w, b, a, tiling, cx)
            } else {
                cx.tally.direct_call();
                conv_fwd::conv2d(x, w, b, a, cx)
            };
            same_owned::<Tensor<E>, Tensor<T>>(Tensor::from_parts(&a.geom.output_shape(), y))
        });
        match y {
            Some(y) => Ok(y),
            None => ReferenceBackend.conv2d(x, w, b, args),
        }
    }

    /// The direct dense pass writes `base + y` over `base`'s own buffer
    /// when nothing else holds it; a Winograd pass, a channel mask with
    /// zeros or a shared `base` adds a separate conv's output.
    fn conv2d_add(
        &self,
        base: Tensor<T>,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: Option<&Tensor<T>>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let shape = args.geom.output_shape();
        let direct = base.shape() == shape.as_slice()
            && per_elem!(T, E => {
                let a: &ConvArgs<E> = same(args);
                let x: &Tensor<E> = same(x);
                conv_fwd::sparse_channels(a.mask.as_ref()).is_none()
                    && self.winograd_for(a, Pass::Forward, Some(x.as_slice())).is_none()
            }) == Some(true);
        let base = if direct {
            base.try_into_vec()
        } else {
            Err(base)
        };
        let mut v = match base {
            Ok(v) => v,
            Err(base) => return conv2d_add_separately(self, base, x, w, b, args),
        };
        per_elem!(T, E => {
            let a: &ConvArgs<E> = same(args);
            let (x, w): (&Tensor<E>, &Tensor<E>) = (same(x), same(w));
            let b = b.map(|b| same::<Tensor<T>, Tensor<E>>(b).as_slice());
            let v: &mut Vec<E> = same_mut(&mut v);
            let cx = self.ctx(Pass::Forward);
            cx.tally.direct_call();
            cx.tally.added_in_place();
            conv_fwd::conv2d_add(v, x.as_slice(), w.as_slice(), b, a, cx)
        });
        Ok(Tensor::from_parts(&shape, v))
    }

    fn conv2d_backward_input(
        &self,
        dy: &Tensor<T>,
        w: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let dx = per_elem!(T, E => {
            let a: &ConvArgs<E> = same(args);
            let dy: &Tensor<E> = same(dy);
            let w: &Tensor<E> = same(w);
            let (dy, w) = (dy.as_slice(), w.as_slice());
            let cx = self.ctx(Pass::Input);
            let dx = if let Some(tiling) = self.winograd_for(a, Pass::Input, None) {
                cx.tally.winograd_call(tiling);
                winograd::conv2d_backward_input(dy, w, a, tiling, cx)
            } else {
                cx.tally.direct_call();
                conv_bwd::conv2d_backward_input(dy, w, a, cx)
            };
            same_owned::<Tensor<E>, Tensor<T>>(Tensor::from_parts(&a.geom.input_shape(), dx))
        });
        match dx {
            Some(dx) => Ok(dx),
            None => ReferenceBackend.conv2d_backward_input(dy, w, args),
        }
    }

    fn conv2d_backward_weight(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let dw = per_elem!(T, E => {
            let a: &ConvArgs<E> = same(args);
            let dy: &Tensor<E> = same(dy);
            let x: &Tensor<E> = same(x);
            let (dy, x) = (dy.as_slice(), x.as_slice());
            let cx = self.ctx(Pass::Weight);
            let dw = if let Some(tiling) = self.winograd_for(a, Pass::Weight, None) {
                cx.tally.winograd_call(tiling);
                winograd::conv2d_backward_weight(dy, x, a, tiling, cx)
            } else {
                cx.tally.direct_call();
                conv_bwd::conv2d_backward_weight(dy, x, a, cx)
            };
            same_owned::<Tensor<E>, Tensor<T>>(Tensor::from_parts(&a.geom.weight_shape(), dw))
        });
        match dw {
            Some(dw) => Ok(dw),
            None => ReferenceBackend.conv2d_backward_weight(dy, x, args),
        }
    }

    fn conv2d_backward_bias(&self, dy: &Tensor<T>) -> Result<Tensor<T>> {
        let dims = dy.dims4("conv2d_backward_bias")?;
        let db = per_elem!(T, E => {
            let dy: &Tensor<E> = same(dy);
            let db = conv_bwd::conv2d_backward_bias(dy.as_slice(), dims);
            same_owned::<Tensor<E>, Tensor<T>>(Tensor::from_parts(&[dims[1]], db))
        });
        match db {
            Some(db) => Ok(db),
            None => ReferenceBackend.conv2d_backward_bias(dy),
        }
    }

    fn unary(&self, op: Unary, x: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(Tensor::from_parts(
            x.shape(),
            elementwise::unary(op, x.as_slice()),
        ))
    }

    fn unary_backward(
        &self,
        op: Unary,
        x: &Tensor<T>,
        y: &Tensor<T>,
        dy: &Tensor<T>,
    ) -> Result<Tensor<T>> {
        let out = elementwise::unary_backward(op, x.as_slice(), y.as_slice(), dy.as_slice());
        Ok(Tensor::from_parts(x.shape(), out))
    }

    fn binary(
        &self,
        op: Binary,
        a: &Tensor<T>,
        b: &Tensor<T>,
        out_shape: &[usize],
    ) -> Result<Tensor<T>> {
        let out = elementwise::binary(
            op,
            a.as_slice(),
            a.shape(),
            b.as_slice(),
            b.shape(),
            out_shape,
        );
        Ok(Tensor::from_parts(out_shape, out))
    }

    fn unary_owned(&self, op: Unary, x: Tensor<T>) -> Result<Tensor<T>> {
        in_place(x, |v| elementwise::unary_in_place(op, v)).or_else(|x| self.unary(op, &x))
    }

    fn unary_backward_owned(
        &self,
        op: Unary,
        x: &Tensor<T>,
        y: &Tensor<T>,
        dy: Tensor<T>,
    ) -> Result<Tensor<T>> {
        in_place(dy, |g| {
            elementwise::unary_backward_in_place(op, x.as_slice(), y.as_slice(), g)
        })
        .or_else(|dy| self.unary_backward(op, x, y, &dy))
    }

    fn binary_owned(
        &self,
        op: Binary,
        a: Tensor<T>,
        b: &Tensor<T>,
        out_shape: &[usize],
    ) -> Result<Tensor<T>> {
        if a.shape() != out_shape || b.shape() != out_shape {
            return self.binary(op, &a, b, out_shape);
        }
        in_place(a, |v| elementwise::binary_in_place(op, v, b.as_slice()))
            .or_else(|a| self.binary(op, &a, b, out_shape))
    }

    fn mask_mul(&self, x: &Tensor<T>, mask: &InputMask<T>) -> Result<Tensor<T>> {
        let dims = x.dims4("mask_mul")?;
        Ok(Tensor::from_parts(
            x.shape(),
            elementwise::mask_mul(x.as_slice(), dims, mask),
        ))
    }

    fn sum_axes(&self, x: &Tensor<T>, axes: &[usize]) -> Result<Tensor<T>> {
        let out_shape = crate::shape::reduced_shape(x.shape(), axes);
        let out = reduce::sum_axes(x.as_slice(), x.shape(), axes);
        Ok(Tensor::from_parts(&out_shape, out))
    }

    fn broadcast_to(&self, x: &Tensor<T>, shape: &[usize]) -> Result<Tensor<T>> {
        Ok(Tensor::from_parts(
            shape,
            elementwise::broadcast_to(x.as_slice(), x.shape(), shape),
        ))
    }

    fn softmax(&self, x: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        Ok(Tensor::from_parts(
            x.shape(),
            reduce::softmax(x.as_slice(), x.shape(), axis),
        ))
    }

    fn softmax_backward(&self, y: &Tensor<T>, dy: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        Ok(Tensor::from_parts(
            y.shape(),
            reduce::softmax_backward(y.as_slice(), dy.as_slice(), y.shape(), axis),
        ))
    }

    fn narrow(&self, x: &Tensor<T>, axis: usize, start: usize, len: usize) -> Result<Tensor<T>> {
        let mut shape = x.shape().to_vec();
        shape[axis] = len;
        Ok(Tensor::from_parts(
            &shape,
            elementwise::narrow(x.as_slice(), x.shape(), axis, start, len),
        ))
    }

    fn narrow_backward(
        &self,
        dy: &Tensor<T>,
        shape: &[usize],
        axis: usize,
        start: usize,
    ) -> Result<Tensor<T>> {
        let len = dy.shape()[axis];
        Ok(Tensor::from_parts(
            shape,
            elementwise::narrow_backward(dy.as_slice(), shape, axis, start, len),
        ))
    }

    fn sq_err_sum(&self, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(Tensor::scalar(reduce::sq_err_sum(
            a.as_slice(),
            b.as_slice(),
        )))
    }

    fn sq_err_backward(&self, a: &Tensor<T>, b: &Tensor<T>, g: T) -> Result<Tensor<T>> {
        Ok(Tensor::from_parts(
            a.shape(),
            elementwise::sq_err_backward(a.as_slice(), b.as_slice(), g),
        ))
    }

    fn weighted_pair_residual(
        &self,
        a: &Tensor<T>,
        b: &Tensor<T>,
        wa: T,
        wb: T,
        t: &Tensor<T>,
    ) -> Result<PairResidual<T>> {
        check_pair_shapes(a, b, t)?;
        let (r, [sq_sum, dot_a, dot_b]) =
            reduce::weighted_pair_residual(a.as_slice(), b.as_slice(), t.as_slice(), wa, wb);
        Ok(PairResidual {
            residual: Tensor::from_parts(a.shape(), r),
            sq_sum,
            dot_a,
            dot_b,
        })
    }

    fn weighted_pair_residual_owned(
        &self,
        a: Tensor<T>,
        b: &Tensor<T>,
        wa: T,
        wb: T,
        t: &Tensor<T>,
    ) -> Result<PairResidual<T>> {
        check_pair_shapes(&a, b, t)?;
        let shape = a.shape().to_vec();
        match a.try_into_vec() {
            Ok(mut v) => {
                let [sq_sum, dot_a, dot_b] =
                    reduce::weighted_pair_residual_into(&mut v, b.as_slice(), t.as_slice(), wa, wb);
                Ok(PairResidual {
                    residual: Tensor::from_parts(&shape, v),
                    sq_sum,
                    dot_a,
                    dot_b,
                })
            }
            Err(a) => self.weighted_pair_residual(&a, b, wa, wb, t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ConvGeometry;

    fn args<E: Float>(n: usize, c: usize, h: usize, w: usize, k: usize, s: usize) -> ConvArgs<E> {
        ConvArgs {
            geom: ConvGeometry::new(&[n, c, h, w], &[c, c, k, k], [s, s], [k / 2, k / 2]).unwrap(),
            mask: None,
            relu: false,
        }
    }

    /// `conv2d_add` against the element-wise add of `base` and `conv2d`,
    /// bit for bit, in f32 and f64, in pools of 1-3 threads: the direct
    /// pass (dense or under a spatial mask; no bias, a bias, a bias and a
    /// ReLU) adds its outputs into a sole `base`'s buffer as it computes
    /// them; a channel mask with zeros or a Winograd pass adds a separate
    /// output; a `base` held elsewhere gets a new buffer and is left as it
    /// was.
    #[test]
    fn conv2d_add_is_the_add_of_the_conv_with_the_same_bits() {
        use super::testing::{assert_same_bits, in_pools, three_image_mask, values};
        fn check<E: Float + simd::Elem>()
        where
            CpuBackend: Backend<E>,
        {
            let (n, c, co, h, w) = (3, 3, 4, 7, 9);
            let t = |shape: &[usize], v: Vec<f64>| {
                Tensor::<E>::from_vec(shape, v.into_iter().map(E::from_f64).collect()).unwrap()
            };
            let x = t(&[n, c, h, w], values(n * c * h * w, 1));
            let wt = t(&[co, c, 3, 3], values(co * c * 9, 2));
            let bias = t(&[co], values(co, 3));
            let base = t(&[n, co, h, w], values(n * co * h * w, 4));
            let old = base.to_vec();
            let spatial = InputMask::Spatial(t(&[n, h, w], three_image_mask(h, w)));
            let kept: Vec<f64> = (0..n * c).map(|i| (i % 2) as f64 * 0.75).collect();
            let channel = InputMask::Channel(t(&[n, c], kept));
            let cases = [
                (ConvAlgo::Auto, "none", None, true),
                (ConvAlgo::Auto, "spatial", Some(spatial), true),
                (ConvAlgo::Auto, "channel", Some(channel), false),
                (ConvAlgo::Winograd, "none", None, false),
            ];
            for (algo, kind, mask, fused) in cases {
                let be = CpuBackend::new(algo);
                for (b, relu) in [(None, false), (Some(&bias), false), (Some(&bias), true)] {
                    let what = format!("{algo:?}, mask {kind}, bias {}, relu {relu}", b.is_some());
                    let args = ConvArgs {
                        geom: ConvGeometry::new(x.shape(), wt.shape(), [1, 1], [1, 1]).unwrap(),
                        mask: mask.clone(),
                        relu,
                    };
                    let y = be.conv2d(&x, &wt, b, &args).unwrap();
                    let want = be.binary(Binary::Add, &base, &y, base.shape()).unwrap();
                    be.take_counters();
                    // A sole base holds the result either way (the
                    // separate output is added into it by `binary_owned`).
                    for (in_place, got) in in_pools(|| {
                        let sole = Tensor::from_vec(base.shape(), base.to_vec()).unwrap();
                        let at = sole.as_slice().as_ptr();
                        let got = be.conv2d_add(sole, &x, &wt, b, &args).unwrap();
                        (got.as_slice().as_ptr() == at, got)
                    }) {
                        assert!(in_place, "{what}");
                        assert_same_bits(&got, &want, &what);
                    }
                    let added = be.take_counters().forward.added_in_place;
                    assert_eq!(added, if fused { 3 } else { 0 }, "{what}");
                    let got = be.conv2d_add(base.clone(), &x, &wt, b, &args).unwrap();
                    assert_ne!(got.as_slice().as_ptr(), base.as_slice().as_ptr(), "{what}");
                    assert_same_bits(&got, &want, &what);
                    assert_eq!(base.to_vec(), old, "{what}");
                    assert_eq!(be.take_counters().forward.added_in_place, 0, "{what}");
                }
            }
        }
        check::<f32>();
        check::<f64>();
    }

    #[test]
    fn conv_algo_picks_winograd_where_the_rule_says() {
        let (direct, wino, wino6, auto) = (
            CpuBackend::new(ConvAlgo::Direct),
            CpuBackend::new(ConvAlgo::Winograd),
            CpuBackend::new(ConvAlgo::Winograd6),
            CpuBackend::new(ConvAlgo::Auto),
        );
        let p3 = args::<f32>(2, 256, 100, 168, 3, 1);
        let p4 = args::<f32>(2, 256, 50, 84, 3, 1);
        let p5 = args::<f32>(2, 256, 25, 42, 3, 1);
        let p6 = args::<f32>(2, 256, 13, 21, 3, 1);
        let p7 = args::<f32>(2, 256, 7, 11, 3, 1);
        let f64_p3 = args::<f64>(2, 256, 100, 168, 3, 1);
        let one = args::<f32>(2, 256, 100, 168, 1, 1);
        let strided = args::<f32>(2, 256, 100, 168, 3, 2);
        let thin = args::<f32>(2, 8, 100, 168, 3, 1);
        let (f4, f6) = (Some(Tiling::F4), Some(Tiling::F6));
        // The same convolution under a spatial mask (of ones: the rule
        // reads the mask's kind, not its values).
        let spatial = |a: &ConvArgs<f32>| {
            let g = a.geom;
            let ones = vec![1.0f32; g.n * g.h * g.w];
            ConvArgs {
                mask: Some(InputMask::Spatial(
                    Tensor::from_vec(&[g.n, g.h, g.w], ones).unwrap(),
                )),
                ..a.clone()
            }
        };
        for pass in [Pass::Forward, Pass::Input, Pass::Weight] {
            assert_eq!(direct.winograd_for(&p3, pass, None), None);
            for a in [&p3, &p7] {
                assert_eq!(wino.winograd_for(a, pass, None), f4);
                assert_eq!(wino6.winograd_for(a, pass, None), f6);
            }
            assert_eq!(wino.winograd_for(&f64_p3, pass, None), f4);
            assert_eq!(wino6.winograd_for(&f64_p3, pass, None), f6);
            for be in [&wino, &wino6, &auto] {
                assert_eq!(be.winograd_for(&one, pass, None), None);
                assert_eq!(be.winograd_for(&strided, pass, None), None);
            }
            assert_eq!(auto.winograd_for(&p3, pass, None), f6);
            assert_eq!(auto.winograd_for(&p4, pass, None), f6);
            // Under a spatial mask, F(6x6) from P3 (33600) on, not at P4
            // (8400).
            assert_eq!(auto.winograd_for(&spatial(&p3), pass, None), f6);
            assert_eq!(auto.winograd_for(&spatial(&p4), pass, None), f4);
            assert_eq!(wino6.winograd_for(&spatial(&p4), pass, None), f6);
            // P5 (N*H*W = 2100): F(4x4) for all three passes.
            assert_eq!(auto.winograd_for(&p5, pass, None), f4);
            assert_eq!(auto.winograd_for(&p6, pass, None), None);
            assert_eq!(auto.winograd_for(&p7, pass, None), None);
            assert_eq!(auto.winograd_for(&f64_p3, pass, None), None);
            assert_eq!(auto.winograd_for(&thin, pass, None), None);
        }
        // The thresholds themselves: N*H*W = 2048 / 2047 for the forward
        // and input passes, 1024 / 1023 for the weight gradient, 8192 /
        // 8191 for F(6x6) (16384 / 16383 under a spatial mask), and 16 /
        // 15 channels.
        let at = |n: usize, c: usize, h: usize, w: usize| args::<f32>(n, c, h, w, 3, 1);
        for pass in [Pass::Forward, Pass::Input] {
            assert_eq!(auto.winograd_for(&at(2, 64, 32, 32), pass, None), f4);
            assert_eq!(auto.winograd_for(&at(1, 64, 23, 89), pass, None), None);
        }
        for pass in [Pass::Forward, Pass::Input, Pass::Weight] {
            assert_eq!(auto.winograd_for(&at(2, 64, 64, 64), pass, None), f6);
            assert_eq!(auto.winograd_for(&at(1, 64, 1, 8191), pass, None), f4);
            let (on, below) = (at(4, 64, 64, 64), at(1, 64, 1, 16383));
            assert_eq!(auto.winograd_for(&spatial(&on), pass, None), f6);
            assert_eq!(auto.winograd_for(&spatial(&below), pass, None), f4);
        }
        assert_eq!(WINOGRAD6_MIN_POSITIONS, 8192);
        assert_eq!(WINOGRAD6_MIN_POSITIONS_SPATIAL, 16384);
        assert_eq!(
            auto.winograd_for(&at(1, 64, 32, 32), Pass::Weight, None),
            f4
        );
        assert_eq!(
            auto.winograd_for(&at(1, 64, 31, 33), Pass::Weight, None),
            None
        );
        assert_eq!(
            auto.winograd_for(&at(2, 16, 32, 32), Pass::Forward, None),
            f4
        );
        assert_eq!(
            auto.winograd_for(&at(2, 15, 32, 32), Pass::Forward, None),
            None
        );
    }

    /// [`Spread::within`] at the `auto` rule's F(4x4) limit, as the spread
    /// test below checks it.
    fn winograd_spread_ok(x: &[f32], dims: [usize; 3], mask: Option<&InputMask<f32>>) -> bool {
        Spread::of(x, dims, mask).within(WINOGRAD_MAX_SPREAD)
    }

    /// The spread test against its definition: `a(p) = max_c |x * mask|`,
    /// zeros left out of the median, `max <= WINOGRAD_MAX_SPREAD * median`
    /// (256); at the bound and just past it, with each kind of mask, and an
    /// all-zero operand.
    #[test]
    fn winograd_spread_ok_compares_the_largest_magnitude_with_the_median() {
        let (n, c, hw) = (2, 3, 10);
        // Per position of image 0 and 1: channel 1 holds the magnitude,
        // the others smaller values of both signs.
        let plane = |img: usize, ci: usize, p: usize, top: f32| -> f32 {
            let base = 1.0 + (p % 5) as f32 * 0.25;
            let v = match (img, p) {
                (1, 7) => top,
                _ => base,
            };
            match ci {
                1 => -v,
                _ => 0.5 * base * if p.is_multiple_of(2) { 1.0 } else { -1.0 },
            }
        };
        let data = |top: f32| -> Vec<f32> {
            (0..n * c * hw)
                .map(|i| plane(i / (c * hw), (i / hw) % c, i % hw, top))
                .collect()
        };
        // The median of the 20 magnitudes {1, 1.25, ..., 2} repeated, one
        // replaced by `top`: position 10 of the sorted 20 values is 1.5.
        let (median, bound) = (1.5f32, WINOGRAD_MAX_SPREAD);
        assert_eq!(bound, 256.0);
        assert!(winograd_spread_ok(&data(bound * median), [n, c, hw], None));
        assert!(!winograd_spread_ok(
            &data(bound * median * 1.001),
            [n, c, hw],
            None
        ));
        assert!(winograd_spread_ok(&data(-bound * median), [n, c, hw], None));
        assert!(!winograd_spread_ok(
            &data(-1.1 * bound * median),
            [n, c, hw],
            None
        ));
        // And at F(6x6)'s limit (32).
        let (b6, dims) = (WINOGRAD6_MAX_SPREAD, [n, c, hw]);
        assert_eq!(b6, 32.0);
        assert!(Spread::of(&data(b6 * median), dims, None).within(b6));
        assert!(!Spread::of(&data(b6 * median * 1.001), dims, None).within(b6));
        assert!(Spread::of(&data(b6 * median * 1.001), dims, None).within(bound));
        // A spatial mask that zeroes the spike's position keeps it out; one
        // that keeps only three positions measures only them.
        let mut sp = vec![1.0f32; n * hw];
        sp[hw + 7] = 0.0;
        let spike = data(1e4);
        // Masks as the backend gets them: `[N, 1, HW]` (the scan reads the
        // plane flat) and `[N, C]`.
        let spatial = |v: &[f32]| {
            InputMask::Spatial(Tensor::from_vec(&[v.len() / hw, 1, hw], v.to_vec()).unwrap())
        };
        let channel =
            |v: &[f32]| InputMask::Channel(Tensor::from_vec(&[n, c], v.to_vec()).unwrap());
        let spike_ok = |m: InputMask<f32>| winograd_spread_ok(&spike, [n, c, hw], Some(&m));
        assert!(spike_ok(spatial(&sp)));
        // Three positions: magnitudes 0.875, 1 and 1e4, median 1.
        let mut three = vec![0.0f32; n * hw];
        three[hw + 7] = 1.0;
        three[3] = 0.5;
        three[4] = 0.5;
        assert!(!spike_ok(spatial(&three)));
        // The mask's factor scales the magnitude: 1/200 at the spike brings
        // 1e4 down to 50 (< 256 * 1.5).
        sp[hw + 7] = 1.0 / 200.0;
        assert!(spike_ok(spatial(&sp)));
        // A channel mask that zeroes channel 1 of image 1 (the spike's)
        // leaves channel 0 and 2's values, all within 2x of each other.
        let mut ch = vec![1.0f32; n * c];
        ch[c + 1] = 0.0;
        assert!(spike_ok(channel(&ch)));
        // A factor that scales: 1/200 on the spike's channel brings 1e4 to 50.
        ch[c + 1] = 1.0 / 200.0;
        assert!(spike_ok(channel(&ch)));
        ch[c + 1] = 1.0;
        assert!(!spike_ok(channel(&ch)));
        // Zeros: an all-zero operand, and one spike among zeros (the median
        // of the one live position is itself).
        assert!(winograd_spread_ok(&vec![0.0; n * c * hw], [n, c, hw], None));
        let mut lone = vec![0.0f32; n * c * hw];
        lone[5] = 1e30;
        assert!(winograd_spread_ok(&lone, [n, c, hw], None));
        // Positions in more than one chunk of the scan (4096): a spike in
        // the second chunk of the second image is seen.
        let big = 5000;
        let mut x = vec![1.0f32; 2 * big];
        assert!(winograd_spread_ok(&x, [2, 1, big], None));
        x[big + 4500] = 257.0;
        assert!(!winograd_spread_ok(&x, [2, 1, big], None));
        // A spatial mask read at the same position in that chunk: zero
        // there keeps the spike out, zero at the chunk's position in the
        // first image (or at the same offset from the chunk's start) does not.
        let big_mask =
            |m: &[f32]| InputMask::Spatial(Tensor::from_vec(&[2, 1, big], m.to_vec()).unwrap());
        let mut m = vec![1.0f32; 2 * big];
        m[big + 4500] = 0.0;
        assert!(winograd_spread_ok(&x, [2, 1, big], Some(&big_mask(&m))));
        m[big + 4500] = 1.0;
        m[4500] = 0.0;
        m[big + 4500 - 4096] = 0.0;
        assert!(!winograd_spread_ok(&x, [2, 1, big], Some(&big_mask(&m))));
    }

    /// `auto` keeps a forward pass with a ReLU direct when its input
    /// spreads too far, and only then: the same input without the ReLU, the
    /// input gradient, the weight gradient and forced Winograd take
    /// Winograd.
    #[test]
    fn auto_keeps_a_spread_input_before_a_relu_direct() {
        let (auto, wino) = (
            CpuBackend::new(ConvAlgo::Auto),
            CpuBackend::new(ConvAlgo::Winograd),
        );
        let mut a = args::<f32>(1, 16, 32, 64, 3, 1);
        let smooth: Vec<f32> = (0..16 * 32 * 64).map(|i| 1.0 + (i % 7) as f32).collect();
        // The spike at the last position of the last channel: a scan that
        // read a plane of the wrong size would stop short of it.
        let mut spiky = smooth.clone();
        *spiky.last_mut().unwrap() = 1e4;
        a.relu = true;
        assert_eq!(
            auto.winograd_for(&a, Pass::Forward, Some(&smooth)),
            Some(Tiling::F4)
        );
        assert_eq!(auto.winograd_for(&a, Pass::Forward, Some(&spiky)), None);
        assert_eq!(
            wino.winograd_for(&a, Pass::Forward, Some(&spiky)),
            Some(Tiling::F4)
        );
        a.relu = false;
        assert_eq!(
            auto.winograd_for(&a, Pass::Forward, Some(&spiky)),
            Some(Tiling::F4)
        );
        a.relu = true;
        assert_eq!(auto.winograd_for(&a, Pass::Input, None), Some(Tiling::F4));
        assert_eq!(auto.winograd_for(&a, Pass::Weight, None), Some(Tiling::F4));
        // Through the backend: the spiky forward with a ReLU counts a
        // direct call, the smooth one a Winograd call.
        let x = |v: &Vec<f32>| Tensor::from_vec(&[1, 16, 32, 64], v.clone()).unwrap();
        let w = Tensor::from_vec(&[16, 16, 3, 3], vec![0.01f32; 16 * 16 * 9]).unwrap();
        auto.take_counters();
        auto.conv2d(&x(&spiky), &w, None, &a).unwrap();
        let c = auto.take_counters();
        assert_eq!((c.forward.direct_calls, c.forward.winograd_calls), (1, 0));
        auto.conv2d(&x(&smooth), &w, None, &a).unwrap();
        let c = auto.take_counters();
        assert_eq!((c.forward.direct_calls, c.forward.winograd_calls), (0, 1));
        assert_eq!(c.forward.winograd6_calls, 0);
    }

    /// From [`WINOGRAD6_MIN_POSITIONS`] on, `auto` runs a forward pass with
    /// a ReLU by F(6x6) while its input spreads at most
    /// [`WINOGRAD6_MAX_SPREAD`], by F(4x4) up to [`WINOGRAD_MAX_SPREAD`],
    /// direct beyond; without the ReLU, and for the input gradient, by
    /// F(6x6) whatever the data.
    #[test]
    fn auto_steps_down_from_f6_to_f4_to_direct_as_the_input_spreads() {
        let (auto, (c, h, w)) = (CpuBackend::new(ConvAlgo::Auto), (16, 64, 128));
        let mut a = args::<f32>(1, c, h, w, 3, 1);
        a.relu = true;
        // Magnitudes 1..7 per position (median 4 or so); one spike at the
        // last position of the last channel.
        let smooth: Vec<f32> = (0..c * h * w).map(|i| 1.0 + (i % 7) as f32).collect();
        let spiked = |v: f32| {
            let mut x = smooth.clone();
            *x.last_mut().unwrap() = v;
            x
        };
        let (f4, f6) = (Some(Tiling::F4), Some(Tiling::F6));
        assert_eq!(auto.winograd_for(&a, Pass::Forward, Some(&smooth)), f6);
        assert_eq!(
            auto.winograd_for(&a, Pass::Forward, Some(&spiked(500.0))),
            f4
        );
        assert_eq!(
            auto.winograd_for(&a, Pass::Forward, Some(&spiked(1e4))),
            None
        );
        a.relu = false;
        assert_eq!(auto.winograd_for(&a, Pass::Forward, Some(&spiked(1e4))), f6);
        assert_eq!(auto.winograd_for(&a, Pass::Input, None), f6);
        // Through the backend: the counters see the F(6x6) call.
        a.relu = true;
        let x = Tensor::from_vec(&[1, c, h, w], smooth.clone()).unwrap();
        let wt = Tensor::from_vec(&[c, c, 3, 3], vec![0.01f32; c * c * 9]).unwrap();
        auto.take_counters();
        auto.conv2d(&x, &wt, None, &a).unwrap();
        let got = auto.take_counters().forward;
        assert_eq!((got.winograd_calls, got.winograd6_calls), (1, 1));
    }

    /// `--conv-algo` names parse to their algorithms (a parser that
    /// returned the default would quietly run `auto` for `direct`) and
    /// print back as the same names; the
    /// backend reports itself as `cpu` (bench's `backend` field).
    #[test]
    fn conv_algo_names_parse_and_the_backend_is_named_cpu() {
        for (name, algo) in [
            ("direct", ConvAlgo::Direct),
            ("winograd", ConvAlgo::Winograd),
            ("winograd6", ConvAlgo::Winograd6),
            ("auto", ConvAlgo::Auto),
        ] {
            assert_eq!(name.parse::<ConvAlgo>().unwrap(), algo);
            assert_eq!(algo.to_string(), name);
        }
        let e = "fft".parse::<ConvAlgo>().unwrap_err().to_string();
        assert!(e.contains("unknown conv algorithm `fft`"), "{e}");
        let be = CpuBackend::new(ConvAlgo::Auto);
        assert_eq!(Backend::<f32>::name(&be), "cpu");
    }
}
