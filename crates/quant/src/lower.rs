//! Under 4 bits: mixed 3/4-bit rows with a least-squares-fitted scale and minimum per group, for
//! BigNet's `lower_precision` variant (the whole width-1024 BigNet in < 9 MiB).
//!
//! Format ([`LowerMatrix`]):
//! - each row has a bit width of 3 or 4 (`bits` u8 `[out]`); the rows whose quantization error
//!   drops most from 3 to 4 bits get 4 bits, as many as the bit budget allows;
//! - groups of [`LOWER_GROUP`] = 128 consecutive weights of a row share an f16 `scale` and an
//!   f16 `min` (`scales`, `mins`: f16 `[out, ceil(in/128)]`; when `in % 128 != 0` the last
//!   group of each row is partial and fitted to the weights it has): `v' = min + scale · code`;
//! - `codes` u8: the rows one after another, each starting on a byte; a 4-bit row takes
//!   `ceil(in/2)` bytes (element `2i` in the low nibble, an odd `in` leaves the last high
//!   nibble 0), a 3-bit row `ceil(3·in/8)` bytes: each 8 codes packed little-endian into 3
//!   bytes (code `j` at bits `3j..3j+3`), a last partial run of codes padded with zero bits to
//!   a whole byte;
//! - quantizing: per group, a small grid search over clipping of `[min, max]` followed by a
//!   least-squares refit of `(min, scale)` to the chosen codes (HQQ / k-quant style), keeping
//!   whichever has the least squared error; codes are then recomputed with the f16-rounded
//!   parameters.
//!
//! At the default budget of 3.9 bits per weight (codes, scales, mins and widths included) a
//! 1024x1024 matrix takes ≈ 511 KiB.

use half::f16;
use nibble_tensor::Tensor;

pub(crate) mod act8;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::arch::avx2::lower as avx2;
#[cfg(target_arch = "x86_64")]
use crate::arch::avx512::lower as avx512;
use crate::bytes::{check_part, check_values, Bytes};
use crate::cpu::{is_x86_simd, usable, KernelPath};
use crate::error::{number, QuantError, Result};
use crate::kernels::{self, ColBlock, QuantRows};

/// The code of element `j` of a row packed at `bits` (3 or 4) bits: bits `bits·j..bits·j+bits`
/// of the row's little-endian bit stream (a 3-bit row's groups of 8 codes in 3 bytes are exactly
/// that stream). Bytes past the end of `codes` read as 0.
#[inline]
pub(crate) fn code_at(codes: &[u8], bits: u8, j: usize) -> u8 {
    let bit = j * bits as usize;
    let lo = codes.get(bit / 8).copied().unwrap_or(0) as u16;
    let hi = codes.get(bit / 8 + 1).copied().unwrap_or(0) as u16;
    (((lo | (hi << 8)) >> (bit % 8)) as u8) & ((1u8 << bits) - 1)
}

/// How many of `want` elements from column `c0` a row with these parts can produce.
fn row_len(bits: u8, codes: &[u8], scales: &[f16], mins: &[f16], c0: usize, want: usize) -> usize {
    let by_codes = (codes.len() * 8 / bits.max(1) as usize).saturating_sub(c0);
    let by_groups = (scales.len().min(mins.len()) * LOWER_GROUP).saturating_sub(c0);
    want.min(by_codes).min(by_groups)
}

/// Scalar ground truth: `out[t] = min + scale · code` for columns `c0 + t` of one row with
/// `bits` (3 or 4) bits per code, `codes` the row's packed bytes and `scales`/`mins` its groups.
/// Any `c0` and length; elements the parts do not cover are left untouched.
pub fn dequantize_row_ref(
    bits: u8,
    codes: &[u8],
    scales: &[f16],
    mins: &[f16],
    c0: usize,
    out: &mut [f32],
) {
    if bits != 3 && bits != 4 {
        return;
    }
    let n = row_len(bits, codes, scales, mins, c0, out.len());
    for (t, d) in out[..n].iter_mut().enumerate() {
        let j = c0 + t;
        let (s, m) = (
            scales[j / LOWER_GROUP].to_f32(),
            mins[j / LOWER_GROUP].to_f32(),
        );
        *d = m + s * code_at(codes, bits, j) as f32;
    }
}

/// [`dequantize_row_ref`] with the given kernel path (bit-identical: a multiply then an add,
/// no FMA); the SIMD loop covers the whole runs of 8 columns and the scalar code the rest.
pub fn dequantize_row(
    path: KernelPath,
    bits: u8,
    codes: &[u8],
    scales: &[f16],
    mins: &[f16],
    c0: usize,
    out: &mut [f32],
) {
    if bits != 3 && bits != 4 {
        return;
    }
    let n = row_len(bits, codes, scales, mins, c0, out.len());
    match usable(path) {
        #[cfg(target_arch = "x86_64")]
        tier @ (KernelPath::Avx2Fma | KernelPath::Avx512) => {
            let head = ((8 - c0 % 8) % 8).min(n);
            let body = (n - head) / 8 * 8;
            dequantize_row_ref(bits, codes, scales, mins, c0, &mut out[..head]);
            let (c, o) = (c0 + head, &mut out[head..head + body]);
            // SAFETY: Avx2Fma or Avx512 from `usable`: the CPU has that tier. Columns
            // c0+head..c0+head+body are 8-aligned and covered by the parts (`row_len`).
            unsafe {
                if tier == KernelPath::Avx512 {
                    avx512::dequantize_row(bits, codes, scales, mins, c, o)
                } else {
                    avx2::dequantize_row(bits, codes, scales, mins, c, o)
                }
            };
            let t0 = head + body;
            dequantize_row_ref(bits, codes, scales, mins, c0 + t0, &mut out[t0..n]);
        }
        _ => dequantize_row_ref(bits, codes, scales, mins, c0, &mut out[..n]),
    }
}

/// The f32 bit pattern of `2^−s` for code `k` of a run of `bits`-bit codes (the exponent
/// field; `s = (bits·k) mod 8 <= 7` its bit offset in its first byte): the factor that
/// cancels the AVX2 gather's in-place `code · 2^s`.
const fn unshift_bits(bits: u8, k: usize) -> u32 {
    let s = ((bits as usize) * k % 8) as u32;
    (127 - s) << 23
}

/// The AVX2 gather's per-lane tables for 16 codes of `bits` bits, as plain arrays (two
/// registers each): the `vpshufb` control taking the two bytes that hold lane `i`'s code, the
/// mask leaving the code where it lies, and `2^−s` as f32 bits ([`unshift_bits`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct GatherTables {
    pub(crate) ctrl: [[u8; 32]; 2],
    pub(crate) mask: [[i32; 8]; 2],
    pub(crate) unshift: [[u32; 8]; 2],
}

impl GatherTables {
    const fn new(bits: u8) -> Self {
        let mut t = GatherTables {
            ctrl: [[0x80; 32]; 2],
            mask: [[0; 8]; 2],
            unshift: [[0; 8]; 2],
        };
        let mut h = 0;
        while h < 2 {
            let mut i = 0;
            while i < 8 {
                let bit = (bits as usize) * (8 * h + i);
                // Lanes 0-3 index the low 16 bytes, lanes 4-7 the high ones: both hold the
                // same window, so the byte index is the same. A code spans at most bytes
                // bit/8 and bit/8 + 1 (bit % 8 + bits <= 11).
                t.ctrl[h][4 * i] = (bit / 8) as u8;
                t.ctrl[h][4 * i + 1] = (bit / 8 + 1) as u8;
                t.mask[h][i] = ((1 << bits) - 1) << (bit % 8);
                t.unshift[h][i] = unshift_bits(bits, 8 * h + i);
                i += 1;
            }
            h += 1;
        }
        t
    }
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const GATHER3: GatherTables = GatherTables::new(3);
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const GATHER4: GatherTables = GatherTables::new(4);

/// Weights per scale/min group.
pub const LOWER_GROUP: usize = 128;
/// Default bit budget per weight.
pub const DEFAULT_BITS: f64 = 3.9;

/// 8 three-bit codes: 3 bytes, code `j` at bits `3j..3j+3` of the little-endian u24.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Pack3x8 {
    /// The packed codes.
    pub b: [u8; 3],
}
const _: () = assert!(std::mem::size_of::<Pack3x8>() == 3);

/// A mixed 3/4-bit quantized matrix (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct LowerMatrix {
    pub(crate) out: usize,
    pub(crate) inn: usize,
    pub(crate) bits: Bytes,
    pub(crate) codes: Bytes,
    pub(crate) scales: Bytes,
    pub(crate) mins: Bytes,
    /// Byte offset of each row's codes (u32: a matrix's codes stay far below 4 GiB, and the
    /// table is part of the model's memory budget).
    pub(crate) offsets: Vec<u32>,
}

/// `clamp(round((x − m) / s), 0, qmax)` (round half away from zero): a weight's code for minimum `m` and scale `s > 0`.
#[inline(always)]
pub(crate) fn code_of(x: f32, m: f32, s: f32, qmax: f32) -> f32 {
    // Round half away from zero without a libm call (so the loops vectorize): clamping first
    // keeps the integer conversion in range, and `v − trunc(v)` is exact.
    let v = ((x - m) / s).clamp(-1.0, qmax + 1.0);
    let t = (v as i32) as f32;
    let r = if v - t >= 0.5 { t + 1.0 } else { t };
    r.clamp(0.0, qmax)
}

/// `(Σc, Σc², Σc·x)` over the group's codes for `(m, s)`, `s > 0`. Eight lane accumulators
/// (element `k` in lane `k % 8`) so the loop vectorizes; the lane order is fixed, so the
/// result does not depend on whether it was vectorized.
fn code_sums_ref(v: &[f32], m: f32, s: f32, qmax: f32) -> (f64, f64, f64) {
    let mut sc = [0.0f32; 8];
    let mut scc = [0.0f32; 8];
    let mut scx = [0.0f64; 8];
    let mut it = v.chunks_exact(8);
    for ch in &mut it {
        for l in 0..8 {
            let c = code_of(ch[l], m, s, qmax);
            sc[l] += c;
            scc[l] += c * c;
            scx[l] += c as f64 * ch[l] as f64;
        }
    }
    for (l, &x) in it.remainder().iter().enumerate() {
        let c = code_of(x, m, s, qmax);
        sc[l] += c;
        scc[l] += c * c;
        scx[l] += c as f64 * x as f64;
    }
    // Integer-valued below 2^24: exact in f32 in any order.
    let a: f32 = sc.iter().sum();
    let b: f32 = scc.iter().sum();
    (a as f64, b as f64, scx.iter().sum())
}

/// Squared error `Σ (m + s·c − x)²` of the group with `(m, s)` (lanes as in [`code_sums`]).
fn group_sse_ref(v: &[f32], m: f32, s: f32, qmax: f32) -> f64 {
    let mut acc = [0.0f64; 8];
    if s > 0.0 {
        let mut it = v.chunks_exact(8);
        for ch in &mut it {
            for l in 0..8 {
                let d = (m + s * code_of(ch[l], m, s, qmax) - ch[l]) as f64;
                acc[l] += d * d;
            }
        }
        for (l, &x) in it.remainder().iter().enumerate() {
            let d = (m + s * code_of(x, m, s, qmax) - x) as f64;
            acc[l] += d * d;
        }
    } else {
        for (k, &x) in v.iter().enumerate() {
            let d = (m - x) as f64;
            acc[k % 8] += d * d;
        }
    }
    acc.iter().sum()
}

/// [`code_sums_ref`], with AVX2 when `simd` (bit-identical: same lanes, same order).
#[inline]
fn code_sums(simd: bool, v: &[f32], m: f32, s: f32, qmax: f32) -> (f64, f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::code_sums(v, m, s, qmax) };
    }
    let _ = simd;
    code_sums_ref(v, m, s, qmax)
}

/// [`group_sse_ref`], with AVX2 when `simd` (bit-identical: same lanes, same order).
#[inline]
fn group_sse(simd: bool, v: &[f32], m: f32, s: f32, qmax: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if simd && s > 0.0 {
        // SAFETY: `simd` is only true when the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::group_sse(v, m, s, qmax) };
    }
    let _ = simd;
    group_sse_ref(v, m, s, qmax)
}

/// Fits one group at `bits`: returns `(min, scale, squared error)` with f16-rounded parameters.
/// The same arithmetic on every CPU (the AVX2 kernels keep the scalar code's lanes and order).
fn fit_group(v: &[f32], bits: u32) -> (f16, f16, f64) {
    let simd = crate::cpu::has_avx2_fma_f16c();
    let qmax = ((1u32 << bits) - 1) as f32;
    let lo = v.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let hi = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let range = hi - lo;
    let n = v.len() as f64;
    let sx: f64 = v.iter().map(|&x| x as f64).sum();
    let mut best = (f16::from_f32(lo), f16::from_f32(range / qmax));
    let mut best_e = group_sse(simd, v, best.0.to_f32(), best.1.to_f32(), qmax);
    if range <= 0.0 {
        return (best.0, best.1, best_e);
    }
    for a in 0..6 {
        for b in 0..6 {
            let l = lo + range * 0.02 * a as f32;
            let h = hi - range * 0.02 * b as f32;
            let mut m = l;
            let mut s = (h - l) / qmax;
            for _ in 0..2 {
                // least-squares refit to the codes
                let (sc, scc, scx) = code_sums(simd, v, m, s, qmax);
                let den = n * scc - sc * sc;
                if den <= 0.0 {
                    break;
                }
                let s2 = (n * scx - sc * sx) / den;
                if s2 <= 0.0 {
                    break;
                }
                s = s2 as f32;
                m = ((sx - s2 * sc) / n) as f32;
            }
            let c = (f16::from_f32(m), f16::from_f32(s));
            let e = group_sse(simd, v, c.0.to_f32(), c.1.to_f32(), qmax);
            if e < best_e {
                best = c;
                best_e = e;
            }
        }
    }
    (best.0, best.1, best_e)
}

struct RowQ {
    mins: Vec<f16>,
    scales: Vec<f16>,
    err: f64,
}

fn fit_row(x: &[f32], bits: u32) -> RowQ {
    let mut r = RowQ {
        mins: Vec::new(),
        scales: Vec::new(),
        err: 0.0,
    };
    for g in x.chunks(LOWER_GROUP) {
        let (m, s, e) = fit_group(g, bits);
        r.mins.push(m);
        r.scales.push(s);
        r.err += e;
    }
    r
}

fn encode_row(x: &[f32], bits: u32, q: &RowQ, out: &mut Vec<u8>) {
    let qmax = ((1u32 << bits) - 1) as f32;
    let codes: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            let (m, s) = (
                q.mins[k / LOWER_GROUP].to_f32(),
                q.scales[k / LOWER_GROUP].to_f32(),
            );
            if s > 0.0 {
                ((v - m) / s).round().clamp(0.0, qmax) as u8
            } else {
                0
            }
        })
        .collect();
    if bits == 4 {
        out.extend(
            codes
                .chunks(2)
                .map(|c| c[0] | (c.get(1).copied().unwrap_or(0) << 4)),
        );
    } else {
        for c in codes.chunks(8) {
            let w = c
                .iter()
                .enumerate()
                .fold(0u32, |a, (j, &v)| a | ((v as u32) << (3 * j)));
            out.extend_from_slice(&w.to_le_bytes()[..(3 * c.len()).div_ceil(8)]);
        }
    }
}

/// Bytes of a row of `inn` codes of `bits` bits: `ceil(bits·in/8)` (`None` on overflow).
fn row_bytes(inn: usize, bits: u8) -> Option<usize> {
    Some(inn.checked_mul(bits as usize)?.div_ceil(8))
}

impl LowerMatrix {
    /// Quantizes at the default budget ([`DEFAULT_BITS`] bits per weight).
    pub fn quantize(w: &Tensor) -> Result<Self> {
        Self::quantize_bits(w, DEFAULT_BITS)
    }

    /// Quantizes with at most `bits_per_weight` bits per weight (all parts included; at least
    /// the all-3-bit size). Any shape: the budget charges every byte stored (each row's width
    /// byte, its scales and mins, a partial last group's too, and a ragged row's padding), so
    /// narrow rows, whose fixed costs weigh more per weight, get fewer 4-bit rows; rows go to
    /// 4 bits in order of the squared error they save, as long as the total fits.
    ///
    /// A budget below 3 bits per weight (or NaN) is a [`QuantError::Shape`]; a NaN or infinite
    /// weight a [`QuantError::NonFinite`]; a group whose f16 minimum or scale would overflow
    /// (weights beyond ±65504, or a group range beyond 7 · 65504) a [`QuantError::Overflow`]
    /// naming the row, the group (its first column as `col`) and its weight of largest
    /// magnitude.
    pub fn quantize_bits(w: &Tensor, bits_per_weight: f64) -> Result<Self> {
        const OP: &str = "lower_quantize";
        let (o, i) = w.dims2(OP)?;
        if bits_per_weight.is_nan() || bits_per_weight < 3.0 {
            return Err(QuantError::Shape {
                op: OP,
                shape: vec![o, i],
                what: format!(
                    "a budget of {bits_per_weight} bits per weight: it must be a number of at least 3 (the 3-bit codes alone)"
                ),
            });
        }
        if let Some(k) = w.data().iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite {
                op: OP,
                row: k / i,
                col: k % i,
                value: w.data()[k],
            });
        }
        // One slice per row, empty ones too (an `out x 0` matrix still has `out` rows), and
        // each row's two fits and statistics.
        let per_row = 2 * std::mem::size_of::<&[f32]>() + 2 * std::mem::size_of::<RowQ>() + 8;
        kernels::check_rows_fit(OP, [o, i], i.saturating_add(per_row))?;
        let rows: Vec<&[f32]> = if i > 0 {
            w.data().chunks(i).collect()
        } else {
            vec![&[]; o]
        };
        let fits: Vec<(RowQ, RowQ)> = rows
            .par_iter()
            .map(|x| (fit_row(x, 3), fit_row(x, 4)))
            .collect();
        // (The tensor holds o·i floats, so none of these sizes overflow.)
        let bytes3 = row_bytes(i, 3).unwrap_or(usize::MAX);
        let bytes4 = row_bytes(i, 4).unwrap_or(usize::MAX);
        let fixed = o * i.div_ceil(LOWER_GROUP) * 4 + o;
        let budget = (bits_per_weight * (o * i) as f64 / 8.0) as usize;
        let base = o.saturating_mul(bytes3).saturating_add(fixed);
        let extra = if i > 0 { bytes4 - bytes3 } else { 1 };
        let n4 = (budget.saturating_sub(base) / extra.max(1)).min(o);
        let mut order: Vec<usize> = (0..o).collect();
        order.sort_by(|&a, &b| {
            let ga = fits[a].0.err - fits[a].1.err;
            let gb = fits[b].0.err - fits[b].1.err;
            gb.total_cmp(&ga).then(a.cmp(&b))
        });
        let mut bits = vec![3u8; o];
        for &r in &order[..n4] {
            bits[r] = 4;
        }
        // A group whose fitted minimum or scale is beyond f16's range (weights past ±65504,
        // or a range past 7 · 65504) would dequantize to infinities or NaN.
        for r in 0..o {
            let q = if bits[r] == 4 { &fits[r].1 } else { &fits[r].0 };
            let bad =
                (0..q.mins.len()).find(|&g| !(q.mins[g].is_finite() && q.scales[g].is_finite()));
            if let Some(g) = bad {
                let group = &rows[r][g * LOWER_GROUP..((g + 1) * LOWER_GROUP).min(i)];
                let k = (0..group.len())
                    .max_by(|&a, &b| group[a].abs().total_cmp(&group[b].abs()).then(b.cmp(&a)))
                    .unwrap_or(0);
                let value = group.get(k).copied().unwrap_or(0.0);
                let (start, end) = (g * LOWER_GROUP, g * LOWER_GROUP + group.len());
                let lo = group.iter().fold(f32::INFINITY, |a, &b| a.min(b));
                let hi = group.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                return Err(QuantError::Overflow {
                    op: OP,
                    row: r,
                    col: start,
                    value,
                    storage: "f16",
                    what: format!(
                        "group {g} of row {r} (columns {start}..{end}) spans {} to {} (weight {} at column {}): its {}-bit min {} and scale {} overflow f16 (±65504)",
                        number(lo),
                        number(hi),
                        number(value),
                        start + k,
                        bits[r],
                        q.mins[g],
                        q.scales[g]
                    ),
                });
            }
        }
        let mut codes = Vec::new();
        let (mut mins, mut scales) = (Vec::new(), Vec::new());
        for r in 0..o {
            let q = if bits[r] == 4 { &fits[r].1 } else { &fits[r].0 };
            encode_row(rows[r], bits[r] as u32, q, &mut codes);
            mins.extend_from_slice(&q.mins);
            scales.extend_from_slice(&q.scales);
        }
        Self::from_parts(
            o,
            i,
            Bytes::from_vec(bits),
            Bytes::from_vec(codes),
            Bytes::from_f16(scales),
            Bytes::from_f16(mins),
        )
    }

    /// Builds from raw parts: `bits` u8 `[out]` (3 or 4), `codes` u8 (Σ row bytes:
    /// `ceil(in/2)` for a 4-bit row, `ceil(3·in/8)` for a 3-bit one), `scales` and `mins` f16
    /// `[out, ceil(in/128)]`. A part of the wrong length is a [`QuantError::PartLength`]; a
    /// bit width other than 3 or 4, or a NaN or infinite scale or minimum, a
    /// [`QuantError::PartValue`] naming the part and the index (`row · ⌈in/128⌉ +
    /// group` for scales and mins).
    pub fn from_parts(
        out: usize,
        inn: usize,
        bits: Bytes,
        codes: Bytes,
        scales: Bytes,
        mins: Bytes,
    ) -> Result<Self> {
        const OP: &str = "LowerMatrix::from_parts";
        let too_big = |what: &str| QuantError::Shape {
            op: OP,
            shape: vec![out, inn],
            what: what.into(),
        };
        check_part(OP, "bits", out, inn, &bits, out)?;
        let mut offsets: Vec<u32> = Vec::with_capacity(out + 1);
        offsets.push(0);
        for (k, &b) in bits.as_slice().iter().enumerate() {
            if b != 3 && b != 4 {
                return Err(QuantError::PartValue {
                    op: OP,
                    part: "bits",
                    index: k,
                    what: format!("bit width {b} (must be 3 or 4)"),
                });
            }
            let next = row_bytes(inn, b)
                .and_then(|n| n.checked_add(offsets[k] as usize))
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| too_big("codes exceed 4 GiB"))?;
            offsets.push(next);
        }
        check_part(OP, "codes", out, inn, &codes, offsets[out] as usize)?;
        let ng = out
            .checked_mul(inn.div_ceil(LOWER_GROUP))
            .and_then(|n| n.checked_mul(2))
            .ok_or_else(|| too_big("size overflows"))?;
        check_part(OP, "scales", out, inn, &scales, ng)?;
        check_part(OP, "mins", out, inn, &mins, ng)?;
        let m = LowerMatrix {
            out,
            inn,
            bits,
            codes,
            scales: scales.aligned(2),
            mins: mins.aligned(2),
            offsets,
        };
        check_values(
            OP,
            "scales",
            m.scales.f16s().iter().map(|v| v.to_f32()),
            false,
        )?;
        check_values(OP, "mins", m.mins.f16s().iter().map(|v| v.to_f32()), false)?;
        Ok(m)
    }

    /// Rows (`out`) and columns (`in`).
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inn)
    }

    /// The raw parts `(bits, codes, scales, mins)`.
    pub fn parts(&self) -> (&Bytes, &Bytes, &Bytes, &Bytes) {
        (&self.bits, &self.codes, &self.scales, &self.mins)
    }

    /// Number of 4-bit rows.
    pub fn rows_4bit(&self) -> usize {
        self.bits.as_slice().iter().filter(|&&b| b == 4).count()
    }

    /// Bits per weight, all parts included.
    pub fn bits_per_weight(&self) -> f64 {
        self.parts_len() as f64 * 8.0 / (self.out * self.inn).max(1) as f64
    }

    /// The whole matrix dequantized with an explicit kernel path (bit-identical on every path).
    pub fn dequantize_with(&self, path: KernelPath) -> Tensor {
        kernels::to_f32(self, path)
    }

    fn parts_len(&self) -> usize {
        self.bits.len() + self.codes.len() + self.scales.len() + self.mins.len()
    }
}

/// The group scales and mins of a forward GEMM panel's run of 16 columns, one per row
/// (lane), as the panel kernels of every tier apply them: read again only when the run enters
/// another group of [`LOWER_GROUP`] (a run from a multiple of 16 never crosses one).
pub(crate) struct PanelGroup {
    group: usize,
    /// Lane `j`: row `r0 + j`'s scale at the run (0 past the panel's rows).
    pub(crate) scale: [f32; 16],
    /// Lane `j`: row `r0 + j`'s min at the run (0 past the panel's rows).
    pub(crate) min: [f32; 16],
}

impl PanelGroup {
    pub(crate) fn new() -> Self {
        PanelGroup {
            group: usize::MAX,
            scale: [0.0; 16],
            min: [0.0; 16],
        }
    }

    /// Moves to the run at column `col` of rows `r0..r0 + rows` (`rows <= 16`, inside W).
    #[inline(always)]
    pub(crate) fn at(&mut self, m: &LowerMatrix, r0: usize, rows: usize, col: usize) {
        if col / LOWER_GROUP == self.group {
            return;
        }
        self.group = col / LOWER_GROUP;
        let ng = m.inn.div_ceil(LOWER_GROUP);
        let (scales, mins) = (m.scales.f16s(), m.mins.f16s());
        for j in 0..rows {
            self.scale[j] = scales[(r0 + j) * ng + self.group].to_f32();
            self.min[j] = mins[(r0 + j) * ng + self.group].to_f32();
        }
    }
}

impl QuantRows for LowerMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    fn act8_view(&self) -> Option<&dyn crate::act8::IntCodes> {
        Some(self)
    }
    fn act8_generic(&self, m: usize) -> bool {
        crate::act8::int8_route("lower", m) == crate::act8::Int8Route::Generic
    }
    fn act8_fused(&self, m: usize) -> bool {
        act8::FUSED.takes(m)
    }
    /// The fused int8 GEMV's batch kernel (`lower_int8::gemv_batch` on AVX-512 VNNI, the
    /// 256-bit `lower_int8` kernels on AVX-VNNI and AVX2, through
    /// [`crate::act8::FusedGemv::run_batch`]).
    fn gemv_batch(
        &self,
        path: KernelPath,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        act8::FUSED.run_batch(usable(path), self, self.inn, preps, rows, out, stride)
    }
    /// 1024², 2 threads, GEMVs against tiles: m = 2 0.24 / 0.32 ms, m = 3 0.34 / 0.34 ms.
    fn tiles_min_m(&self) -> usize {
        3
    }
    fn seg_align(&self) -> usize {
        8
    }
    fn dequant_segment(&self, path: KernelPath, r: usize, c0: usize, len: usize, dst: &mut [f32]) {
        let row = &self.codes.as_slice()[self.offsets[r] as usize..self.offsets[r + 1] as usize];
        let ng = self.inn.div_ceil(LOWER_GROUP);
        let sc = &self.scales.f16s()[r * ng..(r + 1) * ng];
        let mn = &self.mins.f16s()[r * ng..(r + 1) * ng];
        let bits = self.bits.as_slice()[r];
        dequantize_row(path, bits, row, sc, mn, c0, &mut dst[..len]);
    }
    /// Where the panel holds whole runs of 16 columns from a multiple of 16 (so a run never
    /// crosses a group of 128).
    #[cfg(target_arch = "x86_64")]
    unsafe fn pack_fwd_panel_simd(&self, path: KernelPath, b: ColBlock, dst: &mut [f32]) -> bool {
        if b.c0 % 16 != 0 || b.len % 16 != 0 {
            return false;
        }
        // SAFETY: the trait's contract (the CPU has `path`'s tier; the panel lies inside W and
        // dst), with whole runs of 16 just checked.
        unsafe {
            match path {
                KernelPath::Avx512 => avx512::pack_fwd_panel(self, b, dst),
                _ => avx2::pack_fwd_panel(self, b, dst),
            }
        };
        true
    }
    /// With int8 activations where their route is lower's fused GEMV
    /// ([`crate::act8::Int8Route::FusedLower`]), on the AVX2 and AVX-512 paths: x quantized
    /// for it ([`act8::prepare`]) unless x holds a NaN or infinity. Nothing otherwise (the f32
    /// GEMV reads x itself).
    fn gemv_prepare(&self, path: KernelPath, m: usize, x: &[f32], prep: &mut Vec<f32>) {
        if is_x86_simd(usable(path)) {
            act8::FUSED.prepare(self.inn, m, x, prep);
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemv_simd(
        &self,
        path: KernelPath,
        x: &[f32],
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) -> bool {
        // (The int8 preparation holds `34 · ceil(in/128)` floats for `in > 0`; the f32 GEMV's
        // is empty.)
        // SAFETY: the trait's contract: the CPU supports `path`; rows and y checked.
        if unsafe { act8::FUSED.run(path, self, self.inn, prep, rows.clone(), y, acc) } {
            return true;
        }
        if !prep.is_empty() {
            return false;
        }
        // SAFETY: the trait's contract (the CPU has `path`'s tier, AVX2 at least; x, rows and
        // y checked). Both tiers run the AVX2 GEMV (see `arch::avx512::lower`).
        unsafe { avx2::gemv(self, x, rows, y, acc) };
        true
    }
}

/// Int8 activations: codes 0..7 or 0..15 in units of one group, `w' = scale · c + min`.
impl crate::act8::IntCodes for LowerMatrix {
    fn int_dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    fn int_layout(&self) -> Option<crate::act8::IntLayout> {
        Some(crate::act8::IntLayout {
            unit: LOWER_GROUP,
            kind: crate::act8::CodeKind::Nibble,
        })
    }
    fn int_codes(&self, r: usize, dst: &mut [u8]) {
        let row = &self.codes.as_slice()[self.offsets[r] as usize..self.offsets[r + 1] as usize];
        let dst = &mut dst[..self.inn];
        if self.bits.as_slice()[r] == 4 {
            crate::act8::unpack_nibbles_low_first(row, dst);
        } else {
            crate::act8::unpack_3bit(row, dst);
        }
    }
    fn int_affine(&self, r: usize, scale: &mut [f32], offset: &mut [f32]) {
        let ng = self.inn.div_ceil(LOWER_GROUP);
        crate::act8::f16_to_f32(&self.scales.f16s()[r * ng..(r + 1) * ng], scale);
        crate::act8::f16_to_f32(&self.mins.f16s()[r * ng..(r + 1) * ng], offset);
    }
}

kernels::impl_weight_matrix!(LowerMatrix, "lower");
