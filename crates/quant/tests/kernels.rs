//! Fused products vs dequantize-then-naive-matmul, SIMD vs scalar, errors, thread-count identity.

use nibble_quant::cpu::available_paths;
use nibble_quant::{Int8Matrix, KernelPath, LowerMatrix, Nf4Matrix, Q4Matrix, QuantError};
use nibble_tensor::{Rng, Tensor, WeightMatrix};

fn naive_t(x: &[f32], m: usize, w: &Tensor) -> Vec<f32> {
    let (o, i) = (w.shape()[0], w.shape()[1]);
    let mut y = vec![0.0f32; m * o];
    for b in 0..m {
        for r in 0..o {
            y[b * o + r] = (0..i)
                .map(|k| x[b * i + k] as f64 * w.data()[r * i + k] as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

fn naive(dy: &[f32], m: usize, w: &Tensor) -> Vec<f32> {
    let (o, i) = (w.shape()[0], w.shape()[1]);
    let mut dx = vec![0.0f32; m * i];
    for b in 0..m {
        for k in 0..i {
            dx[b * i + k] = (0..o)
                .map(|r| dy[b * o + r] as f64 * w.data()[r * i + k] as f64)
                .sum::<f64>() as f32;
        }
    }
    dx
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * scale, "{what}: [{k}] {x} vs {y}");
    }
}

fn check(wm: &dyn WeightMatrix, name: &str) {
    let wd = wm.to_f32();
    let (o, i) = (wm.out_features(), wm.in_features());
    let mut rng = Rng::new(7);
    for m in [1usize, 3, 5, 9, 15, 16, 33, 256] {
        let x = Tensor::randn(&[m, i], &mut rng);
        let mut y = vec![f32::NAN; m * o];
        wm.matmul_t(x.data(), m, &mut y, false).unwrap();
        close(
            &y,
            &naive_t(x.data(), m, &wd),
            &format!("{name} fwd m={m} {o}x{i}"),
        );
        let mut y2 = vec![1.0f32; m * o];
        wm.matmul_t(x.data(), m, &mut y2, true).unwrap();
        let y1: Vec<f32> = y.iter().map(|v| v + 1.0).collect();
        close(&y2, &y1, "accumulate");
        let dy = Tensor::randn(&[m, o], &mut rng);
        let mut dx = vec![f32::NAN; m * i];
        wm.matmul(dy.data(), m, &mut dx, false).unwrap();
        close(
            &dx,
            &naive(dy.data(), m, &wd),
            &format!("{name} bwd m={m} {o}x{i}"),
        );
    }
}

fn weights(o: usize, i: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let mut w = Tensor::randn(&[o, i], &mut rng);
    // zeros, exact ±n, huge / tiny / subnormal scales
    if i >= 64 && o >= 4 {
        w.data_mut()[..64].fill(0.0);
        for k in 0..64 {
            w.data_mut()[i + k] = if k % 2 == 0 { 3.0 } else { -3.0 };
            w.data_mut()[2 * i + k] *= 1e4;
            w.data_mut()[3 * i + k] *= 1e-40;
        }
    }
    w
}

#[test]
fn q4_fused_matches_dequantized() {
    for (o, i) in [(16, 16), (48, 32), (1040, 64), (33, 128), (64, 1024)] {
        let w = weights(o, i, o as u64);
        let q = Q4Matrix::quantize(&w).unwrap();
        check(&q, "q4");
    }
}

#[test]
fn nf4_fused_matches_dequantized() {
    for (o, i) in [(16, 64), (48, 128), (1040, 64), (33, 192)] {
        let w = weights(o, i, o as u64);
        check(&Nf4Matrix::quantize(&w).unwrap(), "nf4");
        check(&Nf4Matrix::quantize_double(&w).unwrap(), "nf4dq");
    }
}

#[test]
fn int8_fused_matches_dequantized() {
    for (o, i) in [(16, 8), (37, 13), (1040, 64), (33, 130), (64, 1024)] {
        let w = weights(o, i, o as u64 + 1);
        check(&Int8Matrix::quantize(&w).unwrap(), "int8");
    }
}

#[test]
fn lower_fused_matches_dequantized() {
    for (o, i) in [(16, 128), (37, 256), (1040, 128), (64, 1024)] {
        let w = weights(o, i, o as u64 + 2);
        check(&LowerMatrix::quantize(&w).unwrap(), "lower");
    }
}

/// The AVX2 lower GEMV gathers 16 codes per step from a 16-byte window and multiplies
/// `code · 2^s` by `x · 2^−s`: random rows of both widths (the last row 3-bit, so its final
/// windows run past the end of the codes), every code value, scales of either sign and x with
/// a wide range must match the dequantized matrix, on 1 and 2 threads alike.
#[test]
fn lower_gemv_gathers_every_code_of_both_widths() {
    use half::f16;
    use nibble_quant::lower::LOWER_GROUP;
    use nibble_quant::Bytes;
    let mut rng = Rng::new(21);
    for (o, i) in [(9, 128), (37, 512), (64, 1024)] {
        let bits: Vec<u8> = (0..o)
            .map(|r| {
                if r == o - 1 || rng.uniform(0.0, 1.0) < 0.5 {
                    3
                } else {
                    4
                }
            })
            .collect();
        let codes: Vec<u8> = (0..bits.iter().map(|&b| i * b as usize / 8).sum::<usize>())
            .map(|_| rng.uniform(0.0, 256.0) as u8)
            .collect();
        let ng = o * i / LOWER_GROUP;
        let f16s = |rng: &mut Rng| -> Vec<f16> {
            (0..ng).map(|_| f16::from_f32(rng.normal() * 0.1)).collect()
        };
        let (scales, mins) = (f16s(&mut rng), f16s(&mut rng));
        let m = LowerMatrix::from_parts(
            o,
            i,
            Bytes::from_vec(bits),
            Bytes::from_vec(codes),
            Bytes::from_f16(scales),
            Bytes::from_f16(mins),
        )
        .unwrap();
        let wd = m.to_f32();
        let mut x = Tensor::randn(&[1, i], &mut rng);
        for (k, v) in x.data_mut().iter_mut().enumerate() {
            *v *= [1.0, 1e3, 1e-3, 7.0][k % 4];
        }
        let want = naive_t(x.data(), 1, &wd);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut y = vec![f32::NAN; o];
            pool.install(|| m.matmul_t(x.data(), 1, &mut y, false).unwrap());
            close(&y, &want, &format!("lower gemv {o}x{i} {threads} threads"));
        }
    }
}

/// A large batch (the GEMM path with several K blocks and thread tiles) for every format.
#[test]
fn batch_1024_fused_matches_dequantized() {
    let (o, i) = (96, 512);
    let w = weights(o, i, 11);
    let mut rng = Rng::new(12);
    let m = 1024;
    let x = Tensor::randn(&[m, i], &mut rng);
    let dy = Tensor::randn(&[m, o], &mut rng);
    let mats: Vec<(&str, Box<dyn WeightMatrix>)> = vec![
        ("q4", Box::new(Q4Matrix::quantize(&w).unwrap())),
        ("nf4", Box::new(Nf4Matrix::quantize(&w).unwrap())),
        ("nf4dq", Box::new(Nf4Matrix::quantize_double(&w).unwrap())),
        ("int8", Box::new(Int8Matrix::quantize(&w).unwrap())),
        ("lower", Box::new(LowerMatrix::quantize(&w).unwrap())),
    ];
    for (name, wm) in &mats {
        let wd = wm.to_f32();
        let mut y = vec![f32::NAN; m * o];
        wm.matmul_t(x.data(), m, &mut y, false).unwrap();
        close(&y, &naive_t(x.data(), m, &wd), &format!("{name} fwd m={m}"));
        let mut dx = vec![f32::NAN; m * i];
        wm.matmul(dy.data(), m, &mut dx, false).unwrap();
        close(&dx, &naive(dy.data(), m, &wd), &format!("{name} bwd m={m}"));
    }
}

fn bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: [{k}] {x} vs {y}");
    }
}

#[test]
fn int8_simd_matches_scalar_on_ragged_lengths() {
    let codes: Vec<u8> = (0..300u32).map(|k| (k * 37 % 256) as u8).collect();
    for n in (0..40).chain([255, 256, 257, 300]) {
        let mut want = vec![f32::NAN; n + 3];
        nibble_quant::int8::dequantize_ref(&codes[..n], 0.0123, -1.5, &mut want[..n]);
        assert!(want[..n].iter().all(|v| v.is_finite()));
        for p in available_paths() {
            let mut got = vec![f32::NAN; n + 3];
            nibble_quant::int8::dequantize(p, &codes[..n], 0.0123, -1.5, &mut got[..n]);
            bits_eq(&got[..n], &want[..n], &format!("int8 {p:?} n={n}"));
            assert!(got[n..].iter().all(|v| v.is_nan()), "wrote past the end");
        }
    }
    let w = weights(37, 77, 4);
    let q = Int8Matrix::quantize(&w).unwrap();
    let d0 = q.dequantize_with(KernelPath::Scalar);
    for p in available_paths() {
        bits_eq(q.dequantize_with(p).data(), d0.data(), "int8 matrix");
    }
}

#[test]
fn lower_simd_matches_scalar_on_ragged_lengths() {
    use half::f16;
    use nibble_quant::lower::{dequantize_row, dequantize_row_ref};
    let inn = 384;
    let scales: Vec<f16> = (0..3)
        .map(|g| f16::from_f32(0.01 + 0.003 * g as f32))
        .collect();
    let mins: Vec<f16> = (0..3)
        .map(|g| f16::from_f32(-0.1 - 0.02 * g as f32))
        .collect();
    for bits in [3u8, 4] {
        let nbytes = inn * bits as usize / 8;
        let codes: Vec<u8> = (0..nbytes as u32).map(|k| (k * 97 + 13) as u8).collect();
        for c0 in [0usize, 1, 5, 8, 120, 128, 250] {
            for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 100, 127, 128, 129, inn - c0] {
                let n = n.min(inn - c0);
                let mut want = vec![f32::NAN; n + 2];
                dequantize_row_ref(bits, &codes, &scales, &mins, c0, &mut want[..n]);
                assert!(want[..n].iter().all(|v| v.is_finite()));
                for p in available_paths() {
                    let mut got = vec![f32::NAN; n + 2];
                    dequantize_row(p, bits, &codes, &scales, &mins, c0, &mut got[..n]);
                    bits_eq(
                        &got[..n],
                        &want[..n],
                        &format!("lower{bits} {p:?} c0={c0} n={n}"),
                    );
                    assert!(got[n..].iter().all(|v| v.is_nan()), "wrote past the end");
                }
            }
        }
        // A short codes buffer: nothing past what the parts cover is written.
        let mut got = vec![f32::NAN; inn];
        dequantize_row(
            KernelPath::Avx2Fma,
            bits,
            &codes[..10],
            &scales,
            &mins,
            0,
            &mut got,
        );
        let covered = 10 * 8 / bits as usize;
        assert!(got[..covered].iter().all(|v| v.is_finite()));
        assert!(got[covered..].iter().all(|v| v.is_nan()));
    }
    let w = weights(37, 256, 4);
    let q = LowerMatrix::quantize(&w).unwrap();
    let d0 = q.dequantize_with(KernelPath::Scalar);
    for p in available_paths() {
        bits_eq(q.dequantize_with(p).data(), d0.data(), "lower matrix");
    }
}

#[test]
fn q4_nf4_row_functions_on_ragged_block_counts() {
    use half::f16;
    let mut rng = Rng::new(9);
    for nb in [1usize, 2, 3, 5, 7, 9, 17] {
        let n = nb * 16;
        let x = Tensor::randn(&[n], &mut rng);
        let mut p0 = vec![0u8; n / 2];
        let mut n0 = vec![f16::ZERO; nb];
        nibble_quant::q4::quantize_row_ref(0, x.data(), &mut p0, &mut n0).unwrap();
        let mut want = vec![f32::NAN; n + 5];
        nibble_quant::q4::dequantize_ref(&p0, &n0, &mut want[..n]);
        for p in available_paths() {
            let mut p1 = vec![0xAAu8; n / 2];
            let mut n1 = vec![f16::NAN; nb];
            nibble_quant::q4::quantize_row(p, 0, x.data(), &mut p1, &mut n1).unwrap();
            assert_eq!(p1, p0, "{p:?} nb={nb}");
            assert_eq!(n1, n0, "{p:?} nb={nb}");
            let mut got = vec![f32::NAN; n + 5];
            nibble_quant::q4::dequantize(p, &p0, &n0, &mut got[..n]);
            bits_eq(&got[..n], &want[..n], &format!("q4 {p:?} nb={nb}"));
            assert!(got[n..].iter().all(|v| v.is_nan()));
        }
        if n % 64 == 0 {
            let mut pk = vec![0u8; n / 2];
            let mut am = vec![0.0f32; n / 64];
            nibble_quant::nf4::quantize_ref(x.data(), &mut pk, &mut am).unwrap();
            for p in available_paths() {
                let mut pk1 = vec![0u8; n / 2];
                let mut am1 = vec![f32::NAN; n / 64];
                nibble_quant::nf4::quantize(p, x.data(), &mut pk1, &mut am1).unwrap();
                assert_eq!((pk1, am1), (pk.clone(), am.clone()), "{p:?}");
            }
        }
    }
}

#[test]
fn every_path_is_bit_identical() {
    for (o, i) in [(16, 64), (48, 128), (35, 1024)] {
        let w = weights(o, i, 3);
        let q0 = Q4Matrix::quantize_with(&w, nibble_quant::KernelPath::Scalar).unwrap();
        let n0 = Nf4Matrix::quantize_with(&w, true, nibble_quant::KernelPath::Scalar).unwrap();
        let d0 = q0.dequantize_with(nibble_quant::KernelPath::Scalar);
        let e0 = n0.dequantize_with(nibble_quant::KernelPath::Scalar);
        for p in available_paths() {
            let q = Q4Matrix::quantize_with(&w, p).unwrap();
            assert_eq!(q, q0, "{p:?}");
            assert_eq!(q.dequantize_with(p), d0, "{p:?}");
            let n = Nf4Matrix::quantize_with(&w, true, p).unwrap();
            assert_eq!(n, n0, "{p:?}");
            assert_eq!(n.dequantize_with(p), e0, "{p:?}");
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let mut w = Tensor::zeros(&[4, 32]);
    w.data_mut()[2 * 32 + 17] = f32::NAN;
    for p in available_paths() {
        match Q4Matrix::quantize_with(&w, p) {
            Err(QuantError::NonFinite {
                row: 2, col: 17, ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
    let mut w = Tensor::zeros(&[4, 64]);
    w.data_mut()[3 * 64 + 5] = f32::INFINITY;
    for p in available_paths() {
        match Nf4Matrix::quantize_with(&w, false, p) {
            Err(QuantError::NonFinite { row: 3, col: 5, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    let mut w = Tensor::zeros(&[2, 32]);
    w.data_mut()[40] = 1e5;
    assert!(matches!(
        Q4Matrix::quantize(&w),
        Err(QuantError::ScaleOverflow { row: 1, col: 0, .. })
    ));
    // A ragged Q4 row: the error names the column of the partial last block.
    let mut w = Tensor::zeros(&[2, 19]);
    w.data_mut()[19 + 17] = f32::NAN;
    for p in available_paths() {
        match Q4Matrix::quantize_with(&w, p) {
            Err(QuantError::NonFinite {
                row: 1, col: 17, ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
    // NF4 blocks straddle rows when in % 64 != 0: the error still names (row, col).
    let mut w = Tensor::zeros(&[3, 30]);
    w.data_mut()[2 * 30 + 29] = f32::NAN;
    for p in available_paths() {
        match Nf4Matrix::quantize_with(&w, true, p) {
            Err(QuantError::NonFinite {
                row: 2, col: 29, ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
    let q = Q4Matrix::quantize(&Tensor::zeros(&[2, 32])).unwrap();
    assert!(q.to_f32().data().iter().all(|&v| v == 0.0));
    let (p, n) = q.parts();
    assert!(matches!(
        Q4Matrix::from_parts(2, 32, p.clone(), nibble_quant::Bytes::from_vec(vec![0; 3])),
        Err(QuantError::PartLength { part: "norm", .. })
    ));
    assert!(Q4Matrix::from_parts(2, 32, p.clone(), n.clone()).is_ok());
    let mut y = vec![0.0; 3];
    assert!(q.matmul_t(&[0.0; 32], 1, &mut y, false).is_err());
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let w = weights(1040, 256, 5);
    let q = Q4Matrix::quantize(&w).unwrap();
    let n = Nf4Matrix::quantize_double(&w).unwrap();
    let l = LowerMatrix::quantize(&w).unwrap();
    let e = Int8Matrix::quantize(&w).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut out = Vec::new();
            // Batch 1 (GEMV), 2..=9 (GEMVs or dequantized tiles), 64 (GEMM).
            for m in [1usize, 2, 5, 9, 64] {
                let x = Tensor::randn(&[m, 256], &mut Rng::new(m as u64));
                for wm in [&q as &dyn WeightMatrix, &n, &l, &e] {
                    let mut y = vec![0.0; m * 1040];
                    wm.matmul_t(x.data(), m, &mut y, false).unwrap();
                    out.push(y);
                }
            }
            out.push(Q4Matrix::quantize(&w).unwrap().to_f32().into_vec());
            // The int8-activation GEMV splits its rows over the pool too.
            let x = Tensor::randn(&[256], &mut Rng::new(9));
            let mut y = vec![f32::NAN; 1040];
            q.gemv_int8(x.data(), &mut y, false).unwrap();
            out.push(y);
            out
        })
    };
    let a = run(1);
    for threads in [2, 3] {
        let b = run(threads);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
    }
}

/// The opt-in int8-activation Q4 GEMV stays within its documented error of the f32 path
/// (each x element moves by at most `max|x| / 254` of its group of 128), on ragged block
/// counts (tails of 1..7 blocks go through the scalar tail), NaN-prefilled outputs and
/// `accumulate`; the AVX2 kernel agrees with the scalar ground truth.
#[test]
fn q4_gemv_int8_error_bound() {
    let mut rng = Rng::new(77);
    for &(out, inn) in &[
        (1, 16),
        (3, 48),
        (5, 128),
        (7, 256),
        (9, 144),
        (8, 1040),
        (17, 1136),
        (64, 1024),
    ] {
        let w = Tensor::randn(&[out, inn], &mut rng);
        let x = Tensor::randn(&[1, inn], &mut rng);
        let q = Q4Matrix::quantize(&w).unwrap();
        let wd = q.to_f32();
        let mut want = vec![0.0f32; out];
        q.matmul_t(x.data(), 1, &mut want, false).unwrap();
        let mut got = vec![f32::NAN; out];
        q.gemv_int8(x.data(), &mut got, false).unwrap();
        for r in 0..out {
            let row = &wd.data()[r * inn..(r + 1) * inn];
            let mut bound = 0.0f32;
            for (k, &wk) in row.iter().enumerate() {
                let p = k / 128 * 128;
                let amax = x.data()[p..(p + 128).min(inn)]
                    .iter()
                    .fold(0.0f32, |a, v| a.max(v.abs()));
                bound += wk.abs() * amax / 254.0;
            }
            let err = (got[r] - want[r]).abs();
            assert!(
                err <= bound * 1.01 + 1e-4,
                "{out}x{inn} row {r}: int8 {} f32 {} err {err} bound {bound}",
                got[r],
                want[r]
            );
        }
        let mut scalar = vec![f32::NAN; out];
        q.gemv_int8_with(KernelPath::Scalar, x.data(), &mut scalar, false)
            .unwrap();
        for r in 0..out {
            let tol = 1e-5 * (1.0 + scalar[r].abs());
            assert!(
                (got[r] - scalar[r]).abs() <= tol,
                "{out}x{inn} row {r}: kernel {} scalar {}",
                got[r],
                scalar[r]
            );
        }
        let mut acc = vec![1.0f32; out];
        q.gemv_int8(x.data(), &mut acc, true).unwrap();
        for r in 0..out {
            assert_eq!(acc[r], 1.0 + got[r], "accumulate {out}x{inn} row {r}");
        }
        assert!(q.gemv_int8(&x.data()[1..], &mut got, false).is_err());
        // A NaN in x is not lost in the int8 rounding: it reaches every output.
        let mut xn = x.data().to_vec();
        xn[inn / 2] = f32::NAN;
        q.gemv_int8(&xn, &mut got, false).unwrap();
        assert!(got.iter().all(|v| v.is_nan()), "{out}x{inn}: NaN x lost");
    }
}

/// Q4 quantization on every path matches the scalar reference byte for byte on blocks that
/// stress the 8-block AVX2 kernel: all-zero blocks (n = 0), zeros inside a block (quotient
/// exactly 7.5, a tie), ±n exactly, subnormals, values at f16's limit, tiny norms that round
/// to 0 in f16, and a NaN, an Inf or an overflowing norm inside an 8-block group (the same
/// error as the reference, naming the same element).
#[test]
fn q4_quantize_adversarial_blocks_match_reference() {
    use half::f16;
    let mut rng = Rng::new(21);
    let nb = 27; // three 8-block groups and a 3-block tail
    let n = nb * 16;
    let mut x = Tensor::randn(&[n], &mut rng).data().to_vec();
    x[16..32].fill(0.0);
    for v in x[32..48].iter_mut().step_by(3) {
        *v = 0.0;
    }
    x[48..64].copy_from_slice(&[
        0.75, -0.75, 0.25, -0.25, 0.5, -0.5, 0.0, 0.75, 0.1, 0.2, 0.3, 0.4, -0.6, 0.7, -0.05, 0.6,
    ]);
    for (i, v) in x[64..80].iter_mut().enumerate() {
        *v = (i as f32 - 7.0) * 1e-40;
    }
    for v in &mut x[80..96] {
        *v *= 20000.0;
    }
    x[80] = 65504.0;
    x[96..112].iter_mut().for_each(|v| *v *= 1e-9);
    x[400] = -0.0;
    let check = |x: &[f32]| {
        let mut p0 = vec![0u8; n / 2];
        let mut n0 = vec![f16::ZERO; nb];
        let want = nibble_quant::q4::quantize_row_ref(3, x, &mut p0, &mut n0);
        for p in available_paths() {
            let mut p1 = vec![0xAAu8; n / 2];
            let mut n1 = vec![f16::NAN; nb];
            let got = nibble_quant::q4::quantize_row(p, 3, x, &mut p1, &mut n1);
            match (&want, &got) {
                (Ok(()), Ok(())) => {
                    assert_eq!(p1, p0, "{p:?}: codes");
                    assert_eq!(
                        n1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        n0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{p:?}: norms"
                    );
                }
                (Err(a), Err(b)) => assert_eq!(format!("{a}"), format!("{b}"), "{p:?}"),
                _ => panic!("{p:?}: reference {want:?}, path {got:?}"),
            }
        }
        want
    };
    assert!(check(&x).is_ok());
    for (at, bad) in [
        (37, f32::NAN),
        (130, f32::INFINITY),
        (131, f32::NEG_INFINITY),
        (200, 70000.0),
        (200, 65520.0),
        (201, -65520.0),
    ] {
        let mut y = x.clone();
        y[at] = bad;
        assert!(check(&y).is_err(), "{bad} at {at} must be an error");
    }
    // Below f16's rounding to infinity (65520) a norm is stored, as the reference's
    // `.to(torch.float16)` stores it: 65519 as 65504 (it was refused above 65504).
    for v in [65505.0f32, 65519.0, -65519.996] {
        let mut y = x.clone();
        y[200] = v;
        assert!(check(&y).is_ok(), "{v} must be stored");
    }
}

/// Matrices with no rows or no columns quantize (or refuse with an error) and multiply without
/// panicking, on every batch path: GEMV, per-vector GEMVs, tiles and the GEMM.
#[test]
fn empty_matrices_multiply() {
    for (o, i) in [(5usize, 0usize), (0, 128)] {
        let w = Tensor::zeros(&[o, i]);
        let mats: Vec<Box<dyn WeightMatrix>> = vec![
            Box::new(Q4Matrix::quantize(&w).unwrap()),
            Box::new(Nf4Matrix::quantize(&w).unwrap()),
            Box::new(Nf4Matrix::quantize_double(&w).unwrap()),
            Box::new(LowerMatrix::quantize(&w).unwrap()),
            Box::new(Int8Matrix::quantize(&w).unwrap()),
        ];
        for wm in &mats {
            assert_eq!((wm.out_features(), wm.in_features()), (o, i));
            for m in [1usize, 3, 5, 60] {
                let x = vec![1.0f32; m * i];
                let mut y = vec![f32::NAN; m * o];
                wm.matmul_t(&x, m, &mut y, false).unwrap();
                assert!(
                    y.iter().all(|&v| v == 0.0),
                    "{} {o}x{i} m={m}",
                    wm.format_name()
                );
                let dy = vec![1.0f32; m * o];
                let mut dx = vec![f32::NAN; m * i];
                wm.matmul(&dy, m, &mut dx, false).unwrap();
                assert!(
                    dx.iter().all(|&v| v == 0.0),
                    "{} bwd {o}x{i}",
                    wm.format_name()
                );
            }
        }
    }
}

/// `matmul_t_fused` (bias, the product, a low-rank extra and a ReLU in one GEMM pass where the
/// format's forward runs through the GEMM) gives the bits of the parts run one by one: bias
/// rows, then `matmul_t` accumulating, then the extra accumulated, then `relu_in_place`; at
/// batches on both sides of each format's GEMM threshold, on every format, f16 and f32 biases.
#[test]
fn fused_forward_equals_the_parts() {
    use nibble_tensor::gemm::{gemm, MatRef, PackB, Segment};
    use nibble_tensor::ops::PostOp;
    let (o, i, r) = (40, 70, 5);
    let w = weights(o, i, 31);
    let mut rng = Rng::new(32);
    let bias: Vec<f32> = (0..o).map(|_| rng.normal()).collect();
    let bias16: Vec<half::f16> = bias.iter().map(|&v| half::f16::from_f32(v)).collect();
    let lora_b: Vec<f32> = (0..o * r).map(|_| rng.normal()).collect();
    let b_t = MatRef::row_major(&lora_b, o, r).unwrap().t();
    for wm in [
        Box::new(Q4Matrix::quantize(&w).unwrap()) as Box<dyn WeightMatrix>,
        Box::new(Nf4Matrix::quantize(&w).unwrap()),
        Box::new(Nf4Matrix::quantize_double(&w).unwrap()),
        Box::new(LowerMatrix::quantize(&w).unwrap()),
        Box::new(Int8Matrix::quantize(&w).unwrap()),
    ] {
        for m in [1, 3, 16, 17, 47, 48, 49, 130] {
            let x: Vec<f32> = (0..m * i).map(|_| rng.normal()).collect();
            let h: Vec<f32> = (0..m * r).map(|_| rng.normal()).collect();
            let b32 = MatRef::row_major(&bias, 1, o).unwrap();
            let b16 = MatRef::row_major(&bias16, 1, o).unwrap();
            for (bias_op, bias_vals) in [
                (&b32 as &dyn PackB, bias.clone()),
                (
                    &b16 as &dyn PackB,
                    bias16.iter().map(|v| v.to_f32()).collect(),
                ),
            ] {
                for (post, with_extra) in [
                    (PostOp::Identity, true),
                    (PostOp::Relu, true),
                    (PostOp::Relu, false),
                ] {
                    let mut want = vec![f32::NAN; m * o];
                    nibble_tensor::ops::fill_rows(&mut want, &bias_vals).unwrap();
                    wm.matmul_t(&x, m, &mut want, true).unwrap();
                    if with_extra {
                        gemm(MatRef::row_major(&h, m, r).unwrap(), &b_t, &mut want, true).unwrap();
                    }
                    if post == PostOp::Relu {
                        nibble_tensor::ops::relu_in_place(&mut want);
                    }
                    let mut got = vec![f32::NAN; m * o];
                    let extra = with_extra.then(|| Segment {
                        a: MatRef::row_major(&h, m, r).unwrap(),
                        b: &b_t,
                    });
                    wm.matmul_t_fused(&x, m, &mut got, Some(bias_op), extra, post)
                        .unwrap();
                    let name = wm.format_name();
                    bits_eq(
                        &got,
                        &want,
                        &format!("{name} m={m} fused, {post:?} {with_extra}"),
                    );
                }
            }
        }
    }
}

/// With f32 activations on the AVX-512 path, small batches of NF4 (plain and double-quantized,
/// below 6 vectors) and Q4 (2 vectors; the tiles from 3) go through their GEMVs' batch kernels:
/// every vector gives the bits it gives alone (batch 1), at 1 and 3 threads, outputs pre-filled
/// with NaN, on widths of one block of 64, an odd count of blocks and 1024, row counts around
/// the tasks' tiles of 64. Prints a line and checks nothing else where the CPU lacks the
/// AVX-512 tier.
#[test]
fn f32_small_batches_give_their_vectors_bits() {
    if nibble_quant::cpu::kernel_path() != KernelPath::Avx512 {
        println!("f32 small batches: no AVX-512 tier on this path: the batch kernels are not run");
        return;
    }
    for (o, i) in [(70, 64), (17, 320), (130, 1024)] {
        let w = weights(o, i, 53);
        let mats: [(Box<dyn WeightMatrix>, &[usize]); 3] = [
            (Box::new(Nf4Matrix::quantize(&w).unwrap()), &[2, 3, 5]),
            (
                Box::new(Nf4Matrix::quantize_double(&w).unwrap()),
                &[2, 3, 5],
            ),
            (Box::new(Q4Matrix::quantize(&w).unwrap()), &[2]),
        ];
        for (q, batches) in &mats {
            for &m in *batches {
                let mut rng = Rng::new(m as u64);
                let x: Vec<f32> = (0..m * i).map(|_| rng.normal()).collect();
                let mut one_by_one = vec![f32::NAN; m * o];
                for (xb, yb) in x.chunks(i).zip(one_by_one.chunks_mut(o)) {
                    q.matmul_t(xb, 1, yb, false).unwrap();
                }
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut batch = vec![f32::NAN; m * o];
                    pool.install(|| q.matmul_t(&x, m, &mut batch, false))
                        .unwrap();
                    let name = q.format_name();
                    bits_eq(
                        &batch,
                        &one_by_one,
                        &format!("{name} {o}x{i} m {m}, {threads} threads"),
                    );
                }
            }
        }
    }
}
