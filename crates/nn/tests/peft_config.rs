//! PEFT's `adapter_config.json` read as PEFT reads it: `LoraConfig`'s defaults for absent
//! settings, and `target_modules` / `exclude_modules` / `modules_to_save` deciding which Linears
//! get a LoRA layer. The model is tiny and written here: `nn.Sequential(Linear(3, 4), ReLU(),
//! LayerNorm(4), Linear(4, 4), ReLU(), Linear(4, 2))`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nibble_io::{write_safetensors, Checkpoint, DType};
use nibble_nn::{Activation, Sequential, SequentialOptions};
use serde_json::{json, Value};

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-nn-peftcfg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Values `0.1 · (seed + i) mod 7 - 0.3`, distinct and small.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((seed + 3 * i) % 7) as f32 * 0.1 - 0.3)
        .collect()
}

fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let entries: Vec<(String, DType, Vec<usize>, &[u8])> = tensors
        .iter()
        .map(|(k, s, v)| {
            (
                k.to_string(),
                DType::F32,
                s.clone(),
                bytemuck::cast_slice::<f32, u8>(v),
            )
        })
        .collect();
    write_safetensors(path, &entries, &BTreeMap::new()).unwrap();
}

/// The model's state dict in `dir/model.safetensors`.
fn model(dir: &Path) -> Sequential {
    let path = dir.join("model.safetensors");
    write_f32(
        &path,
        &[
            ("0.weight", vec![4, 3], values(12, 1)),
            ("0.bias", vec![4], values(4, 2)),
            ("2.weight", vec![4], vec![1.0, 0.9, 1.1, 1.2]),
            ("2.bias", vec![4], values(4, 3)),
            ("3.weight", vec![4, 4], values(16, 4)),
            ("3.bias", vec![4], values(4, 5)),
            ("5.weight", vec![2, 4], values(8, 6)),
            ("5.bias", vec![2], values(2, 0)),
        ],
    );
    let file = Checkpoint::open(&path).unwrap();
    Sequential::from_state_dict(
        &file,
        &SequentialOptions::new().activation(Activation::Relu),
    )
    .unwrap()
}

/// The LoRA tensors of rank `r` for the Linears `modules` (of `(name, out, in)`).
fn lora(r: usize, modules: &[(&str, usize, usize)]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    modules
        .iter()
        .enumerate()
        .flat_map(|(i, (m, out, inp))| {
            [
                (
                    format!("base_model.model.{m}.lora_A.weight"),
                    vec![r, *inp],
                    values(r * inp, 2 * i),
                ),
                (
                    format!("base_model.model.{m}.lora_B.weight"),
                    vec![*out, r],
                    values(out * r, 2 * i + 1),
                ),
            ]
        })
        .collect()
}

const ALL: [(&str, usize, usize); 3] = [("0", 4, 3), ("3", 4, 4), ("5", 2, 4)];

/// An adapter directory `dir/name` with `config` and `tensors`.
fn adapter(
    dir: &Path,
    name: &str,
    config: &Value,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("adapter_config.json"), config.to_string()).unwrap();
    let t: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(k, s, v)| (k.as_str(), s.clone(), v.clone()))
        .collect();
    write_f32(&d.join("adapter_model.safetensors"), &t);
    d
}

/// Which Linears have an adapter after loading, by name.
fn adapted(m: &Sequential) -> Vec<String> {
    m.linears()
        .filter(|l| l.lora.is_some())
        .map(|l| l.name.clone())
        .collect()
}

/// Linear `index`'s B as loaded (PEFT's scaling folded in).
fn b_of(m: &Sequential, index: usize) -> Vec<f32> {
    let l = m.linears().nth(index).unwrap();
    l.lora.as_ref().unwrap().b.value().data().to_vec()
}

fn with(base: &Value, edits: Value) -> Value {
    let mut c = base.clone();
    for (k, v) in edits.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn base_config() -> Value {
    json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0", "3", "5"],
           "bias": "none", "lora_dropout": 0.0})
}

/// Loading must fail with a message holding every one of `parts`; the model is left as it was.
fn fails(
    dir: &Path,
    name: &str,
    config: Value,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    parts: &[&str],
) {
    let d = adapter(dir, name, &config, tensors);
    let mut m = model(dir);
    let e = m.load_adapter(&d).unwrap_err().to_string();
    for p in parts {
        assert!(e.contains(p), "{name}: `{p}` not in: {e}");
    }
    assert!(
        adapted(&m).is_empty(),
        "{name}: a failed load changed the model"
    );
}

#[test]
fn absent_settings_take_lora_configs_defaults() {
    let dir = tempdir("defaults");
    let tensors = lora(2, &ALL);
    // No lora_alpha: PEFT's default 8, so B is scaled 8 / r = 4 (not 1).
    let d = adapter(
        &dir,
        "no_alpha",
        &with(&base_config(), json!({"lora_alpha": null})),
        &tensors,
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    let want: Vec<f32> = values(8, 1).iter().map(|v| v * 4.0).collect();
    assert_eq!(b_of(&m, 0), want);
    // With use_rslora: 8 / √2.
    let d = adapter(
        &dir,
        "no_alpha_rslora",
        &with(
            &base_config(),
            json!({"lora_alpha": null, "use_rslora": true}),
        ),
        &tensors,
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    let scale = (8.0f64 / 2f64.sqrt()) as f32;
    let want: Vec<f32> = values(8, 1).iter().map(|v| v * scale).collect();
    assert_eq!(b_of(&m, 0), want);
    // No r: PEFT's default 8 (tensors of rank 8), scale lora_alpha / 8.
    let d = adapter(
        &dir,
        "no_r",
        &with(&base_config(), json!({"r": null, "lora_alpha": 4})),
        &lora(8, &ALL),
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    let l = m.linears().next().unwrap().lora.clone().unwrap();
    assert_eq!(l.a.value().shape(), [8, 3]);
    let want: Vec<f32> = values(32, 1).iter().map(|v| v * 0.5).collect();
    assert_eq!(b_of(&m, 0), want);
    // ... and rank-2 tensors then are a shape error naming the key.
    fails(
        &dir,
        "no_r_rank2",
        with(&base_config(), json!({"r": null})),
        &tensors,
        &["base_model.model.0.lora_A.weight", "[8, 3]", "[2, 3]"],
    );
    // No bias, no use_rslora: "none" and false.
    let d = adapter(
        &dir,
        "minimal",
        &json!({"peft_type": "LORA", "r": 2, "target_modules": ["0"]}),
        &tensors,
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    assert_eq!(adapted(&m), ["0"]);
    let want: Vec<f32> = values(8, 1).iter().map(|v| v * 4.0).collect();
    assert_eq!(b_of(&m, 0), want);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn only_the_target_modules_are_adapted() {
    let dir = tempdir("targets");
    let tensors = lora(2, &ALL);
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        ("list_one", json!({"target_modules": ["0"]}), vec!["0"]),
        (
            "list_two",
            json!({"target_modules": ["5", "0"]}),
            vec!["0", "5"],
        ),
        // An entry that matches nothing beside one that matches (PEFT: no error).
        (
            "list_extra",
            json!({"target_modules": ["3", "fc"]}),
            vec!["3"],
        ),
        ("exclude", json!({"exclude_modules": ["3"]}), vec!["0", "5"]),
        (
            "exclude_regex",
            json!({"exclude_modules": "[05]"}),
            vec!["3"],
        ),
        // A regex must match the whole name.
        ("regex", json!({"target_modules": "[03]"}), vec!["0", "3"]),
        (
            "regex_alt",
            json!({"target_modules": "0|5"}),
            vec!["0", "5"],
        ),
        // Every Linear, the last one included, as PEFT does for a plain nn.Sequential.
        (
            "all_linear",
            json!({"target_modules": "all-linear"}),
            vec!["0", "3", "5"],
        ),
        (
            "all_linear_case",
            json!({"target_modules": "ALL-Linear"}),
            vec!["0", "3", "5"],
        ),
        (
            "all_linear_exclude",
            json!({"target_modules": "all-linear", "exclude_modules": ["5"]}),
            vec!["0", "3"],
        ),
        // Empty exclusions and layer lists are PEFT's "none".
        (
            "empty_lists",
            json!({"exclude_modules": [], "layers_to_transform": [], "layers_pattern": null}),
            vec!["0", "3", "5"],
        ),
    ];
    for (name, edits, want) in cases {
        let d = adapter(&dir, name, &with(&base_config(), edits), &tensors);
        let mut m = model(&dir);
        m.load_adapter(&d).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(adapted(&m), want, "{name}");
    }
    // PEFT never puts LoRA on a module it saves whole (the file then holds the module's
    // tensors); the file's LoRA tensors for it are ignored.
    let mut with_saved = tensors.clone();
    with_saved.push(("base_model.model.5.weight".into(), vec![2, 4], values(8, 2)));
    with_saved.push(("base_model.model.5.bias".into(), vec![2], values(2, 3)));
    let d = adapter(
        &dir,
        "modules_to_save",
        &with(&base_config(), json!({"modules_to_save": ["5"]})),
        &with_saved,
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    assert_eq!(adapted(&m), ["0", "3"]);
    // The adapted layer gets the file's values, the others compute as without an adapter.
    let d = adapter(
        &dir,
        "only0",
        &with(&base_config(), json!({"target_modules": ["0"]})),
        &tensors,
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    assert_eq!(b_of(&m, 0), values(8, 1));
    // A prefixed model: a list entry matches the end of the name after a dot.
    let path = dir.join("prefixed.safetensors");
    write_f32(
        &path,
        &[
            ("net.0.weight", vec![4, 3], values(12, 1)),
            ("net.2.weight", vec![2, 4], values(8, 2)),
        ],
    );
    let mut m = Sequential::from_state_dict(
        &Checkpoint::open(&path).unwrap(),
        &SequentialOptions::new()
            .prefix("net.")
            .activation(Activation::Relu),
    )
    .unwrap();
    let t = lora(2, &[("net.0", 4, 3), ("net.2", 2, 4)]);
    let d = adapter(
        &dir,
        "prefixed",
        &with(&base_config(), json!({"target_modules": ["2"]})),
        &t,
    );
    m.load_adapter(&d).unwrap();
    assert_eq!(adapted(&m), ["net.2"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn targets_that_are_not_linears_or_match_nothing_are_errors() {
    let dir = tempdir("bad_targets");
    let tensors = lora(2, &ALL);
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        // The LayerNorm at 2 and the ReLU in the gap at 1.
        (
            "layer_norm",
            json!({"target_modules": ["0", "2"]}),
            vec!["target_modules", "`2`", "not a Linear"],
        ),
        (
            "relu",
            json!({"target_modules": ["1"]}),
            vec!["target_modules", "`1`", "not a Linear"],
        ),
        (
            "regex_all",
            json!({"target_modules": ".*"}),
            vec!["target_modules", "\".*\"", "not a Linear"],
        ),
        // Nothing matches.
        (
            "nothing",
            json!({"target_modules": ["fc1", "9"]}),
            vec!["target_modules", "fc1", "selects no Linear"],
        ),
        (
            "regex_prefix_only",
            json!({"target_modules": "0."}),
            vec!["target_modules", "selects no Linear"],
        ),
        (
            "empty",
            json!({"target_modules": []}),
            vec!["target_modules", "selects no Linear"],
        ),
        (
            "all_excluded",
            json!({"target_modules": ["0"], "exclude_modules": ["0"]}),
            vec!["target_modules", "exclude_modules", "selects no Linear"],
        ),
        // Missing or malformed.
        (
            "missing",
            json!({"target_modules": null}),
            vec!["target_modules", "missing"],
        ),
        (
            "number",
            json!({"target_modules": 3}),
            vec!["target_modules", "3"],
        ),
        (
            "bad_regex",
            json!({"target_modules": "(0"}),
            vec!["target_modules", "(0"],
        ),
        (
            "bad_exclude",
            json!({"exclude_modules": [1]}),
            vec!["exclude_modules"],
        ),
        // A layer pattern without the layers it picks (LoraConfig's own error).
        (
            "layers_pattern",
            json!({"layers_pattern": "layers", "layers_to_transform": null}),
            vec!["layers_pattern"],
        ),
    ];
    for (name, edits, mut parts) in cases {
        parts.push("adapter_config.json");
        fails(&dir, name, with(&base_config(), edits), &tensors, &parts);
    }
    // An explicit null is no value (PEFT's default stands only for an absent setting).
    let mut config = base_config();
    config["lora_alpha"] = Value::Null;
    fails(
        &dir,
        "null_alpha",
        config,
        &tensors,
        &["lora_alpha", "adapter_config.json"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn lora_tensors_of_modules_not_targeted_are_ignored_unless_nothing_loads() {
    let dir = tempdir("ignored");
    // Tensors for 0 and 3 (and for the LayerNorm at 2, which PEFT would never write), target 0.
    let mut tensors = lora(2, &ALL[..2]);
    tensors.extend(lora(2, &[("2", 4, 4)]));
    let d = adapter(
        &dir,
        "ignored",
        &with(&base_config(), json!({"target_modules": ["0"]})),
        &tensors,
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    assert_eq!(adapted(&m), ["0"]);
    // Targeting 5, which the file has nothing for: nothing to load, an error naming what the
    // file holds.
    fails(
        &dir,
        "none_targeted",
        with(&base_config(), json!({"target_modules": ["5"]})),
        &tensors,
        &[
            "no LoRA tensors",
            "base_model.model.0.lora_A.weight",
            "target_modules",
        ],
    );
    // A module that is not in the model at all is still an error naming the key.
    let mut stray = lora(2, &ALL);
    stray.extend(lora(2, &[("7", 4, 4)]));
    fails(
        &dir,
        "stray",
        base_config(),
        &stray,
        &["base_model.model.7.lora_", "does not match"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `layers_to_transform` as PEFT applies it: only to modules a list of names selects by a
/// dotted suffix (a transformer's `model.layers.3.fc`), the index found after the first two
/// components or after `layers_pattern`; names selected whole (every Linear of a Sequential)
/// are not filtered. A pattern without indexes, or either with a string `target_modules`, is
/// an error as in `LoraConfig`.
#[test]
fn layers_to_transform_filters_suffix_matched_targets_as_peft() {
    use nibble_nn::peft::AdapterConfig;
    let dir = tempdir("layers");
    let read = |name: &str, config: Value| {
        let d = adapter(&dir, name, &config, &lora(2, &ALL));
        AdapterConfig::read(&d)
    };
    let c = read(
        "suffix",
        with(
            &base_config(),
            json!({"target_modules": ["fc"], "layers_to_transform": [1, 3]}),
        ),
    )
    .unwrap();
    assert!(c.targets("model.layers.1.fc", &[]));
    assert!(c.targets("model.layers.3.fc", &[]));
    assert!(!c.targets("model.layers.2.fc", &[]));
    // No layer index where the default rule looks: not adapted.
    assert!(!c.targets("top.fc", &[]));
    let c = read(
        "one_index",
        with(
            &base_config(),
            json!({"target_modules": ["fc"], "layers_to_transform": 2,
                   "layers_pattern": ["blocks", "h"]}),
        ),
    )
    .unwrap();
    assert!(c.targets("net.blocks.2.fc", &[]));
    assert!(c.targets("transformer.h.2.fc", &[]));
    assert!(!c.targets("net.layers.2.fc", &[]));
    assert!(!c.targets("net.blocks.1.fc", &[]));
    // A Sequential's Linears are selected whole: every target stays adapted.
    let d = adapter(
        &dir,
        "sequential",
        &with(&base_config(), json!({"layers_to_transform": [0]})),
        &lora(2, &ALL),
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    assert_eq!(adapted(&m), ["0", "3", "5"]);
    let e = read(
        "pattern_alone",
        with(&base_config(), json!({"layers_pattern": "layers"})),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`layers_pattern` is set without `layers_to_transform`"),
        "{e}"
    );
    let e = read(
        "string_target",
        with(
            &base_config(),
            json!({"target_modules": ".*", "layers_to_transform": [0]}),
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("cannot be used when `target_modules` is a string"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `nn.Sequential(Linear(3, 4), BatchNorm1d(4), ReLU(), Linear(4, 2))` in `dir`.
fn model_with_batch_norm(dir: &Path, bn_bias: &[f32]) -> Sequential {
    let path = dir.join(format!("bn_model_{}.safetensors", bn_bias[0].to_bits()));
    write_f32(
        &path,
        &[
            ("0.weight", vec![4, 3], values(12, 1)),
            ("0.bias", vec![4], values(4, 2)),
            ("1.weight", vec![4], vec![1.0, 0.9, 1.1, 1.2]),
            ("1.bias", vec![4], bn_bias.to_vec()),
            ("1.running_mean", vec![4], values(4, 3)),
            ("1.running_var", vec![4], vec![0.5, 1.5, 2.0, 0.25]),
            ("3.weight", vec![2, 4], values(8, 4)),
            ("3.bias", vec![2], values(2, 5)),
        ],
    );
    let file = Checkpoint::open(&path).unwrap();
    Sequential::from_state_dict(
        &file,
        &SequentialOptions::new().activation(Activation::Relu),
    )
    .unwrap()
}

/// A BatchNorm's tensors in an adapter file (PEFT saves its bias under `bias = "all"`, and
/// all its tensors for `modules_to_save`) replace the model's: the output is that of the
/// model whose state dict holds them. A BatchNorm named by `modules_to_save` must have its
/// tensors in the file (PEFT's KeyError), and a negative variance is an error.
#[test]
fn batch_norm_tensors_in_an_adapter_replace_the_models() {
    let dir = tempdir("batch_norm");
    let old_bias = values(4, 7);
    let new_bias = vec![0.25, -0.5, 0.75, -1.0];
    let targets = [("0", 4, 3), ("3", 2, 4)];
    let config = with(
        &base_config(),
        json!({"target_modules": ["0", "3"], "bias": "all"}),
    );
    let mut tensors = lora(2, &targets);
    tensors.push(("base_model.model.1.bias".into(), vec![4], new_bias.clone()));
    let d = adapter(&dir, "bias_all", &config, &tensors);
    let mut m = model_with_batch_norm(&dir, &old_bias);
    m.load_adapter(&d).unwrap();
    let d_plain = adapter(&dir, "plain", &config, &lora(2, &targets));
    let mut want = model_with_batch_norm(&dir, &new_bias);
    want.load_adapter(&d_plain).unwrap();
    let x = nibble_tensor::Tensor::from_vec(&[2, 3], values(6, 5)).unwrap();
    let (y, y_want) = (m.infer(&x).unwrap(), want.infer(&x).unwrap());
    assert_eq!(y.data(), y_want.data());
    let before = model_with_batch_norm(&dir, &old_bias).infer(&x).unwrap();
    assert_ne!(before.data(), y.data(), "the adapter changed nothing");

    // modules_to_save = ["1"]: every tensor of the BatchNorm must be in the file.
    let saved = with(
        &base_config(),
        json!({"target_modules": ["0", "3"], "modules_to_save": ["1"]}),
    );
    let mut partial = lora(2, &targets);
    partial.push(("base_model.model.1.weight".into(), vec![4], vec![1.0; 4]));
    partial.push(("base_model.model.1.bias".into(), vec![4], new_bias.clone()));
    partial.push((
        "base_model.model.1.running_mean".into(),
        vec![4],
        vec![0.0; 4],
    ));
    let d = adapter(&dir, "partial", &saved, &partial);
    let mut m = model_with_batch_norm(&dir, &old_bias);
    let e = m.load_adapter(&d).unwrap_err().to_string();
    assert!(e.contains("base_model.model.1.running_var"), "{e}");
    assert!(adapted(&m).is_empty(), "a failed load changed the model");
    let mut negative = partial.clone();
    negative.push((
        "base_model.model.1.running_var".into(),
        vec![4],
        vec![1.0, -0.5, 1.0, 1.0],
    ));
    let d = adapter(&dir, "negative", &saved, &negative);
    let e = model_with_batch_norm(&dir, &old_bias)
        .load_adapter(&d)
        .unwrap_err()
        .to_string();
    assert!(e.contains("running_var") && e.contains("-0.5"), "{e}");
    let mut full = partial;
    full.push((
        "base_model.model.1.running_var".into(),
        vec![4],
        vec![1.0, 2.0, 0.5, 1.0],
    ));
    let d = adapter(&dir, "full", &saved, &full);
    model_with_batch_norm(&dir, &old_bias)
        .load_adapter(&d)
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// PEFT wraps for `modules_to_save` the modules whose names end with an entry (a plain
/// suffix), and needs their tensors: a LayerNorm named without them in the file is an error;
/// an entry that ends no module's name (`"[2]"`, a regex to PEFT's LoRA exclusion only) wraps
/// nothing and needs nothing.
#[test]
fn modules_to_save_need_their_tensors_where_peft_wraps_them() {
    let dir = tempdir("mts");
    fails(
        &dir,
        "layer_norm_missing",
        with(&base_config(), json!({"modules_to_save": ["2"]})),
        &lora(2, &ALL),
        &["modules_to_save", "base_model.model.2.weight"],
    );
    let d = adapter(
        &dir,
        "regex_like",
        &with(&base_config(), json!({"modules_to_save": ["[2]"]})),
        &lora(2, &ALL),
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    assert_eq!(adapted(&m), ["0", "3", "5"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Initializations that PEFT redoes on load and subtracts from the base weights (PiSSA, CorDA,
/// OLoRA, LoftQ, LoRA-GA) are refused naming the setting and the conversion PEFT offers; those
/// that leave the base alone (true, false, gaussian, eva, orthogonal, mica) load.
#[test]
fn initializations_that_change_the_base_are_refused() {
    let dir = tempdir("init");
    let tensors = lora(2, &ALL);
    for init in [
        "pissa",
        "pissa_niter_4",
        "corda",
        "OLoRA",
        "loftq",
        "lora_ga",
    ] {
        let config = with(&base_config(), json!({ "init_lora_weights": init }));
        fails(
            &dir,
            &format!("init_{init}"),
            config,
            &tensors,
            &[
                "init_lora_weights",
                init,
                "path_initial_model_for_weight_conversion",
            ],
        );
    }
    for init in [
        json!(true),
        json!(false),
        json!("gaussian"),
        json!("eva"),
        json!("orthogonal"),
        json!("mica"),
    ] {
        let config = with(&base_config(), json!({ "init_lora_weights": init }));
        let d = adapter(&dir, "init_ok", &config, &tensors);
        let mut m = model(&dir);
        m.load_adapter(&d).unwrap_or_else(|e| panic!("{init}: {e}"));
        assert_eq!(adapted(&m), ["0", "3", "5"], "{init}");
    }
}

/// Settings of LoRA variants whose forward is not `B A x` are refused when set, and ignored when
/// null, false or empty (as PEFT writes them unset).
#[test]
fn lora_variants_nibble_does_not_compute_are_refused() {
    let dir = tempdir("variants");
    let tensors = lora(2, &ALL);
    for (name, set) in [
        ("alora_invocation_tokens", json!([1, 2])),
        ("arrow_config", json!({"top_k": 2})),
        ("velora_config", json!({"rank": 4})),
        ("monteclora_config", json!({"n": 1})),
        ("use_bdlora", json!(true)),
        ("kasa_config", json!({})),
        ("trainable_token_indices", json!([0])),
    ] {
        let unset = if set.is_boolean() {
            json!(false)
        } else {
            Value::Null
        };
        let d = adapter(
            &dir,
            "unset",
            &with(&base_config(), json!({ name: unset })),
            &tensors,
        );
        let mut m = model(&dir);
        m.load_adapter(&d)
            .unwrap_or_else(|e| panic!("{name} unset: {e}"));
        if set.as_object().is_some_and(|o| o.is_empty()) {
            continue;
        }
        fails(
            &dir,
            name,
            with(&base_config(), json!({ name: set })),
            &tensors,
            &[name, "variant"],
        );
    }
}

/// A DoRA magnitude whose scale over its row's norm overflows f32 (finite values: 3e38 over a
/// norm below 1) is an error naming the layer and the row when the adapter loads; it ran as
/// infinite outputs.
#[test]
fn a_dora_scale_that_overflows_is_refused() {
    let dir = tempdir("dora_overflow");
    let mut tensors = lora(2, &ALL);
    for (m, out, _) in ALL {
        let mut magnitude = vec![1.0f32; out];
        if m == "3" {
            magnitude[1] = 3e38;
        }
        tensors.push((
            format!("base_model.model.{m}.lora_magnitude_vector"),
            vec![out],
            magnitude,
        ));
    }
    fails(
        &dir,
        "overflow",
        with(&base_config(), json!({"use_dora": true})),
        &tensors,
        &["layer `3`", "row 1", "not finite"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A loaded adapter that put something into the base (a lora_B bias folded into the layer's
/// bias here) makes saving the model's adapters an error naming the key, and nothing is
/// written: the adapter file would hold the LoRA tensors only, and lose it.
#[test]
fn saving_after_an_adapter_changed_the_base_is_refused() {
    let dir = tempdir("save_after_base");
    let mut tensors = lora(2, &ALL);
    for (m, out, _) in ALL {
        tensors.push((
            format!("base_model.model.{m}.lora_B.bias"),
            vec![out],
            values(out, 9),
        ));
    }
    let d = adapter(
        &dir,
        "lora_bias",
        &with(&base_config(), json!({"lora_bias": true})),
        &tensors,
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    let saved = dir.join("saved");
    let e = m.save_adapter(&saved).unwrap_err().to_string();
    assert!(
        e.contains("base_model.model.0.lora_B.bias") && e.contains("nothing was written"),
        "{e}"
    );
    assert!(!saved.join("adapter_config.json").exists());
    // A plain adapter saves.
    let d = adapter(&dir, "plain", &base_config(), &lora(2, &ALL));
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    m.save_adapter(&saved).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// `lora_dropout` is read (absent or null: 0) so that training can say it does not apply it;
/// a value that is no probability is an error naming the setting, as `nn.Dropout` refuses it.
#[test]
fn lora_dropout_is_read_and_checked() {
    use nibble_nn::peft::AdapterConfig;
    let dir = tempdir("dropout");
    let read = |name: &str, extra: Value| {
        let d = adapter(&dir, name, &with(&base_config(), extra), &lora(2, &ALL));
        AdapterConfig::read(&d)
    };
    let dropout = |v: Value| read("ok", json!({ "lora_dropout": v })).unwrap().dropout;
    assert_eq!(dropout(json!(0.1)), 0.1);
    assert_eq!(dropout(json!(0)), 0.0);
    assert_eq!(dropout(Value::Null), 0.0);
    for bad in [json!(1.5), json!(-0.1), json!("0.1")] {
        let e = read("bad", json!({ "lora_dropout": bad }))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lora_dropout") && e.contains("probability"),
            "{e}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `rank_pattern` / `alpha_pattern` keys are compiled once, as one bounded set: a config of
/// many costly regexes (63 KB: 2,000 keys such as `\w{1000}`) is an error naming the setting
/// (each key was compiled again at every look-up, under the regex crate's 10 MiB limit a
/// regex: minutes), and many plain keys still load.
#[test]
fn many_or_costly_rank_patterns_are_refused_or_read() {
    use nibble_nn::peft::AdapterConfig;
    let dir = tempdir("patterns");
    let read = |name: &str, extra: Value| {
        let d = adapter(&dir, name, &with(&base_config(), extra), &lora(2, &ALL));
        AdapterConfig::read(&d)
    };
    let costly: serde_json::Map<String, Value> = (0..2000)
        .map(|i| (format!("\\w{{{}}}", 200 + i), json!(4)))
        .collect();
    let e = read("costly", json!({ "rank_pattern": costly }))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank_pattern") && e.contains("limit"), "{e}");
    let many: serde_json::Map<String, Value> =
        (0..3000).map(|i| (format!("x{i}"), json!(4))).collect();
    let c = read(
        "many",
        json!({ "rank_pattern": many, "alpha_pattern": {"x1": 2} }),
    )
    .unwrap();
    assert_eq!((c.rank("0"), c.rank("a.x17"), c.rank("x17b")), (2, 4, 2));
    std::fs::remove_dir_all(&dir).ok();
}

/// A module's rank and alpha come from the first key of `rank_pattern` / `alpha_pattern`, in
/// the file's order, whose regex matches its name, as PEFT's `get_pattern_key` picks them (a
/// plain name matches itself; nibble read the keys sorted and took exact names first): with
/// `{"fc\\d": 3, "fc1": 5}` PEFT gives `fc1` rank 3.
#[test]
fn rank_and_alpha_patterns_are_tried_in_the_files_order() {
    use nibble_nn::peft::AdapterConfig;
    let dir = tempdir("pattern_file_order");
    // Written by hand: the keys' order in the text is the point (a `json!` map is sorted).
    let write = |name: &str, patterns: &str| {
        let d = adapter(&dir, name, &base_config(), &lora(2, &ALL));
        let mut text = serde_json::to_string(&base_config()).unwrap();
        text.pop();
        text.push_str(&format!(",{patterns}}}"));
        std::fs::write(d.join("adapter_config.json"), text).unwrap();
        AdapterConfig::read(&d).unwrap()
    };
    let c = write(
        "regex_first",
        r#""rank_pattern": {"fc\\d": 3, "fc1": 5}, "alpha_pattern": {"z.*": 6, "a.*": 12}"#,
    );
    assert_eq!((c.rank("fc1"), c.rank("m.fc2"), c.rank("other")), (3, 3, 2));
    // alpha `z.*` (6) for `zeta`, `a.*` (12) for `alpha`, the default 2 for `other`.
    assert_eq!(
        (c.scaling("zeta"), c.scaling("alpha"), c.scaling("other")),
        (3.0, 6.0, 1.0)
    );
    let c = write("exact_first", r#""rank_pattern": {"fc1": 5, "fc\\d": 3}"#);
    assert_eq!((c.rank("fc1"), c.rank("m.fc2"), c.rank("other")), (5, 3, 2));
    // Sorted, `f.*` would come first; the file puts `fc.*` first.
    let c = write("unsorted", r#""rank_pattern": {"fc.*": 4, "f.*": 6}"#);
    assert_eq!((c.rank("fc1"), c.rank("f2")), (4, 6));
    std::fs::remove_dir_all(&dir).ok();
}

/// `rank_pattern` / `alpha_pattern` as PEFT 0.21's `get_pattern_key` reads them: the first key
/// in the config's order whose regex `(.*\.)?(key)$` matches the module, with no preference for
/// a key that is the module's whole name; a key nibble cannot compile (Python-only syntax such as
/// a lookbehind) is an error, never a key that matches nothing. Before this, `{".*": 1, "3": 8}`
/// gave module 3 the alpha 8 (PEFT: 1), keys were taken in sorted order instead of the file's,
/// and a lookbehind key was silently skipped: logits 3.1–10.6 off PEFT's on digits classifiers.
#[test]
fn rank_and_alpha_patterns_take_the_first_matching_key_in_file_order() {
    let dir = tempdir("pattern_order");
    let raw = |name: &str, config: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]| {
        let d = adapter(&dir, name, &base_config(), tensors);
        std::fs::write(d.join("adapter_config.json"), config).unwrap();
        d
    };
    let head = r#""peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0", "3", "5"]"#;
    let scaled = |seed: usize, n: usize, s: f32| -> Vec<f32> {
        values(n, seed).iter().map(|v| v * s).collect()
    };
    // A whole-name key after a regex that matches too: the regex's value (PEFT writes its keys
    // sorted, and ".*" sorts before "3").
    let d = raw(
        "exact_after_regex",
        &format!(r#"{{{head}, "alpha_pattern": {{".*": 1, "3": 8}}}}"#),
        &lora(2, &ALL),
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    for (i, seed, n) in [(0, 1, 8), (1, 3, 8), (2, 5, 4)] {
        assert_eq!(b_of(&m, i), scaled(seed, n, 0.5), "Linear {i}");
    }
    // Keys in the file's order, not sorted: "[35]" comes first and names modules 3 and 5.
    let d = raw(
        "unsorted",
        &format!(r#"{{{head}, "alpha_pattern": {{"[35]": 4, "[0-9]": 6}}}}"#),
        &lora(2, &ALL),
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    assert_eq!(b_of(&m, 0), scaled(1, 8, 3.0));
    assert_eq!(b_of(&m, 1), scaled(3, 8, 2.0));
    assert_eq!(b_of(&m, 2), scaled(5, 4, 2.0));
    // The same for ranks: modules 3 and 5 rank 1, module 0 rank 2 (sorted, ".*" would come
    // first and ask rank 2 of all).
    let mut tensors = lora(2, &ALL[..1]);
    tensors.extend(lora(1, &ALL[1..]));
    let d = raw(
        "unsorted_ranks",
        &format!(r#"{{{head}, "rank_pattern": {{"[35]": 1, ".*": 2}}}}"#),
        &tensors,
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    let ranks: Vec<usize> = m
        .linears()
        .map(|l| l.lora.as_ref().unwrap().a.value().shape()[0])
        .collect();
    assert_eq!(ranks, [2, 1, 1]);
    // A key that is no regex nibble reads: an error naming it, not the default alpha.
    let d = raw(
        "lookbehind",
        &format!(r#"{{{head}, "alpha_pattern": {{"(?<=x)3": 8}}}}"#),
        &lora(2, &ALL),
    );
    let mut m = model(&dir);
    let e = m.load_adapter(&d).unwrap_err().to_string();
    assert!(
        e.contains("alpha_pattern") && e.contains("(?<=x)3") && e.contains("not a regex"),
        "{e}"
    );
    assert!(adapted(&m).is_empty());
    // Keys that both regex engines accept but read differently: a POSIX class or a nested
    // class, a set operation. Rust matched other modules than Python (logits up to 1.5 off
    // PEFT's); now each is an error naming the setting and the key, in every setting PEFT reads
    // as a regex.
    for (setting, key) in [
        ("alpha_pattern", "[[:digit:]]"),
        ("rank_pattern", "[0-9--3]"),
        ("alpha_pattern", "[0-9&&[35]]"),
    ] {
        let d = raw(
            "python_differs",
            &format!(r#"{{{head}, "{setting}": {{"{key}": 8}}}}"#),
            &lora(2, &ALL),
        );
        let e = model(&dir).load_adapter(&d).unwrap_err().to_string();
        assert!(
            e.contains(setting) && e.contains(key) && e.contains("Python"),
            "{setting} {key}: {e}"
        );
    }
    for (setting, value) in [
        ("target_modules", r#""[[:digit:]]""#),
        ("exclude_modules", r#""[0-9--5]""#),
        ("modules_to_save", r#"["[[:digit:]]"]"#),
        ("layers_pattern", r#""[a-z&&[xy]]""#),
    ] {
        let config = if setting == "target_modules" {
            format!(
                r#"{{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": {value}}}"#
            )
        } else {
            format!(r#"{{{head}, "{setting}": {value}}}"#)
        };
        let d = raw("python_differs_select", &config, &lora(2, &ALL));
        let e = model(&dir).load_adapter(&d).unwrap_err().to_string();
        assert!(
            e.contains(setting) && e.contains("Python"),
            "{setting}: {e}"
        );
    }
    // The constructs both read alike stay: a `]` first, a range, an escaped `[`, a `-` at the end.
    let d = raw(
        "python_alike",
        &format!(r#"{{{head}, "alpha_pattern": {{"[]x]|[0-9]|\\[|[3-]": 4}}}}"#),
        &lora(2, &ALL),
    );
    model(&dir).load_adapter(&d).unwrap();
    // An inline flag Python reads as PEFT's matcher does: `(?i)` (it was refused, naming a
    // feature of the regex crate).
    let d = raw(
        "inline_flag",
        &format!(r#"{{{head}, "alpha_pattern": {{"(?i)3": 4}}}}"#),
        &lora(2, &ALL),
    );
    let mut m = model(&dir);
    m.load_adapter(&d).unwrap();
    assert_eq!(b_of(&m, 1), scaled(3, 8, 2.0));
    assert_eq!(b_of(&m, 0), scaled(1, 8, 1.0));
    std::fs::remove_dir_all(&dir).ok();
}

/// `save_adapter` names its targets so that PEFT adapts exactly the Linears nibble trained. A
/// list entry selects every module whose name ends in `.<entry>`: for blocks
/// `Sequential(Linear, BatchNorm1d, ReLU)` followed by a head (`0.0`, `1.0`, `2`), the entry
/// `2` also names the ReLUs `0.2` and `1.2`, which the state dict does not show, and
/// `PeftModel.from_pretrained` refused the adapter. Linears at different depths are therefore
/// written as one regex of their whole names; Linears at one depth keep the list.
#[test]
fn saved_targets_name_only_the_linears_where_they_sit_at_different_depths() {
    let dir = tempdir("save_depths");
    let path = dir.join("blocks.safetensors");
    write_f32(
        &path,
        &[
            ("0.0.weight", vec![4, 3], values(12, 1)),
            ("0.0.bias", vec![4], values(4, 2)),
            ("1.0.weight", vec![4, 4], values(16, 3)),
            ("1.0.bias", vec![4], values(4, 4)),
            ("2.weight", vec![2, 4], values(8, 5)),
            ("2.bias", vec![2], values(2, 6)),
        ],
    );
    let file = Checkpoint::open(&path).unwrap();
    let mut m = Sequential::from_state_dict(
        &file,
        &SequentialOptions::new().activation(Activation::Relu),
    )
    .unwrap();
    m.add_lora(2, 3).unwrap();
    let saved = dir.join("adapter");
    m.save_adapter(&saved).unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(saved.join("adapter_config.json")).unwrap()).unwrap();
    let target = config["target_modules"].as_str().expect("a regex string");
    assert_eq!(target, r"^(0\.0|1\.0|2)$");
    // Python's re.fullmatch and nibble read it alike: these names and no other.
    let re = regex_lite_fullmatch(target);
    for (name, want) in [
        ("0.0", true),
        ("1.0", true),
        ("2", true),
        ("0.2", false),
        ("1.2", false),
        ("x2", false),
    ] {
        assert_eq!(re(name), want, "{name}");
    }
    // It reads back onto the same model with every Linear adapted.
    let mut back = Sequential::from_state_dict(
        &file,
        &SequentialOptions::new().activation(Activation::Relu),
    )
    .unwrap();
    back.load_adapter(&saved).unwrap();
    assert_eq!(adapted(&back), ["0.0", "1.0", "2"]);
    for (a, b) in m.linears().zip(back.linears()) {
        let (la, lb) = (a.lora.as_ref().unwrap(), b.lora.as_ref().unwrap());
        assert_eq!(la.a.value().data(), lb.a.value().data());
        assert_eq!(la.b.value().data(), lb.b.value().data());
    }
    // Linears at one depth (an nn.Sequential) keep the plain list.
    let mut flat = model(&dir);
    flat.add_lora(2, 3).unwrap();
    let saved = dir.join("adapter_flat");
    flat.save_adapter(&saved).unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(saved.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["target_modules"], json!(["0", "3", "5"]));
    std::fs::remove_dir_all(&dir).ok();
}

/// Layers of several ranks are saved with a `rank_pattern` (and an `alpha_pattern` of the same
/// ranks: B holds the scaling) naming the layers off the most common rank, and read back with
/// the same ranks and values; saving them failed before. Where the Linears sit at different
/// depths a key could name another layer too (`0` names `1.0`), and saving is an error that
/// writes nothing.
#[test]
fn layers_of_several_ranks_save_with_a_rank_pattern() {
    let dir = tempdir("save_ranks");
    let mut flat = model(&dir);
    flat.add_lora(4, 3).unwrap();
    let mut rng = nibble_tensor::Rng::new(9);
    flat.linears_mut()
        .nth(1)
        .unwrap()
        .add_lora(2, &mut rng)
        .unwrap();
    let saved = dir.join("adapter_ranks");
    flat.save_adapter(&saved).unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(saved.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], json!(4));
    assert_eq!(config["rank_pattern"], json!({"3": 2}));
    assert_eq!(config["alpha_pattern"], json!({"3": 2}));
    let mut back = model(&dir);
    back.load_adapter(&saved).unwrap();
    for (a, b) in flat.linears().zip(back.linears()) {
        let (la, lb) = (a.lora.as_ref().unwrap(), b.lora.as_ref().unwrap());
        assert_eq!(la.rank(), lb.rank(), "{}", a.name);
        assert_eq!(la.a.value().data(), lb.a.value().data());
        assert_eq!(la.b.value().data(), lb.b.value().data());
        assert_eq!(lb.b_scale, 1.0);
    }
    let path = dir.join("blocks.safetensors");
    write_f32(
        &path,
        &[
            ("0.weight", vec![4, 3], values(12, 1)),
            ("1.0.weight", vec![2, 4], values(8, 5)),
        ],
    );
    let file = Checkpoint::open(&path).unwrap();
    let options = SequentialOptions::new().activation(Activation::Relu);
    let mut m = Sequential::from_state_dict(&file, &options).unwrap();
    m.add_lora(2, 3).unwrap();
    m.linears_mut()
        .next()
        .unwrap()
        .add_lora(3, &mut rng)
        .unwrap();
    let saved = dir.join("adapter_depths");
    let e = m.save_adapter(&saved).unwrap_err().to_string();
    assert!(e.contains("rank") && e.contains("depths"), "{e}");
    assert!(!saved.join("adapter_config.json").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// A PEFT adapter whose scaling is not 1 (`lora_alpha / r`, rsLoRA's `alpha / √r`, an
/// `alpha_pattern`, a negative alpha) is saved as PEFT holds it: B without the scaling folded
/// in at load, and each layer's alpha `s · r`, so that PEFT's scaling is the same `s`. The
/// file loads back to the same scaling and the same folded B; PEFT training on from it steps
/// as it would on the original. Before, B was saved with `s` in it and alpha `r`: the same
/// outputs, but Adam's steps on that B were `1 / s` of PEFT's (a resumed run's loss 0.74
/// against 0.95 after one step).
#[test]
fn scaled_adapters_save_their_scaling_as_alpha_and_b_without_it() {
    let dir = tempdir("save_scaled");
    let cases = [
        ("alpha", json!({"lora_alpha": 8}), json!(8), None),
        (
            "rslora",
            json!({"lora_alpha": 4, "use_rslora": true}),
            json!(4.0 * 2f64.sqrt() as f32 as f64),
            None,
        ),
        (
            "pattern",
            json!({"lora_alpha": 6, "alpha_pattern": {"3": 1}}),
            json!(6),
            Some(json!({"3": 1})),
        ),
        ("negative", json!({"lora_alpha": -3}), json!(-3), None),
    ];
    for (name, edits, alpha, alpha_pattern) in cases {
        let tensors = lora(2, &ALL);
        let d = adapter(&dir, name, &with(&base_config(), edits), &tensors);
        let mut m = model(&dir);
        m.load_adapter(&d).unwrap();
        let saved = dir.join(format!("{name}_saved"));
        m.save_adapter(&saved).unwrap();
        let config: Value =
            serde_json::from_slice(&std::fs::read(saved.join("adapter_config.json")).unwrap())
                .unwrap();
        let got = config["lora_alpha"].as_f64().unwrap();
        assert!(
            (got - alpha.as_f64().unwrap()).abs() < 1e-6,
            "{name}: lora_alpha {got}, want {alpha}"
        );
        assert_eq!(config["r"], json!(2), "{name}");
        assert_eq!(config.get("rank_pattern"), None, "{name}");
        assert_eq!(
            config.get("alpha_pattern"),
            alpha_pattern.as_ref(),
            "{name}"
        );
        // B as the original file holds it (up to the rounding of folding and unfolding).
        let file = Checkpoint::open(saved.join("adapter_model.safetensors")).unwrap();
        for (key, _, want) in &tensors {
            let got = file.tensor_f32(key, None).unwrap();
            for (g, w) in got.data().iter().zip(want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{name} {key}: {g} against {w}"
                );
            }
        }
        let mut back = model(&dir);
        back.load_adapter(&saved).unwrap();
        for (a, b) in m.linears().zip(back.linears()) {
            let (la, lb) = (a.lora.as_ref().unwrap(), b.lora.as_ref().unwrap());
            assert!(
                (la.b_scale - lb.b_scale).abs() <= 1e-6 * la.b_scale.abs(),
                "{name}"
            );
            for (x, y) in la.b.value().data().iter().zip(lb.b.value().data()) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                    "{name}: {x} against {y}"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `enable_dora` makes fresh adapters DoRA ones as PEFT's `use_dora` creates them: each
/// magnitude the row norms of its weight (so the outputs stay the base's) and trainable. A
/// model without adapters, and a weight with a zero row (whose scale would be 0/0), are
/// errors naming what is wrong, and the second leaves every layer as it was.
#[test]
fn enable_dora_starts_at_the_base_and_refuses_a_zero_row() {
    let dir = tempdir("enable_dora");
    let mut m = model(&dir);
    let e = m.enable_dora().unwrap_err().to_string();
    assert!(e.contains("no layer has one"), "{e}");
    let x = nibble_tensor::Tensor::from_vec(&[2, 3], values(6, 2)).unwrap();
    let base = m.infer(&x).unwrap();
    m.add_lora(2, 3).unwrap();
    let trainable = m.trainable_params().len();
    m.enable_dora().unwrap();
    assert_eq!(m.trainable_params().len(), trainable + 3);
    for l in m.linears() {
        let dora = l.lora.as_ref().unwrap().dora.as_ref().unwrap();
        assert!(dora.magnitude.requires_grad(), "{}", l.name);
        assert!(l.dora_scale().unwrap().unwrap().iter().all(|&s| s == 1.0));
        // The norms are computed once while A, B and the weight stay as they are.
        let norm = l.dora_norm().unwrap().unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&norm, &l.dora_norm().unwrap().unwrap()),
            "{}",
            l.name
        );
        let a = l.lora.as_ref().unwrap().a.clone();
        drop(a.value_mut());
        assert!(
            !std::sync::Arc::ptr_eq(&norm, &l.dora_norm().unwrap().unwrap()),
            "{}",
            l.name
        );
    }
    let dora = m.infer(&x).unwrap();
    let worst = (base.data().iter().zip(dora.data())).fold(0f32, |w, (a, b)| w.max((a - b).abs()));
    assert!(worst < 1e-6, "{worst}");
    let path = dir.join("zero_row.safetensors");
    let mut w = values(16, 4);
    w[8..12].fill(0.0);
    write_f32(
        &path,
        &[
            ("0.weight", vec![4, 3], values(12, 1)),
            ("1.weight", vec![4, 4], w),
        ],
    );
    let options = SequentialOptions::new().activation(Activation::Relu);
    let mut z = Sequential::from_state_dict(&Checkpoint::open(&path).unwrap(), &options).unwrap();
    z.add_lora(2, 3).unwrap();
    let e = z.enable_dora().unwrap_err().to_string();
    assert!(e.contains("layer `1`"), "{e}");
    assert!(e.contains("row 2"), "{e}");
    assert!(z.linears().all(|l| l.lora.as_ref().unwrap().dora.is_none()));
    std::fs::remove_dir_all(&dir).ok();
}

/// Whether `name` matches the whole of `pattern` (Python's `re.fullmatch`).
fn regex_lite_fullmatch(pattern: &str) -> impl Fn(&str) -> bool {
    let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
    move |name| re.is_match(name)
}

/// PEFT saves an adapter named other than "default" in a subfolder of that name
/// (`save_pretrained(DIR)` writes `DIR/myad/...`): given `DIR`, the error names the subfolder
/// to give instead (it said only that `DIR/adapter_config.json` could not be read), and the
/// subfolder loads.
#[test]
fn a_named_adapters_parent_folder_points_at_the_subfolder() {
    let dir = tempdir("named_adapter");
    let parent = dir.join("saved");
    let sub = adapter(&parent, "myad", &base_config(), &lora(2, &ALL));
    let mut m = model(&dir);
    let e = m.load_adapter(&parent).unwrap_err().to_string();
    assert!(
        e.contains("myad") && e.contains("subfolder") && e.contains("saved"),
        "{e}"
    );
    assert!(adapted(&m).is_empty());
    m.load_adapter(&sub).unwrap();
    assert_eq!(adapted(&m).len(), 3);
    // An empty folder still says what is missing.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = model(&dir).load_adapter(&empty).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
