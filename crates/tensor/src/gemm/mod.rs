//! General matrix multiply `C (+)= A · B`, BLIS-shaped.
//!
//! `A` is an f32 [`MatRef`] (any strides, so `Xᵀ` costs nothing); `B` is anything that can write
//! itself into the kernel's packed panel layout ([`PackB`]): a strided f32 or f16 matrix here, a
//! quantized weight in the quant crate, which dequantizes one cache-sized panel at a time.
//!
//! Packed B layout (shared by every kernel path): a panel covers `kc` rows of `k` and [`NR`]
//! columns of `n`; element `(p, j)` is at `dst[p * NR + j]`; columns past the matrix edge are 0.
//!
//! # Design
//! * Blocking: the K dimension is cut into blocks of [`KC`] (256) rows, N into blocks of [`NC`]
//!   columns, M into blocks of at most about [`MC`] rows. For each `(NC, KC)` block, B is packed
//!   once into `NR`-wide panels (in parallel, by panel) and shared by all threads; each task then
//!   packs its own `MC x KC` block of A into `MR`-row micro-panels and sweeps the
//!   `MR x NR` microkernel over it, B panel by B panel (B micro-panel in L1, A block in L2,
//!   the packed B block in L3).
//! * Microkernel: `MR x NR = 6 x 16`, 12 ymm accumulators with AVX2+FMA, chosen at run time by
//!   [`crate::cpu::kernel_path`]; a `wide` (portable SIMD) and a scalar kernel use the same
//!   packed layout. Edge tiles are computed into a local tile and the valid corner copied.
//! * Threads: rayon tasks own disjoint `(rows, columns)` rectangles of C; K is never split, so
//!   every element of C is computed by the same sequence of operations whatever the thread
//!   count: results are bit-identical for 1, 2 or 64 threads.

use crate::cpu::{kernel_path, KernelPath};
use crate::error::{Result, TensorError};
use rayon::prelude::*;
use std::cell::Cell;

pub mod gemv;
mod kernel;
mod pack;

/// Width of a packed B panel (columns of C computed by one microkernel call).
pub const NR: usize = 16;
/// Height of a packed A micro-panel (rows of C computed by one microkernel call).
pub const MR: usize = 6;
/// Depth of a K block. [`PackB::pack_panel`] is always called with `k0` a multiple of `KC`
/// and `kc <= KC`; since `KC` is a multiple of 256, quantized packers see whole blocks of 16,
/// 32, 64, 128 or 256 along K (except the final, shorter block at the end of K).
pub const KC: usize = 256;
/// Target rows of A per task block (`MC x KC` packed A fits comfortably in a 512 KiB L2).
pub const MC: usize = 144;
/// Columns of B per packed block (`KC x NC` floats = 2 MiB, shared by all threads in L3).
pub const NC: usize = 2048;

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
            let last = (rows - 1).checked_mul(row_stride).and_then(|a| {
                (cols - 1)
                    .checked_mul(col_stride)
                    .and_then(|b| a.checked_add(b))
            });
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
///
/// [`gemm`] calls [`pack_panel`](PackB::pack_panel) exactly once per `(KC-block, NR-panel)`
/// pair (per [`NC`] column block), from any rayon worker thread, possibly concurrently for
/// different panels; the packed panels are then shared by every thread. A costly packer (one
/// that dequantizes) therefore runs once per element of B per GEMM, not once per thread.
pub trait PackB: Sync {
    /// Rows of B (the reduction dimension).
    fn k(&self) -> usize;
    /// Columns of B.
    fn n(&self) -> usize;
    /// Writes `B[k0..k0+kc, n0..n0+nc]` into `dst[..kc * NR]` as `dst[p * NR + j]`, with zeros
    /// for `j >= nc`. The caller guarantees `nc <= NR`, the ranges lie inside B and
    /// `dst.len() >= kc * NR`; [`gemm`] also guarantees that `k0` is a multiple of 256
    /// ([`KC`]) and `kc <= KC` (so `kc` is a multiple of 256 except for the last block of K).
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]);
}

/// A 64-byte-aligned line of 16 floats: the unit of the packing buffers (aligned panels keep
/// every SIMD load inside one cache line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A reusable, aligned scratch buffer, taken out of a thread-local cell while in use (so a
/// re-entrant call, e.g. a GEMM inside a rayon task of another GEMM, just allocates its own).
struct Scratch(Vec<Line>);

impl Scratch {
    fn take(cell: &'static std::thread::LocalKey<Cell<Vec<Line>>>, floats: usize) -> Self {
        let mut v = cell.with(|c| c.take());
        let lines = floats.div_ceil(16);
        if v.len() < lines {
            v.resize(lines, Line([0.0; 16]));
        }
        Scratch(v)
    }

    fn put_back(self, cell: &'static std::thread::LocalKey<Cell<Vec<Line>>>) {
        cell.with(|c| c.set(self.0));
    }

    fn as_mut(&mut self) -> &mut [f32] {
        let len = self.0.len() * 16;
        // SAFETY: `Line` is `repr(C)` around `[f32; 16]` with size 64 and no padding, so the
        // vector's storage is `len` contiguous, initialized f32s, borrowed mutably via `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut f32, len) }
    }
}

thread_local! {
    static A_BUF: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
    static B_BUF: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// C's base pointer, shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: tasks holding a CPtr write only their own disjoint rectangle of C, and the `&mut`
// borrow of C outlives every task (they are joined before `gemm_on` returns).
unsafe impl Send for CPtr {}
// SAFETY: as above.
unsafe impl Sync for CPtr {}
impl CPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Splits `total` items into `parts` nearly equal consecutive ranges; returns range `idx`.
fn split_range(total: usize, parts: usize, idx: usize) -> (usize, usize) {
    (total * idx / parts, total * (idx + 1) / parts)
}

/// Below this many `MR`-row panels of A, tasks split only N (see [`task_grid`]).
const SMALL_M_PANELS: usize = 32;

/// Chooses the task grid `(m_blocks, n_blocks)` for an `m x (npan * NR)` block of C.
fn task_grid(m: usize, npan: usize, threads: usize, parallel: bool) -> (usize, usize) {
    let pm = m.div_ceil(MR);
    let mut mb = m.div_ceil(MC).max(1);
    let mut nb = 1;
    if parallel {
        // Enough tasks for rayon to balance (about 4 per thread), a multiple of the thread
        // count when M alone can provide them; otherwise split N as well.
        let target = threads * 4;
        if pm < SMALL_M_PANELS {
            // Few row panels (batches below 192): every task takes all of them and a share of
            // the columns, so each packed B panel is read by one task, which reuses it from
            // L1 across the row panels. Splitting M here made two tasks stream the same B
            // panels (1024² f32, 2 threads: m = 7 0.89 -> 0.56 ms, m = 48 1.98 -> 1.66 ms,
            // m = 96 3.60 -> 3.07 ms; m = 6 was 0.39 ms either way).
            return (1, target.min(npan).max(1));
        }
        mb = mb.max(target).div_ceil(threads) * threads;
        mb = mb.min(pm);
        if mb < target {
            nb = target.div_ceil(mb).min(npan);
        }
    }
    (mb.min(pm).max(1), nb.max(1))
}

/// `C = A · B` (or `C += A · B` with `accumulate`), `C` row-major `m x n` with `m = a.rows()`,
/// `n = b.n()`, `k = a.cols() = b.k()`, on the process's [`kernel_path`].
///
/// The K dimension is never split across threads, so the result is bit-identical whatever the
/// number of threads. With `accumulate == false`, C is only written, never read (it may hold
/// NaN).
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
    gemm_on(kernel_path(), a, b, c, accumulate)
}

/// [`gemm`] on an explicit [`KernelPath`] (tests and benchmarks compare the paths in one
/// process). A path the CPU lacks is replaced by [`KernelPath::supported`]'s fallback.
///
/// Mismatched shapes return [`TensorError`], never panic.
pub fn gemm_on(
    path: KernelPath,
    a: MatRef<'_, f32>,
    b: &dyn PackB,
    c: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let (m, k, n) = (a.rows(), a.cols(), b.n());
    if b.k() != k {
        return Err(TensorError::ShapeMismatch {
            op: "gemm",
            lhs: vec![m, k],
            rhs: vec![b.k(), n],
        });
    }
    let mn = m.checked_mul(n).ok_or(TensorError::Overflow {
        op: "gemm",
        shape: vec![m, n],
    })?;
    if c.len() != mn {
        return Err(TensorError::Length {
            op: "gemm",
            shape: vec![m, n],
            expected: mn,
            found: c.len(),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    let path = path.supported();
    let threads = rayon::current_num_threads().max(1);
    let work = m.saturating_mul(n).saturating_mul(k);
    let parallel = threads > 1 && work >= 1 << 18;

    let ncb_max = NC.min(n);
    let mut bbuf = Scratch::take(&B_BUF, KC * ncb_max.div_ceil(NR) * NR);
    let cptr = CPtr(c.as_mut_ptr());
    for n0 in (0..n).step_by(NC) {
        let ncb = NC.min(n - n0);
        let npan = ncb.div_ceil(NR);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let overwrite = !accumulate && k0 == 0;

            // 1. Pack the (kc x ncb) block of B once, panel by panel, shared by all tasks.
            let bp = &mut bbuf.as_mut()[..npan * kc * NR];
            let pack = |(q, dst): (usize, &mut [f32])| {
                let j0 = q * NR;
                b.pack_panel(k0, kc, n0 + j0, NR.min(ncb - j0), dst);
            };
            if parallel {
                bp.par_chunks_mut(kc * NR).enumerate().for_each(pack);
            } else {
                bp.chunks_mut(kc * NR).enumerate().for_each(pack);
            }
            let bp = &*bp;

            // 2. Tasks over disjoint (rows, panels) rectangles of this block of C.
            let (mb, nb) = task_grid(m, npan, threads, parallel);
            let pm = m.div_ceil(MR);
            let run = |t: usize| {
                let (p0, p1) = split_range(pm, mb, t / nb);
                let (q0, q1) = split_range(npan, nb, t % nb);
                if p0 >= p1 || q0 >= q1 {
                    return;
                }
                let i0 = p0 * MR;
                let mc = (p1 * MR).min(m) - i0;
                let mut abuf = Scratch::take(&A_BUF, (p1 - p0) * kc * MR);
                let ap = abuf.as_mut();
                pack::pack_a(path, &a, i0, mc, k0, kc, ap);
                for q in q0..q1 {
                    let j = q * NR;
                    let nr = NR.min(ncb - j);
                    let bpan = bp[q * kc * NR..(q + 1) * kc * NR].as_ptr();
                    for ip in 0..(p1 - p0) {
                        let i = ip * MR;
                        let mr = MR.min(mc - i);
                        let apan = ap[ip * kc * MR..(ip + 1) * kc * MR].as_ptr();
                        // SAFETY: apan/bpan point at full kc*MR / kc*NR packed panels (sliced
                        // just above); the C tile at (i0 + i, n0 + j) of size mr x nr lies
                        // inside the m x n matrix and inside this task's rectangle, which no
                        // other task touches; `path` went through `supported()`.
                        unsafe {
                            let ct = cptr.get().add((i0 + i) * n + n0 + j);
                            if mr == MR && nr == NR {
                                kernel::tile(path, kc, apan, bpan, ct, n, overwrite);
                            } else {
                                kernel::edge_tile(path, kc, apan, bpan, ct, n, overwrite, mr, nr);
                            }
                        }
                    }
                }
                abuf.put_back(&A_BUF);
            };
            if parallel && mb * nb > 1 {
                (0..mb * nb).into_par_iter().for_each(run);
            } else {
                (0..mb * nb).for_each(run);
            }
        }
    }
    bbuf.put_back(&B_BUF);
    Ok(())
}
