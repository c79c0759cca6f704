//! `bignet merge`: fold LoRA adapters into the base weights.

use super::{normal_batch, Common};
use crate::error::{Error, Result};
use crate::merge::merge_adapters;
use crate::persist::save_model;
use crate::variant::{Variant, WeightFormat};
use serde_json::json;
use std::path::Path;

/// Merges the adapters of `--adapter` (or those of a `--weights` state dict that holds the
/// reference's trained adapters) on `variant`'s base into `into` storage, writes `output`,
/// and reports how far the merged model's outputs are from the unmerged one's.
pub fn run(
    variant: Variant,
    into: WeightFormat,
    output: &Path,
    as_json: bool,
    common: &Common,
) -> Result<()> {
    if common.adapter.is_none() && !weights_hold_adapters(common)? {
        return Err(Error::Input {
            what: "merge needs adapters to fold in: --adapter DIR, or --weights holding the \
                   reference's trained lora / qlora state dict (its `….lora_a.weight` and \
                   `….lora_b.weight`)"
                .into(),
        });
    }
    let model = common.spec(variant).build()?;
    let x = normal_batch(1024, model.dim(), common.seed);
    let unmerged = super::compare::check_output_finite(variant, model.infer(&x)?)?;
    let (merged, report) = merge_adapters(&model, into)?;
    drop(model);
    let y = super::compare::check_output_finite(merged.variant(), merged.infer(&x)?)?;
    let (max, mean) = y.abs_diff_stats(&unmerged)?;
    save_model(&merged, output)?;
    if as_json {
        println!(
            "{}",
            json!({
                "variant": variant.name(),
                "into": into.name(),
                "output": output.display().to_string(),
                "max_weight_error": report.max_weight_error,
                "mean_weight_error": report.mean_weight_error,
                "max_output_diff": max,
                "mean_output_diff": mean,
            })
        );
    } else {
        println!(
            "merged into {}: weights |Δ| max {:.3e} mean {:.3e}; outputs vs unmerged |Δ| max {max:.3e} mean {mean:.3e}; wrote {}",
            into.name(),
            report.max_weight_error,
            report.mean_weight_error,
            output.display()
        );
    }
    Ok(())
}

/// Whether `--weights` is a state dict of the reference's trained LoRA model, whose adapters
/// the model takes from the file itself ([`crate::loader::load_state_dict_lora`]).
fn weights_hold_adapters(common: &Common) -> Result<bool> {
    let Some(path) = &common.weights else {
        return Ok(false);
    };
    let file = crate::loader::open_checkpoint(path)?;
    Ok(crate::loader::state_dict_lora_key(&file).is_some())
}
