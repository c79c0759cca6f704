//! Activation checkpointing: a segment of a model (any function of one [`Var`] built from
//! tape ops) whose forward keeps only its input; the backward runs the segment again on that
//! input, on a tape of its own, and back-propagates through the recomputation. The ops and
//! kernels are deterministic, so the recomputed activations, and with them every gradient, are
//! bit-identical to those of the same segment recorded normally.

use crate::error::{AutogradError, Result};
use crate::tape::{Op, Pending, Tape, Var};
use nibble_tensor::Tensor;
use std::fmt::Display;
use std::sync::Arc;

/// A checkpointed segment's recomputation, boxed so that its op can run it: records the
/// segment's ops on the tape it is given and returns its output, computed or not.
type Recompute = Box<dyn Fn(&Tape, &Var) -> Result<Pending, String> + Send>;

/// Backward of [`Tape::checkpoint`]: the segment's recomputation and its input, nothing else.
struct CheckpointOp {
    recompute: Recompute,
    x: Arc<Tensor>,
    x_tracked: bool,
}

impl Op for CheckpointOp {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        let CheckpointOp {
            recompute,
            x,
            x_tracked,
        } = *self;
        let tape = Tape::new();
        let x = if x_tracked {
            tape.leaf_shared(x)
        } else {
            Var::constant_shared(x)
        };
        let y = recompute(&tape, &x).map_err(|what| AutogradError::Checkpoint { what })?;
        let mut grads = tape.backward_from_pending(y, d_y)?;
        Ok(vec![grads.take(&x)])
    }
}

impl Tape {
    /// `segment(x)`, checkpointed: `segment` runs here on a tape of its own, whose records (the
    /// segment's saved activations) are dropped as soon as it returns, and the op records only
    /// `x` (shared, not copied); the backward runs `segment` again on `x` and back-propagates
    /// through it. The forward thus holds at most one segment's activations at a time, and the
    /// backward one segment's plus the inputs of the segments before it.
    /// Parameter gradients and the gradient of `x` are bit-identical to those of calling
    /// `segment(self, x)` directly, as long as `segment` computes the same thing each time it
    /// is called (every op of this crate does).
    ///
    /// `segment` holds what it needs (shared [`Param`](crate::Param)s, frozen weights behind
    /// `Arc`s), since it outlives this call, and is `Send`, as every op is. Recorded when `x` is tracked or `segment` uses a
    /// parameter that trains. [`Tape::checkpoint_with`] lets the recomputation skip the last
    /// products, whose outputs the backward does not read.
    ///
    /// ```
    /// use nibble_autograd::{Param, Tape, Var};
    /// use nibble_tensor::Tensor;
    /// let w = Param::new("w", Tensor::from_vec(&[2, 2], vec![1.0, -1.0, 0.5, 2.0]).unwrap(), true);
    /// let x = Var::constant(Tensor::from_vec(&[1, 2], vec![3.0, 4.0]).unwrap());
    /// let tape = Tape::new();
    /// let block = {
    ///     let w = w.clone();
    ///     move |t: &Tape, x: &Var| -> nibble_autograd::Result<Var> {
    ///         let h = t.linear(x, &w, None)?;
    ///         t.relu(&h)
    ///     }
    /// };
    /// let y = tape.checkpoint(&x, block).unwrap();
    /// let loss = tape.sum(&y).unwrap();
    /// tape.backward(&loss).unwrap();
    /// // y = relu([3 - 4, 1.5 + 8]) = [0, 9.5]: only the second row of w gets a gradient.
    /// assert_eq!(w.grad().as_ref().unwrap().data(), &[0.0, 0.0, 3.0, 4.0]);
    /// ```
    pub fn checkpoint<E>(
        &self,
        x: &Var,
        segment: impl Fn(&Tape, &Var) -> std::result::Result<Var, E> + Send + 'static,
    ) -> std::result::Result<Var, E>
    where
        E: From<AutogradError> + Display,
    {
        if !self.is_recording() {
            return segment(self, x);
        }
        let (y, trains) = run_once(x, &segment)?;
        let recompute: Recompute =
            Box::new(move |t, x| segment(t, x).map(Pending::from).map_err(|e| e.to_string()));
        Ok(self.record_checkpoint(x, y, trains, recompute)?)
    }

    /// [`Tape::checkpoint`] of a segment given twice: `forward` computes its output (here), and
    /// `recompute` (in the backward) records the same ops in the same order but may leave the
    /// last ones uncomputed ([`Tape::linear_pending`], [`Tape::linear_add_pending`],
    /// [`Tape::frozen_linear_pending`], [`Tape::add_pending`]): the backward reads a linear
    /// layer's input and a residual sum's nothing, so a segment ending in `linear → + input`
    /// skips its last product when it runs again. Gradients are those of `forward` recorded
    /// directly, bit for bit, as long as `recompute` records what `forward` does.
    ///
    /// ```
    /// use nibble_autograd::{Param, Tape, Var};
    /// use nibble_tensor::Tensor;
    /// let w = Param::new("w", Tensor::from_vec(&[2, 2], vec![1.0, -1.0, 0.5, 2.0]).unwrap(), true);
    /// let x = Var::constant(Tensor::from_vec(&[1, 2], vec![3.0, 4.0]).unwrap());
    /// let tape = Tape::new();
    /// // relu(x) + relu(x) W^T, whose backward reads relu(x) but not the product.
    /// let forward = {
    ///     let w = w.clone();
    ///     move |t: &Tape, x: &Var| -> nibble_autograd::Result<Var> {
    ///         let h = t.relu(x)?;
    ///         t.add(&t.linear(&h, &w, None)?, &h)
    ///     }
    /// };
    /// let recompute = {
    ///     let w = w.clone();
    ///     move |t: &Tape, x: &Var| {
    ///         let h = t.relu(x)?;
    ///         t.add_pending(t.linear_pending(&h, &w, None)?, &h)
    ///     }
    /// };
    /// let y = tape.checkpoint_with(&x, forward, recompute).unwrap();
    /// // relu(x) = [3, 4]; relu(x) W^T = [3 - 4, 1.5 + 8].
    /// assert_eq!(y.value().data(), &[-1.0 + 3.0, 9.5 + 4.0]);
    /// tape.backward(&tape.sum(&y).unwrap()).unwrap();
    /// assert_eq!(w.grad().as_ref().unwrap().data(), &[3.0, 4.0, 3.0, 4.0]);
    /// ```
    pub fn checkpoint_with<E>(
        &self,
        x: &Var,
        forward: impl FnOnce(&Tape, &Var) -> std::result::Result<Var, E>,
        recompute: impl Fn(&Tape, &Var) -> std::result::Result<Pending, E> + Send + 'static,
    ) -> std::result::Result<Var, E>
    where
        E: From<AutogradError> + Display,
    {
        if !self.is_recording() {
            return forward(self, x);
        }
        let (y, trains) = run_once(x, forward)?;
        let recompute: Recompute = Box::new(move |t, x| recompute(t, x).map_err(|e| e.to_string()));
        Ok(self.record_checkpoint(x, y, trains, recompute)?)
    }

    /// Records a checkpointed segment's op: its input `x` (shared) and `recompute`; the output
    /// `y` needs a gradient if `trains`.
    fn record_checkpoint(
        &self,
        x: &Var,
        y: Arc<Tensor>,
        trains: bool,
        recompute: Recompute,
    ) -> Result<Var> {
        let x_saved = x.shared();
        let x_tracked = x.is_tracked();
        self.record_shared("checkpoint", &[x], y, trains, move || {
            Box::new(CheckpointOp {
                recompute,
                x: x_saved,
                x_tracked,
            })
        })
    }
}

/// Runs a segment's forward on a tape of its own with recording on, only to learn whether its
/// output needs a gradient; its records (the segment's saved activations) are dropped right
/// after, so the forward holds at most one segment's activations. Returns the output and
/// whether it needs a gradient.
fn run_once<E>(
    x: &Var,
    forward: impl FnOnce(&Tape, &Var) -> std::result::Result<Var, E>,
) -> std::result::Result<(Arc<Tensor>, bool), E> {
    let inner = Tape::new();
    let x_inner = if x.is_tracked() {
        inner.leaf_shared(x.shared())
    } else {
        Var::constant_shared(x.shared())
    };
    let y = forward(&inner, &x_inner)?;
    let trains = y.is_tracked();
    Ok((y.shared(), trains))
}
