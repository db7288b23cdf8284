//! Attention maps (FGD's form), built from engine ops so they are
//! differentiable where needed (FGD's student attention) and free where not
//! (the teacher's, on constants, records nothing).
//!
//! - spatial: `g[n,h,w] = mean_c |X[n,c,h,w]|`, `A_s[n] = H*W * softmax_{(h,w)}(g[n] / tau)`
//! - channel: `q[n,c] = mean_{h,w} |X[n,c,h,w]|`, `A_c[n] = C * softmax_c(q[n] / tau)`
//!
//! The masks do not read `A`: they are chosen from the logits `z = g / tau`
//! and `z = q / tau` in f64 ([`attention_logits`]), which order the entries
//! exactly as `A` does but cannot underflow (see `distill::mask`). Where `A`
//! is only reported (DMKD's teacher maps), it is computed from those logits
//! too ([`attention_from_logits`]): the f64 maps rounded once, whatever the
//! compute type, so a tau too small for f32 (logits beyond its range) still
//! gives f32 the f64 answer.

use rayon::prelude::*;

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};

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

/// Refuses a `tau` whose logits `mean / tau` (or `1 / tau` itself) lie
/// beyond `T`'s range: the map computed in `T` would be NaN, and the error
/// says why instead of a non-finite output later.
fn check_logits_fit<T: Float>(mean: &Tensor<T>, tau: f64) -> Result<()> {
    let top = mean
        .as_slice()
        .iter()
        .fold(0.0f64, |m, v| m.max(v.as_f64().abs()));
    let (zmax, inv) = (top / tau, 1.0 / tau);
    if T::from_f64(zmax).as_f64().is_finite() && T::from_f64(inv).as_f64().is_finite() {
        return Ok(());
    }
    Err(Error::arg(
        "attention",
        format!(
            "tau = {tau:e} is too small for {}: the logits mean|x| / tau reach {:e} \
             (1 / tau = {inv:e}), beyond its range; use f64 or a larger tau",
            T::DTYPE,
            zmax.max(inv)
        ),
    ))
}

fn spatial_attention_of_abs<T: Float>(abs: &Var<T>, tau: f64) -> Result<Var<T>> {
    check_tau(tau)?;
    let [n, _, h, w] = abs.value().dims4("spatial_attention")?;
    let mean = abs.mean(&[1], false)?;
    check_logits_fit(mean.value(), tau)?;
    mean.scale(1.0 / tau)?
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
    let mean = abs.mean(&[2, 3], false)?;
    check_logits_fit(mean.value(), tau)?;
    mean.scale(1.0 / tau)?.softmax(1)?.scale(c as f64)
}

/// The attention logits of a (teacher) feature `[N, C, H, W]`, in f64
/// whatever `T` is: spatial `z_s[n,h,w] = mean_c |x| / tau` (`[N, H, W]`) and
/// channel `z_c[n,c] = mean_{h,w} |x| / tau` (`[N, C]`).
///
/// These are the mask keys. `A = K * softmax(z)` orders its entries exactly
/// as `z` does, but in f32 `A` underflows to exactly 0 once a logit lies
/// about 100 below the sample's largest (f64: about 745), and entries that
/// underflow would then be ordered by index. The logits cannot underflow.
///
/// Each mean is accumulated in f64 in a fixed order (channel `c` ascending
/// for the spatial logits; for the channel logits, position `p = h*W + w`
/// into running sum `p % 8` in ascending order, the eight then added as
/// `((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))`), one sample per
/// task, so the keys are the same bits on every backend, instruction set,
/// thread count and compute type for the same input values: an f32 input
/// and its f64 image give identical keys, hence identical masks.
pub fn attention_logits<T: Float>(x: &Tensor<T>, tau: f64) -> Result<(Tensor<f64>, Tensor<f64>)> {
    check_tau(tau)?;
    let [n, c, h, w] = x.dims4("attention_logits")?;
    let hw = h * w;
    let xs = x.as_slice();
    let per_sample: Vec<(Vec<f64>, Vec<f64>)> = (0..n)
        .into_par_iter()
        .map(|s| {
            let mut spatial = vec![0.0f64; hw];
            let mut channel = vec![0.0f64; c];
            for (ci, ch) in channel.iter_mut().enumerate() {
                let plane = &xs[(s * c + ci) * hw..][..hw];
                // Position p goes into running sum p % 8, then the eight
                // are added in a fixed tree: one running sum waited on each
                // add's latency (a retinanet P3 teacher 4.0 ms, against
                // 2.9-3.7 ms this way).
                let mut sums = [0.0f64; 8];
                let mut chunks = plane.chunks_exact(8);
                let mut spots = spatial.chunks_exact_mut(8);
                for (vs, accs) in (&mut chunks).zip(&mut spots) {
                    for ((sum, acc), &v) in sums.iter_mut().zip(accs).zip(vs) {
                        let a = v.as_f64().abs();
                        *acc += a;
                        *sum += a;
                    }
                }
                let tail = chunks.remainder();
                for ((sum, acc), &v) in sums.iter_mut().zip(spots.into_remainder()).zip(tail) {
                    let a = v.as_f64().abs();
                    *acc += a;
                    *sum += a;
                }
                let [s0, s1, s2, s3, s4, s5, s6, s7] = sums;
                let sum = ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7));
                *ch = sum / hw as f64 / tau;
            }
            for z in &mut spatial {
                *z = *z / c as f64 / tau;
            }
            (spatial, channel)
        })
        .collect();
    let (mut zs, mut zc) = (Vec::with_capacity(n * hw), Vec::with_capacity(n * c));
    for (s, ch) in per_sample {
        zs.extend(s);
        zc.extend(ch);
    }
    // Means of finite inputs are finite; only the division can overflow.
    if let Some(z) = zs.iter().chain(&zc).find(|z| !z.is_finite()) {
        return Err(Error::arg(
            "attention",
            format!(
                "tau = {tau:e} is too small for these features: a logit mean|x| / tau is {z} \
                 even in f64; use a larger tau"
            ),
        ));
    }
    Ok((
        Tensor::from_vec(&[n, h, w], zs)?,
        Tensor::from_vec(&[n, c], zc)?,
    ))
}

/// `A = K * softmax(z)` over each sample of the f64 logits `z` (`[N, ...]`,
/// `K` entries per sample), computed in f64 and rounded once to `T`: the
/// attention map of [`spatial_attention`] (logits `[N, H, W]`) or
/// [`channel_attention`] (`[N, C]`) as f64 gives it, for any compute type.
/// The sums run in index order, one sample per task (the same bits on every
/// backend and thread count).
pub fn attention_from_logits<T: Float>(z: &Tensor<f64>) -> Result<Tensor<T>> {
    let shape = z.shape();
    if shape.len() < 2 || z.numel() == 0 {
        return Err(Error::ZeroSized {
            what: "attention logits (or no entry dim)".into(),
            shape: shape.to_vec(),
        });
    }
    let k = z.numel() / shape[0];
    let mut out = vec![T::from_f64(0.0); z.numel()];
    out.par_chunks_mut(k)
        .zip(z.as_slice().par_chunks(k))
        .for_each(|(a, z)| {
            let top = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let den: f64 = z.iter().map(|v| (v - top).exp()).sum();
            for (a, v) in a.iter_mut().zip(z) {
                *a = T::from_f64(k as f64 * (v - top).exp() / den);
            }
        });
    Tensor::from_vec(shape, out)
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
    fn logits_are_the_f64_means_over_tau_and_order_as_the_attention() {
        // N=1, C=2, H=1, W=2 as above: g = [2, 1], q = [1.5, 1.5].
        let x = Tensor::from_vec(&[1, 2, 1, 2], vec![1.0f32, 2.0, -3.0, 0.0]).unwrap();
        let (zs, zc) = attention_logits(&x, 0.5).unwrap();
        assert_eq!(zs.shape(), &[1, 1, 2]);
        assert_eq!(zc.shape(), &[1, 2]);
        assert_eq!(zs.as_slice(), &[4.0, 2.0]);
        assert_eq!(zc.as_slice(), &[3.0, 3.0]);
        // Larger: the logits order every sample's entries as A does, and
        // A = K * softmax(z) recomputed from them matches the engine's maps.
        let t = tape();
        let x = Tensor::from_fn(&[2, 3, 4, 5], |i| ((i * 7919 % 61) as f64 - 30.0) * 0.1).unwrap();
        let (zs, zc) = attention_logits(&x, 0.7).unwrap();
        let (a_s, a_c) = attention_maps(&t.constant(x), 0.7).unwrap();
        // `attention_from_logits` is that same f64 expression in the same
        // order, so it must give `want` exactly.
        for (z, a, k) in [(&zs, a_s.value(), 20usize), (&zc, a_c.value(), 3)] {
            let from_logits = attention_from_logits::<f64>(z).unwrap();
            assert_eq!(from_logits.shape(), a.shape());
            for s in 0..2 {
                let f = &from_logits.as_slice()[s * k..][..k];
                let z = &z.as_slice()[s * k..][..k];
                let a = &a.as_slice()[s * k..][..k];
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let den: f64 = z.iter().map(|v| (v - m).exp()).sum();
                for ((zi, ai), fi) in z.iter().zip(a).zip(f) {
                    let want = k as f64 * (zi - m).exp() / den;
                    assert!((want - ai).abs() <= 1e-13 * want.max(1.0), "{want} vs {ai}");
                    assert_eq!(fi.to_bits(), want.to_bits(), "{fi} vs {want}");
                }
            }
        }
    }

    /// [`attention_from_logits`] (which the test above holds to the
    /// definition and the engine's map) sums to `K` per sample, is the f64
    /// map rounded once in f32, and refuses logits without an entry dim;
    /// logits that overflow even f64 are refused by [`attention_logits`],
    /// naming tau.
    #[test]
    fn maps_from_logits_sum_to_the_count_and_round_once() {
        let x = Tensor::from_fn(&[2, 3, 4, 5], |i| ((i * 7919 % 61) as f64 - 30.0) * 0.1).unwrap();
        let (zs, zc) = attention_logits(&x, 0.3).unwrap();
        for (z, k) in [(&zs, 20usize), (&zc, 3)] {
            let a = attention_from_logits::<f64>(z).unwrap();
            for sample in a.as_slice().chunks(k) {
                let sum: f64 = sample.iter().sum();
                assert!((sum - k as f64).abs() < 1e-12, "{sum}");
            }
            let a32 = attention_from_logits::<f32>(z).unwrap();
            for (g, w) in a32.as_slice().iter().zip(a.as_slice()) {
                assert_eq!(g.to_bits(), (*w as f32).to_bits());
            }
        }
        let flat = Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            attention_from_logits::<f64>(&flat).unwrap_err().kind(),
            "zero_sized"
        );
        let big = Tensor::from_vec(&[1, 2, 1, 1], vec![1e10f64, 1.0]).unwrap();
        let e = attention_logits(&big, 1e-300).unwrap_err();
        assert!(e.to_string().contains("tau = 1e-300"), "{e}");
        // The engine's map refuses what its type cannot hold: 1 / tau
        // beyond f32 (even for logits that fit), or logits beyond it.
        let t32 = Tape::new(Arc::new(ReferenceBackend));
        let small = t32.constant(Tensor::from_vec(&[1, 2, 1, 1], vec![1e-30f32, 1.0]).unwrap());
        assert!(spatial_attention(&small, 1e-30).is_ok());
        assert!(channel_attention(&small, 1e-39).is_err());
        // Logits that fit f32 (2e-30 / 1e-39 = 2e9) with 1 / tau beyond it:
        // refused for the latter, in f32 only.
        let tiny = [1e-30, 2e-30];
        let t32_tiny =
            t32.constant(Tensor::from_vec(&[1, 2, 1, 1], tiny.map(|v| v as f32).to_vec()).unwrap());
        let e = channel_attention(&t32_tiny, 1e-39).unwrap_err().to_string();
        assert!(e.contains(&format!("(1 / tau = {:e})", 1.0 / 1e-39)), "{e}");
        let t64_tiny = tape().constant(Tensor::from_vec(&[1, 2, 1, 1], tiny.to_vec()).unwrap());
        assert!(channel_attention(&t64_tiny, 1e-39).is_ok());
        let large = t32.constant(Tensor::from_vec(&[1, 2, 1, 1], vec![1e37f32, 1.0]).unwrap());
        assert!(channel_attention(&large, 1.0).is_ok());
        assert!(channel_attention(&large, 0.01).is_err());
    }

    #[test]
    fn logits_do_not_underflow_where_the_f32_attention_does() {
        // Channel 0 has mean |x| = 100, channel 1 = 45, channel 2 = 44: with
        // tau = 0.5 the logits are 200, 90, 88. In f32, A_c of channels 1
        // and 2 is exactly 0 (exp(-110) is below the least f32 subnormal,
        // about exp(-103.3)), so ordering by A would tie them; the logits
        // keep them apart.
        let x = Tensor::from_vec(&[1, 3, 1, 1], vec![100.0f32, -45.0, 44.0]).unwrap();
        let (_, zc) = attention_logits(&x, 0.5).unwrap();
        assert_eq!(zc.as_slice(), &[200.0, 90.0, 88.0]);
        let t = Tape::new(Arc::new(ReferenceBackend));
        let a = channel_attention(&t.constant(x), 0.5).unwrap();
        assert_eq!(a.value().as_slice()[1], 0.0f32);
        assert_eq!(a.value().as_slice()[2], 0.0f32);
    }

    /// Both logits are their documented sums, bit for bit: the spatial
    /// ones over channels in ascending order, the channel ones in eight
    /// running sums added in the documented tree. One value of 1e16 per
    /// plane (its spacing is 2) among values of 1.5, each of which counts
    /// as 2 when added to it, makes the order show (checked), and 35
    /// positions leave a partial last run of 8.
    #[test]
    fn logits_sum_in_their_documented_order() {
        let (n, c, hw) = (2, 3, 35);
        let x = Tensor::from_fn(&[n, c, 5, 7], |i| {
            let (plane, p) = (i / hw, i % hw);
            let v: f64 = if p == plane % 8 { 1e16 } else { 1.5 };
            if i % 3 == 0 { -v } else { v }
        })
        .unwrap();
        let tau = 0.7;
        let (zs, zc) = attention_logits(&x, tau).unwrap();
        let v = x.as_slice();
        for s in 0..n {
            for p in 0..hw {
                let mut acc = 0.0f64;
                for ci in 0..c {
                    acc += v[(s * c + ci) * hw + p].abs();
                }
                let want = acc / c as f64 / tau;
                assert_eq!(zs.as_slice()[s * hw + p].to_bits(), want.to_bits());
            }
            for ci in 0..c {
                let mut sums = [0.0f64; 8];
                for p in 0..hw {
                    sums[p % 8] += v[(s * c + ci) * hw + p].abs();
                }
                let [s0, s1, s2, s3, s4, s5, s6, s7] = sums;
                let sum = ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7));
                let in_order: f64 = (0..hw).map(|p| v[(s * c + ci) * hw + p].abs()).sum();
                assert_ne!(sum.to_bits(), in_order.to_bits(), "the order shows");
                let want = sum / hw as f64 / tau;
                assert_eq!(zc.as_slice()[s * c + ci].to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn f32_input_and_its_f64_image_give_identical_logits() {
        let x32 = Tensor::from_fn(&[2, 5, 3, 4], |i| ((i as f32) * 0.731).sin() * 3.0).unwrap();
        let x64: Tensor<f64> = x32.cast();
        let (a, b) = (
            attention_logits(&x32, 0.02).unwrap(),
            attention_logits(&x64, 0.02).unwrap(),
        );
        assert_eq!(a.0.as_slice(), b.0.as_slice());
        assert_eq!(a.1.as_slice(), b.1.as_slice());
    }

    #[test]
    fn a_bad_temperature_is_an_error() {
        let t = tape();
        let x = t.constant(Tensor::zeros(&[1, 1, 2, 2]).unwrap());
        // The message names the bad temperature: an error from elsewhere
        // (a division by zero caught later) would not pass.
        let says = |r: Result<Var<f64>>, tau: &str| {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(&format!("tau = {tau} must be > 0")), "{e}");
        };
        says(spatial_attention(&x, 0.0), "0");
        says(channel_attention(&x, f64::NAN), "NaN");
        says(spatial_attention(&x, -0.0), "-0");
        says(channel_attention(&x, f64::INFINITY), "inf");
        let e = attention_logits(x.value(), -1.0).unwrap_err().to_string();
        assert!(e.contains("tau = -1 must be > 0"), "{e}");
        assert!(attention_logits(&Tensor::<f64>::zeros(&[2, 3]).unwrap(), 1.0).is_err());
    }
}
