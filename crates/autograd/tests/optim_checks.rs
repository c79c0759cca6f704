//! Input checks of parameters, optimizers and LayerNorm: a mis-shaped gradient, a parameter
//! given twice or two of one name, a loaded step count past `i32::MAX`, a bad epsilon. Each was
//! accepted and gave a partial update, mixed-up state, NaN or a doubled update.

use nibble_autograd::{
    AdamW, AdamWConfig, AutogradError, Optimizer, OptimizerState, Param, Sgd, SgdConfig, Tape,
};
use nibble_tensor::{Tensor, TensorError};

fn ramp(shape: &[usize], scale: f32) -> Tensor {
    Tensor::from_fn(shape, |i| (i as f32 + 1.0) * scale).unwrap()
}

fn invalid_input(err: AutogradError, op: &str, needles: &[&str]) {
    match &err {
        AutogradError::InvalidInput { op: o, what } => {
            assert_eq!(*o, op, "{err}");
            for n in needles {
                assert!(what.contains(n), "{err}: lacks {n}");
            }
        }
        other => panic!("expected InvalidInput from {op}, got {other:?}"),
    }
}

/// The first gradient of a parameter is checked against its value's shape, as later ones are
/// (which failed in `add_assign`): the first was stored whatever its shape.
#[test]
fn accumulate_grad_checks_the_shape_on_the_first_call() {
    let p = Param::new("layer.weight", Tensor::zeros(&[2, 3]), true);
    let err = p.accumulate_grad(Tensor::zeros(&[4])).unwrap_err();
    invalid_input(err, "accumulate_grad", &["layer.weight", "[4]", "[2, 3]"]);
    assert!(p.grad().is_none(), "a refused gradient was stored");
    // Same element count, other shape: refused too.
    let err = p.accumulate_grad(Tensor::zeros(&[3, 2])).unwrap_err();
    invalid_input(
        err,
        "accumulate_grad",
        &["layer.weight", "[3, 2]", "[2, 3]"],
    );
    p.accumulate_grad(Tensor::full(&[2, 3], 1.0)).unwrap();
    let err = p.accumulate_grad(Tensor::zeros(&[6])).unwrap_err();
    invalid_input(err, "accumulate_grad", &["layer.weight", "[6]", "[2, 3]"]);
    p.accumulate_grad(Tensor::full(&[2, 3], 1.0)).unwrap();
    assert_eq!(p.grad().as_ref().unwrap().data(), &[2.0; 6]);
}

/// A gradient of the wrong shape put in the slot directly (`grad_mut`), or a value swapped for
/// one of another shape: the optimizers' step refuses it, naming the parameter and both
/// shapes, updates nothing (no parameter, no step count), where it updated part of the
/// parameter.
#[test]
fn optimizer_steps_refuse_a_gradient_of_another_shape() {
    for adam in [true, false] {
        let ok = Param::new("ok", ramp(&[3], 1.0), true);
        let p = Param::new("p", ramp(&[4], 1.0), true);
        let mut opt: Box<dyn Optimizer> = if adam {
            Box::new(AdamW::new(vec![ok.clone(), p.clone()], AdamWConfig::default()).unwrap())
        } else {
            Box::new(Sgd::new(vec![ok.clone(), p.clone()], SgdConfig::default()).unwrap())
        };
        ok.accumulate_grad(Tensor::full(&[3], 1.0)).unwrap();
        *p.grad_mut() = Some(Tensor::full(&[2], 1.0));
        let op = if adam { "AdamW::step" } else { "SGD::step" };
        invalid_input(opt.step().unwrap_err(), op, &["p", "[2]", "[4]"]);
        assert_eq!(p.value().data(), ramp(&[4], 1.0).data(), "{op}: p updated");
        assert_eq!(
            ok.value().data(),
            ramp(&[3], 1.0).data(),
            "{op}: ok updated"
        );
        assert_eq!(opt.state().step, 0, "{op}: step counted");
        // A value replaced by one of another shape: the buffers no longer fit it.
        *p.grad_mut() = None;
        *p.value_mut() = ramp(&[5], 1.0);
        *p.grad_mut() = Some(Tensor::full(&[5], 1.0));
        let err = opt.step().unwrap_err();
        assert!(
            matches!(&err, AutogradError::State { what } if what.contains(".p") && what.contains("[5]")),
            "{op}: {err}"
        );
        assert_eq!(p.value().data(), ramp(&[5], 1.0).data(), "{op}: p updated");
    }
}

/// A parameter given twice was updated twice per step; two parameters of one name shared
/// their saved state. Both are refused by the constructors, naming the parameter; frozen
/// parameters (not kept) do not count.
#[test]
fn optimizers_refuse_duplicate_params_and_names() {
    let p = Param::new("w", ramp(&[2], 1.0), true);
    let twin = Param::new("w", ramp(&[2], 2.0), true);
    let other = Param::new("v", ramp(&[2], 3.0), true);
    let cfg = AdamWConfig::default();
    let err = AdamW::new(vec![p.clone(), other.clone(), p.clone()], cfg).unwrap_err();
    invalid_input(err, "AdamW::new", &["w", "twice"]);
    let err = AdamW::new(vec![p.clone(), twin.clone()], cfg).unwrap_err();
    invalid_input(err, "AdamW::new", &["w", "named"]);
    let scfg = SgdConfig::default();
    let err = Sgd::new(vec![p.clone(), p.clone()], scfg).unwrap_err();
    invalid_input(err, "SGD::new", &["w", "twice"]);
    let err = Sgd::new(vec![twin.clone(), p.clone()], scfg).unwrap_err();
    invalid_input(err, "SGD::new", &["w", "named"]);
    // Distinct parameters, and a frozen one of a taken name, are fine.
    let frozen = Param::new("w", ramp(&[2], 4.0), false);
    AdamW::new(vec![p.clone(), other.clone(), frozen.clone()], cfg).unwrap();
    Sgd::new(vec![p, other, frozen], scfg).unwrap();
}

/// A state holding one buffer name twice cannot be loaded (which one is meant is unknown).
#[test]
fn load_state_refuses_a_buffer_named_twice() {
    let p = Param::new("w", ramp(&[2], 1.0), true);
    let mut opt = AdamW::new(vec![p], AdamWConfig::default()).unwrap();
    let mut state = opt.state();
    state
        .tensors
        .push(("exp_avg.w".into(), Tensor::full(&[2], 9.0)));
    let err = opt.load_state(&state).unwrap_err();
    assert!(
        matches!(&err, AutogradError::State { what } if what.contains("exp_avg.w")),
        "{err}"
    );
}

/// A step count past `i32::MAX` (a loaded state) wrapped in `powi(step as i32)`: the bias
/// corrections went negative or infinite and the parameters NaN. Now they are 1 there (the
/// limit, and what f64 gives for any f32 beta < 1): the step equals one with bias
/// corrections of exactly 1, computed here by hand.
#[test]
fn adamw_steps_past_i32_max_stay_finite() {
    let cfg = AdamWConfig::default();
    for step in [i32::MAX as u64, 1 << 31, (1 << 32) + 1, u64::MAX - 1] {
        let p = Param::new("w", ramp(&[3], 0.5), true);
        let mut opt = AdamW::new(vec![p.clone()], cfg).unwrap();
        let state = OptimizerState {
            step,
            tensors: vec![
                ("exp_avg.w".into(), Tensor::full(&[3], 0.25)),
                ("exp_avg_sq.w".into(), Tensor::full(&[3], 0.0625)),
            ],
        };
        opt.load_state(&state).unwrap();
        p.accumulate_grad(ramp(&[3], -0.1)).unwrap();
        opt.step().unwrap();
        assert_eq!(opt.steps(), step + 1);
        for (i, &w) in p.value().data().iter().enumerate() {
            let (w0, g) = ((i as f32 + 1.0) * 0.5, (i as f32 + 1.0) * -0.1);
            let mut want = w0 * (1.0 - cfg.lr * cfg.weight_decay);
            let m = 0.25 + (1.0 - cfg.beta1) * (g - 0.25);
            let v = 0.0625 * cfg.beta2 + (1.0 - cfg.beta2) * g * g;
            want += -cfg.lr * (m / (v.sqrt() / 1.0 + cfg.eps));
            assert!(w.is_finite(), "step {step}: {w}");
            assert_eq!(w.to_bits(), want.to_bits(), "step {step}: {w} vs {want}");
        }
    }
    // u64::MAX steps cannot take one more: an error, not an overflow.
    let p = Param::new("w", ramp(&[1], 1.0), true);
    let mut opt = AdamW::new(vec![p.clone()], cfg).unwrap();
    let mut state = opt.state();
    state.step = u64::MAX;
    opt.load_state(&state).unwrap();
    p.accumulate_grad(ramp(&[1], 1.0)).unwrap();
    assert!(matches!(opt.step(), Err(AutogradError::State { .. })));
    assert_eq!(p.value().data(), &[1.0]);
}

/// The tape's LayerNorm refuses a negative, NaN or infinite epsilon (it returned NaN with
/// `Ok`), naming the op and the value; 0 is allowed.
#[test]
fn tape_layer_norm_refuses_a_bad_eps() {
    let tape = Tape::new();
    let x = tape.leaf(ramp(&[2, 3], 1.0));
    let w = Param::new("ln.weight", Tensor::full(&[3], 1.0), true);
    let b = Param::new("ln.bias", Tensor::zeros(&[3]), true);
    for eps in [-1e-5f32, f32::NAN, f32::INFINITY] {
        match tape.layer_norm(&x, &w, &b, eps) {
            Err(AutogradError::Tensor(TensorError::Invalid { op, what })) => {
                assert_eq!(op, "layer_norm");
                assert!(what.contains(&format!("{eps}")), "{what}");
            }
            other => panic!("eps {eps}: {:?}", other.map(|v| v.value().clone())),
        }
    }
    let y = tape.layer_norm(&x, &w, &b, 0.0).unwrap();
    assert!(y.value().data().iter().all(|v| v.is_finite()));
}

/// A storage scale needs a parameter the optimizer updates and a finite nonzero scale; a
/// scale of 1 is the plain update, bit for bit, and another scale, negative too (PEFT's
/// `lora_alpha < 0`, which it trains; it was refused), moves the stored value by the scale
/// times AdamW's step on the unscaled parameter.
#[test]
fn adamw_storage_scales_are_checked_and_scale_the_step() {
    for scale in [3.0f32, -3.0] {
        let p = |name: &str, v: f32| {
            Param::new(name, Tensor::from_vec(&[2], vec![v, -v]).unwrap(), true)
        };
        let (theta, w, one, other) = (
            p("theta", 0.3),
            p("w", 0.3 * scale),
            p("one", 0.3),
            p("other", 1.0),
        );
        let mut opt = AdamW::new(
            vec![theta.clone(), w.clone(), one.clone()],
            AdamWConfig::default(),
        )
        .unwrap();
        for bad in [0.0, -0.0, f32::NAN, f32::INFINITY] {
            let e = opt.set_storage_scale(&w, bad).unwrap_err().to_string();
            assert!(e.contains("finite and nonzero") && e.contains('w'), "{e}");
        }
        let e = opt.set_storage_scale(&other, 2.0).unwrap_err().to_string();
        assert!(e.contains("other") && e.contains("not one"), "{e}");
        opt.set_storage_scale(&w, scale).unwrap();
        opt.set_storage_scale(&one, 1.0).unwrap();
        steps_of_scaled_storage(&theta, &w, &one, &mut opt, scale);
    }
}

/// Five steps on `theta`, on `w` (stored as `scale · theta`, its gradient `1 / scale` of
/// theta's) and on `one` (theta's twin at scale 1), then the checks.
fn steps_of_scaled_storage(theta: &Param, w: &Param, one: &Param, opt: &mut AdamW, scale: f32) {
    for step in 0..5 {
        let g = 0.1 + step as f32 * 0.05;
        theta
            .accumulate_grad(Tensor::from_vec(&[2], vec![g, -2.0 * g]).unwrap())
            .unwrap();
        w.accumulate_grad(Tensor::from_vec(&[2], vec![g / scale, -2.0 * g / scale]).unwrap())
            .unwrap();
        one.accumulate_grad(Tensor::from_vec(&[2], vec![g, -2.0 * g]).unwrap())
            .unwrap();
        opt.step().unwrap();
        opt.zero_grad();
    }
    let (t, s, o) = (theta.value(), w.value(), one.value());
    assert_eq!(t.data(), o.data(), "a scale of 1 is the plain update");
    for (a, b) in s.data().iter().zip(t.data()) {
        assert!(
            (a - scale * b).abs() <= 1e-6 * a.abs(),
            "{a} against {scale} · {b}"
        );
    }
}
