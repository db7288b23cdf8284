//! The oracle on the whole loss: DMKD, MGD and FGD over several levels,
//! every gradient (students and all parameters) against central finite
//! differences in f64 (tolerance and step: `src/gradcheck/checker.rs`).
//!
//! Shapes follow the gradient-check list of `docs/spec.md`: N in {1, 2}, C in 3..=8 with
//! Cs != C in some cases (the align conv), H, W in {1, 2, 3, 5, 7} (H*W = 1
//! too), every mask mode, and ratios giving k = 0 and k = all (0.0 and 0.99).
//!
//! The loss has kinks (ReLU in the generators and GcBlocks, |x| in FGD's
//! attention maps). A case whose kinked quantities come within
//! `KINK_MARGIN` of a kink is skipped: the finite-difference step moves
//! them by ~1e-5, and a difference across a kink measures the kink.

use crate::common;

use std::sync::Arc;

use common::backends::all_backends;
use dmkd::backend::ReferenceBackend;
use dmkd::distill::{MaskMode, Method, evaluate, forward};
use dmkd::gradcheck::{KINK_MARGIN, LossLevel, check_problem, kink_distance, random_problem};
use proptest::prelude::*;
use proptest::test_runner::Config as PropConfig;

fn config() -> PropConfig {
    let base = common::proptest_config();
    PropConfig {
        // Each case differentiates ~30 inputs: fewer cases than the op checks.
        cases: (base.cases / 2).max(4),
        ..base
    }
}

fn loss_level() -> impl Strategy<Value = LossLevel> {
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
            |(method, (cs, c, same), (h, w), mode, (lambda_s, lambda_c), tau, seed)| LossLevel {
                method,
                cs: if same { c } else { cs },
                c,
                h,
                w,
                mode,
                lambda_s,
                lambda_c,
                tau,
                seed,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn whole_loss_gradients(
        levels in prop::collection::vec(loss_level(), 1..=3),
        n in 1usize..=2,
        data_seed in any::<u64>(),
    ) {
        let problem = random_problem(&levels, n, data_seed).unwrap();
        prop_assume!(kink_distance(&problem).unwrap() > KINK_MARGIN);
        let names = problem.param_names();
        let nl = levels.len();
        for s in all_backends::<f64>() {
            let name = s.name;
            let report = check_problem(s.backend, &problem, 7).unwrap();
            for c in &report.inputs {
                let what = if c.input < nl { format!("p{}.student", c.input) } else { names[c.input - nl].clone() };
                prop_assert!(c.passed, "{name}: gradient of {what} wrong: {c:?}");
            }
        }
    }

    /// `evaluate` reports the loss as the sum of the levels, and a gradient
    /// of the right shape for every student and parameter.
    #[test]
    fn evaluate_reports_every_gradient(
        levels in prop::collection::vec(loss_level(), 1..=3),
        n in 1usize..=2,
        data_seed in any::<u64>(),
    ) {
        let problem = random_problem(&levels, n, data_seed).unwrap();
        let eval = evaluate(Arc::new(ReferenceBackend), &problem).unwrap();
        let total: f64 = eval.level_losses.iter().sum();
        prop_assert!((eval.loss - total).abs() <= 1e-12 * eval.loss.abs());
        // The gradient-free forward computes the same values, bit for bit.
        let (loss, levels_fwd) = forward(Arc::new(ReferenceBackend), &problem).unwrap();
        prop_assert_eq!(loss.to_bits(), eval.loss.to_bits());
        prop_assert_eq!(levels_fwd, eval.level_losses.clone());
        for name in problem.param_names() {
            prop_assert_eq!(eval.outputs[&format!("grad.{name}")].shape(), problem.params[&name].shape());
        }
        for l in 0..levels.len() {
            prop_assert_eq!(eval.outputs[&format!("grad.p{l}.student")].shape(), problem.students[l].shape());
        }
    }
}
