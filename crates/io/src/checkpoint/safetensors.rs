//! The safetensors format: an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON
//! (`{"key": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}`)
//! and the data, offsets being relative to the first byte after the header.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{checked_nbytes, first_overlap, DType, Data, Entry, Format};
use crate::error::{Error, Result};

/// Largest header accepted (the reference implementation's limit too).
const MAX_HEADER: u64 = 100_000_000;
/// Key of the free-form string map in the header.
const METADATA_KEY: &str = "__metadata__";

/// A tensor's description as the header states it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfo<'a> {
    #[serde(borrow)]
    dtype: Cow<'a, str>,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

type Parsed = (BTreeMap<String, Entry>, BTreeMap<String, String>);

/// Streams the top-level header object, validating each tensor as soon as it is read (so a
/// truncated file fails at its first out-of-range tensor) and detecting duplicate keys, which
/// `serde_json` would otherwise silently resolve to the last one. A validation failure is kept
/// in `failure` and the parse aborted.
struct HeaderSeed<'p> {
    path: &'p Path,
    data_start: usize,
    data_len: usize,
    failure: &'p RefCell<Option<Error>>,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = Parsed;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Parsed, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed<'_> {
    type Value = Parsed;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor descriptions")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Parsed, A::Error> {
        let mut entries = BTreeMap::new();
        let mut metadata = None;
        let fail = |e: Error| {
            *self.failure.borrow_mut() = Some(e);
            de::Error::custom("invalid tensor description")
        };
        while let Some(key) = map.next_key::<String>()? {
            if key == METADATA_KEY {
                if metadata.is_some() {
                    return Err(fail(Error::DuplicateKey {
                        path: self.path.to_path_buf(),
                        key,
                    }));
                }
                let kv = map.next_value::<StrMap>()?.0;
                let mut m = BTreeMap::new();
                for (k, v) in kv {
                    if m.contains_key(&k) {
                        return Err(fail(Error::DuplicateKey {
                            path: self.path.to_path_buf(),
                            key: format!("{METADATA_KEY}.{k}"),
                        }));
                    }
                    m.insert(k, v);
                }
                metadata = Some(m);
                continue;
            }
            let info = map
                .next_value::<RawInfo>()
                .map_err(|e| de::Error::custom(format_args!("tensor `{key}`: {e}")))?;
            if entries.contains_key(&key) {
                return Err(fail(Error::DuplicateKey {
                    path: self.path.to_path_buf(),
                    key,
                }));
            }
            let entry =
                validate(self.path, &key, info, self.data_start, self.data_len).map_err(fail)?;
            entries.insert(key, entry);
        }
        Ok((entries, metadata.unwrap_or_default()))
    }
}

/// Checks one tensor's dtype, shape and offsets against the data section.
fn validate(
    path: &Path,
    key: &str,
    info: RawInfo,
    data_start: usize,
    data_len: usize,
) -> Result<Entry> {
    let bad_tensor = |reason: String| Error::BadTensor {
        path: path.to_path_buf(),
        key: key.to_owned(),
        reason,
    };
    let dtype = DType::from_safetensors_name(&info.dtype).ok_or_else(|| Error::UnknownDType {
        path: path.to_path_buf(),
        key: key.to_owned(),
        found: info.dtype.chars().take(64).collect(),
    })?;
    let nbytes = checked_nbytes(&info.shape, dtype.size_of()).ok_or_else(|| {
        bad_tensor(format!(
            "the byte size of shape {:?} × {dtype} overflows",
            info.shape
        ))
    })?;
    let [begin, end] = info.data_offsets;
    if end < begin {
        return Err(bad_tensor(format!(
            "data_offsets [{begin}, {end}] end before they begin"
        )));
    }
    if end > data_len as u64 {
        return Err(bad_tensor(format!(
            "data_offsets [{begin}, {end}] run past the end of the data ({data_len} bytes)"
        )));
    }
    // end <= data_len, so both fit in usize.
    let (begin, end) = (begin as usize, end as usize);
    if end - begin != nbytes {
        return Err(bad_tensor(format!(
            "data_offsets [{begin}, {end}] hold {} bytes, shape {:?} × {dtype} needs {nbytes}",
            end - begin,
            info.shape
        )));
    }
    Ok(Entry {
        dtype,
        shape: info.shape,
        data: Data::Mapped(data_start + begin..data_start + end),
    })
}

/// A JSON object of strings, duplicates kept.
struct StrMap(Vec<(String, String)>);

impl<'de> Deserialize<'de> for StrMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`__metadata__` as a JSON object of strings to strings")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<StrMap, A::Error> {
                let mut items = Vec::new();
                while let Some(kv) = map.next_entry::<String, String>()? {
                    items.push(kv);
                }
                Ok(StrMap(items))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses and validates a safetensors file held in `buf`.
pub(crate) fn read(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let bad = |reason: String| Error::Malformed {
        path: path.to_path_buf(),
        format: Format::Safetensors,
        reason,
    };
    if buf.is_empty() {
        return Err(bad("the file is empty".into()));
    }
    let Some(len_bytes) = buf.first_chunk::<8>() else {
        return Err(bad(format!(
            "the file is {} bytes, shorter than the 8-byte header length",
            buf.len()
        )));
    };
    let n = u64::from_le_bytes(*len_bytes);
    let avail = (buf.len() - 8) as u64;
    if n > MAX_HEADER {
        return Err(bad(format!(
            "header length {n} exceeds the {MAX_HEADER}-byte limit"
        )));
    }
    if n > avail {
        return Err(bad(format!(
            "header length {n} runs past the end of the file ({avail} bytes after the length)"
        )));
    }
    // n <= avail < buf.len(), so it fits in usize.
    let header_end = 8 + n as usize;
    let header = std::str::from_utf8(&buf[8..header_end])
        .map_err(|e| bad(format!("the header is not UTF-8: {e}")))?;
    let failure = RefCell::new(None);
    let seed = HeaderSeed {
        path,
        data_start: header_end,
        data_len: buf.len() - header_end,
        failure: &failure,
    };
    let mut de = serde_json::Deserializer::from_str(header);
    let parsed = seed.deserialize(&mut de).and_then(|p| de.end().map(|()| p));
    let (entries, metadata) = match parsed {
        Ok(p) => p,
        Err(e) => {
            return Err(failure
                .into_inner()
                .unwrap_or_else(|| bad(format!("invalid JSON header: {e}"))))
        }
    };

    let mut ranges: Vec<(Range<usize>, usize)> = Vec::with_capacity(entries.len());
    let keys: Vec<&String> = entries.keys().collect();
    for (i, e) in entries.values().enumerate() {
        if let Data::Mapped(r) = &e.data {
            ranges.push((r.clone(), i));
        }
    }
    if let Some((a, b)) = first_overlap(&mut ranges) {
        return Err(Error::BadTensor {
            path: path.to_path_buf(),
            key: keys[b].clone(),
            reason: format!("its data overlaps that of `{}`", keys[a]),
        });
    }
    Ok((entries, metadata))
}

/// Writes `tensors` (name, dtype, shape, raw little-endian bytes) and `metadata` as a
/// safetensors file.
///
/// The output is deterministic: header keys sorted, `__metadata__` first (omitted if empty),
/// data ordered by decreasing element size then by name, so that every tensor starts at a
/// multiple of its element size from the data start — which itself is 8-byte aligned (the
/// header is padded with spaces) — and f16/f32/f64 arrays can be viewed in place. The file is
/// written to a temporary file in the same directory, synced, then renamed over `path`, so a
/// failure never leaves a partial file behind.
///
/// `path` must be missing or a regular file (which is replaced atomically): if it exists as
/// anything else — a symbolic link (even to a regular file), a directory, a device such as
/// `/dev/null`, a FIFO or a socket — this fails with [`Error::Io`] naming it and what it is,
/// and leaves it untouched, rather than replace it with a regular file.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, DType, Vec<usize>, &[u8])],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let invalid = |key: &str, reason: String| Error::InvalidWrite {
        path: path.to_path_buf(),
        key: key.to_owned(),
        reason,
    };
    let mut names = BTreeSet::new();
    for (key, dtype, shape, bytes) in tensors {
        if key == METADATA_KEY {
            return Err(invalid(key, "the name is reserved for metadata".into()));
        }
        if !names.insert(key.as_str()) {
            return Err(invalid(key, "the name is given twice".into()));
        }
        let need = checked_nbytes(shape, dtype.size_of())
            .ok_or_else(|| invalid(key, format!("the byte size of shape {shape:?} overflows")))?;
        if need != bytes.len() {
            return Err(invalid(
                key,
                format!(
                    "shape {shape:?} × {dtype} needs {need} bytes, {} given",
                    bytes.len()
                ),
            ));
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (ka, da, ..) = &tensors[a];
        let (kb, db, ..) = &tensors[b];
        db.size_of().cmp(&da.size_of()).then_with(|| ka.cmp(kb))
    });
    let mut offsets = BTreeMap::new();
    let mut at = 0usize;
    for &i in &order {
        let (key, _, _, bytes) = &tensors[i];
        let end = at
            .checked_add(bytes.len())
            .ok_or_else(|| invalid(key, "the total size overflows".into()))?;
        offsets.insert(key.as_str(), (i, at, end));
        at = end;
    }

    let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut header = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        header.push_str(&json(METADATA_KEY));
        header.push_str(":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&json(k));
            header.push(':');
            header.push_str(&json(v));
        }
        header.push('}');
        first = false;
    }
    for (key, &(i, begin, end)) in &offsets {
        let (_, dtype, shape, _) = &tensors[i];
        if !first {
            header.push(',');
        }
        first = false;
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{begin},{end}]}}",
            json(key),
            dtype.safetensors_name(),
            dims.join(",")
        ));
    }
    header.push('}');
    while (8 + header.len()) % 8 != 0 {
        header.push(' ');
    }
    // A file nibble's reader (and the safetensors library's) would refuse is not written.
    if header.len() as u64 > MAX_HEADER {
        return Err(invalid(
            METADATA_KEY,
            format!(
                "the header would be {} bytes, beyond the {MAX_HEADER}-byte limit readers \
                 enforce (too many tensors or too much metadata for one file)",
                header.len()
            ),
        ));
    }

    replace_file(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        for &i in &order {
            w.write_all(tensors[i].3)?;
        }
        Ok(())
    })
}

/// Writes `path` through `write` without ever leaving a partial file: into a new temporary
/// file beside it (never opening an existing one, which could be a link to elsewhere), synced,
/// then renamed over `path`; on any failure the temporary file is removed. `path` must be
/// missing or a regular file ([`refuse_non_regular`]), which is then replaced atomically.
pub fn replace_file(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let io = |op: &'static str| {
        let p = path.to_path_buf();
        move |source| Error::Io {
            path: p,
            op,
            source,
        }
    };
    refuse_non_regular(path)?;
    let (tmp, file) = create_temp(path).map_err(io("create (temporary file beside it)"))?;
    let result = (|| {
        let mut w = std::io::BufWriter::new(file);
        write(&mut w).map_err(io("write"))?;
        let file = w
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(io("write"))?;
        file.sync_all().map_err(io("sync"))?;
        // A file replaced keeps its permissions (a 0600 output stays 0600).
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions()).map_err(io("set permissions"))?;
        }
        std::fs::rename(&tmp, path).map_err(io("rename"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An error (naming `path` and what it is) if `path` exists and is not a regular file — a
/// symbolic link of any kind (even to a regular file), a directory, a device, a FIFO or a
/// socket: the rename that ends [`write_safetensors`] would silently replace it (turning
/// `/dev/null` or a link into a regular file). A missing path or a regular file is fine.
pub fn refuse_non_regular(path: &Path) -> Result<()> {
    if path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(Error::Io {
            path: path.to_path_buf(),
            op: "write",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "ends with `/`, which names a directory: give a file's name",
            ),
        });
    }
    // Missing (or not inspectable, e.g. under a regular file or an unreadable directory: the
    // write itself then fails with the operating system's reason): nothing to replace.
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let file_type = meta.file_type();
    if file_type.is_file() {
        return Ok(());
    }
    let what = if file_type.is_symlink() {
        match std::fs::read_link(path) {
            Ok(target) => format!("a symbolic link (to {})", target.display()),
            Err(_) => "a symbolic link".to_owned(),
        }
    } else {
        non_regular_kind(&file_type).to_owned()
    };
    Err(Error::Io {
        path: path.to_path_buf(),
        op: "write",
        source: std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "it exists and is {what}, not a regular file: refusing to replace it; \
                 give a new path or a regular file"
            ),
        ),
    })
}

/// What a file that is neither a regular file nor a symbolic link is, in words.
fn non_regular_kind(file_type: &std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// Creates a new temporary file next to `path` (never opening an existing one, which could be
/// a link to elsewhere) and returns its name and handle.
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let mut last = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
    for _ in 0..16 {
        let tmp = temp_path(path);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// A fresh temporary name next to `path`: `.nibble-<pid>-<n>.tmp`.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Short, whatever the target's name: a name near the file system's 255-byte limit must
    // still get a temporary file beside it.
    path.with_file_name(format!(".nibble-{}-{n}.tmp", std::process::id()))
}
