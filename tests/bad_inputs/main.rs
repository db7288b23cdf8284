//! Every bad input gets a typed error, never a panic, a hang or a silent
//! default: a table of (description, input builder, expected `Error::kind()`),
//! plus CLI cases (one `error:` line on stderr, non-zero exit, no panic).
//!
//! The table is the contract users rely on when they feed dmkd files from
//! their own detectors: each row asserts the exact kind, so a regression that
//! turns, say, a truncated file into an I/O error or a panic fails here.

use std::collections::HashMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use dmkd::backend::ReferenceBackend;
use dmkd::distill::{Config, EvalOptions, Problem, TensorMap, evaluate};
use dmkd::io::npy::{npy_bytes, parse_npy, parse_npy_or_npz, parse_npz, write_npy_dir};
use dmkd::io::{AnyTensor, TensorFile, parse_safetensors, read_tensor_file, write_safetensors};
use dmkd::{Error, Float, Result, Tensor};

mod cli;
mod files;
mod problems;

// ---------------------------------------------------------------- builders

/// Deterministic, varied values (no RNG crate needed): a scaled sine.
fn values<T: Float>(shape: &[usize], salt: usize) -> Tensor<T> {
    Tensor::from_fn(shape, |i| {
        T::from_f64(((i * 7 + salt * 13) as f64 * 0.37).sin())
    })
    .unwrap()
}

/// Inputs of `levels` DMKD levels, N x C x H x W each (student channels `cs`).
fn inputs<T: Float>(
    levels: usize,
    n: usize,
    cs: usize,
    c: usize,
    h: usize,
    w: usize,
) -> TensorMap<T> {
    let mut m = TensorMap::new();
    for l in 0..levels {
        m.insert(format!("p{l}.student"), values(&[n, cs, h, w], 2 * l));
        m.insert(format!("p{l}.teacher"), values(&[n, c, h, w], 2 * l + 1));
    }
    m
}

fn small_t<T: Float>() -> TensorMap<T> {
    inputs(1, 2, 3, 4, 3, 5)
}

/// The baseline: one level, N = 2, Cs = 3, C = 4, H = 3, W = 5, f64.
fn small() -> TensorMap<f64> {
    small_t()
}

fn cfg(json: &str) -> Config {
    Config::from_json(json).unwrap()
}

fn dmkd1() -> Config {
    cfg(r#"{"levels":[{}]}"#)
}

const INIT: EvalOptions = EvalOptions {
    init_seed: Some(1),
    allow_extra: false,
};
const NO_INIT: EvalOptions = EvalOptions {
    init_seed: None,
    allow_extra: false,
};

/// Validate and evaluate on the reference backend: the whole path from
/// named tensors to the loss.
fn run<T: Float>(config: &Config, m: &TensorMap<T>, opts: EvalOptions) -> Result<()> {
    let p = Problem::new(config, m, opts)?;
    evaluate(Arc::new(ReferenceBackend), &p).map(|_| ())
}

fn with<T: Float>(mut m: TensorMap<T>, f: impl FnOnce(&mut TensorMap<T>)) -> TensorMap<T> {
    f(&mut m);
    m
}

fn set(m: &mut TensorMap<f64>, name: &str, shape: &[usize], v: Vec<f64>) {
    m.insert(name.into(), Tensor::from_vec(shape, v).unwrap());
}

/// Valid FGD inputs: one level, boxes for a batch of 2.
fn fgd_inputs() -> TensorMap<f64> {
    with(small(), |m| {
        set(m, "img_shape", &[2, 2], vec![30.0, 50.0, 30.0, 50.0]);
        set(m, "gt_boxes.0", &[1, 4], vec![1.0, 2.0, 20.0, 25.0]);
        set(
            m,
            "gt_boxes.1",
            &[2, 4],
            vec![0.0, 0.0, 10.0, 10.0, 5.0, 5.0, 40.0, 28.0],
        );
    })
}

fn fgd1() -> Config {
    cfg(r#"{"levels":[{"method":"fgd"}]}"#)
}

fn st_bytes(m: &TensorMap<f64>) -> Vec<u8> {
    let dir = tmp("st");
    let p = dir.join("x.safetensors");
    write_safetensors(&p, m, &HashMap::new()).unwrap();
    std::fs::read(p).unwrap()
}

/// A safetensors file from a raw JSON header and data bytes.
fn st_raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

/// A version-1 `.npy` from a raw header dict and data bytes.
fn npy_raw(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    b.extend_from_slice(dict.as_bytes());
    b.extend_from_slice(data);
    b
}

fn npy_of(shape: &[usize]) -> Vec<u8> {
    npy_bytes(&values::<f32>(shape, 0)).unwrap()
}

fn npz(members: &[(&str, Vec<u8>)], deflate: bool) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let method = if deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let opts = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, bytes) in members {
            z.start_file(*name, opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// A fresh directory under the system's temp dir, removed with everything
/// in it when dropped (each run used to leave seven behind).
struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn tmp(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("dmkd-bad-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn unit(r: Result<TensorFile>) -> Result<()> {
    r.map(|_| ())
}

type Builder = Box<dyn Fn() -> Result<()>>;

// ------------------------------------------------------------------- table

/// The whole table: problem inputs (`problems.rs`), then files (`files.rs`).
fn cases() -> Vec<(&'static str, Builder, &'static str)> {
    let mut v = problems::cases();
    v.extend(files::cases());
    v
}

fn unit_cfg(text: &str) -> Result<()> {
    Config::from_json(text).map(|_| ())
}

#[test]
fn every_bad_input_has_its_typed_error() {
    let mut failures = Vec::new();
    for (what, build, kind) in cases() {
        match build() {
            Ok(()) => failures.push(format!("{what}: accepted, expected {kind}")),
            Err(e) if e.kind() != kind => {
                failures.push(format!("{what}: got {} ({e}), expected {kind}", e.kind()))
            }
            Err(e) => {
                // One line each: the CLI prints the message as it is.
                if e.to_string().contains('\n') {
                    failures.push(format!("{what}: multi-line message {e:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The table's inputs differ from valid ones by one thing: check the valid
/// ones pass, so each row's error comes from what the row changed.
#[test]
fn the_valid_baselines_pass() {
    run(&dmkd1(), &small(), INIT).unwrap();
    run(&dmkd1(), &small_t::<f32>(), INIT).unwrap();
    run(&fgd1(), &fgd_inputs(), INIT).unwrap();
    run(
        &cfg(r#"{"levels":[{},{}]}"#),
        &inputs::<f64>(2, 2, 3, 4, 2, 2),
        INIT,
    )
    .unwrap();
    let b = st_bytes(&small());
    assert_eq!(parse_safetensors(&b, "x").unwrap().tensors.len(), 2);
    parse_npy(&npy_of(&[2, 3]), "x").unwrap();
    parse_npz(&npz(&[("a.npy", npy_of(&[3]))], true), "x", 1 << 20).unwrap();
    parse_npz(&npz(&[("a.npy", npy_of(&[3]))], false), "x", 1 << 20).unwrap();
    // The one inflating past 1 MiB fits a larger budget.
    let big = npz(
        &[(
            "a.npy",
            npy_bytes(&Tensor::<f64>::zeros(&[512, 512]).unwrap()).unwrap(),
        )],
        true,
    );
    parse_npz(&big, "x", 4 << 20).unwrap();
}

#[test]
fn a_non_finite_input_is_named_with_its_multi_index() {
    let mut m = small();
    let mut d = m["p0.teacher"].to_vec();
    // [2, 4, 3, 5]: flat 1*60 + 2*15 + 1*5 + 3 = 98.
    d[98] = f64::NAN;
    d[99] = f64::INFINITY;
    set(&mut m, "p0.teacher", &[2, 4, 3, 5], d);
    match Problem::new(&dmkd1(), &m, INIT).err() {
        Some(Error::NonFinite {
            tensor,
            index,
            value,
        }) => {
            assert_eq!(tensor, "p0.teacher");
            assert_eq!(index, vec![1, 2, 1, 3]);
            assert!(value.is_nan());
        }
        other => panic!("expected non_finite, got {other:?}"),
    }
}

#[test]
fn npy_directories_and_npz_round_trip_through_eval() {
    // The same problem from safetensors-like maps, a directory of .npy and an
    // .npz evaluates to the same loss.
    let m = small();
    let direct = Problem::new(&dmkd1(), &m, INIT).unwrap();
    let want = evaluate(Arc::new(ReferenceBackend), &direct).unwrap().loss;
    let dir = tmp("rt");
    let meta = HashMap::from([("config".to_string(), dmkd1().to_json())]);
    write_npy_dir(&dir, &m, &meta).unwrap();
    let f = read_tensor_file(&dir).unwrap();
    assert_eq!(f.metadata["config"], dmkd1().to_json());
    let members: Vec<(String, Vec<u8>)> = m
        .iter()
        .map(|(k, t)| (format!("{k}.npy"), npy_bytes(t).unwrap()))
        .collect();
    let members: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(k, b)| (k.as_str(), b.clone()))
        .collect();
    let z = npz(&members, true);
    let zf = parse_npz(&z, "x", 1 << 20).unwrap();
    for file in [f, zf] {
        let p = Problem::new(&dmkd1(), &file.to_map::<f64>().unwrap(), INIT).unwrap();
        let got = evaluate(Arc::new(ReferenceBackend), &p).unwrap().loss;
        assert_eq!(got.to_bits(), want.to_bits());
    }
}
