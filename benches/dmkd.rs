//! The whole DMKD loss, forward + backward (f32), on the presets of `docs/spec.md`.
//!
//! - `cpu/<algo>/<preset>`: the CPU backend with each `--conv-algo`
//!   (direct, winograd, auto) at the full retinanet and two-stage presets
//!   (256 channels);
//! - `{reference,cpu}/<preset>-c32`: reference vs cpu on the same presets
//!   with 32 channels (1/64 of the conv work). The reference's plain loops
//!   need minutes per full-size pass, too long for criterion's minimum of
//!   ten samples; at 32 channels the ratio between the two paths is still
//!   measured on the real level sizes, masks and graph.
//!
//! Run with `cargo bench --bench dmkd` (about 15 minutes: the two-stage
//! preset alone is 10+ s per sample). `dmkd bench` prints the same
//! workload as one table with the FMA peak probe beside it.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dmkd::ConvAlgo;
use dmkd::backend::{Backend, CpuBackend, ReferenceBackend};
use dmkd::distill::{Problem, evaluate};
use dmkd::synthetic::Preset;

fn problem(preset: &Preset) -> Problem<f32> {
    dmkd::synthetic::problem(preset, 0).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dmkd_forward_backward");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    for name in ["retinanet", "two-stage"] {
        let preset = Preset::named(name).unwrap();
        let p = problem(&preset);
        for algo in [
            ConvAlgo::Direct,
            ConvAlgo::Winograd,
            ConvAlgo::Winograd6,
            ConvAlgo::Auto,
        ] {
            let be: Arc<dyn Backend<f32>> = Arc::new(CpuBackend::new(algo));
            let id = format!("cpu/{}", format!("{algo:?}").to_lowercase());
            g.measurement_time(Duration::from_secs(if name == "retinanet" {
                40
            } else {
                150
            }));
            g.bench_function(BenchmarkId::new(id, name), |b| {
                b.iter(|| evaluate(be.clone(), &p).unwrap())
            });
        }
    }
    for name in ["retinanet", "two-stage"] {
        let preset = Preset::named(name).unwrap().with_channels(32, 32);
        let p = problem(&preset);
        let label = format!("{name}-c32");
        let cpu: Arc<dyn Backend<f32>> = Arc::new(CpuBackend::new(ConvAlgo::Auto));
        let reference: Arc<dyn Backend<f32>> = Arc::new(ReferenceBackend);
        g.measurement_time(Duration::from_secs(10));
        g.bench_function(BenchmarkId::new("cpu", &label), |b| {
            b.iter(|| evaluate(cpu.clone(), &p).unwrap())
        });
        g.measurement_time(Duration::from_secs(60));
        g.bench_function(BenchmarkId::new("reference", &label), |b| {
            b.iter(|| evaluate(reference.clone(), &p).unwrap())
        });
    }
    g.finish();
}

// No plots: criterion's plotters backend needs system fonts this machine
// (and CI) lack, and panics without them; the numbers go to the terminal
// and target/criterion/*/estimates.json.
criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = bench
}
criterion_main!(benches);
