//! The `bignet` program end to end: each verb's JSON keys, a forward through files against the
//! PyTorch golden output, and clear errors for bad input.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

fn bignet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bignet"))
        .args(args)
        .output()
        .expect("run bignet")
}

fn json(args: &[&str]) -> Value {
    let out = bignet(args);
    assert!(
        out.status.success(),
        "bignet {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

#[test]
fn stats_json_has_every_key_and_counts_parameters() {
    let v = json(&["stats", "bignet", "qlora", "--dim", "64", "--json"]);
    for variant in ["bignet", "qlora"] {
        for key in [
            "trainable_params",
            "non_trainable_params",
            "total_params",
            "theoretical_mb",
            "actual_mb",
            "forward_mb",
            "forward_chunked_mb",
            "backward_mb",
        ] {
            assert!(v[variant][key].is_number(), "{variant}.{key} in {v}");
        }
    }
    // 18 layers of 64x64 + 64, 5 LayerNorms of 2x64.
    assert_eq!(
        v["bignet"]["trainable_params"],
        18 * (64 * 64 + 64) + 5 * 128
    );
    assert_eq!(v["qlora"]["trainable_params"], 18 * 2 * 32 * 64);
    // The total is a count, as its parts are (it was in millions, the table's unit: 0.07...).
    for variant in ["bignet", "qlora"] {
        let count = |key: &str| {
            v[variant][key]
                .as_u64()
                .unwrap_or_else(|| panic!("{key}: {v}"))
        };
        assert_eq!(
            count("total_params"),
            count("trainable_params") + count("non_trainable_params"),
            "{v}"
        );
    }
    assert!(v["bignet"]["actual_mb"].as_f64().unwrap() > 0.0);
    assert!(v["bignet"]["backward_mb"].as_f64().unwrap() > 0.0);
}

#[test]
fn compare_fit_and_bench_json() {
    let v = json(&[
        "compare",
        "bignet",
        "half_precision",
        "--dim",
        "64",
        "--json",
    ]);
    assert_eq!(v["a"], "bignet");
    assert_eq!(v["b"], "half_precision");
    let max = v["max_diff"].as_f64().unwrap();
    let mean = v["mean_diff"].as_f64().unwrap();
    assert!(max > 0.0 && max < 0.05 && mean <= max, "{v}");

    let v = json(&["fit", "lora", "--dim", "64", "--steps", "3", "--json"]);
    assert_eq!(v["variant"], "lora");
    assert_eq!(v["steps"], 3);
    assert_eq!(v["loss"].as_array().unwrap().len(), 3);
    assert_eq!(v["accuracy"].as_array().unwrap().len(), 3);
    assert!(v["best_accuracy"].as_f64().unwrap() > 0.0);

    let v = json(&[
        "bench", "bignet", "--dim", "64", "--batch", "1,8", "--runs", "2", "--train", "--json",
    ]);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{v}");
    assert!(v["threads"].as_u64().unwrap() >= 1);
    assert!(results[0]["forward_ms"].is_number());
    assert!(results[2]["train_step_ms"].is_number());
}

#[test]
fn forward_through_files_matches_pytorch() {
    let dir = std::env::temp_dir().join(format!("nibble-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_path = dir.join("y.safetensors");
    let out = bignet(&[
        "forward",
        "--variant",
        "bignet",
        "--weights",
        golden("bignet_d128.pth").to_str().unwrap(),
        "--input",
        golden("io_d128.safetensors").to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let y = nibble_bignet::checkpoint::Checkpoint::open(&out_path)
        .unwrap()
        .tensor_f32("y", Some(&[16, 128]))
        .unwrap();
    let want = nibble_bignet::checkpoint::Checkpoint::open(golden("io_d128.safetensors"))
        .unwrap()
        .tensor_f32("y.bignet", None)
        .unwrap();
    let (max, _) = y.abs_diff_stats(&want).unwrap();
    assert!(max < 1e-5, "{max}");
    std::fs::remove_dir_all(&dir).ok();
}

fn fails_with(args: &[&str], needle: &str) {
    let out = bignet(args);
    assert!(!out.status.success(), "bignet {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(needle),
        "stderr of {args:?} lacks {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_gives_clear_errors() {
    fails_with(
        &[
            "compare",
            "bignet",
            "lora",
            "--weights",
            "/no/such/file.pth",
        ],
        "/no/such/file.pth",
    );
    fails_with(&["stats", "biggest_net"], "biggest_net");
    // A width-128 input into a width-64 model.
    fails_with(
        &[
            "forward",
            "--variant",
            "bignet",
            "--dim",
            "64",
            "--input",
            golden("io_d128.safetensors").to_str().unwrap(),
            "--output",
            "/tmp/never-written.safetensors",
        ],
        "[batch, 64]",
    );
    // A file that is not a checkpoint.
    fails_with(
        &[
            "compare",
            "bignet",
            "lora",
            "--weights",
            env!("CARGO_MANIFEST_DIR"),
        ],
        env!("CARGO_MANIFEST_DIR"),
    );
    fails_with(
        &["fit", "low_precision", "--dim", "32", "--steps", "1"],
        "no trainable",
    );
    fails_with(&["bench", "bignet", "--threads", "0"], "--threads");
}

/// `--q4-activations int8` reaches the batch-1 Q4 kernels: a one-row forward of the golden
/// low_precision model changes (integer dot products round x), but stays within the int8
/// path's error of the f32 one and of PyTorch's output.
#[test]
fn q4_activations_option_switches_the_batch1_kernel() {
    use nibble_bignet::checkpoint::{write_safetensors, Checkpoint, DType};
    let dir = std::env::temp_dir().join(format!("nibble-cli-act-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let io = Checkpoint::open(golden("io_d128.safetensors")).unwrap();
    let x = io.tensor_f32("x", Some(&[16, 128])).unwrap();
    let want = io.tensor_f32("y.low_precision", Some(&[16, 128])).unwrap();
    let x0: Vec<f32> = x.data()[..128].to_vec();
    let in_path = dir.join("x1.safetensors");
    write_safetensors(
        &in_path,
        &[(
            "x".into(),
            DType::F32,
            vec![1, 128],
            bytemuck::cast_slice(&x0),
        )],
        &Default::default(),
    )
    .unwrap();
    let run = |act: &str| {
        let out_path = dir.join(format!("y-{act}.safetensors"));
        let out = bignet(&[
            "forward",
            "--variant",
            "low_precision",
            "--weights",
            golden("bignet_d128.pth").to_str().unwrap(),
            "--input",
            in_path.to_str().unwrap(),
            "--output",
            out_path.to_str().unwrap(),
            "--q4-activations",
            act,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Checkpoint::open(&out_path)
            .unwrap()
            .tensor_f32("y", Some(&[1, 128]))
            .unwrap()
    };
    let (f32_y, int8_y) = (run("f32"), run("int8"));
    let want0 = nibble_tensor::Tensor::from_vec(&[1, 128], want.data()[..128].to_vec()).unwrap();
    let (max_f32, _) = f32_y.abs_diff_stats(&want0).unwrap();
    assert!(max_f32 < 1e-5, "f32 path vs PyTorch: {max_f32}");
    let (max_int8, mean_int8) = int8_y.abs_diff_stats(&f32_y).unwrap();
    assert!(
        max_int8 > 0.0,
        "--q4-activations int8 did not change the kernel"
    );
    assert!(
        max_int8 < 0.05 && mean_int8 < 0.01,
        "int8 vs f32: max {max_int8} mean {mean_int8}"
    );
    fails_with(
        &["bench", "low_precision", "--q4-activations", "int4"],
        "expected f32 or int8",
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A fresh temporary directory for one test.
fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_ok(args: &[&str]) {
    let out = bignet(args);
    assert!(
        out.status.success(),
        "bignet {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A quantized checkpoint names its format, so the verbs run it without `--variant`; an
/// explicit variant the file cannot be is an error naming both.
#[test]
fn verbs_take_the_variant_the_weights_file_implies() {
    use nibble_bignet::checkpoint::Checkpoint;
    let dir = tempdir("implied");
    let q4 = dir.join("q4.safetensors");
    let q4s = q4.to_str().unwrap();
    let pth = golden("bignet_d128.pth");
    let io = golden("io_d128.safetensors");
    run_ok(&[
        "quantize",
        "--weights",
        pth.to_str().unwrap(),
        "--format",
        "q4",
        "--output",
        q4s,
    ]);
    // With an adapter, quantize would write the base without its LoRA products: refused,
    // pointing at merge, and nothing written.
    let adapted = dir.join("adapted_q4.safetensors");
    fails_with(
        &[
            "quantize",
            "--weights",
            pth.to_str().unwrap(),
            "--adapter",
            golden("peft_variants/bignet_d128").to_str().unwrap(),
            "--format",
            "q4",
            "--output",
            adapted.to_str().unwrap(),
        ],
        "bignet merge --into q4",
    );
    assert!(!adapted.exists());
    let implied = dir.join("y-implied.safetensors");
    let explicit = dir.join("y-explicit.safetensors");
    run_ok(&[
        "forward",
        "--weights",
        q4s,
        "--input",
        io.to_str().unwrap(),
        "--output",
        implied.to_str().unwrap(),
    ]);
    run_ok(&[
        "forward",
        "--variant",
        "low_precision",
        "--weights",
        pth.to_str().unwrap(),
        "--input",
        io.to_str().unwrap(),
        "--output",
        explicit.to_str().unwrap(),
    ]);
    let read = |p: &PathBuf| {
        Checkpoint::open(p)
            .unwrap()
            .tensor_f32("y", Some(&[16, 128]))
            .unwrap()
    };
    let y = read(&implied);
    assert_eq!(y.data(), read(&explicit).data(), "q4 file = low_precision");
    let want = Checkpoint::open(&io)
        .unwrap()
        .tensor_f32("y.low_precision", None)
        .unwrap();
    let (max, _) = y.abs_diff_stats(&want).unwrap();
    assert!(max < 1e-5, "{max}");
    // Without variants, stats reports the file's own.
    let v = json(&["stats", "--weights", q4s, "--json"]);
    assert!(v["low_precision"]["total_params"].is_number(), "{v}");
    // qlora over a Q4 file is allowed; bignet or lora is not.
    let v = json(&["fit", "qlora", "--weights", q4s, "--steps", "1", "--json"]);
    assert_eq!(v["variant"], "qlora");
    fails_with(
        &[
            "forward",
            "--variant",
            "bignet",
            "--weights",
            q4s,
            "--input",
            io.to_str().unwrap(),
            "--output",
            dir.join("never.safetensors").to_str().unwrap(),
        ],
        "variant bignet conflicts with --weights",
    );
    fails_with(&["stats", "lora", "--weights", q4s], "holds q4 weights");
    assert!(!dir.join("never.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// A state dict of the reference's LoRA model (its adapters as `….lora_a.weight` /
/// `lora_b.weight`) implies the lora variant, and runs with its adapters.
#[test]
fn a_lora_state_dict_implies_lora_and_keeps_its_adapters() {
    use nibble_bignet::checkpoint::Checkpoint;
    let dir = tempdir("lora_sd");
    let out = dir.join("y.safetensors");
    let io = golden("bignet_lora_sd_io_d64.safetensors");
    run_ok(&[
        "forward",
        "--weights",
        golden("bignet_lora_sd_d64.pth").to_str().unwrap(),
        "--input",
        io.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let y = Checkpoint::open(&out)
        .unwrap()
        .tensor_f32("y", Some(&[5, 64]))
        .unwrap();
    let want = Checkpoint::open(&io)
        .unwrap()
        .tensor_f32("y", None)
        .unwrap();
    let (max, _) = y.abs_diff_stats(&want).unwrap();
    assert!(max < 1e-5, "{max}");
    let v = json(&[
        "stats",
        "--weights",
        golden("bignet_lora_sd_d64.pth").to_str().unwrap(),
        "--json",
    ]);
    assert!(v["lora"]["total_params"].is_number(), "{v}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A state dict that carries the reference's trained adapters: `merge` folds them in without
/// `--adapter` (the merged model gives the golden output), the same file again as `--adapter`
/// is the same set, and other adapters beside them are an error (they replaced the file's
/// without a word).
#[test]
fn a_lora_state_dict_merges_its_own_adapters_and_refuses_a_second_set() {
    use nibble_bignet::checkpoint::Checkpoint;
    let dir = tempdir("lora_sd_merge");
    let weights = golden("bignet_lora_sd_d64.pth");
    let ws = weights.to_str().unwrap();
    let io = golden("bignet_lora_sd_io_d64.safetensors");
    let want = Checkpoint::open(&io)
        .unwrap()
        .tensor_f32("y", None)
        .unwrap();
    let forward = |model: &[&str], tag: &str| {
        let out = dir.join(format!("y_{tag}.safetensors"));
        let mut args = vec!["forward", "--input", io.to_str().unwrap()];
        args.extend_from_slice(model);
        args.extend_from_slice(&["--output", out.to_str().unwrap()]);
        run_ok(&args);
        let y = Checkpoint::open(&out)
            .unwrap()
            .tensor_f32("y", Some(&[5, 64]))
            .unwrap();
        let (max, _) = y.abs_diff_stats(&want).unwrap();
        assert!(max < 1e-5, "{tag}: {max}");
    };
    let merged = dir.join("merged.safetensors");
    run_ok(&[
        "merge",
        "lora",
        "--weights",
        ws,
        "--into",
        "f32",
        "--output",
        merged.to_str().unwrap(),
    ]);
    forward(&["--weights", merged.to_str().unwrap()], "merged");
    // The same file named twice, however spelled, is one set of adapters.
    let dotted = weights
        .parent()
        .unwrap()
        .join(".")
        .join("bignet_lora_sd_d64.pth");
    forward(
        &["--weights", ws, "--adapter", dotted.to_str().unwrap()],
        "same",
    );
    let other = golden("bignet_qlora_sd_d64.pth");
    for verb in [
        &["forward", "--input", io.to_str().unwrap(), "--output"][..],
        &["merge", "--into", "f32", "--output"][..],
    ] {
        let out = dir.join("never.safetensors");
        let mut args = verb.to_vec();
        args.extend_from_slice(&[
            out.to_str().unwrap(),
            "--weights",
            ws,
            "--adapter",
            other.to_str().unwrap(),
        ]);
        fails_with(&args, "holds LoRA adapters");
        assert!(!out.exists());
    }
    // quantize would drop them, as it would an --adapter's: refused, pointing at merge.
    let out = dir.join("q4.safetensors");
    fails_with(
        &[
            "quantize",
            "--weights",
            ws,
            "--format",
            "q4",
            "--output",
            out.to_str().unwrap(),
        ],
        "bignet merge --weights",
    );
    assert!(!out.exists());
    // Without adapters anywhere, merge says where they may come from.
    fails_with(
        &[
            "merge",
            "--weights",
            golden("bignet_d128.safetensors").to_str().unwrap(),
            "--into",
            "f32",
            "--output",
            merged.to_str().unwrap(),
        ],
        "--adapter DIR, or --weights holding",
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// No verb writes over one of its inputs, whatever the spelling of the path.
#[test]
fn no_verb_overwrites_its_inputs() {
    let dir = tempdir("overwrite");
    let weights = dir.join("w.safetensors");
    std::fs::copy(golden("bignet_d128.safetensors"), &weights).unwrap();
    let original = std::fs::read(&weights).unwrap();
    let ws = weights.to_str().unwrap();
    let dotted = dir.join(".").join("w.safetensors");
    for output in [ws, dotted.to_str().unwrap()] {
        fails_with(
            &[
                "quantize",
                "--weights",
                ws,
                "--format",
                "q4",
                "--output",
                output,
            ],
            "refusing to write over an input",
        );
    }
    let x = dir.join("x.safetensors");
    std::fs::copy(golden("io_d128.safetensors"), &x).unwrap();
    let xs = x.to_str().unwrap();
    // The output on the input, then on the weights: the error names the flag it overwrites.
    for (output, flag) in [(xs, "--input"), (ws, "--weights")] {
        fails_with(
            &[
                "forward",
                "--weights",
                ws,
                "--input",
                xs,
                "--output",
                output,
            ],
            flag,
        );
    }
    // Adapter directories: saving into the one read, or merging onto one of its files.
    let adapter = dir.join("adapter");
    let a = adapter.to_str().unwrap();
    run_ok(&[
        "fit",
        "lora",
        "--weights",
        ws,
        "--steps",
        "1",
        "--save-adapter",
        a,
    ]);
    let adapter_bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    fails_with(
        &[
            "fit",
            "lora",
            "--weights",
            ws,
            "--adapter",
            a,
            "--steps",
            "1",
            "--save-adapter",
            a,
        ],
        "--save-adapter",
    );
    let inside = adapter.join("adapter_model.safetensors");
    fails_with(
        &[
            "merge",
            "lora",
            "--weights",
            ws,
            "--adapter",
            a,
            "--into",
            "f16",
            "--output",
            inside.to_str().unwrap(),
        ],
        "refusing to write over an input",
    );
    assert_eq!(std::fs::read(&weights).unwrap(), original);
    assert_eq!(std::fs::read(&inside).unwrap(), adapter_bytes);
    // A different output is fine.
    run_ok(&[
        "quantize",
        "--weights",
        ws,
        "--format",
        "int8",
        "--output",
        dir.join("int8.safetensors").to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).ok();
}

/// An adapter directory holding `adapter_model.bin` (PEFT's `safe_serialization=False`), which
/// the loader reads where `adapter_model.safetensors` is absent, is an input too: `merge` and
/// `forward` refuse to write their output over it (they replaced it before).
#[test]
fn no_verb_overwrites_an_adapters_bin_file() {
    let dir = tempdir("overwrite_bin");
    let weights = dir.join("w.safetensors");
    std::fs::copy(golden("bignet_d128.safetensors"), &weights).unwrap();
    let ws = weights.to_str().unwrap();
    let saved = dir.join("saved");
    run_ok(&[
        "fit",
        "lora",
        "--weights",
        ws,
        "--steps",
        "1",
        "--save-adapter",
        saved.to_str().unwrap(),
    ]);
    // The same adapter with its weights as `adapter_model.bin` alone (read by content).
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(
        saved.join("adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    let bin = adapter.join("adapter_model.bin");
    std::fs::copy(saved.join("adapter_model.safetensors"), &bin).unwrap();
    let bin_bytes = std::fs::read(&bin).unwrap();
    let (a, b) = (adapter.to_str().unwrap(), bin.to_str().unwrap());
    fails_with(
        &[
            "merge",
            "lora",
            "--weights",
            ws,
            "--adapter",
            a,
            "--into",
            "f32",
            "--output",
            b,
        ],
        "refusing to write over an input",
    );
    let x = dir.join("x.safetensors");
    std::fs::copy(golden("io_d128.safetensors"), &x).unwrap();
    fails_with(
        &[
            "forward",
            "--variant",
            "lora",
            "--weights",
            ws,
            "--adapter",
            a,
            "--input",
            x.to_str().unwrap(),
            "--output",
            b,
        ],
        "refusing to write over an input",
    );
    assert_eq!(std::fs::read(&bin).unwrap(), bin_bytes);
    // Read as the adapter it is: a merge to another file works.
    run_ok(&[
        "merge",
        "lora",
        "--weights",
        ws,
        "--adapter",
        a,
        "--into",
        "f32",
        "--output",
        dir.join("merged.safetensors").to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).ok();
}

/// `--activations f32|int8` (and its old name `--q4-activations`) reaches bench, whose JSON
/// reports the mode.
#[test]
fn activations_option_is_reported_by_bench() {
    for (flag, mode) in [
        ("--activations", "int8"),
        ("--activations", "f32"),
        ("--q4-activations", "int8"),
    ] {
        let out = bignet(&[
            "bench", "nf4", "--json", "--dim", "64", "--batch", "1,17", "--runs", "1", flag, mode,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["activations"], mode, "{flag} {mode}");
        // The integer tier this CPU (and environment) gives int8 activations.
        let tier = nibble_quant::act8::IntTier::for_path(nibble_quant::cpu::kernel_path());
        assert_eq!(v["int_tier"], tier.name(), "{flag} {mode}");
    }
    // With AMX turned off the tier is never AMX (and is reported).
    let out = Command::new(env!("CARGO_BIN_EXE_bignet"))
        .args([
            "bench", "nf4", "--json", "--dim", "64", "--batch", "1", "--runs", "1",
        ])
        .env("NIBBLE_AMX", "0")
        .output()
        .expect("run bignet");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tier = v["int_tier"].as_str().unwrap_or_default().to_string();
    assert!(
        ["scalar", "avx2", "avxvnni", "avx512vnni"].contains(&tier.as_str()),
        "NIBBLE_AMX=0: int_tier {tier}"
    );
    fails_with(
        &["bench", "nf4", "--activations", "int4"],
        "expected f32 or int8",
    );
}

/// Requests that could never run fail before anything starts, naming the flag: counts of 0, a
/// thread count far past the cores, a width or batch larger than the machine's memory, and an
/// adapter destination that cannot be one (checked before training, and left as it was).
#[test]
fn impossible_requests_fail_before_they_start() {
    fails_with(&["fit", "lora", "--dim", "32", "--steps", "0"], "--steps 0");
    fails_with(
        &["bench", "bignet", "--dim", "32", "--runs", "0"],
        "--runs 0",
    );
    fails_with(
        &["bench", "bignet", "--dim", "32", "--batch", "1,0"],
        "--batch 0",
    );
    // Before the forwards are timed, not after.
    let out = bignet(&[
        "bench",
        "lora",
        "--dim",
        "32",
        "--train",
        "--micro-batch",
        "0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--micro-batch 0"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    fails_with(
        &["fit", "lora", "--dim", "32", "--micro-batch", "0"],
        "--micro-batch 0",
    );
    fails_with(
        &["bench", "lora", "--dim", "32", "--micro-batch", "4"],
        "give --train",
    );
    fails_with(
        &["stats", "bignet", "--threads", "100000"],
        "--threads 100000",
    );
    if std::fs::read_to_string("/proc/meminfo").is_ok() {
        // (Where the machine's memory can be told.)
        fails_with(
            &["stats", "bignet", "--dim", "100000000"],
            "--dim 100000000",
        );
        // 18 D² overflows 64 bits here.
        fails_with(
            &["compare", "bignet", "qlora", "--dim", "8589934592"],
            "--dim 8589934592",
        );
        fails_with(
            &["bench", "bignet", "--dim", "32", "--batch", "100000000000"],
            "--batch 100000000000",
        );
    } else {
        println!(
            "impossible_requests_fail_before_they_start: no /proc/meminfo, memory cases skipped"
        );
    }
    let dir = tempdir("save_adapter_checks");
    let file = dir.join("not_a_dir");
    std::fs::write(&file, b"keep me").unwrap();
    fails_with(
        &[
            "fit",
            "lora",
            "--dim",
            "32",
            "--steps",
            "1",
            "--save-adapter",
            file.to_str().unwrap(),
        ],
        "exists and is not a directory",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A link where one of the adapter's files goes, refused before the fit, left alone.
    let linked = dir.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::os::unix::fs::symlink(&file, linked.join("adapter_model.safetensors")).unwrap();
    let out = bignet(&[
        "fit",
        "lora",
        "--dim",
        "32",
        "--steps",
        "1",
        "--save-adapter",
        linked.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("symbolic link"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "the fit ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let adapter = dir.join("adapter");
    fails_with(
        &[
            "fit",
            "bignet",
            "--dim",
            "32",
            "--steps",
            "1",
            "--save-adapter",
            adapter.to_str().unwrap(),
        ],
        "no LoRA adapters to save",
    );
    assert!(!adapter.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// The reference's trained qlora state dict as `--adapter` of the f16-based variants: the f32
/// biases it repeats are those of `--weights`, which lora and half_precision hold in f16, so
/// they are compared after that rounding; a bias that differs beyond it is still an error. As a
/// PEFT directory, it goes onto any variant (bignet and int8 refused it: "no place for").
#[test]
fn a_qlora_state_dict_loads_on_the_f16_variants() {
    use nibble_bignet::checkpoint::{write_safetensors, Checkpoint, DType};
    let dir = tempdir("qlora_sd_f16");
    let weights = golden("bignet_qlora_base_d64.pth");
    let sd = golden("bignet_qlora_sd_d64.pth");
    let x = dir.join("x.safetensors");
    let xs: Vec<f32> = (0..3 * 64)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    write_safetensors(
        &x,
        &[(
            "x".to_string(),
            DType::F32,
            vec![3, 64],
            bytemuck::cast_slice(&xs),
        )],
        &Default::default(),
    )
    .unwrap();
    for variant in ["lora", "half_precision", "bignet", "int8"] {
        run_ok(&[
            "forward",
            "--variant",
            variant,
            "--weights",
            weights.to_str().unwrap(),
            "--adapter",
            sd.to_str().unwrap(),
            "--input",
            x.to_str().unwrap(),
            "--output",
            dir.join(format!("y_{variant}.safetensors"))
                .to_str()
                .unwrap(),
        ]);
    }
    // Without --variant the file (no layer weights: the qlora model's) implies qlora.
    let ys: Vec<Vec<f32>> = [&["--variant", "qlora"][..], &[][..]]
        .iter()
        .enumerate()
        .map(|(i, variant)| {
            let y = dir.join(format!("y_qlora_{i}.safetensors"));
            let mut args = vec![
                "forward",
                "--weights",
                weights.to_str().unwrap(),
                "--adapter",
                sd.to_str().unwrap(),
                "--input",
                x.to_str().unwrap(),
                "--output",
                y.to_str().unwrap(),
            ];
            args.extend_from_slice(variant);
            run_ok(&args);
            let t = Checkpoint::open(&y).unwrap().tensor_f32("y", None).unwrap();
            t.data().to_vec()
        })
        .collect();
    assert_eq!(ys[0], ys[1], "the implied variant is qlora");
    // The same file with its biases and LayerNorms stored in f16 (as a lora model's state
    // dict holds its f16 base): compared with the qlora model's f32 values rounded to f16.
    {
        let file = Checkpoint::open(&sd).unwrap();
        let tensors: Vec<(String, Vec<usize>, Vec<u8>, DType)> = file
            .keys()
            .map(|k| {
                let t = file.tensor_f32(k, None).unwrap();
                if k.contains("lora_") {
                    let b = bytemuck::cast_slice::<f32, u8>(t.data()).to_vec();
                    (k.to_string(), t.shape().to_vec(), b, DType::F32)
                } else {
                    let b = t
                        .data()
                        .iter()
                        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                        .collect();
                    (k.to_string(), t.shape().to_vec(), b, DType::F16)
                }
            })
            .collect();
        let halves = dir.join("f16_base_params.safetensors");
        let views: Vec<(String, DType, Vec<usize>, &[u8])> = tensors
            .iter()
            .map(|(k, s, b, d)| (k.clone(), *d, s.clone(), b.as_slice()))
            .collect();
        write_safetensors(&halves, &views, &Default::default()).unwrap();
        run_ok(&[
            "forward",
            "--variant",
            "qlora",
            "--weights",
            weights.to_str().unwrap(),
            "--adapter",
            halves.to_str().unwrap(),
            "--input",
            x.to_str().unwrap(),
            "--output",
            dir.join("y_f16_params.safetensors").to_str().unwrap(),
        ]);
    }
    // The same file with one bias element moved well past f16's rounding.
    let file = Checkpoint::open(&sd).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .keys()
        .map(|k| {
            let t = file.tensor_f32(k, None).unwrap();
            (k.to_string(), t.shape().to_vec(), t.data().to_vec())
        })
        .collect();
    let bias = tensors
        .iter_mut()
        .find(|(k, ..)| k == "model.0.model.0.bias")
        .expect("the state dict repeats the first bias");
    bias.2[0] += 0.25;
    let tampered = dir.join("tampered.safetensors");
    let views: Vec<(String, DType, Vec<usize>, &[u8])> = tensors
        .iter()
        .map(|(k, s, v)| (k.clone(), DType::F32, s.clone(), bytemuck::cast_slice(v)))
        .collect();
    write_safetensors(&tampered, &views, &Default::default()).unwrap();
    fails_with(
        &[
            "forward",
            "--variant",
            "lora",
            "--weights",
            weights.to_str().unwrap(),
            "--adapter",
            tampered.to_str().unwrap(),
            "--input",
            x.to_str().unwrap(),
            "--output",
            dir.join("y_never.safetensors").to_str().unwrap(),
        ],
        "rounded to f16",
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A PEFT DoRA adapter runs on BigNet (it was refused); `fit` trains it (it refused to) and
/// saves it as a DoRA adapter that runs again.
#[test]
fn a_dora_adapter_runs_on_bignet_and_fit_trains_it() {
    let dir = tempdir("dora_bignet");
    let dora = golden("peft_variants/dora_bignet");
    let weights = golden("bignet_d128.pth");
    let saved = dir.join("saved");
    for adapter in [&dora, &saved] {
        if adapter == &saved {
            run_ok(&[
                "fit",
                "--weights",
                weights.to_str().unwrap(),
                "--adapter",
                dora.to_str().unwrap(),
                "--steps",
                "2",
                "--save-adapter",
                saved.to_str().unwrap(),
            ]);
            let config = std::fs::read_to_string(saved.join("adapter_config.json")).unwrap();
            assert!(config.contains("\"use_dora\": true"), "{config}");
            // The golden adapter's `model.2.model.2` has rank 2, the others 4.
            assert!(
                config.contains("\"model\\\\.2\\\\.model\\\\.2\": 2"),
                "{config}"
            );
        }
        run_ok(&[
            "bench",
            "lora",
            "--weights",
            weights.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--batch",
            "1",
            "--runs",
            "1",
        ]);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `fit lora --dora` makes the seeded adapters DoRA ones before training: the first loss is the
/// plain adapters' (the magnitudes start at the weights' row norms), the later ones differ
/// (the magnitudes train), and the saved adapter is a DoRA one. A variant without adapters
/// is an error naming `--dora`.
#[test]
fn fit_dora_trains_dora_adapters() {
    let dir = tempdir("fit_dora_flag");
    let weights = golden("bignet_d128.pth");
    let saved = dir.join("saved");
    let fit = |extra: &[&str]| {
        let mut args = vec![
            "fit",
            "lora",
            "--weights",
            weights.to_str().unwrap(),
            "--steps",
            "3",
            "--json",
        ];
        args.extend(extra);
        json(&args)
    };
    let dora = fit(&["--dora", "--save-adapter", saved.to_str().unwrap()]);
    let plain = fit(&[]);
    assert_eq!(
        (dora["dora"].as_bool(), plain["dora"].as_bool()),
        (Some(true), Some(false))
    );
    let loss = |v: &Value, i: usize| v["loss"][i].as_f64().unwrap();
    assert!((loss(&dora, 0) - loss(&plain, 0)).abs() < 1e-6);
    assert_ne!(loss(&dora, 2), loss(&plain, 2));
    let config = std::fs::read_to_string(saved.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"use_dora\": true"), "{config}");
    fails_with(
        &[
            "fit",
            "--weights",
            weights.to_str().unwrap(),
            "--dora",
            "--steps",
            "1",
        ],
        "--dora: variant bignet has no LoRA adapters",
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `fit --adapter` over an adapter whose config sets `lora_dropout` trains without dropout
/// and says so on stderr (PEFT's training drops inputs of lora_A at random).
#[test]
fn fit_notes_a_lora_dropout_it_does_not_apply() {
    let dir = tempdir("fit_dropout");
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let start = golden("peft_fit_dora/start");
    std::fs::copy(
        start.join("adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(start.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"lora_dropout\": 0.0"), "{config}");
    let config = config.replace("\"lora_dropout\": 0.0", "\"lora_dropout\": 0.1");
    std::fs::write(adapter.join("adapter_config.json"), config).unwrap();
    let weights = golden("bignet_d20.pth");
    for (dir, noted) in [(&start, false), (&adapter, true)] {
        let out = bignet(&[
            "fit",
            "--weights",
            weights.to_str().unwrap(),
            "--adapter",
            dir.to_str().unwrap(),
            "--steps",
            "1",
        ]);
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.contains("lora_dropout 0.1 is not applied"),
            noted,
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The losses of `bignet fit bignet` over the width-20 golden weights with `--adapter
/// adapter`, 8 steps, seed 3, and `extra` arguments, checked against PEFT's `peft` (within
/// 2e-6 each: the golden files of `tools/golden/make_peft_fit_*.py`); `what` names the case.
fn assert_fit_losses_match(what: &str, adapter: &std::path::Path, extra: &[&str], peft: &Value) {
    let weights = golden("bignet_d20.pth");
    let mut args = vec![
        "fit",
        "bignet",
        "--weights",
        weights.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--steps",
        "8",
        "--seed",
        "3",
        "--json",
    ];
    args.extend(extra);
    let losses = |v: &Value| -> Vec<f64> {
        let all = v.as_array().unwrap();
        all.iter().map(|l| l.as_f64().unwrap()).collect()
    };
    let (ours, peft) = (losses(&json(&args)["loss"]), losses(peft));
    assert_eq!(ours.len(), peft.len(), "{what}");
    for (step, (a, b)) in ours.iter().zip(&peft).enumerate() {
        assert!(
            (a - b).abs() < 2e-6,
            "{what} step {step}: nibble {a}, PEFT {b} (all: {ours:?} against {peft:?})"
        );
    }
}

/// `fit --adapter` over a PEFT DoRA adapter trains it as PEFT does: its magnitudes with A and
/// B, each layer's weight norm computed again from A and B at every step and held constant
/// in the backward. The losses are PEFT's, trained with PyTorch's AdamW on the same task
/// (`tools/golden/make_peft_fit_dora.py`), with and without `--checkpoint`, and the saved
/// adapter holds PEFT's trained tensors as PEFT holds them (B without the scaling, and PEFT's
/// `lora_alpha` 8: B was saved with the scaling folded in and `lora_alpha = r`). Without the magnitudes' gradients the losses part from PEFT's at the
/// second step, and so do they with the norms of the first step kept.
#[test]
fn fit_trains_peft_dora_adapters_as_peft_does() {
    use nibble_bignet::checkpoint::Checkpoint;
    let data = golden("peft_fit_dora");
    let golden_losses: Value =
        serde_json::from_slice(&std::fs::read(data.join("losses.json")).unwrap()).unwrap();
    let dir = tempdir("fit_dora");
    for checkpoint in [false, true] {
        let saved = dir.join(format!("saved_{checkpoint}"));
        let mut extra = vec!["--save-adapter", saved.to_str().unwrap()];
        extra.extend(checkpoint.then_some("--checkpoint"));
        assert_fit_losses_match(
            &format!("--checkpoint {checkpoint}"),
            &data.join("start"),
            &extra,
            &golden_losses["losses"],
        );
        let ours = Checkpoint::open(saved.join("adapter_model.safetensors")).unwrap();
        let theirs = Checkpoint::open(data.join("trained/adapter_model.safetensors")).unwrap();
        let mut keys: Vec<&str> = theirs.keys().collect();
        keys.sort();
        let mut ours_keys: Vec<&str> = ours.keys().collect();
        ours_keys.sort();
        assert_eq!(keys, ours_keys);
        assert_eq!(keys.len(), 18 * 3);
        for key in keys {
            let a = ours.tensor_f32(key, None).unwrap();
            let b = theirs.tensor_f32(key, None).unwrap();
            let worst = a
                .data()
                .iter()
                .zip(b.data())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 2e-6, "{key}: {worst} from PEFT's trained value");
        }
        let config: Value =
            serde_json::from_slice(&std::fs::read(saved.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(
            (&config["r"], &config["lora_alpha"]),
            (&serde_json::json!(4), &serde_json::json!(8))
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `src` rewritten as safetensors to `path` (its metadata kept) with `poison(key, values)`
/// applied to each f32 or f16 tensor, in the file's order: a quantized file's parts too.
fn rewrite_with(src: &std::path::Path, path: &std::path::Path, poison: impl Fn(&str, &mut [f32])) {
    use nibble_bignet::checkpoint::{write_safetensors, Checkpoint, DType};
    let file = Checkpoint::open(src).unwrap();
    let tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = file
        .keys_in_file_order()
        .map(|k| {
            let (dtype, shape) = file.info(k).unwrap();
            let floats = || {
                let mut v = file.tensor_f32(k, None).unwrap().into_vec();
                poison(k, &mut v);
                v
            };
            // Each float tensor kept in its own dtype (a q4 file's scales are f16).
            let bytes = match dtype {
                DType::F32 => bytemuck::cast_slice(&floats()).to_vec(),
                DType::F16 => floats()
                    .iter()
                    .flat_map(|&f| half::f16::from_f32(f).to_le_bytes())
                    .collect(),
                _ => file.bytes(k).unwrap().to_vec(),
            };
            (k.to_string(), dtype, shape.to_vec(), bytes)
        })
        .collect();
    let refs: Vec<(String, DType, Vec<usize>, &[u8])> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_slice()))
        .collect();
    write_safetensors(path, &refs, file.metadata()).unwrap();
}

/// A NaN or infinite base weight is refused when the state dict is read, by every verb and
/// variant, naming the file, the key, the element and the value (it would turn every output
/// into NaN; `merge` and `quantize` would write it on). A quantized checkpoint's stored floats
/// (biases, LayerNorms, scales) are checked too.
#[test]
fn non_finite_base_weights_are_refused_by_every_verb() {
    use nibble_bignet::checkpoint::{write_safetensors, DType};
    let dir = tempdir("non_finite_base");
    let nan_w = dir.join("nan_w.safetensors");
    rewrite_with(&golden("bignet_d128.pth"), &nan_w, |k, v| {
        if k == "model.4.model.2.weight" {
            v[5 * 128 + 7] = f32::NAN;
        }
    });
    let inf_ln = dir.join("inf_ln.safetensors");
    rewrite_with(&golden("bignet_d128.pth"), &inf_ln, |k, v| {
        if k == "model.1.weight" {
            v[3] = f32::INFINITY;
        }
    });
    let x = dir.join("x.safetensors");
    let xs: Vec<f32> = (0..2 * 128).map(|i| (i as f32 * 0.37).sin()).collect();
    write_safetensors(
        &x,
        &[(
            "x".to_string(),
            DType::F32,
            vec![2, 128],
            bytemuck::cast_slice(&xs),
        )],
        &Default::default(),
    )
    .unwrap();
    let out = dir.join("out.safetensors");
    let adapter = golden("peft_variants/bignet_d128");
    let (x, out, adapter) = (
        x.to_str().unwrap(),
        out.to_str().unwrap(),
        adapter.to_str().unwrap(),
    );
    for (file, needle) in [
        (
            &nan_w,
            "`model.4.model.2.weight` holds NaN at (row 5, col 7)",
        ),
        (&inf_ln, "`model.1.weight` holds inf at index 3"),
    ] {
        let w = file.to_str().unwrap();
        let verbs: Vec<Vec<&str>> = vec![
            vec!["forward", "--input", x, "--output", out],
            vec![
                "forward",
                "--variant",
                "qlora",
                "--input",
                x,
                "--output",
                out,
            ],
            vec![
                "forward",
                "--variant",
                "half_precision",
                "--input",
                x,
                "--output",
                out,
            ],
            vec![
                "merge",
                "--adapter",
                adapter,
                "--into",
                "f32",
                "--output",
                out,
            ],
            vec!["quantize", "--format", "nf4", "--output", out],
            vec!["quantize", "--format", "q4", "--output", out],
            vec!["fit", "lora", "--steps", "1"],
            vec!["compare", "bignet", "low_precision"],
            vec!["stats", "lora"],
            vec!["bench", "bignet", "--batch", "1", "--runs", "1"],
        ];
        for mut args in verbs {
            args.extend(["--weights", w]);
            fails_with(&args, needle);
            fails_with(&args, file.file_name().unwrap().to_str().unwrap());
            assert!(!std::path::Path::new(out).exists(), "{args:?} wrote {out}");
        }
    }
    // A quantized checkpoint with an infinite bias, and with a NaN scale (refused when its
    // weight is read).
    let q = dir.join("q.safetensors");
    run_ok(&[
        "quantize",
        "--weights",
        golden("bignet_d128.pth").to_str().unwrap(),
        "--format",
        "q4",
        "--output",
        q.to_str().unwrap(),
    ]);
    let q_inf = dir.join("q_inf.safetensors");
    rewrite_with(&q, &q_inf, |k, v| {
        if k == "model.3.bias" {
            v[2] = f32::INFINITY;
        }
    });
    fails_with(
        &[
            "forward",
            "--weights",
            q_inf.to_str().unwrap(),
            "--input",
            x,
            "--output",
            out,
        ],
        "q_inf.safetensors: `model.3.bias` holds inf at index 2",
    );
    let q_nan = dir.join("q_nan.safetensors");
    let poisoned = std::cell::RefCell::new(None);
    rewrite_with(&q, &q_nan, |k, v| {
        if k.starts_with("model.2.model.2.weight") && poisoned.borrow().is_none() {
            v[1] = f32::NAN;
            *poisoned.borrow_mut() = Some(k.to_string());
        }
    });
    let key = poisoned.take().expect("a float part of a q4 weight");
    fails_with(
        &["stats", "--weights", q_nan.to_str().unwrap()],
        &format!("`{key}`"),
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A fit that diverges (a learning rate far too high) is an error naming the step, the loss
/// and `--lr`, and saves no adapter: the loss turned NaN mid-run, or (one step) the last
/// update made the adapters NaN after a finite loss. `--json` prints no report.
#[test]
fn a_fit_that_diverges_fails_and_saves_no_adapter() {
    let dir = tempdir("fit_diverges");
    let ad = dir.join("ad");
    let ad = ad.to_str().unwrap();
    let weights = golden("bignet_d128.pth");
    let fit = |rest: &[&str]| {
        let mut args = vec!["fit", "lora", "--weights", weights.to_str().unwrap()];
        args.extend_from_slice(rest);
        args.extend(["--save-adapter", ad]);
        bignet(&args)
    };
    for json in [false, true] {
        let mut rest = vec!["--steps", "3", "--lr", "1e30"];
        if json {
            rest.push("--json");
        }
        let out = fit(&rest);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "diverged but succeeded: {err}");
        for needle in [
            "training diverged: the loss is NaN at step",
            "of 3",
            "--lr 1e30",
            "try a lower --lr",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
        if json {
            assert!(
                out.stdout.is_empty(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        assert!(!std::path::Path::new(ad).exists(), "an adapter was saved");
    }
    // One step: its loss is finite, its update is not.
    let out = fit(&["--steps", "1", "--lr", "3e38"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "diverged but succeeded: {err}");
    for needle in [
        "--save-adapter",
        "lora_a.weight` holds NaN at (row ",
        "nothing was saved",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    assert!(!std::path::Path::new(ad).exists(), "an adapter was saved");
    // A sane rate still fits and saves.
    assert!(fit(&["--steps", "2", "--lr", "0.001"]).status.success());
    assert!(dir.join("ad/adapter_model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).ok();
}

/// `bench --runs` beyond what the timings can be kept in is an error naming the flag before
/// anything runs, not a capacity-overflow panic or an allocation abort.
#[test]
fn bench_runs_beyond_memory_fail_before_they_start() {
    if std::fs::read_to_string("/proc/meminfo").is_err() {
        println!("bench_runs_beyond_memory_fail_before_they_start: no /proc/meminfo, skipped");
        return;
    }
    for runs in ["18446744073709551615", "100000000000"] {
        for train in [false, true] {
            let mut args = vec![
                "bench", "bignet", "--dim", "32", "--batch", "1", "--runs", runs,
            ];
            if train {
                args.push("--train");
            }
            let out = bignet(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(
                err.contains(&format!("--runs {runs}: keeping {runs} timings"))
                    && err.contains("this machine has"),
                "{args:?}: {err}"
            );
            assert!(out.stdout.is_empty(), "{args:?} ran");
        }
    }
}

/// `fit` over a PEFT adapter trains it as PEFT does, or refuses before training: an adapter
/// that leaves layers out (fit trained fresh rank-32 adapters on them, which PEFT's model has
/// not got) and one that carries base parameters (`bias = "all"`, `modules_to_save`: PEFT
/// trains them; fit trained none of them and `--save-adapter` dropped them, so the saved
/// adapter ran 0.4 off the model it was trained as) are errors naming the layers or keys, and
/// nothing is saved. Forward still runs both.
#[test]
fn fit_refuses_peft_adapters_it_cannot_train_as_peft_does() {
    let dir = tempdir("fit_peft");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let full = path("full");
    run_ok(&[
        "fit",
        "lora",
        "--dim",
        "64",
        "--steps",
        "1",
        "--save-adapter",
        &full,
    ]);
    // The same adapter with one target: PEFT adapts model.0.model.0 only (and ignores the
    // file's other LoRA tensors).
    // The adapter `full` copied to `name` with one setting of its config replaced.
    let edited = |name: &str, key: &str, value: Value| {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(
            dir.join("full/adapter_model.safetensors"),
            to.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("full/adapter_config.json")).unwrap())
                .unwrap();
        config[key] = value;
        std::fs::write(
            to.join("adapter_config.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        to.to_str().unwrap().to_string()
    };
    let subset = edited(
        "subset",
        "target_modules",
        serde_json::json!(["model.0.model.0"]),
    );
    // One step of fit lora at width 64 over `adapter`.
    let fit_over = |adapter: &str| -> Vec<String> {
        [
            "fit",
            "lora",
            "--dim",
            "64",
            "--steps",
            "1",
            "--adapter",
            adapter,
        ]
        .map(String::from)
        .to_vec()
    };
    let saved = path("saved");
    for save in [false, true] {
        let owned = fit_over(&subset);
        let mut args: Vec<&str> = owned.iter().map(String::as_str).collect();
        if save {
            args.extend(["--save-adapter", &saved]);
        }
        fails_with(&args, "this one adapts 1 of them: model.0.model.2");
        assert!(!dir.join("saved").exists(), "an adapter was saved");
    }
    // `lora_alpha` 0 (a scaling of 0, its B lost when folded in) is an error naming it (it was
    // an optimizer's "set_storage_scale" error); a negative one trains, as PEFT trains it
    // (refused the same way).
    for alpha in [0, -64] {
        let scaled = edited("scaled", "lora_alpha", serde_json::json!(alpha));
        let owned = fit_over(&scaled);
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        if alpha == 0 {
            fails_with(&args, "`lora_alpha` 0");
        } else {
            run_ok(&args);
        }
    }
    // The reference's BigNet at width 128 with a PEFT adapter of bias = "all".
    let weights = golden("bignet_d128.pth");
    let weights = weights.to_str().unwrap();
    let bias_all = golden("peft_variants/bignet_d128");
    let bias_all = bias_all.to_str().unwrap();
    for save in [false, true] {
        let mut args = vec![
            "fit",
            "--weights",
            weights,
            "--adapter",
            bias_all,
            "--steps",
            "1",
        ];
        if save {
            args.extend(["--save-adapter", &saved]);
        }
        fails_with(
            &args,
            "the adapter carries base parameters (base_model.model.",
        );
        assert!(!dir.join("saved").exists(), "an adapter was saved");
    }
    // A PEFT adapter of `lora_bias`: PEFT trains the lora_B biases, fit would not.
    let lora_bias = golden("peft_variants/lora_bias_bignet");
    fails_with(
        &[
            "fit",
            "--weights",
            weights,
            "--adapter",
            lora_bias.to_str().unwrap(),
            "--steps",
            "1",
        ],
        "a bias on each lora_B (`lora_bias`)",
    );
    // Both still run as they are.
    let x = path("x.safetensors");
    let y = path("y.safetensors");
    let xs: Vec<f32> = (0..2 * 128).map(|i| (i as f32 * 0.37).sin()).collect();
    nibble_bignet::checkpoint::write_safetensors(
        std::path::Path::new(&x),
        &[(
            "x".to_string(),
            nibble_bignet::checkpoint::DType::F32,
            vec![2, 128],
            bytemuck::cast_slice(&xs),
        )],
        &Default::default(),
    )
    .unwrap();
    run_ok(&[
        "forward",
        "--weights",
        weights,
        "--adapter",
        bias_all,
        "--input",
        &x,
        "--output",
        &y,
    ]);
    // A full adapter of scale 1 still fits and saves.
    run_ok(&[
        "fit",
        "lora",
        "--dim",
        "64",
        "--steps",
        "1",
        "--adapter",
        &full,
        "--save-adapter",
        &saved,
    ]);
    assert!(dir.join("saved/adapter_model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).ok();
}

/// `fit --adapter` over PEFT adapters whose scaling is not 1 (`lora_alpha` = 2r; rsLoRA with an
/// `alpha_pattern` entry) takes PEFT's AdamW steps on B: the scaling is folded into B and
/// AdamW is told (`AdamW::set_storage_scale`), so the losses are PEFT's, trained with PyTorch's
/// AdamW on the same task (`tools/golden/make_peft_fit_scaled.py`). With the scaling only
/// folded in, AdamW stepped on s·B: the losses drifted 3e-3 (2r) to 2e-2 (8r) from PEFT's
/// within 8 steps at width 40.
#[test]
fn fit_trains_scaled_peft_adapters_as_peft_does() {
    let dir = golden("peft_fit_scaled");
    let golden_losses: Value =
        serde_json::from_slice(&std::fs::read(dir.join("losses.json")).unwrap()).unwrap();
    for name in ["alpha_2r", "rslora_pattern"] {
        assert_fit_losses_match(name, &dir.join(name), &[], &golden_losses["losses"][name]);
    }
}

/// Finite weights whose outputs overflow f32 (the golden width-128 weights times 1e36) make
/// `compare` an error naming the variant and the element, not `"max_diff": null` (NaN, which
/// serde_json writes as null; the text said NaN, exit status 0).
#[test]
fn compare_of_outputs_that_overflow_is_an_error_not_null() {
    use nibble_bignet::checkpoint::{write_safetensors, Checkpoint};
    let dir = std::env::temp_dir().join(format!("nibble-cli-overflow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sd = Checkpoint::open(golden("bignet_d128.safetensors")).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = sd
        .keys()
        .map(|k| {
            let t = sd.tensor_f32(k, None).unwrap();
            let scale = if t.shape().len() == 2 { 1e36 } else { 1.0 };
            let data = t.data().iter().map(|v| v * scale).collect();
            (k.to_string(), t.shape().to_vec(), data)
        })
        .collect();
    let entries: Vec<_> = tensors
        .iter()
        .map(|(k, shape, data)| {
            (
                k.clone(),
                nibble_bignet::checkpoint::DType::F32,
                shape.clone(),
                bytemuck::cast_slice::<f32, u8>(data),
            )
        })
        .collect();
    let huge = dir.join("huge.safetensors");
    write_safetensors(&huge, &entries, &Default::default()).unwrap();
    let huge = huge.to_str().unwrap();
    for json in [true, false] {
        let mut args = vec!["compare", "bignet", "int8", "--weights", huge];
        if json {
            args.push("--json");
        }
        fails_with(&args, "overflow f32");
        fails_with(&args, "bignet's output");
    }
    // fit's first loss, before any update, blames the model, not --lr (it said "training
    // diverged ... try a lower --lr").
    let args = ["fit", "bignet", "--weights", huge, "--steps", "2"];
    fails_with(&args, "before any update");
    fails_with(&args, "not --lr");
    // forward names the element and writes nothing (it wrote `y` full of NaN, exit status 0);
    // a NaN in `x` is named too.
    let x = dir.join("x.safetensors");
    let y = dir.join("y.safetensors");
    for (name, first) in [("finite", 0.5f32), ("nan", f32::NAN)] {
        let data: Vec<f32> = (0..2 * 128)
            .map(|i| if i == 0 { first } else { 0.01 * i as f32 })
            .collect();
        write_safetensors(
            &x,
            &[(
                "x".to_string(),
                nibble_bignet::checkpoint::DType::F32,
                vec![2, 128],
                bytemuck::cast_slice::<f32, u8>(&data),
            )],
            &Default::default(),
        )
        .unwrap();
        let args = [
            "forward",
            "--weights",
            huge,
            "--input",
            x.to_str().unwrap(),
            "--output",
            y.to_str().unwrap(),
        ];
        if name == "nan" {
            fails_with(&args, "`x` is NaN at (row 0, col 0)");
        } else {
            fails_with(&args, "overflows f32 on this input");
        }
        assert!(!y.exists(), "{name}: forward wrote an output");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `bench --train` says so where a variant has nothing to train (it skipped it silently).
#[test]
fn bench_train_notes_a_variant_without_trainable_parameters() {
    let out = bignet(&[
        "bench",
        "low_precision",
        "--dim",
        "32",
        "--batch",
        "1",
        "--runs",
        "1",
        "--train",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("low_precision has no trainable parameters"),
        "{err}"
    );
}
