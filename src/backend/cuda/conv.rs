//! 2-d convolution on the device: im2col + cuBLAS GEMM (forward and weight
//! gradient), GEMM + col2im (input gradient).
//!
//! Layouts (row-major, per sample `n`): x `[Cin, H*W]`, y and dy
//! `[Cout, P]` with `P = OH*OW`, weight `[Cout, K]` with `K = Cin*kh*kw`,
//! columns `[K, P]` (`k = (ci*kh + ky)*kw + kx`, the weight's column order).
//! - forward: `y_n = W col_n` (one strided-batched GEMM per group of
//!   samples, W shared), then the epilogue `act(y + b)`;
//! - input gradient: `dcol_n = W^T dy_n`, then col2im gathers each input
//!   element's taps in a fixed order and applies the mask;
//! - weight gradient: `dW_n = dy_n col_n^T` per sample (the GEMM's inner
//!   dimension is the long `P` axis), then a fixed-order sum over samples:
//!   no atomics, so dW is bit-stable.
//!
//! The input mask is applied while building the columns (`im2col`), so the
//! masked entries that reach the GEMMs are exact zeros, and to dX in col2im.
//! A 1x1 stride-1 unpadded conv (the align conv) needs no columns: x itself
//! is `[K, P]`.
//!
//! The column buffer is bounded by `COL_BUDGET_BYTES`; larger problems run
//! in groups of samples (e.g. the two-stage preset's P2 level in f64).

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::backend::ConvGeometry;
use crate::error::Result;

use super::device::{CudaFloat, Device, check_len, driver_err, elem_cfg, i64_of};
use super::elementwise::{MaskRef, bias_act, mask_mul, mask_mul_inplace, sum_samples};
use super::gemm::{RowGemm, gemm};
use super::index::ConvGeomC;
use super::kernels::Kernel;

/// Upper bound on the bytes of one column buffer.
pub const COL_BUDGET_BYTES: usize = 1 << 30;

/// The 1x1, stride 1, unpadded convolution: a plain GEMM over x.
fn is_pointwise(g: &ConvGeometry) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == [1, 1] && g.padding == [0, 0]
}

/// `(K, P)` of the column matrix.
fn col_dims(g: &ConvGeometry) -> (usize, usize) {
    (g.c_in * g.kh * g.kw, g.oh * g.ow)
}

/// Samples per column buffer: as many as fit the budget, at least one.
fn group_size<T>(g: &ConvGeometry) -> usize {
    let (k, p) = col_dims(g);
    let per_sample = (k * p * std::mem::size_of::<T>()).max(1);
    (COL_BUDGET_BYTES / per_sample).clamp(1, g.n)
}

fn check_operands<T>(
    g: &ConvGeometry,
    x_len: Option<usize>,
    w: &CudaSlice<T>,
    mask: Option<MaskRef<'_, T>>,
) -> Result<()> {
    if let Some(len) = x_len {
        check_len("conv input", len, g.n * g.c_in * g.h * g.w)?;
    }
    check_len("conv weight", w.len(), g.c_out * g.c_in * g.kh * g.kw)?;
    if let Some(m) = mask {
        m.check(g.n, g.c_in, g.h * g.w)?;
    }
    Ok(())
}

/// Columns of samples `n0..n0 + count` into `col` (`count * K * P` elements).
fn im2col<T: CudaFloat>(
    dev: &Device,
    x: &CudaSlice<T>,
    mask: Option<MaskRef<'_, T>>,
    col: &mut CudaSlice<T>,
    g: &ConvGeometry,
    n0: usize,
    count: usize,
) -> Result<()> {
    let (k, p) = col_dims(g);
    let total = count * k * p;
    check_len("im2col columns", col.len(), total)?;
    check_len("im2col input", x.len(), g.n * g.c_in * g.h * g.w)?;
    let geom = ConvGeomC::new(g, mask.map_or(0, |m| m.conv_kind()));
    let (n0_64, count64) = (i64_of(n0), i64_of(count));
    let f = dev.kernels::<T>()?.get(Kernel::Im2col);
    let mut l = dev.stream.launch_builder(f);
    // Without a mask, x stands in the mask slot; mask_kind 0 never reads it.
    l.arg(x)
        .arg(mask.map_or(x, |m| m.slice()))
        .arg(col)
        .arg(&geom)
        .arg(&n0_64)
        .arg(&count64);
    // SAFETY: im2col(const T* x, const T* m, T* col, ConvGeom g, i64 n0, i64
    // count): six arguments in order, ConvGeom by value with the C layout.
    // It writes col[0..count*K*P] and reads x and the mask of samples
    // n0..n0+count < N only; sizes checked above and in `check_operands`.
    unsafe { l.launch(elem_cfg(total)) }.map_err(driver_err("im2col"))?;
    Ok(())
}

/// `dx` of samples `n0..n0 + count` from their columns' gradient `dcol`.
fn col2im<T: CudaFloat>(
    dev: &Device,
    dcol: &CudaSlice<T>,
    mask: Option<MaskRef<'_, T>>,
    dx: &mut CudaSlice<T>,
    g: &ConvGeometry,
    n0: usize,
    count: usize,
) -> Result<()> {
    let (k, p) = col_dims(g);
    check_len("col2im columns", dcol.len(), count * k * p)?;
    check_len("col2im dx", dx.len(), (n0 + count) * g.c_in * g.h * g.w)?;
    let total = count * g.c_in * g.h * g.w;
    let geom = ConvGeomC::new(g, mask.map_or(0, |m| m.conv_kind()));
    let (n0_64, count64) = (i64_of(n0), i64_of(count));
    let f = dev.kernels::<T>()?.get(Kernel::Col2im);
    let mut l = dev.stream.launch_builder(f);
    // Without a mask, dcol stands in the mask slot; mask_kind 0 never reads it.
    l.arg(dcol)
        .arg(mask.map_or(dcol, |m| m.slice()))
        .arg(dx)
        .arg(&geom)
        .arg(&n0_64)
        .arg(&count64);
    // SAFETY: col2im(const T* dcol, const T* m, T* dx, ConvGeom g, i64 n0,
    // i64 count): six arguments in order; reads dcol[0..count*K*P], writes
    // dx of samples n0..n0+count (checked above), mask as in im2col.
    unsafe { l.launch(elem_cfg(total)) }.map_err(driver_err("col2im"))?;
    Ok(())
}

/// `act(conv(x * mask, w) + b)`.
pub(crate) fn forward<T: CudaFloat>(
    dev: &Device,
    [x, w]: [&CudaSlice<T>; 2],
    bias: Option<&CudaSlice<T>>,
    mask: Option<MaskRef<'_, T>>,
    g: &ConvGeometry,
    relu: bool,
) -> Result<CudaSlice<T>> {
    check_operands(g, Some(x.len()), w, mask)?;
    let (k, p) = col_dims(g);
    let mut y = dev.alloc::<T>(g.n * g.c_out * p)?;
    if is_pointwise(g) {
        let masked;
        let src = match mask {
            Some(m) => {
                masked = mask_mul(dev, x, m, [g.n, g.c_in, g.h * g.w])?;
                &masked
            }
            None => x,
        };
        let shape = RowGemm {
            m: g.c_out,
            n: p,
            k,
            trans_a: false,
            trans_b: false,
            batch: g.n,
            stride_a: 0,
            stride_b: k * p,
            stride_c: g.c_out * p,
        };
        gemm(
            dev,
            &shape,
            &w.as_view(),
            &src.as_view(),
            &mut y.as_view_mut(),
        )?;
    } else {
        let group = group_size::<T>(g);
        let mut col = dev.alloc::<T>(group * k * p)?;
        for n0 in (0..g.n).step_by(group) {
            let count = group.min(g.n - n0);
            im2col(dev, x, mask, &mut col, g, n0, count)?;
            let shape = RowGemm {
                m: g.c_out,
                n: p,
                k,
                trans_a: false,
                trans_b: false,
                batch: count,
                stride_a: 0,
                stride_b: k * p,
                stride_c: g.c_out * p,
            };
            let mut ys = y.slice_mut(n0 * g.c_out * p..(n0 + count) * g.c_out * p);
            gemm(
                dev,
                &shape,
                &w.as_view(),
                &col.slice(..count * k * p),
                &mut ys,
            )?;
        }
    }
    if bias.is_some() || relu {
        bias_act(dev, &mut y, bias, w, [g.n, g.c_out, p], relu)?;
    }
    Ok(y)
}

/// `mask * conv_transpose(dy, w)`.
pub(crate) fn backward_input<T: CudaFloat>(
    dev: &Device,
    dy: &CudaSlice<T>,
    w: &CudaSlice<T>,
    mask: Option<MaskRef<'_, T>>,
    g: &ConvGeometry,
) -> Result<CudaSlice<T>> {
    check_operands(g, None, w, mask)?;
    let (k, p) = col_dims(g);
    check_len("conv output gradient", dy.len(), g.n * g.c_out * p)?;
    let hw = g.h * g.w;
    let mut dx = dev.alloc::<T>(g.n * g.c_in * hw)?;
    if is_pointwise(g) {
        let shape = RowGemm {
            m: k,
            n: p,
            k: g.c_out,
            trans_a: true,
            trans_b: false,
            batch: g.n,
            stride_a: 0,
            stride_b: g.c_out * p,
            stride_c: k * p,
        };
        gemm(
            dev,
            &shape,
            &w.as_view(),
            &dy.as_view(),
            &mut dx.as_view_mut(),
        )?;
        if let Some(m) = mask {
            mask_mul_inplace(dev, &mut dx, m, [g.n, g.c_in, hw])?;
        }
        return Ok(dx);
    }
    let group = group_size::<T>(g);
    let mut dcol = dev.alloc::<T>(group * k * p)?;
    for n0 in (0..g.n).step_by(group) {
        let count = group.min(g.n - n0);
        let shape = RowGemm {
            m: k,
            n: p,
            k: g.c_out,
            trans_a: true,
            trans_b: false,
            batch: count,
            stride_a: 0,
            stride_b: g.c_out * p,
            stride_c: k * p,
        };
        let dys = dy.slice(n0 * g.c_out * p..(n0 + count) * g.c_out * p);
        gemm(
            dev,
            &shape,
            &w.as_view(),
            &dys,
            &mut dcol.slice_mut(..count * k * p),
        )?;
        col2im(dev, &dcol, mask, &mut dx, g, n0, count)?;
    }
    Ok(dx)
}

/// Correlation of `dy` with `x * mask`: per-sample partials, then their sum
/// in sample order.
pub(crate) fn backward_weight<T: CudaFloat>(
    dev: &Device,
    dy: &CudaSlice<T>,
    x: &CudaSlice<T>,
    mask: Option<MaskRef<'_, T>>,
    g: &ConvGeometry,
) -> Result<CudaSlice<T>> {
    let (k, p) = col_dims(g);
    check_len("conv input", x.len(), g.n * g.c_in * g.h * g.w)?;
    check_len("conv output gradient", dy.len(), g.n * g.c_out * p)?;
    if let Some(m) = mask {
        m.check(g.n, g.c_in, g.h * g.w)?;
    }
    let wlen = g.c_out * k;
    // One sample writes dW directly; several write partials summed below.
    let mut partial = dev.alloc::<T>(g.n * wlen)?;
    let per_sample = |batch: usize| RowGemm {
        m: g.c_out,
        n: k,
        k: p,
        trans_a: false,
        trans_b: true,
        batch,
        stride_a: g.c_out * p,
        stride_b: k * p,
        stride_c: wlen,
    };
    if is_pointwise(g) {
        let masked;
        let src = match mask {
            Some(m) => {
                masked = mask_mul(dev, x, m, [g.n, g.c_in, g.h * g.w])?;
                &masked
            }
            None => x,
        };
        gemm(
            dev,
            &per_sample(g.n),
            &dy.as_view(),
            &src.as_view(),
            &mut partial.as_view_mut(),
        )?;
    } else {
        let group = group_size::<T>(g);
        let mut col = dev.alloc::<T>(group * k * p)?;
        for n0 in (0..g.n).step_by(group) {
            let count = group.min(g.n - n0);
            im2col(dev, x, mask, &mut col, g, n0, count)?;
            let dys = dy.slice(n0 * g.c_out * p..(n0 + count) * g.c_out * p);
            let mut parts = partial.slice_mut(n0 * wlen..(n0 + count) * wlen);
            gemm(
                dev,
                &per_sample(count),
                &dys,
                &col.slice(..count * k * p),
                &mut parts,
            )?;
        }
    }
    if g.n == 1 {
        return Ok(partial);
    }
    sum_samples(dev, &partial, g.n, wlen)
}
