use nibble_quant::act8::{forward, IntTier};
use nibble_quant::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{Rng, Tensor, WeightMatrix};
fn cpu_ns() -> u64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}
trait Fmt: nibble_quant::act8::IntCodes + WeightMatrix {
    fn as_int(&self) -> &dyn nibble_quant::act8::IntCodes;
}
impl<T: nibble_quant::act8::IntCodes + WeightMatrix> Fmt for T {
    fn as_int(&self) -> &dyn nibble_quant::act8::IntCodes {
        self
    }
}
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let m: usize = a[1].parse().unwrap();
    let reps: usize = a[2].parse().unwrap();
    let only = a.get(3).cloned().unwrap_or_default();
    let dim = 1024;
    let w = Tensor::randn(&[dim, dim], &mut Rng::new(1)).scale(1.0 / (dim as f32).sqrt());
    let fmts: Vec<(&str, Box<dyn Fmt>)> = vec![
        ("q4", Box::new(Q4Matrix::quantize(&w).unwrap())),
        ("nf4", Box::new(Nf4Matrix::quantize(&w).unwrap())),
        ("int8", Box::new(Int8Matrix::quantize(&w).unwrap())),
        ("lower", Box::new(LowerMatrix::quantize(&w).unwrap())),
    ];
    let x = Tensor::randn(&[m, dim], &mut Rng::new(2)).into_vec();
    let mut y = vec![0.0f32; m * dim];
    for (name, f) in &fmts {
        if !only.is_empty() && only != *name {
            continue;
        }
        let mut bi = u64::MAX;
        let mut bf = u64::MAX;
        for _ in 0..reps {
            let s = cpu_ns();
            assert!(forward(IntTier::Avx2, f.as_int(), &x, m, &mut y, false));
            bi = bi.min(cpu_ns() - s);
            let s = cpu_ns();
            f.matmul_t(&x, m, &mut y, false).unwrap();
            bf = bf.min(cpu_ns() - s);
        }
        println!(
            "{name:6} m {m} cpu ms: int8 {:.3} f32 {:.3} ratio {:.2}",
            bi as f64 / 1e6,
            bf as f64 / 1e6,
            bi as f64 / bf as f64
        );
    }
}
