//! Optimizers over named tensors: SGD with momentum and AdamW, with
//! PyTorch's update rules (`torch.optim.SGD`, `torch.optim.AdamW`), so a
//! training run here and one in PyTorch take the same steps.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::named::TensorMap;
use crate::tensor::{Float, Tensor};

/// An optimizer's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// `v = momentum * v + (g + wd * p)`; `p -= lr * v` (first step: `v = g + wd * p`).
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum (0 for plain SGD).
        momentum: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
    /// Decoupled weight decay: `p *= 1 - lr * wd`, then Adam with bias correction.
    AdamW {
        /// Learning rate.
        lr: f64,
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Added to the denominator.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
}

impl OptimizerKind {
    /// AdamW with PyTorch's defaults (betas 0.9, 0.999, eps 1e-8, weight decay 0.01).
    pub fn adamw(lr: f64) -> Self {
        OptimizerKind::AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
    /// SGD with momentum and no weight decay.
    pub fn sgd(lr: f64, momentum: f64) -> Self {
        OptimizerKind::Sgd {
            lr,
            momentum,
            weight_decay: 0.0,
        }
    }

    /// Error unless every setting is in the range PyTorch's optimizers
    /// accept (learning rate, momentum and weight decay finite and >= 0;
    /// betas in [0, 1)), with one difference: `eps` must be > 0, because
    /// with `eps = 0` a tensor whose gradient is all zero at its first step
    /// gets `0 / 0`, a NaN weight, where PyTorch would go on silently.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64, range: &str| {
            Err(Error::InvalidArgument {
                op: "Optimizer::step",
                detail: format!("{what} = {v} is outside {range}"),
            })
        };
        let non_negative = |what: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                bad(what, v, "[0, inf)")
            }
        };
        match *self {
            OptimizerKind::Sgd {
                lr,
                momentum,
                weight_decay,
            } => {
                non_negative("lr", lr)?;
                non_negative("momentum", momentum)?;
                non_negative("weight_decay", weight_decay)
            }
            OptimizerKind::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                non_negative("lr", lr)?;
                non_negative("weight_decay", weight_decay)?;
                for (what, b) in [("beta1", beta1), ("beta2", beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return bad(what, b, "[0, 1)");
                    }
                }
                if eps.is_finite() && eps > 0.0 {
                    Ok(())
                } else {
                    bad("eps", eps, "(0, inf)")
                }
            }
        }
    }
}

/// An optimizer with per-tensor state.
pub struct Optimizer {
    kind: OptimizerKind,
    step: u64,
    /// Per name: the first moment (or momentum buffer), the second moment,
    /// and the steps that tensor has taken. PyTorch keeps the step count per
    /// parameter too, so a tensor that first gets a gradient at step 3 is
    /// bias-corrected as at its own first step.
    state: BTreeMap<String, Moments>,
}

/// One tensor's optimizer state, in f64.
struct Moments {
    m: Vec<f64>,
    v: Vec<f64>,
    steps: u64,
}

impl Optimizer {
    /// An optimizer with no state yet.
    pub fn new(kind: OptimizerKind) -> Self {
        Optimizer {
            kind,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Update every tensor of `params` whose gradient is in `grads` under
    /// `grad_prefix + name`. State is kept in f64. The settings
    /// ([`OptimizerKind::validate`]), every gradient's shape and every value
    /// of the tensors it updates and their gradients (NaN or infinity is an
    /// error naming the tensor, not a step that spreads it) are checked
    /// before anything changes: on an error no tensor, moment or step count
    /// has moved.
    pub fn step<T: Float>(
        &mut self,
        params: &mut TensorMap<T>,
        grads: &TensorMap<T>,
        grad_prefix: &str,
    ) -> Result<()> {
        self.kind.validate()?;
        let grad_of = |name: &str| grads.get(&format!("{grad_prefix}{name}"));
        for (name, p) in params.iter() {
            let Some(g) = grad_of(name) else {
                continue;
            };
            if g.shape() != p.shape() {
                return Err(Error::TensorShape {
                    name: format!("{grad_prefix}{name}"),
                    expected: p.shape().to_vec(),
                    got: g.shape().to_vec(),
                });
            }
            g.check_finite(&format!("{grad_prefix}{name}"))?;
            p.check_finite(name)?;
            // A tensor that changed size under the same name would zip its
            // old moments short or index past them.
            if let Some(st) = self.state.get(name)
                && st.m.len() != p.numel()
            {
                return Err(Error::shape(
                    "Optimizer::step",
                    format!(
                        "{name} has {} elements but its optimizer state has {}",
                        p.numel(),
                        st.m.len()
                    ),
                ));
            }
        }
        self.step += 1;
        for (name, p) in params.iter_mut() {
            let Some(g) = grad_of(name) else {
                continue;
            };
            let n = p.numel();
            let Moments { m, v, steps } =
                self.state.entry(name.clone()).or_insert_with(|| Moments {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    steps: 0,
                });
            *steps += 1;
            let t = *steps as f64;
            let mut out: Vec<T> = Vec::with_capacity(n);
            match self.kind {
                OptimizerKind::Sgd {
                    lr,
                    momentum,
                    weight_decay,
                } => {
                    for ((mi, &p), &g) in m.iter_mut().zip(p.as_slice()).zip(g.as_slice()) {
                        let pi = p.as_f64();
                        let gi = g.as_f64() + weight_decay * pi;
                        *mi = if t == 1.0 { gi } else { momentum * *mi + gi };
                        out.push(T::from_f64(pi - lr * *mi));
                    }
                }
                OptimizerKind::AdamW {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let (c1, c2) = (1.0 - beta1.powf(t), 1.0 - beta2.powf(t));
                    for i in 0..n {
                        let pi = p.as_slice()[i].as_f64() * (1.0 - lr * weight_decay);
                        let gi = g.as_slice()[i].as_f64();
                        m[i] = beta1 * m[i] + (1.0 - beta1) * gi;
                        v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi;
                        let denom = (v[i] / c2).sqrt() + eps;
                        out.push(T::from_f64(pi - lr * (m[i] / c1) / denom));
                    }
                }
            }
            *p = Tensor::from_vec(p.shape(), out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, v: f64) -> TensorMap<f64> {
        TensorMap::from([(name.to_string(), Tensor::from_vec(&[1], vec![v]).unwrap())])
    }

    #[test]
    fn sgd_momentum_matches_pytorch_by_hand() {
        // torch.optim.SGD([p], lr=0.1, momentum=0.9), p=1, grads 2 then 4:
        // step 1: buf = 2, p = 0.8; step 2: buf = 0.9*2 + 4 = 5.8, p = 0.22.
        let mut p = one("w", 1.0);
        let mut opt = Optimizer::new(OptimizerKind::sgd(0.1, 0.9));
        opt.step(&mut p, &one("grad.w", 2.0), "grad.").unwrap();
        assert!((p["w"].as_slice()[0] - 0.8).abs() < 1e-15);
        opt.step(&mut p, &one("grad.w", 4.0), "grad.").unwrap();
        assert!((p["w"].as_slice()[0] - 0.22).abs() < 1e-15);
    }

    #[test]
    fn sgd_weight_decay_matches_pytorch_by_hand() {
        // torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.5), p=1,
        // grads 2 then 4: step 1: d = 2 + 0.5 = 2.5, buf = 2.5, p = 0.75;
        // step 2: d = 4 + 0.375 = 4.375, buf = 2.25 + 4.375 = 6.625,
        // p = 0.75 - 0.6625 = 0.0875.
        let mut p = one("w", 1.0);
        let mut opt = Optimizer::new(OptimizerKind::Sgd {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.5,
        });
        opt.step(&mut p, &one("grad.w", 2.0), "grad.").unwrap();
        assert!((p["w"].as_slice()[0] - 0.75).abs() < 1e-15);
        opt.step(&mut p, &one("grad.w", 4.0), "grad.").unwrap();
        assert!((p["w"].as_slice()[0] - 0.0875).abs() < 1e-15);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // Bias-corrected Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g),
        // after decoupled decay p *= 1 - lr * wd.
        let mut p = one("w", 2.0);
        let mut opt = Optimizer::new(OptimizerKind::adamw(0.01));
        opt.step(&mut p, &one("grad.w", -3.0), "grad.").unwrap();
        let want = 2.0 * (1.0 - 0.01 * 0.01) + 0.01 * 3.0 / (3.0 + 1e-8);
        assert!((p["w"].as_slice()[0] - want).abs() < 1e-15);
        assert_eq!(opt.steps(), 1);
    }

    #[test]
    fn adamw_second_step_matches_pytorch_written_out() {
        // torch.optim.AdamW's step as PyTorch writes it (single-tensor path):
        // p *= 1 - lr wd; m, v updated; step_size = lr / (1 - b1^t);
        // denom = sqrt(v) / sqrt(1 - b2^t) + eps; p -= step_size m / denom.
        let (lr, b1, b2, eps, wd) = (0.01, 0.9, 0.999, 1e-8, 0.01);
        let (mut pw, mut m, mut v) = (2.0f64, 0.0f64, 0.0f64);
        let mut p = one("w", pw);
        let mut opt = Optimizer::new(OptimizerKind::adamw(lr));
        for (t, g) in [(1, -3.0f64), (2, 0.5)] {
            pw *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let step_size = lr / (1.0 - b1.powi(t));
            let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            pw -= step_size * m / denom;
            opt.step(&mut p, &one("grad.w", g), "grad.").unwrap();
            // The two forms differ only in rounding: a few ulps of p ~ 2.
            assert!((p["w"].as_slice()[0] - pw).abs() < 1e-14, "step {t}");
        }
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn each_tensor_counts_its_own_steps() {
        // "b" first gets a gradient at the second step: it takes its own
        // first step (full bias correction), as PyTorch's per-parameter
        // state does, and "a" its second.
        for kind in [OptimizerKind::adamw(0.01), OptimizerKind::sgd(0.1, 0.9)] {
            let mut p = one("a", 1.0);
            p.extend(one("b", 1.0));
            let mut opt = Optimizer::new(kind);
            opt.step(&mut p, &one("grad.a", 2.0), "grad.").unwrap();
            assert_eq!(p["b"].as_slice()[0], 1.0, "{kind:?}: b has no gradient yet");
            let mut both = one("grad.a", 2.0);
            both.extend(one("grad.b", 2.0));
            opt.step(&mut p, &both, "grad.").unwrap();
            let mut fresh = one("b", 1.0);
            Optimizer::new(kind)
                .step(&mut fresh, &one("grad.b", 2.0), "grad.")
                .unwrap();
            assert_eq!(p["b"].as_slice()[0], fresh["b"].as_slice()[0], "{kind:?}");
            // "a" took a second step, which is not its first again.
            let mut a_twice = one("a", 1.0);
            let mut other = Optimizer::new(kind);
            for _ in 0..2 {
                other
                    .step(&mut a_twice, &one("grad.a", 2.0), "grad.")
                    .unwrap();
            }
            assert_eq!(p["a"].as_slice()[0], a_twice["a"].as_slice()[0], "{kind:?}");
            assert_ne!(p["a"].as_slice()[0], p["b"].as_slice()[0], "{kind:?}");
        }
    }

    #[test]
    fn a_gradient_of_the_wrong_shape_is_an_error_and_changes_nothing() {
        // "a" sorts before "w": its update would have been applied before
        // the bad shape of "w" was seen.
        let mut p = one("w", 2.0);
        p.extend(one("a", 3.0));
        let mut g = one("grad.a", 1.0);
        g.insert("grad.w".into(), Tensor::zeros(&[2]).unwrap());
        let mut opt = Optimizer::new(OptimizerKind::adamw(0.01));
        assert_eq!(
            opt.step(&mut p, &g, "grad.").unwrap_err().kind(),
            "tensor_shape"
        );
        assert_eq!(p["a"].as_slice()[0], 3.0);
        assert_eq!(p["w"].as_slice()[0], 2.0);
        assert_eq!(opt.steps(), 0);
        // The failed call left no state: the next good step is a first step.
        let mut fresh = p.clone();
        let good = one("grad.a", 1.0);
        opt.step(&mut p, &good, "grad.").unwrap();
        Optimizer::new(OptimizerKind::adamw(0.01))
            .step(&mut fresh, &good, "grad.")
            .unwrap();
        assert_eq!(p["a"].as_slice()[0], fresh["a"].as_slice()[0]);
    }

    #[test]
    fn a_tensor_that_changed_size_is_an_error() {
        for kind in [OptimizerKind::adamw(0.01), OptimizerKind::sgd(0.1, 0.9)] {
            let mut opt = Optimizer::new(kind);
            opt.step(&mut one("w", 1.0), &one("grad.w", 1.0), "grad.")
                .unwrap();
            let mut p = TensorMap::from([("w".to_string(), Tensor::<f64>::zeros(&[3]).unwrap())]);
            let g = TensorMap::from([("grad.w".to_string(), Tensor::<f64>::ones(&[3]).unwrap())]);
            let e = opt.step(&mut p, &g, "grad.").unwrap_err();
            assert_eq!(e.kind(), "shape_mismatch", "{kind:?}");
            assert!(
                e.to_string()
                    .contains("w has 3 elements but its optimizer state has 1"),
                "{e}"
            );
            assert_eq!(p["w"].as_slice(), &[0.0; 3]);
            assert_eq!(opt.steps(), 1);
        }
    }

    #[test]
    fn a_non_finite_gradient_or_weight_is_an_error_and_changes_nothing() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for kind in [OptimizerKind::adamw(0.01), OptimizerKind::sgd(0.1, 0.9)] {
                // "a" sorts first and is good: nothing of it may move either.
                let mut p = one("a", 3.0);
                p.extend(one("w", 2.0));
                let mut g = one("grad.a", 1.0);
                g.extend(one("grad.w", bad));
                let mut opt = Optimizer::new(kind);
                let e = opt.step(&mut p, &g, "grad.").unwrap_err();
                assert_eq!(e.kind(), "non_finite", "{kind:?} {bad}");
                assert!(e.to_string().starts_with("grad.w holds"), "{e}");
                assert_eq!((p["a"].as_slice()[0], p["w"].as_slice()[0]), (3.0, 2.0));
                assert_eq!(opt.steps(), 0);
                // A bad weight (with a good gradient) is refused the same way.
                let mut p = one("a", 3.0);
                p.extend(one("w", bad));
                let mut g = one("grad.a", 1.0);
                g.extend(one("grad.w", 1.0));
                let e = opt.step(&mut p, &g, "grad.").unwrap_err();
                assert!(e.to_string().starts_with("w holds"), "{e}");
                assert_eq!(p["a"].as_slice()[0], 3.0);
                assert_eq!(opt.steps(), 0);
            }
        }
        // A tensor with no gradient is not updated, so it is not checked.
        let mut p = one("a", 3.0);
        p.extend(one("frozen", f64::NAN));
        let mut opt = Optimizer::new(OptimizerKind::sgd(0.1, 0.0));
        opt.step(&mut p, &one("grad.a", 1.0), "grad.").unwrap();
        assert_eq!(p["a"].as_slice()[0], 2.9);
    }

    #[test]
    fn settings_outside_pytorchs_ranges_are_refused_before_anything_moves() {
        let adamw = |lr, beta1, beta2, eps, weight_decay| OptimizerKind::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        };
        let sgd = |lr, momentum, weight_decay| OptimizerKind::Sgd {
            lr,
            momentum,
            weight_decay,
        };
        let refused = [
            (sgd(-0.1, 0.9, 0.0), "lr = -0.1 is outside [0, inf)"),
            (sgd(f64::INFINITY, 0.9, 0.0), "lr = inf"),
            (sgd(f64::NAN, 0.9, 0.0), "lr = NaN"),
            (sgd(0.1, -0.5, 0.0), "momentum = -0.5"),
            (sgd(0.1, f64::INFINITY, 0.0), "momentum = inf"),
            (sgd(0.1, 0.9, -1e-4), "weight_decay = -0.0001"),
            (sgd(0.1, 0.9, f64::NAN), "weight_decay = NaN"),
            (adamw(-1.0, 0.9, 0.999, 1e-8, 0.0), "lr = -1"),
            (adamw(f64::INFINITY, 0.9, 0.999, 1e-8, 0.0), "lr = inf"),
            (
                adamw(0.1, 1.0, 0.999, 1e-8, 0.0),
                "beta1 = 1 is outside [0, 1)",
            ),
            (adamw(0.1, -0.1, 0.999, 1e-8, 0.0), "beta1 = -0.1"),
            (
                adamw(0.1, 0.9, 1.0, 1e-8, 0.0),
                "beta2 = 1 is outside [0, 1)",
            ),
            (adamw(0.1, 0.9, f64::NAN, 1e-8, 0.0), "beta2 = NaN"),
            (
                adamw(0.1, 0.9, 0.999, 0.0, 0.0),
                "eps = 0 is outside (0, inf)",
            ),
            (adamw(0.1, 0.9, 0.999, f64::INFINITY, 0.0), "eps = inf"),
            (adamw(0.1, 0.9, 0.999, 1e-8, -0.01), "weight_decay = -0.01"),
            (
                adamw(0.1, 0.9, 0.999, 1e-8, f64::INFINITY),
                "weight_decay = inf",
            ),
        ];
        for (kind, says) in refused {
            let mut p = one("w", 1.0);
            let mut opt = Optimizer::new(kind);
            let e = opt.step(&mut p, &one("grad.w", 1.0), "grad.").unwrap_err();
            assert_eq!(e.kind(), "invalid_argument", "{kind:?}");
            assert!(e.to_string().contains(says), "{kind:?}: {e}");
            assert_eq!((p["w"].as_slice()[0], opt.steps()), (1.0, 0));
        }
        // The edges of the ranges are accepted: they are legal in PyTorch
        // and give finite steps here.
        for kind in [
            sgd(0.0, 0.0, 0.0),
            adamw(0.0, 0.0, 0.0, f64::MIN_POSITIVE, 0.0),
        ] {
            let mut p = one("w", 1.0);
            Optimizer::new(kind)
                .step(&mut p, &one("grad.w", 1.0), "grad.")
                .unwrap();
            assert_eq!(p["w"].as_slice()[0], 1.0, "{kind:?}: lr 0 moves nothing");
        }
    }
}
