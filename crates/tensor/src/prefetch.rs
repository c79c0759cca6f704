//! Bringing a weight's rows toward a core ahead of the product that reads them.
//!
//! A batch-1 product streams each row of W once, so a thread's speed is the rate at which its
//! rows reach it. A [`crate::team`] running a network layer by layer leaves each member idle
//! at the barrier between layers until the slowest one arrives; a member that knows which rows
//! of the next layer it will compute can spend that time asking for them
//! ([`WeightMatrix::row_memory`] says where they lie), so the next layer's first reads find
//! them in the core's L2 instead of starting a stream from L3 or DRAM.
//!
//! [`Prefetch`] holds the memory of some rows and issues one software prefetch (into L2) per
//! 64-byte line, a few lines per [`Prefetch::step`], so that a waiter can poll its barrier in
//! between and stop the moment the others arrive. A prefetch changes no value: it is a hint
//! the CPU may drop.

use crate::weight::WeightMatrix;
use std::ops::Range;

/// Bytes per cache line (x86-64 and the common Arm cores).
const LINE: usize = 64;

/// Regions of memory to prefetch, walked line by line.
///
/// ```
/// use nibble_tensor::prefetch::Prefetch;
/// use nibble_tensor::Tensor;
/// let w = Tensor::zeros(&[64, 32]);
/// let mut p = Prefetch::default();
/// p.add_rows(&w, 0..16); // 16 rows of 32 floats: 2048 bytes, 32 lines
/// assert_eq!(p.lines_left(), 32);
/// while p.step(8) {}
/// assert_eq!(p.lines_left(), 0);
/// ```
#[derive(Debug, Default)]
pub struct Prefetch<'a> {
    regions: Vec<&'a [u8]>,
    /// The region being walked and the byte offset of its next line.
    region: usize,
    offset: usize,
}

impl<'a> Prefetch<'a> {
    /// Adds the memory of W's rows `rows` ([`WeightMatrix::row_memory`]; nothing for a
    /// weight that does not say, or rows past its end).
    pub fn add_rows(&mut self, w: &'a dyn WeightMatrix, rows: Range<usize>) {
        w.row_memory(rows, &mut |bytes| {
            if !bytes.is_empty() {
                self.regions.push(bytes)
            }
        });
    }

    /// Cache lines not prefetched yet.
    pub fn lines_left(&self) -> usize {
        self.regions
            .iter()
            .enumerate()
            .skip(self.region)
            .map(|(i, r)| {
                let start = if i == self.region { self.offset } else { 0 };
                lines_in(&r[start.min(r.len())..])
            })
            .sum()
    }

    /// Prefetches up to `lines` more cache lines (into L2); `true` while lines are left.
    pub fn step(&mut self, lines: usize) -> bool {
        for _ in 0..lines {
            let Some(region) = self.current() else {
                return false;
            };
            prefetch_line(&region[self.offset..]);
            // On to the next line boundary after this address.
            let addr = region.as_ptr() as usize + self.offset;
            self.offset += LINE - addr % LINE;
        }
        self.current().is_some()
    }

    /// The region holding the next line, if any is left.
    fn current(&mut self) -> Option<&'a [u8]> {
        while let Some(&region) = self.regions.get(self.region) {
            if self.offset < region.len() {
                return Some(region);
            }
            self.region += 1;
            self.offset = 0;
        }
        None
    }
}

/// Cache lines that `bytes` touches.
fn lines_in(bytes: &[u8]) -> usize {
    if bytes.is_empty() {
        return 0;
    }
    let start = bytes.as_ptr() as usize;
    let end = start + bytes.len();
    end.div_ceil(LINE) - start / LINE
}

/// Asks for the line holding `bytes[0]` (non-empty) in L2.
#[inline(always)]
fn prefetch_line(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: SSE is part of x86-64's baseline, and a prefetch neither faults nor changes
        // memory; the address is inside `bytes` anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(bytes.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HalfTensor, PackedWeight, Tensor};

    #[test]
    fn walks_every_line_once_and_stops() {
        let w = Tensor::zeros(&[7, 33]);
        let mut p = Prefetch::default();
        p.add_rows(&w, 2..5);
        p.add_rows(&w, 7..7);
        p.add_rows(&w, 9..12); // past the end: nothing
        let total = p.lines_left();
        assert!(total >= (3 * 33 * 4) / LINE, "{total}");
        let mut steps = 0;
        while p.step(1) {
            steps += 1;
            assert_eq!(p.lines_left(), total - steps);
        }
        assert_eq!(steps + 1, total);
        assert_eq!(p.lines_left(), 0);
        assert!(!p.step(4));
    }

    #[test]
    fn dense_packed_and_half_weights_name_their_rows() {
        let values: Vec<f32> = (0..40 * 300).map(|i| i as f32).collect();
        let w = Tensor::from_vec(&[40, 300], values).unwrap();
        let h = HalfTensor::from_f32(&w);
        let packed = PackedWeight::pack(&w).unwrap();
        for (weight, bytes_per_row) in [
            (&w as &dyn WeightMatrix, 300 * 4),
            (&h, 300 * 2),
            // Rows 16..32 are one whole panel of 16 rows.
            (&packed, 300 * 4),
        ] {
            let mut regions = Vec::new();
            weight.row_memory(16..32, &mut |b| regions.push(b.len()));
            assert_eq!(
                regions.iter().sum::<usize>(),
                16 * bytes_per_row,
                "{weight:?}"
            );
            regions.clear();
            weight.row_memory(40..41, &mut |b| regions.push(b.len()));
            assert!(regions.is_empty(), "{weight:?}");
        }
        // A packed weight names whole panels: rows 3..5 lie in panel 0.
        let mut total = 0;
        packed.row_memory(3..5, &mut |b| total += b.len());
        assert_eq!(total, 16 * 300 * 4);
    }
}
