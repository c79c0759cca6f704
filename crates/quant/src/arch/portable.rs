//! The portable tier (`wide` SIMD, any CPU): every format's kernels side by side.

use wide::f32x8;

/// `a · b` (equal lengths), 8 lanes then the scalar tail.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = f32x8::ZERO;
    let mut k = 0;
    while k + 8 <= n {
        let x = f32x8::from(<[f32; 8]>::try_from(&a[k..k + 8]).unwrap_or([0.0; 8]));
        let y = f32x8::from(<[f32; 8]>::try_from(&b[k..k + 8]).unwrap_or([0.0; 8]));
        acc += x * y;
        k += 8;
    }
    let mut s = acc.reduce_add();
    for j in k..n {
        s += a[j] * b[j];
    }
    s
}

/// [`crate::q4`]'s portable kernels.
pub(crate) mod q4 {
    use crate::q4::*;
    use half::f16;
    use wide::f32x8;

    fn arr(s: &[f32]) -> f32x8 {
        f32x8::from(<[f32; 8]>::try_from(s).unwrap_or([0.0; 8]))
    }

    /// Returns false on a non-finite weight or an overflowing norm.
    pub(crate) fn quantize_row(x: &[f32], packed: &mut [u8], norm: &mut [f16]) -> bool {
        for (b, blk) in x.chunks_exact(Q4_BLOCK).enumerate() {
            let (v0, v1) = (arr(&blk[..8]), arr(&blk[8..]));
            if !(v0.is_finite() & v1.is_finite()).all() {
                return false;
            }
            let n = v0
                .abs()
                .max(v1.abs())
                .to_array()
                .iter()
                .fold(0.0f32, |a, &v| a.max(v));
            if n >= F16_ROUNDS_TO_INF {
                return false;
            }
            norm[b] = f16::from_f32(n);
            let out = &mut packed[b * 8..b * 8 + 8];
            if n == 0.0 {
                out.fill(0);
                continue;
            }
            let (nv, two, fifteen) = (f32x8::splat(n), f32x8::splat(n + n), f32x8::splat(15.0));
            let q0 = ((v0 + nv) / two * fifteen).round().to_array();
            let q1 = ((v1 + nv) / two * fifteen).round().to_array();
            for i in 0..4 {
                out[i] = q0[2 * i] as u8 | ((q0[2 * i + 1] as u8) << 4);
                out[4 + i] = q1[2 * i] as u8 | ((q1[2 * i + 1] as u8) << 4);
            }
        }
        true
    }

    pub(crate) fn dequantize(packed: &[u8], norm: &[f16], out: &mut [f32]) {
        let l = lut();
        for (b, (q, o)) in packed
            .chunks_exact(8)
            .zip(out.chunks_exact_mut(Q4_BLOCK))
            .enumerate()
        {
            let n = f32x8::splat(norm[b].to_f32());
            let mut c = [0.0f32; 16];
            for i in 0..8 {
                c[2 * i] = l[(q[i] & 15) as usize];
                c[2 * i + 1] = l[(q[i] >> 4) as usize];
            }
            let r0 = (arr(&c[..8]) * n - n).to_array();
            let r1 = (arr(&c[8..]) * n - n).to_array();
            o[..8].copy_from_slice(&r0);
            o[8..].copy_from_slice(&r1);
        }
    }
}

/// [`crate::nf4`]'s portable kernels.
pub(crate) mod nf4 {
    use crate::nf4::*;
    use wide::{f32x8, CmpGt};

    pub(crate) fn quantize(
        x: &[f32],
        packed: &mut [u8],
        absmax: &mut [f32],
    ) -> std::result::Result<(), usize> {
        for (b, blk) in x.chunks_exact(NF4_BLOCK).enumerate() {
            let vs: Vec<f32x8> = blk
                .chunks_exact(8)
                .map(|c| f32x8::from(<[f32; 8]>::try_from(c).unwrap_or([0.0; 8])))
                .collect();
            if vs.iter().any(|v| !v.is_finite().all()) {
                return quantize_ref(x, packed, absmax);
            }
            let am = vs
                .iter()
                .fold(f32x8::ZERO, |a, v| a.max(v.abs()))
                .to_array()
                .iter()
                .fold(0.0f32, |a, &v| a.max(v));
            absmax[b] = am;
            let mut codes = [7u8; NF4_BLOCK];
            if am != 0.0 {
                let inv = f32x8::splat(1.0 / am.max(ABSMAX_FLOOR));
                for (j, v) in vs.iter().enumerate() {
                    let xn = *v * inv;
                    let mut cnt = f32x8::ZERO;
                    for t in NF4_THRESHOLDS {
                        cnt += xn.cmp_gt(f32x8::splat(t)) & f32x8::ONE;
                    }
                    for (k, c) in cnt.to_array().iter().enumerate() {
                        codes[j * 8 + k] = *c as u8;
                    }
                }
            }
            for (i, o) in packed[b * 32..b * 32 + 32].iter_mut().enumerate() {
                *o = (codes[2 * i] << 4) | codes[2 * i + 1];
            }
        }
        Ok(())
    }

    pub(crate) fn dequantize(packed: &[u8], scale: impl Fn(usize) -> f32, out: &mut [f32]) {
        for (g, o) in out.chunks_exact_mut(16).enumerate() {
            let s = f32x8::splat(scale(g));
            let mut c = [0.0f32; 16];
            for i in 0..8 {
                let b = packed[g * 8 + i];
                c[2 * i] = NF4_LEVELS[(b >> 4) as usize];
                c[2 * i + 1] = NF4_LEVELS[(b & 15) as usize];
            }
            let a = f32x8::from(<[f32; 8]>::try_from(&c[..8]).unwrap_or([0.0; 8])) * s;
            let b = f32x8::from(<[f32; 8]>::try_from(&c[8..]).unwrap_or([0.0; 8])) * s;
            o[..8].copy_from_slice(&a.to_array());
            o[8..].copy_from_slice(&b.to_array());
        }
    }
}
