#![no_main]
//! Arbitrary bytes behind the zip magic, as a PyTorch `.pth` archive (zip reader, pickle VM,
//! tensor rebuilding). The magic is prepended so that every input reaches the `.pth` path.

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"PK\x03\x04") {
        common::exercise("fuzz.pth", data);
    } else {
        let mut v = b"PK\x03\x04".to_vec();
        v.extend_from_slice(data);
        common::exercise("fuzz.pth", &v);
    }
});
