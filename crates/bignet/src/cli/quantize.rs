//! `bignet quantize`: a state dict in, a quantized checkpoint out.

use super::{mb, Common};
use crate::error::{Error, Result};
use crate::persist::save_model;
use crate::variant::{Variant, WeightFormat};
use std::path::Path;
use std::time::Instant;

/// Quantizes the model in `common.weights` (or the seeded init) to `format` and writes `output`;
/// an adapter (`--adapter`, or the reference's trained adapters inside `--weights`) is refused:
/// the file would hold the base without its LoRA products.
pub fn run(format: WeightFormat, output: &Path, common: &Common) -> Result<()> {
    if format == WeightFormat::F32 {
        return Err(Error::Input {
            what: "--format f32 is not a quantization (use q4, nf4, nf4_dq, int8, lower or f16)"
                .into(),
        });
    }
    if let Some(adapter) = &common.adapter {
        // The checkpoint holds base weights only: the adapter's LoRA products would be lost
        // (and the biases it replaces kept), a model that is neither the base nor the adapted one.
        return Err(Error::Input {
            what: format!(
                "--adapter {}: quantize writes base weights only, so the adapter's LoRA products \
                 would be lost; fold them in with `bignet merge --into {} --output ...` (same \
                 --weights and --adapter), or quantize the base alone and give the adapter to \
                 the verbs that run it",
                adapter.display(),
                format.name()
            ),
        });
    }
    if let Some(weights) = &common.weights {
        let file = crate::loader::open_checkpoint(weights)?;
        if let Some(key) = crate::loader::state_dict_lora_key(&file) {
            // The reference's trained lora / qlora model: as with --adapter, its LoRA products
            // would be lost (the error said to load it as lora or qlora, which quantize takes
            // no variant for).
            return Err(Error::Input {
                what: format!(
                    "--weights {} holds the reference's trained LoRA adapters (`{key}`): \
                     quantize writes base weights only, so their products would be lost; fold \
                     them in with `bignet merge --weights {} --into {} --output ...`",
                    weights.display(),
                    weights.display(),
                    format.name()
                ),
            });
        }
    }
    let start = Instant::now();
    let model = common.spec(Variant::for_format(format)).build()?;
    save_model(&model, output)?;
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({} weights, {:.2} MB) in {:.2} s",
        output.display(),
        format.name(),
        mb(bytes as usize),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
