//! AdamW exactly as PyTorch's single-tensor implementation computes it.

use super::{
    check_hyper, check_step_shapes, distinct_params, load_buffers, next_step, zeros_like,
    Optimizer, OptimizerState,
};
use crate::error::{AutogradError, Result};
use crate::param::Param;
use nibble_tensor::Tensor;
use rayon::prelude::*;

/// AdamW's hyper-parameters; the defaults are PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (1e-3).
    pub lr: f32,
    /// Decay of the first moment (0.9).
    pub beta1: f32,
    /// Decay of the second moment (0.999).
    pub beta2: f32,
    /// Added to the denominator (1e-8).
    pub eps: f32,
    /// Decoupled weight decay (0.01).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW: `p -= lr·wd·p`, then the bias-corrected Adam update.
///
/// ```
/// use nibble_autograd::{AdamW, AdamWConfig, Optimizer, Param};
/// use nibble_tensor::Tensor;
/// let p = Param::new("p", Tensor::from_vec(&[1], vec![1.0]).unwrap(), true);
/// p.accumulate_grad(Tensor::from_vec(&[1], vec![0.5]).unwrap()).unwrap();
/// let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
/// opt.step().unwrap();
/// // first step: p·(1 - lr·wd) - lr·sign(g)
/// assert!((p.value().data()[0] - (1.0 - 1e-5 - 1e-3)).abs() < 1e-6);
/// ```
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    step: u64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Each parameter's storage scale (see [`AdamW::set_storage_scale`]); 1 for most.
    scales: Vec<f32>,
}

impl AdamW {
    /// An optimizer over `params` (those that do not require a gradient are skipped). An
    /// error for an invalid hyper-parameter, and for a parameter given twice or two parameters
    /// of one name ([`AutogradError::InvalidInput`] naming it): the state is saved and loaded
    /// by name, and a parameter given twice would be updated twice per step.
    pub fn new(params: Vec<Param>, config: AdamWConfig) -> Result<Self> {
        let c = config;
        check_hyper("AdamW", "lr", c.lr as f64, c.lr >= 0.0)?;
        check_hyper(
            "AdamW",
            "beta1",
            c.beta1 as f64,
            (0.0..1.0).contains(&c.beta1),
        )?;
        check_hyper(
            "AdamW",
            "beta2",
            c.beta2 as f64,
            (0.0..1.0).contains(&c.beta2),
        )?;
        check_hyper("AdamW", "eps", c.eps as f64, c.eps >= 0.0)?;
        check_hyper(
            "AdamW",
            "weight_decay",
            c.weight_decay as f64,
            c.weight_decay >= 0.0,
        )?;
        let params = distinct_params("AdamW::new", params)?;
        Ok(AdamW {
            exp_avg: zeros_like(&params),
            exp_avg_sq: zeros_like(&params),
            scales: vec![1.0; params.len()],
            params,
            config,
            step: 0,
        })
    }

    /// The parameters being optimized.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Declares that `param` stores `s · θ` for the `θ` whose AdamW steps are wanted (a LoRA
    /// `B` with PEFT's scaling `s` folded in, nibble-nn's `LoraAdapter::b_scale`): each step then moves
    /// `param` by `s` times AdamW's step on `θ`, whose gradient is `s` times `param`'s. With
    /// `m` and `v` the moments of `param`'s own gradient, that is the usual update with the step
    /// size times `|s|` and `eps / |s|` (the decay `1 − lr·wd` is the same): PEFT's training of
    /// `B`, up to rounding, for a negative scaling (`lora_alpha < 0`) too. An error if `param`
    /// is not one this optimizer updates or `s` is not finite and nonzero (`param` would hold
    /// nothing of `θ`).
    ///
    /// ```
    /// use nibble_autograd::{AdamW, AdamWConfig, Optimizer, Param};
    /// use nibble_tensor::Tensor;
    /// // θ = 0.5 stored as w = 4 θ = 2.0; θ's gradient 0.5 is 4 times w's.
    /// let (theta, w) = (
    ///     Param::new("theta", Tensor::from_vec(&[1], vec![0.5]).unwrap(), true),
    ///     Param::new("w", Tensor::from_vec(&[1], vec![2.0]).unwrap(), true),
    /// );
    /// let mut plain = AdamW::new(vec![theta.clone()], AdamWConfig::default()).unwrap();
    /// let mut scaled = AdamW::new(vec![w.clone()], AdamWConfig::default()).unwrap();
    /// scaled.set_storage_scale(&w, 4.0).unwrap();
    /// for _ in 0..3 {
    ///     theta.accumulate_grad(Tensor::from_vec(&[1], vec![0.5]).unwrap()).unwrap();
    ///     w.accumulate_grad(Tensor::from_vec(&[1], vec![0.125]).unwrap()).unwrap();
    ///     plain.step().unwrap();
    ///     scaled.step().unwrap();
    ///     plain.zero_grad();
    ///     scaled.zero_grad();
    /// }
    /// let (t, s) = (theta.value().data()[0], w.value().data()[0]);
    /// assert!((s - 4.0 * t).abs() <= 1e-6 * s.abs(), "{s} against 4 · {t}");
    /// ```
    pub fn set_storage_scale(&mut self, param: &Param, scale: f32) -> Result<()> {
        if !(scale.is_finite() && scale != 0.0) {
            return Err(AutogradError::InvalidInput {
                op: "AdamW::set_storage_scale",
                what: format!(
                    "parameter {}: the scale must be finite and nonzero, found {scale}",
                    param.name()
                ),
            });
        }
        let i = self
            .params
            .iter()
            .position(|p| p.name() == param.name())
            .ok_or_else(|| AutogradError::InvalidInput {
                op: "AdamW::set_storage_scale",
                what: format!(
                    "parameter {} is not one this optimizer updates",
                    param.name()
                ),
            })?;
        self.scales[i] = scale;
        Ok(())
    }
}

/// `beta^step` for AdamW's bias corrections: `powi` where `step` fits an `i32` (the bits of
/// PyTorch's `beta ** step` there, as before), else 0. Past `i32::MAX` steps the power of any
/// f32 `beta < 1` is below `(1 - 2^-24)^(2^31) ≈ e^-128`, so `1 - beta^step` is 1.0 in f64
/// either way; the wrapping `step as i32` gave a negative exponent, a correction below 0 or
/// `-inf`, and NaN parameters.
fn beta_pow(beta: f32, step: u64) -> f64 {
    match i32::try_from(step) {
        Ok(s) => (beta as f64).powi(s),
        Err(_) => 0.0,
    }
}

impl Optimizer for AdamW {
    /// One AdamW update of every parameter that has a gradient. Before anything is updated,
    /// every gradient and moment buffer is checked to have its parameter's shape (an error
    /// naming the parameter and both shapes otherwise, nothing updated, the step count kept).
    fn step(&mut self) -> Result<()> {
        check_step_shapes(
            "AdamW::step",
            &self.params,
            &[("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)],
        )?;
        self.step = next_step(self.step)?;
        let c = self.config;
        let bias_correction1 = 1.0 - beta_pow(c.beta1, self.step);
        let bias_correction2 = 1.0 - beta_pow(c.beta2, self.step);
        let step_size = (c.lr as f64 / bias_correction1) as f32;
        let bias_correction2_sqrt = bias_correction2.sqrt() as f32;
        let decay = 1.0 - c.lr * c.weight_decay;
        // One task per parameter (each element is updated on its own, so any split gives the
        // same bits): a LoRA model has dozens of small parameters, which one thread would
        // update while the others wait.
        self.params
            .par_iter()
            .zip(self.exp_avg.par_iter_mut())
            .zip(self.exp_avg_sq.par_iter_mut())
            .zip(self.scales.par_iter())
            .try_for_each(|(((p, m), v), &scale)| {
                let grad = p.grad();
                let Some(g) = grad.as_ref() else {
                    return Ok(());
                };
                let mut value = p.value_mut();
                // Checked above; again here, under the locks, so that a gradient or value
                // swapped in between is an error rather than a partial update.
                let shape = value.shape();
                if g.shape() != shape || m.shape() != shape || v.shape() != shape {
                    return Err(AutogradError::InvalidInput {
                        op: "AdamW::step",
                        what: format!(
                            "parameter {}: gradient {:?}, moments {:?} and {:?} for a value of \
                             shape {shape:?}",
                            p.name(),
                            g.shape(),
                            m.shape(),
                            v.shape()
                        ),
                    });
                }
                // A parameter stored scaled (`set_storage_scale`): AdamW's step on θ, times s
                // (s² m / (|s| √v + eps) = |s| m / (√v + eps / |s|)).
                let (step_size, eps) = if scale == 1.0 {
                    (step_size, c.eps)
                } else {
                    (step_size * scale.abs(), c.eps / scale.abs())
                };
                for (((w, &g), m), v) in value
                    .data_mut()
                    .iter_mut()
                    .zip(g.data())
                    .zip(m.data_mut())
                    .zip(v.data_mut())
                {
                    *w *= decay;
                    *m += (1.0 - c.beta1) * (g - *m); // lerp
                    *v = *v * c.beta2 + (1.0 - c.beta2) * g * g;
                    let denom = v.sqrt() / bias_correction2_sqrt + eps;
                    *w += -step_size * (*m / denom);
                }
                Ok(())
            })
    }

    fn zero_grad(&mut self) {
        self.params.iter().for_each(Param::zero_grad);
    }

    fn state(&self) -> OptimizerState {
        let mut tensors = Vec::with_capacity(2 * self.params.len());
        for ((p, m), v) in self.params.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            tensors.push((format!("exp_avg.{}", p.name()), m.clone()));
            tensors.push((format!("exp_avg_sq.{}", p.name()), v.clone()));
        }
        OptimizerState {
            step: self.step,
            tensors,
        }
    }

    /// Restores [`Optimizer::state`]'s buffers and step count (all or nothing): every
    /// parameter's `exp_avg.<name>` and `exp_avg_sq.<name>` must be there once, with its shape.
    /// Any step count is taken; past `i32::MAX` the bias corrections are 1 (see `beta_pow`).
    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        let mut m = self.exp_avg.clone();
        let mut v = self.exp_avg_sq.clone();
        load_buffers(state, "exp_avg", &self.params, &mut m)?;
        load_buffers(state, "exp_avg_sq", &self.params, &mut v)?;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.step = state.step;
        Ok(())
    }
}
