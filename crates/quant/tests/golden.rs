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
