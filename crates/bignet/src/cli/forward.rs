//! `bignet forward`: `x` from a safetensors file in, `y` to a safetensors file out.

use super::Common;
use crate::checkpoint::{write_safetensors, Checkpoint, DType};
use crate::error::{Error, Result};
use crate::variant::Variant;
use std::collections::BTreeMap;
use std::path::Path;

/// Runs `variant` on tensor `x` of `input` and writes `y` to `output`. A NaN or infinite
/// element of `x`, or of `y` (finite weights and adapters, an `lora_alpha` of 1e36 say, can
/// overflow f32), is an error naming it, and nothing is written: `y` was written full of NaN
/// without a word, where `compare`, `fit` and `merge` refuse such a model.
pub fn run(variant: Variant, input: &Path, output: &Path, common: &Common) -> Result<()> {
    let mut model = common.spec(variant).build()?;
    if crate::infer::pack_weights_enabled() {
        model.pack_for_inference()?;
    }
    let file = Checkpoint::open(input)?;
    let Some((_, shape)) = file.info("x") else {
        return Err(Error::Input {
            what: format!("{}: no tensor `x` in the input file", input.display()),
        });
    };
    if shape.len() != 2 || shape[1] != model.dim() {
        return Err(Error::Input {
            what: format!(
                "{}: `x` must be [batch, {}] for this model, found {shape:?}",
                input.display(),
                model.dim()
            ),
        });
    }
    let shape = shape.to_vec();
    let x = file.tensor_f32("x", Some(&shape))?;
    if let Some((at, value)) = x.first_non_finite() {
        return Err(Error::Input {
            what: format!("{}: `x` is {value} at {at}", input.display()),
        });
    }
    let y = model.infer(&x)?;
    if let Some((at, value)) = y.first_non_finite() {
        return Err(Error::Model {
            what: format!(
                "{variant}'s output on `x` of {} is {value} at {at}: the model overflows f32 on \
                 this input (weights, adapters or inputs too large for f32's range, or for the \
                 Q4 kernel's factored sum: see the README), so no output was written",
                input.display()
            ),
        });
    }
    let bytes: &[u8] = bytemuck::cast_slice(y.data());
    write_safetensors(
        output,
        &[("y".to_string(), DType::F32, y.shape().to_vec(), bytes)],
        &BTreeMap::new(),
    )?;
    Ok(())
}
