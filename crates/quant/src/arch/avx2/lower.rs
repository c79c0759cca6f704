//! The AVX2 + FMA + F16C kernels of [`crate::lower`].

use super::{hsum, load16, store_panel_run};
use crate::kernels::ColBlock;
use crate::lower::*;
use half::f16;
use std::arch::x86_64::*;

/// The 8 codes of columns `j8..j8+8` (`j8` a multiple of 8, inside the row) as i32 lanes.
#[inline(always)]
unsafe fn codes8(codes: &[u8], bits: u8, j8: usize, sh3: __m256i, sh4: __m256i) -> __m256i {
    let p = j8 * bits as usize / 8;
    let w = if p + 4 <= codes.len() {
        // SAFETY: 4 bytes at p inside `codes`.
        std::ptr::read_unaligned(codes.as_ptr().add(p) as *const u32)
    } else {
        let mut b = [0u8; 4];
        let e = codes.len().min(p + 4);
        b[..e - p].copy_from_slice(&codes[p..e]);
        u32::from_le_bytes(b)
    };
    let v = _mm256_set1_epi32(w as i32);
    if bits == 4 {
        _mm256_and_si256(_mm256_srlv_epi32(v, sh4), _mm256_set1_epi32(15))
    } else {
        _mm256_and_si256(_mm256_srlv_epi32(v, sh3), _mm256_set1_epi32(7))
    }
}

/// [`code_of`] on 8 lanes.
#[inline(always)]
unsafe fn code8(x: __m256, m: __m256, s: __m256, qmax: __m256) -> __m256 {
    let v = _mm256_div_ps(_mm256_sub_ps(x, m), s);
    let v = _mm256_min_ps(
        _mm256_max_ps(v, _mm256_set1_ps(-1.0)),
        _mm256_add_ps(qmax, _mm256_set1_ps(1.0)),
    );
    let t = _mm256_cvtepi32_ps(_mm256_cvttps_epi32(v));
    let up = _mm256_cmp_ps(_mm256_sub_ps(v, t), _mm256_set1_ps(0.5), _CMP_GE_OQ);
    let r = _mm256_add_ps(t, _mm256_and_ps(up, _mm256_set1_ps(1.0)));
    _mm256_min_ps(_mm256_max_ps(r, _mm256_setzero_ps()), qmax)
}

/// [`code_sums_ref`] with the same 8 lanes (element `k` in lane `k % 8`) and final order.
/// Shapes: `v` any length (the last `len % 8` by the scalar code).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn code_sums(v: &[f32], m: f32, s: f32, qmax: f32) -> (f64, f64, f64) {
    let (mv, sv, qv) = (_mm256_set1_ps(m), _mm256_set1_ps(s), _mm256_set1_ps(qmax));
    let (mut sc, mut scc) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let n8 = v.len() / 8 * 8;
    let mut k = 0;
    while k < n8 {
        // SAFETY: k + 8 <= v.len().
        let x = _mm256_loadu_ps(v.as_ptr().add(k));
        let c = code8(x, mv, sv, qv);
        sc = _mm256_add_ps(sc, c);
        scc = _mm256_add_ps(scc, _mm256_mul_ps(c, c));
        let (cl, ch) = (
            _mm256_cvtps_pd(_mm256_castps256_ps128(c)),
            _mm256_cvtps_pd(_mm256_extractf128_ps(c, 1)),
        );
        let (xl, xh) = (
            _mm256_cvtps_pd(_mm256_castps256_ps128(x)),
            _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)),
        );
        lo = _mm256_add_pd(lo, _mm256_mul_pd(cl, xl));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(ch, xh));
        k += 8;
    }
    let (mut a, mut b, mut c) = ([0.0f32; 8], [0.0f32; 8], [0.0f64; 8]);
    _mm256_storeu_ps(a.as_mut_ptr(), sc);
    _mm256_storeu_ps(b.as_mut_ptr(), scc);
    _mm256_storeu_pd(c.as_mut_ptr(), lo);
    _mm256_storeu_pd(c.as_mut_ptr().add(4), hi);
    for (l, &x) in v[n8..].iter().enumerate() {
        let q = code_of(x, m, s, qmax);
        a[l] += q;
        b[l] += q * q;
        c[l] += q as f64 * x as f64;
    }
    let a: f32 = a.iter().sum();
    let b: f32 = b.iter().sum();
    (a as f64, b as f64, c.iter().sum())
}

/// [`group_sse_ref`] for `s > 0` with the same lanes and order.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn group_sse(v: &[f32], m: f32, s: f32, qmax: f32) -> f64 {
    let (mv, sv, qv) = (_mm256_set1_ps(m), _mm256_set1_ps(s), _mm256_set1_ps(qmax));
    let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let n8 = v.len() / 8 * 8;
    let mut k = 0;
    while k < n8 {
        // SAFETY: k + 8 <= v.len().
        let x = _mm256_loadu_ps(v.as_ptr().add(k));
        let c = code8(x, mv, sv, qv);
        let d = _mm256_sub_ps(_mm256_add_ps(mv, _mm256_mul_ps(sv, c)), x);
        let dl = _mm256_cvtps_pd(_mm256_castps256_ps128(d));
        let dh = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
        lo = _mm256_add_pd(lo, _mm256_mul_pd(dl, dl));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(dh, dh));
        k += 8;
    }
    let mut acc = [0.0f64; 8];
    _mm256_storeu_pd(acc.as_mut_ptr(), lo);
    _mm256_storeu_pd(acc.as_mut_ptr().add(4), hi);
    for (l, &x) in v[n8..].iter().enumerate() {
        let d = (m + s * code_of(x, m, s, qmax) - x) as f64;
        acc[l] += d * d;
    }
    acc.iter().sum()
}

#[inline(always)]
unsafe fn shifts() -> (__m256i, __m256i) {
    (
        _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21),
        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28),
    )
}

/// Shapes: columns `c0..c0+out.len()` of one row; `c0` and `out.len()` multiples of 8 and
/// covered by `codes`, `scales`, `mins` (checked by the caller).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_row(
    bits: u8,
    codes: &[u8],
    scales: &[f16],
    mins: &[f16],
    c0: usize,
    out: &mut [f32],
) {
    let (sh3, sh4) = shifts();
    let gather = Gather16::new(bits);
    let mut t = 0;
    while t + 8 <= out.len() {
        let j = c0 + t;
        let g = j / LOWER_GROUP;
        let s = _mm256_set1_ps(scales[g].to_f32());
        let m = _mm256_set1_ps(mins[g].to_f32());
        // `scale · 2^−s` times `code · 2^s` is `scale · code` to the last bit (powers of
        // two scale exactly; an f16 scale times 2^−7 stays a normal f32).
        let su = [
            _mm256_mul_ps(s, gather.unshift[0]),
            _mm256_mul_ps(s, gather.unshift[1]),
        ];
        let gend = ((g + 1) * LOWER_GROUP - c0).min(out.len());
        // 16 codes at a time ([`Gather16`]; c0 + t is a multiple of 8, so the window's
        // bit pattern is the one it was built for), then 8 with a variable shift.
        while t + 16 <= gend {
            let [ca, cb] = gather.codes(codes, (c0 + t) * usize::from(bits) / 8);
            // SAFETY: t + 16 <= out.len().
            _mm256_storeu_ps(
                out.as_mut_ptr().add(t),
                _mm256_add_ps(m, _mm256_mul_ps(su[0], ca)),
            );
            _mm256_storeu_ps(
                out.as_mut_ptr().add(t + 8),
                _mm256_add_ps(m, _mm256_mul_ps(su[1], cb)),
            );
            t += 16;
        }
        while t + 8 <= gend {
            let c = _mm256_cvtepi32_ps(codes8(codes, bits, c0 + t, sh3, sh4));
            // SAFETY: t + 8 <= out.len().
            _mm256_storeu_ps(
                out.as_mut_ptr().add(t),
                _mm256_add_ps(m, _mm256_mul_ps(s, c)),
            );
            t += 8;
        }
    }
}

/// Gathers 16 codes of `bits` (3 or 4) bits — code `i` at bits `bits·i..` of a 16-byte
/// window broadcast to both halves of a register — into two vectors of 8 i32 lanes
/// (codes 0-7 and 8-15) without a variable shift: lane `i` takes the two bytes holding
/// its code (`vpshufb`) and masks it where it lies, giving `code · 2^s` with
/// `s = (bits·i) mod 8`. The GEMV multiplies that by `2^−s` (exact) to get the code back. (`vpsrlvd` runs at a quarter of `vpand`'s rate
/// on the machines measured: lower_precision batch 1, 3.8 -> 2.x ms.)
struct Gather16 {
    ctrl: [__m256i; 2],
    mask: [__m256i; 2],
    /// `2^−s` per lane: what turns `code · 2^s` back into the code.
    unshift: [__m256; 2],
}

impl Gather16 {
    /// Loads the constant tables of `bits`-bit codes ([`GatherTables`], built at compile
    /// time).
    #[inline(always)]
    unsafe fn new(bits: u8) -> Self {
        let t = if bits == 4 { &GATHER4 } else { &GATHER3 };
        // (Plain loads, no closures: closures do not inherit the caller's target features.)
        // SAFETY: (loads) each source is a 32-byte array.
        let ld = |p: *const u8| p as *const __m256i;
        Gather16 {
            ctrl: [
                _mm256_loadu_si256(ld(t.ctrl[0].as_ptr())),
                _mm256_loadu_si256(ld(t.ctrl[1].as_ptr())),
            ],
            mask: [
                _mm256_loadu_si256(ld(t.mask[0].as_ptr().cast())),
                _mm256_loadu_si256(ld(t.mask[1].as_ptr().cast())),
            ],
            unshift: [
                _mm256_castsi256_ps(_mm256_loadu_si256(ld(t.unshift[0].as_ptr().cast()))),
                _mm256_castsi256_ps(_mm256_loadu_si256(ld(t.unshift[1].as_ptr().cast()))),
            ],
        }
    }

    /// `code · 2^s` for the 16 codes whose first byte is `codes[p]`, as `f32`; bytes past
    /// the end of `codes` read as zero (a window only uses its first `2·bits + 1` bytes,
    /// the last one masked away).
    #[inline(always)]
    unsafe fn codes(&self, codes: &[u8], p: usize) -> [__m256; 2] {
        let win = if p + 16 <= codes.len() {
            // SAFETY: 16 bytes at p inside `codes`.
            _mm_loadu_si128(codes.as_ptr().add(p) as *const __m128i)
        } else {
            let mut b = [0u8; 16];
            let e = codes.len().min(p + 16);
            b[..e - p].copy_from_slice(&codes[p..e]);
            _mm_loadu_si128(b.as_ptr() as *const __m128i)
        };
        let win = _mm256_broadcastsi128_si256(win);
        // (No closure: closures do not inherit the caller's target features.)
        let lo = _mm256_and_si256(_mm256_shuffle_epi8(win, self.ctrl[0]), self.mask[0]);
        let hi = _mm256_and_si256(_mm256_shuffle_epi8(win, self.ctrl[1]), self.mask[1]);
        [_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi)]
    }
}

/// Fused GEMV, one row at a time, 32 codes per step ([`Gather16`]) over the whole groups,
/// the scalar code over a partial last group. Shapes: W `out x in`, `x` `[in]`,
/// `y.len() >= rows.len()`. Per row: `Σ_k (min_g + scale_g · code_k) · x_k`, each weight
/// dequantized in registers to the reference's bits (a multiply, then an add), so the sum rounds as an f32 product with the
/// dequantized row does, with no `min_g · Σ x` to cancel against (that factored form was
/// 5.2e-4 of `Σ |w| |x|` off on rows offset by 3 under an activation of 1e6).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv(
    m: &LowerMatrix,
    x: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    let (ng, full) = (m.inn.div_ceil(LOWER_GROUP), m.inn / LOWER_GROUP);
    if x.len() != m.inn || rows.end > m.out || y.len() < rows.len() {
        return;
    }
    let gather = [Gather16::new(3), Gather16::new(4)];
    let (all, bits) = (m.codes.as_slice(), m.bits.as_slice());
    for (j, r) in rows.clone().enumerate() {
        let b = bits[r];
        let u = if b == 4 { &gather[1] } else { &gather[0] };
        // The row's codes and those after it (windows may reach past the row's end).
        let codes = &all[m.offsets[r] as usize..];
        let (sc, mn) = (&m.scales.f16s()[r * ng..], &m.mins.f16s()[r * ng..]);
        let mut a = [_mm256_setzero_ps(); 4];
        for g in 0..full {
            // `scale · 2^−s` per lane is exact (an f16 scale times a power of two down to
            // 2^−7 stays a normal f32), and `(scale · 2^−s) · (code · 2^s) = scale · code`
            // needs no rounding at all: an f16's 11 significant bits times a code's 4 fit in
            // f32's 24. So one fused multiply-add `min + scale · code` rounds once, exactly
            // as the reference's multiply (exact) and add do: its bits, in one operation.
            let s = _mm256_set1_ps(sc[g].to_f32());
            let s = [
                _mm256_mul_ps(s, u.unshift[0]),
                _mm256_mul_ps(s, u.unshift[1]),
            ];
            let z = _mm256_set1_ps(mn[g].to_f32());
            // 32 columns a step into four sums (two chains of fused adds would wait on
            // their latency).
            let mut k = g * LOWER_GROUP;
            while k < (g + 1) * LOWER_GROUP {
                for half in 0..2 {
                    let kh = k + 16 * half;
                    let c = u.codes(codes, kh * usize::from(b) / 8);
                    for h in 0..2 {
                        // SAFETY: kh + 16 <= in: inside x.
                        let xv = _mm256_loadu_ps(x.as_ptr().add(kh + 8 * h));
                        let w = _mm256_fmadd_ps(s[h], c[h], z);
                        a[2 * half + h] = _mm256_fmadd_ps(w, xv, a[2 * half + h]);
                    }
                }
                k += 32;
            }
        }
        let mut v = hsum(_mm256_add_ps(
            _mm256_add_ps(a[0], a[1]),
            _mm256_add_ps(a[2], a[3]),
        ));
        if full < ng {
            let g = full;
            let (s, z) = (sc[g].to_f32(), mn[g].to_f32());
            v += (g * LOWER_GROUP..m.inn)
                .map(|k| (z + s * code_at(codes, b, k) as f32) * x[k])
                .sum::<f32>();
        }
        y[j] = if acc { y[j] + v } else { v };
    }
}

/// One forward GEMM panel (`FwdPack`), as the AVX-512 tier's `lower::pack_fwd_panel` writes
/// it: `dst[p · 16 + j] = W[r0 + j, c0 + p]`, zeros past `rows`. Shapes: `rows <= 16`, `c0`
/// and `len` multiples of 16, all inside W, `dst.len() >= len · 16` (checked by the caller).
/// `min + scale · code` per lane, the reference's bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_fwd_panel(m: &LowerMatrix, b: ColBlock, dst: &mut [f32]) {
    let (all, bits) = (m.codes.as_slice(), m.bits.as_slice());
    let d = dst.as_mut_ptr();
    let gather = [Gather16::new(3), Gather16::new(4)];
    let mut params = PanelGroup::new();
    for k in 0..b.len / 16 {
        let col = b.c0 + 16 * k;
        params.at(m, b.r0, b.rows, col);
        let (sv, zv) = (load16(&params.scale), load16(&params.min));
        // SAFETY: the gathers read inside `codes` (copied at its end); rows r0 + j < out (the
        // caller's checks); 256 floats of dst at 256k (len · 16 floats).
        store_panel_run(
            b.rows,
            d.add(k * 256),
            |j| {
                let r = b.r0 + j;
                let w = usize::from(bits[r]);
                let u = &gather[usize::from(w == 4)];
                let c = u.codes(&all[m.offsets[r] as usize..], col * w / 8);
                [
                    _mm256_castps_si256(_mm256_mul_ps(c[0], u.unshift[0])),
                    _mm256_castps_si256(_mm256_mul_ps(c[1], u.unshift[1])),
                ]
            },
            |c, h| _mm256_add_ps(zv[h], _mm256_mul_ps(sv[h], _mm256_castsi256_ps(c))),
        );
    }
}
