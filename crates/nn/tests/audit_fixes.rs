//! Bad LoRA ranks, BatchNorm edits, replaced base parameters and f16 storage: errors naming
//! the layer, never a panic, an abort or a silently wrong model.

use nibble_autograd::{Tape, Var};
use nibble_io::WeightFormat;
use nibble_nn::linear::MAX_LORA_RANK;
use nibble_nn::{Activation, BatchNorm, Error, Layer, Linear, LoraAdapter, Sequential};
use nibble_tensor::{Rng, Tensor};

fn linear(name: &str, out: usize, inp: usize) -> Linear {
    let w = Tensor::uniform(&[out, inp], -0.5, 0.5, &mut Rng::new(out as u64));
    Linear::from_f32(name, w, Some(Tensor::zeros(&[out])), WeightFormat::F32).unwrap()
}

fn model() -> Sequential {
    Sequential::new(vec![
        Layer::Linear(linear("0", 4, 3)),
        Layer::Activation(Activation::Relu),
        Layer::Linear(linear("2", 2, 4)),
    ])
}

fn layer_error(e: Error, name: &str) -> String {
    match &e {
        Error::Layer { layer, .. } => assert_eq!(layer, name, "{e}"),
        other => panic!("{other}"),
    }
    e.to_string()
}

#[test]
fn huge_lora_ranks_are_errors_naming_the_layer() {
    for rank in [usize::MAX, 1 << 50, MAX_LORA_RANK + 1] {
        let mut l = linear("fc", 4, 3);
        let msg = layer_error(l.add_lora(rank, &mut Rng::new(1)).unwrap_err(), "fc");
        assert!(msg.contains("65536"), "{msg}");
        assert!(l.lora.is_none());
        assert!(l.params().iter().all(|p| p.requires_grad()));
        let e = LoraAdapter::init("fc", 4, 3, rank, &mut Rng::new(1)).unwrap_err();
        layer_error(e, "fc");
    }
    // Sizes that overflow even under the rank cap.
    let e = LoraAdapter::init("big", usize::MAX / 2, 3, 8, &mut Rng::new(1)).unwrap_err();
    assert!(layer_error(e, "big").contains("overflows"));
    assert!(LoraAdapter::init("fc", 4, 3, 0, &mut Rng::new(1)).is_err());
    // The cap itself is accepted.
    let a = LoraAdapter::init("fc", 1, 1, MAX_LORA_RANK, &mut Rng::new(1)).unwrap();
    assert_eq!(a.rank(), MAX_LORA_RANK);
}

#[test]
fn a_refused_rank_leaves_the_sequential_as_it_was() {
    for rank in [0, usize::MAX, 1 << 50] {
        let mut m = model();
        assert!(m.add_lora(rank, 3).is_err());
        assert!(m.linears().all(|l| l.lora.is_none()));
        assert_eq!(m.trainable_params().len(), 4, "rank {rank}");
    }
    let mut m = model();
    m.add_lora(2, 3).unwrap();
    assert_eq!(m.trainable_params().len(), 4);
    assert!(m.linears().all(|l| l.lora.is_some()));
}

fn batch_norm() -> BatchNorm {
    let t = |v: &[f32]| Tensor::from_vec(&[2], v.to_vec()).unwrap();
    BatchNorm::new(
        "bn",
        Some(t(&[1.0, 2.0])),
        Some(t(&[0.5, -0.5])),
        t(&[0.0, 1.0]),
        t(&[1.0, 4.0]),
        1e-5,
    )
    .unwrap()
}

fn run(n: &BatchNorm, x: &[f32]) -> Vec<f32> {
    let tape = Tape::new();
    let x = Var::constant(Tensor::from_vec(&[1, 2], x.to_vec()).unwrap());
    n.forward(&tape, &x).unwrap().value().data().to_vec()
}

#[test]
fn batch_norm_forward_follows_its_tensors() {
    let mut n = batch_norm();
    let before = run(&n, &[1.0, 1.0]);
    // A bad epsilon is refused and changes nothing.
    layer_error(n.set_eps(-5.0).unwrap_err(), "bn");
    assert_eq!(n.eps(), 1e-5);
    assert_eq!(run(&n, &[1.0, 1.0]), before);
    // New tensors: forward and the saved tensors agree.
    let t = |v: &[f32]| Tensor::from_vec(&[2], v.to_vec()).unwrap();
    n.set_tensors(Some(t(&[3.0, 3.0])), None, t(&[0.0, 0.0]), t(&[1.0, 1.0]))
        .unwrap();
    let y = run(&n, &[1.0, 2.0]);
    let s = 3.0 / (1.0f32 + 1e-5).sqrt();
    assert_eq!(y, [s, 2.0 * s]);
    assert_eq!(n.weight().unwrap().data(), [3.0, 3.0]);
    assert!(n.bias().is_none());
    let saved: Vec<String> = n.tensors().into_iter().map(|(k, _)| k).collect();
    assert_eq!(saved, ["bn.weight", "bn.running_mean", "bn.running_var"]);
    // A negative variance is refused and changes nothing.
    assert!(n
        .set_tensors(None, None, t(&[0.0, 0.0]), t(&[-1.0, 1.0]))
        .is_err());
    assert_eq!(run(&n, &[1.0, 2.0]), y);
    n.set_eps(1e-3).unwrap();
    assert_eq!(n.eps(), 1e-3);
    assert_ne!(run(&n, &[1.0, 2.0]), y);
}

#[test]
fn replacing_a_base_parameter_checks_its_shape() {
    let mut l = linear("fc", 4, 3);
    let msg = layer_error(
        l.replace_base_param(false, Tensor::zeros(&[12]))
            .unwrap_err(),
        "fc",
    );
    assert!(msg.contains("fc.weight"), "{msg}");
    assert_eq!(l.dims(), (4, 3));
    assert!(l.replace_base_param(true, Tensor::zeros(&[3])).is_err());
    l.replace_base_param(false, Tensor::zeros(&[4, 3])).unwrap();
    l.replace_base_param(true, Tensor::full(&[4], 1.0)).unwrap();
    assert_eq!(l.bias_values().unwrap(), [1.0; 4]);
}

#[test]
fn f16_linear_of_a_weight_beyond_f16_is_an_error() {
    for bad in [1e5f32, f32::NAN] {
        let w = Tensor::from_vec(&[1, 2], vec![0.5, bad]).unwrap();
        let e = Linear::from_f32("fc", w, None, WeightFormat::F16).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("fc.weight") && msg.contains("col 1"), "{msg}");
    }
}
