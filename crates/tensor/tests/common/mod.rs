//! Helpers the integration tests of this directory share, and the workspace's root `tests/`
//! (through `#[path]`).

/// Runs `f` on a rayon pool of its own with `threads` threads.
pub fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// The bit patterns of `values`, for comparing results exactly (NaNs and signed zeros too).
#[allow(dead_code)] // not every test file compares bits
pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|x| x.to_bits()).collect()
}
