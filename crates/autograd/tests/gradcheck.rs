//! Finite-difference checks of every op's gradient, the tape's recording rules, a custom op,
//! and the optimizers against their PyTorch formulas.

use nibble_autograd::{
    AdamW, AdamWConfig, Bias, Op, Optimizer, Param, Result, Sgd, SgdConfig, Tape, Var,
};
use nibble_tensor::{HalfTensor, Rng, Tensor, WeightMatrix};
use std::sync::Arc;

/// Central differences of `loss(x)` w.r.t. every element of `x`, in f64 around f32 values.
fn numeric_grad(x: &Tensor, loss: &dyn Fn(&Tensor) -> f32) -> Vec<f32> {
    let h = 1e-2f32;
    (0..x.numel())
        .map(|i| {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp.data_mut()[i] += h;
            xm.data_mut()[i] -= h;
            ((loss(&xp) as f64 - loss(&xm) as f64) / (2.0 * h as f64)) as f32
        })
        .collect()
}

fn assert_close(what: &str, analytic: &[f32], numeric: &[f32]) {
    let scale = numeric.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        assert!(
            (a - n).abs() <= 2e-2 * scale,
            "{what}[{i}]: analytic {a} vs numeric {n} (scale {scale})"
        );
    }
    assert_eq!(analytic.len(), numeric.len(), "{what}: length");
}

/// A fixed random projection turns any output into a scalar loss: sum(y * r).
fn project(tape: &Tape, y: &Var, r: &Tensor) -> Var {
    let w = Param::new("r", r.clone().reshape(&[1, r.numel()]).unwrap(), false);
    let y2 = reshape_var(tape, y, &[1, r.numel()]);
    tape.sum(&tape.linear(&y2, &w, None).unwrap()).unwrap()
}

/// Reshape as a custom op (also exercises the public `Op` trait).
struct ReshapeOp {
    shape: Vec<usize>,
}
impl Op for ReshapeOp {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn backward(self: Box<Self>, d: Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(d.reshape(&self.shape)?)])
    }
}
fn reshape_var(tape: &Tape, x: &Var, shape: &[usize]) -> Var {
    let y = x.value().clone().reshape(shape).unwrap();
    let back = x.shape().to_vec();
    tape.record("reshape", &[x], y, false, || {
        Box::new(ReshapeOp { shape: back })
    })
    .unwrap()
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, &mut Rng::new(seed))
}

/// Checks d loss / d x for `f` built on the tape with `x` as a leaf.
fn check_input_grad(name: &str, x: &Tensor, f: &dyn Fn(&Tape, &Var) -> Var) {
    let tape = Tape::new();
    let leaf = tape.leaf(x.clone());
    let y = f(&tape, &leaf);
    let r = rand(y.shape(), 99);
    let loss = project(&tape, &y, &r);
    let grads = tape.backward(&loss).unwrap();
    let analytic = grads.get(&leaf).expect("gradient reached the leaf").clone();
    let numeric = numeric_grad(x, &|xv| {
        let t = Tape::new();
        let y = f(&t, &Var::constant(xv.clone()));
        project(&t, &y, &r).value().item().unwrap()
    });
    assert_close(name, analytic.data(), &numeric);
}

/// Checks d loss / d p for a parameter `p` used by `f`.
fn check_param_grad(name: &str, p: &Param, x: &Tensor, f: &dyn Fn(&Tape, &Var) -> Var) {
    let tape = Tape::new();
    p.zero_grad();
    let y = f(&tape, &Var::constant(x.clone()));
    let r = rand(y.shape(), 98);
    let loss = project(&tape, &y, &r);
    tape.backward(&loss).unwrap();
    let analytic = p.grad().as_ref().expect("param got a gradient").clone();
    let original = p.value().clone();
    let numeric = numeric_grad(&original, &|pv| {
        *p.value_mut() = pv.clone();
        let t = Tape::new();
        let y = f(&t, &Var::constant(x.clone()));
        project(&t, &y, &r).value().item().unwrap()
    });
    *p.value_mut() = original;
    assert_close(name, analytic.data(), &numeric);
}

#[test]
fn linear_gradients_match_finite_differences() {
    let x = rand(&[3, 5], 1);
    let w = Param::new("w", rand(&[4, 5], 2), true);
    let b = Param::new("b", rand(&[4], 3), true);
    let f = |t: &Tape, x: &Var| t.linear(x, &w, Some(&b)).unwrap();
    check_input_grad("linear dx", &x, &f);
    check_param_grad("linear dw", &w, &x, &f);
    check_param_grad("linear db", &b, &x, &f);
}

#[test]
fn linear_add_gradients_match_finite_differences() {
    let x = rand(&[3, 5], 21);
    let base = rand(&[3, 4], 22);
    let w = Param::new("w", rand(&[4, 5], 23), true);
    // d/dx and d/dw with a constant base.
    let f = |t: &Tape, x: &Var| t.linear_add(Var::constant(base.clone()), x, &w).unwrap();
    check_input_grad("linear_add dx", &x, &f);
    check_param_grad("linear_add dw", &w, &x, &f);
    // d/dbase with a constant x.
    let xc = Var::constant(x.clone());
    let g = |t: &Tape, b: &Var| t.linear_add(b.clone(), &xc, &w).unwrap();
    check_input_grad("linear_add dbase", &base, &g);
    // The output reuses base's buffer when nothing else holds it.
    let tape = Tape::new();
    let b = Var::constant(base.clone());
    let ptr = b.value().data().as_ptr();
    let y = tape.no_grad(|| tape.linear_add(b, &xc, &w).unwrap());
    assert_eq!(y.value().data().as_ptr(), ptr);
    assert!(tape
        .linear_add(Var::constant(rand(&[3, 3], 1)), &xc, &w)
        .is_err());
}

#[test]
fn frozen_linear_gradient_matches_for_f32_and_f16_weights() {
    let x = rand(&[3, 6], 4);
    let w32: Arc<dyn WeightMatrix> = Arc::new(rand(&[5, 6], 5));
    let w16: Arc<dyn WeightMatrix> = Arc::new(HalfTensor::from_f32(&rand(&[5, 6], 6)));
    let bias = rand(&[5], 7);
    for w in [w32, w16] {
        let f = |t: &Tape, x: &Var| {
            t.frozen_linear(x, &w, Some(Bias::F32(bias.data())))
                .unwrap()
        };
        check_input_grad("frozen_linear dx", &x, &f);
    }
}

#[test]
fn relu_add_layernorm_gradients_match_finite_differences() {
    // Keep inputs away from relu's kink.
    let mut x = rand(&[4, 7], 8);
    x.data_mut().iter_mut().for_each(|v| {
        if v.abs() < 0.1 {
            *v += 0.3
        }
    });
    check_input_grad("relu", &x, &|t, x| t.relu(x).unwrap());
    let c = Var::constant(rand(&[4, 7], 9));
    check_input_grad("add", &x, &|t, x| t.add(x, &c).unwrap());
    check_input_grad("add self", &x, &|t, x| t.add(x, x).unwrap());
    let w = Param::new("ln.w", rand(&[7], 10), true);
    let b = Param::new("ln.b", rand(&[7], 11), true);
    let f = |t: &Tape, x: &Var| t.layer_norm(x, &w, &b, 1e-5).unwrap();
    check_input_grad("layer_norm dx", &x, &f);
    check_param_grad("layer_norm dw", &w, &x, &f);
    check_param_grad("layer_norm db", &b, &x, &f);
}

#[test]
fn prelu_gradients_match_finite_differences() {
    // Keep inputs away from the kink at 0.
    let mut x = rand(&[4, 6], 15);
    x.data_mut().iter_mut().for_each(|v| {
        if v.abs() < 0.1 {
            *v -= 0.3
        }
    });
    for slopes in [6, 1] {
        let w = Param::new("prelu.w", rand(&[slopes], 16), true);
        let f = |t: &Tape, x: &Var| t.prelu(x, &w).unwrap();
        check_input_grad("prelu dx", &x, &f);
        check_param_grad("prelu da", &w, &x, &f);
    }
    let bad = Param::new("prelu.bad", rand(&[3], 17), false);
    let tape = Tape::new();
    let e = tape.prelu(&Var::constant(x), &bad).unwrap_err().to_string();
    assert!(e.contains("prelu") && e.contains("3 slopes"), "{e}");
}

/// DoRA's output scale: `y = x · (m / norm) + shift`, gradients to `x` and the magnitude `m`
/// (the norm a constant); shapes that do not fit are an error naming the op.
#[test]
fn scale_by_magnitude_gradients_match_finite_differences() {
    let x = rand(&[4, 6], 21);
    let m = Param::new("dora.m", rand(&[6], 22), true);
    let norm: Vec<f32> = (0..6).map(|i| 0.5 + 0.25 * i as f32).collect();
    let shift: Vec<f32> = (0..6).map(|i| i as f32 - 2.0).collect();
    let f = |t: &Tape, x: &Var| t.scale_by_magnitude(x, &m, &norm, &shift).unwrap();
    check_input_grad("scale_by_magnitude dx", &x, &f);
    check_param_grad("scale_by_magnitude dm", &m, &x, &f);
    // Wider than one block of the magnitude's column sums (64 columns a task).
    let wide = rand(&[3, 130], 23);
    let m = Param::new("dora.m", rand(&[130], 24), true);
    let norm: Vec<f32> = (0..130).map(|i| 0.5 + 0.01 * i as f32).collect();
    let shift = vec![0.25f32; 130];
    let f = |t: &Tape, x: &Var| t.scale_by_magnitude(x, &m, &norm, &shift).unwrap();
    check_param_grad("scale_by_magnitude dm (130 columns)", &m, &wide, &f);
    let tape = Tape::new();
    let e = tape
        .scale_by_magnitude(&Var::constant(x), &m, &norm[..5], &shift[..5])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("scale_by_magnitude") && e.contains("[4, 6]"),
        "{e}"
    );
}

#[test]
fn rms_norm_gradients_match_finite_differences() {
    let x = rand(&[5, 9], 12);
    let w = Param::new("rms.w", rand(&[9], 13), true);
    let f = |t: &Tape, x: &Var| t.rms_norm(x, &w, f32::EPSILON).unwrap();
    check_input_grad("rms_norm dx", &x, &f);
    check_param_grad("rms_norm dw", &w, &x, &f);
    // A frozen weight records nothing for an untracked input.
    let frozen = Param::new("rms.frozen", rand(&[9], 14), false);
    let tape = Tape::new();
    let y = tape
        .rms_norm(&Var::constant(x.clone()), &frozen, 1e-6)
        .unwrap();
    assert_eq!(y.shape(), [5, 9]);
    assert!(tape.is_empty());
}

#[test]
fn group_norm_gradients_match_finite_differences() {
    let x = rand(&[4, 12], 18);
    for groups in [1, 3, 12] {
        let w = Param::new("gn.w", rand(&[12], 19), true);
        let b = Param::new("gn.b", rand(&[12], 20), true);
        let f = |t: &Tape, x: &Var| t.group_norm(x, groups, &w, &b, 1e-5).unwrap();
        check_input_grad(&format!("group_norm dx, {groups} groups"), &x, &f);
        check_param_grad(&format!("group_norm dw, {groups} groups"), &w, &x, &f);
        check_param_grad(&format!("group_norm db, {groups} groups"), &b, &x, &f);
    }
    let (w, b) = (
        Param::new("gn.w", rand(&[12], 21), true),
        Param::new("gn.b", rand(&[12], 22), true),
    );
    let tape = Tape::new();
    let e = tape
        .group_norm(&Var::constant(x), 5, &w, &b, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("group_norm") && e.contains("5 groups of 12"),
        "{e}"
    );
}

#[test]
fn loss_gradients_match_finite_differences() {
    let z = rand(&[6, 1], 12).scale(3.0);
    let y = Tensor::from_vec(&[6], vec![0., 1., 0., 1., 1., 0.]).unwrap();
    let scalar = |name: &str, f: &dyn Fn(&Tape, &Var) -> Var| {
        let tape = Tape::new();
        let leaf = tape.leaf(z.clone());
        let loss = f(&tape, &leaf);
        let g = tape.backward(&loss).unwrap().get(&leaf).unwrap().clone();
        let numeric = numeric_grad(&z, &|zv| {
            f(&Tape::new(), &Var::constant(zv.clone()))
                .value()
                .item()
                .unwrap()
        });
        assert_close(name, g.data(), &numeric);
    };
    scalar("bce", &|t, z| t.bce_with_logits(z, &y).unwrap());
    scalar("mse", &|t, z| t.mse(z, &y).unwrap());
    scalar("sum", &|t, z| t.sum(z).unwrap());
    scalar("mean", &|t, z| t.mean(z).unwrap());
}

#[test]
fn bce_is_stable_and_matches_the_formula() {
    let tape = Tape::new();
    let z = Var::constant(Tensor::from_vec(&[3], vec![-100.0, 0.0, 100.0]).unwrap());
    let y = Tensor::from_vec(&[3], vec![0.0, 1.0, 0.0]).unwrap();
    let l = tape
        .bce_with_logits(&z, &y)
        .unwrap()
        .value()
        .item()
        .unwrap();
    // terms: ~0, ln 2, 100
    assert!(
        (l - (std::f32::consts::LN_2 + 100.0) / 3.0).abs() < 1e-4,
        "{l}"
    );
    assert!(tape.bce_with_logits(&z, &Tensor::zeros(&[2])).is_err());
}

#[test]
fn forward_without_tracked_inputs_records_nothing() {
    let tape = Tape::new();
    let w = Param::new("w", rand(&[4, 5], 1), false);
    let ln_w = Param::new("ln.w", Tensor::full(&[4], 1.0), false);
    let ln_b = Param::new("ln.b", Tensor::zeros(&[4]), false);
    let frozen: Arc<dyn WeightMatrix> = Arc::new(rand(&[4, 4], 2));
    let x = Var::constant(rand(&[2, 5], 3));
    let h = tape.linear(&x, &w, None).unwrap();
    let h = tape.relu(&h).unwrap();
    let h = tape.layer_norm(&h, &ln_w, &ln_b, 1e-5).unwrap();
    let h = tape.frozen_linear(&h, &frozen, None).unwrap();
    let h2 = tape.add(&h, &h).unwrap();
    let _ = tape.sum(&h2).unwrap();
    assert_eq!(tape.len(), 0, "nothing tracked: nothing recorded");
    // Trainable parameters inside no_grad: still nothing.
    w.set_requires_grad(true);
    tape.no_grad(|| tape.linear(&x, &w, None).unwrap());
    assert_eq!(tape.len(), 0);
    // With a trainable parameter, the op records.
    tape.linear(&x, &w, None).unwrap();
    assert_eq!(tape.len(), 1);
}

#[test]
fn tape_is_reusable_and_stale_vars_are_refused() {
    let tape = Tape::new();
    let w = Param::new("w", rand(&[3, 3], 1), true);
    let x = Var::constant(rand(&[2, 3], 2));
    for _ in 0..3 {
        let y = tape.linear(&x, &w, None).unwrap();
        let loss = tape.sum(&y).unwrap();
        assert_eq!(tape.len(), 2);
        tape.backward(&loss).unwrap();
        assert_eq!(tape.len(), 0);
    }
    // Gradients accumulated over the three steps.
    let g1 = {
        let t = Tape::new();
        let w1 = Param::new("w1", w.value().clone(), true);
        let l = t.sum(&t.linear(&x, &w1, None).unwrap()).unwrap();
        t.backward(&l).unwrap();
        let g = w1.grad().as_ref().unwrap().clone();
        g
    };
    let got = w.grad().as_ref().unwrap().clone();
    for (a, b) in got.data().iter().zip(g1.data()) {
        assert!((a - 3.0 * b).abs() < 1e-5);
    }
    let y = tape.linear(&x, &w, None).unwrap();
    tape.clear();
    assert!(tape.relu(&y).is_err(), "a var from before clear() is stale");
    assert!(tape.backward(&Var::constant(Tensor::zeros(&[2]))).is_err());
}

#[test]
fn saved_activations_are_shared_not_copied() {
    // relu keeps a bit mask, not its output; the next linear saves the output itself (shared,
    // not copied).
    let tape = Tape::new();
    let w = Param::new("w", rand(&[3, 3], 1), true);
    let x = tape.leaf(rand(&[2, 3], 2));
    let h = tape.relu(&x).unwrap();
    let before = Arc::strong_count(&h.shared()) - 1;
    let _y = tape.linear(&h, &w, None).unwrap();
    let after = Arc::strong_count(&h.shared()) - 1;
    assert_eq!(before, 1, "the var only: relu saved a mask");
    assert_eq!(after, 2, "plus the linear's record (no copy)");
}

#[test]
fn adamw_matches_pytorch_formula_and_state_round_trips() {
    let p0 = rand(&[5], 1);
    let grads = [rand(&[5], 2), rand(&[5], 3), rand(&[5], 4)];
    let p = Param::new("p", p0.clone(), true);
    let cfg = AdamWConfig::default();
    let mut opt = AdamW::new(vec![p.clone()], cfg).unwrap();
    // Reference in f64.
    let mut w: Vec<f64> = p0.data().iter().map(|&v| v as f64).collect();
    let (mut m, mut v) = (vec![0.0f64; 5], vec![0.0f64; 5]);
    for (t, g) in grads.iter().enumerate() {
        opt.zero_grad();
        p.accumulate_grad(g.clone()).unwrap();
        opt.step().unwrap();
        let t = (t + 1) as i32;
        for i in 0..5 {
            let gi = g.data()[i] as f64;
            w[i] *= 1.0 - 1e-3 * 0.01;
            m[i] = 0.9 * m[i] + 0.1 * gi;
            v[i] = 0.999 * v[i] + 0.001 * gi * gi;
            let mh = m[i] / (1.0 - 0.9f64.powi(t));
            let vh = v[i] / (1.0 - 0.999f64.powi(t));
            w[i] -= 1e-3 * mh / (vh.sqrt() + 1e-8);
        }
    }
    for (a, b) in p.value().data().iter().zip(&w) {
        assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    }
    // Save, restore into a fresh optimizer, and both take the same next step.
    let state = opt.state();
    let q = Param::new("p", p.value().clone(), true);
    let mut opt2 = AdamW::new(vec![q.clone()], cfg).unwrap();
    opt2.load_state(&state).unwrap();
    for (o, par) in [(&mut opt as &mut dyn Optimizer, &p), (&mut opt2, &q)] {
        o.zero_grad();
        par.accumulate_grad(grads[0].clone()).unwrap();
        o.step().unwrap();
    }
    assert_eq!(p.value().data(), q.value().data());
    // A state for other shapes is refused, naming the buffer.
    let r = Param::new("p", rand(&[4], 1), true);
    let err = AdamW::new(vec![r], cfg)
        .unwrap()
        .load_state(&state)
        .unwrap_err();
    assert!(err.to_string().contains("exp_avg.p"), "{err}");
    assert!(AdamW::new(vec![], AdamWConfig { beta1: 1.5, ..cfg }).is_err());
}

#[test]
fn sgd_with_momentum_matches_pytorch_formula() {
    let p = Param::new("p", Tensor::from_vec(&[1], vec![1.0]).unwrap(), true);
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
    };
    let mut opt = Sgd::new(vec![p.clone()], cfg).unwrap();
    let (mut w, mut buf) = (1.0f64, 0.0f64);
    for step in 0..3 {
        opt.zero_grad();
        p.accumulate_grad(Tensor::from_vec(&[1], vec![0.5]).unwrap())
            .unwrap();
        opt.step().unwrap();
        buf = if step == 0 { 0.5 } else { 0.9 * buf + 0.5 };
        w -= 0.1 * buf;
    }
    assert!((p.value().data()[0] as f64 - w).abs() < 1e-6);
}

#[test]
fn frozen_params_are_not_optimized() {
    let p = Param::new("p", Tensor::full(&[2], 1.0), false);
    let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
    p.accumulate_grad(Tensor::full(&[2], 1.0)).unwrap();
    opt.step().unwrap();
    assert_eq!(p.value().data(), &[1.0, 1.0]);
}

/// A LoRA layer over a frozen weight (`frozen(x) + B(A x)`): the frozen layer's backward adds
/// `dY·W` into the gradient the adapter already gave x (`Op::backward_accumulate`), and the
/// sum is still the true gradient (finite differences), also with x used twice.
#[test]
fn frozen_input_gradient_accumulated_in_place_is_right() {
    let frozen: Arc<dyn WeightMatrix> = Arc::new(rand(&[5, 6], 21));
    let a = Param::new("a", rand(&[2, 6], 22), true);
    let b = Param::new("b", rand(&[5, 2], 23), true);
    let x = rand(&[3, 6], 24);
    let lora = |t: &Tape, x: &Var| {
        let y = t.frozen_linear(x, &frozen, None).unwrap();
        let h = t.linear(x, &a, None).unwrap();
        t.linear_add(y, &h, &b).unwrap()
    };
    check_input_grad("lora over frozen dx", &x, &lora);
    check_input_grad("two lora layers on one x", &x, &|t, x| {
        let y1 = lora(t, x);
        let y2 = lora(t, x);
        t.add(&y1, &y2).unwrap()
    });
}

/// What `Op::backward_accumulate` is lent: the gradient gathered so far for an input whose
/// gradient has arrived, `None` for one that has none yet and for a repeated input; a gradient
/// added in place and one returned both reach the input.
#[test]
fn backward_accumulate_lends_the_gathered_gradients() {
    use std::sync::Mutex;
    struct Twice(Arc<Mutex<Vec<bool>>>);
    impl Op for Twice {
        fn name(&self) -> &'static str {
            "twice"
        }
        fn backward(self: Box<Self>, d: Tensor) -> Result<Vec<Option<Tensor>>> {
            Ok(vec![Some(d.clone()), Some(d)])
        }
        fn backward_accumulate(
            self: Box<Self>,
            d: Tensor,
            acc: &mut [Option<Tensor>],
        ) -> Result<Vec<Option<Tensor>>> {
            *self.0.lock().unwrap() = acc.iter().map(|a| a.is_some()).collect();
            match &mut acc[0] {
                Some(g) => {
                    g.add_assign(&d)?;
                    Ok(vec![None, Some(d)])
                }
                None => self.backward(d),
            }
        }
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tape = Tape::new();
    let x = tape.leaf(Tensor::from_vec(&[1, 2], vec![1.0, 2.0]).unwrap());
    // y = x + x (the custom op, recorded first), z = relu(x) (its gradient reaches x first).
    let y = tape
        .record("twice", &[&x, &x], x.value().scale(2.0), false, || {
            Box::new(Twice(Arc::clone(&seen)))
        })
        .unwrap();
    let z = tape.relu(&x).unwrap();
    let loss = tape.sum(&tape.add(&y, &z).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![true, false]);
    assert_eq!(grads.get(&x).unwrap().data(), &[3.0, 3.0]);
}
