//! bitsandbytes' serialization of quantized weights: what `bnb.nn.Linear4bit` and
//! `bnb.nn.Linear8bitLt` put in a state dict (and so what `transformers` writes for a model
//! loaded in 4 or 8 bits), read by nibble, and the layout nibble writes its NF4 weights in
//! ([`parts`]), so that bitsandbytes loads them.
//!
//! For a 4-bit weight `K` of shape `[out, in]` (`n = out·in`, blocks of `B` of the flattened
//! weight; `T` is `nf4` or `fp4`):
//!
//! | tensor | dtype, shape | holds |
//! |---|---|---|
//! | `K` | u8 `[⌈n/2⌉, 1]` | the codes, first element in the high nibble (nibble's `K.nf4.packed`); with `quant_storage` f16, bf16 or f32, the same bytes as `[n/4, 1]` or `[n/8, 1]` elements |
//! | `K.absmax` | f32 `[⌈n/B⌉]`, or u8 with double quantization | each block's absmax, or its 8-bit code |
//! | `K.quant_map` | f32 `[16]` | the 16 levels ([`NF4_LEVELS`] or [`FP4_LEVELS`]) |
//! | `K.nested_absmax` | f32 `[⌈⌈n/B⌉/256⌉]` | double quantization: each group of 256 absmax codes' scale |
//! | `K.nested_quant_map` | f32 `[256]` | double quantization: the signed 8-bit dynamic map |
//! | `K.quant_state.bitsandbytes__T` | u8 | JSON: `quant_type`, `blocksize`, `dtype`, `shape`, and with double quantization `nested_blocksize`, `nested_offset` (the absmaxes' mean) |
//!
//! NF4 with blocks of 64 (the block size bitsandbytes and transformers default to) runs from
//! its codes as nibble's NF4 ([`read_bnb_4bit`]). FP4 (`Linear4bit`'s default quant type) and
//! the other block sizes ([`BLOCK_SIZES`]) are read as the f32 weight bitsandbytes computes
//! with ([`read_bnb_4bit_f32`]): exact, at 32 bits a weight. Maps other than the quant type's
//! levels and the dynamic map, a quant type other than the key's, nested groups other than 256
//! are errors naming the key. A weight is double-quantized exactly when `K.nested_absmax` is
//! there (as bitsandbytes' `QuantState.from_dict` decides): its `K.absmax` must then be u8
//! codes, and f32 otherwise (a mismatch is an error naming `K.absmax` and both dtypes), and
//! `K.nested_quant_map` or the JSON's `nested_*` fields without `K.nested_absmax` are an error. The weights are used in f32 whatever the JSON's `dtype` (the
//! dtype bitsandbytes would dequantize to before its matmul).
//!
//! An 8-bit weight (`Linear8bitLt(has_fp16_weights=False)`) is `K` i8 `[out, in]` with its
//! row absmaxes `SCB` f32 `[out]` and `weight_format` u8 beside it ([`read_bnb_8bit`]): it
//! runs as nibble's per-row int8.

use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use crate::format::WeightFormat;
use crate::frozen::{check_finite, expect_part_of, FrozenWeight, Part};
use nibble_quant::nf4::{dynamic_map, NF4_LEVELS};
use nibble_quant::{Bytes, Nf4Matrix};
use nibble_tensor::Tensor;
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

/// The weight that tensor `key` is a part of in bitsandbytes' 4-bit layout ([`part_keys`]:
/// `K`, `K.absmax`, ...), or `None` if it is no such part.
fn part_base<'k>(file: &Checkpoint, key: &'k str) -> Option<&'k str> {
    [
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
    .or_else(|| is_bnb_4bit(file, key).then_some(key))
}

/// The format (`Nf4`, or `Nf4Dq` with double quantization) of the bitsandbytes 4-bit weight
/// that tensor `key` is a part of ([`part_keys`]), or `None` if it is no such part or not a
/// weight nibble runs from its codes ([`Bnb4bitInfo::is_native`]; [`part_info`] describes
/// those).
pub fn part_format(file: &Checkpoint, key: &str) -> Option<WeightFormat> {
    part_info(file, key)?.native_format()
}

/// What bitsandbytes' quant state says of the 4-bit weight that tensor `key` is a part of
/// ([`bnb_4bit_info`]), or `None` if it is no such part or its state is not readable.
pub fn part_info(file: &Checkpoint, key: &str) -> Option<Bnb4bitInfo> {
    bnb_4bit_info(file, part_base(file, key)?).ok()
}

/// The 16 levels of bitsandbytes' FP4 (`quant_type="fp4"`, `bnb.nn.Linear4bit`'s and
/// transformers' default): code `c`'s value before its block's absmax scales it, as
/// bitsandbytes writes them in `K.quant_map` (sign in bit 3; `8` is negative zero).
pub const FP4_LEVELS: [f32; 16] = [
    0.0,
    0.005_208_333_5,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    -0.0,
    -0.005_208_333_5,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// The block sizes bitsandbytes quantizes 4-bit weights in (`Params4bit(blocksize=...)`).
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// bitsandbytes' two 4-bit codebooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// NormalFloat 4 ([`NF4_LEVELS`]).
    Nf4,
    /// bitsandbytes' 4-bit float ([`FP4_LEVELS`]).
    Fp4,
}

impl QuantType {
    /// The name in bitsandbytes' JSON (`"nf4"`, `"fp4"`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16 levels the codes index.
    pub fn levels(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_LEVELS,
            QuantType::Fp4 => &FP4_LEVELS,
        }
    }

    /// The suffix of the JSON tensor that marks a weight of this type.
    fn state_suffix(self) -> &'static str {
        match self {
            QuantType::Nf4 => QUANT_STATE_NF4,
            QuantType::Fp4 => QUANT_STATE_FP4,
        }
    }
}

/// What bitsandbytes' JSON quant state (checked against the tensors' shapes) says about one
/// 4-bit weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bnb4bitInfo {
    /// The codebook.
    pub quant_type: QuantType,
    /// Weights per absmax (over the flattened `out · in` weight).
    pub blocksize: usize,
    /// Whether the absmaxes are double-quantized (8-bit codes in groups of 256).
    pub double: bool,
    /// `[out, in]`.
    pub out: usize,
    /// See `out`.
    pub inn: usize,
}

impl Bnb4bitInfo {
    /// Whether nibble runs this weight from its codes ([`read_bnb_4bit`]: NF4 with blocks of
    /// 64); the others are read dequantized ([`read_bnb_4bit_f32`]).
    pub fn is_native(&self) -> bool {
        self.quant_type == QuantType::Nf4 && self.blocksize == 64
    }

    /// nibble's format for a native weight (`Nf4` or `Nf4Dq`), else `None`.
    pub fn native_format(&self) -> Option<WeightFormat> {
        self.is_native().then_some(if self.double {
            WeightFormat::Nf4Dq
        } else {
            WeightFormat::Nf4
        })
    }

    /// A short description for messages: `bitsandbytes fp4, blocks of 128, double-quantized
    /// absmax`.
    pub fn describe(&self) -> String {
        format!(
            "bitsandbytes {}, blocks of {}{}",
            self.quant_type.name(),
            self.blocksize,
            if self.double {
                ", double-quantized absmax"
            } else {
                ""
            }
        )
    }
}

/// A 4-bit weight's absmaxes as stored.
enum Absmax {
    /// f32, one per block.
    Plain(Bytes),
    /// u8 codes of the dynamic map, an f32 scale per group of 256 codes, and the mean added back.
    Double {
        codes: Bytes,
        scale: Bytes,
        offset: f32,
    },
}

/// The checked parts of one 4-bit weight.
struct Bnb4bitParts {
    info: Bnb4bitInfo,
    packed: Bytes,
    absmax: Absmax,
}

/// The JSON quant state of 4-bit weight `key`, checked ([`Bnb4bitInfo`]): its quant type must
/// be the one its key names, its block size one of [`BLOCK_SIZES`], its shape `[out, in]`.
pub fn bnb_4bit_info(file: &Checkpoint, key: &str) -> Result<Bnb4bitInfo> {
    Ok(read_state(file, key)?.0)
}

/// [`bnb_4bit_info`] and, with double quantization, the JSON's `nested_offset`.
fn read_state(file: &Checkpoint, key: &str) -> Result<(Bnb4bitInfo, Option<f32>)> {
    let bad = |name: &str, reason: String| Error::BadTensor {
        path: file.path().to_path_buf(),
        key: name.to_string(),
        reason,
    };
    let present: Vec<QuantType> = [QuantType::Nf4, QuantType::Fp4]
        .into_iter()
        .filter(|t| file.info(&format!("{key}.{}", t.state_suffix())).is_some())
        .collect();
    let named = match present[..] {
        [t] => t,
        [] => {
            return Err(Error::MissingKey {
                path: file.path().to_path_buf(),
                key: format!("{key}.{QUANT_STATE_NF4}"),
            })
        }
        _ => {
            return Err(bad(
                key,
                "both an NF4 and an FP4 quant state: which one the codes use is ambiguous".into(),
            ))
        }
    };
    let state_key = format!("{key}.{}", named.state_suffix());
    let (dtype, _) = file.info(&state_key).expect("present above");
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
        quant_type.and_then(|v| v.as_str()) == Some(named.name()),
        quant_type,
        &format!(
            "\"{}\" (the key names {}: the codebook is ambiguous)",
            named.name(),
            named.name().to_uppercase()
        ),
    )?;
    // bitsandbytes reads these with `getattr(torch, …)`: a name torch has no dtype for
    // fails there, and fails here (nibble computes in f32 whatever they say).
    for name in ["dtype", "nested_dtype"] {
        if let Some(v) = field(name) {
            want(
                name,
                v.as_str().is_some_and(|d| TORCH_DTYPES.contains(&d)),
                Some(v),
                "the name of a torch dtype (bitsandbytes looks it up with getattr(torch, …))",
            )?;
        }
    }
    let blocksize_value = field("blocksize");
    let blocksize = blocksize_value
        .and_then(|v| v.as_u64())
        .and_then(|b| usize::try_from(b).ok())
        .filter(|b| BLOCK_SIZES.contains(b));
    let Some(blocksize) = blocksize else {
        return Err(bad(
            &state_key,
            format!(
                "`blocksize` must be one of bitsandbytes' block sizes {BLOCK_SIZES:?}, found {}",
                fmt_value(blocksize_value)
            ),
        ));
    };
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
    if out.checked_mul(inn).is_none() {
        return Err(Error::Unsupported {
            key: key.to_string(),
            what: format!("[{out}, {inn}] overflows"),
        });
    }
    // Double quantization, as bitsandbytes' `QuantState.from_dict` decides it: the layer is
    // nested iff `K.nested_absmax` is in the state dict. The absmax must then be 8-bit codes,
    // and otherwise f32; nested parts without `K.nested_absmax` are half a nested state.
    let absmax_key = format!("{key}.absmax");
    let nested_absmax_key = format!("{key}.nested_absmax");
    let nested_map_key = format!("{key}.nested_quant_map");
    let double = file.info(&nested_absmax_key).is_some();
    match file.info(&absmax_key).map(|(d, _)| d) {
        Some(found) if double && found != DType::U8 => {
            return Err(Error::DType {
                path: file.path().to_path_buf(),
                key: absmax_key,
                expected: format!(
                    "u8 (8-bit absmax codes: `{nested_absmax_key}` is there, so the layer is double-quantized)"
                ),
                found,
            })
        }
        Some(found) if !double && found != DType::F32 => {
            return Err(Error::DType {
                path: file.path().to_path_buf(),
                key: absmax_key,
                expected: format!(
                    "f32 (no `{nested_absmax_key}`, so the layer is not double-quantized and its absmax is stored plain)"
                ),
                found,
            })
        }
        _ => {}
    }
    if !double {
        let stray = if file.info(&nested_map_key).is_some() {
            Some(format!("`{nested_map_key}`"))
        } else {
            ["nested_offset", "nested_blocksize", "nested_dtype"]
                .into_iter()
                .find(|name| field(name).is_some())
                .map(|name| format!("`{name}` in `{state_key}`"))
        };
        if let Some(stray) = stray {
            return Err(bad(
                key,
                format!(
                    "{stray} belongs to a double-quantized layer, but `{nested_absmax_key}` is missing"
                ),
            ));
        }
    }
    let mut offset = None;
    if double {
        let nested = field("nested_blocksize");
        want(
            "nested_blocksize",
            nested.and_then(|v| v.as_u64()) == Some(256),
            nested,
            "256",
        )?;
        let offset_value = field("nested_offset");
        offset = Some(
            offset_value
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
                })?,
        );
    }
    let info = Bnb4bitInfo {
        quant_type: named,
        blocksize,
        double,
        out,
        inn,
    };
    Ok((info, offset))
}

/// Every part of 4-bit weight `key`, checked (dtypes, shapes, finite f32 values, maps) and
/// mapped without a copy.
fn read_parts(file: &Checkpoint, key: &str) -> Result<Bnb4bitParts> {
    let (info, offset) = read_state(file, key)?;
    let bad = |name: &str, reason: String| Error::BadTensor {
        path: file.path().to_path_buf(),
        key: name.to_string(),
        reason,
    };
    let n = info.out * info.inn;
    let nb = n.div_ceil(info.blocksize);
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
    // The codes' bytes, stored as u8 or, with `quant_storage` (FSDP-QLoRA), viewed as f16,
    // bf16 or f32 elements: the bytes are the same either way (never checked as floats).
    let bytes = n.div_ceil(2);
    let storage = match file.info(key) {
        Some((d @ (DType::F16 | DType::BF16 | DType::F32), _)) => d,
        _ => DType::U8,
    };
    let elements = bytes / storage.size_of();
    if elements * storage.size_of() != bytes {
        return Err(bad(
            key,
            format!(
                "{bytes} bytes of codes cannot be {storage} elements (quant_storage {storage} needs a multiple of {})",
                storage.size_of()
            ),
        ));
    }
    expect_part_of(file, key, storage, &[&[elements, 1], &[elements]])?;
    let mapped = file.shared_bytes(key)?;
    let len = mapped.len();
    let packed = Bytes::from_shared(Arc::new(mapped), 0..len).map_err(|source| Error::Quant {
        key: key.to_string(),
        source,
    })?;
    let map_key = format!("{key}.quant_map");
    let map = f32s(&part(&map_key, DType::F32, &[&[16]])?);
    let want = info.quant_type.levels();
    // Checked only: the weights are read with the quant type's own levels, which
    // bitsandbytes' kernels use whatever the file's map holds, as nibble's NF4 does.
    same_map(&map_key, &map, want, &info.quant_type.name().to_uppercase())?;
    let absmax_key = format!("{key}.absmax");
    let absmax = match offset {
        None => Absmax::Plain(part(&absmax_key, DType::F32, &[&[nb]])?),
        Some(offset) => {
            let codes = part(&absmax_key, DType::U8, &[&[nb]])?;
            let scale = part(
                &format!("{key}.nested_absmax"),
                DType::F32,
                &[&[nb.div_ceil(256)]],
            )?;
            let nested_map_key = format!("{key}.nested_quant_map");
            let nested_map = part(&nested_map_key, DType::F32, &[&[256]])?;
            same_map(
                &nested_map_key,
                &f32s(&nested_map),
                &dynamic_map(),
                "bitsandbytes' signed dynamic map",
            )?;
            Absmax::Double {
                codes,
                scale,
                offset,
            }
        }
    };
    Ok(Bnb4bitParts {
        info,
        packed,
        absmax,
    })
}

/// Little-endian f32 values of `bytes`.
fn f32s(bytes: &Bytes) -> Vec<f32> {
    bytes
        .as_slice()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads weight `key` stored in bitsandbytes' 4-bit layout (see the module docs) as an NF4
/// weight, plain or double-quantized, without copying its codes: `(weight, format, out, in)`.
/// Only NF4 with blocks of 64 runs from its codes ([`Bnb4bitInfo::is_native`]); the other
/// 4-bit weights are an error here and read by [`read_bnb_4bit_f32`].
pub fn read_bnb_4bit(
    file: &Checkpoint,
    key: &str,
) -> Result<(FrozenWeight, WeightFormat, usize, usize)> {
    let parts = read_parts(file, key)?;
    let info = parts.info;
    let Some(format) = info.native_format() else {
        return Err(Error::Unsupported {
            key: key.to_string(),
            what: format!(
                "{}: nibble's quantized formats hold bitsandbytes NF4 with blocks of 64 only (this weight can be read dequantized to f32)",
                info.describe()
            ),
        });
    };
    let quant = |source| Error::Quant {
        key: key.to_string(),
        source,
    };
    let m = match parts.absmax {
        Absmax::Plain(absmax) => {
            Nf4Matrix::from_parts(info.out, info.inn, parts.packed, absmax).map_err(quant)?
        }
        Absmax::Double {
            codes,
            scale,
            offset,
        } => {
            let offset = Bytes::from_f32(vec![offset]);
            Nf4Matrix::from_parts_double(info.out, info.inn, parts.packed, codes, offset, scale)
                .map_err(quant)?
        }
    };
    Ok((FrozenWeight::Nf4(Arc::new(m)), format, info.out, info.inn))
}

/// Reads any 4-bit weight `key` in bitsandbytes' layout (NF4 or FP4, any of its block sizes,
/// plain or double-quantized absmaxes) as the `[out, in]` f32 weight bitsandbytes computes
/// with: `levels[code] · absmax[block]` ([`QuantType::levels`]), the absmax of a
/// double-quantized block being `dynamic_map[code] · nested_absmax[group] + nested_offset`,
/// each step rounded to f32 as bitsandbytes' `dequantize_4bit` rounds it.
pub fn read_bnb_4bit_f32(file: &Checkpoint, key: &str) -> Result<Tensor> {
    let parts = read_parts(file, key)?;
    let info = parts.info;
    let n = info.out * info.inn;
    let nb = n.div_ceil(info.blocksize);
    let absmax: Vec<f32> = match &parts.absmax {
        Absmax::Plain(a) => f32s(a),
        Absmax::Double {
            codes,
            scale,
            offset,
        } => {
            let map = dynamic_map();
            let scale = f32s(scale);
            codes.as_slice()[..nb]
                .iter()
                .enumerate()
                .map(|(b, &c)| map[c as usize] * scale[b / 256] + offset)
                .collect()
        }
    };
    let packed = parts.packed.as_slice();
    let levels = info.quant_type.levels();
    let mut values = Vec::new();
    values
        .try_reserve_exact(n)
        .map_err(|_| Error::Unsupported {
            key: key.to_string(),
            what: format!("{n} f32 values do not fit in memory"),
        })?;
    values.extend((0..n).map(|i| {
        let byte = packed[i / 2];
        let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
        levels[code as usize] * absmax[i / info.blocksize]
    }));
    Tensor::from_vec(&[info.out, info.inn], values).map_err(|e| Error::BadTensor {
        path: file.path().to_path_buf(),
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// A JSON value for an error message (`none` when absent).
/// The dtype names `getattr(torch, name)` resolves to a `torch.dtype` (what a quant state's
/// `dtype` / `nested_dtype` may say).
const TORCH_DTYPES: &[&str] = &[
    "float32",
    "float",
    "float64",
    "double",
    "float16",
    "half",
    "bfloat16",
    "uint8",
    "int8",
    "int16",
    "short",
    "int32",
    "int",
    "int64",
    "long",
    "bool",
    "uint16",
    "uint32",
    "uint64",
    "complex64",
    "cfloat",
    "complex128",
    "cdouble",
    "float8_e4m3fn",
    "float8_e5m2",
];

fn fmt_value(v: Option<&serde_json::Value>) -> String {
    v.map_or("none".to_string(), |v| v.to_string())
}

/// The module of weight `key` (`0.weight` → `0`; a bare `weight` → ``), for the sibling
/// tensors bitsandbytes' 8-bit layout keeps beside it (`0.SCB`, `0.weight_format`).
fn module_of(key: &str) -> Option<&str> {
    if key == "weight" {
        return Some("");
    }
    key.strip_suffix(".weight")
}

/// The key of a sibling `name` of weight `key` (`0.weight`, `SCB` → `0.SCB`).
fn sibling(key: &str, name: &str) -> Option<String> {
    let module = module_of(key)?;
    Some(if module.is_empty() {
        name.to_string()
    } else {
        format!("{module}.{name}")
    })
}

/// Whether `file` holds weight `key` (`….weight`) in bitsandbytes' 8-bit layout: an int8
/// weight, or a row-scale tensor `SCB` beside it (`bnb.nn.Linear8bitLt`'s state dict, and what
/// `transformers` writes for a model loaded in 8 bits).
pub fn is_bnb_8bit(file: &Checkpoint, key: &str) -> bool {
    file.info(key).map(|(d, _)| d) == Some(DType::I8)
        || sibling(key, "SCB").is_some_and(|k| file.info(&k).is_some())
}

/// Reads weight `key` stored in bitsandbytes' 8-bit layout: `K` i8 `[out, in]` (the codes),
/// `SCB` f32 `[out]` (each row's absmax; bitsandbytes computes with `K · SCB / 127`), and
/// optionally `weight_format` (u8, 0: row-major, the only layout it writes on CPU). The codes
/// become nibble's per-row affine int8 ([`nibble_quant::Int8Matrix`], `code + 128` with scale
/// `SCB / 127` and zero point `-128 · scale`), the same memory as the file: its values differ
/// from bitsandbytes' by an f32 rounding (about 1e-7 of the row's absmax: one rounding step
/// near the absmax, 1.2e-7 at most in an audit). `(weight, out, in)`.
pub fn read_bnb_8bit(file: &Checkpoint, key: &str) -> Result<(FrozenWeight, usize, usize)> {
    let bad = |name: &str, reason: String| Error::BadTensor {
        path: file.path().to_path_buf(),
        key: name.to_string(),
        reason,
    };
    let scb_key = sibling(key, "SCB")
        .ok_or_else(|| bad(key, "an 8-bit weight must be a module's `weight`".into()))?;
    let (out, inn) = match file.info(key) {
        None => {
            return Err(Error::MissingKey {
                path: file.path().to_path_buf(),
                key: key.to_string(),
            })
        }
        Some((DType::I8, &[o, i])) => (o, i),
        Some((DType::I8, s)) => {
            return Err(bad(
                key,
                format!("an 8-bit weight is [out, in], found shape {s:?}"),
            ))
        }
        Some((d, _)) => {
            return Err(Error::DType {
                path: file.path().to_path_buf(),
                key: key.to_string(),
                expected: format!("i8 (bitsandbytes' 8-bit codes, since `{scb_key}` is there)"),
                found: d,
            })
        }
    };
    if file.info(&scb_key).is_none() {
        return Err(bad(
            key,
            format!("an int8 weight without `{scb_key}` (bitsandbytes' row scales): its values are unknown"),
        ));
    }
    expect_part_of(file, &scb_key, DType::F32, &[&[out]])?;
    let scb = file.shared_bytes(&scb_key)?;
    check_finite(file, &scb_key, DType::F32, &scb)?;
    if let Some(format_key) = sibling(key, "weight_format").filter(|k| file.info(k).is_some()) {
        let (dtype, shape) = file.info(&format_key).expect("present");
        let value = match (dtype, shape) {
            (DType::U8, [] | [1]) => file.bytes(&format_key)?.first().copied(),
            _ => None,
        };
        if value != Some(0) {
            return Err(bad(
                &format_key,
                format!(
                    "must be the u8 0 (row-major codes, bitsandbytes' CPU layout), found {dtype} {shape:?}{}",
                    value.map_or(String::new(), |v| format!(" = {v}"))
                ),
            ));
        }
    }
    let codes: Vec<u8> = file
        .bytes(key)?
        .iter()
        .map(|&c| (c as i8 as i16 + 128) as u8)
        .collect();
    let scales: Vec<f32> = scb
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) / 127.0)
        .collect();
    let zeros: Vec<f32> = scales.iter().map(|s| -128.0 * s).collect();
    let m = nibble_quant::Int8Matrix::from_parts(
        out,
        inn,
        Bytes::from_vec(codes),
        Bytes::from_f32(scales),
        Bytes::from_f32(zeros),
    )
    .map_err(|source| Error::Quant {
        key: key.to_string(),
        source,
    })?;
    Ok((FrozenWeight::Int8(Arc::new(m)), out, inn))
}
