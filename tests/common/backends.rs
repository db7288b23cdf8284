//! Every backend the tests run, in one list: the one place to add a
//! backend or a variant of one (a CPU ISA, another conv algorithm, another
//! device). The conformance suite, the gradient checks, the PyTorch
//! fixtures and the robustness tests all iterate over it, and each entry
//! carries the [`Rule`] its results are held to (`rules.rs`).
//!
//! A backend that cannot run here (CUDA without a usable device) is left
//! out with one printed line saying why, so the tests pass on machines
//! without it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use dmkd::backend::{
    BackendFloat, BackendKind, BackendOptions, Isa, ReferenceBackend, make_backend,
};
use dmkd::{BackendRef, ConvAlgo};

use super::rules::Rule;

/// One backend under test.
#[derive(Clone)]
pub struct Subject<T: dmkd::Float> {
    /// A short label for messages, e.g. `cpu/winograd`.
    pub name: String,
    pub backend: BackendRef<T>,
    /// What its results are held to.
    pub rule: Rule,
}

/// The backends under test, the reference (the oracle) excepted.
pub fn backends<T: BackendFloat>() -> Vec<Subject<T>> {
    let mut v = Vec::new();
    // The fast CPU backend under each conv algorithm on the widest
    // instruction set this CPU has, and direct and Winograd F(4x4) on each
    // narrower one (AVX2 on an AVX-512 machine, scalar everywhere; F(6x6)'s
    // kernels are held to the same bits on every ISA by the lib tests and
    // tests/determinism.rs).
    for algo in [
        ConvAlgo::Direct,
        ConvAlgo::Winograd,
        ConvAlgo::Winograd6,
        ConvAlgo::Auto,
    ] {
        let opts = BackendOptions {
            kind: BackendKind::Cpu,
            conv_algo: algo,
            isa: Isa::Auto,
        };
        v.extend(subject(opts, Rule::Cpu(algo)));
    }
    for isa in Isa::available().into_iter().skip(1) {
        for algo in [ConvAlgo::Direct, ConvAlgo::Winograd] {
            let opts = BackendOptions {
                kind: BackendKind::Cpu,
                conv_algo: algo,
                isa,
            };
            v.extend(subject(opts, Rule::Cpu(algo)));
        }
    }
    // CUDA, in a `--features cuda` build with a usable device.
    #[cfg(feature = "cuda")]
    v.extend(subject(
        BackendOptions {
            kind: BackendKind::Cuda,
            ..BackendOptions::default()
        },
        Rule::Device,
    ));
    v
}

/// The reference followed by every backend under test: for checks against
/// an oracle outside the engine (finite differences, PyTorch fixtures),
/// which the reference must pass too.
pub fn all_backends<T: BackendFloat>() -> Vec<Subject<T>> {
    let mut v = vec![Subject {
        name: "reference".into(),
        backend: Arc::new(ReferenceBackend) as BackendRef<T>,
        rule: Rule::Reference,
    }];
    v.extend(backends());
    v
}

fn subject<T: BackendFloat>(opts: BackendOptions, rule: Rule) -> Option<Subject<T>> {
    let name = opts.kind_name();
    match make_backend::<T>(opts) {
        Ok(backend) => Some(Subject {
            name,
            backend,
            rule,
        }),
        Err(e) => {
            skipped(&name, &e.to_string());
            None
        }
    }
}

/// Say once per test process why a backend is left out.
fn skipped(name: &str, why: &str) {
    static SAID: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.insert(name.to_string()) {
        eprintln!("skipping backend {name}: {why}");
    }
}
