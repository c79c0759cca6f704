//! `nn.BatchNorm1d` in eval mode on `[batch, dim]` inputs: the running statistics and the
//! affine parameters folded into one per-feature scale and shift, frozen (as PyTorch's CPU
//! inference computes it: `α = weight / √(running_var + eps)`, `β = bias − running_mean · α`,
//! `y = x · α + β`).

use crate::error::{Error, Result};
use nibble_autograd::{Tape, Var};
use nibble_tensor::Tensor;

/// A frozen BatchNorm: its state-dict tensors, and the scale and shift they fold into.
///
/// The tensors and the epsilon are read through getters and changed only through
/// [`BatchNorm::set_eps`] and [`BatchNorm::set_tensors`], which validate them as
/// [`BatchNorm::new`] does and fold them again: what [`BatchNorm::forward`] computes is always
/// what [`BatchNorm::tensors`] (what is saved) holds.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    /// The module's name (`2`, `model.bn`, ...).
    pub name: String,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f32,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl BatchNorm {
    /// PyTorch's default epsilon.
    pub const DEFAULT_EPS: f32 = 1e-5;

    /// A BatchNorm named `name` from its running statistics and (unless `affine=False`) its
    /// weight and bias, all `[dim]`; a shape that differs, a negative or non-finite variance or
    /// a bad `eps` is an error naming the layer.
    pub fn new(
        name: impl Into<String>,
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f32,
    ) -> Result<Self> {
        let name = name.into();
        let bad = |what: String| Error::Layer {
            layer: name.clone(),
            what,
        };
        let dim = running_mean.numel();
        let shapes = [
            Some(&running_mean),
            Some(&running_var),
            weight.as_ref(),
            bias.as_ref(),
        ];
        if let Some(t) = shapes.into_iter().flatten().find(|t| t.shape() != [dim]) {
            return Err(bad(format!(
                "BatchNorm tensors must all be [{dim}] (running_mean's), found {:?}",
                t.shape()
            )));
        }
        if !(eps.is_finite() && eps > 0.0) {
            return Err(bad(format!(
                "epsilon must be a positive number, found {eps}"
            )));
        }
        if let Some(i) = running_var
            .data()
            .iter()
            .position(|v| !(v.is_finite() && *v >= 0.0))
        {
            return Err(bad(format!(
                "running_var[{i}] is {}: a variance is finite and not negative",
                running_var.data()[i]
            )));
        }
        let ones = vec![1.0f32; dim];
        let zeros = vec![0.0f32; dim];
        let w = weight.as_ref().map_or(&ones[..], |t| t.data());
        let b = bias.as_ref().map_or(&zeros[..], |t| t.data());
        let scale: Vec<f32> = running_var
            .data()
            .iter()
            .zip(w)
            .map(|(v, w)| w / (v + eps).sqrt())
            .collect();
        let shift = b
            .iter()
            .zip(running_mean.data())
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Ok(BatchNorm {
            name,
            weight,
            bias,
            running_mean,
            running_var,
            eps,
            scale,
            shift,
        })
    }

    /// `weight` `[dim]` (`None` with `affine=False`).
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// `bias` `[dim]` (`None` with `affine=False`).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `running_mean` `[dim]`.
    pub fn running_mean(&self) -> &Tensor {
        &self.running_mean
    }

    /// `running_var` `[dim]`.
    pub fn running_var(&self) -> &Tensor {
        &self.running_var
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// Sets the epsilon, validated and folded as in [`BatchNorm::new`]: a bad one is an error
    /// naming the layer, and leaves the BatchNorm as it was.
    pub fn set_eps(&mut self, eps: f32) -> Result<()> {
        *self = BatchNorm::new(
            self.name.clone(),
            self.weight.clone(),
            self.bias.clone(),
            self.running_mean.clone(),
            self.running_var.clone(),
            eps,
        )?;
        Ok(())
    }

    /// Replaces the tensors (the epsilon stays), validated and folded as in
    /// [`BatchNorm::new`]: tensors that are not all `[dim]` (the new `running_mean`'s width), or
    /// a negative or non-finite variance, are an error naming the layer, and leave the
    /// BatchNorm as it was.
    pub fn set_tensors(
        &mut self,
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        running_mean: Tensor,
        running_var: Tensor,
    ) -> Result<()> {
        *self = BatchNorm::new(
            self.name.clone(),
            weight,
            bias,
            running_mean,
            running_var,
            self.eps,
        )?;
        Ok(())
    }

    /// The normalized width.
    pub fn dim(&self) -> usize {
        self.scale.len()
    }

    /// `x · α + β` per feature, `x` `[batch, dim]` (only `x` gets a gradient).
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        Ok(tape.scale_shift(x, &self.scale, &self.shift)?)
    }

    /// The state-dict tensors, by name under the module (`weight`, `bias`, `running_mean`,
    /// `running_var`), for saving.
    pub fn tensors(&self) -> Vec<(String, &Tensor)> {
        [
            ("weight", self.weight.as_ref()),
            ("bias", self.bias.as_ref()),
            ("running_mean", Some(&self.running_mean)),
            ("running_var", Some(&self.running_var)),
        ]
        .into_iter()
        .filter_map(|(k, t)| Some((format!("{}.{k}", self.name), t?)))
        .collect()
    }
}
