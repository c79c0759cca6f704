//! GEMM / GEMV correctness on every kernel path, bit-identity across thread counts, and error
//! handling.

mod common;
use common::{bits, in_pool};

use half::f16;
use nibble_tensor::cpu::{available_paths, has_avx512, missing_paths, KernelPath};
use nibble_tensor::gemm::gemv::{gemv_t_f16, gemv_t_f32, gemv_tile_f32, on_whole_lines};
use nibble_tensor::gemm::{
    gemm, gemm_avx512_tile, gemm_avx512_tile_with_packing, gemm_on, gemm_segments,
    gemm_segments_bias_post, gemm_with_packing, gemm_with_stage, Avx512Tile, MatRef, PackB,
    Packing, Segment, AVX512_K_SLICE,
};
use nibble_tensor::ops::PostOp;
use nibble_tensor::{HalfTensor, Rng, Tensor, WeightMatrix};
use std::io::Write;

const DIMS: [usize; 14] = [0, 1, 2, 7, 15, 16, 17, 31, 33, 63, 64, 65, 129, 1023];

/// Every kernel path this CPU runs; says which tiers it lacks (so a skip is never silent).
fn paths() -> Vec<KernelPath> {
    static NOTE: std::sync::Once = std::sync::Once::new();
    let missing = missing_paths();
    if !missing.is_empty() {
        NOTE.call_once(|| {
            // Written to the stderr handle, not through eprintln!, so that the test harness's
            // output capture does not hide it on a passing run.
            let _ = writeln!(
                std::io::stderr(),
                "note: this CPU lacks kernel tier(s) {missing:?}; their tests are skipped"
            );
        });
    }
    available_paths()
}

/// Thread counts every bit-identity test compares.
const THREADS: [usize; 3] = [2, 3, 16];

/// A logical `rows x cols` matrix stored in one of four layouts:
/// 0 row-major, 1 column-major, 2 row-major with padded rows, 3 column-major padded.
struct Stored<T> {
    data: Vec<T>,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<T: Copy> Stored<T> {
    fn new(rows: usize, cols: usize, layout: usize, rng: &mut Rng, conv: fn(f32) -> T) -> Self {
        let (rs, cs, len) = match layout {
            0 => (cols, 1, rows * cols),
            1 => (1, rows, rows * cols),
            2 => (cols + 3, 1, rows * (cols + 3)),
            _ => (1, rows + 5, cols * (rows + 5)),
        };
        let data = (0..len).map(|_| conv(rng.uniform(-1.0, 1.0))).collect();
        Stored {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
    fn view(&self) -> MatRef<'_, T> {
        MatRef::new(&self.data, self.rows, self.cols, self.rs, self.cs).unwrap()
    }
}

/// f64 reference `C0 + A·B` and the error scale `|C0| + Σ|a||b|` per element.
fn reference(
    a: &MatRef<f32>,
    b: &dyn Fn(usize, usize) -> f32,
    n: usize,
    c0: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let (m, k) = (a.rows(), a.cols());
    let mut r = vec![0.0f64; m * n];
    let mut s = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut acc, mut sc) = (0.0f64, 0.0f64);
            if let Some(c0) = c0 {
                acc = c0[i * n + j] as f64;
                sc = acc.abs();
            }
            for p in 0..k {
                let t = a.at(i, p) as f64 * b(p, j) as f64;
                acc += t;
                sc += t.abs();
            }
            r[i * n + j] = acc;
            s[i * n + j] = sc;
        }
    }
    (r, s)
}

fn check(got: &[f32], want: &[f64], scale: &[f64], k: usize, what: &str) {
    let tol = (k as f64 + 4.0) * 1.2e-7;
    for (idx, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * s + 1e-30,
            "{what}: element {idx}: got {g}, want {w} (err {err:e}, scale {s:e})"
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    rng: &mut Rng,
    m: usize,
    n: usize,
    k: usize,
    la: usize,
    lb: usize,
    half: bool,
    acc: bool,
) {
    let a = Stored::new(m, k, la, rng, |v| v);
    let c0: Vec<f32> = (0..m * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let what = format!("m={m} n={n} k={k} la={la} lb={lb} f16={half} acc={acc}");
    let av = a.view();
    if half {
        let b = Stored::new(k, n, lb, rng, f16::from_f32);
        let bv = b.view();
        let (want, scale) = reference(&av, &|p, j| bv.at(p, j).to_f32(), n, acc.then_some(&c0[..]));
        check_every_kernel(av, &bv, &c0, acc, (&want, &scale), &what);
    } else {
        let b = Stored::new(k, n, lb, rng, |v| v);
        let bv = b.view();
        let (want, scale) = reference(&av, &|p, j| bv.at(p, j), n, acc.then_some(&c0[..]));
        check_every_kernel(av, &bv, &c0, acc, (&want, &scale), &what);
    }
}

/// `A·B` (plus `c0` when `acc`) on every kernel path and every AVX-512 tile shape, into a
/// NaN-filled (or `c0`) output, [`check`]ed against the f64 reference `(want, scale)`.
fn check_every_kernel(
    av: MatRef<f32>,
    b: &dyn PackB,
    c0: &[f32],
    acc: bool,
    (want, scale): (&[f64], &[f64]),
    what: &str,
) {
    let k = av.cols();
    let fresh = || {
        if acc {
            c0.to_vec()
        } else {
            vec![f32::NAN; c0.len()]
        }
    };
    for path in paths() {
        let mut c = fresh();
        gemm_on(path, av, b, &mut c, acc).unwrap();
        check(&c, want, scale, k, &format!("{what} {path:?}"));
    }
    for (tile, ks) in tiles() {
        let mut c = fresh();
        gemm_avx512_tile(tile, ks, av, b, &mut c, acc).unwrap();
        check(&c, want, scale, k, &format!("{what} {tile:?} k_slice={ks}"));
    }
}

/// The AVX-512 tile shapes and K slice depths to test (none, with a note, on a CPU without
/// the tier).
fn tiles() -> Vec<(Avx512Tile, usize)> {
    static NOTE: std::sync::Once = std::sync::Once::new();
    if has_avx512() {
        let mut v = Vec::new();
        for tile in Avx512Tile::ALL {
            for ks in [AVX512_K_SLICE, 128, 64, 33] {
                v.push((tile, ks));
            }
        }
        v
    } else {
        NOTE.call_once(|| {
            let _ = writeln!(
                std::io::stderr(),
                "note: no AVX-512 on this CPU; the AVX-512 tile shapes are not tested"
            );
        });
        Vec::new()
    }
}

#[test]
fn gemm_matches_reference_on_awkward_shapes() {
    let mut rng = Rng::new(7);
    let mut cases = 0;
    let mut volume = 0usize;
    // Every small shape (dims up to 65) on a rotating layout, then a sample with 129 and 1023.
    for (ti, &m) in DIMS[..12].iter().enumerate() {
        for (tj, &n) in DIMS[..12].iter().enumerate() {
            let k = DIMS[(ti * 5 + tj * 3) % 12];
            let sel = ti * 12 + tj;
            run_case(
                &mut rng,
                m,
                n,
                k,
                sel % 4,
                (sel / 4) % 4,
                sel % 3 == 0,
                sel % 2 == 1,
            );
            cases += 1;
            volume += m * n * k;
        }
    }
    let big = [
        (129, 65, 1023),
        (1023, 17, 129),
        (33, 1023, 64),
        (7, 129, 1023),
        (65, 63, 1023),
        (129, 129, 129),
        (1, 1023, 1023),
        (1023, 1, 33),
        (16, 1023, 17),
        (0, 1023, 1023),
        (1023, 0, 7),
        (31, 33, 0),
        (3, 2100, 5),     // more than one NC block
        (40, 2100, 1100), // two NC blocks, a stage of packed B per K block
        (200, 530, 2100), // nine K blocks; rows past SMALL_M_ROWS (balanced tasks)
    ];
    for (t, &(m, n, k)) in big.iter().enumerate() {
        run_case(
            &mut rng,
            m,
            n,
            k,
            t % 4,
            (t + 1) % 4,
            t % 3 == 1,
            t % 2 == 0,
        );
        cases += 1;
        volume += m * n * k;
    }
    assert!(cases > 150 && volume > 0);
}

#[test]
fn k_zero_overwrites_or_keeps() {
    for path in paths() {
        let a = MatRef::new(&[] as &[f32], 2, 0, 0, 1).unwrap();
        let b = MatRef::new(&[] as &[f32], 0, 3, 3, 1).unwrap();
        let mut c = [f32::NAN; 6];
        gemm_on(path, a, &b, &mut c, false).unwrap();
        assert_eq!(c, [0.0; 6]);
        let mut c = [1.5f32; 6];
        gemm_on(path, a, &b, &mut c, true).unwrap();
        assert_eq!(c, [1.5; 6]);
    }
}

#[test]
fn gemm_and_gemv_bit_identical_across_thread_counts() {
    // Stages of three K blocks, then one block per stage and two column blocks.
    for (m, n, k) in [(257, 300, 1100), (200, 2100, 600)] {
        bit_identical_across_thread_counts(m, n, k);
    }
}

fn bit_identical_across_thread_counts(m: usize, n: usize, k: usize) {
    let mut rng = Rng::new(11);
    let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let av = MatRef::row_major(&a, m, k).unwrap();
    let bt = MatRef::row_major(&w, n, k).unwrap().t();
    let bh = MatRef::row_major(&wh, n, k).unwrap().t();
    for (tile, ks) in tiles() {
        let run = |threads: usize, b: &dyn PackB| {
            in_pool(threads, || {
                let mut c = vec![f32::NAN; m * n];
                gemm_avx512_tile(tile, ks, av, b, &mut c, false).unwrap();
                bits(&c)
            })
        };
        let (one, one_h) = (run(1, &bt), run(1, &bh));
        for t in THREADS {
            assert_eq!(
                one,
                run(t, &bt),
                "gemm f32 {tile:?} k_slice={ks} {t} threads"
            );
            assert_eq!(
                one_h,
                run(t, &bh),
                "gemm f16 {tile:?} k_slice={ks} {t} threads"
            );
        }
    }
    for path in paths() {
        let run = |threads: usize, b: &dyn PackB| {
            in_pool(threads, || {
                let mut c = vec![f32::NAN; m * n];
                gemm_on(path, av, b, &mut c, false).unwrap();
                bits(&c)
            })
        };
        let (one, one_h) = (run(1, &bt), run(1, &bh));
        for t in THREADS {
            assert_eq!(one, run(t, &bt), "gemm f32 {path:?} {t} threads");
            assert_eq!(one_h, run(t, &bh), "gemm f16 {path:?} {t} threads");
        }
        for mm in [1, 2, 3, 4, 7, 16] {
            let x = &a[..mm * k];
            let gv = |threads: usize, half: bool| {
                in_pool(threads, || {
                    let mut y = vec![f32::NAN; mm * n];
                    if half {
                        gemv_t_f16(path, &wh, n, k, x, mm, &mut y, false).unwrap();
                    } else {
                        gemv_t_f32(path, &w, n, k, x, mm, &mut y, false).unwrap();
                    }
                    bits(&y)
                })
            };
            for half in [false, true] {
                let one = gv(1, half);
                for t in THREADS {
                    assert_eq!(
                        one,
                        gv(t, half),
                        "gemv f16={half} m={mm} {path:?} {t} threads"
                    );
                }
            }
        }
    }
}

/// Batch 1 splits W into blocks of at most 1 MiB handed out in order; blocks that do not divide
/// the rows evenly (and a ragged last block) give the same bits on any number of threads, and
/// every output is written.
#[test]
fn gemv_batch1_blocks_bit_identical_across_thread_counts() {
    let mut rng = Rng::new(12);
    for (n, k) in [(1030, 520), (1023, 1024), (2050, 256)] {
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let x: Vec<f32> = (0..k).map(|_| rng.normal()).collect();
        for path in paths() {
            let gv = |threads: usize, half: bool| {
                in_pool(threads, || {
                    let mut y = vec![f32::NAN; n];
                    if half {
                        gemv_t_f16(path, &wh, n, k, &x, 1, &mut y, false).unwrap();
                    } else {
                        gemv_t_f32(path, &w, n, k, &x, 1, &mut y, false).unwrap();
                    }
                    assert!(y.iter().all(|v| v.is_finite()), "{n}x{k} {path:?}");
                    bits(&y)
                })
            };
            for half in [false, true] {
                let one = gv(1, half);
                for threads in THREADS {
                    assert_eq!(
                        one,
                        gv(threads, half),
                        "{n}x{k} f16={half} {path:?} {threads}"
                    );
                }
            }
        }
    }
}

/// The row-wise GEMV (f32 and f16 weights, batches 1..=16) against the f64 reference on the
/// awkward sizes, every path, outputs pre-filled with NaN (and with `accumulate`).
#[test]
fn gemv_matches_reference_on_awkward_sizes() {
    let mut rng = Rng::new(9);
    for &inp in &[0usize, 1, 7, 15, 17, 31, 33, 63, 129, 1023] {
        for &out in &[0usize, 1, 7, 17, 33] {
            let w: Vec<f32> = (0..out * inp).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            for m in [1usize, 2, 3, 5, 16] {
                let x: Vec<f32> = (0..m * inp).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let c0: Vec<f32> = (0..m * out).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let xv = MatRef::row_major(&x, m, inp).unwrap();
                for half in [false, true] {
                    let wf: Vec<f32> = if half {
                        wh.iter().map(|v| v.to_f32()).collect()
                    } else {
                        w.clone()
                    };
                    let wt = MatRef::new(&wf, inp, out, 1, inp.max(1)).unwrap();
                    for acc in [false, true] {
                        let (want, scale) =
                            reference(&xv, &|p, j| wt.at(p, j), out, acc.then_some(&c0[..]));
                        for path in paths() {
                            let mut y = if acc {
                                c0.clone()
                            } else {
                                vec![f32::NAN; m * out]
                            };
                            if half {
                                gemv_t_f16(path, &wh, out, inp, &x, m, &mut y, acc).unwrap();
                            } else {
                                gemv_t_f32(path, &w, out, inp, &x, m, &mut y, acc).unwrap();
                            }
                            let what =
                                format!("gemv {out}x{inp} m={m} f16={half} acc={acc} {path:?}");
                            check(&y, &want, &scale, inp, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn gemv_matches_gemm() {
    let mut rng = Rng::new(5);
    for &(out, inp) in &[
        (1023usize, 1023usize),
        (17, 5),
        (64, 33),
        (300, 1100),
        (1, 7),
    ] {
        let w = Tensor::uniform(&[out, inp], -1.0, 1.0, &mut rng);
        let wh = HalfTensor::from_f32(&w);
        for m in [1, 2, 3, 4, 5, 9, 32, 33] {
            let x: Vec<f32> = (0..m * inp).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let c0: Vec<f32> = (0..m * out).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let xv = MatRef::row_major(&x, m, inp).unwrap();
            for half in [false, true] {
                let wf = if half { wh.to_f32() } else { w.clone() };
                let wt = MatRef::row_major(wf.data(), out, inp).unwrap().t();
                let (want, scale) = reference(&xv, &|p, j| wt.at(p, j), out, Some(&c0));
                let mut want0 = vec![f32::NAN; m * out];
                gemm(xv, &wt, &mut want0, false).unwrap();
                for path in paths() {
                    for acc in [false, true] {
                        let mut y = if acc {
                            c0.clone()
                        } else {
                            vec![f32::NAN; m * out]
                        };
                        if half {
                            gemv_t_f16(path, wh.data(), out, inp, &x, m, &mut y, acc).unwrap();
                        } else {
                            gemv_t_f32(path, w.data(), out, inp, &x, m, &mut y, acc).unwrap();
                        }
                        let what = format!("gemv {out}x{inp} m={m} f16={half} acc={acc} {path:?}");
                        if acc {
                            check(&y, &want, &scale, inp, &what);
                        } else {
                            let w0: Vec<f64> = want0.iter().map(|&v| v as f64).collect();
                            check(&y, &w0, &scale, inp, &what);
                        }
                    }
                }
                // Through the WeightMatrix interface (GEMV for small m, GEMM above).
                let mut y = vec![f32::NAN; m * out];
                if half {
                    wh.matmul_t(&x, m, &mut y, false).unwrap();
                } else {
                    w.matmul_t(&x, m, &mut y, false).unwrap();
                }
                let w0: Vec<f64> = want0.iter().map(|&v| v as f64).collect();
                check(&y, &w0, &scale, inp, "WeightMatrix::matmul_t");
            }
        }
    }
}

/// The small-batch GEMV gives the same bits wherever x starts in a cache line (it copies x to
/// a whole line where it starts inside one, [`on_whole_lines`]), with rows that are whole
/// lines and rows that are not, its scratch reused across calls of other sizes, the output
/// pre-filled with NaN.
#[test]
fn gemv_bits_do_not_depend_on_where_x_starts() {
    let mut rng = Rng::new(21);
    for (out, inp) in [(33, 64), (17, 1024), (9, 100)] {
        let w = Tensor::uniform(&[out, inp], -1.0, 1.0, &mut rng);
        let wh = HalfTensor::from_f32(&w);
        for m in [2, 3, 5, 12, 16] {
            // 15 spare floats: x at each of the 16 float offsets of one line.
            let store: Vec<f32> = (0..m * inp + 15).map(|_| rng.uniform(-1.0, 1.0)).collect();
            for path in paths() {
                for half in [false, true] {
                    let mut want: Option<Vec<u32>> = None;
                    for off in 0..16 {
                        // The same values at every offset.
                        let mut shifted = vec![0.0f32; m * inp + 15];
                        shifted[off..off + m * inp].copy_from_slice(&store[..m * inp]);
                        let x = &shifted[off..off + m * inp];
                        let mut y = vec![f32::NAN; m * out];
                        if half {
                            gemv_t_f16(path, wh.data(), out, inp, x, m, &mut y, false).unwrap();
                        } else {
                            gemv_t_f32(path, w.data(), out, inp, x, m, &mut y, false).unwrap();
                        }
                        let got = bits(&y);
                        let what = format!("{out}x{inp} m={m} f16={half} {path:?} offset {off}");
                        assert!(y.iter().all(|v| v.is_finite()), "{what}");
                        match &want {
                            None => want = Some(got),
                            Some(e) => assert!(*e == got, "{what}"),
                        }
                    }
                }
            }
        }
    }
    let x: Vec<f32> = (0..48).map(|v| v as f32).collect();
    assert_eq!(
        on_whole_lines(&x[1..33], 16, |x| x.to_vec()),
        x[1..33].to_vec()
    );
    assert_eq!(
        on_whole_lines(&x[1..33], 16, |x| x.as_ptr() as usize % 64),
        0
    );
}

/// The one-tile kernel gives, bit for bit, what the full small-batch GEMV gives for the same
/// rows (laid out `[row][batch]`), on every path, with `accumulate`, and rejects mismatched
/// lengths.
#[test]
fn gemv_tile_matches_gemv() {
    let mut rng = Rng::new(11);
    for (rows, inp) in [(1, 1), (7, 15), (17, 33), (33, 129), (4, 1023)] {
        let w = Tensor::uniform(&[rows, inp], -1.0, 1.0, &mut rng);
        for m in [1, 2, 3, 5, 9, 16] {
            let x: Vec<f32> = (0..m * inp).map(|_| rng.uniform(-1.0, 1.0)).collect();
            for path in paths() {
                let mut want = vec![f32::NAN; m * rows];
                gemv_t_f32(path, w.data(), rows, inp, &x, m, &mut want, false).unwrap();
                let mut res = vec![f32::NAN; rows * m];
                gemv_tile_f32(path, w.data(), inp, &x, m, &mut res, false).unwrap();
                for r in 0..rows {
                    for b in 0..m {
                        let (g, e) = (res[r * m + b], want[b * rows + r]);
                        assert_eq!(g.to_bits(), e.to_bits(), "{rows}x{inp} m={m} {path:?}");
                    }
                }
                let mut acc = vec![1.0f32; rows * m];
                gemv_tile_f32(path, w.data(), inp, &x, m, &mut acc, true).unwrap();
                for (a, g) in acc.iter().zip(&res) {
                    assert_eq!(*a, g + 1.0);
                }
            }
        }
    }
    let w = vec![0.0f32; 12];
    let x = vec![0.0f32; 6];
    let mut res = vec![0.0f32; 8];
    assert!(gemv_tile_f32(KernelPath::Scalar, &w, 3, &x, 2, &mut res, false).is_ok());
    assert!(gemv_tile_f32(KernelPath::Scalar, &w[..11], 3, &x, 2, &mut res, false).is_err());
    assert!(gemv_tile_f32(KernelPath::Scalar, &w, 3, &x[..5], 2, &mut res, false).is_err());
    assert!(gemv_tile_f32(KernelPath::Scalar, &w, 3, &x, 2, &mut res[..7], false).is_err());
    // No batch: only empty operands are consistent; no rows: W must be empty too.
    assert!(gemv_tile_f32(KernelPath::Scalar, &[], 3, &[], 0, &mut [], false).is_ok());
    assert!(gemv_tile_f32(KernelPath::Scalar, &[], 3, &[], 0, &mut res, false).is_err());
    assert!(gemv_tile_f32(KernelPath::Scalar, &w, 3, &x, 2, &mut [], false).is_err());
}

#[test]
fn shape_errors_are_returned() {
    let a = vec![0.0f32; 6];
    let b = vec![0.0f32; 12];
    let av = MatRef::row_major(&a, 2, 3).unwrap();
    let bad_b = MatRef::row_major(&b, 4, 3).unwrap();
    let good_b = MatRef::row_major(&b, 3, 4).unwrap();
    let mut c = vec![0.0f32; 8];
    for path in paths() {
        assert!(gemm_on(path, av, &bad_b, &mut c[..6], false).is_err());
        assert!(gemm_on(path, av, &good_b, &mut c[..7], false).is_err());
        assert!(gemm_on(path, av, &good_b, &mut c, false).is_ok());
        let mut y = vec![0.0f32; 4];
        assert!(gemv_t_f32(path, &b, 4, 3, &a[..3], 1, &mut y, false).is_ok());
        assert!(gemv_t_f32(path, &b, 4, 3, &a[..4], 1, &mut y, false).is_err());
        assert!(gemv_t_f32(path, &b, 4, 3, &a[..3], 1, &mut y[..3], false).is_err());
        assert!(gemv_t_f32(path, &b[..11], 4, 3, &a[..3], 1, &mut y, false).is_err());
        let bh = vec![f16::ZERO; 12];
        assert!(gemv_t_f16(path, &bh, 3, 3, &a[..3], 1, &mut y, false).is_err());
    }
    assert!(MatRef::row_major(&a, 4, 2).is_err());
    assert!(MatRef::new(&a, 2, 3, 4, 1).is_err());
    assert!(MatRef::row_major(&a, usize::MAX, 2).is_err());
    let w = Tensor::zeros(&[4, 3]);
    let mut y = vec![0.0f32; 4];
    assert!(w.matmul_t(&a[..2], 1, &mut y, false).is_err());
    assert!(w.matmul_t(&a[..3], 1, &mut y[..2], false).is_err());
    assert!(w.matmul(&a[..3], 1, &mut y, false).is_err());
}

/// A sum of products in one pass (a bias as `ones · bias`, the weight, a low-rank term) gives
/// the bits of a bias fill followed by one accumulating GEMM per product, in order, on 1, 2, 3
/// and 16 threads, over one and several stages and column blocks, C pre-filled with NaN (or
/// accumulated onto); so does the bias handed to `gemm_segments_bias_post` (added by the first
/// block's stores), and a bias of the wrong length is an error.
#[test]
fn gemm_segments_equal_the_sequence_of_gemms() {
    let mut rng = Rng::new(23);
    let cases: [(usize, usize, &[usize]); 6] = [
        (1, 5, &[7]),
        (3, 17, &[1, 33]),
        (33, 47, &[300, 17, 0]),
        (200, 530, &[1100, 32]),
        (40, 2100, &[300, 5]),
        (257, 64, &[129, 1, 1023]),
    ];
    for (m, n, ks) in cases {
        let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let xs: Vec<Vec<f32>> = ks
            .iter()
            .map(|&k| (0..m * k).map(|_| rng.normal()).collect())
            .collect();
        let ws: Vec<Vec<f32>> = ks
            .iter()
            .map(|&k| (0..n * k).map(|_| rng.normal()).collect())
            .collect();
        let start: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
        let ones = [1.0f32];
        let bias_row = MatRef::row_major(&bias, 1, n).unwrap();
        let wts: Vec<MatRef<'_, f32>> = ws
            .iter()
            .zip(ks)
            .map(|(w, &k)| MatRef::row_major(w, n, k).unwrap().t())
            .collect();
        for with_bias in [true, false] {
            for accumulate in [false, true] {
                // The sequence: bias fill (or the start / nothing), then one GEMM per product.
                let mut want = if accumulate {
                    start.clone()
                } else {
                    vec![f32::NAN; m * n]
                };
                let mut acc = accumulate;
                if with_bias {
                    if accumulate {
                        let ones_col = MatRef::new(&ones, m, 1, 0, 1).unwrap();
                        gemm(ones_col, &bias_row, &mut want, true).unwrap();
                    } else {
                        nibble_tensor::ops::fill_rows(&mut want, &bias).unwrap();
                        acc = true;
                    }
                }
                for ((x, wt), &k) in xs.iter().zip(&wts).zip(ks) {
                    gemm(MatRef::row_major(x, m, k).unwrap(), wt, &mut want, acc).unwrap();
                    acc = true;
                }
                for threads in [1, 2, 3, 16] {
                    let got = in_pool(threads, || {
                        let mut segs = Vec::new();
                        if with_bias {
                            segs.push(Segment {
                                a: MatRef::new(&ones, m, 1, 0, 1).unwrap(),
                                b: &bias_row as &dyn PackB,
                            });
                        }
                        for ((x, wt), &k) in xs.iter().zip(&wts).zip(ks) {
                            segs.push(Segment {
                                a: MatRef::row_major(x, m, k).unwrap(),
                                b: wt as &dyn PackB,
                            });
                        }
                        let mut c = if accumulate {
                            start.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        gemm_segments(&segs, &mut c, accumulate).unwrap();
                        c
                    });
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "m={m} n={n} ks={ks:?} bias={with_bias} accumulate={accumulate} {threads} threads"
                    );
                    let got = in_pool(threads, || {
                        let segs: Vec<Segment<'_>> = xs
                            .iter()
                            .zip(&wts)
                            .zip(ks)
                            .map(|((x, wt), &k)| Segment {
                                a: MatRef::row_major(x, m, k).unwrap(),
                                b: wt as &dyn PackB,
                            })
                            .collect();
                        let mut c = if accumulate {
                            start.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        let b = with_bias.then_some(&bias[..]);
                        gemm_segments_bias_post(&segs, b, &mut c, accumulate, PostOp::Identity)
                            .unwrap();
                        c
                    });
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "bias_post m={m} n={n} ks={ks:?} bias={with_bias} accumulate={accumulate} {threads} threads"
                    );
                }
            }
        }
    }
    // A segment whose shapes disagree is an error, not a panic.
    let a = vec![0.0f32; 6];
    let b = vec![0.0f32; 6];
    let a23 = MatRef::row_major(&a, 2, 3).unwrap();
    let b32 = MatRef::row_major(&b, 3, 2).unwrap();
    let b23 = MatRef::row_major(&b, 2, 3).unwrap();
    let mut c = vec![0.0f32; 4];
    assert!(gemm_segments(
        &[Segment { a: a23, b: &b32 }, Segment { a: a23, b: &b23 }],
        &mut c,
        false
    )
    .is_err());
    assert!(gemm_segments(&[Segment { a: a23, b: &b32 }], &mut c[..3], false).is_err());
    for accumulate in [false, true] {
        let short = [1.0f32; 1];
        let seg = [Segment { a: a23, b: &b32 }];
        let r = gemm_segments_bias_post(&seg, Some(&short), &mut c, accumulate, PostOp::Identity);
        assert!(
            r.is_err(),
            "a bias of 1 value for 2 columns, accumulate {accumulate}"
        );
    }
}

/// `gemm_segments_post` with a ReLU (each task's tile of C after its last K block) gives the
/// bits of `gemm_segments` followed by `relu_in_place`, on awkward shapes (several stages and
/// column blocks among them, edge tiles, an empty K), overwriting NaN or accumulating, on 1, 2
/// and 3 threads.
#[test]
fn relu_after_the_products_equals_a_pass_of_its_own() {
    use nibble_tensor::gemm::gemm_segments_post;
    use nibble_tensor::ops::{relu_in_place, PostOp};
    let mut rng = Rng::new(77);
    for (m, n, k) in [
        (1, 1, 1),
        (7, 17, 33),
        (15, 31, 0),
        (33, 63, 129),
        (129, 17, 1023),
        (63, 2100, 300),
        (200, 129, 1100),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
        let am = MatRef::row_major(&a, m, k).unwrap();
        let bm = MatRef::row_major(&b, k, n).unwrap();
        let segs = [Segment { a: am, b: &bm }];
        for accumulate in [false, true] {
            let start = if accumulate {
                c0.clone()
            } else {
                vec![f32::NAN; m * n]
            };
            let mut want = start.clone();
            gemm_segments(&segs, &mut want, accumulate).unwrap();
            relu_in_place(&mut want);
            for threads in [1, 2, 3] {
                let mut got = start.clone();
                in_pool(threads, || {
                    gemm_segments_post(&segs, &mut got, accumulate, PostOp::Relu)
                })
                .unwrap();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{m}x{n}x{k} accumulate {accumulate}, {threads} threads"
                );
            }
        }
    }
}

/// Dense f32 and f16 weights: `matmul_t_fused` gives the bits of a bias fill, `matmul_t`
/// accumulating, the extra product accumulated and the ReLU pass, on both sides of the GEMV
/// limit.
#[test]
fn dense_fused_forward_equals_the_parts() {
    let (o, i, r) = (37, 65, 3);
    let mut rng = Rng::new(41);
    let wv: Vec<f32> = (0..o * i).map(|_| rng.normal()).collect();
    let w = Tensor::from_vec(&[o, i], wv).unwrap();
    let wh = HalfTensor::from_f32(&w);
    let bias: Vec<f32> = (0..o).map(|_| rng.normal()).collect();
    let lora_b: Vec<f32> = (0..o * r).map(|_| rng.normal()).collect();
    let b_t = MatRef::row_major(&lora_b, o, r).unwrap().t();
    let bias_op = MatRef::row_major(&bias, 1, o).unwrap();
    for wm in [&w as &dyn WeightMatrix, &wh] {
        for m in [1, 2, 16, 17, 100] {
            use nibble_tensor::ops::PostOp;
            let x: Vec<f32> = (0..m * i).map(|_| rng.normal()).collect();
            let h: Vec<f32> = (0..m * r).map(|_| rng.normal()).collect();
            for (post, with_extra) in [
                (PostOp::Identity, true),
                (PostOp::Relu, true),
                (PostOp::Relu, false),
            ] {
                let mut want = vec![f32::NAN; m * o];
                nibble_tensor::ops::fill_rows(&mut want, &bias).unwrap();
                wm.matmul_t(&x, m, &mut want, true).unwrap();
                if with_extra {
                    gemm(MatRef::row_major(&h, m, r).unwrap(), &b_t, &mut want, true).unwrap();
                }
                post.apply_in_place(&mut want);
                let mut got = vec![f32::NAN; m * o];
                let extra = with_extra.then(|| Segment {
                    a: MatRef::row_major(&h, m, r).unwrap(),
                    b: &b_t,
                });
                wm.matmul_t_fused(&x, m, &mut got, Some(&bias_op), extra, post)
                    .unwrap();
                let name = wm.format_name();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{name} m={m} {post:?} {with_extra}"
                );
            }
        }
    }
}

/// Stages of any size (one K block each, the default 1 MiB, all of K) give `gemm`'s bits, on
/// 1 and 3 threads, overwriting NaN or accumulating.
#[test]
fn every_stage_size_gives_the_bits_of_gemm() {
    for &(m, k, n) in &[
        (300usize, 700usize, 129usize),
        (17, 1023, 33),
        (200, 2100, 600),
    ] {
        let a = Tensor::randn(&[m, k], &mut Rng::new(m as u64)).into_vec();
        let b = Tensor::randn(&[k, n], &mut Rng::new(k as u64)).into_vec();
        let am = MatRef::row_major(&a, m, k).unwrap();
        let bm = MatRef::row_major(&b, k, n).unwrap();
        for threads in [1, 3] {
            in_pool(threads, || {
                for accumulate in [false, true] {
                    let start = if accumulate { 0.5f32 } else { f32::NAN };
                    let mut want = vec![start; m * n];
                    gemm(am, &bm, &mut want, accumulate).unwrap();
                    for stage in [1usize, 1 << 18, k * n] {
                        let mut got = vec![start; m * n];
                        gemm_with_stage(stage, am, &bm, &mut got, accumulate).unwrap();
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{m}x{k}x{n} stage {stage} threads {threads} accumulate {accumulate}"
                        );
                    }
                }
            });
        }
    }
}

/// The skinny dimension of the unpacked-operand tests (around the kernels' tile widths 16, 32,
/// 48 and heights 6, 8, 12, 14).
const SKINNY: [usize; 12] = [1, 7, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63];
/// The other dimensions of the unpacked-operand tests.
const OTHER: [usize; 7] = [0, 1, 7, 33, 129, 300, 1023];
/// Every way to feed the microkernel; [`Packing::Packed`] first (the others are compared
/// with it).
const PACKINGS: [Packing; 5] = [
    Packing::Packed,
    Packing::UnpackedA,
    Packing::UnpackedB,
    Packing::Unpacked,
    Packing::Auto,
];
/// Thread counts of the unpacked-operand tests.
const SKINNY_THREADS: [usize; 4] = [1, 2, 3, 16];

/// One skinny product on every path and AVX-512 tile shape, every [`Packing`] and every thread
/// count of `pools`: the packed single-thread result matches the f64 reference, and every
/// other run gives its bits exactly (C pre-filled with NaN, or accumulated onto).
#[allow(clippy::too_many_arguments)]
fn skinny_case(
    rng: &mut Rng,
    pools: &[rayon::ThreadPool],
    (m, n, k): (usize, usize, usize),
    la: usize,
    lb: usize,
    half: bool,
    acc: bool,
) {
    let a = Stored::new(m, k, la, rng, |v| v);
    let av = a.view();
    let c0: Vec<f32> = (0..m * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let what = format!("m={m} n={n} k={k} la={la} lb={lb} f16={half} acc={acc}");
    let fresh = || {
        if acc {
            c0.clone()
        } else {
            vec![f32::NAN; m * n]
        }
    };
    let bf = Stored::new(k, n, lb, rng, |v| v);
    let bh = Stored::new(k, n, lb, rng, f16::from_f32);
    let (bfv, bhv) = (bf.view(), bh.view());
    let (want, scale) = if half {
        reference(
            &av,
            &|p, j| bhv.at(p, j).to_f32(),
            n,
            acc.then_some(&c0[..]),
        )
    } else {
        reference(&av, &|p, j| bfv.at(p, j), n, acc.then_some(&c0[..]))
    };
    let b: &dyn PackB = if half { &bhv } else { &bfv };
    // Every kernel: a path (the default tile on AVX-512) or an explicit AVX-512 tile.
    type Run<'r> = Box<dyn Fn(&mut [f32], Packing) + Sync + 'r>;
    let mut kernels: Vec<(String, Run)> = Vec::new();
    for path in paths() {
        kernels.push((
            format!("{path:?}"),
            Box::new(move |c: &mut [f32], pk| gemm_with_packing(path, av, b, c, acc, pk).unwrap()),
        ));
    }
    for (tile, ks) in tiles() {
        kernels.push((
            format!("{tile:?} k_slice={ks}"),
            Box::new(move |c: &mut [f32], pk| {
                gemm_avx512_tile_with_packing(tile, ks, av, b, c, acc, pk).unwrap()
            }),
        ));
    }
    for (name, run) in &kernels {
        let mut packed = fresh();
        run(&mut packed, Packing::Packed);
        check(&packed, &want, &scale, k, &format!("{what} {name}"));
        let packed = bits(&packed);
        for pk in PACKINGS {
            for pool in pools {
                let mut c = fresh();
                pool.install(|| run(&mut c, pk));
                assert_eq!(
                    bits(&c),
                    packed,
                    "{what} {name} {pk:?} {} threads",
                    pool.current_num_threads()
                );
            }
        }
    }
}

/// Skinny products (`m` or `n` from [`SKINNY`], the others from [`OTHER`]) with A row-major,
/// transposed (as `dYᵀ`) and strided, B row-major (read in place when unpacked), padded,
/// transposed and f16: operands read in place give the packed operands' bits on every path,
/// tile shape and thread count, and match the reference.
#[test]
fn skinny_products_unpacked_equal_packed_bits() {
    let pools: Vec<rayon::ThreadPool> = SKINNY_THREADS
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();
    let mut rng = Rng::new(31);
    let mut cases = 0;
    for (si, &s) in SKINNY.iter().enumerate() {
        for (oi, &o) in OTHER.iter().enumerate() {
            let k = OTHER[(si + 3 * oi + 1) % OTHER.len()];
            for skinny_rows in [false, true] {
                let shape = if skinny_rows { (s, o, k) } else { (o, s, k) };
                let sel = si + oi + usize::from(skinny_rows);
                // B: row-major or padded row-major (in place) three times in four.
                let lb = [0, 2, 0, 1][(si + 2 * oi) % 4];
                let half = (si * 7 + oi) % 9 == 0;
                skinny_case(&mut rng, &pools, shape, sel % 4, lb, half, sel % 2 == 0);
                cases += 1;
            }
        }
    }
    // The QLoRA adapter's products (width 1023 here, rank 32 or 33): h = x·Aᵀ, dB = dYᵀ·H
    // (A a transposed view), dA = dHᵀ·X (B row-major, in place).
    for (shape, la, lb) in [
        ((300, 32, 1023), 0, 1),
        ((1023, 33, 300), 1, 0),
        ((32, 1023, 300), 1, 0),
        ((33, 1023, 129), 3, 2),
    ] {
        skinny_case(&mut rng, &pools, shape, la, lb, false, true);
        cases += 1;
    }
    assert_eq!(cases, SKINNY.len() * OTHER.len() * 2 + 4);
}

/// A small batch through short f32 rows (a LoRA adapter's `B`, `[out, r]`) on the AVX-512 tier
/// takes its transposing kernel, whose outputs are the GEMM's bits (with `B = Wᵀ`, stored or
/// added to y) on any number of threads: awkward row counts and widths up to the kernel's
/// limit (64), batches around its chunks of 8 vectors, y pre-filled with NaN or accumulated.
#[test]
fn short_rows_small_batches_give_the_gemm_bits() {
    if !has_avx512() {
        eprintln!("short rows: this CPU lacks the AVX-512 tier: its transposing kernel is not run");
        return;
    }
    let path = KernelPath::Avx512;
    let mut rng = Rng::new(23);
    for &(out, inp) in &[
        (1024usize, 32usize),
        (33, 17),
        (17, 64),
        (1, 1),
        (16, 15),
        (129, 63),
    ] {
        let w = Tensor::uniform(&[out, inp], -1.0, 1.0, &mut rng);
        let wt = MatRef::row_major(w.data(), out, inp).unwrap().t();
        for m in [2usize, 3, 7, 8, 9, 16] {
            let x: Vec<f32> = (0..m * inp).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let c0: Vec<f32> = (0..m * out).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let xv = MatRef::row_major(&x, m, inp).unwrap();
            for acc in [false, true] {
                let start = if acc {
                    c0.clone()
                } else {
                    vec![f32::NAN; m * out]
                };
                let mut want = start.clone();
                gemm_on(path, xv, &wt, &mut want, acc).unwrap();
                for threads in [1, 2, 3, 16] {
                    let got = in_pool(threads, || {
                        let mut y = start.clone();
                        gemv_t_f32(path, w.data(), out, inp, &x, m, &mut y, acc).unwrap();
                        y
                    });
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "short rows {out}x{inp} m={m} acc={acc} {threads} threads"
                    );
                }
            }
        }
    }
}
