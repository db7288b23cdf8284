//! `dmkd bench`: timings of the conv kernels and the whole loss at the
//! FPN presets, with an FMA peak probe in the same process.
//!
//! Every row is the median of `reps` timed runs after one warm-up, with the
//! fastest and slowest of them (a wide spread says the host was busy). The
//! FMA peak is probed before the rows and again after them (the text
//! table's "% peak" is of the higher: [`BenchReport::peak_for_percent`]). GFLOP/s
//! use the direct-conv FLOP model, `2 * 9 * N * H * W * Cin * Cout` per
//! conv3x3 pass, whatever the algorithm (so Winograd or mask-aware
//! kernels may show more than the FMA peak: "effective" GFLOP/s). The
//! whole DMKD forward counts 4 conv3x3 passes per level, forward and
//! backward 12 (each of the 4 convs has forward, input grad, weight grad).
//!
//! With `counters` (CPU backend only), each row also carries the work
//! counters of one more, untimed call (`CpuBackend::counters`): the
//! algorithm per pass, the multiply-adds actually issued, and what mask
//! skipping and weight packing did.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use dmkd::backend::cpu::{WorkCounters, fma_peak_gflops_on};
use dmkd::backend::{
    Backend, BackendKind, BackendOptions, BackendRef, ConvArgs, ConvGeometry, CpuBackend, Isa,
    make_backend,
};
use dmkd::distill::{evaluate, forward};
use dmkd::error::{Error, Result};
use dmkd::synthetic::{self, Preset};
use dmkd::tensor::Tensor;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub preset: Preset,
    pub threads: usize,
    pub reps: usize,
    pub backend: BackendOptions,
    /// Time the per-level conv kernels.
    pub convs: bool,
    /// Time the whole loss.
    pub loss: bool,
    /// Report the work counters of each row (CPU backend only).
    pub counters: bool,
}

/// One timed row.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub name: String,
    pub ms_median: f64,
    /// The fastest of the timed runs.
    pub ms_min: f64,
    /// The slowest of the timed runs.
    pub ms_max: f64,
    /// At the median time.
    pub gflops: f64,
    /// The work of one call, when counting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<WorkCounters>,
}

/// The `--json` object.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub preset: String,
    pub threads: usize,
    pub backend: String,
    pub conv_algo: String,
    /// The CPU's model name (`/proc/cpuinfo`).
    pub cpu: String,
    /// The instruction set the CPU kernels dispatched to (`-` for other
    /// backends).
    pub isa: String,
    /// The FMA peak probe on that instruction set (the widest one for the
    /// reference backend; none for CUDA).
    pub fma_peak_gflops: Option<f64>,
    /// The same probe again after the rows: a host that slowed down (or
    /// sped up) while the rows ran shows as a difference between the two.
    pub fma_peak_gflops_after: Option<f64>,
    /// The probe on the widest instruction set, when `--isa` named a
    /// narrower one: the machine's peak, for comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub widest_fma_peak_gflops: Option<f64>,
    pub peak_rss_mib: f64,
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    /// The probe the text table's "% peak" divides by: the higher of the
    /// two. A probe is register-only and short, so a reading far below the
    /// other one is the host pausing this guest during it, not the chip's
    /// rate (seen on an AMD EPYC Zen 4 guest: 117 GFLOP/s before the rows,
    /// 235 after, the rows themselves at their usual speed).
    pub fn peak_for_percent(&self) -> Option<f64> {
        match (self.fma_peak_gflops, self.fma_peak_gflops_after) {
            (Some(b), Some(a)) => Some(b.max(a)),
            (b, a) => b.or(a),
        }
    }

    /// The text table's line naming the two probes, in the order taken.
    pub fn probe_line(&self) -> String {
        match (self.fma_peak_gflops, self.fma_peak_gflops_after) {
            (Some(b), Some(a)) => format!(
                "FMA peak probe: {b:.1} GFLOP/s before the rows, {a:.1} after (same process); \
                 % peak is of the higher"
            ),
            _ => "FMA peak probe: n/a on this backend".into(),
        }
    }
}

/// The CPU's model name, from `/proc/cpuinfo` (`unknown` elsewhere).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| cpu_model_of(&s))
        .unwrap_or_else(|_| "unknown".into())
}

/// The model name of the first processor in `cpuinfo`, with its x86 family
/// and model numbers: virtual machines often hide the name (two different
/// chips, a Zen 3 and a Zen 5, both read "AMD EPYC"), and a figure must
/// say which chip it was measured on.
fn cpu_model_of(cpuinfo: &str) -> String {
    let first = cpuinfo.split("\n\n").next().unwrap_or("");
    let field = |key: &str| {
        first.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let name = field("model name").unwrap_or_else(|| "unknown".into());
    match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("{name} (family {f}, model {m})"),
        _ => name,
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`; NaN
/// where there is none).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status").map_or(f64::NAN, |s| peak_rss_mib_of(&s))
}

/// The `VmHWM` line of a `/proc/<pid>/status` text (kB) in MiB, or NaN.
fn peak_rss_mib_of(status: &str) -> f64 {
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Milliseconds of `reps` timed runs: their median, fastest and slowest.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Timing {
    median: f64,
    min: f64,
    max: f64,
}

impl Timing {
    /// Of a non-empty set of run times (sorted once for all three; an
    /// even count's median is the mean of the middle two).
    fn of(mut v: Vec<f64>) -> Timing {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Timing {
            median: if n % 2 == 1 {
                v[n / 2]
            } else {
                0.5 * (v[n / 2 - 1] + v[n / 2])
            },
            min: v[0],
            max: v[n - 1],
        }
    }

    /// A row of `gflop` per run.
    fn row(self, name: String, gflop: f64, counters: Option<WorkCounters>) -> BenchRow {
        BenchRow {
            name,
            ms_median: self.median,
            ms_min: self.min,
            ms_max: self.max,
            gflops: gflop / (self.median / 1e3),
            counters,
        }
    }
}

/// Milliseconds of `f` over `reps` runs after one warm-up. `sync` waits
/// for a device backend to finish before the clock is read.
fn time_ms(
    reps: usize,
    sync: &dyn Fn() -> Result<()>,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    f()?;
    sync()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        sync()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Timing::of(v))
}

/// The counters of one more, untimed call of `f`, when counting.
fn count(cpu: Option<&CpuBackend>, f: impl FnOnce() -> Result<()>) -> Result<Option<WorkCounters>> {
    match cpu {
        Some(cpu) => {
            cpu.reset_counters();
            f()?;
            Ok(Some(cpu.take_counters()))
        }
        None => Ok(None),
    }
}

fn device_sync(kind: BackendKind) -> Box<dyn Fn() -> Result<()>> {
    match kind {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Box::new(dmkd::backend::cuda::synchronize),
        _ => Box::new(|| Ok(())),
    }
}

fn conv_rows(
    opts: &BenchOptions,
    be: &BackendRef<f32>,
    cpu: Option<&CpuBackend>,
    sync: &dyn Fn() -> Result<()>,
) -> Result<Vec<BenchRow>> {
    let p = &opts.preset;
    let mut rows = Vec::new();
    let mut rng = dmkd::rng::PhiloxStream::new(1, 0);
    for (&(h, w), name) in p.levels.iter().zip(&p.level_names) {
        let (n, c) = (p.n, p.c);
        let x = Tensor::<f32>::from_fn(&[n, c, h, w], |_| rng.uniform(-1.0, 1.0) as f32)?;
        let wt = Tensor::<f32>::from_fn(&[c, c, 3, 3], |_| rng.uniform(-0.05, 0.05) as f32)?;
        let b = Tensor::<f32>::from_fn(&[c], |_| rng.uniform(-0.1, 0.1) as f32)?;
        let dy = Tensor::<f32>::from_fn(&[n, c, h, w], |_| rng.uniform(-1.0, 1.0) as f32)?;
        let args = ConvArgs {
            geom: ConvGeometry::new(x.shape(), wt.shape(), [1, 1], [1, 1])?,
            mask: None,
            relu: false,
        };
        let gflop = 2.0 * args.geom.macs() as f64 / 1e9;
        let be: &dyn Backend<f32> = &**be;
        let fwd = || be.conv2d(&x, &wt, Some(&b), &args).map(drop);
        let dx = || be.conv2d_backward_input(&dy, &wt, &args).map(drop);
        let dw = || be.conv2d_backward_weight(&dy, &x, &args).map(drop);
        let passes: [(&str, &dyn Fn() -> Result<()>); 3] =
            [("forward", &fwd), ("input_grad", &dx), ("weight_grad", &dw)];
        for (kind, f) in passes {
            let t = time_ms(opts.reps, sync, f)?;
            rows.push(t.row(format!("conv3x3.{name}.{kind}"), gflop, count(cpu, f)?));
        }
    }
    Ok(rows)
}

fn loss_rows(
    opts: &BenchOptions,
    be: &BackendRef<f32>,
    cpu: Option<&CpuBackend>,
    sync: &dyn Fn() -> Result<()>,
) -> Result<Vec<BenchRow>> {
    let p = &opts.preset;
    let problem = synthetic::problem::<f32>(p, 0)?;
    let pass_gflop = 2.0 * p.conv3x3_macs() as f64 / 1e9;
    let run_fwd = || forward(be.clone(), &problem).map(drop);
    let run_both = || evaluate(be.clone(), &problem).map(drop);
    let fwd = time_ms(opts.reps, sync, run_fwd)?;
    let fwd_counters = count(cpu, run_fwd)?;
    let both = time_ms(opts.reps, sync, run_both)?;
    let both_counters = count(cpu, run_both)?;
    Ok(vec![
        fwd.row("dmkd.forward".into(), 4.0 * pass_gflop, fwd_counters),
        both.row(
            "dmkd.forward_backward".into(),
            12.0 * pass_gflop,
            both_counters,
        ),
    ])
}

/// Run the benchmark in a pool of `opts.threads` threads.
pub fn run_bench(opts: &BenchOptions) -> Result<BenchReport> {
    // Options the backend would refuse, refused before the peak probe.
    opts.backend.check()?;
    // `--reps` and `--threads` are at least 1 (the CLI's value parsers).
    if opts.counters && opts.backend.kind != BackendKind::Cpu {
        return Err(Error::arg(
            "bench",
            "--counters needs --backend cpu (only the CPU backend counts its work)",
        ));
    }
    let pool = dmkd::threads::pool("bench", opts.threads)?;
    pool.install(|| {
        // The instruction set the kernels run on: the one asked for (an
        // error if this CPU lacks it), `Auto` resolved.
        let isa = match opts.backend.kind {
            BackendKind::Cpu => Some(opts.backend.isa.resolve()?),
            _ => None,
        };
        let widest = Isa::Auto.resolve()?;
        let probe = || match opts.backend.kind {
            BackendKind::Cuda => Ok(None),
            _ => fma_peak_gflops_on(isa.unwrap_or(widest), opts.threads).map(Some),
        };
        let peak = probe()?;
        let widest_peak = match isa {
            Some(isa) if isa != widest => Some(fma_peak_gflops_on(widest, opts.threads)?),
            _ => None,
        };
        // When counting, the CPU backend is built here to keep a handle on
        // its counters (`make_backend` builds the same one).
        let cpu = match opts.counters {
            true => Some(Arc::new(CpuBackend::with_isa(
                opts.backend.conv_algo,
                opts.backend.isa,
            )?)),
            false => None,
        };
        let be: BackendRef<f32> = match &cpu {
            Some(cpu) => cpu.clone(),
            None => make_backend::<f32>(opts.backend)?,
        };
        let sync = device_sync(opts.backend.kind);
        let mut rows = Vec::new();
        if opts.convs {
            rows.extend(conv_rows(opts, &be, cpu.as_deref(), &*sync)?);
        }
        if opts.loss {
            rows.extend(loss_rows(opts, &be, cpu.as_deref(), &*sync)?);
        }
        let peak_after = probe()?;
        Ok(BenchReport {
            preset: opts.preset.name.to_string(),
            threads: opts.threads,
            backend: be.name(),
            conv_algo: match opts.backend.kind {
                BackendKind::Cpu => opts.backend.conv_algo.to_string(),
                _ => "-".into(),
            },
            cpu: cpu_model(),
            isa: isa.map_or("-".into(), |i| i.to_string()),
            fma_peak_gflops: peak,
            fma_peak_gflops_after: peak_after,
            widest_fma_peak_gflops: widest_peak,
            peak_rss_mib: peak_rss_mib(),
            rows,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::{
        BenchReport, Timing, count, cpu_model, cpu_model_of, peak_rss_mib, peak_rss_mib_of, time_ms,
    };
    use dmkd::ConvAlgo;
    use dmkd::backend::{Backend, ConvArgs, ConvGeometry, CpuBackend};
    use dmkd::tensor::Tensor;

    #[test]
    fn peak_rss_is_the_vmhwm_line_in_mib() {
        let status = "Name:\tdmkd\nVmPeak:\t  999999 kB\nVmHWM:\t  204800 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(peak_rss_mib_of(status), 200.0);
        assert_eq!(peak_rss_mib_of("VmHWM:\t 1536 kB"), 1.5);
        assert!(peak_rss_mib_of("VmRSS:\t 1024 kB\n").is_nan());
        assert!(peak_rss_mib_of("VmHWM:\t lots kB\n").is_nan());
        // This process: a test binary with its threads holds more than 2 MiB
        // and far less than a terabyte.
        if std::path::Path::new("/proc/self/status").exists() {
            let mib = peak_rss_mib();
            assert!(mib > 2.0 && mib < 1e6, "{mib}");
        }
    }

    #[test]
    fn time_ms_warms_up_once_then_times_each_run_in_milliseconds() {
        let calls = std::cell::Cell::new(0);
        let synced = std::cell::Cell::new(0);
        let sync = || {
            synced.set(synced.get() + 1);
            Ok(())
        };
        let t = time_ms(3, &sync, || {
            calls.set(calls.get() + 1);
            std::thread::sleep(std::time::Duration::from_millis(5));
            Ok(())
        })
        .unwrap();
        assert_eq!((calls.get(), synced.get()), (4, 4));
        // Each run sleeps 5 ms: at least 5 in milliseconds, and nowhere
        // near a second unless the host stalls the thread for that long
        // (seconds, or seconds scaled or offset wrongly, read far less or
        // far more).
        assert!(t.min >= 5.0 && t.max < 500.0, "{t:?}");
        // An error of the function stops the timing.
        let e = time_ms(3, &sync, || Err(dmkd::Error::arg("f", "no"))).unwrap_err();
        assert!(e.to_string().contains("no"), "{e}");
    }

    #[test]
    fn count_reports_the_work_of_one_call_only_when_counting() {
        let cpu = CpuBackend::new(ConvAlgo::Direct);
        let x = Tensor::<f32>::from_fn(&[1, 2, 4, 4], |i| i as f32).unwrap();
        let w = Tensor::<f32>::from_fn(&[3, 2, 3, 3], |i| i as f32).unwrap();
        let args = ConvArgs {
            geom: ConvGeometry::new(x.shape(), w.shape(), [1, 1], [1, 1]).unwrap(),
            mask: None,
            relu: false,
        };
        let call = || cpu.conv2d(&x, &w, None, &args).map(drop);
        call().unwrap(); // counted work before `count` is not reported
        let c = count(Some(&cpu), call).unwrap().expect("counting");
        assert_eq!(c.forward.direct_calls, 1);
        assert_eq!(c.forward.macs, args.geom.macs());
        assert_eq!(c.input_grad.direct_calls + c.weight_grad.direct_calls, 0);
        let mut ran = false;
        assert!(
            count(None, || {
                ran = true;
                Ok(())
            })
            .unwrap()
            .is_none()
        );
        assert!(!ran, "an uncounted extra call ran");
    }

    #[test]
    fn a_timing_holds_the_median_the_fastest_and_the_slowest_run() {
        let t = Timing::of(vec![4.0, 1.0, 9.0, 2.0, 3.0]);
        assert_eq!(
            t,
            Timing {
                median: 3.0,
                min: 1.0,
                max: 9.0
            }
        );
        // An even count: the mean of the middle two.
        let t = Timing::of(vec![4.0, 1.0, 9.0, 2.0]);
        assert_eq!(
            t,
            Timing {
                median: 3.0,
                min: 1.0,
                max: 9.0
            }
        );
        let one = Timing::of(vec![2.5]);
        assert_eq!(
            one,
            Timing {
                median: 2.5,
                min: 2.5,
                max: 2.5
            }
        );
        // GFLOP/s at the median: 3 GFLOP in 3 ms.
        let row = Timing::of(vec![1.0, 3.0, 5.0]).row("r".into(), 3.0, None);
        assert_eq!((row.ms_min, row.ms_median, row.ms_max), (1.0, 3.0, 5.0));
        assert_eq!(row.gflops, 1000.0);
        assert_eq!(row.name, "r");
    }

    #[test]
    fn cpu_model_reads_this_machines_cpuinfo() {
        match std::fs::read_to_string("/proc/cpuinfo") {
            Ok(info) => assert_eq!(cpu_model(), cpu_model_of(&info)),
            Err(_) => assert_eq!(cpu_model(), "unknown"),
        }
    }

    #[test]
    fn cpu_model_names_family_and_model_of_the_first_processor() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n\
                    model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 25\n\
                    model\t\t: 1\nmodel name\t: Other\n";
        assert_eq!(cpu_model_of(info), "AMD EPYC (family 26, model 2)");
        // No family (not x86): the name alone; nothing at all: unknown.
        assert_eq!(cpu_model_of("model name\t: Some CPU\n"), "Some CPU");
        assert_eq!(cpu_model_of(""), "unknown");
    }

    #[test]
    fn percent_of_peak_divides_by_the_higher_probe_and_the_text_names_both() {
        let report = |before, after| BenchReport {
            preset: "tiny".into(),
            threads: 2,
            backend: "cpu".into(),
            conv_algo: "auto".into(),
            cpu: "unknown".into(),
            isa: "avx2".into(),
            fma_peak_gflops: before,
            fma_peak_gflops_after: after,
            widest_fma_peak_gflops: None,
            peak_rss_mib: 1.0,
            rows: Vec::new(),
        };
        assert_eq!(
            report(Some(117.0), Some(235.0)).peak_for_percent(),
            Some(235.0)
        );
        assert_eq!(
            report(Some(235.0), Some(117.0)).peak_for_percent(),
            Some(235.0)
        );
        assert_eq!(report(Some(80.0), None).peak_for_percent(), Some(80.0));
        assert_eq!(report(None, Some(90.0)).peak_for_percent(), Some(90.0));
        assert_eq!(report(None, None).peak_for_percent(), None);
        // The text names each probe where it was taken, whichever is higher.
        assert_eq!(
            report(Some(117.0), Some(235.0)).probe_line(),
            "FMA peak probe: 117.0 GFLOP/s before the rows, 235.0 after (same process); \
             % peak is of the higher"
        );
        assert_eq!(
            report(None, None).probe_line(),
            "FMA peak probe: n/a on this backend"
        );
    }
}
