//! `BigNet::pack_for_inference`: f32 layers packed once for the GEMM give the unpacked model's
//! bits above 16 rows, one set of bits per row at every batch size (batch 1 on the team path
//! and on the pool, small batches, large ones), the same across thread counts, and save as the
//! plain f32 checkpoint they came from.

// The helpers the tensor crate's integration tests share (one copy for both directories).
#[path = "../crates/tensor/tests/common/mod.rs"]
mod common;
use common::{bits, in_pool};

use nibble::bignet::cli::normal_batch;
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::persist::save_model;
use nibble::bignet::{BigNet, Variant};

fn models(dim: usize) -> (BigNet, BigNet) {
    let spec = ModelSpec {
        dim,
        ..ModelSpec::seeded(Variant::Bignet, 11)
    };
    let plain = spec.build().unwrap();
    let mut packed = plain.clone();
    packed.pack_for_inference().unwrap();
    (plain, packed)
}

#[test]
fn packed_model_gives_the_unpacked_bits_above_16_rows_and_one_set_of_bits_per_row() {
    for dim in [100, 128] {
        let (plain, packed) = models(dim);
        assert!(packed.linears().all(|l| l.params().is_empty()));
        assert!(plain.linears().all(|l| l.params().len() == 2));
        let x = normal_batch(40, dim, 3);
        let big = packed.infer(&x).unwrap();
        assert_eq!(
            bits(big.data()),
            bits(plain.infer(&x).unwrap().data()),
            "dim {dim}"
        );
        for threads in [1, 2, 3] {
            let again = in_pool(threads, || packed.infer(&x).unwrap());
            assert_eq!(
                bits(again.data()),
                bits(big.data()),
                "dim {dim} threads {threads}"
            );
            // Every small batch's rows are the large batch's rows (the panel GEMV runs the
            // GEMM's sequence), batch 1 on the team path as on the pool.
            for m in [1, 2, 7, 16, 17] {
                let xm = nibble::tensor::Tensor::from_vec(&[m, dim], x.data()[..m * dim].to_vec())
                    .unwrap();
                let ym = in_pool(threads, || packed.infer(&xm).unwrap());
                assert_eq!(
                    bits(ym.data()),
                    bits(&big.data()[..m * dim]),
                    "dim {dim} threads {threads} batch {m}"
                );
            }
            let x1 = nibble::tensor::Tensor::from_vec(&[1, dim], x.data()[..dim].to_vec()).unwrap();
            if let Some(team) = in_pool(threads, || packed.infer_on_team(&x1)) {
                assert_eq!(bits(team.unwrap().data()), bits(&big.data()[..dim]));
            }
            // The unpacked model's batch 1 sums in another order: equal up to rounding.
            let y1 = in_pool(threads, || plain.infer(&x1).unwrap());
            for (a, b) in y1.data().iter().zip(&big.data()[..dim]) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }
}

#[test]
fn packed_model_saves_the_f32_checkpoint_it_came_from() {
    let (plain, packed) = models(100);
    let dir = std::env::temp_dir().join(format!("nibble_packed_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (
        dir.join("plain.safetensors"),
        dir.join("packed.safetensors"),
    );
    save_model(&plain, &a).unwrap();
    save_model(&packed, &b).unwrap();
    let (fa, fb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        fa == fb,
        "the packed model's file differs from the unpacked model's"
    );
    // Packing twice, or a model without f32 layers, changes nothing.
    let mut twice = packed.clone();
    twice.pack_for_inference().unwrap();
    let x = normal_batch(20, 100, 5);
    assert_eq!(
        bits(twice.infer(&x).unwrap().data()),
        bits(packed.infer(&x).unwrap().data())
    );
    let q = ModelSpec {
        dim: 100,
        ..ModelSpec::seeded(Variant::Qlora, 2)
    }
    .build()
    .unwrap();
    let mut qp = q.clone();
    qp.pack_for_inference().unwrap();
    assert_eq!(
        bits(qp.infer(&x).unwrap().data()),
        bits(q.infer(&x).unwrap().data())
    );
    assert_eq!(qp.trainable_params().len(), q.trainable_params().len());
}
