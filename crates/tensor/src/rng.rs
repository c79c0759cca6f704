//! A small deterministic random number generator, so that seeded results reproduce across runs,
//! machines and thread counts.

/// SplitMix64-seeded xoshiro256++ generator. Not cryptographic; deterministic everywhere.
///
/// ```
/// use nibble_tensor::Rng;
/// let mut a = Rng::new(7);
/// let mut b = Rng::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// let u = a.uniform(-1.0, 1.0);
/// assert!((-1.0..1.0).contains(&u));
/// ```
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
    /// A second normal deviate left over from the last Box-Muller pair.
    spare_normal: Option<f32>,
}

impl Rng {
    /// A generator seeded with `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
            spare_normal: None,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform f32 in `[0, 1)` with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A uniform f32 in `[low, high)`, for finite `low < high`. Outside that it computes what
    /// `low + (high - low) · u` gives, `u` uniform in `[0, 1)`: `low` for `low >= high`, NaN
    /// or infinities for bounds that are (PyTorch's `uniform_` refuses them; check untrusted
    /// bounds before drawing).
    ///
    /// ```
    /// let mut rng = nibble_tensor::Rng::new(0);
    /// let v = rng.uniform(-0.5, 0.5);
    /// assert!((-0.5..0.5).contains(&v));
    /// assert_eq!(rng.uniform(5.0, 1.0), 5.0);
    /// ```
    pub fn uniform(&mut self, low: f32, high: f32) -> f32 {
        let v = low + (high - low) * self.next_f32();
        // Rounding can land exactly on `high`; keep the interval half-open.
        if v >= high {
            low
        } else {
            v
        }
    }

    /// A standard normal deviate (Box-Muller, computed in f64).
    pub fn normal(&mut self) -> f32 {
        if let Some(v) = self.spare_normal.take() {
            return v;
        }
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64);
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare_normal = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    /// A derived generator for a sub-stream (e.g. one layer), independent of how much of this
    /// generator has been used.
    pub fn fork(seed: u64, stream: u64) -> Self {
        Rng::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03).rotate_left(17))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_stays_in_range_and_normal_has_unit_moments() {
        let mut r = Rng::new(0);
        let n = 200_000;
        let mut sum = 0.0f64;
        let mut sq = 0.0f64;
        for _ in 0..n {
            let u = r.uniform(-0.5, 0.25);
            assert!((-0.5..0.25).contains(&u));
            let z = r.normal() as f64;
            sum += z;
            sq += z * z;
        }
        let mean = sum / n as f64;
        let var = sq / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let a: Vec<u64> = (0..8).map(|_| Rng::new(3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::new(3).next_u64(), Rng::new(4).next_u64());
        assert_ne!(Rng::fork(3, 1).next_u64(), Rng::fork(3, 2).next_u64());
    }
}
