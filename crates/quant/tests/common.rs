//! Shared helpers for the quant tests: golden-file reading.
#![allow(dead_code)]

use std::path::PathBuf;

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
