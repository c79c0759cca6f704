#![no_main]
//! Arbitrary bytes as a PEFT adapter directory for a small model (Linear "0" 4 -> 3, Linear "2"
//! 3 -> 2): the input is `u16 LE config length` + `adapter_config.json` +
//! `adapter_model.safetensors`, written to a directory of this process and loaded with
//! `nibble_nn::peft::load_adapter`. A loaded adapter must have its layers' shapes (and a DoRA
//! one finite scales, one per output), and the model must then run. Every outcome must be `Ok` or an error; a panic is a bug.

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nibble_autograd::{Tape, Var};
use nibble_io::{FrozenWeight, WeightFormat};
use nibble_nn::peft::{load_adapter, CONFIG_FILE, WEIGHTS_FILE};
use nibble_nn::{FrozenBias, Linear, LinearBase};
use nibble_tensor::Tensor;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("nibble-fuzz-adapter-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fn layer(name: &str, out: usize, inp: usize) -> Linear {
    let w = Tensor::from_fn(&[out, inp], |i| (i as f32 * 0.37).sin()).expect("shape");
    Linear {
        name: name.into(),
        base: LinearBase::Frozen {
            weight: FrozenWeight::quantize(WeightFormat::F16, name, &w).expect("f16"),
            bias: Some(FrozenBias::F32(vec![0.1; out])),
        },
        lora: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (config, weights) = rest.split_at(len);
    let dir = dir();
    std::fs::write(dir.join(CONFIG_FILE), config).expect("write config");
    std::fs::write(dir.join(WEIGHTS_FILE), weights).expect("write weights");
    let mut layers = vec![layer("0", 3, 4), layer("2", 2, 3)];
    if load_adapter(layers.iter_mut(), dir).is_err() {
        return;
    }
    for l in &layers {
        if let Some(a) = &l.lora {
            let (out, inp) = l.dims();
            let r = a.rank();
            assert_eq!(a.a.value().shape(), &[r, inp]);
            assert_eq!(a.b.value().shape(), &[out, r]);
            if let Some(d) = &a.dora {
                assert_eq!(d.magnitude.value().shape(), &[out]);
                let scale = l.dora_scale().expect("a loaded DoRA has norms").expect("a DoRA");
                assert_eq!(scale.len(), out);
                assert!(scale.iter().all(|s| s.is_finite()));
            }
        }
    }
    let tape = Tape::new();
    let x = Var::constant(Tensor::from_fn(&[2, 4], |i| i as f32 * 0.25).expect("shape"));
    let h = layers[0].forward(&tape, &x).expect("layer 0 runs on its own width");
    let _ = layers[1].forward(&tape, &h).expect("layer 2 runs on its own width");
});
