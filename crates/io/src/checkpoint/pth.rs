//! PyTorch `.pth` archives (`torch.save`, zip format): `<archive>/data.pkl` (the pickled state
//! dict), `<archive>/data/<key>` (one raw little-endian storage per key), `<archive>/byteorder`
//! and `<archive>/version`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use super::pickle::{self, ModuleObj, Seq, Value};
use super::{checked_nbytes, zip, DType, Data, Entry, Format};
use crate::error::{Error, Result};
use std::borrow::Cow;

/// What reading a `.pth` file gives: its tensors, their keys in the file's order, and its
/// metadata (for a whole pickled model, [`PICKLED_MODULES_KEY`]).
pub(crate) type PthRead = (
    BTreeMap<String, Entry>,
    Vec<String>,
    BTreeMap<String, String>,
);

/// Metadata key of a `.pth` file that pickles a whole model (`torch.save(model)`): a JSON
/// array of its modules in registration order, each `{"path": "0", "class":
/// "torch.nn.modules.linear.Linear", "attrs": {"in_features": 30, ...}}` (the plain values of
/// its `__dict__`: numbers, strings, booleans, `None` and lists of them), so that a reader
/// can tell which layers it holds (a state dict cannot: an activation has no tensors).
pub const PICKLED_MODULES_KEY: &str = "nibble.pickled_modules";

/// A `.pth` file (zip or legacy) that breaks its format: `reason` says how.
pub(crate) fn malformed(path: &Path, reason: String) -> Error {
    Error::Malformed {
        path: path.to_path_buf(),
        format: Format::Pth,
        reason,
    }
}

/// Parses and validates a `.pth` archive held in `buf`.
pub(crate) fn read(path: &Path, buf: &[u8]) -> Result<PthRead> {
    let bad = |reason: String| malformed(path, reason);
    let files = zip::read(path, buf)?;

    // <archive>/data.pkl, with <archive> a single top-level directory
    let mut pickles = files
        .keys()
        .filter(|n| n.split('/').count() == 2 && n.ends_with("/data.pkl"));
    let pkl_name = pickles
        .next()
        .ok_or_else(|| bad("no `<archive>/data.pkl` entry".into()))?
        .clone();
    if let Some(other) = pickles.next() {
        return Err(bad(format!(
            "two pickles, `{pkl_name}` and `{other}`: which archive is it?"
        )));
    }
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let slice = |r: &Range<usize>| buf.get(r.clone()).unwrap_or(&[]);

    if let Some(r) = files.get(&format!("{prefix}byteorder")) {
        let order = slice(r);
        if order != b"little" {
            return Err(Error::ZipEntry {
                path: path.to_path_buf(),
                entry: format!("{prefix}byteorder"),
                reason: format!(
                    "byte order `{}`; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(&order[..order.len().min(16)])
                ),
            });
        }
    }

    let code = slice(&files[&pkl_name]);
    let root = pickle::load(code).map_err(|e| Error::Pickle {
        path: path.to_path_buf(),
        entry: pkl_name.clone(),
        offset: e.offset,
        reason: e.reason,
    })?;
    entries_of(path, &root, |key| {
        let name = format!("{prefix}data/{key}");
        match files.get(&name) {
            Some(range) => Ok((name, range.clone())),
            None => Err(format!("its storage `{name}` is missing from the archive")),
        }
    })
}

/// The tensors of the state dict in a `.pth` pickle's `root` (see [`state_dict_in`]), in the
/// dict's order, each checked against its storage: `storage(key)` gives a storage key's name
/// (for messages) and its bytes' range in the file, or why it has none. Shared by the zip
/// format and the legacy one ([`super::legacy`]).
pub(crate) fn entries_of(
    path: &Path,
    root: &Value,
    storage: impl Fn(&str) -> std::result::Result<(String, Range<usize>), String>,
) -> Result<PthRead> {
    let bad = |reason: String| malformed(path, reason);
    // The state dict, and the modules of the whole model it comes from, if it does.
    let (dict, modules) = match root {
        Value::Dict(root) => state_dict_in(root).map_err(bad)?,
        // A whole model (`torch.save(model)`): its state dict, as `model.state_dict()` gives it.
        Value::Module(m) => {
            let (dict, modules) = module_state_dict(m).map_err(bad)?;
            (Cow::Owned(dict), modules)
        }
        other => {
            return Err(bad(format!(
                "the pickle holds a {}, not a state dict (a dict of str → tensor) or a model",
                other.kind()
            )))
        }
    };

    let mut entries = BTreeMap::new();
    // The keys in the state dict's order (the order the model registered its parameters).
    let mut order = Vec::with_capacity(dict.items.len());
    for (k, v) in &dict.items {
        let Value::Str(key) = k else {
            return Err(bad(format!(
                "state dict key is a {}, not a string",
                k.kind()
            )));
        };
        let key: &str = key;
        let bad_tensor = |reason: String| Error::BadTensor {
            path: path.to_path_buf(),
            key: key.to_owned(),
            reason,
        };
        let Value::Tensor(t) = v else {
            return Err(bad_tensor(format!("value is a {}, not a tensor", v.kind())));
        };
        let (storage_name, storage_range) = storage(&t.storage.key).map_err(bad_tensor)?;
        let dtype = t.storage.dtype;
        let esize = dtype.size_of();
        let to_usize = |x: u64, what: &str| {
            usize::try_from(x).map_err(|_| bad_tensor(format!("{what} {x} is too large")))
        };
        let numel = to_usize(t.storage.numel, "storage numel")?;
        let storage_bytes = numel
            .checked_mul(esize)
            .ok_or_else(|| bad_tensor(format!("storage of {numel} × {dtype} overflows")))?;
        if storage_bytes != storage_range.len() {
            return Err(bad_tensor(format!(
                "storage `{storage_name}` holds {} bytes, {numel} × {dtype} needs {storage_bytes}",
                storage_range.len()
            )));
        }
        let shape = t
            .size
            .iter()
            .map(|&d| to_usize(d, "dimension"))
            .collect::<Result<Vec<_>>>()?;
        let stride = t
            .stride
            .iter()
            .map(|&d| to_usize(d, "stride"))
            .collect::<Result<Vec<_>>>()?;
        let offset = to_usize(t.offset, "storage offset")?;
        let nbytes = checked_nbytes(&shape, esize)
            .ok_or_else(|| bad_tensor(format!("the byte size of shape {shape:?} overflows")))?;
        let count = nbytes / esize;

        let data = if count == 0 {
            Data::Mapped(storage_range.start..storage_range.start)
        } else {
            // last element reached: offset + Σ (size_i − 1) · stride_i, must be < numel
            shape
                .iter()
                .zip(&stride)
                .try_fold(offset, |acc, (&d, &s)| {
                    (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
                })
                .filter(|&l| l < numel)
                .ok_or_else(|| {
                    bad_tensor(format!(
                        "shape {shape:?} with strides {stride:?} at offset {offset} reaches \
                         past its storage of {numel} elements"
                    ))
                })?;
            if is_contiguous(&shape, &stride) && !t.negated {
                let start = storage_range.start + offset * esize;
                Data::Mapped(start..start + nbytes)
            } else {
                Data::Strided {
                    storage: storage_range.clone(),
                    offset,
                    stride,
                    negated: t.negated,
                    copy: OnceLock::new(),
                }
            }
        };
        if entries
            .insert(key.to_owned(), Entry { dtype, shape, data })
            .is_some()
        {
            return Err(Error::DuplicateKey {
                path: path.to_path_buf(),
                key: key.to_owned(),
            });
        }
        order.push(key.to_owned());
    }
    let mut metadata = BTreeMap::new();
    if !modules.is_empty() {
        metadata.insert(
            PICKLED_MODULES_KEY.to_string(),
            serde_json::Value::Array(modules).to_string(),
        );
    }
    Ok((entries, order, metadata))
}

/// The state dict of a whole pickled model (`torch.save(model)`), as `model.state_dict()`
/// gives it: each module's parameters, then its persistent buffers (those not in its
/// `_non_persistent_buffers_set`), then its submodules' under `<name>.`, in the order the
/// module registered them; `None` entries (an `nn.Linear(bias=False)`'s bias) are skipped.
/// An error where an object on the way is not a module (no `_parameters` / `_modules` dict),
/// or where modules nest deeper than [`pickle::MAX_DEPTH`].
/// The modules, in registration order, go with it (see [`PICKLED_MODULES_KEY`]).
fn module_state_dict(
    root: &ModuleObj,
) -> std::result::Result<(StateDict, Vec<serde_json::Value>), String> {
    fn walk(
        m: &ModuleObj,
        prefix: &str,
        depth: usize,
        out: &mut Vec<(Value, Value)>,
        infos: &mut Vec<serde_json::Value>,
    ) -> std::result::Result<(), String> {
        // A module shared under several names is walked under each (as `state_dict` lists
        // it under each): a pickle sharing modules level after level would multiply them.
        if infos.len() >= MAX_PICKLED_MODULES {
            return Err(format!(
                "the pickled model has more than {MAX_PICKLED_MODULES} modules (counting a \
                 shared module under each of its names)"
            ));
        }
        if depth > pickle::MAX_DEPTH {
            return Err(format!(
                "the pickled model's modules nest deeper than {}",
                pickle::MAX_DEPTH
            ));
        }
        let not_module = || {
            format!(
                "the pickle holds a `{}` object{} that is not an nn.Module (no `_parameters` \
                 and `_modules` dicts): nibble reads state dicts and whole models of nn.Modules",
                m.class,
                if prefix.is_empty() {
                    String::new()
                } else {
                    format!(" at `{}`", prefix.trim_end_matches('.'))
                }
            )
        };
        let state = m.state.as_deref().ok_or_else(not_module)?;
        let field = |name: &str| {
            state.items.iter().find_map(|(k, v)| match k {
                Value::Str(k) if &**k == name => Some(v),
                _ => None,
            })
        };
        let dict = |name: &str| match field(name) {
            Some(Value::Dict(d)) => Some(d),
            _ => None,
        };
        let (Some(params), Some(modules)) = (dict("_parameters"), dict("_modules")) else {
            return Err(not_module());
        };
        // A state-dict hook (`_register_state_dict_hook`) may rename, add or drop what
        // `model.state_dict()` gives, and nibble calls nothing: the keys read would differ
        // from PyTorch's without a word.
        if dict("_state_dict_hooks").is_some_and(|h| !h.items.is_empty()) {
            return Err(format!(
                "module `{}` ({}) of the pickled model has state-dict hooks, which may change \
                 the keys and tensors `model.state_dict()` gives; nibble never runs the \
                 pickle's code: save `model.state_dict()` instead",
                if prefix.is_empty() {
                    "(the model)"
                } else {
                    prefix.trim_end_matches('.')
                },
                m.class
            ));
        }
        let skipped: Vec<&str> = match field("_non_persistent_buffers_set") {
            Some(Value::List(l)) => l
                .items
                .iter()
                .filter_map(|v| match v {
                    Value::Str(s) => Some(&**s),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        infos.push(serde_json::json!({
            "path": prefix.trim_end_matches('.'),
            "class": &*m.class,
            "attrs": plain_attributes(state),
        }));
        let buffers = dict("_buffers");
        let named = params.items.iter().chain(
            buffers
                .iter()
                .flat_map(|b| b.items.iter())
                .filter(|(k, _)| !matches!(k, Value::Str(k) if skipped.contains(&&**k))),
        );
        for (k, v) in named {
            let Value::Str(name) = k else {
                return Err(format!(
                    "a parameter or buffer name of the pickled model is a {}",
                    k.kind()
                ));
            };
            if matches!(v, Value::None) {
                continue;
            }
            out.push((Value::Str(format!("{prefix}{name}").into()), v.clone()));
        }
        for (k, v) in &modules.items {
            let Value::Str(name) = k else {
                return Err(format!(
                    "a submodule name of the pickled model is a {}",
                    k.kind()
                ));
            };
            match v {
                Value::None => {}
                Value::Module(child) => {
                    walk(child, &format!("{prefix}{name}."), depth + 1, out, infos)?
                }
                other => {
                    return Err(format!(
                        "submodule `{prefix}{name}` of the pickled model is a {}, not a module",
                        other.kind()
                    ))
                }
            }
        }
        Ok(())
    }
    let (mut items, mut modules) = (Vec::new(), Vec::new());
    walk(root, "", 0, &mut items, &mut modules)?;
    Ok((Seq { depth: 2, items }, modules))
}

/// Most modules a whole pickled model may have, a shared module counted under each name.
const MAX_PICKLED_MODULES: usize = 1 << 16;

/// A module's plain attributes (see [`PICKLED_MODULES_KEY`]): the entries of its `__dict__`
/// whose names do not start with `_` (PyTorch's bookkeeping) and whose values are numbers,
/// strings, booleans, `None`, or tuples and lists of those, one level deep (`normalized_shape`).
fn plain_attributes(state: &StateDict) -> serde_json::Map<String, serde_json::Value> {
    fn plain(v: &Value, nested: bool) -> Option<serde_json::Value> {
        Some(match v {
            Value::None => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)?.into(),
            Value::Str(s) => s.to_string().into(),
            Value::Tuple(t) | Value::List(t) if !nested => serde_json::Value::Array(
                t.items
                    .iter()
                    .map(|x| plain(x, true))
                    .collect::<Option<_>>()?,
            ),
            _ => return None,
        })
    }
    state
        .items
        .iter()
        .filter_map(|(k, v)| match k {
            Value::Str(k) if !k.starts_with('_') && &**k != "training" => {
                Some((k.to_string(), plain(v, false)?))
            }
            _ => None,
        })
        .collect()
}

/// A state dict as the pickle holds it: pairs of key and value.
type StateDict = Seq<(Value, Value)>;

/// A state dict found in a pickle, with the modules of the whole model it comes from (none
/// for a dict of tensors).
type StateDictOf<'r> = (Cow<'r, StateDict>, Vec<serde_json::Value>);

/// Names under which training checkpoints keep the model's state dict, in the order they are
/// preferred where a checkpoint holds several dicts of tensors.
const STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model_state_dict", "model"];

/// The state dict in a pickle's root dict: the root itself unless one of its values is a dict
/// (a state dict's values are tensors). A training checkpoint keeps the state dict under a key
/// beside other things (`torch.save({"epoch": 3, "model_state_dict": ..., "optimizer_state_dict":
/// ...})`, PyTorch's tutorial; Lightning's `{"state_dict": ..., "epoch": ...}`): then the one
/// value that is a non-empty dict of str → tensor or a whole model (its state dict), or where several are, the one named first
/// in [`STATE_DICT_KEYS`]; an error naming the candidates if none of them is, or none at all.
/// A whole model's state dict comes with its modules (see [`module_state_dict`]); an object
/// beside a state dict that is no nn.Module is passed over, as a value that is no dict is.
fn state_dict_in(root: &StateDict) -> std::result::Result<StateDictOf<'_>, String> {
    if !root
        .items
        .iter()
        .any(|(_, v)| matches!(v, Value::Dict(_) | Value::Module(_)))
    {
        return Ok((Cow::Borrowed(root), Vec::new()));
    }
    let is_state_dict = |d: &Seq<(Value, Value)>| {
        !d.items.is_empty()
            && d.items
                .iter()
                .all(|(k, v)| matches!((k, v), (Value::Str(_), Value::Tensor(_))))
    };
    // Dicts of tensors, and whole models (`{"model": model, "epoch": 3}`) as their state dicts.
    let mut candidates: Vec<(&str, StateDictOf<'_>)> = Vec::new();
    // Why an object under a key is no model, should nothing else be a state dict.
    let mut not_models = Vec::new();
    for (k, v) in &root.items {
        match (k, v) {
            (Value::Str(k), Value::Dict(d)) if is_state_dict(d) => {
                candidates.push((k, (Cow::Borrowed(&**d), Vec::new())))
            }
            (Value::Str(k), Value::Module(m)) => match module_state_dict(m) {
                Ok((d, modules)) if !d.items.is_empty() => {
                    candidates.push((k, (Cow::Owned(d), modules)))
                }
                Ok(_) => {}
                Err(e) => not_models.push(format!("under `{k}`: {e}")),
            },
            _ => {}
        }
    }
    let names = || {
        root.items
            .iter()
            .map(|(k, v)| match k {
                Value::Str(k) => format!("`{k}` ({})", v.kind()),
                other => other.kind(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if candidates.len() > 1 {
        let Some(at) = STATE_DICT_KEYS
            .iter()
            .find_map(|want| candidates.iter().position(|(k, _)| k == want))
        else {
            let keys: Vec<String> = candidates.iter().map(|(k, _)| format!("`{k}`")).collect();
            return Err(format!(
                "the pickle's dict holds several state dicts ({}): save the one to read \
                 with torch.save(checkpoint[key], path)",
                keys.join(", ")
            ));
        };
        return Ok(candidates.swap_remove(at).1);
    }
    match (candidates.pop(), not_models.first()) {
        (Some((_, d)), _) => Ok(d),
        (None, Some(why)) => Err(why.clone()),
        (None, None) => Err(format!(
            "the pickle's dict holds no state dict (a dict of str → tensor) at its top level or \
             under one key: {}",
            names()
        )),
    }
}

/// True for row-major contiguous strides (dimensions of size 1 may have any stride, as in
/// PyTorch).
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies the strided view (`offset`, `shape`, `stride`, in elements of `esize` bytes) of
/// `storage` into a new contiguous buffer. The view was validated at open (every element inside
/// the storage); out-of-range elements, should there be any, are left zero rather than panic.
/// `None` where the buffer cannot be allocated (a broadcast view, stride 0, can be far larger
/// than its storage).
/// Negates every element of `bytes` (little-endian elements of `dtype`) in place, as PyTorch
/// resolves a tensor's negation bit: floats by their sign bit, integers wrapping (an
/// error for bool, which PyTorch never negates).
pub(crate) fn negate(bytes: &mut [u8], dtype: DType) -> std::result::Result<(), String> {
    let esize = dtype.size_of();
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {
            // The sign bit is the top bit of the last (most significant) byte.
            for e in bytes.chunks_exact_mut(esize) {
                e[esize - 1] ^= 0x80;
            }
        }
        DType::Bool => return Err("a bool tensor with the negation bit set".into()),
        _ => {
            for e in bytes.chunks_exact_mut(esize) {
                let mut wide = [0u8; 8];
                wide[..esize].copy_from_slice(e);
                let v = u64::from_le_bytes(wide).wrapping_neg();
                e.copy_from_slice(&v.to_le_bytes()[..esize]);
            }
        }
    }
    Ok(())
}

pub(crate) fn gather(
    storage: &[u8],
    esize: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> Option<Vec<u8>> {
    let count: usize = shape.iter().product();
    let mut out = Vec::new();
    out.try_reserve_exact(count.checked_mul(esize)?).ok()?;
    out.resize(count * esize, 0u8);
    let mut index = vec![0usize; shape.len()];
    let mut src = offset;
    for chunk in out.chunks_exact_mut(esize) {
        if let Some(s) = storage.get(src * esize..src * esize + esize) {
            chunk.copy_from_slice(s);
        }
        // odometer increment, last dimension fastest
        for dim in (0..shape.len()).rev() {
            index[dim] += 1;
            src += stride[dim];
            if index[dim] < shape[dim] {
                break;
            }
            src -= stride[dim] * shape[dim];
            index[dim] = 0;
        }
    }
    Some(out)
}
