//! Small-batch products `y = x · Wᵀ` over a weight stored in the GEMM's packed layout
//! ([`crate::PackedWeight`]), with the GEMM's bits.
//!
//! Shapes: the packed `Wᵀ` is `[k blocks][npan panels][kc][NR]` (block `k0` starts at
//! `k0 · npan · NR`, `kc = min(KC, k - k0)`, lane `j` of panel `p` is output `p · NR + j`);
//! `x` is `[k]`; the result of panel `p` is `NR` outputs.
//!
//! Every output runs the GEMM's sequence ([`super::gemm`]): per K block an accumulator
//! `acc = 0; acc = fma(x[k], w, acc)` over the block's `k` in order (on the portable and scalar
//! tiers `acc += x[k] · w`, rounded twice, as their GEMM kernels do), then the output is the
//! first block's `acc` (or `y + acc` when accumulating) and `+ acc` for every later block. So a
//! row of `x` gets the bits that the GEMM gives it at any batch on the same tier, whatever the
//! thread count.
//!
//! A panel is a contiguous `kc · NR` stream: the kernel runs [`PANELS_PER_STEP`] panels side by
//! side (independent accumulator chains; one broadcast of `x[k]` feeds them all), and a lone
//! panel four of its K blocks side by side.

use super::{KC, NR};
use crate::cpu::KernelPath;

/// Panels one kernel step computes at once.
pub(crate) const PANELS_PER_STEP: usize = 4;

/// K blocks a lone panel computes at once: one panel has one accumulator chain per K block,
/// and a chain of dependent FMAs runs at one per FMA latency (4 cycles), so four blocks side
/// by side keep four chains in flight, as [`PANELS_PER_STEP`] panels do.
const BLOCKS_PER_LONE_PANEL: usize = 4;

/// A packed `Wᵀ` (`k x npan · NR`) as the kernels read it.
#[derive(Clone, Copy)]
pub(crate) struct Panels<'a> {
    /// The packed floats (at least `k · npan · NR`).
    pub data: &'a [f32],
    /// Depth (W's `in`).
    pub k: usize,
    /// Panels (`ceil(out / NR)`).
    pub npan: usize,
}

/// `out[(p - p0) · NR + j]` for the panels `p0..p1` and one vector `x` `[k]`: with `accumulate`
/// `out` holds the starting values (the GEMM's `C +=`), else it is only written. `path` must
/// have gone through `supported()`; `p1 <= npan`, `out.len() >= (p1 - p0) · NR`,
/// `x.len() == k`, `k > 0`.
pub(crate) fn panels(
    path: KernelPath,
    w: Panels<'_>,
    x: &[f32],
    (p0, p1): (usize, usize),
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(
        p1 <= w.npan
            && p0 <= p1
            && out.len() >= (p1 - p0) * NR
            && x.len() == w.k
            && w.data.len() >= w.k * w.npan * NR,
        "panel_gemv: operands out of range"
    );
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => {
            // SAFETY: `path` went through `supported()` (the CPU has the AVX-512 tier); the
            // ranges were checked above.
            unsafe { super::avx512::panel_gemv(w, x, (p0, p1), out, accumulate) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2Fma => {
            // SAFETY: `path` went through `supported()` (AVX2 + FMA); ranges checked above.
            unsafe { avx2(w, x, (p0, p1), out, accumulate) }
        }
        _ => panels_ref(w, x, (p0, p1), out, accumulate, false),
    }
}

/// The scalar reference of [`panels`], one lane at a time: with `fused` the SIMD tiers'
/// sequence (`mul_add`), without it the portable and scalar tiers' (which run it).
pub(crate) fn panels_ref(
    w: Panels<'_>,
    x: &[f32],
    (p0, p1): (usize, usize),
    out: &mut [f32],
    accumulate: bool,
    fused: bool,
) {
    for (kb, k0) in (0..w.k).step_by(KC).enumerate() {
        let kc = KC.min(w.k - k0);
        let block = &w.data[k0 * w.npan * NR..];
        for p in p0..p1 {
            let panel = &block[p * kc * NR..(p + 1) * kc * NR];
            for j in 0..NR {
                let mut acc = 0.0f32;
                for (kk, &xv) in x[k0..k0 + kc].iter().enumerate() {
                    let wv = panel[kk * NR + j];
                    acc = if fused {
                        xv.mul_add(wv, acc)
                    } else {
                        acc + xv * wv
                    };
                }
                let o = &mut out[(p - p0) * NR + j];
                *o = if kb == 0 && !accumulate {
                    acc
                } else {
                    *o + acc
                };
            }
        }
    }
}

/// AVX2 + FMA [`panels`].
///
/// # Safety
/// The CPU must have AVX2 and FMA; operands as [`panels`] checks them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(w: Panels<'_>, x: &[f32], range: (usize, usize), out: &mut [f32], accumulate: bool) {
    // SAFETY: forwarded contract; features enabled on this function.
    unsafe { simd::<std::arch::x86_64::__m256>(w, x, range, out, accumulate) }
}

/// The SIMD body of [`panels`] for one register type: groups of [`PANELS_PER_STEP`] panels,
/// then the panels left one at a time.
///
/// # Safety
/// The CPU runs `L`'s tier and the caller enables it; operands as [`panels`] checks them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn simd<L: super::lanes::Lanes>(
    w: Panels<'_>,
    x: &[f32],
    (p0, p1): (usize, usize),
    out: &mut [f32],
    accumulate: bool,
) {
    let mut p = p0;
    while p < p1 {
        let dst = out[(p - p0) * NR..].as_mut_ptr();
        // SAFETY: panels p.. p + P lie below p1 <= npan and their outputs inside `out`.
        unsafe {
            if p1 - p >= PANELS_PER_STEP {
                group::<L, PANELS_PER_STEP, 1>(w, x, p, dst, accumulate);
                p += PANELS_PER_STEP;
            } else {
                // A lone panel (a team member's 16 rows): four K blocks side by side.
                group::<L, 1, BLOCKS_PER_LONE_PANEL>(w, x, p, dst, accumulate);
                p += 1;
            }
        }
    }
}

/// `P` panels from panel `p`, outputs at `dst` (`P · NR` floats): the K blocks `B` at a time
/// while `B` whole blocks remain (their chains are independent until they are added to the
/// output, in block order), then one at a time.
///
/// # Safety
/// As [`simd`], with `p + P <= npan` and `dst` valid for `P · NR` floats.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group<L: super::lanes::Lanes, const P: usize, const B: usize>(
    w: Panels<'_>,
    x: &[f32],
    p: usize,
    dst: *mut f32,
    accumulate: bool,
) {
    let whole = w.k / KC;
    let mut kb = 0;
    // SAFETY: forwarded contract; blocks kb.. kb + B (or the one block kb) lie inside K.
    unsafe {
        while kb + B <= whole {
            blocks::<L, P, B>(w, x, p, kb, KC, dst, accumulate);
            kb += B;
        }
        while kb * KC < w.k {
            blocks::<L, P, 1>(w, x, p, kb, KC.min(w.k - kb * KC), dst, accumulate);
            kb += 1;
        }
    }
}

/// K blocks `kb..kb + B` (each `kc` deep) of `P` panels from panel `p`: `P · B` independent
/// accumulator chains (one broadcast of x per block and step feeds the `P` panels), then each
/// block's sums added to `dst` in block order (the first block of K stores them unless
/// accumulating).
///
/// # Safety
/// As [`group`], with blocks `kb..kb + B` inside K and `kc` their depth (all `KC` when `B > 1`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
unsafe fn blocks<L: super::lanes::Lanes, const P: usize, const B: usize>(
    w: Panels<'_>,
    x: &[f32],
    p: usize,
    kb: usize,
    kc: usize,
    dst: *mut f32,
    accumulate: bool,
) {
    let vecs = NR / L::N;
    // SAFETY: block k0 starts at k0 · npan · NR and holds npan panels of kc · NR floats (the
    // layout `panels` checked the length of); x has k floats; dst has P · NR.
    unsafe {
        let mut base = [std::ptr::null::<f32>(); B];
        for b in 0..B {
            let k0 = (kb + b) * KC;
            base[b] = w.data.as_ptr().add(k0 * w.npan * NR + p * kc * NR);
        }
        let mut acc = [[[L::zero(); 2]; P]; B];
        for kk in 0..kc {
            for b in 0..B {
                let xv = L::splat(*x.get_unchecked((kb + b) * KC + kk));
                for u in 0..P {
                    let row = base[b].add(u * kc * NR + kk * NR);
                    for v in 0..vecs {
                        acc[b][u][v] = L::fmadd(xv, L::load(row.add(v * L::N)), acc[b][u][v]);
                    }
                }
            }
        }
        for b in 0..B {
            for u in 0..P {
                for v in 0..vecs {
                    let o = dst.add(u * NR + v * L::N);
                    let r = if kb + b == 0 && !accumulate {
                        acc[b][u][v]
                    } else {
                        L::add(L::load(o), acc[b][u][v])
                    };
                    r.store(o);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{available_paths, missing_paths};
    use crate::gemm::MatRef;
    use crate::gemm::PackB;
    use crate::rng::Rng;

    /// Packs a random `out x k` W into the layout of the module docs.
    fn packed(out: usize, k: usize, rng: &mut Rng) -> (Vec<f32>, usize) {
        let w: Vec<f32> = (0..out * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let npan = out.div_ceil(NR);
        let mut data = vec![f32::NAN; k * npan * NR];
        let wt = MatRef::row_major(&w, out, k).unwrap().t();
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for p in 0..npan {
                let off = k0 * npan * NR + p * kc * NR;
                wt.pack_panel(
                    k0,
                    kc,
                    p * NR,
                    NR.min(out - p * NR),
                    &mut data[off..off + kc * NR],
                );
            }
        }
        (data, npan)
    }

    #[test]
    fn every_tier_gives_the_reference_bits_on_awkward_shapes() {
        let missing = missing_paths();
        if !missing.is_empty() {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("note: panel GEMV tiers {missing:?} are missing here: skipped\n")
                    .as_bytes(),
            );
        }
        let mut rng = Rng::new(7);
        for out in [1, 7, 15, 16, 17, 31, 33, 63, 129] {
            for k in [1, 7, 17, 33, 255, 256, 257, 1023, 1024, 1300, 2048] {
                let (data, npan) = packed(out, k, &mut rng);
                let w = Panels {
                    data: &data,
                    k,
                    npan,
                };
                let x: Vec<f32> = (0..k).map(|_| rng.uniform(-2.0, 2.0)).collect();
                let start: Vec<f32> = (0..npan * NR).map(|_| rng.uniform(-1.0, 1.0)).collect();
                for (p0, p1) in [(0, npan), (npan / 2, npan), (0, npan.min(5))] {
                    for accumulate in [false, true] {
                        let fresh = |fill: &[f32]| -> Vec<f32> {
                            if accumulate {
                                fill[p0 * NR..p1 * NR].to_vec()
                            } else {
                                vec![f32::NAN; (p1 - p0) * NR]
                            }
                        };
                        for path in available_paths() {
                            let fused = matches!(path, KernelPath::Avx512 | KernelPath::Avx2Fma);
                            let mut want = fresh(&start);
                            panels_ref(w, &x, (p0, p1), &mut want, accumulate, fused);
                            assert!(want.iter().all(|v| v.is_finite()));
                            let mut got = fresh(&start);
                            panels(path, w, &x, (p0, p1), &mut got, accumulate);
                            assert_eq!(
                                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                "{path:?} out {out} k {k} panels {p0}..{p1} acc {accumulate}"
                            );
                        }
                    }
                }
            }
        }
    }
}
