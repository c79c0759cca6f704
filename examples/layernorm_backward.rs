//! Times `layer_norm_backward` on one `[m, c]` input (default `[1000, 1024]`, BigNet's
//! training batch): `rounds` rounds of `calls` calls each, printing each round's minimum and
//! median, then the minimum and median over all calls. On the rayon pool
//! (`RAYON_NUM_THREADS`), with freed buffers kept in the heap as the `bignet` program keeps
//! them (so `dx` is not page-faulted afresh on every call).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release --example layernorm_backward -- 5 101 1000 1024`

use nibble::tensor::{layer_norm, layer_norm_backward, Rng, Tensor};
use std::hint::black_box;
use std::time::Instant;

#[path = "common/timing.rs"]
mod timing;
use timing::min_median;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("rounds, calls, m and c are whole numbers"))
        .collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default).max(1);
    let (rounds, calls, m, c) = (arg(0, 5), arg(1, 101), arg(2, 1000), arg(3, 1024));
    nibble::tensor::heap::retain_freed_memory();
    let mut rng = Rng::new(7);
    let x = Tensor::randn(&[m, c], &mut rng).scale(2.0);
    let w: Vec<f32> = (0..c).map(|_| rng.uniform(0.5, 1.5)).collect();
    let b: Vec<f32> = (0..c).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let dy = Tensor::randn(&[m, c], &mut rng);
    let (_, stats) = layer_norm(&x, &w, &b, 1e-5).expect("shapes agree");
    println!(
        "layer_norm_backward [{m}, {c}], {} threads, kernel path {}",
        rayon::current_num_threads(),
        nibble::tensor::cpu::kernel_path().name()
    );
    let mut all = Vec::with_capacity(rounds * calls);
    for round in 0..rounds {
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            black_box(layer_norm_backward(&dy, &x, &w, &stats).expect("shapes agree"));
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (min, med) = min_median(&times);
        println!("round {round}: min {min:.3} ms, median {med:.3} ms");
        all.extend(times);
    }
    let (min, med) = min_median(&all);
    // x and dy read, dx written: the least memory traffic of one call.
    let bytes = 3.0 * (m * c * 4) as f64;
    println!(
        "all: min {min:.3} ms, median {med:.3} ms ({:.1} GB/s at the median)",
        bytes / med / 1e6
    );
}
