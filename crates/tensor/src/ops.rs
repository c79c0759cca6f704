//! Elementwise operations and reductions on f32 tensors.

use crate::error::{Result, TensorError};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

/// Elements per parallel task of an elementwise op, a multiple of 64 (64 KiB: a 250-row micro-batch of width
/// 1024 still makes 16 tasks). Elementwise results do not depend on how the work is split, so
/// any split is deterministic.
const PAR_CHUNK: usize = 1 << 14;

/// Columns per parallel task of [`Tensor::sum_rows`].
const SUM_ROWS_COLUMNS: usize = 64;

/// `f(a, b)` for each pair of `dst` and `src`, in parallel for large tensors.
fn zip_apply(dst: &mut [f32], src: &[f32], f: impl Fn(&mut f32, f32) + Sync + Send) {
    if dst.len() < 2 * PAR_CHUNK {
        dst.iter_mut().zip(src).for_each(|(a, &b)| f(a, b));
    } else {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(a, &b)| f(a, b)));
    }
}

/// `f(a)` for each element of `dst`, in parallel for large tensors.
fn apply(dst: &mut [f32], f: impl Fn(&mut f32) + Sync + Send) {
    if dst.len() < 2 * PAR_CHUNK {
        dst.iter_mut().for_each(f);
    } else {
        dst.par_chunks_mut(PAR_CHUNK)
            .for_each(|d| d.iter_mut().for_each(&f));
    }
}

/// A new `n`-element vector, written in parallel chunks of [`PAR_CHUNK`] (one chunk below
/// `2 * PAR_CHUNK`) by `fill(offset, chunk)`, straight into fresh memory: no zero-fill or copy
/// pass before the op's own. Private: each caller's `fill` is a loop over its whole chunk.
fn new_filled(n: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send) -> Vec<f32> {
    filled_into(Vec::with_capacity(n), n, fill)
}

/// [`new_filled`], or `None` where `n` floats cannot be allocated (the byte count overflows,
/// or the allocator has no such block): for sizes from untrusted shapes.
fn try_new_filled(
    n: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Option<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    Some(filled_into(v, n, fill))
}

/// `v` (empty, with room for `n` floats) filled as [`new_filled`] says.
fn filled_into(
    mut v: Vec<f32>,
    n: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let spare = &mut v.spare_capacity_mut()[..n];
    if n < 2 * PAR_CHUNK {
        fill(0, spare);
    } else {
        spare
            .par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(c, d)| fill(c * PAR_CHUNK, d));
    }
    // SAFETY: the capacity is at least n, and all n elements were written: the chunks cover
    // 0..n and every caller's `fill` writes each element of the chunk it is given.
    unsafe { v.set_len(n) };
    v
}

/// `f(src[k])` for every element, as a new vector (see [`new_filled`]).
fn map_new(src: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    new_filled(src.len(), |off, d| {
        for (o, &a) in d.iter_mut().zip(&src[off..]) {
            o.write(f(a));
        }
    })
}

/// Bit `i` set where `chunk[i] > 0` (at most 64 values; NaN is not positive), eight at a time
/// from fixed-size arrays so that the compares and the bit gathering vectorize: one word of a
/// ReLU's bit mask.
pub fn positive_bits(chunk: &[f32]) -> u64 {
    let mut word = 0u64;
    let mut eights = chunk.chunks_exact(8);
    for (j, eight) in (&mut eights).enumerate() {
        let eight: &[f32; 8] = eight.try_into().expect("chunks of 8");
        let mut byte = 0u64;
        for (i, &v) in eight.iter().enumerate() {
            byte |= u64::from(v > 0.0) << i;
        }
        word |= byte << (8 * j);
    }
    let done = chunk.len() - eights.remainder().len();
    for (i, &v) in eights.remainder().iter().enumerate() {
        word |= u64::from(v > 0.0) << (done + i);
    }
    word
}

/// Whether every element is finite (no NaN, no infinity): the exponent bits of 16 values at a
/// time OR-ed together without an early exit, so that the loop vectorizes (a whole 1024-wide
/// activation in about 60 ns on the 2-core Xeon, where `iter().all(is_finite)` takes one
/// element a cycle: 0.27 µs, a few percent of a batch-1 quantized layer).
///
/// ```
/// use nibble_tensor::ops::all_finite;
/// assert!(all_finite(&[0.0, -1.5, f32::MAX, f32::MIN_POSITIVE / 2.0]));
/// assert!(!all_finite(&[1.0, f32::NAN]) && !all_finite(&[f32::NEG_INFINITY]));
/// assert!(all_finite(&[]));
/// ```
pub fn all_finite(x: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    let mut sixteens = x.chunks_exact(16);
    for chunk in &mut sixteens {
        // A value is NaN or infinite exactly when its exponent bits are all set.
        let mut bad = 0u32;
        for &v in chunk {
            bad |= u32::from(v.to_bits() & EXP == EXP);
        }
        if bad != 0 {
            return false;
        }
    }
    sixteens.remainder().iter().all(|v| v.is_finite())
}

/// `n` zeros: calloc's below the parallel size; above it written in parallel chunks, since
/// calloc clears memory it reuses with one serial memset (a whole activation, e.g. a
/// gradient buffer a GEMM then overwrites).
///
/// ```
/// let z = nibble_tensor::ops::zeros_vec(1 << 20);
/// assert!(z.len() == 1 << 20 && z.iter().all(|&v| v == 0.0));
/// ```
pub fn zeros_vec(n: usize) -> Vec<f32> {
    if n < 2 * PAR_CHUNK {
        return vec![0.0; n];
    }
    new_filled(n, write_zeros)
}

/// [`zeros_vec`], or `None` where `n` floats cannot be allocated.
pub(crate) fn try_zeros_vec(n: usize) -> Option<Vec<f32>> {
    if n < 2 * PAR_CHUNK {
        return Some(vec![0.0; n]);
    }
    try_new_filled(n, write_zeros)
}

/// Zeros into a chunk of fresh memory.
fn write_zeros(_offset: usize, chunk: &mut [MaybeUninit<f32>]) {
    for o in chunk {
        o.write(0.0);
    }
}

/// A copy of `src`, written in parallel chunks for large sizes (straight into fresh memory,
/// so its pages are faulted in by every thread at once).
///
/// ```
/// let x: Vec<f32> = (0..300_000).map(|i| i as f32).collect();
/// assert_eq!(nibble_tensor::ops::copied_vec(&x), x);
/// ```
pub fn copied_vec(src: &[f32]) -> Vec<f32> {
    map_new(src, |v| v)
}

/// `f(a[k], b[k])` for every element (equal lengths), as a new vector.
fn zip_map_new(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    new_filled(a.len().min(b.len()), |off, d| {
        for ((o, &x), &y) in d.iter_mut().zip(&a[off..]).zip(&b[off..]) {
            o.write(f(x, y));
        }
    })
}

/// `max(v, 0)` with NaN kept: a select, not a branch, so that the loops using it vectorize.
#[inline(always)]
fn relu1(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// An elementwise step applied to a product's outputs once their sums are final, inside the
/// product's own pass over them (each task's tile of the output while it is in its caches)
/// instead of a pass of its own: [`WeightMatrix::matmul_t_fused`](crate::WeightMatrix::matmul_t_fused)'s
/// and [`gemm_segments_post`](crate::gemm::gemm_segments_post)'s `post`. Every form gives the
/// bits of the product followed by the step's own function ([`relu_in_place`]).
///
/// ```
/// use nibble_tensor::ops::PostOp;
/// let mut y = [-1.0f32, 2.0, -0.0, f32::NAN];
/// PostOp::Relu.apply(&mut y);
/// assert_eq!(&y[..3], &[0.0, 2.0, -0.0]);
/// assert!(y[3].is_nan());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PostOp {
    /// The outputs as the product leaves them.
    #[default]
    Identity,
    /// `max(v, 0)` with NaN kept, as [`relu_in_place`].
    Relu,
}

impl PostOp {
    /// The step on `ys`, on the calling thread (a tile of outputs).
    #[inline]
    pub fn apply(self, ys: &mut [f32]) {
        match self {
            PostOp::Identity => {}
            PostOp::Relu => ys.iter_mut().for_each(|v| *v = relu1(*v)),
        }
    }

    /// The step on one value.
    #[inline(always)]
    pub fn apply1(self, v: f32) -> f32 {
        match self {
            PostOp::Identity => v,
            PostOp::Relu => relu1(v),
        }
    }

    /// The step on all of `ys` as a pass of its own, on the pool for large sizes (where a
    /// product could not take it).
    pub fn apply_in_place(self, ys: &mut [f32]) {
        match self {
            PostOp::Identity => {}
            PostOp::Relu => relu_in_place(ys),
        }
    }
}

/// `max(v, 0)` for every element of `xs`, in place (NaN stays NaN): [`Tensor::relu`] for a
/// buffer an inference pass reuses, bit-identical to it.
pub fn relu_in_place(xs: &mut [f32]) {
    apply(xs, |v| *v = relu1(*v));
}

/// `dst[k] = src[k] + dst[k]` in place (equal lengths, else an error): the residual add of an
/// inference pass into the buffer holding the residual, bit-identical to `src.add(dst)` (f32
/// addition is commutative).
pub fn add_in_place(dst: &mut [f32], src: &[f32]) -> Result<()> {
    if dst.len() != src.len() {
        return Err(TensorError::ShapeMismatch {
            op: "add_in_place",
            lhs: vec![dst.len()],
            rhs: vec![src.len()],
        });
    }
    zip_apply(dst, src, |a, b| *a += b);
    Ok(())
}

/// Writes `row` into every row of `dst` (`dst.len()` a multiple of `row.len()`, else an
/// error): a bias broadcast into a reused output buffer, the start of [`crate::linear`]'s
/// output. Large outputs are filled on the rayon pool, whole rows per task (with one serial
/// 4 MiB pass per layer BigNet's batch-1024 forward took 58.8 ms on the 16-core Xeon, 52.4 ms
/// with this, in the same run).
///
/// ```
/// let mut y = vec![0.0f32; 6];
/// nibble_tensor::ops::fill_rows(&mut y, &[1.0, 2.0, 3.0]).unwrap();
/// assert_eq!(y, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
/// assert!(nibble_tensor::ops::fill_rows(&mut y, &[1.0; 4]).is_err());
/// ```
pub fn fill_rows(dst: &mut [f32], row: &[f32]) -> Result<()> {
    if dst.is_empty() && row.is_empty() {
        return Ok(());
    }
    if dst.len().checked_rem(row.len()) != Some(0) {
        return Err(TensorError::ShapeMismatch {
            op: "fill_rows",
            lhs: vec![dst.len()],
            rhs: vec![row.len()],
        });
    }
    let n = row.len();
    if dst.len() < 2 * PAR_CHUNK {
        dst.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(row));
    } else {
        // Whole rows per task, about PAR_CHUNK floats each.
        let rows_per_task = PAR_CHUNK.div_ceil(n).max(1);
        dst.par_chunks_mut(rows_per_task * n).for_each(|block| {
            block
                .chunks_exact_mut(n)
                .for_each(|r| r.copy_from_slice(row))
        });
    }
    Ok(())
}

/// `y[r, c] = y[r, c] · scale[c] + shift[c]` in place over the rows of `ys` (`scale` and
/// `shift` one row long, `ys` whole rows, else an error): a per-output scale and offset, as
/// DoRA's `scale ⊙ z + bias` (a multiply, then an add, not a fused multiply-add).
///
/// ```
/// let mut y = vec![1.0f32, 2.0, 3.0, 4.0];
/// nibble_tensor::ops::scale_shift_rows(&mut y, &[2.0, -1.0], &[0.5, 0.0]).unwrap();
/// assert_eq!(y, [2.5, -2.0, 6.5, -4.0]);
/// assert!(nibble_tensor::ops::scale_shift_rows(&mut y, &[1.0; 3], &[0.0; 3]).is_err());
/// ```
pub fn scale_shift_rows(ys: &mut [f32], scale: &[f32], shift: &[f32]) -> Result<()> {
    check_row_op("scale_shift_rows", ys.len(), scale.len(), shift.len())?;
    for_row_blocks(ys, scale.len(), |row| {
        for ((v, s), b) in row.iter_mut().zip(scale).zip(shift) {
            *v = *v * s + b;
        }
    });
    Ok(())
}

/// [`scale_shift_rows`] of `xs` into a new vector (written in parallel straight into fresh
/// memory: no copy of `xs` first), the same bits.
///
/// ```
/// let y = nibble_tensor::ops::scale_shift_rows_from(&[1.0, 2.0, 3.0, 4.0], &[2.0, -1.0], &[0.5, 0.0]).unwrap();
/// assert_eq!(y, [2.5, -2.0, 6.5, -4.0]);
/// ```
pub fn scale_shift_rows_from(xs: &[f32], scale: &[f32], shift: &[f32]) -> Result<Vec<f32>> {
    check_row_op("scale_shift_rows_from", xs.len(), scale.len(), shift.len())?;
    let d = scale.len().max(1);
    Ok(new_filled(xs.len(), |off, out| {
        // The column of the chunk's first element, then one step a element.
        let mut c = off % d;
        for (v, &x) in out.iter_mut().zip(&xs[off..]) {
            v.write(x * scale[c] + shift[c]);
            c = if c + 1 == d { 0 } else { c + 1 };
        }
    }))
}

/// `y[r, c] = y[r, c] · scale[c]` in place over the rows of `ys` (`ys` whole rows of
/// `scale.len()`, else an error), in parallel for large `ys`: a per-column scale (the
/// gradient of [`scale_shift_rows`] with respect to its input).
///
/// ```
/// let mut g = vec![1.0f32, 2.0, 3.0, 4.0];
/// nibble_tensor::ops::scale_rows(&mut g, &[2.0, -1.0]).unwrap();
/// assert_eq!(g, [2.0, -2.0, 6.0, -4.0]);
/// ```
pub fn scale_rows(ys: &mut [f32], scale: &[f32]) -> Result<()> {
    check_row_op("scale_rows", ys.len(), scale.len(), scale.len())?;
    for_row_blocks(ys, scale.len(), |row| {
        row.iter_mut().zip(scale).for_each(|(v, s)| *v *= s);
    });
    Ok(())
}

/// An error naming `op` unless `len` elements are whole rows of `d` (`d` > 0 where `len` > 0)
/// and the shift has `d` values (`shift == d`).
fn check_row_op(op: &'static str, len: usize, d: usize, shift: usize) -> Result<()> {
    if shift != d || (d == 0 && len != 0) || len.checked_rem(d).unwrap_or(0) != 0 {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: vec![len],
            rhs: vec![d, shift],
        });
    }
    Ok(())
}

/// `f(row)` for each row of `d` elements of `ys`, whole rows per task (about [`PAR_CHUNK`]
/// elements each) on the rayon pool where `ys` is large; each row's result does not depend on
/// the split.
fn for_row_blocks(ys: &mut [f32], d: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    let d = d.max(1);
    if ys.len() < 2 * PAR_CHUNK {
        ys.chunks_exact_mut(d).for_each(f);
    } else {
        let rows_per_task = PAR_CHUNK.div_ceil(d).max(1);
        ys.par_chunks_mut(rows_per_task * d)
            .for_each(|block| block.chunks_exact_mut(d).for_each(&f));
    }
}

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: a.shape().to_vec(),
            rhs: b.shape().to_vec(),
        });
    }
    Ok(())
}

impl Tensor {
    /// `self + other`, elementwise (shapes must be equal).
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        same_shape("add", self, other)?;
        Ok(self.with_same_shape(zip_map_new(self.data(), other.data(), |a, b| a + b)))
    }

    /// `self += other`, elementwise (shapes must be equal).
    pub fn add_assign(&mut self, other: &Tensor) -> Result<()> {
        same_shape("add", self, other)?;
        zip_apply(self.data_mut(), other.data(), |a, b| *a += b);
        Ok(())
    }

    /// `self += alpha * other`, elementwise (shapes must be equal).
    pub fn axpy(&mut self, alpha: f32, other: &Tensor) -> Result<()> {
        same_shape("axpy", self, other)?;
        zip_apply(self.data_mut(), other.data(), |a, b| *a += alpha * b);
        Ok(())
    }

    /// `self * other`, elementwise (shapes must be equal).
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        same_shape("mul", self, other)?;
        Ok(self.with_same_shape(zip_map_new(self.data(), other.data(), |a, b| a * b)))
    }

    /// `s * self`.
    pub fn scale(&self, s: f32) -> Tensor {
        let mut out = self.clone();
        out.scale_assign(s);
        out
    }

    /// `self *= s`.
    pub fn scale_assign(&mut self, s: f32) {
        apply(self.data_mut(), |v| *v *= s);
    }

    /// A copy, written in parallel chunks for large tensors (`clone` copies on one thread: a
    /// serial pass over a whole activation, e.g. the residual add's gradient going two ways).
    pub fn parallel_clone(&self) -> Tensor {
        self.with_same_shape(copied_vec(self.data()))
    }

    /// `max(self, 0)`, elementwise. NaN stays NaN.
    pub fn relu(&self) -> Tensor {
        self.with_same_shape(map_new(self.data(), relu1))
    }

    /// `max(self, 0)` (as [`Tensor::relu`]) and, in the same pass, which outputs are positive,
    /// one bit each (bit `i % 64` of word `i / 64`, as [`positive_bits`] sets them): a recorded
    /// ReLU's output and its mask without a second pass over the output.
    pub fn relu_with_positive_bits(&self) -> (Tensor, Vec<u64>) {
        let src = self.data();
        let words: Vec<AtomicU64> = (0..src.len().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        // Chunks start at multiples of PAR_CHUNK, a multiple of 64: each word is one chunk's.
        let data = new_filled(src.len(), |off, d| {
            let x = &src[off..off + d.len()];
            for (o, &a) in d.iter_mut().zip(x) {
                o.write(relu1(a));
            }
            for (k, x64) in x.chunks(64).enumerate() {
                // relu1(a) > 0 exactly where a > 0 (NaN stays NaN, not positive).
                words[off / 64 + k].store(positive_bits(x64), Ordering::Relaxed);
            }
        });
        let words = words.into_iter().map(AtomicU64::into_inner).collect();
        (self.with_same_shape(data), words)
    }

    /// [`Tensor::relu_with_positive_bits`] in place: `self = max(self, 0)` and, in the same
    /// pass, which elements are positive, one bit each (the same bits and words): a recorded
    /// ReLU whose input no one else holds, without a new output buffer.
    ///
    /// ```
    /// use nibble_tensor::Tensor;
    /// let mut t = Tensor::from_vec(&[3], vec![-1.0, 2.0, 0.0]).unwrap();
    /// let words = t.relu_assign_with_positive_bits();
    /// assert_eq!(t.data(), &[0.0, 2.0, 0.0]);
    /// assert_eq!(words, vec![0b010]);
    /// ```
    pub fn relu_assign_with_positive_bits(&mut self) -> Vec<u64> {
        let data = self.data_mut();
        let words: Vec<AtomicU64> = (0..data.len().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        // Chunks start at multiples of PAR_CHUNK, a multiple of 64: each word is one chunk's.
        let body = |off: usize, chunk: &mut [f32]| {
            for (k, x64) in chunk.chunks_mut(64).enumerate() {
                // Positive before the ReLU exactly where positive after it.
                words[off / 64 + k].store(positive_bits(x64), Ordering::Relaxed);
                for v in x64 {
                    *v = relu1(*v);
                }
            }
        };
        if data.len() < 2 * PAR_CHUNK {
            body(0, data);
        } else {
            data.par_chunks_mut(PAR_CHUNK)
                .enumerate()
                .for_each(|(c, d)| body(c * PAR_CHUNK, d));
        }
        words.into_iter().map(AtomicU64::into_inner).collect()
    }

    /// A `[m, row.len()]` tensor whose every row is `row` (a bias broadcast over a batch),
    /// written once, in parallel for large sizes.
    ///
    /// ```
    /// use nibble_tensor::Tensor;
    /// let t = Tensor::repeat_row(&[1.0, 2.0], 3).unwrap();
    /// assert_eq!(t.shape(), &[3, 2]);
    /// assert_eq!(t.data(), &[1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
    /// ```
    pub fn repeat_row(row: &[f32], m: usize) -> Result<Tensor> {
        let shape = [m, row.len()];
        let n = crate::error::checked_numel("repeat_row", &shape)?;
        let data = try_new_filled(n, |off, d| {
            if row.is_empty() {
                return;
            }
            // Whole runs of the row (a copy loop that vectorizes), starting mid-row.
            let mut col = off % row.len();
            let mut k = 0;
            while k < d.len() {
                let len = (row.len() - col).min(d.len() - k);
                for (o, &v) in d[k..k + len].iter_mut().zip(&row[col..col + len]) {
                    o.write(v);
                }
                k += len;
                col = 0;
            }
        })
        .ok_or_else(|| crate::error::alloc_error::<f32>("repeat_row", &shape, n))?;
        Tensor::from_vec(&shape, data)
    }

    /// `self = max(self, 0)` in place. NaN stays NaN.
    pub fn relu_assign(&mut self) {
        relu_in_place(self.data_mut());
    }

    /// Adds `row` to every row of a rank-2 tensor (a bias), or errors on a length mismatch.
    pub fn add_row(&mut self, row: &[f32]) -> Result<()> {
        let (_, n) = self.dims2("add_row")?;
        if row.len() != n {
            return Err(TensorError::ShapeMismatch {
                op: "add_row",
                lhs: self.shape().to_vec(),
                rhs: vec![row.len()],
            });
        }
        if let Some(rows_per_task) = PAR_CHUNK.checked_div(n) {
            let rows_per_task = rows_per_task.max(1);
            self.data_mut()
                .par_chunks_mut(n * rows_per_task)
                .for_each(|block| {
                    block.chunks_exact_mut(n).for_each(|r| {
                        r.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                    })
                });
        }
        Ok(())
    }

    /// Adds an f16 `row` (widened to f32) to every row of a rank-2 tensor: an f16 bias.
    pub fn add_row_f16(&mut self, row: &[half::f16]) -> Result<()> {
        let (_, n) = self.dims2("add_row_f16")?;
        if row.len() != n {
            return Err(TensorError::ShapeMismatch {
                op: "add_row_f16",
                lhs: self.shape().to_vec(),
                rhs: vec![row.len()],
            });
        }
        // Widen the row once, not once per row of the tensor.
        let wide: Vec<f32> = row.iter().map(|v| v.to_f32()).collect();
        self.add_row(&wide)
    }

    /// Sum of all elements, accumulated in f64 (deterministic, order-independent of threads).
    pub fn sum(&self) -> f32 {
        self.data().iter().map(|&v| v as f64).sum::<f64>() as f32
    }

    /// Mean of all elements (NaN for an empty tensor).
    pub fn mean(&self) -> f32 {
        (self.data().iter().map(|&v| v as f64).sum::<f64>() / self.numel() as f64) as f32
    }

    /// The first NaN or infinite element, for messages: where it is (`(row r, col c)` for a
    /// matrix, `index i` otherwise) and its value; `None` if every element is finite.
    ///
    /// ```
    /// # use nibble_tensor::Tensor;
    /// let t = Tensor::from_vec(&[2, 3], vec![0.0, 1.0, 2.0, 3.0, f32::NAN, 5.0]).unwrap();
    /// let (at, value) = t.first_non_finite().unwrap();
    /// assert_eq!(at, "(row 1, col 1)");
    /// assert!(value.is_nan());
    /// ```
    pub fn first_non_finite(&self) -> Option<(String, f32)> {
        let i = self.data().iter().position(|v| !v.is_finite())?;
        let at = match self.shape() {
            &[_, cols] if cols > 0 => format!("(row {}, col {})", i / cols, i % cols),
            _ => format!("index {i}"),
        };
        Some((at, self.data()[i]))
    }

    /// Largest absolute value (0 for an empty tensor; NaN if any element is NaN).
    pub fn max_abs(&self) -> f32 {
        self.data().iter().fold(0.0f32, |m, &v| {
            if v.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(v.abs())
            }
        })
    }

    /// Column sums of a rank-2 tensor `[m, n]` -> `[n]` (e.g. a bias gradient), accumulated
    /// row by row in order, so the result does not depend on the thread count.
    ///
    /// Large tensors are split over the rayon pool by blocks of columns, each summed over every
    /// row in the same order as one thread would: the same bits for any thread count.
    pub fn sum_rows(&self) -> Result<Tensor> {
        let (_, n) = self.dims2("sum_rows")?;
        let mut out = vec![0.0f32; n];
        let data = self.data();
        let sum_block = |(b, block): (usize, &mut [f32])| {
            let c0 = b * SUM_ROWS_COLUMNS;
            for r in data.chunks_exact(n) {
                block.iter_mut().zip(&r[c0..]).for_each(|(a, v)| *a += v);
            }
        };
        if n > 0 && data.len() < 2 * PAR_CHUNK {
            out.chunks_mut(SUM_ROWS_COLUMNS)
                .enumerate()
                .for_each(sum_block);
        } else if n > 0 {
            out.par_chunks_mut(SUM_ROWS_COLUMNS)
                .enumerate()
                .for_each(sum_block);
        }
        Tensor::from_vec(&[n], out)
    }

    /// Max and mean of `|self - other|` (shapes must be equal).
    pub fn abs_diff_stats(&self, other: &Tensor) -> Result<(f32, f32)> {
        same_shape("abs_diff_stats", self, other)?;
        let mut max = 0.0f32;
        let mut sum = 0.0f64;
        for (a, b) in self.data().iter().zip(other.data()) {
            let d = (a - b).abs();
            if d.is_nan() || d > max {
                max = if d.is_nan() { f32::NAN } else { d };
            }
            sum += d as f64;
        }
        Ok((max, (sum / self.numel().max(1) as f64) as f32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small and pool-sized outputs (odd row widths, so tasks do not start on a row boundary of
    /// a power of two) hold `row` in every row, on 1 and 3 threads.
    #[test]
    fn fill_rows_fills_every_row_serial_and_parallel() {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (rows, cols) in [(1, 1), (3, 7), (1000, 33), (777, 1023)] {
                let row: Vec<f32> = (0..cols).map(|j| j as f32 * 0.5 - 3.0).collect();
                let mut y = vec![f32::NAN; rows * cols];
                pool.install(|| fill_rows(&mut y, &row)).unwrap();
                for (r, got) in y.chunks_exact(cols).enumerate() {
                    assert_eq!(got, &row[..], "row {r} of {rows}x{cols}, {threads} threads");
                }
            }
        }
    }

    /// A NaN or an infinity at any place of awkward lengths (inside a chunk of 16, at its
    /// edges, in the tail) is found; finite extremes and subnormals are not flagged.
    #[test]
    fn all_finite_finds_every_non_finite_value() {
        for n in [0usize, 1, 7, 15, 16, 17, 31, 33, 63, 129, 1023] {
            let x: Vec<f32> = (0..n)
                .map(|k| match k % 4 {
                    0 => f32::MAX,
                    1 => -f32::MIN_POSITIVE / 4.0,
                    2 => -0.0,
                    _ => k as f32 - 100.0,
                })
                .collect();
            assert!(all_finite(&x), "finite, n = {n}");
            for k in 0..n {
                for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut y = x.clone();
                    y[k] = bad;
                    assert!(!all_finite(&y), "{bad} at {k} of {n}");
                }
            }
        }
    }

    #[test]
    fn elementwise_ops_check_shapes_and_compute() {
        let a = Tensor::from_vec(&[2, 2], vec![1., -2., 3., -4.]).unwrap();
        let b = Tensor::from_vec(&[2, 2], vec![0.5, 0.5, 2., 2.]).unwrap();
        assert_eq!(a.add(&b).unwrap().data(), &[1.5, -1.5, 5., -2.]);
        assert_eq!(a.mul(&b).unwrap().data(), &[0.5, -1., 6., -8.]);
        assert_eq!(a.relu().data(), &[1., 0., 3., 0.]);
        assert_eq!(a.scale(2.0).data(), &[2., -4., 6., -8.]);
        assert_eq!(a.sum(), -2.0);
        assert_eq!(a.mean(), -0.5);
        assert_eq!(a.max_abs(), 4.0);
        assert_eq!(a.sum_rows().unwrap().data(), &[4., -6.]);
        let c = Tensor::zeros(&[4]);
        let err = a.add(&c).unwrap_err();
        assert_eq!(
            err,
            TensorError::ShapeMismatch {
                op: "add",
                lhs: vec![2, 2],
                rhs: vec![4]
            }
        );
        let mut d = a.clone();
        d.add_row(&[10., 20.]).unwrap();
        assert_eq!(d.data(), &[11., 18., 13., 16.]);
        assert!(d.add_row(&[1.0]).is_err());
        assert!(Tensor::from_vec(&[1], vec![f32::NAN])
            .unwrap()
            .max_abs()
            .is_nan());
    }

    /// The ops that write fresh memory chunk by chunk give the plain loop's values on sizes
    /// below, at and across the parallel threshold, with rows that do not divide a chunk.
    #[test]
    fn fresh_outputs_match_plain_loops() {
        let mut rng = crate::Rng::new(3);
        for (m, n) in [
            (0, 5),
            (3, 0),
            (1, 1),
            (7, 33),
            (129, 1023),
            (64, 1024),
            (300, 700),
            (2, 40000),
        ] {
            let a = Tensor::uniform(&[m, n], -1.0, 1.0, &mut rng);
            let b = Tensor::uniform(&[m, n], -1.0, 1.0, &mut rng);
            let row: Vec<f32> = (0..n).map(|k| k as f32 - 0.5).collect();
            let (ad, bd) = (a.data(), b.data());
            let sum: Vec<f32> = ad.iter().zip(bd).map(|(x, y)| x + y).collect();
            let prod: Vec<f32> = ad.iter().zip(bd).map(|(x, y)| x * y).collect();
            let relu: Vec<f32> = ad.iter().map(|&x| x.max(0.0)).collect();
            assert_eq!(a.add(&b).unwrap().data(), &sum[..], "add {m}x{n}");
            assert_eq!(a.mul(&b).unwrap().data(), &prod[..], "mul {m}x{n}");
            assert_eq!(a.relu().data(), &relu[..], "relu {m}x{n}");
            assert_eq!(a.relu().shape(), &[m, n]);
            let r = Tensor::repeat_row(&row, m).unwrap();
            assert_eq!(r.shape(), &[m, n]);
            let want: Vec<f32> = (0..m).flat_map(|_| row.iter().copied()).collect();
            assert_eq!(r.data(), &want[..], "repeat_row {m}x{n}");
            // Column sums in row order, bit for bit, and copies and zeros of every size.
            let mut col_sums = vec![0.0f32; n];
            for r in ad.chunks_exact(n.max(1)) {
                col_sums.iter_mut().zip(r).for_each(|(s, v)| *s += v);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let sums = a.sum_rows().unwrap();
            assert_eq!(bits(sums.data()), bits(&col_sums), "sum_rows {m}x{n}");
            assert_eq!(a.parallel_clone(), a, "parallel_clone {m}x{n}");
            assert_eq!(a.rows(0, m).unwrap().to_tensor(), a, "to_tensor {m}x{n}");
            let z = Tensor::zeros(&[m, n]);
            assert!(z.shape() == [m, n] && z.data().iter().all(|&v| v.to_bits() == 0));
        }
        assert!(Tensor::repeat_row(&[1.0; 4], usize::MAX).is_err());
        let nan = Tensor::from_vec(&[2], vec![f32::NAN, -1.0]).unwrap().relu();
        assert!(nan.data()[0].is_nan() && nan.data()[1] == 0.0);
    }
}
