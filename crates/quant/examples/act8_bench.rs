//! Times every quantized format's forward with f32 activations, with int8 activations as
//! `matmul_t` dispatches them (the fused Q4 GEMV below batch 16, the generic driver or the f32
//! path, see `nibble_quant::act8`), and on the generic int8 driver (`act8::forward`: the
//! integer GEMM from batch 8) itself, all in the same run (1024x1024, batch 1 and 1024 by
//! default; `act8_bench DIM BATCH...`), on the current rayon pool (`RAYON_NUM_THREADS`) and
//! kernel path (`NIBBLE_KERNEL`), printing a table. Where the tier is AMX (`NIBBLE_AMX=0`
//! turns it off) the generic driver is also timed on the AVX-512 VNNI tier (`vnni_ms`), and
//! where it is AVX-VNNI (`NIBBLE_KERNEL=avx2` on a CPU with it; `NIBBLE_AVXVNNI=0` turns it
//! off) on the plain AVX2 tier (`avx2_ms`), so the two compare in one run. They are run interleaved, 7 rounds after a warm-up
//! (`ACT8_BENCH_REPS` to change), and reported as median and minimum (the minimum is the
//! figure to compare on a busy machine).
//!
//! Then the same for the backward `dX = dY · W` (`WeightMatrix::matmul`): f32, int8 as routed
//! (`act8::backward::backward_route`), and the integer input gradient on the tier itself
//! (`Int8InputGrad::input_grad_int8`, the transpose's requantization included).
//!
//! Environment: `ACT8_BENCH_FORMATS=q4,lower` keeps those formats only;
//! `ACT8_BENCH_PHASES=1` adds the integer GEMM's phases (`act8::gemm::phases`: x's
//! quantization, W's packing, the products, one after another) per format, batch and tier;
//! `ACT8_BENCH_BACKWARD=0` leaves the backward out.

use nibble_quant::act8::backward::Int8InputGrad;
use nibble_quant::act8::{forward, gemm, with_activations, ActivationMode, IntCodes, IntTier};
use nibble_quant::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{Rng, Tensor, WeightMatrix};
use std::time::Instant;

/// Median and minimum of `times` (ms).
fn median_min(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times[0])
}

fn time_ms(f: &mut dyn FnMut()) -> f64 {
    let s = Instant::now();
    f();
    s.elapsed().as_secs_f64() * 1e3
}

/// Median and minimum (ms) of each of `cases` runs of `run(case)`, interleaved over `reps`
/// rounds after a warm-up round.
fn rounds(cases: usize, reps: usize, run: &mut dyn FnMut(usize)) -> Vec<(f64, f64)> {
    let mut times = vec![Vec::new(); cases];
    for round in 0..=reps {
        for (k, t) in times.iter_mut().enumerate() {
            let ms = time_ms(&mut || run(k));
            if round > 0 {
                t.push(ms);
            }
        }
    }
    times.into_iter().map(median_min).collect()
}

/// A table row: f32, int8 as routed and the integer path on the tier (median (min)), and the
/// ratios to f32 (of medians; of minima).
fn row(name: &str, m: usize, t: &[(f64, f64)]) -> String {
    let [(a, a0), (b, b0), (g, g0)] = [t[0], t[1], t[2]];
    format!(
        "{name:7} {m:5}  {a:7.3} ({a0:7.3})  {b:7.3} ({b0:7.3})  {g:7.3} ({g0:7.3})  {:8.2}  {:11.2}; {:.2} {:.2}",
        b / a,
        g / a,
        b0 / a0,
        g0 / a0
    )
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
    let mut fmts: Vec<(&str, Box<dyn Fmt>)> = vec![
        ("q4", Box::new(Q4Matrix::quantize(&w).unwrap())),
        ("nf4", Box::new(Nf4Matrix::quantize(&w).unwrap())),
        ("nf4_dq", Box::new(Nf4Matrix::quantize_double(&w).unwrap())),
        ("int8", Box::new(Int8Matrix::quantize(&w).unwrap())),
        ("lower", Box::new(LowerMatrix::quantize(&w).unwrap())),
    ];
    if let Ok(only) = std::env::var("ACT8_BENCH_FORMATS") {
        fmts.retain(|(name, _)| only.split(',').any(|o| o == *name));
    }
    println!(
        "threads {} kernel {} int tier {:?}",
        rayon::current_num_threads(),
        nibble_quant::cpu::kernel_path().name(),
        IntTier::for_path(nibble_quant::cpu::kernel_path())
    );
    let reps: usize = std::env::var("ACT8_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7)
        .max(1);
    let tier = IntTier::for_path(nibble_quant::cpu::kernel_path());
    if let Err(why) = nibble_quant::act8::amx_status() {
        println!("AMX not used: {why}");
    }
    // The generic driver on the tier, and on the tier below for A/B: VNNI next to AMX, AVX2
    // next to AVX-VNNI.
    let mut generic = vec![tier];
    let below = match tier {
        IntTier::Amx => Some((IntTier::Avx512Vnni, "vnni")),
        IntTier::AvxVnni => Some((IntTier::Avx2, "avx2")),
        _ => None,
    };
    if let Some((t, _)) = below {
        generic.push(t);
    }
    println!(
        "format  batch  f32_ms (min)      int8_ms (min)     generic_ms (min)  int8/f32  generic/f32 (of medians; of minima){}",
        match below {
            Some((_, n)) => format!("  {n}_ms (min)  {n}/f32"),
            None => String::new(),
        }
    );
    for &m in &batches {
        let x = Tensor::randn(&[m, dim], &mut Rng::new(2)).into_vec();
        let mut y = vec![0.0f32; m * dim];
        for (name, f) in &fmts {
            // 0: f32, 1: int8 as routed, 2..: the generic driver on `generic[k - 2]`.
            let mut run = |k: usize| match k {
                0 => with_activations(ActivationMode::F32, || f.matmul_t(&x, m, &mut y, false))
                    .unwrap(),
                1 => with_activations(ActivationMode::Int8, || f.matmul_t(&x, m, &mut y, false))
                    .unwrap(),
                _ => assert!(forward(generic[k - 2], f.as_int(), &x, m, &mut y, false)),
            };
            let times = rounds(2 + generic.len(), reps, &mut run);
            let vnni = match times.get(3) {
                Some(&(v, v0)) => format!("  {v:7.3} ({v0:7.3})  {:8.2}", v / times[0].0),
                None => String::new(),
            };
            println!("{}{vnni}", row(name, m, &times));
        }
    }
    if std::env::var("ACT8_BENCH_PHASES").is_ok_and(|v| v == "1") {
        phases_table(&fmts, &batches, dim, &generic, reps);
    }
    if std::env::var("ACT8_BENCH_BACKWARD").is_ok_and(|v| v == "0") {
        return;
    }
    println!(
        "backward dX = dY·W\nformat  batch  f32_ms (min)      int8_ms (min)     integer_ms (min)  int8/f32  integer/f32 (of medians; of minima)"
    );
    for &m in &batches {
        let dy = Tensor::randn(&[m, dim], &mut Rng::new(3)).into_vec();
        let mut dx = vec![0.0f32; m * dim];
        for (name, f) in &fmts {
            // 0: f32, 1: int8 as routed, 2: the integer input gradient on `tier`.
            let mut run = |k: usize| match k {
                0 => with_activations(ActivationMode::F32, || f.matmul(&dy, m, &mut dx, false))
                    .unwrap(),
                1 => with_activations(ActivationMode::Int8, || f.matmul(&dy, m, &mut dx, false))
                    .unwrap(),
                _ => assert!(f.input_grad_int8(tier, &dy, m, &mut dx, false)),
            };
            println!("{}", row(name, m, &rounds(3, reps, &mut run)));
        }
    }
}

/// A format with both views and its integer input gradient.
trait Fmt: IntCodes + WeightMatrix + Int8InputGrad {
    fn as_int(&self) -> &dyn IntCodes;
}
impl<T: IntCodes + WeightMatrix + Int8InputGrad> Fmt for T {
    fn as_int(&self) -> &dyn IntCodes {
        self
    }
}

/// The integer GEMM's phases one after another (`act8::gemm::phases`: x's quantization, W's
/// packing, the products; medians and minima over `reps` after a warm-up) per format, batch
/// (from `GEMM_MIN_M`) and tier of `tiers`.
fn phases_table(
    fmts: &[(&str, Box<dyn Fmt>)],
    batches: &[usize],
    dim: usize,
    tiers: &[IntTier],
    reps: usize,
) {
    println!("integer GEMM phases, ms: median (min)\nformat  batch  tier         quantize_x        pack_w            products");
    for &m in batches.iter().filter(|&&m| m >= gemm::GEMM_MIN_M) {
        let x = Tensor::randn(&[m, dim], &mut Rng::new(2)).into_vec();
        let mut y = vec![0.0f32; m * dim];
        for (name, f) in fmts {
            for &tier in tiers {
                let mut t: [Vec<f64>; 3] = Default::default();
                for round in 0..=reps {
                    let p = gemm::phases(tier, f.as_int(), &x, m, &mut y).unwrap();
                    if round > 0 {
                        for (v, ms) in t.iter_mut().zip(p) {
                            v.push(ms);
                        }
                    }
                }
                let cells: Vec<String> = t
                    .into_iter()
                    .map(|v| {
                        let (a, b) = median_min(v);
                        format!("{a:7.3} ({b:7.3})")
                    })
                    .collect();
                println!(
                    "{name:7} {m:5}  {:12} {}",
                    format!("{tier:?}"),
                    cells.join("  ")
                );
            }
        }
    }
}
