//! General matrix multiply `C (+)= A · B`, BLIS-shaped.
//!
//! `A` is an f32 [`MatRef`] (any strides, so `Xᵀ` costs nothing); `B` is anything that can write
//! itself into the kernel's packed panel layout ([`PackB`]): a strided f32 or f16 matrix here, a
//! quantized weight in the quant crate, which dequantizes one cache-sized panel at a time.
//!
//! Packed B layout (shared by every kernel path): a panel covers `kc` rows of `k` and [`NR`]
//! columns of `n`; element `(p, j)` is at `dst[p * NR + j]`; columns past the matrix edge are 0.

use crate::error::{Result, TensorError};
use half::f16;

/// Width of a packed B panel (columns of C computed by one microkernel call).
pub const NR: usize = 16;

/// A borrowed, strided 2-D matrix: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T: Copy> MatRef<'a, T> {
    /// A strided view; errors if any element would fall outside `data`.
    pub fn new(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(row_stride)
                .and_then(|a| (cols - 1).checked_mul(col_stride).and_then(|b| a.checked_add(b)));
            match last {
                Some(l) if l < data.len() => {}
                _ => {
                    return Err(TensorError::Length {
                        op: "MatRef::new",
                        shape: vec![rows, cols],
                        expected: last.map_or(usize::MAX, |l| l.saturating_add(1)),
                        found: data.len(),
                    })
                }
            }
        }
        Ok(MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// A row-major `rows x cols` view; `data.len()` must be exactly `rows * cols`.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        let n = rows.checked_mul(cols).ok_or(TensorError::Overflow {
            op: "MatRef::row_major",
            shape: vec![rows, cols],
        })?;
        if n != data.len() {
            return Err(TensorError::Length {
                op: "MatRef::row_major",
                shape: vec![rows, cols],
                expected: n,
                found: data.len(),
            });
        }
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose (a stride swap, no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)`; the caller keeps `i < rows`, `j < cols`.
    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// A `k x n` right-hand operand that can write itself into packed panels.
pub trait PackB: Sync {
    /// Rows of B (the reduction dimension).
    fn k(&self) -> usize;
    /// Columns of B.
    fn n(&self) -> usize;
    /// Writes `B[k0..k0+kc, n0..n0+nc]` into `dst[..kc * NR]` as `dst[p * NR + j]`, with zeros
    /// for `j >= nc`. The caller guarantees `nc <= NR`, the ranges lie inside B and
    /// `dst.len() >= kc * NR`.
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]);
}

impl PackB for MatRef<'_, f32> {
    fn k(&self) -> usize {
        self.rows
    }
    fn n(&self) -> usize {
        self.cols
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        for p in 0..kc {
            let row = &mut dst[p * NR..(p + 1) * NR];
            for (j, d) in row.iter_mut().enumerate() {
                *d = if j < nc { self.at(k0 + p, n0 + j) } else { 0.0 };
            }
        }
    }
}

impl PackB for MatRef<'_, f16> {
    fn k(&self) -> usize {
        self.rows
    }
    fn n(&self) -> usize {
        self.cols
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        for p in 0..kc {
            let row = &mut dst[p * NR..(p + 1) * NR];
            for (j, d) in row.iter_mut().enumerate() {
                *d = if j < nc {
                    self.at(k0 + p, n0 + j).to_f32()
                } else {
                    0.0
                };
            }
        }
    }
}

/// `C = A · B` (or `C += A · B` with `accumulate`), `C` row-major `m x n` with `m = a.rows()`,
/// `n = b.n()`, `k = a.cols() = b.k()`.
///
/// The K dimension is never split across threads, so the result is bit-identical whatever the
/// number of threads.
///
/// ```
/// use nibble_tensor::gemm::{gemm, MatRef};
/// let a = [1.0f32, 2.0, 3.0, 4.0]; // 2x2
/// let b = [5.0f32, 6.0, 7.0, 8.0]; // 2x2
/// let mut c = [f32::NAN; 4];
/// gemm(MatRef::row_major(&a, 2, 2).unwrap(), &MatRef::row_major(&b, 2, 2).unwrap(), &mut c, false).unwrap();
/// assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
/// ```
pub fn gemm(a: MatRef<'_, f32>, b: &dyn PackB, c: &mut [f32], accumulate: bool) -> Result<()> {
    let (m, k, n) = (a.rows(), a.cols(), b.n());
    if b.k() != k {
        return Err(TensorError::ShapeMismatch {
            op: "gemm",
            lhs: vec![m, k],
            rhs: vec![b.k(), n],
        });
    }
    if c.len() != m * n {
        return Err(TensorError::Length {
            op: "gemm",
            shape: vec![m, n],
            expected: m * n,
            found: c.len(),
        });
    }
    if !accumulate {
        c.fill(0.0);
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let mut panel = vec![0.0f32; k * NR];
    for n0 in (0..n).step_by(NR) {
        let nc = NR.min(n - n0);
        b.pack_panel(0, k, n0, nc, &mut panel);
        for i in 0..m {
            for j in 0..nc {
                let mut acc = 0.0f32;
                for p in 0..k {
                    acc += a.at(i, p) * panel[p * NR + j];
                }
                c[i * n + n0 + j] += acc;
            }
        }
    }
    Ok(())
}
