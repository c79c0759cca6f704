//! Elementwise ops: add (the residual) and ReLU.

use crate::error::Result;
use crate::tape::{Op, Tape, Var};
use nibble_tensor::Tensor;
use std::sync::Arc;

/// Backward of [`Tape::add`]: the gradient flows unchanged to both inputs.
struct AddOp;

impl Op for AddOp {
    fn name(&self) -> &'static str {
        "add"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(d_y.clone()), Some(d_y)])
    }
}

/// Backward of [`Tape::relu`]: `dX = dY · [y > 0]`. Keeps the output (which the next layer
/// keeps anyway), not the input as well.
struct ReluOp {
    y: Arc<Tensor>,
}

impl Op for ReluOp {
    fn name(&self) -> &'static str {
        "relu"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut d_x = d_y;
        // In place, in the buffer of dY. A select, not a conditional store, so that it vectorizes.
        d_x.data_mut()
            .iter_mut()
            .zip(self.y.data())
            .for_each(|(g, &y)| *g = if y > 0.0 { *g } else { 0.0 });
        Ok(vec![Some(d_x)])
    }
}

impl Tape {
    /// `a + b`, elementwise (same shapes).
    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        let y = a.value().add(b.value())?;
        self.record("add", &[a, b], y, false, || Box::new(AddOp))
    }

    /// `max(x, 0)`, elementwise.
    pub fn relu(&self, x: &Var) -> Result<Var> {
        let y = Arc::new(x.value().relu());
        let saved = Arc::clone(&y);
        // The op saves the same buffer the output Var holds: one allocation for both.
        self.record_shared("relu", &[x], y, false, move || {
            Box::new(ReluOp { y: saved })
        })
    }
}
