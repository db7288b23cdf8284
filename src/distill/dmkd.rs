//! DMKD, one level (`docs/spec.md`, "Forward, one level").
//!
//! `S' = align(S)`; teacher attention `A_s`, `A_c` and masks `M_s`, `M_c`
//! (constants); `F_s = G_s(S' * M_s)`, `F_c = G_c(S' * M_c)`;
//! `w = softmax(theta)`, `F = w_s F_s + w_c F_c`; `L = alpha * sum((F - T)^2) / N`.

use crate::autograd::Var;
use crate::backend::InputMask;
use crate::distill::attention::{attention_from_logits, attention_logits};
use crate::distill::config::LevelConfig;
use crate::distill::generator::{align, align_specs, generation_block, generator_specs};
use crate::distill::mask::{Branch, attention_mask};
use crate::distill::params::{Init, LevelVars, ParamSpec};
use crate::distill::{LevelOutput, LevelShape};
use crate::error::Result;
use crate::tensor::{Float, Tensor};

/// Parameters of a DMKD level, in the exchange format's names.
pub fn param_specs(level: usize, shape: &LevelShape) -> Vec<ParamSpec> {
    let mut v = align_specs(level, shape.cs, shape.c);
    v.extend(generator_specs(level, "gen_s", shape.c));
    v.extend(generator_specs(level, "gen_c", shape.c));
    v.push(ParamSpec::new(
        format!("p{level}.fusion"),
        &[2],
        Init::Zeros,
    ));
    v
}

/// The spatial and channel masks `(M_s, M_c)` of level `level` from the
/// teacher's attention logits ([`attention_logits`]), with the level's
/// mode, ratios and seed; `sample_offset` as in [`attention_mask`].
pub fn level_masks<T: Float>(
    logits_s: &Tensor<f64>,
    logits_c: &Tensor<f64>,
    cfg: &LevelConfig,
    level: usize,
    sample_offset: usize,
) -> Result<(Tensor<T>, Tensor<T>)> {
    let mask = |logits, lambda, branch| {
        attention_mask(
            logits,
            cfg.mask_mode,
            lambda,
            cfg.seed,
            level,
            branch,
            sample_offset,
        )
    };
    Ok((
        mask(logits_s, cfg.lambda_s, Branch::Spatial)?,
        mask(logits_c, cfg.lambda_c, Branch::Channel)?,
    ))
}

/// The DMKD loss of one level; `teacher` must be a constant.
/// `sample_offset`: the global index of the first sample (see
/// [`attention_mask`]).
pub fn level_loss<T: Float>(
    student: &Var<T>,
    teacher: &Var<T>,
    vars: &LevelVars<T>,
    cfg: &LevelConfig,
    sample_offset: usize,
) -> Result<LevelOutput<T>> {
    let l = vars.level;
    let n = teacher.shape()[0];
    let s = align(student, vars)?;
    // The masks follow the logits in f64, not A (which underflows in f32);
    // A itself is only reported here, so it comes from them too (the f64
    // maps rounded once: no overflow in f32 for a tiny tau).
    let (logits_s, logits_c) = attention_logits(teacher.value(), cfg.tau)?;
    let (attn_s, attn_c) = (
        attention_from_logits::<T>(&logits_s)?,
        attention_from_logits::<T>(&logits_c)?,
    );
    let (mask_s, mask_c) = level_masks(&logits_s, &logits_c, cfg, l, sample_offset)?;
    let f_s = generation_block(&s, vars, "gen_s", Some(InputMask::Spatial(mask_s.clone())))?;
    let f_c = generation_block(&s, vars, "gen_c", Some(InputMask::Channel(mask_c.clone())))?;
    let w = vars.get("fusion")?.softmax(0)?;
    // F = w_s F_s + w_c F_c and sum((F - T)^2) in one op: F is never stored.
    let loss = f_s
        .weighted_pair_sq_err_owned(&f_c, &w.index1(0)?, &w.index1(1)?, teacher)?
        .scale(cfg.alpha / n as f64)?;
    Ok(LevelOutput {
        loss,
        debug: vec![
            (format!("p{l}.attn_s"), attn_s),
            (format!("p{l}.attn_c"), attn_c),
            (format!("p{l}.mask_s"), mask_s),
            (format!("p{l}.mask_c"), mask_c),
        ],
    })
}
