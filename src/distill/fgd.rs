//! FGD (Yang et al., "Focal and Global Knowledge Distillation for
//! Detectors", CVPR 2022), one level, as its official `FeatureLoss`:
//!
//! - focal: foreground/background masks from ground-truth boxes, and the
//!   teacher's attention, weight a feature MSE:
//!   `fg = sum((S - T)^2 * A_s^t * A_c^t * M_fg) / N`, `bg` likewise with `M_bg`
//!   (the official code multiplies both features by the square roots; the
//!   squared difference of the products is this, up to rounding);
//! - attention transfer: `sum|A_c^s - A_c^t| / N + sum|A_s^s - A_s^t| / N`,
//!   with gradient flowing into the student's attention maps;
//! - global: a GcBlock on each side, `rela = sum((S + add_s(ctx_s(S)) - T - add_t(ctx_t(T)))^2) / N`,
//!   where the teacher-side block's parameters are trained too (T itself is not);
//! - `L = alpha_fgd fg + beta_fgd bg + gamma_fgd mask + lambda_fgd rela`.
//!
//! Masks, per box `(x1, y1, x2, y2)` in image pixels, scaled by the image
//! shape (not the padded shape) to the feature size: `wmin = floor(x1/img_w*W)`,
//! `wmax = ceil(x2/img_w*W)`, `hmin = floor(y1/img_h*H)`, `hmax = ceil(y2/img_h*H)`;
//! the box covers rows `hmin..=hmax` and columns `wmin..=wmax` (clipped to
//! the map) with value `1/((hmax+1-hmin)(wmax+1-wmin))` (sizes counted
//! inclusively), overlapping boxes keep the maximum; `M_bg = [M_fg == 0]`,
//! normalised by its pixel count when that is nonzero.

use crate::autograd::Var;
use crate::distill::attention::attention_maps;
use crate::distill::config::LevelConfig;
use crate::distill::generator::{align, align_specs};
use crate::distill::params::{Init, LevelVars, ParamSpec, conv_specs};
use crate::distill::{LevelOutput, LevelShape};
use crate::error::{Error, Result};
use crate::ops::Conv2dOptions;
use crate::tensor::{Float, Tensor};

/// LayerNorm epsilon (PyTorch's default).
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// Ground-truth boxes of a batch: per image, boxes `(x1, y1, x2, y2)` in
/// pixels, and the image's (unpadded) shape `(h, w)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Boxes {
    /// Per image, boxes `(x1, y1, x2, y2)` in pixels.
    pub per_image: Vec<Vec<[f64; 4]>>,
    /// Per image, its unpadded `(h, w)`.
    pub img_shape: Vec<[f64; 2]>,
}

impl Boxes {
    /// Check the boxes against a batch of `n` images.
    pub fn validate(&self, n: usize) -> Result<()> {
        if self.per_image.len() != n || self.img_shape.len() != n {
            return Err(Error::shape(
                "fgd boxes",
                format!(
                    "{} box lists and {} image shapes for a batch of {n}",
                    self.per_image.len(),
                    self.img_shape.len()
                ),
            ));
        }
        for (i, (bs, s)) in self.per_image.iter().zip(&self.img_shape).enumerate() {
            if !(s[0].is_finite() && s[1].is_finite() && s[0] >= 1.0 && s[1] >= 1.0) {
                return Err(Error::arg(
                    "fgd",
                    format!("img_shape of image {i} is {s:?}; need finite sizes >= 1"),
                ));
            }
            for (j, b) in bs.iter().enumerate() {
                if b.iter().any(|v| !v.is_finite()) || b[2] < b[0] || b[3] < b[1] {
                    return Err(Error::arg(
                        "fgd",
                        format!("box {j} of image {i} is {b:?}; need finite x1 <= x2, y1 <= y2"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Foreground and background masks `[N, H, W]` of a level (see module docs).
/// Box arithmetic runs in `T`, as the official code runs it in the feature dtype.
pub fn box_masks<T: Float>(
    boxes: &Boxes,
    n: usize,
    h: usize,
    w: usize,
) -> Result<(Tensor<T>, Tensor<T>)> {
    boxes.validate(n)?;
    let mut fg = vec![T::zero(); n * h * w];
    let mut bg = vec![T::zero(); n * h * w];
    for i in 0..n {
        let [img_h, img_w] = boxes.img_shape[i].map(T::from_f64);
        let plane = &mut fg[i * h * w..][..h * w];
        for b in &boxes.per_image[i] {
            let [x1, y1, x2, y2] = b.map(T::from_f64);
            let wmin = (x1 / img_w * T::from_usize(w)).floor().as_f64();
            let wmax = (x2 / img_w * T::from_usize(w)).ceil().as_f64();
            let hmin = (y1 / img_h * T::from_usize(h)).floor().as_f64();
            let hmax = (y2 / img_h * T::from_usize(h)).ceil().as_f64();
            // The inclusive sizes multiply to an exact integer: one division.
            let area = T::from_f64(1.0 / ((hmax + 1.0 - hmin) * (wmax + 1.0 - wmin)));
            let rows = clip_range(hmin, hmax, h);
            let cols = clip_range(wmin, wmax, w);
            for r in rows {
                for c in cols.clone() {
                    let v = &mut plane[r * w + c];
                    *v = v.max(area);
                }
            }
        }
        let bplane = &mut bg[i * h * w..][..h * w];
        let mut count = 0usize;
        for (b, f) in bplane.iter_mut().zip(plane.iter()) {
            if *f <= T::zero() {
                *b = T::one();
                count += 1;
            }
        }
        if count > 0 {
            let total = T::from_usize(count);
            bplane.iter_mut().for_each(|b| *b = *b / total);
        }
    }
    Ok((
        Tensor::from_parts(&[n, h, w], fg),
        Tensor::from_parts(&[n, h, w], bg),
    ))
}

/// Indices `lo..=hi` clipped to `0..len` (empty when the box misses the map).
fn clip_range(lo: f64, hi: f64, len: usize) -> std::ops::Range<usize> {
    let start = lo.max(0.0);
    let end = (hi + 1.0).min(len as f64);
    if end <= start {
        0..0
    } else {
        start as usize..end as usize
    }
}

/// Parameters of an FGD level (the names of the official module's state_dict).
pub fn param_specs(level: usize, shape: &LevelShape) -> Vec<ParamSpec> {
    let c = shape.c;
    let half = c / 2;
    let mut v = align_specs(level, shape.cs, c);
    for side in ["s", "t"] {
        v.push(ParamSpec::new(
            format!("p{level}.conv_mask_{side}.weight"),
            &[1, c, 1, 1],
            Init::KaimingNormal { fan_in: c },
        ));
        v.push(ParamSpec::new(
            format!("p{level}.conv_mask_{side}.bias"),
            &[1],
            Init::Zeros,
        ));
        let p = format!("p{level}.channel_add_conv_{side}");
        v.extend(conv_specs(&format!("{p}.0"), half, c, 1));
        v.push(ParamSpec::new(
            format!("{p}.1.weight"),
            &[half, 1, 1],
            Init::Ones,
        ));
        v.push(ParamSpec::new(
            format!("{p}.1.bias"),
            &[half, 1, 1],
            Init::Zeros,
        ));
        // The official code zero-initialises the block's last conv.
        v.push(ParamSpec::new(
            format!("{p}.3.weight"),
            &[c, half, 1, 1],
            Init::Zeros,
        ));
        v.push(ParamSpec::new(format!("{p}.3.bias"), &[c], Init::Zeros));
    }
    v
}

/// GcBlock context: `ctx[n, c] = sum_p x[n, c, p] * softmax_p(conv_mask(x)[n, 0, p])`, as `[N, C, 1, 1]`.
pub fn spatial_pool<T: Float>(x: &Var<T>, vars: &LevelVars<T>, side: &str) -> Result<Var<T>> {
    let [n, c, h, w] = x.value().dims4("fgd spatial_pool")?;
    let logits = x.conv2d(
        vars.get(&format!("conv_mask_{side}.weight"))?,
        Some(vars.get(&format!("conv_mask_{side}.bias"))?),
        &Conv2dOptions::default(),
    )?;
    let weights = logits.reshape(&[n, 1, h * w])?.softmax(2)?;
    x.reshape(&[n, c, h * w])?
        .mul(&weights)?
        .sum(&[2], false)?
        .reshape(&[n, c, 1, 1])
}

/// The GcBlock transform up to its ReLU: `LayerNorm([C/2, 1, 1])(Conv1x1(ctx))`
/// with its affine weights (the pre-activation, exposed for kink checks).
pub fn channel_add_hidden<T: Float>(
    ctx: &Var<T>,
    vars: &LevelVars<T>,
    side: &str,
) -> Result<Var<T>> {
    let p = format!("channel_add_conv_{side}");
    let get = |s: &str| vars.get(&format!("{p}.{s}"));
    let h = ctx.conv2d(
        get("0.weight")?,
        Some(get("0.bias")?),
        &Conv2dOptions::default(),
    )?;
    // LayerNorm over each sample's [C/2, 1, 1] block, biased variance.
    let mu = h.mean(&[1, 2, 3], true)?;
    let centered = h.sub(&mu)?;
    let var = centered.square()?.mean(&[1, 2, 3], true)?;
    let normed = centered.div(&var.add_scalar(LAYER_NORM_EPS)?.sqrt()?)?;
    normed.mul(get("1.weight")?)?.add(get("1.bias")?)
}

/// `Conv1x1 -> LayerNorm([C/2, 1, 1]) -> ReLU -> Conv1x1` on `[N, C, 1, 1]`.
pub fn channel_add<T: Float>(ctx: &Var<T>, vars: &LevelVars<T>, side: &str) -> Result<Var<T>> {
    let p = format!("channel_add_conv_{side}");
    channel_add_hidden(ctx, vars, side)?.relu()?.conv2d(
        vars.get(&format!("{p}.3.weight"))?,
        Some(vars.get(&format!("{p}.3.bias"))?),
        &Conv2dOptions::default(),
    )
}

/// The FGD loss of one level; `teacher` must be a constant.
pub fn level_loss<T: Float>(
    student: &Var<T>,
    teacher: &Var<T>,
    vars: &LevelVars<T>,
    cfg: &LevelConfig,
    boxes: &Boxes,
) -> Result<LevelOutput<T>> {
    let l = vars.level;
    let [n, c, h, w] = teacher.value().dims4("fgd")?;
    if c < 2 {
        return Err(Error::shape(
            "fgd",
            format!("the GcBlock halves the channels; need C >= 2, got {c}"),
        ));
    }
    let inv_n = 1.0 / n as f64;
    let s = align(student, vars)?;

    let (attn_ts, attn_tc) = attention_maps(teacher, cfg.tau)?;
    let (attn_ss, attn_sc) = attention_maps(&s, cfg.tau)?;
    let (mask_fg, mask_bg) = box_masks::<T>(boxes, n, h, w)?;

    // Focal: weights A_s^t * A_c^t * M per element (constants).
    let tape = s.tape();
    let attn_w = attn_ts
        .reshape(&[n, 1, h, w])?
        .mul(&attn_tc.reshape(&[n, c, 1, 1])?)?;
    let fg_w = attn_w.mul(&tape.constant(mask_fg.reshape(&[n, 1, h, w])?))?;
    let bg_w = attn_w.mul(&tape.constant(mask_bg.reshape(&[n, 1, h, w])?))?;
    let sq = s.sub(teacher)?.square()?;
    let fg = sq.mul(&fg_w)?.sum_all()?.scale(inv_n)?;
    let bg = sq.mul(&bg_w)?.sum_all()?.scale(inv_n)?;

    // Attention transfer.
    let mask_loss = attn_sc
        .sub(&attn_tc)?
        .abs()?
        .sum_all()?
        .add(&attn_ss.sub(&attn_ts)?.abs()?.sum_all()?)?
        .scale(inv_n)?;

    // Global relation through the GcBlocks.
    let out_s = s.add(&channel_add(&spatial_pool(&s, vars, "s")?, vars, "s")?)?;
    let out_t = teacher.add(&channel_add(&spatial_pool(teacher, vars, "t")?, vars, "t")?)?;
    let rela = out_s.sq_err_sum(&out_t)?.scale(inv_n)?;

    let loss = fg
        .scale(cfg.alpha_fgd)?
        .add(&bg.scale(cfg.beta_fgd)?)?
        .add(&mask_loss.scale(cfg.gamma_fgd)?)?
        .add(&rela.scale(cfg.lambda_fgd)?)?;
    Ok(LevelOutput {
        loss,
        debug: vec![
            (format!("p{l}.attn_s"), attn_ts.value().clone()),
            (format!("p{l}.attn_c"), attn_tc.value().clone()),
            (format!("p{l}.mask_fg"), mask_fg),
            (format!("p{l}.mask_bg"), mask_bg),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_masks_follow_the_official_rules() {
        // Image 40x40 (h, w) drawn on a 4x8 map: x scales by 8/40, y by 4/40.
        let boxes = Boxes {
            per_image: vec![vec![[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 10.0]]],
            img_shape: vec![[40.0, 40.0]],
        };
        let (fg, bg) = box_masks::<f64>(&boxes, 1, 4, 8).unwrap();
        // Box 0: w 0..=2, h 0..=1, area 1/(2*3). Box 1: w floor(1)=1..=ceil(4)=4,
        // h floor(0.5)=0..=ceil(1)=1, area 1/(2*4): the overlap keeps 1/6.
        let f = fg.as_slice();
        assert_eq!(f[0], 1.0 / 6.0);
        assert_eq!(f[2], 1.0 / 6.0);
        assert_eq!(f[3], 1.0 / 8.0);
        assert_eq!(f[4], 1.0 / 8.0);
        assert_eq!(f[5], 0.0);
        assert_eq!(f[8 + 4], 1.0 / 8.0);
        assert_eq!(f[16], 0.0);
        // Background: 32 - 10 foreground pixels, each 1/22.
        let b = bg.as_slice();
        assert_eq!(b.iter().filter(|&&v| v > 0.0).count(), 22);
        assert!((b.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(b[0], 0.0);
        assert_eq!(b[5], 1.0 / 22.0);
    }

    #[test]
    fn boxes_are_scaled_by_the_image_not_the_padded_map() {
        // A box covering the whole 20x20 image on a map padded to 8x8 (the image
        // fills the top-left 5x5): with x/img_w*W the box spans the whole map.
        let boxes = Boxes {
            per_image: vec![vec![[0.0, 0.0, 20.0, 20.0]]],
            img_shape: vec![[20.0, 20.0]],
        };
        let (fg, bg) = box_masks::<f64>(&boxes, 1, 8, 8).unwrap();
        assert!(fg.as_slice().iter().all(|&v| v == 1.0 / 81.0));
        assert!(bg.as_slice().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn box_validation_edges() {
        let ok = |b: [f64; 4]| Boxes {
            per_image: vec![vec![b]],
            img_shape: vec![[10.0, 10.0]],
        };
        // Degenerate (zero-width or zero-height) boxes are valid: a point object.
        assert!(ok([2.0, 3.0, 2.0, 5.0]).validate(1).is_ok());
        assert!(ok([2.0, 3.0, 4.0, 3.0]).validate(1).is_ok());
        assert!(ok([2.0, 3.0, 4.0, 2.9]).validate(1).is_err());
        assert!(ok([2.0, 3.0, 1.9, 5.0]).validate(1).is_err());
        // The box lists and the image shapes must each match the batch.
        let mut b = ok([0.0, 0.0, 1.0, 1.0]);
        b.per_image.push(vec![]);
        assert!(b.validate(1).is_err());
        let mut b = ok([0.0, 0.0, 1.0, 1.0]);
        b.img_shape.push([5.0, 5.0]);
        assert!(b.validate(1).is_err());
    }

    #[test]
    fn bad_boxes_are_refused() {
        let mut b = Boxes {
            per_image: vec![vec![[5.0, 0.0, 1.0, 1.0]]],
            img_shape: vec![[10.0, 10.0]],
        };
        assert!(b.validate(1).is_err());
        b.per_image[0][0] = [0.0, 0.0, f64::NAN, 1.0];
        assert!(b.validate(1).is_err());
        b.per_image[0][0] = [0.0, 0.0, 1.0, 1.0];
        assert!(b.validate(2).is_err());
        b.img_shape[0] = [0.0, 10.0];
        assert!(b.validate(1).is_err());
    }
}
