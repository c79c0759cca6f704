//! The bridge to the quant crate: builds a frozen weight of a given format.

use crate::error::{Error, Result};
use crate::variant::WeightFormat;
use nibble_tensor::{HalfTensor, Tensor, WeightMatrix};
use std::sync::Arc;

/// Converts the f32 weight `key` into `format`'s storage.
pub fn quantize_weight(format: WeightFormat, key: &str, w: &Tensor) -> Result<Arc<dyn WeightMatrix>> {
    match format {
        WeightFormat::F32 => Ok(Arc::new(w.clone())),
        WeightFormat::F16 => Ok(Arc::new(HalfTensor::from_f32(w))),
        f => Err(Error::Model {
            what: format!("{key}: format {} not wired yet", f.name()),
        }),
    }
}

/// Elements a weight stores (codes and scales for quantized formats).
pub fn stored_elements(w: &dyn WeightMatrix) -> usize {
    w.out_features() * w.in_features()
}
