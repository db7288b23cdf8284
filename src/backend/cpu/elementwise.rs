//! Element-wise ops and copies: bandwidth-bound, so plain loops the compiler
//! vectorises, split into fixed chunks across threads, writing into pooled
//! buffers (a fresh P3-sized output is page-faulted and ran 4x slower).
//! Each output element depends on its own inputs only, so the chunking
//! cannot change a bit.

use rayon::prelude::*;

use crate::backend::reference::{binary_fn, split_axis, unary_derivative, unary_fn};
use crate::backend::{Binary, InputMask, Unary};
use crate::pool;
use crate::shape::broadcast_strides;
use crate::tensor::Float;

/// Elements per parallel chunk (64 KiB of f32): big enough to amortise a
/// task, small enough to balance two cores on the smallest FPN levels.
pub(crate) const CHUNK: usize = 1 << 14;

/// `out[i] = f(i-th chunk offset + j)` style helper: fill a pooled buffer
/// of `len` by chunks; `f(start, chunk)` writes `chunk` for flat indices
/// `start..start + chunk.len()`.
pub(crate) fn fill_chunks<T: Float>(len: usize, f: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut out = pool::take::<T>(len);
    for_chunks(&mut out, f);
    out
}

/// `f(start, chunk)` over `out` by [`CHUNK`]s, in parallel.
fn for_chunks<T: Float>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    if out.len() <= CHUNK {
        f(0, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| f(i * CHUNK, c));
    }
}

/// `out[i] = f(src[i])`, or `out[i] = f(out[i])` in place (`src` None):
/// each formula below is written once for both.
#[inline(always)]
fn map1<T: Float>(out: &mut [T], src: Option<&[T]>, f: impl Fn(T) -> T) {
    match src {
        Some(xs) => out.iter_mut().zip(xs).for_each(|(o, &v)| *o = f(v)),
        None => out.iter_mut().for_each(|o| *o = f(*o)),
    }
}

/// `out[i] = f(a[i], b[i])`, or `f(out[i], b[i])` in place (`a` None).
#[inline(always)]
fn map2<T: Float>(out: &mut [T], a: Option<&[T]>, b: &[T], f: impl Fn(T, T) -> T) {
    match a {
        Some(a) => out
            .iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(o, (&x, &y))| *o = f(x, y)),
        None => out.iter_mut().zip(b).for_each(|(o, &y)| *o = f(*o, y)),
    }
}

/// `out = op(xs)`, or `out = op(out)` (`xs` None).
fn unary_run<T: Float>(op: Unary, out: &mut [T], xs: Option<&[T]>) {
    // Monomorphic inner loops for the cheap ops so they vectorise.
    match op {
        Unary::Relu => map1(out, xs, |v| if v > T::zero() { v } else { T::zero() }),
        Unary::Abs => map1(out, xs, |v| v.abs()),
        Unary::Neg => map1(out, xs, |v| -v),
        Unary::Square => map1(out, xs, |v| v * v),
        Unary::Scale(c) => {
            let c = T::from_f64(c);
            map1(out, xs, |v| c * v)
        }
        Unary::AddScalar(c) => {
            let c = T::from_f64(c);
            map1(out, xs, |v| v + c)
        }
        _ => map1(out, xs, |v| unary_fn(op, v)),
    }
}

pub(crate) fn unary<T: Float>(op: Unary, x: &[T]) -> Vec<T> {
    fill_chunks(x.len(), |s, out| {
        let xs = &x[s..s + out.len()];
        unary_run(op, out, Some(xs))
    })
}

/// [`unary`] into `x` itself.
pub(crate) fn unary_in_place<T: Float>(op: Unary, x: &mut [T]) {
    for_chunks(x, |_, c| unary_run(op, c, None))
}

/// `out = gs * op'(xs, ys)`, or `out = out * op'(xs, ys)` (`gs` None).
fn unary_backward_run<T: Float>(op: Unary, out: &mut [T], gs: Option<&[T]>, xs: &[T], ys: &[T]) {
    match op {
        Unary::Relu => map2(
            out,
            gs,
            xs,
            |g, xv| {
                if xv > T::zero() { g } else { g * T::zero() }
            },
        ),
        _ => {
            for i in 0..out.len() {
                let g = gs.map_or(out[i], |gs| gs[i]);
                out[i] = g * unary_derivative(op, xs[i], ys[i]);
            }
        }
    }
}

pub(crate) fn unary_backward<T: Float>(op: Unary, x: &[T], y: &[T], dy: &[T]) -> Vec<T> {
    fill_chunks(x.len(), |s, out| {
        let n = out.len();
        let (xs, ys, gs) = (&x[s..s + n], &y[s..s + n], &dy[s..s + n]);
        unary_backward_run(op, out, Some(gs), xs, ys)
    })
}

/// [`unary_backward`] into `dy` itself.
pub(crate) fn unary_backward_in_place<T: Float>(op: Unary, x: &[T], y: &[T], dy: &mut [T]) {
    for_chunks(dy, |s, c| {
        let n = c.len();
        unary_backward_run(op, c, None, &x[s..s + n], &y[s..s + n])
    })
}

/// Merge the dims of a broadcast so that each merged dim is contiguous (or
/// broadcast) in both operands: `(len, stride_a, stride_b)`, outermost first.
fn merge_dims(shape: &[usize], sa: &[usize], sb: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for k in 0..shape.len() {
        if shape[k] == 1 {
            continue;
        }
        let d = (shape[k], sa[k], sb[k]);
        if let Some(last) = out.last_mut()
            && last.1 == d.1 * d.0
            && last.2 == d.2 * d.0
        {
            *last = (last.0 * d.0, d.1, d.2);
            continue;
        }
        out.push(d);
    }
    if out.is_empty() {
        out.push((1, 0, 0));
    }
    out
}

pub(crate) fn binary<T: Float>(
    op: Binary,
    a: &[T],
    a_shape: &[usize],
    b: &[T],
    b_shape: &[usize],
    out_shape: &[usize],
) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    if a_shape == out_shape && b_shape == out_shape {
        return fill_chunks(n, |s, out| {
            let (xa, xb) = (&a[s..s + out.len()], &b[s..s + out.len()]);
            binary_run(op, out, Some(xa), xb);
        });
    }
    let dims = merge_dims(
        out_shape,
        &broadcast_strides(a_shape, out_shape),
        &broadcast_strides(b_shape, out_shape),
    );
    let (_, ia, ib) = *dims.last().expect("merge_dims is never empty");
    fill_chunks(n, |s, out| {
        for_each_run(&dims, s, s + out.len(), |at, run, oa, ob| {
            let o = &mut out[at - s..at - s + run];
            // Monomorphic loops for contiguous / broadcast operands so they
            // vectorise (a broadcast mask multiply ran 2.5x slower without).
            match (ia, ib) {
                (1, 1) => binary_run(op, o, Some(&a[oa..oa + run]), &b[ob..ob + run]),
                (1, 0) => {
                    let bv = b[ob];
                    let xa = &a[oa..oa + run];
                    match op {
                        Binary::Add => o.iter_mut().zip(xa).for_each(|(v, &x)| *v = x + bv),
                        Binary::Sub => o.iter_mut().zip(xa).for_each(|(v, &x)| *v = x - bv),
                        Binary::Mul => o.iter_mut().zip(xa).for_each(|(v, &x)| *v = x * bv),
                        Binary::Div => o.iter_mut().zip(xa).for_each(|(v, &x)| *v = x / bv),
                    }
                }
                (0, 1) => {
                    let av = a[oa];
                    let xb = &b[ob..ob + run];
                    match op {
                        Binary::Add => o.iter_mut().zip(xb).for_each(|(v, &y)| *v = av + y),
                        Binary::Sub => o.iter_mut().zip(xb).for_each(|(v, &y)| *v = av - y),
                        Binary::Mul => o.iter_mut().zip(xb).for_each(|(v, &y)| *v = av * y),
                        Binary::Div => o.iter_mut().zip(xb).for_each(|(v, &y)| *v = av / y),
                    }
                }
                _ => {
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = binary_fn(op, a[oa + j * ia], b[ob + j * ib]);
                    }
                }
            }
        })
    })
}

/// The runs along the innermost of `dims` (from [`merge_dims`]) that make
/// up the flat output indices `start..end`: `f(at, run, oa, ob)` for the
/// run of `run` indices from `at`, whose first element lies at `oa` in the
/// first operand and `ob` in the second. The offsets are divided out of
/// `start` once, then stepped from run to run with a carry into the outer
/// dims.
///
/// Why: dividing each run's flat index out again cost a division and a
/// remainder per dim per run, and the loss's filter scaling (`[256, 256,
/// 3, 3]` times `[1, 256, 1, 1]`) has runs of 9: its multiply took 0.34 ms
/// a call.
fn for_each_run(
    dims: &[(usize, usize, usize)],
    start: usize,
    end: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    if start >= end {
        // Nothing to walk (an empty output, whose dims may hold a 0).
        return;
    }
    let last = dims.len() - 1;
    // The multi-index of `start` over `dims`, innermost last.
    let mut idx = vec![0; dims.len()];
    let (mut oa, mut ob, mut rem) = (0, 0, start);
    for (k, &(len, sa, sb)) in dims.iter().enumerate().rev() {
        idx[k] = rem % len;
        rem /= len;
        oa += idx[k] * sa;
        ob += idx[k] * sb;
    }
    let (inner, ia, ib) = dims[last];
    let mut at = start;
    while at < end {
        let run = (inner - idx[last]).min(end - at);
        f(at, run, oa, ob);
        at += run;
        idx[last] += run;
        oa += run * ia;
        ob += run * ib;
        // Carry: a dim that reached its length goes back to 0 and steps
        // the next one out (the outermost may run past its length at the
        // very end, where no run follows).
        let mut k = last;
        while k > 0 && idx[k] == dims[k].0 {
            idx[k] = 0;
            oa -= dims[k].0 * dims[k].1;
            ob -= dims[k].0 * dims[k].2;
            k -= 1;
            idx[k] += 1;
            oa += dims[k].1;
            ob += dims[k].2;
        }
    }
}

/// `out = a op b` on equal-length runs, or `out = out op b` (`a` None).
#[inline(always)]
fn binary_run<T: Float>(op: Binary, out: &mut [T], a: Option<&[T]>, b: &[T]) {
    match op {
        Binary::Add => map2(out, a, b, |x, y| x + y),
        Binary::Sub => map2(out, a, b, |x, y| x - y),
        Binary::Mul => map2(out, a, b, |x, y| x * y),
        Binary::Div => map2(out, a, b, |x, y| x / y),
    }
}

/// [`binary`] of equal shapes into `a` itself.
pub(crate) fn binary_in_place<T: Float>(op: Binary, a: &mut [T], b: &[T]) {
    debug_assert_eq!(a.len(), b.len());
    for_chunks(a, |s, c| {
        let n = c.len();
        binary_run(op, c, None, &b[s..s + n])
    })
}

pub(crate) fn mask_mul<T: Float>(x: &[T], dims: [usize; 4], mask: &InputMask<T>) -> Vec<T> {
    let [_, c, h, w] = dims;
    let p = h * w;
    let m = mask.tensor().as_slice();
    // Whole planes per task: the mask index is then one lookup per plane.
    let mut out = pool::take::<T>(x.len());
    out.par_chunks_mut(p.max(1))
        .zip(x.par_chunks(p.max(1)))
        .enumerate()
        .for_each(|(pi, (o, xs))| {
            let (ni, ci) = (pi / c, pi % c);
            match mask {
                InputMask::Channel(_) => {
                    let s = m[ni * c + ci];
                    o.iter_mut().zip(xs).for_each(|(o, &v)| *o = v * s);
                }
                InputMask::Spatial(_) => {
                    let ms = &m[ni * p..][..p];
                    map2(o, Some(xs), ms, |v, s| v * s);
                }
            }
        });
    out
}

pub(crate) fn sq_err_backward<T: Float>(a: &[T], b: &[T], g: T) -> Vec<T> {
    let two_g = g + g;
    fill_chunks(a.len(), |s, out| {
        let (xa, xb) = (&a[s..s + out.len()], &b[s..s + out.len()]);
        map2(out, Some(xa), xb, |x, y| two_g * (x - y));
    })
}

pub(crate) fn narrow<T: Float>(
    x: &[T],
    shape: &[usize],
    axis: usize,
    start: usize,
    len: usize,
) -> Vec<T> {
    let (outer, full, inner) = split_axis(shape, axis);
    let row = len * inner;
    let mut out = pool::take::<T>(outer * row);
    if row > 0 {
        out.par_chunks_mut(row).enumerate().for_each(|(o, dst)| {
            dst.copy_from_slice(&x[(o * full + start) * inner..][..row]);
        });
    }
    out
}

pub(crate) fn narrow_backward<T: Float>(
    dy: &[T],
    shape: &[usize],
    axis: usize,
    start: usize,
    len: usize,
) -> Vec<T> {
    let (outer, full, inner) = split_axis(shape, axis);
    let row = full * inner;
    let mut out = pool::take::<T>(outer * row);
    if row > 0 {
        out.par_chunks_mut(row).enumerate().for_each(|(o, dst)| {
            dst[..start * inner].fill(T::zero());
            dst[start * inner..(start + len) * inner]
                .copy_from_slice(&dy[o * len * inner..][..len * inner]);
            dst[(start + len) * inner..].fill(T::zero());
        });
    }
    out
}

/// `x` repeated along its size-1 (or missing leading) dims up to `shape`.
pub(crate) fn broadcast_to<T: Float>(x: &[T], x_shape: &[usize], shape: &[usize]) -> Vec<T> {
    let n: usize = shape.iter().product();
    let st = broadcast_strides(x_shape, shape);
    let zero = vec![0; shape.len()];
    let dims = merge_dims(shape, &st, &zero);
    let (_, ia, _) = *dims.last().expect("merge_dims is never empty");
    fill_chunks(n, |s, out| {
        for_each_run(&dims, s, s + out.len(), |at, run, oa, _| {
            let o = &mut out[at - s..at - s + run];
            if ia == 0 {
                o.fill(x[oa]);
            } else {
                o.copy_from_slice(&x[oa..oa + run]);
            }
        })
    })
}

#[cfg(test)]
mod tests {
    //! Every element-wise kernel against the reference backend, bit for bit:
    //! each output is the same expression of the same inputs, so nothing
    //! may differ, whatever the chunking, the broadcast path or the thread
    //! count. The main shape has 37023 elements: three chunks of `CHUNK`,
    //! the last one partial.

    use crate::backend::cpu::simd::Elem;
    use crate::backend::cpu::testing::{assert_same_bits, in_pools, values};
    use crate::backend::{Backend, Binary, CpuBackend, InputMask, ReferenceBackend, Unary};
    use crate::{ConvAlgo, Tensor};

    const SHAPE: [usize; 4] = [3, 7, 41, 43];

    /// `f` of [`values`] as a tensor of `shape`.
    fn tensor_of<E: Elem>(shape: &[usize], seed: u64, f: impl Fn(f64) -> f64) -> Tensor<E> {
        let n = shape.iter().product();
        let data = values(n, seed)
            .into_iter()
            .map(|v| E::from_f64(f(v)))
            .collect();
        Tensor::from_vec(shape, data).expect("a test tensor")
    }

    fn tensor<E: Elem>(shape: &[usize], seed: u64) -> Tensor<E> {
        tensor_of(shape, seed, |v| v)
    }

    /// A copy of `t` in a buffer of its own, which an `_owned` op may
    /// write into.
    fn sole_copy<E: Elem>(t: &Tensor<E>) -> Tensor<E> {
        Tensor::from_vec(t.shape(), t.to_vec()).expect("a copy")
    }

    #[test]
    fn owned_operands_hold_the_result_only_when_nothing_else_holds_them() {
        let be = CpuBackend::new(ConvAlgo::Auto);
        let x = tensor::<f32>(&SHAPE, 60);
        let b = tensor::<f32>(&SHAPE, 61);
        let row = tensor::<f32>(&[1, 1, 1, 43], 62);
        let old = x.to_vec();
        type Op<'a> = Box<dyn Fn(Tensor<f32>) -> Tensor<f32> + 'a>;
        let ops: [(&str, Op); 3] = [
            (
                "unary_owned",
                Box::new(|t| be.unary_owned(Unary::Neg, t).unwrap()),
            ),
            (
                "unary_backward_owned",
                Box::new(|t| be.unary_backward_owned(Unary::Relu, &b, &b, t).unwrap()),
            ),
            (
                "binary_owned",
                Box::new(|t| be.binary_owned(Binary::Sub, t, &b, &SHAPE).unwrap()),
            ),
        ];
        for (what, op) in &ops {
            // The only handle: the result is written into its buffer.
            let sole = sole_copy(&x);
            let at = sole.as_slice().as_ptr();
            assert_eq!(op(sole).as_slice().as_ptr(), at, "{what}");
            // Another handle is kept: a new buffer, and the kept one is
            // left as it was.
            let kept = sole_copy(&x);
            let y = op(kept.clone());
            assert_ne!(y.as_slice().as_ptr(), kept.as_slice().as_ptr(), "{what}");
            assert_eq!(kept.to_vec(), old, "{what}");
        }
        // Broadcasts take the general path, into a new buffer: `a`
        // smaller than the output cannot hold it, and the in-place loop
        // is for operands of one shape (all the tape's sums need).
        for (a, b) in [(&row, &x), (&x, &row)] {
            let sole = sole_copy(a);
            let at = sole.as_slice().as_ptr();
            let y = be.binary_owned(Binary::Add, sole, b, &SHAPE).unwrap();
            assert_ne!(y.as_slice().as_ptr(), at);
            assert_eq!(y.shape(), SHAPE);
        }
    }

    /// `f` on the CPU backend in pools of 1, 2 and 3 threads, each result
    /// equal to `f` on the reference backend bit for bit.
    fn check<E: Elem>(what: &str, f: impl Fn(&dyn Backend<E>) -> Tensor<E> + Sync)
    where
        CpuBackend: Backend<E>,
    {
        let want = f(&ReferenceBackend);
        for got in in_pools(|| f(&CpuBackend::new(ConvAlgo::Auto))) {
            assert_same_bits(&got, &want, what);
        }
    }

    const UNARY: [Unary; 10] = [
        Unary::Relu,
        Unary::Abs,
        Unary::Neg,
        Unary::Exp,
        Unary::Ln,
        Unary::Sqrt,
        Unary::Recip,
        Unary::Square,
        Unary::Scale(-0.37),
        Unary::AddScalar(0.61),
    ];

    fn unary_ops<E: Elem>()
    where
        CpuBackend: Backend<E>,
    {
        // Signed values with exact zeros of both signs (the ReLU and |x|
        // kinks: relu(-0) is +0); positive ones where the op needs them.
        let kinked = |v: f64| {
            if v.abs() < 0.05 {
                0.0f64.copysign(v)
            } else {
                v
            }
        };
        let signed = tensor_of::<E>(&SHAPE, 1, kinked);
        let positive = tensor_of::<E>(&SHAPE, 1, |v| v.abs() + 0.1);
        let dy = tensor::<E>(&SHAPE, 2);
        for op in UNARY {
            let x = if matches!(op, Unary::Ln | Unary::Sqrt | Unary::Recip) {
                &positive
            } else {
                &signed
            };
            check(&format!("unary {op:?}"), |be| be.unary(op, x).unwrap());
            // The in-place variants (given a tensor no one else holds).
            check(&format!("unary_owned {op:?}"), |be| {
                be.unary_owned(op, sole_copy(x)).unwrap()
            });
            let y = ReferenceBackend.unary(op, x).unwrap();
            check(&format!("unary_backward {op:?}"), |be| {
                be.unary_backward(op, x, &y, &dy).unwrap()
            });
            check(&format!("unary_backward_owned {op:?}"), |be| {
                be.unary_backward_owned(op, x, &y, sole_copy(&dy)).unwrap()
            });
        }
    }

    fn binary_ops<E: Elem>()
    where
        CpuBackend: Backend<E>,
    {
        // Operand shapes against SHAPE: equal; one broadcast per channel,
        // per image or as a scalar (each side); a leading dim missing;
        // both broadcast along the inner run (each output run one value);
        // a row against a column.
        let pairs: [(&[usize], &[usize]); 8] = [
            (&SHAPE, &SHAPE),
            (&SHAPE, &[1, 7, 1, 1]),
            (&[7, 1, 1], &SHAPE),
            (&SHAPE, &[]),
            (&[3, 1, 41, 43], &[1, 7, 1, 43]),
            (&[3, 7, 41, 1], &[1, 1, 1, 43]),
            (&[3, 7, 1, 1], &[1, 7, 1, 1]),
            (&[3, 1, 41, 1], &[3, 7, 1, 43]),
        ];
        for (i, (sa, sb)) in pairs.into_iter().enumerate() {
            let a = tensor::<E>(sa, 3 + i as u64);
            // No zero divisors; both signs.
            let b = tensor_of::<E>(sb, 20 + i as u64, |v| v + 1.5f64.copysign(v));
            for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
                check(&format!("binary {op:?} {sa:?} {sb:?}"), |be| {
                    be.binary(op, &a, &b, &SHAPE).unwrap()
                });
                // In place where `a` has the output's shape, else a copy.
                check(&format!("binary_owned {op:?} {sa:?} {sb:?}"), |be| {
                    be.binary_owned(op, sole_copy(&a), &b, &SHAPE).unwrap()
                });
            }
        }
        // An output with size-1 dims and a single element.
        let (a, b) = (tensor::<E>(&[1, 7, 1, 43], 40), tensor::<E>(&[7, 1], 41));
        check("binary, size-1 dims", |be| {
            be.binary(Binary::Mul, &a, &b, &[1, 7, 1, 43]).unwrap()
        });
        let (a, b) = (tensor::<E>(&[1, 1], 42), tensor::<E>(&[1], 43));
        check("binary, one element", |be| {
            be.binary(Binary::Sub, &a, &b, &[1, 1]).unwrap()
        });
        // One operand broadcast along a middle dim as long as its own next
        // stride (3): only stride = length x stride may merge two dims, and
        // here stride + length would (cargo-mutants found this untested).
        let (full, mid) = (tensor::<E>(&[2, 3, 3], 44), tensor::<E>(&[2, 1, 3], 45));
        for (a, b) in [(&full, &mid), (&mid, &full)] {
            check("binary, middle broadcast", |be| {
                be.binary(Binary::Sub, a, b, &[2, 3, 3]).unwrap()
            });
        }
        // A broadcast into an empty output with a 0 among its dims: no run
        // to walk, and no offset to divide out of a 0-long dim.
        let (empty, row) = (tensor::<E>(&[3, 0, 4], 46), tensor::<E>(&[1, 1, 4], 47));
        check("binary, zero-sized broadcast", |be| {
            be.binary(Binary::Add, &empty, &row, &[3, 0, 4]).unwrap()
        });
    }

    fn masks_and_copies<E: Elem>()
    where
        CpuBackend: Backend<E>,
    {
        let x = tensor::<E>(&SHAPE, 50);
        let channel = InputMask::Channel(tensor::<E>(&[3, 7], 51));
        let spatial = InputMask::Spatial(tensor::<E>(&[3, 41, 43], 52));
        for mask in [channel, spatial] {
            check("mask_mul", |be| be.mask_mul(&x, &mask).unwrap());
        }
        let b = tensor::<E>(&SHAPE, 53);
        check("sq_err_backward", |be| {
            be.sq_err_backward(&x, &b, E::from_f64(0.37)).unwrap()
        });
        for (axis, start, len) in [
            (0, 1, 2),
            (1, 2, 4),
            (1, 0, 7),
            (2, 40, 1),
            (3, 5, 30),
            (3, 0, 0),
        ] {
            check(&format!("narrow {axis} {start} {len}"), |be| {
                be.narrow(&x, axis, start, len).unwrap()
            });
            let mut shape = SHAPE;
            shape[axis] = len;
            let dy = tensor::<E>(&shape, 54);
            check(&format!("narrow_backward {axis} {start} {len}"), |be| {
                be.narrow_backward(&dy, &SHAPE, axis, start).unwrap()
            });
        }
        // Zero-sized tensors: nothing to copy, and no zero-length chunks
        // (rayon refuses a chunk size of 0).
        let empty = tensor::<E>(&[3, 4, 0], 56);
        check("narrow, zero-sized", |be| {
            be.narrow(&empty, 1, 1, 2).unwrap()
        });
        let dy = tensor::<E>(&[3, 2, 0], 57);
        check("narrow_backward, zero-sized", |be| {
            be.narrow_backward(&dy, &[3, 4, 0], 1, 1).unwrap()
        });
        let row = tensor::<E>(&[1, 1, 4], 58);
        check("broadcast_to, zero-sized", |be| {
            be.broadcast_to(&row, &[3, 0, 4]).unwrap()
        });
        for from in [&[7, 1, 1][..], &[3, 1, 41, 1], &[], &SHAPE, &[1, 1, 1, 43]] {
            let small = tensor::<E>(from, 55);
            check(&format!("broadcast_to from {from:?}"), |be| {
                be.broadcast_to(&small, &SHAPE).unwrap()
            });
        }
    }

    #[test]
    fn unary_ops_equal_the_reference_bit_for_bit() {
        unary_ops::<f32>();
        unary_ops::<f64>();
    }

    #[test]
    fn binary_ops_and_every_broadcast_path_equal_the_reference_bit_for_bit() {
        binary_ops::<f32>();
        binary_ops::<f64>();
    }

    #[test]
    fn masks_narrows_and_broadcasts_equal_the_reference_bit_for_bit() {
        masks_and_copies::<f32>();
        masks_and_copies::<f64>();
    }
}
