//! Fine-tune BigNet with LoRA (or QLoRA with `--qlora`) on the homework grader's task, then save
//! the adapters in PEFT's layout.
//!
//! ```sh
//! cargo run --release --example train_lora                      # f16 base + LoRA, seeded init
//! cargo run --release --example train_lora -- --qlora           # 4-bit base + LoRA
//! cargo run --release --example train_lora -- --weights bignet.pth --out my_adapter
//! cargo run --release --example train_lora -- --qlora --checkpoint --micro-batch 250  # least memory
//! ```

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use nibble::autograd::{AdamW, AdamWConfig, Tape};
use nibble::bignet::adapter::save_adapter;
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::memory::{self, CountingAlloc};
use nibble::bignet::train::{accuracy, train_step_with, FitTask, TrainOptions};
use nibble::bignet::Variant;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Fine-tune BigNet with LoRA adapters.
#[derive(Parser, Debug)]
struct Args {
    /// Use a 4-bit (Q4) base instead of f16 (QLoRA).
    #[arg(long)]
    qlora: bool,
    /// DoRA adapters (PEFT's use_dora): each layer's output scaled per output by a trained
    /// magnitude over the norm of its adapted weight's row.
    #[arg(long)]
    dora: bool,
    /// A BigNet checkpoint (.pth or .safetensors); default: PyTorch's init from --seed.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Training steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Seed of the init, the adapters and the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to save the adapters (PEFT layout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Checkpoint each block: keep only its input and recompute it in the backward (same
    /// gradients, bit for bit; less memory, about two thirds of a forward more per step).
    #[arg(long)]
    checkpoint: bool,
    /// Accumulate the gradients over micro-batches of N rows (the same update up to the order
    /// of the sums over rows; less memory).
    #[arg(long, value_name = "N")]
    micro_batch: Option<usize>,
}

fn evaluate(model: &nibble::bignet::BigNet, task: &FitTask) -> nibble::bignet::Result<f32> {
    let tape = Tape::new();
    let logits = tape.no_grad(|| -> nibble::bignet::Result<_> {
        let out = model.forward(&tape, &task.x)?;
        Ok(tape.frozen_linear(&out, &task.head, None)?)
    })?;
    accuracy(logits.value(), &task.y)
}

fn run(args: Args) -> nibble::bignet::Result<()> {
    let variant = if args.qlora {
        Variant::Qlora
    } else {
        Variant::Lora
    };
    let spec = ModelSpec {
        weights: args.weights.clone(),
        ..ModelSpec::seeded(variant, args.seed)
    };
    let held_before = memory::current();
    let mut model = spec.build()?;
    if args.dora {
        model.enable_dora()?;
    }
    let model_bytes = memory::current() - held_before;
    let counts = model.counts();
    println!(
        "{variant}: width {}, {:.2} M trainable / {:.2} M frozen parameters, {:.2} MB in memory",
        model.dim(),
        counts.trainable as f64 / 1e6,
        counts.non_trainable as f64 / 1e6,
        model_bytes as f64 / (1 << 20) as f64
    );
    let task = FitTask::new(model.dim(), 1000, args.seed);
    let before = evaluate(&model, &task)?;
    println!("accuracy before fine-tuning: {before:.3}");

    let mut opt = AdamW::new(
        model.trainable_params(),
        AdamWConfig {
            lr: args.lr,
            ..AdamWConfig::default()
        },
    )?;
    let tape = Tape::new();
    let options = TrainOptions {
        checkpoint: args.checkpoint,
        micro_batch: args.micro_batch,
    };
    let bar = std::io::stdout().is_terminal().then(|| {
        let bar = ProgressBar::new(args.steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}")
                .expect("static template"),
        );
        bar
    });
    memory::reset_peak();
    let start = Instant::now();
    for step in 0..args.steps {
        let (loss, acc) = train_step_with(&model, &task, &tape, &mut opt, options)?;
        match &bar {
            Some(bar) => {
                bar.set_message(format!("loss {loss:.4}  accuracy {acc:.3}"));
                bar.inc(1);
            }
            None => println!("step {step:>3}  loss {loss:.4}  accuracy {acc:.3}"),
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    let elapsed = start.elapsed();
    let peak = memory::peak().saturating_sub(held_before);
    let after = evaluate(&model, &task)?;
    println!("accuracy after {} steps: {after:.3}", args.steps);
    println!(
        "training: {:.1} ms/step, peak memory {:.1} MB (model, adapters, optimizer state, activations)",
        elapsed.as_secs_f64() * 1e3 / args.steps.max(1) as f64,
        peak as f64 / (1 << 20) as f64
    );
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("{}_adapter", variant.name())));
    save_adapter(&model, &out)?;
    println!("adapters saved to {} (PEFT layout)", out.display());
    Ok(())
}

fn main() {
    nibble::tensor::heap::retain_freed_memory();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
