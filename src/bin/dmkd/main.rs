//! The dmkd command line. It parses arguments (clap's value parsers check
//! them), calls the library and prints; no math lives here. Every failure
//! prints one line and exits non-zero.
//!
//! Modules: `commands` (what each subcommand does and prints), and the
//! helpers only the CLI needs: `bench` (timings), `demo` (the training
//! run), `plot` (loss curves).

mod bench;
mod commands;
mod demo;
mod plot;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use dmkd::backend::{BackendKind, BackendOptions, Isa};
use dmkd::error::one_line;
use dmkd::synthetic::Preset;
use dmkd::verify::Tolerance;
use dmkd::{ConvAlgo, DType, Result};

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
    /// Convolution algorithm of the cpu backend: direct, winograd (F(4x4,
    /// 3x3)), winograd6 (F(6x6, 3x3)) or auto (another backend refuses
    /// anything but auto).
    #[arg(long, default_value = "auto")]
    conv_algo: ConvAlgo,
    /// Instruction set of the cpu backend: auto (the widest this CPU has),
    /// avx512, avx2 (x86-64), neon (AArch64) or scalar; every choice gives
    /// the same bits (another backend refuses anything but auto).
    #[arg(long, default_value = "auto")]
    isa: Isa,
}

impl BackendArgs {
    fn options(self) -> BackendOptions {
        BackendOptions {
            kind: self.backend,
            conv_algo: self.conv_algo,
            isa: self.isa,
        }
    }
}

/// The file format of `dmkd golden`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GoldenFormat {
    /// One `.safetensors` file.
    Safetensors,
    /// A directory of `.npy` files (one per tensor) and `metadata.json`.
    Npy,
}

/// Which rows `dmkd bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BenchOnly {
    /// The per-level conv kernels.
    Conv,
    /// The whole loss.
    Loss,
}

/// A count of at least one.
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

/// A count in `lo..=hi`. The upper bounds are far above any use and keep a
/// mistyped count from running for ever or sizing an allocation (a count
/// near 2^64 overflowed `cases * 4` and aborted on `Vec::with_capacity`).
fn count_in(s: &str, lo: usize, hi: usize) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        Ok(_) => Err(format!("must be in {lo}..={hi}")),
        Err(e) => Err(e.to_string()),
    }
}

/// `demo --steps`: 0 to a million.
fn step_count(s: &str) -> std::result::Result<usize, String> {
    count_in(s, 0, 1_000_000)
}

/// `bench --reps`: 1 to 10000.
fn rep_count(s: &str) -> std::result::Result<usize, String> {
    count_in(s, 1, 10_000)
}

/// `gradcheck --cases`: 1 to 100000.
fn case_count(s: &str) -> std::result::Result<usize, String> {
    count_in(s, 1, 100_000)
}

/// A worker-thread count: 1 to `dmkd::threads::MAX_THREADS`.
fn thread_count(s: &str) -> std::result::Result<usize, String> {
    let n = at_least_one(s)?;
    dmkd::threads::check_count("--threads", n)
        .map_err(|_| format!("at most {} threads", dmkd::threads::MAX_THREADS))
}

/// A tolerance: finite and >= 0.
fn tolerance(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if dmkd::verify::valid_tolerance(v) {
        Ok(v)
    } else {
        Err(format!("{v} must be finite and >= 0"))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train with DMKD on built-in synthetic FPN features (the main job).
    Demo {
        #[arg(long, default_value_t = 300, value_parser = step_count)]
        steps: usize,
        /// Problem size: demo (default), tiny, retinanet, two-stage, non-square.
        #[arg(long, default_value = "demo", value_parser = Preset::named)]
        preset: Preset,
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
    Eval(EvalArgs),
    /// Compare an implementation's outputs with expected ones, tensor by tensor.
    Verify {
        #[arg(long)]
        expected: PathBuf,
        #[arg(long)]
        actual: PathBuf,
        /// Relative tolerance per element.
        #[arg(long, default_value_t = 1e-5, value_parser = tolerance, allow_negative_numbers = true)]
        rtol: f64,
        /// Absolute tolerance per element.
        #[arg(long, default_value_t = 0.0, value_parser = tolerance, allow_negative_numbers = true)]
        atol: f64,
        /// Absolute tolerance per element in units of the tensor's largest |expected|.
        #[arg(long, default_value_t = 1e-5, value_parser = tolerance, allow_negative_numbers = true)]
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
        #[arg(long, default_value = "tiny", value_parser = Preset::named)]
        preset: Preset,
        /// Level config (JSON); defaults to the preset's DMKD config.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Draw the masks of a data-parallel shard whose first sample is
        /// this one of the global batch (written to the file's metadata,
        /// where `eval` finds it).
        #[arg(long, default_value_t = 0)]
        sample_offset: usize,
        #[arg(long, default_value = "f64")]
        dtype: DType,
        /// A .safetensors file, or a directory of .npy files (one per tensor).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = GoldenFormat::Safetensors)]
        format: GoldenFormat,
        /// Golden files come from the reference backend unless told otherwise.
        #[arg(long, default_value = "reference")]
        backend: BackendKind,
        /// Instruction set with --backend cpu (auto, avx512, avx2, neon, scalar;
        /// the other backends refuse anything but auto).
        #[arg(long, default_value = "auto")]
        isa: Isa,
    },
    /// Time the conv kernels and the whole loss at an FPN preset (f32).
    Bench {
        /// retinanet (default), two-stage or non-square.
        #[arg(long, default_value = "retinanet", value_parser = Preset::named)]
        preset: Preset,
        /// Worker threads (the FMA peak probe uses as many).
        #[arg(long, default_value_t = 2, value_parser = thread_count)]
        threads: usize,
        /// Timed repetitions per row (median reported), after one warm-up.
        #[arg(long, default_value_t = 5, value_parser = rep_count)]
        reps: usize,
        /// Only the conv rows, or only the loss rows.
        #[arg(long, value_enum)]
        only: Option<BenchOnly>,
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
        #[arg(long, default_value_t = 8, value_parser = case_count)]
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

/// The arguments of `dmkd eval`.
#[derive(Args)]
struct EvalArgs {
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
    #[arg(long, conflicts_with = "init_seed")]
    no_init: bool,
    /// Ignore tensors that are neither inputs nor parameters.
    #[arg(long)]
    allow_extra: bool,
    /// The batch's first sample in a larger batch (a data-parallel shard): the
    /// sampled and random masks draw those samples' uniforms. Default: the
    /// `sample_offset` metadata of --inputs, else 0.
    #[arg(long)]
    sample_offset: Option<usize>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// `$body` with the type alias `$t` set to f32 or f64, as `$dtype` says:
/// the one place the CLI turns a run-time precision into a type.
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            dmkd::DType::F32 => {
                type $t = f32;
                $body
            }
            dmkd::DType::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

fn run(cli: Cli) -> Result<bool> {
    // Before rayon's global pool starts: a count it could not start would
    // abort the process instead of failing.
    dmkd::threads::check_env()?;
    match cli.command {
        Command::Demo {
            steps,
            preset,
            seed,
            dtype,
            out,
            backend,
        } => {
            let opts = demo::DemoOptions {
                preset,
                steps,
                seed,
                backend: backend.options(),
                out_dir: out,
                ..demo::DemoOptions::default()
            };
            commands::demo(opts, dtype)
        }
        Command::Eval(args) => commands::eval(args),
        Command::Verify {
            expected,
            actual,
            rtol,
            atol,
            stol,
            allow_extra,
            json,
        } => commands::verify(
            &expected,
            &actual,
            Tolerance { rtol, atol, stol },
            allow_extra,
            json,
        ),
        Command::Golden {
            preset,
            config,
            seed,
            sample_offset,
            dtype,
            out,
            format,
            backend,
            isa,
        } => {
            let config = match config {
                Some(p) => commands::read_config(&p)?,
                None => preset.config(),
            };
            // One config level per preset level, said in the user's terms
            // (the inputs would refuse it later, naming a tensor).
            if config.levels.len() != preset.levels.len() {
                return Err(dmkd::Error::Config(format!(
                    "the config has {} level(s) and the preset {} has {}",
                    config.levels.len(),
                    preset.name,
                    preset.levels.len()
                )));
            }
            let opts = BackendOptions {
                kind: backend,
                conv_algo: ConvAlgo::Auto,
                isa,
            };
            with_dtype!(dtype, T => {
                commands::golden::<T>(&preset, &config, seed, sample_offset, &out, format, opts)
            })
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
            let opts = bench::BenchOptions {
                preset,
                threads,
                reps,
                backend: backend.options(),
                convs: only != Some(BenchOnly::Loss),
                loss: only != Some(BenchOnly::Conv),
                counters,
            };
            commands::bench(opts, json)
        }
        Command::Gradcheck {
            cases,
            seed,
            backend,
            json,
        } => commands::gradcheck(cases, seed, backend, json),
    }
}

fn main() -> ExitCode {
    // Freed tensors go back to the system at once (peak RSS; see its docs).
    dmkd::tune_allocator();
    // A panic is a bug in dmkd, never the user's input; even so the user
    // gets one line (and exit status 101), not a multi-line report.
    std::panic::set_hook(Box::new(|info| {
        eprintln!(
            "error: internal error, please report it: {}",
            one_line(&info.to_string())
        );
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print their text and succeed.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // A bad argument: clap's message ("error: invalid value ...", and
        // the possible values where there is a list) on one line, without
        // the usage block after the blank line.
        Err(e) => {
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{}", one_line(&message.join(" ")));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}
