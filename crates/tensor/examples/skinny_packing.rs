//! Times skinny f32 GEMMs (the QLoRA adapter's shapes and sweeps of the skinny dimension) with
//! every [`Packing`] on the process's kernel path, for choosing [`Packing::Auto`]'s thresholds:
//! medians (min) of `reps` runs, interleaved (one run of each choice per round), on the rayon
//! pool (`RAYON_NUM_THREADS`).
//!
//! `cargo run --release -p nibble-tensor --example skinny_packing -- 21`

use nibble_tensor::cpu::kernel_path;
use nibble_tensor::gemm::{gemm_with_packing, MatRef, Packing};
use nibble_tensor::Rng;
use std::time::Instant;

/// The A operand's layout: row-major `m x k`, or the transpose of a row-major `k x m`; both
/// matrices' rows are padded by `pad` floats (rows exactly 4 KiB apart share one set of the L1
/// and L2 caches: a padded stride shows what that costs).
#[derive(Clone, Copy)]
enum Layout {
    Rows,
    Transposed,
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(21)
        .max(1);
    let path = kernel_path();
    println!("{} threads, {path:?}", rayon::current_num_threads());
    let mut rng = Rng::new(0);
    // (name, m, n, k, A layout, row padding)
    let mut shapes: Vec<(String, usize, usize, usize, Layout, usize)> = vec![
        ("h = x·Aᵀ".into(), 1000, 32, 1024, Layout::Rows, 0),
        ("dB = dYᵀ·H".into(), 1024, 32, 1000, Layout::Transposed, 0),
        ("dB padded".into(), 1024, 32, 1000, Layout::Transposed, 16),
        ("dA = dHᵀ·X".into(), 32, 1024, 1000, Layout::Transposed, 0),
        ("dA padded".into(), 32, 1024, 1000, Layout::Transposed, 16),
        ("dXa = dH·A".into(), 1000, 1024, 32, Layout::Rows, 0),
    ];
    for n in [16, 48, 64, 96, 128] {
        shapes.push(("n sweep x·W".into(), 1000, n, 1024, Layout::Rows, 0));
    }
    for m in [8, 16, 64, 128] {
        shapes.push(("m sweep dHᵀ·X".into(), m, 1024, 1000, Layout::Transposed, 0));
    }
    let choices = [
        Packing::Packed,
        Packing::UnpackedA,
        Packing::UnpackedB,
        Packing::Unpacked,
        Packing::Auto,
    ];
    for (name, m, n, k, layout, pad) in shapes {
        let a: Vec<f32> = (0..(m + pad) * (k + pad)).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..k * (n + pad)).map(|_| rng.normal()).collect();
        let av = match layout {
            Layout::Rows => MatRef::new(&a, m, k, k + pad, 1).unwrap(),
            Layout::Transposed => MatRef::new(&a, k, m, m + pad, 1).unwrap().t(),
        };
        let bv = MatRef::new(&b, k, n, n + pad, 1).unwrap();
        let mut c = vec![0.0f32; m * n];
        let mut times = vec![Vec::with_capacity(reps); choices.len()];
        for round in 0..=reps {
            for (ci, &pk) in choices.iter().enumerate() {
                let s = Instant::now();
                gemm_with_packing(path, av, &bv, &mut c, false, pk).unwrap();
                if round > 0 {
                    times[ci].push(s.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let flop = 2.0 * (m * n * k) as f64;
        print!("{name:14} m={m:4} n={n:4} k={k:4}");
        for (ci, ts) in times.iter_mut().enumerate() {
            ts.sort_by(|p, q| p.total_cmp(q));
            let med = ts[reps / 2];
            print!(
                " | {:?} {:.3} ({:.3}) {:.0}GF",
                choices[ci],
                med,
                ts[0],
                flop / med / 1e6
            );
        }
        println!();
    }
}
