//! Times one 1024x1024 layer's products, forward `x · Wᵀ` and backward `dY · W`, for f32
//! (as a tensor, and packed once for inference: `f32p`), f16 and Q4 weights at the given batches, on the rayon pool (`RAYON_NUM_THREADS`): medians of
//! `reps` runs, with the FLOP rate. For comparing nibble's GEMM with peers' one-layer benches
//! (`../shared/tools/peers`) on the same machine.
//!
//! `cargo run --release --example gemm_probe -- 1024,250 f32,f32p,f16,q4 21`

use nibble::quant::Q4Matrix;
use nibble::tensor::{HalfTensor, PackedWeight, Rng, Tensor, WeightMatrix};
use std::time::Instant;

fn list<T: std::str::FromStr>(arg: Option<&String>, default: &str) -> Vec<T> {
    arg.map_or(default, |s| s.as_str())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let batches: Vec<usize> = list(args.get(1), "1024,1000,250");
    let formats: Vec<String> = list(args.get(2), "f32,f32p,f16,q4");
    let reps: usize = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
        .max(1);
    let d = 1024;
    let mut rng = Rng::new(0);
    let w = Tensor::uniform(&[d, d], -0.03, 0.03, &mut rng);
    let h = HalfTensor::from_f32(&w);
    let q = Q4Matrix::quantize(&w).expect("a 1024x1024 matrix quantizes");
    let p = PackedWeight::pack(&w).expect("a 1024x1024 matrix packs");
    let weights: [(&str, &dyn WeightMatrix); 4] =
        [("f32", &w), ("f32p", &p), ("f16", &h), ("q4", &q)];
    println!("{} threads", rayon::current_num_threads());
    for (name, wm) in weights {
        if !formats.iter().any(|f| f == name) {
            continue;
        }
        for &m in &batches {
            let x = Tensor::randn(&[m, d], &mut rng);
            let mut y = vec![0.0f32; m * d];
            let mut median_ms = |forward: bool| {
                let mut ts: Vec<f64> = (0..reps)
                    .map(|_| {
                        let s = Instant::now();
                        let r = if forward {
                            wm.matmul_t(x.data(), m, &mut y, false)
                        } else {
                            wm.matmul(x.data(), m, &mut y, false)
                        };
                        r.expect("shapes match");
                        s.elapsed().as_secs_f64() * 1e3
                    })
                    .collect();
                ts.sort_by(|a, b| a.total_cmp(b));
                ts[reps / 2]
            };
            let (fwd, bwd) = (median_ms(true), median_ms(false));
            let gflop = 2.0 * (m * d * d) as f64 / 1e6;
            println!(
                "{name} batch {m:5}: x·Wᵀ {fwd:.3} ms ({:.0} GFLOP/s), dY·W {bwd:.3} ms ({:.0} GFLOP/s)",
                gflop / fwd,
                gflop / bwd
            );
        }
    }
}
