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
    type V<S: Simd>: Copy;

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
