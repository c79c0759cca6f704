//! The input gradient `dX = dY · W` with int8 activations: the QLoRA backward through a frozen
//! quantized W on the integer GEMM.
//!
//! # Why W is requantized
//! The forward's trick (the codes used as integers, the block affine applied after the
//! integer sum) needs the affine maps to be constant along the reduction. The backward reduces
//! over the *rows* of W (`dX_k = Σ_n dY_n · W_nk`), while every format's scales run along a
//! row (per block of a row, or per row), so the codes cannot be summed over n as integers. So
//! each call dequantizes W and requantizes its transpose to symmetric int8 per
//! [`BACKWARD_UNIT`] = 64 rows of W: `Wᵀ[k, u·64..u·64+64] ≈ s_{k,u} · c` with
//! `s_{k,u} = max_n |W_nk| / 127` over the unit and `c = round_half_even(W_nk / s_{k,u})` in
//! −127..=127 ([`TransposedInt8`], an [`IntCodes`] of the signed kind), and runs the forward's
//! integer GEMM ([`super::forward`]) with it on `dY`, quantized per 128 as any x. The
//! transpose is built in parallel over chunks of 64 columns of W, 64 × 64 dequantized weights
//! at a time (L1), into storage the calling thread keeps for its next call (about
//! `out · in` bytes).
//!
//! # Error per output (against the f32 path on the dequantized weights)
//! With `a_g(n)` the absmax of dY's group holding n and `A_{k,u}(n)` that of W's column k over
//! the unit holding n:
//! `|ΔdX_k| <= Σ_n |W_nk| · a_g(n) / 254 + Σ_n (|dY_n| + a_g(n) / 254) · A_{k,u}(n) / 254`,
//! plus f32 rounding (relative 1e-6): the same form as NF4's forward bound (its int8 table),
//! with the requantized column in place of the table. Tested by
//! `backward_int8_every_format_every_tier` in `tests/act8.rs`.
//!
//! Like the forward, every tier gives the same bits for the same dY (the transpose is built
//! by the same scalar arithmetic everywhere), whatever the thread count.

use rayon::prelude::*;

use super::{holds, CodeKind, IntCodes, IntLayout, IntTier, GROUP};
use crate::cpu::{usable, KernelPath};
use crate::kernels::{ColBlock, QuantRows};

/// Rows of W (columns of `Wᵀ`) per scale of the requantized transpose.
pub const BACKWARD_UNIT: usize = 64;

/// `Wᵀ` (`in x out`) as symmetric int8 per [`BACKWARD_UNIT`] of its columns: row `k`'s codes
/// are `codes[k · out..(k + 1) · out]` (signed bytes), its scales `scale[k · units..]` with
/// `units = ceil(out / 64)`; weight `(k, n) ≈ scale[k · units + n / 64] · code`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransposedInt8 {
    /// Rows of `Wᵀ` (W's `in`).
    rows: usize,
    /// Columns of `Wᵀ` (W's `out`).
    cols: usize,
    /// `[rows, cols]` signed codes.
    codes: Vec<u8>,
    /// `[rows, units]` scales.
    scale: Vec<f32>,
}

impl TransposedInt8 {
    /// Requantizes the transpose of the `out x in` matrix whose rows `dequant` writes
    /// (`dequant(r0, rows, c0, len, dst)` puts `W[r0 + p, c0..c0 + len]` at
    /// `dst[p · 64..p · 64 + len]` for `p < rows`, with `len <= 64`), into `self`'s storage,
    /// in parallel where `parallel`. `false` (and `self` unspecified) if a weight is not
    /// finite.
    pub(crate) fn build(
        &mut self,
        (out, inn): (usize, usize),
        parallel: bool,
        dequant: impl Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
    ) -> bool {
        const U: usize = BACKWARD_UNIT;
        let units = out.div_ceil(U);
        self.rows = inn;
        self.cols = out;
        // Every element is written below.
        self.codes.resize(inn * out, 0);
        self.scale.resize(inn * units, 0.0);
        if inn == 0 || out == 0 {
            return true;
        }
        // One task per 64 columns of W: rows c0..c0 + 64 of Wᵀ, contiguous.
        let chunk = |(t, (codes, scale)): (usize, (&mut [u8], &mut [f32]))| -> bool {
            let c0 = t * U;
            let len = U.min(inn - c0);
            let mut tile = [0.0f32; U * U];
            let mut q = [0i8; U * U];
            let mut finite = true;
            for (u, r0) in (0..out).step_by(U).enumerate() {
                let rows = U.min(out - r0);
                dequant(r0, rows, c0, len, &mut tile);
                // Column maxima over the unit's rows (lanes along the columns: vectorizes).
                let mut amax = [0.0f32; U];
                let mut probe = [0.0f32; U];
                for row in tile[..rows * U].chunks_exact(U) {
                    for c in 0..U {
                        let a = row[c].abs();
                        amax[c] = if a > amax[c] { a } else { amax[c] };
                        probe[c] += row[c] * 0.0;
                    }
                }
                finite &= probe[..len].iter().all(|&p| p == 0.0);
                let mut inv = [0.0f32; U];
                for c in 0..len {
                    scale[c * units + u] = amax[c] / 127.0;
                    inv[c] = if amax[c] > 0.0 { 127.0 / amax[c] } else { 0.0 };
                }
                for (qr, row) in q.chunks_exact_mut(U).zip(tile.chunks_exact(U)).take(rows) {
                    for c in 0..U {
                        qr[c] = super::round_to_i8((row[c] * inv[c]).clamp(-127.0, 127.0));
                    }
                }
                // Transpose the 64 x 64 codes into rows c0.. of Wᵀ, columns r0..r0 + rows.
                for c in 0..len {
                    let dst = &mut codes[c * out + r0..c * out + r0 + rows];
                    for (p, d) in dst.iter_mut().enumerate() {
                        *d = q[p * U + c] as u8;
                    }
                }
            }
            finite
        };
        let parts = self
            .codes
            .chunks_mut(U * out)
            .zip(self.scale.chunks_mut(U * units));
        if parallel {
            let parts = self
                .codes
                .par_chunks_mut(U * out)
                .zip(self.scale.par_chunks_mut(U * units));
            parts.enumerate().map(chunk).reduce(|| true, |a, b| a && b)
        } else {
            let mut parts = parts.enumerate();
            parts.all(chunk)
        }
    }

    /// The requantized transpose of `w` (`out x in` row-major f32), one thread: the ground
    /// truth of what the backward multiplies with (tests compare against it).
    pub fn from_f32(w: &[f32], out: usize, inn: usize) -> Option<TransposedInt8> {
        if w.len() != out.checked_mul(inn)? {
            return None;
        }
        let mut t = TransposedInt8::default();
        let ok = t.build((out, inn), false, |r0, rows, c0, len, dst| {
            for p in 0..rows {
                let src = &w[(r0 + p) * inn + c0..(r0 + p) * inn + c0 + len];
                dst[p * BACKWARD_UNIT..p * BACKWARD_UNIT + len].copy_from_slice(src);
            }
        });
        ok.then_some(t)
    }

    /// `Wᵀ` as f32 (`[in, out]`), the codes times their scales.
    pub fn to_f32(&self) -> Vec<f32> {
        let units = self.cols.div_ceil(BACKWARD_UNIT);
        let mut v = Vec::with_capacity(self.rows * self.cols);
        for k in 0..self.rows {
            for n in 0..self.cols {
                let s = self.scale[k * units + n / BACKWARD_UNIT];
                v.push(s * f32::from(self.codes[k * self.cols + n] as i8));
            }
        }
        v
    }
}

impl IntCodes for TransposedInt8 {
    fn int_dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn int_layout(&self) -> Option<IntLayout> {
        Some(IntLayout {
            unit: BACKWARD_UNIT,
            kind: CodeKind::Signed,
        })
    }
    fn int_codes(&self, r: usize, dst: &mut [u8]) {
        dst[..self.cols].copy_from_slice(&self.codes[r * self.cols..(r + 1) * self.cols]);
    }
    fn int_affine(&self, r: usize, scale: &mut [f32], offset: &mut [f32]) {
        let units = self.cols.div_ceil(BACKWARD_UNIT);
        scale[..units].copy_from_slice(&self.scale[r * units..(r + 1) * units]);
        offset[..units].fill(0.0);
    }
}

thread_local! {
    /// The calling thread's transpose of its last backward, for its storage.
    static TRANSPOSED: std::cell::Cell<TransposedInt8> = std::cell::Cell::new(TransposedInt8::default());
}

/// Whether int8 mode runs the input gradient of a batch of `m` on the integer GEMM on `tier`:
/// the tiers with `vpdpbusd` or AMX from 48 rows of dY, where the forward's GEMM starts; AVX2
/// from [`BACKWARD_AVX2_MIN_M`]; never on the portable and emulated tiers.
///
/// Measured with `act8_bench` (one 1024² layer, integer / f32 time, medians): on the 16-core
/// Xeon, AMX tier, 16 threads, batch 64 0.56–0.86, 256 0.28–0.47, 1000 0.42–0.53 across the
/// five formats; 2 threads, batch 64 0.58–1.11 (Q4 the slowest), 1000 0.48–0.52
/// (2026-12-03 17:33 UTC). On the Zen 3 (AVX2, 2 threads), 2026-12-04, two runs, across q4,
/// nf4, int8 and lower: batch 64 0.66–1.23, 128 0.65–1.07, 256 0.62–0.88, 512 0.71–0.88, 1024
/// 0.74–0.80 (an earlier session read 0.86–1.11 at 256 and 0.97–1.10 at 1024 there, and the
/// route left AVX2 out).
pub fn backward_route(tier: IntTier, m: usize) -> bool {
    match tier.supported() {
        IntTier::Amx | IntTier::Avx512Vnni | IntTier::AvxVnni => m >= 48,
        IntTier::Avx2 => m >= BACKWARD_AVX2_MIN_M,
        _ => false,
    }
}

/// Rows of dY from which [`backward_route`] takes the integer input gradient on AVX2 (below,
/// Q4's and NF4's measured at or above their f32 time).
pub const BACKWARD_AVX2_MIN_M: usize = 256;

/// The integer input gradient of a quantized matrix (implemented by every format): what
/// `WeightMatrix::matmul` runs under int8 activations where [`backward_route`] says so, on an
/// explicit tier (tests and benchmarks compare the tiers in one process).
pub trait Int8InputGrad {
    /// `dx (+)= dy · W` with int8 activations on `tier` (`dy` `[m, out]`, `dx` `[m, in]`; see
    /// the [module docs](self)). `false`, with `dx` untouched, where the integer path does not
    /// apply (a non-finite weight or dY, `out == 0`, mismatched lengths); the f32 path is then
    /// the caller's to run.
    fn input_grad_int8(
        &self,
        tier: IntTier,
        dy: &[f32],
        m: usize,
        dx: &mut [f32],
        accumulate: bool,
    ) -> bool;
}

/// [`Int8InputGrad::input_grad_int8`] for any format, dequantizing on `path`.
pub(crate) fn input_grad<F: QuantRows + ?Sized>(
    f: &F,
    path: KernelPath,
    tier: IntTier,
    dy: &[f32],
    m: usize,
    dx: &mut [f32],
    accumulate: bool,
) -> bool {
    let (o, i) = f.dims();
    if o == 0 || !holds(dy.len(), m, o) || !holds(dx.len(), m, i) {
        return false;
    }
    let path = usable(path);
    let threads = rayon::current_num_threads().max(1);
    let parallel = threads > 1 && o.saturating_mul(i).saturating_mul(m) >= 1 << 16;
    let mut wt = TRANSPOSED.take();
    let finite = wt.build((o, i), parallel, |r0, rows, c0, len, dst| {
        f.dequant_cols(
            path,
            ColBlock {
                r0,
                rows,
                c0,
                len,
                stride: BACKWARD_UNIT,
            },
            dst,
        )
    });
    let done = finite && super::forward(tier, &wt, dy, m, dx, accumulate);
    TRANSPOSED.set(wt);
    done
}

/// `GROUP` is a multiple of the unit, as [`super::forward`] needs.
const _: () = assert!(GROUP % BACKWARD_UNIT == 0);
