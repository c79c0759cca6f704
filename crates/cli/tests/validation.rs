//! Inputs the audit found mishandled: empty splits, unusable `finetune` flags, outputs that
//! would overwrite an adapter, re-quantizing a quantized checkpoint, and weights a format
//! cannot store. Each is a clean error naming what is wrong (or, for huge step counts, a run
//! that neither panics nor reserves memory by the step count). Every input is a tiny file
//! written by the test.

mod common;
use common::*;
use nibble_io::DType;
use std::path::{Path, PathBuf};

/// A tiny Sequential: Linear 4→3, ReLU, Linear 3→2 (layer `2` is `[2, 3]`).
fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.safetensors");
    let values = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
    write(
        &path,
        &[
            f32s("0.weight", &[3, 4], &values(12, 0.7)),
            f32s("0.bias", &[3], &values(3, 1.3)),
            f32s("2.weight", &[2, 3], &values(6, 0.4)),
            f32s("2.bias", &[2], &values(2, 2.1)),
        ],
    );
    path
}

/// `x_{split}` `[rows, 4]` and `y_{split}` (labels 0 and 1 in turn) for each `(split, rows)`.
fn tiny_data(dir: &Path, name: &str, splits: &[(&str, usize)]) -> PathBuf {
    let path = dir.join(name);
    let mut entries = Vec::new();
    for &(split, rows) in splits {
        let x: Vec<f32> = (0..rows * 4).map(|i| (i as f32 * 0.9).cos()).collect();
        let y: Vec<i64> = (0..rows as i64).map(|i| i % 2).collect();
        entries.push(f32s(&format!("x_{split}"), &[rows, 4], &x));
        entries.push(i64s(&format!("y_{split}"), &y));
    }
    write(&path, &entries);
    path
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing from: {msg}");
    }
}

const FINETUNE: [&str; 6] = ["--format", "q4", "--rank", "2", "--steps", "3"];

#[test]
fn an_empty_training_split_is_an_error_naming_file_and_key() {
    let dir = tmpdir("empty_train");
    let model = tiny_model(&dir);
    let data = tiny_data(&dir, "train0.safetensors", &[("test", 6), ("train", 0)]);
    let msg = nibble_fails(&model_data_args("finetune", &model, &data, &FINETUNE));
    assert_names(
        &msg,
        &["train0.safetensors", "x_train", "no rows", "[0, 4]"],
    );
    // eval needs no training split: a present but empty one is no error there.
    let v = nibble_json(&model_data_args("eval", &model, &data, &["--json"]));
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
}

#[test]
fn an_empty_test_split_is_an_error_for_eval_and_finetune() {
    let dir = tmpdir("empty_test");
    let model = tiny_model(&dir);
    let data = tiny_data(&dir, "test0.safetensors", &[("test", 0), ("train", 8)]);
    for args in [
        model_data_args("eval", &model, &data, &["--format", "all", "--json"]),
        model_data_args("eval", &model, &data, &[]),
        model_data_args("finetune", &model, &data, &FINETUNE),
    ] {
        let msg = nibble_fails(&args);
        assert_names(&msg, &["test0.safetensors", "x_test", "no rows", "[0, 4]"]);
    }
}

/// A rank above a layer's min(out, in) trains, as in PEFT (here 3 on a [2, 3] layer); one
/// beyond PEFT's cap on `r` (65536) is refused naming `--rank` and the value.
#[test]
fn finetune_rank_beyond_pefts_cap_is_refused() {
    let dir = tmpdir("rank");
    let model = tiny_model(&dir);
    let data = tiny_data(&dir, "data.safetensors", &[("test", 6), ("train", 8)]);
    for rank in ["65537", "1000000000000", "4611686018427387904"] {
        let msg = nibble_fails(&model_data_args(
            "finetune",
            &model,
            &data,
            &["--format", "q4", "--rank", rank, "--steps", "1"],
        ));
        assert_names(&msg, &["--rank", rank, "65536"]);
    }
    for rank in ["2", "3"] {
        let v = nibble_json(&model_data_args(
            "finetune",
            &model,
            &data,
            &["--format", "q4", "--rank", rank, "--steps", "2", "--json"],
        ));
        assert_eq!(loss_curve(&v).len(), 2, "{rank}");
    }
}

#[test]
fn finetune_steps_zero_is_refused() {
    let dir = tmpdir("steps0");
    let model = tiny_model(&dir);
    let data = tiny_data(&dir, "data.safetensors", &[("test", 6), ("train", 8)]);
    for json in [false, true] {
        let mut args = model_data_args(
            "finetune",
            &model,
            &data,
            &["--format", "q4", "--rank", "1", "--steps", "0"],
        );
        if json {
            args.push("--json");
        }
        let msg = nibble_fails(&args);
        assert_names(&msg, &["--steps", "at least 1"]);
        assert!(!msg.contains("NaN"), "{msg}");
    }
    // One step: the first loss is the last, a number.
    let run = nibble(&model_data_args(
        "finetune",
        &model,
        &data,
        &["--format", "q4", "--rank", "1", "--steps", "1"],
    ));
    assert!(run.ok && !run.stdout.contains("NaN"), "{}", run.stdout);
}

/// The virtual memory of process `pid` in kB (Linux).
#[cfg(target_os = "linux")]
fn vm_size_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmSize:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Huge `--steps` start training at once (the loss history grows as the steps go, never
/// reserved by the step count) instead of panicking on a capacity overflow or reserving
/// gigabytes; the test stops the run after a moment.
#[test]
fn huge_step_counts_train_without_reserving_memory_by_the_count() {
    use std::process::{Command, Stdio};
    let dir = tmpdir("huge_steps");
    let model = tiny_model(&dir);
    let data = tiny_data(&dir, "data.safetensors", &[("test", 6), ("train", 8)]);
    for (steps, json) in [
        ("18446744073709551615", false),
        ("18446744073709551615", true),
        ("4000000000", true),
    ] {
        let mut args = model_data_args(
            "finetune",
            &model,
            &data,
            &[
                "--format", "q4", "--rank", "1", "--batch", "1", "--steps", steps,
            ],
        );
        if json {
            args.push("--json");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let running = child.try_wait().unwrap().is_none();
        #[cfg(target_os = "linux")]
        let vm = vm_size_kb(child.id());
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        assert!(
            running,
            "--steps {steps} (json {json}) ended: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // 4e9 f32 losses reserved up front would be 16 GB of address space.
        #[cfg(target_os = "linux")]
        if let Some(kb) = vm {
            assert!(kb < 4 << 20, "--steps {steps}: {kb} kB of virtual memory");
        }
    }
}

#[test]
fn outputs_never_overwrite_the_adapter_directory() {
    let dir = tmpdir("adapter_clash");
    let model = tiny_model(&dir);
    let data = tiny_data(&dir, "data.safetensors", &[("test", 6), ("train", 8)]);
    let ad = dir.join("ad");
    let mut args = model_data_args("finetune", &model, &data, &FINETUNE);
    args.extend(["--save-adapter", s(&ad)]);
    assert!(nibble(&args).ok);
    // A `.bin` beside the safetensors weights is part of the directory too.
    std::fs::write(ad.join("adapter_model.bin"), b"not read").unwrap();
    let link = dir.join("config_link.json");
    std::fs::hard_link(ad.join("adapter_config.json"), &link).unwrap();
    let before: Vec<Vec<u8>> = [
        "adapter_model.safetensors",
        "adapter_model.bin",
        "adapter_config.json",
    ]
    .iter()
    .map(|f| std::fs::read(ad.join(f)).unwrap())
    .collect();
    let same = format!("{}/./adapter_model.safetensors", ad.display());
    for (output, what) in [
        (
            ad.join("adapter_model.safetensors"),
            "adapter_model.safetensors",
        ),
        (ad.join("adapter_model.bin"), "adapter_model.bin"),
        (ad.join("adapter_config.json"), "adapter_config.json"),
        (PathBuf::from(&same), "adapter_model.safetensors"),
        (link.clone(), "adapter_config.json"),
        (ad.clone(), "--adapter directory"),
    ] {
        let msg = nibble_fails(&model_data_args(
            "eval",
            &model,
            &data,
            &["--adapter", s(&ad), "--logits", s(&output)],
        ));
        assert_names(&msg, &["refusing to write over an input", what]);
    }
    let after: Vec<Vec<u8>> = [
        "adapter_model.safetensors",
        "adapter_model.bin",
        "adapter_config.json",
    ]
    .iter()
    .map(|f| std::fs::read(ad.join(f)).unwrap())
    .collect();
    assert_eq!(before, after);
    // The adapter still loads, and logits elsewhere are written.
    let logits = dir.join("logits.safetensors");
    assert!(
        nibble(&model_data_args(
            "eval",
            &model,
            &data,
            &["--adapter", s(&ad), "--logits", s(&logits)],
        ))
        .ok
    );
    assert_eq!(tensor(&logits, "logits").len(), 6 * 2);
    // `finetune --save-adapter` naming an input file itself is refused, and leaves it alone.
    let model_bytes = std::fs::read(&model).unwrap();
    let mut args = model_data_args("finetune", &model, &data, &FINETUNE);
    args.extend(["--save-adapter", s(&model)]);
    let msg = nibble_fails(&args);
    assert_names(&msg, &["refusing to write over an input", "--model"]);
    assert_eq!(std::fs::read(&model).unwrap(), model_bytes);
}

/// An int8 tensor entry.
fn i8s(name: &str, shape: &[usize], values: &[i8]) -> Entry {
    (
        name.into(),
        DType::I8,
        shape.to_vec(),
        values.iter().map(|v| *v as u8).collect(),
    )
}

#[test]
fn quantize_refuses_an_already_quantized_checkpoint() {
    let dir = tmpdir("requantize");
    let model = tiny_model(&dir);
    let quantize = |input: &Path, format: &str, output: &Path| {
        vec![
            "quantize".to_string(),
            s(input).to_string(),
            "--format".into(),
            format.into(),
            "--output".into(),
            s(output).to_string(),
        ]
    };
    let run = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nibble(&args)
    };
    let fails = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nibble_fails(&args)
    };
    for stored in ["q4", "nf4", "nf4_dq", "int8", "lower"] {
        let q = dir.join(format!("m_{stored}.safetensors"));
        assert!(run(&quantize(&model, stored, &q)).ok);
        for target in ["q4", "nf4", "int8", "lower", "f16", "f32", stored] {
            let out = dir.join(format!("rq_{stored}_{target}.safetensors"));
            let msg = fails(&quantize(&q, target, &out));
            assert_names(
                &msg,
                &[
                    &format!("m_{stored}.safetensors"),
                    "0.weight is already quantized",
                    "f32/f16 checkpoint",
                ],
            );
            // The format the weight is in (nf4 in bitsandbytes' layout says so).
            let named = match stored {
                "nf4" => "bitsandbytes nf4, blocks of 64)".to_string(),
                "nf4_dq" => "double-quantized absmax)".to_string(),
                other => format!("({other})"),
            };
            assert_names(&msg, &[&named]);
            assert!(!out.exists(), "{} written", out.display());
        }
    }
    // bitsandbytes' 8-bit layout: int8 codes and a row scale `SCB`.
    let bnb8 = dir.join("bnb8.safetensors");
    write(
        &bnb8,
        &[
            i8s(
                "0.weight",
                &[3, 4],
                &[1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12],
            ),
            f32s("0.SCB", &[3], &[1.0, 2.0, 3.0]),
            f32s("0.bias", &[3], &[0.0; 3]),
        ],
    );
    let msg = fails(&quantize(&bnb8, "q4", &dir.join("rq_bnb8.safetensors")));
    assert_names(
        &msg,
        &["bnb8.safetensors", "0.weight", "(bitsandbytes int8)"],
    );
    // bitsandbytes' FP4 (which nibble reads as f32): its codes are no weight either.
    let fp4 = data("bnb_fp4_seq.safetensors");
    let msg = fails(&quantize(&fp4, "q4", &dir.join("rq_fp4.safetensors")));
    assert_names(&msg, &["already quantized (bitsandbytes fp4"]);
    // An f16 checkpoint is a float one: it quantizes.
    let half = dir.join("m_f16.safetensors");
    assert!(run(&quantize(&model, "f16", &half)).ok);
    let from_half = run(&quantize(&half, "q4", &dir.join("q4_from_f16.safetensors")));
    assert!(from_half.ok, "{}", from_half.stderr);
}

#[test]
fn quantize_refuses_weights_the_format_cannot_store() {
    let dir = tmpdir("unstorable");
    let with_row_1 = |name: &str, row: [f32; 4]| -> PathBuf {
        let path = dir.join(name);
        let mut w: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect();
        w[4..8].copy_from_slice(&row);
        write(
            &path,
            &[
                f32s("0.weight", &[3, 4], &w),
                f32s("0.bias", &[3], &[0.0; 3]),
            ],
        );
        path
    };
    let big = with_row_1("big.safetensors", [0.5, 0.25, -1.0e5, 1.0]);
    let huge = with_row_1("huge.safetensors", [3.0e38, -3.0e38, 0.0, 1.0]);
    let nan = with_row_1("nan.safetensors", [0.5, f32::NAN, 0.0, 1.0]);
    for (input, format, names) in [
        (
            &big,
            "f16",
            &["`0.weight` row 1, column 2", "-100000", "f16"][..],
        ),
        (
            &big,
            "lower",
            &["`0.weight` row 1, column 0", "-100000", "lower"][..],
        ),
        (
            &huge,
            "int8",
            &["`0.weight` row 1, column 0", "3e38", "int8"][..],
        ),
        (&nan, "f32", &["`0.weight` row 1, column 1", "NaN"][..]),
        (&nan, "nf4", &["`0.weight` row 1, column 1", "NaN"][..]),
    ] {
        let out = dir.join(format!("out_{format}.safetensors"));
        for json in [false, true] {
            let mut args = vec![
                "quantize",
                s(input),
                "--format",
                format,
                "--output",
                s(&out),
                "--report",
            ];
            if json {
                args.push("--json");
            }
            let msg = nibble_fails(&args);
            assert_names(&msg, names);
            assert_names(&msg, &[input.file_name().unwrap().to_str().unwrap()]);
            assert!(!out.exists(), "{} written for {format}", out.display());
        }
    }
}

#[test]
fn eval_all_on_a_model_without_linear_layers_gives_one_row() {
    let dir = tmpdir("no_linear");
    let model = dir.join("ln_only.safetensors");
    write(
        &model,
        &[
            f32s("0.weight", &[4], &[1.0, 0.5, 2.0, 1.5]),
            f32s("0.bias", &[4], &[0.0, 0.1, -0.1, 0.2]),
        ],
    );
    let data = tiny_data(&dir, "data.safetensors", &[("test", 6), ("train", 8)]);
    let v = nibble_json(&model_data_args(
        "eval",
        &model,
        &data,
        &["--format", "all", "--json"],
    ));
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!(rows[0]["format"], "f32");
    let run = nibble(&model_data_args(
        "eval",
        &model,
        &data,
        &["--format", "all"],
    ));
    assert!(
        run.ok && run.stderr.contains("no Linear layer"),
        "{}",
        run.stderr
    );
    // Nothing to put LoRA on.
    let msg = nibble_fails(&model_data_args("finetune", &model, &data, &FINETUNE));
    assert_names(&msg, &["--rank", "no Linear layer"]);
}

/// Training that diverges (a learning rate far too high) is an error naming `--lr`, the step
/// and the loss, exit status non-zero, and saves no adapter: the loss turned NaN mid-run, or
/// (one step) the last update made the adapter NaN after a finite loss. `--json` prints no
/// report.
#[test]
fn finetune_that_diverges_fails_and_saves_no_adapter() {
    let dir = tmpdir("diverges");
    let model = tiny_model(&dir);
    let data = tiny_data(&dir, "data.safetensors", &[("test", 6), ("train", 8)]);
    let ad = dir.join("ad");
    let run = |rest: &[&str]| {
        let mut args = model_data_args("finetune", &model, &data, &["--format", "q4"]);
        args.extend_from_slice(rest);
        args.extend(["--save-adapter", s(&ad)]);
        nibble(&args)
    };
    for json in [false, true] {
        let mut rest = vec!["--rank", "2", "--steps", "5", "--lr", "1e30"];
        if json {
            rest.push("--json");
        }
        let r = run(&rest);
        assert!(!r.ok, "diverged but succeeded: {}", r.stdout);
        assert_names(
            &r.stderr,
            &[
                "--lr: 1e30",
                "training diverged",
                "the loss is",
                "at step",
                "of 5",
            ],
        );
        assert!(r.stdout.trim().is_empty(), "{}", r.stdout);
        assert!(!ad.exists(), "an adapter was saved");
    }
    // One step: its loss is finite, its update is not.
    let r = run(&["--rank", "2", "--steps", "1", "--lr", "3e38"]);
    assert!(!r.ok, "diverged but succeeded: {}", r.stdout);
    assert_names(
        &r.stderr,
        &[
            "--lr: 3e38",
            "training diverged",
            "lora_",
            "(row ",
            "nothing was saved",
        ],
    );
    assert!(!ad.exists(), "an adapter was saved");
    // A sane rate still trains and saves.
    assert!(run(&["--rank", "2", "--steps", "3", "--lr", "0.01"]).ok);
    assert!(ad.join("adapter_model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).ok();
}

/// A `--save-adapter` destination that cannot take the adapter (an existing file, or a link
/// where one of its files goes) is refused before training, not after it, and left alone.
#[test]
fn a_bad_adapter_destination_is_refused_before_training() {
    let dir = tmpdir("adapter_destination");
    let model = tiny_model(&dir);
    let data = tiny_data(&dir, "data.safetensors", &[("test", 6), ("train", 8)]);
    let file = dir.join("a_file");
    std::fs::write(&file, b"keep").unwrap();
    let linked = dir.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    let target = dir.join("elsewhere.json");
    std::fs::write(&target, b"keep").unwrap();
    std::os::unix::fs::symlink(&target, linked.join("adapter_config.json")).unwrap();
    for (dest, what) in [(&file, "not a directory"), (&linked, "symbolic link")] {
        let mut args = model_data_args("finetune", &model, &data, &FINETUNE);
        args.extend(["--save-adapter", s(dest)]);
        let started = std::time::Instant::now();
        let out = nibble(&args);
        assert!(!out.ok && out.stderr.contains(what), "{}", out.stderr);
        // Refused up front: no training report on stdout.
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(started.elapsed().as_secs() < 30);
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert!(
        std::fs::symlink_metadata(linked.join("adapter_config.json"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// A model whose logits overflow f32 on the training data before any update (finite weights
/// near 3e38) is an error naming the model, not --lr: it said "training diverged ... try a
/// lower --lr", though no step had been taken.
#[test]
fn a_model_that_overflows_before_training_is_blamed_not_the_lr() {
    let dir = tmpdir("overflows_before_training");
    let model = dir.join("huge.safetensors");
    write(
        &model,
        &[
            f32s("0.weight", &[3, 4], &[3e38; 12]),
            f32s("0.bias", &[3], &[0.0; 3]),
            f32s("2.weight", &[2, 3], &[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]),
            f32s("2.bias", &[2], &[0.0; 2]),
        ],
    );
    let data = tiny_data(&dir, "data.safetensors", &[("test", 4), ("train", 8)]);
    let mut args = model_data_args("finetune", &model, &data, &["--format", "f32"]);
    args.extend(["--rank", "1", "--steps", "2", "--lr", "0.001"]);
    let msg = nibble_fails(&args);
    assert_names(
        &msg,
        &[
            "--model",
            "huge.safetensors",
            "before any update",
            "not --lr",
        ],
    );
    assert!(!msg.contains("try a lower --lr"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}
