//! The settings of a run: one typed value, resolved once (from the command line for a new run;
//! from the checkpoint with what `--resume` may change, [`FitSettings::resumed`]), saved in every
//! checkpoint and in `settings.json`, and read by every part of the loop.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::loss::Loss;
use super::recipe::RecipeSettings;
use crate::data::augment::Augment;
use crate::history::BestBy;
use crate::model::arch::Arch;
use crate::model::checkpoint::{self, Checkpoint};
use crate::model::precision::Precision;

/// The settings of a run, saved in its checkpoints so a resume continues with the same ones.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FitSettings {
    pub data: PathBuf,
    pub taxonomy: Option<PathBuf>,
    pub weights_dir: PathBuf,
    pub seed: u64,
    pub val_fraction: f64,
    pub augment: Augment,
    pub image_size: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub drop_connect: f64,
    pub init: Option<PathBuf>,
    /// Forward-pass precision (bf16 or fp16 autocast, or fp32).
    #[serde(default = "fp32")]
    pub precision: Precision,
    /// Activations and convolution kernels in channels-last memory order.
    #[serde(default)]
    pub channels_last: bool,
    /// The recipe's options beyond the original's (all off in the original recipe).
    #[serde(default)]
    pub recipe: RecipeSettings,
    /// Micro-batches whose gradients one optimizer step accumulates (per rank).
    #[serde(default = "one")]
    pub accumulate: usize,
    /// Folder of the decoded-image files (none: decode into memory at every run). A property of
    /// the machine, not of the run: not saved.
    #[serde(skip)]
    pub cache_dir: Option<PathBuf>,
    /// The EfficientNet variant; not written for B0, so a B0 run's settings are as before.
    #[serde(default, skip_serializing_if = "Arch::is_b0")]
    pub arch: Arch,
    /// The training loss; not written for BCE (the original's), likewise.
    #[serde(default, skip_serializing_if = "Loss::is_default")]
    pub loss: Loss,
    /// The validation result that picks the best epoch; not written for val_loss, likewise.
    #[serde(default, skip_serializing_if = "BestBy::is_default")]
    pub best_by: BestBy,
    /// TensorBoard event files in the run folder. A property of the session: not saved.
    #[serde(skip)]
    pub tensorboard: bool,
    /// Full batches' steps recorded once in a CUDA graph and replayed. A property of the session:
    /// not saved.
    #[serde(skip)]
    pub cuda_graphs: bool,
}

fn one() -> usize {
    1
}

fn fp32() -> Precision {
    Precision::Fp32
}

/// Largest batch accepted (memory is bounded by the batch).
pub const MAX_BATCH: usize = 4096;
/// Most epochs a run may ask for.
pub const MAX_EPOCHS: usize = 1_000_000;

impl FitSettings {
    /// Checks every number against its range (the command line does too; this also covers
    /// settings read back from a checkpoint). The error names the setting and its range.
    pub fn validate(&self) -> Result<()> {
        let (min, max) = (checkpoint::MIN_IMAGE_SIZE, checkpoint::MAX_IMAGE_SIZE);
        let checks = [
            (
                self.lr.is_finite() && self.lr > 0.0,
                format!("lr {} must be a positive number", self.lr),
            ),
            (
                (1..=MAX_BATCH).contains(&self.batch_size),
                format!("batch_size {} must be in [1, {MAX_BATCH}]", self.batch_size),
            ),
            (
                (1..=MAX_EPOCHS).contains(&self.epochs),
                format!("epochs {} must be in [1, {MAX_EPOCHS}]", self.epochs),
            ),
            (
                (min..=max).contains(&self.image_size),
                format!("image_size {} must be in [{min}, {max}]", self.image_size),
            ),
            (
                (0.0..1.0).contains(&self.val_fraction),
                format!("val_fraction {} must be in [0, 1)", self.val_fraction),
            ),
            (
                (0.0..1.0).contains(&self.drop_connect),
                format!("drop_connect {} must be in [0, 1)", self.drop_connect),
            ),
            (
                (1..=MAX_BATCH).contains(&self.accumulate),
                format!("accumulate {} must be in [1, {MAX_BATCH}]", self.accumulate),
            ),
        ];
        if let Some((_, message)) = checks.into_iter().find(|(ok, _)| !ok) {
            bail!("{message}");
        }
        self.loss.validate().map_err(anyhow::Error::msg)?;
        self.recipe
            .validate(self.epochs)
            .map_err(anyhow::Error::msg)
    }

    /// The settings of the run `resume` continues, from its checkpoint, with what `overrides`
    /// changes.
    pub fn resumed(resume: &Resume, overrides: Overrides) -> Result<FitSettings> {
        let mut settings: FitSettings =
            serde_json::from_value(resume.checkpoint.meta.settings.clone()).with_context(|| {
                format!("{}: unreadable run settings", resume.run_dir.display())
            })?;
        let Overrides {
            epochs,
            data,
            weights_dir,
            precision,
            channels_last,
            accumulate,
        } = overrides;
        settings.epochs = epochs.unwrap_or(settings.epochs);
        settings.data = data.unwrap_or(settings.data);
        settings.weights_dir = weights_dir.unwrap_or(settings.weights_dir);
        settings.precision = precision.unwrap_or(settings.precision);
        settings.channels_last = channels_last.unwrap_or(settings.channels_last);
        settings.accumulate = accumulate.unwrap_or(settings.accumulate);
        Ok(settings)
    }
}

/// What may change between the sessions of a run (`fit --resume`); the recipe itself may not.
#[derive(Debug, Default)]
pub struct Overrides {
    pub epochs: Option<usize>,
    pub data: Option<PathBuf>,
    pub weights_dir: Option<PathBuf>,
    pub precision: Option<Precision>,
    pub channels_last: Option<bool>,
    pub accumulate: Option<usize>,
}

/// A run to continue: its folder and its last checkpoint (weights, optimizer state, history),
/// read by [`super::run_dir::resume`].
pub struct Resume {
    pub run_dir: PathBuf,
    pub checkpoint: Checkpoint,
}
