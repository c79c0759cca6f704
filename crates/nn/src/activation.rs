//! Parameter-free activations.

use crate::error::Result;
use nibble_autograd::{Coef, Param, Tape, UnaryFn, Var};
use nibble_tensor::Tensor;
use std::fmt;
use std::str::FromStr;

/// LeakyReLU's default negative slope (PyTorch's `nn.LeakyReLU()`).
pub const LEAKY_RELU_SLOPE: f32 = 0.01;
/// ELU's default alpha (PyTorch's `nn.ELU()`).
pub const ELU_ALPHA: f32 = 1.0;
/// CELU's default alpha (PyTorch's `nn.CELU()`).
pub const CELU_ALPHA: f32 = 1.0;

/// PyTorch's LayerNorm epsilon (`nn.LayerNorm(dim)`), that of [`Activation::LayerNorm`] unless
/// set.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// A parameter-free layer: what a PyTorch `nn.Sequential` holds at an index without
/// parameters. All but the norms ([`Activation::LayerNorm`], [`Activation::RmsNorm`],
/// [`Activation::GroupNorm`]) are elementwise.
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
    /// `nn.SELU` ([`UnaryFn::Selu`]).
    Selu,
    /// `nn.CELU(alpha)` ([`UnaryFn::Celu`]; `celu`, `celu:0.5`).
    Celu(Coef),
    /// `nn.Hardtanh()`, −1 to 1 ([`UnaryFn::Hardtanh`]).
    Hardtanh,
    /// `nn.Hardsigmoid` ([`UnaryFn::Hardsigmoid`]).
    Hardsigmoid,
    /// `nn.Softsign` ([`UnaryFn::Softsign`]).
    Softsign,
    /// `nn.LogSigmoid` ([`UnaryFn::LogSigmoid`]).
    LogSigmoid,
    /// `nn.Tanhshrink` ([`UnaryFn::Tanhshrink`]).
    Tanhshrink,
    /// `y = x`: `nn.Identity`, `nn.Dropout` in eval mode, `nn.Flatten` of a 2-D input.
    Identity,
    /// Each row normalized, `(x − mean) / √(var + eps)` with the biased variance over the row:
    /// `nn.LayerNorm(dim, elementwise_affine=False)`, which has no parameters and so leaves a
    /// gap in a state dict's indices (written `layer_norm`; its epsilon is the model's
    /// LayerNorm epsilon, which [`crate::Sequential::from_state_dict`] sets from
    /// [`crate::SequentialOptions::layer_norm_eps`]; parsed, it is [`LAYER_NORM_EPS`]).
    LayerNorm(Coef),
    /// Each row divided by its root mean square, `x / √(mean(x²) + eps)`:
    /// `nn.RMSNorm(dim, elementwise_affine=False)` (written `rms_norm`; its epsilon is the
    /// model's RMSNorm epsilon, [`crate::SequentialOptions::rms_norm_eps`]; parsed, it is
    /// [`f32::EPSILON`], PyTorch's for f32).
    RmsNorm(Coef),
    /// Each row's channels in `groups` groups of neighbours, each group normalized as
    /// [`Activation::LayerNorm`] normalizes a row: `nn.GroupNorm(groups, dim, affine=False)`,
    /// which has no parameters (written `group_norm:<groups>`; its epsilon is the model's
    /// LayerNorm epsilon, as [`Activation::LayerNorm`]'s).
    GroupNorm {
        /// The number of groups; it must divide the width.
        groups: usize,
        /// Added to each group's variance.
        eps: Coef,
    },
}

impl Activation {
    /// Every activation (LeakyReLU and ELU with PyTorch's default coefficients), in the order
    /// of [`Activation::NAMES`].
    pub const ALL: [Activation; 22] = [
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
        Activation::Selu,
        Activation::Celu(Coef::new(CELU_ALPHA)),
        Activation::Hardtanh,
        Activation::Hardsigmoid,
        Activation::Softsign,
        Activation::LogSigmoid,
        Activation::Tanhshrink,
        Activation::Identity,
        Activation::LayerNorm(Coef::new(LAYER_NORM_EPS)),
        Activation::RmsNorm(Coef::new(f32::EPSILON)),
    ];

    /// The names [`Activation::from_str`](FromStr) accepts, one per activation
    /// (`leaky_relu`, `elu` and `celu` also take a coefficient: `leaky_relu:0.2`, `elu:0.5`).
    pub const NAMES: [&'static str; 22] = [
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
        "selu",
        "celu",
        "hardtanh",
        "hardsigmoid",
        "softsign",
        "logsigmoid",
        "tanhshrink",
        "identity",
        "layer_norm",
        "rms_norm",
    ];

    /// The accepted names as one list for messages: `relu, gelu, …, layer_norm or rms_norm`,
    /// then how to give a coefficient.
    ///
    /// ```
    /// use nibble_nn::Activation;
    /// assert!(Activation::names_list().contains("layer_norm or rms_norm; leaky_relu:<slope>"));
    /// ```
    pub fn names_list() -> String {
        let (last, rest) = Self::NAMES.split_last().expect("names");
        format!(
            "{} or {last}; leaky_relu:<slope>, elu:<alpha> and celu:<alpha> set the coefficient; \
             group_norm:<groups> is nn.GroupNorm(groups, dim, affine=False); PyTorch's class \
             names (dropout, flatten, leakyrelu, layernorm, ...) also do",
            rest.join(", ")
        )
    }

    /// A parameter-free LayerNorm adding `eps` to the variance.
    pub const fn layer_norm(eps: f32) -> Self {
        Activation::LayerNorm(Coef::new(eps))
    }

    /// A parameter-free RMSNorm adding `eps` to the mean square.
    pub const fn rms_norm(eps: f32) -> Self {
        Activation::RmsNorm(Coef::new(eps))
    }

    /// A parameter-free GroupNorm of `groups` groups adding `eps` to each group's variance.
    pub const fn group_norm(groups: usize, eps: f32) -> Self {
        Activation::GroupNorm {
            groups,
            eps: Coef::new(eps),
        }
    }

    /// Applies the activation on `tape` to `x` `[batch, features]` (the identity returns `x`
    /// itself).
    pub fn forward(self, tape: &Tape, x: &Var) -> Result<Var> {
        Ok(match (self, self.unary_fn()) {
            (_, Some(f)) => tape.unary(f, x)?,
            (Activation::Relu, None) => tape.relu(x)?,
            (Activation::Gelu, None) => tape.gelu(x)?,
            (Activation::LayerNorm(eps), None) => {
                // The LayerNorm op with a weight of ones and a bias of zeros, both frozen:
                // `x̂ · 1 + 0` is `x̂` exactly (but for -0.0), and only x's gradient is computed.
                let dim = [x.shape().last().copied().unwrap_or(0)];
                let ones = Param::new("layer_norm.weight", Tensor::full(&dim, 1.0), false);
                let zeros = Param::new("layer_norm.bias", Tensor::zeros(&dim), false);
                tape.layer_norm(x, &ones, &zeros, eps.get())?
            }
            (Activation::RmsNorm(eps), None) => {
                // The RMSNorm op with a frozen weight of ones (`v · 1` is `v`).
                let dim = [x.shape().last().copied().unwrap_or(0)];
                let ones = Param::new("rms_norm.weight", Tensor::full(&dim, 1.0), false);
                tape.rms_norm(x, &ones, eps.get())?
            }
            (Activation::GroupNorm { groups, eps }, None) => {
                // The GroupNorm op with a frozen weight of ones and bias of zeros, as above.
                let dim = [x.shape().last().copied().unwrap_or(0)];
                let ones = Param::new("group_norm.weight", Tensor::full(&dim, 1.0), false);
                let zeros = Param::new("group_norm.bias", Tensor::zeros(&dim), false);
                tape.group_norm(x, groups, &ones, &zeros, eps.get())?
            }
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
            Activation::Selu => UnaryFn::Selu,
            Activation::Celu(alpha) => UnaryFn::Celu(alpha),
            Activation::Hardtanh => UnaryFn::Hardtanh,
            Activation::Hardsigmoid => UnaryFn::Hardsigmoid,
            Activation::Softsign => UnaryFn::Softsign,
            Activation::LogSigmoid => UnaryFn::LogSigmoid,
            Activation::Tanhshrink => UnaryFn::Tanhshrink,
            Activation::Relu
            | Activation::Gelu
            | Activation::Identity
            | Activation::LayerNorm(_)
            | Activation::RmsNorm(_)
            | Activation::GroupNorm { .. } => return None,
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
            Activation::Selu => "selu",
            Activation::Celu(_) => "celu",
            Activation::Hardtanh => "hardtanh",
            Activation::Hardsigmoid => "hardsigmoid",
            Activation::Softsign => "softsign",
            Activation::LogSigmoid => "logsigmoid",
            Activation::Tanhshrink => "tanhshrink",
            Activation::Identity => "identity",
            Activation::LayerNorm(_) => "layer_norm",
            Activation::RmsNorm(_) => "rms_norm",
            Activation::GroupNorm { .. } => "group_norm",
        }
    }

    /// The coefficient and its default, for the activations that take one.
    fn coefficient(self) -> Option<(f32, f32)> {
        match self {
            Activation::LeakyRelu(c) => Some((c.get(), LEAKY_RELU_SLOPE)),
            Activation::Elu(c) => Some((c.get(), ELU_ALPHA)),
            Activation::Celu(c) => Some((c.get(), CELU_ALPHA)),
            _ => None,
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Activation::GroupNorm { groups, .. } = self {
            return write!(f, "{}:{groups}", self.name());
        }
        match self.coefficient() {
            Some((c, default)) if c != default => write!(f, "{}:{c}", self.name()),
            _ => f.write_str(self.name()),
        }
    }
}

/// Other names [`Activation::from_str`](FromStr) accepts: PyTorch's class names where they
/// differ from [`Activation::NAMES`] (`nn.Dropout` and `nn.Flatten` are the identity in eval
/// mode on 2-D input).
pub const ALIASES: [(&str, &str); 9] = [
    ("dropout", "identity"),
    ("alphadropout", "identity"),
    ("flatten", "identity"),
    ("leakyrelu", "leaky_relu"),
    ("swish", "silu"),
    ("layernorm", "layer_norm"),
    ("rmsnorm", "rms_norm"),
    ("groupnorm", "group_norm"),
    ("gelu_approximate_tanh", "gelu_tanh"),
];

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
        // PyTorch's class names, lowercased, for the layers whose name here differs.
        let name = ALIASES
            .iter()
            .find(|(alias, _)| alias.eq_ignore_ascii_case(name))
            .map_or(name, |&(_, canonical)| canonical);
        let unknown = || {
            format!(
                "unknown activation `{wanted}` (expected {})",
                Self::names_list()
            )
        };
        if name.eq_ignore_ascii_case("group_norm") {
            return match coefficient.map(|c| c.parse::<usize>()) {
                Some(Ok(groups)) if groups > 0 => Ok(Self::group_norm(groups, LAYER_NORM_EPS)),
                Some(_) => Err(format!(
                    "activation `{wanted}`: the group count must be a whole number from 1 \
                     (group_norm:4 for nn.GroupNorm(4, dim, affine=False))"
                )),
                None => Err(format!(
                    "activation `{wanted}` needs its group count: group_norm:4 for \
                     nn.GroupNorm(4, dim, affine=False)"
                )),
            };
        }
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
            // CELU divides by its alpha: PyTorch refuses 0.
            Activation::Celu(_) if value == 0.0 => {
                Err(format!("activation `{wanted}`: CELU's alpha cannot be 0"))
            }
            Activation::Celu(_) => Ok(Activation::Celu(Coef::new(value))),
            other => Err(format!(
                "activation `{wanted}`: {} takes no coefficient (only leaky_relu, elu and celu do)",
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
        let e = "softmin".parse::<Activation>().unwrap_err();
        assert!(e.contains("`softmin`"), "{e}");
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
        assert_eq!("CELU:0.5".parse(), Ok(Activation::Celu(Coef::new(0.5))));
        assert_eq!(Activation::Celu(Coef::new(0.5)).to_string(), "celu:0.5");
        let e = "celu:0".parse::<Activation>().unwrap_err();
        assert!(e.contains("cannot be 0"), "{e}");
        for bad in ["relu:0.1", "leaky_relu:x", "elu:nan", "leaky_relu:inf"] {
            let e = bad.parse::<Activation>().unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        // A parameter-free LayerNorm: PyTorch's epsilon unless the model sets it; no
        // coefficient in its name.
        assert_eq!("layer_norm".parse(), Ok(Activation::layer_norm(1e-5)));
        assert_eq!(Activation::layer_norm(0.05).to_string(), "layer_norm");
        let e = "layer_norm:0.1".parse::<Activation>().unwrap_err();
        assert!(e.contains("takes no coefficient"), "{e}");
        assert_eq!("RMS_norm".parse(), Ok(Activation::rms_norm(f32::EPSILON)));
        // A parameter-free GroupNorm: its group count after the colon, the epsilon the model's.
        let group: Activation = " Group_Norm : 4 ".parse().unwrap();
        assert_eq!(group, Activation::group_norm(4, 1e-5));
        assert_eq!(group.to_string(), "group_norm:4");
        assert_eq!(group.to_string().parse::<Activation>(), Ok(group));
        for (bad, why) in [
            ("group_norm", "needs its group count"),
            ("group_norm:0", "whole number from 1"),
            ("group_norm:2.5", "whole number from 1"),
        ] {
            let e = bad.parse::<Activation>().unwrap_err();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
        assert!(Activation::names_list().contains("group_norm:<groups>"));
        // PyTorch's class names where they differ.
        for (alias, want) in [
            ("Dropout", Activation::Identity),
            ("Flatten", Activation::Identity),
            ("LeakyReLU:0.2", Activation::LeakyRelu(Coef::new(0.2))),
            ("Swish", Activation::Silu),
            ("LayerNorm", Activation::layer_norm(1e-5)),
            ("RMSNorm", Activation::rms_norm(f32::EPSILON)),
            ("GroupNorm:4", Activation::group_norm(4, 1e-5)),
        ] {
            assert_eq!(alias.parse::<Activation>(), Ok(want), "{alias}");
        }
        for (alias, canonical) in ALIASES {
            let target = canonical.parse::<Activation>().map(|a| a.name());
            let known = Activation::NAMES.contains(&canonical) || canonical == "group_norm";
            assert!(known && target.map_or(true, |n| n == canonical), "{alias}");
        }
    }

    /// A parameter-free GroupNorm normalizes each group of each row on its own: 2 groups of 3
    /// channels, each with mean 0 and variance 1; a group count that does not divide the width
    /// is an error naming both.
    #[test]
    fn group_norm_normalizes_each_group() {
        let tape = Tape::new();
        let xs = vec![1.0f32, 2.0, 4.0, -30.0, 0.0, 30.0];
        let x = tape.leaf(Tensor::from_vec(&[1, 6], xs).unwrap());
        let y = Activation::group_norm(2, 1e-5).forward(&tape, &x).unwrap();
        for group in y.value().data().chunks(3) {
            let mean: f32 = group.iter().sum::<f32>() / 3.0;
            let var: f32 = group.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 3.0;
            assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4, "{group:?}");
        }
        let e = Activation::group_norm(4, 1e-5)
            .forward(&tape, &x)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 groups of 6 channels"), "{e}");
    }

    /// A parameter-free LayerNorm normalizes each row and passes the gradient of the
    /// normalization to x (ones and zeros as its frozen weight and bias), each row on its own.
    #[test]
    fn layer_norm_normalizes_rows_and_trains_through() {
        let tape = Tape::new();
        let xs = vec![1.0f32, 2.0, 4.0, -3.0, 0.0, 3.0];
        let x = tape.leaf(Tensor::from_vec(&[2, 3], xs).unwrap());
        let y = Activation::layer_norm(1e-5).forward(&tape, &x).unwrap();
        for row in y.value().data().chunks(3) {
            let mean: f32 = row.iter().sum::<f32>() / 3.0;
            let var: f32 = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 3.0;
            assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4, "{row:?}");
        }
        // d/dx of Σ w·y with w = (1, 0, 0) on each row, by central differences in f64.
        let w = Tensor::from_vec(&[2, 3], vec![1., 0., 0., 1., 0., 0.]).unwrap();
        let g = tape.backward_from(y, w).unwrap();
        let dx = g.get(&x).unwrap();
        let norm0 = |r: [f64; 3]| {
            let m = r.iter().sum::<f64>() / 3.0;
            let v = r.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 3.0;
            (r[0] - m) / (v + 1e-5).sqrt()
        };
        for (i, row) in [[1.0f64, 2.0, 4.0], [-3.0, 0.0, 3.0]].iter().enumerate() {
            for j in 0..3 {
                let (mut up, mut down) = (*row, *row);
                up[j] += 1e-6;
                down[j] -= 1e-6;
                let want = (norm0(up) - norm0(down)) / 2e-6;
                let got = dx.data()[i * 3 + j] as f64;
                assert!((got - want).abs() < 1e-4, "({i},{j}): {got} vs {want}");
            }
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
                Activation::LayerNorm(eps) => {
                    let mean = xs.iter().sum::<f32>() / 4.0;
                    let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
                    let r = 1.0 / (var + eps.get()).sqrt();
                    xs.iter().map(|v| (v - mean) * r).collect()
                }
                Activation::RmsNorm(eps) => {
                    let ms = xs.iter().map(|v| v * v).sum::<f32>() / 4.0;
                    xs.iter().map(|v| v / (ms + eps.get()).sqrt()).collect()
                }
                // The functions' values against PyTorch: nibble_autograd's unary tests.
                other => xs
                    .iter()
                    .map(|&v| other.unary_fn().unwrap().value(v))
                    .collect(),
            };
            // The norms' references sum in another order: a few ulps of their ±1.4.
            let tol = match a {
                Activation::LayerNorm(_) | Activation::RmsNorm(_) => 1e-6,
                _ => 1e-7,
            };
            for (g, w) in y.value().data().iter().zip(&want) {
                assert!((g - w).abs() < tol, "{a}: {g} vs {w}");
            }
        }
        // The identity passes the gradient through unchanged.
        let y = Activation::Identity.forward(&tape, &x).unwrap();
        let loss = tape.sum(&y).unwrap();
        let g = tape.backward(&loss).unwrap();
        assert_eq!(g.get(&x).unwrap().data(), [1.0; 4]);
    }
}
