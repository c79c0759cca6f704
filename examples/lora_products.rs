//! The products of one QLoRA layer's training step, each timed on its own at the training
//! batch (1000 rows, width 1024, rank 32) as the tape runs them: the frozen Q4 base forward
//! and input gradient (f32 and int8 activations), the base with its bias and the adapter's `h · Bᵀ` in
//! one pass (as inference runs a frozen layer with an adapter), the adapter's `h = x·Aᵀ`, `y += h·Bᵀ`,
//! `dH = dY·B`, `dB = dYᵀ·H`, `dXa = dH·A`, `dA = dHᵀ·X`, the gradient sum `dX += dXa`, the
//! whole layer with int8 activations as inference runs it (`h` in f32 then one pass, and `h`
//! on the layer's int8 x, `nibble_quant::act8::adapter`), and
//! what a fresh activation-sized tensor costs (allocated, zeroed, freed).
//! Medians (min) of `reps` runs with the FLOP rate, on the rayon pool (`RAYON_NUM_THREADS`).
//!
//! `cargo run --release --example lora_products -- 1000 32 21`

use nibble::quant::act8::{with_activations, ActivationMode};
use nibble::quant::Q4Matrix;
use nibble::tensor::lowrank::LowRank;
use nibble::tensor::ops::PostOp;
use nibble::tensor::{
    linear_backward_input, linear_backward_weight, linear_low_rank_into, Rng, Tensor, WeightMatrix,
};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let m = args.first().copied().unwrap_or(1000);
    let r = args.get(1).copied().unwrap_or(32);
    let reps = args.get(2).copied().unwrap_or(21).max(1);
    let d = 1024;
    let mut rng = Rng::new(0);
    let w = Tensor::uniform(&[d, d], -0.03, 0.03, &mut rng);
    let q = Q4Matrix::quantize(&w).expect("a 1024x1024 matrix quantizes");
    let a = Tensor::uniform(&[r, d], -0.03, 0.03, &mut rng);
    let b = Tensor::uniform(&[d, r], -0.03, 0.03, &mut rng);
    let x = Tensor::randn(&[m, d], &mut rng);
    let dy = Tensor::randn(&[m, d], &mut rng);
    let h = Tensor::randn(&[m, r], &mut rng);
    let bias = Tensor::uniform(&[d], -0.03, 0.03, &mut rng).into_vec();
    let dh = Tensor::randn(&[m, r], &mut rng);
    println!(
        "{} threads, batch {m}, width {d}, rank {r}",
        rayon::current_num_threads()
    );
    let mut y = Tensor::zeros(&[m, d]);
    let mut hh = Tensor::zeros(&[m, r]);
    let mut da = Tensor::zeros(&[r, d]);
    let mut db = Tensor::zeros(&[d, r]);
    let mut dx = Tensor::zeros(&[m, d]);
    let dxa = Tensor::randn(&[m, d], &mut rng);
    let big = 2.0 * (m * d * d) as f64;
    let small = 2.0 * (m * d * r) as f64;
    let time = |name: &str, flop: f64, f: &mut dyn FnMut()| {
        f();
        let mut ts: Vec<f64> = (0..reps)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ts.sort_by(|p, q| p.total_cmp(q));
        println!(
            "{name:34} {:8.3} ms (min {:7.3})  {:7.0} GFLOP/s",
            ts[reps / 2],
            ts[0],
            flop / ts[reps / 2] / 1e6
        );
    };
    for mode in [ActivationMode::F32, ActivationMode::Int8] {
        with_activations(mode, || {
            time(
                &format!("base forward x·Wᵀ ({})", mode.name()),
                big,
                &mut || q.matmul_t(x.data(), m, y.data_mut(), false).unwrap(),
            );
            time(
                &format!("base + bias + h·Bᵀ in one pass ({})", mode.name()),
                big + small,
                &mut || {
                    linear_low_rank_into(
                        &q,
                        x.data(),
                        m,
                        y.data_mut(),
                        Some(&bias),
                        (h.data(), &b),
                        PostOp::Identity,
                    )
                    .unwrap()
                },
            );
            if mode == ActivationMode::Int8 {
                // The whole layer as inference runs it: h in f32, then the fused pass; and h
                // on the layer's int8 x (`act8::adapter`, what `matmul_t_low_rank` runs there).
                let ab = LowRank::new(&a, &b).unwrap();
                time(
                    "layer: h f32, then one pass (int8)",
                    big + 2.0 * small,
                    &mut || {
                        a.matmul_t(x.data(), m, hh.data_mut(), false).unwrap();
                        linear_low_rank_into(
                            &q,
                            x.data(),
                            m,
                            y.data_mut(),
                            Some(&bias),
                            (hh.data(), &b),
                            PostOp::Relu,
                        )
                        .unwrap()
                    },
                );
                time(
                    "layer: h on the int8 x (int8)",
                    big + 2.0 * small,
                    &mut || {
                        let done = q
                            .matmul_t_low_rank(
                                x.data(),
                                m,
                                y.data_mut(),
                                Some(&bias),
                                &ab,
                                PostOp::Relu,
                            )
                            .unwrap();
                        assert!(done, "the int8 adapter declined");
                    },
                );
            }
            time(
                &format!("base input grad dY·W ({})", mode.name()),
                big,
                &mut || q.matmul(dy.data(), m, dx.data_mut(), false).unwrap(),
            );
        });
    }
    time("adapter h = x·Aᵀ", small, &mut || {
        a.matmul_t(x.data(), m, hh.data_mut(), false).unwrap()
    });
    time("adapter y += h·Bᵀ", small, &mut || {
        b.matmul_t(h.data(), m, y.data_mut(), true).unwrap()
    });
    time("adapter dH = dY·B (new tensor)", small, &mut || {
        drop(linear_backward_input(&dy, &b).unwrap())
    });
    time("adapter dB += dYᵀ·H", small, &mut || {
        linear_backward_weight(&dy, &h, &mut db, true).unwrap()
    });
    time("adapter dXa = dH·A (new tensor)", small, &mut || {
        drop(linear_backward_input(&dh, &a).unwrap())
    });
    time("adapter dA += dHᵀ·X", small, &mut || {
        linear_backward_weight(&dh, &x, &mut da, true).unwrap()
    });
    time("gradient sum dX += dXa", 0.0, &mut || {
        dx.add_assign(&dxa).unwrap()
    });
    time("a fresh [m, 1024] tensor (zeroed)", 0.0, &mut || {
        drop(std::hint::black_box(Tensor::try_zeros(&[m, d]).unwrap()))
    });
}
