//! Weight matrices that a linear layer multiplies by, whatever their storage: the
//! [`WeightMatrix`] trait and its dense f32 and f16 implementations. The quant crate implements
//! it for each quantized format, so a model's layers differ only in which weight they hold.

use crate::cpu::kernel_path;
use crate::error::{Result, TensorError};
use crate::gemm::gemv::{
    dense_low_rank, gemv_fits, gemv_fits_f16, gemv_t_f16, gemv_t_f32, gemv_t_low_rank, DenseBatch1,
};
use crate::gemm::{
    gemm, gemm_segments, gemm_segments_bias_post, gemm_segments_post, MatRef, PackB, Segment, NR,
};
use crate::half_tensor::HalfTensor;
use crate::lowrank::LowRank;
use crate::ops::{fill_rows, PostOp};
use crate::tensor::Tensor;
use std::ops::Range;

/// A dense f32 `w`'s batch-1 product by ranges of rows, as [`WeightMatrix::batch1_rows`] gives
/// it (the same kernel, the same bits) but without the box: for callers that make one per
/// layer on every thread of a team, such as a LoRA adapter's `A x` and `B h` (an allocation
/// per member and layer is a write to the allocator's shared state, which the team's members
/// would all make at the same moment). `None` unless `w` is a matrix and `x` has a value per
/// column.
///
/// ```
/// use nibble_tensor::weight::{dense_batch1_rows, Batch1Rows};
/// use nibble_tensor::Tensor;
/// let w = Tensor::from_vec(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
/// let x = [1.0f32, 1.0];
/// let rows = dense_batch1_rows(&w, &x).unwrap();
/// let mut y = [0.0f32; 2];
/// rows.rows(0..2, &mut y, false).unwrap();
/// assert_eq!(y, [3.0, 7.0]);
/// ```
pub fn dense_batch1_rows<'a>(w: &'a Tensor, x: &'a [f32]) -> Option<impl Batch1Rows + 'a> {
    let (o, i) = w.dims2("linear").ok()?;
    DenseBatch1::new(w.data(), o, i, x)
}

/// Row granularity of [`Batch1Rows::rows`]: ranges start at multiples of it (the batch-1
/// kernels process rows in groups of 4, and a row's bits must not depend on the split).
pub const BATCH1_ROW_ALIGN: usize = 4;

/// A batch-1 product `y = x · Wᵀ` prepared for one vector `x` (see
/// [`WeightMatrix::batch1_rows`]), computed a range of output rows at a time on the calling
/// thread: for callers that split the rows themselves (a [`crate::team`] of threads running a
/// whole forward pass).
pub trait Batch1Rows: Send + Sync {
    /// `y[j] = W[rows.start + j] · x` (`+=` with `accumulate`) for every row in `rows`, on the
    /// calling thread: the bits [`WeightMatrix::matmul_t`] gives those rows at `m = 1`, for
    /// any `rows.start` that is a multiple of [`BATCH1_ROW_ALIGN`]. An error (and `y`
    /// untouched) when `rows` does not fit W or `y.len() != rows.len()`.
    fn rows(&self, rows: Range<usize>, y: &mut [f32], accumulate: bool) -> Result<()>;
}

/// Checks a [`Batch1Rows::rows`] call against a W of `out` rows.
pub fn check_batch1_rows(out: usize, rows: &Range<usize>, y: &[f32]) -> Result<()> {
    if rows.start > rows.end
        || rows.end > out
        || y.len() != rows.len()
        || !rows.start.is_multiple_of(BATCH1_ROW_ALIGN)
    {
        return Err(TensorError::ShapeMismatch {
            op: "batch1_rows",
            lhs: vec![rows.start, rows.end, y.len()],
            rhs: vec![out],
        });
    }
    Ok(())
}

/// A frozen `out x in` weight matrix `W` (PyTorch's `nn.Linear.weight` layout).
pub trait WeightMatrix: Send + Sync + std::fmt::Debug {
    /// Rows of W (output features); 0 for a weight that is no matrix (a [`Tensor`] of another
    /// rank: [`dims`](Self::dims) says why).
    fn out_features(&self) -> usize;
    /// Columns of W (input features); 0 for a weight that is no matrix.
    fn in_features(&self) -> usize;
    /// `(out_features, in_features)`, or an error naming `op` where the weight is no matrix (a
    /// [`Tensor`] or [`HalfTensor`] of a rank other than 2). Every product checks it first.
    ///
    /// ```
    /// use nibble_tensor::{linear, Tensor, WeightMatrix};
    /// let x = Tensor::from_vec(&[1, 3], vec![1.0, 2.0, 3.0]).unwrap();
    /// let w = Tensor::zeros(&[3]);
    /// assert!(w.dims("linear").is_err());
    /// assert!(linear(&x, &w, None).is_err());
    /// ```
    fn dims(&self, op: &'static str) -> Result<(usize, usize)> {
        let _ = op;
        Ok((self.out_features(), self.in_features()))
    }
    /// Forward: `y[m, out] = x[m, in] · Wᵀ` (`y += ...` with `accumulate`).
    fn matmul_t(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) -> Result<()>;
    /// Batch 1 with a low-rank adapter: `y[out] = x[in] · Wᵀ + B (A x)` (`y += ...` with
    /// `accumulate`), the same bit for bit as [`WeightMatrix::matmul_t`] at `m = 1` followed by
    /// [`LowRank::apply_unfused`] (what a training forward computes). This default runs the
    /// three products one after the other; the dense and quantized weights fuse the adapter into
    /// their own parallel pass (see [`crate::lowrank`]), which saves the two fork-joins of the
    /// pool that the adapter's products would take.
    fn matvec_t_low_rank(
        &self,
        x: &[f32],
        y: &mut [f32],
        accumulate: bool,
        adapter: &LowRank<'_>,
    ) -> Result<()> {
        let (o, i) = self.dims("linear")?;
        adapter.check(o, i, x, y)?;
        self.matmul_t(x, 1, y, accumulate)?;
        adapter.apply_unfused(x, y)
    }
    /// A small batch with a low-rank adapter: `y[m, out] = post(bias + x · Wᵀ + (x · Aᵀ) ·
    /// Bᵀ)` in one parallel pass ([`crate::lowrank::fused_matmul`]: the adapter's products and
    /// `post` inside the pass over the tiles of W's rows) where this weight runs `m` vectors
    /// as GEMVs over tiles of rows and [`LowRank::fuses_batch`] holds: `Ok(true)`, with the
    /// bits of filling `y` with the bias rows, [`matmul_t`](Self::matmul_t) accumulating onto
    /// them (without a bias, writing `y`), [`LowRank::apply_unfused_batch`] and `post` (what
    /// [`linear_low_rank_into`] computes there, with `h = x · Aᵀ` from A's `matmul_t`). A
    /// quantized weight whose int8 activations run the batch on its integer GEMM computes the
    /// layer there, `h` from the same int8 x (`nibble_quant::act8::adapter`), and returns
    /// `Ok(true)` too. `Ok(false)`, with `y` untouched, elsewhere; the default. Shapes: `x` `[m, in]`, `y`
    /// `[m, out]`, `bias` `[out]`.
    fn matmul_t_low_rank(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        bias: Option<&[f32]>,
        adapter: &LowRank<'_>,
        post: PostOp,
    ) -> Result<bool> {
        let _ = (x, m, y, bias, adapter, post);
        Ok(false)
    }
    /// The batch-1 product with `x` `[in]` by ranges of rows ([`Batch1Rows`]), prepared on
    /// the calling thread; `None` where `x` is not `[in]` or the weight runs batch 1 some other
    /// way (a driver of its own), and the caller then uses [`matmul_t`](Self::matmul_t). The
    /// default is `None`.
    fn batch1_rows<'a>(&'a self, x: &'a [f32]) -> Option<Box<dyn Batch1Rows + 'a>> {
        let _ = x;
        None
    }
    /// Input gradient: `dx[m, in] = dy[m, out] · W` (`dx += ...` with `accumulate`).
    fn matmul(&self, dy: &[f32], m: usize, dx: &mut [f32], accumulate: bool) -> Result<()>;
    /// W as f32 (dequantized where the storage is quantized).
    fn to_f32(&self) -> Tensor;
    /// Bytes the weight occupies in memory (codes, scales and all).
    fn storage_bytes(&self) -> usize;
    /// A short name of the storage format (`"f32"`, `"f16"`, `"q4"`, ...).
    fn format_name(&self) -> &'static str;

    /// `Wᵀ` as the right operand of a GEMM, where [`matmul_t`](Self::matmul_t) of `m` rows
    /// multiplies through [`gemm`] with it (so a fused call gives its bits); `None` where `m`
    /// rows take another kernel (a GEMV, a tile kernel, int8 activations). The default is
    /// `None`, which makes [`matmul_t_fused`](Self::matmul_t_fused) run its parts one by one.
    fn gemm_rhs(&self, m: usize) -> Option<Box<dyn PackB + '_>> {
        let _ = m;
        None
    }

    /// `y[m, out] = post(bias + x · Wᵀ (+ a · b))` (`bias` `[out]` where given, `extra =
    /// (a, b)` a LoRA adapter's `h · Bᵀ` where given) in one pass where the format has one
    /// outside the GEMM (a quantized format's int8-activation product writes `post(bias + v)`
    /// as it stores each value, and adds `a · b` to each run of outputs it stores, instead of
    /// a pass that fills y with the bias rows, a product that reads them back and passes for
    /// the extra and `post`), with the bits of those steps; `Ok(false)`, with `y` untouched,
    /// where it has none (the default) or declines. [`matmul_t_fused`](Self::matmul_t_fused)
    /// asks it first where the product does not run through the GEMM. Shapes as
    /// `matmul_t_fused`.
    fn matmul_t_one_pass(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        bias: Option<&[f32]>,
        extra: Option<Segment<'_>>,
        post: PostOp,
    ) -> Result<bool> {
        let _ = (x, m, y, bias, extra, post);
        Ok(false)
    }

    /// `y[m, out] = post(bias + x · Wᵀ (+ extra))` where `bias` is a `1 x out` operand (one
    /// row), `extra` another product `a [m, k] · b [k, out]` (a LoRA adapter's `h · Bᵀ`) and
    /// `post` an elementwise step (a ReLU after the layer): in one pass over `y`
    /// ([`gemm_segments_bias_post`], the bias added by the first block's stores) where the
    /// product runs through the GEMM, else part by part. Either way the bits are those of
    /// writing the bias rows, then [`matmul_t`](Self::matmul_t) with `accumulate`, then
    /// `extra` accumulated by [`gemm`], then `post`. Without a bias, `y` is only written.
    ///
    /// ```
    /// use nibble_tensor::gemm::MatRef;
    /// use nibble_tensor::ops::PostOp;
    /// use nibble_tensor::{Tensor, WeightMatrix};
    /// let w = Tensor::from_vec(&[2, 2], vec![1., 0., 0., 1.]).unwrap();
    /// let bias = [0.5f32, -1.5];
    /// let x = vec![1.0f32; 2 * 20]; // 20 rows: the GEMM path
    /// let mut y = vec![f32::NAN; 2 * 20];
    /// let b = MatRef::row_major(&bias, 1, 2).unwrap();
    /// w.matmul_t_fused(&x, 20, &mut y, Some(&b), None, PostOp::Identity).unwrap();
    /// assert_eq!(&y[..2], &[1.5, -0.5]);
    /// w.matmul_t_fused(&x, 20, &mut y, Some(&b), None, PostOp::Relu).unwrap();
    /// assert_eq!(&y[..2], &[1.5, 0.0]);
    /// ```
    fn matmul_t_fused(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        bias: Option<&dyn PackB>,
        extra: Option<Segment<'_>>,
        post: PostOp,
    ) -> Result<()> {
        let (o, i) = self.dims("linear")?;
        check_matmul_operands("linear", m, x.len(), i, y.len(), o)?;
        let values = bias.map(|b| bias_values(b, o)).transpose()?;
        if let Some(rhs) = self.gemm_rhs(m) {
            let mut segs = Vec::with_capacity(2);
            segs.push(Segment {
                a: MatRef::row_major(x, m, i)?,
                b: &*rhs,
            });
            segs.extend(extra);
            return gemm_segments_bias_post(&segs, values.as_deref(), y, false, post);
        }
        if extra.is_some() && self.matmul_t_one_pass(x, m, y, values.as_deref(), extra, post)? {
            return Ok(());
        }
        // `post` goes with the last part: the biased product where no extra follows it, else
        // the extra's pass over y (or a pass of its own).
        let last_is_biased = extra.is_none();
        let mut pending = post;
        match values {
            Some(values) => {
                let biased_post = if last_is_biased {
                    post
                } else {
                    PostOp::Identity
                };
                if self.matmul_t_one_pass(x, m, y, Some(&values), None, biased_post)? {
                    if last_is_biased {
                        pending = PostOp::Identity;
                    }
                } else {
                    fill_rows(y, &values)?;
                    self.matmul_t(x, m, y, true)?;
                }
            }
            None => self.matmul_t(x, m, y, false)?,
        }
        match extra {
            // The step inside the extra product's pass over y.
            Some(seg) => gemm_segments_post(&[seg], y, true, pending)?,
            None => pending.apply_in_place(y),
        }
        Ok(())
    }

    /// `W` as the right operand of the input gradient `dx = dy · W` (k = out, n = in), where
    /// [`matmul`](Self::matmul) of `m` rows multiplies through [`gemm`] with it (so a fused
    /// call gives its bits); `None` where `m` rows take another kernel (int8 activations). The
    /// default is `None`, which makes [`matmul_fused`](Self::matmul_fused) run its parts one
    /// by one.
    fn gemm_rhs_backward(&self, m: usize) -> Option<Box<dyn PackB + '_>> {
        let _ = m;
        None
    }

    /// `dx[m, in] = first + dy[m, out] · W` (`dx += ...` with `accumulate`), where `first` is
    /// another product `a [m, k] · b [k, in]` (a LoRA adapter's `dH · A`): in one pass over
    /// `dx` ([`gemm_segments`]) where the input gradient runs through the GEMM, else part by
    /// part. Either way the bits are those of `first` by [`gemm`] (accumulated with
    /// `accumulate`), then [`matmul`](Self::matmul) accumulated.
    ///
    /// ```
    /// use nibble_tensor::gemm::MatRef;
    /// use nibble_tensor::{Tensor, WeightMatrix};
    /// let w = Tensor::from_vec(&[2, 2], vec![1., 0., 0., 1.]).unwrap();
    /// let (dh, a) = ([1.0f32], [0.5f32, -0.5]); // 1x1 and 1x2
    /// let first = MatRef::row_major(&dh, 1, 1).unwrap();
    /// let a = MatRef::row_major(&a, 1, 2).unwrap();
    /// let mut dx = [f32::NAN; 2];
    /// let seg = nibble_tensor::gemm::Segment { a: first, b: &a };
    /// w.matmul_fused(&[1.0, 2.0], 1, &mut dx, false, Some(seg)).unwrap();
    /// assert_eq!(dx, [1.5, 1.5]);
    /// ```
    fn matmul_fused(
        &self,
        dy: &[f32],
        m: usize,
        dx: &mut [f32],
        accumulate: bool,
        first: Option<Segment<'_>>,
    ) -> Result<()> {
        let (o, i) = self.dims("linear_backward_input")?;
        check_matmul_operands("linear_backward_input", m, dy.len(), o, dx.len(), i)?;
        let Some(first) = first else {
            return self.matmul(dy, m, dx, accumulate);
        };
        if let Some(rhs) = self.gemm_rhs_backward(m) {
            let product = Segment {
                a: MatRef::row_major(dy, m, o)?,
                b: &*rhs,
            };
            return gemm_segments(&[first, product], dx, accumulate);
        }
        gemm_segments(&[first], dx, accumulate)?;
        self.matmul(dy, m, dx, true)
    }
}

/// The `1 x out` bias operand of [`WeightMatrix::matmul_t_fused`] as `out` values: borrowed
/// where it is a row of f32 already (a layer's bias, on every call), else its packed panels,
/// which are the values themselves (f16 widened).
fn bias_values(bias: &dyn PackB, out: usize) -> Result<std::borrow::Cow<'_, [f32]>> {
    if bias.k() != 1 || bias.n() != out {
        return Err(TensorError::ShapeMismatch {
            op: "linear (bias)",
            lhs: vec![1, out],
            rhs: vec![bias.k(), bias.n()],
        });
    }
    if let Some((data, _)) = bias.as_row_major().filter(|(d, _)| d.len() >= out) {
        return Ok(std::borrow::Cow::Borrowed(&data[..out]));
    }
    let mut row = vec![0.0f32; out];
    let mut panel = [0.0f32; NR];
    for n0 in (0..out).step_by(NR) {
        let nc = NR.min(out - n0);
        bias.pack_panel(0, 1, n0, nc, &mut panel);
        row[n0..n0 + nc].copy_from_slice(&panel[..nc]);
    }
    Ok(std::borrow::Cow::Owned(row))
}

/// Checks `x` is `[m, cols]` and `y` is `[m, rows]` for a W-product named `op`:
/// [`TensorError::ShapeMismatch`] for `x`, [`TensorError::Length`] for `y`, and
/// [`TensorError::Overflow`] where `m · rows` overflows (never a panic).
pub fn check_matmul_operands(
    op: &'static str,
    m: usize,
    x_len: usize,
    x_cols: usize,
    y_len: usize,
    y_cols: usize,
) -> Result<()> {
    if m.checked_mul(x_cols) != Some(x_len) {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: vec![m, x_len / m.max(1)],
            rhs: vec![y_cols, x_cols],
        });
    }
    match m.checked_mul(y_cols) {
        Some(expected) if expected == y_len => Ok(()),
        Some(expected) => Err(TensorError::Length {
            op,
            shape: vec![m, y_cols],
            expected,
            found: y_len,
        }),
        None => Err(TensorError::Overflow {
            op,
            shape: vec![m, y_cols],
        }),
    }
}

/// The dense implementations, f32 and f16: one body, differing only in the element type, the
/// GEMV kernel, the element size and the GEMV's range. Batches the GEMV suits ([`gemv_fits`]: up
/// to 16 rows, up to 8 where W's rows are short; [`gemv_fits_f16`]: at most 12 for f16) run as
/// a GEMV straight from W; larger ones through the GEMM, which widens f16 panels as it packs
/// them.
macro_rules! dense_weight_matrix {
    ($ty:ty, $gemv:ident, $fits:ident, $bytes:expr, $name:expr, $to_f32:expr) => {
        impl WeightMatrix for $ty {
            fn out_features(&self) -> usize {
                self.dims2("out_features").map_or(0, |(o, _)| o)
            }
            fn in_features(&self) -> usize {
                self.dims2("in_features").map_or(0, |(_, i)| i)
            }
            fn dims(&self, op: &'static str) -> Result<(usize, usize)> {
                self.dims2(op)
            }
            fn matmul_t(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
                let (o, i) = self.dims2("linear")?;
                check_matmul_operands("linear", m, x.len(), i, y.len(), o)?;
                if $fits(m, i) {
                    return $gemv(kernel_path(), self.data(), o, i, x, m, y, accumulate);
                }
                let w = MatRef::row_major(self.data(), o, i)?;
                gemm(MatRef::row_major(x, m, i)?, &w.t(), y, accumulate)
            }
            fn matvec_t_low_rank(
                &self,
                x: &[f32],
                y: &mut [f32],
                accumulate: bool,
                adapter: &LowRank<'_>,
            ) -> Result<()> {
                let (o, i) = self.dims2("linear")?;
                gemv_t_low_rank(kernel_path(), self.data(), o, i, x, y, accumulate, adapter)
            }
            fn matmul_t_low_rank(
                &self,
                x: &[f32],
                m: usize,
                y: &mut [f32],
                bias: Option<&[f32]>,
                adapter: &LowRank<'_>,
                post: PostOp,
            ) -> Result<bool> {
                let (o, i) = self.dims2("linear")?;
                dense_low_rank(self.data(), o, i, $fits, x, m, y, bias, adapter, post)
            }
            fn batch1_rows<'a>(&'a self, x: &'a [f32]) -> Option<Box<dyn Batch1Rows + 'a>> {
                let (o, i) = self.dims2("linear").ok()?;
                DenseBatch1::new(self.data(), o, i, x).map(|b| Box::new(b) as Box<dyn Batch1Rows>)
            }
            fn matmul(&self, dy: &[f32], m: usize, dx: &mut [f32], accumulate: bool) -> Result<()> {
                let (o, i) = self.dims2("linear_backward_input")?;
                check_matmul_operands("linear_backward_input", m, dy.len(), o, dx.len(), i)?;
                let w = MatRef::row_major(self.data(), o, i)?;
                gemm(MatRef::row_major(dy, m, o)?, &w, dx, accumulate)
            }
            fn to_f32(&self) -> Tensor {
                $to_f32(self)
            }
            fn storage_bytes(&self) -> usize {
                self.numel() * $bytes
            }
            fn format_name(&self) -> &'static str {
                $name
            }
            fn gemm_rhs(&self, m: usize) -> Option<Box<dyn PackB + '_>> {
                let (o, i) = self.dims2("linear").ok()?;
                if $fits(m, i) {
                    return None;
                }
                let w = MatRef::row_major(self.data(), o, i).ok()?;
                Some(Box::new(w.t()))
            }
            fn gemm_rhs_backward(&self, _m: usize) -> Option<Box<dyn PackB + '_>> {
                let (o, i) = self.dims2("linear_backward_input").ok()?;
                Some(Box::new(MatRef::row_major(self.data(), o, i).ok()?))
            }
        }
    };
}

dense_weight_matrix!(Tensor, gemv_t_f32, gemv_fits, 4, "f32", Tensor::clone);
dense_weight_matrix!(
    HalfTensor,
    gemv_t_f16,
    gemv_fits_f16,
    2,
    "f16",
    HalfTensor::to_f32
);

/// The linear layer's forward: `y[m, out] = x[m, in] · Wᵀ + bias`.
///
/// ```
/// use nibble_tensor::{linear, Tensor};
/// let x = Tensor::from_vec(&[1, 2], vec![1.0, 2.0]).unwrap();
/// let w = Tensor::from_vec(&[3, 2], vec![1., 0., 0., 1., 1., 1.]).unwrap();
/// let y = linear(&x, &w, Some(&[0.5, 0.5, 0.5])).unwrap();
/// assert_eq!(y.data(), &[1.5, 2.5, 3.5]);
/// ```
pub fn linear(x: &Tensor, w: &dyn WeightMatrix, bias: Option<&[f32]>) -> Result<Tensor> {
    let (m, i) = x.dims2("linear")?;
    let (o, wi) = w.dims("linear")?;
    if i != wi {
        return Err(TensorError::ShapeMismatch {
            op: "linear",
            lhs: x.shape().to_vec(),
            rhs: vec![o, wi],
        });
    }
    if let Some(b) = bias {
        if b.len() != o {
            return Err(TensorError::ShapeMismatch {
                op: "linear (bias)",
                lhs: vec![o, i],
                rhs: vec![b.len()],
            });
        }
        // y starts as the bias rows and the product accumulates onto them, in one pass where
        // the product runs through the GEMM.
        let mut y = Tensor::try_zeros(&[m, o])?;
        let b = MatRef::row_major(b, 1, o)?;
        w.matmul_t_fused(x.data(), m, y.data_mut(), Some(&b), None, PostOp::Identity)?;
        Ok(y)
    } else {
        let mut y = Tensor::try_zeros(&[m, o])?;
        w.matmul_t(x.data(), m, y.data_mut(), false)?;
        Ok(y)
    }
}

/// `y[m, out] = post(bias + x[m, in] · Wᵀ + h[m, r] · Bᵀ)`: a linear layer with a low-rank
/// (LoRA) adapter given as `(h, b)`: `h = x · Aᵀ` already computed and `b` the adapter's `B`
/// `[out, r]`; `post` an elementwise step after it. In one pass over `y`
/// ([`WeightMatrix::matmul_t_fused`]) where the base product and `h · Bᵀ` run through the
/// GEMM, else part by part; either way the bits of writing the bias rows, then
/// [`WeightMatrix::matmul_t`] accumulated, then `b`'s `matmul_t` of `h` accumulated, then
/// `post`. Without a bias `y` is only written. Inference and the training forward both
/// compute a LoRA layer with it, so they give the same bits.
///
/// ```
/// use nibble_tensor::ops::PostOp;
/// use nibble_tensor::{linear_low_rank_into, Tensor};
/// let w = Tensor::from_vec(&[2, 2], vec![1., 0., 0., 1.]).unwrap();
/// let b = Tensor::from_vec(&[2, 1], vec![1., -1.]).unwrap(); // B [out, r = 1]
/// let (x, h) = ([1.0f32, 2.0], [0.25f32]);
/// let mut y = [f32::NAN; 2];
/// linear_low_rank_into(&w, &x, 1, &mut y, Some(&[10.0, 20.0]), (&h, &b), PostOp::Identity).unwrap();
/// assert_eq!(y, [11.25, 21.75]);
/// ```
pub fn linear_low_rank_into(
    w: &dyn WeightMatrix,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    (h, b): (&[f32], &dyn WeightMatrix),
    post: PostOp,
) -> Result<()> {
    let (b_dims, w_dims) = (b.dims("linear (LoRA B)")?, w.dims("linear")?);
    if b_dims.0 != w_dims.0 {
        return Err(TensorError::ShapeMismatch {
            op: "linear (LoRA B)",
            lhs: vec![b_dims.0, b_dims.1],
            rhs: vec![w_dims.0, w_dims.1],
        });
    }
    let bias_row = bias.map(|b| MatRef::row_major(b, 1, b.len())).transpose()?;
    let bias_rhs = bias_row.as_ref().map(|b| b as &dyn PackB);
    match b.gemm_rhs(m) {
        Some(b_t) => {
            let adapter = Segment {
                a: MatRef::row_major(h, m, b_dims.1)?,
                b: &*b_t,
            };
            w.matmul_t_fused(x, m, y, bias_rhs, Some(adapter), post)
        }
        None => {
            w.matmul_t_fused(x, m, y, bias_rhs, None, PostOp::Identity)?;
            b.matmul_t(h, m, y, true)?;
            post.apply_in_place(y);
            Ok(())
        }
    }
}

/// The linear layer's input gradient: `dx[m, in] = dy[m, out] · W`.
pub fn linear_backward_input(dy: &Tensor, w: &dyn WeightMatrix) -> Result<Tensor> {
    let (m, o) = dy.dims2("linear_backward_input")?;
    let (wo, wi) = w.dims("linear_backward_input")?;
    if o != wo {
        return Err(TensorError::ShapeMismatch {
            op: "linear_backward_input",
            lhs: dy.shape().to_vec(),
            rhs: vec![wo, wi],
        });
    }
    let mut dx = Tensor::try_zeros(&[m, wi])?;
    w.matmul(dy.data(), m, dx.data_mut(), false)?;
    Ok(dx)
}

/// The linear layer's weight gradient: `dW[out, in] = dyᵀ[out, m] · x[m, in]`
/// (`dW += ...` into `dw` with `accumulate`).
pub fn linear_backward_weight(
    dy: &Tensor,
    x: &Tensor,
    dw: &mut Tensor,
    accumulate: bool,
) -> Result<()> {
    let (m, o) = dy.dims2("linear_backward_weight")?;
    let (mx, i) = x.dims2("linear_backward_weight")?;
    if m != mx || dw.shape() != [o, i] {
        return Err(TensorError::ShapeMismatch {
            op: "linear_backward_weight",
            lhs: dy.shape().to_vec(),
            rhs: x.shape().to_vec(),
        });
    }
    let dyt = MatRef::row_major(dy.data(), m, o)?.t();
    gemm(
        dyt,
        &MatRef::row_major(x.data(), m, i)?,
        dw.data_mut(),
        accumulate,
    )
}
