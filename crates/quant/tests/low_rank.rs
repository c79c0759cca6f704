//! Every quantized format's batch-1 product with a low-rank adapter fused in
//! (`WeightMatrix::matvec_t_low_rank`) gives the bits of the unfused sequence (`matmul_t` at
//! batch 1, then `LowRank::apply_unfused`), on awkward shapes and ranks, with and without
//! `accumulate` (NaN-filled outputs then), under f32 and int8 activations, for 1, 2, 3 and 16
//! threads; so do its small batches with the adapter in the same pass
//! (`WeightMatrix::matmul_t_low_rank`) against the layer as the training forward computes it
//! (`h = x · Aᵀ`, then `linear_low_rank_into`; with int8 activations on the integer GEMM's
//! batches, h from the int8 x, `act8::adapter`).

mod common;

use nibble_quant::act8::adapter::AdapterCodes;
use nibble_quant::act8::gemm::GEMM_MIN_M;
use nibble_quant::act8::{forward, with_activations, ActivationMode, IntTier, GROUP};
use nibble_quant::cpu::kernel_path;
use nibble_quant::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::gemm::gemv::gemv_fits;
use nibble_tensor::lowrank::LowRank;
use nibble_tensor::ops::PostOp;
use nibble_tensor::{linear_low_rank_into, Rng, Tensor, WeightMatrix};

fn formats(o: usize, i: usize, seed: u64) -> Vec<(&'static str, Box<dyn WeightMatrix>)> {
    let w = Tensor::randn(&[o, i], &mut Rng::new(seed)).scale(1.0 / (i.max(1) as f32).sqrt());
    vec![
        (
            "q4",
            Box::new(Q4Matrix::quantize(&w).unwrap()) as Box<dyn WeightMatrix>,
        ),
        ("nf4", Box::new(Nf4Matrix::quantize(&w).unwrap())),
        ("nf4_dq", Box::new(Nf4Matrix::quantize_double(&w).unwrap())),
        ("int8", Box::new(Int8Matrix::quantize(&w).unwrap())),
        ("lower", Box::new(LowerMatrix::quantize(&w).unwrap())),
    ]
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn fused_adapter_matches_the_unfused_products_bit_for_bit() {
    let pools = common::pools();
    // (1023, 129) and (300, 1023) are large enough for the parallel batch-1 pass.
    for (o, i, rank) in [
        (1, 1, 1),
        (7, 33, 3),
        (17, 63, 5),
        (129, 31, 32),
        (1023, 129, 32),
        (300, 1023, 7),
        (15, 0, 2),
    ] {
        let mut rng = Rng::new((o * 31 + i) as u64);
        let a = Tensor::randn(&[rank, i], &mut rng);
        let b = Tensor::randn(&[o, rank], &mut rng);
        let x = Tensor::randn(&[1, i], &mut rng);
        let start = Tensor::randn(&[1, o], &mut rng);
        let adapter = LowRank::new(&a, &b).unwrap();
        for (name, w) in formats(o, i, 3) {
            for mode in [ActivationMode::F32, ActivationMode::Int8] {
                for accumulate in [false, true] {
                    let y0 = || {
                        if accumulate {
                            start.data().to_vec()
                        } else {
                            vec![f32::NAN; o]
                        }
                    };
                    let unfused = |pool: &rayon::ThreadPool| {
                        pool.install(|| {
                            with_activations(mode, || {
                                let mut y = y0();
                                w.matmul_t(x.data(), 1, &mut y, accumulate).unwrap();
                                adapter.apply_unfused(x.data(), &mut y).unwrap();
                                y
                            })
                        })
                    };
                    let want = bits(&unfused(&pools[0]));
                    for pool in &pools {
                        let got = pool.install(|| {
                            with_activations(mode, || {
                                let mut y = y0();
                                w.matvec_t_low_rank(x.data(), &mut y, accumulate, &adapter)
                                    .unwrap();
                                y
                            })
                        });
                        let what = format!(
                            "{name} {o}x{i} rank {rank}, {mode:?}, accumulate {accumulate}, {} threads",
                            pool.current_num_threads()
                        );
                        assert!(bits(&got) == want, "{what}");
                        assert!(bits(&unfused(pool)) == want, "{what} (unfused)");
                    }
                }
            }
        }
    }
}

#[test]
fn small_batches_fuse_the_adapter_bit_for_bit() {
    let pools = common::pools();
    // (1023, 256) and (200, 1024) are large enough for the parallel pass, with a ragged last
    // part; rank 65 sends B's products to the row kernel rather than the transposing one.
    for (o, i, rank) in [
        (7, 33, 3),
        (129, 31, 32),
        (1023, 256, 32),
        (200, 1024, 65),
        (65, 130, 1),
        (15, 0, 2),
    ] {
        let mut rng = Rng::new((o * 17 + i) as u64);
        let a = Tensor::randn(&[rank, i], &mut rng);
        let b = Tensor::randn(&[o, rank], &mut rng);
        let bias: Vec<f32> = (0..o).map(|_| rng.normal()).collect();
        let adapter = LowRank::new(&a, &b).unwrap();
        for (name, w) in formats(o, i, 5) {
            for mode in [ActivationMode::F32, ActivationMode::Int8] {
                let mut fused_batches = 0;
                for m in [2, 3, 5, 8, 9, 12, 16] {
                    let mut x = Tensor::randn(&[m, i], &mut rng);
                    if m == 5 && i > 0 {
                        x.data_mut()[..i].fill(0.0); // an all-zero vector
                    }
                    for (with_bias, post) in [(true, PostOp::Relu), (false, PostOp::Identity)] {
                        let bias = with_bias.then_some(&bias[..]);
                        // The layer as the training forward and the unfused inference run it;
                        // in int8 mode, from the integer GEMM's batches on where B's product
                        // runs through the f32 GEMM, with h from the int8 x
                        // (`act8::adapter`).
                        let int8_h = mode == ActivationMode::Int8
                            && m >= GEMM_MIN_M
                            && !gemv_fits(m, rank)
                            && rank > 0;
                        let want = pools[0].install(|| {
                            with_activations(mode, || {
                                let mut h = vec![0.0f32; m * rank];
                                let codes = AdapterCodes::new(a.data(), rank, i, GROUP);
                                match codes.filter(|_| int8_h) {
                                    Some(codes) => {
                                        let tier = IntTier::for_path(kernel_path());
                                        assert!(forward(tier, &codes, x.data(), m, &mut h, false));
                                    }
                                    None => a.matmul_t(x.data(), m, &mut h, false).unwrap(),
                                }
                                let mut y = vec![f32::NAN; m * o];
                                linear_low_rank_into(
                                    &*w,
                                    x.data(),
                                    m,
                                    &mut y,
                                    bias,
                                    (&h, &b),
                                    post,
                                )
                                .unwrap();
                                bits(&y)
                            })
                        });
                        for pool in &pools {
                            let (fused, got) = pool.install(|| {
                                with_activations(mode, || {
                                    let mut y = vec![f32::NAN; m * o];
                                    let fused = w
                                        .matmul_t_low_rank(
                                            x.data(),
                                            m,
                                            &mut y,
                                            bias,
                                            &adapter,
                                            post,
                                        )
                                        .unwrap();
                                    (fused, y)
                                })
                            });
                            let what = format!(
                                "{name} {o}x{i} rank {rank}, batch {m}, {mode:?}, bias {with_bias}, {} threads",
                                pool.current_num_threads()
                            );
                            if fused {
                                fused_batches += 1;
                                assert!(bits(&got) == want, "{what}");
                            } else {
                                assert!(got.iter().all(|v| v.is_nan()), "{what}: y touched");
                            }
                        }
                    }
                }
                // Every format runs its small f32 batches on tiles of rows, so they fuse.
                if mode == ActivationMode::F32 {
                    assert!(fused_batches > 0, "{name} {o}x{i}: no batch fused");
                }
            }
        }
    }
}

#[test]
fn mismatched_adapters_are_errors() {
    for (name, w) in formats(8, 16, 1) {
        let mut y = vec![0.0; 8];
        let x = vec![0.0; 16];
        for (a, b) in [([4, 15], [8, 4]), ([4, 16], [7, 4]), ([4, 8], [16, 4])] {
            let (a, b) = (Tensor::zeros(&a), Tensor::zeros(&b));
            let adapter = LowRank::new(&a, &b).unwrap();
            assert!(
                w.matvec_t_low_rank(&x, &mut y, true, &adapter).is_err(),
                "{name}"
            );
        }
        let (a, b) = (Tensor::zeros(&[4, 16]), Tensor::zeros(&[8, 4]));
        let adapter = LowRank::new(&a, &b).unwrap();
        assert!(w
            .matvec_t_low_rank(&x[..15], &mut y, true, &adapter)
            .is_err());
        assert!(w
            .matvec_t_low_rank(&x, &mut y[..7], true, &adapter)
            .is_err());
        assert!(w.matvec_t_low_rank(&x, &mut y, true, &adapter).is_ok());
        // Small batches: a mismatched adapter is an error, whatever the route.
        let (a, b) = (Tensor::zeros(&[4, 15]), Tensor::zeros(&[8, 4]));
        let wrong = LowRank::new(&a, &b).unwrap();
        let (x4, mut y4) = (vec![0.0; 4 * 16], vec![0.0; 4 * 8]);
        let fused = w.matmul_t_low_rank(&x4, 4, &mut y4, None, &wrong, PostOp::Identity);
        assert!(fused.is_err(), "{name}");
        let fused = w.matmul_t_low_rank(&x4[..63], 4, &mut y4, None, &adapter, PostOp::Identity);
        assert!(fused.is_err(), "{name}");
    }
}
