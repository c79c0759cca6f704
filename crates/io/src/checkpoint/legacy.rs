//! PyTorch's legacy `.pth` format: what `torch.save` wrote before PyTorch 1.6, and still
//! writes with `_use_new_zipfile_serialization=False`. Five pickles back to back, then the
//! storages:
//! 1. the magic number `0x1950a86a20f9469cfc6c`;
//! 2. the protocol version, 1001;
//! 3. the system's description: `{"protocol_version": 1001, "little_endian": True,
//!    "type_sizes": {...}}`;
//! 4. the object (the state dict), whose storages are persistent ids `('storage', type, key,
//!    location, numel, None)`;
//! 5. the list of storage keys, in the order their data follows;
//!
//! then, per key, its element count (8 bytes, little-endian) and its elements' bytes.
//!
//! Bytes after the last storage are ignored, as `torch.load` ignores them: calling
//! `torch.save` twice on one open file writes two such records back to back, and `torch.load`
//! reads the first. Only a complete first record is read so: its five pickles whole, every
//! storage it lists present, each with the element count its tensors' persistent ids give
//! (`torch.load` checks the same: "storage has wrong byte size"), so that where the record ends
//! is known and a file cut short or a count gone wrong is still an error.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use super::pickle::{self, Value};
use super::pth::{self, malformed};
use crate::error::{Error, Result};

/// `torch.serialization.MAGIC_NUMBER` as pickled after PROTO (and a FRAME, in protocol 4):
/// LONG1 of its 10 little-endian bytes, then STOP.
const MAGIC_LONG1: [u8; 13] = [
    0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
];

/// `torch.serialization.PROTOCOL_VERSION`.
const PROTOCOL_VERSION: i64 = 1001;

/// Whether `buf` starts with the legacy format's first pickle, the magic number.
pub(crate) fn is_legacy(buf: &[u8]) -> bool {
    magic_len(buf).is_some()
}

/// Whether `buf` is all of it the start of a legacy file's magic-number pickle, cut short
/// (PROTO, then a prefix of LONG1's magic bytes): a truncated legacy `.pth`.
pub(crate) fn is_truncated_magic(buf: &[u8]) -> bool {
    match buf {
        [0x80, _, rest @ ..] => MAGIC_LONG1.starts_with(rest),
        [0x80] => true,
        _ => false,
    }
}

/// Whether `buf` starts with the magic number pickled in protocol 0 or 1 (a text `LONG`): a
/// legacy file of a protocol nibble does not read, nor does `torch.load(weights_only=True)`.
pub(crate) fn is_legacy_text_protocol(buf: &[u8]) -> bool {
    buf.starts_with(b"L119547037146038801333356L\n")
}

/// The length of the magic-number pickle at the start of `buf`: PROTO, an optional protocol-4
/// FRAME, LONG1 of the 10 magic bytes, STOP.
fn magic_len(buf: &[u8]) -> Option<usize> {
    let mut pos = match buf {
        [0x80, _, ..] => 2,
        _ => return None,
    };
    if buf.get(pos) == Some(&0x95) {
        pos += 9;
    }
    buf.get(pos..)?
        .starts_with(&MAGIC_LONG1)
        .then_some(pos + MAGIC_LONG1.len())
}

/// Parses and validates a legacy `.pth` file held in `buf`: its state dict's tensors (in the
/// dict's order) and that order. Only the first record is read; bytes after its last storage
/// are ignored, as `torch.load` ignores them (see the module's documentation).
pub(crate) fn read(path: &Path, buf: &[u8]) -> Result<pth::PthRead> {
    let bad = |reason: String| malformed(path, reason);
    let mut pos = magic_len(buf)
        .ok_or_else(|| bad("not a legacy torch.save file: no magic number at its start".into()))?;
    // The four pickles after the magic number, each read where the one before ended.
    let mut next = |what: &str| -> Result<Value> {
        let rest = buf.get(pos..).unwrap_or(&[]);
        let (value, len) = pickle::load_prefix(rest).map_err(|e| Error::Pickle {
            path: path.to_path_buf(),
            entry: format!("{what} (the legacy format's pickle at byte {pos})"),
            offset: pos + e.offset,
            reason: e.reason,
        })?;
        pos += len;
        Ok(value)
    };
    match next("protocol version")? {
        Value::Int(PROTOCOL_VERSION) => {}
        other => {
            return Err(bad(format!(
                "legacy protocol version {}, expected {PROTOCOL_VERSION}",
                describe(&other)
            )))
        }
    }
    let Value::Dict(info) = next("system info")? else {
        return Err(bad("the legacy format's system info is not a dict".into()));
    };
    let little_endian = info.items.iter().find_map(|(k, v)| match (k, v) {
        (Value::Str(k), Value::Bool(b)) if &**k == "little_endian" => Some(*b),
        _ => None,
    });
    if little_endian != Some(true) {
        return Err(bad(
            "written on a big-endian machine (system info `little_endian` is not True); only \
             little-endian checkpoints are supported"
                .into(),
        ));
    }
    let root = next("object")?;
    let Value::List(keys) = next("storage keys")? else {
        return Err(bad("the legacy format's storage keys are not a list".into()));
    };

    // The storages, in the keys' order: an element count, then the bytes.
    let described = described_storages(&root);
    let mut storages: HashMap<String, Range<usize>> = HashMap::new();
    for key in &keys.items {
        let Value::Str(key) = key else {
            return Err(bad(format!(
                "a storage key is a {}, not a string",
                key.kind()
            )));
        };
        let key: &str = key;
        let count_bytes = buf
            .get(pos..pos + 8)
            .ok_or_else(|| bad(format!("the file ends before storage `{key}` (byte {pos})")))?;
        let count = u64::from_le_bytes(count_bytes.try_into().expect("8 bytes"));
        pos += 8;
        let &(esize, numel) = described.get(key).ok_or_else(|| {
            bad(format!(
                "storage `{key}` is listed but no tensor of the state dict uses it"
            ))
        })?;
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(esize))
            .filter(|&len| len <= buf.len() - pos)
            .ok_or_else(|| {
                bad(format!(
                    "storage `{key}` claims {count} elements of {esize} bytes at byte {pos}, \
                     past the end of the file ({} bytes)",
                    buf.len()
                ))
            })?;
        // The count read must be the one its tensors give: a count gone wrong would put the
        // storages after it, and the end of the record, at the wrong bytes.
        if count != numel {
            return Err(bad(format!(
                "storage `{key}` holds {count} elements at byte {}, its tensors' description \
                 says {numel} (a corrupt file?)",
                pos - 8
            )));
        }
        if storages.insert(key.to_owned(), pos..pos + len).is_some() {
            return Err(bad(format!("storage `{key}` is listed twice")));
        }
        pos += len;
    }
    // The record ends at `pos`. What follows (a second `torch.save` into the same file, or
    // anything else) is ignored, as `torch.load` ignores it; this reader has no channel for
    // notes, so it is passed over without a word.
    pth::entries_of(path, &root, |key| match storages.get(key) {
        Some(range) => Ok((key.to_owned(), range.clone())),
        None => Err(format!(
            "its storage `{key}` is not among the file's storages"
        )),
    })
}

/// The element size and element count of each storage key the pickled object's tensors use,
/// as their persistent ids describe the storage.
fn described_storages(root: &Value) -> HashMap<String, (usize, u64)> {
    let mut sizes = HashMap::new();
    let mut stack = vec![root];
    // Each container once (the memo can put one in many places: walking every path could
    // take exponential time).
    let mut seen: std::collections::HashSet<*const ()> = std::collections::HashSet::new();
    let mut first_visit = |p: *const ()| seen.insert(p);
    while let Some(v) = stack.pop() {
        match v {
            Value::Tensor(t) => {
                sizes.insert(
                    t.storage.key.clone(),
                    (t.storage.dtype.size_of(), t.storage.numel),
                );
            }
            Value::Dict(d) if first_visit(std::rc::Rc::as_ptr(d).cast()) => {
                stack.extend(d.items.iter().map(|(_, v)| v))
            }
            Value::List(l) | Value::Tuple(l) if first_visit(std::rc::Rc::as_ptr(l).cast()) => {
                stack.extend(l.items.iter())
            }
            // A whole model's modules (`torch.save(model)`).
            Value::Module(m) if first_visit(std::rc::Rc::as_ptr(m).cast()) => {
                if let Some(state) = &m.state {
                    stack.extend(state.items.iter().map(|(_, v)| v));
                }
            }
            _ => {}
        }
    }
    sizes
}

/// A short description of a pickled value for messages: an integer's value, else its kind.
fn describe(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        other => other.kind(),
    }
}
