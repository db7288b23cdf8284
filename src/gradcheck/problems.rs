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
