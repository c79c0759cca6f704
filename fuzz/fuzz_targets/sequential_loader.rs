#![no_main]
//! Arbitrary bytes as an `nn.Sequential` state dict (safetensors) for the `nibble` program's
//! reader: the structure from the keys (Linears with or without a bias, LayerNorms, gaps), every
//! stored layout of a Linear (plain floats, nibble's quantized parts, bitsandbytes' 4-bit
//! layouts, NF4 and FP4, and its 8-bit one, weight-normalized Linears), read as PyTorch's
//! defaults, again with RMSNorms and parameter-free norms in the gaps, and again with
//! GroupNorms of two groups, in the gaps too (an error where two do not divide a width), and,
//! when a model loads, a forward pass of two rows. Nothing may panic, abort or run out of memory.

use libfuzzer_sys::fuzz_target;
use nibble_io::Checkpoint;
use nibble_nn::{Activation, NormKind, Sequential, SequentialOptions};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = Checkpoint::from_bytes("fuzz.safetensors", Arc::new(data.to_vec())) else {
        return;
    };
    // The default reading, one with every 1-D weight an RMSNorm and parameter-free norms in
    // the gaps, and one with every 1-D weight and every gap a GroupNorm of two groups.
    let options = [
        SequentialOptions::new().activation(Activation::Relu),
        SequentialOptions::new().norm(NormKind::Rms).gap_layers(vec![
            Activation::layer_norm(1e-5),
            Activation::rms_norm(f32::EPSILON),
            Activation::Relu,
        ]),
        SequentialOptions::new()
            .norm(NormKind::Group(2))
            .gap_layers(vec![Activation::group_norm(2, 1e-5), Activation::Gelu]),
    ];
    for options in &options {
        let Ok(model) = Sequential::from_state_dict(&file, options) else {
            continue;
        };
        // A forward pass over the weights read, for models of a size a test can run.
        let Some(features) = model.in_features().filter(|&f| f > 0 && f <= 1 << 14) else {
            continue;
        };
        let x = nibble_tensor::Tensor::full(&[2, features], 0.5);
        let _ = model.infer(&x);
    }
});
