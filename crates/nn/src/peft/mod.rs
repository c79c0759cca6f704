//! LoRA adapters in PEFT's on-disk layout, so that PEFT can read ours and we can read PEFT's:
//! a directory holding `adapter_model.safetensors` (or, as PEFT writes without safetensors,
//! `adapter_model.bin`; keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`) and
//! `adapter_config.json` (`peft_type` "LORA", `r`, `lora_alpha`, `target_modules`, ...).
//! The target modules are the [`Linear`](crate::linear::Linear) layers given, named by [`Linear::name`](crate::linear::Linear::name) (the module's
//! path in the PyTorch model: `model.0.model.0`, or `0`, `3` for an `nn.Sequential`).
//!
//! nibble's adapters are unscaled (`y += B A x`), so we save `lora_alpha = r`. Loading a PEFT
//! adapter with another `lora_alpha` folds PEFT's scaling `lora_alpha / r` (or
//! `lora_alpha / √r` with `use_rslora`) into B; settings the config leaves out take PEFT's
//! `LoraConfig` defaults ([`defaults`]: `r` 8, `lora_alpha` 8, no rsLoRA, `bias` "none").
//! Only the Linears that `target_modules` selects (less `exclude_modules` and
//! `modules_to_save`) are adapted, as PEFT adapts them; see [`load_adapter_into`].

use crate::error::Error;
use std::path::Path;

mod config;
mod load;
mod save;

pub use config::{
    defaults, AdapterConfig, LayerFilter, ModuleSelector, ALL_LINEAR, DUMMY_TARGET_MODULES,
};
pub use load::{
    load_adapter, load_adapter_into, load_adapter_with_others, lora_weight_key, BatchNormUpdate,
    BatchNormView, OtherModule,
};
pub use save::{check_destination, save_adapter};

/// File name of the adapter weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the adapter config inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights that PEFT writes with `safe_serialization=False` (a
/// `torch.save` state dict), read where [`WEIGHTS_FILE`] is absent.
pub const WEIGHTS_FILE_PTH: &str = "adapter_model.bin";

/// The weights file of adapter directory `dir`: [`WEIGHTS_FILE`], or [`WEIGHTS_FILE_PTH`] where
/// only that one exists (so a missing adapter is reported as the safetensors file).
pub fn weights_path(dir: &Path) -> std::path::PathBuf {
    let safetensors = dir.join(WEIGHTS_FILE);
    let pth = dir.join(WEIGHTS_FILE_PTH);
    if !safetensors.exists() && pth.is_file() {
        pth
    } else {
        safetensors
    }
}

pub(crate) fn adapter_error(dir: &Path, what: impl Into<String>) -> Error {
    Error::Adapter {
        path: dir.to_path_buf(),
        what: what.into(),
    }
}
