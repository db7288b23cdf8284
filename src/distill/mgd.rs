//! MGD (Yang et al., ECCV 2022), one level: a uniform random spatial mask,
//! one generation block, no channel branch and no fusion:
//! `L = alpha * sum((G(S' * M) - T)^2) / N`. It uses `lambda_s` and the
//! spatial (branch 0) uniforms of the `random` mode whatever `mask_mode` says.

use crate::autograd::Var;
use crate::backend::InputMask;
use crate::distill::config::LevelConfig;
use crate::distill::generator::{align, align_specs, generation_block, generator_specs};
use crate::distill::mask::{Branch, random_mask};
use crate::distill::params::{LevelVars, ParamSpec};
use crate::distill::{LevelOutput, LevelShape};
use crate::error::Result;
use crate::tensor::Float;

/// Parameters of an MGD level.
pub fn param_specs(level: usize, shape: &LevelShape) -> Vec<ParamSpec> {
    let mut v = align_specs(level, shape.cs, shape.c);
    v.extend(generator_specs(level, "gen", shape.c));
    v
}

/// The MGD loss of one level; `teacher` must be a constant.
/// `sample_offset`: the global index of the first sample (see
/// [`crate::distill::mask::attention_mask`]).
pub fn level_loss<T: Float>(
    student: &Var<T>,
    teacher: &Var<T>,
    vars: &LevelVars<T>,
    cfg: &LevelConfig,
    sample_offset: usize,
) -> Result<LevelOutput<T>> {
    let l = vars.level;
    let [n, _, h, w] = teacher.value().dims4("mgd")?;
    let s = align(student, vars)?;
    let mask = random_mask(
        &[n, h, w],
        cfg.lambda_s,
        cfg.seed,
        l,
        Branch::Spatial,
        sample_offset,
    )?;
    let generated = generation_block(&s, vars, "gen", Some(InputMask::Spatial(mask.clone())))?;
    let loss = generated.sq_err_sum(teacher)?.scale(cfg.alpha / n as f64)?;
    Ok(LevelOutput {
        loss,
        debug: vec![(format!("p{l}.mask_s"), mask)],
    })
}
