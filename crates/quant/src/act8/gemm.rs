//! The integer GEMM of int8 activations for batches of [`GEMM_MIN_M`] vectors and more.
//!
//! # Layout
//! W is packed on each call, block by block as the products first need it, into *panels* of
//! `NR` rows (16 on the AVX2 and AVX-VNNI tiers, a pair of ymm,
//! and on AVX-512 VNNI, one zmm; 8 on the scalar tier): for each 4 consecutive columns (a
//! *step*) the panel holds `NR × 4` bytes, row after row, which is the operand layout of
//! `vpdpbusd` / `vpmaddubsw` with the rows of W in the output lanes (and, at 16 rows, the `B`
//! tile layout of AMX `tdpbssd`, [`super::amx`]: 16 steps of a panel are one 16 × 64-byte tile). The weights are
//! stored as signed bytes `w`: Q4's codes as the odd values `2c − 15` (`w' = (n/15) · w`, no
//! offset term, [`super::IntCodes::int_centered`]), other 4-bit and 3-bit codes as they are,
//! signed codes (NF4 levels, int8) as they are. Per panel and unit: the unit's f32 scale and
//! offset per row and the correction `−128 · Σ w` per row.
//!
//! # Arithmetic (the same on every tier)
//! A micro-kernel holds `MR` vectors of x by `NR` rows of W. For each unit `u` the integer sums
//! `I_u = Σ_{k∈u} xq_k · w_k` (exact) start a register set, are converted to f32 and folded
//! into a per-group accumulator, `g = fma(I_u, scale_u, g)` and, where the matrix has offsets,
//! `g = fma(offset_u, Q_u, g)` (`Q_u = Σ_{k∈u} xq_k`); at the end of each 128-column group
//! `y = fma(g, sx_group, y)`, starting from `y = 0`. [`gemm_ref`] runs that sequence with plain
//! loops; every tier gives its bits. Tiers differ only in how they form `I_u`:
//! - scalar: `Σ xq · w` over i32 lanes;
//! - AVX2, 4-bit and 3-bit codes (`|w| <= 15`): `vpmaddubsw` of the unsigned `xq + 128`
//!   (1..=255) by `w`, four products per i16 lane summed with `vpaddw` (at most
//!   `8 · 255 · 15 = 30600 < 2^15`: no saturation), then `vpmaddwd` by ones into i32 lanes that
//!   start at `−128 · Σ w`;
//! - AVX2, 8-bit codes (NF4 levels, int8): `vpmaddubsw` of `|w|` (0..=128) by `sign(xq, w)`
//!   (pairs at most `2 · 128 · 127 < 2^15`), `vpmaddwd` by ones, lanes starting at 0 (W and
//!   x widened to i16 for a bare `vpmaddwd` ran at the same speed on Zen 3 and doubled the
//!   packing);
//! - AVX-VNNI ([`super::avxvnni`]): the 4-bit lanes of AVX2 with one 256-bit `vpdpbusd` per
//!   step in place of `vpmaddubsw` (+ `vpaddw`, `vpmaddwd`), for every code kind (no i16
//!   bound); 16 rows of W per pair of ymm, 4 vectors per micro-kernel;
//! - AVX-512 VNNI: `vpdpbusd` of `xq + 128` by `w` into lanes starting at `−128 · Σ w`;
//! - AMX ([`super::amx`]): `tdpbssd` of `xq` by `w` (signed × signed, from zero) in tiles of 16
//!   vectors × 16 rows, stored to an i32 buffer per unit and folded from there (`fold` takes
//!   its sums from a `UnitSource`: the micro-kernel's own, or the stored ones), on the VNNI
//!   tier's lanes (on scalar lanes of 16 with the tile emulator).
//!
//! # Work split
//! x is quantized first (in parallel over vectors: a NaN or an infinity in x stops the GEMM
//! before anything is written). Then one parallel pass computes the product over rectangles of
//! [`M_BLOCK`] vectors by [`N_BLOCK`] rows of W, each over the whole of `in` (K is never
//! split), so the bits do not depend on the thread count. The rectangles run column by column
//! and the first to need a block of [`N_BLOCK`] rows of W packs it (the corrections by the
//! kernel's own unit sums against x = 1) while any other waits for it, so the packing is
//! spread over the threads that use it, with no pass of its own (on the 16-core Xeon that
//! pass's fork-join cost 0.05–0.3 ms per 1024² layer for 0.25 ms of one thread's work).
//! Within a rectangle a panel stays in L1 while the vectors pass over it `MR` (2 on AVX2's
//! lanes for 4-bit and 3-bit codes, 4 on its lanes for 8-bit codes and on AVX-VNNI, 8 on
//! AVX-512 VNNI) at a time.

use rayon::prelude::*;

use super::{holds, CodeKind, IntCodes, IntLayout, IntTier, QuantizedX, YPtr, GROUP};
use nibble_tensor::ops::PostOp;

/// `$f::<$g.., NB, U>($args)` with the batch `NB = $nb` (1..=8, at most `$mr`) and the unit
/// `U = $unit` (16, 64, else 128) as constants: the one table of a kernel's monomorphic
/// instances, for the register tiles here and the AMX tier's fold.
macro_rules! for_rows_and_unit {
    ($nb:expr, $unit:expr, $mr:expr, $f:ident :: <$($g:ty),+>($($arg:expr),* $(,)?)) => {
        match $unit {
            16 => for_rows_and_unit!(@rows $nb, $mr, 16, $f::<$($g),+>($($arg),*)),
            64 => for_rows_and_unit!(@rows $nb, $mr, 64, $f::<$($g),+>($($arg),*)),
            _ => for_rows_and_unit!(@rows $nb, $mr, 128, $f::<$($g),+>($($arg),*)),
        }
    };
    (@rows $nb:expr, $mr:expr, $u:literal, $f:ident :: <$($g:ty),+>($($arg:expr),*)) => {
        match $nb {
            1 => $f::<$($g),+, 1, $u>($($arg),*),
            2 => $f::<$($g),+, 2, $u>($($arg),*),
            3 => $f::<$($g),+, 3, $u>($($arg),*),
            4 => $f::<$($g),+, 4, $u>($($arg),*),
            5 if $mr >= 5 => $f::<$($g),+, 5, $u>($($arg),*),
            6 if $mr >= 6 => $f::<$($g),+, 6, $u>($($arg),*),
            7 if $mr >= 7 => $f::<$($g),+, 7, $u>($($arg),*),
            _ if $mr >= 8 => $f::<$($g),+, 8, $u>($($arg),*),
            _ => unreachable!("at most MR vectors per kernel call"),
        }
    };
}
pub(super) use for_rows_and_unit;

/// Batches from this size on run the integer GEMM ([`super::forward`]; below, dot products).
/// At 8 it matched the dot-product driver on NF4 (0.50 ms both, one 1024² layer, 2 threads,
/// AVX2) and beat it from 12.
pub const GEMM_MIN_M: usize = 8;
/// Vectors of x per task.
pub const M_BLOCK: usize = 64;
/// Rows of W per task (a multiple of every tier's panel width).
pub const N_BLOCK: usize = 64;

/// Largest `MR · NR` of any tier (the micro-kernel's output buffer).
const MAX_TILE: usize = 8 * 16;

/// W packed into panels for one kernel (see the [module docs](self)), a block of
/// [`N_BLOCK`] rows (`N_BLOCK / nr` panels) at a time: each block is packed by the first task
/// of the products that needs it ([`PackedW::ensure_block`]), so the packing runs inside the
/// GEMM's one parallel pass over y, each block on the thread that then multiplies by it.
pub(super) struct PackedW {
    /// Rows per panel.
    pub(super) nr: usize,
    /// Padded columns (a multiple of 128).
    pub(super) kpad: usize,
    /// Columns per unit.
    pub(super) unit: usize,
    /// Units per row (`kpad / unit`).
    pub(super) units: usize,
    /// The weights, `[panel][kpad / 4][nr][4 bytes]`.
    pub(super) codes: Vec<u8>,
    /// `−128 · Σ_{k∈u} w_k`, `[panel][unit][nr]`.
    corr: Vec<i32>,
    /// Per-unit scale, `[panel][unit][nr]`.
    scale: Vec<f32>,
    /// Per-unit offset, `[panel][unit][nr]`.
    offset: Vec<f32>,
    /// Panels per block.
    per_block: usize,
    /// Per block: how far its packing has got, and whether one of its offsets is not zero
    /// (else the fold leaves the offset term out of its panels: the same bits, as adding
    /// `0 · Q_u` to a sum that is never `−0` changes nothing).
    blocks: Vec<BlockState>,
}

/// One block's packing state (see [`PackedW::blocks`]): its [`super::run_once`] stage.
#[derive(Default)]
struct BlockState {
    stage: std::sync::atomic::AtomicU8,
    has_offset: std::sync::atomic::AtomicBool,
}

/// How a format's codes become the signed weights of the GEMM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Weights {
    /// 4-bit codes centred on 7.5: `w = 2c − 15`, scale from `int_centered_scale`, no offset.
    Odd,
    /// Unsigned 4-bit or 3-bit codes as they are, the format's affine map.
    Nibble,
    /// Signed codes as they are, the format's affine map.
    Signed,
}

impl Weights {
    fn of(w: &dyn IntCodes, layout: IntLayout) -> Weights {
        match layout.kind {
            CodeKind::Signed => Weights::Signed,
            CodeKind::Nibble if w.int_centered() => Weights::Odd,
            CodeKind::Nibble => Weights::Nibble,
        }
    }
}

/// Row `r` of W as signed weight bytes in `row[..kpad]` (zero past `in`) with its per-unit
/// scale and offset in `scale[..units]`, `offset[..units]` (zero past the row's units).
fn row_weights(
    w: &dyn IntCodes,
    how: Weights,
    unit: usize,
    r: usize,
    row: &mut [u8],
    scale: &mut [f32],
    offset: &mut [f32],
) {
    let i = w.int_dims().1;
    row[i..].fill(0);
    scale.fill(0.0);
    offset.fill(0.0);
    w.int_codes(r, &mut row[..i]);
    let nu = i.div_ceil(unit);
    match how {
        Weights::Odd => {
            for c in &mut row[..i] {
                *c = (2 * *c).wrapping_sub(15);
            }
            w.int_centered_scale(r, &mut scale[..nu]);
        }
        Weights::Nibble | Weights::Signed => {
            w.int_affine(r, &mut scale[..nu], &mut offset[..nu]);
        }
    }
}

/// A thread's scratch while it packs a panel: the rows, and
/// per row and unit the scales and the offsets (always overwritten).
#[derive(Default)]
struct PanelScratch {
    rows: Vec<u8>,
    scale: Vec<f32>,
    offset: Vec<f32>,
}

thread_local! {
    /// This thread's [`PanelScratch`].
    static PANEL: std::cell::Cell<PanelScratch> = std::cell::Cell::new(PanelScratch::default());
    /// The calling thread's packed W of its last GEMM, for its buffers.
    static BUFFERS: std::cell::Cell<Option<PackedW>> = const { std::cell::Cell::new(None) };
}

/// `v` with `n` elements, the old values left in place (the caller overwrites every one).
fn resized<T: Copy + Default>(mut v: Vec<T>, n: usize) -> Vec<T> {
    v.truncate(n);
    v.resize(n, T::default());
    v
}

/// Copies 4 bytes of each of `nr` rows (`row_bytes` apart in `rows`) per step into `codes`
/// (`[step][nr][4]`): on x86-64 four steps of four rows at a time as a 4×4 transpose of
/// 32-bit words (SSE2).
fn interleave(rows: &[u8], nr: usize, row_bytes: usize, codes: &mut [u8]) {
    assert!(
        rows.len() >= nr * row_bytes
            && codes.len() == nr * row_bytes
            && row_bytes % 16 == 0
            && nr % 4 == 0
    );
    let (src, dst) = (rows.as_ptr(), codes.as_mut_ptr());
    for s in (0..row_bytes / 4).step_by(4) {
        for g in (0..nr).step_by(4) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: SSE2 is part of x86-64; rows g..g+4 have bytes 4s..4s+16 (row_bytes a
            // multiple of 16) and steps s..s+4 of codes have lanes g..g+4 (asserted lengths).
            unsafe {
                use std::arch::x86_64::*;
                let ld = |l: usize| {
                    _mm_loadu_si128(src.add((g + l) * row_bytes + 4 * s) as *const __m128i)
                };
                let (a0, a1, a2, a3) = (ld(0), ld(1), ld(2), ld(3));
                let (l01, h01) = (_mm_unpacklo_epi32(a0, a1), _mm_unpackhi_epi32(a0, a1));
                let (l23, h23) = (_mm_unpacklo_epi32(a2, a3), _mm_unpackhi_epi32(a2, a3));
                let t = [
                    _mm_unpacklo_epi64(l01, l23),
                    _mm_unpackhi_epi64(l01, l23),
                    _mm_unpacklo_epi64(h01, h23),
                    _mm_unpackhi_epi64(h01, h23),
                ];
                for (j, v) in t.into_iter().enumerate() {
                    _mm_storeu_si128(dst.add(((s + j) * nr + g) * 4) as *mut __m128i, v);
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            for j in 0..4 {
                for l in 0..4 {
                    // SAFETY: as above.
                    unsafe {
                        let v = (src.add((g + l) * row_bytes + 4 * (s + j)) as *const u32)
                            .read_unaligned();
                        (dst.add(((s + j) * nr + g + l) * 4) as *mut u32).write_unaligned(v);
                    }
                }
            }
        }
    }
}

/// What packing a block needs: the matrix, how its codes become weights, the kernel, and the
/// buffers of the [`PackedW`] being packed (written through these pointers, block by block,
/// while the products read the blocks packed before).
struct Packer<'a> {
    w: &'a dyn IntCodes,
    how: Weights,
    kernel: Kernel,
    /// Rows of W.
    o: usize,
    nr: usize,
    kpad: usize,
    unit: usize,
    units: usize,
    panels: usize,
    codes: *mut u8,
    corr: *mut i32,
    scale: *mut f32,
    /// Null where W has no offsets (Q4's centred codes).
    offset: *mut f32,
    /// The kernel has corrections (else `corr` is null).
    has_corr: bool,
}

// SAFETY: the pointers address the buffers of one `PackedW`, which outlives every task of the
// GEMM; each block is written by the one task that ran its `run_once`, and read
// only once that returned (Release / Acquire), so no byte is accessed by two
// threads at once unless both read it. `w` is `Sync`.
unsafe impl Send for Packer<'_> {}
// SAFETY: as above.
unsafe impl Sync for Packer<'_> {}

impl PackedW {
    /// Sizes `reuse`'s buffers (or new ones) for W (`o` rows) on `kernel`, every block not
    /// packed yet, and returns them with the [`Packer`] that fills them. Nothing is packed
    /// here: [`PackedW::ensure_block`] packs a block the first time it is needed.
    fn prepare<'a>(
        w: &'a dyn IntCodes,
        layout: IntLayout,
        kernel: Kernel,
        reuse: Option<PackedW>,
    ) -> (PackedW, Packer<'a>) {
        let (nr, offset_x) = kernel.shape();
        let (o, i) = w.int_dims();
        let how = Weights::of(w, layout);
        let unit = layout.unit;
        let kpad = i.next_multiple_of(GROUP);
        let units = kpad / unit;
        let panels = o.div_ceil(nr);
        let per_block = N_BLOCK / nr;
        let (codes, corr, scale, offset, blocks) = match reuse {
            Some(p) => (p.codes, p.corr, p.scale, p.offset, p.blocks),
            None => Default::default(),
        };
        let mut blocks = blocks;
        blocks.truncate(0);
        blocks.resize_with(panels.div_ceil(per_block), BlockState::default);
        let mut pw = PackedW {
            nr,
            kpad,
            unit,
            units,
            codes: resized(codes, panels * nr * kpad),
            corr: resized(corr, if offset_x { panels * nr * units } else { 0 }),
            scale: resized(scale, panels * nr * units),
            offset: resized(
                offset,
                if how == Weights::Odd {
                    0
                } else {
                    panels * nr * units
                },
            ),
            per_block,
            blocks,
        };
        // `as_mut_ptr` makes no reference to the buffers: the tasks' reads through `as_ptr`
        // and the packers' writes through these stay valid side by side.
        let packer = Packer {
            w,
            how,
            kernel,
            o,
            nr,
            kpad,
            unit,
            units,
            panels,
            codes: pw.codes.as_mut_ptr(),
            corr: if offset_x {
                pw.corr.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            },
            scale: pw.scale.as_mut_ptr(),
            offset: if how == Weights::Odd {
                std::ptr::null_mut()
            } else {
                pw.offset.as_mut_ptr()
            },
            has_corr: offset_x,
        };
        (pw, packer)
    }

    /// Blocks of panels.
    fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The block holding panel `panel`.
    fn block_of(&self, panel: usize) -> usize {
        panel / self.per_block
    }

    /// Whether panel `panel`'s block has an offset that is not zero (read once the block is
    /// packed).
    pub(super) fn panel_has_offset(&self, panel: usize) -> bool {
        self.blocks[self.block_of(panel)]
            .has_offset
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Packs block `b` with `packer` (made with this `PackedW`) unless it is packed: the
    /// first caller packs it, any other caller meanwhile waits for it (spinning, then
    /// yielding its core). Once this returns, the block's panels may be read.
    fn ensure_block(&self, packer: &Packer, b: usize) {
        let state = &self.blocks[b];
        super::run_once(
            &state.stage,
            "packing a block of the integer GEMM's weights",
            || {
                let panels = b * self.per_block..packer.panels.min((b + 1) * self.per_block);
                // SAFETY: `run_once` runs this in the one task that moved block `b`'s stage on:
                // no other thread reads or writes its panels until it is done.
                let has_offset = panels
                    .map(|p| unsafe { packer.pack_panel(p) })
                    .fold(false, |a, b| a | b);
                // Published by `run_once`'s Release store of the stage.
                state
                    .has_offset
                    .store(has_offset, std::sync::atomic::Ordering::Relaxed);
            },
        );
    }
}

impl Packer<'_> {
    /// Packs panel `p`: its rows' weights interleaved, the per-unit scales, offsets and the
    /// kernel's corrections laid out `[unit][lane]`. Returns whether an offset is not zero.
    ///
    /// # Safety
    /// `p < panels`, and no other thread accesses panel `p`'s parts of the buffers meanwhile.
    unsafe fn pack_panel(&self, p: usize) -> bool {
        let (nr, kpad, units) = (self.nr, self.kpad, self.units);
        let lanes = nr.min(self.o - p * nr);
        // SAFETY: the panel's parts of the buffers, inside them (`prepare` sized them for
        // `panels` panels) and this call's alone (the caller's contract).
        let (codes, scale, offset, corr) = unsafe {
            let part = |len: usize| p * len..(p + 1) * len;
            let meta = part(nr * units);
            (
                std::slice::from_raw_parts_mut(self.codes.add(p * nr * kpad), nr * kpad),
                std::slice::from_raw_parts_mut(self.scale.add(meta.start), meta.len()),
                if self.offset.is_null() {
                    &mut [][..]
                } else {
                    std::slice::from_raw_parts_mut(self.offset.add(meta.start), meta.len())
                },
                if self.has_corr {
                    std::slice::from_raw_parts_mut(self.corr.add(meta.start), meta.len())
                } else {
                    &mut [][..]
                },
            )
        };
        let mut t = PANEL.take();
        t.rows = resized(std::mem::take(&mut t.rows), nr * kpad);
        t.scale = resized(std::mem::take(&mut t.scale), nr * units);
        t.offset = resized(std::mem::take(&mut t.offset), nr * units);
        let rows = &mut t.rows[..];
        for lane in 0..nr {
            let bytes = &mut rows[lane * kpad..(lane + 1) * kpad];
            let at = lane * units..(lane + 1) * units;
            let (sc, of) = (&mut t.scale[at.clone()], &mut t.offset[at]);
            if lane < lanes {
                row_weights(self.w, self.how, self.unit, p * nr + lane, bytes, sc, of);
            } else {
                bytes.fill(0);
                sc.fill(0.0);
                of.fill(0.0);
            }
        }
        interleave(rows, nr, kpad, codes);
        // The per-row unit values to [unit][lane].
        for (u, sc) in scale.chunks_exact_mut(nr).enumerate() {
            for (lane, d) in sc.iter_mut().enumerate() {
                *d = t.scale[lane * units + u];
            }
        }
        for (u, of) in offset.chunks_exact_mut(nr).enumerate() {
            for (lane, d) in of.iter_mut().enumerate() {
                *d = t.offset[lane * units + u];
            }
        }
        // SAFETY: the kernel came from a supported tier; `codes` is one panel packed for it,
        // `corr` that panel's [unit][lane] corrections (or empty where the kernel has none).
        unsafe { self.kernel.panel_corr(codes, self.unit, corr) };
        let has_offset = offset.iter().any(|&v| v != 0.0);
        PANEL.set(t);
        has_offset
    }
}

/// x as one kernel reads it.
pub(super) struct XPrep<'a> {
    /// Bytes per row.
    pub(super) row_bytes: usize,
    /// `[m, row_bytes]`: per element `xq + 128` (u8) for kernels with [`Lanes::OFFSET_X`],
    /// else `xq` (i8); zero rows after the batch where the kernel asks for them.
    pub(super) bytes: &'a [u8],
    /// `[m, kpad / 128]` group scales.
    sx: &'a [f32],
    /// `[m, units]` unit sums `Q_u` (read where W has offsets).
    qsum: &'a [i32],
}

impl XPrep<'_> {
    /// Vector `b`'s first byte.
    pub(super) fn row(&self, b: usize) -> *const u8 {
        self.bytes[b * self.row_bytes..].as_ptr()
    }
}

/// One kernel's vector operations for the micro-kernel: a vector holds one value per row of a
/// panel.
pub(super) trait Lanes {
    /// Rows of W per panel (lanes per vector).
    const NR: usize;
    /// Vectors of x per micro-kernel.
    const MR: usize;
    /// x is read as `xq + 128` (unsigned) and each unit's sums start at the correction
    /// `−128 · Σ w`; else x is `xq` and sums start at zero.
    const OFFSET_X: bool;
    /// `NR` i32 lanes.
    type I: Copy;
    /// `NR` f32 lanes.
    type F: Copy;
    /// `init + Σ_k x[r]_k · w_k` over one unit of `UNIT` columns (`UNIT / 4` steps of 4
    /// bytes) for `R <= MR` vectors.
    ///
    /// # Safety
    /// The kernel's CPU features; `x[r]` has `UNIT` bytes, `w` `NR · UNIT`.
    unsafe fn unit_sums<const R: usize, const UNIT: usize>(
        x: [*const u8; R],
        w: *const u8,
        init: Self::I,
    ) -> [Self::I; R];
    /// Loads `NR` i32.
    ///
    /// # Safety
    /// `p` has `NR` values.
    unsafe fn load_i(p: *const i32) -> Self::I;
    /// Stores `NR` i32.
    ///
    /// # Safety
    /// `p` has room for `NR` values.
    unsafe fn store_i(v: Self::I, p: *mut i32);
    /// Zero lanes.
    ///
    /// # Safety
    /// The kernel's CPU features.
    unsafe fn zero_i() -> Self::I;
    /// Loads `NR` f32.
    ///
    /// # Safety
    /// `p` has `NR` values.
    unsafe fn load_f(p: *const f32) -> Self::F;
    /// `v` in every lane.
    ///
    /// # Safety
    /// The kernel's CPU features.
    unsafe fn splat(v: f32) -> Self::F;
    /// Lanes converted to f32 (exact: every sum is below `2^24` in magnitude).
    ///
    /// # Safety
    /// The kernel's CPU features.
    unsafe fn to_f32(i: Self::I) -> Self::F;
    /// `a · b + c` with one rounding.
    ///
    /// # Safety
    /// The kernel's CPU features.
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// Stores `NR` f32.
    ///
    /// # Safety
    /// `p` has room for `NR` values.
    unsafe fn store(v: Self::F, p: *mut f32);
}

/// Where [`fold`] takes each unit's integer sums from.
pub(super) trait UnitSource<L: Lanes, const R: usize> {
    /// `I_u` of unit `u` (counted from the row's first column) for the `R` vectors, `NR`
    /// lanes each, plus the kernel's start value (the correction `−128 · Σ w` for kernels with
    /// [`Lanes::OFFSET_X`]).
    ///
    /// # Safety
    /// `u` is a unit of the panel and vectors the source was made for, and the kernel's CPU
    /// features are there.
    unsafe fn unit_sums(&self, u: usize) -> [L::I; R];
}

/// The micro-kernel's own source: `L::unit_sums` over the packed panel and x.
#[derive(Clone, Copy)]
struct Computed<const R: usize, const UNIT: usize> {
    /// The panel's first byte.
    wbase: *const u8,
    /// Each vector's first byte.
    xrow: [*const u8; R],
    /// The panel's `[unit][lane]` corrections (for kernels with [`Lanes::OFFSET_X`]).
    corr: *const i32,
}

impl<L: Lanes, const R: usize, const UNIT: usize> UnitSource<L, R> for Computed<R, UNIT> {
    #[inline(always)]
    unsafe fn unit_sums(&self, u: usize) -> [L::I; R] {
        // SAFETY: the caller's contract; `wbase`, `xrow` and `corr` were made from the same
        // `PackedW` and `XPrep` ([`tile`]), and unit `u` lies inside them.
        unsafe {
            let init = if L::OFFSET_X {
                L::load_i(self.corr.add(u * L::NR))
            } else {
                L::zero_i()
            };
            let at = u * UNIT;
            let x: [*const u8; R] = std::array::from_fn(|r| self.xrow[r].add(at));
            L::unit_sums::<R, UNIT>(x, self.wbase.add(at * L::NR), init)
        }
    }
}

/// The f32 fold of the integer sums (the sequence of the [module docs](self), the same on
/// every tier): `R` vectors of x (from `b0`) by panel `panel`, units of `UNIT`, over the
/// 128-column groups `groups`, the sums from `src`. Starts from `y = 0`, or with `resume` from
/// the values in `out` (a fold over earlier groups left them there: the same bits as one fold
/// over all groups); writes `y` to `out[r · NR + lane]`.
///
/// # Safety
/// The kernel's CPU features; `b0 + R` vectors in `xp`, `panel` and `groups` inside `pw`
/// packed for `L` (`pw.nr == L::NR`, `pw.unit == UNIT`), `src` valid for every unit of
/// `groups`, `out` has `R · NR` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn fold<L: Lanes, S: UnitSource<L, R>, const R: usize, const UNIT: usize>(
    pw: &PackedW,
    xp: &XPrep,
    b0: usize,
    panel: usize,
    groups: std::ops::Range<usize>,
    resume: bool,
    out: *mut f32,
    src: S,
) {
    let nr = L::NR;
    debug_assert!(pw.nr == nr && pw.unit == UNIT);
    let per_group = GROUP / UNIT;
    let all_groups = pw.kpad / GROUP;
    let meta = panel * pw.units * nr;
    let has_offset = pw.panel_has_offset(panel);
    // SAFETY: every pointer below stays inside its buffer by the layouts of `PackedW` and
    // `XPrep` and the caller's contract (the whole body).
    unsafe {
        let mut y = [L::splat(0.0); R];
        if resume {
            for (r, v) in y.iter_mut().enumerate() {
                *v = L::load_f(out.add(r * nr));
            }
        }
        for g in groups {
            let mut acc = [L::splat(0.0); R];
            for u in g * per_group..(g + 1) * per_group {
                let sums = src.unit_sums(u);
                let sc = L::load_f(pw.scale.as_ptr().add(meta + u * nr));
                for r in 0..R {
                    acc[r] = L::fma(L::to_f32(sums[r]), sc, acc[r]);
                }
                if has_offset {
                    let of = L::load_f(pw.offset.as_ptr().add(meta + u * nr));
                    for r in 0..R {
                        // |Q_u| <= 127 · 128 < 2^24: exact in f32.
                        let q = *xp.qsum.get_unchecked((b0 + r) * pw.units + u) as f32;
                        acc[r] = L::fma(of, L::splat(q), acc[r]);
                    }
                }
            }
            for r in 0..R {
                let s = *xp.sx.get_unchecked((b0 + r) * all_groups + g);
                y[r] = L::fma(acc[r], L::splat(s), y[r]);
            }
        }
        for r in 0..R {
            L::store(y[r], out.add(r * nr));
        }
    }
}

/// `R` vectors of x (from `b0`) by panel `panel`, over every column, units of `UNIT`: writes
/// the outputs to `out[r · NR + lane]` ([`fold`] of the kernel's own unit sums).
///
/// # Safety
/// The kernel's CPU features; `b0 + R` vectors in `xp`, `panel` inside `pw` packed for `L`
/// (`pw.nr == L::NR`, `pw.unit == UNIT`), `out` has `R · NR` values.
#[inline(always)]
unsafe fn tile<L: Lanes, const R: usize, const UNIT: usize>(
    pw: &PackedW,
    xp: &XPrep,
    b0: usize,
    panel: usize,
    out: *mut f32,
) {
    let meta = panel * pw.units * L::NR;
    let src = Computed::<R, UNIT> {
        // SAFETY: the panel lies inside `pw.codes` (caller).
        wbase: unsafe { pw.codes.as_ptr().add(panel * pw.kpad * L::NR) },
        xrow: std::array::from_fn(|r| xp.row(b0 + r)),
        corr: pw.corr.as_ptr().wrapping_add(meta),
    };
    // SAFETY: the caller's contract; `src` covers every unit of the panel.
    unsafe { fold::<L, _, R, UNIT>(pw, xp, b0, panel, 0..pw.kpad / GROUP, false, out, src) }
}

/// [`tile`] for `nb` (1..=8) vectors and the unit of `pw`.
///
/// # Safety
/// As [`tile`].
#[inline(always)]
unsafe fn tile_any<L: Lanes>(
    nb: usize,
    pw: &PackedW,
    xp: &XPrep,
    b0: usize,
    panel: usize,
    out: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe { for_rows_and_unit!(nb, pw.unit, L::MR, tile::<L>(pw, xp, b0, panel, out)) }
}

/// The outputs of vectors `rows` by the panels `panels`, written (or added) into `y`.
///
/// # Safety
/// The kernel's CPU features; `pw` packed for `L`; `rows` inside the batch, `panels` inside
/// `pw`; the caller owns the rectangle `rows × (panels · NR ∩ 0..o)` of `y` (`[m, o]`).
#[inline(always)]
pub(super) unsafe fn block<L: Lanes>(
    pw: &PackedW,
    xp: &XPrep,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    y: YPtr,
    o: usize,
    accumulate: bool,
) {
    let nr = L::NR;
    let mut t = [0.0f32; MAX_TILE];
    for p in panels {
        let cols = nr.min(o - p * nr);
        let mut b0 = rows.start;
        while b0 < rows.end {
            let nb = L::MR.min(rows.end - b0);
            // SAFETY: the caller's contract; `t` holds MR · NR <= MAX_TILE values.
            unsafe { tile_any::<L>(nb, pw, xp, b0, p, t.as_mut_ptr()) };
            for r in 0..nb {
                let run = &t[r * nr..r * nr + cols];
                // SAFETY: (b0 + r, p · nr .. p · nr + cols) lies in the caller's rectangle of y.
                unsafe { y.store_run((b0 + r) * o + p * nr, run, accumulate) };
            }
            b0 += nb;
        }
    }
}

/// `corr[u · NR + lane] = −128 · Σ_{k∈u} w` for one panel `codes` packed for `L`, by the
/// kernel's own unit sums against x = 1.
///
/// # Safety
/// The kernel's CPU features; `codes` is one whole panel for `L` of units of `unit` (16, 64 or
/// 128) and `corr` has `NR` values per unit of it.
#[inline(always)]
pub(super) unsafe fn panel_corr<L: Lanes>(codes: &[u8], unit: usize, corr: &mut [i32]) {
    let ones = [1u8; GROUP];
    let mut sums = [0i32; 16];
    let step = unit * L::NR;
    for (c, w) in corr.chunks_exact_mut(L::NR).zip(codes.chunks_exact(step)) {
        let x = [ones.as_ptr()];
        // SAFETY: the caller's contract: `w` is one unit of the panel, `ones` covers
        // `unit` bytes, `sums` holds NR <= 16 values.
        unsafe {
            let s = match unit {
                16 => L::unit_sums::<1, 16>(x, w.as_ptr(), L::zero_i()),
                64 => L::unit_sums::<1, 64>(x, w.as_ptr(), L::zero_i()),
                _ => L::unit_sums::<1, 128>(x, w.as_ptr(), L::zero_i()),
            };
            L::store_i(s[0], sums.as_mut_ptr());
        }
        for (d, &v) in c.iter_mut().zip(&sums) {
            *d = -128 * v;
        }
    }
}

/// The scalar kernel's lanes: plain arrays of `N` (8 for the scalar tier, 16 for the f32 fold
/// of the emulated AMX tier, whose panels have 16 rows).
pub(super) struct Scalar<const N: usize>;

impl<const N: usize> Lanes for Scalar<N> {
    const NR: usize = N;
    const MR: usize = 4;
    const OFFSET_X: bool = false;
    type I = [i32; N];
    type F = [f32; N];

    #[inline(always)]
    unsafe fn unit_sums<const R: usize, const UNIT: usize>(
        x: [*const u8; R],
        w: *const u8,
        init: [i32; N],
    ) -> [[i32; N]; R] {
        let mut acc = [init; R];
        for s in 0..UNIT / 4 {
            for r in 0..R {
                for l in 0..N {
                    for j in 0..4 {
                        // SAFETY: the trait's contract.
                        let (xv, wv) =
                            unsafe { (*x[r].add(4 * s + j), *w.add((s * N + l) * 4 + j)) };
                        acc[r][l] += i32::from(xv as i8) * i32::from(wv as i8);
                    }
                }
            }
        }
        acc
    }
    #[inline(always)]
    unsafe fn load_i(p: *const i32) -> [i32; N] {
        // SAFETY: the trait's contract.
        unsafe { std::ptr::read_unaligned(p as *const [i32; N]) }
    }
    #[inline(always)]
    unsafe fn store_i(v: [i32; N], p: *mut i32) {
        // SAFETY: the trait's contract.
        unsafe { std::ptr::write_unaligned(p as *mut [i32; N], v) }
    }
    #[inline(always)]
    unsafe fn zero_i() -> [i32; N] {
        [0; N]
    }
    #[inline(always)]
    unsafe fn load_f(p: *const f32) -> [f32; N] {
        // SAFETY: the trait's contract.
        unsafe { std::ptr::read_unaligned(p as *const [f32; N]) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> [f32; N] {
        [v; N]
    }
    #[inline(always)]
    unsafe fn to_f32(i: [i32; N]) -> [f32; N] {
        i.map(|v| v as f32)
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; N], b: [f32; N], c: [f32; N]) -> [f32; N] {
        std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
    }
    #[inline(always)]
    unsafe fn store(v: [f32; N], p: *mut f32) {
        // SAFETY: the trait's contract.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; N], v) }
    }
}

/// Which kernel a tier and a format run.
#[derive(Clone, Copy)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2Narrow,
    #[cfg(target_arch = "x86_64")]
    Avx2Wide,
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// [`super::avx2::Narrow`] lanes on AVX-VNNI's `vpdpbusd`, every code kind.
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// [`Kernel::AvxVnni`] with the instruction emulated by AVX2.
    #[cfg(target_arch = "x86_64")]
    AvxVnniEmulated,
    /// AMX tiles, the fold on [`super::avx512vnni::Vnni`] lanes ([`super::amx`]).
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// The AMX driver on the scalar tile emulator, the fold on [`Scalar`] lanes of 16.
    AmxEmulated,
}

impl Kernel {
    /// The kernel of `tier` (already [`IntTier::supported`]) for codes of `layout`.
    fn for_tier(tier: IntTier, layout: IntLayout) -> Kernel {
        match tier {
            #[cfg(target_arch = "x86_64")]
            IntTier::Avx512Vnni => Kernel::Vnni,
            #[cfg(target_arch = "x86_64")]
            IntTier::AvxVnni => Kernel::AvxVnni,
            #[cfg(target_arch = "x86_64")]
            IntTier::AvxVnniEmulated => Kernel::AvxVnniEmulated,
            #[cfg(target_arch = "x86_64")]
            IntTier::Amx => Kernel::Amx,
            IntTier::AmxEmulated => Kernel::AmxEmulated,
            #[cfg(target_arch = "x86_64")]
            IntTier::Avx2 if layout.kind == CodeKind::Nibble => Kernel::Avx2Narrow,
            #[cfg(target_arch = "x86_64")]
            IntTier::Avx2 => Kernel::Avx2Wide,
            _ => Kernel::Scalar,
        }
    }

    /// The layout of x this kernel reads.
    fn x_layout(self) -> super::XLayout {
        super::XLayout {
            flip: if self.shape().1 { 0x80 } else { 0 },
            rows_multiple: self.x_rows_multiple(),
        }
    }

    /// `(NR, OFFSET_X)` of the kernel's lanes.
    fn shape(self) -> (usize, bool) {
        fn of<L: Lanes>() -> (usize, bool) {
            (L::NR, L::OFFSET_X)
        }
        match self {
            Kernel::Scalar => of::<Scalar<8>>(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Narrow => of::<super::avx2::Narrow>(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Wide => of::<super::avx2::Wide>(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => of::<super::avx512vnni::Vnni>(),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => of::<super::avx2::Narrow<super::avxvnni::Dpbusd>>(),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnniEmulated => of::<super::avx2::Narrow<super::avxvnni::DpbusdEmulated>>(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => (super::amx::PANEL_ROWS, false),
            Kernel::AmxEmulated => (super::amx::PANEL_ROWS, false),
        }
    }

    /// Rows of x the kernel may read past the batch, in multiples of which the prepared x is
    /// padded with zero rows (AMX loads x 16 vectors at a time).
    fn x_rows_multiple(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => super::amx::TILE_ROWS,
            Kernel::AmxEmulated => super::amx::TILE_ROWS,
            _ => 1,
        }
    }

    /// Runs [`panel_corr`] for this kernel (nothing for kernels without
    /// [`Lanes::OFFSET_X`]: their `corr` is empty).
    ///
    /// # Safety
    /// As [`panel_corr`], with the kernel's features on this CPU.
    unsafe fn panel_corr(self, codes: &[u8], unit: usize, corr: &mut [i32]) {
        // SAFETY: the caller's contract.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2Narrow => super::avx2::gemm_corr_narrow(codes, unit, corr),
                #[cfg(target_arch = "x86_64")]
                Kernel::Vnni => super::avx512vnni::gemm_corr(codes, unit, corr),
                #[cfg(target_arch = "x86_64")]
                Kernel::AvxVnni => super::avxvnni::hw::gemm_corr(codes, unit, corr),
                #[cfg(target_arch = "x86_64")]
                Kernel::AvxVnniEmulated => super::avxvnni::emulated::gemm_corr(codes, unit, corr),
                _ => debug_assert!(corr.is_empty()),
            }
        }
    }

    /// Runs [`block`] for this kernel.
    ///
    /// # Safety
    /// As [`block`], with the kernel's features on this CPU.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        self,
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
            match self {
                Kernel::Scalar => block::<Scalar<8>>(pw, xp, rows, panels, y, o, accumulate),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2Narrow => {
                    super::avx2::gemm_block_narrow(pw, xp, rows, panels, y, o, accumulate)
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2Wide => {
                    super::avx2::gemm_block_wide(pw, xp, rows, panels, y, o, accumulate)
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::Vnni => {
                    super::avx512vnni::gemm_block(pw, xp, rows, panels, y, o, accumulate)
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::AvxVnni => {
                    super::avxvnni::hw::gemm_block(pw, xp, rows, panels, y, o, accumulate)
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::AvxVnniEmulated => {
                    super::avxvnni::emulated::gemm_block(pw, xp, rows, panels, y, o, accumulate)
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::Amx => super::amx::gemm_block(pw, xp, rows, panels, y, o, accumulate),
                Kernel::AmxEmulated => {
                    super::amx::gemm_block_emulated(pw, xp, rows, panels, y, o, accumulate)
                }
            }
        }
    }
}

/// `y (+)= x · Wᵀ` for the batch `x` (`m` vectors, `[m, in]`) on `tier` (already
/// [`IntTier::supported`]); `y` points at `[m, o]` outputs (with the bias its stores add, if
/// any; the caller checked the lengths). x is quantized into `q` (its storage reused) in
/// the layout the kernel reads, then the products pack W block by block as they first need
/// it (on the pool where `parallel`). Returns `false`, with `y` untouched, when x holds a NaN
/// or an infinity.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    tier: IntTier,
    w: &dyn IntCodes,
    layout: IntLayout,
    x: &[f32],
    m: usize,
    parallel: bool,
    y: YPtr,
    accumulate: bool,
    q: &mut QuantizedX,
    tail: Option<(&super::LowRankTail<'_>, PostOp)>,
) -> bool {
    if !quantize_for(tier, layout, x, m, w.int_dims().1, parallel, q) {
        return false;
    }
    let f32_tail = tail.map(|(tail, post)| {
        move |y: YPtr, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
            // SAFETY: the task's rectangle of y (rows x cols), its alone (`TaskTail`).
            unsafe { tail.apply(y.at(0), rows, cols, post) }
        }
    });
    let tail = f32_tail.as_ref().map(|t| t as &TaskTail);
    run_quantized(tier, w, layout, q, m, parallel, y, accumulate, tail);
    true
}

/// Quantizes x (`m` vectors of `inn` values) into `q` in the layout that the kernel of `tier`
/// for `layout` reads; `false` where x holds a NaN or an infinity.
pub(super) fn quantize_for(
    tier: IntTier,
    layout: IntLayout,
    x: &[f32],
    m: usize,
    inn: usize,
    parallel: bool,
    q: &mut QuantizedX,
) -> bool {
    let kernel = Kernel::for_tier(tier, layout);
    super::quantize_x_into(x, m, inn, layout.unit, parallel, q, kernel.x_layout())
}

/// Whether the kernels of `tier` for layouts `a` and `b` read x's bytes in the same layout
/// (so one quantized x, made by [`quantize_for`] for either, serves both where W has no
/// offsets: its unit sums `Q_u`, which depend on the unit, are read only for offsets).
pub(super) fn same_x_bytes(tier: IntTier, a: IntLayout, b: IntLayout) -> bool {
    Kernel::for_tier(tier, a).x_layout() == Kernel::for_tier(tier, b).x_layout()
}

/// The products of [`run`] on an x that [`quantize_for`] quantized into `q` for `tier` and
/// `layout`, W packed into the calling thread's storage of its last GEMM ([`BUFFERS`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn run_quantized(
    tier: IntTier,
    w: &dyn IntCodes,
    layout: IntLayout,
    q: &QuantizedX,
    m: usize,
    parallel: bool,
    y: YPtr,
    accumulate: bool,
    tail: Option<&TaskTail>,
) {
    let p = Prepared::new(tier, w, layout, BUFFERS.take());
    let o = p.packer.o;
    products(
        p.kernel, &p.pw, &p.packer, q, m, o, parallel, y, accumulate, tail,
    );
    BUFFERS.set(Some(p.into_buffers()));
}

/// W prepared for the products of one call on a kernel: its panels (packed as the products
/// first need them, or all at once by [`Prepared::pack_all`] beforehand, say beside x's
/// quantization).
pub(super) struct Prepared<'a> {
    kernel: Kernel,
    pw: PackedW,
    packer: Packer<'a>,
}

impl<'a> Prepared<'a> {
    /// W (units of `layout`) on the kernel of `tier`, its panels to be packed into `buffers`'
    /// storage (or new storage).
    pub(super) fn new(
        tier: IntTier,
        w: &'a dyn IntCodes,
        layout: IntLayout,
        buffers: Option<PackedW>,
    ) -> Prepared<'a> {
        let kernel = Kernel::for_tier(tier, layout);
        let (pw, packer) = PackedW::prepare(w, layout, kernel, buffers);
        Prepared { kernel, pw, packer }
    }

    /// Packs every block now, on the calling thread.
    pub(super) fn pack_all(&self) {
        for b in 0..self.pw.block_count() {
            self.pw.ensure_block(&self.packer, b);
        }
    }

    /// The outputs of vectors `rows` of `q` (quantized for this kernel) by every row of W,
    /// written into `y` (`[m, out]`) on the calling thread, W's blocks packed first where
    /// they are not: the bits the products give those rows.
    ///
    /// # Safety
    /// `rows` lie inside `q`'s batch and `y`'s rows, which the caller alone writes or reads
    /// while this runs.
    pub(super) unsafe fn rows_into(&self, q: &QuantizedX, rows: std::ops::Range<usize>, y: YPtr) {
        self.pack_all();
        let xp = prepare_x(q);
        let o = self.packer.o;
        let panels = 0..o.div_ceil(self.pw.nr);
        // SAFETY: the kernel came from a supported tier and every block of `pw` is packed for
        // it (`pack_all`); the rows and y's rectangle are the caller's.
        unsafe { self.kernel.block(&self.pw, &xp, rows, panels, y, o, false) }
    }

    /// The panels' storage, for the next call.
    pub(super) fn into_buffers(self) -> PackedW {
        self.pw
    }
}

/// What a task of the GEMM does to its rectangle of y (rows x columns, starting on a
/// multiple of [`N_BLOCK`]) once it has stored it: a LoRA adapter's `h · Bᵀ` and the step
/// after the layer. It writes that rectangle only (which belongs to the task alone).
pub(super) type TaskTail<'a> =
    dyn Fn(YPtr, std::ops::Range<usize>, std::ops::Range<usize>) + Sync + 'a;

/// The products of the GEMM on `kernel`: `y (+)= x · Wᵀ` from the quantized x and W as
/// `packer` packs it into `pw` (each block by the first task that needs it), in tasks of
/// [`M_BLOCK`] vectors by [`N_BLOCK`] rows of W (in parallel where `parallel`). The tasks run
/// column by column, so that a thread's run of tasks mostly shares one block of W, which it
/// packs and keeps in its cache; each column's blocks of rows in a rotated order.
#[allow(clippy::too_many_arguments)]
fn products(
    kernel: Kernel,
    pw: &PackedW,
    packer: &Packer,
    q: &QuantizedX,
    m: usize,
    o: usize,
    parallel: bool,
    yp: YPtr,
    accumulate: bool,
    tail: Option<&TaskTail>,
) {
    let xp = prepare_x(q);
    let (mt, nt) = (m.div_ceil(M_BLOCK), o.div_ceil(N_BLOCK));
    let per_block = N_BLOCK / pw.nr;
    let panels = o.div_ceil(pw.nr);
    let task = |t: usize| {
        // Each column's run of tasks starts at another block of rows (rotated by the
        // column): the pool's threads take runs of consecutive tasks, so each starts on its
        // own rows, and work that a block of rows shares across the columns (a LoRA tail's
        // rows of h, computed by the first task that needs them) is spread over the threads
        // instead of being waited for by all of them at once.
        let (bn, bm) = (t / mt, (t % mt + t / mt) % mt);
        let rows = bm * M_BLOCK..m.min((bm + 1) * M_BLOCK);
        let ps = bn * per_block..panels.min((bn + 1) * per_block);
        pw.ensure_block(packer, bn);
        // SAFETY: the kernel came from a supported tier and `packer` packed `pw`'s panels
        // `ps` for it (`ensure_block`); rows and panels lie inside the batch and `pw`; tasks
        // own disjoint rectangles of y, joined before `products` returns.
        unsafe { kernel.block(pw, &xp, rows.clone(), ps.clone(), yp, o, accumulate) };
        if let Some(tail) = tail {
            tail(yp, rows, ps.start * pw.nr..o.min(ps.end * pw.nr));
        }
    };
    if parallel {
        (0..mt * nt).into_par_iter().for_each(task);
    } else {
        (0..mt * nt).for_each(task);
    }
}

/// Where the GEMM's time goes: [`super::forward`]'s integer GEMM for `m` vectors (at least
/// [`GEMM_MIN_M`]) on `tier` as it routes it, in three phases (x's quantization, W's packing,
/// the products), each on the whole pool; in the GEMM the products pack W as they go, so the
/// last two are one pass there. Returns the three times in ms, or `None` where `forward` would decline
/// (shapes, no integer layout, a non-finite x), with `y` then untouched. For benchmarks.
pub fn phases(
    tier: IntTier,
    w: &dyn IntCodes,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) -> Option<[f64; 3]> {
    let (o, i) = w.int_dims();
    let layout = w.int_layout()?;
    let unit_ok = matches!(layout.unit, 16 | 64 | 128);
    if !unit_ok || m < GEMM_MIN_M || i == 0 || !holds(x.len(), m, i) || !holds(y.len(), m, o) {
        return None;
    }
    let kernel = Kernel::for_tier(super::gemm_tier(tier, layout.unit), layout);
    let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
    let mut q = super::QUANTIZED.take();
    let t = std::time::Instant::now();
    let finite = super::quantize_x_into(x, m, i, layout.unit, true, &mut q, kernel.x_layout());
    let quantize = ms(t);
    let t = std::time::Instant::now();
    let (pw, packer) = PackedW::prepare(w, layout, kernel, BUFFERS.take());
    (0..pw.block_count())
        .into_par_iter()
        .for_each(|b| pw.ensure_block(&packer, b));
    let packing = ms(t);
    let t = std::time::Instant::now();
    if finite {
        products(
            kernel,
            &pw,
            &packer,
            &q,
            m,
            o,
            true,
            YPtr::new(y, None, o),
            false,
            None,
        );
    }
    let product = ms(t);
    BUFFERS.set(Some(pw));
    super::QUANTIZED.set(q);
    finite.then_some([quantize, packing, product])
}

/// x for a kernel from `q`, quantized in the kernel's layout ([`super::XLayout`]): its bytes,
/// group scales and unit sums, borrowed.
fn prepare_x(q: &QuantizedX) -> XPrep<'_> {
    XPrep {
        row_bytes: q.kpad,
        bytes: bytemuck::cast_slice(&q.xq),
        sx: &q.sx,
        qsum: &q.qsum,
    }
}

/// The scalar reference of the GEMM's outputs, loop by loop as the [module docs](self) state
/// them (no packing): `y = x · Wᵀ` (`x` `[m, in]`, `y` `[m, out]`) with int8 activations.
/// Returns `false`, with `y` untouched, where [`super::forward`] would (shapes, no integer
/// layout, `in == 0`, a non-finite x).
pub fn gemm_ref(w: &dyn IntCodes, x: &[f32], m: usize, y: &mut [f32]) -> bool {
    let (o, i) = w.int_dims();
    let Some(layout) = w.int_layout() else {
        return false;
    };
    if i == 0
        || !holds(x.len(), m, i)
        || !holds(y.len(), m, o)
        || !nibble_tensor::ops::all_finite(x)
    {
        return false;
    }
    let unit = layout.unit;
    let Ok(q) = super::quantize_x(x, m, i, unit) else {
        return false;
    };
    let (kpad, units, groups) = (q.kpad, q.kpad / unit, q.kpad / GROUP);
    let how = Weights::of(w, layout);
    let mut rows = vec![0u8; o * kpad];
    let (mut scale, mut offset) = (vec![0.0f32; o * units], vec![0.0f32; o * units]);
    for r in 0..o {
        row_weights(
            w,
            how,
            unit,
            r,
            &mut rows[r * kpad..(r + 1) * kpad],
            &mut scale[r * units..(r + 1) * units],
            &mut offset[r * units..(r + 1) * units],
        );
    }
    let has_offset = offset.iter().any(|&v| v != 0.0);
    for b in 0..m {
        for r in 0..o {
            let mut acc_y = 0.0f32;
            for g in 0..groups {
                let mut acc_g = 0.0f32;
                for u in g * GROUP / unit..(g + 1) * GROUP / unit {
                    let ks = u * unit..(u + 1) * unit;
                    let isum: i32 = q.xq[b * kpad..][ks.clone()]
                        .iter()
                        .zip(&rows[r * kpad..][ks])
                        .map(|(&xv, &wv)| i32::from(xv) * i32::from(wv as i8))
                        .sum();
                    acc_g = (isum as f32).mul_add(scale[r * units + u], acc_g);
                    if has_offset {
                        let qu = q.qsum[b * units + u] as f32;
                        acc_g = offset[r * units + u].mul_add(qu, acc_g);
                    }
                }
                acc_y = acc_g.mul_add(q.sx[b * groups + g], acc_y);
            }
            y[b * o + r] = acc_y;
        }
    }
    true
}
