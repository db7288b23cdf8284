//! Host side of `kernels/loss.cu`: squared-error sums in the fixed two-pass
//! order of `reduce.rs`, the fused DMKD weighted pair, and their gradients.

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::error::Result;

use super::device::{CudaFloat, Device, block_cfg, check_len, driver_err, elem_cfg, i64_of};
use super::kernels::Kernel;
use super::reduce::{BLOCK, chunks, finish};

/// `sum((a - b)^2)` as a one-element buffer.
pub(crate) fn sq_err_sum<T: CudaFloat>(
    dev: &Device,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
) -> Result<CudaSlice<T>> {
    let n = a.len();
    check_len("sq_err_sum b", b.len(), n)?;
    let chunks = chunks(n);
    let mut partial = dev.alloc::<T>(chunks)?;
    let n64 = i64_of(n);
    let module = dev.kernels::<T>()?;
    let mut l = dev.stream.launch_builder(module.get(Kernel::SqErrPartial));
    l.arg(a).arg(b).arg(&mut partial).arg(&n64);
    // SAFETY: sq_err_partial(const T* a, const T* b, T* partial, i64 n): four
    // arguments in order; one BLOCK-thread block per chunk, reading a[i] and
    // b[i] for i < n only and writing partial[chunk] (chunks allocated).
    unsafe { l.launch(block_cfg(chunks, BLOCK)?) }.map_err(driver_err("sq_err_partial"))?;
    let mut out = dev.alloc::<T>(1)?;
    finish(dev, &partial, &mut out, 1, chunks)?;
    Ok(out)
}

/// `two_g * (a - b)`.
pub(crate) fn sq_err_grad<T: CudaFloat>(
    dev: &Device,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    two_g: T,
) -> Result<CudaSlice<T>> {
    let n = a.len();
    check_len("sq_err_backward b", b.len(), n)?;
    let mut out = dev.alloc::<T>(n)?;
    let n64 = i64_of(n);
    let f = dev.kernels::<T>()?.get(Kernel::SqErrGrad);
    let mut l = dev.stream.launch_builder(f);
    l.arg(a).arg(b).arg(&mut out).arg(&n64).arg(&two_g);
    // SAFETY: sq_err_grad(const T* a, const T* b, T* out, i64 n, T two_g):
    // five arguments in order; all three buffers hold n elements.
    unsafe { l.launch(elem_cfg(n)) }.map_err(driver_err("sq_err_grad"))?;
    Ok(out)
}

/// `sum((wa a + wb b - t)^2)` as a one-element buffer.
pub(crate) fn wpair_loss<T: CudaFloat>(
    dev: &Device,
    [a, b, t]: [&CudaSlice<T>; 3],
    wa: T,
    wb: T,
) -> Result<CudaSlice<T>> {
    let n = a.len();
    check_len("weighted_pair_sq_err b", b.len(), n)?;
    check_len("weighted_pair_sq_err t", t.len(), n)?;
    let chunks = chunks(n);
    let mut partial = dev.alloc::<T>(chunks)?;
    let n64 = i64_of(n);
    let module = dev.kernels::<T>()?;
    let mut l = dev
        .stream
        .launch_builder(module.get(Kernel::WpairLossPartial));
    l.arg(a)
        .arg(b)
        .arg(t)
        .arg(&mut partial)
        .arg(&n64)
        .arg(&wa)
        .arg(&wb);
    // SAFETY: wpair_loss_partial(const T* a, const T* b, const T* t, T*
    // partial, i64 n, T wa, T wb): seven arguments in order; reads index
    // i < n of three n-element buffers, writes partial[chunk].
    unsafe { l.launch(block_cfg(chunks, BLOCK)?) }.map_err(driver_err("wpair_loss_partial"))?;
    let mut out = dev.alloc::<T>(1)?;
    finish(dev, &partial, &mut out, 1, chunks)?;
    Ok(out)
}

/// `(ca r, cb r, [<r, a>, <r, b>])` with `r = wa a + wb b - t`, r never stored.
pub(crate) fn wpair_backward<T: CudaFloat>(
    dev: &Device,
    [a, b, t]: [&CudaSlice<T>; 3],
    [wa, wb]: [T; 2],
    [ca, cb]: [T; 2],
) -> Result<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)> {
    let n = a.len();
    check_len("weighted_pair backward b", b.len(), n)?;
    check_len("weighted_pair backward t", t.len(), n)?;
    let n64 = i64_of(n);
    let module = dev.kernels::<T>()?;

    let mut da = dev.alloc::<T>(n)?;
    let mut db = dev.alloc::<T>(n)?;
    let mut l = dev.stream.launch_builder(module.get(Kernel::WpairGrad));
    l.arg(a)
        .arg(b)
        .arg(t)
        .arg(&mut da)
        .arg(&mut db)
        .arg(&n64)
        .arg(&wa)
        .arg(&wb)
        .arg(&ca)
        .arg(&cb);
    // SAFETY: wpair_grad(const T* a, const T* b, const T* t, T* da, T* db,
    // i64 n, T wa, T wb, T ca, T cb): ten arguments in order; all five
    // buffers hold n elements.
    unsafe { l.launch(elem_cfg(n)) }.map_err(driver_err("wpair_grad"))?;

    let chunks = chunks(n);
    let mut partial = dev.alloc::<T>(2 * chunks)?;
    let c64 = i64_of(chunks);
    let mut l = dev
        .stream
        .launch_builder(module.get(Kernel::WpairDotsPartial));
    l.arg(a)
        .arg(b)
        .arg(t)
        .arg(&mut partial)
        .arg(&n64)
        .arg(&c64)
        .arg(&wa)
        .arg(&wb);
    // SAFETY: wpair_dots_partial(const T* a, const T* b, const T* t, T*
    // partial, i64 n, i64 chunks, T wa, T wb): eight arguments in order; one
    // block per chunk writes partial[c] and partial[chunks + c] (2*chunks
    // allocated) and reads index i < n only.
    unsafe { l.launch(block_cfg(chunks, BLOCK)?) }.map_err(driver_err("wpair_dots_partial"))?;
    let mut dots = dev.alloc::<T>(2)?;
    finish(dev, &partial, &mut dots, 2, chunks)?;
    Ok((da, db, dots))
}
