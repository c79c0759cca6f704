//! One 1024x1024 layer of every weight format at one batch size, timed in turns: f32 packed
//! once (`PackedWeight`, as `bignet` holds its f32 weights), Q4, NF4, NF4 with
//! double-quantized absmaxes, int8 and lower, each as `x · Wᵀ` over `layers` distinct
//! weights (so the weights come from memory as in a model, not from cache), medians (min, max)
//! of `reps` rounds after one warm-up, per layer. On the rayon pool (`RAYON_NUM_THREADS`) and
//! the process's kernel tier (`NIBBLE_KERNEL`). At batch 1024 the quantized layers' cost over
//! the packed f32 one is what dequantizing into the GEMM's panels adds (issue 13, item 5).
//!
//! `cargo run --release --example format_layers -- [batch 1024] [reps 15] [layers 6]`

use nibble::quant::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble::tensor::{PackedWeight, Rng, Tensor, WeightMatrix};
use std::time::Instant;

/// `name: median (min .. max)` of `v`, in ms.
fn summary(name: &str, v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{name:8} {:8.3} ms  (min {:.3}, max {:.3})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    )
}

fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let (m, reps, layers) = (arg(1, 1024), arg(2, 15).max(1), arg(3, 6).max(1));
    let d = 1024;
    let mut rng = Rng::new(0);
    let ws: Vec<Tensor> = (0..layers)
        .map(|_| Tensor::uniform(&[d, d], -0.03, 0.03, &mut rng))
        .collect();
    type Build = fn(&Tensor) -> Box<dyn WeightMatrix>;
    let builds: [(&str, Build); 6] = [
        ("f32p", |w| Box::new(PackedWeight::pack(w).expect("packs"))),
        ("q4", |w| {
            Box::new(Q4Matrix::quantize(w).expect("quantizes"))
        }),
        ("nf4", |w| {
            Box::new(Nf4Matrix::quantize(w).expect("quantizes"))
        }),
        ("nf4_dq", |w| {
            Box::new(Nf4Matrix::quantize_double(w).expect("quantizes"))
        }),
        ("int8", |w| {
            Box::new(Int8Matrix::quantize(w).expect("quantizes"))
        }),
        ("lower", |w| {
            Box::new(LowerMatrix::quantize(w).expect("quantizes"))
        }),
    ];
    let formats: Vec<(&str, Vec<Box<dyn WeightMatrix>>)> = builds
        .iter()
        .map(|(name, build)| (*name, ws.iter().map(build).collect()))
        .collect();
    let x = Tensor::uniform(&[m, d], -1.0, 1.0, &mut rng);
    let mut y = vec![0f32; m * d];
    let mut times = vec![Vec::new(); formats.len()];
    for round in 0..=reps {
        for (f, (_, ls)) in formats.iter().enumerate() {
            let t = Instant::now();
            for l in ls {
                l.matmul_t(x.data(), m, &mut y, false)
                    .expect("shapes agree");
            }
            if round > 0 {
                times[f].push(t.elapsed().as_secs_f64() * 1e3 / layers as f64);
            }
        }
    }
    println!(
        "{} threads, {} tier, batch {m}, {layers} layers of 1024x1024, ms per layer",
        rayon::current_num_threads(),
        nibble::quant::cpu::kernel_path().name()
    );
    for ((name, _), t) in formats.iter().zip(&mut times) {
        println!("{}", summary(name, t));
    }
}
