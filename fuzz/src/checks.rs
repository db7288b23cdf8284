//! What each fuzz target does with its bytes. Shared, via `#[path]`, by the
//! cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and by the corpus replay in
//! `tests/fuzz_corpus.rs`, so `cargo test` runs every checked-in corpus file
//! through exactly the code the fuzzers ran.
//!
//! Every function must return normally for every input: errors are fine,
//! panics, hangs and unbounded allocations are findings. The asserts encode
//! properties that hold for all inputs (round trips; "moderate inputs never
//! overflow", argued in `eval_small`).

use std::sync::Arc;

use dmkd::backend::{CpuBackend, ReferenceBackend};
use dmkd::distill::{Config, EvalOptions, LevelConfig, MaskMode, Method, Problem, TensorMap};
use dmkd::io::npy::{npy_bytes, parse_npy_or_npz};
use dmkd::io::parse_safetensors;
use dmkd::{BackendRef, ConvAlgo, Error, Float, Tensor};

/// Decompression budget of the npy target: far above anything a small input
/// can legitimately need, far below the fuzzer's malloc limit.
pub const NPZ_BUDGET: u64 = 64 << 20;

/// `safetensors_reader`: arbitrary bytes as a `.safetensors` file.
pub fn safetensors_reader(data: &[u8]) {
    if let Ok(f) = parse_safetensors(data, "fuzz") {
        let _ = f.dtype("fuzz");
        for t in f.tensors.values() {
            // The parsed tensor holds exactly its shape's elements.
            let n: usize = t.shape().iter().product();
            assert_eq!(t.to_f64().numel(), n);
        }
    }
}

/// `npy_reader`: arbitrary bytes as a `.npy` or `.npz` file. A `.npy` that
/// parses must survive our writer and parse back bit for bit.
pub fn npy_reader(data: &[u8]) {
    let Ok(f) = parse_npy_or_npz(data, "fuzz", "x", NPZ_BUDGET) else {
        return;
    };
    for t in f.tensors.values() {
        let (bytes, shape, bits) = match t {
            dmkd::io::AnyTensor::F32(t) => (
                npy_bytes(t).expect("a parsed tensor encodes"),
                t.shape().to_vec(),
                t.as_slice()
                    .iter()
                    .map(|x| x.to_bits() as u64)
                    .collect::<Vec<_>>(),
            ),
            dmkd::io::AnyTensor::F64(t) => (
                npy_bytes(t).expect("a parsed tensor encodes"),
                t.shape().to_vec(),
                t.as_slice().iter().map(|x| x.to_bits()).collect(),
            ),
        };
        let back =
            parse_npy_or_npz(&bytes, "rewritten", "x", NPZ_BUDGET).expect("our own .npy parses");
        let b = &back.tensors["x"];
        assert_eq!(b.shape(), shape.as_slice());
        assert_eq!(b.dtype(), t.dtype());
        let back_bits: Vec<u64> = match b {
            dmkd::io::AnyTensor::F32(t) => {
                t.as_slice().iter().map(|x| x.to_bits() as u64).collect()
            }
            dmkd::io::AnyTensor::F64(t) => t.as_slice().iter().map(|x| x.to_bits()).collect(),
        };
        assert_eq!(back_bits, bits);
    }
}

/// `config_parser`: arbitrary bytes as JSON config text. An accepted config
/// is valid and survives `to_json` unchanged.
pub fn config_parser(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = Config::from_json(&text) {
        c.validate().expect("from_json validates");
        let again = Config::from_json(&c.to_json()).expect("to_json output parses");
        assert_eq!(again, c);
    }
}

/// Reads the fuzzer's bytes as small decisions; zeros once they run out, so
/// every input decodes to something.
struct Source<'a> {
    d: &'a [u8],
    i: usize,
}

impl Source<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.d.get(self.i).copied().unwrap_or(0);
        self.i += 1;
        b
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.byte() as usize % from.len()]
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |a, _| (a << 8) | self.byte() as u64)
    }
    /// A value: mostly moderate (multiples of 1/16 in [-8, 8)), sometimes an
    /// edge: zeros, tiny, subnormal, huge, the float maxima, NaN, infinities.
    fn value(&mut self) -> f64 {
        const EDGES: [f64; 16] = [
            0.0,
            -0.0,
            1e-8,
            -1e-30,
            1e-45,
            5e-324,
            100.0,
            -1e4,
            1e19,
            3e38,
            -3.4028234663852886e38,
            1e300,
            f64::MAX,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        let b = self.byte();
        if b < 240 {
            // The next byte: 256 steps of 1/16 from -8.
            (self.byte() as f64 - 128.0) / 16.0
        } else {
            EDGES[(b - 240) as usize]
        }
    }
}

/// Values a config can take, with the "moderate" ones first: an index below
/// `MODERATE` keeps the loss's scale bounded (see `eval_small`).
const TAUS: [f64; 6] = [0.5, 1.0, 1e-3, 100.0, 1e-300, 0.0];
const LAMBDAS: [f64; 7] = [0.0, 0.15, 0.5, 0.65, 0.99, 0.999_999, 1.0];
const ALPHAS: [f64; 6] = [2e-5, 0.0, 1.0, 1e3, 1e30, -1.0];
const MODERATE_ALPHA: f64 = 1e3;

fn level_config(src: &mut Source) -> LevelConfig {
    let alpha = src.pick(&ALPHAS);
    LevelConfig {
        method: src.pick(&[Method::Dmkd, Method::Dmkd, Method::Mgd, Method::Fgd]),
        tau: src.pick(&TAUS),
        lambda_s: src.pick(&LAMBDAS),
        lambda_c: src.pick(&LAMBDAS),
        alpha,
        mask_mode: src.pick(&[MaskMode::Topk, MaskMode::Sampled, MaskMode::Random]),
        seed: src.u64(),
        alpha_fgd: alpha,
        beta_fgd: src.pick(&ALPHAS),
        gamma_fgd: src.pick(&ALPHAS),
        lambda_fgd: src.pick(&ALPHAS),
    }
}

/// A decoded problem: the config, its named tensors (as f64), how absent
/// parameters are handled, and whether every value is moderate.
struct Decoded {
    config: Config,
    tensors: TensorMap<f64>,
    opts: EvalOptions,
    moderate: bool,
}

fn decode(data: &[u8]) -> Decoded {
    let mut src = Source { d: data, i: 0 };
    let mut moderate = true;
    let note = |v: f64, moderate: &mut bool| {
        if !(v.is_finite() && v.abs() <= 100.0) {
            *moderate = false;
        }
        v
    };
    let nlev = 1 + src.byte() as usize % 3;
    let levels: Vec<LevelConfig> = (0..nlev).map(|_| level_config(&mut src)).collect();
    for l in &levels {
        for a in [l.alpha, l.beta_fgd, l.gamma_fgd, l.lambda_fgd] {
            if a > MODERATE_ALPHA {
                moderate = false;
            }
        }
        if l.tau < 1e-3 {
            moderate = false;
        }
    }
    // Dimensions 0..=6 (zero exercises the zero-sized checks); N <= 2.
    let n = src.byte() as usize % 3;
    let mut tensors = TensorMap::new();
    let mut shapes = Vec::new();
    for l in 0..nlev {
        let (cs, c, h, w) = (
            src.byte() as usize % 7,
            src.byte() as usize % 7,
            src.byte() as usize % 7,
            src.byte() as usize % 7,
        );
        // Occasionally a teacher that disagrees with its student.
        let (tn, th) = match src.byte() {
            0 => (n + 1, h),
            1 => (n, h + 1),
            _ => (n, h),
        };
        shapes.push((cs, c, h, w));
        let mut fill = |shape: &[usize], src: &mut Source| {
            Tensor::from_fn(shape, |_| note(src.value(), &mut moderate)).expect("small shape")
        };
        let s = fill(&[n, cs, h, w], &mut src);
        let t = fill(&[tn, c, th, w], &mut src);
        tensors.insert(format!("p{l}.student"), s);
        tensors.insert(format!("p{l}.teacher"), t);
    }
    if levels.iter().any(|l| l.method == Method::Fgd) {
        let mut img = Vec::new();
        for i in 0..n {
            img.push(note(src.value().abs() * 8.0 + 1.0, &mut moderate));
            img.push(note(src.value().abs() * 8.0 + 1.0, &mut moderate));
            let k = src.byte() as usize % 4;
            let mut b = Vec::new();
            for _ in 0..k {
                let (x1, y1) = (src.value() * 4.0, src.value() * 4.0);
                let (dx, dy) = (src.value().abs() * 4.0, src.value().abs() * 4.0);
                for v in [x1, y1, x1 + dx, y1 + dy] {
                    b.push(note(v, &mut moderate));
                }
            }
            tensors.insert(
                format!("gt_boxes.{i}"),
                Tensor::from_vec(&[k, 4], b).expect("k x 4"),
            );
        }
        tensors.insert(
            "img_shape".into(),
            Tensor::from_vec(&[n, 2], img).expect("n x 2"),
        );
    }
    let config = Config { levels };
    // Parameters: from the seed (their values are moderate: |w| <= 1), or
    // some supplied from the fuzzer's values, or none with no seed.
    let supply = src.byte();
    let opts = EvalOptions {
        init_seed: (supply % 4 != 3).then_some(src.u64()),
        allow_extra: supply % 5 == 4,
    };
    if supply % 4 == 1 && config.validate().is_ok() {
        for (l, lc) in config.levels.iter().enumerate() {
            let (cs, c, h, w) = shapes[l];
            let shape = dmkd::distill::LevelShape { n, cs, c, h, w };
            for spec in dmkd::distill::level_param_specs(l, lc, &shape) {
                if src.byte().is_multiple_of(2) {
                    let t = Tensor::from_fn(&spec.shape, |_| note(src.value(), &mut moderate))
                        .expect("small shape");
                    tensors.insert(spec.name, t);
                }
            }
        }
    }
    Decoded {
        config,
        tensors,
        opts,
        moderate,
    }
}

/// `eval_small`: the bytes decode to a small problem (N <= 2, C <= 6,
/// H, W <= 6, 1-3 levels of any method and mask mode, values including NaN,
/// infinities, subnormals and the float maxima, configs in and out of range,
/// supplied or initialised parameters, FGD boxes), validated and evaluated
/// on the reference backend in f64 and f32 and on the cpu backend in f32
/// (`Auto`, and forced Winograd).
///
/// Property: when every value is moderate (|x| <= 100, weights <= 1e3,
/// tau >= 1e-3), evaluation never fails with `NonFinite` (an overflow). Why
/// it holds: with C <= 6 a 3x3 conv multiplies magnitudes by at most
/// 54 x 100 (plus a bias), the 1x1 align conv by 6 x 100; so the features
/// stay below 6e4 (aligned), 3.2e8 (after conv 1) and 1.7e12 (after conv 2),
/// their squared differences summed over <= 432 elements and weighted by
/// <= 1e3 stay near 1e30, and the gradients (the same chain backwards, times
/// the <= 72 positions a weight sees) stay below 1e28: all under f32's 3.4e38.
/// Softmax subtracts its maximum, FGD's LayerNorm divides by at least
/// sqrt(1e-5), and attention is at most H*W = 36 times a softmax.
/// Extreme inputs may fail with `NonFinite`; nothing may panic.
pub fn eval_small(data: &[u8]) {
    let d = decode(data);
    let tensors32: TensorMap<f32> = d
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.cast()))
        .collect();
    let r64 = run::<f64>(&d, &d.tensors, Arc::new(ReferenceBackend));
    let r32 = run::<f32>(&d, &tensors32, Arc::new(ReferenceBackend));
    let c32 = run::<f32>(&d, &tensors32, Arc::new(CpuBackend::new(ConvAlgo::Auto)));
    // `Auto` keeps convs this small direct; forced Winograd runs the tile
    // engine on them (partial tiles, windows mostly padding, masks).
    let w32 = run::<f32>(
        &d,
        &tensors32,
        Arc::new(CpuBackend::new(ConvAlgo::Winograd)),
    );
    let w6 = run::<f32>(
        &d,
        &tensors32,
        Arc::new(CpuBackend::new(ConvAlgo::Winograd6)),
    );
    if d.moderate {
        // Away from overflow, the backends fail (or not) alike: the
        // validation is shared, and only rounding differs.
        for (what, c) in [
            ("cpu", &c32),
            ("cpu winograd", &w32),
            ("cpu winograd6", &w6),
        ] {
            assert_eq!(
                r32.as_ref().err().map(Error::kind),
                c.as_ref().err().map(Error::kind),
                "{what} and reference disagree: {r32:?} vs {c:?}"
            );
        }
        for (what, r) in [("f64", r64.map(|_| ())), ("f32", r32.map(|_| ()))] {
            if let Err(e @ Error::NonFinite { .. }) = r {
                panic!("{what}: moderate inputs overflowed: {e}");
            }
        }
    }
}

/// The loss, or the error.
fn run<T: Float>(d: &Decoded, tensors: &TensorMap<T>, backend: BackendRef<T>) -> Result<T, Error> {
    let p = Problem::new(&d.config, tensors, d.opts)?;
    let e = dmkd::distill::evaluate(backend, &p)?;
    assert!(e.loss.is_finite(), "evaluate returned a non-finite loss");
    Ok(e.loss)
}
