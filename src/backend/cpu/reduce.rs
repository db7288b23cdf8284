//! Reductions, softmax and the squared-error sum.
//!
//! Determinism: every sum has a grouping fixed by the data's shape alone.
//! Long contiguous runs are cut into chunks of a fixed size (never "one per
//! thread"), each summed by [`fixed_sum`], and the chunk partials are added
//! sequentially in index order; sums across rows are vectorised across the
//! independent outputs, each output a sequential chain (the order of the
//! reference).

use rayon::prelude::*;

use super::elementwise::CHUNK;
use crate::backend::reference::split_axis;
use crate::pool;
use crate::tensor::Float;

/// Partial sums in [`fixed_sum`]: wide enough for two AVX2 registers of
/// f32 (the loop vectorises), and a constant, so the result does not depend
/// on the instruction set.
const LANES: usize = 16;

/// Elements per parallel chunk of a long sum.
const SUM_CHUNK: usize = 1 << 15;

/// `sum(xs)` in a fixed order: partial sum `i` takes elements `i, i + 16,
/// ...`; the partials are then added in order `0..16`, then the tail.
pub(crate) fn fixed_sum<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut s = T::zero();
    for a in acc {
        s += a;
    }
    for &t in tail {
        s += t;
    }
    s
}

/// `sum(f(i))` for `i < len`, in fixed chunks summed in parallel and
/// combined in index order.
fn chunked_sum<T: Float>(len: usize, f: impl Fn(usize, usize) -> T + Sync) -> T {
    if len <= SUM_CHUNK {
        return f(0, len);
    }
    let parts: Vec<T> = (0..len.div_ceil(SUM_CHUNK))
        .into_par_iter()
        .map(|c| {
            let s = c * SUM_CHUNK;
            f(s, SUM_CHUNK.min(len - s))
        })
        .collect();
    parts.into_iter().fold(T::zero(), |a, b| a + b)
}

/// `sum((a - b)^2)`.
pub(crate) fn sq_err_sum<T: Float>(a: &[T], b: &[T]) -> T {
    chunked_sum(a.len(), |s, n| {
        let mut acc = [T::zero(); LANES];
        let (xa, xb) = (&a[s..s + n], &b[s..s + n]);
        let full = n / LANES * LANES;
        for (ca, cb) in xa[..full]
            .chunks_exact(LANES)
            .zip(xb[..full].chunks_exact(LANES))
        {
            for i in 0..LANES {
                let d = ca[i] - cb[i];
                acc[i] += d * d;
            }
        }
        let mut t = T::zero();
        for v in acc {
            t += v;
        }
        for (&x, &y) in xa[full..].iter().zip(&xb[full..]) {
            let d = x - y;
            t += d * d;
        }
        t
    })
}

/// DMKD's fused loss pass: writes `r = ((wa a) + (wb b)) - t` (the
/// reference's rounding, element by element) and returns it with
/// `(sum r^2, <r, a>, <r, b>)`. One read of each operand and one write, in
/// place of the five passes and three temporaries of the composed default.
///
/// The sums accumulate in f64 (a bandwidth-bound loop has the time to
/// convert), `LANES` partials per chunk of `SUM_CHUNK` elements, chunk
/// partials added in index order: a grouping fixed by the length alone.
pub(crate) fn weighted_pair_residual<T: Float>(
    a: &[T],
    b: &[T],
    t: &[T],
    wa: T,
    wb: T,
) -> (Vec<T>, [T; 3]) {
    let mut r = pool::take::<T>(a.len());
    let sums = pair_residual_chunks(&mut r, Some(a), b, t, wa, wb);
    (r, sums)
}

/// [`weighted_pair_residual`] with `a` given up: `r` is written over `a`
/// (each element read before it is written), the same bits.
pub(crate) fn weighted_pair_residual_into<T: Float>(
    a: &mut [T],
    b: &[T],
    t: &[T],
    wa: T,
    wb: T,
) -> [T; 3] {
    pair_residual_chunks(a, None, b, t, wa, wb)
}

/// `out = wa a + wb b - t` and `[sum(r^2), <r, a>, <r, b>]` in fixed
/// chunks; `a` is `out`'s own values where None.
fn pair_residual_chunks<T: Float>(
    out: &mut [T],
    a: Option<&[T]>,
    b: &[T],
    t: &[T],
    wa: T,
    wb: T,
) -> [T; 3] {
    // One instance per source of `a`, so neither loop tests which.
    match a {
        Some(a) => pair_residual_by(out, b, t, wa, wb, |_, i, _| a[i]),
        None => pair_residual_by(out, b, t, wa, wb, |out, _, j| out[j]),
    }
}

/// [`pair_residual_chunks`] with `a`'s element read by `a_at(chunk of out,
/// index, index in the chunk)`.
fn pair_residual_by<T: Float>(
    out: &mut [T],
    b: &[T],
    t: &[T],
    wa: T,
    wb: T,
    a_at: impl Fn(&[T], usize, usize) -> T + Sync,
) -> [T; 3] {
    let len = out.len();
    let chunk = |out: &mut [T], s: usize| -> [f64; 3] {
        let n = out.len();
        let (xb, xt) = (&b[s..s + n], &t[s..s + n]);
        let a_at = |out: &[T], j: usize| a_at(out, s + j, j);
        let mut acc = [[0.0f64; LANES]; 3];
        let mut k = 0;
        while k + LANES <= n {
            for i in 0..LANES {
                let (av, bv) = (a_at(out, k + i), xb[k + i]);
                let ri = wa * av + wb * bv - xt[k + i];
                out[k + i] = ri;
                let rf = ri.as_f64();
                acc[0][i] += rf * rf;
                acc[1][i] += rf * av.as_f64();
                acc[2][i] += rf * bv.as_f64();
            }
            k += LANES;
        }
        let mut sums = [0.0f64; 3];
        for (sum, lanes) in sums.iter_mut().zip(&acc) {
            for v in lanes {
                *sum += v;
            }
        }
        for j in k..n {
            let (av, bv) = (a_at(out, j), xb[j]);
            let ri = wa * av + wb * bv - xt[j];
            out[j] = ri;
            let rf = ri.as_f64();
            sums[0] += rf * rf;
            sums[1] += rf * av.as_f64();
            sums[2] += rf * bv.as_f64();
        }
        sums
    };
    let parts: Vec<[f64; 3]> = if len <= SUM_CHUNK {
        vec![chunk(out, 0)]
    } else {
        out.par_chunks_mut(SUM_CHUNK)
            .enumerate()
            .map(|(c, out)| chunk(out, c * SUM_CHUNK))
            .collect()
    };
    let mut total = [0.0f64; 3];
    for p in parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total.map(T::from_f64)
}

/// Mixed-radix offset of index `idx` in dims `(len, stride)`.
fn offset(dims: &[(usize, usize)], mut idx: usize) -> usize {
    let mut off = 0;
    for &(len, stride) in dims.iter().rev() {
        off += (idx % len) * stride;
        idx /= len;
    }
    off
}

/// Sum over `axes`, keeping them as size-1 dims.
pub(crate) fn sum_axes<T: Float>(x: &[T], shape: &[usize], axes: &[usize]) -> Vec<T> {
    // Merge adjacent dims of the same kind (kept / reduced), dropping 1s.
    let st = crate::shape::strides(shape);
    let mut dims: Vec<(usize, usize, bool)> = Vec::new(); // (len, stride, reduced)
    for k in 0..shape.len() {
        if shape[k] == 1 {
            continue;
        }
        let red = axes.contains(&k);
        if let Some(last) = dims.last_mut()
            && last.2 == red
        {
            *last = (last.0 * shape[k], st[k], red);
            continue;
        }
        dims.push((shape[k], st[k], red));
    }
    let out_len: usize = shape
        .iter()
        .enumerate()
        .filter(|(k, _)| !axes.contains(k))
        .map(|(_, &d)| d)
        .product();
    let Some(&(inner, _, inner_red)) = dims.last() else {
        // Every dim is 1: a copy.
        let mut out = pool::take::<T>(out_len);
        out.copy_from_slice(x);
        return out;
    };
    let outer = &dims[..dims.len() - 1];
    let kept: Vec<(usize, usize)> = outer.iter().filter(|d| !d.2).map(|d| (d.0, d.1)).collect();
    let red: Vec<(usize, usize)> = outer.iter().filter(|d| d.2).map(|d| (d.0, d.1)).collect();
    let r_count: usize = red.iter().map(|d| d.0).product();
    if inner_red {
        // Each output sums contiguous runs of `inner`: one fixed-order sum
        // per run, runs added in row-major order.
        if out_len == 1 {
            return vec![chunked_sum(inner, |s, n| fixed_sum(&x[s..s + n]))];
        }
        // Parallel over outputs, enough of them per task for ~CHUNK elements.
        let per = (CHUNK / (inner * r_count).max(1)).max(1);
        let mut out = pool::take::<T>(out_len);
        out.par_chunks_mut(per).enumerate().for_each(|(c, os)| {
            for (i, o) in os.iter_mut().enumerate() {
                let base = offset(&kept, c * per + i);
                let mut acc = T::zero();
                for r in 0..r_count {
                    let at = base + offset(&red, r);
                    acc += fixed_sum(&x[at..at + inner]);
                }
                *o = acc;
            }
        });
        out
    } else {
        // The inner dim is kept: add whole rows, vectorised across the
        // independent outputs, each a sequential chain in row-major order.
        let rows = out_len / inner;
        let col_chunk = inner.min(4096);
        let mut out = pool::take::<T>(out_len);
        out.par_chunks_mut(inner)
            .enumerate()
            .flat_map(|(o, row)| {
                row.par_chunks_mut(col_chunk)
                    .enumerate()
                    .map(move |(c, seg)| (o, c * col_chunk, seg))
            })
            .for_each(|(o, c0, seg)| {
                let base = offset(&kept, o) + c0;
                seg.fill(T::zero());
                for r in 0..r_count {
                    let at = base + offset(&red, r);
                    let n = seg.len();
                    seg.iter_mut()
                        .zip(&x[at..at + n])
                        .for_each(|(a, &v)| *a += v);
                }
            });
        debug_assert_eq!(rows * inner, out_len);
        out
    }
}

/// Softmax along `axis`, max subtracted; sums are sequential along the
/// axis in f64 (the reference's order and accumulator, so the two backends
/// agree bit for bit; vectorised across independent columns).
pub(crate) fn softmax<T: Float>(x: &[T], shape: &[usize], axis: usize) -> Vec<T> {
    let (outer, len, inner) = split_axis(shape, axis);
    let mut y = pool::take::<T>(x.len());
    let block = len * inner;
    if block == 0 {
        return y;
    }
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(yb, xb)| {
            if inner == 1 {
                // A contiguous row (the spatial attention's softmax over H*W).
                let max = xb.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
                let mut sum = 0.0f64;
                for (y, &v) in yb.iter_mut().zip(xb) {
                    let e = (v - max).exp();
                    *y = e;
                    sum += e.as_f64();
                }
                yb.iter_mut()
                    .for_each(|v| *v = T::from_f64(v.as_f64() / sum));
                return;
            }
            let mut max = vec![T::neg_infinity(); inner];
            for k in 0..len {
                max.iter_mut()
                    .zip(&xb[k * inner..(k + 1) * inner])
                    .for_each(|(m, &v)| *m = m.max(v));
            }
            let mut sum = vec![0.0f64; inner];
            for k in 0..len {
                let (yr, xr) = (
                    &mut yb[k * inner..(k + 1) * inner],
                    &xb[k * inner..(k + 1) * inner],
                );
                for i in 0..inner {
                    let e = (xr[i] - max[i]).exp();
                    yr[i] = e;
                    sum[i] += e.as_f64();
                }
            }
            for k in 0..len {
                yb[k * inner..(k + 1) * inner]
                    .iter_mut()
                    .zip(&sum)
                    .for_each(|(v, &s)| *v = T::from_f64(v.as_f64() / s));
            }
        });
    let _ = outer;
    y
}

/// `y * (dy - sum(dy * y, axis))`, the dot accumulated in f64 as the
/// reference does.
pub(crate) fn softmax_backward<T: Float>(
    y: &[T],
    dy: &[T],
    shape: &[usize],
    axis: usize,
) -> Vec<T> {
    let (_, len, inner) = split_axis(shape, axis);
    let mut dx = pool::take::<T>(y.len());
    let block = len * inner;
    if block == 0 {
        return dx;
    }
    dx.par_chunks_mut(block)
        .zip(y.par_chunks(block).zip(dy.par_chunks(block)))
        .for_each(|(db, (yb, gb))| {
            let mut dot = vec![0.0f64; inner];
            for k in 0..len {
                let r = k * inner..(k + 1) * inner;
                dot.iter_mut()
                    .zip(gb[r.clone()].iter().zip(&yb[r]))
                    .for_each(|(d, (&g, &yv))| *d += g.as_f64() * yv.as_f64());
            }
            for k in 0..len {
                let r = k * inner..(k + 1) * inner;
                db[r.clone()]
                    .iter_mut()
                    .zip(gb[r.clone()].iter().zip(&yb[r]))
                    .zip(&dot)
                    .for_each(|((o, (&g, &yv)), &d)| {
                        *o = T::from_f64(yv.as_f64() * (g.as_f64() - d))
                    });
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    //! The reductions against the reference backend. The CPU sums add in
    //! their own fixed order (partials of `LANES`, chunks of `SUM_CHUNK`)
    //! and the reference in f64 in row-major order, so on general data they
    //! differ by rounding; on multiples of 1/4 ([`quarters`]) every partial
    //! sum here is exact in f32, so they must agree bit for bit, and a lost,
    //! repeated or misplaced element shows. On general data each result
    //! must have the same bits in pools of 1, 2 and 3 threads. The softmax
    //! sums in f64 in the reference's order: bit for bit on any data.

    use super::{LANES, SUM_CHUNK};
    use crate::backend::cpu::simd::Elem;
    use crate::backend::cpu::testing::{assert_same_bits, in_pools, quarters, values};
    use crate::backend::{Backend, CpuBackend, PairResidual, ReferenceBackend};
    use crate::{ConvAlgo, Tensor};

    /// 37023 elements: more than one `SUM_CHUNK`, a tail of 15 after the
    /// last full `LANES` group.
    const SHAPE: [usize; 4] = [3, 7, 41, 43];

    fn tensor<E: Elem>(shape: &[usize], v: Vec<f64>) -> Tensor<E> {
        Tensor::from_vec(shape, v.into_iter().map(E::from_f64).collect()).expect("a test tensor")
    }

    fn cpu() -> CpuBackend {
        CpuBackend::new(ConvAlgo::Auto)
    }

    /// Every result of `f` on the CPU backend over the pools has the bits
    /// of `want`.
    fn all_equal<E: Elem>(want: &Tensor<E>, what: &str, f: impl Fn() -> Tensor<E> + Sync) {
        for got in in_pools(f) {
            assert_same_bits(&got, want, what);
        }
    }

    fn sums<E: Elem>()
    where
        CpuBackend: Backend<E>,
    {
        // Every subset of the axes of SHAPE (including none and all: the
        // chunked whole sum), of a shape with size-1 dims, and rows longer
        // than the kept-inner path's column chunk.
        let cases: [(&[usize], usize); 4] = [
            (&SHAPE, 4),
            (&[3, 1, 41, 1], 4),
            (&[2, 3, 5000], 3),
            (&[1, 1], 2),
        ];
        for (shape, rank) in cases {
            let n = shape.iter().product();
            let exact = tensor::<E>(shape, quarters(n, 1));
            let general = tensor::<E>(shape, values(n, 2));
            for bits in 0..1usize << rank {
                let axes: Vec<usize> = (0..rank).filter(|a| bits >> a & 1 == 1).collect();
                let what = format!("sum_axes {shape:?} over {axes:?}");
                let want = ReferenceBackend.sum_axes(&exact, &axes).unwrap();
                all_equal(&want, &what, || cpu().sum_axes(&exact, &axes).unwrap());
                let first = cpu().sum_axes(&general, &axes).unwrap();
                all_equal(&first, &what, || cpu().sum_axes(&general, &axes).unwrap());
            }
        }
    }

    fn squared_errors<E: Elem>()
    where
        CpuBackend: Backend<E>,
    {
        // One chunk (1005 elements) and several.
        for shape in [&[3, 5, 67][..], &SHAPE] {
            let n = shape.iter().product();
            let (a, b) = (
                tensor::<E>(shape, quarters(n, 3)),
                tensor::<E>(shape, quarters(n, 4)),
            );
            let want = ReferenceBackend.sq_err_sum(&a, &b).unwrap();
            all_equal(&want, "sq_err_sum", || cpu().sq_err_sum(&a, &b).unwrap());
            let (a, b) = (
                tensor::<E>(shape, values(n, 5)),
                tensor::<E>(shape, values(n, 6)),
            );
            let first = cpu().sq_err_sum(&a, &b).unwrap();
            all_equal(&first, "sq_err_sum", || cpu().sq_err_sum(&a, &b).unwrap());
        }
    }

    /// `[sum r^2, <r, a>, <r, b>]` of a fused residual, as a tensor.
    fn residual_sums<E: Elem>(p: &PairResidual<E>) -> Tensor<E> {
        Tensor::from_vec(&[3], vec![p.sq_sum, p.dot_a, p.dot_b]).unwrap()
    }

    fn pair_residuals<E: Elem>()
    where
        CpuBackend: Backend<E>,
    {
        let (wa, wb) = (E::from_f64(0.5), E::from_f64(-1.25));
        for shape in [&[3, 5, 67][..], &SHAPE] {
            let n = shape.iter().product();
            for (data, seed) in [(quarters as fn(usize, u64) -> Vec<f64>, 7), (values, 8)] {
                let [a, b, t] = [0, 1, 2].map(|i| tensor::<E>(shape, data(n, seed + 10 * i)));
                let want = ReferenceBackend
                    .weighted_pair_residual(&a, &b, wa, wb, &t)
                    .unwrap();
                let runs = in_pools(|| cpu().weighted_pair_residual(&a, &b, wa, wb, &t).unwrap());
                for got in &runs {
                    // The residual is the reference's expression, element by element.
                    assert_same_bits(&got.residual, &want.residual, "residual");
                    // Its sums: the reference's on exact data, else the first run's.
                    let first = if seed == 7 {
                        residual_sums(&want)
                    } else {
                        residual_sums(&runs[0])
                    };
                    assert_same_bits(&residual_sums(got), &first, "residual sums");
                }
                // Given up, `a`'s buffer takes the residual: the same bits,
                // in place where `a` is the only handle, and `a` untouched
                // where another handle reads it.
                for shared in [false, true] {
                    let mine = tensor::<E>(shape, data(n, seed));
                    let at = mine.as_slice().as_ptr();
                    let other = shared.then(|| mine.clone());
                    let got = cpu()
                        .weighted_pair_residual_owned(mine, &b, wa, wb, &t)
                        .unwrap();
                    let what = format!("owned residual, shared {shared}");
                    assert_same_bits(&got.residual, &runs[0].residual, &what);
                    assert_same_bits(&residual_sums(&got), &residual_sums(&runs[0]), &what);
                    assert_eq!(
                        got.residual.as_slice().as_ptr() == at,
                        !shared,
                        "{what}: in place"
                    );
                    if let Some(other) = other {
                        assert_same_bits(&other, &a, &what);
                    }
                }
            }
        }
    }

    fn softmaxes<E: Elem>()
    where
        CpuBackend: Backend<E>,
    {
        let x = tensor::<E>(
            &SHAPE,
            values(SHAPE.iter().product(), 9)
                .iter()
                .map(|v| 4.0 * v)
                .collect(),
        );
        let dy = tensor::<E>(&SHAPE, values(SHAPE.iter().product(), 10));
        for axis in 0..4 {
            let y = ReferenceBackend.softmax(&x, axis).unwrap();
            all_equal(&y, "softmax", || cpu().softmax(&x, axis).unwrap());
            let want = ReferenceBackend.softmax_backward(&y, &dy, axis).unwrap();
            all_equal(&want, "softmax_backward", || {
                cpu().softmax_backward(&y, &dy, axis).unwrap()
            });
        }
    }

    /// The grouping the module documents, restated with plain loops: per
    /// chunk of `SUM_CHUNK` terms, `LANES` partials (partial `i` takes the
    /// chunk's terms `i, i + LANES, ...` up to its last whole group), added
    /// in order from zero, then the chunk's tail; the chunks' sums added in
    /// order from zero.
    fn documented_sum<A: crate::Float>(len: usize, term: impl Fn(usize) -> A) -> A {
        let mut total = A::zero();
        for c0 in (0..len).step_by(SUM_CHUNK) {
            let n = SUM_CHUNK.min(len - c0);
            let full = n - n % LANES;
            let mut part = [A::zero(); LANES];
            for k in 0..full {
                part[k % LANES] += term(c0 + k);
            }
            let mut chunk = A::zero();
            for p in part {
                chunk += p;
            }
            for k in full..n {
                chunk += term(c0 + k);
            }
            total += chunk;
        }
        total
    }

    /// Whole sums on general data have the bits of the documented grouping
    /// (a reordering that is also fixed by the length, such as one chunk
    /// for everything or no `LANES` partials, would change them): the
    /// whole-tensor sum, the squared-error sum and the fused residual's
    /// f64 sums, at one chunk, exactly one chunk and several.
    fn documented_grouping<E: Elem>()
    where
        CpuBackend: Backend<E>,
    {
        for len in [1005, SUM_CHUNK, SUM_CHUNK + 1, 37023] {
            let [a, b, t] = [11, 12, 13].map(|seed| tensor::<E>(&[len], values(len, seed)));
            let (xa, xb) = (a.as_slice(), b.as_slice());
            let want = Tensor::from_vec(&[1], vec![documented_sum(len, |i| xa[i])]).unwrap();
            all_equal(&want, &format!("sum of {len}"), || {
                cpu().sum_axes(&a, &[0]).unwrap()
            });
            let sq = documented_sum(len, |i| (xa[i] - xb[i]) * (xa[i] - xb[i]));
            all_equal(&Tensor::scalar(sq), &format!("sq_err_sum of {len}"), || {
                cpu().sq_err_sum(&a, &b).unwrap()
            });
            let (wa, wb) = (E::from_f64(0.5), E::from_f64(-1.25));
            let got = cpu().weighted_pair_residual(&a, &b, wa, wb, &t).unwrap();
            let r = got.residual.as_slice();
            let f = |x: E| x.as_f64();
            let want = [
                documented_sum(len, |i| f(r[i]) * f(r[i])),
                documented_sum(len, |i| f(r[i]) * f(xa[i])),
                documented_sum(len, |i| f(r[i]) * f(xb[i])),
            ]
            .map(E::from_f64);
            let want = Tensor::from_vec(&[3], want.to_vec()).unwrap();
            let what = format!("residual sums of {len}");
            assert_same_bits(&residual_sums(&got), &want, &what);
            let mine = tensor::<E>(&[len], values(len, 11));
            let owned = cpu()
                .weighted_pair_residual_owned(mine, &b, wa, wb, &t)
                .unwrap();
            assert_same_bits(
                &owned.residual,
                &got.residual,
                &format!("owned residual of {len}"),
            );
            assert_same_bits(
                &residual_sums(&owned),
                &want,
                &format!("owned sums of {len}"),
            );
        }
    }

    #[test]
    fn whole_sums_add_in_the_documented_order() {
        documented_grouping::<f32>();
        documented_grouping::<f64>();
    }

    #[test]
    fn sums_over_every_axis_set_are_exact_and_the_same_bits_on_every_pool() {
        sums::<f32>();
        sums::<f64>();
    }

    #[test]
    fn squared_error_sums_are_exact_and_the_same_bits_on_every_pool() {
        squared_errors::<f32>();
        squared_errors::<f64>();
    }

    #[test]
    fn the_fused_pair_residual_matches_the_composed_reference() {
        pair_residuals::<f32>();
        pair_residuals::<f64>();
    }

    /// The owned residual refuses what the borrowing one refuses: `b` or
    /// `t` of another shape than `a` is a shape error, not a kernel run
    /// over the wrong lengths in `a`'s buffer.
    #[test]
    fn the_owned_pair_residual_checks_every_shape() {
        let ok = || tensor::<f32>(&[2, 3], values(6, 1));
        let short = tensor::<f32>(&[2, 2], values(4, 2));
        let (w1, w2) = (0.5, -1.25);
        for (b, t) in [(&short, &ok()), (&ok(), &short)] {
            let got = cpu().weighted_pair_residual_owned(ok(), b, w1, w2, t);
            assert!(
                matches!(got, Err(crate::Error::ShapeMismatch { .. })),
                "b {:?}, t {:?}: {got:?}",
                b.shape(),
                t.shape()
            );
        }
    }

    #[test]
    fn softmax_and_its_backward_equal_the_reference_bit_for_bit() {
        softmaxes::<f32>();
        softmaxes::<f64>();
    }
}
