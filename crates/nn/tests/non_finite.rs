//! NaN and infinite parameters are errors naming the file, the key, the element and its value:
//! in a state dict read as an `nn.Sequential` (every parameter and running statistic, stored
//! f32 or f16, before any quantization) and in a PEFT adapter (its LoRA tensors and the base
//! parameters it carries).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nibble_io::{write_safetensors, Checkpoint, DType, WeightFormat};
use nibble_nn::{Activation, Error, Sequential, SequentialOptions};
use nibble_tensor::f16;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-nn-nonfinite-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tensor: key, shape, values, stored as f16 or f32.
type T = (String, Vec<usize>, Vec<f32>, bool);

fn t(key: &str, shape: &[usize], v: Vec<f32>) -> T {
    (key.to_string(), shape.to_vec(), v, false)
}

fn write(path: &Path, tensors: &[T]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v, half)| {
            if *half {
                v.iter()
                    .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                    .collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        })
        .collect();
    let entries: Vec<(String, DType, Vec<usize>, &[u8])> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, s, _, half), b)| {
            let dtype = if *half { DType::F16 } else { DType::F32 };
            (k.clone(), dtype, s.clone(), b.as_slice())
        })
        .collect();
    write_safetensors(path, &entries, &BTreeMap::new()).unwrap();
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| 0.05 * i as f32 - 0.2).collect()
}

/// `nn.Sequential(Linear(3, 4), BatchNorm1d(4), ReLU(), Linear(4, 4), LayerNorm(4), Linear(4, 2))`.
fn state_dict() -> Vec<T> {
    vec![
        t("0.weight", &[4, 3], ramp(12)),
        t("0.bias", &[4], ramp(4)),
        t("1.weight", &[4], vec![1.0; 4]),
        t("1.bias", &[4], ramp(4)),
        t("1.running_mean", &[4], ramp(4)),
        t("1.running_var", &[4], vec![0.5; 4]),
        t("3.weight", &[4, 4], ramp(16)),
        t("3.bias", &[4], ramp(4)),
        t("4.weight", &[4], vec![1.0; 4]),
        t("4.bias", &[4], ramp(4)),
        t("5.weight", &[2, 4], ramp(8)),
        t("5.bias", &[2], ramp(2)),
    ]
}

fn load(path: &Path, format: WeightFormat) -> nibble_nn::Result<Sequential> {
    Sequential::from_state_dict(
        &Checkpoint::open(path).unwrap(),
        &SequentialOptions::new()
            .activation(Activation::Relu)
            .format(format),
    )
}

#[test]
fn non_finite_parameters_of_a_sequential_are_errors_naming_key_element_and_value() {
    let dir = tempdir("seq");
    let good = dir.join("good.safetensors");
    write(&good, &state_dict());
    load(&good, WeightFormat::F32).unwrap();
    // (key, element, value, stored f16, what the message must name)
    let cases: [(&str, usize, f32, bool, &str); 12] = [
        ("0.weight", 5, f32::NAN, false, "(row 1, col 2)"),
        ("0.weight", 11, f32::INFINITY, true, "(row 3, col 2)"),
        ("0.bias", 2, f32::NEG_INFINITY, false, "index 2"),
        ("1.weight", 0, f32::NAN, false, "index 0"),
        ("1.bias", 3, f32::INFINITY, false, "index 3"),
        ("1.running_mean", 1, f32::NAN, false, "index 1"),
        ("1.running_mean", 2, f32::NAN, true, "index 2"),
        ("1.running_var", 3, f32::INFINITY, false, "index 3"),
        ("3.weight", 6, f32::NAN, true, "(row 1, col 2)"),
        ("4.weight", 1, f32::NAN, false, "index 1"),
        ("4.bias", 0, f32::NEG_INFINITY, true, "index 0"),
        ("5.bias", 1, f32::NAN, false, "index 1"),
    ];
    for (i, (key, element, value, half, at)) in cases.into_iter().enumerate() {
        let mut sd = state_dict();
        let entry = sd.iter_mut().find(|e| e.0 == key).unwrap();
        entry.2[element] = value;
        entry.3 = half;
        let path = dir.join(format!("bad{i}.safetensors"));
        write(&path, &sd);
        // In every format the Linears may be read as (quantized from the f32 values).
        for format in [
            WeightFormat::F32,
            WeightFormat::F16,
            WeightFormat::Q4,
            WeightFormat::Int8,
        ] {
            let e = load(&path, format).unwrap_err();
            assert!(matches!(e, Error::NonFinite { .. }), "{key} {format}: {e}");
            let msg = e.to_string();
            let shown = if value.is_nan() {
                "NaN".to_string()
            } else {
                value.to_string()
            };
            for part in [key, at, &shown, &format!("bad{i}.safetensors")] {
                assert!(msg.contains(part), "{key} {format}: `{part}` not in: {msg}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn non_finite_adapter_tensors_are_errors_naming_key_element_and_value() {
    let dir = tempdir("adapter");
    let model_path = dir.join("model.safetensors");
    write(&model_path, &state_dict());
    let config = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0", "5"], "bias": "all"}"#;
    let adapter = |name: &str, tensors: &[T]| -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_config.json"), config).unwrap();
        write(&d.join("adapter_model.safetensors"), tensors);
        d
    };
    let tensors = || {
        vec![
            t("base_model.model.0.lora_A.weight", &[2, 3], ramp(6)),
            t("base_model.model.0.lora_B.weight", &[4, 2], ramp(8)),
            t("base_model.model.5.lora_A.weight", &[2, 4], ramp(8)),
            t("base_model.model.5.lora_B.weight", &[2, 2], ramp(4)),
            t("base_model.model.0.base_layer.bias", &[4], ramp(4)),
            t("base_model.model.4.bias", &[4], ramp(4)),
        ]
    };
    let mut m = load(&model_path, WeightFormat::F32).unwrap();
    m.load_adapter(&adapter("good", &tensors())).unwrap();
    let cases: [(&str, usize, f32, bool, &str); 5] = [
        (
            "base_model.model.0.lora_A.weight",
            4,
            f32::NAN,
            false,
            "(row 1, col 1)",
        ),
        (
            "base_model.model.5.lora_B.weight",
            3,
            f32::INFINITY,
            true,
            "(row 1, col 1)",
        ),
        (
            "base_model.model.0.base_layer.bias",
            2,
            f32::NAN,
            false,
            "index 2",
        ),
        (
            "base_model.model.4.bias",
            0,
            f32::NEG_INFINITY,
            false,
            "index 0",
        ),
        // An infinity stored f16.
        (
            "base_model.model.0.lora_B.weight",
            7,
            f32::INFINITY,
            true,
            "(row 3, col 1)",
        ),
    ];
    for (i, (key, element, value, half, at)) in cases.into_iter().enumerate() {
        let mut ts = tensors();
        let entry = ts.iter_mut().find(|e| e.0 == key).unwrap();
        entry.2[element] = value;
        entry.3 = half;
        let d = adapter(&format!("bad{i}"), &ts);
        let mut m = load(&model_path, WeightFormat::Q4).unwrap();
        let e = m.load_adapter(&d).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{key}: {e}");
        let msg = e.to_string();
        let shown = if value.is_nan() {
            "NaN".to_string()
        } else {
            value.to_string()
        };
        for part in [key, at, &shown, "adapter_model.safetensors"] {
            assert!(msg.contains(part), "{key}: `{part}` not in: {msg}");
        }
        assert!(
            m.linears().all(|l| l.lora.is_none()),
            "{key}: model changed"
        );
    }
    // A finite B that PEFT's scaling takes past f32's range.
    let big = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["0"]}"#;
    let d = dir.join("overflow");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("adapter_config.json"), big).unwrap();
    let mut b = ramp(8);
    b[1] = f32::MAX;
    write(
        &d.join("adapter_model.safetensors"),
        &[
            t("base_model.model.0.lora_A.weight", &[2, 3], ramp(6)),
            t("base_model.model.0.lora_B.weight", &[4, 2], b),
        ],
    );
    let mut m = load(&model_path, WeightFormat::F32).unwrap();
    let msg = m.load_adapter(&d).unwrap_err().to_string();
    assert!(
        msg.contains("base_model.model.0.lora_B.weight")
            && msg.contains("(row 0, col 1)")
            && msg.contains("inf"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
