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

/// `(r, [sum(r^2), <r, a>, <r, b>])` with `r = wa a + wb b - t`, in one pass
/// over the operands.
pub(crate) fn wpair_residual<T: CudaFloat>(
    dev: &Device,
    [a, b, t]: [&CudaSlice<T>; 3],
    wa: T,
    wb: T,
) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
    let n = a.len();
    check_len("weighted_pair_residual b", b.len(), n)?;
    check_len("weighted_pair_residual t", t.len(), n)?;
    let chunks = chunks(n);
    let mut r = dev.alloc::<T>(n)?;
    let mut partial = dev.alloc::<T>(3 * chunks)?;
    let (n64, c64) = (i64_of(n), i64_of(chunks));
    let module = dev.kernels::<T>()?;
    let mut l = dev
        .stream
        .launch_builder(module.get(Kernel::WpairResidualPartial));
    l.arg(a)
        .arg(b)
        .arg(t)
        .arg(&mut r)
        .arg(&mut partial)
        .arg(&n64)
        .arg(&c64)
        .arg(&wa)
        .arg(&wb);
    // SAFETY: wpair_residual_partial(const T* a, const T* b, const T* t, T* r,
    // T* partial, i64 n, i64 chunks, T wa, T wb): nine arguments in order;
    // one block per chunk reads and writes index i < n of four n-element
    // buffers and writes partial[c], partial[chunks + c] and
    // partial[2 * chunks + c] (3 * chunks allocated).
    unsafe { l.launch(block_cfg(chunks, BLOCK)?) }.map_err(driver_err("wpair_residual_partial"))?;
    let mut sums = dev.alloc::<T>(3)?;
    finish(dev, &partial, &mut sums, 3, chunks)?;
    Ok((r, sums))
}
