//! Times (median of 7) every quantized format's forward with f32 activations, with int8
//! activations as `matmul_t` dispatches them (the fused Q4 GEMV below batch 16, the generic
//! driver or the f32 path, see `nibble_quant::act8`), and on the generic int8 driver
//! (`act8::forward`) itself, all in the same run (1024x1024, batch 1 and 1024 by default;
//! `act8_bench DIM BATCH...`), on the current rayon pool (`RAYON_NUM_THREADS`) and kernel path
//! (`NIBBLE_KERNEL`), printing a table.

use nibble_quant::act8::{forward, with_activations, ActivationMode, IntCodes, IntTier};
use nibble_quant::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{Rng, Tensor, WeightMatrix};
use std::time::Instant;

fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..7)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let dim = args.first().copied().unwrap_or(1024);
    let batches = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![1, 1024]
    };
    let w = Tensor::randn(&[dim, dim], &mut Rng::new(1)).scale(1.0 / (dim as f32).sqrt());
    let fmts: Vec<(&str, Box<dyn Fmt>)> = vec![
        ("q4", Box::new(Q4Matrix::quantize(&w).unwrap())),
        ("nf4", Box::new(Nf4Matrix::quantize(&w).unwrap())),
        ("nf4_dq", Box::new(Nf4Matrix::quantize_double(&w).unwrap())),
        ("int8", Box::new(Int8Matrix::quantize(&w).unwrap())),
        ("lower", Box::new(LowerMatrix::quantize(&w).unwrap())),
    ];
    println!(
        "threads {} kernel {} int tier {:?}",
        rayon::current_num_threads(),
        nibble_quant::cpu::kernel_path().name(),
        IntTier::for_path(nibble_quant::cpu::kernel_path())
    );
    println!("format  batch  f32_ms  int8_ms  generic_ms  int8/f32  generic/f32");
    for &m in &batches {
        let x = Tensor::randn(&[m, dim], &mut Rng::new(2)).into_vec();
        let mut y = vec![0.0f32; m * dim];
        for (name, f) in &fmts {
            let mut run = |mode| {
                median_ms(|| {
                    with_activations(mode, || f.matmul_t(&x, m, &mut y, false)).unwrap();
                })
            };
            let a = run(ActivationMode::F32);
            let b = run(ActivationMode::Int8);
            let tier = IntTier::for_path(nibble_quant::cpu::kernel_path());
            let g = median_ms(|| {
                assert!(forward(tier, f.as_int(), &x, m, &mut y, false));
            });
            println!(
                "{name:7} {m:5}  {a:7.3}  {b:7.3}  {g:9.3}  {:8.2}  {:11.2}",
                b / a,
                g / a
            );
        }
    }
}

/// A format with both views.
trait Fmt: IntCodes + WeightMatrix {
    fn as_int(&self) -> &dyn IntCodes;
}
impl<T: IntCodes + WeightMatrix> Fmt for T {
    fn as_int(&self) -> &dyn IntCodes {
        self
    }
}
