//! Row-wise RMSNorm with the semantics of PyTorch's `nn.RMSNorm(c)` on a `[m, c]` input: each
//! row is divided by its root mean square, `sqrt(mean(x²) + eps)`, then scaled per channel.
//! (No mean is subtracted, no bias added: that is [`crate::layer_norm`].)

use crate::error::{Result, TensorError};
use crate::layernorm::{fold_lanes, lane_sum};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Rows per parallel task; also the unit of the fixed-order weight-gradient reduction, so
/// results are bit-identical whatever the thread count.
const ROWS_PER_TASK: usize = 32;

/// `x` `[m, c]` and `weight` `[c]`, or the error naming `op` and both shapes.
fn check(op: &'static str, x: &Tensor, weight: &[f32]) -> Result<(usize, usize)> {
    let (m, c) = x.dims2(op)?;
    if weight.len() != c {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: x.shape().to_vec(),
            rhs: vec![weight.len()],
        });
    }
    Ok((m, c))
}

/// `1 / sqrt(mean(x²) + eps)` of one row, computed in f64 (rounded once to f32).
#[inline(always)]
fn row_rrms(xr: &[f32], eps: f32) -> f32 {
    let ms = lane_sum(xr, |v| (v as f64) * (v as f64)) / xr.len() as f64;
    (1.0 / (ms + eps as f64).sqrt()) as f32
}

/// `y[i, j] = x[i, j] · r_i · weight[j]` with `r_i = 1 / sqrt(mean_j(x[i, j]²) + eps)`, for `x`
/// of shape `[m, c]`; returns `y` and `r` `[m]` (for [`rms_norm_backward`]). PyTorch's
/// `nn.RMSNorm(c, eps=None)` takes `eps` = [`f32::EPSILON`] on f32 inputs.
///
/// Errors: `x` not 2-D, `weight` not `c` long, or `eps` negative, NaN or infinite (`eps = 0`
/// is allowed, as in PyTorch: an all-zero row is then NaN, as there).
///
/// ```
/// use nibble_tensor::{rms_norm, Tensor};
/// let x = Tensor::from_vec(&[1, 2], vec![3.0, -4.0]).unwrap(); // rms √12.5
/// let (y, r) = rms_norm(&x, &[1.0, 2.0], 0.0).unwrap();
/// let s = 12.5f32.sqrt();
/// assert!((y.data()[0] - 3.0 / s).abs() < 1e-6 && (y.data()[1] + 8.0 / s).abs() < 1e-6);
/// assert!((r[0] - 1.0 / s).abs() < 1e-7);
/// ```
pub fn rms_norm(x: &Tensor, weight: &[f32], eps: f32) -> Result<(Tensor, Vec<f32>)> {
    let (m, c) = check("rms_norm", x, weight)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(TensorError::Invalid {
            op: "rms_norm",
            what: format!("eps = {eps} (must be finite and >= 0)"),
        });
    }
    let mut y = Tensor::zeros(&[m, c]);
    let mut rrms = vec![0.0f32; m];
    if c == 0 {
        return Ok((y, rrms));
    }
    // x, y: [m, c]; weight: [c]; rrms: [m]
    y.data_mut()
        .par_chunks_mut(ROWS_PER_TASK * c)
        .zip(x.data().par_chunks(ROWS_PER_TASK * c))
        .zip(rrms.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|((yb, xb), rb)| {
            for ((yr, xr), r) in yb.chunks_mut(c).zip(xb.chunks(c)).zip(rb) {
                *r = row_rrms(xr, eps);
                for ((yv, &xv), &w) in yr.iter_mut().zip(xr).zip(weight) {
                    *yv = xv * *r * w;
                }
            }
        });
    Ok((y, rrms))
}

/// Backward of [`rms_norm`]: given `d_y` `[m, c]`, the forward's input `x`, `weight` and the
/// `rrms` it returned, returns `(d_x [m, c], d_weight [c])`:
/// `d_x[i, j] = r_i · g[i, j] − x[i, j] · r_i³ · mean_j(g[i, j] · x[i, j])` with
/// `g = d_y · weight`, and `d_weight[j] = Σ_i d_y[i, j] · x[i, j] · r_i`. The row sums are taken
/// in f64; `d_weight` sums blocks of 32 rows in a fixed order, so the result is
/// the same bits for any thread count.
///
/// Errors: shapes that do not match (`d_y` not `x`'s, `weight` not `c` long, `rrms` not `m`
/// long).
pub fn rms_norm_backward(
    d_y: &Tensor,
    x: &Tensor,
    weight: &[f32],
    rrms: &[f32],
) -> Result<(Tensor, Vec<f32>)> {
    let (m, c) = check("rms_norm_backward", x, weight)?;
    if d_y.shape() != x.shape() || rrms.len() != m {
        return Err(TensorError::ShapeMismatch {
            op: "rms_norm_backward",
            lhs: d_y.shape().to_vec(),
            rhs: vec![m, c, rrms.len()],
        });
    }
    let mut d_x = Tensor::zeros(&[m, c]);
    if c == 0 || m == 0 {
        return Ok((d_x, vec![0.0; c]));
    }
    // d_y, x, d_x: [m, c]; weight: [c]; rrms: [m]; one partial d_weight [c] per block of rows.
    let partials: Vec<Vec<f32>> = d_x
        .data_mut()
        .par_chunks_mut(ROWS_PER_TASK * c)
        .zip(x.data().par_chunks(ROWS_PER_TASK * c))
        .zip(d_y.data().par_chunks(ROWS_PER_TASK * c))
        .zip(rrms.par_chunks(ROWS_PER_TASK))
        .map(|(((dxb, xb), dyb), rb)| {
            let mut dw = vec![0.0f32; c];
            for (((dxr, xr), dyr), &r) in dxb
                .chunks_mut(c)
                .zip(xb.chunks(c))
                .zip(dyb.chunks(c))
                .zip(rb)
            {
                let gx = lane_sum_pairs(dyr, xr, weight);
                let k = (r as f64).powi(3) * gx / c as f64;
                for j in 0..c {
                    let g = dyr[j] * weight[j];
                    dxr[j] = (r as f64 * g as f64 - xr[j] as f64 * k) as f32;
                    dw[j] += dyr[j] * xr[j] * r;
                }
            }
            dw
        })
        .collect();
    let mut d_weight = vec![0.0f32; c];
    for p in &partials {
        for (a, b) in d_weight.iter_mut().zip(p) {
            *a += b;
        }
    }
    Ok((d_x, d_weight))
}

/// `Σ_j d_y[j] · weight[j] · x[j]` over a row in f64, in 16 interleaved lanes combined by
/// [`fold_lanes`] (the order depends only on the row length, as [`lane_sum`]'s).
#[inline(always)]
fn lane_sum_pairs(dyr: &[f32], xr: &[f32], weight: &[f32]) -> f64 {
    let mut s = [0.0f64; 16];
    for (j, ((&dy, &x), &w)) in dyr.iter().zip(xr).zip(weight).enumerate() {
        s[j % 16] += (dy * w) as f64 * x as f64;
    }
    fold_lanes(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_close_to_f64 as close, bits, on_threads};
    use crate::Rng;

    /// The forward and backward in f64, for one row set.
    fn reference(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        c: usize,
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let m = x.len().checked_div(c).unwrap_or(0);
        let (mut y, mut dx, mut dw) = (vec![0.0; m * c], vec![0.0; m * c], vec![0.0; c]);
        for i in 0..m {
            let xr: Vec<f64> = x[i * c..(i + 1) * c].iter().map(|&v| v as f64).collect();
            let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps).sqrt();
            let g: Vec<f64> = (0..c).map(|j| dy[i * c + j] as f64 * w[j] as f64).collect();
            let gx: f64 = (0..c).map(|j| g[j] * xr[j]).sum();
            for j in 0..c {
                y[i * c + j] = xr[j] * r * w[j] as f64;
                dx[i * c + j] = r * g[j] - xr[j] * r.powi(3) * gx / c as f64;
                dw[j] += dy[i * c + j] as f64 * xr[j] * r;
            }
        }
        (y, dx, dw)
    }

    #[test]
    fn matches_the_f64_reference_on_awkward_widths() {
        let mut rng = Rng::new(3);
        for &c in &[0usize, 1, 7, 15, 17, 31, 33, 63, 129, 1023] {
            for &m in &[1usize, 5, 33, 70] {
                let x = Tensor::randn(&[m, c], &mut rng);
                let dy = Tensor::randn(&[m, c], &mut rng);
                let w = Tensor::uniform(&[c], -2.0, 2.0, &mut rng);
                let eps = f32::EPSILON;
                let (y, r) = rms_norm(&x, w.data(), eps).unwrap();
                let (dx, dw) = rms_norm_backward(&dy, &x, w.data(), &r).unwrap();
                let (wy, wdx, wdw) = reference(x.data(), dy.data(), w.data(), c, eps as f64);
                close(y.data(), &wy, 1e-6, &format!("y {m}x{c}"));
                close(dx.data(), &wdx, 1e-5, &format!("dx {m}x{c}"));
                close(&dw, &wdw, 1e-5 * m as f64, &format!("dw {m}x{c}"));
            }
        }
    }

    #[test]
    fn bit_identical_across_thread_counts() {
        let mut rng = Rng::new(5);
        let (m, c) = (257, 129);
        let x = Tensor::randn(&[m, c], &mut rng);
        let dy = Tensor::randn(&[m, c], &mut rng);
        let w = Tensor::uniform(&[c], -1.0, 1.0, &mut rng);
        let run = |threads: usize| {
            on_threads(threads, || {
                let (y, r) = rms_norm(&x, w.data(), 1e-6).unwrap();
                let (dx, dw) = rms_norm_backward(&dy, &x, w.data(), &r).unwrap();
                (bits(y.data()), bits(&r), bits(dx.data()), bits(&dw))
            })
        };
        let one = run(1);
        for t in [2, 3, 16] {
            assert_eq!(run(t), one, "{t} threads");
        }
    }

    #[test]
    fn bad_input_is_an_error_naming_it() {
        let x = Tensor::zeros(&[2, 3]);
        let e = rms_norm(&x, &[1.0; 2], 1e-6).unwrap_err().to_string();
        assert!(e.contains("rms_norm") && e.contains("[2, 3]"), "{e}");
        for eps in [-1.0, f32::NAN, f32::INFINITY] {
            let e = rms_norm(&x, &[1.0; 3], eps).unwrap_err().to_string();
            assert!(e.contains("eps"), "{e}");
        }
        let e = rms_norm(&Tensor::zeros(&[6]), &[1.0; 6], 1e-6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rms_norm"), "{e}");
        let e = rms_norm_backward(&Tensor::zeros(&[2, 2]), &x, &[1.0; 3], &[1.0; 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rms_norm_backward"), "{e}");
        // eps 0 on an all-zero row: NaN, as PyTorch gives.
        let (y, _) = rms_norm(&x, &[1.0; 3], 0.0).unwrap();
        assert!(y.data().iter().all(|v| v.is_nan()));
    }
}
