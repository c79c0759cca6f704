//! Real data, every format, and what QLoRA brings back.
//!
//! ```sh
//! cargo run --release --example digits [-- --steps 300 --rank 4]
//! ```
//!
//! scikit-learn's handwritten digits (`tests/data/digits.safetensors`, made by
//! `tools/digits/make_digits.py`) and a small classifier trained on them in PyTorch
//! (`tests/data/digits_mlp.pth`: Linear 64→30, ReLU, LayerNorm, Linear 30→20, ReLU, Linear
//! 20→10; `tools/digits/train_digits.py`). The example evaluates the classifier in every weight
//! format — test accuracy, mean cross-entropy, cosine similarity of the logits to the f32
//! model's, model bytes — then fine-tunes a rank-r LoRA adapter on every Linear over the
//! frozen, quantized base of each format that lost accuracy, and shows the test accuracy
//! before and after. The same runs on any model and data with the `nibble` program
//! (`nibble eval --format all`, `nibble finetune`).

use nibble_cli::args::FormatChoice;
use nibble_cli::eval::{evaluate, print_table, EvalArgs};
use nibble_cli::finetune::{finetune, FinetuneArgs};
use nibble_io::WeightFormat;
use std::path::Path;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), nibble_cli::Error> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("tests/data/digits_mlp.pth");
    let data = root.join("tests/data/digits.safetensors");
    let (steps, rank) = (arg("--steps", 300), arg("--rank", 4));

    let report = evaluate(&EvalArgs {
        model: &model,
        data: &data,
        format: FormatChoice::All,
        activation: Some("relu"),
        layer_norm_eps: None,
        batch_norm_eps: None,
        norm: Some("layer"),
        rms_norm_eps: None,
        order: None,
        adapter: None,
        logits: None,
    })?;
    println!("digits (360 test rows), {}:\n", model.display());
    print_table(&report.rows);

    let reference = report.rows[0].accuracy;
    let lost: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r.accuracy < reference)
        .collect();
    if lost.is_empty() {
        println!("\nno format lost accuracy: nothing for QLoRA to bring back");
        return Ok(());
    }
    println!(
        "\nQLoRA (frozen base, rank {rank} LoRA on every Linear, {steps} AdamW steps, batch 64):\n"
    );
    println!(
        "{:<8} {:>9} {:>9} {:>9}",
        "format", "f32", "before", "after"
    );
    for row in lost {
        let format = WeightFormat::from_name(&row.format).expect("a format eval printed");
        let r = finetune(&FinetuneArgs {
            dora: false,
            model: &model,
            data: &data,
            format,
            rank,
            steps,
            lr: 1e-2,
            batch: 64,
            activation: Some("relu"),
            layer_norm_eps: None,
            batch_norm_eps: None,
            norm: Some("layer"),
            rms_norm_eps: None,
            order: None,
            save_adapter: None,
            seed: 0,
        })?;
        println!(
            "{:<8} {:>8.2}% {:>8.2}% {:>8.2}%",
            r.format,
            100.0 * reference,
            100.0 * r.accuracy_before,
            100.0 * r.accuracy_after
        );
    }
    Ok(())
}
