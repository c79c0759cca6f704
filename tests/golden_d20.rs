//! BigNet at width 20, not a multiple of 16, against PyTorch: the reference's `q4_quantize`
//! takes blocks of 16 over the flattened weight, which there cross rows, and low_precision and
//! qlora (with its trained adapters) must give the reference's outputs; a quantized checkpoint
//! written and read back gives the same bits. Data made by `tools/golden/make_bignet_d20.py`.

use nibble::bignet::checkpoint::Checkpoint;
use nibble::bignet::frozen::needs_flat_q4;
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::persist::save_model;
use nibble::bignet::{BigNet, Variant};
use nibble::tensor::Tensor;
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn build(variant: Variant, weights: PathBuf, adapter: Option<PathBuf>) -> BigNet {
    ModelSpec {
        weights: Some(weights),
        adapter,
        ..ModelSpec::seeded(variant, 0)
    }
    .build()
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.abs_diff_stats(b).unwrap().0
}

#[test]
fn q4_at_width_20_takes_the_reference_s_blocks_across_rows() {
    assert!(needs_flat_q4(&[20, 20]) && !needs_flat_q4(&[16, 32]) && !needs_flat_q4(&[3, 5]));
    let io = Checkpoint::open(data("io_d20.safetensors")).unwrap();
    let x = io.tensor_f32("x", Some(&[7, 20])).unwrap();
    let want = |v: &str| io.tensor_f32(&format!("y.{v}"), Some(&[7, 20])).unwrap();
    let weights = data("bignet_d20.pth");
    for variant in [Variant::Bignet, Variant::LowPrecision] {
        let y = build(variant, weights.clone(), None).infer(&x).unwrap();
        let d = max_diff(&y, &want(variant.name()));
        assert!(d < 1e-5, "{variant}: {d}");
    }
    // Blocks within rows would be another quantization: the 4-bit output is not bignet's.
    assert!(max_diff(&want("low_precision"), &want("bignet")) > 1e-2);
    let qlora = build(
        Variant::Qlora,
        weights.clone(),
        Some(data("bignet_d20_qlora.pth")),
    );
    let y = qlora.infer(&x).unwrap();
    let d = max_diff(&y, &want("qlora"));
    assert!(d < 1e-5, "qlora: {d}");
    assert!(max_diff(&want("qlora"), &want("low_precision")) > 1e-3);
    // Written as a quantized checkpoint (the reference's flattened buffers) and read back.
    let low = build(Variant::LowPrecision, weights, None);
    let dir = std::env::temp_dir().join(format!("nibble-golden-d20-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("q4_d20.safetensors");
    save_model(&low, &file).unwrap();
    let stored = Checkpoint::open(&file).unwrap();
    let (_, shape) = stored.info("model.0.model.0.weight.q4.norm").unwrap();
    assert_eq!(shape, &[25], "20 x 20 weights in 25 blocks of 16");
    let back = build(Variant::LowPrecision, file, None);
    assert_eq!(
        back.infer(&x).unwrap().data(),
        low.infer(&x).unwrap().data()
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// PEFT adapters that carry base parameters (`bias="all"`, `modules_to_save` of a Linear) on
/// the half_precision base (`tools/golden/make_peft_half_base.py`): PEFT copies them into the
/// HalfLinear's f16 parameters or an f16 copy of the module, so nibble rounds them to f16
/// too. Kept in f32 they put the outputs 3–4e-4 off PEFT's.
#[test]
fn adapter_base_parameters_on_the_f16_base_are_rounded_to_f16_as_peft_stores_them() {
    let io = Checkpoint::open(data("peft_half_base/io.safetensors")).unwrap();
    let x = io.tensor_f32("x", Some(&[6, 20])).unwrap();
    for name in ["bias_all", "mts_linear"] {
        let want = io.tensor_f32(&format!("y_{name}"), Some(&[6, 20])).unwrap();
        let model = build(
            Variant::HalfPrecision,
            data("bignet_d20.pth"),
            Some(data(&format!("peft_half_base/{name}"))),
        );
        let diff = max_diff(&model.infer(&x).unwrap(), &want);
        assert!(diff < 2e-6, "{name}: {diff} from PEFT's output");
    }
}
