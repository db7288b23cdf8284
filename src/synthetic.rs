//! Built-in problems: the FPN presets of `docs/spec.md` and synthetic features.
//!
//! Teacher features have structure, so attention means something: each
//! sample holds a few Gaussian "objects" whose responses differ per channel,
//! plus a little noise. The student starts as unrelated noise, far from the
//! teacher.

use crate::backend::BackendRef;
use crate::distill::attention::attention_logits;
use crate::distill::dmkd::level_masks;
use crate::distill::{Config, EvalOptions, LevelConfig, Method, Problem, TensorMap, evaluate};
use crate::error::{Error, Result};
use crate::rng::PhiloxStream;
use crate::tensor::{Float, Tensor};

/// A problem size: batch, channels, and the (H, W) of each level.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    /// The preset's name.
    pub name: &'static str,
    /// Batch.
    pub n: usize,
    /// Teacher channels.
    pub c: usize,
    /// Student channels (an align conv is used when they differ).
    pub cs: usize,
    /// `(H, W)` of each level.
    pub levels: Vec<(usize, usize)>,
    /// Names of the levels (P3.. for RetinaNet).
    pub level_names: Vec<String>,
    /// DMKD's loss weight.
    pub alpha: f64,
    /// Spatial mask ratio.
    pub lambda_s: f64,
    /// Channel mask ratio.
    pub lambda_c: f64,
}

fn names(first: usize, count: usize) -> Vec<String> {
    (first..first + count).map(|k| format!("P{k}")).collect()
}

impl Preset {
    /// `retinanet` (default), `two-stage`, `non-square`, `demo` or `tiny`.
    pub fn named(name: &str) -> Result<Preset> {
        let p = match name {
            // Images 1333x800 padded to 800x1344: P3..P7.
            "retinanet" => Preset {
                name: "retinanet",
                n: 2,
                c: 256,
                cs: 256,
                levels: vec![(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)],
                level_names: names(3, 5),
                alpha: 2e-5,
                lambda_s: 0.65,
                lambda_c: 0.65,
            },
            // Faster / Mask R-CNN students: P2..P5.
            "two-stage" => Preset {
                name: "two-stage",
                n: 2,
                c: 256,
                cs: 256,
                levels: vec![(200, 336), (100, 168), (50, 84), (25, 42)],
                level_names: names(2, 4),
                alpha: 5e-7,
                lambda_s: 0.45,
                lambda_c: 0.45,
            },
            // A 640x480 image padded to 800x1088: P2..P7.
            "non-square" => Preset {
                name: "non-square",
                n: 2,
                c: 256,
                cs: 256,
                levels: vec![(200, 272), (100, 136), (50, 68), (25, 34), (13, 17), (7, 9)],
                level_names: names(2, 6),
                alpha: 2e-5,
                lambda_s: 0.65,
                lambda_c: 0.65,
            },
            // The demo: RetinaNet's level ratios at a size that trains in seconds.
            "demo" => Preset {
                name: "demo",
                n: 2,
                c: 32,
                cs: 24,
                levels: vec![(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)],
                level_names: names(3, 5),
                alpha: 2e-5,
                lambda_s: 0.65,
                lambda_c: 0.65,
            },
            // Small enough for the reference backend and golden files.
            "tiny" => Preset {
                name: "tiny",
                n: 2,
                c: 8,
                cs: 6,
                levels: vec![(7, 9), (4, 5), (2, 3)],
                level_names: names(3, 3),
                alpha: 2e-5,
                lambda_s: 0.65,
                lambda_c: 0.65,
            },
            other => {
                return Err(Error::arg(
                    "preset",
                    format!(
                        "unknown preset `{other}` (retinanet, two-stage, non-square, demo or tiny)"
                    ),
                ));
            }
        };
        Ok(p)
    }

    /// The default DMKD config of this preset, one level per FPN level.
    pub fn config(&self) -> Config {
        Config {
            levels: (0..self.levels.len())
                .map(|l| LevelConfig {
                    alpha: self.alpha,
                    lambda_s: self.lambda_s,
                    lambda_c: self.lambda_c,
                    seed: l as u64,
                    ..LevelConfig::default()
                })
                .collect(),
        }
    }

    /// The same preset with other channel counts.
    pub fn with_channels(mut self, c: usize, cs: usize) -> Self {
        self.c = c;
        self.cs = cs;
        self
    }

    /// Multiply-adds of one conv3x3 C->C pass over every level.
    pub fn conv3x3_macs(&self) -> u64 {
        self.levels
            .iter()
            .map(|&(h, w)| (self.n * h * w * self.c * self.c * 9) as u64)
            .sum()
    }
}

/// Structured teacher features `[N, C, H, W]`.
pub fn teacher_feature<T: Float>(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    seed: u64,
    level: usize,
) -> Result<Tensor<T>> {
    let mut rng = PhiloxStream::new(seed, 0x7465_0000 + level as u32);
    let objects = 4;
    let mut data = crate::pool::take_zeroed::<T>(crate::tensor::checked_numel(&[n, c, h, w])?);
    for s in 0..n {
        let mut maps = Vec::with_capacity(objects);
        for _ in 0..objects {
            let (cy, cx) = (rng.uniform(0.0, h as f64), rng.uniform(0.0, w as f64));
            let sigma = rng.uniform(0.08, 0.25) * (h.max(w) as f64).max(2.0);
            let map: Vec<f64> = (0..h * w)
                .map(|p| {
                    let (y, x) = ((p / w) as f64, (p % w) as f64);
                    (-((y - cy).powi(2) + (x - cx).powi(2)) / (2.0 * sigma * sigma)).exp()
                })
                .collect();
            maps.push(map);
        }
        for ch in 0..c {
            let weights: Vec<f64> = (0..objects).map(|_| rng.uniform(-2.0, 3.0)).collect();
            let plane = &mut data[(s * c + ch) * h * w..][..h * w];
            for (p, v) in plane.iter_mut().enumerate() {
                let signal: f64 = weights.iter().zip(&maps).map(|(a, m)| a * m[p]).sum();
                *v = T::from_f64(signal + 0.1 * rng.normal());
            }
        }
    }
    Tensor::from_vec(&[n, c, h, w], data)
}

/// Unstructured student features `[N, Cs, H, W]` (normal noise).
pub fn student_feature<T: Float>(
    n: usize,
    cs: usize,
    h: usize,
    w: usize,
    seed: u64,
    level: usize,
) -> Result<Tensor<T>> {
    let mut rng = PhiloxStream::new(seed, 0x7374_0000 + level as u32);
    let len = crate::tensor::checked_numel(&[n, cs, h, w])?;
    let mut data = crate::pool::take::<T>(len);
    data.iter_mut().for_each(|v| *v = T::from_f64(rng.normal()));
    Tensor::from_vec(&[n, cs, h, w], data)
}

/// Students and teachers of every level of a preset, by exchange-format name.
pub fn inputs<T: Float>(p: &Preset, seed: u64) -> Result<TensorMap<T>> {
    let mut m = TensorMap::new();
    for (l, &(h, w)) in p.levels.iter().enumerate() {
        m.insert(
            format!("p{l}.student"),
            student_feature(p.n, p.cs, h, w, seed, l)?,
        );
        m.insert(
            format!("p{l}.teacher"),
            teacher_feature(p.n, p.c, h, w, seed, l)?,
        );
    }
    Ok(m)
}

/// The spatial and channel masks `(M_s, M_c)` the preset's loss draws at
/// `level` for its synthetic teacher of `seed` (as [`inputs`] draws it),
/// with the preset's default config and a whole batch (sample offset 0):
/// the masks a benchmark of one masked conv wants.
pub fn loss_masks<T: Float>(p: &Preset, level: usize, seed: u64) -> Result<(Tensor<T>, Tensor<T>)> {
    let &(h, w) = p.levels.get(level).ok_or_else(|| {
        Error::arg(
            "loss_masks",
            format!(
                "preset `{}` has no level {level} (it has {})",
                p.name,
                p.levels.len()
            ),
        )
    })?;
    let cfg = &p.config().levels[level];
    let teacher = teacher_feature::<T>(p.n, p.c, h, w, seed, level)?;
    let (logits_s, logits_c) = attention_logits(&teacher, cfg.tau)?;
    level_masks(&logits_s, &logits_c, cfg, level, 0)
}

/// Stride of a preset's first level in image pixels (P3 of RetinaNet, P2 of
/// the two-stage presets: 8 or 4; 8 is used for all, the boxes only need a
/// plausible image).
const FIRST_LEVEL_STRIDE: f64 = 8.0;

/// Boxes per synthetic image.
const BOXES_PER_IMAGE: usize = 3;

/// FGD's extra inputs for `n` images whose first level is `h x w`:
/// `img_shape` `[n, 2]` and `gt_boxes.{i}` `[3, 4]`. Each image is the
/// padded canvas (`8h x 8w` pixels) less up to an eighth of it at the bottom
/// and right, as a resized image padded to a multiple of the stride is; its
/// boxes are `(x1, y1, x2, y2)` inside it, 10-50% of its size on each side.
/// Drawn from their own Philox stream (id `0x6278_0000`), so the features of
/// the same seed do not change with them.
pub fn fgd_boxes<T: Float>(n: usize, h: usize, w: usize, seed: u64) -> Result<TensorMap<T>> {
    let mut rng = PhiloxStream::new(seed, 0x6278_0000);
    let (canvas_h, canvas_w) = (h as f64 * FIRST_LEVEL_STRIDE, w as f64 * FIRST_LEVEL_STRIDE);
    let mut m = TensorMap::new();
    let mut shapes = Vec::with_capacity(2 * n);
    for i in 0..n {
        let img_h = (canvas_h * rng.uniform(0.875, 1.0)).floor().max(1.0);
        let img_w = (canvas_w * rng.uniform(0.875, 1.0)).floor().max(1.0);
        shapes.extend([img_h, img_w].map(T::from_f64));
        let mut boxes = Vec::with_capacity(4 * BOXES_PER_IMAGE);
        for _ in 0..BOXES_PER_IMAGE {
            let (bw, bh) = (img_w * rng.uniform(0.1, 0.5), img_h * rng.uniform(0.1, 0.5));
            let (x1, y1) = (rng.uniform(0.0, img_w - bw), rng.uniform(0.0, img_h - bh));
            boxes.extend([x1, y1, x1 + bw, y1 + bh].map(T::from_f64));
        }
        m.insert(
            crate::distill::box_name(i),
            Tensor::from_vec(&[BOXES_PER_IMAGE, 4], boxes)?,
        );
    }
    m.insert("img_shape".to_string(), Tensor::from_vec(&[n, 2], shapes)?);
    Ok(m)
}

/// The loss problem of a preset as the benchmarks time it: its default
/// config, its synthetic inputs drawn from `seed`, every parameter
/// initialised from `seed`.
pub fn problem<T: Float>(p: &Preset, seed: u64) -> Result<Problem<T>> {
    let tensors: TensorMap<T> = inputs(p, seed)?;
    Problem::new(
        &p.config(),
        &tensors,
        EvalOptions {
            init_seed: Some(seed),
            allow_extra: false,
        },
    )
}

/// Golden vectors of a preset (what `dmkd golden` writes): its synthetic
/// inputs drawn from `seed`, every parameter initialised from `seed`, and
/// the loss, per-level losses, every gradient and the debug tensors computed
/// on `backend`, all by exchange-format name. Also returns the loss. A
/// config with an FGD level adds synthetic boxes ([`fgd_boxes`]). The
/// masks are drawn as for a data-parallel shard whose first sample is
/// `sample_offset` of the global batch (0: a whole batch; see
/// [`Problem::with_sample_offset`]).
pub fn golden<T: Float>(
    preset: &Preset,
    config: &Config,
    seed: u64,
    sample_offset: usize,
    backend: BackendRef<T>,
) -> Result<(TensorMap<T>, T)> {
    let mut tensors: TensorMap<T> = inputs(preset, seed)?;
    if config.levels.iter().any(|l| l.method == Method::Fgd) {
        let (h, w) = preset.levels.first().copied().unwrap_or((1, 1));
        tensors.extend(fgd_boxes(preset.n, h, w, seed)?);
    }
    let problem = Problem::new(
        config,
        &tensors,
        EvalOptions {
            init_seed: Some(seed),
            allow_extra: false,
        },
    )?
    .with_sample_offset(sample_offset)?;
    let eval = evaluate(backend, &problem)?;
    let mut all = tensors;
    all.extend(eval.params);
    all.extend(eval.outputs);
    Ok((all, eval.loss))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `loss_masks` gives the masks the loss itself reports for the same
    /// inputs (the golden vectors' `p{l}.mask_s` / `p{l}.mask_c`), bit for
    /// bit, and refuses a level the preset lacks.
    #[test]
    fn loss_masks_are_the_loss_s_own() {
        let p = Preset::named("tiny").unwrap();
        let be: BackendRef<f64> = std::sync::Arc::new(crate::backend::ReferenceBackend);
        let (g, _) = golden(&p, &p.config(), 3, 0, be).unwrap();
        for level in 0..p.levels.len() {
            let (ms, mc) = loss_masks::<f64>(&p, level, 3).unwrap();
            assert_eq!(
                ms.as_slice(),
                g[&format!("p{level}.mask_s")].as_slice(),
                "{level}"
            );
            assert_eq!(
                mc.as_slice(),
                g[&format!("p{level}.mask_c")].as_slice(),
                "{level}"
            );
        }
        let (other, _) = loss_masks::<f64>(&p, 0, 4).unwrap();
        assert_ne!(
            other.as_slice(),
            g["p0.mask_s"].as_slice(),
            "the seed matters"
        );
        assert!(loss_masks::<f64>(&p, 3, 3).is_err());
    }

    #[test]
    fn presets_match_the_spec() {
        let r = Preset::named("retinanet").unwrap();
        // docs/spec.md ("Presets"): one conv3x3 256->256 pass over all five levels is 52.8 GFLOP.
        let gflop = 2.0 * r.conv3x3_macs() as f64 / 1e9;
        assert!((gflop - 52.8).abs() < 0.1, "{gflop}");
        let t = Preset::named("two-stage").unwrap();
        assert_eq!(t.levels[0], (200, 336));
        assert_eq!(t.config().levels[0].lambda_c, 0.45);
        assert!(Preset::named("huge").is_err());
        // Level names follow the FPN's: P3-P7 for RetinaNet, P2-P5 for a
        // two-stage detector's RoI levels; one per level in every preset.
        assert_eq!(r.level_names, ["P3", "P4", "P5", "P6", "P7"]);
        assert_eq!(t.level_names, ["P2", "P3", "P4", "P5"]);
        for name in ["retinanet", "two-stage", "non-square", "demo", "tiny"] {
            let p = Preset::named(name).unwrap();
            assert_eq!(p.level_names.len(), p.levels.len(), "{name}");
        }
        // The default config carries the preset's weights and ratios, and a
        // mask seed per level.
        for p in [r, t] {
            let config = p.config();
            assert_eq!(config.levels.len(), p.levels.len());
            for (l, lc) in config.levels.iter().enumerate() {
                assert_eq!(lc.method, Method::Dmkd);
                assert_eq!(
                    (lc.alpha, lc.lambda_s, lc.lambda_c, lc.seed),
                    (p.alpha, p.lambda_s, p.lambda_c, l as u64)
                );
            }
        }
    }

    /// The synthetic features as `docs/spec.md` ("Synthetic inputs") words
    /// them, written out from there: another implementation reading the
    /// spec gets the same tensors.
    #[test]
    fn synthetic_features_follow_the_spec() {
        let (n, c, h, w, seed) = (2, 3, 5, 4, 11);
        for level in [0, 2] {
            let mut rng = PhiloxStream::new(seed, 0x7374_0000 + level as u32);
            let student = student_feature::<f64>(n, c, h, w, seed, level).unwrap();
            for &v in student.as_slice() {
                assert_eq!(v, rng.normal());
            }
            let mut rng = PhiloxStream::new(seed, 0x7465_0000 + level as u32);
            let teacher = teacher_feature::<f64>(n, c, h, w, seed, level).unwrap();
            let got = teacher.as_slice();
            let mut at = 0;
            for _ in 0..n {
                // Four objects: centre (y, x) uniform over the plane, width
                // U(0.08, 0.25) * max(H, W).
                let objects: Vec<[f64; 3]> = (0..4)
                    .map(|_| {
                        let (cy, cx) = (rng.uniform(0.0, h as f64), rng.uniform(0.0, w as f64));
                        [cy, cx, rng.uniform(0.08, 0.25) * h.max(w) as f64]
                    })
                    .collect();
                for _ in 0..c {
                    let weights: Vec<f64> = (0..4).map(|_| rng.uniform(-2.0, 3.0)).collect();
                    for y in 0..h {
                        for x in 0..w {
                            let signal: f64 = objects
                                .iter()
                                .zip(&weights)
                                .map(|(&[cy, cx, s], a)| {
                                    let d2 = (y as f64 - cy).powi(2) + (x as f64 - cx).powi(2);
                                    a * (-d2 / (2.0 * s * s)).exp()
                                })
                                .sum();
                            assert_eq!(
                                got[at],
                                signal + 0.1 * rng.normal(),
                                "level {level} [{at}]"
                            );
                            at += 1;
                        }
                    }
                }
            }
            assert_eq!(at, got.len());
        }
    }

    #[test]
    fn fgd_boxes_lie_inside_their_images_and_golden_uses_them() {
        let (n, h, w) = (3, 7, 9);
        let b = fgd_boxes::<f64>(n, h, w, 5).unwrap();
        assert_eq!(b.len(), n + 1);
        let shapes = b["img_shape"].as_slice();
        assert_eq!(b["img_shape"].shape(), &[n, 2]);
        for i in 0..n {
            let (img_h, img_w) = (shapes[2 * i], shapes[2 * i + 1]);
            // The canvas less at most an eighth, whole pixels.
            assert!(
                (49.0..=56.0).contains(&img_h) && img_h.fract() == 0.0,
                "{img_h}"
            );
            assert!(
                (63.0..=72.0).contains(&img_w) && img_w.fract() == 0.0,
                "{img_w}"
            );
            let boxes = &b[&crate::distill::box_name(i)];
            assert_eq!(boxes.shape(), &[BOXES_PER_IMAGE, 4]);
            for r in boxes.as_slice().chunks(4) {
                let (bw, bh) = (r[2] - r[0], r[3] - r[1]);
                assert!(
                    r[0] >= 0.0 && r[1] >= 0.0 && r[2] <= img_w && r[3] <= img_h,
                    "{r:?}"
                );
                assert!((0.1 * img_w..=0.5 * img_w).contains(&bw), "{r:?}");
                assert!((0.1 * img_h..=0.5 * img_h).contains(&bh), "{r:?}");
            }
        }
        // As the doc words it, from stream 0x6278_0000: per image its height
        // and width (the canvas times U(0.875, 1), whole pixels), then per
        // box its width and height (10-50% of the image's) and its corner.
        let mut rng = PhiloxStream::new(5, 0x6278_0000);
        for i in 0..n {
            let img_h = (8.0 * h as f64 * rng.uniform(0.875, 1.0)).floor();
            let img_w = (8.0 * w as f64 * rng.uniform(0.875, 1.0)).floor();
            assert_eq!(&shapes[2 * i..2 * i + 2], &[img_h, img_w]);
            let mut want = Vec::new();
            for _ in 0..BOXES_PER_IMAGE {
                let (bw, bh) = (img_w * rng.uniform(0.1, 0.5), img_h * rng.uniform(0.1, 0.5));
                let (x1, y1) = (rng.uniform(0.0, img_w - bw), rng.uniform(0.0, img_h - bh));
                want.extend([x1, y1, x1 + bw, y1 + bh]);
            }
            assert_eq!(b[&crate::distill::box_name(i)].as_slice(), want.as_slice());
        }
        // Deterministic in the seed, and the seed matters.
        let flat = |m: &TensorMap<f64>| -> Vec<f64> {
            m.values().flat_map(|t| t.as_slice().to_vec()).collect()
        };
        assert_eq!(flat(&b), flat(&fgd_boxes::<f64>(n, h, w, 5).unwrap()));
        assert_ne!(flat(&b), flat(&fgd_boxes::<f64>(n, h, w, 6).unwrap()));
        // A config with an FGD level: golden adds the boxes its preset's
        // batch needs, and the masks it writes have foreground.
        let p = Preset::named("tiny").unwrap();
        let mut config = p.config();
        config.levels[1].method = Method::Fgd;
        let be: BackendRef<f64> = std::sync::Arc::new(crate::backend::ReferenceBackend);
        let (all, _) = golden(&p, &config, 4, 0, be).unwrap();
        let (h0, w0) = p.levels[0];
        for (k, v) in fgd_boxes::<f64>(p.n, h0, w0, 4).unwrap() {
            assert_eq!(all[&k].as_slice(), v.as_slice(), "{k}");
        }
        assert!(all["p1.mask_fg"].as_slice().iter().any(|&v| v > 0.0));
        // Without one, no boxes (they would be unexpected tensors).
        let be: BackendRef<f64> = std::sync::Arc::new(crate::backend::ReferenceBackend);
        let (all, _) = golden(&p, &p.config(), 4, 0, be).unwrap();
        assert!(!all.contains_key("img_shape"));
    }

    #[test]
    fn golden_holds_inputs_params_and_outputs() {
        let p = Preset::named("tiny").unwrap();
        let be: BackendRef<f64> = std::sync::Arc::new(crate::backend::ReferenceBackend);
        let (all, loss) = golden(&p, &p.config(), 4, 0, be).unwrap();
        let ins = inputs::<f64>(&p, 4).unwrap();
        for (k, v) in &ins {
            assert_eq!(all[k].as_slice(), v.as_slice(), "{k}");
        }
        assert_eq!(all["loss"].item().unwrap(), loss);
        assert!(loss > 0.0);
        assert!(all.contains_key("p2.fusion") && all.contains_key("grad.p2.fusion"));
        assert!(all.contains_key("grad.p0.align.weight") && all.contains_key("p1.mask_c"));
        // Parameters are initialised from the seed, as `dmkd eval` would.
        let spec = crate::distill::params::conv_specs("p0.gen_s.0", 8, 8, 3)[0].clone();
        let want: Tensor<f64> = crate::distill::params::init_tensor(&spec, 4).unwrap();
        assert_eq!(all["p0.gen_s.0.weight"].as_slice(), want.as_slice());
    }

    #[test]
    fn synthetic_inputs_are_deterministic_and_finite() {
        let p = Preset::named("tiny").unwrap();
        let a = inputs::<f32>(&p, 3).unwrap();
        let b = inputs::<f32>(&p, 3).unwrap();
        for (k, v) in &a {
            assert_eq!(v.as_slice(), b[k].as_slice());
            assert!(v.first_non_finite().is_none());
        }
        assert_eq!(a["p0.student"].shape(), &[2, 6, 7, 9]);
        assert_eq!(a["p2.teacher"].shape(), &[2, 8, 2, 3]);
    }
}
