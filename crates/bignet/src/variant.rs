//! The BigNet variants: one model, differing only in how its linear layers store and train
//! their weights.

pub use nibble_io::WeightFormat;
use std::fmt;
use std::str::FromStr;

/// A BigNet variant (the homework's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// f32 weights, everything trains.
    Bignet,
    /// f16 weights and biases, frozen; LayerNorms train.
    HalfPrecision,
    /// Frozen f16 base plus trainable f32 rank-32 LoRA adapters.
    Lora,
    /// Frozen 4-bit (Q4) weights, f32 biases; nothing trains.
    LowPrecision,
    /// Frozen Q4 base plus trainable LoRA adapters.
    Qlora,
    /// Under 4 bits per weight, whole model < 9 MB; nothing trains.
    LowerPrecision,
    /// Frozen NF4 weights.
    Nf4,
    /// Frozen NF4 weights with double-quantized statistics.
    Nf4Dq,
    /// Frozen int8 affine weights.
    Int8,
}

impl Variant {
    /// Every variant, in the order the tables list them.
    pub const ALL: [Variant; 9] = [
        Variant::Bignet,
        Variant::HalfPrecision,
        Variant::Lora,
        Variant::LowPrecision,
        Variant::Qlora,
        Variant::LowerPrecision,
        Variant::Nf4,
        Variant::Nf4Dq,
        Variant::Int8,
    ];

    /// The variant's name (`bignet`, `half_precision`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Bignet => "bignet",
            Variant::HalfPrecision => "half_precision",
            Variant::Lora => "lora",
            Variant::LowPrecision => "low_precision",
            Variant::Qlora => "qlora",
            Variant::LowerPrecision => "lower_precision",
            Variant::Nf4 => "nf4",
            Variant::Nf4Dq => "nf4_dq",
            Variant::Int8 => "int8",
        }
    }

    /// How the linear layers store their (base) weight.
    pub fn weight_format(self) -> WeightFormat {
        match self {
            Variant::Bignet => WeightFormat::F32,
            Variant::HalfPrecision | Variant::Lora => WeightFormat::F16,
            Variant::LowPrecision | Variant::Qlora => WeightFormat::Q4,
            Variant::LowerPrecision => WeightFormat::Lower,
            Variant::Nf4 => WeightFormat::Nf4,
            Variant::Nf4Dq => WeightFormat::Nf4Dq,
            Variant::Int8 => WeightFormat::Int8,
        }
    }

    /// Whether the variant carries LoRA adapters.
    pub fn has_lora(self) -> bool {
        matches!(self, Variant::Lora | Variant::Qlora)
    }

    /// Whether the LayerNorms train (only where the reference leaves them trainable).
    pub fn norms_train(self) -> bool {
        matches!(self, Variant::Bignet | Variant::HalfPrecision)
    }

    /// The variant a quantized checkpoint of `format` implies (LoRA-free).
    pub fn for_format(format: WeightFormat) -> Variant {
        match format {
            WeightFormat::F32 => Variant::Bignet,
            WeightFormat::F16 => Variant::HalfPrecision,
            WeightFormat::Q4 => Variant::LowPrecision,
            WeightFormat::Nf4 => Variant::Nf4,
            WeightFormat::Nf4Dq => Variant::Nf4Dq,
            WeightFormat::Int8 => Variant::Int8,
            WeightFormat::Lower => Variant::LowerPrecision,
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Variant::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
                format!(
                    "unknown variant `{s}` (expected one of: {})",
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
        for v in Variant::ALL {
            assert_eq!(v.name().parse::<Variant>().unwrap(), v);
            let f = v.weight_format();
            assert_eq!(WeightFormat::from_name(f.name()), Some(f));
        }
        assert!("bigger_net"
            .parse::<Variant>()
            .unwrap_err()
            .contains("qlora"));
    }
}
