//! The forward GEMM panels ([`FwdPack`]) of every format on every kernel tier the CPU has,
//! against the scalar reference's dequantized matrix: each panel's lane `j` of row `p` is
//! `W[n0 + j, k0 + p]` bit for bit, zeros past the last row of W, every float written
//! (destinations pre-filled with NaN). Panels start at the GEMM's block starts (multiples of
//! `KC`) and at other columns, aligned to a block of the format or not, with full and partial
//! row counts, over the awkward sizes.

use crate::cpu::available_paths;
use crate::kernels::{FwdPack, QuantRows};
use crate::{Int8Matrix, KernelPath, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::gemm::{PackB, KC, NR};
use nibble_tensor::{Rng, Tensor};

/// `(out, in)`: the awkward sizes as `in` (whole blocks of 16 and 64 among them), a single row,
/// a partial panel of rows, several panels.
fn shapes() -> Vec<(usize, usize)> {
    let ins = [1, 7, 15, 16, 17, 31, 33, 63, 64, 129, 272, 1023, 1024, 2112];
    [1, 7, 16, 17, 33]
        .iter()
        .flat_map(|&o| ins.iter().map(move |&i| (o, i)))
        .collect()
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

/// The `(k0, kc)` column ranges a test packs: every GEMM block, and ranges starting inside
/// one (on and off a block of 16) or running to the last column.
fn column_ranges(i: usize) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = (0..i).step_by(KC).map(|k0| (k0, KC.min(i - k0))).collect();
    for (k0, kc) in [
        (16, 48),
        (32, 16),
        (48, 240),
        (3, 29),
        (5, 48),
        (i / 2, i - i / 2),
        (0, i),
    ] {
        if k0 < i && kc > 0 {
            v.push((k0, kc.min(i - k0)));
        }
    }
    v
}

/// Checks every panel of `f` on `path` against `reference` (`out x in`, row-major).
fn check_panels<F: QuantRows>(f: &F, path: KernelPath, reference: &[f32], what: &str) {
    let (o, i) = f.dims();
    let pack = FwdPack { f, path };
    for (k0, kc) in column_ranges(i) {
        for n0 in (0..o).step_by(NR) {
            let nc = NR.min(o - n0);
            let mut dst = vec![f32::NAN; kc * NR];
            pack.pack_panel(k0, kc, n0, nc, &mut dst);
            for p in 0..kc {
                for j in 0..NR {
                    let want = if j < nc {
                        reference[(n0 + j) * i + k0 + p]
                    } else {
                        0.0
                    };
                    let got = dst[p * NR + j];
                    assert!(
                        got.to_bits() == want.to_bits(),
                        "{what} on {}: {o}x{i}, panel k0 {k0} kc {kc} n0 {n0}: lane {j} of row \
                         {p} is {got}, the reference {want}",
                        path.name()
                    );
                }
            }
        }
    }
}

#[test]
fn forward_panels_on_every_tier_match_the_reference() {
    let paths = available_paths();
    for p in [KernelPath::Avx2Fma, KernelPath::Avx512] {
        if !paths.contains(&p) {
            println!("forward panels: tier {} skipped (CPU lacks it)", p.name());
        }
    }
    for (o, i) in shapes() {
        let w = weights(o, i, (o * 13 + i) as u64);
        let q4 = Q4Matrix::quantize(&w).unwrap();
        let nf4 = Nf4Matrix::quantize(&w).unwrap();
        let nf4_dq = Nf4Matrix::quantize_double(&w).unwrap();
        let int8 = Int8Matrix::quantize(&w).unwrap();
        let lower = LowerMatrix::quantize(&w).unwrap();
        let refs = [
            q4.dequantize_with(KernelPath::Scalar),
            nf4.dequantize_with(KernelPath::Scalar),
            nf4_dq.dequantize_with(KernelPath::Scalar),
            int8.dequantize_with(KernelPath::Scalar),
            lower.dequantize_with(KernelPath::Scalar),
        ];
        for &path in &paths {
            check_panels(&q4, path, refs[0].data(), "q4");
            check_panels(&nf4, path, refs[1].data(), "nf4");
            check_panels(&nf4_dq, path, refs[2].data(), "nf4_dq");
            check_panels(&int8, path, refs[3].data(), "int8");
            check_panels(&lower, path, refs[4].data(), "lower");
        }
    }
}
