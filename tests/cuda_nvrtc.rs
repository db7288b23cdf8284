//! Every CUDA kernel compiles with NVRTC, for f32 and f64, for a Hopper
//! target (`compute_90`) and for NVRTC's default target (the backend's
//! fallback). NVRTC needs no GPU, only `libnvrtc` (and its builtins
//! library) on the loader path, e.g. from the `nvidia-cuda-nvrtc` wheel:
//!
//! ```text
//! LD_LIBRARY_PATH=/path/to/site-packages/nvidia/cu13/lib cargo test --features cuda --test cuda_nvrtc
//! ```
//!
//! Without `libnvrtc` (CI) each test prints why and passes.
#![cfg(feature = "cuda")]

use dmkd::DType;
use dmkd::backend::cuda::kernels::{
    SOURCES, compile_file_ptx, compile_program_ptx, kernel_names, nvrtc_available,
};

const HOPPER: Option<&str> = Some("compute_90");

fn nvrtc_or_skip(test: &str) -> bool {
    if nvrtc_available() {
        return true;
    }
    eprintln!(
        "skipping {test}: libnvrtc cannot be loaded (put a CUDA lib directory on LD_LIBRARY_PATH)"
    );
    false
}

/// The body of `.entry name(...) { ... }` in PTX text.
fn entry_body<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("no entry {name}"));
    let rest = &ptx[start..];
    let end = rest[1..].find(".entry ").map_or(rest.len(), |e| e + 1);
    &rest[..end]
}

#[test]
fn each_source_file_compiles_on_its_own() {
    if !nvrtc_or_skip("each_source_file_compiles_on_its_own") {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        for (file, _) in SOURCES {
            let ptx = compile_file_ptx(dtype, file, HOPPER)
                .unwrap_or_else(|e| panic!("{file} ({dtype}): {e}"));
            assert!(
                ptx.contains(".target sm_90"),
                "{file}: not a compute_90 target"
            );
        }
    }
}

#[test]
fn the_program_defines_every_kernel_for_hopper() {
    if !nvrtc_or_skip("the_program_defines_every_kernel_for_hopper") {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        let ptx = compile_program_ptx(dtype, HOPPER).unwrap_or_else(|e| panic!("{dtype}: {e}"));
        let names = kernel_names();
        for name in &names {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{dtype}: {name} missing"
            );
        }
        assert_eq!(
            ptx.matches(".entry ").count(),
            names.len(),
            "{dtype}: extra entries"
        );
        // No kernel spills index descriptors or accumulators to local memory.
        assert!(!ptx.contains(".local"), "{dtype}: local memory in the PTX");
        // Element and partial-sum kernels must not contract a*b + c into an
        // FMA: their rounding is what the host emulation and the reference
        // backend reproduce. (exp/log bodies use FMA internally by design.)
        for name in [
            "binary_same",
            "sq_err_partial",
            "wpair_loss_partial",
            "wpair_dots_partial",
            "wpair_grad",
            "reduce_partials",
            "sum_axes_seq",
            "col2im",
        ] {
            let body = entry_body(&ptx, name);
            assert!(!body.contains("fma."), "{dtype}: {name} contains an FMA");
        }
        // f64 kernels compute in double, f32 kernels in float.
        let body = entry_body(&ptx, "binary_same");
        let want = if dtype == DType::F64 {
            "add.rn.f64"
        } else {
            "add.rn.f32"
        };
        assert!(body.contains(want), "{dtype}: binary_same lacks {want}");
    }
}

#[test]
fn the_program_compiles_for_the_default_target() {
    if !nvrtc_or_skip("the_program_compiles_for_the_default_target") {
        return;
    }
    for dtype in [DType::F32, DType::F64] {
        compile_program_ptx(dtype, None).unwrap_or_else(|e| panic!("{dtype}: {e}"));
    }
}
