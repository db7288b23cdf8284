//! The CLI: each bad input is one `error:` line on stderr, a non-zero exit
//! status and no panic; golden npy directories and files NumPy wrote
//! evaluate back.

use super::*;

fn dmkd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dmkd"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("the dmkd binary runs")
}

/// Non-zero exit, exactly one stderr line starting with `error:` and
/// containing `needle`, and no panic.
fn assert_one_error_line(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "exit 0; stderr: {err}");
    assert_ne!(o.status.code(), Some(101), "a panic's exit status: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "`{needle}` not in {err}");
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn cli_reports_each_bad_input_in_one_line() {
    let dir = tmp("cli");
    let out = s(&dir.join("out.safetensors"));
    let meta = HashMap::from([("config".to_string(), dmkd1().to_json())]);

    // NaN inside a student: the message names the tensor and the index.
    let mut m = small();
    let mut d = m["p0.student"].to_vec();
    d[3] = f64::NAN;
    set(&mut m, "p0.student", &[2, 3, 3, 5], d);
    let nan = dir.join("nan.safetensors");
    write_safetensors(&nan, &m, &meta).unwrap();
    let o = dmkd(&["eval", "--inputs", &s(&nan), "--out", &out], &[]);
    assert_one_error_line(
        &o,
        "p0.student holds a non-finite value (NaN) at index [0, 0, 0, 3]",
    );

    // A cpu-backend option with another backend: refused, not ignored
    // (the reference backend would otherwise run while the user believes
    // the AVX2 kernels or the direct conv did), on every command that
    // builds a backend, before any work or output.
    let valid = dir.join("valid.safetensors");
    write_safetensors(&valid, &small(), &meta).unwrap();
    let golden_dir = dir.join("golden.safetensors");
    let golden_path = s(&golden_dir);
    let valid_path = s(&valid);
    for args in [
        vec!["eval", "--inputs", &valid_path, "--out", &out],
        vec!["golden", "--out", &golden_path],
        vec!["bench", "--reps", "1", "--only", "conv"],
    ] {
        let mut a = args.clone();
        a.extend(["--backend", "reference", "--isa", "avx2"]);
        assert_one_error_line(
            &dmkd(&a, &[]),
            "isa `avx2` applies to the cpu backend only; the reference backend does not use it",
        );
    }
    assert!(!golden_dir.exists(), "golden wrote a file before refusing");
    let eval_with = |backend: &str| {
        dmkd(
            &[
                "eval",
                "--inputs",
                &valid_path,
                "--out",
                &out,
                "--backend",
                backend,
                "--conv-algo",
                "direct",
            ],
            &[],
        )
    };
    assert_one_error_line(
        &eval_with("reference"),
        "conv algo `direct` applies to the cpu backend only; the reference backend has one algorithm",
    );
    let o = eval_with("cpu");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // An f64 value beyond f32's range, evaluated in f32: the conversion is
    // named, not blamed on the file as an infinity it does not hold. The
    // same file in f64 evaluates.
    let mut m = small();
    let mut d = m["p0.student"].to_vec();
    d[3] = 1e40;
    set(&mut m, "p0.student", &[2, 3, 3, 5], d);
    let huge = dir.join("huge.safetensors");
    write_safetensors(&huge, &m, &meta).unwrap();
    let o = dmkd(
        &[
            "eval",
            "--inputs",
            &s(&huge),
            "--out",
            &out,
            "--dtype",
            "f32",
        ],
        &[],
    );
    assert_one_error_line(
        &o,
        "p0.student: 1e40 at index [0, 0, 0, 3] is beyond f32's range; compute in f64",
    );
    let o = dmkd(&["eval", "--inputs", &s(&huge), "--out", &out], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A tensor name with a newline and an escape sequence stays on one line.
    let mut m = small();
    m.insert("evil\nname\x1b[2J".into(), values(&[1], 0));
    let evil = dir.join("evil.safetensors");
    write_safetensors(&evil, &m, &meta).unwrap();
    let o = dmkd(&["eval", "--inputs", &s(&evil), "--out", &out], &[]);
    assert_one_error_line(&o, "unexpected tensor `evil\\nname\\u{1b}[2J`");

    // Truncated npy, absent file, bad config.
    let cut = dir.join("p0.student.npy");
    std::fs::write(&cut, &npy_of(&[2, 3, 3, 5])[..200]).unwrap();
    let o = dmkd(&["eval", "--inputs", &s(&cut), "--out", &out], &[]);
    assert_one_error_line(
        &o,
        "header claims 360 bytes of data (shape [2, 3, 3, 5], f32), the file holds 72 after its header",
    );
    let o = dmkd(
        &["eval", "--inputs", "/nonexistent/x.npz", "--out", &out],
        &[],
    );
    assert_one_error_line(&o, "i/o error on /nonexistent/x.npz");
    let good = dir.join("good.safetensors");
    write_safetensors(&good, &small(), &meta).unwrap();
    let bad_cfg = dir.join("tau0.json");
    std::fs::write(&bad_cfg, r#"{"levels":[{"tau":0}]}"#).unwrap();
    let o = dmkd(
        &[
            "eval",
            "--inputs",
            &s(&good),
            "--config",
            &s(&bad_cfg),
            "--out",
            &out,
        ],
        &[],
    );
    assert_one_error_line(&o, "tau = 0 is invalid");

    // A device of endless bytes is refused at the size bound, not read forever.
    if Path::new("/dev/zero").exists() {
        let o = dmkd(
            &["eval", "--inputs", "/dev/zero", "--out", &out],
            &[("DMKD_MAX_FILE_BYTES", "4096")],
        );
        assert_one_error_line(&o, "over the limit of 4096 bytes");
        let o = dmkd(
            &[
                "eval",
                "--inputs",
                &s(&good),
                "--config",
                "/dev/zero",
                "--out",
                &out,
            ],
            &[],
        );
        assert_one_error_line(&o, "over the limit");
    }
    // A file over DMKD_MAX_FILE_BYTES.
    let o = dmkd(
        &["verify", "--expected", &s(&good), "--actual", &s(&good)],
        &[("DMKD_MAX_FILE_BYTES", "100")],
    );
    assert_one_error_line(&o, "over the limit of 100 bytes");
    // A bound that is not a byte count: refused, not silently the default.
    let o = dmkd(
        &["verify", "--expected", &s(&good), "--actual", &s(&good)],
        &[("DMKD_MAX_FILE_BYTES", "4k")],
    );
    assert_one_error_line(&o, "DMKD_MAX_FILE_BYTES: \"4k\" is not a byte count");
    let o = dmkd(
        &["eval", "--inputs", &s(&good), "--out", &out],
        &[("DMKD_MAX_PROBLEM_BYTES", "lots")],
    );
    assert_one_error_line(&o, "DMKD_MAX_PROBLEM_BYTES: \"lots\" is not a byte count");
    // Files with no tensor in common: nothing compared is no pass, even
    // with the extra tensors allowed.
    let other = dir.join("other.safetensors");
    let renamed: TensorMap<f64> = small()
        .into_iter()
        .map(|(k, v)| (format!("x.{k}"), v))
        .collect();
    write_safetensors(&other, &renamed, &HashMap::new()).unwrap();
    let o = dmkd(
        &[
            "verify",
            "--expected",
            &s(&good),
            "--actual",
            &s(&other),
            "--allow-extra",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.ends_with("FAIL: no tensor is in both files, nothing compared\n"),
        "{t}"
    );
    // Garbage for verify.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"\x01\x02\x03 not a tensor file").unwrap();
    let o = dmkd(
        &["verify", "--expected", &s(&good), "--actual", &s(&junk)],
        &[],
    );
    assert_one_error_line(&o, "malformed file");
    // A sample offset in the metadata that is not a u64.
    let lying = dir.join("bad_offset.safetensors");
    let mut bad_meta = meta.clone();
    bad_meta.insert("sample_offset".into(), "-3".into());
    write_safetensors(&lying, &small(), &bad_meta).unwrap();
    let o = dmkd(&["eval", "--inputs", &s(&lying), "--out", &out], &[]);
    assert_one_error_line(&o, "`sample_offset` metadata \"-3\" is not an integer");
    // An npy directory without metadata and without --config.
    let d = dir.join("npydir");
    write_npy_dir(&d, &small(), &HashMap::new()).unwrap();
    let o = dmkd(&["eval", "--inputs", &s(&d), "--out", &out], &[]);
    assert_one_error_line(&o, "no --config given");
}

#[test]
fn cli_golden_npy_directory_evaluates_back() {
    let dir = tmp("golden-npy");
    let g = dir.join("golden");
    let o = dmkd(&["golden", "--format", "npy", "--out", &s(&g)], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(g.join("p0.student.npy").is_file() && g.join("metadata.json").is_file());
    let out = dir.join("eval.safetensors");
    let o = dmkd(
        &[
            "eval",
            "--inputs",
            &s(&g),
            "--out",
            &s(&out),
            "--no-init",
            "--allow-extra",
            "--backend",
            "reference",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The directory's own `loss.npy` is the golden loss; eval reproduces it.
    let golden = read_tensor_file(&g).unwrap();
    let got = read_tensor_file(&out).unwrap();
    let (a, b) = (
        golden.tensors["loss"].to_f64(),
        got.tensors["loss"].to_f64(),
    );
    assert_eq!(a.as_slice(), b.as_slice());
}

/// Files NumPy 2.4 wrote (`np.save`, `np.savez`, `np.savez_compressed`,
/// `format.write_array` versions 2 and 3), checked in as fuzz seeds: the
/// supported ones read with the right shape, the others get typed errors.
#[test]
fn files_numpy_wrote() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/npy_reader");
    let read = |f: &str| read_tensor_file(&dir.join(format!("numpy_{f}")));
    for (f, shape) in [
        ("p0.student.npy", vec![1, 3, 2, 2]),
        ("p0.teacher.npy", vec![1, 4, 2, 2]),
        ("scalar.npy", vec![]),
        ("empty.npy", vec![0, 3]),
        ("v2.npy", vec![2, 2]),
        ("v3.npy", vec![4]),
    ] {
        let t = read(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(t.tensors.len(), 1);
        let name = f.trim_end_matches(".npy");
        assert_eq!(
            t.tensors[&format!("numpy_{name}")].shape(),
            shape.as_slice(),
            "{f}"
        );
    }
    for f in ["stored.npz", "deflated.npz"] {
        let t = read(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(t.tensors["p0.student"].shape(), &[1, 3, 2, 2]);
        assert_eq!(t.tensors["p0.teacher"].shape(), &[1, 4, 2, 2]);
    }
    for (f, kind) in [
        ("fortran.npy", "format"),
        ("bigendian.npy", "dtype"),
        ("int.npy", "dtype"),
        ("f16.npy", "dtype"),
        ("structured.npy", "dtype"),
    ] {
        assert_eq!(read(f).unwrap_err().kind(), kind, "{f}");
    }
}

/// A config survives `to_json` bit for bit (golden files carry their config
/// as JSON metadata). Found by the `config_parser` fuzzer: without serde_json's
/// `float_roundtrip`, `191e99` parsed to 1.91e101 but its printed form
/// `1.91e101` parsed back one ulp lower.
#[test]
fn configs_round_trip_exactly() {
    for v in [
        "191e99",
        "0.65",
        "0.45000000000000001",
        "2e-5",
        "5e-324",
        "1.7976931348623157e308",
    ] {
        let c = cfg(&format!(r#"{{"levels":[{{"alpha":{v}}}]}}"#));
        let back = cfg(&c.to_json());
        assert_eq!(
            back.levels[0].alpha.to_bits(),
            c.levels[0].alpha.to_bits(),
            "{v}"
        );
        assert_eq!(
            c.levels[0].alpha,
            v.parse::<f64>().unwrap(),
            "{v} is not correctly rounded"
        );
    }
}
