//! A second, row-interleaved copy of a Q4 matrix's whole groups for the batch-1 int8 GEMV on
//! AVX-512 VNNI ([`crate::arch::avx512::q4_int8::gemv_tiles`]).
//!
//! The checkpoint layout keeps each row's 8 code bytes and its norm per block of 16 side by
//! side with the row's next block ([`super`]'s module docs). A `vpdpbusd` over 64 of those
//! bytes leaves each block's sum split over two lanes of one row, which cost the row kernel
//! two permutes, an add and an insert of the norms per pair of rows and group: about a
//! quarter of its vector instructions. Here 16 rows (a *tile*) are interleaved so that each
//! lane is one row: for tile `T` (rows `16T..16T + 16`), block `b` (of the whole groups of
//! 128 columns only) and half `j` of the block,
//! - `codes[((T · nb + b) · 2 + j) · 64 + 4i .. + 4]` = bytes `4j .. 4j + 4` of block `b` of
//!   row `16T + i` (its elements `16b + 8j .. 16b + 8j + 8`, low nibble first);
//! - `norms[(T · nb + b) · 16 + i]` = that block's f16 norm,
//!
//! with `nb` the whole groups' blocks per row. A block of a tile is then two 64-byte loads of
//! codes, four `vpdpbusd` against broadcast words of the prepared x, and one 32-byte load of
//! 16 norms. One 1024² layer on one thread of the 2-core Xeon: 10.6 µs against 14.2 µs for
//! the row kernel (2026-12-05, prototype, same bits).
//!
//! The copy costs the memory of the matrix again (10 bits per weight); it is built on the
//! first int8 GEMV that can use it and kept with the matrix. The rows past the last whole
//! tile, and the columns past the last whole group, are read from the checkpoint layout.
//! `NIBBLE_Q4_TILES=0` turns the copy off (every call then takes the row kernel).
//!
//! CPUs without AVX-512 VNNI keep the row kernels and build no copy: a 256-bit twin of the
//! tile kernel (two halves of 8 rows a tile) was only 9 % faster on one thread of the 2-core
//! Xeon (`NIBBLE_KERNEL=avx2`, 2026-12-05: AVX-VNNI 18.6 against 20.4 µs, `vpmaddubsw` 19.9
//! against 21.5), not worth a second copy of the weights.

use super::act8::{BLOCKS_PER_GROUP, GROUP};
use super::Q4Matrix;
use half::f16;
use std::sync::OnceLock;

/// Rows per tile: one per 32-bit lane of a zmm.
pub(crate) const TILE_ROWS: usize = 16;

/// Code bytes of one block of one tile (16 rows × 8 bytes).
pub(crate) const TILE_BLOCK_BYTES: usize = TILE_ROWS * 8;

/// One cache line of the copy: its storage, so that each of the kernel's 64-byte loads of
/// codes is one aligned line, and each 32-byte load of norms half of one (a load across two
/// lines cost about 6 % of a 1024² product on the 2-core Xeon, 2026-12-05).
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Line(pub(crate) [u8; 64]);
const _: () = assert!(std::mem::size_of::<Line>() == 64);

/// The interleaved copy ([module docs](self)).
#[derive(Debug)]
pub(crate) struct Q4Tiles {
    /// `[out / 16, nb, 2]` lines of `[16, 4]` bytes.
    pub(crate) codes: Vec<Line>,
    /// `[out / 16, nb, 16]` norms, two blocks a line (`nb` is even).
    pub(crate) norms: Vec<Line>,
    /// Whole tiles (`out / 16`).
    pub(crate) tiles: usize,
    /// Blocks per row in the copy (those of the whole groups: `in / 128 · 8`).
    pub(crate) nb: usize,
}

impl Q4Tiles {
    /// The copy of `m`'s whole tiles and groups, or `None` where it has none of either (or
    /// the memory for it is refused).
    fn build(m: &Q4Matrix) -> Option<Q4Tiles> {
        let tiles = m.out / TILE_ROWS;
        let nb = m.inn / GROUP * BLOCKS_PER_GROUP;
        if tiles == 0 || nb == 0 {
            return None;
        }
        let (row_bytes, row_blocks) = (m.row_bytes(), m.row_blocks());
        let (packed, norm) = (m.packed.as_slice(), m.norms());
        // (Memory the system refuses leaves the matrix without a copy, on the row kernel,
        // rather than aborting.)
        let lines = |n: usize| {
            let mut v = Vec::new();
            v.try_reserve_exact(n).ok()?;
            v.resize(n, Line([0; 64]));
            Some(v)
        };
        let (mut codes, mut norms) = (lines(tiles * nb * 2)?, lines(tiles * nb / 2)?);
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut codes);
        let halves: &mut [f16] = bytemuck::cast_slice_mut(&mut norms);
        for (t, (tc, tn)) in bytes
            .chunks_exact_mut(nb * TILE_BLOCK_BYTES)
            .zip(halves.chunks_exact_mut(nb * TILE_ROWS))
            .enumerate()
        {
            for i in 0..TILE_ROWS {
                let r = t * TILE_ROWS + i;
                let row = &packed[r * row_bytes..][..nb * 8];
                for (b, src) in row.chunks_exact(8).enumerate() {
                    let dst = &mut tc[b * TILE_BLOCK_BYTES..][..TILE_BLOCK_BYTES];
                    dst[4 * i..4 * i + 4].copy_from_slice(&src[..4]);
                    dst[64 + 4 * i..64 + 4 * i + 4].copy_from_slice(&src[4..]);
                    tn[b * TILE_ROWS + i] = norm[r * row_blocks + b];
                }
            }
        }
        Some(Q4Tiles {
            codes,
            norms,
            tiles,
            nb,
        })
    }

    /// Bytes held by the copy.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.codes.as_slice()) + std::mem::size_of_val(self.norms.as_slice())
    }

    /// The codes as bytes (`[out / 16, nb, 2, 16, 4]`), 64-byte aligned.
    pub(crate) fn code_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.codes)
    }

    /// The norms (`[out / 16, nb, 16]`).
    pub(crate) fn norm_halves(&self) -> &[f16] {
        bytemuck::cast_slice(&self.norms)
    }
}

/// `rows` split at the copy's whole tiles (`tiles` of them): the rows before the first whole
/// tile inside `rows`, those tiles, and the rows after the last; `None` where `rows` holds no
/// whole tile of the copy.
pub(crate) fn split_at_tiles(
    rows: std::ops::Range<usize>,
    tiles: usize,
) -> Option<(
    std::ops::Range<usize>,
    std::ops::Range<usize>,
    std::ops::Range<usize>,
)> {
    let (t0, t1) = (
        rows.start.div_ceil(TILE_ROWS),
        (rows.end / TILE_ROWS).min(tiles),
    );
    (t0 < t1).then(|| {
        let (head, tail) = (t0 * TILE_ROWS, t1 * TILE_ROWS);
        (rows.start..head, t0..t1, tail..rows.end)
    })
}

/// Whether the copy may be built (`NIBBLE_Q4_TILES=0` says no), read once.
pub(crate) fn tiles_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !std::env::var("NIBBLE_Q4_TILES").is_ok_and(|v| v.trim() == "0"))
}

/// A matrix's copy, built at most once. It is a cache of the matrix's own bytes, so it takes
/// no part in comparisons and a clone starts without it.
#[derive(Default)]
pub(crate) struct TilesCache(OnceLock<Option<Q4Tiles>>);

impl TilesCache {
    /// `m`'s copy (built on the first call), or `None` where `m` has no whole tile or group.
    /// (Whether to use a copy at all, [`tiles_enabled`], is the dispatch's choice.)
    pub(crate) fn get(&self, m: &Q4Matrix) -> Option<&Q4Tiles> {
        self.0.get_or_init(|| Q4Tiles::build(m)).as_ref()
    }

    /// Bytes of the copy if it has been built.
    pub(crate) fn bytes(&self) -> usize {
        self.0
            .get()
            .and_then(Option::as_ref)
            .map_or(0, Q4Tiles::bytes)
    }
}

impl Clone for TilesCache {
    fn clone(&self) -> Self {
        TilesCache::default()
    }
}

impl PartialEq for TilesCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for TilesCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TilesCache({} bytes)", self.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every whole-group code and norm of every whole tile sits where the module docs say, and
    /// shapes without a whole tile or group get no copy.
    #[test]
    fn tiles_hold_the_rows_blocks() {
        let mut rng = nibble_tensor::Rng::new(3);
        for (out, inn) in [
            (16usize, 128usize),
            (33, 272),
            (17, 1040),
            (15, 256),
            (32, 127),
        ] {
            let w = nibble_tensor::Tensor::randn(&[out, inn], &mut rng);
            let m = Q4Matrix::quantize(&w).unwrap();
            let Some(t) = Q4Tiles::build(&m) else {
                assert!(
                    out < TILE_ROWS || inn < GROUP,
                    "{out}x{inn} has a whole tile"
                );
                continue;
            };
            assert_eq!((t.tiles, t.nb), (out / 16, inn / 128 * 8));
            assert_eq!(t.code_bytes().as_ptr() as usize % 64, 0, "aligned lines");
            for r in 0..t.tiles * TILE_ROWS {
                let (tile, i) = (r / TILE_ROWS, r % TILE_ROWS);
                for b in 0..t.nb {
                    let at = (tile * t.nb + b) * TILE_BLOCK_BYTES;
                    for e in 0..16 {
                        let byte = t.code_bytes()[at + (e / 8) * 64 + 4 * i + (e % 8) / 2];
                        let code = (byte >> (4 * (e % 2))) & 15;
                        let want = m.packed.as_slice()[r * m.row_bytes() + b * 8 + e / 2]
                            >> (4 * (e % 2))
                            & 15;
                        assert_eq!(code, want, "{out}x{inn} row {r} block {b} element {e}");
                    }
                    assert_eq!(
                        t.norm_halves()[(tile * t.nb + b) * TILE_ROWS + i],
                        m.norms()[r * m.row_blocks() + b]
                    );
                }
            }
        }
    }
}
