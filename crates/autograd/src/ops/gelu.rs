//! GELU, the exact form PyTorch uses by default: `gelu(x) = x · Φ(x)` with `Φ` the standard
//! normal CDF, `Φ(x) = ½ erfc(−x/√2)`. Computed in f64 and rounded once to f32, so each value
//! is the correctly rounded result up to the last bit or so.

use crate::error::Result;
use crate::tape::{Op, Tape, Var};
use nibble_tensor::Tensor;
use std::sync::Arc;

/// The error function, accurate to about 1e-15 absolute on all of ℝ.
///
/// ```
/// use nibble_autograd::ops::gelu::erf;
/// assert!((erf(1.0) - 0.842_700_792_949_714_9).abs() < 1e-15);
/// assert_eq!(erf(0.0), 0.0);
/// ```
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x.abs() < ERFC_FROM {
        erf_series(x)
    } else {
        (1.0 - erfc_fraction(x.abs())).copysign(x)
    }
}

/// The complementary error function `1 − erf(x)`, without cancellation for large `x`.
///
/// ```
/// use nibble_autograd::ops::gelu::erfc;
/// assert!((erfc(5.0) / 1.537_459_794_428_035e-12 - 1.0).abs() < 1e-12);
/// ```
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x >= ERFC_FROM {
        erfc_fraction(x)
    } else if x <= -ERFC_FROM {
        2.0 - erfc_fraction(-x)
    } else {
        1.0 - erf_series(x)
    }
}

/// Below this |x| the series is used, above it the continued fraction.
const ERFC_FROM: f64 = 3.0;

/// `erf(x) = 2/√π · e^{−x²} · Σ 2ⁿ x^{2n+1} / (1·3·…·(2n+1))`: every term is positive, so
/// nothing cancels (|x| < 3: at most ~80 terms).
fn erf_series(x: f64) -> f64 {
    let two_x2 = 2.0 * x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term.abs() > sum.abs() * 1e-17 {
        n += 1.0;
        term *= two_x2 / (2.0 * n + 1.0);
        sum += term;
    }
    std::f64::consts::FRAC_2_SQRT_PI * (-x * x).exp() * sum
}

/// `erfc(x) = e^{−x²}/√π · 1/(x + ½/(x + 1/(x + 3⁄2/(x + …))))` for x ≥ 3, evaluated from the
/// tail (90 levels: converged to f64 precision at x = 3 and beyond).
fn erfc_fraction(x: f64) -> f64 {
    let mut f = x;
    for k in (1..=90).rev() {
        f = x + (k as f64 / 2.0) / f;
    }
    (-x * x).exp() / (std::f64::consts::PI.sqrt() * f)
}

/// `Φ(x)`, the standard normal CDF.
fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

/// `x · Φ(x)`, rounded once to f32.
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (x * normal_cdf(x)) as f32
}

/// `d gelu / dx = Φ(x) + x · φ(x)`, with `φ` the standard normal density.
pub fn gelu_derivative(x: f32) -> f32 {
    let x = x as f64;
    let density = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (normal_cdf(x) + x * density) as f32
}

/// Backward of [`Tape::gelu`]: `dX = dY · gelu'(x)`. Saves the input.
struct GeluOp {
    x: Arc<Tensor>,
}

impl Op for GeluOp {
    fn name(&self) -> &'static str {
        "gelu"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut d_x = d_y;
        d_x.data_mut()
            .iter_mut()
            .zip(self.x.data())
            .for_each(|(g, &x)| *g *= gelu_derivative(x));
        Ok(vec![Some(d_x)])
    }
}

impl Tape {
    /// GELU, elementwise, exact erf form (PyTorch's `nn.GELU()` default).
    pub fn gelu(&self, x: &Var) -> Result<Var> {
        let y = Tensor::from_vec(
            x.shape(),
            x.value().data().iter().map(|&v| gelu(v)).collect(),
        )?;
        self.record("gelu", &[x], y, false, || {
            Box::new(GeluOp { x: x.shared() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf at points whose values are known to 16 digits (Abramowitz & Stegun, table 7.1, and
    /// high-precision references).
    #[test]
    fn erf_matches_known_values() {
        let cases = [
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.9, 0.999_958_902_121_900_2),
            (3.5, 0.999_999_256_901_627_7),
        ];
        for (x, want) in cases {
            assert!((erf(x) - want).abs() < 2e-15, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 2e-15);
        }
        // The tail, relative.
        for (x, want) in [
            (3.0, 2.209_049_699_858_544e-5),
            (6.0, 2.151_973_671_249_891e-17),
        ] {
            assert!(
                (erfc(x) / want - 1.0).abs() < 1e-12,
                "erfc({x}) = {}",
                erfc(x)
            );
        }
        assert!(erf(f64::NAN).is_nan());
        assert_eq!(erf(40.0), 1.0);
        assert_eq!(erf(-40.0), -1.0);
        assert_eq!(erfc(-40.0), 2.0);
    }

    /// Both sides of the switch between the series and the continued fraction agree.
    #[test]
    fn erf_is_continuous_at_the_switch() {
        let below = erfc(ERFC_FROM - 1e-12);
        let above = erfc(ERFC_FROM);
        assert!((below / above - 1.0).abs() < 1e-9, "{below} vs {above}");
    }

    #[test]
    fn gelu_values_and_derivative() {
        assert_eq!(gelu(0.0), 0.0);
        // PyTorch: F.gelu(torch.tensor([1.0, -1.0, 3.0])) = [0.8413447, -0.1586553, 2.9959502]
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-7);
        assert!((gelu(-1.0) + 0.158_655_3).abs() < 1e-7);
        assert!((gelu(3.0) - 2.995_950_2).abs() < 1e-6);
        assert_eq!(gelu(-100.0), -0.0);
        for x in [-4.0f32, -1.3, -0.2, 0.0, 0.7, 2.5] {
            let h = 1e-3f64;
            let xf = x as f64;
            let num = ((xf + h) * normal_cdf(xf + h) - (xf - h) * normal_cdf(xf - h)) / (2.0 * h);
            assert!((gelu_derivative(x) as f64 - num).abs() < 1e-6, "x = {x}");
        }
    }
}
