//! Index descriptors passed to kernels by value, and the host-side
//! simplification that keeps them short.
//!
//! A kernel reading a tensor through broadcast or reduction strides gets a
//! [`Strided`] (one operand) or [`Strided2`] (two operands): the row-major
//! extents of the index space it walks and each operand's strides. Before
//! launch, [`coalesce`] drops size-1 dims and merges adjacent dims that
//! every operand walks contiguously, so a typical NCHW broadcast becomes a
//! rank-1 or rank-2 walk (fewer divisions per element) and any practical
//! tensor fits in `MAX_RANK` dims.

use cudarc::driver::DeviceRepr;

use crate::backend::ConvGeometry;

/// Dims of a descriptor (`DMKD_MAX_RANK` in the kernels).
pub const MAX_RANK: usize = 8;

/// Mirrors `struct Strided` in `kernels/prelude.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Strided {
    pub rank: i64,
    pub dim: [i64; MAX_RANK],
    pub stride: [i64; MAX_RANK],
}

/// Mirrors `struct Strided2` in `kernels/prelude.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Strided2 {
    pub rank: i64,
    pub dim: [i64; MAX_RANK],
    pub sa: [i64; MAX_RANK],
    pub sb: [i64; MAX_RANK],
}

/// Mirrors `struct ConvGeom` in `kernels/conv.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvGeomC {
    pub n: i64,
    pub c: i64,
    pub h: i64,
    pub w: i64,
    pub kh: i64,
    pub kw: i64,
    pub sh: i64,
    pub sw: i64,
    pub ph: i64,
    pub pw: i64,
    pub oh: i64,
    pub ow: i64,
    /// 0 none, 1 spatial `[N, H*W]`, 2 channel `[N, C]`.
    pub mask_kind: i64,
}

// The kernels copy these parameters byte for byte; the C side asserts the
// same sizes (static_assert in the sources), so a changed field list fails
// to compile on one side or the other rather than misreading parameters.
const _: () = assert!(std::mem::size_of::<Strided>() == 8 * (1 + 2 * MAX_RANK));
const _: () = assert!(std::mem::size_of::<Strided2>() == 8 * (1 + 3 * MAX_RANK));
const _: () = assert!(std::mem::size_of::<ConvGeomC>() == 8 * 13);

// SAFETY: each type is `repr(C)` with only `i64` fields (no padding, no
// pointers, every bit pattern valid), laid out exactly as the C struct of
// the same name that the kernels take by value.
unsafe impl DeviceRepr for Strided {}
// SAFETY: as above.
unsafe impl DeviceRepr for Strided2 {}
// SAFETY: as above.
unsafe impl DeviceRepr for ConvGeomC {}

impl Strided {
    /// A descriptor of `dims` read with `strides`; None above `MAX_RANK` dims.
    pub fn new(dims: &[usize], strides: &[usize]) -> Option<Self> {
        if dims.len() > MAX_RANK || strides.len() != dims.len() {
            return None;
        }
        let mut s = Strided {
            rank: dims.len() as i64,
            ..Default::default()
        };
        for k in 0..dims.len() {
            s.dim[k] = dims[k] as i64;
            s.stride[k] = strides[k] as i64;
        }
        Some(s)
    }

    /// The host mirror of `strided_offset` in the prelude (the tests check
    /// the coalescing against it).
    #[cfg(test)]
    pub fn offset(&self, mut i: usize) -> usize {
        let mut off = 0;
        for k in (0..self.rank as usize).rev() {
            let d = self.dim[k] as usize;
            off += (i % d) * self.stride[k] as usize;
            i /= d;
        }
        off
    }
}

impl Strided2 {
    /// None above `MAX_RANK` dims.
    pub fn new(dims: &[usize], sa: &[usize], sb: &[usize]) -> Option<Self> {
        if dims.len() > MAX_RANK || sa.len() != dims.len() || sb.len() != dims.len() {
            return None;
        }
        let mut s = Strided2 {
            rank: dims.len() as i64,
            ..Default::default()
        };
        for k in 0..dims.len() {
            s.dim[k] = dims[k] as i64;
            s.sa[k] = sa[k] as i64;
            s.sb[k] = sb[k] as i64;
        }
        Some(s)
    }
}

impl ConvGeomC {
    pub fn new(g: &ConvGeometry, mask_kind: i64) -> Self {
        ConvGeomC {
            n: g.n as i64,
            c: g.c_in as i64,
            h: g.h as i64,
            w: g.w as i64,
            kh: g.kh as i64,
            kw: g.kw as i64,
            sh: g.stride[0] as i64,
            sw: g.stride[1] as i64,
            ph: g.padding[0] as i64,
            pw: g.padding[1] as i64,
            oh: g.oh as i64,
            ow: g.ow as i64,
            mask_kind,
        }
    }
}

/// Simplify a row-major index space `dims` read by several operands with
/// `strides[j]`: drop size-1 dims and merge dims `k, k+1` wherever every
/// operand has `stride[k] == stride[k+1] * dims[k+1]`. Every linear index
/// maps to the same offsets before and after (`tests` check this).
pub fn coalesce(dims: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut od: Vec<usize> = Vec::with_capacity(dims.len());
    let mut os: Vec<Vec<usize>> = vec![Vec::with_capacity(dims.len()); strides.len()];
    for (k, &d) in dims.iter().enumerate() {
        if d == 1 {
            continue;
        }
        let merge = !od.is_empty()
            && strides
                .iter()
                .zip(&os)
                .all(|(s, o)| *o.last().expect("non-empty") == s[k] * d);
        if merge {
            *od.last_mut().expect("non-empty") *= d;
            for (s, o) in strides.iter().zip(os.iter_mut()) {
                *o.last_mut().expect("non-empty") = s[k];
            }
        } else {
            od.push(d);
            for (s, o) in strides.iter().zip(os.iter_mut()) {
                o.push(s[k]);
            }
        }
    }
    (od, os)
}

/// How a `sum_axes` walks its input: output `o` (row-major over the kept
/// dims) sums `x[kept.offset(o) + red.offset(r)]` for `r` in `0..len`,
/// row-major over the reduced dims, which is the reference's order.
#[derive(Clone, Copy, Debug)]
pub struct SumPlan {
    pub kept: Strided,
    pub red: Strided,
    pub segments: usize,
    pub len: usize,
}

impl SumPlan {
    /// None when a descriptor would exceed `MAX_RANK` dims after coalescing.
    pub fn new(shape: &[usize], axes: &[usize]) -> Option<Self> {
        let strides = crate::shape::strides(shape);
        let (mut kd, mut ks, mut rd, mut rs) = (vec![], vec![], vec![], vec![]);
        for (k, (&d, &s)) in shape.iter().zip(&strides).enumerate() {
            if axes.contains(&k) {
                rd.push(d);
                rs.push(s);
            } else {
                kd.push(d);
                ks.push(s);
            }
        }
        let segments = kd.iter().product();
        let len = rd.iter().product();
        let (kd, ks) = coalesce(&kd, &[ks]);
        let (rd, rs) = coalesce(&rd, &[rs]);
        Some(SumPlan {
            kept: Strided::new(&kd, &ks[0])?,
            red: Strided::new(&rd, &rs[0])?,
            segments,
            len,
        })
    }
}

/// How a broadcasting binary op walks its operands.
#[derive(Clone, Copy, Debug)]
pub enum BinaryPlan {
    /// Both operands have the output's layout: index `i` everywhere.
    Same,
    /// Through a descriptor.
    Strided(Strided2),
}

impl BinaryPlan {
    /// None when the descriptor would exceed `MAX_RANK` dims.
    pub fn new(a: &[usize], b: &[usize], out: &[usize]) -> Option<Self> {
        let sa = crate::shape::broadcast_strides(a, out);
        let sb = crate::shape::broadcast_strides(b, out);
        let (d, s) = coalesce(out, &[sa, sb]);
        let contiguous = |s: &[usize]| s.is_empty() || s == [1];
        if d.len() <= 1 && contiguous(&s[0]) && contiguous(&s[1]) {
            return Some(BinaryPlan::Same);
        }
        Strided2::new(&d, &s[0], &s[1]).map(BinaryPlan::Strided)
    }
}

/// A one-operand gather (`broadcast_to`): None above `MAX_RANK` dims.
pub fn broadcast_plan(x: &[usize], out: &[usize]) -> Option<Strided> {
    let s = crate::shape::broadcast_strides(x, out);
    let (d, s) = coalesce(out, &[s]);
    Strided::new(&d, &s[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::{broadcast_strides, strides};

    /// The naive offset: decompose over the original dims.
    fn naive(i: usize, dims: &[usize], s: &[usize]) -> usize {
        let os = strides(dims);
        let mut rem = i;
        let mut off = 0;
        for k in 0..dims.len() {
            off += (rem / os[k]) * s[k];
            rem %= os[k];
        }
        off
    }

    /// A small deterministic generator (no RNG crate needed here).
    fn lcg(state: &mut u64) -> usize {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*state >> 33) as usize
    }

    #[test]
    fn coalescing_preserves_every_offset() {
        let mut st = 7u64;
        for _ in 0..400 {
            let rank = 1 + lcg(&mut st) % 6;
            let out: Vec<usize> = (0..rank).map(|_| 1 + lcg(&mut st) % 4).collect();
            // Each operand keeps a dim or broadcasts it (size 1), and may drop leading dims.
            let operand = |st: &mut u64| -> Vec<usize> {
                let skip = lcg(st) % (rank + 1);
                out[skip..]
                    .iter()
                    .map(|&d| if lcg(st).is_multiple_of(3) { 1 } else { d })
                    .collect()
            };
            let (a, b) = (operand(&mut st), operand(&mut st));
            let (sa, sb) = (broadcast_strides(&a, &out), broadcast_strides(&b, &out));
            let (d, s) = coalesce(&out, &[sa.clone(), sb.clone()]);
            assert!(d.len() <= out.len());
            let pa = Strided::new(&d, &s[0]).unwrap();
            let pb = Strided::new(&d, &s[1]).unwrap();
            for i in 0..out.iter().product() {
                assert_eq!(pa.offset(i), naive(i, &out, &sa), "{out:?} {a:?}");
                assert_eq!(pb.offset(i), naive(i, &out, &sb), "{out:?} {b:?}");
            }
            match BinaryPlan::new(&a, &b, &out).unwrap() {
                BinaryPlan::Same => {
                    for i in 0..out.iter().product() {
                        assert_eq!(naive(i, &out, &sa), i);
                        assert_eq!(naive(i, &out, &sb), i);
                    }
                }
                BinaryPlan::Strided(p) => assert!(p.rank as usize <= out.len()),
            }
        }
    }

    #[test]
    fn sum_plans_visit_each_input_once_in_reference_order() {
        let mut st = 11u64;
        for _ in 0..300 {
            let rank = 1 + lcg(&mut st) % 5;
            let shape: Vec<usize> = (0..rank).map(|_| 1 + lcg(&mut st) % 4).collect();
            let axes: Vec<usize> = (0..rank)
                .filter(|_| lcg(&mut st).is_multiple_of(2))
                .collect();
            let plan = SumPlan::new(&shape, &axes).unwrap();
            let out_shape = crate::shape::reduced_shape(&shape, &axes);
            assert_eq!(plan.segments, out_shape.iter().product::<usize>());
            // The reference adds input i into output slot o(i) in increasing i.
            let so = broadcast_strides(&out_shape, &shape);
            let total: usize = shape.iter().product();
            let mut expected: Vec<Vec<usize>> = vec![Vec::new(); plan.segments];
            for i in 0..total {
                expected[naive(i, &shape, &so)].push(i);
            }
            for (o, want) in expected.iter().enumerate() {
                let got: Vec<usize> = (0..plan.len)
                    .map(|r| plan.kept.offset(o) + plan.red.offset(r))
                    .collect();
                assert_eq!(&got, want, "shape {shape:?} axes {axes:?} slot {o}");
            }
        }
    }

    #[test]
    fn nchw_patterns_coalesce_to_short_walks() {
        // Bias-like [1, C, 1, 1] against [N, C, H, W]: a 3-dim walk at most.
        match BinaryPlan::new(&[2, 8, 5, 7], &[1, 8, 1, 1], &[2, 8, 5, 7]).unwrap() {
            BinaryPlan::Strided(p) => assert_eq!(p.rank, 3),
            BinaryPlan::Same => panic!("broadcast is not Same"),
        }
        assert!(matches!(
            BinaryPlan::new(&[2, 8, 5, 7], &[2, 8, 5, 7], &[2, 8, 5, 7]).unwrap(),
            BinaryPlan::Same
        ));
        // Bias gradient: sum over [0, 2, 3] of NCHW.
        let p = SumPlan::new(&[2, 8, 5, 7], &[0, 2, 3]).unwrap();
        assert_eq!((p.kept.rank, p.red.rank, p.segments, p.len), (1, 2, 8, 70));
        // Channel attention: sum over [2, 3]: one contiguous run per output.
        let p = SumPlan::new(&[2, 8, 5, 7], &[2, 3]).unwrap();
        assert_eq!((p.kept.rank, p.red.rank, p.red.stride[0]), (1, 1, 1));
        // Too many alternating dims for a descriptor.
        let shape = [2usize; 18];
        let axes: Vec<usize> = (0..18).step_by(2).collect();
        assert!(SumPlan::new(&shape, &axes).is_none());
    }
}
