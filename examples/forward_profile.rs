//! Where BigNet's large-batch inference time goes: the forward's steps (each layer's product
//! with its bias, ReLU, the residual add, the LayerNorm) on 18 distinct 1024x1024 f32 layers,
//! each step timed on its own (medians over `reps` forwards, summed over the forward), once
//! with every step apart and once as `bignet`'s in-place forward runs them (the ReLU inside the
//! product, `PostOp::Relu`; the residual add inside the LayerNorm, `add_layer_norm_assign`),
//! the two forwards in turns; next to the same product repeated on one layer (as `gemm_probe`
//! times it). On the rayon pool (`RAYON_NUM_THREADS`). A third argument `q4` makes
//! the layers Q4 (low_precision's format), `f32p` f32 packed once for inference
//! (`PackedWeight`, as `bignet bench` runs bignet), and a fourth `int8` runs them with int8
//! activations.
//!
//! `cargo run --release --example forward_profile -- 1024 9 [f32|f32p|q4] [f32|int8]`

use nibble::quant::act8::{with_activations, ActivationMode};
use nibble::quant::Q4Matrix;
use nibble::tensor::gemm::MatRef;
use nibble::tensor::layernorm::{add_layer_norm_assign, layer_norm_assign};
use nibble::tensor::ops::{add_in_place, relu_in_place, PostOp};
use nibble::tensor::{PackedWeight, Rng, Tensor, WeightMatrix};
use std::time::Instant;

/// The forward's steps, in the order a block runs them.
const STEPS: [&str; 4] = ["product+bias", "relu", "residual add", "layernorm"];
/// The same slots as `bignet` runs them now: the ReLUs inside the products, the residual add
/// inside the LayerNorm's pass.
const FUSED_STEPS: [&str; 4] = ["product+bias(+relu)", "", "", "residual add+layernorm"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let m: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(9).max(1);
    let format = args.get(3).map_or("f32", |s| s.as_str()).to_string();
    let mode = ActivationMode::parse(args.get(4).map_or("f32", |s| s.as_str()))
        .expect("activations: f32 or int8");
    with_activations(mode, || profile(m, reps, &format));
}

/// Times `reps` forwards of batch `m` (after one warm-up), f32, packed f32 or Q4 layers.
fn profile(m: usize, reps: usize, format: &str) {
    let d = 1024;
    let blocks = 6;
    let mut rng = Rng::new(0);
    let layers: Vec<(Box<dyn WeightMatrix>, Vec<f32>)> = (0..3 * blocks)
        .map(|_| {
            let w = Tensor::uniform(&[d, d], -0.03, 0.03, &mut rng);
            let b = Tensor::uniform(&[d], -0.03, 0.03, &mut rng).data().to_vec();
            let w: Box<dyn WeightMatrix> = match format {
                "q4" => Box::new(Q4Matrix::quantize(&w).expect("a 1024x1024 matrix quantizes")),
                "f32p" => Box::new(PackedWeight::pack(&w).expect("a 1024x1024 matrix packs")),
                _ => Box::new(w),
            };
            (w, b)
        })
        .collect();
    let (ln_w, ln_b) = (vec![1.0f32; d], vec![0.0f32; d]);
    let x0 = Tensor::randn(&[m, d], &mut rng);
    let (mut a, mut b) = (vec![0.0f32; m * d], vec![0.0f32; m * d]);
    println!(
        "{} threads, batch {m}, {} layers, {} activations",
        rayon::current_num_threads(),
        format,
        nibble::quant::act8::activations().name()
    );
    // Per mode, per step: the step's time summed over a forward, one entry per forward.
    let mut per_step: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); STEPS.len()]; 2];
    let mut totals: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for _ in 0..reps + 1 {
        // The two modes in turns, so that they meet the same machine.
        for (mode, fused) in [false, true].into_iter().enumerate() {
            let mut h = x0.data().to_vec();
            let mut t = [0.0f64; STEPS.len()];
            let mut timed = |step: usize, f: &mut dyn FnMut()| {
                let s = Instant::now();
                f();
                t[step] += s.elapsed().as_secs_f64() * 1e3;
            };
            let whole = Instant::now();
            for blk in layers.chunks_exact(3) {
                let product = |(w, bias): &(Box<dyn WeightMatrix>, Vec<f32>),
                               x: &[f32],
                               y: &mut [f32],
                               post: PostOp| {
                    let bias = MatRef::row_major(bias, 1, d).expect("a bias row");
                    w.matmul_t_fused(x, m, y, Some(&bias), None, post)
                        .expect("shapes match");
                };
                let relu = if fused {
                    PostOp::Relu
                } else {
                    PostOp::Identity
                };
                timed(0, &mut || product(&blk[0], &h, &mut a, relu));
                if !fused {
                    timed(1, &mut || relu_in_place(&mut a));
                }
                timed(0, &mut || product(&blk[1], &a, &mut b, relu));
                if !fused {
                    timed(1, &mut || relu_in_place(&mut b));
                }
                timed(0, &mut || product(&blk[2], &b, &mut a, PostOp::Identity));
                if fused {
                    timed(3, &mut || {
                        add_layer_norm_assign(&mut h, &a, d, &ln_w, &ln_b, 1e-5)
                            .expect("shapes match")
                    });
                } else {
                    timed(2, &mut || add_in_place(&mut h, &a).expect("equal lengths"));
                    timed(3, &mut || {
                        layer_norm_assign(&mut h, d, &ln_w, &ln_b, 1e-5).expect("shapes match")
                    });
                }
            }
            totals[mode].push(whole.elapsed().as_secs_f64() * 1e3);
            for (s, v) in t.iter().enumerate() {
                per_step[mode][s].push(*v);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.remove(0); // warm-up
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    for (mode, label) in ["steps apart", "fused (as bignet runs it)"]
        .iter()
        .enumerate()
    {
        let (tm, tlo, thi) = median(&mut totals[mode]);
        println!("forward, {label}: {tm:.3} ms (min {tlo:.3}, max {thi:.3})");
        let names = if mode == 0 { STEPS } else { FUSED_STEPS };
        for (name, v) in names.iter().zip(per_step[mode].iter_mut()) {
            if name.is_empty() {
                continue;
            }
            let (md, lo, hi) = median(v);
            println!("  {name:22} {md:8.3} ms (min {lo:.3}, max {hi:.3})");
        }
    }
    // The same product on one layer, again and again.
    let mut one: Vec<f64> = (0..reps + 1)
        .map(|_| {
            let s = Instant::now();
            let bias = MatRef::row_major(&layers[0].1, 1, d).expect("a bias row");
            layers[0]
                .0
                .matmul_t_fused(x0.data(), m, &mut a, Some(&bias), None, PostOp::Identity)
                .expect("shapes match");
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let (om, olo, ohi) = median(&mut one);
    println!(
        "one layer repeated {om:.3} ms (min {olo:.3}, max {ohi:.3}); x18 = {:.3} ms",
        18.0 * om
    );
}
