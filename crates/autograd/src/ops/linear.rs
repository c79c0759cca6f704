//! Linear layers: trainable (`X·Wᵀ + b` with f32 parameters) and frozen (any
//! [`WeightMatrix`] — f32, f16 or quantized — whose backward computes only `dX`, straight from
//! the stored weight, never a dense f32 copy of it).

use crate::error::Result;
use crate::param::Param;
use crate::tape::{Op, Pending, Tape, Var};
use half::slice::HalfFloatSliceExt;
use nibble_tensor::gemm::{MatRef, Segment};
use nibble_tensor::ops::PostOp;
use nibble_tensor::{
    f16, linear, linear_backward_input, linear_backward_weight, linear_low_rank_into, Tensor,
    TensorError, WeightMatrix,
};
use std::sync::Arc;

/// A frozen bias, in whatever precision it is stored.
#[derive(Debug, Clone, Copy)]
pub enum Bias<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 values, widened once per forward.
    F16(&'a [f16]),
}

impl<'a> Bias<'a> {
    /// The values as f32: borrowed as they are, or f16 widened into `wide` (the slice
    /// conversion, F16C 8 lanes at a time where the CPU has it).
    fn as_f32<'s>(self, wide: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match self {
            Bias::F32(b) => b,
            Bias::F16(b) => {
                wide.resize(b.len(), 0.0);
                b.convert_to_f32_slice(wide);
                wide
            }
        }
    }
}

/// Backward of [`Tape::linear`]: `dX = dY·W`, `dW += dYᵀ·X`, `db += Σ_rows dY`.
struct LinearOp {
    /// X `[m, in]`, kept only if W needs a gradient.
    x: Option<Arc<Tensor>>,
    /// W `[out, in]`, kept for dX only if X needs a gradient.
    w_for_dx: Option<Param>,
    /// W, if it needs a gradient.
    w_grad: Option<Param>,
    /// b `[out]`, if it needs a gradient.
    b_grad: Option<Param>,
    /// Whether the op also added a tracked-or-not `base` input (see [`Tape::linear_add`]),
    /// whose gradient is `dY` itself.
    adds_base: bool,
}

impl LinearOp {
    /// The record of `x · wᵀ (+ b)` (added onto a base with `adds_base`): keeps X only if W
    /// trains, W for dX only if X is tracked, and the parameters that train.
    fn boxed(x: &Var, w: &Param, b: Option<&Param>, adds_base: bool) -> Box<dyn Op> {
        let w_trains = w.requires_grad();
        Box::new(LinearOp {
            x: w_trains.then(|| x.shared()),
            w_for_dx: x.is_tracked().then(|| w.clone()),
            w_grad: w_trains.then(|| w.clone()),
            b_grad: b.filter(|b| b.requires_grad()).cloned(),
            adds_base,
        })
    }
}

impl Op for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        self.backward_into(d_y, None)
    }
    /// `dX += dY·W` straight into the gradient X has gathered so far (the residual stream's,
    /// for a LoRA adapter on a block's first layer), where there is one.
    fn backward_accumulate(
        self: Box<Self>,
        d_y: Tensor,
        acc: &mut [Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let x_at = usize::from(self.adds_base);
        let into = acc.get_mut(x_at).and_then(|a| a.as_mut());
        self.backward_into(d_y, into)
    }
}

impl LinearOp {
    /// The backward, adding `dX` into `d_x_acc` (which must then be `[m, in]`) where given
    /// (its place in the result is then `None`), else returning it.
    fn backward_into(
        self,
        d_y: Tensor,
        d_x_acc: Option<&mut Tensor>,
    ) -> Result<Vec<Option<Tensor>>> {
        // d_y: [m, out]
        let d_x = match (&self.w_for_dx, d_x_acc) {
            (Some(w), Some(acc)) => {
                let w = w.value();
                let (m, _) = d_y.dims2("linear backward")?;
                check_gathered("linear backward (gathered dX)", acc, m, w.in_features())?;
                w.matmul(d_y.data(), m, acc.data_mut(), true)?;
                None
            }
            (Some(w), None) => Some(linear_backward_input(&d_y, &*w.value())?),
            (None, _) => None,
        };
        if let (Some(w), Some(x)) = (&self.w_grad, &self.x) {
            accumulate_weight_grad(w, &d_y, x)?;
        }
        if let Some(b) = &self.b_grad {
            b.accumulate_grad(d_y.sum_rows()?)?;
        }
        if self.adds_base {
            Ok(vec![Some(d_y), d_x])
        } else {
            Ok(vec![d_x])
        }
    }
}

/// The gradient an input gathered before an op's backward, which must be `[m, width]` for the
/// op to add its `dX` into it; else the error naming `op` and both shapes.
fn check_gathered(op: &'static str, acc: &Tensor, m: usize, width: usize) -> Result<()> {
    if acc.shape() != [m, width] {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: acc.shape().to_vec(),
            rhs: vec![m, width],
        }
        .into());
    }
    Ok(())
}

/// `dW += dYᵀ·X` into `w`'s gradient (the first one written straight into a new tensor).
fn accumulate_weight_grad(w: &Param, d_y: &Tensor, x: &Tensor) -> Result<()> {
    // d_y: [m, out], x: [m, in] -> dW: [out, in]
    let mut slot = w.grad_mut();
    match slot.as_mut() {
        Some(d_w) => linear_backward_weight(d_y, x, d_w, true)?,
        None => {
            let shape = w.value().shape().to_vec();
            let mut d_w = Tensor::try_zeros(&shape)?;
            linear_backward_weight(d_y, x, &mut d_w, false)?;
            *slot = Some(d_w);
        }
    }
    Ok(())
}

/// Backward of [`Tape::frozen_linear_lora`]: a frozen weight `W` with a LoRA adapter,
/// `Y = X·Wᵀ + b + H·Bᵀ` where `H = X·Aᵀ`. `dB += dYᵀ·H`, `dH = dY·B`, `dA += dHᵀ·X`, and
/// `dX = dH·A + dY·W` in one pass over `dX` where `W`'s input gradient runs through the GEMM
/// ([`WeightMatrix::matmul_fused`]); the bits of the three records the layer took before
/// (`frozen_linear`, `linear` for `A`, `linear_add` for `B`).
///
/// On the 16-core Xeon (2026-12-04 11:52 UTC, two rounds in turns, `examples/train_profile.rs
/// lora`) one record in place of three took the LoRA step from 100.6 / 100.2 to 94.7 / 93.7
/// ms (the forward's `y += H·Bᵀ` and the backward's `dH·A` ride in the base product's pass,
/// and no `dH·A` buffer is allocated). Computing `dH`, `dB` and `dA` in one pass over blocks
/// of 64 rows of the batch (each block's three products on one thread, the blocks' shares of
/// `dA` and `dB` summed after) measured no faster there (12:03 UTC, three rounds: the
/// backward's LoRA layers 49.8 / 49.5 / 48.0 ms against 47.3 / 49.5 / 48.1), so the three
/// products stay pool-wide GEMMs.
struct FrozenLoraOp {
    w: Arc<dyn WeightMatrix>,
    /// `A` `[r, in]`.
    a: Param,
    /// `B` `[out, r]`.
    b: Param,
    /// X `[m, in]`, kept only if A trains.
    x: Option<Arc<Tensor>>,
    /// H `[m, r]`, kept only if B trains.
    h: Option<Arc<Tensor>>,
    x_tracked: bool,
}

impl Op for FrozenLoraOp {
    fn name(&self) -> &'static str {
        "frozen_linear_lora"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        self.backward_into(d_y, None)
    }
    /// `dX += dH·A + dY·W` straight into the gradient X has gathered so far (the residual
    /// stream's, for a block's first layer), where there is one.
    fn backward_accumulate(
        self: Box<Self>,
        d_y: Tensor,
        acc: &mut [Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let into = acc.first_mut().and_then(|a| a.as_mut());
        self.backward_into(d_y, into)
    }
}

impl FrozenLoraOp {
    /// The backward, adding `dX` into `d_x_acc` (which must then be `[m, in]`) where given
    /// (its place in the result is then `None`), else returning it.
    fn backward_into(
        self,
        d_y: Tensor,
        d_x_acc: Option<&mut Tensor>,
    ) -> Result<Vec<Option<Tensor>>> {
        // d_y: [m, out]; x: [m, in]; h, d_h: [m, r]; A: [r, in]; B: [out, r]
        let (m, _) = d_y.dims2("frozen_linear_lora backward")?;
        if let Some(h) = &self.h {
            accumulate_weight_grad(&self.b, &d_y, h)?;
        }
        if self.x.is_none() && !self.x_tracked {
            return Ok(vec![None]);
        }
        let d_h = linear_backward_input(&d_y, &*self.b.value())?;
        if let Some(x) = &self.x {
            accumulate_weight_grad(&self.a, &d_h, x)?;
        }
        if !self.x_tracked {
            return Ok(vec![None]);
        }
        let a = self.a.value();
        let (r, i) = a.dims2("frozen_linear_lora backward (A)")?;
        let a_rhs = MatRef::row_major(a.data(), r, i)?;
        let d_h_a = Segment {
            a: MatRef::row_major(d_h.data(), m, r)?,
            b: &a_rhs,
        };
        match d_x_acc {
            Some(acc) => {
                check_gathered("frozen_linear_lora backward (gathered dX)", acc, m, i)?;
                self.w
                    .matmul_fused(d_y.data(), m, acc.data_mut(), true, Some(d_h_a))?;
                Ok(vec![None])
            }
            None => {
                let mut d_x = Tensor::try_zeros(&[m, i])?;
                self.w
                    .matmul_fused(d_y.data(), m, d_x.data_mut(), false, Some(d_h_a))?;
                Ok(vec![Some(d_x)])
            }
        }
    }
}

/// Backward of [`Tape::frozen_linear`]: `dX = dY·W` from the stored weight; no dW.
struct FrozenLinearOp {
    w: Arc<dyn WeightMatrix>,
}

impl Op for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "frozen_linear"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        // d_y: [m, out] -> d_x: [m, in]
        let (m, _) = d_y.dims2("frozen_linear backward")?;
        let mut d_x = Tensor::try_zeros(&[m, self.w.in_features()])?;
        self.w.matmul(d_y.data(), m, d_x.data_mut(), false)?;
        Ok(vec![Some(d_x)])
    }
    /// `dX += dY·W` straight into the gradient X has gathered so far (a LoRA adapter's, whose
    /// backward runs first), where there is one: no new `[m, in]` buffer, no separate sum.
    fn backward_accumulate(
        self: Box<Self>,
        d_y: Tensor,
        acc: &mut [Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (m, _) = d_y.dims2("frozen_linear backward")?;
        match acc.first_mut() {
            Some(Some(d_x)) if d_x.shape() == [m, self.w.in_features()] => {
                self.w.matmul(d_y.data(), m, d_x.data_mut(), true)?;
                Ok(vec![None])
            }
            _ => self.backward(d_y),
        }
    }
}

impl Tape {
    /// `y[m, out] = x[m, in] · wᵀ + b` with f32 parameters `w` `[out, in]` and `b` `[out]`.
    /// Recorded if `x` is tracked or `w`/`b` require gradients; saves `x` only if `w` needs a
    /// gradient and `w` only if `x` does.
    pub fn linear(&self, x: &Var, w: &Param, b: Option<&Param>) -> Result<Var> {
        let y = {
            let w_value = w.value();
            let b_value = b.map(|b| b.value());
            linear(x.value(), &*w_value, b_value.as_ref().map(|b| b.data()))?
        };
        let w_trains = w.requires_grad();
        let b_trains = b.is_some_and(|b| b.requires_grad());
        self.record("linear", &[x], y, w_trains || b_trains, || {
            LinearOp::boxed(x, w, b, false)
        })
    }

    /// `y = base + x · wᵀ` (`base` `[m, out]`, `x` `[m, in]`, `w` `[out, in]`): a linear layer
    /// accumulated into an existing output, e.g. a LoRA update added to the base layer's output.
    /// Takes `base` by value and reuses its buffer when nothing else holds it, so no new output
    /// is allocated and no separate add pass runs.
    pub fn linear_add(&self, base: Var, x: &Var, w: &Param) -> Result<Var> {
        let (m, _) = x.value().dims2("linear_add")?;
        {
            let wv = w.value();
            if base.shape() != [m, wv.out_features()] || x.shape()[1] != wv.in_features() {
                return Err(TensorError::ShapeMismatch {
                    op: "linear_add",
                    lhs: base.shape().to_vec(),
                    rhs: vec![m, wv.out_features()],
                }
                .into());
            }
        }
        let base_tracked = base.clone_handle();
        let mut y = base.into_tensor();
        w.value()
            .matmul_t(x.value().data(), m, y.data_mut(), true)?;
        let w_trains = w.requires_grad();
        self.record("linear_add", &[&base_tracked, x], y, w_trains, || {
            LinearOp::boxed(x, w, None, true)
        })
    }

    /// [`Tape::linear`], recorded without computing `y` (see [`Pending`]): the same record,
    /// for a recomputation whose backward never reads `y`.
    pub fn linear_pending(&self, x: &Var, w: &Param, b: Option<&Param>) -> Result<Pending> {
        let (m, out) = {
            let (wv, bv) = (w.value(), b.map(|b| b.value()));
            let shape = linear_output_shape("linear_pending", x, wv.shape())?;
            if let Some(bv) = &bv {
                if bv.shape() != [shape.1] {
                    return Err(TensorError::ShapeMismatch {
                        op: "linear_pending (bias)",
                        lhs: wv.shape().to_vec(),
                        rhs: bv.shape().to_vec(),
                    }
                    .into());
                }
            }
            shape
        };
        let w_trains = w.requires_grad();
        let b_trains = b.is_some_and(|b| b.requires_grad());
        let holds_trainable = w_trains || b_trains;
        self.record_pending("linear", None, &[x], vec![m, out], holds_trainable, || {
            LinearOp::boxed(x, w, b, false)
        })
    }

    /// [`Tape::linear_add`] onto an output recorded without a value (see [`Pending`]), itself
    /// recorded without computing `y`: the same record, for a recomputation whose backward
    /// never reads `y`.
    pub fn linear_add_pending(&self, base: Pending, x: &Var, w: &Param) -> Result<Pending> {
        let shape = {
            let wv = w.value();
            let (m, out) = linear_output_shape("linear_add_pending", x, wv.shape())?;
            if base.shape() != [m, out] {
                return Err(TensorError::ShapeMismatch {
                    op: "linear_add_pending",
                    lhs: base.shape().to_vec(),
                    rhs: vec![m, out],
                }
                .into());
            }
            vec![m, out]
        };
        let w_trains = w.requires_grad();
        self.record_pending("linear_add", Some(base), &[x], shape, w_trains, || {
            LinearOp::boxed(x, w, None, true)
        })
    }

    /// `y[m, out] = x[m, in] · Wᵀ + bias + (x · Aᵀ) · Bᵀ`: a frozen weight of any storage with
    /// a LoRA adapter `a` `[r, in]`, `b` `[out, r]` (unscaled: fold a scale into `B`), as one
    /// record. The forward is [`linear_low_rank_into`] (inference's bits; one pass over `y`
    /// where the products run through the GEMM); the backward computes `dX = dH·A + dY·W` in
    /// one pass over `dX` likewise. Recorded if `x` is tracked or `a`/`b` require gradients;
    /// saves a handle to `w`, `x` (shared, no copy) if `a` trains and `x · Aᵀ` (`[m, r]`) if
    /// `b` does.
    ///
    /// ```
    /// use nibble_autograd::{Param, Tape, Var};
    /// use nibble_tensor::{Tensor, WeightMatrix};
    /// use std::sync::Arc;
    /// let tape = Tape::new();
    /// let w: Arc<dyn WeightMatrix> = Arc::new(Tensor::from_vec(&[1, 2], vec![1.0, 1.0]).unwrap());
    /// let a = Param::new("a", Tensor::from_vec(&[1, 2], vec![1.0, 0.0]).unwrap(), true);
    /// let b = Param::new("b", Tensor::from_vec(&[1, 1], vec![2.0]).unwrap(), true);
    /// let x = Var::constant(Tensor::from_vec(&[1, 2], vec![3.0, 4.0]).unwrap());
    /// let y = tape.frozen_linear_lora(&x, &w, None, &a, &b).unwrap(); // 7 + 2·3
    /// assert_eq!(y.value().data(), &[13.0]);
    /// tape.backward(&tape.sum(&y).unwrap()).unwrap();
    /// assert_eq!(b.grad().as_ref().unwrap().data(), &[3.0]); // h = 3
    /// assert_eq!(a.grad().as_ref().unwrap().data(), &[6.0, 8.0]); // dH = 2
    /// ```
    pub fn frozen_linear_lora(
        &self,
        x: &Var,
        w: &Arc<dyn WeightMatrix>,
        bias: Option<Bias<'_>>,
        a: &Param,
        b: &Param,
    ) -> Result<Var> {
        let (m, out) = lora_output_shape("frozen_linear_lora", x, w, a, b)?;
        let h = linear(x.value(), &*a.value(), None)?;
        let mut wide = Vec::new();
        let bias = bias.map(|b| b.as_f32(&mut wide));
        if let Some(bias) = bias {
            if bias.len() != out {
                return Err(TensorError::ShapeMismatch {
                    op: "frozen_linear_lora (bias)",
                    lhs: vec![out, w.in_features()],
                    rhs: vec![bias.len()],
                }
                .into());
            }
        }
        let mut y = Tensor::try_zeros(&[m, out])?;
        linear_low_rank_into(
            &**w,
            x.value().data(),
            m,
            y.data_mut(),
            bias,
            (h.data(), &*b.value()),
            PostOp::Identity,
        )?;
        let trains = a.requires_grad() || b.requires_grad();
        self.record("frozen_linear_lora", &[x], y, trains, || {
            FrozenLoraOp::boxed(x, w, a, b, h)
        })
    }

    /// [`Tape::frozen_linear_lora`], recorded without computing `y` (see [`Pending`]): the
    /// same record (the adapter's `x · Aᵀ`, which its backward reads, is computed), for a
    /// recomputation whose backward never reads `y`. A frozen bias has no gradient, so none is
    /// taken.
    pub fn frozen_linear_lora_pending(
        &self,
        x: &Var,
        w: &Arc<dyn WeightMatrix>,
        a: &Param,
        b: &Param,
    ) -> Result<Pending> {
        let (m, out) = lora_output_shape("frozen_linear_lora_pending", x, w, a, b)?;
        let h = linear(x.value(), &*a.value(), None)?;
        let trains = a.requires_grad() || b.requires_grad();
        self.record_pending(
            "frozen_linear_lora",
            None,
            &[x],
            vec![m, out],
            trains,
            || FrozenLoraOp::boxed(x, w, a, b, h),
        )
    }

    /// [`Tape::frozen_linear`], recorded without computing `y` (see [`Pending`]): the same
    /// record (a handle to `w`), for a recomputation whose backward never reads `y`. A frozen
    /// bias has no gradient, so none is taken.
    pub fn frozen_linear_pending(&self, x: &Var, w: &Arc<dyn WeightMatrix>) -> Result<Pending> {
        let (m, out) = linear_output_shape(
            "frozen_linear_pending",
            x,
            &[w.out_features(), w.in_features()],
        )?;
        self.record_pending("frozen_linear", None, &[x], vec![m, out], false, || {
            Box::new(FrozenLinearOp { w: Arc::clone(w) })
        })
    }

    /// `y[m, out] = x[m, in] · Wᵀ + bias` with a frozen weight of any storage. Recorded only if
    /// `x` is tracked, and then saves only a handle to `w` (no activation).
    pub fn frozen_linear(
        &self,
        x: &Var,
        w: &Arc<dyn WeightMatrix>,
        bias: Option<Bias<'_>>,
    ) -> Result<Var> {
        // The forward is the tensor crate's `linear` (shape checks, y started as the bias
        // rows); an f16 bias is widened once.
        let mut wide = Vec::new();
        let bias = bias.map(|b| b.as_f32(&mut wide));
        let y = linear(x.value(), &**w, bias)?;
        self.record("frozen_linear", &[x], y, false, || {
            Box::new(FrozenLinearOp { w: Arc::clone(w) })
        })
    }
}

impl FrozenLoraOp {
    /// The record of a LoRA'd frozen layer: keeps X only if A trains, H only if B trains.
    fn boxed(x: &Var, w: &Arc<dyn WeightMatrix>, a: &Param, b: &Param, h: Tensor) -> Box<dyn Op> {
        Box::new(FrozenLoraOp {
            w: Arc::clone(w),
            a: a.clone(),
            b: b.clone(),
            x: a.requires_grad().then(|| x.shared()),
            h: b.requires_grad().then(|| Arc::new(h)),
            x_tracked: x.is_tracked(),
        })
    }
}

/// `(m, out)` of a LoRA'd frozen layer on `x`: `w` `[out, in]`, `a` `[r, in]`, `b` `[out, r]`,
/// or the error naming `op` and the shapes that disagree.
fn lora_output_shape(
    op: &'static str,
    x: &Var,
    w: &Arc<dyn WeightMatrix>,
    a: &Param,
    b: &Param,
) -> Result<(usize, usize)> {
    let (m, out) = linear_output_shape(op, x, &[w.out_features(), w.in_features()])?;
    let (a_shape, b_shape) = (a.value().shape().to_vec(), b.value().shape().to_vec());
    match (&a_shape[..], &b_shape[..]) {
        (&[r, ai], &[bo, br]) if ai == w.in_features() && bo == out && br == r => Ok((m, out)),
        _ => Err(TensorError::ShapeMismatch {
            op,
            lhs: a_shape,
            rhs: b_shape,
        }
        .into()),
    }
}

/// `(m, out)` of `x[m, in] · Wᵀ` for a weight of shape `w_shape` `[out, in]`, or the error
/// naming `op` and both shapes.
fn linear_output_shape(op: &'static str, x: &Var, w_shape: &[usize]) -> Result<(usize, usize)> {
    match (x.shape(), w_shape) {
        (&[m, i], &[out, wi]) if i == wi => Ok((m, out)),
        _ => Err(TensorError::ShapeMismatch {
            op,
            lhs: x.shape().to_vec(),
            rhs: w_shape.to_vec(),
        }
        .into()),
    }
}
