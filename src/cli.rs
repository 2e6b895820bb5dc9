//! Command-line interface: `trainer infer` (and the other subcommands as they land).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::device::DeviceArg;

/// Train, evaluate and run the NDL illustration tagger (EfficientNet-B0), compatible with the
/// original Keras scripts and their weights files.
#[derive(Debug, Parser)]
#[command(name = "trainer", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Largest image decoded, in pixels (width x height); a file whose header claims more is
    /// reported and skipped, so a decompression bomb cannot exhaust memory.
    #[arg(long, global = true, default_value_t = crate::data::decode::DEFAULT_MAX_PIXELS,
          value_parser = clap::value_parser!(u64).range(1..=(1u64 << 32)))]
    pub max_pixels: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tag folders of images and write one JSON file per folder (the original multiinference.py format).
    Infer(InferArgs),
    /// Train the tagger from a folder per tag (the original multitrain_efficientnet.py recipe).
    Fit(Box<FitArgs>),
    /// Measure a model on a labelled dataset: per-label metrics, average precision, pictures,
    /// per-label threshold calibration and a review list.
    Eval(EvalArgs),
    /// Download images: random illustrations per tag from the library's API (--tag), or the
    /// NDL-ImageLabel dataset from its metadata.csv (--metadata), through the IIIF Image API.
    Fetch(FetchArgs),
    /// Write the tagger as ONNX or TorchScript for serving stacks (onnxruntime, TensorRT, OpenVINO,
    /// Triton, PyTorch, C++): uint8 BGR images in, probabilities out.
    Export(ExportArgs),
    /// Print what this binary runs on: the libtorch build, the GPUs and driver (and why libtorch
    /// cannot use them, if it cannot), CPU features and thread counts. Paste it into bug reports.
    Doctor,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The model: a trainer checkpoint or a Keras HDF5 file, as `infer` takes.
    #[arg(long, short = 'w')]
    pub weights: PathBuf,
    /// onnx or torchscript.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// The file to write (its folder must exist); written atomically.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Input size in pixels (square), 32 to 2048. Default: the checkpoint's; for a Keras file,
    /// the resolution of the variant it holds (224 for efficientnet-b0, 240 for b1, ... 600 for b7).
    #[arg(long, value_parser = clap::value_parser!(u32).range(32..=2048))]
    pub image_size: Option<u32>,
}

/// `export --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Onnx,
    Torchscript,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Tag to fetch (repeatable): images go to OUT/<tag>/<id>.jpg (OUT/unknown/ for items the
    /// library's model left untagged).
    #[arg(
        long = "tag",
        required_unless_present = "metadata",
        conflicts_with = "metadata"
    )]
    pub tags: Vec<String>,
    /// With --tag: images wanted in each OUT/<tag>/.
    #[arg(long, default_value_t = 100, value_parser = usize_in(1, 10_000_000))]
    pub count: usize,
    /// NDL-ImageLabel metadata.csv: download every row's image into OUT/<label>/<file name>.
    #[arg(long)]
    pub metadata: Option<PathBuf>,
    /// With --metadata: only the first N selected rows.
    #[arg(long, value_parser = usize_in(1, usize::MAX))]
    pub limit: Option<usize>,
    /// With --metadata: only these labels (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Output dataset folder.
    #[arg(long, default_value = "datasetpdm")]
    pub out: PathBuf,
    /// Image height asked of the IIIF server, in pixels (1 to 4096).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub height: u32,
    /// Illustrations asked per API call (1 to 100).
    #[arg(long, default_value_t = 10, value_parser = usize_in(1, 100))]
    pub size: usize,
    /// The illustration API.
    #[arg(long, default_value = crate::fetch::DEFAULT_API_BASE)]
    pub api_base: String,
    /// The IIIF Image API server.
    #[arg(long, default_value = crate::fetch::DEFAULT_IIIF_BASE)]
    pub iiif_base: String,
    /// Downloads at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub jobs: u32,
    /// Minimum time between two requests, in milliseconds (0 to 60000).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub delay_ms: u64,
    /// Deadline of one request, connection and whole body included, in seconds (0 excluded, up
    /// to 3600).
    #[arg(long, default_value_t = 30.0, value_parser = seconds, allow_negative_numbers = true)]
    pub timeout: f64,
    /// Retries of a request that timed out, was cut short, or got 429 or 5xx (0 to 20).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub retries: u32,
    /// First wait before a retry, in milliseconds (doubled each time; a Retry-After header wins;
    /// every wait is capped at 60 s).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub backoff_ms: u64,
    /// With --tag: API calls in a row that may bring nothing new before giving up on a tag.
    #[arg(long, default_value_t = 20, value_parser = usize_in(1, 10_000))]
    pub patience: usize,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model: a trainer checkpoint or a Keras HDF5 file (NDL labels).
    #[arg(long, short = 'w')]
    pub weights: PathBuf,
    /// Input size in pixels (square), 32 to 2048. Default: the checkpoint's; for a Keras file,
    /// the resolution of the variant it holds (224 for efficientnet-b0, 240 for b1, ... 600 for b7).
    #[arg(long, value_parser = clap::value_parser!(u32).range(32..=2048))]
    pub image_size: Option<u32>,
    /// Labelled dataset: one folder per tag, expanded with the model's taxonomy.
    #[arg(long, default_value = "datasetpdm")]
    pub data: PathBuf,
    /// Evaluate exactly the validation images of this run folder (runs/<run>/val.txt).
    #[arg(long)]
    pub split: Option<PathBuf>,
    /// Folder for eval.json, eval.csv, the pictures and review.csv. Default: the folder of --weights.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// One threshold for every label (default: the model's own thresholds).
    #[arg(long, value_parser = parse_threshold, allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    /// Choose per-label thresholds that maximise each label's F1 on these images and write them
    /// into a new checkpoint (OUTPUT/<name>.calibrated.ckpt).
    #[arg(long)]
    pub calibrate: bool,
    /// With --calibrate: write the thresholds into the --weights checkpoint itself.
    #[arg(long, requires = "calibrate")]
    pub in_place: bool,
    /// Write review.csv: per label, the N false positives and the N false negatives with the
    /// largest loss (default with --report: 12, else none).
    #[arg(long, value_parser = usize_in(0, 100_000))]
    pub review: Option<usize>,
    /// Write report.html: one self-contained page with the metrics, the pictures and thumbnails
    /// of the worst mistakes per label (--review of each kind) and of the hierarchy violations.
    #[arg(long)]
    pub report: bool,
    /// Images per forward pass (1 to 4096).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_size: u32,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Forward-pass precision. fp32 (the default) gives the original's outputs; bf16 autocast is
    /// faster on GPUs and on CPUs with AVX512-BF16 or AMX but moves probabilities (by up to 0.67
    /// on the sample images with the test weights: check your model with `eval` first).
    #[arg(long, value_enum)]
    pub precision: Option<crate::model::precision::Precision>,
    /// Engine of the forward pass: auto uses ONNX Runtime for fp32 on the CPU (the same outputs,
    /// faster; its library comes with scripts/setup) and libtorch otherwise; torch forces
    /// libtorch; onnxruntime fails where ONNX Runtime cannot be loaded.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: crate::model::Engine,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// Dataset: one folder per tag (DATA/<tag>/<image>). Default: datasetpdm. With --resume:
    /// where the run's dataset is now, if it moved.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Label list and folder -> labels table (JSON) for a collection other than the NDL's.
    #[arg(long)]
    pub taxonomy: Option<PathBuf>,
    /// Starting weights: a Keras HDF5 file (full, weights-only, or the ImageNet "notop" backbone)
    /// or a trainer checkpoint.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue the run in this folder (runs/<run>) from its last checkpoint, with its own
    /// settings; --epochs, --data, --weights-dir, --device, --precision and --memory-format may
    /// be given, the other training settings may not.
    #[arg(long, conflicts_with_all = ["init", "run", "runs_dir", "taxonomy", "batch_size", "lr",
        "seed", "val_fraction", "augment", "image_size", "arch", "drop_connect", "recipe", "lr_schedule",
        "warmup_epochs", "ema", "precise_bn", "patience", "pos_weight", "freeze_backbone_epochs",
        "loss", "gamma", "asl_gamma_neg", "asl_gamma_pos", "asl_clip", "best_by"])]
    pub resume: Option<PathBuf>,
    /// Run name: its folder is RUNS_DIR/<name>. Default: the next free fit, fit2, ...
    #[arg(long, value_parser = run_name)]
    pub run: Option<String>,
    /// Folder of the run folders.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Folder of the Keras weights written whenever validation loss improves (val_loss{:.3f}.hdf5).
    /// Default: weights_pdm_multi (on --resume: the run's own).
    #[arg(long)]
    pub weights_dir: Option<PathBuf>,
    /// Epochs in all, 1 to 1000000 (on --resume, may be raised to train further). Default: 100.
    #[arg(long, value_parser = usize_in(1, crate::train::settings::MAX_EPOCHS))]
    pub epochs: Option<usize>,
    /// Images per training step (1 to 4096).
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_size: u32,
    /// Adam learning rate (the peak, with a schedule), a positive number. Default: 1e-4 (the
    /// original), 1e-3 with --recipe modern.
    #[arg(long, value_parser = learning_rate, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Training recipe: original (the Keras scripts': constant-rate Adam, nothing else) or modern
    /// (lr 1e-3, --lr-schedule cosine, --warmup-epochs 1, --ema 0.998, --precise-bn 2048). The
    /// options below override the preset's values.
    #[arg(long, value_enum, default_value = "original")]
    pub recipe: crate::train::recipe::Recipe,
    /// Learning-rate schedule after the warm-up: constant, or cosine decay to zero at the last
    /// epoch (SGDR, Loshchilov & Hutter 2017).
    #[arg(long, value_enum)]
    pub lr_schedule: Option<crate::train::recipe::LrSchedule>,
    /// Epochs of linear learning-rate warm-up at the start (Goyal et al. 2017), 0 to --epochs.
    #[arg(long, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub warmup_epochs: Option<f64>,
    /// Validate, checkpoint and export an exponential moving average of the weights with this
    /// decay, in [0, 1) (as timm's ModelEma; warmed up as TensorFlow's ExponentialMovingAverage).
    /// 0 turns the preset's off.
    #[arg(long, value_parser = parse_fraction, allow_negative_numbers = true)]
    pub ema: Option<f64>,
    /// Recompute batch-norm statistics over this many training images before each validation and
    /// checkpoint (precise BN, Wu & Johnson 2021); 0: off, the running averages of training.
    #[arg(long, value_parser = usize_in(0, 10_000_000))]
    pub precise_bn: Option<usize>,
    /// Stop after this many epochs without a lower validation loss (1 to 1000000); the reason is
    /// printed and written to the run's stopped.txt.
    #[arg(long, value_parser = usize_in(1, crate::train::settings::MAX_EPOCHS))]
    pub patience: Option<usize>,
    /// Weight of each label's positives in the loss: none, or auto (negatives/positives of the
    /// training split, for rare labels).
    #[arg(long, value_enum)]
    pub pos_weight: Option<crate::train::recipe::PosWeight>,
    /// The training loss: bce (binary cross-entropy, the original's), focal (focal loss, Lin et
    /// al. 2017) or asl (asymmetric loss, Ridnik et al. 2021), for rare labels. The validation
    /// loss stays BCE, so runs compare.
    #[arg(long, value_enum, default_value = "bce")]
    pub loss: crate::train::loss::LossKind,
    /// Focal loss's focusing exponent gamma, 0 to 10 (default 2; 0 is BCE).
    #[arg(long, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub gamma: Option<f64>,
    /// Asymmetric loss's focusing exponent of the negatives, 0 to 10 (default 4).
    #[arg(long, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub asl_gamma_neg: Option<f64>,
    /// Asymmetric loss's focusing exponent of the positives, 0 to 10 (default 1).
    #[arg(long, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub asl_gamma_pos: Option<f64>,
    /// Asymmetric loss's probability margin of the negatives, in [0, 1) (default 0.05).
    #[arg(long, value_parser = parse_fraction, allow_negative_numbers = true)]
    pub asl_clip: Option<f64>,
    /// Which validation result picks the best epoch (best.ckpt and the Keras weights) and what
    /// --patience watches: val_loss (lowest, the original's), micro_f1, macro_f1 or map
    /// (highest).
    #[arg(long, value_enum, default_value = "val_loss")]
    pub best_by: crate::history::BestBy,
    /// TensorBoard event files in the run folder (`tensorboard --logdir runs`): on or off.
    #[arg(long, value_enum, default_value = "on")]
    pub tensorboard: Switch,
    /// On CUDA, record a full batch's training step once in a CUDA graph (after a few eager
    /// steps) and replay it: one launch instead of thousands per step. bf16 or fp32, one rank,
    /// no --accumulate. on or off.
    #[arg(long, value_enum, default_value = "off")]
    pub cuda_graphs: Switch,
    /// Train only the head for this many epochs first (for --init from ImageNet).
    #[arg(long, value_parser = usize_in(0, crate::train::settings::MAX_EPOCHS))]
    pub freeze_backbone_epochs: Option<usize>,
    /// Seed of the split, the shuffles, the augmentations and drop-connect.
    #[arg(long, default_value_t = 777)]
    pub seed: u64,
    /// Share of the images held out for validation, in [0, 1) (0: train on all, no validation
    /// metrics).
    #[arg(long, default_value_t = 0.1, value_parser = parse_fraction, allow_negative_numbers = true)]
    pub val_fraction: f64,
    /// Training augmentations.
    #[arg(long, value_enum, default_value = "original")]
    pub augment: crate::data::augment::Augment,
    /// Input size in pixels (square), 32 to 2048. Default: the variant's resolution (224 for
    /// efficientnet-b0, 240 for b1, 260 for b2, 300 for b3, 380 for b4, 456 for b5, 528 for b6,
    /// 600 for b7).
    #[arg(long, value_parser = clap::value_parser!(u32).range(32..=2048))]
    pub image_size: Option<u32>,
    /// The network: efficientnet-b0 (the original) to efficientnet-b7, wider, deeper and made
    /// for larger inputs (see --image-size).
    #[arg(long, default_value = "efficientnet-b0", value_parser = arch_name)]
    pub arch: crate::model::arch::Arch,
    /// Drop-connect rate of the last block (block i of 16 uses rate * i / 16), in [0, 1).
    #[arg(long, default_value_t = 0.2, value_parser = parse_fraction, allow_negative_numbers = true)]
    pub drop_connect: f64,
    /// Forward-pass precision: bf16 or fp16 autocast (batch-norm statistics and the loss stay in
    /// fp32), or fp32. Default: bf16 on CUDA, fp32 on CPU.
    #[arg(long, value_enum)]
    pub precision: Option<crate::model::precision::Precision>,
    /// Memory order of activations and kernels. Default (auto): channels-last, the faster one on
    /// both CUDA and CPU.
    #[arg(long, value_enum)]
    pub memory_format: Option<MemoryFormat>,
    /// auto, cpu, cuda or cuda:N (with several ranks: rank i on cuda:LOCAL_RANK).
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Start N ranks on this machine, as `torchrun --nproc-per-node N` does: rank i on cuda:i,
    /// or N CPU processes (Gloo). Under torchrun or srun, leave it out: RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR and MASTER_PORT make this process one rank.
    #[arg(long, value_parser = usize_in(1, 1024))]
    pub nproc_per_node: Option<usize>,
    /// Micro-batches per optimizer step on each rank, their gradients accumulated; --batch-size
    /// stays the global batch of one step and must divide by ranks x accumulate. May change on
    /// --resume.
    #[arg(long, value_parser = usize_in(1, 4096))]
    pub accumulate: Option<usize>,
    /// Folder of the decoded-image files that later runs and the other ranks map instead of
    /// decoding again (default: $TRAINER_CACHE/images, else ~/.cache/trainer/images); `none`
    /// decodes into memory at every run.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Seconds a rank waits for the others (at the start and in every exchange) before giving up.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..=86400))]
    pub dist_timeout: u32,
}

/// A feature on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// `--memory-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryFormat {
    Auto,
    Contiguous,
    ChannelsLast,
}

/// A number from the command line, refused with the accepted range when outside it.
fn number_in(s: &str, ok: impl Fn(f64) -> bool, range: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number; expected one in {range}"))?;
    if v.is_finite() && ok(v) {
        Ok(v)
    } else {
        Err(format!("{s} is outside {range}"))
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    number_in(s, |v| (0.0..1.0).contains(&v), "[0, 1)")
}

fn parse_non_negative(s: &str) -> Result<f64, String> {
    number_in(s, |v| v >= 0.0, "[0, inf)")
}

fn learning_rate(s: &str) -> Result<f64, String> {
    number_in(s, |v| v > 0.0, "(0, inf), a positive number")
}

fn seconds(s: &str) -> Result<f64, String> {
    number_in(s, |v| v > 0.0 && v <= 3600.0, "(0, 3600] seconds")
}

/// A whole number in `[min, max]`, as a clap value parser.
fn usize_in(min: usize, max: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s: &str| {
        let range = if max == usize::MAX {
            format!("[{min}, ...)")
        } else {
            format!("[{min}, {max}]")
        };
        let v: usize = s
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a whole number in {range}"))?;
        if (min..=max).contains(&v) {
            Ok(v)
        } else {
            Err(format!("{v} is outside {range}"))
        }
    }
}

/// A run name: one folder name, not a path.
/// `efficientnet-b0` .. `efficientnet-b7`, through [`crate::model::arch::Arch`]'s parser.
fn arch_name(s: &str) -> Result<crate::model::arch::Arch, String> {
    s.parse()
}

fn run_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_alphanumeric() || "_-.".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a run name (letters, digits, '_', '-' and '.', not starting with '.')"
        ))
    }
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model weights: a Keras HDF5 file (the published weights_ndllabelimage.hdf5 or a
    /// weights_pdm_multi/*.hdf5 file) or a trainer checkpoint (runs/<run>/best.ckpt).
    #[arg(long, short = 'w')]
    pub weights: PathBuf,
    /// Input size in pixels (square), 32 to 2048. Default: the checkpoint's; for a Keras file,
    /// the resolution of the variant it holds (224 for efficientnet-b0, 240 for b1, ... 600 for b7).
    #[arg(long, value_parser = clap::value_parser!(u32).range(32..=2048))]
    pub image_size: Option<u32>,
    /// Folder of images: each subfolder <PID>/ gives OUTPUT/<PID>.json; images directly inside go
    /// to a file named after the folder.
    #[arg(long, short = 'i')]
    pub input: PathBuf,
    /// Folder for the JSON files (created if missing).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Tag every folder again, also those whose JSON file already exists (by default they are
    /// left as they are, so running a stopped job again continues it).
    #[arg(long)]
    pub overwrite: bool,
    /// Report labels whose probability is above this (0 lists every label). Default: the
    /// model's own thresholds (0.4 for Keras files, as the original).
    #[arg(long, value_parser = parse_threshold, allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    /// Images per forward pass (1 to 4096).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_size: u32,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Forward-pass precision. fp32 (the default) gives the original's outputs; bf16 autocast is
    /// faster on GPUs and on CPUs with AVX512-BF16 or AMX but moves probabilities (by up to 0.67
    /// on the sample images with the test weights: check your model with `eval` first).
    #[arg(long, value_enum)]
    pub precision: Option<crate::model::precision::Precision>,
    /// Engine of the forward pass: auto uses ONNX Runtime for fp32 on the CPU (the same outputs,
    /// faster; its library comes with scripts/setup) and libtorch otherwise; torch forces
    /// libtorch; onnxruntime fails where ONNX Runtime cannot be loaded.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: crate::model::Engine,
}

fn parse_threshold(s: &str) -> Result<f32, String> {
    number_in(s, |v| (0.0..1.0).contains(&v), "[0, 1)").map(|v| v as f32)
}
