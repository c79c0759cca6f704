//! One Q4 1024² layer at batch 1 with int8 activations (`Q4Matrix::gemv_int8`), called back to
//! back as ggml's `bench_mm` calls its layer: 2000 warm-up calls, then the medians (min / max)
//! of 15 rounds of 2000 calls, in µs per call, on the rayon pool (`RAYON_NUM_THREADS`).
//! `OUTD` sets the number of rows (default 1024), e.g. half of them to time one thread's share.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p nibble-quant --example q4_batch1_loop`

use nibble_quant::Q4Matrix;
use nibble_tensor::{Rng, Tensor};
use std::time::Instant;

fn main() {
    let inn = 1024;
    let out: usize = std::env::var("OUTD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(inn);
    let w = Tensor::randn(&[out, inn], &mut Rng::new(1));
    let q = Q4Matrix::quantize(&w).expect("a finite matrix quantizes");
    let x = Tensor::randn(&[inn], &mut Rng::new(2)).into_vec();
    let mut y = vec![0.0f32; out];
    let mut round = || {
        let start = Instant::now();
        for _ in 0..2000 {
            q.gemv_int8(&x, &mut y, false).expect("shapes match");
        }
        start.elapsed().as_secs_f64() / 2000.0 * 1e6
    };
    round();
    let mut us: Vec<f64> = (0..15).map(|_| round()).collect();
    us.sort_by(f64::total_cmp);
    println!(
        "Q4 {out}x{inn} int8 GEMV, {} threads: median {:.2} µs (min {:.2}, max {:.2})",
        rayon::current_num_threads(),
        us[7],
        us[0],
        us[14]
    );
}
