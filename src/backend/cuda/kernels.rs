//! The CUDA C sources of every kernel and their compilation by NVRTC.
//!
//! The sources live in `kernels/*.cu` (plain CUDA C, no includes) and are
//! compiled at run time, once per process and element type, into one module
//! (see `device.rs`). A header fixes the element type `T` and the launch
//! constants the host code relies on (`reduce::BLOCK`, `reduce::ITEMS`,
//! `index::MAX_RANK`), so the two sides cannot disagree.
//!
//! Nothing here needs a GPU: NVRTC compiles to PTX on any machine that has
//! `libnvrtc`, which is how `tests/cuda_nvrtc.rs` checks every kernel
//! without a device.

use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::error::{Error, Result};
use crate::tensor::DType;

use super::index::MAX_RANK;
use super::reduce::{BLOCK, ITEMS};

/// Source files in the order they are concatenated (the prelude first).
pub const SOURCES: &[(&str, &str)] = &[
    ("prelude.cuh", include_str!("kernels/prelude.cuh")),
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("reduce.cu", include_str!("kernels/reduce.cu")),
    ("loss.cu", include_str!("kernels/loss.cu")),
    ("softmax.cu", include_str!("kernels/softmax.cu")),
    ("conv.cu", include_str!("kernels/conv.cu")),
];

/// Every entry point the host code launches; `Module` loads them in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    UnaryFwd,
    UnaryBwd,
    BinarySame,
    BinaryBcast,
    StridedCopy,
    MaskMul,
    MaskMulInplace,
    BiasAct,
    NarrowCopy,
    NarrowScatter,
    SumSamples,
    SumAxesPartial,
    SumAxesSeq,
    ReducePartials,
    SqErrPartial,
    SqErrGrad,
    WpairResidualPartial,
    SoftmaxStrided,
    SoftmaxRows,
    SoftmaxBwdStrided,
    SoftmaxBwdRows,
    Im2col,
    Col2im,
}

impl Kernel {
    pub(crate) const ALL: [Kernel; 23] = [
        Kernel::UnaryFwd,
        Kernel::UnaryBwd,
        Kernel::BinarySame,
        Kernel::BinaryBcast,
        Kernel::StridedCopy,
        Kernel::MaskMul,
        Kernel::MaskMulInplace,
        Kernel::BiasAct,
        Kernel::NarrowCopy,
        Kernel::NarrowScatter,
        Kernel::SumSamples,
        Kernel::SumAxesPartial,
        Kernel::SumAxesSeq,
        Kernel::ReducePartials,
        Kernel::SqErrPartial,
        Kernel::SqErrGrad,
        Kernel::WpairResidualPartial,
        Kernel::SoftmaxStrided,
        Kernel::SoftmaxRows,
        Kernel::SoftmaxBwdStrided,
        Kernel::SoftmaxBwdRows,
        Kernel::Im2col,
        Kernel::Col2im,
    ];

    /// The `extern "C"` name in the sources.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::UnaryFwd => "unary_fwd",
            Kernel::UnaryBwd => "unary_bwd",
            Kernel::BinarySame => "binary_same",
            Kernel::BinaryBcast => "binary_bcast",
            Kernel::StridedCopy => "strided_copy",
            Kernel::MaskMul => "mask_mul",
            Kernel::MaskMulInplace => "mask_mul_inplace",
            Kernel::BiasAct => "bias_act",
            Kernel::NarrowCopy => "narrow_copy",
            Kernel::NarrowScatter => "narrow_scatter",
            Kernel::SumSamples => "sum_samples",
            Kernel::SumAxesPartial => "sum_axes_partial",
            Kernel::SumAxesSeq => "sum_axes_seq",
            Kernel::ReducePartials => "reduce_partials",
            Kernel::SqErrPartial => "sq_err_partial",
            Kernel::SqErrGrad => "sq_err_grad",
            Kernel::WpairResidualPartial => "wpair_residual_partial",
            Kernel::SoftmaxStrided => "softmax_strided",
            Kernel::SoftmaxRows => "softmax_rows",
            Kernel::SoftmaxBwdStrided => "softmax_bwd_strided",
            Kernel::SoftmaxBwdRows => "softmax_bwd_rows",
            Kernel::Im2col => "im2col",
            Kernel::Col2im => "col2im",
        }
    }
}

/// Names of every kernel entry point (for tests that inspect the PTX).
pub fn kernel_names() -> Vec<&'static str> {
    Kernel::ALL.iter().map(|k| k.name()).collect()
}

/// The C type of an element type.
fn c_type(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float",
        DType::F64 => "double",
    }
}

/// The header that fixes the element type and the shared launch constants.
pub fn header(dtype: DType) -> String {
    format!(
        "// dmkd CUDA kernels, element type {}\n\
         typedef {} T;\n\
         #define DMKD_BLOCK {BLOCK}\n\
         #define DMKD_ITEMS {ITEMS}\n\
         #define DMKD_MAX_RANK {MAX_RANK}\n",
        dtype.name(),
        c_type(dtype),
    )
}

/// The whole program for one element type: header, prelude, every file.
pub fn program_source(dtype: DType) -> String {
    let mut src = header(dtype);
    for (name, text) in SOURCES {
        src.push_str(&format!("// ---- {name}\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}

/// The one source file `name` with the header and prelude it needs (to
/// compile each file on its own in tests, for readable errors).
pub fn file_source(dtype: DType, name: &str) -> Option<String> {
    let prelude = SOURCES[0].1;
    let (_, text) = SOURCES.iter().find(|(n, _)| *n == name)?;
    let mut src = header(dtype);
    src.push_str(prelude);
    if name != SOURCES[0].0 {
        src.push_str(text);
    }
    Some(src)
}

/// NVRTC options. `fmad = false` keeps `a * b + c` as two rounded IEEE
/// operations, as the CPU backends compute it; precise division and square
/// root and no flush-to-zero keep the rest IEEE too. `arch` is a virtual
/// architecture such as `compute_90` (None: NVRTC's default).
pub fn compile_options(arch: Option<&str>) -> CompileOptions {
    CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(false),
        options: arch
            .map(|a| vec![format!("--gpu-architecture={a}")])
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// True when `libnvrtc` can be loaded (no GPU needed).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library; touches no other state.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compile `src` to PTX. The caller checks `nvrtc_available()` first:
/// cudarc panics when the library is absent.
pub(crate) fn compile(src: &str, arch: Option<&str>, name: &str) -> Result<Ptx> {
    let mut opts = compile_options(arch);
    opts.name = Some(name.to_string());
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| {
        let detail = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        Error::Device(format!("NVRTC failed to compile {name}: {detail}"))
    })
}

/// Compile the whole program for `dtype` and return the PTX text.
pub fn compile_program_ptx(dtype: DType, arch: Option<&str>) -> Result<String> {
    require_nvrtc()?;
    let name = format!("dmkd_{}.cu", dtype.name());
    Ok(compile(&program_source(dtype), arch, &name)?.to_src())
}

/// Compile one source file (with header and prelude) and return the PTX text.
pub fn compile_file_ptx(dtype: DType, file: &str, arch: Option<&str>) -> Result<String> {
    require_nvrtc()?;
    let src = file_source(dtype, file)
        .ok_or_else(|| Error::arg("compile_file_ptx", format!("no kernel file `{file}`")))?;
    Ok(compile(&src, arch, file)?.to_src())
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(Error::BackendUnavailable(
            "libnvrtc could not be loaded".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_once_in_the_sources() {
        let all = program_source(DType::F32);
        for k in Kernel::ALL {
            let pattern = format!("__global__ void {}(", k.name());
            assert_eq!(all.matches(&pattern).count(), 1, "{}", k.name());
        }
        assert_eq!(all.matches("__global__").count(), Kernel::ALL.len());
    }

    #[test]
    fn header_carries_the_host_constants() {
        let h = header(DType::F64);
        assert!(h.contains("typedef double T;"));
        assert!(h.contains(&format!("#define DMKD_BLOCK {BLOCK}")));
        assert!(h.contains(&format!("#define DMKD_MAX_RANK {MAX_RANK}")));
    }
}
