//! Low-memory inference and training give the same numbers as the plain paths: chunked,
//! in-place inference is bit-identical to the recorded forward on the whole batch; checkpointed
//! training gives bit-identical gradients and AdamW trajectories; micro-batches give the same
//! update up to the order of the sums over rows. Each across 1 and 2 threads.

// The helpers the tensor crate's integration tests share (one copy for both directories).
#[path = "../crates/tensor/tests/common/mod.rs"]
mod common;
use common::{bits, in_pool};

use nibble::autograd::{AdamW, AdamWConfig, Optimizer, Tape, Var};
use nibble::bignet::cli::normal_batch;
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::train::{train_step_with, FitTask, TrainOptions};
use nibble::bignet::{BigNet, Variant};

fn model(variant: Variant, dim: usize) -> BigNet {
    ModelSpec {
        dim,
        ..ModelSpec::seeded(variant, 4)
    }
    .build()
    .unwrap()
}

/// The recorded forward on the whole batch (no chunks, nothing in place), as bits.
fn whole_batch_forward(model: &BigNet, x: &nibble::tensor::Tensor) -> Vec<u32> {
    let tape = Tape::new();
    let y = tape
        .no_grad(|| model.forward(&tape, &Var::constant(x.clone())))
        .unwrap();
    bits(y.value().data())
}

#[test]
fn chunks_cover_the_batch_with_at_least_48_rows_each() {
    for batch in [0usize, 1, 47, 96, 97, 191, 192, 1000, 1024, 4099] {
        for ask in [1usize, 96, 112, 500] {
            let ranges = nibble::bignet::infer::chunk_ranges(batch, ask);
            assert_eq!(ranges.first().unwrap().0, 0);
            assert_eq!(ranges.last().unwrap().1, batch);
            for w in ranges.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
            let rows = ask.max(nibble::bignet::infer::MIN_CHUNK_ROWS);
            for &(a, b) in &ranges {
                assert!(b - a <= rows, "batch {batch}, ask {ask}: {a}..{b}");
                assert!(
                    ranges.len() == 1 || b - a >= 48,
                    "batch {batch}, ask {ask}: {a}..{b}"
                );
            }
        }
    }
}

#[test]
fn chunked_inference_is_bit_identical_to_the_whole_batch_forward() {
    for variant in Variant::ALL {
        let model = model(variant, 128);
        for batch in [1usize, 7, 47, 130, 300, 401] {
            let x = normal_batch(batch, 128, batch as u64);
            let want = whole_batch_forward(&model, &x);
            for threads in [1, 2] {
                for chunk in [1usize, 96, 112, 150, 1024] {
                    let got = in_pool(threads, || model.infer_chunked(&x, chunk).unwrap());
                    assert!(
                        bits(got.data()) == want,
                        "{variant}: batch {batch}, chunks of {chunk}, {threads} threads"
                    );
                }
            }
        }
    }
}

/// Batch-1 inference fuses each LoRA adapter into its layer's parallel pass: with adapters
/// that are not zero (B starts at zero), at a width where the layers' products run on the
/// pool, it still gives the recorded forward's bits, for 1, 2, 3 and 16 threads.
#[test]
fn batch1_inference_with_trained_adapters_is_bit_identical_to_the_forward() {
    for variant in [Variant::Lora, Variant::Qlora] {
        let model = model(variant, 256);
        let mut rng = nibble::tensor::Rng::new(5);
        for p in model.trainable_params() {
            let shape = p.value().shape().to_vec();
            *p.value_mut() = nibble::tensor::Tensor::uniform(&shape, -0.1, 0.1, &mut rng);
        }
        let x = normal_batch(1, 256, 3);
        let want = whole_batch_forward(&model, &x);
        for threads in [1, 2, 3, 16] {
            let got = in_pool(threads, || model.infer(&x).unwrap());
            assert!(bits(got.data()) == want, "{variant}: {threads} threads");
        }
    }
}

/// Losses, accuracies, every trainable parameter's gradient after the first step and its value
/// after 5 AdamW steps, as bits.
fn trajectory(variant: Variant, options: TrainOptions) -> Vec<u32> {
    let model = model(variant, 128);
    let task = FitTask::new(128, 200, 6);
    let mut opt = AdamW::new(model.trainable_params(), AdamWConfig::default()).unwrap();
    let tape = Tape::new();
    let mut out = Vec::new();
    for step in 0..5 {
        let (loss, acc) = train_step_with(&model, &task, &tape, &mut opt, options).unwrap();
        out.extend(bits(&[loss, acc]));
        if step == 0 {
            for p in model.trainable_params() {
                out.extend(bits(p.grad().as_ref().unwrap().data()));
            }
        }
    }
    for p in model.trainable_params() {
        out.extend(bits(p.value().data()));
    }
    opt.zero_grad();
    out
}

#[test]
fn checkpointed_training_is_bit_identical_to_plain_training() {
    for variant in [
        Variant::Bignet,
        Variant::HalfPrecision,
        Variant::Lora,
        Variant::Qlora,
    ] {
        let plain = in_pool(2, || trajectory(variant, TrainOptions::default()));
        for threads in [1, 2] {
            let checkpointed = in_pool(threads, || {
                trajectory(
                    variant,
                    TrainOptions {
                        checkpoint: true,
                        micro_batch: None,
                    },
                )
            });
            assert!(checkpointed == plain, "{variant}, {threads} threads");
        }
    }
}

#[test]
fn micro_batches_give_the_whole_batch_update_up_to_summation_order() {
    for variant in [Variant::Lora, Variant::Qlora] {
        let grads = |options: TrainOptions, threads: usize| {
            in_pool(threads, || {
                let model = model(variant, 128);
                let task = FitTask::new(128, 200, 6);
                let mut opt = AdamW::new(model.trainable_params(), AdamWConfig::default()).unwrap();
                let tape = Tape::new();
                let (loss, acc) = train_step_with(&model, &task, &tape, &mut opt, options).unwrap();
                let grads: Vec<Vec<f32>> = model
                    .trainable_params()
                    .iter()
                    .map(|p| p.grad().as_ref().unwrap().data().to_vec())
                    .collect();
                (loss, acc, grads)
            })
        };
        let whole = grads(TrainOptions::default(), 2);
        for (micro, checkpoint) in [(50, false), (64, true)] {
            let options = TrainOptions {
                checkpoint,
                micro_batch: Some(micro),
            };
            let one = grads(options, 1);
            let two = grads(options, 2);
            assert!(
                one.0.to_bits() == two.0.to_bits() && one.2 == two.2,
                "{variant}: micro-batches of {micro} differ between 1 and 2 threads"
            );
            assert_eq!(one.1, whole.1, "{variant}: accuracy");
            assert!(
                (one.0 - whole.0).abs() <= 1e-6 * whole.0.abs(),
                "{variant}: loss"
            );
            let mut worst = 0.0f32;
            for (g, w) in one.2.iter().zip(&whole.2) {
                let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
                let diff = g
                    .iter()
                    .zip(w)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                worst = worst.max(diff / scale);
            }
            println!("{variant}: micro-batches of {micro}: max |Δgrad| / max |grad| = {worst:.2e}");
            assert!(worst < 1e-5, "{variant}: micro-batches of {micro}: {worst}");
        }
    }
}

/// Batch 1 on a team of threads (every thread of the pool running the whole forward, meeting
/// at barriers) gives the ordinary path's bits (one thread; with f32 activations, those of the
/// recorded forward), for every variant, f32 and int8 activations, on 2, 3 and 16 threads (16 on this host's cores: members descheduled at the
/// barriers), and over inputs of several scales.
#[test]
fn batch1_team_inference_is_bit_identical_to_the_forward() {
    use nibble::quant::act8::{with_activations, ActivationMode};
    for variant in Variant::ALL {
        let model = model(variant, 128);
        for seed in [1u64, 2, 3] {
            let x = normal_batch(1, 128, seed);
            for mode in [ActivationMode::F32, ActivationMode::Int8] {
                // The ordinary path: one thread, one fork-join per layer. (The mode is per
                // thread: set on the pool's thread that runs the forward.)
                let want = in_pool(1, || {
                    with_activations(mode, || bits(model.infer(&x).unwrap().data()))
                });
                if mode == ActivationMode::F32 {
                    assert!(
                        want == whole_batch_forward(&model, &x),
                        "{variant}: seed {seed}"
                    );
                }
                for threads in [2, 3, 16] {
                    // Another test's team may hold the pool's team slot: try again until
                    // this one runs (it is `None` only then, or for layers it cannot take).
                    let mut got = None;
                    for _ in 0..200 {
                        got = in_pool(threads, || {
                            with_activations(mode, || model.infer_on_team(&x))
                        });
                        if got.is_some() {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    let Some(got) = got else {
                        // Only int8 on the generic driver (NF4 at batch 1 on AVX2) leaves it.
                        assert_eq!(mode, ActivationMode::Int8, "{variant}: the team never ran");
                        println!("{variant}: int8 batch 1 takes the generic driver, no team");
                        continue;
                    };
                    assert!(
                        bits(got.unwrap().data()) == want,
                        "{variant} {mode:?}: seed {seed}, {threads} threads"
                    );
                }
            }
        }
    }
}
