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
