//! `bignet compare A B`: how far two variants' outputs are apart.

use super::{normal_batch, Common};
use crate::error::Result;
use crate::variant::Variant;
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
        model.infer(&x)?
    };
    let model = common.spec(b).build()?;
    let x = normal_batch(1024, model.dim(), common.seed);
    let yb = model.infer(&x)?;
    Ok(ya.abs_diff_stats(&yb)?)
}
