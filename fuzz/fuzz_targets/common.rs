//! Shared by both targets: load the bytes and touch every tensor through every accessor.

use std::sync::Arc;

use nibble_bignet::checkpoint::Checkpoint;

/// Largest copy of a broadcast view the fuzzer makes (libFuzzer's default memory limit is
/// 2 GiB).
const FUZZ_COPY_CAP: usize = 64 << 20;

/// Loads `data` and reads every tensor every way; any panic is a bug.
pub fn exercise(name: &str, data: &[u8]) {
    let Ok(ck) = Checkpoint::from_bytes(name, Arc::new(data.to_vec())) else {
        return;
    };
    let keys: Vec<String> = ck.keys().map(str::to_owned).collect();
    for k in &keys {
        let (dtype, shape) = ck.info(k).expect("listed key has info");
        let shape = shape.to_vec();
        let n: usize = shape.iter().product();
        let len = ck.byte_len(k).expect("a listed key's byte size");
        assert_eq!(len, n * dtype.size_of(), "{k}");
        if len > data.len() && len > FUZZ_COPY_CAP {
            // A broadcast (stride 0) view much larger than the input: its copy is bounded by
            // the machine's memory, not by the input, so the fuzzer does not make it.
            continue;
        }
        let bytes = ck.bytes(k).expect("listed key has bytes");
        assert_eq!(bytes.len(), n * dtype.size_of(), "{k}");
        let shared = ck.shared_bytes(k).expect("listed key has shared bytes");
        assert_eq!(shared.as_ref(), bytes);
        let _ = ck.tensor_f32(k, Some(&shape));
        let _ = ck.half(k, None);
    }
    let _ = ck.metadata();
}
