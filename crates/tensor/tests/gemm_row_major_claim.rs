//! A [`PackB`] whose [`PackB::as_row_major`] claims a slice that cannot hold B (too short, a
//! row stride below `n`, a stride whose extent overflows): the GEMM must not read B in place
//! through it (that read past the slice: a segfault from safe code) but pack B through
//! [`PackB::pack_panel`], as it does for a too-short [`PackB::prepacked_block`], and give the
//! bits of an honest operand.

mod common;
use common::{bits, in_pool};

use nibble_tensor::cpu::{available_paths, KernelPath};
use nibble_tensor::gemm::{
    gemm, gemm_on, gemm_segments, gemm_with_packing, MatRef, PackB, Packing, Segment,
};

/// A `k x n` B with `B[p, j] = f(p, j)`, packed on request; `claim` is what it answers to
/// [`PackB::as_row_major`] (whatever it holds).
struct Liar<'a> {
    k: usize,
    n: usize,
    claim: Option<(&'a [f32], usize)>,
}

fn value(p: usize, j: usize) -> f32 {
    ((p * 7 + j * 3) % 11) as f32 - 5.0
}

impl PackB for Liar<'_> {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        for p in 0..kc {
            for j in 0..16 {
                dst[p * 16 + j] = if j < nc { value(k0 + p, n0 + j) } else { 0.0 };
            }
        }
    }
    fn as_row_major(&self) -> Option<(&[f32], usize)> {
        self.claim
    }
}

fn a_values(m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| ((i * 5) % 13) as f32 * 0.25 - 1.5)
        .collect()
}

/// `C = A · B` for the lying B and for an honest one (no claim), on `path` with `packing`.
fn both(
    path: KernelPath,
    packing: Packing,
    m: usize,
    k: usize,
    n: usize,
    claim: (&[f32], usize),
) -> (Vec<f32>, Vec<f32>) {
    let a = a_values(m, k);
    let a = MatRef::row_major(&a, m, k).unwrap();
    let mut got = vec![f32::NAN; m * n];
    let liar = Liar {
        k,
        n,
        claim: Some(claim),
    };
    gemm_with_packing(path, a, &liar, &mut got, false, packing).unwrap();
    let honest = Liar { k, n, claim: None };
    let mut want = vec![f32::NAN; m * n];
    gemm_with_packing(path, a, &honest, &mut want, false, packing).unwrap();
    (got, want)
}

/// The audit's repro: k = n = 4096, a 16-float slice, m = 4 (B read in place by `Auto` on
/// every SIMD tier): it segfaulted.
#[test]
fn gemm_ignores_a_row_major_claim_too_short_for_b() {
    let short = vec![1.0f32; 16];
    let (m, k, n) = (4, 4096, 4096);
    let a = a_values(m, k);
    let a = MatRef::row_major(&a, m, k).unwrap();
    let liar = Liar {
        k,
        n,
        claim: Some((&short, 4096)),
    };
    let mut got = vec![f32::NAN; m * n];
    gemm(a, &liar, &mut got, false).unwrap();
    let honest = Liar { k, n, claim: None };
    let mut want = vec![f32::NAN; m * n];
    gemm(a, &honest, &mut want, false).unwrap();
    assert_eq!(bits(&got), bits(&want));
    let mut on = vec![f32::NAN; m * n];
    gemm_on(KernelPath::Avx2Fma, a, &liar, &mut on, false).unwrap();
    gemm_on(KernelPath::Avx2Fma, a, &honest, &mut want, false).unwrap();
    assert_eq!(bits(&on), bits(&want));
}

/// Every path and every packing that reads B in place, short slices of several kinds: one
/// float short of the last row, a stride below `n` (rows overlapping: the in-place read gave
/// row 0's values for every row), a stride whose extent overflows.
#[test]
fn every_path_and_packing_packs_b_behind_a_bad_claim() {
    let (k, n) = (300, 80);
    let data = vec![0.5f32; (k - 1) * n + n - 1];
    let wide = vec![0.5f32; k * n];
    let claims: [(&[f32], usize); 4] = [
        (&data, n),
        (&wide, 0),
        (&wide, n - 1),
        (&wide, usize::MAX / 2),
    ];
    for path in available_paths() {
        for packing in [Packing::Auto, Packing::UnpackedB, Packing::Unpacked] {
            for m in [1, 5, 33] {
                for &claim in &claims {
                    let (got, want) = both(path, packing, m, k, n, claim);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{path:?} {packing:?} m={m} ld={}",
                        claim.1
                    );
                }
            }
        }
    }
}

/// A claim of exactly `(k - 1) · ld + n` floats (ld > n), and a one-row B of `n` floats with
/// stride 0, are still read in place: their values, not `pack_panel`'s (which differ here),
/// make the product, bit for bit as a strided B packed from the same floats.
#[test]
fn exact_row_major_claims_are_still_read_in_place() {
    let m = 3;
    for path in available_paths() {
        for (k, n, ld) in [(40, 48, 50), (1, 48, 0)] {
            let mut data = vec![0.0f32; (k - 1) * ld + n];
            for p in 0..k {
                for j in 0..n {
                    data[p * ld + j] = 2.0 * value(p, j) + 1.0;
                }
            }
            let a = a_values(m, k);
            let a = MatRef::row_major(&a, m, k).unwrap();
            let liar = Liar {
                k,
                n,
                claim: Some((&data, ld)),
            };
            let mut got = vec![f32::NAN; m * n];
            gemm_with_packing(path, a, &liar, &mut got, false, Packing::UnpackedB).unwrap();
            let strided = MatRef::new(&data, k, n, ld, 1).unwrap();
            let mut want = vec![f32::NAN; m * n];
            gemm_with_packing(path, a, &strided, &mut want, false, Packing::Packed).unwrap();
            assert_eq!(bits(&got), bits(&want), "{path:?} k={k} ld={ld}");
        }
    }
}

/// The sum of products checks each segment's claim, serial and parallel.
#[test]
fn gemm_segments_ignores_a_short_claim() {
    let short = vec![1.0f32; 16];
    let (m, k, n) = (2, 1024, 512);
    let a = a_values(m, k);
    let a = MatRef::row_major(&a, m, k).unwrap();
    let liar = Liar {
        k,
        n,
        claim: Some((&short, n)),
    };
    let honest = Liar { k, n, claim: None };
    for threads in [1, 2] {
        let (got, want) = in_pool(threads, || {
            let mut got = vec![f32::NAN; m * n];
            gemm_segments(
                &[Segment { a, b: &liar }, Segment { a, b: &liar }],
                &mut got,
                false,
            )
            .unwrap();
            let mut want = vec![f32::NAN; m * n];
            gemm_segments(
                &[Segment { a, b: &honest }, Segment { a, b: &honest }],
                &mut want,
                false,
            )
            .unwrap();
            (got, want)
        });
        assert_eq!(bits(&got), bits(&want), "{threads} threads");
    }
}

/// A B whose `k()` answers the true K to the shape check and 1 afterwards, claiming one row of
/// `n` floats in place: the claim is checked against the K the kernels read (A's columns), so
/// B is packed (the check asked `k()` a second time, took 1, and the kernels read 64 rows past
/// the 16 floats: a segfault from safe code).
#[test]
fn a_k_that_changes_between_calls_cannot_widen_the_in_place_read() {
    struct Shifty {
        calls: std::sync::atomic::AtomicUsize,
        k: usize,
        row: Vec<f32>,
    }
    impl PackB for Shifty {
        fn k(&self) -> usize {
            let first = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            if first {
                self.k
            } else {
                1
            }
        }
        fn n(&self) -> usize {
            self.row.len()
        }
        fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
            Liar {
                k: self.k,
                n: self.row.len(),
                claim: None,
            }
            .pack_panel(k0, kc, n0, nc, dst)
        }
        fn as_row_major(&self) -> Option<(&[f32], usize)> {
            Some((&self.row, 1 << 20))
        }
    }
    let (k, n) = (64, 16);
    for path in available_paths() {
        for packing in [Packing::Auto, Packing::UnpackedB, Packing::Unpacked] {
            for m in [1, 5] {
                let a = a_values(m, k);
                let a = MatRef::row_major(&a, m, k).unwrap();
                let shifty = Shifty {
                    calls: Default::default(),
                    k,
                    row: vec![1.0; n],
                };
                let mut got = vec![f32::NAN; m * n];
                gemm_with_packing(path, a, &shifty, &mut got, false, packing).unwrap();
                let honest = Liar { k, n, claim: None };
                let mut want = vec![f32::NAN; m * n];
                gemm_with_packing(path, a, &honest, &mut want, false, packing).unwrap();
                assert_eq!(bits(&got), bits(&want), "{path:?} {packing:?} m={m}");
            }
        }
    }
}
