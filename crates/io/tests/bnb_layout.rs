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

/// Whether a 4-bit weight is double-quantized is bitsandbytes' rule (`K.nested_absmax` is
/// there), not the absmax's dtype: a nested layer whose absmax is f32, a plain one whose absmax
/// is u8, and nested parts without `K.nested_absmax` are errors naming the key and the dtypes,
/// never read as the other kind.
#[test]
fn absmax_dtype_must_fit_double_quantization() {
    let dir = std::env::temp_dir().join(format!("nibble-bnb-absmax-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = nibble_tensor::Tensor::randn(&[5, 70], &mut nibble_tensor::Rng::new(2));
    type Entry = (String, DType, Vec<usize>, Vec<u8>);
    let entries = |format: WeightFormat| -> Vec<Entry> {
        let weight = FrozenWeight::quantize(format, "w", &w).unwrap();
        weight
            .parts("l.weight")
            .into_iter()
            .map(|(k, d, s, b)| (k, d, s, b.into_owned()))
            .collect()
    };
    let read = |name: &str, entries: &[Entry]| -> Result<(), String> {
        let path = dir.join(format!("{name}.safetensors"));
        let refs: Vec<(String, DType, Vec<usize>, &[u8])> = entries
            .iter()
            .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_slice()))
            .collect();
        nibble_io::write_safetensors(&path, &refs, &Default::default()).unwrap();
        let file = Checkpoint::open(&path).unwrap();
        // Both readers and the format probe agree.
        let e1 = read_bnb_4bit(&file, "l.weight").map(|_| ());
        let e2 = nibble_io::bnb::read_bnb_4bit_f32(&file, "l.weight").map(|_| ());
        assert_eq!(e1.is_ok(), e2.is_ok(), "{name}");
        e1.map_err(|e| e.to_string())
    };
    let (plain, nested) = (entries(WeightFormat::Nf4), entries(WeightFormat::Nf4Dq));
    read("plain", &plain).unwrap();
    read("nested", &nested).unwrap();
    // The nested layer's u8 absmax codes widened to f32 (what a careless conversion writes).
    let mut f32_absmax = nested.clone();
    let absmax = f32_absmax
        .iter_mut()
        .find(|e| e.0 == "l.weight.absmax")
        .unwrap();
    absmax.1 = DType::F32;
    absmax.3 = absmax
        .3
        .iter()
        .flat_map(|&c| f32::from(c).to_le_bytes())
        .collect();
    let e = read("nested_f32_absmax", &f32_absmax).unwrap_err();
    assert!(
        e.contains("l.weight.absmax")
            && e.contains("u8")
            && e.contains("f32")
            && e.contains("l.weight.nested_absmax"),
        "{e}"
    );
    // A plain layer with u8 absmax.
    let mut u8_absmax = plain.clone();
    let absmax = u8_absmax
        .iter_mut()
        .find(|e| e.0 == "l.weight.absmax")
        .unwrap();
    absmax.1 = DType::U8;
    absmax.3 = absmax.3.chunks(4).map(|c| c[3]).collect();
    let e = read("plain_u8_absmax", &u8_absmax).unwrap_err();
    assert!(
        e.contains("l.weight.absmax") && e.contains("u8") && e.contains("f32"),
        "{e}"
    );
    // The nested map without the nested absmax: half a nested state.
    let mut half: Vec<Entry> = nested
        .iter()
        .filter(|e| e.0 != "l.weight.nested_absmax")
        .cloned()
        .collect();
    let e = read("half_nested", &half).unwrap_err();
    assert!(e.contains("l.weight.nested_absmax"), "{e}");
    // The nested JSON fields alone on a plain layer.
    half = plain.clone();
    let state = half
        .iter_mut()
        .find(|e| e.0.ends_with("bitsandbytes__nf4"))
        .unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&state.3).unwrap();
    json["nested_offset"] = serde_json::json!(0.5);
    state.3 = serde_json::to_vec(&json).unwrap();
    state.2 = vec![state.3.len()];
    let e = read("stray_offset", &half).unwrap_err();
    assert!(
        e.contains("nested_offset") && e.contains("l.weight.nested_absmax"),
        "{e}"
    );
    // A `dtype` torch has no such name for (bitsandbytes' getattr fails), plain and nested;
    // a real one other than float32 reads (nibble computes in f32 whatever it says).
    for (name, entries, field, value, ok) in [
        ("garbage_dtype", &plain, "dtype", "garbage", false),
        (
            "garbage_nested_dtype",
            &nested,
            "nested_dtype",
            "float33",
            false,
        ),
        ("bf16_dtype", &plain, "dtype", "bfloat16", true),
    ] {
        let mut edited = entries.clone();
        let state = edited
            .iter_mut()
            .find(|e| e.0.ends_with("bitsandbytes__nf4"))
            .unwrap();
        let mut json: serde_json::Value = serde_json::from_slice(&state.3).unwrap();
        json[field] = serde_json::json!(value);
        state.3 = serde_json::to_vec(&json).unwrap();
        state.2 = vec![state.3.len()];
        match read(name, &edited) {
            Ok(()) => assert!(ok, "{name}: read"),
            Err(e) => {
                assert!(!ok, "{name}: {e}");
                assert!(e.contains(field) && e.contains(value), "{e}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
