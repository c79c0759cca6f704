//! Same inputs and seed give bit-identical outputs and training trajectories, whatever the
//! number of threads.

// The helpers the tensor crate's integration tests share (one copy for both directories).
#[path = "../crates/tensor/tests/common/mod.rs"]
mod common;
use common::in_pool;

use nibble::autograd::{AdamW, AdamWConfig, Tape};
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::train::{train_step, FitTask};
use nibble::bignet::Variant;

/// Output of a forward at batch 1 and 64, and the losses and final adapter of 5 qlora steps.
fn run(variant: Variant) -> (Vec<u32>, Vec<u32>) {
    let spec = ModelSpec {
        dim: 256,
        ..ModelSpec::seeded(variant, 3)
    };
    let model = spec.build().unwrap();
    let mut out_bits = Vec::new();
    for batch in [1, 64] {
        let x = nibble::bignet::cli::normal_batch(batch, 256, 9);
        out_bits.extend(model.infer(&x).unwrap().data().iter().map(|v| v.to_bits()));
    }
    let task = FitTask::new(256, 200, 5);
    let mut opt = AdamW::new(model.trainable_params(), AdamWConfig::default()).unwrap();
    let tape = Tape::new();
    let mut train_bits = Vec::new();
    for _ in 0..5 {
        let (loss, _) = train_step(&model, &task, &tape, &mut opt).unwrap();
        train_bits.push(loss.to_bits());
    }
    for p in model.trainable_params() {
        train_bits.extend(p.value().data().iter().map(|v| v.to_bits()));
    }
    (out_bits, train_bits)
}

#[test]
fn qlora_forward_and_training_are_bit_identical_across_threads_and_runs() {
    let one = in_pool(1, || run(Variant::Qlora));
    let two = in_pool(2, || run(Variant::Qlora));
    let again = in_pool(2, || run(Variant::Qlora));
    assert!(one.0 == two.0, "forward differs between 1 and 2 threads");
    assert!(one.1 == two.1, "training differs between 1 and 2 threads");
    assert!(two == again, "two runs differ");
}

#[test]
fn every_variant_forward_is_bit_identical_across_threads() {
    for variant in Variant::ALL {
        let forward = |threads| {
            in_pool(threads, || {
                let model = ModelSpec {
                    dim: 128,
                    ..ModelSpec::seeded(variant, 1)
                }
                .build()
                .unwrap();
                let x = nibble::bignet::cli::normal_batch(33, 128, 2);
                model.infer(&x).unwrap()
            })
        };
        assert!(forward(1) == forward(2), "{variant}");
    }
}
