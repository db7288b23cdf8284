//! The vector scatter of F(6x6) registers made of row runs: what the
//! F(4x4) scatter does with [`Elem::interleave4`] for tiles every 4
//! columns, for tiles every 6 columns, where no 4-way shuffle serves.
//!
//! Why: in the forward engine a register's lanes are tiles, so the outputs
//! of 16 F(6x6) tiles at one place in their tiles lie every 6 columns, and
//! the scalar scatter moved each of a tile's 36 outputs on its own. Here a
//! register of two runs writes each output row with 6 vector stores. A
//! dense P3 forward pass's output phase went from 11.6-11.9 to 8.8-9.3 ms
//! and the pass from 62.6-64.2 to 59.8-61.6 ms, P4's output phase from
//! 3.1-3.2 to 2.6-2.7 ms (AMD EPYC Zen 4, AVX-512, 2 threads, temporary
//! phase timers, medians of 7, three and two alternating rounds); the
//! whole loss in `docs/engineering.md`.
//!
//! The inverse moves did not pay where they were tried. The forward's
//! window gather, building each window column of 16 windows from six
//! loads per run (6 loads, 3 permutes and 2 blends per column, against 16
//! scalar moves), took the P3 input phase from 11.0-15.4 to 16.1-20.9 ms
//! in the same rounds; the weight gradient's output-gradient deal (six
//! loads per tile row of a register, then 3 permutes and 2 blends per
//! column, against the compiler's vectorized copy in `dw.rs`) took the
//! dense P3 weight gradient from 66.0-67.5 to 71.9-74.1 ms
//! (`examples/conv_speed`, three alternating rounds). On AVX2 (AMD EPYC
//! Zen 3, family 25 model 1) the window gather by 8 x 8 transposes, the
//! inverse of this file's AVX2 scatter, took the dense P3 input phase from
//! 27.4 / 28.9 / 22.7 to 31.0 / 26.2 / 23.1 ms (three alternating rounds;
//! `docs/engineering.md`, "The F(6x6) output scatter on AVX2"). So F(6x6)
//! windows and output-gradient tiles are still gathered lane by lane.
//!
//! A register of 16 f32 lanes holds two runs of [`RUN6`] consecutive tiles
//! of one tile row each (lanes 0-7 and 8-15; any two rows, any two
//! images), not one run of 16: a P4 tile row has 14 tiles (84 columns), a
//! P3 row 28, so runs of 16 would leave P4 none and P3 one per row; runs of
//! 8 give P4 one and P3 three.
//!
//! On AVX-512 the moves are `vpermt2ps` (two-source permutes) and blends.
//! On AVX2 a register of 8 f32 lanes holds one run, and its 48 outputs per
//! output row are a 6 x 8 transpose: the two 128-bit halves (tiles 0-3 and
//! 4-7, outputs 0-23 and 24-47) are transposed side by side with in-lane
//! unpacks and shuffles, then paired by `vperm2f128`: 18 moves and 6 stores
//! against 48 scalar moves. Measured (AMD EPYC Zen 3, family 25 model 1,
//! AVX2, 2 threads, 2026-12-07, temporary phase timers, `examples/conv_speed`
//! medians of 7, three alternating rounds while the host sped up): dense P3
//! forward's output phase 32.2 / 27.9 / 22.9 -> 19.9 / 17.3 / 14.7 ms and
//! the pass 131.6 / 123.9 / 109.0 -> 113.3 / 106.7 / 93.8 ms; P4's output
//! phase 8.1 / 6.7 / 5.8 -> 5.9 / 5.1 / 4.1 ms. f32 only ([`has_runs6`]):
//! f64 is the checking dtype. Only data moves, so a tile gets the scalar
//! path's bits, whichever path moves it.

#[cfg(target_arch = "x86_64")]
use std::any::{Any, TypeId};

use pulp::Simd;

use crate::backend::cpu::simd::Elem;

/// Tiles per run: half a register of 16 lanes (AVX-512), a whole one of 8
/// (AVX2).
pub(crate) const RUN6: usize = 8;

/// True when `E` under `S` has the vector moves: f32 on AVX-512 and AVX2.
#[inline(always)]
pub(crate) fn has_runs6<E: Elem, S: Simd>() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let s = TypeId::of::<S>();
        TypeId::of::<E>() == TypeId::of::<f32>()
            && (s == TypeId::of::<pulp::x86::V4>() || s == TypeId::of::<pulp::x86::V3>())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The outputs of one output row of a run: `6 RUN6`, three registers of
/// 16.
#[cfg(test)]
const RUN6_SPAN: usize = 6 * RUN6;

/// Indices and masks of [`scatter6`]: output register `o` (run `q = o /
/// 3`, values `16 k .. 16 k + 16` of its 48, `k = o % 3`) wants at lane
/// `e` the value at `pos = 16 k + e`: column `x = pos % 6` of tile `t = pos
/// / 6`, which is lane `8 q + t` of field `x`; permute `p` reads fields `2p`
/// and `2p + 1`.
const fn scatter_tables() -> ([[[i32; 16]; 3]; 6], [[u16; 3]; 6]) {
    let mut idx = [[[0i32; 16]; 3]; 6];
    let mut mask = [[0u16; 3]; 6];
    let mut o = 0;
    while o < 6 {
        let mut e = 0;
        while e < 16 {
            let pos = 16 * (o % 3) + e;
            let (x, t) = (pos % 6, pos / 6);
            let p = x / 2;
            idx[o][p][e] = ((x % 2) * 16 + 8 * (o / 3) + t) as i32;
            mask[o][p] |= 1 << e;
            e += 1;
        }
        o += 1;
    }
    (idx, mask)
}

const SCATTER: ([[[i32; 16]; 3]; 6], [[u16; 3]; 6]) = scatter_tables();

/// One output row of a register of runs: `fields[x]` holds column `x` of
/// each tile's row (lane `8 q + t`: run `q`, tile `t`); returns each run's
/// [`RUN6_SPAN`] outputs in tile order (value `6 t + x` of run `q` is
/// `fields[x]`'s lane `8 q + t`), run after run in registers of the ISA's
/// lanes: with 16 lanes (AVX-512) two runs of three registers, with 8
/// (AVX2) one run of six. `None` where the moves do not exist
/// ([`has_runs6`]).
#[inline(always)]
pub(crate) fn scatter6<E: Elem, S: Simd>(s: S, fields: [E::V<S>; 6]) -> Option<[E::V<S>; 6]> {
    #[cfg(target_arch = "x86_64")]
    if let Some(&v4) = (&s as &dyn Any).downcast_ref::<pulp::x86::V4>()
        && has_runs6::<E, S>()
    {
        use core::arch::x86_64::{__m512, __m512i};
        use pulp::bytemuck::cast;
        let avx = v4.avx512f;
        let f: [__m512; 6] = std::array::from_fn(|x| cast(fields[x]));
        let (idx, mask) = SCATTER;
        let out = |o: usize| {
            let perm = |p: usize| {
                let i: __m512i = cast(idx[o][p]);
                avx._mm512_permutex2var_ps(f[2 * p], i, f[2 * p + 1])
            };
            let v = avx._mm512_mask_blend_ps(mask[o][1], perm(0), perm(1));
            cast(avx._mm512_mask_blend_ps(mask[o][2], v, perm(2)))
        };
        return Some(std::array::from_fn(out));
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(&v3) = (&s as &dyn Any).downcast_ref::<pulp::x86::V3>()
        && has_runs6::<E, S>()
    {
        use core::arch::x86_64::__m256;
        use pulp::bytemuck::cast;
        let avx = v3.avx;
        let f: [__m256; 6] = std::array::from_fn(|x| cast(fields[x]));
        // Within each 128-bit half (tiles a..a+4 of lanes 0-3 or 4-7), with
        // `Fx[t]` lane t of the half: `q[k]` holds the half's outputs 4k ..
        // 4k + 4 (output `6 t + x` is `Fx[t]`).
        let lo01 = avx._mm256_unpacklo_ps(f[0], f[1]); // F0[0] F1[0] F0[1] F1[1]
        let hi01 = avx._mm256_unpackhi_ps(f[0], f[1]); // F0[2] F1[2] F0[3] F1[3]
        let lo23 = avx._mm256_unpacklo_ps(f[2], f[3]); // F2[0] F3[0] F2[1] F3[1]
        let hi23 = avx._mm256_unpackhi_ps(f[2], f[3]); // F2[2] F3[2] F2[3] F3[3]
        let lo45 = avx._mm256_unpacklo_ps(f[4], f[5]); // F4[0] F5[0] F4[1] F5[1]
        let hi45 = avx._mm256_unpackhi_ps(f[4], f[5]); // F4[2] F5[2] F4[3] F5[3]
        // `_mm256_shuffle_ps::<M>(a, b)`: two values of `a`, then two of
        // `b`; 0x44 takes values 0, 1 of each, 0xEE values 2, 3, 0xE4
        // values 0, 1 of `a` and 2, 3 of `b`.
        let q = [
            avx._mm256_shuffle_ps::<0x44>(lo01, lo23), // tile 0: x 0-3
            avx._mm256_shuffle_ps::<0xE4>(lo45, lo01), // tile 0: x 4, 5; tile 1: x 0, 1
            avx._mm256_shuffle_ps::<0xEE>(lo23, lo45), // tile 1: x 2-5
            avx._mm256_shuffle_ps::<0x44>(hi01, hi23), // tile 2: x 0-3
            avx._mm256_shuffle_ps::<0xE4>(hi45, hi01), // tile 2: x 4, 5; tile 3: x 0, 1
            avx._mm256_shuffle_ps::<0xEE>(hi23, hi45), // tile 3: x 2-5
        ];
        // Outputs 8j .. 8j + 8 of the run: the low halves of a pair of `q`
        // (tiles 0-3) for j < 3, the high halves (tiles 4-7) after.
        let out = |j: usize| {
            let (a, b) = (q[2 * (j % 3)], q[2 * (j % 3) + 1]);
            cast(match j < 3 {
                true => avx._mm256_permute2f128_ps::<0x20>(a, b),
                false => avx._mm256_permute2f128_ps::<0x31>(a, b),
            })
        };
        return Some(std::array::from_fn(out));
    }
    let _ = (s, fields);
    None
}

/// [`has_runs6`] for f32 or f64 under `arch`'s instruction set.
pub(crate) fn has_runs6_for<E: Elem>(arch: pulp::Arch) -> bool {
    struct Probe<E>(std::marker::PhantomData<E>);
    impl<E: Elem> pulp::WithSimd for Probe<E> {
        type Output = bool;
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) -> bool {
            has_runs6::<E, S>()
        }
    }
    arch.dispatch(Probe::<E>(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::Isa;

    struct Check;

    impl pulp::WithSimd for Check {
        type Output = bool;

        /// True when the moves ran (and moved every value to its place).
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) -> bool {
            let l = <f32 as Elem>::lanes::<S>();
            // Fields whose lanes name their value: 100 x + lane.
            let fields: [_; 6] = std::array::from_fn(|x| {
                let v: Vec<f32> = (0..l).map(|j| (100 * x + j) as f32).collect();
                f32::load(s, &v)
            });
            let Some(regs) = scatter6::<f32, S>(s, fields) else {
                return false;
            };
            // The runs' values, run after run.
            let mut runs = vec![0f32; 6 * l];
            for (j, &r) in regs.iter().enumerate() {
                f32::store(s, &mut runs[j * l..], r);
            }
            assert_eq!(runs.len(), l / RUN6 * RUN6_SPAN);
            for (q, run) in runs.chunks(RUN6_SPAN).enumerate() {
                for t in 0..RUN6 {
                    for x in 0..6 {
                        let want = (100 * x + RUN6 * q + t) as f32;
                        assert_eq!(run[6 * t + x], want, "scatter6 run {q} tile {t} column {x}");
                    }
                }
            }
            true
        }
    }

    /// The scatter against its definition where it exists (f32 on
    /// AVX-512 and AVX2, and there it must), `None` on every other ISA
    /// this machine has.
    #[test]
    fn scatter6_moves_every_value_to_its_place() {
        for isa in Isa::available() {
            let arch = isa.arch().unwrap();
            let moved = arch.dispatch(Check);
            assert_eq!(moved, matches!(isa, Isa::Avx512 | Isa::Avx2), "{isa:?}");
            assert_eq!(has_runs6_for::<f32>(arch), moved, "{isa:?}");
            assert!(!has_runs6_for::<f64>(arch), "{isa:?}");
        }
    }
}
