//! Narrowing a value to a smaller float type, and converting an f32 weight to frozen storage,
//! never turns a finite value into an infinity or NaN silently: each is an error naming the
//! file or weight, the element and the value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nibble_io::{write_safetensors, Checkpoint, DType, Error, FrozenWeight, WeightFormat};
use nibble_quant::QuantError;
use nibble_tensor::Tensor;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-io-narrow-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A file with `w` (f32 `[1e5, 3e38, 1.5]`), `ok` (f32 `[inf, NaN, 2.0]`), `d` (f64
/// `[1e300, 1.0]`) and `dinf` (f64 `[-inf, 1.0]`).
fn file(tag: &str) -> Checkpoint {
    let p = tempdir(tag).join("narrow.safetensors");
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let f64s = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (w, ok) = (
        f32s(&[1e5, 3e38, 1.5]),
        f32s(&[f32::INFINITY, f32::NAN, 2.0]),
    );
    let (d, dinf) = (f64s(&[1e300, 1.0]), f64s(&[f64::NEG_INFINITY, 1.0]));
    write_safetensors(
        &p,
        &[
            ("w".into(), DType::F32, vec![3], &w[..]),
            ("ok".into(), DType::F32, vec![3], &ok[..]),
            ("d".into(), DType::F64, vec![2], &d[..]),
            ("dinf".into(), DType::F64, vec![2], &dinf[..]),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    Checkpoint::open(&p).unwrap()
}

#[test]
fn half_of_a_finite_f32_beyond_f16_is_an_error() {
    let ck = file("half");
    let e = ck.half("w", None).unwrap_err();
    match &e {
        Error::Data { key, index, .. } => assert_eq!((key.as_str(), *index), ("w", Some(0))),
        other => panic!("{other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("narrow.safetensors") && msg.contains("1e5"),
        "{msg}"
    );
    // Values already non-finite in the file pass through as they are.
    let h = ck.half("ok", None).unwrap();
    assert!(h.data()[0].is_infinite() && h.data()[1].is_nan());
    assert_eq!(h.data()[2].to_f32(), 2.0);
}

#[test]
fn tensor_f32_of_a_finite_f64_beyond_f32_is_an_error() {
    let ck = file("f32");
    let e = ck.tensor_f32("d", None).unwrap_err();
    match &e {
        Error::Data { key, index, .. } => assert_eq!((key.as_str(), *index), ("d", Some(0))),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("1e300"), "{e}");
    let t = ck.tensor_f32("dinf", None).unwrap();
    assert_eq!(t.data(), [f32::NEG_INFINITY, 1.0]);
}

/// A 2 x 256 weight, 0.5 everywhere but the first elements of row 0 (`head`).
fn weight(head: &[f32]) -> Tensor {
    let mut v = vec![0.5f32; 2 * 256];
    v[..head.len()].copy_from_slice(head);
    Tensor::from_vec(&[2, 256], v).unwrap()
}

#[test]
fn f16_storage_of_a_weight_beyond_f16_is_an_error() {
    let e = FrozenWeight::quantize(WeightFormat::F16, "fc.weight", &weight(&[0.5, 1e5]));
    match e.unwrap_err() {
        Error::Unstorable {
            key,
            row,
            col,
            value,
            source,
        } => {
            assert_eq!((key.as_str(), row, col, value), ("fc.weight", 0, 1, 1e5));
            assert!(matches!(*source, QuantError::Overflow { .. }), "{source}");
        }
        other => panic!("{other}"),
    }
    let e = FrozenWeight::quantize(WeightFormat::F16, "fc.weight", &weight(&[f32::NAN]));
    match e.unwrap_err() {
        Error::Unstorable {
            row: 0,
            col: 0,
            source,
            ..
        } => assert!(matches!(*source, QuantError::NonFinite { .. }), "{source}"),
        other => panic!("{other}"),
    }
    // In range: as before.
    assert!(FrozenWeight::quantize(WeightFormat::F16, "fc.weight", &weight(&[65504.0])).is_ok());
}

#[test]
fn int8_and_lower_storage_of_overflowing_rows_are_errors() {
    let e = FrozenWeight::quantize(WeightFormat::Int8, "fc.weight", &weight(&[-3e38, 3e38]));
    match e.unwrap_err() {
        Error::Unstorable {
            key,
            row: 0,
            col: 0,
            value,
            source,
        } => {
            assert_eq!((key.as_str(), value.abs()), ("fc.weight", 3e38));
            assert!(matches!(*source, QuantError::Overflow { .. }), "{source}");
        }
        other => panic!("{other}"),
    }
    let mut v = vec![0.5f32; 256];
    v[0] = 1e6;
    v[1] = -1e6;
    let w = Tensor::from_vec(&[1, 256], v).unwrap();
    let e = FrozenWeight::quantize(WeightFormat::Lower, "fc.weight", &w).unwrap_err();
    let msg = e.to_string();
    match e {
        Error::Unstorable {
            key,
            row: 0,
            col: 0,
            value,
            source,
        } => {
            assert_eq!((key.as_str(), value), ("fc.weight", 1e6));
            assert!(matches!(*source, QuantError::Overflow { .. }), "{source}");
        }
        other => panic!("{other}"),
    }
    for part in ["`fc.weight` row 0, column 0", "group 0", "1e6"] {
        assert!(msg.contains(part), "{part}: {msg}");
    }
}
