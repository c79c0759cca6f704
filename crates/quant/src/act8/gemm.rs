//! The integer GEMM of int8 activations for batches of [`GEMM_MIN_M`] vectors and more.
//!
//! # Layout
//! W is packed once per call into *panels* of `NR` rows (8 on the AVX2 and scalar tiers, 16 on
//! AVX-512 VNNI): for each 4 consecutive columns (a *step*) the panel holds `NR × 4` bytes, row
//! after row, which is the operand layout of `vpdpbusd` / `vpmaddubsw` with the rows of W in
//! the output lanes (and, at 16 rows, the `B` tile layout of AMX `tdpbusd`). The weights are
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
//! - AVX2, 8-bit codes: `vpmaddubsw` of `|w|` (0..=128) by `sign(xq, w)`
//!   (pairs at most `2 · 128 · 127 < 2^15`), `vpmaddwd` by ones, lanes starting at 0;
//! - AVX-512 VNNI: `vpdpbusd` of `xq + 128` by `w` into lanes starting at `−128 · Σ w`.
//!
//! # Work split
//! Packing runs over panels in parallel; the product over rectangles of [`M_BLOCK`] vectors by
//! [`N_BLOCK`] rows of W, each computing its outputs over the whole of `in` (K is never split),
//! so the bits do not depend on the thread count.

use rayon::prelude::*;

use super::{CodeKind, IntCodes, IntLayout, IntTier, QuantizedX, YPtr, GROUP};

/// Batches from this size on run the integer GEMM ([`super::forward`]).
pub const GEMM_MIN_M: usize = 16;
/// Vectors of x per task.
pub const M_BLOCK: usize = 64;
/// Rows of W per task (a multiple of every tier's panel width).
pub const N_BLOCK: usize = 64;

/// Largest `MR · NR` of any tier (the micro-kernel's output buffer).
const MAX_TILE: usize = 8 * 16;

/// W packed into panels for one tier (see the [module docs](self)).
pub(super) struct PackedW {
    /// Rows per panel.
    nr: usize,
    /// Padded columns (a multiple of 128).
    kpad: usize,
    /// Columns per unit.
    unit: usize,
    /// Units per row (`kpad / unit`).
    units: usize,
    /// Signed weight bytes, `[panel][kpad / 4][nr][4]`.
    codes: Vec<u8>,
    /// `−128 · Σ_{k∈u} w_k`, `[panel][unit][nr]`.
    corr: Vec<i32>,
    /// Per-unit scale, `[panel][unit][nr]`.
    scale: Vec<f32>,
    /// Per-unit offset, `[panel][unit][nr]`; empty when every offset is zero.
    offset: Vec<f32>,
    /// Every `|w| <= 15` (4-bit and 3-bit codes).
    narrow: bool,
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

/// Row `r` of W as signed weights in `row[..kpad]` (zero past `in`) with its per-unit scale
/// and offset in `scale[..units]`, `offset[..units]` (zero past the row's units).
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
    row.fill(0);
    scale.fill(0.0);
    offset.fill(0.0);
    w.int_codes(r, &mut row[..i]);
    let nu = i.div_ceil(unit);
    match how {
        Weights::Odd => {
            for c in &mut row[..i] {
                *c = (2 * i16::from(*c) - 15) as i8 as u8;
            }
            w.int_centered_scale(r, &mut scale[..nu]);
        }
        Weights::Nibble | Weights::Signed => {
            w.int_affine(r, &mut scale[..nu], &mut offset[..nu]);
        }
    }
}

/// Packs W (`o` rows) into panels of `nr` rows (rows past `o` zero), panels in parallel.
fn pack(w: &dyn IntCodes, layout: IntLayout, nr: usize, parallel: bool) -> PackedW {
    let (o, i) = w.int_dims();
    let how = Weights::of(w, layout);
    let unit = layout.unit;
    let kpad = i.next_multiple_of(GROUP);
    let units = kpad / unit;
    let panels = o.div_ceil(nr);
    let mut pw = PackedW {
        nr,
        kpad,
        unit,
        units,
        codes: vec![0; panels * nr * kpad],
        corr: vec![0; panels * nr * units],
        scale: vec![0.0; panels * nr * units],
        offset: vec![0.0; panels * nr * units],
        narrow: how != Weights::Signed,
    };
    type Parts<'a> = (
        usize,
        (
            ((&'a mut [u8], &'a mut [i32]), &'a mut [f32]),
            &'a mut [f32],
        ),
    );
    let one = |(p, (((codes, corr), scale), offset)): Parts| {
        let mut row = vec![0u8; kpad];
        let (mut sc, mut of) = (vec![0.0f32; units], vec![0.0f32; units]);
        for lane in 0..nr.min(o - p * nr) {
            row_weights(w, how, unit, p * nr + lane, &mut row, &mut sc, &mut of);
            for u in 0..units {
                let sum: i32 = row[u * unit..(u + 1) * unit]
                    .iter()
                    .map(|&b| i32::from(b as i8))
                    .sum();
                corr[u * nr + lane] = -128 * sum;
                scale[u * nr + lane] = sc[u];
                offset[u * nr + lane] = of[u];
            }
            for (s, quad) in row.chunks_exact(4).enumerate() {
                let at = (s * nr + lane) * 4;
                codes[at..at + 4].copy_from_slice(quad);
            }
        }
    };
    let parts: Vec<Parts> = pw
        .codes
        .chunks_mut(nr * kpad)
        .zip(pw.corr.chunks_mut(nr * units))
        .zip(pw.scale.chunks_mut(nr * units))
        .zip(pw.offset.chunks_mut(nr * units))
        .enumerate()
        .collect();
    if parallel {
        parts.into_par_iter().for_each(one);
    } else {
        parts.into_iter().for_each(one);
    }
    if pw.offset.iter().all(|&v| v == 0.0) {
        pw.offset = Vec::new();
    }
    pw
}

/// x as one tier reads it.
pub(super) struct XPrep<'a> {
    /// Padded columns.
    kpad: usize,
    /// `[m, kpad]` bytes: `xq + 128` for tiers with [`Lanes::OFFSET_X`], else `xq`.
    bytes: Vec<u8>,
    /// `[m, kpad / 128]` group scales.
    sx: &'a [f32],
    /// `[m, units]` unit sums `Q_u` as f32 (empty when W has no offsets).
    qf: Vec<f32>,
}

impl XPrep<'_> {
    fn row(&self, b: usize) -> *const u8 {
        self.bytes[b * self.kpad..].as_ptr()
    }
}

/// One tier's vector operations for the micro-kernel: a vector holds one value per row of a
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
    /// `init + Σ` over `steps` steps (a multiple of 4) of the 4-byte products of each `x[r]`
    /// with the panel's `w`, for `R <= MR` vectors.
    ///
    /// # Safety
    /// The tier's CPU features; `x[r]` has `4 · steps` bytes, `w` `NR · 4 · steps`.
    unsafe fn unit_sums<const R: usize>(
        x: [*const u8; R],
        w: *const u8,
        steps: usize,
        init: Self::I,
    ) -> [Self::I; R];
    /// Loads `NR` i32.
    ///
    /// # Safety
    /// `p` has `NR` values.
    unsafe fn load_i(p: *const i32) -> Self::I;
    /// Zero lanes.
    ///
    /// # Safety
    /// The tier's CPU features.
    unsafe fn zero_i() -> Self::I;
    /// Loads `NR` f32.
    ///
    /// # Safety
    /// `p` has `NR` values.
    unsafe fn load_f(p: *const f32) -> Self::F;
    /// `v` in every lane.
    ///
    /// # Safety
    /// The tier's CPU features.
    unsafe fn splat(v: f32) -> Self::F;
    /// Lanes converted to f32 (exact: every sum is below `2^24` in magnitude).
    ///
    /// # Safety
    /// The tier's CPU features.
    unsafe fn to_f32(i: Self::I) -> Self::F;
    /// `a · b + c` with one rounding.
    ///
    /// # Safety
    /// The tier's CPU features.
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// Stores `NR` f32.
    ///
    /// # Safety
    /// `p` has room for `NR` values.
    unsafe fn store(v: Self::F, p: *mut f32);
}

/// `R` vectors of x (from `b0`) by panel `panel`, over every column: writes the outputs to
/// `out[r · NR + lane]`.
///
/// # Safety
/// The tier's CPU features; `b0 + R` vectors in `xp`, `panel` inside `pw` packed for `L`
/// (`pw.nr == L::NR`), `out` has `R · NR` values.
#[inline(always)]
unsafe fn tile<L: Lanes, const R: usize>(
    pw: &PackedW,
    xp: &XPrep,
    b0: usize,
    panel: usize,
    out: *mut f32,
) {
    let nr = L::NR;
    let per_group = GROUP / pw.unit;
    let groups = pw.kpad / GROUP;
    let steps = pw.unit / 4;
    let meta = panel * pw.units * nr;
    let has_offset = !pw.offset.is_empty();
    // SAFETY (whole body): every pointer below stays inside its buffer by the layouts of
    // `PackedW` and `XPrep` and the caller's contract.
    unsafe {
        let wbase = pw.codes.as_ptr().add(panel * pw.kpad * nr);
        let xrow: [*const u8; R] = std::array::from_fn(|r| xp.row(b0 + r));
        let mut y = [L::splat(0.0); R];
        for g in 0..groups {
            let mut acc = [L::splat(0.0); R];
            for u in g * per_group..(g + 1) * per_group {
                let init = if L::OFFSET_X {
                    L::load_i(pw.corr.as_ptr().add(meta + u * nr))
                } else {
                    L::zero_i()
                };
                let x: [*const u8; R] = std::array::from_fn(|r| xrow[r].add(u * pw.unit));
                let sums = L::unit_sums::<R>(x, wbase.add(u * pw.unit * nr), steps, init);
                let sc = L::load_f(pw.scale.as_ptr().add(meta + u * nr));
                for r in 0..R {
                    acc[r] = L::fma(L::to_f32(sums[r]), sc, acc[r]);
                }
                if has_offset {
                    let of = L::load_f(pw.offset.as_ptr().add(meta + u * nr));
                    for r in 0..R {
                        let q = *xp.qf.get_unchecked((b0 + r) * pw.units + u);
                        acc[r] = L::fma(of, L::splat(q), acc[r]);
                    }
                }
            }
            for r in 0..R {
                let s = *xp.sx.get_unchecked((b0 + r) * groups + g);
                y[r] = L::fma(acc[r], L::splat(s), y[r]);
            }
        }
        for r in 0..R {
            L::store(y[r], out.add(r * nr));
        }
    }
}

/// The outputs of vectors `rows` by the panels `panels`, written (or added) into `y`.
///
/// # Safety
/// The tier's CPU features; `pw` packed for `L`; `rows` inside the batch, `panels` inside
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
    let mut b0 = rows.start;
    while b0 < rows.end {
        let nb = L::MR.min(rows.end - b0);
        for p in panels.clone() {
            let tp = t.as_mut_ptr();
            // SAFETY: the caller's contract; `t` holds MR · NR <= MAX_TILE values.
            unsafe {
                match nb {
                    1 => tile::<L, 1>(pw, xp, b0, p, tp),
                    2 => tile::<L, 2>(pw, xp, b0, p, tp),
                    3 => tile::<L, 3>(pw, xp, b0, p, tp),
                    4 => tile::<L, 4>(pw, xp, b0, p, tp),
                    5 => tile::<L, 5>(pw, xp, b0, p, tp),
                    6 => tile::<L, 6>(pw, xp, b0, p, tp),
                    7 => tile::<L, 7>(pw, xp, b0, p, tp),
                    _ => tile::<L, 8>(pw, xp, b0, p, tp),
                }
            }
            let cols = nr.min(o - p * nr);
            for r in 0..nb {
                for c in 0..cols {
                    // SAFETY: (b0 + r, p · nr + c) lies in the caller's rectangle of y.
                    unsafe { y.store((b0 + r) * o + p * nr + c, t[r * nr + c], accumulate) };
                }
            }
        }
        b0 += nb;
    }
}

/// The scalar tier's lanes: plain arrays of 8.
struct Scalar;

impl Lanes for Scalar {
    const NR: usize = 8;
    const MR: usize = 4;
    const OFFSET_X: bool = false;
    type I = [i32; 8];
    type F = [f32; 8];

    #[inline(always)]
    unsafe fn unit_sums<const R: usize>(
        x: [*const u8; R],
        w: *const u8,
        steps: usize,
        init: [i32; 8],
    ) -> [[i32; 8]; R] {
        let mut acc = [init; R];
        for s in 0..steps {
            for r in 0..R {
                for l in 0..8 {
                    for j in 0..4 {
                        // SAFETY: the trait's contract.
                        let (xv, wv) =
                            unsafe { (*x[r].add(4 * s + j), *w.add((s * 8 + l) * 4 + j)) };
                        acc[r][l] += i32::from(xv as i8) * i32::from(wv as i8);
                    }
                }
            }
        }
        acc
    }
    #[inline(always)]
    unsafe fn load_i(p: *const i32) -> [i32; 8] {
        // SAFETY: the trait's contract.
        unsafe { std::ptr::read_unaligned(p as *const [i32; 8]) }
    }
    #[inline(always)]
    unsafe fn zero_i() -> [i32; 8] {
        [0; 8]
    }
    #[inline(always)]
    unsafe fn load_f(p: *const f32) -> [f32; 8] {
        // SAFETY: the trait's contract.
        unsafe { std::ptr::read_unaligned(p as *const [f32; 8]) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> [f32; 8] {
        [v; 8]
    }
    #[inline(always)]
    unsafe fn to_f32(i: [i32; 8]) -> [f32; 8] {
        i.map(|v| v as f32)
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
    }
    #[inline(always)]
    unsafe fn store(v: [f32; 8], p: *mut f32) {
        // SAFETY: the trait's contract.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; 8], v) }
    }
}

/// Which kernel a tier and a packed W run.
#[derive(Clone, Copy)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2Narrow,
    #[cfg(target_arch = "x86_64")]
    Avx2Wide,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    fn nr(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => 16,
            _ => 8,
        }
    }
    fn offset_x(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni | Kernel::Avx2Narrow => true,
            _ => false,
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
                Kernel::Scalar => block::<Scalar>(pw, xp, rows, panels, y, o, accumulate),
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
            }
        }
    }
}

/// `y (+)= x · Wᵀ` for the quantized batch `q` (`m` vectors) on `tier` (already
/// [`IntTier::supported`]); `y` is `[m, o]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    tier: IntTier,
    w: &dyn IntCodes,
    layout: IntLayout,
    q: &QuantizedX,
    m: usize,
    parallel: bool,
    y: &mut [f32],
    accumulate: bool,
) {
    let (o, _) = w.int_dims();
    let narrow = layout.kind == CodeKind::Nibble;
    let kernel = match tier {
        #[cfg(target_arch = "x86_64")]
        IntTier::Avx512Vnni => Kernel::Vnni,
        #[cfg(target_arch = "x86_64")]
        IntTier::Avx2 if narrow => Kernel::Avx2Narrow,
        #[cfg(target_arch = "x86_64")]
        IntTier::Avx2 => Kernel::Avx2Wide,
        _ => Kernel::Scalar,
    };
    let pw = pack(w, layout, kernel.nr(), parallel);
    debug_assert_eq!(pw.narrow, narrow);
    let xp = prepare_x(q, m, kernel.offset_x(), &pw);
    let yp = YPtr(y.as_mut_ptr());
    let (mt, nt) = (m.div_ceil(M_BLOCK), o.div_ceil(N_BLOCK));
    let per_block = N_BLOCK / pw.nr;
    let panels = o.div_ceil(pw.nr);
    let task = |t: usize| {
        let (bm, bn) = (t / nt, t % nt);
        let rows = bm * M_BLOCK..m.min((bm + 1) * M_BLOCK);
        let ps = bn * per_block..panels.min((bn + 1) * per_block);
        // SAFETY: the kernel came from a supported tier; rows and panels lie inside the batch
        // and `pw`; tasks own disjoint rectangles of y, joined before `run` returns.
        unsafe { kernel.block(&pw, &xp, rows, ps, yp, o, accumulate) };
    };
    if parallel {
        (0..mt * nt).into_par_iter().for_each(task);
    } else {
        (0..mt * nt).for_each(task);
    }
}

/// x for a kernel: its bytes, group scales, and `Q_u` where W has offsets.
fn prepare_x<'a>(q: &'a QuantizedX, m: usize, offset_x: bool, pw: &PackedW) -> XPrep<'a> {
    let bytes: Vec<u8> = if offset_x {
        q.xq.par_iter().map(|&v| (v as u8) ^ 0x80).collect()
    } else {
        q.xq.iter().map(|&v| v as u8).collect()
    };
    let qf = if pw.offset.is_empty() {
        Vec::new()
    } else {
        q.qsum[..m * pw.units].iter().map(|&v| v as f32).collect()
    };
    XPrep {
        kpad: q.kpad,
        bytes,
        sx: &q.sx,
        qf,
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
    if i == 0 || x.len() != m * i || y.len() != m * o || !x.iter().all(|v| v.is_finite()) {
        return false;
    }
    let unit = layout.unit;
    let q = super::quantize_x(x, m, i, unit);
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
