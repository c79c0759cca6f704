//! The GEMM driver's column-slice switches (`NIBBLE_GEMM_SLICES=1` with a stage of all of K,
//! `NIBBLE_GEMM_STAGE_FLOATS`): read once per process, so this file holds one test, which sets
//! them before its first product. With them, a parallel product of 192 rows or more whose B is
//! packed per call takes the held grid with its tasks ordered by column slice; every element of
//! C must still be written once (C starts as NaN), with the bits of one thread (which never
//! slices), and near an f64 reference.

mod common;
use common::{bits, in_pool};

use nibble_tensor::gemm::{gemm, gemm_segments_bias_post, MatRef, Segment};
use nibble_tensor::ops::PostOp;
use nibble_tensor::Rng;

fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect()
}

#[test]
fn column_slices_give_the_bits_of_one_thread() {
    // The only test of this binary: nothing has read the switches yet.
    std::env::set_var("NIBBLE_GEMM_SLICES", "1");
    std::env::set_var("NIBBLE_GEMM_STAGE_FLOATS", "1048576");
    let mut rng = Rng::new(7);
    let mut cases = 0;
    for &(m, n, k) in &[
        (192, 129, 300),
        (257, 300, 513),
        (200, 17, 1023),
        (1000, 33, 63),
        (193, 1023, 7),
    ] {
        let a = random(m * k, &mut rng);
        let b = random(k * n, &mut rng);
        let bias = random(n, &mut rng);
        let am = MatRef::row_major(&a, m, k).unwrap();
        let bm = MatRef::row_major(&b, k, n).unwrap();
        let run = |threads: usize, with_bias: bool| {
            in_pool(threads, || {
                let mut c = vec![f32::NAN; m * n];
                if with_bias {
                    let seg = [Segment { a: am, b: &bm }];
                    gemm_segments_bias_post(&seg, Some(&bias), &mut c, false, PostOp::Relu)
                        .unwrap();
                } else {
                    gemm(am, &bm, &mut c, false).unwrap();
                }
                c
            })
        };
        for with_bias in [false, true] {
            let one = run(1, with_bias);
            for threads in [2, 3, 16] {
                let c = run(threads, with_bias);
                assert_eq!(
                    bits(&c),
                    bits(&one),
                    "{m}x{n}x{k}, bias {with_bias}, {threads} threads"
                );
            }
            for i in 0..m {
                for j in 0..n {
                    let mut want = if with_bias { f64::from(bias[j]) } else { 0.0 };
                    let mut scale = want.abs();
                    for p in 0..k {
                        let t = f64::from(a[i * k + p]) * f64::from(b[p * n + j]);
                        want += t;
                        scale += t.abs();
                    }
                    if with_bias {
                        want = want.max(0.0);
                    }
                    let got = f64::from(one[i * n + j]);
                    assert!(
                        (got - want).abs() <= 1e-5 * scale + 1e-6,
                        "{m}x{n}x{k}, bias {with_bias}: C[{i}, {j}] = {got}, want {want}"
                    );
                }
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 10);
}
