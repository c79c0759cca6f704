//! A LoRA adapter's `h = x · Aᵀ` on the int8 activations of its layer's integer GEMM.
//!
//! Where int8 activations run a quantized layer with an adapter through the integer GEMM at
//! inference, its x is quantized once and serves the adapter too: `h = x · A'ᵀ` runs on the
//! integer kernel over the same int8 x, with A' = A quantized as x is ([`AdapterCodes`]: per
//! row and group of [`GROUP`] = 128 columns, `round_half_even(a · 127 / amax)` with the scale
//! `amax / 127`), instead of an f32 product over the f32 x at a quarter of the integer rate.
//! It runs inside the base product's pass: the first task of each block of rows computes
//! those rows of h (`run_once`) right before it adds `h · Bᵀ`, in f32, to the
//! outputs it has just stored (the f32 tail of `linear_low_rank_into`'s int8 pass)
//! ([`forward_adapter`]).
//!
//! # Error of h (against `x · Aᵀ` in f32)
//! With `ε_x,k = amax_x,g(k) / 254` and `ε_a,jk = amax_a,j,g(k) / 254` (the steps' halves of
//! x's and of A's row j's group holding column k):
//! `|Δh_j| <= Σ_k (|a_jk| · ε_x,k + |x_k| · ε_a,jk + ε_x,k · ε_a,jk)` plus f32 rounding, and
//! y moves by `Σ_j |b_oj| · |Δh_j|` on top of the base product's own int8 error. The first
//! term is the one int8 activations already put on the base product (`x`'s steps); the
//! second is A's own rounding. Tested in `tests/adapter_int8.rs`; on one 1024² Q4 layer with
//! a rank-32 adapter (x ~ N(0, 1), A and B uniform in ±0.03) the mean |Δy| was 1.6e-4, 0.4 %
//! of the adapter's share of y (README, "Int8 activations").

use super::{
    gemm, gemm_layer, gemm_tier, quantize_x_into, run_once, CodeKind, IntCodes, IntLayout, IntTier,
    LowRankTail, QuantizedX, XLayout, YPtr, GROUP, PARALLEL_MIN_WORK, QUANTIZED,
};
use nibble_tensor::gemm::gemv::gemv_fits;
use nibble_tensor::gemm::MatRef;
use nibble_tensor::lowrank::LowRank;
use nibble_tensor::ops::PostOp;
use std::sync::atomic::AtomicU8;

/// An adapter's matrix (A `[r, in]` or B `[out, r]`) quantized per row and group of [`GROUP`]
/// columns as x is, seen through the integer view of a layout of `unit` columns per unit
/// (each unit's scale is its group's; no offsets).
///
/// ```
/// use nibble_quant::act8::{adapter::AdapterCodes, IntCodes};
/// let a = [0.5f32, -1.0, 0.25, 0.0];
/// let codes = AdapterCodes::new(&a, 2, 2, 16).unwrap();
/// let (mut row, mut scale, mut offset) = ([0u8; 2], [0f32; 1], [1f32; 1]);
/// codes.int_codes(0, &mut row);
/// codes.int_affine(0, &mut scale, &mut offset);
/// assert_eq!((row.map(|c| c as i8), scale[0], offset[0]), ([64, -127], 1.0 / 127.0, 0.0));
/// assert!(AdapterCodes::new(&[f32::NAN, 0.0], 1, 2, 16).is_none());
/// ```
pub struct AdapterCodes<'a> {
    generation: u64,
    values: &'a [f32],
    rows: usize,
    inp: usize,
    unit: usize,
}

/// Whether every value is finite (no NaN, no infinity), without a branch per value.
fn all_finite(values: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    values.iter().map(|v| v.to_bits() & EXP).max().unwrap_or(0) < EXP
}

impl<'a> AdapterCodes<'a> {
    /// `values` (`rows x inp`, row-major) quantized for a layout of `unit` (16, 64 or 128)
    /// columns per unit; `None` where the lengths disagree, the unit is another, `inp` is 0 or
    /// a value is not finite. Each row is quantized when its codes are asked for.
    pub fn new(values: &'a [f32], rows: usize, inp: usize, unit: usize) -> Option<Self> {
        Self::of_shape(values, rows, inp, unit).filter(|_| all_finite(values))
    }

    /// [`AdapterCodes::new`] without the check that the values are finite (the caller makes
    /// it before any code is asked for).
    fn of_shape(values: &'a [f32], rows: usize, inp: usize, unit: usize) -> Option<Self> {
        (inp > 0 && rows.checked_mul(inp) == Some(values.len()) && matches!(unit, 16 | 64 | 128))
            .then(|| AdapterCodes {
                generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                values,
                rows,
                inp,
                unit,
            })
    }

    /// `f(codes, group scales)` of row `r`, quantized as x is ([`super::quantize_x`]). The
    /// packing asks for a row's codes and then its scales: the thread's last row is kept
    /// for the second call.
    fn with_row<T>(&self, r: usize, f: impl FnOnce(&[i8], &[f32]) -> T) -> T {
        let row = &self.values[r * self.inp..][..self.inp];
        let key = (self.generation, r);
        let mut s = ROW.take();
        if s.key != Some(key) {
            // The values are finite (checked in `new`), so the quantization succeeds.
            let finite =
                quantize_x_into(row, 1, self.inp, self.unit, false, &mut s.q, XLayout::PLAIN);
            debug_assert!(finite);
            s.key = Some(key);
        }
        let out = f(&s.q.xq, &s.q.sx);
        ROW.set(s);
        out
    }
}

/// The last row [`AdapterCodes::with_row`] quantized on this thread: the generation of its
/// [`AdapterCodes`] and its index, and its quantization.
struct RowCache {
    key: Option<(u64, usize)>,
    q: QuantizedX,
}

impl Default for RowCache {
    fn default() -> Self {
        RowCache {
            key: None,
            q: QuantizedX::EMPTY,
        }
    }
}

/// Numbers each [`AdapterCodes`] made, so that a row kept by [`RowCache`] is never taken for
/// a row of another (the same address may hold other values by then).
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl IntCodes for AdapterCodes<'_> {
    fn int_dims(&self) -> (usize, usize) {
        (self.rows, self.inp)
    }

    fn int_layout(&self) -> Option<IntLayout> {
        Some(IntLayout {
            unit: self.unit,
            kind: CodeKind::Signed,
        })
    }

    fn int_codes(&self, r: usize, dst: &mut [u8]) {
        self.with_row(r, |xq, _| {
            for (d, &c) in dst[..self.inp].iter_mut().zip(xq) {
                *d = c as u8;
            }
        })
    }

    fn int_affine(&self, r: usize, scale: &mut [f32], offset: &mut [f32]) {
        self.with_row(r, |_, sx| {
            let units = self.inp.div_ceil(self.unit);
            for (u, (s, o)) in scale[..units]
                .iter_mut()
                .zip(&mut offset[..units])
                .enumerate()
            {
                *s = sx[u * self.unit / GROUP];
                *o = 0.0;
            }
        })
    }
}

/// The calling thread's storage for [`forward_adapter`] (kept between calls).
#[derive(Default)]
struct AdapterScratch {
    /// `h`, `[m, r]`.
    h: Vec<f32>,
    /// x quantized for A's kernel where its layout differs from W's.
    xa: Option<QuantizedX>,
    /// A's packed panels.
    packed_a: Option<gemm::PackedW>,
}

thread_local! {
    /// A row's quantization in [`AdapterCodes`].
    static ROW: std::cell::Cell<RowCache> = const {
        std::cell::Cell::new(RowCache {
            key: None,
            q: QuantizedX::EMPTY,
        })
    };
    /// See [`AdapterScratch`].
    static SCRATCH: std::cell::Cell<AdapterScratch> = std::cell::Cell::new(AdapterScratch::default());
}

/// `y = post(bias + x · Wᵀ + h · Bᵀ)` with `h = x · A'ᵀ` for a LoRA `adapter` (A `[r, in]`, B
/// `[out, r]`) on int8 activations (see the [module docs](self)): x quantized once for the
/// integer GEMM of W (A's panels packed beside it); in the base product's one pass, each
/// block of rows of h the integer kernel's product of the int8 x by A' = [`AdapterCodes`] of
/// A in units of [`GROUP`] columns (`AdapterCodes::new(a, r, in, GROUP)`), computed by the
/// first task that needs it, and each task's outputs the
/// base product with the bias, `h · Bᵀ` in f32 and `post`. The bits of `h` from [`super::forward`] of the
/// [`AdapterCodes`] followed by `nibble_tensor::linear_low_rank_into` of that h under int8
/// activations. Returns `false`, with `y` untouched, where that sequence would not run
/// these steps (below the GEMM's batches, [`gemm::GEMM_MIN_M`]; where B's product would run
/// as GEMVs, `gemv_fits(m, r)`; where the f32 tail does not fit: a rank of 0 or above the f32
/// GEMM's K block, or a process path below AVX2), where W has no
/// integer layout, shapes disagree, or x or A holds a NaN or an infinity.
#[allow(clippy::too_many_arguments)]
pub fn forward_adapter(
    tier: IntTier,
    w: &dyn IntCodes,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    adapter: &LowRank<'_>,
    post: PostOp,
) -> bool {
    let rank = adapter.rank();
    let Some((o, i, layout)) = gemm_layer(w, x, m, y, bias) else {
        return false;
    };
    if (adapter.out_features(), adapter.in_features()) != (o, i)
        || gemv_fits(m, rank)
        || !LowRankTail::fits(rank)
    {
        return false;
    }
    // A in units of a whole group: its codes have one scale per group (as x's), so a
    // group's integer sum needs one f32 step where W's units of 16 (Q4) take eight. A's
    // finiteness is checked beside x's quantization, before any code of A is read.
    let Some(a) = AdapterCodes::of_shape(adapter.a_values(), rank, i, GROUP) else {
        return false;
    };
    let Ok(b) = MatRef::row_major(adapter.b_values(), o, rank) else {
        return false;
    };
    let a_layout = IntLayout {
        unit: GROUP,
        kind: CodeKind::Signed,
    };
    let tier = gemm_tier(tier, layout.unit);
    let threads = rayon::current_num_threads().max(1);
    let parallel =
        |rows: usize| threads > 1 && rows.saturating_mul(i).saturating_mul(m) >= PARALLEL_MIN_WORK;
    let mut q = QUANTIZED.take();
    let mut s = SCRATCH.take();
    // A's panels, packed beside x's quantization (A is one block of the GEMM for ranks up to
    // 64: packed inside the products, one task would pack it while the others wait).
    let a_prepared = gemm::Prepared::new(tier, &a, a_layout, s.packed_a.take());
    let done = 'run: {
        let a_finite = || all_finite(adapter.a_values());
        let (quantized, finite) = if parallel(o) {
            rayon::join(
                || gemm::quantize_for(tier, layout, x, m, i, true, &mut q),
                || {
                    a_finite() && {
                        a_prepared.pack_all();
                        true
                    }
                },
            )
        } else {
            (
                gemm::quantize_for(tier, layout, x, m, i, false, &mut q),
                a_finite(),
            )
        };
        if !quantized || !finite {
            break 'run false;
        }
        // h = x · A'ᵀ on the same int8 x (quantized again, to the same values, where A's
        // kernel reads another layout: the AVX2 tier's 4-bit kernels read it offset). A has
        // no offsets, so x's unit sums (of W's units) go unread.
        let xa = if gemm::same_x_bytes(tier, layout, a_layout) {
            &q
        } else {
            let xa = s.xa.get_or_insert(QuantizedX::EMPTY);
            if !gemm::quantize_for(tier, a_layout, x, m, i, parallel(o), xa) {
                break 'run false;
            }
            xa
        };
        // h's rows are computed inside the base product's pass: the first task of each
        // block of rows computes them (`run_once`) right before it adds `h · Bᵀ` to its
        // outputs, while that block of x is in its cache; no pass of its own.
        // Every value of h is written before it is read: no clearing pass (128 KiB at batch
        // 1024, rank 32, on the calling thread).
        s.h.truncate(m * rank);
        s.h.resize(m * rank, 0.0);
        let h_ptr = s.h.as_mut_ptr();
        let h_rows: Vec<AtomicU8> = (0..m.div_ceil(gemm::M_BLOCK))
            .map(|_| AtomicU8::new(0))
            .collect();
        let bt = b.t();
        // SAFETY: `s.h` holds `m · rank` values and is neither moved nor resized until the
        // pass below returns; each block of its rows is written inside its `run_once` before
        // any task reads it.
        let Some(tail) = (unsafe { LowRankTail::from_raw_h(h_ptr, m, rank, &bt, o) }) else {
            break 'run false;
        };
        let a_prepared = &a_prepared;
        // h as the GEMM's output (`YPtr` is shared between the tasks; each writes its rows).
        let hp = YPtr {
            y: h_ptr,
            bias: std::ptr::null(),
            cols: rank,
            post: PostOp::Identity,
        };
        let add_tail = |y: YPtr, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
            run_once(&h_rows[rows.start / gemm::M_BLOCK], "computing h", || {
                // SAFETY: the task's rows (a block of M_BLOCK rows of the batch) of h, which
                // `run_once` lets this task alone write, and nothing reads until it is done.
                unsafe { a_prepared.rows_into(xa, rows.clone(), hp) }
            });
            // SAFETY: the task's rectangle of y (rows x cols), its alone (`TaskTail`); h's
            // rows are in (above).
            unsafe { tail.apply(y.at(0), rows, cols, post) }
        };
        let yp = YPtr::new(y, bias.map(|b| (b, PostOp::Identity)), o);
        gemm::run_quantized(
            tier,
            w,
            layout,
            &q,
            m,
            parallel(o),
            yp,
            false,
            Some(&add_tail),
        );
        true
    };
    s.packed_a = Some(a_prepared.into_buffers());
    SCRATCH.set(s);
    QUANTIZED.set(q);
    done
}
