//! Row-wise LayerNorm with the semantics of PyTorch's `group_norm(x, 1, weight, bias, eps)` on a
//! `[m, c]` input: each row is normalised over all its `c` channels with the biased variance,
//! then scaled and shifted per channel.

use crate::cpu::{kernel_path, KernelPath};
use crate::error::{Result, TensorError};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows per parallel task; also the unit of the fixed-order parameter-gradient reduction, so
/// results are bit-identical whatever the thread count.
const ROWS_PER_TASK: usize = 32;

/// Per-row statistics saved by the forward for the backward.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormStats {
    /// Mean of each row, `[m]`.
    pub mean: Vec<f32>,
    /// `1 / sqrt(var + eps)` of each row, `[m]`.
    pub rstd: Vec<f32>,
}

/// `x` `[m, c]` with `weight` and `bias` of `c` values, or the error naming `op` and the
/// shapes: `(m, c)`.
pub(crate) fn check(
    op: &'static str,
    x: &Tensor,
    weight: &[f32],
    bias: &[f32],
) -> Result<(usize, usize)> {
    let (m, c) = x.dims2(op)?;
    if weight.len() != c || bias.len() != c {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: x.shape().to_vec(),
            rhs: vec![weight.len(), bias.len()],
        });
    }
    Ok((m, c))
}

/// `y[i, j] = (x[i, j] - mean_i) * rstd_i * weight[j] + bias[j]` for `x` of shape `[m, c]`.
///
/// Errors: `x` not 2-D, `weight` or `bias` not `c` long, or `eps` negative, NaN or infinite
/// (`eps = 0` is allowed, as in PyTorch).
///
/// ```
/// use nibble_tensor::{layer_norm, Tensor};
/// let x = Tensor::from_vec(&[1, 2], vec![1.0, 3.0]).unwrap();
/// let (y, _) = layer_norm(&x, &[1.0, 1.0], &[0.0, 0.0], 1e-5).unwrap();
/// assert!((y.data()[0] + 1.0).abs() < 1e-4 && (y.data()[1] - 1.0).abs() < 1e-4);
/// ```
pub fn layer_norm(
    x: &Tensor,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) -> Result<(Tensor, LayerNormStats)> {
    let (m, c) = check("layer_norm", x, weight, bias)?;
    check_eps("layer_norm", eps)?;
    let mut y = Tensor::zeros(&[m, c]);
    let mut mean = vec![0.0f32; m];
    let mut rstd = vec![0.0f32; m];
    if c == 0 {
        return Ok((y, LayerNormStats { mean, rstd }));
    }
    let (path, affine) = (kernel_path(), Affine { weight, bias, eps });
    y.data_mut()
        .par_chunks_mut(c * ROWS_PER_TASK)
        .zip(x.data().par_chunks(c * ROWS_PER_TASK))
        .zip(mean.par_chunks_mut(ROWS_PER_TASK))
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|(((y, x), mean), rstd)| {
            let rows = ForwardRows::WithStats { x, y, mean, rstd };
            forward_rows_on(path, rows, &affine)
        });
    Ok((y, LayerNormStats { mean, rstd }))
}

/// [`layer_norm`] in place, for inference: the rows of `x` (`cols` wide) become the
/// normalised rows, bit-identical to [`layer_norm`]'s output; no statistics are kept. Errors
/// as [`layer_norm`]'s, and `x` not a whole number of rows.
///
/// ```
/// use nibble_tensor::layernorm::{layer_norm, layer_norm_assign};
/// use nibble_tensor::Tensor;
/// let x = Tensor::from_vec(&[2, 2], vec![1.0, 3.0, -2.0, 5.0]).unwrap();
/// let (y, _) = layer_norm(&x, &[1.0, 0.5], &[0.0, 1.0], 1e-5).unwrap();
/// let mut z = x.into_vec();
/// layer_norm_assign(&mut z, 2, &[1.0, 0.5], &[0.0, 1.0], 1e-5).unwrap();
/// assert_eq!(y.data(), &z[..]);
/// ```
pub fn layer_norm_assign(
    x: &mut [f32],
    cols: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) -> Result<()> {
    check_assign("layer_norm_assign", x.len(), cols, weight, bias)?;
    check_eps("layer_norm_assign", eps)?;
    if cols == 0 {
        return Ok(());
    }
    let (path, affine) = (kernel_path(), Affine { weight, bias, eps });
    let normalize_rows = |x: &mut [f32]| forward_rows_on(path, ForwardRows::InPlace { x }, &affine);
    // One task's rows run on the calling thread, without entering the pool (a batch-1
    // forward calls this from every member of a team: crate::team).
    if x.len() <= cols * ROWS_PER_TASK {
        normalize_rows(x);
    } else {
        x.par_chunks_mut(cols * ROWS_PER_TASK)
            .for_each(normalize_rows);
    }
    Ok(())
}

/// The residual add and the LayerNorm of an inference block in one pass: `x = LN(x + delta)`
/// row by row (each row added, then normalised while it is in L1), bit-identical to
/// [`add_in_place`](crate::ops::add_in_place)`(x, delta)` followed by [`layer_norm_assign`],
/// without the add's own pass over the batch and its fork-join. Shapes and `eps` as
/// [`layer_norm_assign`], and `delta` as long as `x`.
///
/// ```
/// use nibble_tensor::layernorm::{add_layer_norm_assign, layer_norm_assign};
/// let (w, b) = ([1.0f32, 0.5], [0.0f32, 1.0]);
/// let mut x = vec![1.0f32, 3.0, -2.0, 5.0];
/// let delta = [0.5f32, -1.0, 2.0, 0.25];
/// let mut apart: Vec<f32> = x.iter().zip(&delta).map(|(a, d)| a + d).collect();
/// layer_norm_assign(&mut apart, 2, &w, &b, 1e-5).unwrap();
/// add_layer_norm_assign(&mut x, &delta, 2, &w, &b, 1e-5).unwrap();
/// assert_eq!(x, apart);
/// assert!(add_layer_norm_assign(&mut x, &delta[..2], 2, &w, &b, 1e-5).is_err());
/// ```
pub fn add_layer_norm_assign(
    x: &mut [f32],
    delta: &[f32],
    cols: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) -> Result<()> {
    if delta.len() != x.len() {
        return Err(TensorError::ShapeMismatch {
            op: "add_layer_norm_assign",
            lhs: vec![x.len()],
            rhs: vec![delta.len()],
        });
    }
    check_assign("add_layer_norm_assign", x.len(), cols, weight, bias)?;
    check_eps("add_layer_norm_assign", eps)?;
    if cols == 0 {
        return Ok(());
    }
    let (path, affine) = (kernel_path(), Affine { weight, bias, eps });
    let add_normalize_rows = |(x, delta): (&mut [f32], &[f32])| {
        forward_rows_on(path, ForwardRows::AddInPlace { x, delta }, &affine)
    };
    if x.len() <= cols * ROWS_PER_TASK {
        add_normalize_rows((x, delta));
    } else {
        x.par_chunks_mut(cols * ROWS_PER_TASK)
            .zip(delta.par_chunks(cols * ROWS_PER_TASK))
            .for_each(add_normalize_rows);
    }
    Ok(())
}

/// Checks a LayerNorm's epsilon: finite and not negative (0 is allowed, as in PyTorch), else
/// [`TensorError::Invalid`] naming `op` and the value. A negative, NaN or infinite epsilon
/// made every row NaN (or zero) without an error.
pub(crate) fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        return Ok(());
    }
    Err(TensorError::Invalid {
        op,
        what: format!("eps = {eps} (must be finite and >= 0)"),
    })
}

/// The shape checks of the in-place LayerNorms: `weight` and `bias` of `cols` values, and a
/// whole number of rows of `cols` in `len` values.
fn check_assign(
    op: &'static str,
    len: usize,
    cols: usize,
    weight: &[f32],
    bias: &[f32],
) -> Result<()> {
    if weight.len() != cols || bias.len() != cols || (cols == 0 && len != 0) {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: vec![len, cols],
            rhs: vec![weight.len(), bias.len()],
        });
    }
    if cols != 0 && !len.is_multiple_of(cols) {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: vec![len],
            rhs: vec![cols],
        });
    }
    Ok(())
}

/// A LayerNorm's per-channel scale and shift (`[c]` each) and its epsilon.
struct Affine<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
}

/// One task's whole rows (`c = weight.len()` wide) of a forward LayerNorm, in its three forms.
enum ForwardRows<'a> {
    /// `y = LN(x)`, each row's mean and `1 / sqrt(var + eps)` kept ([`layer_norm`]).
    WithStats {
        x: &'a [f32],
        y: &'a mut [f32],
        mean: &'a mut [f32],
        rstd: &'a mut [f32],
    },
    /// `x = LN(x)` ([`layer_norm_assign`]).
    InPlace { x: &'a mut [f32] },
    /// `x = LN(x + delta)` ([`add_layer_norm_assign`]).
    AddInPlace { x: &'a mut [f32], delta: &'a [f32] },
}

/// The forward's rows, row by row: the statistics ([`row_stats`]), then each element
/// [`normalize`]d.
#[inline(always)]
fn forward_rows(rows: ForwardRows<'_>, affine: &Affine<'_>) {
    let Affine { weight, bias, eps } = *affine;
    let c = weight.len();
    match rows {
        ForwardRows::WithStats { x, y, mean, rstd } => {
            for (((yr, xr), mu_out), rs_out) in y
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(mean.iter_mut())
                .zip(rstd.iter_mut())
            {
                let (mu, rs) = row_stats(xr, eps);
                for ((yv, &xv), (&w, &b)) in yr.iter_mut().zip(xr).zip(weight.iter().zip(bias)) {
                    *yv = normalize(xv, mu, rs, w, b);
                }
                *mu_out = mu;
                *rs_out = rs;
            }
        }
        ForwardRows::InPlace { x } => {
            for row in x.chunks_exact_mut(c) {
                normalize_in_place(row, affine);
            }
        }
        ForwardRows::AddInPlace { x, delta } => {
            for (row, drow) in x.chunks_exact_mut(c).zip(delta.chunks_exact(c)) {
                for (v, &d) in row.iter_mut().zip(drow) {
                    *v += d;
                }
                normalize_in_place(row, affine);
            }
        }
    }
}

/// One row normalised in place ([`row_stats`], then [`normalize`]).
#[inline(always)]
fn normalize_in_place(row: &mut [f32], affine: &Affine<'_>) {
    let (mu, rs) = row_stats(row, affine.eps);
    for (v, (&w, &b)) in row.iter_mut().zip(affine.weight.iter().zip(affine.bias)) {
        *v = normalize(*v, mu, rs, w, b);
    }
}

/// [`forward_rows`] compiled for the widest vectors `path` (or the best lower path the CPU
/// has) allows: the same operations in the same order (Rust does not contract a multiply and
/// an add into an FMA, and [`lane_sum`]'s f64 lanes stay its lanes), so the same bits on
/// every path.
fn forward_rows_on(path: KernelPath, rows: ForwardRows<'_>, affine: &Affine<'_>) {
    match path.supported() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported` returns Avx512 only where the CPU has AVX-512 F/BW/VL and AVX2.
        KernelPath::Avx512 => unsafe { forward_rows_avx512(rows, affine) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported` returns Avx2Fma only where the CPU has AVX2, FMA and F16C.
        KernelPath::Avx2Fma => unsafe { forward_rows_avx2(rows, affine) },
        _ => forward_rows(rows, affine),
    }
}

/// [`forward_rows`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn forward_rows_avx2(rows: ForwardRows<'_>, affine: &Affine<'_>) {
    forward_rows(rows, affine)
}

/// [`forward_rows`] compiled for AVX-512 F (and AVX2).
///
/// # Safety
/// The CPU must support AVX-512 F and AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn forward_rows_avx512(rows: ForwardRows<'_>, affine: &Affine<'_>) {
    forward_rows(rows, affine)
}

/// A row's mean and `1 / sqrt(var + eps)` (biased variance), computed in f64.
#[inline(always)]
fn row_stats(xr: &[f32], eps: f32) -> (f32, f32) {
    let c = xr.len() as f64;
    let mu = lane_sum(xr, |v| v as f64) / c;
    let var = lane_sum(xr, |v| {
        let d = v as f64 - mu;
        d * d
    }) / c;
    let rs = 1.0 / (var + eps as f64).sqrt();
    (mu as f32, rs as f32)
}

/// One normalised, scaled and shifted element.
#[inline(always)]
fn normalize(x: f32, mu: f32, rs: f32, w: f32, b: f32) -> f32 {
    (x - mu) * rs * w + b
}

/// Lanes of the forward's row statistics ([`lane_sum`]).
const STAT_LANES: usize = 16;

/// `Σ f(v)` over `xs` in f64, as [`STAT_LANES`] interleaved partial sums (element `j` goes
/// to lane `j % STAT_LANES`) combined by [`fold_lanes`]: independent add chains, so the loop
/// is not bound by the latency of one. The order depends only on `xs.len()`, so the vector
/// width a path compiles it to (2 f64 lanes per register in the baseline build, 4 with AVX2, 8
/// with AVX-512: [`forward_rows_on`]) does not change the bits.
///
/// With four lanes in the baseline build (before 2026-12-06), 1024 x 1024 on the 2-core Xeon
/// (`examples/layernorm_forward.rs`, medians of 201 calls, three rounds in turns):
/// `add_layer_norm_assign` 0.54–0.73 → 0.42–0.43 ms on 2 threads, 1.20–1.29 → 0.85–1.06 on
/// one; `layer_norm_assign` 0.39–0.53 → 0.28 ms, `layer_norm` 0.50–0.69 → 0.42 on 2 threads.
/// 32 lanes spilled its accumulators and took twice as long as 16.
#[inline(always)]
pub(crate) fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut s = [0.0f64; STAT_LANES];
    let runs = xs.chunks_exact(STAT_LANES);
    let tail = runs.remainder();
    for run in runs {
        for (acc, &v) in s.iter_mut().zip(run) {
            *acc += f(v);
        }
    }
    for (acc, &v) in s.iter_mut().zip(tail) {
        *acc += f(v);
    }
    fold_lanes(s)
}

/// `L` lane sums (`L` a power of two) added as a balanced tree of neighbours:
/// `(s0 + s1) + (s2 + s3)` for four lanes, `((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))`
/// for eight, and so on. The one fixed combination order of every lane sum in this file.
#[inline(always)]
pub(crate) fn fold_lanes<const L: usize>(mut s: [f64; L]) -> f64 {
    const { assert!(L.is_power_of_two()) };
    let mut n = L;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            s[i] = s[2 * i] + s[2 * i + 1];
        }
    }
    s[0]
}

/// Lanes of the backward's two row sums (`Σ dxhat`, `Σ dxhat·xhat`): element `j` of a row
/// goes to lane `j % SUM_LANES`, so the adds form `SUM_LANES` independent chains that
/// vectorize (two 8-wide vectors per sum with AVX2) instead of one serial chain.
///
/// A lane sums its values in f32 within a block of [`SUM_BLOCK`] elements (so 16 values at
/// most), adds the block's partial into its f64 total, and the totals are combined by
/// [`fold_lanes`]. The order depends only on the row length: the same bits whatever the
/// thread count and the kernel path. With the AVX2 build of [`backward_rows`], one
/// `[1000, 1024]` backward took 0.23–0.25 ms (one round 0.44) against 0.82–0.85 ms with 8
/// f64 lanes per sum in one baseline build, on 2 Zen 3 threads, and 0.47–0.53 against
/// 1.61–1.88 ms on one (`examples/layernorm_backward.rs`, min of 3 × 101 calls, five rounds
/// in turns, 2026-12-04); the baseline build alone (`NIBBLE_KERNEL=portable`) took 0.49–0.52
/// ms on 2 threads. On the 16-core Xeon (16 threads, three rounds in turns, 13:43 UTC):
/// 0.158–0.165 against 0.287–0.324 ms (min of 303 calls); a LoRA training step's five
/// LayerNorm backwards 1.18 / 1.24 against 1.92 / 1.97 ms.
const SUM_LANES: usize = 16;

/// Elements per f32 block of the backward's row sums ([`SUM_LANES`]): each lane adds at most
/// 16 f32 values before its partial goes into its f64 total, so the rounding of the f32 sums
/// does not grow with the row length.
const SUM_BLOCK: usize = 16 * SUM_LANES;

/// One row of [`layer_norm_backward`]: adds `dy·xhat` to `dw` and `dy` to `db` elementwise,
/// and returns `(Σ dxhat, Σ dxhat·xhat)` over the row (`xhat = (x - mu)·rs`, `dxhat = dy·w`),
/// summed in the order of [`SUM_LANES`].
#[inline(always)]
fn row_sums_and_weight_grads(
    xr: &[f32],
    dyr: &[f32],
    weight: &[f32],
    mu: f32,
    rs: f32,
    dw: &mut [f32],
    db: &mut [f32],
) -> (f64, f64) {
    // xr, dyr, weight, dw, db: [c]
    let c = xr.len();
    let (dyr, weight) = (&dyr[..c], &weight[..c]);
    let (dw, db) = (&mut dw[..c], &mut db[..c]);
    let mut t_dxhat = [0.0f64; SUM_LANES];
    let mut t_dxhat_xhat = [0.0f64; SUM_LANES];
    for ((((x, dy), w), dw), db) in xr
        .chunks(SUM_BLOCK)
        .zip(dyr.chunks(SUM_BLOCK))
        .zip(weight.chunks(SUM_BLOCK))
        .zip(dw.chunks_mut(SUM_BLOCK))
        .zip(db.chunks_mut(SUM_BLOCK))
    {
        let (p_dxhat, p_dxhat_xhat) = block_sums_and_weight_grads(x, dy, w, mu, rs, dw, db);
        for l in 0..SUM_LANES {
            t_dxhat[l] += p_dxhat[l] as f64;
            t_dxhat_xhat[l] += p_dxhat_xhat[l] as f64;
        }
    }
    (fold_lanes(t_dxhat), fold_lanes(t_dxhat_xhat))
}

/// [`row_sums_and_weight_grads`] on one block of at most [`SUM_BLOCK`] elements: the f32
/// lane partials of the block (element `j` of the block in lane `j % SUM_LANES`).
#[inline(always)]
fn block_sums_and_weight_grads(
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    mu: f32,
    rs: f32,
    dw: &mut [f32],
    db: &mut [f32],
) -> ([f32; SUM_LANES], [f32; SUM_LANES]) {
    // x, dy, w, dw, db: [n], n <= SUM_BLOCK
    let n = x.len();
    let (dy, w) = (&dy[..n], &w[..n]);
    let (dw, db) = (&mut dw[..n], &mut db[..n]);
    let mut s_dxhat = [0.0f32; SUM_LANES];
    let mut s_dxhat_xhat = [0.0f32; SUM_LANES];
    let whole = n - n % SUM_LANES;
    for ((((x, dy), w), dw), db) in x[..whole]
        .chunks_exact(SUM_LANES)
        .zip(dy[..whole].chunks_exact(SUM_LANES))
        .zip(w[..whole].chunks_exact(SUM_LANES))
        .zip(dw[..whole].chunks_exact_mut(SUM_LANES))
        .zip(db[..whole].chunks_exact_mut(SUM_LANES))
    {
        for l in 0..SUM_LANES {
            let xhat = (x[l] - mu) * rs;
            let dxhat = dy[l] * w[l];
            dw[l] += dy[l] * xhat;
            db[l] += dy[l];
            s_dxhat[l] += dxhat;
            s_dxhat_xhat[l] += dxhat * xhat;
        }
    }
    for j in whole..n {
        let xhat = (x[j] - mu) * rs;
        let dxhat = dy[j] * w[j];
        dw[j] += dy[j] * xhat;
        db[j] += dy[j];
        s_dxhat[j - whole] += dxhat;
        s_dxhat_xhat[j - whole] += dxhat * xhat;
    }
    (s_dxhat, s_dxhat_xhat)
}

/// The inputs of one task of [`layer_norm_backward`]: whole rows of `x` and `dy` (rows of
/// `weight.len()`) with their saved `mean` and `rstd`.
struct BackwardRows<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    weight: &'a [f32],
    mean: &'a [f32],
    rstd: &'a [f32],
}

/// One task of [`layer_norm_backward`]: `rows` write their rows of `dx` and add their terms of
/// the parameter gradients to `dw` and `db` (`[c]`), row by row.
#[inline(always)]
fn backward_rows(
    rows: &BackwardRows<'_>,
    dw: &mut [f32],
    db: &mut [f32],
    dx: &mut [MaybeUninit<f32>],
) {
    let BackwardRows {
        x,
        dy,
        weight,
        mean,
        rstd,
    } = *rows;
    let c = weight.len();
    for ((((xr, dyr), dxr), &mu), &rs) in x
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
        .zip(mean)
        .zip(rstd)
    {
        // xhat = (x - mu) * rs ; dxhat = dy * w
        // dx = rs * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        let (sum_dxhat, sum_dxhat_xhat) =
            row_sums_and_weight_grads(xr, dyr, weight, mu, rs, dw, db);
        let mean_dxhat = (sum_dxhat / c as f64) as f32;
        let mean_dxhat_xhat = (sum_dxhat_xhat / c as f64) as f32;
        for ((d, (&xv, &dyv)), &wv) in dxr.iter_mut().zip(xr.iter().zip(dyr)).zip(weight) {
            let xhat = (xv - mu) * rs;
            let dxhat = dyv * wv;
            d.write(rs * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
        }
    }
}

/// [`backward_rows`] compiled for AVX2: the same operations in the same order (Rust does not
/// contract a multiply and an add into an FMA), so the same bits as the baseline build, with
/// 8-wide vectors instead of 4-wide ones.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_rows_avx2(
    rows: &BackwardRows<'_>,
    dw: &mut [f32],
    db: &mut [f32],
    dx: &mut [MaybeUninit<f32>],
) {
    backward_rows(rows, dw, db, dx)
}

/// Gradients of [`layer_norm`]: given `dy` `[m, c]`, the forward input `x`, `weight` and the
/// saved stats, returns `(dx, dweight, dbias)`.
///
/// The result is bit-identical whatever the rayon thread count and the kernel path
/// ([`crate::cpu::kernel_path`]).
pub fn layer_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    weight: &[f32],
    stats: &LayerNormStats,
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    layer_norm_backward_on(kernel_path(), dy, x, weight, stats)
}

/// [`layer_norm_backward`] on the kernel path `path` (or the best lower one the CPU has).
fn layer_norm_backward_on(
    path: KernelPath,
    dy: &Tensor,
    x: &Tensor,
    weight: &[f32],
    stats: &LayerNormStats,
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    let (m, c) = check("layer_norm_backward", x, weight, weight)?;
    if dy.shape() != x.shape() || stats.mean.len() != m || stats.rstd.len() != m {
        return Err(TensorError::ShapeMismatch {
            op: "layer_norm_backward",
            lhs: dy.shape().to_vec(),
            rhs: x.shape().to_vec(),
        });
    }
    if c == 0 || m == 0 {
        return Ok((Tensor::zeros(&[m, c]), vec![0.0; c], vec![0.0; c]));
    }
    let path = path.at_most_avx2();
    // dx is written once, element by element (no zeroing pass before).
    let mut dx_data: Vec<f32> = Vec::with_capacity(m * c);
    // Each task returns its partial (dweight, dbias); partials are summed in task order.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx_data.spare_capacity_mut()[..m * c]
        .par_chunks_mut(c * ROWS_PER_TASK)
        .enumerate()
        .map(|(task, dxb)| {
            let mut dw = vec![0.0f32; c];
            let mut db = vec![0.0f32; c];
            let rows = task * ROWS_PER_TASK..task * ROWS_PER_TASK + dxb.len() / c;
            let task = BackwardRows {
                x: &x.data()[rows.start * c..rows.end * c],
                dy: &dy.data()[rows.start * c..rows.end * c],
                weight,
                mean: &stats.mean[rows.clone()],
                rstd: &stats.rstd[rows],
            };
            match path {
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx2Fma => {
                    // SAFETY: `at_most_avx2` returns Avx2Fma only where the CPU has AVX2, FMA
                    // and F16C (`KernelPath::supported`).
                    unsafe { backward_rows_avx2(&task, &mut dw, &mut db, dxb) }
                }
                _ => backward_rows(&task, &mut dw, &mut db, dxb),
            }
            (dw, db)
        })
        .collect();
    // SAFETY: the capacity is m * c, and every element was written above: the tasks' chunks
    // cover 0..m * c in whole rows of c, and `backward_rows` writes all c elements of each of
    // a chunk's rows (its `x`, `dy`, `mean` and `rstd` hold the chunk's rows, so its zip stops
    // at none of them early; `weight` has c elements: checked above).
    unsafe { dx_data.set_len(m * c) };
    let dx = Tensor::from_vec(&[m, c], dx_data)?;
    let mut dweight = vec![0.0f32; c];
    let mut dbias = vec![0.0f32; c];
    for (dw, db) in &partials {
        dweight.iter_mut().zip(dw).for_each(|(a, b)| *a += b);
        dbias.iter_mut().zip(db).for_each(|(a, b)| *a += b);
    }
    Ok((dx, dweight, dbias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Straight from the formula, in f64.
    fn reference(x: &Tensor, w: &[f32], b: &[f32], eps: f64) -> Vec<f64> {
        let (m, c) = x.dims2("ref").unwrap();
        let mut out = vec![0.0; m * c];
        for i in 0..m {
            let r = &x.data()[i * c..(i + 1) * c];
            let mu = r.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = r.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
            for j in 0..c {
                out[i * c + j] =
                    (r[j] as f64 - mu) / (var + eps).sqrt() * w[j] as f64 + b[j] as f64;
            }
        }
        out
    }

    #[test]
    fn forward_matches_formula_on_awkward_shapes() {
        let mut rng = Rng::new(1);
        for &(m, c) in &[(1, 1), (1, 7), (3, 17), (33, 129), (65, 1023)] {
            let x = Tensor::randn(&[m, c], &mut rng).scale(3.0);
            let w: Vec<f32> = (0..c).map(|_| rng.uniform(0.5, 1.5)).collect();
            let b: Vec<f32> = (0..c).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let (y, _) = layer_norm(&x, &w, &b, 1e-5).unwrap();
            for (a, e) in y.data().iter().zip(reference(&x, &w, &b, 1e-5)) {
                assert!((*a as f64 - e).abs() < 1e-5, "m={m} c={c}: {a} vs {e}");
            }
        }
    }

    /// Every path's build of the forward's rows (the three forms) gives the baseline build's
    /// bits on awkward row lengths, outputs pre-filled with NaN; the tiers this CPU lacks are
    /// printed.
    #[test]
    fn forward_bits_do_not_depend_on_the_kernel_path() {
        let lacking = crate::cpu::missing_paths();
        if !lacking.is_empty() {
            println!("forward LayerNorm rows: this CPU lacks {lacking:?}; those paths not run");
        }
        let mut rng = Rng::new(7);
        for c in [1usize, 7, 15, 17, 31, 33, 63, 129, 1023] {
            let m = 3;
            let x: Vec<f32> = Tensor::randn(&[m, c], &mut rng).scale(3.0).into_vec();
            let delta: Vec<f32> = Tensor::randn(&[m, c], &mut rng).into_vec();
            let weight: Vec<f32> = (0..c).map(|_| rng.uniform(0.5, 1.5)).collect();
            let bias: Vec<f32> = (0..c).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let affine = Affine {
                weight: &weight,
                bias: &bias,
                eps: 1e-5,
            };
            let run = |path: KernelPath| {
                let (mut y, mut mean, mut rstd) =
                    (vec![f32::NAN; m * c], vec![f32::NAN; m], vec![f32::NAN; m]);
                let rows = ForwardRows::WithStats {
                    x: &x,
                    y: &mut y,
                    mean: &mut mean,
                    rstd: &mut rstd,
                };
                forward_rows_on(path, rows, &affine);
                let mut in_place = x.clone();
                forward_rows_on(path, ForwardRows::InPlace { x: &mut in_place }, &affine);
                let mut added = x.clone();
                let rows = ForwardRows::AddInPlace {
                    x: &mut added,
                    delta: &delta,
                };
                forward_rows_on(path, rows, &affine);
                [y, mean, rstd, in_place, added]
                    .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>())
            };
            let scalar = run(KernelPath::Scalar);
            for out in &scalar[..3] {
                assert!(
                    out.iter().all(|&b| !f32::from_bits(b).is_nan()),
                    "c={c}: an output (y, mean or rstd) left unwritten"
                );
            }
            assert_eq!(
                scalar[0], scalar[3],
                "c={c}: in place differs from layer_norm"
            );
            for path in crate::cpu::available_paths() {
                assert!(run(path) == scalar, "c={c}: {path:?} differs from scalar");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(2);
        let (m, c) = (3, 9);
        let x = Tensor::randn(&[m, c], &mut rng);
        let w: Vec<f32> = (0..c).map(|_| rng.uniform(0.5, 1.5)).collect();
        let b: Vec<f32> = (0..c).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let dy = Tensor::randn(&[m, c], &mut rng);
        let (_, st) = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let (dx, dw, db) = layer_norm_backward(&dy, &x, &w, &st).unwrap();
        // loss = sum(dy * y), evaluated in f64 via the reference.
        let loss = |x: &Tensor, w: &[f32], b: &[f32]| -> f64 {
            reference(x, w, b, 1e-5)
                .iter()
                .zip(dy.data())
                .map(|(y, g)| y * *g as f64)
                .sum()
        };
        let h = 1e-3f32;
        for i in 0..m * c {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp.data_mut()[i] += h;
            xm.data_mut()[i] -= h;
            let fd = (loss(&xp, &w, &b) - loss(&xm, &w, &b)) / (2.0 * h as f64);
            assert!(
                (fd - dx.data()[i] as f64).abs() < 2e-3,
                "dx[{i}] {fd} vs {}",
                dx.data()[i]
            );
        }
        for j in 0..c {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[j] += h;
            wm[j] -= h;
            let fd = (loss(&x, &wp, &b) - loss(&x, &wm, &b)) / (2.0 * h as f64);
            assert!((fd - dw[j] as f64).abs() < 2e-3);
            let (mut bp, mut bm) = (b.clone(), b.clone());
            bp[j] += h;
            bm[j] -= h;
            let fd = (loss(&x, &w, &bp) - loss(&x, &w, &bm)) / (2.0 * h as f64);
            assert!((fd - db[j] as f64).abs() < 2e-3);
        }
    }

    /// A backward problem: `x` with a row-dependent offset and scale (so `x - mean` matters),
    /// weights around 1, `dy`, and the forward's saved stats.
    fn backward_case(m: usize, c: usize, seed: u64) -> (Tensor, Tensor, Vec<f32>, LayerNormStats) {
        let mut rng = Rng::new(seed);
        let mut x = Tensor::randn(&[m, c], &mut rng);
        for row in x.data_mut().chunks_exact_mut(c) {
            let (offset, scale) = (rng.uniform(-4.0, 4.0), rng.uniform(0.2, 3.0));
            row.iter_mut().for_each(|v| *v = *v * scale + offset);
        }
        let w: Vec<f32> = (0..c).map(|_| rng.uniform(0.5, 1.5)).collect();
        let b: Vec<f32> = (0..c).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let dy = Tensor::randn(&[m, c], &mut rng).scale(2.0);
        let (_, stats) = layer_norm(&x, &w, &b, 1e-5).unwrap();
        (dy, x, w, stats)
    }

    /// The backward in f64 from the same f32 operands and saved stats, with the error bound of
    /// each element. `dx = rs·(dxhat - mean(dxhat) - xhat·mean(dxhat·xhat))`: each f32
    /// operation rounds by at most `u` (half an ulp), the lane sums of the two means by at most
    /// about 20 `u` of the mean of their absolute terms, so 32 `u` times the sum of the
    /// magnitudes involved bounds `dx`'s error. `dw` and `db` add `m` terms in f32 (each with
    /// a few roundings of its own): `(m + 8)·u` times the sum of absolute terms.
    #[allow(clippy::type_complexity)]
    fn backward_reference(
        dy: &Tensor,
        x: &Tensor,
        w: &[f32],
        stats: &LayerNormStats,
    ) -> (
        (Vec<f64>, Vec<f64>),
        (Vec<f64>, Vec<f64>),
        (Vec<f64>, Vec<f64>),
    ) {
        let (m, c) = x.dims2("ref").unwrap();
        let u = f32::EPSILON as f64 / 2.0;
        let (mut dx, mut dx_tol) = (vec![0.0; m * c], vec![0.0; m * c]);
        let (mut dw, mut dw_abs) = (vec![0.0; c], vec![0.0; c]);
        let (mut db, mut db_abs) = (vec![0.0; c], vec![0.0; c]);
        for i in 0..m {
            let (mu, rs) = (stats.mean[i] as f64, stats.rstd[i] as f64);
            let xhat: Vec<f64> = (0..c)
                .map(|j| (x.data()[i * c + j] as f64 - mu) * rs)
                .collect();
            let g: Vec<f64> = (0..c).map(|j| dy.data()[i * c + j] as f64).collect();
            let dxhat: Vec<f64> = (0..c).map(|j| g[j] * w[j] as f64).collect();
            let mean = |f: &dyn Fn(usize) -> f64| (0..c).map(f).sum::<f64>() / c as f64;
            let m1 = mean(&|j| dxhat[j]);
            let m2 = mean(&|j| dxhat[j] * xhat[j]);
            let a1 = mean(&|j| dxhat[j].abs());
            let a2 = mean(&|j| (dxhat[j] * xhat[j]).abs());
            for j in 0..c {
                dx[i * c + j] = rs * (dxhat[j] - m1 - xhat[j] * m2);
                dx_tol[i * c + j] = 32.0
                    * u
                    * rs
                    * (dxhat[j].abs() + a1 + m1.abs() + xhat[j].abs() * (m2.abs() + a2));
                dw[j] += g[j] * xhat[j];
                dw_abs[j] += (g[j] * xhat[j]).abs();
                db[j] += g[j];
                db_abs[j] += g[j].abs();
            }
        }
        let bound = |abs: Vec<f64>| abs.iter().map(|a| (m as f64 + 8.0) * u * a).collect();
        ((dx, dx_tol), (dw, bound(dw_abs)), (db, bound(db_abs)))
    }

    #[test]
    fn backward_matches_f64_reference_on_awkward_shapes() {
        let mut worst = 0.0f64;
        for &m in &[1, 7, 17, 33, 65] {
            for &c in &[1, 7, 17, 33, 129, 1023] {
                let (dy, x, w, stats) = backward_case(m, c, (m * 10_000 + c) as u64);
                let (dx, dw, db) = layer_norm_backward(&dy, &x, &w, &stats).unwrap();
                let (rdx, rdw, rdb) = backward_reference(&dy, &x, &w, &stats);
                for (name, got, (want, tol)) in [
                    ("dx", dx.data(), rdx),
                    ("dw", &dw[..], rdw),
                    ("db", &db[..], rdb),
                ] {
                    assert_eq!(got.len(), want.len());
                    for (k, (&g, (&e, &t))) in got.iter().zip(want.iter().zip(&tol)).enumerate() {
                        let err = (g as f64 - e).abs();
                        assert!(err <= t, "m={m} c={c} {name}[{k}]: {g} vs {e} (bound {t})");
                        if t > 0.0 {
                            worst = worst.max(err / t);
                        }
                    }
                }
            }
        }
        // The bounds are not slack by orders of magnitude: some element comes within a
        // factor of 50 of its bound.
        assert!(worst > 0.02, "worst error / bound {worst}");
    }

    /// The bits of `(dx, dweight, dbias)`.
    fn backward_bits(r: &(Tensor, Vec<f32>, Vec<f32>)) -> Vec<u32> {
        let (dx, dw, db) = r;
        dx.data()
            .iter()
            .chain(dw)
            .chain(db)
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn backward_bits_do_not_depend_on_the_thread_count() {
        // Several tasks of ROWS_PER_TASK rows (the last one short), rows of several sum
        // blocks with a tail, and a row narrower than one chunk of lanes.
        for &(m, c) in &[(200, 1023), (97, 300), (70, 5)] {
            let (dy, x, w, stats) = backward_case(m, c, 3);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                backward_bits(&pool.install(|| layer_norm_backward(&dy, &x, &w, &stats).unwrap()))
            };
            let one = run(1);
            for threads in [2, 3, 16] {
                assert!(
                    run(threads) == one,
                    "m={m} c={c}: {threads} threads differ from 1"
                );
            }
        }
    }

    #[test]
    fn backward_bits_do_not_depend_on_the_kernel_path() {
        for &(m, c) in &[(65, 1023), (40, 17)] {
            let (dy, x, w, stats) = backward_case(m, c, 4);
            let scalar = backward_bits(
                &layer_norm_backward_on(KernelPath::Scalar, &dy, &x, &w, &stats).unwrap(),
            );
            for path in crate::cpu::available_paths() {
                let bits =
                    backward_bits(&layer_norm_backward_on(path, &dy, &x, &w, &stats).unwrap());
                assert!(bits == scalar, "m={m} c={c}: {path:?} differs from scalar");
            }
        }
    }

    #[test]
    fn mismatched_affine_is_an_error() {
        let x = Tensor::zeros(&[2, 4]);
        assert!(matches!(
            layer_norm(&x, &[1.0; 3], &[0.0; 4], 1e-5),
            Err(TensorError::ShapeMismatch {
                op: "layer_norm",
                ..
            })
        ));
        assert!(layer_norm(&Tensor::zeros(&[4]), &[1.0; 4], &[0.0; 4], 1e-5).is_err());
    }

    /// A negative, NaN or infinite epsilon is an error naming the op and the value in all three
    /// forward forms (it gave rows of NaN with `Ok`); 0 stays allowed, as in PyTorch.
    #[test]
    fn bad_eps_is_an_error_zero_is_not() {
        let x = Tensor::from_vec(&[2, 2], vec![1.0, 3.0, -2.0, 5.0]).unwrap();
        let (w, b) = ([1.0f32, 0.5], [0.0f32, 1.0]);
        for eps in [-1e-5f32, -0.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let invalid = |r: Result<()>, op: &str| match r {
                Err(TensorError::Invalid { op: o, what }) => {
                    assert_eq!(o, op);
                    assert!(what.contains(&format!("{eps}")), "{what}");
                }
                other => panic!("{op} eps={eps}: {other:?}"),
            };
            invalid(layer_norm(&x, &w, &b, eps).map(drop), "layer_norm");
            let mut z = x.data().to_vec();
            invalid(
                layer_norm_assign(&mut z, 2, &w, &b, eps),
                "layer_norm_assign",
            );
            assert_eq!(z, x.data(), "eps={eps}: x changed by a failed call");
            invalid(
                add_layer_norm_assign(&mut z, &[0.0; 4], 2, &w, &b, eps),
                "add_layer_norm_assign",
            );
            assert_eq!(z, x.data(), "eps={eps}: x changed by a failed call");
        }
        let (y, _) = layer_norm(&x, &w, &b, 0.0).unwrap();
        assert!(y.data().iter().all(|v| v.is_finite()));
        let mut z = x.data().to_vec();
        layer_norm_assign(&mut z, 2, &w, &b, 0.0).unwrap();
        assert_eq!(z, y.data());
        let mut z = x.data().to_vec();
        add_layer_norm_assign(&mut z, &[0.0; 4], 2, &w, &b, 0.0).unwrap();
        assert_eq!(z, y.data());
    }
}
