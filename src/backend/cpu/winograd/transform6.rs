//! The transforms of Winograd F(6x6, 3x3): 8 x 8 input windows, 6 x 6
//! output tiles, 64 products per tile (1.78 per output against F(4x4)'s
//! 2.25). Points 0, +-1, +-2, +-1/2, inf, the set whose f32 error grows
//! least for this tile size (`reference/winograd_accuracy.py`: norm-wise
//! 4.1e-6 against F(4x4)'s 1.9e-6 at C = 256). The data transforms keep
//! coefficients that are exact in binary (5.25, 4.25, 1.25, 2.5, powers of
//! two); the weight transform's 2/9, 1/90, ... round, as F(4x4)'s 1/6 do.
//!
//! The matrices (`y = A^T ((G g G^T) (.) (B^T d B)) A` for the 3x3
//! correlation of an 8 x 8 window `d` with `g`):
//!
//! ```text
//! B^T = [ 1   0   -21/4   0     21/4   0    -1  0 ]    G = [ 1      0      0    ]
//!       [ 0   1    1    -17/4 -17/4    1     1  0 ]        [ -2/9  -2/9   -2/9  ]
//!       [ 0  -1    1     17/4 -17/4   -1     1  0 ]        [ -2/9   2/9   -2/9  ]
//!       [ 0  1/2  1/4   -5/2  -5/4     2     1  0 ]        [ 1/90   1/45   2/45 ]
//!       [ 0 -1/2  1/4    5/2  -5/4    -2     1  0 ]        [ 1/90  -1/45   2/45 ]
//!       [ 0   2    4    -5/2   -5     1/2    1  0 ]        [ 32/45  16/45  8/45 ]
//!       [ 0  -2    4     5/2   -5    -1/2    1  0 ]        [ 32/45 -16/45  8/45 ]
//!       [ 0  -1    0     21/4   0    -21/4   0  1 ]        [ 0      0      1    ]
//!
//! A^T = [ 1  1   1   1    1    1     1     0 ]
//!       [ 0  1  -1   2   -2   1/2  -1/2    0 ]
//!       [ 0  1   1   4    4   1/4   1/4    0 ]
//!       [ 0  1  -1   8   -8   1/8  -1/8    0 ]
//!       [ 0  1   1  16   16   1/16  1/16   0 ]
//!       [ 0  1  -1  32  -32   1/32 -1/32   1 ]
//! ```
//!
//! Only the forward engine runs this tile size (the forward pass and the
//! input gradient); the weight gradient stays F(4x4).

use pulp::Simd;

use crate::backend::cpu::simd::Elem;

/// Positions of a transformed F(6x6) tile (8 x 8).
pub(crate) const POS6: usize = 64;

#[inline(always)]
fn k<E: Elem, S: Simd>(s: S, c: f64) -> E::V<S> {
    E::splat(s, E::from_f64(c))
}

/// `B^T d` along one line of 8 values.
#[inline(always)]
fn bt8<E: Elem, S: Simd>(s: S, d: [E::V<S>; 8]) -> [E::V<S>; 8] {
    let kk = |c: f64| k::<E, S>(s, c);
    let w0 = E::fma(s, kk(5.25), E::vsub(s, d[4], d[2]), E::vsub(s, d[0], d[6]));
    let w7 = E::fma(s, kk(5.25), E::vsub(s, d[3], d[5]), E::vsub(s, d[7], d[1]));
    // Rows 1 and 2: (d2 + d6 - 17/4 d4) +- (d1 + d5 - 17/4 d3).
    let t1 = E::fma(s, kk(-4.25), d[4], E::vadd(s, d[2], d[6]));
    let t2 = E::fma(s, kk(-4.25), d[3], E::vadd(s, d[1], d[5]));
    // Rows 3 and 4: (1/4 d2 - 5/4 d4 + d6) +- (1/2 d1 - 5/2 d3 + 2 d5).
    let t3 = E::fma(s, kk(0.25), d[2], E::fma(s, kk(-1.25), d[4], d[6]));
    let t4 = E::fma(
        s,
        kk(0.5),
        d[1],
        E::fma(s, kk(-2.5), d[3], E::vadd(s, d[5], d[5])),
    );
    // Rows 5 and 6: (4 d2 - 5 d4 + d6) +- (2 d1 - 5/2 d3 + 1/2 d5).
    let t5 = E::fma(s, kk(4.0), d[2], E::fma(s, kk(-5.0), d[4], d[6]));
    let t6 = E::fma(
        s,
        kk(2.0),
        d[1],
        E::fma(s, kk(-2.5), d[3], E::vmul(s, kk(0.5), d[5])),
    );
    [
        w0,
        E::vadd(s, t1, t2),
        E::vsub(s, t1, t2),
        E::vadd(s, t3, t4),
        E::vsub(s, t3, t4),
        E::vadd(s, t5, t6),
        E::vsub(s, t5, t6),
        w7,
    ]
}

/// `B^T d B` of an 8 x 8 window (row-major), one register per position.
#[inline(always)]
pub(crate) fn input_tile6<E: Elem, S: Simd>(s: S, d: &[E::V<S>; POS6]) -> [E::V<S>; POS6] {
    let mut t = *d;
    for c in 0..8 {
        let col = bt8::<E, S>(s, std::array::from_fn(|r| d[r * 8 + c]));
        for r in 0..8 {
            t[r * 8 + c] = col[r];
        }
    }
    let mut out = t;
    for r in 0..8 {
        let row = bt8::<E, S>(s, std::array::from_fn(|c| t[r * 8 + c]));
        out[r * 8..r * 8 + 8].copy_from_slice(&row);
    }
    out
}

/// `A^T m` along one line: 8 values to 6.
#[inline(always)]
fn at8<E: Elem, S: Simd>(s: S, m: [E::V<S>; 8]) -> [E::V<S>; 6] {
    let kk = |c: f64| k::<E, S>(s, c);
    let a = E::vadd(s, m[1], m[2]);
    let b = E::vsub(s, m[1], m[2]);
    let c = E::vadd(s, m[3], m[4]);
    let d = E::vsub(s, m[3], m[4]);
    let e = E::vadd(s, m[5], m[6]);
    let f = E::vsub(s, m[5], m[6]);
    [
        E::vadd(s, E::vadd(s, m[0], a), E::vadd(s, c, e)),
        E::fma(s, kk(2.0), d, E::fma(s, kk(0.5), f, b)),
        E::fma(s, kk(4.0), c, E::fma(s, kk(0.25), e, a)),
        E::fma(s, kk(8.0), d, E::fma(s, kk(0.125), f, b)),
        E::fma(s, kk(16.0), c, E::fma(s, kk(0.0625), e, a)),
        E::vadd(
            s,
            E::fma(s, kk(32.0), d, E::fma(s, kk(0.03125), f, b)),
            m[7],
        ),
    ]
}

/// `A^T m A`: an 8 x 8 product tile to the 6 x 6 outputs (row-major).
#[inline(always)]
pub(crate) fn output_tile6<E: Elem, S: Simd>(s: S, m: &[E::V<S>; POS6]) -> [E::V<S>; 36] {
    let zero = E::splat(s, E::zero());
    let mut t = [zero; 48]; // 6 x 8
    for c in 0..8 {
        let col = at8::<E, S>(s, std::array::from_fn(|r| m[r * 8 + c]));
        for r in 0..6 {
            t[r * 8 + c] = col[r];
        }
    }
    let mut out = [zero; 36];
    for r in 0..6 {
        let row = at8::<E, S>(s, std::array::from_fn(|c| t[r * 8 + c]));
        out[r * 6..r * 6 + 6].copy_from_slice(&row);
    }
    out
}

/// `G g` along one line: 3 taps to 8.
#[inline(always)]
fn g8<E: Elem, S: Simd>(s: S, a: E::V<S>, b: E::V<S>, c: E::V<S>) -> [E::V<S>; 8] {
    let kk = |x: f64| k::<E, S>(s, x);
    let ac = E::vadd(s, a, c);
    let e3 = E::fma(s, kk(1.0 / 90.0), a, E::vmul(s, kk(2.0 / 45.0), c));
    let b3 = E::vmul(s, kk(1.0 / 45.0), b);
    let e5 = E::fma(s, kk(32.0 / 45.0), a, E::vmul(s, kk(8.0 / 45.0), c));
    let b5 = E::vmul(s, kk(16.0 / 45.0), b);
    [
        a,
        E::vmul(s, kk(-2.0 / 9.0), E::vadd(s, ac, b)),
        E::vmul(s, kk(-2.0 / 9.0), E::vsub(s, ac, b)),
        E::vadd(s, e3, b3),
        E::vsub(s, e3, b3),
        E::vadd(s, e5, b5),
        E::vsub(s, e5, b5),
        c,
    ]
}

/// `G g G^T` of 3 x 3 filters (row-major taps, lanes are independent
/// filters) to the 64 positions. There is no scalar twin: a filter past
/// the last whole register goes through this function in a register of
/// its own (the other lanes zero), so every filter gets the same bits
/// whatever the register width.
#[inline(always)]
pub(crate) fn weight_tile6_v<E: Elem, S: Simd>(s: S, g: &[E::V<S>; 9]) -> [E::V<S>; POS6] {
    let zero = E::splat(s, E::zero());
    let mut t = [zero; 24]; // 8 x 3
    for c in 0..3 {
        let col = g8::<E, S>(s, g[c], g[3 + c], g[6 + c]);
        for r in 0..8 {
            t[r * 3 + c] = col[r];
        }
    }
    let mut out = [zero; POS6];
    for r in 0..8 {
        out[r * 8..r * 8 + 8].copy_from_slice(&g8::<E, S>(s, t[r * 3], t[r * 3 + 1], t[r * 3 + 2]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulp::WithSimd;

    /// One window through the three transforms in f64 on every ISA, lane
    /// 0 of each register.
    struct OneTile {
        d: [f64; POS6],
        g: [f64; 9],
    }

    impl WithSimd for OneTile {
        type Output = [f64; 36];
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) -> [f64; 36] {
            let l = f64::lanes::<S>();
            let lane0 = |v: <f64 as Elem>::V<S>| {
                let mut out = [0.0f64; 16];
                f64::store(s, &mut out[..l], v);
                out[0]
            };
            let dv: [_; POS6] = std::array::from_fn(|i| f64::splat(s, self.d[i]));
            let gv: [_; 9] = std::array::from_fn(|t| f64::splat(s, self.g[t]));
            let u = weight_tile6_v::<f64, S>(s, &gv);
            let v = input_tile6::<f64, S>(s, &dv);
            let m: [_; POS6] = std::array::from_fn(|i| f64::vmul(s, v[i], u[i]));
            output_tile6::<f64, S>(s, &m).map(lane0)
        }
    }

    /// The 6 x 6 outputs equal the 3x3 correlation of the window. The
    /// transforms' constants round in f64 (2/9, 1/90, ...), and the
    /// largest coefficient products reach about 32 x 21/4 x 32/45; with
    /// values of magnitude <= 2, 1e-12 is about 100 ulps of the outputs'
    /// scale: it holds any wrong coefficient (the smallest, 1/32 on a
    /// value of 1/4, moves an output by 1e-2) far outside.
    #[test]
    fn one_tile_equals_the_correlation() {
        let d: [f64; POS6] = std::array::from_fn(|i| ((i * 37 % 13) as f64 - 6.0) / 4.0);
        let g: [f64; 9] = std::array::from_fn(|i| ((i * 5 % 7) as f64 - 3.0) / 8.0);
        for arch in crate::backend::cpu::Isa::every_arch() {
            let y = arch.dispatch(OneTile { d, g });
            for oy in 0..6 {
                for ox in 0..6 {
                    let mut want = 0.0;
                    for ky in 0..3 {
                        for kx in 0..3 {
                            want += d[(oy + ky) * 8 + ox + kx] * g[ky * 3 + kx];
                        }
                    }
                    let got = y[oy * 6 + ox];
                    assert!(
                        (got - want).abs() <= 1e-12,
                        "{arch:?}: y[{oy}][{ox}] {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Each window position and each tap on its own (unit impulses): the
    /// output is exactly where the correlation puts it, so no position of
    /// B^T, G or A^T can be swapped or dropped without failing.
    #[test]
    fn every_position_and_tap_lands_where_the_correlation_puts_it() {
        let arch = crate::backend::cpu::Isa::every_arch()[0];
        for at in 0..POS6 {
            for tap in 0..9 {
                let mut d = [0.0; POS6];
                d[at] = 1.0;
                let mut g = [0.0; 9];
                g[tap] = 1.0;
                let y = arch.dispatch(OneTile { d, g });
                let (r, c, ky, kx) = (at / 8, at % 8, tap / 3, tap % 3);
                for oy in 0..6 {
                    for ox in 0..6 {
                        let want = f64::from(u8::from(oy + ky == r && ox + kx == c));
                        let got = y[oy * 6 + ox];
                        assert!(
                            (got - want).abs() <= 1e-12,
                            "window {at}, tap {tap}: y[{oy}][{ox}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
