//! `nibble finetune`: QLoRA on any Sequential classifier. The base is stored in a format and
//! frozen, a rank-r LoRA adapter sits on every Linear, and AdamW minimises the mean softmax
//! cross-entropy on mini-batches of the training split; the test accuracy is measured before
//! and after. The adapters can be saved in PEFT's layout (target modules named by index).

use crate::compare::accuracy;
use crate::error::{Error, Result};
use crate::model::{Classifier, Structure};
use crate::paths::refuse_overwrite;
use nibble_autograd::{AdamW, AdamWConfig, Optimizer, Tape};
use nibble_io::{Dataset, WeightFormat};
use nibble_tensor::Rng;
use serde::Serialize;
use std::path::Path;

/// What `finetune` is asked for.
#[derive(Debug, Clone)]
pub struct FinetuneArgs<'a> {
    /// The state dict.
    pub model: &'a Path,
    /// The data file (with a training split).
    pub data: &'a Path,
    /// The frozen base's format.
    pub format: WeightFormat,
    /// LoRA rank.
    pub rank: usize,
    /// DoRA adapters (PEFT's `use_dora`; see [`nibble_nn::Dora`]) instead of plain LoRA.
    pub dora: bool,
    /// Training steps.
    pub steps: usize,
    /// AdamW learning rate.
    pub lr: f32,
    /// Rows per mini-batch.
    pub batch: usize,
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
    /// Where to save the adapters, if anywhere.
    pub save_adapter: Option<&'a Path>,
    /// Seed of the adapters' init and the mini-batch order.
    pub seed: u64,
}

/// What `finetune` reports (also its `--json` object).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FinetuneReport {
    /// The base's format.
    pub format: String,
    /// LoRA rank.
    pub rank: usize,
    /// Whether the adapters are DoRA ones.
    pub dora: bool,
    /// Steps taken.
    pub steps: usize,
    /// Test accuracy of the quantized base (adapters at zero).
    pub accuracy_before: f64,
    /// Test accuracy after training.
    pub accuracy_after: f64,
    /// Training loss of each step's mini-batch (before that step's update).
    pub loss: Vec<f32>,
}

/// The order mini-batches visit the training rows: a fresh shuffle for every pass.
struct Batches {
    rows: usize,
    order: Vec<usize>,
    next: usize,
    rng: Rng,
}

impl Batches {
    fn new(rows: usize, seed: u64) -> Self {
        Batches {
            rows,
            order: Vec::new(),
            next: 0,
            rng: Rng::fork(seed, 0xBA7C),
        }
    }

    /// The next `batch` row indices (the split has rows: [`Dataset::train`] refuses an empty
    /// one).
    fn take(&mut self, batch: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch {
            if self.next == self.order.len() {
                self.order = (0..self.rows).collect();
                // Fisher-Yates.
                for i in (1..self.order.len()).rev() {
                    let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
                    self.order.swap(i, j);
                }
                self.next = 0;
            }
            out.push(self.order[self.next]);
            self.next += 1;
        }
        out
    }
}

/// Fine-tunes (see the module docs). `--steps` and `--batch` must be at least 1, and `--rank`
/// at most the smaller dimension of every Linear (a LoRA of a larger rank has no more to
/// learn, and its matrices would be larger than the weight); each is an error naming the flag.
/// The report holds every step's loss.
pub fn finetune(args: &FinetuneArgs<'_>) -> Result<FinetuneReport> {
    train(args, LossHistory::Every)
}

/// Which training losses [`train`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LossHistory {
    /// Every step's (`--json`), growing as the steps go.
    Every,
    /// The first and the last step's (all the text summary prints), in constant memory.
    FirstAndLast,
}

fn train(args: &FinetuneArgs<'_>, history: LossHistory) -> Result<FinetuneReport> {
    let usage = |arg, what: &str| Error::Usage {
        arg,
        what: what.to_string(),
    };
    if args.rank == 0 {
        return Err(usage("--rank", "must be at least 1"));
    }
    if args.steps == 0 {
        return Err(usage(
            "--steps",
            "must be at least 1 (0 steps would train nothing and measure no loss)",
        ));
    }
    if args.batch == 0 {
        return Err(usage("--batch", "must be at least 1"));
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        return Err(usage(
            "--lr",
            &format!(
                "must be a positive number within f32's range, found {}",
                args.lr
            ),
        ));
    }
    if let Some(dir) = args.save_adapter {
        let inputs = [(args.model, "--model"), (args.data, "--data")];
        refuse_overwrite(dir, &inputs)?;
        for name in [nibble_nn::peft::WEIGHTS_FILE, nibble_nn::peft::CONFIG_FILE] {
            refuse_overwrite(&dir.join(name), &inputs)?;
        }
        // Before training, not after it.
        nibble_nn::peft::check_destination(dir)?;
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
    let mut model = Classifier::open(args.model, &structure, args.format)?;
    // The formats the base holds: `--format`, or a quantized file's own (`q4`, `f32+nf4`).
    let format = model.format_label();
    for note in model.notes(args.model) {
        eprintln!("note: {note}");
    }
    check_rank(args.rank, args.model, &model.linear_shapes())?;
    data.check_fits(model.features(), model.label_count())?;
    model.check_rows_fit("--data", data.test.len(), false)?;
    let train = data.train()?;
    model.check_rows_fit("--batch", args.batch.min(train.len()), true)?;
    let classes = model.classes();
    let test_accuracy = |m: &Classifier| -> Result<f64> {
        Ok(accuracy(&m.logits(&data.test.x)?, classes, &data.test.y))
    };
    let accuracy_before = test_accuracy(&model)?;
    model.add_lora(args.rank, args.seed)?;
    if args.dora {
        model.enable_dora()?;
    }
    let mut opt = AdamW::new(
        model.trainable_params(),
        AdamWConfig {
            lr: args.lr,
            ..AdamWConfig::default()
        },
    )?;
    let tape = Tape::new();
    let mut batches = Batches::new(train.len(), args.seed);
    // Grown as the steps go (never reserved by the step count, which may be huge).
    let mut loss: Vec<f32> = Vec::new();
    let batch = args.batch.min(train.len());
    for step in 0..args.steps {
        let (x, y) = train.rows(&batches.take(batch))?;
        opt.zero_grad();
        let value = model.train_loss(&tape, x, &y)?;
        if !value.is_finite() {
            // Every later step would be NaN too, and so would the adapter. The first step's
            // loss comes before any update: then the model itself overflows, whatever --lr.
            return Err(if step == 0 {
                Error::Usage {
                    arg: "--model",
                    what: format!(
                        "{}: the loss of the first training step, before any update, is \
                         {value}: the model overflows f32 on the training data (its weights or \
                         the data, not --lr); nothing was saved",
                        args.model.display()
                    ),
                }
            } else {
                Error::Diverged {
                    step: step + 1,
                    steps: args.steps,
                    loss: value,
                    lr: args.lr,
                }
            });
        }
        opt.step()?;
        match history {
            LossHistory::FirstAndLast if loss.len() == 2 => loss[1] = value,
            _ => {
                loss.try_reserve(1).map_err(|_| Error::Usage {
                    arg: "--steps",
                    what: format!(
                        "{}: the loss of every step (--json) no longer fits in memory after \
                         {step} steps",
                        args.steps
                    ),
                })?;
                loss.push(value);
            }
        }
    }
    // The last step's update can make the adapter non-finite after a finite loss.
    check_adapter_finite(&model, args.lr)?;
    let accuracy_after = test_accuracy(&model)?;
    if let Some(dir) = args.save_adapter {
        model.save_adapter(dir)?;
    }
    Ok(FinetuneReport {
        format,
        rank: args.rank,
        dora: args.dora,
        steps: args.steps,
        accuracy_before,
        accuracy_after,
        loss,
    })
}

/// An error naming `--lr`, the adapter tensor, its first NaN or infinite element (row and
/// column) and value, unless every trainable parameter of `model` (its LoRA adapter) is
/// finite: such an adapter turns every output into NaN, and is refused when loaded.
fn check_adapter_finite(model: &Classifier, lr: f32) -> Result<()> {
    for p in model.trainable_params() {
        if let Some((at, value)) = p.value().first_non_finite() {
            return Err(Error::Usage {
                arg: "--lr",
                what: format!(
                    "{lr:?}: training diverged: the trained `{}` holds {value} at {at}; nothing \
                     was saved; try a lower --lr",
                    p.name(),
                ),
            });
        }
    }
    Ok(())
}

/// An error naming `--rank` and its value unless `model` has a Linear (`linears`: names and
/// `(out, in)`) and `rank` is a LoRA rank PEFT would write, 1 up to
/// [`nibble_nn::linear::MAX_LORA_RANK`] (the cap its config reader puts on `r`). A rank above
/// a layer's `min(out, in)` is allowed, as in PEFT (a binary classifier's `[1, hidden]` output
/// layer would otherwise hold every layer to rank 1); the adapters' memory is checked when
/// they are made.
fn check_rank(rank: usize, model: &Path, linears: &[(String, (usize, usize))]) -> Result<()> {
    if linears.is_empty() {
        return Err(Error::Usage {
            arg: "--rank",
            what: format!(
                "{} has no Linear layer to put a LoRA adapter on",
                model.display()
            ),
        });
    }
    let max = nibble_nn::linear::MAX_LORA_RANK;
    if rank == 0 || rank > max {
        return Err(Error::Usage {
            arg: "--rank",
            what: format!("{rank}: a LoRA rank is 1 up to {max} (PEFT's cap on `r`)"),
        });
    }
    Ok(())
}

/// Runs `finetune`, printing progress figures or one JSON object.
pub fn run(args: &FinetuneArgs<'_>, json: bool) -> Result<()> {
    let r = train(
        args,
        if json {
            LossHistory::Every
        } else {
            LossHistory::FirstAndLast
        },
    )?;
    if json {
        println!("{}", serde_json::to_string(&r).expect("serializable"));
        return Ok(());
    }
    let first = r.loss.first().copied().unwrap_or(f32::NAN);
    let last = r.loss.last().copied().unwrap_or(f32::NAN);
    println!(
        "{} base, {} rank {}, {} steps: loss {first:.4} -> {last:.4}; test accuracy {:.2}% -> {:.2}%",
        r.format,
        if r.dora { "DoRA" } else { "LoRA" },
        r.rank,
        r.steps,
        100.0 * r.accuracy_before,
        100.0 * r.accuracy_after
    );
    if let Some(dir) = args.save_adapter {
        println!("adapter saved to {}", dir.display());
    }
    Ok(())
}
