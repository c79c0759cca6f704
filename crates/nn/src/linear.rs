//! The linear layer in every weight format: trainable f32, or a frozen weight of any storage
//! (f16, 4-bit, ...), with an optional LoRA adapter.

use crate::error::{Error, Result};
use nibble_autograd::{Bias, Param, Pending, Tape, Var};
use nibble_io::{FrozenWeight, WeightFormat};
use nibble_tensor::gemm::{gemm, MatRef};
use nibble_tensor::{f16, PackedWeight, Rng, Tensor, WeightMatrix};
use rayon::prelude::*;
use std::sync::{Arc, Mutex, Weak};

/// A frozen bias, in the precision the variant stores it.
#[derive(Debug, Clone)]
pub enum FrozenBias {
    /// f32 (the 4-bit variants keep f32 biases, as the reference does).
    F32(Vec<f32>),
    /// f16 (`half_precision` and `lora`, whose reference layers are all-f16).
    F16(Vec<f16>),
}

impl FrozenBias {
    fn as_bias(&self) -> Bias<'_> {
        match self {
            FrozenBias::F32(b) => Bias::F32(b),
            FrozenBias::F16(b) => Bias::F16(b),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            FrozenBias::F32(b) => b.len(),
            FrozenBias::F16(b) => b.len(),
        }
    }

    /// True for a zero-length bias.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenBias::F32(b) => b.len() * 4,
            FrozenBias::F16(b) => b.len() * 2,
        }
    }

    /// The values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            FrozenBias::F32(b) => b.clone(),
            FrozenBias::F16(b) => b.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

/// A rank-r LoRA adapter: `y += B (A x)` with `A` `[r, in]` and `B` `[out, r]`, unscaled; with
/// [`Dora`], PEFT's DoRA: `y = scale ⊙ (x·Wᵀ + B (A x)) + bias`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `lora_a.weight`, `[r, in]`, initialised uniform ±1/√in (PyTorch's kaiming_uniform(√5)).
    pub a: Param,
    /// `lora_b.weight`, `[out, r]`, initialised to zeros.
    pub b: Param,
    /// DoRA's magnitude and the per-output scale it gives (PEFT's `use_dora`), or `None`.
    pub dora: Option<Dora>,
    /// The scaling `s` that `b` holds folded in: `b = s · B` for the `B` PEFT trains, where a
    /// PEFT adapter with `lora_alpha / r` (or its rsLoRA or pattern scaling) other than 1 was
    /// loaded (see [`crate::peft`]); 1 for nibble's own adapters. An optimizer that is told it
    /// ([`nibble_autograd::AdamW::set_storage_scale`]) then takes PEFT's steps on `B`.
    pub b_scale: f32,
}

/// DoRA (weight-decomposed LoRA, PEFT's `use_dora`): the layer's output without its bias,
/// `x·Wᵀ + B (A x)`, is scaled per output by `magnitude / ‖W + B·A‖` (the norm of each row of
/// the adapted weight, W dequantized as the kernels use it), then the bias is added: PEFT's
/// `DoraLinearLayer`, whose weight norm is a constant in the backward (detached). The
/// magnitude trains with the adapter ([`Linear::params`]); the norms follow `A` and `B` as
/// they train: [`Linear::dora_norm`] recomputes them when either (or a trainable base weight)
/// has changed since they were last computed, as PEFT recomputes them at every forward.
#[derive(Debug, Clone)]
pub struct Dora {
    /// `lora_magnitude_vector`, `[out]`.
    pub magnitude: Param,
    /// The row norms last computed and what they were computed from (shared by clones, which
    /// share the parameters too).
    norms: Arc<Mutex<Option<CachedNorms>>>,
}

/// Row norms and what they were computed from.
type CachedNorms = (NormSource, Arc<[f32]>);

/// What a DoRA layer's row norms were computed from: the base weight (a parameter at a
/// version, or a frozen matrix, which never changes) and `A` and `B` at their versions.
#[derive(Debug)]
struct NormSource {
    weight: WeightSource,
    a: (Param, u64),
    b: (Param, u64),
}

/// The base weight a [`NormSource`] read.
#[derive(Debug)]
enum WeightSource {
    Param((Param, u64)),
    Frozen(Weak<dyn WeightMatrix>),
}

impl NormSource {
    /// The source of `layer`'s norms now (`lora`: its adapter).
    fn of(layer: &Linear, lora: &LoraAdapter) -> Self {
        let at = |p: &Param| (p.clone(), p.version());
        NormSource {
            weight: match &layer.base {
                LinearBase::Trainable { weight, .. } => WeightSource::Param(at(weight)),
                LinearBase::Frozen { weight, .. } => {
                    WeightSource::Frozen(Arc::downgrade(&weight.matrix()))
                }
            },
            a: at(&lora.a),
            b: at(&lora.b),
        }
    }

    /// Whether both name the same parameters at the same versions and the same frozen matrix.
    fn same(&self, other: &NormSource) -> bool {
        let same_param = |(p, v): &(Param, u64), (q, w): &(Param, u64)| p.same_as(q) && v == w;
        let weight = match (&self.weight, &other.weight) {
            (WeightSource::Param(p), WeightSource::Param(q)) => same_param(p, q),
            // The allocations' addresses (a trait object's vtable may be duplicated).
            (WeightSource::Frozen(p), WeightSource::Frozen(q)) => {
                std::ptr::addr_eq(p.as_ptr(), q.as_ptr())
            }
            _ => false,
        };
        weight && same_param(&self.a, &other.a) && same_param(&self.b, &other.b)
    }
}

impl Dora {
    /// A DoRA whose magnitude is `magnitude` (`[out]`, checked against the layer where it is
    /// used: [`Linear::dora_norm`]).
    pub fn new(magnitude: Param) -> Self {
        Dora {
            magnitude,
            norms: Arc::default(),
        }
    }

    /// The row norms `‖W + B·A‖` (`[out]`, summed in f64, rounded to f32) of layer `name`'s
    /// weight `weight` (`[out, in]`, f32) and adapter product `delta` = `B·A` (`[out, in]`, B
    /// scaled; `None`: `‖W‖`, B·A at zero). Shapes that differ, or a row whose norm is 0 or
    /// not finite (its scale would be infinite or NaN), are an [`Error::Layer`] naming the
    /// layer and the row.
    pub fn row_norms(name: &str, weight: &Tensor, delta: Option<&Tensor>) -> Result<Vec<f32>> {
        let (out, inp) = weight.dims2("dora")?;
        if let Some(delta) = delta.filter(|d| d.shape() != weight.shape()) {
            return Err(Error::Layer {
                layer: name.to_string(),
                what: format!(
                    "DoRA adapter product {:?} for a weight of {:?}",
                    delta.shape(),
                    weight.shape()
                ),
            });
        }
        // One row a task (each row's sum in its own order: the same bits for any thread count).
        let norms: Vec<f32> = (0..out)
            .into_par_iter()
            .map(|i| {
                let row = i * inp..(i + 1) * inp;
                let w = &weight.data()[row.clone()];
                let d = delta.map(|d| &d.data()[row]);
                let sq: f64 = (0..inp)
                    .map(|j| {
                        let v = w[j] as f64 + d.map_or(0.0, |d| d[j] as f64);
                        v * v
                    })
                    .sum();
                sq.sqrt() as f32
            })
            .collect();
        if let Some((i, norm)) = norms
            .iter()
            .enumerate()
            .find(|(_, n)| **n == 0.0 || !n.is_finite())
        {
            return Err(Error::Layer {
                layer: name.to_string(),
                what: format!(
                    "DoRA: row {i} of the adapted weight has norm {norm}, so its scale \
                     (magnitude / norm) is not finite"
                ),
            });
        }
        Ok(norms)
    }

    /// `magnitude / norm` per row ([`nibble_autograd::ops::scale_shift::magnitude_scale`]),
    /// or an [`Error::Layer`] naming layer `name` and the first row whose scale is not finite
    /// (a magnitude near f32's largest over a small norm).
    pub fn check_scale(name: &str, magnitude: &[f32], norm: &[f32]) -> Result<Vec<f32>> {
        let scale = nibble_autograd::ops::scale_shift::magnitude_scale(magnitude, norm);
        if let Some(i) = scale.iter().position(|s| !s.is_finite()) {
            return Err(Error::Layer {
                layer: name.to_string(),
                what: format!(
                    "DoRA: row {i}'s scale, magnitude {} / norm {}, is not finite",
                    magnitude[i], norm[i]
                ),
            });
        }
        Ok(scale)
    }
}

/// [`Linear::enable_dora`] on every layer of `layers` that has a LoRA adapter: all of them or,
/// on an error (naming the layer), none. No layer with an adapter is an [`Error::Layer`].
pub fn enable_dora<'a>(layers: impl IntoIterator<Item = &'a mut Linear>) -> Result<()> {
    let adapted: Vec<&mut Linear> = layers.into_iter().filter(|l| l.lora.is_some()).collect();
    if adapted.is_empty() {
        return Err(Error::Layer {
            layer: "(every layer)".into(),
            what: "DoRA needs LoRA adapters, and no layer has one (add_lora first)".into(),
        });
    }
    // Every start is computed before any layer changes.
    let starts = adapted
        .iter()
        .map(|l| l.dora_start())
        .collect::<Result<Vec<_>>>()?;
    for (layer, start) in adapted.into_iter().zip(starts) {
        if let (Some(lora), Some(dora)) = (layer.lora.as_mut(), start) {
            lora.dora = Some(dora);
        }
    }
    Ok(())
}

/// The largest LoRA rank accepted: the cap the PEFT config reader puts on `r` (2^16).
pub const MAX_LORA_RANK: usize = 1 << 16;

/// An error naming `module` unless `rank` is a usable LoRA rank for an `out x in` layer: at
/// least 1, at most [`MAX_LORA_RANK`], and with `A` (`[rank, in]`) and `B` (`[out, rank]`)
/// sizes (in bytes) that do not overflow.
pub fn check_lora_rank(module: &str, out: usize, inp: usize, rank: usize) -> Result<()> {
    let bad = |what: String| Error::Layer {
        layer: module.to_string(),
        what,
    };
    if rank == 0 {
        return Err(bad("LoRA rank must be at least 1".to_string()));
    }
    if rank > MAX_LORA_RANK {
        return Err(bad(format!(
            "LoRA rank {rank} is above the largest accepted, {MAX_LORA_RANK} (PEFT's cap on `r`)"
        )));
    }
    let bytes = |rows: usize, cols: usize| rows.checked_mul(cols)?.checked_mul(4);
    if bytes(rank, inp).is_none() || bytes(out, rank).is_none() {
        return Err(bad(format!(
            "a rank-{rank} LoRA adapter of a [{out}, {inp}] layer overflows memory sizes \
             (A [{rank}, {inp}], B [{out}, {rank}])"
        )));
    }
    Ok(())
}

impl LoraAdapter {
    /// A fresh adapter for an `out x in` layer named `module` (e.g. `model.0.model.0`). A rank
    /// that [`check_lora_rank`] refuses (0, above [`MAX_LORA_RANK`], or sizes that overflow)
    /// is an [`Error::Layer`] naming `module`.
    pub fn init(module: &str, out: usize, inp: usize, rank: usize, rng: &mut Rng) -> Result<Self> {
        check_lora_rank(module, out, inp, rank)?;
        let bound = 1.0 / (inp as f32).sqrt();
        // (`Tensor::uniform`'s values; sizes beyond memory are an error, not a panic.)
        let a = Tensor::from_fn(&[rank, inp], |_| rng.uniform(-bound, bound))?;
        Ok(LoraAdapter {
            a: Param::new(format!("{module}.lora_a.weight"), a, true),
            b: Param::new(
                format!("{module}.lora_b.weight"),
                Tensor::try_zeros(&[out, rank])?,
                true,
            ),
            dora: None,
            b_scale: 1.0,
        })
    }

    /// The adapter's rank (the first dimension of `A`).
    ///
    /// # Panics
    ///
    /// If `A` is a 0-dimensional tensor (only a hand-built adapter can be: [`LoraAdapter::init`]
    /// and the PEFT reader make `A` `[r, in]`).
    pub fn rank(&self) -> usize {
        self.a.value().shape()[0]
    }

    /// The adapter's parameters: `A`, `B` and a DoRA's magnitude.
    pub fn params(&self) -> Vec<Param> {
        let mut params = vec![self.a.clone(), self.b.clone()];
        params.extend(self.dora.as_ref().map(|d| d.magnitude.clone()));
        params
    }

    /// `B·A`, `[out, in]`: what merging adds to the base weight.
    pub fn delta(&self) -> Result<Tensor> {
        lora_product(&self.a.value(), &self.b.value())
    }
}

/// `B·A`, `[out, in]`, of an adapter's `a` `[r, in]` and `b` `[out, r]`; an error if their
/// shapes do not chain.
pub fn lora_product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (r, inp) = a.dims2("lora delta")?;
    let (out, rb) = b.dims2("lora delta")?;
    if rb != r {
        return Err(Error::Layer {
            layer: "lora delta".into(),
            what: format!("A {:?} and B {:?} do not chain", a.shape(), b.shape()),
        });
    }
    let mut d = Tensor::zeros(&[out, inp]);
    // delta [out, in] = B [out, r] · A [r, in]
    gemm(
        MatRef::row_major(b.data(), out, r)?,
        &MatRef::row_major(a.data(), r, inp)?,
        d.data_mut(),
        false,
    )?;
    Ok(d)
}

/// The weight (and bias) part of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearBase {
    /// f32 parameters that train (`bignet`).
    Trainable {
        /// `[out, in]`.
        weight: Param,
        /// `[out]`; `None` for a layer without one (`nn.Linear(.., bias=False)`).
        bias: Option<Param>,
    },
    /// A frozen weight of any storage and a frozen bias.
    Frozen {
        /// `[out, in]`, f16 or quantized.
        weight: FrozenWeight,
        /// `[out]`; `None` for a layer without one.
        bias: Option<FrozenBias>,
    },
}

/// One linear layer: a base and, in the LoRA variants, an adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The layer's name in the state dict (`model.0.model.0`).
    pub name: String,
    /// Weight and bias.
    pub base: LinearBase,
    /// The LoRA adapter, if any.
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// `y[m, out] = x[m, in] · Wᵀ + b (+ B(A x))`: a frozen base with an adapter is one record
    /// ([`Tape::frozen_linear_lora`]); a trainable one records the base and the adapter's two
    /// products.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        if let Some((lora, dora)) = self.lora.as_ref().and_then(|l| Some((l, l.dora.as_ref()?))) {
            return self.forward_dora(tape, x, lora, dora);
        }
        let y = match (&self.base, &self.lora) {
            (LinearBase::Trainable { weight, bias }, _) => tape.linear(x, weight, bias.as_ref())?,
            (LinearBase::Frozen { weight, bias }, Some(lora)) => {
                // One record: y = x·Wᵀ + b + B (A x) in one pass, dX in one pass.
                return Ok(tape.frozen_linear_lora(
                    x,
                    &weight.matrix(),
                    bias.as_ref().map(FrozenBias::as_bias),
                    &lora.a,
                    &lora.b,
                )?);
            }
            (LinearBase::Frozen { weight, bias }, None) => {
                tape.frozen_linear(x, &weight.matrix(), bias.as_ref().map(FrozenBias::as_bias))?
            }
        };
        match &self.lora {
            None => Ok(y),
            Some(lora) => {
                // y + B (A x), accumulated into the base output's buffer.
                let h = tape.linear(x, &lora.a, None)?;
                Ok(tape.linear_add(y, &h, &lora.b)?)
            }
        }
    }

    /// [`Linear::forward`] of a layer with a DoRA adapter: `scale ⊙ (x·Wᵀ + B (A x)) + bias`
    /// with `scale = magnitude / ‖W + B·A‖` ([`Tape::scale_by_magnitude`], the norm a constant
    /// as PEFT detaches it), the bias a constant (an error if it trains while the tape
    /// records).
    fn forward_dora(&self, tape: &Tape, x: &Var, lora: &LoraAdapter, dora: &Dora) -> Result<Var> {
        if let Some(bias) = self.trainable_bias().filter(|_| tape.is_recording()) {
            return Err(Error::Layer {
                layer: self.name.clone(),
                what: format!(
                    "the bias `{}` of a layer with a DoRA adapter does not train here",
                    bias.name()
                ),
            });
        }
        let norm = self.dora_norm()?.unwrap_or_default();
        let z = match &self.base {
            LinearBase::Frozen { weight, .. } => {
                tape.frozen_linear_lora(x, &weight.matrix(), None, &lora.a, &lora.b)?
            }
            LinearBase::Trainable { weight, .. } => {
                let y = tape.linear(x, weight, None)?;
                let h = tape.linear(x, &lora.a, None)?;
                tape.linear_add(y, &h, &lora.b)?
            }
        };
        let out = norm.len();
        let bias = self.bias_values().unwrap_or_else(|| vec![0.0; out]);
        self.check_bias(bias.len(), out)?;
        Ok(tape.scale_by_magnitude(&z, &dora.magnitude, &norm, &bias)?)
    }

    /// The bias where it is a parameter that trains.
    fn trainable_bias(&self) -> Option<&Param> {
        match &self.base {
            LinearBase::Trainable { bias, .. } => bias.as_ref().filter(|b| b.requires_grad()),
            LinearBase::Frozen { .. } => None,
        }
    }

    /// [`Linear::forward`] recorded without computing `y` (see [`Pending`]): the same records
    /// in the same order (the adapter's `A x`, which its backward reads, is computed), for a
    /// checkpointed segment's recomputation whose backward never reads `y`
    /// ([`Tape::checkpoint_with`]). Skips the layer's product, but for a DoRA layer, whose
    /// magnitude's gradient reads it.
    pub fn forward_pending(&self, tape: &Tape, x: &Var) -> Result<Pending> {
        if self.lora.as_ref().is_some_and(|l| l.dora.is_some()) {
            // DoRA's magnitude gradient reads the product it scales: computed, as a forward
            // computes it (its records are the forward's).
            return Ok(self.forward(tape, x)?.into());
        }
        let y = match &self.base {
            LinearBase::Trainable { weight, bias } => {
                tape.linear_pending(x, weight, bias.as_ref())?
            }
            LinearBase::Frozen { weight, bias } => {
                let matrix = weight.matrix();
                if let Some(bias) = bias {
                    self.check_bias(bias.len(), matrix.out_features())?;
                }
                if let Some(lora) = &self.lora {
                    return Ok(tape.frozen_linear_lora_pending(x, &matrix, &lora.a, &lora.b)?);
                }
                tape.frozen_linear_pending(x, &matrix)?
            }
        };
        match &self.lora {
            None => Ok(y),
            Some(lora) => {
                let h = tape.linear(x, &lora.a, None)?;
                Ok(tape.linear_add_pending(y, &h, &lora.b)?)
            }
        }
    }

    /// An error naming the layer unless its bias has one element per output.
    fn check_bias(&self, bias: usize, outputs: usize) -> Result<()> {
        if bias != outputs {
            return Err(Error::Layer {
                layer: self.name.clone(),
                what: format!("bias of {bias} elements for {outputs} outputs"),
            });
        }
        Ok(())
    }

    /// Makes a trainable f32 base frozen and packed for inference: the weight becomes a
    /// [`PackedWeight`] (the GEMM reads its panels in place instead of packing them per call;
    /// the f32 tensor's memory, plus zero lanes rounding `out` up to 16), the bias a frozen f32 bias. The layer then stops
    /// training its base (its adapter, if any, still trains); its outputs keep the bits of the
    /// trainable layer for batches above 16 rows, and differ by rounding below (see
    /// [`nibble_tensor::packed`]). Frozen bases are left as they are. An error if the
    /// parameters do not form a layer (the weight not 2-D, the bias not `[out]`).
    ///
    /// ```
    /// use nibble_autograd::Param;
    /// use nibble_nn::linear::{Linear, LinearBase};
    /// use nibble_tensor::Tensor;
    /// let (weight, bias) = (Tensor::zeros(&[3, 4]), Tensor::zeros(&[3]));
    /// let mut layer = Linear {
    ///     name: "fc".into(),
    ///     base: LinearBase::Trainable {
    ///         weight: Param::new("fc.weight", weight, true),
    ///         bias: Some(Param::new("fc.bias", bias, true)),
    ///     },
    ///     lora: None,
    /// };
    /// layer.pack_for_inference().unwrap();
    /// assert!(matches!(layer.base, LinearBase::Frozen { .. }));
    /// assert_eq!(layer.dims(), (3, 4));
    /// assert!(layer.params().is_empty());
    /// ```
    pub fn pack_for_inference(&mut self) -> Result<()> {
        let LinearBase::Trainable { weight, bias } = &self.base else {
            return Ok(());
        };
        let packed = PackedWeight::pack(&weight.value())?;
        let bias = bias.as_ref().map(|b| b.value().data().to_vec());
        if let Some(bias) = &bias {
            self.check_bias(bias.len(), packed.out_features())?;
        }
        self.base = LinearBase::Frozen {
            weight: FrozenWeight::F32(std::sync::Arc::new(packed)),
            bias: bias.map(FrozenBias::F32),
        };
        Ok(())
    }

    /// `(out, in)`.
    ///
    /// # Panics
    ///
    /// If a trainable weight is not 2-D: only a hand-built `LinearBase::Trainable` can hold
    /// one ([`Linear::from_f32`] and [`Linear::replace_base_param`] check the shape).
    pub fn dims(&self) -> (usize, usize) {
        match &self.base {
            LinearBase::Trainable { weight, .. } => {
                let w = weight.value();
                (w.shape()[0], w.shape()[1])
            }
            LinearBase::Frozen { weight, .. } => {
                let m = weight.matrix();
                (m.out_features(), m.in_features())
            }
        }
    }

    /// Every parameter (trainable or not): the f32 weight and bias, the adapter's (A, B, a DoRA's
    /// magnitude).
    pub fn params(&self) -> Vec<Param> {
        let mut out = Vec::new();
        if let LinearBase::Trainable { weight, bias } = &self.base {
            out.push(weight.clone());
            out.extend(bias.clone());
        }
        out.extend(self.lora.iter().flat_map(LoraAdapter::params));
        out
    }

    /// The row norms `‖W + B·A‖` of a layer with a DoRA adapter (`None` without one), as the
    /// weight, `A` and `B` are now: computed again only where one of them has changed since
    /// the last call ([`Param::version`]; a frozen weight never changes). A magnitude that is
    /// not `[out]`, or a row whose norm is 0 or not finite, is an [`Error::Layer`] naming the
    /// layer (see [`Dora::row_norms`]).
    pub fn dora_norm(&self) -> Result<Option<Arc<[f32]>>> {
        let Some((lora, dora)) = self.lora.as_ref().and_then(|l| Some((l, l.dora.as_ref()?)))
        else {
            return Ok(None);
        };
        let (out, _) = self.dims();
        let magnitude = dora.magnitude.value().shape().to_vec();
        if magnitude != [out] {
            return Err(Error::Layer {
                layer: self.name.clone(),
                what: format!("DoRA magnitude of shape {magnitude:?} for {out} outputs"),
            });
        }
        let source = NormSource::of(self, lora);
        let mut cached = dora.norms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((from, norm)) = cached.as_ref() {
            if from.same(&source) {
                return Ok(Some(norm.clone()));
            }
        }
        let norm: Arc<[f32]> = self.adapted_row_norms(lora)?.into();
        *cached = Some((source, norm.clone()));
        Ok(Some(norm))
    }

    /// Makes the layer's LoRA adapter a DoRA one, as PEFT's `use_dora` creates it: the
    /// magnitude starts at the row norms of the adapted weight, `‖W + B·A‖` (`‖W‖` for a
    /// fresh adapter, whose B is zero), so the layer's output is unchanged, and trains where
    /// A trains. A layer without an adapter, or a row whose norm is 0 (see
    /// [`Dora::row_norms`]), is an [`Error::Layer`] naming the layer, and the layer is left as
    /// it was; a DoRA adapter stays as it is.
    pub fn enable_dora(&mut self) -> Result<()> {
        let start = self.dora_start()?;
        if let (Some(lora), Some(dora)) = (self.lora.as_mut(), start) {
            lora.dora = Some(dora);
        }
        Ok(())
    }

    /// The DoRA [`Linear::enable_dora`] attaches (`None` where the adapter is a DoRA one
    /// already), its norms cached: the magnitude is the norms themselves.
    fn dora_start(&self) -> Result<Option<Dora>> {
        let Some(lora) = &self.lora else {
            return Err(Error::Layer {
                layer: self.name.clone(),
                what: "DoRA needs a LoRA adapter on the layer (add_lora first)".into(),
            });
        };
        if lora.dora.is_some() {
            return Ok(None);
        }
        let norm: Arc<[f32]> = self.adapted_row_norms(lora)?.into();
        let magnitude = Tensor::from_vec(&[norm.len()], norm.to_vec())?;
        let name = format!("{}.lora_magnitude_vector", self.name);
        let dora = Dora::new(Param::new(name, magnitude, lora.a.requires_grad()));
        *dora.norms.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((NormSource::of(self, lora), norm));
        Ok(Some(dora))
    }

    /// `‖W + B·A‖` per row of this layer's weight (dequantized as the kernels use it; an f32
    /// weight read in place) and `lora`'s product ([`Dora::row_norms`]).
    fn adapted_row_norms(&self, lora: &LoraAdapter) -> Result<Vec<f32>> {
        let delta = lora.delta()?;
        match &self.base {
            LinearBase::Trainable { weight, .. } => {
                Dora::row_norms(&self.name, &weight.value(), Some(&delta))
            }
            LinearBase::Frozen { weight, .. } => {
                Dora::row_norms(&self.name, &weight.matrix().to_f32(), Some(&delta))
            }
        }
    }

    /// The per-output scale `magnitude / ‖W + B·A‖` of a layer with a DoRA adapter (`None`
    /// without one), with the bits [`Tape::scale_by_magnitude`] multiplies by: what an
    /// inference path outside the tape scales the product by. Errors as [`Linear::dora_norm`]'s,
    /// and a scale that is not finite is one too ([`Dora::check_scale`]).
    pub fn dora_scale(&self) -> Result<Option<Vec<f32>>> {
        let Some(norm) = self.dora_norm()? else {
            return Ok(None);
        };
        let magnitude = self.lora.as_ref().and_then(|l| l.dora.as_ref());
        let magnitude = magnitude.map(|d| d.magnitude.value().data().to_vec());
        Ok(Some(Dora::check_scale(
            &self.name,
            &magnitude.unwrap_or_default(),
            &norm,
        )?))
    }

    /// Elements and bytes of the frozen storage (weight and bias) outside [`Linear::params`]:
    /// `(elements, bytes)`. Elements count what is stored (for a 4-bit weight: its code bytes
    /// and its scales, as the PyTorch reference's buffers do).
    pub fn frozen_storage(&self) -> (usize, usize) {
        match &self.base {
            LinearBase::Trainable { .. } => (0, 0),
            LinearBase::Frozen { weight, bias } => (
                weight.stored_elements() + bias.as_ref().map_or(0, FrozenBias::len),
                weight.matrix().storage_bytes() + bias.as_ref().map_or(0, FrozenBias::bytes),
            ),
        }
    }

    /// The weight as f32 (dequantized if need be) and the bias as f32 (`None` for a layer
    /// without one).
    pub fn dense_weight_and_bias(&self) -> (Tensor, Option<Vec<f32>>) {
        let weight = match &self.base {
            LinearBase::Trainable { weight, .. } => weight.value().clone(),
            LinearBase::Frozen { weight, .. } => weight.matrix().to_f32(),
        };
        (weight, self.bias_values())
    }

    /// The bias as f32 (`None` for a layer without one), without touching the weight.
    pub fn bias_values(&self) -> Option<Vec<f32>> {
        match &self.base {
            LinearBase::Trainable { bias, .. } => bias.as_ref().map(|b| b.value().data().to_vec()),
            LinearBase::Frozen { bias, .. } => bias.as_ref().map(FrozenBias::to_f32),
        }
    }

    /// Replaces the base's bias (`bias`) or weight with `value` (`[out]` or `[out, in]`; another
    /// shape is an [`Error::Layer`] and changes nothing), frozen: what a PEFT adapter's `bias = "all"` or `modules_to_save` holds.
    /// A new weight makes the base an f32 one (PEFT's full copy of the module) and drops the
    /// layer's adapter; a new bias keeps the base's format.
    pub fn replace_base_param(&mut self, bias: bool, value: Tensor) -> Result<()> {
        let name = format!("{}.{}", self.name, if bias { "bias" } else { "weight" });
        let (out, inp) = self.dims();
        let expected: &[usize] = if bias { &[out] } else { &[out, inp] };
        if value.shape() != expected {
            return Err(Error::Layer {
                layer: self.name.clone(),
                what: format!(
                    "`{name}` must be {expected:?} to replace the layer's, found shape {:?}",
                    value.shape()
                ),
            });
        }
        let frozen = |t: Tensor| Param::new(name.clone(), t, false);
        if bias {
            match &mut self.base {
                LinearBase::Trainable { bias, .. } => *bias = Some(frozen(value)),
                LinearBase::Frozen { bias, .. } => *bias = Some(FrozenBias::F32(value.into_vec())),
            }
            return Ok(());
        }
        let (_, old_bias) = self.dense_weight_and_bias();
        let bias = match old_bias {
            Some(b) => Some(Param::new(
                format!("{}.bias", self.name),
                Tensor::from_vec(&[b.len()], b)?,
                false,
            )),
            None => None,
        };
        self.base = LinearBase::Trainable {
            weight: frozen(value),
            bias,
        };
        self.lora = None;
        Ok(())
    }

    /// Whether the layer's parameters are all f16, as the reference's `half_precision` and
    /// `lora` layers (`HalfLinear`) are: a frozen base with an f16 bias. A parameter that
    /// replaces one of its own ([`Linear::replace_base_param`]) is stored in f16 in such a
    /// module, as PEFT loads it.
    pub fn is_all_f16(&self) -> bool {
        matches!(
            &self.base,
            LinearBase::Frozen {
                bias: Some(FrozenBias::F16(_)),
                ..
            }
        )
    }

    /// Whether the layer adds a bias.
    pub fn has_bias(&self) -> bool {
        match &self.base {
            LinearBase::Trainable { bias, .. } => bias.is_some(),
            LinearBase::Frozen { bias, .. } => bias.is_some(),
        }
    }
}

impl Linear {
    /// A layer named `name` (the module's path, e.g. `0` or `model.fc1`) from an f32 weight
    /// `[out, in]` and bias `[out]` (`None`: a layer without a bias, as
    /// `nn.Linear(.., bias=False)`), stored in `format`: `F32` trains, every other format is a
    /// frozen weight (quantized here) with an f32 bias.
    pub fn from_f32(
        name: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
        format: WeightFormat,
    ) -> Result<Self> {
        let name = name.into();
        let (out, _) = match weight.shape() {
            &[o, i] => (o, i),
            s => {
                return Err(Error::Layer {
                    layer: name,
                    what: format!("a linear weight is [out, in], found shape {s:?}"),
                })
            }
        };
        if let Some(bias) = bias.as_ref().filter(|b| b.shape() != [out]) {
            return Err(Error::Layer {
                layer: name,
                what: format!(
                    "bias shape {:?} does not match weight shape {:?} (expected [{out}])",
                    bias.shape(),
                    weight.shape()
                ),
            });
        }
        let base = match format {
            WeightFormat::F32 => LinearBase::Trainable {
                weight: Param::new(format!("{name}.weight"), weight, true),
                bias: bias.map(|b| Param::new(format!("{name}.bias"), b, true)),
            },
            format => LinearBase::Frozen {
                weight: FrozenWeight::quantize(format, &format!("{name}.weight"), &weight)?,
                bias: bias.map(|b| FrozenBias::F32(b.into_vec())),
            },
        };
        Ok(Linear {
            name,
            base,
            lora: None,
        })
    }

    /// The storage format of the (base) weight.
    pub fn format(&self) -> WeightFormat {
        match &self.base {
            LinearBase::Trainable { .. } => WeightFormat::F32,
            LinearBase::Frozen { weight, .. } => weight.format(),
        }
    }

    /// Attaches a fresh rank-`rank` LoRA adapter initialised as PEFT does (A uniform ±1/√in,
    /// i.e. kaiming-uniform with a = √5; B zero), replacing any adapter the layer had, and
    /// freezes the base weight and bias. A rank [`check_lora_rank`] refuses is an
    /// [`Error::Layer`], and leaves the layer as it was.
    pub fn add_lora(&mut self, rank: usize, rng: &mut Rng) -> Result<()> {
        let (out, inp) = self.dims();
        // Built before anything changes: a refused rank leaves the layer as it was.
        let adapter = LoraAdapter::init(&self.name, out, inp, rank, rng)?;
        for p in self.params() {
            p.set_requires_grad(false);
        }
        self.lora = Some(adapter);
        Ok(())
    }

    /// Bytes of the weight and bias as stored (f32, f16 or packed), LoRA adapters included.
    pub fn stored_bytes(&self) -> usize {
        let base = match &self.base {
            LinearBase::Trainable { weight, bias } => {
                4 * (weight.value().numel() + bias.as_ref().map_or(0, |b| b.value().numel()))
            }
            LinearBase::Frozen { .. } => self.frozen_storage().1,
        };
        let lora = self.lora.as_ref().map_or(0, |l| {
            let magnitude = l.dora.as_ref().map_or(0, |d| d.magnitude.numel());
            4 * (l.a.value().numel() + l.b.value().numel() + magnitude)
        });
        base + lora
    }
}
