//! Every CUDA kernel compiles with NVRTC, for f32 and f64, for a Hopper
//! target (`compute_90`) and for NVRTC's default target (the backend's
//! fallback). NVRTC needs no GPU, only `libnvrtc` (and its builtins
//! library) on the loader path, e.g. from the `nvidia-cuda-nvrtc` wheel:
//!
//! ```text
//! LD_LIBRARY_PATH=/path/to/site-packages/nvidia/cu13/lib cargo test --features cuda --test integration cuda_nvrtc::
//! ```
//!
//! Without `libnvrtc` (CI) each test prints why and passes.
//!
//! The last test runs the same kernel sources, unchanged, on the CPU
//! (`src/backend/cuda/sim/`: one OS thread per CUDA thread, a barrier for
//! `__syncthreads`) and checks each kernel against its definition in double
//! precision: the kernels' index math, masking and reduction partitioning,
//! tested without a GPU. It needs a C++20 compiler (`c++`), else it skips.
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
            "wpair_residual_partial",
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

const SIM_H: &str = include_str!("../src/backend/cuda/sim/sim.h");
const SIM_HARNESS: &str = include_str!("../src/backend/cuda/sim/harness.cpp");

#[test]
fn kernels_match_their_definitions_in_the_cpu_simulator() {
    use std::process::Command;
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&compiler).arg("--version").output().is_err() {
        eprintln!("skipping kernels_match_their_definitions_in_the_cpu_simulator: no `{compiler}`");
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmkd-kernel-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sim.h"), SIM_H).unwrap();
    std::fs::write(dir.join("harness.cpp"), SIM_HARNESS).unwrap();
    for dtype in [DType::F32, DType::F64] {
        std::fs::write(
            dir.join("program.cu"),
            dmkd::backend::cuda::kernels::program_source(dtype),
        )
        .unwrap();
        let exe = dir.join(format!("sim_{}", dtype.name()));
        // -ffp-contract=off: no FMA contraction, as NVRTC's --fmad=false.
        let build = Command::new(&compiler)
            .args(["-std=c++20", "-O1", "-pthread", "-ffp-contract=off"])
            .args(["-Wno-unknown-pragmas", "-I"])
            .arg(&dir)
            .arg(dir.join("harness.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap();
        if !build.status.success() {
            let err = String::from_utf8_lossy(&build.stderr);
            if err.contains("barrier") && err.contains("No such file") {
                eprintln!(
                    "skipping kernels_match_their_definitions_in_the_cpu_simulator: \
                     `{compiler}` lacks C++20 <barrier>"
                );
                return;
            }
            panic!("building the kernel simulator ({dtype}) failed:\n{err}");
        }
        let run = Command::new(&exe).output().unwrap();
        let out = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "kernel simulator ({dtype}) reported failures:\n{}",
            out.lines()
                .filter(|l| !l.starts_with("ok "))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(out.contains("0 failures"), "{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
