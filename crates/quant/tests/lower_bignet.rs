//! The lower-precision BigNet (width 1024) fits in < 9 MiB and stays close to f32.

use nibble_quant::{Int8Matrix, LowerMatrix};
use nibble_tensor::{layer_norm, linear, Rng, Tensor, WeightMatrix};

const D: usize = 1024;

struct Net {
    w: Vec<Tensor>,
    b: Vec<Vec<f32>>,
}

fn build(rng: &mut Rng) -> Net {
    let k = 1.0 / (D as f32).sqrt();
    let mut net = Net {
        w: vec![],
        b: vec![],
    };
    for _ in 0..18 {
        net.w.push(Tensor::uniform(&[D, D], -k, k, rng));
        net.b.push((0..D).map(|_| rng.uniform(-k, k)).collect());
    }
    net
}

fn forward(net: &Net, ws: &[&dyn WeightMatrix], x: &Tensor) -> Tensor {
    let (g, beta) = (vec![1.0f32; D], vec![0.0f32; D]);
    let mut h = x.clone();
    for blk in 0..6 {
        if blk > 0 {
            h = layer_norm(&h, &g, &beta, 1e-5).unwrap().0;
        }
        let mut t = h.clone();
        for j in 0..3 {
            let l = blk * 3 + j;
            t = linear(&t, ws[l], Some(&net.b[l])).unwrap();
            if j < 2 {
                t.relu_assign();
            }
        }
        h = h.add(&t).unwrap();
    }
    h
}

#[test]
fn lower_precision_bignet_fits_and_is_accurate() {
    let mut rng = Rng::new(0);
    let net = build(&mut rng);
    let x = Tensor::randn(&[256, D], &mut rng);
    let f32_ws: Vec<&dyn WeightMatrix> = net.w.iter().map(|w| w as &dyn WeightMatrix).collect();
    let y = forward(&net, &f32_ws, &x);
    let q: Vec<LowerMatrix> = net
        .w
        .iter()
        .map(|w| LowerMatrix::quantize(w).unwrap())
        .collect();
    let q_ws: Vec<&dyn WeightMatrix> = q.iter().map(|w| w as &dyn WeightMatrix).collect();
    let yq = forward(&net, &q_ws, &x);
    let (max, mean) = yq.abs_diff_stats(&y).unwrap();
    let bytes: usize =
        q.iter().map(|w| w.storage_bytes()).sum::<usize>() + 18 * D * 4 + 5 * 2 * D * 4;
    println!(
        "lower: mean |d| {mean:.4} max {max:.4}, total {bytes} bytes ({:.3} bits/weight, {} 4-bit rows of {})",
        q[0].bits_per_weight(),
        q.iter().map(|w| w.rows_4bit()).sum::<usize>(),
        18 * D
    );
    assert!(bytes < 9 << 20, "{bytes}");
    assert!(mean < 0.035, "mean {mean}");
    assert!(max < 0.5, "max {max}");
}

#[test]
fn int8_error_on_a_1024_matrix() {
    let mut rng = Rng::new(3);
    let w = Tensor::randn(&[D, D], &mut rng).scale(1.0 / (D as f32).sqrt());
    let q = Int8Matrix::quantize(&w).unwrap();
    let (max, mean) = q.to_f32().abs_diff_stats(&w).unwrap();
    println!(
        "int8: mean |d| {mean:.3e} max {max:.3e}, {:.3} bits/weight",
        q.bits_per_weight()
    );
    assert!(max < 1e-3 && mean < 3e-4, "{max} {mean}");
}
