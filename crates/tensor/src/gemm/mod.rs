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
//! * Microkernel, chosen at run time by [`crate::cpu::kernel_path`]: on the AVX-512 tier an
//!   `R x (P * NR)` zmm kernel ([`Avx512Tile`], default 8 x 48) that reads `P` neighbouring
//!   packed panels at once and masks its edge tiles (module `avx512`); otherwise
//!   `MR x NR = 6 x 16`, 12 ymm accumulators with AVX2+FMA, and a `wide` (portable SIMD) and a
//!   scalar kernel on the same layout, whose edge tiles go through a local tile.
//! * Threads: rayon tasks own disjoint `(rows, columns)` rectangles of C; K is never split, so
//!   every element of C is computed by the same sequence of operations whatever the thread
//!   count: results are bit-identical for 1, 2 or 64 threads.

use crate::cpu::{kernel_path, KernelPath};
use crate::error::{Result, TensorError};
use rayon::prelude::*;
use std::cell::Cell;

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod gemv;
mod kernel;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod pack;

#[cfg(target_arch = "x86_64")]
pub use avx512::Avx512Tile;

/// Width of a packed B panel (columns of C computed by one microkernel call).
pub const NR: usize = 16;
/// Height of a packed A micro-panel (rows of C computed by one microkernel call) on the AVX2,
/// portable and scalar paths; the AVX-512 tier's is [`Avx512Tile::rows`].
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

/// Below this many rows of A (counted in whole micro-panels), tasks split only N (see
/// [`task_grid`]).
const SMALL_M_ROWS: usize = 192;

/// The microkernel a GEMM runs: its tile height and how many packed B panels one call covers.
#[derive(Debug, Clone, Copy)]
enum Micro {
    /// The `MR x NR` kernel of a 256-bit, portable or scalar path.
    Narrow(KernelPath),
    /// An AVX-512 tile shape (the CPU has the tier) and the depth of K per call (the
    /// driver sweeps all A micro-panels over one depth slice of a column group before the
    /// next, so the group's slice of B stays in L1).
    #[cfg(target_arch = "x86_64")]
    Wide(Avx512Tile, usize),
}

impl Micro {
    /// The kernel for `path` (which went through `supported()`).
    fn for_path(path: KernelPath) -> Micro {
        match path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => Micro::Wide(Avx512Tile::DEFAULT, AVX512_K_SLICE),
            p => Micro::Narrow(p),
        }
    }

    /// Rows of C per call (height of a packed A micro-panel).
    fn mr(self) -> usize {
        match self {
            Micro::Narrow(_) => MR,
            #[cfg(target_arch = "x86_64")]
            Micro::Wide(t, _) => t.rows(),
        }
    }

    /// Packed B panels per call.
    fn panels(self) -> usize {
        match self {
            Micro::Narrow(_) => 1,
            #[cfg(target_arch = "x86_64")]
            Micro::Wide(t, _) => t.panels(),
        }
    }

    /// The path A is packed with.
    fn path(self) -> KernelPath {
        match self {
            Micro::Narrow(p) => p,
            #[cfg(target_arch = "x86_64")]
            Micro::Wide(..) => KernelPath::Avx512,
        }
    }

    /// Depth of K per call (a packed K block of `kc` is swept in slices of this depth).
    fn k_slice(self, kc: usize) -> usize {
        match self {
            Micro::Narrow(_) => kc,
            #[cfg(target_arch = "x86_64")]
            Micro::Wide(_, s) => s.clamp(1, kc),
        }
    }

    /// Computes the `rows x cols` corner of the tile at `c` over `kc` steps of K.
    ///
    /// # Safety
    /// `a` readable for `kc * self.mr()` floats, `b + u * panel_stride` for `kc * NR`,
    /// `u < panels`, with `1 <= panels <= self.panels()` (`panels == 1` for `Narrow`);
    /// `rows <= self.mr()`, `cols <= panels * NR`; `c` valid for reading and writing that
    /// corner with row stride `rs_c`; the CPU runs the kernel.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn run(
        self,
        panels: usize,
        panel_stride: usize,
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rs_c: usize,
        overwrite: bool,
        rows: usize,
        cols: usize,
    ) {
        // SAFETY: the caller's contract, which covers each kernel's.
        unsafe {
            match self {
                Micro::Narrow(p) if rows == MR && cols == NR => {
                    kernel::tile(p, kc, a, b, c, rs_c, overwrite)
                }
                Micro::Narrow(p) => kernel::edge_tile(p, kc, a, b, c, rs_c, overwrite, rows, cols),
                #[cfg(target_arch = "x86_64")]
                Micro::Wide(t, _) => avx512::tile(
                    t,
                    panels,
                    panel_stride,
                    kc,
                    a,
                    b,
                    c,
                    rs_c,
                    overwrite,
                    rows,
                    cols,
                ),
            }
        }
    }
}

/// Chooses the task grid `(m_blocks, n_blocks)` for an `m x (npan * NR)` block of C, `mr`
/// rows per micro-panel and `npan` units of columns.
fn task_grid(m: usize, mr: usize, npan: usize, threads: usize, parallel: bool) -> (usize, usize) {
    let pm = m.div_ceil(mr);
    let mut mb = m.div_ceil(MC).max(1);
    let mut nb = 1;
    if parallel {
        // Enough tasks for rayon to balance (about 4 per thread), a multiple of the thread
        // count when M alone can provide them; otherwise split N as well.
        let target = threads * 4;
        if pm * mr < SMALL_M_ROWS {
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

/// Depth of K per AVX-512 microkernel call (see [`gemm_avx512_tile`]).
#[cfg(target_arch = "x86_64")]
pub const AVX512_K_SLICE: usize = KC;

/// [`gemm`] with an explicit AVX-512 tile shape and depth of K per microkernel call
/// (`k_slice`, clamped to `1..=KC`; benchmarks compare them); on a CPU without the AVX-512
/// tier it runs [`gemm`]'s fallback path instead. Results do not depend on the thread count
/// for any choice.
#[cfg(target_arch = "x86_64")]
pub fn gemm_avx512_tile(
    tile: Avx512Tile,
    k_slice: usize,
    a: MatRef<'_, f32>,
    b: &dyn PackB,
    c: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let micro = match KernelPath::Avx512.supported() {
        KernelPath::Avx512 => Micro::Wide(tile, k_slice),
        p => Micro::Narrow(p),
    };
    gemm_with(micro, a, b, c, accumulate)
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
    gemm_with(Micro::for_path(path.supported()), a, b, c, accumulate)
}

/// The GEMM driver for one microkernel (whose path the CPU supports).
fn gemm_with(
    micro: Micro,
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
    let (mr, np, path) = (micro.mr(), micro.panels(), micro.path());
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

            // 2. Tasks over disjoint (rows, column groups) rectangles of this block of C; a
            //    column group is the `np` neighbouring panels one microkernel call covers.
            let groups = npan.div_ceil(np);
            let (mb, nb) = task_grid(m, mr, groups, threads, parallel);
            let pm = m.div_ceil(mr);
            let run = |t: usize| {
                let (p0, p1) = split_range(pm, mb, t / nb);
                let (g0, g1) = split_range(groups, nb, t % nb);
                if p0 >= p1 || g0 >= g1 {
                    return;
                }
                let i0 = p0 * mr;
                let mc = (p1 * mr).min(m) - i0;
                let mut abuf = Scratch::take(&A_BUF, (p1 - p0) * kc * mr);
                let ap = abuf.as_mut();
                pack::pack_a(path, &a, i0, mc, k0, kc, mr, ap);
                let ks = micro.k_slice(kc);
                for g in g0..g1 {
                    let q = g * np;
                    let panels = np.min(npan - q);
                    let j = q * NR;
                    let cols = (panels * NR).min(ncb - j);
                    let bgrp = &bp[q * kc * NR..(q + panels) * kc * NR];
                    // Depth slices in order: every element of C sees the same sequence of
                    // slices whatever the thread count.
                    for s0 in (0..kc).step_by(ks) {
                        let sk = ks.min(kc - s0);
                        for ip in 0..(p1 - p0) {
                            let i = ip * mr;
                            let rows = mr.min(mc - i);
                            let apan = ap[ip * kc * mr..(ip + 1) * kc * mr][s0 * mr..].as_ptr();
                            // SAFETY: apan points at rows s0.. of a full kc*mr packed A panel
                            // (sk <= kc - s0 steps remain) and bgrp + s0 * NR + u * kc * NR,
                            // u < panels, at rows s0.. of full kc*NR packed B panels (sliced
                            // just above); the C tile at (i0 + i, n0 + j) of size rows x cols
                            // lies inside the m x n matrix and inside this task's rectangle,
                            // which no other task touches; `micro` runs only on a CPU that
                            // supports it.
                            unsafe {
                                let ct = cptr.get().add((i0 + i) * n + n0 + j);
                                micro.run(
                                    panels,
                                    kc * NR,
                                    sk,
                                    apan,
                                    bgrp.as_ptr().add(s0 * NR),
                                    ct,
                                    n,
                                    overwrite && s0 == 0,
                                    rows,
                                    cols,
                                );
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
