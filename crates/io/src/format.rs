//! The storage formats of a linear layer's weight, and the metadata key that names a quantized
//! checkpoint's format.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Metadata key (in a safetensors `__metadata__`) naming the weight format of a checkpoint
/// written by nibble (`f32`, `f16`, `q4`, `nf4`, `nf4_dq`, `int8`, `lower`).
pub const FORMAT_KEY: &str = "nibble.format";

/// How a linear layer's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// f32, trainable.
    F32,
    /// f16, frozen, computed in f32.
    F16,
    /// The reference's 4-bit blocks of 16 with one f16 absmax each.
    Q4,
    /// QLoRA's 4-bit NormalFloat, blocks of 64 with an f32 absmax.
    Nf4,
    /// NF4 with double-quantized block absmaxes.
    Nf4Dq,
    /// 8-bit affine, one scale and zero point per output row.
    Int8,
    /// The under-4-bit format of `lower_precision`.
    Lower,
}

impl WeightFormat {
    /// The name used in files and on the command line (`q4`, `nf4`, ...).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Q4 => "q4",
            WeightFormat::Nf4 => "nf4",
            WeightFormat::Nf4Dq => "nf4_dq",
            WeightFormat::Int8 => "int8",
            WeightFormat::Lower => "lower",
        }
    }

    /// Parses a name given by [`WeightFormat::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        WeightFormat::ALL.into_iter().find(|f| f.name() == name)
    }
}

impl WeightFormat {
    /// Every format, f32 first.
    pub const ALL: [WeightFormat; 7] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Q4,
        WeightFormat::Nf4,
        WeightFormat::Nf4Dq,
        WeightFormat::Int8,
        WeightFormat::Lower,
    ];

    /// The format `file` declares in `__metadata__["nibble.format"]`, if any (`None` for a
    /// plain state dict). An unknown name is an error naming the file.
    pub fn declared_by(file: &Checkpoint) -> Result<Option<WeightFormat>> {
        let Some(name) = file.metadata().get(FORMAT_KEY) else {
            return Ok(None);
        };
        WeightFormat::from_name(name)
            .map(Some)
            .ok_or_else(|| Error::Malformed {
                path: file.path().to_path_buf(),
                format: file.format(),
                reason: format!(
                "unknown {FORMAT_KEY} `{name}` (expected q4, nf4, nf4_dq, int8, lower, f16 or f32)"
            ),
            })
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        WeightFormat::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = WeightFormat::ALL.iter().map(|f| f.name()).collect();
            format!(
                "unknown weight format `{s}` (expected one of: {})",
                names.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in WeightFormat::ALL {
            assert_eq!(f.name().parse::<WeightFormat>().unwrap(), f);
            assert_eq!(f.to_string(), f.name());
        }
        assert!("q5".parse::<WeightFormat>().unwrap_err().contains("nf4_dq"));
    }
}
