//! Helpers shared by the `nibble` program's tests: running the binary, temporary directories,
//! writing small safetensors files.
#![allow(dead_code)]

use nibble_io::{write_safetensors, Checkpoint, DType};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (two levels above this crate).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A file of the repository's `tests/data`.
pub fn data(name: &str) -> PathBuf {
    repo().join("tests/data").join(name)
}

/// An empty directory of its own for one test.
pub fn tmpdir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-cli-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What one run of the program gave.
pub struct Run {
    /// True on exit status 0.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `nibble` with `args`.
pub fn nibble(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(args)
        .output()
        .expect("nibble runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `nibble` and parses its one JSON object (the run must succeed).
pub fn nibble_json(args: &[&str]) -> serde_json::Value {
    let run = nibble(args);
    assert!(run.ok, "nibble {args:?} failed: {}", run.stderr);
    serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

/// Runs `nibble`, expecting a clean failure (exit status 1, a message, no panic); returns the
/// message.
pub fn nibble_fails(args: &[&str]) -> String {
    let run = nibble(args);
    assert!(!run.ok, "nibble {args:?} succeeded: {}", run.stdout);
    assert!(
        run.stderr.contains("nibble: error:") && !run.stderr.contains("panicked"),
        "not a clean error: {}",
        run.stderr
    );
    run.stderr
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub type Entry = (String, DType, Vec<usize>, Vec<u8>);

/// An f32 tensor entry.
pub fn f32s(name: &str, shape: &[usize], values: &[f32]) -> Entry {
    (
        name.into(),
        DType::F32,
        shape.to_vec(),
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// An i64 tensor entry.
pub fn i64s(name: &str, values: &[i64]) -> Entry {
    (
        name.into(),
        DType::I64,
        vec![values.len()],
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// The `name` of every entry of a `--json` report's `tensors` (inspect's, quantize's).
pub fn report_names(report: &serde_json::Value) -> Vec<&str> {
    report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect()
}

/// Every tensor of `file` as an entry (sorted by name), to write altered copies.
pub fn entries_of(file: &Checkpoint) -> Vec<Entry> {
    file.keys()
        .map(|k| {
            let (dtype, shape) = file.info(k).unwrap();
            (
                k.to_string(),
                dtype,
                shape.to_vec(),
                file.bytes(k).unwrap().to_vec(),
            )
        })
        .collect()
}

/// Writes `entries` as a safetensors file.
pub fn write(path: &Path, entries: &[Entry]) {
    let refs: Vec<(String, DType, Vec<usize>, &[u8])> = entries
        .iter()
        .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_slice()))
        .collect();
    write_safetensors(path, &refs, &BTreeMap::new()).unwrap();
}

/// The keys of a JSON object, sorted.
pub fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

/// `names` as sorted owned strings (to compare with [`keys`]).
pub fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The arguments `<command> --model <model> --data <data>` followed by `rest`.
pub fn model_data_args<'a>(
    command: &'a str,
    model: &'a Path,
    data: &'a Path,
    rest: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![command, "--model", s(model), "--data", s(data)];
    args.extend_from_slice(rest);
    args
}

/// Tensor `key` of the safetensors (or `.pth`) file at `path`, as f32 values.
pub fn tensor(path: &Path, key: &str) -> Vec<f32> {
    nibble_io::Checkpoint::open(path)
        .unwrap()
        .tensor_f32(key, None)
        .unwrap()
        .into_vec()
}

/// Max |a - b| over two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The i64 tensor `key` of the file at `path` (golden labels).
pub fn i64_values(path: &Path, key: &str) -> Vec<i64> {
    nibble_io::Checkpoint::open(path)
        .unwrap()
        .bytes(key)
        .unwrap()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The per-step losses of a `finetune --json` report.
pub fn loss_curve(v: &serde_json::Value) -> Vec<f64> {
    v["loss"]
        .as_array()
        .expect("a loss array")
        .iter()
        .map(|l| l.as_f64().expect("a number"))
        .collect()
}
