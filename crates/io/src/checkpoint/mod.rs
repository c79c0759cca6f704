//! Checkpoint files: safetensors and PyTorch `.pth` (the zip archives `torch.save` writes, and
//! its legacy format of PyTorch before 1.6).
//!
//! [`Checkpoint::open`] memory-maps a file, detects its format from its content and validates
//! every offset, length and name before handing out a byte, so a hostile file yields an
//! [`Error`] — never a panic, an abort or an allocation larger than the file. Tensor bytes are
//! borrowed from the map (zero copy); only `.pth` tensors with non-row-major strides are copied,
//! lazily, on first access.
//!
//! ```no_run
//! use nibble_io::checkpoint::{Checkpoint, DType};
//! let ck = Checkpoint::open("tests/data/bignet_d128.pth")?;
//! for key in ck.keys() {
//!     let (dtype, shape) = ck.info(key).unwrap();
//!     println!("{key}: {dtype} {shape:?}");
//! }
//! let w = ck.tensor_f32("model.0.model.0.weight", Some(&[128, 128]))?;
//! # Ok::<(), nibble_io::Error>(())
//! ```

mod legacy;
mod pickle;
mod pth;
mod safetensors;
mod zip;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use half::{bf16, f16};
use nibble_tensor::{HalfTensor, Tensor};

use crate::error::{Error, Result};

pub use self::pth::PICKLED_MODULES_KEY;
pub use self::safetensors::{refuse_non_regular, replace_file, write_safetensors};

/// The shared, immutable bytes a [`Checkpoint`] reads from: a memory map, or any buffer.
pub type Backing = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// An element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of an f32).
    BF16,
    /// IEEE binary64.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Unsigned 16-bit integer (NumPy's `uint16`).
    U16,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// Boolean, one byte per element.
    Bool,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F64,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size_of(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Lower-case name, as in PyTorch (`"f32"`, `"bf16"`, `"bool"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::Bool => "bool",
        }
    }

    /// The name safetensors headers use (`"F32"`, `"BF16"`, `"BOOL"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::U16 => "U16",
            DType::U32 => "U32",
            DType::U64 => "U64",
            DType::Bool => "BOOL",
        }
    }

    /// The dtype a safetensors header name stands for, if it is one this crate knows.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A checkpoint file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// Hugging Face safetensors: a JSON header and raw little-endian data.
    Safetensors,
    /// PyTorch's `torch.save` zip archive (a pickled state dict plus one raw storage per tensor),
    /// or its legacy format (pickles back to back, then the storages).
    Pth,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Safetensors => "safetensors",
            Format::Pth => "PyTorch .pth",
        })
    }
}

/// A zero-copy handle on one tensor's bytes: the shared backing (usually the memory map) and a
/// range of it. Cheap to clone, `Send + Sync`, and it keeps the map alive on its own, so it can
/// outlive the [`Checkpoint`] (e.g. as packed quantized weights).
#[derive(Clone)]
pub struct MappedBytes {
    backing: Backing,
    range: Range<usize>,
}

impl MappedBytes {
    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// True when the tensor has no bytes.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl AsRef<[u8]> for MappedBytes {
    fn as_ref(&self) -> &[u8] {
        // The range was checked against the backing when the handle was made, and the backing
        // is immutable; `get` keeps this panic-free regardless.
        (*self.backing)
            .as_ref()
            .get(self.range.clone())
            .unwrap_or(&[])
    }
}

impl std::ops::Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_ref()
    }
}

impl fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MappedBytes({:?})", self.range)
    }
}

/// Where a tensor's bytes are.
pub(crate) enum Data {
    /// A contiguous range of the backing.
    Mapped(Range<usize>),
    /// A strided view of a storage (a `.pth` tensor that is not row-major contiguous), copied
    /// into an owned buffer on first access. Offsets and extents were validated at open.
    Strided {
        /// Byte range of the whole storage in the backing.
        storage: Range<usize>,
        /// Element offset of the first element in the storage.
        offset: usize,
        /// Strides in elements, one per dimension of the tensor's shape.
        stride: Vec<usize>,
        /// Whether the copy's values are the storage's negated (PyTorch's negation bit; such a
        /// tensor is copied even where it is contiguous).
        negated: bool,
        /// The contiguous copy, once made.
        copy: OnceLock<Backing>,
    },
}

/// One tensor's description.
pub(crate) struct Entry {
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Data,
}

/// A checkpoint opened for reading: its tensors' names, dtypes and shapes, and zero-copy access
/// to their bytes. Safe to share between threads.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    backing: Backing,
    entries: BTreeMap<String, Entry>,
    /// The keys in the file's order (see [`Checkpoint::keys_in_file_order`]).
    file_order: Vec<String>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// The fewest bytes a checkpoint can have: a safetensors file's 8-byte header length and its
/// JSON header `{}` (a legacy torch.save file's magic number alone takes 14, a zip archive's
/// end record 22).
const SHORTEST_CHECKPOINT: usize = 10;

/// What a file that is not a regular file is, for messages.
fn describe_kind(kind: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_block_device() || kind.is_char_device() {
            return "a device";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

impl Checkpoint {
    /// Opens and validates a checkpoint, memory-mapping the file. The format is detected from
    /// the content (zip magic `PK\x03\x04` for `.pth`, a JSON header for safetensors), never
    /// from the extension.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let io = |op| {
            move |source| Error::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        // The kind of file first: opening a FIFO for reading would block until a writer
        // came, and a directory maps as an obscure OS error.
        let kind = std::fs::metadata(path).map_err(io("open"))?.file_type();
        if !kind.is_file() {
            return Err(Error::UnknownFormat {
                path: path.to_path_buf(),
                reason: format!("not a regular file (it is {})", describe_kind(kind)),
            });
        }
        let file = std::fs::File::open(path).map_err(io("open"))?;
        let len = file.metadata().map_err(io("stat"))?.len();
        let backing: Backing = if len == 0 {
            // Mapping an empty file fails on some platforms; an empty buffer reports the
            // problem the same way on all of them.
            Arc::new(Vec::<u8>::new())
        } else {
            // SAFETY: the map is read-only and only ever read through bounds-checked slices.
            // As with every file map, another process truncating or rewriting the file while
            // it is mapped is outside what we can guard against (checkpoints are not modified
            // in place: `write_safetensors` replaces files by rename).
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io("map"))?;
            Arc::new(map)
        };
        Checkpoint::from_bytes(&path.to_string_lossy(), backing).map(|ck| Checkpoint {
            path: path.to_path_buf(),
            ..ck
        })
    }

    /// Reads a checkpoint held in memory (or any shared buffer). `name` is used as the path in
    /// messages. This is what [`Checkpoint::open`] does after mapping the file.
    pub fn from_bytes(name: &str, bytes: Backing) -> Result<Checkpoint> {
        let path = PathBuf::from(name);
        let buf: &[u8] = (*bytes).as_ref();
        if buf.is_empty() {
            return Err(Error::UnknownFormat {
                path,
                reason: "the file is empty (0 bytes)".into(),
            });
        }
        let short = buf.len() < SHORTEST_CHECKPOINT && !buf.starts_with(ZIP_MAGIC);
        if short && buf[0] == 0x80 && !legacy::is_truncated_magic(buf) {
            return Err(not_torch_save(path));
        }
        if short || legacy::is_truncated_magic(buf) {
            // Shorter than any format's header, or a legacy file's magic number cut short: a
            // truncated file (it was read as a safetensors header, whose "length" was then the
            // first bytes of a .pth).
            return Err(Error::UnknownFormat {
                path,
                reason: format!(
                    "the file is {} bytes, too short for a zip archive, a legacy torch.save \
                     file or a safetensors header (truncated?); its bytes {:02x?}",
                    buf.len(),
                    &buf[..buf.len().min(16)]
                ),
            });
        }
        // A legacy file is told by its magic number before a safetensors header is
        // considered: a protocol-4 legacy file's first 8 bytes read as a header length of
        // 227,869,824, which fits a legacy file of 218 MiB or more. (No safetensors file
        // starts so: a length with those bytes exceeds the format's 100 MB header limit.)
        let (format, entries, file_order, metadata) = if buf.starts_with(ZIP_MAGIC) {
            let (entries, order, metadata) = pth::read(&path, buf)?;
            (Format::Pth, entries, order, metadata)
        } else if legacy::is_legacy(buf) {
            let (entries, order, metadata) = legacy::read(&path, buf)?;
            (Format::Pth, entries, order, metadata)
        } else if looks_like_safetensors(buf) {
            let (entries, metadata) = safetensors::read(&path, buf)?;
            let mut order: Vec<String> = entries.keys().cloned().collect();
            order.sort_by(|a, b| natural_cmp(a, b));
            (Format::Safetensors, entries, order, metadata)
        } else if legacy::is_legacy_text_protocol(buf) {
            return Err(Error::UnknownFormat {
                path,
                reason: "the legacy torch.save format in pickle protocol 0 or 1, which \
                         torch.load(weights_only=True) refuses as well; re-save with torch.save's \
                         default protocol"
                    .into(),
            });
        } else if buf.first() == Some(&0x80) {
            return Err(not_torch_save(path));
        } else {
            return Err(Error::UnknownFormat {
                path,
                reason: format!(
                    "neither a zip archive (PK\\x03\\x04) nor a safetensors header (8-byte \
                     length then `{{`); first bytes {:02x?}",
                    &buf[..buf.len().min(9)]
                ),
            });
        };
        Ok(Checkpoint {
            path,
            format,
            backing: bytes,
            entries,
            file_order,
            metadata,
        })
    }

    /// The file's path (or the name given to [`Checkpoint::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The detected format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// This checkpoint with `prefix` removed from every key, where every key starts with it (a
    /// wrapper module's path: DataParallel's `module.`, `torch.compile`'s `_orig_mod.`); else
    /// `Err` with the checkpoint unchanged. The tensors are the same (no copy).
    ///
    /// ```
    /// # use nibble_io::Checkpoint;
    /// # use std::sync::Arc;
    /// # let bytes = {
    /// #     let header = br#"{"module.w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    /// #     let mut b = (header.len() as u64).to_le_bytes().to_vec();
    /// #     b.extend_from_slice(header);
    /// #     b.extend_from_slice(&1.5f32.to_le_bytes());
    /// #     b
    /// # };
    /// let file = Checkpoint::from_bytes("wrapped.safetensors", Arc::new(bytes))?;
    /// let file = file.without_prefix("module.").ok().unwrap();
    /// assert_eq!(file.keys().collect::<Vec<_>>(), ["w"]);
    /// # Ok::<(), nibble_io::Error>(())
    /// ```
    pub fn without_prefix(self, prefix: &str) -> std::result::Result<Checkpoint, Checkpoint> {
        if prefix.is_empty() || !self.entries.keys().all(|k| k.starts_with(prefix)) {
            return Err(self);
        }
        let entries = self
            .entries
            .into_iter()
            .map(|(k, e)| (k[prefix.len()..].to_string(), e))
            .collect();
        let file_order = self
            .file_order
            .iter()
            .map(|k| k[prefix.len()..].to_string())
            .collect();
        // The metadata that names tensors by key (a quantized weight's `[out, in]`) follows
        // its tensor.
        let shape_of = crate::frozen::shape_metadata_key("");
        let metadata = self
            .metadata
            .into_iter()
            .map(|(k, v)| {
                match k
                    .strip_prefix(shape_of.as_str())
                    .and_then(|t| t.strip_prefix(prefix))
                {
                    Some(tensor) => (crate::frozen::shape_metadata_key(tensor), v),
                    None => (k, v),
                }
            })
            .collect();
        Ok(Checkpoint {
            entries,
            file_order,
            metadata,
            ..self
        })
    }

    /// This checkpoint without the tensors whose keys `drop` names (a module the model keeps
    /// that is no layer, such as a loss's class weights); the rest read as before.
    pub fn without_keys(mut self, drop: impl Fn(&str) -> bool) -> Checkpoint {
        self.entries.retain(|k, _| !drop(k));
        self.file_order.retain(|k| !drop(k));
        self
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Tensor names in the order the file holds them: a `.pth` state dict's own order (the
    /// order the model registered its parameters, which is how `nn.Module.state_dict()` lists
    /// them). A safetensors file's writers sort its names as strings, which puts `layers.10`
    /// before `layers.2`; its names come in natural order instead ([`natural_cmp`]: numeric
    /// path segments compared as numbers), the order an `nn.Sequential` or `nn.ModuleList`
    /// registered them.
    pub fn keys_in_file_order(&self) -> impl Iterator<Item = &str> {
        self.file_order.iter().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when a tensor named `key` exists.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// A tensor's dtype and shape, or `None` if there is no such tensor.
    pub fn info(&self, key: &str) -> Option<(DType, &[usize])> {
        self.entries.get(key).map(|e| (e.dtype, e.shape.as_slice()))
    }

    /// The safetensors `__metadata__` map (empty for `.pth`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// This checkpoint with metadata entry `key` set to `value` (or removed, for `None`), for a
    /// reader that rewrites what the file records (e.g. paths under a wrapper it took off).
    pub fn with_metadata(mut self, key: &str, value: Option<String>) -> Self {
        match value {
            Some(v) => self.metadata.insert(key.to_string(), v),
            None => self.metadata.remove(key),
        };
        self
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.entries.get(key).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: key.to_owned(),
        })
    }

    /// The backing and range holding `key`'s bytes (making the contiguous copy of a strided
    /// `.pth` tensor if needed).
    fn locate(&self, key: &str) -> Result<(&Backing, Range<usize>)> {
        let entry = self.entry(key)?;
        match &entry.data {
            Data::Mapped(range) => Ok((&self.backing, range.clone())),
            Data::Strided { copy, .. } => {
                let buf = match copy.get() {
                    Some(buf) => buf,
                    None => {
                        let bytes = self.gather(key, entry)?;
                        copy.get_or_init(|| Arc::new(bytes))
                    }
                };
                let len = (**buf).as_ref().len();
                Ok((buf, 0..len))
            }
        }
    }

    /// The contiguous row-major copy of a strided `.pth` entry's view (empty for a mapped
    /// entry, which is never gathered). A broadcast view (a stride of 0, as `torch.save` writes
    /// an `expand`ed tensor) can hold far more elements than its storage: where its copy is
    /// larger than the storage, it must fit in this machine's memory
    /// ([`nibble_tensor::machine::fits`]) and be allocated, else an [`Error::BadTensor`]
    /// naming the key, the view and the memory it needs (never an abort).
    fn gather(&self, key: &str, entry: &Entry) -> Result<Vec<u8>> {
        let Data::Strided {
            storage,
            offset,
            stride,
            negated,
            ..
        } = &entry.data
        else {
            return Ok(Vec::new());
        };
        let esize = entry.dtype.size_of();
        let bad = |reason: String| Error::BadTensor {
            path: self.path.clone(),
            key: key.to_owned(),
            reason,
        };
        let nbytes = checked_nbytes(&entry.shape, esize).ok_or_else(|| {
            bad(format!(
                "the byte size of shape {:?} overflows",
                entry.shape
            ))
        })?;
        // A broadcast view (stride 0) holds more elements than its storage.
        let broadcast = nbytes > storage.len();
        let kind = if broadcast {
            "a broadcast"
        } else {
            "a strided"
        };
        let view = || {
            format!(
                "{kind} view of shape {:?} (strides {stride:?}) over a storage of {} bytes",
                entry.shape,
                storage.len()
            )
        };
        if broadcast {
            if let Err((needed, total)) = nibble_tensor::machine::fits(nbytes as u128) {
                return Err(bad(format!(
                    "{} needs {needed:.1} GiB as a contiguous tensor, more than this machine's \
                     {total:.1} GiB",
                    view()
                )));
            }
        }
        let src = (*self.backing).as_ref().get(storage.clone()).unwrap_or(&[]);
        let mut copy = pth::gather(src, esize, *offset, &entry.shape, stride).ok_or_else(|| {
            bad(format!(
                "{}: its contiguous copy of {nbytes} bytes could not be allocated",
                view()
            ))
        })?;
        if *negated {
            pth::negate(&mut copy, entry.dtype).map_err(bad)?;
        }
        Ok(copy)
    }

    /// The number of bytes [`bytes`](Checkpoint::bytes) gives for `key` (its elements times
    /// their size), without copying a strided `.pth` tensor. An error for a missing key or a
    /// size that overflows.
    pub fn byte_len(&self, key: &str) -> Result<usize> {
        let entry = self.entry(key)?;
        checked_nbytes(&entry.shape, entry.dtype.size_of()).ok_or_else(|| Error::BadTensor {
            path: self.path.clone(),
            key: key.to_owned(),
            reason: format!("the byte size of shape {:?} overflows", entry.shape),
        })
    }

    /// A tensor's raw bytes as [`bytes`](Checkpoint::bytes) gives them, but a strided `.pth`
    /// tensor's contiguous copy is made for this call alone unless one is already kept: the
    /// readers that convert the bytes into a tensor of their own ([`tensor_f32`](Checkpoint::tensor_f32),
    /// [`half`](Checkpoint::half)) would otherwise keep a copy of every strided tensor they read
    /// for as long as the checkpoint is open (a file of 1,000 transposed views of one 4 MB
    /// storage held 4 GB).
    fn transient_bytes(&self, key: &str) -> Result<std::borrow::Cow<'_, [u8]>> {
        let entry = self.entry(key)?;
        if let Data::Strided { copy, .. } = &entry.data {
            if copy.get().is_none() {
                return Ok(std::borrow::Cow::Owned(self.gather(key, entry)?));
            }
        }
        self.bytes(key).map(std::borrow::Cow::Borrowed)
    }

    /// A tensor's raw little-endian bytes, row-major and contiguous. Borrowed from the map
    /// except for strided `.pth` tensors, which are copied once, on first access.
    pub fn bytes(&self, key: &str) -> Result<&[u8]> {
        let (backing, range) = self.locate(key)?;
        (**backing)
            .as_ref()
            .get(range)
            .ok_or_else(|| Error::BadTensor {
                path: self.path.clone(),
                key: key.to_owned(),
                reason: "data range outside the file".into(),
            })
    }

    /// A zero-copy, reference-counted handle on a tensor's bytes (see [`MappedBytes`]).
    pub fn shared_bytes(&self, key: &str) -> Result<MappedBytes> {
        let (backing, range) = self.locate(key)?;
        Ok(MappedBytes {
            backing: Arc::clone(backing),
            range,
        })
    }

    fn check_shape(&self, key: &str, entry: &Entry, expected: Option<&[usize]>) -> Result<()> {
        match expected {
            Some(shape) if shape != entry.shape.as_slice() => Err(Error::Shape {
                path: self.path.clone(),
                key: key.to_owned(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Checks that a tensor's data holds exactly its shape's elements of `elem` bytes (the
    /// readers guarantee it; this keeps the element-wise decoders below from ever indexing
    /// past the data).
    fn check_data_len(&self, key: &str, entry: &Entry, elem: usize, found: usize) -> Result<()> {
        if checked_nbytes(&entry.shape, elem) == Some(found) {
            return Ok(());
        }
        Err(Error::BadTensor {
            path: self.path.clone(),
            key: key.to_owned(),
            reason: format!(
                "{found} bytes of data for shape {:?} of {:?}",
                entry.shape, entry.dtype
            ),
        })
    }

    /// A tensor as f32: F32 as stored, F16 and BF16 widened (exactly), F64 rounded to nearest
    /// (as PyTorch's `load_state_dict` copies a double tensor into an f32 parameter). Any other
    /// dtype is an [`Error::DType`]; if `expected_shape` is given and differs, an
    /// [`Error::Shape`]; a finite F64 value beyond f32's range (which would become infinite)
    /// an [`Error::Data`] naming the element's index and value. Values already NaN or
    /// infinite in the file are returned as they are.
    pub fn tensor_f32(&self, key: &str, expected_shape: Option<&[usize]>) -> Result<Tensor> {
        let entry = self.entry(key)?;
        self.check_shape(key, entry, expected_shape)?;
        let elem = match entry.dtype {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 => 8,
            found => {
                return Err(Error::DType {
                    path: self.path.clone(),
                    key: key.to_owned(),
                    expected: "f32, f16, bf16 or f64".into(),
                    found,
                })
            }
        };
        let b = self.transient_bytes(key)?;
        let b: &[u8] = &b;
        self.check_data_len(key, entry, elem, b.len())?;
        // Widened straight into the tensor's own (huge-page) buffer: no intermediate Vec.
        let t = match entry.dtype {
            DType::F32 => Tensor::from_fn(&entry.shape, |i| {
                f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            }),
            DType::F16 => Tensor::from_fn(&entry.shape, |i| {
                f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
            }),
            DType::F64 => Tensor::from_fn(&entry.shape, |i| {
                let bytes: [u8; 8] = std::array::from_fn(|j| b[8 * i + j]);
                f64::from_le_bytes(bytes) as f32
            }),
            _ => Tensor::from_fn(&entry.shape, |i| {
                bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
            }),
        };
        let t = t.map_err(|source| Error::Tensor {
            path: self.path.clone(),
            key: key.to_owned(),
            source,
        })?;
        if entry.dtype == DType::F64 {
            let wide = |i: usize| f64::from_le_bytes(std::array::from_fn(|j| b[8 * i + j]));
            let narrowed = t.data().iter().enumerate().find_map(|(i, v)| {
                let w = wide(i);
                (v.is_infinite() && w.is_finite()).then_some((i, w))
            });
            if let Some((index, value)) = narrowed {
                let max = f32::MAX.to_string();
                return Err(self.narrowing_error(key, &entry.shape, index, value, "f32", &max));
            }
        }
        Ok(t)
    }

    /// The [`Error::Data`] of a finite `value` (element `index` of tensor `key`, of `shape`)
    /// that narrowing to `to` (largest finite value `max`) would make infinite; the element's
    /// row and column are named too for a matrix.
    fn narrowing_error(
        &self,
        key: &str,
        shape: &[usize],
        index: usize,
        value: f64,
        to: &str,
        max: &str,
    ) -> Error {
        let at = match shape {
            &[_, cols] if cols > 0 => {
                format!(" at (row {}, column {})", index / cols, index % cols)
            }
            _ => String::new(),
        };
        Error::Data {
            path: self.path.clone(),
            key: key.to_owned(),
            index: Some(index),
            what: format!(
                "expected a value that stays finite as {to} (within ±{max}), found {value:e}{at}, which would become infinite"
            ),
        }
    }

    /// A tensor as f16: F16 as stored, F32 rounded to nearest (ties to even, as PyTorch's
    /// `.half()`). Any other dtype is an [`Error::DType`]; a shape other than `expected_shape`
    /// (if given) an [`Error::Shape`]; a finite F32 value beyond f16's range (which would
    /// become infinite) an [`Error::Data`] naming the element's index and value. Values
    /// already NaN or infinite in the file are returned as they are.
    pub fn half(&self, key: &str, expected_shape: Option<&[usize]>) -> Result<HalfTensor> {
        let entry = self.entry(key)?;
        self.check_shape(key, entry, expected_shape)?;
        let elem = match entry.dtype {
            DType::F16 => 2,
            DType::F32 => 4,
            found => {
                return Err(Error::DType {
                    path: self.path.clone(),
                    key: key.to_owned(),
                    expected: "f16 or f32".into(),
                    found,
                })
            }
        };
        let b = self.transient_bytes(key)?;
        let b: &[u8] = &b;
        self.check_data_len(key, entry, elem, b.len())?;
        let t = if elem == 2 {
            HalfTensor::from_fn(&entry.shape, |i| {
                f16::from_le_bytes([b[2 * i], b[2 * i + 1]])
            })
        } else {
            HalfTensor::from_fn(&entry.shape, |i| {
                f16::from_f32(f32::from_le_bytes([
                    b[4 * i],
                    b[4 * i + 1],
                    b[4 * i + 2],
                    b[4 * i + 3],
                ]))
            })
        };
        let t = t.map_err(|source| Error::Tensor {
            path: self.path.clone(),
            key: key.to_owned(),
            source,
        })?;
        if elem == 4 {
            let wide =
                |i: usize| f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
            let narrowed = t.data().iter().enumerate().find_map(|(i, h)| {
                let w = wide(i);
                (h.is_infinite() && w.is_finite()).then_some((i, w))
            });
            if let Some((index, value)) = narrowed {
                let max = f16::MAX.to_string();
                return Err(self.narrowing_error(
                    key,
                    &entry.shape,
                    index,
                    value as f64,
                    "f16",
                    &max,
                ));
            }
        }
        Ok(t)
    }
}

/// Compares two tensor names segment by segment (split at `.`), segments of digits alone by
/// their numbers and any other segment as a string, a number before any other segment:
/// `layers.2.weight` before `layers.10.weight`, `fc1.weight` before `fc2.weight` before
/// `head.weight`. A total order, whatever the names (a sort may rely on it).
///
/// ```
/// use nibble_io::checkpoint::natural_cmp;
/// let mut keys = ["layers.10.weight", "layers.2.weight", "head.bias", "layers.2.bias"];
/// keys.sort_by(|a, b| natural_cmp(a, b));
/// assert_eq!(keys, ["head.bias", "layers.2.bias", "layers.2.weight", "layers.10.weight"]);
/// ```
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let number = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    let mut left = a.split('.');
    let mut right = b.split('.');
    loop {
        let order = match (left.next(), right.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => match (number(x), number(y)) {
                (true, true) => {
                    // By value (any length: no parse), then as written (`01` before `1`).
                    let (tx, ty) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                    tx.len().cmp(&ty.len()).then(tx.cmp(ty)).then(x.cmp(y))
                }
                // Numbers first: comparing a number with a string as strings would make the
                // order cyclic (`2` < `10` by value, `10` < `1a` and `1a` < `2` as strings).
                (true, false) => std::cmp::Ordering::Less,
                (false, true) => std::cmp::Ordering::Greater,
                (false, false) => x.cmp(y),
            },
        };
        if order.is_ne() {
            return order;
        }
    }
}

/// The error for a file that starts with a pickle but not with torch.save's magic number.
fn not_torch_save(path: PathBuf) -> Error {
    Error::UnknownFormat {
        path,
        reason: "starts with a pickle but not with torch.save's magic number (a `pickle.dump` \
                 of tensors?): save the state dict with torch.save"
            .into(),
    }
}

/// True when `buf` could be a safetensors file: too short to tell, a `{` (or JSON whitespace)
/// after the 8-byte length, or a length that fits the file.
fn looks_like_safetensors(buf: &[u8]) -> bool {
    match (buf.first_chunk::<8>(), buf.get(8)) {
        (None, _) | (Some(_), None) => true,
        (Some(_), Some(b'{' | b' ' | b'\t' | b'\n' | b'\r')) => true,
        (Some(n), Some(_)) => u64::from_le_bytes(*n) <= (buf.len() - 8) as u64,
    }
}

/// Product of `shape` times `elem` bytes, or `None` on overflow. A shape with a dimension of 0
/// holds no elements and takes 0 bytes whatever its other dimensions (PyTorch saves and loads
/// `torch.empty(2**62, 0, 3)`): multiplying left to right would call `[2^62, 0, 3]` an overflow
/// before it reached the 0.
pub(crate) fn checked_nbytes(shape: &[usize], elem: usize) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(elem, |acc, &d| acc.checked_mul(d))
}

/// True when `[a, b)` ranges (sorted by start) are pairwise disjoint; returns the first
/// overlapping pair's indices otherwise. Empty ranges never overlap anything.
pub(crate) fn first_overlap(ranges: &mut [(Range<usize>, usize)]) -> Option<(usize, usize)> {
    ranges.sort_by_key(|(r, _)| (r.start, r.end));
    let mut prev: Option<&(Range<usize>, usize)> = None;
    for cur in ranges.iter().filter(|(r, _)| !r.is_empty()) {
        if let Some(p) = prev {
            if cur.0.start < p.0.end {
                return Some((p.1, cur.1));
            }
        }
        let extends = match prev {
            Some(p) => cur.0.end > p.0.end,
            None => true,
        };
        if extends {
            prev = Some(cur);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::checked_nbytes;

    #[test]
    fn checked_nbytes_of_empty_and_overflowing_shapes() {
        assert_eq!(checked_nbytes(&[2, 3], 4), Some(24));
        assert_eq!(checked_nbytes(&[], 4), Some(4));
        // A 0 anywhere: no elements, however large the dimensions before it.
        assert_eq!(checked_nbytes(&[1 << 62, 0, 3], 4), Some(0));
        assert_eq!(checked_nbytes(&[usize::MAX, usize::MAX, 0], 8), Some(0));
        assert_eq!(checked_nbytes(&[0, usize::MAX], 1), Some(0));
        // A count that overflows, in the elements or only in the bytes, stays an overflow.
        assert_eq!(checked_nbytes(&[1 << 62, 4, 3], 1), None);
        assert_eq!(checked_nbytes(&[1 << 62, 1], 4), None);
        assert_eq!(checked_nbytes(&[1 << 62, 1], 2), Some(1 << 63));
    }
}
