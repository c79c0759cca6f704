//! Tensors of a state dict fetched by name under a prefix, with shape checks: the way layers are
//! built from a checkpoint.

use crate::error::{Error, Result};
use crate::layer_norm::LayerNorm;
use crate::linear::{FrozenBias, Linear, LinearBase};
use nibble_io::{Checkpoint, FrozenWeight, WeightFormat};
use nibble_tensor::Tensor;

/// A [`Checkpoint`] and a name prefix: `vb.pp("encoder").pp("0").get("weight", ..)` reads
/// `encoder.0.weight`.
#[derive(Debug, Clone)]
pub struct VarBuilder<'a> {
    file: &'a Checkpoint,
    prefix: String,
}

impl<'a> VarBuilder<'a> {
    /// A builder over `file` with no prefix.
    pub fn new(file: &'a Checkpoint) -> Self {
        VarBuilder {
            file,
            prefix: String::new(),
        }
    }

    /// The builder one level down: prefix `"<prefix><name>."`.
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        VarBuilder {
            file: self.file,
            prefix: format!("{}{}.", self.prefix, name.as_ref()),
        }
    }

    /// The module path this builder stands for (the prefix without its final dot; empty at the
    /// top).
    pub fn module_name(&self) -> &str {
        self.prefix.strip_suffix('.').unwrap_or(&self.prefix)
    }

    /// The state-dict key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The checkpoint read from.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.file
    }

    /// Whether the file holds a tensor `name` under the prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.file.info(&self.key(name)).is_some()
    }

    /// The stored shape of `name` (an error naming file and key if there is none).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let key = self.key(name);
        match self.file.info(&key) {
            Some((_, shape)) => Ok(shape.to_vec()),
            None => Err(nibble_io::Error::MissingKey {
                path: self.file.path().to_path_buf(),
                key,
            }
            .into()),
        }
    }

    /// Tensor `name` as f32 (f16 and bf16 widened), which must have `shape` (an error names
    /// file, key, expected and found shape) and hold finite values only (a NaN or infinity is
    /// an [`Error::NonFinite`] naming the key, the element's (row, col) or index and its value).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.finite(name, self.file.tensor_f32(&self.key(name), Some(shape))?)
    }

    /// `t`, read as tensor `name`, if every value is finite; else an [`Error::NonFinite`].
    fn finite(&self, name: &str, t: Tensor) -> Result<Tensor> {
        crate::error::check_finite(self.file.path(), &self.key(name), &t)?;
        Ok(t)
    }

    /// Tensor `name` as f32 with `shape` if the file holds it, `None` if it does not (a
    /// wrong shape or dtype, or a non-finite value, is an error, as in [`VarBuilder::get`]).
    pub fn optional(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        self.contains(name)
            .then(|| self.get(name, shape))
            .transpose()
    }

    /// Tensor `name` as f32, whatever its shape (finite values only, as [`VarBuilder::get`]).
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        self.finite(name, self.file.tensor_f32(&self.key(name), None)?)
    }

    /// The linear layer at this prefix: `weight` `[out, in]` and `bias` `[out]` (a layer whose
    /// file holds no `bias` has none, as `nn.Linear(.., bias=False)` saves), stored in
    /// `format`. A weight the file already holds quantized (a checkpoint written by
    /// [`Sequential::save`](crate::Sequential::save) or `bignet quantize`, or bitsandbytes'
    /// NF4 with blocks of 64 or 8-bit layout, see [`nibble_io::bnb`]) is used as stored,
    /// straight from the mapped file; asking for another format than the stored one (other
    /// than `F32`, "as stored") is an error. bitsandbytes' other 4-bit weights (FP4, other
    /// block sizes) are read as the f32 weight bitsandbytes computes with
    /// ([`nibble_io::bnb::read_bnb_4bit_f32`]) and then treated as a plain f32 weight. A NaN or
    /// infinite weight or bias (f32, f16 or bf16, before any quantization) is an
    /// [`Error::NonFinite`]; stored quantized weights have their scales checked when read.
    pub fn linear(&self, format: WeightFormat) -> Result<Linear> {
        let name = self.module_name().to_string();
        let wkey = self.key("weight");
        if nibble_io::bnb::is_bnb_4bit(self.file, &wkey)
            && !nibble_io::bnb::bnb_4bit_info(self.file, &wkey)?.is_native()
        {
            // bitsandbytes' FP4, or a block size other than 64: the f32 weight bitsandbytes
            // computes with, then as a plain f32 weight (`format` may quantize it).
            let weight = self.finite(
                "weight",
                nibble_io::bnb::read_bnb_4bit_f32(self.file, &wkey)?,
            )?;
            let out = weight.shape()[0];
            let bias = self.optional("bias", &[out])?;
            return Linear::from_f32(name, weight, bias, format);
        }
        let bnb = if nibble_io::bnb::is_bnb_4bit(self.file, &wkey) {
            // bitsandbytes' 4-bit layout (`bnb.nn.Linear4bit`'s state dict): NF4 as stored.
            Some(nibble_io::bnb::read_bnb_4bit(self.file, &wkey)?)
        } else if nibble_io::bnb::is_bnb_8bit(self.file, &wkey) {
            // bitsandbytes' 8-bit layout (`bnb.nn.Linear8bitLt`): int8 codes, row scales.
            let (weight, out, inn) = nibble_io::bnb::read_bnb_8bit(self.file, &wkey)?;
            Some((weight, WeightFormat::Int8, out, inn))
        } else {
            None
        };
        if let Some((weight, stored, out, _)) = bnb {
            self.check_stored_format(&wkey, stored, format)?;
            let bias = self
                .optional("bias", &[out])?
                .map(|b| FrozenBias::F32(b.into_vec()));
            return Ok(Linear {
                name,
                base: LinearBase::Frozen { weight, bias },
                lora: None,
            });
        }
        if let Some(weight) = self.weight_norm()? {
            let out = weight.shape()[0];
            let bias = self.optional("bias", &[out])?;
            return Linear::from_f32(name, weight, bias, format);
        }
        if self.contains("weight") {
            let weight = self.get_any("weight")?;
            let out = match weight.shape() {
                &[o, _] => o,
                s => {
                    return Err(Error::Structure {
                        file: self.file.path().to_path_buf(),
                        what: format!("`{wkey}`: a linear weight is [out, in], found shape {s:?}"),
                    })
                }
            };
            let bias = self.optional("bias", &[out])?;
            return Linear::from_f32(name, weight, bias, format);
        }
        let Some(stored) = FrozenWeight::stored_format(self.file, &wkey) else {
            return Err(nibble_io::Error::MissingKey {
                path: self.file.path().to_path_buf(),
                key: wkey,
            }
            .into());
        };
        self.check_stored_format(&wkey, stored, format)?;
        let out = match self
            .contains("bias")
            .then(|| self.shape("bias"))
            .transpose()?
        {
            None => None,
            Some(s) => match s[..] {
                [o] => Some(o),
                ref s => {
                    return Err(Error::Structure {
                        file: self.file.path().to_path_buf(),
                        what: format!("`{}`: a bias is [out], found shape {s:?}", self.key("bias")),
                    })
                }
            },
        };
        let (o, i) = FrozenWeight::stored_shape(self.file, stored, &wkey, out)?;
        if let Some(out) = out.filter(|&out| out != o) {
            return Err(Error::Structure {
                file: self.file.path().to_path_buf(),
                what: format!("`{wkey}` has {o} outputs but its bias has {out}"),
            });
        }
        let weight = FrozenWeight::from_checkpoint(self.file, stored, &wkey, o, i)?;
        let bias = self
            .optional("bias", &[o])?
            .map(|b| FrozenBias::F32(b.into_vec()));
        Ok(Linear {
            name,
            base: LinearBase::Frozen { weight, bias },
            lora: None,
        })
    }

    /// The weight of a layer under weight normalization, `W = g · v / ‖v‖`, if the file holds
    /// its two parts: `parametrizations.weight.original0` (g) and `original1` (v) of
    /// `torch.nn.utils.parametrizations.weight_norm`, or `weight_g` / `weight_v` of the older
    /// `torch.nn.utils.weight_norm`. v is `[out, in]`; g's shape says over what the norm runs
    /// (PyTorch's `dim`): `[out, 1]` each row (`dim=0`, the default), `[1, in]` each column
    /// (`dim=1`), `[]` or `[1, 1]` the whole matrix (`dim=None`). Computed in f64, rounded once;
    /// a lone part, other shapes, a zero norm (PyTorch's NaN) or non-finite values are errors
    /// naming the keys.
    pub fn weight_norm(&self) -> Result<Option<Tensor>> {
        let pairs = [
            (
                "parametrizations.weight.original0",
                "parametrizations.weight.original1",
            ),
            ("weight_g", "weight_v"),
        ];
        let Some((g_name, v_name)) = pairs
            .into_iter()
            .find(|(g, v)| self.contains(g) || self.contains(v))
        else {
            return Ok(None);
        };
        let structure = |what: String| Error::Structure {
            file: self.file.path().to_path_buf(),
            what,
        };
        let (gk, vk) = (self.key(g_name), self.key(v_name));
        if !(self.contains(g_name) && self.contains(v_name)) {
            return Err(structure(format!(
                "weight normalization needs both `{gk}` (g) and `{vk}` (v)"
            )));
        }
        if self.contains("weight") {
            return Err(structure(format!(
                "`{}` beside `{gk}` / `{vk}`: one weight stored twice",
                self.key("weight")
            )));
        }
        let v = self.get_any(v_name)?;
        let g = self.get_any(g_name)?;
        let &[out, inp] = v.shape() else {
            return Err(structure(format!(
                "`{vk}`: a linear weight is [out, in], found shape {:?}",
                v.shape()
            )));
        };
        // The norm's groups: each row, each column, or all; g holds one value per group.
        let (rows, cols) = match g.shape() {
            [o, 1] if *o == out => (true, false),
            [1, i] if *i == inp && inp != 1 => (false, true),
            [] | [1, 1] => (false, false),
            s => {
                return Err(structure(format!(
                    "`{gk}` has shape {s:?}: weight normalization of a [{out}, {inp}] weight \
                     takes g of [{out}, 1] (dim=0), [1, {inp}] (dim=1) or [] (dim=None)"
                )))
            }
        };
        let group = |i: usize, j: usize| match (rows, cols) {
            (true, _) => i,
            (_, true) => j,
            _ => 0,
        };
        let mut sq = vec![0.0f64; g.numel()];
        for (n, &x) in v.data().iter().enumerate() {
            sq[group(n / inp.max(1), n % inp.max(1))] += (x as f64) * (x as f64);
        }
        if let Some(k) = sq.iter().position(|&s| s == 0.0) {
            return Err(structure(format!(
                "`{vk}`: group {k} of the weight normalization has norm 0 (PyTorch gives NaN)"
            )));
        }
        let data: Vec<f32> = v
            .data()
            .iter()
            .enumerate()
            .map(|(n, &x)| {
                let k = group(n / inp.max(1), n % inp.max(1));
                (g.data()[k] as f64 * x as f64 / sq[k].sqrt()) as f32
            })
            .collect();
        let w = Tensor::from_vec(&[out, inp], data)?;
        crate::error::check_finite(self.file.path(), &vk, &w)?;
        Ok(Some(w))
    }

    /// An error unless a weight stored as `stored` can be read as `format` (itself, or `F32`:
    /// "as stored").
    fn check_stored_format(
        &self,
        wkey: &str,
        stored: WeightFormat,
        format: WeightFormat,
    ) -> Result<()> {
        if format != stored && format != WeightFormat::F32 {
            return Err(Error::Structure {
                file: self.file.path().to_path_buf(),
                what: format!(
                    "`{wkey}` is stored as {stored}; it cannot be read as {format} (re-quantizing a quantized weight is not supported)"
                ),
            });
        }
        Ok(())
    }

    /// The LayerNorm at this prefix: `weight` and `bias` `[dim]` (no `bias` in the file: a
    /// LayerNorm without one, as `nn.LayerNorm(dim, bias=False)` saves), finite.
    pub fn layer_norm(&self) -> Result<LayerNorm> {
        let weight = self.get_any("weight")?;
        let bias = self.optional("bias", weight.shape())?;
        LayerNorm::new(self.module_name(), weight, bias)
    }
}
