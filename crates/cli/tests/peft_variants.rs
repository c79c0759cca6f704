//! PEFT adapters beyond plain LoRA (`tests/data/peft_variants`, made by PEFT 0.21.2 with
//! `tools/golden/make_peft_variants.py` on the seq_d30 model): per-module ranks and alphas with
//! rsLoRA scaling, `modules_to_save` (a Linear and a LayerNorm replaced), and `bias = "all"` /
//! `"lora_only"` (biases of LoRA targets and of other modules replaced), and both at once.
//! nibble's logits with
//! each loaded must be PEFT's, in f32, and on an f16 base within f16's rounding.

mod common;
use common::*;

/// A data file in `dir` of the golden file's `x` [8, 30] (labels 0, 1, 2, 3, 4, 0, 1, 2).
fn data_of_golden_x(dir: &std::path::Path, golden: &std::path::Path) -> std::path::PathBuf {
    let d = dir.join("data.safetensors");
    write(
        &d,
        &[
            f32s("x_test", &[8, 30], &tensor(golden, "x")),
            i64s("y_test", &[0, 1, 2, 3, 4, 0, 1, 2]),
        ],
    );
    d
}

#[test]
fn peft_variants_give_pefts_logits() {
    let dir = tmpdir("peft_variants");
    let golden = data("peft_variants/logits.safetensors");
    let d = data_of_golden_x(&dir, &golden);
    let model = data("seq_d30.pth");
    let run = |format: &str, adapter: Option<&std::path::Path>, out: &std::path::Path| {
        let mut args = model_data_args(
            "eval",
            &model,
            &d,
            &[
                "--activation",
                "gelu,relu",
                "--format",
                format,
                "--logits",
                s(out),
                "--json",
            ],
        );
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        nibble_json(&args);
        tensor(out, "logits")
    };
    let plain = run("f32", None, &dir.join("plain.safetensors"));
    for (dir_name, name) in [
        ("patterns_rslora", "patterns_rslora"),
        // The same adapter saved with `safe_serialization=False` (`adapter_model.bin`).
        ("patterns_rslora_bin", "patterns_rslora"),
        ("modules_to_save", "modules_to_save"),
        ("bias_all", "bias_all"),
        ("bias_lora_only", "bias_lora_only"),
        // `bias = "all"` with `modules_to_save`: the file also holds the wrappers' inner
        // biases (`5.modules_to_save.bias`, `5.original_module.bias`), which PEFT does not read.
        ("bias_all_modules_to_save", "bias_all_modules_to_save"),
    ] {
        let adapter = data(&format!("peft_variants/{dir_name}"));
        let ours = run(
            "f32",
            Some(&adapter),
            &dir.join(format!("{dir_name}.safetensors")),
        );
        let diff = max_diff(&ours, &tensor(&golden, name));
        assert!(diff < 1e-5, "{name}: logits differ from PEFT's by {diff}");
        // The adapter changes the logits (so the comparison above means something).
        assert!(max_diff(&ours, &plain) > 1e-2, "{name}");
        // On an f16 base the replaced parameters and adapters apply too: the logits are off
        // PEFT's by f16's rounding of the base weights only.
        let want = tensor(&golden, name);
        let half = run(
            "f16",
            Some(&adapter),
            &dir.join(format!("{dir_name}_f16.safetensors")),
        );
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = max_diff(&half, &want);
        assert!(
            diff < 1e-3 * scale,
            "{name} on f16: {diff} (logits up to {scale})"
        );
    }
}

/// The arguments as `&str`s.
fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A DoRA adapter (`tests/data/peft_variants/dora`, made by PEFT 0.21.2 with
/// `tools/golden/make_peft_dora.py`: magnitude vectors on three Linears, one of rank 2, and
/// `bias = "all"`) gives PEFT's logits on an f32 base, and on an f16 base within f16's rounding.
/// Without its magnitude vectors it gives what PEFT gives (`dora_no_magnitude_logits`, made by
/// `tools/golden/make_peft_dora_no_magnitude.py`: PEFT keeps the magnitudes it computed from
/// the base weights), unless `init_lora_weights` starts B·A at random; with `use_dora` off its
/// magnitude vectors are an error naming them (saving a DoRA adapter is refused: the nn crate's
/// golden test).
#[test]
fn a_dora_adapter_gives_pefts_logits() {
    let dir = tmpdir("peft_dora");
    let golden = data("peft_variants/dora_logits.safetensors");
    let want = tensor(&golden, "logits");
    let d = data_of_golden_x(&dir, &golden);
    let model = data("seq_d30.pth");
    let adapter = data("peft_variants/dora");
    let args = |format: &str, adapter: &std::path::Path, out: &std::path::Path| {
        let flags = [
            "--activation",
            "gelu,relu",
            "--format",
            format,
            "--adapter",
            s(adapter),
            "--logits",
            s(out),
            "--json",
        ]
        .map(str::to_string);
        let mut a: Vec<String> = model_data_args("eval", &model, &d, &[])
            .into_iter()
            .map(str::to_string)
            .collect();
        a.extend(flags);
        a
    };
    let logits = |format: &str| {
        let out = dir.join(format!("dora_{format}.safetensors"));
        nibble_json(&strs(&args(format, &adapter, &out)));
        tensor(&out, "logits")
    };
    let diff = max_diff(&logits("f32"), &want);
    assert!(diff < 1e-5, "logits differ from PEFT's by {diff}");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = max_diff(&logits("f16"), &want);
    assert!(diff < 1e-3 * scale, "f16: {diff} (logits up to {scale})");
    // Edited copies: the magnitudes dropped, or `use_dora` turned off.
    let weights = nibble_io::Checkpoint::open(adapter.join("adapter_model.safetensors")).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    let copy =
        |name: &str, keep: &dyn Fn(&str) -> bool, use_dora: bool, init: serde_json::Value| {
            let to = dir.join(name);
            std::fs::create_dir_all(&to).unwrap();
            let entries: Vec<Entry> = entries_of(&weights)
                .into_iter()
                .filter(|e| keep(&e.0))
                .collect();
            write(&to.join("adapter_model.safetensors"), &entries);
            let mut c = config.clone();
            c["use_dora"] = serde_json::json!(use_dora);
            c["init_lora_weights"] = init;
            std::fs::write(to.join("adapter_config.json"), c.to_string()).unwrap();
            to
        };
    let no_magnitude = |name: &str, init: serde_json::Value| {
        copy(name, &|k: &str| !k.contains("magnitude"), true, init)
    };
    let want_filled = tensor(
        &data("peft_variants/dora_no_magnitude_logits.safetensors"),
        "logits",
    );
    for init in [serde_json::json!(true), serde_json::json!("gaussian")] {
        let adapter = no_magnitude("no_magnitude", init.clone());
        let out = dir.join("no_magnitude.safetensors");
        nibble_json(&strs(&args("f32", &adapter, &out)));
        let diff = max_diff(&tensor(&out, "logits"), &want_filled);
        assert!(
            diff < 1e-5,
            "init {init}: logits differ from PEFT's by {diff}"
        );
    }
    // The magnitudes matter: the file's own give other logits.
    assert!(max_diff(&want_filled, &want) > 1e-2);
    for init in [serde_json::json!(false), serde_json::json!("orthogonal")] {
        let adapter = no_magnitude("no_magnitude_random", init.clone());
        let msg = nibble_fails(&strs(&args("f32", &adapter, &dir.join("x.safetensors"))));
        assert!(
            msg.contains("lora_magnitude_vector") && msg.contains("init_lora_weights"),
            "init {init}: {msg}"
        );
    }
    let not_dora = copy("not_dora", &|_| true, false, serde_json::json!(true));
    let msg = nibble_fails(&strs(&args("f32", &not_dora, &dir.join("x.safetensors"))));
    assert!(
        msg.contains("lora_magnitude_vector") && msg.contains("DoRA"),
        "{msg}"
    );
}

/// PEFT's `lora_bias` (`tests/data/peft_variants/lora_bias*`, made by PEFT 0.21.2 with
/// `tools/golden/make_peft_lora_bias.py`): a bias on each lora_B, added with the product and
/// scaled as it is, gives PEFT's logits on a model whose Linears have biases (with rank and
/// alpha patterns) and on one whose Linears 0 and 5 have none (rsLoRA); such adapters were
/// refused. The biases matter (the file without them gives other logits); lora_B biases in a
/// file whose config does not set `lora_bias`, and `lora_bias` with `use_dora`, are errors.
#[test]
fn lora_bias_adapters_give_pefts_logits() {
    let dir = tmpdir("peft_lora_bias");
    let golden = data("peft_variants/lora_bias_logits.safetensors");
    let d30 = dir.join("d30.safetensors");
    write(
        &d30,
        &[
            f32s("x_test", &[8, 30], &tensor(&golden, "x_d30")),
            i64s("y_test", &[0, 1, 2, 3, 4, 0, 1, 2]),
        ],
    );
    let free = dir.join("free.safetensors");
    write(
        &free,
        &[
            f32s("x_test", &[8, 13], &tensor(&golden, "x_free")),
            i64s("y_test", &[0, 1, 2, 3, 3, 2, 1, 0]),
        ],
    );
    // A copy of adapter `name` with the tensors `keep` keeps and the config edited by `edit`.
    let copy = |name: &str, keep: &dyn Fn(&str) -> bool, edit: &dyn Fn(&mut serde_json::Value)| {
        let from = data(&format!("peft_variants/{name}"));
        let to = dir.join(format!("{name}_edited"));
        std::fs::create_dir_all(&to).unwrap();
        let file = nibble_io::Checkpoint::open(from.join("adapter_model.safetensors")).unwrap();
        let entries: Vec<_> = entries_of(&file)
            .into_iter()
            .filter(|e| keep(&e.0))
            .collect();
        write(&to.join("adapter_model.safetensors"), &entries);
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(from.join("adapter_config.json")).unwrap())
                .unwrap();
        edit(&mut config);
        std::fs::write(to.join("adapter_config.json"), config.to_string()).unwrap();
        to
    };
    for (model, d, activations, name) in [
        ("seq_d30.pth", &d30, "gelu,relu", "lora_bias"),
        ("seq_bias_free.pth", &free, "relu,relu", "lora_bias_free"),
    ] {
        let model = data(model);
        let logits = |adapter: &std::path::Path, out: &str| {
            let out = dir.join(out);
            nibble_json(&model_data_args(
                "eval",
                &model,
                d,
                &[
                    "--activation",
                    activations,
                    "--adapter",
                    s(adapter),
                    "--logits",
                    s(&out),
                    "--json",
                ],
            ));
            tensor(&out, "logits")
        };
        let want = tensor(&golden, name);
        let ours = logits(&data(&format!("peft_variants/{name}")), "ours.safetensors");
        let diff = max_diff(&ours, &want);
        assert!(diff < 1e-5, "{name}: logits differ from PEFT's by {diff}");
        let without = copy(name, &|k| !k.ends_with("lora_B.bias"), &|_| {});
        let other = logits(&without, "without.safetensors");
        assert!(
            max_diff(&other, &want) > 1e-2,
            "{name}: the biases change nothing"
        );
        let unset = copy(name, &|_| true, &|c| {
            c["lora_bias"] = serde_json::json!(false)
        });
        let msg = nibble_fails(&model_data_args(
            "eval",
            &model,
            d,
            &["--activation", activations, "--adapter", s(&unset)],
        ));
        assert!(
            msg.contains("lora_B.bias") && msg.contains("`lora_bias` is not set"),
            "{msg}"
        );
        let dora = copy(name, &|_| true, &|c| {
            c["use_dora"] = serde_json::json!(true)
        });
        let msg = nibble_fails(&model_data_args(
            "eval",
            &model,
            d,
            &["--activation", activations, "--adapter", s(&dora)],
        ));
        assert!(msg.contains("lora_bias") && msg.contains("DoRA"), "{msg}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
