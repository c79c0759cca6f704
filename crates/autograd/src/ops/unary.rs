//! Elementwise functions with one op for all of them: tanh, sigmoid, SiLU, the tanh form of
//! GELU, LeakyReLU, ELU, Softplus, Mish, Hardswish, ReLU6, SELU, CELU, Hardtanh, Hardsigmoid,
//! Softsign, LogSigmoid and Tanhshrink. Each [`UnaryFn`] gives its value
//! and its derivative per element, computed in f32 in the order PyTorch's CPU kernels use for
//! f32 tensors (and, at a kink, the side PyTorch's backward takes); [`Tape::unary`] applies one
//! and records a backward that saves the input.

use crate::error::{AutogradError, Result};
use crate::tape::{Op, Tape, Var};
use nibble_tensor::Tensor;
use std::sync::Arc;

/// `√(2/π)`, the tanh-GELU's inner scale (PyTorch's `kBeta`).
const GELU_TANH_BETA: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh-GELU (PyTorch's `kKappa`).
const GELU_TANH_KAPPA: f32 = 0.044_715;
/// Softplus returns `x` itself above this (PyTorch's default `threshold`).
const SOFTPLUS_THRESHOLD: f32 = 20.0;
/// SELU's alpha (PyTorch's `nn.SELU`, from the self-normalizing networks paper).
const SELU_ALPHA: f32 = 1.673_263_2;
/// SELU's scale.
const SELU_SCALE: f32 = 1.050_701;

/// A function's f32 coefficient (LeakyReLU's negative slope, ELU's alpha), held by its bits so
/// that [`UnaryFn`] stays `Eq` and `Hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coef(u32);

impl Coef {
    /// The coefficient `v`.
    pub const fn new(v: f32) -> Self {
        Coef(v.to_bits())
    }

    /// Its value.
    pub const fn get(self) -> f32 {
        f32::from_bits(self.0)
    }
}

/// An elementwise function with a derivative, for [`Tape::unary`].
///
/// ```
/// use nibble_autograd::{Coef, UnaryFn};
/// assert_eq!(UnaryFn::Tanh.value(100.0), 1.0);
/// assert_eq!(UnaryFn::Sigmoid.value(0.0), 0.5);
/// assert_eq!(UnaryFn::Sigmoid.derivative(0.0), 0.25);
/// assert_eq!(UnaryFn::Silu.derivative(0.0), 0.5);
/// assert_eq!(UnaryFn::LeakyRelu(Coef::new(0.5)).value(-2.0), -1.0);
/// assert_eq!(UnaryFn::Relu6.value(7.0), 6.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryFn {
    /// `tanh(x)` (`nn.Tanh`): ±1 for large |x|.
    Tanh,
    /// `1 / (1 + e^{−x})` (`nn.Sigmoid`), in the form that never overflows: `e^{x} / (1 + e^{x})`
    /// for negative `x`.
    Sigmoid,
    /// `x · sigmoid(x)` (`nn.SiLU`, a.k.a. swish).
    Silu,
    /// `½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (`nn.GELU(approximate="tanh")`).
    GeluTanh,
    /// `x` for `x > 0`, else `slope · x` (`nn.LeakyReLU(negative_slope)`).
    LeakyRelu(Coef),
    /// `x` for `x > 0`, else `alpha · (eˣ − 1)` (`nn.ELU(alpha)`).
    Elu(Coef),
    /// `ln(1 + eˣ)`, and `x` itself above 20 (`nn.Softplus()`: beta 1, threshold 20).
    Softplus,
    /// `x · tanh(ln(1 + eˣ))` (`nn.Mish`).
    Mish,
    /// `x · min(max(x + 3, 0), 6) / 6` (`nn.Hardswish`).
    Hardswish,
    /// `min(max(x, 0), 6)` (`nn.ReLU6`).
    Relu6,
    /// `scale · x` for `x > 0`, else `scale · alpha · (eˣ − 1)`, with PyTorch's constants
    /// (`nn.SELU`).
    Selu,
    /// `x` for `x > 0`, else `alpha · (e^{x/alpha} − 1)` (`nn.CELU(alpha)`).
    Celu(Coef),
    /// `min(max(x, −1), 1)` (`nn.Hardtanh()`).
    Hardtanh,
    /// `min(max(x + 3, 0), 6) / 6` (`nn.Hardsigmoid`).
    Hardsigmoid,
    /// `x / (1 + |x|)` (`nn.Softsign`).
    Softsign,
    /// `ln sigmoid(x)`, as `min(x, 0) − ln(1 + e^{−|x|})` (`nn.LogSigmoid`).
    LogSigmoid,
    /// `x − tanh(x)` (`nn.Tanhshrink`).
    Tanhshrink,
}

/// The logistic function without overflow: `e^{−x}` is only taken for `x ≥ 0`, `e^{x}`
/// otherwise, so neither side can exceed 1 (NaN gives NaN).
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl UnaryFn {
    /// The op's name on the tape (`tanh`, `sigmoid`, `silu`, `gelu_tanh`, `leaky_relu`, `elu`,
    /// `softplus`, `mish`, `hardswish`, `relu6`, `selu`, `celu`, `hardtanh`, `hardsigmoid`,
    /// `softsign`, `logsigmoid`, `tanhshrink`).
    pub fn name(self) -> &'static str {
        match self {
            UnaryFn::Tanh => "tanh",
            UnaryFn::Sigmoid => "sigmoid",
            UnaryFn::Silu => "silu",
            UnaryFn::GeluTanh => "gelu_tanh",
            UnaryFn::LeakyRelu(_) => "leaky_relu",
            UnaryFn::Elu(_) => "elu",
            UnaryFn::Softplus => "softplus",
            UnaryFn::Mish => "mish",
            UnaryFn::Hardswish => "hardswish",
            UnaryFn::Relu6 => "relu6",
            UnaryFn::Selu => "selu",
            UnaryFn::Celu(_) => "celu",
            UnaryFn::Hardtanh => "hardtanh",
            UnaryFn::Hardsigmoid => "hardsigmoid",
            UnaryFn::Softsign => "softsign",
            UnaryFn::LogSigmoid => "logsigmoid",
            UnaryFn::Tanhshrink => "tanhshrink",
        }
    }

    /// The function at `x` (NaN gives NaN).
    pub fn value(self, x: f32) -> f32 {
        match self {
            UnaryFn::Tanh => x.tanh(),
            UnaryFn::Sigmoid => sigmoid(x),
            UnaryFn::Silu => x * sigmoid(x),
            UnaryFn::GeluTanh => {
                let inner = GELU_TANH_BETA * (x + GELU_TANH_KAPPA * (x * x * x));
                0.5 * x * (1.0 + inner.tanh())
            }
            UnaryFn::LeakyRelu(slope) => {
                if x > 0.0 {
                    x
                } else {
                    x * slope.get()
                }
            }
            UnaryFn::Elu(alpha) => {
                if x > 0.0 {
                    x
                } else {
                    (x.exp() - 1.0) * alpha.get()
                }
            }
            UnaryFn::Softplus => {
                if x > SOFTPLUS_THRESHOLD {
                    x
                } else {
                    x.exp().ln_1p()
                }
            }
            UnaryFn::Mish => x * x.exp().ln_1p().tanh(),
            UnaryFn::Hardswish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
            UnaryFn::Relu6 => {
                if x.is_nan() {
                    x
                } else {
                    x.clamp(0.0, 6.0)
                }
            }
            UnaryFn::Selu => {
                if x > 0.0 {
                    SELU_SCALE * x
                } else {
                    (SELU_ALPHA * SELU_SCALE) * (x.exp() - 1.0)
                }
            }
            UnaryFn::Celu(alpha) => {
                if x > 0.0 {
                    x
                } else {
                    alpha.get() * ((x * (1.0 / alpha.get())).exp() - 1.0)
                }
            }
            UnaryFn::Hardtanh => {
                if x.is_nan() {
                    x
                } else {
                    x.clamp(-1.0, 1.0)
                }
            }
            UnaryFn::Hardsigmoid => {
                if x.is_nan() {
                    x
                } else {
                    (x + 3.0).clamp(0.0, 6.0) / 6.0
                }
            }
            UnaryFn::Softsign => x / (1.0 + x.abs()),
            UnaryFn::LogSigmoid => x.min(0.0) - (-x.abs()).exp().ln_1p(),
            UnaryFn::Tanhshrink => x - x.tanh(),
        }
    }

    /// The derivative at `x`, exact for the formula of [`UnaryFn::value`] (NaN gives NaN); at a
    /// kink, the value PyTorch's backward gives (LeakyReLU, ELU, SELU and CELU: the negative
    /// side at 0; Hardswish: 0 at −3 and 1 at 3; ReLU6: 0 at 0 and 6; Hardtanh and Hardsigmoid:
    /// 0 at their ends).
    pub fn derivative(self, x: f32) -> f32 {
        if x.is_nan() {
            return x;
        }
        match self {
            UnaryFn::Tanh => {
                let t = x.tanh();
                1.0 - t * t
            }
            UnaryFn::Sigmoid => {
                let s = sigmoid(x);
                s * (1.0 - s)
            }
            // d/dx x·s(x) = s + x·s·(1 − s) = s·(1 + x·(1 − s)).
            UnaryFn::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
            // ½ (1 + t) + ½ x (1 − t²) √(2/π) (1 + 3·0.044715 x²), t = tanh(inner).
            UnaryFn::GeluTanh => {
                let x_sq = x * x;
                let inner = GELU_TANH_BETA * (x + GELU_TANH_KAPPA * (x_sq * x));
                let t = inner.tanh();
                let tanh_derivative = 1.0 - t * t;
                // Where tanh is saturated the second term is 0, even when x² overflows.
                let right = if tanh_derivative == 0.0 {
                    0.0
                } else {
                    0.5 * x
                        * tanh_derivative
                        * (GELU_TANH_BETA * (1.0 + 3.0 * GELU_TANH_KAPPA * x_sq))
                };
                0.5 * (1.0 + t) + right
            }
            UnaryFn::LeakyRelu(slope) => {
                if x > 0.0 {
                    1.0
                } else {
                    slope.get()
                }
            }
            UnaryFn::Elu(alpha) => {
                if x > 0.0 {
                    1.0
                } else {
                    alpha.get() * x.exp()
                }
            }
            // eˣ / (1 + eˣ), the logistic function.
            UnaryFn::Softplus => {
                if x > SOFTPLUS_THRESHOLD {
                    1.0
                } else {
                    sigmoid(x)
                }
            }
            // tanh(sp) + x · sigmoid(x) · (1 − tanh²(sp)), sp = ln(1 + eˣ).
            UnaryFn::Mish => {
                let t = x.exp().ln_1p().tanh();
                let sech_sq = 1.0 - t * t;
                if sech_sq == 0.0 {
                    t
                } else {
                    t + x * sigmoid(x) * sech_sq
                }
            }
            UnaryFn::Hardswish => {
                if x <= -3.0 {
                    0.0
                } else if x < 3.0 {
                    x / 3.0 + 0.5
                } else {
                    1.0
                }
            }
            UnaryFn::Relu6 => {
                if x <= 0.0 || x >= 6.0 {
                    0.0
                } else {
                    1.0
                }
            }
            UnaryFn::Selu => {
                if x > 0.0 {
                    SELU_SCALE
                } else {
                    (SELU_ALPHA * SELU_SCALE) * x.exp()
                }
            }
            UnaryFn::Celu(alpha) => {
                if x > 0.0 {
                    1.0
                } else {
                    (x * (1.0 / alpha.get())).exp()
                }
            }
            UnaryFn::Hardtanh => {
                if x > -1.0 && x < 1.0 {
                    1.0
                } else {
                    0.0
                }
            }
            UnaryFn::Hardsigmoid => {
                if x > -3.0 && x < 3.0 {
                    1.0 / 6.0
                } else {
                    0.0
                }
            }
            UnaryFn::Softsign => {
                let d = 1.0 + x.abs();
                1.0 / (d * d)
            }
            // 1 − sigmoid(x) = sigmoid(−x).
            UnaryFn::LogSigmoid => sigmoid(-x),
            UnaryFn::Tanhshrink => {
                let t = x.tanh();
                t * t
            }
        }
    }
}

/// Backward of [`Tape::unary`]: `dX = dY · f'(x)`. Saves the input.
struct UnaryOp {
    f: UnaryFn,
    x: Arc<Tensor>,
}

impl Op for UnaryOp {
    fn name(&self) -> &'static str {
        self.f.name()
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        if d_y.numel() != self.x.numel() {
            return Err(AutogradError::BadGradient {
                op: self.f.name(),
                what: format!(
                    "an output gradient of {} elements for {} outputs",
                    d_y.numel(),
                    self.x.numel()
                ),
            });
        }
        let f = self.f;
        let mut d_x = d_y;
        d_x.data_mut()
            .iter_mut()
            .zip(self.x.data())
            .for_each(|(g, &x)| *g *= f.derivative(x));
        Ok(vec![Some(d_x)])
    }
}

impl Tape {
    /// `f(x)`, elementwise (tanh, sigmoid, SiLU or tanh-GELU: see [`UnaryFn`]).
    ///
    /// ```
    /// use nibble_autograd::{Tape, UnaryFn};
    /// use nibble_tensor::Tensor;
    /// let tape = Tape::new();
    /// let x = tape.leaf(Tensor::from_vec(&[2], vec![0.0, 1.0])?);
    /// let y = tape.unary(UnaryFn::Sigmoid, &x)?;
    /// assert_eq!(y.value().data()[0], 0.5);
    /// let loss = tape.sum(&y)?;
    /// let grads = tape.backward(&loss)?;
    /// assert_eq!(grads.get(&x).unwrap().data()[0], 0.25);
    /// # Ok::<(), nibble_autograd::AutogradError>(())
    /// ```
    pub fn unary(&self, f: UnaryFn, x: &Var) -> Result<Var> {
        let y = Tensor::from_vec(
            x.shape(),
            x.value().data().iter().map(|&v| f.value(v)).collect(),
        )?;
        self.record(f.name(), &[x], y, false, || {
            Box::new(UnaryOp { f, x: x.shared() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [UnaryFn; 4] = [
        UnaryFn::Tanh,
        UnaryFn::Sigmoid,
        UnaryFn::Silu,
        UnaryFn::GeluTanh,
    ];

    /// Agreement to about 2 ulp: 2e-7 relative, or absolute for values below 1.
    fn close(got: f32, want: f32) -> bool {
        (got - want).abs() <= 2e-7 * want.abs().max(1.0)
    }

    /// The same formulas in f64, for the finite differences.
    fn value_f64(f: UnaryFn, x: f64) -> f64 {
        let sigmoid = 1.0 / (1.0 + (-x).exp());
        match f {
            UnaryFn::Tanh => x.tanh(),
            UnaryFn::Sigmoid => sigmoid,
            UnaryFn::Silu => x * sigmoid,
            UnaryFn::GeluTanh => {
                let beta = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (beta * (x + 0.044715 * x * x * x)).tanh())
            }
            UnaryFn::Softplus => x.exp().ln_1p(),
            UnaryFn::Mish => x * x.exp().ln_1p().tanh(),
            _ => unreachable!("only the smooth functions have an f64 twin here"),
        }
    }

    /// PyTorch 2.x, f32 on the CPU: `torch.tanh`, `torch.sigmoid`, `F.silu`,
    /// `F.gelu(x, approximate='tanh')` of `torch.tensor([x])`.
    #[test]
    fn values_match_pytorch() {
        let cases: [(UnaryFn, &[(f32, f32)]); 4] = [
            (
                UnaryFn::Tanh,
                &[
                    (-5.0, -0.999_909_2),
                    (-3.0, -0.995_054_8),
                    (-1.5, -0.905_148_27),
                    (-1.0, -0.761_594_2),
                    (-0.1, -0.099_667_996),
                    (0.0, 0.0),
                    (1e-3, 0.000_999_999_7),
                    (0.5, 0.462_117_17),
                    (1.0, 0.761_594_2),
                    (3.0, 0.995_054_8),
                ],
            ),
            (
                UnaryFn::Sigmoid,
                &[
                    (-30.0, 9.357_623_6e-14),
                    (-5.0, 0.006_692_851),
                    (-3.0, 0.047_425_874),
                    (-1.0, 0.268_941_43),
                    (-0.1, 0.475_020_8),
                    (0.0, 0.5),
                    (1e-3, 0.500_25),
                    (0.5, 0.622_459_35),
                    (1.5, 0.817_574_44),
                    (5.0, 0.993_307_2),
                ],
            ),
            (
                UnaryFn::Silu,
                &[
                    (-30.0, -2.807_287e-12),
                    (-5.0, -0.033_464_253),
                    (-3.0, -0.142_277_61),
                    (-1.0, -0.268_941_43),
                    (-0.1, -0.047_502_08),
                    (0.0, 0.0),
                    (1e-3, 0.000_500_25),
                    (0.5, 0.311_229_68),
                    (1.5, 1.226_361_6),
                    (5.0, 4.966_535_6),
                ],
            ),
            (
                UnaryFn::GeluTanh,
                &[
                    (-5.0, -2.980_232_2e-7),
                    (-3.0, -0.003_637_433),
                    (-1.5, -0.100_428_43),
                    (-1.0, -0.158_808),
                    (-0.5, -0.154_286),
                    (-0.1, -0.046_017_25),
                    (0.0, 0.0),
                    (1e-3, 0.000_500_399),
                    (0.1, 0.053_982_753),
                    (0.5, 0.345_714),
                    (1.0, 0.841_192),
                    (1.5, 1.399_571_5),
                    (3.0, 2.996_362_7),
                    (5.0, 4.999_999_5),
                ],
            ),
        ];
        for (f, points) in cases {
            for &(x, want) in points {
                let got = f.value(x);
                // Relative for the tiny sigmoid and SiLU tails (their absolute error is far
                // below 2e-7 anyway).
                let tail = want != 0.0 && want.abs() < 1e-6 && f != UnaryFn::GeluTanh;
                let ok = if tail {
                    ((got - want) / want).abs() < 1e-6
                } else {
                    close(got, want)
                };
                assert!(ok, "{}({x}) = {got}, PyTorch {want}", f.name());
            }
        }
    }

    /// Large |x| saturates without NaN or infinity; NaN stays NaN.
    #[test]
    fn large_inputs_saturate_and_nan_propagates() {
        for x in [30.0f32, 100.0, 1e6, f32::MAX] {
            assert_eq!(UnaryFn::Tanh.value(x), 1.0);
            assert_eq!(UnaryFn::Tanh.value(-x), -1.0);
            assert_eq!(UnaryFn::Sigmoid.value(x), 1.0);
            let s = UnaryFn::Sigmoid.value(-x);
            assert!((0.0..1e-13).contains(&s), "sigmoid({}) = {s}", -x);
            assert_eq!(UnaryFn::Silu.value(x), x);
            let s = UnaryFn::Silu.value(-x);
            assert!(s <= 0.0 && s > -3e-12, "silu({}) = {s}", -x);
            assert_eq!(UnaryFn::GeluTanh.value(x), x);
            assert_eq!(UnaryFn::GeluTanh.value(-x), 0.0);
            for f in ALL {
                for v in [x, -x] {
                    let d = f.derivative(v);
                    assert!(d.is_finite(), "{}'({v}) = {d}", f.name());
                }
            }
        }
        // The derivatives' limits.
        for x in [30.0f32, 100.0] {
            assert_eq!(UnaryFn::Tanh.derivative(x), 0.0);
            assert_eq!(UnaryFn::Sigmoid.derivative(-x), UnaryFn::Sigmoid.value(-x));
            assert_eq!(UnaryFn::Silu.derivative(x), 1.0);
            assert_eq!(UnaryFn::GeluTanh.derivative(x), 1.0);
            assert_eq!(UnaryFn::GeluTanh.derivative(-x), 0.0);
        }
        for f in ALL {
            assert!(f.value(f32::NAN).is_nan(), "{}", f.name());
            assert!(f.derivative(f32::NAN).is_nan(), "{}", f.name());
        }
    }

    /// The derivative against a central difference of the f64 formula.
    #[test]
    fn derivative_matches_a_central_difference() {
        let h = 1e-5f64;
        for f in ALL.into_iter().chain([UnaryFn::Softplus, UnaryFn::Mish]) {
            for x in [
                -6.0f32, -4.0, -2.5, -1.3, -0.7, -0.2, 0.0, 0.3, 0.7, 1.1, 2.0, 3.5, 6.0,
            ] {
                let xf = x as f64;
                let num = (value_f64(f, xf + h) - value_f64(f, xf - h)) / (2.0 * h);
                let got = f.derivative(x) as f64;
                assert!(
                    (got - num).abs() <= 3e-7 * num.abs().max(1.0),
                    "{}'({x}) = {got}, difference {num}",
                    f.name()
                );
            }
        }
    }

    /// The tape's backward against `torch.autograd` (`f(x).sum().backward()`, f32, CPU).
    #[test]
    fn backward_matches_pytorch_autograd() {
        let xs = [-4.0f32, -2.5, -1.3, -0.2, 0.0, 0.7, 2.0, 3.5];
        let cases: [(UnaryFn, [f32; 8]); 4] = [
            (
                UnaryFn::Tanh,
                [
                    0.001_340_893_1,
                    0.026_592_249,
                    0.257_433_27,
                    0.961_043,
                    1.0,
                    0.634_739_6,
                    0.070_650_816,
                    0.003_640_907_8,
                ],
            ),
            (
                UnaryFn::Sigmoid,
                [
                    0.017_662_706,
                    0.070_103_71,
                    0.168_298_36,
                    0.247_516_59,
                    0.25,
                    0.221_712_89,
                    0.104_993_63,
                    0.028_453_045,
                ],
            ),
            (
                UnaryFn::Silu,
                [
                    -0.052_664_61,
                    -0.099_401_11,
                    -0.004_622_842_7,
                    0.400_662_7,
                    0.5,
                    0.823_386_7,
                    1.090_784_3,
                    1.070_273_5,
                ],
            ),
            (
                UnaryFn::GeluTanh,
                [
                    -0.000_334_972_08,
                    -0.037_951_652,
                    -0.125_878_08,
                    0.342_541_8,
                    0.5,
                    0.976_357_2,
                    1.086_099_3,
                    1.002_422_5,
                ],
            ),
        ];
        for (f, want) in cases {
            let tape = Tape::new();
            let x = tape.leaf(Tensor::from_vec(&[2, 4], xs.to_vec()).unwrap());
            let y = tape.unary(f, &x).unwrap();
            assert_eq!(y.shape(), [2, 4]);
            for (&v, &xv) in y.value().data().iter().zip(&xs) {
                assert_eq!(v, f.value(xv));
            }
            let loss = tape.sum(&y).unwrap();
            let grads = tape.backward(&loss).unwrap();
            let got = grads.get(&x).unwrap().data();
            for ((&g, &w), &xv) in got.iter().zip(&want).zip(&xs) {
                assert!(close(g, w), "{}'({xv}) = {g}, PyTorch {w}", f.name());
            }
        }
    }

    /// LeakyReLU, ELU (two coefficients each), Softplus, Mish, Hardswish and ReLU6 against
    /// PyTorch 2.15 (f32, CPU): `F.<fn>(x)` and `x.grad` of `F.<fn>(x).sum().backward()`, kinks
    /// and thresholds included (0, ±3, 6, 20).
    #[test]
    fn piecewise_and_softplus_family_match_pytorch() {
        let xs = [
            -25.0f32, -4.0, -3.0, -2.5, -1.3, -0.2, 0.0, 0.7, 2.0, 3.0, 3.5, 6.0, 7.0, 21.0,
        ];
        type Case = (UnaryFn, [f32; 14], [f32; 14]);
        #[rustfmt::skip]
        let cases: [Case; 8] = [
            (
                UnaryFn::LeakyRelu(Coef::new(0.01)),
                [
                    -0.25, -0.04, -0.03, -0.024999999, -0.012999999, -0.002, 0.0, 0.7, 2.0, 3.0,
                    3.5, 6.0, 7.0, 21.0,
                ],
                [
                    0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                ],
            ),
            (
                UnaryFn::LeakyRelu(Coef::new(0.2)),
                [
                    -5.0, -0.8, -0.6, -0.5, -0.26, -0.040000003, 0.0, 0.7, 2.0, 3.0, 3.5, 6.0, 7.0,
                    21.0,
                ],
                [
                    0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                ],
            ),
            (
                UnaryFn::Elu(Coef::new(1.0)),
                [
                    -1.0, -0.9816844, -0.95021296, -0.917915, -0.7274682, -0.18126924, 0.0, 0.7,
                    2.0, 3.0, 3.5, 6.0, 7.0, 21.0,
                ],
                [
                    1.3887944e-11, 0.01831564, 0.049787067, 0.082085, 0.2725318, 0.8187308, 1.0,
                    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                ],
            ),
            (
                UnaryFn::Elu(Coef::new(0.5)),
                [
                    -0.5, -0.4908422, -0.47510648, -0.4589575, -0.3637341, -0.09063462, 0.0, 0.7,
                    2.0, 3.0, 3.5, 6.0, 7.0, 21.0,
                ],
                [
                    6.943972e-12, 0.00915782, 0.024893533, 0.0410425, 0.1362659, 0.4093654, 0.5,
                    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                ],
            ),
            (
                UnaryFn::Softplus,
                [
                    1.3887944e-11, 0.01814993, 0.048587352, 0.078889735, 0.24100846, 0.59813887,
                    std::f32::consts::LN_2, 1.103186, 2.126928, 3.0485873, 3.5297503, 6.0024757,
                    7.0009117, 21.0,
                ],
                [
                    1.3887944e-11, 0.01798621, 0.047425874, 0.075858176, 0.21416503, 0.450166, 0.5,
                    0.6681878, 0.8807971, 0.95257413, 0.97068775, 0.99752736, 0.99908894, 1.0,
                ],
            ),
            (
                UnaryFn::Mish,
                [
                    -3.471986e-10, -0.07259175, -0.14564747, -0.19681619, -0.30738246, -0.10714479,
                    0.0, 0.56114835, 1.943959, 2.986535, 3.493991, 5.9999266, 6.9999886, 21.0,
                ],
                [
                    -3.3331063e-10, -0.053773206, -0.093393125, -0.109743565, -0.026400948,
                    0.47153026, 0.6, 0.9687949, 1.0693179, 1.021107, 1.0099392, 1.000134,
                    1.0000217, 1.0,
                ],
            ),
            (
                UnaryFn::Hardswish,
                [
                    -0.0, -0.0, -0.0, -0.20833333, -0.36833334, -0.093333334, 0.0, 0.43166664,
                    1.6666666, 3.0, 3.5, 6.0, 7.0, 21.0,
                ],
                [
                    0.0, 0.0, 0.0, -0.3333333, 0.06666669, 0.43333334, 0.5, 0.73333335, 1.1666667,
                    1.0, 1.0, 1.0, 1.0, 1.0,
                ],
            ),
            (
                UnaryFn::Relu6,
                [
                    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7, 2.0, 3.0, 3.5, 6.0, 6.0, 6.0,
                ],
                [
                    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0,
                ],
            ),
        ];
        for (f, values, grads) in cases {
            let tape = Tape::new();
            let x = tape.leaf(Tensor::from_vec(&[2, 7], xs.to_vec()).unwrap());
            let y = tape.unary(f, &x).unwrap();
            let loss = tape.sum(&y).unwrap();
            let got = tape
                .backward(&loss)
                .unwrap()
                .get(&x)
                .unwrap()
                .data()
                .to_vec();
            for (i, &xv) in xs.iter().enumerate() {
                let v = y.value().data()[i];
                assert!(
                    close(v, values[i]),
                    "{f:?}({xv}) = {v}, PyTorch {}",
                    values[i]
                );
                assert!(
                    close(got[i], grads[i]),
                    "{f:?}'({xv}) = {}, PyTorch {}",
                    got[i],
                    grads[i]
                );
            }
            assert!(
                f.value(f32::NAN).is_nan() && f.derivative(f32::NAN).is_nan(),
                "{f:?}"
            );
            for big in [1e6f32, -1e6, f32::MAX, -f32::MAX] {
                assert!(
                    !f.value(big).is_nan() && f.derivative(big).is_finite(),
                    "{f:?}({big})"
                );
            }
        }
    }

    /// Nothing tracked, nothing recorded; a tracked input records one op under the function's
    /// name.
    /// PyTorch 2.15 (f32, CPU): `F.selu`, `F.celu(x, alpha)`, `F.hardtanh`, `F.hardsigmoid`,
    /// `F.softsign`, `F.logsigmoid`, `F.tanhshrink` and `x.grad` of `f(x).sum().backward()`,
    /// within a few ulp (kinks and ends included: 0, ±1, ±3).
    #[test]
    fn selu_celu_hard_and_soft_families_match_pytorch() {
        let xs = [
            -25.0f32, -4.0, -3.0, -2.5, -1.3, -0.2, 0.0, 0.7, 2.0, 3.0, 3.5, 6.0, 7.0, 21.0,
        ];
        type Case = (UnaryFn, [f64; 14], [f64; 14]);
        #[rustfmt::skip]
        let cases: [Case; 8] = [
            (
                UnaryFn::Selu,
                [
                    -1.7580993175506592, -1.7258986234664917, -1.6705687046051025,
                    -1.613785743713379, -1.2789613008499146, -0.31868934631347656, 0.0,
                    0.7354906797409058, 2.1014020442962646, 3.1521029472351074, 3.6774535179138184,
                    6.304205894470215, 7.354907035827637, 22.064722061157227,
                ],
                [
                    2.441638384531597e-11, 0.03220071271061897, 0.08753060549497604,
                    0.14431357383728027, 0.47913798689842224, 1.4394099712371826,
                    1.7580993175506592, 1.0507010221481323, 1.0507010221481323, 1.0507010221481323,
                    1.0507010221481323, 1.0507010221481323, 1.0507010221481323, 1.0507010221481323,
                ],
            ),
            (
                UnaryFn::Celu(Coef::new(1.0)),
                [
                    -1.0, -0.9816843867301941, -0.9502129554748535, -0.9179149866104126,
                    -0.7274681925773621, -0.18126924335956573, 0.0, 0.699999988079071, 2.0, 3.0,
                    3.5, 6.0, 7.0, 21.0,
                ],
                [
                    1.3887943746404563e-11, 0.018315639346837997, 0.049787066876888275,
                    0.08208499848842621, 0.27253180742263794, 0.8187307715415955, 1.0, 1.0, 1.0,
                    1.0, 1.0, 1.0, 1.0, 1.0,
                ],
            ),
            (
                UnaryFn::Celu(Coef::new(0.5)),
                [
                    -0.5, -0.49983227252960205, -0.4987606108188629, -0.49663102626800537,
                    -0.4628632068634033, -0.1648399829864502, 0.0, 0.699999988079071, 2.0, 3.0,
                    3.5, 6.0, 7.0, 21.0,
                ],
                [
                    1.9287498933537385e-22, 0.000335462624207139, 0.0024787522852420807,
                    0.0067379469983279705, 0.07427358627319336, 0.6703200340270996, 1.0, 1.0, 1.0,
                    1.0, 1.0, 1.0, 1.0, 1.0,
                ],
            ),
            (
                UnaryFn::Hardtanh,
                [
                    -1.0, -1.0, -1.0, -1.0, -1.0, -0.20000000298023224, 0.0, 0.699999988079071,
                    1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                ],
                [
                    0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                ],
            ),
            (
                UnaryFn::Hardsigmoid,
                [
                    0.0, 0.0, 0.0, 0.0833333358168602, 0.28333333134651184, 0.46666666865348816,
                    0.5, 0.6166666746139526, 0.8333333134651184, 1.0, 1.0, 1.0, 1.0, 1.0,
                ],
                [
                    0.0, 0.0, 0.0, 0.1666666716337204, 0.1666666716337204, 0.1666666716337204,
                    0.1666666716337204, 0.1666666716337204, 0.1666666716337204, 0.0, 0.0, 0.0, 0.0,
                    0.0,
                ],
            ),
            (
                UnaryFn::Softsign,
                [
                    -0.9615384340286255, -0.800000011920929, -0.75, -0.7142857313156128,
                    -0.5652173757553101, -0.1666666567325592, 0.0, 0.4117646813392639,
                    0.6666666865348816, 0.75, 0.7777777910232544, 0.8571428656578064, 0.875,
                    0.9545454382896423,
                ],
                [
                    0.0014792941510677338, 0.040000006556510925, 0.0625, 0.08163265883922577,
                    0.18903593719005585, 0.6944444179534912, 1.0, 0.34602075815200806,
                    0.111111119389534, 0.0625, 0.04938271641731262, 0.02040816843509674, 0.015625,
                    0.0020661167800426483,
                ],
            ),
            (
                UnaryFn::LogSigmoid,
                [
                    -25.0, -4.0181498527526855, -3.0485873222351074, -2.578889846801758,
                    -1.541008472442627, -0.7981388568878174, -0.6931471824645996,
                    -0.40318605303764343, -0.12692801654338837, -0.04858735203742981,
                    -0.029750417917966843, -0.0024756852071732283, -0.000911466486286372,
                    -7.582560135332983e-10,
                ],
                [
                    1.0, 0.9820137619972229, 0.9525741338729858, 0.9241418242454529,
                    0.7858349680900574, 0.5498340129852295, 0.5, 0.33181220293045044,
                    0.11920291930437088, 0.04742587357759476, 0.02931223064661026,
                    0.0024726232513785362, 0.0009110512328334153, 7.582560135332983e-10,
                ],
            ),
            (
                UnaryFn::Tanhshrink,
                [
                    -24.0, -3.0006706714630127, -2.0049452781677246, -1.5133857727050781,
                    -0.43827682733535767, -0.0026246756315231323, 0.0, 0.09563219547271729,
                    1.0359723567962646, 2.0049452781677246, 2.501821994781494, 5.000012397766113,
                    6.000001907348633, 20.0,
                ],
                [
                    1.0, 0.9986591339111328, 0.9901340007781982, 0.9734077453613281,
                    0.742566704750061, 0.03895699977874756, 0.0, 0.36526042222976685,
                    0.9293491840362549, 0.9901340007781982, 0.99635910987854, 0.9999754428863525,
                    0.9999966621398926, 1.0,
                ],
            ),
        ];
        // A few ulp of the value, or of 1 for values below it, but relative in the tiny tails
        // (CELU's 1.9e-22, LogSigmoid's 7.6e-10).
        let near = |got: f32, want: f64| {
            let got = got as f64;
            let tiny = want != 0.0 && want.abs() < 1e-6;
            if tiny {
                ((got - want) / want).abs() < 1e-5
            } else {
                (got - want).abs() <= 4e-7 * want.abs().max(1.0)
            }
        };
        for (f, values, grads) in cases {
            for ((&x, &v), &g) in xs.iter().zip(&values).zip(&grads) {
                assert!(
                    near(f.value(x), v),
                    "{}({x}) = {}, PyTorch {v}",
                    f.name(),
                    f.value(x)
                );
                let d = f.derivative(x);
                assert!(near(d, g), "{}'({x}) = {d}, PyTorch {g}", f.name());
            }
            assert!(f.value(f32::NAN).is_nan() && f.derivative(f32::NAN).is_nan());
        }
        // Hardtanh's and Hardsigmoid's ends: PyTorch's gradient is 0 there.
        for x in [-1.0f32, 1.0] {
            assert_eq!(UnaryFn::Hardtanh.derivative(x), 0.0);
        }
        for x in [-3.0f32, 3.0] {
            assert_eq!(UnaryFn::Hardsigmoid.derivative(x), 0.0);
        }
    }

    #[test]
    fn records_only_tracked_inputs() {
        let tape = Tape::new();
        let c = Var::constant(Tensor::from_vec(&[3], vec![-1.0, 0.0, 1.0]).unwrap());
        let y = tape.unary(UnaryFn::Tanh, &c).unwrap();
        assert!(tape.is_empty());
        assert_eq!(y.value().data()[1], 0.0);
        let x = tape.leaf(Tensor::from_vec(&[3], vec![-1.0, 0.0, 1.0]).unwrap());
        tape.unary(UnaryFn::GeluTanh, &x).unwrap();
        assert_eq!(tape.len(), 2);
    }
}
