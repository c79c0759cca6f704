//! Every kernel tier of every format (q4, nf4, nf4 double-quantized, int8, lower) against the
//! scalar reference (issue 13, item 3): the awkward sizes 0, 1, 7, 15, 17, 31, 33, 63, 129,
//! 1023 and block-aligned ones that reach the fused GEMVs with partial groups of norms
//! (16 · 17, 64 · 7, 16 · 63, 64 · 33 columns).
//!
//! - Dequantization (the row segments the forward panels and the generic GEMV read) on every
//!   tier the CPU has, bit-identical to the `Scalar` path, NaN-prefilled.
//! - Products at batch 1 (fused GEMV), 3 (one GEMV per vector, or tiles), 9 (`batch_tiles`)
//!   and 64 (the GEMM over dequantized panels), forward and backward, against an f64 product
//!   with the dequantized weights, outputs NaN-prefilled, and bit-identical on 1, 2, 3 and 16
//!   threads: in one child process per tier (`NIBBLE_KERNEL` is read once per process);
//!   tiers the CPU lacks are printed as skipped.

mod common;

use common::{
    bits_eq, formats, naive_t, products_checked_on_threads, run_on_every_kernel_path, ALL_TIERS,
};
use nibble_quant::cpu::available_paths;
use nibble_quant::{Int8Matrix, KernelPath, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::WeightMatrix;
use nibble_tensor::{Rng, Tensor};

/// `in` sizes: the awkward ones, then whole Q4 / NF4 blocks in counts that leave partial
/// groups of 16 norms (Q4) or cross the 32-block absmax chunk (NF4).
const INS: [usize; 16] = [
    0, 1, 7, 15, 17, 31, 33, 63, 129, 1023, 16, 64, 272, 448, 1008, 2112,
];
/// `out` sizes: a single row, a 4-row sweep plus a tail, and more.
const OUTS: [usize; 3] = [1, 7, 17];

fn shapes() -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = OUTS
        .iter()
        .flat_map(|&o| INS.iter().map(move |&i| (o, i)))
        .collect();
    // Large enough for every product to split over the threads.
    v.extend([(129, 1023), (260, 1008), (66, 2112)]);
    v
}

/// N(0, 1) weights with a zero stretch, an outlier and a tiny stretch where they fit.
fn weights(o: usize, i: usize, seed: u64) -> Tensor {
    let mut w = Tensor::randn(&[o, i], &mut Rng::new(seed));
    let d = w.data_mut();
    let n = d.len();
    if n >= 100 {
        d[5..37].fill(0.0);
        d[n / 3] = 25.0;
        for v in &mut d[n - 17..] {
            *v *= 1e-20;
        }
    }
    w
}

/// The dequantized matrix on `path` (into a NaN-filled buffer, row by row through the
/// format's public row kernels where it has them, else `dequantize_with`).
fn dequantized(w: &Tensor, path: KernelPath) -> Vec<Vec<f32>> {
    let (o, i) = (w.shape()[0], w.shape()[1]);
    let q4 = Q4Matrix::quantize(w).unwrap();
    let mut q4_rows = vec![f32::NAN; o * i];
    let (rb, nb) = (i.div_ceil(2), i.div_ceil(16));
    for r in 0..o {
        nibble_quant::q4::dequantize(
            path,
            &q4.packed_bytes()[r * rb..(r + 1) * rb],
            &q4.norms()[r * nb..(r + 1) * nb],
            &mut q4_rows[r * i..(r + 1) * i],
        );
    }
    let int8 = Int8Matrix::quantize(w).unwrap();
    let (codes, scales, zeros) = int8.parts();
    let (scales, zeros) = (f32s(scales.as_slice()), f32s(zeros.as_slice()));
    let mut int8_rows = vec![f32::NAN; o * i];
    for r in 0..o {
        nibble_quant::int8::dequantize(
            path,
            &codes.as_slice()[r * i..(r + 1) * i],
            scales[r],
            zeros[r],
            &mut int8_rows[r * i..(r + 1) * i],
        );
    }
    let mut out = vec![
        q4_rows,
        int8_rows,
        q4.dequantize_with(path).into_vec(),
        int8.dequantize_with(path).into_vec(),
        Nf4Matrix::quantize(w)
            .unwrap()
            .dequantize_with(path)
            .into_vec(),
        Nf4Matrix::quantize_double(w)
            .unwrap()
            .dequantize_with(path)
            .into_vec(),
        LowerMatrix::quantize(w)
            .unwrap()
            .dequantize_with(path)
            .into_vec(),
    ];
    for v in &mut out {
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{path:?}: a weight left unwritten"
        );
        v.shrink_to_fit();
    }
    out
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Dequantization on every tier the CPU has equals the scalar path bit for bit.
#[test]
fn dequantization_on_every_tier_matches_scalar() {
    let paths = available_paths();
    for p in ALL_TIERS {
        if !paths.contains(&p) {
            println!("dequantization: tier {} skipped (CPU lacks it)", p.name());
        }
    }
    for (o, i) in shapes() {
        let w = weights(o, i, (o * 13 + i) as u64);
        let want = dequantized(&w, KernelPath::Scalar);
        for &p in &paths {
            let got = dequantized(&w, p);
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                bits_eq(a, b, &format!("{o}x{i} {} dequantization #{k}", p.name()));
            }
        }
    }
}

/// Batch 1 (fused GEMV), 3 (one GEMV per vector, or tiles), 9 (`batch_tiles`), 64 (GEMM).
const BATCHES: [usize; 4] = [1, 3, 9, 64];

/// Runs on the process's tier (`NIBBLE_KERNEL`): every product of every format and shape
/// against the f64 product, and bit-identical on 1, 2, 3 and 16 threads.
/// [`products_on_every_tier`] runs it in one child process per tier; in the test process
/// itself it does nothing.
#[test]
fn products_on_this_tier() {
    if std::env::var_os("NIBBLE_TIERS_CHILD").is_none() {
        return;
    }
    let path = nibble_quant::cpu::kernel_path();
    println!("products_on_this_tier: {}", path.name());
    for (o, i) in shapes() {
        let w = weights(o, i, (o * 7 + i) as u64);
        for wm in formats(&w) {
            let what = format!("{} on {}", wm.format_name(), path.name());
            let seed = (o * 31 + i) as u64;
            products_checked_on_threads(wm.as_ref(), seed, &BATCHES, &[2, 3, 16], &what);
        }
    }
}

/// Runs [`products_on_this_tier`] in a child process for each tier this CPU has, and says
/// which it skips.
#[test]
fn products_on_every_tier() {
    if std::env::var_os("NIBBLE_TIERS_CHILD").is_some() {
        return;
    }
    run_on_every_kernel_path(
        "products_on_this_tier",
        "NIBBLE_TIERS_CHILD",
        "products_on_every_tier",
    );
}

/// How far from the f64 product an outlier activation may take a product, as a fraction of
/// `Σ |w| |x|`: an f32 sum whose largest term is nearly all of it rounds each later addition
/// at that term's scale, about `√n · ε` over n terms (the scalar path's one running sum
/// reached 1.2e-6 at n = 1023).
const OUTLIER_TOL: f64 = 5e-6;

/// Runs on the process's tier (`NIBBLE_KERNEL`): batches 1, 3 and 9 of an x whose every
/// vector holds one element of 1e6 among N(0, 1) ones (an outlier activation, as large
/// language models have), through the formats with a zero point (int8, lower), whose GEMVs
/// dequantize in registers, against the f64 product with the dequantized weights: within
/// [`OUTLIER_TOL`] of `Σ |w| |x|`, on rows centred on 0 and rows offset by 3. Their GEMVs
/// summed `zero · Σx + scale · Σ code · x`, two large terms that cancel: up to 3.6e-3
/// (int8) and 5.2e-4 (lower) of `Σ |w| |x|` at batch 1 on offset rows.
#[test]
fn outlier_activation_on_this_tier() {
    if std::env::var_os("NIBBLE_OUTLIER_CHILD").is_none() {
        return;
    }
    let path = nibble_quant::cpu::kernel_path();
    println!("outlier_activation_on_this_tier: {}", path.name());
    for (o, i) in [(7, 1), (17, 31), (17, 1023), (33, 1024), (260, 1008)] {
        // Every other row offset by 3: its zero point then lies far from its weights.
        let mut w = weights(o, i, (o * 5 + i) as u64);
        for row in w.data_mut().chunks_mut(i.max(1)).step_by(2) {
            row.iter_mut().for_each(|v| *v += 3.0);
        }
        let formats: [Box<dyn WeightMatrix>; 2] = [
            Box::new(Int8Matrix::quantize(&w).unwrap()),
            Box::new(LowerMatrix::quantize(&w).unwrap()),
        ];
        for wm in &formats {
            for m in [1, 3, 9] {
                let mut x = Tensor::randn(&[m, i], &mut Rng::new((m * 3 + i) as u64));
                for b in 0..m {
                    x.data_mut()[b * i + (i / 3 + b) % i] = 1e6;
                }
                let mut y = vec![f32::NAN; m * o];
                wm.matmul_t(x.data(), m, &mut y, false).unwrap();
                let (want, mag) = naive_t(x.data(), m, wm.to_f32().data(), o, i);
                for (k, ((g, r), s)) in y.iter().zip(&want).zip(&mag).enumerate() {
                    let err = (f64::from(*g) - f64::from(*r)).abs() / f64::from(*s);
                    assert!(
                        err <= OUTLIER_TOL,
                        "{} on {}: {o}x{i} m={m} [{k}]: {g} against {r}, {err:.2e} of Σ|w||x|",
                        wm.format_name(),
                        path.name()
                    );
                }
            }
        }
    }
}

/// Runs [`outlier_activation_on_this_tier`] in a child process for each tier this CPU has,
/// and says which it skips.
#[test]
fn outlier_activation_on_every_tier() {
    if std::env::var_os("NIBBLE_OUTLIER_CHILD").is_some() {
        return;
    }
    run_on_every_kernel_path(
        "outlier_activation_on_this_tier",
        "NIBBLE_OUTLIER_CHILD",
        "outlier_activation_on_every_tier",
    );
}
