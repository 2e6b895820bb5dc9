//! The checkpoint saver: every epoch's `last.ckpt`; for the best epoch by `--best-by`, also
//! `best.ckpt` and the Keras weights (`val_loss{:.3f}.hdf5`, as the original's ModelCheckpoint
//! names them); and early stopping, counted from the best epoch.

use std::path::Path;

use anyhow::{Context, Result};

use super::learner::Model;
use super::recipe;
use super::run_dir::{BEST, LAST};
use super::settings::FitSettings;
use crate::data::taxonomy::Taxonomy;
use crate::history::{BestBy, EpochRecord};
use crate::model::checkpoint::{self, CheckpointMeta, Preprocessing};
use crate::model::{keras, DEFAULT_INFER_THRESHOLD};

/// The best epoch so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Best {
    pub epoch: Option<usize>,
    /// Its value of the `--best-by` metric.
    pub value: Option<f64>,
    /// Its validation loss (the checkpoint's `best_val_loss`).
    pub val_loss: Option<f64>,
}

impl Best {
    /// The best epoch of a run resumed from `meta`: its value read from the history.
    pub fn resumed(meta: &CheckpointMeta, by: BestBy) -> Best {
        let value = match by {
            BestBy::ValLoss => meta.best_val_loss,
            _ => meta
                .history
                .iter()
                .find(|r| Some(r.epoch) == meta.best_epoch)
                .and_then(|r| r.metric(by)),
        };
        Best {
            epoch: meta.best_epoch,
            value,
            val_loss: meta.best_val_loss,
        }
    }

    /// Takes `record` as the best when it is better by `by` (or when there is nothing to compare:
    /// a run without validation keeps every epoch, as the original's did); says whether it was.
    pub fn offer(&mut self, record: &EpochRecord, by: BestBy) -> bool {
        let better = match (record.metric(by), self.value) {
            (Some(v), Some(b)) => by.better(v, b),
            (Some(_), None) => true,
            (None, _) => record.validation.is_none() || self.epoch.is_none(),
        };
        if better {
            *self = Best {
                epoch: Some(record.epoch),
                value: record.metric(by),
                val_loss: record.validation.as_ref().map(|v| v.loss),
            };
        }
        better
    }

    /// Why to stop after `epoch` (`--patience` epochs without a better one), if so.
    pub fn stop_reason(&self, settings: &FitSettings, epoch: usize) -> Option<String> {
        let by = settings.best_by;
        let patience = settings.recipe.patience;
        recipe::stop_reason(patience, epoch, self.epoch, self.value, by.describe())
    }
}

/// Where and what an epoch is saved as.
pub struct Saver<'a> {
    pub settings: &'a FitSettings,
    pub run_dir: &'a Path,
    pub taxonomy: &'a Taxonomy,
}

impl Saver<'_> {
    /// Saves the used weights of the epoch `history` ends with: `last.ckpt`, and when it is the
    /// best, `best.ckpt`; the Keras weights follow with [`Saver::save_keras`].
    pub fn save(&self, model: &Model, history: &[EpochRecord], best: &Best) -> Result<()> {
        let Some(record) = history.last() else {
            return Ok(());
        };
        let meta = self.meta(model, history, best)?;
        let (used_vs, _) = model.used();
        let state = model.extra_tensors();
        checkpoint::save(&self.run_dir.join(LAST), &meta, used_vs, &state)?;
        if best.epoch == Some(record.epoch) {
            checkpoint::save(&self.run_dir.join(BEST), &meta, used_vs, &state)?;
        }
        Ok(())
    }

    /// The Keras weights of the best epoch `record`, named by its validation loss (its training
    /// loss without validation).
    pub fn save_keras(&self, model: &Model, record: &EpochRecord) -> Result<()> {
        let name = match &record.validation {
            Some(v) => format!("val_loss{:.3}.hdf5", v.loss),
            None => format!("loss{:.3}.hdf5", record.train_loss),
        };
        let last = self.run_dir.join(LAST);
        let (used_vs, _) = model.used();
        let path = self.settings.weights_dir.join(name);
        keras::save_weights(used_vs, self.settings.arch, &path).with_context(|| {
            format!(
                "epoch {} is checkpointed in {}",
                record.epoch,
                last.display()
            )
        })
    }

    fn meta(&self, model: &Model, history: &[EpochRecord], best: &Best) -> Result<CheckpointMeta> {
        let settings = self.settings;
        let labels = self.taxonomy.labels.len();
        let record = history.last();
        Ok(CheckpointMeta {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::VERSION,
            epoch: record.map_or(0, |r| r.epoch),
            taxonomy: self.taxonomy.clone(),
            preprocessing: Preprocessing::original(settings.image_size),
            thresholds: vec![DEFAULT_INFER_THRESHOLD; labels],
            drop_connect: settings.drop_connect,
            optimizer_step: model.adam.step,
            seed: settings.seed,
            val_loss: record.and_then(|r| r.validation.as_ref()).map(|v| v.loss),
            best_val_loss: best.val_loss,
            best_epoch: best.epoch,
            settings: serde_json::to_value(settings)?,
            history: history.to_vec(),
            tensors_sha256: None,
            arch: settings.arch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::ValidationRecord;

    fn record(epoch: usize, loss: f64, probs: &[f32]) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: 0.1,
            lr: 1e-4,
            epoch_time_s: 1.0,
            train_images_per_s: 10.0,
            validation: Some(ValidationRecord::new(loss, probs, &[1.0, 0.0], 1)),
        }
    }

    #[test]
    fn the_best_epoch_is_that_of_the_chosen_metric() {
        // Epoch 2 has the lower loss, epoch 1 the better ranking (AP 1 against 0.5).
        let (a, b) = (record(1, 0.5, &[0.9, 0.1]), record(2, 0.4, &[0.1, 0.9]));
        let mut by_loss = Best::default();
        assert!(by_loss.offer(&a, BestBy::ValLoss));
        assert!(by_loss.offer(&b, BestBy::ValLoss));
        assert_eq!((by_loss.epoch, by_loss.val_loss), (Some(2), Some(0.4)));
        let mut by_map = Best::default();
        assert!(by_map.offer(&a, BestBy::Map));
        assert!(!by_map.offer(&b, BestBy::Map));
        assert_eq!(
            (by_map.epoch, by_map.value, by_map.val_loss),
            (Some(1), Some(1.0), Some(0.5))
        );
    }
}
