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
//! The weight gradient runs the adjoints: `A g A^T` takes a 6 x 6
//! output-gradient tile to the 8 x 8 domain, `G^T D G` takes the 64 summed
//! products back to the 3 x 3 filter.

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

/// `A g` along one line: 6 values to 8 (the adjoint of [`at8`]; every
/// coefficient a power of two, so only the additions round).
#[inline(always)]
fn a6<E: Elem, S: Simd>(s: S, g: [E::V<S>; 6]) -> [E::V<S>; 8] {
    let kk = |c: f64| k::<E, S>(s, c);
    let p1 = E::vadd(s, E::vadd(s, g[0], g[2]), g[4]);
    let q1 = E::vadd(s, E::vadd(s, g[1], g[3]), g[5]);
    let p2 = E::fma(s, kk(16.0), g[4], E::fma(s, kk(4.0), g[2], g[0]));
    let q2 = E::fma(
        s,
        kk(32.0),
        g[5],
        E::fma(s, kk(8.0), g[3], E::vadd(s, g[1], g[1])),
    );
    let p3 = E::fma(s, kk(0.0625), g[4], E::fma(s, kk(0.25), g[2], g[0]));
    let q3 = E::fma(
        s,
        kk(0.03125),
        g[5],
        E::fma(s, kk(0.125), g[3], E::vmul(s, kk(0.5), g[1])),
    );
    [
        g[0],
        E::vadd(s, p1, q1),
        E::vsub(s, p1, q1),
        E::vadd(s, p2, q2),
        E::vsub(s, p2, q2),
        E::vadd(s, p3, q3),
        E::vsub(s, p3, q3),
        g[5],
    ]
}

/// `A g A^T`: a 6 x 6 output-gradient tile to the 8 x 8 domain.
#[inline(always)]
pub(crate) fn grad_tile6<E: Elem, S: Simd>(s: S, g: &[E::V<S>; 36]) -> [E::V<S>; POS6] {
    let zero = E::splat(s, E::zero());
    let mut t = [zero; 48]; // 8 x 6
    for c in 0..6 {
        let col = a6::<E, S>(s, std::array::from_fn(|r| g[r * 6 + c]));
        for r in 0..8 {
            t[r * 6 + c] = col[r];
        }
    }
    let mut out = [zero; POS6];
    for r in 0..8 {
        let row = a6::<E, S>(s, std::array::from_fn(|c| t[r * 6 + c]));
        out[r * 8..r * 8 + 8].copy_from_slice(&row);
    }
    out
}

/// `G^T d` along one line: 8 values to 3 (the adjoint of [`g8`]).
#[inline(always)]
fn gt8<E: Elem, S: Simd>(s: S, d: [E::V<S>; 8]) -> [E::V<S>; 3] {
    let kk = |x: f64| k::<E, S>(s, x);
    let s12 = E::vadd(s, d[1], d[2]);
    let s34 = E::vadd(s, d[3], d[4]);
    let s56 = E::vadd(s, d[5], d[6]);
    let m12 = E::vsub(s, d[2], d[1]);
    let m34 = E::vsub(s, d[3], d[4]);
    let m56 = E::vsub(s, d[5], d[6]);
    [
        E::fma(
            s,
            kk(32.0 / 45.0),
            s56,
            E::fma(s, kk(1.0 / 90.0), s34, E::fma(s, kk(-2.0 / 9.0), s12, d[0])),
        ),
        E::fma(
            s,
            kk(16.0 / 45.0),
            m56,
            E::fma(s, kk(1.0 / 45.0), m34, E::vmul(s, kk(2.0 / 9.0), m12)),
        ),
        E::fma(
            s,
            kk(8.0 / 45.0),
            s56,
            E::fma(s, kk(2.0 / 45.0), s34, E::fma(s, kk(-2.0 / 9.0), s12, d[7])),
        ),
    ]
}

/// `G^T D G`: the gradient of the 64 transformed weights back to the 3 x 3
/// filters (the adjoint of [`weight_tile6_v`]; lanes are independent
/// filters). No scalar twin, as for [`weight_tile6_v`]: a filter past the
/// last whole register goes through this function in a register of its
/// own.
#[inline(always)]
pub(crate) fn weight_grad_tile6_v<E: Elem, S: Simd>(s: S, d: &[E::V<S>; POS6]) -> [E::V<S>; 9] {
    let zero = E::splat(s, E::zero());
    let mut t = [zero; 24]; // 3 x 8
    for c in 0..8 {
        let col = gt8::<E, S>(s, std::array::from_fn(|r| d[r * 8 + c]));
        for r in 0..3 {
            t[r * 8 + c] = col[r];
        }
    }
    let mut out = [zero; 9];
    for r in 0..3 {
        out[r * 3..r * 3 + 3]
            .copy_from_slice(&gt8::<E, S>(s, std::array::from_fn(|c| t[r * 8 + c])));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulp::WithSimd;

    /// One window through the transforms in f64 on every ISA, lane 0 of
    /// each register: the outputs `A^T ((G g G^T) (.) (B^T d B)) A`, and
    /// the window's weight gradient `G^T ((A dy A^T) (.) (B^T d B)) G`.
    struct OneTile {
        d: [f64; POS6],
        g: [f64; 9],
        dy: [f64; 36],
    }

    impl WithSimd for OneTile {
        type Output = ([f64; 36], [f64; 9]);
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) -> Self::Output {
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
            let y = output_tile6::<f64, S>(s, &m).map(lane0);
            let dyv: [_; 36] = std::array::from_fn(|i| f64::splat(s, self.dy[i]));
            let a = grad_tile6::<f64, S>(s, &dyv);
            let p: [_; POS6] = std::array::from_fn(|i| f64::vmul(s, a[i], v[i]));
            (y, weight_grad_tile6_v::<f64, S>(s, &p).map(lane0))
        }
    }

    /// `dw[ky][kx] = sum dy[oy][ox] d[oy + ky][ox + kx]`, by definition.
    fn weight_grad_by_definition(d: &[f64; POS6], dy: &[f64; 36]) -> [f64; 9] {
        std::array::from_fn(|tap| {
            let (ky, kx) = (tap / 3, tap % 3);
            (0..36)
                .map(|o| dy[o] * d[(o / 6 + ky) * 8 + o % 6 + kx])
                .sum()
        })
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
            let dy: [f64; 36] = std::array::from_fn(|i| ((i * 11 % 9) as f64 - 4.0) / 2.0);
            let (y, dw) = arch.dispatch(OneTile { d, g, dy });
            let want_dw = weight_grad_by_definition(&d, &dy);
            for (tap, (&got, &want)) in dw.iter().zip(&want_dw).enumerate() {
                // The same bound as the outputs': the sums run over 36
                // products of values <= 2 (scale ~1e2), and the adjoint
                // transforms' largest coefficient products are the
                // forward ones'.
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1.0) * 36.0,
                    "{arch:?}: dw[{tap}] {got} vs {want}"
                );
            }
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
                let (y, _) = arch.dispatch(OneTile {
                    d,
                    g,
                    dy: [0.0; 36],
                });
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

    /// The weight gradient of unit impulses, each window position against
    /// each output-gradient position: 1 exactly at the tap that joins
    /// them (if any), 0 elsewhere, so no position of A, B^T or G^T can be
    /// swapped or dropped without failing.
    #[test]
    fn every_window_and_gradient_position_meet_at_their_tap() {
        let arch = crate::backend::cpu::Isa::every_arch()[0];
        for at in 0..POS6 {
            for o in 0..36 {
                let mut d = [0.0; POS6];
                d[at] = 1.0;
                let mut dy = [0.0; 36];
                dy[o] = 1.0;
                let (_, dw) = arch.dispatch(OneTile { d, g: [0.0; 9], dy });
                let want = weight_grad_by_definition(&d, &dy);
                for tap in 0..9 {
                    assert!(
                        (dw[tap] - want[tap]).abs() <= 1e-12,
                        "window {at}, gradient {o}: dw[{tap}] {} vs {}",
                        dw[tap],
                        want[tap]
                    );
                }
            }
        }
    }
}
