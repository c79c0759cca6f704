//! BigNet's LoRA adapters in PEFT's on-disk layout (see [`nibble_nn::peft`], which reads and
//! writes them for any set of target modules; here the targets are BigNet's 18 linear layers).

use crate::error::Result;
use crate::model::BigNet;
use crate::source::norm_key;
use nibble_autograd::Param;
use nibble_nn::peft::OtherModule;
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
/// `half_precision` or `low_precision` one gets adapters attached first). `dir` may also be a
/// state-dict file holding the reference's adapter keys
/// ([`crate::loader::load_state_dict_adapters`]: a trained qlora model saved whole). Every tensor in the
/// file must belong to one of the model's layers with the right shape; base parameters it
/// holds (PEFT's `bias = "all"`, `modules_to_save`) replace the linear layers' and the
/// LayerNorms' (`model.1`, ...).
pub fn load_adapter(model: &mut BigNet, dir: &Path) -> Result<()> {
    if dir.is_file() {
        // A state dict with the reference's adapter keys (a trained qlora model saved whole).
        let file = crate::loader::open_checkpoint(dir)?;
        let mut with_adapters = model.clone();
        if with_adapters.linears().any(|l| l.lora.is_none()) {
            with_adapters.attach_lora(0)?;
        }
        crate::loader::load_state_dict_adapters(&mut with_adapters, &file)?;
        *model = with_adapters;
        return Ok(());
    }
    if model.linears().any(|l| l.lora.is_none()) {
        model.attach_lora(0)?;
    }
    // The LayerNorms' parameters (which PEFT's `bias = "all"` and `modules_to_save` may
    // replace), through clones of their handles (a clone shares the value it replaces).
    let norms: Vec<(String, Param, Param)> = model
        .norms()
        .iter()
        .enumerate()
        .map(|(b, n)| (norm_key(b), n.weight.clone(), n.bias.clone()))
        .collect();
    let others: Vec<OtherModule<'_>> = norms
        .iter()
        .map(|(name, weight, bias)| OtherModule {
            name: name.clone(),
            weight,
            bias: Some(bias),
        })
        .collect();
    Ok(nibble_nn::peft::load_adapter_with_others(
        model.linears_mut(),
        &others,
        dir,
    )?)
}
