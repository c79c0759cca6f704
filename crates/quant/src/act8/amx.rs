//! The AMX-INT8 tier of the integer GEMM ([`super::gemm`]): the unit sums `I_u` from tile
//! dot products (`tdpbssd`), folded into f32 by the GEMM's shared `fold` on the
//! AVX-512 VNNI tier's lanes, so its outputs have the bits of every other tier.
//!
//! # Operands
//! - **B (W)**: the GEMM packs W into panels of 16 rows, `[kpad / 4][16 rows][4 bytes]`; `K`
//!   columns of a panel (`K / 4` consecutive 64-byte rows) are one B tile of `K / 4` rows by 64
//!   bytes, loaded with stride 64. Every kind of weight is a signed byte in the panel (Q4's odd
//!   codes `2c − 15`, other 4-bit and 3-bit codes 0..=15, NF4 levels and int8 codes −128..=127),
//!   so one instruction serves every format: `tdpbssd` (signed × signed).
//! - **A (x)**: the GEMM's prepared x is `xq` as signed bytes, `[m][kpad]` row-major, padded
//!   with zero vectors to a multiple of 16 (`TILE_ROWS`): 16 vectors × `K` columns are one A
//!   tile, loaded with stride `kpad`. No `+128` offset, so no correction term.
//! - **C**: 16 vectors × 16 rows of W in i32, exact (`|I_u| <= 128 · 128 · 128 < 2^31`).
//!
//! `K` per instruction is the unit (16 or 64 columns) or, for units of 128, 64 twice into the
//! same C tile (exact). Q4's units of 16 use a quarter of each tile's depth: the tier suits
//! units of 64 and 128 best.
//!
//! # Tile arrangement
//! Eight tile registers: four C tiles as 2 × 2 (32 vectors × 32 rows of W, two panels), two A
//! tiles (the two halves of 32 vectors) and two B tiles (the two panels). Each A and B tile
//! loaded serves two dot products, the most reuse eight registers allow (one C tile with one A
//! and one B would load two tiles per product, 2 × 1 or 1 × 2 C tiles 1.5). Per unit the C
//! tiles start at zero, take the unit's dot products and are stored into a per-thread i32
//! buffer of `CHUNK_UNITS` (8) units (32 KiB). The f32 fold of a chunk (whole 128-column
//! groups) runs per panel and 8 vectors at a time (up to 8 folds), resuming from the outputs of
//! the previous chunk. Chunks alternate between two buffers and the folds of chunk `c − 1` are
//! spread over the units of chunk `c` (after each unit's tile instructions, its share of the
//! folds), so that the AVX-512 fold runs while the tile unit computes instead of after it.
//! Batches and panels that do not fill 32 × 32 run the tiles they need (one A or one B).
//!
//! # What it costs (measured)
//! Cycle counters inside this driver on the 16-core Xeon (one 1024² layer, batch 1024,
//! 2026-12-03 21:06–21:14 UTC, `act8_bench` with temporary `rdtsc` probes): for units of 128
//! (lower, int8) the tile work of one unit of a 32 × 32 block (4 zeroings, 4 loads of x,
//! 4 of W, 8 dot products, 4 stores: 24 tile instructions) took about 475 cycles, about 45 % of
//! the driver's time, the fold 20 %, the write of y 15 % (before it was vectorized: 17 % on
//! one thread, 7–10 % after). For units of 16 (Q4) one unit of a block took the same 475
//! cycles for a quarter of the products: about 20 cycles per tile instruction whatever its
//! depth, which is why units of 16 run on VNNI (`gemm_tier` in the parent module). Tried and left out, no
//! faster in the same runs: blocks of 16 or 32 vectors by 1 or 2 panels (32 × 2 panels was
//! the fastest), chunks of 2 or 4 units of stored sums (to keep both halves in L1) against 8,
//! and software prefetch of the next unit's x (and W) rows.
//!
//! # Two implementations of the tiles
//! The driver (`block`) runs on a `TileOps`: `Hardware` (the instructions, inline
//! `asm!`: AMX has no stable Rust intrinsics) or `Emulator` (scalar code with the
//! instructions' semantics, reading rows and column bytes from the same 64-byte configuration).
//! [`super::IntTier::AmxEmulated`] runs the whole driver on the emulator on any CPU, so the
//! driver is tested where AMX is missing; [`super::IntTier::Amx`] runs the hardware.
//!
//! # Availability
//! [`tiles_permitted`] (or why not, [`AmxRefusal`]): CPUID leaf 7 EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), the OS saving
//! the tile state (XCR0 bits 17 and 18) and, on Linux, the kernel's permission for this process
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once). AMX runs on Linux only;
//! anything refused leaves the VNNI tier.

use super::gemm::{fold, for_rows_and_unit, Lanes, PackedW, UnitSource, XPrep};
use super::{YPtr, GROUP};

/// Rows of W per panel (the lanes of the fold: one zmm).
pub(super) const PANEL_ROWS: usize = 16;
/// Vectors of x per A tile (and rows of a C tile).
pub(super) const TILE_ROWS: usize = 16;
/// Bytes per tile row (palette 1).
const TILE_BYTES: usize = 64;
/// Vectors of x per block of the driver (two A tiles).
const BLOCK_VECTORS: usize = 2 * TILE_ROWS;
/// Rows of W per block of the driver (two panels, two B tiles).
const BLOCK_ROWS: usize = 2 * PANEL_ROWS;
/// Units of sums stored per chunk before they are folded (`8 · 32 · 32` i32, 32 KiB; at least
/// the 8 units of 16 columns of one group).
const CHUNK_UNITS: usize = 8;

/// The 64-byte operand of `ldtilecfg` (palette 1): byte 0 the palette, byte 1 the start row,
/// bytes `16 + 2t` the bytes per row of tile `t` (u16, little-endian), byte `48 + t` its rows.
#[repr(C, align(64))]
pub(super) struct TileConfig {
    bytes: [u8; 64],
}

impl TileConfig {
    /// The driver's tiles for dot products over `k` columns (16 or 64): C tiles 0..=3 of 16
    /// rows × 64 bytes, A tiles 4 and 5 of 16 rows × `k` bytes, B tiles 6 and 7 of `k / 4` rows
    /// × 64 bytes.
    fn for_depth(k: usize) -> TileConfig {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut set = |t: usize, rows: usize, colsb: usize| {
            bytes[16 + 2 * t..18 + 2 * t].copy_from_slice(&(colsb as u16).to_le_bytes());
            bytes[48 + t] = rows as u8;
        };
        for c in 0..4 {
            set(c, TILE_ROWS, TILE_BYTES);
        }
        for a in 4..6 {
            set(a, TILE_ROWS, k);
        }
        for b in 6..8 {
            set(b, k / 4, TILE_BYTES);
        }
        TileConfig { bytes }
    }

    /// Rows of tile `t` (0 where unconfigured).
    fn rows(&self, t: usize) -> usize {
        usize::from(self.bytes[48 + t])
    }

    /// Bytes per row of tile `t` (0 where unconfigured).
    fn colsb(&self, t: usize) -> usize {
        usize::from(u16::from_le_bytes([
            self.bytes[16 + 2 * t],
            self.bytes[17 + 2 * t],
        ]))
    }
}

/// The tile operations of the driver on its fixed arrangement: C tile `(v, p)` (register
/// `2v + p`) accumulates A tile `v` (x, register `4 + v`) times B tile `p` (W, register
/// `6 + p`), `v` and `p` in `0..2`.
pub(super) trait TileOps {
    /// `ldtilecfg`.
    ///
    /// # Safety
    /// The tiles exist on this CPU and the OS lets this thread use them.
    unsafe fn configure(&mut self, cfg: &TileConfig);
    /// `tilezero` of C tile `(v, p)`.
    ///
    /// # Safety
    /// Configured.
    unsafe fn zero(&mut self, v: usize, p: usize);
    /// `tileloadd` of A tile `v`: its rows from `src`, `stride` bytes apart.
    ///
    /// # Safety
    /// Configured; `src + r · stride` has the tile's bytes per row for each of its rows.
    unsafe fn load_x(&mut self, v: usize, src: *const u8, stride: usize);
    /// `tileloadd` of B tile `p`, as [`TileOps::load_x`].
    ///
    /// # Safety
    /// As [`TileOps::load_x`].
    unsafe fn load_w(&mut self, p: usize, src: *const u8, stride: usize);
    /// `tdpbssd`: C `(v, p)` += A `v` · B `p` (signed bytes, i32 sums).
    ///
    /// # Safety
    /// Configured.
    unsafe fn dot(&mut self, v: usize, p: usize);
    /// `tilestored` of C tile `(v, p)` to `dst`, rows `stride` bytes apart.
    ///
    /// # Safety
    /// Configured; `dst + r · stride` has room for a row for each of the tile's rows.
    unsafe fn store(&mut self, v: usize, p: usize, dst: *mut i32, stride: usize);
    /// `tilerelease`.
    ///
    /// # Safety
    /// The tiles exist on this CPU.
    unsafe fn release(&mut self);
}

/// The AMX instructions (inline `asm!`; LLVM's assembler knows them without a target
/// feature). The tile registers are invisible to the compiler, which never allocates them:
/// each block keeps the ordering of the others (none is `pure`).
#[cfg(target_arch = "x86_64")]
pub(super) struct Hardware;

/// Runs the `asm!` template `$pre tmmN $post` for tile register `N` chosen by a two-way index.
#[cfg(target_arch = "x86_64")]
macro_rules! on_tile {
    ($idx:expr, [$t0:literal, $t1:literal], $pre:literal, $post:literal, $($ops:tt)*) => {
        if $idx == 0 {
            std::arch::asm!(concat!($pre, "tmm", $t0, $post), $($ops)*)
        } else {
            std::arch::asm!(concat!($pre, "tmm", $t1, $post), $($ops)*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
impl TileOps for Hardware {
    #[inline(always)]
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        // SAFETY: the caller's contract (AMX usable on this thread); `cfg` is 64 readable
        // bytes.
        unsafe {
            std::arch::asm!(
                "ldtilecfg [{c}]",
                c = in(reg) cfg.bytes.as_ptr(),
                options(nostack, readonly)
            )
        }
    }
    #[inline(always)]
    unsafe fn zero(&mut self, v: usize, p: usize) {
        // SAFETY: configured (the caller's contract); touches tile registers only.
        unsafe {
            match (v, p) {
                (0, 0) => std::arch::asm!("tilezero tmm0", options(nostack)),
                (0, _) => std::arch::asm!("tilezero tmm1", options(nostack)),
                (_, 0) => std::arch::asm!("tilezero tmm2", options(nostack)),
                _ => std::arch::asm!("tilezero tmm3", options(nostack)),
            }
        }
    }
    #[inline(always)]
    unsafe fn load_x(&mut self, v: usize, src: *const u8, stride: usize) {
        // SAFETY: the caller's contract: every row of the tile is readable at src + r·stride.
        unsafe {
            on_tile!(v, ["4", "5"], "tileloadd ", ", [{s} + {t}*1]",
                s = in(reg) src, t = in(reg) stride, options(nostack, readonly))
        }
    }
    #[inline(always)]
    unsafe fn load_w(&mut self, p: usize, src: *const u8, stride: usize) {
        // SAFETY: as `load_x`.
        unsafe {
            on_tile!(p, ["6", "7"], "tileloadd ", ", [{s} + {t}*1]",
                s = in(reg) src, t = in(reg) stride, options(nostack, readonly))
        }
    }
    #[inline(always)]
    unsafe fn dot(&mut self, v: usize, p: usize) {
        // SAFETY: configured (the caller's contract); the shapes of `TileConfig::for_depth`
        // agree (C rows = A rows, A bytes / 4 = B rows, C bytes = B bytes); tiles only.
        unsafe {
            match (v, p) {
                (0, 0) => std::arch::asm!("tdpbssd tmm0, tmm4, tmm6", options(nostack)),
                (0, _) => std::arch::asm!("tdpbssd tmm1, tmm4, tmm7", options(nostack)),
                (_, 0) => std::arch::asm!("tdpbssd tmm2, tmm5, tmm6", options(nostack)),
                _ => std::arch::asm!("tdpbssd tmm3, tmm5, tmm7", options(nostack)),
            }
        }
    }
    #[inline(always)]
    unsafe fn store(&mut self, v: usize, p: usize, dst: *mut i32, stride: usize) {
        // SAFETY: the caller's contract: every row of the tile fits at dst + r·stride.
        unsafe {
            let d = v * 2 + p;
            if d < 2 {
                on_tile!(d, ["0", "1"], "tilestored [{s} + {t}*1], ", "",
                    s = in(reg) dst, t = in(reg) stride, options(nostack))
            } else {
                on_tile!(d - 2, ["2", "3"], "tilestored [{s} + {t}*1], ", "",
                    s = in(reg) dst, t = in(reg) stride, options(nostack))
            }
        }
    }
    #[inline(always)]
    unsafe fn release(&mut self) {
        // SAFETY: the caller's contract (AMX on this CPU); resets the tile state only.
        unsafe { std::arch::asm!("tilerelease", options(nostack)) }
    }
}

/// Scalar code with the semantics of the AMX instructions the driver uses (palette 1: eight
/// tiles of at most 16 rows × 64 bytes). Misuse that faults on hardware (an unconfigured
/// tile, shapes that do not agree, a palette other than 1) panics: it is a bug of the driver.
pub(super) struct Emulator {
    /// The loaded configuration (`None` before `configure` and after `release`).
    cfg: Option<([usize; 8], [usize; 8])>,
    /// The tile registers, `[tile][row][byte]`.
    tiles: Box<[[[u8; TILE_BYTES]; 16]; 8]>,
}

impl Emulator {
    /// A fresh, unconfigured tile state.
    pub(super) fn new() -> Emulator {
        Emulator {
            cfg: None,
            tiles: Box::new([[[0; TILE_BYTES]; 16]; 8]),
        }
    }

    /// `(rows, bytes per row)` of tile `t`, which must be configured.
    fn shape(&self, t: usize) -> (usize, usize) {
        let (rows, colsb) = self.cfg.expect("AMX: tile used before ldtilecfg");
        assert!(
            rows[t] > 0 && colsb[t] > 0,
            "AMX: tile {t} is not configured"
        );
        (rows[t], colsb[t])
    }

    /// `tileloadd`: rows and bytes past the configured shape become zero.
    fn load(&mut self, t: usize, src: *const u8, stride: usize) {
        let (rows, colsb) = self.shape(t);
        for (r, row) in self.tiles[t].iter_mut().enumerate() {
            row.fill(0);
            if r < rows {
                // SAFETY: the caller's contract (`TileOps::load_x`): `colsb` bytes at
                // src + r·stride.
                let from = unsafe { std::slice::from_raw_parts(src.add(r * stride), colsb) };
                row[..colsb].copy_from_slice(from);
            }
        }
    }
}

impl TileOps for Emulator {
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        assert_eq!(cfg.bytes[0], 1, "AMX: palette 1 only");
        let mut rows = [0; 8];
        let mut colsb = [0; 8];
        for t in 0..8 {
            (rows[t], colsb[t]) = (cfg.rows(t), cfg.colsb(t));
            assert!(
                rows[t] <= 16 && colsb[t] <= TILE_BYTES,
                "AMX: tile {t} too large"
            );
        }
        self.cfg = Some((rows, colsb));
        for t in self.tiles.iter_mut() {
            *t = [[0; TILE_BYTES]; 16];
        }
    }
    unsafe fn zero(&mut self, v: usize, p: usize) {
        let c = 2 * v + p;
        self.shape(c);
        self.tiles[c] = [[0; TILE_BYTES]; 16];
    }
    unsafe fn load_x(&mut self, v: usize, src: *const u8, stride: usize) {
        self.load(4 + v, src, stride);
    }
    unsafe fn load_w(&mut self, p: usize, src: *const u8, stride: usize) {
        self.load(6 + p, src, stride);
    }
    unsafe fn dot(&mut self, v: usize, p: usize) {
        let (c, a, b) = (2 * v + p, 4 + v, 6 + p);
        let ((c_rows, c_colsb), (a_rows, a_colsb), (b_rows, b_colsb)) =
            (self.shape(c), self.shape(a), self.shape(b));
        assert!(
            c_rows == a_rows && a_colsb % 4 == 0 && a_colsb / 4 == b_rows && c_colsb == b_colsb,
            "AMX: tdpbssd shapes do not agree"
        );
        let (ta, tb) = (self.tiles[a], self.tiles[b]);
        let tc = &mut self.tiles[c];
        for (m, c_row) in tc.iter_mut().enumerate().take(c_rows) {
            for n in 0..c_colsb / 4 {
                let mut acc = i32::from_le_bytes(c_row[4 * n..4 * n + 4].try_into().unwrap());
                for k in 0..a_colsb / 4 {
                    for j in 0..4 {
                        let x = i32::from(ta[m][4 * k + j] as i8);
                        let w = i32::from(tb[k][4 * n + j] as i8);
                        acc = acc.wrapping_add(x * w);
                    }
                }
                c_row[4 * n..4 * n + 4].copy_from_slice(&acc.to_le_bytes());
            }
        }
    }
    unsafe fn store(&mut self, v: usize, p: usize, dst: *mut i32, stride: usize) {
        let c = 2 * v + p;
        let (rows, colsb) = self.shape(c);
        for r in 0..rows {
            let row = &self.tiles[c][r][..colsb];
            // SAFETY: the caller's contract: `colsb` bytes fit at dst + r·stride.
            unsafe {
                std::ptr::copy_nonoverlapping(row.as_ptr(), (dst as *mut u8).add(r * stride), colsb)
            };
        }
    }
    unsafe fn release(&mut self) {
        self.cfg = None;
    }
}

thread_local! {
    /// This thread's buffer of stored unit sums ([`block`]), kept between calls.
    static SUMS: std::cell::Cell<Vec<i32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The stored sums of one chunk as a [`fold`] source: unit `u` of vectors `r0..r0 + R` of
/// the block against panel `p` of the block.
struct Stored {
    /// `[unit - u0][vector][row of W]`, [`BLOCK_VECTORS`] × [`BLOCK_ROWS`] per unit.
    sums: *const i32,
    /// The chunk's first unit.
    u0: usize,
    /// The first vector (in the block).
    r0: usize,
    /// The panel (in the block).
    p: usize,
    /// i32 per unit ([`Block::unit_stride`]).
    unit_stride: usize,
    /// i32 per vector ([`Block::row_stride`]).
    row_stride: usize,
}

impl<L: Lanes, const R: usize> UnitSource<L, R> for Stored {
    #[inline(always)]
    unsafe fn unit_sums(&self, u: usize) -> [L::I; R] {
        // SAFETY: the caller's contract: `u` is a unit of the chunk, so the 16 sums of each
        // vector were stored; L::NR == 16 (checked by `block`). A loop, not `from_fn`: a
        // closure would not inherit the caller's target features.
        unsafe {
            let mut sums = [L::zero_i(); R];
            for (r, s) in sums.iter_mut().enumerate() {
                let at = (u - self.u0) * self.unit_stride
                    + (self.r0 + r) * self.row_stride
                    + self.p * PANEL_ROWS;
                *s = L::load_i(self.sums.add(at));
            }
            sums
        }
    }
}

/// [`fold`] of `nb` (1..=`L::MR`) vectors from [`Stored`] sums, for the unit of `pw`.
///
/// # Safety
/// As [`fold`] for `src`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn fold_any<L: Lanes>(
    nb: usize,
    pw: &PackedW,
    xp: &XPrep,
    b0: usize,
    panel: usize,
    groups: std::ops::Range<usize>,
    resume: bool,
    out: *mut f32,
    src: Stored,
) {
    // SAFETY: the caller's contract.
    unsafe {
        for_rows_and_unit!(
            nb,
            pw.unit,
            L::MR,
            fold::<L, _>(pw, xp, b0, panel, groups, resume, out, src)
        )
    }
}

/// The outputs of vectors `rows` by the panels `panels` on `tiles`, the fold on lanes `L`
/// (16 of them), written (or added) into `y`. Configures the tiles at the start and releases
/// them at the end.
///
/// # Safety
/// `tiles` usable on this thread and `L`'s CPU features; `pw` packed with panels of 16 rows
/// and `xp` prepared without an offset and padded to a multiple of 16 vectors; the rest as
/// [`super::gemm::block`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<L: Lanes, T: TileOps>(
    tiles: &mut T,
    pw: &PackedW,
    xp: &XPrep,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    y: YPtr,
    o: usize,
    accumulate: bool,
) {
    assert!(L::NR == PANEL_ROWS && pw.nr == PANEL_ROWS && L::MR <= 8);
    let unit = pw.unit;
    let per_group = GROUP / unit;
    let groups = pw.kpad / GROUP;
    let chunk_groups = (CHUNK_UNITS / per_group).max(1);
    let chunks = groups.div_ceil(chunk_groups);
    // Two halves: the tiles fill one while the fold reads the other. Every value the fold reads
    // was stored by the tiles first: the old contents never show.
    let half = CHUNK_UNITS * BLOCK_VECTORS * BLOCK_ROWS;
    let mut sums = SUMS.take();
    sums.resize(2 * half, 0);
    let base = sums.as_mut_ptr();
    let mut outs = [0.0f32; 2 * BLOCK_VECTORS * PANEL_ROWS];
    // SAFETY: the caller's contract; `tile_unit` and `fold_task` get blocks inside the batch
    // and the panel range, units of a chunk, and halves of `sums`.
    unsafe {
        tiles.configure(&TileConfig::for_depth(unit.min(TILE_BYTES)));
        let mut p0 = panels.start;
        while p0 < panels.end {
            let np = (panels.end - p0).min(2);
            let mut b0 = rows.start;
            while b0 < rows.end {
                let nb = (rows.end - b0).min(BLOCK_VECTORS);
                let blk = Block { b0, nb, p0, np };
                let folds = np * nb.div_ceil(L::MR);
                // Chunk c's tile work, each unit followed by a share of chunk c − 1's folds,
                // so that the fold runs while the tiles compute.
                // (No closures here: they would not inherit the caller's target features, and
                // the fold's intrinsics would become calls.)
                for c in 0..=chunks {
                    let mut done = 0;
                    let prev = c.saturating_sub(1);
                    let prev_groups = prev * chunk_groups..((prev + 1) * chunk_groups).min(groups);
                    let prev_sums = base.add(prev % 2 * half);
                    if c < chunks {
                        let us = c * chunk_groups * per_group
                            ..((c + 1) * chunk_groups).min(groups) * per_group;
                        let dst = base.add(c % 2 * half);
                        for (j, u) in us.clone().enumerate() {
                            let at = dst.add(j * blk.unit_stride());
                            tile_unit(tiles, pw, xp, &blk, u, at);
                            let upto = if c > 0 { folds * (j + 1) / us.len() } else { 0 };
                            while done < upto {
                                let (gs, out) = (prev_groups.clone(), outs.as_mut_ptr());
                                fold_task::<L>(pw, xp, &blk, gs, prev_sums, done, out);
                                done += 1;
                            }
                        }
                    }
                    while c > 0 && done < folds {
                        let (gs, out) = (prev_groups.clone(), outs.as_mut_ptr());
                        fold_task::<L>(pw, xp, &blk, gs, prev_sums, done, out);
                        done += 1;
                    }
                }
                for p in 0..np {
                    let cols = PANEL_ROWS.min(o - (p0 + p) * PANEL_ROWS);
                    for r in 0..nb {
                        let at = (p * BLOCK_VECTORS + r) * PANEL_ROWS;
                        let idx = (b0 + r) * o + (p0 + p) * PANEL_ROWS;
                        y.store_run(idx, &outs[at..at + cols], accumulate);
                    }
                }
                b0 += nb;
            }
            p0 += np;
        }
        tiles.release();
    }
    SUMS.set(sums);
}

/// One block of the driver: vectors `b0..b0 + nb` (`nb <= 32`, `b0` a multiple of 16) by the
/// panels `p0..p0 + np` (`np <= 2`).
struct Block {
    b0: usize,
    nb: usize,
    p0: usize,
    np: usize,
}

impl Block {
    /// i32 per vector in the stored sums: the block's rows of W.
    fn row_stride(&self) -> usize {
        self.np * PANEL_ROWS
    }

    /// i32 per unit in the stored sums: whole A tiles of vectors by the block's rows of W.
    fn unit_stride(&self) -> usize {
        self.nb.next_multiple_of(TILE_ROWS) * self.row_stride()
    }
}

/// Unit `u`'s sums of the block by the tiles, stored to `dst` as `[vector][row of W]`
/// ([`BLOCK_VECTORS`] × [`BLOCK_ROWS`] i32).
///
/// # Safety
/// Tiles configured for the unit's depth; the block inside the padded batch and `pw`, `u` a
/// unit of `pw`, `dst` room for the block's sums.
#[inline(always)]
unsafe fn tile_unit<T: TileOps>(
    tiles: &mut T,
    pw: &PackedW,
    xp: &XPrep,
    blk: &Block,
    u: usize,
    dst: *mut i32,
) {
    let unit = pw.unit;
    let depth = unit.min(TILE_BYTES);
    let nv = blk.nb.div_ceil(TILE_ROWS);
    let panel_bytes = pw.kpad * PANEL_ROWS;
    // SAFETY: the caller's contract: x rows b0 + 16·v .. + 16 lie in the padded batch (b0 a
    // multiple of 16, b0 + 16·v < b0 + nb), columns `col..col + depth` below kpad, panels
    // p0 + p inside `pw`.
    unsafe {
        for v in 0..nv {
            for p in 0..blk.np {
                tiles.zero(v, p);
            }
        }
        for col in (u * unit..(u + 1) * unit).step_by(depth) {
            for v in 0..nv {
                let x = xp.row(blk.b0 + v * TILE_ROWS).add(col);
                tiles.load_x(v, x, xp.row_bytes);
            }
            for p in 0..blk.np {
                let w = pw
                    .codes
                    .as_ptr()
                    .add((blk.p0 + p) * panel_bytes + col * PANEL_ROWS);
                tiles.load_w(p, w, TILE_BYTES);
            }
            for v in 0..nv {
                for p in 0..blk.np {
                    tiles.dot(v, p);
                }
            }
        }
        let row_stride = blk.row_stride();
        for v in 0..nv {
            for p in 0..blk.np {
                let at = v * TILE_ROWS * row_stride + p * PANEL_ROWS;
                tiles.store(v, p, dst.add(at), row_stride * std::mem::size_of::<i32>());
            }
        }
    }
}

/// Fold number `k` of a chunk (panel `k / ⌈nb / MR⌉` of the block, then `MR` vectors at a
/// time) over the chunk's `groups`, its sums at `sums` (from the chunk's first unit), into
/// `outs` (`[panel][vector][16]`), resuming where the chunk is not the first.
///
/// # Safety
/// `L`'s CPU features; every unit of `groups` stored at `sums` for the block; `k` below
/// `np · ⌈nb / MR⌉`; `outs` the block's outputs.
#[inline(always)]
unsafe fn fold_task<L: Lanes>(
    pw: &PackedW,
    xp: &XPrep,
    blk: &Block,
    groups: std::ops::Range<usize>,
    sums: *const i32,
    k: usize,
    outs: *mut f32,
) {
    let per_panel = blk.nb.div_ceil(L::MR);
    let (p, r0) = (k / per_panel, k % per_panel * L::MR);
    let r = L::MR.min(blk.nb - r0);
    let u0 = groups.start * (GROUP / pw.unit);
    let resume = groups.start > 0;
    let src = Stored {
        sums,
        u0,
        r0,
        p,
        unit_stride: blk.unit_stride(),
        row_stride: blk.row_stride(),
    };
    // SAFETY: the caller's contract; `outs` holds the block's [2][32][16] outputs.
    unsafe {
        let out = outs.add((p * BLOCK_VECTORS + r0) * PANEL_ROWS);
        fold_any::<L>(r, pw, xp, blk.b0 + r0, blk.p0 + p, groups, resume, out, src);
    }
}

/// [`block`] on the AMX instructions, the fold on the VNNI tier's lanes, compiled for
/// AVX-512 F/BW + VNNI.
///
/// # Safety
/// [`tiles_permitted`] held and the CPU has AVX-512 F/BW + VNNI and AVX2/FMA; the contract of
/// [`block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_block(
    pw: &PackedW,
    xp: &XPrep,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    y: YPtr,
    o: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe {
        block::<super::avx512vnni::Vnni, _>(&mut Hardware, pw, xp, rows, panels, y, o, accumulate)
    }
}

/// [`block`] on the [`Emulator`], the fold on scalar lanes of 16 (any CPU).
///
/// # Safety
/// The contract of [`block`] (the tiles and lanes need nothing of the CPU).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_block_emulated(
    pw: &PackedW,
    xp: &XPrep,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    y: YPtr,
    o: usize,
    accumulate: bool,
) {
    let mut tiles = Emulator::new();
    // SAFETY: the caller's contract; the emulator and scalar lanes run anywhere.
    unsafe {
        block::<super::gemm::Scalar<PANEL_ROWS>, _>(
            &mut tiles, pw, xp, rows, panels, y, o, accumulate,
        )
    }
}

/// Why AMX tiles cannot run in this process ([`tiles_permitted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmxRefusal {
    /// Not x86-64 Linux (the only system where this tier asks for the tile state).
    NotLinuxX86_64,
    /// CPUID reports no AMX-TILE or AMX-INT8 (or no OSXSAVE).
    NoCpuSupport,
    /// The OS does not enable the tile state (XCR0 bits 17 and 18).
    OsTileStateOff,
    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` failed with this return value
    /// (a negated errno: −22 EINVAL on kernels before 5.16, for example).
    KernelRefused(i64),
}

impl std::fmt::Display for AmxRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmxRefusal::NotLinuxX86_64 => write!(f, "not x86-64 Linux"),
            AmxRefusal::NoCpuSupport => write!(f, "the CPU has no AMX-TILE/AMX-INT8"),
            AmxRefusal::OsTileStateOff => write!(f, "XCR0 does not enable the tile state"),
            AmxRefusal::KernelRefused(r) => {
                write!(f, "arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) returned {r}")
            }
        }
    }
}

/// Whether this process may run AMX-INT8 tiles: the CPU has AMX-TILE and AMX-INT8 (CPUID leaf
/// 7, EDX bits 24 and 25), the OS saves the tile state (XCR0 bits 17 and 18, read with
/// `xgetbv` where CPUID says OSXSAVE) and, on Linux, the kernel grants this process the tile
/// data (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); else the first refusal. Other
/// systems: refused. Asks the kernel on every call: call it once ([`super::has_amx`] does).
pub fn tiles_permitted() -> Result<(), AmxRefusal> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        if __cpuid(0).eax < 7 {
            return Err(AmxRefusal::NoCpuSupport);
        }
        let amx = __cpuid_count(7, 0).edx;
        let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
        if amx & (1 << 24) == 0 || amx & (1 << 25) == 0 || !osxsave {
            return Err(AmxRefusal::NoCpuSupport);
        }
        let (lo, _hi): (u32, u32);
        // SAFETY: `xgetbv` with ECX = 0 reads XCR0; CPUID said OSXSAVE, so it is enabled. It
        // reads no memory and writes EAX and EDX only.
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi,
                options(nomem, nostack, preserves_flags))
        };
        if lo & (1 << 17) == 0 || lo & (1 << 18) == 0 {
            return Err(AmxRefusal::OsTileStateOff);
        }
        match request_tile_data() {
            0 => Ok(()),
            r => Err(AmxRefusal::KernelRefused(r)),
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        Err(AmxRefusal::NotLinuxX86_64)
    }
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: 0 where the Linux kernel (5.16 and
/// later) lets this process use the AMX tile data from now on, on every thread, else a negated
/// errno.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> i64 {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call with these arguments only asks the kernel to permit
    // a state component for this process; it reads and writes none of our memory. `syscall`
    // returns in RAX and clobbers RCX and R11, declared; older kernels answer an error code.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        )
    };
    ret
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the driver's sequence on `tiles` for depth `k`: C (v, p) zeroed, two dot products
    /// over A (16 rows of 128 bytes, the second K step at byte `k`) and B (two panels'
    /// steps), stored as i32 `[32][32]`.
    fn run_sequence<T: TileOps>(tiles: &mut T, k: usize, a: &[u8], b: &[u8]) -> Vec<i32> {
        let mut c = vec![0x5555_5555i32; 32 * 32];
        // SAFETY: A has 32 rows of 128 bytes (2k <= 128), B two panels of 2k/4 rows of 64
        // bytes each; C 32 rows of 32 i32 (stride 128 bytes).
        unsafe {
            tiles.configure(&TileConfig::for_depth(k));
            for v in 0..2 {
                for p in 0..2 {
                    tiles.zero(v, p);
                }
            }
            for step in 0..2 {
                for v in 0..2 {
                    tiles.load_x(v, a.as_ptr().add(v * 16 * 128 + step * k), 128);
                }
                for p in 0..2 {
                    tiles.load_w(p, b.as_ptr().add(p * 2 * k * 16 + step * k * 16), 64);
                }
                for v in 0..2 {
                    for p in 0..2 {
                        tiles.dot(v, p);
                    }
                }
            }
            for v in 0..2 {
                for p in 0..2 {
                    tiles.store(v, p, c.as_mut_ptr().add(v * 16 * 32 + p * 16), 128);
                }
            }
            tiles.release();
        }
        c
    }

    /// The instructions and the emulator agree on the driver's sequence (depths 16 and 64),
    /// and both with the formula; where the CPU lacks AMX, the emulator alone (printed).
    #[test]
    fn hardware_and_emulator_agree() {
        let a: Vec<u8> = (0..32 * 128).map(|k| (k * 37 + k / 7) as u8).collect();
        let b: Vec<u8> = (0..2 * 128 * 16).map(|k| (k * 91 + k / 13) as u8).collect();
        let hardware = crate::act8::has_amx();
        if !hardware {
            let why = crate::act8::amx_status().err().unwrap_or_default();
            println!("amx: skipping the tile instructions ({why})");
        }
        for k in [16usize, 64] {
            let emulated = run_sequence(&mut Emulator::new(), k, &a, &b);
            for v in 0..32 {
                for n in 0..32 {
                    let (p, lane) = (n / 16, n % 16);
                    let want: i32 = (0..2 * k)
                        .map(|j| {
                            let w = b[p * 2 * k * 16 + (j / 4) * 64 + 4 * lane + j % 4];
                            i32::from(a[v * 128 + j] as i8) * i32::from(w as i8)
                        })
                        .sum();
                    assert_eq!(emulated[v * 32 + n], want, "k {k} C[{v}][{n}]");
                }
            }
            #[cfg(target_arch = "x86_64")]
            if hardware {
                assert_eq!(run_sequence(&mut Hardware, k, &a, &b), emulated, "k {k}");
            }
        }
    }

    /// The configuration bytes at the offsets of the `ldtilecfg` operand (Intel SDM, palette
    /// 1), read without the accessors the emulator shares with the writer.
    #[test]
    fn tile_config_layout() {
        for k in [16usize, 64] {
            let b = TileConfig::for_depth(k).bytes;
            assert_eq!((b[0], b[1]), (1, 0), "palette 1, start row 0");
            assert!(b[2..16].iter().all(|&v| v == 0), "reserved bytes");
            let colsb = |t: usize| usize::from(b[16 + 2 * t]) | usize::from(b[17 + 2 * t]) << 8;
            let want = [(16, 64), (16, 64), (16, 64), (16, 64), (16, k), (16, k)];
            for (t, &(rows, bytes)) in want.iter().enumerate() {
                assert_eq!(
                    (usize::from(b[48 + t]), colsb(t)),
                    (rows, bytes),
                    "tile {t}"
                );
            }
            for t in 6..8 {
                assert_eq!((usize::from(b[48 + t]), colsb(t)), (k / 4, 64), "tile {t}");
            }
            assert!(
                b[32..48].iter().all(|&v| v == 0),
                "tiles 8..16 bytes per row"
            );
            assert!(b[56..64].iter().all(|&v| v == 0), "tiles 8..16 rows");
        }
    }

    /// The emulator's `tdpbssd` against the formula on a shape the driver does not use
    /// (7 rows, 32 bytes deep, 40 bytes of C).
    #[test]
    fn emulator_follows_the_instruction() {
        let mut cfg = TileConfig::for_depth(32);
        for (t, rows, colsb) in [(0usize, 7u8, 40u16), (4, 7, 32), (6, 8, 40)] {
            cfg.bytes[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            cfg.bytes[48 + t] = rows;
        }
        let a: Vec<u8> = (0..7 * 50).map(|k| (k * 37 % 256) as u8).collect();
        let b: Vec<u8> = (0..8 * 64).map(|k| (k * 91 % 256) as u8).collect();
        let mut c = vec![7i32; 16 * 16];
        let mut e = Emulator::new();
        // SAFETY: the emulator touches only the buffers, which hold every row it reads or
        // writes (A 7 rows of 50, B 8 of 64, C 7 rows of 64 bytes).
        unsafe {
            e.configure(&cfg);
            e.zero(0, 0);
            e.load_x(0, a.as_ptr(), 50);
            e.load_w(0, b.as_ptr(), 64);
            e.dot(0, 0);
            e.dot(0, 0);
            e.store(0, 0, c.as_mut_ptr(), 64);
            e.release();
        }
        for m in 0..16 {
            for n in 0..16 {
                let want = if m < 7 && n < 10 {
                    2 * (0..32)
                        .map(|k| {
                            i32::from(a[m * 50 + k] as i8)
                                * i32::from(b[(k / 4) * 64 + 4 * n + k % 4] as i8)
                        })
                        .sum::<i32>()
                } else {
                    7
                };
                assert_eq!(c[m * 16 + n], want, "C[{m}][{n}]");
            }
        }
    }
}
