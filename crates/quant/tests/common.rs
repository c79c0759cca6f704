//! Shared helpers for the quant tests: golden-file reading, bit-exact and f64-reference
//! comparisons, every format of a weight matrix, and one child process per kernel path.
#![allow(dead_code)]

use std::path::PathBuf;

use nibble_quant::cpu::available_paths;
use nibble_quant::{Int8Matrix, KernelPath, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{Rng, Tensor, WeightMatrix};

/// Every kernel tier, whether or not this CPU has it.
pub const ALL_TIERS: [KernelPath; 4] = [
    KernelPath::Scalar,
    KernelPath::Portable,
    KernelPath::Avx2Fma,
    KernelPath::Avx512,
];

pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/")).join(name)
}

pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn open(name: &str) -> Golden {
        let p = data_path(name);
        Golden {
            bytes: std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        }
    }
    pub fn st(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.bytes).expect("safetensors")
    }
    pub fn raw(&self, key: &str) -> (Vec<usize>, Vec<u8>) {
        let st = self.st();
        let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        (t.shape().to_vec(), t.data().to_vec())
    }
    pub fn f32s(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, b) = self.raw(key);
        (
            s,
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
    pub fn keys(&self) -> Vec<String> {
        self.st().names().into_iter().cloned().collect()
    }
}

/// `a` and `b` equal bit for bit.
pub fn bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: [{k}] {x} vs {y}");
    }
}

/// `y = x·Wᵀ` in f64, with `Σ_k |x_k w_k|` per element (the scale of f32 rounding errors).
pub fn naive_t(x: &[f32], m: usize, w: &[f32], o: usize, i: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut y, mut mag) = (vec![0.0f32; m * o], vec![0.0f32; m * o]);
    for b in 0..m {
        for r in 0..o {
            let t = (0..i).map(|k| x[b * i + k] as f64 * w[r * i + k] as f64);
            y[b * o + r] = t.clone().sum::<f64>() as f32;
            mag[b * o + r] = t.map(f64::abs).sum::<f64>() as f32;
        }
    }
    (y, mag)
}

/// `dx = dy·W` in f64, with the magnitudes as [`naive_t`].
pub fn naive(dy: &[f32], m: usize, w: &[f32], o: usize, i: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut dx, mut mag) = (vec![0.0f32; m * i], vec![0.0f32; m * i]);
    for b in 0..m {
        for k in 0..i {
            let t = (0..o).map(|r| dy[b * o + r] as f64 * w[r * i + k] as f64);
            dx[b * i + k] = t.clone().sum::<f64>() as f32;
            mag[b * i + k] = t.map(f64::abs).sum::<f64>() as f32;
        }
    }
    (dx, mag)
}

/// `|a − b| <= 1e-5 · mag` elementwise (f32 accumulation of up to a few thousand terms).
pub fn close_to(a: &[f32], (b, mag): &(Vec<f32>, Vec<f32>), what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (k, ((x, y), s)) in a.iter().zip(b).zip(mag).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * s,
            "{what}: [{k}] {x} vs {y} (scale {s})"
        );
    }
}

/// `w` in every format: q4, nf4, nf4 double-quantized, lower, int8.
pub fn formats(w: &Tensor) -> Vec<Box<dyn WeightMatrix>> {
    vec![
        Box::new(Q4Matrix::quantize(w).unwrap()),
        Box::new(Nf4Matrix::quantize(w).unwrap()),
        Box::new(Nf4Matrix::quantize_double(w).unwrap()),
        Box::new(LowerMatrix::quantize(w).unwrap()),
        Box::new(Int8Matrix::quantize(w).unwrap()),
    ]
}

/// Runs the test `child_test` of this test binary in one child process per kernel path this
/// CPU has (`NIBBLE_KERNEL` is read once per process), with `child_env` set so the child
/// knows it is one; prints, under `label`, the paths it skips and those that pass.
pub fn run_on_every_kernel_path(child_test: &str, child_env: &str, label: &str) {
    let paths = available_paths();
    for p in ALL_TIERS {
        if !paths.contains(&p) {
            println!("{label}: {} skipped (CPU lacks it)", p.name());
        }
    }
    let exe = std::env::current_exe().unwrap();
    for p in paths {
        let out = std::process::Command::new(&exe)
            .args(["--exact", child_test, "--test-threads=1"])
            .env("NIBBLE_KERNEL", p.name())
            .env(child_env, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{}: {}\n{}",
            p.name(),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{label}: {} ok", p.name());
    }
}

/// Forward and backward products of `wm` at every batch in `batches` (inputs seeded from
/// `seed` and the batch), outputs NaN-prefilled: `[y, dx]` per batch, in order.
pub fn products(wm: &dyn WeightMatrix, seed: u64, batches: &[usize]) -> Vec<Vec<f32>> {
    let (o, i) = (wm.out_features(), wm.in_features());
    let mut out = Vec::new();
    for &m in batches {
        let x = Tensor::randn(&[m, i], &mut Rng::new(seed + m as u64));
        let mut y = vec![f32::NAN; m * o];
        wm.matmul_t(x.data(), m, &mut y, false).unwrap();
        let dy = Tensor::randn(&[m, o], &mut Rng::new(seed + 100 + m as u64));
        let mut dx = vec![f32::NAN; m * i];
        wm.matmul(dy.data(), m, &mut dx, false).unwrap();
        out.push(y);
        out.push(dx);
    }
    out
}

/// Runs `f` on a fresh rayon pool of `threads` threads.
pub fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Runs `run` on a pool of 1 thread and of each count in `threads`, and asserts that every
/// run returns the same outputs bit for bit (and at least one); `what` names the case.
pub fn same_bits_on_threads(
    what: &str,
    threads: &[usize],
    run: impl Fn() -> Vec<Vec<f32>> + Send + Sync,
) {
    let one = on_threads(1, &run);
    assert!(!one.is_empty(), "{what}: nothing ran");
    for &t in threads {
        let other = on_threads(t, &run);
        assert_eq!(one.len(), other.len(), "{what}: {t} threads");
        for (x, y) in one.iter().zip(&other) {
            bits_eq(x, y, &format!("{what}: {t} threads"));
        }
    }
}

/// [`products`] on 1 thread, checked against the f64 product with `wm`'s dequantized
/// weights, and bit-identical on each count of `threads`; `what` names the case.
pub fn products_checked_on_threads(
    wm: &dyn WeightMatrix,
    seed: u64,
    batches: &[usize],
    threads: &[usize],
    what: &str,
) {
    let (o, i) = (wm.out_features(), wm.in_features());
    let on = |threads: usize| on_threads(threads, || products(wm, seed, batches));
    let one = on(1);
    let wd = wm.to_f32();
    for (k, &m) in batches.iter().enumerate() {
        let x = Tensor::randn(&[m, i], &mut Rng::new(seed + m as u64));
        let dy = Tensor::randn(&[m, o], &mut Rng::new(seed + 100 + m as u64));
        let case = |dir: &str| format!("{what} {o}x{i} m={m} {dir}");
        close_to(
            &one[2 * k],
            &naive_t(x.data(), m, wd.data(), o, i),
            &case("fwd"),
        );
        close_to(
            &one[2 * k + 1],
            &naive(dy.data(), m, wd.data(), o, i),
            &case("bwd"),
        );
    }
    for &t in threads {
        for (a, b) in one.iter().zip(&on(t)) {
            bits_eq(a, b, &format!("{what} {o}x{i}: 1 vs {t} threads"));
        }
    }
}

/// The integer tiers (`nibble_quant::act8`) a test runs: every tier this CPU runs, then the
/// emulated ones in `emulated` that it can run (`AmxEmulated` on any CPU, `AvxVnniEmulated`
/// where it has AVX2), printing under `label` each hardware tier it lacks and each emulation it
/// cannot run, so that a skipped tier never passes silently.
pub fn int_tiers(
    label: &str,
    emulated: &[nibble_quant::act8::IntTier],
) -> Vec<nibble_quant::act8::IntTier> {
    use nibble_quant::act8::IntTier;
    let mut t = IntTier::available();
    for want in [
        IntTier::Avx2,
        IntTier::AvxVnni,
        IntTier::Avx512Vnni,
        IntTier::Amx,
    ] {
        if !t.contains(&want) {
            println!("{label}: skipping tier {want:?} (this CPU lacks it, or it is turned off)");
        }
    }
    for &e in emulated {
        if e.supported() == e {
            t.push(e);
        } else {
            println!("{label}: skipping tier {e:?} (this CPU cannot run its emulation)");
        }
    }
    t
}

/// Pools of 1, 2, 3 and 16 threads.
pub fn pools() -> Vec<rayon::ThreadPool> {
    [1, 2, 3, 16]
        .into_iter()
        .map(|t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect()
}
