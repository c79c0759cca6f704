//! Timing summaries shared by the GEMM and LayerNorm examples (each includes this file and
//! uses part of it).
#![allow(dead_code)]

/// Prints `name` (padded to `width`) with the median, minimum and maximum of `times` (ms) and
/// the median's rate for `flop` floating-point operations.
pub fn report(name: &str, width: usize, flop: f64, mut times: Vec<f64>) {
    times.sort_by(|p, q| p.total_cmp(q));
    let med = times[times.len() / 2];
    println!(
        "{name:width$} median {med:.3} ms ({:.0} GFLOP/s), min {:.3}, max {:.3}",
        flop / med / 1e6,
        times[0],
        times[times.len() - 1]
    );
}

/// `(min, median)` of `times`.
pub fn min_median(times: &[f64]) -> (f64, f64) {
    let mut v = times.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2])
}
