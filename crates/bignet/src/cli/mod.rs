//! The `bignet` command-line program: `stats`, `compare`, `fit`, `forward`, `bench`,
//! `quantize`, `merge`.
//! Each verb lives in its own file; this one holds the argument types and the dispatch.

mod bench;
pub mod compare;
mod fit;
mod forward;
mod merge;
pub mod paths;
mod quantize;
mod stats;

use crate::error::{Error, Result};
use crate::loader::ModelSpec;
use crate::persist::quantized_format;
use crate::source::DEFAULT_DIM;
use crate::train::TrainOptions;
use crate::variant::{Variant, WeightFormat};
use clap::{Args, Parser, Subcommand};
use nibble_quant::act8::{set_activations, ActivationMode};
use paths::{check_no_overwrite, NamedPath};
use std::path::PathBuf;

/// The program's arguments.
#[derive(Debug, Parser)]
#[command(
    name = "bignet",
    version,
    about = "BigNet in every memory-saving form: stats, compare, fit, forward, bench"
)]
pub struct Cli {
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every verb takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// A checkpoint (.pth or .safetensors state dict); default: PyTorch's init from --seed.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Worker threads for the kernels (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seed of the init, the LoRA adapters and the data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Model width for seeded init (a checkpoint's own width wins).
    #[arg(long, default_value_t = DEFAULT_DIM)]
    pub dim: usize,
    /// A LoRA adapter directory (PEFT layout) to load on top of the model, or a state dict of
    /// the reference's trained lora/qlora model (its `….lora_a.weight` / `lora_b.weight`; its
    /// other tensors must equal the model's)
    #[arg(long, value_name = "DIR|FILE")]
    pub adapter: Option<PathBuf>,
    /// Activations of every quantized layer, at every batch size: `f32` (exact with respect
    /// to the dequantized weights) or `int8` (integer dot products, a bounded extra error:
    /// see `nibble_quant::act8`). `--q4-activations` is its old name. Default: f32, or
    /// `NIBBLE_ACTIVATIONS` (`NIBBLE_Q4_ACT`).
    #[arg(long, alias = "q4-activations", value_name = "f32|int8", value_parser = parse_activations)]
    pub activations: Option<ActivationMode>,
}

fn parse_activations(s: &str) -> std::result::Result<ActivationMode, String> {
    ActivationMode::parse(s).ok_or_else(|| format!("`{}`: expected f32 or int8", s.trim()))
}

impl Default for Common {
    /// The command line's defaults (no file, seed 0, width 1024, activations from the
    /// environment), so that library users can write `Common { dim: 64, ..Default::default() }`.
    fn default() -> Self {
        Common {
            weights: None,
            threads: None,
            seed: 0,
            dim: DEFAULT_DIM,
            adapter: None,
            activations: None,
        }
    }
}

impl Common {
    /// The variant to run: `asked`, or else the one the `--weights` file implies (a quantized
    /// checkpoint names its format in `__metadata__["nibble.format"]`, bitsandbytes' 4-bit
    /// layout is nf4 or nf4_dq; nibble's f16 files
    /// imply `half_precision`; a state dict with the reference's LoRA keys (`….lora_a.weight`)
    /// `lora`; an f32 state dict with such a file as `--adapter`, `qlora` where that file holds
    /// no layer weights (the reference's qlora model saved whole), else `lora`; any other state
    /// dict, or none, `bignet`). An asked variant
    /// that cannot run on a quantized file (only that format's variant, or `qlora` over Q4)
    /// is an error naming both.
    pub fn variant(&self, asked: Option<Variant>) -> Result<Variant> {
        let Some(path) = &self.weights else {
            return Ok(asked.unwrap_or(Variant::Bignet));
        };
        let file = crate::loader::open_checkpoint(path)?;
        let quantized = quantized_format(&file)?;
        let declared = match quantized {
            Some(format) => Some(format),
            None => WeightFormat::declared_by(&file)?,
        };
        let mut implied = declared.map_or(Variant::Bignet, Variant::for_format);
        if quantized.is_none() && crate::loader::state_dict_lora_key(&file).is_some() {
            // The reference's LoRA model saved whole: its adapters need the lora variant.
            implied = Variant::Lora;
        } else if declared.is_none() {
            if let Some(adapters) = self.adapter.as_deref().filter(|a| a.is_file()) {
                // The reference's lora or qlora model saved whole, given as --adapter over the
                // f32 state dict: a qlora model's file holds no layer weights (PyTorch does not
                // save its 4-bit buffers), a lora model's its f16 ones.
                let adapters = crate::loader::open_checkpoint(adapters)?;
                if let Some(key) = crate::loader::state_dict_lora_key(&adapters) {
                    let layer = key.rsplit_once(".lora_").map_or(key, |(l, _)| l);
                    implied = if adapters.info(&format!("{layer}.weight")).is_some() {
                        Variant::Lora
                    } else {
                        Variant::Qlora
                    };
                }
            }
        }
        let Some(asked) = asked else {
            return Ok(implied);
        };
        if let Some(format) = quantized {
            let fits = asked == implied || (asked == Variant::Qlora && format == WeightFormat::Q4);
            if !fits {
                return Err(Error::Input {
                    what: format!(
                        "variant {asked} conflicts with --weights {}, which holds {} weights (variant {implied}{}); leave the variant out to use the file's",
                        path.display(),
                        format.name(),
                        if format == WeightFormat::Q4 { " or qlora" } else { "" }
                    ),
                });
            }
        }
        Ok(asked)
    }

    /// [`Common::variant`] for each of `asked`, or the implied one when `asked` is empty.
    pub fn variants(&self, asked: &[Variant]) -> Result<Vec<Variant>> {
        if asked.is_empty() {
            return Ok(vec![self.variant(None)?]);
        }
        asked.iter().map(|&v| self.variant(Some(v))).collect()
    }

    /// The files a verb reads: `--weights` and the adapter directory's files that exist.
    pub fn inputs(&self) -> Vec<NamedPath> {
        let mut inputs: Vec<NamedPath> = self
            .weights
            .iter()
            .map(|w| NamedPath::new("--weights", w))
            .collect();
        if let Some(dir) = &self.adapter {
            // The files the directory has: a clash with one it lacks (`adapter_model.safetensors`
            // beside a `.bin` adapter) named a file that does not exist.
            inputs.extend(
                NamedPath::adapter_files("--adapter", dir)
                    .into_iter()
                    .filter(|f| f.path.exists()),
            );
        }
        inputs
    }

    /// The spec of `variant` under these options.
    pub fn spec(&self, variant: Variant) -> ModelSpec {
        ModelSpec {
            variant,
            weights: self.weights.clone(),
            seed: self.seed,
            dim: self.dim,
            adapter: self.adapter.clone(),
        }
    }
}

/// How `fit` and `bench --train` spend memory on a training step.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct TrainArgs {
    /// Checkpoint each block: keep only its input, recompute it in the backward (same
    /// gradients, bit for bit; about two thirds of a forward more per step).
    #[arg(long)]
    pub checkpoint: bool,
    /// Accumulate the gradients over micro-batches of N rows (the same update up to the order
    /// of the sums over rows).
    #[arg(long, value_name = "N")]
    pub micro_batch: Option<usize>,
}

impl TrainArgs {
    /// The options of a training step.
    pub fn options(&self) -> TrainOptions {
        TrainOptions {
            checkpoint: self.checkpoint,
            micro_batch: self.micro_batch,
        }
    }
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parameter counts and memory (theoretical and measured) of each variant.
    Stats {
        /// Variants to report (one column each; default: the one the --weights file implies).
        #[arg(value_parser = parse_variant)]
        variants: Vec<Variant>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Options every verb takes.
        #[command(flatten)]
        common: Common,
    },
    /// Max and mean |A(x) - B(x)| on a 1024 x D standard-normal batch.
    Compare {
        /// First variant.
        #[arg(value_parser = parse_variant)]
        a: Variant,
        /// Second variant.
        #[arg(value_parser = parse_variant)]
        b: Variant,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Options every verb takes.
        #[command(flatten)]
        common: Common,
    },
    /// The homework grader's fit: frozen random head, 1000 samples, AdamW, BCE.
    Fit {
        /// The variant to train (default: the one the --weights file implies).
        #[arg(value_parser = parse_variant)]
        variant: Option<Variant>,
        /// Training steps.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// AdamW learning rate.
        #[arg(long, allow_negative_numbers = true, default_value_t = 1e-3)]
        lr: f32,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Save the trained LoRA adapters here (PEFT layout).
        #[arg(long, value_name = "DIR")]
        save_adapter: Option<PathBuf>,
        /// Make the LoRA adapters DoRA ones before training (PEFT's use_dora: each layer's
        /// output scaled per output by a trained magnitude over its adapted weight's row norm).
        #[arg(long)]
        dora: bool,
        /// Checkpointing and micro-batches.
        #[command(flatten)]
        train: TrainArgs,
        /// Options every verb takes.
        #[command(flatten)]
        common: Common,
    },
    /// Quantizes a state dict into a checkpoint that loads without re-quantizing.
    Quantize {
        /// Storage format: q4, nf4, nf4_dq, int8, lower (or f16).
        #[arg(long, value_parser = parse_format)]
        format: WeightFormat,
        /// The safetensors file to write.
        #[arg(long, value_name = "OUT")]
        output: PathBuf,
        /// Options every verb takes.
        #[command(flatten)]
        common: Common,
    },
    /// Folds LoRA adapters (--adapter, or those of a --weights state dict of the reference's
    /// trained lora / qlora model) into the base weights and saves the merged model.
    Merge {
        /// The base the adapters sit on (bignet for an f32 base, half_precision, low_precision...;
        /// default: the one the --weights file implies).
        #[arg(value_parser = parse_variant)]
        variant: Option<Variant>,
        /// Storage of the merged weights: f32, f16, q4, nf4, nf4_dq, int8, lower.
        #[arg(long, value_parser = parse_format)]
        into: WeightFormat,
        /// The safetensors file to write.
        #[arg(long, value_name = "OUT")]
        output: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Options every verb takes.
        #[command(flatten)]
        common: Common,
    },
    /// Runs the model on tensor `x` [B, D] of a safetensors file; writes `y` [B, D].
    Forward {
        /// The variant (default: the one the --weights file implies).
        #[arg(long, value_parser = parse_variant)]
        variant: Option<Variant>,
        /// Input safetensors file holding `x`.
        #[arg(long, value_name = "IN")]
        input: PathBuf,
        /// Output safetensors file to write `y` to.
        #[arg(long, value_name = "OUT")]
        output: PathBuf,
        /// Options every verb takes.
        #[command(flatten)]
        common: Common,
    },
    /// Median milliseconds per forward (and per training step with --train).
    Bench {
        /// Variants to time (default: the one the --weights file implies).
        #[arg(value_parser = parse_variant)]
        variants: Vec<Variant>,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 1024])]
        batch: Vec<usize>,
        /// Also time a training step (forward + backward + AdamW) at batch 1000.
        #[arg(long)]
        train: bool,
        /// Checkpointing and micro-batches of the timed training step.
        #[command(flatten)]
        train_args: TrainArgs,
        /// Timed runs per figure (after warm-up).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Options every verb takes.
        #[command(flatten)]
        common: Common,
    },
}

fn parse_variant(s: &str) -> std::result::Result<Variant, String> {
    s.parse()
}

fn parse_format(s: &str) -> std::result::Result<WeightFormat, String> {
    WeightFormat::from_name(s).ok_or_else(|| {
        format!("unknown format `{s}` (expected one of: f32, f16, q4, nf4, nf4_dq, int8, lower)")
    })
}

impl Command {
    /// Every file the verb reads.
    fn inputs(&self) -> Vec<NamedPath> {
        let mut inputs = self.common().inputs();
        if let Command::Forward { input, .. } = self {
            inputs.push(NamedPath::new("--input", input));
        }
        inputs
    }

    /// Every file the verb writes.
    fn outputs(&self) -> Vec<NamedPath> {
        match self {
            Command::Forward { output, .. }
            | Command::Quantize { output, .. }
            | Command::Merge { output, .. } => vec![NamedPath::new("--output", output)],
            Command::Fit {
                save_adapter: Some(dir),
                ..
            } => NamedPath::adapter_files("--save-adapter", dir),
            _ => Vec::new(),
        }
    }

    fn common(&self) -> &Common {
        match self {
            Command::Stats { common, .. }
            | Command::Compare { common, .. }
            | Command::Fit { common, .. }
            | Command::Forward { common, .. }
            | Command::Quantize { common, .. }
            | Command::Merge { common, .. }
            | Command::Bench { common, .. } => common,
        }
    }
}

/// Runs the parsed command, writing its report to stdout.
pub fn run(cli: Cli) -> Result<()> {
    let common = cli.command.common();
    cli.command.check_counts()?;
    if common.weights.is_none() {
        // A seeded model of width D: 18 f32 D x D weights, built before anything else.
        let d = common.dim as u128;
        check_fits(
            &format!("--dim {}", common.dim),
            "a seeded BigNet this wide (18 f32 weights of D x D)",
            18 * d * d * 4,
        )?;
    }
    if let Some(n) = common.threads {
        let most = max_threads();
        if n == 0 || n > most {
            return Err(Error::Input {
                what: format!(
                    "--threads {n}: expected 1 to {most} (this machine runs {} threads at once; \
                     far more only spin)",
                    cores()
                ),
            });
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| Error::Input {
                what: format!("--threads {n}: {e}"),
            })?;
    }
    if let Some(mode) = common.activations {
        set_activations(mode);
    }
    check_no_overwrite(&cli.command.inputs(), &cli.command.outputs())?;
    match &cli.command {
        Command::Stats {
            variants,
            json,
            common,
        } => stats::run(&common.variants(variants)?, *json, common),
        Command::Compare { a, b, json, common } => compare::run(
            common.variant(Some(*a))?,
            common.variant(Some(*b))?,
            *json,
            common,
        ),
        Command::Fit {
            variant,
            steps,
            lr,
            json,
            save_adapter,
            dora,
            train,
            common,
        } => fit::run(
            common.variant(*variant)?,
            fit::FitRequest {
                steps: *steps,
                lr: *lr,
                as_json: *json,
                save_adapter: save_adapter.as_deref(),
                dora: *dora,
                options: train.options(),
            },
            common,
        ),
        Command::Quantize {
            format,
            output,
            common,
        } => quantize::run(*format, output, common),
        Command::Merge {
            variant,
            into,
            output,
            json,
            common,
        } => merge::run(common.variant(*variant)?, *into, output, *json, common),
        Command::Forward {
            variant,
            input,
            output,
            common,
        } => forward::run(common.variant(*variant)?, input, output, common),
        Command::Bench {
            variants,
            batch,
            train,
            train_args,
            runs,
            json,
            common,
        } => bench::run(
            &common.variants(variants)?,
            batch,
            train.then(|| train_args.options()),
            *runs,
            *json,
            common,
        ),
    }
}

impl Command {
    /// The counts a verb takes (steps, runs, batch sizes) checked before anything runs: each
    /// at least 1, and `--runs` no more than the machine can keep the timings of.
    fn check_counts(&self) -> Result<()> {
        let bad = |flag: &str, v: usize| Error::Input {
            what: format!("{flag} {v}: expected at least 1"),
        };
        let train = match self {
            Command::Fit { train, .. } => Some(train),
            Command::Bench { train_args, .. } => Some(train_args),
            _ => None,
        };
        if let Some(TrainArgs {
            micro_batch: Some(0),
            ..
        }) = train
        {
            return Err(bad("--micro-batch", 0));
        }
        match self {
            Command::Fit { steps: 0, .. } => Err(bad("--steps", 0)),
            Command::Bench { runs: 0, .. } => Err(bad("--runs", 0)),
            Command::Bench {
                batch,
                runs,
                train,
                train_args,
                ..
            } => {
                if let Some(&b) = batch.iter().find(|&&b| b == 0) {
                    return Err(bad("--batch", b));
                }
                if !*train && (train_args.checkpoint || train_args.micro_batch.is_some()) {
                    // They shape the timed training step: without one, a silent no-op.
                    return Err(Error::Input {
                        what: "--checkpoint and --micro-batch shape the timed training step: \
                               give --train with them"
                            .into(),
                    });
                }
                // Every figure keeps its runs' timings (an f64 each) for their median; a
                // training step times up to three configurations in turns.
                let (configs, what) = if *train {
                    let what = format!("keeping {runs} timings (8 bytes each) of each of 3 steps");
                    (3, what)
                } else {
                    (1, format!("keeping {runs} timings (8 bytes each)"))
                };
                let bytes = 8 * configs * *runs as u128;
                check_fits(&format!("--runs {runs}"), &what, bytes)
            }
            _ => Ok(()),
        }
    }
}

/// Logical CPUs this process may run on (1 where that cannot be told).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most `--threads` accepted: 8 threads a core, and at least 256 (on a 2-core host a
/// forward at width 128 took 0.018 s on 2 threads, 1.7 s on 1000 and more than a minute on
/// 3000, the workers spinning for their turn).
fn max_threads() -> usize {
    (8 * cores()).max(256)
}

/// An error naming `flag` where `what` needs more than `bytes` this machine has in all: a
/// request that could never run fails here, before an allocation aborts the process.
fn check_fits(flag: &str, what: &str, bytes: u128) -> Result<()> {
    nibble_tensor::machine::fits(bytes).map_err(|(need, total)| Error::Input {
        what: format!("{flag}: {what} needs {need:.1} GiB; this machine has {total:.1} GiB"),
    })
}

/// An error naming `flag` where a `[rows, dim]` f32 batch and the buffers a forward over it
/// holds (its output and two more of its size) need more memory than this machine has in all.
pub fn check_batch_fits(flag: &str, rows: usize, dim: usize) -> Result<()> {
    check_fits(
        &format!("{flag} {rows}"),
        &format!("a [{rows}, {dim}] batch with a forward's buffers"),
        4 * 4 * rows as u128 * dim as u128,
    )
}

/// A standard-normal batch `[rows, dim]` from `seed` (the inputs of compare and bench).
pub fn normal_batch(rows: usize, dim: usize, seed: u64) -> nibble_tensor::Tensor {
    nibble_tensor::Tensor::randn(&[rows, dim], &mut nibble_tensor::Rng::fork(seed, 0xDA7A))
}

/// Bytes to MB (2²⁰ bytes).
pub fn mb(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}
