#![no_main]
//! Arbitrary bytes as a safetensors file (the loader detects the format by content, so this
//! reaches the zip reader too, but its corpus is seeded with safetensors files).

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    common::exercise("fuzz.safetensors", data);
});
