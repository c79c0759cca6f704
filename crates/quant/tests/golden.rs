//! Bit-exact checks against the PyTorch / bitsandbytes golden files.

mod common;

use common::Golden;
use nibble_quant::{cpu::available_paths, Bytes, Q4Matrix};
use nibble_tensor::{Tensor, WeightMatrix};

fn q4_keys() -> Vec<String> {
    let mut v = Vec::new();
    for a in [0, 2, 4, 6, 8, 10] {
        for b in [0, 2, 4] {
            v.push(format!("model.{a}.model.{b}.weight"));
        }
    }
    v
}

#[test]
fn q4_matches_reference_bit_exactly() {
    let net = Golden::open("bignet_d128.safetensors");
    let io = Golden::open("io_d128.safetensors");
    for key in q4_keys() {
        let (shape, w) = net.f32s(&key);
        let w = Tensor::from_vec(&shape, w).unwrap();
        let (_, packed) = io.raw(&format!("q4.{key}.packed"));
        let (_, norm) = io.raw(&format!("q4.{key}.norm"));
        let (_, deq) = io.f32s(&format!("q4.{key}.dequant"));
        for path in available_paths() {
            let q = Q4Matrix::quantize_with(&w, path).unwrap();
            assert_eq!(q.packed_bytes(), &packed[..], "{key} packed, {path:?}");
            assert_eq!(q.norm_bytes(), &norm[..], "{key} norm, {path:?}");
            let d = q.dequantize_with(path);
            let same = d
                .data()
                .iter()
                .zip(&deq)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{key} dequant, {path:?}");
        }
        // from_parts on the golden bytes, the norm deliberately misaligned in a shared buffer
        let mut buf = vec![0u8; 1];
        buf.extend_from_slice(&norm);
        buf.extend_from_slice(&packed);
        let owner: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = std::sync::Arc::new(buf);
        let nlen = norm.len();
        let q = Q4Matrix::from_parts(
            shape[0],
            shape[1],
            Bytes::from_shared(owner.clone(), 1 + nlen..1 + nlen + packed.len()).unwrap(),
            Bytes::from_shared(owner, 1..1 + nlen).unwrap(),
        )
        .unwrap();
        assert!(q.parts().0.is_shared());
        let d = q.to_f32();
        assert!(d
            .data()
            .iter()
            .zip(&deq)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn nf4_matches_bitsandbytes() {
    use nibble_quant::nf4::{dynamic_map, dynamic_map_generated, NF4_LEVELS};
    use nibble_quant::Nf4Matrix;
    let g = Golden::open("nf4_256x128.safetensors");
    let (shape, w) = g.f32s("w");
    let w = Tensor::from_vec(&shape, w).unwrap();
    let (_, levels) = g.f32s("nf4.levels");
    assert!(bits_eq(&levels, &NF4_LEVELS));
    let (_, map) = g.f32s("nf4dq.dynamic_map");
    assert!(bits_eq(&map, &dynamic_map()));
    for (a, b) in map.iter().zip(dynamic_map_generated()) {
        assert!((a - b).abs() <= 2e-7 * a.abs(), "{a} vs {b}");
    }
    let (_, packed) = g.raw("nf4.packed");
    let (_, absmax) = g.raw("nf4.absmax");
    let (_, deq) = g.f32s("nf4.dequant");
    let (_, dq_codes) = g.raw("nf4dq.absmax_codes");
    let (_, dq_off) = g.f32s("nf4dq.absmax_offset");
    let (_, dq_scale) = g.raw("nf4dq.absmax_scale");
    let (_, dq_deq) = g.f32s("nf4dq.dequant");
    for path in available_paths() {
        let q = Nf4Matrix::quantize_with(&w, false, path).unwrap();
        assert_eq!(q.packed_bytes(), &packed[..], "{path:?}");
        assert_eq!(q.absmax_bytes().unwrap(), &absmax[..], "{path:?}");
        assert!(bits_eq(q.dequantize_with(path).data(), &deq), "{path:?}");
        let d = Nf4Matrix::quantize_with(&w, true, path).unwrap();
        assert_eq!(d.packed_bytes(), &packed[..]);
        assert_eq!(d.absmax_codes_bytes().unwrap(), &dq_codes[..], "{path:?}");
        assert_eq!(d.absmax_offset().unwrap().to_bits(), dq_off[0].to_bits());
        assert_eq!(d.absmax_scale_bytes().unwrap(), &dq_scale[..]);
        assert!(bits_eq(d.dequantize_with(path).data(), &dq_deq), "{path:?}");
        assert_eq!(q.bits_per_weight(), 4.5);
        let bpw = d.bits_per_weight();
        assert!(bpw < 4.13, "{bpw}");
    }
    let q = Nf4Matrix::from_parts(
        256,
        128,
        Bytes::from_vec(packed.clone()),
        Bytes::from_vec(absmax),
    )
    .unwrap();
    assert!(bits_eq(q.to_f32().data(), &deq));
    let d = Nf4Matrix::from_parts_double(
        256,
        128,
        Bytes::from_vec(packed),
        Bytes::from_vec(dq_codes),
        Bytes::from_vec(dq_off[0].to_le_bytes().to_vec()),
        Bytes::from_vec(dq_scale),
    )
    .unwrap();
    assert!(bits_eq(d.to_f32().data(), &dq_deq));
}
