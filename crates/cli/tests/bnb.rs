//! Sequential models saved by bitsandbytes (`bnb.nn.Linear4bit` NF4 layers, plain and
//! double-quantized, `tests/data/bnb_seq*`, made by `tools/golden/make_bnb.py`; FP4, other
//! block sizes and `Linear8bitLt`, `tests/data/bnb_{fp4,int8}_seq*`, by
//! `tools/golden/make_bnb_more.py`): bitsandbytes' own logits, and hostile variants of the
//! layouts that must be errors naming the key; rows that are not whole blocks
//! (`tests/data/bnb_rows_*`, `tools/golden/make_bnb_partial_rows.py`) decoded flat.

mod common;
use common::*;
use nibble_io::{Checkpoint, DType};

/// The golden batch of `io` (`x` [50, 23], `labels`) as a data file in `dir`.
fn golden_data(dir: &std::path::Path, io: &str) -> std::path::PathBuf {
    let io = data(io);
    let d = dir.join("data.safetensors");
    write(
        &d,
        &[
            f32s("x_test", &[50, 23], &tensor(&io, "x")),
            i64s("y_test", &i64_values(&io, "labels")),
        ],
    );
    d
}

/// Each altered copy of a model (`(name, entries, parts)`), evaluated on `d`, fails with a
/// message holding every one of `parts`.
fn assert_cases_fail(
    dir: &std::path::Path,
    d: &std::path::Path,
    cases: Vec<(&str, Vec<Entry>, Vec<&str>)>,
) {
    for (name, entries, parts) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        write(&path, &entries);
        let msg = nibble_fails(&model_data_args(
            "eval",
            &path,
            d,
            &["--activation", "relu,tanh"],
        ));
        for p in parts {
            assert!(msg.contains(p), "{name}: `{p}` missing from: {msg}");
        }
    }
}

/// Every tensor of a file as entries, to write altered copies.
fn entries(path: &std::path::Path) -> Vec<Entry> {
    entries_of(&Checkpoint::open(path).unwrap())
}

/// `nibble inspect --json` of `file` names each tensor's format as `want` does.
fn assert_inspect_formats(file: &str, want: impl Fn(&str) -> &'static str) {
    let v = nibble_json(&["inspect", s(&data(file)), "--json"]);
    for t in v["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        assert_eq!(t["format"], want(name), "{file}: {name}");
    }
}

/// `nibble eval` of `model` on data file `d` (with `args`, writing the logits into `dir`): its
/// JSON, once its logits are within 1e-5 of `key` in `golden`.
fn eval_matches(
    dir: &std::path::Path,
    model: &std::path::Path,
    d: &std::path::Path,
    args: &[&str],
    golden: &std::path::Path,
    key: &str,
) -> serde_json::Value {
    let logits = dir.join(format!("{key}.safetensors"));
    let mut all = args.to_vec();
    all.extend(["--logits", s(&logits), "--json"]);
    let v = nibble_json(&model_data_args("eval", model, d, &all));
    let diff = max_diff(&tensor(&logits, "logits"), &tensor(golden, key));
    assert!(
        diff < 1e-5,
        "{}: logits differ from bitsandbytes' by {diff}",
        model.display()
    );
    v
}

#[test]
fn bitsandbytes_nf4_layers_give_bitsandbytes_logits() {
    let dir = tmpdir("bnb_logits");
    let d = golden_data(&dir, "bnb_seq_io.safetensors");
    let golden = data("bnb_seq_io.safetensors");
    for (model, key) in [
        ("bnb_seq.safetensors", "logits"),
        ("bnb_seq_dq.pth", "logits_dq"),
    ] {
        let v = eval_matches(
            &dir,
            &data(model),
            &d,
            &["--activation", "relu,tanh"],
            &golden,
            key,
        );
        // NF4 codes (half a byte a weight) and f32 absmaxes (plain) or 8-bit codes (double),
        // f32 biases of the first two layers.
        let n: usize = 23 * 37 + 37 * 41 + 41 * 7;
        let stats = if key == "logits" {
            4 * [23 * 37, 37 * 41, 41 * 7]
                .iter()
                .map(|n: &usize| n.div_ceil(64))
                .sum::<usize>()
        } else {
            [23 * 37, 37 * 41, 41 * 7]
                .iter()
                .map(|n: &usize| n.div_ceil(64) + 4 * n.div_ceil(64).div_ceil(256) + 4)
                .sum::<usize>()
        };
        let bytes = v["rows"][0]["bytes"].as_u64().unwrap() as usize;
        assert!(
            bytes >= n / 2 + stats + 4 * (37 + 41) && bytes < n / 2 + stats + 4 * 78 + 64,
            "{model}: {bytes} bytes"
        );
    }
    // `inspect` names the format of every part.
    assert_inspect_formats("bnb_seq_dq.pth", |name| {
        if name.ends_with(".bias") {
            "f32"
        } else {
            "nf4_dq"
        }
    });
    // A stored NF4 weight is not re-quantized into another format.
    let msg = nibble_fails(&model_data_args(
        "eval",
        &data("bnb_seq.safetensors"),
        &d,
        &["--activation", "relu,tanh", "--format", "q4"],
    ));
    assert!(
        msg.contains("0.weight") && msg.contains("nf4") && msg.contains("q4"),
        "{msg}"
    );
}

#[test]
fn altered_bitsandbytes_layouts_are_errors_naming_the_key() {
    let dir = tmpdir("bnb_hostile");
    let d = golden_data(&dir, "bnb_seq_io.safetensors");
    let base = entries(&data("bnb_seq.safetensors"));
    let state_key = "2.weight.quant_state.bitsandbytes__nf4";
    let json = |e: &Entry| -> serde_json::Value { serde_json::from_slice(&e.3).unwrap() };
    let state = json(base.iter().find(|e| e.0 == state_key).unwrap());
    let with_state = |v: serde_json::Value| -> Vec<Entry> {
        base.iter()
            .map(|e| {
                if e.0 == state_key {
                    let bytes = serde_json::to_vec(&v).unwrap();
                    (e.0.clone(), DType::U8, vec![bytes.len()], bytes)
                } else {
                    e.clone()
                }
            })
            .collect()
    };
    let set = |field: &str, value: serde_json::Value| {
        let mut v = state.clone();
        v[field] = value;
        with_state(v)
    };
    let mut cases: Vec<(&str, Vec<Entry>, Vec<&str>)> = vec![
        (
            "fp4",
            set("quant_type", "fp4".into()),
            vec![state_key, "quant_type", "fp4"],
        ),
        // Absmaxes for blocks of 64 where the state says 128: the absmax tensor's shape.
        (
            "block128",
            set("blocksize", 128.into()),
            vec!["2.weight.absmax", "shape"],
        ),
        (
            "block100",
            set("blocksize", 100.into()),
            vec![state_key, "blocksize", "100"],
        ),
        (
            "shape1d",
            set("shape", serde_json::json!([41 * 37])),
            vec![state_key, "shape"],
        ),
        (
            "shape_wide",
            set("shape", serde_json::json!([41, 38])),
            vec!["2.weight"],
        ),
    ];
    let altered = |key: &str, f: &dyn Fn(&Entry) -> Entry| -> Vec<Entry> {
        base.iter()
            .map(|e| if e.0 == key { f(e) } else { e.clone() })
            .collect()
    };
    let mut map = altered("2.weight.quant_map", &|e| {
        let mut b = e.3.clone();
        b[4..8].copy_from_slice(&(-0.5f32).to_le_bytes());
        (e.0.clone(), e.1, e.2.clone(), b)
    });
    cases.push((
        "map",
        std::mem::take(&mut map),
        vec!["2.weight.quant_map", "entry 1"],
    ));
    let nan = altered("0.weight.absmax", &|e| {
        let mut b = e.3.clone();
        b[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        (e.0.clone(), e.1, e.2.clone(), b)
    });
    cases.push(("nan", nan, vec!["0.weight.absmax", "element 2"]));
    let short = altered("2.weight", &|e| {
        (e.0.clone(), e.1, vec![e.2[0] - 1, 1], e.3[1..].to_vec())
    });
    cases.push(("short", short, vec!["2.weight", "shape"]));
    let garbage = altered(state_key, &|e| (e.0.clone(), e.1, vec![3], b"{x]".to_vec()));
    cases.push(("garbage", garbage, vec![state_key, "JSON"]));
    let no_map: Vec<Entry> = base
        .iter()
        .filter(|e| e.0 != "0.weight.quant_map")
        .cloned()
        .collect();
    cases.push(("nomap", no_map, vec!["0.weight.quant_map"]));
    let fp4_key: Vec<Entry> = base
        .iter()
        .map(|e| {
            let mut e = e.clone();
            if e.0 == state_key {
                e.0 = "2.weight.quant_state.bitsandbytes__fp4".into();
            }
            e
        })
        .collect();
    cases.push(("fp4key", fp4_key, vec!["2.weight", "FP4", "quant_type"]));
    assert_cases_fail(&dir, &d, cases);
}

#[test]
fn bitsandbytes_fp4_other_block_sizes_and_8bit_give_bitsandbytes_logits() {
    let dir = tmpdir("bnb_more");
    let d = golden_data(&dir, "bnb_more_io.safetensors");
    let golden = data("bnb_more_io.safetensors");
    // FP4 (blocks of 64, plain; blocks of 128, double-quantized) and NF4 with blocks of 256
    // read as f32; 8-bit layers as nibble's int8 (one byte a weight).
    let n: usize = 23 * 37 + 37 * 41 + 41 * 7;
    for (model, key, bytes) in [
        ("bnb_fp4_seq.safetensors", "logits_fp4", 4 * n + 4 * 78),
        ("bnb_int8_seq.pth", "logits_int8", n + 8 * 85 + 4 * 78),
    ] {
        let v = eval_matches(
            &dir,
            &data(model),
            &d,
            &["--activation", "relu,tanh"],
            &golden,
            key,
        );
        let held = v["rows"][0]["bytes"].as_u64().unwrap() as usize;
        assert!(
            held >= bytes && held < bytes + 256,
            "{model}: {held} bytes, expected about {bytes}"
        );
    }
    assert_inspect_formats("bnb_int8_seq.pth", |name| {
        if name.ends_with(".bias") {
            "f32"
        } else {
            "int8"
        }
    });
    assert_inspect_formats("bnb_fp4_seq.safetensors", |name| match name {
        n if n.ends_with(".bias") => "f32",
        n if n.starts_with("4.") => "nf4",
        _ => "fp4",
    });
    // The 8-bit weights are stored int8: asking for another format is an error naming it.
    let msg = nibble_fails(&model_data_args(
        "eval",
        &data("bnb_int8_seq.pth"),
        &d,
        &["--activation", "relu,tanh", "--format", "nf4"],
    ));
    assert!(msg.contains("0.weight") && msg.contains("int8"), "{msg}");
    // The FP4 weights, read as f32, may be quantized into a format like any f32 weight.
    let v = nibble_json(&model_data_args(
        "eval",
        &data("bnb_fp4_seq.safetensors"),
        &d,
        &["--activation", "relu,tanh", "--format", "int8", "--json"],
    ));
    let held = v["rows"][0]["bytes"].as_u64().unwrap() as usize;
    assert!(held < 2 * n, "{held} bytes");
}

#[test]
fn altered_8bit_layouts_are_errors_naming_the_key() {
    let dir = tmpdir("bnb8_hostile");
    let d = golden_data(&dir, "bnb_more_io.safetensors");
    let base = entries(&data("bnb_int8_seq.pth"));
    let altered = |key: &str, f: &dyn Fn(&Entry) -> Option<Entry>| -> Vec<Entry> {
        base.iter()
            .filter_map(|e| if e.0 == key { f(e) } else { Some(e.clone()) })
            .collect()
    };
    let cases: Vec<(&str, Vec<Entry>, Vec<&str>)> = vec![
        (
            "no_scb",
            altered("2.SCB", &|_| None),
            vec!["2.weight", "2.SCB"],
        ),
        (
            "scb_short",
            altered("2.SCB", &|e| {
                Some((e.0.clone(), e.1, vec![40], e.3[4..].to_vec()))
            }),
            vec!["2.SCB"],
        ),
        (
            "scb_nan",
            altered("2.SCB", &|e| {
                let mut b = e.3.clone();
                b[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
                Some((e.0.clone(), e.1, e.2.clone(), b))
            }),
            vec!["2.SCB", "element 1"],
        ),
        (
            "col_format",
            altered("2.weight_format", &|e| {
                Some((e.0.clone(), e.1, e.2.clone(), vec![1]))
            }),
            vec!["2.weight_format", "1"],
        ),
        (
            "f32_codes",
            altered("0.weight", &|e| {
                let b: Vec<u8> =
                    e.3.iter()
                        .flat_map(|&c| (c as i8 as f32).to_le_bytes())
                        .collect();
                Some((e.0.clone(), DType::F32, e.2.clone(), b))
            }),
            vec!["0.weight", "i8"],
        ),
    ];
    assert_cases_fail(&dir, &d, cases);
}

/// NF4 codes stored with `quant_storage` bf16 and f16 (FSDP-QLoRA's layout: the same bytes as
/// 2-byte elements) run as nf4_dq and give bitsandbytes' logits.
#[test]
fn bitsandbytes_quant_storage_codes_give_bitsandbytes_logits() {
    let dir = tmpdir("bnb_qstorage");
    let io = data("bnb_more_io.safetensors");
    let x = tensor(&io, "x_qs");
    let d = dir.join("qs.safetensors");
    write(
        &d,
        &[
            f32s("x_test", &[6, 64], &x),
            i64s("y_test", &[0, 1, 2, 3, 4, 5]),
        ],
    );
    let v = eval_matches(
        &dir,
        &data("bnb_qstorage_seq.pth"),
        &d,
        &[],
        &io,
        "logits_qs",
    );
    assert_eq!(v["rows"][0]["format"], "nf4_dq", "{v}");
}

/// NF4 weights whose rows are not whole blocks of 64 (`in` 48 and 32; `tests/data/bnb_rows_*`,
/// `tools/golden/make_bnb_partial_rows.py`) are decoded block by block over the flattened
/// weight, as bitsandbytes quantized them: the golden logits of that decode. (bitsandbytes'
/// own AVX-512 CPU kernel takes other blocks' absmaxes for such rows: its forward on the
/// machine that made the file is `logits_bnb_here`, 0.019 off.)
#[test]
fn bitsandbytes_rows_that_are_not_whole_blocks_decode_flat() {
    let dir = tmpdir("bnb_rows");
    let io = data("bnb_rows_io.safetensors");
    let d = dir.join("rows.safetensors");
    write(
        &d,
        &[
            f32s("x_test", &[6, 48], &tensor(&io, "x")),
            i64s("y_test", &i64_values(&io, "labels")),
        ],
    );
    eval_matches(&dir, &data("bnb_rows_seq.pth"), &d, &[], &io, "logits");
}
