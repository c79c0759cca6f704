//! Layers without a bias (`nn.Linear(.., bias=False)`, `nn.LayerNorm(.., bias=False)`) end to
//! end: PyTorch's logits and loss (`tests/data/seq_bias_free.*`, made by
//! `tools/golden/make_seq_bias_free.py`), a quantized copy that holds no bias either, and a
//! LoRA fine-tune whose adapter round-trips.

mod common;
use common::*;
use nibble_io::Checkpoint;

/// The golden batch as a data file (`x_test`, `y_test`, and the same as the training split).
fn golden_data(dir: &std::path::Path) -> std::path::PathBuf {
    let golden = Checkpoint::open(data("seq_bias_free.safetensors")).unwrap();
    let x = golden.tensor_f32("x", None).unwrap();
    let labels = i64_values(&data("seq_bias_free.safetensors"), "labels");
    let d = dir.join("data.safetensors");
    write(
        &d,
        &[
            f32s("x_test", &[8, 13], x.data()),
            i64s("y_test", &labels),
            f32s("x_train", &[8, 13], x.data()),
            i64s("y_train", &labels),
        ],
    );
    d
}

#[test]
fn bias_free_layers_give_pytorchs_logits_and_stay_bias_free_when_quantized() {
    let dir = tmpdir("bias_free");
    let d = golden_data(&dir);
    let model = data("seq_bias_free.pth");
    let golden = data("seq_bias_free.safetensors");
    let logits = dir.join("logits.safetensors");
    let v = nibble_json(&model_data_args(
        "eval",
        &model,
        &d,
        &["--logits", s(&logits), "--json"],
    ));
    let diff = max_diff(&tensor(&logits, "logits"), &tensor(&golden, "logits"));
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    let loss = tensor(&golden, "loss")[0] as f64;
    assert!(
        (v["rows"][0]["loss"].as_f64().unwrap() - loss).abs() < 1e-5,
        "{v}"
    );
    // Weights and LayerNorm weight only, f32: (13·20 + 20 + 20·9 + 9 + 9·4) · 4 bytes.
    assert_eq!(v["rows"][0]["bytes"], 4 * (260 + 20 + 180 + 9 + 36));

    // Quantized: the file holds no bias the model did not have, and reads back as eval's q4.
    let q4 = dir.join("q4.safetensors");
    nibble(&["quantize", s(&model), "--format", "q4", "--output", s(&q4)]);
    let names: Vec<String> = Checkpoint::open(&q4)
        .unwrap()
        .keys()
        .map(str::to_string)
        .collect();
    assert!(
        names
            .iter()
            .all(|k| k != "0.bias" && k != "2.bias" && k != "5.bias"),
        "{names:?}"
    );
    assert!(names.iter().any(|k| k == "3.bias"), "{names:?}");
    let direct = nibble_json(&model_data_args(
        "eval",
        &model,
        &d,
        &["--format", "q4", "--json"],
    ));
    let stored = nibble_json(&model_data_args("eval", &q4, &d, &["--json"]));
    assert_eq!(direct["rows"][0]["loss"], stored["rows"][0]["loss"]);
    assert_eq!(direct["rows"][0]["accuracy"], stored["rows"][0]["accuracy"]);
}

#[test]
fn a_bias_free_model_fine_tunes_and_its_adapter_round_trips() {
    let dir = tmpdir("bias_free_finetune");
    let d = golden_data(&dir);
    let model = data("seq_bias_free.pth");
    let adapter = dir.join("adapter");
    let v = nibble_json(&model_data_args(
        "finetune",
        &model,
        &d,
        &[
            "--format",
            "nf4",
            "--rank",
            "2",
            "--steps",
            "30",
            "--batch",
            "8",
            "--save-adapter",
            s(&adapter),
            "--json",
        ],
    ));
    let loss = loss_curve(&v);
    assert!(
        loss[loss.len() - 1] < loss[0],
        "loss did not fall: {loss:?}"
    );
    let back = nibble_json(&model_data_args(
        "eval",
        &model,
        &d,
        &["--format", "nf4", "--adapter", s(&adapter), "--json"],
    ));
    assert_eq!(back["rows"][0]["accuracy"], v["accuracy_after"]);
}
