//! Classification data sets in a safetensors (or `.pth`) file: features `x_test` f32 `[N, F]`
//! (f64, f16 and bf16 rounded to f32, integer types such as raw u8 pixels converted as
//! `.float()` converts them; `[N, d1, d2, ...]`, such as images, flattened per row as
//! `nn.Flatten` flattens them) and labels `y_test` `[N]` or `[N, 1]` (class indices of any integer
//! type or bool, or whole numbers in a float type, as binary targets are often kept), and
//! optionally a training split
//! `x_train` / `y_train` of the same form.
//!
//! Everything is checked on reading — dtypes, ranks, that x and y have the same N, that the
//! test split has rows (the training split is checked for rows when asked for, by
//! [`Dataset::train`]), that every feature is finite and every label non-negative — and
//! against a model by
//! [`Dataset::check_fits`] (feature count, labels below the number of classes). Each error
//! names the file, the key, the index and the expected and found values.
//!
//! ```no_run
//! let data = nibble_io::Dataset::open("tests/data/digits.safetensors")?;
//! data.check_fits(64, 10)?;
//! println!("{} test rows of {} features", data.test.len(), data.features());
//! # Ok::<(), nibble_io::Error>(())
//! ```

use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use nibble_tensor::Tensor;
use std::path::{Path, PathBuf};

/// One split: features `[N, F]` and a class label per row.
#[derive(Debug, Clone)]
pub struct Split {
    /// Features, `[N, F]`, all finite.
    pub x: Tensor,
    /// Labels, `N` of them.
    pub y: Vec<usize>,
    /// The key of the features (`x_test`, ...), for messages.
    pub x_key: String,
    /// The key of the labels (`y_test`, ...), for messages.
    pub y_key: String,
    /// The file the split was read from, for messages.
    pub path: PathBuf,
}

impl Split {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when the split has no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Features per row.
    pub fn features(&self) -> usize {
        self.x.shape().get(1).copied().unwrap_or(0)
    }

    /// An error naming the file and the key (`x_train has no rows`) when the split has no
    /// rows: nothing can be trained or measured on it.
    pub fn require_rows(&self) -> Result<()> {
        if !self.is_empty() {
            return Ok(());
        }
        Err(Error::Data {
            path: self.path.clone(),
            key: self.x_key.clone(),
            index: None,
            what: format!(
                "{} has no rows (shape {:?}); expected at least one",
                self.x_key,
                self.x.shape()
            ),
        })
    }

    /// Rows `rows` of the split (features copied), e.g. one mini-batch.
    pub fn rows(&self, rows: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        let f = self.features();
        let data = self.x.data();
        let mut picked = Vec::with_capacity(rows.len() * f);
        let mut labels = Vec::with_capacity(rows.len());
        for &r in rows {
            let (Some(x), Some(&y)) = (data.get(r * f..(r + 1) * f), self.y.get(r)) else {
                return Err(Error::Data {
                    path: self.path.clone(),
                    key: self.x_key.clone(),
                    index: Some(r),
                    what: format!("expected a row index below {}, found {r}", self.len()),
                });
            };
            picked.extend_from_slice(x);
            labels.push(y);
        }
        let x = Tensor::from_vec(&[rows.len(), f], picked).map_err(|source| Error::Tensor {
            path: self.path.clone(),
            key: self.x_key.clone(),
            source,
        })?;
        Ok((x, labels))
    }
}

/// A data set: the test split and, if the file has one, the training split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file it was read from.
    pub path: PathBuf,
    /// `x_test` / `y_test`.
    pub test: Split,
    /// `x_train` / `y_train`, if present.
    pub train: Option<Split>,
}

impl Dataset {
    /// Opens and checks a data file (see the module docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Dataset> {
        Dataset::from_checkpoint(&Checkpoint::open(path)?)
    }

    /// Reads and checks the splits of an opened file. A test split with no rows is an error
    /// (every figure measured on it would be meaningless); an empty training split is read,
    /// and refused by [`Dataset::train`] when it is needed.
    pub fn from_checkpoint(file: &Checkpoint) -> Result<Dataset> {
        let test = read_split(file, "x_test", "y_test")?;
        test.require_rows()?;
        let train = match (file.contains("x_train"), file.contains("y_train")) {
            (false, false) => None,
            _ => Some(read_split(file, "x_train", "y_train")?),
        };
        if let Some(train) = &train {
            if train.features() != test.features() {
                return Err(Error::Data {
                    path: file.path().to_path_buf(),
                    key: "x_train".into(),
                    index: None,
                    what: format!(
                        "expected {} features per row, as x_test, found shape {:?}",
                        test.features(),
                        train.x.shape()
                    ),
                });
            }
        }
        Ok(Dataset {
            path: file.path().to_path_buf(),
            test,
            train,
        })
    }

    /// Features per row.
    pub fn features(&self) -> usize {
        self.test.features()
    }

    /// The training split, or an error naming the file when it has none or it has no rows.
    pub fn train(&self) -> Result<&Split> {
        let train = self.train.as_ref().ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: "x_train".into(),
        })?;
        train.require_rows()?;
        Ok(train)
    }

    /// Checks the data against a model taking `features` inputs and giving `classes` logits:
    /// every split's feature count, and every label below `classes`.
    pub fn check_fits(&self, features: usize, classes: usize) -> Result<()> {
        for split in std::iter::once(&self.test).chain(&self.train) {
            if split.features() != features {
                return Err(Error::Data {
                    path: self.path.clone(),
                    key: split.x_key.clone(),
                    index: None,
                    what: format!(
                        "expected {features} features per row (the model's input width), \
                         found shape {:?}",
                        split.x.shape()
                    ),
                });
            }
            if let Some((i, &label)) = split.y.iter().enumerate().find(|(_, &l)| l >= classes) {
                return Err(Error::Data {
                    path: self.path.clone(),
                    key: split.y_key.clone(),
                    index: Some(i),
                    what: format!(
                        "expected a label in 0..{classes} (the model's classes), found {label}"
                    ),
                });
            }
        }
        Ok(())
    }
}

fn read_split(file: &Checkpoint, x_key: &str, y_key: &str) -> Result<Split> {
    let path = file.path().to_path_buf();
    let data_error = |key: &str, index, expected: String, found: String| Error::Data {
        path: path.clone(),
        key: key.to_string(),
        index,
        what: format!("expected {expected}, found {found}"),
    };
    let (x_dtype, x_shape) = file.info(x_key).ok_or_else(|| Error::MissingKey {
        path: path.clone(),
        key: x_key.into(),
    })?;
    // f16, bf16 and f64 (NumPy's default) features are rounded to f32, and integer ones (raw
    // pixels as u8, ...) converted, as `torch.from_numpy(x).float()` would.
    let integer = matches!(
        x_dtype,
        DType::U8
            | DType::U16
            | DType::U32
            | DType::U64
            | DType::I8
            | DType::I16
            | DType::I32
            | DType::I64
    );
    if !integer && !matches!(x_dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
        return Err(Error::DType {
            path: path.clone(),
            key: x_key.into(),
            expected: "f32, f16, bf16, f64 or an integer type".into(),
            found: x_dtype,
        });
    }
    // `[N, d1, d2, ...]` (images) is read as `[N, d1·d2·...]`, row-major, as `nn.Flatten` (a
    // classifier's usual first layer, which holds no parameters) flattens it.
    let (n, features) = match *x_shape {
        [n, ref rest @ ..] if !rest.is_empty() => (
            n,
            rest.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)),
        ),
        _ => (0, None),
    };
    let Some(features) = features.filter(|_| x_shape.len() >= 2) else {
        return Err(data_error(
            x_key,
            None,
            "[N, features] (or [N, d1, d2, ...], flattened per row)".into(),
            format!("shape {x_shape:?}"),
        ));
    };
    let (y_dtype, y_shape) = file.info(y_key).ok_or_else(|| Error::MissingKey {
        path: path.clone(),
        key: y_key.into(),
    })?;
    // One label per row: `[N]`, or `[N, 1]` as targets of `BCEWithLogitsLoss` on `[N, 1]`
    // logits are often kept.
    if y_shape != [n] && y_shape != [n, 1] {
        return Err(data_error(
            y_key,
            None,
            format!("shape [{n}] or [{n}, 1] (one label per row of {x_key})"),
            format!("shape {y_shape:?}"),
        ));
    }
    let x = if integer {
        let count = n.checked_mul(features).ok_or_else(|| {
            data_error(
                x_key,
                None,
                "a size that fits in memory".into(),
                format!("shape {x_shape:?}"),
            )
        })?;
        integer_features(file, x_key, x_dtype, count)?
    } else {
        file.tensor_f32(x_key, None)?
    };
    let x = if x.shape() == [n, features] {
        x
    } else {
        Tensor::from_vec(&[n, features], x.into_vec()).map_err(|e| Error::BadTensor {
            path: path.clone(),
            key: x_key.into(),
            reason: e.to_string(),
        })?
    };
    if let Some(i) = x.data().iter().position(|v| !v.is_finite()) {
        let cols = x.shape()[1].max(1);
        return Err(data_error(
            x_key,
            Some(i),
            "finite features".into(),
            format!("{} at row {}, column {}", x.data()[i], i / cols, i % cols),
        ));
    }
    let y = labels(file, y_key, y_dtype, n)?;
    Ok(Split {
        x,
        y,
        x_key: x_key.into(),
        y_key: y_key.into(),
        path,
    })
}

/// The `n` labels at `key` (of dtype `dtype`) as class indices: integers of any width and
/// bools as they are, floats (f32, f16, bf16, f64: labels kept as float targets) where they
/// are whole numbers. A negative, fractional or non-finite label is an error naming its index
/// and value.
fn labels(file: &Checkpoint, key: &str, dtype: DType, n: usize) -> Result<Vec<usize>> {
    let bad = |i: usize, value: String| Error::Data {
        path: file.path().to_path_buf(),
        key: key.to_string(),
        index: Some(i),
        what: format!("expected a whole, non-negative label, found {value}"),
    };
    let bytes = file.bytes(key)?;
    let size = dtype.size_of();
    if bytes.len() != n.saturating_mul(size) {
        return Err(Error::BadTensor {
            path: file.path().to_path_buf(),
            key: key.into(),
            reason: format!("{} bytes of data for {n} labels of {dtype}", bytes.len()),
        });
    }
    let whole = |i: usize, v: f64| {
        if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < usize::MAX as f64 {
            Ok(v as usize)
        } else if v.is_finite() && v >= 0.0 && v.fract() == 0.0 {
            // Whole and non-negative, yet past any class index (1e20 read as f32).
            Err(Error::Data {
                path: file.path().to_path_buf(),
                key: key.to_string(),
                index: Some(i),
                what: format!("expected a class index, found {v}, beyond any index"),
            })
        } else {
            Err(bad(i, v.to_string()))
        }
    };
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => {
            let values = file.tensor_f32(key, None)?;
            let values = values.data();
            (0..n).map(|i| whole(i, f64::from(values[i]))).collect()
        }
        DType::F64 => bytes
            .chunks_exact(8)
            .enumerate()
            .map(|(i, c)| whole(i, f64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect(),
        _ => bytes
            .chunks_exact(size)
            .enumerate()
            .map(|(i, c)| {
                let value: i128 = match dtype {
                    DType::U8 | DType::Bool => i128::from(c[0]),
                    DType::U16 => i128::from(u16::from_le_bytes([c[0], c[1]])),
                    DType::U32 => i128::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    DType::U64 => i128::from(u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                    DType::I8 => i128::from(c[0] as i8),
                    DType::I16 => i128::from(i16::from_le_bytes([c[0], c[1]])),
                    DType::I32 => i128::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    _ => i128::from(i64::from_le_bytes(c.try_into().expect("8 bytes"))),
                };
                usize::try_from(value).map_err(|_| bad(i, value.to_string()))
            })
            .collect(),
    }
}

/// Integer features `key` (`count` of them, little-endian `dtype`) as f32, each rounded to the
/// nearest f32 as PyTorch's `.float()` rounds it, in a flat `[count]` tensor.
fn integer_features(file: &Checkpoint, key: &str, dtype: DType, count: usize) -> Result<Tensor> {
    let bytes = file.bytes(key)?;
    let size = dtype.size_of();
    if Some(bytes.len()) != count.checked_mul(size) {
        return Err(Error::BadTensor {
            path: file.path().to_path_buf(),
            key: key.into(),
            reason: format!("{} bytes for {count} values of {dtype}", bytes.len()),
        });
    }
    let values: Vec<f32> = bytes
        .chunks_exact(size)
        .map(|c| match dtype {
            DType::U8 => f32::from(c[0]),
            DType::U16 => f32::from(u16::from_le_bytes([c[0], c[1]])),
            DType::U32 => u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32,
            DType::U64 => {
                u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
            }
            DType::I8 => f32::from(c[0] as i8),
            DType::I16 => f32::from(i16::from_le_bytes([c[0], c[1]])),
            DType::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32,
            _ => i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32,
        })
        .collect();
    Tensor::from_vec(&[count], values).map_err(|e| Error::BadTensor {
        path: file.path().to_path_buf(),
        key: key.into(),
        reason: e.to_string(),
    })
}
