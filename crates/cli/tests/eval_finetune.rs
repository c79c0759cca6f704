//! `nibble eval` and `nibble finetune` end to end on the digits classifier and the seq_d30
//! golden model: logits against PyTorch's, the JSON keys, QLoRA training, and adapters that
//! round-trip through the PEFT layout (and match PEFT's own logits).

mod common;
use common::*;
use nibble_io::Checkpoint;

#[test]
fn eval_f32_gives_pytorchs_logits_loss_and_accuracy() {
    let dir = tmpdir("eval_f32");
    let logits = dir.join("logits.safetensors");
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    let v = nibble_json(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--logits", s(&logits), "--json"],
    ));
    assert_eq!(keys(&v), sorted(&["model", "data", "rows"]));
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        keys(&rows[0]),
        sorted(&["format", "accuracy", "loss", "cosine", "bytes"])
    );
    assert_eq!(rows[0]["format"], "f32");
    assert_eq!(rows[0]["bytes"].as_u64().unwrap(), 4 * 2840);
    assert!((rows[0]["cosine"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    let golden = data("digits_mlp_logits.safetensors");
    let (ours, theirs) = (tensor(&logits, "logits"), tensor(&golden, "logits"));
    assert_eq!(ours.len(), 360 * 10);
    let d = max_diff(&ours, &theirs);
    assert!(d < 1e-4, "logits differ from PyTorch's by {d}");
    let loss = tensor(&golden, "loss")[0] as f64;
    assert!(
        (rows[0]["loss"].as_f64().unwrap() - loss).abs() < 1e-5,
        "{v}"
    );
    let labels = Checkpoint::open(&digits).unwrap();
    let y = labels.bytes("y_test").unwrap();
    let hits = theirs
        .chunks(10)
        .zip(y)
        .filter(|(row, &label)| {
            let best = (0..10).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            best == label as usize
        })
        .count();
    assert_eq!(rows[0]["accuracy"].as_f64().unwrap(), hits as f64 / 360.0);
}

#[test]
fn eval_all_gives_one_row_per_format_in_the_issues_order() {
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    let v = nibble_json(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--format", "all", "--json"],
    ));
    let rows = v["rows"].as_array().unwrap();
    let formats: Vec<&str> = rows.iter().map(|r| r["format"].as_str().unwrap()).collect();
    assert_eq!(
        formats,
        ["f32", "f16", "int8", "q4", "nf4", "nf4_dq", "lower"]
    );
    let f32_bytes = rows[0]["bytes"].as_u64().unwrap();
    for r in &rows[1..] {
        let cosine = r["cosine"].as_f64().unwrap();
        assert!(cosine > 0.9 && cosine < 1.0 + 1e-9, "{r}");
        assert!(r["bytes"].as_u64().unwrap() < f32_bytes, "{r}");
        let acc = r["accuracy"].as_f64().unwrap();
        assert!(acc > 0.8 && acc <= 1.0, "{r}");
    }
    assert!(
        rows[1]["cosine"].as_f64().unwrap() > 0.99999,
        "f16: {}",
        rows[1]
    );
    let table = nibble(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--format", "all"],
    ));
    assert!(
        table.ok && table.stdout.contains("nf4_dq"),
        "{}",
        table.stdout
    );
}

#[test]
fn a_safetensors_copy_of_the_model_evaluates_the_same() {
    let dir = tmpdir("eval_st");
    let pth = Checkpoint::open(data("digits_mlp.pth")).unwrap();
    let entries = entries_of(&pth);
    let st = dir.join("digits_mlp.safetensors");
    write(&st, &entries);
    let digits = data("digits.safetensors");
    let a = nibble_json(&model_data_args(
        "eval",
        &st,
        &digits,
        &["--format", "q4", "--json"],
    ));
    let b = nibble_json(&model_data_args(
        "eval",
        &data("digits_mlp.pth"),
        &digits,
        &["--format", "q4", "--json"],
    ));
    assert_eq!(a["rows"], b["rows"]);
}

/// The golden Sequential of `shared/golden` (GELU at index 1, ReLU at 4), as the nn crate
/// keeps a copy of it.
fn seq_d30() -> std::path::PathBuf {
    data("seq_d30.pth")
}

#[test]
fn seq_d30_golden_logits_and_loss_with_one_activation_per_gap() {
    let golden = data("seq_d30.safetensors");
    let dir = tmpdir("seq_d30");
    let file = Checkpoint::open(&golden).unwrap();
    let x = file.tensor_f32("x", None).unwrap();
    let (_, lshape) = file.info("labels").unwrap();
    assert_eq!(lshape, [8]);
    let labels = i64_values(&golden, "labels");
    let d = dir.join("data.safetensors");
    write(
        &d,
        &[f32s("x_test", &[8, 30], x.data()), i64s("y_test", &labels)],
    );
    let logits = dir.join("logits.safetensors");
    let v = nibble_json(&model_data_args(
        "eval",
        &seq_d30(),
        &d,
        &[
            "--activation",
            "gelu, relu",
            "--logits",
            s(&logits),
            "--json",
        ],
    ));
    let diff = max_diff(&tensor(&logits, "logits"), &tensor(&golden, "logits"));
    assert!(diff < 1e-4, "seq_d30 logits differ by {diff}");
    let loss = file.tensor_f32("loss", None).unwrap().data()[0] as f64;
    assert!(
        (v["rows"][0]["loss"].as_f64().unwrap() - loss).abs() < 1e-5,
        "{v}"
    );
    // One activation for every gap is not this model: GELU where it had ReLU changes the logits.
    nibble_json(&model_data_args(
        "eval",
        &seq_d30(),
        &d,
        &["--activation", "gelu", "--logits", s(&logits), "--json"],
    ));
    assert!(max_diff(&tensor(&logits, "logits"), &tensor(&golden, "logits")) > 1e-3);
    let msg = nibble_fails(&model_data_args(
        "eval",
        &seq_d30(),
        &d,
        &["--activation", "gelu, relu, relu"],
    ));
    assert!(
        msg.contains("--activation") && msg.contains('2') && msg.contains('3'),
        "{msg}"
    );
    let msg = nibble_fails(&model_data_args(
        "eval",
        &seq_d30(),
        &d,
        &["--activation", "softmin"],
    ));
    assert!(msg.contains("softmin"), "{msg}");
}

/// A Sequential `Linear(3, 5), <gap>, Linear(5, 2)` evaluated with each activation other than
/// ReLU and GELU (LeakyReLU and ELU with two coefficients each) and the identity in its gap gives the logits computed here in f64; an unknown name is a clean
/// failure (exit status 1) that lists the accepted ones.
#[test]
fn eval_applies_each_activation_kind_in_a_gap() {
    let dir = tmpdir("eval_activations");
    let weight = |n: usize, phase: f32| -> Vec<f32> {
        (0..n)
            .map(|i| 0.6 * (i as f32 * 0.77 + phase).sin())
            .collect()
    };
    let (w0, b0, w2, b2) = (
        weight(15, 0.1),
        weight(5, 1.3),
        weight(10, 2.2),
        weight(2, 0.4),
    );
    let model = dir.join("model.safetensors");
    write(
        &model,
        &[
            f32s("0.weight", &[5, 3], &w0),
            f32s("0.bias", &[5], &b0),
            f32s("2.weight", &[2, 5], &w2),
            f32s("2.bias", &[2], &b2),
        ],
    );
    let rows = 6;
    let x: Vec<f32> = (0..rows * 3)
        .map(|i| 6.0 * (i as f32 * 1.91 + 0.3).cos())
        .collect();
    let data_file = dir.join("data.safetensors");
    write(
        &data_file,
        &[
            f32s("x_test", &[rows, 3], &x),
            i64s("y_test", &[0, 1, 1, 0, 1, 0]),
        ],
    );
    type Function = fn(f64) -> f64;
    let kinds: [(&str, Function); 13] = [
        ("tanh", f64::tanh),
        ("leaky_relu", |v| if v > 0.0 { v } else { 0.01 * v }),
        ("leaky_relu:0.2", |v| if v > 0.0 { v } else { 0.2 * v }),
        ("elu", |v| if v > 0.0 { v } else { v.exp() - 1.0 }),
        (
            "elu:0.5",
            |v| if v > 0.0 { v } else { 0.5 * (v.exp() - 1.0) },
        ),
        ("softplus", |v| if v > 20.0 { v } else { v.exp().ln_1p() }),
        ("mish", |v| v * v.exp().ln_1p().tanh()),
        ("hardswish", |v| v * (v + 3.0).clamp(0.0, 6.0) / 6.0),
        ("relu6", |v| v.clamp(0.0, 6.0)),
        ("identity", |v| v),
        ("sigmoid", |v| 1.0 / (1.0 + (-v).exp())),
        ("silu", |v| v / (1.0 + (-v).exp())),
        ("gelu_tanh", |v| {
            let beta = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * v * (1.0 + (beta * (v + 0.044715 * v * v * v)).tanh())
        }),
    ];
    let logits = dir.join("logits.safetensors");
    let mut seen = Vec::new();
    for (name, act) in kinds {
        let mut want = Vec::with_capacity(rows * 2);
        for r in 0..rows {
            let h: Vec<f64> = (0..5)
                .map(|o| {
                    let z = b0[o] as f64
                        + (0..3)
                            .map(|i| w0[o * 3 + i] as f64 * x[r * 3 + i] as f64)
                            .sum::<f64>();
                    act(z)
                })
                .collect();
            for o in 0..2 {
                want.push(b2[o] as f64 + (0..5).map(|i| w2[o * 5 + i] as f64 * h[i]).sum::<f64>());
            }
        }
        nibble_json(&model_data_args(
            "eval",
            &model,
            &data_file,
            &["--activation", name, "--logits", s(&logits), "--json"],
        ));
        let got = tensor(&logits, "logits");
        assert_eq!(got.len(), rows * 2);
        for (k, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - w).abs() < 1e-6,
                "{name}: logit {k} is {g}, want {w}"
            );
        }
        seen.push(got);
    }
    // The kinds differ on this model (so each test above checks its own function).
    for i in 0..seen.len() {
        for j in i + 1..seen.len() {
            assert!(max_diff(&seen[i], &seen[j]) > 1e-3, "{i} vs {j}");
        }
    }
    // Names are case-insensitive.
    nibble_json(&model_data_args(
        "eval",
        &model,
        &data_file,
        &["--activation", "TanH", "--logits", s(&logits), "--json"],
    ));
    assert_eq!(tensor(&logits, "logits"), seen[0]);
    // An unknown name: exit status 1, a message naming the argument and every accepted name.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(model_data_args(
            "eval",
            &model,
            &data_file,
            &["--activation", "bogus"],
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("nibble: error:") && msg.contains("--activation") && msg.contains("bogus"),
        "{msg}"
    );
    for name in [
        "relu",
        "gelu",
        "gelu_tanh",
        "tanh",
        "sigmoid",
        "silu",
        "identity",
    ] {
        assert!(msg.contains(name), "`{name}` missing from: {msg}");
    }
}

#[test]
fn finetune_trains_lora_on_a_frozen_quantized_base_and_its_adapter_round_trips() {
    let dir = tmpdir("finetune");
    let adapter = dir.join("adapter");
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    let v = nibble_json(&model_data_args(
        "finetune",
        &model,
        &digits,
        &[
            "--format",
            "lower",
            "--rank",
            "4",
            "--steps",
            "40",
            "--save-adapter",
            s(&adapter),
            "--json",
        ],
    ));
    assert_eq!(
        keys(&v),
        sorted(&[
            "format",
            "rank",
            "dora",
            "steps",
            "accuracy_before",
            "accuracy_after",
            "loss"
        ])
    );
    assert_eq!(
        (
            v["format"].as_str(),
            v["rank"].as_u64(),
            v["steps"].as_u64()
        ),
        (Some("lower"), Some(4), Some(40))
    );
    let loss = loss_curve(&v);
    assert_eq!(loss.len(), 40);
    assert!(loss.iter().all(|l| l.is_finite() && *l >= 0.0));
    let first: f64 = loss[..10].iter().sum();
    let last: f64 = loss[30..].iter().sum();
    assert!(last < first, "training loss did not fall: {loss:?}");
    // Before training, B = 0: the model is the quantized base, as eval scores it.
    let base = nibble_json(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--format", "lower", "--json"],
    ));
    assert_eq!(v["accuracy_before"], base["rows"][0]["accuracy"]);
    // The saved adapter, loaded back on the same base, scores what training ended with.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["target_modules"], serde_json::json!(["0", "3", "5"]));
    assert_eq!(config["r"], 4);
    let back = nibble_json(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--format", "lower", "--adapter", s(&adapter), "--json"],
    ));
    assert_eq!(back["rows"][0]["accuracy"], v["accuracy_after"]);
    let keys_seen = nibble_json(&[
        "inspect",
        s(&adapter.join("adapter_model.safetensors")),
        "--json",
    ]);
    let names = report_names(&keys_seen);
    assert!(
        names.contains(&"base_model.model.3.lora_A.weight"),
        "{names:?}"
    );
    assert!(
        names.contains(&"base_model.model.5.lora_B.weight"),
        "{names:?}"
    );
}

/// `finetune --dora` trains DoRA adapters (PEFT's `use_dora`: the magnitudes with A and B):
/// the loss falls, and falls otherwise than plain LoRA's from the same seed; the saved adapter
/// holds each layer's `lora_magnitude_vector` and `use_dora`, and loaded back on the same base
/// scores what training ended with (`tools/peft_check.py` gives PEFT's logits for it within
/// 4.8e-6 on this model).
#[test]
fn finetune_trains_dora_adapters_and_saves_them_as_peft_does() {
    let dir = tmpdir("finetune_dora");
    let adapter = dir.join("adapter");
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    let run = |dora: bool| {
        let mut extra = vec!["--format", "nf4", "--rank", "4", "--steps", "30", "--json"];
        if dora {
            extra.extend(["--dora", "--save-adapter", s(&adapter)]);
        }
        nibble_json(&model_data_args("finetune", &model, &digits, &extra))
    };
    let (dora, lora) = (run(true), run(false));
    assert_eq!(
        (dora["dora"].as_bool(), lora["dora"].as_bool()),
        (Some(true), Some(false))
    );
    let (dl, ll) = (loss_curve(&dora), loss_curve(&lora));
    assert_eq!(dl[0], ll[0], "the first step's loss is the base's");
    assert_ne!(dl, ll);
    let first: f64 = dl[..10].iter().sum();
    let last: f64 = dl[20..].iter().sum();
    assert!(last < first, "training loss did not fall: {dl:?}");
    let config = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"use_dora\": true"), "{config}");
    let report = nibble_json(&[
        "inspect",
        s(&adapter.join("adapter_model.safetensors")),
        "--json",
    ]);
    let names = report_names(&report);
    for layer in ["0", "3", "5"] {
        let key = format!("base_model.model.{layer}.lora_magnitude_vector");
        assert!(names.contains(&key.as_str()), "{names:?}");
    }
    let back = nibble_json(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--format", "nf4", "--adapter", s(&adapter), "--json"],
    ));
    assert_eq!(back["rows"][0]["accuracy"], dora["accuracy_after"]);
}

#[test]
fn finetune_is_deterministic_under_a_seed() {
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    let args = model_data_args(
        "finetune",
        &model,
        &digits,
        &[
            "--format", "q4", "--rank", "2", "--steps", "5", "--seed", "7", "--json",
        ],
    );
    assert_eq!(nibble_json(&args), nibble_json(&args));
}

/// `tests/data/digits_adapter` is what `nibble finetune --format nf4 --rank 4 --steps 100
/// --save-adapter` wrote; `tools/peft_check.py --save` loaded it with
/// `PeftModel.from_pretrained` onto the PyTorch Sequential and saved PEFT's logits on x_test.
#[test]
fn a_nibble_adapter_gives_the_logits_peft_gives_with_it() {
    let dir = tmpdir("peft");
    let logits = dir.join("logits.safetensors");
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    let adapter = data("digits_adapter");
    nibble_json(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--adapter", s(&adapter), "--logits", s(&logits), "--json"],
    ));
    let ours = tensor(&logits, "logits");
    let peft = tensor(&data("digits_adapter_peft_logits.safetensors"), "logits");
    let d = max_diff(&ours, &peft);
    assert!(d < 1e-4, "nibble vs PEFT logits: max |d| {d}");
    // The adapter matters: without it the logits are PyTorch's plain model's, far from these.
    let plain = tensor(&data("digits_mlp_logits.safetensors"), "logits");
    assert!(max_diff(&plain, &peft) > 0.1);
}

#[test]
fn a_quantized_checkpoint_evaluates_as_the_format_it_holds() {
    let dir = tmpdir("eval_quantized");
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    for format in ["q4", "nf4_dq", "lower"] {
        let file = dir.join(format!("{format}.safetensors"));
        nibble_json(&[
            "quantize",
            s(&model),
            "--format",
            format,
            "--output",
            s(&file),
            "--json",
        ]);
        let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
        let stored = nibble_json(&model_data_args(
            "eval",
            &file,
            &digits,
            &["--logits", s(&a), "--json"],
        ));
        let fresh = nibble_json(&model_data_args(
            "eval",
            &model,
            &digits,
            &["--format", format, "--logits", s(&b), "--json"],
        ));
        assert_eq!(stored["rows"][0]["format"], format);
        assert_eq!(stored["rows"][0]["accuracy"], fresh["rows"][0]["accuracy"]);
        assert_eq!(stored["rows"][0]["bytes"], fresh["rows"][0]["bytes"]);
        assert_eq!(tensor(&a, "logits"), tensor(&b, "logits"), "{format}");
    }
}

/// A model that holds its `nn.Sequential` as an attribute (`net.0.weight`, ...), or was saved
/// from `nn.DataParallel` (`module.`), reads as the bare Sequential; its adapter names the
/// modules with the attribute's path, as PEFT does on that model, and without the wrapper's.
#[test]
fn keys_under_one_module_path_read_as_the_sequential() {
    let dir = tmpdir("eval_prefix");
    let pth = Checkpoint::open(data("digits_mlp.pth")).unwrap();
    let copy_under = |prefix: &str| {
        let entries: Vec<Entry> = entries_of(&pth)
            .into_iter()
            .map(|(k, dtype, shape, bytes)| (format!("{prefix}{k}"), dtype, shape, bytes))
            .collect();
        let path = dir.join(format!("{}safetensors", prefix.replace('.', "_")));
        write(&path, &entries);
        path
    };
    let digits = data("digits.safetensors");
    let want = nibble_json(&model_data_args(
        "eval",
        &data("digits_mlp.pth"),
        &digits,
        &["--format", "nf4", "--json"],
    ));
    for prefix in ["net.", "module.net."] {
        let path = copy_under(prefix);
        let got = nibble_json(&model_data_args(
            "eval",
            &path,
            &digits,
            &["--format", "nf4", "--json"],
        ));
        assert_eq!(got["rows"], want["rows"], "{prefix}");
    }
    // The adapter names the modules as PEFT does on the model inside the wrappers a state dict
    // was saved from (DataParallel's `module.`, torch.compile's `_orig_mod.`), and so reads
    // back onto the same file.
    for (prefix, targets) in [
        ("net.", ["net.0", "net.3", "net.5"]),
        ("module.", ["0", "3", "5"]),
        ("_orig_mod.", ["0", "3", "5"]),
        ("module.net.", ["net.0", "net.3", "net.5"]),
    ] {
        let adapter = dir.join(format!("adapter_{}", prefix.replace('.', "_")));
        let path = copy_under(prefix);
        nibble_json(&model_data_args(
            "finetune",
            &path,
            &digits,
            &[
                "--format",
                "q4",
                "--rank",
                "2",
                "--steps",
                "3",
                "--save-adapter",
                s(&adapter),
                "--json",
            ],
        ));
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["target_modules"],
            serde_json::json!(targets),
            "{prefix}"
        );
        nibble_json(&model_data_args(
            "eval",
            &path,
            &digits,
            &["--format", "q4", "--adapter", s(&adapter), "--json"],
        ));
    }
    // Keys under two different paths are not one Sequential.
    let mut entries: Vec<Entry> = Vec::new();
    for (i, k) in pth.keys().enumerate() {
        let (dtype, shape) = pth.info(k).unwrap();
        let prefix = if i == 0 { "head." } else { "net." };
        entries.push((
            format!("{prefix}{k}"),
            dtype,
            shape.to_vec(),
            pth.bytes(k).unwrap().to_vec(),
        ));
    }
    let mixed = dir.join("mixed.safetensors");
    write(&mixed, &entries);
    let msg = nibble_fails(&model_data_args("eval", &mixed, &digits, &[]));
    assert!(msg.contains("head.") || msg.contains("net."), "{msg}");
}

/// A golden model, `tests/data/<name>.pth` with its `<name>.safetensors` (`x`, `logits`, ...),
/// and what a test of it needs: a directory of its own, the data file of the golden `x`
/// ([`five_rows_of`]) and a path for nibble's logits.
struct Golden {
    dir: std::path::PathBuf,
    golden: std::path::PathBuf,
    d: std::path::PathBuf,
    model: std::path::PathBuf,
    logits: std::path::PathBuf,
}

impl Golden {
    fn new(name: &str) -> Self {
        let dir = tmpdir(name);
        let golden = data(&format!("{name}.safetensors"));
        let d = five_rows_of(&dir, &golden);
        Golden {
            model: data(&format!("{name}.pth")),
            logits: dir.join("logits.safetensors"),
            dir,
            golden,
            d,
        }
    }

    /// How far nibble's logits with `flags` are from the golden ones ([`logits_off_golden`]).
    fn off(&self, flags: &[&str]) -> f32 {
        logits_off_golden(&self.model, &self.d, flags, &self.logits, &self.golden)
    }

    /// `nibble quantize`s the model to `format` and checks that the file it writes, evaluated
    /// with `flags` and `--format format`, gives the logits of the model quantized on load;
    /// returns the quantize report (`--json`).
    fn quantized_reads_as_on_load(&self, format: &str, flags: &[&str]) -> serde_json::Value {
        let file = self.dir.join(format!("quantized_{format}.safetensors"));
        let report = nibble_json(&[
            "quantize",
            s(&self.model),
            "--format",
            format,
            "--output",
            s(&file),
            "--json",
        ]);
        let flags = [flags, &["--format", format]].concat();
        let stored = self.dir.join(format!("stored_{format}.safetensors"));
        let fresh = self.dir.join(format!("fresh_{format}.safetensors"));
        logits_off_golden(&file, &self.d, &flags, &stored, &self.golden);
        logits_off_golden(&self.model, &self.d, &flags, &fresh, &self.golden);
        assert_eq!(
            tensor(&stored, "logits"),
            tensor(&fresh, "logits"),
            "{format}"
        );
        report
    }
}

/// The golden file's `x` [5, 6] with labels 0, 1, 2, 0, 1 as a data file in `dir`, as both the
/// test and the training split.
fn five_rows_of(dir: &std::path::Path, golden: &std::path::Path) -> std::path::PathBuf {
    let x = tensor(golden, "x");
    let labels = [0, 1, 2, 0, 1];
    let d = dir.join("data.safetensors");
    write(
        &d,
        &[
            f32s("x_test", &[5, 6], &x),
            i64s("y_test", &labels),
            f32s("x_train", &[5, 6], &x),
            i64s("y_train", &labels),
        ],
    );
    d
}

/// A LayerNorm's epsilon is not in the state dict: `--layer-norm-eps` gives it
/// (`tests/data/seq_ln_eps.*`, eps 0.05, `tools/golden/make_seq_ln_eps.py`); PyTorch's default
/// then gives other logits, and an epsilon that is not a positive number is an error. Without
/// `--norm`, a note says which modules were read as LayerNorms.
#[test]
fn layer_norm_eps_is_given_on_the_command_line() {
    let g = Golden::new("seq_ln_eps");
    let run = |eps: &str| g.off(&["--layer-norm-eps", eps]);
    let diff = run("0.05");
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    assert!(run("1e-5") > 1e-3);
    // Without --norm its LayerNorms are read as such, and a note names them (a state dict
    // cannot tell them from a GroupNorm, an RMSNorm, a PReLU or a BatchNorm1d without running
    // statistics); --norm silences it.
    let eps = ["--layer-norm-eps", "0.05"];
    let out = nibble(&model_data_args("eval", &g.model, &g.d, &eps));
    assert!(
        out.ok
            && out
                .stderr
                .contains("are read as LayerNorms (--norm's default)"),
        "{}",
        out.stderr
    );
    let given = [&eps[..], &["--norm", "layer"]].concat();
    let out = nibble(&model_data_args("eval", &g.model, &g.d, &given));
    assert!(
        out.ok && !out.stderr.contains("--norm's default"),
        "{}",
        out.stderr
    );
    for bad in ["0", "inf", "nan"] {
        let msg = nibble_fails(&model_data_args(
            "eval",
            &g.model,
            &g.d,
            &["--layer-norm-eps", bad],
        ));
        assert!(msg.contains("--layer-norm-eps"), "{bad}: {msg}");
    }
}

/// Parameter-free layers before the first Linear (indices starting above 0) are nothing by
/// default (`nn.Flatten`), and what `--activation` names first when its list has one entry more
/// than the gaps between layers.
#[test]
fn a_leading_gap_is_identity_unless_the_list_names_it() {
    let dir = tmpdir("leading_gap");
    // 1: Linear(3 -> 2), 2: gap, 3: Linear(2 -> 2).
    let (w1, b1) = ([0.5f32, -1.0, 2.0, 1.5, 0.25, -0.75], [0.1f32, -0.2]);
    let (w3, b3) = ([1.0f32, -2.0, 0.5, 3.0], [0.0f32, 0.3]);
    let model = dir.join("model.safetensors");
    write(
        &model,
        &[
            f32s("1.weight", &[2, 3], &w1),
            f32s("1.bias", &[2], &b1),
            f32s("3.weight", &[2, 2], &w3),
            f32s("3.bias", &[2], &b3),
        ],
    );
    let x = [-1.0f32, 2.0, -0.5, 0.75, -2.0, 1.0];
    let d = dir.join("data.safetensors");
    write(&d, &[f32s("x_test", &[2, 3], &x), i64s("y_test", &[0, 1])]);
    // Plain-Rust forward: optional ReLU in front, Linear, ReLU, Linear.
    let forward = |relu_first: bool| -> Vec<f32> {
        let mut out = Vec::new();
        for row in x.chunks(3) {
            let row: Vec<f32> = row
                .iter()
                .map(|&v| if relu_first { v.max(0.0) } else { v })
                .collect();
            let h: Vec<f32> = (0..2)
                .map(|o| (b1[o] + (0..3).map(|i| w1[o * 3 + i] * row[i]).sum::<f32>()).max(0.0))
                .collect();
            out.extend((0..2).map(|o| b3[o] + (0..2).map(|i| w3[o * 2 + i] * h[i]).sum::<f32>()));
        }
        out
    };
    let logits = dir.join("logits.safetensors");
    for (activation, relu_first) in [
        ("relu", false),
        ("relu,relu", true),
        ("identity,relu", false),
    ] {
        nibble_json(&model_data_args(
            "eval",
            &model,
            &d,
            &["--activation", activation, "--logits", s(&logits), "--json"],
        ));
        let got = tensor(&logits, "logits");
        let d = max_diff(&got, &forward(relu_first));
        assert!(
            d < 1e-6,
            "{activation}: {got:?} vs {:?}",
            forward(relu_first)
        );
    }
    assert!(max_diff(&forward(true), &forward(false)) > 0.1);
    let msg = nibble_fails(&model_data_args(
        "eval",
        &model,
        &d,
        &["--activation", "relu,relu,relu"],
    ));
    assert!(msg.contains("before the first layer"), "{msg}");

    // No gap between the layers (1: Linear(3 -> 2), 2: Linear(2 -> 2), as in
    // `nn.Sequential(nn.ReLU(), nn.Linear(3, 2), nn.Linear(2, 2))`): a given entry is the one
    // more than the gaps, and runs before the first layer, with a note; without
    // `--activation` nothing runs there.
    let adjacent = dir.join("adjacent.safetensors");
    write(
        &adjacent,
        &[
            f32s("1.weight", &[2, 3], &w1),
            f32s("1.bias", &[2], &b1),
            f32s("2.weight", &[2, 2], &w3),
            f32s("2.bias", &[2], &b3),
        ],
    );
    let no_gap = |relu_first: bool| -> Vec<f32> {
        let mut out = Vec::new();
        for row in x.chunks(3) {
            let row: Vec<f32> = row
                .iter()
                .map(|&v| if relu_first { v.max(0.0) } else { v })
                .collect();
            let h: Vec<f32> = (0..2)
                .map(|o| b1[o] + (0..3).map(|i| w1[o * 3 + i] * row[i]).sum::<f32>())
                .collect();
            out.extend((0..2).map(|o| b3[o] + (0..2).map(|i| w3[o * 2 + i] * h[i]).sum::<f32>()));
        }
        out
    };
    assert!(max_diff(&no_gap(true), &no_gap(false)) > 0.1);
    for (flags, relu_first) in [
        (&["--activation", "relu"][..], true),
        (&["--activation", "identity"][..], false),
        (&[][..], false),
    ] {
        let mut args = model_data_args("eval", &adjacent, &d, flags);
        args.extend(["--logits", s(&logits)]);
        let out = nibble(&args);
        assert!(out.ok, "{flags:?}: {}", out.stderr);
        let got = tensor(&logits, "logits");
        let want = no_gap(relu_first);
        assert!(
            max_diff(&got, &want) < 1e-6,
            "{flags:?}: {got:?} vs {want:?}"
        );
        assert_eq!(
            out.stderr.contains("runs there, on the input"),
            !flags.is_empty(),
            "{flags:?}: {}",
            out.stderr
        );
    }
}

/// `nn.BatchNorm1d` in eval mode (`tests/data/seq_batch_norm.*`, every epsilon 1e-3,
/// `tools/golden/make_seq_batch_norm.py`): in front of the first Linear, after one, and without
/// `affine`. `--batch-norm-eps 1e-3` gives PyTorch's logits, PyTorch's default 1e-5 others.
/// Fine-tuning trains the adapters through it.
#[test]
fn batch_norm_layers_give_pytorchs_logits_and_train() {
    let g = Golden::new("seq_batch_norm");
    let run = |eps: &str| g.off(&["--batch-norm-eps", eps]);
    let diff = run("1e-3");
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    assert!(run("1e-5") > 1e-4);
    finetune_lowers_the_loss(&g.model, &g.d, "f16", &[]);
    let msg = nibble_fails(&model_data_args(
        "eval",
        &g.model,
        &g.d,
        &["--batch-norm-eps", "0"],
    ));
    assert!(msg.contains("--batch-norm-eps"), "{msg}");
}

/// `nibble finetune` of `model` on `data` (five rows) with the base in `format`, rank 2, 20
/// steps of the whole batch and `flags`: the last step's loss is below the first's.
fn finetune_lowers_the_loss(
    model: &std::path::Path,
    data: &std::path::Path,
    format: &str,
    flags: &[&str],
) {
    let mut rest = flags.to_vec();
    rest.extend([
        "--format", format, "--rank", "2", "--steps", "20", "--batch", "5", "--json",
    ]);
    let v = nibble_json(&model_data_args("finetune", model, data, &rest));
    let loss = loss_curve(&v);
    assert!(loss[loss.len() - 1] < loss[0], "{format}: {loss:?}");
}

/// Max |logits - golden's `logits`| of `nibble eval` on `model` and `data` with `flags`
/// (the logits written to `out`).
fn logits_off_golden(
    model: &std::path::Path,
    data: &std::path::Path,
    flags: &[&str],
    out: &std::path::Path,
    golden: &std::path::Path,
) -> f32 {
    let mut rest = flags.to_vec();
    rest.extend(["--logits", s(out), "--json"]);
    nibble_json(&model_data_args("eval", model, data, &rest));
    max_diff(&tensor(out, "logits"), &tensor(golden, "logits"))
}

/// LayerNorms without parameters leave gaps that `--activation` fills: `layer_norm+relu` for
/// the first gap, `layer_norm` for the second (`tests/data/seq_plain_norm.*`, eps 0.05,
/// `tools/golden/make_seq_plain_norm.py`), with `--layer-norm-eps`: PyTorch's logits, and
/// fine-tuning trains through them. A ReLU alone gives other logits; an empty or unknown name
/// in a `+` chain is an error naming it.
#[test]
fn layer_norms_without_parameters_are_given_as_gap_layers() {
    let g = Golden::new("seq_plain_norm");
    let run = |flags: &[&str]| g.off(flags);
    let eps = ["--layer-norm-eps", "0.05"];
    let given = [
        &eps[..],
        &["--activation", " Layer_Norm + ReLU ,layer_norm"],
    ]
    .concat();
    let diff = run(&given);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    assert!(run(&[&eps[..], &["--activation", "relu"]].concat()) > 1e-2);
    assert!(run(&["--activation", "layer_norm+relu,layer_norm"]) > 1e-4); // eps 1e-5
    finetune_lowers_the_loss(&g.model, &g.d, "q4", &given);
    for (bad, named) in [
        ("layer_norm+,layer_norm", "``"),
        (
            "layer_norm+softmin,relu",
            "in `layer_norm+softmin`: unknown activation `softmin`",
        ),
        (
            "layer_norm:0.1+relu,relu",
            "layer_norm takes no coefficient",
        ),
    ] {
        let msg = nibble_fails(&model_data_args(
            "eval",
            &g.model,
            &g.d,
            &["--activation", bad],
        ));
        assert!(
            msg.contains(named) && msg.contains("layer_norm"),
            "{bad}: {msg}"
        );
    }
}

/// RMSNorms: `--norm rms,layer` (one per module of a 1-D weight) and `--rms-norm-eps 1e-3`,
/// with a parameter-free `rms_norm` in a gap, give PyTorch's logits
/// (`tests/data/seq_rms_norm.*`, `tools/golden/make_seq_rms_norm.py`), and fine-tuning
/// trains through them. Every such module read as a LayerNorm (the default) gives other
/// logits; `--norm rms` for a module with a bias, a list of the wrong length and an unknown
/// kind are errors naming them.
#[test]
fn rms_norms_are_given_with_norm() {
    let g = Golden::new("seq_rms_norm");
    let run = |flags: &[&str]| g.off(flags);
    let given = [
        "--norm",
        "RMS, layer",
        "--rms-norm-eps",
        "1e-3",
        "--activation",
        "relu,rms_norm,relu",
    ];
    let diff = run(&given);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    assert!(run(&given[2..]) > 1e-3); // every 1-D weight a LayerNorm
    assert!(run(&[&given[..2], &given[4..]].concat()) > 1e-4); // PyTorch's default epsilon
    finetune_lowers_the_loss(&g.model, &g.d, "nf4", &given);
    for (norm, named) in [
        ("rms", "`6.bias` exists"),
        ("rms,layer,rms", "3 kinds given for the 2 modules"),
        ("batch", "`batch`: expected layer (nn.LayerNorm), rms"),
    ] {
        let flags = [&["--norm", norm][..], &given[2..]].concat();
        let msg = nibble_fails(&model_data_args("eval", &g.model, &g.d, &flags));
        assert!(msg.contains(named), "{norm}: {msg}");
    }
}

/// GroupNorms: `--norm group:4,layer,group:2` (one per module of a 1-D weight) and
/// `--layer-norm-eps 1e-3` give PyTorch's logits (`tests/data/seq_group_norm.*`,
/// `tools/golden/make_seq_group_norm.py`), and fine-tuning trains through them; so does
/// `--activation group_norm:3+relu` for a GroupNorm without parameters
/// (`tests/data/seq_group_norm_plain.*`). Every such module read as a LayerNorm (the default)
/// gives other logits; a group count that does not divide the channels, none, or 0 is an error
/// naming it.
#[test]
fn group_norms_are_given_with_norm() {
    let g = Golden::new("seq_group_norm");
    let run = |flags: &[&str]| g.off(flags);
    let given = [
        "--norm",
        "group:4, layer, GROUP_NORM:2",
        "--layer-norm-eps",
        "1e-3",
        "--activation",
        "relu,gelu,relu",
    ];
    let diff = run(&given);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    assert!(run(&given[2..]) > 1e-3); // every 1-D weight a LayerNorm
    finetune_lowers_the_loss(&g.model, &g.d, "q4", &given);
    for (norm, named) in [
        (
            "group:5,layer,group:2",
            "a GroupNorm of 5 groups over 12 channels",
        ),
        ("group,layer,group:2", "`group` needs its group count"),
        ("group:0,layer,group:2", "`group:0`: the group count"),
        ("group:x,layer,group:2", "`group:x`: the group count"),
    ] {
        let flags = [&["--norm", norm][..], &given[2..]].concat();
        let msg = nibble_fails(&model_data_args("eval", &g.model, &g.d, &flags));
        assert!(msg.contains(named), "{norm}: {msg}");
    }
    // A GroupNorm without parameters, in a gap (`tests/data/seq_group_norm_plain.*`).
    let plain = Golden::new("seq_group_norm_plain");
    let given = [
        "--activation",
        "group_norm:3+relu",
        "--layer-norm-eps",
        "1e-3",
    ];
    let diff = logits_off_golden(&plain.model, &plain.d, &given, &g.logits, &plain.golden);
    assert!(diff < 1e-5, "plain: logits differ from PyTorch's by {diff}");
    let flags = ["--activation", "group_norm:5+relu"];
    let msg = nibble_fails(&model_data_args("eval", &plain.model, &plain.d, &flags));
    assert!(msg.contains("its 5 groups must divide"), "{msg}");
}

/// A classifier of its own class (named modules `fc1`, `bn1`, `fc2`, `norm`, `head`):
/// `--activation identity,relu,identity,gelu` says what runs between each two modules, and
/// the logits are PyTorch's (`tests/data/named_classifier.*`,
/// `tools/golden/make_named_classifier.py`), and a note shows the chain run; fine-tuning trains
/// it. A BigNet checkpoint (residual blocks) is refused, naming the `bignet` program. A list of
/// the wrong length
/// names the modules the gaps follow; the same model in safetensors (whose keys are sorted by
/// name) does not chain, and the error says why, unless `--order` gives the modules' order
/// (an order that leaves out, adds or repeats a module is an error naming it).
#[test]
fn a_classifier_of_named_modules_gives_pytorchs_logits() {
    let g = Golden::new("named_classifier");
    let given = ["--activation", "identity,relu,identity,gelu"];
    let diff = g.off(&given);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    // What runs is shown: the state dict cannot say what the g.model's forward does.
    let out = nibble(&model_data_args("eval", &g.model, &g.d, &given));
    assert!(
        out.ok
            && out
                .stderr
                .contains("fc1 → bn1 → relu → fc2 → norm → gelu → head"),
        "{}",
        out.stderr
    );
    finetune_lowers_the_loss(&g.model, &g.d, "nf4", &given);
    let msg = nibble_fails(&model_data_args(
        "eval",
        &g.model,
        &g.d,
        &["--activation", "relu,gelu"],
    ));
    assert!(
        msg.contains("2 activations given for the 4 gaps")
            && msg.contains("after modules fc1, bn1, fc2, norm"),
        "{msg}"
    );
    // The same tensors in a safetensors file: sorted by name, bn1 comes first.
    let file = nibble_io::Checkpoint::open(&g.model).unwrap();
    let entries = entries_of(&file);
    let sorted = g.dir.join("named.safetensors");
    write(&sorted, &entries);
    let msg = nibble_fails(&model_data_args("eval", &sorted, &g.d, &given));
    assert!(
        msg.contains("do not chain") && msg.contains("sorts them by name"),
        "{msg}"
    );
    // `--order` gives the order the g.model runs them.
    let ordered = [&given[..], &["--order", "fc1, bn1, fc2, norm, head"]].concat();
    let diff = logits_off_golden(&sorted, &g.d, &ordered, &g.logits, &g.golden);
    assert!(
        diff < 1e-5,
        "--order: logits differ from PyTorch's by {diff}"
    );
    for (order, named) in [
        ("fc1,bn1,fc2,norm", "leaves out `head`"),
        (
            "fc1,bn1,fc2,norm,head,fc3",
            "names `fc3`, which is no module",
        ),
        ("fc1,bn1,fc2,norm,head,fc1", "names `fc1` twice"),
        // A name given twice is said as such, not as the module it displaced.
        ("fc1,fc1,fc2,norm,head", "names `fc1` twice"),
    ] {
        let flags = [&given[..], &["--order", order]].concat();
        let msg = nibble_fails(&model_data_args("eval", &sorted, &g.d, &flags));
        assert!(msg.contains(named), "{order}: {msg}");
    }
    let msg = nibble_fails(&model_data_args(
        "eval",
        &data("digits_mlp.pth"),
        &data("digits.safetensors"),
        &["--order", "0,2"],
    ));
    assert!(msg.contains("an nn.Sequential's indices"), "{msg}");
    let msg = nibble_fails(&model_data_args(
        "eval",
        &data("bignet_d128.pth"),
        &g.d,
        &[],
    ));
    assert!(
        msg.contains("BigNet checkpoint") && msg.contains("`bignet` program"),
        "{msg}"
    );
    // `quantize` records the modules' order, so its safetensors output reads as the g.model.
    g.quantized_reads_as_on_load("nf4", &given);
    // Saved from DataParallel, then quantized: the recorded order names the wrapped paths
    // (`module.fc1`, ...), and the model read without the wrapper still runs in it (it ran
    // the sorted order, with no word). A recorded order of other modules is an error.
    let with_order = |name: &str, prefix: &str, order: &str| {
        let path = g.dir.join(name);
        let refs: Vec<(String, nibble_io::DType, Vec<usize>, &[u8])> = entries
            .iter()
            .map(|(k, d, s, b)| (format!("{prefix}{k}"), *d, s.clone(), b.as_slice()))
            .collect();
        let metadata = std::collections::BTreeMap::from([(
            "nibble.module_order".to_string(),
            order.to_string(),
        )]);
        nibble_io::write_safetensors(&path, &refs, &metadata).unwrap();
        path
    };
    let wrapped = with_order(
        "wrapped.safetensors",
        "module.",
        r#"["module.fc1","module.bn1","module.fc2","module.norm","module.head"]"#,
    );
    let diff = logits_off_golden(&wrapped, &g.d, &given, &g.logits, &g.golden);
    assert!(
        diff < 1e-5,
        "wrapped: logits differ from PyTorch's by {diff}"
    );
    let other = with_order("other.safetensors", "", r#"["fc1","bn1","fc2"]"#);
    let msg = nibble_fails(&model_data_args("eval", &other, &g.d, &given));
    assert!(
        msg.contains("nibble.module_order") && msg.contains("--order"),
        "{msg}"
    );
}

/// A model looping over an `nn.ModuleList` of twelve layers (`tests/data/module_list12.*`,
/// `tools/golden/make_module_list.py`) gives PyTorch's logits from its `.pth` and from the
/// same tensors in a safetensors file, whose writers sort `layers.10` before `layers.2`: its
/// modules are read in natural order (before, twelve chained 8 → 8 layers ran 0, 1, 10, 11, 2,
/// ... and the logits were silently wrong).
#[test]
fn a_module_list_in_safetensors_runs_in_its_order() {
    let g = Golden::new("module_list12");
    let diff = g.off(&[]);
    assert!(diff < 1e-5, ".pth: logits differ from PyTorch's by {diff}");
    let file = nibble_io::Checkpoint::open(&g.model).unwrap();
    let sorted = g.dir.join("module_list12.safetensors");
    write(&sorted, &entries_of(&file));
    let diff = logits_off_golden(&sorted, &g.d, &[], &g.logits, &g.golden);
    assert!(
        diff < 1e-5,
        "safetensors: logits differ from PyTorch's by {diff}"
    );
    let out = nibble(&model_data_args("eval", &sorted, &g.d, &[]));
    assert!(
        out.ok
            && out
                .stderr
                .contains("layers.9 → relu → layers.10 → relu → layers.11"),
        "{}",
        out.stderr
    );
}

/// Linears at consecutive indices (`layers.0`, `layers.1`: an nn.ModuleList's keys look so)
/// run with nothing between them, as in an nn.Sequential, and `eval` says so, since a model
/// that loops over a ModuleList may apply an activation there; a model with gaps gets no note.
#[test]
fn consecutive_linears_are_noted() {
    let dir = tmpdir("adjacent");
    let d = dir.join("d.safetensors");
    let x: Vec<f32> = (0..4 * 8).map(|i| (i % 5) as f32 * 0.25).collect();
    write(
        &d,
        &[f32s("x_test", &[4, 8], &x), i64s("y_test", &[0, 1, 2, 0])],
    );
    let model = dir.join("list.safetensors");
    write(
        &model,
        &[
            f32s("layers.0.weight", &[4, 8], &[0.1; 32]),
            f32s("layers.1.weight", &[3, 4], &[0.2; 12]),
        ],
    );
    let out = nibble(&model_data_args("eval", &model, &d, &[]));
    assert!(
        out.ok
            && out
                .stderr
                .contains("the Linears `layers.0` and `layers.1` are at consecutive indices"),
        "{}",
        out.stderr
    );
    let out = nibble(&model_data_args(
        "eval",
        &data("digits_mlp.pth"),
        &data("digits.safetensors"),
        &["--norm", "layer"],
    ));
    assert!(out.ok && !out.stderr.contains("note:"), "{}", out.stderr);
}

/// A training checkpoint (PyTorch's tutorial format, Lightning's) evaluates as the model in it:
/// the golden logits (`tests/data/ckpt_*`, `tools/golden/make_training_checkpoints.py`).
#[test]
fn training_checkpoints_evaluate_as_their_model() {
    let dir = tmpdir("training_ckpt");
    let golden = data("ckpt_x.safetensors");
    let x = tensor(&golden, "x");
    let d = dir.join("data.safetensors");
    write(&d, &[f32s("x_test", &[2, 4], &x), i64s("y_test", &[0, 1])]);
    let logits = dir.join("logits.safetensors");
    for name in [
        "ckpt_tutorial.pth",
        "ckpt_lightning.pth",
        "ckpt_two_models.pth",
    ] {
        let diff = logits_off_golden(&data(name), &d, &[], &logits, &golden);
        assert!(diff < 1e-6, "{name}: logits differ by {diff}");
    }
}

/// Weight-normalized Linears (`parametrizations.weight.original0` / `original1` and the older
/// `weight_g` / `weight_v`; `dim` 0, 1 and None) are read as `g · v / ‖v‖`: PyTorch's logits
/// (`tests/data/seq_weight_norm.*`, `tools/golden/make_seq_weight_norm.py`), in every format,
/// and fine-tuning trains on them. A lone part is an error naming both keys.
#[test]
fn weight_normalized_linears_give_pytorchs_logits() {
    let g = Golden::new("seq_weight_norm");
    let diff = g.off(&[]);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    let q4 = g.off(&["--format", "q4"]);
    assert!(q4 < 0.1, "q4 logits differ by {q4}");
    finetune_lowers_the_loss(&g.model, &g.d, "nf4", &[]);
    // `quantize` stores each as one `<module>.weight`: the file evaluates as the g.model does
    // in that format, bit for bit (f32: PyTorch's g.logits).
    for format in ["f32", "q4"] {
        let report = g.quantized_reads_as_on_load(format, &[]);
        let names = report_names(&report);
        assert_eq!(names, ["0.weight", "2.weight", "4.weight"], "{format}");
        // Each weight took its g and v parts in the input (the report counted v alone, so
        // the tensors and the untouched biases did not add up to `bytes_before`).
        let input = nibble_io::Checkpoint::open(&g.model).unwrap();
        let part_bytes = |key: &str| input.bytes(key).unwrap().len() as u64;
        let (new, old) = (".parametrizations.weight.original", ".weight_");
        let parts = [
            [format!("0{new}0"), format!("0{new}1")],
            [format!("2{old}g"), format!("2{old}v")],
            [format!("4{new}0"), format!("4{new}1")],
        ];
        for (t, [gk, vk]) in report["tensors"].as_array().unwrap().iter().zip(&parts) {
            let want = part_bytes(gk) + part_bytes(vk);
            assert_eq!(t["bytes_before"].as_u64(), Some(want), "{format}: {t}");
        }
        let biases: u64 = ["0.bias", "2.bias", "4.bias"]
            .iter()
            .map(|k| part_bytes(k))
            .sum();
        let tensors: u64 = report["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["bytes_before"].as_u64().unwrap())
            .sum();
        assert_eq!(
            report["bytes_before"].as_u64(),
            Some(tensors + biases),
            "{report}"
        );
    }
    // Without `weight_v`, the middle layer is half a weight.
    let pth = nibble_io::Checkpoint::open(&g.model).unwrap();
    let entries: Vec<Entry> = entries_of(&pth)
        .into_iter()
        .filter(|e| e.0 != "2.weight_v")
        .collect();
    let half = g.dir.join("half.safetensors");
    write(&half, &entries);
    let msg = nibble_fails(&model_data_args("eval", &half, &g.d, &[]));
    assert!(
        msg.contains("`2.weight_g`") && msg.contains("`2.weight_v`"),
        "{msg}"
    );
}

/// A model with one output is a binary classifier (`BCEWithLogitsLoss`): labels 0 and 1, the
/// prediction 1 where the logit is above 0, the loss binary cross-entropy with logits (checked
/// here against the formula on a hand-made model), and fine-tuning trains it with that loss,
/// at a rank above the output layer's min(out, in) as PEFT allows. A label of 2 is an error.
#[test]
fn a_one_logit_model_is_a_binary_classifier() {
    let dir = tmpdir("binary");
    // 0: Linear(2 -> 3), ReLU, 2: Linear(3 -> 1).
    let (w0, b0) = ([1.0f32, -1.0, 0.5, 0.5, -1.0, 2.0], [0.0f32, 0.1, -0.2]);
    let (w2, b2) = ([1.0f32, -2.0, 0.5], [0.25f32]);
    let model = dir.join("model.safetensors");
    write(
        &model,
        &[
            f32s("0.weight", &[3, 2], &w0),
            f32s("0.bias", &[3], &b0),
            f32s("2.weight", &[1, 3], &w2),
            f32s("2.bias", &[1], &b2),
        ],
    );
    let x = [
        1.0f32, 0.0, -1.0, 2.0, 0.5, 0.5, 2.0, -1.0, -0.5, -2.0, 1.5, 1.0,
    ];
    let y = [1i64, 0, 1, 1, 0, 0];
    let d = dir.join("data.safetensors");
    write(
        &d,
        &[
            f32s("x_test", &[6, 2], &x),
            i64s("y_test", &y),
            f32s("x_train", &[6, 2], &x),
            i64s("y_train", &y),
        ],
    );
    let logit = |r: &[f32]| -> f64 {
        let h: Vec<f64> = (0..3)
            .map(|j| (w0[2 * j] * r[0] + w0[2 * j + 1] * r[1] + b0[j]).max(0.0) as f64)
            .collect();
        (0..3).map(|j| w2[j] as f64 * h[j]).sum::<f64>() + b2[0] as f64
    };
    let (mut hits, mut bce) = (0usize, 0.0f64);
    for (r, &label) in x.chunks(2).zip(&y) {
        let (z, t) = (logit(r), label as f64);
        hits += usize::from(usize::from(z > 0.0) == label as usize);
        bce += z.max(0.0) - z * t + (-z.abs()).exp().ln_1p();
    }
    let v = nibble_json(&model_data_args("eval", &model, &d, &["--json"]));
    let row = &v["rows"][0];
    assert!(
        (row["accuracy"].as_f64().unwrap() - hits as f64 / 6.0).abs() < 1e-12,
        "{v}"
    );
    assert!(
        (row["loss"].as_f64().unwrap() - bce / 6.0).abs() < 1e-5,
        "{v}"
    );
    let v = nibble_json(&model_data_args(
        "finetune",
        &model,
        &d,
        &[
            "--format", "f32", "--rank", "2", "--steps", "30", "--batch", "6", "--lr", "0.05",
            "--json",
        ],
    ));
    let loss = loss_curve(&v);
    assert!((loss[0] - bce / 6.0).abs() < 1e-5, "{loss:?}");
    assert!(loss[loss.len() - 1] < loss[0], "{loss:?}");
    let bad = dir.join("bad.safetensors");
    write(
        &bad,
        &[f32s("x_test", &[1, 2], &x[..2]), i64s("y_test", &[2])],
    );
    let msg = nibble_fails(&model_data_args("eval", &model, &bad, &[]));
    assert!(msg.contains("y_test") && msg.contains("0..2"), "{msg}");
}

/// PReLUs are given with `--norm` like the norms they look like in a state dict
/// (`prelu,layer,prelu`: `tests/data/seq_prelu.*`, `tools/golden/make_seq_prelu.py`):
/// PyTorch's logits, and fine-tuning trains through them.
#[test]
fn prelus_are_given_with_norm() {
    let g = Golden::new("seq_prelu");
    let given = ["--norm", "PReLU, layer, prelu"];
    let diff = g.off(&given);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    finetune_lowers_the_loss(&g.model, &g.d, "q4", &given);
}

/// A file that `quantize --include` quantized in part is labelled with each format it holds
/// (`f32+nf4`; the row said `f32`, the first Linear's format), and `--format all` on a
/// quantized file gives its one row with a note (it failed naming f16, the second format).
#[test]
fn partly_and_wholly_quantized_files_are_labelled_by_what_they_hold() {
    let dir = tmpdir("partly_quantized");
    let model = data("digits_mlp.pth");
    let digits = data("digits.safetensors");
    let part = dir.join("part.safetensors");
    let run = nibble(&[
        "quantize",
        s(&model),
        "--format",
        "nf4",
        "--include",
        r"^5\.",
        "--output",
        s(&part),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let logits = dir.join("part_logits.safetensors");
    let report = nibble_json(&[
        "eval",
        "--model",
        s(&part),
        "--data",
        s(&digits),
        "--logits",
        s(&logits),
        "--json",
    ]);
    assert_eq!(report["rows"][0]["format"], "f32+nf4", "{report}");
    // The logits file declares the quantized format, as the quantized file does (it said
    // f32, the first Linear's), and names both.
    let written = nibble_io::Checkpoint::open(&logits).unwrap();
    assert_eq!(
        written
            .metadata()
            .get(nibble_io::FORMAT_KEY)
            .map(String::as_str),
        Some("nf4")
    );
    assert_eq!(
        written.metadata().get("nibble.formats").map(String::as_str),
        Some("f32+nf4")
    );
    let whole = dir.join("whole.safetensors");
    let run = nibble(&[
        "quantize",
        s(&model),
        "--format",
        "q4",
        "--output",
        s(&whole),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let args = [
        "eval",
        "--model",
        s(&whole),
        "--data",
        s(&digits),
        "--format",
        "all",
    ];
    let run = nibble(&args);
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stderr.contains("already quantized (q4)"),
        "{}",
        run.stderr
    );
    // Its one row is q4's, not a model without Linears (the note said so, in the table only).
    assert!(!run.stderr.contains("no Linear layer"), "{}", run.stderr);
    let mut json = args.to_vec();
    json.push("--json");
    let report = nibble_json(&json);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{report}");
    assert_eq!(rows[0]["format"], "q4");
    // nibble's f16 file runs as f16, as `--format f16` runs the f32 file: the same logits and
    // bytes (it was read as an f32 model of twice the bytes, on the f32 kernels); with
    // `--format all` its first row is f16 and the others quantize it, f16 not twice.
    let half = dir.join("half.safetensors");
    let run = nibble(&[
        "quantize",
        s(&model),
        "--format",
        "f16",
        "--output",
        s(&half),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let (stored, on_load) = (
        dir.join("stored.safetensors"),
        dir.join("on_load.safetensors"),
    );
    let a = nibble_json(&[
        "eval",
        "--model",
        s(&half),
        "--data",
        s(&digits),
        "--logits",
        s(&stored),
        "--json",
    ]);
    let b = nibble_json(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&digits),
        "--format",
        "f16",
        "--logits",
        s(&on_load),
        "--json",
    ]);
    assert_eq!(a["rows"][0]["format"], "f16", "{a}");
    assert_eq!(a["rows"][0]["bytes"], b["rows"][0]["bytes"], "{a} {b}");
    assert_eq!(tensor(&stored, "logits"), tensor(&on_load, "logits"));
    let all = nibble_json(&[
        "eval",
        "--model",
        s(&half),
        "--data",
        s(&digits),
        "--format",
        "all",
        "--json",
    ]);
    let names: Vec<&str> = all["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["format"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["f16", "int8", "q4", "nf4", "nf4_dq", "lower"],
        "{all}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `finetune` names the format its base holds, as `eval` labels it: a file quantized to q4
/// and trained with `--format f32` (the default of eval) trains over q4 weights, and a file
/// quantized in part over `f32+nf4` ones (the report said `f32`, the `--format` given, while
/// `accuracy_before` was the quantized model's).
#[test]
fn finetune_names_the_format_a_quantized_file_holds() {
    let dir = tmpdir("finetune_quantized_label");
    let model = data("digits_mlp.pth");
    let digits = data("digits.safetensors");
    for (format, include, want) in [("q4", None, "q4"), ("nf4", Some(r"^5\."), "f32+nf4")] {
        let out = dir.join(format!("{format}.safetensors"));
        let mut args = vec![
            "quantize",
            s(&model),
            "--format",
            format,
            "--output",
            s(&out),
        ];
        if let Some(re) = include {
            args.extend(["--include", re]);
        }
        let run = nibble(&args);
        assert!(run.ok, "{}", run.stderr);
        let eval = nibble_json(&["eval", "--model", s(&out), "--data", s(&digits), "--json"]);
        assert_eq!(eval["rows"][0]["format"], want, "{eval}");
        let common = [
            "--model",
            s(&out),
            "--data",
            s(&digits),
            "--format",
            "f32",
            "--rank",
            "2",
            "--steps",
            "2",
        ];
        let mut json = vec!["finetune"];
        json.extend(common);
        json.push("--json");
        let report = nibble_json(&json);
        assert_eq!(report["format"], want, "{report}");
        assert_eq!(
            report["accuracy_before"], eval["rows"][0]["accuracy"],
            "{report} {eval}"
        );
        let mut text = vec!["finetune"];
        text.extend(common);
        let run = nibble(&text);
        assert!(
            run.ok && run.stdout.starts_with(&format!("{want} base,")),
            "{}{}",
            run.stdout,
            run.stderr
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Finite weights whose logits overflow f32 on the data are an error naming the format, the
/// row and the value: their loss and cosine are NaN, which `--json` printed as `null` (and the
/// table as `NaN`, exit status 0).
#[test]
fn logits_that_overflow_are_an_error_not_null_figures() {
    let dir = tmpdir("overflowing_logits");
    let model = dir.join("huge.safetensors");
    let (w0, w1): (Vec<f32>, Vec<f32>) = ((0..6).map(|i| i as f32 - 2.5).collect(), vec![3e37; 6]);
    write(
        &model,
        &[
            f32s("0.weight", &[3, 2], &w0),
            f32s("0.bias", &[3], &[0.0; 3]),
            f32s("2.weight", &[2, 3], &w1),
            f32s("2.bias", &[2], &[0.0; 2]),
        ],
    );
    let digits = dir.join("data.safetensors");
    write(
        &digits,
        &[
            f32s("x_test", &[2, 2], &[100.0, -100.0, -100.0, 100.0]),
            i64s("y_test", &[0, 1]),
        ],
    );
    for format in ["f32", "int8"] {
        for json in [true, false] {
            let mut args = model_data_args("eval", &model, &digits, &["--format", format]);
            if json {
                args.push("--json");
            }
            let msg = nibble_fails(&args);
            assert!(
                msg.contains("overflows f32") && msg.contains("test row 1") && msg.contains("inf"),
                "{msg}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A whole pickled model (`torch.save(model)`; `tests/data/whole_mix.pth`, an nn.Sequential
/// inside DataParallel with a Dropout in front, LeakyReLU(0.2), LayerNorms of eps 1e-3, one
/// without affine, GELU(tanh), SiLU and an RMSNorm(eps=1e-4)) runs with the layers its modules
/// name, no flag given: PyTorch's logits (such a file was refused; as a state dict it needs
/// `--activation`, `--norm` and the epsilons). Flags given win over the file, each over what
/// it says alone. A module nibble
/// does not compute (a Softmax after the last Linear) is an error naming it.
#[test]
fn whole_pickled_models_run_with_the_layers_their_modules_name() {
    let dir = tmpdir("whole_models");
    let io = data("whole_mix_io.safetensors");
    let d = dir.join("d.safetensors");
    write(
        &d,
        &[
            f32s("x_test", &[5, 6], &tensor(&io, "x")),
            i64s("y_test", &[0, 1, 2, 0, 1]),
            f32s("x_train", &[5, 6], &tensor(&io, "x")),
            i64s("y_train", &[0, 1, 2, 0, 1]),
        ],
    );
    let model = data("whole_mix.pth");
    let logits = |flags: &[&str], name: &str| {
        let out = dir.join(name);
        let mut args = vec!["--logits", s(&out), "--json"];
        args.extend_from_slice(flags);
        nibble_json(&model_data_args("eval", &model, &d, &args));
        tensor(&out, "logits")
    };
    let want = tensor(&io, "logits");
    let diff = max_diff(&logits(&[], "pickled.safetensors"), &want);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    let flagged = logits(&["--activation", "relu"], "flagged.safetensors");
    assert!(
        max_diff(&flagged, &want) > 1e-3,
        "the flags changed nothing"
    );
    // Each flag replaces only what it says: the file's own gaps given as --activation keep its
    // norm kinds and epsilons (the RMSNorm ran as a LayerNorm, every eps at 1e-5), and its
    // own norm kinds given as --norm keep its gaps (which fell back to relu).
    for (flags, name) in [
        (
            &[
                "--activation",
                "identity,leaky_relu:0.2,gelu_tanh,layer_norm+silu",
            ][..],
            "own_gaps.safetensors",
        ),
        (&["--norm", "layer,rms"][..], "own_norms.safetensors"),
        (&["--layer-norm-eps", "1e-3"][..], "own_eps.safetensors"),
    ] {
        let diff = max_diff(&logits(flags, name), &want);
        assert!(
            diff < 1e-5,
            "{flags:?}: logits differ from PyTorch's by {diff}"
        );
    }
    // An epsilon given replaces the file's own, with a note (it yielded to the file's without a
    // word, so `--layer-norm-eps 0.5` changed nothing); the same value as the file's needs none.
    for (eps, differs) in [("0.5", true), ("1e-3", false)] {
        let out = dir.join("eps.safetensors");
        let run = nibble(&model_data_args(
            "eval",
            &model,
            &d,
            &["--layer-norm-eps", eps, "--logits", s(&out)],
        ));
        assert!(run.ok, "{}", run.stderr);
        let note = format!("--layer-norm-eps {eps} replaces the pickled model's own eps, 0.001");
        let note = note.replace("1e-3 ", "0.001 ");
        assert_eq!(run.stderr.contains(&note), differs, "{eps}: {}", run.stderr);
        let diff = max_diff(&tensor(&out, "logits"), &want);
        assert_eq!(diff > 1e-3, differs, "{eps}: logits differ by {diff}");
    }
    // Quantized, the file keeps the layers (the module list travels in its metadata) and,
    // though its keys lose DataParallel's `module.`, its weights' shapes: a 10-wide Q4 layer
    // stored flat needs its `nibble.shape.module.5.weight`, which eval looked up as `5.weight`.
    let q4 = dir.join("q4.safetensors");
    let run = nibble(&["quantize", s(&model), "--format", "q4", "--output", s(&q4)]);
    assert!(run.ok, "{}", run.stderr);
    let on_load = logits(&["--format", "q4"], "on_load.safetensors");
    let out = dir.join("stored.safetensors");
    nibble_json(&model_data_args(
        "eval",
        &q4,
        &d,
        &["--logits", s(&out), "--json"],
    ));
    assert_eq!(tensor(&out, "logits"), on_load);
    // Training reads the same layers.
    let run = nibble(&model_data_args(
        "finetune",
        &model,
        &d,
        &["--format", "q4", "--steps", "2", "--rank", "2", "--json"],
    ));
    assert!(run.ok, "{}", run.stderr);
    // Golden model `name`'s logits on x with no flag: PyTorch's (`<name>_io.safetensors`).
    let gives_pytorchs_logits = |name: &str| {
        let out = dir.join(format!("{name}.safetensors"));
        nibble_json(&model_data_args(
            "eval",
            &data(&format!("{name}.pth")),
            &d,
            &["--logits", s(&out), "--json"],
        ));
        let want = tensor(&data(&format!("{name}_io.safetensors")), "logits");
        let diff = max_diff(&tensor(&out, "logits"), &want);
        assert!(
            diff < 1e-5,
            "{name}: logits differ from PyTorch's by {diff}"
        );
    };
    // A module of the model's own class with a 2-D weight (a subclass of nn.Linear) is a
    // Linear, as in a state dict.
    gives_pytorchs_logits("whole_subclass");
    // `inspect` says what eval and finetune read from the file.
    let run = nibble(&["inspect", s(&model)]);
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout.contains(
            "--activation identity,leaky_relu:0.2,gelu_tanh,layer_norm+silu, --norm layer,rms"
        ),
        "{}",
        run.stdout
    );
    // Sequentials nested in the Sequential run as one chain, their activations read too.
    gives_pytorchs_logits("whole_nested");
    // A model of its own class: the activations registered between its layers (inside its
    // nn.Sequential, and a module of its own between a norm and the head) and its RMSNorm's
    // kind and eps are read (relu ran in every gap, the RMSNorm as a LayerNorm); a Dropout
    // alone between two layers leaves the default relu (the model applies F.relu there).
    gives_pytorchs_logits("whole_named");
    gives_pytorchs_logits("whole_named_dropout");
    // A subclass of nn.Sequential with a norm runs as the Sequential it is (it was refused:
    // "2 activations given for the 1 gaps", no flag given).
    gives_pytorchs_logits("whole_seq_subclass");
    // Nothing before a norm, and nothing after an input norm (`fc → bn → relu`: relu ran
    // before each BatchNorm too).
    gives_pytorchs_logits("whole_named_norms");
    // A loss with class weights registered in the model is no layer (its weights ran as a
    // LayerNorm after the head).
    gives_pytorchs_logits("whole_named_loss");
    let run = nibble(&["inspect", s(&data("whole_named_loss.pth"))]);
    assert!(
        run.ok
            && run
                .stdout
                .contains("its loss `criterion` is no layer and left out"),
        "{}",
        run.stdout
    );
    // One activation module registered last and called after each hidden layer.
    gives_pytorchs_logits("whole_named_shared_act");
    // Hardtanh(0, 6) is ReLU6, and every dropout (Dropout1d) the identity in eval mode (both
    // were refused).
    gives_pytorchs_logits("whole_seq_relu6_dropout1d");
    // An activation nibble computes only with PyTorch's default settings: the error names the
    // setting.
    let msg = nibble_fails(&model_data_args(
        "eval",
        &data("whole_softplus_beta.pth"),
        &d,
        &[],
    ));
    assert!(msg.contains("Softplus") && msg.contains("beta=2"), "{msg}");
    // A BatchNorm1d without running statistics: refused (it ran as a LayerNorm).
    let msg = nibble_fails(&model_data_args(
        "eval",
        &data("whole_bn_batch_stats.pth"),
        &d,
        &[],
    ));
    assert!(
        msg.contains("track_running_stats=False") && msg.contains("`1`"),
        "{msg}"
    );
    let msg = nibble_fails(&model_data_args(
        "eval",
        &data("whole_softmax_end.pth"),
        &d,
        &[],
    ));
    assert!(msg.contains("Softmax") && msg.contains("`1`"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}
