//! GroupNorm with the semantics of PyTorch's `nn.GroupNorm(groups, c)` on a `[m, c]` input:
//! each row's `c` channels fall into `groups` groups of `c / groups` neighbours, each group is
//! normalized over its own values (biased variance), then every channel gets its own affine
//! `weight`, `bias`. One group is [`crate::layer_norm`]; the normalization is that kernel run
//! on the `[m·groups, c/groups]` view of the same values, and the affine is per channel.

use crate::error::{Result, TensorError};
use crate::layernorm::{layer_norm, layer_norm_backward, LayerNormStats};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Rows per parallel task; also the unit of the fixed-order weight and bias gradient
/// reduction, so results are bit-identical whatever the thread count.
const ROWS_PER_TASK: usize = 32;

/// `x` `[m, c]`, `weight` and `bias` `[c]` and `groups` dividing `c`, or the error naming `op`,
/// the shapes and the group count; returns `(m, c, c / groups)`.
/// Returns `(m, c, c / groups, m · groups)`: the last, the statistics' length, checked for
/// overflow (an empty `x` `[m, 0]` takes any count of groups).
fn check(
    op: &'static str,
    x: &Tensor,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
) -> Result<(usize, usize, usize, usize)> {
    let (m, c) = crate::layernorm::check(op, x, weight, bias)?;
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(TensorError::Invalid {
            op,
            what: format!("{groups} groups of {c} channels (the groups must divide the channels)"),
        });
    }
    let stats_len = m.checked_mul(groups).ok_or(TensorError::Overflow {
        op,
        shape: vec![m, groups],
    })?;
    Ok((m, c, c / groups, stats_len))
}

/// The `[m·groups, c/groups]` view of `x` `[m, c]` (a copy of the same values).
fn grouped(x: &Tensor, m: usize, groups: usize, per_group: usize) -> Result<Tensor> {
    Tensor::from_vec(&[m * groups, per_group], x.data().to_vec())
}

/// `y[i, j] = (x[i, j] − μ) / √(σ² + eps) · weight[j] + bias[j]`, μ and σ² the mean and biased
/// variance of the group of row `i` that holds channel `j` (channels `k·c/groups ..
/// (k+1)·c/groups` form group `k`), for `x` of shape `[m, c]`; returns `y` and the statistics
/// of the `m·groups` groups, row-major (for [`group_norm_backward`]). PyTorch's
/// `F.group_norm(x, groups, weight, bias, eps)`; `nn.GroupNorm`'s default `eps` is 1e-5.
///
/// Errors: `x` not 2-D, `weight` or `bias` not `c` long, `groups` 0 or not dividing `c`, or
/// `eps` negative, NaN or infinite.
///
/// ```
/// use nibble_tensor::{group_norm, Tensor};
/// // Two groups of two channels: each pair normalized on its own.
/// let x = Tensor::from_vec(&[1, 4], vec![1.0, 3.0, 10.0, 30.0]).unwrap();
/// let (y, _) = group_norm(&x, 2, &[1.0, 1.0, 2.0, 2.0], &[0.0, 0.0, 0.0, 1.0], 0.0).unwrap();
/// let want = [-1.0, 1.0, -2.0, 3.0];
/// assert!(y.data().iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6));
/// ```
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) -> Result<(Tensor, LayerNormStats)> {
    let op = "group_norm";
    let (m, c, per_group, stats_len) = check(op, x, groups, weight, bias)?;
    crate::layernorm::check_eps(op, eps)?;
    if c == 0 || m == 0 {
        let zeros = || {
            crate::ops::try_zeros_vec(stats_len)
                .ok_or_else(|| crate::error::alloc_error::<f32>(op, &[m, groups], stats_len))
        };
        let empty = LayerNormStats {
            mean: zeros()?,
            rstd: zeros()?,
        };
        return Ok((Tensor::zeros(&[m, c]), empty));
    }
    // x̂ [m·groups, c/groups]: each group normalized, no affine.
    let (ones, zeros) = (vec![1.0f32; per_group], vec![0.0f32; per_group]);
    let (normalized, stats) = layer_norm(&grouped(x, m, groups, per_group)?, &ones, &zeros, eps)?;
    // y [m, c] = x̂ · weight[j] + bias[j]
    let mut y = normalized.reshape(&[m, c])?;
    y.data_mut().par_chunks_mut(c).for_each(|row| {
        for ((v, &w), &b) in row.iter_mut().zip(weight).zip(bias) {
            *v = *v * w + b;
        }
    });
    Ok((y, stats))
}

/// Gradients of [`group_norm`]: given `d_y` `[m, c]`, the forward input `x`, `groups`, `weight`
/// and the saved statistics, returns `(d_x, d_weight, d_bias)`: `d_bias[j] = Σ_i d_y[i, j]`,
/// `d_weight[j] = Σ_i d_y[i, j] · x̂[i, j]`, and `d_x` the LayerNorm backward of each group
/// ([`layer_norm_backward`] on the grouped view) of `d_y · weight`. The channel sums add blocks
/// of 32 rows in a fixed order, so the result is the same bits for any thread count.
///
/// Errors: shapes that do not match (`d_y` not `x`'s, `weight` not `c` long, statistics not
/// `m·groups` long) or `groups` not dividing `c`.
pub fn group_norm_backward(
    d_y: &Tensor,
    x: &Tensor,
    groups: usize,
    weight: &[f32],
    stats: &LayerNormStats,
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    let op = "group_norm_backward";
    let (m, c, per_group, stats_len) = check(op, x, groups, weight, weight)?;
    if d_y.shape() != x.shape() || stats.mean.len() != stats_len || stats.rstd.len() != stats_len {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: d_y.shape().to_vec(),
            rhs: vec![m, c, stats.mean.len(), stats.rstd.len()],
        });
    }
    if c == 0 || m == 0 {
        return Ok((Tensor::zeros(&[m, c]), vec![0.0; c], vec![0.0; c]));
    }
    // d_y, x, d_normalized: [m, c]; weight: [c]; mean, rstd: [m·groups]. One partial
    // (d_weight, d_bias) per block of rows, each [c].
    let mut d_normalized = Tensor::zeros(&[m, c]);
    let block = ROWS_PER_TASK * c;
    let group_block = ROWS_PER_TASK * groups;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = d_normalized
        .data_mut()
        .par_chunks_mut(block)
        .zip(x.data().par_chunks(block))
        .zip(d_y.data().par_chunks(block))
        .zip(stats.mean.par_chunks(group_block))
        .zip(stats.rstd.par_chunks(group_block))
        .map(|((((dnb, xb), dyb), meanb), rstdb)| {
            let (mut dw, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
            for (((dnr, xr), dyr), (means, rstds)) in dnb
                .chunks_mut(c)
                .zip(xb.chunks(c))
                .zip(dyb.chunks(c))
                .zip(meanb.chunks(groups).zip(rstdb.chunks(groups)))
            {
                for j in 0..c {
                    let k = j / per_group;
                    let normalized = (xr[j] - means[k]) * rstds[k];
                    dw[j] += dyr[j] * normalized;
                    db[j] += dyr[j];
                    dnr[j] = dyr[j] * weight[j];
                }
            }
            (dw, db)
        })
        .collect();
    let (mut d_weight, mut d_bias) = (vec![0.0f32; c], vec![0.0f32; c]);
    for (dw, db) in &partials {
        for (a, b) in d_weight.iter_mut().zip(dw) {
            *a += b;
        }
        for (a, b) in d_bias.iter_mut().zip(db) {
            *a += b;
        }
    }
    let ones = vec![1.0f32; per_group];
    let (d_x, _, _) = layer_norm_backward(
        &d_normalized.reshape(&[m * groups, per_group])?,
        &grouped(x, m, groups, per_group)?,
        &ones,
        stats,
    )?;
    Ok((d_x.reshape(&[m, c])?, d_weight, d_bias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{assert_close_to_f64 as close, bits, on_threads};
    use crate::Rng;

    /// The forward and backward in f64: `(y, d_x, d_weight, d_bias)`.
    fn reference(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        b: &[f32],
        c: usize,
        groups: usize,
        eps: f64,
    ) -> [Vec<f64>; 4] {
        let m = x.len().checked_div(c).unwrap_or(0);
        let g = c / groups;
        let mut y = vec![0.0; m * c];
        let mut dx = vec![0.0; m * c];
        let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
        for i in 0..m {
            for k in 0..groups {
                let idx: Vec<usize> = (i * c + k * g..i * c + (k + 1) * g).collect();
                let xs: Vec<f64> = idx.iter().map(|&t| x[t] as f64).collect();
                let mean = xs.iter().sum::<f64>() / g as f64;
                let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / g as f64;
                let r = 1.0 / (var + eps).sqrt();
                let xh: Vec<f64> = xs.iter().map(|v| (v - mean) * r).collect();
                let gs: Vec<f64> = idx
                    .iter()
                    .map(|&t| dy[t] as f64 * w[t % c] as f64)
                    .collect();
                let mg = gs.iter().sum::<f64>() / g as f64;
                let mgx = gs.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / g as f64;
                for (q, &t) in idx.iter().enumerate() {
                    let j = t % c;
                    y[t] = xh[q] * w[j] as f64 + b[j] as f64;
                    dx[t] = r * (gs[q] - mg - xh[q] * mgx);
                    dw[j] += dy[t] as f64 * xh[q];
                    db[j] += dy[t] as f64;
                }
            }
        }
        [y, dx, dw, db]
    }

    #[test]
    fn matches_the_f64_reference_on_awkward_widths() {
        let mut rng = Rng::new(7);
        // Group widths 1, 7, 15, ... in 1 to 3 groups, and one group (LayerNorm).
        for &per_group in &[0usize, 1, 7, 15, 17, 31, 33, 63, 129, 1023] {
            for groups in [1usize, 2, 3] {
                let c = per_group * groups;
                for &m in &[0usize, 1, 5, 33, 70] {
                    let x = Tensor::randn(&[m, c], &mut rng);
                    let dy = Tensor::randn(&[m, c], &mut rng);
                    let w = Tensor::uniform(&[c], -2.0, 2.0, &mut rng);
                    let b = Tensor::uniform(&[c], -1.0, 1.0, &mut rng);
                    let eps = 1e-5;
                    let (y, stats) = group_norm(&x, groups, w.data(), b.data(), eps).unwrap();
                    let (dx, dw, db) =
                        group_norm_backward(&dy, &x, groups, w.data(), &stats).unwrap();
                    let want = reference(
                        x.data(),
                        dy.data(),
                        w.data(),
                        b.data(),
                        c,
                        groups,
                        eps as f64,
                    );
                    let what = format!("{m}x{c} in {groups} groups");
                    close(y.data(), &want[0], 1e-5, &format!("y {what}"));
                    close(dx.data(), &want[1], 1e-4, &format!("dx {what}"));
                    close(
                        &dw,
                        &want[2],
                        1e-5 * (m as f64 + 1.0),
                        &format!("dw {what}"),
                    );
                    close(
                        &db,
                        &want[3],
                        1e-5 * (m as f64 + 1.0),
                        &format!("db {what}"),
                    );
                }
            }
        }
    }

    #[test]
    fn one_group_is_a_layer_norm() {
        let mut rng = Rng::new(8);
        let x = Tensor::randn(&[9, 33], &mut rng);
        let w = Tensor::uniform(&[33], -2.0, 2.0, &mut rng);
        let b = Tensor::uniform(&[33], -1.0, 1.0, &mut rng);
        let (g, _) = group_norm(&x, 1, w.data(), b.data(), 1e-5).unwrap();
        let (l, _) = layer_norm(&x, w.data(), b.data(), 1e-5).unwrap();
        close(
            g.data(),
            &l.data().iter().map(|&v| v as f64).collect::<Vec<_>>(),
            1e-6,
            "one group",
        );
    }

    #[test]
    fn bit_identical_across_thread_counts() {
        let mut rng = Rng::new(9);
        let (m, c, groups) = (257, 129, 3);
        let x = Tensor::randn(&[m, c], &mut rng);
        let dy = Tensor::randn(&[m, c], &mut rng);
        let w = Tensor::uniform(&[c], -1.0, 1.0, &mut rng);
        let b = Tensor::uniform(&[c], -1.0, 1.0, &mut rng);
        let run = |threads: usize| {
            on_threads(threads, || {
                let (y, stats) = group_norm(&x, groups, w.data(), b.data(), 1e-5).unwrap();
                let (dx, dw, db) = group_norm_backward(&dy, &x, groups, w.data(), &stats).unwrap();
                (bits(y.data()), bits(dx.data()), bits(&dw), bits(&db))
            })
        };
        let one = run(1);
        for t in [2, 3, 16] {
            assert_eq!(run(t), one, "{t} threads");
        }
    }

    #[test]
    fn bad_input_is_an_error_naming_it() {
        let x = Tensor::zeros(&[2, 6]);
        let e = group_norm(&x, 4, &[1.0; 6], &[0.0; 6], 1e-5)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("group_norm") && e.contains("4 groups of 6"),
            "{e}"
        );
        let e = group_norm(&x, 0, &[1.0; 6], &[0.0; 6], 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 groups"), "{e}");
        let e = group_norm(&x, 2, &[1.0; 5], &[0.0; 6], 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("group_norm") && e.contains("[2, 6]"), "{e}");
        let e = group_norm(&x, 2, &[1.0; 6], &[0.0; 6], -1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("eps"), "{e}");
        let (_, stats) = group_norm(&x, 2, &[1.0; 6], &[0.0; 6], 1e-5).unwrap();
        let e = group_norm_backward(&Tensor::zeros(&[2, 5]), &x, 2, &[1.0; 6], &stats)
            .unwrap_err()
            .to_string();
        assert!(e.contains("group_norm_backward"), "{e}");
        let e = group_norm_backward(&Tensor::zeros(&[2, 6]), &x, 3, &[1.0; 6], &stats)
            .unwrap_err()
            .to_string();
        assert!(e.contains("group_norm_backward"), "{e}");
    }
}
