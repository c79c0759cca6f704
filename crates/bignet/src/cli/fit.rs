//! `bignet fit VARIANT`: the homework grader's fit.

use super::{mb, Common};
use crate::error::{Error, Result};
use crate::memory;
use crate::train::{fit_with, FitTask, TrainOptions};
use crate::variant::Variant;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::IsTerminal;
use std::path::Path;

/// Fits `variant` for `steps` steps and prints loss and accuracy per step and the best.
pub fn run(
    variant: Variant,
    steps: usize,
    lr: f32,
    as_json: bool,
    save_adapter: Option<&Path>,
    options: TrainOptions,
    common: &Common,
) -> Result<()> {
    if let Some(dir) = save_adapter {
        // Checked before training, not after it: a fit's minutes are not lost to a bad path.
        nibble_nn::peft::check_destination(dir).map_err(|e| Error::Input {
            what: format!("--save-adapter {}: {e}", dir.display()),
        })?;
    }
    let held_before = memory::current();
    let model = common.spec(variant).build()?;
    if let Some(dir) = save_adapter {
        if model.linears().all(|l| l.lora.is_none()) {
            return Err(Error::Input {
                what: format!(
                    "--save-adapter {}: variant {variant} has no LoRA adapters to save (lora \
                     and qlora have, and a model given --adapter)",
                    dir.display()
                ),
            });
        }
    }
    let task = FitTask::new(model.dim(), 1000, common.seed);
    let bar = (!as_json && std::io::stdout().is_terminal()).then(|| {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}")
                .expect("static template"),
        );
        bar
    });
    memory::reset_peak();
    let report = fit_with(
        &model,
        &task,
        steps,
        lr,
        options,
        |step, loss, acc| match &bar {
            Some(bar) => {
                bar.set_message(format!("loss {loss:.4}  accuracy {acc:.3}"));
                bar.inc(1);
            }
            None if !as_json => println!("step {step:>3}  loss {loss:.4}  accuracy {acc:.3}"),
            None => {}
        },
    )?;
    if let Some(bar) = bar {
        bar.finish();
    }
    // Model, adapters, gradients, AdamW state, the batch and the activations.
    let peak_mb = mb(memory::peak().saturating_sub(held_before));
    if let Some(dir) = save_adapter {
        // The last step's update can make the adapters non-finite after a finite loss: such
        // an adapter would only turn every output into NaN (and loading it is refused).
        check_adapters_finite(&model, dir, lr)?;
        crate::adapter::save_adapter(&model, dir)?;
        if !as_json {
            println!("adapters saved to {} (PEFT layout)", dir.display());
        }
    }
    if as_json {
        println!(
            "{}",
            json!({
                "variant": variant.name(),
                "steps": steps,
                "loss": report.loss,
                "accuracy": report.accuracy,
                "best_accuracy": report.best_accuracy,
                "peak_mb": peak_mb,
            })
        );
    } else {
        println!("best accuracy {:.3}", report.best_accuracy);
        if memory::is_installed() {
            println!("peak memory {peak_mb:.1} MB (model, adapters, gradients, optimizer state, batch, activations)");
        }
    }
    Ok(())
}

/// An error naming `--save-adapter dir`, the adapter tensor, its first NaN or infinite element
/// (row and column) and value, unless every LoRA adapter of `model` is finite.
fn check_adapters_finite(model: &crate::model::BigNet, dir: &Path, lr: f32) -> Result<()> {
    for lora in model.linears().filter_map(|l| l.lora.as_ref()) {
        for p in [&lora.a, &lora.b] {
            if let Some((at, value)) = p.value().first_non_finite() {
                return Err(Error::Input {
                    what: format!(
                        "--save-adapter {}: the trained `{}` holds {value} at {at}: training \
                         diverged (--lr {lr:?}); nothing was saved; try a lower --lr",
                        dir.display(),
                        p.name(),
                    ),
                });
            }
        }
    }
    Ok(())
}
