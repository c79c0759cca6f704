//! `bignet compare A B`: how far two variants' outputs are apart.

use super::{normal_batch, Common};
use crate::error::{Error, Result};
use crate::variant::Variant;
use nibble_tensor::Tensor;
use serde_json::json;

/// Prints max and mean |A(x) - B(x)| on a 1024 x D standard-normal batch.
pub fn run(a: Variant, b: Variant, as_json: bool, common: &Common) -> Result<()> {
    let (max, mean) = compare(a, b, common)?;
    if as_json {
        println!(
            "{}",
            json!({"a": a.name(), "b": b.name(), "max_diff": max, "mean_diff": mean})
        );
    } else {
        println!("{a} vs {b}: max |diff| {max:.6}, mean |diff| {mean:.6}");
    }
    Ok(())
}

/// `(max, mean)` of |A(x) - B(x)|; the models are built one after the other, so only one is
/// held at a time.
pub fn compare(a: Variant, b: Variant, common: &Common) -> Result<(f32, f32)> {
    let ya = {
        let model = common.spec(a).build()?;
        let x = normal_batch(1024, model.dim(), common.seed);
        check_output_finite(a, model.infer(&x)?)?
    };
    let model = common.spec(b).build()?;
    let x = normal_batch(1024, model.dim(), common.seed);
    let yb = check_output_finite(b, model.infer(&x)?)?;
    Ok(ya.abs_diff_stats(&yb)?)
}

/// `y`, the output of `variant` on the standard-normal batch, or an error naming its first NaN
/// or infinite element: finite weights (a checkpoint's near 1e36, say) can still overflow f32,
/// and the figures taken from such an output are NaN, which `--json` would print as `null`.
pub(crate) fn check_output_finite(variant: Variant, y: Tensor) -> Result<Tensor> {
    match y.first_non_finite() {
        None => Ok(y),
        Some((at, value)) => Err(Error::Model {
            what: format!(
                "{variant}'s output on the {} x {} standard-normal batch is {value} at {at}: \
                 the weights overflow f32, so the differences are not numbers",
                y.shape()[0],
                y.shape().get(1).copied().unwrap_or(1)
            ),
        }),
    }
}
