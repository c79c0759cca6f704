//! Row-wise LayerNorm with the semantics of PyTorch's `group_norm(x, 1, weight, bias, eps)` on a
//! `[m, c]` input: each row is normalised over all its `c` channels with the biased variance,
//! then scaled and shifted per channel.

use crate::error::{Result, TensorError};
use crate::tensor::Tensor;
use rayon::prelude::*;

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

fn check(op: &'static str, x: &Tensor, weight: &[f32], bias: &[f32]) -> Result<(usize, usize)> {
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
    let mut y = Tensor::zeros(&[m, c]);
    let mut mean = vec![0.0f32; m];
    let mut rstd = vec![0.0f32; m];
    if c == 0 {
        return Ok((y, LayerNormStats { mean, rstd }));
    }
    y.data_mut()
        .par_chunks_mut(c * ROWS_PER_TASK)
        .zip(x.data().par_chunks(c * ROWS_PER_TASK))
        .zip(mean.par_chunks_mut(ROWS_PER_TASK))
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|(((yb, xb), mb), rb)| {
            for (((yr, xr), mu_out), rs_out) in yb
                .chunks_exact_mut(c)
                .zip(xb.chunks_exact(c))
                .zip(mb.iter_mut())
                .zip(rb.iter_mut())
            {
                let (mu, rs) = row_stats(xr, eps);
                for ((yv, &xv), (&w, &b)) in yr.iter_mut().zip(xr).zip(weight.iter().zip(bias)) {
                    *yv = normalize(xv, mu, rs, w, b);
                }
                *mu_out = mu;
                *rs_out = rs;
            }
        });
    Ok((y, LayerNormStats { mean, rstd }))
}

/// [`layer_norm`] in place, for inference: the rows of `x` (`cols` wide) become the
/// normalised rows, bit-identical to [`layer_norm`]'s output; no statistics are kept.
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
    if weight.len() != cols || bias.len() != cols || (cols == 0 && !x.is_empty()) {
        return Err(TensorError::ShapeMismatch {
            op: "layer_norm_assign",
            lhs: vec![x.len(), cols],
            rhs: vec![weight.len(), bias.len()],
        });
    }
    if cols == 0 {
        return Ok(());
    }
    if x.len().checked_rem(cols) != Some(0) {
        return Err(TensorError::ShapeMismatch {
            op: "layer_norm_assign",
            lhs: vec![x.len()],
            rhs: vec![cols],
        });
    }
    let normalize_rows = |block: &mut [f32]| {
        for row in block.chunks_exact_mut(cols) {
            let (mu, rs) = row_stats(row, eps);
            for (v, (&w, &b)) in row.iter_mut().zip(weight.iter().zip(bias)) {
                *v = normalize(*v, mu, rs, w, b);
            }
        }
    };
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

/// A row's mean and `1 / sqrt(var + eps)` (biased variance), computed in f64.
#[inline]
fn row_stats(xr: &[f32], eps: f32) -> (f32, f32) {
    let c = xr.len() as f64;
    let mu = sum4(xr, |v| v as f64) / c;
    let var = sum4(xr, |v| {
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

/// `Σ f(v)` over `xs` in f64, as four interleaved partial sums combined as
/// `(s0 + s1) + (s2 + s3)`: four independent add chains, so the loop is not bound by the
/// latency of one (LayerNorm's statistics were 1.4 % of a BigNet batch-1024 forward as a
/// single chain). The order depends only on `xs.len()`.
#[inline]
fn sum4(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut s = [0.0f64; 4];
    let quads = xs.chunks_exact(4);
    let tail = quads.remainder();
    for q in quads {
        for (acc, &v) in s.iter_mut().zip(q) {
            *acc += f(v);
        }
    }
    for (acc, &v) in s.iter_mut().zip(tail) {
        *acc += f(v);
    }
    (s[0] + s[1]) + (s[2] + s[3])
}

/// Independent f64 sums per row in [`row_sums_and_weight_grads`]: element `j` goes to lane
/// `j % SUM_LANES`, so the loop runs without one long chain of dependent adds. With this and
/// `dx` written once (no zeroing pass before), one `[1000, 1024]` backward took 0.31–0.33 ms
/// (min of 101) against 0.36–0.37 with one f64 chain per sum on the 16-core Xeon, 16 threads
/// (2026-12-04, three rounds in turns), and 0.82–0.83 against 0.86 on 2 Zen 3 threads.
const SUM_LANES: usize = 8;

/// One row of [`layer_norm_backward`]: adds `dy·xhat` to `dw` and `dy` to `db` elementwise,
/// and returns `(Σ dxhat, Σ dxhat·xhat)` over the row in f64 (`xhat = (x - mu)·rs`,
/// `dxhat = dy·w`), each summed in [`SUM_LANES`] lanes combined in a fixed order: the same
/// bits whatever the thread count.
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
    let mut s1 = [0.0f64; SUM_LANES];
    let mut s2 = [0.0f64; SUM_LANES];
    let c = xr.len();
    let (dyr, weight) = (&dyr[..c], &weight[..c]);
    let (dw, db) = (&mut dw[..c], &mut db[..c]);
    // Lane `l` of a chunk is element `j0 + l`; the tail's elements go to lanes 0, 1, ...
    let whole = c - c % SUM_LANES;
    for ((((x, dy), w), dwc), dbc) in xr[..whole]
        .chunks_exact(SUM_LANES)
        .zip(dyr[..whole].chunks_exact(SUM_LANES))
        .zip(weight[..whole].chunks_exact(SUM_LANES))
        .zip(dw[..whole].chunks_exact_mut(SUM_LANES))
        .zip(db[..whole].chunks_exact_mut(SUM_LANES))
    {
        let mut xhat = [0.0f32; SUM_LANES];
        let mut dxhat = [0.0f32; SUM_LANES];
        for l in 0..SUM_LANES {
            xhat[l] = (x[l] - mu) * rs;
            dxhat[l] = dy[l] * w[l];
            dwc[l] += dy[l] * xhat[l];
            dbc[l] += dy[l];
        }
        for l in 0..SUM_LANES {
            s1[l] += dxhat[l] as f64;
            s2[l] += (dxhat[l] * xhat[l]) as f64;
        }
    }
    for j in whole..c {
        let xhat = (xr[j] - mu) * rs;
        let dxhat = dyr[j] * weight[j];
        s1[j - whole] += dxhat as f64;
        s2[j - whole] += (dxhat * xhat) as f64;
        dw[j] += dyr[j] * xhat;
        db[j] += dyr[j];
    }
    let fold =
        |s: [f64; SUM_LANES]| ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    (fold(s1), fold(s2))
}

/// Gradients of [`layer_norm`]: given `dy` `[m, c]`, the forward input `x`, `weight` and the
/// saved stats, returns `(dx, dweight, dbias)`.
pub fn layer_norm_backward(
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
    // dx is written once, element by element (no zeroing pass before).
    let mut dx_data: Vec<f32> = Vec::with_capacity(m * c);
    // Each task returns its partial (dweight, dbias); partials are summed in task order.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx_data.spare_capacity_mut()[..m * c]
        .par_chunks_mut(c * ROWS_PER_TASK)
        .enumerate()
        .map(|(task, dxb)| {
            let mut dw = vec![0.0f32; c];
            let mut db = vec![0.0f32; c];
            let row0 = task * ROWS_PER_TASK;
            for (r, dxr) in dxb.chunks_exact_mut(c).enumerate() {
                let i = row0 + r;
                let xr = &x.data()[i * c..(i + 1) * c];
                let dyr = &dy.data()[i * c..(i + 1) * c];
                let (mu, rs) = (stats.mean[i], stats.rstd[i]);
                // xhat = (x - mu) * rs ; dxhat = dy * w
                // dx = rs * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
                let (sum_dxhat, sum_dxhat_xhat) =
                    row_sums_and_weight_grads(xr, dyr, weight, mu, rs, &mut dw, &mut db);
                let mean_dxhat = (sum_dxhat / c as f64) as f32;
                let mean_dxhat_xhat = (sum_dxhat_xhat / c as f64) as f32;
                for ((d, (&xv, &dyv)), &wv) in dxr.iter_mut().zip(xr.iter().zip(dyr)).zip(weight) {
                    let xhat = (xv - mu) * rs;
                    let dxhat = dyv * wv;
                    d.write(rs * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
                }
            }
            (dw, db)
        })
        .collect();
    // SAFETY: the capacity is m * c, and every element was written above: the tasks' chunks
    // cover 0..m * c in whole rows of c, and each row's last loop writes all c of its elements
    // (`weight`, `xr` and `dyr` have c elements: checked above).
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
}
