//! `nibble inspect` and `nibble quantize` end to end: JSON keys, figures that follow from the
//! file, and the rule that an input is never overwritten.

mod common;
use common::*;

#[test]
fn inspect_lists_every_tensor_of_a_pth_with_the_issue_keys() {
    let model = data("digits_mlp.pth");
    let v = nibble_json(&["inspect", model.to_str().unwrap(), "--json"]);
    assert_eq!(keys(&v), sorted(&["file", "bytes", "tensors"]));
    let tensors = v["tensors"].as_array().unwrap();
    let names = report_names(&v);
    assert_eq!(
        names,
        ["0.bias", "0.weight", "2.bias", "2.weight", "3.bias", "3.weight", "5.bias", "5.weight"]
    );
    let mut total = 0;
    for t in tensors {
        assert_eq!(
            keys(t),
            sorted(&["name", "dtype", "shape", "format", "bytes"])
        );
        assert_eq!(t["dtype"], "f32");
        assert_eq!(t["format"], "f32");
        let numel: u64 = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .product();
        assert_eq!(t["bytes"].as_u64().unwrap(), 4 * numel);
        total += 4 * numel;
    }
    assert_eq!(tensors[1]["shape"], serde_json::json!([30, 64]));
    assert_eq!(v["bytes"].as_u64().unwrap(), total);
    // 64·30 + 30 + 2·30 + 30·20 + 20 + 20·10 + 10 parameters.
    assert_eq!(total, 4 * 2840);
    let table = nibble(&["inspect", model.to_str().unwrap()]);
    assert!(table.ok && table.stdout.contains("0.weight") && table.stdout.contains("11360"));
    // The table ends with the modules as `eval` runs them and the gaps `--activation` fills.
    assert!(
        table
            .stdout
            .contains("an nn.Sequential of modules 0, 2, 3, 5; 2 gaps between them"),
        "{}",
        table.stdout
    );
    let named = nibble(&["inspect", s(&data("named_classifier.pth"))]);
    assert!(
        named.ok
            && named.stdout.contains(
                "named modules, run in this order (--order changes it): fc1 → bn1 → fc2 → norm → head; --activation takes one entry for the 4 gaps between them, or one per gap"
            ),
        "{}",
        named.stdout
    );
    let bignet = nibble(&["inspect", s(&data("bignet_d128.pth"))]);
    assert!(
        bignet.ok && !bignet.stdout.contains("modules"),
        "{}",
        bignet.stdout
    );
}

#[test]
fn quantize_reports_every_weight_and_inspect_sees_its_parts() {
    let dir = tmpdir("quantize");
    let model = data("digits_mlp.pth");
    let before = std::fs::read(&model).unwrap();
    for format in ["q4", "nf4", "nf4_dq", "int8", "lower", "f16"] {
        let out = dir.join(format!("digits_{format}.safetensors"));
        let v = nibble_json(&[
            "quantize",
            model.to_str().unwrap(),
            "--format",
            format,
            "--output",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(
            keys(&v),
            sorted(&["format", "bytes_before", "bytes_after", "tensors"])
        );
        assert_eq!(v["format"], format);
        let tensors = v["tensors"].as_array().unwrap();
        let names = report_names(&v);
        assert_eq!(names, ["0.weight", "3.weight", "5.weight"], "{format}");
        for t in tensors {
            assert_eq!(
                keys(t),
                sorted(&[
                    "name",
                    "shape",
                    "max_diff",
                    "mean_diff",
                    "cosine",
                    "bytes_before",
                    "bytes_after"
                ])
            );
            let cosine = t["cosine"].as_f64().unwrap();
            assert!(cosine > 0.95 && cosine <= 1.0 + 1e-9, "{format} {t}");
            let (max, mean) = (
                t["max_diff"].as_f64().unwrap(),
                t["mean_diff"].as_f64().unwrap(),
            );
            assert!(max > 0.0 && mean > 0.0 && mean <= max, "{format} {t}");
            // NF4 is written in bitsandbytes' layout, whose fixed parts (the 16-level map, the
            // JSON state and, double-quantized, the 256-entry map: about 1.3 KB) outweigh the
            // codes of the smallest layer here (20 x 10).
            let fixed = if format == "nf4_dq" { 1400 } else { 0 };
            let (after, before) = (
                t["bytes_after"].as_u64().unwrap(),
                t["bytes_before"].as_u64().unwrap(),
            );
            assert!(after <= before / 2 + fixed, "{format} {t}");
        }
        let (b, a) = (
            v["bytes_before"].as_u64().unwrap(),
            v["bytes_after"].as_u64().unwrap(),
        );
        assert_eq!(b, 4 * 2840);
        assert!(a < b, "{format}: {a} >= {b}");
        // The file holds what the report says it does.
        let seen = nibble_json(&["inspect", out.to_str().unwrap(), "--json"]);
        assert_eq!(seen["bytes"].as_u64().unwrap(), a, "{format}");
        let formats: Vec<&str> = seen["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["name"].as_str().unwrap().starts_with("3.weight"))
            .map(|t| t["format"].as_str().unwrap())
            .collect();
        assert!(
            !formats.is_empty() && formats.iter().all(|f| *f == format),
            "{formats:?}"
        );
    }
    assert_eq!(std::fs::read(&model).unwrap(), before, "the input changed");
}

#[test]
fn quantize_include_selects_weights_by_regex() {
    let dir = tmpdir("include");
    let out = dir.join("first.safetensors");
    let model = data("digits_mlp.pth");
    let v = nibble_json(&[
        "quantize",
        model.to_str().unwrap(),
        "--format",
        "int8",
        "--output",
        out.to_str().unwrap(),
        "--include",
        r"^[05]\.weight$",
        "--json",
    ]);
    let names = report_names(&v);
    assert_eq!(names, ["0.weight", "5.weight"]);
    let seen = nibble_json(&["inspect", out.to_str().unwrap(), "--json"]);
    let kept = seen["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "3.weight")
        .expect("3.weight kept as it was");
    assert_eq!(kept["format"], "f32");
    let msg = nibble_fails(&[
        "quantize",
        model.to_str().unwrap(),
        "--format",
        "q4",
        "--output",
        out.to_str().unwrap(),
        "--include",
        "([unclosed",
    ]);
    assert!(msg.contains("--include"), "{msg}");
    // A pattern that selects no weight is an error, and nothing is written.
    let none = dir.join("none.safetensors");
    let msg = nibble_fails(&[
        "quantize",
        model.to_str().unwrap(),
        "--format",
        "q4",
        "--output",
        none.to_str().unwrap(),
        "--include",
        r"^fc\d\.weight$",
    ]);
    assert!(
        msg.contains("matches none of the weights") && msg.contains("0.weight"),
        "{msg}"
    );
    assert!(!none.exists());
}

#[test]
fn quantize_never_overwrites_its_input() {
    let dir = tmpdir("overwrite");
    let input = dir.join("model.safetensors");
    write(
        &input,
        &[
            f32s("0.weight", &[2, 16], &[0.5; 32]),
            f32s("0.bias", &[2], &[0.0; 2]),
        ],
    );
    let before = std::fs::read(&input).unwrap();
    let link = dir.join("link.safetensors");
    std::fs::hard_link(&input, &link).unwrap();
    let same_dir = format!("{}/./model.safetensors", dir.display());
    for output in [
        input.to_str().unwrap(),
        link.to_str().unwrap(),
        same_dir.as_str(),
    ] {
        let msg = nibble_fails(&[
            "quantize",
            input.to_str().unwrap(),
            "--format",
            "q4",
            "--output",
            output,
        ]);
        assert!(msg.contains("refusing to write over an input"), "{msg}");
    }
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn missing_and_broken_files_are_errors_naming_the_file() {
    let dir = tmpdir("broken");
    let missing = dir.join("nope.safetensors");
    let msg = nibble_fails(&["inspect", missing.to_str().unwrap()]);
    assert!(msg.contains("nope.safetensors"), "{msg}");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let msg = nibble_fails(&["inspect", junk.to_str().unwrap()]);
    assert!(msg.contains("junk.bin"), "{msg}");
}
