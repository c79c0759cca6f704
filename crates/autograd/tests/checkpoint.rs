//! `Tape::checkpoint` gives the gradients of the same ops recorded directly, bit for bit: for a
//! tracked and an untracked input, nested segments, and segments that hold no trainable
//! parameter; a segment's error reaches the caller. A tape is `Send + Sync`: a forward recorded
//! on one thread back-propagates on a worker of the rayon pool with the same gradients.

use nibble_autograd::{AutogradError, Param, Tape, Var};
use nibble_tensor::{Rng, Tensor};

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
