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
//!   columns, M into micro-panels of `MR` rows (blocks of about [`MC`] rows on one thread).
//!   A *stage* is as many `KC` blocks (of any product of a sum, see [`gemm_segments`]) as fit
//!   in 1 MiB of packed B, at least one (one block of a 1024-wide weight). B is packed into `NR`-wide panels once per stage and
//!   shared by all threads, column group by column group *on first use*: the task that first
//!   needs a group packs it while the others work on other groups, so a stage is one parallel
//!   pass (one fork-join) with no serial packing phase. Each task packs its own rows of A per
//!   `KC` block into micro-panels and sweeps the microkernel over them, B group by B group
//!   (B group slice in L1, A block in L2, the stage's packed B in L2/L3). A B stored packed
//!   ([`PackB::prepacked_block`], e.g. [`crate::PackedWeight`]) is read in place instead: its
//!   blocks take no room in a stage (so all of K is one stage, one fork-join) and nothing is
//!   written, so no core has to fetch freshly packed lines from another core's cache.
//! * Microkernel, chosen at run time by [`crate::cpu::kernel_path`]: on the AVX-512 tier an
//!   `R x (P * NR)` zmm kernel ([`Avx512Tile`], default 8 x 48) that reads `P` neighbouring
//!   packed panels at once and masks its edge tiles (module `avx512`); otherwise
//!   `MR x NR = 6 x 16`, 12 ymm accumulators with AVX2+FMA, and a `wide` (portable SIMD) and a
//!   scalar kernel on the same layout, whose edge tiles go through a local tile.
//! * Skinny products read an operand in place instead of packing it ([`Packing`]): A when C
//!   has at most [`UNPACKED_A_MAX_COLS`] columns (`h = x·Aᵀ`, `dB = dYᵀ·H` of a rank-32
//!   adapter: a packed micro-panel would serve only those few columns, so the copy cost about
//!   as much as the products), B when C has at most [`UNPACKED_B_MAX_ROWS`] rows and B is a
//!   row-major f32 matrix (on the AVX-512 tier: up to [`UNPACKED_MAX_ROWS_AVX512`] rows, and A
//!   in place too where it is a transposed view and C that short). The kernels take their operands through the compile-time source
//!   types of module `source` (packed panels with constant strides, or the matrices with their
//!   strides), so the packed path compiles as before, and both read the same values in the
//!   same order: packed or not, the bits are the same.
//! * Threads: rayon tasks own disjoint `(rows, columns)` rectangles of C; K is never split, so
//!   every element of C is computed by the same sequence of operations whatever the thread
//!   count: results are bit-identical for 1, 2 or 64 threads.

use crate::cpu::{kernel_path, KernelPath};
use crate::error::{Result, TensorError};
use crate::ops::PostOp;
use rayon::prelude::*;
use source::{ASrc, BSrc};
use std::cell::Cell;

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod gemv;
mod kernel;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod pack;
pub(crate) mod panel_gemv;
mod source;

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

    /// B as a plain row-major f32 matrix, if it is one: `(data, row_stride)` with element
    /// `(p, j)` at `data[p * row_stride + j]` for every `p < k`, `j < n`. [`gemm`] may then
    /// read B's rows in place instead of packing them (see [`Packing`]). The default, for
    /// operands that must be converted (quantized, f16), is `None`.
    ///
    /// The claim is checked before any in-place read: where `k > 0` and `n > 0`, a slice
    /// shorter than `(k - 1) * row_stride + n` floats, or a `row_stride` below `n` with
    /// `k > 1`, is ignored (as a [`prepacked_block`](PackB::prepacked_block) too short for its
    /// block is) and B is packed through [`pack_panel`](PackB::pack_panel) instead: no read
    /// outside the slice, and the values that `pack_panel` writes.
    fn as_row_major(&self) -> Option<(&[f32], usize)> {
        None
    }

    /// B's K block starting at `k0` already in the packed layout, if B is stored so (a weight
    /// packed once, see [`PackedWeight`](crate::PackedWeight)): `ceil(n / NR)` panels of
    /// `kc * NR` floats, panel after panel, `kc = min(KC, k - k0)`, exactly what
    /// [`pack_panel`](PackB::pack_panel) would write for each panel. [`gemm`] then reads the
    /// panels in place: no packing, no staging buffer, and since nothing is written, every core
    /// keeps its copy of the lines it reads. `k0` is a multiple of [`KC`] below `k`. The
    /// default, for operands packed per call, is `None`.
    fn prepacked_block(&self, k0: usize) -> Option<&[f32]> {
        let _ = k0;
        None
    }
}

/// A borrowed operand is the operand (so `Box::new(&w)` makes a `Box<dyn PackB>` without a
/// wrapper type).
impl<T: PackB + ?Sized> PackB for &T {
    fn k(&self) -> usize {
        (**self).k()
    }
    fn n(&self) -> usize {
        (**self).n()
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        (**self).pack_panel(k0, kc, n0, nc, dst)
    }
    fn as_row_major(&self) -> Option<(&[f32], usize)> {
        (**self).as_row_major()
    }
    fn prepacked_block(&self, k0: usize) -> Option<&[f32]> {
        (**self).prepacked_block(k0)
    }
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
    /// The small-batch GEMV's copy of x on whole cache lines ([`gemv`]).
    static X_BUF: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
    /// The one-tile GEMV's outputs of short rows in the transposing kernel's layout
    /// ([`gemv::gemv_tile_f32`], called once per tile of a quantized small batch).
    #[cfg(target_arch = "x86_64")]
    static SHORT_BUF: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// An output's base pointer, shared by tasks that write disjoint parts of it (the GEMM's tiles
/// of C, the packed small-batch product's columns of y).
#[derive(Clone, Copy)]
pub(crate) struct CPtr(pub(crate) *mut f32);
// SAFETY: tasks holding a CPtr write only their own disjoint part of the output, and its
// `&mut` borrow outlives every task (each user joins its tasks before it returns).
unsafe impl Send for CPtr {}
// SAFETY: as above.
unsafe impl Sync for CPtr {}
impl CPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
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

/// How a kernel call's sums reach its tile of C.
#[derive(Debug, Clone, Copy)]
enum Store {
    /// `c = c + acc`.
    Add,
    /// `c = acc` (C is never read).
    Overwrite,
    /// `c = acc + row[j]`: a row vector (a bias) added to every row of the tile, C never read;
    /// the pointer is the row's element at the tile's first column.
    OverRow(*const f32),
}

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

    /// Whether this is an AVX-512 tile.
    fn is_wide(self) -> bool {
        match self {
            Micro::Narrow(_) => false,
            #[cfg(target_arch = "x86_64")]
            Micro::Wide(..) => true,
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

    /// Packs A micro-panels of this kernel's height (see [`pack::pack_a`]).
    #[allow(clippy::too_many_arguments)]
    fn pack_a(
        self,
        a: &MatRef<'_, f32>,
        i0: usize,
        mc: usize,
        k0: usize,
        kc: usize,
        dst: &mut [f32],
    ) {
        match self {
            Micro::Narrow(p) => pack::pack_a::<MR>(p, a, i0, mc, k0, kc, dst),
            #[cfg(target_arch = "x86_64")]
            Micro::Wide(t, _) => {
                let p = KernelPath::Avx512;
                match t {
                    Avx512Tile::M12N32 => pack::pack_a::<12>(p, a, i0, mc, k0, kc, dst),
                    Avx512Tile::M14N32 => pack::pack_a::<14>(p, a, i0, mc, k0, kc, dst),
                    Avx512Tile::M8N48 => pack::pack_a::<8>(p, a, i0, mc, k0, kc, dst),
                    Avx512Tile::M6N64 => pack::pack_a::<6>(p, a, i0, mc, k0, kc, dst),
                }
            }
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

    /// Computes the `rows x cols` corner of the tile at `c` over `kc` steps of K, A read
    /// through `a` and the `panels` panels of B through `b`.
    ///
    /// # Safety
    /// `a` readable for `kc` steps of `self.mr()` rows (per [`ASrc`]), `b` for `kc` steps of
    /// `panels` panels (per [`BSrc`]), with `1 <= panels <= self.panels()`; `rows <= self.mr()`,
    /// `cols <= panels * NR`; `c` valid for reading and writing that corner with row stride
    /// `rs_c`, and a [`Store::OverRow`] row for reading `cols` floats; the CPU runs the kernel.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn run(
        self,
        panels: usize,
        kc: usize,
        a: ASrc,
        b: BSrc,
        c: *mut f32,
        rs_c: usize,
        store: Store,
        rows: usize,
        cols: usize,
    ) {
        // SAFETY: the caller's contract, which covers each kernel's.
        unsafe {
            match self {
                Micro::Narrow(p) if rows == MR && cols == NR => {
                    kernel::tile(p, kc, a, b, c, rs_c, store)
                }
                Micro::Narrow(p) => kernel::edge_tile(p, kc, a, b, c, rs_c, store, rows, cols),
                #[cfg(target_arch = "x86_64")]
                Micro::Wide(t, _) => avx512::tile(t, panels, kc, a, b, c, rs_c, store, rows, cols),
            }
        }
    }
}

/// Chooses the task grid `(m_blocks, n_blocks)` for an `m x (npan * NR)` block of C, `mr`
/// rows per micro-panel and `npan` units of columns.
///
/// Serial: blocks of about [`MC`] rows sweeping every column (the packed B group in L1 serves
/// every micro-panel of the block). Parallel, below [`SMALL_M_ROWS`] rows: one row block and
/// the columns split (see below). Parallel, larger: row blocks of whole micro-panels, as tall
/// as leaves at least 4 row blocks per thread (at most about [`MC`] rows), and the columns
/// split until there are [`TASKS_PER_THREAD`] tasks per thread, so that tasks are equal and
/// many enough for the pool to balance them while each packed B group still serves several
/// micro-panels where the rows allow. On the 16-core Xeon (1024³ f32, 16 threads, medians of
/// 30 in one run) one micro-panel per task with the columns halved took 2.36 ms against 2.56
/// with the previous grid (about 4 tasks per thread of 1.5–2 micro-panels: uneven), and 3.88
/// against 4.22 ms on 8 threads; tasks of about `MC` rows with the columns split took 2.85 ms.
///
/// With B held packed ([`PackB::prepacked_block`]) a task's B comes from L3 rather than from a
/// stage in L2, so tasks are at least [`HELD_MIN_PANELS_PER_TASK`] micro-panels tall (each B
/// line fetched serves more rows).
fn task_grid(
    m: usize,
    mr: usize,
    npan: usize,
    threads: usize,
    parallel: bool,
    held: bool,
) -> (usize, usize) {
    let pm = m.div_ceil(mr);
    if !parallel {
        return (m.div_ceil(MC).clamp(1, pm), 1);
    }
    if pm * mr < SMALL_M_ROWS {
        // Few row panels (batches below 192): every task takes all of them and a share of
        // the columns, so each packed B panel is read by one task, which reuses it from
        // L1 across the row panels. Splitting M here made two tasks stream the same B
        // panels (1024² f32, 2 threads: m = 7 0.89 -> 0.56 ms, m = 48 1.98 -> 1.66 ms,
        // m = 96 3.60 -> 3.07 ms; m = 6 was 0.39 ms either way).
        return (1, (threads * 4).min(npan).max(1));
    }
    let mut panels_per_task = (pm / (threads * 4)).clamp(1, MC.div_ceil(mr));
    if held {
        panels_per_task = panels_per_task.max(HELD_MIN_PANELS_PER_TASK.min(pm));
    }
    let mb = pm.div_ceil(panels_per_task);
    (mb, (threads * TASKS_PER_THREAD).div_ceil(mb).clamp(1, npan))
}

/// Smallest task height, in micro-panels, of a parallel GEMM whose B is held packed (see
/// [`task_grid`]). On the 16-core Xeon (18 distinct packed 1024² f32 layers at batch 1024, the
/// forward of `examples/forward_profile.rs` `f32p`, 16 threads, medians of 7, three rounds in
/// turns, 2026-12-04 20:03 UTC) heights of 2 (the unheld rule there) / 4 / 8 / 16 micro-panels
/// took 34.7 / 32.9 / 35.5 / 35.4, 32.3 / 30.2 / 33.6 / 37.4 and 33.0 / 30.9 / 34.3 / 36.0 ms;
/// `bignet bench bignet` at batch 1024 34.4 / 31.5 / 33.8 / 36.2 and 35.6 / 34.8 / 38.3 / 37.7.
const HELD_MIN_PANELS_PER_TASK: usize = 4;

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

/// Depth of K per AVX-512 microkernel call (see [`gemm_avx512_tile`]): a whole [`KC`] block,
/// so an 8 x 48 tile's slice of B is 48 KiB, read from L1/L2 while the task's micro-panels pass
/// over it. On the 16-core Xeon (1024³ f32 `x · Wᵀ`, 16 threads, medians of 20), 256 was no
/// slower than 128 for every shape with this driver (8x48: 1.98 / 2.00 ms); an earlier
/// driver had 128 ahead for 12x32 (see [`Avx512Tile::DEFAULT`]).
#[cfg(target_arch = "x86_64")]
pub const AVX512_K_SLICE: usize = 256;

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
    gemm_avx512_tile_with_packing(tile, k_slice, a, b, c, accumulate, Packing::Auto)
}

/// [`gemm_avx512_tile`] with an explicit [`Packing`] (tests compare the packed and unpacked
/// operands of every tile shape; they give the same bits).
#[cfg(target_arch = "x86_64")]
pub fn gemm_avx512_tile_with_packing(
    tile: Avx512Tile,
    k_slice: usize,
    a: MatRef<'_, f32>,
    b: &dyn PackB,
    c: &mut [f32],
    accumulate: bool,
    packing: Packing,
) -> Result<()> {
    let micro = match KernelPath::Avx512.supported() {
        KernelPath::Avx512 => Micro::Wide(tile, k_slice),
        p => Micro::Narrow(p),
    };
    gemm_with(micro, &[Segment { a, b }], c, accumulate, packing)
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
    gemm_with_packing(path, a, b, c, accumulate, Packing::Auto)
}

/// How a GEMM feeds its microkernel: operands packed into micro-panels (the BLIS layout) or
/// read in place. Every choice runs the same operations in the same order on the same values,
/// so all give the same bits; they differ only in speed. [`gemm`] uses [`Packing::Auto`]; the
/// others are for tests and benchmarks (see [`gemm_with_packing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// By shape: A is read in place when C has at most [`UNPACKED_A_MAX_COLS`] columns (its
    /// packed micro-panels would serve too few columns to pay for the copy), B when C has at
    /// most [`UNPACKED_B_MAX_ROWS`] rows and B is a row-major f32 matrix
    /// ([`PackB::as_row_major`]); on the AVX-512 tier B up to [`UNPACKED_MAX_ROWS_AVX512`]
    /// rows, and a transposed A (column stride not 1) in place as well for that few rows;
    /// both packed otherwise.
    Auto,
    /// Both operands packed.
    Packed,
    /// A read in place whatever the shape, B packed.
    UnpackedA,
    /// B read in place wherever [`PackB::as_row_major`] allows, A packed.
    UnpackedB,
    /// Both read in place (B wherever [`PackB::as_row_major`] allows).
    Unpacked,
}

/// Most columns of C for which [`Packing::Auto`] reads A in place. On the 2-core Zen 3 (AVX2
/// 6x16, 2 threads, `examples/skinny_packing` of this crate, medians of 21 in one quiet run,
/// packed -> in place, ms): `x · W` with `m = 1000`, `k = 1024` and `n` = 16: 0.33 -> 0.22,
/// 32: 0.54 -> 0.39 (`h = x·Aᵀ`), 48: 0.73 -> 0.60, 64: 0.88 -> 0.75, 96: 1.22 -> 1.14,
/// 128: 1.56 -> 1.52; `dYᵀ · H` (1024 x 32 x 1000, A a transposed view) 0.95 -> 0.68. Past 64
/// the gain is small and was not seen in loaded runs. On the 16-core Xeon (AVX-512 8x48, 16
/// threads, the same example, medians of 21, 2026-12-03 18:43 UTC) the same `x · W`: n = 16
/// 0.088 -> 0.076, 48: 0.135 -> 0.130, 64: 0.194 -> 0.169, 96: 0.219 -> 0.203, 128: 0.296 ->
/// 0.282, within that host's noise past 64, so the bound is the same there.
pub const UNPACKED_A_MAX_COLS: usize = 64;

/// Most rows of C for which [`Packing::Auto`] reads a row-major f32 B in place. Reading B in
/// place pays only while few micro-panels read each of its rows: B's rows are far apart (4 KiB
/// for a 1024-wide matrix, which also puts them all in one cache set), so re-reading them per
/// micro-panel costs more than one sequential packing pass. Same run as above, `dHᵀ · X` with
/// X 1000 x 1024, packed -> in place, ms: m = 8: 0.48 -> 0.30, 16: 0.55 -> 0.43,
/// 32: 0.64 -> 1.02, 64: 1.00 -> 1.81 (with X's rows padded to 1040 floats, m = 32:
/// 0.55 -> 0.50).
pub const UNPACKED_B_MAX_ROWS: usize = 16;

/// [`UNPACKED_B_MAX_ROWS`] on the AVX-512 tier, and the most rows of C for which
/// [`Packing::Auto`] reads a transposed A (column stride not 1, as `dHᵀ` in `dA = dHᵀ·X`) in
/// place there whatever the columns. On the 16-core Xeon (8x48 tiles, 16 threads,
/// `examples/skinny_packing`, medians of 21, 2026-12-03 18:43 UTC, ms), `dHᵀ · X` with X
/// 1000 x 1024, packed / B in place / A in place / both: m = 8: 0.152 / 0.117 / 0.145 / 0.112,
/// 16: 0.171 / 0.147 / 0.153 / 0.128, 32: 0.223 / 0.204 / 0.200 / 0.162, 64: 0.383 / 0.380 /
/// 0.276 / 0.284, 128: 0.596 / 0.637 / 0.468 / 0.500 (the Zen 3's 4 KiB aliasing of B's rows
/// does not show there up to 32 rows).
pub const UNPACKED_MAX_ROWS_AVX512: usize = 32;

impl Packing {
    /// Whether A is read in place for an `m x n` product on `micro`.
    fn unpacked_a(self, m: usize, n: usize, a: &MatRef<'_, f32>, micro: Micro) -> bool {
        match self {
            Packing::Auto => {
                n <= UNPACKED_A_MAX_COLS
                    || (micro.is_wide() && a.col_stride != 1 && m <= UNPACKED_MAX_ROWS_AVX512)
            }
            Packing::UnpackedA | Packing::Unpacked => true,
            Packing::Packed | Packing::UnpackedB => false,
        }
    }

    /// Whether B is read in place (where it is row-major f32) for an `m x n` product on
    /// `micro`.
    fn unpacked_b(self, m: usize, micro: Micro) -> bool {
        match self {
            Packing::Auto if micro.is_wide() => m <= UNPACKED_MAX_ROWS_AVX512,
            Packing::Auto => m <= UNPACKED_B_MAX_ROWS,
            Packing::UnpackedB | Packing::Unpacked => true,
            Packing::Packed | Packing::UnpackedA => false,
        }
    }
}

/// [`gemm_on`] with an explicit [`Packing`] (for tests and benchmarks: every choice gives the
/// same bits, on every path and thread count). A path the CPU lacks is replaced by
/// [`KernelPath::supported`]'s fallback.
///
/// Mismatched shapes return [`TensorError`], never panic.
pub fn gemm_with_packing(
    path: KernelPath,
    a: MatRef<'_, f32>,
    b: &dyn PackB,
    c: &mut [f32],
    accumulate: bool,
    packing: Packing,
) -> Result<()> {
    gemm_with(
        Micro::for_path(path.supported()),
        &[Segment { a, b }],
        c,
        accumulate,
        packing,
    )
}

/// `C = Σ_i A_i · B_i` (or `C += ...` with `accumulate`) in one pass over C, on the process's
/// [`kernel_path`]: every segment is `m x k_i` times `k_i x n`, and its K is cut into its own
/// blocks, so the result is bit-identical to [`gemm`] of the first segment followed by
/// [`gemm`]s with `accumulate` of the others, in order (each block adds its products to C as
/// those calls do), while C stays in the caches of the thread that owns each tile. A bias is
/// the segment `1 · bias` (a column of ones, `MatRef::new(&[1.0], m, 1, 0, 1)`, times the bias
/// as one row): first, it writes the bias rows as a fill would (`1 · b + 0 = b`, except that a
/// bias of `-0.0` becomes `+0.0`).
///
/// ```
/// use nibble_tensor::gemm::{gemm_segments, MatRef, Segment};
/// let x = [1.0f32, 2.0]; // 1x2
/// let w_t = [1.0f32, 0.0, 0.0, 1.0]; // 2x2
/// let bias = [10.0f32, 20.0];
/// let ones = MatRef::new(&[1.0f32], 1, 1, 0, 1).unwrap();
/// let b_row = MatRef::row_major(&bias, 1, 2).unwrap();
/// let (xa, wb) = (MatRef::row_major(&x, 1, 2).unwrap(), MatRef::row_major(&w_t, 2, 2).unwrap());
/// let mut y = [f32::NAN; 2];
/// gemm_segments(&[Segment { a: ones, b: &b_row }, Segment { a: xa, b: &wb }], &mut y, false).unwrap();
/// assert_eq!(y, [11.0, 22.0]);
/// ```
pub fn gemm_segments(segs: &[Segment<'_>], c: &mut [f32], accumulate: bool) -> Result<()> {
    gemm_segments_post(segs, c, accumulate, PostOp::Identity)
}

/// [`gemm_segments`] followed by `post` on every element of C, applied by each task to its
/// tile of C after the tile's last K block (while the tile is in that thread's caches), not
/// in a pass of its own: the bits of [`gemm_segments`] then `post`'s function.
///
/// ```
/// use nibble_tensor::gemm::{gemm_segments_post, MatRef, Segment};
/// use nibble_tensor::ops::PostOp;
/// let (x, w_t) = ([1.0f32, -2.0], [1.0f32, 0.0, 0.0, 1.0]); // 1x2 times 2x2
/// let (xa, wb) = (MatRef::row_major(&x, 1, 2).unwrap(), MatRef::row_major(&w_t, 2, 2).unwrap());
/// let mut y = [f32::NAN; 2];
/// gemm_segments_post(&[Segment { a: xa, b: &wb }], &mut y, false, PostOp::Relu).unwrap();
/// assert_eq!(y, [1.0, 0.0]);
/// ```
pub fn gemm_segments_post(
    segs: &[Segment<'_>],
    c: &mut [f32],
    accumulate: bool,
    post: PostOp,
) -> Result<()> {
    gemm_segments_bias_post(segs, None, c, accumulate, post)
}

/// [`gemm_segments_post`] with a bias: `C (+)= bias + Σ A_i · B_i`, `bias` a row of `n` values
/// added to every row of C, with the bits of a bias segment (`1 · bias`, the
/// [`gemm_segments`] docs) in front of `segs`. Without `accumulate` the bias goes in with the
/// first K block's store (`c = acc + bias[j]`, the same single rounding as the segment's
/// `bias + acc`) rather than in a pass of its own over C: one pass over a 1024x1024 C fewer
/// (the segment's pass cost 0.12–0.25 ms of a 7.0–7.8 ms product on 2 threads). A bias of
/// `-0.0` may give `-0.0` where the segment gave `+0.0`.
///
/// ```
/// use nibble_tensor::gemm::{gemm_segments_bias_post, MatRef, Segment};
/// use nibble_tensor::ops::PostOp;
/// let (x, w_t) = ([1.0f32, -2.0], [1.0f32, 0.0, 0.0, 1.0]); // 1x2 times 2x2
/// let (xa, wb) = (MatRef::row_major(&x, 1, 2).unwrap(), MatRef::row_major(&w_t, 2, 2).unwrap());
/// let mut y = [f32::NAN; 2];
/// let bias = [10.0f32, 20.0];
/// gemm_segments_bias_post(&[Segment { a: xa, b: &wb }], Some(&bias), &mut y, false, PostOp::Identity)
///     .unwrap();
/// assert_eq!(y, [11.0, 18.0]);
/// ```
pub fn gemm_segments_bias_post(
    segs: &[Segment<'_>],
    bias: Option<&[f32]>,
    c: &mut [f32],
    accumulate: bool,
    post: PostOp,
) -> Result<()> {
    let micro = Micro::for_path(kernel_path());
    let Some(bias) = bias else {
        return gemm_staged(
            micro,
            stage_floats(),
            segs,
            None,
            c,
            accumulate,
            Packing::Auto,
            post,
        );
    };
    let n = bias.len();
    if let Some(first) = segs.first().filter(|f| f.b.n() != n) {
        return Err(TensorError::ShapeMismatch {
            op: "gemm (bias)",
            lhs: vec![n],
            rhs: vec![first.b.k(), first.b.n()],
        });
    }
    if accumulate || segs.is_empty() {
        // C + bias first: the bias as its segment, in front.
        let m = match segs.first() {
            Some(f) => f.a.rows(),
            None if n > 0 => c.len() / n,
            None => 0,
        };
        let ones = [1.0f32];
        let row = MatRef::row_major(bias, 1, n)?;
        let mut all = Vec::with_capacity(segs.len() + 1);
        all.push(Segment {
            a: MatRef::new(&ones, m, 1, 0, 1)?,
            b: &row,
        });
        all.extend_from_slice(segs);
        return gemm_staged(
            micro,
            stage_floats(),
            &all,
            None,
            c,
            accumulate,
            Packing::Auto,
            post,
        );
    }
    gemm_staged(
        micro,
        stage_floats(),
        segs,
        Some(bias),
        c,
        accumulate,
        Packing::Auto,
        post,
    )
}

/// Most floats of packed B one stage of the driver holds (1 MiB, the packing buffer's size
/// before stages): a stage packs as many whole `KC` blocks as fit (at least one), so a
/// 1024-wide weight takes one stage per block, 4 fork-joins for a 1024-deep product (there were
/// 8 before packing moved into the tasks). A stage of all of K (4 MiB at 1024²) measured about
/// 2 % faster on 16 threads (2.32 against 2.36 ms), not worth 3 MiB more of workspace in an
/// engine whose QLoRA step must fit 48 MB; with this driver (`examples/gemm_tiles.rs`,
/// [`gemm_with_stage`], 1024-wide `x · Wᵀ`, medians of 31, 2026-12-03 18:09 UTC) one stage took
/// 2.049 against 2.076 ms at batch 1024 and 2.381 against 2.068 at 1000 on 16 threads, 3.04
/// against 3.22 on 8: no gain.
const STAGE_FLOATS: usize = 1 << 18;

/// [`STAGE_FLOATS`], or `NIBBLE_GEMM_STAGE_FLOATS` where set (an experiment's switch, read
/// once: 1048576 makes a 1024² weight's stage all of K, one fork-join per product).
fn stage_floats() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("NIBBLE_GEMM_STAGE_FLOATS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&v: &usize| v > 0)
            .unwrap_or(STAGE_FLOATS)
    })
}

/// Whether a large parallel GEMM whose B is packed per call takes the held grid with its tasks
/// ordered by column slice (`NIBBLE_GEMM_SLICES=1`, an experiment's switch, read once): each
/// packed group is then read by the few threads of its slice instead of by all of them, while
/// A is still packed per task. Off by default: on the 16-core Xeon (`bignet bench --batch
/// 1024 --threads 16`, 2026-12-06 22:46–22:48 UTC, eight rounds in turns, medians of 9) it
/// took low_precision 36.5 → 34.8 ms and qlora 39.6 → 38.3 (medians over the rounds) only with
/// `NIBBLE_GEMM_STAGE_FLOATS=1048576` beside it (either switch alone gained nothing), ahead in
/// five rounds of eight and behind in one; their ratio to bignet's time 1.24 → 1.16, still
/// short of issue 13's 1.05. Six more rounds in another lease (2026-12-07 00:30 UTC): low_precision
/// 39.5 → 38.7 ms, qlora 42.2 → 40.9, while bignet, which neither switch touches, moved
/// between 29.9 and 40.5 ms from round to round. On 2 threads (Zen 5) the two forms were
/// within the noise.
fn column_slices() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("NIBBLE_GEMM_SLICES").is_ok_and(|v| v.trim() == "1"))
}

/// Deepest K block that a stage takes beside its [`STAGE_FLOATS`] (up to this many rows of K
/// of such blocks in all): a LoRA adapter's `h · Bᵀ` (rank 32 or less here; its packed B is
/// 128 KiB at n = 1024) runs in the stage of the base product's last block instead of a stage
/// of its own, a fork-join and a pass over C more for 3 % of the multiply-adds.
const STAGE_TAIL_K: usize = 64;

/// Tasks per thread of a parallel GEMM's balanced grid (see [`task_grid`]).
const TASKS_PER_THREAD: usize = 8;

/// One product of a [`gemm_segments`] sum: `a` (`m x k`) times `b` (`k x n`).
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    /// The left operand, `m x k` (any strides; a row stride of 0 repeats one row).
    pub a: MatRef<'a, f32>,
    /// The right operand, `k x n`.
    pub b: &'a dyn PackB,
}

/// States of a packed B column group (see [`StageB`]).
const EMPTY: u8 = 0;
const PACKING: u8 = 1;
const READY: u8 = 2;

/// One `KC` block of K: segment `seg`, rows `k0..k0 + kc` of its B, packed at `offset`
/// (floats) in its stage's buffer, or read in place from `held` where B is stored packed
/// ([`PackB::prepacked_block`]: all of the block's panels, of every column block).
#[derive(Debug, Clone, Copy)]
struct KBlock<'b> {
    seg: usize,
    k0: usize,
    kc: usize,
    offset: usize,
    held: Option<&'b [f32]>,
}

/// The packed B of one stage: a run of consecutive K blocks of the column block at `n0`, each
/// `npan` panels of `kc * NR` floats, panel after panel. Column groups (the `np` panels one
/// microkernel call reads) are packed on first use by whichever task needs them first, so
/// packing runs inside the same parallel pass as the products (one fork-join per stage instead
/// of two per K block) and no thread waits for all of B before it starts.
struct StageB<'s> {
    buf: BPtr,
    blocks: &'s [KBlock<'s>],
    /// One state per (block of the stage, column group).
    states: &'s [std::sync::atomic::AtomicU8],
    n0: usize,
    ncb: usize,
    npan: usize,
    np: usize,
    groups: usize,
}

/// The packed-B buffer's base pointer, shared by the tasks of a stage.
#[derive(Clone, Copy)]
struct BPtr(*mut f32);
// SAFETY: each column group of the buffer is written by exactly one task (the one that moves
// its state from EMPTY to PACKING) and read only after its state is READY (Release/Acquire),
// and the buffer outlives the stage's tasks (they are joined before it is reused).
unsafe impl Send for BPtr {}
// SAFETY: as above.
unsafe impl Sync for BPtr {}

impl StageB<'_> {
    /// Column group `g` of the stage's block `bi`, packed by this task if no task has begun
    /// it, else once the task packing it is done: `panels` panels of `kc * NR` floats.
    fn group(&self, segs: &[Segment<'_>], bi: usize, g: usize) -> &[f32] {
        use std::sync::atomic::Ordering::{Acquire, Release};
        let blk = self.blocks[bi];
        let kc = blk.kc;
        let q = g * self.np;
        let panels = self.np.min(self.npan - q);
        let off = blk.offset + q * kc * NR;
        let len = panels * kc * NR;
        let state = &self.states[bi * self.groups + g];
        if state.load(Acquire) != READY {
            if state
                .compare_exchange(EMPTY, PACKING, Acquire, Acquire)
                .is_ok()
            {
                // SAFETY: this task won the group: no other task writes or reads
                // buf[off..off + len] until the READY store below; the range lies inside the
                // stage's buffer (sized for every block of the stage).
                let dst = unsafe { std::slice::from_raw_parts_mut(self.buf.0.add(off), len) };
                let b = segs[blk.seg].b;
                for (u, panel) in dst.chunks_mut(kc * NR).enumerate() {
                    let j0 = (q + u) * NR;
                    b.pack_panel(blk.k0, kc, self.n0 + j0, NR.min(self.ncb - j0), panel);
                }
                state.store(READY, Release);
            } else {
                while state.load(Acquire) != READY {
                    std::hint::spin_loop();
                }
            }
        }
        // SAFETY: the group is READY (Acquire above): its floats were written once and are
        // only read from now on; the range lies inside the stage's buffer.
        unsafe { std::slice::from_raw_parts(self.buf.0.add(off), len) }
    }
}

/// One column group of a task over one K block: every micro-panel of the task's rows, depth
/// slice by depth slice (see [`gemm_with`]).
struct Sweep<'s> {
    micro: Micro,
    /// The block's segment's A.
    a: &'s MatRef<'s, f32>,
    /// The task's packed micro-panels of the block (unused when A is read in place).
    ap: &'s [f32],
    /// First row and number of rows of the task.
    i0: usize,
    mc: usize,
    /// Micro-panels of the task.
    panels_a: usize,
    /// The K block: first row of B, depth, and the depth of one kernel call.
    k0: usize,
    kc: usize,
    ks: usize,
    /// The group's packed panels (panel stride `bstride`) or its first column in a row-major B
    /// (row stride `bstride`).
    bptr: *const f32,
    bstride: usize,
    /// B panels of the group and columns of C they cover.
    panels: usize,
    cols: usize,
    /// C at (0, the group's first column), row stride `rs_c`.
    c: CPtr,
    rs_c: usize,
    /// How the block's first slice stores into C (the others add).
    store: Store,
}

impl Sweep<'_> {
    /// Runs the kernel over the group: A packed (`ap`) or in place (`UNPACKED_A`), B packed or
    /// in place (`DIRECT_B`). The choices are constants here, so each instantiation builds
    /// its sources with a known variant and the kernel's source dispatch folds away: a kernel
    /// call costs what it did before sources (it matters for short K, `k = 32`).
    ///
    /// # Safety
    /// `ap` holds `panels_a` packed micro-panels of `kc * micro.mr()` floats unless
    /// `UNPACKED_A`; `bptr` holds `panels` packed panels of `kc * NR` floats `bstride` apart,
    /// or with `DIRECT_B` is element `(k0, j0)` of a row-major f32 B with row stride
    /// `bstride` whose columns `j0 .. j0 + panels * NR` and rows `k0 .. k0 + kc` exist; the
    /// `mc x cols` rectangle of C at `c + i0 * rs_c` is this task's alone and valid; the CPU
    /// runs `micro`.
    #[inline(always)]
    unsafe fn run<const UNPACKED_A: bool, const DIRECT_B: bool>(&self) {
        let (mr, kc, a) = (self.micro.mr(), self.kc, self.a);
        // Depth slices in order: every element of C sees the same sequence of K blocks and
        // slices whatever the thread count or task order.
        for s0 in (0..kc).step_by(self.ks) {
            let sk = self.ks.min(kc - s0);
            let b = if DIRECT_B {
                BSrc::Direct {
                    ptr: self.bptr.wrapping_add(s0 * self.bstride),
                    ld: self.bstride,
                }
            } else {
                BSrc::Packed {
                    ptr: self.bptr.wrapping_add(s0 * NR),
                    panel_stride: self.bstride,
                }
            };
            for ip in 0..self.panels_a {
                let i = ip * mr;
                let rows = mr.min(self.mc - i);
                let r0 = self.i0 + i;
                let asrc = if UNPACKED_A {
                    ASrc::Strided {
                        ptr: a
                            .data
                            .as_ptr()
                            .wrapping_add(r0 * a.row_stride + (self.k0 + s0) * a.col_stride),
                        rs: a.row_stride,
                        cs: a.col_stride,
                        rows,
                    }
                } else {
                    ASrc::Packed(self.ap[ip * kc * mr..][s0 * mr..].as_ptr())
                };
                // SAFETY: a packed asrc points at rows s0.. of a full kc*mr packed A panel
                // (sk <= kc - s0 steps remain); a strided one at element (r0, k0 + s0) of A,
                // whose `rows` rows and next sk columns lie inside A (MatRef::new checked its
                // extent); b is s0 rows into the group (sk rows remain), and the rows x cols
                // tile of C at (r0, 0) lies inside the caller's rectangle.
                unsafe {
                    self.micro.run(
                        self.panels,
                        sk,
                        asrc,
                        b,
                        self.c.get().add(r0 * self.rs_c),
                        self.rs_c,
                        if s0 == 0 { self.store } else { Store::Add },
                        rows,
                        self.cols,
                    );
                }
            }
        }
    }
}

/// `b`'s [`PackB::as_row_major`] where the claim holds up: with `b` read as `k x n` (the K and
/// N the kernels use, whatever `b.k()` says on another call), a row stride of at
/// least `n` (where `k > 1`) and at least `(k - 1) * row_stride + n` floats, so that every
/// element `(p, j)` the kernels read in place lies inside the slice. `None` otherwise (and for
/// an empty B, never read in place), so that B is packed through [`PackB::pack_panel`], as a
/// [`PackB::prepacked_block`] too short for its block is: the same bits, only slower.
fn row_major_checked(b: &dyn PackB, k: usize, n: usize) -> Option<(&[f32], usize)> {
    let (data, ld) = b.as_row_major()?;
    if k == 0 || n == 0 || (k > 1 && ld < n) {
        return None;
    }
    let needed = (k - 1).checked_mul(ld)?.checked_add(n)?;
    (data.len() >= needed).then_some((data, ld))
}

/// Checks that every segment is `m x k_i` times `k_i x n` and `c` holds `m x n`.
fn check_segments(segs: &[Segment<'_>], m: usize, n: usize, c_len: usize) -> Result<()> {
    for s in segs {
        if s.a.rows() != m || s.b.n() != n || s.a.cols() != s.b.k() {
            return Err(TensorError::ShapeMismatch {
                op: "gemm",
                lhs: vec![s.a.rows(), s.a.cols()],
                rhs: vec![s.b.k(), s.b.n()],
            });
        }
    }
    let mn = m.checked_mul(n).ok_or(TensorError::Overflow {
        op: "gemm",
        shape: vec![m, n],
    })?;
    if c_len != mn {
        return Err(TensorError::Length {
            op: "gemm",
            shape: vec![m, n],
            expected: mn,
            found: c_len,
        });
    }
    Ok(())
}

/// The GEMM driver for one microkernel (whose path the CPU supports): `C (+)= Σ_i A_i · B_i`
/// over `segs` in order, each segment's K cut into its own `KC` blocks.
///
/// With `packing`, each K block's rows of A are read in place instead of packed, and each
/// full column group of B is read in place from a row-major f32 B instead of the stage's
/// packed panels (a group reaching past C's edge is always packed, so the kernels' full-width
/// B loads stay inside B).
fn gemm_with(
    micro: Micro,
    segs: &[Segment<'_>],
    c: &mut [f32],
    accumulate: bool,
    packing: Packing,
) -> Result<()> {
    gemm_staged(
        micro,
        STAGE_FLOATS,
        segs,
        None,
        c,
        accumulate,
        packing,
        PostOp::Identity,
    )
}

/// [`gemm`] with stages of at most `stage_floats` floats of packed B (at least one `KC` block
/// each; the default is 1 MiB, see `STAGE_FLOATS`): more K blocks per stage means fewer
/// fork-joins and each task's tile of C finished in one pass, for a larger packing buffer.
/// For benchmarks (`examples/gemm_tiles.rs`); results are the bits of [`gemm`] whatever the
/// stage.
pub fn gemm_with_stage(
    stage_floats: usize,
    a: MatRef<'_, f32>,
    b: &dyn PackB,
    c: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    gemm_staged(
        Micro::for_path(kernel_path()),
        stage_floats,
        &[Segment { a, b }],
        None,
        c,
        accumulate,
        Packing::Auto,
        PostOp::Identity,
    )
}

/// [`gemm_with`] with stages of at most `stage_floats_max` floats of packed B, `post`
/// applied by each task to its tile of C after the last stage, and, without `accumulate`, a
/// `bias` row (`n` values, checked by the caller) added by the first block's stores.
#[allow(clippy::too_many_arguments)]
fn gemm_staged(
    micro: Micro,
    stage_floats_max: usize,
    segs: &[Segment<'_>],
    bias: Option<&[f32]>,
    c: &mut [f32],
    accumulate: bool,
    packing: Packing,
    post: PostOp,
) -> Result<()> {
    let Some(first) = segs.first() else {
        if !accumulate {
            c.fill(0.0);
        }
        post.apply_in_place(c);
        return Ok(());
    };
    let (m, n) = (first.a.rows(), first.b.n());
    check_segments(segs, m, n, c.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let k_total = segs
        .iter()
        .try_fold(0usize, |acc, s| acc.checked_add(s.a.cols()))
        .ok_or_else(|| TensorError::Overflow {
            op: "gemm",
            shape: segs.iter().map(|s| s.a.cols()).collect(),
        })?;
    if k_total == 0 {
        if !accumulate {
            match bias {
                Some(b) => crate::ops::fill_rows(c, b)?,
                None => c.fill(0.0),
            }
        }
        post.apply_in_place(c);
        return Ok(());
    }
    let (mr, np) = (micro.mr(), micro.panels());
    let unpacked_a = segs.iter().all(|sg| packing.unpacked_a(m, n, &sg.a, micro));
    let direct_b: Vec<Option<(&[f32], usize)>> = segs
        .iter()
        .map(|s| {
            if packing.unpacked_b(m, micro) {
                // The K the kernels read (A's columns), not a second answer of `b.k()`: a
                // `PackB` whose `k()` changed between calls read past its slice.
                row_major_checked(s.b, s.a.cols(), n)
            } else {
                None
            }
        })
        .collect();
    let threads = rayon::current_num_threads().max(1);
    let work = m.saturating_mul(n).saturating_mul(k_total);
    let parallel = threads > 1 && work >= 1 << 18;

    let ncb_max = NC.min(n);
    let panel_cols = ncb_max.div_ceil(NR) * NR;
    // Stages: runs of consecutive K blocks (of any segment) whose packed B fits in
    // STAGE_FLOATS, at least one block each, plus short blocks (at most STAGE_TAIL_K deep,
    // up to that many rows of K in all: a LoRA adapter's `h · Bᵀ`) beside them; offsets are
    // for the widest column block.
    let mut stages: Vec<Vec<KBlock>> = Vec::new();
    let mut cur: Vec<KBlock> = Vec::new();
    let (mut used, mut long_used, mut short_used) = (0, 0, 0);
    let mut stage_floats = 0;
    let npan_all = n.div_ceil(NR);
    let short_room = STAGE_TAIL_K * panel_cols;
    for (seg, sg) in segs.iter().enumerate() {
        for k0 in (0..sg.a.cols()).step_by(KC) {
            let kc = KC.min(sg.a.cols() - k0);
            let held =
                sg.b.prepacked_block(k0)
                    .filter(|blk| blk.len() >= npan_all * kc * NR);
            let floats = if held.is_some() { 0 } else { kc * panel_cols };
            let short = kc <= STAGE_TAIL_K;
            let fits = if short {
                short_used + floats <= short_room
            } else {
                long_used + floats <= stage_floats_max
            };
            if !cur.is_empty() && !fits {
                stages.push(std::mem::take(&mut cur));
                (used, long_used, short_used) = (0, 0, 0);
            }
            if short {
                short_used += floats;
            } else {
                long_used += floats;
            }
            cur.push(KBlock {
                seg,
                k0,
                kc,
                offset: used,
                held,
            });
            used += floats;
            stage_floats = stage_floats.max(used);
        }
    }
    stages.push(cur);
    let mut bbuf = Scratch::take(&B_BUF, stage_floats);
    let cptr = CPtr(c.as_mut_ptr());
    let pm = m.div_ceil(mr);
    let mut first_block = true;
    let last_stage = stages.len() - 1;
    for (si, stage_blocks) in stages.iter().enumerate() {
        // The step after the products, on each task's tile once its last block is in.
        let tile_post = if si == last_stage {
            post
        } else {
            PostOp::Identity
        };
        for n0 in (0..n).step_by(NC) {
            let ncb = NC.min(n - n0);
            let npan = ncb.div_ceil(NR);
            let groups = npan.div_ceil(np);
            let held = stage_blocks.iter().any(|b| b.held.is_some());
            let sliced = !held && parallel && pm * mr >= SMALL_M_ROWS && column_slices();
            let (mb, nb) = task_grid(m, mr, groups, threads, parallel, held || sliced);
            // Offsets were laid out for `panel_cols` columns; a narrower last column block
            // uses a prefix of each block's room.
            let blocks: &[KBlock] = stage_blocks;
            let states: Vec<std::sync::atomic::AtomicU8> = (0..blocks.len() * groups)
                .map(|_| std::sync::atomic::AtomicU8::new(EMPTY))
                .collect();
            let stage = StageB {
                buf: BPtr(bbuf.as_mut().as_mut_ptr()),
                blocks,
                states: &states,
                n0,
                ncb,
                npan,
                np,
                groups,
            };
            let overwrite_first = !accumulate && first_block;
            // Tasks over disjoint (rows, column groups) rectangles of C; each runs every K
            // block of the stage in order over its rectangle.
            let run = |t: usize| {
                // Sliced: consecutive tasks share a column slice (rayon hands each thread a
                // run of consecutive tasks).
                let (rb, cb) = if sliced {
                    (t % mb, t / mb)
                } else {
                    (t / nb, t % nb)
                };
                let (p0, p1) = split_range(pm, mb, rb);
                let (g0, g1) = split_range(groups, nb, cb);
                if p0 >= p1 || g0 >= g1 {
                    return;
                }
                let i0 = p0 * mr;
                let mc = (p1 * mr).min(m) - i0;
                let a_floats = if unpacked_a { 0 } else { (p1 - p0) * KC * mr };
                let mut abuf = Scratch::take(&A_BUF, a_floats);
                let ap = abuf.as_mut();
                for (bi, blk) in blocks.iter().enumerate() {
                    let kc = blk.kc;
                    let overwrite = overwrite_first && bi == 0;
                    let a = &segs[blk.seg].a;
                    if !unpacked_a {
                        micro.pack_a(a, i0, mc, blk.k0, kc, ap);
                    }
                    let ks = micro.k_slice(kc);
                    // Neighbouring tasks start at neighbouring groups, so concurrent tasks
                    // pack different groups instead of waiting on one.
                    let span = g1 - g0;
                    for step in 0..span {
                        let g = g0 + (t + step) % span;
                        let q = g * np;
                        let panels = np.min(npan - q);
                        let j = q * NR;
                        let cols = (panels * NR).min(ncb - j);
                        // B in place (a full group of a row-major f32 B) or the packed group.
                        let (bptr, bstride, direct) = match (blk.held, direct_b[blk.seg]) {
                            (Some(held), _) => (
                                held.as_ptr().wrapping_add((n0 / NR + q) * kc * NR),
                                kc * NR,
                                false,
                            ),
                            (None, Some((data, ld))) if cols == panels * NR => {
                                (data.as_ptr().wrapping_add(blk.k0 * ld + n0 + j), ld, true)
                            }
                            _ => (stage.group(segs, bi, g).as_ptr(), kc * NR, false),
                        };
                        let store = match (overwrite, bias) {
                            (false, _) => Store::Add,
                            (true, None) => Store::Overwrite,
                            (true, Some(b)) => Store::OverRow(b.as_ptr().wrapping_add(n0 + j)),
                        };
                        let sweep = Sweep {
                            micro,
                            a,
                            ap,
                            i0,
                            mc,
                            panels_a: p1 - p0,
                            k0: blk.k0,
                            kc,
                            ks,
                            bptr,
                            bstride,
                            panels,
                            cols,
                            c: CPtr(cptr.get().wrapping_add(n0 + j)),
                            rs_c: n,
                            store,
                        };
                        // SAFETY: per Sweep::run's contract: `ap` holds the task's packed
                        // micro-panels of this block unless A is read in place; bptr is the
                        // group's packed panels (stage.group, or the block held packed by B,
                        // whose length was checked to hold every panel of the block: `panels`
                        // full kc*NR panels either way) or
                        // element (k0, n0 + j) of a row-major B whose columns j.. j + panels *
                        // NR lie inside it (a full group) for the block's kc rows (its slice
                        // holds every row's n columns: row_major_checked); the C
                        // rectangle (i0.., n0 + j..) of mc x cols lies inside the m x n matrix
                        // and this task's rectangle, which no other task touches; `micro` runs
                        // only on a CPU that supports it.
                        unsafe {
                            match (unpacked_a, direct) {
                                (false, false) => sweep.run::<false, false>(),
                                (false, true) => sweep.run::<false, true>(),
                                (true, false) => sweep.run::<true, false>(),
                                (true, true) => sweep.run::<true, true>(),
                            }
                        }
                    }
                }
                if tile_post != PostOp::Identity {
                    // The task's rectangle of C: rows i0.., columns of groups g0..g1.
                    let (c0, c1) = (n0 + g0 * np * NR, (n0 + g1 * np * NR).min(n0 + ncb));
                    for r in i0..i0 + mc {
                        // SAFETY: row r's columns c0..c1 lie inside the m x n matrix C and in
                        // this task's rectangle, which no other task touches; every product
                        // of the rectangle above has returned.
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(cptr.get().add(r * n + c0), c1 - c0)
                        };
                        tile_post.apply(row);
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
        first_block = false;
    }
    bbuf.put_back(&B_BUF);
    Ok(())
}
