//! The generic layers against PyTorch: `tests/data/seq_d30.{pth,safetensors}` hold
//! `nn.Sequential(Linear(30,48), GELU(), LayerNorm(48), Linear(48,48), ReLU(), Linear(48,5))`,
//! its logits and cross-entropy on a batch, and with rank-4 LoRA adapters on every Linear the
//! logits, loss and gradients of the input and of every adapter (made by
//! `make_seq_golden.py`; see `tests/data/README.md`).

use std::path::{Path, PathBuf};

use nibble_autograd::Tape;
use nibble_io::{Checkpoint, DType, WeightFormat};
use nibble_nn::{
    cross_entropy, peft, Activation, Layer, NormKind, Sequential, SequentialOptions, VarBuilder,
};
use nibble_tensor::Tensor;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

fn golden() -> Checkpoint {
    Checkpoint::open(data("seq_d30.safetensors")).unwrap()
}

fn tensor(ck: &Checkpoint, key: &str) -> Tensor {
    ck.tensor_f32(key, None).unwrap()
}

fn labels(ck: &Checkpoint) -> Vec<usize> {
    assert_eq!(ck.info("labels").unwrap().0, DType::I64);
    ck.bytes("labels")
        .unwrap()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize)
        .collect()
}

fn options() -> SequentialOptions {
    SequentialOptions::new()
        .activation_at(1, Activation::Gelu)
        .activation_at(4, Activation::Relu)
}

fn from_pth(options: &SequentialOptions) -> nibble_nn::Result<Sequential> {
    Sequential::from_state_dict(&Checkpoint::open(data("seq_d30.pth")).unwrap(), options)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.data()
        .iter()
        .zip(b.data())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn loss_of(model: &Sequential, x: &Tensor, labels: &[usize]) -> f32 {
    let tape = Tape::new();
    let logits = tape.no_grad(|| model.forward(&tape, &nibble_autograd::Var::constant(x.clone())));
    let loss = cross_entropy(&tape, &logits.unwrap(), labels).unwrap();
    loss.value().item().unwrap()
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-nn-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn structure_is_read_from_the_state_dict() {
    let model = from_pth(&options()).unwrap();
    let kinds: Vec<String> = model
        .layers()
        .iter()
        .map(|l| match l {
            Layer::Linear(l) => format!("linear {} {:?}", l.name, l.dims()),
            Layer::LayerNorm(n) => format!("layernorm {} {}", n.name, n.dim()),
            Layer::BatchNorm(n) => format!("batchnorm {} {}", n.name, n.dim()),
            Layer::PRelu(p) => format!("prelu {}", p.name),
            Layer::Activation(a) => a.to_string(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "linear 0 (48, 30)",
            "gelu",
            "layernorm 2 48",
            "linear 3 (48, 48)",
            "relu",
            "linear 5 (5, 48)"
        ]
    );
    let names: Vec<String> = model
        .params()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    assert_eq!(
        names,
        ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    );
    assert_eq!(
        model.model_bytes(),
        4 * (48 * 30 + 48 + 2 * 48 + 48 * 48 + 48 + 5 * 48 + 5)
    );
}

#[test]
fn logits_and_loss_match_pytorch_from_pth_and_safetensors() {
    let g = golden();
    let (x, want_logits, want_loss) = (tensor(&g, "x"), tensor(&g, "logits"), tensor(&g, "loss"));
    let labels = labels(&g);
    let from_st = Sequential::from_state_dict(&g, &options().prefix("model.")).unwrap();
    for model in [from_pth(&options()).unwrap(), from_st] {
        let logits = model.infer(&x).unwrap();
        assert!(
            max_diff(&logits, &want_logits) < 1e-5,
            "{}",
            max_diff(&logits, &want_logits)
        );
        let loss = loss_of(&model, &x, &labels);
        assert!((loss - want_loss.data()[0]).abs() < 1e-5, "{loss}");
    }
}

#[test]
fn packed_for_inference_matches_pytorch_and_saves_the_same_file() {
    let g = golden();
    let (x, want_logits) = (tensor(&g, "x"), tensor(&g, "logits"));
    let plain = from_pth(&options()).unwrap();
    let mut packed = plain.clone();
    packed.pack_for_inference().unwrap();
    assert!(packed.linears().all(|l| l.params().is_empty()));
    // The same bytes, plus the zero lanes that round each layer's outputs up to 16.
    let padding: usize = plain
        .linears()
        .map(|l| {
            let (out, inn) = l.dims();
            (out.next_multiple_of(16) - out) * inn * 4
        })
        .sum();
    assert_eq!(packed.model_bytes(), plain.model_bytes() + padding);
    let logits = packed.infer(&x).unwrap();
    assert!(
        max_diff(&logits, &want_logits) < 1e-5,
        "{}",
        max_diff(&logits, &want_logits)
    );
    if x.shape()[0] > 16 {
        assert_eq!(logits, plain.infer(&x).unwrap());
    }
    let dir = tempdir("packed");
    let (a, b) = (
        dir.join("plain.safetensors"),
        dir.join("packed.safetensors"),
    );
    plain.save(&a).unwrap();
    packed.save(&b).unwrap();
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Attaches the golden adapters (rank 4, unscaled) to a fresh model.
fn with_golden_lora(g: &Checkpoint) -> Sequential {
    let mut model = from_pth(&options()).unwrap();
    model.add_lora(4, 7).unwrap();
    for l in model.linears_mut() {
        let lora = l.lora.as_ref().unwrap();
        *lora.a.value_mut() = tensor(g, &format!("lora.{}.A", l.name));
        *lora.b.value_mut() = tensor(g, &format!("lora.{}.B", l.name));
    }
    model
}

#[test]
fn lora_logits_loss_and_gradients_match_pytorch() {
    let g = golden();
    let model = with_golden_lora(&g);
    // Only the adapters train.
    let trainable: Vec<String> = model
        .trainable_params()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    assert_eq!(
        trainable,
        [
            "0.lora_a.weight",
            "0.lora_b.weight",
            "3.lora_a.weight",
            "3.lora_b.weight",
            "5.lora_a.weight",
            "5.lora_b.weight"
        ]
    );
    let tape = Tape::new();
    let x = tape.leaf(tensor(&g, "x"));
    let logits = model.forward(&tape, &x).unwrap();
    let d = max_diff(logits.value(), &tensor(&g, "lora_logits"));
    assert!(d < 1e-5, "lora logits differ by {d}");
    let loss = cross_entropy(&tape, &logits, &labels(&g)).unwrap();
    let want = tensor(&g, "lora_loss").data()[0];
    assert!((loss.value().item().unwrap() - want).abs() < 1e-5);
    let grads = tape.backward(&loss).unwrap();
    let d = max_diff(grads.get(&x).unwrap(), &tensor(&g, "grad.x"));
    assert!(d < 1e-5, "grad x differs by {d}");
    for l in model.linears() {
        let lora = l.lora.as_ref().unwrap();
        for (which, p) in [("A", &lora.a), ("B", &lora.b)] {
            let want = tensor(&g, &format!("grad.lora.{}.{which}", l.name));
            let grad = p.grad();
            let got = grad.as_ref().expect("adapter has a gradient");
            let d = max_diff(got, &want);
            let scale = want.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(d < 1e-4 * scale.max(1.0), "grad {} {which}: {d}", l.name);
        }
    }
    // The frozen base got no gradient.
    for p in model.params().iter().filter(|p| !p.requires_grad()) {
        assert!(p.grad().is_none(), "{}", p.name());
    }
}

#[test]
fn add_lora_starts_at_the_base_model() {
    let g = golden();
    let x = tensor(&g, "x");
    let base = from_pth(&options()).unwrap().infer(&x).unwrap();
    let mut model = from_pth(&options()).unwrap();
    model.add_lora(8, 3).unwrap();
    for l in model.linears() {
        let lora = l.lora.as_ref().unwrap();
        let bound = 1.0 / (l.dims().1 as f32).sqrt();
        assert_eq!(lora.a.value().shape(), [8, l.dims().1]);
        assert!(lora.a.value().data().iter().all(|v| v.abs() <= bound));
        assert!(lora.a.value().data().iter().any(|v| *v != 0.0));
        assert!(lora.b.value().data().iter().all(|v| *v == 0.0));
    }
    assert_eq!(model.infer(&x).unwrap().data(), base.data());
    assert!(model.add_lora(0, 1).is_err());
}

#[test]
fn peft_adapter_round_trip() {
    let g = golden();
    let model = with_golden_lora(&g);
    let dir = tempdir("peft");
    peft::save_adapter(model.linears(), &dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 4);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["target_modules"], serde_json::json!(["0", "3", "5"]));
    let file = Checkpoint::open(dir.join("adapter_model.safetensors")).unwrap();
    let mut keys: Vec<&str> = file.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 6);
    assert_eq!(
        file.info("base_model.model.0.lora_A.weight").unwrap().1,
        [4, 30]
    );
    assert_eq!(
        file.info("base_model.model.5.lora_B.weight").unwrap().1,
        [5, 4]
    );

    // Loaded onto a model without adapters: the same logits as the golden LoRA model, and
    // only the adapters train.
    let mut loaded = from_pth(&options()).unwrap();
    loaded.load_adapter(&dir).unwrap();
    assert_eq!(loaded.trainable_params().len(), 6);
    assert!(loaded
        .trainable_params()
        .iter()
        .all(|p| p.name().contains(".lora_")));
    let x = tensor(&g, "x");
    let d = max_diff(&loaded.infer(&x).unwrap(), &tensor(&g, "lora_logits"));
    assert!(d < 1e-5, "{d}");

    // A quantized base takes the same adapter.
    let mut q = from_pth(&options().format(WeightFormat::Int8)).unwrap();
    peft::load_adapter(q.linears_mut(), &dir).unwrap();
    assert!(q.linears().all(|l| l.lora.is_some()));

    // lora_alpha = 2r: B is scaled by 2 on load.
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        text.replace("\"lora_alpha\": 4", "\"lora_alpha\": 8"),
    )
    .unwrap();
    let mut scaled = from_pth(&options()).unwrap();
    peft::load_adapter(scaled.linears_mut(), &dir).unwrap();
    let b = scaled
        .linears()
        .next()
        .unwrap()
        .lora
        .as_ref()
        .unwrap()
        .b
        .value()
        .clone();
    let want = tensor(&g, "lora.0.B");
    assert!(b.data().iter().zip(want.data()).all(|(x, y)| *x == 2.0 * y));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adapters_that_do_not_fit_are_errors() {
    let g = golden();
    let model = with_golden_lora(&g);
    let dir = tempdir("peft-bad");
    peft::save_adapter(model.linears(), &dir).unwrap();
    // A model whose Linear 0 is 30 -> 48 but here reads a different-width model: drop layer 5
    // from the candidate modules, so its tensors match nothing.
    let mut other = from_pth(&options()).unwrap();
    let e = peft::load_adapter(other.linears_mut().take(2), &dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("base_model.model.5.lora_") && e.contains("does not match"),
        "{e}"
    );
    // A rank in the config that is not the tensors' rank: shape errors name the key.
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        text.replace("\"r\": 4", "\"r\": 3"),
    )
    .unwrap();
    let e = peft::load_adapter(other.linears_mut(), &dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("[3, 30]") && e.contains("[4, 30]"),
        "{e}"
    );
    // Failed loads left the model untouched.
    assert!(other.linears().all(|l| l.lora.is_none()));
    // No adapters to save.
    let e = peft::save_adapter(other.linears(), &dir.join("none"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no layer has a LoRA adapter"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_format_runs_or_names_the_weight() {
    let g = golden();
    let x = tensor(&g, "x");
    let want = tensor(&g, "logits");
    for format in WeightFormat::ALL {
        match from_pth(&options().format(format)) {
            Ok(model) => {
                assert!(model.linears().all(|l| l.format() == format));
                let y = model.infer(&x).unwrap();
                let d = max_diff(&y, &want);
                let tolerance = match format {
                    WeightFormat::F32 => 1e-5,
                    WeightFormat::F16 => 1e-2,
                    _ => 0.5,
                };
                assert!(d < tolerance, "{format}: logits differ by {d}");
                if format != WeightFormat::F32 {
                    assert!(model.model_bytes() < from_pth(&options()).unwrap().model_bytes());
                }
            }
            Err(e) => {
                // Block formats on widths that are not a multiple of their block.
                assert!(
                    !matches!(
                        format,
                        WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Int8
                    ),
                    "{format}: {e}"
                );
                assert!(e.to_string().contains(".weight"), "{format}: {e}");
            }
        }
    }
}

#[test]
fn quantized_checkpoint_round_trip_with_per_layer_formats() {
    let g = golden();
    let x = tensor(&g, "x");
    let opts = options()
        .format_at(0, WeightFormat::F16)
        .format_at(3, WeightFormat::Int8);
    let model = from_pth(&opts).unwrap();
    let formats: Vec<WeightFormat> = model.linears().map(|l| l.format()).collect();
    assert_eq!(
        formats,
        [WeightFormat::F16, WeightFormat::Int8, WeightFormat::F32]
    );
    let dir = tempdir("save");
    let path = dir.join("mixed.safetensors");
    model.save(&path).unwrap();
    let file = Checkpoint::open(&path).unwrap();
    assert!(file.info("3.weight.int8.codes").is_some());
    let back =
        Sequential::from_state_dict(&file, &options().format_at(0, WeightFormat::F16)).unwrap();
    let formats: Vec<WeightFormat> = back.linears().map(|l| l.format()).collect();
    assert_eq!(
        formats,
        [WeightFormat::F16, WeightFormat::Int8, WeightFormat::F32]
    );
    assert_eq!(
        back.infer(&x).unwrap().data(),
        model.infer(&x).unwrap().data()
    );
    assert_eq!(back.model_bytes(), model.model_bytes());
    // A stored int8 weight cannot be read as another quantized format.
    let e = Sequential::from_state_dict(&file, &options().format_at(3, WeightFormat::Q4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`3.weight` is stored as int8"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes a safetensors state dict of f32 tensors.
fn state_dict(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> Checkpoint {
    let data: Vec<(String, Vec<f32>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, s)| (k.to_string(), vec![0.5; s.iter().product()], s.clone()))
        .collect();
    let entries: Vec<(String, DType, Vec<usize>, &[u8])> = data
        .iter()
        .map(|(k, v, s)| {
            (
                k.clone(),
                DType::F32,
                s.clone(),
                bytemuck::cast_slice::<f32, u8>(v),
            )
        })
        .collect();
    let path = dir.join(name);
    nibble_io::write_safetensors(&path, &entries, &Default::default()).unwrap();
    Checkpoint::open(&path).unwrap()
}

/// What is wrong, the tensors (name, shape), the options, and what the message must say.
type BadCase<'a> = (
    &'a str,
    Vec<(&'a str, Vec<usize>)>,
    &'a SequentialOptions,
    &'a [&'a str],
);

#[test]
fn bad_state_dicts_are_errors_naming_key_and_shapes() {
    let dir = tempdir("bad");
    let relu = SequentialOptions::new().activation(Activation::Relu);
    let no_activation = SequentialOptions::new();
    let cases: Vec<BadCase> = vec![
        (
            "foreign key",
            vec![
                ("0.weight", vec![4, 3]),
                ("0.bias", vec![4]),
                ("head.scale", vec![2, 4]),
            ],
            &relu,
            &["`head.scale`", "is not a parameter"],
        ),
        (
            "bias alone",
            vec![("0.bias", vec![4])],
            &relu,
            &["`0.bias` has no `0.weight`"],
        ),
        (
            "broken chain",
            vec![
                ("0.weight", vec![4, 3]),
                ("0.bias", vec![4]),
                ("2.weight", vec![2, 5]),
                ("2.bias", vec![2]),
            ],
            &relu,
            &["`2.weight` takes 5 features", "`0.weight` gives 4"],
        ),
        (
            "layernorm of the wrong width",
            vec![
                ("0.weight", vec![4, 3]),
                ("0.bias", vec![4]),
                ("1.weight", vec![5]),
                ("1.bias", vec![5]),
            ],
            &relu,
            &["`1.weight` takes 5 features"],
        ),
        (
            "bias of the wrong length",
            vec![("0.weight", vec![4, 3]), ("0.bias", vec![3])],
            &relu,
            &["0.bias", "[4]", "[3]"],
        ),
        (
            "gap without activation",
            vec![
                ("0.weight", vec![4, 3]),
                ("0.bias", vec![4]),
                ("2.weight", vec![2, 4]),
                ("2.bias", vec![2]),
            ],
            &no_activation,
            &["indices 1..2", "activation"],
        ),
        (
            "conv weight",
            vec![("0.weight", vec![4, 3, 3, 3]), ("0.bias", vec![4])],
            &relu,
            &["`0.weight` has shape [4, 3, 3, 3]"],
        ),
        (
            "batchnorm without its running variance",
            vec![
                ("0.weight", vec![4]),
                ("0.bias", vec![4]),
                ("0.running_mean", vec![4]),
            ],
            &relu,
            &["`0.running_var`"],
        ),
        (
            "batchnorm of the wrong width",
            vec![
                ("0.weight", vec![4]),
                ("0.bias", vec![4]),
                ("0.running_mean", vec![4]),
                ("0.running_var", vec![5]),
            ],
            &relu,
            &["0.running_var", "[4]", "[5]"],
        ),
        ("empty", vec![("x", vec![2])], &relu, &["`x`"]),
    ];
    for (what, tensors, opts, needles) in cases {
        let file = state_dict(
            &dir,
            &format!("{}.safetensors", what.replace(' ', "_")),
            &tensors,
        );
        let e = Sequential::from_state_dict(&file, opts)
            .err()
            .unwrap_or_else(|| panic!("{what}: loaded"))
            .to_string();
        for needle in needles {
            assert!(e.contains(needle), "{what}: {e:?} lacks {needle:?}");
        }
        assert!(e.contains(".safetensors"), "{what}: {e} names no file");
    }
    // A prefix ignores keys outside it, and a model under it must still be well formed.
    let file = state_dict(
        &dir,
        "prefixed.safetensors",
        &[
            ("data", vec![3]),
            ("m.0.weight", vec![4, 3]),
            ("m.0.bias", vec![4]),
        ],
    );
    let model = Sequential::from_state_dict(&file, &relu.clone().prefix("m.")).unwrap();
    assert_eq!(model.linears().next().unwrap().name, "m.0");
    let e = Sequential::from_state_dict(&file, &relu.clone().prefix("n."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no `n.<module>.weight`"), "{e}");
    // Options that name layers the file does not have.
    let file = state_dict(
        &dir,
        "two.safetensors",
        &[
            ("0.weight", vec![4, 3]),
            ("0.bias", vec![4]),
            ("2.weight", vec![4]),
            ("2.bias", vec![4]),
        ],
    );
    let e = Sequential::from_state_dict(&file, &relu.clone().format_at(2, WeightFormat::Int8))
        .unwrap_err()
        .to_string();
    assert!(e.contains("index 2, which holds no Linear"), "{e}");
    let e = Sequential::from_state_dict(&file, &relu.clone().activation_at(3, Activation::Gelu))
        .unwrap_err()
        .to_string();
    assert!(e.contains("index 3") && e.contains("gaps at [1]"), "{e}");
    // `01` is no index PyTorch writes: a module of that name.
    let leading_zero = state_dict(&dir, "zero.safetensors", &[("01.weight", vec![4, 3])]);
    let named = Sequential::from_state_dict(&leading_zero, &relu).unwrap();
    assert_eq!(named.linears().next().unwrap().name, "01");
    // Inputs of the wrong width.
    let e = model
        .infer(&Tensor::zeros(&[2, 5]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[batch, 3]") && e.contains("[2, 5]"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn var_builder_errors_name_file_key_and_shapes() {
    let file = Checkpoint::open(data("seq_d30.pth")).unwrap();
    let vb = VarBuilder::new(&file).pp("3");
    assert_eq!(vb.module_name(), "3");
    assert_eq!(vb.key("weight"), "3.weight");
    assert_eq!(vb.shape("weight").unwrap(), [48, 48]);
    let e = vb.get("weight", &[48, 30]).unwrap_err().to_string();
    for needle in ["seq_d30.pth", "3.weight", "[48, 30]", "[48, 48]"] {
        assert!(e.contains(needle), "{e} lacks {needle}");
    }
    let e = VarBuilder::new(&file)
        .pp("7")
        .linear(WeightFormat::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("seq_d30.pth") && e.contains("`7.weight`"), "{e}");
    let e = VarBuilder::new(&file)
        .pp("2")
        .linear(WeightFormat::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`2.weight`") && e.contains("[48]"), "{e}");
    let norm = VarBuilder::new(&file).pp("2").layer_norm().unwrap();
    assert_eq!((norm.name.as_str(), norm.dim()), ("2", 48));
}

/// A Sequential with BatchNorms (`tests/data/seq_batch_norm.*`, every epsilon 1e-3) gives
/// PyTorch's eval-mode logits, and saved and read back keeps them bit for bit (its running
/// statistics and affine tensors written under their names).
#[test]
fn batch_norms_run_in_eval_mode_and_save_back() {
    let file = Checkpoint::open(data("seq_batch_norm.pth")).unwrap();
    let options = SequentialOptions::new()
        .activation(Activation::Relu)
        .batch_norm_eps(1e-3);
    let model = Sequential::from_state_dict(&file, &options).unwrap();
    let kinds = model
        .layers()
        .iter()
        .filter(|l| matches!(l, Layer::BatchNorm(_)))
        .count();
    assert_eq!(kinds, 3);
    let golden = Checkpoint::open(data("seq_batch_norm.safetensors")).unwrap();
    let x = golden.tensor_f32("x", None).unwrap();
    let want = golden.tensor_f32("logits", None).unwrap();
    let y = model.infer(&x).unwrap();
    let (max, _) = y.abs_diff_stats(&want).unwrap();
    assert!(max < 1e-5, "logits differ from PyTorch's by {max}");
    let dir = std::env::temp_dir().join(format!("nibble-nn-bn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bn.safetensors");
    model.save(&path).unwrap();
    let back = Sequential::from_state_dict(&Checkpoint::open(&path).unwrap(), &options).unwrap();
    assert!(back.infer(&x).unwrap() == y);
    std::fs::remove_dir_all(&dir).ok();
}

/// Each layer as `linear <name>`, `<Layer|Rms> <name> <eps>` (a module of a 1-D weight),
/// `layer_norm <eps>` / `rms_norm <eps>` (parameter-free norms) or an activation's name.
fn layer_kinds(model: &Sequential) -> Vec<String> {
    model
        .layers()
        .iter()
        .map(|l| match l {
            Layer::Linear(l) => format!("linear {}", l.name),
            Layer::LayerNorm(n) => format!("{:?} {} {}", n.kind, n.name, n.eps),
            Layer::BatchNorm(n) => format!("batchnorm {}", n.name),
            Layer::PRelu(p) => format!("prelu {} {}", p.name, p.slopes()),
            Layer::Activation(a @ (Activation::LayerNorm(eps) | Activation::RmsNorm(eps))) => {
                format!("{a} {}", eps.get())
            }
            Layer::Activation(a) => a.to_string(),
        })
        .collect()
}

/// The gradients of the mean cross-entropy of `model` on the golden file's `x` and `labels`
/// are PyTorch's there, within 1e-4 of the largest: `dx`, and for each `(parameter, key)` the
/// parameter's gradient against the file's tensor `key`.
fn gradients_match(g: &Checkpoint, model: &Sequential, params: &[(&str, &str)]) {
    let close = |got: &Tensor, want: &Tensor, what: &str| {
        let scale = want.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = max_diff(got, want);
        assert!(d < 1e-4 * scale, "{what} differs by {d} (largest {scale})");
    };
    let tape = Tape::new();
    let xv = tape.leaf(tensor(g, "x"));
    let logits = model.forward(&tape, &xv).unwrap();
    let loss = cross_entropy(&tape, &logits, &labels(g)).unwrap();
    let grads = tape.backward(&loss).unwrap();
    close(grads.get(&xv).unwrap(), &tensor(g, "dx"), "dx");
    let all = model.params();
    for (name, key) in params {
        let p = all.iter().find(|p| p.name() == *name).unwrap();
        close(p.grad().as_ref().unwrap(), &tensor(g, key), name);
    }
}

/// LayerNorms without parameters (`nn.LayerNorm(dim, elementwise_affine=False)`) leave gaps in
/// a state dict's indices; given as gap layers (`layer_norm`, then ReLU in the first gap)
/// with the model's epsilon, the logits and the cross-entropy's gradient of the input are
/// PyTorch's (`tests/data/seq_plain_norm.*`, eps 0.05, `tools/golden/make_seq_plain_norm.py`).
/// With a ReLU alone in the gaps they are not: a state dict cannot tell them apart.
#[test]
fn layer_norms_without_parameters_in_gaps_match_pytorch() {
    let g = Checkpoint::open(data("seq_plain_norm.safetensors")).unwrap();
    let (x, want_logits) = (tensor(&g, "x"), tensor(&g, "logits"));
    let file = Checkpoint::open(data("seq_plain_norm.pth")).unwrap();
    let norm = Activation::layer_norm(1e-5); // the epsilon comes from the options
    let options = SequentialOptions::new()
        .layer_norm_eps(0.05)
        .gap_layers_at(1, vec![norm, Activation::Relu])
        .gap_layers_at(4, vec![norm]);
    let model = Sequential::from_state_dict(&file, &options).unwrap();
    assert_eq!(
        layer_kinds(&model),
        [
            "linear 0",
            "layer_norm 0.05",
            "relu",
            "linear 3",
            "layer_norm 0.05",
            "linear 5"
        ]
    );
    assert!(model
        .params()
        .iter()
        .all(|p| !p.name().contains("layer_norm")));
    let logits = model.infer(&x).unwrap();
    let diff = max_diff(&logits, &want_logits);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    // The input's gradient through both LayerNorms.
    gradients_match(&g, &model, &[]);
    // Every gap a ReLU, as a state dict alone would suggest: other logits.
    let relu = Sequential::from_state_dict(
        &file,
        &SequentialOptions::new().activation(Activation::Relu),
    )
    .unwrap();
    assert!(max_diff(&relu.infer(&x).unwrap(), &want_logits) > 1e-2);
    // The same layers for every gap: the second gap's LayerNorm then gets a ReLU too.
    let both = SequentialOptions::new()
        .layer_norm_eps(0.05)
        .gap_layers(vec![norm, Activation::Relu]);
    let model = Sequential::from_state_dict(&file, &both).unwrap();
    assert_eq!(model.layers().len(), 7);
}

/// RMSNorms: a state dict's 1-D weight without a bias is a LayerNorm unless the options say
/// RMSNorm (per index here, `1`); a parameter-free RMSNorm fills a gap (`rms_norm`); with
/// their epsilon (1e-3) the logits, the input's gradient and the weights' gradients are
/// PyTorch's (`tests/data/seq_rms_norm.*`, `tools/golden/make_seq_rms_norm.py`). An RMSNorm
/// kind for a module with a bias, or for an index without a 1-D weight, is an error.
#[test]
fn rms_norms_match_pytorch() {
    let g = Checkpoint::open(data("seq_rms_norm.safetensors")).unwrap();
    let (x, want_logits) = (tensor(&g, "x"), tensor(&g, "logits"));
    let file = Checkpoint::open(data("seq_rms_norm.pth")).unwrap();
    let options = SequentialOptions::new()
        .norm_at(1, NormKind::Rms)
        .rms_norm_eps(1e-3)
        .gap_layers_at(2, vec![Activation::Relu])
        .gap_layers_at(4, vec![Activation::rms_norm(f32::EPSILON)])
        .gap_layers_at(7, vec![Activation::Relu]);
    let model = Sequential::from_state_dict(&file, &options).unwrap();
    assert_eq!(
        layer_kinds(&model),
        [
            "linear 0",
            "Rms 1 0.001",
            "relu",
            "linear 3",
            "rms_norm 0.001",
            "linear 5",
            "Layer 6 0.00001",
            "relu",
            "linear 8"
        ]
    );
    let diff = max_diff(&model.infer(&x).unwrap(), &want_logits);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    gradients_match(&g, &model, &[("1.weight", "d_w1"), ("6.weight", "d_w6")]);
    // Read as a LayerNorm (the default), index 1 gives other logits.
    let as_layer = SequentialOptions {
        norms: Default::default(),
        ..options.clone()
    };
    let other = Sequential::from_state_dict(&file, &as_layer).unwrap();
    assert!(max_diff(&other.infer(&x).unwrap(), &want_logits) > 1e-3);
    // PyTorch's default epsilon: other logits, as the inputs are small.
    let default_eps =
        Sequential::from_state_dict(&file, &options.clone().rms_norm_eps(f32::EPSILON)).unwrap();
    assert!(max_diff(&default_eps.infer(&x).unwrap(), &want_logits) > 1e-4);
    // Index 6 has a bias: not an RMSNorm. Index 3 is a Linear.
    for (index, needle) in [
        (6, "`6.bias` exists: an RMSNorm has no bias"),
        (3, "a norm kind is given for index 3"),
    ] {
        let bad = options.clone().norm_at(index, NormKind::Rms);
        let e = Sequential::from_state_dict(&file, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
    let e = Sequential::from_state_dict(&file, &options.clone().rms_norm_eps(-1.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("RMSNorm epsilon"), "{e}");
}

/// GroupNorms: a state dict's 1-D weight and bias are a LayerNorm unless the options say
/// GroupNorm with its group count (per index here: 4 groups at `1`, 2 at `7`, a LayerNorm at
/// `4`); with their epsilon (1e-3) the logits, the input's gradient and the GroupNorms' weight
/// and bias gradients are PyTorch's (`tests/data/seq_group_norm.*`,
/// `tools/golden/make_seq_group_norm.py`). A group count that does not divide the channels is
/// an error naming the module.
#[test]
fn group_norms_match_pytorch() {
    let g = Checkpoint::open(data("seq_group_norm.safetensors")).unwrap();
    let (x, want_logits) = (tensor(&g, "x"), tensor(&g, "logits"));
    let file = Checkpoint::open(data("seq_group_norm.pth")).unwrap();
    let options = SequentialOptions::new()
        .norm_at(1, NormKind::Group(4))
        .norm_at(7, NormKind::Group(2))
        .layer_norm_eps(1e-3)
        .gap_layers_at(2, vec![Activation::Relu])
        .gap_layers_at(5, vec![Activation::Gelu])
        .gap_layers_at(8, vec![Activation::Relu]);
    let model = Sequential::from_state_dict(&file, &options).unwrap();
    assert_eq!(
        layer_kinds(&model),
        [
            "linear 0",
            "Group(4) 1 0.001",
            "relu",
            "linear 3",
            "Layer 4 0.001",
            "gelu",
            "linear 6",
            "Group(2) 7 0.001",
            "relu",
            "linear 9"
        ]
    );
    let diff = max_diff(&model.infer(&x).unwrap(), &want_logits);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    gradients_match(
        &g,
        &model,
        &[
            ("1.weight", "d_w1"),
            ("1.bias", "d_b1"),
            ("7.weight", "d_w7"),
            ("7.bias", "d_b7"),
        ],
    );
    // Read as LayerNorms (one group), the model gives other logits.
    let as_layer = SequentialOptions {
        norms: Default::default(),
        ..options.clone()
    };
    let other = Sequential::from_state_dict(&file, &as_layer).unwrap();
    assert!(max_diff(&other.infer(&x).unwrap(), &want_logits) > 1e-3);
    for groups in [5, 0] {
        let bad = options.clone().norm_at(1, NormKind::Group(groups));
        let e = Sequential::from_state_dict(&file, &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("a GroupNorm of {groups} groups over 12 channels"))
                && e.contains("layer `1`"),
            "{e}"
        );
    }
}

/// A GroupNorm without parameters (`nn.GroupNorm(3, 12, affine=False)`) leaves a gap; given
/// as a gap layer (`group_norm:3`, then ReLU) with the model's epsilon (1e-3), the logits and
/// the input's gradient are PyTorch's (`tests/data/seq_group_norm_plain.*`,
/// `tools/golden/make_seq_group_norm.py`); as a LayerNorm they are not. A group count that does
/// not divide the width is an error naming the module before it and both counts.
#[test]
fn group_norms_without_parameters_in_gaps_match_pytorch() {
    let g = Checkpoint::open(data("seq_group_norm_plain.safetensors")).unwrap();
    let (x, want_logits) = (tensor(&g, "x"), tensor(&g, "logits"));
    let file = Checkpoint::open(data("seq_group_norm_plain.pth")).unwrap();
    let with = |first: Activation| {
        SequentialOptions::new()
            .layer_norm_eps(1e-3)
            .gap_layers_at(1, vec![first, Activation::Relu])
    };
    let model = Sequential::from_state_dict(&file, &with(Activation::group_norm(3, 1e-5))).unwrap();
    assert_eq!(
        layer_kinds(&model),
        ["linear 0", "group_norm:3", "relu", "linear 3"]
    );
    let diff = max_diff(&model.infer(&x).unwrap(), &want_logits);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    gradients_match(&g, &model, &[]);
    let layer = Sequential::from_state_dict(&file, &with(Activation::layer_norm(1e-5))).unwrap();
    assert!(max_diff(&layer.infer(&x).unwrap(), &want_logits) > 1e-3);
    let e = Sequential::from_state_dict(&file, &with(Activation::group_norm(5, 1e-5)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`group_norm:5` after module `0` normalizes 12 features"),
        "{e}"
    );
}

/// A classifier of its own class (named modules `fc1`, `bn1`, `fc2`, `norm`, `head`, not an
/// `nn.Sequential`): its modules run in the order the `.pth` keeps them, with a gap between
/// every two for what runs there (here nothing, ReLU, nothing, GELU); the logits and the
/// input's gradient are PyTorch's (`tests/data/named_classifier.*`,
/// `tools/golden/make_named_classifier.py`), and the layers keep the modules' names. A ReLU in
/// every gap computes another model.
#[test]
fn a_classifier_of_named_modules_matches_pytorch() {
    let g = Checkpoint::open(data("named_classifier.safetensors")).unwrap();
    let (x, want_logits) = (tensor(&g, "x"), tensor(&g, "logits"));
    let file = Checkpoint::open(data("named_classifier.pth")).unwrap();
    let options = SequentialOptions::new()
        .gap_layers_at(1, vec![Activation::Identity])
        .gap_layers_at(3, vec![Activation::Relu])
        .gap_layers_at(5, vec![])
        .gap_layers_at(7, vec![Activation::Gelu]);
    let model = Sequential::from_state_dict(&file, &options).unwrap();
    assert_eq!(
        layer_kinds(&model),
        [
            "linear fc1",
            "identity",
            "batchnorm bn1",
            "relu",
            "linear fc2",
            "Layer norm 0.00001",
            "gelu",
            "linear head"
        ]
    );
    let diff = max_diff(&model.infer(&x).unwrap(), &want_logits);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    gradients_match(&g, &model, &[]);
    let relu = SequentialOptions::new().activation(Activation::Relu);
    let every_gap = Sequential::from_state_dict(&file, &relu).unwrap();
    assert!(max_diff(&every_gap.infer(&x).unwrap(), &want_logits) > 1e-3);
    // Saved as safetensors (whose keys are sorted by name: bn1 first), the module order
    // recorded in the metadata brings the same model back.
    let dir = tempdir("named");
    let saved = dir.join("named.safetensors");
    model.save(&saved).unwrap();
    let back = Checkpoint::open(&saved).unwrap();
    assert_eq!(back.keys().next(), Some("bn1.bias"));
    let again = Sequential::from_state_dict(&back, &options).unwrap();
    assert_eq!(layer_kinds(&again), layer_kinds(&model));
    assert_eq!(
        again.infer(&x).unwrap().data(),
        model.infer(&x).unwrap().data()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A PEFT DoRA adapter on the Sequential (`tests/data/peft_variants/dora`,
/// `tools/golden/make_peft_dora.py`): PEFT's logits, each adapted layer holding its magnitude
/// (a parameter that trains with A and B) and a finite scale. Its weight norms follow A: a
/// changed A gives other scales, and the old A the old bits. Saving the model is refused (the
/// file's `bias = "all"` biases are base parameters an adapter file would lose); its DoRA
/// adapters on a fresh base save and read back as the same tensors (the magnitudes and
/// `use_dora` written as PEFT writes them); the checkpointed
/// recomputation of such a layer computes its output (its magnitude's gradient reads it).
#[test]
fn a_dora_adapter_matches_peft_and_saves_as_peft_does() {
    let golden = Checkpoint::open(data("peft_variants/dora_logits.safetensors")).unwrap();
    let (x, want) = (tensor(&golden, "x"), tensor(&golden, "logits"));
    let mut model = from_pth(&options()).unwrap();
    model.load_adapter(&data("peft_variants/dora")).unwrap();
    let logits = model.infer(&x).unwrap();
    let diff = max_diff(&logits, &want);
    assert!(diff < 1e-5, "logits differ from PEFT's by {diff}");
    for l in model.linears() {
        let lora = l.lora.as_ref().unwrap();
        let dora = lora.dora.as_ref().unwrap();
        assert!(model
            .trainable_params()
            .iter()
            .any(|p| p.same_as(&dora.magnitude)));
        let scale = l.dora_scale().unwrap().unwrap();
        assert_eq!(scale.len(), l.dims().0);
        assert!(scale.iter().all(|s| s.is_finite() && *s != 1.0));
        let a = lora.a.value().clone();
        lora.a.value_mut().data_mut()[0] += 0.5;
        assert_ne!(
            l.dora_scale().unwrap().unwrap(),
            scale,
            "{}: stale norms",
            l.name
        );
        *lora.a.value_mut() = a;
        assert_eq!(l.dora_scale().unwrap().unwrap(), scale, "{}", l.name);
    }
    // The file's `bias = "all"` biases are base parameters an adapter file does not hold:
    // saving them away is refused, and nothing is written.
    let dir = tempdir("dora_save");
    let e = model.save_adapter(&dir).unwrap_err().to_string();
    assert!(
        e.contains("base parameters") && e.contains("0.base_layer.bias"),
        "{e}"
    );
    assert!(!dir.join("adapter_config.json").exists());
    // The DoRA adapters alone, on a fresh base: saved and read back, the same tensors.
    let mut fresh = from_pth(&options()).unwrap();
    for (to, from) in fresh.linears_mut().zip(model.linears()) {
        to.lora = from.lora.clone();
    }
    fresh.save_adapter(&dir).unwrap();
    let config = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"use_dora\": true"), "{config}");
    let mut again = from_pth(&options()).unwrap();
    again.load_adapter(&dir).unwrap();
    for (a, b) in again.linears().zip(model.linears()) {
        let (la, lb) = (a.lora.as_ref().unwrap(), b.lora.as_ref().unwrap());
        assert_eq!(la.a.value().data(), lb.a.value().data());
        assert_eq!(la.b.value().data(), lb.b.value().data());
        let magnitude =
            |l: &nibble_nn::LoraAdapter| l.dora.as_ref().unwrap().magnitude.value().clone();
        assert_eq!(magnitude(la).data(), magnitude(lb).data());
    }
    assert_eq!(
        again.infer(&x).unwrap().data(),
        fresh.infer(&x).unwrap().data()
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let tape = Tape::new();
    let first = model.linears().next().unwrap();
    let leaf = tape.leaf(x.clone());
    let pending = first.forward_pending(&tape, &leaf).unwrap();
    assert_eq!(
        pending.shape(),
        first.forward(&tape, &leaf).unwrap().shape()
    );
}

/// PReLUs (`nn.PReLU(10)` and `nn.PReLU()`) beside a LayerNorm without a bias: three 1-D
/// weights a state dict cannot tell apart, given per index; PyTorch's logits, input gradient
/// and slope gradients (`tests/data/seq_prelu.*`, `tools/golden/make_seq_prelu.py`). Read as
/// LayerNorms they give other logits; a PReLU with a bias, or slopes that are not one per
/// feature, are errors naming the key. Saved and read back, the model is the same.
#[test]
fn prelus_match_pytorch() {
    let g = Checkpoint::open(data("seq_prelu.safetensors")).unwrap();
    let (x, want_logits) = (tensor(&g, "x"), tensor(&g, "logits"));
    let file = Checkpoint::open(data("seq_prelu.pth")).unwrap();
    let options = SequentialOptions::new()
        .norm(NormKind::PRelu)
        .norm_at(3, NormKind::Layer);
    let model = Sequential::from_state_dict(&file, &options).unwrap();
    assert_eq!(
        layer_kinds(&model),
        [
            "linear 0",
            "prelu 1 10",
            "linear 2",
            "Layer 3 0.00001",
            "prelu 4 1",
            "linear 5"
        ]
    );
    let diff = max_diff(&model.infer(&x).unwrap(), &want_logits);
    assert!(diff < 1e-5, "logits differ from PyTorch's by {diff}");
    gradients_match(&g, &model, &[("1.weight", "d_w1"), ("4.weight", "d_w4")]);
    // Saved and read back with the same options: the same logits, bit for bit.
    let dir = tempdir("prelu_save");
    let saved = dir.join("prelu.safetensors");
    model.save(&saved).unwrap();
    let back = Sequential::from_state_dict(&Checkpoint::open(&saved).unwrap(), &options).unwrap();
    assert_eq!(
        back.infer(&x).unwrap().data(),
        model.infer(&x).unwrap().data()
    );
    // As LayerNorms (the default): other logits, or an error for the one-slope PReLU.
    match Sequential::from_state_dict(&file, &SequentialOptions::new()) {
        Ok(m) => assert!(max_diff(&m.infer(&x).unwrap(), &want_logits) > 1e-3),
        Err(e) => assert!(e.to_string().contains("4.weight"), "{e}"),
    }
    // A kind for an index that holds a Linear is an error.
    let e = Sequential::from_state_dict(&file, &options.clone().norm_at(0, NormKind::PRelu))
        .unwrap_err()
        .to_string();
    assert!(e.contains("norm kind is given for index 0"), "{e}");
    // Hand-made: a PReLU with a bias, and 3 slopes after a 4-wide Linear.
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (w0, b0, w1) = (f32s(&[0.5; 12]), f32s(&[0.0; 4]), f32s(&[0.25; 4]));
    let w1_short = f32s(&[0.25; 3]);
    for (name, entries, needle) in [
        (
            "bias",
            vec![
                ("1.bias", vec![4], b0.as_slice()),
                ("1.weight", vec![4], w1.as_slice()),
            ],
            "`1.bias` exists: a PReLU has no bias",
        ),
        (
            "count",
            vec![("1.weight", vec![3], w1_short.as_slice())],
            "holds 3 PReLU slopes but `0.weight` gives 4",
        ),
    ] {
        let path = dir.join(format!("{name}.safetensors"));
        let mut all: Vec<(String, nibble_io::DType, Vec<usize>, &[u8])> = vec![
            (
                "0.weight".into(),
                nibble_io::DType::F32,
                vec![4, 3],
                w0.as_slice(),
            ),
            (
                "0.bias".into(),
                nibble_io::DType::F32,
                vec![4],
                b0.as_slice(),
            ),
        ];
        all.extend(
            entries
                .into_iter()
                .map(|(k, s, b)| (k.to_string(), nibble_io::DType::F32, s, b)),
        );
        nibble_io::write_safetensors(&path, &all, &Default::default()).unwrap();
        let file = Checkpoint::open(&path).unwrap();
        let prelu = SequentialOptions::new().norm(NormKind::PRelu);
        let e = Sequential::from_state_dict(&file, &prelu)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{name}: {e}");
    }
    // A PReLU of 5 slopes in front of a Linear taking 3 features: the widths do not chain
    // (the model was built, and could take no input).
    let (slopes, w1) = (f32s(&[0.25; 5]), f32s(&[0.5; 6]));
    let path = dir.join("prelu_first.safetensors");
    nibble_io::write_safetensors(
        &path,
        &[
            (
                "0.weight".into(),
                nibble_io::DType::F32,
                vec![5],
                slopes.as_slice(),
            ),
            (
                "1.weight".into(),
                nibble_io::DType::F32,
                vec![2, 3],
                w1.as_slice(),
            ),
        ],
        &Default::default(),
    )
    .unwrap();
    let file = Checkpoint::open(&path).unwrap();
    let e =
        Sequential::from_state_dict(&file, &SequentialOptions::new().norm_at(0, NormKind::PRelu))
            .unwrap_err()
            .to_string();
    assert!(e.contains("takes 3 features but `0.weight` gives 5"), "{e}");
}
