//! The linear layer in every weight format: trainable f32, or a frozen weight of any storage
//! (f16, 4-bit, ...), with an optional LoRA adapter.

use crate::error::Result;
use nibble_autograd::{Bias, Param, Tape, Var};
use nibble_io::FrozenWeight;
use nibble_tensor::gemm::{gemm, MatRef};
use nibble_tensor::{f16, Rng, Tensor};

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

/// A rank-r LoRA adapter: `y += B (A x)` with `A` `[r, in]` and `B` `[out, r]`, unscaled.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `lora_a.weight`, `[r, in]`, initialised uniform ±1/√in (PyTorch's kaiming_uniform(√5)).
    pub a: Param,
    /// `lora_b.weight`, `[out, r]`, initialised to zeros.
    pub b: Param,
}

impl LoraAdapter {
    /// A fresh adapter for an `out x in` layer named `module` (e.g. `model.0.model.0`).
    pub fn init(module: &str, out: usize, inp: usize, rank: usize, rng: &mut Rng) -> Self {
        let bound = 1.0 / (inp as f32).sqrt();
        LoraAdapter {
            a: Param::new(
                format!("{module}.lora_a.weight"),
                Tensor::uniform(&[rank, inp], -bound, bound, rng),
                true,
            ),
            b: Param::new(
                format!("{module}.lora_b.weight"),
                Tensor::zeros(&[out, rank]),
                true,
            ),
        }
    }

    /// The adapter's rank.
    pub fn rank(&self) -> usize {
        self.a.value().shape()[0]
    }

    /// `B·A`, `[out, in]`: what merging adds to the base weight.
    pub fn delta(&self) -> Result<Tensor> {
        let a = self.a.value().clone();
        let b = self.b.value().clone();
        let (r, inp) = a.dims2("lora delta")?;
        let (out, _) = b.dims2("lora delta")?;
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
}

/// The weight (and bias) part of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearBase {
    /// f32 parameters that train (`bignet`).
    Trainable {
        /// `[out, in]`.
        weight: Param,
        /// `[out]`.
        bias: Param,
    },
    /// A frozen weight of any storage and a frozen bias.
    Frozen {
        /// `[out, in]`, f16 or quantized.
        weight: FrozenWeight,
        /// `[out]`.
        bias: FrozenBias,
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
    /// `y[m, out] = x[m, in] · Wᵀ + b (+ B(A x))`.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let y = match &self.base {
            LinearBase::Trainable { weight, bias } => tape.linear(x, weight, Some(bias))?,
            LinearBase::Frozen { weight, bias } => {
                tape.frozen_linear(x, &weight.matrix(), Some(bias.as_bias()))?
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

    /// `(out, in)`.
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

    /// Every parameter (trainable or not): the f32 weight and bias, the adapters.
    pub fn params(&self) -> Vec<Param> {
        let mut out = Vec::new();
        if let LinearBase::Trainable { weight, bias } = &self.base {
            out.push(weight.clone());
            out.push(bias.clone());
        }
        if let Some(l) = &self.lora {
            out.push(l.a.clone());
            out.push(l.b.clone());
        }
        out
    }

    /// Elements and bytes of the frozen storage (weight and bias) outside [`Linear::params`]:
    /// `(elements, bytes)`. Elements count what is stored (for a 4-bit weight: its code bytes
    /// and its scales, as the PyTorch reference's buffers do).
    pub fn frozen_storage(&self) -> (usize, usize) {
        match &self.base {
            LinearBase::Trainable { .. } => (0, 0),
            LinearBase::Frozen { weight, bias } => (
                weight.stored_elements() + bias.len(),
                weight.matrix().storage_bytes() + bias.bytes(),
            ),
        }
    }

    /// The weight as f32 (dequantized if need be) and the bias as f32.
    pub fn dense_weight_and_bias(&self) -> (Tensor, Vec<f32>) {
        match &self.base {
            LinearBase::Trainable { weight, bias } => {
                (weight.value().clone(), bias.value().data().to_vec())
            }
            LinearBase::Frozen { weight, bias } => (weight.matrix().to_f32(), bias.to_f32()),
        }
    }
}
