//! `bignet stats`: the homework's table, with measured memory.

use super::{mb, normal_batch, Common};
use crate::error::Result;
use crate::infer::{measure_forward_bytes, LOW_MEMORY_CHUNK_ROWS};
use crate::memory;
use crate::train::{measure_train_step_bytes, TrainOptions};
use crate::variant::Variant;
use nibble_autograd::Tape;

/// Rows of the grader's training batch.
const TRAIN_BATCH: usize = 1000;
use serde_json::json;

/// One column of the table.
struct Column {
    variant: Variant,
    trainable: usize,
    non_trainable: usize,
    theoretical: usize,
    actual: usize,
    forward: usize,
    /// The same in chunks of [`LOW_MEMORY_CHUNK_ROWS`] rows.
    forward_chunked: usize,
    backward: usize,
    /// Peak bytes of the grader's training step, plain and checkpointed (variants that train).
    train_step: Option<(usize, usize)>,
}

fn measure(variant: Variant, common: &Common) -> Result<Column> {
    let (model, actual) = {
        let before = memory::current();
        let model = common.spec(variant).build()?;
        let after = memory::current();
        (model, after.saturating_sub(before))
    };
    let counts = model.counts();
    let x = normal_batch(1024, model.dim(), common.seed);
    let forward = measure_forward_bytes(&model, &x, usize::MAX)?;
    let forward_chunked = measure_forward_bytes(&model, &x, LOW_MEMORY_CHUNK_ROWS)?;
    let (r, backward) = memory::measure_peak(|| -> Result<()> {
        let tape = Tape::new();
        let input = tape.leaf(x.clone());
        let out = model.forward(&tape, &input)?;
        let loss = tape.mean(&out)?;
        drop(out);
        tape.backward(&loss)?;
        Ok(())
    });
    r?;
    for p in model.params() {
        p.zero_grad();
    }
    let trains = !model.trainable_params().is_empty();
    drop(model);
    let train_step = if trains {
        let spec = common.spec(variant);
        let step = |checkpoint| {
            let options = TrainOptions {
                checkpoint,
                micro_batch: None,
            };
            measure_train_step_bytes(&spec, TRAIN_BATCH, options)
        };
        Some((step(false)?, step(true)?))
    } else {
        None
    };
    Ok(Column {
        variant,
        trainable: counts.trainable,
        non_trainable: counts.non_trainable,
        theoretical: counts.bytes,
        actual,
        forward,
        forward_chunked,
        backward,
        train_step,
    })
}

/// Prints the table (or JSON) for `variants`.
pub fn run(variants: &[Variant], as_json: bool, common: &Common) -> Result<()> {
    if !memory::is_installed() {
        eprintln!("warning: the counting allocator is not installed: measured figures read 0");
    }
    let columns = variants
        .iter()
        .map(|&v| measure(v, common))
        .collect::<Result<Vec<_>>>()?;
    if as_json {
        let mut obj = serde_json::Map::new();
        for c in &columns {
            let mut entry = json!({
                "trainable_params": c.trainable,
                "non_trainable_params": c.non_trainable,
                // A count, as its two parts are (the table prints it in millions).
                "total_params": c.trainable + c.non_trainable,
                "theoretical_mb": mb(c.theoretical),
                "actual_mb": mb(c.actual),
                "forward_mb": mb(c.forward),
                "forward_chunked_mb": mb(c.forward_chunked),
                "backward_mb": mb(c.backward),
            });
            if let Some((plain, checkpointed)) = c.train_step {
                entry["train_step_mb"] = json!(mb(plain));
                entry["train_step_checkpoint_mb"] = json!(mb(checkpointed));
            }
            obj.insert(c.variant.name().to_string(), entry);
        }
        println!("{}", serde_json::Value::Object(obj));
        return Ok(());
    }
    let width = 16;
    print!("{:<26}", "");
    for c in &columns {
        print!("{:>width$}", c.variant.name());
    }
    println!();
    let cells = |f: &dyn Fn(&Column) -> String| columns.iter().map(f).collect::<Vec<_>>();
    let rows = [
        ("Trainable params", cells(&|c| c.trainable.to_string())),
        (
            "Non-trainable params",
            cells(&|c| c.non_trainable.to_string()),
        ),
        (
            "Total params (M)",
            cells(&|c| format!("{:.2}", (c.trainable + c.non_trainable) as f64 / 1e6)),
        ),
        (
            "Theoretical memory (MB)",
            cells(&|c| format!("{:.2}", mb(c.theoretical))),
        ),
        (
            "Actual memory (MB)",
            cells(&|c| format!("{:.2}", mb(c.actual))),
        ),
        (
            "Forward memory (MB)",
            cells(&|c| format!("{:.2}", mb(c.forward))),
        ),
        (
            "  in row chunks (MB)",
            cells(&|c| format!("{:.2}", mb(c.forward_chunked))),
        ),
        (
            "Backward memory (MB)",
            cells(&|c| format!("{:.2}", mb(c.backward))),
        ),
        (
            "Training step memory (MB)",
            cells(&|c| {
                c.train_step
                    .map_or("-".into(), |t| format!("{:.2}", mb(t.0)))
            }),
        ),
        (
            "  with --checkpoint (MB)",
            cells(&|c| {
                c.train_step
                    .map_or("-".into(), |t| format!("{:.2}", mb(t.1)))
            }),
        ),
    ];
    for (name, row) in &rows {
        print!("{name:<26}");
        for cell in row {
            print!("{cell:>width$}");
        }
        println!();
    }
    Ok(())
}
