//! The homework grader's bounds at width 1024 (seeded init), one test each.

use nibble::bignet::cli::{compare::compare, Common};
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::train::{fit, FitTask};
use nibble::bignet::Variant;

fn common() -> Common {
    Common {
        dim: 1024,
        ..Default::default()
    }
}

const MB: f64 = (1 << 20) as f64;

fn check(variant: Variant, max_mean: f32, max_max: f32, max_mb: f64) -> ModelSpec {
    let (max, mean) = compare(Variant::Bignet, variant, &common()).unwrap();
    assert!(
        mean < max_mean,
        "{variant}: mean |diff| {mean} >= {max_mean}"
    );
    assert!(max < max_max, "{variant}: max |diff| {max} >= {max_max}");
    let spec = ModelSpec::seeded(variant, 0);
    let bytes = spec.build().unwrap().counts().bytes as f64;
    assert!(bytes / MB < max_mb, "{variant}: {} MB", bytes / MB);
    spec
}

fn fits(variant: Variant) -> f32 {
    let model = ModelSpec::seeded(variant, 0).build().unwrap();
    let task = FitTask::new(1024, 1000, 0);
    fit(&model, &task, 20, 1e-3, |_, _, _| {})
        .unwrap()
        .best_accuracy
}

#[test]
fn half_precision_bounds() {
    check(Variant::HalfPrecision, 1e-3, 1e-2, 40.0);
}

#[test]
fn lora_bounds_and_fit() {
    let spec = check(Variant::Lora, 5e-4, 5e-3, 50.0);
    let c = spec.build().unwrap().counts();
    assert!(c.trainable < 2_000_000, "{c:?}");
    assert!(c.trainable + c.non_trainable < 25_000_000, "{c:?}");
    let acc = fits(Variant::Lora);
    assert!(acc >= 0.8, "lora fit best accuracy {acc}");
}

#[test]
fn low_precision_bounds() {
    let spec = check(Variant::LowPrecision, 0.1, 0.5, 15.0);
    let c = spec.build().unwrap().counts();
    assert!(c.trainable + c.non_trainable < 15_000_000, "{c:?}");
}

#[test]
fn qlora_bounds_and_fit() {
    let spec = check(Variant::Qlora, 0.1, 0.5, 20.0);
    let c = spec.build().unwrap().counts();
    assert!(c.trainable < 1_500_000, "{c:?}");
    assert!(c.trainable + c.non_trainable < 15_000_000, "{c:?}");
    let acc = fits(Variant::Qlora);
    assert!(acc >= 0.8, "qlora fit best accuracy {acc}");
}

#[test]
fn lower_precision_bounds() {
    check(Variant::LowerPrecision, 0.1, 0.5, 9.0);
}
