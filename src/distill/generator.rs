//! The generation block (MGD's): `conv3x3(C->C, pad 1, bias) -> ReLU ->
//! conv3x3(C->C, pad 1, bias)`, applied to a masked input. The mask rides
//! on the first convolution, so a backend can skip the masked work.

use crate::autograd::Var;
use crate::backend::InputMask;
use crate::distill::mask::mask_reach;
use crate::distill::params::{LevelVars, ParamSpec, conv_specs};
use crate::error::Result;
use crate::ops::Conv2dOptions;
use crate::tensor::Float;
use crate::tensor::Tensor;

/// The four parameters of a block named `p{l}.{block}` (`.0` and `.2`, as in
/// a PyTorch `Sequential(conv, relu, conv)`).
pub fn generator_specs(level: usize, block: &str, c: usize) -> Vec<ParamSpec> {
    let mut v = conv_specs(&format!("p{level}.{block}.0"), c, c, 3).to_vec();
    v.extend(conv_specs(&format!("p{level}.{block}.2"), c, c, 3));
    v
}

/// `G(x * mask)`.
///
/// Under a spatial mask whose masked positions come in patches (DMKD's
/// attention masks: the teacher's attention is high over whole objects),
/// the hidden activation `h = relu(conv(x * mask) + b1)` equals `relu(b1)`
/// exactly wherever the first conv read only masked inputs: where
/// [`mask_reach`] is 0. The second conv is then split by linearity,
///
/// `conv(h) = conv(h * reach) + conv((1 - reach) x relu(b1))`,
///
/// and the second term is a one-channel convolution of the constant image
/// `1 - reach` with the filters `v[o, 0, .] = sum_c w2[o, c, .] relu(b1)[c]`:
/// 9 multiply-adds per output instead of `9 C`. The first term is a masked
/// convolution, which the backends skip where `reach` is 0, in the forward
/// pass and in both gradients. The gradients are those of `conv(h)`: inside
/// the unreached region `h` does not depend on `x` or `w1`, and its
/// dependence on `b1` flows through `relu(b1)` in the second term.
pub fn generation_block<T: Float>(
    x: &Var<T>,
    vars: &LevelVars<T>,
    block: &str,
    mask: Option<InputMask<T>>,
) -> Result<Var<T>> {
    let reach = match &mask {
        Some(InputMask::Spatial(m)) => Some(mask_reach(m)?),
        _ => None,
    };
    let mut first = Conv2dOptions::same(1).with_relu(true);
    first.mask = mask;
    let b1 = vars.get(&format!("{block}.0.bias"))?;
    let h = x.conv2d(vars.get(&format!("{block}.0.weight"))?, Some(b1), &first)?;
    let (w2, b2) = (
        vars.get(&format!("{block}.2.weight"))?,
        vars.get(&format!("{block}.2.bias"))?,
    );
    let Some(reach) = reach.filter(worth_splitting) else {
        return h.conv2d(w2, Some(b2), &Conv2dOptions::same(1));
    };
    let c = h.shape()[1];
    let [n, hh, ww] = [reach.shape()[0], reach.shape()[1], reach.shape()[2]];
    let unreached = Tensor::from_fn(&[n, 1, hh, ww], |i| T::one() - reach.as_slice()[i])?;
    let reached = h.conv2d(
        w2,
        Some(b2),
        &Conv2dOptions::same(1).with_mask(InputMask::Spatial(reach)),
    )?;
    let filters = w2
        .mul(&b1.relu()?.reshape(&[1, c, 1, 1])?)?
        .sum(&[1], true)?;
    // The one-channel conv's sums go straight into `reached`'s buffer
    // (`Var::add_conv2d`): no activation-sized output of their own.
    let unreached = h.tape().constant(unreached);
    reached.add_conv2d(&unreached, &filters, None, &Conv2dOptions::same(1))
}

/// Whether splitting the second conv pays: when at least a quarter of the
/// positions lie outside the mask's reach. A scattered mask (MGD's uniform
/// one: a position is unreached only when all 9 of its neighbours are masked,
/// 0.65^9 = 2%) leaves too few for the one-channel conv and the sum to repay.
fn worth_splitting<T: Float>(reach: &Tensor<T>) -> bool {
    let unreached = reach.as_slice().iter().filter(|&&v| v == T::zero()).count();
    4 * unreached >= reach.numel()
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::autograd::Tape;
    use crate::backend::{BackendRef, ConvAlgo, CpuBackend, ReferenceBackend};
    use crate::gradcheck::check;
    use crate::ops::testing::values;

    const NAMES: [&str; 4] = ["g.0.weight", "g.0.bias", "g.2.weight", "g.2.bias"];

    /// A spatial mask `[2, 9, 10]` that masks patches, as the attention
    /// masks do: image 0 a block of 7 x 8 positions, image 1 all but its
    /// first row. 100 of its 180 positions lie outside its reach (30 and 70).
    fn patch_mask() -> Tensor<f64> {
        Tensor::from_fn(&[2, 9, 10], |i| {
            let (s, r, c) = (i / 90, i / 10 % 9, i % 10);
            let masked = match s {
                0 => (1..8).contains(&r) && (1..9).contains(&c),
                _ => r > 0,
            };
            if masked { 0.0 } else { 1.0 }
        })
        .unwrap()
    }

    /// `x` `[2, 3, 9, 10]`, the block's parameters (`b1` negative, zero and
    /// positive: `relu(b1)` keeps only its third channel).
    fn operands() -> Vec<Tensor<f64>> {
        vec![
            values(&[2, 3, 9, 10], 1),
            values(&[3, 3, 3, 3], 2),
            Tensor::from_vec(&[3], vec![-0.3, 0.0, 0.4]).unwrap(),
            values(&[3, 3, 3, 3], 3),
            values(&[3], 4),
        ]
    }

    fn block_vars(v: &[Var<f64>]) -> LevelVars<f64> {
        let vars: BTreeMap<String, Var<f64>> = NAMES
            .iter()
            .zip(&v[1..])
            .map(|(name, var)| (format!("p0.{name}"), var.clone()))
            .collect();
        LevelVars::from_vars(0, vars)
    }

    /// The block as the spec writes it, without the split.
    fn plain_block(v: &[Var<f64>], mask: &Tensor<f64>) -> Result<Var<f64>> {
        let first = Conv2dOptions::same(1)
            .with_relu(true)
            .with_mask(InputMask::Spatial(mask.clone()));
        v[0].conv2d(&v[1], Some(&v[2]), &first)?
            .conv2d(&v[3], Some(&v[4]), &Conv2dOptions::same(1))
    }

    /// The output and every operand's gradient of `sum(f * cotangent)`.
    fn value_and_grads(
        be: BackendRef<f64>,
        f: impl Fn(&[Var<f64>]) -> Result<Var<f64>>,
    ) -> Vec<Tensor<f64>> {
        let tape = Tape::new(be);
        let v: Vec<Var<f64>> = operands().into_iter().map(|t| tape.leaf(t)).collect();
        let y = f(&v).unwrap();
        let cot = tape.constant(values(y.shape(), 9));
        let grads = y.mul(&cot).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![y.value().clone()];
        out.extend(v.iter().map(|x| grads.get(x).unwrap().clone()));
        out
    }

    /// The split block is the block: the same output and gradients as the
    /// unsplit graph, on the reference backend and both CPU algorithms.
    /// Both sides sum at most 27 products of values below 1 per conv output
    /// in f64 and differ only in the order and grouping of those sums, so
    /// they agree to a few ulps of the largest term: 1e-12 of each tensor's
    /// largest value leaves room for that and none for a missing term.
    #[test]
    fn the_split_second_conv_gives_the_blocks_values_and_gradients() {
        let mask = patch_mask();
        let reach = mask_reach(&mask).unwrap();
        let unreached = reach.as_slice().iter().filter(|&&v| v == 0.0).count();
        assert_eq!(unreached, 100);
        assert!(worth_splitting(&reach));
        let backends: [BackendRef<f64>; 4] = [
            Arc::new(ReferenceBackend),
            Arc::new(CpuBackend::new(ConvAlgo::Direct)),
            Arc::new(CpuBackend::new(ConvAlgo::Winograd)),
            Arc::new(CpuBackend::new(ConvAlgo::Winograd6)),
        ];
        for be in backends {
            let split = value_and_grads(be.clone(), |v| {
                generation_block(
                    &v[0],
                    &block_vars(v),
                    "g",
                    Some(InputMask::Spatial(mask.clone())),
                )
            });
            let plain = value_and_grads(be.clone(), |v| plain_block(v, &mask));
            for (k, (a, b)) in split.iter().zip(&plain).enumerate() {
                assert_eq!(a.shape(), b.shape());
                let scale = b.as_slice().iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let worst = a
                    .as_slice()
                    .iter()
                    .zip(b.as_slice())
                    .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    worst <= 1e-12 * scale,
                    "{}: tensor {k} differs by {worst:e} of {scale:e}",
                    be.name()
                );
            }
        }
    }

    /// The split graph's gradients against central differences (the
    /// checker's own tolerance: relative error below 1e-6 in f64). `b1`
    /// stays off the ReLU's kink at 0 here, where a difference is undefined.
    #[test]
    fn the_split_block_passes_the_gradient_check() {
        let mask = patch_mask();
        let mut inputs = operands();
        inputs[2] = Tensor::from_vec(&[3], vec![-0.3, 0.2, 0.4]).unwrap();
        let report = check(Arc::new(ReferenceBackend), &inputs, 5, |_, v| {
            generation_block(
                &v[0],
                &block_vars(v),
                "g",
                Some(InputMask::Spatial(mask.clone())),
            )
        })
        .unwrap();
        assert!(report.passed(), "{report:?}");
        assert_eq!(report.inputs.len(), 5);
    }

    /// Under a patchy mask the second conv runs masked (the backend skips
    /// its unreached tiles: two masked forward calls, the one-channel conv
    /// dense); under a scattered one, or a channel mask, it runs as one
    /// dense conv, as before.
    #[test]
    fn the_split_is_taken_only_where_it_pays() {
        let forward_calls = |mask: InputMask<f64>| {
            let be = Arc::new(CpuBackend::new(ConvAlgo::Direct));
            let tape = Tape::new(be.clone());
            let v: Vec<Var<f64>> = operands().into_iter().map(|t| tape.leaf(t)).collect();
            generation_block(&v[0], &block_vars(&v), "g", Some(mask)).unwrap();
            let f = be.counters().forward;
            (f.direct_calls, f.spatial_skip_calls)
        };
        assert_eq!(forward_calls(InputMask::Spatial(patch_mask())), (3, 2));
        // Every other position masked: each one's neighbourhood keeps one.
        let scattered = Tensor::from_fn(&[2, 9, 10], |i| (i % 2) as f64).unwrap();
        assert_eq!(forward_calls(InputMask::Spatial(scattered)), (2, 1));
        let channels = Tensor::from_vec(&[2, 3], vec![0.0, 1.0, 1.0, 1.0, 0.0, 1.0]).unwrap();
        assert_eq!(forward_calls(InputMask::Channel(channels)), (2, 0));
    }

    /// The rule's boundary: a quarter of the positions unreached splits,
    /// one fewer does not.
    #[test]
    fn splitting_needs_a_quarter_of_the_positions_unreached() {
        let reach = |zeros: usize| {
            Tensor::<f64>::from_fn(&[1, 4, 10], |i| if i < zeros { 0.0 } else { 1.0 }).unwrap()
        };
        assert!(worth_splitting(&reach(10)));
        assert!(worth_splitting(&reach(40)));
        assert!(!worth_splitting(&reach(9)));
        assert!(!worth_splitting(&reach(0)));
    }
}
