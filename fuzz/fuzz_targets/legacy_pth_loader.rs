#![no_main]
//! Arbitrary bytes behind the magic-number pickle of PyTorch's legacy `.pth` format (its
//! pickles back to back, then the storages). The magic pickle is prepended so that every input
//! reaches the legacy reader.

use libfuzzer_sys::fuzz_target;

mod common;

/// `torch.save`'s first pickle in the legacy format: PROTO 2, LONG1 of the magic number, STOP.
const MAGIC_PICKLE: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";

fuzz_target!(|data: &[u8]| {
    if data.starts_with(MAGIC_PICKLE) {
        common::exercise("fuzz.pth", data);
    } else {
        let mut v = MAGIC_PICKLE.to_vec();
        v.extend_from_slice(data);
        common::exercise("fuzz.pth", &v);
    }
});
