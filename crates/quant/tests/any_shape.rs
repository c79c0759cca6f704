//! Every format on any `[out, in]` shape (issue 15, item 2): a partial last block / group, NF4
//! blocks straddling rows, odd `in`, empty matrices. Each format's quantized parts and
//! dequantized weights are checked bit-exactly against an independent scalar statement of its
//! rule (written here from the module docs), on every kernel path; the products (batch 1, 5
//! and 48, forward and backward) against an f64 product with the dequantized weights on every
//! kernel path the CPU has (one child process per path, `NIBBLE_KERNEL` set), with NaN-filled
//! outputs and bit-identical results on 1, 2 and 3 threads.

#![allow(clippy::manual_is_multiple_of)]

mod common;

use common::{
    bits_eq, close_to, formats, naive_t, products_checked_on_threads, run_on_every_kernel_path,
};
use half::f16;
use nibble_quant::act8::{with_activations, ActivationMode};
use nibble_quant::cpu::available_paths;
use nibble_quant::nf4::{dynamic_code_bnb, dynamic_map, NF4_LEVELS, NF4_THRESHOLDS};
use nibble_quant::{Bytes, Int8Matrix, KernelPath, LowerMatrix, Nf4Matrix, Q4Matrix, QuantError};
use nibble_tensor::{Rng, Tensor, WeightMatrix};

const OUTS: [usize; 3] = [1, 3, 17];
const INS: [usize; 12] = [0, 1, 7, 15, 17, 30, 31, 33, 63, 65, 129, 784];

/// Every shape of the issue, plus two whose NF4 block count passes one double-quantization
/// group of 256 (a partial last group of scales).
fn shapes() -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = OUTS
        .iter()
        .flat_map(|&o| INS.iter().map(move |&i| (o, i)))
        .collect();
    v.extend([(129, 129), (5, 3333)]);
    v
}

/// N(0, 1) weights with an all-zero stretch, a lone outlier and a tiny stretch where they fit.
fn weights(o: usize, i: usize, seed: u64) -> Tensor {
    let mut w = Tensor::randn(&[o, i], &mut Rng::new(seed));
    let d = w.data_mut();
    let n = d.len();
    if n >= 100 {
        d[3..40].fill(0.0);
        d[n / 2] = 40.0;
        for v in &mut d[n - 20..] {
            *v *= 1e-30;
        }
    }
    w
}

fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|h| h.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|h| h.to_le_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// Independent scalar statements of each format's rule.

/// Q4: blocks of 16 along each row, the last partial; `(packed, norm, dequantized)`.
fn q4_reference(w: &Tensor) -> (Vec<u8>, Vec<f16>, Vec<f32>) {
    let (o, i) = (w.shape()[0], w.shape()[1]);
    let (rb, nb) = (i.div_ceil(2), i.div_ceil(16));
    let mut packed = vec![0u8; o * rb];
    let mut norm = vec![f16::ZERO; o * nb];
    let mut deq = vec![0.0f32; o * i];
    for r in 0..o {
        let row = &w.data()[r * i..(r + 1) * i];
        for (b, blk) in row.chunks(16).enumerate() {
            let n = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let nh = f16::from_f32(n);
            norm[r * nb + b] = nh;
            for (e, &v) in blk.iter().enumerate() {
                let k = b * 16 + e;
                let code = if n == 0.0 {
                    0u8
                } else {
                    ((v + n) / (n + n) * 15.0).round_ties_even() as u8
                };
                packed[r * rb + k / 2] |= code << (4 * (k % 2));
                let nf = nh.to_f32();
                deq[r * i + k] = ((code as f32 / 15.0) * 2.0) * nf - nf;
            }
        }
    }
    (packed, norm, deq)
}

/// bitsandbytes' NF4 (CPU `quantize_4bit`): blocks of 64 over the flattened weight, whole
/// blocks normalized by `v · (1/max(absmax, 1e-38))`, the partial last one by
/// `v / max(absmax, 1e-38)` (that clamped absmax stored); codes by bucketizing against the
/// midpoints; an odd count padded with the code of 0. `(packed, absmax)`.
fn nf4_reference(w: &Tensor) -> (Vec<u8>, Vec<f32>) {
    let x = w.data();
    let n = x.len();
    // torch.bucketize(v, midpoints): the number of f32 midpoints of adjacent levels below v.
    let mids: Vec<f32> = NF4_LEVELS.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect();
    let code = |v: f32| mids.iter().filter(|&&t| t < v.clamp(-1.0, 1.0)).count() as u8;
    let mut codes = Vec::with_capacity(n + 1);
    let mut absmax = Vec::new();
    for blk in x.chunks(64) {
        let am = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        if blk.len() == 64 {
            absmax.push(am);
            let inv = 1.0 / am.max(1e-38);
            codes.extend(blk.iter().map(|&v| code(v * inv)));
        } else {
            let am = am.max(1e-38);
            absmax.push(am);
            codes.extend(blk.iter().map(|&v| code(v / am)));
        }
    }
    if n % 2 == 1 {
        codes.push(code(0.0));
    }
    let packed = codes.chunks(2).map(|c| (c[0] << 4) | c[1]).collect();
    (packed, absmax)
}

/// bitsandbytes' nested quantization of the absmaxes (blocks of 256, the last partial):
/// `(codes, offset, scales)`.
fn nf4_double_reference(absmax: &[f32], offset: f32) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::new();
    let mut scales = Vec::new();
    for grp in absmax.chunks(256) {
        let a: Vec<f32> = grp.iter().map(|v| v - offset).collect();
        let s = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        scales.push(s);
        codes.extend(a.iter().map(|&v| {
            if s == 0.0 {
                0
            } else {
                dynamic_code_bnb(v * (1.0 / s))
            }
        }));
    }
    (codes, scales)
}

/// NF4 dequantized from the flat parts: `level[code] · scale(block)`.
fn nf4_dequant_reference(n: usize, packed: &[u8], scale: impl Fn(usize) -> f32) -> Vec<f32> {
    (0..n)
        .map(|e| {
            let b = packed[e / 2];
            let c = if e % 2 == 0 { b >> 4 } else { b & 15 };
            NF4_LEVELS[c as usize] * scale(e / 64)
        })
        .collect()
}

/// Lower: reads the parts by the documented layout (rows of `ceil(bits·in/8)` bytes, code `j`
/// at bits `bits·j..`, zero padding bits; groups of 128, the last partial) and checks every
/// code is the encoding rule's code of its weight; returns the dequantized weights.
fn lower_reference(w: &Tensor, q: &LowerMatrix) -> Vec<f32> {
    let (o, i) = (w.shape()[0], w.shape()[1]);
    let (bits, codes, scales, mins) = q.parts();
    let (bits, codes) = (bits.as_slice(), codes.as_slice());
    let halves = |b: &Bytes| -> Vec<f16> {
        b.as_slice()
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    let (scales, mins) = (halves(scales), halves(mins));
    let ng = i.div_ceil(128);
    assert_eq!(scales.len(), o * ng);
    assert_eq!(mins.len(), o * ng);
    let mut off = 0;
    let mut deq = vec![0.0f32; o * i];
    for r in 0..o {
        let b = bits[r] as usize;
        assert!(b == 3 || b == 4);
        let nbytes = (b * i).div_ceil(8);
        let row = &codes[off..off + nbytes];
        off += nbytes;
        let stream = |bit: usize| (row[bit / 8] >> (bit % 8)) & 1;
        for k in 0..i {
            let c = (0..b).fold(0u32, |a, t| a | (u32::from(stream(b * k + t)) << t));
            let (s, m) = (
                scales[r * ng + k / 128].to_f32(),
                mins[r * ng + k / 128].to_f32(),
            );
            let qmax = ((1u32 << b) - 1) as f32;
            let v = w.data()[r * i + k];
            let want = if s > 0.0 {
                ((v - m) / s).round().clamp(0.0, qmax) as u32
            } else {
                0
            };
            assert_eq!(c, want, "lower {o}x{i} code ({r}, {k})");
            deq[r * i + k] = m + s * c as f32;
        }
        for bit in b * i..8 * nbytes {
            assert_eq!(stream(bit), 0, "lower {o}x{i} row {r}: padding bit {bit}");
        }
    }
    assert_eq!(off, codes.len(), "lower {o}x{i}: code bytes");
    deq
}

/// Int8: per-row affine codes; `(codes, scales, zeros, dequantized)`.
fn int8_reference(w: &Tensor) -> (Vec<u8>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (o, i) = (w.shape()[0], w.shape()[1]);
    let (mut codes, mut scales, mut zeros, mut deq) = (vec![], vec![0.0; o], vec![0.0; o], vec![]);
    for r in 0..o {
        let row = &w.data()[r * i..(r + 1) * i];
        let lo = row.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let hi = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if i > 0 {
            scales[r] = (hi - lo) / 255.0;
            zeros[r] = lo;
        }
        let s = scales[r];
        for &v in row {
            let c = if s > 0.0 {
                ((v - lo) / s).round().clamp(0.0, 255.0) as u8
            } else {
                0
            };
            codes.push(c);
            deq.push(zeros[r] + s * c as f32);
        }
    }
    (codes, scales, zeros, deq)
}

// ---------------------------------------------------------------------------------------------
// Quantize + dequantize, bit-exact, on every path.

#[test]
fn q4_any_shape_matches_reference() {
    for (o, i) in shapes() {
        let w = weights(o, i, (o * 1000 + i) as u64);
        let (packed, norm, deq) = q4_reference(&w);
        for p in available_paths() {
            let q = Q4Matrix::quantize_with(&w, p).unwrap();
            assert_eq!(q.packed_bytes(), &packed[..], "q4 {o}x{i} packed {p:?}");
            assert_eq!(
                q.norm_bytes(),
                &f16_bytes(&norm)[..],
                "q4 {o}x{i} norm {p:?}"
            );
            bits_eq(
                q.dequantize_with(p).data(),
                &deq,
                &format!("q4 {o}x{i} {p:?}"),
            );
        }
        let q = Q4Matrix::from_parts(
            o,
            i,
            Bytes::from_vec(packed.clone()),
            Bytes::from_vec(f16_bytes(&norm)),
        )
        .unwrap();
        bits_eq(q.to_f32().data(), &deq, "q4 from_parts");
    }
}

#[test]
fn nf4_any_shape_matches_bitsandbytes_rule() {
    for (o, i) in shapes() {
        let w = weights(o, i, (o * 1000 + i) as u64 + 1);
        let n = o * i;
        let (packed, absmax) = nf4_reference(&w);
        assert_eq!(packed.len(), n.div_ceil(2));
        assert_eq!(absmax.len(), n.div_ceil(64));
        let deq = nf4_dequant_reference(n, &packed, |b| absmax[b]);
        // Double quantization, with the crate's offset (a mean; bitsandbytes' own summation
        // order is not restated here).
        let dq = Nf4Matrix::quantize_with(&w, true, KernelPath::Scalar).unwrap();
        let offset = dq.absmax_offset().unwrap();
        let (dcodes, dscales) = nf4_double_reference(&absmax, offset);
        let map = dynamic_map();
        let ddeq = nf4_dequant_reference(n, &packed, |b| {
            map[dcodes[b] as usize] * dscales[b / 256] + offset
        });
        for p in available_paths() {
            let q = Nf4Matrix::quantize_with(&w, false, p).unwrap();
            assert_eq!(q.packed_bytes(), &packed[..], "nf4 {o}x{i} packed {p:?}");
            assert_eq!(
                q.absmax_bytes().unwrap(),
                &f32_bytes(&absmax)[..],
                "nf4 {o}x{i} {p:?}"
            );
            bits_eq(
                q.dequantize_with(p).data(),
                &deq,
                &format!("nf4 {o}x{i} {p:?}"),
            );
            let d = Nf4Matrix::quantize_with(&w, true, p).unwrap();
            assert_eq!(d.packed_bytes(), &packed[..], "nf4dq {o}x{i} packed {p:?}");
            assert_eq!(
                d.absmax_codes_bytes().unwrap(),
                &dcodes[..],
                "nf4dq {o}x{i} {p:?}"
            );
            assert_eq!(
                d.absmax_scale_bytes().unwrap(),
                &f32_bytes(&dscales)[..],
                "nf4dq {o}x{i} scales {p:?}"
            );
            bits_eq(
                d.dequantize_with(p).data(),
                &ddeq,
                &format!("nf4dq {o}x{i} {p:?}"),
            );
        }
        let q = Nf4Matrix::from_parts(
            o,
            i,
            Bytes::from_vec(packed.clone()),
            Bytes::from_vec(f32_bytes(&absmax)),
        )
        .unwrap();
        bits_eq(q.to_f32().data(), &deq, "nf4 from_parts");
        let d = Nf4Matrix::from_parts_double(
            o,
            i,
            Bytes::from_vec(packed.clone()),
            Bytes::from_vec(dcodes.clone()),
            Bytes::from_vec(offset.to_le_bytes().to_vec()),
            Bytes::from_vec(f32_bytes(&dscales)),
        )
        .unwrap();
        bits_eq(d.to_f32().data(), &ddeq, "nf4dq from_parts");
    }
}

/// The thresholds are bitsandbytes' f32 midpoints, and a weight whose normalized value lies
/// exactly on one takes the lower code (`torch.bucketize`), on every path.
#[test]
fn nf4_midpoint_ties_take_the_lower_code() {
    for (k, t) in NF4_THRESHOLDS.iter().enumerate() {
        assert_eq!(
            t.to_bits(),
            ((NF4_LEVELS[k] + NF4_LEVELS[k + 1]) / 2.0).to_bits()
        );
    }
    // One block of 64: absmax 1 (so v · (1/1) = v), then each midpoint and the next f32 above.
    let mut x = vec![0.0f32; 64];
    x[0] = 1.0;
    let up = |t: f32| {
        if t > 0.0 {
            f32::from_bits(t.to_bits() + 1)
        } else {
            f32::from_bits(t.to_bits() - 1)
        }
    };
    for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
        x[1 + 2 * k] = t;
        x[2 + 2 * k] = up(t);
    }
    let w = Tensor::from_vec(&[1, 64], x).unwrap();
    let (packed, _) = nf4_reference(&w);
    for p in available_paths() {
        let q = Nf4Matrix::quantize_with(&w, false, p).unwrap();
        assert_eq!(q.packed_bytes(), &packed[..], "{p:?}");
    }
    let code = |e: usize| {
        if e % 2 == 0 {
            packed[e / 2] >> 4
        } else {
            packed[e / 2] & 15
        }
    };
    for k in 0..15 {
        assert_eq!(
            (code(1 + 2 * k), code(2 + 2 * k)),
            (k as u8, k as u8 + 1),
            "midpoint {k}"
        );
    }
}

#[test]
fn lower_any_shape_matches_layout_and_rule() {
    for (o, i) in shapes() {
        let w = weights(o, i, (o * 1000 + i) as u64 + 2);
        let q = LowerMatrix::quantize(&w).unwrap();
        let deq = lower_reference(&w, &q);
        for p in available_paths() {
            bits_eq(
                q.dequantize_with(p).data(),
                &deq,
                &format!("lower {o}x{i} {p:?}"),
            );
        }
        // The budget holds whenever the all-3-bit size fits in it.
        let all3 = o + o * ((3 * i).div_ceil(8) + 4 * i.div_ceil(128));
        let budget = (3.9 * (o * i) as f64 / 8.0) as usize;
        let bytes = q.storage_bytes();
        assert!(
            bytes <= budget.max(all3),
            "lower {o}x{i}: {bytes} > {budget}"
        );
        let (b, c, s, m) = q.parts();
        let q2 = LowerMatrix::from_parts(o, i, b.clone(), c.clone(), s.clone(), m.clone()).unwrap();
        bits_eq(q2.to_f32().data(), &deq, "lower from_parts");
    }
}

#[test]
fn lower_budget_gives_narrow_matrices_some_4bit_rows() {
    // 17 x 784 at 3.9 bits: ~6.5 KB, room for about 10 of the 17 rows at 4 bits.
    let w = weights(17, 784, 3);
    let q = LowerMatrix::quantize(&w).unwrap();
    assert!((1..17).contains(&q.rows_4bit()), "{}", q.rows_4bit());
    // A generous budget makes every row 4-bit, on any width.
    for i in [1usize, 7, 30, 129] {
        let q = LowerMatrix::quantize_bits(&weights(3, i, 4), 64.0).unwrap();
        assert_eq!(q.rows_4bit(), 3, "in = {i}");
        let q = LowerMatrix::quantize_bits(&weights(3, i, 4), 3.0).unwrap();
        assert_eq!(q.rows_4bit(), 0, "in = {i}");
    }
}

#[test]
fn int8_any_shape_matches_reference() {
    for (o, i) in shapes() {
        let w = weights(o, i, (o * 1000 + i) as u64 + 3);
        let (codes, scales, zeros, deq) = int8_reference(&w);
        let q = Int8Matrix::quantize(&w).unwrap();
        let (c, s, z) = q.parts();
        assert_eq!(c.as_slice(), &codes[..], "int8 {o}x{i} codes");
        assert_eq!(s.as_slice(), &f32_bytes(&scales)[..], "int8 {o}x{i} scales");
        assert_eq!(z.as_slice(), &f32_bytes(&zeros)[..], "int8 {o}x{i} zeros");
        for p in available_paths() {
            bits_eq(
                q.dequantize_with(p).data(),
                &deq,
                &format!("int8 {o}x{i} {p:?}"),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// from_parts on ragged shapes: lying sizes are errors, never panics.

#[test]
fn from_parts_checks_ragged_part_lengths() {
    let v = |n: usize| Bytes::from_vec(vec![0u8; n]);
    // Q4 3 x 30: packed 3·15, norm 3·2 f16.
    assert!(Q4Matrix::from_parts(3, 30, v(45), v(12)).is_ok());
    assert!(matches!(
        Q4Matrix::from_parts(3, 30, v(44), v(12)),
        Err(QuantError::PartLength {
            part: "packed",
            expected: 45,
            ..
        })
    ));
    assert!(matches!(
        Q4Matrix::from_parts(3, 31, v(48), v(10)),
        Err(QuantError::PartLength {
            part: "norm",
            expected: 12,
            ..
        })
    ));
    assert!(Q4Matrix::from_parts(usize::MAX, 3, v(0), v(0)).is_err());
    assert!(Q4Matrix::from_parts(3, usize::MAX, v(0), v(0)).is_err());
    // NF4 3 x 7 = 21 weights: packed 11 bytes, one absmax.
    assert!(Nf4Matrix::from_parts(3, 7, v(11), v(4)).is_ok());
    assert!(matches!(
        Nf4Matrix::from_parts(3, 7, v(10), v(4)),
        Err(QuantError::PartLength {
            part: "packed",
            expected: 11,
            ..
        })
    ));
    assert!(matches!(
        Nf4Matrix::from_parts(17, 30, v(255), v(28)),
        Err(QuantError::PartLength {
            part: "absmax",
            expected: 32,
            ..
        })
    ));
    // 17 x 784 = 13328 weights: 209 blocks, one scale group.
    assert!(Nf4Matrix::from_parts_double(17, 784, v(6664), v(209), v(4), v(4)).is_ok());
    assert!(matches!(
        Nf4Matrix::from_parts_double(129, 129, v(8321), v(261), v(4), v(4)),
        Err(QuantError::PartLength {
            part: "absmax_scale",
            expected: 8,
            ..
        })
    ));
    assert!(Nf4Matrix::from_parts(usize::MAX, 2, v(0), v(0)).is_err());
    assert!(Nf4Matrix::from_parts(1, usize::MAX, v(0), v(0)).is_err());
    // Lower 2 x 30, rows 3 and 4 bits: codes 12 + 15 bytes, one group per row.
    let bits = || Bytes::from_vec(vec![3, 4]);
    assert!(LowerMatrix::from_parts(2, 30, bits(), v(27), v(4), v(4)).is_ok());
    assert!(matches!(
        LowerMatrix::from_parts(2, 30, bits(), v(26), v(4), v(4)),
        Err(QuantError::PartLength {
            part: "codes",
            expected: 27,
            ..
        })
    ));
    assert!(matches!(
        LowerMatrix::from_parts(2, 129, bits(), v(114), v(4), v(8)),
        Err(QuantError::PartLength {
            part: "scales",
            expected: 8,
            ..
        })
    ));
    assert!(LowerMatrix::from_parts(2, usize::MAX, bits(), v(0), v(0), v(0)).is_err());
    assert!(LowerMatrix::from_parts(2, usize::MAX / 3, bits(), v(0), v(0), v(0)).is_err());
    // Int8 lying sizes.
    assert!(Int8Matrix::from_parts(usize::MAX, 0, v(0), v(0), v(0)).is_err());
    assert!(Int8Matrix::from_parts(3, 7, v(21), v(12), v(12)).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Products on every kernel path.

/// Runs on the process's kernel path (`NIBBLE_KERNEL`): every product of every format and
/// shape at batches 1, 5 and 48, forward and backward, against the f64 product with its
/// dequantized weights, and bit-identical on 1, 2 and 3 threads. [`products_on_every_kernel_path`]
/// runs it in one child process per path the CPU has; in the test process itself it does
/// nothing (there another test switches Q4's activation mode, which the products read).
#[test]
fn products_on_this_kernel_path() {
    if std::env::var_os("NIBBLE_ANY_SHAPE_CHILD").is_none() {
        return;
    }
    let path = nibble_quant::cpu::kernel_path();
    for (o, i) in shapes() {
        let w = weights(o, i, (o * 7 + i) as u64);
        for wm in formats(&w) {
            let what = format!("{} {path:?}", wm.format_name());
            let seed = (o * 31 + i) as u64;
            products_checked_on_threads(wm.as_ref(), seed, &[1, 5, 48], &[2, 3], &what);
        }
    }
}

/// Q4's int8-activation path on ragged shapes: within its documented error bound of the f32
/// product, the AVX2 kernel agreeing with the scalar ground truth, and the batch forward under
/// `ActivationMode::Int8` giving the same as `gemv_int8`.
#[test]
fn q4_int8_activations_on_any_shape() {
    for (o, i) in shapes() {
        let w = weights(o, i, (o * 11 + i) as u64);
        let q = Q4Matrix::quantize(&w).unwrap();
        let wd = q.to_f32();
        let x = Tensor::randn(&[i], &mut Rng::new(i as u64 + 5));
        let (exact, mag) = naive_t(x.data(), 1, wd.data(), o, i);
        let ys: Vec<Vec<f32>> = available_paths()
            .into_iter()
            .map(|p| {
                let mut y = vec![f32::NAN; o];
                q.gemv_int8_with(p, x.data(), &mut y, false).unwrap();
                for r in 0..o {
                    // Σ_k |w'_k| · max|x|_group(k) / 254, plus f32 rounding.
                    let bound: f32 = (0..i)
                        .map(|k| {
                            let g = k / 128;
                            let gmax = x.data()[g * 128..((g + 1) * 128).min(i)]
                                .iter()
                                .fold(0.0f32, |a, v| a.max(v.abs()));
                            wd.data()[r * i + k].abs() * gmax / 254.0
                        })
                        .sum();
                    let err = (y[r] - exact[r]).abs();
                    assert!(
                        err <= bound * 1.01 + 1e-4,
                        "q4 int8 {o}x{i} {p:?} row {r}: {err} > {bound}"
                    );
                }
                y
            })
            .collect();
        // The paths differ only in the f32 summation order of the block terms.
        for y in &ys[1..] {
            close_to(
                y,
                &(ys[0].clone(), mag.clone()),
                &format!("q4 int8 {o}x{i} paths"),
            );
        }
    }
    let w = weights(17, 30, 1);
    let q = Q4Matrix::quantize(&w).unwrap();
    let x = Tensor::randn(&[3, 30], &mut Rng::new(2));
    let mut y = vec![f32::NAN; 3 * 17];
    with_activations(ActivationMode::Int8, || {
        q.matmul_t(x.data(), 3, &mut y, false)
    })
    .unwrap();
    for b in 0..3 {
        let mut y1 = vec![f32::NAN; 17];
        q.gemv_int8(&x.data()[b * 30..(b + 1) * 30], &mut y1, false)
            .unwrap();
        bits_eq(&y[b * 17..(b + 1) * 17], &y1, "q4 int8 batch vs gemv_int8");
    }
}

/// Runs [`products_on_this_kernel_path`] in a child process for each kernel path this CPU
/// has (`NIBBLE_KERNEL` is read once per process), and says which it skips.
#[test]
fn products_on_every_kernel_path() {
    if std::env::var_os("NIBBLE_ANY_SHAPE_CHILD").is_some() {
        return;
    }
    run_on_every_kernel_path(
        "products_on_this_kernel_path",
        "NIBBLE_ANY_SHAPE_CHILD",
        "products_on_every_kernel_path",
    );
}
