//! Attention maps (FGD's form), built from engine ops so they are
//! differentiable where needed (FGD's student attention) and free where not
//! (the teacher's, on constants, records nothing).
//!
//! - spatial: `g[n,h,w] = mean_c |X[n,c,h,w]|`, `A_s[n] = H*W * softmax_{(h,w)}(g[n] / tau)`
//! - channel: `q[n,c] = mean_{h,w} |X[n,c,h,w]|`, `A_c[n] = C * softmax_c(q[n] / tau)`

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::tensor::Float;

fn check_tau(tau: f64) -> Result<()> {
    if !(tau.is_finite() && tau > 0.0) {
        return Err(Error::arg("attention", format!("tau = {tau} must be > 0")));
    }
    Ok(())
}

/// Spatial attention `[N, H, W]` of an `[N, C, H, W]` feature.
pub fn spatial_attention<T: Float>(x: &Var<T>, tau: f64) -> Result<Var<T>> {
    spatial_attention_of_abs(&x.abs()?, tau)
}

/// Both attention maps, sharing one `|x|` pass (the teacher's in DMKD).
pub fn attention_maps<T: Float>(x: &Var<T>, tau: f64) -> Result<(Var<T>, Var<T>)> {
    let a = x.abs()?;
    Ok((
        spatial_attention_of_abs(&a, tau)?,
        channel_attention_of_abs(&a, tau)?,
    ))
}

fn spatial_attention_of_abs<T: Float>(abs: &Var<T>, tau: f64) -> Result<Var<T>> {
    check_tau(tau)?;
    let [n, _, h, w] = abs.value().dims4("spatial_attention")?;
    abs.mean(&[1], false)?
        .scale(1.0 / tau)?
        .reshape(&[n, h * w])?
        .softmax(1)?
        .scale((h * w) as f64)?
        .reshape(&[n, h, w])
}

/// Channel attention `[N, C]` of an `[N, C, H, W]` feature.
pub fn channel_attention<T: Float>(x: &Var<T>, tau: f64) -> Result<Var<T>> {
    channel_attention_of_abs(&x.abs()?, tau)
}

fn channel_attention_of_abs<T: Float>(abs: &Var<T>, tau: f64) -> Result<Var<T>> {
    check_tau(tau)?;
    let [_, c, _, _] = abs.value().dims4("channel_attention")?;
    abs.mean(&[2, 3], false)?
        .scale(1.0 / tau)?
        .softmax(1)?
        .scale(c as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ReferenceBackend;
    use crate::{Tape, Tensor};
    use std::sync::Arc;

    fn tape() -> Tape<f64> {
        Tape::new(Arc::new(ReferenceBackend))
    }

    #[test]
    fn attention_matches_the_formula_by_hand() {
        // N=1, C=2, H=1, W=2: g = [(|1|+|-3|)/2, (|2|+|0|)/2] = [2, 1].
        let t = tape();
        let x = t.constant(Tensor::from_vec(&[1, 2, 1, 2], vec![1.0, 2.0, -3.0, 0.0]).unwrap());
        let a = spatial_attention(&x, 0.5).unwrap();
        let (e0, e1) = ((2.0f64 / 0.5).exp(), (1.0f64 / 0.5).exp());
        let want = [2.0 * e0 / (e0 + e1), 2.0 * e1 / (e0 + e1)];
        for (g, w) in a.value().as_slice().iter().zip(want) {
            assert!((g - w).abs() < 1e-14, "{g} vs {w}");
        }
        assert_eq!(a.shape(), &[1, 1, 2]);
        // q = [mean(|1|,|2|), mean(|-3|,|0|)] = [1.5, 1.5]: uniform, so A_c = [1, 1].
        let c = channel_attention(&x, 0.5).unwrap();
        assert_eq!(c.shape(), &[1, 2]);
        for v in c.value().as_slice() {
            assert!((v - 1.0).abs() < 1e-14);
        }
    }

    #[test]
    fn attention_sums_to_the_count_and_stays_finite_for_huge_and_tiny_features() {
        for scale in [1e4, 1e-8] {
            let t = tape();
            let x = t.constant(
                Tensor::from_fn(&[2, 3, 4, 5], |i| scale * ((i * 37 % 11) as f64 - 5.0)).unwrap(),
            );
            let a = spatial_attention(&x, 0.5).unwrap();
            let c = channel_attention(&x, 0.5).unwrap();
            assert!(a.value().first_non_finite().is_none());
            assert!(c.value().first_non_finite().is_none());
            let sa: f64 = a.value().as_slice()[..20].iter().sum();
            let sc: f64 = c.value().as_slice()[..3].iter().sum();
            assert!((sa - 20.0).abs() < 1e-10 && (sc - 3.0).abs() < 1e-10);
        }
    }

    #[test]
    fn shared_abs_gives_the_same_maps() {
        let t = tape();
        let x = t.constant(Tensor::from_fn(&[2, 3, 4, 5], |i| (i as f64 * 0.37).sin()).unwrap());
        let (s, c) = attention_maps(&x, 0.7).unwrap();
        assert_eq!(
            s.value().as_slice(),
            spatial_attention(&x, 0.7).unwrap().value().as_slice()
        );
        assert_eq!(
            c.value().as_slice(),
            channel_attention(&x, 0.7).unwrap().value().as_slice()
        );
    }

    #[test]
    fn a_bad_temperature_is_an_error() {
        let t = tape();
        let x = t.constant(Tensor::zeros(&[1, 1, 2, 2]).unwrap());
        assert!(spatial_attention(&x, 0.0).is_err());
        assert!(channel_attention(&x, f64::NAN).is_err());
    }
}
