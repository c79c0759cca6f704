//! The command line: the verbs and their options.

use clap::{Parser, Subcommand};
use nibble_io::WeightFormat;
use std::path::PathBuf;

/// The program's arguments.
#[derive(Debug, Parser)]
#[command(
    name = "nibble",
    version,
    about = "Inspect, quantize, evaluate and QLoRA-fine-tune any PyTorch Sequential classifier"
)]
pub struct Cli {
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// Formats `eval` reports: one, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatChoice {
    /// One format.
    One(WeightFormat),
    /// Every format, in [`EVAL_ORDER`].
    All,
}

/// The order of `eval --format all`'s rows: f32, f16, int8, q4, nf4, nf4_dq, lower.
pub const EVAL_ORDER: [WeightFormat; 7] = [
    WeightFormat::F32,
    WeightFormat::F16,
    WeightFormat::Int8,
    WeightFormat::Q4,
    WeightFormat::Nf4,
    WeightFormat::Nf4Dq,
    WeightFormat::Lower,
];

impl FormatChoice {
    /// The formats chosen.
    pub fn formats(self) -> Vec<WeightFormat> {
        match self {
            FormatChoice::One(f) => vec![f],
            FormatChoice::All => EVAL_ORDER.to_vec(),
        }
    }
}

fn parse_format(s: &str) -> Result<WeightFormat, String> {
    s.parse()
}

fn parse_format_choice(s: &str) -> Result<FormatChoice, String> {
    if s == "all" {
        Ok(FormatChoice::All)
    } else {
        s.parse().map(FormatChoice::One)
    }
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every tensor of a state dict or checkpoint: name, dtype, shape, format, bytes; the total.
    Inspect {
        /// A .safetensors or .pth file.
        file: PathBuf,
        /// Print one JSON object (keys: file, bytes, tensors: each name, dtype, shape, format,
        /// bytes).
        #[arg(long)]
        json: bool,
    },
    /// Stores every 2-D floating-point weight (or those matching --include) in a format.
    Quantize {
        /// The state dict to read (.safetensors or .pth); never written.
        input: PathBuf,
        /// f32, f16, int8, q4, nf4, nf4_dq or lower.
        #[arg(long, value_parser = parse_format)]
        format: WeightFormat,
        /// The safetensors file to write (must not be the input).
        #[arg(long, value_name = "OUT")]
        output: PathBuf,
        /// Quantize only the 2-D tensors whose key matches this regular expression.
        #[arg(long, value_name = "REGEX")]
        include: Option<String>,
        /// Print per tensor max and mean |Δ|, cosine similarity and bytes before and after.
        #[arg(long)]
        report: bool,
        /// Print one JSON object (keys: format, bytes_before, bytes_after, tensors: each name,
        /// shape, max_diff, mean_diff, cosine, bytes_before, bytes_after).
        #[arg(long)]
        json: bool,
    },
    /// Accuracy, loss, cosine of the logits to f32, and model bytes of a Sequential classifier.
    Eval {
        /// A PyTorch nn.Sequential state dict (.pth or .safetensors) of Linear, LayerNorm,
        /// RMSNorm, BatchNorm1d and parameter-free activation layers.
        #[arg(long, value_name = "M")]
        model: PathBuf,
        /// A safetensors file with x_test (f32, N x F) and y_test (N labels: class indices of
        /// any integer type, or whole numbers in a float type; shape N or N x 1).
        #[arg(long, value_name = "D")]
        data: PathBuf,
        /// The weight format of every Linear, or `all` for one row per format.
        #[arg(long, value_parser = parse_format_choice, default_value = "f32")]
        format: FormatChoice,
        /// The activation in each gap of the layer indices: relu (nn.ReLU), gelu (nn.GELU, exact
        /// erf form), gelu_tanh (nn.GELU(approximate="tanh")), tanh (nn.Tanh), sigmoid
        /// (nn.Sigmoid), silu (nn.SiLU), leaky_relu (nn.LeakyReLU; leaky_relu:0.2 for
        /// negative_slope=0.2), elu (nn.ELU; elu:0.5 for alpha=0.5), softplus (nn.Softplus),
        /// mish (nn.Mish), hardswish (nn.Hardswish), relu6 (nn.ReLU6), selu (nn.SELU), celu
        /// (nn.CELU; celu:0.5 for alpha=0.5), hardtanh (nn.Hardtanh()), hardsigmoid
        /// (nn.Hardsigmoid), softsign (nn.Softsign), logsigmoid (nn.LogSigmoid), tanhshrink
        /// (nn.Tanhshrink), identity (nn.Identity,
        /// nn.Dropout, nn.Flatten), layer_norm (nn.LayerNorm(dim, elementwise_affine=False),
        /// epsilon --layer-norm-eps), group_norm:G (nn.GroupNorm(G, dim, affine=False), epsilon
        /// --layer-norm-eps) or rms_norm (nn.RMSNorm(dim, elementwise_affine=False), epsilon
        /// --rms-norm-eps); several in one gap joined by `+` (layer_norm+relu); a
        /// comma-separated list with one per gap (default relu). Given, with one entry more
        /// than there are gaps between layers, the first runs before the first layer; for a
        /// model with no gap between its layers but parameter-free ones in front (indices
        /// starting at 1), one entry runs there.
        #[arg(long)]
        activation: Option<String>,
        /// The epsilon of every LayerNorm and GroupNorm (`nn.LayerNorm(dim, eps=...)`,
        /// `nn.GroupNorm(groups, dim, eps=...)`; a state dict does not hold it). Default: a whole
        /// pickled model's own, else PyTorch's, 1e-5; given, it replaces the pickle's.
        #[arg(long, allow_negative_numbers = true, value_name = "EPS")]
        layer_norm_eps: Option<f32>,
        /// The epsilon of every BatchNorm1d (`nn.BatchNorm1d(dim, eps=...)`; a state dict does
        /// not hold it). Default: a whole pickled model's own, else PyTorch's, 1e-5; given, it
        /// replaces the pickle's.
        #[arg(long, allow_negative_numbers = true, value_name = "EPS")]
        batch_norm_eps: Option<f32>,
        /// What each module of a 1-D weight (not a BatchNorm1d) is: layer (nn.LayerNorm), rms
        /// (nn.RMSNorm, no bias), group:G (nn.GroupNorm(G, dim)) or prelu (nn.PReLU), or a
        /// comma-separated list with one per such module in index order (a state dict cannot
        /// tell them apart). Default: layer, with a note naming the modules so read.
        #[arg(long, value_name = "KIND")]
        norm: Option<String>,
        /// The epsilon of every RMSNorm (`nn.RMSNorm(dim, eps=...)`). Default: a whole pickled
        /// model's own, else PyTorch's for f32, 1.1920929e-7 (f32's machine epsilon); given, it
        /// replaces the pickle's.
        #[arg(long, allow_negative_numbers = true, value_name = "EPS")]
        rms_norm_eps: Option<f32>,
        /// For a model of named modules (fc1, bn1, head, ...): the order its forward runs them,
        /// comma-separated (fc1,bn1,fc2,head), where the file keeps another (a safetensors file
        /// sorts them by name).
        #[arg(long, value_name = "MODULES")]
        order: Option<String>,
        /// A LoRA adapter directory (PEFT layout, e.g. from `finetune --save-adapter`) to put on
        /// the model.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
        /// Write the logits on x_test (key `logits`, of the first format) to this safetensors
        /// file (never one of the inputs, nor a file of the --adapter directory).
        #[arg(long, value_name = "FILE")]
        logits: Option<PathBuf>,
        /// Print one JSON object (keys: model, data, rows: each format, accuracy, loss, cosine,
        /// bytes).
        #[arg(long)]
        json: bool,
    },
    /// QLoRA: the base in a format and frozen, LoRA on every Linear, cross-entropy, AdamW.
    Finetune {
        /// A PyTorch nn.Sequential state dict (see `eval`).
        #[arg(long, value_name = "M")]
        model: PathBuf,
        /// A safetensors file with x_train, y_train (trained on) and x_test, y_test (scored).
        #[arg(long, value_name = "D")]
        data: PathBuf,
        /// The frozen base's format: f32, f16, int8, q4, nf4, nf4_dq or lower.
        #[arg(long, value_parser = parse_format)]
        format: WeightFormat,
        /// LoRA rank: 1 up to 65536 (PEFT's cap; above a layer's min(out, in) allowed, as in PEFT).
        #[arg(long, value_name = "R")]
        rank: usize,
        /// DoRA adapters (PEFT's use_dora): each Linear's output scaled per output by a trained
        /// magnitude over the norm of its adapted weight's row.
        #[arg(long)]
        dora: bool,
        /// Training steps (one mini-batch each), at least 1.
        #[arg(long, value_name = "N")]
        steps: usize,
        /// AdamW learning rate.
        #[arg(long, allow_negative_numbers = true, default_value_t = 1e-2)]
        lr: f32,
        /// Rows per mini-batch (sampled from the training split).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// The activation in each gap of the layer indices (see `eval`; default relu).
        #[arg(long)]
        activation: Option<String>,
        /// The epsilon of every LayerNorm and GroupNorm (see `eval`).
        #[arg(long, allow_negative_numbers = true, value_name = "EPS")]
        layer_norm_eps: Option<f32>,
        /// The epsilon of every BatchNorm1d (see `eval`).
        #[arg(long, allow_negative_numbers = true, value_name = "EPS")]
        batch_norm_eps: Option<f32>,
        /// What each module of a 1-D weight is: layer, rms, group:G or prelu (see `eval`).
        /// Default: layer, with a note naming the modules so read.
        #[arg(long, value_name = "KIND")]
        norm: Option<String>,
        /// The epsilon of every RMSNorm (see `eval`).
        #[arg(long, allow_negative_numbers = true, value_name = "EPS")]
        rms_norm_eps: Option<f32>,
        /// The order a model of named modules runs them (see `eval`).
        #[arg(long, value_name = "MODULES")]
        order: Option<String>,
        /// Save the trained adapters here (PEFT layout: adapter_model.safetensors and
        /// adapter_config.json, target modules named by layer index).
        #[arg(long, value_name = "DIR")]
        save_adapter: Option<PathBuf>,
        /// Seed of the adapters' init and of the mini-batches.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object (keys: format, rank, dora, steps, accuracy_before,
        /// accuracy_after, loss: one per step).
        #[arg(long)]
        json: bool,
    },
}
