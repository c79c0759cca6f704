//! Values a format cannot hold: overflowing rows and groups when quantizing, non-finite or
//! negative scales handed to `from_parts`, a bad bit budget, a bad activation unit. Each is an
//! error naming the row, column, group or index, never a panic or a NaN weight.

use half::f16;
use nibble_quant::act8::quantize_x;
use nibble_quant::{Bytes, Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix, QuantError};
use nibble_tensor::Tensor;

/// `rows x 256`, 0.5 everywhere but the first elements of row `row` (`head`).
fn weight(rows: usize, row: usize, head: &[f32]) -> Tensor {
    let mut v = vec![0.5f32; rows * 256];
    v[row * 256..row * 256 + head.len()].copy_from_slice(head);
    Tensor::from_vec(&[rows, 256], v).unwrap()
}

#[test]
fn int8_row_whose_range_overflows_f32_is_an_error() {
    let e = Int8Matrix::quantize(&weight(2, 1, &[0.5, -3e38, 3e38])).unwrap_err();
    match e {
        QuantError::Overflow {
            row,
            col,
            value,
            storage,
            ..
        } => {
            assert_eq!((row, col, value, storage), (1, 0, -3e38, "f32"))
        }
        other => panic!("{other}"),
    }
    // A wide but representable range is fine.
    let q = Int8Matrix::quantize(&weight(2, 0, &[-1e38, 1e38])).unwrap();
    assert!(q
        .dequantize_with(nibble_quant::KernelPath::Scalar)
        .data()
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn lower_group_whose_min_or_scale_overflows_f16_is_an_error() {
    let e = LowerMatrix::quantize(&weight(1, 0, &[1e6, -1e6])).unwrap_err();
    match &e {
        QuantError::Overflow {
            row: 0,
            col: 0,
            value,
            storage: "f16",
            what,
            ..
        } => {
            assert_eq!(*value, 1e6);
            assert!(what.contains("group 0"), "{what}");
        }
        other => panic!("{other}"),
    }
    // Second group of row 1.
    let mut w = weight(2, 0, &[]);
    w.data_mut()[256 + 130] = -1e5;
    match LowerMatrix::quantize(&w).unwrap_err() {
        QuantError::Overflow {
            row: 1,
            col: 128,
            what,
            ..
        } => assert!(
            what.contains("group 1") && what.contains("column 130"),
            "{what}"
        ),
        other => panic!("{other}"),
    }
}

/// Double-quantized NF4 of weights near f32's limit beside ordinary ones: the absmaxes'
/// offset and group scales must decode to finite values for every block, else an error naming
/// the block (an infinite decoded absmax reached the file); every decoded absmax of what is
/// accepted is finite.
#[test]
fn nf4_double_quantization_never_stores_an_infinite_absmax() {
    for (rows, big) in [
        (1usize, 3.4e38f32),
        (4, 3.4e38),
        (4, 1e38),
        (64, 3.4e38),
        (4, -3.4e38),
        (2, f32::MAX),
        (4, -f32::MAX),
        (64, f32::MAX),
    ] {
        let w = weight(rows, 0, &[big]);
        match Nf4Matrix::quantize_double(&w) {
            Ok(m) => {
                let d = m.dequantize_with(nibble_quant::KernelPath::Scalar);
                assert!(
                    d.data().iter().all(|v| v.is_finite()),
                    "{rows} rows, {big}: a non-finite weight decoded"
                );
            }
            Err(QuantError::Overflow { row, col, what, .. }) => {
                assert!(what.contains("double quantization"), "{what}");
                assert!(row < rows && col < 256, "({row}, {col})");
            }
            Err(other) => panic!("{rows} rows, {big}: {other}"),
        }
    }
    // Three of eight blocks at f32's largest value: the offset and group scale are finite,
    // but the three blocks' absmax decodes as `1.0 · scale + offset` = inf (it reached the
    // file, and every weight of those blocks decoded as inf or NaN).
    let mut v = vec![0.5f32; 512];
    for b in [0, 3, 6] {
        v[b * 64] = f32::MAX;
    }
    let w = Tensor::from_vec(&[2, 256], v).unwrap();
    match Nf4Matrix::quantize_double(&w) {
        Err(QuantError::Overflow { row, col, what, .. }) => {
            assert_eq!((row, col), (0, 0));
            assert!(what.contains("decodes as inf"), "{what}");
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("three blocks at f32::MAX quantized, their absmax decoding as inf"),
    }
    assert!(Nf4Matrix::quantize(&w).is_ok(), "plain nf4 holds it");
}

#[test]
fn lower_budget_must_be_at_least_three_bits() {
    let w = weight(2, 0, &[]);
    for bits in [f64::NAN, 2.9, 0.0, -1.0] {
        assert!(
            matches!(
                LowerMatrix::quantize_bits(&w, bits),
                Err(QuantError::Shape { .. })
            ),
            "{bits}"
        );
    }
    assert_eq!(LowerMatrix::quantize_bits(&w, 3.0).unwrap().rows_4bit(), 0);
}

fn f32_bytes(v: &[f32]) -> Bytes {
    Bytes::from_f32(v.to_vec())
}

fn f16_bytes(v: &[f32]) -> Bytes {
    Bytes::from_f16(v.iter().map(|&x| f16::from_f32(x)).collect())
}

fn part_value(r: Result<impl std::fmt::Debug, QuantError>, part: &str, index: usize) {
    match r {
        Err(QuantError::PartValue {
            part: p, index: i, ..
        }) => assert_eq!((p, i), (part, index)),
        other => panic!("{part}: {other:?}"),
    }
}

#[test]
fn from_parts_refuses_non_finite_or_negative_scales() {
    let codes = || Bytes::from_vec(vec![0u8; 2 * 16]);
    assert!(Int8Matrix::from_parts(
        2,
        16,
        codes(),
        f32_bytes(&[0.1, 0.0]),
        f32_bytes(&[-1.0, 0.0])
    )
    .is_ok());
    for (scales, zeros, part, index) in [
        ([0.1, f32::NAN], [0.0, 0.0], "scales", 1),
        ([f32::NEG_INFINITY, 0.1], [0.0, 0.0], "scales", 0),
        ([0.1, 0.1], [0.0, f32::INFINITY], "zeros", 1),
        // Finite, but code 255 of row 1 would be 255 · 1e38: an infinite weight.
        ([0.1, 1e38], [0.0, 0.0], "scales", 1),
        ([0.1, 1e37], [0.0, 3.3e38], "scales", 1),
    ] {
        part_value(
            Int8Matrix::from_parts(2, 16, codes(), f32_bytes(&scales), f32_bytes(&zeros)),
            part,
            index,
        );
    }

    let packed = || Bytes::from_vec(vec![0u8; 2 * 8]);
    assert!(Q4Matrix::from_parts(2, 16, packed(), f16_bytes(&[1.0, 0.0])).is_ok());
    part_value(
        Q4Matrix::from_parts(2, 16, packed(), f16_bytes(&[1.0, -2.0])),
        "norm",
        1,
    );
    part_value(
        Q4Matrix::from_parts(2, 16, packed(), f16_bytes(&[f32::NAN, 1.0])),
        "norm",
        0,
    );

    let packed = || Bytes::from_vec(vec![0u8; 64]);
    assert!(Nf4Matrix::from_parts(2, 64, packed(), f32_bytes(&[1.0, 2.0])).is_ok());
    part_value(
        Nf4Matrix::from_parts(2, 64, packed(), f32_bytes(&[1.0, -2.0])),
        "absmax",
        1,
    );
    part_value(
        Nf4Matrix::from_parts(2, 64, packed(), f32_bytes(&[f32::INFINITY, 2.0])),
        "absmax",
        0,
    );
    let codes = || Bytes::from_vec(vec![0u8; 2]);
    part_value(
        Nf4Matrix::from_parts_double(
            2,
            64,
            packed(),
            codes(),
            f32_bytes(&[f32::NAN]),
            f32_bytes(&[1.0]),
        ),
        "absmax_offset",
        0,
    );
    part_value(
        Nf4Matrix::from_parts_double(
            2,
            64,
            packed(),
            codes(),
            f32_bytes(&[0.0]),
            f32_bytes(&[-1.0]),
        ),
        "absmax_scale",
        0,
    );
    // Finite offset and scale near f32's limit: block 1 (code 255, the map's 1.0) decodes as
    // inf (accepted, and every weight of it was NaN); block 0 (code 0, near -1) stays finite.
    part_value(
        Nf4Matrix::from_parts_double(
            2,
            64,
            packed(),
            Bytes::from_vec(vec![0u8, 255]),
            f32_bytes(&[f32::MAX]),
            f32_bytes(&[f32::MAX]),
        ),
        "absmax_codes",
        1,
    );

    let bits = || Bytes::from_vec(vec![4u8, 3]);
    let codes = || Bytes::from_vec(vec![0u8; 8 + 6]);
    assert!(LowerMatrix::from_parts(
        2,
        16,
        bits(),
        codes(),
        f16_bytes(&[0.1, 0.1]),
        f16_bytes(&[-1.0, 0.0])
    )
    .is_ok());
    part_value(
        LowerMatrix::from_parts(
            2,
            16,
            bits(),
            codes(),
            f16_bytes(&[0.1, f32::NAN]),
            f16_bytes(&[0.0, 0.0]),
        ),
        "scales",
        1,
    );
    part_value(
        LowerMatrix::from_parts(
            2,
            16,
            bits(),
            codes(),
            f16_bytes(&[0.1, 0.1]),
            f16_bytes(&[1e6, 0.0]),
        ),
        "mins",
        0,
    );
}

#[test]
fn quantize_x_refuses_a_bad_unit_length_or_value() {
    let x = [0.5f32, -1.0, 0.25];
    assert!(quantize_x(&x, 1, 3, 16).is_ok());
    for unit in [0, 3, 256] {
        assert!(
            matches!(quantize_x(&x, 1, 3, unit), Err(QuantError::Shape { .. })),
            "{unit}"
        );
    }
    assert!(matches!(
        quantize_x(&x, 2, 3, 16),
        Err(QuantError::Shape { .. })
    ));
    match quantize_x(&[0.5, 1.0, 2.0, f32::NAN], 2, 2, 16) {
        Err(QuantError::NonFinite { row: 1, col: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// A weight of `[2^40, 0]` holds no element (a file's header may say so in 88 bytes), but its
/// rows' statistics need terabytes: an error naming the shape, never an abort on the failed
/// allocation (int8 and lower sized them unchecked).
#[test]
fn rows_beyond_memory_are_an_error() {
    let w = Tensor::zeros(&[1 << 40, 0]);
    for (name, e) in [
        ("int8", Int8Matrix::quantize(&w).err()),
        ("lower", LowerMatrix::quantize(&w).err()),
    ] {
        match e {
            Some(QuantError::Shape { shape, what, .. }) => {
                assert_eq!(shape, vec![1 << 40, 0], "{name}");
                assert!(what.contains("GiB"), "{name}: {what}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // An ordinary empty weight is fine.
    assert!(Int8Matrix::quantize(&Tensor::zeros(&[3, 0])).is_ok());
    assert!(LowerMatrix::quantize(&Tensor::zeros(&[3, 0])).is_ok());
}
