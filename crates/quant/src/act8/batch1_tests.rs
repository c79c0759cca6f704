//! [`super::Batch1Int8`] (batch 1 on the dot-product driver by ranges of rows, for the
//! batch-1 team) against [`super::forward`] at `m = 1`: the same bits for every format, tier,
//! awkward shape and split of the rows, with and without accumulation; declined alike.

use super::{forward, Batch1Int8, IntTier};
use crate::kernels::QuantRows;
use crate::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{Rng, Tensor};

/// Every tier this CPU runs, and the emulations it can run; the tiers it lacks are printed.
/// (The integration tests' `common::int_tiers` does the same; a unit test cannot reach it.)
fn tiers() -> Vec<IntTier> {
    let mut t = IntTier::available();
    for want in [
        IntTier::Avx2,
        IntTier::AvxVnni,
        IntTier::Avx512Vnni,
        IntTier::Amx,
    ] {
        if !t.contains(&want) {
            println!(
                "act8 batch1 rows: skipping tier {want:?} (this CPU lacks it, or it is turned off)"
            );
        }
    }
    for emulated in [IntTier::AvxVnniEmulated, IntTier::AmxEmulated] {
        if emulated.supported() == emulated {
            t.push(emulated);
        } else {
            println!(
                "act8 batch1 rows: skipping tier {emulated:?} (this CPU cannot run its emulation)"
            );
        }
    }
    t
}

/// Calls `check` with each format's integer view of a random `o x i` matrix.
fn each_format(o: usize, i: usize, seed: u64, mut check: impl FnMut(&str, &dyn super::IntCodes)) {
    let w = Tensor::uniform(&[o, i], -0.5, 0.5, &mut Rng::new(seed));
    let q4 = Q4Matrix::quantize(&w).unwrap();
    let nf4 = Nf4Matrix::quantize(&w).unwrap();
    let nf4_dq = Nf4Matrix::quantize_double(&w).unwrap();
    let lower = LowerMatrix::quantize(&w).unwrap();
    let int8 = Int8Matrix::quantize(&w).unwrap();
    let views: [(&str, Option<&dyn super::IntCodes>); 5] = [
        ("q4", q4.act8_view()),
        ("nf4", nf4.act8_view()),
        ("nf4_dq", nf4_dq.act8_view()),
        ("lower", lower.act8_view()),
        ("int8", int8.act8_view()),
    ];
    for (name, view) in views {
        check(name, view.expect("every format has an integer view"));
    }
}

#[test]
fn batch1_rows_give_the_drivers_bits() {
    let tiers = tiers();
    for &i in &[1usize, 7, 17, 33, 64, 129, 192, 1023, 1024] {
        for &o in &[1usize, 7, 17, 33] {
            each_format(o, i, (o * 131 + i) as u64, |name, w| {
                let x = Tensor::randn(&[i], &mut Rng::new(i as u64 + 7)).into_vec();
                let base: Vec<f32> = (0..o).map(|r| r as f32 * 0.25 - 1.0).collect();
                for &tier in &tiers {
                    let mut want = vec![f32::NAN; o];
                    let ran = forward(tier, w, &x, 1, &mut want, false);
                    let b = Batch1Int8::new(tier, w, &x);
                    assert_eq!(
                        b.is_some(),
                        ran,
                        "{name} {o}x{i} {tier:?}: declined differently"
                    );
                    let Some(b) = b else { continue };
                    let mut want_acc = base.clone();
                    assert!(forward(tier, w, &x, 1, &mut want_acc, true));
                    // The rows whole, and split at awkward points.
                    for cut in [0, 1, o / 2, o.saturating_sub(1), o] {
                        let mut got = vec![f32::NAN; o];
                        let (lo, hi) = got.split_at_mut(cut);
                        b.rows(0..cut, lo, false);
                        b.rows(cut..o, hi, false);
                        let mut got_acc = base.clone();
                        let (lo, hi) = got_acc.split_at_mut(cut);
                        b.rows(0..cut, lo, true);
                        b.rows(cut..o, hi, true);
                        for (g, w) in [(&got, &want), (&got_acc, &want_acc)] {
                            assert!(
                                g.iter()
                                    .zip(w.iter())
                                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{name} {o}x{i} {tier:?} cut {cut}: {g:?} against {w:?}"
                            );
                        }
                    }
                }
            });
        }
    }
}

#[test]
fn batch1_rows_decline_what_the_driver_declines() {
    each_format(5, 128, 3, |name, w| {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.5f32; 128];
            x[77] = bad;
            for tier in tiers() {
                assert!(
                    Batch1Int8::new(tier, w, &x).is_none(),
                    "{name} {tier:?}: x holds {bad}"
                );
            }
        }
        // A wrong length of x.
        assert!(
            Batch1Int8::new(IntTier::Scalar, w, &[0.5; 127]).is_none(),
            "{name}"
        );
    });
}

/// A NaN or infinity anywhere in x: the fused batch-1 GEMVs' preparations (NF4's, lower's)
/// prepare nothing, so that the f32 GEMV runs.
#[test]
fn fused_preparations_decline_nonfinite_x() {
    type Prepare = fn(&[f32], &mut Vec<f32>) -> bool;
    let prepares: [(&str, Prepare); 2] = [
        ("nf4", crate::nf4::act8::prepare),
        ("lower", crate::lower::act8::prepare),
    ];
    for (name, prepare) in prepares {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 63, 64, 127] {
                let mut x = vec![0.25f32; 128];
                x[at] = bad;
                let mut prep = Vec::new();
                assert!(!prepare(&x, &mut prep), "{name}: {bad} at {at}");
                assert!(prep.is_empty(), "{name}: {bad} at {at}");
            }
        }
    }
}
