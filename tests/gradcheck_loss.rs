//! The oracle on the whole loss: DMKD, MGD and FGD over several levels,
//! every gradient (students and all parameters) against central finite
//! differences in f64 (tolerance and step: `src/gradcheck.rs`).
//!
//! Shapes follow SPEC.md's gradient-check list: N in {1, 2}, C in 3..=8 with
//! Cs != C in some cases (the align conv), H, W in {1, 2, 3, 5, 7} (H*W = 1
//! too), every mask mode, and ratios giving k = 0 and k = all.
//!
//! The loss has kinks (ReLU in the generators and GcBlocks, |x| in FGD's
//! attention maps). A case whose kinked quantities come within `KINK_MARGIN`
//! of a kink is skipped: the finite-difference step moves them by about
//! `h * |J t|` (~1e-5), and a difference across a kink measures the kink.

use std::collections::BTreeMap;
use std::sync::Arc;

use dmkd::backend::{CpuBackend, InputMask, ReferenceBackend};
use dmkd::distill::attention::{channel_attention, spatial_attention};
use dmkd::distill::fgd::{channel_add_hidden, spatial_pool};
use dmkd::distill::generator::align;
use dmkd::distill::params::LevelVars;
use dmkd::distill::{
    Config, EvalOptions, LevelConfig, MaskMode, Method, Problem, TensorMap, evaluate,
};
use dmkd::gradcheck::check;
use dmkd::{BackendRef, Conv2dOptions, ConvAlgo, Tape, Tensor, Var};
use proptest::prelude::*;
use proptest::test_runner::Config as PropConfig;

const KINK_MARGIN: f64 = 1e-4;

fn config() -> PropConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    PropConfig {
        // Each case differentiates ~30 inputs: fewer cases than the op checks.
        cases: (cases / 2).max(4),
        failure_persistence: None,
        ..PropConfig::default()
    }
}

#[derive(Clone, Debug)]
struct LevelCase {
    method: Method,
    cs: usize,
    c: usize,
    h: usize,
    w: usize,
    mode: MaskMode,
    lambda_s: f64,
    lambda_c: f64,
    tau: f64,
    seed: u64,
}

fn level_case() -> impl Strategy<Value = LevelCase> {
    let dim = prop::sample::select(vec![1usize, 2, 3, 5, 7]);
    let ratio = prop::sample::select(vec![0.0, 0.15, 0.45, 0.65, 0.99]);
    (
        prop_oneof![4 => Just(Method::Dmkd), 1 => Just(Method::Mgd), 1 => Just(Method::Fgd)],
        (3usize..=8, 3usize..=8, any::<bool>()),
        (dim.clone(), dim),
        prop_oneof![
            Just(MaskMode::Topk),
            Just(MaskMode::Sampled),
            Just(MaskMode::Random)
        ],
        (ratio.clone(), ratio),
        prop::sample::select(vec![0.5, 1.0, 2.0]),
        any::<u64>(),
    )
        .prop_map(
            |(method, (cs, c, same), (h, w), mode, (ls, lc), tau, seed)| LevelCase {
                method,
                cs: if same { c } else { cs },
                c,
                h,
                w,
                mode,
                lambda_s: ls,
                lambda_c: lc,
                tau,
                seed,
            },
        )
}

#[derive(Clone, Debug)]
struct Case {
    config: Config,
    tensors: TensorMap<f64>,
}

fn uniform(rng: &mut dmkd::rng::PhiloxStream, shape: &[usize], lo: f64, hi: f64) -> Tensor<f64> {
    Tensor::from_fn(shape, |_| rng.uniform(lo, hi)).unwrap()
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=2,
        prop::collection::vec(level_case(), 1..=3),
        any::<u64>(),
    )
        .prop_map(|(n, levels, data_seed)| {
            let mut rng = dmkd::rng::PhiloxStream::new(data_seed, 0);
            let config = Config {
                levels: levels
                    .iter()
                    .map(|lc| LevelConfig {
                        method: lc.method,
                        tau: lc.tau,
                        lambda_s: lc.lambda_s,
                        lambda_c: lc.lambda_c,
                        alpha: 0.3,
                        mask_mode: lc.mode,
                        seed: lc.seed,
                        ..LevelConfig::default()
                    })
                    .collect(),
            };
            let mut tensors = TensorMap::new();
            for (l, lc) in levels.iter().enumerate() {
                tensors.insert(
                    format!("p{l}.student"),
                    uniform(&mut rng, &[n, lc.cs, lc.h, lc.w], -2.0, 2.0),
                );
                tensors.insert(
                    format!("p{l}.teacher"),
                    uniform(&mut rng, &[n, lc.c, lc.h, lc.w], -2.0, 2.0),
                );
            }
            if levels.iter().any(|l| l.method == Method::Fgd) {
                tensors.insert(
                    "img_shape".into(),
                    Tensor::from_vec(&[n, 2], [30.0, 40.0].repeat(n)).unwrap(),
                );
                for i in 0..n {
                    let k = 1 + (rng.next_u32() % 3) as usize;
                    let mut b = Vec::new();
                    for _ in 0..k {
                        let (x1, y1) = (rng.uniform(0.0, 30.0), rng.uniform(0.0, 20.0));
                        b.extend([
                            x1,
                            y1,
                            x1 + rng.uniform(1.0, 10.0),
                            y1 + rng.uniform(1.0, 10.0),
                        ]);
                    }
                    tensors.insert(
                        format!("gt_boxes.{i}"),
                        Tensor::from_vec(&[k, 4], b).unwrap(),
                    );
                }
            }
            // Random (not default-initialised) parameters, so every gradient is
            // nonzero: FGD zero-initialises its last convs, DMKD its fusion logits.
            let probe = Problem::new(
                &config,
                &tensors,
                EvalOptions {
                    init_seed: Some(0),
                    allow_extra: false,
                },
            )
            .unwrap();
            for spec in probe.specs.iter().flatten() {
                let (lo, hi) = if spec.name.ends_with(".1.weight") {
                    (0.5, 1.5)
                } else {
                    (-0.6, 0.6)
                };
                tensors.insert(spec.name.clone(), uniform(&mut rng, &spec.shape, lo, hi));
            }
            Case { config, tensors }
        })
}

/// The smallest distance of any kinked quantity of the loss to its kink.
fn kink_distance(p: &Problem<f64>) -> f64 {
    let tape = Tape::new(Arc::new(ReferenceBackend) as BackendRef<f64>);
    let mut min = f64::INFINITY;
    let mut see = |v: &Var<f64>| {
        for x in v.value().as_slice() {
            min = min.min(x.abs());
        }
    };
    let eval = dmkd::distill::evaluate(Arc::new(ReferenceBackend), p).unwrap();
    for (l, lc) in p.config.levels.iter().enumerate() {
        let own: BTreeMap<String, Var<f64>> = p.specs[l]
            .iter()
            .map(|s| (s.name.clone(), tape.constant(p.params[&s.name].clone())))
            .collect();
        let vars = LevelVars::from_vars(l, own);
        let s = align(&tape.constant(p.students[l].clone()), &vars).unwrap();
        let first = |block: &str, mask: InputMask<f64>| {
            let opts = Conv2dOptions::same(1).with_mask(mask);
            s.conv2d(
                vars.get(&format!("{block}.0.weight")).unwrap(),
                Some(vars.get(&format!("{block}.0.bias")).unwrap()),
                &opts,
            )
            .unwrap()
        };
        let out = |name: &str| eval.outputs[&format!("p{l}.{name}")].clone();
        match lc.method {
            Method::Dmkd => {
                see(&first("gen_s", InputMask::Spatial(out("mask_s"))));
                see(&first("gen_c", InputMask::Channel(out("mask_c"))));
            }
            Method::Mgd => see(&first("gen", InputMask::Spatial(out("mask_s")))),
            Method::Fgd => {
                let t = tape.constant(p.teachers[l].clone());
                see(&s);
                see(&spatial_attention(&s, lc.tau)
                    .unwrap()
                    .sub(&spatial_attention(&t, lc.tau).unwrap())
                    .unwrap());
                see(&channel_attention(&s, lc.tau)
                    .unwrap()
                    .sub(&channel_attention(&t, lc.tau).unwrap())
                    .unwrap());
                see(
                    &channel_add_hidden(&spatial_pool(&s, &vars, "s").unwrap(), &vars, "s")
                        .unwrap(),
                );
                see(
                    &channel_add_hidden(&spatial_pool(&t, &vars, "t").unwrap(), &vars, "t")
                        .unwrap(),
                );
            }
        }
    }
    min
}

fn backends() -> Vec<BackendRef<f64>> {
    vec![
        Arc::new(ReferenceBackend),
        Arc::new(CpuBackend::new(ConvAlgo::Auto)),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn whole_loss_gradients(case in case()) {
        let problem = Problem::new(&case.config, &case.tensors, EvalOptions::default()).unwrap();
        prop_assume!(kink_distance(&problem) > KINK_MARGIN);
        let mut inputs = problem.students.clone();
        let names = problem.param_names();
        inputs.extend(names.iter().map(|n| problem.params[n].clone()));
        let levels = problem.students.len();
        for be in backends() {
            let name = be.name();
            let report = check(be, &inputs, 7, |tape, v| {
                problem.loss_graph(tape, &v[..levels], &v[levels..]).map(|(total, _)| total)
            })
            .unwrap();
            for c in &report.inputs {
                let what = if c.input < levels {
                    format!("p{}.student", c.input)
                } else {
                    names[c.input - levels].clone()
                };
                prop_assert!(c.passed, "{name}: gradient of {what} wrong: {c:?}");
            }
        }
    }

    /// `evaluate` reports the same gradients the checked graph computes.
    #[test]
    fn evaluate_matches_the_graph(case in case()) {
        let problem = Problem::new(&case.config, &case.tensors, EvalOptions::default()).unwrap();
        let eval = evaluate(Arc::new(ReferenceBackend), &problem).unwrap();
        let total: f64 = eval.level_losses.iter().sum();
        prop_assert!((eval.loss - total).abs() <= 1e-12 * eval.loss.abs().max(1e-300));
        for name in problem.param_names() {
            let g = &eval.outputs[&format!("grad.{name}")];
            prop_assert_eq!(g.shape(), problem.params[&name].shape());
        }
        for l in 0..problem.students.len() {
            prop_assert_eq!(eval.outputs[&format!("grad.p{l}.student")].shape(), problem.students[l].shape());
        }
    }
}
