//! The CUDA backend (feature `cuda`). Placeholder until the device kernels
//! land: it probes for the driver and reports that no device path exists yet.

use crate::error::{Error, Result};

/// True when the CUDA driver and NVRTC libraries can be loaded.
pub fn cuda_available() -> bool {
    // SAFETY: these probes only try to dlopen the libraries; they touch no
    // driver state and are safe to call on a machine without CUDA.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() }
}

/// CUDA backend handle.
pub struct CudaBackend;

impl CudaBackend {
    pub fn new() -> Result<Self> {
        if !cuda_available() {
            return Err(Error::BackendUnavailable(
                "no CUDA device: the CUDA driver library could not be loaded".into(),
            ));
        }
        Err(Error::BackendUnavailable(
            "the CUDA backend is not implemented yet".into(),
        ))
    }
}

/// Elements of a tensor on a CUDA device, with the stream that owns them.
pub struct DeviceBuffer<T> {
    pub(crate) slice: cudarc::driver::CudaSlice<T>,
    pub(crate) stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

impl<T: crate::tensor::Float> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.slice.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }
    /// Copy to the host (synchronising the stream).
    pub fn download(&self) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(&self.slice)
            .map_err(|e| Error::Device(format!("device-to-host copy: {e}")))
    }
}
