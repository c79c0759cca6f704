// Benchmark of candle-core CPU matmuls (quantized Q4K / Q4_0 and plain f32).
// Usage: candle_bench [case ...]   cases: q4k_b1 q4k_b1024 q4_0_b1 q4_0_b1024 f32_b1 f32_b1024 check all
// Threads: RAYON_NUM_THREADS (candle's barrier pool and rayon pool read it).
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::hint::black_box;
use std::time::{Duration, Instant};

const N: usize = 1024; // out features
const K: usize = 1024; // in features
const REPS: usize = 5;
const TARGET: Duration = Duration::from_millis(1000);

fn bench<F: FnMut() -> Tensor>(name: &str, flops: f64, mut f: F) {
    // warm-up: at least 3 calls and ~300 ms
    let t0 = Instant::now();
    let mut warm = 0usize;
    while warm < 3 || t0.elapsed() < Duration::from_millis(300) {
        black_box(f());
        warm += 1;
    }
    let per = t0.elapsed().as_secs_f64() / warm as f64;
    let iters = ((TARGET.as_secs_f64() / per).ceil() as usize).max(5);
    let mut times = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(f());
        }
        times.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    let mut s = times.clone();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (med, min, max) = (s[REPS / 2], s[0], s[REPS - 1]);
    let gf = |t: f64| flops / t / 1e9;
    println!(
        "RESULT {name:<12} threads={} iters={iters} median={:.3}us min={:.3}us max={:.3}us  GFLOP/s(med)={:.1} (min-time)={:.1} (max-time)={:.1}  all_us={:?}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
        med * 1e6,
        min * 1e6,
        max * 1e6,
        gf(med),
        gf(min),
        gf(max),
        times.iter().map(|t| (t * 1e6 * 1000.0).round() / 1000.0).collect::<Vec<_>>()
    );
}

fn rel_err(a: &Tensor, b: &Tensor) -> (f32, f32, f32) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let mut maxd = 0f32;
    let mut maxb = 0f32;
    let mut se = 0f64;
    let mut sb = 0f64;
    for (x, y) in a.iter().zip(b.iter()) {
        maxd = maxd.max((x - y).abs());
        maxb = maxb.max(y.abs());
        se += ((x - y) as f64).powi(2);
        sb += (*y as f64).powi(2);
    }
    (maxd, maxb, (se / sb).sqrt() as f32)
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut cases: Vec<String> = std::env::args().skip(1).collect();
    if cases.is_empty() || cases.iter().any(|c| c == "all") {
        cases = ["check", "q4k_b1", "q4_0_b1", "f32_b1", "q4k_b1024", "q4_0_b1024", "f32_b1024"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    }
    println!(
        "candle-core 0.11.1, RAYON_NUM_THREADS={:?} CANDLE_NUM_THREADS={:?} candle get_num_threads()={}",
        std::env::var("RAYON_NUM_THREADS").ok(),
        std::env::var("CANDLE_NUM_THREADS").ok(),
        candle_core::utils::get_num_threads()
    );
    println!(
        "compile-time target features: avx2={} fma={} f16c={}",
        cfg!(target_feature = "avx2"),
        cfg!(target_feature = "fma"),
        cfg!(target_feature = "f16c")
    );

    // deterministic random data
    let w = Tensor::randn(0f32, 1.0, (N, K), &dev)?; // weight [out, in]
    let x1 = Tensor::randn(0f32, 1.0, (1, K), &dev)?;
    let xb = Tensor::randn(0f32, 1.0, (1024, K), &dev)?;
    let wt = w.t()?;

    let q4k = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K)?)?;
    let q40 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_0)?)?;

    let mm_flops = |m: usize| 2.0 * (m * N * K) as f64;

    for c in &cases {
        match c.as_str() {
            "check" => {
                // reference: f64 naive matmul on host for x1 and first 8 rows of xb
                let wv = w.to_vec2::<f32>()?;
                let refmm = |x: &Tensor| -> Tensor {
                    let xv = x.to_vec2::<f32>().unwrap();
                    let m = xv.len();
                    let mut out = vec![0f32; m * N];
                    for i in 0..m {
                        for j in 0..N {
                            let mut s = 0f64;
                            for k in 0..K {
                                s += xv[i][k] as f64 * wv[j][k] as f64;
                            }
                            out[i * N + j] = s as f32;
                        }
                    }
                    Tensor::from_vec(out, (m, N), &Device::Cpu).unwrap()
                };
                let xs8 = xb.narrow(0, 0, 8)?;
                for (label, x, full) in [("b1", &x1, false), ("b1024", &xb, true)] {
                    let f32_out = x.matmul(&wt)?;
                    let q4k_out = q4k.forward(x)?;
                    let q40_out = q40.forward(x)?;
                    // f32 vs exact reference (first 8 rows only for batch 1024)
                    let (f32_sub, xr) = if full {
                        (f32_out.narrow(0, 0, 8)?, xs8.clone())
                    } else {
                        (f32_out.clone(), x.clone())
                    };
                    let r = refmm(&xr);
                    let (d, m, rel) = rel_err(&f32_sub, &r);
                    println!("CHECK {label} f32 candle vs f64 naive ref: max|diff|={d:.3e} max|ref|={m:.3e} max|diff|/max|ref|={:.3e} rel_l2={rel:.3e}", d / m);
                    for (qn, qo, qm) in [("q4k", &q4k_out, &q4k), ("q4_0", &q40_out, &q40)] {
                        let (d, m, rel) = rel_err(qo, &f32_out);
                        println!("CHECK {label} {qn} vs f32 matmul (orig weights): max|diff|={d:.3e} max|out|={m:.3e} max|diff|/max|out|={:.3e} rel_l2={rel:.3e}", d / m);
                        // vs f32 matmul with dequantized weights: isolates kernel error from weight quant error
                        let wd = qm.dequantize_f16()?.to_dtype(candle_core::DType::F32)?;
                        let dq_out = x.matmul(&wd.t()?)?;
                        let (d, m, rel) = rel_err(qo, &dq_out);
                        println!("CHECK {label} {qn} vs f32 matmul (dequantized weights): max|diff|={d:.3e} max|out|={m:.3e} max|diff|/max|out|={:.3e} rel_l2={rel:.3e}", d / m);
                    }
                }
            }
            "q4k_b1" => bench("q4k_b1", mm_flops(1), || q4k.forward(&x1).unwrap()),
            "q4k_b1024" => bench("q4k_b1024", mm_flops(1024), || q4k.forward(&xb).unwrap()),
            "q4_0_b1" => bench("q4_0_b1", mm_flops(1), || q40.forward(&x1).unwrap()),
            "q4_0_b1024" => bench("q4_0_b1024", mm_flops(1024), || q40.forward(&xb).unwrap()),
            "f32_b1" => bench("f32_b1", mm_flops(1), || x1.matmul(&wt).unwrap()),
            "f32_b1024" => bench("f32_b1024", mm_flops(1024), || xb.matmul(&wt).unwrap()),
            other => panic!("unknown case {other}"),
        }
    }
    Ok(())
}
