//! The int8 GEMM (`nibble_quant::act8::gemm`, batches of `GEMM_MIN_M` = 8 and more): every tier's outputs
//! bit-identical to the scalar reference `gemm_ref` (which spells out the integer sums and the
//! f32 combination loop by loop) for every format on ragged shapes, with all-zero rows of x,
//! ±extreme activations and zero blocks of W, outputs pre-filled with NaN; the same bits on 1, 2
//! and 3 threads; `accumulate` adding. The AMX driver runs on its scalar tile emulator
//! (`IntTier::AmxEmulated`) on every CPU, and on the instructions where the CPU has AMX.

mod common;

use nibble_quant::act8::gemm::{gemm_ref, GEMM_MIN_M};
use nibble_quant::act8::{forward, IntCodes, IntTier};
use nibble_quant::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{Rng, Tensor};

/// Tiers this CPU runs, the emulated AMX tier and the emulated AVX-VNNI tier (where the CPU
/// has AVX2), printing the ones it lacks.
fn tiers() -> Vec<IntTier> {
    common::int_tiers(
        "act8 gemm",
        &[IntTier::AmxEmulated, IntTier::AvxVnniEmulated],
    )
}

/// The AMX tiers to test: the emulated one always, the hardware one where usable (printing
/// when not).
fn amx_tiers() -> Vec<IntTier> {
    if IntTier::Amx.supported() == IntTier::Amx {
        println!("act8 gemm: AMX-INT8 usable, testing the tile instructions and the emulator");
        vec![IntTier::Amx, IntTier::AmxEmulated]
    } else {
        println!(
            "act8 gemm: skipping AMX hardware ({}); testing the AMX driver on the emulator only",
            nibble_quant::act8::amx_status().err().unwrap_or_default()
        );
        vec![IntTier::AmxEmulated]
    }
}

/// W `[o, i]` with a zero block (rows 1.., columns 0..16) and one row of large values.
fn weights(o: usize, i: usize, seed: u64) -> Tensor {
    let mut w = Tensor::randn(&[o, i], &mut Rng::new(seed))
        .scale(1.0 / (i.max(1) as f32).sqrt())
        .into_vec();
    for r in 1..o {
        for k in 0..i.min(16) {
            w[r * i + k] = 0.0;
        }
    }
    if o > 0 {
        for (k, v) in w[..i].iter_mut().enumerate() {
            *v = if k % 3 == 0 { 4.0 } else { -4.0 };
        }
    }
    Tensor::from_vec(&[o, i], w).unwrap()
}

/// Every format of `w`.
fn formats(w: &Tensor) -> Vec<(&'static str, Box<dyn IntCodes>)> {
    vec![
        ("q4", Box::new(Q4Matrix::quantize(w).unwrap())),
        ("nf4", Box::new(Nf4Matrix::quantize(w).unwrap())),
        ("nf4_dq", Box::new(Nf4Matrix::quantize_double(w).unwrap())),
        ("int8", Box::new(Int8Matrix::quantize(w).unwrap())),
        ("lower", Box::new(LowerMatrix::quantize(w).unwrap())),
    ]
}

/// x `[m, i]`: row 1 all zero, row 2 at ±extremes (every element ±amax: xq = ±127), the rest
/// Gaussian with one group scaled up.
fn activations(m: usize, i: usize, seed: u64) -> Vec<f32> {
    let mut x = Tensor::randn(&[m, i], &mut Rng::new(seed)).into_vec();
    x[i..2 * i].fill(0.0);
    for k in 0..i {
        x[2 * i + k] = if k % 2 == 0 { 3.0 } else { -3.0 };
    }
    for v in &mut x[3 * i..3 * i + i.min(128)] {
        *v *= 1000.0;
    }
    x
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
}

#[test]
fn every_tier_matches_the_reference() {
    let tiers = tiers();
    for &i in &[0usize, 1, 7, 15, 17, 31, 33, 63, 129, 1023] {
        for &(o, m) in &[
            (1usize, 16usize),
            (5, GEMM_MIN_M),
            (7, 17),
            (9, 31),
            (33, 33),
            (70, 64),
        ] {
            let w = weights(o, i, (i * 7 + o) as u64);
            let x = activations(m, i, (i + m) as u64);
            for (name, f) in formats(&w) {
                let mut want = vec![f32::NAN; m * o];
                if !gemm_ref(f.as_ref(), &x, m, &mut want) {
                    // No integer layout (NF4 with in % 64 != 0) or in == 0: forward refuses too.
                    let mut y = vec![f32::NAN; m * o];
                    assert!(!forward(IntTier::Scalar, f.as_ref(), &x, m, &mut y, false));
                    assert!(i == 0 || (name.starts_with("nf4") && i % 64 != 0), "{name}");
                    continue;
                }
                assert!(want.iter().all(|v| v.is_finite()), "{name} {o}x{i} m {m}");
                for &t in &tiers {
                    let mut y = vec![f32::NAN; m * o];
                    assert!(forward(t, f.as_ref(), &x, m, &mut y, false));
                    assert!(
                        same_bits(&y, &want),
                        "{name} {o}x{i} m {m}: tier {t:?} differs from the reference"
                    );
                    let mut acc = vec![0.5f32; m * o];
                    assert!(forward(t, f.as_ref(), &x, m, &mut acc, true));
                    assert!(
                        acc.iter().zip(&want).all(|(a, b)| *a == 0.5 + b),
                        "{name} {o}x{i} m {m}: tier {t:?} accumulate"
                    );
                }
            }
        }
    }
}

#[test]
fn bits_independent_of_threads() {
    let w = weights(200, 320, 11);
    let x = activations(70, 320, 12);
    let tiers = tiers();
    let run = |threads: usize| {
        common::on_threads(threads, || {
            let mut out = Vec::new();
            for (_, f) in formats(&w) {
                for &t in &tiers {
                    for m in [GEMM_MIN_M, 70] {
                        let mut y = vec![f32::NAN; m * 200];
                        assert!(forward(t, f.as_ref(), &x[..m * 320], m, &mut y, false));
                        out.push(y);
                    }
                }
            }
            out
        })
    };
    let one = run(1);
    for threads in [2, 3] {
        let other = run(threads);
        assert_eq!(one.len(), other.len());
        for (a, b) in one.iter().zip(&other) {
            assert!(same_bits(a, b), "{threads} threads");
        }
    }
}

/// The AMX driver's blocks (32 vectors x 32 rows of W in 16 x 16 tiles, sums folded 8 units at
/// a time) on shapes around every boundary: batches and rows of W of 1, 7, 15, 17, 31, 33, 63,
/// 129 and 1023, lengths from 1 to 1023 (units of 16, 64 and 128 in one or many chunks),
/// against the reference, bit for bit, also accumulating (batches below the GEMM against the
/// portable tier).
#[test]
fn amx_driver_matches_the_reference() {
    let amx = amx_tiers();
    let shapes: &[(usize, usize, &[usize])] = &[
        // (o, m, lengths)
        (1, 0, &[64]),
        (7, 1, &[129]),
        (15, 7, &[129]),
        (17, 15, &[1, 63, 129, 1023]),
        (31, 17, &[7, 64, 1023]),
        (33, 31, &[15, 128, 129]),
        (63, 33, &[17, 256, 1023]),
        (129, 63, &[31, 129]),
        (33, 129, &[33, 192]),
        (1023, 16, &[129]),
        (7, 1023, &[63]),
    ];
    for &(o, m, lengths) in shapes {
        for &i in lengths {
            let w = weights(o, i, (o * 31 + i) as u64);
            let x = activations(m.max(4), i, (m + i) as u64);
            let x = &x[..m * i];
            for (name, f) in formats(&w) {
                let mut want = vec![f32::NAN; m * o];
                if !gemm_ref(f.as_ref(), x, m, &mut want) {
                    assert!(name.starts_with("nf4") && i % 64 != 0, "{name} {o}x{i}");
                    continue;
                }
                if m < GEMM_MIN_M {
                    // Below the GEMM every tier runs the dot-product driver, whose f32
                    // combination is its own: the portable tier's bits are the reference.
                    want.fill(f32::NAN);
                    assert!(forward(IntTier::Scalar, f.as_ref(), x, m, &mut want, false));
                }
                for &t in &amx {
                    let mut y = vec![f32::NAN; m * o];
                    assert!(forward(t, f.as_ref(), x, m, &mut y, false));
                    assert!(
                        same_bits(&y, &want),
                        "{name} {o}x{i} m {m}: tier {t:?} differs from the reference"
                    );
                    let mut acc = vec![-0.25f32; m * o];
                    assert!(forward(t, f.as_ref(), x, m, &mut acc, true));
                    assert!(
                        acc.iter().zip(&want).all(|(a, b)| *a == -0.25 + b),
                        "{name} {o}x{i} m {m}: tier {t:?} accumulate"
                    );
                }
            }
        }
    }
}

/// The AMX tier is chosen on the AVX-512 path exactly where it is usable, and routes the GEMM
/// at the batches VNNI's routes do (measured faster there, see `gemm_route`).
#[test]
fn amx_tier_selection() {
    use nibble_quant::act8::{gemm_route, has_amx};
    use nibble_quant::cpu::KernelPath;
    let on_avx512 = IntTier::for_path(KernelPath::Avx512);
    assert_eq!(on_avx512 == IntTier::Amx, has_amx());
    assert_eq!(IntTier::available().contains(&IntTier::Amx), has_amx());
    if !has_amx() {
        assert_ne!(IntTier::Amx.supported(), IntTier::Amx);
    }
    assert_eq!(IntTier::AmxEmulated.supported(), IntTier::AmxEmulated);
    assert!(!IntTier::available().contains(&IntTier::AmxEmulated));
    for f in ["q4", "nf4", "int8", "lower"] {
        let route = gemm_route(IntTier::Amx, f);
        assert!(route.is_some(), "{f}");
        assert_eq!(route, gemm_route(IntTier::Avx512Vnni, f), "{f}");
    }
}

/// The AVX-VNNI tier is listed and chosen exactly where the CPU has it: on the AVX2 path, and
/// on the AVX-512 path below AVX-512 VNNI; without it the tier falls to AVX2. It routes the
/// batches AVX-512 VNNI does but NF4's, int8's and lower's from 12; its emulation is never
/// listed or chosen. Those formats' small batches take their fused GEMVs up to the GEMM.
#[test]
fn avxvnni_tier_selection() {
    use nibble_quant::act8::{
        gemm_route, has_avx512vnni, has_avxvnni, int8_route_on, Int8Route, GEMM_START_AVXVNNI,
        INT8_FUSED_END_AVXVNNI, INT8_GEMM_START_512, LOWER_FUSED_END_AVX2, LOWER_FUSED_END_AVXVNNI,
        LOWER_GEMM_START_512, NF4_FUSED_END_AVXVNNI, NF4_GEMM_START_512,
    };
    use nibble_quant::cpu::{has_avx2_fma_f16c, KernelPath};
    let has = has_avxvnni();
    if !has {
        println!("act8 gemm: this CPU lacks AVX-VNNI (or NIBBLE_AVXVNNI=0): only its fallback is checked");
        assert_eq!(IntTier::AvxVnni.supported(), IntTier::Avx2.supported());
    } else {
        assert!(has_avx2_fma_f16c());
        assert_eq!(IntTier::AvxVnni.supported(), IntTier::AvxVnni);
    }
    assert_eq!(IntTier::available().contains(&IntTier::AvxVnni), has);
    let best256 = if has { IntTier::AvxVnni } else { IntTier::Avx2 };
    if KernelPath::Avx2Fma.supported() == KernelPath::Avx2Fma {
        assert_eq!(IntTier::for_path(KernelPath::Avx2Fma), best256);
    }
    if KernelPath::Avx512.supported() == KernelPath::Avx512 && !has_avx512vnni() {
        assert_eq!(IntTier::for_path(KernelPath::Avx512), best256);
    }
    assert!(!IntTier::available().contains(&IntTier::AvxVnniEmulated));
    let emulated = IntTier::AvxVnniEmulated.supported();
    if has_avx2_fma_f16c() {
        assert_eq!(emulated, IntTier::AvxVnniEmulated);
    } else {
        assert_eq!(emulated, IntTier::Scalar);
    }
    // Measured on the Xeon's AVX-VNNI: the GEMM from 48 for Q4 (as AVX-512 VNNI), from
    // GEMM_START_AVXVNNI for NF4, int8 and lower (the 512-bit tiers start them where their
    // fused batch kernels stop winning).
    for f in ["q4", "nf4", "int8", "lower"] {
        let start = if f == "q4" { 48 } else { GEMM_START_AVXVNNI };
        assert_eq!(
            gemm_route(IntTier::AvxVnni, f),
            Some(start..usize::MAX),
            "{f}"
        );
        let start512 = match f {
            "q4" => 48,
            "nf4" => NF4_GEMM_START_512,
            "int8" => INT8_GEMM_START_512,
            _ => LOWER_GEMM_START_512,
        };
        for tier in [IntTier::Avx512Vnni, IntTier::Amx] {
            assert_eq!(
                gemm_route(tier, f),
                Some(start512..usize::MAX),
                "{f} {tier:?}"
            );
        }
    }
    // NF4's, the int8 format's and lower's small batches on their fused GEMVs (the 256-bit
    // kernels) up to where the tier's GEMM starts, the GEMM from there (AVX2: on any AVX2
    // CPU; NF4 and int8 stop there at FUSED_END_AVX2, below their GEMMs).
    let fused_tiers = [
        (
            IntTier::AvxVnni,
            "nf4",
            Int8Route::FusedNf4,
            NF4_FUSED_END_AVXVNNI,
            has,
        ),
        (
            IntTier::AvxVnni,
            "int8",
            Int8Route::FusedInt8,
            INT8_FUSED_END_AVXVNNI,
            has,
        ),
        (
            IntTier::AvxVnni,
            "lower",
            Int8Route::FusedLower,
            LOWER_FUSED_END_AVXVNNI,
            has,
        ),
        (
            IntTier::Avx2,
            "lower",
            Int8Route::FusedLower,
            LOWER_FUSED_END_AVX2,
            has_avx2_fma_f16c(),
        ),
    ];
    for (tier, f, fused, end, runs) in fused_tiers {
        assert_eq!(
            gemm_route(tier, f).map(|r| r.start),
            Some(end),
            "{tier:?} {f}"
        );
        if !runs {
            continue;
        }
        for m in 1..end {
            assert_eq!(int8_route_on(tier, f, m), fused, "{tier:?} {f} {m}");
        }
        for m in [end, end + 1, 2 * end, 48, 1024] {
            assert_eq!(
                int8_route_on(tier, f, m),
                Int8Route::Generic,
                "{tier:?} {f} {m}"
            );
        }
    }
}

/// `gemm::phases` (the GEMM's phases one after another, for benchmarks) gives the outputs of
/// `forward` bit for bit on every tier and format, and declines where `forward` does: batches
/// below `GEMM_MIN_M`, a wrong length of y, a NaN or infinity in x (y left untouched).
#[test]
fn phases_give_the_forward_outputs() {
    use nibble_quant::act8::gemm::phases;
    let (o, i, m) = (33, 192, GEMM_MIN_M + 9);
    let w = weights(o, i, 41);
    let x = activations(m, i, 42);
    for (name, f) in formats(&w) {
        for tier in tiers() {
            let mut want = vec![f32::NAN; m * o];
            assert!(
                forward(tier, f.as_ref(), &x, m, &mut want, false),
                "{name} {tier:?}"
            );
            let mut got = vec![f32::NAN; m * o];
            let times = phases(tier, f.as_ref(), &x, m, &mut got)
                .unwrap_or_else(|| panic!("{name} {tier:?}: phases declined"));
            assert!(times.iter().all(|t| t.is_finite() && *t >= 0.0));
            assert!(
                same_bits(&got, &want),
                "{name} {tier:?}: phases' outputs differ"
            );
            let short = GEMM_MIN_M - 1;
            let mut y = vec![f32::NAN; short * o];
            assert!(phases(tier, f.as_ref(), &x[..short * i], short, &mut y).is_none());
            let mut y = vec![f32::NAN; m * o - 1];
            assert!(phases(tier, f.as_ref(), &x, m, &mut y).is_none());
            for bad in [f32::NAN, f32::INFINITY] {
                let mut xb = x.clone();
                xb[i + 3] = bad;
                let mut y = vec![7.0f32; m * o];
                assert!(phases(tier, f.as_ref(), &xb, m, &mut y).is_none());
                assert!(y.iter().all(|&v| v == 7.0), "{name} {tier:?}: y touched");
            }
        }
    }
}

/// `forward_with_bias` (a layer's bias added and a ReLU or nothing applied as each output is
/// stored) gives the bits of y filled with the bias rows, `forward` accumulating onto them
/// and the step as a pass of its own, on every tier and format,
/// for the dot-product driver (batches below `GEMM_MIN_M`) and the GEMM, a bias with `-0.0`
/// and large values; it declines a bias of the wrong length and a non-finite x, y untouched.
/// Through `WeightMatrix::matmul_t_fused` under int8 activations likewise.
#[test]
fn bias_in_the_store_matches_fill_then_accumulate() {
    use nibble_quant::act8::{forward_with_bias, with_activations, ActivationMode};
    use nibble_tensor::gemm::MatRef;
    use nibble_tensor::ops::PostOp;
    use nibble_tensor::WeightMatrix;
    let (o, i) = (37, 192);
    let w = weights(o, i, 51);
    let bias: Vec<f32> = (0..o)
        .map(|c| match c % 4 {
            0 => -0.0,
            1 => 1e6,
            _ => c as f32 * 0.37 - 5.0,
        })
        .collect();
    let amx = amx_tiers();
    for m in [1, 3, GEMM_MIN_M, 33, 70] {
        let x = activations(m.max(4), i, 52 + m as u64);
        let x = &x[..m * i];
        for (name, f) in formats(&w) {
            for &tier in tiers().iter().chain(&amx) {
                let mut want: Vec<f32> = bias.iter().copied().cycle().take(m * o).collect();
                assert!(forward(tier, f.as_ref(), x, m, &mut want, true));
                for post in [PostOp::Identity, PostOp::Relu] {
                    let mut want = want.clone();
                    post.apply_in_place(&mut want);
                    let mut got = vec![f32::NAN; m * o];
                    assert!(forward_with_bias(
                        tier,
                        f.as_ref(),
                        x,
                        m,
                        &mut got,
                        &bias,
                        post
                    ));
                    assert!(
                        same_bits(&got, &want),
                        "{name} {tier:?} m {m} {post:?}: bias in the store differs"
                    );
                }
                let mut y = vec![7.0f32; m * o];
                let id = PostOp::Identity;
                assert!(!forward_with_bias(
                    tier,
                    f.as_ref(),
                    x,
                    m,
                    &mut y,
                    &bias[1..],
                    id
                ));
                let mut xb = x.to_vec();
                xb[0] = f32::NAN;
                assert!(!forward_with_bias(
                    tier,
                    f.as_ref(),
                    &xb,
                    m,
                    &mut y,
                    &bias,
                    id
                ));
                assert!(y.iter().all(|&v| v == 7.0), "{name} {tier:?}: y touched");
            }
        }
    }
    // Through the layer API, for a format whose int8 route takes the generic driver.
    let q = nibble_quant::LowerMatrix::quantize(&w).unwrap();
    let m = 64;
    let x = activations(m, i, 60);
    let b = MatRef::row_major(&bias, 1, o).unwrap();
    with_activations(ActivationMode::Int8, || {
        for post in [PostOp::Identity, PostOp::Relu] {
            let mut fused = vec![f32::NAN; m * o];
            q.matmul_t_fused(&x, m, &mut fused, Some(&b), None, post)
                .unwrap();
            let mut parts: Vec<f32> = bias.iter().copied().cycle().take(m * o).collect();
            q.matmul_t(&x, m, &mut parts, true).unwrap();
            post.apply_in_place(&mut parts);
            assert!(
                same_bits(&fused, &parts),
                "matmul_t_fused with a bias and {post:?} differs"
            );
        }
    });
}

/// A LoRA adapter's `h · Bᵀ` added by the int8 GEMM's tasks to their outputs
/// (`WeightMatrix::matmul_t_one_pass`): for every format whose int8 route takes the
/// generic driver, with and without a bias, with and without a ReLU, ragged batches, widths
/// and ranks, on 1 and 3 threads: the bits of the parts in order (the bias rows, the int8
/// product accumulated, the f32 GEMM accumulating `h · Bᵀ`, the ReLU), y pre-filled with NaN;
/// a rank past one K block of the GEMM declines, y untouched.
#[test]
fn low_rank_tail_matches_the_gemm_after_the_product() {
    use nibble_quant::act8::{with_activations, ActivationMode};
    use nibble_tensor::gemm::{gemm_segments_post, MatRef, Segment, KC};
    use nibble_tensor::ops::PostOp;
    use nibble_tensor::WeightMatrix;
    let i = 192;
    let path = nibble_quant::cpu::kernel_path();
    let tail_kernels = matches!(
        path,
        nibble_quant::cpu::KernelPath::Avx2Fma | nibble_quant::cpu::KernelPath::Avx512
    );
    if !tail_kernels {
        println!(
            "act8 gemm: skipping the low-rank tail's kernels on the {path:?} path (they run on \
             AVX2 and AVX-512); checking that it declines there"
        );
    }
    for o in [37, 100] {
        let w = weights(o, i, 70 + o as u64);
        let bias: Vec<f32> = (0..o).map(|c| c as f32 * 0.21 - 3.0).collect();
        let bias_row = MatRef::row_major(&bias, 1, o).unwrap();
        let mats: Vec<(&str, Box<dyn WeightMatrix>)> = vec![
            ("q4", Box::new(Q4Matrix::quantize(&w).unwrap())),
            ("nf4", Box::new(Nf4Matrix::quantize(&w).unwrap())),
            ("int8", Box::new(Int8Matrix::quantize(&w).unwrap())),
            ("lower", Box::new(LowerMatrix::quantize(&w).unwrap())),
        ];
        for (m, rank) in [(64, 32), (70, 7), (130, 1)] {
            let x = activations(m, i, 80 + m as u64);
            let h = Tensor::randn(&[m, rank], &mut Rng::new(90 + rank as u64)).into_vec();
            let bt_vals = Tensor::randn(&[rank, o], &mut Rng::new(95)).into_vec();
            let hm = MatRef::row_major(&h, m, rank).unwrap();
            let bt = MatRef::row_major(&bt_vals, rank, o).unwrap();
            for (name, q) in &mats {
                for with_bias in [false, true] {
                    for post in [PostOp::Identity, PostOp::Relu] {
                        let (want, got): (Vec<f32>, Vec<Vec<f32>>) =
                            with_activations(ActivationMode::Int8, || {
                                let mut want: Vec<f32> = if with_bias {
                                    bias.iter().copied().cycle().take(m * o).collect()
                                } else {
                                    vec![f32::NAN; m * o]
                                };
                                q.matmul_t(&x, m, &mut want, with_bias).unwrap();
                                let seg = Segment { a: hm, b: &bt };
                                gemm_segments_post(&[seg], &mut want, true, post).unwrap();
                                let got = [1, 3]
                                    .iter()
                                    .map(|&t| {
                                        common::on_threads(t, || {
                                            with_activations(ActivationMode::Int8, || {
                                                let mut y = vec![f32::NAN; m * o];
                                                let seg = Segment { a: hm, b: &bt };
                                                let b = with_bias.then_some(&bias[..]);
                                                let fused = q
                                                    .matmul_t_one_pass(
                                                        &x,
                                                        m,
                                                        &mut y,
                                                        b,
                                                        Some(seg),
                                                        post,
                                                    )
                                                    .unwrap();
                                                if !fused {
                                                    // Declined (a path below AVX2): y
                                                    // untouched, and the comparison below
                                                    // fails on its NaNs.
                                                    assert!(
                                                        !tail_kernels,
                                                        "{name}: m {m} declined"
                                                    );
                                                    assert!(y.iter().all(|v| v.is_nan()));
                                                    y.clone_from(&want);
                                                }
                                                y
                                            })
                                        })
                                    })
                                    .collect();
                                (want, got)
                            });
                        for (t, g) in got.iter().enumerate() {
                            assert!(
                                same_bits(g, &want),
                                "{name} o {o} m {m} rank {rank} bias {with_bias} {post:?} pool {t}: differs"
                            );
                        }
                        // The layer's own entry point gives the same bits.
                        let mut y = vec![f32::NAN; m * o];
                        with_activations(ActivationMode::Int8, || {
                            let seg = Segment { a: hm, b: &bt };
                            let b =
                                with_bias.then_some(&bias_row as &dyn nibble_tensor::gemm::PackB);
                            q.matmul_t_fused(&x, m, &mut y, b, Some(seg), post).unwrap();
                        });
                        assert!(same_bits(&y, &want), "{name} matmul_t_fused differs");
                    }
                }
            }
        }
        // A rank past one K block: declined, y untouched.
        let (m, rank) = (64, KC + 1);
        let x = activations(m, i, 99);
        let h = vec![0.5f32; m * rank];
        let bt_vals = vec![0.25f32; rank * o];
        let seg = Segment {
            a: MatRef::row_major(&h, m, rank).unwrap(),
            b: &MatRef::row_major(&bt_vals, rank, o).unwrap(),
        };
        let mut y = vec![7.0f32; m * o];
        let fused = with_activations(ActivationMode::Int8, || {
            mats[0]
                .1
                .matmul_t_one_pass(&x, m, &mut y, Some(&bias), Some(seg), PostOp::Relu)
                .unwrap()
        });
        assert!(
            !fused && y.iter().all(|&v| v == 7.0),
            "rank {rank}: not declined"
        );
    }
}

/// A matrix whose rows before `zero_offsets_below` have their offsets set to zero (the other
/// rows keep their format's), and whose codes panic from row `panic_from` on: W's blocks of
/// rows are packed by the tasks that first need them, each block deciding on its own whether
/// the fold adds the offset term.
struct Patched<'a> {
    inner: &'a dyn IntCodes,
    zero_offsets_below: usize,
    panic_from: usize,
}

impl IntCodes for Patched<'_> {
    fn int_dims(&self) -> (usize, usize) {
        self.inner.int_dims()
    }
    fn int_layout(&self) -> Option<nibble_quant::act8::IntLayout> {
        self.inner.int_layout()
    }
    fn int_codes(&self, r: usize, dst: &mut [u8]) {
        assert!(r < self.panic_from, "row {r}: a failing source of codes");
        self.inner.int_codes(r, dst)
    }
    fn int_affine(&self, r: usize, scale: &mut [f32], offset: &mut [f32]) {
        self.inner.int_affine(r, scale, offset);
        if r < self.zero_offsets_below {
            offset.fill(0.0);
        }
    }
    fn int_centered(&self) -> bool {
        self.inner.int_centered()
    }
    fn int_centered_scale(&self, r: usize, half: &mut [f32]) {
        self.inner.int_centered_scale(r, half)
    }
}

#[test]
fn blocks_with_and_without_offsets_match_the_reference() {
    let (o, i) = (200, 256);
    let w = weights(o, i, 21);
    let lower = LowerMatrix::quantize(&w).unwrap();
    let x = activations(40, i, 22);
    for zero_below in [0, 64, 100, 200] {
        let patched = Patched {
            inner: &lower,
            zero_offsets_below: zero_below,
            panic_from: usize::MAX,
        };
        for m in [GEMM_MIN_M, 40] {
            let mut want = vec![f32::NAN; m * o];
            assert!(gemm_ref(&patched, &x[..m * i], m, &mut want));
            for &t in &tiers() {
                for threads in [1, 3] {
                    let y = common::on_threads(threads, || {
                        let mut y = vec![f32::NAN; m * o];
                        assert!(forward(t, &patched, &x[..m * i], m, &mut y, false));
                        y
                    });
                    assert!(
                        same_bits(&y, &want),
                        "offsets zero below row {zero_below}, m {m}, {t:?}, {threads} threads"
                    );
                }
            }
        }
    }
}

#[test]
fn a_panic_while_packing_reaches_the_caller_and_the_next_call_works() {
    let (o, i) = (300, 128);
    let w = weights(o, i, 31);
    let q4 = Q4Matrix::quantize(&w).unwrap();
    let m = 64;
    let x = activations(m, i, 32);
    for &t in &tiers() {
        for threads in [1, 3] {
            let failing = Patched {
                inner: &q4,
                zero_offsets_below: 0,
                panic_from: 130,
            };
            let caught = common::on_threads(threads, || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut y = vec![f32::NAN; m * o];
                    forward(t, &failing, &x, m, &mut y, false)
                }))
            });
            assert!(
                caught.is_err(),
                "{t:?} {threads} threads: the panic was lost"
            );
            // The thread's packing buffers are whole again for the next call.
            let mut want = vec![f32::NAN; m * o];
            assert!(gemm_ref(&q4, &x, m, &mut want));
            let y = common::on_threads(threads, || {
                let mut y = vec![f32::NAN; m * o];
                assert!(forward(t, &q4, &x, m, &mut y, false));
                y
            });
            assert!(
                same_bits(&y, &want),
                "{t:?} {threads} threads after a panic"
            );
        }
    }
}
