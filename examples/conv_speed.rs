//! GFLOP/s of the CPU backend's conv3x3 256->256 kernels (N = 2) at the
//! retinanet FPN levels, against the FMA peak probed in the same process.
//!
//! `cargo run --release --example conv_speed [-- REPS [LEVELS] [f64]]`,
//! e.g. `-- 7 P3,P4`. FLOP model: the direct conv, 2*9*N*H*W*Cin*Cout per
//! pass (forward, input grad, weight grad alike). Times are medians of REPS
//! (default 5) after one warm-up; use the thread count of
//! `RAYON_NUM_THREADS` (default: all cores). `DMKD_CHMASK=0.65` times the
//! convs under a channel mask, `DMKD_SPMASK=0.65` under a spatial one
//! (GFLOP/s then count the dense work).

use std::time::Instant;

use dmkd::backend::cpu::fma_peak_gflops;
use dmkd::backend::{Backend, ConvArgs, ConvGeometry, CpuBackend};
use dmkd::{ConvAlgo, Float, Tensor};

const LEVELS: [(&str, usize, usize); 5] = [
    ("P3", 100, 168),
    ("P4", 50, 84),
    ("P5", 25, 42),
    ("P6", 13, 21),
    ("P7", 7, 11),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time of all threads of this process, in seconds (Linux).
fn cpu_time() -> f64 {
    let mut ns = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
    ns as f64 * 1e-9
}

/// Median wall time, or with `DMKD_CPU_TIME=1` the median CPU time divided
/// by the thread count (a noisy-machine proxy for development only).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    let cpu = std::env::var("DMKD_CPU_TIME").is_ok_and(|v| v == "1");
    let threads = rayon::current_num_threads() as f64;
    f();
    median(
        (0..reps)
            .map(|_| {
                let (t, c) = (Instant::now(), cpu_time());
                f();
                if cpu {
                    (cpu_time() - c) / threads
                } else {
                    t.elapsed().as_secs_f64()
                }
            })
            .collect(),
    )
}

/// Median seconds of (fwd, dX, dW) per level.
fn run<T: Float>(reps: usize, levels: &[&str]) -> Vec<(&'static str, f64, [f64; 3])> {
    let be = CpuBackend::new(ConvAlgo::Direct);
    let (n, c) = (2, 256);
    let mut out = Vec::new();
    for &(name, h, w) in LEVELS.iter().filter(|l| levels.contains(&l.0)) {
        let geom = ConvGeometry::new(&[n, c, h, w], &[c, c, 3, 3], [1, 1], [1, 1]).unwrap();
        let values = |len: usize, seed: usize| -> Vec<T> {
            (0..len)
                .map(|i| {
                    T::from_f64((((i * 7919 + seed * 104729) % 2001) as f64 - 1000.0) / 1000.0)
                })
                .collect()
        };
        let x = Tensor::from_vec(&geom.input_shape(), values(n * c * h * w, 1)).unwrap();
        let wt = Tensor::from_vec(&geom.weight_shape(), values(c * c * 9, 2)).unwrap();
        let b = Tensor::from_vec(&[c], values(c, 3)).unwrap();
        let dy = Tensor::from_vec(&geom.output_shape(), values(n * c * h * w, 4)).unwrap();
        // DMKD_CHMASK=0.65: a channel mask zeroing that fraction of each
        // image's channels (the DMKD channel branch's first conv).
        // DMKD_SPMASK=0.65: a spatial mask zeroing that fraction of the rows
        // (a blob, as attention masks are; a best case for tile skipping).
        let spmask = std::env::var("DMKD_SPMASK")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .map(|ratio| {
                let m = Tensor::from_fn(&[n, h, w], |i| {
                    let row = (i % (h * w)) / w;
                    T::from_f64(if (row as f64) < ratio * h as f64 {
                        0.0
                    } else {
                        1.0
                    })
                })
                .unwrap();
                dmkd::InputMask::Spatial(m)
            });
        let mask = std::env::var("DMKD_CHMASK")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .map(|ratio| {
                let m = Tensor::from_fn(&[n, c], |i| {
                    let k = ((i % c) * 7919 + i / c * 31) % c;
                    T::from_f64(if (k as f64) < ratio * c as f64 {
                        0.0
                    } else {
                        1.0
                    })
                })
                .unwrap();
                dmkd::InputMask::Channel(m)
            })
            .or(spmask);
        let args = ConvArgs {
            geom,
            mask,
            relu: true,
        };
        let flops = 2.0 * geom.macs() as f64;
        // DMKD_ONLY=fwd|dx|dw times one kernel (for profiling).
        let only = std::env::var("DMKD_ONLY").unwrap_or_default();
        let pick = |k: &str| only.is_empty() || only == k;
        let mut row = [f64::INFINITY; 3];
        if pick("fwd") {
            row[0] = time(reps, || drop(be.conv2d(&x, &wt, Some(&b), &args).unwrap()));
        }
        if pick("dx") {
            row[1] = time(reps, || {
                drop(be.conv2d_backward_input(&dy, &wt, &args).unwrap())
            });
        }
        if pick("dw") {
            row[2] = time(reps, || {
                drop(be.conv2d_backward_weight(&dy, &x, &args).unwrap())
            });
        }
        out.push((name, flops, row));
    }
    out
}

fn print(rows: &[(&str, f64, [f64; 3])], peak: f64) {
    println!(
        "{:<4} {:>10} {:>9} {:>7}   {:>10} {:>9} {:>7}   {:>10} {:>9} {:>7}",
        "lvl",
        "fwd ms",
        "GFLOP/s",
        "%peak",
        "dX ms",
        "GFLOP/s",
        "%peak",
        "dW ms",
        "GFLOP/s",
        "%peak"
    );
    for (name, flops, row) in rows {
        print!("{name:<4}");
        for t in row {
            let g = flops / t / 1e9;
            print!(" {:>10.2} {:>9.1} {:>6.1}%  ", t * 1e3, g, 100.0 * g / peak);
        }
        println!();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let levels: Vec<&str> = args
        .get(2)
        .map(|s| s.split(',').collect())
        .unwrap_or_else(|| LEVELS.iter().map(|l| l.0).collect());
    let f64_too = args.iter().any(|a| a == "f64");
    let threads = rayon::current_num_threads();
    let peak_before = fma_peak_gflops(threads);
    // Let the probe's threads be reaped before CPU times are read.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let r32 = run::<f32>(reps, &levels);
    let r64 = if f64_too {
        run::<f64>(reps, &levels)
    } else {
        Vec::new()
    };
    let peak_after = fma_peak_gflops(threads);
    // The higher probe: percentages are then never flattered by a probe
    // that happened to run while the machine was busy.
    let peak = peak_before.max(peak_after);
    println!(
        "threads {threads}, FMA peak (f32) {peak:.1} GFLOP/s (probes before/after: {peak_before:.1} / {peak_after:.1})"
    );
    print(&r32, peak);
    if f64_too {
        println!("f64 (peak: half the f32 figure, {:.1})", peak / 2.0);
        print(&r64, peak / 2.0);
    }
}
