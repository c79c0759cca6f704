#![no_main]
//! Arbitrary bytes as a data file for `nibble eval` / `finetune`: the checkpoint reader, then
//! `Dataset`'s checks (dtypes, ranks, N, finite features, label range) and its mini-batch
//! gather. Every outcome must be `Ok` or an error; a panic is a bug.

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nibble_io::{Checkpoint, Dataset};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = Checkpoint::from_bytes("fuzz.safetensors", Arc::new(data.to_vec())) else {
        return;
    };
    let Ok(set) = Dataset::from_checkpoint(&file) else {
        return;
    };
    // What reading promised.
    let n = set.test.len();
    assert_eq!(set.test.x.shape(), &[n, set.features()]);
    assert!(set.test.x.data().iter().all(|v| v.is_finite()));
    let _ = set.check_fits(set.features(), 10);
    let _ = set.check_fits(set.features() + 1, 1);
    if let Some(train) = &set.train {
        let rows: Vec<usize> = (0..train.len().min(5)).chain([train.len()]).collect();
        let _ = train.rows(&rows);
    }
});
