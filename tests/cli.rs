//! The command line end to end: `eval` on a fixture reproduces the PyTorch
//! outputs (checked by `verify`), `verify` fails on a perturbed file,
//! `golden` writes a file `eval` reproduces, `gradcheck` and a short `demo` run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dmkd::Tensor;
use dmkd::io::{read_safetensors, write_safetensors};

fn dmkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmkd"))
        .args(args)
        .output()
        .expect("the dmkd binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dmkd-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("reference/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The CLI's failure shape: exit status `code` and exactly one `error: `
/// line on stderr, which is returned; `what` names the case in messages.
fn one_error_line(o: &Output, code: i32, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "{what}: {err}");
    assert_eq!(err.lines().count(), 1, "{what}: {err:?}");
    assert!(err.starts_with("error: "), "{what}: {err}");
    err
}

/// `dmkd eval` of a golden file (its config from the metadata, its outputs
/// extra tensors) into `out` with `extra` arguments, then `verify` at 1e-12:
/// both must succeed (f64 on one backend, only the summation order differs).
fn eval_reproduces_golden(golden: &str, out: &str, extra: &[&str]) {
    let mut args = vec!["eval", "--inputs", golden, "--out", out, "--no-init"];
    args.push("--allow-extra");
    args.extend_from_slice(extra);
    let o = dmkd(&args);
    assert!(o.status.success(), "{}", text(&o));
    let o = dmkd(&[
        "verify",
        "--expected",
        golden,
        "--actual",
        out,
        "--rtol",
        "1e-12",
        "--stol",
        "1e-12",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn eval_on_a_fixture_reproduces_its_outputs() {
    let dir = tmp("eval");
    // f64: 1e-10 relative per element with a floor of 1e-10 of the tensor's
    // largest entry; f32: 1e-5 of the largest entry (see tests/golden.rs).
    // FGD's context-conv bias has an exactly-zero gradient that both sides
    // compute as ~1e-20 rounding noise: an absolute floor of 1e-15 covers it.
    for (name, rtol, stol) in [
        ("dmkd_f64_align_multilevel.safetensors", "1e-10", "1e-10"),
        ("fgd_f64.safetensors", "1e-10", "1e-10"),
        ("dmkd_f32_align.safetensors", "1e-5", "1e-5"),
    ] {
        let out = dir.join(name).display().to_string();
        let fx = fixture(name);
        // The config comes from the fixture's metadata; its outputs are extra tensors.
        let o = dmkd(&[
            "eval",
            "--inputs",
            &fx,
            "--out",
            &out,
            "--no-init",
            "--allow-extra",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let o = dmkd(&[
            "verify",
            "--expected",
            &fx,
            "--actual",
            &out,
            "--rtol",
            rtol,
            "--stol",
            stol,
            "--atol",
            "1e-15",
        ]);
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        assert!(t.contains("PASS") && t.contains("grad.p0.student"), "{t}");
    }
    // Without --allow-extra the fixture's outputs are refused, and the one
    // line says how to read such a file. No output file is written.
    let out = dir.join("refused.safetensors");
    let fx = fixture("dmkd_f64_align_multilevel.safetensors");
    let o = dmkd(&["eval", "--inputs", &fx, "--out", &out.display().to_string()]);
    let err = one_error_line(&o, 1, "a golden file as plain inputs");
    assert!(
        err.contains("unexpected tensor `grad.") && err.contains("--allow-extra"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).ok();
}

/// A data-parallel shard's fixture: eval takes its sample offset from the
/// metadata (or --sample-offset) and writes it into the outputs' metadata.
#[test]
fn eval_takes_the_sample_offset_of_a_shard() {
    let dir = tmp("offset");
    let fx = fixture("dmkd_f64_offset.safetensors");
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec!["eval", "--inputs", &fx, "--out", out, "--no-init"];
        args.push("--allow-extra");
        args.extend_from_slice(extra);
        dmkd(&args)
    };
    let verify = |out: &str| {
        let o = dmkd(&[
            "verify",
            "--expected",
            &fx,
            "--actual",
            out,
            "--rtol",
            "1e-10",
            "--stol",
            "1e-10",
        ]);
        (o.status.success(), text(&o))
    };
    let from_meta = dir.join("meta.safetensors").display().to_string();
    let o = run(&from_meta, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let (ok, t) = verify(&from_meta);
    assert!(ok, "{t}");
    let written = dmkd::io::read_safetensors(Path::new(&from_meta)).unwrap();
    assert_eq!(written.metadata["sample_offset"], "4294967293");
    // The flag wins: offset 0 draws other samples' masks.
    let zero = dir.join("zero.safetensors").display().to_string();
    assert!(run(&zero, &["--sample-offset", "0"]).status.success());
    let (ok, t) = verify(&zero);
    assert!(!ok && t.contains("p0.mask_s") && t.contains("FAIL"), "{t}");
    let written = dmkd::io::read_safetensors(Path::new(&zero)).unwrap();
    assert!(!written.metadata.contains_key("sample_offset"));
    // Past the 32-bit sample counter: one line, exit 1.
    let o = run(&zero, &["--sample-offset", "4294967294"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("32-bit Philox sample counter"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn verify_reports_and_fails_on_a_wrong_gradient() {
    let dir = tmp("verify");
    let fx = fixture("dmkd_f64_basic.safetensors");
    let file = read_safetensors(Path::new(&fx)).unwrap();
    let mut m = file.to_map::<f64>().unwrap();
    let g = m["grad.p0.gen_c.2.bias"].clone();
    let mut v = g.to_vec();
    v[3] *= 1.001;
    m.insert(
        "grad.p0.gen_c.2.bias".into(),
        Tensor::from_vec(g.shape(), v).unwrap(),
    );
    let bad = dir.join("bad.safetensors");
    write_safetensors(&bad, &m, &HashMap::new()).unwrap();
    let bad = bad.display().to_string();
    let o = dmkd(&["verify", "--expected", &fx, "--actual", &bad, "--stol", "0"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    let line = t
        .lines()
        .find(|l| l.starts_with("grad.p0.gen_c.2.bias"))
        .unwrap();
    assert!(line.contains("FAIL") && line.contains("[3]"), "{line}");
    // --json for machines, with the worst index.
    let o = dmkd(&[
        "verify",
        "--expected",
        &fx,
        "--actual",
        &bad,
        "--json",
        "--stol",
        "0",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["passed"], false);
    let row = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "grad.p0.gen_c.2.bias")
        .unwrap();
    assert_eq!(row["status"], "fail");
    assert_eq!(row["worst_index"][0], 3);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn golden_then_eval_round_trips() {
    let dir = tmp("golden");
    let g = dir.join("golden.safetensors").display().to_string();
    let o = dmkd(&["golden", "--preset", "tiny", "--out", &g, "--seed", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let file = read_safetensors(Path::new(&g)).unwrap();
    assert!(file.tensors.contains_key("grad.p2.gen_s.0.weight"));
    assert!(file.tensors.contains_key("p0.align.weight"));
    let out = dir.join("eval.safetensors").display().to_string();
    eval_reproduces_golden(&g, &out, &["--backend", "cpu"]);
    // Output files are byte for byte reproducible: a second golden and a
    // second eval (separate processes, so separately seeded hash maps)
    // write the same bytes.
    let g2 = dir.join("golden2.safetensors").display().to_string();
    let o = dmkd(&["golden", "--preset", "tiny", "--out", &g2, "--seed", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&g).unwrap() == std::fs::read(&g2).unwrap());
    let out2 = dir.join("eval2.safetensors").display().to_string();
    let o = dmkd(&[
        "eval",
        "--inputs",
        &g,
        "--out",
        &out2,
        "--no-init",
        "--allow-extra",
        "--backend",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&out2).unwrap());
    std::fs::remove_dir_all(dir).ok();
}

/// `golden --sample-offset`: a shard's golden file, its offset in the
/// metadata, which `eval` reads back to reproduce it; its masks are not the
/// whole batch's; past the 32-bit sample counter is one line, exit 1.
#[test]
fn golden_of_a_shard_records_its_offset_and_round_trips() {
    let dir = tmp("golden-offset");
    // Masks that draw uniforms per sample (the default top-k ones do not).
    let cfg = dir.join("cfg.json");
    std::fs::write(
        &cfg,
        r#"{"levels":[{"mask_mode":"sampled"},{"method":"mgd"},{"mask_mode":"random"}]}"#,
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let g = dir.join("shard.safetensors").display().to_string();
    let o = dmkd(&[
        "golden",
        "--config",
        &cfg,
        "--out",
        &g,
        "--sample-offset",
        "6",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let file = read_safetensors(Path::new(&g)).unwrap();
    assert_eq!(file.metadata["sample_offset"], "6");
    let out = dir.join("eval.safetensors").display().to_string();
    eval_reproduces_golden(&g, &out, &[]);
    let whole = dir.join("whole.safetensors").display().to_string();
    let o = dmkd(&["golden", "--config", &cfg, "--out", &whole]);
    assert!(o.status.success(), "{}", text(&o));
    let file = read_safetensors(Path::new(&whole)).unwrap();
    assert!(!file.metadata.contains_key("sample_offset"));
    let o = dmkd(&["verify", "--expected", &whole, "--actual", &g]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    // Each level's masks (sampled, MGD random, random) are other samples'.
    for bad in ["p0.mask_s ", "p1.mask_s ", "p2.mask_c "] {
        let row = t.lines().find(|l| l.starts_with(bad));
        assert!(row.is_some_and(|r| r.contains("FAIL")), "{bad}: {t}");
    }
    let o = dmkd(&["golden", "--out", &g, "--sample-offset", "4294967294"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("32-bit Philox sample counter"),
        "{}",
        text(&o)
    );
    assert_eq!(text(&o).trim().lines().count(), 1, "{}", text(&o));
    std::fs::remove_dir_all(dir).ok();
}

/// `golden --config` with FGD and MGD levels: synthetic boxes are added
/// and eval reproduces the file; a config whose level count is not the
/// preset's is one line naming both counts.
#[test]
fn golden_with_an_fgd_level_writes_boxes_and_round_trips() {
    let dir = tmp("golden-fgd");
    let cfg = dir.join("cfg.json");
    std::fs::write(&cfg, r#"{"levels":[{},{"method":"fgd"},{"method":"mgd"}]}"#).unwrap();
    let cfg = cfg.display().to_string();
    let g = dir.join("g.safetensors").display().to_string();
    let o = dmkd(&["golden", "--preset", "tiny", "--config", &cfg, "--out", &g]);
    assert!(o.status.success(), "{}", text(&o));
    let file = read_safetensors(Path::new(&g)).unwrap();
    for k in [
        "img_shape",
        "gt_boxes.0",
        "gt_boxes.1",
        "p1.mask_fg",
        "grad.p1.conv_mask_s.weight",
    ] {
        assert!(file.tensors.contains_key(k), "{k}");
    }
    let out = dir.join("e.safetensors").display().to_string();
    eval_reproduces_golden(&g, &out, &[]);
    let two = dir.join("two.json");
    std::fs::write(&two, r#"{"levels":[{},{"method":"fgd"}]}"#).unwrap();
    let o = dmkd(&[
        "golden",
        "--preset",
        "tiny",
        "--config",
        &two.display().to_string(),
        "--out",
        &g,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.contains("the config has 2 level(s) and the preset tiny has 3") && t.lines().count() == 1,
        "{t}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn eval_initialises_and_writes_missing_parameters() {
    let dir = tmp("init");
    let fx = fixture("mgd_f64.safetensors");
    let file = read_safetensors(Path::new(&fx)).unwrap();
    let inputs: dmkd::distill::TensorMap<f64> = file
        .to_map::<f64>()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| {
            k.ends_with(".student") && !k.starts_with("grad.") || k.ends_with(".teacher")
        })
        .collect();
    let meta = HashMap::from([("config".to_string(), file.metadata["config"].clone())]);
    let inp = dir.join("in.safetensors");
    write_safetensors(&inp, &inputs, &meta).unwrap();
    let out = dir.join("out.safetensors");
    let o = dmkd(&[
        "eval",
        "--inputs",
        &inp.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--init-seed",
        "9",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let written = read_safetensors(&out).unwrap();
    for k in [
        "p0.gen.0.weight",
        "p1.align.weight",
        "grad.p1.align.weight",
        "loss",
    ] {
        assert!(written.tensors.contains_key(k), "{k} missing");
    }
    // Without initialisation the same call is an error naming a parameter.
    let o = dmkd(&[
        "eval",
        "--inputs",
        &inp.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--no-init",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: missing tensor `p0.gen"), "{err}");
    assert_eq!(err.lines().count(), 1);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn eval_reads_parameters_from_a_second_file_and_refuses_a_tensor_in_both() {
    let dir = tmp("params");
    let fx = fixture("mgd_f64.safetensors");
    let file = read_safetensors(Path::new(&fx)).unwrap();
    let all: dmkd::distill::TensorMap<f64> = file.to_map::<f64>().unwrap();
    let is_input =
        |k: &str| k.ends_with(".student") && !k.starts_with("grad.") || k.ends_with(".teacher");
    let is_param =
        |k: &str| !k.starts_with("grad.") && (k.contains(".gen.") || k.contains(".align."));
    let pick = |keep: &dyn Fn(&str) -> bool| -> dmkd::distill::TensorMap<f64> {
        all.iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let (inputs, params) = (pick(&is_input), pick(&is_param));
    assert!(
        params.contains_key("p0.gen.0.weight"),
        "{:?}",
        params.keys()
    );
    let meta = HashMap::from([("config".to_string(), file.metadata["config"].clone())]);
    let inp = dir.join("in.safetensors");
    write_safetensors(&inp, &inputs, &meta).unwrap();
    let par = dir.join("params.safetensors");
    write_safetensors(&par, &params, &HashMap::new()).unwrap();
    let out = dir.join("out.safetensors");
    let run = |params: &Path| {
        dmkd(&[
            "eval",
            "--inputs",
            &inp.display().to_string(),
            "--params",
            &params.display().to_string(),
            "--out",
            &out.display().to_string(),
            "--no-init",
        ])
    };
    // The fixture's parameters, read from the second file, give its loss.
    let o = run(&par);
    assert!(o.status.success(), "{}", text(&o));
    let written = read_safetensors(&out).unwrap().to_map::<f64>().unwrap();
    // f64 against the PyTorch reference's loss: 1e-10 relative, as in
    // `eval_on_a_fixture_reproduces_its_outputs` (see tests/golden.rs).
    let (got, want) = (written["loss"].item().unwrap(), all["loss"].item().unwrap());
    assert!((got - want).abs() <= 1e-10 * want.abs(), "{got} vs {want}");
    // A student in the parameter file too: refused, not silently replaced.
    let mut both = params.clone();
    both.insert("p0.student".into(), inputs["p0.student"].clone());
    let bad = dir.join("both.safetensors");
    write_safetensors(&bad, &both, &HashMap::new()).unwrap();
    let o = run(&bad);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tensor `p0.student` is in both"), "{err}");
    assert_eq!(err.lines().count(), 1);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn gradcheck_and_demo_run() {
    let o = dmkd(&["gradcheck", "--cases", "2"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("conv2d+spatial_mask") && t.contains("loss:fgd"),
        "{t}"
    );
    let dir = tmp("demo");
    let out = dir.display().to_string();
    let o = dmkd(&["demo", "--preset", "tiny", "--steps", "30", "--out", &out]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("total"), "{t}");
    assert!(dir.join("loss.png").metadata().unwrap().len() > 1000);
    let csv = std::fs::read_to_string(dir.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 32, "header + steps 0..=30");
    std::fs::remove_dir_all(dir).ok();
}

/// clap's value parsers check every argument; a bad one is one `error:`
/// line naming it, exit status 2, nothing computed. `--help` still prints
/// its full text and succeeds.
#[test]
fn bad_arguments_are_one_line_each() {
    for (args, needle) in [
        (
            &["verify", "--expected", "a", "--actual", "b", "--rtol", "-1"][..],
            "--rtol",
        ),
        (
            &[
                "verify",
                "--expected",
                "a",
                "--actual",
                "b",
                "--stol",
                "nan",
            ],
            "--stol",
        ),
        (&["golden", "--out", "x", "--format", "hdf5"], "--format"),
        (
            &["golden", "--out", "x", "--preset", "huge"],
            "unknown preset `huge`",
        ),
        (
            &["golden", "--out", "x", "--dtype", "f16"],
            "unknown dtype `f16`",
        ),
        (&["bench", "--only", "gemm"], "--only"),
        (&["bench", "--reps", "0"], "--reps"),
        (&["bench", "--threads", "0"], "--threads"),
        // Started, 100000 threads exhaust the process's memory mappings and
        // abort it; refused at parsing.
        (&["bench", "--threads", "100000"], "at most 1024 threads"),
        (&["demo", "--backend", "tpu"], "unknown backend `tpu`"),
        (
            &["demo", "--conv-algo", "fft"],
            "unknown conv algorithm `fft`",
        ),
        (&["gradcheck", "--cases", "0"], "--cases"),
        // Counts are bounded: near 2^64 they overflowed `cases * 4` (a
        // wrong verdict), sized the timing vector (abort) or ran for ever.
        (
            &["gradcheck", "--cases", "4611686018427387905"],
            "must be in 1..=100000",
        ),
        (
            &["bench", "--reps", "18446744073709551615"],
            "must be in 1..=10000",
        ),
        (&["demo", "--steps", "1000001"], "must be in 0..=1000000"),
        (
            &[
                "eval",
                "--inputs",
                "a",
                "--out",
                "b",
                "--no-init",
                "--init-seed",
                "5",
            ],
            "--init-seed",
        ),
    ] {
        let err = one_error_line(&dmkd(args), 2, &format!("{args:?}"));
        assert!(err.contains(needle), "{args:?}: `{needle}` not in {err}");
    }
    // RAYON_NUM_THREADS sizes the global pool, checked before it starts:
    // one line and exit status 1 (a rayon that could not start the threads
    // aborted the process; one that could not parse the value used every
    // CPU instead).
    for (value, needle) in [
        ("100000", "at most 1024"),
        ("abc", "`abc` is not a thread count"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_dmkd"))
            .args(["gradcheck", "--cases", "1"])
            .env("RAYON_NUM_THREADS", value)
            .output()
            .expect("the dmkd binary runs");
        let err = one_error_line(&o, 1, value);
        assert!(
            err.contains("RAYON_NUM_THREADS") && err.contains(needle),
            "{value}: {err}"
        );
        assert!(o.stdout.is_empty(), "{value}: computed anyway");
    }
    let o = dmkd(&["bench", "--help"]);
    assert!(o.status.success());
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("--reps") && t.lines().count() > 5, "{t}");
}

/// `--backend cuda` on a machine without a usable CUDA device (CI's), in a
/// build with the CUDA feature (the tests') or without: exit status 1 and
/// one line saying the backend is unavailable and why, from each command
/// that takes a backend, before any work. Where a device works, the same
/// commands succeed.
#[test]
fn the_cuda_backend_without_a_device_is_one_line_from_each_command() {
    let dir = tmp("cuda");
    let (out_dir, out) = (
        dir.display().to_string(),
        dir.join("out.safetensors").display().to_string(),
    );
    let inputs = fixture("dmkd_f64_basic.safetensors");
    for args in [
        &[
            "demo",
            "--backend",
            "cuda",
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--out",
            &out_dir,
        ][..],
        &[
            "bench",
            "--backend",
            "cuda",
            "--preset",
            "tiny",
            "--reps",
            "1",
        ],
        &[
            "eval",
            "--backend",
            "cuda",
            "--inputs",
            &inputs,
            "--out",
            &out,
            "--allow-extra",
        ],
    ] {
        let o = dmkd(args);
        if o.status.success() {
            continue; // a usable device
        }
        let err = one_error_line(&o, 1, &format!("{args:?}"));
        assert!(
            err.starts_with("error: backend unavailable: ") && err.contains("CUDA"),
            "{args:?}: {err}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `dmkd bench --preset tiny --json` with `args`: it must succeed; its
/// report parsed.
fn bench_tiny_json(args: &[&str]) -> serde_json::Value {
    let o = dmkd(&[&["bench", "--preset", "tiny", "--json"], args].concat());
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `dmkd bench --json` on a small preset: every row has its median between
/// the fastest and the slowest run and GFLOP/s at the median, and the report
/// names the CPU and instruction set and probes the FMA peak before and
/// after the rows. The text table shows the same rows.
#[test]
fn bench_reports_each_rows_spread_and_probes_before_and_after() {
    let j = bench_tiny_json(&["--reps", "3"]);
    assert_eq!(j["preset"], "tiny");
    assert!(!j["cpu"].as_str().unwrap().is_empty());
    assert_ne!(j["isa"], "-");
    for key in ["fma_peak_gflops", "fma_peak_gflops_after"] {
        assert!(j[key].as_f64().unwrap() > 0.0, "{key}: {j}");
    }
    let rows = j["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    // tiny has three levels: three passes each, then the two loss rows.
    assert_eq!(names.len(), 3 * 3 + 2, "{names:?}");
    assert_eq!(names[0], "conv3x3.P3.forward");
    assert_eq!(names[10], "dmkd.forward_backward");
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap();
        assert!(
            0.0 < f("ms_min") && f("ms_min") <= f("ms_median") && f("ms_median") <= f("ms_max"),
            "{r}"
        );
        assert!(f("gflops") > 0.0, "{r}");
    }
    let o = dmkd(&["bench", "--preset", "tiny", "--reps", "1", "--only", "loss"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("before the rows") && t.contains("after") && t.contains("of the higher"),
        "{t}"
    );
    assert!(
        t.contains("ms median") && t.contains("dmkd.forward_backward"),
        "{t}"
    );
    assert!(!t.contains("conv3x3."), "{t}");
}

/// The first level's `loss@0` of a demo's table.
fn demo_first_loss(t: &str) -> f64 {
    let line = t
        .lines()
        .find(|l| l.starts_with("P3 "))
        .unwrap_or_else(|| panic!("no P3 row: {t}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `demo`'s `--preset`, `--seed` and `--backend` reach the run: the header
/// names them, and another seed draws other features (another first loss).
#[test]
fn demo_runs_the_preset_seed_and_backend_it_is_given() {
    let dir = tmp("demo-options");
    let out = dir.display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["demo", "--preset", "tiny", "--steps", "1", "--out", &out];
        args.extend_from_slice(extra);
        let o = dmkd(&args);
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        t
    };
    let a = run(&["--seed", "1"]);
    assert!(a.contains("preset tiny, 1 steps, cpu/auto backend"), "{a}");
    let b = run(&["--seed", "1", "--backend", "reference"]);
    assert!(b.contains("preset tiny, 1 steps, reference backend"), "{b}");
    let c = run(&["--seed", "2"]);
    let (la, lb, lc) = (
        demo_first_loss(&a),
        demo_first_loss(&b),
        demo_first_loss(&c),
    );
    // The same seed on two backends: the same problem (f32 sums in another
    // order: a relative difference far below 1e-3); another seed: another one.
    assert!((la - lb).abs() <= 1e-3 * la, "{la} vs {lb}");
    assert!(
        (la - lc).abs() > 1e-2 * la,
        "seeds 1 and 2 gave {la} and {lc}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `gradcheck --backend` picks the backend whose kernels are checked
/// (default: the reference).
#[test]
fn gradcheck_checks_the_backend_it_is_given() {
    for (args, name) in [
        (&["gradcheck", "--cases", "1"][..], "reference backend"),
        (
            &["gradcheck", "--cases", "1", "--backend", "cpu"][..],
            "cpu backend",
        ),
    ] {
        let o = dmkd(args);
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        assert!(t.lines().next().unwrap().contains(name), "{t}");
    }
}

/// A config of exactly the size limit (valid JSON padded with spaces) is
/// read; one byte more is refused with the limit in the message.
#[test]
fn a_config_file_at_the_size_limit_is_read_and_one_byte_more_refused() {
    let dir = tmp("config-limit");
    let write = |name: &str, len: usize| {
        let cfg = dmkd::synthetic::Preset::named("tiny")
            .unwrap()
            .config()
            .to_json();
        let mut text = cfg.into_bytes();
        assert!(text.len() < len);
        text.resize(len, b' ');
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let limit = dmkd::distill::config::MAX_CONFIG_BYTES;
    let at = write("at.json", limit);
    let over = write("over.json", limit + 1);
    let out = dir.join("g.safetensors").display().to_string();
    let o = dmkd(&["golden", "--preset", "tiny", "--config", &at, "--out", &out]);
    assert!(o.status.success(), "{}", text(&o));
    let o = dmkd(&[
        "golden", "--preset", "tiny", "--config", &over, "--out", &out,
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("config is {} bytes, over the limit", limit + 1))
            && t.lines().count() == 1,
        "{t}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `bench --json`: each row's GFLOP/s is the direct-conv FLOP model over
/// its median time (one conv3x3 pass per conv row; 4 passes per level for
/// the loss forward, 12 forward and backward), the conv algorithm and peak
/// RSS are reported, and the widest ISA's probe appears only when `--isa`
/// named a narrower one.
#[test]
fn bench_rows_follow_the_flop_model_and_name_the_isa_probed() {
    let bench = |extra: &[&str]| bench_tiny_json(&[&["--reps", "1"], extra].concat());
    let p = dmkd::synthetic::Preset::named("tiny").unwrap();
    let j = bench(&[]);
    assert_eq!(j["conv_algo"], "auto");
    assert_eq!(j["backend"], "cpu");
    let rss = j["peak_rss_mib"].as_f64().unwrap();
    assert!(rss > 2.0 && rss < 1e6, "{rss}");
    assert!(j.get("widest_fma_peak_gflops").is_none(), "{j}");
    let rows = j["rows"].as_array().unwrap();
    let gflop_of = |r: &serde_json::Value| {
        r["gflops"].as_f64().unwrap() * r["ms_median"].as_f64().unwrap() / 1e3
    };
    let pass = |h: usize, w: usize| 2.0 * (p.n * h * w * p.c * p.c * 9) as f64 / 1e9;
    for (l, &(h, w)) in p.levels.iter().enumerate() {
        for k in 0..3 {
            let r = &rows[3 * l + k];
            let (got, want) = (gflop_of(r), pass(h, w));
            assert!((got - want).abs() <= 1e-9 * want, "{r}: {got} vs {want}");
        }
    }
    let all = 2.0 * p.conv3x3_macs() as f64 / 1e9;
    for (r, passes) in [(&rows[9], 4.0), (&rows[10], 12.0)] {
        let (got, want) = (gflop_of(r), passes * all);
        assert!((got - want).abs() <= 1e-9 * want, "{r}: {got} vs {want}");
    }
    // A narrower ISA than the widest: both probes, the widest faster.
    // Except under an emulator (`./test.sh --aarch64` runs QEMU, which
    // computes a vector's lanes one by one, so its NEON probe reads the
    // same as scalar): there only both probes are checked.
    if j["isa"] != "scalar" {
        let s = bench(&["--only", "conv", "--isa", "scalar"]);
        assert_eq!(s["isa"], "scalar");
        let (narrow, widest) = (
            s["fma_peak_gflops"].as_f64().unwrap(),
            s["widest_fma_peak_gflops"].as_f64().unwrap(),
        );
        assert!(narrow > 0.0 && widest > 0.0, "{s}");
        if std::env::var_os("DMKD_TEST_EMULATED").is_none() {
            assert!(widest > narrow, "{s}");
        } else {
            println!("emulated: probe order not checked ({widest} vs {narrow} GFLOP/s)");
        }
    }
    // The reference backend: no ISA or conv algorithm of its own.
    let r = bench(&["--only", "conv", "--backend", "reference"]);
    assert_eq!(
        (&r["backend"], &r["conv_algo"], &r["isa"]),
        (&"reference".into(), &"-".into(), &"-".into())
    );
    assert_eq!(r["rows"].as_array().unwrap().len(), 9);
}

/// `bench --counters`: the work of one call per row, in the JSON and as a
/// table with one line per pass that ran.
#[test]
fn bench_counters_report_each_rows_work() {
    let j = bench_tiny_json(&["--reps", "1", "--counters"]);
    let p = dmkd::synthetic::Preset::named("tiny").unwrap();
    let passes = ["forward", "input_grad", "weight_grad"];
    for (i, r) in j["rows"].as_array().unwrap().iter().enumerate() {
        let c = &r["counters"];
        let calls = |pass: &str| {
            c[pass]["direct_calls"].as_u64().unwrap() + c[pass]["winograd_calls"].as_u64().unwrap()
        };
        let ran: Vec<&str> = passes.iter().copied().filter(|&q| calls(q) > 0).collect();
        match i {
            0..9 => {
                // A conv row: its own pass, once, with the dense conv's work.
                assert_eq!(ran, [passes[i % 3]], "{r}");
                assert_eq!(calls(passes[i % 3]), 1, "{r}");
                let (h, w) = p.levels[i / 3];
                let macs = c[passes[i % 3]]["macs"].as_u64().unwrap();
                assert!(
                    macs > 0 && macs <= (p.n * h * w * p.c * p.c * 9) as u64,
                    "{r}"
                );
            }
            9 => assert_eq!(ran, ["forward"], "{r}"),
            _ => assert_eq!(ran, passes, "{r}"),
        }
    }
    let o = dmkd(&["bench", "--preset", "tiny", "--reps", "1", "--counters"]);
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success() && t.contains("work of one call per row"),
        "{t}"
    );
    let lines: Vec<Vec<&str>> = t
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == 12 && passes.contains(&f[1]))
        .collect();
    // 9 conv rows with one pass each, the forward row one, the forward and
    // backward row three.
    assert_eq!(lines.len(), 9 + 1 + 3, "{t}");
    assert_eq!(
        (lines[0][0], lines[0][1]),
        ("conv3x3.P3.forward", "forward")
    );
    assert_eq!(
        (lines[12][0], lines[12][1]),
        ("dmkd.forward_backward", "weight_grad")
    );
}
