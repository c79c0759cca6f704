//! Frozen weights in every storage format, kept as their concrete types so that a
//! model can write them to a file part by part, and read them back from a memory-mapped file
//! without copying the packed bytes.
//!
//! File layout of a weight `K` (e.g. `model.0.model.0.weight`), one safetensors tensor per part:
//!
//! Shapes round up: a partial last block (in `[out, in]` for q4 and lower, of the flattened
//! weight for nf4) has its own scale, and an odd element count leaves half a byte of padding.
//!
//! | format | tensors |
//! |---|---|
//! | `f16` | `K` f16 `[out, in]` |
//! | `q4` | `K.q4.packed` u8 `[out, ⌈in/2⌉]` (element 2i in the low nibble), `K.q4.norm` f16 `[out, ⌈in/16⌉]` |
//! | `nf4`, `nf4_dq` | bitsandbytes' layout, written and read by [`crate::bnb`]: `K` u8 `[⌈out·in/2⌉, 1]`, `K.absmax`, `K.quant_map`, (`nf4_dq`) `K.nested_absmax`, `K.nested_quant_map`, and the JSON `K.quant_state.bitsandbytes__nf4` |
//! | `nf4` (read only; written before bitsandbytes' layout) | `K.nf4.packed` u8 `[⌈out·in/2⌉]` (first element in the high nibble), `K.nf4.absmax` f32 `[⌈out·in/64⌉]` |
//! | `nf4_dq` (read only) | `K.nf4.packed`, `K.nf4.absmax_codes` u8 `[⌈out·in/64⌉]`, `K.nf4.absmax_offset` f32 `[1]`, `K.nf4.absmax_scale` f32 `[⌈⌈out·in/64⌉/256⌉]` |
//! | `int8` | `K.int8.codes` u8 `[out, in]`, `K.int8.scale` f32 `[out]`, `K.int8.min` f32 `[out]`: w ≈ min + scale·code |
//! | `lower` | `K.lower.bits` u8 `[out]` (3 or 4 per row), `K.lower.codes` u8 `[Σ row bytes]`, `K.lower.scale` f16 `[out, ⌈in/128⌉]`, `K.lower.min` f16 `[out, ⌈in/128⌉]`: w ≈ min + scale·code |

use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use crate::format::WeightFormat;
use nibble_quant::{Bytes, Int8Matrix, LowerMatrix, Nf4Matrix, Q4FlatMatrix, Q4Matrix, QuantError};
use nibble_tensor::{f16, HalfTensor, PackedWeight, Tensor, WeightMatrix};
use std::borrow::Cow;
use std::sync::Arc;

/// A frozen `out x in` weight in one of the storage formats.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// f32 packed once into the GEMM's panels for inference (what
    /// `nibble_nn::Linear::pack_for_inference` makes of a trainable f32 weight); written to a
    /// file as the plain f32 tensor `K`, which loads back as a trainable weight.
    F32(Arc<PackedWeight>),
    /// f16 (`half_precision`, `lora`).
    F16(Arc<HalfTensor>),
    /// The reference's 4-bit format (`low_precision`, `qlora`).
    Q4(Arc<Q4Matrix>),
    /// The reference's 4-bit format where its blocks of 16 over the flattened weight cross
    /// rows (`in` not a multiple of 16, `out·in` one): format `q4` as well.
    Q4Flat(Arc<Q4FlatMatrix>),
    /// NF4, plain or double-quantized.
    Nf4(Arc<Nf4Matrix>),
    /// Int8 affine per row.
    Int8(Arc<Int8Matrix>),
    /// Mixed 3/4-bit rows (`lower_precision`).
    Lower(Arc<LowerMatrix>),
}

/// Whether Q4 of an `[out, in]` weight takes the reference's blocks over the flattened weight
/// ([`Q4FlatMatrix`]): where they cross rows (`in` not a multiple of 16) and the reference can
/// quantize it at all (`out·in` a multiple of 16). Elsewhere [`Q4Matrix`]'s blocks within rows
/// are the same blocks, or (`out·in` not a multiple of 16) the reference has none.
pub fn needs_flat_q4(shape: &[usize]) -> bool {
    matches!(shape, [o, i] if i % 16 != 0 && (o * i) % 16 == 0)
}

/// One part of a weight as written to a file: name, dtype, shape, bytes.
pub type Part<'a> = (String, DType, Vec<usize>, Cow<'a, [u8]>);

/// A plain f32 tensor as a [`Part`] borrowing its data.
pub fn f32_part(key: String, tensor: &Tensor) -> Part<'_> {
    (
        key,
        DType::F32,
        tensor.shape().to_vec(),
        Cow::Borrowed(bytemuck::cast_slice(tensor.data())),
    )
}

/// Writes `parts` (in order) and `metadata` as a safetensors file at `path`, through
/// [`write_safetensors`](crate::write_safetensors).
pub fn write_parts(
    path: &std::path::Path,
    parts: &[Part<'_>],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let entries: Vec<(String, DType, Vec<usize>, &[u8])> = parts
        .iter()
        .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_ref()))
        .collect();
    crate::write_safetensors(path, &entries, metadata)
}

fn quant_err(key: &str) -> impl FnOnce(QuantError) -> Error + '_ {
    move |source| match source {
        QuantError::NonFinite {
            row, col, value, ..
        }
        | QuantError::Overflow {
            row, col, value, ..
        } => Error::Unstorable {
            key: key.to_string(),
            row,
            col,
            value,
            source: Box::new(source),
        },
        source => Error::Quant {
            key: key.to_string(),
            source,
        },
    }
}

/// `w` rounded to f16 (ties to even), or a [`QuantError`] naming the first element (row and
/// column of a 2-D weight, else its flat index as the column) that is NaN or infinite, or
/// finite but beyond f16's range (it would round to an infinity).
fn to_f16(w: &Tensor) -> std::result::Result<HalfTensor, QuantError> {
    const OP: &str = "f16_convert";
    let half = HalfTensor::from_f32(w);
    let Some(k) = half.data().iter().position(|h| !h.is_finite()) else {
        return Ok(half);
    };
    let (row, col) = match w.shape() {
        &[_, cols] if cols > 0 => (k / cols, k % cols),
        _ => (0, k),
    };
    let value = w.data()[k];
    Err(if value.is_finite() {
        QuantError::Overflow {
            op: OP,
            row,
            col,
            value,
            storage: "f16",
            what: format!("weight {value} is beyond f16's range (±65504)"),
        }
    } else {
        QuantError::NonFinite {
            op: OP,
            row,
            col,
            value,
        }
    })
}

impl FrozenWeight {
    /// Converts the f32 weight `key` into `format` (not `F32`, which is not frozen storage).
    /// A weight the format cannot hold is an [`Error::Unstorable`] naming `key`, the element
    /// (row and column; the group in the message) and its value: a NaN or infinity in any format, a finite value
    /// that f16 would turn into an infinity (beyond ±65504) for `F16`, and a block scale,
    /// minimum or row range that overflows its storage for `Q4`, `Int8` and `Lower`.
    pub fn quantize(format: WeightFormat, key: &str, w: &Tensor) -> Result<Self> {
        let e = quant_err(key);
        Ok(match format {
            WeightFormat::F16 => FrozenWeight::F16(Arc::new(to_f16(w).map_err(e)?)),
            WeightFormat::Q4 if needs_flat_q4(w.shape()) => {
                FrozenWeight::Q4Flat(Arc::new(Q4FlatMatrix::quantize(w).map_err(e)?))
            }
            WeightFormat::Q4 => FrozenWeight::Q4(Arc::new(Q4Matrix::quantize(w).map_err(e)?)),
            WeightFormat::Nf4 => FrozenWeight::Nf4(Arc::new(Nf4Matrix::quantize(w).map_err(e)?)),
            WeightFormat::Nf4Dq => {
                FrozenWeight::Nf4(Arc::new(Nf4Matrix::quantize_double(w).map_err(e)?))
            }
            WeightFormat::Int8 => FrozenWeight::Int8(Arc::new(Int8Matrix::quantize(w).map_err(e)?)),
            WeightFormat::Lower => {
                FrozenWeight::Lower(Arc::new(LowerMatrix::quantize(w).map_err(e)?))
            }
            WeightFormat::F32 => {
                return Err(Error::Unsupported {
                    key: key.to_string(),
                    what: "f32 weights train; they are not frozen storage".to_string(),
                })
            }
        })
    }

    /// The weight as a matrix the kernels multiply by (a cheap handle).
    pub fn matrix(&self) -> Arc<dyn WeightMatrix> {
        match self {
            FrozenWeight::F32(w) => w.clone(),
            FrozenWeight::F16(w) => w.clone(),
            FrozenWeight::Q4(w) => w.clone(),
            FrozenWeight::Q4Flat(w) => w.clone(),
            FrozenWeight::Nf4(w) => w.clone(),
            FrozenWeight::Int8(w) => w.clone(),
            FrozenWeight::Lower(w) => w.clone(),
        }
    }

    /// The storage format.
    pub fn format(&self) -> WeightFormat {
        match self {
            FrozenWeight::F32(_) => WeightFormat::F32,
            FrozenWeight::F16(_) => WeightFormat::F16,
            FrozenWeight::Q4(_) | FrozenWeight::Q4Flat(_) => WeightFormat::Q4,
            FrozenWeight::Nf4(w) if w.is_double_quantized() => WeightFormat::Nf4Dq,
            FrozenWeight::Nf4(_) => WeightFormat::Nf4,
            FrozenWeight::Int8(_) => WeightFormat::Int8,
            FrozenWeight::Lower(_) => WeightFormat::Lower,
        }
    }

    /// Elements the weight counts as in the parameter table. Q4 counts what the PyTorch
    /// reference stores (an int8 code buffer `[n/16, 8]` and f16 norms `[n/16, 1]`), so `stats`
    /// reproduces the homework's table; other storages count their `out x in` weights.
    pub fn stored_elements(&self) -> usize {
        let m = self.matrix();
        let n = m.out_features() * m.in_features();
        match self {
            FrozenWeight::Q4(_) | FrozenWeight::Q4Flat(_) => n / 2 + n / 16,
            _ => n,
        }
    }

    /// The parts to write for weight `key`, in the layout of the module docs.
    pub fn parts(&self, key: &str) -> Vec<Part<'_>> {
        let m = self.matrix();
        let (o, i) = (m.out_features(), m.in_features());
        match self {
            FrozenWeight::F32(w) => vec![(
                key.to_string(),
                DType::F32,
                vec![o, i],
                Cow::Owned(bytemuck::cast_slice::<f32, u8>(w.to_f32().data()).to_vec()),
            )],
            FrozenWeight::F16(w) => vec![(
                key.to_string(),
                DType::F16,
                vec![o, i],
                Cow::Borrowed(bytemuck::cast_slice::<f16, u8>(w.data())),
            )],
            FrozenWeight::Q4(w) => vec![
                part(
                    key,
                    "q4.packed",
                    DType::U8,
                    vec![o, i.div_ceil(2)],
                    w.packed_bytes(),
                ),
                part(
                    key,
                    "q4.norm",
                    DType::F16,
                    vec![o, i.div_ceil(16)],
                    w.norm_bytes(),
                ),
            ],
            // The reference's own flattened buffers: 1-D parts tell this layout from the
            // per-row one.
            FrozenWeight::Q4Flat(w) => vec![
                part(
                    key,
                    "q4.packed",
                    DType::U8,
                    vec![o * i / 2],
                    w.packed_bytes(),
                ),
                part(key, "q4.norm", DType::F16, vec![o * i / 16], w.norm_bytes()),
            ],
            // bitsandbytes' own layout, which it and transformers load (see `crate::bnb`).
            FrozenWeight::Nf4(w) => crate::bnb::parts(key, w),
            FrozenWeight::Int8(w) => {
                let (codes, scales, zeros) = w.parts();
                vec![
                    part(key, "int8.codes", DType::U8, vec![o, i], codes.as_slice()),
                    part(key, "int8.scale", DType::F32, vec![o], scales.as_slice()),
                    part(key, "int8.min", DType::F32, vec![o], zeros.as_slice()),
                ]
            }
            FrozenWeight::Lower(w) => {
                let (bits, codes, scales, mins) = w.parts();
                vec![
                    part(key, "lower.bits", DType::U8, vec![o], bits.as_slice()),
                    part(
                        key,
                        "lower.codes",
                        DType::U8,
                        vec![codes.len()],
                        codes.as_slice(),
                    ),
                    part(
                        key,
                        "lower.scale",
                        DType::F16,
                        vec![o, i.div_ceil(128)],
                        scales.as_slice(),
                    ),
                    part(
                        key,
                        "lower.min",
                        DType::F16,
                        vec![o, i.div_ceil(128)],
                        mins.as_slice(),
                    ),
                ]
            }
        }
    }

    /// Reads weight `key` of `format`, `[out, in]`, from a quantized checkpoint without copying
    /// its packed bytes (they stay in the memory-mapped file), in the layout [`FrozenWeight::parts`]
    /// writes (NF4 in bitsandbytes' layout, or nibble's earlier one). Every part's dtype and
    /// shape is checked, and scales must be finite.
    pub fn from_checkpoint(
        file: &Checkpoint,
        format: WeightFormat,
        key: &str,
        out: usize,
        inn: usize,
    ) -> Result<Self> {
        if matches!(format, WeightFormat::Nf4 | WeightFormat::Nf4Dq)
            && crate::bnb::is_bnb_4bit(file, key)
        {
            let (weight, stored, o, i) = crate::bnb::read_bnb_4bit(file, key)?;
            if (stored, o, i) != (format, out, inn) {
                return Err(Error::BadTensor {
                    path: file.path().to_path_buf(),
                    key: key.to_string(),
                    reason: format!(
                        "bitsandbytes' layout holds {stored} [{o}, {i}], expected {format} [{out}, {inn}]"
                    ),
                });
            }
            return Ok(weight);
        }
        let n = out.checked_mul(inn).ok_or_else(|| Error::Unsupported {
            key: key.to_string(),
            what: format!("[{out}, {inn}] overflows"),
        })?;
        let get = |suffix: &str, dtype: DType, shape: &[usize]| -> Result<Bytes> {
            let name = if suffix.is_empty() {
                key.to_string()
            } else {
                format!("{key}.{suffix}")
            };
            expect_part(file, &name, dtype, shape)?;
            let mapped = file.shared_bytes(&name)?;
            let len = mapped.len();
            if matches!(dtype, DType::F16 | DType::F32) {
                check_finite(file, &name, dtype, &mapped)?;
            }
            Bytes::from_shared(Arc::new(mapped), 0..len).map_err(quant_err(key))
        };
        let e = quant_err(key);
        Ok(match format {
            WeightFormat::F16 => {
                let t = file.half(key, Some(&[out, inn]))?;
                FrozenWeight::F16(Arc::new(t))
            }
            WeightFormat::Q4
                if needs_flat_q4(&[out, inn])
                    && file
                        .info(&format!("{key}.q4.packed"))
                        .is_some_and(|(_, shape)| shape.len() == 1) =>
            {
                FrozenWeight::Q4Flat(Arc::new(
                    Q4FlatMatrix::from_parts(
                        out,
                        inn,
                        get("q4.packed", DType::U8, &[n / 2])?,
                        get("q4.norm", DType::F16, &[n / 16])?,
                    )
                    .map_err(e)?,
                ))
            }
            WeightFormat::Q4 => FrozenWeight::Q4(Arc::new(
                Q4Matrix::from_parts(
                    out,
                    inn,
                    get("q4.packed", DType::U8, &[out, inn.div_ceil(2)])?,
                    get("q4.norm", DType::F16, &[out, inn.div_ceil(16)])?,
                )
                .map_err(e)?,
            )),
            WeightFormat::Nf4 => FrozenWeight::Nf4(Arc::new(
                Nf4Matrix::from_parts(
                    out,
                    inn,
                    get("nf4.packed", DType::U8, &[n.div_ceil(2)])?,
                    get("nf4.absmax", DType::F32, &[n.div_ceil(64)])?,
                )
                .map_err(e)?,
            )),
            WeightFormat::Nf4Dq => FrozenWeight::Nf4(Arc::new(
                Nf4Matrix::from_parts_double(
                    out,
                    inn,
                    get("nf4.packed", DType::U8, &[n.div_ceil(2)])?,
                    get("nf4.absmax_codes", DType::U8, &[n.div_ceil(64)])?,
                    get("nf4.absmax_offset", DType::F32, &[1])?,
                    get(
                        "nf4.absmax_scale",
                        DType::F32,
                        &[n.div_ceil(64).div_ceil(256)],
                    )?,
                )
                .map_err(e)?,
            )),
            WeightFormat::Int8 => FrozenWeight::Int8(Arc::new(
                Int8Matrix::from_parts(
                    out,
                    inn,
                    get("int8.codes", DType::U8, &[out, inn])?,
                    get("int8.scale", DType::F32, &[out])?,
                    get("int8.min", DType::F32, &[out])?,
                )
                .map_err(e)?,
            )),
            WeightFormat::Lower => {
                let codes_len = match file.info(&format!("{key}.lower.codes")) {
                    Some((_, [len])) => *len,
                    _ => 0, // expect_part below names what is wrong
                };
                FrozenWeight::Lower(Arc::new(
                    LowerMatrix::from_parts(
                        out,
                        inn,
                        get("lower.bits", DType::U8, &[out])?,
                        get("lower.codes", DType::U8, &[codes_len])?,
                        get("lower.scale", DType::F16, &[out, inn.div_ceil(128)])?,
                        get("lower.min", DType::F16, &[out, inn.div_ceil(128)])?,
                    )
                    .map_err(e)?,
                ))
            }
            WeightFormat::F32 => {
                return Err(Error::Unsupported {
                    key: key.to_string(),
                    what: "f32 is not a quantized format".to_string(),
                })
            }
        })
    }
}

/// Metadata key recording the `[out, in]` shape of quantized weight `key` (value `"out,in"`):
/// the packed parts of some formats do not tell it on their own.
pub fn shape_metadata_key(key: &str) -> String {
    format!("nibble.shape.{key}")
}

/// The part that tells which format weight `key` is stored in, one per format (`f16` is a
/// plain tensor and so not listed).
const FORMAT_MARKERS: [(WeightFormat, &str); 5] = [
    (WeightFormat::Q4, "q4.packed"),
    (WeightFormat::Nf4Dq, "nf4.absmax_codes"),
    (WeightFormat::Nf4, "nf4.absmax"),
    (WeightFormat::Int8, "int8.codes"),
    (WeightFormat::Lower, "lower.codes"),
];

impl FrozenWeight {
    /// The quantized format weight `key` is stored in, told by its parts (`None` when `file`
    /// holds no quantized parts of `key`, e.g. a plain tensor `key`).
    pub fn stored_format(file: &Checkpoint, key: &str) -> Option<WeightFormat> {
        if crate::bnb::is_bnb_4bit(file, key) {
            return crate::bnb::part_format(file, key);
        }
        FORMAT_MARKERS
            .iter()
            .find(|(_, suffix)| file.info(&format!("{key}.{suffix}")).is_some())
            .map(|(format, _)| *format)
    }

    /// `[out, in]` of quantized weight `key` of `format`: from bitsandbytes' JSON state for its
    /// layout, else from the metadata entry
    /// [`shape_metadata_key`] when the writer left one, else from the parts (`out`, when the
    /// caller knows it, e.g. from the bias, settles the flattened NF4 layout).
    pub fn stored_shape(
        file: &Checkpoint,
        format: WeightFormat,
        key: &str,
        out: Option<usize>,
    ) -> Result<(usize, usize)> {
        let bad = |what: String| Error::BadTensor {
            path: file.path().to_path_buf(),
            key: key.to_string(),
            reason: what,
        };
        if crate::bnb::is_bnb_4bit(file, key) {
            let (_, _, o, i) = crate::bnb::read_bnb_4bit(file, key)?;
            return Ok((o, i));
        }
        if let Some(text) = file.metadata().get(&shape_metadata_key(key)) {
            let dims: Vec<usize> = text
                .split(',')
                .map(|d| d.trim().parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad(format!("metadata shape `{text}` is not \"out,in\"")))?;
            return match dims[..] {
                [o, i] => Ok((o, i)),
                _ => Err(bad(format!("metadata shape `{text}` is not \"out,in\""))),
            };
        }
        let part = |suffix: &str| file.info(&format!("{key}.{suffix}")).map(|(_, s)| s);
        let shape = match (format, out) {
            // (Checked products: a part of 0 rows may have any width, and a width of 2^63
            // doubled would wrap to a shape the parts do not hold.)
            (WeightFormat::Q4, _) => match part("q4.packed") {
                Some(&[o, half]) => half.checked_mul(2).map(|i| (o, i)),
                _ => None,
            },
            (WeightFormat::Int8, _) => match part("int8.codes") {
                Some(&[o, i]) => Some((o, i)),
                _ => None,
            },
            (WeightFormat::Lower, _) => match part("lower.scale") {
                Some(&[o, groups]) => groups.checked_mul(128).map(|i| (o, i)),
                _ => None,
            },
            (WeightFormat::Nf4 | WeightFormat::Nf4Dq, Some(o)) if o > 0 => match part("nf4.packed")
            {
                Some(&[half]) => half
                    .checked_mul(2)
                    .filter(|n| n % o == 0)
                    .map(|n| (o, n / o)),
                _ => None,
            },
            _ => None,
        };
        shape.ok_or_else(|| {
            bad(format!(
                "cannot tell the [out, in] shape of this {} weight (no `{}` metadata)",
                format.name(),
                shape_metadata_key(key)
            ))
        })
    }
}

/// Part `key.suffix` borrowing `bytes`.
fn part<'a>(key: &str, suffix: &str, dtype: DType, shape: Vec<usize>, bytes: &'a [u8]) -> Part<'a> {
    (
        format!("{key}.{suffix}"),
        dtype,
        shape,
        Cow::Borrowed(bytes),
    )
}

fn expect_part(file: &Checkpoint, name: &str, dtype: DType, shape: &[usize]) -> Result<()> {
    expect_part_of(file, name, dtype, &[shape])
}

/// An error unless `file` holds tensor `name` of `dtype` and one of `shapes` (the first is the
/// one an error names).
pub(crate) fn expect_part_of(
    file: &Checkpoint,
    name: &str,
    dtype: DType,
    shapes: &[&[usize]],
) -> Result<()> {
    match file.info(name) {
        None => Err(Error::MissingKey {
            path: file.path().to_path_buf(),
            key: name.to_string(),
        }),
        Some((found, _)) if found != dtype => Err(Error::DType {
            path: file.path().to_path_buf(),
            key: name.to_string(),
            expected: dtype.name().to_string(),
            found,
        }),
        Some((_, found)) if !shapes.contains(&found) => Err(Error::Shape {
            path: file.path().to_path_buf(),
            key: name.to_string(),
            expected: shapes.first().map_or_else(Vec::new, |s| s.to_vec()),
            found: found.to_vec(),
        }),
        Some(_) => Ok(()),
    }
}

pub(crate) fn check_finite(
    file: &Checkpoint,
    name: &str,
    dtype: DType,
    bytes: &[u8],
) -> Result<()> {
    let bad = match dtype {
        DType::F16 => bytes
            .chunks_exact(2)
            .position(|c| !f16::from_le_bytes([c[0], c[1]]).is_finite()),
        _ => bytes
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
    };
    match bad {
        None => Ok(()),
        Some(index) => Err(Error::BadTensor {
            path: file.path().to_path_buf(),
            key: name.to_string(),
            reason: format!("element {index} is NaN or infinite"),
        }),
    }
}
