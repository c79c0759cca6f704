//! LayerNorm over the last dimension (PyTorch's `nn.LayerNorm(dim)`, eps 1e-5) of `[batch, dim]`
//! inputs, and its kin of the same 1-D parameters: RMSNorm (`nn.RMSNorm(dim)`, no bias) and
//! GroupNorm (`nn.GroupNorm(groups, dim)`).

use crate::error::{Error, Result};
use nibble_autograd::{Param, Tape, Var};
use nibble_tensor::Tensor;

/// What a [`LayerNorm`] module computes on each row `x` of `dim` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormKind {
    /// `(x − mean) / √(var + eps) · weight + bias` (`nn.LayerNorm`).
    #[default]
    Layer,
    /// `x / √(mean(x²) + eps) · weight` (`nn.RMSNorm`; no bias).
    Rms,
    /// `nn.GroupNorm(groups, dim)`: the `dim` channels in `groups` groups of neighbours, each
    /// group normalized as a LayerNorm normalizes a row, then `· weight + bias` per channel.
    /// One group is a LayerNorm.
    Group(usize),
    /// Not a norm: `nn.PReLU(n)`, whose one 1-D `weight` (the slopes) a state dict stores
    /// like a norm's; [`crate::Sequential::from_state_dict`] makes it a [`crate::PRelu`].
    PRelu,
}

/// A LayerNorm with an affine weight and (unless `nn.LayerNorm(dim, bias=False)`) bias `[dim]`,
/// or with [`NormKind::Rms`] an RMSNorm (weight only): in a state dict both are a 1-D
/// `weight`, so they share this type.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// The module's name (`2`, `model.norm`, ...).
    pub name: String,
    /// `weight` `[dim]`.
    pub weight: Param,
    /// `bias` `[dim]`; `None` for a LayerNorm without one.
    pub bias: Option<Param>,
    /// Added to the variance (to the mean square for an RMSNorm).
    pub eps: f32,
    /// LayerNorm, RMSNorm or GroupNorm.
    pub kind: NormKind,
    /// Zeros `[dim]`, frozen, for the forward of a LayerNorm without a bias (the tape's op
    /// adds a bias; `v + 0.0` keeps `v`'s bits but for -0.0), made once.
    zero_bias: Option<Param>,
}

impl LayerNorm {
    /// PyTorch's default epsilon.
    pub const DEFAULT_EPS: f32 = 1e-5;

    /// A LayerNorm named `name` from its weight and bias (both `[dim]`; no bias: a LayerNorm
    /// without one), trainable.
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let name = name.into();
        let bias_shape = bias.as_ref().map_or(weight.shape(), |b| b.shape());
        if weight.shape().len() != 1 || weight.shape() != bias_shape {
            return Err(Error::Layer {
                layer: name,
                what: format!(
                    "LayerNorm weight and bias must both be [dim], found {:?} and {:?}",
                    weight.shape(),
                    bias_shape
                ),
            });
        }
        let zero_bias = bias
            .is_none()
            .then(|| Param::new(format!("{name}.bias"), Tensor::zeros(weight.shape()), false));
        Ok(LayerNorm {
            weight: Param::new(format!("{name}.weight"), weight, true),
            bias: bias.map(|b| Param::new(format!("{name}.bias"), b, true)),
            name,
            eps: Self::DEFAULT_EPS,
            kind: NormKind::Layer,
            zero_bias,
        })
    }

    /// This module as an RMSNorm adding `eps` to the mean square (PyTorch's `nn.RMSNorm(dim)`
    /// takes [`f32::EPSILON`] for f32); an error naming the module if it has a bias, which an
    /// RMSNorm has not.
    pub fn into_rms(mut self, eps: f32) -> Result<Self> {
        if self.bias.is_some() {
            return Err(Error::Layer {
                layer: self.name,
                what: "an RMSNorm has no bias, and this module has one: it is a LayerNorm".into(),
            });
        }
        self.kind = NormKind::Rms;
        self.eps = eps;
        Ok(self)
    }

    /// This module as a GroupNorm of `groups` groups adding `eps` to each group's variance
    /// (`nn.GroupNorm(groups, dim, eps)`, default eps 1e-5); an error naming the module if
    /// `groups` is 0 or does not divide its width. (`nn.GroupNorm(.., affine=False)` has no
    /// parameters at all, so it is not a module of a state dict.)
    pub fn into_group(mut self, groups: usize, eps: f32) -> Result<Self> {
        let dim = self.dim();
        if groups == 0 || !dim.is_multiple_of(groups) {
            return Err(Error::Layer {
                layer: self.name,
                what: format!(
                    "a GroupNorm of {groups} groups over {dim} channels: the groups must divide the channels"
                ),
            });
        }
        self.kind = NormKind::Group(groups);
        self.eps = eps;
        Ok(self)
    }

    /// The normalized width.
    pub fn dim(&self) -> usize {
        self.weight.value().numel()
    }

    /// Normalizes each row of `x` `[batch, dim]`.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        if self.kind == NormKind::PRelu {
            return Err(Error::Layer {
                layer: self.name.clone(),
                what: "a PReLU is a `PRelu` layer, not a norm".into(),
            });
        }
        if self.kind == NormKind::Rms {
            if self.bias.is_some() {
                return Err(Error::Layer {
                    layer: self.name.clone(),
                    what: "an RMSNorm has no bias".into(),
                });
            }
            return Ok(tape.rms_norm(x, &self.weight, self.eps)?);
        }
        // A LayerNorm without a bias adds the zeros made with it.
        let bias = self
            .bias
            .as_ref()
            .or(self.zero_bias.as_ref())
            .ok_or_else(|| Error::Layer {
                layer: self.name.clone(),
                what: "no bias and no zeros to add".into(),
            })?;
        match self.kind {
            NormKind::Group(groups) => {
                Ok(tape.group_norm(x, groups, &self.weight, bias, self.eps)?)
            }
            _ => Ok(tape.layer_norm(x, &self.weight, bias, self.eps)?),
        }
    }

    /// The weight and bias.
    pub fn params(&self) -> Vec<Param> {
        std::iter::once(self.weight.clone())
            .chain(self.bias.clone())
            .collect()
    }
}
