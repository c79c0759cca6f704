//! Checkpoint I/O: the golden files, round trips, and hostile inputs (each must give an error,
//! never a panic).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nibble_io::checkpoint::{write_safetensors, Checkpoint, DType, Format};
use nibble_io::Error;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

fn load(name: &str, bytes: Vec<u8>) -> nibble_io::Result<Checkpoint> {
    Checkpoint::from_bytes(name, Arc::new(bytes))
}

/// The first `len` bytes of a shared buffer, without copying it.
struct Prefix(Arc<Vec<u8>>, usize);
impl AsRef<[u8]> for Prefix {
    fn as_ref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

/// Loads the checkpoint and touches every tensor through every accessor; returns the error
/// message of the first failure.
fn exercise(name: &str, bytes: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Result<(), String> {
    let ck = Checkpoint::from_bytes(name, bytes).map_err(|e| e.to_string())?;
    let keys: Vec<String> = ck.keys().map(str::to_owned).collect();
    for k in &keys {
        let (_, shape) = ck.info(k).unwrap();
        let shape = shape.to_vec();
        let b = ck.bytes(k).map_err(|e| e.to_string())?;
        let s = ck.shared_bytes(k).map_err(|e| e.to_string())?;
        assert_eq!(b, s.as_ref());
        let _ = ck.tensor_f32(k, Some(&shape));
        let _ = ck.half(k, None);
    }
    Ok(())
}

fn expect_err(r: nibble_io::Result<Checkpoint>, needle: &str) -> Error {
    match r {
        Ok(ck) => panic!("expected an error containing {needle:?}, loaded {ck:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.to_lowercase().contains(&needle.to_lowercase()),
                "error {msg:?} does not mention {needle:?}"
            );
            e
        }
    }
}

// ---------------------------------------------------------------- golden files

#[test]
fn golden_pth_and_safetensors_agree() {
    let st = Checkpoint::open(golden("bignet_d128.safetensors")).unwrap();
    let pt = Checkpoint::open(golden("bignet_d128.pth")).unwrap();
    assert_eq!(st.format(), Format::Safetensors);
    assert_eq!(pt.format(), Format::Pth);
    assert!(pt.path().ends_with("bignet_d128.pth"));
    let sk: Vec<&str> = st.keys().collect();
    let pk: Vec<&str> = pt.keys().collect();
    assert_eq!(sk, pk);
    // 6 blocks × 3 linear layers (weight + bias) and 5 LayerNorms (weight + bias)
    assert_eq!(sk.len(), 46);
    let mut sorted = sk.clone();
    sorted.sort();
    assert_eq!(sk, sorted, "keys are sorted");
    let mut n_linear_w = 0;
    for k in &sk {
        let (sd, ss) = st.info(k).unwrap();
        let (pd, ps) = pt.info(k).unwrap();
        assert_eq!((sd, ss), (pd, ps), "{k}");
        assert_eq!(sd, DType::F32);
        if ss == [128, 128] {
            n_linear_w += 1;
        } else {
            assert_eq!(ss, [128], "{k}");
        }
        assert_eq!(st.bytes(k).unwrap(), pt.bytes(k).unwrap(), "{k}");
        assert_eq!(
            st.shared_bytes(k).unwrap().as_ref(),
            pt.bytes(k).unwrap(),
            "{k}"
        );
    }
    assert_eq!(n_linear_w, 18);
    assert!(pt.metadata().is_empty());

    let w = pt
        .tensor_f32("model.0.model.0.weight", Some(&[128, 128]))
        .unwrap();
    let w2 = st.tensor_f32("model.0.model.0.weight", None).unwrap();
    assert_eq!(w, w2);
    // PyTorch's default init: |w| <= 1/sqrt(128)
    assert!(w.data().iter().all(|v| v.abs() <= 1.0 / 128f32.sqrt()));
    let h = pt
        .half("model.0.model.0.weight", Some(&[128, 128]))
        .unwrap();
    assert_eq!(h, nibble_tensor::HalfTensor::from_f32(&w));
    // LayerNorm init: weight 1, bias 0
    let ln = st.tensor_f32("model.1.weight", Some(&[128])).unwrap();
    assert!(ln.data().iter().all(|&v| v == 1.0));
}

#[test]
fn accessor_errors_name_key_and_shapes() {
    let st = Checkpoint::open(golden("bignet_d128.safetensors")).unwrap();
    let e = st
        .tensor_f32("model.0.model.0.weight", Some(&[128, 64]))
        .unwrap_err();
    match &e {
        Error::Shape {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(key, "model.0.model.0.weight");
            assert_eq!(expected, &[128, 64]);
            assert_eq!(found, &[128, 128]);
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("bignet_d128.safetensors"));
    assert!(matches!(
        st.bytes("nope").unwrap_err(),
        Error::MissingKey { .. }
    ));
    assert!(matches!(
        st.half("nope", None).unwrap_err(),
        Error::MissingKey { .. }
    ));

    // dtype errors: an i64 tensor
    let dir = tempdir("accessor");
    let p = dir.join("ints.safetensors");
    let v: Vec<u8> = [1i64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_safetensors(
        &p,
        &[("ids".into(), DType::I64, vec![3], &v[..])],
        &BTreeMap::new(),
    )
    .unwrap();
    let ck = Checkpoint::open(&p).unwrap();
    let e = ck.tensor_f32("ids", None).unwrap_err();
    match &e {
        Error::DType {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(key, "ids");
            assert!(expected.contains("f32") && expected.contains("f16"));
            assert_eq!(*found, DType::I64);
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        ck.half("ids", None).unwrap_err(),
        Error::DType { .. }
    ));
    assert_eq!(ck.bytes("ids").unwrap(), &v[..]);
}

#[test]
fn other_golden_safetensors_load() {
    for name in [
        "io_d128.safetensors",
        "grad_d128.safetensors",
        "nf4_256x128.safetensors",
    ] {
        let ck = Checkpoint::open(golden(name)).unwrap();
        assert!(!ck.is_empty());
        for k in ck.keys() {
            let (d, s) = ck.info(k).unwrap();
            assert_eq!(
                ck.bytes(k).unwrap().len(),
                s.iter().product::<usize>() * d.size_of()
            );
        }
    }
    let io = Checkpoint::open(golden("io_d128.safetensors")).unwrap();
    let norm = "q4.model.0.model.0.weight.norm";
    assert_eq!(io.info(norm).unwrap().0, DType::F16);
    let h = io.half(norm, Some(&[128, 8])).unwrap();
    let f = io.tensor_f32(norm, Some(&[128, 8])).unwrap();
    assert_eq!(h.to_f32(), f);
    let packed = io.shared_bytes("q4.model.0.model.0.weight.packed").unwrap();
    assert_eq!(packed.len(), 128 * 64);
    let moved = std::thread::spawn(move || packed.iter().map(|&b| b as u64).sum::<u64>())
        .join()
        .unwrap();
    assert!(moved > 0);
}

// ---------------------------------------------------------------- writing

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-ckpt-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn write_round_trip() {
    let dir = tempdir("roundtrip");
    let p = dir.join("out.safetensors");
    let a: Vec<u8> = (0..12u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
    let b: Vec<u8> = (0..3u16)
        .flat_map(|v| half::f16::from_f32(v as f32).to_le_bytes())
        .collect();
    let c: Vec<u8> = vec![7u8; 5];
    let d: Vec<u8> = (0..2i64).flat_map(|v| v.to_le_bytes()).collect();
    let e: Vec<u8> = vec![];
    let tensors = vec![
        ("z.u8".to_string(), DType::U8, vec![5], &c[..]),
        ("a.f32".to_string(), DType::F32, vec![3, 4], &a[..]),
        ("m.f16".to_string(), DType::F16, vec![3], &b[..]),
        ("q.i64".to_string(), DType::I64, vec![2], &d[..]),
        ("empty".to_string(), DType::F32, vec![0, 4], &e[..]),
    ];
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("note".to_string(), "quote \" and \\ and ü".to_string());
    write_safetensors(&p, &tensors, &meta).unwrap();
    let first = std::fs::read(&p).unwrap();
    // deterministic: the same input in another order gives the same bytes
    let mut rev = tensors.clone();
    rev.reverse();
    write_safetensors(&p, &rev, &meta).unwrap();
    assert_eq!(first, std::fs::read(&p).unwrap());
    // no temporary files left behind
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out.safetensors")]);

    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(ck.format(), Format::Safetensors);
    assert_eq!(ck.metadata(), &meta);
    assert_eq!(
        ck.keys().collect::<Vec<_>>(),
        ["a.f32", "empty", "m.f16", "q.i64", "z.u8"]
    );
    let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "data start is 8-byte aligned");
    for (k, dt, shape, bytes) in &tensors {
        assert_eq!(ck.info(k).unwrap(), (*dt, shape.as_slice()));
        let got = ck.bytes(k).unwrap();
        assert_eq!(got, *bytes);
    }
    // alignment: check offsets from the header
    let header: serde_json::Value = serde_json::from_slice(&first[8..8 + n]).unwrap();
    for (k, dt, _, _) in &tensors {
        let begin = header[k]["data_offsets"][0].as_u64().unwrap() as usize;
        assert_eq!(begin % dt.size_of(), 0, "{k} is aligned");
    }
    assert_eq!(
        ck.tensor_f32("a.f32", Some(&[3, 4])).unwrap().data()[11],
        11.0
    );
    assert_eq!(ck.tensor_f32("m.f16", None).unwrap().data(), &[0., 1., 2.]);

    // invalid writes fail and leave the old file intact
    let bad = vec![("x".to_string(), DType::F32, vec![2], &c[..])];
    assert!(matches!(
        write_safetensors(&p, &bad, &meta).unwrap_err(),
        Error::InvalidWrite { .. }
    ));
    let dup = vec![
        ("x".to_string(), DType::U8, vec![5], &c[..]),
        ("x".to_string(), DType::U8, vec![5], &c[..]),
    ];
    assert!(write_safetensors(&p, &dup, &meta).is_err());
    let reserved = vec![("__metadata__".to_string(), DType::U8, vec![5], &c[..])];
    assert!(write_safetensors(&p, &reserved, &meta).is_err());
    // a header beyond the readers' 100 MB limit (it was written, and refused when read)
    let mut huge = BTreeMap::new();
    huge.insert("notes".to_string(), "x".repeat(100_000_001));
    let e = write_safetensors(&p, &tensors, &huge).unwrap_err();
    assert!(e.to_string().contains("byte limit"), "{e}");
    assert_eq!(first, std::fs::read(&p).unwrap());
    // an unwritable location is an I/O error naming the path
    let e = write_safetensors(&dir.join("no/such/dir/x.safetensors"), &tensors, &meta).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("x.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rewrite_golden_is_identical() {
    let st = Checkpoint::open(golden("bignet_d128.pth")).unwrap();
    let keys: Vec<String> = st.keys().map(str::to_owned).collect();
    let tensors: Vec<(String, DType, Vec<usize>, &[u8])> = keys
        .iter()
        .map(|k| {
            let (d, s) = st.info(k).unwrap();
            (k.clone(), d, s.to_vec(), st.bytes(k).unwrap())
        })
        .collect();
    let dir = tempdir("rewrite");
    let p = dir.join("from_pth.safetensors");
    write_safetensors(&p, &tensors, &BTreeMap::new()).unwrap();
    let back = Checkpoint::open(&p).unwrap();
    let gold = Checkpoint::open(golden("bignet_d128.safetensors")).unwrap();
    for k in &keys {
        assert_eq!(back.bytes(k).unwrap(), gold.bytes(k).unwrap());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- truncation

/// Asserts that every prefix of `full` whose length is in `lengths` fails to load (on all
/// cores), and that the whole file loads.
fn assert_prefixes_fail(name: &str, full: Vec<u8>, lengths: Vec<usize>) {
    let full = Arc::new(full);
    let n = full.len();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let lengths = Arc::new(lengths);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (full, lengths) = (Arc::clone(&full), Arc::clone(&lengths));
            s.spawn(move || {
                for &len in lengths.iter().skip(t).step_by(threads) {
                    let r = Checkpoint::from_bytes(name, Arc::new(Prefix(Arc::clone(&full), len)));
                    assert!(r.is_err(), "{name}: loaded a {len}-byte prefix");
                }
            });
        }
    });
    assert!(Checkpoint::from_bytes(name, Arc::new(Prefix(full, n))).is_ok());
}

/// Every length through the header and the first and last 64 KiB of data, ±16 bytes around
/// every tensor boundary, and every 13th length elsewhere (the exhaustive sweep below takes
/// ~25 s of CPU: a full JSON parse per length).
#[test]
fn truncated_safetensors() {
    let full = std::fs::read(golden("bignet_d128.safetensors")).unwrap();
    let n = full.len();
    let ck = Checkpoint::open(golden("bignet_d128.safetensors")).unwrap();
    let header_end = 8 + u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let mut lengths: Vec<usize> = (0..(header_end + 65536).min(n)).collect();
    lengths.extend(n.saturating_sub(65536)..n);
    lengths.extend((0..n).step_by(13));
    for k in ck.keys() {
        let b = ck.bytes(k).unwrap();
        let start =
            b.as_ptr() as usize - ck.bytes(ck.keys().next().unwrap()).unwrap().as_ptr() as usize;
        for edge in [header_end + start, header_end + start + b.len()] {
            lengths.extend(edge.saturating_sub(16)..(edge + 16).min(n));
        }
    }
    lengths.sort_unstable();
    lengths.dedup();
    assert_prefixes_fail("t.safetensors", full, lengths);
}

/// The golden safetensors file truncated at every length (`cargo test -- --ignored`).
#[test]
#[ignore = "exhaustive: ~25 s of CPU in the dev profile"]
fn truncated_safetensors_every_length() {
    let full = std::fs::read(golden("bignet_d128.safetensors")).unwrap();
    let n = full.len();
    assert_prefixes_fail("t.safetensors", full, (0..n).collect());
}

/// The .pth truncated every 97 bytes, plus every length in its first 300 bytes and last 4 KiB
/// (the central directory and end records).
#[test]
fn truncated_pth_lengths() {
    let full = std::fs::read(golden("bignet_d128.pth")).unwrap();
    let n = full.len();
    let mut lengths: Vec<usize> = (0..n).step_by(97).collect();
    lengths.extend(0..300);
    lengths.extend(n.saturating_sub(4096)..n);
    lengths.sort_unstable();
    lengths.dedup();
    assert_prefixes_fail("t.pth", full, lengths);
}

#[test]
fn tiny_and_unknown_files() {
    expect_err(load("e", vec![]), "empty");
    for n in 1..10 {
        expect_err(load("short", vec![1; n]), "too short");
    }
    // A truncated legacy .pth is said to be short, not a safetensors header of 5e18 bytes.
    let e = expect_err(
        load("legacy8", b"\x80\x02\x8a\x0al\xfc\x9cF".to_vec()),
        "too short",
    );
    assert!(!e.to_string().contains("safetensors file:"), "{e}");
    expect_err(
        load("junk", b"hello world, not a checkpoint".to_vec()),
        "unrecognised",
    );
    expect_err(
        load("legacy", b"\x80\x02\x8a\x0alZ\xfc\x9ch".to_vec()),
        "magic number",
    );
    let dir = tempdir("tiny");
    let p = dir.join("empty.pth");
    std::fs::write(&p, b"").unwrap();
    let e = Checkpoint::open(&p).unwrap_err();
    assert!(
        e.to_string().contains("empty.pth") && e.to_string().contains("empty (0 bytes)"),
        "{e}"
    );
    // A directory, and a FIFO (whose open would block until a writer came), are named as
    // what they are, before anything is opened.
    let e = Checkpoint::open(&dir).unwrap_err();
    assert!(e.to_string().contains("a directory"), "{e}");
    #[cfg(unix)]
    {
        let fifo = dir.join("fifo.pth");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let e = Checkpoint::open(&fifo).unwrap_err();
            assert!(e.to_string().contains("a FIFO"), "{e}");
        } else {
            println!("tiny_and_unknown_files: skipping the FIFO case (mkfifo unavailable)");
        }
    }
    let e = Checkpoint::open(dir.join("missing.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- hostile safetensors

fn st(header: &str, data: &[u8]) -> Vec<u8> {
    st_raw(header.as_bytes(), data)
}

fn st_raw(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(data);
    v
}

#[test]
fn hostile_safetensors() {
    let ok = st(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert!(load("ok", ok).is_ok());
    // header length past the end, and absurd
    let mut v = st(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    v[..8].copy_from_slice(&1000u64.to_le_bytes());
    expect_err(load("past", v.clone()), "past the end");
    v[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(load("huge", v.clone()), "limit");
    v[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(load("huge", v), "limit");
    // out of range, reversed, mismatched, overlapping offsets
    let e = expect_err(
        load(
            "oor",
            st(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 4],
            ),
        ),
        "past the end of the data",
    );
    assert!(matches!(e, Error::BadTensor { ref key, .. } if key == "a"));
    expect_err(
        load(
            "oor",
            st(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
                &[0; 4],
            ),
        ),
        "past the end",
    );
    expect_err(
        load(
            "rev",
            st(
                r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
                &[0; 8],
            ),
        ),
        "before",
    );
    expect_err(
        load(
            "size",
            st(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 12],
            ),
        ),
        "needs 12",
    );
    expect_err(
        load(
            "size",
            st(
                r#"{"a":{"dtype":"F16","shape":[2,2],"data_offsets":[0,4]}}"#,
                &[0; 8],
            ),
        ),
        "needs 8",
    );
    let e = expect_err(
        load(
            "overlap",
            st(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}"#,
                &[0; 12],
            ),
        ),
        "overlaps",
    );
    assert!(
        e.to_string().contains("`a`") && e.to_string().contains("`b`"),
        "{e}"
    );
    expect_err(
        load(
            "same",
            st(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        "overlaps",
    );
    // empty tensors may share an offset
    assert!(load(
        "empty",
        st(
            r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
    )
    .is_ok());
    // shape products that overflow
    expect_err(
        load(
            "ovf",
            st(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        "overflows",
    );
    expect_err(
        load(
            "ovf",
            st(
                r#"{"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        "overflows",
    );
    expect_err(
        load(
            "neg",
            st(
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
        ),
        "invalid JSON",
    );
    // non-UTF-8 (in a key), invalid JSON, wrong types
    expect_err(
        load(
            "utf8",
            st_raw(
                b"{\"\xff\xfe\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}",
                &[0; 4],
            ),
        ),
        "UTF-8",
    );
    expect_err(load("json", st("{\"a\":", &[])), "invalid JSON");
    expect_err(load("json", st("[1,2]", &[])), "invalid JSON");
    expect_err(load("json", st("{}   trailing", &[])), "invalid JSON");
    expect_err(
        load(
            "field",
            st(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
                &[0; 4],
            ),
        ),
        "unknown field",
    );
    expect_err(
        load(
            "field",
            st(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,5]}}"#,
                &[0; 4],
            ),
        ),
        "invalid JSON",
    );
    expect_err(
        load(
            "field",
            st(
                r#"{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
        ),
        "duplicate field",
    );
    // a JSON nesting bomb stays an error (serde_json's recursion limit)
    let bomb = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    expect_err(
        load("bomb", st(&format!("{{\"a\":{bomb}}}"), &[])),
        "invalid JSON",
    );
    // duplicate keys, also in the metadata
    let e = expect_err(
        load(
            "dup",
            st(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0; 8],
            ),
        ),
        "duplicate key `a`",
    );
    assert!(matches!(e, Error::DuplicateKey { .. }));
    expect_err(
        load("dupmeta", st(r#"{"__metadata__":{"k":"1","k":"2"}}"#, &[])),
        "duplicate key",
    );
    expect_err(
        load(
            "dupmeta",
            st(r#"{"__metadata__":{},"__metadata__":{}}"#, &[]),
        ),
        "duplicate key",
    );
    expect_err(
        load("meta", st(r#"{"__metadata__":{"k":1}}"#, &[])),
        "invalid JSON",
    );
    expect_err(
        load("meta", st(r#"{"__metadata__":["k"]}"#, &[])),
        "invalid JSON",
    );
    let ck = load("meta", st(r#"{"__metadata__":{"k":"v"}}"#, &[])).unwrap();
    assert_eq!(ck.metadata().get("k").map(String::as_str), Some("v"));
    assert!(ck.is_empty());
    // unknown dtype
    let e = expect_err(
        load(
            "dt",
            st(
                r#"{"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#,
                &[0],
            ),
        ),
        "unknown dtype `F8_E4M3`",
    );
    assert!(matches!(e, Error::UnknownDType { .. }));
    // every dtype's name is understood
    for d in DType::ALL {
        let h = format!(
            r#"{{"a":{{"dtype":"{}","shape":[1],"data_offsets":[0,{}]}}}}"#,
            d.safetensors_name(),
            d.size_of()
        );
        let ck = load("dt", st(&h, &vec![0; d.size_of()])).unwrap();
        assert_eq!(ck.info("a").unwrap().0, d);
    }
}

// ---------------------------------------------------------------- zip / pth builders

struct ZipEntry<'a> {
    name: &'a [u8],
    data: &'a [u8],
    method: u16,
    /// Size written in the central directory instead of the real one.
    cd_size: Option<u32>,
}

fn entry<'a>(name: &'a str, data: &'a [u8]) -> ZipEntry<'a> {
    ZipEntry {
        name: name.as_bytes(),
        data,
        method: 0,
        cd_size: None,
    }
}

fn zip(entries: &[ZipEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for e in entries {
        let off = out.len() as u32;
        let size = e.data.len() as u32;
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&20u16.to_le_bytes()); // version
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        out.extend_from_slice(&e.method.to_le_bytes());
        out.extend_from_slice(&[0; 8]); // time, date, crc
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(e.name);
        out.extend_from_slice(e.data);

        let cs = e.cd_size.unwrap_or(size);
        cd.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        cd.extend_from_slice(&20u16.to_le_bytes());
        cd.extend_from_slice(&20u16.to_le_bytes());
        cd.extend_from_slice(&0u16.to_le_bytes());
        cd.extend_from_slice(&e.method.to_le_bytes());
        cd.extend_from_slice(&[0; 8]);
        cd.extend_from_slice(&cs.to_le_bytes());
        cd.extend_from_slice(&cs.to_le_bytes());
        cd.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        cd.extend_from_slice(&[0; 12]); // extra, comment, disk, attrs
        cd.extend_from_slice(&off.to_le_bytes());
        cd.extend_from_slice(e.name);
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&cd);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// Pickle fragments.
fn pstr(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend_from_slice(&(s.len() as u32).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

fn pint(i: i32) -> Vec<u8> {
    let mut v = vec![b'J'];
    v.extend_from_slice(&i.to_le_bytes());
    v
}

/// An integer as `pickle` writes it: BININT where it fits in 32 bits, else LONG1 (8 bytes).
fn pint64(i: i64) -> Vec<u8> {
    match i32::try_from(i) {
        Ok(i) => pint(i),
        Err(_) => {
            let mut v = vec![0x8a, 8];
            v.extend_from_slice(&i.to_le_bytes());
            v
        }
    }
}

fn ptuple(items: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![b'('];
    for i in items {
        v.extend_from_slice(i);
    }
    v.push(b't');
    v
}

/// A tensor's description in a state dict.
struct T<'a> {
    key: &'a str,
    storage_type: &'a str,
    storage: &'a str,
    numel: i32,
    offset: i32,
    size: &'a [i64],
    stride: &'a [i64],
}

/// What `torch.save(state_dict)` pickles, protocol 2.
fn state_dict_pickle(tensors: &[T]) -> Vec<u8> {
    let mut v = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(".to_vec();
    for t in tensors {
        v.extend(pstr(t.key));
        v.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
        let pid = ptuple(&[
            pstr("storage"),
            format!("ctorch\n{}\n", t.storage_type).into_bytes(),
            pstr(t.storage),
            pstr("cpu"),
            pint(t.numel),
        ]);
        let mut storage = pid;
        storage.push(b'Q');
        let size: Vec<Vec<u8>> = t.size.iter().map(|&d| pint64(d)).collect();
        let stride: Vec<Vec<u8>> = t.stride.iter().map(|&d| pint64(d)).collect();
        v.extend(ptuple(&[
            storage,
            pint(t.offset),
            ptuple(&size),
            ptuple(&stride),
            b"\x89".to_vec(),
            b"h\x00)R".to_vec(),
        ]));
        v.push(b'R');
    }
    v.extend_from_slice(b"u}q\x02bq\x03.");
    v
}

fn pth(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let names: Vec<String> = storages
        .iter()
        .map(|(k, _)| format!("arch/data/{k}"))
        .collect();
    let mut entries = vec![
        entry("arch/data.pkl", pickle),
        entry("arch/byteorder", b"little"),
    ];
    for ((_, d), n) in storages.iter().zip(&names) {
        entries.push(entry(n, d));
    }
    entries.push(entry("arch/version", b"3\n"));
    zip(&entries)
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn simple_tensor<'a>(key: &'a str, storage: &'a str) -> T<'a> {
    T {
        key,
        storage_type: "FloatStorage",
        storage,
        numel: 4,
        offset: 0,
        size: &[2, 2],
        stride: &[2, 1],
    }
}

// ---------------------------------------------------------------- hostile pth

#[test]
fn crafted_pth_loads() {
    let data = f32s(&[1., 2., 3., 4.]);
    let halfs: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let p = state_dict_pickle(&[
        simple_tensor("w", "0"),
        // transpose of the same storage: a strided (copied) tensor
        T {
            stride: &[1, 2],
            ..simple_tensor("wt", "0")
        },
        // a contiguous slice at an offset
        T {
            offset: 2,
            size: &[2],
            stride: &[1],
            ..simple_tensor("row1", "0")
        },
        T {
            storage_type: "HalfStorage",
            numel: 2,
            size: &[2],
            stride: &[1],
            ..simple_tensor("h", "1")
        },
        T {
            numel: 4,
            size: &[0, 3],
            stride: &[3, 1],
            ..simple_tensor("empty", "0")
        },
    ]);
    let ck = load("ok.pth", pth(&p, &[("0", &data), ("1", &halfs)])).unwrap();
    assert_eq!(ck.format(), Format::Pth);
    assert_eq!(
        ck.tensor_f32("w", Some(&[2, 2])).unwrap().data(),
        &[1., 2., 3., 4.]
    );
    assert_eq!(
        ck.tensor_f32("wt", Some(&[2, 2])).unwrap().data(),
        &[1., 3., 2., 4.]
    );
    // Read again through the copy `bytes` keeps (`tensor_f32` above made one for its call
    // alone, so that a file of many strided views is not held copied while it is open).
    assert_eq!(ck.byte_len("wt").unwrap(), 16);
    assert_eq!(ck.bytes("wt").unwrap(), &f32s(&[1., 3., 2., 4.])[..]);
    assert_eq!(
        ck.tensor_f32("wt", Some(&[2, 2])).unwrap().data(),
        &[1., 3., 2., 4.]
    );
    assert_eq!(
        ck.half("wt", Some(&[2, 2])).unwrap().to_f32().data(),
        &[1., 3., 2., 4.]
    );
    assert_eq!(
        ck.shared_bytes("wt").unwrap().as_ref(),
        &f32s(&[1., 3., 2., 4.])[..]
    );
    assert_eq!(ck.tensor_f32("row1", None).unwrap().data(), &[3., 4.]);
    assert_eq!(ck.tensor_f32("h", None).unwrap().data(), &[1.5, -2.0]);
    assert_eq!(ck.info("h").unwrap(), (DType::F16, &[2usize][..]));
    assert_eq!(ck.info("empty").unwrap().1, &[0, 3]);
    assert!(ck.bytes("empty").unwrap().is_empty());
    // _rebuild_parameter around a tensor, and protocol-4 opcodes
    let mut p4 = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01p\x94".to_vec();
    p4.extend_from_slice(b"\x8c\x0ctorch._utils\x94\x8c\x12_rebuild_parameter\x94\x93");
    p4.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
    let mut storage = ptuple(&[
        pstr("storage"),
        b"ctorch\nFloatStorage\n".to_vec(),
        pstr("0"),
        pstr("cpu"),
        b"\x8a\x01\x04".to_vec(),
    ]);
    storage.push(b'Q');
    p4.extend(ptuple(&[
        storage,
        b"K\x00".to_vec(),
        b"K\x04\x85".to_vec(),
        b"K\x01\x85".to_vec(),
        b"\x88".to_vec(),
        b"}".to_vec(),
        b"N".to_vec(),
    ]));
    p4.push(b'R');
    p4.extend(b"\x88}\x87R".iter());
    p4.extend_from_slice(b"u.");
    let ck = load("p4.pth", pth(&p4, &[("0", &data)])).unwrap();
    assert_eq!(
        ck.tensor_f32("p", Some(&[4])).unwrap().data(),
        &[1., 2., 3., 4.]
    );
}

#[test]
fn hostile_zip() {
    let data = f32s(&[1., 2., 3., 4.]);
    let p = state_dict_pickle(&[simple_tensor("w", "0")]);
    assert!(load("ok", pth(&p, &[("0", &data)])).is_ok());
    // compressed entry, named
    let mut c = entry("arch/data/0", &data);
    c.method = 8;
    let e = expect_err(
        load("deflate", zip(&[entry("arch/data.pkl", &p), c])),
        "compressed (method 8)",
    );
    assert!(matches!(e, Error::ZipEntry { ref entry, .. } if entry == "arch/data/0"));
    // missing data.pkl, missing storage
    expect_err(
        load("nopkl", zip(&[entry("arch/data/0", &data)])),
        "data.pkl",
    );
    let e = expect_err(
        load("nostorage", zip(&[entry("arch/data.pkl", &p)])),
        "arch/data/0` is missing",
    );
    assert!(matches!(e, Error::BadTensor { ref key, .. } if key == "w"));
    // path traversal and absolute names
    for bad in [
        "arch/../../etc/passwd",
        "/etc/passwd",
        "arch/./x",
        "C:/x",
        "a\\..\\b",
    ] {
        let e = expect_err(
            load("trav", zip(&[entry("arch/data.pkl", &p), entry(bad, b"x")])),
            bad,
        );
        assert!(matches!(e, Error::ZipEntry { .. }), "{e}");
    }
    // `torch.save` to `..pth` / `...pth` names the archive `.` / `..` (the file name without
    // its extension): read, as torch.load reads it (refused as path traversal).
    for top in [".", ".."] {
        let ok = load(
            "dots",
            zip(&[
                entry(&format!("{top}/data.pkl"), &p),
                entry(&format!("{top}/data/0"), &data),
            ]),
        );
        assert!(ok.is_ok(), "{top}: {:?}", ok.err());
    }
    // non-UTF-8 name
    let raw = ZipEntry {
        name: b"arch/\xff",
        data: b"x",
        method: 0,
        cd_size: None,
    };
    expect_err(
        load("utf8", zip(&[entry("arch/data.pkl", &p), raw])),
        "not UTF-8",
    );
    // duplicate names
    expect_err(
        load(
            "dup",
            zip(&[
                entry("arch/data.pkl", &p),
                entry("arch/data/0", &data),
                entry("arch/data/0", &data),
            ]),
        ),
        "appears twice",
    );
    // data out of range, overlapping another entry
    let mut big = entry("arch/data/0", &data);
    big.cd_size = Some(u32::MAX - 1);
    expect_err(
        load("oor", zip(&[entry("arch/data.pkl", &p), big])),
        "runs past",
    );
    let mut over = entry("arch/data.pkl", &p);
    over.cd_size = Some(p.len() as u32 + 20);
    expect_err(
        load("overlap", zip(&[over, entry("arch/data/0", &data)])),
        "overlaps",
    );
    // storage of the wrong size
    expect_err(load("size", pth(&p, &[("0", &data[..12])])), "needs 16");
    // big-endian byte order
    expect_err(
        load(
            "be",
            zip(&[
                entry("arch/data.pkl", &p),
                entry("arch/byteorder", b"big"),
                entry("arch/data/0", &data),
            ]),
        ),
        "byte order",
    );
    // central directory pointing outside the file, too many entries for its size
    let mut z = pth(&p, &[("0", &data)]);
    let eocd = z.len() - 22;
    z[eocd + 16..eocd + 20].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_err(load("cd", z.clone()), "central directory");
    let mut z = pth(&p, &[("0", &data)]);
    z[eocd + 8..eocd + 12].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    expect_err(load("count", z), "cannot fit");
    // zip magic with nothing behind it
    expect_err(load("magic", b"PK\x03\x04".to_vec()), "too short");
    expect_err(
        load("magic", [&b"PK\x03\x04"[..], &[0; 100]].concat()),
        "end-of-central-directory",
    );
}

#[test]
fn hostile_pickles() {
    let data = f32s(&[1., 2., 3., 4.]);
    let run = |pickle: &[u8]| load("p.pth", pth(pickle, &[("0", &data)]));
    // opcodes outside the subset, named with their offset
    let e = expect_err(
        run(b"\x80\x02cos\nsystem\nq\x00."),
        "global `os.system` is not allowed",
    );
    assert!(matches!(e, Error::Pickle { offset: 2, .. }), "{e}");
    // Tensors of dtypes nibble does not read: the error names the dtype family and what to
    // save instead (it said only that the global is not allowed).
    let e = expect_err(
        run(b"\x80\x02ctorch\nComplexFloatStorage\nq\x00."),
        "torch.ComplexFloatStorage`: tensors of this storage type (complex",
    );
    assert!(e.to_string().contains(".float()"), "{e}");
    let e = expect_err(
        run(b"\x80\x02ctorch._utils\n_rebuild_tensor_v3\nq\x00."),
        "float8, uint16, uint32, uint64",
    );
    assert!(e.to_string().contains("safetensors"), "{e}");
    // Other globals are classes that nothing calls: a bare one is no state dict, a call of one
    // (REDUCE) stays a call never made, and an instance that is no nn.Module is refused.
    for class in [
        &b"ctorch.nn.modules.container\nSequential\n"[..],
        b"c__main__\nNet\n",
    ] {
        let pickle = [&b"\x80\x02"[..], class, b"q\x00."].concat();
        expect_err(run(&pickle), "not a state dict");
        let called = [&b"\x80\x02"[..], class, b")R."].concat();
        expect_err(run(&called), "which nibble never makes");
        let built = [&b"\x80\x02"[..], class, b")\x81}b."].concat();
        expect_err(run(&built), "that is not an nn.Module");
    }
    // Modules shared level after level (each level's `_modules` names the one below twice):
    // an error at once, not 2^20 modules walked.
    let text = |t: &str| {
        let mut v = vec![b'X'];
        v.extend((t.len() as u32).to_le_bytes());
        v.extend(t.as_bytes());
        v
    };
    let mut diamond = b"\x80\x02".to_vec();
    for level in 0u8..21 {
        diamond.extend(b"c__main__\nM\n)\x81}(");
        diamond.extend(text("_parameters"));
        diamond.extend(b"ccollections\nOrderedDict\n)R");
        diamond.extend(text("_modules"));
        diamond.extend(b"ccollections\nOrderedDict\n)R");
        if level > 0 {
            diamond.push(b'(');
            for name in ["a", "b"] {
                diamond.extend(text(name));
                diamond.extend([b'h', level - 1]);
            }
            diamond.push(b'u');
        }
        diamond.extend([b'u', b'b', b'q', level]);
    }
    diamond.push(b'.');
    expect_err(run(&diamond), "more than 65536 modules");
    // Builtins and modules that reach the system are refused at once, even uncalled.
    for global in [
        &b"cbuiltins\neval\n"[..],
        b"c__builtin__\n__import__\n",
        b"csubprocess\nPopen\n",
        b"cposix\nsystem\n",
    ] {
        let pickle = [&b"\x80\x02"[..], global, b"q\x00."].concat();
        expect_err(run(&pickle), "is not allowed");
    }
    // A module whose parameter is the result of a call: an error naming it, nothing called.
    expect_err(
        run(b"\x80\x02c__main__\nNet\n)\x81}(X\x0b\x00\x00\x00_parametersccollections\nOrderedDict\n)R(X\x01\x00\x00\x00wcposixpath\njoin\n)RuX\x08\x00\x00\x00_modulesccollections\nOrderedDict\n)Rub."),
        "posixpath.join",
    );
    // The inert classes (Lightning's hyperparameters) are never called: an instance is opaque,
    // and is not a state dict; NEWOBJ of anything else is refused.
    expect_err(
        run(b"\x80\x02cargparse\nNamespace\n)\x81}b."),
        "argparse.Namespace object, not a state dict",
    );
    expect_err(
        run(b"\x80\x02ccollections\nOrderedDict\n)\x81."),
        "NEWOBJ of global OrderedDict",
    );
    expect_err(
        run(b"\x80\x02cargparse\nArgumentParser\n."),
        "argparse.ArgumentParser",
    );
    let e = expect_err(run(b"\x80\x02(i__builtin__\nobject\n."), "INST");
    assert!(matches!(e, Error::Pickle { offset: 3, .. }), "{e}");
    expect_err(run(b"\x80\x02}N0."), "POP");
    expect_err(run(b"\x80\x04\x92."), "0x92");
    // Sets are read (protocol 4 pickles a module's non-persistent buffers so), as lists: an
    // ADDITEMS onto a dict is an error.
    expect_err(run(b"\x80\x04\x8f."), "list of 0");
    expect_err(run(b"\x80\x04}(K\x01\x90."), "not a list");
    expect_err(run(b"\x80\x02\xff."), "0xff");
    expect_err(run(b"\x80\x09}."), "protocol 9");
    expect_err(
        run(b"\x80\x02ctorch\nUntypedStorage\n."),
        "torch.UntypedStorage",
    );
    // truncated / unterminated
    expect_err(run(b"\x80\x02}"), "without STOP");
    expect_err(run(b""), "without STOP");
    expect_err(run(b"\x80\x02c"), "newline");
    expect_err(run(b"\x80\x02ccollections"), "newline");
    expect_err(run(b"\x80\x02(}."), "unclosed MARK");
    // stack misuse
    expect_err(run(b"\x80\x02."), "underflow");
    expect_err(run(b"\x80\x02}(s."), "underflow");
    expect_err(run(b"\x80\x02t."), "no MARK");
    expect_err(run(b"\x80\x02h\x05."), "never stored");
    expect_err(run(b"\x80\x02j\xff\xff\xff\xff."), "never stored");
    expect_err(run(b"\x80\x02]K\x01K\x01s."), "not a dict");
    expect_err(run(b"\x80\x02}K\x01a."), "not a list");
    expect_err(run(b"\x80\x02}(K\x01u."), "odd");
    expect_err(run(b"\x80\x02K\x01)R."), "cannot call");
    // absurd lengths
    expect_err(run(b"\x80\x02X\xff\xff\xff\xff."), "needs 4294967295 bytes");
    expect_err(
        run(b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xff."),
        "bytes of argument",
    );
    expect_err(
        run(b"\x80\x02\x8d\x00\x00\x00\x00\x00\x00\x01\x00."),
        "bytes",
    );
    expect_err(
        run(b"\x80\x02\x95\xff\xff\xff\xff\xff\xff\xff\xff."),
        "FRAME",
    );
    expect_err(run(b"\x80\x02\x8a\xff."), "needs 255 bytes");
    // An int beyond 64 bits (2**64 as LONG1 of 9 bytes) is a value of its own: beside a
    // state dict it is read past (it was an error), as a tensor's number an error.
    expect_err(
        run(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01."),
        "int beyond 64 bits",
    );
    expect_err(run(b"\x80\x02X\x02\x00\x00\x00\xff\xfe."), "UTF-8");
    // recursion / stack bombs
    let mut bomb = b"\x80\x02".to_vec();
    bomb.extend(std::iter::repeat_n(b']', 100_000));
    bomb.extend(std::iter::repeat_n(b'a', 99_999));
    bomb.push(b'.');
    expect_err(run(&bomb), "nested deeper");
    let mut bomb = b"\x80\x02".to_vec();
    bomb.extend(std::iter::repeat_n(b'(', 100_000));
    expect_err(run(&bomb), "MARKs nested deeper");
    let mut bomb = b"\x80\x02N".to_vec();
    bomb.extend(std::iter::repeat_n(0x85u8, 100_000)); // TUPLE1 wrapping TUPLE1 ...
    bomb.push(b'.');
    expect_err(run(&bomb), "nested deeper");
    let mut bomb = b"\x80\x02".to_vec();
    bomb.extend(std::iter::repeat_n(b'N', 2_000_000));
    expect_err(run(&bomb), "stack exceeds");
    // a list doubled through the memo: stays linear thanks to copy-on-write accounting
    let mut bomb = b"\x80\x02]q\x00".to_vec();
    for _ in 0..200_000 {
        bomb.extend_from_slice(b"h\x00h\x00aq\x00");
    }
    bomb.push(b'.');
    let t = std::time::Instant::now();
    let r = run(&bomb);
    assert!(r.is_err());
    assert!(t.elapsed().as_secs() < 5);
    // memo overflow
    let mut bomb = b"\x80\x02N".to_vec();
    for i in 0..(1u32 << 20) + 1 {
        bomb.push(b'r');
        bomb.extend_from_slice(&i.to_le_bytes());
    }
    bomb.push(b'.');
    expect_err(run(&bomb), "memo exceeds");
    // top level not a state dict, values not tensors, keys not strings
    expect_err(run(b"\x80\x02]."), "not a state dict");
    expect_err(run(b"\x80\x02}X\x01\x00\x00\x00kK\x01s."), "not a tensor");
    expect_err(run(b"\x80\x02}K\x01K\x01s."), "not a string");
    // BUILD on something other than a dict
    expect_err(run(b"\x80\x02]}b."), "BUILD");
    // duplicate keys in the dict
    let mut p = state_dict_pickle(&[simple_tensor("w", "0"), simple_tensor("w", "0")]);
    let e = expect_err(load("dup", pth(&p, &[("0", &data)])), "duplicate key `w`");
    assert!(matches!(e, Error::DuplicateKey { .. }));
    p.clear();
}

#[test]
fn hostile_tensor_descriptions() {
    let data = f32s(&[1., 2., 3., 4.]);
    let run = |t: T| load("t.pth", pth(&state_dict_pickle(&[t]), &[("0", &data)]));
    expect_err(
        run(T {
            offset: 1,
            ..simple_tensor("w", "0")
        }),
        "reaches past",
    );
    expect_err(
        run(T {
            stride: &[3, 1],
            ..simple_tensor("w", "0")
        }),
        "reaches past",
    );
    expect_err(
        run(T {
            size: &[2, 3],
            ..simple_tensor("w", "0")
        }),
        "reaches past",
    );
    expect_err(
        run(T {
            numel: 5,
            ..simple_tensor("w", "0")
        }),
        "needs 20",
    );
    expect_err(
        run(T {
            offset: -1,
            ..simple_tensor("w", "0")
        }),
        "non-negative",
    );
    expect_err(
        run(T {
            size: &[-1, 2],
            ..simple_tensor("w", "0")
        }),
        "non-negative",
    );
    expect_err(
        run(T {
            size: &[2, 2],
            stride: &[1],
            ..simple_tensor("w", "0")
        }),
        "stride 1",
    );
    expect_err(
        run(T {
            size: &[65536, 65536, 65536, 65536],
            stride: &[0, 0, 0, 0],
            ..simple_tensor("w", "0")
        }),
        "overflows",
    );
    let e = expect_err(
        run(T {
            storage_type: "QInt8Storage",
            ..simple_tensor("w", "0")
        }),
        "QInt8Storage",
    );
    assert!(matches!(e, Error::Pickle { .. }));
    let e = expect_err(run(simple_tensor("w", "7")), "arch/data/7");
    assert!(matches!(e, Error::BadTensor { .. }));
    // a strided view that fits is fine; a broadcast one within the storage size too
    let ck = run(T {
        size: &[2, 2],
        stride: &[0, 1],
        ..simple_tensor("w", "0")
    })
    .unwrap();
    assert_eq!(ck.tensor_f32("w", None).unwrap().data(), &[1., 2., 1., 2.]);
}

#[test]
fn broadcast_views_larger_than_their_storage_read_as_torch_reads_them() {
    // `torch.save(torch.tensor([1., 2., 3., 4.])[:2].expand(1000, 2))`-like views: stride 0,
    // a million elements' worth of view over a storage of four floats.
    let data = f32s(&[1., 2., 3., 4.]);
    let open = |t: T| load("expand.pth", pth(&state_dict_pickle(&[t]), &[("0", &data)])).unwrap();
    let ck = open(T {
        size: &[1000, 2],
        stride: &[0, 1],
        offset: 1,
        ..simple_tensor("w", "0")
    });
    let t = ck.tensor_f32("w", Some(&[1000, 2])).unwrap();
    assert_eq!(t.shape(), &[1000, 2]);
    assert!(t.data().chunks(2).all(|r| r == [2.0, 3.0]));
    let h = ck.half("w", None).unwrap();
    assert_eq!(h.to_f32().data(), t.data());
    assert_eq!(ck.byte_len("w").unwrap(), 8000);
    assert_eq!(ck.bytes("w").unwrap().len(), 8000);
    // a scalar expanded to a bias
    let ck = open(T {
        size: &[1024],
        stride: &[0],
        ..simple_tensor("b", "0")
    });
    assert!(ck
        .tensor_f32("b", None)
        .unwrap()
        .data()
        .iter()
        .all(|&v| v == 1.0));
    // a view too large for any machine: an error naming the key and the memory, not an abort
    let ck = open(T {
        size: &[1 << 30, 1 << 30],
        stride: &[0, 0],
        ..simple_tensor("huge", "0")
    });
    for e in [
        ck.tensor_f32("huge", None).unwrap_err(),
        ck.bytes("huge").unwrap_err(),
    ] {
        let msg = e.to_string();
        assert!(
            msg.contains("huge") && msg.contains("broadcast") && msg.contains("GiB"),
            "{msg}"
        );
    }
    assert_eq!(ck.byte_len("huge").unwrap(), 1 << 62);
}

/// A tensor with a dimension of 0 holds no elements and no bytes, however large its other
/// dimensions: PyTorch saves and loads `torch.empty(2**62, 0, 3)`. Such a shape was refused as
/// an overflow (its dimensions multiplied left to right overflowed before the 0); a shape whose
/// element count overflows is still an error naming the key and the shape.
#[test]
fn empty_tensors_with_huge_dimensions_load_as_torch_loads_them() {
    const BIG: usize = 1 << 62;
    let check_empty = |ck: &Checkpoint, key: &str, dtype: DType, shape: &[usize]| {
        assert_eq!(ck.info(key).unwrap(), (dtype, shape), "{key}");
        assert!(ck.bytes(key).unwrap().is_empty(), "{key}");
        assert!(ck.shared_bytes(key).unwrap().is_empty(), "{key}");
        assert_eq!(ck.byte_len(key).unwrap(), 0, "{key}");
        if matches!(dtype, DType::F32 | DType::F16) {
            let t = ck.tensor_f32(key, Some(shape)).unwrap();
            assert_eq!((t.shape(), t.data().len()), (shape, 0), "{key}");
            let h = ck.half(key, Some(shape)).unwrap();
            assert_eq!((h.shape(), h.data().len()), (shape, 0), "{key}");
        }
    };

    // safetensors: [2^62, 0, 3] of f32, and the largest such shape JSON can give, beside a
    // tensor with data.
    let header = format!(r#"{{"e":{{"dtype":"F32","shape":[{BIG},0,3],"data_offsets":[0,0]}},"#)
        + &format!(r#""z":{{"dtype":"F32","shape":[{BIG},4,0],"data_offsets":[0,0]}},"#)
        + &format!(
            r#""m":{{"dtype":"F64","shape":[{m},{m},0,{m}],"data_offsets":[8,8]}},"#,
            m = usize::MAX
        )
        + r#""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let ck = load("empty.safetensors", st(&header, &f32s(&[1., 2.]))).unwrap();
    check_empty(&ck, "e", DType::F32, &[BIG, 0, 3]);
    // The zero last: the tensor's own element count (`checked_numel`) multiplied left to
    // right and overflowed before reaching it.
    check_empty(&ck, "z", DType::F32, &[BIG, 4, 0]);
    check_empty(
        &ck,
        "m",
        DType::F64,
        &[usize::MAX, usize::MAX, 0, usize::MAX],
    );
    assert_eq!(ck.tensor_f32("a", None).unwrap().data(), &[1., 2.]);
    // ... and such a tensor given data is refused, as any tensor whose bytes are not its size.
    let header = format!(r#"{{"e":{{"dtype":"F32","shape":[{BIG},0,3],"data_offsets":[0,4]}}}}"#);
    expect_err(load("e.safetensors", st(&header, &[0; 4])), "needs 0");

    // Written and read back.
    let dir = tempdir("empty-huge");
    let p = dir.join("e.safetensors");
    let tensors = vec![("e".to_string(), DType::F32, vec![BIG, 0, 3], &[][..])];
    write_safetensors(&p, &tensors, &BTreeMap::new()).unwrap();
    check_empty(
        &Checkpoint::open(&p).unwrap(),
        "e",
        DType::F32,
        &[BIG, 0, 3],
    );

    // .pth: what torch.save writes for `torch.empty(2**62, 0, 3)` (strides 3, 3, 1).
    let data = f32s(&[1., 2., 3., 4.]);
    let p = state_dict_pickle(&[T {
        size: &[1 << 62, 0, 3],
        stride: &[3, 3, 1],
        ..simple_tensor("e", "0")
    }]);
    let ck = load("empty.pth", pth(&p, &[("0", &data)])).unwrap();
    check_empty(&ck, "e", DType::F32, &[BIG, 0, 3]);

    // An element count (or byte size) that overflows is still an error naming the file, the
    // key and the shape.
    for (shape, dtype) in [
        (format!("[{BIG},4,3]"), "F32"),
        (format!("[{BIG},1]"), "F32"),
        (format!("[{m},{m}]", m = usize::MAX), "U8"),
    ] {
        let header =
            format!(r#"{{"o":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,0]}}}}"#);
        let e = expect_err(load("o.safetensors", st(&header, &[])), "overflows");
        let (msg, shape) = (e.to_string(), shape.replace(',', ", "));
        assert!(
            msg.contains("o.safetensors") && msg.contains("`o`") && msg.contains(&shape),
            "{msg}"
        );
        assert!(matches!(e, Error::BadTensor { .. }), "{e}");
    }
    let p = state_dict_pickle(&[T {
        size: &[1 << 62, 4, 3],
        stride: &[12, 3, 1],
        ..simple_tensor("o", "0")
    }]);
    let e = expect_err(load("o.pth", pth(&p, &[("0", &data)])), "overflows");
    let msg = e.to_string();
    assert!(
        msg.contains("o.pth") && msg.contains("`o`") && msg.contains(&format!("[{BIG}, 4, 3]")),
        "{msg}"
    );
    let tensors = vec![("o".to_string(), DType::F32, vec![BIG, 4, 3], &[][..])];
    let e = write_safetensors(&dir.join("o.safetensors"), &tensors, &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`o`") && e.contains("overflows"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- fuzz regressions

#[test]
fn fuzz_regressions_replay() {
    // The fuzzers' finds kept as files (`tests/data/fuzz/`).
    let rd = std::fs::read_dir(golden("fuzz")).unwrap();
    let mut n = 0;
    for f in rd {
        let f = f.unwrap().path();
        if f.is_file() {
            let bytes = std::fs::read(&f).unwrap();
            // must return (Ok or Err), never panic; the fuzz seeds (`small*`, valid files made
            // by fuzz/seeds/make_seeds.py) must load
            let r = exercise(&f.to_string_lossy(), Arc::new(bytes));
            let seed = f
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("small"));
            assert!(!seed || r.is_ok(), "{}: {r:?}", f.display());
            n += 1;
        }
    }
    assert!(n > 0, "no fuzz regressions in tests/data/fuzz");
    eprintln!("replayed {n} fuzz regressions");
}

#[test]
fn golden_files_exercise_cleanly() {
    for name in ["bignet_d128.pth", "bignet_d128.safetensors"] {
        let bytes = std::fs::read(golden(name)).unwrap();
        exercise(name, Arc::new(bytes)).unwrap();
    }
}

/// Training checkpoints keep the state dict under a key beside other things (PyTorch's tutorial
/// format with its optimizer state, Lightning's `state_dict`): the reader takes that dict
/// (`tests/data/ckpt_*.pth`, `tools/golden/make_training_checkpoints.py`); where several dicts
/// of tensors are, the one named `model` (not `ema`, whose values are halved); with no
/// preferred name among several, or none at all, an error naming the keys.
#[test]
fn training_checkpoints_give_their_state_dict() {
    let tutorial = Checkpoint::open(golden("ckpt_tutorial.pth")).unwrap();
    let keys: Vec<&str> = tutorial.keys().collect();
    assert_eq!(keys, ["0.bias", "0.weight", "2.bias", "2.weight"]);
    let lightning = Checkpoint::open(golden("ckpt_lightning.pth")).unwrap();
    let two = Checkpoint::open(golden("ckpt_two_models.pth")).unwrap();
    for key in ["0.weight", "0.bias", "2.weight", "2.bias"] {
        let want = tutorial.tensor_f32(key, None).unwrap();
        let l = lightning.tensor_f32(&format!("model.{key}"), None).unwrap();
        assert_eq!(l.data(), want.data(), "{key}");
        assert_eq!(
            two.tensor_f32(key, None).unwrap().data(),
            want.data(),
            "{key}"
        );
    }
    // Lightning's hyperparameters object and an argparse.Namespace beside it: kept opaque.
    let hparams = Checkpoint::open(golden("ckpt_hparams.pth")).unwrap();
    let keys: Vec<&str> = hparams.keys().collect();
    assert_eq!(
        keys,
        [
            "model.0.bias",
            "model.0.weight",
            "model.2.bias",
            "model.2.weight"
        ]
    );
    for (name, needle) in [
        (
            "ckpt_ambiguous.pth",
            "several state dicts (`generator`, `discriminator`)",
        ),
        (
            "ckpt_no_state_dict.pth",
            "`epoch` (int 3), `optimizer_state_dict` (dict of 2)",
        ),
    ] {
        let e = Checkpoint::open(golden(name)).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains(name), "{e}");
    }
}

// ---------------------------------------------------------------- the legacy format

/// The names, dtypes, shapes and bytes of a checkpoint's tensors, in the file's order.
fn tensors_in_order(ck: &Checkpoint) -> Vec<(String, DType, Vec<usize>, Vec<u8>)> {
    ck.keys_in_file_order()
        .map(|k| {
            let (dtype, shape) = ck.info(k).unwrap();
            (
                k.to_owned(),
                dtype,
                shape.to_vec(),
                ck.bytes(k).unwrap().to_vec(),
            )
        })
        .collect()
}

/// Checkpoints in PyTorch's legacy format (before 1.6, or `_use_new_zipfile_serialization=False`;
/// `tools/golden/make_legacy_pth.py`) read as the same state dicts saved in the zip format: every
/// tensor's name (in the dict's order), dtype, shape and bytes. They hold f32, f16, i64 and bool
/// tensors, a transposed one, two sharing a storage, an empty one, pickle protocols 2 and 4,
/// and a training checkpoint whose state dict sits beside an optimizer's state.
#[test]
fn legacy_checkpoints_read_as_their_zip_twins() {
    for (legacy, zip) in [
        ("legacy_mixed.pth", "legacy_mixed_zip.pth"),
        ("legacy_mixed_p4.pth", "legacy_mixed_zip.pth"),
        ("legacy_tutorial.pth", "legacy_tutorial_zip.pth"),
    ] {
        let got = Checkpoint::open(golden(legacy)).unwrap();
        let want = Checkpoint::open(golden(zip)).unwrap();
        assert_eq!(got.format(), Format::Pth, "{legacy}");
        let (got, want) = (tensors_in_order(&got), tensors_in_order(&want));
        assert!(!want.is_empty());
        assert_eq!(got, want, "{legacy} against {zip}");
    }
    let mixed = Checkpoint::open(golden("legacy_mixed.pth")).unwrap();
    let order: Vec<&str> = mixed.keys_in_file_order().collect();
    assert_eq!(
        order,
        [
            "fc.weight",
            "fc.weight_t",
            "fc.row",
            "half",
            "steps",
            "mask",
            "empty"
        ]
    );
}

/// A legacy checkpoint cut short anywhere, written on a big-endian machine, or of another
/// protocol version: an error naming the file, never a panic or a tensor read from the wrong
/// bytes. (Bytes after its last storage are ignored, as `torch.load` ignores them: see
/// `legacy_file_saved_twice_reads_its_first_record`.)
#[test]
fn broken_legacy_checkpoints_are_errors() {
    let full = std::fs::read(golden("legacy_mixed.pth")).unwrap();
    let n = full.len();
    assert_prefixes_fail("legacy.pth", full.clone(), (0..n).collect());

    let find = |needle: &[u8]| {
        full.windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    };
    // `little_endian`: NEWTRUE (0x88) -> NEWFALSE (0x89).
    let at = find(b"little_endian") + b"little_endian".len();
    let flag = (at..at + 4).find(|&i| full[i] == 0x88).unwrap();
    let mut big = full.clone();
    big[flag] = 0x89;
    expect_err(load("legacy.pth", big), "big-endian");

    // The protocol version pickle: BININT2 1001 (0x03e9) -> 1002.
    let at = find(&[b'M', 0xe9, 0x03]);
    let mut other = full.clone();
    other[at + 1] = 0xea;
    expect_err(load("legacy.pth", other), "legacy protocol version 1002");

    // A storage's element count beyond the file. The storages follow the keys: six element
    // counts and 96 + 60 + 14 + 24 + 3 + 0 bytes (the weight and its row share one).
    let mut huge = full.clone();
    let storages = n - (6 * 8 + 96 + 60 + 14 + 24 + 3);
    huge[storages..storages + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(load("legacy.pth", huge), "past the end of the file");

    // Pickle protocol 1 (text opcodes, no PROTO), in either format: refused as such.
    for name in ["legacy_protocol1.pth", "zip_protocol1.pth"] {
        let e = Checkpoint::open(golden(name)).unwrap_err().to_string();
        assert!(
            e.contains("pickle protocol 0 or 1") && e.contains(name),
            "{e}"
        );
    }

    // A plain pickle of tensors, not torch.save's: named as such.
    expect_err(
        load(
            "p.pth",
            b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.".to_vec(),
        ),
        "not with torch.save's magic number",
    );
}

/// A legacy file written by calling `torch.save` twice on one open file
/// (`tools/golden/make_legacy_twice.py`: two records back to back) reads as `torch.load` reads
/// it: its first record, the rest ignored. So does a legacy file followed by anything else. Only
/// bytes after a complete first record are ignored: the first record cut short anywhere, or a
/// storage whose element count in the file is not the one its tensors give (which would move
/// where the record ends), is still an error.
#[test]
fn legacy_file_saved_twice_reads_its_first_record() {
    let ck = Checkpoint::open(golden("legacy_twice.pth")).unwrap();
    assert_eq!(ck.format(), Format::Pth);
    assert_eq!(ck.keys_in_file_order().collect::<Vec<_>>(), ["w"]);
    assert_eq!(
        ck.tensor_f32("w", Some(&[2, 3])).unwrap().data(),
        &[0., 1., 2., 3., 4., 5.]
    );
    let want = tensors_in_order(&ck);

    // The first record ends where the second's magic-number pickle starts.
    let full = std::fs::read(golden("legacy_twice.pth")).unwrap();
    let magic = &full[..15];
    let end = (1..full.len() - magic.len())
        .find(|&i| full[i..].starts_with(magic))
        .expect("a second record");
    assert!(end < full.len());
    // The first record cut short anywhere is an error; whole, it loads.
    assert_prefixes_fail("twice.pth", full[..end].to_vec(), (0..end).collect());
    // Whole, with any part of the second record after it: the first record's tensors.
    let full = Arc::new(full);
    for len in end..=full.len() {
        let ck = Checkpoint::from_bytes("twice.pth", Arc::new(Prefix(Arc::clone(&full), len)))
            .unwrap_or_else(|e| panic!("{len} bytes: {e}"));
        assert_eq!(tensors_in_order(&ck), want, "{len} bytes");
    }

    // Any legacy file followed by junk, by itself, or by another: read as its first record.
    let zip = tensors_in_order(&Checkpoint::open(golden("legacy_mixed_zip.pth")).unwrap());
    let mixed = std::fs::read(golden("legacy_mixed.pth")).unwrap();
    let mixed_p4 = std::fs::read(golden("legacy_mixed_p4.pth")).unwrap();
    let tutorial = std::fs::read(golden("legacy_tutorial.pth")).unwrap();
    for (first, rest) in [
        (&mixed, &b"\0"[..]),
        (&mixed, b"junk after the record"),
        (&mixed, &mixed[..]),
        (&mixed, &mixed[..20]),
        (&mixed, &tutorial[..]),
        (&mixed_p4, &mixed[..]),
        (&mixed, &mixed_p4[..]),
    ] {
        let bytes = [&first[..], rest].concat();
        let ck = load("twice.pth", bytes).unwrap();
        assert_eq!(tensors_in_order(&ck), zip);
    }

    // A legacy file of 218 MiB or more (here its bytes after the record, a sparse file):
    // a protocol-4 file's first 8 bytes then read as a safetensors header length that fits
    // the file, and it was refused as a malformed safetensors file.
    let big = std::env::temp_dir().join(format!("nibble_big_legacy_{}.pth", std::process::id()));
    std::fs::write(&big, &mixed_p4).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(230_000_000)
        .unwrap();
    let opened = Checkpoint::open(&big);
    std::fs::remove_file(&big).unwrap();
    assert_eq!(tensors_in_order(&opened.unwrap()), zip);

    // A storage's element count lowered in the file: the record would end early and leave
    // bytes that are ignored; the count is checked against the tensors' own description (as
    // torch.load checks it: "storage has wrong byte size"). The last storage of the tutorial
    // checkpoint is an optimizer state's (`exp_avg_sq` of the last bias, 2 f32), which the
    // state dict read does not use.
    let n = tutorial.len();
    let count = n - 8 - 8;
    assert_eq!(tutorial[count..count + 8], 2u64.to_le_bytes());
    for tail in [&b""[..], &tutorial[..]] {
        let mut bad = [&tutorial[..], tail].concat();
        bad[count..count + 8].copy_from_slice(&1u64.to_le_bytes());
        let e = expect_err(load("short_count.pth", bad), "holds 1 elements");
        let msg = e.to_string();
        assert!(
            msg.contains("short_count.pth") && msg.contains("says 2"),
            "{msg}"
        );
        assert!(matches!(e, Error::Malformed { .. }), "{e}");
    }
}

/// A safetensors file's names come in natural order (`layers.2` before `layers.10`): its
/// writers sort them as strings, which would run an `nn.ModuleList` of twelve layers as 0, 1,
/// 10, 11, 2, ... (a probe: 12 chained 8 → 8 layers read silently wrong, 0.16 off PyTorch).
#[test]
fn safetensors_names_come_in_natural_order() {
    let dir = tempdir("natural");
    let p = dir.join("layers.safetensors");
    let one = 1.0f32.to_le_bytes();
    let mut names: Vec<String> = (0..12)
        .flat_map(|i| [format!("layers.{i}.weight"), format!("layers.{i}.bias")])
        .collect();
    names.extend(["head.weight".to_string(), "layers.02.extra".to_string()]);
    let tensors: Vec<(String, DType, Vec<usize>, &[u8])> = names
        .iter()
        .map(|n| (n.clone(), DType::F32, vec![1], &one[..]))
        .collect();
    write_safetensors(&p, &tensors, &BTreeMap::new()).unwrap();
    let ck = Checkpoint::open(&p).unwrap();
    let order: Vec<&str> = ck.keys_in_file_order().collect();
    let mut want = vec!["head.weight".to_string()];
    for i in 0..12 {
        if i == 2 {
            // `02` is the number 2 too, and as written it sorts before `2`.
            want.push("layers.02.extra".to_string());
        }
        want.push(format!("layers.{i}.bias"));
        want.push(format!("layers.{i}.weight"));
    }
    assert_eq!(order, want);
}

/// [`natural_cmp`] is a total order whatever the names (a sort may panic on one that is not):
/// checked over every triple of names mixing numbers, leading zeros and strings, and on the
/// file the fuzzer found (`tests/data/fuzz/natural_order_cycle.safetensors`: names whose
/// segments `2` < `10` by value, `10` < `1a` and `1a` < `2` as strings made the sort panic).
#[test]
fn natural_order_is_total() {
    use nibble_io::checkpoint::natural_cmp;
    use std::cmp::Ordering::*;
    let names = [
        "", "a", "1", "2", "10", "02", "1a", "a.1", "a.2", "a.10", "a.1a", "a.b", "a.", ".a",
        "a..1", "9", "09", "9a", "10.x", "b",
    ];
    for x in names {
        assert_eq!(natural_cmp(x, x), Equal, "{x:?}");
        for y in names {
            assert_eq!(
                natural_cmp(x, y),
                natural_cmp(y, x).reverse(),
                "{x:?} {y:?}"
            );
            for z in names {
                if natural_cmp(x, y) != Greater && natural_cmp(y, z) != Greater {
                    assert_ne!(natural_cmp(x, z), Greater, "{x:?} <= {y:?} <= {z:?}");
                }
            }
        }
    }
    let path = golden("fuzz/natural_order_cycle.safetensors");
    let ck = Checkpoint::open(&path).unwrap();
    let order: Vec<&str> = ck.keys_in_file_order().collect();
    assert!(order
        .windows(2)
        .all(|w| natural_cmp(w[0], w[1]) != std::cmp::Ordering::Greater));
}

/// Whole pickled models (`torch.save(model)`, not a state dict; made by
/// `tools/golden/make_whole_models.py`), which were refused: read as the state dict
/// `model.state_dict()` gives (its keys in its order, the same bytes), nothing in them called.
/// An `nn.Sequential` with a module of the script's own class (a parameter, a persistent and a
/// non-persistent buffer, dtype and device attributes, a load-state-dict hook) and a
/// BatchNorm1d, and the reference's low_precision BigNet (non-persistent 4-bit buffers, hooks).
#[test]
fn whole_pickled_models_read_as_their_state_dicts() {
    let want = Checkpoint::open(golden("whole_models_sd.safetensors")).unwrap();
    for (file, name) in [
        ("whole_seq.pth", "seq"),
        // `{"epoch": 3, "model": model, "note": ...}`: the model under its key.
        ("whole_seq_in_dict.pth", "seq"),
        // The legacy format: module classes as persistent ids `('module', cls, file, source)`.
        ("whole_seq_legacy.pth", "seq"),
        ("whole_bignet_low_d20.pth", "low"),
        // `{"state_dict": seq.state_dict(), "model": <another model>}`: the state dict.
        ("whole_beside_state_dict.pth", "seq"),
    ] {
        let ck = Checkpoint::open(golden(file)).unwrap();
        // The module list goes with the whole model read, never with another one.
        let listed = ck.metadata().contains_key(nibble_io::PICKLED_MODULES_KEY);
        assert_eq!(listed, file != "whole_beside_state_dict.pth", "{file}");
        assert_reads_as(&ck, &want, name, file);
    }
}

/// `ck` holds the keys `want`'s metadata lists under `<name>_keys`, in that order, each with
/// the dtype, shape and bytes of `want`'s `<name>.<key>` (`what` names the case).
fn assert_reads_as(ck: &Checkpoint, want: &Checkpoint, name: &str, what: &str) {
    let keys: Vec<&str> = ck.keys_in_file_order().collect();
    let expected: Vec<&str> = want.metadata()[&format!("{name}_keys")]
        .split(',')
        .collect();
    assert_eq!(keys, expected, "{what}");
    for k in keys {
        let theirs = format!("{name}.{k}");
        assert_eq!(ck.info(k), want.info(&theirs), "{what}: {k}");
        assert_eq!(
            ck.bytes(k).unwrap(),
            want.bytes(&theirs).unwrap(),
            "{what}: {k}"
        );
    }
}

/// Pickles that use what a plain state dict does not (`tools/golden/make_pickle_semantics.py`)
/// read as `torch.load` reads them, keys in order and the same bytes: tensors with the lazy
/// negation bit (read with the opposite sign), a state dict referenced a second time after it
/// was filled (read empty: the file's `model` fell back to the zeros of `model_ema` without a
/// word), whole models saved with pickle protocols 4 and 5 (EMPTY_SET / ADDITEMS were
/// refused), an `nn.Buffer` and a tensor with an attribute of its own
/// (`_rebuild_from_type_v2`, refused).
#[test]
fn pickles_read_as_torch_load_reads_them() {
    let want = Checkpoint::open(golden("pickle_semantics_io.safetensors")).unwrap();
    for stem in [
        "pickle_neg",
        "pickle_memo_twice",
        "whole_p4",
        "whole_p5",
        "whole_nn_buffer",
        "pickle_tensor_attr",
    ] {
        let ck = Checkpoint::open(golden(&format!("{stem}.pth"))).unwrap();
        assert_reads_as(&ck, &want, stem, stem);
    }
    // A state-dict hook (here renaming `fc.` to `renamed.`) would change the keys PyTorch
    // gives, and nibble never runs it: an error naming the module (nibble read `fc.*`).
    let e = match Checkpoint::open(golden("whole_state_dict_hook.pth")) {
        Ok(_) => panic!("a model with a state-dict hook was read"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("state-dict hooks") && e.contains("Hooked"),
        "{e}"
    );
}
