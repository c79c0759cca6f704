#![warn(missing_docs)]
//! # nibble-cli
//!
//! The `nibble` program: model-agnostic verbs over any PyTorch `nn.Sequential` classifier of
//! `Linear`, `LayerNorm`, `RMSNorm`, `BatchNorm1d` and parameter-free activation layers, saved as a state dict (`.pth`
//! or safetensors):
//!
//! - `nibble inspect FILE` — every tensor: name, dtype, shape, format, bytes; the total.
//! - `nibble quantize IN --format F --output OUT [--include REGEX] [--report]` — every 2-D
//!   floating-point weight (or those matching) stored in format F.
//! - `nibble eval --model M --data D [--format F|all] [--activation A]` — accuracy, mean
//!   cross-entropy, cosine similarity of the logits to the f32 model, model bytes.
//! - `nibble finetune --model M --data D --format F --rank R --steps N ...` — QLoRA.
//!
//! `--activation` names what each gap in the layer indices holds, one name for all gaps or a
//! comma-separated list with one per gap: `relu` (`nn.ReLU`, the default), `gelu` (`nn.GELU()`,
//! exact erf form), `gelu_tanh` (`nn.GELU(approximate="tanh")`), `tanh` (`nn.Tanh`), `sigmoid`
//! (`nn.Sigmoid`), `silu` (`nn.SiLU`), `identity` (`nn.Identity`, `nn.Dropout`, `nn.Flatten`
//! of a 2-D input), `layer_norm` / `rms_norm` (`nn.LayerNorm` / `nn.RMSNorm` with
//! `elementwise_affine=False`), and more (see `nibble eval --help`); several in one gap are
//! joined by `+`. `--norm layer|rms` says whether the modules of a 1-D weight are LayerNorms or
//! RMSNorms (a state dict cannot tell).
//!
//! Every verb takes `--json` and then prints one JSON object with the keys documented on its
//! report type ([`inspect::Inspection`], [`quantize::QuantizeReport`], [`eval::EvalReport`],
//! [`finetune::FinetuneReport`]). Every bad input is an [`Error`] naming the file, key, index
//! and the expected and found values; no verb writes over one of its inputs.
//!
//! The verbs are also functions, for tests and programs:
//!
//! ```no_run
//! use nibble_cli::{args::FormatChoice, eval::{evaluate, EvalArgs}};
//! use std::path::Path;
//! let report = evaluate(&EvalArgs {
//!     model: Path::new("tests/data/digits_mlp.pth"),
//!     data: Path::new("tests/data/digits.safetensors"),
//!     format: FormatChoice::All,
//!     activation: Some("relu"),
//!     layer_norm_eps: None,
//!     batch_norm_eps: None,
//!     norm: Some("layer"),
//!     rms_norm_eps: None,
//!     order: None,
//!     adapter: None,
//!     logits: None,
//! })?;
//! for row in &report.rows {
//!     println!("{}: {:.2}%", row.format, 100.0 * row.accuracy);
//! }
//! # Ok::<(), nibble_cli::Error>(())
//! ```

pub mod args;
pub mod compare;
pub mod error;
pub mod eval;
pub mod finetune;
pub mod inspect;
pub mod model;
pub mod paths;
mod pickled;
pub mod quantize;

pub use error::{Error, Result};

use args::{Cli, Command};

/// Runs the parsed command line, printing its report to stdout.
pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Inspect { file, json } => inspect::run(file, *json),
        Command::Quantize {
            input,
            format,
            output,
            include,
            report,
            json,
        } => quantize::run(input, *format, output, include.as_deref(), *report, *json),
        Command::Eval {
            model,
            data,
            format,
            activation,
            layer_norm_eps,
            batch_norm_eps,
            norm,
            rms_norm_eps,
            order,
            adapter,
            logits,
            json,
        } => eval::run(
            &eval::EvalArgs {
                model,
                data,
                format: *format,
                activation: activation.as_deref(),
                layer_norm_eps: *layer_norm_eps,
                batch_norm_eps: *batch_norm_eps,
                norm: norm.as_deref(),
                rms_norm_eps: *rms_norm_eps,
                order: order.as_deref(),
                adapter: adapter.as_deref(),
                logits: logits.as_deref(),
            },
            *json,
        ),
        Command::Finetune {
            model,
            data,
            format,
            rank,
            dora,
            steps,
            lr,
            batch,
            activation,
            layer_norm_eps,
            batch_norm_eps,
            norm,
            rms_norm_eps,
            order,
            save_adapter,
            seed,
            json,
        } => finetune::run(
            &finetune::FinetuneArgs {
                model,
                data,
                format: *format,
                rank: *rank,
                dora: *dora,
                steps: *steps,
                lr: *lr,
                batch: *batch,
                activation: activation.as_deref(),
                layer_norm_eps: *layer_norm_eps,
                batch_norm_eps: *batch_norm_eps,
                norm: norm.as_deref(),
                rms_norm_eps: *rms_norm_eps,
                order: order.as_deref(),
                save_adapter: save_adapter.as_deref(),
                seed: *seed,
            },
            *json,
        ),
    }
}
