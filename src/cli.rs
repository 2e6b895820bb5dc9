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
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tag folders of images and write one JSON file per folder (the original multiinference.py format).
    Infer(InferArgs),
    /// Train the tagger from a folder per tag (the original multitrain_efficientnet.py recipe).
    Fit(FitArgs),
    /// Measure a model on a labelled dataset: per-label metrics, average precision, pictures,
    /// per-label threshold calibration and a review list.
    Eval(EvalArgs),
    /// Download images: random illustrations per tag from the library's API (--tag), or the
    /// NDL-ImageLabel dataset from its metadata.csv (--metadata), through the IIIF Image API.
    Fetch(FetchArgs),
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
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// NDL-ImageLabel metadata.csv: download every row's image into OUT/<label>/<file name>.
    #[arg(long)]
    pub metadata: Option<PathBuf>,
    /// With --metadata: only the first N selected rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// With --metadata: only these labels (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Output dataset folder.
    #[arg(long, default_value = "datasetpdm")]
    pub out: PathBuf,
    /// Image height asked of the IIIF server.
    #[arg(long, default_value_t = 256)]
    pub height: u32,
    /// Illustrations asked per API call.
    #[arg(long, default_value_t = 10)]
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
    /// Minimum time between two requests, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub delay_ms: u64,
    /// Connect and read timeout, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Retries of a request that timed out, was cut short, or got 429 or 5xx.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// First wait before a retry, in milliseconds (doubled each time; Retry-After wins).
    #[arg(long, default_value_t = 1000)]
    pub backoff_ms: u64,
    /// With --tag: API calls in a row that may bring nothing new before giving up on a tag.
    #[arg(long, default_value_t = 20)]
    pub patience: usize,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model: a trainer checkpoint or a Keras HDF5 file (NDL labels).
    #[arg(long, short = 'w')]
    pub weights: PathBuf,
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
    #[arg(long, value_parser = parse_threshold)]
    pub threshold: Option<f32>,
    /// Choose per-label thresholds that maximise each label's F1 on these images and write them
    /// into a new checkpoint (OUTPUT/<name>.calibrated.ckpt).
    #[arg(long)]
    pub calibrate: bool,
    /// With --calibrate: write the thresholds into the --weights checkpoint itself.
    #[arg(long, requires = "calibrate")]
    pub in_place: bool,
    /// Write review.csv: per label, the N misclassified images with the largest loss.
    #[arg(long, default_value_t = 0)]
    pub review: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// Dataset: one folder per tag (DATA/<tag>/<image>).
    #[arg(long, default_value = "datasetpdm")]
    pub data: PathBuf,
    /// Label list and folder -> labels table (JSON) for a collection other than the NDL's.
    #[arg(long)]
    pub taxonomy: Option<PathBuf>,
    /// Starting weights: a Keras HDF5 file (full, weights-only, or the ImageNet "notop" backbone)
    /// or a trainer checkpoint.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue the run in this folder (runs/<run>) from its last checkpoint.
    #[arg(long, conflicts_with_all = ["init", "run"])]
    pub resume: Option<PathBuf>,
    /// Run name: its folder is RUNS_DIR/<name>. Default: the next free fit, fit2, ...
    #[arg(long)]
    pub run: Option<String>,
    /// Folder of the run folders.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Folder of the Keras weights written whenever validation loss improves (val_loss{:.3f}.hdf5).
    #[arg(long, default_value = "weights_pdm_multi")]
    pub weights_dir: PathBuf,
    /// Epochs in all (on --resume, may be raised to train further).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per training step.
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Seed of the split, the shuffles, the augmentations and drop-connect.
    #[arg(long, default_value_t = 777)]
    pub seed: u64,
    /// Share of the images held out for validation (0: train on all, no validation metrics).
    #[arg(long, default_value_t = 0.1, value_parser = parse_fraction)]
    pub val_fraction: f64,
    /// Training augmentations.
    #[arg(long, value_enum, default_value = "original")]
    pub augment: crate::data::augment::Augment,
    /// Input size in pixels (square).
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u32).range(32..))]
    pub image_size: u32,
    /// Drop-connect rate of the last block (block i of 16 uses rate * i / 16).
    #[arg(long, default_value_t = 0.2, value_parser = parse_fraction)]
    pub drop_connect: f64,
    /// Forward-pass precision: bf16 or fp16 autocast (batch-norm statistics and the loss stay in
    /// fp32), or fp32. Default: bf16 on CUDA, fp32 on CPU.
    #[arg(long, value_enum)]
    pub precision: Option<crate::train::amp::Precision>,
    /// Memory order of activations and kernels. Default: channels-last on CUDA, contiguous on CPU.
    #[arg(long, value_enum, default_value = "auto")]
    pub memory_format: MemoryFormat,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
}

/// `--memory-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryFormat {
    Auto,
    Contiguous,
    ChannelsLast,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} must be in [0, 1)"))
    }
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model weights: a Keras HDF5 file (the published weights_ndllabelimage.hdf5 or a
    /// weights_pdm_multi/*.hdf5 file) or a trainer checkpoint (runs/<run>/best.ckpt).
    #[arg(long, short = 'w')]
    pub weights: PathBuf,
    /// Folder of images: each subfolder <PID>/ gives OUTPUT/<PID>.json; images directly inside go
    /// to a file named after the folder.
    #[arg(long, short = 'i')]
    pub input: PathBuf,
    /// Folder for the JSON files (created if missing).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Report labels whose probability is above this (0 lists every label). Default: the
    /// model's own thresholds (0.4 for Keras files, as the original).
    #[arg(long, value_parser = parse_threshold)]
    pub threshold: Option<f32>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
}

fn parse_threshold(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("threshold {v} must be in [0, 1)"))
    }
}
