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

use crate::error::Result;
use crate::layer::{FrozenBias, Linear, LinearBase};
use crate::model::{Norm, NORM_EPS};
use crate::source::LAYERS_PER_BLOCK;
use half::slice::HalfFloatSliceExt;
use nibble_tensor::gemm::{MatRef, Segment};
use nibble_tensor::layernorm::layer_norm_assign;
use nibble_tensor::lowrank::LowRank;
use nibble_tensor::ops::{add_in_place, fill_rows, relu_in_place};
use nibble_tensor::{Tensor, WeightMatrix};
use std::sync::Arc;

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
    let ranges = chunk_ranges(batch, chunk_rows);
    let widest = ranges.iter().map(|(a, b)| b - a).max().unwrap_or(0);
    let rank = blocks
        .iter()
        .flat_map(|b| b.iter())
        .filter_map(|l| l.lora.as_ref().map(|a| a.rank()))
        .max()
        .unwrap_or(0);
    let mut buffers = InferBuffers {
        a: vec![0.0; widest * dim],
        b: vec![0.0; widest * dim],
        lora: vec![0.0; widest * rank],
        bias: Vec::new(),
    };
    for (start, end) in ranges {
        let rows = &mut out.data_mut()[start * dim..end * dim];
        for (b, block) in blocks.iter().enumerate() {
            run_block(block, norms.get(b), rows, end - start, &mut buffers)?;
        }
    }
    Ok(out)
}

/// Reused across chunks and layers.
struct InferBuffers {
    a: Vec<f32>,
    b: Vec<f32>,
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
    linear_into(&layers[0], h, m, a, &mut buf.lora, &mut buf.bias)?;
    relu_in_place(a);
    linear_into(&layers[1], a, m, b, &mut buf.lora, &mut buf.bias)?;
    relu_in_place(b);
    linear_into(&layers[2], b, m, a, &mut buf.lora, &mut buf.bias)?;
    add_in_place(h, a)?;
    if let Some(norm) = norm {
        let (w, bias) = (norm.weight.value(), norm.bias.value());
        layer_norm_assign(h, w.numel(), w.data(), bias.data(), NORM_EPS)?;
    }
    Ok(())
}

/// `y = x · Wᵀ + b (+ B(A x))` for `m` rows into `y`, as [`Linear::forward`] computes it: `y`
/// starts as the bias rows, the product accumulates onto them, then the adapter's (through the
/// GEMM, all three in one pass over `y`). At batch 1
/// the adapter's products run inside the base product's parallel pass
/// ([`WeightMatrix::matvec_t_low_rank`]: the same values, without the two fork-joins of the
/// pool that they would take on their own).
fn linear_into(
    layer: &Linear,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    lora: &mut [f32],
    wide_bias: &mut Vec<f32>,
) -> Result<()> {
    // The guards and the handle that the weight and bias borrow from.
    let (trained, frozen);
    let (weight, bias): (&dyn WeightMatrix, &[f32]) = match &layer.base {
        LinearBase::Trainable { weight, bias } => {
            trained = (weight.value(), bias.value());
            (&*trained.0, trained.1.data())
        }
        LinearBase::Frozen { weight, bias } => {
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
    let bias_row = MatRef::row_major(bias, 1, bias.len())?;
    let Some(adapter) = &layer.lora else {
        weight.matmul_t_fused(x, m, y, Some(&bias_row), None)?;
        return Ok(());
    };
    if m == 1 {
        fill_rows(y, bias)?;
        let (a, b) = (adapter.a.value(), adapter.b.value());
        weight.matvec_t_low_rank(x, y, true, &LowRank::new(&a, &b)?)?;
        return Ok(());
    }
    // h = A x first, then the bias, the base product and B h in one pass over y where they
    // run through the GEMM (y stays in the caches of the thread that owns each tile; the same
    // bits as the parts in order: `matmul_t_fused`).
    let (a, b) = (adapter.a.value(), adapter.b.value());
    let r = adapter.rank();
    let h = &mut lora[..m * r];
    a.matmul_t(x, m, h, false)?;
    let h = &*h;
    match b.gemm_rhs(m) {
        Some(b_t) => weight.matmul_t_fused(
            x,
            m,
            y,
            Some(&bias_row),
            Some(Segment {
                a: MatRef::row_major(h, m, r)?,
                b: &*b_t,
            }),
        )?,
        None => {
            weight.matmul_t_fused(x, m, y, Some(&bias_row), None)?;
            b.matmul_t(h, m, y, true)?;
        }
    }
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
