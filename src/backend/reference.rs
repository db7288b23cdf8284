//! The reference backend: plain loops, one thread, a fixed summation order.
//!
//! This is the oracle the fast paths are checked against, so it favours the
//! obviously correct over the fast: masks are applied by materialising
//! `x * m`, and the convolution is the textbook seven-deep loop (its
//! innermost loop runs along the output row so the compiler can still
//! vectorise it).
//!
//! **Every sum accumulates in f64** (convolutions, their gradients, `sum`,
//! `mean`, softmax denominators and dots, the squared error), in index order,
//! and is rounded to the tensor's type once at the end. Error bound of a sum
//! `s = x_1 + ... + x_n` computed this way (`u64 = 2^-53`, `u32 = 2^-24`):
//! - f64 data: recursive summation, `|s^ - s| <= (n - 1) u64 sum|x_i|`
//!   (about `sqrt(n) u64 sum|x_i|` in practice); the f64 path is exactly what
//!   it was with a `T` accumulator.
//! - f32 data: products of two f32 values are exact in f64, so the f64 sum
//!   carries the same `(n - 1) u64 sum|x_i|` bound, and the final rounding
//!   adds at most `u32 |s|`: `|s^ - s| <= u32 |s| + (n - 1) u64 sum|x_i|`.
//!   For a 2-million-term sum of squares (`sum|x_i| = s`) that is within
//!   `6.0e-8 + 2.2e-10` relative: the error no longer grows with the count
//!   (an f32 accumulator gives up to `(n - 1) u32`, 0.12 at that size, and
//!   1.4e-3 was seen on a full-size loss).

use std::borrow::Cow;

use crate::backend::{Backend, Binary, ConvArgs, InputMask, Unary};
use crate::error::Result;
use crate::shape::{broadcast_strides, strides};
use crate::tensor::{Float, Tensor};

/// The plain-loop backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceBackend;

/// `x * mask`, materialised.
pub(crate) fn apply_mask<T: Float>(x: &Tensor<T>, mask: &InputMask<T>) -> Tensor<T> {
    let dims = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let [n, c, h, w] = dims;
    let xs = x.as_slice();
    let mut out = Vec::with_capacity(xs.len());
    for ni in 0..n {
        for ci in 0..c {
            for p in 0..h * w {
                out.push(xs[((ni * c + ci) * h * w) + p] * mask.value(ni, ci, p, dims));
            }
        }
    }
    Tensor::from_parts(x.shape(), out)
}

/// The conv input as the convs read it: `x * mask` under a mask (a new
/// tensor), else `x` itself.
fn masked_input<'a, T: Float>(x: &'a Tensor<T>, mask: Option<&InputMask<T>>) -> Cow<'a, Tensor<T>> {
    match mask {
        Some(m) => Cow::Owned(apply_mask(x, m)),
        None => Cow::Borrowed(x),
    }
}

pub(crate) fn unary_fn<T: Float>(op: Unary, x: T) -> T {
    match op {
        Unary::Relu => {
            if x > T::zero() {
                x
            } else {
                T::zero()
            }
        }
        Unary::Abs => x.abs(),
        Unary::Neg => -x,
        Unary::Exp => x.exp(),
        Unary::Ln => x.ln(),
        Unary::Sqrt => x.sqrt(),
        Unary::Recip => T::one() / x,
        Unary::Square => x * x,
        Unary::Scale(c) => T::from_f64(c) * x,
        Unary::AddScalar(c) => x + T::from_f64(c),
    }
}

/// `f'(x)`, given `x` and `y = f(x)`. At the kinks of relu and abs the
/// derivative is taken as 0 (PyTorch's convention: relu'(0) = 0, sign(0) = 0).
pub(crate) fn unary_derivative<T: Float>(op: Unary, x: T, y: T) -> T {
    let zero = T::zero();
    let one = T::one();
    match op {
        Unary::Relu => {
            if x > zero {
                one
            } else {
                zero
            }
        }
        Unary::Abs => {
            if x > zero {
                one
            } else if x < zero {
                -one
            } else {
                zero
            }
        }
        Unary::Neg => -one,
        Unary::Exp => y,
        Unary::Ln => one / x,
        Unary::Sqrt => T::from_f64(0.5) / y,
        Unary::Recip => -(y * y),
        Unary::Square => T::from_f64(2.0) * x,
        Unary::Scale(c) => T::from_f64(c),
        Unary::AddScalar(_) => one,
    }
}

pub(crate) fn binary_fn<T: Float>(op: Binary, a: T, b: T) -> T {
    match op {
        Binary::Add => a + b,
        Binary::Sub => a - b,
        Binary::Mul => a * b,
        Binary::Div => a / b,
    }
}

/// Split a shape around `axis` into (outer, len, inner) extents.
pub(crate) fn split_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

impl<T: Float> Backend<T> for ReferenceBackend {
    fn name(&self) -> String {
        "reference".into()
    }

    fn conv2d(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: Option<&Tensor<T>>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let g = &args.geom;
        let x = masked_input(x, args.mask.as_ref());
        let (xs, ws) = (x.as_slice(), w.as_slice());
        let [sh, sw] = g.stride;
        let [ph, pw] = g.padding;
        let mut y = vec![T::zero(); g.n * g.c_out * g.oh * g.ow];
        // One output plane's f64 accumulators at a time.
        let mut acc = vec![0.0f64; g.oh * g.ow];
        for n in 0..g.n {
            for co in 0..g.c_out {
                acc.fill(0.0);
                for ci in 0..g.c_in {
                    let xplane = &xs[(n * g.c_in + ci) * g.h * g.w..][..g.h * g.w];
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let wv = ws[((co * g.c_in + ci) * g.kh + ky) * g.kw + kx].as_f64();
                            for oy in 0..g.oh {
                                let iy = (oy * sh + ky) as isize - ph as isize;
                                if iy < 0 || iy >= g.h as isize {
                                    continue;
                                }
                                for ox in 0..g.ow {
                                    let ix = (ox * sw + kx) as isize - pw as isize;
                                    if ix < 0 || ix >= g.w as isize {
                                        continue;
                                    }
                                    acc[oy * g.ow + ox] +=
                                        wv * xplane[iy as usize * g.w + ix as usize].as_f64();
                                }
                            }
                        }
                    }
                }
                if let Some(b) = b {
                    let bv = b.as_slice()[co].as_f64();
                    acc.iter_mut().for_each(|v| *v += bv);
                }
                let yplane = &mut y[(n * g.c_out + co) * g.oh * g.ow..][..g.oh * g.ow];
                for (yv, &a) in yplane.iter_mut().zip(&acc) {
                    *yv = T::from_f64(a);
                }
                if args.relu {
                    yplane
                        .iter_mut()
                        .for_each(|v| *v = unary_fn(Unary::Relu, *v));
                }
            }
        }
        Ok(Tensor::from_parts(&g.output_shape(), y))
    }

    fn conv2d_backward_input(
        &self,
        dy: &Tensor<T>,
        w: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let g = &args.geom;
        let (dys, ws) = (dy.as_slice(), w.as_slice());
        let [sh, sw] = g.stride;
        let [ph, pw] = g.padding;
        // Scatter form of the adjoint: every product of the forward pass sends
        // `w * dy` back to the input element it read.
        // f64 accumulators for the whole input gradient, rounded at the end.
        let mut dx = vec![0.0f64; g.n * g.c_in * g.h * g.w];
        for n in 0..g.n {
            for co in 0..g.c_out {
                let dyplane = &dys[(n * g.c_out + co) * g.oh * g.ow..][..g.oh * g.ow];
                for ci in 0..g.c_in {
                    let dxplane = &mut dx[(n * g.c_in + ci) * g.h * g.w..][..g.h * g.w];
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let wv = ws[((co * g.c_in + ci) * g.kh + ky) * g.kw + kx].as_f64();
                            for oy in 0..g.oh {
                                let iy = (oy * sh + ky) as isize - ph as isize;
                                if iy < 0 || iy >= g.h as isize {
                                    continue;
                                }
                                for ox in 0..g.ow {
                                    let ix = (ox * sw + kx) as isize - pw as isize;
                                    if ix < 0 || ix >= g.w as isize {
                                        continue;
                                    }
                                    dxplane[iy as usize * g.w + ix as usize] +=
                                        wv * dyplane[oy * g.ow + ox].as_f64();
                                }
                            }
                        }
                    }
                }
            }
        }
        let dx = Tensor::from_parts(&g.input_shape(), dx.into_iter().map(T::from_f64).collect());
        Ok(match &args.mask {
            Some(m) => apply_mask(&dx, m),
            None => dx,
        })
    }

    fn conv2d_backward_weight(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let g = &args.geom;
        let x = masked_input(x, args.mask.as_ref());
        let (dys, xs) = (dy.as_slice(), x.as_slice());
        let [sh, sw] = g.stride;
        let [ph, pw] = g.padding;
        let mut dw = vec![T::zero(); g.c_out * g.c_in * g.kh * g.kw];
        for co in 0..g.c_out {
            for ci in 0..g.c_in {
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let mut acc = 0.0f64;
                        for n in 0..g.n {
                            let dyplane = &dys[(n * g.c_out + co) * g.oh * g.ow..][..g.oh * g.ow];
                            let xplane = &xs[(n * g.c_in + ci) * g.h * g.w..][..g.h * g.w];
                            for oy in 0..g.oh {
                                let iy = (oy * sh + ky) as isize - ph as isize;
                                if iy < 0 || iy >= g.h as isize {
                                    continue;
                                }
                                for ox in 0..g.ow {
                                    let ix = (ox * sw + kx) as isize - pw as isize;
                                    if ix < 0 || ix >= g.w as isize {
                                        continue;
                                    }
                                    acc += dyplane[oy * g.ow + ox].as_f64()
                                        * xplane[iy as usize * g.w + ix as usize].as_f64();
                                }
                            }
                        }
                        dw[((co * g.c_in + ci) * g.kh + ky) * g.kw + kx] = T::from_f64(acc);
                    }
                }
            }
        }
        Ok(Tensor::from_parts(&g.weight_shape(), dw))
    }

    fn conv2d_backward_bias(&self, dy: &Tensor<T>) -> Result<Tensor<T>> {
        let [n, c, h, w] = dy.dims4("conv2d_backward_bias")?;
        let d = dy.as_slice();
        let mut db = vec![T::zero(); c];
        for (co, out) in db.iter_mut().enumerate() {
            let mut acc = 0.0f64;
            for ni in 0..n {
                for &v in &d[(ni * c + co) * h * w..][..h * w] {
                    acc += v.as_f64();
                }
            }
            *out = T::from_f64(acc);
        }
        Ok(Tensor::from_parts(&[c], db))
    }

    fn unary(&self, op: Unary, x: &Tensor<T>) -> Result<Tensor<T>> {
        let out = x.as_slice().iter().map(|&v| unary_fn(op, v)).collect();
        Ok(Tensor::from_parts(x.shape(), out))
    }

    fn unary_backward(
        &self,
        op: Unary,
        x: &Tensor<T>,
        y: &Tensor<T>,
        dy: &Tensor<T>,
    ) -> Result<Tensor<T>> {
        let out = x
            .as_slice()
            .iter()
            .zip(y.as_slice())
            .zip(dy.as_slice())
            .map(|((&xv, &yv), &g)| g * unary_derivative(op, xv, yv))
            .collect();
        Ok(Tensor::from_parts(x.shape(), out))
    }

    fn binary(
        &self,
        op: Binary,
        a: &Tensor<T>,
        b: &Tensor<T>,
        out_shape: &[usize],
    ) -> Result<Tensor<T>> {
        let sa = broadcast_strides(a.shape(), out_shape);
        let sb = broadcast_strides(b.shape(), out_shape);
        let so = strides(out_shape);
        let n: usize = out_shape.iter().product();
        let (av, bv) = (a.as_slice(), b.as_slice());
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (mut ia, mut ib, mut rem) = (0, 0, i);
            for k in 0..out_shape.len() {
                let q = rem / so[k];
                rem %= so[k];
                ia += q * sa[k];
                ib += q * sb[k];
            }
            out.push(binary_fn(op, av[ia], bv[ib]));
        }
        Ok(Tensor::from_parts(out_shape, out))
    }

    fn mask_mul(&self, x: &Tensor<T>, mask: &InputMask<T>) -> Result<Tensor<T>> {
        Ok(apply_mask(x, mask))
    }

    fn sum_axes(&self, x: &Tensor<T>, axes: &[usize]) -> Result<Tensor<T>> {
        let shape = x.shape();
        let out_shape = crate::shape::reduced_shape(shape, axes);
        let so = broadcast_strides(&out_shape, shape);
        let si = strides(shape);
        let mut out = vec![0.0f64; out_shape.iter().product()];
        // Walk the input in row-major order, adding each element into its
        // output slot's f64 accumulator: a fixed order for every slot.
        for (i, &v) in x.as_slice().iter().enumerate() {
            let (mut o, mut rem) = (0, i);
            for k in 0..shape.len() {
                let q = rem / si[k];
                rem %= si[k];
                o += q * so[k];
            }
            out[o] += v.as_f64();
        }
        let out = out.into_iter().map(T::from_f64).collect();
        Ok(Tensor::from_parts(&out_shape, out))
    }

    fn broadcast_to(&self, x: &Tensor<T>, shape: &[usize]) -> Result<Tensor<T>> {
        let zeros = Tensor::from_parts(&[], vec![T::zero()]);
        self.binary(Binary::Add, x, &zeros, shape)
    }

    fn softmax(&self, x: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        let (outer, len, inner) = split_axis(x.shape(), axis);
        let xs = x.as_slice();
        let mut y = vec![T::zero(); xs.len()];
        for o in 0..outer {
            for i in 0..inner {
                let at = |k: usize| (o * len + k) * inner + i;
                let mut max = T::neg_infinity();
                for k in 0..len {
                    max = max.max(xs[at(k)]);
                }
                let mut sum = 0.0f64;
                for k in 0..len {
                    let e = (xs[at(k)] - max).exp();
                    y[at(k)] = e;
                    sum += e.as_f64();
                }
                for k in 0..len {
                    y[at(k)] = T::from_f64(y[at(k)].as_f64() / sum);
                }
            }
        }
        Ok(Tensor::from_parts(x.shape(), y))
    }

    fn softmax_backward(&self, y: &Tensor<T>, dy: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        let (outer, len, inner) = split_axis(y.shape(), axis);
        let (ys, gs) = (y.as_slice(), dy.as_slice());
        let mut dx = vec![T::zero(); ys.len()];
        for o in 0..outer {
            for i in 0..inner {
                let at = |k: usize| (o * len + k) * inner + i;
                let mut dot = 0.0f64;
                for k in 0..len {
                    dot += gs[at(k)].as_f64() * ys[at(k)].as_f64();
                }
                for k in 0..len {
                    dx[at(k)] = T::from_f64(ys[at(k)].as_f64() * (gs[at(k)].as_f64() - dot));
                }
            }
        }
        Ok(Tensor::from_parts(y.shape(), dx))
    }

    fn narrow(&self, x: &Tensor<T>, axis: usize, start: usize, len: usize) -> Result<Tensor<T>> {
        let (outer, full, inner) = split_axis(x.shape(), axis);
        let xs = x.as_slice();
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            out.extend_from_slice(&xs[(o * full + start) * inner..][..len * inner]);
        }
        let mut shape = x.shape().to_vec();
        shape[axis] = len;
        Ok(Tensor::from_parts(&shape, out))
    }

    fn narrow_backward(
        &self,
        dy: &Tensor<T>,
        shape: &[usize],
        axis: usize,
        start: usize,
    ) -> Result<Tensor<T>> {
        let (outer, full, inner) = split_axis(shape, axis);
        let len = dy.shape()[axis];
        let gs = dy.as_slice();
        let mut out = vec![T::zero(); outer * full * inner];
        for o in 0..outer {
            out[(o * full + start) * inner..][..len * inner]
                .copy_from_slice(&gs[o * len * inner..][..len * inner]);
        }
        Ok(Tensor::from_parts(shape, out))
    }

    fn sq_err_sum(&self, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
        let mut acc = 0.0f64;
        for (&x, &y) in a.as_slice().iter().zip(b.as_slice()) {
            // For f32 data the difference is formed in f64: exact when the
            // exponents are within 29 of each other, else off by at most u64.
            let d = x.as_f64() - y.as_f64();
            acc += d * d;
        }
        Ok(Tensor::scalar(T::from_f64(acc)))
    }

    fn sq_err_backward(&self, a: &Tensor<T>, b: &Tensor<T>, g: T) -> Result<Tensor<T>> {
        let two_g = g + g;
        let out = a
            .as_slice()
            .iter()
            .zip(b.as_slice())
            .map(|(&x, &y)| two_g * (x - y))
            .collect();
        Ok(Tensor::from_parts(a.shape(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kinks, where a finite difference cannot be the oracle (it
    /// measures the kink): relu'(0) = 0 and abs'(0) = sign(0) = 0, for both
    /// zeros, as in PyTorch; the CPU backend calls these same functions.
    fn kinks<T: Float>() {
        for x in [T::zero(), -T::zero()] {
            for op in [Unary::Relu, Unary::Abs] {
                let d = unary_derivative(op, x, unary_fn(op, x));
                assert_eq!(d.as_f64().to_bits(), 0.0f64.to_bits(), "{op:?}'({x:?})");
            }
            // relu(-0) is +0, as max(x, 0) in PyTorch.
            let y = unary_fn(Unary::Relu, x).as_f64();
            assert_eq!(y.to_bits(), 0.0f64.to_bits(), "relu({x:?})");
        }
        let (half, neg_half) = (T::from_f64(0.5), T::from_f64(-0.5));
        let d = |op, x: T| unary_derivative(op, x, unary_fn(op, x)).as_f64();
        assert_eq!(d(Unary::Abs, half), 1.0);
        assert_eq!(d(Unary::Abs, neg_half), -1.0);
        assert_eq!(d(Unary::Relu, half), 1.0);
        assert_eq!(d(Unary::Relu, neg_half), 0.0);
    }

    #[test]
    fn derivatives_at_the_kinks_are_zero() {
        kinks::<f32>();
        kinks::<f64>();
    }
}
