//! The element types the SIMD kernels are generic over (f32, f64), as thin
//! wrappers around pulp's lane types.
//!
//! Why a trait of our own: the conv kernels are written once and
//! instantiated for f32 (8 lanes on AVX2) and f64 (4 lanes). Only the
//! operations the kernels need are here; each is a single pulp call, so the
//! generated code is the same as writing against `S::f32s` directly.

use pulp::Simd;

use crate::tensor::Float;

/// A float type with pulp lanes.
pub(crate) trait Elem: Float + pulp::bytemuck::Pod {
    /// One SIMD register of `Self` under instruction set `S`.
    type V<S: Simd>: Copy + pulp::bytemuck::Pod;

    /// Lanes per register under `S`.
    fn lanes<S: Simd>() -> usize;
    fn splat<S: Simd>(s: S, x: Self) -> Self::V<S>;
    /// `a * b + c`, always fused (one rounding): the kernels' determinism
    /// argument rests on it (pulp's `mul_add_*s`, not `mul_add_e_*s`).
    fn fma<S: Simd>(s: S, a: Self::V<S>, b: Self::V<S>, c: Self::V<S>) -> Self::V<S>;
    fn vadd<S: Simd>(s: S, a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    fn vsub<S: Simd>(s: S, a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    fn vmul<S: Simd>(s: S, a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    /// Load `lanes` elements from a slice of at least that length.
    fn load<S: Simd>(s: S, x: &[Self]) -> Self::V<S>;
    /// Store `lanes` elements into a slice of at least that length.
    fn store<S: Simd>(s: S, x: &mut [Self], v: Self::V<S>);
    /// Four registers of interleaved records (`x[4 t + f]`: field `f` of
    /// record `t`, the registers read as one array) to one register per
    /// field, lanes over records in the ISA's fixed order ([`lane_order`]):
    /// a few shuffles on AVX2 / AVX-512 (pulp's `deinterleave_shfl`).
    fn deinterleave4<S: Simd>(s: S, v: [Self::V<S>; 4]) -> [Self::V<S>; 4];
    /// The inverse of [`Elem::deinterleave4`].
    fn interleave4<S: Simd>(s: S, v: [Self::V<S>; 4]) -> [Self::V<S>; 4];

    /// Unaligned load of one register.
    ///
    /// # Safety
    /// `p .. p + lanes` must be readable.
    #[inline(always)]
    unsafe fn load_ptr<S: Simd>(p: *const Self) -> Self::V<S> {
        // SAFETY: the caller guarantees `lanes` readable elements; `V<S>` is a
        // plain-old-data array of `lanes` elements, so an unaligned read of it
        // is the vector load.
        unsafe { core::ptr::read_unaligned(p as *const Self::V<S>) }
    }

    /// Unaligned store of one register.
    ///
    /// # Safety
    /// `p .. p + lanes` must be writable and not aliased.
    #[inline(always)]
    unsafe fn store_ptr<S: Simd>(p: *mut Self, v: Self::V<S>) {
        // SAFETY: as `load_ptr`.
        unsafe { core::ptr::write_unaligned(p as *mut Self::V<S>, v) }
    }
}

macro_rules! impl_elem {
    ($t:ty, $v:ident, $lanes:ident, $splat:ident, $fma:ident, $add:ident, $sub:ident, $mul:ident, $as:ident, $asm:ident, $deint:ident, $int:ident) => {
        impl Elem for $t {
            type V<S: Simd> = S::$v;

            #[inline(always)]
            fn lanes<S: Simd>() -> usize {
                S::$lanes
            }
            #[inline(always)]
            fn splat<S: Simd>(s: S, x: Self) -> Self::V<S> {
                s.$splat(x)
            }
            #[inline(always)]
            fn fma<S: Simd>(s: S, a: Self::V<S>, b: Self::V<S>, c: Self::V<S>) -> Self::V<S> {
                s.$fma(a, b, c)
            }
            #[inline(always)]
            fn vadd<S: Simd>(s: S, a: Self::V<S>, b: Self::V<S>) -> Self::V<S> {
                s.$add(a, b)
            }
            #[inline(always)]
            fn vsub<S: Simd>(s: S, a: Self::V<S>, b: Self::V<S>) -> Self::V<S> {
                s.$sub(a, b)
            }
            #[inline(always)]
            fn vmul<S: Simd>(s: S, a: Self::V<S>, b: Self::V<S>) -> Self::V<S> {
                s.$mul(a, b)
            }
            #[inline(always)]
            fn load<S: Simd>(s: S, x: &[Self]) -> Self::V<S> {
                let _ = s;
                let (head, _) = S::$as(&x[..S::$lanes]);
                head[0]
            }
            #[inline(always)]
            fn store<S: Simd>(s: S, x: &mut [Self], v: Self::V<S>) {
                let _ = s;
                let (head, _) = S::$asm(&mut x[..S::$lanes]);
                head[0] = v;
            }
            #[inline(always)]
            fn deinterleave4<S: Simd>(s: S, v: [Self::V<S>; 4]) -> [Self::V<S>; 4] {
                s.$deint(v)
            }
            #[inline(always)]
            fn interleave4<S: Simd>(s: S, v: [Self::V<S>; 4]) -> [Self::V<S>; 4] {
                s.$int(v)
            }
        }
    };
}

impl_elem!(
    f32,
    f32s,
    F32_LANES,
    splat_f32s,
    mul_add_f32s,
    add_f32s,
    sub_f32s,
    mul_f32s,
    as_simd_f32s,
    as_mut_simd_f32s,
    deinterleave_shfl_f32s,
    interleave_shfl_f32s
);
impl_elem!(
    f64,
    f64s,
    F64_LANES,
    splat_f64s,
    mul_add_f64s,
    add_f64s,
    sub_f64s,
    mul_f64s,
    as_simd_f64s,
    as_mut_simd_f64s,
    deinterleave_shfl_f64s,
    interleave_shfl_f64s
);

/// The most lanes a register has (f32 on AVX-512).
pub(crate) const MAX_LANES: usize = 16;

/// The record each lane of [`Elem::deinterleave4`]'s registers holds:
/// lane `l` holds record `order[l]` (pulp leaves the order to the ISA, so
/// it is read off the shuffle itself, once per call site).
#[inline(always)]
pub(crate) fn lane_order<E: Elem, S: Simd>(s: S) -> [usize; MAX_LANES] {
    let l = E::lanes::<S>();
    let mut records = [E::zero(); 4 * MAX_LANES];
    for (i, r) in records.iter_mut().enumerate() {
        *r = E::from_usize(i / 4);
    }
    let v = std::array::from_fn(|k| E::load(s, &records[k * l..]));
    let mut field0 = [E::zero(); MAX_LANES];
    E::store(s, &mut field0, E::deinterleave4(s, v)[0]);
    std::array::from_fn(|lane| field0[lane].as_f64() as usize)
}

/// Cache hint levels for [`prefetch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    L1,
    L2,
}

/// Ask the cache to fetch the line holding `p` (a hint: never faults, any
/// address is fine, a no-op off x86-64).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T, level: Level) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        // SAFETY: a prefetch reads no memory architecturally and cannot
        // fault, whatever the address; SSE is part of the x86-64 baseline.
        unsafe {
            match level {
                Level::L1 => _mm_prefetch::<_MM_HINT_T0>(p as *const i8),
                Level::L2 => _mm_prefetch::<_MM_HINT_T1>(p as *const i8),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, level);
}

/// [`prefetch`] into L1 of every line that the `len` values from `p` touch.
#[inline(always)]
pub(crate) fn prefetch_values<T>(p: *const T, len: usize) {
    line_hints(len, std::mem::size_of::<T>(), |at| {
        prefetch(p.wrapping_add(at), Level::L1)
    });
}

/// `hint(v)` for the values `v` (offsets from the first) that
/// [`prefetch_values`] hints for `len` values of `size` bytes: one every 64
/// bytes from the first, so no line lies between two hints, and the last
/// value for the last line. (A loop: as a chained iterator, the transforms
/// that call it for every window ran 5-10% slower.)
#[inline(always)]
fn line_hints(len: usize, size: usize, mut hint: impl FnMut(usize)) {
    for at in (0..len).step_by(64 / size.max(1)) {
        hint(at);
    }
    if len > 0 {
        hint(len - 1);
    }
}

/// Cache lines that a kernel call fetches into L2 while it runs, one at a
/// time between its k steps ([`Ahead::next_line`]), so that the fetches
/// overlap its FMAs instead of arriving in one burst at the call's start:
/// the B tile its caller reads after the current one, cut into shares over
/// the calls that run before it ([`Ahead::shares`]). A hint: the lines may
/// lie anywhere.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ahead {
    next: *const u8,
    left: usize,
}

impl Ahead {
    /// Nothing to fetch.
    pub(crate) const NONE: Ahead = Ahead {
        next: std::ptr::null(),
        left: 0,
    };

    /// The lines of shares `parts` (consecutive, see [`share_lines`]) of
    /// `of` of `region`.
    pub(crate) fn shares<T>(region: &[T], parts: std::ops::Range<usize>, of: usize) -> Self {
        if parts.is_empty() {
            return Self::NONE;
        }
        let bytes = std::mem::size_of_val(region);
        let first = share_lines(bytes, parts.start, of).start;
        let end = share_lines(bytes, parts.end - 1, of).end;
        Ahead {
            next: region.as_ptr().cast::<u8>().wrapping_add(first * 64),
            left: end.saturating_sub(first),
        }
    }

    /// The next line to fetch, if any is left.
    #[inline(always)]
    pub(crate) fn next_line(&mut self) -> Option<*const u8> {
        (self.left > 0).then(|| {
            let p = self.next;
            self.next = p.wrapping_add(64);
            self.left -= 1;
            p
        })
    }
}

/// The 64-byte lines of share `part` of a `bytes`-long region cut into
/// `parts` equal runs of whole lines (the last ones shorter or empty).
pub(crate) fn share_lines(bytes: usize, part: usize, parts: usize) -> std::ops::Range<usize> {
    let lines = bytes.div_ceil(64);
    let per = lines.div_ceil(parts.max(1));
    (part * per).min(lines)..((part + 1) * per).min(lines)
}

/// [`lane_order`] under instruction set `arch`: one entry per lane.
pub(crate) fn lane_order_for<E: Elem>(arch: pulp::Arch) -> Vec<usize> {
    struct Probe<E>(std::marker::PhantomData<E>);
    impl<E: Elem> pulp::WithSimd for Probe<E> {
        type Output = Vec<usize>;
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) -> Vec<usize> {
            lane_order::<E, S>(s)[..E::lanes::<S>()].to_vec()
        }
    }
    arch.dispatch(Probe::<E>(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::{Ahead, line_hints, share_lines};

    /// The shares of a region cut its lines into consecutive runs, in
    /// order, none longer than an equal split rounded up, the longer ones
    /// first; worked by hand: a 32 KiB B tile (512 lines) over 21 panel
    /// calls is 25 lines per call, the last call 12; a partial last line
    /// counts as a line.
    #[test]
    fn shares_cut_the_lines_in_order() {
        assert_eq!(share_lines(32768, 0, 21), 0..25);
        assert_eq!(share_lines(32768, 20, 21), 500..512);
        assert_eq!(share_lines(65, 0, 2), 0..1);
        assert_eq!(share_lines(65, 1, 2), 1..2);
        assert_eq!(share_lines(64, 1, 2), 1..1);
        assert_eq!(share_lines(100, 0, 0), 0..2);
        for bytes in [0usize, 1, 63, 64, 65, 6144, 32768, 40000] {
            let lines = bytes.div_ceil(64);
            for parts in 1..50 {
                let most = lines.div_ceil(parts);
                let mut next = 0;
                let mut last_len = most;
                for part in 0..parts {
                    let r = share_lines(bytes, part, parts);
                    assert_eq!(r.start, next, "{bytes} bytes, share {part} of {parts}");
                    assert!(
                        r.len() <= last_len,
                        "{bytes} bytes, share {part} of {parts}"
                    );
                    (next, last_len) = (r.end, r.len());
                }
                assert_eq!(next, lines, "{bytes} bytes in {parts} shares");
            }
        }
    }

    /// Every line that `len` values touch gets a hint, and no other, from
    /// whichever offset in its line the first value lies at.
    #[test]
    fn line_hints_cover_the_lines_of_the_values() {
        for size in [4, 8] {
            for first in (0..64).step_by(size) {
                for len in 0..100 {
                    let line = |v: usize| (first + v * size) / 64;
                    let mut hints = Vec::new();
                    line_hints(len, size, |v| hints.push(v));
                    let hinted: std::collections::BTreeSet<usize> =
                        hints.iter().map(|&v| line(v)).collect();
                    let touched: std::collections::BTreeSet<usize> = (0..len).map(line).collect();
                    assert_eq!(hinted, touched, "size {size}, first {first}, len {len}");
                    assert!(hints.iter().all(|&v| v < len));
                }
            }
        }
        // One per line when the values start a line.
        let mut hints = Vec::new();
        line_hints(32, 4, |v| hints.push(v));
        assert_eq!(hints, [0, 16, 31]);
    }

    /// A call's lines are those of its shares, in order, one each; worked
    /// by hand: a 32 KiB B tile over 21 panels, a call of panels 3 and 4
    /// fetches lines 75 .. 125; the last panel's share alone, 500 .. 512;
    /// no panels, nothing.
    #[test]
    fn ahead_gives_the_lines_of_its_shares_once_each() {
        let region = vec![0f32; 8192];
        let base = region.as_ptr().cast::<u8>() as usize;
        let lines = |mut a: Ahead| {
            let mut v = Vec::new();
            while let Some(p) = a.next_line() {
                v.push((p as usize - base) / 64);
            }
            v
        };
        assert_eq!(
            lines(Ahead::shares(&region, 3..5, 21)),
            (75..125).collect::<Vec<_>>()
        );
        assert_eq!(
            lines(Ahead::shares(&region, 20..21, 21)),
            (500..512).collect::<Vec<_>>()
        );
        assert_eq!(
            lines(Ahead::shares(&region, 0..21, 21)),
            (0..512).collect::<Vec<_>>()
        );
        assert!(lines(Ahead::shares(&region, 4..4, 21)).is_empty());
        assert!(lines(Ahead::NONE).is_empty());
        for (parts, of) in [(0..1, 1), (2..3, 7), (5..7, 7), (0..3, 40)] {
            let want: Vec<usize> = parts
                .clone()
                .flat_map(|q| share_lines(32768, q, of))
                .collect();
            assert_eq!(
                lines(Ahead::shares(&region, parts.clone(), of)),
                want,
                "{parts:?} of {of}"
            );
        }
    }
}
