//! `nibble eval`: a Sequential classifier's accuracy, mean cross-entropy, cosine similarity of
//! its logits to the f32 model's, and model bytes, in one weight format or in all of them.

use crate::args::FormatChoice;
use crate::compare::{accuracy, mean_cross_entropy, mean_row_cosine};
use crate::error::{Error, Result};
use crate::model::{Classifier, Structure};
use crate::paths::{adapter_inputs, refuse_overwrite_owned};
use nibble_io::{write_safetensors, DType, Dataset, WeightFormat, FORMAT_KEY};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Metadata key of an `eval --logits` file naming every weight format the model's Linears hold
/// (`f32+nf4`), where they hold more than one.
pub const FORMATS_KEY: &str = "nibble.formats";

/// One format's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalRow {
    /// The weight format of every Linear (where they differ, each format in the order of the
    /// first Linear holding it, joined by `+`: `f32+nf4`).
    pub format: String,
    /// Fraction of test rows classified right.
    pub accuracy: f64,
    /// Mean softmax cross-entropy on the test rows.
    pub loss: f64,
    /// Mean over test rows of the cosine similarity of the logits to the f32 model's.
    pub cosine: f64,
    /// Bytes of the model's weights, biases and LayerNorm parameters in this format (and of
    /// the LoRA adapters, with `--adapter`).
    pub bytes: usize,
}

/// What `eval` reports (also its `--json` object).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    /// The model file.
    pub model: String,
    /// The data file.
    pub data: String,
    /// One row per format.
    pub rows: Vec<EvalRow>,
}

/// What `eval` is asked for.
#[derive(Debug, Clone)]
pub struct EvalArgs<'a> {
    /// The state dict.
    pub model: &'a Path,
    /// The data file.
    pub data: &'a Path,
    /// Formats to evaluate.
    pub format: FormatChoice,
    /// An activation name (one of [`nibble_nn::Activation::NAMES`]: `relu`, `gelu`, `tanh`,
    /// `layer_norm`, ...; several in one gap joined by `+`), or one per gap, comma-separated;
    /// `None`: `relu` in every gap, nothing before the first layer.
    pub activation: Option<&'a str>,
    /// The epsilon of every LayerNorm and GroupNorm; `None`: a whole pickled model's own, else
    /// PyTorch's default, 1e-5.
    pub layer_norm_eps: Option<f32>,
    /// The epsilon of every BatchNorm1d; `None`: a whole pickled model's own, else PyTorch's
    /// default, 1e-5.
    pub batch_norm_eps: Option<f32>,
    /// What each module of a 1-D weight is: `layer` (LayerNorm), `rms` (RMSNorm), or one per
    /// such module, comma-separated; `None`: LayerNorms, with a note naming them
    /// ([`crate::model::Classifier::notes`]).
    pub norm: Option<&'a str>,
    /// The epsilon of every RMSNorm; `None`: a whole pickled model's own, else PyTorch's
    /// default for f32, [`f32::EPSILON`].
    pub rms_norm_eps: Option<f32>,
    /// For a model of named modules, the order its forward runs them (comma-separated
    /// paths), where the file keeps another; `None`: the file's order.
    pub order: Option<&'a str>,
    /// A PEFT adapter directory to put on the model (in every format).
    pub adapter: Option<&'a Path>,
    /// Where to write the first format's logits, if anywhere.
    pub logits: Option<&'a Path>,
}

/// Evaluates the model on the data's test split (see the module docs). A model without a
/// Linear layer gives one row, `f32`, whatever the formats asked for (they store Linear
/// weights only).
pub fn evaluate(args: &EvalArgs<'_>) -> Result<EvalReport> {
    if let Some(out) = args.logits {
        let mut inputs = vec![
            (args.model.to_path_buf(), "--model".to_string()),
            (args.data.to_path_buf(), "--data".to_string()),
        ];
        if let Some(dir) = args.adapter {
            inputs.extend(adapter_inputs(dir, "--adapter"));
        }
        refuse_overwrite_owned(out, &inputs)?;
    }
    let structure = Structure::parse(
        args.activation,
        args.norm,
        args.layer_norm_eps,
        args.batch_norm_eps,
        args.rms_norm_eps,
        args.order,
    )?;
    let data = Dataset::open(args.data)?;
    let load = |format| -> Result<Classifier> {
        let mut m = Classifier::open(args.model, &structure, format)?;
        if let Some(dir) = args.adapter {
            m.load_adapter(dir)?;
        }
        Ok(m)
    };
    let reference = load(WeightFormat::F32)?;
    for note in reference.notes(args.model) {
        eprintln!("note: {note}");
    }
    data.check_fits(reference.features(), reference.label_count())?;
    reference.check_rows_fit("--data", data.test.len(), false)?;
    let x = &data.test.x;
    let labels = &data.test.y;
    let classes = reference.classes();
    let reference_logits = reference.logits(x)?;
    // Every row's cosine is taken to these logits.
    check_logits_finite(
        args.model,
        &reference.format_label(),
        &reference_logits,
        classes,
    )?;
    let mut rows = Vec::new();
    // Without a Linear layer the weight formats do not apply: every one is the f32 model, so
    // `--format all` gives the one row.
    // A quantized file holds its one format: `--format all` gives its row (the other formats
    // would re-quantize its weights, which is refused).
    let stored = reference.format_label();
    let formats = if !reference.has_linear() {
        if args.format.formats() != [WeightFormat::F32] {
            eprintln!(
                "note: {} has no Linear layer, so the weight formats do not apply: one f32 row",
                args.model.display()
            );
        }
        vec![WeightFormat::F32]
    } else if matches!(args.format, FormatChoice::All) && stored == WeightFormat::F16.name() {
        // An f16 file (nibble's f16 output) runs as f16 where f32 is asked: its first row is
        // the f16 one, and the others quantize its weights (as from an f16 checkpoint).
        args.format
            .formats()
            .into_iter()
            .filter(|&f| f != WeightFormat::F16)
            .collect()
    } else if matches!(args.format, FormatChoice::All) && stored != WeightFormat::F32.name() {
        eprintln!(
            "note: --format all: {} is already quantized ({stored}); its one row is the format it \
             holds",
            args.model.display()
        );
        vec![WeightFormat::F32]
    } else {
        args.format.formats()
    };
    for (i, format) in formats.into_iter().enumerate() {
        let model;
        let (m, logits) = if format == WeightFormat::F32 {
            (&reference, reference_logits.clone())
        } else {
            model = load(format)?;
            let logits = model.logits(x)?;
            (&model, logits)
        };
        check_logits_finite(args.model, &m.format_label(), &logits, classes)?;
        if i == 0 {
            if let Some(out) = args.logits {
                let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
                let entry = (
                    "logits".to_string(),
                    DType::F32,
                    vec![labels.len(), classes],
                    bytes.as_slice(),
                );
                // The format as a quantized file declares it, and where the Linears hold
                // several (a file quantized in part), each of them, as the report's row.
                let mut meta = BTreeMap::new();
                meta.insert(FORMAT_KEY.to_string(), m.format().name().to_string());
                let label = m.format_label();
                if label != m.format().name() {
                    meta.insert(FORMATS_KEY.to_string(), label);
                }
                write_safetensors(out, &[entry], &meta)?;
            }
        }
        rows.push(EvalRow {
            // The format the weights are in: the one asked for, or a quantized file's own.
            format: m.format_label(),
            accuracy: accuracy(&logits, classes, labels),
            loss: mean_cross_entropy(&logits, classes, labels),
            cosine: mean_row_cosine(&logits, &reference_logits, classes),
            bytes: m.bytes(),
        });
    }
    Ok(EvalReport {
        model: args.model.display().to_string(),
        data: args.data.display().to_string(),
        rows,
    })
}

/// An error naming `--model`, the format, the test row, the class and the value, unless every
/// logit of `logits` (`[rows, classes]`) is finite. A model whose weights are finite can still
/// overflow f32 on the data (a weight near 1e37, say): its loss and cosine would be NaN, which
/// the table would print as `NaN` and `--json` as `null`, not the numbers it promises.
fn check_logits_finite(model: &Path, format: &str, logits: &[f32], classes: usize) -> Result<()> {
    match logits.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(at) => Err(Error::Usage {
            arg: "--model",
            what: format!(
                "{}: the {format} model's logit of test row {}, class {} is {}: the model \
                 overflows f32 on the data, so its loss and cosine are not numbers",
                model.display(),
                at / classes.max(1),
                at % classes.max(1),
                logits[at]
            ),
        }),
    }
}

/// Runs `eval`, printing a table or one JSON object.
pub fn run(args: &EvalArgs<'_>, json: bool) -> Result<()> {
    let report = evaluate(args)?;
    if json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
        return Ok(());
    }
    println!("{} on {}:", report.model, report.data);
    print_table(&report.rows);
    Ok(())
}

/// Prints eval rows as a table (also used by the digits example).
pub fn print_table(rows: &[EvalRow]) {
    println!(
        "{:<8} {:>9} {:>9} {:>10} {:>10}",
        "format", "accuracy", "loss", "cosine", "bytes"
    );
    for r in rows {
        println!(
            "{:<8} {:>8.2}% {:>9.4} {:>10.6} {:>10}",
            r.format,
            100.0 * r.accuracy,
            r.loss,
            r.cosine,
            r.bytes
        );
    }
}
