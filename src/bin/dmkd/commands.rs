//! What each subcommand does and prints.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use dmkd::backend::{BackendFloat, BackendKind, BackendOptions, make_backend};
use dmkd::distill::{Config, EvalOptions, Problem, TensorMap, evaluate};
use dmkd::gradcheck::{loss_cases, op_cases, run_suite};
use dmkd::io::{TensorFile, read_tensor_file, write_safetensors};
use dmkd::synthetic::{self, Preset};
use dmkd::verify::{Tolerance, compare, table};
use dmkd::{DType, Error, Result};

use crate::bench::{BenchOptions, BenchRow, run_bench};
use crate::demo::{DemoOptions, fell, run_demo};
use crate::{EvalArgs, GoldenFormat, with_dtype};

fn json_string<S: serde::Serialize>(v: &S) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::Config(e.to_string()))
}

/// A level config (JSON) from a file, read with a bound on its size.
pub(crate) fn read_config(path: &Path) -> Result<Config> {
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

/// `dmkd demo`: train, then print each level's loss at the start and the end.
pub(crate) fn demo(opts: DemoOptions, dtype: DType) -> Result<bool> {
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
    let report = with_dtype!(dtype, T => run_demo::<T>(&opts, tick)?);
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
            "{:<6} {:>12.4e} {:>12.4e} {:>9} {:>8.4} {:>8.4}",
            name,
            a,
            b,
            fell(a, b),
            ws,
            wc
        );
    }
    println!(
        "{:<6} {:>12.4e} {:>12.4e} {:>9}",
        "total",
        report.initial_loss,
        report.final_loss,
        fell(report.initial_loss, report.final_loss)
    );
    println!(
        "loss curve: {} and {}",
        report.csv.display(),
        report.png.display()
    );
    Ok(true)
}

/// Inputs (and parameters) from files, in the compute precision.
fn load_problem_tensors<T: dmkd::Float>(files: &[&TensorFile]) -> Result<TensorMap<T>> {
    let mut m = TensorMap::new();
    for f in files {
        m.extend(f.to_map::<T>()?);
    }
    Ok(m)
}

fn eval_typed<T: BackendFloat>(
    config: &Config,
    files: &[&TensorFile],
    out: &Path,
    opts: EvalOptions,
    sample_offset: usize,
    backend: BackendOptions,
) -> Result<bool> {
    let tensors = load_problem_tensors::<T>(files)?;
    let problem = Problem::new(config, &tensors, opts)?.with_sample_offset(sample_offset)?;
    let eval = evaluate(make_backend::<T>(backend)?, &problem)?;
    let mut outputs = eval.outputs;
    outputs.extend(eval.params);
    let mut meta = HashMap::from([
        ("config".to_string(), config.to_json()),
        ("dtype".to_string(), T::DTYPE.to_string()),
    ]);
    // The masks depend on it: a file of outputs says which shard it is.
    if sample_offset != 0 {
        meta.insert("sample_offset".to_string(), sample_offset.to_string());
    }
    write_safetensors(out, &outputs, &meta)?;
    println!("loss {:.10e}", eval.loss);
    for (l, v) in eval.level_losses.iter().enumerate() {
        println!("p{l}.loss {v:.10e}");
    }
    println!("wrote {} tensors to {}", outputs.len(), out.display());
    Ok(true)
}

/// `dmkd eval`: read the inputs (and parameters), evaluate in the requested
/// or the files' precision, write every output.
pub(crate) fn eval(args: EvalArgs) -> Result<bool> {
    let input_file = read_tensor_file(&args.inputs)?;
    let param_file = args.params.as_deref().map(read_tensor_file).transpose()?;
    let config = match (&args.config, input_file.metadata.get("config")) {
        (Some(p), _) => read_config(p)?,
        (None, Some(text)) => Config::from_json(text)?,
        (None, None) => {
            return Err(Error::Config(format!(
                "no --config given and {} carries no `config` metadata",
                args.inputs.display()
            )));
        }
    };
    let file_dtype = input_file.dtype(&args.inputs.display().to_string())?;
    if let (Some(pf), Some(path)) = (&param_file, &args.params) {
        pf.dtype(&path.display().to_string())?;
        // One file's tensor would silently replace the other's: refuse.
        if let Some(name) = pf
            .tensors
            .keys()
            .find(|k| input_file.tensors.contains_key(*k))
        {
            return Err(Error::arg(
                "eval",
                format!(
                    "tensor `{name}` is in both {} and {}; give each tensor in one file",
                    args.inputs.display(),
                    path.display()
                ),
            ));
        }
    }
    let dtype = args.dtype.or(file_dtype).unwrap_or(DType::F32);
    // As the config: from the flag, else from the inputs' metadata (a
    // data-parallel shard's golden file), else 0.
    let sample_offset = match args.sample_offset {
        Some(v) => v,
        None => input_file
            .sample_offset(&args.inputs.display().to_string())?
            .unwrap_or(0),
    };
    let mut files = vec![&input_file];
    files.extend(param_file.as_ref());
    let opts = EvalOptions {
        init_seed: (!args.no_init).then_some(args.init_seed),
        allow_extra: args.allow_extra,
    };
    let backend = args.backend.options();
    with_dtype!(dtype, T => eval_typed::<T>(&config, &files, &args.out, opts, sample_offset, backend))
}

/// `dmkd verify`: the per-tensor error table; false when anything fails.
pub(crate) fn verify(
    expected: &Path,
    actual: &Path,
    tol: Tolerance,
    allow_extra: bool,
    json: bool,
) -> Result<bool> {
    let e = read_tensor_file(expected)?;
    let a = read_tensor_file(actual)?;
    let report = compare(&e, &a, tol, allow_extra);
    if json {
        println!("{}", json_string(&report)?);
        return Ok(report.passed);
    }
    print!(
        "{}",
        table(
            &report,
            &expected.display().to_string(),
            &actual.display().to_string()
        )
    );
    Ok(report.passed)
}

/// `dmkd golden`: synthetic inputs of a preset, initialised parameters and
/// every output, written for another implementation to reproduce.
pub(crate) fn golden<T: BackendFloat>(
    preset: &Preset,
    config: &Config,
    seed: u64,
    sample_offset: usize,
    out: &Path,
    format: GoldenFormat,
    backend: BackendOptions,
) -> Result<bool> {
    let backend = make_backend::<T>(backend)?;
    let (all, loss) = synthetic::golden(preset, config, seed, sample_offset, backend)?;
    let mut meta = HashMap::from([
        ("config".to_string(), config.to_json()),
        ("dtype".to_string(), T::DTYPE.to_string()),
        ("preset".to_string(), preset.name.to_string()),
    ]);
    // As `eval` writes it: `eval` on this file then draws the same masks.
    if sample_offset != 0 {
        meta.insert("sample_offset".to_string(), sample_offset.to_string());
    }
    match format {
        GoldenFormat::Safetensors => write_safetensors(out, &all, &meta)?,
        GoldenFormat::Npy => dmkd::io::npy::write_npy_dir(out, &all, &meta)?,
    }
    println!(
        "golden: {} tensors ({} levels, {}), loss {:.10e}, written to {}",
        all.len(),
        config.levels.len(),
        T::DTYPE,
        loss,
        out.display()
    );
    Ok(true)
}

/// `dmkd bench`: the timing table (or JSON).
pub(crate) fn bench(opts: BenchOptions, json: bool) -> Result<bool> {
    let report = run_bench(&opts)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| Error::Config(e.to_string()))?
        );
        return Ok(true);
    }
    let peak = report.peak_for_percent();
    println!(
        "bench: preset {}, {} threads, backend {}, conv algo {}, f32",
        report.preset, report.threads, report.backend, report.conv_algo
    );
    println!("cpu: {}, instruction set: {}", report.cpu, report.isa);
    println!("{}", report.probe_line());
    if let Some(w) = report.widest_fma_peak_gflops {
        println!("FMA peak of the widest instruction set: {w:.1} GFLOP/s");
    }
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "row", "ms median", "min", "max", "GFLOP/s", "% peak"
    );
    for r in &report.rows {
        let pct = peak.map_or("-".to_string(), |p| format!("{:.0}%", 100.0 * r.gflops / p));
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>10.2} {:>10.1} {:>8}",
            r.name, r.ms_median, r.ms_min, r.ms_max, r.gflops, pct
        );
    }
    println!("peak RSS: {:.0} MiB", report.peak_rss_mib);
    if report.rows.iter().any(|r| r.counters.is_some()) {
        print_counters(&report.rows);
    }
    Ok(true)
}

/// The work counters of each row, one line per pass that ran.
fn print_counters(rows: &[BenchRow]) {
    println!();
    println!(
        "work of one call per row: calls by algorithm (direct, Winograd, of \
         which F(6x6)) and by mask path \
         (channel-sparse, spatial skip); multiply-adds; tiles computed and skipped by \
         masks; (image, channel) pairs skipped; weight values packed"
    );
    println!(
        "{:<28} {:<11} {:>6} {:>6} {:>6} {:>6} {:>7} {:>10} {:>9} {:>9} {:>8} {:>10}",
        "row",
        "pass",
        "direct",
        "wino",
        "wino6",
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
            if p.direct_calls == 0 && p.winograd_calls == 0 {
                continue;
            }
            println!(
                "{:<28} {:<11} {:>6} {:>6} {:>6} {:>6} {:>7} {:>10.3} {:>9} {:>9} {:>8} {:>10}",
                r.name,
                pass,
                p.direct_calls,
                p.winograd_calls,
                p.winograd6_calls,
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

/// `dmkd gradcheck`: every op and loss against central differences (f64).
pub(crate) fn gradcheck(cases: usize, seed: u64, backend: BackendKind, json: bool) -> Result<bool> {
    let be = make_backend::<f64>(BackendOptions {
        kind: backend,
        ..BackendOptions::default()
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
