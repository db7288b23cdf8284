//! The dmkd command line. It parses arguments, calls the library and prints;
//! no math lives here. Every failure prints one line and exits non-zero.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use dmkd::backend::{BackendFloat, BackendKind, BackendOptions, make_backend};
use dmkd::bench::{BenchOptions, run_bench};
use dmkd::demo::{DemoOptions, run_demo};
use dmkd::distill::{Config, EvalOptions, Problem, TensorMap, evaluate};
use dmkd::gradcheck::{loss_cases, op_cases, run_suite};
use dmkd::io::{TensorFile, read_tensor_file, write_safetensors};
use dmkd::synthetic::{Preset, inputs};
use dmkd::verify::{Status, Tolerance, compare};
use dmkd::{ConvAlgo, DType, Error, Result};

#[derive(Parser)]
#[command(
    name = "dmkd",
    version,
    about = "Dual Masked Knowledge Distillation loss: demo, eval, verify, golden, gradcheck, bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Copy)]
struct BackendArgs {
    /// Kernels: cpu (fast, default), reference (plain loops) or cuda.
    #[arg(long, default_value = "cpu")]
    backend: BackendKind,
    /// Convolution algorithm of the cpu backend.
    #[arg(long, default_value = "auto")]
    conv_algo: ConvAlgo,
}

impl BackendArgs {
    fn options(self) -> BackendOptions {
        BackendOptions {
            kind: self.backend,
            conv_algo: self.conv_algo,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train with DMKD on built-in synthetic FPN features (the main job).
    Demo {
        #[arg(long, default_value_t = 300)]
        steps: usize,
        /// Problem size: demo (default), tiny, retinanet, two-stage, non-square.
        #[arg(long, default_value = "demo")]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// Directory for loss.csv and loss.png.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Compute the loss and every gradient for inputs in the exchange format.
    Eval {
        /// Level config (JSON); defaults to the `config` metadata of --inputs.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Students, teachers (and FGD boxes): .safetensors, .npz, .npy, or a directory of .npy files.
        #[arg(long)]
        inputs: PathBuf,
        /// Parameters; absent ones are initialised from --init-seed and written out.
        #[arg(long)]
        params: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Compute precision (default: the precision of --inputs).
        #[arg(long)]
        dtype: Option<DType>,
        /// Seed of the initialisation of missing parameters.
        #[arg(long, default_value_t = 0)]
        init_seed: u64,
        /// Fail instead of initialising missing parameters.
        #[arg(long)]
        no_init: bool,
        /// Ignore tensors that are neither inputs nor parameters.
        #[arg(long)]
        allow_extra: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Compare an implementation's outputs with expected ones, tensor by tensor.
    Verify {
        #[arg(long)]
        expected: PathBuf,
        #[arg(long)]
        actual: PathBuf,
        /// Relative tolerance per element.
        #[arg(long, default_value_t = 1e-5)]
        rtol: f64,
        /// Absolute tolerance per element.
        #[arg(long, default_value_t = 0.0)]
        atol: f64,
        /// Absolute tolerance per element in units of the tensor's largest |expected|.
        #[arg(long, default_value_t = 1e-5)]
        stol: f64,
        /// Tensors only the actual file holds do not fail the check.
        #[arg(long)]
        allow_extra: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export golden vectors (inputs, parameters, loss, every gradient) for other backends.
    Golden {
        /// Problem size (tiny by default; see `demo --help`).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Level config (JSON); defaults to the preset's DMKD config.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "f64")]
        dtype: DType,
        /// A .safetensors file, or a directory of .npy files (one per tensor).
        #[arg(long)]
        out: PathBuf,
        /// safetensors or npy.
        #[arg(long, default_value = "safetensors")]
        format: String,
        #[command(flatten)]
        backend: GoldenBackend,
    },
    /// Time the conv kernels and the whole loss at an FPN preset (f32).
    Bench {
        /// retinanet (default), two-stage or non-square.
        #[arg(long, default_value = "retinanet")]
        preset: String,
        /// Worker threads (the FMA peak probe uses as many).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Timed repetitions per row (median reported), after one warm-up.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Only the conv rows, or only the loss rows.
        #[arg(long)]
        only: Option<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Also report each row's work counters (algorithm per pass,
        /// multiply-adds, tiles and channels skipped by masks, weights
        /// packed), from one more untimed call; CPU backend only.
        #[arg(long)]
        counters: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Check every op's and loss's gradient against central finite differences (f64).
    Gradcheck {
        /// Random cases per op.
        #[arg(long, default_value_t = 8)]
        cases: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Backend whose kernels are checked.
        #[arg(long, default_value = "reference")]
        backend: BackendKind,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone, Copy)]
struct GoldenBackend {
    /// Golden files come from the reference backend unless told otherwise.
    #[arg(long, default_value = "reference")]
    backend: BackendKind,
}

fn json_string<S: serde::Serialize>(v: &S) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::Config(e.to_string()))
}

fn read_config(path: &Path) -> Result<Config> {
    use std::io::Read;
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    // Read at most one byte past the limit, so `--config /dev/zero` or a
    // huge file is refused by `from_json` instead of read forever.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(dmkd::distill::config::MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::Config(format!("{} is not UTF-8 text", path.display())))?;
    Config::from_json(&text)
}

fn demo(opts: DemoOptions, dtype: DType) -> Result<bool> {
    let bar = indicatif::ProgressBar::new(opts.steps as u64 + 1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps, loss {msg} [{elapsed}]",
        )
        .expect("static template"),
    );
    let tick = |_: usize, loss: f64| {
        bar.set_message(format!("{loss:.4e}"));
        bar.inc(1);
    };
    let report = match dtype {
        DType::F32 => run_demo::<f32>(&opts, tick)?,
        DType::F64 => run_demo::<f64>(&opts, tick)?,
    };
    bar.finish();
    println!(
        "DMKD demo: preset {}, {} steps, {} backend, {} ({:.1} s)",
        opts.preset.name,
        report.steps,
        opts.backend.kind_name(),
        dtype,
        report.seconds
    );
    println!(
        "{:<6} {:>12} {:>12} {:>9} {:>8} {:>8}",
        "level", "loss@0", "loss@end", "fell", "w_s", "w_c"
    );
    for (l, name) in report.level_names.iter().enumerate() {
        let (a, b) = (report.initial_level_losses[l], report.final_level_losses[l]);
        let (ws, wc) = report.fusion_weights[l];
        println!(
            "{:<6} {:>12.4e} {:>12.4e} {:>8.1}x {:>8.4} {:>8.4}",
            name,
            a,
            b,
            a / b,
            ws,
            wc
        );
    }
    println!(
        "{:<6} {:>12.4e} {:>12.4e} {:>8.1}x",
        "total",
        report.initial_loss,
        report.final_loss,
        report.initial_loss / report.final_loss
    );
    println!(
        "loss curve: {} and {}",
        report.csv.display(),
        report.png.display()
    );
    Ok(true)
}

/// Inputs (and parameters) from files, in the compute precision.
fn load_problem_tensors<T: dmkd::Float>(files: &[&TensorFile]) -> TensorMap<T> {
    let mut m = TensorMap::new();
    for f in files {
        m.extend(f.to_map::<T>());
    }
    m
}

#[allow(clippy::too_many_arguments)]
fn eval_typed<T: BackendFloat>(
    config: &Config,
    files: &[&TensorFile],
    out: &Path,
    opts: EvalOptions,
    backend: BackendOptions,
) -> Result<bool> {
    let tensors = load_problem_tensors::<T>(files);
    let problem = Problem::new(config, &tensors, opts)?;
    let eval = evaluate(make_backend::<T>(backend)?, &problem)?;
    let mut outputs = eval.outputs;
    outputs.extend(eval.params);
    let meta = HashMap::from([
        ("config".to_string(), config.to_json()),
        ("dtype".to_string(), T::DTYPE.to_string()),
    ]);
    write_safetensors(out, &outputs, &meta)?;
    println!("loss {:.10e}", eval.loss);
    for (l, v) in eval.level_losses.iter().enumerate() {
        println!("p{l}.loss {v:.10e}");
    }
    println!("wrote {} tensors to {}", outputs.len(), out.display());
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
fn eval(
    config: Option<PathBuf>,
    inputs: PathBuf,
    params: Option<PathBuf>,
    out: PathBuf,
    dtype: Option<DType>,
    init_seed: u64,
    no_init: bool,
    allow_extra: bool,
    backend: BackendOptions,
) -> Result<bool> {
    let input_file = read_tensor_file(&inputs)?;
    let param_file = params.as_deref().map(read_tensor_file).transpose()?;
    let config = match (&config, input_file.metadata.get("config")) {
        (Some(p), _) => read_config(p)?,
        (None, Some(text)) => Config::from_json(text)?,
        (None, None) => {
            return Err(Error::Config(format!(
                "no --config given and {} carries no `config` metadata",
                inputs.display()
            )));
        }
    };
    let file_dtype = input_file.dtype(&inputs.display().to_string())?;
    if let Some(pf) = &param_file {
        pf.dtype(&params.as_ref().expect("set").display().to_string())?;
    }
    let dtype = dtype.or(file_dtype).unwrap_or(DType::F32);
    let mut files = vec![&input_file];
    files.extend(param_file.as_ref());
    let opts = EvalOptions {
        init_seed: (!no_init).then_some(init_seed),
        allow_extra,
    };
    match dtype {
        DType::F32 => eval_typed::<f32>(&config, &files, &out, opts, backend),
        DType::F64 => eval_typed::<f64>(&config, &files, &out, opts, backend),
    }
}

fn verify(
    expected: PathBuf,
    actual: PathBuf,
    tol: Tolerance,
    allow_extra: bool,
    json: bool,
) -> Result<bool> {
    let e = read_tensor_file(&expected)?;
    let a = read_tensor_file(&actual)?;
    let report = compare(&e, &a, tol, allow_extra);
    if json {
        println!("{}", json_string(&report)?);
        return Ok(report.passed);
    }
    println!(
        "verify {} against {} (pass: |a - e| <= {:e} + {:e} |e| + {:e} max|e|)",
        actual.display(),
        expected.display(),
        tol.atol,
        tol.rtol,
        tol.stol
    );
    println!(
        "{:<34} {:>5} {:>11} {:>11} {:>11} {:>14} {:>10}  status",
        "tensor", "dtype", "max abs", "max rel", "norm rel", "worst at", "ulp"
    );
    for r in &report.tensors {
        let dtype = r.actual_dtype.map_or("-".to_string(), |d| d.to_string());
        let status = match r.status {
            Status::Pass => "ok".to_string(),
            Status::Fail => format!("FAIL ({})", r.detail),
            Status::Missing => "MISSING".to_string(),
            Status::Extra => "EXTRA".to_string(),
            Status::ShapeMismatch => format!("SHAPE ({})", r.detail),
        };
        println!(
            "{:<34} {:>5} {:>11.3e} {:>11.3e} {:>11.3e} {:>14} {:>10}  {}",
            r.name,
            dtype,
            r.max_abs_error,
            r.max_rel_error,
            r.norm_rel_error,
            format!("{:?}", r.worst_index),
            r.max_ulp,
            status
        );
    }
    let failed = report
        .tensors
        .iter()
        .filter(|r| r.status != Status::Pass)
        .count();
    println!(
        "{}: {} tensors compared, {failed} failed",
        if report.passed { "PASS" } else { "FAIL" },
        report.tensors.len()
    );
    Ok(report.passed)
}

fn golden_typed<T: BackendFloat>(
    preset: &Preset,
    config: &Config,
    seed: u64,
    out: &Path,
    format: &str,
    backend: BackendOptions,
) -> Result<bool> {
    let tensors: TensorMap<T> = inputs(preset, seed)?;
    let problem = Problem::new(
        config,
        &tensors,
        EvalOptions {
            init_seed: Some(seed),
            allow_extra: false,
        },
    )?;
    let eval = evaluate(make_backend::<T>(backend)?, &problem)?;
    let mut all = tensors;
    all.extend(eval.params);
    all.extend(eval.outputs);
    let meta = HashMap::from([
        ("config".to_string(), config.to_json()),
        ("dtype".to_string(), T::DTYPE.to_string()),
        ("preset".to_string(), preset.name.to_string()),
    ]);
    match format {
        "safetensors" => write_safetensors(out, &all, &meta)?,
        "npy" => dmkd::npy::write_npy_dir(out, &all, &meta)?,
        other => {
            return Err(Error::arg(
                "golden",
                format!("unknown format `{other}` (safetensors or npy)"),
            ));
        }
    }
    println!(
        "golden: {} tensors ({} levels, {}), loss {:.10e}, written to {}",
        all.len(),
        config.levels.len(),
        T::DTYPE,
        eval.loss,
        out.display()
    );
    Ok(true)
}

fn bench(opts: BenchOptions, json: bool) -> Result<bool> {
    let report = run_bench(&opts)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| Error::Config(e.to_string()))?
        );
        return Ok(true);
    }
    let peak = report.fma_peak_gflops;
    println!(
        "bench: preset {}, {} threads, backend {}, conv algo {}, f32",
        report.preset, report.threads, report.backend, report.conv_algo
    );
    match peak {
        Some(p) => println!("FMA peak probe: {p:.1} GFLOP/s (same process)"),
        None => println!("FMA peak probe: n/a on this backend"),
    }
    println!(
        "{:<28} {:>10} {:>10} {:>8}",
        "row", "ms", "GFLOP/s", "% peak"
    );
    for r in &report.rows {
        let pct = peak.map_or("-".to_string(), |p| format!("{:.0}%", 100.0 * r.gflops / p));
        println!(
            "{:<28} {:>10.2} {:>10.1} {:>8}",
            r.name, r.ms_median, r.gflops, pct
        );
    }
    println!("peak RSS: {:.0} MiB", report.peak_rss_mib);
    if report.rows.iter().any(|r| r.counters.is_some()) {
        print_counters(&report.rows);
    }
    Ok(true)
}

/// The work counters of each row, one line per pass that ran.
fn print_counters(rows: &[dmkd::bench::BenchRow]) {
    println!();
    println!(
        "work of one call per row: calls by algorithm (direct, Winograd) and by mask path \
         (channel-sparse, spatial skip); multiply-adds; tiles computed and skipped by \
         masks; (image, channel) pairs skipped; weight values packed"
    );
    println!(
        "{:<28} {:<11} {:>6} {:>6} {:>6} {:>7} {:>10} {:>9} {:>9} {:>8} {:>10}",
        "row",
        "pass",
        "direct",
        "wino",
        "sparse",
        "spatial",
        "GMAC",
        "tiles",
        "skipped",
        "ch.skip",
        "packed"
    );
    for r in rows {
        let Some(c) = &r.counters else { continue };
        for (pass, p) in [
            ("forward", &c.forward),
            ("input_grad", &c.input_grad),
            ("weight_grad", &c.weight_grad),
        ] {
            if p.direct_calls + p.winograd_calls == 0 {
                continue;
            }
            println!(
                "{:<28} {:<11} {:>6} {:>6} {:>6} {:>7} {:>10.3} {:>9} {:>9} {:>8} {:>10}",
                r.name,
                pass,
                p.direct_calls,
                p.winograd_calls,
                p.channel_sparse_calls,
                p.spatial_skip_calls,
                p.macs as f64 / 1e9,
                p.tiles,
                p.tiles_skipped,
                p.channels_skipped,
                p.weights_packed
            );
        }
    }
}

fn gradcheck(cases: usize, seed: u64, backend: BackendKind, json: bool) -> Result<bool> {
    let be = make_backend::<f64>(BackendOptions {
        kind: backend,
        conv_algo: ConvAlgo::Auto,
    })?;
    let mut suite = op_cases();
    suite.extend(loss_cases());
    let rows = run_suite(Arc::clone(&be), &suite, cases, seed)?;
    let all = rows.iter().all(|r| r.passed);
    if json {
        println!("{}", json_string(&rows)?);
        return Ok(all);
    }
    println!(
        "gradient check: {} backend, f64, central differences (h = {:.2e}), rtol {:.0e}",
        be.name(),
        dmkd::gradcheck::STEP,
        dmkd::gradcheck::RTOL
    );
    println!(
        "{:<24} {:>6} {:>16} {:>6}",
        "op", "cases", "max rel error", "pass"
    );
    for r in &rows {
        println!(
            "{:<24} {:>6} {:>16.3e} {:>6}",
            r.op,
            r.cases,
            r.max_rel_error,
            if r.passed { "ok" } else { "FAIL" }
        );
    }
    Ok(all)
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Demo {
            steps,
            preset,
            seed,
            dtype,
            out,
            backend,
        } => {
            let opts = DemoOptions {
                preset: Preset::named(&preset)?,
                steps,
                seed,
                backend: backend.options(),
                out_dir: out,
                ..DemoOptions::default()
            };
            demo(opts, dtype)
        }
        Command::Eval {
            config,
            inputs,
            params,
            out,
            dtype,
            init_seed,
            no_init,
            allow_extra,
            backend,
        } => eval(
            config,
            inputs,
            params,
            out,
            dtype,
            init_seed,
            no_init,
            allow_extra,
            backend.options(),
        ),
        Command::Verify {
            expected,
            actual,
            rtol,
            atol,
            stol,
            allow_extra,
            json,
        } => {
            for (name, v) in [("rtol", rtol), ("atol", atol), ("stol", stol)] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(Error::arg(
                        "verify",
                        format!("--{name} must be finite and >= 0"),
                    ));
                }
            }
            verify(
                expected,
                actual,
                Tolerance { rtol, atol, stol },
                allow_extra,
                json,
            )
        }
        Command::Golden {
            preset,
            config,
            seed,
            dtype,
            out,
            format,
            backend,
        } => {
            let preset = Preset::named(&preset)?;
            let config = match config {
                Some(p) => read_config(&p)?,
                None => preset.config(),
            };
            let opts = BackendOptions {
                kind: backend.backend,
                conv_algo: ConvAlgo::Auto,
            };
            match dtype {
                DType::F32 => golden_typed::<f32>(&preset, &config, seed, &out, &format, opts),
                DType::F64 => golden_typed::<f64>(&preset, &config, seed, &out, &format, opts),
            }
        }
        Command::Bench {
            preset,
            threads,
            reps,
            only,
            json,
            counters,
            backend,
        } => {
            let (convs, loss) = match only.as_deref() {
                None => (true, true),
                Some("conv") => (true, false),
                Some("loss") => (false, true),
                Some(other) => {
                    return Err(Error::arg(
                        "bench",
                        format!("--only {other}: expected conv or loss"),
                    ));
                }
            };
            let opts = BenchOptions {
                preset: Preset::named(&preset)?,
                threads,
                reps,
                backend: backend.options(),
                convs,
                loss,
                counters,
            };
            bench(opts, json)
        }
        Command::Gradcheck {
            cases,
            seed,
            backend,
            json,
        } => gradcheck(cases, seed, backend, json),
    }
}

/// The message on one line: names and paths from files may hold newlines
/// or terminal escapes, shown escaped.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn main() -> ExitCode {
    // A panic is a bug in dmkd, never the user's input; even so the user
    // gets one line (and exit status 101), not a multi-line report.
    std::panic::set_hook(Box::new(|info| {
        eprintln!(
            "error: internal error, please report it: {}",
            one_line(&info.to_string())
        );
    }));
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}
