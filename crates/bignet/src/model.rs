//! BigNet: 6 residual blocks of `Linear → ReLU → Linear → ReLU → Linear` (+ the block's input),
//! with a LayerNorm between consecutive blocks. One generic model: the variant only decides how
//! each [`Linear`] is built.

use crate::error::{Error, Result};
use crate::frozen::FrozenWeight;
use crate::layer::{FrozenBias, Linear, LinearBase, LoraAdapter};
use crate::source::{linear_key, norm_key, SeededInit, WeightSource, BLOCKS, LAYERS_PER_BLOCK};
use crate::variant::{Variant, WeightFormat};
use nibble_autograd::{Param, Pending, Tape, Var};
use nibble_quant::act8::{activations, with_activations, ActivationMode};
use nibble_tensor::{f16, Rng, Tensor};
use std::sync::Arc;

/// Rank of the LoRA adapters.
pub const LORA_RANK: usize = 32;
/// LayerNorm epsilon (PyTorch's default).
pub const NORM_EPS: f32 = 1e-5;

/// A LayerNorm's affine parameters.
#[derive(Debug, Clone)]
pub struct Norm {
    /// `[dim]`, initialised to 1.
    pub weight: Param,
    /// `[dim]`, initialised to 0.
    pub bias: Param,
}

/// Parameter counts and memory of a model, computed from what it stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Elements of parameters that train.
    pub trainable: usize,
    /// Elements of everything else the model stores (frozen weights count their stored
    /// elements: codes and scales for quantized ones).
    pub non_trainable: usize,
    /// Bytes of all parameters and buffers.
    pub bytes: usize,
}

/// The model.
#[derive(Debug, Clone)]
pub struct BigNet {
    variant: Variant,
    dim: usize,
    /// `blocks[b][l]`: linear layer `l` of block `b` (shared, so that a checkpointed block's
    /// recomputation can hold it).
    blocks: Vec<Arc<[Linear; LAYERS_PER_BLOCK]>>,
    /// `norms[b]`: the LayerNorm after block `b` (5 of them).
    norms: Vec<Norm>,
    /// What this model's quantized layers do with their activations; `None` follows the
    /// process-wide [`nibble_quant::act8::activations`].
    activations: Option<ActivationMode>,
}

impl BigNet {
    /// Builds `variant` from `source`, converting each weight to the variant's storage as it is
    /// read (the f32 copy of a layer is dropped before the next is read). LoRA adapters, if any,
    /// are initialised from `lora_seed` (A uniform ±1/√in, B zero).
    pub fn build(variant: Variant, source: &dyn WeightSource, lora_seed: u64) -> Result<Self> {
        let dim = source.dim();
        if dim == 0 {
            return Err(Error::Model {
                what: format!("{}: model width is 0", source.describe()),
            });
        }
        let mut blocks = Vec::with_capacity(BLOCKS);
        for b in 0..BLOCKS {
            let mut layers = Vec::with_capacity(LAYERS_PER_BLOCK);
            for l in 0..LAYERS_PER_BLOCK {
                let name = linear_key(b, l);
                let weight = source.tensor(&format!("{name}.weight"), &[dim, dim])?;
                let bias = source.tensor(&format!("{name}.bias"), &[dim])?;
                let base = Self::make_base(variant, &name, weight, bias)?;
                let lora = variant
                    .has_lora()
                    .then(|| {
                        let mut rng =
                            Rng::fork(lora_seed, 0x10_0000 + (b * LAYERS_PER_BLOCK + l) as u64);
                        LoraAdapter::init(&name, dim, dim, LORA_RANK, &mut rng)
                    })
                    .transpose()?;
                layers.push(Linear { name, base, lora });
            }
            blocks.push(Arc::new(layers.try_into().expect("three layers")));
        }
        let mut norms = Vec::with_capacity(BLOCKS - 1);
        for b in 0..BLOCKS - 1 {
            let name = norm_key(b);
            let w = source.tensor(&format!("{name}.weight"), &[dim])?;
            let bias = source.tensor(&format!("{name}.bias"), &[dim])?;
            let train = variant.norms_train();
            norms.push(Norm {
                weight: Param::new(format!("{name}.weight"), w, train),
                bias: Param::new(format!("{name}.bias"), bias, train),
            });
        }
        Ok(BigNet {
            variant,
            dim,
            blocks,
            norms,
            activations: None,
        })
    }

    fn make_base(variant: Variant, name: &str, weight: Tensor, bias: Tensor) -> Result<LinearBase> {
        Ok(match variant.weight_format() {
            WeightFormat::F32 => LinearBase::Trainable {
                weight: Param::new(format!("{name}.weight"), weight, true),
                bias: Some(Param::new(format!("{name}.bias"), bias, true)),
            },
            WeightFormat::F16 => {
                let half: Vec<f16> = bias.data().iter().map(|&v| f16::from_f32(v)).collect();
                // A finite bias that f16 cannot hold would turn into an infinity.
                if let Some(i) =
                    (0..half.len()).find(|&i| half[i].is_infinite() && bias.data()[i].is_finite())
                {
                    return Err(Error::Model {
                        what: format!(
                            "`{name}.bias` element {i} is {}, beyond f16's largest finite value (65504)",
                            bias.data()[i]
                        ),
                    });
                }
                LinearBase::Frozen {
                    weight: FrozenWeight::quantize(
                        WeightFormat::F16,
                        &format!("{name}.weight"),
                        &weight,
                    )?,
                    bias: Some(FrozenBias::F16(half)),
                }
            }
            format => LinearBase::Frozen {
                weight: FrozenWeight::quantize(format, &format!("{name}.weight"), &weight)?,
                bias: Some(FrozenBias::F32(bias.into_vec())),
            },
        })
    }

    /// `variant` at width `dim` with PyTorch's default init drawn from `seed`; an error where
    /// one f32 layer of that width (`4 · dim²` bytes) is more than this machine's memory.
    pub fn seeded(variant: Variant, dim: usize, seed: u64) -> Result<Self> {
        // One f32 layer (what the init draws before any quantization) must fit this machine:
        // an allocator that overcommits gives a 4 TiB layer, and filling it killed the process.
        let layer = 4 * dim as u128 * dim as u128;
        if let Err((need, total)) = nibble_tensor::machine::fits(layer) {
            return Err(Error::Model {
                what: format!(
                    "a seeded BigNet of width {dim} draws f32 layers of {need:.1} GiB; this \
                     machine has {total:.1} GiB"
                ),
            });
        }
        Self::build(variant, &SeededInit { dim, seed }, seed)
    }

    /// Assembles a model from ready-made parts (used by loaders of quantized checkpoints).
    /// Every part must fit width `dim`: each linear's weight `[dim, dim]` and bias `[dim]`,
    /// each adapter's `A` `[r, dim]` and `B` `[dim, r]` (`r >= 1`), each LayerNorm's weight
    /// and bias `[dim]`; a part that does not, or counts other than [`BLOCKS`] blocks and
    /// `BLOCKS - 1` norms, is an [`Error::Model`] naming the part and its shape.
    pub fn from_parts(
        variant: Variant,
        dim: usize,
        blocks: Vec<[Linear; LAYERS_PER_BLOCK]>,
        norms: Vec<Norm>,
    ) -> Result<Self> {
        if blocks.len() != BLOCKS || norms.len() != BLOCKS - 1 {
            return Err(Error::Model {
                what: format!(
                    "BigNet needs {BLOCKS} blocks and {} norms, got {} and {}",
                    BLOCKS - 1,
                    blocks.len(),
                    norms.len()
                ),
            });
        }
        if dim == 0 {
            return Err(Error::Model {
                what: "model width is 0".to_string(),
            });
        }
        for layer in blocks.iter().flatten() {
            check_linear_part(layer, dim)?;
        }
        for (b, norm) in norms.iter().enumerate() {
            for p in [&norm.weight, &norm.bias] {
                let shape = p.value().shape().to_vec();
                if shape != [dim] {
                    return Err(Error::Model {
                        what: format!(
                            "LayerNorm {b} parameter `{}` has shape {shape:?}, expected [{dim}] (the model's width)",
                            p.name()
                        ),
                    });
                }
            }
        }
        Ok(BigNet {
            variant,
            dim,
            blocks: blocks.into_iter().map(Arc::new).collect(),
            norms,
            activations: None,
        })
    }

    /// The variant.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Forward on a tape: records what training needs, nothing when no input is tracked and no
    /// parameter trains.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        self.forward_with(tape, x, false)
    }

    /// This model's activation mode for its quantized layers (see [`BigNet::set_activations`]).
    pub fn activations(&self) -> Option<ActivationMode> {
        self.activations
    }

    /// Sets what this model's quantized layers do with their activations in every forward
    /// ([`BigNet::forward`], [`BigNet::forward_with`] and the chunked [`BigNet::infer`]; f32 or
    /// int8, see [`nibble_quant::act8`]); `None` follows the process-wide mode. A training step
    /// ([`crate::train::train_step`]) runs its backward under the same mode: int8 takes the
    /// input gradients `dX = dY·W` of the frozen quantized layers to the integer GEMM where
    /// [`nibble_quant::act8::backward::backward_route`] says so.
    pub fn set_activations(&mut self, mode: Option<ActivationMode>) {
        self.activations = mode;
    }

    /// Runs `f` under this model's activation mode (the process-wide one when it has none).
    pub(crate) fn with_own_activations<R>(&self, f: impl FnOnce() -> R) -> R {
        match self.activations {
            Some(mode) => with_activations(mode, f),
            None => f(),
        }
    }

    /// [`BigNet::forward`], with every block but the last checkpointed when `checkpoint` is
    /// set (see [`Tape::checkpoint_with`]). Segment b is the LayerNorm before block b (none
    /// before block 0) and the block up to its residual sum: the tape keeps each segment's
    /// input (the previous block's residual sum) and nothing else of it, and the backward
    /// recomputes the LayerNorm and the block's first two layers (under the activation mode
    /// of this forward). The third layer and the residual sum are recorded again but not
    /// computed, since their backward reads the third layer's input, not their outputs: two
    /// products of three per block. The last checkpointed segment also takes the LayerNorm
    /// after its block, whose backward reads the residual sum (one product more), so that
    /// the last block, recorded as usual, does not hold that sum as well as its own input.
    /// The last block is not checkpointed: the backward starts with it, so its activations
    /// would be recomputed at once, and holding them costs no more than recomputing them.
    /// Outputs and gradients are bit-identical either way.
    pub fn forward_with(&self, tape: &Tape, x: &Var, checkpoint: bool) -> Result<Var> {
        self.with_own_activations(|| self.forward_layers(tape, x, checkpoint))
    }

    fn forward_layers(&self, tape: &Tape, x: &Var, checkpoint: bool) -> Result<Var> {
        self.check_input(x.value())?;
        if !checkpoint {
            let mut h = x.clone();
            for (b, block) in self.blocks.iter().enumerate() {
                h = block_forward(tape, block, self.norms.get(b), &h)?;
            }
            return Ok(h);
        }
        // The mode in force now, for the recomputation of checkpointed blocks in the backward.
        let mode = activations();
        // Segment b: the LayerNorm after block b - 1 (none before block 0), then block b up to
        // its residual sum; the last segment also takes the LayerNorm after its block (see
        // `forward_with`).
        let last = self.blocks.len() - 1;
        let mut sum = x.clone();
        for (b, layers) in self.blocks[..last].iter().enumerate() {
            let norm_before = b.checked_sub(1).map(|n| &self.norms[n]);
            let norm_after = (b + 1 == last).then(|| &self.norms[b]);
            let recompute = {
                let layers = Arc::clone(layers);
                let (norm_before, norm_after) = (norm_before.cloned(), norm_after.cloned());
                move |tape: &Tape, sum: &Var| {
                    with_activations(mode, || {
                        segment_pending(
                            tape,
                            &layers,
                            norm_before.as_ref(),
                            norm_after.as_ref(),
                            sum,
                        )
                    })
                }
            };
            sum = tape.checkpoint_with(
                &sum,
                |tape, sum| segment_forward(tape, layers, norm_before, norm_after, sum),
                recompute,
            )?;
        }
        block_forward(tape, &self.blocks[last], self.norms.get(last), &sum)
    }

    /// Inference: `y = model(x)` for `x` `[batch, dim]`, recording nothing, in row chunks of
    /// [`chunk_rows`](crate::infer::chunk_rows) (by default the whole batch; the environment
    /// variable `NIBBLE_INFER_CHUNK_ROWS` sets it, e.g. to
    /// [`LOW_MEMORY_CHUNK_ROWS`](crate::infer::LOW_MEMORY_CHUNK_ROWS)) with every op in place (see
    /// [`BigNet::infer_chunked`]).
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        self.infer_chunked(x, crate::infer::chunk_rows())
    }

    /// Inference through row chunks of `chunk_rows` rows (see [`crate::infer`]): holds the
    /// output and two chunk-sized buffers, and gives the same output as
    /// [`BigNet::forward`] on the whole batch, bit for bit.
    ///
    /// Runs on a worker of the rayon pool (the global one unless the caller is already
    /// inside a pool): each kernel's parallel loop then starts from inside the pool instead
    /// of injecting a job from outside and sleeping until it completes, which costs ~8 µs a
    /// layer — 10 % of a batch-1 forward of the quantized variants. The caller waits for it
    /// without sleeping ([`nibble_tensor::parallel::on_pool_worker`]: a sleeping caller woken
    /// at the end waited about 25 µs for a core on the 2-core Xeon).
    pub fn infer_chunked(&self, x: &Tensor, chunk_rows: usize) -> Result<Tensor> {
        // The activation mode is per thread: taken here, set again on the pool worker that
        // runs the products.
        let mode = self.activations.unwrap_or_else(activations);
        let run = || {
            self.check_input(x)?;
            with_activations(mode, || {
                crate::infer::forward_in_place(&self.blocks, &self.norms, x, chunk_rows)
            })
        };
        nibble_tensor::parallel::on_pool_worker(run)
    }

    /// A batch of one row through the batch-1 team path alone ([`crate::infer`]'s
    /// `forward_batch1_team`, which [`BigNet::infer`] takes for a single row on a pool of 2
    /// threads or more): `None` when it did not run (a pool of one thread, another team
    /// running, a layer without a batch-1 row kernel), else its output, the same bits as
    /// [`BigNet::forward`]. For tests and comparisons; [`BigNet::infer`] picks the path itself.
    pub fn infer_on_team(&self, x: &Tensor) -> Option<Result<Tensor>> {
        let mode = self.activations.unwrap_or_else(activations);
        let run = || {
            if let Err(e) = self.check_input(x) {
                return Some(Err(e));
            }
            if x.shape()[0] != 1 {
                return Some(Err(Error::Input {
                    what: format!(
                        "the batch-1 team path takes one row, got shape {:?}",
                        x.shape()
                    ),
                }));
            }
            let mut out = x.clone();
            with_activations(mode, || {
                crate::infer::forward_batch1_team(
                    &self.blocks,
                    &self.norms,
                    x.data(),
                    out.data_mut(),
                )
            })
            .map(|r| r.map(|()| out))
        };
        nibble_tensor::parallel::on_pool_worker(run)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.shape() {
            [_, d] if *d == self.dim => Ok(()),
            s => Err(Error::Input {
                what: format!(
                    "BigNet ({}) of width {} takes input [batch, {}], got shape {:?}",
                    self.variant, self.dim, self.dim, s
                ),
            }),
        }
    }

    /// Every linear layer, in model order.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks.iter().flat_map(|b| b.iter())
    }

    /// Every linear layer, mutable (for attaching or merging adapters).
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| Arc::make_mut(b).iter_mut())
    }

    /// Makes every LoRA adapter a DoRA one (PEFT's `use_dora`; see
    /// [`nibble_nn::Linear::enable_dora`]): outputs unchanged, each layer's magnitude training
    /// with its adapter. A model without adapters is an error; an error leaves the model as it
    /// was.
    pub fn enable_dora(&mut self) -> Result<()> {
        Ok(nibble_nn::linear::enable_dora(self.linears_mut())?)
    }

    /// Packs every trainable f32 linear layer for inference ([`Linear::pack_for_inference`]):
    /// its weight becomes a [`nibble_tensor::PackedWeight`], which the GEMM reads in place
    /// instead of packing (transposing) it on every call, in the same memory (BigNet's 1024 outputs need no zero lanes). The layers stop
    /// training (the LayerNorms and any adapters still do); frozen layers are left as they
    /// are, so this does nothing to the quantized and half variants. Outputs keep the bits of
    /// the unpacked model for batches above 16 rows and differ by f32 rounding below (the
    /// small-batch kernel sums in the GEMM's order). `bignet bench` and `bignet forward` pack
    /// their models (`NIBBLE_PACK_WEIGHTS=0` keeps them unpacked).
    pub fn pack_for_inference(&mut self) -> Result<()> {
        for layer in self.linears_mut() {
            layer.pack_for_inference()?;
        }
        Ok(())
    }

    /// The LayerNorms, in model order.
    pub fn norms(&self) -> &[Norm] {
        &self.norms
    }

    /// Every parameter (trainable or frozen) held as a [`Param`].
    pub fn params(&self) -> Vec<Param> {
        let mut out: Vec<Param> = self.linears().flat_map(|l| l.params()).collect();
        for n in &self.norms {
            out.push(n.weight.clone());
            out.push(n.bias.clone());
        }
        out
    }

    /// The parameters that train.
    pub fn trainable_params(&self) -> Vec<Param> {
        self.params()
            .into_iter()
            .filter(|p| p.requires_grad())
            .collect()
    }

    /// Counts and bytes of everything the model stores.
    pub fn counts(&self) -> ParamCounts {
        let mut c = ParamCounts {
            trainable: 0,
            non_trainable: 0,
            bytes: 0,
        };
        for p in self.params() {
            let n = p.numel();
            if p.requires_grad() {
                c.trainable += n;
            } else {
                c.non_trainable += n;
            }
            c.bytes += 4 * n;
        }
        for l in self.linears() {
            let (elements, bytes) = l.frozen_storage();
            c.non_trainable += elements;
            c.bytes += bytes;
        }
        c
    }

    /// Changes the variant label (after merging adapters into the base).
    pub(crate) fn set_variant(&mut self, variant: Variant) {
        self.variant = variant;
    }

    /// Gives the model its own copies of the LayerNorm parameters (a clone shares them).
    pub(crate) fn detach_norms(&mut self, train: bool) {
        for n in &mut self.norms {
            let copy = |p: &Param| Param::new(p.name(), p.value().clone(), train);
            *n = Norm {
                weight: copy(&n.weight),
                bias: copy(&n.bias),
            };
        }
    }

    /// Attaches fresh LoRA adapters (seeded) to every layer that has none and freezes
    /// everything else: an f16 model becomes `lora`, a Q4 one `qlora`; other bases keep their
    /// name and gain adapters (e.g. an f32 base, to merge an adapter into it).
    pub fn attach_lora(&mut self, seed: u64) -> Result<()> {
        // Every new adapter is built before the model changes, so that an error leaves it as
        // it was.
        let dim = self.dim;
        let mut adapters = Vec::new();
        for (i, layer) in self.linears().enumerate() {
            if layer.lora.is_none() {
                let mut rng = Rng::fork(seed, 0x10_0000 + i as u64);
                adapters.push(Some(LoraAdapter::init(
                    &layer.name,
                    dim,
                    dim,
                    LORA_RANK,
                    &mut rng,
                )?));
            } else {
                adapters.push(None);
            }
        }
        self.variant = match self.variant {
            Variant::HalfPrecision | Variant::Lora => Variant::Lora,
            Variant::LowPrecision | Variant::Qlora => Variant::Qlora,
            v => v,
        };
        for (layer, adapter) in self.linears_mut().zip(adapters) {
            for p in layer.params() {
                p.set_requires_grad(false);
            }
            if let Some(adapter) = adapter {
                layer.lora = Some(adapter);
            }
        }
        for n in &self.norms {
            n.weight.set_requires_grad(false);
            n.bias.set_requires_grad(false);
        }
        Ok(())
    }
}

/// An [`Error::Model`] naming the part unless linear `layer` fits width `dim`: weight
/// `[dim, dim]`, bias (if any) `[dim]`, adapter (if any) `A` `[r, dim]` and `B` `[dim, r]`.
fn check_linear_part(layer: &Linear, dim: usize) -> Result<()> {
    let bad = |part: &str, shape: &[usize], expected: String| Error::Model {
        what: format!(
            "`{}.{part}` has shape {shape:?}, expected {expected} (the model's width is {dim})",
            layer.name
        ),
    };
    let weight: Vec<usize> = match &layer.base {
        LinearBase::Trainable { weight, .. } => weight.value().shape().to_vec(),
        LinearBase::Frozen { weight, .. } => {
            let m = weight.matrix();
            vec![m.out_features(), m.in_features()]
        }
    };
    if weight != [dim, dim] {
        return Err(bad("weight", &weight, format!("[{dim}, {dim}]")));
    }
    let bias = match &layer.base {
        LinearBase::Trainable { bias, .. } => bias.as_ref().map(|b| b.value().shape().to_vec()),
        LinearBase::Frozen { bias, .. } => bias.as_ref().map(|b| vec![b.len()]),
    };
    if let Some(bias) = bias.filter(|b| b[..] != [dim]) {
        return Err(bad("bias", &bias, format!("[{dim}]")));
    }
    if let Some(lora) = &layer.lora {
        let a = lora.a.value().shape().to_vec();
        let b = lora.b.value().shape().to_vec();
        let rank = match a[..] {
            [r, i] if r >= 1 && i == dim => r,
            _ => return Err(bad("lora_a.weight", &a, format!("[r, {dim}] with r >= 1"))),
        };
        if b != [dim, rank] {
            return Err(bad("lora_b.weight", &b, format!("[{dim}, {rank}]")));
        }
    }
    Ok(())
}

/// One block on a tape: `Linear → ReLU → Linear → ReLU → Linear`, plus the block's input, then
/// the LayerNorm after it (if any).
fn block_forward(
    tape: &Tape,
    layers: &[Linear; LAYERS_PER_BLOCK],
    norm: Option<&Norm>,
    h: &Var,
) -> Result<Var> {
    let y = layers[2].forward(tape, &first_layers(tape, layers, h)?)?;
    let out = tape.add_owned(y, h)?;
    match norm {
        Some(norm) => Ok(tape.layer_norm(&out, &norm.weight, &norm.bias, NORM_EPS)?),
        None => Ok(out),
    }
}

/// A block's first two layers, each followed by ReLU, on the block's input `h`.
fn first_layers(tape: &Tape, layers: &[Linear; LAYERS_PER_BLOCK], h: &Var) -> Result<Var> {
    // Each ReLU in the buffer of the layer output it follows (no record keeps those).
    let r1 = tape.relu_owned(layers[0].forward(tape, h)?)?;
    let y = layers[1].forward(tape, &r1)?;
    // Freed (unless a record keeps it) before the second ReLU runs.
    drop(r1);
    Ok(tape.relu_owned(y)?)
}

/// A checkpointed segment of [`BigNet::forward_with`]: the LayerNorm `norm_before` (if any) of
/// the previous block's residual sum `sum`, then the block up to its own residual sum, and the
/// LayerNorm `norm_after` if given (the same ops in the same order as [`block_forward`]).
fn segment_forward(
    tape: &Tape,
    layers: &[Linear; LAYERS_PER_BLOCK],
    norm_before: Option<&Norm>,
    norm_after: Option<&Norm>,
    sum: &Var,
) -> Result<Var> {
    block_forward(
        tape,
        layers,
        norm_after,
        &segment_input(tape, norm_before, sum)?,
    )
}

/// [`segment_forward`] as the backward recomputes it: the same records; without `norm_after`
/// the third layer's product and the residual sum, whose outputs the backward does not read,
/// are not computed (the LayerNorm's backward reads its input, the residual sum).
fn segment_pending(
    tape: &Tape,
    layers: &[Linear; LAYERS_PER_BLOCK],
    norm_before: Option<&Norm>,
    norm_after: Option<&Norm>,
    sum: &Var,
) -> Result<Pending> {
    let h = segment_input(tape, norm_before, sum)?;
    if norm_after.is_some() {
        return Ok(block_forward(tape, layers, norm_after, &h)?.into());
    }
    let y = layers[2].forward_pending(tape, &first_layers(tape, layers, &h)?)?;
    Ok(tape.add_pending(y, &h)?)
}

/// The input of a segment's block: the previous block's residual sum, normalized by the
/// LayerNorm between them (block 0 takes the model's input as it is).
fn segment_input(tape: &Tape, norm_before: Option<&Norm>, sum: &Var) -> Result<Var> {
    match norm_before {
        Some(norm) => Ok(tape.layer_norm(sum, &norm.weight, &norm.bias, NORM_EPS)?),
        None => Ok(sum.clone()),
    }
}
