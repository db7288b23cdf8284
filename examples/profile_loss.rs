//! Where the whole DMKD forward+backward spends its time, per kernel and
//! shape: the CPU backend wrapped in `Profiled`.
//!
//! `cargo run --release --example profile_loss [preset] [conv-algo] [reps]`
//! (defaults: retinanet auto 3). Prints the median-run total and, per
//! kernel, the time summed over `reps` runs divided by `reps`.

use std::sync::Arc;
use std::time::Instant;

use dmkd::backend::{BackendRef, CpuBackend, Profiled};
use dmkd::distill::evaluate;
use dmkd::synthetic::{self, Preset};
use dmkd::{ConvAlgo, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let preset = Preset::named(args.get(1).map_or("retinanet", |s| s.as_str()))?;
    let algo: ConvAlgo = args.get(2).map_or("auto", |s| s.as_str()).parse()?;
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    // The allocator setting the CLI runs with (`dmkd bench` times the loss
    // under it): without it glibc's adaptive mmap threshold changes which
    // buffers are fresh, and a two-stage step profiled 25% slower.
    dmkd::tune_allocator();
    let problem = synthetic::problem::<f32>(&preset, 0)?;
    let profiled = Arc::new(Profiled::new(Arc::new(CpuBackend::new(algo))));
    let be: BackendRef<f32> = profiled.clone();
    evaluate(be.clone(), &problem)?; // warm-up: pools, page faults
    profiled.reset();
    let mut totals = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        evaluate(be.clone(), &problem)?;
        totals.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    totals.sort_by(f64::total_cmp);
    let median = totals[totals.len() / 2];
    let rows = profiled.rows();
    let kernels: f64 = rows.iter().map(|r| r.seconds).sum::<f64>() * 1e3 / reps as f64;
    println!(
        "{} fwd+bwd, {algo:?}, {} threads: median {median:.1} ms over {reps} runs; kernels {kernels:.1} ms/run, outside kernels {:.1} ms/run",
        preset.name,
        rayon::current_num_threads(),
        totals.iter().sum::<f64>() / reps as f64 - kernels
    );
    println!("{:>9} {:>6} {:>6}  kernel", "ms/run", "%", "calls");
    for r in rows.iter().take(40) {
        let ms = r.seconds * 1e3 / reps as f64;
        println!(
            "{ms:9.2} {:5.1}% {:6}  {}",
            100.0 * ms / kernels,
            r.calls / reps as u64,
            r.kernel
        );
    }
    Ok(())
}
