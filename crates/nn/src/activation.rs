//! Parameter-free activations.

use crate::error::Result;
use nibble_autograd::{Tape, UnaryFn, Var};
use std::fmt;
use std::str::FromStr;

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
    /// `y = x`: `nn.Identity`, `nn.Dropout` in eval mode, `nn.Flatten` of a 2-D input.
    Identity,
}

impl Activation {
    /// Every activation, in the order of [`Activation::NAMES`].
    pub const ALL: [Activation; 7] = [
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Silu,
        Activation::Identity,
    ];

    /// The names [`Activation::from_str`](FromStr) accepts, one per activation.
    pub const NAMES: [&'static str; 7] = [
        "relu",
        "gelu",
        "gelu_tanh",
        "tanh",
        "sigmoid",
        "silu",
        "identity",
    ];

    /// The accepted names as one list for messages: `relu, gelu, …, silu or identity`.
    ///
    /// ```
    /// use nibble_nn::Activation;
    /// assert!(Activation::names_list().ends_with("silu or identity"));
    /// ```
    pub fn names_list() -> String {
        let (last, rest) = Self::NAMES.split_last().expect("names");
        format!("{} or {last}", rest.join(", "))
    }

    /// Applies the activation on `tape` (the identity returns `x` itself).
    pub fn forward(self, tape: &Tape, x: &Var) -> Result<Var> {
        Ok(match self {
            Activation::Relu => tape.relu(x)?,
            Activation::Gelu => tape.gelu(x)?,
            Activation::GeluTanh => tape.unary(UnaryFn::GeluTanh, x)?,
            Activation::Tanh => tape.unary(UnaryFn::Tanh, x)?,
            Activation::Sigmoid => tape.unary(UnaryFn::Sigmoid, x)?,
            Activation::Silu => tape.unary(UnaryFn::Silu, x)?,
            Activation::Identity => x.clone(),
        })
    }

    /// The name (`relu`, `gelu`, `gelu_tanh`, `tanh`, `sigmoid`, `silu`, `identity`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Silu => "silu",
            Activation::Identity => "identity",
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Activation {
    type Err = String;
    /// One of [`Activation::NAMES`], in any case, with surrounding spaces ignored.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let wanted = s.trim();
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                format!(
                    "unknown activation `{wanted}` (expected {})",
                    Self::names_list()
                )
            })
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
        assert_eq!(
            Activation::names_list(),
            "relu, gelu, gelu_tanh, tanh, sigmoid, silu or identity"
        );
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
