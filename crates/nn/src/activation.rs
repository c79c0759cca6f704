//! Parameter-free activations.

use crate::error::Result;
use nibble_autograd::{Coef, Tape, UnaryFn, Var};
use std::fmt;
use std::str::FromStr;

/// LeakyReLU's default negative slope (PyTorch's `nn.LeakyReLU()`).
pub const LEAKY_RELU_SLOPE: f32 = 0.01;
/// ELU's default alpha (PyTorch's `nn.ELU()`).
pub const ELU_ALPHA: f32 = 1.0;

/// An elementwise activation: what a PyTorch `nn.Sequential` holds at an index without
/// parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(x, 0)` (`nn.ReLU`).
    Relu,
    /// `x · Φ(x)`, the exact erf form (`nn.GELU()`, PyTorch's default).
    Gelu,
    /// `½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (`nn.GELU(approximate="tanh")`).
    GeluTanh,
    /// `tanh(x)` (`nn.Tanh`).
    Tanh,
    /// `1 / (1 + e^{−x})` (`nn.Sigmoid`).
    Sigmoid,
    /// `x · sigmoid(x)` (`nn.SiLU`).
    Silu,
    /// `x` for `x > 0`, else `slope · x` (`nn.LeakyReLU(negative_slope)`; written
    /// `leaky_relu` for the default 0.01, `leaky_relu:0.2` for another slope).
    LeakyRelu(Coef),
    /// `x` for `x > 0`, else `alpha · (eˣ − 1)` (`nn.ELU(alpha)`; `elu`, `elu:0.5`).
    Elu(Coef),
    /// `ln(1 + eˣ)` (`nn.Softplus()`, beta 1, threshold 20).
    Softplus,
    /// `x · tanh(softplus(x))` (`nn.Mish`).
    Mish,
    /// `x · relu6(x + 3) / 6` (`nn.Hardswish`).
    Hardswish,
    /// `min(max(x, 0), 6)` (`nn.ReLU6`).
    Relu6,
    /// `y = x`: `nn.Identity`, `nn.Dropout` in eval mode, `nn.Flatten` of a 2-D input.
    Identity,
}

impl Activation {
    /// Every activation (LeakyReLU and ELU with PyTorch's default coefficients), in the order
    /// of [`Activation::NAMES`].
    pub const ALL: [Activation; 13] = [
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Silu,
        Activation::LeakyRelu(Coef::new(LEAKY_RELU_SLOPE)),
        Activation::Elu(Coef::new(ELU_ALPHA)),
        Activation::Softplus,
        Activation::Mish,
        Activation::Hardswish,
        Activation::Relu6,
        Activation::Identity,
    ];

    /// The names [`Activation::from_str`](FromStr) accepts, one per activation
    /// (`leaky_relu` and `elu` also take a coefficient: `leaky_relu:0.2`, `elu:0.5`).
    pub const NAMES: [&'static str; 13] = [
        "relu",
        "gelu",
        "gelu_tanh",
        "tanh",
        "sigmoid",
        "silu",
        "leaky_relu",
        "elu",
        "softplus",
        "mish",
        "hardswish",
        "relu6",
        "identity",
    ];

    /// The accepted names as one list for messages: `relu, gelu, …, relu6 or identity`, then
    /// how to give a coefficient.
    ///
    /// ```
    /// use nibble_nn::Activation;
    /// assert!(Activation::names_list().contains("relu6 or identity; leaky_relu:<slope>"));
    /// ```
    pub fn names_list() -> String {
        let (last, rest) = Self::NAMES.split_last().expect("names");
        format!(
            "{} or {last}; leaky_relu:<slope> and elu:<alpha> set the coefficient",
            rest.join(", ")
        )
    }

    /// Applies the activation on `tape` (the identity returns `x` itself).
    pub fn forward(self, tape: &Tape, x: &Var) -> Result<Var> {
        Ok(match (self, self.unary_fn()) {
            (_, Some(f)) => tape.unary(f, x)?,
            (Activation::Relu, None) => tape.relu(x)?,
            (Activation::Gelu, None) => tape.gelu(x)?,
            (_, None) => x.clone(),
        })
    }

    /// The [`UnaryFn`] that computes this activation, where one does (not ReLU and GELU, which
    /// have ops of their own, nor the identity).
    pub fn unary_fn(self) -> Option<UnaryFn> {
        Some(match self {
            Activation::GeluTanh => UnaryFn::GeluTanh,
            Activation::Tanh => UnaryFn::Tanh,
            Activation::Sigmoid => UnaryFn::Sigmoid,
            Activation::Silu => UnaryFn::Silu,
            Activation::LeakyRelu(slope) => UnaryFn::LeakyRelu(slope),
            Activation::Elu(alpha) => UnaryFn::Elu(alpha),
            Activation::Softplus => UnaryFn::Softplus,
            Activation::Mish => UnaryFn::Mish,
            Activation::Hardswish => UnaryFn::Hardswish,
            Activation::Relu6 => UnaryFn::Relu6,
            Activation::Relu | Activation::Gelu | Activation::Identity => return None,
        })
    }

    /// The name without its coefficient (`relu`, `gelu`, ..., `leaky_relu`, `elu`, ...,
    /// `identity`); [`Display`](fmt::Display) adds a coefficient other than PyTorch's default.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Silu => "silu",
            Activation::LeakyRelu(_) => "leaky_relu",
            Activation::Elu(_) => "elu",
            Activation::Softplus => "softplus",
            Activation::Mish => "mish",
            Activation::Hardswish => "hardswish",
            Activation::Relu6 => "relu6",
            Activation::Identity => "identity",
        }
    }

    /// The coefficient and its default, for the activations that take one.
    fn coefficient(self) -> Option<(f32, f32)> {
        match self {
            Activation::LeakyRelu(c) => Some((c.get(), LEAKY_RELU_SLOPE)),
            Activation::Elu(c) => Some((c.get(), ELU_ALPHA)),
            _ => None,
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.coefficient() {
            Some((c, default)) if c != default => write!(f, "{}:{c}", self.name()),
            _ => f.write_str(self.name()),
        }
    }
}

impl FromStr for Activation {
    type Err = String;
    /// One of [`Activation::NAMES`], in any case, with surrounding spaces ignored;
    /// `leaky_relu:<slope>` and `elu:<alpha>` with a finite coefficient.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let wanted = s.trim();
        let (name, coefficient) = match wanted.split_once(':') {
            Some((n, c)) => (n.trim(), Some(c.trim())),
            None => (wanted, None),
        };
        let unknown = || {
            format!(
                "unknown activation `{wanted}` (expected {})",
                Self::names_list()
            )
        };
        let found = Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name))
            .ok_or_else(unknown)?;
        let Some(text) = coefficient else {
            return Ok(found);
        };
        let value = text
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("activation `{wanted}`: `{text}` is not a finite number"))?;
        match found {
            Activation::LeakyRelu(_) => Ok(Activation::LeakyRelu(Coef::new(value))),
            Activation::Elu(_) => Ok(Activation::Elu(Coef::new(value))),
            other => Err(format!(
                "activation `{wanted}`: {} takes no coefficient (only leaky_relu and elu do)",
                other.name()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nibble_tensor::Tensor;

    #[test]
    fn names_round_trip_in_any_case() {
        for (a, name) in Activation::ALL.into_iter().zip(Activation::NAMES) {
            assert_eq!(a.name(), name);
            assert_eq!(a.to_string(), name);
            assert_eq!(name.parse::<Activation>(), Ok(a));
            assert_eq!(name.to_ascii_uppercase().parse::<Activation>(), Ok(a));
        }
        assert_eq!(
            " GeLU_Tanh ".parse::<Activation>(),
            Ok(Activation::GeluTanh)
        );
        let e = "swish".parse::<Activation>().unwrap_err();
        assert!(e.contains("`swish`"), "{e}");
        for name in Activation::NAMES {
            assert!(e.contains(name), "{e}");
        }
        assert!(Activation::names_list()
            .starts_with("relu, gelu, gelu_tanh, tanh, sigmoid, silu, leaky_relu, elu"));
        // Coefficients: parsed, printed back, refused where they make no sense.
        let leaky: Activation = " Leaky_ReLU : 0.2 ".parse().unwrap();
        assert_eq!(leaky, Activation::LeakyRelu(Coef::new(0.2)));
        assert_eq!(leaky.to_string(), "leaky_relu:0.2");
        assert_eq!(leaky.to_string().parse::<Activation>(), Ok(leaky));
        assert_eq!("elu:0.5".parse(), Ok(Activation::Elu(Coef::new(0.5))));
        assert_eq!("elu:1".parse::<Activation>().unwrap().to_string(), "elu");
        for bad in ["relu:0.1", "leaky_relu:x", "elu:nan", "leaky_relu:inf"] {
            let e = bad.parse::<Activation>().unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn forward_applies_each_function() {
        let tape = Tape::new();
        let xs = vec![-2.0f32, -0.5, 0.0, 1.5];
        let x = tape.leaf(Tensor::from_vec(&[1, 4], xs.clone()).unwrap());
        for a in Activation::ALL {
            let y = a.forward(&tape, &x).unwrap();
            assert_eq!(y.shape(), [1, 4]);
            let want: Vec<f32> = match a {
                Activation::Relu => vec![0.0, 0.0, 0.0, 1.5],
                Activation::Gelu => xs
                    .iter()
                    .map(|&v| nibble_autograd::ops::gelu::gelu(v))
                    .collect(),
                Activation::GeluTanh => xs.iter().map(|&v| UnaryFn::GeluTanh.value(v)).collect(),
                Activation::Tanh => xs.iter().map(|v| v.tanh()).collect(),
                Activation::Sigmoid => xs.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
                Activation::Silu => xs.iter().map(|v| v / (1.0 + (-v).exp())).collect(),
                Activation::Identity => xs.clone(),
                // The functions' values against PyTorch: nibble_autograd's unary tests.
                other => xs
                    .iter()
                    .map(|&v| other.unary_fn().unwrap().value(v))
                    .collect(),
            };
            for (g, w) in y.value().data().iter().zip(&want) {
                assert!((g - w).abs() < 1e-7, "{a}: {g} vs {w}");
            }
        }
        // The identity passes the gradient through unchanged.
        let y = Activation::Identity.forward(&tape, &x).unwrap();
        let loss = tape.sum(&y).unwrap();
        let g = tape.backward(&loss).unwrap();
        assert_eq!(g.get(&x).unwrap().data(), [1.0; 4]);
    }
}
