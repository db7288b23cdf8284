//! Attention-guided masks (`docs/spec.md`, "Masks"): 1 keeps an entry, 0 masks it.
//!
//! Masks are constants of the backward pass, computed on the host from the
//! teacher's attention logits `z` in f64
//! ([`attention_logits`](crate::distill::attention::attention_logits)):
//! `topk` masks the `k` largest `z`, `sampled` the `k` largest `z + G`
//! (Gumbel-top-k). These order exactly as `A` and `ln(A) + G` would, since
//! `ln A = z + ln(K) - logsumexp(z)` and the per-sample constant drops out,
//! but they cannot underflow: in f32, `A` is exactly 0 once a logit lies
//! about 100 below the largest, and ordering by `A` would then fall back to
//! index order. So an f32 run and an f64 run choose the same masks unless
//! two logits are within rounding of each other.
//!
//! Every mode is deterministic: `topk` needs no random numbers, `sampled`
//! and `random` draw their uniforms from Philox4x32-10 keyed by the level's
//! seed with counter `(index, sample, level, branch)`, so every backend and
//! thread count draws the same mask.

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

/// Indices of the `k` largest keys, ties broken by the lower index, in no
/// particular order.
///
/// The order (key descending by `total_cmp`, a total order on f64, then
/// index ascending) ranks every index differently, so its first `k` are
/// one set however they are found: selected in linear time here, not
/// sorted. Sorting all the keys took 5.9 ms for a two-stage P2 spatial mask
/// (two samples of 67200 positions) and 1.1 ms for a retinanet P3 one
/// (AMD EPYC Zen 4, family 25 model 17, medians of 9).
fn top_k_indices(keys: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    if k < idx.len() {
        // Index k gets the entry of rank k (from 0), and 0..k the k that
        // precede it in the order.
        idx.select_nth_unstable_by(k, |&a, &b| keys[b].total_cmp(&keys[a]).then(a.cmp(&b)));
    }
    idx.truncate(k);
    idx
}

/// Gumbel noise `-ln(-ln u)` for `u` strictly inside (0, 1).
fn gumbel(u: f64) -> f64 {
    -(-u.ln()).ln()
}

/// Sample, index and level must each fit a 32-bit Philox counter word: the
/// samples `sample_offset .. sample_offset + n` (global batch indices, see
/// [`attention_mask`]), indices `0 .. count` and the level (each range's
/// end included, as before offsets existed).
fn check_counter_range(n: usize, sample_offset: usize, count: usize, level: usize) -> Result<()> {
    let max = u32::MAX as usize;
    // The sample counters are `sample_offset .. sample_offset + n`; as for
    // the other words, the end itself must fit too (one spare counter).
    let end = sample_offset.checked_add(n);
    if end.is_none_or(|e| e > max) || count > max || level > max {
        return Err(Error::arg(
            "attention_mask",
            format!(
                "index space (N {n} from sample {sample_offset}, count {count}, level {level}) exceeds the 32-bit Philox counter words"
            ),
        ));
    }
    Ok(())
}

/// The mask of one branch from its attention logits (f64) `[N, K]`
/// (channel) or `[N, H, W]` (spatial, flattened to `K = H*W` with index
/// `h*W + w`), in the compute type `T`.
///
/// `sample_offset` is the index of this batch's first sample in the whole
/// batch: the Philox counter of local sample `s` is `sample_offset + s`, so
/// data-parallel ranks holding samples `[a, b)` of one batch (offset `a`)
/// draw exactly the masks one process holding all of it would. 0 for a
/// whole batch; `topk` draws nothing and ignores it.
pub fn attention_mask<T: Float>(
    logits: &Tensor<f64>,
    mode: MaskMode,
    lambda: f64,
    seed: u64,
    level: usize,
    branch: Branch,
    sample_offset: usize,
) -> Result<Tensor<T>> {
    if logits.rank() < 2 {
        return Err(Error::shape(
            "attention_mask",
            format!("logits of shape {:?} have no sample axis", logits.shape()),
        ));
    }
    let n = logits.shape()[0];
    let count: usize = logits.shape()[1..].iter().product();
    check_counter_range(n, sample_offset, count, level)?;
    let k = mask_count(lambda, count);
    let z = logits.as_slice();
    let mut mask = vec![T::one(); z.len()];
    for s in 0..n {
        let row = &z[s * count..][..count];
        let out = &mut mask[s * count..][..count];
        // Fits: check_counter_range bounds sample_offset + n - 1 by u32::MAX.
        let sample = (sample_offset + s) as u32;
        let u = |i: usize| mask_uniform(seed, level as u32, sample, i as u32, branch as u32);
        match mode {
            MaskMode::Topk => {
                for i in top_k_indices(row, k) {
                    out[i] = T::zero();
                }
            }
            MaskMode::Sampled => {
                let keys: Vec<f64> = row
                    .iter()
                    .enumerate()
                    .map(|(i, &zi)| zi + gumbel(u(i)))
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
    Ok(Tensor::from_parts(logits.shape(), mask))
}

/// MGD's uniform mask of `shape` (`[N, ...]`): 0 where `u > 1 - lambda`.
/// It reads no attention, only the shape. `sample_offset` as in
/// [`attention_mask`].
pub fn random_mask<T: Float>(
    shape: &[usize],
    lambda: f64,
    seed: u64,
    level: usize,
    branch: Branch,
    sample_offset: usize,
) -> Result<Tensor<T>> {
    // The random mode ignores the logits; zeros stand in for them.
    let placeholder = Tensor::<f64>::zeros(shape)?;
    attention_mask(
        &placeholder,
        MaskMode::Random,
        lambda,
        seed,
        level,
        branch,
        sample_offset,
    )
}

/// Where a 3x3 convolution (padding 1) of `x * mask` can read a nonzero
/// input: 1 at each position whose 3x3 neighbourhood inside the image holds a
/// nonzero multiplier, 0 elsewhere. `mask` is `[N, H, W]`, and so is the
/// result. Where it is 0 the convolution reads only zeros and its padding,
/// so its output there is its bias, exactly, whatever `x` and the weights.
pub fn mask_reach<T: Float>(mask: &Tensor<T>) -> Result<Tensor<T>> {
    let &[n, h, w] = mask.shape() else {
        return Err(Error::shape(
            "mask_reach",
            format!("a spatial mask is [N, H, W], got {:?}", mask.shape()),
        ));
    };
    let m = mask.as_slice();
    // Two passes of a 3-wide window: along each row, then down each column.
    let mut rows = vec![false; m.len()];
    for (r, row) in rows.chunks_mut(w.max(1)).enumerate() {
        let src = &m[r * w..][..w];
        for (j, out) in row.iter_mut().enumerate() {
            *out = src[j.saturating_sub(1)..(j + 2).min(w)]
                .iter()
                .any(|&v| v != T::zero());
        }
    }
    let mut reach = vec![T::zero(); m.len()];
    for s in 0..n {
        let plane = &rows[s * h * w..][..h * w];
        for i in 0..h {
            for j in 0..w {
                if (i.saturating_sub(1)..(i + 2).min(h)).any(|k| plane[k * w + j]) {
                    reach[(s * h + i) * w + j] = T::one();
                }
            }
        }
    }
    Ok(Tensor::from_parts(mask.shape(), reach))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: Vec<f64>) -> Tensor<f64> {
        Tensor::from_vec(shape, v).unwrap()
    }

    /// `mask_reach` against its definition, position by position: any
    /// nonzero multiplier (not only 1) within the 3x3 neighbourhood inside
    /// the image, on shapes with one row or one column and at every border.
    #[test]
    fn mask_reach_marks_every_position_a_3x3_conv_reads_a_kept_input_from() {
        let mut zeros_and_ones = [0usize; 3];
        for (n, h, w) in [
            (2, 5, 7),
            (1, 1, 6),
            (1, 6, 1),
            (1, 1, 1),
            (3, 2, 2),
            (3, 6, 9),
        ] {
            for seed in 0..6u64 {
                // Sparse multipliers (2 in 17 nonzero), so that a reach has
                // zeros as well as ones.
                let m = Tensor::<f64>::from_fn(&[n, h, w], |i| {
                    let r = (i as u64 * 2_654_435_761 + seed * 97) % 17;
                    match r {
                        0 => 0.5,
                        1 => 1.0,
                        _ => 0.0,
                    }
                })
                .unwrap();
                let got = mask_reach(&m).unwrap();
                zeros_and_ones[usize::from(got.as_slice().contains(&1.0))] += 1;
                zeros_and_ones[2] += usize::from(got.as_slice().contains(&0.0));
                assert_eq!(got.shape(), &[n, h, w]);
                let ms = m.as_slice();
                for s in 0..n {
                    for i in 0..h {
                        for j in 0..w {
                            let mut any = false;
                            for di in -1i64..=1 {
                                for dj in -1i64..=1 {
                                    let (a, b) = (i as i64 + di, j as i64 + dj);
                                    if (0..h as i64).contains(&a) && (0..w as i64).contains(&b) {
                                        any |= ms[(s * h + a as usize) * w + b as usize] != 0.0;
                                    }
                                }
                            }
                            let want = if any { 1.0 } else { 0.0 };
                            assert_eq!(
                                got.as_slice()[(s * h + i) * w + j],
                                want,
                                "{n}x{h}x{w} seed {seed} at {s},{i},{j}"
                            );
                        }
                    }
                }
            }
        }
        // Most draws reach somewhere and leave somewhere unreached.
        assert!(
            zeros_and_ones[1] >= 24 && zeros_and_ones[2] >= 24,
            "{zeros_and_ones:?}"
        );
        let e = mask_reach(&Tensor::<f64>::zeros(&[2, 3]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("[N, H, W]"), "{e}");
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
        let m = attention_mask::<f64>(&a, MaskMode::Topk, 0.5, 0, 0, Branch::Channel, 0).unwrap();
        // k = floor(2.5 + 0.5) = 3: sample 0 masks 1, 3 (0.9 tie, both) and 2;
        // sample 1 masks indices 0, 1, 2 (a three-way tie).
        assert_eq!(
            m.as_slice(),
            &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
        );
        let a2 = t(&[1, 4], vec![1.0, 1.0, 1.0, 1.0]);
        let m2 = attention_mask::<f64>(&a2, MaskMode::Topk, 0.3, 0, 0, Branch::Spatial, 0).unwrap();
        assert_eq!(m2.as_slice(), &[0.0, 1.0, 1.0, 1.0]);
    }

    /// `top_k_indices` selects the set its definition sorts out (keys
    /// descending by `total_cmp`, so -0 below +0, ties to the lower index),
    /// for every `k` from 0 to all, on keys full of ties: four values over
    /// 61 entries, two of them the signed zeros.
    #[test]
    fn top_k_selects_the_first_k_of_the_sorted_order_for_every_k() {
        let keys: Vec<f64> = (0..61)
            .map(|i| match i * 7 % 5 {
                0 => 0.0,
                1 => -0.0,
                2 => 2.5,
                _ => -1.0,
            })
            .collect();
        let mut sorted: Vec<usize> = (0..keys.len()).collect();
        sorted.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]).then(a.cmp(&b)));
        for k in 0..=keys.len() {
            let mut got = top_k_indices(&keys, k);
            got.sort_unstable();
            let mut want = sorted[..k].to_vec();
            want.sort_unstable();
            assert_eq!(got, want, "k = {k}");
        }
    }

    #[test]
    fn sampled_masks_exactly_k_and_follows_the_gumbel_keys() {
        let z = t(&[1, 6], vec![0.5, 2.0, 1.0, -300.0, 1.5, 1.0]);
        let (seed, level) = (0x0000_0005_0000_0007u64, 2);
        let m = attention_mask::<f32>(&z, MaskMode::Sampled, 0.5, seed, level, Branch::Spatial, 0)
            .unwrap();
        assert_eq!(m.as_slice().iter().filter(|&&v| v == 0.0).count(), 3);
        // Recompute the keys independently and check the masked set.
        let keys: Vec<f64> = (0..6)
            .map(|i| {
                let u = mask_uniform(seed, 2, 0, i as u32, 0);
                z.as_slice()[i] - (-u.ln()).ln()
            })
            .collect();
        let mut order: Vec<usize> = (0..6).collect();
        order.sort_by(|&x, &y| keys[y].partial_cmp(&keys[x]).unwrap());
        for (rank, &i) in order.iter().enumerate() {
            assert_eq!(m.as_slice()[i] == 0.0, rank < 3, "index {i}");
        }
        // A logit 300 below the rest (A = 0 even in f64) is not masked
        // while k is below the count of the others.
        assert_eq!(m.as_slice()[3], 1.0);
    }

    #[test]
    fn sampled_orders_by_logit_plus_gumbel_not_by_index_when_a_underflows() {
        // Logits far below the first: their A underflows in f32 and f64
        // alike, ln(A) + G would be -inf for all of them and the mask would
        // fall back to the lower indices. With z + G it follows the keys.
        let z = t(&[1, 5], vec![0.0, -2000.0, -1000.0, -1500.0, -1001.0]);
        let m =
            attention_mask::<f32>(&z, MaskMode::Sampled, 0.4, 3, 0, Branch::Channel, 0).unwrap();
        // k = 2: index 0 (the largest by 1000) and index 2 or 4 (1 apart,
        // Gumbel noise of order 1 decides); never 1 or 3.
        let masked: Vec<usize> = (0..5).filter(|&i| m.as_slice()[i] == 0.0).collect();
        assert_eq!(masked.len(), 2);
        assert_eq!(masked[0], 0);
        assert!(masked[1] == 2 || masked[1] == 4, "{masked:?}");
        let g = |i: u32| -(-mask_uniform(3, 0, 0, i, 1).ln()).ln();
        let want = if -1000.0 + g(2) >= -1001.0 + g(4) {
            2
        } else {
            4
        };
        assert_eq!(masked[1], want);
    }

    #[test]
    fn random_mode_masks_where_u_exceeds_one_minus_lambda() {
        let a = t(&[2, 50], vec![1.0; 100]);
        let m =
            attention_mask::<f64>(&a, MaskMode::Random, 0.65, 9, 1, Branch::Channel, 0).unwrap();
        for s in 0..2 {
            for i in 0..50 {
                let u = mask_uniform(9, 1, s as u32, i as u32, 1);
                assert_eq!(m.as_slice()[s * 50 + i] == 0.0, u > 0.35);
            }
        }
        // Different branches draw different numbers.
        let ms =
            attention_mask::<f64>(&a, MaskMode::Random, 0.65, 9, 1, Branch::Spatial, 0).unwrap();
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
        let m =
            attention_mask::<f64>(&a, MaskMode::Random, lambda, 0, 0, Branch::Spatial, 0).unwrap();
        assert_eq!(m.as_slice(), &[1.0]);
        let nudged = lambda + 1e-12;
        let m =
            attention_mask::<f64>(&a, MaskMode::Random, nudged, 0, 0, Branch::Spatial, 0).unwrap();
        assert_eq!(m.as_slice(), &[0.0]);
    }

    #[test]
    fn counter_words_must_fit_32_bits() {
        let max = u32::MAX as usize;
        assert!(check_counter_range(max, 0, max, max).is_ok());
        assert!(check_counter_range(max + 1, 0, 1, 0).is_err());
        assert!(check_counter_range(1, 0, max + 1, 0).is_err());
        assert!(check_counter_range(1, 0, 1, max + 1).is_err());
        // The end of the sample range, offset + n, must fit: inclusive at u32::MAX.
        assert!(check_counter_range(1, max - 1, 1, 0).is_ok());
        assert!(check_counter_range(2, max - 2, 1, 0).is_ok());
        assert!(check_counter_range(2, max - 1, 1, 0).is_err());
        assert!(check_counter_range(1, max, 1, 0).is_err());
        assert!(check_counter_range(2, usize::MAX, 1, 0).is_err());
    }

    #[test]
    fn a_sample_offset_shifts_the_sample_counter() {
        // Rows 2 and 3 of a batch of 4 drawn alone with offset 2 are rows 2
        // and 3 of the whole batch's mask, in both random modes.
        let (seed, level) = (0x9E37_79B9_7F4A_7C15u64, 1);
        let full_attn = t(
            &[4, 6],
            (0..24)
                .map(|i| 0.5 + ((i * 7) % 11) as f64 / 10.0)
                .collect(),
        );
        let tail_attn = t(&[2, 6], full_attn.as_slice()[12..].to_vec());
        for mode in [MaskMode::Sampled, MaskMode::Random] {
            for branch in [Branch::Spatial, Branch::Channel] {
                let full =
                    attention_mask::<f64>(&full_attn, mode, 0.5, seed, level, branch, 0).unwrap();
                let tail =
                    attention_mask::<f64>(&tail_attn, mode, 0.5, seed, level, branch, 2).unwrap();
                assert_eq!(tail.as_slice(), &full.as_slice()[12..], "{mode:?}");
                let unshifted =
                    attention_mask::<f64>(&tail_attn, mode, 0.5, seed, level, branch, 0).unwrap();
                assert_ne!(unshifted.as_slice(), tail.as_slice(), "{mode:?}");
            }
        }
        let full = random_mask::<f64>(&[4, 3, 5], 0.5, seed, level, Branch::Spatial, 0).unwrap();
        let tail = random_mask::<f64>(&[1, 3, 5], 0.5, seed, level, Branch::Spatial, 3).unwrap();
        assert_eq!(tail.as_slice(), &full.as_slice()[45..]);
        // topk draws nothing: the offset changes nothing.
        let a = attention_mask::<f64>(
            &tail_attn,
            MaskMode::Topk,
            0.5,
            seed,
            level,
            Branch::Spatial,
            0,
        );
        let b = attention_mask::<f64>(
            &tail_attn,
            MaskMode::Topk,
            0.5,
            seed,
            level,
            Branch::Spatial,
            7,
        );
        assert_eq!(a.unwrap().as_slice(), b.unwrap().as_slice());
        // An offset past the 32-bit counter is an error, not a wrapped counter.
        let e = attention_mask::<f64>(
            &tail_attn,
            MaskMode::Random,
            0.5,
            seed,
            level,
            Branch::Spatial,
            u32::MAX as usize - 1,
        )
        .unwrap_err();
        assert_eq!(e.kind(), "invalid_argument");
    }

    #[test]
    fn k_zero_and_k_all() {
        let a = t(&[1, 3], vec![0.2, 0.3, 0.5]);
        for mode in [MaskMode::Topk, MaskMode::Sampled] {
            let none = attention_mask::<f64>(&a, mode, 0.0, 1, 0, Branch::Spatial, 0).unwrap();
            assert_eq!(none.as_slice(), &[1.0, 1.0, 1.0]);
            let all = attention_mask::<f64>(&a, mode, 0.9, 1, 0, Branch::Spatial, 0).unwrap();
            assert_eq!(all.as_slice(), &[0.0, 0.0, 0.0]);
        }
    }
}
