//! Times every AVX-512 microkernel shape and depth of K per call (`gemm_avx512_tile`) on one
//! f32 1024-wide layer's forward `x · Wᵀ` (batch `m`), interleaved round by round so that
//! machine noise hits them alike, next to `gemm` itself and `gemm` with one stage of all of K
//! (`gemm_with_stage`), then every `Packing` (operands packed or read in place) on the forward
//! `x · Wᵀ` and the backward `dY · W`: median, min and max of `reps` rounds
//! with the median's FLOP rate, on the rayon pool (`RAYON_NUM_THREADS`). Prints nothing but a
//! note on a CPU without the AVX-512 tier.
//!
//! `cargo run --release --example gemm_tiles -- 1024 256,128,64 15`

#[path = "common/timing.rs"]
mod timing;

use nibble::tensor::cpu::kernel_path;
use nibble::tensor::gemm::{
    gemm, gemm_avx512_tile, gemm_with_packing, gemm_with_stage, Avx512Tile, MatRef, Packing,
};
use nibble::tensor::{Rng, Tensor};
use std::time::Instant;

/// A timed case: its name, a tile and K slice (else `gemm`), and whether `gemm` runs one stage
/// of all of K.
type Case = (String, Option<(Avx512Tile, usize)>, bool);

fn main() {
    if !nibble::tensor::cpu::has_avx512() {
        println!("note: no AVX-512 tier on this CPU: nothing to compare");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let m: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let slices: Vec<usize> = args
        .get(2)
        .map_or("256,128,64", |s| s.as_str())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let reps: usize = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
        .max(1);
    let d = 1024;
    let mut rng = Rng::new(0);
    let w = Tensor::uniform(&[d, d], -0.03, 0.03, &mut rng);
    let x = Tensor::randn(&[m, d], &mut rng);
    let a = MatRef::row_major(x.data(), m, d).expect("x");
    let bt = MatRef::row_major(w.data(), d, d).expect("w").t();
    let mut y = vec![0.0f32; m * d];
    let mut cases: Vec<Case> = vec![
        ("gemm".into(), None, false),
        ("gemm, one stage".into(), None, true),
    ];
    for tile in Avx512Tile::ALL {
        for &ks in &slices {
            cases.push((format!("{} k {ks}", tile.name()), Some((tile, ks)), false));
        }
    }
    let mut times = vec![Vec::new(); cases.len()];
    for round in 0..=reps {
        for (c, (_, case, all_k)) in cases.iter().enumerate() {
            let s = Instant::now();
            match case {
                None if *all_k => gemm_with_stage(d * d, a, &bt, &mut y, false),
                None => gemm(a, &bt, &mut y, false),
                Some((tile, ks)) => gemm_avx512_tile(*tile, *ks, a, &bt, &mut y, false),
            }
            .expect("shapes match");
            if round > 0 {
                times[c].push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    println!("{} threads, batch {m}", rayon::current_num_threads());
    let flop = 2.0 * (m * d * d) as f64;
    let report = |name: &str, t: Vec<f64>| timing::report(name, 24, flop, t);
    for ((name, _, _), t) in cases.into_iter().zip(times) {
        report(&name, t);
    }
    // Every way of feeding the kernel, on the forward `x · Wᵀ` (Wᵀ a strided view: B is
    // always packed) and the backward `dY · W` (W row-major: B can be read in place).
    let packings = [
        Packing::Packed,
        Packing::UnpackedA,
        Packing::UnpackedB,
        Packing::Unpacked,
        Packing::Auto,
    ];
    let w_rows = MatRef::row_major(w.data(), d, d).expect("w");
    let mut times = vec![Vec::new(); 2 * packings.len()];
    for round in 0..=reps {
        for (c, t) in times.iter_mut().enumerate() {
            let (packing, backward) = (packings[c % packings.len()], c >= packings.len());
            let s = Instant::now();
            if backward {
                gemm_with_packing(kernel_path(), a, &w_rows, &mut y, false, packing)
            } else {
                gemm_with_packing(kernel_path(), a, &bt, &mut y, false, packing)
            }
            .expect("shapes match");
            if round > 0 {
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    for (c, t) in times.into_iter().enumerate() {
        let (packing, backward) = (packings[c % packings.len()], c >= packings.len());
        let what = if backward { "dY·W" } else { "x·Wᵀ" };
        report(&format!("{what} {packing:?}"), t);
    }
}
