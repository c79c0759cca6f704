//! `Tape::checkpoint` gives the gradients of the same ops recorded directly, bit for bit: for a
//! tracked and an untracked input, nested segments, and segments that hold no trainable
//! parameter; a segment's error reaches the caller. A tape is `Send + Sync`: a forward recorded
//! on one thread back-propagates on a worker of the rayon pool with the same gradients.
//! `Tape::checkpoint_with`, whose recomputation records its last products without computing
//! them (`*_pending` ops), gives the same gradients too; the pending ops check shapes.

use nibble_autograd::{AutogradError, Param, Pending, Result, Tape, Var};
use nibble_tensor::{Rng, Tensor, WeightMatrix};
use std::sync::Arc;

fn params(rng: &mut Rng) -> (Param, Param, Param, Param) {
    let w1 = Param::new("w1", Tensor::randn(&[24, 16], rng), true);
    let b1 = Param::new("b1", Tensor::randn(&[24], rng), true);
    let w2 = Param::new("w2", Tensor::randn(&[16, 24], rng), true);
    let norm_w = Param::new("norm.w", Tensor::randn(&[16], rng), true);
    (w1, b1, w2, norm_w)
}

/// A residual block: `norm(x + W2 relu(W1 x + b1))`.
fn block(
    tape: &Tape,
    x: &Var,
    (w1, b1, w2, norm_w): &(Param, Param, Param, Param),
    bias: &Param,
) -> nibble_autograd::Result<Var> {
    let h = tape.linear(x, w1, Some(b1))?;
    let h = tape.relu(&h)?;
    let y = tape.linear(&h, w2, None)?;
    let y = tape.add(&y, x)?;
    tape.layer_norm(&y, norm_w, bias, 1e-5)
}

/// Loss, input gradient (if tracked) and every parameter gradient, as bits.
fn run(checkpoint: bool, nested: bool, track_input: bool) -> Vec<u32> {
    run_backward_on(checkpoint, nested, track_input, false)
}

/// [`run`], with the backward run on a worker of the rayon pool when `on_worker` is set.
fn run_backward_on(checkpoint: bool, nested: bool, track_input: bool, on_worker: bool) -> Vec<u32> {
    let mut rng = Rng::new(11);
    let ps = params(&mut rng);
    let bias = Param::new("norm.b", Tensor::zeros(&[16]), true);
    let x = Tensor::randn(&[37, 16], &mut rng);
    let tape = Tape::new();
    let input = if track_input {
        tape.leaf(x)
    } else {
        Var::constant(x)
    };
    let mut h = input.clone();
    for _ in 0..3 {
        h = if checkpoint {
            let (ps, bias) = (ps.clone(), bias.clone());
            tape.checkpoint(&h, move |t: &Tape, x: &Var| {
                if nested {
                    let (ps2, bias2) = (ps.clone(), bias.clone());
                    let y = t.checkpoint(x, move |t: &Tape, x: &Var| block(t, x, &ps2, &bias2))?;
                    block(t, &y, &ps, &bias)
                } else {
                    block(t, x, &ps, &bias)
                }
            })
            .unwrap()
        } else if nested {
            let y = block(&tape, &h, &ps, &bias).unwrap();
            block(&tape, &y, &ps, &bias).unwrap()
        } else {
            block(&tape, &h, &ps, &bias).unwrap()
        };
    }
    let loss = tape.mean(&h).unwrap();
    let mut bits = vec![loss.value().item().unwrap().to_bits()];
    drop(h);
    let grads = if on_worker {
        rayon::scope(|_| {
            assert!(rayon::current_thread_index().is_some());
            tape.backward(&loss)
        })
    } else {
        tape.backward(&loss)
    }
    .unwrap();
    assert_eq!(tape.len(), 0);
    if let Some(g) = grads.get(&input) {
        bits.extend(g.data().iter().map(|v| v.to_bits()));
    }
    for p in [&ps.0, &ps.1, &ps.2, &ps.3, &bias] {
        bits.extend(
            p.grad()
                .as_ref()
                .unwrap()
                .data()
                .iter()
                .map(|v| v.to_bits()),
        );
    }
    bits
}

#[test]
fn checkpointed_gradients_are_bit_identical() {
    for nested in [false, true] {
        for track_input in [false, true] {
            let plain = run(false, nested, track_input);
            let checkpointed = run(true, nested, track_input);
            assert!(
                plain == checkpointed,
                "nested {nested}, tracked input {track_input}"
            );
        }
    }
}

#[test]
fn a_tape_recorded_here_back_propagates_on_a_pool_worker() {
    for checkpoint in [false, true] {
        let here = run(checkpoint, true, true);
        let on_worker = run_backward_on(checkpoint, true, true, true);
        assert!(here == on_worker, "checkpoint {checkpoint}");
    }
}

#[test]
fn a_segment_of_frozen_ops_on_an_untracked_input_records_nothing() {
    let tape = Tape::new();
    let x = Var::constant(Tensor::from_vec(&[1, 2], vec![-1.0, 2.0]).unwrap());
    let y = tape.checkpoint(&x, |t: &Tape, x: &Var| t.relu(x)).unwrap();
    assert!(!y.is_tracked());
    assert_eq!(tape.len(), 0);
    assert_eq!(y.value().data(), &[0.0, 2.0]);
}

#[test]
fn a_failing_segment_reports_its_error() {
    let tape = Tape::new();
    let x = tape.leaf(Tensor::zeros(&[2, 3]));
    let other = Var::constant(Tensor::zeros(&[3, 2]));
    let err = tape
        .checkpoint(&x, move |t: &Tape, x: &Var| t.add(x, &other))
        .unwrap_err();
    assert!(matches!(err, AutogradError::Tensor(_)), "{err}");
}

/// The parameters of [`adapter_block`] and [`linear_block`]: a trainable layer, a frozen one
/// with a rank-2 adapter, and a trainable square layer.
#[derive(Clone)]
struct TailParams {
    w1: Param,
    b1: Param,
    frozen: Arc<dyn WeightMatrix>,
    lora_a: Param,
    lora_b: Param,
    w2: Param,
    b2: Param,
}

fn tail_params(rng: &mut Rng) -> TailParams {
    TailParams {
        w1: Param::new("w1", Tensor::randn(&[24, 16], rng), true),
        b1: Param::new("b1", Tensor::randn(&[24], rng), true),
        frozen: Arc::new(Tensor::randn(&[16, 24], rng)),
        lora_a: Param::new("lora_a", Tensor::randn(&[2, 24], rng), true),
        lora_b: Param::new("lora_b", Tensor::randn(&[16, 2], rng), true),
        w2: Param::new("w2", Tensor::randn(&[16, 16], rng), true),
        b2: Param::new("b2", Tensor::randn(&[16], rng), true),
    }
}

/// `x + frozen(r) + B A r` with `r = relu(W1 x + b1)`: computed, or (`pending`) with the last
/// products and the sum recorded only.
fn adapter_block(tape: &Tape, x: &Var, p: &TailParams, pending: bool) -> Result<Ended> {
    let r = tape.relu(&tape.linear(x, &p.w1, Some(&p.b1))?)?;
    if pending {
        let y = tape.frozen_linear_pending(&r, &p.frozen)?;
        let h = tape.linear(&r, &p.lora_a, None)?;
        let y = tape.linear_add_pending(y, &h, &p.lora_b)?;
        return Ok(Ended::Pending(tape.add_pending(y, x)?));
    }
    let y = tape.frozen_linear(&r, &p.frozen, None)?;
    let h = tape.linear(&r, &p.lora_a, None)?;
    let y = tape.linear_add(y, &h, &p.lora_b)?;
    Ok(Ended::Value(tape.add_owned(y, x)?))
}

/// `W2 relu(x) + b2 + x`: computed, or (`pending`) with the product and the sum recorded only.
fn linear_block(tape: &Tape, x: &Var, p: &TailParams, pending: bool) -> Result<Ended> {
    let r = tape.relu(x)?;
    if pending {
        let y = tape.linear_pending(&r, &p.w2, Some(&p.b2))?;
        return Ok(Ended::Pending(tape.add_pending(y, x)?));
    }
    let y = tape.linear(&r, &p.w2, Some(&p.b2))?;
    Ok(Ended::Value(tape.add(&y, x)?))
}

/// A block's output, computed or recorded only.
enum Ended {
    Value(Var),
    Pending(Pending),
}

type Block = fn(&Tape, &Var, &TailParams, bool) -> Result<Ended>;

/// Loss, input gradient (if tracked) and every parameter gradient, as bits, of
/// `adapter → linear → adapter` blocks recorded directly or checkpointed with recomputations
/// that skip their last products.
fn run_pending(checkpoint: bool, track_input: bool) -> Vec<u32> {
    let mut rng = Rng::new(5);
    let p = tail_params(&mut rng);
    let x = Tensor::randn(&[29, 16], &mut rng);
    let tape = Tape::new();
    let input = if track_input {
        tape.leaf(x)
    } else {
        Var::constant(x)
    };
    let mut h = input.clone();
    let blocks: [Block; 3] = [adapter_block, linear_block, adapter_block];
    for block in blocks {
        let value = |ended: Result<Ended>| -> Result<Var> {
            match ended? {
                Ended::Value(v) => Ok(v),
                Ended::Pending(_) => unreachable!("a forward computes its output"),
            }
        };
        let pending = |ended: Result<Ended>| -> Result<Pending> {
            match ended? {
                Ended::Pending(p) => Ok(p),
                Ended::Value(v) => Ok(v.into()),
            }
        };
        h = if checkpoint {
            let p2 = p.clone();
            tape.checkpoint_with(
                &h,
                |t, x| value(block(t, x, &p, false)),
                move |t, x| pending(block(t, x, &p2, true)),
            )
            .unwrap()
        } else {
            value(block(&tape, &h, &p, false)).unwrap()
        };
    }
    let loss = tape.mean(&tape.relu(&h).unwrap()).unwrap();
    let mut bits = vec![loss.value().item().unwrap().to_bits()];
    drop(h);
    let grads = tape.backward(&loss).unwrap();
    assert_eq!(tape.len(), 0);
    if let Some(g) = grads.get(&input) {
        bits.extend(g.data().iter().map(|v| v.to_bits()));
    }
    for param in [&p.w1, &p.b1, &p.lora_a, &p.lora_b, &p.w2, &p.b2] {
        let grad = param.grad();
        bits.extend(grad.as_ref().unwrap().data().iter().map(|v| v.to_bits()));
    }
    bits
}

#[test]
fn recomputations_that_skip_their_last_products_give_the_same_gradients() {
    for track_input in [false, true] {
        let plain = run_pending(false, track_input);
        let checkpointed = run_pending(true, track_input);
        assert!(plain == checkpointed, "tracked input {track_input}");
    }
}

#[test]
fn add_owned_gives_the_bits_of_add_in_the_buffer_of_its_first_input() {
    let mut rng = Rng::new(3);
    let tape = Tape::new();
    let a = tape.leaf(Tensor::randn(&[5, 7], &mut rng));
    let b = tape.leaf(Tensor::randn(&[5, 7], &mut rng));
    let want = tape.add(&a, &b).unwrap();
    let a_buffer = a.value().data().as_ptr();
    let a_plus_b = tape.add_owned(a.clone(), &b).unwrap();
    // `a` is still held here, so the sum went to a new buffer, with the same bits.
    assert_ne!(a_plus_b.value().data().as_ptr(), a_buffer);
    assert_eq!(a_plus_b.value().data(), want.value().data());
    let c = Var::constant(Tensor::randn(&[5, 7], &mut rng));
    let c_buffer = c.value().data().as_ptr();
    let want = c.value().add(b.value()).unwrap();
    let got = tape.add_owned(c, &b).unwrap();
    assert_eq!(got.value().data().as_ptr(), c_buffer);
    assert_eq!(got.value().data(), want.data());
    // Both sums pass the gradient on to both of their inputs.
    let loss = tape.sum(&tape.add(&got, &a_plus_b).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    assert_eq!(grads.get(&a).unwrap().data(), &[1.0; 35]);
    assert_eq!(grads.get(&b).unwrap().data(), &[2.0; 35]);
    let d = Var::constant(Tensor::zeros(&[5, 6]));
    assert!(tape.add_owned(d, &b).is_err());
}

#[test]
fn pending_ops_check_shapes_and_record_what_a_gradient_flows_through() {
    let mut rng = Rng::new(9);
    let p = tail_params(&mut rng);
    let tape = Tape::new();
    let x = tape.leaf(Tensor::randn(&[3, 16], &mut rng));
    let wide = Var::constant(Tensor::randn(&[3, 24], &mut rng));
    let y = tape.linear_pending(&x, &p.w2, Some(&p.b2)).unwrap();
    assert_eq!(y.shape(), &[3, 16]);
    assert!(y.is_tracked());
    // Shapes that do not fit are errors naming the op.
    let err = tape.linear_pending(&wide, &p.w2, None).unwrap_err();
    assert!(err.to_string().contains("linear_pending"), "{err}");
    let err = tape.linear_pending(&x, &p.w2, Some(&p.b1)).unwrap_err();
    assert!(err.to_string().contains("linear_pending (bias)"), "{err}");
    let err = tape.frozen_linear_pending(&x, &p.frozen).unwrap_err();
    assert!(err.to_string().contains("frozen_linear_pending"), "{err}");
    let frozen = tape.frozen_linear_pending(&wide, &p.frozen).unwrap();
    // An untracked input through a frozen weight: nothing to record.
    assert!(!frozen.is_tracked());
    let h = tape.linear(&wide, &p.lora_a, None).unwrap();
    let err = tape.linear_add_pending(y, &h, &p.lora_b).unwrap();
    assert_eq!(err.shape(), &[3, 16]);
    let short = tape.linear_pending(&x.clone(), &p.w2, None).unwrap();
    let err = tape
        .linear_add_pending(short, &tape.linear(&x, &p.w2, None).unwrap(), &p.lora_b)
        .unwrap_err();
    assert!(err.to_string().contains("linear_add_pending"), "{err}");
    let err = tape.add_pending(frozen, &wide).unwrap_err();
    assert!(err.to_string().contains("add_pending"), "{err}");
    // The backward checks the gradient's shape, and runs from the record.
    let end = tape
        .add_pending(tape.linear_pending(&x, &p.w2, None).unwrap(), &x)
        .unwrap();
    let err = tape
        .backward_from_pending(end, Tensor::zeros(&[3, 15]))
        .unwrap_err();
    assert!(err.to_string().contains("backward_from_pending"), "{err}");
    let end = tape
        .add_pending(tape.linear_pending(&x, &p.w2, None).unwrap(), &x)
        .unwrap();
    let grads = tape
        .backward_from_pending(end, Tensor::full(&[3, 16], 1.0))
        .unwrap();
    // dx = 1 (the sum) + 1 · W2 (the product): W2's column sums plus one.
    let w2 = p.w2.value();
    let d_x = grads.get(&x).unwrap();
    for (i, &g) in d_x.data().iter().enumerate() {
        let col = i % 16;
        let want: f32 = 1.0 + (0..16).map(|r| w2.data()[r * 16 + col]).sum::<f32>();
        assert!(
            (g - want).abs() <= 1e-4 * want.abs().max(1.0),
            "d_x[{i}] = {g}, want {want}"
        );
    }
}
