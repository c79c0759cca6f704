//! Where the time of one batch-1 quantized layer goes on a many-core pool: one 1024x1024 Q4
//! layer with int8 activations (`Q4Matrix::gemv_int8`), split as `matmul_t` splits batch 1
//! (one block of rows per thread), timed back to back as the peers' benchmarks time it.
//!
//! `batch1_anatomy [CALLS=3000]`, on the pool `RAYON_NUM_THREADS` sets (default: every core).
//! Each line is the median (min / max) of `CALLS` calls, µs:
//! - `kernel 1 block on 1 thread`: one thread's share (a `threads`-th of the rows, as its own
//!   matrix), the same share every call (in its cache), on the calling thread;
//! - `whole layer on 1 thread`: every row on the calling thread;
//! - `fork-join, empty tasks`: the pool's round trip with nothing to do, from outside the
//!   pool (as a caller's thread enters it) and from inside it (`install`);
//! - `hot team, empty tasks`: the same through `for_each_task` from outside, which a batch-1
//!   layer takes (`nibble_tensor::hot_team`: the threads linger between calls);
//! - `layer, from outside / inside the pool`: `gemv_int8` itself (from outside, on the hot team with the
//!   calling thread as one member: `nibble_tensor::parallel::for_each_task`).

use nibble_quant::Q4Matrix;
use nibble_tensor::{Rng, Tensor};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

const D: usize = 1024;

/// Median, minimum and maximum of `v`.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn report(name: &str, v: Vec<f64>) {
    let (med, min, max) = stats(v);
    println!("{name:44} {med:8.2}  ({min:.2} / {max:.2})");
}

/// µs per call of `f`, each call timed alone, after `calls / 10` untimed calls.
fn time_calls(calls: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..calls / 10 {
        f();
    }
    (0..calls)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3000);
    let threads = rayon::current_num_threads();
    let rows = D.div_ceil(threads).div_ceil(4) * 4;
    println!(
        "batch1_anatomy: Q4 {D}x{D}, int8 activations, {threads} threads ({rows} rows each), kernel tier {}, {calls} calls",
        nibble_quant::cpu::kernel_path().name()
    );
    let mut rng = Rng::new(0);
    let w = Tensor::randn(&[D, D], &mut rng);
    let q = Q4Matrix::quantize(&w).unwrap();
    // One thread's share of the rows as a matrix of its own.
    let block = Q4Matrix::quantize(
        &Tensor::from_vec(&[rows.min(D), D], w.data()[..rows.min(D) * D].to_vec()).unwrap(),
    )
    .unwrap();
    let x = Tensor::randn(&[D], &mut rng).into_vec();
    let mut y = vec![0.0f32; D];
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let path = nibble_quant::cpu::kernel_path();

    let mut yb = vec![0.0f32; rows];
    report(
        "kernel 1 block on 1 thread",
        one.install(|| {
            time_calls(calls, || {
                block.gemv_int8_with(path, &x, &mut yb, false).unwrap()
            })
        }),
    );
    report(
        "whole layer on 1 thread",
        one.install(|| time_calls(calls, || q.gemv_int8_with(path, &x, &mut y, false).unwrap())),
    );
    let empty = |y: &mut [f32]| {
        y.par_chunks_mut(rows).for_each(|c| {
            black_box(c);
        })
    };
    report(
        "fork-join, empty tasks, from outside",
        time_calls(calls, || empty(&mut y)),
    );
    report(
        "hot team, empty tasks, from outside",
        time_calls(calls, || {
            nibble_tensor::parallel::for_each_task(threads, |t| {
                black_box(t);
            })
        }),
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    report(
        "fork-join, empty tasks, inside the pool",
        pool.install(|| time_calls(calls, || empty(&mut y))),
    );
    report(
        "layer, from outside the pool",
        time_calls(calls, || q.gemv_int8(&x, &mut y, false).unwrap()),
    );
    report(
        "layer, inside the pool",
        pool.install(|| time_calls(calls, || q.gemv_int8(&x, &mut y, false).unwrap())),
    );
}
