//! BigNet at width 128 against PyTorch: every variant's output, checkpoint formats, and the LoRA
//! training case (loss, gradients, three AdamW steps). Data made by `bignet_ref.py`; see
//! `tests/data/README.md`.

#[path = "../crates/tensor/tests/common/mod.rs"]
mod common;
use nibble::autograd::{AdamW, AdamWConfig, Optimizer, Param, Tape};
use nibble::bignet::checkpoint::Checkpoint;
use nibble::bignet::loader::ModelSpec;
use nibble::bignet::{BigNet, Variant};
use nibble::tensor::{Tensor, WeightMatrix};
use std::path::PathBuf;
use std::sync::Arc;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn load(variant: Variant, file: &str) -> BigNet {
    ModelSpec {
        weights: Some(data(file)),
        ..ModelSpec::seeded(variant, 0)
    }
    .build()
    .unwrap()
}

/// The error `spec` builds to (the test fails if it builds a model).
fn build_err(spec: ModelSpec) -> String {
    spec.build().map(|_| ()).unwrap_err().to_string()
}

fn golden(file: &Checkpoint, key: &str) -> Tensor {
    file.tensor_f32(key, None).unwrap()
}

/// A tensor to write: its key, dtype, shape and bytes.
type Tensors = (String, nibble::io::DType, Vec<usize>, Vec<u8>);

/// `spec` built from `tensors` (with `metadata`) written to a safetensors file of its own in
/// the temp folder (named after `tag`), which is removed after; the error as text.
fn build_from_tensors(
    tag: &str,
    tensors: &[Tensors],
    metadata: &std::collections::BTreeMap<String, String>,
    spec: ModelSpec,
) -> Result<BigNet, String> {
    let refs: Vec<(String, nibble::io::DType, Vec<usize>, &[u8])> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_slice()))
        .collect();
    let path = std::env::temp_dir().join(format!(
        "nibble_golden_{tag}_{}.safetensors",
        std::process::id()
    ));
    nibble::io::write_safetensors(&path, &refs, metadata).unwrap();
    let model = ModelSpec {
        weights: Some(path.clone()),
        ..spec
    }
    .build();
    std::fs::remove_file(&path).ok();
    model.map_err(|e| e.to_string())
}

/// max |a - b| / max |b|
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (max, _) = a.abs_diff_stats(b).unwrap();
    max / b.max_abs().max(1e-12)
}

#[test]
fn every_variant_matches_pytorch_within_1e_5() {
    let io = Checkpoint::open(data("io_d128.safetensors")).unwrap();
    let x = golden(&io, "x");
    for variant in [
        Variant::Bignet,
        Variant::HalfPrecision,
        Variant::Lora,
        Variant::LowPrecision,
        Variant::Qlora,
    ] {
        let model = load(variant, "bignet_d128.safetensors");
        assert_eq!(model.dim(), 128);
        let y = model.infer(&x).unwrap();
        let want = golden(&io, &format!("y.{}", variant.name()));
        let (max, _) = y.abs_diff_stats(&want).unwrap();
        assert!(max < 1e-5, "{variant}: max |diff| {max}");
    }
}

#[test]
fn pth_and_safetensors_load_to_identical_tensors_and_outputs() {
    let a = Checkpoint::open(data("bignet_d128.pth")).unwrap();
    let b = Checkpoint::open(data("bignet_d128.safetensors")).unwrap();
    let ka: Vec<&str> = a.keys().collect();
    let kb: Vec<&str> = b.keys().collect();
    assert_eq!(ka, kb);
    assert_eq!(ka.len(), 46); // 18 weights, 18 biases, 5 x 2 LayerNorm
    for k in ka {
        assert_eq!(a.info(k), b.info(k), "{k}");
        assert_eq!(a.bytes(k).unwrap(), b.bytes(k).unwrap(), "{k}");
    }
    let x = golden(&Checkpoint::open(data("io_d128.safetensors")).unwrap(), "x");
    let ya = load(Variant::Bignet, "bignet_d128.pth").infer(&x).unwrap();
    let yb = load(Variant::Bignet, "bignet_d128.safetensors")
        .infer(&x)
        .unwrap();
    assert_eq!(ya, yb);
}

/// The LoRA model of `grad_d128`, with its adapters set to `init.*`.
fn lora_case() -> (BigNet, Checkpoint, Vec<Param>) {
    let g = Checkpoint::open(data("grad_d128.safetensors")).unwrap();
    let model = load(Variant::Lora, "bignet_d128.safetensors");
    let params = model.trainable_params();
    assert_eq!(params.len(), 36, "A and B of 18 layers");
    for p in &params {
        *p.value_mut() = golden(&g, &format!("init.{}", p.name()));
    }
    (model, g, params)
}

#[test]
fn lora_loss_and_gradients_match_pytorch() {
    lora_loss_and_gradients_match_pytorch_with(false);
}

#[test]
fn checkpointed_lora_loss_and_gradients_match_pytorch() {
    lora_loss_and_gradients_match_pytorch_with(true);
}

fn lora_loss_and_gradients_match_pytorch_with(checkpoint: bool) {
    let (model, g, params) = lora_case();
    let head: Arc<dyn WeightMatrix> = Arc::new(golden(&g, "head"));
    let (x, y) = (golden(&g, "x"), golden(&g, "y"));
    let tape = Tape::new();
    let input = tape.leaf(x);
    let out = model.forward_with(&tape, &input, checkpoint).unwrap();
    let logits = tape.frozen_linear(&out, &head, None).unwrap();
    let want_logits = golden(&g, "logits");
    let got_logits = logits.value().clone().reshape(&[32]).unwrap();
    assert!(rel_err(&got_logits, &want_logits) < 1e-4);
    let loss = tape.bce_with_logits(&logits, &y).unwrap();
    let want_loss = golden(&g, "loss").data()[0];
    let got_loss = loss.value().item().unwrap();
    assert!(
        ((got_loss - want_loss) / want_loss).abs() < 1e-4,
        "{got_loss} vs {want_loss}"
    );
    let grads = tape.backward(&loss).unwrap();
    let gx = grads.get(&input).unwrap();
    let e = rel_err(gx, &golden(&g, "grad.x"));
    assert!(e < 1e-4, "grad.x rel err {e}");
    for p in &params {
        let got = p.grad().as_ref().unwrap().clone();
        let e = rel_err(&got, &golden(&g, &format!("grad.{}", p.name())));
        assert!(e < 1e-4, "grad.{}: rel err {e}", p.name());
    }
}

#[test]
fn three_adamw_steps_match_pytorch() {
    let (model, g, params) = lora_case();
    let head: Arc<dyn WeightMatrix> = Arc::new(golden(&g, "head"));
    let (x, y) = (golden(&g, "x"), golden(&g, "y"));
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default()).unwrap();
    let tape = Tape::new();
    let want_losses = golden(&g, "adamw3.losses");
    for step in 0..3 {
        opt.zero_grad();
        let out = model
            .forward(&tape, &nibble::autograd::Var::constant(x.clone()))
            .unwrap();
        let logits = tape.frozen_linear(&out, &head, None).unwrap();
        let loss = tape.bce_with_logits(&logits, &y).unwrap();
        let l = loss.value().item().unwrap();
        let want = want_losses.data()[step];
        assert!(
            ((l - want) / want).abs() < 1e-4,
            "step {step}: {l} vs {want}"
        );
        tape.backward(&loss).unwrap();
        opt.step().unwrap();
    }
    for p in &params {
        let want = golden(&g, &format!("adamw3.{}", p.name()));
        let (max, _) = p.value().abs_diff_stats(&want).unwrap();
        // AdamW divides each moment by its own root, so an element whose gradient is near
        // zero still takes a step of about lr (1e-3) and that step's size does not shrink with
        // the gradient's rounding: the kernel paths (which sum in different orders) land within
        // about 1 % of a step of PyTorch (largest 8.5e-6 on the AVX-512 and AVX2 paths,
        // 1.02e-5 on the portable and scalar ones, 2026-12-05). A wrong update is off by a
        // whole step.
        assert!(max < 2e-5, "adamw3.{}: max |diff| {max}", p.name());
    }
}

#[test]
fn q4_codes_are_bit_exact_for_every_layer() {
    let io = Checkpoint::open(data("io_d128.safetensors")).unwrap();
    let model = load(Variant::LowPrecision, "bignet_d128.safetensors");
    for layer in model.linears() {
        let key = format!("q4.{}.weight", layer.name);
        let (w, _) = layer.dense_weight_and_bias();
        let want = golden(&io, &format!("{key}.dequant"));
        assert_eq!(w, want, "{key}: dequantized weights differ");
    }
}

/// A BigNet whose Linears bitsandbytes quantized (`Linear4bit`, NF4, double-quantized; width 64,
/// `tools/golden/make_bnb.py`) loads as nf4_dq straight from bitsandbytes' layout and gives
/// bitsandbytes' output; asked as another variant, it is an error naming both.
#[test]
fn a_bitsandbytes_quantized_bignet_runs_as_nf4_dq() {
    let io = Checkpoint::open(data("bignet_bnb_io_d64.safetensors")).unwrap();
    let model = load(Variant::Nf4Dq, "bignet_bnb_dq_d64.safetensors");
    assert_eq!(model.dim(), 64);
    let y = model.infer(&golden(&io, "x")).unwrap();
    let err = rel_err(&y, &golden(&io, "y"));
    assert!(err < 1e-5, "relative error {err} against bitsandbytes");
    let e = build_err(ModelSpec {
        weights: Some(data("bignet_bnb_dq_d64.safetensors")),
        ..ModelSpec::seeded(Variant::Nf4, 0)
    });
    assert!(e.contains("nf4_dq") && e.contains("nf4"), "{e}");
}

/// The same NF4 BigNet with its packed codes stored as bf16 or f32 elements (bitsandbytes'
/// `quant_storage`, as FSDP-QLoRA saves them): the same bytes, so the same output bit for bit.
/// Read as floats, some pairs of codes were NaN and the model was refused.
#[test]
fn bitsandbytes_codes_in_float_storage_are_read_as_their_bytes() {
    let file = Checkpoint::open(data("bignet_bnb_dq_d64.safetensors")).unwrap();
    let x = golden(
        &Checkpoint::open(data("bignet_bnb_io_d64.safetensors")).unwrap(),
        "x",
    );
    let want = load(Variant::Nf4Dq, "bignet_bnb_dq_d64.safetensors")
        .infer(&x)
        .unwrap();
    for (storage, size) in [(nibble::io::DType::BF16, 2), (nibble::io::DType::F32, 4)] {
        let mut nan_pattern = false;
        let tensors: Vec<Tensors> = file
            .keys()
            .map(|k| {
                let (dtype, shape) = file.info(k).unwrap();
                let bytes = file.bytes(k).unwrap().to_vec();
                let codes =
                    dtype == nibble::io::DType::U8 && nibble::io::bnb::is_bnb_4bit(&file, k);
                if codes {
                    nan_pattern |= bytes.chunks_exact(size).any(|c| match size {
                        2 => half::bf16::from_le_bytes([c[0], c[1]]).is_nan(),
                        _ => f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_nan(),
                    });
                    (k.to_string(), storage, vec![bytes.len() / size, 1], bytes)
                } else {
                    (k.to_string(), dtype, shape.to_vec(), bytes)
                }
            })
            .collect();
        assert!(
            nan_pattern,
            "{storage:?}: no code bytes read as NaN; the test tests nothing"
        );
        let model = build_from_tensors(
            &format!("bnb_storage_{storage:?}"),
            &tensors,
            file.metadata(),
            ModelSpec::seeded(Variant::Nf4Dq, 0),
        );
        let y = model
            .unwrap_or_else(|e| panic!("{storage:?}: {e}"))
            .infer(&x)
            .unwrap();
        assert_eq!(y.data(), want.data(), "{storage:?}");
    }
}

/// A bitsandbytes BigNet with one Linear left in f32 (`llm_int8_skip_modules`; here the
/// NF4 and the 8-bit goldens with `model.0.model.2` replaced by its f32 values): read as f32
/// weights, each quantized layer dequantized as bitsandbytes computes it, bitsandbytes'
/// output. Such a model was refused (the error named `….weight.nf4.packed`, a key of nibble's
/// own layout) because the first Linear alone chose the format.
#[test]
fn a_bitsandbytes_bignet_with_f32_layers_runs_as_f32_weights() {
    for (file, io) in [
        (
            "bignet_bnb_dq_d64.safetensors",
            "bignet_bnb_io_d64.safetensors",
        ),
        (
            "bignet_bnb8_d64.safetensors",
            "bignet_bnb8_io_d64.safetensors",
        ),
    ] {
        let ck = Checkpoint::open(data(file)).unwrap();
        let skipped = "model.0.model.2";
        let weight = format!("{skipped}.weight");
        let dense = if nibble::io::bnb::is_bnb_4bit(&ck, &weight) {
            nibble::io::bnb::read_bnb_4bit_f32(&ck, &weight).unwrap()
        } else {
            nibble::io::bnb::read_bnb_8bit(&ck, &weight)
                .unwrap()
                .0
                .matrix()
                .to_f32()
        };
        let mut tensors: Vec<Tensors> = ck
            .keys()
            .filter(|k| !k.starts_with(&format!("{skipped}.")) || *k == format!("{skipped}.bias"))
            .map(|k| {
                let (dtype, shape) = ck.info(k).unwrap();
                (
                    k.to_string(),
                    dtype,
                    shape.to_vec(),
                    ck.bytes(k).unwrap().to_vec(),
                )
            })
            .collect();
        let bytes = dense.data().iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((
            weight,
            nibble::io::DType::F32,
            dense.shape().to_vec(),
            bytes,
        ));
        let model = build_from_tensors(
            &format!("bnb_skip_{file}"),
            &tensors,
            ck.metadata(),
            ModelSpec::seeded(Variant::Bignet, 0),
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        let io = Checkpoint::open(data(io)).unwrap();
        let err = rel_err(&model.infer(&golden(&io, "x")).unwrap(), &golden(&io, "y"));
        assert!(
            err < 1e-5,
            "{file}: relative error {err} against bitsandbytes"
        );
    }
}

/// A BigNet whose Linears are bitsandbytes 8-bit layers (`Linear8bitLt`, width 64,
/// `tools/golden/make_bnb_more.py`) loads as the int8 variant from their codes and row scales
/// and gives bitsandbytes' output.
#[test]
fn a_bitsandbytes_8bit_bignet_runs_as_int8() {
    let io = Checkpoint::open(data("bignet_bnb8_io_d64.safetensors")).unwrap();
    let model = load(Variant::Int8, "bignet_bnb8_d64.safetensors");
    assert_eq!(model.dim(), 64);
    let y = model.infer(&golden(&io, "x")).unwrap();
    let err = rel_err(&y, &golden(&io, "y"));
    assert!(err < 1e-5, "relative error {err} against bitsandbytes");
    let e = build_err(ModelSpec {
        weights: Some(data("bignet_bnb8_d64.safetensors")),
        ..ModelSpec::seeded(Variant::Nf4, 0)
    });
    assert!(e.contains("int8") && e.contains("nf4"), "{e}");
}

/// A BigNet whose Linears are bitsandbytes FP4 layers (width 64, `make_bnb_more.py`) reads as
/// the f32 weights bitsandbytes computes with: the bignet variant by default, with
/// bitsandbytes' output; a quantized variant quantizes those weights as it would any f32 ones.
#[test]
fn a_bitsandbytes_fp4_bignet_runs_as_f32_weights() {
    let io = Checkpoint::open(data("bignet_bnb_fp4_io_d64.safetensors")).unwrap();
    let model = load(Variant::Bignet, "bignet_bnb_fp4_d64.safetensors");
    assert_eq!(model.dim(), 64);
    let y = model.infer(&golden(&io, "x")).unwrap();
    let err = rel_err(&y, &golden(&io, "y"));
    assert!(err < 1e-5, "relative error {err} against bitsandbytes");
    let nf4 = load(Variant::Nf4, "bignet_bnb_fp4_d64.safetensors");
    let err = rel_err(&nf4.infer(&golden(&io, "x")).unwrap(), &golden(&io, "y"));
    assert!(err < 0.2, "nf4 of the FP4 weights: relative error {err}");
}

/// The reference's LoRA model saved whole after training (`torch.save(net.state_dict())`: its
/// adapters as `<layer>.lora_a.weight` / `lora_b.weight`, rank 8; width 64,
/// `tools/golden/make_lora_state_dict.py`) runs as lora with those adapters and gives the
/// reference's output; a variant without adapters is an error naming a key, not a model that
/// drops them.
#[test]
fn a_lora_state_dict_runs_with_its_own_adapters() {
    let io = Checkpoint::open(data("bignet_lora_sd_io_d64.safetensors")).unwrap();
    let (x, want) = (golden(&io, "x"), golden(&io, "y"));
    let model = load(Variant::Lora, "bignet_lora_sd_d64.pth");
    assert!(model
        .linears()
        .all(|l| l.lora.as_ref().map(|a| a.rank()) == Some(8)));
    let err = rel_err(&model.infer(&x).unwrap(), &want);
    assert!(err < 1e-5, "relative error {err} against the reference");
    // qlora keeps them too (over Q4 weights: off by the quantization only).
    let q = load(Variant::Qlora, "bignet_lora_sd_d64.pth");
    let err = rel_err(&q.infer(&x).unwrap(), &want);
    assert!(err < 5e-2, "qlora: relative error {err}");
    let file = Checkpoint::open(data("bignet_lora_sd_d64.pth")).unwrap();
    for layer in q.linears() {
        let lora = layer.lora.as_ref().unwrap();
        for (half, p) in [("lora_a", &lora.a), ("lora_b", &lora.b)] {
            let key = format!("{}.{half}.weight", layer.name);
            assert_eq!(*p.value(), golden(&file, &key), "qlora's {key}");
        }
    }
    for variant in [
        Variant::Bignet,
        Variant::HalfPrecision,
        Variant::LowPrecision,
    ] {
        let e = build_err(ModelSpec {
            weights: Some(data("bignet_lora_sd_d64.pth")),
            ..ModelSpec::seeded(variant, 0)
        });
        assert!(
            e.contains("lora_a.weight") && e.contains("lora"),
            "{variant}: {e}"
        );
    }
}

/// The reference's qlora model saved whole after training holds no 4-bit weights (PyTorch does
/// not save its buffers): with the f32 state dict it came from as the base and the saved file
/// as the adapter it gives the reference's output; the file alone is an error saying so; an
/// adapter file over another base (its biases differ) is an error naming the key.
#[test]
fn a_qlora_state_dict_runs_as_the_adapter_of_its_base() {
    let io = Checkpoint::open(data("bignet_qlora_sd_io_d64.safetensors")).unwrap();
    let spec = |base: &str, variant| ModelSpec {
        weights: Some(data(base)),
        adapter: Some(data("bignet_qlora_sd_d64.pth")),
        ..ModelSpec::seeded(variant, 0)
    };
    let model = spec("bignet_qlora_base_d64.pth", Variant::Qlora)
        .build()
        .unwrap();
    assert!(model
        .linears()
        .all(|l| l.lora.as_ref().map(|a| a.rank()) == Some(32)));
    let err = rel_err(&model.infer(&golden(&io, "x")).unwrap(), &golden(&io, "y"));
    assert!(err < 1e-5, "relative error {err} against the reference");
    // low_precision gets the adapters attached, as with a PEFT directory.
    let low = spec("bignet_qlora_base_d64.pth", Variant::LowPrecision)
        .build()
        .unwrap();
    let err = rel_err(&low.infer(&golden(&io, "x")).unwrap(), &golden(&io, "y"));
    assert!(err < 1e-5, "low_precision + adapter: relative error {err}");
    let e = build_err(ModelSpec {
        weights: Some(data("bignet_qlora_sd_d64.pth")),
        ..ModelSpec::seeded(Variant::Qlora, 0)
    });
    assert!(
        e.contains("--adapter") && e.contains("model.0.model.0.weight"),
        "{e}"
    );
    // Over a base that carries adapters of its own: two sets, refused (the file's were
    // replaced without a word).
    let e = build_err(spec("bignet_lora_sd_d64.pth", Variant::Qlora));
    assert!(e.contains("holds LoRA adapters"), "{e}");
    // Over another base of the same width (that one less its adapters): its biases differ
    // from the file's.
    let other = Checkpoint::open(data("bignet_lora_sd_d64.pth")).unwrap();
    let tensors: Vec<Tensors> = other
        .keys()
        .filter(|k| !k.contains(".lora_"))
        .map(|k| {
            let t = other.tensor_f32(k, None).unwrap();
            let b = t.data().iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.to_string(), nibble::io::DType::F32, t.shape().to_vec(), b)
        })
        .collect();
    let e = build_from_tensors(
        "other_base",
        &tensors,
        &Default::default(),
        spec("bignet_qlora_base_d64.pth", Variant::Qlora),
    )
    .map(|_| ())
    .unwrap_err();
    assert!(
        e.contains("model.0.model.0.bias") && e.contains("element 0"),
        "{e}"
    );
}

/// A state dict saved from a wrapped model (DataParallel's `module.`, `torch.compile`'s
/// `_orig_mod.`) is read under the wrapper's path: the same model, bit for bit; a file where
/// only some keys carry the path is still an error naming the missing key.
#[test]
fn a_state_dict_of_a_wrapped_model_is_read_under_its_path() {
    let file = Checkpoint::open(data("bignet_d128.pth")).unwrap();
    let dir = std::env::temp_dir().join(format!("nibble_wrapped_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, rename: &dyn Fn(&str) -> String| {
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
            .keys()
            .map(|k| {
                let t = file.tensor_f32(k, None).unwrap();
                let b = t.data().iter().flat_map(|x| x.to_le_bytes()).collect();
                (rename(k), t.shape().to_vec(), b)
            })
            .collect();
        let refs: Vec<(String, nibble::io::DType, Vec<usize>, &[u8])> = tensors
            .iter()
            .map(|(k, s, b)| (k.clone(), nibble::io::DType::F32, s.clone(), b.as_slice()))
            .collect();
        let path = dir.join(name);
        nibble::io::write_safetensors(&path, &refs, &Default::default()).unwrap();
        path
    };
    let x = golden(&Checkpoint::open(data("io_d128.safetensors")).unwrap(), "x");
    let plain = load(Variant::Bignet, "bignet_d128.pth").infer(&x).unwrap();
    for prefix in ["module.", "_orig_mod.", "module._orig_mod."] {
        let path = write(&format!("{prefix}safetensors"), &|k| format!("{prefix}{k}"));
        let model = ModelSpec {
            weights: Some(path),
            ..ModelSpec::seeded(Variant::LowPrecision, 0)
        };
        let bignet = ModelSpec {
            variant: Variant::Bignet,
            ..model.clone()
        };
        assert_eq!(
            bignet.build().unwrap().infer(&x).unwrap().data(),
            plain.data(),
            "{prefix}"
        );
        model.build().unwrap();
    }
    let half = write("half.safetensors", &|k| {
        if k.starts_with("model.0.") {
            format!("module.{k}")
        } else {
            k.to_string()
        }
    });
    let e = build_err(ModelSpec {
        weights: Some(half),
        ..ModelSpec::seeded(Variant::Bignet, 0)
    });
    assert!(e.contains("model.0.model.0.weight"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Altered copies of the LoRA state dict: each an error naming the key, none a model.
#[test]
fn a_lora_state_dict_with_broken_adapters_is_an_error_naming_the_key() {
    let file = Checkpoint::open(data("bignet_lora_sd_d64.pth")).unwrap();
    let entries: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .keys()
        .map(|k| {
            let t = file.tensor_f32(k, None).unwrap();
            (k.to_string(), t.shape().to_vec(), t.data().to_vec())
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("nibble_lora_sd_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a3 = "model.2.model.2.lora_a.weight";
    let b3 = "model.2.model.2.lora_b.weight";
    type Alter = fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>);
    let cases: [(&str, Alter, &[&str]); 4] = [
        (
            "lone_b",
            |e| e.retain(|t| t.0 != "model.2.model.2.lora_a.weight"),
            &[b3, a3],
        ),
        (
            "ranks_differ",
            |e| {
                let t = e
                    .iter_mut()
                    .find(|t| t.0 == "model.2.model.2.lora_a.weight")
                    .unwrap();
                t.1 = vec![4, 64];
                t.2.truncate(4 * 64);
            },
            &[a3, "[4, 64]"],
        ),
        (
            "nan",
            |e| {
                let t = e
                    .iter_mut()
                    .find(|t| t.0 == "model.2.model.2.lora_b.weight")
                    .unwrap();
                t.2[5] = f32::NAN;
            },
            &[b3, "element 5"],
        ),
        (
            "stray",
            |e| {
                let t = e
                    .iter()
                    .find(|t| t.0 == "model.2.model.2.lora_b.weight")
                    .unwrap()
                    .clone();
                e.push(("model.2.model.9.lora_b.weight".into(), t.1, t.2));
            },
            &["model.2.model.9.lora_b.weight"],
        ),
    ];
    for (name, alter, parts) in cases {
        let mut e = entries.clone();
        alter(&mut e);
        let bytes: Vec<(String, nibble::io::DType, Vec<usize>, Vec<u8>)> = e
            .iter()
            .map(|(k, s, v)| {
                let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (k.clone(), nibble::io::DType::F32, s.clone(), b)
            })
            .collect();
        let refs: Vec<(String, nibble::io::DType, Vec<usize>, &[u8])> = bytes
            .iter()
            .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_slice()))
            .collect();
        let path = dir.join(format!("{name}.safetensors"));
        nibble::io::write_safetensors(&path, &refs, &Default::default()).unwrap();
        let e = build_err(ModelSpec {
            weights: Some(path),
            ..ModelSpec::seeded(Variant::Lora, 0)
        });
        for p in parts {
            assert!(e.contains(p), "{name}: `{p}` missing from: {e}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A PEFT adapter on the reference's BigNet with per-module ranks and alphas, rsLoRA and
/// `bias = "all"` (every Linear's and LayerNorm's bias trained; `tests/data/peft_variants`,
/// PEFT 0.21.2): on the f32 bignet PEFT's output, on the f16 lora variant within f16's
/// rounding of the base.
#[test]
fn a_peft_adapter_with_patterns_and_trained_biases_gives_pefts_output() {
    let io = Checkpoint::open(data("peft_variants/bignet_d128_io.safetensors")).unwrap();
    let (x, want) = (golden(&io, "bignet_x"), golden(&io, "bignet_y"));
    for (variant, bound) in [(Variant::Bignet, 1e-5), (Variant::Lora, 2e-3)] {
        let model = ModelSpec {
            weights: Some(data("bignet_d128.pth")),
            adapter: Some(data("peft_variants/bignet_d128")),
            ..ModelSpec::seeded(variant, 0)
        }
        .build()
        .unwrap();
        let err = rel_err(&model.infer(&x).unwrap(), &want);
        assert!(err < bound, "{variant}: relative error {err} against PEFT");
    }
    // Without the adapter the output is another one (so the comparison means something).
    let plain = load(Variant::Bignet, "bignet_d128.pth");
    assert!(rel_err(&plain.infer(&x).unwrap(), &want) > 1e-2);
}

/// The f32 bignet of `bignet_d128.pth` with the PEFT adapter `peft_variants/<adapter>`.
fn with_peft_adapter(adapter: &str) -> BigNet {
    ModelSpec {
        weights: Some(data("bignet_d128.pth")),
        adapter: Some(data(&format!("peft_variants/{adapter}"))),
        ..ModelSpec::seeded(Variant::Bignet, 0)
    }
    .build()
    .unwrap()
}

/// `model`'s output on the one row `x` through the batch-1 team on a pool of `threads` threads
/// (1: the caller's pool), trying again while another test's team holds the pool's team slot.
fn on_team(model: &BigNet, x: &Tensor, threads: usize) -> Tensor {
    for _ in 0..500 {
        let run = || model.infer_on_team(x);
        let got = if threads == 1 {
            run()
        } else {
            common::in_pool(threads, run)
        };
        if let Some(got) = got {
            return got.unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("the batch-1 team never ran");
}

/// Asserts that `model` merged into f32 gives `want` on `x` within 1e-5 (relative).
fn assert_merged_gives(model: &BigNet, x: &Tensor, want: &Tensor) {
    let (merged, _) =
        nibble::bignet::merge::merge_adapters(model, nibble::bignet::variant::WeightFormat::F32)
            .unwrap();
    let err = rel_err(&merged.infer(x).unwrap(), want);
    assert!(
        err < 1e-5,
        "merged: relative error {err} against PEFT's merge"
    );
}

/// PEFT's `lora_bias` on the reference's BigNet (`tests/data/peft_variants/lora_bias_bignet`,
/// PEFT 0.21.2, `tools/golden/make_peft_lora_bias.py`; it was refused): PEFT's output with
/// the adapter on the f32 bignet, and merged into f32 the output of PEFT's
/// `merge_and_unload()` (each lora_B bias, scaled, added to its layer's bias).
#[test]
fn a_peft_adapter_with_lora_bias_gives_pefts_output_and_merges_as_peft_merges() {
    let io = Checkpoint::open(data("peft_variants/lora_bias_logits.safetensors")).unwrap();
    let x = golden(&io, "bignet_x");
    let (want, want_merged) = (golden(&io, "bignet_y"), golden(&io, "bignet_merged"));
    let model = with_peft_adapter("lora_bias_bignet");
    let err = rel_err(&model.infer(&x).unwrap(), &want);
    assert!(err < 1e-5, "relative error {err} against PEFT");
    assert_merged_gives(&model, &x, &want_merged);
    let plain = load(Variant::Bignet, "bignet_d128.pth");
    assert!(rel_err(&plain.infer(&x).unwrap(), &want) > 1e-2);
}

/// A PEFT DoRA adapter on the reference's BigNet (`tests/data/peft_variants/dora_bignet`,
/// PEFT 0.21.2, `tools/golden/make_peft_dora_bignet.py`; BigNet refused DoRA): PEFT's output on
/// the f32 bignet, at batch 4 and 1, the same bits as the training forward (the tape's DoRA
/// path), and merged into f32 the output of PEFT's `merge_and_unload()` (each row of `W + s·B·A`
/// times its scale).
#[test]
fn a_peft_dora_adapter_gives_pefts_output_and_merges_as_peft_merges() {
    let io = Checkpoint::open(data("peft_variants/dora_bignet_io.safetensors")).unwrap();
    let (x, want, want_merged) = (golden(&io, "x"), golden(&io, "y"), golden(&io, "merged"));
    let model = with_peft_adapter("dora_bignet");
    assert!(model
        .linears()
        .all(|l| l.lora.as_ref().is_some_and(|a| a.dora.is_some())));
    let y = model.infer(&x).unwrap();
    let err = rel_err(&y, &want);
    assert!(err < 1e-5, "relative error {err} against PEFT");
    let tape = Tape::new();
    let taped = tape
        .no_grad(|| model.forward(&tape, &nibble::autograd::Var::constant(x.clone())))
        .unwrap();
    assert_eq!(
        taped.value().data(),
        y.data(),
        "infer and the tape's forward differ"
    );
    // One row: the batch-1 team (its row kernels scale DoRA's rows; the ordinary path ran
    // them before) gives the tape's bits on 2, 3 and 16 threads, and PEFT's output.
    let x1 = Tensor::from_vec(&[1, 128], x.data()[..128].to_vec()).unwrap();
    let want1 = Tensor::from_vec(&[1, 128], want.data()[..128].to_vec()).unwrap();
    let err = rel_err(&model.infer(&x1).unwrap(), &want1);
    assert!(err < 1e-5, "batch 1: relative error {err} against PEFT");
    let taped1 = tape
        .no_grad(|| model.forward(&tape, &nibble::autograd::Var::constant(x1.clone())))
        .unwrap();
    for threads in [2, 3, 16] {
        let team = on_team(&model, &x1, threads);
        assert_eq!(
            common::bits(team.data()),
            common::bits(taped1.value().data()),
            "{threads} threads"
        );
    }
    // And on the quantized and half bases; with int8 activations the team gives the ordinary
    // path's bits.
    for variant in [Variant::Qlora, Variant::Lora] {
        let model = ModelSpec {
            weights: Some(data("bignet_d128.pth")),
            adapter: Some(data("peft_variants/dora_bignet")),
            ..ModelSpec::seeded(variant, 0)
        }
        .build()
        .unwrap();
        let taped = tape
            .no_grad(|| model.forward(&tape, &nibble::autograd::Var::constant(x1.clone())))
            .unwrap();
        let team = on_team(&model, &x1, 3);
        assert_eq!(
            common::bits(team.data()),
            common::bits(taped.value().data()),
            "{variant}"
        );
        // A frozen weight's norms are computed once.
        for l in model.linears() {
            let norm = l.dora_norm().unwrap().unwrap();
            assert!(
                Arc::ptr_eq(&norm, &l.dora_norm().unwrap().unwrap()),
                "{variant}"
            );
        }
        use nibble::quant::act8::{with_activations, ActivationMode::Int8};
        let ordinary = common::in_pool(1, || with_activations(Int8, || model.infer(&x1).unwrap()));
        let team = common::in_pool(3, || with_activations(Int8, || on_team(&model, &x1, 1)));
        assert_eq!(
            common::bits(team.data()),
            common::bits(ordinary.data()),
            "{variant}, int8 activations"
        );
    }
    assert_merged_gives(&model, &x, &want_merged);
    // The magnitudes matter: plain LoRA with the same A and B gives another output.
    let mut plain = model.clone();
    for l in plain.linears_mut() {
        l.lora.as_mut().unwrap().dora = None;
    }
    assert!(rel_err(&plain.infer(&x).unwrap(), &want) > 1e-3);
}
