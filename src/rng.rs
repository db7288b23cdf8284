//! Counter-based random numbers: Philox4x32-10 (Salmon, Moraes, Dror and
//! Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
//! generator of Random123, cuRAND and JAX.
//!
//! A counter-based generator maps (key, counter) to random bits with no
//! state, so every backend and thread count draws the same number for the
//! same (seed, level, sample, index): exactly what the masks need.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

#[inline]
fn round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(M0, ctr[0]);
    let (hi1, lo1) = mulhilo(M1, ctr[2]);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// Philox4x32 with 10 rounds: four output words for a counter and a key.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut ctr = ctr;
    let mut key = key;
    for r in 0..10 {
        if r > 0 {
            key = [key[0].wrapping_add(W0), key[1].wrapping_add(W1)];
        }
        ctr = round(ctr, key);
    }
    ctr
}

/// The key of a 64-bit seed: `(seed mod 2^32, seed div 2^32)`.
pub fn seed_key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// A uniform number strictly inside (0, 1) from one 32-bit word:
/// `(x + 0.5) / 2^32`, computed in f64 (exact).
pub fn u32_to_open_unit(x: u32) -> f64 {
    (x as f64 + 0.5) / 4_294_967_296.0
}

/// The mask uniforms of `docs/spec.md` ("Masks"): level `l`, sample `n`, flat index `i`,
/// branch `b` (0 spatial, 1 channel), seed `seed`.
pub fn mask_uniform(seed: u64, level: u32, sample: u32, index: u32, branch: u32) -> f64 {
    let out = philox4x32_10([index, sample, level, branch], seed_key(seed));
    u32_to_open_unit(out[0])
}

/// A sequential stream over Philox for parameter init, synthetic data and
/// tests: stream `stream` of seed `seed`, block counter in the low words.
#[derive(Clone, Debug)]
pub struct PhiloxStream {
    key: [u32; 2],
    stream: u32,
    block: u64,
    buf: [u32; 4],
    used: usize,
    spare_normal: Option<f64>,
}

impl PhiloxStream {
    /// Stream `stream` of seed `seed`.
    pub fn new(seed: u64, stream: u32) -> Self {
        PhiloxStream {
            key: seed_key(seed),
            stream,
            block: 0,
            buf: [0; 4],
            used: 4,
            spare_normal: None,
        }
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            // Counter word 3 carries a tag so these streams never coincide
            // with the mask uniforms (whose word 3 is the branch, 0 or 1).
            let ctr = [
                self.block as u32,
                (self.block >> 32) as u32,
                self.stream,
                0xA5A5_0000,
            ];
            self.buf = philox4x32_10(ctr, self.key);
            self.block += 1;
            self.used = 0;
        }
        let x = self.buf[self.used];
        self.used += 1;
        x
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        let hi = (self.next_u32() >> 5) as u64; // 27 bits
        let lo = (self.next_u32() >> 6) as u64; // 26 bits
        ((hi << 26) | lo) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        self.spare_normal = Some(r * t.sin());
        r * t.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known answers from `docs/spec.md` (the Random123 kat_vectors for philox4x32_10).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX, u32::MAX]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniforms_are_strictly_inside_the_unit_interval() {
        assert!(u32_to_open_unit(0) > 0.0);
        assert!(u32_to_open_unit(u32::MAX) < 1.0);
        assert_eq!(u32_to_open_unit(0), 0.5 / 4_294_967_296.0);
    }

    #[test]
    fn seed_key_splits_low_and_high_words() {
        assert_eq!(seed_key(0x1234_5678_9abc_def0), [0x9abc_def0, 0x1234_5678]);
    }

    #[test]
    fn mask_uniform_uses_the_spec_counter_layout() {
        let seed = 0x0000_0007_0000_0003u64;
        let want = u32_to_open_unit(philox4x32_10([11, 1, 2, 1], [3, 7])[0]);
        assert_eq!(mask_uniform(seed, 2, 1, 11, 1), want);
    }

    /// The stream layout of `docs/spec.md`: block counter in words 0 (low)
    /// and 1 (high), the stream id in word 2, the tag in word 3, the four
    /// outputs used in order; an f64 from two words, 27 high bits then 26.
    #[test]
    fn stream_words_follow_the_spec_counter_layout() {
        let (seed, stream) = (0x0000_0009_0000_0004u64, 77);
        let mut s = PhiloxStream::new(seed, stream);
        // Past 2^32 blocks, so the high counter word is in use.
        s.block = (3 << 32) + 5;
        let block = |lo, hi| philox4x32_10([lo, hi, stream, 0xA5A5_0000], [4, 9]);
        let (b0, b1) = (block(5, 3), block(6, 3));
        let words: Vec<u32> = (0..6).map(|_| s.next_u32()).collect();
        assert_eq!(words, [b0[0], b0[1], b0[2], b0[3], b1[0], b1[1]]);
        let x = s.next_f64();
        let want = (b1[2] >> 5) as f64 / 2f64.powi(27) + (b1[3] >> 6) as f64 / 2f64.powi(53);
        assert_eq!(x, want);
        // The largest words give the largest value below 1.
        let mut t = PhiloxStream::new(0, 0);
        t.buf = [u32::MAX; 4];
        t.used = 2;
        assert_eq!(t.next_f64(), 1.0 - 2f64.powi(-53));
        // Box-Muller: cos, then sin, of the same two uniforms.
        let (mut a, mut b) = (PhiloxStream::new(seed, 3), PhiloxStream::new(seed, 3));
        let (u1, u2) = (1.0 - b.next_f64(), b.next_f64());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        assert_eq!([a.normal(), a.normal()], [r * t.cos(), r * t.sin()]);
        assert_ne!(a.normal(), r * t.cos(), "the next pair draws new uniforms");
    }

    #[test]
    fn stream_moments_are_plausible() {
        let mut s = PhiloxStream::new(42, 0);
        let n = 20000;
        let xs: Vec<f64> = (0..n).map(|_| s.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        // Standard errors: mean 0.007, variance 0.01; these bounds are ~5 sigma.
        assert!(mean.abs() < 0.04, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
        let mut u = PhiloxStream::new(42, 1);
        let m = (0..n).map(|_| u.next_f64()).sum::<f64>() / n as f64;
        assert!((m - 0.5).abs() < 0.02, "uniform mean {m}");
    }
}
