//! Time to load a width-1024 BigNet from a quantized checkpoint (mapped, no re-quantizing) and,
//! for comparison, from an f32 state dict (quantizing on load).
//!
//! `cargo bench --bench checkpoint_load`

use criterion::{criterion_group, criterion_main, Criterion};
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::persist::save_model;
use nibble::bignet::Variant;

fn benches(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("nibble-load-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = c.benchmark_group("load_d1024");
    g.sample_size(20);
    let f32_path = dir.join("bignet.safetensors");
    save_model(
        &ModelSpec::seeded(Variant::Bignet, 0).build().unwrap(),
        &f32_path,
    )
    .unwrap();
    for variant in [
        Variant::LowPrecision,
        Variant::Nf4,
        Variant::Nf4Dq,
        Variant::Int8,
        Variant::LowerPrecision,
    ] {
        let path = dir.join(format!("{variant}.safetensors"));
        save_model(&ModelSpec::seeded(variant, 0).build().unwrap(), &path).unwrap();
        let spec = ModelSpec {
            weights: Some(path),
            ..ModelSpec::seeded(variant, 0)
        };
        g.bench_function(format!("{variant}_from_quantized_file"), |b| {
            b.iter(|| spec.build().unwrap())
        });
    }
    let spec = ModelSpec {
        weights: Some(f32_path),
        ..ModelSpec::seeded(Variant::LowPrecision, 0)
    };
    g.bench_function("low_precision_from_f32_file", |b| {
        b.iter(|| spec.build().unwrap())
    });
    g.finish();
    std::fs::remove_dir_all(&dir).ok();
}

criterion_group!(load, benches);
criterion_main!(load);
