//! Work counters: what the convolutions of one [`CpuBackend`] did, per
//! pass. Every path gives the same bits by design, so no numeric test can
//! tell whether masked work was skipped, weights were packed or Winograd
//! ran; these counts can (`tests/counters.rs` asserts them) and `dmkd bench
//! --counters` shows them.
//!
//! They describe the work, not the code's current blocking where that can
//! be helped: multiply-adds are the products of the algorithm's own GEMMs
//! that were computed (padding lanes and rows of partial kernel tiles are
//! not counted), packing counts weight values. Tiles are the units a
//! spatial mask skips, which are blocking-dependent by nature; their sizes
//! are public ([`direct_tile_positions`], [`WINOGRAD_TILE`]).
//!
//! Cost: a few relaxed atomic adds per call and per parallel task, never
//! per element or kernel call, so they stay on in release builds. They are
//! only ever written by the kernels, never read, so they cannot change a
//! result. Each backend instance has its own (clones share them), so tests
//! running in parallel do not see each other's work.
//!
//! [`CpuBackend`]: super::CpuBackend
//! [`direct_tile_positions`]: super::CpuBackend::direct_tile_positions
//! [`WINOGRAD_TILE`]: super::WINOGRAD_TILE

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::winograd::Tiling;

/// The counts of one pass (forward, input gradient or weight gradient),
/// summed over every call since the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PassCounters {
    /// Calls run by the direct (implicit-GEMM) convolution.
    pub direct_calls: u64,
    /// Calls run by Winograd, F(4x4, 3x3) or F(6x6, 3x3).
    pub winograd_calls: u64,
    /// Of those, the calls run by F(6x6, 3x3).
    pub winograd6_calls: u64,
    /// Calls that took the channel-sparse path (a channel mask with exact
    /// zeros: per image, only the kept channels enter the GEMMs).
    pub channel_sparse_calls: u64,
    /// Calls that tested tiles against a spatial mask's zeros.
    pub spatial_skip_calls: u64,
    /// Forward calls that added their outputs into a base's own buffer as
    /// they were computed (`Backend::conv2d_add`), counted among the
    /// direct calls too.
    pub added_in_place: u64,
    /// Multiply-adds of the products computed: `rows x k x columns` of
    /// every GEMM tile run (direct: output channels x taps x positions;
    /// Winograd: 36 (F(6x6): 64) x rows x channels x tiles).
    pub macs: u64,
    /// Tiles computed. Forward and input gradient: output tiles (direct:
    /// [`direct_tile_positions`] positions of one image, all channels; under
    /// a spatial mask with zeros only the live positions are computed,
    /// packed side by side, so an image with `l` of them counts
    /// `ceil(l / w)`; Winograd: 4x4 outputs, 6x6 by F(6x6)). Weight
    /// gradient: blocks of
    /// the reduction over positions (direct: an image's output rows of one
    /// k-block, or under a spatial mask with zeros a piece of one row;
    /// Winograd: 4x4 tiles). An image a channel mask leaves with nothing to
    /// multiply counts no tile, computed or skipped.
    ///
    /// [`direct_tile_positions`]: super::CpuBackend::direct_tile_positions
    pub tiles: u64,
    /// Tiles a spatial mask's zeros spared: the dense pass's tiles less
    /// those computed (direct forward and input gradient, per image), or
    /// the tiles and blocks whose inputs are all masked (Winograd; the
    /// direct weight gradient).
    pub tiles_skipped: u64,
    /// (image, channel) pairs a channel mask's zeros left out of the work:
    /// input channels (forward, weight gradient) or input-gradient rows.
    pub channels_skipped: u64,
    /// Weight values copied into kernel panels (direct: `rows x k` per
    /// packed operand; Winograd: 36 transformed values per kept filter).
    pub weights_packed: u64,
}

/// What one [`CpuBackend`](super::CpuBackend) has done since its last
/// reset, per pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorkCounters {
    /// Convolution forward passes.
    pub forward: PassCounters,
    /// Input-gradient passes (`conv2d_backward_input`).
    pub input_grad: PassCounters,
    /// Weight-gradient passes (`conv2d_backward_weight`).
    pub weight_grad: PassCounters,
}

impl PassCounters {
    /// Field-wise sum.
    pub fn plus(&self, o: &PassCounters) -> PassCounters {
        PassCounters {
            direct_calls: self.direct_calls + o.direct_calls,
            winograd_calls: self.winograd_calls + o.winograd_calls,
            winograd6_calls: self.winograd6_calls + o.winograd6_calls,
            channel_sparse_calls: self.channel_sparse_calls + o.channel_sparse_calls,
            spatial_skip_calls: self.spatial_skip_calls + o.spatial_skip_calls,
            added_in_place: self.added_in_place + o.added_in_place,
            macs: self.macs + o.macs,
            tiles: self.tiles + o.tiles,
            tiles_skipped: self.tiles_skipped + o.tiles_skipped,
            channels_skipped: self.channels_skipped + o.channels_skipped,
            weights_packed: self.weights_packed + o.weights_packed,
        }
    }
}

impl WorkCounters {
    /// The three passes summed.
    pub fn total(&self) -> PassCounters {
        self.forward.plus(&self.input_grad).plus(&self.weight_grad)
    }
}

/// The live counters of one pass.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    direct_calls: AtomicU64,
    winograd_calls: AtomicU64,
    winograd6_calls: AtomicU64,
    channel_sparse_calls: AtomicU64,
    spatial_skip_calls: AtomicU64,
    added_in_place: AtomicU64,
    macs: AtomicU64,
    tiles: AtomicU64,
    tiles_skipped: AtomicU64,
    channels_skipped: AtomicU64,
    weights_packed: AtomicU64,
}

/// Relaxed: the counts order nothing; a reader after the call returned
/// (rayon joins its tasks) sees every add.
fn add(c: &AtomicU64, v: usize) {
    c.fetch_add(v as u64, Ordering::Relaxed);
}

impl Tally {
    pub fn direct_call(&self) {
        add(&self.direct_calls, 1);
    }
    /// A call run by Winograd with the transform `tiling`.
    pub fn winograd_call(&self, tiling: Tiling) {
        add(&self.winograd_calls, 1);
        if tiling == Tiling::F6 {
            add(&self.winograd6_calls, 1);
        }
    }
    pub fn channel_sparse_call(&self) {
        add(&self.channel_sparse_calls, 1);
    }
    pub fn spatial_skip_call(&self) {
        add(&self.spatial_skip_calls, 1);
    }
    pub fn added_in_place(&self) {
        add(&self.added_in_place, 1);
    }
    pub fn macs(&self, v: usize) {
        add(&self.macs, v);
    }
    /// `computed` tiles run, `skipped` left out by a spatial mask.
    pub fn tiles(&self, computed: usize, skipped: usize) {
        add(&self.tiles, computed);
        add(&self.tiles_skipped, skipped);
    }
    pub fn channels_skipped(&self, v: usize) {
        add(&self.channels_skipped, v);
    }
    pub fn weights_packed(&self, v: usize) {
        add(&self.weights_packed, v);
    }

    pub(crate) fn snapshot(&self) -> PassCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PassCounters {
            direct_calls: get(&self.direct_calls),
            winograd_calls: get(&self.winograd_calls),
            winograd6_calls: get(&self.winograd6_calls),
            channel_sparse_calls: get(&self.channel_sparse_calls),
            spatial_skip_calls: get(&self.spatial_skip_calls),
            added_in_place: get(&self.added_in_place),
            macs: get(&self.macs),
            tiles: get(&self.tiles),
            tiles_skipped: get(&self.tiles_skipped),
            channels_skipped: get(&self.channels_skipped),
            weights_packed: get(&self.weights_packed),
        }
    }

    fn reset(&self) {
        for c in [
            &self.direct_calls,
            &self.winograd_calls,
            &self.winograd6_calls,
            &self.channel_sparse_calls,
            &self.spatial_skip_calls,
            &self.added_in_place,
            &self.macs,
            &self.tiles,
            &self.tiles_skipped,
            &self.channels_skipped,
            &self.weights_packed,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// The live counters of one backend.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub forward: Tally,
    pub input_grad: Tally,
    pub weight_grad: Tally,
}

impl Counters {
    pub fn snapshot(&self) -> WorkCounters {
        WorkCounters {
            forward: self.forward.snapshot(),
            input_grad: self.input_grad.snapshot(),
            weight_grad: self.weight_grad.snapshot(),
        }
    }

    pub fn reset(&self) {
        self.forward.reset();
        self.input_grad.reset();
        self.weight_grad.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_adds_snapshots_and_resets() {
        let c = Counters::default();
        c.forward.direct_call();
        c.forward.macs(10);
        c.forward.tiles(3, 2);
        c.input_grad.winograd_call(Tiling::F4);
        c.input_grad.winograd_call(Tiling::F6);
        c.forward.winograd_call(Tiling::F6);
        c.input_grad.channels_skipped(4);
        c.weight_grad.weights_packed(7);
        c.weight_grad.channel_sparse_call();
        c.weight_grad.spatial_skip_call();
        c.forward.added_in_place();
        let s = c.snapshot();
        let want_fwd = PassCounters {
            direct_calls: 1,
            added_in_place: 1,
            winograd_calls: 1,
            winograd6_calls: 1,
            macs: 10,
            tiles: 3,
            tiles_skipped: 2,
            ..Default::default()
        };
        assert_eq!(s.forward, want_fwd);
        assert_eq!(s.input_grad.winograd_calls, 2);
        assert_eq!(s.input_grad.winograd6_calls, 1);
        assert_eq!(s.input_grad.channels_skipped, 4);
        assert_eq!(s.weight_grad.weights_packed, 7);
        assert_eq!(s.weight_grad.channel_sparse_calls, 1);
        assert_eq!(s.weight_grad.spatial_skip_calls, 1);
        let t = s.total();
        assert_eq!((t.direct_calls, t.winograd_calls, t.macs), (1, 3, 10));
        assert_eq!(t.winograd6_calls, 2);
        assert_eq!((t.channels_skipped, t.weights_packed), (4, 7));
        assert_eq!((t.channel_sparse_calls, t.spatial_skip_calls), (1, 1));
        assert_eq!((t.tiles, t.tiles_skipped), (3, 2));
        assert_eq!(t.added_in_place, 1);
        c.reset();
        assert_eq!(c.snapshot(), WorkCounters::default());
    }
}
