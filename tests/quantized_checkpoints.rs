//! Quantized checkpoints (save, map, run), PEFT-layout adapters, and merging.

use nibble::bignet::adapter::{load_adapter, save_adapter, CONFIG_FILE, WEIGHTS_FILE};
use nibble::bignet::checkpoint::{write_safetensors, Checkpoint, DType};
use nibble::bignet::frozen::FrozenWeight;
use nibble::bignet::layer::LinearBase;
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::merge::merge_adapters;
use nibble::bignet::persist::save_model;
use nibble::bignet::{BigNet, Variant, WeightFormat};
use nibble::tensor::{Rng, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const DIM: usize = 256;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("nibble-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn spec(variant: Variant, weights: Option<&Path>) -> ModelSpec {
    ModelSpec {
        weights: weights.map(Path::to_path_buf),
        dim: DIM,
        ..ModelSpec::seeded(variant, 4)
    }
}

fn batch(rows: usize) -> Tensor {
    Tensor::randn(&[rows, DIM], &mut Rng::new(11))
}

#[test]
fn saved_quantized_models_load_mapped_and_give_bit_identical_outputs() {
    let dir = TempDir::new("qckpt");
    for variant in [
        Variant::LowPrecision,
        Variant::Nf4,
        Variant::Nf4Dq,
        Variant::Int8,
        Variant::LowerPrecision,
        Variant::HalfPrecision,
    ] {
        let model = spec(variant, None).build().unwrap();
        let path = dir.join(&format!("{variant}.safetensors"));
        save_model(&model, &path).unwrap();
        let file = Checkpoint::open(&path).unwrap();
        assert_eq!(
            file.metadata().get("nibble.format").map(String::as_str),
            Some(variant.weight_format().name())
        );
        let loaded = spec(variant, Some(&path)).build().unwrap();
        assert_eq!(loaded.variant(), variant);
        assert_eq!(loaded.counts(), model.counts(), "{variant}");
        for rows in [1, 17] {
            let x = batch(rows);
            assert!(
                loaded.infer(&x).unwrap() == model.infer(&x).unwrap(),
                "{variant}: outputs differ after a save/load round trip"
            );
        }
        if variant == Variant::LowPrecision {
            let first = &loaded.linears().next().unwrap().base;
            let LinearBase::Frozen {
                weight: FrozenWeight::Q4(q),
                ..
            } = first
            else {
                panic!("low_precision layers hold Q4 weights, found {first:?}");
            };
            assert!(
                q.parts().0.is_shared(),
                "packed codes are mapped, not copied"
            );
        }
    }
    // The golden layout: q4 parts of a PyTorch-initialised d128 model equal the reference's.
    let io = Checkpoint::open(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/io_d128.safetensors"),
    )
    .unwrap();
    let model = ModelSpec {
        weights: Some(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/bignet_d128.safetensors"),
        ),
        ..ModelSpec::seeded(Variant::LowPrecision, 0)
    }
    .build()
    .unwrap();
    let path = dir.join("d128_q4.safetensors");
    save_model(&model, &path).unwrap();
    let ours = Checkpoint::open(&path).unwrap();
    for layer in model.linears() {
        for part in ["packed", "norm"] {
            let k = format!("{}.weight.q4.{part}", layer.name);
            let g = format!("q4.{}.weight.{part}", layer.name);
            assert_eq!(ours.bytes(&k).unwrap(), io.bytes(&g).unwrap(), "{k}");
            assert_eq!(ours.info(&k), io.info(&g), "{k}");
        }
    }
}

#[test]
fn quantized_files_refuse_the_wrong_variant_and_broken_parts() {
    let dir = TempDir::new("qbad");
    let model = spec(Variant::LowPrecision, None).build().unwrap();
    let path = dir.join("q4.safetensors");
    save_model(&model, &path).unwrap();
    let err = spec(Variant::Bignet, Some(&path))
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("low_precision"), "{err}");
    // qlora over a q4 file attaches adapters.
    let q = spec(Variant::Qlora, Some(&path)).build().unwrap();
    assert_eq!(q.variant(), Variant::Qlora);
    assert!(q.counts().trainable > 0);

    // Rewrite the file with one part broken at a time.
    let file = Checkpoint::open(&path).unwrap();
    let keys: Vec<String> = file.keys().map(String::from).collect();
    type Edit<'a> = &'a dyn Fn(&str, &mut DType, &mut Vec<usize>, &mut Vec<u8>) -> bool;
    let rewrite = |name: &str, stray: bool, edit: Edit<'_>| {
        let mut entries: Vec<(String, DType, Vec<usize>, Vec<u8>)> = Vec::new();
        if stray {
            entries.push(("model.99.weight".into(), DType::F32, vec![1], vec![0; 4]));
        }
        for k in &keys {
            let (mut d, s) = file.info(k).unwrap();
            let mut s = s.to_vec();
            let mut b = file.bytes(k).unwrap().to_vec();
            if edit(k, &mut d, &mut s, &mut b) {
                entries.push((k.clone(), d, s, b));
            }
        }
        let refs: Vec<_> = entries
            .iter()
            .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_slice()))
            .collect();
        let out = dir.join(name);
        write_safetensors(&out, &refs, file.metadata()).unwrap();
        spec(Variant::LowPrecision, Some(&out))
            .build()
            .unwrap_err()
            .to_string()
    };
    let target = "model.4.model.2.weight.q4.norm";
    let err = rewrite("nan.safetensors", false, &|k, _, _, b| {
        if k == target {
            b[6..8].copy_from_slice(&half::f16::NAN.to_le_bytes());
        }
        true
    });
    assert!(err.contains(target) && err.contains("NaN"), "{err}");
    let err = rewrite("missing.safetensors", false, &|k, _, _, _| k != target);
    assert!(err.contains(target), "{err}");
    let err = rewrite("shape.safetensors", false, &|k, _, s, b| {
        if k == target {
            s[1] /= 2;
            b.truncate(b.len() / 2);
        }
        true
    });
    assert!(err.contains(target) && err.contains("shape"), "{err}");
    // An extra tensor is refused, naming it.
    let err = rewrite("extra.safetensors", true, &|_, _, _, _| true);
    assert!(err.contains("model.99.weight"), "{err}");
}

fn trained_lora(variant: Variant) -> BigNet {
    let model = spec(variant, None).build().unwrap();
    // Give every adapter a non-zero B so that it changes the output.
    let mut rng = Rng::new(5);
    for p in model.trainable_params() {
        let shape = p.value().shape().to_vec();
        if p.name().contains("lora_b") {
            *p.value_mut() = Tensor::randn(&shape, &mut rng).scale(0.02);
        }
    }
    model
}

#[test]
fn adapters_round_trip_in_peft_layout() {
    let dir = TempDir::new("peft");
    let model = trained_lora(Variant::Lora);
    let adapter = dir.join("adapter");
    save_adapter(&model, &adapter).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 32);
    assert_eq!(config["lora_alpha"], 32);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 18);
    let file = Checkpoint::open(adapter.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(
        file.info("base_model.model.model.0.model.0.lora_A.weight"),
        Some((DType::F32, &[32, DIM][..]))
    );
    assert_eq!(
        file.info("base_model.model.model.10.model.4.lora_B.weight"),
        Some((DType::F32, &[DIM, 32][..]))
    );
    // Loading into a fresh lora model (different seed) and into a half_precision one.
    let x = batch(8);
    let want = model.infer(&x).unwrap();
    for variant in [Variant::Lora, Variant::HalfPrecision] {
        let mut fresh = ModelSpec {
            seed: 4,
            ..spec(variant, None)
        }
        .build()
        .unwrap();
        load_adapter(&mut fresh, &adapter).unwrap();
        assert_eq!(fresh.variant(), Variant::Lora);
        assert!(fresh.infer(&x).unwrap() == want, "{variant}");
    }
    // PEFT scaling: lora_alpha = 2r doubles B A.
    let mut cfg = config.clone();
    cfg["lora_alpha"] = serde_json::json!(64);
    std::fs::write(adapter.join(CONFIG_FILE), cfg.to_string()).unwrap();
    let mut scaled = spec(Variant::Lora, None).build().unwrap();
    load_adapter(&mut scaled, &adapter).unwrap();
    let b0 = model
        .trainable_params()
        .into_iter()
        .find(|p| p.name().contains("lora_b"))
        .unwrap();
    let b1 = scaled
        .trainable_params()
        .into_iter()
        .find(|p| p.name().contains("lora_b"))
        .unwrap();
    assert_eq!(b1.value().data()[3], 2.0 * b0.value().data()[3]);
    // Broken configs and files are refused, naming the problem.
    for (edit, needle) in [
        (
            serde_json::json!({"peft_type": "PREFIX_TUNING", "r": 32}),
            "peft_type",
        ),
        (serde_json::json!({"peft_type": "LORA", "r": 0}), "`r`"),
        (
            serde_json::json!({"peft_type": "LORA", "r": 32, "bias": "sometimes"}),
            "bias",
        ),
        (
            serde_json::json!({"peft_type": "LORA", "r": 32, "target_modules": ["model.0.model.0"], "use_dora": true, "lora_bias": true}),
            "DoRA",
        ),
        (
            serde_json::json!({"peft_type": "LORA", "r": 32, "rank_pattern": {"model.0": 0}}),
            "rank_pattern",
        ),
    ] {
        std::fs::write(adapter.join(CONFIG_FILE), edit.to_string()).unwrap();
        let mut m = spec(Variant::Lora, None).build().unwrap();
        let err = load_adapter(&mut m, &adapter).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains(CONFIG_FILE), "{err}");
    }
    std::fs::write(adapter.join(CONFIG_FILE), "{not json").unwrap();
    let mut m = spec(Variant::Lora, None).build().unwrap();
    assert!(load_adapter(&mut m, &adapter)
        .unwrap_err()
        .to_string()
        .contains("JSON"));
    std::fs::write(adapter.join(CONFIG_FILE), config.to_string()).unwrap();
    // An adapter for another width.
    let mut wide = ModelSpec {
        dim: 128,
        ..spec(Variant::Lora, None)
    }
    .build()
    .unwrap();
    let err = load_adapter(&mut wide, &adapter).unwrap_err().to_string();
    assert!(err.contains("lora_A") && err.contains("shape"), "{err}");
    // A stray key.
    let t = vec![0.0f32; 4];
    write_safetensors(
        &adapter.join(WEIGHTS_FILE),
        &[(
            "base_model.model.model.99.lora_A.weight".into(),
            DType::F32,
            vec![2, 2],
            bytemuck::cast_slice(&t),
        )],
        &BTreeMap::new(),
    )
    .unwrap();
    let mut m = spec(Variant::Lora, None).build().unwrap();
    let err = load_adapter(&mut m, &adapter).unwrap_err().to_string();
    assert!(err.contains("model.99"), "{err}");
}

#[test]
fn merging_into_f32_matches_unmerged_and_quantized_merges_report_their_error() {
    let x = batch(16);
    // f32 base with adapters attached.
    let mut f32_model = spec(Variant::Bignet, None).build().unwrap();
    f32_model.attach_lora(2).unwrap();
    let mut rng = Rng::new(6);
    for p in f32_model.trainable_params() {
        if p.name().contains("lora_b") {
            let shape = p.value().shape().to_vec();
            *p.value_mut() = Tensor::randn(&shape, &mut rng).scale(0.02);
        }
    }
    let unmerged = f32_model.infer(&x).unwrap();
    let (merged, report) = merge_adapters(&f32_model, WeightFormat::F32).unwrap();
    assert_eq!(merged.variant(), Variant::Bignet);
    assert!(merged.linears().all(|l| l.lora.is_none()));
    let (max, _) = merged.infer(&x).unwrap().abs_diff_stats(&unmerged).unwrap();
    assert!(max < 1e-5, "f32 merge: {max}");
    assert_eq!(report.max_weight_error, 0.0);
    // The merge copies: the original still has its adapters and gives the same output.
    assert!(f32_model.infer(&x).unwrap() == unmerged);

    let lora = trained_lora(Variant::Lora);
    let unmerged = lora.infer(&x).unwrap();
    let (half, r16) = merge_adapters(&lora, WeightFormat::F16).unwrap();
    assert_eq!(half.variant(), Variant::HalfPrecision);
    let (max16, _) = half.infer(&x).unwrap().abs_diff_stats(&unmerged).unwrap();
    assert!(
        r16.max_weight_error > 0.0 && r16.max_weight_error < 1e-3,
        "{r16:?}"
    );
    let (q4, rq) = merge_adapters(&lora, WeightFormat::Q4).unwrap();
    assert_eq!(q4.variant(), Variant::LowPrecision);
    let (maxq, _) = q4.infer(&x).unwrap().abs_diff_stats(&unmerged).unwrap();
    assert!(
        rq.max_weight_error > r16.max_weight_error,
        "{rq:?} vs {r16:?}"
    );
    assert!(maxq > max16 && maxq < 0.5, "q4 merge output error {maxq}");
    assert!(merge_adapters(
        &spec(Variant::LowPrecision, None).build().unwrap(),
        WeightFormat::F32
    )
    .is_err());
}
