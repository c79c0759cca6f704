//! Helpers of the kernels' unit tests: a comparison against an f64 reference, and a run on a
//! pool of a given thread count.

/// Asserts that every `got[i]` is within `tol · (1 + |want[i]|)` of `want[i]`, and that both
/// have the same length; `what` names the comparison in the failure.
pub(crate) fn assert_close_to_f64(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

/// `f` run inside a fresh rayon pool of `threads` threads.
pub(crate) fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
        .install(f)
}

/// The bits of each value, to compare results for bit-identity.
pub(crate) fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}
