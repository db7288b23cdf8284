//! The whole loss (DMKD in every mask mode, extreme ratios, MGD, FGD, a
//! RetinaNet-sized level) on every backend against the reference, and the
//! f32 accuracy requirement.

use std::sync::Arc;

use dmkd::backend::ReferenceBackend;
use dmkd::distill::{EvalOptions, Evaluation, MaskMode, Method, Problem, TensorMap, evaluate};
use dmkd::gradcheck::{LossLevel, random_problem};
use dmkd::{Float, Tensor};

use crate::common::backends::backends;
use crate::common::rules::norm_rel;
fn level(method: Method, cs: usize, c: usize, hw: (usize, usize), mode: MaskMode) -> LossLevel {
    LossLevel {
        method,
        cs,
        c,
        h: hw.0,
        w: hw.1,
        mode,
        lambda_s: 0.65,
        lambda_c: 0.65,
        tau: 0.5,
        seed: 7,
    }
}

/// The same problem in f32: inputs, parameters and boxes rounded.
fn to_f32(p: &Problem<f64>) -> Problem<f32> {
    let mut t = TensorMap::new();
    for (l, (s, te)) in p.students.iter().zip(&p.teachers).enumerate() {
        t.insert(format!("p{l}.student"), s.cast());
        t.insert(format!("p{l}.teacher"), te.cast());
    }
    for (k, v) in &p.params {
        t.insert(k.clone(), v.cast());
    }
    if let Some(b) = &p.boxes {
        let n = b.img_shape.len();
        let shape: Vec<f32> = b.img_shape.iter().flatten().map(|&v| v as f32).collect();
        t.insert(
            "img_shape".into(),
            Tensor::from_vec(&[n, 2], shape).unwrap(),
        );
        for (i, boxes) in b.per_image.iter().enumerate() {
            let v: Vec<f32> = boxes.iter().flatten().map(|&v| v as f32).collect();
            t.insert(
                format!("gt_boxes.{i}"),
                Tensor::from_vec(&[boxes.len(), 4], v).unwrap(),
            );
        }
    }
    Problem::new(&p.config, &t, EvalOptions::default()).unwrap()
}

/// The largest |gradient| of each output's level, in the reference.
fn level_scale(want: &TensorMap<f64>, name: &str) -> f64 {
    let level = name
        .trim_start_matches("grad.")
        .split('.')
        .next()
        .unwrap_or("");
    want.iter()
        .filter(|(k, _)| k.starts_with(&format!("grad.{level}.")))
        .flat_map(|(_, t)| t.as_slice().iter().map(|v| v.abs()))
        .fold(0.0, f64::max)
}

/// One backend's evaluation against the reference's, output by output:
/// masks identical, everything else norm-wise within `tol(name)`, or, for a
/// gradient, within `tol` times the largest gradient of its level. A
/// gradient whose exact value cancels (zero for FGD's context-conv bias,
/// since softmax ignores a shift; small for the fusion logits and the
/// GcBlock before its LayerNorm, for the same reason) has rounding errors
/// set by the terms it sums, i.e. by its level's gradient scale, not by its
/// own size (as in `tests/golden.rs`).
fn compare_loss<T: Float>(
    what: &str,
    got: &Evaluation<T>,
    want: &Evaluation<T>,
    want64: &TensorMap<f64>,
    tol: impl Fn(&str) -> f64,
) {
    let names: Vec<&String> = want.outputs.keys().collect();
    assert_eq!(
        got.outputs.keys().collect::<Vec<_>>(),
        names,
        "{what}: output names"
    );
    for name in names {
        let (g, w) = (&got.outputs[name], &want.outputs[name]);
        let g64: Vec<f64> = g.as_slice().iter().map(|v| v.as_f64()).collect();
        let w64: Vec<f64> = w.as_slice().iter().map(|v| v.as_f64()).collect();
        if name.contains(".mask_") {
            assert!(g64 == w64, "{what}: {name}: masks differ");
            continue;
        }
        let tol = tol(name);
        let e = norm_rel(&g64, &w64);
        let scale = if name.starts_with("grad.") {
            level_scale(want64, name)
        } else {
            0.0
        };
        let d = g64
            .iter()
            .zip(&w64)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            e <= tol || d <= tol * scale,
            "{what}: {name}: norm-wise error {e:e} > {tol:e}, max |d| {d:e} > {:e}",
            tol * scale
        );
    }
}

/// The whole loss on every backend under test against the reference, in
/// f64 (`1e-12` norm-wise: sums in other orders, ~1e-15) and f32 (`1e-5`, or
/// 3x the reference's own f32 error against f64 where that is larger: the
/// errors compound through two convs, a ReLU and the loss), masks
/// identical, and a second evaluation bit-identical to the first.
fn whole_loss(levels: &[LossLevel], n: usize, seed: u64) {
    let p64 = random_problem(levels, n, seed).unwrap();
    let ref64 = evaluate(Arc::new(ReferenceBackend), &p64).unwrap();
    for s in backends::<f64>() {
        let what = format!("{} f64 {levels:?}", s.name);
        let got = evaluate(s.backend.clone(), &p64).unwrap();
        compare_loss(&what, &got, &ref64, &ref64.outputs, |_| 1e-12);
        let again = evaluate(s.backend.clone(), &p64).unwrap();
        for (name, t) in &got.outputs {
            assert!(
                again.outputs[name].as_slice() == t.as_slice(),
                "{what}: {name} changed on a rerun"
            );
        }
    }
    let p32 = to_f32(&p64);
    let ref32 = evaluate(Arc::new(ReferenceBackend), &p32).unwrap();
    let ref_err = |name: &str| -> f64 {
        let a: Tensor<f64> = ref32.outputs[name].cast();
        norm_rel(a.as_slice(), ref64.outputs[name].as_slice())
    };
    for s in backends::<f32>() {
        let what = format!("{} f32 {levels:?}", s.name);
        let got = evaluate(s.backend.clone(), &p32).unwrap();
        compare_loss(&what, &got, &ref32, &ref64.outputs, |name| {
            1e-5f64.max(3.0 * ref_err(name))
        });
    }
}

#[test]
fn dmkd_loss_conforms_in_every_mask_mode() {
    for (i, mode) in [MaskMode::Topk, MaskMode::Sampled, MaskMode::Random]
        .into_iter()
        .enumerate()
    {
        let levels = [
            level(Method::Dmkd, 5, 6, (5, 7), mode),
            level(Method::Dmkd, 4, 4, (3, 3), mode),
        ];
        whole_loss(&levels, 2, 10 + i as u64);
    }
}

#[test]
fn dmkd_loss_conforms_at_extreme_ratios_and_tiny_planes() {
    let mut a = level(Method::Dmkd, 3, 5, (1, 1), MaskMode::Topk);
    (a.lambda_s, a.lambda_c) = (0.0, 0.99);
    let mut b = level(Method::Dmkd, 6, 6, (2, 7), MaskMode::Sampled);
    (b.lambda_s, b.lambda_c) = (0.99, 0.0);
    whole_loss(&[a, b], 1, 20);
}

#[test]
fn mgd_and_fgd_losses_conform() {
    let levels = [
        level(Method::Mgd, 5, 4, (5, 5), MaskMode::Random),
        level(Method::Fgd, 4, 4, (7, 5), MaskMode::Topk),
    ];
    whole_loss(&levels, 2, 30);
}

#[test]
fn dmkd_loss_conforms_on_a_retinanet_shaped_level() {
    // RetinaNet's P5 plane (25x42 for an 800x1344 input), N = 2, C = 64:
    // long enough sums for the two-pass and block-per-row softmax paths on
    // the device, and for Winograd under `Auto` on the CPU.
    let levels = [level(Method::Dmkd, 64, 64, (25, 42), MaskMode::Topk)];
    whole_loss(&levels, 2, 40);
}

/// The accuracy requirement: on every backend, the f32 loss and every
/// gradient within 1e-4 (norm-wise) of the f64 reference, at 64 channels on
/// the demo preset (measured on the CPU: ~1e-7 direct, ~2e-6 Winograd).
#[test]
fn whole_loss_f32_accuracy_on_every_backend() {
    use dmkd::synthetic::{Preset, inputs};
    let preset = Preset::named("demo").unwrap().with_channels(64, 64);
    let config = preset.config();
    let opts = || EvalOptions {
        init_seed: Some(3),
        allow_extra: false,
    };
    let p64 = Problem::new(&config, &inputs::<f64>(&preset, 7).unwrap(), opts()).unwrap();
    let want = evaluate(Arc::new(ReferenceBackend), &p64).unwrap().outputs;
    let p32 = Problem::new(&config, &inputs::<f32>(&preset, 7).unwrap(), opts()).unwrap();
    for s in backends::<f32>() {
        let got = evaluate(s.backend.clone(), &p32).unwrap().outputs;
        let (mut worst, mut worst_name) = (0.0f64, String::new());
        for (name, e) in &want {
            if name.contains(".mask_") || name.contains(".attn_") {
                continue;
            }
            let a: Tensor<f64> = got[name].cast();
            let r = norm_rel(a.as_slice(), e.as_slice());
            if r > worst {
                (worst, worst_name) = (r, name.clone());
            }
        }
        let loss: Tensor<f64> = got["loss"].cast();
        println!(
            "{}: f32 vs f64 loss {:.2e}, worst norm-wise error {worst_name} {worst:.2e}",
            s.name,
            norm_rel(loss.as_slice(), want["loss"].as_slice())
        );
        assert!(worst <= 1e-4, "{}: {worst_name} {worst:e}", s.name);
    }
}
