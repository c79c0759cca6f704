//! A frozen layer with a LoRA adapter recorded as one op (`Tape::frozen_linear_lora`, what
//! `Linear::forward` records) against the three records it replaced (`frozen_linear`, `linear`
//! for `A`, `linear_add` for `B`): the same output, the same `dA`, `dB` and `dX` bit for bit,
//! for every weight storage, batch sizes on both sides of the GEMV/GEMM switch, f32 and int8
//! activations, with `dX` written fresh and accumulated into a gradient gathered before. Also
//! the checkpointed (recorded-pending) form, and shape errors that name the op.

use nibble_autograd::{Bias, Param, Tape, Var};
use nibble_quant::act8::{with_activations, ActivationMode};
use nibble_quant::{Int8Matrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{HalfTensor, Rng, Tensor, WeightMatrix};
use std::sync::Arc;

/// The weight storages a frozen base can have.
fn weights(out: usize, inp: usize, rng: &mut Rng) -> Vec<Arc<dyn WeightMatrix>> {
    let w = Tensor::uniform(&[out, inp], -0.05, 0.05, rng);
    vec![
        Arc::new(w.clone()),
        Arc::new(HalfTensor::from_f32(&w)),
        Arc::new(Q4Matrix::quantize(&w).expect("quantizes")),
        Arc::new(Nf4Matrix::quantize(&w).expect("quantizes")),
        Arc::new(Int8Matrix::quantize(&w).expect("quantizes")),
    ]
}

/// What one path computed: y, dX, dA, dB.
struct Outcome {
    y: Vec<f32>,
    d_x: Vec<f32>,
    d_a: Vec<f32>,
    d_b: Vec<f32>,
}

/// Runs a layer on `x` (tracked), adds `x` to its output when `residual` (so `dX` is gathered
/// before the layer's backward), and back-propagates an MSE loss.
#[allow(clippy::too_many_arguments)]
fn run(
    fused: bool,
    w: &Arc<dyn WeightMatrix>,
    bias: &[f32],
    a: &Tensor,
    b: &Tensor,
    x: &Tensor,
    target: &Tensor,
    residual: bool,
) -> Outcome {
    let tape = Tape::new();
    let (pa, pb) = (
        Param::new("a", a.clone(), true),
        Param::new("b", b.clone(), true),
    );
    let xv = tape.leaf(x.clone());
    let y = if fused {
        tape.frozen_linear_lora(&xv, w, Some(Bias::F32(bias)), &pa, &pb)
            .expect("fused forward")
    } else {
        let base = tape
            .frozen_linear(&xv, w, Some(Bias::F32(bias)))
            .expect("base forward");
        let h = tape.linear(&xv, &pa, None).expect("A x");
        tape.linear_add(base, &h, &pb).expect("B h")
    };
    let y_bits = y.value().data().to_vec();
    let out = if residual {
        tape.add(&y, &xv).expect("residual")
    } else {
        y
    };
    let loss = tape.mse(&out, target).expect("loss");
    let grads = tape.backward(&loss).expect("backward");
    let grad = |p: &Param| p.grad().as_ref().expect("a gradient").data().to_vec();
    Outcome {
        y: y_bits,
        d_x: grads.get(&xv).expect("dX").data().to_vec(),
        d_a: grad(&pa),
        d_b: grad(&pb),
    }
}

fn same_bits(what: &str, case: &str, fused: &[f32], split: &[f32]) {
    assert_eq!(fused.len(), split.len(), "{case}: {what} lengths");
    for (k, (f, s)) in fused.iter().zip(split).enumerate() {
        assert_eq!(
            f.to_bits(),
            s.to_bits(),
            "{case}: {what}[{k}] fused {f} against split {s}"
        );
    }
}

#[test]
fn fused_record_matches_the_three_records_bit_for_bit() {
    let mut rng = Rng::new(7);
    // (out, in): square with a residual (dX gathered first), and not square.
    for &(out, inp, residual) in &[(64usize, 64usize, true), (48, 80, false)] {
        let r = 8;
        let a = Tensor::uniform(&[r, inp], -0.1, 0.1, &mut rng);
        let b = Tensor::uniform(&[out, r], -0.1, 0.1, &mut rng);
        let bias: Vec<f32> = (0..out).map(|_| rng.uniform(-0.5, 0.5)).collect();
        for w in weights(out, inp, &mut rng) {
            for mode in [ActivationMode::F32, ActivationMode::Int8] {
                for m in [1usize, 3, 16, 17, 64, 300] {
                    let x = Tensor::randn(&[m, inp], &mut rng);
                    let target = Tensor::randn(&[m, out], &mut rng);
                    let case = format!(
                        "{} {out}x{inp} m={m} {} residual={residual}",
                        w.format_name(),
                        mode.name()
                    );
                    let (f, s) = with_activations(mode, || {
                        (
                            run(true, &w, &bias, &a, &b, &x, &target, residual),
                            run(false, &w, &bias, &a, &b, &x, &target, residual),
                        )
                    });
                    same_bits("y", &case, &f.y, &s.y);
                    same_bits("dX", &case, &f.d_x, &s.d_x);
                    same_bits("dA", &case, &f.d_a, &s.d_a);
                    same_bits("dB", &case, &f.d_b, &s.d_b);
                    assert!(f.d_x.iter().all(|v| v.is_finite()), "{case}: dX finite");
                }
            }
        }
    }
}

#[test]
fn frozen_adapter_and_untracked_input_record_only_what_trains() {
    let mut rng = Rng::new(8);
    let (out, inp, r, m) = (32, 40, 4, 20);
    let w: Arc<dyn WeightMatrix> = Arc::new(Tensor::uniform(&[out, inp], -0.1, 0.1, &mut rng));
    let a = Param::new("a", Tensor::uniform(&[r, inp], -0.1, 0.1, &mut rng), false);
    let b = Param::new("b", Tensor::uniform(&[out, r], -0.1, 0.1, &mut rng), true);
    let tape = Tape::new();
    // Untracked x, frozen A: only dB is computed.
    let x = Var::constant(Tensor::randn(&[m, inp], &mut rng));
    let y = tape.frozen_linear_lora(&x, &w, None, &a, &b).unwrap();
    assert_eq!(tape.len(), 1);
    let loss = tape.sum(&y).unwrap();
    tape.backward(&loss).unwrap();
    assert!(a.grad().is_none());
    assert_eq!(b.grad().as_ref().unwrap().shape(), [out, r]);
    // Nothing trains and x is untracked: nothing recorded.
    b.set_requires_grad(false);
    let y = tape.frozen_linear_lora(&x, &w, None, &a, &b).unwrap();
    assert_eq!(y.shape(), [m, out]);
    assert_eq!(tape.len(), 0);
}

#[test]
fn pending_record_gives_the_gradients_of_the_computed_one() {
    let mut rng = Rng::new(9);
    let (out, inp, r, m) = (24, 24, 4, 33);
    let w: Arc<dyn WeightMatrix> = Arc::new(Tensor::uniform(&[out, inp], -0.1, 0.1, &mut rng));
    let a0 = Tensor::uniform(&[r, inp], -0.1, 0.1, &mut rng);
    let b0 = Tensor::uniform(&[out, r], -0.1, 0.1, &mut rng);
    let x = Tensor::randn(&[m, inp], &mut rng);
    let d_y = Tensor::randn(&[m, out], &mut rng);
    let grads = |pending: bool| {
        let tape = Tape::new();
        let (a, b) = (
            Param::new("a", a0.clone(), true),
            Param::new("b", b0.clone(), true),
        );
        let xv = tape.leaf(x.clone());
        let g = if pending {
            let y = tape.frozen_linear_lora_pending(&xv, &w, &a, &b).unwrap();
            tape.backward_from_pending(y, d_y.clone()).unwrap()
        } else {
            let y = tape.frozen_linear_lora(&xv, &w, None, &a, &b).unwrap();
            tape.backward_from(y, d_y.clone()).unwrap()
        };
        let d_x = g.get(&xv).unwrap().data().to_vec();
        let d_a = a.grad().as_ref().unwrap().data().to_vec();
        let d_b = b.grad().as_ref().unwrap().data().to_vec();
        (d_x, d_a, d_b)
    };
    assert_eq!(grads(true), grads(false));
}

#[test]
fn mismatched_adapter_shapes_are_errors_naming_the_op() {
    let mut rng = Rng::new(10);
    let w: Arc<dyn WeightMatrix> = Arc::new(Tensor::uniform(&[8, 12], -0.1, 0.1, &mut rng));
    let x = Var::constant(Tensor::randn(&[3, 12], &mut rng));
    let tape = Tape::new();
    let cases = [
        ([4, 12], [8, 5]), // B's rank is not A's
        ([4, 10], [8, 4]), // A's width is not the input's
        ([4, 12], [9, 4]), // B's height is not the output's
    ];
    for (a_shape, b_shape) in cases {
        let a = Param::new("a", Tensor::zeros(&a_shape), true);
        let b = Param::new("b", Tensor::zeros(&b_shape), true);
        let err = tape
            .frozen_linear_lora(&x, &w, None, &a, &b)
            .expect_err("shapes disagree")
            .to_string();
        assert!(
            err.contains("frozen_linear_lora"),
            "{a_shape:?} {b_shape:?}: {err}"
        );
        let err = tape
            .frozen_linear_lora_pending(&x, &w, &a, &b)
            .expect_err("shapes disagree")
            .to_string();
        assert!(
            err.contains("frozen_linear_lora"),
            "{a_shape:?} {b_shape:?}: {err}"
        );
    }
    let a = Param::new("a", Tensor::zeros(&[4, 12]), true);
    let b = Param::new("b", Tensor::zeros(&[8, 4]), true);
    let err = tape
        .frozen_linear_lora(&x, &w, Some(Bias::F32(&[0.0; 7])), &a, &b)
        .expect_err("bias of 7 for 8 outputs")
        .to_string();
    assert!(err.contains("bias"), "{err}");
}
