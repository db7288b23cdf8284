//! Which vector instruction set the CPU kernels run on (`--isa`).
//!
//! The kernels are written once over pulp's `Simd` trait and instantiated
//! for each instruction set; pulp picks the widest the CPU has at run time
//! (`Isa::Auto`), or a caller names one. Every choice gives the same bits:
//! each output element is one chain of fused multiply-adds (or f64
//! additions) in an order fixed by the data layout, not by the register
//! width, so a wider register only computes more such chains at once
//! (`tests/determinism.rs` runs every ISA this machine has against the
//! others).
//!
//! On AArch64 the vector set is NEON (128-bit registers: 4 f32 or 2 f64
//! lanes), which every AArch64 CPU has. `docs/engineering.md`, "AArch64",
//! says how its kernels are tested here (cross-built, run under QEMU).

use pulp::Arch;

use crate::error::{Error, Result};

/// A vector instruction set for the CPU backend's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// The widest this CPU has (AVX-512, else AVX2 with FMA, else scalar
    /// on x86-64; NEON on AArch64).
    #[default]
    Auto,
    /// AVX-512 (F, BW, CD, DQ, VL: pulp's x86-64-v4).
    Avx512,
    /// AVX2 with FMA (pulp's x86-64-v3).
    Avx2,
    /// NEON (AArch64's Advanced SIMD, pulp's `aarch64::Neon`).
    Neon,
    /// No vector instructions: one lane per "register", the same kernels.
    Scalar,
}

impl Isa {
    /// The concrete instruction sets this CPU can run, widest first
    /// (`Scalar` always).
    pub fn available() -> Vec<Isa> {
        Isa::CONCRETE
            .into_iter()
            .filter(|isa| isa.detect().is_some())
            .collect()
    }

    /// What `Auto` means on this CPU; a concrete choice is returned as is
    /// if the CPU has it, else a one-line error.
    pub fn resolve(self) -> Result<Isa> {
        match self {
            Isa::Auto => Ok(Isa::available()[0]),
            isa => isa.arch().map(|_| isa),
        }
    }

    /// pulp's dispatcher for every instruction set this CPU has, widest
    /// first: what kernel tests run over.
    #[cfg(test)]
    pub(crate) fn every_arch() -> Vec<Arch> {
        Isa::available()
            .into_iter()
            .filter_map(|i| i.arch().ok())
            .collect()
    }

    /// The lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Auto => "auto",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
            Isa::Scalar => "scalar",
        }
    }

    /// Every instruction set dmkd names, widest first on each
    /// architecture (`Auto` aside).
    const CONCRETE: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar];

    /// pulp's dispatcher for this instruction set, or why this CPU cannot
    /// run it (naming the ones it can).
    pub(crate) fn arch(self) -> Result<Arch> {
        self.detect().ok_or_else(|| {
            let lacks = match self {
                Isa::Avx512 => "AVX-512 (F, BW, CD, DQ, VL)",
                Isa::Avx2 => "AVX2 with FMA",
                Isa::Neon => "NEON",
                // Both always run (`detect`).
                Isa::Auto | Isa::Scalar => "such instruction set",
            };
            let runs: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
            Error::arg(
                "isa",
                format!(
                    "this CPU has no {lacks}; --isa {} or auto will run",
                    runs.join(", ")
                ),
            )
        })
    }

    /// pulp's dispatcher for this instruction set, if this CPU has it.
    fn detect(self) -> Option<Arch> {
        match self {
            Isa::Auto => Some(Arch::new()),
            Isa::Scalar => Some(Arch::Scalar),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => pulp::x86::V3::try_new().map(Arch::V3),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => pulp::x86::V4::try_new().map(Arch::V4),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => pulp::aarch64::Neon::try_new().map(Arch::Neon),
            // Not this architecture's instruction sets.
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Isa::Auto),
            "avx512" => Ok(Isa::Avx512),
            "avx2" => Ok(Isa::Avx2),
            "neon" => Ok(Isa::Neon),
            "scalar" => Ok(Isa::Scalar),
            other => Err(Error::arg(
                "isa",
                format!("unknown instruction set `{other}` (auto, avx512, avx2, neon or scalar)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for isa in [Isa::Auto, Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar] {
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
            assert_eq!(isa.to_string(), isa.name());
        }
        let e = "sse".parse::<Isa>().unwrap_err().to_string();
        assert!(e.contains("unknown instruction set `sse`"), "{e}");
    }

    #[test]
    fn auto_is_the_widest_available_and_scalar_always_runs() {
        let avail = Isa::available();
        assert_eq!(*avail.last().unwrap(), Isa::Scalar);
        assert_eq!(Isa::Auto.resolve().unwrap(), avail[0]);
        assert!(!avail.contains(&Isa::Auto));
        for isa in Isa::CONCRETE {
            // Either it runs and resolves to itself, or it is a readable
            // error naming what the CPU lacks.
            match isa.resolve() {
                Ok(r) => {
                    assert_eq!(r, isa);
                    assert!(avail.contains(&isa));
                }
                Err(e) => {
                    assert!(!avail.contains(&isa));
                    // It names what the CPU lacks and what would run.
                    let e = e.to_string();
                    assert!(e.contains("this CPU has no"), "{e}");
                    let runs: Vec<&str> = avail.iter().map(|i| i.name()).collect();
                    let suggestion = format!("--isa {} or auto will run", runs.join(", "));
                    assert!(e.ends_with(&suggestion), "{e}");
                }
            }
        }
        // pulp's own detection agrees with ours.
        let widest = match Arch::new() {
            Arch::Scalar => Isa::Scalar,
            #[cfg(target_arch = "x86_64")]
            Arch::V3(_) => Isa::Avx2,
            #[cfg(target_arch = "x86_64")]
            Arch::V4(_) => Isa::Avx512,
            #[cfg(target_arch = "aarch64")]
            Arch::Neon(_) => Isa::Neon,
            #[allow(unreachable_patterns)]
            other => panic!("an instruction set dmkd does not name: {other:?}"),
        };
        assert_eq!(widest, avail[0]);
    }

    /// The f32 lanes of the registers a dispatch runs on.
    struct F32Lanes;

    impl pulp::WithSimd for F32Lanes {
        type Output = usize;
        fn with_simd<S: pulp::Simd>(self, _simd: S) -> usize {
            S::F32_LANES
        }
    }

    /// Each instruction set dispatches to registers of its own width: the
    /// determinism tests compare the ISAs' bits, so an ISA that quietly
    /// ran another's kernels (`--isa avx2` on AVX-512 registers) would pass
    /// them all.
    #[test]
    fn each_isa_dispatches_to_its_own_register_width() {
        let lanes = |isa: Isa| match isa {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Neon => 4,
            Isa::Scalar => 1,
            Isa::Auto => unreachable!("resolved"),
        };
        for isa in Isa::available() {
            assert_eq!(isa.arch().unwrap().dispatch(F32Lanes), lanes(isa), "{isa}");
        }
        let widest = Isa::Auto.resolve().unwrap();
        assert_eq!(Isa::Auto.arch().unwrap().dispatch(F32Lanes), lanes(widest));
    }
}
