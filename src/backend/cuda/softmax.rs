//! Host side of `kernels/softmax.cu`: softmax along one axis and its
//! backward, on x viewed as `[outer, len, inner]`.
//!
//! Long contiguous rows (`inner == 1`, `len >= ROWS_MIN`: the spatial
//! attention over H*W) get one block per row, with a block max and the
//! fixed-order block sum; everything else gets one thread per row in the
//! reference backend's exact order.

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::error::Result;

use super::device::{CudaFloat, Device, block_cfg, check_len, driver_err, elem_cfg, i64_of};
use super::kernels::Kernel;
use super::reduce::BLOCK;

/// Rows at least this long (and contiguous) take the block-per-row kernels.
pub const ROWS_MIN: usize = 1024;

fn use_rows(len: usize, inner: usize) -> bool {
    inner == 1 && len >= ROWS_MIN
}

pub(crate) fn softmax<T: CudaFloat>(
    dev: &Device,
    x: &CudaSlice<T>,
    [outer, len, inner]: [usize; 3],
) -> Result<CudaSlice<T>> {
    let n = outer * len * inner;
    check_len("softmax input", x.len(), n)?;
    let mut y = dev.alloc::<T>(n)?;
    let module = dev.kernels::<T>()?;
    let (o64, l64, i64_) = (i64_of(outer), i64_of(len), i64_of(inner));
    if use_rows(len, inner) {
        let mut l = dev.stream.launch_builder(module.get(Kernel::SoftmaxRows));
        l.arg(x).arg(&mut y).arg(&l64);
        // SAFETY: softmax_rows(const T* x, T* y, i64 len): three arguments in
        // order; one BLOCK-thread block per row, touching x and y only inside
        // row blockIdx (outer rows of len elements, n allocated/checked).
        unsafe { l.launch(block_cfg(outer, BLOCK)?) }.map_err(driver_err("softmax_rows"))?;
    } else {
        let mut l = dev
            .stream
            .launch_builder(module.get(Kernel::SoftmaxStrided));
        l.arg(x).arg(&mut y).arg(&o64).arg(&l64).arg(&i64_);
        // SAFETY: softmax_strided(const T* x, T* y, i64 outer, i64 len, i64
        // inner): five arguments in order; row (o, i) touches indices
        // (o*len + k)*inner + i < n of x and y.
        unsafe { l.launch(elem_cfg(outer * inner)) }.map_err(driver_err("softmax_strided"))?;
    }
    Ok(y)
}

pub(crate) fn softmax_backward<T: CudaFloat>(
    dev: &Device,
    y: &CudaSlice<T>,
    g: &CudaSlice<T>,
    [outer, len, inner]: [usize; 3],
) -> Result<CudaSlice<T>> {
    let n = outer * len * inner;
    check_len("softmax_backward y", y.len(), n)?;
    check_len("softmax_backward dy", g.len(), n)?;
    let mut dx = dev.alloc::<T>(n)?;
    let module = dev.kernels::<T>()?;
    let (o64, l64, i64_) = (i64_of(outer), i64_of(len), i64_of(inner));
    if use_rows(len, inner) {
        let mut l = dev
            .stream
            .launch_builder(module.get(Kernel::SoftmaxBwdRows));
        l.arg(y).arg(g).arg(&mut dx).arg(&l64);
        // SAFETY: softmax_bwd_rows(const T* y, const T* g, T* dx, i64 len):
        // four arguments in order; block b touches row b of each n-element buffer.
        unsafe { l.launch(block_cfg(outer, BLOCK)?) }.map_err(driver_err("softmax_bwd_rows"))?;
    } else {
        let mut l = dev
            .stream
            .launch_builder(module.get(Kernel::SoftmaxBwdStrided));
        l.arg(y).arg(g).arg(&mut dx).arg(&o64).arg(&l64).arg(&i64_);
        // SAFETY: softmax_bwd_strided(const T* y, const T* g, T* dx, i64
        // outer, i64 len, i64 inner): six arguments in order; indices < n.
        unsafe { l.launch(elem_cfg(outer * inner)) }.map_err(driver_err("softmax_bwd_strided"))?;
    }
    Ok(dx)
}
