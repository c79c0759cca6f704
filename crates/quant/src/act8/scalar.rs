//! The portable integer tier: plain loops over whole units (the compiler vectorizes them for
//! the baseline target). Exact, so identical to [`super::unit_sums_ref`] and every other tier.

use super::{CodeKind, GROUP};

/// [`super::unit_sums`] for lengths already checked.
pub(super) fn unit_sums<const V: usize>(
    kind: CodeKind,
    unit: usize,
    codes: &[u8],
    xq: [&[i8]; V],
    out: [&mut [i32]; V],
) {
    for (v, o) in out.into_iter().enumerate() {
        match kind {
            CodeKind::Nibble => sums(unit, codes, xq[v], o, i16::from),
            CodeKind::Signed => sums(unit, codes, xq[v], o, |c| i16::from(c as i8)),
        }
    }
}

/// Per unit, 16-lane i32 accumulators over products widened to i16 (`|c · x| <= 128 · 127`
/// fits), summed at the unit's end.
#[inline(always)]
fn sums(unit: usize, codes: &[u8], xq: &[i8], out: &mut [i32], val: impl Fn(u8) -> i16) {
    debug_assert_eq!(codes.len() % GROUP, 0);
    for (u, o) in out.iter_mut().enumerate() {
        let c = &codes[u * unit..(u + 1) * unit];
        let x = &xq[u * unit..(u + 1) * unit];
        let mut acc = [0i32; 16];
        for (cc, xx) in c.chunks_exact(16).zip(x.chunks_exact(16)) {
            for l in 0..16 {
                acc[l] += i32::from(val(cc[l]) * i16::from(xx[l]));
            }
        }
        *o = acc.iter().sum();
    }
}
