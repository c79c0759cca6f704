//! The opt-in int8-activation Q4 GEMV (`y = W·x` with x quantized to int8).
//!
//! x is quantized per group of 128 elements (8 Q4 blocks) to `xq = round(x / sx)`,
//! `sx = max|x| / 127`, so that `Σ_k code_k · xq_k` over a block runs in exact integer
//! arithmetic (`vpmaddubsw`: unsigned codes times signed xq). With the dequantized weight
//! `v' ≈ n · (2c/15 − 1)` a row's dot product is
//! `Σ_b n_b · (xs_g · I_b − cs_b)` with `I_b = Σ_{k∈b} code_k xq_k`, `xs_g = sx_g · 2/15` and
//! `cs_b = sx_g · Σ_{k∈b} xq_k` (g the group of block b).
//!
//! The prepared x (an `f32` vector used as storage, see [`prep_len`]):
//! - `xq`: `ceil(in/128) · 128` bytes; within a group of 128, its 64 even elements in order,
//!   then its 64 odd elements (byte `j` of a row's 64 packed bytes of the group holds elements
//!   `2j` and `2j + 1` in its low / high nibble, so the low nibbles pair with the first 64
//!   bytes and the high ones with the last 64: one 64-byte load each on AVX-512, two 32-byte
//!   loads each on AVX2);
//! - `xs`: one f32 per group;
//! - `cs`: 8 f32 per group, block `t` of the group at `CS_SLOT[t]` — the order in which the
//!   AVX2 kernel's `vphaddd` leaves its block sums.
//!
//! This module holds the layout, the scalar reference and the dispatch; the kernels live with
//! their tiers, [`crate::arch::avx2::q4_int8`] and [`crate::arch::avx512::q4_int8`].
//! The AVX2 kernel forms its block sums with `vpmaddubsw`, or where the CPU has AVX-VNNI
//! ([`crate::act8::has_avxvnni`]; `NIBBLE_AVXVNNI=0` turns it off) with `vpdpbusd`: the same
//! sums in the same order, so the same bits. On the AVX-512 tier of a CPU with AVX-512 VNNI
//! ([`crate::act8::has_avx512vnni`]) a 512-bit kernel takes a whole group of a row per
//! `vpdpbusd` pair and does the AVX2 kernel's f32 steps for two rows at once, lane for lane:
//! the same bits again (one 1024² layer on one thread of the 16-core Xeon: 39.7 µs against
//! 72.6 µs for the AVX-VNNI kernel, criterion `q4/fwd_batch1_int8_1thread`, 2026-12-04
//! 02:14 UTC).

use super::{Q4Matrix, Q4_BLOCK};
#[cfg(target_arch = "x86_64")]
use crate::arch::{avx2::q4_int8 as avx2, avx512::q4_int8 as avx512};
use crate::cpu::KernelPath;

/// Elements of x per activation scale (8 Q4 blocks).
pub(crate) const GROUP: usize = 128;
pub(crate) const BLOCKS_PER_GROUP: usize = GROUP / Q4_BLOCK;

/// Slot of block `t` (0..8) of a group in `cs`: `[b0, b1, b4, b5, b2, b3, b6, b7]`.
pub(crate) const CS_SLOT: [usize; 8] = [0, 1, 4, 5, 2, 3, 6, 7];

/// Number of f32 slots of the prepared x of an `inn`-element input.
pub(super) fn prep_len(inn: usize) -> usize {
    let groups = inn.div_ceil(GROUP);
    groups * GROUP / 4 + groups + groups * BLOCKS_PER_GROUP
}

/// Byte index in `xq` of element `k` of x.
#[inline(always)]
fn xq_index(k: usize) -> usize {
    let (g, w) = (k / GROUP, k % GROUP);
    g * GROUP + (w % 2) * (GROUP / 2) + w / 2
}

/// Appends the int8 preparation of `x` (any length, every element finite; a partial last
/// block's missing elements are 0 in `xq`) to
/// `prep`, on `path` (AVX-512 or AVX2 for whole groups, the scalar [`prepare_group_ref`]
/// otherwise; all give the same bytes).
pub(super) fn prepare(path: KernelPath, x: &[f32], prep: &mut Vec<f32>) {
    let groups = x.len().div_ceil(GROUP);
    let start = prep.len();
    prep.resize(start + prep_len(x.len()), 0.0);
    let (xqf, rest) = prep[start..].split_at_mut(groups * GROUP / 4);
    let (xs, cs) = rest.split_at_mut(groups);
    let xq: &mut [u8] = bytemuck::cast_slice_mut(xqf);
    for (g, grp) in x.chunks(GROUP).enumerate() {
        let xq = &mut xq[g * GROUP..(g + 1) * GROUP];
        let cs = &mut cs[g * BLOCKS_PER_GROUP..(g + 1) * BLOCKS_PER_GROUP];
        xs[g] = match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx512 comes from `usable` (the CPU has AVX-512 F/BW/VL, AVX2, FMA and
            // F16C); the group is whole (128 elements) and `xq`, `cs` have 128 and 8 elements.
            KernelPath::Avx512 if grp.len() == GROUP => unsafe {
                avx512::prepare_group(grp, xq, cs)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2Fma comes from `usable` (the CPU has AVX2 and FMA); the group is
            // whole (128 elements) and `xq`, `cs` have 128 and 8 elements.
            KernelPath::Avx2Fma if grp.len() == GROUP => unsafe {
                avx2::prepare_group(grp, xq, cs)
            },
            _ => prepare_group_ref(grp, xq, cs),
        };
    }
}

/// Scalar ground truth: quantizes one group of up to 128 elements into its 128 bytes of `xq`
/// and 8 slots of `cs` (module docs); returns its `xs`.
fn prepare_group_ref(grp: &[f32], xq: &mut [u8], cs: &mut [f32]) -> f32 {
    let amax = grp.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let sx = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    {
        for (t, blk) in grp.chunks(Q4_BLOCK).enumerate() {
            let mut q = 0i32;
            for (e, &v) in blk.iter().enumerate() {
                // Round half to even without a libm call: |v · inv| <= 127 < 2^22, so adding
                // and subtracting 1.5 · 2^23 rounds to an integer in the default rounding mode.
                const MAGIC: f32 = 12_582_912.0;
                let r = (((v * inv) + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
                xq[xq_index(t * Q4_BLOCK + e)] = r as u8;
                q += i32::from(r);
            }
            cs[CS_SLOT[t]] = sx * q as f32;
        }
    }
    sx * (2.0 / 15.0)
}

/// The prepared x's three parts: `(xq, xs, cs)`.
pub(crate) fn parts(inn: usize, prep: &[f32]) -> (&[u8], &[f32], &[f32]) {
    let groups = inn.div_ceil(GROUP);
    let (xqf, rest) = prep.split_at(groups * GROUP / 4);
    let (xs, cs) = rest.split_at(groups);
    (bytemuck::cast_slice(xqf), xs, cs)
}

/// What the SIMD kernels' rows read, resolved once per call rather than per 4 rows (the
/// parts behind the matrix's shared owners are a virtual call each, and the prepared x's three
/// parts a few bounds checks: about 7 % of a batch-1 call on the Zen 3, perf, 2026-12-04).
#[derive(Clone, Copy)]
pub(crate) struct RowOperands {
    /// `packed` `[out, in/2]`.
    pub(crate) packed: *const u8,
    /// `norm` `[out, in/16]`.
    pub(crate) norms: *const half::f16,
    /// The prepared x's bytes, group scales and block corrections ([`parts`]).
    pub(crate) xq: *const u8,
    pub(crate) xs: *const f32,
    pub(crate) cs: *const f32,
    /// Whole blocks of 16 per row.
    pub(crate) nb: usize,
    /// Whole groups of 128 per row.
    pub(crate) full: usize,
    pub(crate) prefetch: crate::cpu::QuantPrefetch,
}

impl RowOperands {
    /// `m`'s parts and the prepared `prep` (`prep_len(in)` values).
    pub(crate) fn new(m: &Q4Matrix, prep: &[f32]) -> RowOperands {
        let (xq, xs, cs) = parts(m.inn, prep);
        let nb = m.inn / Q4_BLOCK;
        RowOperands {
            packed: m.packed.as_slice().as_ptr(),
            norms: m.norm.f16s().as_ptr(),
            xq: xq.as_ptr(),
            xs: xs.as_ptr(),
            cs: cs.as_ptr(),
            nb,
            full: nb / BLOCKS_PER_GROUP,
            prefetch: crate::cpu::quant_prefetch(),
        }
    }

    /// Every field, in declaration order (one line for the kernels that read them all).
    #[allow(clippy::type_complexity)]
    #[inline(always)]
    pub(crate) fn all(
        &self,
    ) -> (
        *const u8,
        *const half::f16,
        *const u8,
        *const f32,
        *const f32,
        usize,
        usize,
        crate::cpu::QuantPrefetch,
    ) {
        (
            self.packed,
            self.norms,
            self.xq,
            self.xs,
            self.cs,
            self.nb,
            self.full,
            self.prefetch,
        )
    }
}

/// Scalar ground truth for row `r` over blocks `b0..ceil(in/16)` (the last one partial when
/// `in % 16 != 0`): `Σ_b n_b · (xs_g · I_b − cs_b)` (also the AVX2 kernel's tail).
pub(crate) fn dot_ref(m: &Q4Matrix, r: usize, b0: usize, prep: &[f32]) -> f32 {
    let nb = m.row_blocks();
    let (xq, xs, cs) = parts(m.inn, prep);
    let row = &m.packed.as_slice()[r * m.row_bytes()..(r + 1) * m.row_bytes()];
    let norms = &m.norm.f16s()[r * nb..(r + 1) * nb];
    let mut acc = 0.0f32;
    for b in b0..nb {
        let q = &row[b * 8..];
        let mut isum = 0i32;
        for e in 0..Q4_BLOCK.min(m.inn - b * Q4_BLOCK) {
            let code = i32::from((q[e / 2] >> (4 * (e % 2))) & 15);
            isum += code * i32::from(xq[xq_index(b * Q4_BLOCK + e)] as i8);
        }
        let (g, t) = (b / BLOCKS_PER_GROUP, b % BLOCKS_PER_GROUP);
        let c = cs[g * BLOCKS_PER_GROUP + CS_SLOT[t]];
        acc += norms[b].to_f32() * (xs[g] * isum as f32 - c);
    }
    acc
}

/// The SIMD kernels' tail of row `r`: [`dot_ref`] over blocks `b0..` (the blocks past the
/// last whole group), or `0.0` without touching the row where there are none (`in` a multiple
/// of 128; the call's setup cost about 10 % of a batch-1 product of 1024 columns, 2026-12-04).
/// Added to the kernel's sum either way, so the bits are those of adding `dot_ref`'s `0.0`.
#[inline]
pub(crate) fn tail_ref(m: &Q4Matrix, r: usize, b0: usize, prep: &[f32]) -> f32 {
    if b0 >= m.row_blocks() {
        0.0
    } else {
        dot_ref(m, r, b0, prep)
    }
}

/// `y[j] (+)= (W · x)[rows.start + j]` from a prepared x, on `path` (AVX-512 VNNI where
/// `path` is AVX-512 and the CPU has VNNI, else AVX2 on either x86 tier, else the scalar
/// [`dot_ref`]; the caller checked every length). The two SIMD kernels give the same bits.
pub(super) fn gemv(
    m: &Q4Matrix,
    path: KernelPath,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx512 comes from `usable`, so the CPU has AVX-512 F/BW/VL, AVX2, FMA and
        // F16C, and `has_avx512vnni` says it has VNNI; the caller checked `prep.len() ==
        // prep_len(in)`, `rows.end <= out` and `y.len() >= rows.len()`; rows hold whole blocks.
        KernelPath::Avx512 if m.inn % Q4_BLOCK == 0 && crate::act8::has_avx512vnni() => unsafe {
            // (GFNI where the CPU has it: the same bits.)
            // (The row-interleaved copy's kernel where it is on: the same bits.)
            match (
                super::tiles::tiles_enabled(),
                crate::act8::has_avx512_gfni(),
            ) {
                (true, true) => avx512::gemv_tiles_gfni(m, prep, rows, y, acc),
                (true, false) => avx512::gemv_tiles(m, prep, rows, y, acc),
                (false, true) => avx512::gemv_gfni(m, prep, rows, y, acc),
                (false, false) => avx512::gemv(m, prep, rows, y, acc),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both tiers come from `usable`, so the CPU has AVX2, FMA and F16C (and
        // AVX-VNNI where `has_avxvnni`); the lengths as above.
        KernelPath::Avx2Fma | KernelPath::Avx512 if m.inn % Q4_BLOCK == 0 => unsafe {
            if crate::act8::has_avxvnni() {
                avx2::gemv_avxvnni(m, prep, rows, y, acc)
            } else {
                avx2::gemv(m, prep, rows, y, acc)
            }
        },
        _ => {
            for (j, r) in rows.enumerate() {
                let v = dot_ref(m, r, 0, prep);
                y[j] = if acc { y[j] + v } else { v };
            }
        }
    }
}

/// A small batch's int8 GEMVs in one pass over W ([`crate::kernels::QuantRows::gemv_batch`]):
/// `out[v · stride + j] = (W · x_v)[rows.start + j]` for the prepared vectors `preps`, with the
/// bits [`gemv`] gives each alone, where every preparation is this GEMV's and the path is x86:
/// on AVX-512 with VNNI over the row-interleaved copy where it is on ([`super::tiles`]), else
/// the AVX2 tier's row kernel (with AVX-VNNI where the CPU has it); `false`, with nothing
/// written, otherwise (the caller then runs [`gemv`] vector by vector). The caller checked
/// `rows`, `stride` and `out` (the trait's contract).
pub(super) fn gemv_batch(
    m: &Q4Matrix,
    path: KernelPath,
    preps: &[&[f32]],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(path, KernelPath::Avx2Fma | KernelPath::Avx512)
        && m.inn % Q4_BLOCK == 0
        && preps.iter().all(|p| p.len() == prep_len(m.inn))
    {
        // SAFETY: both paths come from `usable` (the caller's), so the CPU has AVX2, FMA and
        // F16C (and the AVX-512 tier on that path; VNNI, GFNI and AVX-VNNI are checked);
        // every preparation is this GEMV's; rows, stride and out as the trait's contract says.
        unsafe {
            if path == KernelPath::Avx512
                && crate::act8::has_avx512vnni()
                && super::tiles::tiles_enabled()
            {
                let done = if crate::act8::has_avx512_gfni() {
                    avx512::gemv_batch_gfni(m, preps, rows.clone(), out, stride)
                } else {
                    avx512::gemv_batch(m, preps, rows.clone(), out, stride)
                };
                if done {
                    return true;
                }
            }
            return if crate::act8::has_avxvnni() {
                avx2::gemv_batch_avxvnni(m, preps, rows, out, stride)
            } else {
                avx2::gemv_batch(m, preps, rows, out, stride)
            };
        }
    }
    let _ = (m, path, preps, rows, out, stride);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::usable;

    /// The AVX2 and AVX-512 preparations write exactly the scalar ground truth's bytes and
    /// sums: random groups, an all-zero group, exact ties (`x · 127 / max` = k + 1/2), tiny and
    /// huge values, and ragged tails (whole groups only go to the SIMD code).
    #[test]
    fn simd_prepare_matches_scalar() {
        let mut rng = nibble_tensor::Rng::new(5);
        for inn in [16, 128, 144, 256, 1040, 1024] {
            let mut x = nibble_tensor::Tensor::randn(&[inn], &mut rng)
                .data()
                .to_vec();
            if inn >= 256 {
                x[128..256].fill(0.0);
            }
            if inn == 1024 {
                // Group 2: max 127, so x · 127 / 127 = x exactly; ties at k + 0.5.
                for (i, v) in x[256..384].iter_mut().enumerate() {
                    *v = (i as f32 - 64.0) + 0.5;
                }
                x[256] = 127.0;
                for v in &mut x[384..512] {
                    *v *= 1e-30;
                }
                for v in &mut x[512..640] {
                    *v *= 1e30;
                }
            }
            let mut want = Vec::new();
            prepare(KernelPath::Scalar, &x, &mut want);
            for path in [KernelPath::Avx2Fma, KernelPath::Avx512] {
                if usable(path) != path {
                    if inn == 16 {
                        println!("simd_prepare_matches_scalar: {path:?} skipped (not on this CPU)");
                    }
                    continue;
                }
                let mut got = vec![1.0f32];
                prepare(path, &x, &mut got);
                assert_eq!(got.len(), 1 + prep_len(inn));
                assert_eq!(got[0], 1.0, "prepare appends");
                let same = got[1..]
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "in = {inn}: {path:?} and scalar preparations differ");
            }
        }
    }

    /// The AVX2 tier's batch kernels (`vpmaddubsw`, and `vpdpbusd` where the CPU has
    /// AVX-VNNI) give each of 2 to 8 vectors the bits of the AVX2 GEMV alone, on rows with a
    /// partial last group, a zero block and an all-zero vector, every row or the second half,
    /// outputs pre-filled with NaN. Prints what the CPU lacks.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_batch_kernels_give_each_vector_its_gemv_bits() {
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("q4 act8: this CPU lacks AVX2: the AVX2 batch kernels not run");
            return;
        }
        let hw = crate::act8::has_avxvnni();
        if !hw {
            println!("q4 act8: this CPU lacks AVX-VNNI: its batch kernel not run");
        }
        let mut rng = nibble_tensor::Rng::new(19);
        for (out, inn) in [(33usize, 272usize), (9, 128), (20, 1024)] {
            let mut w = nibble_tensor::Tensor::randn(&[out, inn], &mut rng).into_vec();
            w[..16].fill(0.0);
            let m = Q4Matrix::quantize(&nibble_tensor::Tensor::from_vec(&[out, inn], w).unwrap())
                .unwrap();
            let preps: Vec<Vec<f32>> = (0..8)
                .map(|v| {
                    let mut x = nibble_tensor::Tensor::randn(&[inn], &mut rng).into_vec();
                    if v == 1 {
                        x.fill(0.0);
                    }
                    let mut prep = Vec::new();
                    prepare(KernelPath::Avx2Fma, &x, &mut prep);
                    prep
                })
                .collect();
            for rows in [0..out, out / 2..out] {
                let n = rows.len();
                for count in 2..=8 {
                    let ps: Vec<&[f32]> = preps[..count].iter().map(|p| &p[..]).collect();
                    let kernels: [(&str, bool, BatchKernel); 2] = [
                        ("vpmaddubsw", true, avx2::gemv_batch),
                        ("vpdpbusd", hw, avx2::gemv_batch_avxvnni),
                    ];
                    for (name, _, kernel) in kernels.iter().filter(|k| k.1) {
                        let mut got = vec![f32::NAN; count * n];
                        // SAFETY: the CPU has what the kernel needs (checked above); each
                        // prep is x's preparation for this width, rows inside W, `got` holds
                        // `count` strides of n.
                        assert!(unsafe { kernel(&m, &ps, rows.clone(), &mut got, n) });
                        for (v, prep) in ps.iter().enumerate() {
                            let mut want = vec![f32::NAN; n];
                            // SAFETY: as above, one vector.
                            unsafe { avx2::gemv(&m, prep, rows.clone(), &mut want, false) };
                            let same = got[v * n..(v + 1) * n]
                                .iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{out}x{inn} {rows:?} {name} {count} vectors: {v}");
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 tier's batch kernel type.
    #[cfg(target_arch = "x86_64")]
    type BatchKernel =
        unsafe fn(&Q4Matrix, &[&[f32]], std::ops::Range<usize>, &mut [f32], usize) -> bool;

    /// The fused GEMV on AVX-VNNI (`vpdpbusd`, and its AVX2 emulation on any AVX2 CPU), on
    /// AVX-512 VNNI, and the AVX-512 VNNI kernels of the row-interleaved copy give
    /// the AVX2 kernel's bits: rows 1..9 (quads and singles), lengths of one to nine groups,
    /// an all-zero group, ±extreme activations (xq = ±127), codes 0 and 15 included; shapes
    /// with rows before, between and after whole tiles of 16, and columns past the last
    /// whole group.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_gemvs_match_avx2() {
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("q4 act8: this CPU lacks AVX2: nothing to compare");
            return;
        }
        if !super::super::tiles::tiles_enabled() {
            println!("q4 act8: NIBBLE_Q4_TILES=0: the interleaved copy's kernels not run");
        }
        let hw = crate::act8::has_avxvnni();
        if !hw {
            println!("q4 act8: this CPU lacks AVX-VNNI: comparing its AVX2 emulation only");
        }
        let zmm = crate::act8::has_avx512vnni();
        if !zmm {
            println!("q4 act8: this CPU lacks AVX-512 VNNI: its fused GEMV not run");
        }
        let gfni = zmm && crate::act8::has_avx512_gfni();
        if zmm && !gfni {
            println!("q4 act8: this CPU lacks GFNI: the AVX-512 VNNI GEMV's GFNI twin not run");
        }
        let mut rng = nibble_tensor::Rng::new(17);
        // (Widths 1024, 2048 and 4096 with 8 rows or more: the AVX-512 kernel's sweeps
        // compiled for those widths.)
        let shapes = [
            (1usize, 128usize),
            (4, 256),
            (5, 384),
            (9, 1152),
            (7, 1024),
            (17, 1024),
            (11, 2048),
            (8, 4096),
        ];
        // (Rows past the last whole tile of 16, and rows before the first one inside `out / 2..
        // out`, take the row kernel beside the AVX-512 VNNI kernel of the interleaved copy.)
        let awkward = [
            (15, 144),
            (17, 128),
            (33, 272),
            (63, 1040),
            (129, 128),
            (48, 384),
            (40, 1024),
        ];
        for &(out, inn) in shapes.iter().chain(&awkward) {
            let mut w = nibble_tensor::Tensor::randn(&[out, inn], &mut rng).into_vec();
            w[..16].fill(0.0); // a zero block
            let w = nibble_tensor::Tensor::from_vec(&[out, inn], w).unwrap();
            let m = Q4Matrix::quantize(&w).unwrap();
            let mut x = nibble_tensor::Tensor::randn(&[inn], &mut rng).into_vec();
            for (k, v) in x[..128].iter_mut().enumerate() {
                *v = if k % 3 == 0 { -2.0 } else { 2.0 };
            }
            if inn >= 256 {
                x[128..256].fill(0.0);
            }
            let mut prep = Vec::new();
            prepare(KernelPath::Avx2Fma, &x, &mut prep);
            for rows in [0..out, out / 2..out] {
                let run =
                    |f: unsafe fn(&Q4Matrix, &[f32], std::ops::Range<usize>, &mut [f32], bool)| {
                        let mut y = vec![f32::NAN; rows.len()];
                        // SAFETY: the CPU has what `f` needs (checked by the caller of `run`);
                        // `prep` is x's preparation, rows inside W, `y` one value per row.
                        unsafe { f(&m, &prep, rows.clone(), &mut y, false) };
                        y
                    };
                let want = run(avx2::gemv);
                assert!(want.iter().all(|v| v.is_finite()));
                let bits =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                let emulated = run(avx2::gemv_avxvnni_emulated);
                assert!(bits(&emulated, &want), "{out}x{inn} {rows:?}: emulated");
                if hw {
                    let got = run(avx2::gemv_avxvnni);
                    assert!(bits(&got, &want), "{out}x{inn} {rows:?}: vpdpbusd");
                }
                if zmm {
                    let got = run(avx512::gemv);
                    assert!(bits(&got, &want), "{out}x{inn} {rows:?}: AVX-512 VNNI");
                }
                if gfni {
                    let got = run(avx512::gemv_gfni);
                    assert!(
                        bits(&got, &want),
                        "{out}x{inn} {rows:?}: AVX-512 VNNI + GFNI"
                    );
                }
                if zmm && super::super::tiles::tiles_enabled() {
                    let got = run(avx512::gemv_tiles);
                    assert!(bits(&got, &want), "{out}x{inn} {rows:?}: tiles");
                    let tiled = out >= 16 && inn >= GROUP;
                    assert_eq!(m.tiles.bytes() > 0, tiled, "{out}x{inn}: the copy");
                }
                if gfni && super::super::tiles::tiles_enabled() {
                    let got = run(avx512::gemv_tiles_gfni);
                    assert!(bits(&got, &want), "{out}x{inn} {rows:?}: tiles + GFNI");
                }
            }
        }
    }
}
