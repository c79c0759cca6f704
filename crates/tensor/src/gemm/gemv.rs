//! Small-batch products `y[m, out] (+)= x[m, in] · Wᵀ` computed straight from a row-major
//! `W[out, in]` as row-wise dot products (no packing): the linear layer's forward pass for a
//! batch of 1..=[`GEMV_MAX_M`] rows. Up to 4 rows of x share one pass over W; larger batches
//! take one pass per 4 rows, which still beats packing W for the GEMM up to about 16 rows.
//!
//! Parallel over blocks of output rows with rayon, for products of at least
//! [`PARALLEL_MIN_MACS`] multiply-adds; each output is one dot product with a fixed summation
//! order, so results are bit-identical for any thread count.

use super::pack::BElem;
use crate::cpu::KernelPath;
use crate::error::{Result, TensorError};
use crate::lowrank::LowRank;
use crate::parallel::PARALLEL_MIN_MACS;
use half::f16;
use std::mem::MaybeUninit;

/// Largest batch `m` for which [`crate::WeightMatrix::matmul_t`] on dense weights uses these
/// row-wise kernels instead of the packed GEMM, whose cost at small batches is mostly packing
/// all of W. Measured on 2 threads, 1024² f32 (GEMV / GEMM): m = 8 0.33 / 0.60 ms, m = 12
/// 0.51 / 0.60 ms, m = 16 0.62–0.69 / 0.80 ms (f16 0.75–0.79 / 0.80 ms), m = 24 0.95–1.08 /
/// 0.95 ms.
pub const GEMV_MAX_M: usize = 16;

/// Largest batch for which [`crate::WeightMatrix::matmul_t`] on dense weights with fewer than
/// [`GEMV_LONG_ROWS`] inputs uses these kernels: short rows (a LoRA adapter's `B`, `[1024, r]`)
/// leave each output's dot product too little to do next to its horizontal sum. 2 threads of
/// the 2-core Xeon (2026-12-05, medians of 31, GEMV / GEMM, µs): `[1024, 32]` m = 8 18.5 /
/// 12.5–16.5, 12 29 / 16–19, 15 68–69 / 15–18, 16 80 / 14–17; `[1024, 256]` m = 8 42 / 50, 12
/// 62–64 / 67–94, 15 119–123 / 68–77; `[1024, 1024]` m = 16 269–270 / 395–441.
pub const GEMV_MAX_M_SHORT_ROWS: usize = 8;

/// Inputs from which a dense W's rows count as long for [`gemv_fits`].
pub const GEMV_LONG_ROWS: usize = 512;

/// Largest batch for which [`crate::WeightMatrix::matmul_t`] on an f16 W uses these kernels
/// ([`gemv_fits_f16`]). The f16 kernel reads W once per 4 vectors and converts it each time;
/// past 12 vectors the GEMM, which widens W once as it packs it, is faster. BigNet
/// `half_precision`, 2 threads of the 2-core Xeon, three rounds in turns (2026-12-05, ms,
/// GEMV / GEMM): batch 9 3.7–4.1 / 4.0–4.5, 12 4.3–5.0 / 4.2–4.6, 15 6.9–7.5 / 4.6–5.1, 16
/// 7.5–8.5 / 4.1–5.1. Again after the GEMV read x on whole lines and stepped 3 f16 rows on
/// 512-bit lanes (the same day, later): 13 4.34–4.41 / 4.43–4.64, 14 4.39–4.63 / 4.39–4.80, 16
/// 4.74–5.13 / 4.34–4.53: the two meet at 13–14, within the noise of this limit.
pub const GEMV_MAX_M_F16: usize = 12;

/// Whether a batch of `m` vectors through a dense W of `inp` inputs runs these row-wise kernels
/// rather than the GEMM: up to [`GEMV_MAX_M`] vectors with rows of at least
/// [`GEMV_LONG_ROWS`] inputs (or, on the AVX-512 tier, of at most `SHORT_ROWS_MAX_INP`, which
/// its transposing kernel takes), up to [`GEMV_MAX_M_SHORT_ROWS`] otherwise.
///
/// ```
/// use nibble_tensor::gemm::gemv::gemv_fits;
/// assert!(gemv_fits(16, 1024) && !gemv_fits(17, 1024));
/// assert!(gemv_fits(8, 100) && !gemv_fits(9, 100));
/// ```
pub fn gemv_fits(m: usize, inp: usize) -> bool {
    let short_kernel = inp <= SHORT_ROWS_MAX_INP && crate::cpu::kernel_path() == KernelPath::Avx512;
    m <= GEMV_MAX_M && (m <= GEMV_MAX_M_SHORT_ROWS || inp >= GEMV_LONG_ROWS || short_kernel)
}

/// [`gemv_fits`] for an f16 W: the same, but at most [`GEMV_MAX_M_F16`] vectors, and short
/// rows (which the transposing kernel takes only in f32) at most [`GEMV_MAX_M_SHORT_ROWS`].
///
/// ```
/// use nibble_tensor::gemm::gemv::gemv_fits_f16;
/// assert!(gemv_fits_f16(12, 1024) && !gemv_fits_f16(13, 1024));
/// assert!(gemv_fits_f16(8, 32) && !gemv_fits_f16(9, 32));
/// ```
pub fn gemv_fits_f16(m: usize, inp: usize) -> bool {
    // (f16 rows take the row kernel whatever their length.)
    m <= GEMV_MAX_M_F16 && (m <= GEMV_MAX_M_SHORT_ROWS || inp >= GEMV_LONG_ROWS)
}

/// `y[m, out] = x[m, inp] · Wᵀ` (`+=` with `accumulate`) for an f32 `W[out, inp]`, row-major.
/// Any `m` is computed correctly, but this is the fast choice only where [`gemv_fits`] says so.
/// Shape errors are returned as [`TensorError`].
///
/// ```
/// use nibble_tensor::cpu::kernel_path;
/// use nibble_tensor::gemm::gemv::gemv_t_f32;
/// let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2 x 3
/// let mut y = [f32::NAN; 2];
/// gemv_t_f32(kernel_path(), &w, 2, 3, &[1.0, 1.0, 1.0], 1, &mut y, false).unwrap();
/// assert_eq!(y, [6.0, 15.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn gemv_t_f32(
    path: KernelPath,
    w: &[f32],
    out: usize,
    inp: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    gemv_t(path, w, out, inp, x, m, y, accumulate)
}

/// [`gemv_t_f32`] for an f16 `W[out, inp]` (converted with F16C on the AVX2 path).
#[allow(clippy::too_many_arguments)]
pub fn gemv_t_f16(
    path: KernelPath,
    w: &[f16],
    out: usize,
    inp: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    gemv_t(path, w, out, inp, x, m, y, accumulate)
}

/// One thread's share of a small-batch product over a tile of f32 rows:
/// `res[r * m + b] (+)= W[r] · x[b]` for `W[rows, inp]` (row-major, `rows = res.len() / m`) and
/// `x[m, inp]`, with the same kernels as [`gemv_t_f32`] (bit-identical results per pair). For
/// callers that produce W a tile at a time (the quant crate dequantizes a few rows into
/// cache, then runs the whole batch over them); not parallel.
///
/// ```
/// use nibble_tensor::cpu::kernel_path;
/// use nibble_tensor::gemm::gemv::gemv_tile_f32;
/// let w = [1.0f32, 2.0, 3.0, 4.0]; // 2 x 2
/// let x = [1.0f32, 0.0, 0.0, 1.0]; // 2 x 2
/// let mut res = [f32::NAN; 4];
/// gemv_tile_f32(kernel_path(), &w, 2, &x, 2, &mut res, false).unwrap();
/// assert_eq!(res, [1.0, 2.0, 3.0, 4.0]); // [row][batch]
/// ```
#[allow(clippy::too_many_arguments)]
pub fn gemv_tile_f32(
    path: KernelPath,
    w: &[f32],
    inp: usize,
    x: &[f32],
    m: usize,
    res: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let op = "gemv_tile";
    let rows = res.len().checked_div(m).unwrap_or(0);
    if res.len() != rows * m {
        return Err(len_err(op, vec![rows, m], rows * m, res.len()));
    }
    crate::error::check_len(op, &[rows, inp], w.len())?;
    crate::error::check_len(op, &[m, inp], x.len())?;
    let path = path.supported();
    #[cfg(target_arch = "x86_64")]
    if rows > 0 && m >= 2 && path == KernelPath::Avx512 && inp <= SHORT_ROWS_MAX_INP {
        // The transposing kernel, as gemv_t_f32 takes it here (its layout [batch][row], then
        // into res's [row][batch]): the same bits.
        // (The thread's kept buffer: this runs once per tile of a quantized small batch.)
        let mut buf = super::Scratch::take(&super::SHORT_BUF, m * rows);
        let tmp = &mut buf.as_mut()[..m * rows];
        short_rows_t(w, rows, inp, x, m, tmp, false, false, 1);
        for (r, out) in res.chunks_exact_mut(m).enumerate() {
            for (b, o) in out.iter_mut().enumerate() {
                let v = tmp[b * rows + r];
                *o = if accumulate { *o + v } else { v };
            }
        }
        buf.put_back(&super::SHORT_BUF);
        return Ok(());
    }
    if rows > 0 {
        rows_kernel(path, w, inp, x, m, res, accumulate);
    }
    Ok(())
}

/// [`gemv_tile_f32`] with its outputs laid out by vector, for an f32 or f16 W: `y[b * ldy +
/// r] (+)= W[r] · x[b]` for the `rows` rows of `W[rows, inp]` and `x[m, inp]`, with the bits
/// of [`gemv_t_f32`] / [`gemv_t_f16`] per pair (`ldy >= rows`, `y` holds `(m - 1) · ldy +
/// rows` values at least; lengths checked by the caller). Not parallel. On the AVX-512 tier's
/// transposing kernel (f32 rows of at most [`SHORT_ROWS_MAX_INP`]) the outputs go straight
/// into `y`; elsewhere through a `[row][batch]` tile.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_tile_by_vector<E: BElem>(
    path: KernelPath,
    w: &[E],
    rows: usize,
    inp: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    ldy: usize,
    accumulate: bool,
) {
    if rows == 0 || m == 0 {
        return;
    }
    debug_assert!(w.len() >= rows * inp && x.len() >= m * inp && ldy >= rows);
    debug_assert!(y.len() >= (m - 1) * ldy + rows);
    let path = path.supported();
    #[cfg(target_arch = "x86_64")]
    if let Some(w) =
        E::as_f32(w).filter(|_| m >= 2 && path == KernelPath::Avx512 && inp <= SHORT_ROWS_MAX_INP)
    {
        // SAFETY: the AVX-512 tier is supported; W's rows and x lie inside their slices and
        // y holds m rows of ldy (the caller's lengths, asserted above in debug builds).
        unsafe { super::avx512::short_rows(w, rows, inp, x, m, y.as_mut_ptr(), ldy, accumulate) };
        return;
    }
    let mut stack = [const { MaybeUninit::<f32>::uninit() }; 2048];
    let mut heap = Vec::new();
    let res: &mut [f32] = if rows * m <= stack.len() {
        zeroed_prefix(&mut stack, rows * m)
    } else {
        heap.resize(rows * m, 0.0);
        &mut heap
    };
    if accumulate {
        for (r, rv) in res.chunks_exact_mut(m).enumerate() {
            for (b, v) in rv.iter_mut().enumerate() {
                *v = y[b * ldy + r];
            }
        }
    }
    rows_kernel(path, &w[..rows * inp], inp, x, m, res, accumulate);
    for (r, rv) in res.chunks_exact(m).enumerate() {
        for (b, &v) in rv.iter().enumerate() {
            y[b * ldy + r] = v;
        }
    }
}

/// The first `n` values of a stack buffer, set to zero (only those: a tile's buffer on the
/// stack is sized for the largest tile, and zeroing all of it cost 2 % of qlora's small
/// batches in `memset`).
pub(crate) fn zeroed_prefix(stack: &mut [MaybeUninit<f32>], n: usize) -> &mut [f32] {
    let prefix = &mut stack[..n];
    for v in prefix.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every one of the `n` values was just written, and `MaybeUninit<f32>` has the
    // layout of `f32`.
    unsafe { std::slice::from_raw_parts_mut(prefix.as_mut_ptr().cast::<f32>(), n) }
}

/// A dense W's small batch with a low-rank adapter (`WeightMatrix::matmul_t_low_rank` of
/// [`crate::Tensor`] and [`crate::HalfTensor`]): `y = post(bias + x · Wᵀ + (x · Aᵀ) · Bᵀ)` in
/// one pass ([`crate::lowrank::fused_matmul`], the base on [`gemv_tile_by_vector`] over parts
/// of [`crate::lowrank::MIN_PART_ROWS`] rows), with the bits of the bias rows, the GEMV ([`gemv_t_f32`] / [`gemv_t_f16`])
/// accumulating, [`LowRank::apply_unfused_batch`] and `post`, where `fits(m, inp)` (the
/// weight's GEMV rule) and [`LowRank::fuses_batch`] hold for `2 <= m`; `Ok(false)`, `y`
/// untouched, elsewhere or where the bias does not fit.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_low_rank<E: BElem>(
    w: &[E],
    out: usize,
    inp: usize,
    fits: fn(usize, usize) -> bool,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    adapter: &LowRank<'_>,
    post: crate::ops::PostOp,
) -> Result<bool> {
    crate::weight::check_matmul_operands("linear", m, x.len(), inp, y.len(), out)?;
    crate::error::check_len("linear", &[out, inp], w.len())?;
    adapter.check_layer(out, inp)?;
    if m < 2
        || out == 0
        || !fits(m, inp)
        || !adapter.fuses_batch(m)
        || bias.is_some_and(|b| b.len() != out)
    {
        return Ok(false);
    }
    let path = crate::cpu::kernel_path().supported();
    let threads = rayon::current_num_threads().max(1);
    let row_bytes = inp.max(1) * std::mem::size_of::<E>();
    let parallel = goes_parallel(threads, out, inp, m, row_bytes);
    let part = crate::lowrank::MIN_PART_ROWS;
    crate::lowrank::fused_matmul(
        adapter,
        x,
        m,
        y,
        bias,
        part,
        parallel,
        post,
        |rr, buf, acc| {
            let wr = &w[rr.start * inp..rr.end * inp];
            gemv_tile_by_vector(path, wr, rr.len(), inp, x, m, buf, rr.len(), acc)
        },
    )?;
    Ok(true)
}

fn len_err(op: &'static str, shape: Vec<usize>, expected: usize, found: usize) -> TensorError {
    TensorError::Length {
        op,
        shape,
        expected,
        found,
    }
}

/// Largest share of W one thread streams at a time at batch 1.
const GEMV_BLOCK_BYTES: usize = 1 << 20;

/// Smallest share of W one task computes: at least 16 rows and 64 KiB of W (so the rayon
/// overhead stays small next to the work).
fn min_task_rows(row_bytes: usize) -> usize {
    16.max((64 * 1024) / row_bytes.max(1))
}

/// Whether a product of `m` vectors through an `out x inp` W (`row_bytes` per row) runs on the
/// pool of `threads`: when it has at least [`PARALLEL_MIN_MACS`] multiply-adds and more rows
/// than one task's minimum ([`min_task_rows`]). The count of multiply-adds decides, not the
/// count of rows: a LoRA adapter's `[1024, 32]` B has 1024 rows but only 32 K multiply-adds
/// per vector, which took 6-10 µs on one thread here, no more than the fork-join that a
/// parallel run adds on 16 threads.
fn goes_parallel(threads: usize, out: usize, inp: usize, m: usize, row_bytes: usize) -> bool {
    threads > 1
        && out > min_task_rows(row_bytes)
        && out.saturating_mul(inp).saturating_mul(m) >= PARALLEL_MIN_MACS
}

/// Rows per block of a parallel batch-1 product (`row_bytes` per row of W, `threads` in the
/// pool). Batch 1 streams W from memory: neighbouring blocks of rows, handed out in order (see
/// [`crate::parallel::for_each_block`]), each at most 1 MiB (the two threads' streams are then
/// never 2 MiB apart), at least one per thread, in multiples of 4 rows for the 4-row kernel.
fn batch1_block(out: usize, row_bytes: usize, threads: usize) -> usize {
    (GEMV_BLOCK_BYTES / row_bytes.max(1))
        .min(out.div_ceil(threads))
        .div_ceil(4)
        .max(1)
        * 4
}

/// A dense W's batch-1 product by ranges of rows ([`crate::weight::Batch1Rows`]): the
/// kernel a parallel batch-1 [`gemv_t_f32`] / [`gemv_t_f16`] runs on each block.
pub(crate) struct DenseBatch1<'a, E> {
    path: KernelPath,
    w: &'a [E],
    out: usize,
    inp: usize,
    x: &'a [f32],
}

impl<'a, E: BElem> DenseBatch1<'a, E> {
    /// `None` unless `w` is `out x inp` and `x` has `inp` elements.
    pub(crate) fn new(w: &'a [E], out: usize, inp: usize, x: &'a [f32]) -> Option<Self> {
        (out.checked_mul(inp) == Some(w.len()) && x.len() == inp).then(|| DenseBatch1 {
            path: crate::cpu::kernel_path().supported(),
            w,
            out,
            inp,
            x,
        })
    }
}

impl<E: BElem + Sync> crate::weight::Batch1Rows for DenseBatch1<'_, E> {
    fn rows(&self, rows: std::ops::Range<usize>, y: &mut [f32], accumulate: bool) -> Result<()> {
        crate::weight::check_batch1_rows(self.out, &rows, y)?;
        if !rows.is_empty() {
            let w = &self.w[rows.start * self.inp..rows.end * self.inp];
            rows_kernel(self.path, w, self.inp, self.x, 1, y, accumulate);
        }
        Ok(())
    }
}

/// Batch 1 with a low-rank adapter fused in: `y[out] (+)= W x + B (A x)` for `W[out, inp]`
/// (see [`crate::lowrank`]), with the blocks and the parallel decision of the plain batch-1
/// product, and the same result bit for bit as [`gemv_t_f32`] / [`gemv_t_f16`] at `m = 1`
/// followed by [`LowRank::apply_unfused`]. Shape errors are returned as [`TensorError`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_t_low_rank<E: BElem>(
    path: KernelPath,
    w: &[E],
    out: usize,
    inp: usize,
    x: &[f32],
    y: &mut [f32],
    accumulate: bool,
    adapter: &LowRank<'_>,
) -> Result<()> {
    adapter.check(out, inp, x, y)?;
    crate::error::check_len("gemv_low_rank", &[out, inp], w.len())?;
    let path = path.supported();
    let threads = rayon::current_num_threads().max(1);
    let row_bytes = inp.max(1) * std::mem::size_of::<E>();
    let parallel = goes_parallel(threads, out, inp, 1, row_bytes);
    let block = if parallel {
        batch1_block(out, row_bytes, threads)
    } else {
        out
    };
    crate::lowrank::fused_matvec(adapter, x, y, block, parallel, |rows, yc| {
        rows_kernel(
            path,
            &w[rows.start * inp..rows.end * inp],
            inp,
            x,
            1,
            yc,
            accumulate,
        )
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn gemv_t<E: BElem>(
    path: KernelPath,
    w: &[E],
    out: usize,
    inp: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let op = "gemv";
    let overflow = || TensorError::Overflow {
        op,
        shape: vec![m, out, inp],
    };
    let wl = out.checked_mul(inp).ok_or_else(overflow)?;
    let xl = m.checked_mul(inp).ok_or_else(overflow)?;
    let yl = m.checked_mul(out).ok_or_else(overflow)?;
    if w.len() != wl {
        return Err(len_err(op, vec![out, inp], wl, w.len()));
    }
    if x.len() != xl {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: vec![m, x.len() / m.max(1)],
            rhs: vec![out, inp],
        });
    }
    if y.len() != yl {
        return Err(len_err(op, vec![m, out], yl, y.len()));
    }
    if m == 0 || out == 0 {
        return Ok(());
    }
    let path = path.supported();
    let threads = rayon::current_num_threads().max(1);
    let row_bytes = inp.max(1) * std::mem::size_of::<E>();
    let min_rows = min_task_rows(row_bytes);
    let parallel = goes_parallel(threads, out, inp, m, row_bytes);
    if m == 1 {
        if parallel {
            crate::parallel::for_each_block(y, batch1_block(out, row_bytes, threads), |r0, yc| {
                let wc = &w[r0 * inp..(r0 + yc.len()) * inp];
                rows_kernel(path, wc, inp, x, 1, yc, accumulate);
            });
        } else {
            rows_kernel(path, w, inp, x, 1, y, accumulate);
        }
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx512 && inp <= SHORT_ROWS_MAX_INP {
        if let Some(w) = E::as_f32(w) {
            short_rows_t(w, out, inp, x, m, y, accumulate, parallel, threads);
            return Ok(());
        }
    }
    on_whole_lines(x, inp, |x| {
        // Batches of 2 and more: about 8 tasks per thread, each computing its rows r of `res`
        // laid out [r][m], then one transposing pass into y.
        let rows_per_task = out.div_ceil(threads * 8).max(min_rows);
        let task = |(t, res): (usize, &mut [f32])| {
            let r0 = t * rows_per_task;
            let rows = res.len() / m;
            let wc = &w[r0 * inp..(r0 + rows) * inp];
            rows_kernel(path, wc, inp, x, m, res, false);
        };
        let mut res = vec![0.0f32; yl];
        if parallel {
            // (The hot team's way in from outside the pool, as batch 1's: rayon's own parks the
            // caller and wakes it again, which cost more than a LoRA adapter's product.)
            let chunk = rows_per_task * m;
            crate::parallel::for_each_chunk(&mut res, chunk, |start, part| {
                task((start / chunk, part))
            });
        } else {
            res.chunks_mut(rows_per_task * m).enumerate().for_each(task);
        }
        for r in 0..out {
            for b in 0..m {
                let v = res[r * m + b];
                let d = &mut y[b * out + r];
                *d = if accumulate { *d + v } else { v };
            }
        }
    });
    Ok(())
}

/// Inputs up to which an f32 W's batches of 2 to [`GEMV_MAX_M`] take the AVX-512 tier's
/// transposing kernel (`avx512::short_rows`) instead of the row kernel or the GEMM: a LoRA
/// adapter's `B` (`[out, r]`, r = 32 in BigNet). `y += h · Bᵀ` for `[1024, 32]`, 2 threads of
/// the 2-core Xeon (2026-12-05, medians of 301 in two or three runs, µs), row kernel /
/// transposing kernel / GEMM: m = 2 5.7–6.8 / 4.4–6.1 / 7.2–9.7, 4 11.2–12.0 / 6.0–6.3 /
/// 7.5–9.0, 8 19.4–20.4 / 6.8–12.1 / 14.5–17.1, 12 – / 13.4–13.7 / 19–25, 16 – / 15.7–16.4 /
/// 19.6–22.5. BigNet qlora with int8 activations, three rounds in turns, batch 4 / 8:
/// 0.81–1.11 / 1.40–1.62 → 0.72–0.79 / 1.16–1.22 ms; lora batch 8 2.51–2.70 → 2.31–2.52.
const SHORT_ROWS_MAX_INP: usize = 64;

/// [`gemv_t`] for an f32 W of short rows on the AVX-512 tier: `avx512::short_rows` over blocks
/// of rows (multiples of 16), on the pool where `parallel`. Bits: the GEMM's (see there), so
/// they do not depend on the blocks or the thread count.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn short_rows_t(
    w: &[f32],
    out: usize,
    inp: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
    parallel: bool,
    threads: usize,
) {
    let tasks = if parallel {
        threads.min(out.div_ceil(64)).max(1)
    } else {
        1
    };
    let block = out.div_ceil(tasks).next_multiple_of(16);
    let yp = super::CPtr(y.as_mut_ptr());
    let run = |t: usize| {
        let j0 = (t * block).min(out);
        let rows = block.min(out - j0);
        // SAFETY: the AVX-512 tier is the process's supported path (the caller's check); W's
        // rows j0..j0 + rows and x (m x inp) lie inside their slices; y is m x out and the
        // columns j0..j0 + rows of each of its rows belong to this task alone.
        unsafe {
            super::avx512::short_rows(
                &w[j0 * inp..(j0 + rows) * inp],
                rows,
                inp,
                x,
                m,
                yp.get().add(j0),
                out,
                accumulate,
            )
        };
    };
    if tasks > 1 {
        crate::parallel::for_each_task(tasks, run);
    } else {
        run(0);
    }
}

/// `f(x)` with `x` (rows of `inp` floats) on whole 64-byte lines: where its first row starts
/// inside a line (a `Vec`'s storage is only 16-byte aligned) and its rows are whole lines
/// (`inp` a multiple of 16), `f` gets a copy of `x` in this thread's aligned scratch, else `x`
/// itself. The row kernels' 512-bit loads of x then each read one cache line instead of
/// two: the same values, the same bits. 1024² f16, 1 thread of the 2-core Xeon, m = 4 / 8 /
/// 12: 0.133 / 0.265 / 0.403 ms from a `Vec` 16 bytes into a line, 0.104 / 0.202 / 0.303
/// from the copy (2026-12-05).
///
/// ```
/// use nibble_tensor::gemm::gemv::on_whole_lines;
/// let x: Vec<f32> = (0..64).map(|v| v as f32).collect();
/// let sum = on_whole_lines(&x, 16, |x| {
///     assert_eq!(x.as_ptr() as usize % 64, 0);
///     x.iter().sum::<f32>()
/// });
/// assert_eq!(sum, 2016.0);
/// ```
pub fn on_whole_lines<R>(x: &[f32], inp: usize, f: impl FnOnce(&[f32]) -> R) -> R {
    if (x.as_ptr() as usize).is_multiple_of(64) || !inp.is_multiple_of(16) || x.is_empty() {
        return f(x);
    }
    let mut buf = super::Scratch::take(&super::X_BUF, x.len());
    let copy = &mut buf.as_mut()[..x.len()];
    copy.copy_from_slice(x);
    let r = f(copy);
    buf.put_back(&super::X_BUF);
    r
}

/// Shapes: `w` is `rows x inp` (row-major), `x` is `m x inp`, `res` is `rows x m`;
/// `res[r * m + b] (+)= dot(x[b], w[r])`. `path` must be [`KernelPath::supported`].
pub(crate) fn rows_kernel<E: BElem>(
    path: KernelPath,
    w: &[E],
    inp: usize,
    x: &[f32],
    m: usize,
    res: &mut [f32],
    accumulate: bool,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2Fma => {
            // SAFETY: `path` went through `supported()`, so the CPU has AVX2, FMA and F16C;
            // the slice lengths are as documented (checked by the caller's shape checks).
            unsafe { avx2::rows(w, inp, x, m, res, accumulate) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => {
            // SAFETY: `path` went through `supported()`, so the CPU has AVX-512 F/BW/VL, FMA
            // and F16C; the slice lengths are as documented.
            unsafe { super::avx512::gemv_rows(w, inp, x, m, res, accumulate) }
        }
        KernelPath::Portable => portable_rows(w, inp, x, m, res, accumulate),
        _ => {
            for (r, out) in res.chunks_exact_mut(m).enumerate() {
                let wr = &w[r * inp..(r + 1) * inp];
                for (b, o) in out.iter_mut().enumerate() {
                    let xb = &x[b * inp..(b + 1) * inp];
                    let s: f32 = wr.iter().zip(xb).map(|(&wv, &xv)| wv.to_f32() * xv).sum();
                    *o = if accumulate { *o + s } else { s };
                }
            }
        }
    }
}

/// Portable (`wide::f32x8`) version of [`rows_kernel`]: one W row at a time, 8 lanes.
fn portable_rows<E: BElem>(
    w: &[E],
    inp: usize,
    x: &[f32],
    m: usize,
    res: &mut [f32],
    accumulate: bool,
) {
    use wide::f32x8;
    let full = inp / 8 * 8;
    for (r, out) in res.chunks_exact_mut(m).enumerate() {
        let wr = &w[r * inp..(r + 1) * inp];
        for (b, o) in out.iter_mut().enumerate() {
            let xb = &x[b * inp..(b + 1) * inp];
            let mut acc = f32x8::ZERO;
            for (wc, xc) in wr[..full].chunks_exact(8).zip(xb[..full].chunks_exact(8)) {
                let wv: [f32; 8] = std::array::from_fn(|l| wc[l].to_f32());
                let xv: [f32; 8] = std::array::from_fn(|l| xc[l]);
                acc += f32x8::from(wv) * f32x8::from(xv);
            }
            let mut s = acc.reduce_add();
            for (wv, xv) in wr[full..].iter().zip(&xb[full..]) {
                s += wv.to_f32() * xv;
            }
            *o = if accumulate { *o + s } else { s };
        }
    }
}

/// How far ahead (bytes) the batch-1 f16 kernel prefetches its W row stream by default
/// (see [`F16Stream`]). The f16
/// kernel spends twice the instructions per byte of the f32 one (conversion plus FMA), so
/// out-of-order execution alone keeps too few cache-line misses in flight; measured on
/// 18 distinct 1024x1024 f16 layers (36 MB, 2 threads): one row at a time with a 4 KiB
/// lead streams at 20.4 GB/s, the 4-row kernel with a 4-row lead at 18.3, without
/// prefetch at 13.1 (pure read of the same bytes: 23.5). The f32 4-row kernel reaches
/// 24 GB/s with the hardware prefetcher alone, and a software prefetch slows it.
/// The prefetch is non-temporal (`prefetchnta`): a weight is read once per forward, and
/// keeping the stream out of the outer caches leaves them to the activations and the
/// LoRA adapters (BigNet `lora` batch 1: 2.15-2.40 -> 1.93-2.06 ms; `half_precision`
/// 1.93-2.00 -> 1.80-1.83 ms).
///
/// f32 weights stream without a software prefetch on both machines: on the 16-core Xeon
/// (BigNet at batch 1 on 16 threads, the 4-row kernel with each row prefetched ahead, two
/// rounds, 2026-12-04 02:29 UTC) none took 0.419–0.469 ms, `prefetcht0` 1 / 4 KiB ahead
/// 0.492–0.500 / 0.462–0.473, `prefetcht1` 1 / 4 / 16 KiB ahead 0.444–0.514 / 0.436–0.473 /
/// 0.480–0.481, `prefetchnta` 4 KiB ahead 0.528–0.598.
const F16_PREFETCH_BYTES: usize = 4096;

/// How the batch-1 f16 kernel streams W (`NIBBLE_F16_STREAM`, read once per process): `nta`
/// (the default on the AVX2 path of AMD CPUs: one row at a time, each prefetched 4 KiB ahead with
/// `prefetchnta`, the fastest on the 2-core Zen 3, see [`F16_PREFETCH_BYTES`]), `t0` (the same with
/// `prefetcht0`; the default on the AVX2 path of other CPUs), either with `:BYTES` for another lead (`t0:8192`), `off` (one row at a time,
/// the hardware prefetcher alone) or `rows4` (four rows at a time, as f32 weights stream, no
/// software prefetch; the default on the AVX-512 path, the fastest on the 16-core Xeon). A knob for measuring CPUs whose prefetchers differ (the 16-core Xeon's
/// f16 batch 1 streamed at half the f32 kernel's rate); every choice gives the same sums. An
/// unknown value is reported on stderr and the default kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum F16Stream {
    Nta(usize),
    T0(usize),
    Off,
    FourRows,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn f16_stream() -> F16Stream {
    #[cfg(test)]
    if let Some(stream) = tests::STREAM.with(|s| s.get()) {
        return stream;
    }
    static STREAM: std::sync::OnceLock<F16Stream> = std::sync::OnceLock::new();
    *STREAM.get_or_init(|| {
        // The 16-core Xeon (AVX-512) streams f16 rows best four at a time (BigNet
        // half_precision at batch 1 on a team of 16 threads, one run: rows4 0.267 ms, off
        // 0.277, t0:1024 0.283, t0 0.341, nta 0.391, nta:8192 0.713; the ordinary path
        // 0.619 with rows4 there, 0.88–0.89 with nta in an earlier lease); the 2-core Zen 3
        // (AVX2) with nta (see F16_PREFETCH_BYTES).
        // On Intel CPUs' AVX2 path `t0`: on a 2-core Xeon (AVX-512, run with
        // NIBBLE_KERNEL=avx2, 2 threads, 2026-12-04 23:35 UTC, medians of 31) half_precision /
        // lora at batch 1 took 2.10–2.26 / 2.09–2.44 ms with nta (its lines did not stay in
        // L3: every forward read the weights from DRAM), 0.73 / 0.86 with t0, 0.87 / 0.98 with
        // rows4; on its AVX-512 path rows4 0.79 / 0.90, t0 0.83 / 0.84, nta 1.85 / 2.05.
        let default = if crate::cpu::kernel_path().supported() == crate::cpu::KernelPath::Avx512 {
            F16Stream::FourRows
        } else if crate::cpu::is_amd() {
            F16Stream::Nta(F16_PREFETCH_BYTES)
        } else {
            F16Stream::T0(F16_PREFETCH_BYTES)
        };
        let Ok(v) = std::env::var("NIBBLE_F16_STREAM") else {
            return default;
        };
        let (kind, lead) = match v.split_once(':') {
            Some((k, l)) => (k, l.trim().parse::<usize>().ok()),
            None => (v.as_str(), Some(F16_PREFETCH_BYTES)),
        };
        match (kind.trim(), lead) {
            ("nta", Some(l)) => F16Stream::Nta(l),
            ("t0", Some(l)) => F16Stream::T0(l),
            ("off", _) => F16Stream::Off,
            ("rows4", _) => F16Stream::FourRows,
            _ => {
                eprintln!("nibble: NIBBLE_F16_STREAM={v:?} is not nta, t0, nta:BYTES, t0:BYTES, off or rows4; using the default");
                default
            }
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BElem;
    use std::arch::x86_64::__m256;

    /// AVX2+FMA(+F16C) [`super::rows_kernel`]: `res[rows x m] (+)= W[rows x inp] · x[m x inp]ᵀ`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `w.len() == rows * inp`,
    /// `x.len() >= m * inp`, `res.len() == rows * m`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows<E: BElem>(
        w: &[E],
        inp: usize,
        x: &[f32],
        m: usize,
        res: &mut [f32],
        accumulate: bool,
    ) {
        // SAFETY: forwarded contract; features enabled on this function.
        unsafe { super::simd::rows::<__m256, E>(w, inp, x, m, res, accumulate) }
    }
}

/// The SIMD row kernels, generic over the register type ([`Lanes`]): each tier's file wraps
/// [`simd::rows`] in a `#[target_feature]` function for its register width.
#[cfg(target_arch = "x86_64")]
pub(super) mod simd {
    use super::super::lanes::Lanes;
    use super::BElem;
    use std::arch::x86_64::*;

    /// [`super::rows_kernel`] on `V` registers: `res[rows x m] (+)= W[rows x inp] · x[m x inp]ᵀ`.
    ///
    /// # Safety
    /// The CPU must have `V`'s tier and the caller must be compiled with it;
    /// `w.len() == rows * inp`, `x.len() >= m * inp`, `res.len() == rows * m`.
    #[inline(always)]
    pub(in super::super) unsafe fn rows<V: Lanes, E: BElem>(
        w: &[E],
        inp: usize,
        x: &[f32],
        m: usize,
        res: &mut [f32],
        accumulate: bool,
    ) {
        // SAFETY: forwarded contract.
        unsafe {
            if m == 1 {
                return body_m1::<V, E>(w, inp, x, res, accumulate);
            }
            // Groups of up to 4 x rows, one pass over W each, writing their columns of res
            // (row stride m) in place.
            let rows = res.len() / m;
            for b0 in (0..m).step_by(4) {
                let g = 4.min(m - b0);
                let xs = &x[b0 * inp..(b0 + g) * inp];
                group::<V, E>(w, inp, xs, g, rows, &mut res[b0..], m, accumulate);
            }
        }
    }

    /// `res[r * ld + b] (+)= W[r] · x[b]` for `r < rows`, `b < g` (`g` in 1..=4). Rows of W
    /// per step: f32 weights 3 (each x load then feeds 3 FMAs: batch 2 105 -> 77 µs, 4 166 ->
    /// 133 µs, 16 690 -> 560 µs on 1024², 2 threads); f16 weights on 256-bit lanes 1 (their
    /// F16C conversion, not the loads, bounds them, and 3 rows were slower at batch 2), on
    /// 512-bit lanes 3 as f32 (one 1024² layer, one thread of the 2-core Xeon, x on whole
    /// lines, batch 3 / 4 / 8 / 12: 0.087 / 0.105 / 0.208 / 0.307 ms with 1 row, 0.071 / 0.088
    /// / 0.153 / 0.233 with 3, 2026-12-05). A function rather than a closure, so that it
    /// inlines with the caller's target features.
    ///
    /// # Safety
    /// As [`rows`], with `x.len() >= g * inp` and `res.len() >= (rows - 1) * ld + g`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group<V: Lanes, E: BElem>(
        w: &[E],
        inp: usize,
        x: &[f32],
        g: usize,
        rows: usize,
        res: &mut [f32],
        ld: usize,
        accumulate: bool,
    ) {
        let f32_weights = std::mem::size_of::<E>() == 4;
        let three_rows = f32_weights || V::N == 16;
        // SAFETY: forwarded contract.
        unsafe {
            match (g, three_rows) {
                (1, _) => body::<V, E, 1, 4, 1>(w, inp, x, rows, res, ld, accumulate),
                (2, true) => body::<V, E, 2, 2, 3>(w, inp, x, rows, res, ld, accumulate),
                (2, false) => body::<V, E, 2, 2, 1>(w, inp, x, rows, res, ld, accumulate),
                (3, true) => body::<V, E, 3, 1, 3>(w, inp, x, rows, res, ld, accumulate),
                (3, false) => body::<V, E, 3, 2, 1>(w, inp, x, rows, res, ld, accumulate),
                (_, true) => body::<V, E, 4, 1, 3>(w, inp, x, rows, res, ld, accumulate),
                (_, false) => body::<V, E, 4, 2, 1>(w, inp, x, rows, res, ld, accumulate),
            }
        }
    }

    /// No software prefetch ([`dot_rows_m1`]'s `PF`).
    const PF_OFF: u8 = 0;
    /// `prefetchnta`.
    const PF_NTA: u8 = 1;
    /// `prefetcht0`.
    const PF_T0: u8 = 2;

    /// Shapes: `w` `R x inp` (`R` contiguous rows at `wp`), `x` `1 x inp`; returns the `R`
    /// dot products. `V::N * U` columns per step in `U` accumulators per row (`R * U` FMA chains).
    /// With `PF` [`PF_NTA`] or [`PF_T0`], each row is prefetched `lead` bytes ahead with that
    /// hint once per step (one step is one 64-byte line for f16 with `U = 4`). The per-row operation order does
    /// not depend on `R` (rows are reduced by [`reduce4`]; absent rows are zeros), so a
    /// row's result is the same whichever group it lands in.
    ///
    /// # Safety
    /// AVX2/FMA/F16C; `wp` readable for `R * inp` elements, `xp` for `inp` floats.
    #[inline(always)]
    unsafe fn dot_rows_m1<V: Lanes, E: BElem, const R: usize, const U: usize, const PF: u8>(
        wp: *const E,
        inp: usize,
        xp: *const f32,
        lead: usize,
    ) -> [f32; R] {
        let step = V::N * U;
        let full = inp / step * step;
        let full_n = inp / V::N * V::N;
        // SAFETY: (whole block) row r spans wp[r * inp..(r + 1) * inp]; every N-wide load
        // starts at i with i + N <= full_n <= inp, every scalar load at i < inp; prefetches
        // never fault.
        unsafe {
            let mut acc = [[V::zero(); U]; R];
            let mut i = 0;
            while i < full {
                if PF != PF_OFF {
                    // Every 64-byte line of the step (one for 8 lanes, two for 16).
                    let lines = (step * std::mem::size_of::<E>()).div_ceil(64);
                    for r in 0..R {
                        let p = (wp.add(r * inp + i) as *const i8).wrapping_add(lead);
                        for l in 0..lines {
                            if PF == PF_T0 {
                                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * l));
                            } else {
                                _mm_prefetch::<_MM_HINT_NTA>(p.wrapping_add(64 * l));
                            }
                        }
                    }
                }
                for u in 0..U {
                    let xv = V::load(xp.add(i + V::N * u));
                    for (r, a) in acc.iter_mut().enumerate() {
                        a[u] = V::fmadd(V::load_w(wp.add(r * inp + i + V::N * u)), xv, a[u]);
                    }
                }
                i += step;
            }
            while i < full_n {
                let xv = V::load(xp.add(i));
                for (r, a) in acc.iter_mut().enumerate() {
                    a[0] = V::fmadd(V::load_w(wp.add(r * inp + i)), xv, a[0]);
                }
                i += V::N;
            }
            let mut v = [V::zero(); 4];
            for (r, a) in acc.iter().enumerate() {
                let mut s = a[0];
                for au in a.iter().skip(1) {
                    s = V::add(s, *au);
                }
                v[r] = s;
            }
            let mut lanes = V::hsum4(v);
            // A loop, not a closure: closures do not inherit the target features (the f16
            // conversion there was a call per row).
            for (r, s) in lanes.iter_mut().enumerate().take(R) {
                for j in full_n..inp {
                    *s += (*wp.add(r * inp + j)).to_f32() * *xp.add(j);
                }
            }
            std::array::from_fn(|r| lanes[r])
        }
    }

    /// Batch-1 kernel. Shapes: `w` `rows x inp`, `x` `1 x inp`, `res` `rows`. f32 W: 4 rows
    /// per sweep (x loads shared), the last `rows % 4` one at a time; f16 W: as
    /// [`super::F16Stream`] says (by default one row at a time with a software prefetch, see
    /// [`super::F16_PREFETCH_BYTES`]), each row's sum the same whichever.
    ///
    /// # Safety
    /// As [`rows`] with `m == 1`.
    #[inline(always)]
    unsafe fn body_m1<V: Lanes, E: BElem>(
        w: &[E],
        inp: usize,
        x: &[f32],
        res: &mut [f32],
        accumulate: bool,
    ) {
        let n = res.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut put = |r: usize, s: f32| {
            let d = &mut res[r];
            *d = if accumulate { *d + s } else { s };
        };
        let mut r = 0;
        // SAFETY: rows r..r+4 (resp. r) are < n, inside `w` (n x inp); x has inp floats.
        unsafe {
            if std::mem::size_of::<E>() < 4 {
                let stream = super::f16_stream();
                if stream == super::F16Stream::FourRows {
                    while r + 4 <= n {
                        let v = dot_rows_m1::<V, E, 4, 4, PF_OFF>(wp.add(r * inp), inp, xp, 0);
                        for (t, s) in v.into_iter().enumerate() {
                            put(r + t, s);
                        }
                        r += 4;
                    }
                }
                while r < n {
                    let wr = wp.add(r * inp);
                    let s = match stream {
                        super::F16Stream::Nta(lead) => {
                            dot_rows_m1::<V, E, 1, 4, PF_NTA>(wr, inp, xp, lead)
                        }
                        super::F16Stream::T0(lead) => {
                            dot_rows_m1::<V, E, 1, 4, PF_T0>(wr, inp, xp, lead)
                        }
                        _ => dot_rows_m1::<V, E, 1, 4, PF_OFF>(wr, inp, xp, 0),
                    };
                    put(r, s[0]);
                    r += 1;
                }
                return;
            }
            while r + 4 <= n {
                let v = dot_rows_m1::<V, E, 4, 2, PF_OFF>(wp.add(r * inp), inp, xp, 0);
                for (t, s) in v.into_iter().enumerate() {
                    put(r + t, s);
                }
                r += 4;
            }
            while r < n {
                put(
                    r,
                    dot_rows_m1::<V, E, 1, 2, PF_OFF>(wp.add(r * inp), inp, xp, 0)[0],
                );
                r += 1;
            }
        }
    }

    /// Shapes: `w` `rows x inp`, `x` `M x inp`, `res[r * ld + b]` for `r < rows`, `b < M`;
    /// `U` N-wide accumulators per (row, x row) pair, rows of W `R` at a time (each W load
    /// feeds `M` FMAs and each x load `R`), then the leftover rows one at a time. Every (row, x row) pair is summed in the
    /// same order whatever `R` and wherever the row falls, so results never depend on how
    /// the rows were split.
    ///
    /// # Safety
    /// As [`group`] with `g == M`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn body<V: Lanes, E: BElem, const M: usize, const U: usize, const R: usize>(
        w: &[E],
        inp: usize,
        x: &[f32],
        rows: usize,
        res: &mut [f32],
        ld: usize,
        accumulate: bool,
    ) {
        let paired = rows / R * R;
        // SAFETY: forwarded contract, on rows 0..paired and then paired..rows.
        unsafe {
            for r0 in (0..paired).step_by(R) {
                dot_block::<V, E, M, U, R>(w, inp, x, r0, res, ld, accumulate);
            }
            for r0 in paired..rows {
                dot_block::<V, E, M, U, 1>(w, inp, x, r0, res, ld, accumulate);
            }
        }
    }

    /// `res[(r0 + r) * ld + b] (+)= W[r0 + r] · x[b]` for `r < R`, `b < M`, with `M·U·R`
    /// accumulators.
    ///
    /// # Safety
    /// As [`group`] with `g == M`, and rows `r0..r0 + R` among its rows.
    #[inline(always)]
    // Index loops over the three register-block dimensions read more plainly than zipped
    // iterators, and compile to the same unrolled code.
    #[allow(clippy::needless_range_loop)]
    unsafe fn dot_block<V: Lanes, E: BElem, const M: usize, const U: usize, const R: usize>(
        w: &[E],
        inp: usize,
        x: &[f32],
        r0: usize,
        res: &mut [f32],
        ld: usize,
        accumulate: bool,
    ) {
        let step = V::N * U;
        let full = inp / step * step;
        let full_n = inp / V::N * V::N;
        let xp = x.as_ptr();
        // SAFETY: (whole block) w row r spans w[r * inp..(r + 1) * inp] and x row b spans
        // x[b * inp..(b + 1) * inp]; every N-wide load starts at an index i with
        // i + N <= full_n <= inp, every scalar load at i < inp.
        unsafe {
            // (Loops, not closures: closures do not inherit the caller's target features.)
            let mut wp = [w.as_ptr(); R];
            for (r, p) in wp.iter_mut().enumerate() {
                *p = w.as_ptr().add((r0 + r) * inp);
            }
            let mut acc = [[[V::zero(); U]; M]; R];
            let mut i = 0;
            while i < full {
                for u in 0..U {
                    let mut wv = [V::zero(); R];
                    for r in 0..R {
                        wv[r] = V::load_w(wp[r].add(i + V::N * u));
                    }
                    for b in 0..M {
                        let xv = V::load(xp.add(b * inp + i + V::N * u));
                        for r in 0..R {
                            acc[r][b][u] = V::fmadd(wv[r], xv, acc[r][b][u]);
                        }
                    }
                }
                i += step;
            }
            while i < full_n {
                let mut wv = [V::zero(); R];
                for r in 0..R {
                    wv[r] = V::load_w(wp[r].add(i));
                }
                for b in 0..M {
                    let xv = V::load(xp.add(b * inp + i));
                    for r in 0..R {
                        acc[r][b][0] = V::fmadd(wv[r], xv, acc[r][b][0]);
                    }
                }
                i += V::N;
            }
            for r in 0..R {
                for (b, a) in acc[r].iter().enumerate() {
                    let mut v = a[0];
                    for au in a.iter().skip(1) {
                        v = V::add(v, *au);
                    }
                    let mut s = v.hsum();
                    for j in full_n..inp {
                        s += (*wp[r].add(j)).to_f32() * *xp.add(b * inp + j);
                    }
                    let d = &mut res[(r0 + r) * ld + b];
                    *d = if accumulate { *d + s } else { s };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::available_paths;
    use crate::rng::Rng;
    use std::cell::Cell;

    thread_local! {
        /// The stream [`f16_stream`] returns on this thread, in place of the process's.
        pub(super) static STREAM: Cell<Option<F16Stream>> = const { Cell::new(None) };
    }

    /// Every way of streaming f16 weights at batch 1 gives the same bits, on every path, the
    /// awkward lengths and row counts that leave a ragged group of 4, outputs NaN-filled
    /// (and with `accumulate`).
    #[test]
    fn f16_streams_give_the_same_sums() {
        let mut rng = Rng::new(3);
        let streams = [
            F16Stream::Nta(F16_PREFETCH_BYTES),
            F16Stream::T0(F16_PREFETCH_BYTES),
            F16Stream::Nta(64),
            F16Stream::T0(8192),
            F16Stream::Off,
            F16Stream::FourRows,
        ];
        for path in available_paths() {
            for inp in [0usize, 1, 7, 15, 17, 31, 33, 63, 129, 1023] {
                for rows in [1usize, 3, 4, 7, 9] {
                    let w: Vec<f16> = (0..rows * inp)
                        .map(|_| f16::from_f32(rng.normal()))
                        .collect();
                    let x: Vec<f32> = (0..inp).map(|_| rng.normal()).collect();
                    for accumulate in [false, true] {
                        let start = if accumulate { 0.5 } else { f32::NAN };
                        let run = |stream: F16Stream| {
                            STREAM.with(|s| s.set(Some(stream)));
                            let mut y = vec![start; rows];
                            rows_kernel(path, &w, inp, &x, 1, &mut y, accumulate);
                            STREAM.with(|s| s.set(None));
                            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                        };
                        let want = run(streams[0]);
                        assert!(
                            want.iter().all(|&b| !f32::from_bits(b).is_nan()),
                            "{path:?} {rows}x{inp}"
                        );
                        for stream in streams {
                            assert_eq!(want, run(stream), "{path:?} {rows}x{inp} {stream:?}");
                        }
                    }
                }
            }
        }
    }
}
