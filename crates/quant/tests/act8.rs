//! Int8 activations ([`nibble_quant::act8`]): every integer tier against the scalar integer
//! reference on ragged unit contents, every format's int8 forward bit-identical across tiers
//! and thread counts, equal to the integer formula, and within the documented bound of the
//! f32 path, on awkward shapes and batch sizes.

#![allow(clippy::needless_range_loop)]

mod common;

use nibble_quant::act8::backward::{backward_route, Int8InputGrad, TransposedInt8, BACKWARD_UNIT};
use nibble_quant::act8::{
    forward, fused_end_on, fused_on_tier, int8_route, q4_fused_end, quantize_x, unit_sums,
    unit_sums_ref, with_activations, ActivationMode, CodeKind, Int8Route, IntCodes, IntTier, GROUP,
    NF4_LEVELS_I8,
};
use nibble_quant::nf4::NF4_LEVELS;
use nibble_quant::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{Rng, Tensor, WeightMatrix};

/// Tiers this CPU runs and the emulated AVX-VNNI tier (where the CPU has AVX2), printing the
/// ones it lacks.
fn tiers() -> Vec<IntTier> {
    common::int_tiers("act8", &[IntTier::AvxVnniEmulated])
}

/// Deterministic bytes from a counter (xorshift).
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Codes and xq with the awkward contents: extremes, zero units, all-zero x.
fn operands(kind: CodeKind, n: usize, unit: usize, seed: u64) -> (Vec<u8>, Vec<Vec<i8>>) {
    let mut codes = bytes(n, seed);
    if kind == CodeKind::Nibble {
        codes.iter_mut().for_each(|c| *c &= 15);
    }
    // Unit 0 at the extreme code, unit 1 all zero codes.
    let hi = if kind == CodeKind::Nibble { 15 } else { 0x80 };
    codes[..unit].fill(hi);
    if n >= 2 * unit {
        codes[unit..2 * unit].fill(0);
    }
    let mut xs = Vec::new();
    for v in 0..4u64 {
        let mut x: Vec<i8> = bytes(n, seed + 10 + v)
            .into_iter()
            .map(|b| (b as i8).max(-127))
            .collect();
        match v {
            0 => x[..unit].fill(127),
            1 => x[..unit].fill(-127),
            2 => x.fill(0),
            _ => {}
        }
        xs.push(x);
    }
    (codes, xs)
}

/// Every tier's unit sums equal the scalar integer reference (1 and 4 vectors at a time) on
/// lengths of 1..9 groups, units 16/64/128, nibble and signed codes.
#[test]
fn unit_sums_every_tier_match_the_reference() {
    let tiers = tiers();
    for kind in [CodeKind::Nibble, CodeKind::Signed] {
        for unit in [16usize, 64, 128] {
            for groups in [1usize, 2, 3, 7, 9] {
                let n = groups * GROUP;
                let units = n / unit;
                let (codes, xs) = operands(kind, n, unit, (groups * unit) as u64);
                let want: Vec<Vec<i32>> = xs
                    .iter()
                    .map(|x| {
                        let mut o = vec![0; units];
                        unit_sums_ref(kind, unit, &codes, x, &mut o);
                        o
                    })
                    .collect();
                let qs: Vec<Vec<i32>> = xs
                    .iter()
                    .map(|x| {
                        x.chunks(unit)
                            .map(|c| c.iter().map(|&v| i32::from(v)).sum())
                            .collect()
                    })
                    .collect();
                for &t in &tiers {
                    let mut o: Vec<Vec<i32>> = vec![vec![i32::MIN; units]; 4];
                    let [a, b, c, d] = &mut o[..] else {
                        unreachable!()
                    };
                    unit_sums(
                        t,
                        kind,
                        unit,
                        &codes,
                        [&xs[0], &xs[1], &xs[2], &xs[3]],
                        [&qs[0], &qs[1], &qs[2], &qs[3]],
                        [a, b, c, d],
                    )
                    .unwrap();
                    assert_eq!(o, want, "{t:?} {kind:?} unit {unit} n {n} (4 vectors)");
                    let mut one = vec![i32::MIN; units];
                    unit_sums(t, kind, unit, &codes, [&xs[3]], [&qs[3]], [&mut one]).unwrap();
                    assert_eq!(one, want[3], "{t:?} {kind:?} unit {unit} n {n}");
                }
            }
        }
    }
    // Bad lengths are an error, not a panic.
    let mut o = vec![0; 1];
    assert!(unit_sums(
        IntTier::Scalar,
        CodeKind::Nibble,
        16,
        &[0; 16],
        [&[0; 16]],
        [&[0]],
        [&mut o]
    )
    .is_err());
}

/// The formats under test for `(out, in)`.
fn formats(o: usize, i: usize, seed: u64) -> Vec<(&'static str, Box<dyn Fmt>)> {
    let w = Tensor::randn(&[o, i], &mut Rng::new(seed)).scale(1.0 / (i.max(1) as f32).sqrt());
    vec![
        (
            "q4",
            Box::new(Q4Matrix::quantize(&w).unwrap()) as Box<dyn Fmt>,
        ),
        ("nf4", Box::new(Nf4Matrix::quantize(&w).unwrap())),
        ("nf4_dq", Box::new(Nf4Matrix::quantize_double(&w).unwrap())),
        ("int8", Box::new(Int8Matrix::quantize(&w).unwrap())),
        ("lower", Box::new(LowerMatrix::quantize(&w).unwrap())),
    ]
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

/// Every format's int8 forward on awkward shapes and batches: bit-identical on every tier,
/// equal (to f32 rounding) to `Σ_k w8_k · sx·xq_k` with the format's integer weights, within
/// the documented bound of the f32 path, NaN-prefilled outputs fully written, `accumulate`
/// adding, and `matmul_t` under `with_activations(Int8)` following [`int8_route`]: the same
/// bits on the generic route, the f32 path's on the f32 route, within the same bound and
/// formula on Q4's fused route.
#[test]
fn forward_every_format_every_tier() {
    let tiers = tiers();
    for &i in &[1usize, 7, 15, 17, 31, 33, 63, 64, 129, 192, 1023] {
        for &(o, m) in &[(0usize, 1usize), (1, 1), (9, 2), (7, 3), (17, 16), (33, 5)] {
            for (name, f) in formats(o, i, (i * 31 + o) as u64) {
                let x = Tensor::randn(&[m, i], &mut Rng::new((i + m) as u64));
                let mut x = x.into_vec();
                if m > 1 {
                    x[i..2 * i].fill(0.0); // an all-zero row of x
                }
                let Some(layout) = f.int_layout() else {
                    assert!(
                        name.starts_with("nf4") && i % 64 != 0,
                        "{name} has no layout"
                    );
                    let mut y = vec![f32::NAN; m * o];
                    assert!(!forward(IntTier::Scalar, f.as_int(), &x, m, &mut y, false));
                    continue;
                };
                let runs: Vec<Vec<f32>> = tiers
                    .iter()
                    .map(|&t| {
                        let mut y = vec![f32::NAN; m * o];
                        assert!(forward(t, f.as_int(), &x, m, &mut y, false));
                        y
                    })
                    .collect();
                for (t, y) in tiers.iter().zip(&runs) {
                    assert!(
                        y.iter()
                            .zip(&runs[0])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{name} {o}x{i} m {m}: tier {t:?} differs from {:?}",
                        tiers[0]
                    );
                }
                let y = &runs[0];
                let mut via = vec![f32::NAN; m * o];
                with_activations(ActivationMode::Int8, || f.matmul_t(&x, m, &mut via, false))
                    .unwrap();
                let route = int8_route(f.format_name(), m);
                let mut acc = vec![1.0f32; m * o];
                assert!(forward(tiers[0], f.as_int(), &x, m, &mut acc, true));
                assert!(
                    acc.iter().zip(y).all(|(a, b)| *a == 1.0 + b),
                    "{name} accumulate"
                );
                let mut exact = vec![0.0f32; m * o];
                f.matmul_t(&x, m, &mut exact, false).unwrap();
                // matmul_t under Int8 follows the route: the generic driver's bits, the f32
                // path's bits, or (Q4's and NF4's fused GEMVs) the same integer values in
                // another f32 order, checked against the bound below like the driver.
                let bits_eq =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                match route {
                    Int8Route::Generic => assert!(bits_eq(y, &via), "{name} m {m} matmul_t"),
                    Int8Route::F32 => assert!(bits_eq(&exact, &via), "{name} m {m} f32 route"),
                    Int8Route::FusedQ4 => assert_eq!(name, "q4"),
                    Int8Route::FusedNf4 => assert!(
                        name.starts_with("nf4")
                            && m < fused_end_on(
                                IntTier::for_path(nibble_quant::cpu::kernel_path()),
                                "nf4"
                            ),
                        "{name} m {m}"
                    ),
                    Int8Route::FusedLower => assert!(
                        name == "lower"
                            && m < fused_end_on(
                                IntTier::for_path(nibble_quant::cpu::kernel_path()),
                                "lower"
                            ),
                        "{name} m {m}"
                    ),
                    Int8Route::FusedInt8 => assert!(
                        name == "int8"
                            && m < fused_end_on(
                                IntTier::for_path(nibble_quant::cpu::kernel_path()),
                                "int8"
                            ),
                        "{name} m {m}"
                    ),
                }
                let wd = f.to_f32();
                let q = quantize_x(&x, m, i, layout.unit).unwrap();
                for b in 0..m {
                    let xb = &x[b * i..(b + 1) * i];
                    for r in 0..o {
                        let (mut want, mut bound, mut mag) = (0.0f64, 0.0f64, 0.0f64);
                        for k in 0..i {
                            let wk = f64::from(wd.data()[r * i + k]);
                            let sx = f64::from(q.sx[b * (q.kpad / GROUP) + k / GROUP]);
                            let xk = sx * f64::from(q.xq[b * q.kpad + k]);
                            // (NF4's table moves its weights: checked by the bound only.)
                            let w8 = wk;
                            want += w8 * xk;
                            mag += (w8 * xk).abs() + (wk * f64::from(xb[k])).abs();
                            let amax = 127.0 * sx;
                            bound += wk.abs() * amax / 254.0;
                            if name.starts_with("nf4") {
                                // |level − level8/127| <= 1/254 of the block's absmax,
                                // bounded here by the row's largest |w'|.
                                let wmax = wd.data()[r * i..(r + 1) * i]
                                    .iter()
                                    .fold(0.0f32, |a, v| a.max(v.abs()));
                                bound += (f64::from(xb[k]).abs() + amax / 254.0) * f64::from(wmax)
                                    / 254.0;
                            }
                        }
                        let f32y = f64::from(exact[b * o + r]);
                        let mut checked = vec![f64::from(y[b * o + r])];
                        if matches!(
                            route,
                            Int8Route::FusedQ4
                                | Int8Route::FusedNf4
                                | Int8Route::FusedLower
                                | Int8Route::FusedInt8
                        ) {
                            checked.push(f64::from(via[b * o + r]));
                        }
                        for got in checked {
                            let err = (got - f32y).abs();
                            assert!(
                                err <= bound * 1.001 + 1e-5 * mag + 1e-6,
                                "{name} {o}x{i} m {m} ({b},{r}): int8 {got} f32 {f32y} err {err} bound {bound}"
                            );
                            if !name.starts_with("nf4") {
                                assert!(
                                    (got - want).abs() <= 1e-5 * mag + 1e-6,
                                    "{name} {o}x{i} m {m} ({b},{r}): {got} vs integer formula {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The NF4 level and 4-bit unpacking (AVX2 where the CPU has it) give the scalar reference's bytes at
/// every start and length.
#[test]
fn nf4_level_unpack_matches_the_reference() {
    let packed = bytes(300, 9);
    for first in [0usize, 1, 2, 64, 97] {
        for len in [0usize, 1, 31, 32, 33, 64, 100, 500] {
            let mut a = vec![0xAAu8; len];
            let mut b = vec![0x55u8; len];
            nibble_quant::act8::unpack_nf4_levels_i8(&packed, first, &mut a);
            nibble_quant::act8::unpack_nf4_levels_i8_ref(&packed, first, &mut b);
            assert_eq!(a, b, "first {first} len {len}");
        }
    }
    for len in [0usize, 1, 31, 32, 33, 64, 100, 500, 599] {
        let mut a = vec![0xAAu8; len];
        let mut b = vec![0x55u8; len];
        nibble_quant::act8::unpack_nibbles_low_first(&packed, &mut a);
        nibble_quant::act8::unpack_nibbles_low_first_ref(&packed, &mut b);
        assert_eq!(a, b, "low first, len {len}");
    }
}

/// NF4's int8 table is within 1/254 of every level.
#[test]
fn nf4_int8_table_error() {
    for (l, q) in NF4_LEVELS.iter().zip(NF4_LEVELS_I8) {
        assert!(
            (l - f32::from(q) / 127.0).abs() <= 1.0 / 254.0 + 1e-7,
            "{l} {q}"
        );
    }
    assert_eq!(NF4_LEVELS_I8[0], -127);
    assert_eq!(NF4_LEVELS_I8[15], 127);
    assert_eq!(NF4_LEVELS_I8[7], 0);
}

/// The int8 forward gives the same bits on 1, 2 and 3 threads (GEMV and GEMM sizes), on the
/// tier of the kernel path and on every tier of [`tiers`].
#[test]
fn forward_bits_independent_of_threads() {
    let mut all = vec![IntTier::for_path(nibble_quant::cpu::kernel_path())];
    all.extend(tiers());
    for tier in all {
        forward_bits_independent_of_threads_on(tier);
    }
}

fn forward_bits_independent_of_threads_on(tier: IntTier) {
    common::same_bits_on_threads(&format!("{tier:?}"), &[2, 3], || {
        let mut out = Vec::new();
        for (_, f) in formats(130, 320, 5) {
            for m in [1usize, 4, 20] {
                let x = Tensor::randn(&[m, 320], &mut Rng::new(m as u64)).into_vec();
                let mut y = vec![f32::NAN; m * 130];
                if forward(tier, f.as_int(), &x, m, &mut y, false) {
                    out.push(y);
                }
            }
        }
        out
    });
}

/// A NaN in x is not lost in the int8 rounding: the f32 path runs and it reaches the outputs.
#[test]
fn nonfinite_x_takes_the_f32_path() {
    for (name, f) in formats(9, 128, 3) {
        let mut x = vec![0.5f32; 2 * 128];
        x[77] = f32::NAN;
        let mut y = vec![0.0f32; 2 * 9];
        assert!(!forward(IntTier::Scalar, f.as_int(), &x, 2, &mut y, false));
        with_activations(ActivationMode::Int8, || f.matmul_t(&x, 2, &mut y, false)).unwrap();
        assert!(y[..9].iter().all(|v| v.is_nan()), "{name}");
    }
}

/// A NaN or an infinity anywhere in x, in a dot-product batch or a GEMM batch, on every tier:
/// `forward` declines and leaves y as it was.
#[test]
fn nonfinite_x_anywhere_is_declined_on_every_tier() {
    let (o, i) = (9, 200);
    for (name, f) in formats(o, i, 4) {
        for tier in tiers() {
            for m in [1, 2, 16, 33] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    for at in [0, m * i / 2, m * i - 1] {
                        let mut x = vec![0.25f32; m * i];
                        x[at] = bad;
                        let mut y = vec![7.0f32; m * o];
                        assert!(
                            !forward(tier, f.as_int(), &x, m, &mut y, false),
                            "{name} {tier:?} m {m} {bad} at {at}"
                        );
                        assert!(y.iter().all(|&v| v == 7.0), "{name} {tier:?} m {m}");
                    }
                }
            }
        }
    }
}

/// `quantize_x` as the module docs define it, on awkward lengths: per group of 128, `sx =
/// amax / 127` and `xq = round_half_even(x · (127 / amax))` clamped to ±127, zeros past the
/// vector and for an all-zero group, `qsum` the unit sums; halves, extremes and zero rows
/// included.
#[test]
fn quantize_x_matches_its_definition() {
    let mut rng = Rng::new(11);
    for inn in [1, 7, 15, 17, 31, 33, 63, 129, 1023] {
        for unit in [16, 64, 128] {
            let m = 3;
            let mut x = Tensor::randn(&[m, inn], &mut rng).data().to_vec();
            // Row 1: all zero. Row 2: in each group of 128 an amax of 127, so the scale is
            // 1, and halves (k − 126.5) to round to even, from −126.5 to 0.5.
            x[inn..2 * inn].fill(0.0);
            for (k, v) in x[2 * inn..].iter_mut().enumerate() {
                *v = if k % GROUP == 0 {
                    -127.0
                } else {
                    (k % GROUP) as f32 - 127.5
                };
            }
            let q = quantize_x(&x, m, inn, unit).unwrap();
            let kpad = inn.next_multiple_of(GROUP);
            assert_eq!(q.kpad, kpad);
            for r in 0..m {
                let row = &x[r * inn..(r + 1) * inn];
                for g in 0..kpad / GROUP {
                    let grp = &row[(g * GROUP).min(inn)..((g + 1) * GROUP).min(inn)];
                    let amax = grp.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    assert_eq!(q.sx[r * (kpad / GROUP) + g], amax / 127.0, "{inn} {r} {g}");
                    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                    for k in g * GROUP..(g + 1) * GROUP {
                        let want = if k < inn {
                            (row[k] * inv).clamp(-127.0, 127.0).round_ties_even() as i8
                        } else {
                            0
                        };
                        assert_eq!(q.xq[r * kpad + k], want, "inn {inn} row {r} col {k}");
                    }
                }
                for u in 0..kpad / unit {
                    let s: i32 = q.xq[r * kpad + u * unit..r * kpad + (u + 1) * unit]
                        .iter()
                        .map(|&v| i32::from(v))
                        .sum();
                    assert_eq!(q.qsum[r * (kpad / unit) + u], s);
                }
            }
        }
    }
}

/// The requantized transpose is what its docs say: per row k of Wᵀ and unit of 64 of its
/// columns, the scale is the unit's absmax / 127 and every weight moves by at most half of it.
#[test]
fn transposed_int8_matches_its_definition() {
    for &(o, i) in &[
        (1usize, 1usize),
        (7, 3),
        (63, 17),
        (64, 1),
        (65, 33),
        (129, 7),
        (200, 70),
    ] {
        let w = Tensor::randn(&[o, i], &mut Rng::new((o * 7 + i) as u64)).into_vec();
        let mut w = w;
        if o > 64 {
            // A unit that is all zero in column 0.
            for n in 0..64 {
                w[n * i] = 0.0;
            }
        }
        let t = TransposedInt8::from_f32(&w, o, i).unwrap();
        assert_eq!(t.int_dims(), (i, o));
        let back = t.to_f32();
        let units = o.div_ceil(BACKWARD_UNIT);
        let mut scale = vec![0.0f32; units];
        let mut offset = vec![1.0f32; units];
        for k in 0..i {
            t.int_affine(k, &mut scale, &mut offset);
            assert!(offset.iter().all(|&z| z == 0.0));
            for u in 0..units {
                let ns = u * BACKWARD_UNIT..o.min((u + 1) * BACKWARD_UNIT);
                let amax = ns
                    .clone()
                    .map(|n| w[n * i + k].abs())
                    .fold(0.0f32, f32::max);
                assert_eq!(scale[u], amax / 127.0, "{o}x{i} k {k} u {u}");
                for n in ns {
                    let err = (back[k * o + n] - w[n * i + k]).abs();
                    assert!(err <= scale[u] * 0.5 * (1.0 + 1e-6), "{o}x{i} ({n},{k})");
                }
            }
        }
    }
    assert!(TransposedInt8::from_f32(&[1.0, f32::NAN], 1, 2).is_none());
    assert!(TransposedInt8::from_f32(&[1.0], 1, 2).is_none());
}

/// Every format's integer input gradient `dX = dY · W` on awkward shapes and batches:
/// bit-identical on every tier and equal to the integer GEMM over the requantized transpose
/// of the dequantized W, within the documented bound of the f32 path, NaN-prefilled outputs
/// fully written, `accumulate` adding, and `matmul` under int8 activations following
/// [`backward_route`] (the integer bits where routed, the f32 path's elsewhere).
#[test]
fn backward_int8_every_format_every_tier() {
    let tiers = tiers();
    let here = IntTier::for_path(nibble_quant::cpu::kernel_path());
    for &o in &[1usize, 7, 17, 63, 65, 129, 200] {
        for &(i, m) in &[(1usize, 3usize), (7, 1), (33, 20), (129, 9), (64, 48)] {
            for (name, f) in formats(o, i, (o * 13 + i) as u64) {
                let mut dy = Tensor::randn(&[m, o], &mut Rng::new((o + m) as u64)).into_vec();
                if m > 1 {
                    dy[o..2 * o].fill(0.0); // an all-zero row of dY
                }
                let runs: Vec<Vec<f32>> = tiers
                    .iter()
                    .map(|&t| {
                        let mut dx = vec![f32::NAN; m * i];
                        assert!(f.input_grad_int8(t, &dy, m, &mut dx, false), "{name} {t:?}");
                        dx
                    })
                    .collect();
                let bits_eq =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                for (t, dx) in tiers.iter().zip(&runs) {
                    assert!(
                        bits_eq(dx, &runs[0]),
                        "{name} {o}x{i} m {m}: tier {t:?} differs from {:?}",
                        tiers[0]
                    );
                }
                let dx = &runs[0];
                let wd = f.to_f32().into_vec();
                let wt = TransposedInt8::from_f32(&wd, o, i).unwrap();
                let mut via_forward = vec![f32::NAN; m * i];
                assert!(forward(tiers[0], &wt, &dy, m, &mut via_forward, false));
                assert!(
                    bits_eq(dx, &via_forward),
                    "{name} {o}x{i} m {m}: forward on Wᵀ"
                );
                let mut acc = vec![1.0f32; m * i];
                assert!(f.input_grad_int8(tiers[0], &dy, m, &mut acc, true));
                assert!(
                    acc.iter().zip(dx).all(|(a, b)| *a == 1.0 + b),
                    "{name} accumulate"
                );
                let mut exact = vec![f32::NAN; m * i];
                f.matmul(&dy, m, &mut exact, false).unwrap();
                let mut via = vec![f32::NAN; m * i];
                with_activations(ActivationMode::Int8, || f.matmul(&dy, m, &mut via, false))
                    .unwrap();
                if backward_route(here, m) {
                    assert!(bits_eq(dx, &via), "{name} m {m}: routed matmul");
                } else {
                    assert!(bits_eq(&exact, &via), "{name} m {m}: f32 route");
                }
                let q = quantize_x(&dy, m, o, BACKWARD_UNIT).unwrap();
                let groups = q.kpad / GROUP;
                for b in 0..m {
                    for k in 0..i {
                        let (mut bound, mut mag) = (0.0f64, 0.0f64);
                        for n in 0..o {
                            let wnk = f64::from(wd[n * i + k]);
                            let d = f64::from(dy[b * o + n]);
                            let a_g = 127.0 * f64::from(q.sx[b * groups + n / GROUP]);
                            let u = n / BACKWARD_UNIT;
                            let a_u = (u * BACKWARD_UNIT..o.min((u + 1) * BACKWARD_UNIT))
                                .map(|r| f64::from(wd[r * i + k]).abs())
                                .fold(0.0f64, f64::max);
                            bound +=
                                wnk.abs() * a_g / 254.0 + (d.abs() + a_g / 254.0) * a_u / 254.0;
                            mag += (wnk * d).abs() + a_u * (d.abs() + a_g);
                        }
                        let got = f64::from(dx[b * i + k]);
                        let want = f64::from(exact[b * i + k]);
                        assert!(
                            (got - want).abs() <= bound * 1.001 + 1e-5 * mag + 1e-6,
                            "{name} {o}x{i} m {m} ({b},{k}): int8 {got} f32 {want} bound {bound}"
                        );
                    }
                }
            }
        }
    }
}

/// The integer input gradient gives the same bits on 1, 2, 3 and 16 threads on every tier,
/// and declines a NaN or an infinity in dY (dX untouched; `matmul` under int8 then runs the
/// f32 path, which carries the NaN).
#[test]
fn backward_int8_bits_independent_of_threads_and_nonfinite_declined() {
    let mut all = vec![IntTier::for_path(nibble_quant::cpu::kernel_path())];
    all.extend(tiers());
    let (o, i) = (150usize, 200usize);
    for tier in all {
        common::same_bits_on_threads(&format!("{tier:?} backward"), &[2, 3, 16], || {
            let mut out = Vec::new();
            for (_, f) in formats(o, i, 8) {
                for m in [1usize, 9, 50] {
                    let dy = Tensor::randn(&[m, o], &mut Rng::new(m as u64)).into_vec();
                    let mut dx = vec![f32::NAN; m * i];
                    assert!(f.input_grad_int8(tier, &dy, m, &mut dx, false));
                    out.push(dx);
                }
            }
            out
        });
        for (name, f) in formats(o, i, 9) {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, 50 * o / 2, 50 * o - 1] {
                    let mut dy = vec![0.25f32; 50 * o];
                    dy[at] = bad;
                    let mut dx = vec![7.0f32; 50 * i];
                    assert!(!f.input_grad_int8(tier, &dy, 50, &mut dx, false), "{name}");
                    assert!(dx.iter().all(|&v| v == 7.0), "{name} {tier:?}: dx touched");
                }
            }
            let mut dy = vec![0.25f32; 50 * o];
            dy[3] = f32::NAN;
            let mut dx = vec![0.0f32; 50 * i];
            with_activations(ActivationMode::Int8, || f.matmul(&dy, 50, &mut dx, false)).unwrap();
            assert!(dx[..i].iter().all(|v| v.is_nan()), "{name}: NaN lost");
        }
    }
}

/// Where int8 mode takes a batch of NF4, int8 or lower through the format's fused GEMV (below
/// `fused_end_on` the tier), the batch gives what its vectors give one at a time
/// (batch 1, the same route), bit for bit, at 1 and 3 threads, outputs pre-filled with NaN; from
/// there on the route is the f32 path's or the integer GEMM's (the int8 format's batches run its
/// batch kernel, every vector per row in one pass). Prints the tiers the CPU lacks.
#[test]
fn fused_small_batches_give_their_vectors_bits() {
    // (A width of 200 ends in a partial group of 128, NF4 then taking its f32 path; 320 in a
    // partial group and an odd NF4 block.)
    for (o, i) in [(70, 256), (33, 200), (17, 320)] {
        fused_small_batches_at(o, i);
    }
}

fn fused_small_batches_at(o: usize, i: usize) {
    let tier = IntTier::for_path(nibble_quant::cpu::kernel_path());
    for name in ["nf4", "int8", "lower"] {
        if !fused_on_tier(name, tier) {
            println!("fused small batches: tier {tier:?} has no fused {name} GEMV: its f32 or GEMM routes only");
        }
    }
    let w = Tensor::randn(&[o, i], &mut Rng::new(41));
    let mats: [(&str, Box<dyn WeightMatrix>); 4] = [
        ("nf4", Box::new(Nf4Matrix::quantize(&w).unwrap())),
        ("nf4", Box::new(Nf4Matrix::quantize_double(&w).unwrap())),
        ("int8", Box::new(Int8Matrix::quantize(&w).unwrap())),
        ("lower", Box::new(LowerMatrix::quantize(&w).unwrap())),
    ];
    for (name, f) in &mats {
        let fused = match *name {
            "nf4" => Int8Route::FusedNf4,
            "int8" => Int8Route::FusedInt8,
            _ => Int8Route::FusedLower,
        };
        for m in [1usize, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 17, 23, 24, 47, 48] {
            let route = int8_route(name, m);
            let expect_fused = m < fused_end_on(tier, name) && fused_on_tier(name, tier);
            assert_eq!(route == fused, expect_fused, "{name} m {m}: {route:?}");
            // (NF4's fused GEMV takes whole blocks of 64 in a row only; otherwise its f32 path
            // runs, whose batches are tiles with their own order of sums.)
            if !expect_fused || (name.starts_with("nf4") && !i.is_multiple_of(64)) {
                continue;
            }
            let mut x = Tensor::randn(&[m, i], &mut Rng::new(m as u64)).into_vec();
            if m > 2 {
                x[2 * i..3 * i].fill(0.0); // an all-zero vector
            }
            let mut one_by_one = vec![f32::NAN; m * o];
            for (xb, yb) in x.chunks(i).zip(one_by_one.chunks_mut(o)) {
                with_activations(ActivationMode::Int8, || f.matmul_t(xb, 1, yb, false)).unwrap();
            }
            assert_batch_gives(&**f, &x, m, &one_by_one, &format!("{name} m {m}"));
        }
    }
}

/// Where int8 mode takes a Q4 batch through the fused GEMV (below `q4_fused_end`: 16 on AVX2,
/// 48 where the tier's integer GEMM starts at 48; on AVX-512 VNNI chunks of up to 8 vectors in
/// one pass over each tile of rows), the batch gives what its vectors give one at a time
/// (`Q4Matrix::gemv_int8`), bit for bit, at 1 and 3 threads; from there on the route is the
/// integer GEMM's.
#[test]
fn q4_fused_batches_give_their_vectors_bits() {
    let tier = IntTier::for_path(nibble_quant::cpu::kernel_path());
    let end = q4_fused_end(tier);
    println!("q4 fused batches on {tier:?}: below {end}");
    // Whole tiles of 16 rows and a ragged rest (the batch kernel's tiles and the row kernel's
    // rows), a partial last group of 128 (272), and a task of 64 rows with no whole tile (70).
    for (o, i) in [(40, 256), (70, 272), (17, 128)] {
        let q = Q4Matrix::quantize(&Tensor::randn(&[o, i], &mut Rng::new(31))).unwrap();
        for m in [2usize, 3, 8, 9, 15, 16, 33, 47, 48] {
            let route = int8_route("q4", m);
            assert_eq!(route == Int8Route::FusedQ4, m < end, "m {m}: {route:?}");
            if m >= end {
                continue;
            }
            let mut x = Tensor::randn(&[m, i], &mut Rng::new(m as u64)).into_vec();
            x[i..2 * i].fill(0.0); // an all-zero vector
            let mut one_by_one = vec![f32::NAN; m * o];
            for (xb, yb) in x.chunks(i).zip(one_by_one.chunks_mut(o)) {
                q.gemv_int8(xb, yb, false).unwrap();
            }
            assert_batch_gives(&q, &x, m, &one_by_one, &format!("q4 {o}x{i} m {m}"));
        }
    }
}

/// `f.matmul_t` of the `m` vectors of `x` in one batch under int8 mode, on 1 and 3 threads into
/// NaN-filled outputs, gives `want` bit for bit.
fn assert_batch_gives(f: &dyn WeightMatrix, x: &[f32], m: usize, want: &[f32], what: &str) {
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut batch = vec![f32::NAN; want.len()];
        pool.install(|| {
            with_activations(ActivationMode::Int8, || f.matmul_t(x, m, &mut batch, false))
        })
        .unwrap();
        assert!(
            batch
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}, {threads} threads: the batch differs from its vectors"
        );
    }
}

/// A batch size whose products with the widths wrap (`m = 2^63 + 3`: `m · 256` and `m · 2`
/// equal the lengths given) is a shape that does not fit, on every tier: `forward` returns
/// `false` with `y` untouched (the wrapping check passed, and the kernels panicked reading
/// past x, or panicked across 2^60 tiles for minutes).
#[test]
fn a_batch_whose_products_wrap_is_refused() {
    let w = Q4Matrix::quantize(&Tensor::randn(&[2, 256], &mut Rng::new(0))).unwrap();
    let m = (1usize << 63) + 3;
    let x = vec![0.5f32; m.wrapping_mul(256)];
    for tier in IntTier::available() {
        let mut y = vec![f32::NAN; m.wrapping_mul(2)];
        assert!(!forward(tier, &w, &x, m, &mut y, false), "{tier:?}");
        assert!(y.iter().all(|v| v.is_nan()), "{tier:?} wrote y");
    }
}
