//! Where the whole DMKD forward+backward spends its time, per kernel and
//! shape: the CPU backend wrapped in `Profiled`.
//!
//! `cargo run --release --example profile_loss [preset] [conv-algo] [reps]`
//! (defaults: retinanet auto 3). Prints the median-run total and, per
//! kernel, the time summed over `reps` runs divided by `reps`; on Linux
//! also the process's user and system CPU time and minor page faults over
//! the runs (fresh memory shows there, not in any kernel's row).

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
    let before = process_times();
    let wall = Instant::now();
    for _ in 0..reps {
        let t0 = Instant::now();
        evaluate(be.clone(), &problem)?;
        totals.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    // Where the step's time outside user code goes: the kernel's share is
    // mostly page faults (fresh memory) and the threads' sleeps and wakes.
    if let (Some(a), Some(b)) = (before, process_times()) {
        println!(
            "process over the runs: {:.2} s user, {:.2} s system, {:.2} s wall; {:.0} minor page faults per run",
            b.user - a.user,
            b.system - a.system,
            wall.elapsed().as_secs_f64(),
            (b.minor_faults - a.minor_faults) / reps as f64
        );
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

/// The process's CPU times (seconds) and minor page faults so far.
struct ProcessTimes {
    user: f64,
    system: f64,
    minor_faults: f64,
}

/// Read from `/proc/self/stat` (Linux; `None` elsewhere). Its fields after
/// the command name: `minflt` is the 8th, `utime` and `stime` (in clock
/// ticks of 1/100 s) the 12th and 13th.
fn process_times() -> Option<ProcessTimes> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<f64> = stat
        .rsplit(')')
        .next()?
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(f64::NAN))
        .collect();
    Some(ProcessTimes {
        user: fields.get(11)? / 100.0,
        system: fields.get(12)? / 100.0,
        minor_faults: *fields.get(7)?,
    })
}
