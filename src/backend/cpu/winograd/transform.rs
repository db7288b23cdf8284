//! The F(4x4, 3x3) transforms (Lavin and Gray's points 0, +-1, +-2, inf).
//!
//! Vector transforms work on `[V; n]` arrays of SIMD registers whose lanes
//! are independent problems (tiles, or channels): the callers gather the
//! values of one register's lanes first, so every transform below is
//! straight-line vector code with small integer coefficients. The weight
//! transforms (`G g G^T` and its adjoint `G^T D G`) run once per (output,
//! input) channel pair per call, with filters in the lanes; their scalar
//! twins are the tests' statement of them.
//!
//! ```text
//! B^T = [4  0 -5  0 1 0]   G = [ 1/4     0    0 ]   A^T = [1 1  1 1  1 0]
//!       [0 -4 -4  1 1 0]       [-1/6 -1/6 -1/6 ]         [0 1 -1 2 -2 0]
//!       [0  4 -4 -1 1 0]       [-1/6  1/6 -1/6 ]         [0 1  1 4  4 0]
//!       [0 -2 -1  2 1 0]       [1/24 1/12  1/6 ]         [0 1 -1 8 -8 1]
//!       [0  2 -1 -2 1 0]       [1/24 -1/12 1/6 ]
//!       [0  4  0 -5 0 1]       [   0    0    1 ]
//! ```

use pulp::Simd;

use super::transform6::{POS6, input_tile6};
use super::{MAX_POS, Tiling};
use crate::backend::cpu::simd::{Elem, prefetch_values};

/// Positions of a transformed tile (6 x 6).
pub(crate) const POS: usize = 36;

#[inline(always)]
fn k<E: Elem, S: Simd>(s: S, c: f64) -> E::V<S> {
    E::splat(s, E::from_f64(c))
}

/// `B^T d` along one line of 6 values.
#[inline(always)]
fn bt<E: Elem, S: Simd>(s: S, d: [E::V<S>; 6]) -> [E::V<S>; 6] {
    let (m4, m5, two, four) = (
        k::<E, S>(s, -4.0),
        k::<E, S>(s, -5.0),
        k::<E, S>(s, 2.0),
        k::<E, S>(s, 4.0),
    );
    let t1 = E::fma(s, m4, d[2], d[4]); // d4 - 4 d2
    let t2 = E::fma(s, m4, d[1], d[3]); // d3 - 4 d1
    let t3 = E::vsub(s, d[4], d[2]);
    let t4 = E::vmul(s, two, E::vsub(s, d[3], d[1]));
    [
        E::fma(s, four, d[0], E::fma(s, m5, d[2], d[4])),
        E::vadd(s, t1, t2),
        E::vsub(s, t1, t2),
        E::vadd(s, t3, t4),
        E::vsub(s, t3, t4),
        E::fma(s, four, d[1], E::fma(s, m5, d[3], d[5])),
    ]
}

/// `B^T d B` of a 6 x 6 tile (row-major), one register per position.
#[inline(always)]
pub(crate) fn input_tile<E: Elem, S: Simd>(s: S, d: &[E::V<S>; POS]) -> [E::V<S>; POS] {
    let mut t = *d;
    for c in 0..6 {
        let col = bt::<E, S>(s, std::array::from_fn(|r| d[r * 6 + c]));
        for r in 0..6 {
            t[r * 6 + c] = col[r];
        }
    }
    let mut out = t;
    for r in 0..6 {
        let row = bt::<E, S>(s, std::array::from_fn(|c| t[r * 6 + c]));
        out[r * 6..r * 6 + 6].copy_from_slice(&row);
    }
    out
}

/// The input transform of `tiling` ([`input_tile`], or
/// [`input_tile6`](super::transform6::input_tile6)) of every lane group of
/// `d` (`[positions][nr]`, lanes are tiles or channels), each lane first
/// multiplied by `scale[lane]` when given (`x * m` as the reference rounds
/// it); `store(pos, hv, value)` receives position `pos` of lanes `hv..hv +
/// lanes`.
#[inline(always)]
pub(crate) fn input_tiles<E: Elem, S: Simd>(
    s: S,
    tiling: Tiling,
    d: &[E],
    nr: usize,
    scale: Option<&[E]>,
    store: impl FnMut(usize, usize, E::V<S>),
) {
    match tiling {
        Tiling::F4 => transform_lanes::<E, S, POS>(s, d, nr, scale, input_tile::<E, S>, store),
        Tiling::F6 => transform_lanes::<E, S, POS6>(s, d, nr, scale, input_tile6::<E, S>, store),
    }
}

/// [`input_tiles`] for one transform of `P` positions.
#[inline(always)]
fn transform_lanes<E: Elem, S: Simd, const P: usize>(
    s: S,
    d: &[E],
    nr: usize,
    scale: Option<&[E]>,
    transform: impl Fn(S, &[E::V<S>; P]) -> [E::V<S>; P],
    mut store: impl FnMut(usize, usize, E::V<S>),
) {
    let zero = E::splat(s, E::zero());
    for hv in (0..nr).step_by(E::lanes::<S>()) {
        let sc = scale.map(|sc| E::load(s, &sc[hv..]));
        let mut dv = [zero; P];
        for (i, r) in dv.iter_mut().enumerate() {
            *r = E::load(s, &d[i * nr + hv..]);
            if let Some(sc) = sc {
                *r = E::vmul(s, *r, sc);
            }
        }
        for (pos, &tv) in transform(s, &dv).iter().enumerate() {
            store(pos, hv, tv);
        }
    }
}

/// `A^T m` along one line: 6 values to 4.
#[inline(always)]
fn at<E: Elem, S: Simd>(s: S, m: [E::V<S>; 6]) -> [E::V<S>; 4] {
    let (two, four, eight) = (k::<E, S>(s, 2.0), k::<E, S>(s, 4.0), k::<E, S>(s, 8.0));
    let a = E::vadd(s, m[1], m[2]);
    let b = E::vsub(s, m[1], m[2]);
    let c = E::vadd(s, m[3], m[4]);
    let d = E::vsub(s, m[3], m[4]);
    [
        E::vadd(s, E::vadd(s, m[0], a), c),
        E::fma(s, two, d, b),
        E::fma(s, four, c, a),
        E::vadd(s, E::fma(s, eight, d, b), m[5]),
    ]
}

/// `A^T m A`: a 6 x 6 product tile to the 4 x 4 outputs (row-major).
#[inline(always)]
pub(crate) fn output_tile<E: Elem, S: Simd>(s: S, m: &[E::V<S>; POS]) -> [E::V<S>; 16] {
    let zero = E::splat(s, E::zero());
    let mut t = [zero; 24]; // 4 x 6
    for c in 0..6 {
        let col = at::<E, S>(s, std::array::from_fn(|r| m[r * 6 + c]));
        for r in 0..4 {
            t[r * 6 + c] = col[r];
        }
    }
    let mut out = [zero; 16];
    for r in 0..4 {
        let row = at::<E, S>(s, std::array::from_fn(|c| t[r * 6 + c]));
        out[r * 4..r * 4 + 4].copy_from_slice(&row);
    }
    out
}

/// `A g` along one line: 4 values to 6 (the adjoint of [`at`]).
#[inline(always)]
fn a4<E: Elem, S: Simd>(s: S, g: [E::V<S>; 4]) -> [E::V<S>; 6] {
    let (two, four) = (k::<E, S>(s, 2.0), k::<E, S>(s, 4.0));
    let p = E::vadd(s, g[0], g[2]);
    let q = E::vadd(s, g[1], g[3]);
    let p2 = E::fma(s, four, g[2], g[0]);
    let q2 = E::vmul(s, two, E::fma(s, four, g[3], g[1]));
    [
        g[0],
        E::vadd(s, p, q),
        E::vsub(s, p, q),
        E::vadd(s, p2, q2),
        E::vsub(s, p2, q2),
        g[3],
    ]
}

/// `A g A^T`: a 4 x 4 output-gradient tile to the 6 x 6 domain.
#[inline(always)]
pub(crate) fn grad_tile<E: Elem, S: Simd>(s: S, g: &[E::V<S>; 16]) -> [E::V<S>; POS] {
    let zero = E::splat(s, E::zero());
    let mut t = [zero; 24]; // 6 x 4
    for c in 0..4 {
        let col = a4::<E, S>(s, std::array::from_fn(|r| g[r * 4 + c]));
        for r in 0..6 {
            t[r * 4 + c] = col[r];
        }
    }
    let mut out = [zero; POS];
    for r in 0..6 {
        let row = a4::<E, S>(s, std::array::from_fn(|c| t[r * 4 + c]));
        out[r * 6..r * 6 + 6].copy_from_slice(&row);
    }
    out
}

/// `G g` along one line: 3 taps to 6.
#[cfg(test)]
fn g3<E: Elem>(a: E, b: E, c: E) -> [E; 6] {
    let f = E::from_f64;
    let ac = a + c;
    let e = a * f(1.0 / 24.0) + c * f(1.0 / 6.0);
    let b12 = b * f(1.0 / 12.0);
    [
        a * f(0.25),
        (ac + b) * f(-1.0 / 6.0),
        (ac - b) * f(-1.0 / 6.0),
        e + b12,
        e - b12,
        c,
    ]
}

/// `G g G^T` of a 3 x 3 filter (row-major) to the 36 positions. Scalar,
/// the statement that [`weight_tile_v`] is tested against (the engine runs
/// the vector one for every filter, the last partial register too).
#[cfg(test)]
pub(crate) fn weight_tile<E: Elem>(g: &[E; 9]) -> [E; POS] {
    let mut t = [E::zero(); 18]; // 6 x 3
    for c in 0..3 {
        let col = g3(g[c], g[3 + c], g[6 + c]);
        for r in 0..6 {
            t[r * 3 + c] = col[r];
        }
    }
    let mut out = [E::zero(); POS];
    for r in 0..6 {
        out[r * 6..r * 6 + 6].copy_from_slice(&g3(t[r * 3], t[r * 3 + 1], t[r * 3 + 2]));
    }
    out
}

/// `G^T d` along one line: 6 values to 3 (the adjoint of [`g3`]).
#[cfg(test)]
fn gt6<E: Elem>(d: [E; 6]) -> [E; 3] {
    let f = E::from_f64;
    let s12 = d[1] + d[2];
    let s34 = d[3] + d[4];
    [
        d[0] * f(0.25) - s12 * f(1.0 / 6.0) + s34 * f(1.0 / 24.0),
        (d[2] - d[1]) * f(1.0 / 6.0) + (d[3] - d[4]) * f(1.0 / 12.0),
        (s34 - s12) * f(1.0 / 6.0) + d[5],
    ]
}

/// `G^T D G`: the gradient of the 36 transformed weights back to the 3 x 3
/// filter (the adjoint of [`weight_tile`]). Scalar, the statement that
/// [`weight_grad_tile_v`] is tested against (the weight gradient runs the
/// vector one for every column, the last partial register too).
#[cfg(test)]
pub(crate) fn weight_grad_tile<E: Elem>(d: &[E; POS]) -> [E; 9] {
    let mut t = [E::zero(); 18]; // 3 x 6
    for c in 0..6 {
        let col = gt6(std::array::from_fn(|r| d[r * 6 + c]));
        for r in 0..3 {
            t[r * 6 + c] = col[r];
        }
    }
    let mut out = [E::zero(); 9];
    for r in 0..3 {
        out[r * 3..r * 3 + 3].copy_from_slice(&gt6(std::array::from_fn(|c| t[r * 6 + c])));
    }
    out
}

/// Where the input window of output tile `(ty, tx)` (6 x 6 for F(4x4), 8
/// x 8 for F(6x6): side `n = t + 2` for tiles of side `t`) meets an `h x
/// w` plane (pad 1: window row `r` is plane row `t ty + r - 1`):
/// window rows `r0..r1` and columns `c0..c1` lie inside, the rest reads
/// as zeros. Computed once per tile and reused for every channel, so the
/// gather does no per-element bounds tests. (With 16 tiles per register
/// group most groups hold a border tile, and the former per-element tests
/// ran for all of them: `examples/conv_speed`, Winograd, 2 threads, AMD
/// EPYC Zen 3, AVX2, four alternating rounds: P6 forward, where every tile
/// touches the border, 8.2-11.4 -> 6.5-8.6 ms; P3-P5 unchanged within
/// the noise.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WindowSpan {
    /// Plane offset of window element `(r0, c0)`.
    base: usize,
    /// The plane's width (its row stride).
    w: usize,
    /// The window's side.
    n: usize,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
}

impl WindowSpan {
    /// The span of tile `(ty, tx)` of `tiling`; the tile must start inside
    /// the plane (`t ty < h`, `t tx < w`).
    #[inline(always)]
    pub(crate) fn new(tiling: Tiling, h: usize, w: usize, ty: usize, tx: usize) -> Self {
        let (t, n) = (tiling.side(), tiling.window());
        debug_assert!(t * ty < h && t * tx < w);
        // Row r is inside when 0 <= t ty + r - 1 < h.
        let r0 = usize::from(ty == 0);
        let r1 = (h + 1 - t * ty).min(n);
        let c0 = usize::from(tx == 0);
        let c1 = (w + 1 - t * tx).min(n);
        Self {
            base: (t * ty + r0 - 1) * w + (t * tx + c0 - 1),
            w,
            n,
            r0,
            r1,
            c0,
            c1,
        }
    }

    /// True when the whole window lies inside the plane.
    #[inline(always)]
    pub(crate) fn is_full(&self) -> bool {
        self.r0 == 0 && self.r1 == self.n && self.c0 == 0 && self.c1 == self.n
    }

    /// The in-plane rows of the window in `plane` (an `h x w` plane like
    /// the one the span was made for): `rows` slices of `cols` values.
    #[inline(always)]
    fn rows<'p, E>(&self, plane: &'p [E]) -> impl Iterator<Item = &'p [E]> {
        let cols = self.c1 - self.c0;
        let src = &plane[self.base..][..(self.r1 - self.r0 - 1) * self.w + cols];
        src.chunks(self.w).map(move |row| &row[..cols])
    }

    /// True when every in-plane value of the window in the mask plane `m`
    /// is an exact zero (the masked input then reads only zeros there).
    pub(crate) fn reads_only_zeros<E: Elem>(&self, m: &[E]) -> bool {
        self.rows(m).all(|row| row.iter().all(|&v| v == E::zero()))
    }

    /// Writes the window's in-plane values into `d[(r * n + c) * stride +
    /// lane]` (`n` the window's side). Entries outside the plane are not written: the caller keeps
    /// them zero.
    #[inline(always)]
    pub(crate) fn gather<E: Elem>(&self, plane: &[E], d: &mut [E], stride: usize, lane: usize) {
        self.gather_with(plane, d, stride, lane, |x, _| x);
    }

    /// The window's values of the multiplier plane `m`, row-major (zeros
    /// outside the plane, and past the window's `n x n`), for
    /// [`WindowSpan::gather_scaled`].
    pub(crate) fn factors<E: Elem>(&self, m: &[E]) -> [E; MAX_POS] {
        let mut f = [E::zero(); MAX_POS];
        for (r, row) in self.rows(m).enumerate() {
            let at = (self.r0 + r) * self.n + self.c0;
            f[at..at + row.len()].copy_from_slice(row);
        }
        f
    }

    /// [`WindowSpan::gather`] of the products `x * m` (exactly the
    /// reference's) with a multiplier plane `m`, given as the window's
    /// factors ([`WindowSpan::factors`]): read once per tile rather than
    /// once per channel (the mask is the same for every channel).
    #[inline(always)]
    pub(crate) fn gather_scaled<E: Elem>(
        &self,
        plane: &[E],
        f: &[E; MAX_POS],
        d: &mut [E],
        stride: usize,
        lane: usize,
    ) {
        self.gather_with(plane, d, stride, lane, |x, i| x * f[i]);
    }

    /// `d[i * stride + lane] = map(x, i)` for the window's in-plane values
    /// `x` at window entry `i = r * n + c`.
    #[inline(always)]
    fn gather_with<E: Elem>(
        &self,
        plane: &[E],
        d: &mut [E],
        stride: usize,
        lane: usize,
        map: impl Fn(E, usize) -> E,
    ) {
        if self.is_full() {
            // The common case, unrolled: n x n loads and stores.
            match self.n {
                6 => self.gather_full::<E, 6>(plane, d, stride, lane, map),
                _ => self.gather_full::<E, 8>(plane, d, stride, lane, map),
            }
        } else {
            for (r, row) in self.rows(plane).enumerate() {
                let at = (self.r0 + r) * self.n + self.c0;
                for (c, &x) in row.iter().enumerate() {
                    d[(at + c) * stride + lane] = map(x, at + c);
                }
            }
        }
    }

    /// [`WindowSpan::gather_with`] of a whole window of side `N` (the
    /// span's `n`).
    #[inline(always)]
    fn gather_full<E: Elem, const N: usize>(
        &self,
        plane: &[E],
        d: &mut [E],
        stride: usize,
        lane: usize,
        map: impl Fn(E, usize) -> E,
    ) {
        debug_assert_eq!(N, self.n);
        let src = &plane[self.base..][..(N - 1) * self.w + N];
        for r in 0..N {
            let row = &src[r * self.w..][..N];
            for c in 0..N {
                d[(r * N + c) * stride + lane] = map(row[c], r * N + c);
            }
        }
    }

    /// Prefetches into L1 the in-plane window rows of `len` values from
    /// this window's left column in `plane`.
    #[inline(always)]
    pub(crate) fn prefetch_rows<E>(&self, plane: &[E], len: usize) {
        for r in 0..self.r1 - self.r0 {
            prefetch_values(plane[self.base + r * self.w..].as_ptr(), len);
        }
    }

    /// Prefetches into L1 this window's in-plane values in `plane` (what
    /// [`WindowSpan::gather`] reads).
    #[inline(always)]
    pub(crate) fn prefetch_window<E>(&self, plane: &[E]) {
        self.prefetch_rows(plane, self.c1 - self.c0);
    }

    /// [`WindowSpan::gather`] for the register of `lanes` tiles of one tile
    /// row from this one rightwards (lane order [`lane_order`]), with
    /// vector loads and [`Elem::deinterleave4`] instead of 36 scalar moves
    /// per tile: each in-plane window row of all the tiles is two loads of
    /// `4 lanes` values, columns 0-3 of every window from the first and
    /// 2-5 from the second (two columns on). The windows must lie inside
    /// the plane horizontally (this tile's left column and the last tile's
    /// right column: the caller checks), which is also what keeps the loads
    /// inside the row. The products `x * m` are the scalar path's.
    ///
    /// [`lane_order`]: crate::backend::cpu::simd::lane_order
    #[inline(always)]
    pub(crate) fn gather_row_run<E: Elem, S: Simd>(
        &self,
        s: S,
        plane: &[E],
        m: Option<&[E]>,
        d: &mut [E],
        stride: usize,
        lane: usize,
    ) {
        debug_assert!(self.c0 == 0 && self.n == 6, "F(4x4) windows only");
        let l = E::lanes::<S>();
        let fields = |src: &[E], at: usize| {
            E::deinterleave4(s, std::array::from_fn(|q| E::load(s, &src[at + q * l..])))
        };
        for r in self.r0..self.r1 {
            let at = self.base + (r - self.r0) * self.w;
            let (mut lo, mut hi) = (fields(plane, at), fields(plane, at + 2));
            if let Some(m) = m {
                let (mlo, mhi) = (fields(m, at), fields(m, at + 2));
                for q in 0..4 {
                    lo[q] = E::vmul(s, lo[q], mlo[q]);
                    hi[q] = E::vmul(s, hi[q], mhi[q]);
                }
            }
            for (c, &x) in lo.iter().chain(&hi[2..]).enumerate() {
                E::store(s, &mut d[(r * 6 + c) * stride + lane..], x);
            }
        }
    }
}

/// The most windows [`WindowSpan::gather_channels4`] gathers per call:
/// three F(4x4) windows of one tile row span 14 columns, one register of
/// f32 on AVX-512 (two on AVX2); two F(6x6) windows span 14 too
/// ([`Tiling::run_windows`]).
pub(crate) const RUN_WINDOWS: usize = 3;

impl Tiling {
    /// The most windows of this tiling that [`WindowSpan::gather_channels4`]
    /// gathers per call: as many as span at most [`MAX_RUN_COLS`] - 2
    /// columns (`side run + 2` columns for `run` windows).
    pub(crate) const fn run_windows(self) -> usize {
        (MAX_RUN_COLS - 2) / self.side()
    }
}

const _: () = assert!(Tiling::F4.run_windows() == RUN_WINDOWS && Tiling::F6.run_windows() == 2);

impl WindowSpan {
    /// True when [`WindowSpan::gather_channels4`] may gather `run` windows
    /// from this one rightwards with `lanes`-wide loads from `plane_len`-long
    /// planes: this window is whole, and its last row's loads (`t run + 2`
    /// columns for tiles of side `t`, rounded up to whole registers) end
    /// inside the plane. (The other windows must be whole too: the caller
    /// checks.)
    #[inline(always)]
    pub(crate) fn channels4_fit(&self, run: usize, lanes: usize, plane_len: usize) -> bool {
        let n = self.n;
        self.is_full()
            && self.base + (n - 1) * self.w + ((n - 2) * run + 2).div_ceil(lanes) * lanes
                <= plane_len
    }

    /// [`WindowSpan::gather`] of four channels at once into lanes `lane ..
    /// lane + 4` of registers of `nr` lanes, for the `RUN` whole windows
    /// (of side `N`: 6 for F(4x4), 8 for F(6x6)) of one tile row from this
    /// one rightwards (window `t`'s entries go to `d[t * N * N * nr..]`).
    /// Why: the weight gradient's transformed inputs
    /// have channels in their lanes, so the scalar gather moves every value
    /// on its own (36 loads and 36 stores per window and channel). Here each
    /// window row of the four planes is loaded a register at a time,
    /// [`Elem::interleave4`] turns the four registers into records of the
    /// four channels' values at one column, and each record is one 4-value
    /// copy per window holding its column. `records` says where: column
    /// `col` of the run's `(N - 2) RUN + 2` is record `records[col]` of the
    /// row's loads ([`channel_records`]). A row's loads serve every window
    /// of the run (they overlap by two columns). The products `x * m` are
    /// the scalar path's. The caller checks [`WindowSpan::channels4_fit`]
    /// and that the run's windows are whole.
    #[inline(always)]
    pub(crate) fn gather_channels4<E: Elem, S: Simd, const N: usize, const RUN: usize>(
        &self,
        s: S,
        records: &[usize; 4 * RUN_WINDOWS + 2],
        planes: [&[E]; 4],
        m: Option<&[E]>,
        d: &mut [E],
        lane: usize,
    ) {
        let (t, npos) = (N - 2, N * N);
        debug_assert!(self.is_full() && self.n == N && (1..=RUN_WINDOWS).contains(&RUN));
        debug_assert!(t * RUN + 2 <= MAX_RUN_COLS);
        let l = E::lanes::<S>();
        let nr = crate::backend::cpu::kernel::nr::<E, S>();
        assert!(lane + 4 <= nr);
        // One bounds check for every copy below (their offsets are
        // constants once `nr` is).
        let d = &mut d[lane..][..(RUN - 1) * npos * nr + (npos - 1) * nr + 4];
        let mut rec = [E::zero(); 4 * MAX_RUN_COLS];
        for r in 0..N {
            let row = self.base + r * self.w;
            for k in 0..(t * RUN + 2).div_ceil(l) {
                let at = row + k * l;
                let mut v: [E::V<S>; 4] = std::array::from_fn(|f| E::load(s, &planes[f][at..]));
                if let Some(m) = m {
                    let mv = E::load(s, &m[at..]);
                    for x in &mut v {
                        *x = E::vmul(s, *x, mv);
                    }
                }
                for (q, &x) in E::interleave4(s, v).iter().enumerate() {
                    E::store(s, &mut rec[(4 * k + q) * l..], x);
                }
            }
            for q in 0..RUN {
                for c in 0..N {
                    let src = 4 * records[t * q + c];
                    let at = q * npos * nr + (r * N + c) * nr;
                    d[at..at + 4].copy_from_slice(&rec[src..src + 4]);
                }
            }
        }
    }
}

/// The most columns a run of windows spans, rounded up to whole registers
/// on every ISA (14 columns: 16 for 8- and 16-lane registers).
const MAX_RUN_COLS: usize = 16;

/// Where [`WindowSpan::gather_channels4`] finds each column of a run: its
/// row's loads of `lanes` columns each, interleaved, are records (4 values)
/// in a row; column `k lanes + i` (load `k`, lane `i`) is record `k lanes +
/// order[i]`, where `order` is [`Elem::deinterleave4`]'s lane order
/// (interleaving undoes it: lane `i` goes to record `order[i]`).
pub(crate) fn channel_records(order: &[usize]) -> [usize; 4 * RUN_WINDOWS + 2] {
    let l = order.len();
    std::array::from_fn(|col| (col / l) * l + order[col % l])
}

/// True when the `t x t` outputs of tile `(ty, tx)` (tiles of side `t`)
/// of the mask plane `m` are all exact zeros.
pub(crate) fn tile_is_zero<E: Elem>(
    m: &[E],
    (h, w): (usize, usize),
    t: usize,
    (ty, tx): (usize, usize),
) -> bool {
    let (y1, x1) = ((t * ty + t).min(h), (t * tx + t).min(w));
    (t * ty..y1).all(|y| {
        m[y * w + t * tx..y * w + x1]
            .iter()
            .all(|&v| v == E::zero())
    })
}

/// `g3` (compiled for the tests) on registers (the same operations in the
/// same order, so a lane gets the bits the scalar version gives, a zero's
/// sign included: the negated rows multiply by -1/6 in both, where `0 - x`
/// here against `-x` there gave +0 against -0 for a zero sum).
#[inline(always)]
fn g3v<E: Elem, S: Simd>(s: S, a: E::V<S>, b: E::V<S>, c: E::V<S>) -> [E::V<S>; 6] {
    let (q, s6, m6, s12, s24) = (
        k::<E, S>(s, 0.25),
        k::<E, S>(s, 1.0 / 6.0),
        k::<E, S>(s, -1.0 / 6.0),
        k::<E, S>(s, 1.0 / 12.0),
        k::<E, S>(s, 1.0 / 24.0),
    );
    let ac = E::vadd(s, a, c);
    let e = E::vadd(s, E::vmul(s, a, s24), E::vmul(s, c, s6));
    let b12 = E::vmul(s, b, s12);
    [
        E::vmul(s, a, q),
        E::vmul(s, E::vadd(s, ac, b), m6),
        E::vmul(s, E::vsub(s, ac, b), m6),
        E::vadd(s, e, b12),
        E::vsub(s, e, b12),
        c,
    ]
}

/// `weight_tile` (the scalar statement, compiled for the tests) on
/// registers whose lanes are independent filters.
#[inline(always)]
pub(crate) fn weight_tile_v<E: Elem, S: Simd>(s: S, g: &[E::V<S>; 9]) -> [E::V<S>; POS] {
    let zero = E::splat(s, E::zero());
    let mut t = [zero; 18];
    for c in 0..3 {
        let col = g3v::<E, S>(s, g[c], g[3 + c], g[6 + c]);
        for r in 0..6 {
            t[r * 3 + c] = col[r];
        }
    }
    let mut out = [zero; POS];
    for r in 0..6 {
        out[r * 6..r * 6 + 6].copy_from_slice(&g3v::<E, S>(
            s,
            t[r * 3],
            t[r * 3 + 1],
            t[r * 3 + 2],
        ));
    }
    out
}

/// `gt6` (compiled for the tests) on registers (the same operations in
/// the same order, so a lane gets the bits the scalar version gives).
#[inline(always)]
fn gt6v<E: Elem, S: Simd>(s: S, d: [E::V<S>; 6]) -> [E::V<S>; 3] {
    let (q, s6, s12, s24) = (
        k::<E, S>(s, 0.25),
        k::<E, S>(s, 1.0 / 6.0),
        k::<E, S>(s, 1.0 / 12.0),
        k::<E, S>(s, 1.0 / 24.0),
    );
    let d12 = E::vadd(s, d[1], d[2]);
    let d34 = E::vadd(s, d[3], d[4]);
    [
        E::vadd(
            s,
            E::vsub(s, E::vmul(s, d[0], q), E::vmul(s, d12, s6)),
            E::vmul(s, d34, s24),
        ),
        E::vadd(
            s,
            E::vmul(s, E::vsub(s, d[2], d[1]), s6),
            E::vmul(s, E::vsub(s, d[3], d[4]), s12),
        ),
        E::vadd(s, E::vmul(s, E::vsub(s, d34, d12), s6), d[5]),
    ]
}

/// `weight_grad_tile` (the scalar statement, compiled for the tests) on
/// registers whose lanes are independent filters.
#[inline(always)]
pub(crate) fn weight_grad_tile_v<E: Elem, S: Simd>(s: S, d: &[E::V<S>; POS]) -> [E::V<S>; 9] {
    let zero = E::splat(s, E::zero());
    let mut t = [zero; 18]; // 3 x 6
    for c in 0..6 {
        let col = gt6v::<E, S>(s, std::array::from_fn(|r| d[r * 6 + c]));
        for r in 0..3 {
            t[r * 6 + c] = col[r];
        }
    }
    let mut out = [zero; 9];
    for r in 0..3 {
        out[r * 3..r * 3 + 3]
            .copy_from_slice(&gt6v::<E, S>(s, std::array::from_fn(|c| t[r * 6 + c])));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulp::WithSimd;

    /// One tile through the vector transforms, lane 0 of each register,
    /// against the 3x3 correlation it must equal (f64, exact to rounding).
    struct OneTile {
        d: [f64; POS],
        g: [f64; 9],
        dy: [f64; 16],
    }

    impl WithSimd for OneTile {
        type Output = ([f64; 16], [f64; 9], bool);
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) -> Self::Output {
            let l = f64::lanes::<S>();
            let lane0 = |v: <f64 as Elem>::V<S>| {
                let mut out = [0.0f64; 16];
                f64::store(s, &mut out[..l], v);
                out[0]
            };
            let dv: [_; POS] = std::array::from_fn(|i| f64::splat(s, self.d[i]));
            let u = weight_tile(&self.g);
            let v = input_tile::<f64, S>(s, &dv);
            let m: [_; POS] = std::array::from_fn(|i| f64::vmul(s, v[i], f64::splat(s, u[i])));
            let y = output_tile::<f64, S>(s, &m).map(lane0);
            // Weight gradient of this one tile: G^T ((A dy A^T) (.) V) G.
            let gv: [_; 16] = std::array::from_fn(|i| f64::splat(s, self.dy[i]));
            let wt = grad_tile::<f64, S>(s, &gv);
            let dd: [f64; POS] = std::array::from_fn(|i| lane0(f64::vmul(s, wt[i], v[i])));
            let dw = weight_grad_tile(&dd);
            // The vector weight transform gives the scalar one's bits.
            let gvv: [_; 9] = std::array::from_fn(|t| f64::splat(s, self.g[t]));
            let same = weight_tile_v::<f64, S>(s, &gvv)
                .iter()
                .zip(&u)
                .all(|(&a, &b)| lane0(a).to_bits() == b.to_bits());
            // And the vector adjoint transform the scalar one's.
            let ddv: [_; POS] = std::array::from_fn(|i| f64::splat(s, dd[i]));
            let same_grad = weight_grad_tile_v::<f64, S>(s, &ddv)
                .iter()
                .zip(&dw)
                .all(|(&a, &b)| lane0(a).to_bits() == b.to_bits());
            (y, dw, same && same_grad)
        }
    }

    /// Window element `(r, c)` of F(4x4) tile `(ty, tx)` by definition:
    /// [`window_of`] for the 6 x 6 windows.
    fn window_by_definition(
        plane: &[f32],
        m: Option<&[f32]>,
        h: usize,
        w: usize,
        ty: usize,
        tx: usize,
    ) -> [Option<f32>; POS] {
        let win = window_of(Tiling::F4, plane, m, (h, w), (ty, tx));
        std::array::from_fn(|i| win[i])
    }

    /// Window element `(r, c)` of tile `(ty, tx)` of `tiling` (side `t`,
    /// window side `n`) by definition, at entry `r * n + c`: the plane
    /// value (times the mask's) at row `t ty + r - 1`, column `t tx + c -
    /// 1`, or `None` outside the plane (read as zero).
    fn window_of(
        tiling: Tiling,
        plane: &[f32],
        m: Option<&[f32]>,
        (h, w): (usize, usize),
        (ty, tx): (usize, usize),
    ) -> Vec<Option<f32>> {
        let (t, n) = (tiling.side(), tiling.window());
        (0..n * n)
            .map(|i| {
                let (y, x) = ((t * ty + i / n) as isize - 1, (t * tx + i % n) as isize - 1);
                if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                    return None;
                }
                let at = y as usize * w + x as usize;
                Some(plane[at] * m.map_or(1.0, |m| m[at]))
            })
            .collect()
    }

    /// [`tile_is_zero`] against its definition on every tile of planes up
    /// to 13 x 13 (three and more tile rows and columns, partial last
    /// tiles), tiles of side 4 and 6, under masks zero except for one
    /// nonzero value, placed at every position in turn: exactly the tile
    /// holding it is not zero.
    #[test]
    fn tile_is_zero_sees_exactly_its_own_outputs() {
        for t in [4, 6] {
            for h in 1..=13 {
                for w in 1..=13 {
                    for hot in 0..h * w {
                        let mut m = vec![0.0f32; h * w];
                        m[hot] = 0.5;
                        let (hy, hx) = (hot / w, hot % w);
                        for ty in 0..h.div_ceil(t) {
                            for tx in 0..w.div_ceil(t) {
                                let holds = hy / t == ty && hx / t == tx;
                                assert_eq!(
                                    tile_is_zero(&m, (h, w), t, (ty, tx)),
                                    !holds,
                                    "{h}x{w} tile {t} ({ty}, {tx}), nonzero at ({hy}, {hx})"
                                );
                            }
                        }
                    }
                    let zeros = vec![0.0f32; h * w];
                    assert!(tile_is_zero(&zeros, (h, w), t, (0, 0)));
                }
            }
        }
    }

    /// Every tile of planes from 1 x 1 up, including sides that leave a
    /// partial last tile and tiles touching two borders, for both tilings
    /// (whole F(6x6) windows from 14 x 14 on): each gather against the
    /// window by definition, with and without a multiplier plane.
    #[test]
    fn window_spans_gather_the_padded_window() {
        let mut zero_windows = 0;
        for tiling in [Tiling::F4, Tiling::F6] {
            let (t, n, npos) = (tiling.side(), tiling.window(), tiling.positions());
            for h in 1..=15 {
                for w in 1..=15 {
                    let plane: Vec<f32> = (0..h * w).map(|i| 1.0 + i as f32).collect();
                    let mask: Vec<f32> = (0..h * w).map(|i| [0.5, 0.0, 2.0][i % 3]).collect();
                    // Mostly zeros, so some windows read only zeros.
                    let sparse: Vec<f32> = (0..h * w).map(|i| f32::from(i % 13 == 5)).collect();
                    for ty in 0..h.div_ceil(t) {
                        for tx in 0..w.div_ceil(t) {
                            let span = WindowSpan::new(tiling, h, w, ty, tx);
                            let full =
                                ty > 0 && tx > 0 && t * ty + n - 1 <= h && t * tx + n - 1 <= w;
                            assert_eq!(
                                span.is_full(),
                                full,
                                "{h}x{w} {tiling:?} tile ({ty}, {tx})"
                            );
                            for m in [None, Some(&mask[..]), Some(&sparse[..])] {
                                // Lane 1 of 3, so a stride or lane slip shows;
                                // NaN marks entries the gather must not write.
                                let mut d = vec![f32::NAN; npos * 3];
                                let want = window_of(tiling, &plane, m, (h, w), (ty, tx));
                                match m {
                                    None => span.gather(&plane, &mut d, 3, 1),
                                    Some(m) => {
                                        // The mask's own window, by definition:
                                        // the factors, zeros outside the plane.
                                        let mw = window_of(tiling, m, None, (h, w), (ty, tx));
                                        let f = span.factors(m);
                                        for (i, v) in mw.iter().enumerate() {
                                            assert_eq!(f[i], v.unwrap_or(0.0), "factor {i}");
                                        }
                                        assert!(f[npos..].iter().all(|&v| v == 0.0));
                                        span.gather_scaled(&plane, &f, &mut d, 3, 1);
                                        let zeros = mw.iter().all(|v| v.is_none_or(|v| v == 0.0));
                                        assert_eq!(span.reads_only_zeros(m), zeros);
                                        zero_windows += usize::from(zeros);
                                    }
                                }
                                for (i, &x) in want.iter().enumerate() {
                                    let got = d[i * 3 + 1];
                                    assert!(
                                        match x {
                                            Some(x) => got == x,
                                            None => got.is_nan(),
                                        },
                                        "{h}x{w} tile ({ty}, {tx}) mask {} entry {i}: {got} vs {x:?}",
                                        m.is_some()
                                    );
                                    assert!(d[i * 3].is_nan() && d[i * 3 + 2].is_nan());
                                }
                            }
                        }
                    }
                }
            }
        }
        // Both answers of reads_only_zeros were checked.
        assert!(zero_windows > 0);
    }

    /// [`WindowSpan::gather_row_run`] on every register-wide run of tiles
    /// whose windows lie inside the plane horizontally, into lanes `1..1 +
    /// lanes` of a wider stride: each lane `q` must hold the window of tile
    /// `tx + lane_order[q]` by definition (with and without a mask, rows
    /// cut by the top and bottom borders), and nothing else is written.
    /// Also: [`Elem::interleave4`] undoes [`Elem::deinterleave4`].
    struct RowRuns;

    impl WithSimd for RowRuns {
        type Output = usize;
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) -> usize {
            let l = f32::lanes::<S>();
            let order = crate::backend::cpu::simd::lane_order::<f32, S>(s);
            let mut sorted = order[..l].to_vec();
            sorted.sort_unstable();
            assert!(
                sorted.iter().copied().eq(0..l),
                "not a permutation: {order:?}"
            );
            let records: Vec<f32> = (0..4 * l).map(|i| i as f32).collect();
            let v = std::array::from_fn(|q| f32::load(s, &records[q * l..]));
            let back = f32::interleave4(s, f32::deinterleave4(s, v));
            let mut out = vec![0.0f32; 4 * l];
            for (q, &x) in back.iter().enumerate() {
                f32::store(s, &mut out[q * l..], x);
            }
            assert_eq!(out, records);
            let stride = l + 2;
            let mut runs = 0;
            for h in 1..=9 {
                for w in 4 * l + 1..=4 * l + 9 {
                    let plane: Vec<f32> = (0..h * w).map(|i| 1.0 + i as f32).collect();
                    let mask: Vec<f32> = (0..h * w).map(|i| [0.5, 0.0, 2.0][i % 3]).collect();
                    for ty in 0..h.div_ceil(4) {
                        for tx in (1..w.div_ceil(4)).filter(|tx| 4 * (tx + l) < w) {
                            let span = WindowSpan::new(Tiling::F4, h, w, ty, tx);
                            for m in [None, Some(&mask[..])] {
                                let mut d = vec![f32::NAN; POS * stride];
                                span.gather_row_run::<f32, S>(s, &plane, m, &mut d, stride, 1);
                                for q in 0..l {
                                    let want =
                                        window_by_definition(&plane, m, h, w, ty, tx + order[q]);
                                    for (i, &x) in want.iter().enumerate() {
                                        let got = d[i * stride + 1 + q];
                                        assert!(
                                            x.map_or(got.is_nan(), |x| got == x),
                                            "{h}x{w} run ({ty}, {tx}) lane {q} entry {i}"
                                        );
                                    }
                                }
                                for i in 0..POS {
                                    assert!(
                                        d[i * stride].is_nan() && d[i * stride + l + 1].is_nan()
                                    );
                                }
                                runs += 1;
                            }
                        }
                    }
                }
            }
            runs
        }
    }

    #[test]
    fn row_runs_gather_every_lane_s_window() {
        for arch in crate::backend::cpu::Isa::every_arch() {
            assert!(arch.dispatch(RowRuns) > 0, "{arch:?}: no run checked");
        }
    }

    /// [`WindowSpan::gather_channels4`] on every run of 1 to 3 (F(4x4)) or
    /// 1 to 2 (F(6x6)) whole windows whose loads fit, into lanes `lane ..
    /// lane + 4` for every lane: window `t` of the run, lane `lane + f`
    /// must hold channel `f`'s window of tile `tx + t` by definition (with
    /// and without a mask), and nothing else is written. Also:
    /// [`channel_records`] on hand-worked lane orders.
    struct Channels4(Tiling);

    impl WithSimd for Channels4 {
        type Output = (usize, usize);
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) -> (usize, usize) {
            let tiling = self.0;
            let (ts, npos) = (tiling.side(), tiling.positions());
            let l = f32::lanes::<S>();
            let nr = crate::backend::cpu::kernel::nr::<f32, S>();
            let records = channel_records(&crate::backend::cpu::simd::lane_order::<f32, S>(s)[..l]);
            let (mut runs, mut unfit) = (0, 0);
            // Every tile of every plane size (widths 20 and 26 end F(6x6)
            // runs of two whole windows where their last loads, 16
            // columns, would pass the end of an AVX2 plane).
            let tiles = (6usize..=14)
                .flat_map(|h| [9usize, 13, 14, 17, 20, 21, 26, 30, 33].map(|w| (h, w)))
                .flat_map(|(h, w)| {
                    (0..h.div_ceil(ts))
                        .flat_map(move |ty| (0..w.div_ceil(ts)).map(move |tx| (h, w, ty, tx)))
                });
            for (h, w, ty, tx) in tiles {
                let hw = h * w;
                let planes: Vec<Vec<f32>> = (0..4)
                    .map(|f| {
                        (0..hw)
                            .map(|i| 1.0 + i as f32 + 1000.0 * f as f32)
                            .collect()
                    })
                    .collect();
                let planes = std::array::from_fn(|f| &planes[f][..]);
                // Period 5, so a factor read 4 columns off shows.
                let mask: Vec<f32> = (0..hw).map(|i| [0.5, 0.0, 2.0, 0.75, 1.5][i % 5]).collect();
                let span = WindowSpan::new(tiling, h, w, ty, tx);
                for run in 1..=tiling.run_windows() {
                    let whole = (0..run).all(|t| {
                        ts * (tx + t) < w && WindowSpan::new(tiling, h, w, ty, tx + t).is_full()
                    });
                    // By definition: the last window row's loads, from column
                    // t tx - 1 of row t ty + t, end in the plane.
                    let loads = (ts * run + 2).div_ceil(l) * l;
                    let fit = span.is_full() && (ts * ty + ts) * w + ts * tx - 1 + loads <= hw;
                    let at = format!("{h}x{w} ({ty}, {tx}) run {run}");
                    assert_eq!(span.channels4_fit(run, l, hw), fit, "{at}");
                    unfit += usize::from(whole && !fit && span.is_full());
                    if !whole || !fit {
                        continue;
                    }
                    let lanes = (0..nr).filter(|lane| lane + 4 <= nr);
                    for (m, lane) in [None, Some(&mask[..])]
                        .into_iter()
                        .flat_map(|m| lanes.clone().map(move |lane| (m, lane)))
                    {
                        let mut d = vec![f32::NAN; RUN_WINDOWS * npos * nr];
                        let (p, d_) = (planes, &mut d[..]);
                        let (r, c) = (&records, lane);
                        match (tiling, run) {
                            (Tiling::F4, 1) => {
                                span.gather_channels4::<f32, S, 6, 1>(s, r, p, m, d_, c)
                            }
                            (Tiling::F4, 2) => {
                                span.gather_channels4::<f32, S, 6, 2>(s, r, p, m, d_, c)
                            }
                            (Tiling::F4, _) => {
                                span.gather_channels4::<f32, S, 6, 3>(s, r, p, m, d_, c)
                            }
                            (Tiling::F6, 1) => {
                                span.gather_channels4::<f32, S, 8, 1>(s, r, p, m, d_, c)
                            }
                            (Tiling::F6, _) => {
                                span.gather_channels4::<f32, S, 8, 2>(s, r, p, m, d_, c)
                            }
                        }
                        let want = |t: usize, f: usize| {
                            (t < run).then(|| window_of(tiling, planes[f], m, (h, w), (ty, tx + t)))
                        };
                        check_lanes(&d, nr, npos, lane, want, &format!("{at} lane {lane}"));
                        runs += 1;
                    }
                }
            }
            // Both answers of `channels4_fit` for whole windows were seen.
            assert!(unfit > 0 || nr < 4, "{l} lanes: every run fit");
            (runs, nr)
        }
    }

    /// `d` (windows of `[npos][nr]`) holds in lane `lane + f` of window `t`
    /// exactly `want(t, f)` (NaN where `None`: a window past the run), and
    /// NaN in every other lane.
    fn check_lanes(
        d: &[f32],
        nr: usize,
        npos: usize,
        lane: usize,
        want: impl Fn(usize, usize) -> Option<Vec<Option<f32>>>,
        at: &str,
    ) {
        for (t, window) in d.chunks_exact(npos * nr).enumerate() {
            // The window's four lanes by definition, once per window.
            let wants: [_; 4] = std::array::from_fn(|f| want(t, f));
            for (i, row) in window.chunks_exact(nr).enumerate() {
                for (j, &got) in row.iter().enumerate() {
                    let want = (lane..lane + 4)
                        .contains(&j)
                        .then(|| wants[j - lane].as_ref())
                        .flatten()
                        .map(|v| v[i].unwrap());
                    assert!(
                        want.map_or(got.is_nan(), |x| got == x),
                        "{at} window {t} lane {j} entry {i}: {got} vs {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn channels4_gathers_every_window_of_a_run() {
        // AVX2 f32 (0, 2, 4, 6, 1, 3, 5, 7): column 9 is load 1's lane 1,
        // record 8 + 2; identity: column c is record c.
        let r = channel_records(&[0, 2, 4, 6, 1, 3, 5, 7]);
        assert_eq!(r, [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11]);
        assert_eq!(channel_records(&[0]), std::array::from_fn(|c| c));
        assert_eq!(channel_records(&[0, 1, 2, 3]), std::array::from_fn(|c| c));
        for arch in crate::backend::cpu::Isa::every_arch() {
            // Registers of 2 lanes (scalar) have no 4 lanes to fill: the
            // weight gradient gathers them value by value.
            for tiling in [Tiling::F4, Tiling::F6] {
                let (runs, nr) = arch.dispatch(Channels4(tiling));
                assert!(runs > 0 || nr < 4, "{arch:?} {tiling:?}: no run checked");
            }
        }
    }

    /// The vector weight transform gives the scalar one's bits for filters
    /// whose transformed rows are exact zeros (a dead filter; columns with
    /// `a + c + b` or `a + c - b` zero): a zero's sign included, since the
    /// ISA decides which columns take which (`k / lanes` registers, then
    /// the scalar tail).
    #[test]
    fn vector_weight_transform_keeps_a_zero_s_sign() {
        let filters: [[f64; 9]; 3] = [
            [0.0; 9],
            // Column sums a + c + b = 0 (first column), a + c - b = 0 (second).
            [0.5, 1.0, 0.25, -1.0, 0.5, -2.0, 0.5, -0.5, 0.75],
            [-0.0, 0.0, -0.0, 0.0, -0.0, 0.0, -0.0, 0.0, -0.0],
        ];
        for g in filters {
            let u = weight_tile(&g);
            assert!(
                u.iter().any(|v| *v == 0.0 && v.is_sign_negative()),
                "{g:?}: no negative zero to compare"
            );
            for arch in crate::backend::cpu::Isa::every_arch() {
                let (_, _, same) = arch.dispatch(OneTile {
                    d: [1.0; POS],
                    g,
                    dy: [1.0; 16],
                });
                assert!(
                    same,
                    "{arch:?}, {g:?}: vector and scalar weight transforms differ"
                );
            }
        }
    }

    #[test]
    fn one_tile_equals_the_correlation() {
        let d: [f64; POS] = std::array::from_fn(|i| ((i * 37 % 11) as f64 - 5.0) / 4.0);
        let g: [f64; 9] = std::array::from_fn(|i| ((i * 5 % 7) as f64 - 3.0) / 8.0);
        let dy: [f64; 16] = std::array::from_fn(|i| ((i * 3 % 5) as f64 - 2.0) / 2.0);
        for arch in crate::backend::cpu::Isa::every_arch() {
            let (y, dw, same) = arch.dispatch(OneTile { d, g, dy });
            assert!(same, "vector and scalar weight transforms differ");
            for oy in 0..4 {
                for ox in 0..4 {
                    let mut want = 0.0;
                    for ky in 0..3 {
                        for kx in 0..3 {
                            want += d[(oy + ky) * 6 + ox + kx] * g[ky * 3 + kx];
                        }
                    }
                    let got = y[oy * 4 + ox];
                    assert!((got - want).abs() <= 1e-13, "y[{oy}][{ox}] {got} vs {want}");
                }
            }
            for ky in 0..3 {
                for kx in 0..3 {
                    let mut want = 0.0;
                    for oy in 0..4 {
                        for ox in 0..4 {
                            want += dy[oy * 4 + ox] * d[(oy + ky) * 6 + ox + kx];
                        }
                    }
                    let got = dw[ky * 3 + kx];
                    assert!(
                        (got - want).abs() <= 1e-13,
                        "dw[{ky}][{kx}] {got} vs {want}"
                    );
                }
            }
        }
    }
}
