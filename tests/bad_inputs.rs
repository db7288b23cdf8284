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

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dmkd-bad-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn unit(r: Result<TensorFile>) -> Result<()> {
    r.map(|_| ())
}

type Builder = Box<dyn Fn() -> Result<()>>;

// ------------------------------------------------------------------- table

fn cases() -> Vec<(&'static str, Builder, &'static str)> {
    let nan_at = |name: &'static str, i: usize, v: f64| {
        with(small(), move |m| {
            let t = &m[name];
            let mut d = t.to_vec();
            d[i] = v;
            let shape = t.shape().to_vec();
            set(m, name, &shape, d);
        })
    };
    vec![
        // ---- named tensors: presence
        (
            "teacher missing",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        m.remove("p0.teacher");
                    }),
                    INIT,
                )
            }),
            "missing_tensor",
        ),
        (
            "student missing",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        m.remove("p0.student");
                    }),
                    INIT,
                )
            }),
            "missing_tensor",
        ),
        (
            "second level absent from the inputs",
            Box::new(|| run(&cfg(r#"{"levels":[{},{}]}"#), &small(), INIT)),
            "missing_tensor",
        ),
        (
            "parameter missing and no init seed",
            Box::new(|| run(&dmkd1(), &small(), NO_INIT)),
            "missing_tensor",
        ),
        (
            "misspelt input name",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        let t = m["p0.student"].clone();
                        m.insert("p0.studnet".into(), t);
                    }),
                    INIT,
                )
            }),
            "unexpected_tensor",
        ),
        (
            "misspelt parameter name",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| set(m, "p0.fusoin", &[2], vec![0.0, 0.0])),
                    INIT,
                )
            }),
            "unexpected_tensor",
        ),
        (
            "fgd boxes given to a dmkd level",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| set(m, "img_shape", &[2, 2], vec![1.0; 4])),
                    INIT,
                )
            }),
            "unexpected_tensor",
        ),
        // ---- shapes
        (
            "student of rank 3",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.student", &[2, 3, 15], vec![0.5; 90])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "teacher of rank 5",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.teacher", &[2, 4, 3, 5, 1], vec![0.5; 120])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "student and teacher differ in N",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.teacher", &[1, 4, 3, 5], vec![0.5; 60])
                    }),
                    INIT,
                )
            }),
            "shape_mismatch",
        ),
        (
            "student and teacher differ in H",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.teacher", &[2, 4, 2, 5], vec![0.5; 80])
                    }),
                    INIT,
                )
            }),
            "shape_mismatch",
        ),
        (
            "student and teacher differ in W",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.teacher", &[2, 4, 3, 4], vec![0.5; 96])
                    }),
                    INIT,
                )
            }),
            "shape_mismatch",
        ),
        (
            "levels differ in batch",
            Box::new(|| {
                let mut m = small();
                m.extend(
                    inputs::<f64>(2, 1, 3, 4, 2, 2)
                        .into_iter()
                        .filter(|(k, _)| k.starts_with("p1.")),
                );
                run(&cfg(r#"{"levels":[{},{}]}"#), &m, INIT)
            }),
            "shape_mismatch",
        ),
        (
            "zero batch",
            Box::new(|| run(&dmkd1(), &inputs::<f64>(1, 0, 3, 4, 3, 5), INIT)),
            "zero_sized",
        ),
        (
            "zero height",
            Box::new(|| run(&dmkd1(), &inputs::<f64>(1, 2, 3, 4, 0, 5), INIT)),
            "zero_sized",
        ),
        (
            "zero student channels",
            Box::new(|| run(&dmkd1(), &inputs::<f64>(1, 2, 0, 4, 3, 5), INIT)),
            "zero_sized",
        ),
        (
            "zero teacher channels",
            Box::new(|| run(&dmkd1(), &inputs::<f64>(1, 2, 3, 0, 3, 5), INIT)),
            "zero_sized",
        ),
        (
            "parameter of the wrong shape",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| set(m, "p0.fusion", &[3], vec![0.0; 3])),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "align weight transposed",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.align.weight", &[3, 4, 1, 1], vec![0.1; 12])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        // ---- values
        (
            "NaN in a student",
            Box::new(move || run(&dmkd1(), &nan_at("p0.student", 17, f64::NAN), INIT)),
            "non_finite",
        ),
        (
            "+Inf in a teacher",
            Box::new(move || run(&dmkd1(), &nan_at("p0.teacher", 0, f64::INFINITY), INIT)),
            "non_finite",
        ),
        (
            "-Inf in a parameter",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.fusion", &[2], vec![0.0, f64::NEG_INFINITY])
                    }),
                    INIT,
                )
            }),
            "non_finite",
        ),
        (
            "finite f32 inputs whose squares overflow",
            Box::new(|| {
                let m: TensorMap<f32> =
                    small_t::<f32>()
                        .into_iter()
                        .map(|(k, t)| {
                            let big = Tensor::from_fn(t.shape(), |i| {
                                if i % 2 == 0 { 3e37f32 } else { -3e37 }
                            })
                            .unwrap();
                            (k, big)
                        })
                        .collect();
                run(&dmkd1(), &m, INIT)
            }),
            "non_finite",
        ),
        // ---- FGD boxes
        (
            "fgd without img_shape",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        m.remove("img_shape");
                    }),
                    INIT,
                )
            }),
            "missing_tensor",
        ),
        (
            "fgd without the boxes of image 1",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        m.remove("gt_boxes.1");
                    }),
                    INIT,
                )
            }),
            "missing_tensor",
        ),
        (
            "fgd img_shape of the wrong shape",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "img_shape", &[2, 3], vec![30.0; 6])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "fgd boxes of width 5",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "gt_boxes.0", &[1, 5], vec![1.0; 5])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "fgd boxes of rank 1",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| set(m, "gt_boxes.0", &[4], vec![1.0; 4])),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "fgd box with x2 < x1",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "gt_boxes.0", &[1, 4], vec![20.0, 2.0, 1.0, 25.0])
                    }),
                    INIT,
                )
            }),
            "invalid_argument",
        ),
        (
            "fgd box with NaN",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "gt_boxes.0", &[1, 4], vec![1.0, f64::NAN, 20.0, 25.0])
                    }),
                    INIT,
                )
            }),
            "non_finite",
        ),
        (
            "fgd image of height 0",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "img_shape", &[2, 2], vec![0.0, 50.0, 30.0, 50.0])
                    }),
                    INIT,
                )
            }),
            "invalid_argument",
        ),
        // ---- sizes: refused before allocating
        (
            "80 KB teacher implying 230 GB of generator weights",
            Box::new(|| run(&dmkd1(), &inputs::<f32>(1, 1, 1, 40_000, 1, 1), INIT)),
            "too_large",
        ),
        // ---- config
        (
            "tau = 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"tau":0}]}"#)),
            "config",
        ),
        (
            "tau < 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"tau":-0.5}]}"#)),
            "config",
        ),
        (
            "lambda_s = 1",
            Box::new(|| unit_cfg(r#"{"levels":[{"lambda_s":1.0}]}"#)),
            "config",
        ),
        (
            "lambda_c < 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"lambda_c":-0.01}]}"#)),
            "config",
        ),
        (
            "alpha < 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"alpha":-2e-5}]}"#)),
            "config",
        ),
        (
            "beta_fgd < 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"beta_fgd":-1}]}"#)),
            "config",
        ),
        (
            "tau out of f64 range",
            Box::new(|| unit_cfg(r#"{"levels":[{"tau":1e999}]}"#)),
            "config",
        ),
        (
            "unknown key",
            Box::new(|| unit_cfg(r#"{"levels":[{"lamda_s":0.5}]}"#)),
            "config",
        ),
        (
            "unknown top-level key",
            Box::new(|| unit_cfg(r#"{"levels":[{}],"level":[]}"#)),
            "config",
        ),
        (
            "unknown method",
            Box::new(|| unit_cfg(r#"{"levels":[{"method":"kd"}]}"#)),
            "config",
        ),
        (
            "seed not an integer",
            Box::new(|| unit_cfg(r#"{"levels":[{"seed":1.5}]}"#)),
            "config",
        ),
        (
            "no levels",
            Box::new(|| unit_cfg(r#"{"levels":[]}"#)),
            "config",
        ),
        (
            "65 levels",
            Box::new(|| unit_cfg(&format!(r#"{{"levels":[{}{{}}]}}"#, "{},".repeat(64)))),
            "config",
        ),
        (
            "not JSON",
            Box::new(|| unit_cfg("levels: [tau: 0.5]")),
            "config",
        ),
        (
            "JSON nested 10,000 deep",
            Box::new(|| unit_cfg(&"[".repeat(10_000))),
            "config",
        ),
        (
            "config over 1 MiB",
            Box::new(|| unit_cfg(&format!(r#"{{"levels":[{{}}]}}{}"#, " ".repeat(1 << 20)))),
            "config",
        ),
        // ---- safetensors
        (
            "empty safetensors",
            Box::new(|| unit(parse_safetensors(&[], "x"))),
            "format",
        ),
        (
            "safetensors cut in the header",
            Box::new(|| {
                let b = st_bytes(&small());
                unit(parse_safetensors(&b[..20], "x"))
            }),
            "format",
        ),
        (
            "safetensors cut in the data",
            Box::new(|| {
                let b = st_bytes(&small());
                unit(parse_safetensors(&b[..b.len() - 3], "x"))
            }),
            "format",
        ),
        (
            "safetensors header length u64::MAX",
            Box::new(|| unit(parse_safetensors(&[0xff; 64], "x"))),
            "format",
        ),
        (
            "safetensors header not JSON",
            Box::new(|| unit(parse_safetensors(&st_raw("{\"a\":", &[]), "x"))),
            "format",
        ),
        (
            "safetensors claiming 4 TB",
            Box::new(|| {
                unit(parse_safetensors(
                    &st_raw(
                        r#"{"x":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}"#,
                        &[0; 8],
                    ),
                    "x",
                ))
            }),
            "format",
        ),
        (
            "safetensors shape whose product overflows",
            Box::new(|| {
                unit(parse_safetensors(
                    &st_raw(
                        r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
                        &[],
                    ),
                    "x",
                ))
            }),
            "format",
        ),
        (
            "safetensors f16 tensor",
            Box::new(|| {
                unit(parse_safetensors(
                    &st_raw(
                        r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
                        &[0; 4],
                    ),
                    "x",
                ))
            }),
            "dtype",
        ),
        (
            "safetensors i64 tensor",
            Box::new(|| {
                unit(parse_safetensors(
                    &st_raw(
                        r#"{"x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
                        &[0; 8],
                    ),
                    "x",
                ))
            }),
            "dtype",
        ),
        (
            "file mixing f32 and f64",
            Box::new(|| {
                let mut f = TensorFile::default();
                f.tensors
                    .insert("a".into(), AnyTensor::F32(values(&[2], 0)));
                f.tensors
                    .insert("b".into(), AnyTensor::F64(values(&[2], 0)));
                f.dtype("x").map(|_| ())
            }),
            "dtype",
        ),
        // ---- npy
        (
            "empty npy",
            Box::new(|| parse_npy(&[], "x").map(|_| ())),
            "format",
        ),
        (
            "npy bad magic",
            Box::new(|| parse_npy(b"\x93NUMPZ\x01\x00\x00\x00", "x").map(|_| ())),
            "format",
        ),
        (
            "npy version 4",
            Box::new(|| {
                let mut b = npy_of(&[2]);
                b[6] = 4;
                parse_npy(&b, "x").map(|_| ())
            }),
            "format",
        ),
        (
            "npy cut in the header",
            Box::new(|| parse_npy(&npy_of(&[2, 3])[..40], "x").map(|_| ())),
            "format",
        ),
        (
            "npy cut in the data",
            Box::new(|| {
                let b = npy_of(&[2, 3]);
                parse_npy(&b[..b.len() - 1], "x").map(|_| ())
            }),
            "format",
        ),
        (
            "npy with trailing bytes",
            Box::new(|| {
                let mut b = npy_of(&[2, 3]);
                b.push(0);
                parse_npy(&b, "x").map(|_| ())
            }),
            "format",
        ),
        (
            "npy v2 header length 4 GB",
            Box::new(|| parse_npy(b"\x93NUMPY\x02\x00\xff\xff\xff\xff{}", "x").map(|_| ())),
            "format",
        ),
        (
            "npy shape 2^32 x 2^32 x 2^32",
            Box::new(|| {
                parse_npy(&npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }", &[0; 4]), "x").map(|_| ())
            }),
            "too_large",
        ),
        (
            "npy dimension over u64",
            Box::new(|| {
                parse_npy(&npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551616,), }", &[0; 4]), "x").map(|_| ())
            }),
            "format",
        ),
        (
            "npy claiming 4 GB in a 100-byte file",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "format",
        ),
        (
            "npy big-endian f4",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "dtype",
        ),
        (
            "npy float16",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "dtype",
        ),
        (
            "npy int32",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "dtype",
        ),
        (
            "npy structured dtype",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "dtype",
        ),
        (
            "npy Fortran order 2x2",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                        &[0; 16],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "format",
        ),
        (
            "npy header without shape",
            Box::new(|| {
                parse_npy(
                    &npy_raw("{'descr': '<f4', 'fortran_order': False, }", &[0; 4]),
                    "x",
                )
                .map(|_| ())
            }),
            "format",
        ),
        (
            "npy header not a dict",
            Box::new(|| parse_npy(&npy_raw("__import__('os')", &[0; 4]), "x").map(|_| ())),
            "format",
        ),
        // ---- npz
        (
            "npz cut in half",
            Box::new(|| {
                let b = npz(&[("a.npy", npy_of(&[3]))], false);
                unit(parse_npz(&b[..b.len() / 2], "x", 1 << 20))
            }),
            "format",
        ),
        (
            "npz central directory corrupt",
            Box::new(|| {
                let mut b = npz(&[("a.npy", npy_of(&[3]))], false);
                let n = b.len();
                b[n - 10] ^= 0xff;
                b[n - 6] ^= 0xff;
                unit(parse_npz(&b, "x", 1 << 20))
            }),
            "format",
        ),
        (
            "npz member that is not .npy",
            Box::new(|| {
                unit(parse_npz(
                    &npz(&[("a.txt", b"hello".to_vec())], false),
                    "x",
                    1 << 20,
                ))
            }),
            "format",
        ),
        (
            "npz member that is big-endian",
            Box::new(|| {
                unit(parse_npz(
                    &npz(
                        &[(
                            "a.npy",
                            npy_raw(
                                "{'descr': '>f8', 'fortran_order': False, 'shape': (1,), }",
                                &[0; 8],
                            ),
                        )],
                        true,
                    ),
                    "x",
                    1 << 20,
                ))
            }),
            "dtype",
        ),
        (
            "npz member cut short",
            Box::new(|| {
                let b = npy_of(&[4, 4]);
                unit(parse_npz(
                    &npz(&[("a.npy", b[..b.len() - 4].to_vec())], true),
                    "x",
                    1 << 20,
                ))
            }),
            "format",
        ),
        (
            "npz inflating past its budget",
            Box::new(|| {
                unit(parse_npz(
                    &npz(
                        &[(
                            "a.npy",
                            npy_bytes(&Tensor::<f64>::zeros(&[512, 512]).unwrap()).unwrap(),
                        )],
                        true,
                    ),
                    "x",
                    1 << 20,
                ))
            }),
            "too_large",
        ),
        (
            "npz with bad metadata.json",
            Box::new(|| {
                unit(parse_npz(
                    &npz(&[("metadata.json", b"{\"config\": 3}".to_vec())], false),
                    "x",
                    1 << 20,
                ))
            }),
            "format",
        ),
        (
            "bytes neither npy nor npz",
            Box::new(|| unit(parse_npy_or_npz(b"GIF89a", "x", "x", 1 << 20))),
            "format",
        ),
        // ---- files and directories
        (
            "inputs file does not exist",
            Box::new(|| {
                unit(read_tensor_file(Path::new(
                    "/nonexistent/dmkd/in.safetensors",
                )))
            }),
            "io",
        ),
        (
            "directory without .npy files",
            Box::new(|| unit(read_tensor_file(&tmp("empty-dir")))),
            "format",
        ),
        (
            "directory whose metadata.json is not JSON",
            Box::new(|| {
                let d = tmp("bad-meta");
                std::fs::write(d.join("a.npy"), npy_of(&[2])).unwrap();
                std::fs::write(d.join("metadata.json"), "config = 1").unwrap();
                unit(read_tensor_file(&d))
            }),
            "format",
        ),
        (
            "a tensor name that is a path",
            Box::new(|| {
                let m: TensorMap<f64> = [("../evil".to_string(), values(&[1], 0))].into();
                write_npy_dir(&tmp("evil"), &m, &HashMap::new())
            }),
            "format",
        ),
    ]
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
        let p = Problem::new(&dmkd1(), &file.to_map::<f64>(), INIT).unwrap();
        let got = evaluate(Arc::new(ReferenceBackend), &p).unwrap().loss;
        assert_eq!(got.to_bits(), want.to_bits());
    }
}

// --------------------------------------------------------------------- CLI

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
    // Garbage for verify.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"\x01\x02\x03 not a tensor file").unwrap();
    let o = dmkd(
        &["verify", "--expected", &s(&good), "--actual", &s(&junk)],
        &[],
    );
    assert_one_error_line(&o, "malformed file");
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
