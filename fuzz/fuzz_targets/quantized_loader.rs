#![no_main]
//! Arbitrary bytes as a quantized BigNet checkpoint (`bignet quantize` output): the safetensors
//! reader, every format's part checks (`FrozenWeight::from_checkpoint`), and — when a model
//! loads — a forward pass over the mapped weights. Nothing may panic, abort or run out of memory.

use libfuzzer_sys::fuzz_target;
use nibble_bignet::checkpoint::Checkpoint;
use nibble_bignet::persist::{load_quantized, quantized_format};
use nibble_bignet::Variant;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = Checkpoint::from_bytes("fuzz.safetensors", Arc::new(data.to_vec())) else {
        return;
    };
    let Ok(Some(format)) = quantized_format(&file) else {
        return;
    };
    if let Ok(model) = load_quantized(&file, format, Variant::for_format(format), 0) {
        let x = nibble_tensor::Tensor::full(&[2, model.dim()], 0.5);
        let _ = model.infer(&x);
    }
});
