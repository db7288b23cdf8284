//! Data-parallel masks: a process holding samples `[a, b)` of a batch
//! (`Problem::with_sample_offset(a)`) draws exactly the masks of those
//! samples in the whole batch, and the mean of the shards' losses and
//! parameter gradients is the whole batch's; `init_params` gives what an
//! evaluation initialises.

use std::sync::Arc;

use dmkd::backend::ReferenceBackend;
use dmkd::distill::{
    Config, EvalOptions, LevelConfig, MaskMode, Method, Problem, TensorMap, evaluate, init_params,
    student_name, teacher_name,
};
use dmkd::{BackendRef, Result, Tensor};

/// Samples `[a, b)` of every input of `p` (the FGD boxes are not needed).
fn batch_slice(p: &Problem<f64>, a: usize, b: usize) -> TensorMap<f64> {
    let rows = |t: &Tensor<f64>| {
        let per = t.numel() / t.shape()[0];
        let mut shape = t.shape().to_vec();
        shape[0] = b - a;
        Tensor::from_vec(&shape, t.as_slice()[a * per..b * per].to_vec()).unwrap()
    };
    let mut m = p.params.clone();
    for l in 0..p.students.len() {
        m.insert(student_name(l), rows(&p.students[l]));
        m.insert(teacher_name(l), rows(&p.teachers[l]));
    }
    m
}

#[test]
fn two_halves_with_sample_offsets_are_the_whole_batch() {
    use dmkd::gradcheck::{LossLevel, random_problem};
    let level = |method, mode, seed| LossLevel {
        method,
        cs: 3,
        c: 4,
        h: 3,
        w: 5,
        mode,
        lambda_s: 0.5,
        lambda_c: 0.5,
        tau: 0.5,
        seed,
    };
    let whole = random_problem(
        &[
            level(Method::Dmkd, MaskMode::Sampled, 7),
            level(Method::Dmkd, MaskMode::Random, 0x9E37_79B9_7F4A_7C15),
            level(Method::Mgd, MaskMode::Topk, 3),
            level(Method::Dmkd, MaskMode::Topk, 0),
        ],
        4,
        11,
    )
    .unwrap();
    let be = || Arc::new(ReferenceBackend) as BackendRef<f64>;
    let full = evaluate(be(), &whole).unwrap();
    let half = |a: usize, offset: usize| {
        let p = Problem::new(
            &whole.config,
            &batch_slice(&whole, a, a + 2),
            EvalOptions::default(),
        )
        .unwrap()
        .with_sample_offset(offset)
        .unwrap();
        assert_eq!(p.sample_offset, offset);
        evaluate(be(), &p).unwrap()
    };
    let (first, second) = (half(0, 0), half(2, 2));
    // Every mask of the second half is the tail of the whole batch's.
    for (name, t) in &full.outputs {
        if name.contains(".mask_") {
            let n = t.numel() / 2;
            assert_eq!(first.outputs[name].as_slice(), &t.as_slice()[..n], "{name}");
            assert_eq!(
                second.outputs[name].as_slice(),
                &t.as_slice()[n..],
                "{name}"
            );
        }
    }
    // Each half normalises by its own N = 2, the whole batch by 4: the
    // mean of the halves' losses (what DDP's gradient averaging
    // differentiates) is the whole loss, and so are the parameter
    // gradients; f64 rounding of a few hundred terms is ~1e-15.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-300);
    assert!(close(0.5 * (first.loss + second.loss), full.loss));
    for name in whole.param_names() {
        let g = format!("grad.{name}");
        let (a, b, w) = (&first.outputs[&g], &second.outputs[&g], &full.outputs[&g]);
        for i in 0..w.numel() {
            let mean = 0.5 * (a.as_slice()[i] + b.as_slice()[i]);
            assert!(close(mean, w.as_slice()[i]), "{g}[{i}]");
        }
    }
    // Without the offset the second half redraws the first half's
    // uniforms, and the random levels' masks differ.
    let p = Problem::new(
        &whole.config,
        &batch_slice(&whole, 2, 4),
        EvalOptions::default(),
    )
    .unwrap();
    let unshifted = evaluate(be(), &p).unwrap();
    for name in ["p0.mask_s", "p1.mask_c", "p2.mask_s"] {
        assert_ne!(
            unshifted.outputs[name].as_slice(),
            second.outputs[name].as_slice(),
            "{name}"
        );
    }
    // topk masks are per sample: the same with and without the offset.
    assert_eq!(
        unshifted.outputs["p3.mask_s"].as_slice(),
        second.outputs["p3.mask_s"].as_slice()
    );
}

#[test]
fn init_params_are_what_an_evaluation_initialises() {
    let config =
        Config::from_json(r#"{"levels":[{"method":"dmkd"},{"method":"mgd"},{"method":"fgd"}]}"#)
            .unwrap();
    let channels = [(3, 4), (4, 4), (6, 6)];
    let mut tensors = TensorMap::new();
    for (l, &(cs, c)) in channels.iter().enumerate() {
        tensors.insert(student_name(l), Tensor::full(&[2, cs, 3, 2], 0.5).unwrap());
        tensors.insert(teacher_name(l), Tensor::full(&[2, c, 3, 2], 1.0).unwrap());
    }
    tensors.insert(
        "img_shape".into(),
        Tensor::from_vec(&[2, 2], vec![6.0, 4.0, 6.0, 4.0]).unwrap(),
    );
    for i in 0..2 {
        tensors.insert(
            format!("gt_boxes.{i}"),
            Tensor::from_vec(&[1, 4], vec![0.0, 0.0, 2.0, 2.0]).unwrap(),
        );
    }
    let opts = EvalOptions {
        init_seed: Some(9),
        allow_extra: false,
    };
    let problem = Problem::<f64>::new(&config, &tensors, opts).unwrap();
    let params = init_params::<f64>(&config, &channels, 9).unwrap();
    let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, problem.param_names());
    assert!(names.contains(&"p0.align.weight".to_string()));
    assert!(!names.iter().any(|n| n.starts_with("p1.align")));
    for (name, t) in &params {
        assert_eq!(t.shape(), problem.params[name].shape(), "{name}");
        assert_eq!(t.as_slice(), problem.params[name].as_slice(), "{name}");
    }
    let other = init_params::<f64>(&config, &channels, 10).unwrap();
    assert_ne!(other[0].1.as_slice(), params[0].1.as_slice());
    // Wrong level count, zero channels and absurd sizes are errors.
    let kind = |r: Result<Vec<(String, Tensor<f32>)>>| r.err().unwrap().kind();
    assert_eq!(kind(init_params(&config, &channels[..2], 0)), "config");
    assert_eq!(
        kind(init_params(&config, &[(0, 4), (4, 4), (6, 6)], 0)),
        "zero_sized"
    );
    assert_eq!(
        kind(init_params(
            &Config::uniform(1, LevelConfig::default()),
            &[(4, 1 << 20)],
            0
        )),
        "too_large"
    );
}

#[test]
fn a_sample_offset_past_32_bits_is_refused() {
    let p = || {
        dmkd::gradcheck::random_problem(
            &[dmkd::gradcheck::LossLevel {
                method: Method::Dmkd,
                cs: 2,
                c: 2,
                h: 2,
                w: 2,
                mode: MaskMode::Random,
                lambda_s: 0.5,
                lambda_c: 0.5,
                tau: 0.5,
                seed: 0,
            }],
            2,
            0,
        )
        .unwrap()
    };
    let max = u32::MAX as usize;
    assert_eq!(
        p().with_sample_offset(max - 2).unwrap().sample_offset,
        max - 2
    );
    for bad in [max - 1, usize::MAX] {
        let e = p().with_sample_offset(bad).err().unwrap();
        assert_eq!(e.kind(), "invalid_argument");
    }
}
