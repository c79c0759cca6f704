//! Every kind of bad input the issue names gives a clean error (exit status 1, no panic) that
//! names the file, the key, the index and the expected and found values.

mod common;
use common::*;
use nibble_io::DType;
use std::path::{Path, PathBuf};

/// A valid digits-shaped data file with `n` rows of `features` features, labels `i % 10`.
fn rows(n: usize, features: usize) -> (Vec<f32>, Vec<i64>) {
    let x = (0..n * features).map(|i| (i % 17) as f32 / 16.0).collect();
    let y = (0..n as i64).map(|i| i % 10).collect();
    (x, y)
}

fn eval_on(name: &str, entries: &[Entry]) -> (PathBuf, String) {
    let dir = tmpdir(name);
    let path = dir.join(format!("{name}.safetensors"));
    write(&path, entries);
    let model = data("digits_mlp.pth");
    let msg = nibble_fails(&model_data_args("eval", &model, &path, &[]));
    assert!(
        msg.contains(&format!("{name}.safetensors")),
        "no file name: {msg}"
    );
    (path, msg)
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing from: {msg}");
    }
}

#[test]
fn label_out_of_range_names_key_index_and_values() {
    let (x, mut y) = rows(12, 64);
    y[7] = 10;
    let (_, msg) = eval_on(
        "label10",
        &[f32s("x_test", &[12, 64], &x), i64s("y_test", &y)],
    );
    assert_names(&msg, &["y_test", "index 7", "0..10", "found 10"]);
    let (x, mut y) = rows(12, 64);
    y[3] = -1;
    let (_, msg) = eval_on(
        "negative",
        &[f32s("x_test", &[12, 64], &x), i64s("y_test", &y)],
    );
    assert_names(&msg, &["y_test", "index 3", "found -1"]);
}

#[test]
fn labels_of_every_accepted_integer_dtype_are_read() {
    let (x, y) = rows(20, 64);
    let dir = tmpdir("dtypes");
    let model = data("digits_mlp.pth");
    let mut accuracies = Vec::new();
    for (dtype, bytes) in [
        (
            DType::I64,
            y.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        ),
        (
            DType::I32,
            y.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect(),
        ),
        (DType::U8, y.iter().map(|v| *v as u8).collect()),
    ] {
        let path = dir.join(format!("{dtype}.safetensors"));
        write(
            &path,
            &[
                f32s("x_test", &[20, 64], &x),
                ("y_test".into(), dtype, vec![20], bytes),
            ],
        );
        let v = nibble_json(&model_data_args("eval", &model, &path, &["--json"]));
        accuracies.push(v["rows"][0]["accuracy"].clone());
    }
    assert_eq!(accuracies[0], accuracies[1]);
    assert_eq!(accuracies[0], accuracies[2]);
}

#[test]
fn n_mismatched_between_x_and_y() {
    let (x, y) = rows(12, 64);
    let (_, msg) = eval_on(
        "mismatch",
        &[f32s("x_test", &[12, 64], &x), i64s("y_test", &y[..11])],
    );
    assert_names(&msg, &["y_test", "[12]", "[11]"]);
}

#[test]
fn nan_and_infinite_features() {
    for (name, bad) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let (mut x, y) = rows(12, 64);
        x[5 * 64 + 9] = bad;
        let (_, msg) = eval_on(name, &[f32s("x_test", &[12, 64], &x), i64s("y_test", &y)]);
        assert_names(&msg, &["x_test", "index 329", "row 5, column 9", "finite"]);
    }
}

/// Labels are read from any integer type, bool, or a float type holding whole numbers (as
/// binary targets are often kept), `[N]` or `[N, 1]`: the same evaluation as i64 labels. A
/// fractional, negative or non-finite float label, and a shape of more than one label per row,
/// are errors naming the key, the index and the value or shape.
#[test]
fn labels_of_any_integer_or_whole_float_type() {
    let (x, y) = rows(4, 64);
    let dir = tmpdir("ylabels");
    let model = data("digits_mlp.pth");
    let run = |name: &str, entry: Entry| {
        let path = dir.join(name);
        write(&path, &[f32s("x_test", &[4, 64], &x), entry]);
        let out = nibble(&model_data_args("eval", &model, &path, &["--json"]));
        assert!(out.ok, "{name}: {}", out.stderr);
        serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["rows"].clone()
    };
    let want = run("i64.safetensors", i64s("y_test", &y));
    let as_f32: Vec<f32> = y.iter().map(|v| *v as f32).collect();
    let le = |size: usize| -> Vec<u8> {
        y.iter()
            .flat_map(|v| v.to_le_bytes()[..size].to_vec())
            .collect()
    };
    let f64_bytes: Vec<u8> = y.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
    for (name, entry) in [
        ("f32.safetensors", f32s("y_test", &[4], &as_f32)),
        ("col.safetensors", f32s("y_test", &[4, 1], &as_f32)),
        (
            "f64.safetensors",
            ("y_test".into(), DType::F64, vec![4], f64_bytes),
        ),
        (
            "i16.safetensors",
            ("y_test".into(), DType::I16, vec![4], le(2)),
        ),
        (
            "i8.safetensors",
            ("y_test".into(), DType::I8, vec![4, 1], le(1)),
        ),
        // NumPy's unsigned types, as `safetensors.numpy` writes them.
        (
            "u16.safetensors",
            ("y_test".into(), DType::U16, vec![4], le(2)),
        ),
        (
            "u32.safetensors",
            ("y_test".into(), DType::U32, vec![4], le(4)),
        ),
        (
            "u64.safetensors",
            ("y_test".into(), DType::U64, vec![4, 1], le(8)),
        ),
    ] {
        assert_eq!(run(name, entry), want, "{name}");
    }
    for (name, value, shown) in [
        ("half", 0.5f32, "0.5"),
        ("neg", -1.0, "-1"),
        ("nan", f32::NAN, "NaN"),
    ] {
        let mut bad = as_f32.clone();
        bad[2] = value;
        let (_, msg) = eval_on(
            &format!("y{name}"),
            &[f32s("x_test", &[4, 64], &x), f32s("y_test", &[4], &bad)],
        );
        assert_names(
            &msg,
            &["y_test", "index 2", "whole, non-negative label", shown],
        );
    }
    // Whole and non-negative but past any index: said as such (it was "not whole").
    let mut huge = as_f32.clone();
    huge[1] = 1e20;
    let (_, msg) = eval_on(
        "yhuge",
        &[f32s("x_test", &[4, 64], &x), f32s("y_test", &[4], &huge)],
    );
    assert_names(
        &msg,
        &["y_test", "index 1", "beyond any index", "1000000020040877"],
    );
    let (_, msg) = eval_on(
        "ywide",
        &[
            f32s("x_test", &[4, 64], &x),
            f32s("y_test", &[2, 2], &as_f32),
        ],
    );
    assert_names(&msg, &["y_test", "[4] or [4, 1]", "[2, 2]"]);
}

#[test]
fn wrong_dtypes() {
    let (x, y) = rows(4, 64);
    let flags: Vec<u8> = x.iter().map(|v| u8::from(*v > 0.5)).collect();
    let (_, msg) = eval_on(
        "xbool",
        &[
            ("x_test".into(), DType::Bool, vec![4, 64], flags),
            i64s("y_test", &y),
        ],
    );
    assert_names(
        &msg,
        &["x_test", "f32, f16, bf16, f64 or an integer type", "bool"],
    );
}

/// Integer features (raw u8 pixels, i8, i16, i32, i64, u16, u32, u64; here as `[N, 8, 8]` images) are
/// converted to f32 as PyTorch's `.float()` converts them: the same evaluation as their f32
/// copy.
#[test]
fn integer_features_read_as_f32() {
    let y: Vec<i64> = (0..4).collect();
    let dir = tmpdir("xinteger");
    let model = data("digits_mlp.pth");
    let pixels: Vec<i64> = (0..4 * 64).map(|i| (i * 37 % 17) as i64).collect();
    let run = |name: &str, entry: Entry| {
        let path = dir.join(name);
        write(&path, &[entry, i64s("y_test", &y)]);
        let out = nibble(&model_data_args("eval", &model, &path, &["--json"]));
        assert!(out.ok, "{name}: {}", out.stderr);
        serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["rows"].clone()
    };
    let as_f32: Vec<f32> = pixels.iter().map(|&v| v as f32).collect();
    let want = run("f32.safetensors", f32s("x_test", &[4, 64], &as_f32));
    let bytes = |size: usize| -> Vec<u8> {
        pixels
            .iter()
            .flat_map(|v| v.to_le_bytes()[..size].to_vec())
            .collect()
    };
    for (name, dtype, size) in [
        ("u8", DType::U8, 1),
        ("i8", DType::I8, 1),
        ("i16", DType::I16, 2),
        ("i32", DType::I32, 4),
        ("i64", DType::I64, 8),
        ("u16", DType::U16, 2),
        ("u32", DType::U32, 4),
        ("u64", DType::U64, 8),
    ] {
        let got = run(
            &format!("{name}.safetensors"),
            ("x_test".into(), dtype, vec![4, 8, 8], bytes(size)),
        );
        assert_eq!(got, want, "{name}");
    }
}

/// Features saved from NumPy without `.astype("float32")` are f64: they are rounded to f32,
/// as PyTorch's `torch.from_numpy(x).float()` would, and evaluate as the f32 copy does; an f64
/// beyond f32's range is reported as not finite.
#[test]
fn f64_features_read_as_f32() {
    let (x, y) = rows(4, 64);
    let dir = tmpdir("xdouble");
    let model = data("digits_mlp.pth");
    let run = |name: &str, entry: Entry| {
        let path = dir.join(name);
        write(&path, &[entry, i64s("y_test", &y)]);
        nibble(&model_data_args("eval", &model, &path, &["--json"]))
    };
    let x64 = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let wide: Vec<f64> = x.iter().map(|v| f64::from(*v)).collect();
    let a = run(
        "x64.safetensors",
        ("x_test".into(), DType::F64, vec![4, 64], x64(&wide)),
    );
    let b = run("x32.safetensors", f32s("x_test", &[4, 64], &x));
    assert!(a.ok && b.ok, "{}{}", a.stderr, b.stderr);
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&a.stdout).unwrap(),
        serde_json::from_str(&b.stdout).unwrap(),
    );
    assert_eq!(a["rows"], b["rows"]);
    let mut huge = wide;
    huge[70] = 1e300;
    let (_, msg) = eval_on(
        "xhuge",
        &[
            ("x_test".into(), DType::F64, vec![4, 64], x64(&huge)),
            i64s("y_test", &y),
        ],
    );
    assert_names(&msg, &["x_test", "row 1, column 6", "finite"]);
}

#[test]
fn wrong_rank_and_missing_keys() {
    let (x, y) = rows(4, 64);
    let (_, msg) = eval_on("rank1", &[f32s("x_test", &[256], &x), i64s("y_test", &y)]);
    assert_names(&msg, &["x_test", "[N, features]", "[256]"]);
    // Images of 4 x 8 for a model of 64 features: flattened to 32, which is the wrong width.
    let (_, msg) = eval_on(
        "rank3",
        &[
            f32s("x_test", &[8, 4, 8], &rows(8, 32).0),
            i64s("y_test", &rows(8, 32).1),
        ],
    );
    assert_names(&msg, &["x_test", "64 features", "[8, 32]"]);
    let (_, msg) = eval_on("noy", &[f32s("x_test", &[4, 64], &x)]);
    assert_names(&msg, &["y_test"]);
}

/// `[N, 8, 8]` images (digits as `load_digits().images` holds them) are flattened per row, as
/// `nn.Flatten` does: the same evaluation as `[N, 64]`.
#[test]
fn images_are_flattened_per_row() {
    let (x, y) = rows(4, 64);
    let dir = tmpdir("images");
    let (flat, images) = (dir.join("flat.safetensors"), dir.join("images.safetensors"));
    write(&flat, &[f32s("x_test", &[4, 64], &x), i64s("y_test", &y)]);
    write(
        &images,
        &[f32s("x_test", &[4, 8, 8], &x), i64s("y_test", &y)],
    );
    let model = data("digits_mlp.pth");
    let run = |d: &std::path::Path| {
        let logits = dir.join(format!(
            "{}.logits.safetensors",
            d.file_stem().unwrap().to_str().unwrap()
        ));
        nibble_json(&model_data_args(
            "eval",
            &model,
            d,
            &["--logits", s(&logits), "--json"],
        ));
        tensor(&logits, "logits")
    };
    assert_eq!(run(&flat), run(&images));
}

#[test]
fn feature_count_must_be_the_models_input_width() {
    let (x, y) = rows(4, 63);
    let (_, msg) = eval_on(
        "width63",
        &[f32s("x_test", &[4, 63], &x), i64s("y_test", &y)],
    );
    assert_names(&msg, &["x_test", "64 features", "[4, 63]"]);
}

#[test]
fn finetune_needs_a_training_split() {
    let (x, y) = rows(4, 64);
    let dir = tmpdir("notrain");
    let path = dir.join("test_only.safetensors");
    write(&path, &[f32s("x_test", &[4, 64], &x), i64s("y_test", &y)]);
    let model = data("digits_mlp.pth");
    let msg = nibble_fails(&model_data_args(
        "finetune",
        &model,
        &path,
        &["--format", "q4", "--rank", "2", "--steps", "1"],
    ));
    assert_names(&msg, &["test_only.safetensors", "x_train"]);
}

#[test]
fn models_that_are_not_a_sequential_of_linear_and_layernorm() {
    let dir = tmpdir("models");
    let (x, y) = rows(4, 8);
    let d = dir.join("d.safetensors");
    write(&d, &[f32s("x_test", &[4, 8], &x), i64s("y_test", &y)]);
    let cases: Vec<(&str, Vec<Entry>, &[&str])> = vec![
        (
            "named",
            vec![f32s("encoder.scale", &[10, 8], &[0.1; 80])],
            &["encoder.scale", "is not a parameter"],
        ),
        (
            "conv",
            vec![
                f32s("0.weight", &[10, 8, 1, 1], &[0.1; 80]),
                f32s("0.bias", &[10], &[0.0; 10]),
            ],
            &["0.weight", "[10, 8, 1, 1]"],
        ),
        (
            "chain",
            vec![
                f32s("0.weight", &[10, 8], &[0.1; 80]),
                f32s("0.bias", &[10], &[0.0; 10]),
                f32s("2.weight", &[3, 9], &[0.1; 27]),
                f32s("2.bias", &[3], &[0.0; 3]),
            ],
            &["2.weight", "9"],
        ),
        ("empty", vec![], &["empty.safetensors"]),
        // A model of no outputs: it is named, not the data (its labels were "not in 0..0").
        (
            "no_outputs",
            vec![f32s("0.weight", &[0, 8], &[])],
            &["--model", "0 outputs"],
        ),
    ];
    for (name, entries, parts) in cases {
        let m = dir.join(format!("{name}.safetensors"));
        write(&m, &entries);
        let msg = nibble_fails(&model_data_args("eval", &m, &d, &[]));
        assert_names(&msg, &[&format!("{name}.safetensors")]);
        assert_names(&msg, parts);
    }
}

/// An adapter directory (PEFT layout) with the given config text and tensors.
fn adapter(dir: &Path, config: &str, entries: &[Entry]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    write(&dir.join("adapter_model.safetensors"), entries);
    dir.to_path_buf()
}

#[test]
fn adapters_whose_names_or_shapes_do_not_match_the_model() {
    let dir = tmpdir("adapters");
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    let config = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0"]}"#;
    let a = |name: &str, shape: &[usize]| f32s(name, shape, &vec![0.01; shape.iter().product()]);
    let cases: Vec<(&str, Vec<Entry>, &[&str])> = vec![
        (
            "unknown_module",
            vec![
                a("base_model.model.7.lora_A.weight", &[2, 64]),
                a("base_model.model.7.lora_B.weight", &[30, 2]),
            ],
            &["base_model.model.7.lora_A.weight"],
        ),
        (
            "wrong_shape",
            vec![
                a("base_model.model.0.lora_A.weight", &[2, 63]),
                a("base_model.model.0.lora_B.weight", &[30, 2]),
            ],
            &["base_model.model.0.lora_A.weight", "[2, 64]", "[2, 63]"],
        ),
        (
            "layernorm_target",
            vec![
                a("base_model.model.2.lora_A.weight", &[2, 30]),
                a("base_model.model.2.lora_B.weight", &[30, 2]),
            ],
            &["base_model.model.2.lora_A.weight"],
        ),
        (
            "lone_a",
            vec![a("base_model.model.0.lora_A.weight", &[2, 64])],
            &["0"],
        ),
        (
            "bias_twice",
            vec![
                a("base_model.model.0.lora_A.weight", &[2, 64]),
                a("base_model.model.0.lora_B.weight", &[30, 2]),
                a("base_model.model.3.bias", &[20]),
                a("base_model.model.3.modules_to_save.default.bias", &[20]),
            ],
            &[
                "base_model.model.3.bias",
                "base_model.model.3.modules_to_save.default.bias",
                "both give the bias of module 3",
            ],
        ),
    ];
    for (name, entries, parts) in cases {
        let dir = adapter(&dir.join(name), config, &entries);
        let msg = nibble_fails(&model_data_args(
            "eval",
            &model,
            &digits,
            &["--adapter", s(&dir)],
        ));
        assert_names(&msg, &[name]);
        assert_names(&msg, parts);
    }
    let dir = adapter(&dir.join("not_json"), "{\"peft_type\": ", &[]);
    let msg = nibble_fails(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--adapter", s(&dir)],
    ));
    assert_names(&msg, &["adapter_config.json"]);
    // Another PEFT method's adapter: its type said plainly (it read `Some("VERA")`).
    let dir = adapter(&dir.join("vera"), r#"{"peft_type": "VERA", "r": 2}"#, &[]);
    let msg = nibble_fails(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--adapter", s(&dir)],
    ));
    assert_names(&msg, &["found \"VERA\" (nibble reads LoRA and DoRA"]);
    assert!(!msg.contains("Some("), "{msg}");
    // The adapter's weights file given for its directory.
    let file = dir.join("adapter_model.safetensors");
    let msg = nibble_fails(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--adapter", s(&file)],
    ));
    assert_names(
        &msg,
        &["adapter_model.safetensors", "is a file", "directory"],
    );
    // Finite tensors that the config's scale takes past f32's range: the scale is named.
    let huge = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 1e308, "target_modules": ["0"]}"#;
    let dir = adapter(
        &dir.join("huge_alpha"),
        huge,
        &[
            a("base_model.model.0.lora_A.weight", &[2, 64]),
            a("base_model.model.0.lora_B.weight", &[30, 2]),
        ],
    );
    let msg = nibble_fails(&model_data_args(
        "eval",
        &model,
        &digits,
        &["--adapter", s(&dir)],
    ));
    assert_names(
        &msg,
        &[
            "lora_alpha / r",
            "adapter_config.json",
            "beyond f32's range",
        ],
    );
}

#[test]
fn finetune_arguments_are_checked() {
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    // 1e39 parses as an infinite f32.
    for (flag, value) in [
        ("--rank", "0"),
        ("--batch", "0"),
        ("--lr", "0"),
        ("--lr", "1e39"),
    ] {
        let mut args = model_data_args(
            "finetune",
            &model,
            &digits,
            &["--format", "q4", "--steps", "1"],
        );
        if flag != "--rank" {
            args.extend(["--rank", "2"]);
        }
        args.extend([flag, value]);
        let msg = nibble_fails(&args);
        assert_names(&msg, &[flag]);
    }
    let dir = tmpdir("finetune_args");
    // Saving the adapter where an input lives would overwrite it.
    let copy = dir.join("adapter_model.safetensors");
    std::fs::copy(&digits, &copy).unwrap();
    let msg = nibble_fails(&model_data_args(
        "finetune",
        &model,
        &copy,
        &[
            "--format",
            "q4",
            "--rank",
            "2",
            "--steps",
            "1",
            "--save-adapter",
            s(&dir),
        ],
    ));
    assert_names(&msg, &["refusing to write over an input"]);
}

/// A reader that closes the pipe early (`nibble inspect … | head -1`) ends the program quietly,
/// never with a panic on the failed print.
#[test]
fn a_closed_stdout_pipe_is_no_panic() {
    use std::process::{Command, Stdio};
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
            .args(["inspect", s(&data("digits_mlp.pth"))])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && out.status.code() != Some(101),
            "{:?}: {stderr}",
            out.status
        );
    }
}

/// An output path that exists as a symbolic link (here to another file) or a FIFO is refused
/// with a message naming it, and left exactly as it was: the write-then-rename would otherwise
/// have replaced it with a regular file (as it did `/dev/null`, run as root).
#[cfg(unix)]
#[test]
fn an_output_that_is_a_symlink_or_a_fifo_is_refused_and_left_intact() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tmpdir("output-symlink");
    let target = dir.join("precious.bin");
    std::fs::write(&target, b"precious").unwrap();
    let link = dir.join("out.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let model = data("seq_d30.pth");
    let msg = nibble_fails(&[
        "quantize",
        s(&model),
        "--format",
        "q4",
        "--output",
        s(&link),
    ]);
    assert_names(
        &msg,
        &[
            &link.display().to_string(),
            "symbolic link",
            "refusing to replace it",
        ],
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_link(&link).unwrap(), target);
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");

    let fifo = dir.join("fifo.safetensors");
    match std::process::Command::new("mkfifo").arg(&fifo).status() {
        Ok(st) if st.success() => {
            let msg = nibble_fails(&[
                "quantize",
                s(&model),
                "--format",
                "q4",
                "--output",
                s(&fifo),
            ]);
            assert_names(&msg, &[&fifo.display().to_string(), "FIFO"]);
            assert!(std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo());
        }
        other => println!("skipping the FIFO case: mkfifo unavailable ({other:?})"),
    }
    // Nothing else (no temporary file) was left behind.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.retain(|n| n != "fifo.safetensors");
    names.sort();
    assert_eq!(names, ["out.safetensors", "precious.bin"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Layers wide but empty (`[2^40, 0]`, `[0, 2^40]`: no bytes in a 300-byte file) are refused
/// before any allocation, naming what they need and what the machine has: eval, finetune and
/// quantize into int8 or lower (per-row scales of 2^40 rows) aborted the process
/// ("memory allocation of 4398046511104 bytes failed").
#[test]
fn layers_wider_than_the_machine_are_refused_not_aborted() {
    let dir = tmpdir("wide_empty_layers");
    let wide = 1usize << 40;
    let model = dir.join("wide.safetensors");
    write(
        &model,
        &[
            f32s("0.weight", &[wide, 0], &[]),
            f32s("2.weight", &[0, wide], &[]),
            f32s("4.weight", &[2, 0], &[]),
            f32s("4.bias", &[2], &[0.5, -0.5]),
        ],
    );
    let data = dir.join("data.safetensors");
    write(
        &data,
        &[
            f32s("x_train", &[1, 0], &[]),
            i64s("y_train", &[1]),
            f32s("x_test", &[1, 0], &[]),
            i64s("y_test", &[0]),
        ],
    );
    let (m, d) = (s(&model), s(&data));
    for format in ["f32", "int8", "q4"] {
        let msg = nibble_fails(&["eval", "--model", m, "--data", d, "--format", format]);
        assert_names(
            &msg,
            &["--data", "1099511627776 wide", "GiB", "this machine has"],
        );
    }
    let msg = nibble_fails(&[
        "finetune", "--model", m, "--data", d, "--format", "f32", "--rank", "1", "--steps", "1",
    ]);
    assert_names(&msg, &["1099511627776 wide", "GiB"]);
    for format in ["int8", "lower"] {
        let out = dir.join(format!("{format}.safetensors"));
        let msg = nibble_fails(&["quantize", m, "--format", format, "--output", s(&out)]);
        assert_names(&msg, &["wide.safetensors", "`0.weight`", "GiB"]);
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A norm's epsilon that is not a positive finite number is an error naming its flag, for
/// eval and finetune, negative values included (clap took `-1` for an unknown argument, and
/// a NaN was reported as `layer `0`'s, with no flag or file).
#[test]
fn norm_epsilons_must_be_positive_and_finite() {
    let (model, digits) = (data("digits_mlp.pth"), data("digits.safetensors"));
    for flag in ["--layer-norm-eps", "--batch-norm-eps", "--rms-norm-eps"] {
        for value in ["nan", "-1", "0", "inf"] {
            for verb in ["eval", "finetune"] {
                let mut extra = vec![flag, value];
                if verb == "finetune" {
                    extra.extend_from_slice(&["--format", "f32", "--rank", "2", "--steps", "1"]);
                }
                let msg = nibble_fails(&model_data_args(verb, &model, &digits, &extra));
                assert_names(&msg, &[flag, "positive number"]);
            }
        }
    }
}

/// `--activation` on a model of Linears at consecutive indices (an nn.ModuleList's state dict)
/// is an error: there is no gap for it, and it was ignored without a word while the layers
/// ran back to back.
#[test]
fn an_activation_for_a_model_without_gaps_is_an_error() {
    let dir = tmpdir("no_gaps");
    let (x, _) = rows(4, 6);
    let d = dir.join("d.safetensors");
    write(
        &d,
        &[f32s("x_test", &[4, 6], &x), i64s("y_test", &[0, 1, 2, 0])],
    );
    let m = dir.join("layers.safetensors");
    write(
        &m,
        &[
            f32s("layers.0.weight", &[8, 6], &[0.1; 48]),
            f32s("layers.1.weight", &[3, 8], &[0.1; 24]),
        ],
    );
    let msg = nibble_fails(&model_data_args("eval", &m, &d, &["--activation", "relu"]));
    assert_names(
        &msg,
        &["--activation", "no gap between its layers", "layers.0"],
    );
    // Without the flag it runs, and its note says the layers run back to back.
    let out = nibble(&model_data_args("eval", &m, &d, &[]));
    assert!(
        out.ok && out.stderr.contains("consecutive indices"),
        "{}",
        out.stderr
    );
}
