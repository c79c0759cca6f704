//! `BigNet::from_parts` checks every part's width, and `train::accuracy` one logit per label.

use nibble_autograd::Param;
use nibble_bignet::layer::{Linear, LoraAdapter};
use nibble_bignet::model::Norm;
use nibble_bignet::source::{BLOCKS, LAYERS_PER_BLOCK};
use nibble_bignet::{BigNet, Error, Variant, WeightFormat};
use nibble_tensor::{Rng, Tensor};

const DIM: usize = 8;

fn linear(name: &str, out: usize, inp: usize) -> Linear {
    let w = Tensor::uniform(&[out, inp], -0.3, 0.3, &mut Rng::new(1));
    Linear::from_f32(name, w, Some(Tensor::zeros(&[out])), WeightFormat::F32).unwrap()
}

fn norm(b: usize, width: usize) -> Norm {
    Norm {
        weight: Param::new(format!("n{b}.weight"), Tensor::full(&[width], 1.0), true),
        bias: Param::new(format!("n{b}.bias"), Tensor::zeros(&[width]), true),
    }
}

fn parts() -> (Vec<[Linear; LAYERS_PER_BLOCK]>, Vec<Norm>) {
    let blocks = (0..BLOCKS)
        .map(|b| std::array::from_fn(|l| linear(&format!("b{b}.l{l}"), DIM, DIM)))
        .collect();
    let norms = (0..BLOCKS - 1).map(|b| norm(b, DIM)).collect();
    (blocks, norms)
}

fn model_error(r: nibble_bignet::Result<BigNet>, part: &str) {
    match r {
        Err(e @ Error::Model { .. }) => assert!(e.to_string().contains(part), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted a bad {part}"),
    }
}

#[test]
fn from_parts_checks_every_width() {
    let (blocks, norms) = parts();
    BigNet::from_parts(Variant::Bignet, DIM, blocks, norms).unwrap();

    let (blocks, mut norms) = parts();
    norms[2] = norm(2, DIM / 2);
    model_error(
        BigNet::from_parts(Variant::Bignet, DIM, blocks, norms),
        "n2.weight",
    );

    let (blocks, mut norms) = parts();
    norms[1].bias = Param::new("n1.bias", Tensor::zeros(&[DIM + 1]), true);
    model_error(
        BigNet::from_parts(Variant::Bignet, DIM, blocks, norms),
        "n1.bias",
    );

    let (mut blocks, norms) = parts();
    blocks[1][2] = linear("b1.l2", DIM, DIM / 2);
    model_error(
        BigNet::from_parts(Variant::Bignet, DIM, blocks, norms),
        "b1.l2.weight",
    );

    let (mut blocks, norms) = parts();
    blocks[0][0].lora =
        Some(LoraAdapter::init("b0.l0", DIM, DIM - 1, 2, &mut Rng::new(2)).unwrap());
    model_error(
        BigNet::from_parts(Variant::Bignet, DIM, blocks, norms),
        "b0.l0.lora_a",
    );

    let (mut blocks, norms) = parts();
    let mut adapter = LoraAdapter::init("b0.l1", DIM, DIM, 2, &mut Rng::new(2)).unwrap();
    adapter.b = Param::new("b0.l1.lora_b.weight", Tensor::zeros(&[DIM, 3]), true);
    blocks[0][1].lora = Some(adapter);
    model_error(
        BigNet::from_parts(Variant::Bignet, DIM, blocks, norms),
        "b0.l1.lora_b",
    );
}

#[test]
fn accuracy_needs_one_logit_per_label() {
    let logits = Tensor::from_vec(&[3, 1], vec![1.0, -1.0, 1.0]).unwrap();
    let labels = Tensor::from_vec(&[3], vec![1.0, 0.0, 0.0]).unwrap();
    assert_eq!(
        nibble_bignet::train::accuracy(&logits, &labels).unwrap(),
        2.0 / 3.0
    );
    let short = Tensor::from_vec(&[2], vec![1.0, 0.0]).unwrap();
    let e = nibble_bignet::train::accuracy(&logits, &short).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Input { .. }) && msg.contains("[3, 1]") && msg.contains("[2]"),
        "{msg}"
    );
}

/// A seeded width whose weights overflow or exceed this machine's memory is an error from
/// `BigNet::seeded`, never a panic (it panicked in `Tensor::uniform`'s documented `expect`)
/// nor a process killed filling a layer an overcommitting allocator gave (the 16-core Xeon).
#[test]
fn seeded_widths_beyond_memory_are_errors() {
    for dim in [1usize << 20, 1 << 33] {
        let r = std::panic::catch_unwind(|| {
            nibble_bignet::BigNet::seeded(nibble_bignet::Variant::Bignet, dim, 0).map(|_| ())
        });
        assert!(
            matches!(r, Ok(Err(_))),
            "dim {dim}: {:?}",
            r.map(|r| r.is_ok())
        );
    }
}
