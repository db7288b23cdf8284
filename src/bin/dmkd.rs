//! The dmkd command line. It parses arguments and prints; the work is in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use dmkd::backend::{BackendKind, BackendOptions, make_backend};
use dmkd::gradcheck::{op_cases, run_suite};
use dmkd::{ConvAlgo, Error, Result};

#[derive(Parser)]
#[command(
    name = "dmkd",
    version,
    about = "Dual Masked Knowledge Distillation loss: eval, verify, demo, gradcheck, bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every op's gradient against central finite differences (f64).
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

fn gradcheck(cases: usize, seed: u64, backend: BackendKind, json: bool) -> Result<bool> {
    let be = make_backend::<f64>(BackendOptions {
        kind: backend,
        conv_algo: ConvAlgo::Auto,
    })?;
    let rows = run_suite(Arc::clone(&be), &op_cases(), cases, seed)?;
    let all = rows.iter().all(|r| r.passed);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| Error::Config(e.to_string()))?
        );
    } else {
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
    }
    Ok(all)
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Gradcheck {
            cases,
            seed,
            backend,
            json,
        } => gradcheck(cases, seed, backend, json),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
