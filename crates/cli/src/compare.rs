//! How far one set of numbers is from another: max and mean |Δ|, cosine similarity, and the
//! classifier figures (accuracy, mean softmax cross-entropy) that `eval` and `finetune` print.

/// Max and mean |a - b| over equally long slices (0 and 0 for empty ones). A NaN or infinite
/// value on either side makes both non-finite (NaN or inf), never a finite figure that hides it.
pub fn abs_diff(a: &[f32], b: &[f32]) -> (f64, f64) {
    let mut max = 0.0f64;
    let mut sum = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let d = (f64::from(*x) - f64::from(*y)).abs();
        // `f64::max` would drop a NaN; keep it.
        max = if max.is_nan() || d.is_nan() {
            f64::NAN
        } else {
            max.max(d)
        };
        sum += d;
    }
    let mean = if a.is_empty() {
        0.0
    } else {
        sum / a.len() as f64
    };
    (max, mean)
}

/// Cosine similarity of two vectors, accumulated in f64. Two all-zero vectors are identical
/// (1); one zero vector against a nonzero one shares no direction (0).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    match (na == 0.0, nb == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => dot / (na.sqrt() * nb.sqrt()),
    }
}

/// Mean over rows of the cosine similarity of matching rows of two `[rows, cols]` matrices
/// (1 when there are no rows); with one column (a binary classifier's logit), where a row's
/// cosine would be its sign, the cosine of the two columns.
pub fn mean_row_cosine(a: &[f32], b: &[f32], cols: usize) -> f64 {
    if cols == 0 || a.is_empty() {
        return 1.0;
    }
    if cols == 1 {
        return cosine(a, b);
    }
    let rows = a.len() / cols;
    let total: f64 = a
        .chunks_exact(cols)
        .zip(b.chunks_exact(cols))
        .map(|(x, y)| cosine(x, y))
        .sum();
    total / rows as f64
}

/// The class a row of logits predicts: the arg-max ([`argmax`]), or for a binary classifier's
/// one logit (`BCEWithLogitsLoss`), 1 where it is above 0 (`sigmoid(z) > 0.5`), else 0.
pub fn predicted(row: &[f32]) -> usize {
    match row {
        [z] => usize::from(*z > 0.0),
        _ => argmax(row),
    }
}

/// Fraction of rows of `logits` `[rows, classes]` whose predicted class ([`predicted`]) is the
/// label (0 when there are no rows).
pub fn accuracy(logits: &[f32], classes: usize, labels: &[usize]) -> f64 {
    if classes == 0 || labels.is_empty() {
        return 0.0;
    }
    let hits = logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, &label)| predicted(row) == label)
        .count();
    hits as f64 / labels.len() as f64
}

/// Index of the largest element (the first of equal ones; NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Mean softmax cross-entropy of `logits` `[rows, classes]` against `labels`, in f64 with the
/// max subtracted (0 when there are no rows); with one logit per row (a binary classifier), the
/// mean binary cross-entropy of `sigmoid(z)` against labels 0 and 1, PyTorch's
/// `binary_cross_entropy_with_logits`, in the stable form `max(z, 0) − z·y + ln(1 + e^{−|z|})`.
pub fn mean_cross_entropy(logits: &[f32], classes: usize, labels: &[usize]) -> f64 {
    if classes == 0 || labels.is_empty() {
        return 0.0;
    }
    let total: f64 = logits
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &label)| {
            if let [z] = row {
                let (z, y) = (f64::from(*z), label as f64);
                return z.max(0.0) - z * y + (-z.abs()).exp().ln_1p();
            }
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, v| m.max(f64::from(*v)));
            let sum: f64 = row.iter().map(|v| (f64::from(*v) - max).exp()).sum();
            max + sum.ln() - f64::from(row[label])
        })
        .sum();
    total / labels.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_and_cosine_of_known_vectors() {
        let (max, mean) = abs_diff(&[1.0, -2.0, 3.0], &[1.5, -2.0, 1.0]);
        assert_eq!((max, mean), (2.0, 2.5 / 3.0));
        assert!((cosine(&[1.0, 0.0], &[0.0, 1.0])).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!((cosine(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 0.0]), 1.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        let rows = mean_row_cosine(&[1.0, 0.0, 1.0, 1.0], &[1.0, 0.0, -1.0, -1.0], 2);
        assert!(rows.abs() < 1e-12, "{rows}");
    }

    #[test]
    fn abs_diff_never_hides_a_non_finite_value() {
        // A NaN first, in the middle or last: f64::max alone would drop it.
        for a in [
            [f32::NAN, 1.0, 2.0],
            [0.0, f32::NAN, 2.0],
            [0.0, 1.0, f32::NAN],
        ] {
            let (max, mean) = abs_diff(&a, &[0.0, 1.0, 5.0]);
            assert!(max.is_nan() && mean.is_nan(), "{a:?}: {max} {mean}");
        }
        let (max, mean) = abs_diff(&[f32::INFINITY, 1.0], &[3.0e38, 1.0]);
        assert!(max.is_infinite() && mean.is_infinite(), "{max} {mean}");
    }

    #[test]
    fn binary_classifiers_predict_by_sign_and_score_binary_cross_entropy() {
        // Logits 2, -1, 0 against labels 1, 1, 0: z > 0 predicts 1 (0 predicts 0).
        let (z, y) = ([2.0f32, -1.0, 0.0], [1usize, 1, 0]);
        assert!((accuracy(&z, 1, &y) - 2.0 / 3.0).abs() < 1e-12);
        let want = ((1.0 + (-2.0f64).exp()).ln() + (1.0 + 1.0f64.exp()).ln() + 2.0f64.ln()) / 3.0;
        assert!((mean_cross_entropy(&z, 1, &y) - want).abs() < 1e-12);
        // Far out, no overflow: ln(1 + e^-1000) is 0, and the wrong side costs |z|.
        assert_eq!(mean_cross_entropy(&[1000.0], 1, &[1]), 0.0);
        assert_eq!(mean_cross_entropy(&[1000.0], 1, &[0]), 1000.0);
        assert!((mean_row_cosine(&[1.0, 2.0], &[2.0, 4.0], 1) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn accuracy_and_cross_entropy_of_known_logits() {
        let logits = [2.0, 1.0, 0.0, 0.0, 0.0, 3.0];
        assert_eq!(accuracy(&logits, 3, &[0, 1]), 0.5);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.0]), 1);
        // Uniform logits: ln(classes).
        let ce = mean_cross_entropy(&[0.0; 4], 4, &[2]);
        assert!((ce - 4f64.ln()).abs() < 1e-12);
        let ce = mean_cross_entropy(&[0.0, 1000.0], 2, &[0]);
        assert!((ce - 1000.0).abs() < 1e-9, "{ce}");
    }
}
