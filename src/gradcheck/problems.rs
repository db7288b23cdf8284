//! Whole-loss checks and the random problems they run on: DMKD, MGD and
//! FGD problems of a given level structure with random data (also the
//! fixture of the conformance suite and the whole-loss tests), the distance
//! of a problem from the loss's kinks, and the check of every gradient.

use super::checker::{Report, check};
use super::ops::{Checkable, rand_tensor};
use crate::autograd::{Tape, Var};
use crate::backend::BackendRef;
use crate::distill::{Config, EvalOptions, LevelConfig, MaskMode, Method, Problem, TensorMap};
use crate::error::Result;
use crate::rng::PhiloxStream;
use crate::tensor::Tensor;

/// The structure of one level of a random loss problem.
#[derive(Clone, Debug, PartialEq)]
pub struct LossLevel {
    /// DMKD, MGD or FGD.
    pub method: Method,
    /// Student channels.
    pub cs: usize,
    /// Teacher channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Mask mode.
    pub mode: MaskMode,
    /// Spatial mask ratio.
    pub lambda_s: f64,
    /// Channel mask ratio.
    pub lambda_c: f64,
    /// Attention temperature.
    pub tau: f64,
    /// The level's mask seed.
    pub seed: u64,
}

/// A problem with the given level structure and random data: features in
/// [-2, 2], parameters in [-0.6, 0.6] (LayerNorm scales in [0.5, 1.5]), so
/// every gradient is nonzero (the default init zeroes FGD's last convs and
/// the fusion logits), and for FGD 1 to 3 boxes per image.
pub fn random_problem(levels: &[LossLevel], n: usize, data_seed: u64) -> Result<Problem<f64>> {
    let mut rng = PhiloxStream::new(data_seed, 0);
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
            rand_tensor(&mut rng, &[n, lc.cs, lc.h, lc.w], -2.0, 2.0),
        );
        tensors.insert(
            format!("p{l}.teacher"),
            rand_tensor(&mut rng, &[n, lc.c, lc.h, lc.w], -2.0, 2.0),
        );
    }
    if levels.iter().any(|l| l.method == Method::Fgd) {
        tensors.insert(
            "img_shape".into(),
            Tensor::from_vec(&[n, 2], [30.0, 40.0].repeat(n))?,
        );
        for i in 0..n {
            let k = 1 + (rng.next_u32() % 3) as usize;
            let mut b = Vec::with_capacity(4 * k);
            for _ in 0..k {
                let (x1, y1) = (rng.uniform(0.0, 30.0), rng.uniform(0.0, 20.0));
                b.extend([
                    x1,
                    y1,
                    x1 + rng.uniform(1.0, 10.0),
                    y1 + rng.uniform(1.0, 10.0),
                ]);
            }
            tensors.insert(format!("gt_boxes.{i}"), Tensor::from_vec(&[k, 4], b)?);
        }
    }
    let init = EvalOptions {
        init_seed: Some(0),
        allow_extra: false,
    };
    let specs = Problem::new(&config, &tensors, init)?.specs;
    for spec in specs.iter().flatten() {
        let (lo, hi) = if spec.name.ends_with(".1.weight") {
            (0.5, 1.5)
        } else {
            (-0.6, 0.6)
        };
        tensors.insert(
            spec.name.clone(),
            rand_tensor(&mut rng, &spec.shape, lo, hi),
        );
    }
    Problem::new(&config, &tensors, EvalOptions::default())
}

/// The smallest distance of any kinked quantity of the loss to its kink:
/// the ReLU inputs of the generators and GcBlocks, and the arguments of
/// |x| in FGD's student attention and attention-transfer loss.
pub fn kink_distance(p: &Problem<f64>) -> Result<f64> {
    use crate::backend::{InputMask, ReferenceBackend};
    use crate::distill::attention::{channel_attention, spatial_attention};
    use crate::distill::fgd::{channel_add_hidden, spatial_pool};
    use crate::distill::generator::align;
    use crate::distill::params::LevelVars;
    use crate::ops::Conv2dOptions;

    let be: BackendRef<f64> = std::sync::Arc::new(ReferenceBackend);
    let eval = crate::distill::evaluate(be.clone(), p)?;
    let tape = Tape::new(be);
    let mut min = f64::INFINITY;
    let mut see = |v: &Var<f64>| {
        for x in v.value().as_slice() {
            min = min.min(x.abs());
        }
    };
    for (l, lc) in p.config.levels.iter().enumerate() {
        let own = p.specs[l]
            .iter()
            .map(|s| (s.name.clone(), tape.constant(p.params[&s.name].clone())))
            .collect();
        let vars = LevelVars::from_vars(l, own);
        let s = align(&tape.constant(p.students[l].clone()), &vars)?;
        let first = |block: &str, mask: InputMask<f64>| {
            s.conv2d(
                vars.get(&format!("{block}.0.weight"))?,
                Some(vars.get(&format!("{block}.0.bias"))?),
                &Conv2dOptions::same(1).with_mask(mask),
            )
        };
        let out = |name: &str| eval.outputs[&format!("p{l}.{name}")].clone();
        match lc.method {
            Method::Dmkd => {
                see(&first("gen_s", InputMask::Spatial(out("mask_s")))?);
                see(&first("gen_c", InputMask::Channel(out("mask_c")))?);
            }
            Method::Mgd => see(&first("gen", InputMask::Spatial(out("mask_s")))?),
            Method::Fgd => {
                let t = tape.constant(p.teachers[l].clone());
                see(&s);
                see(&spatial_attention(&s, lc.tau)?.sub(&spatial_attention(&t, lc.tau)?)?);
                see(&channel_attention(&s, lc.tau)?.sub(&channel_attention(&t, lc.tau)?)?);
                see(&channel_add_hidden(
                    &spatial_pool(&s, &vars, "s")?,
                    &vars,
                    "s",
                )?);
                see(&channel_add_hidden(
                    &spatial_pool(&t, &vars, "t")?,
                    &vars,
                    "t",
                )?);
            }
        }
    }
    Ok(min)
}

/// Distance from every kink a case must keep; the finite-difference step
/// moves kinked quantities by about `STEP * |J t|`, i.e. ~1e-5.
pub const KINK_MARGIN: f64 = 1e-4;

/// Check every gradient (students and all parameters) of a whole problem.
pub fn check_problem(
    backend: BackendRef<f64>,
    problem: &Problem<f64>,
    seed: u64,
) -> Result<Report> {
    let mut inputs = problem.students.clone();
    inputs.extend(
        problem
            .param_names()
            .iter()
            .map(|n| problem.params[n].clone()),
    );
    let levels = problem.students.len();
    check(backend, &inputs, seed, |tape, v| {
        problem
            .loss_graph(tape, &v[..levels], &v[levels..])
            .map(|(total, _)| total)
    })
}

/// A whole-loss check of one method on random small problems.
pub struct LossCase {
    /// The name in the table.
    pub name: &'static str,
    /// The method of every level.
    pub method: Method,
}

impl LossCase {
    fn draw(&self, rng: &mut PhiloxStream) -> (Vec<LossLevel>, usize, u64) {
        let dims = [1usize, 2, 3, 5, 7];
        let ratios = [0.0, 0.15, 0.45, 0.65, 0.99];
        let modes = [MaskMode::Topk, MaskMode::Sampled, MaskMode::Random];
        let pick = |rng: &mut PhiloxStream, k: usize| (rng.next_u32() as usize) % k;
        let levels = (0..1 + pick(rng, 2))
            .map(|_| {
                let c = 3 + pick(rng, 6);
                LossLevel {
                    method: self.method,
                    cs: if rng.next_u32() & 1 == 0 {
                        c
                    } else {
                        3 + pick(rng, 6)
                    },
                    c,
                    h: dims[pick(rng, 5)],
                    w: dims[pick(rng, 5)],
                    mode: modes[pick(rng, 3)],
                    lambda_s: ratios[pick(rng, 5)],
                    lambda_c: ratios[pick(rng, 5)],
                    tau: 0.5,
                    seed: (rng.next_u32() as u64) << 32 | rng.next_u32() as u64,
                }
            })
            .collect();
        (levels, 1 + pick(rng, 2), rng.next_u32() as u64)
    }
}

impl Checkable for LossCase {
    fn name(&self) -> &str {
        self.name
    }
    fn check_once(
        &self,
        backend: BackendRef<f64>,
        rng: &mut PhiloxStream,
    ) -> Result<Option<Report>> {
        let (levels, n, data_seed) = self.draw(rng);
        let problem = random_problem(&levels, n, data_seed)?;
        if kink_distance(&problem)? <= KINK_MARGIN {
            return Ok(None);
        }
        check_problem(backend, &problem, data_seed).map(Some)
    }
}

/// Whole-loss checks: DMKD, MGD and FGD.
pub fn loss_cases() -> Vec<Box<dyn Checkable>> {
    vec![
        Box::new(LossCase {
            name: "loss:dmkd",
            method: Method::Dmkd,
        }),
        Box::new(LossCase {
            name: "loss:mgd",
            method: Method::Mgd,
        }),
        Box::new(LossCase {
            name: "loss:fgd",
            method: Method::Fgd,
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn level(method: Method, mode: MaskMode, tau: f64, seed: u64) -> LossLevel {
        LossLevel {
            method,
            cs: 4,
            c: 5,
            h: 6,
            w: 7,
            mode,
            lambda_s: 0.45,
            lambda_c: 0.15,
            tau,
            seed,
        }
    }

    /// The config is the levels' own settings (alpha 0.3), the features
    /// and parameters fill their documented ranges, and FGD's boxes lie in
    /// the 30 x 40 image with sides of 1 to 10 pixels, 1 to 3 per image.
    #[test]
    fn a_random_problem_follows_its_levels_and_documented_ranges() {
        let levels = [
            level(Method::Dmkd, MaskMode::Sampled, 0.7, 11),
            level(Method::Fgd, MaskMode::Topk, 0.25, 1 << 40),
        ];
        let p = random_problem(&levels, 2, 9).unwrap();
        for (lc, cfg) in levels.iter().zip(&p.config.levels) {
            assert_eq!(cfg.method, lc.method);
            assert_eq!((cfg.tau, cfg.lambda_s, cfg.lambda_c), (lc.tau, 0.45, 0.15));
            assert_eq!(
                (cfg.mask_mode, cfg.seed, cfg.alpha),
                (lc.mode, lc.seed, 0.3)
            );
        }
        let range = |t: &Tensor<f64>| {
            let v = t.as_slice();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            (lo, v.iter().copied().fold(f64::NEG_INFINITY, f64::max))
        };
        for (l, (s, t)) in p.students.iter().zip(&p.teachers).enumerate() {
            assert_eq!(s.shape(), &[2, 4, 6, 7]);
            assert_eq!(t.shape(), &[2, 5, 6, 7]);
            for x in [s, t] {
                let (lo, hi) = range(x);
                assert!(
                    (-2.0..-1.5).contains(&lo) && 1.5 < hi && hi <= 2.0,
                    "p{l}: {lo} {hi}"
                );
            }
        }
        assert!(!p.params.is_empty());
        // Each kind of parameter within its range, and the kind as a whole
        // spread over it.
        let mut spread = [(f64::INFINITY, f64::NEG_INFINITY); 2];
        for (name, v) in &p.params {
            let (lo, hi) = range(v);
            let ln = name.ends_with(".1.weight");
            let (a, b) = if ln { (0.5, 1.5) } else { (-0.6, 0.6) };
            assert!(a <= lo && hi <= b, "{name}: {lo} {hi}");
            let s = &mut spread[usize::from(ln)];
            *s = (s.0.min(lo), s.1.max(hi));
        }
        assert!(spread[0].0 < -0.5 && spread[0].1 > 0.5, "{spread:?}");
        assert!(spread[1].0 < 0.8 && spread[1].1 > 1.2, "{spread:?}");
        let boxes = p.boxes.as_ref().unwrap();
        assert_eq!(boxes.img_shape, vec![[30.0, 40.0]; 2]);
        for b in boxes.per_image.iter().flatten() {
            let [x1, y1, x2, y2] = *b;
            assert!(
                (0.0..30.0).contains(&x1) && (0.0..20.0).contains(&y1),
                "{b:?}"
            );
            assert!(
                (1.0..10.0).contains(&(x2 - x1)) && (1.0..10.0).contains(&(y2 - y1)),
                "{b:?}"
            );
        }
        let counts: BTreeSet<usize> = (0..12)
            .flat_map(|seed| {
                let p = random_problem(&levels[1..], 2, seed).unwrap();
                p.boxes.unwrap().per_image.into_iter().map(|b| b.len())
            })
            .collect();
        assert_eq!(counts, BTreeSet::from([1, 2, 3]));
        // The same seed gives the same problem; another seed other data.
        let again = random_problem(&levels, 2, 9).unwrap();
        assert_eq!(again.students[0].as_slice(), p.students[0].as_slice());
        let other = random_problem(&levels, 2, 10).unwrap();
        assert_ne!(other.students[0].as_slice(), p.students[0].as_slice());
    }

    /// The distance to the nearest kink is the smallest |x| over many
    /// values drawn from ranges that straddle 0: positive and small.
    #[test]
    fn kink_distance_is_small_and_positive_on_a_random_problem() {
        for method in [Method::Dmkd, Method::Mgd, Method::Fgd] {
            let p = random_problem(&[level(method, MaskMode::Topk, 0.5, 3)], 2, 4).unwrap();
            let d = kink_distance(&p).unwrap();
            assert!(d > 0.0 && d < 0.05, "{method:?}: {d}");
        }
    }

    /// The whole-loss cases draw one or two levels of their own method,
    /// over every listed size, ratio and mask mode, at tau 0.5, with
    /// student and teacher channels sometimes equal and sometimes not.
    #[test]
    fn loss_case_draws_cover_every_listed_setting() {
        let case = LossCase {
            name: "loss:mgd",
            method: Method::Mgd,
        };
        let mut rng = PhiloxStream::new(6, 0);
        let (mut counts, mut ns, mut dims, mut ratios) = (
            BTreeSet::new(),
            BTreeSet::new(),
            BTreeSet::new(),
            BTreeSet::new(),
        );
        let (mut modes, mut chans, mut same_c) = (Vec::new(), BTreeSet::new(), [0, 0]);
        let mut seeds = BTreeSet::new();
        for _ in 0..300 {
            let (levels, n, _) = case.draw(&mut rng);
            counts.insert(levels.len());
            ns.insert(n);
            for l in &levels {
                assert_eq!((l.method, l.tau), (Method::Mgd, 0.5));
                dims.extend([l.h, l.w]);
                ratios.extend([l.lambda_s.to_bits(), l.lambda_c.to_bits()]);
                if !modes.contains(&l.mode) {
                    modes.push(l.mode);
                }
                chans.extend([l.c, l.cs]);
                same_c[usize::from(l.cs == l.c)] += 1;
                seeds.insert(l.seed >> 32);
            }
        }
        assert_eq!(counts, BTreeSet::from([1, 2]));
        assert_eq!(ns, BTreeSet::from([1, 2]));
        assert_eq!(dims, BTreeSet::from([1, 2, 3, 5, 7]));
        let want: BTreeSet<u64> = [0.0f64, 0.15, 0.45, 0.65, 0.99].map(f64::to_bits).into();
        assert_eq!(ratios, want);
        assert_eq!(modes.len(), 3, "{modes:?}");
        assert_eq!(chans, (3..=8).collect());
        // Equal in half the draws plus a sixth of the others (7/12), or drawn
        // apart: about 260 and 190 of 450 levels.
        assert!(same_c[0] > 100 && same_c[1] > 150, "{same_c:?}");
        // Both halves of the 64-bit mask seed are drawn.
        assert!(seeds.len() > 100, "{}", seeds.len());
    }

    /// Each method's whole loss passes on a random case (skipped draws
    /// near a kink are redrawn; with the kink test turned around, or every
    /// draw skipped, no case would run and the row would fail).
    #[test]
    fn every_loss_case_runs_and_passes() {
        let be: BackendRef<f64> = std::sync::Arc::new(crate::backend::ReferenceBackend);
        let rows = super::super::ops::run_suite(be, &loss_cases(), 1, 5).unwrap();
        for r in &rows {
            assert!(r.passed && r.cases == 1, "{r:?}");
        }
    }

    /// The table names DMKD, MGD and FGD, in that order.
    #[test]
    fn loss_cases_name_the_three_methods() {
        let names: Vec<String> = loss_cases().iter().map(|c| c.name().to_string()).collect();
        assert_eq!(names, ["loss:dmkd", "loss:mgd", "loss:fgd"]);
    }
}
