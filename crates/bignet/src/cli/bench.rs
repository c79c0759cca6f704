//! `bignet bench`: median milliseconds per forward and per training step.

use super::{normal_batch, Common};
use crate::error::Result;
use crate::train::{train_step, FitTask};
use crate::variant::Variant;
use nibble_autograd::{AdamW, AdamWConfig, Tape};
use serde_json::json;
use std::time::Instant;

/// Median of `runs` timings of `f` in milliseconds, after two warm-up runs.
fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Times every variant at every batch (and a training step with `train`).
pub fn run(
    variants: &[Variant],
    batches: &[usize],
    train: bool,
    runs: usize,
    as_json: bool,
    common: &Common,
) -> Result<()> {
    let mut results = Vec::new();
    for &variant in variants {
        let model = common.spec(variant).build()?;
        for &batch in batches {
            let x = normal_batch(batch, model.dim(), common.seed);
            let ms = median_ms(runs, || model.infer(&x).map(drop))?;
            if !as_json {
                println!("{variant:<16} batch {batch:>5}  forward {ms:>9.3} ms");
            }
            results.push(json!({"variant": variant.name(), "batch": batch, "forward_ms": ms}));
        }
        if train && !model.trainable_params().is_empty() {
            let task = FitTask::new(model.dim(), 1000, common.seed);
            let mut opt = AdamW::new(model.trainable_params(), AdamWConfig::default())?;
            let tape = Tape::new();
            let ms = median_ms(runs, || {
                train_step(&model, &task, &tape, &mut opt).map(drop)
            })?;
            if !as_json {
                println!("{variant:<16} batch  1000  train step {ms:>9.3} ms");
            }
            results.push(json!({"variant": variant.name(), "batch": 1000, "train_step_ms": ms}));
        }
    }
    if as_json {
        println!(
            "{}",
            json!({
                "threads": rayon::current_num_threads(),
                "kernel": nibble_tensor::cpu::kernel_path().name(),
                "activations": nibble_quant::act8::activations().name(),
                "q4_activations": nibble_quant::act8::activations().name(),
                "results": results
            })
        );
    }
    Ok(())
}
