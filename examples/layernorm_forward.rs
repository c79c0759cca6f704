//! Times the forward LayerNorms on one `[m, c]` input (default `[1024, 1024]`, BigNet's
//! batch): `add_layer_norm_assign` (an inference block's residual add and LayerNorm),
//! `layer_norm_assign` and `layer_norm` (with its statistics, as training runs it), `calls`
//! calls each in turns, printing each one's minimum and median. On the rayon pool
//! (`RAYON_NUM_THREADS`) and the process's kernel path (`NIBBLE_KERNEL`).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release --example layernorm_forward -- 201 1024 1024`

use nibble::tensor::layernorm::{add_layer_norm_assign, layer_norm, layer_norm_assign};
use nibble::tensor::{Rng, Tensor};
use std::hint::black_box;
use std::time::Instant;

#[path = "common/timing.rs"]
mod timing;
use timing::min_median;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("calls, m and c are whole numbers"))
        .collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default).max(1);
    let (calls, m, c) = (arg(0, 201), arg(1, 1024), arg(2, 1024));
    nibble::tensor::heap::retain_freed_memory();
    let mut rng = Rng::new(0);
    let x0 = Tensor::randn(&[m, c], &mut rng);
    let delta = Tensor::randn(&[m, c], &mut rng);
    let w: Vec<f32> = (0..c).map(|_| rng.uniform(0.5, 1.5)).collect();
    let b: Vec<f32> = (0..c).map(|_| rng.uniform(-1.0, 1.0)).collect();
    println!(
        "forward LayerNorms [{m}, {c}], {} threads, kernel path {}",
        rayon::current_num_threads(),
        nibble::tensor::cpu::kernel_path().name()
    );
    let mut x = x0.data().to_vec();
    let mut times = [const { Vec::new() }; 3];
    let mut timed = |i: usize, f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        times[i].push(t.elapsed().as_secs_f64() * 1e3);
    };
    for _ in 0..calls {
        x.copy_from_slice(x0.data());
        timed(0, &mut || {
            add_layer_norm_assign(&mut x, delta.data(), c, &w, &b, 1e-5).expect("shapes agree")
        });
        timed(1, &mut || {
            layer_norm_assign(&mut x, c, &w, &b, 1e-5).expect("shapes agree")
        });
        timed(2, &mut || {
            black_box(layer_norm(&x0, &w, &b, 1e-5).expect("shapes agree"));
        });
    }
    for (name, t) in ["add_layer_norm_assign", "layer_norm_assign", "layer_norm"]
        .iter()
        .zip(&times)
    {
        let (min, med) = min_median(t);
        println!("{name}: min {min:.3} ms, median {med:.3} ms");
    }
}
