//! bitsandbytes' 4-bit layout both ways: what nibble writes for an NF4 weight is, tensor for
//! tensor, what bitsandbytes wrote for it (`tests/data/bnb_seq*`, from bitsandbytes 0.50.2),
//! and reads back as the same weight.

use nibble_io::bnb::{parts, read_bnb_4bit};
use nibble_io::{Checkpoint, DType, FrozenWeight, WeightFormat};
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

#[test]
fn nibble_writes_the_tensors_bitsandbytes_wrote() {
    for (file, format) in [
        ("bnb_seq.safetensors", WeightFormat::Nf4),
        ("bnb_seq_dq.pth", WeightFormat::Nf4Dq),
    ] {
        let file = Checkpoint::open(data(file)).unwrap();
        for key in ["0.weight", "2.weight", "4.weight"] {
            let (weight, stored, out, inn) = read_bnb_4bit(&file, key).unwrap();
            assert_eq!(stored, format, "{key}");
            let FrozenWeight::Nf4(w) = &weight else {
                panic!("{key}: not NF4")
            };
            let written = parts(key, w);
            let mut names: Vec<&str> = written.iter().map(|p| p.0.as_str()).collect();
            names.sort_unstable();
            let mut theirs: Vec<&str> = file
                .keys()
                .filter(|k| *k == key || k.starts_with(&format!("{key}.")))
                .collect();
            theirs.sort_unstable();
            assert_eq!(names, theirs, "{key}");
            for (name, dtype, shape, bytes) in &written {
                let (their_dtype, their_shape) = file.info(name).unwrap();
                assert_eq!(
                    (*dtype, shape.as_slice()),
                    (their_dtype, their_shape),
                    "{name}"
                );
                if name.ends_with("bitsandbytes__nf4") {
                    assert_eq!(
                        std::str::from_utf8(bytes).unwrap(),
                        std::str::from_utf8(file.bytes(name).unwrap()).unwrap()
                    );
                    // The same JSON values (key order and number spelling may differ).
                    let ours: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                    let theirs: serde_json::Value =
                        serde_json::from_slice(file.bytes(name).unwrap()).unwrap();
                    for field in ["quant_type", "blocksize", "shape", "nested_blocksize"] {
                        assert_eq!(ours[field], theirs[field], "{name} {field}");
                    }
                    assert_eq!(ours["shape"], serde_json::json!([out, inn]));
                    if let Some(offset) = theirs["nested_offset"].as_f64() {
                        let ours = ours["nested_offset"].as_f64().unwrap();
                        assert_eq!(ours as f32, offset as f32, "{name}");
                    }
                } else {
                    assert!(
                        bytes.as_ref() == file.bytes(name).unwrap(),
                        "{name}: bytes differ from bitsandbytes'"
                    );
                }
            }
        }
    }
}

#[test]
fn what_nibble_writes_reads_back_as_the_same_weight() {
    let dir = std::env::temp_dir().join(format!("nibble-bnb-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = nibble_tensor::Rng::new(5);
    // Sizes with a partial last block, an odd count, one element, several nested groups, none.
    for (i, &(out, inn)) in [(37, 41), (1, 1), (3, 7), (300, 130), (0, 5)]
        .iter()
        .enumerate()
    {
        let w = nibble_tensor::Tensor::randn(&[out, inn], &mut rng);
        for format in [WeightFormat::Nf4, WeightFormat::Nf4Dq] {
            let weight = FrozenWeight::quantize(format, "w", &w).unwrap();
            let path = dir.join(format!("{i}_{format}.safetensors"));
            let p = weight.parts("layer.weight");
            let entries: Vec<(String, DType, Vec<usize>, &[u8])> = p
                .iter()
                .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_ref()))
                .collect();
            nibble_io::write_safetensors(&path, &entries, &Default::default()).unwrap();
            let file = Checkpoint::open(&path).unwrap();
            let (back, stored, o, n) = read_bnb_4bit(&file, "layer.weight").unwrap();
            assert_eq!((stored, o, n), (format, out, inn));
            let (a, b) = (weight.matrix().to_f32(), back.matrix().to_f32());
            assert!(
                a.data()
                    .iter()
                    .zip(b.data())
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{out}x{inn} {format}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The f32 reader (FP4, other block sizes) and the NF4 reader agree on bitsandbytes' NF4 files
/// with blocks of 64, plain and double-quantized: the same values, bit for bit.
#[test]
fn the_f32_reader_gives_the_nf4_weights_values() {
    for file in ["bnb_seq.safetensors", "bnb_seq_dq.pth"] {
        let file = Checkpoint::open(data(file)).unwrap();
        for key in ["0.weight", "2.weight", "4.weight"] {
            let (weight, ..) = read_bnb_4bit(&file, key).unwrap();
            let dense = nibble_io::bnb::read_bnb_4bit_f32(&file, key).unwrap();
            let want = weight.matrix().to_f32();
            assert_eq!(dense.shape(), want.shape(), "{key}");
            let same = dense
                .data()
                .iter()
                .zip(want.data())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{key}: the two readers differ");
        }
    }
    // FP4 is read by the f32 reader only, with an error naming the weight from the other.
    let fp4 = Checkpoint::open(data("bnb_fp4_seq.safetensors")).unwrap();
    let info = nibble_io::bnb::bnb_4bit_info(&fp4, "2.weight").unwrap();
    assert_eq!(
        (
            info.quant_type,
            info.blocksize,
            info.double,
            info.out,
            info.inn
        ),
        (nibble_io::bnb::QuantType::Fp4, 128, true, 41, 37)
    );
    let e = read_bnb_4bit(&fp4, "2.weight")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("2.weight") && e.contains("fp4"), "{e}");
}
