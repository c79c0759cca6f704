//! GEMM / GEMV benchmarks for the tensor crate: the linear layer's three products at 1024³
//! (f32 and f16 weights) and batch-1 GEMV. Throughput is in FLOP (2·m·n·k), so criterion's
//! "elem/s" reads as FLOP/s.
//!
//! `cargo bench --bench gemm`; compare against `/work/shared/tools/peak_flops.c`. Threads:
//! rayon's default (all cores, or `RAYON_NUM_THREADS`); kernel tier: `NIBBLE_KERNEL`. On an
//! AVX-512 CPU the group `gemm_1024_avx512_tiles` compares the AVX-512 microkernel shapes.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use nibble_tensor::{linear_backward_weight, HalfTensor, Rng, Tensor, WeightMatrix};

const N: usize = 1024;

fn benches(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let x = Tensor::randn(&[N, N], &mut rng);
    let w = Tensor::randn(&[N, N], &mut rng);
    let wh = HalfTensor::from_f32(&w);
    let dy = Tensor::randn(&[N, N], &mut rng);
    let flops = 2 * (N * N * N) as u64;

    let mut g = c.benchmark_group("gemm_1024");
    g.sample_size(20);
    g.throughput(Throughput::Elements(flops));
    let mut y = vec![0.0f32; N * N];
    g.bench_function("linear_f32 (x·Wᵀ)", |b| {
        b.iter(|| w.matmul_t(black_box(x.data()), N, &mut y, false).unwrap())
    });
    g.bench_function("linear_f16 (x·Wᵀ)", |b| {
        b.iter(|| wh.matmul_t(black_box(x.data()), N, &mut y, false).unwrap())
    });
    g.bench_function("backward_dx_f32 (dY·W)", |b| {
        b.iter(|| w.matmul(black_box(dy.data()), N, &mut y, false).unwrap())
    });
    g.bench_function("backward_dx_f16 (dY·W)", |b| {
        b.iter(|| wh.matmul(black_box(dy.data()), N, &mut y, false).unwrap())
    });
    let mut dw = Tensor::zeros(&[N, N]);
    g.bench_function("backward_dw (dYᵀ·X)", |b| {
        b.iter(|| linear_backward_weight(black_box(&dy), &x, &mut dw, false).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("gemv_1024");
    g.sample_size(50);
    g.throughput(Throughput::Elements(2 * (N * N) as u64));
    let xv = &x.data()[..N];
    let mut yv = vec![0.0f32; N];
    g.bench_function("gemv_f32 (batch 1)", |b| {
        b.iter(|| w.matmul_t(black_box(xv), 1, &mut yv, false).unwrap())
    });
    g.bench_function("gemv_f16 (batch 1)", |b| {
        b.iter(|| wh.matmul_t(black_box(xv), 1, &mut yv, false).unwrap())
    });
    let x4 = &x.data()[..4 * N];
    let mut y4 = vec![0.0f32; 4 * N];
    g.throughput(Throughput::Elements(8 * (N * N) as u64));
    g.bench_function("gemv_f32 (batch 4)", |b| {
        b.iter(|| w.matmul_t(black_box(x4), 4, &mut y4, false).unwrap())
    });
    g.finish();

    // Batch 1 over 18 distinct 1024x1024 weights (BigNet's layer count): 72 MB of f32 /
    // 36 MB of f16, more than the last-level cache, so this times streaming W from DRAM.
    let mut g = c.benchmark_group("gemv_stream18");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(18 * (N * N * 4) as u64));
    let ws: Vec<Tensor> = (0..18).map(|_| Tensor::randn(&[N, N], &mut rng)).collect();
    g.bench_function("gemv_f32 (batch 1, 18 layers)", |b| {
        b.iter(|| {
            for w in &ws {
                w.matmul_t(black_box(xv), 1, &mut yv, false).unwrap();
            }
        })
    });
    let whs: Vec<HalfTensor> = ws.iter().map(HalfTensor::from_f32).collect();
    drop(ws);
    g.throughput(Throughput::Bytes(18 * (N * N * 2) as u64));
    g.bench_function("gemv_f16 (batch 1, 18 layers)", |b| {
        b.iter(|| {
            for w in &whs {
                w.matmul_t(black_box(xv), 1, &mut yv, false).unwrap();
            }
        })
    });
    g.finish();
    avx512_tiles(c, &x, &w);
}

/// `x · Wᵀ` at 1024³ with every AVX-512 tile shape (nothing on a CPU without the tier).
#[cfg(target_arch = "x86_64")]
fn avx512_tiles(c: &mut Criterion, x: &Tensor, w: &Tensor) {
    use nibble_tensor::gemm::{gemm_avx512_tile, Avx512Tile, MatRef};
    if !nibble_tensor::cpu::has_avx512() {
        eprintln!("note: no AVX-512 on this CPU; gemm_1024_avx512_tiles skipped");
        return;
    }
    let mut g = c.benchmark_group("gemm_1024_avx512_tiles");
    g.sample_size(20);
    g.throughput(Throughput::Elements(2 * (N * N * N) as u64));
    let a = MatRef::row_major(x.data(), N, N).unwrap();
    let bt = MatRef::row_major(w.data(), N, N).unwrap().t();
    let mut y = vec![0.0f32; N * N];
    for tile in Avx512Tile::ALL {
        for ks in [256, 128, 64] {
            g.bench_function(format!("{} k_slice {ks}", tile.name()), |b| {
                b.iter(|| gemm_avx512_tile(tile, ks, black_box(a), &bt, &mut y, false).unwrap())
            });
        }
    }
    g.finish();
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_tiles(_: &mut Criterion, _: &Tensor, _: &Tensor) {}

criterion_group!(gemm, benches);
criterion_main!(gemm);
