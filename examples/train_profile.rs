//! Where a BigNet training step's time goes: the whole step (`train_step`, batch 1000 of the
//! grader's fit task, AdamW), the forward on its own (recorded on a tape of its own and
//! dropped) with its time per op name (`Tape::forward_profile`), and the backward per op name
//! (`Tape::backward_profile`), medians and means over `steps` steps after one warm-up. On the
//! rayon pool (`RAYON_NUM_THREADS`), with freed buffers kept in the heap as the `bignet`
//! program keeps them.
//!
//! `cargo run --release --example train_profile -- qlora int8 5`

use nibble::autograd::{AdamW, AdamWConfig, Tape};
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::train::{train_step, FitTask};
use nibble::bignet::Variant;
use nibble_quant::act8::ActivationMode;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let variant: Variant = args
        .get(1)
        .map_or("qlora", |s| s.as_str())
        .parse()
        .expect("a variant name (lora, qlora, ...)");
    let mode = ActivationMode::parse(args.get(2).map_or("f32", |s| s.as_str()))
        .expect("activations: f32 or int8");
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    nibble::tensor::heap::retain_freed_memory();
    let mut model = ModelSpec::seeded(variant, 0)
        .build()
        .expect("a seeded model builds");
    model.set_activations(Some(mode));
    let task = FitTask::new(1024, 1000, 0);
    let mut opt = AdamW::new(model.trainable_params(), AdamWConfig::default())
        .expect("the variant has trainable parameters");
    let tape = Tape::new();
    println!(
        "{variant}, activations {}, {} threads, batch 1000, {steps} steps",
        mode.name(),
        rayon::current_num_threads()
    );
    let (mut step_ms, mut fwd_ms) = (Vec::new(), Vec::new());
    let forward_tape = Tape::new();
    for s in 0..=steps {
        if s == 1 {
            tape.set_profiling(true);
        }
        let t = Instant::now();
        train_step(&model, &task, &tape, &mut opt).expect("a step runs");
        let step = t.elapsed().as_secs_f64() * 1e3;
        let forward = rayon::scope(|_| {
            if s == 1 {
                forward_tape.set_profiling(true);
            }
            // Empty already; restarts the profile's forward clock after the step above.
            forward_tape.clear();
            let t = Instant::now();
            let out = model
                .forward(&forward_tape, &task.x)
                .expect("a forward runs");
            let ms = t.elapsed().as_secs_f64() * 1e3;
            drop(out);
            forward_tape.clear();
            ms
        });
        if s > 0 {
            step_ms.push(step);
            fwd_ms.push(forward);
        }
    }
    let profile = tape.backward_profile();
    let backward: f64 = profile
        .iter()
        .filter(|t| t.name != "checkpoint")
        .map(|t| t.seconds)
        .sum::<f64>()
        * 1e3
        / steps as f64;
    println!(
        "step {:.2} ms (median), forward {:.2} ms (median, on a tape of its own), backward ops {:.2} ms (mean), the rest (loss, head, optimizer, bookkeeping) {:.2} ms",
        median(step_ms.clone()),
        median(fwd_ms.clone()),
        backward,
        median(step_ms) - median(fwd_ms) - backward
    );
    println!("forward per op (from the record before), ms per step (mean), calls per step:");
    print_times(forward_tape.forward_profile(), steps);
    println!("backward per op, ms per step (mean), calls per step:");
    print_times(profile, steps);
}

/// One line per op name: ms and calls per step.
fn print_times(times: Vec<nibble::autograd::OpTime>, steps: usize) {
    for t in times {
        println!(
            "  {:24} {:8.3}  {:5.1}",
            t.name,
            t.seconds * 1e3 / steps as f64,
            t.calls as f64 / steps as f64
        );
    }
}
