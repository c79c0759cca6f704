//! Format-independent kernel machinery: the small-batch GEMV driver, the two [`PackB`] adapters
//! (forward over `Wᵀ`, backward over `W`), dot products, and the `WeightMatrix` glue.

use std::cell::Cell;
use std::ops::Range;

use nibble_tensor::gemm::{gemm, MatRef, PackB, NR};
use nibble_tensor::lowrank::{fused_matvec, LowRank};
use nibble_tensor::ops::PostOp;
use nibble_tensor::parallel::PARALLEL_MIN_MACS;
use nibble_tensor::weight::check_matmul_operands;
use nibble_tensor::Tensor;
use rayon::prelude::*;

/// Runs a 4-row dot-product kernel over `rows`, then a 1-row kernel over the rest, and hands
/// each result to `put(j, row, value)` (`j = row - rows.start`). Usage:
/// `for_row_quads!(rows, |r| four_rows_at(r), one_row_at(r), |j, row, v| ...)`.
/// A macro rather than a function taking closures, so that the kernels inline into the
/// caller's `#[target_feature]` body.
macro_rules! for_row_quads {
    ($rows:expr, |$r:ident| $four:expr, $one:expr, $put:expr) => {{
        let rows: std::ops::Range<usize> = $rows;
        let mut put = $put;
        let mut $r = rows.start;
        while $r + 4 <= rows.end {
            let v: [f32; 4] = $four;
            for (t, &vt) in v.iter().enumerate() {
                put($r - rows.start + t, $r + t, vt);
            }
            $r += 4;
        }
        while $r < rows.end {
            let v: f32 = $one;
            put($r - rows.start, $r, v);
            $r += 1;
        }
    }};
}
pub(crate) use for_row_quads;

/// [`for_row_quads!`] with an 8-row kernel first: 8 rows at a time, then 4, then 1. Usage:
/// `for_row_octets!(rows, |r| eight_rows_at(r), four_rows_at(r), one_row_at(r), put)`.
macro_rules! for_row_octets {
    ($rows:expr, |$r:ident| $eight:expr, $four:expr, $one:expr, $put:expr) => {{
        let rows: std::ops::Range<usize> = $rows;
        let mut put = $put;
        let mut $r = rows.start;
        while $r + 8 <= rows.end {
            let v: [f32; 8] = $eight;
            for (t, &vt) in v.iter().enumerate() {
                put($r - rows.start + t, $r + t, vt);
            }
            $r += 8;
        }
        let start = rows.start;
        $crate::kernels::for_row_quads!($r..rows.end, |$r| $four, $one, |_, row: usize, v: f32| {
            put(row - start, row, v)
        });
    }};
}
pub(crate) use for_row_octets;

/// The `put` of a GEMV over a range of rows ([`for_row_quads!`]): writes `v` at `y[j]`, or adds
/// it there with `acc`.
#[inline(always)]
pub(crate) fn store_row(y: &mut [f32], acc: bool) -> impl FnMut(usize, usize, f32) + '_ {
    move |j, _row, v| y[j] = if acc { y[j] + v } else { v }
}

/// A block of W to dequantize into a strided destination: `W[r0 + p, c0..c0+len]` goes to
/// `dst[p * stride..p * stride + len]` for `p < rows`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ColBlock {
    /// First row of W.
    pub(crate) r0: usize,
    /// Number of rows.
    pub(crate) rows: usize,
    /// First column of W.
    pub(crate) c0: usize,
    /// Number of columns.
    pub(crate) len: usize,
    /// Distance in `dst` between consecutive rows (`>= len`).
    pub(crate) stride: usize,
}

impl ColBlock {
    /// Whether a SIMD column kernel working in whole runs of `align` columns may write this
    /// block of an `out x inn` matrix into a `dst_len`-element destination.
    pub(crate) fn fits(&self, (out, inn): (usize, usize), align: usize, dst_len: usize) -> bool {
        self.r0 + self.rows <= out
            && self.c0 % align == 0
            && self.len % align == 0
            && self.c0 + self.len <= inn
            && self.len <= self.stride
            && (self.rows == 0 || dst_len >= (self.rows - 1) * self.stride + self.len)
    }

    /// Whether a SIMD panel kernel working in whole runs of `align` columns may write this
    /// block of an `out x inn` matrix transposed, as one forward GEMM panel of `NR` lanes
    /// (`dst[p · NR + j] = W[r0 + j, c0 + p]`), into a `dst_len`-element destination
    /// (`stride` unused).
    pub(crate) fn fits_panel(
        &self,
        (out, inn): (usize, usize),
        align: usize,
        dst_len: usize,
    ) -> bool {
        self.r0 + self.rows <= out
            && self.rows <= NR
            && self.c0 % align == 0
            && self.len % align == 0
            && self.c0 + self.len <= inn
            && dst_len / NR >= self.len
    }
}

/// Appends `x` with each run of 16 reordered as its 8 even then 8 odd elements (the low and
/// high nibbles of 8 packed bytes), the layout the 4-bit AVX2 GEMVs read.
pub(crate) fn push_even_odd16(x: &[f32], prep: &mut Vec<f32>) {
    for blk in x.chunks_exact(16) {
        prep.extend((0..8).map(|t| blk[2 * t]));
        prep.extend((0..8).map(|t| blk[2 * t + 1]));
    }
}

/// The AVX2 tier's shared helpers (also reached as `kernels::avx2` by the int8-activation path).
#[cfg(target_arch = "x86_64")]
pub(crate) use crate::arch::avx2;
use crate::cpu::{is_x86_simd, kernel_path, usable, KernelPath};

/// Batches from this on use the packed-panel GEMM (the default of [`QuantRows::gemm_min_m`]);
/// below it, [`batch_tiles`] (or fused GEMVs). 1024², 2 threads, tiles against the GEMM
/// (ms): m = 16 Q4 0.78 / 1.07, NF4 0.75 / 1.05, lower 0.67 / 1.06, int8 0.59 / 0.85;
/// m = 32 1.25 / 1.49, 1.24 / 1.49, 1.18 / 1.50, 1.07 / 1.30; m = 48 1.78 / 1.79, 1.75 / 1.85,
/// 1.67 / 1.78, 1.59 / 1.62.
pub(crate) const GEMM_MIN_M: usize = 48;

/// Batches from this on (below [`QuantRows::gemm_min_m`]) use [`batch_tiles`]; smaller ones
/// one fused GEMV per vector (the default of [`QuantRows::tiles_min_m`]: NF4's GEMV, a table
/// lookup per weight, loses to the tiles from m = 2 on, 1024², 2 threads: 0.48 / 0.40 ms).
pub(crate) const TILES_MIN_M: usize = 2;

/// Rows of W a GEMV task handles at a time for batches of 2 and more (its codes stay in L1/L2
/// while every vector of the batch passes over them).
const GEMV_ROW_TILE: usize = 64;

/// Vectors a small batch hands to [`QuantRows::gemv_batch`] at once at most (a larger batch
/// goes in chunks).
const GEMV_BATCH_MAX: usize = 8;

/// Columns of a forward panel dequantized per pass (matches the GEMM's `KC`).
const FWD_CHUNK: usize = 256;

/// A quantized `out x in` matrix seen row by row.
pub(crate) trait QuantRows: Sync + Send {
    /// `(out, in)`.
    fn dims(&self) -> (usize, usize);
    /// The smallest batch that goes through the GEMM rather than [`batch_tiles`]: about where
    /// the GEMM, whose cost at small batches is mostly dequantizing all of W into its panels,
    /// catches up.
    fn gemm_min_m(&self) -> usize {
        GEMM_MIN_M
    }
    /// The smallest batch that dequantizes W a tile of rows at a time into cache and runs the
    /// dense small-batch kernel over it ([`batch_tiles`]) rather than the format's fused GEMV
    /// once per vector: about where `m` GEMVs cost as much as decoding W once plus `m` dense
    /// passes over cached f32 rows.
    fn tiles_min_m(&self) -> usize {
        TILES_MIN_M
    }
    /// The format's integer view for int8 activations ([`crate::act8`]), if it has one.
    fn act8_view(&self) -> Option<&dyn crate::act8::IntCodes> {
        None
    }
    /// Whether int8 mode runs a batch of `m` on the generic [`crate::act8::forward`] (else the
    /// format's own forward: a fused int8 kernel where it has one, or the f32 path): where
    /// [`crate::act8::int8_route`] says so for the format (measured, see [`crate::act8`]).
    fn act8_generic(&self, _m: usize) -> bool {
        false
    }
    /// Whether int8 mode runs a batch of `m` (from 2) through the format's fused int8 GEMV,
    /// one vector after another over tiles of rows ([`crate::act8::fused_end`]), rather than
    /// the batch tiles of its f32 path.
    fn act8_fused(&self, _m: usize) -> bool {
        false
    }
    /// Column granularity of [`QuantRows::dequant_segment`].
    fn seg_align(&self) -> usize;
    /// Writes `W[r, c0..c0+len]` into `dst[..len]`; `c0` is a multiple of `seg_align()` and so
    /// is `len` unless `c0 + len == in`.
    fn dequant_segment(&self, path: KernelPath, r: usize, c0: usize, len: usize, dst: &mut [f32]);
    /// Writes the block `b` of W into `dst` (see [`ColBlock`]; same alignment rules as
    /// [`QuantRows::dequant_segment`]): the format's AVX2 column kernel where it has one and
    /// the block fits it, else one row segment at a time. (Formats provide
    /// [`QuantRows::dequant_cols_simd`], not this.)
    fn dequant_cols(&self, path: KernelPath, b: ColBlock, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_simd(usable(path))
            && b.fits(self.dims(), self.seg_align(), dst.len())
            // SAFETY: the path went through `usable` (the CPU has its tier, AVX2, FMA and F16C
            // at least) and `fits` checked the rows, columns and destination lengths.
            && unsafe { self.dequant_cols_simd(usable(path), b, dst) }
        {
            return;
        }
        for p in 0..b.rows {
            let d = &mut dst[p * b.stride..p * b.stride + b.len];
            self.dequant_segment(path, b.r0 + p, b.c0, b.len, d);
        }
    }
    /// The format's column kernel of the x86 tier `path` (AVX2 or AVX-512) for
    /// [`QuantRows::dequant_cols`]: `false` (nothing written) if it has none.
    ///
    /// # Safety
    /// `path` is [`KernelPath::Avx2Fma`] or [`KernelPath::Avx512`] and the CPU supports it,
    /// and `b.fits(self.dims(), self.seg_align(), dst.len())` holds.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dequant_cols_simd(&self, _path: KernelPath, _b: ColBlock, _dst: &mut [f32]) -> bool {
        false
    }
    /// The format's kernel of the x86 tier `path` that writes a block of W transposed as one
    /// forward GEMM panel ([`ColBlock::fits_panel`], the layout [`FwdPack`] packs): `false`
    /// (nothing written) if it has none.
    ///
    /// # Safety
    /// `path` is [`KernelPath::Avx2Fma`] or [`KernelPath::Avx512`] and the CPU supports it,
    /// and `b.fits_panel(self.dims(), self.seg_align(), dst.len())` holds.
    #[cfg(target_arch = "x86_64")]
    unsafe fn pack_fwd_panel_simd(
        &self,
        _path: KernelPath,
        _b: ColBlock,
        _dst: &mut [f32],
    ) -> bool {
        false
    }
    /// Appends the per-input precomputation for [`QuantRows::gemv`] (e.g. block sums of `x`)
    /// to `prep`, for one vector `x` of a batch of `m` (a format whose int8-activation route
    /// fuses only batch 1 prepares that route's x only when `m == 1`).
    fn gemv_prepare(&self, _path: KernelPath, _m: usize, _x: &[f32], _prep: &mut Vec<f32>) {}
    /// `y[j] = W[rows.start + j, :] · x` (`y[j] += ...` with `acc`) for the rows in `rows`;
    /// `prep` is what [`QuantRows::gemv_prepare`] appended for this `x` on this path. The
    /// format's GEMV of the path's x86 tier where it has one and takes this `prep`, else its
    /// [`QuantRows::gemv_prepared`] where that takes it, else [`gemv_generic`]. (Formats
    /// provide those two, not this.)
    fn gemv(
        &self,
        path: KernelPath,
        x: &[f32],
        prep: &[f32],
        rows: Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        let fits = x.len() == self.dims().1 && rows.end <= self.dims().0 && y.len() >= rows.len();
        #[cfg(target_arch = "x86_64")]
        if fits
            && is_x86_simd(usable(path))
            // SAFETY: the path went through `usable` (the CPU has its tier, AVX2, FMA and F16C
            // at least); x, rows and y were just checked.
            && unsafe { self.gemv_simd(usable(path), x, prep, rows.clone(), y, acc) }
        {
            return;
        }
        if fits && self.gemv_prepared(path, prep, rows.clone(), y, acc) {
            return;
        }
        gemv_generic(self, path, x, rows, y, acc);
    }
    /// A small batch's GEMVs in one pass over the rows: `out[b · stride + j] = W[rows.start +
    /// j, :] · x_b` for the vectors whose preparations are `preps` (each from
    /// [`QuantRows::gemv_prepare`] on `path`), with the bits [`QuantRows::gemv`] gives each
    /// vector alone; `false` (nothing written) where the format has no such kernel for these
    /// preparations (the caller then runs [`QuantRows::gemv`] vector by vector). `rows` lie
    /// inside W, `stride >= rows.len()` and `out.len() >= (preps.len() - 1) · stride +
    /// rows.len()` (the caller's contract).
    fn gemv_batch(
        &self,
        _path: KernelPath,
        _preps: &[&[f32]],
        _rows: Range<usize>,
        _out: &mut [f32],
        _stride: usize,
    ) -> bool {
        false
    }
    /// The format's GEMV for a `prep` that its [`QuantRows::gemv_prepare`] makes on every path
    /// (Q4's int8 x, whose kernels include a scalar reference for paths without x86 ones),
    /// for [`QuantRows::gemv`] after [`QuantRows::gemv_simd`] declined: `false` (nothing written)
    /// for any other `prep`. `x.len() == in`, `rows.end <= out` and `y.len() >= rows.len()`
    /// were checked.
    fn gemv_prepared(
        &self,
        _path: KernelPath,
        _prep: &[f32],
        _rows: Range<usize>,
        _y: &mut [f32],
        _acc: bool,
    ) -> bool {
        false
    }
    /// The format's GEMV of the x86 tier `path` (AVX2 or AVX-512) for [`QuantRows::gemv`]:
    /// `false` (nothing written) if it has none or `prep` is not what its
    /// [`QuantRows::gemv_prepare`] makes on that path.
    ///
    /// # Safety
    /// `path` is [`KernelPath::Avx2Fma`] or [`KernelPath::Avx512`] and the CPU supports it;
    /// `x.len() == in`, `rows.end <= out` and `y.len() >= rows.len()`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemv_simd(
        &self,
        _path: KernelPath,
        _x: &[f32],
        _prep: &[f32],
        _rows: Range<usize>,
        _y: &mut [f32],
        _acc: bool,
    ) -> bool {
        false
    }
}

/// GEMV by dequantizing 256 columns of a row at a time into a stack buffer (any format, any
/// path; no heap allocation).
pub(crate) fn gemv_generic<F: QuantRows + ?Sized>(
    f: &F,
    path: KernelPath,
    x: &[f32],
    rows: Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    let (_, i) = f.dims();
    let mut buf = [0.0f32; FWD_CHUNK];
    for (r, yv) in rows.zip(y.iter_mut()) {
        let mut s = 0.0f32;
        let mut c = 0;
        while c < i {
            let len = (i - c).min(FWD_CHUNK);
            segment(f, path, r, c, len, &mut buf[..len]);
            s += dot(path, &buf[..len], &x[c..c + len]);
            c += len;
        }
        *yv = if acc { *yv + s } else { s };
    }
}

/// `W[r, c0..c0+len]` into `dst` for any `c0`, `len` (aligned requests go straight to
/// [`QuantRows::dequant_segment`], others through a widened temporary).
fn segment<F: QuantRows + ?Sized>(
    f: &F,
    path: KernelPath,
    r: usize,
    c0: usize,
    len: usize,
    dst: &mut [f32],
) {
    let i = f.dims().1;
    let a = f.seg_align().max(1);
    if c0 % a == 0 && (len % a == 0 || c0 + len == i) {
        f.dequant_segment(path, r, c0, len, dst);
    } else {
        let s0 = c0 / a * a;
        let e = (c0 + len).div_ceil(a).saturating_mul(a).min(i);
        let mut t = vec![0.0f32; e - s0];
        f.dequant_segment(path, r, s0, e - s0, &mut t);
        dst[..len].copy_from_slice(&t[c0 - s0..c0 - s0 + len]);
    }
}

/// `a · b` with the path's SIMD (the summation order differs between paths, never between
/// thread counts).
pub(crate) fn dot(path: KernelPath, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    match usable(path) {
        KernelPath::Scalar => a[..n].iter().zip(&b[..n]).map(|(x, y)| x * y).sum(),
        KernelPath::Portable => crate::arch::portable::dot(&a[..n], &b[..n]),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx2 only if the CPU has AVX2 and FMA.
        KernelPath::Avx2Fma => unsafe { avx2::dot(&a[..n], &b[..n]) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2Fma => dot(KernelPath::Portable, a, b),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx512 only if the CPU has AVX-512 F/BW/VL, AVX2 and FMA.
        KernelPath::Avx512 => unsafe { crate::arch::avx512::dot(&a[..n], &b[..n]) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx512 => dot(KernelPath::Portable, a, b),
    }
}

/// A thread's reusable scratch vector.
type Scratch = std::thread::LocalKey<Cell<Vec<f32>>>;

/// Takes the thread's scratch vector out of its cell (capacity and contents kept) while in
/// use, so a re-entrant call simply starts a fresh one; [`put_scratch`] returns it.
fn take_scratch(key: &'static Scratch) -> Vec<f32> {
    key.with(|c| c.take())
}

fn put_scratch(key: &'static Scratch, v: Vec<f32>) {
    key.with(|c| c.set(v));
}

/// The thread's GEMV preparation scratch, emptied (see [`take_scratch`]).
pub(crate) fn take_prep() -> Vec<f32> {
    let mut v = take_scratch(&PREP);
    v.clear();
    v
}

pub(crate) fn put_prep(v: Vec<f32>) {
    put_scratch(&PREP, v);
}

/// The thread's storage for a GEMV's per-block scales of a few rows, `len` zeros (see
/// [`crate::act8`]'s `RowScratch` on why a kernel called per block of rows keeps its storage
/// rather than asking `calloc` each call); give it back with [`put_row_scales`].
pub(crate) fn take_row_scales(len: usize) -> Vec<f32> {
    let mut v = take_scratch(&ROW_SCALES);
    v.clear();
    v.resize(len, 0.0);
    v
}

pub(crate) fn put_row_scales(v: Vec<f32>) {
    put_scratch(&ROW_SCALES, v);
}

thread_local! {
    static PREP: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// [`batch_tiles`]' dequantized rows and results (not cleared: always overwritten).
    static TILE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// [`FwdPack`]'s `NR x FWD_CHUNK` tile of dequantized row segments (not cleared: the
    /// rows a panel reads are always written first).
    static FWD_TILE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// [`take_row_scales`]' storage.
    static ROW_SCALES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `y`'s base pointer, shared by GEMV tasks that write disjoint rows of `Wᵀ`'s output.
#[derive(Clone, Copy)]
struct YPtr(*mut f32);
// SAFETY: each task holding a YPtr writes only the elements of its own row range (disjoint
// from every other task's), and the `&mut y` borrow outlives every task (joined before return).
unsafe impl Send for YPtr {}
// SAFETY: as above.
unsafe impl Sync for YPtr {}

impl YPtr {
    /// Writes (or with `accumulate` adds) `v` at element `idx` of `y`.
    ///
    /// # Safety
    /// `idx` lies inside `y`, in the rows that belong to the calling task alone.
    #[inline(always)]
    unsafe fn store(self, idx: usize, v: f32, accumulate: bool) {
        // SAFETY: the caller's contract.
        unsafe {
            let d = self.0.add(idx);
            *d = if accumulate { *d + v } else { v };
        }
    }
}

/// Runs `task(t)` for `t < tasks`, on the pool when `parallel`; the first error stops it.
fn run_tasks<E: Send>(
    tasks: usize,
    parallel: bool,
    task: impl Fn(usize) -> Result<(), E> + Sync + Send,
) -> Result<(), E> {
    if parallel {
        (0..tasks).into_par_iter().try_for_each(task)
    } else {
        (0..tasks).try_for_each(task)
    }
}

/// Batch 1: `y`'s rows split over the pool in one task per thread (multiples of 4 rows, for
/// the 4-row kernels), `run(rows, y_part)` per task, for an `out x in` W. A row's result does
/// not depend on the split.
pub(crate) fn split_rows(
    (o, i): (usize, usize),
    y: &mut [f32],
    run: impl Fn(Range<usize>, &mut [f32]) + Sync + Send,
) {
    let chunk = batch1_chunk(o, i);
    // (A caller outside the pool computes one part itself and spins for the others: see
    // `nibble_tensor::parallel::for_each_task`.)
    nibble_tensor::parallel::for_each_chunk(y, chunk, |start, yc| run(start..start + yc.len(), yc));
}

/// Rows per task of a batch-1 product through an `o x i` W: one task per thread of the pool
/// (in multiples of 4 rows), or all `o` rows on the calling thread below
/// [`PARALLEL_MIN_MACS`] multiply-adds. Fewer, larger tasks were slower on the 16-core Xeon
/// (one 1024² layer, int8 activations, 16 threads: Q4 23–28 µs with 16 tasks, 41–44 with 8,
/// 61–82 with 4; 2026-12-03 22:27 UTC).
fn batch1_chunk(o: usize, i: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    if threads > 1 && o.saturating_mul(i) >= PARALLEL_MIN_MACS {
        o.div_ceil(threads).div_ceil(4) * 4
    } else {
        o
    }
    .max(1)
}

/// Forward `y = x · Wᵀ` for any format.
///
/// Shapes: `x` `[m, in]`, `y` `[m, out]` row-major. Batch 1: the format's fused GEMV (rows of W
/// split evenly over the pool's threads, in multiples of 4). Batches of 2 up to
/// [`QuantRows::gemm_min_m`]: one fused GEMV per vector over 64-row tiles below
/// [`QuantRows::tiles_min_m`] or where int8 mode runs the format's fused int8 GEMV
/// ([`QuantRows::act8_fused`]), else [`batch_tiles`] (W decoded once per batch, a tile of rows
/// at a time). From there on, the GEMM over [`FwdPack`].
pub(crate) fn matmul_t<F: QuantRows>(
    f: &F,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
) -> nibble_tensor::Result<()> {
    matmul_t_fusing(f, x, m, y, accumulate, None).map(drop)
}

/// `y = post(bias + x · Wᵀ (+ h · Bᵀ))` (`extra = (h, Bᵀ)` where given) in one pass where
/// [`matmul_t`] would run the generic int8 driver: the bias added and `post` applied as each
/// value is stored ([`crate::act8::forward_with_bias`]), and with an extra its GEMM adds the
/// adapter's product to each run of outputs as it stores them
/// ([`crate::act8::forward_low_rank`]), with the bits of filling y with the bias rows,
/// [`matmul_t`] accumulating, the f32 GEMM accumulating `h · Bᵀ` and `post`; `Ok(false)`,
/// with `y` untouched, elsewhere (and without a bias or an extra).
pub(crate) fn matmul_t_one_pass<F: QuantRows>(
    f: &F,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    extra: Option<nibble_tensor::gemm::Segment<'_>>,
    post: PostOp,
) -> nibble_tensor::Result<bool> {
    let (o, i) = f.dims();
    check_matmul_operands("linear", m, x.len(), i, y.len(), o)?;
    if m == 0
        || o == 0
        || bias.is_some_and(|b| b.len() != o)
        || crate::act8::activations() != crate::act8::ActivationMode::Int8
        || !f.act8_generic(m)
    {
        return Ok(false);
    }
    let Some(w) = f.act8_view() else {
        return Ok(false);
    };
    let tier = crate::act8::IntTier::for_path(kernel_path());
    Ok(match (extra, bias) {
        (Some(extra), bias) => match crate::act8::LowRankTail::new(extra.a, extra.b, m, o) {
            Some(tail) => crate::act8::forward_low_rank(tier, w, x, m, y, bias, &tail, post),
            None => false,
        },
        (None, Some(bias)) => crate::act8::forward_with_bias(tier, w, x, m, y, bias, post),
        (None, None) => false,
    })
}

/// Batch 1 with a low-rank adapter, `y (+)= x · Wᵀ + B (A x)`: the adapter is fused into the
/// format's batch-1 GEMV pass ([`nibble_tensor::lowrank`]) wherever that GEMV runs (f32
/// activations, and Q4's fused int8 GEMV); where the generic int8 driver runs instead, the
/// adapter's two products follow it. Either way the same bit for bit as [`matmul_t`]
/// followed by [`LowRank::apply_unfused`].
pub(crate) fn matvec_t_low_rank<F: QuantRows>(
    f: &F,
    x: &[f32],
    y: &mut [f32],
    accumulate: bool,
    adapter: &LowRank<'_>,
) -> nibble_tensor::Result<()> {
    let (o, i) = f.dims();
    adapter.check(o, i, x, y)?;
    if !matmul_t_fusing(f, x, 1, y, accumulate, Some(adapter))? {
        adapter.apply_unfused(x, y)?;
    }
    Ok(())
}

/// A quantized W's batch-1 product by ranges of rows (`WeightMatrix::batch1_rows`): the
/// format's fused GEMV over `x`, prepared once ([`QuantRows::gemv_prepare`]), as [`matmul_t`]
/// runs it on each block at `m = 1`.
pub(crate) struct QuantBatch1<'a, F: QuantRows> {
    f: &'a F,
    x: &'a [f32],
    kernel: Batch1Kernel<'a>,
}

/// What a [`QuantBatch1`]'s rows run.
enum Batch1Kernel<'a> {
    /// The format's GEMV on `path`, with x prepared once (the thread's scratch, given back on
    /// drop).
    Gemv { path: KernelPath, prep: Vec<f32> },
    /// Where int8 activations take the generic driver at batch 1: its rows.
    Int8(crate::act8::Batch1Int8<'a>),
}

/// [`QuantBatch1`] for `x`, where [`matmul_t`] at `m = 1` runs the format's GEMV or, with int8
/// activations, the generic driver's dot products ([`crate::act8::forward`] at `m = 1`, by
/// rows: [`crate::act8::Batch1Int8`]): `None` where `x` is not `[in]` or the format sends
/// batch 1 to the GEMM.
pub(crate) fn batch1_rows<'a, F: QuantRows>(f: &'a F, x: &'a [f32]) -> Option<QuantBatch1<'a, F>> {
    let (_, i) = f.dims();
    if x.len() != i || f.gemm_min_m() <= 1 {
        return None;
    }
    if crate::act8::activations() == crate::act8::ActivationMode::Int8 && f.act8_generic(1) {
        let tier = crate::act8::IntTier::for_path(kernel_path());
        // Where the driver declines x (a NaN or infinity), the f32 GEMV runs, as in
        // `matmul_t`.
        if let Some(int8) = f
            .act8_view()
            .and_then(|w| crate::act8::Batch1Int8::new(tier, w, x))
        {
            let kernel = Batch1Kernel::Int8(int8);
            return Some(QuantBatch1 { f, x, kernel });
        }
    }
    let path = usable(kernel_path());
    let mut prep = take_prep();
    f.gemv_prepare(path, 1, x, &mut prep);
    let kernel = Batch1Kernel::Gemv { path, prep };
    Some(QuantBatch1 { f, x, kernel })
}

impl<F: QuantRows> nibble_tensor::weight::Batch1Rows for QuantBatch1<'_, F> {
    fn rows(
        &self,
        rows: Range<usize>,
        y: &mut [f32],
        accumulate: bool,
    ) -> nibble_tensor::Result<()> {
        nibble_tensor::weight::check_batch1_rows(self.f.dims().0, &rows, y)?;
        if rows.is_empty() {
            return Ok(());
        }
        match &self.kernel {
            Batch1Kernel::Int8(int8) => int8.rows(rows, y, accumulate),
            Batch1Kernel::Gemv { path, prep } => {
                self.f.gemv(*path, self.x, prep, rows, y, accumulate)
            }
        }
        Ok(())
    }
}

impl<F: QuantRows> Drop for QuantBatch1<'_, F> {
    fn drop(&mut self) {
        if let Batch1Kernel::Gemv { prep, .. } = &mut self.kernel {
            put_prep(std::mem::take(prep));
        }
    }
}

/// [`matmul_t`], with `adapter` fused into the batch-1 GEMV when that is the path taken;
/// returns whether it was (if not, the caller adds it).
fn matmul_t_fusing<F: QuantRows>(
    f: &F,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
    adapter: Option<&LowRank<'_>>,
) -> nibble_tensor::Result<bool> {
    let (o, i) = f.dims();
    check_matmul_operands("linear", m, x.len(), i, y.len(), o)?;
    let path = usable(kernel_path());
    if m == 0 || o == 0 {
        return Ok(false);
    }
    if crate::act8::activations() == crate::act8::ActivationMode::Int8 && f.act8_generic(m) {
        if let Some(w) = f.act8_view() {
            let tier = crate::act8::IntTier::for_path(kernel_path());
            if crate::act8::forward(tier, w, x, m, y, accumulate) {
                return Ok(false);
            }
        }
    }
    if m >= f.gemm_min_m() {
        let pack = FwdPack { f, path };
        gemm(MatRef::row_major(x, m, i)?, &pack, y, accumulate)?;
        return Ok(false);
    }
    let threads = rayon::current_num_threads().max(1);
    let parallel = threads > 1 && o.saturating_mul(i).saturating_mul(m) >= PARALLEL_MIN_MACS;
    if m >= f.tiles_min_m().max(2) && !f.act8_fused(m) {
        batch_tiles(f, path, x, m, y, accumulate, parallel)?;
        return Ok(false);
    }
    let (prep, starts) = prepare_batch(f, path, x, m);
    if m == 1 {
        let base =
            |rows: Range<usize>, yc: &mut [f32]| f.gemv(path, x, &prep, rows, yc, accumulate);
        let fused = match adapter {
            Some(adapter) => {
                let chunk = batch1_chunk(o, i);
                fused_matvec(adapter, x, y, chunk, chunk < o, base);
                true
            }
            None => {
                split_rows((o, i), y, base);
                false
            }
        };
        put_prep(prep);
        return Ok(fused);
    }
    let yp = YPtr(y.as_mut_ptr());
    let (prep_ref, starts) = (&prep, &starts);
    let run = move |t: usize| {
        let r0 = t * GEMV_ROW_TILE;
        let nr = GEMV_ROW_TILE.min(o - r0);
        gemv_tile_rows(f, path, x, m, (prep_ref, starts), r0..r0 + nr, |b, j, v| {
            // SAFETY: b < m and r0 + j < o, so the element is inside y (m x o); rows
            // r0..r0+nr belong to this task alone.
            unsafe { yp.store(b * o + r0 + j, v, accumulate) }
        });
        Ok(())
    };
    let done = run_tasks(o.div_ceil(GEMV_ROW_TILE), parallel, run);
    put_prep(prep);
    done.map(|()| false)
}

/// Each vector's preparation for a small batch's GEMVs ([`QuantRows::gemv_prepare`]), all in
/// one buffer (the thread's kept one, [`take_prep`]), with where each vector's starts (a
/// format may prepare vectors differently, e.g. Q4's int8 GEMV leaves a vector holding a NaN to
/// the f32 GEMV), and one past the last.
fn prepare_batch<F: QuantRows>(
    f: &F,
    path: KernelPath,
    x: &[f32],
    m: usize,
) -> (Vec<f32>, Vec<usize>) {
    let i = f.dims().1;
    let mut prep = take_prep();
    let mut starts = Vec::with_capacity(m + 1);
    for b in 0..m {
        starts.push(prep.len());
        f.gemv_prepare(path, m, &x[b * i..(b + 1) * i], &mut prep);
    }
    starts.push(prep.len());
    (prep, starts)
}

/// One tile of rows (at most [`GEMV_ROW_TILE`]) of a small batch on the formats' GEMVs, every
/// vector of `x` (`[m, in]`) prepared by [`prepare_batch`]: `store(b, j, v)` for vector `b`
/// and row `rows.start + j`. The batch goes in chunks of at most [`GEMV_BATCH_MAX`] vectors
/// (of sizes differing by at most one), each over the tile in one pass where the format has a
/// kernel for it, else vector by vector: each vector's values are those of its GEMV alone,
/// whatever the tile.
fn gemv_tile_rows<F: QuantRows>(
    f: &F,
    path: KernelPath,
    x: &[f32],
    m: usize,
    (prep, starts): (&[f32], &[usize]),
    rows: Range<usize>,
    mut store: impl FnMut(usize, usize, f32),
) {
    let i = f.dims().1;
    let nr = rows.len();
    debug_assert!(nr <= GEMV_ROW_TILE);
    let chunks = m.div_ceil(GEMV_BATCH_MAX);
    let mut all = [0.0f32; GEMV_ROW_TILE * GEMV_BATCH_MAX];
    for c in 0..chunks {
        let (b0, b1) = (c * m / chunks, (c + 1) * m / chunks);
        let preps: [&[f32]; GEMV_BATCH_MAX] = std::array::from_fn(|v| {
            if b0 + v < b1 {
                &prep[starts[b0 + v]..starts[b0 + v + 1]]
            } else {
                &[]
            }
        });
        let batched = b1 - b0 >= 2
            && f.gemv_batch(
                path,
                &preps[..b1 - b0],
                rows.clone(),
                &mut all,
                GEMV_ROW_TILE,
            );
        for b in b0..b1 {
            let yt = &mut all[(b - b0) * GEMV_ROW_TILE..][..nr];
            if !batched {
                let xb = &x[b * i..(b + 1) * i];
                f.gemv(path, xb, preps[b - b0], rows.clone(), yt, false);
            }
            for (j, &v) in yt.iter().enumerate() {
                store(b, j, v);
            }
        }
    }
}

/// A small batch with a low-rank adapter (`WeightMatrix::matmul_t_low_rank`): `y =
/// post(bias + x · Wᵀ + (x · Aᵀ) · Bᵀ)` in one parallel pass over the tiles that
/// [`matmul_t`] runs at this batch ([`gemv_tile_rows`] or [`dequant_tile_rows`]), the
/// adapter's products and `post` inside it ([`nibble_tensor::lowrank::fused_matmul`]), with
/// the bits of the bias rows, [`matmul_t`] accumulating, the adapter's unfused products and
/// `post`. Where int8 activations run the batch on the integer GEMM (the generic driver from
/// [`crate::act8::gemm::GEMM_MIN_M`] vectors), the layer with its adapter on the int8 x
/// instead ([`crate::act8::adapter::forward_adapter`]: `h` from the same int8 x, `h · Bᵀ` and
/// `post` in the base product's pass). `Ok(false)`, `y` untouched, where [`matmul_t`] would
/// not run tiles (batch 1, the f32 GEMM, the generic int8 driver where the adapter's int8
/// product declines), where the adapter's products would not run as GEMVs
/// ([`LowRank::fuses_batch`]) or where the bias does not fit (the caller's unfused path then
/// says so).
pub(crate) fn matmul_t_low_rank<F: QuantRows>(
    f: &F,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    adapter: &LowRank<'_>,
    post: PostOp,
) -> nibble_tensor::Result<bool> {
    let (o, i) = f.dims();
    check_matmul_operands("linear", m, x.len(), i, y.len(), o)?;
    adapter.check_layer(o, i)?;
    let int8_generic =
        crate::act8::activations() == crate::act8::ActivationMode::Int8 && f.act8_generic(m);
    if int8_generic && m >= crate::act8::gemm::GEMM_MIN_M && o > 0 {
        // The integer GEMM, its int8 x serving the adapter's `x · Aᵀ` too (where that
        // declines, the caller's sequence runs: `x · Aᵀ` in f32, then the layer).
        if let Some(w) = f.act8_view() {
            let tier = crate::act8::IntTier::for_path(kernel_path());
            return Ok(crate::act8::adapter::forward_adapter(
                tier, w, x, m, y, bias, adapter, post,
            ));
        }
    }
    if m < 2
        || m >= f.gemm_min_m()
        || o == 0
        || int8_generic
        || !adapter.fuses_batch(m)
        || bias.is_some_and(|b| b.len() != o)
    {
        return Ok(false);
    }
    let path = usable(kernel_path());
    let threads = rayon::current_num_threads().max(1);
    let parallel = threads > 1 && o.saturating_mul(i).saturating_mul(m) >= PARALLEL_MIN_MACS;
    // Each tile's values onto the part's buffer `[m][rows]` (the bias rows where
    // accumulating).
    let onto = |buf: &mut [f32], acc: bool, nr: usize, b: usize, j: usize, v: f32| {
        let d = &mut buf[b * nr + j];
        *d = if acc { *d + v } else { v };
    };
    if m >= f.tiles_min_m().max(2) && !f.act8_fused(m) {
        // Parts of whole tiles, at least MIN_PART_ROWS rows.
        let rows = batch_tile_rows(i);
        let part = nibble_tensor::lowrank::MIN_PART_ROWS.div_ceil(rows) * rows;
        let failed = std::sync::Mutex::new(None);
        nibble_tensor::gemm::gemv::on_whole_lines(x, i, |x| {
            nibble_tensor::lowrank::fused_matmul(
                adapter,
                x,
                m,
                y,
                bias,
                part,
                parallel,
                post,
                |rr, buf, acc| {
                    let nr = rr.len();
                    for t0 in rr.clone().step_by(rows) {
                        let tr = t0..(t0 + rows).min(rr.end);
                        let off = t0 - rr.start;
                        let done = dequant_tile_rows(f, path, x, m, tr, |b, j, v| {
                            onto(buf, acc, nr, b, off + j, v)
                        });
                        if let Err(e) = done {
                            failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                        }
                    }
                },
            )
        })?;
        return match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(true),
        };
    }
    // Parts of one GEMV tile each.
    const _: () = assert!(GEMV_ROW_TILE >= nibble_tensor::lowrank::MIN_PART_ROWS);
    let (prep, starts) = prepare_batch(f, path, x, m);
    let done = nibble_tensor::lowrank::fused_matmul(
        adapter,
        x,
        m,
        y,
        bias,
        GEMV_ROW_TILE,
        parallel,
        post,
        |rr, buf, acc| {
            let nr = rr.len();
            gemv_tile_rows(f, path, x, m, (&prep, &starts), rr, |b, j, v| {
                onto(buf, acc, nr, b, j, v)
            })
        },
    );
    put_prep(prep);
    done.map(|()| true)
}

/// Bytes of W dequantized per tile for [`batch_tiles`] (the tile and the batch's x stay in L2
/// while every vector of the batch passes over the tile).
const BATCH_TILE_BYTES: usize = 48 << 10;

/// Small-batch forward `y = x · Wᵀ` (checked shapes; `m >= 2`): each task dequantizes a tile
/// of rows of W into its thread's scratch and runs the dense small-batch kernel
/// (`gemv_tile_f32`) for all `m` vectors over it, so W is decoded once per batch rather than
/// once per vector. Tiles are fixed by the shape alone, so results do not depend on the
/// thread count.
///
/// Shapes: `x` `[m, in]`, `y` `[m, out]`; tile `[rows, in]`, its results `[rows, m]`.
fn batch_tiles<F: QuantRows>(
    f: &F,
    path: KernelPath,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
    parallel: bool,
) -> nibble_tensor::Result<()> {
    let (o, i) = f.dims();
    let rows = batch_tile_rows(i);
    let yp = YPtr(y.as_mut_ptr());
    let run = move |x: &[f32], t: usize| {
        let r0 = t * rows;
        let nr = rows.min(o - r0);
        dequant_tile_rows(f, path, x, m, r0..r0 + nr, |b, j, v| {
            // SAFETY: b < m and r0 + j < o, so the element is inside y (m x o); rows
            // r0..r0+nr belong to this task alone.
            unsafe { yp.store(b * o + r0 + j, v, accumulate) }
        })
    };
    nibble_tensor::gemm::gemv::on_whole_lines(x, i, |x| {
        run_tasks(o.div_ceil(rows), parallel, |t| run(x, t))
    })
}

/// Rows per tile of [`batch_tiles`] for `in`-wide rows: a multiple of 3 (the dense kernel's
/// row step), at least 3, about [`BATCH_TILE_BYTES`] of dequantized W.
fn batch_tile_rows(i: usize) -> usize {
    (BATCH_TILE_BYTES / (4 * i).max(1)).clamp(3, 96) / 3 * 3
}

/// One tile of rows of [`batch_tiles`]: the rows dequantized into the thread's scratch, then
/// the dense small-batch kernel (`gemv_tile_f32`) for all `m` vectors of `x` (`[m, in]`, on
/// whole lines) over them; `store(b, j, v)` for vector `b` and row `rows.start + j`.
fn dequant_tile_rows<F: QuantRows>(
    f: &F,
    path: KernelPath,
    x: &[f32],
    m: usize,
    rows: Range<usize>,
    mut store: impl FnMut(usize, usize, f32),
) -> nibble_tensor::Result<()> {
    let i = f.dims().1;
    let nr = rows.len();
    let mut tile = take_scratch(&TILE);
    // The tile from a 64-byte line on (up to 15 floats in), as x (`on_whole_lines`).
    let need = nr * i + nr * m;
    if tile.len() < need + 15 {
        tile.resize(need + 15, 0.0);
    }
    let skip = tile.as_ptr().align_offset(64).min(15);
    let (w, res) = tile[skip..skip + need].split_at_mut(nr * i);
    f.dequant_cols(
        path,
        ColBlock {
            r0: rows.start,
            rows: nr,
            c0: 0,
            len: i,
            stride: i,
        },
        w,
    );
    // The lengths are exact by construction (w nr x i, x m x i, res nr x m); an error
    // would still reach the caller rather than leave y unwritten.
    let done = nibble_tensor::gemm::gemv::gemv_tile_f32(path, w, i, x, m, res, false);
    if done.is_ok() {
        for (j, rv) in res.chunks_exact(m).enumerate() {
            for (b, &v) in rv.iter().enumerate() {
                store(b, j, v);
            }
        }
    }
    put_scratch(&TILE, tile);
    done
}

/// Backward `dx = dy · W` for any format (GEMM over panels of `W`; under int8 activations,
/// where [`crate::act8::backward::backward_route`] says so, the integer GEMM over `W`'s
/// requantized transpose, [`crate::act8::backward`]).
///
/// Shapes: `dy` `[m, out]`, `dx` `[m, in]` row-major.
pub(crate) fn matmul<F: QuantRows>(
    f: &F,
    dy: &[f32],
    m: usize,
    dx: &mut [f32],
    accumulate: bool,
) -> nibble_tensor::Result<()> {
    let (o, i) = f.dims();
    check_matmul_operands("linear_backward_input", m, dy.len(), o, dx.len(), i)?;
    if let Some(tier) = int8_backward_tier(f, m) {
        if crate::act8::backward::input_grad(f, kernel_path(), tier, dy, m, dx, accumulate) {
            return Ok(());
        }
    }
    let pack = BwdPack {
        f,
        path: usable(kernel_path()),
    };
    gemm(MatRef::row_major(dy, m, o)?, &pack, dx, accumulate)
}

/// The integer tier that the input gradient of `m` rows is routed to under int8 activations
/// ([`crate::act8::backward::backward_route`]), or `None` where it runs through the GEMM.
fn int8_backward_tier<F: QuantRows>(f: &F, m: usize) -> Option<crate::act8::IntTier> {
    let i = f.dims().1;
    if m == 0 || i == 0 || crate::act8::activations() != crate::act8::ActivationMode::Int8 {
        return None;
    }
    let tier = crate::act8::IntTier::for_path(kernel_path());
    crate::act8::backward::backward_route(tier, m).then_some(tier)
}

/// `W` as the GEMM operand of the input gradient where [`matmul`] of `m` rows multiplies
/// through the GEMM with it: `None` where int8 activations route `m` rows to the integer GEMM
/// ([`crate::act8::backward::backward_route`]; that kernel may still decline and fall back to
/// the GEMM, which then runs on its own).
pub(crate) fn gemm_rhs_backward<F: QuantRows>(f: &F, m: usize) -> Option<Box<dyn PackB + '_>> {
    if int8_backward_tier(f, m).is_some() {
        return None;
    }
    Some(Box::new(BwdPack {
        f,
        path: usable(kernel_path()),
    }))
}

/// `Wᵀ` as a GEMM operand where [`matmul_t`] of `m` rows multiplies through the GEMM with it
/// (f32 activations, `m` at least the format's GEMM threshold); `None` elsewhere.
pub(crate) fn gemm_rhs<F: QuantRows>(f: &F, m: usize) -> Option<Box<dyn PackB + '_>> {
    let int8 = crate::act8::activations() == crate::act8::ActivationMode::Int8
        && f.act8_generic(m)
        && f.act8_view().is_some();
    if int8 || m < f.gemm_min_m() {
        return None;
    }
    Some(Box::new(FwdPack {
        f,
        path: usable(kernel_path()),
    }))
}

/// The whole matrix as f32 (rows in parallel).
pub(crate) fn to_f32<F: QuantRows>(f: &F, path: KernelPath) -> Tensor {
    let (o, i) = f.dims();
    let mut t = Tensor::zeros(&[o, i]);
    if i > 0 {
        t.data_mut()
            .par_chunks_mut(i)
            .enumerate()
            .for_each(|(r, row)| f.dequant_segment(usable(path), r, 0, i, row));
    }
    t
}

/// `Wᵀ` (k = in, n = out) as a GEMM right-hand side.
pub(crate) struct FwdPack<'a, F> {
    pub(crate) f: &'a F,
    pub(crate) path: KernelPath,
}

impl<F: QuantRows> PackB for FwdPack<'_, F> {
    fn k(&self) -> usize {
        self.f.dims().1
    }
    fn n(&self) -> usize {
        self.f.dims().0
    }
    /// Shapes: panel `kc x NR` of `Wᵀ` = rows `n0..n0+nc` of W, columns `k0..k0+kc`. Each
    /// row segment is dequantized contiguously into the thread's 16 x 256 tile, which is then
    /// transposed into `dst` (8x8 transposes on the AVX2 path, 16x16 on AVX-512).
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            let b = ColBlock {
                r0: n0,
                rows: nc.min(NR),
                c0: k0,
                len: kc,
                stride: kc,
            };
            if is_x86_simd(self.path)
                && b.fits_panel(self.f.dims(), self.f.seg_align(), dst.len())
                // SAFETY: the path went through `usable` (the CPU has its tier) and
                // `fits_panel` checked the rows, columns and destination length.
                && unsafe { self.f.pack_fwd_panel_simd(self.path, b, dst) }
            {
                return;
            }
        }
        // The thread's tile, not a fresh zeroed one per panel (16 KiB of memset, 5-10 % of the
        // packing): every element the transpose reads is written first.
        let mut tile = take_scratch(&FWD_TILE);
        if tile.len() < NR * FWD_CHUNK {
            tile.resize(NR * FWD_CHUNK, 0.0);
        }
        let buf = &mut tile[..NR * FWD_CHUNK];
        let nc = nc.min(NR);
        let mut c = 0;
        while c < kc {
            let len = (kc - c).min(FWD_CHUNK);
            for j in 0..NR {
                let row = &mut buf[j * FWD_CHUNK..j * FWD_CHUNK + len];
                if j < nc {
                    segment(self.f, self.path, n0 + j, k0 + c, len, row);
                } else {
                    row.fill(0.0);
                }
            }
            let d = &mut dst[c * NR..(c + len) * NR];
            match self.path {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the path went through `usable`, so the CPU has AVX2 and FMA; the
                // function checks its slice lengths itself.
                KernelPath::Avx2Fma => unsafe { avx2::transpose_panel(buf, FWD_CHUNK, len, d) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the path went through `usable`, so the CPU has AVX-512 F/BW/VL; the
                // function checks its slice lengths itself.
                KernelPath::Avx512 => unsafe {
                    crate::arch::avx512::transpose_panel(buf, FWD_CHUNK, len, d)
                },
                _ => {
                    for p in 0..len {
                        for j in 0..NR {
                            d[p * NR + j] = buf[j * FWD_CHUNK + p];
                        }
                    }
                }
            }
            c += len;
        }
        put_scratch(&FWD_TILE, tile);
    }
}

/// `W` (k = out, n = in) as a GEMM right-hand side.
pub(crate) struct BwdPack<'a, F> {
    pub(crate) f: &'a F,
    pub(crate) path: KernelPath,
}

impl<F: QuantRows> PackB for BwdPack<'_, F> {
    fn k(&self) -> usize {
        self.f.dims().0
    }
    fn n(&self) -> usize {
        self.f.dims().1
    }
    /// Shapes: panel `kc x NR` = rows `k0..k0+kc` of W, columns `n0..n0+nc`: each row's
    /// segment is dequantized straight into its line of `dst` ([`QuantRows::dequant_cols`]).
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        let i = self.f.dims().1;
        let a = self.f.seg_align().max(1);
        let nc = nc.min(NR);
        if n0 % a == 0 && (nc % a == 0 || n0 + nc == i) {
            self.f.dequant_cols(
                self.path,
                ColBlock {
                    r0: k0,
                    rows: kc,
                    c0: n0,
                    len: nc,
                    stride: NR,
                },
                &mut dst[..kc * NR],
            );
            if nc < NR {
                for p in 0..kc {
                    dst[p * NR + nc..(p + 1) * NR].fill(0.0);
                }
            }
        } else {
            for p in 0..kc {
                let d = &mut dst[p * NR..(p + 1) * NR];
                segment(self.f, self.path, k0 + p, n0, nc, &mut d[..nc]);
                d[nc..].fill(0.0);
            }
        }
    }
}

/// Implements `nibble_tensor::WeightMatrix` for a `QuantRows` type.
macro_rules! impl_weight_matrix {
    ($t:ty, $name:expr) => {
        impl nibble_tensor::WeightMatrix for $t {
            fn out_features(&self) -> usize {
                $crate::kernels::QuantRows::dims(self).0
            }
            fn in_features(&self) -> usize {
                $crate::kernels::QuantRows::dims(self).1
            }
            fn matmul_t(
                &self,
                x: &[f32],
                m: usize,
                y: &mut [f32],
                accumulate: bool,
            ) -> nibble_tensor::Result<()> {
                $crate::kernels::matmul_t(self, x, m, y, accumulate)
            }
            fn matmul_t_one_pass(
                &self,
                x: &[f32],
                m: usize,
                y: &mut [f32],
                bias: Option<&[f32]>,
                extra: Option<nibble_tensor::gemm::Segment<'_>>,
                post: nibble_tensor::ops::PostOp,
            ) -> nibble_tensor::Result<bool> {
                $crate::kernels::matmul_t_one_pass(self, x, m, y, bias, extra, post)
            }
            fn matvec_t_low_rank(
                &self,
                x: &[f32],
                y: &mut [f32],
                accumulate: bool,
                adapter: &nibble_tensor::lowrank::LowRank<'_>,
            ) -> nibble_tensor::Result<()> {
                $crate::kernels::matvec_t_low_rank(self, x, y, accumulate, adapter)
            }
            fn matmul_t_low_rank(
                &self,
                x: &[f32],
                m: usize,
                y: &mut [f32],
                bias: Option<&[f32]>,
                adapter: &nibble_tensor::lowrank::LowRank<'_>,
                post: nibble_tensor::ops::PostOp,
            ) -> nibble_tensor::Result<bool> {
                $crate::kernels::matmul_t_low_rank(self, x, m, y, bias, adapter, post)
            }
            fn matmul(
                &self,
                dy: &[f32],
                m: usize,
                dx: &mut [f32],
                accumulate: bool,
            ) -> nibble_tensor::Result<()> {
                $crate::kernels::matmul(self, dy, m, dx, accumulate)
            }
            fn gemm_rhs(&self, m: usize) -> Option<Box<dyn nibble_tensor::gemm::PackB + '_>> {
                $crate::kernels::gemm_rhs(self, m)
            }
            fn gemm_rhs_backward(
                &self,
                m: usize,
            ) -> Option<Box<dyn nibble_tensor::gemm::PackB + '_>> {
                $crate::kernels::gemm_rhs_backward(self, m)
            }
            fn batch1_rows<'a>(
                &'a self,
                x: &'a [f32],
            ) -> Option<Box<dyn nibble_tensor::weight::Batch1Rows + 'a>> {
                $crate::kernels::batch1_rows(self, x)
                    .map(|b| Box::new(b) as Box<dyn nibble_tensor::weight::Batch1Rows + 'a>)
            }
            fn to_f32(&self) -> nibble_tensor::Tensor {
                $crate::kernels::to_f32(self, $crate::cpu::kernel_path())
            }
            fn storage_bytes(&self) -> usize {
                self.parts_len()
            }
            fn format_name(&self) -> &'static str {
                $name
            }
        }
        impl $crate::act8::backward::Int8InputGrad for $t {
            fn input_grad_int8(
                &self,
                tier: $crate::act8::IntTier,
                dy: &[f32],
                m: usize,
                dx: &mut [f32],
                accumulate: bool,
            ) -> bool {
                $crate::act8::backward::input_grad(
                    self,
                    $crate::cpu::kernel_path(),
                    tier,
                    dy,
                    m,
                    dx,
                    accumulate,
                )
            }
        }
    };
}
pub(crate) use impl_weight_matrix;

/// Runs `f(row, row_input, row_outputs...)` over rows in parallel and returns the error of the
/// lowest failing row, if any (deterministic whatever the thread count).
/// An error naming `op` where `rows` rows of `bytes_per_row` bytes each (a quantizer's per-row
/// statistics and codes) need more memory than this machine has: a weight of `[2^40, 0]` holds
/// no element, so it is read, and sizing its rows' statistics aborted the process.
pub(crate) fn check_rows_fit(
    op: &'static str,
    shape: [usize; 2],
    bytes_per_row: usize,
) -> Result<(), crate::QuantError> {
    match nibble_tensor::machine::fits(shape[0] as u128 * bytes_per_row as u128) {
        Ok(()) => Ok(()),
        Err((needed, total)) => Err(crate::QuantError::Shape {
            op,
            shape: shape.to_vec(),
            what: format!(
                "its {} rows need {needed:.1} GiB, more than this machine's {total:.1} GiB",
                shape[0]
            ),
        }),
    }
}

pub(crate) fn first_error<E: Send>(results: Vec<Result<(), E>>) -> Result<(), E> {
    results.into_iter().collect()
}
