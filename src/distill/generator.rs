//! The generation block (MGD's): `conv3x3(C->C, pad 1, bias) -> ReLU ->
//! conv3x3(C->C, pad 1, bias)`, applied to a masked input. The mask rides
//! on the first convolution, so a backend can skip the masked work.

use crate::autograd::Var;
use crate::backend::InputMask;
use crate::distill::params::{LevelVars, ParamSpec, conv_specs};
use crate::error::Result;
use crate::ops::Conv2dOptions;
use crate::tensor::Float;

/// The four parameters of a block named `p{l}.{block}` (`.0` and `.2`, as in
/// a PyTorch `Sequential(conv, relu, conv)`).
pub fn generator_specs(level: usize, block: &str, c: usize) -> Vec<ParamSpec> {
    let mut v = conv_specs(&format!("p{level}.{block}.0"), c, c, 3).to_vec();
    v.extend(conv_specs(&format!("p{level}.{block}.2"), c, c, 3));
    v
}

/// `G(x * mask)`.
pub fn generation_block<T: Float>(
    x: &Var<T>,
    vars: &LevelVars<T>,
    block: &str,
    mask: Option<InputMask<T>>,
) -> Result<Var<T>> {
    let mut first = Conv2dOptions::same(1).with_relu(true);
    first.mask = mask;
    let h = x.conv2d(
        vars.get(&format!("{block}.0.weight"))?,
        Some(vars.get(&format!("{block}.0.bias"))?),
        &first,
    )?;
    h.conv2d(
        vars.get(&format!("{block}.2.weight"))?,
        Some(vars.get(&format!("{block}.2.bias"))?),
        &Conv2dOptions::same(1),
    )
}

/// The 1x1 align conv `p{l}.align` when the student has `cs != c` channels.
pub fn align_specs(level: usize, cs: usize, c: usize) -> Vec<ParamSpec> {
    if cs == c {
        Vec::new()
    } else {
        conv_specs(&format!("p{level}.align"), c, cs, 1).to_vec()
    }
}

/// `S' = conv1x1(S)` when the level has an align conv, else `S`.
pub fn align<T: Float>(student: &Var<T>, vars: &LevelVars<T>) -> Result<Var<T>> {
    if vars.has("align.weight") {
        student.conv2d(
            vars.get("align.weight")?,
            Some(vars.get("align.bias")?),
            &Conv2dOptions::default(),
        )
    } else {
        Ok(student.clone())
    }
}
