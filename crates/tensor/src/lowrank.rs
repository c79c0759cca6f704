//! Batch-1 products with a low-rank (LoRA) adapter fused in: `y (+)= W x + B (A x)` in one
//! parallel pass over the rows of `y`, instead of three (the base product, then `h = A x`,
//! then `y += B h`, each on the thread pool or each on one thread).
//!
//! At batch 1 the adapter is little work (a rank-32 adapter on a 1024² layer: 64 K multiply-adds
//! against the base layer's 1 M), too little to pay two more fork-joins of the pool (each on
//! the order of 10 µs on 16 threads) and too much to run on one thread while the others wait.
//! So the pass hands out its parts in order ([`crate::parallel::for_each_in_order`]): first
//! the parts of `h = A x` (a few rows of A each), then the blocks of rows of `y`, each of which
//! computes its base rows, waits until every part of `h` is done (they were all handed out
//! before it, and they never wait, so it waits only for work in progress) and adds its rows of
//! `B h`.
//!
//! Each element of `h` and `y` is computed by the same batch-1 dot product kernels, with the
//! same operands in the same order, as [`crate::WeightMatrix::matmul_t`] computes them on dense
//! f32 weights, so the result is the same bit for bit as the unfused sequence (see
//! [`LowRank::apply_unfused`]), whatever the thread count.

use crate::cpu::kernel_path;
use crate::error::{Result, TensorError};
use crate::gemm::gemv::{
    gemv_fits, gemv_t_f32, gemv_tile_by_vector, rows_kernel, zeroed_prefix, GEMV_MAX_M,
};
use crate::ops::PostOp;
use crate::tensor::Tensor;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Rows of A per part of `h = A x` (a multiple of 4, the batch-1 kernel's row step): 16 KiB
/// of A at 1024 inputs, so a rank-32 adapter's `A x` is spread over 8 threads.
const A_ROWS_PER_PART: usize = 4;

/// A rank-`r` adapter's factors, checked: `A` `[r, in]` and `B` `[out, r]`, f32, row-major.
/// The update it adds to a layer's output is `y += B (A x)` (unscaled, as nibble's adapters
/// are).
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    a: &'a [f32],
    b: &'a [f32],
    rank: usize,
    inp: usize,
    out: usize,
}

impl<'a> LowRank<'a> {
    /// The adapter of `a` `[r, in]` and `b` `[out, r]`; any other shapes are an error.
    ///
    /// ```
    /// use nibble_tensor::lowrank::LowRank;
    /// use nibble_tensor::Tensor;
    /// let a = Tensor::zeros(&[2, 5]);
    /// let b = Tensor::zeros(&[3, 2]);
    /// let ab = LowRank::new(&a, &b).unwrap();
    /// assert_eq!((ab.rank(), ab.in_features(), ab.out_features()), (2, 5, 3));
    /// assert!(LowRank::new(&b, &a).is_err());
    /// ```
    pub fn new(a: &'a Tensor, b: &'a Tensor) -> Result<Self> {
        let (rank, inp) = a.dims2("low_rank (A)")?;
        let (out, rank_b) = b.dims2("low_rank (B)")?;
        if rank_b != rank {
            return Err(TensorError::ShapeMismatch {
                op: "low_rank",
                lhs: a.shape().to_vec(),
                rhs: b.shape().to_vec(),
            });
        }
        Ok(LowRank {
            a: a.data(),
            b: b.data(),
            rank,
            inp,
            out,
        })
    }

    /// A's values, `[r, in]` row-major.
    pub fn a_values(&self) -> &'a [f32] {
        self.a
    }

    /// B's values, `[out, r]` row-major.
    pub fn b_values(&self) -> &'a [f32] {
        self.b
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Columns of A: the layer's input features.
    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// Rows of B: the layer's output features.
    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Checks that the adapter fits an `out x inp` layer, `x` has `inp` elements and `y`
    /// `out` (the operands of a fused batch-1 product).
    pub fn check(&self, out: usize, inp: usize, x: &[f32], y: &[f32]) -> Result<()> {
        self.check_layer(out, inp)?;
        crate::weight::check_matmul_operands("low_rank", 1, x.len(), inp, y.len(), out)
    }

    /// Checks that the adapter fits an `out x inp` layer (any batch).
    pub fn check_layer(&self, out: usize, inp: usize) -> Result<()> {
        if (self.out, self.inp) != (out, inp) {
            return Err(TensorError::ShapeMismatch {
                op: "low_rank",
                lhs: vec![out, inp],
                rhs: vec![self.out, self.rank, self.inp],
            });
        }
        Ok(())
    }

    /// `y += B (A x)` for one vector `x` `[in]` into `y` `[out]`, as two separate products
    /// (`h = A x`, then `y += B h`, each [`gemv_t_f32`]): what a weight's fused product
    /// ([`crate::WeightMatrix::matvec_t_low_rank`]) gives, bit for bit, after its base
    /// product; the fallback of weights without a fused one.
    pub fn apply_unfused(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let path = kernel_path();
        let mut h = vec![0.0f32; self.rank];
        gemv_t_f32(path, self.a, self.rank, self.inp, x, 1, &mut h, false)?;
        gemv_t_f32(path, self.b, self.out, self.rank, &h, 1, y, true)
    }
}

impl LowRank<'_> {
    /// Whether [`fused_matmul`] can take a batch of `m` vectors: where both of the adapter's
    /// products would run as GEMVs ([`gemv_fits`]: `h = x · Aᵀ` and `y += h · Bᵀ` each
    /// through [`gemv_t_f32`], as the unfused sequence runs them), so that the fused pass,
    /// which runs the same kernels on tiles of rows
    /// ([`gemv_tile_f32`](crate::gemm::gemv::gemv_tile_f32)), gives their bits.
    pub fn fuses_batch(&self, m: usize) -> bool {
        m >= 1 && gemv_fits(m, self.inp) && gemv_fits(m, self.rank)
    }

    /// `y += (x · Aᵀ) · Bᵀ` for `m` vectors `x` `[m, in]` into `y` `[m, out]`, as two
    /// separate products (`h = x · Aᵀ`, then `y += h · Bᵀ`, each [`gemv_t_f32`]): what
    /// [`fused_matmul`] adds after its base product, bit for bit, where
    /// [`fuses_batch`](Self::fuses_batch) says it runs.
    pub fn apply_unfused_batch(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        let path = kernel_path();
        let h_len = m.checked_mul(self.rank).ok_or(TensorError::Overflow {
            op: "low_rank",
            shape: vec![m, self.rank],
        })?;
        let mut h = vec![0.0f32; h_len];
        gemv_t_f32(path, self.a, self.rank, self.inp, x, m, &mut h, false)?;
        gemv_t_f32(path, self.b, self.out, self.rank, &h, m, y, true)
    }
}

/// A buffer of a fused small batch (`y`, or `h`) shared by the parts that write it: each
/// writes only its own elements (`fused_matmul`).
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: each part writes only the elements of its own rows of `y` or `h`, and `h` is read
// only after every part that writes it has ended (`fused_matmul`).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// Element `idx` (the caller keeps to its own elements).
    #[inline(always)]
    fn at(self, idx: usize) -> *mut f32 {
        self.0.wrapping_add(idx)
    }
}

/// Fewest rows of `y` a part of [`fused_matmul`] should cover: the adapter's `h · Bᵀ` on a
/// few rows at a time cost more than its own pass (qlora at batch 4 / 8, f32, 2 threads,
/// 3.7-4.0 / 5.3-5.6 ms on parts of one 12-row tile against 3.4-3.7 / 4.9-5.1 unfused).
pub const MIN_PART_ROWS: usize = 64;

/// Most values of a fused tile's buffer kept on the stack (16 vectors by 128 rows).
const TILE_STACK: usize = 2048;

/// The fused small-batch product: `y = post(bias + base + (x · Aᵀ) · Bᵀ)` for `m` vectors, `x`
/// `[m, in]`, `y` `[m, out]` (row-major), in one parallel pass instead of three (the base
/// product, `h = x · Aᵀ`, `y += h · Bᵀ`, each a fork-join of the pool, then `post` as a pass of
/// its own), and without a pass that fills `y` with the bias rows. The parts are handed out in
/// order: first `h`'s (a few rows of A each, for every vector), then the tiles of `tile` rows
/// of `y`. A tile's part fills a buffer laid out `[vector][row]` with its rows of the bias,
/// calls `base(rows, buffer, accumulate)`, which adds the layer's own product onto them (with
/// `accumulate`; without a bias it writes them), waits until `h` is done, adds its rows of `h
/// · Bᵀ` and stores `post` of the sum into `y`.
///
/// Each element of `h` and `y` goes through the kernels of the unfused sequence (the same
/// operands in the same order: [`gemv_tile_f32`](crate::gemm::gemv::gemv_tile_f32), whose
/// bits are [`gemv_t_f32`]'s), so the result is that of the bias rows, `base` over all of `y`
/// (accumulating onto them), then
/// [`LowRank::apply_unfused_batch`], then `post`, bit for bit, whatever the tile, the thread
/// count and `parallel` (given a `base` whose values do not depend on its rows' tiling), where
/// [`LowRank::fuses_batch`] holds for `m`; an error where it does not, or where a shape does
/// not fit.
///
/// Shapes: `x` `[m, in]`, `y` `[m, out]`; `base`'s buffer `[m, rows.len()]`.
#[allow(clippy::too_many_arguments)]
pub fn fused_matmul(
    adapter: &LowRank<'_>,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    tile: usize,
    parallel: bool,
    post: PostOp,
    base: impl Fn(Range<usize>, &mut [f32], bool) + Sync,
) -> Result<()> {
    let (rank, inp, out) = (adapter.rank, adapter.inp, adapter.out);
    crate::weight::check_matmul_operands("low_rank", m, x.len(), inp, y.len(), out)?;
    if let Some(b) = bias.filter(|b| b.len() != out) {
        return Err(TensorError::Length {
            op: "low_rank (bias)",
            shape: vec![out],
            expected: out,
            found: b.len(),
        });
    }
    if !adapter.fuses_batch(m) {
        return Err(TensorError::ShapeMismatch {
            op: "low_rank (fused batch)",
            lhs: vec![m, inp],
            rhs: vec![out, rank, inp],
        });
    }
    let path = kernel_path().supported();
    let tile = tile.max(1);
    let adapter_parts = rank.div_ceil(A_ROWS_PER_PART);
    // h `[m, rank]`, each element written by the part of its row of A; `h_done` counts the
    // finished parts (see `CountOnDrop`), and its release/acquire pairs make every element
    // visible to a tile that has seen the count reach `adapter_parts`.
    let mut h = vec![0.0f32; m * rank];
    let hp = Shared(h.as_mut_ptr());
    let h_done = AtomicUsize::new(0);
    let yp = Shared(y.as_mut_ptr());
    let run = |part: usize| {
        if part < adapter_parts {
            let _done = CountOnDrop(&h_done);
            let rows = part * A_ROWS_PER_PART..((part + 1) * A_ROWS_PER_PART).min(rank);
            // res [m][rows] (m <= GEMV_MAX_M: `fuses_batch`)
            let nr = rows.len();
            let mut res = [0.0f32; A_ROWS_PER_PART * GEMV_MAX_M];
            let res = &mut res[..m * nr];
            let a = &adapter.a[rows.start * inp..rows.end * inp];
            gemv_tile_by_vector(path, a, nr, inp, x, m, res, nr, false);
            for (b, rv) in res.chunks_exact(nr).enumerate() {
                for (j, &v) in rv.iter().enumerate() {
                    // SAFETY: b < m and rows.start + j < rank: inside h; the element belongs
                    // to this part alone, and no one reads h before every part has ended.
                    unsafe { *hp.at(b * rank + rows.start + j) = v };
                }
            }
            return;
        }
        let r0 = (part - adapter_parts) * tile;
        let nr = tile.min(out - r0);
        // buf [m][nr]: the bias rows, then the base product added onto them.
        let mut stack = [const { MaybeUninit::<f32>::uninit() }; TILE_STACK];
        let mut heap = Vec::new();
        let buf: &mut [f32] = if m * nr <= TILE_STACK {
            zeroed_prefix(&mut stack, m * nr)
        } else {
            heap.resize(m * nr, 0.0);
            &mut heap
        };
        if let Some(bias) = bias {
            for row in buf.chunks_exact_mut(nr) {
                row.copy_from_slice(&bias[r0..r0 + nr]);
            }
        }
        base(r0..r0 + nr, buf, bias.is_some());
        wait_for(&h_done, adapter_parts);
        // SAFETY: every part that writes h has ended (the count, with acquire ordering), so
        // h is only read from here on.
        let hv = unsafe { std::slice::from_raw_parts(hp.at(0), m * rank) };
        let bw = &adapter.b[r0 * rank..(r0 + nr) * rank];
        gemv_tile_by_vector(path, bw, nr, rank, hv, m, buf, nr, true);
        for (b, row) in buf.chunks_exact(nr).enumerate() {
            // SAFETY: b < m and r0 + nr <= out: inside y (m x out); rows r0..r0 + nr belong
            // to this part alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(yp.at(b * out + r0), nr) };
            for (d, &v) in dst.iter_mut().zip(row) {
                *d = post.apply1(v);
            }
        }
    };
    let count = adapter_parts + out.div_ceil(tile);
    if parallel {
        crate::parallel::for_each_in_order(0..count, count, run);
    } else {
        (0..count).for_each(run);
    }
    drop(h);
    Ok(())
}

/// One part of a fused pass: rows of A, or a block of rows of `y` starting at a row.
enum Part<'y> {
    Adapter(Range<usize>),
    Rows(usize, &'y mut [f32]),
}

/// The fused batch-1 product: `base(rows, y_part)` computes rows `rows` of the layer's own
/// product into `y_part` (`y[rows]`, with or without accumulating, as the caller's kernel
/// does); then the adapter's `B (A x)` is added to every row. `y` is split into blocks of
/// `block` rows (the caller's split for its base kernel); `parallel` runs the pass on the
/// current rayon pool, else on the calling thread. The operands must have been checked
/// ([`LowRank::check`]).
///
/// A row's result is `base`'s value for the row, plus the same dot product of B's row with
/// `h` that [`LowRank::apply_unfused`] adds, so it does not depend on `block`, `parallel`
/// or the thread count (provided `base`'s values do not).
pub fn fused_matvec(
    adapter: &LowRank<'_>,
    x: &[f32],
    y: &mut [f32],
    block: usize,
    parallel: bool,
    base: impl Fn(Range<usize>, &mut [f32]) + Sync,
) {
    let path = kernel_path().supported();
    let (rank, inp) = (adapter.rank, adapter.inp);
    let block = block.max(1);
    let adapter_parts = rank.div_ceil(A_ROWS_PER_PART);
    // h = A x, published element by element (as f32 bits) by the parts that compute it;
    // `h_done` counts the finished parts (see `CountOnDrop`), and its release/acquire pairs
    // make every element visible to a block that has seen the count reach `adapter_parts`.
    let h: Vec<AtomicU32> = (0..rank).map(|_| AtomicU32::new(0)).collect();
    let h_done = AtomicUsize::new(0);
    let run = |part: Part<'_>| match part {
        Part::Adapter(rows) => {
            // Counted as done when this arm is left, even by a panic: the blocks waiting for
            // it then finish, and the panic reaches the caller instead of a hang.
            let _done = CountOnDrop(&h_done);
            let mut res = [0.0f32; A_ROWS_PER_PART];
            let res = &mut res[..rows.len()];
            rows_kernel(
                path,
                &adapter.a[rows.start * inp..rows.end * inp],
                inp,
                x,
                1,
                res,
                false,
            );
            for (slot, v) in h[rows].iter().zip(res.iter()) {
                slot.store(v.to_bits(), Ordering::Relaxed);
            }
        }
        Part::Rows(r0, yc) => {
            let rows = r0..r0 + yc.len();
            base(rows.clone(), yc);
            wait_for(&h_done, adapter_parts);
            let hv: Vec<f32> = h
                .iter()
                .map(|v| f32::from_bits(v.load(Ordering::Relaxed)))
                .collect();
            let bw = &adapter.b[rows.start * rank..rows.end * rank];
            rows_kernel(path, bw, rank, &hv, 1, yc, true);
        }
    };
    let count = adapter_parts + y.len().div_ceil(block);
    let parts = (0..adapter_parts)
        .map(|p| Part::Adapter(p * A_ROWS_PER_PART..((p + 1) * A_ROWS_PER_PART).min(rank)))
        .chain(
            y.chunks_mut(block)
                .enumerate()
                .map(|(c, yc)| Part::Rows(c * block, yc)),
        );
    if parallel {
        crate::parallel::for_each_in_order(parts, count, run);
    } else {
        parts.for_each(run);
    }
}

/// Adds one to its counter (with release ordering) when dropped.
struct CountOnDrop<'a>(&'a AtomicUsize);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Waits until `done` reaches `target`: the parts it counts were handed out before the
/// caller's and are running, so the wait is short; it spins, and yields its core once the
/// wait gets longer (a descheduled thread may hold a part when the pool has more threads than
/// the machine has cores).
fn wait_for(done: &AtomicUsize, target: usize) {
    let mut spins = 0u32;
    while done.load(Ordering::Acquire) < target {
        if spins < 1 << 10 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The fused pass against the unfused sequence, on awkward shapes, blocks and thread
    /// counts: bit-identical, every element of `y` written (NaN-filled before a
    /// non-accumulating base).
    #[test]
    fn fused_matches_unfused_bit_for_bit() {
        let mut rng = Rng::new(7);
        for (out, inp, rank) in [
            (1, 1, 1),
            (7, 15, 3),
            (17, 33, 4),
            (33, 31, 5),
            (129, 63, 32),
            (63, 129, 17),
            (1023, 17, 9),
            (15, 7, 0),
        ] {
            let w = Tensor::uniform(&[out, inp], -1.0, 1.0, &mut rng);
            let a = Tensor::uniform(&[rank, inp], -1.0, 1.0, &mut rng);
            let b = Tensor::uniform(&[out, rank], -1.0, 1.0, &mut rng);
            let x = Tensor::uniform(&[1, inp], -1.0, 1.0, &mut rng);
            let ab = LowRank::new(&a, &b).unwrap();
            let mut want = vec![f32::NAN; out];
            gemv_t_f32(
                kernel_path(),
                w.data(),
                out,
                inp,
                x.data(),
                1,
                &mut want,
                false,
            )
            .unwrap();
            ab.apply_unfused(x.data(), &mut want).unwrap();
            for threads in [1, 2, 3, 16] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for (block, parallel) in [(1, true), (4, true), (5, true), (64, true), (8, false)] {
                    let mut y = vec![f32::NAN; out];
                    pool.install(|| {
                        fused_matvec(&ab, x.data(), &mut y, block, parallel, |rows, yc| {
                            let wr = &w.data()[rows.start * inp..rows.end * inp];
                            rows_kernel(kernel_path().supported(), wr, inp, x.data(), 1, yc, false)
                        })
                    });
                    let same = y.iter().zip(&want).all(|(u, v)| u.to_bits() == v.to_bits());
                    assert!(
                        same,
                        "{out}x{inp} rank {rank}, {threads} threads, block {block}: {y:?} != {want:?}"
                    );
                }
            }
        }
    }

    /// The dense weights' `matvec_t_low_rank` (f32 and f16) against `matmul_t` at batch 1 and
    /// the unfused adapter: bit-identical for 1, 2, 3 and 16 threads, with and without
    /// `accumulate` (NaN-filled outputs then), on shapes large enough for the parallel pass.
    #[test]
    fn dense_weights_fuse_bit_for_bit() {
        use crate::{HalfTensor, WeightMatrix};
        let mut rng = Rng::new(11);
        for (out, inp, rank) in [(33, 17, 3), (1023, 129, 32), (257, 1023, 5), (129, 0, 2)] {
            let w = Tensor::uniform(&[out, inp], -1.0, 1.0, &mut rng);
            let a = Tensor::uniform(&[rank, inp], -1.0, 1.0, &mut rng);
            let b = Tensor::uniform(&[out, rank], -1.0, 1.0, &mut rng);
            let x = Tensor::uniform(&[1, inp], -1.0, 1.0, &mut rng);
            let start = Tensor::uniform(&[1, out], -1.0, 1.0, &mut rng);
            let ab = LowRank::new(&a, &b).unwrap();
            let half = HalfTensor::from_f32(&w);
            for (name, wm) in [("f32", &w as &dyn WeightMatrix), ("f16", &half)] {
                for accumulate in [false, true] {
                    let y0 = || match accumulate {
                        true => start.data().to_vec(),
                        false => vec![f32::NAN; out],
                    };
                    let mut want = y0();
                    wm.matmul_t(x.data(), 1, &mut want, accumulate).unwrap();
                    ab.apply_unfused(x.data(), &mut want).unwrap();
                    for threads in [1, 2, 3, 16] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        let mut y = y0();
                        pool.install(|| wm.matvec_t_low_rank(x.data(), &mut y, accumulate, &ab))
                            .unwrap();
                        let same = y.iter().zip(&want).all(|(u, v)| u.to_bits() == v.to_bits());
                        assert!(same, "{name} {out}x{inp} rank {rank}, {threads} threads");
                    }
                }
            }
            let mut y = vec![0.0; out + 1];
            assert!(w.matvec_t_low_rank(x.data(), &mut y, true, &ab).is_err());
        }
    }

    /// The dense weights' small batches with the adapter in the same pass
    /// (`matmul_t_low_rank`, f32 and f16) against the layer as the training forward computes
    /// it (`h = x · Aᵀ`, then `linear_low_rank_into`): bit-identical for 1, 2, 3 and 16
    /// threads, with a bias and a ReLU or neither (NaN-filled outputs), on awkward shapes, a
    /// short W (the transposing kernel) and a rank past it; `Ok(false)` with `y` untouched
    /// where the batch takes the GEMM.
    #[test]
    fn dense_small_batches_fuse_bit_for_bit() {
        use crate::ops::PostOp;
        use crate::{linear_low_rank_into, HalfTensor, WeightMatrix};
        let mut rng = Rng::new(13);
        for (out, inp, rank) in [
            (33, 17, 3),
            (1023, 129, 32),
            (257, 1024, 65),
            (70, 40, 8),
            (9, 0, 2),
        ] {
            let w = Tensor::uniform(&[out, inp], -1.0, 1.0, &mut rng);
            let a = Tensor::uniform(&[rank, inp], -1.0, 1.0, &mut rng);
            let b = Tensor::uniform(&[out, rank], -1.0, 1.0, &mut rng);
            let bias: Vec<f32> = (0..out).map(|_| rng.normal()).collect();
            let ab = LowRank::new(&a, &b).unwrap();
            let half = HalfTensor::from_f32(&w);
            for (name, wm) in [("f32", &w as &dyn WeightMatrix), ("f16", &half)] {
                for m in [2, 3, 8, 13, 16, 17] {
                    let x = Tensor::uniform(&[m, inp], -1.0, 1.0, &mut rng);
                    for (with_bias, post) in [(true, PostOp::Relu), (false, PostOp::Identity)] {
                        let bias = with_bias.then_some(&bias[..]);
                        let mut h = vec![0.0f32; m * rank];
                        a.matmul_t(x.data(), m, &mut h, false).unwrap();
                        let mut want = vec![f32::NAN; m * out];
                        linear_low_rank_into(wm, x.data(), m, &mut want, bias, (&h, &b), post)
                            .unwrap();
                        for threads in [1, 2, 3, 16] {
                            let pool = rayon::ThreadPoolBuilder::new()
                                .num_threads(threads)
                                .build()
                                .unwrap();
                            let mut y = vec![f32::NAN; m * out];
                            let fused = pool
                                .install(|| {
                                    wm.matmul_t_low_rank(x.data(), m, &mut y, bias, &ab, post)
                                })
                                .unwrap();
                            let what = format!("{name} {out}x{inp} rank {rank}, batch {m}, bias {with_bias}, {threads} threads");
                            if fused {
                                let same =
                                    y.iter().zip(&want).all(|(u, v)| u.to_bits() == v.to_bits());
                                assert!(same, "{what}");
                            } else {
                                assert!(y.iter().all(|v| v.is_nan()), "{what}: y touched");
                                assert!(m > 12, "{what}: not fused");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let a = Tensor::zeros(&[4, 8]);
        let b = Tensor::zeros(&[6, 4]);
        let ab = LowRank::new(&a, &b).unwrap();
        assert!(ab.check(6, 8, &[0.0; 8], &[0.0; 6]).is_ok());
        assert!(ab.check(8, 6, &[0.0; 6], &[0.0; 8]).is_err());
        assert!(ab.check(6, 8, &[0.0; 7], &[0.0; 6]).is_err());
        assert!(ab.check(6, 8, &[0.0; 8], &[0.0; 5]).is_err());
        assert!(LowRank::new(&a, &Tensor::zeros(&[6, 3])).is_err());
        assert!(LowRank::new(&Tensor::zeros(&[4]), &b).is_err());
    }

    /// A batch whose `m · rank` (or `m · out`) overflows is an error, not an overflow panic
    /// (debug) or a huge allocation (release) before the shape checks.
    #[test]
    fn overflowing_batch_sizes_are_errors() {
        let a = Tensor::zeros(&[2, 0]);
        let b = Tensor::zeros(&[3, 2]);
        let ab = LowRank::new(&a, &b).unwrap();
        let mut y = [0.0f32; 3];
        assert!(matches!(
            ab.apply_unfused_batch(&[], usize::MAX, &mut y),
            Err(TensorError::Overflow { .. })
        ));
        // x fits ([m, 0]), y's m · out overflows: an Overflow error, not `m * y_cols`.
        assert_eq!(
            crate::weight::check_matmul_operands("linear", usize::MAX, 0, 0, 3, 2),
            Err(TensorError::Overflow {
                op: "linear",
                shape: vec![usize::MAX, 2],
            })
        );
        assert!(matches!(
            crate::weight::check_matmul_operands("linear", 2, 0, 0, 3, 2),
            Err(TensorError::Length {
                expected: 4,
                found: 3,
                ..
            })
        ));
    }
}
