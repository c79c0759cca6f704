//! Measured memory (a counting allocator): each variant's model, its no-grad forward, the
//! grader's training step with and without checkpointing and micro-batches, and that loading a
//! quantized variant from a big f32 file does not hold two copies. One test only, so that no
//! other test allocates at the same time.

use nibble::bignet::checkpoint::{write_safetensors, DType};
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::memory::{self, CountingAlloc};
use nibble::bignet::source::{state_dict_keys, SeededInit, WeightSource};
use nibble::bignet::train::{measure_train_step_bytes, TrainOptions};
use nibble::bignet::Variant;
use std::collections::BTreeMap;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const MB: f64 = (1 << 20) as f64;

fn held_by_model(spec: &ModelSpec) -> (f64, nibble::bignet::BigNet) {
    let before = memory::current();
    let model = spec.build().unwrap();
    ((memory::current() - before) as f64 / MB, model)
}

#[test]
fn measured_memory_within_the_graders_bounds() {
    assert!(memory::is_installed());
    for (variant, bound) in [
        (Variant::HalfPrecision, 40.0),
        (Variant::Lora, 50.0),
        (Variant::LowPrecision, 15.0),
        (Variant::Qlora, 20.0),
        (Variant::LowerPrecision, 9.0),
    ] {
        let (held, model) = held_by_model(&ModelSpec::seeded(variant, 0));
        let theoretical = model.counts().bytes as f64 / MB;
        assert!(held < bound, "{variant}: {held:.2} MB held");
        // What is held is what the parameters need, plus small bookkeeping.
        assert!(
            (held - theoretical).abs() < 0.5,
            "{variant}: held {held:.2} MB vs theoretical {theoretical:.2} MB"
        );
    }

    // A no-grad forward of 1024 rows in low-memory chunks holds its 4 MB output and two
    // 103-row buffers; run whole (the default), its output and two batch-sized buffers.
    let x = nibble::bignet::cli::normal_batch(1024, 1024, 0);
    for variant in Variant::ALL {
        let model = ModelSpec::seeded(variant, 0).build().unwrap();
        let forward = |rows| {
            nibble::bignet::infer::measure_forward_bytes(&model, &x, rows).unwrap() as f64 / MB
        };
        let chunked = forward(nibble::bignet::infer::LOW_MEMORY_CHUNK_ROWS);
        assert!(
            chunked <= 5.0,
            "{variant}: chunked forward peak {chunked:.2} MB"
        );
        let whole = forward(usize::MAX);
        assert!(
            whole <= 12.5,
            "{variant}: whole-batch forward peak {whole:.2} MB"
        );
    }

    // The grader's training step at batch 1000, everything counted (model, adapters, gradients,
    // AdamW state, batch, activations). Before checkpointing and micro-batches a LoRA step
    // peaked at 159 MB.
    let train = |variant, checkpoint, micro_batch| {
        let options = TrainOptions {
            checkpoint,
            micro_batch,
        };
        let bytes =
            measure_train_step_bytes(&ModelSpec::seeded(variant, 0), 1000, options).unwrap();
        bytes as f64 / MB
    };
    for (variant, plain_bound, checkpoint_bound, both_bound) in [
        (Variant::Qlora, 159.0, 80.0, 48.0),
        (Variant::Lora, 159.0, 100.0, 72.0),
    ] {
        let plain = train(variant, false, None);
        let checkpointed = train(variant, true, None);
        let both = train(variant, true, Some(250));
        println!("{variant}: training step {plain:.2} / {checkpointed:.2} / {both:.2} MB");
        assert!(plain < plain_bound, "{variant}: plain step {plain:.2} MB");
        assert!(
            checkpointed <= checkpoint_bound,
            "{variant}: checkpointed step {checkpointed:.2} MB"
        );
        assert!(
            both <= both_bound,
            "{variant}: checkpointed step in micro-batches of 250: {both:.2} MB"
        );
        assert!(checkpointed < plain && both < checkpointed, "{variant}");
    }

    // Loading low_precision from a 72 MB f32 file: the file is mapped, each layer's f32 copy is
    // dropped before the next is read, so the heap peak is the model plus about one layer.
    let dir = std::env::temp_dir().join(format!("nibble-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bignet.safetensors");
    {
        let init = SeededInit { dim: 1024, seed: 0 };
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = state_dict_keys(1024)
            .into_iter()
            .map(|(k, s)| {
                let t = init.tensor(&k, &s).unwrap();
                (k, s, t.into_vec())
            })
            .collect();
        let entries: Vec<_> = tensors
            .iter()
            .map(|(k, s, d)| (k.clone(), DType::F32, s.clone(), bytemuck::cast_slice(d)))
            .collect();
        write_safetensors(&path, &entries, &BTreeMap::new()).unwrap();
    }
    let spec = ModelSpec {
        weights: Some(path.clone()),
        ..ModelSpec::seeded(Variant::LowPrecision, 0)
    };
    let before = memory::current();
    memory::reset_peak();
    let model = spec.build().unwrap();
    let peak = (memory::peak() - before) as f64 / MB;
    let model_mb = model.counts().bytes as f64 / MB;
    assert!(
        peak < model_mb + 2.0 * 4.0 + 1.0,
        "loading peak {peak:.1} MB for a {model_mb:.1} MB model"
    );
    std::fs::remove_dir_all(&dir).ok();
}
