use nibble_quant::act8::{forward, IntCodes, IntTier};
use nibble_quant::{Int8Matrix, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::{Rng, Tensor};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dim = 1024;
    let m: usize = a[2].parse().unwrap();
    let w = Tensor::randn(&[dim, dim], &mut Rng::new(1)).scale(1.0 / (dim as f32).sqrt());
    let f: Box<dyn IntCodes> = match a[1].as_str() {
        "q4" => Box::new(Q4Matrix::quantize(&w).unwrap()),
        "nf4" => Box::new(Nf4Matrix::quantize(&w).unwrap()),
        "int8" => Box::new(Int8Matrix::quantize(&w).unwrap()),
        _ => Box::new(LowerMatrix::quantize(&w).unwrap()),
    };
    let x = Tensor::randn(&[m, dim], &mut Rng::new(2)).into_vec();
    let mut y = vec![0.0f32; m * dim];
    for _ in 0..(20000 / m) {
        assert!(forward(IntTier::Avx2, f.as_ref(), &x, m, &mut y, false));
    }
}
