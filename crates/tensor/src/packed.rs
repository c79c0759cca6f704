//! [`PackedWeight`]: an f32 weight stored once in the GEMM's packed panel layout, for inference.
//!
//! [`crate::gemm`] packs its right operand into `NR`-wide panels on every call: for `x · Wᵀ`
//! that is a transpose of W, written by one core and then read by all the others (each core
//! fetching the freshly written lines from the writer's cache). A frozen weight can be packed
//! once instead: the GEMM then reads the panels in place ([`PackB::prepacked_block`]), nothing
//! is written, and every core keeps a clean copy of the lines it reads. On the 16-core Xeon
//! (1024³ `x · Wᵀ`, 16 threads, 18 different weights in turn, medians of 31, 2026-12-04 19:05
//! UTC) 2.995 / 3.258 ms per layer packed per call against 2.510 / 2.891 read in place; at
//! batch 256 1.176 against 0.835.
//!
//! The layout (shapes): `Wᵀ` (`in x out`) as `[k blocks][npan panels][kc][NR]`: block `k0` (a
//! multiple of [`KC`]) starts at `k0 · npan · NR`, `kc = min(KC, in - k0)`, and lane `j` of
//! row `kk` of panel `p` is `W[p · NR + j, k0 + kk]` (zero past `out`). It takes what W takes,
//! plus the zero lanes of a last partial panel. One row of x ([`PANEL_GEMV_MAX_M`]) runs a GEMV
//! over the panels (`gemm::panel_gemv`) with the GEMM's sequence of operations per output,
//! more rows the GEMM: every row of a product gets the same bits at any batch size, and for
//! the batches the unpacked [`Tensor`] sends to the GEMM (where
//! [`gemv_fits`](crate::gemm::gemv::gemv_fits) says no) its bits (its small batches take a GEMV
//! of its own, summing in another order).

use crate::buffer::WeightBuf;
use crate::cpu::kernel_path;
use crate::error::{Result, TensorError};
use crate::gemm::panel_gemv::{self, Panels, PANELS_PER_STEP};
use crate::gemm::{gemm, CPtr, MatRef, PackB, KC, NR};
use crate::parallel::PARALLEL_MIN_MACS;
use crate::tensor::Tensor;
use crate::weight::{check_batch1_rows, check_matmul_operands, Batch1Rows, WeightMatrix};
use rayon::prelude::*;
use std::ops::Range;

/// An `out x in` f32 weight (PyTorch's `nn.Linear.weight`) packed once for the GEMM (see the
/// [module docs](self)): a [`WeightMatrix`] with the values of the [`Tensor`] it was packed from.
///
/// ```
/// use nibble_tensor::{PackedWeight, Tensor, WeightMatrix};
/// let w = Tensor::from_vec(&[2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
/// let p = PackedWeight::pack(&w).unwrap();
/// let mut y = [f32::NAN; 2];
/// p.matmul_t(&[1.0, 1.0, 1.0], 1, &mut y, false).unwrap();
/// assert_eq!(y, [6.0, 15.0]);
/// assert_eq!(p.to_f32(), w);
/// ```
pub struct PackedWeight {
    out: usize,
    inn: usize,
    /// Panels of `NR` outputs: `ceil(out / NR)`.
    npan: usize,
    /// `in · npan · NR` floats in the layout of the module docs.
    data: WeightBuf<f32>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("out", &self.out)
            .field("in", &self.inn)
            .finish_non_exhaustive()
    }
}

impl PackedWeight {
    /// Packs the `[out, in]` tensor `w` (in parallel on the rayon pool). An error if `w` is
    /// not 2-D or its packed size overflows.
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (out, inn) = w.dims2("PackedWeight::pack")?;
        Self::from_rows(w.data(), out, inn)
    }

    /// Packs the row-major `out x in` matrix `w`. An error if `w.len() != out · in` or the
    /// packed size overflows.
    pub fn from_rows(w: &[f32], out: usize, inn: usize) -> Result<Self> {
        let src = MatRef::row_major(w, out, inn)?;
        let npan = out.div_ceil(NR);
        let len = npan
            .checked_mul(NR)
            .and_then(|c| c.checked_mul(inn))
            .ok_or(TensorError::Overflow {
                op: "PackedWeight::pack",
                shape: vec![out, inn],
            })?;
        let mut data = WeightBuf::<f32>::zeroed(len);
        let wt = src.t();
        for k0 in (0..inn).step_by(KC) {
            let kc = KC.min(inn - k0);
            let block = &mut data[k0 * npan * NR..(k0 + kc) * npan * NR];
            block
                .par_chunks_mut(kc * NR)
                .enumerate()
                .for_each(|(p, panel)| {
                    let n0 = p * NR;
                    wt.pack_panel(k0, kc, n0, NR.min(out - n0), panel)
                });
        }
        Ok(PackedWeight {
            out,
            inn,
            npan,
            data,
        })
    }

    /// The packed floats as the panel kernels read them.
    fn panels(&self) -> Panels<'_> {
        Panels {
            data: &self.data,
            k: self.inn,
            npan: self.npan,
        }
    }

    /// Index of `W[n, k]` in the packed floats.
    fn index(&self, n: usize, k: usize) -> usize {
        let k0 = k - k % KC;
        let kc = KC.min(self.inn - k0);
        k0 * self.npan * NR + (n / NR) * kc * NR + (k - k0) * NR + n % NR
    }

    /// `y[m, out] (+)= x[m, in] · Wᵀ` over the panels (for `m <= PANEL_GEMV_MAX_M`), each task
    /// a run of panels for every row of x (operands already checked, `in > 0`).
    fn small_batch(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) {
        let path = kernel_path();
        let (out, inn) = (self.out, self.inn);
        // About two tasks per thread, whole kernel steps, at most MAX_TASK_PANELS.
        let threads = rayon::current_num_threads().max(1);
        let per_task = self
            .npan
            .div_ceil(2 * threads)
            .next_multiple_of(PANELS_PER_STEP)
            .min(MAX_TASK_PANELS);
        let tasks = self.npan.div_ceil(per_task);
        let yp = CPtr(y.as_mut_ptr());
        let run = |t: usize| {
            let (p0, p1) = (t * per_task, ((t + 1) * per_task).min(self.npan));
            let (c0, c1) = (p0 * NR, (p1 * NR).min(out));
            let mut tmp = [0.0f32; MAX_TASK_PANELS * NR];
            for b in 0..m {
                // SAFETY: row b's columns c0..c1 lie inside the m x out matrix y and belong to
                // this task alone (tasks cover disjoint panel ranges); y outlives the tasks.
                let row =
                    unsafe { std::slice::from_raw_parts_mut(yp.get().add(b * out + c0), c1 - c0) };
                if accumulate {
                    tmp[..row.len()].copy_from_slice(row);
                }
                let xb = &x[b * inn..(b + 1) * inn];
                panel_gemv::panels(path, self.panels(), xb, (p0, p1), &mut tmp, accumulate);
                row.copy_from_slice(&tmp[..row.len()]);
            }
        };
        let parallel = rayon::current_num_threads() > 1
            && tasks > 1
            && out.saturating_mul(inn).saturating_mul(m) >= PARALLEL_MIN_MACS;
        if parallel {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    }
}

/// Most rows of x that [`PackedWeight::matmul_t`] runs on the panel GEMV; more take the GEMM,
/// whose register tiles reuse each loaded panel row for several rows of x (the GEMV streams
/// the panels once per row). On the 2-core Zen 3 (BigNet at batch 16, 2 threads, medians of
/// 31) the GEMV took 12.4 ms against 10.0 for the unpacked tensor's GEMV.
pub const PANEL_GEMV_MAX_M: usize = 1;

/// Most panels one task of [`PackedWeight::small_batch`] computes.
const MAX_TASK_PANELS: usize = 8 * PANELS_PER_STEP;

/// `Wᵀ` (`in x out`) as a GEMM operand: its blocks are read in place.
impl PackB for PackedWeight {
    fn k(&self) -> usize {
        self.inn
    }
    fn n(&self) -> usize {
        self.out
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, _nc: usize, dst: &mut [f32]) {
        // The stored panel has zeros past `out` already; `k0` is a block start and `kc` the
        // block's depth (the GEMM's contract), so the panel is one contiguous run.
        let start = self.index(n0, k0);
        dst[..kc * NR].copy_from_slice(&self.data[start..start + kc * NR]);
    }
    fn prepacked_block(&self, k0: usize) -> Option<&[f32]> {
        let kc = KC.min(self.inn.checked_sub(k0)?);
        let start = k0 * self.npan * NR;
        self.data.get(start..start + self.npan * kc * NR)
    }
}

/// W itself (`out x in`) as the GEMM operand of the input gradient `dy · W`: its panels are
/// gathered from the packed layout (16 columns of W lie in one K block).
struct Rows<'a>(&'a PackedWeight);

impl PackB for Rows<'_> {
    fn k(&self) -> usize {
        self.0.out
    }
    fn n(&self) -> usize {
        self.0.inn
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        let w = self.0;
        // Columns n0.. n0 + nc of W (its `in` positions) lie in one K block of the layout,
        // where row n's 16 of them are NR floats apart.
        let c0 = n0 - n0 % KC;
        let depth = KC.min(w.inn - c0);
        let block = &w.data[c0 * w.npan * NR..];
        for (p, row) in dst[..kc * NR].chunks_exact_mut(NR).enumerate() {
            let n = k0 + p;
            let src = &block[(n / NR) * depth * NR + (n0 - c0) * NR + n % NR..];
            for (j, d) in row.iter_mut().enumerate() {
                *d = if j < nc { src[j * NR] } else { 0.0 };
            }
        }
    }
}

impl WeightMatrix for PackedWeight {
    fn out_features(&self) -> usize {
        self.out
    }
    fn in_features(&self) -> usize {
        self.inn
    }
    fn matmul_t(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        check_matmul_operands("linear", m, x.len(), self.inn, y.len(), self.out)?;
        if m == 0 || self.out == 0 {
            return Ok(());
        }
        if self.inn == 0 {
            if !accumulate {
                y.fill(0.0);
            }
            return Ok(());
        }
        if m <= PANEL_GEMV_MAX_M {
            self.small_batch(x, m, y, accumulate);
            return Ok(());
        }
        gemm(MatRef::row_major(x, m, self.inn)?, self, y, accumulate)
    }
    fn batch1_rows<'a>(&'a self, x: &'a [f32]) -> Option<Box<dyn Batch1Rows + 'a>> {
        (x.len() == self.inn).then(|| Box::new(PackedBatch1 { w: self, x }) as Box<dyn Batch1Rows>)
    }
    fn matmul(&self, dy: &[f32], m: usize, dx: &mut [f32], accumulate: bool) -> Result<()> {
        check_matmul_operands(
            "linear_backward_input",
            m,
            dy.len(),
            self.out,
            dx.len(),
            self.inn,
        )?;
        gemm(
            MatRef::row_major(dy, m, self.out)?,
            &Rows(self),
            dx,
            accumulate,
        )
    }
    fn to_f32(&self) -> Tensor {
        let mut w = vec![0.0f32; self.out * self.inn];
        for (n, row) in w.chunks_exact_mut(self.inn.max(1)).enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                *v = self.data[self.index(n, k)];
            }
        }
        Tensor::from_vec(&[self.out, self.inn], w).expect("out x in floats")
    }
    fn storage_bytes(&self) -> usize {
        self.data.len() * 4
    }
    fn format_name(&self) -> &'static str {
        "f32"
    }
    fn gemm_rhs(&self, m: usize) -> Option<Box<dyn PackB + '_>> {
        (m > PANEL_GEMV_MAX_M).then(|| Box::new(self) as Box<dyn PackB>)
    }
    fn gemm_rhs_backward(&self, _m: usize) -> Option<Box<dyn PackB + '_>> {
        Some(Box::new(Rows(self)))
    }
}

/// [`PackedWeight`]'s batch-1 rows: the panels holding them, one [`PANELS_PER_STEP`] group at
/// a time through a local tile (a range that starts or ends inside a panel computes the whole
/// panel and keeps its rows).
struct PackedBatch1<'a> {
    w: &'a PackedWeight,
    x: &'a [f32],
}

impl Batch1Rows for PackedBatch1<'_> {
    fn rows(&self, rows: Range<usize>, y: &mut [f32], accumulate: bool) -> Result<()> {
        let w = self.w;
        check_batch1_rows(w.out, &rows, y)?;
        if rows.is_empty() {
            return Ok(());
        }
        if w.inn == 0 {
            if !accumulate {
                y.fill(0.0);
            }
            return Ok(());
        }
        let path = kernel_path();
        let (p_first, p_end) = (rows.start / NR, rows.end.div_ceil(NR));
        let mut tmp = [0.0f32; PANELS_PER_STEP * NR];
        for p0 in (p_first..p_end).step_by(PANELS_PER_STEP) {
            let p1 = (p0 + PANELS_PER_STEP).min(p_end);
            // The rows of these panels inside the range, as offsets into tmp and y.
            let (r0, r1) = ((p0 * NR).max(rows.start), (p1 * NR).min(rows.end));
            let (t0, y0) = (r0 - p0 * NR, r0 - rows.start);
            let len = r1 - r0;
            if accumulate {
                tmp[t0..t0 + len].copy_from_slice(&y[y0..y0 + len]);
            }
            panel_gemv::panels(path, w.panels(), self.x, (p0, p1), &mut tmp, accumulate);
            y[y0..y0 + len].copy_from_slice(&tmp[t0..t0 + len]);
        }
        Ok(())
    }
}
