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

/// What `fit` is asked for besides the variant and the options every verb takes.
#[derive(Debug, Clone, Copy)]
pub struct FitRequest<'a> {
    /// Training steps.
    pub steps: usize,
    /// AdamW's learning rate.
    pub lr: f32,
    /// One JSON object instead of lines.
    pub as_json: bool,
    /// Where to save the trained adapters, if anywhere.
    pub save_adapter: Option<&'a Path>,
    /// Make the adapters DoRA ones before training ([`crate::BigNet::enable_dora`]).
    pub dora: bool,
    /// Checkpointing and micro-batches.
    pub options: TrainOptions,
}

/// Fits `variant` for `steps` steps and prints loss and accuracy per step and the best.
pub fn run(variant: Variant, request: FitRequest<'_>, common: &Common) -> Result<()> {
    let FitRequest {
        steps,
        lr,
        as_json,
        save_adapter,
        dora,
        options,
    } = request;
    if let Some(dir) = save_adapter {
        // Checked before training, not after it: a fit's minutes are not lost to a bad path.
        nibble_nn::peft::check_destination(dir).map_err(|e| Error::Input {
            what: format!("--save-adapter {}: {e}", dir.display()),
        })?;
    }
    if let Some(dir) = common.adapter.as_deref().filter(|a| a.is_dir()) {
        // Checked before training: an adapter whose training here would not be PEFT's.
        check_peft_adapter_trainable(dir)?;
    }
    let held_before = memory::current();
    let mut model = common.spec(variant).build()?;
    if dora {
        if model.linears().all(|l| l.lora.is_none()) {
            return Err(Error::Input {
                what: format!(
                    "--dora: variant {variant} has no LoRA adapters to make DoRA ones (lora and \
                     qlora have, and a model given --adapter)"
                ),
            });
        }
        model.enable_dora()?;
    }
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
                "dora": model.linears().any(|l| l.lora.as_ref().is_some_and(|a| a.dora.is_some())),
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
        for p in &lora.params() {
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

/// Whether `fit` can train the PEFT adapter in directory `dir` as PEFT trains it. An error
/// (before any training) where it cannot:
/// - a linear layer of BigNet that the adapter does not adapt (not in its `target_modules`, or
///   no `lora_A` / `lora_B` of it in the file): `fit` trains an adapter on every layer, so such
///   a layer would get a fresh seeded rank-32 adapter and train it, which PEFT's model has not
///   got;
/// - base parameters in the file (PEFT's `bias = "all"` / `"lora_only"`, `modules_to_save`):
///   PEFT trains them with the adapter; `fit` trains only the LoRA matrices, and
///   `--save-adapter` wrote only those, so the saved adapter lost the loaded values (outputs
///   0.4 off on a width-40 BigNet, with no training at all);
/// - a bias on each lora_B (PEFT's `lora_bias`): PEFT trains it, `fit` would not, as above.
///
/// A scaling (`lora_alpha / r`, `use_rslora`, `alpha_pattern`) other than 1 trains as PEFT
/// trains it: nibble folds it into B ([`nibble_nn::LoraAdapter::b_scale`]) and AdamW steps
/// on the B PEFT holds ([`nibble_autograd::AdamW::set_storage_scale`]). DoRA (`use_dora`)
/// trains as PEFT trains it: the magnitudes with A and B, the weight norms computed again from
/// A and B at each step and held constant in the backward ([`nibble_nn::Dora`]).
fn check_peft_adapter_trainable(dir: &Path) -> Result<()> {
    use crate::source::{linear_key, BLOCKS, LAYERS_PER_BLOCK};
    let config = nibble_nn::peft::AdapterConfig::read(dir)?;
    if config.dropout > 0.0 {
        eprintln!(
            "note: --adapter {}: its lora_dropout {} is not applied: fit trains without dropout, \
             where PEFT's training drops inputs of lora_A at random",
            dir.display(),
            config.dropout
        );
    }
    let weights = nibble_nn::peft::weights_path(dir);
    let file = crate::checkpoint::Checkpoint::open(&weights)?;
    let names: Vec<String> = (0..BLOCKS)
        .flat_map(|b| (0..LAYERS_PER_BLOCK).map(move |l| linear_key(b, l)))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let has =
        |name: &str, part: &str| nibble_nn::peft::lora_weight_key(&file, name, part).is_some();
    let unadapted: Vec<&str> = refs
        .iter()
        .copied()
        .filter(|n| !(config.targets(n, &refs) && has(n, "lora_A") && has(n, "lora_B")))
        .collect();
    if !unadapted.is_empty() {
        return Err(Error::Input {
            what: format!(
                "--adapter {}: fit trains an adapter on each of BigNet's {} linear layers, and \
                 this one adapts {} of them: {} would get fresh rank-{} adapters and train \
                 them, which PEFT's training of this adapter does not (give an adapter of \
                 every layer; forward, compare, bench and merge run this one as it is)",
                dir.display(),
                refs.len(),
                refs.len() - unadapted.len(),
                list(&unadapted),
                crate::model::LORA_RANK,
            ),
        });
    }
    if config.lora_bias {
        return Err(Error::Input {
            what: format!(
                "--adapter {}: the adapter has a bias on each lora_B (`lora_bias`), which PEFT \
                 trains with it; fit trains only the LoRA matrices and --save-adapter writes \
                 only those, so the biases would neither train nor be saved (forward, compare, \
                 bench and merge run this adapter as it is)",
                dir.display(),
            ),
        });
    }
    let base: Vec<&str> = file.keys().filter(|k| !k.contains(".lora_")).collect();
    if !base.is_empty() {
        return Err(Error::Input {
            what: format!(
                "--adapter {}: the adapter carries base parameters ({}: PEFT's bias = \"all\" \
                 or \"lora_only\", or modules_to_save), which PEFT trains with it; fit trains \
                 only the LoRA matrices and --save-adapter writes only those, so they would \
                 neither train nor be saved (forward, compare, bench and merge run this \
                 adapter as it is)",
                dir.display(),
                list(&base),
            ),
        });
    }
    Ok(())
}

/// The first few of `names`, comma-separated, and how many more.
fn list(names: &[&str]) -> String {
    const SHOWN: usize = 4;
    let mut s = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}
