//! The per-column row ops DoRA runs (`scale_shift_rows`, `scale_shift_rows_from`,
//! `scale_rows`) against a scalar reference on awkward widths and row counts, small enough to
//! run on the calling thread and large enough to be split among threads: the same bits on 1,
//! 2, 3 and 16 threads, and shapes that do not fit are errors naming the op.

mod common;
use common::{bits, in_pool};
use nibble_tensor::ops::{scale_rows, scale_shift_rows, scale_shift_rows_from};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 1e6 - 8.0)
        .collect()
}

#[test]
fn row_ops_match_the_scalar_reference_on_any_thread_count() {
    for d in [1, 7, 17, 33, 129, 1023] {
        for rows in [0, 1, 15, 63, 300] {
            let x = values(d * rows, 1);
            let (scale, shift) = (values(d, 2), values(d, 3));
            let want_shift: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(k, v)| v * scale[k % d] + shift[k % d])
                .collect();
            let want_scale: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(k, v)| v * scale[k % d])
                .collect();
            for threads in [1, 2, 3, 16] {
                let (a, b, c) = in_pool(threads, || {
                    let mut a = x.clone();
                    scale_shift_rows(&mut a, &scale, &shift).unwrap();
                    let b = scale_shift_rows_from(&x, &scale, &shift).unwrap();
                    let mut c = x.clone();
                    scale_rows(&mut c, &scale).unwrap();
                    (a, b, c)
                });
                let case = format!("d={d} rows={rows} threads={threads}");
                assert_eq!(bits(&a), bits(&want_shift), "scale_shift_rows {case}");
                assert_eq!(bits(&b), bits(&want_shift), "scale_shift_rows_from {case}");
                assert_eq!(bits(&c), bits(&want_scale), "scale_rows {case}");
            }
        }
    }
    let mut y = vec![0.0f32; 10];
    let e = scale_shift_rows(&mut y, &[1.0; 3], &[0.0; 3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("scale_shift_rows"), "{e}");
    let e = scale_shift_rows_from(&y, &[1.0; 5], &[0.0; 4])
        .unwrap_err()
        .to_string();
    assert!(e.contains("scale_shift_rows_from"), "{e}");
    let e = scale_rows(&mut y, &[]).unwrap_err().to_string();
    assert!(e.contains("scale_rows"), "{e}");
}
