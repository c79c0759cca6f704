//! bitsandbytes' serialization of a 4-bit weight: what `bnb.nn.Linear4bit` puts in a state dict
//! (and so what `transformers` writes for a model loaded in 4 bits), read as nibble's NF4, and
//! the layout nibble writes its NF4 weights in ([`parts`]), so that bitsandbytes loads them.
//!
//! For a weight `K` of shape `[out, in]` (`n = out·in`, blocks of 64 of the flattened weight):
//!
//! | tensor | dtype, shape | holds |
//! |---|---|---|
//! | `K` | u8 `[⌈n/2⌉, 1]` | the codes, first element in the high nibble (nibble's `K.nf4.packed`) |
//! | `K.absmax` | f32 `[⌈n/64⌉]`, or u8 with double quantization | each block's absmax, or its 8-bit code |
//! | `K.quant_map` | f32 `[16]` | the 16 NF4 levels |
//! | `K.nested_absmax` | f32 `[⌈⌈n/64⌉/256⌉]` | double quantization: each group of 256 absmax codes' scale |
//! | `K.nested_quant_map` | f32 `[256]` | double quantization: the signed 8-bit dynamic map |
//! | `K.quant_state.bitsandbytes__nf4` | u8 | JSON: `quant_type`, `blocksize`, `dtype`, `shape`, and with double quantization `nested_blocksize`, `nested_offset` (the absmaxes' mean) |
//!
//! Only NF4 with blocks of 64 (bitsandbytes' and transformers' default) and nested groups of
//! 256 is read; FP4, other block sizes, or maps other than NF4's levels and the dynamic map are
//! errors naming the key. The weights are used in f32 whatever the JSON's `dtype` (the dtype
//! bitsandbytes would dequantize to before its matmul).

use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use crate::format::WeightFormat;
use crate::frozen::{check_finite, expect_part_of, FrozenWeight, Part};
use nibble_quant::nf4::{dynamic_map, NF4_LEVELS};
use nibble_quant::{Bytes, Nf4Matrix};
use std::borrow::Cow;
use std::sync::Arc;

/// Suffix of the JSON tensor that marks an NF4 weight in bitsandbytes' layout.
pub const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";
/// Suffix of the JSON tensor of bitsandbytes' FP4, which nibble does not read.
const QUANT_STATE_FP4: &str = "quant_state.bitsandbytes__fp4";
/// The largest quant-state JSON read (bitsandbytes writes about 200 bytes).
const MAX_STATE_BYTES: usize = 1 << 16;

/// Whether `file` holds weight `key` in bitsandbytes' 4-bit layout (its quant-state tensor is
/// there), NF4 or not.
pub fn is_bnb_4bit(file: &Checkpoint, key: &str) -> bool {
    [QUANT_STATE_NF4, QUANT_STATE_FP4]
        .iter()
        .any(|s| file.info(&format!("{key}.{s}")).is_some())
}

/// Every key that weight `key` may have in bitsandbytes' 4-bit layout (some only with double
/// quantization).
pub fn part_keys(key: &str) -> [String; 6] {
    [
        key.to_string(),
        format!("{key}.absmax"),
        format!("{key}.quant_map"),
        format!("{key}.nested_absmax"),
        format!("{key}.nested_quant_map"),
        format!("{key}.{QUANT_STATE_NF4}"),
    ]
}

/// The parts of NF4 weight `w` stored as `key` in bitsandbytes' layout (what
/// `bnb.nn.Linear4bit.state_dict()` holds for it; [`read_bnb_4bit`] reads them back).
pub fn parts<'a>(key: &str, w: &'a Nf4Matrix) -> Vec<Part<'a>> {
    let (out, inn) = w.shape();
    let n = out * inn;
    let nb = n.div_ceil(64);
    let f32_bytes = |v: &[f32]| -> Cow<'a, [u8]> {
        Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    };
    let mut parts: Vec<Part<'a>> = vec![
        (
            key.to_string(),
            DType::U8,
            vec![n.div_ceil(2), 1],
            Cow::Borrowed(w.packed_bytes()),
        ),
        (
            format!("{key}.quant_map"),
            DType::F32,
            vec![16],
            f32_bytes(&NF4_LEVELS),
        ),
    ];
    // The JSON as bitsandbytes writes it (Python's `json.dumps`: its key order and spacing).
    let mut state =
        format!("{{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [{out}, {inn}]");
    match (
        w.absmax_bytes(),
        w.absmax_codes_bytes(),
        w.absmax_scale_bytes(),
    ) {
        (Some(absmax), ..) => parts.push((
            format!("{key}.absmax"),
            DType::F32,
            vec![nb],
            Cow::Borrowed(absmax),
        )),
        (None, Some(codes), Some(scale)) => {
            parts.push((
                format!("{key}.absmax"),
                DType::U8,
                vec![nb],
                Cow::Borrowed(codes),
            ));
            parts.push((
                format!("{key}.nested_absmax"),
                DType::F32,
                vec![scale.len() / 4],
                Cow::Borrowed(scale),
            ));
            parts.push((
                format!("{key}.nested_quant_map"),
                DType::F32,
                vec![256],
                f32_bytes(&dynamic_map()),
            ));
            // An f32 widened to f64 is exact, so the JSON reads back as the same f32; `{:?}`
            // spells it as Python's `repr` does (shortest round trip, `0.0` not `0`).
            let offset = f64::from(w.absmax_offset().unwrap_or(0.0));
            state.push_str(&format!(
                ", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": {offset:?}"
            ));
        }
        _ => {}
    }
    state.push('}');
    let json = state.into_bytes();
    parts.push((
        format!("{key}.{QUANT_STATE_NF4}"),
        DType::U8,
        vec![json.len()],
        Cow::Owned(json),
    ));
    parts
}

/// The format (`Nf4`, or `Nf4Dq` with double quantization) of the bitsandbytes 4-bit weight
/// that tensor `key` is a part of ([`part_keys`]), or `None` if it is no such part.
pub fn part_format(file: &Checkpoint, key: &str) -> Option<WeightFormat> {
    let base = [
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        &format!(".{QUANT_STATE_NF4}"),
        &format!(".{QUANT_STATE_FP4}"),
    ]
    .into_iter()
    .find_map(|suffix| key.strip_suffix(suffix))
    .filter(|base| is_bnb_4bit(file, base))
    .or_else(|| is_bnb_4bit(file, key).then_some(key))?;
    Some(if file.info(&format!("{base}.nested_absmax")).is_some() {
        WeightFormat::Nf4Dq
    } else {
        WeightFormat::Nf4
    })
}

/// Reads weight `key` stored in bitsandbytes' 4-bit layout (see the module docs) as an NF4
/// weight, plain or double-quantized, without copying its codes: `(weight, format, out, in)`.
pub fn read_bnb_4bit(
    file: &Checkpoint,
    key: &str,
) -> Result<(FrozenWeight, WeightFormat, usize, usize)> {
    let bad = |name: &str, reason: String| Error::BadTensor {
        path: file.path().to_path_buf(),
        key: name.to_string(),
        reason,
    };
    let fp4 = format!("{key}.{QUANT_STATE_FP4}");
    if file.info(&fp4).is_some() {
        return Err(bad(
            &fp4,
            "bitsandbytes FP4 weights are not supported (NF4 only)".into(),
        ));
    }
    let state_key = format!("{key}.{QUANT_STATE_NF4}");
    let (dtype, _) = file.info(&state_key).ok_or_else(|| Error::MissingKey {
        path: file.path().to_path_buf(),
        key: state_key.clone(),
    })?;
    if dtype != DType::U8 {
        return Err(Error::DType {
            path: file.path().to_path_buf(),
            key: state_key,
            expected: "u8".into(),
            found: dtype,
        });
    }
    let text = file.bytes(&state_key)?;
    if text.len() > MAX_STATE_BYTES {
        return Err(bad(&state_key, format!("{} bytes of JSON", text.len())));
    }
    let state: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| bad(&state_key, format!("not JSON: {e}")))?;
    let field = |name: &str| state.get(name).filter(|v| !v.is_null());
    let want = |name: &str, ok: bool, found: Option<&serde_json::Value>, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(bad(
                &state_key,
                format!("`{name}` must be {what}, found {}", fmt_value(found)),
            ))
        }
    };
    let quant_type = field("quant_type");
    want(
        "quant_type",
        quant_type.and_then(|v| v.as_str()) == Some("nf4"),
        quant_type,
        "\"nf4\"",
    )?;
    let blocksize = field("blocksize");
    want(
        "blocksize",
        blocksize.and_then(|v| v.as_u64()) == Some(64),
        blocksize,
        "64 (the only block size read)",
    )?;
    let shape = field("shape");
    let dims: Option<Vec<usize>> = shape.and_then(|s| {
        s.as_array()?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect()
    });
    let (out, inn) = match dims.as_deref() {
        Some(&[o, i]) => (o, i),
        _ => {
            return Err(bad(
                &state_key,
                format!("`shape` must be [out, in], found {}", fmt_value(shape)),
            ))
        }
    };
    let n = out.checked_mul(inn).ok_or_else(|| Error::Unsupported {
        key: key.to_string(),
        what: format!("[{out}, {inn}] overflows"),
    })?;
    let nb = n.div_ceil(64);
    // A part, checked (dtype, one of `shapes`, finite if f32) and mapped without a copy.
    let part = |name: &str, dtype: DType, shapes: &[&[usize]]| -> Result<Bytes> {
        expect_part_of(file, name, dtype, shapes)?;
        let mapped = file.shared_bytes(name)?;
        if dtype == DType::F32 {
            check_finite(file, name, dtype, &mapped)?;
        }
        let len = mapped.len();
        Bytes::from_shared(Arc::new(mapped), 0..len).map_err(|source| Error::Quant {
            key: name.to_string(),
            source,
        })
    };
    let f32s = |bytes: &Bytes| -> Vec<f32> {
        bytes
            .as_slice()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let same_map = |name: &str, found: &[f32], want: &[f32], what: &str| -> Result<()> {
        match found
            .iter()
            .zip(want)
            .position(|(a, b)| (a - b).abs() > 1e-6 * b.abs().max(1e-3))
        {
            None => Ok(()),
            Some(i) => Err(bad(
                name,
                format!(
                    "entry {i} is {} where {what} has {}: another map is not supported",
                    found[i], want[i]
                ),
            )),
        }
    };
    let packed = part(key, DType::U8, &[&[n.div_ceil(2), 1], &[n.div_ceil(2)]])?;
    let map_key = format!("{key}.quant_map");
    let map = part(&map_key, DType::F32, &[&[16]])?;
    same_map(&map_key, &f32s(&map), &NF4_LEVELS, "NF4")?;
    let absmax_key = format!("{key}.absmax");
    let quant = |source| Error::Quant {
        key: key.to_string(),
        source,
    };
    let double = file.info(&absmax_key).map(|(d, _)| d) == Some(DType::U8);
    if !double {
        let absmax = part(&absmax_key, DType::F32, &[&[nb]])?;
        let m = Nf4Matrix::from_parts(out, inn, packed, absmax).map_err(quant)?;
        return Ok((FrozenWeight::Nf4(Arc::new(m)), WeightFormat::Nf4, out, inn));
    }
    let nested = field("nested_blocksize");
    want(
        "nested_blocksize",
        nested.and_then(|v| v.as_u64()) == Some(256),
        nested,
        "256",
    )?;
    let offset_value = field("nested_offset");
    let offset = offset_value
        .and_then(|v| v.as_f64())
        .map(|v| v as f32)
        .filter(|v| v.is_finite())
        .ok_or_else(|| {
            bad(
                &state_key,
                format!(
                    "`nested_offset` must be a finite number, found {}",
                    fmt_value(offset_value)
                ),
            )
        })?;
    let codes = part(&absmax_key, DType::U8, &[&[nb]])?;
    let scale_key = format!("{key}.nested_absmax");
    let scale = part(&scale_key, DType::F32, &[&[nb.div_ceil(256)]])?;
    let nested_map_key = format!("{key}.nested_quant_map");
    let nested_map = part(&nested_map_key, DType::F32, &[&[256]])?;
    same_map(
        &nested_map_key,
        &f32s(&nested_map),
        &dynamic_map(),
        "bitsandbytes' signed dynamic map",
    )?;
    let offset = Bytes::from_f32(vec![offset]);
    let m = Nf4Matrix::from_parts_double(out, inn, packed, codes, offset, scale).map_err(quant)?;
    Ok((
        FrozenWeight::Nf4(Arc::new(m)),
        WeightFormat::Nf4Dq,
        out,
        inn,
    ))
}

/// A JSON value for an error message (`none` when absent).
fn fmt_value(v: Option<&serde_json::Value>) -> String {
    v.map_or("none".to_string(), |v| v.to_string())
}
