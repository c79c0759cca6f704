//! Low-memory inference: the batch runs through the network in row chunks, and every op that
//! needs no gradient works in place. The output tensor doubles as the residual stream (each
//! chunk's rows start as a copy of its input rows; the residual add and the LayerNorm write into
//! them), and two chunk-sized buffers take turns as the linear layers' inputs and outputs (the
//! bias is written into the buffer, the product accumulated onto it, ReLU applied in place). So
//! a batch holds its output plus `2 · chunk_rows · dim` floats, whatever its size.
//!
//! Each op is the one [`BigNet::forward`](crate::BigNet::forward) records, on the same values, so
//! the output is the same bit for bit. Chunks have at least [`MIN_CHUNK_ROWS`] rows, where every
//! kind of weight multiplies through its GEMM, whose per-element sums do not depend on the
//! number of rows: a row's output is the same in any chunk (tests/low_memory.rs checks it).
//!
//! A single row on a pool of two threads or more runs on a *team* instead
//! ([`nibble_tensor::team`]): the pool is entered once and every thread computes its blocks of
//! rows of each layer, meeting the others at a spin barrier after each layer, in place of a
//! fork-join of the pool per layer (on the 16-core Xeon: BigNet at batch 1 0.50 against 0.73–0.78
//! ms). Same kernels, same operands, same bits. A member done with its own blocks of a layer's
//! rows takes blocks that a slower one has not started ([`Member::claim_blocks`]): on the Xeon
//! the slowest member's share of a layer took 21–24 µs where the mean took 16–18
//! (`examples/team_anatomy.rs`, 18 packed f32 layers: 0.47–0.51 ms a forward with fixed
//! blocks, 0.41–0.43 balanced; `bignet bench bignet` at batch 1 0.66–0.69 against 0.51–0.57
//! ms, three rounds in turns, 2026-12-04 21:27 UTC).
//!
//! Tried on the 16-core Xeon and not kept: members prefetching their rows of the next layer
//! into L2 while they wait at each barrier (BigNet at batch 1 1.03–1.21 ms against 0.54–0.56,
//! 20:49 and 21:19 UTC: the early members' prefetches slowed the late ones, whose share sets the
//! layer's time); and a 1024-row batch of packed f32 layers split into 16
//! row ranges, each run through all 18 layers by one thread with its GEMMs on that thread alone
//! (no fork-join per layer, each thread's activations staying in its caches): 33.4–37.8 ms
//! against 30.9–34.4 for the whole batch through the parallel GEMM, three rounds in turns
//! (2026-12-04 21:19 UTC); each thread then reads every packed weight from L3 for 64 rows.

use crate::error::Result;
use crate::layer::{FrozenBias, Linear, LinearBase};
use crate::model::{Norm, NORM_EPS};
use crate::source::LAYERS_PER_BLOCK;
use half::slice::HalfFloatSliceExt;
use nibble_tensor::gemm::MatRef;
use nibble_tensor::layernorm::{add_layer_norm_assign, layer_norm_assign};
use nibble_tensor::lowrank::LowRank;
use nibble_tensor::ops::{
    add_in_place, fill_rows, relu_in_place, scale_shift_rows, zeros_vec, PostOp,
};
use nibble_tensor::team::{self, block_rows, Member, SharedRows};
use nibble_tensor::weight::{dense_batch1_rows, Batch1Rows, BATCH1_ROW_ALIGN};
use nibble_tensor::{f16, linear_low_rank_into, Tensor, TensorError, WeightMatrix};
use std::ops::Range;
use std::sync::{Arc, RwLockReadGuard};

/// Rows per chunk of low-memory inference (`NIBBLE_INFER_CHUNK_ROWS=112`, or
/// [`BigNet::infer_chunked`](crate::BigNet::infer_chunked)): a 1024-row batch runs in 10 chunks
/// of 102 or 103 rows, and at D = 1024 holds its 4 MiB output and two 412 KiB buffers. It is not
/// the default: each chunk packs or dequantizes every weight again for its GEMM and pays the
/// GEMM's fork-joins again, which doubled BigNet's batch-1024 forward on 16 threads (16-core
/// Xeon, bignet: 118.8 ms in chunks of 112 rows against 59.3 ms whole; low_precision 122.6
/// against 57.5 ms).
pub const LOW_MEMORY_CHUNK_ROWS: usize = 112;

/// The smallest chunk size one may ask for. Chunks are split evenly, so each has more than
/// half the size asked for: 48 rows or more, where f32, f16 and quantized weights all multiply
/// through the GEMM (below, batches take GEMV or tile kernels whose sums run in another order),
/// so a chunked batch gives the whole batch's output bit for bit. Smaller requests are raised
/// to it.
pub const MIN_CHUNK_ROWS: usize = 96;

/// The chunk size [`BigNet::infer`](crate::BigNet::infer) uses: `NIBBLE_INFER_CHUNK_ROWS` when
/// it is set to a number (raised to [`MIN_CHUNK_ROWS`]; [`LOW_MEMORY_CHUNK_ROWS`] keeps a
/// 1024-row forward under 5 MB at D = 1024), else the whole batch in one chunk (`usize::MAX`),
/// which still works in place (its output and two batch-sized buffers). Read once per process;
/// an unparsable value is reported on stderr and ignored.
pub fn chunk_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| match std::env::var("NIBBLE_INFER_CHUNK_ROWS") {
        Err(_) => usize::MAX,
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) => n.max(MIN_CHUNK_ROWS),
            Err(_) => {
                eprintln!(
                    "nibble: NIBBLE_INFER_CHUNK_ROWS={v:?} is not a row count; running batches whole"
                );
                usize::MAX
            }
        },
    })
}

/// The row ranges a batch of `batch` rows runs in: `⌈batch / chunk_rows⌉` chunks of nearly
/// equal size (`chunk_rows` at least [`MIN_CHUNK_ROWS`]), each of at most `chunk_rows` rows
/// and, when there are several, more than `chunk_rows / 2`.
pub fn chunk_ranges(batch: usize, chunk_rows: usize) -> Vec<(usize, usize)> {
    let rows = chunk_rows.max(MIN_CHUNK_ROWS);
    let chunks = batch.div_ceil(rows).max(1);
    (0..chunks)
        .map(|c| (batch * c / chunks, batch * (c + 1) / chunks))
        .collect()
}

/// The chunked, in-place forward of BigNet's `blocks` and `norms` on `x` `[batch, dim]`.
pub(crate) fn forward_in_place(
    blocks: &[Arc<[Linear; LAYERS_PER_BLOCK]>],
    norms: &[Norm],
    x: &Tensor,
    chunk_rows: usize,
) -> Result<Tensor> {
    let (batch, dim) = x.dims2("BigNet inference")?;
    let mut out = x.clone();
    if batch == 1 && batch1_team_enabled() {
        match forward_batch1_team(blocks, norms, x.data(), out.data_mut()) {
            Some(Ok(())) => return Ok(out),
            Some(Err(e)) => return Err(e),
            // The team did not run (or stopped to leave it to the ordinary path): start over.
            None => out.data_mut().copy_from_slice(x.data()),
        }
    }
    let ranges = chunk_ranges(batch, chunk_rows);
    let widest = ranges.iter().map(|(a, b)| b - a).max().unwrap_or(0);
    let rank = blocks
        .iter()
        .flat_map(|b| b.iter())
        .filter_map(|l| l.lora.as_ref().map(|a| a.rank()))
        .max()
        .unwrap_or(0);
    // Cleared in parallel (calloc clears reused memory with one serial memset).
    let mut buffers = InferBuffers {
        a: zeros_vec(widest * dim),
        b: zeros_vec(widest * dim),
        layer: LayerScratch {
            lora: vec![0.0; widest * rank],
            bias: Vec::new(),
        },
    };
    for (start, end) in ranges {
        let rows = &mut out.data_mut()[start * dim..end * dim];
        for (b, block) in blocks.iter().enumerate() {
            run_block(block, norms.get(b), rows, end - start, &mut buffers)?;
        }
    }
    Ok(out)
}

/// Reused across chunks and layers: the two layer outputs taking turns, and a layer's own.
struct InferBuffers {
    a: Vec<f32>,
    b: Vec<f32>,
    layer: LayerScratch,
}

/// What [`linear_into`] holds besides its input and output.
struct LayerScratch {
    /// An adapter's `h = x · Aᵀ`.
    lora: Vec<f32>,
    /// An f16 bias widened to f32.
    bias: Vec<f32>,
}

/// One block on `m` rows of the residual stream `h`, in place.
fn run_block(
    layers: &[Linear; LAYERS_PER_BLOCK],
    norm: Option<&Norm>,
    h: &mut [f32],
    m: usize,
    buf: &mut InferBuffers,
) -> Result<()> {
    let n = h.len();
    let (a, b) = (&mut buf.a[..n], &mut buf.b[..n]);
    // The ReLUs run inside the products (each task's tile of outputs once its sums are in).
    let s = &mut buf.layer;
    linear_into(&layers[0], h, m, a, s, PostOp::Relu)?;
    linear_into(&layers[1], a, m, b, s, PostOp::Relu)?;
    linear_into(&layers[2], b, m, a, s, PostOp::Identity)?;
    match norm {
        Some(norm) => {
            let (w, bias) = (norm.weight.value(), norm.bias.value());
            add_layer_norm_assign(h, a, w.numel(), w.data(), bias.data(), NORM_EPS)?;
        }
        None => add_in_place(h, a)?,
    }
    Ok(())
}

/// The error of a BigNet layer without a bias (BigNet's layers all have one; a model built
/// otherwise reaches here only through the public layer types).
fn missing_bias(layer: &Linear) -> crate::error::Error {
    crate::error::Error::Model {
        what: format!(
            "layer {} has no bias; every BigNet linear layer has one",
            layer.name
        ),
    }
}

/// `y = post(x · Wᵀ + b (+ B(A x)))` for `m` rows into `y`, as [`Linear::forward`] and the
/// step after it compute it: `y` starts as the bias rows, the product accumulates onto them,
/// then the adapter's, then `post` (through the GEMM, all four in one pass over `y`). At batch 1
/// the adapter's products run inside the base product's parallel pass
/// ([`WeightMatrix::matvec_t_low_rank`]: the same values, without the two fork-joins of the
/// pool that they would take on their own).
fn linear_into(
    layer: &Linear,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    scratch: &mut LayerScratch,
    post: PostOp,
) -> Result<()> {
    let wide_bias = &mut scratch.bias;
    // The guards and the handle that the weight and bias borrow from.
    let (trained, frozen);
    let (weight, bias): (&dyn WeightMatrix, &[f32]) = match &layer.base {
        LinearBase::Trainable {
            weight,
            bias: Some(bias),
        } => {
            trained = (weight.value(), bias.value());
            (&*trained.0, trained.1.data())
        }
        LinearBase::Trainable { bias: None, .. } | LinearBase::Frozen { bias: None, .. } => {
            return Err(missing_bias(layer));
        }
        LinearBase::Frozen {
            weight,
            bias: Some(bias),
        } => {
            frozen = weight.matrix();
            let bias: &[f32] = match bias {
                FrozenBias::F32(b) => b,
                FrozenBias::F16(b) => {
                    // The slice conversion runs F16C 8 lanes at a time where the CPU has it:
                    // 0.3-0.7 µs for 1024 values, against 2.6-3.8 µs one value at a time (18
                    // layers a forward).
                    wide_bias.resize(b.len(), 0.0);
                    b.convert_to_f32_slice(wide_bias);
                    wide_bias
                }
            };
            (&*frozen, bias)
        }
    };
    let Some(adapter) = &layer.lora else {
        let bias_row = MatRef::row_major(bias, 1, bias.len())?;
        weight.matmul_t_fused(x, m, y, Some(&bias_row), None, post)?;
        return Ok(());
    };
    // Before A and B are read: the norms it may compute again read them too.
    let dora_scale = layer.dora_scale()?;
    let (a, b) = (adapter.a.value(), adapter.b.value());
    if let Some(scale) = dora_scale {
        // DoRA: `post(bias + scale ⊙ (x·Wᵀ + (x·Aᵀ)·Bᵀ))`, the ops of `Linear::forward`'s
        // DoRA path (the product without its bias, then `tape.scale_by_magnitude`), on the
        // same values.
        let r = adapter.rank();
        let h = &mut scratch.lora[..m * r];
        a.matmul_t(x, m, h, false)?;
        linear_low_rank_into(weight, x, m, y, None, (h, &*b), PostOp::Identity)?;
        scale_shift_rows(y, &scale, bias)?;
        post.apply_in_place(y);
        return Ok(());
    }
    if m == 1 {
        fill_rows(y, bias)?;
        weight.matvec_t_low_rank(x, y, true, &LowRank::new(&a, &b)?)?;
        post.apply_in_place(y);
        return Ok(());
    }
    // Small batches on a quantized weight's GEMVs: the adapter's products and `post` inside
    // the base product's pass (the bits of the sequence below); with int8 activations on its
    // integer GEMM, the adapter's `x · Aᵀ` on the layer's int8 x (`act8::adapter`).
    if weight.matmul_t_low_rank(x, m, y, Some(bias), &LowRank::new(&a, &b)?, post)? {
        return Ok(());
    }
    // h = A x first, then the bias, the base product and B h in one pass over y where they
    // run through the GEMM (y stays in the caches of the thread that owns each tile; the same
    // bits as the parts in order, and as the training forward's `linear_low_rank_into`).
    let r = adapter.rank();
    let h = &mut scratch.lora[..m * r];
    a.matmul_t(x, m, h, false)?;
    linear_low_rank_into(weight, x, m, y, Some(bias), (h, &*b), post)?;
    Ok(())
}

/// Peak bytes above what was held before of [`BigNet::infer_chunked`](crate::BigNet::infer_chunked)
/// on `x` in chunks of `chunk_rows` (`usize::MAX`: the whole batch, as `infer` runs by default),
/// measured by the counting allocator after a warm-up forward on every worker thread of the
/// pool: the GEMM keeps its packing buffers (at D = 1024, 1 MiB of packed weight on the
/// calling thread and some KiB of packed rows per worker) from call to call, like a GPU library's workspace, so they are not counted against one forward.
pub fn measure_forward_bytes(
    model: &crate::BigNet,
    x: &Tensor,
    chunk_rows: usize,
) -> Result<usize> {
    rayon::broadcast(|_| model.infer_chunked(x, chunk_rows).map(drop))
        .into_iter()
        .collect::<Result<()>>()?;
    let (y, bytes) = crate::memory::measure_peak(|| model.infer_chunked(x, chunk_rows));
    drop(y?);
    Ok(bytes)
}

/// Whether a batch of one row runs as a team (the module docs; [`crate::BigNet::infer_on_team`]): yes unless
/// `NIBBLE_BATCH1_TEAM=0` (read once; for comparing the two paths, which give the same bits).
pub fn batch1_team_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("NIBBLE_BATCH1_TEAM").map_or(true, |v| v.trim() != "0"))
}

/// Whether `bignet bench` and `bignet forward` pack f32 weights for inference
/// ([`crate::BigNet::pack_for_inference`]): yes unless `NIBBLE_PACK_WEIGHTS=0` (read once; for
/// comparing packed and unpacked weights in one session).
pub fn pack_weights_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("NIBBLE_PACK_WEIGHTS").map_or(true, |v| v.trim() != "0"))
}

/// One linear layer as the members of a team read it.
struct LayerView<'a> {
    weight: &'a dyn WeightMatrix,
    bias: BiasView<'a>,
    /// A LoRA adapter's `A` `[r, in]` and `B` `[out, r]`.
    adapter: Option<(&'a Tensor, &'a Tensor)>,
    /// A DoRA adapter's scale and the bias in f32 (`[out]` each): the rows are
    /// `post(scale ⊙ (x·Wᵀ + B (A x)) + bias)`, the bias added after the scale.
    dora: Option<(&'a [f32], &'a [f32])>,
}

/// A layer's bias, in its stored precision.
#[derive(Clone, Copy)]
enum BiasView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl BiasView<'_> {
    /// Writes the bias's elements `rows` into `y` as f32 (f16 widened exactly).
    fn write(self, rows: Range<usize>, y: &mut [f32]) {
        match self {
            BiasView::F32(b) => y.copy_from_slice(&b[rows]),
            BiasView::F16(b) => b[rows].convert_to_f32_slice(y),
        }
    }

    fn len(self) -> usize {
        match self {
            BiasView::F32(b) => b.len(),
            BiasView::F16(b) => b.len(),
        }
    }
}

/// What the guards of one layer's parameters hold while a team reads them.
enum HeldBase<'a> {
    Trainable(RwLockReadGuard<'a, Tensor>, RwLockReadGuard<'a, Tensor>),
    Frozen(Arc<dyn WeightMatrix>, &'a FrozenBias),
}

/// Why a team stopped early.
enum TeamStop {
    /// Another member failed.
    Aborted,
    /// A layer has no batch-1 row kernel here: the ordinary path runs instead.
    Fallback,
    /// A kernel reported an error.
    Compute(TensorError),
}

impl From<team::Aborted> for TeamStop {
    fn from(_: team::Aborted) -> Self {
        TeamStop::Aborted
    }
}

impl From<TensorError> for TeamStop {
    fn from(e: TensorError) -> Self {
        TeamStop::Compute(e)
    }
}

/// A batch of one row through BigNet on a team of the pool's threads ([`nibble_tensor::team`]):
/// the pool is entered once, and the members compute their blocks of each layer's rows
/// ([`WeightMatrix::batch1_rows`]), meeting at a barrier after each layer (and between a LoRA
/// adapter's `A x` and its `B h`). Each member keeps the residual stream whole, so the
/// residual add needs no barrier of its own and each computes the LayerNorm of the whole row
/// itself (a few µs; a barrier less). Every value is the one the ordinary path computes, with
/// the same kernels on the same operands (the product rows by [`Batch1Rows`], then the
/// adapter's rows, then ReLU or the residual add, then the LayerNorm): the same bits.
///
/// Writes `x`'s output into `out` (`[dim]`, holding `x` on entry). `None` when the team did
/// not run or stopped to leave the batch to the ordinary path (a layer without a batch-1 row
/// kernel, shapes the ordinary path should report);
/// `out` may then be overwritten.
pub(crate) fn forward_batch1_team(
    blocks: &[Arc<[Linear; LAYERS_PER_BLOCK]>],
    norms: &[Norm],
    x: &[f32],
    out: &mut [f32],
) -> Option<Result<()>> {
    let dim = x.len();
    // A DoRA layer's scale and f32 bias, before any guard of A or B is held (its norms read
    // them); a scale that is an error leaves the batch to the ordinary path, which reports it.
    let doras: Vec<Option<(Vec<f32>, Vec<f32>)>> = blocks
        .iter()
        .flat_map(|b| b.iter())
        .map(|layer| match layer.dora_scale() {
            Ok(None) => Some(None),
            Ok(Some(scale)) => Some(Some((scale, layer.bias_values()?))),
            Err(_) => None,
        })
        .collect::<Option<_>>()?;
    let held: Vec<(HeldBase<'_>, Option<_>)> = blocks
        .iter()
        .flat_map(|b| b.iter())
        .map(|layer| {
            let base = match &layer.base {
                LinearBase::Trainable { weight, bias } => {
                    HeldBase::Trainable(weight.value(), bias.as_ref()?.value())
                }
                LinearBase::Frozen { weight, bias } => {
                    HeldBase::Frozen(weight.matrix(), bias.as_ref()?)
                }
            };
            let adapter = layer.lora.as_ref().map(|a| (a.a.value(), a.b.value()));
            Some((base, adapter))
        })
        // A layer without a bias (never in a BigNet) takes the ordinary path, which reports it.
        .collect::<Option<_>>()?;
    let views: Vec<LayerView<'_>> = held
        .iter()
        .zip(&doras)
        .map(|((base, adapter), dora)| {
            let (weight, bias): (&dyn WeightMatrix, BiasView<'_>) = match base {
                HeldBase::Trainable(w, b) => (&**w, BiasView::F32(b.data())),
                HeldBase::Frozen(w, FrozenBias::F32(b)) => (&**w, BiasView::F32(b)),
                HeldBase::Frozen(w, FrozenBias::F16(b)) => (&**w, BiasView::F16(b)),
            };
            LayerView {
                weight,
                bias,
                adapter: adapter.as_ref().map(|(a, b)| (&**a, &**b)),
                dora: dora.as_ref().map(|(s, b)| (&s[..], &b[..])),
            }
        })
        .collect();
    // The ordinary path reports shapes that do not chain.
    let mut width = dim;
    let mut widest = dim;
    let mut rank = 0;
    for v in &views {
        let (o, i) = (v.weight.out_features(), v.weight.in_features());
        if i != width || v.bias.len() != o {
            return None;
        }
        if v.dora.is_some_and(|(s, b)| s.len() != o || b.len() != o)
            || (v.dora.is_some() && v.adapter.is_none())
        {
            return None;
        }
        if let Some((a, b)) = v.adapter {
            let (r, ai) = a.dims2("lora A").ok()?;
            if ai != i || b.dims2("lora B").ok()? != (o, r) {
                return None;
            }
            rank = rank.max(r);
        }
        width = o;
        widest = widest.max(o);
    }
    let norm_held: Vec<_> = norms
        .iter()
        .map(|n| (n.weight.value(), n.bias.value()))
        .collect();
    if width != dim
        || out.len() != dim
        || norm_held
            .iter()
            .any(|(w, b)| w.numel() != dim || b.numel() != dim)
    {
        return None;
    }
    let (mut a, mut b, mut h) = (
        vec![0.0f32; widest],
        vec![0.0f32; widest],
        vec![0.0f32; rank],
    );
    let bufs = TeamBuffers {
        a: SharedRows::new(&mut a),
        b: SharedRows::new(&mut b),
        h: SharedRows::new(&mut h),
        out: SharedRows::new(out),
    };
    let mode = nibble_quant::act8::activations();
    let ran = team::run(|member| {
        nibble_quant::act8::with_activations(mode, || {
            member_forward(member, &views, &norm_held, x, &bufs)
        })
    })?;
    match ran {
        Ok(()) => Some(Ok(())),
        Err(TeamStop::Compute(e)) => Some(Err(e.into())),
        Err(TeamStop::Aborted | TeamStop::Fallback) => None,
    }
}

/// The buffers a team shares: two layer outputs taking turns, an adapter's `h = A x`, and
/// the output (the residual stream after each block).
struct TeamBuffers<'a> {
    a: SharedRows<'a>,
    b: SharedRows<'a>,
    h: SharedRows<'a>,
    out: SharedRows<'a>,
}

/// One member's part of [`forward_batch1_team`].
fn member_forward(
    member: &Member<'_>,
    layers: &[LayerView<'_>],
    norms: &[(RwLockReadGuard<'_, Tensor>, RwLockReadGuard<'_, Tensor>)],
    x: &[f32],
    bufs: &TeamBuffers<'_>,
) -> std::result::Result<(), TeamStop> {
    let dim = x.len();
    // This member's copy of the block input (the residual stream), whole.
    let mut resid = x.to_vec();
    let blocks = layers.len() / LAYERS_PER_BLOCK;
    for (bi, block) in layers.chunks_exact(LAYERS_PER_BLOCK).enumerate() {
        team_linear(member, &block[0], &resid, &bufs.a, &bufs.h, Post::Relu)?;
        member.wait()?;
        // SAFETY: every member wrote its rows of `a` before the barrier; `a` is written again
        // only after the barrier that ends the next layer.
        let a = unsafe { bufs.a.read() };
        team_linear(
            member,
            &block[1],
            &a[..dim_of(&block[0])],
            &bufs.b,
            &bufs.h,
            Post::Relu,
        )?;
        member.wait()?;
        // SAFETY: as above, for `b`.
        let b = unsafe { bufs.b.read() };
        let post = Post::Residual(&resid);
        team_linear(
            member,
            &block[2],
            &b[..dim_of(&block[1])],
            &bufs.out,
            &bufs.h,
            post,
        )?;
        member.wait()?;
        let norm = norms.get(bi);
        if bi + 1 < blocks || norm.is_some() {
            // SAFETY: every member wrote its rows of `out` before the barrier; they are
            // written again only after two more barriers (the next block's first layers).
            resid.copy_from_slice(unsafe { bufs.out.read() });
            if let Some((w, bias)) = norm {
                layer_norm_assign(&mut resid, dim, w.data(), bias.data(), NORM_EPS)?;
                if bi + 1 == blocks {
                    // A norm after the last block: its rows into the output.
                    for rows in member.blocks(dim, block_rows(dim, member.threads(), 1)) {
                        // SAFETY: each member writes its own blocks; every read of `out`
                        // happened above, and nothing reads it until the team ends.
                        unsafe { bufs.out.rows_mut(rows.clone()) }.copy_from_slice(&resid[rows]);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether a batch-1 team balances each layer's rows among its members
/// ([`Member::claim_blocks`]: a member done with its own blocks takes blocks that a slower one
/// has not started) rather than giving each member fixed blocks: yes unless
/// `NIBBLE_TEAM_BALANCE=0` (read once; for comparing, the bits are the same either way).
pub fn team_balance_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("NIBBLE_TEAM_BALANCE").map_or(true, |v| v.trim() != "0"))
}

/// A layer's output width.
fn dim_of(layer: &LayerView<'_>) -> usize {
    layer.weight.out_features()
}

/// What follows a layer's product on each of its rows.
#[derive(Clone, Copy)]
enum Post<'a> {
    Relu,
    /// The residual add: `y = resid + y` (the residual stream's rows).
    Residual(&'a [f32]),
}

impl Post<'_> {
    fn apply(self, rows: Range<usize>, y: &mut [f32]) -> std::result::Result<(), TeamStop> {
        match self {
            Post::Relu => relu_in_place(y),
            Post::Residual(resid) => add_in_place(y, &resid[rows])?,
        }
        Ok(())
    }
}

/// One member's rows of `y = bias + x · Wᵀ (+ B (A x))` (with DoRA `scale ⊙ (x · Wᵀ + B (A x))
/// + bias`), then `post`, as [`linear_into`] and
/// [`run_block`] compute them: the bias, the product accumulated onto it, then (after a
/// barrier, once every member's rows of `h = A x` are in) the adapter's `B h`. A member
/// computes its rows of `h` first and arrives at that barrier before its base product, so the
/// others' rows of `h` are in by the time it waits there.
fn team_linear(
    member: &Member<'_>,
    layer: &LayerView<'_>,
    x: &[f32],
    y: &SharedRows<'_>,
    h: &SharedRows<'_>,
    post: Post<'_>,
) -> std::result::Result<(), TeamStop> {
    let out = layer.weight.out_features();
    let block = block_rows(out, member.threads(), BATCH1_ROW_ALIGN);
    let arrival = match layer.adapter {
        Some((a, _)) => {
            let rank = a.shape()[0];
            let a_rows = dense_batch1_rows(a, x).ok_or(TeamStop::Fallback)?;
            // Shared out, then a barrier: every member computing all of a rank-32 `h` itself
            // (no barrier) measured slower on the 16-core Xeon (qlora at batch 1 0.54–0.58 ms
            // against 0.46–0.50, 2026-12-03 21:55 UTC), each member then reading all of A.
            for rows in member.blocks(rank, BATCH1_ROW_ALIGN) {
                // SAFETY: this member's rows of h; h was last read before the previous
                // barrier.
                a_rows.rows(rows.clone(), unsafe { h.rows_mut(rows) }, false)?;
            }
            Some(member.arrive()?)
        }
        None => None,
    };
    let product = layer.weight.batch1_rows(x).ok_or(TeamStop::Fallback)?;
    // The blocks this member computed, for the adapter's `B h` on the same rows (the
    // thread's list, kept from layer to layer: no allocation per layer).
    let mut computed = COMPUTED_BLOCKS.take();
    computed.clear();
    let mut fixed = member.blocks(out, block);
    let mut claimed = team_balance_enabled().then(|| member.claim_blocks(out, block));
    let mut next_block = || match claimed.as_mut() {
        Some(claims) => claims.next(),
        None => fixed.next(),
    };
    while let Some(rows) = next_block() {
        // SAFETY: blocks of y that this member alone computes in this phase
        // (`claim_blocks` gives each to one member); y was last read before the barrier that
        // ended the layer before the previous one.
        let yr = unsafe { y.rows_mut(rows.clone()) };
        // A DoRA layer's bias comes after its scale.
        let onto_bias = layer.dora.is_none();
        if onto_bias {
            layer.bias.write(rows.clone(), yr);
        }
        product.rows(rows.clone(), yr, onto_bias)?;
        if layer.adapter.is_none() {
            post.apply(rows, yr)?;
        } else {
            computed.push(rows);
        }
    }
    let (Some((a, b)), Some(arrival)) = (layer.adapter, arrival) else {
        COMPUTED_BLOCKS.set(computed);
        return Ok(());
    };
    let rank = a.shape()[0];
    member.wait_for(arrival)?;
    // SAFETY: every member wrote its rows of h before arriving at the barrier just waited
    // for; h is written again only after the barrier that ends this layer.
    let hv = &unsafe { h.read() }[..rank];
    let b_rows = dense_batch1_rows(b, hv).ok_or(TeamStop::Fallback)?;
    for rows in computed.iter().cloned() {
        // SAFETY: the blocks of y this member computed above, its alone.
        let yr = unsafe { y.rows_mut(rows.clone()) };
        b_rows.rows(rows.clone(), yr, true)?;
        if let Some((scale, bias)) = layer.dora {
            scale_shift_rows(yr, &scale[rows.clone()], &bias[rows.clone()])?;
        }
        post.apply(rows, yr)?;
    }
    COMPUTED_BLOCKS.set(computed);
    Ok(())
}

thread_local! {
    /// [`team_linear`]'s list of the blocks a member computed, kept for its next layer.
    static COMPUTED_BLOCKS: std::cell::Cell<Vec<std::ops::Range<usize>>> =
        const { std::cell::Cell::new(Vec::new()) };
}
