//! BigNet's LoRA adapters in PEFT's on-disk layout (see [`nibble_nn::peft`], which reads and
//! writes them for any set of target modules; here the targets are BigNet's 18 linear layers).

use crate::error::Result;
use crate::model::BigNet;
use std::path::Path;

pub use nibble_nn::peft::{CONFIG_FILE, WEIGHTS_FILE};

/// Writes the model's adapters to `dir` (created if missing).
pub fn save_adapter(model: &BigNet, dir: &Path) -> Result<()> {
    if model.linears().all(|l| l.lora.is_none()) {
        return Err(nibble_nn::Error::Adapter {
            path: dir.to_path_buf(),
            what: format!("variant {} has no LoRA adapters to save", model.variant()),
        }
        .into());
    }
    Ok(nibble_nn::peft::save_adapter(model.linears(), dir)?)
}

/// Loads the adapters saved in `dir` into `model` (a `lora` or `qlora` model; a
/// `half_precision` or `low_precision` one gets adapters attached first). Every tensor in the
/// file must belong to one of the model's layers with the right shape.
pub fn load_adapter(model: &mut BigNet, dir: &Path) -> Result<()> {
    if model.linears().any(|l| l.lora.is_none()) {
        model.attach_lora(0)?;
    }
    Ok(nibble_nn::peft::load_adapter(model.linears_mut(), dir)?)
}
