//! Q4 with the reference's blocks of 16 over the **flattened** weight, for widths that are not
//! a multiple of 16.
//!
//! `bignet_ref.py`'s `q4_quantize` views the whole `out x in` weight as `[out·in/16, 16]`: where
//! `in` is a multiple of 16 its blocks are [`crate::Q4Matrix`]'s, each inside a row; elsewhere
//! (width 20, 100, 1000, ...) they run across rows, and [`crate::Q4Matrix`]'s blocks (a partial
//! last block per row) would quantize the weight differently (outputs 0.03–0.07 off the
//! reference's at width 20). This type keeps the reference's blocks exactly, for `out·in` a
//! multiple of 16 (the reference needs that too), with the same rules bit for bit (see the
//! [`crate::q4`] docs: `code = round_half_even((v + n) / (2n) · 15)`, `v' = ((code / 15) · 2) · n − n`).
//!
//! Storage: `packed` u8 `[out·in/2]` (element `2i` of the flattened weight in the low nibble of
//! byte `i`, as the reference packs it) and `norm` f16 `[out·in/16]`. The products are the
//! generic ones over dequantized row segments, whose whole blocks go through Q4's kernels:
//! these widths are the exception, not the speed path.

use half::f16;
use nibble_tensor::Tensor;
use rayon::prelude::*;

use crate::bytes::{check_part, check_values, Bytes};
use crate::cpu::KernelPath;
use crate::error::{QuantError, Result};
use crate::kernels::{self, QuantRows};
use crate::q4::{quantize_blocks_ref, F16_ROUNDS_TO_INF, Q4_BLOCK};

/// Blocks quantized per parallel task.
const BLOCKS_PER_TASK: usize = 256;

/// An `out x in` weight in the reference's Q4 over the flattened weight (see the
/// [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct Q4FlatMatrix {
    out: usize,
    inn: usize,
    packed: Bytes,
    norm: Bytes,
}

impl Q4FlatMatrix {
    /// Quantizes an `out x in` f32 matrix whose `out·in` is a multiple of 16, as the
    /// reference's `q4_quantize(w.flatten())` does. A NaN or infinite weight is a
    /// [`QuantError::NonFinite`] and a block norm that f16 rounds to infinity (65520 or more) a
    /// [`QuantError::ScaleOverflow`], each naming the (row, col) of the weight or block start.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (out, inn) = w.dims2("q4_flat_quantize")?;
        let n = out * inn;
        if n % Q4_BLOCK != 0 {
            return Err(QuantError::Shape {
                op: "q4_flat_quantize",
                shape: vec![out, inn],
                what: format!(
                    "the reference's blocks of {Q4_BLOCK} over the flattened weight need out·in \
                     to be a multiple of {Q4_BLOCK}"
                ),
            });
        }
        let mut packed = vec![0u8; n / 2];
        let mut norm = vec![f16::ZERO; n / Q4_BLOCK];
        let task = BLOCKS_PER_TASK * Q4_BLOCK;
        let ok: Vec<bool> = w
            .data()
            .par_chunks(task)
            .zip(packed.par_chunks_mut(task / 2))
            .zip(norm.par_chunks_mut(BLOCKS_PER_TASK))
            .map(|((x, p), nrm)| quantize_blocks_ref(x, p, nrm))
            .collect();
        if let Some(t) = ok.iter().position(|&good| !good) {
            return Err(fault(w.data(), inn, t * task));
        }
        Ok(Q4FlatMatrix {
            out,
            inn,
            packed: Bytes::from_vec(packed),
            norm: Bytes::from_f16(norm),
        })
    }

    /// Builds from raw parts: `packed` u8 `[out·in/2]`, `norm` f16 `[out·in/16]`
    /// (little-endian). A part of the wrong length is a [`QuantError::PartLength`]; a NaN,
    /// infinite or negative norm a [`QuantError::PartValue`] naming its index.
    pub fn from_parts(out: usize, inn: usize, packed: Bytes, norm: Bytes) -> Result<Self> {
        const OP: &str = "Q4FlatMatrix::from_parts";
        let n = out.checked_mul(inn).ok_or_else(|| QuantError::Shape {
            op: OP,
            shape: vec![out, inn],
            what: "size overflows".into(),
        })?;
        if n % Q4_BLOCK != 0 {
            return Err(QuantError::Shape {
                op: OP,
                shape: vec![out, inn],
                what: format!("out·in must be a multiple of {Q4_BLOCK}"),
            });
        }
        check_part(OP, "packed", out, inn, &packed, n / 2)?;
        check_part(OP, "norm", out, inn, &norm, n / Q4_BLOCK * 2)?;
        let m = Q4FlatMatrix {
            out,
            inn,
            packed,
            norm: norm.aligned(2),
        };
        check_values(OP, "norm", m.norm.f16s().iter().map(|v| v.to_f32()), true)?;
        Ok(m)
    }

    /// Rows (`out`) and columns (`in`).
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inn)
    }

    /// The raw `packed` part (u8 `[out·in/2]`).
    pub fn packed_bytes(&self) -> &[u8] {
        self.packed.as_slice()
    }

    /// The raw `norm` part (f16 `[out·in/16]`, little-endian bytes).
    pub fn norm_bytes(&self) -> &[u8] {
        self.norm.as_slice()
    }

    fn parts_len(&self) -> usize {
        self.packed.len() + self.norm.len()
    }
}

/// The error for the first bad weight or block of the task starting at flat index `start`.
fn fault(x: &[f32], inn: usize, start: usize) -> QuantError {
    let at = |f: usize| (f / inn.max(1), f % inn.max(1));
    let task = &x[start..(start + BLOCKS_PER_TASK * Q4_BLOCK).min(x.len())];
    if let Some(e) = task.iter().position(|v| !v.is_finite()) {
        let (row, col) = at(start + e);
        return QuantError::NonFinite {
            op: "q4_quantize",
            row,
            col,
            value: task[e],
        };
    }
    for (b, blk) in task.chunks(Q4_BLOCK).enumerate() {
        let n = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        if n >= F16_ROUNDS_TO_INF {
            let (row, col) = at(start + b * Q4_BLOCK);
            return QuantError::ScaleOverflow {
                op: "q4_quantize",
                row,
                col,
                value: n,
                storage: "f16",
            };
        }
    }
    QuantError::Shape {
        op: "q4_quantize",
        shape: vec![x.len()],
        what: "unexpected fault".into(),
    }
}

impl QuantRows for Q4FlatMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    fn seg_align(&self) -> usize {
        1
    }
    /// The whole blocks inside the segment (contiguous in the flattened weight) on the path's
    /// Q4 kernel ([`crate::q4::dequantize`], bit-identical to the reference); the partial
    /// blocks at its two ends, which a row boundary cuts, by the scalar rule.
    fn dequant_segment(&self, path: KernelPath, r: usize, c0: usize, len: usize, dst: &mut [f32]) {
        let (packed, norm) = (self.packed.as_slice(), self.norm.f16s());
        let start = r * self.inn + c0;
        let end = start + len;
        let whole_from = start.next_multiple_of(Q4_BLOCK).min(end);
        let whole_to = (end / Q4_BLOCK * Q4_BLOCK).max(whole_from);
        // Within one block (the head and the tail each lie in one): its norm converted once.
        let scalar = |from: usize, to: usize, out: &mut [f32]| {
            if from == to {
                return;
            }
            let n = norm[from / Q4_BLOCK].to_f32();
            for (f, w) in (from..to).zip(out.iter_mut()) {
                let c = ((packed[f / 2] >> (4 * (f % 2))) & 15) as f32;
                *w = ((c / 15.0) * 2.0) * n - n;
            }
        };
        let (head, rest) = dst[..len].split_at_mut(whole_from - start);
        let (body, tail) = rest.split_at_mut(whole_to - whole_from);
        scalar(start, whole_from, head);
        if !body.is_empty() {
            let (b0, b1) = (whole_from / Q4_BLOCK, whole_to / Q4_BLOCK);
            crate::q4::dequantize(path, &packed[b0 * 8..b1 * 8], &norm[b0..b1], body);
        }
        scalar(whole_to, end, tail);
    }
}

kernels::impl_weight_matrix!(Q4FlatMatrix, "q4");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q4::dequantize_ref;
    use nibble_tensor::{Rng, WeightMatrix};

    /// The reference in f32: quantize the flattened weight in blocks of 16, dequantize it.
    fn reference(w: &Tensor) -> Vec<f32> {
        let n = w.data().len();
        let mut packed = vec![0u8; n / 2];
        let mut norm = vec![f16::ZERO; n / 16];
        assert!(quantize_blocks_ref(w.data(), &mut packed, &mut norm));
        let mut out = vec![f32::NAN; n];
        dequantize_ref(&packed, &norm, &mut out);
        out
    }

    #[test]
    fn flat_blocks_cross_rows_as_the_reference_s_do() {
        let mut rng = Rng::new(7);
        for (out, inn) in [
            (20, 20),
            (4, 4),
            (1, 16),
            (16, 1),
            (3, 48),
            (100, 100),
            (8, 30),
        ] {
            let mut w = Tensor::randn(&[out, inn], &mut rng);
            // A zero block and a large value, for the special cases.
            w.data_mut()[..16].fill(0.0);
            w.data_mut()[out * inn - 1] = 300.0;
            let q = Q4FlatMatrix::quantize(&w).unwrap();
            let want = reference(&w);
            assert_eq!(q.to_f32().data(), &want[..], "{out}x{inn}");
            // Every row segment, ragged starts and lengths included, with NaN-filled outputs,
            // on every path this CPU has (whole blocks take the path's Q4 kernel).
            let paths = crate::cpu::available_paths();
            for p in [KernelPath::Avx2Fma, KernelPath::Avx512] {
                if !paths.contains(&p) {
                    println!("q4_flat: this CPU lacks the {p:?} tier; its segments not tested");
                }
            }
            for &path in &paths {
                for r in 0..out {
                    for (c0, len) in [(0, inn), (inn / 3, inn - inn / 3), (inn - 1, 1), (0, 0)] {
                        let mut dst = vec![f32::NAN; len];
                        q.dequant_segment(path, r, c0, len, &mut dst);
                        let want = &want[r * inn + c0..r * inn + c0 + len];
                        assert_eq!(dst, want, "{path:?} {out}x{inn} row {r} from {c0}");
                    }
                }
            }
            // The products use those weights: x · Wᵀ against the dequantized f32 weight.
            for m in [1, 3, 17] {
                let x = Tensor::randn(&[m, inn], &mut rng);
                let mut y = vec![f32::NAN; m * out];
                q.matmul_t(x.data(), m, &mut y, false).unwrap();
                let d = Tensor::from_vec(&[out, inn], want.clone()).unwrap();
                let mut y_ref = vec![f32::NAN; m * out];
                d.matmul_t(x.data(), m, &mut y_ref, false).unwrap();
                let off = y
                    .iter()
                    .zip(&y_ref)
                    .fold(0.0f32, |a, (p, q)| a.max((p - q).abs()));
                assert!(off < 1e-3, "{out}x{inn} m={m}: {off}");
            }
            // Parts round-trip.
            let back = Q4FlatMatrix::from_parts(
                out,
                inn,
                Bytes::from_vec(q.packed_bytes().to_vec()),
                Bytes::from_vec(q.norm_bytes().to_vec()),
            )
            .unwrap();
            assert_eq!(back.to_f32().data(), &want[..]);
        }
    }

    #[test]
    fn bad_weights_and_shapes_are_named() {
        let mut w = Tensor::zeros(&[4, 20]);
        w.data_mut()[2 * 20 + 5] = f32::NAN;
        match Q4FlatMatrix::quantize(&w) {
            Err(QuantError::NonFinite { row, col, .. }) => assert_eq!((row, col), (2, 5)),
            other => panic!("{other:?}"),
        }
        let mut w = Tensor::zeros(&[4, 20]);
        w.data_mut()[37] = 1e6;
        match Q4FlatMatrix::quantize(&w) {
            // Block 2 (flat 32..48) starts at row 1, column 12.
            Err(QuantError::ScaleOverflow { row, col, .. }) => assert_eq!((row, col), (1, 12)),
            other => panic!("{other:?}"),
        }
        assert!(Q4FlatMatrix::quantize(&Tensor::zeros(&[3, 5])).is_err());
        assert!(Q4FlatMatrix::from_parts(
            4,
            20,
            Bytes::from_vec(vec![0; 39]),
            Bytes::from_vec(vec![0; 10])
        )
        .is_err());
    }
}
