//! The SIMD quantizations of x (`avx2::quantize_groups`, `avx512vnni::quantize_groups`, each
//! through `quantize_row_simd`) against the portable one.

use super::QuantizeGroups;

/// The AVX2 and AVX-512 quantizations against the portable one: the same bytes, scales, unit
/// sums and finiteness, on awkward lengths, every unit and both byte layouts, with zero groups,
/// ±extremes, exact ties of the rounding, and NaN or infinities placed in whole and partial
/// groups. A tier the CPU lacks is reported as skipped.
#[test]
fn simd_quantize_row_matches_the_portable_code() {
    #[cfg(target_arch = "x86_64")]
    {
        let tiers: [(&str, bool, QuantizeGroups); 2] = [
            (
                "avx2",
                crate::cpu::has_avx2_fma_f16c(),
                super::avx2::quantize_groups,
            ),
            (
                "avx512",
                super::has_avx512vnni(),
                super::avx512vnni::quantize_groups,
            ),
        ];
        for (name, present, f) in tiers {
            if present {
                matches_the_portable_code(f);
                println!("act8 quantize_row: {name} checked");
            } else {
                println!("act8 quantize_row: skipping {name} (this CPU lacks it)");
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("act8 quantize_row: skipping avx2 and avx512 (not x86-64)");
}

/// Rows quantized with `groups` against the portable quantization (see the test above).
#[cfg(target_arch = "x86_64")]
fn matches_the_portable_code(groups: QuantizeGroups) {
    let mut rng = nibble_tensor::Rng::new(7);
    for len in [
        1usize, 7, 15, 17, 31, 33, 63, 127, 128, 129, 255, 256, 1023, 1024,
    ] {
        let base = nibble_tensor::Tensor::randn(&[len], &mut rng).into_vec();
        let mut cases = vec![base.clone()];
        // A zero group, one at ±extremes, exact ties (x · 127 / amax = k + 0.5).
        let mut special = base.clone();
        for (k, v) in special.iter_mut().enumerate() {
            *v = match (k / 128) % 3 {
                0 => 0.0,
                1 => {
                    if k % 2 == 0 {
                        3.0
                    } else {
                        -3.0
                    }
                }
                _ => (k % 9) as f32 * 0.5 - 2.0,
            };
        }
        if len > 2 * 128 {
            special[2 * 128] = 127.0;
        }
        cases.push(special);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, len / 2, len - 1] {
                let mut c = base.clone();
                c[at] = bad;
                cases.push(c);
            }
        }
        let kpad = len.next_multiple_of(super::GROUP);
        for unit in [16usize, 64, 128] {
            for flip in [0u8, 0x80] {
                for x in &cases {
                    let run = |simd: bool| {
                        let mut xq = vec![99i8; kpad];
                        let mut sx = vec![f32::NAN; kpad / 128];
                        let mut qs = vec![-99i32; kpad / unit];
                        let ok = if simd {
                            // SAFETY: the caller checked the tier's CPU features; lengths
                            // as quantize_x_into's.
                            unsafe {
                                super::quantize_row_simd(
                                    groups, x, &mut xq, &mut sx, &mut qs, unit, flip,
                                )
                            }
                        } else {
                            super::quantize_row(x, &mut xq, &mut sx, &mut qs, unit, flip)
                        };
                        (
                            ok,
                            xq,
                            sx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            qs,
                        )
                    };
                    let (want, got) = (run(false), run(true));
                    assert_eq!(got.0, want.0, "finiteness, len {len} unit {unit}");
                    if want.0 {
                        assert_eq!(got, want, "len {len} unit {unit} flip {flip}");
                    }
                }
            }
        }
    }
}
