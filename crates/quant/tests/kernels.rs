//! Fused products vs dequantize-then-naive-matmul, SIMD vs scalar, errors, thread-count identity.

use nibble_quant::cpu::available_paths;
use nibble_quant::{Nf4Matrix, Q4Matrix, QuantError};
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
    for m in [1usize, 3, 16, 33] {
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
    assert!(matches!(
        Q4Matrix::quantize(&Tensor::zeros(&[2, 24])),
        Err(QuantError::Shape { .. })
    ));
    assert!(matches!(
        Nf4Matrix::quantize(&Tensor::zeros(&[2, 32])),
        Err(QuantError::Shape { .. })
    ));
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
    let mut rng = Rng::new(1);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut out = Vec::new();
            for m in [1usize, 5, 40] {
                let x = Tensor::randn(&[m, 256], &mut Rng::new(m as u64));
                for wm in [&q as &dyn WeightMatrix, &n] {
                    let mut y = vec![0.0; m * 1040];
                    wm.matmul_t(x.data(), m, &mut y, false).unwrap();
                    out.push(y);
                }
            }
            out.push(Q4Matrix::quantize(&w).unwrap().to_f32().into_vec());
            out
        })
    };
    let _ = &mut rng;
    let a = run(1);
    let b = run(2);
    for (x, y) in a.iter().zip(&b) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
