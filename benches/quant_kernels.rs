//! Quantized-weight kernels on a 1024x1024 weight with 2 threads, or `RAYON_NUM_THREADS` when
//! set: `cargo bench --bench quant_kernels` (filter with e.g. `-- q4/`). The kernel tier is
//! `NIBBLE_KERNEL`'s (printed at the start). Per format: batch 1 (fused GEMV), batch 8
//! (dequantized tiles), the whole matrix dequantized (`dequantize`: what the GEMM's panels
//! cost, next to `fwd_batch1024`), and the batch-1024 forward and backward.

use criterion::{criterion_group, criterion_main, Criterion};
use nibble_quant::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{Rng, Tensor, WeightMatrix};

const D: usize = 1024;

fn benches(c: &mut Criterion) {
    // Ignore the error if the global pool already exists. Without RAYON_NUM_THREADS, 2 threads
    // (the development machine); with it, rayon's default pool takes that count.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build_global();
    }
    eprintln!(
        "quant_kernels: kernel tier {}, {} threads",
        nibble_quant::cpu::kernel_path().name(),
        rayon::current_num_threads()
    );
    let mut rng = Rng::new(0);
    let k = 1.0 / (D as f32).sqrt();
    let w = Tensor::uniform(&[D, D], -k, k, &mut rng);
    let q4 = Q4Matrix::quantize(&w).unwrap();
    let nf4 = Nf4Matrix::quantize(&w).unwrap();
    let nf4dq = Nf4Matrix::quantize_double(&w).unwrap();
    let int8 = Int8Matrix::quantize(&w).unwrap();
    let lower = LowerMatrix::quantize(&w).unwrap();
    let x1 = Tensor::randn(&[1, D], &mut rng);
    let x8 = Tensor::randn(&[8, D], &mut rng);
    let mut y8 = vec![0.0f32; 8 * D];
    let xb = Tensor::randn(&[D, D], &mut rng);
    let mut y1 = vec![0.0f32; D];
    let mut yb = vec![0.0f32; D * D];
    c.bench_function("q4_quantize_1024x1024", |b| {
        b.iter(|| Q4Matrix::quantize(&w).unwrap())
    });
    c.bench_function("nf4_quantize_1024x1024", |b| {
        b.iter(|| Nf4Matrix::quantize(&w).unwrap())
    });
    // The opt-in int8-activation Q4 path on one thread.
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    c.bench_function("q4/fwd_batch1_int8_1thread", |b| {
        one.install(|| b.iter(|| q4.gemv_int8(x1.data(), &mut y1, false).unwrap()))
    });
    // The same through `matmul_t` on both threads, as `--q4-activations int8` runs it.
    nibble_quant::q4::set_q4_activations(nibble_quant::q4::Q4Activations::Int8);
    c.bench_function("q4/fwd_batch1_int8", |b| {
        b.iter(|| q4.matmul_t(x1.data(), 1, &mut y1, false).unwrap())
    });
    nibble_quant::q4::set_q4_activations(nibble_quant::q4::Q4Activations::F32);
    let formats: [(&str, &dyn WeightMatrix); 5] = [
        ("q4", &q4),
        ("nf4", &nf4),
        ("nf4dq", &nf4dq),
        ("int8", &int8),
        ("lower", &lower),
    ];
    for (name, wm) in formats {
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        g.bench_function("fwd_batch1", |b| {
            b.iter(|| wm.matmul_t(x1.data(), 1, &mut y1, false).unwrap())
        });
        g.bench_function("fwd_batch8", |b| {
            b.iter(|| wm.matmul_t(x8.data(), 8, &mut y8, false).unwrap())
        });
        g.bench_function("dequantize", |b| b.iter(|| wm.to_f32()));
        if name != "nf4dq" {
            g.bench_function("fwd_batch1024", |b| {
                b.iter(|| wm.matmul_t(xb.data(), D, &mut yb, false).unwrap())
            });
            g.bench_function("bwd_dx_batch1024", |b| {
                b.iter(|| wm.matmul(xb.data(), D, &mut yb, false).unwrap())
            });
        }
        g.finish();
    }
    let mut g = c.benchmark_group("f32");
    g.sample_size(10);
    g.bench_function("fwd_batch1024", |b| {
        b.iter(|| w.matmul_t(xb.data(), D, &mut yb, false).unwrap())
    });
    g.bench_function("bwd_dx_batch1024", |b| {
        b.iter(|| w.matmul(xb.data(), D, &mut yb, false).unwrap())
    });
    g.finish();
}

criterion_group!(quant, benches);
criterion_main!(quant);
