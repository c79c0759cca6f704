//! The quantized-checkpoint layout for any key and shape: every format's parts written with
//! `write_safetensors` and read back with `FrozenWeight::{stored_format, stored_shape,
//! from_checkpoint}` give the same weight, with and without the shape metadata.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nibble_io::frozen::shape_metadata_key;
use nibble_io::{write_safetensors, Checkpoint, DType, FrozenWeight, WeightFormat, FORMAT_KEY};
use nibble_tensor::{Rng, Tensor};

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-io-parts-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, weight: &FrozenWeight, key: &str, metadata: &BTreeMap<String, String>) {
    let parts = weight.parts(key);
    let entries: Vec<(String, DType, Vec<usize>, &[u8])> = parts
        .iter()
        .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_ref()))
        .collect();
    write_safetensors(path, &entries, metadata).unwrap();
}

#[test]
fn every_format_round_trips_under_any_key() {
    let dir = tempdir("formats");
    let (out, inp) = (24, 256);
    let w = Tensor::randn(&[out, inp], &mut Rng::new(3));
    let key = "encoder.layers.7.fc.weight";
    for format in WeightFormat::ALL
        .into_iter()
        .filter(|f| *f != WeightFormat::F32)
    {
        let weight = FrozenWeight::quantize(format, key, &w).unwrap();
        let want = weight.matrix().to_f32();
        for with_shape in [true, false] {
            let mut metadata = BTreeMap::new();
            metadata.insert(FORMAT_KEY.to_string(), format.name().to_string());
            if with_shape {
                metadata.insert(shape_metadata_key(key), format!("{out},{inp}"));
            }
            let path = dir.join(format!("{}-{with_shape}.safetensors", format.name()));
            write(&path, &weight, key, &metadata);
            let file = Checkpoint::open(&path).unwrap();
            assert_eq!(WeightFormat::declared_by(&file).unwrap(), Some(format));
            if format == WeightFormat::F16 {
                // A plain f16 tensor: no parts to recognise.
                assert_eq!(FrozenWeight::stored_format(&file, key), None);
                continue;
            }
            assert_eq!(FrozenWeight::stored_format(&file, key), Some(format));
            let shape = FrozenWeight::stored_shape(&file, format, key, Some(out)).unwrap();
            assert_eq!(shape, (out, inp), "{format} with_shape={with_shape}");
            let back = FrozenWeight::from_checkpoint(&file, format, key, out, inp).unwrap();
            assert_eq!(back.format(), format);
            assert_eq!(back.matrix().to_f32().data(), want.data(), "{format}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_shape_metadata_and_unknown_formats_are_errors() {
    let dir = tempdir("bad");
    let w = Tensor::randn(&[16, 64], &mut Rng::new(1));
    let key = "w";
    let weight = FrozenWeight::quantize(WeightFormat::Int8, key, &w).unwrap();
    for bad in ["16", "16,x", "1,2,3", ""] {
        let mut metadata = BTreeMap::new();
        metadata.insert(shape_metadata_key(key), bad.to_string());
        let path = dir.join("bad.safetensors");
        write(&path, &weight, key, &metadata);
        let file = Checkpoint::open(&path).unwrap();
        let e = FrozenWeight::stored_shape(&file, WeightFormat::Int8, key, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.safetensors") && e.contains("`w`"),
            "{bad}: {e}"
        );
    }
    let mut metadata = BTreeMap::new();
    metadata.insert(FORMAT_KEY.to_string(), "q5".to_string());
    let path = dir.join("q5.safetensors");
    write(&path, &weight, key, &metadata);
    let e = WeightFormat::declared_by(&Checkpoint::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("q5") && e.contains("q5.safetensors"), "{e}");
    // The declared shape must match the parts.
    let mut metadata = BTreeMap::new();
    metadata.insert(shape_metadata_key(key), "16,32".to_string());
    write(&path, &weight, key, &metadata);
    let file = Checkpoint::open(&path).unwrap();
    let (o, i) = FrozenWeight::stored_shape(&file, WeightFormat::Int8, key, None).unwrap();
    let e = FrozenWeight::from_checkpoint(&file, WeightFormat::Int8, key, o, i)
        .unwrap_err()
        .to_string();
    assert!(e.contains("w.int8.codes") && e.contains("[16, 32]"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Parts of 0 rows whose width doubled (Q4's packed bytes) or times 128 (lower's groups)
/// overflows: the shape cannot be told, an error naming the file and key, never a wrapped
/// width (or, with overflow checks, a panic).
#[test]
fn parts_whose_width_overflows_are_errors() {
    let dir = tempdir("overflow");
    let path = dir.join("huge.safetensors");
    for (format, part, dtype, shape) in [
        (
            WeightFormat::Q4,
            "w.q4.packed",
            DType::U8,
            vec![0, 1usize << 63],
        ),
        (
            WeightFormat::Lower,
            "w.lower.scale",
            DType::F16,
            vec![0, usize::MAX / 64],
        ),
    ] {
        let tensors = vec![(part.to_string(), dtype, shape, &[][..])];
        write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
        let file = Checkpoint::open(&path).unwrap();
        let e = FrozenWeight::stored_shape(&file, format, "w", Some(2))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("huge.safetensors") && e.contains("`w`") && e.contains("shape"),
            "{part}: {e}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
