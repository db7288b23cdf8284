//! GFLOP/s of the CPU backend's conv3x3 256->256 kernels (N = 2) at the
//! FPN levels of a preset (`DMKD_PRESET`, default retinanet), against the
//! FMA peak probed in the same process.
//!
//! `cargo run --release --example conv_speed [-- REPS [LEVELS] [f64]]`,
//! e.g. `-- 7 P3,P4`. FLOP model: the direct conv, 2*9*N*H*W*Cin*Cout per
//! pass (forward, input grad, weight grad alike). Times are medians of REPS
//! (default 5) after one warm-up; use the thread count of
//! `RAYON_NUM_THREADS` (default: all cores). `DMKD_CHMASK=0.65` times the
//! convs under a channel mask, `DMKD_SPMASK=0.65` under a spatial one
//! (GFLOP/s then count the dense work); `DMKD_SPMASK=loss` and
//! `DMKD_CHMASK=loss` use the masks the preset's loss draws at that level
//! (from the synthetic teacher). `DMKD_ALGO=winograd` (or `auto`)
//! picks the conv algorithm (default `direct`); `DMKD_ISA=avx2` (or `avx512`, `neon`,
//! `scalar`, default `auto`) the instruction set of the kernels and the probe;
//! `DMKD_CIN=1` gives the convs one input channel instead of 256.

use std::time::Instant;

use dmkd::backend::cpu::fma_peak_gflops_on;
use dmkd::backend::{Backend, ConvArgs, ConvGeometry, CpuBackend};
use dmkd::distill::mask::Branch;
use dmkd::synthetic::{Preset, loss_masks};
use dmkd::{ConvAlgo, Float, Isa, Tensor};

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

/// Busy CPU seconds of the whole machine, all processes (/proc/stat).
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle, iowait.
    let busy: f64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / 100.0
}

/// CPU seconds of this process, exited threads included (/proc/self/stat).
fn self_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// Median wall time of `reps` quiet runs: a run counts only if the rest of
/// the machine used less than 3% of a core meanwhile (other engineers
/// compile on these 2 cores; /proc/stat tells). Up to 12x reps tries; if
/// too few runs were quiet, the median of all runs, flagged with `*`.
/// `DMKD_CPU_TIME=1`: the median CPU time per thread instead (a proxy for
/// development on a busy machine).
fn time(reps: usize, mut f: impl FnMut()) -> (f64, bool) {
    let cpu = std::env::var("DMKD_CPU_TIME").is_ok_and(|v| v == "1");
    let threads = rayon::current_num_threads() as f64;
    f();
    let (mut quiet, mut all) = (Vec::new(), Vec::new());
    for _ in 0..12 * reps {
        let (t, c, m, s) = (Instant::now(), cpu_time(), machine_busy(), self_busy());
        f();
        let wall = t.elapsed().as_secs_f64();
        let other = (machine_busy() - m) - (self_busy() - s);
        let v = if cpu {
            (cpu_time() - c) / threads
        } else {
            wall
        };
        all.push(v);
        if other <= 0.03 * wall + 0.011 {
            quiet.push(v);
        }
        if quiet.len() >= reps || (cpu && all.len() >= reps) {
            break;
        }
    }
    if cpu || quiet.len() >= reps.div_ceil(2) {
        (median(if cpu { all } else { quiet }), true)
    } else {
        (median(all), false)
    }
}

/// The preset whose levels are timed: `DMKD_PRESET` (default retinanet).
fn preset() -> Preset {
    let name = std::env::var("DMKD_PRESET").unwrap_or_else(|_| "retinanet".into());
    Preset::named(&name).expect("DMKD_PRESET: a preset name")
}

/// The mask the `preset` loss draws for `branch` at `level`, from its
/// synthetic teacher (N = 2, 256 channels, as `run` times).
fn loss_mask<T: Float>(preset: &Preset, level: usize, branch: Branch) -> dmkd::InputMask<T> {
    let (ms, mc) = loss_masks::<T>(preset, level, 0).unwrap();
    match branch {
        Branch::Spatial => dmkd::InputMask::Spatial(ms),
        Branch::Channel => dmkd::InputMask::Channel(mc),
    }
}

/// The mask the environment variable `var` asks for: a fraction (the
/// synthetic pattern `by_ratio` makes of it) or `loss` (any other value:
/// the preset loss's own mask at `level`); None when it is not set.
fn env_mask<T: Float>(
    var: &str,
    preset: &Preset,
    level: usize,
    branch: Branch,
    by_ratio: impl Fn(f64) -> dmkd::InputMask<T>,
) -> Option<dmkd::InputMask<T>> {
    std::env::var(var).ok().map(|v| match v.parse::<f64>() {
        Ok(ratio) => by_ratio(ratio),
        Err(_) => loss_mask::<T>(preset, level, branch),
    })
}

/// Level, flops, median seconds of (fwd, dX, dW) and whether each was quiet.
type Row = (String, f64, [(f64, bool); 3]);

/// `DMKD_ISA=auto|avx512|avx2|neon|scalar` (default auto): the instruction set
/// the kernels run on and the peak probe uses.
fn isa() -> Isa {
    std::env::var("DMKD_ISA").map_or(Isa::Auto, |s| {
        s.parse()
            .expect("DMKD_ISA: auto, avx512, avx2, neon or scalar")
    })
}

/// Median seconds of (fwd, dX, dW) per level.
fn run<T: Float>(reps: usize, levels: &[&str]) -> Vec<Row>
where
    CpuBackend: Backend<T>,
{
    // DMKD_ALGO=direct|winograd|auto (default direct).
    let algo = std::env::var("DMKD_ALGO")
        .ok()
        .map(|a| {
            a.parse::<ConvAlgo>()
                .expect("DMKD_ALGO: direct, winograd or auto")
        })
        .unwrap_or(ConvAlgo::Direct);
    let be = CpuBackend::with_isa(algo, isa()).expect("DMKD_ISA: this CPU runs it");
    let (n, c) = (2, 256);
    // DMKD_CIN=1: input channels (default 256), e.g. the one-channel conv
    // of the generator's split second conv (`distill::generator`).
    let c_in: usize = std::env::var("DMKD_CIN")
        .ok()
        .map_or(c, |v| v.parse().expect("DMKD_CIN: a channel count"));
    let mut out = Vec::new();
    let preset = preset();
    for (name, &(h, w)) in preset.level_names.iter().zip(&preset.levels) {
        if !levels.contains(&name.as_str()) {
            continue;
        }
        let geom = ConvGeometry::new(&[n, c_in, h, w], &[c, c_in, 3, 3], [1, 1], [1, 1]).unwrap();
        let values = |len: usize, seed: usize| -> Vec<T> {
            (0..len)
                .map(|i| {
                    T::from_f64((((i * 7919 + seed * 104729) % 2001) as f64 - 1000.0) / 1000.0)
                })
                .collect()
        };
        let x = Tensor::from_vec(&geom.input_shape(), values(n * c_in * h * w, 1)).unwrap();
        let wt = Tensor::from_vec(&geom.weight_shape(), values(c * c_in * 9, 2)).unwrap();
        let b = Tensor::from_vec(&[c], values(c, 3)).unwrap();
        let dy = Tensor::from_vec(&geom.output_shape(), values(n * c * h * w, 4)).unwrap();
        // DMKD_CHMASK=0.65: a channel mask zeroing that fraction of each
        // image's channels (the DMKD channel branch's first conv).
        // DMKD_SPMASK=0.65: a spatial mask zeroing that fraction of the rows
        // (a blob, as attention masks are; a best case for tile skipping).
        // `loss` instead of a fraction: the loss's own mask at this level.
        let level = preset.level_names.iter().position(|l| l == name).unwrap();
        // 0 where `x < limit`, 1 elsewhere.
        let zero_below = |x: f64, limit: f64| T::from_f64(if x < limit { 0.0 } else { 1.0 });
        let spmask = env_mask::<T>("DMKD_SPMASK", &preset, level, Branch::Spatial, |ratio| {
            let m = Tensor::from_fn(&[n, h, w], |i| {
                zero_below(((i % (h * w)) / w) as f64, ratio * h as f64)
            });
            dmkd::InputMask::Spatial(m.unwrap())
        });
        let mask = env_mask::<T>("DMKD_CHMASK", &preset, level, Branch::Channel, |ratio| {
            let m = Tensor::from_fn(&[n, c_in], |i| {
                zero_below(
                    (((i % c_in) * 7919 + i / c_in * 31) % c_in) as f64,
                    ratio * c_in as f64,
                )
            });
            dmkd::InputMask::Channel(m.unwrap())
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
        let mut row = [(f64::INFINITY, true); 3];
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
        if args.mask.is_some() {
            // The work the mask leaves, per pass: the multiply-adds of one
            // call (`CpuBackend::counters`) over the dense direct conv's
            // (Winograd's dense passes keep 36/144 = 0.25 of those).
            be.take_counters();
            drop(be.conv2d(&x, &wt, Some(&b), &args).unwrap());
            drop(be.conv2d_backward_input(&dy, &wt, &args).unwrap());
            drop(be.conv2d_backward_weight(&dy, &x, &args).unwrap());
            let c = be.take_counters();
            let dense = geom.macs() as f64;
            println!(
                "{name}: multiply-adds under the mask over the dense direct conv's: forward {:.3}, input gradient {:.3}, weight gradient {:.3}",
                c.forward.macs as f64 / dense,
                c.input_grad.macs as f64 / dense,
                c.weight_grad.macs as f64 / dense
            );
        }
        out.push((name.clone(), flops, row));
    }
    out
}

fn print(rows: &[Row], peak: f64) {
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
        for &(t, quiet) in row {
            let g = flops / t / 1e9;
            let flag = if quiet { ' ' } else { '*' };
            print!(
                " {:>10.2} {:>9.1} {:>6.1}%{flag} ",
                t * 1e3,
                g,
                100.0 * g / peak
            );
        }
        println!();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let all = preset().level_names;
    let levels: Vec<&str> = args
        .get(2)
        .map(|s| s.split(',').collect())
        .unwrap_or_else(|| all.iter().map(String::as_str).collect());
    let f64_too = args.iter().any(|a| a == "f64");
    let threads = rayon::current_num_threads();
    let peak_before = fma_peak_gflops_on(isa(), threads).expect("DMKD_ISA: this CPU runs it");
    // Let the probe's threads be reaped before CPU times are read.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let r32 = run::<f32>(reps, &levels);
    let r64 = if f64_too {
        run::<f64>(reps, &levels)
    } else {
        Vec::new()
    };
    let peak_after = fma_peak_gflops_on(isa(), threads).expect("DMKD_ISA: this CPU runs it");
    // The higher probe: percentages are then never flattered by a probe
    // that happened to run while the machine was busy.
    let peak = peak_before.max(peak_after);
    println!(
        "threads {threads}, FMA peak (f32) {peak:.1} GFLOP/s (probes before/after: {peak_before:.1} / {peak_after:.1})"
    );
    print(&r32, peak);
    println!("(* = fewer than half the runs were quiet: the machine was busy)");
    if f64_too {
        println!("f64 (peak: half the f32 figure, {:.1})", peak / 2.0);
        print(&r64, peak / 2.0);
    }
}
