//! `bignet bench`: median milliseconds per forward and per training step.

use super::{normal_batch, Common};
use crate::error::{Error, Result};
use crate::infer::pack_weights_enabled;
use crate::train::{train_step_with, FitTask, TrainOptions};
use crate::variant::Variant;
use nibble_autograd::{AdamW, AdamWConfig, Tape};
use serde_json::json;
use std::time::Instant;

/// Median, minimum and maximum of timings in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    median: f64,
    min: f64,
    max: f64,
}

/// The least warm-up before timings are taken: [`WARM_UP_ROUNDS`] rounds, and more until this
/// long has passed. On a 2-core Intel Xeon (2026-12-05 00:20 UTC) two rounds alone left a
/// batch-1 forward of low_precision, the process's first model, at 1.2–2.3 ms median of 7
/// against 0.28–0.34 (its minimum) in the runs after: the first tens of milliseconds after
/// a model is built run slow (its fresh memory settling), and a batch-1 forward is a fraction of
/// a millisecond.
const WARM_UP: std::time::Duration = std::time::Duration::from_millis(200);
/// Warm-up rounds of every configuration, however long they take.
const WARM_UP_ROUNDS: usize = 2;
/// The most warm-up rounds (for calls far below a microsecond).
const MAX_WARM_UP_ROUNDS: usize = 10_000;

/// `runs` timings of each of `configs` configurations of `f` (`f(c)` runs configuration `c`),
/// taken in turns after warm-up rounds of each ([`WARM_UP_ROUNDS`], and more until
/// [`WARM_UP`] has passed).
fn time_interleaved(
    runs: usize,
    configs: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<Timing>> {
    let warm_start = Instant::now();
    let mut rounds = 0;
    while rounds < WARM_UP_ROUNDS || (warm_start.elapsed() < WARM_UP && rounds < MAX_WARM_UP_ROUNDS)
    {
        for c in 0..configs {
            f(c)?;
        }
        rounds += 1;
    }
    // Grown as the runs go, never reserved by the run count (a user's number): a count past
    // what memory holds is an error, not an abort.
    let mut times: Vec<Vec<f64>> = (0..configs).map(|_| Vec::new()).collect();
    for run in 0..runs.max(1) {
        for (c, t) in times.iter_mut().enumerate() {
            t.try_reserve(1).map_err(|_| Error::Input {
                what: format!(
                    "--runs {runs}: the timings no longer fit in memory after {run} runs"
                ),
            })?;
            let start = Instant::now();
            f(c)?;
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times.into_iter().map(summarize).collect())
}

fn summarize(mut times: Vec<f64>) -> Timing {
    times.sort_by(|a, b| a.total_cmp(b));
    Timing {
        median: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
    }
}

/// `runs` timings of `f`, after its warm-up (see [`time_interleaved`]).
fn time_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    let timings = time_interleaved(runs, 1, |_| f())?;
    Ok(timings[0])
}

/// Times every variant at every batch (and a training step under `train`'s options, if
/// given).
pub fn run(
    variants: &[Variant],
    batches: &[usize],
    train: Option<TrainOptions>,
    runs: usize,
    as_json: bool,
    common: &Common,
) -> Result<()> {
    let mut results = Vec::new();
    for &variant in variants {
        let model = common.spec(variant).build()?;
        // Forwards run on a copy packed for inference (f32 layers; the rest is shared).
        let mut packed = model.clone();
        if pack_weights_enabled() {
            packed.pack_for_inference()?;
        }
        for &batch in batches {
            super::check_batch_fits("--batch", batch, model.dim())?;
            let x = normal_batch(batch, model.dim(), common.seed);
            let t = time_ms(runs, || packed.infer(&x).map(drop))?;
            if !as_json {
                println!(
                    "{variant:<16} batch {batch:>5}  forward {:>9.3} ms  (min {:.3}, max {:.3})",
                    t.median, t.min, t.max
                );
            }
            results.push(json!({
                "variant": variant.name(), "batch": batch,
                "forward_ms": t.median, "min_ms": t.min, "max_ms": t.max,
            }));
        }
        let Some(options) = train else { continue };
        if model.trainable_params().is_empty() {
            eprintln!(
                "note: --train: {variant} has no trainable parameters, so no training step is \
                 timed for it"
            );
            continue;
        }
        // The plain step, the checkpointed one (with --checkpoint) and the step under all the
        // options given, timed in turns in the same run (a shared host drifts between runs).
        let mut configs = vec![TrainOptions::default()];
        for c in [
            TrainOptions {
                checkpoint: options.checkpoint,
                micro_batch: None,
            },
            options,
        ] {
            if !configs.contains(&c) {
                configs.push(c);
            }
        }
        let task = FitTask::new(model.dim(), 1000, common.seed);
        let tape = Tape::new();
        let mut opts = configs
            .iter()
            .map(|_| AdamW::new(model.trainable_params(), AdamWConfig::default()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let timings = time_interleaved(runs, configs.len(), |c| {
            train_step_with(&model, &task, &tape, &mut opts[c], configs[c]).map(drop)
        })?;
        let plain = timings[0].median;
        for (options, t) in configs.iter().zip(&timings) {
            if !as_json {
                println!(
                    "{variant:<16} batch  1000  train step {:>9.3} ms  (min {:.3}, max {:.3}; {:.2}x plain){}",
                    t.median,
                    t.min,
                    t.max,
                    t.median / plain,
                    describe(*options)
                );
            }
            results.push(json!({
                "variant": variant.name(), "batch": 1000,
                "train_step_ms": t.median, "min_ms": t.min, "max_ms": t.max,
                "checkpoint": options.checkpoint, "micro_batch": options.micro_batch,
                "vs_plain": t.median / plain,
            }));
        }
    }
    if as_json {
        println!(
            "{}",
            json!({
                "threads": rayon::current_num_threads(),
                "kernel": nibble_tensor::cpu::kernel_path().name(),
                // The integer tier int8 activations run on (AMX, AVX-512 VNNI, ...).
                "int_tier": nibble_quant::act8::IntTier::for_path(
                    nibble_tensor::cpu::kernel_path()
                )
                .name(),
                "activations": nibble_quant::act8::activations().name(),
                "q4_activations": nibble_quant::act8::activations().name(),
                "results": results
            })
        );
    }
    Ok(())
}

/// `, checkpointed, micro-batches of N` as they apply.
fn describe(options: TrainOptions) -> String {
    let mut s = String::new();
    if options.checkpoint {
        s.push_str("  checkpointed");
    }
    if let Some(n) = options.micro_batch {
        s.push_str(&format!("  micro-batches of {n}"));
    }
    s
}
