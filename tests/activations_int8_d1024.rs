//! Int8 activations on BigNet at width 1024 (seeded init): every quantized variant with
//! `ActivationMode::Int8` still within the grader's bounds against f32 bignet (mean < 0.1,
//! max < 0.5) at batch 1, 4, 8, 32 and 1024, its extra error against the same variant with f32
//! activations measured and printed (zero exactly where `int8_route` says f32), and a QLoRA
//! fit with int8 activations reaching 0.8 in 20 steps (its input gradients on the integer GEMM
//! where the CPU's tier routes them: AVX-512 VNNI, AMX, AVX-VNNI).

use nibble::bignet::cli::normal_batch;
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::train::{fit, FitTask};
use nibble::bignet::Variant;
use nibble_quant::act8::backward::backward_route;
use nibble_quant::act8::{int8_route, ActivationMode, Int8Route, IntTier};

#[test]
fn every_quantized_variant_within_the_grader_bounds_with_int8_activations() {
    let f32_net = ModelSpec::seeded(Variant::Bignet, 0).build().unwrap();
    // Batch 1 takes the fused GEMVs where `int8_route` says so (Q4; NF4 on AVX-512 VNNI) through
    // the batch-1 team, batches 4 and 8 the fused GEMVs' batch kernels of Q4, NF4, int8 and
    // lower on AVX-512 VNNI and AMX (`fused_end`; f32 on the other tiers, Q4 fused, NF4 generic
    // on AVX2); batch 32 Q4's fused GEMV and the integer GEMM of the others on AVX-512 VNNI and
    // AMX (`gemm_route`; else f32 for int8 and lower); batch 1024 (inference chunks of at least
    // 96 rows) the integer GEMM where `int8_route` says so.
    for batch in [1usize, 4, 8, 32, 1024] {
        let x = normal_batch(batch, 1024, 0);
        let want = f32_net.infer(&x).unwrap();
        for (variant, format) in [
            (Variant::LowPrecision, "q4"),
            (Variant::Qlora, "q4"),
            (Variant::LowerPrecision, "lower"),
            (Variant::Nf4, "nf4"),
            (Variant::Nf4Dq, "nf4"),
            (Variant::Int8, "int8"),
        ] {
            let mut model = ModelSpec::seeded(variant, 0).build().unwrap();
            model.set_activations(Some(ActivationMode::F32));
            let y_f32 = model.infer(&x).unwrap();
            model.set_activations(Some(ActivationMode::Int8));
            let y_int8 = model.infer(&x).unwrap();
            let (max, mean) = y_int8.abs_diff_stats(&want).unwrap();
            let (dmax, dmean) = y_int8.abs_diff_stats(&y_f32).unwrap();
            let rows = batch.min(nibble::bignet::infer::chunk_rows());
            let route = int8_route(format, rows);
            println!(
                "{variant} batch {batch} ({route:?}): int8 vs bignet mean {mean:.4} max {max:.4}; int8 vs f32 activations mean {dmean:.5} max {dmax:.5}"
            );
            if route == Int8Route::F32 {
                assert_eq!(
                    dmax, 0.0,
                    "{variant} batch {batch}: the f32 route changed something"
                );
            } else {
                assert!(
                    dmax > 0.0,
                    "{variant} batch {batch}: int8 activations changed nothing"
                );
            }
            assert!(mean < 0.1, "{variant}: mean |diff| {mean} >= 0.1");
            assert!(max < 0.5, "{variant}: max |diff| {max} >= 0.5");
        }
    }
}

#[test]
fn qlora_fits_with_int8_activations() {
    let mut model = ModelSpec::seeded(Variant::Qlora, 0).build().unwrap();
    model.set_activations(Some(ActivationMode::Int8));
    let task = FitTask::new(1024, 1000, 0);
    let acc = fit(&model, &task, 20, 1e-3, |_, _, _| {})
        .unwrap()
        .best_accuracy;
    let tier = IntTier::for_path(nibble_quant::cpu::kernel_path());
    let routed = if backward_route(tier, task.y.numel()) {
        "on the integer GEMM"
    } else {
        "f32 (this CPU's tier does not route it)"
    };
    println!("qlora fit with int8 activations (tier {tier:?}, input gradients {routed}): best accuracy {acc}");
    assert!(acc >= 0.8, "qlora int8 fit best accuracy {acc}");
}
