//! The CUDA backend (feature `cuda`): kernels written in CUDA C, compiled
//! at run time by NVRTC, GEMMs on cuBLAS, all through cudarc with the
//! driver loaded dynamically, so this builds (and its tests skip) on
//! machines without CUDA.
//!
//! One concern per file:
//! - `device.rs`: the process's context, stream, cuBLAS handle and kernel
//!   modules (compiled once per element type);
//! - `kernels.rs` and `kernels/*.cu`: the CUDA C sources and NVRTC options;
//! - `index.rs`: index descriptors passed to kernels, and their coalescing;
//! - `elementwise.rs`, `reduce.rs`, `softmax.rs`, `loss.rs`, `conv.rs`,
//!   `gemm.rs`: the host side of each kernel family;
//! - `backend.rs`: the `Backend` trait on top.
//!
//! Numerics. Kernels are compiled without FMA contraction and with IEEE
//! division and square root, so element-wise results equal the reference
//! backend's bit for bit except through `exp`/`ln` (CUDA's libm). Every
//! reduction is deterministic: fixed chunking that depends only on the
//! sizes, per-block partials, a fixed-order final pass, no atomics; dW sums
//! per-sample GEMM partials in sample order. GEMMs (cuBLAS) accumulate in
//! their own order, so convolutions differ from the CPU by rounding only.
//!
//! Validation. Without a GPU: `tests/cuda_nvrtc.rs` compiles every kernel
//! with NVRTC (when `libnvrtc` is on the loader path) and runs the kernel
//! sources unchanged in a CPU simulator (`sim/`) against their definitions;
//! unit tests here check the index coalescing, the reduction order and the
//! row-major to cuBLAS mapping. With a GPU: the conformance suite
//! (`tests/conformance/`, where CUDA is an entry of the backend list,
//! left out with a printed reason where no device is usable) compares every
//! op and the whole loss with the reference backend, `tests/cuda_exact.rs`
//! holds the exact-order claims, and `benches/cuda.rs` times
//! the convolutions and the DMKD loss. Host-side timing must call
//! [`synchronize`] (or `CudaBackend::synchronize`) after the timed calls:
//! backend methods only queue work.

mod backend;
mod conv;
mod device;
mod elementwise;
mod gemm;
mod index;
pub mod kernels;
mod loss;
pub mod reduce;
mod softmax;

pub use backend::CudaBackend;
pub use device::CudaFloat;
pub use reduce::emulate_two_pass_sum;

use crate::error::{Error, Result};

/// Wait until every kernel, copy and GEMM queued by any `CudaBackend` of
/// this process has finished (they all share one stream); Ok at once when
/// no device was ever opened. For host-side timing through a `BackendRef`
/// (`Arc<dyn Backend<T>>`), where `CudaBackend::synchronize` is out of reach.
pub fn synchronize() -> Result<()> {
    match device::Device::opened() {
        Some(dev) => dev.synchronize(),
        None => Ok(()),
    }
}

/// Elements of a tensor on a CUDA device, with the stream that owns them:
/// the CUDA backend's [`DeviceStorage`](crate::tensor::DeviceStorage).
pub(crate) struct DeviceBuffer<T> {
    pub(crate) slice: cudarc::driver::CudaSlice<T>,
    pub(crate) stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

impl<T: CudaFloat> crate::tensor::DeviceStorage<T> for DeviceBuffer<T> {
    fn numel(&self) -> usize {
        self.slice.len()
    }
    /// Copy to the host (synchronising the stream).
    fn download(&self) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(&self.slice)
            .map_err(|e| Error::Device(format!("device-to-host copy: {e}")))
    }
}
