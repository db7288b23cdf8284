//! The device: one CUDA context, one stream, one cuBLAS handle and the
//! compiled kernel modules, shared by every `CudaBackend` of the process.
//!
//! Why one per process: tensors cache their device copy (`Tensor::
//! device_or_upload`) and may be handed from one backend instance to
//! another. With a single stream, every kernel, copy and GEMM that touches
//! a buffer is ordered after the work that produced it, so no cross-stream
//! events are needed (cudarc's per-buffer event tracking is switched off),
//! and the NVRTC compilation and module load happen once per process and
//! element type, lazily, on first use.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::result::CublasError;
use cudarc::cublas::{CudaBlas, Gemm, StridedBatchedConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DriverError, LaunchConfig,
};

use crate::error::{Error, Result};
use crate::tensor::{DType, Float};

use super::kernels::{self, Kernel};

/// Element types with a CUDA path: f32 (sgemm) and f64 (dgemm). Sealed.
pub trait CudaFloat:
    Float + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + sealed::Sealed
{
    /// `cublas<t>gemmStridedBatched` for this type.
    ///
    /// # Safety
    /// As cudarc's `Gemm::gemm_strided_batched`: the configuration must
    /// describe matrices that lie inside `a`, `b` and `c` (checked by
    /// `gemm::gemm`, the only caller).
    #[doc(hidden)]
    unsafe fn gemm_strided_batched(
        blas: &CudaBlas,
        cfg: StridedBatchedConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaViewMut<'_, Self>,
    ) -> std::result::Result<(), CublasError>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

impl CudaFloat for f32 {
    unsafe fn gemm_strided_batched(
        blas: &CudaBlas,
        cfg: StridedBatchedConfig<f32>,
        a: &CudaView<'_, f32>,
        b: &CudaView<'_, f32>,
        c: &mut CudaViewMut<'_, f32>,
    ) -> std::result::Result<(), CublasError> {
        // SAFETY: forwarded; the caller upholds the contract above.
        unsafe { Gemm::<f32>::gemm_strided_batched(blas, cfg, a, b, c) }
    }
}

impl CudaFloat for f64 {
    unsafe fn gemm_strided_batched(
        blas: &CudaBlas,
        cfg: StridedBatchedConfig<f64>,
        a: &CudaView<'_, f64>,
        b: &CudaView<'_, f64>,
        c: &mut CudaViewMut<'_, f64>,
    ) -> std::result::Result<(), CublasError> {
        // SAFETY: forwarded; the caller upholds the contract above.
        unsafe { Gemm::<f64>::gemm_strided_batched(blas, cfg, a, b, c) }
    }
}

/// The loaded kernels of one element type, indexed by `Kernel`.
pub(crate) struct Module {
    funcs: Vec<CudaFunction>,
    _module: Arc<CudaModule>,
}

impl Module {
    pub(crate) fn get(&self, k: Kernel) -> &CudaFunction {
        &self.funcs[k as usize]
    }
}

type Cell<T> = OnceLock<std::result::Result<T, String>>;

/// The process's CUDA device state (device 0).
pub(crate) struct Device {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    blas: Mutex<CudaBlas>,
    /// `compute_XY` of the device, for NVRTC.
    arch: String,
    name: String,
    kernels_f32: Cell<Module>,
    kernels_f64: Cell<Module>,
}

static DEVICE: Cell<Arc<Device>> = OnceLock::new();

/// True when the driver, NVRTC and cuBLAS libraries can all be loaded.
pub(crate) fn libraries_present() -> std::result::Result<(), String> {
    // SAFETY: each probe only tries to dlopen a library by its usual names;
    // none touches driver state, and all are safe without CUDA installed.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err("no CUDA device: the CUDA driver library (libcuda) could not be loaded".into());
    }
    if !nvrtc {
        return Err(
            "no CUDA device usable: libnvrtc (needed to compile the kernels) could not be loaded"
                .into(),
        );
    }
    if !cublas {
        return Err("no CUDA device usable: libcublas could not be loaded".into());
    }
    Ok(())
}

/// A `DriverError` as a crate error, naming what failed.
pub(crate) fn driver_err(what: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Device(format!("{what}: {e}"))
}

impl Device {
    /// The shared device, opened on first use. Never panics: a missing
    /// library or device is `Error::BackendUnavailable`.
    pub(crate) fn get() -> Result<Arc<Device>> {
        DEVICE
            .get_or_init(|| Device::open().map(Arc::new))
            .clone()
            .map_err(Error::BackendUnavailable)
    }

    /// The shared device if it was opened successfully (never opens it).
    pub(crate) fn opened() -> Option<Arc<Device>> {
        DEVICE.get().and_then(|d| d.as_ref().ok()).cloned()
    }

    fn open() -> std::result::Result<Device, String> {
        // Probe the libraries before any driver call: cudarc panics when a
        // dynamically loaded library is missing.
        libraries_present()?;
        // CudaContext::new returns errors for "no device"; the unwind guard
        // also turns an unexpected panic inside the bindings (a driver too
        // old to have a symbol, say) into an error instead of an abort.
        let ctx = catch_unwind(|| CudaContext::new(0))
            .map_err(|_| {
                "no CUDA device: the driver panicked while creating a context".to_string()
            })?
            .map_err(|e| format!("no CUDA device: {e}"))?;
        // SAFETY: event tracking only matters when buffers are shared between
        // streams; every buffer of this process lives on the one stream below.
        unsafe { ctx.disable_event_tracking() };
        let setup = AssertUnwindSafe(|| -> std::result::Result<Device, String> {
            let stream = ctx
                .new_stream()
                .map_err(|e| format!("creating a stream: {e}"))?;
            let blas =
                CudaBlas::new(stream.clone()).map_err(|e| format!("creating cuBLAS: {e}"))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| format!("reading the compute capability: {e}"))?;
            let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
            Ok(Device {
                ctx: ctx.clone(),
                stream,
                blas: Mutex::new(blas),
                arch: format!("compute_{major}{minor}"),
                name,
                kernels_f32: OnceLock::new(),
                kernels_f64: OnceLock::new(),
            })
        });
        catch_unwind(setup)
            .map_err(|_| "no CUDA device: the CUDA bindings panicked during setup".to_string())?
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The kernels for element type `T`, compiled and loaded on first use.
    pub(crate) fn kernels<T: CudaFloat>(&self) -> Result<&Module> {
        let cell = match T::DTYPE {
            DType::F32 => &self.kernels_f32,
            DType::F64 => &self.kernels_f64,
        };
        cell.get_or_init(|| self.load(T::DTYPE))
            .as_ref()
            .map_err(|e| Error::Device(e.clone()))
    }

    fn load(&self, dtype: DType) -> std::result::Result<Module, String> {
        let src = kernels::program_source(dtype);
        let name = format!("dmkd_{}.cu", dtype.name());
        // Compile for the device's own virtual architecture; an NVRTC older
        // than the device may not know it, so fall back to NVRTC's default
        // (the driver JIT-compiles that PTX for the device).
        let ptx = kernels::compile(&src, Some(&self.arch), &name)
            .or_else(|_| kernels::compile(&src, None, &name))
            .map_err(|e| e.to_string())?;
        let module = self
            .ctx
            .load_module(ptx)
            .map_err(|e| format!("loading the {} kernels: {e}", dtype.name()))?;
        let funcs = Kernel::ALL
            .iter()
            .map(|k| {
                module
                    .load_function(k.name())
                    .map_err(|e| format!("kernel {}: {e}", k.name()))
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Ok(Module {
            funcs,
            _module: module,
        })
    }

    /// A buffer of `len` elements with unspecified contents.
    ///
    /// Every caller writes all `len` elements (a kernel whose grid-stride
    /// loop covers the whole buffer, or a GEMM with beta = 0, which does not
    /// read C) before anything reads them, on this same stream. That skips
    /// the memset `alloc_zeros` would spend on every output.
    pub(crate) fn alloc<T: CudaFloat>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: cudarc marks uninitialised allocations unsafe because reading
        // them before a write is undefined; see the contract above.
        unsafe { self.stream.alloc::<T>(len) }.map_err(driver_err("device allocation"))
    }

    /// Copy host elements to a new device buffer.
    pub(crate) fn upload<T: CudaFloat>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(driver_err("host-to-device copy"))
    }

    /// Copy a device buffer to the host (waits for the stream).
    pub(crate) fn download<T: CudaFloat>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(buf)
            .map_err(driver_err("device-to-host copy"))
    }

    /// Wait until all queued work is done; reports asynchronous kernel errors.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver_err("stream synchronize"))
    }

    /// The cuBLAS handle, bound to this stream and to the calling thread's
    /// context. The lock keeps its use (and any future handle setting)
    /// serialized across host threads.
    pub(crate) fn blas(&self) -> Result<MutexGuard<'_, CudaBlas>> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("binding the CUDA context"))?;
        Ok(self.blas.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Threads per block of element-wise kernels.
pub(crate) const ELEM_BLOCK: u32 = 256;
/// Upper bound on the blocks of a grid-stride launch (the loop covers the rest).
const ELEM_MAX_GRID: usize = 1 << 16;

/// A grid-stride launch over `n` elements. Results never depend on the
/// grid: each element is computed by one thread on its own.
pub(crate) fn elem_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ELEM_BLOCK as usize).clamp(1, ELEM_MAX_GRID);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEM_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `block` threads per item, `blocks` items (reductions, rows).
pub(crate) fn block_cfg(blocks: usize, block: usize) -> Result<LaunchConfig> {
    if blocks == 0 || blocks > i32::MAX as usize {
        return Err(Error::Device(format!(
            "a launch of {blocks} blocks is outside the grid limit"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (block as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Error unless a buffer holds at least `need` elements (checked before
/// every launch whose kernel indexes beyond its own output).
pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::Device(format!(
            "{what}: buffer of {have} elements, the kernel reads {need}"
        )));
    }
    Ok(())
}

/// A `usize` as the kernels' `i64`.
pub(crate) fn i64_of(x: usize) -> i64 {
    x as i64
}
