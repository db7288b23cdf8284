//! Attention-guided masks (`docs/spec.md`, "Masks"): 1 keeps an entry, 0 masks it.
//!
//! Masks are constants of the backward pass, computed on the host from the
//! teacher's attention. Every mode is deterministic: `topk` needs no random
//! numbers, `sampled` and `random` draw their uniforms from Philox4x32-10
//! keyed by the level's seed with counter `(index, sample, level, branch)`,
//! so every backend and thread count draws the same mask.

use crate::distill::config::MaskMode;
use crate::error::{Error, Result};
use crate::rng::mask_uniform;
use crate::tensor::{Float, Tensor};

/// Which mask a uniform belongs to (the fourth Philox counter word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Branch {
    /// The spatial mask `M_s`.
    Spatial = 0,
    /// The channel mask `M_c`.
    Channel = 1,
}

/// Number of masked entries: `floor(lambda * count + 0.5)`, computed in f64
/// from the config's value (in f32, 0.65 * 90 + 0.5 falls just under 59).
pub fn mask_count(lambda: f64, count: usize) -> usize {
    let k = (lambda * count as f64 + 0.5).floor();
    (k.max(0.0) as usize).min(count)
}

/// Indices of the `k` largest keys, ties broken by the lower index.
fn top_k_indices(keys: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    // total_cmp orders -inf below every finite key, as ln 0 = -inf requires.
    idx.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Gumbel noise `-ln(-ln u)` for `u` strictly inside (0, 1).
fn gumbel(u: f64) -> f64 {
    -(-u.ln()).ln()
}

/// Sample, index and level must each fit a 32-bit Philox counter word.
fn check_counter_range(n: usize, count: usize, level: usize) -> Result<()> {
    let max = u32::MAX as usize;
    if n > max || count > max || level > max {
        return Err(Error::arg(
            "attention_mask",
            format!(
                "index space (N {n}, count {count}, level {level}) exceeds the 32-bit Philox counter words"
            ),
        ));
    }
    Ok(())
}

/// The mask of one branch from its attention `[N, K]` (channel) or
/// `[N, H, W]` (spatial, flattened to `K = H*W` with index `h*W + w`).
pub fn attention_mask<T: Float>(
    attn: &Tensor<T>,
    mode: MaskMode,
    lambda: f64,
    seed: u64,
    level: usize,
    branch: Branch,
) -> Result<Tensor<T>> {
    if attn.rank() < 2 {
        return Err(Error::shape(
            "attention_mask",
            format!("attention of shape {:?} has no sample axis", attn.shape()),
        ));
    }
    let n = attn.shape()[0];
    let count: usize = attn.shape()[1..].iter().product();
    check_counter_range(n, count, level)?;
    let k = mask_count(lambda, count);
    let a = attn.as_slice();
    let mut mask = vec![T::one(); a.len()];
    for s in 0..n {
        let row = &a[s * count..][..count];
        let out = &mut mask[s * count..][..count];
        let u = |i: usize| mask_uniform(seed, level as u32, s as u32, i as u32, branch as u32);
        match mode {
            MaskMode::Topk => {
                let keys: Vec<f64> = row.iter().map(|v| v.as_f64()).collect();
                for i in top_k_indices(&keys, k) {
                    out[i] = T::zero();
                }
            }
            MaskMode::Sampled => {
                let keys: Vec<f64> = row
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v.as_f64().ln() + gumbel(u(i)))
                    .collect();
                for i in top_k_indices(&keys, k) {
                    out[i] = T::zero();
                }
            }
            MaskMode::Random => {
                for (i, o) in out.iter_mut().enumerate() {
                    if u(i) > 1.0 - lambda {
                        *o = T::zero();
                    }
                }
            }
        }
    }
    Ok(Tensor::from_parts(attn.shape(), mask))
}

/// MGD's uniform mask of `shape` (`[N, ...]`): 0 where `u > 1 - lambda`.
/// It reads no attention, only the shape.
pub fn random_mask<T: Float>(
    shape: &[usize],
    lambda: f64,
    seed: u64,
    level: usize,
    branch: Branch,
) -> Result<Tensor<T>> {
    // The random mode ignores the attention values; ones stand in for them.
    let placeholder = Tensor::<T>::ones(shape)?;
    attention_mask(&placeholder, MaskMode::Random, lambda, seed, level, branch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: Vec<f64>) -> Tensor<f64> {
        Tensor::from_vec(shape, v).unwrap()
    }

    #[test]
    fn mask_count_rounds_half_up_in_f64() {
        assert_eq!(mask_count(0.65, 90), 59);
        // The f32 trap `docs/spec.md` names: computed in f32 this gives 58.
        assert_eq!((0.65f32 * 90.0 + 0.5).floor() as usize, 58);
        assert_eq!(mask_count(0.0, 10), 0);
        assert_eq!(mask_count(0.99, 4), 4);
        assert_eq!(mask_count(0.65, 1), 1);
        assert_eq!(mask_count(0.45, 1), 0);
        assert_eq!(mask_count(0.65, 16800), 10920);
    }

    #[test]
    fn topk_masks_the_highest_with_ties_to_the_lower_index() {
        let a = t(
            &[2, 5],
            vec![0.1, 0.9, 0.5, 0.9, 0.2, 3.0, 3.0, 3.0, 0.0, 1.0],
        );
        let m = attention_mask(&a, MaskMode::Topk, 0.5, 0, 0, Branch::Channel).unwrap();
        // k = floor(2.5 + 0.5) = 3: sample 0 masks 1, 3 (0.9 tie, both) and 2;
        // sample 1 masks indices 0, 1, 2 (a three-way tie).
        assert_eq!(
            m.as_slice(),
            &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
        );
        let a2 = t(&[1, 4], vec![1.0, 1.0, 1.0, 1.0]);
        let m2 = attention_mask(&a2, MaskMode::Topk, 0.3, 0, 0, Branch::Spatial).unwrap();
        assert_eq!(m2.as_slice(), &[0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn sampled_masks_exactly_k_and_follows_the_gumbel_keys() {
        let a = t(&[1, 6], vec![0.5, 2.0, 1.0, 0.0, 1.5, 1.0]);
        let (seed, level) = (0x0000_0005_0000_0007u64, 2);
        let m = attention_mask(&a, MaskMode::Sampled, 0.5, seed, level, Branch::Spatial).unwrap();
        assert_eq!(m.as_slice().iter().filter(|&&v| v == 0.0).count(), 3);
        // Recompute the keys independently and check the masked set.
        let keys: Vec<f64> = (0..6)
            .map(|i| {
                let u = mask_uniform(seed, 2, 0, i as u32, 0);
                a.as_slice()[i].ln() - (-u.ln()).ln()
            })
            .collect();
        let mut order: Vec<usize> = (0..6).collect();
        order.sort_by(|&x, &y| keys[y].partial_cmp(&keys[x]).unwrap());
        for (rank, &i) in order.iter().enumerate() {
            assert_eq!(m.as_slice()[i] == 0.0, rank < 3, "index {i}");
        }
        // Zero attention has key -inf: never masked while k < count of positives.
        assert_eq!(m.as_slice()[3], 1.0);
    }

    #[test]
    fn random_mode_masks_where_u_exceeds_one_minus_lambda() {
        let a = t(&[2, 50], vec![1.0; 100]);
        let m = attention_mask(&a, MaskMode::Random, 0.65, 9, 1, Branch::Channel).unwrap();
        for s in 0..2 {
            for i in 0..50 {
                let u = mask_uniform(9, 1, s as u32, i as u32, 1);
                assert_eq!(m.as_slice()[s * 50 + i] == 0.0, u > 0.35);
            }
        }
        // Different branches draw different numbers.
        let ms = attention_mask(&a, MaskMode::Random, 0.65, 9, 1, Branch::Spatial).unwrap();
        assert_ne!(m.as_slice(), ms.as_slice());
    }

    #[test]
    fn random_mode_keeps_u_equal_to_one_minus_lambda() {
        // Philox of counter 0 and key 0 gives x0 = 0x6627e8d5 (a known answer),
        // so u = (x0 + 0.5) / 2^32 exactly; with lambda = 1 - u the threshold
        // equals u, and `u > 1 - lambda` keeps the entry.
        let u = (0x6627e8d5u32 as f64 + 0.5) / 4_294_967_296.0;
        let lambda = 1.0 - u;
        assert_eq!(1.0 - lambda, u);
        let a = t(&[1, 1], vec![1.0]);
        let m = attention_mask(&a, MaskMode::Random, lambda, 0, 0, Branch::Spatial).unwrap();
        assert_eq!(m.as_slice(), &[1.0]);
        let nudged = lambda + 1e-12;
        let m = attention_mask(&a, MaskMode::Random, nudged, 0, 0, Branch::Spatial).unwrap();
        assert_eq!(m.as_slice(), &[0.0]);
    }

    #[test]
    fn counter_words_must_fit_32_bits() {
        let max = u32::MAX as usize;
        assert!(check_counter_range(max, max, max).is_ok());
        assert!(check_counter_range(max + 1, 1, 0).is_err());
        assert!(check_counter_range(1, max + 1, 0).is_err());
        assert!(check_counter_range(1, 1, max + 1).is_err());
    }

    #[test]
    fn k_zero_and_k_all() {
        let a = t(&[1, 3], vec![0.2, 0.3, 0.5]);
        for mode in [MaskMode::Topk, MaskMode::Sampled] {
            let none = attention_mask(&a, mode, 0.0, 1, 0, Branch::Spatial).unwrap();
            assert_eq!(none.as_slice(), &[1.0, 1.0, 1.0]);
            let all = attention_mask(&a, mode, 0.9, 1, 0, Branch::Spatial).unwrap();
            assert_eq!(all.as_slice(), &[0.0, 0.0, 0.0]);
        }
    }
}
